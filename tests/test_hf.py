"""hf.py: a train.py checkpoint exported for transformers computes what LM computes (logits, greedy
generation, log-likelihoods, lm-evaluation-harness scores), loads back bit-identically, runs without this
repository or triton, holds no pickle, and its tokenizer gives tiktoken's ids. The checkpoints come from
real train.py runs (tiny models, 2 iterations) and are read only through sample.py's loader."""
import ast
import functools
import glob
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import hf  # noqa: E402
from sample import load_checkpoint  # noqa: E402
from one_line import assert_one_error_line  # noqa: E402
from together import together  # noqa: E402

transformers = pytest.importorskip('transformers')
pytest.importorskip('safetensors')

TIMEOUT = 300
TINY = ['--dataset=tiny', '--device=cpu', '--d_model=32', '--n_heads=2', '--d_head=16', '--ff_n_experts=4',
        '--ff_k=2', '--d_expert=16', '--att_n_experts=2', '--block_size=32', '--batch_size=4', '--eval_iters=2',
        '--warmup_iters=2', '--lr_decay_iters=100', '--log_interval=1', '--max_iters=2', '--eval_interval=2']
# one run per architecture; the dense one writes a sharded (torch.distributed.checkpoint) directory
RUNS = {'moeut': ['--n_layers=2', '--group_size=2'],
        'dense': ['--model_type=dense', '--n_layers=2', '--d_ff=64', '--checkpoint_format=sharded'],
        'act': ['--halting=act', '--n_layers=3', '--group_size=1', '--act_bias_init=0.0'],
        'mor': ['--halting=mor', '--n_layers=3', '--group_size=1', '--n_prelude=1']}


def env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS='1', WANDB_MODE='disabled', HF_HUB_OFFLINE='1',
             HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'CVMM_IMPL', 'HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN'):
        e.pop(k, None)
    return {**e, **extra}


def run(args, cwd, check=True, **extra):
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=env(**extra), capture_output=True, text=True,
                       timeout=TIMEOUT)
    if check and p.returncode != 0:
        pytest.fail(f"{' '.join(args[:2])} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    """Working directory with data/tiny (bytes tokenizer) and one 2-iteration train.py run per RUNS entry
    in out/<name>; out/moeut is exported with the command line, the others by export_checkpoint."""
    import prepare
    r = tmp_path_factory.mktemp('hf')
    rng = random.Random(0)
    words = 'the king and queen of a fair land spoke to all who would hear my lord said no more'.split()
    (r / 'src.txt').write_text('\n'.join(' '.join(rng.choice(words) for _ in range(12)) for _ in range(400)))
    prepare.prepare([str(r / 'src.txt')], str(r / 'data' / 'tiny'), 'bytes', 0.1, 1337, verbose=False)

    def train(name):
        run([os.path.join(ROOT, 'train.py'), *TINY, *RUNS[name], f'--out_dir=out/{name}'], r)
        if name == 'moeut':
            run([os.path.join(ROOT, 'hf.py'), '--init_from=out/moeut', '--export=exp/moeut'], r)
    together(*[functools.partial(train, name) for name in RUNS])     # the runs are independent
    for name in RUNS:
        if name != 'moeut':
            hf.export_checkpoint(str(r / 'out' / name), str(r / 'exp' / name))
    return r


@functools.lru_cache(maxsize=None)
def lm_of(root, name):
    """The run's LM read with sample.py's loader (its latest checkpoint), and the path it read."""
    path = hf.resolve_checkpoint(str(root / 'out' / name), None)
    model, _, path = load_checkpoint(path, None, 'cpu')
    return model, path


@functools.lru_cache(maxsize=None)
def hf_model(root, name, fresh=0):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(root / 'exp' / name), trust_remote_code=True)


def tokens(vocab, B, T, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- what an export holds ----------------------------------------------------------------------

def test_sharded_checkpoint_was_exported(root):
    assert os.path.isdir(lm_of(root, 'dense')[1])       # the dense run's checkpoint is a ckpt_N/ directory
    assert os.path.isfile(lm_of(root, 'moeut')[1])


@pytest.mark.parametrize('name', list(RUNS))
def test_export_has_no_pickle(root, name):
    """Every file loads as JSON, safetensors, Python source or Markdown text; nothing else is there."""
    from safetensors.torch import load_file
    d = root / 'exp' / name
    names = sorted(os.listdir(d))
    assert names == sorted(['config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json',
                            'special_tokens_map.json', 'model.safetensors', 'README.md', 'configuration_nanomoeut.py',
                            'modeling_nanomoeut.py', 'model.py', 'cvmm.py', 'halting.py'])
    for n in names:
        p = d / n
        assert not p.read_bytes().startswith(b'\x80'), n          # a pickle's protocol byte
        if n.endswith('.json'):
            json.loads(p.read_text())
        elif n.endswith('.safetensors'):
            assert load_file(str(p))
        elif n.endswith('.py'):
            ast.parse(p.read_text())
        else:
            assert n.endswith('.md') and p.read_text(encoding='utf-8')


@pytest.mark.parametrize('name', list(RUNS))
def test_config_json_has_every_model_config_key(root, name):
    from dataclasses import asdict
    model, _ = lm_of(root, name)
    config = json.loads((root / 'exp' / name / 'config.json').read_text())
    for k, v in asdict(model.cfg).items():
        assert config[hf.RENAMED.get(k, k)] == (list(v) if isinstance(v, tuple) else v), k
    assert config['model_type'] == 'nanomoeut' and config['lm_type'] == model.cfg.model_type
    assert config['nanomoeut']['tokenizer'] == 'bytes'


def test_shipped_sources_import_only_each_other(root):
    """The copies of model.py, cvmm.py, halting.py import each other relatively (so transformers copies
    them with the modeling file) and nothing of the repository absolutely."""
    for n in hf.SOURCES + ('modeling_nanomoeut.py', 'configuration_nanomoeut.py'):
        tree = ast.parse((root / 'exp' / 'moeut' / n).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert node.module.split('.')[0] not in hf.PROJECT_MODULES, (n, node.module)
            if isinstance(node, ast.Import):
                assert all(a.name.split('.')[0] not in hf.PROJECT_MODULES for a in node.names), n
    assert 'from .cvmm import' in (root / 'exp' / 'moeut' / 'model.py').read_text()


def test_model_card(root):
    card = (root / 'exp' / 'moeut' / 'README.md').read_text()
    assert card.startswith('---\nlibrary_name: transformers')
    assert '| iterations | 2 |' in card
    assert '| training tokens | 256 (128 per step) |' in card            # 2 steps x 4 x 32
    val = [json.loads(x) for x in open(root / 'out' / 'moeut' / 'log.jsonl') if 'val/loss' in x][-1]['val/loss']
    assert f'| val loss at this checkpoint | {val:.4f} |' in card
    assert 'python hf.py --init_from=out/moeut --export=exp/moeut' in card
    cmd = next(line for line in card.splitlines() if line.startswith('python train.py'))
    assert '--max_iters=2' in cmd and '--block_size=32' in cmd and '--out_dir=out/moeut' in cmd
    assert '--learning_rate' not in cmd                                    # only keys set away from the defaults
    for k in ('halting', 'mor_capacity', 'ff_n_experts'):
        assert f'| `{k}` |' in card
    assert hf.lm_eval_command('exp/moeut') in card
    assert 'lambada_openai,blimp,cbt_cn,cbt_ne,hellaswag,piqa,arc_easy' in card


# ---- exactness ---------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(RUNS))
def test_hf_logits_equal_lm_logits(root, name):
    model, _ = lm_of(root, name)
    m = hf_model(root, name)
    assert not m.training
    # the routing counters (non-persistent buffers, not in the weights file) start at zero
    assert all(int(b.abs().sum()) == 0 for n, b in m.lm.named_buffers() if 'usage' in n)
    x = tokens(model.cfg.vocab_size, 2, model.cfg.block_size)
    with torch.no_grad():
        want, got = model(x).logits, m(x).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize('name', list(RUNS))
def test_round_trip_is_bit_identical(root, name):
    model, _ = lm_of(root, name)
    back, cfg = hf.load_hf(str(root / 'exp' / name), 'cpu')
    assert cfg == {**cfg, 'model_type': model.cfg.model_type, 'halting': model.cfg.halting}
    assert back.cfg == model.cfg and not back.training
    x = tokens(model.cfg.vocab_size, 2, model.cfg.block_size, seed=1)
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize('name', list(RUNS))
def test_hf_greedy_generate_equals_lm_generate(root, name):
    """Past the context too (LM.generate slides the window; the export re-encodes the last block_size
    tokens for every new one, with no cache), and stopping at <|endoftext|> the same way."""
    model, _ = lm_of(root, name)
    m = hf_model(root, name)
    block = model.cfg.block_size
    prompt = tokens(256, 2, 5, seed=2)
    n = block + 10 - prompt.shape[1]
    want = model.generate(prompt, n, temperature=0, eos_token=256)
    with torch.no_grad():
        got = m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False)
    assert torch.equal(got, want)


def test_generation_stops_at_end_of_text(root):
    """A model made to prefer <|endoftext|> after a few tokens: both stop there, padding with it."""
    model = load_checkpoint(lm_of(root, 'moeut')[1], None, 'cpu')[0]      # copies: their head is changed
    m = hf_model(root, 'moeut', fresh=1)
    for lm in (model, m.lm):
        with torch.no_grad():
            lm.lm_head.bias[256] = 2.0 * lm.lm_head.bias.abs().max() + 3
    prompt = tokens(256, 1, 4, seed=3)
    want = model.generate(prompt, 8, temperature=0, eos_token=256)
    with torch.no_grad():
        got = m.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want) and int(got[0, -1]) == 256


def test_loss_through_hf_equals_evaluate_file(root, tmp_path):
    """Mean next-token loss of a text: the export's forward with labels == sample.py's evaluate_file."""
    import prepare
    from sample import evaluate_file
    model, _ = lm_of(root, 'moeut')
    m = hf_model(root, 'moeut')
    text = 'my lord the queen spoke'           # one window (< block_size tokens)
    (tmp_path / 't.txt').write_text(text)
    enc = prepare.get_tokenizer('bytes')
    ours = evaluate_file(model, enc, str(tmp_path / 't.txt'), 'cpu', torch.autocast('cpu', enabled=False))
    ids = torch.tensor([enc.encode_ordinary(text)])
    with torch.no_grad():
        loss = m(ids, labels=ids).loss
    assert abs(loss.item() - ours['loss']) < 1e-5


def test_right_padding_is_allowed_left_padding_is_refused(root):
    m = hf_model(root, 'moeut')
    x = tokens(256, 2, 8, seed=4)
    right = torch.ones_like(x)
    right[1, 5:] = 0
    with torch.no_grad():
        torch.testing.assert_close(m(x, attention_mask=right).logits[1, :5], m(x[1:, :5]).logits[0], atol=1e-5, rtol=0)
        left = torch.ones_like(x)
        left[1, :3] = 0
        with pytest.raises(ValueError, match='right padding'):
            m(x, attention_mask=left)


# ---- self-contained ----------------------------------------------------------------------------

def test_export_runs_without_the_repository_and_without_triton(root, tmp_path):
    """A fresh process outside the repository, with triton unimportable and an empty transformers module
    cache: transformers copies the shipped sources and the CPU path gives LM's logits."""
    from safetensors.torch import load_file
    model, _ = lm_of(root, 'act')
    x = tokens(model.cfg.vocab_size, 2, 16, seed=5)
    torch.save(x, tmp_path / 'x.pt')
    script = f"""
import sys
sys.modules['triton'] = None          # import triton now raises ImportError
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(root / 'exp' / 'act')!r}, trust_remote_code=True)
x = torch.load('x.pt')
with torch.no_grad():
    save_file({{'logits': m(x).logits}}, 'out.safetensors')
files = {{n: getattr(mod, '__file__', None) or '' for n, mod in list(sys.modules.items())}}
repo = [n for n, f in files.items() if f.startswith({ROOT!r}) and not f.startswith(sys.prefix)]   # a venv may sit inside the checkout
cvmm = [mod for n, mod in sys.modules.items() if n.endswith('.cvmm')]
print('REPO', repo, 'TRITON', [c.triton for c in cvmm], 'CVMM', [c.__name__ for c in cvmm])
"""
    p = run(['-c', script], tmp_path, HF_MODULES_CACHE=str(tmp_path / 'modules'), PYTHONPATH='')
    assert 'REPO [] TRITON [None] CVMM [' in p.stdout and p.stdout.count('.cvmm') == 1, p.stdout
    assert os.path.isfile(glob.glob(str(tmp_path / 'modules' / '**' / 'halting.py'), recursive=True)[0])
    with torch.no_grad():
        torch.testing.assert_close(load_file(str(tmp_path / 'out.safetensors'))['logits'], model(x).logits,
                                   atol=1e-5, rtol=0)


# ---- tokenizer ---------------------------------------------------------------------------------

TEXTS = ["Hello world! It's 12345 apples, they're 3.14159 each... I'LL pay $1,000,000.",
         "  leading spaces\n\n\ttabs\t and  double  spaces  \n trailing   \n",
         "naïve café — 日本語のテキスト 🙂🚀 Ünïcödé ﬁ ligature\r\nwindows line",
         "code: def f(x):\n    return x**2  # comment\n<|endoftext|>after the end<|endoftext|>",
         "digits 1 12 123 1234 12345 123456 and x1y22z333"]


@pytest.mark.parametrize('name', ['gpt2', 'cl100k_base', 'o200k_base', 'bytes'])
def test_tokenizer_gives_tiktoken_ids(root, tmp_path, name):
    """AutoTokenizer from an export (tokenizer files of each encoding) encodes to tiktoken's ids, special
    token included, and decodes back to the text."""
    import prepare
    from transformers import AutoTokenizer
    try:
        enc = prepare.get_tokenizer(name)
    except prepare.PrepareError as e:
        pytest.skip(str(e))
    d = tmp_path / 'export'
    shutil.copytree(root / 'exp' / 'moeut', d)
    for f, obj in hf.tokenizer_files(name, 64).items():
        (d / f).write_text(json.dumps(obj, ensure_ascii=False))
    tok = AutoTokenizer.from_pretrained(str(d), trust_remote_code=True)
    assert tok.eos_token == '<|endoftext|>' and tok.eos_token_id == enc.eot_token
    for text in TEXTS:
        want = enc.encode(text, allowed_special='all')
        got = tok(text)['input_ids']
        assert got == want, (text, got[:20], want[:20])
        assert tok.decode(got) == text


def test_split_pattern_keeps_digit_groups_of_three():
    assert hf._split_pattern(r"\p{N}{1,3}+|\s++$") == r"\p{N}{1,3}|\s++$"


# ---- lm-evaluation-harness ---------------------------------------------------------------------

def log_likelihood(model, context, continuation):
    """Sum of log p(continuation | context) under LM, token lists of the bytes tokenizer."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).logits.float(), -1)[0]
    return sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))


@pytest.mark.slow
def test_lm_eval_equals_our_log_likelihoods(root, tmp_path):
    """`lm_eval --model hf` on local tasks: a 10-question multiple choice, and hf.py's CBT task reading a
    local file in CBT's format. Every choice's log-likelihood and each accuracy equal what LM computes
    (bytes tokenizer: text and ids correspond one to one)."""
    lm_eval = shutil.which('lm_eval') or os.path.join(os.path.dirname(sys.executable), 'lm_eval')
    if not os.path.exists(lm_eval):
        pytest.skip('lm-eval is not installed')
    pytest.importorskip('accelerate')
    rng = random.Random(1)
    words = 'king queen lord land fair spoke hear more'.split()
    mc = [{'question': f"Q{i}: the {rng.choice(words)} is", 'choices': rng.sample(words, 4), 'answer': rng.randrange(4)}
          for i in range(10)]
    cbt = [{'sentences': ['a cat.', 'it sat.'], 'question': 'the XXXXX ran', 'options': rng.sample(words, 5)}
           for _ in range(4)]
    for d in cbt:
        d['answer'] = rng.choice(d['options'])
    for name, docs in (('mc', mc), ('cbt', cbt)):
        (tmp_path / f'{name}.jsonl').write_text(''.join(json.dumps(d) + '\n' for d in docs))
    (tmp_path / 'tiny_mc.yaml').write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    hf.write_lm_eval_tasks(str(tmp_path / 'cbt_task'))     # the paper's CBT task, on a local file
    task = (tmp_path / 'cbt_task' / 'cbt_cn.yaml').read_text()
    task = task.replace('dataset_path: cam-cst/cbt\ndataset_name: CN\n',
                        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'cbt.jsonl'}\n")
    task = task.replace('validation_split: validation\n', '').replace('task: cbt_cn', 'task: tiny_cbt')
    (tmp_path / 'tiny_cbt.yaml').write_text(task)
    p = subprocess.run([lm_eval, '--model', 'hf', '--model_args', f"pretrained={root / 'exp' / 'moeut'},trust_remote_code=True",
                        '--tasks', 'tiny_mc,tiny_cbt', '--include_path', str(tmp_path), '--device', 'cpu', '--batch_size', '1',
                        '--output_path', str(tmp_path / 'out'), '--log_samples'], cwd=tmp_path,
                       env=env(HF_HOME=str(tmp_path / 'hf_home')), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(open(glob.glob(str(tmp_path / 'out' / '*' / 'results_*.json'))[0]).read())['results']
    model, _ = lm_of(root, 'moeut')
    for task, docs in (('tiny_mc', mc), ('tiny_cbt', cbt)):
        samples = [json.loads(x) for x in open(glob.glob(str(tmp_path / 'out' / '*' / f'samples_{task}_*.jsonl'))[0])]
        assert len(samples) == len(docs)
        correct = 0
        for s in samples:
            doc = docs[s['doc_id']]
            if task == 'tiny_mc':
                ours = [log_likelihood(model, list(doc['question'].encode()), list((' ' + c).encode()))
                        for c in doc['choices']]
                answer = doc['answer']
            else:   # the whole text with the candidate in the blank, after <|endoftext|>
                texts = [' '.join(doc['sentences']) + ' ' + doc['question'].replace('XXXXX', o) for o in doc['options']]
                ours = [log_likelihood(model, [256], list(t.encode())) for t in texts]
                answer = doc['options'].index(doc['answer'])
            assert ours == pytest.approx([float(r[0]) for r in s['filtered_resps']], abs=1e-4)
            correct += max(range(len(ours)), key=lambda i: ours[i]) == answer
        assert results[task]['acc,none'] == pytest.approx(correct / len(docs))


# ---- command line and errors -------------------------------------------------------------------

def test_push_to_hub_without_a_token_says_so_and_claims_nothing(root, tmp_path):
    pytest.importorskip('huggingface_hub')
    p = run([os.path.join(ROOT, 'hf.py'), '--init_from=out/moeut', f'--export={tmp_path}/e', '--push_to_hub=someone/model'],
            root, check=False, HF_HOME=str(tmp_path / 'hf_home'))
    assert_one_error_line(p, 'no Hugging Face token')
    assert 'pushed' not in p.stdout
    assert (tmp_path / 'e' / 'model.safetensors').exists()      # the export itself was made


def test_push_to_hub_without_network_says_so(root, tmp_path):
    """A token but no way to the Hub (offline mode here): one line, nothing claimed as uploaded."""
    pytest.importorskip('huggingface_hub')
    p = run([os.path.join(ROOT, 'hf.py'), '--init_from=out/moeut', f'--export={tmp_path}/e', '--push_to_hub=someone/model'],
            root, check=False, HF_HOME=str(tmp_path / 'hf_home'), HF_TOKEN='hf_' + 'x' * 34)
    assert_one_error_line(p, 'push_to_hub: upload to someone/model failed')
    assert 'nothing uploaded' in p.stderr and 'pushed' not in p.stdout


def test_load_hf_from_the_hub_offline_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip('huggingface_hub')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HOME', str(tmp_path))
    with pytest.raises(SystemExit, match='someone/model: no such export directory here, and cannot download it from the Hub'):
        hf.load_hf('someone/model')


@pytest.mark.parametrize('case', ['no_export', 'not_an_export', 'no_checkpoint'])
def test_errors_are_one_line(root, tmp_path, case):
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'keep.txt').write_text('mine')
    args, msg = {'no_export': (['--init_from=out/moeut'], 'set --export'),
                 'not_an_export': (['--init_from=out/moeut', f'--export={tmp_path}/other'], 'not an export'),
                 'no_checkpoint': ([f'--init_from={tmp_path}', f'--export={tmp_path}/e'], 'no checkpoint')}[case]
    p = run([os.path.join(ROOT, 'hf.py'), *args], root, check=False)
    assert_one_error_line(p, msg)
    assert (tmp_path / 'other' / 'keep.txt').read_text() == 'mine'
    assert not (tmp_path / 'e').exists() and not glob.glob(str(tmp_path / '*.tmp'))


def test_export_replaces_an_earlier_export(root, tmp_path):
    d = str(tmp_path / 'e')
    hf.export_checkpoint(str(root / 'out' / 'moeut'), d)
    (tmp_path / 'e' / 'stale.txt').write_text('x')
    hf.export_checkpoint(str(root / 'out' / 'dense'), d)
    assert json.loads((tmp_path / 'e' / 'config.json').read_text())['lm_type'] == 'dense'
    assert sorted(os.listdir(tmp_path)) == ['e'] and not (tmp_path / 'e' / 'stale.txt').exists()


def test_a_failed_export_leaves_the_earlier_one_and_no_temporary(root, tmp_path, monkeypatch):
    """An export that fails half-way (after the weights are written) leaves the earlier export byte for byte
    and nothing else beside it."""
    d = tmp_path / 'e'
    hf.export_checkpoint(str(root / 'out' / 'moeut'), str(d))
    before = {f: (d / f).read_bytes() for f in os.listdir(d)}

    def boom(name):
        raise OSError(f'cannot read {name}')
    monkeypatch.setattr(hf, 'project_source', boom)
    with pytest.raises(OSError, match='cannot read'):
        hf.export_checkpoint(str(root / 'out' / 'dense'), str(d))
    assert os.listdir(tmp_path) == ['e'] and {f: (d / f).read_bytes() for f in os.listdir(d)} == before


def test_load_hf_errors_are_one_line(root, tmp_path):
    with pytest.raises(SystemExit, match='not a nanoMoEUT export'):
        (tmp_path / 'config.json').write_text('{"model_type": "gpt2"}')
        hf.load_hf(str(tmp_path))
    with pytest.raises(SystemExit, match='not an export directory'):
        hf.load_hf(str(tmp_path / 'missing' / 'x' / 'y'))
    d = tmp_path / 'e'
    shutil.copytree(root / 'exp' / 'moeut', d)
    config = json.loads((d / 'config.json').read_text())
    (d / 'config.json').write_text(json.dumps({**config, 'd_model': 48}))
    with pytest.raises(SystemExit, match='model.safetensors does not fit its config.json') as e:
        hf.load_hf(str(d))
    assert '\n' not in str(e.value.code)           # not torch's list of every mismatched tensor
    (d / 'config.json').write_text(json.dumps({**config, 'ff_k': 99}))
    with pytest.raises(SystemExit, match=r'config.json: model config: ff_k \(99\)'):
        hf.load_hf(str(d))


def test_init_from_hf_copies_weights_and_checks_the_architecture(root):
    """What train.py's init_from='hf:DIR' calls: the export's weights into a fresh LM of the same
    architecture (training-only keys may differ); another architecture is one line."""
    from dataclasses import replace
    from halting import build_lm
    model, _ = lm_of(root, 'moeut')
    fresh = build_lm(replace(model.cfg, dropout=0.1, entropy_reg=0.0))
    hf.init_from_hf(fresh, str(root / 'exp' / 'moeut'))
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    with pytest.raises(SystemExit, match='ff_k=2, this run'):
        hf.init_from_hf(build_lm(replace(model.cfg, ff_k=1)), str(root / 'exp' / 'moeut'))


def test_train_init_from_hf_and_export_hf(root):
    """train.py --init_from=hf:DIR starts a new run from an export's weights (its first eval is the
    exported checkpoint's last one), and --export_hf=DIR exports the run's last checkpoint when it ends."""
    import re
    p, src = together(
        lambda: run([os.path.join(ROOT, 'train.py'), *TINY, *RUNS['moeut'], '--init_from=hf:exp/moeut',
                     '--out_dir=out/fromhf', '--max_iters=1', '--eval_interval=1', '--export_hf=exp/fromhf'], root),
        lambda: run([os.path.join(ROOT, 'train.py'), *TINY, *RUNS['moeut'], '--out_dir=out/moeut', '--init_from=resume',
                     '--eval_only=True'], root))
    val = lambda out, i: re.search(rf'^eval {i}: train [\d.]+, val ([\d.]+)', out, re.M)[1]   # noqa: E731
    assert val(p.stdout, 0) == val(src.stdout, 2)
    assert re.search(r'^exported .*ckpt_0000001\.pt -> exp/fromhf$', p.stdout, re.M), p.stdout[-2000:]
    assert (root / 'exp' / 'fromhf' / 'config.json').exists()

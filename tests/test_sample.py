"""sample.py and generation: filters, determinism, sliding-window perplexity, clear errors."""
import math
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import ModelConfig, sample_next  # noqa: E402
from halting import build_lm  # noqa: E402
from one_line import assert_one_error_line  # noqa: E402
from together import together  # noqa: E402


def test_top_k_keeps_exactly_the_k_most_likely():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    allowed = set()
    for _ in range(400):
        allowed |= {(r, t) for r, t in enumerate(sample_next(logits, 1.0, 5, None).tolist())}
    top5 = logits.topk(5, dim=-1).indices
    for r, t in allowed:
        assert t in top5[r].tolist()
    assert len(allowed) > 3 * 3        # it does sample, not just take the argmax


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    seen = set()
    for _ in range(500):
        seen.add(sample_next(logits, 1.0, None, 0.8).item())
    assert seen == {0, 1}              # 0.5 + 0.3 reaches 0.8: the third token is never drawn
    seen = set()
    for _ in range(500):
        seen.add(sample_next(logits, 1.0, None, 0.81).item())
    assert seen == {0, 1, 2}
    assert {sample_next(logits, 1.0, None, 0.1).item() for _ in range(50)} == {0}   # the top token always stays


def test_greedy_is_argmax_and_sampling_is_seeded():
    logits = torch.randn(4, 30)
    assert torch.equal(sample_next(logits, 0, None, None), logits.argmax(-1))
    a = sample_next(logits, 1.0, 10, 0.9, torch.Generator().manual_seed(3))
    b = sample_next(logits, 1.0, 10, 0.9, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_sample_next_temperature_top_k_top_p():
    """The distribution sample_next draws from, checked by frequency against softmax(logits / T)
    restricted to the top-k / nucleus set."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 40000
    gen = torch.Generator().manual_seed(0)

    def freq(**kw):
        draws = sample_next(logits.expand(n, -1), generator=gen, **kw)
        return torch.bincount(draws, minlength=6).float() / n

    for T in (0.5, 2.0):
        torch.testing.assert_close(freq(temperature=T, top_k=None, top_p=None),
                                   (logits[0] / T).softmax(-1), atol=0.01, rtol=0)
    keep = torch.tensor([True, True, True, False, False, False])
    want = torch.where(keep, logits[0] / 0.7, torch.tensor(float('-inf'))).softmax(-1)
    torch.testing.assert_close(freq(temperature=0.7, top_k=3, top_p=None), want, atol=0.01, rtol=0)
    # nucleus: the smallest set of most likely tokens whose probability reaches top_p
    p = logits[0].softmax(-1)                                  # 0.56, 0.21, 0.13, ...: 0.56 + 0.21 >= 0.7
    want = torch.where(torch.arange(6) < 2, p, torch.tensor(0.0))
    torch.testing.assert_close(freq(temperature=1.0, top_k=None, top_p=0.7), want / want.sum(),
                               atol=0.01, rtol=0)
    assert torch.equal(sample_next(logits, 1.0, 1, None, gen), logits.argmax(-1))     # top_k=1 is greedy


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A tiny untrained model saved the way train.py saves it, with the 'bytes' tokenizer."""
    out = tmp_path_factory.mktemp('ckpt')
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, block_size=16, d_model=32, n_layers=2, group_size=2, n_heads=2, d_head=16,
                      att_n_experts=2, ff_n_experts=4, ff_k=2, d_expert=8)
    model = build_lm(cfg)
    torch.save({'model': model.state_dict(), 'model_config': asdict(cfg), 'meta': {'tokenizer': 'bytes'}},
               out / 'ckpt_0000001.pt')
    return out, model.eval()


def run_sample(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_eval_file_equals_direct_mean_ce(checkpoint, tmp_path):
    out_dir, model = checkpoint
    text = 'To be, or not to be, that is the question:\nWhether tis nobler in the mind to suffer\n'
    path = tmp_path / 'eval.txt'
    path.write_text(text)
    ids = torch.tensor(list(text.encode()))
    # direct: every token after the first predicted once, with as much context as fits in block_size
    block = model.cfg.block_size
    nll = []
    with torch.no_grad():
        for t in range(1, len(ids)):
            ctx = ids[max(0, t - block):t][None]
            nll.append(F.cross_entropy(model(ctx).logits[0, -1], ids[t]).item())
    r = run_sample(f'--out_dir={out_dir}', f'--eval_file={path}', '--device=cpu')
    assert r.returncode == 0, r.stderr
    loss = float(r.stdout.split('loss ')[1].split(',')[0])
    # the sliding window gives each token between block/2 and block tokens of context, not always
    # the maximum, so it is not bit-equal to the per-token loop; with 16-token windows it is close
    assert abs(loss - sum(nll) / len(nll)) < 0.02
    assert f'{len(ids)} tokens' in r.stdout
    ppl = float(r.stdout.split('perplexity ')[1].split(',')[0])
    assert abs(ppl - math.exp(loss)) / ppl < 1e-3


def test_eval_file_windows_are_exact(checkpoint, tmp_path):
    """evaluate_file scores every target t >= 1 exactly once, with the context the window schedule
    gives it: the window starting at 0 for t <= block, else the first window (starts at multiples of
    block // 2) that reaches t. Compared target by target with a forward over exactly that context."""
    from sample import evaluate_file
    _, model = checkpoint
    text = 'Now is the winter of our discontent made glorious summer by this sun of York.' * 2
    (tmp_path / 'e.txt').write_text(text)
    enc = type('Bytes', (), {'encode_ordinary': staticmethod(lambda t: list(t.encode())),
                             'decode_single_token_bytes': staticmethod(lambda i: bytes([i]))})()
    got = evaluate_file(model, enc, tmp_path / 'e.txt', 'cpu', torch.autocast('cpu', enabled=False))
    ids = torch.tensor(list(text.encode()))
    block, stride = model.cfg.block_size, model.cfg.block_size // 2
    nll = []
    with torch.no_grad():
        for t in range(1, len(ids)):
            begin = 0 if t <= block else math.ceil((t - block) / stride) * stride
            nll.append(F.cross_entropy(model(ids[begin:t][None]).logits[0, -1], ids[t]).item())
    assert got['tokens'] == len(ids)
    assert got['loss'] == pytest.approx(sum(nll) / len(nll), abs=1e-5)
    # per scored byte: the first byte is context only
    assert got['bits_per_byte'] == pytest.approx(sum(nll) / math.log(2) / (len(text.encode()) - 1), abs=1e-5)


def test_eval_file_short_text_is_exact(checkpoint, tmp_path):
    """A file shorter than the context is one window: the loss is exactly the mean CE."""
    out_dir, model = checkpoint
    text = 'Hello world!'
    (tmp_path / 'e.txt').write_text(text)
    ids = torch.tensor(list(text.encode()))
    with torch.no_grad():
        direct = F.cross_entropy(model(ids[None, :-1]).logits[0], ids[1:]).item()
    r = run_sample(f'--out_dir={out_dir}', f'--eval_file={tmp_path / "e.txt"}', '--device=cpu')
    assert r.returncode == 0, r.stderr
    assert abs(float(r.stdout.split('loss ')[1].split(',')[0]) - direct) < 1e-4


def test_greedy_sampling_is_deterministic_from_the_command_line(checkpoint):
    out_dir, _ = checkpoint
    args = [f'--out_dir={out_dir}', '--temperature=0', '--num_samples=2', '--max_new_tokens=12',
            '--start=ab', '--device=cpu']
    a, b = together(lambda: run_sample(*args), lambda: run_sample(*args, '--seed=99'))
    assert a.returncode == 0, a.stderr
    def samples(r):   # the output without the echo of the config overrides
        return [line for line in r.stdout.splitlines() if not line.startswith('config:')]
    assert samples(a) == samples(b) and a.stdout.count('---------------') == 2


def test_prompt_from_file(checkpoint, tmp_path):
    out_dir, _ = checkpoint
    (tmp_path / 'p.txt').write_text('xyz')
    r = run_sample(f'--out_dir={out_dir}', f'--start=FILE:{tmp_path / "p.txt"}', '--max_new_tokens=3',
                   '--num_samples=1', '--device=cpu')
    assert r.returncode == 0, r.stderr
    out = [line for line in r.stdout.splitlines() if not line.startswith('config:')]
    assert out[0].startswith('xyz'), r.stdout


ERRORS = [
    (['--out_dir=/nonexistent/dir'], 'no checkpoint'),
    (['--init_from=/nonexistent/ckpt.pt'], 'checkpoint not found'),
    (['--init_from=hf:/nonexistent/export'], '/nonexistent/export is not an export directory'),
    (['--start=FILE:/nonexistent.txt'], 'prompt file not found'),
    (['--eval_file=/nonexistent.txt'], 'eval_file not found'),
    (['--compile=True'], 'compile=True compiles the CUDA-graph decode step'),
    (['--dtype=foo'], "dtype must be"),
    (['--top_k=-1'], "top_k >= 0"),
    (['--top_p=0'], "0 < top_p <= 1"),
    (['--show_depth=True'], "needs a halting model"),
]


@pytest.fixture(scope='module')
def error_runs(checkpoint):
    """sample.py with each of ERRORS' arguments, all at once (each run is mostly python and torch starting)."""
    out_dir, _ = checkpoint
    return together(*[lambda args=args: run_sample(f'--out_dir={out_dir}', '--device=cpu', *args) for args, _ in ERRORS])


@pytest.mark.parametrize('args, msg', ERRORS)
def test_errors_are_one_line(error_runs, args, msg):
    r = error_runs[ERRORS.index((args, msg))]
    assert r.returncode != 0
    assert_one_error_line(r, msg)


@pytest.fixture(scope='module')
def hf_export(tmp_path_factory):
    """A tiny model trained 2 iterations by train.py (bytes tokenizer) and exported by hf.py: (its
    checkpoint, the export directory). The export needs only safetensors (transformers reads it, not
    sample.py)."""
    pytest.importorskip('safetensors', reason='hf.py exports (and load_hf reads) safetensors weights')
    import random
    import prepare
    r = tmp_path_factory.mktemp('hf_export')
    rng = random.Random(0)
    words = 'the king and queen of a fair land spoke to all who would hear my lord said no more'.split()
    (r / 'src.txt').write_text('\n'.join(' '.join(rng.choice(words) for _ in range(12)) for _ in range(300)))
    prepare.prepare([str(r / 'src.txt')], str(r / 'data' / 'tiny'), 'bytes', 0.1, 1337, verbose=False)
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'CVMM_IMPL')}
    env.update(WANDB_MODE='disabled', OMP_NUM_THREADS='1')
    for script, *args in [
            ['train.py', '--dataset=tiny', '--device=cpu', '--d_model=32', '--n_layers=2', '--group_size=2',
             '--n_heads=2', '--d_head=16', '--att_n_experts=2', '--ff_n_experts=4', '--ff_k=2', '--d_expert=16',
             '--block_size=32', '--batch_size=4', '--max_iters=2', '--eval_interval=2', '--eval_iters=2',
             '--warmup_iters=2', '--lr_decay_iters=100', '--out_dir=out'],
            ['hf.py', '--init_from=out', '--export=exp']]:
        p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=r, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{script}: {p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    ckpts = sorted((r / 'out').glob('ckpt_*.pt'))
    assert ckpts and (r / 'exp' / 'model.safetensors').is_file()
    return str(ckpts[-1]), str(r / 'exp')


def test_init_from_hf_export_samples_what_the_checkpoint_samples(hf_export, tmp_path, monkeypatch, capsys):
    """--init_from=hf:DIR reads an hf.py export (config.json + safetensors) with this model.py and the
    export's tokenizer: greedy samples and eval_file losses are those of the checkpoint it came from."""
    ckpt, export = hf_export
    (tmp_path / 'e.txt').write_text('my lord said the queen of a fair land')
    runs = {}
    for name, init in (('ckpt', ckpt), ('hf', f'hf:{export}')):
        base = [f'--init_from={init}', '--out_dir=/nonexistent']
        code, lines, err = sample_main(monkeypatch, capsys, *base, '--start=the king', '--temperature=0',
                                       '--num_samples=2', '--max_new_tokens=24')
        assert code == 0, err
        code, evals, err2 = sample_main(monkeypatch, capsys, *base, f'--eval_file={tmp_path / "e.txt"}')
        assert code == 0, err2
        runs[name] = samples_of(lines), evals, err
    (samples, evals, err), (hf_samples, hf_evals, hf_err) = runs['ckpt'], runs['hf']
    assert len(samples) == 2 and samples[0].startswith('the king') and len(samples[0]) > len('the king')
    assert hf_samples == samples and hf_evals == evals and 'loss' in evals[0]
    assert f'loaded {export} (moeut, tokenizer bytes)' in hf_err


@pytest.mark.parametrize('kind', ['directory', 'binary', 'eval_file', 'export'])
def test_bad_files_are_one_line_errors(checkpoint, tmp_path, kind):
    """A directory that is not a sharded checkpoint, a file that is not a checkpoint, a non-UTF-8
    eval_file and an export into a missing directory: one line naming the path, no traceback."""
    out_dir, _ = checkpoint
    junk = tmp_path / 'junk.bin'
    junk.write_bytes(bytes(range(256)) * 4)
    args, msg = {'directory': ([f'--init_from={tmp_path}'], 'not a sharded checkpoint'),
                 'binary': ([f'--init_from={junk}'], 'not a readable checkpoint'),
                 'eval_file': ([f'--out_dir={out_dir}', f'--eval_file={junk}'], 'not UTF-8 text'),
                 'export': ([f'--out_dir={out_dir}', f'--export={tmp_path}/no/such/dir/m.pt'],
                            'does not exist')}[kind]
    r = run_sample('--device=cpu', *args)
    assert r.returncode != 0
    assert_one_error_line(r, msg)


def halting_lm(block_size):
    """A tiny untrained ACT model (bytes vocabulary) whose halting unit gives tokens different depths."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, block_size=block_size, d_model=32, n_layers=3, group_size=1, n_heads=2,
                      d_head=16, att_n_experts=2, ff_n_experts=4, ff_k=2, d_expert=8, halting='act',
                      act_bias_init=0.0)
    model = build_lm(cfg).eval()
    with torch.no_grad():
        model.core.halt.weight.normal_(0, 1.5)
    return model


def test_show_depth_marks_every_token_when_piped(tmp_path):
    """A halting model: each token gets '[depth]' (plain brackets when not a terminal), and the
    histogram counts every token; the depths equal those of the model's own full forward."""
    import re
    model = halting_lm(32)
    torch.save({'model': model.state_dict(), 'model_config': asdict(model.cfg), 'meta': {'tokenizer': 'bytes'}},
               tmp_path / 'ckpt_0000001.pt')
    r = run_sample(f'--out_dir={tmp_path}', '--show_depth=True', '--num_samples=1', '--max_new_tokens=6',
                   '--start=abc', '--temperature=0', '--device=cpu')
    assert r.returncode == 0, r.stderr
    text = r.stdout.split('---------------')[0]
    marks = [int(d) for d in re.findall(r'\[(\d)\]', text.split('depth histogram')[0])]
    assert len(marks) >= 4 and all(1 <= d <= 3 for d in marks) and len(set(marks)) > 1
    hist = eval(re.search(r'0\.\.3 steps\): (\[[\d, ]+\])', text).group(1))
    assert sum(hist) == len(marks) and hist == [marks.count(d) for d in range(4)]
    ids = list(b'abc')
    with torch.no_grad():
        model(torch.tensor(ids)[None])
    assert marks[:3] == model.core.trace['depth'][0].tolist()


def test_show_depth_past_the_context_uses_the_sliding_window():
    """Past block_size, generate() re-encodes the last block_size tokens for each new token; the depth
    shown for such a token is the one it had as the last token of that window."""
    from sample import depth_view
    model = halting_lm(8)
    tokens = list(b'the quick brown fox')            # 19 tokens, context 8
    enc = type('Bytes', (), {'decode': staticmethod(lambda ids: bytes(ids).decode('latin-1'))})()
    text = depth_view(model, enc, tokens, 'cpu', torch.autocast('cpu', enabled=False), colour=False)
    import re
    marks = [int(d) for d in re.findall(r'\[(\d)\]', text.split('depth histogram')[0])]
    want = []
    with torch.no_grad():
        model(torch.tensor(tokens[:8])[None])
        want += model.core.trace['depth'][0].tolist()
        for t in range(8, len(tokens)):
            model(torch.tensor(tokens[t - 7:t + 1])[None])
            want.append(int(model.core.trace['depth'][0, -1]))
    assert marks == want and len(marks) == len(tokens) and len(set(marks[8:])) > 1
    with torch.no_grad():          # and past the context they differ from one long forward's
        model(torch.tensor(tokens)[None])
    assert marks[8:] != model.core.trace['depth'][0, 8:].tolist()


# ---------------------------------------------------------------------------------------------- main() in-process


def sample_main(monkeypatch, capsys, *args):
    """sample.py's main() run in this process with `args` as its command line: (exit code, the printed
    samples without the config echo, stderr)."""
    import sample
    monkeypatch.setattr(sys, 'argv', ['sample.py', '--device=cpu', *args])
    code, msg = 0, ''
    try:
        sample.main()
    except SystemExit as e:          # fail() exits with its message, configure() with status 2
        code, msg = (e.code, '') if isinstance(e.code, int) else (1, str(e.code))
    out, err = capsys.readouterr()
    return code, [line for line in out.splitlines() if not line.startswith('config:')], err + msg


def samples_of(lines):
    """The printed samples: the text before each '---------------' line (a sample may span lines)."""
    samples, cur = [], []
    for line in lines:
        if line == '---------------':
            samples.append('\n'.join(cur))
            cur = []
        else:
            cur.append(line)
    return samples


def test_top_k_1_and_tiny_top_p_are_greedy(checkpoint, monkeypatch, capsys):
    """top_k=1 (or a top_p that keeps only the most likely token) at temperature 1 is greedy decoding."""
    out_dir, _ = checkpoint
    base = [f'--out_dir={out_dir}', '--start=ab', '--num_samples=2', '--max_new_tokens=10']
    code, greedy, err = sample_main(monkeypatch, capsys, *base, '--temperature=0')
    assert code == 0, err
    assert len(samples_of(greedy)) == 2 and samples_of(greedy)[0] != 'ab'
    for flag in ('--top_k=1', '--top_p=1e-6'):
        code, got, err = sample_main(monkeypatch, capsys, *base, '--temperature=1', flag)
        assert code == 0, err
        assert got == greedy, flag


def test_seed_makes_sampling_reproducible(checkpoint, monkeypatch, capsys):
    """At temperature 1 the same --seed gives the same samples, another seed other samples."""
    out_dir, _ = checkpoint
    base = [f'--out_dir={out_dir}', '--start=ab', '--num_samples=2', '--max_new_tokens=12', '--temperature=1',
            '--top_k=0']
    runs = [sample_main(monkeypatch, capsys, *base, f'--seed={s}') for s in (5, 5, 6)]
    assert all(code == 0 for code, _, _ in runs), runs
    a, b, c = (samples_of(lines) for _, lines, _ in runs)
    assert len(a) == 2 and a == b and a != c


def test_empty_prompt_starts_from_end_of_text(checkpoint, monkeypatch, capsys):
    """--start= (nothing) is a valid prompt: generation starts from the end-of-text token."""
    out_dir, _ = checkpoint
    code, lines, err = sample_main(monkeypatch, capsys, f'--out_dir={out_dir}', '--start=', '--num_samples=2',
                                   '--max_new_tokens=5', '--temperature=0')
    assert code == 0, err
    assert len(samples_of(lines)) == 2 and samples_of(lines)[0] != ''


def test_prompt_of_exactly_block_size_tokens_is_accepted(checkpoint, monkeypatch, capsys):
    out_dir, model = checkpoint
    prompt = 'x' * model.cfg.block_size                      # the bytes tokenizer: one token per byte
    code, lines, err = sample_main(monkeypatch, capsys, f'--out_dir={out_dir}', f'--start={prompt}',
                                   '--num_samples=1', '--max_new_tokens=3', '--temperature=0')
    assert code == 0, err
    assert samples_of(lines)[0].startswith(prompt) and 'note:' not in err


def test_prompt_longer_than_the_context_is_cropped_to_its_end(checkpoint, monkeypatch, capsys):
    """A prompt past block_size is not refused: the model continues from its last block_size tokens (it sees no
    more), says so in one line on stderr, and prints the whole prompt before the continuation."""
    out_dir, model = checkpoint
    block = model.cfg.block_size
    prompt = 'The quick brown fox jumps over the lazy dog. '     # 45 tokens of the bytes tokenizer
    assert len(prompt) > block
    base = [f'--out_dir={out_dir}', '--num_samples=1', '--max_new_tokens=6', '--temperature=0']
    code, lines, err = sample_main(monkeypatch, capsys, *base, f'--start={prompt}')
    assert code == 0, err
    notes = [ln for ln in err.splitlines() if ln.startswith('note:')]
    assert notes == [f"note: prompt is {len(prompt)} tokens, longer than the model's context ({block}): "
                     f"using its last {block}"]
    long_sample = samples_of(lines)[0]
    code, lines, err = sample_main(monkeypatch, capsys, *base, f'--start={prompt[-block:]}')
    assert code == 0 and 'note:' not in err, err
    short_sample = samples_of(lines)[0]
    assert long_sample.startswith(prompt) and len(long_sample) > len(prompt)
    assert long_sample[len(prompt):] == short_sample[block:]         # the same continuation


def test_sample_stops_at_the_first_end_of_text(checkpoint, tmp_path, monkeypatch, capsys):
    """A model that always predicts end-of-text: each printed sample is just the prompt (the end-of-text
    token and whatever follows it is not printed)."""
    _, model = checkpoint
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state['lm_head.bias'][256] = 1e4                           # 256 = <|endoftext|> of the bytes tokenizer
    torch.save({'model': state, 'model_config': asdict(model.cfg), 'meta': {'tokenizer': 'bytes'}},
               tmp_path / 'ckpt_0000001.pt')
    for temp in ('0', '1'):
        code, lines, err = sample_main(monkeypatch, capsys, f'--out_dir={tmp_path}', '--start=hello',
                                       '--num_samples=2', '--max_new_tokens=8', f'--temperature={temp}')
        assert code == 0, err
        assert samples_of(lines) == ['hello', 'hello'], lines


def test_bits_per_byte_counts_utf8_bytes_not_characters(checkpoint, tmp_path):
    """bits per byte divides the summed loss (in bits) by the UTF-8 bytes of the scored tokens (all but
    the first, which is context only), which for accented or CJK text are more than its characters; so
    it is loss / ln 2 for a byte tokenizer."""
    from sample import evaluate_file
    import prepare
    _, model = checkpoint
    text = 'café naïve résumé 日本語のテキスト über'
    (tmp_path / 'u.txt').write_text(text, encoding='utf-8')
    got = evaluate_file(model, prepare.get_tokenizer('bytes'), tmp_path / 'u.txt', 'cpu',
                        torch.autocast('cpu', enabled=False))
    n_bytes = len(text.encode('utf-8'))
    assert got['tokens'] == n_bytes > len(text)
    assert got['bits_per_byte'] == pytest.approx(got['loss'] / math.log(2), rel=1e-6)
    # a tokenizer of 2-byte tokens (as a BPE's, several bytes each): the first token's 2 bytes are context
    pairs = type('Pairs', (), {'encode_ordinary': staticmethod(lambda t: list(t.encode())[::2]),
                               'decode_single_token_bytes': staticmethod(lambda i: b'..')})()
    assert n_bytes % 2 == 0
    got = evaluate_file(model, pairs, tmp_path / 'u.txt', 'cpu', torch.autocast('cpu', enabled=False))
    total_bits = got['loss'] * (n_bytes // 2 - 1) / math.log(2)   # every token after the first is scored once
    assert got['bits_per_byte'] == pytest.approx(total_bits / (n_bytes - 2), rel=1e-6)


def test_loaded_model_is_in_eval_mode(checkpoint, tmp_path):
    """load_checkpoint returns the model in eval mode: with dropout in the checkpoint's config, measuring
    the same file twice gives the same loss."""
    from sample import evaluate_file, load_checkpoint
    _, model = checkpoint
    cfg = asdict(model.cfg) | {'dropout': 0.5}
    torch.save({'model': model.state_dict(), 'model_config': cfg, 'meta': {'tokenizer': 'bytes'}},
               tmp_path / 'drop.pt')
    loaded, tok, _ = load_checkpoint(str(tmp_path / 'drop.pt'), str(tmp_path), 'cpu')
    assert tok == 'bytes' and not loaded.training and not any(m.training for m in loaded.modules())
    (tmp_path / 'e.txt').write_text('To be, or not to be, that is the question.')
    import prepare
    losses = [evaluate_file(loaded, prepare.get_tokenizer('bytes'), tmp_path / 'e.txt', 'cpu',
                            torch.autocast('cpu', enabled=False))['loss'] for _ in range(2)]
    assert losses[0] == losses[1]

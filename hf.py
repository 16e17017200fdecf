"""
Hugging Face bridge: export a train.py checkpoint to a directory that `transformers` loads (remote code,
safetensors weights, a tokenizer.json that gives tiktoken's ids, a model card), push it to the Hub, and
load an export back as this repository's LM.

    python hf.py --init_from=out/shakespeare --export=hf/shakespeare          # latest checkpoint of a run
    python hf.py --init_from=out/run/ckpt_0001000 --export=hf/run             # a sharded (FSDP) checkpoint
    python hf.py --init_from=out/run --export=hf/run --push_to_hub=user/name  # and upload it

Then, with nothing of this repository installed:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained('hf/run', trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained('hf/run', trust_remote_code=True)   # transformers 5 reads the config

The export runs the project's own model.py, cvmm.py and halting.py, copied next to its modeling file
(imports made package-relative), so transformers computes exactly what LM computes. Needs safetensors
to export; transformers (and tokenizers) to load the export with Auto classes; huggingface_hub to push or
to load from the Hub. Each is imported only where used.
"""
import datetime
import json
import os
import re
import shutil
import sys
from dataclasses import asdict, fields

import torch

from configurator import configure, config_keys
from model import ModelConfig, param_counts

# ----------------------------------------------------------------------------------------------
init_from = 'resume'          # 'resume' = latest checkpoint in out_dir; or a run directory, a ckpt_N.pt, a ckpt_N/
out_dir = 'out/shakespeare'
export = ''                   # the directory to write (replaced if it holds an earlier export)
push_to_hub = ''              # user/name: upload the export to this Hub repository (needs a token)
lm_eval_tasks = ''            # a directory: write the CBT task files for lm-evaluation-harness there (see PAPER_TASKS)
# ----------------------------------------------------------------------------------------------

MODEL_TYPE = 'nanomoeut'
# the repository's sources an export runs; none of them may import another module of the repository
SOURCES = ('model.py', 'cvmm.py', 'halting.py')
PROJECT_MODULES = ('model', 'cvmm', 'halting', 'configurator', 'train', 'sample', 'prepare', 'bench', 'hf')
# every file of an export is JSON, Python source, Markdown, or these safetensors weights: no pickle
WEIGHTS = 'model.safetensors'
# ModelConfig.model_type ('moeut' | 'dense') is config.json's 'lm_type': 'model_type' there names the
# transformers model type ('nanomoeut')
RENAMED = {'model_type': 'lm_type'}


def fail(msg):
    raise SystemExit(f"error: {msg}")


def _need(module, purpose):
    """Import an optional package, or fail with one line saying what it is for."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        pip = module.split('.')[0]
        fail(f"{purpose} needs the '{pip}' package: pip install {pip}")


# ---- reading the checkpoint -------------------------------------------------------------------

def resolve_checkpoint(init_from, out_dir):
    """The checkpoint path sample.py's loader should read: 'resume' and a run directory mean its latest
    checkpoint; a ckpt_N.pt file or a ckpt_N/ sharded directory are taken as they are."""
    from checkpoint import latest_checkpoint
    if init_from == 'resume' or (os.path.isdir(init_from) and not os.path.exists(os.path.join(init_from, 'meta.pt'))):
        run = out_dir if init_from == 'resume' else init_from
        path = latest_checkpoint(run)
        if path is None:
            fail(f"no checkpoint (ckpt_*.pt or ckpt_*/) in {run}: train first, or pass --init_from=CHECKPOINT")
        return path
    return init_from


def read_checkpoint(init_from, out_dir='out/shakespeare'):
    """(model on CPU in eval mode, tokenizer name, checkpoint path, training record) of a train.py
    checkpoint, single-file or sharded. The model comes from sample.py's loader; the record (iteration,
    config, val loss) from the checkpoint's metadata, read the way that loader reads it."""
    from sample import load_checkpoint
    from checkpoint import load_checkpoint_meta
    model, tok_name, path = load_checkpoint(resolve_checkpoint(init_from, out_dir), out_dir, 'cpu')
    try:
        meta = load_checkpoint_meta(path)
    except Exception:          # the loader above read it: anything here is only the model card's loss
        meta = {}
    record = {k: meta.get(k) for k in ('iter_num', 'best_val_loss', 'config')}
    record['val_loss'] = _logged_val_loss(path, record['iter_num'])
    return model, tok_name, path, record


def _logged_val_loss(path, iter_num):
    """The val loss train.py logged at the checkpoint's iteration (out_dir/log.jsonl), if it is there."""
    log = os.path.join(os.path.dirname(os.path.abspath(path)), 'log.jsonl')
    if iter_num is None or not os.path.isfile(log):
        return None
    found = None
    with open(log) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get('iter') == iter_num and 'val/loss' in r:
                found = r['val/loss']
    return found


# ---- tokenizer: tiktoken ranks -> tokenizer.json ---------------------------------------------

def _byte_chars():
    """GPT-2's byte-level alphabet: every byte as one printable character (printable Latin-1 bytes as
    themselves, the rest shifted past 255), the form a byte-level BPE vocabulary is written in."""
    keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _merges(ranks):
    """BPE merges that reproduce tiktoken: tiktoken merges, at each step, the adjacent pair whose
    concatenation has the lowest rank. So every multi-byte token is made from the two parts that this
    merging reaches when only tokens ranked below it exist; listing those pairs in rank order gives the
    same priorities."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) == 2:
            merges.append(parts)
    return merges


def _split_pattern(pat):
    """tiktoken's split regex in the dialect of tokenizers' regex engine (Oniguruma, Ruby syntax). The one
    construct that means something else there is a possessive interval: `\\p{N}{1,3}+` is 'one or more
    runs of 1-3 digits' in Ruby syntax. It only ends an alternative in these patterns, so greedy is the
    same as possessive: drop the '+'. (`++`, `?+`, `*+` are possessive in both.)"""
    return re.sub(r'(\{\d+(?:,\d*)?\})\+', r'\1', pat)


def tokenizer_json(enc):
    """tokenizer.json (the `tokenizers` format) for a tiktoken Encoding: the same split regex, then
    byte-level BPE with the Encoding's ranks as ids, its merges, and its special tokens."""
    chars = _byte_chars()
    as_text = lambda b: ''.join(chars[x] for x in b)
    ranks = {b: enc.encode_single_token(b) for b in enc.token_byte_values()}
    specials = sorted((enc.encode_single_token(s), s) for s in enc.special_tokens_set)
    return {
        'version': '1.0', 'truncation': None, 'padding': None,
        'added_tokens': [{'id': i, 'content': s, 'single_word': False, 'lstrip': False, 'rstrip': False,
                          'normalized': False, 'special': True} for i, s in specials],
        'normalizer': None,
        'pre_tokenizer': {'type': 'Sequence', 'pretokenizers': [
            # the Encoding's own split regex (tiktoken keeps it in a private attribute)
            {'type': 'Split', 'pattern': {'Regex': _split_pattern(enc._pat_str)}, 'behavior': 'Isolated',
             'invert': False},
            {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True, 'use_regex': False}]},
        'post_processor': None,
        'decoder': {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True, 'use_regex': False},
        # ignore_merges: a piece that is itself a token is that token, as in tiktoken
        'model': {'type': 'BPE', 'dropout': None, 'unk_token': None, 'continuing_subword_prefix': None,
                  'end_of_word_suffix': None, 'fuse_unk': False, 'byte_fallback': False, 'ignore_merges': True,
                  # special tokens in the vocabulary too: tokenizers numbers an added token that is not
                  # in it after the last id, which is wrong where the ids have gaps (cl100k, o200k)
                  'vocab': {**{as_text(b): r for b, r in sorted(ranks.items(), key=lambda kv: kv[1])},
                            **{s: i for i, s in specials}},
                  'merges': [[as_text(a), as_text(b)] for a, b in _merges(ranks)]},
    }


def tokenizer_files(tok_name, block_size):
    """{file name: JSON object} of the tokenizer in Hugging Face form."""
    import prepare
    try:
        enc = prepare.get_tokenizer(tok_name)
    except prepare.PrepareError as e:
        fail(f"tokenizer {tok_name!r} of the checkpoint is not available offline: {e}")
    eot = prepare.ENDOFTEXT
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': block_size,
              'bos_token': eot, 'eos_token': eot, 'unk_token': None, 'add_bos_token': False,
              'add_prefix_space': False, 'clean_up_tokenization_spaces': False}
    return {'tokenizer.json': tokenizer_json(enc), 'tokenizer_config.json': config,
            'special_tokens_map.json': {'bos_token': eot, 'eos_token': eot}}


# ---- the remote code --------------------------------------------------------------------------

def project_source(name, root=os.path.dirname(os.path.abspath(__file__))):
    """One of SOURCES as the export ships it: imports of the other copied files made package-relative
    (transformers copies exactly the files a modeling file imports relatively, and runs them as one
    package), and the file's `if __name__ == '__main__':` tail dropped (a command-line entry point of
    the repository, whose imports would not resolve). Fails if an import of the repository remains."""
    import ast
    with open(os.path.join(root, name), encoding='utf-8') as f:
        text = f.read()
    local = '|'.join(s[:-3] for s in SOURCES)
    text = re.sub(rf'^(\s*)from ({local}) import ', r'\1from .\2 import ', text, flags=re.M)
    main = re.search(r"^if __name__ == ['\"]__main__['\"]:", text, flags=re.M)
    if main:
        text = text[:main.start()].rstrip() + '\n'
    for node in ast.walk(ast.parse(text)):
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for m in mods:
            if m.split('.')[0] in PROJECT_MODULES:
                fail(f"{name} imports {m!r}, which an export does not ship: add it to hf.SOURCES or remove the import")
    return text


CONFIGURATION_PY = '''\
"""Configuration of a nanoMoEUT language model (written by the nanoMoEUT repository's hf.py export).
Every field of the repository's model.ModelConfig is a config attribute of the same name, but for
ModelConfig.model_type ('moeut' | 'dense'), which is lm_type here: model_type is transformers' name of the
model type. The fields and their defaults are listed below (this file imports nothing of the model, so
that AutoConfig alone does not load it); modeling_nanomoeut.py hands them to ModelConfig, which checks them."""
from transformers import PretrainedConfig

RENAMED = {'model_type': 'lm_type'}
DEFAULTS = %s


class NanoMoEUTConfig(PretrainedConfig):
    model_type = 'nanomoeut'
    attribute_map = {'hidden_size': 'd_model', 'num_attention_heads': 'n_heads',
                     'num_hidden_layers': 'n_layers', 'max_position_embeddings': 'block_size'}

    def __init__(self, **kwargs):
        for name, default in DEFAULTS.items():
            value = kwargs.pop(RENAMED.get(name, name), default)
            setattr(self, RENAMED.get(name, name), tuple(value) if isinstance(default, tuple) else value)
        kwargs.setdefault('tie_word_embeddings', False)     # embedding and LM head are separate weights
        kwargs.setdefault('use_cache', False)
        super().__init__(**kwargs)

    def model_config_dict(self) -> dict:
        """The keyword arguments of model.ModelConfig."""
        return {name: getattr(self, RENAMED.get(name, name)) for name in DEFAULTS}
'''

MODELING_PY = '''\
"""nanoMoEUT as a transformers causal LM (written by the nanoMoEUT repository's hf.py export).

The network is the repository's own LM: model.py, cvmm.py and halting.py sit next to this file. On CPU
(or without triton) the expert matmuls run their plain-torch reference; on CUDA with triton installed,
the Triton kernels. Weights: model.safetensors, keys 'lm.' + LM.state_dict() names.

No KV cache: generate() re-encodes the whole window for every new token (the LM's cache is a dict per
layer application, and a halting model's per-step caches hold different numbers of tokens: neither is
a transformers Cache). Past block_size tokens, generation slides the window, as LM.generate does.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_nanomoeut import NanoMoEUTConfig
from .model import ModelConfig
# halting.build_lm builds any config's LM (halting configs get halting.py's core); model.py imports cvmm:
# importing it here too is what makes transformers 4.x copy it (it copies only the files the modeling
# file itself imports relatively)
from .cvmm import cvmm as _cvmm  # noqa: F401
from .halting import build_lm


class NanoMoEUTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoMoEUTConfig
    base_model_prefix = 'lm'
    main_input_name = 'input_ids'
    _no_split_modules = []

    def __init__(self, config: NanoMoEUTConfig):
        super().__init__(config)
        self.lm = build_lm(ModelConfig(**config.model_config_dict()))
        self.post_init()

    def _init_weights(self, module):
        # LM initialises its weights itself (spec section 7) and from_pretrained loads every one of them;
        # left are the routing counters (non-persistent buffers), which transformers leaves uninitialised
        for name in getattr(module, '_non_persistent_buffers_set', ()):
            buf = getattr(module, name, None)
            if buf is not None:
                buf.zero_()

    def get_input_embeddings(self):
        return self.lm.embedding

    def set_input_embeddings(self, value):
        self.lm.embedding = value

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, return_dict: Optional[bool] = None, **kwargs):
        """logits [B, T, vocab]; with labels, the mean next-token loss (labels shifted here, -100 ignored).
        attention_mask may only mark right padding: causal attention never lets a real token see the pads
        after it, so they need no mask. Left padding would need masks and shifted positions: rejected."""
        if input_ids is None:
            raise ValueError("nanoMoEUT takes input_ids (inputs_embeds is not supported)")
        if attention_mask is not None and attention_mask.shape == input_ids.shape:
            m = attention_mask.bool()
            if bool((m[:, 1:] & ~m[:, :-1]).any()):
                raise ValueError("nanoMoEUT supports right padding only (tokenizer.padding_side = 'right'), or "
                                 "unpadded batches: a padded position is followed by a real token")
        logits = self.lm(input_ids).logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        block = self.config.block_size       # no cache: the whole window, at most block_size tokens
        inputs = {'input_ids': input_ids[:, -block:]}
        if attention_mask is not None:
            inputs['attention_mask'] = attention_mask[:, -block:]
        return inputs
'''


def _dict_source(d):
    """A dict of plain values as Python source, one key a line."""
    return '{\n' + ''.join(f"    {k!r}: {v!r},\n" for k, v in d.items()) + '}'


AUTO_MAP = {'AutoConfig': 'configuration_nanomoeut.NanoMoEUTConfig',
            'AutoModelForCausalLM': 'modeling_nanomoeut.NanoMoEUTForCausalLM'}


# ---- the model card ---------------------------------------------------------------------------

def train_command(config):
    """`python train.py --key=value ...` for every key the run set away from train.py's defaults (the
    checkpoint keeps the whole config, not the command line; a torchrun launch is not recorded)."""
    if not config:
        return None
    import train
    defaults = {k: getattr(train, k) for k in config_keys(vars(train))}
    args = [f"--{k}={_arg(v)}" for k, v in config.items() if k in defaults and v != defaults[k]]
    return ' '.join(['python train.py', *args])


def _arg(v):
    import shlex
    return shlex.quote(repr(list(v)).replace(' ', '') if isinstance(v, (list, tuple)) else str(v))


def model_card(model, tok_name, path, record, name, command):
    cfg = model.cfg
    c = param_counts(cfg)
    run = record.get('config') or {}
    it = record.get('iter_num')
    rows = [('checkpoint', f"`{os.path.basename(os.path.normpath(path))}`"), ('tokenizer', f"`{tok_name}`")]
    if it is not None:
        rows.append(('iterations', f"{it:,}"))
        keys = ('batch_size', 'block_size', 'gradient_accumulation_steps')
        if all(isinstance(run.get(k), int) for k in keys):
            per_step = (run.get('total_batch_size') or run['batch_size'] * run['gradient_accumulation_steps']) * run['block_size']
            rows.append(('training tokens', f"{it * per_step:,} ({per_step:,} per step)"))
    if run.get('dataset'):
        rows.append(('dataset', f"`{run['dataset']}`"))
    if record.get('val_loss') is not None:
        rows.append(('val loss at this checkpoint', f"{record['val_loss']:.4f}"))
    best = record.get('best_val_loss')
    if isinstance(best, float) and best != float('inf'):
        rows.append(('best val loss up to this checkpoint', f"{best:.4f}"))
    rows.append(('parameters', f"{c['total'] / 1e6:.2f}M total, {c['non_embedding'] / 1e6:.2f}M non-embedding, "
                               f"{c['active_per_token'] / 1e6:.2f}M active per token"))
    trained_by = train_command(run)
    kind = {'moeut': 'MoEUT (Mixture-of-Experts Universal Transformer)', 'dense': 'dense pre-LN GPT baseline'}
    depth = f", per-token dynamic depth: `halting='{cfg.halting}'`" if cfg.halting != 'none' else ''
    lines = [
        '---', 'library_name: transformers', 'pipeline_tag: text-generation',
        'tags: [nanomoeut, moeut, mixture-of-experts, universal-transformer, custom_code]', '---', '',
        f"# {os.path.basename(os.path.normpath(name))}", '',
        f"A {kind[cfg.model_type]} language model{depth}, trained with nanoMoEUT (a nanoGPT-style implementation of "
        f"MoEUT: Csordás, Irie, Schmidhuber, Potts, Manning, NeurIPS 2024, arXiv 2405.16039).", '',
        f"Exported {datetime.date.today().isoformat()} with `{command}`.", '',
        '## Use', '', '```python', 'from transformers import AutoModelForCausalLM, AutoTokenizer',
        f"tok = AutoTokenizer.from_pretrained('{name}', trust_remote_code=True)",
        f"model = AutoModelForCausalLM.from_pretrained('{name}', trust_remote_code=True)",
        "ids = tok('ROMEO:', return_tensors='pt').input_ids",
        'print(tok.decode(model.generate(ids, max_new_tokens=100, do_sample=False)[0]))', '```', '',
        'The code is the repository\'s own `model.py`, `cvmm.py` and `halting.py`, shipped here; on CPU it needs '
        'only torch (and transformers). The tokenizer gives the same ids as tiktoken\'s '
        f"`{tok_name}` encoding. Generation uses no KV cache (every new token re-encodes the window), and "
        'batches may be padded on the right only.', '',
        'In nanoMoEUT, `hf.load_hf(DIR)` loads this directory back as the repository\'s `LM`.', '',
        '## Training', '', '| | |', '|---|---|', *[f"| {k} | {v} |" for k, v in rows], '']
    if trained_by:
        lines += ['Trained by (reconstructed from the checkpoint\'s config: every key set away from train.py\'s '
                  'defaults):', '', '```', trained_by, '```', '']
    lines += ['## Configuration', '', 'Every field of `model.ModelConfig` (also in `config.json`):', '',
              '| key | value |', '|---|---|', *[f"| `{k}` | `{v!r}` |" for k, v in asdict(cfg).items()], '',
              '## Evaluation', '',
              'The zero-shot tasks of the MoEUT paper with lm-evaluation-harness (`pip install "lm-eval[hf]"`). '
              'CBT is not part of it: `python hf.py --lm_eval_tasks=lm_eval_tasks` in nanoMoEUT writes its task '
              'files.', '',
              '```', lm_eval_command(name), '```', '']
    return '\n'.join(lines)


# ---- lm-evaluation-harness ------------------------------------------------------------------

# the MoEUT paper's zero-shot tasks: LAMBADA, BLiMP, CBT (named entities and common nouns), HellaSwag,
# PIQA, ARC-Easy. lm-evaluation-harness 0.4 has all but CBT; cbt_cn / cbt_ne are CBT_TASK below.
PAPER_TASKS = 'lambada_openai,blimp,cbt_cn,cbt_ne,hellaswag,piqa,arc_easy'

# The Children's Book Test (Hill et al. 2016, dataset cam-cst/cbt): 20 sentences, a question with one word
# blanked (XXXXX), 10 candidates. Scored as the CBT paper scores language models (its section 4.4): each
# candidate in place of the blank, the likelihood of the whole passage + question (no context: the
# harness conditions on <|endoftext|>), the most likely candidate is the answer.
CBT_TASK = """task: cbt_{name}
dataset_path: cam-cst/cbt
dataset_name: {config}
output_type: multiple_choice
validation_split: validation
test_split: test
doc_to_text: ""
target_delimiter: ""
doc_to_choice: "[{{% for o in options %}}{{{{ (sentences | join(' ') ~ ' ' ~ question.replace('XXXXX', o)) | tojson }}}},{{% endfor %}}]"
doc_to_target: "{{{{ options.index(answer) }}}}"
metric_list:
  - metric: acc
"""


def write_lm_eval_tasks(dest):
    """cbt_cn.yaml and cbt_ne.yaml in dest, for lm_eval's --include_path."""
    os.makedirs(dest, exist_ok=True)
    for name, config in (('cn', 'CN'), ('ne', 'NE')):
        with open(os.path.join(dest, f'cbt_{name}.yaml'), 'w') as f:
            f.write(CBT_TASK.format(name=name, config=config))


def lm_eval_command(pretrained, tasks_dir='lm_eval_tasks'):
    return (f"lm_eval --model hf --model_args pretrained={pretrained},trust_remote_code=True "
            f"--include_path {tasks_dir} --tasks {PAPER_TASKS} --batch_size 1")


# ---- export -----------------------------------------------------------------------------------

def export_checkpoint(init_from, dest, out_dir='out/shakespeare', repo_id='', command=None):
    """Write the export directory `dest` for a train.py checkpoint (see the module docstring). Written
    as dest.tmp and renamed into place: a failure leaves no half-written export."""
    st = _need('safetensors.torch', 'export')
    dest = os.path.normpath(dest)
    model, tok_name, path, record = read_checkpoint(init_from, out_dir)
    if os.path.exists(dest) and not _is_export(dest):
        fail(f"{dest} exists and is not an export of hf.py: not replacing it (pick another --export)")
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    cfg = asdict(model.cfg)
    dtype = {str(v.dtype) for v in model.state_dict().values() if v.is_floating_point()}
    tok = tokenizer_files(tok_name, model.cfg.block_size)
    import prepare
    eot = prepare.get_tokenizer(tok_name).eot_token
    command = command or ' '.join(['python', os.path.basename(sys.argv[0]), *sys.argv[1:]])  # hf.py's, or train.py's
    config = {'architectures': ['NanoMoEUTForCausalLM'], 'model_type': MODEL_TYPE, 'auto_map': AUTO_MAP,
              'torch_dtype': dtype.pop().removeprefix('torch.') if len(dtype) == 1 else 'float32',
              'tie_word_embeddings': False, 'use_cache': False, 'bos_token_id': eot, 'eos_token_id': eot,
              **{RENAMED.get(k, k): v for k, v in cfg.items()},
              'nanomoeut': {'tokenizer': tok_name, 'model_config_keys': list(cfg),
                            'checkpoint': os.path.basename(os.path.normpath(path)),
                            'iter_num': record.get('iter_num'), 'val_loss': record.get('val_loss')}}
    generation = {'bos_token_id': eot, 'eos_token_id': eot, 'pad_token_id': eot, 'use_cache': False,
                  'do_sample': True, 'temperature': 0.8, 'top_k': 200}      # sample.py's defaults
    tmp = dest + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        weights = {'lm.' + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        st.save_file(weights, os.path.join(tmp, WEIGHTS), metadata={'format': 'pt'})
        files = {'config.json': config, 'generation_config.json': generation, **tok}
        for name, obj in files.items():
            with open(os.path.join(tmp, name), 'w', encoding='utf-8') as f:
                json.dump(obj, f, indent=1 if name != 'tokenizer.json' else None, ensure_ascii=False)
                f.write('\n')
        defaults = {f.name: f.default for f in fields(ModelConfig)}
        texts = {'configuration_nanomoeut.py': CONFIGURATION_PY % _dict_source(defaults),
                 'modeling_nanomoeut.py': MODELING_PY,
                 **{s: project_source(s) for s in SOURCES},
                 'README.md': model_card(model, tok_name, path, record, repo_id or dest, command)}
        for name, text in texts.items():
            with open(os.path.join(tmp, name), 'w', encoding='utf-8') as f:
                f.write(text)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(dest):
        old = dest + '.old'
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old)
    else:
        os.replace(tmp, dest)
    return path


def _is_export(path):
    try:
        with open(os.path.join(path, 'config.json')) as f:
            return json.load(f).get('model_type') == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def push(dest, repo_id):
    """Upload the export directory to the Hub. Without a token or a network: one line, nothing done."""
    hub = _need('huggingface_hub', 'push_to_hub')
    if not hub.get_token():
        fail(f"push_to_hub: no Hugging Face token (run `hf auth login` or set HF_TOKEN); nothing uploaded, "
             f"the export is in {dest}")
    try:
        api = hub.HfApi()
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(folder_path=dest, repo_id=repo_id, commit_message='nanoMoEUT export (hf.py)')
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        fail(f"push_to_hub: upload to {repo_id} failed ({type(e).__name__}: {first}); nothing uploaded, "
             f"the export is in {dest}")
    return getattr(info, 'commit_url', None) or f"https://huggingface.co/{repo_id}"


# ---- loading an export as our LM --------------------------------------------------------------

def export_dir(path_or_repo):
    """A local export directory, or the download of Hub repo `user/name` (config, weights, tokenizer)."""
    if os.path.isdir(path_or_repo):
        return path_or_repo
    if os.path.exists(path_or_repo) or path_or_repo.count('/') != 1:
        fail(f"{path_or_repo} is not an export directory (nor a Hub repo id user/name)")
    hub = _need('huggingface_hub', f"loading {path_or_repo} from the Hub")
    try:
        return hub.snapshot_download(path_or_repo, allow_patterns=['*.json', WEIGHTS])
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        fail(f"{path_or_repo}: no such export directory here, and cannot download it from the Hub "
             f"({type(e).__name__}: {first})")


def read_export_config(path_or_repo):
    """config.json of an export, checked to be one."""
    path = export_dir(path_or_repo)
    try:
        with open(os.path.join(path, 'config.json'), encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read {os.path.join(path, 'config.json')}: {e}")
    if not isinstance(config, dict) or config.get('model_type') != MODEL_TYPE:
        fail(f"{path} is not a nanoMoEUT export (config.json has no model_type '{MODEL_TYPE}')")
    return path, config


def hf_tokenizer_name(path_or_repo):
    """The tiktoken encoding name ('gpt2', 'bytes', ...) an export was trained with."""
    return read_export_config(path_or_repo)[1].get('nanomoeut', {}).get('tokenizer', 'gpt2')


def load_hf(path_or_repo, device='cpu'):
    """(LM in eval mode on device, its model-config dict) from an export directory or a Hub repo id.
    Reads config.json and model.safetensors with this repository's model.py: no transformers, no remote
    code, the exact exported tensors."""
    st = _need('safetensors.torch', 'loading an export')
    path, config = read_export_config(path_or_repo)
    names = {f.name: f for f in fields(ModelConfig)}
    unknown = [k for k in config.get('nanomoeut', {}).get('model_config_keys', []) if k not in names]
    if unknown:
        fail(f"{path}: model keys {unknown} are unknown to this model.py (exported by a newer version?)")
    kw = {k: config[RENAMED.get(k, k)] for k in names if RENAMED.get(k, k) in config}
    kw = {k: tuple(v) if isinstance(names[k].default, tuple) else v for k, v in kw.items()}
    from halting import build_lm
    try:
        model = build_lm(ModelConfig(**kw))
    except (ValueError, TypeError) as e:
        fail(f"{path}/config.json: {e}")
    try:
        weights = st.load_file(os.path.join(path, WEIGHTS))
    except Exception as e:
        fail(f"cannot read {os.path.join(path, WEIGHTS)}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    state = {k.removeprefix('lm.'): v for k, v in weights.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        fail(f"{path}/{WEIGHTS} does not fit its config.json: {' '.join(str(e).split())[:300]}")
    return model.to(device).eval(), asdict(model.cfg)


# keys that only shape training (regularisers, dropout): a fine-tuning run may set them anew
TRAINING_ONLY = ('dropout', 'entropy_reg', 'att_entropy_reg', 'ff_expert_dropout', 'att_expert_dropout', 'act_tau',
                 'mor_aux_coef', 'mor_balance_coef')


def init_from_hf(model, path_or_repo):
    """Copy an export's weights into `model` (train.py's init_from='hf:...'), after checking that the
    export has model's architecture: every model key but TRAINING_ONLY and block_size must agree."""
    src, src_cfg = load_hf(path_or_repo, 'cpu')
    for k, v in asdict(model.cfg).items():
        if k not in TRAINING_ONLY and k != 'block_size' and src_cfg.get(k) != v:
            fail(f"init_from=hf:{path_or_repo} has {k}={src_cfg.get(k)!r}, this run's config says {v!r}")
    with torch.no_grad():
        model.load_state_dict(src.state_dict())


def main():
    cfg = {k: globals()[k] for k in config_keys(globals())}
    configure(cfg)
    if cfg['lm_eval_tasks']:
        write_lm_eval_tasks(cfg['lm_eval_tasks'])
        print(f"wrote {cfg['lm_eval_tasks']}/cbt_cn.yaml, cbt_ne.yaml: lm_eval ... --include_path "
              f"{cfg['lm_eval_tasks']} --tasks {PAPER_TASKS}")
        if not cfg['export']:
            return
    if not cfg['export']:
        fail("set --export=DIR (the directory to write)")
    path = export_checkpoint(cfg['init_from'], cfg['export'], cfg['out_dir'], cfg['push_to_hub'])
    print(f"exported {path} -> {cfg['export']}")
    if cfg['push_to_hub']:
        url = push(cfg['export'], cfg['push_to_hub'])
        print(f"pushed {cfg['export']} -> {url}")


if __name__ == '__main__':
    main()

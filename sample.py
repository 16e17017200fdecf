"""
Sample from a trained model, or measure its perplexity on a text file.

    python sample.py --out_dir=out/shakespeare --start="ROMEO:" --num_samples=2
    python sample.py --start=FILE:prompt.txt --temperature=0          # greedy (deterministic)
    python sample.py --eval_file=some.txt                               # loss, perplexity, bits/byte
    python sample.py --init_from=out/run/ckpt_0001000 --export=model.pt  # one file from a sharded checkpoint
    python sample.py --init_from=hf:hf/run --start="ROMEO:"            # an hf.py export directory
"""
import math
import os
import sys
from dataclasses import asdict

import torch

from configurator import configure, config_keys
from halting import build_lm, set_depth
from model import ModelConfig

# ----------------------------------------------------------------------------------------------
init_from = 'resume'          # 'resume' = latest checkpoint in out_dir, a .pt file path, or hf:DIR (an hf.py export)
out_dir = 'out/shakespeare'
start = '\n'                  # prompt text, or FILE:path to read it from a file
num_samples = 3
max_new_tokens = 500
temperature = 0.8             # 0 = greedy
top_k = 200                   # 0 = off
top_p = 1.0                   # nucleus sampling; 1.0 = off
seed = 1337
device = 'auto'
dtype = 'auto'                # 'auto': bfloat16 on cuda, float32 on cpu
eval_file = ''                # if set: print tokens, mean loss, perplexity and bits per byte of this file
show_depth = False            # halting models: mark each token with the number of steps it took
n_repeats = 0                 # looped models: repeats of the shared group (0 = as trained; ACT: the cap)
exit_threshold = 0.0          # > 0: a token stops recurring once KL(p_r || p_r-1) < this (models without halting)
exit_criterion = 'kl'         # per-token exit test: 'kl' | 'entropy' (|H(p_r) - H(p_r-1)| < exit_threshold)
compile = False               # GPU: torch.compile the CUDA-graph decode step (pays off for long outputs)
export = ''                   # if set: write the checkpoint's model as one file here (e.g. from a sharded FSDP run)
# ----------------------------------------------------------------------------------------------


def fail(msg):
    raise SystemExit(f"error: {msg}")


def load_checkpoint(init_from, out_dir, device):
    """(model in eval mode on device, tokenizer name, path read) from a train.py checkpoint, or from an
    hf.py export directory (or Hub repo id) given as hf:DIR."""
    if init_from.startswith('hf:'):     # safetensors weights and config.json, read with this model.py
        from hf import hf_tokenizer_name, load_hf
        return load_hf(init_from[3:], device)[0], hf_tokenizer_name(init_from[3:]), init_from[3:]
    # weights_only loads: a checkpoint holding pickled objects is refused unread (one line)
    from checkpoint import BadCheckpoint, load_checkpoint_meta, newest_intact_checkpoint
    if init_from == 'resume':    # the newest checkpoint that reads (a newer unreadable one is said and skipped)
        path, ckpt, bad = newest_intact_checkpoint(out_dir)
        for p, why in bad:
            print(f"warning: {why}: skipped", file=sys.stderr)
        if path is None:
            fail(f"no {'intact ' if bad else ''}checkpoint (ckpt_*.pt) in {out_dir}: train first, or set --out_dir")
    else:
        path = init_from
        if not os.path.exists(path):
            fail(f"checkpoint not found: {path}")
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, 'meta.pt')):
            fail(f"{path} is a directory but not a sharded checkpoint (no meta.pt); pass a ckpt_N.pt or ckpt_N/")
        try:
            ckpt = load_checkpoint_meta(path)
        except BadCheckpoint as e:
            fail(str(e))
        if not isinstance(ckpt, dict) or 'model_config' not in ckpt or 'meta' not in ckpt:
            fail(f"{path} is not a train.py checkpoint (no model_config / meta)")
    try:
        model = build_lm(ModelConfig(**ckpt['model_config']))
    except (TypeError, ValueError) as e:
        fail(f"{path} has a model_config this model.py cannot build: {e}")
    from checkpoint import check_model_state
    check_model_state(model, path, ckpt, 'its own model_config')
    if os.path.isdir(path):      # sharded (FSDP) checkpoint: read the model's tensors, no process group needed
        from checkpoint import load_sharded
        state = {'model': model.state_dict()}
        load_sharded(state, path)
        model.load_state_dict(state['model'])
    else:
        state = {k.removeprefix('_orig_mod.').removeprefix('module.'): v for k, v in ckpt['model'].items()}
        model.load_state_dict(state)
    return model.to(device).eval(), ckpt['meta']['tokenizer'], path


def tokenizer(name):
    import prepare
    try:
        return prepare.get_tokenizer(name)
    except prepare.PrepareError as e:
        fail(f"tokenizer of the checkpoint is not available offline: {e}")


def read_text(path):
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except UnicodeDecodeError:
        fail(f"{path} is not UTF-8 text")
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")


@torch.no_grad()
def evaluate_file(model, enc, path, device, autocast):
    """Mean next-token loss over the whole file with a sliding window: every token after the first is
    predicted once, with up to block_size tokens of context (windows overlap by half a block, and
    only the second half of each later window is scored)."""
    text = read_text(path)
    ids = torch.tensor(enc.encode_ordinary(text), dtype=torch.long)
    if ids.numel() < 2:
        fail(f"{path} has fewer than 2 tokens")
    block = model.cfg.block_size
    stride = max(1, block // 2)
    total, count, scored_to = 0.0, 0, 1            # tokens [1, scored_to) have been scored
    begin = 0
    while scored_to < ids.numel():
        end = min(begin + block + 1, ids.numel())
        x, y = ids[begin:end - 1][None].to(device), ids[begin + 1:end][None].to(device)
        with autocast:
            logits = model(x).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0], y[0], reduction='none')
        first = scored_to - (begin + 1)             # index in y of the first not-yet-scored token
        total += nll[first:].sum().item()
        count += nll[first:].numel()
        scored_to = end
        begin += stride
    loss = total / count
    # per byte of the scored text: the first token is context only, so its bytes are not counted
    n_bytes = len(text.encode('utf-8')) - len(enc.decode_single_token_bytes(int(ids[0])))
    return {'tokens': ids.numel(), 'loss': loss, 'ppl': math.exp(loss),
            'bits_per_byte': total / math.log(2) / n_bytes}


def main():
    cfg = {k: globals()[k] for k in config_keys(globals())}
    configure(cfg)
    dev = cfg['device']
    if dev == 'auto':
        dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    if dev.startswith('cuda') and not torch.cuda.is_available():
        fail(f"device={dev!r} but CUDA is not available (use --device=cpu)")
    if dev.startswith('cuda'):
        from train import set_current_cuda_device
        set_current_cuda_device(dev)
    dt = cfg['dtype'] if cfg['dtype'] != 'auto' else ('bfloat16' if dev.startswith('cuda') else 'float32')
    if dt not in ('float32', 'bfloat16', 'float16'):
        fail(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dt!r}")
    for k in ('num_samples', 'max_new_tokens'):
        if not isinstance(cfg[k], int) or cfg[k] < 1:
            fail(f"{k} must be a positive integer, got {cfg[k]!r}")
    if cfg['temperature'] < 0 or cfg['top_k'] < 0 or not 0 < cfg['top_p'] <= 1:
        fail(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {cfg['temperature']}, "
             f"{cfg['top_k']}, {cfg['top_p']}")
    autocast = torch.autocast(dev.split(':')[0], dtype=getattr(torch, dt)) if dt != 'float32' else \
        torch.autocast(dev.split(':')[0], enabled=False)
    model, tok_name, path = load_checkpoint(cfg['init_from'], cfg['out_dir'], dev)
    enc = tokenizer(tok_name)
    print(f"loaded {path} ({model.cfg.model_type}, tokenizer {tok_name})", file=sys.stderr)

    if cfg['export']:       # one self-contained file: model weights, model config, tokenizer meta
        if not os.path.isdir(os.path.dirname(os.path.abspath(cfg['export']))):
            fail(f"export: directory of {cfg['export']} does not exist")
        tmp = cfg['export'] + '.tmp'
        try:
            torch.save({'model': {k: v.cpu() for k, v in model.state_dict().items()},
                        'model_config': asdict(model.cfg), 'meta': {'tokenizer': tok_name}}, tmp)
            os.replace(tmp, cfg['export'])
        except (OSError, RuntimeError) as e:     # read-only directory, full disk: no partial file left
            if os.path.exists(tmp):
                os.remove(tmp)
            from checkpoint import write_error
            fail(f"export: cannot write {cfg['export']}: {write_error(e)}")
        print(f"exported {path} -> {cfg['export']}")
        return

    try:        # depth at inference (halting.set_depth): more or fewer repeats, per-token exit
        set_depth(model, n_repeats=cfg['n_repeats'], exit_threshold=cfg['exit_threshold'] or None,
                  exit_criterion=cfg['exit_criterion'])
    except ValueError as e:
        fail(str(e))
    if cfg['eval_file']:
        if not os.path.isfile(cfg['eval_file']):
            fail(f"eval_file not found: {cfg['eval_file']}")
        r = evaluate_file(model, enc, cfg['eval_file'], dev, autocast)
        print(f"{cfg['eval_file']}: {r['tokens']} tokens, loss {r['loss']:.4f}, perplexity {r['ppl']:.2f}, "
              f"{r['bits_per_byte']:.4f} bits/byte")
        return

    if cfg['compile'] and (not dev.startswith('cuda') or hasattr(model.core, 'compile_layers')):
        fail("compile=True compiles the CUDA-graph decode step: it needs a CUDA device and a model "
             "without halting")
    if cfg['show_depth'] and not hasattr(model.core, 'trace'):
        fail("show_depth needs a halting model (trained with halting='act' or 'mor') or --exit_threshold > 0")
    prompt = cfg['start']
    if prompt.startswith('FILE:'):
        p = prompt[5:]
        if not os.path.isfile(p):
            fail(f"prompt file not found: {p}")
        prompt = read_text(p)
    ids = enc.encode_ordinary(prompt) or [enc.eot_token]
    block = model.cfg.block_size
    if len(ids) > block:        # the model sees only its context: continue from the prompt's end (as nanoGPT)
        print(f"note: prompt is {len(ids)} tokens, longer than the model's context ({block}): "
              f"using its last {block}",
              file=sys.stderr)
        ids = ids[-block:]
    gen = torch.Generator(device=dev).manual_seed(cfg['seed'])
    x = torch.tensor(ids, dtype=torch.long, device=dev)[None].repeat(cfg['num_samples'], 1)
    with autocast:
        out = model.generate(x, cfg['max_new_tokens'], temperature=cfg['temperature'],
                             top_k=cfg['top_k'] or None, top_p=cfg['top_p'], eos_token=enc.eot_token,
                             generator=gen, compile=cfg['compile'])
    for row in out.tolist():
        new = row[len(ids):]
        if enc.eot_token in new:
            new = new[:new.index(enc.eot_token)]
        if cfg['show_depth']:
            print(depth_view(model, enc, ids + new, dev, autocast, sys.stdout.isatty()))
        else:
            print(prompt + enc.decode(new))
        print('---------------')


# terminal colours for depths 1, 2, 3, ...: blue (shallow) -> red (deep)
COLOURS = ['\033[34m', '\033[36m', '\033[32m', '\033[33m', '\033[35m', '\033[31m']


@torch.no_grad()
def depth_view(model, enc, tokens, device, autocast, colour):
    """The text with every token marked by its depth (steps through the shared group), and a depth
    histogram. Within the context, depths come from one full forward: cached decoding takes the same
    decisions (tested), so they are the depths the tokens had while being generated. Past it, generate()
    slid its window, re-encoding the last block_size tokens for each new one: there a token's depth is
    the one it had as the last token of its window, the forward that predicted the next token."""
    block = model.cfg.block_size
    with autocast:
        model(torch.tensor(tokens[:block], device=device)[None])
    depth = model.core.trace['depth'][0].tolist()
    for t in range(block, len(tokens)):
        with autocast:
            model(torch.tensor(tokens[t - block + 1:t + 1], device=device)[None])
        depth.append(int(model.core.trace['depth'][0, -1]))
    parts = []
    for t, d in zip(tokens, depth):
        piece = enc.decode([t])
        if colour:
            parts.append(f"{COLOURS[min(max(d - 1, 0), len(COLOURS) - 1)]}{piece}\033[0m")
        else:
            parts.append(f"{piece}[{d}]")
    R = len(model.core.stats['depth_hist']) - 1
    hist = [depth.count(d) for d in range(R + 1)]
    legend = ' '.join(f"{COLOURS[min(d - 1, len(COLOURS) - 1)]}{d}\033[0m" for d in range(1, R + 1)) if colour else ''
    summary = (f"\ndepth histogram (tokens with 0..{R} steps): {hist}, mean {sum(depth) / len(depth):.2f}"
               + (f"   colours: {legend}" if colour else ''))
    return ''.join(parts) + summary


if __name__ == '__main__':
    main()

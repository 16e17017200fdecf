"""
train.py's data: prepared datasets (data/<name>/{train,val}.bin + meta.json, made by prepare.py) read as
deterministic, resumable batches of windows.
"""
import os

import numpy as np
import torch
import torch.distributed as dist

from configurator import fail


def global_batch(cfg):
    """Sequences per optimizer step of a config (also of a checkpoint's: those before 2026-12-06 have no
    total_batch_size, and meant batch_size x gradient_accumulation_steps)."""
    return cfg.get('total_batch_size') or cfg['batch_size'] * cfg['gradient_accumulation_steps']


def batch_plan(cfg, world):
    """(global batch, micro-batch, accumulation steps) of one optimizer step over `world` processes: each
    takes total/world sequences, in micro-batches of min(batch_size, total/world). fail() with the nearest
    values that work when total does not split so."""
    total, b, gas = global_batch(cfg), cfg['batch_size'], cfg['gradient_accumulation_steps']
    if cfg.get('total_batch_size') and gas != 1 and total != b * gas:
        fail(f"total_batch_size={total} and gradient_accumulation_steps={gas} disagree: the accumulation follows from "
             f"total_batch_size, batch_size and the world size; for {b} x {gas} sequences per step say "
             f"--total_batch_size={b * gas} and drop gradient_accumulation_steps")
    name = 'total_batch_size' if cfg.get('total_batch_size') else 'batch_size x gradient_accumulation_steps'
    if total % world:
        lo, hi = total // world * world, (total // world + 1) * world
        fail(f"{name} = {total} sequences do not split over {world} processes: use total_batch_size="
             + (f"{lo} or {hi}" if lo else f"{hi}"))
    per_rank = total // world
    micro = min(b, per_rank)
    if per_rank % micro:
        lo = max(d for d in range(1, micro + 1) if per_rank % d == 0)
        hi = min(d for d in range(micro + 1, per_rank + 1) if per_rank % d == 0)
        step = micro * world
        fail(f"batch_size={b} does not divide the {per_rank} sequences per process ({name} = {total} over {world} "
             f"processes): use batch_size={lo} or {hi}, or total_batch_size={total // step * step} or "
             f"{(total // step + 1) * step}")
    return total, micro, per_rank // micro


class Batches:
    """Deterministic, resumable batches. The train stream is cut into windows of block_size+1 tokens;
    each epoch visits them in a seeded permutation (the same on every rank). Step s takes the next
    global batch of windows; rank r, micro-step m takes its own disjoint slice. The whole state is the
    number of global batches consumed, so a resumed run sees exactly the data it would have seen."""

    def __init__(self, path, block, micro, accum_local, rank, world, seed):
        self.path, self.block, self.micro = path, block, micro
        self.accum_local, self.rank, self.world, self.seed = accum_local, rank, world, seed
        meta = load_meta(os.path.dirname(path))
        self.dtype, self.vocab_size = np.dtype(meta['dtype']), meta['vocab_size']
        n_tokens = os.path.getsize(path) // self.dtype.itemsize
        self.n_windows = (n_tokens - 1) // block
        self.global_batch = micro * accum_local * world
        if self.n_windows < self.global_batch:
            fail(f"{path} has {n_tokens} tokens: fewer than one global batch of {self.global_batch} "
                 f"windows of {block + 1} (lower total_batch_size or block_size)")
        self.steps_per_epoch = self.n_windows // self.global_batch
        self.pos = 0                          # global batches consumed: the checkpointed state
        self._perm_epoch, self._perm = -1, None

    def _windows(self, step):
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n_windows, generator=g).numpy(), epoch
        return self._perm[i * self.global_batch:(i + 1) * self.global_batch]

    def next_step(self, overfit=False):
        """The micro-batches (x, y) of this rank for the next optimizer step (overfit: always the first)."""
        w = self._windows(0 if overfit else self.pos).reshape(self.accum_local, self.world, self.micro)[:, self.rank]
        self.pos += 1
        return [read_windows(self.path, self.dtype, starts * self.block, self.block, self.vocab_size) for starts in w]


def read_windows(path, dtype, starts, block, vocab_size=None):
    # a fresh memmap per batch: numpy's memmap otherwise keeps growing resident memory
    data = np.memmap(path, dtype=dtype, mode='r')
    xy = torch.from_numpy(np.stack([data[s:s + block + 1].astype(np.int64) for s in starts]))
    if vocab_size is not None and xy.max() >= vocab_size:    # else an index error deep in the embedding
        fail(f"{path} holds token id {int(xy.max())} but its meta.json says vocab_size {vocab_size}: the "
             f"data and meta.json do not match (prepare the dataset again)")
    return xy[:, :-1], xy[:, 1:]


def load_meta(data_dir):
    """meta.json of a prepared dataset (checked against its .bin sizes by prepare.load_meta), held to what
    prepare.py writes: one of its tokenizers (sample.py needs it to decode), and unsigned token ids wide
    enough for the vocabulary. Anything else would be read without an error, as other numbers."""
    import prepare
    try:
        meta = prepare.load_meta(data_dir)
    except prepare.PrepareError as e:
        fail(str(e))
    path = os.path.join(data_dir, 'meta.json')
    if meta['tokenizer'] not in prepare.TOKENIZERS:
        fail(f"{path} has tokenizer {meta['tokenizer']!r}, which prepare.py does not know "
             f"(one of {', '.join(prepare.TOKENIZERS)})")
    if not isinstance(meta['vocab_size'], int) or meta['vocab_size'] < 1:
        fail(f"{path} has vocab_size {meta['vocab_size']!r}: expected a positive integer")
    if meta['dtype'] not in ('uint16', 'uint32'):
        fail(f"{path} has dtype {meta['dtype']!r}: token files are 'uint16' or 'uint32' (native byte order), "
             f"as prepare.py writes them")
    if meta['dtype'] == 'uint16' and meta['vocab_size'] > 1 << 16:
        fail(f"{path} has dtype 'uint16' for vocab_size {meta['vocab_size']}: ids past 65535 do not fit "
             f"(prepare.py writes 'uint32' for such a vocabulary)")
    return meta


# datasets train.py can make itself on first use: Shakespeare with gpt2 tokens or raw bytes
AUTO_DATASETS = {'shakespeare': 'gpt2', 'shakespeare_bytes': 'bytes'}


def ensure_data(cfg, run):
    data_dir = os.path.join('data', cfg['dataset'])
    if not os.path.exists(os.path.join(data_dir, 'meta.json')):
        if cfg['dataset'] not in AUTO_DATASETS:
            fail(f"missing {data_dir}/meta.json: run `python prepare.py FILES --out_dir={data_dir}`")
        if run['master']:
            import prepare
            tok = AUTO_DATASETS[cfg['dataset']]
            print(f"{data_dir} missing: preparing the Shakespeare works with the {tok} tokenizer")
            try:
                prepare.prepare([], data_dir, tok, 0.005, 1337)
            except prepare.PrepareError as e:
                fail(str(e))
        if run['distributed']:
            dist.barrier()
    meta = load_meta(data_dir)
    for split in ('train', 'val'):      # an eval over zero windows would print nan and never checkpoint
        if meta[f'{split}_tokens'] < cfg['block_size'] + 1:
            fail(f"{data_dir}/{split}.bin has {meta[f'{split}_tokens']} tokens, fewer than block_size+1 "
                 f"({cfg['block_size'] + 1}): lower block_size or prepare more data")
    return data_dir


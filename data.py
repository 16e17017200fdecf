"""
train.py's data: prepared datasets (data/<name>/{train,val}.bin + meta.json, made by prepare.py) read as
deterministic, resumable batches of windows; one dataset, or a weighted mixture of several
(dataset='fineweb:0.7,code:0.3', see Mixture and docs/data.md), and the eval losses over fixed windows
of each split (evaluate).
"""
import hashlib
import math
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

    def state(self):
        """What a checkpoint keeps of the stream (train.py saves it among its own keys)."""
        return {'data_pos': self.pos}

    def load_state(self, ckpt, path):
        self.pos = ckpt['data_pos']


class Mixture:
    """Deterministic, resumable batches drawn from several prepared datasets ("sources") by weight.
    Each source is a stream of its windows of block_size+1 tokens, every epoch a permutation seeded by
    (seed, its name, epoch) of all its windows. Window k of the run (counting from 1 over all global
    batches) goes to the source furthest behind its share, max over i of weight_i * k - taken_i (the
    first listed on a tie), which takes that stream's next window: every source's count stays within
    about a window of its exact share at every step (docs/data.md). The global batch's windows are then
    shuffled by a permutation seeded by (seed, step), so each micro-batch and rank gets a mix, and rank r,
    micro-step m takes its slice of them as in Batches. The state is the global batches consumed and
    each source's windows taken, so a resumed run sees exactly the data it would have seen, at any world
    size (the global batch does not depend on it)."""

    def __init__(self, sources, block, micro, accum_local, rank, world, seed):
        """sources: [(name, path of its train.bin, weight)], the weights summing to 1."""
        self.names = [n for n, _, _ in sources]
        self.paths = [p for _, p, _ in sources]
        self.weights = [float(w) for _, _, w in sources]
        self.block, self.micro, self.accum_local, self.rank, self.world = block, micro, accum_local, rank, world
        self.seed = seed
        metas = [load_meta(os.path.dirname(p)) for p in self.paths]
        self.dtypes = [np.dtype(m['dtype']) for m in metas]
        self.vocab_size = metas[0]['vocab_size']
        self.n_windows = [(os.path.getsize(p) // dt.itemsize - 1) // block for p, dt in zip(self.paths, self.dtypes)]
        self.global_batch = micro * accum_local * world
        self.pos = 0                          # global batches consumed, and ...
        self.taken = [0] * len(sources)       # ... each source's windows: the checkpointed state
        self._perms = {}                      # source -> (epoch, its permutation)

    def draw(self, step, taken):
        """(source, index in its stream) of each window of global batch `step` in batch order, advancing
        `taken` (each source's windows drawn before this step) past them."""
        g, w = self.global_batch, self.weights
        src, idx = [], []
        for k in range(step * g + 1, (step + 1) * g + 1):
            i = max(range(len(w)), key=lambda i: w[i] * k - taken[i])
            src.append(i)
            idx.append(taken[i])
            taken[i] += 1
        order = torch.randperm(g, generator=torch.Generator().manual_seed(seed_of(self.seed, 'mix', step))).numpy()
        return np.array(src)[order], np.array(idx)[order]

    def _starts(self, src, idx):
        """The first token of each drawn window: its source's epoch permutation, at the index's place."""
        starts = np.empty(len(src), np.int64)
        for i in np.unique(src):
            m = src == i
            epochs, places = np.divmod(idx[m], self.n_windows[i])
            out = np.empty(len(places), np.int64)
            for e in np.unique(epochs):           # a step can cross an epoch of a source
                if self._perms.get(i, (None,))[0] != e:
                    g = torch.Generator().manual_seed(seed_of(self.seed, self.names[i], int(e)))
                    self._perms[i] = (e, torch.randperm(self.n_windows[i], generator=g).numpy())
                out[epochs == e] = self._perms[i][1][places[epochs == e]]
            starts[m] = out * self.block
        return starts

    def next_step(self, overfit=False):
        """The micro-batches (x, y) of this rank for the next optimizer step (overfit: always the first)."""
        src, idx = self.draw(0, [0] * len(self.names)) if overfit else self.draw(self.pos, self.taken)
        starts = self._starts(src, idx)
        self.pos += 1
        mine = np.arange(self.global_batch).reshape(self.accum_local, self.world, self.micro)[:, self.rank]
        return [self._read(src[p], starts[p]) for p in mine]

    def _read(self, src, starts):
        x = torch.empty(len(src), self.block, dtype=torch.int64)
        y = torch.empty_like(x)
        for i in np.unique(src):
            m = torch.from_numpy(src == i)
            x[m], y[m] = read_windows(self.paths[i], self.dtypes[i], starts[src == i], self.block, self.vocab_size)
        return x, y

    def state(self):
        return {'data_pos': self.pos, 'data_sources': dict(zip(self.names, self.taken))}

    def load_state(self, ckpt, path):
        taken = ckpt.get('data_sources')
        if not isinstance(taken, dict) or sorted(taken) != sorted(self.names):
            fail(f"checkpoint {path} holds no data position for the datasets {', '.join(self.names)} "
                 f"(it has {sorted(taken) if isinstance(taken, dict) else 'none'}): it cannot resume this mixture")
        self.pos, self.taken = ckpt['data_pos'], [int(taken[n]) for n in self.names]


def seed_of(*parts):
    """A 56-bit seed from any values (a source's name among them): streams of different sources or
    steps get unrelated permutations, and a source keeps its own stream wherever it is listed."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], 'little')


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


# log.jsonl keys that a mixture's val/<name> must not overwrite
RESERVED_NAMES = ('loss', 'depth_hist', 'mean_depth')


def is_mixture(spec):
    return ':' in spec or ',' in spec


def parse_dataset(spec):
    """[(name, weight)] of config key `dataset`: a plain name (weight 1), or a mixture
    'name:weight,name:weight,...' of prepared datasets, its positive weights normalised to sum to 1."""
    if not is_mixture(spec):
        return [(spec, 1.0)]
    want = "write name:weight,name:weight,... e.g. dataset='fineweb:0.7,code:0.3'"
    out = []
    for item in spec.split(','):
        name, sep, w = (p.strip() for p in item.partition(':'))
        if not name or not sep:
            fail(f"dataset={spec!r}: {item.strip()!r} is not name:weight ({want})")
        try:
            w = float(w)
        except ValueError:
            fail(f"dataset={spec!r}: the weight of {name!r} is {w!r}, not a number ({want})")
        if not math.isfinite(w) or w <= 0:
            fail(f"dataset={spec!r}: the weight of {name!r} is {w}: weights must be positive numbers")
        if name in [n for n, _ in out]:
            fail(f"dataset={spec!r}: {name!r} is listed twice")
        if name in RESERVED_NAMES:
            fail(f"dataset={spec!r}: a dataset of a mixture cannot be named {name!r} (log.jsonl's val/{name} "
                 f"is taken): rename data/{name}")
        out.append((name, w))
    total = sum(w for _, w in out)
    return [(n, w / total) for n, w in out]


def ensure_data(cfg, run):
    """[(name, data_dir, weight)] of config key `dataset`, each prepared (the Shakespeare ones on first
    use) and checked; a mixture's datasets must share one tokenizer."""
    sources = [(name, ensure_dataset(name, cfg, run), w) for name, w in parse_dataset(cfg['dataset'])]
    first = sources[0][1]
    tok = lambda m: (m['tokenizer'], m['vocab_size'], m['dtype'])   # noqa: E731
    for _, d, _ in sources[1:]:
        a, b = load_meta(first), load_meta(d)
        if tok(a) != tok(b):
            fail(f"dataset={cfg['dataset']!r} mixes tokenizers: {first} has {a['tokenizer']} (vocab_size "
                 f"{a['vocab_size']}, {a['dtype']}), {d} has {b['tokenizer']} (vocab_size {b['vocab_size']}, "
                 f"{b['dtype']}): prepare them with the same --tokenizer")
    return sources


def ensure_dataset(name, cfg, run):
    data_dir = os.path.join('data', name)
    if not os.path.exists(os.path.join(data_dir, 'meta.json')):
        if name not in AUTO_DATASETS:
            fail(f"missing {data_dir}/meta.json: run `python prepare.py FILES --out_dir={data_dir}`"
                 + (f" (dataset={cfg['dataset']!r})" if is_mixture(cfg['dataset']) else ''))
        if run['master']:
            import prepare
            tok = AUTO_DATASETS[name]
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


def make_batches(cfg, sources, micro, accum, run):
    """train.py's batches: of the one dataset, or a Mixture of several."""
    args = (cfg['block_size'], micro, accum, run['rank'], run['world'], cfg['seed'])
    if not is_mixture(cfg['dataset']):
        return Batches(os.path.join(sources[0][1], 'train.bin'), *args)
    return Mixture([(n, os.path.join(d, 'train.bin'), w) for n, d, w in sources], *args)


def describe_data(cfg, sources, total):
    """train.py's line (lines, for a mixture) at start about its data."""
    per_eval = f"each eval reads up to {cfg['eval_iters'] * cfg['batch_size']} windows of {cfg['block_size']}"
    if not is_mixture(cfg['dataset']):
        return f"{sources[0][1]}: {load_meta(sources[0][1])['val_tokens']:,} val tokens ({per_eval})"
    lines = [f"data: a mixture of {len(sources)} datasets, each window drawn by weight ({per_eval} of each; "
             f"val is their losses weighted so)"]
    for name, d, w in sources:
        m = load_meta(d)
        epochs = cfg['max_iters'] * total * w / ((m['train_tokens'] - 1) // cfg['block_size'])
        lines.append(f"  {d}: weight {w:.4g}, {m['train_tokens']:,} train / {m['val_tokens']:,} val tokens, "
                     f"{total * w:.4g} of {total} sequences per step ({total * w * cfg['block_size']:,.0f} tokens), "
                     f"{epochs:.3g} epochs by max_iters")
    return '\n'.join(lines)


@torch.no_grad()
def evaluate(model, data_dir, cfg, run, autocast, core=None, pad=False):
    """Mean CE on fixed windows spread evenly over each split (the same every eval), split over the
    ranks and averaged with all_reduce, so eval costs 1/world per rank. pad: every forward gets
    batch_size rows, a short last batch filled with the split's first window under ignored targets (-1),
    so a model compiled for static shapes compiles one eval graph, not one per short batch size. Only
    for mechanisms where every sequence has the same depth counts (the plain loop; MoR expert-choice's
    per-sequence top-k), so that the filler rows leave the depth histogram's shares unchanged."""
    model.eval()
    out = {}
    meta = load_meta(data_dir)
    for split in ('train', 'val'):
        path = os.path.join(data_dir, f'{split}.bin')
        dtype = np.dtype(meta['dtype'])
        n_win = (os.path.getsize(path) // dtype.itemsize - 1) // cfg['block_size']
        n = min(cfg['eval_iters'] * cfg['batch_size'], n_win)
        all_starts = np.linspace(0, n_win - 1, n).astype(np.int64) * cfg['block_size']
        starts = all_starts[run['rank']::run['world']]
        tot = torch.zeros(2, dtype=torch.float64, device=run['device'])
        hist = 0
        # every rank runs the same number of forwards (FSDP's all-gathers must pair up): a rank short of
        # windows runs its last ones on the first window, counted with weight 0
        n_batches = math.ceil(math.ceil(n / run['world']) / cfg['batch_size'])
        for b in range(n_batches):
            chunk = starts[b * cfg['batch_size']:(b + 1) * cfg['batch_size']]
            n_tok = len(chunk) * cfg['block_size']      # the tokens that count (0: a rank short of windows)
            if pad:
                rows = np.concatenate([chunk, np.repeat(all_starts[:1], cfg['batch_size'] - len(chunk))])
            else:
                rows = chunk if len(chunk) else all_starts[:1]
            x, y = read_windows(path, dtype, rows, cfg['block_size'], meta['vocab_size'])
            if pad:   # (y is a view of x's tokens shifted by one: a copy, so x keeps real ids)
                y = y.clone()
                y[len(chunk):] = -1
            with autocast:
                o = model(x.to(run['device']), y.to(run['device']))
            if n_tok:   # (a batch of padding alone has a NaN mean)
                tot += torch.stack([o.ce.double() * n_tok, torch.tensor(n_tok, device=run['device'])])
            if core is not None and 'depth_hist' in getattr(core, 'stats', {}):
                hist = hist + core.stats['depth_hist'].double() * n_tok   # halting: tokens per depth
        if run['distributed']:
            dist.all_reduce(tot)
            if torch.is_tensor(hist):
                dist.all_reduce(hist)
        out[split] = (tot[0] / tot[1]).item()
        if torch.is_tensor(hist):
            out[f'{split}_depth_hist'] = hist.long().tolist()
    model.train()
    return out


def evaluate_sources(cfg, sources, evaluate):
    """evaluate(data_dir) -> {'train': loss, 'val': loss, ...} of one dataset. For a mixture, 'train' and
    'val' are the sources' losses weighted by the mixture's weights (the expected loss of a window the
    mixture draws), 'val/<name>' each source's val loss, and depth histograms add up over the sources."""
    if not is_mixture(cfg['dataset']):
        return evaluate(sources[0][1])
    out = {}
    for name, d, w in sources:
        ev = evaluate(d)
        for k, v in ev.items():
            if k in ('train', 'val'):       # losses: weighted by the mixture
                out[k] = out.get(k, 0.0) + w * v
            else:                           # histograms (depths): counts add up
                out[k] = [a + b for a, b in zip(out.get(k, [0] * len(v)), v)]
        out[f'val/{name}'] = ev['val']
    return out

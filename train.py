"""
Train MoEUT (or the dense baseline). One file, nanoGPT style: the config is the globals below,
overridden by config files and --key=value (configurator.py).

    python train.py                                     # tiny default on CPU (prepares data first)
    python train.py config/moeut_126m.py --batch_size=16
    torchrun --standalone --nproc_per_node=8 train.py config/moeut_126m.py
    torchrun --nnodes=2 --node_rank=0 --rdzv_endpoint=HOST:29500 --nproc_per_node=8 train.py ...

Under torchrun, parallelism='ddp' wraps the model in DistributedDataParallel and 'fsdp' shards it with
FSDP2 (fully_shard). gradient_accumulation_steps is the GLOBAL number of micro-batches per step, split
over the ranks, so a config means the same global batch at any world size.
"""
import errno
import gc
import math
import os
import pickle
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist

from configurator import configure, config_keys
from model import LM, ModelConfig, describe, distinct_layers, flops_per_token, routing_report

# ----------------------------------------------------------------------------------------------
# default config: a tiny MoEUT on Shakespeare that trains on a 2-core CPU in a few minutes
# I/O
out_dir = 'out/shakespeare'
eval_interval = 200
log_interval = 25
eval_iters = 20
eval_only = False
always_save_checkpoint = True   # else only when val loss improves
keep_last = 2                   # checkpoints kept in out_dir
checkpoint_format = 'auto'      # 'file' (one ckpt_N.pt) | 'sharded' (ckpt_N/ via torch.distributed.checkpoint)
                                # | 'auto' = sharded under FSDP, file otherwise. Both resume at any world size.
init_from = 'scratch'           # 'scratch' or 'resume' (latest checkpoint in out_dir)
overwrite = False               # scratch into an out_dir holding another run: delete its checkpoints and logs first
convert_trusted_checkpoint = '' # a checkpoint path: rewrite a pre-2026-12-06 checkpoint so it loads safely, then exit
                                # (unpickles it in full, which runs whatever it holds: only for a file you trust)
wandb_log = False
wandb_project = 'nanomoeut'
wandb_run_name = 'run'
diagnostics = True              # routing/grad/logit diagnostics at log time, PNG plots at eval (matplotlib)
# data
dataset = 'shakespeare_bytes'   # data/<dataset>/{train,val}.bin, made by prepare.py
batch_size = 16                 # micro-batch per rank
block_size = 256
gradient_accumulation_steps = 1  # global micro-batches per optimizer step
overfit_batch = False           # debugging: train on the first batch forever (loss must go to ~0)
# model (every ModelConfig field can be set here; vocab_size comes from the data's meta.json)
model_type = 'moeut'
d_model = 128
n_layers = 4
n_heads = 4
d_head = 32
group_size = 2
att_n_experts = 4
att_k = 2
ff_n_experts = 16
ff_k = 4
d_expert = 32
d_ff = 512
dropout = 0.0
entropy_reg = 0.01
att_entropy_reg = 0.001
ff_expert_dropout = 0.0
att_expert_dropout = 0.0
rope_base = 10000.0
halting = 'none'                # per-token dynamic depth: 'none' | 'act' | 'mor' (halting.py)
# ...and every other ModelConfig field (halt_kv, act_tau, mor_*, n_prelude, ...) at its default
globals().update({f.name: f.default for f in fields(ModelConfig)
                  if f.name not in globals() and f.name != 'vocab_size'})
# optimizer: AdamW (or Muon for hidden matrices), linear warmup then cosine decay to min_lr
optimizer = 'adamw'             # 'adamw' | 'muon' (see make_optimizer)
learning_rate = 2e-3
max_iters = 600
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0                 # 0 = off
warmup_iters = 50
lr_decay_iters = 600
min_lr = 2e-4
max_bad_steps = 5               # non-finite losses in a row before giving up
# system
device = 'auto'                 # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...
dtype = 'auto'                  # 'auto' (bfloat16 on cuda, float32 on cpu), 'float32', 'bfloat16', 'float16'
compile = False
parallelism = 'ddp'             # under torchrun: 'ddp' or 'fsdp'
seed = 1337
# ----------------------------------------------------------------------------------------------


def main():
    cfg = {k: globals()[k] for k in config_keys(globals())}
    configure(cfg)
    globals().update(cfg)
    if cfg['convert_trusted_checkpoint']:
        convert_checkpoint(cfg['convert_trusted_checkpoint'])
        return
    run = setup_distributed(cfg)
    try:
        train(cfg, run)
        # DDP sits in reference cycles, so it outlives train() until a GC pass; if that pass came after
        # destroy_process_group (at interpreter exit), its reducer would die without its process group
        # (std::terminate, seen once in CI on gloo). Free it while the group still exists.
        gc.collect()
        if dist.is_initialized():   # leave together: a rank tearing gloo down while another still talks aborts
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- distributed / device ---------------------------------------------------------------------

def set_current_cuda_device(dev):
    """Make CUDA device `dev` ('cuda', 'cuda:1') the current one: Triton kernels and CUDA graphs run on
    the current device, whatever device their tensors name. Used by sample.py too."""
    index = torch.device(dev).index or 0
    if index >= torch.cuda.device_count():
        fail(f"device={dev!r} but this process sees {torch.cuda.device_count()} GPU(s)")
    torch.cuda.set_device(index)


def fail(msg):
    """One clear line and a non-zero exit; raised on every rank so none hangs waiting for the others."""
    raise SystemExit(f"error: {msg}")


def setup_distributed(cfg):
    """Single process, or one process per GPU/CPU slot under torchrun (RANK/WORLD_SIZE/LOCAL_RANK)."""
    distributed = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    dev = cfg['device']
    if dev == 'auto':
        dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    if dev.startswith('cuda') and not torch.cuda.is_available():
        fail(f"device={dev!r} but CUDA is not available (use --device=cpu)")
    for k in ('batch_size', 'block_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval',
              'eval_iters', 'max_bad_steps'):
        if not isinstance(cfg[k], int) or cfg[k] < 1:
            fail(f"{k} must be a positive integer, got {cfg[k]!r}")
    for k in ('max_iters', 'warmup_iters', 'lr_decay_iters', 'keep_last'):
        if not isinstance(cfg[k], int) or cfg[k] < 0:
            fail(f"{k} must be an integer >= 0, got {cfg[k]!r}")
    # the optimizers reject some of these with a traceback, others (a negative min_lr) not at all
    for k, ok, want in (('learning_rate', lambda v: v > 0, '> 0'), ('min_lr', lambda v: v >= 0, '>= 0'),
                        ('weight_decay', lambda v: v >= 0, '>= 0'), ('grad_clip', lambda v: v >= 0, '>= 0'),
                        ('beta1', lambda v: 0 <= v < 1, 'in [0, 1)'), ('beta2', lambda v: 0 <= v < 1, 'in [0, 1)')):
        if not math.isfinite(cfg[k]) or not ok(cfg[k]):
            fail(f"{k} must be {want}, got {cfg[k]!r}")
    rank, world, local = 0, 1, 0
    if dev.startswith('cuda'):     # TF32 for any fp32 matmuls left outside autocast (nanoGPT does the same)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if distributed:
        rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        local = int(os.environ.get('LOCAL_RANK', 0))
        if dev.startswith('cuda'):
            dev = f'cuda:{local}'
    if dev.startswith('cuda'):
        set_current_cuda_device(dev)
    if distributed:
        dist.init_process_group(backend='nccl' if dev.startswith('cuda') else 'gloo')
        if cfg['parallelism'] not in ('ddp', 'fsdp'):
            fail(f"parallelism must be 'ddp' or 'fsdp', got {cfg['parallelism']!r}")
    if cfg['gradient_accumulation_steps'] % world != 0:
        fail(f"gradient_accumulation_steps ({cfg['gradient_accumulation_steps']}) must be a multiple "
             f"of the world size ({world}); it counts global micro-batches per step")
    dt = cfg['dtype']
    if dt == 'auto':
        dt = 'bfloat16' if dev.startswith('cuda') else 'float32'
    if dt not in ('float32', 'bfloat16', 'float16'):
        fail(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dt!r}")
    return dict(distributed=distributed, rank=rank, world=world, device=dev, dtype=dt,
                master=rank == 0, device_type='cuda' if dev.startswith('cuda') else 'cpu')


# ---- data -------------------------------------------------------------------------------------

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
                 f"windows of {block + 1} (lower batch_size or block_size)")
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


# ---- model / optimizer ------------------------------------------------------------------------

def build_model(cfg, run, vocab_size):
    try:
        mcfg = ModelConfig.from_dict({**cfg, 'vocab_size': vocab_size})
    except (ValueError, TypeError) as e:
        fail(str(e))
    if cfg['compile'] and mcfg.halting != 'none' and run['distributed'] and cfg['parallelism'] == 'fsdp':
        fail("compile=True for a halting model compiles each layer, which has not been tested under "
             "FSDP: use parallelism='ddp' or compile=False")
    try:            # some checks live in the modules (halting.py): their ValueError is a config error too
        model = LM(mcfg).to(run['device'])
    except ValueError as e:
        fail(str(e))
    return model, mcfg


def wrap_model(model, run, cfg):
    """DDP or FSDP2 under torchrun; plain module otherwise. Returns the module to call."""
    if not run['distributed']:
        return model
    if cfg['parallelism'] == 'ddp':
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [torch.device(run['device']).index] if run['device_type'] == 'cuda' else None
        # broadcast_buffers=False: the only buffers are per-rank routing counters (diagnostics)
        return DDP(model, device_ids=ids, broadcast_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # an explicit mesh of this run's device type: fully_shard's default mesh is CUDA whenever CUDA is
    # present, so --device=cpu on a GPU host would put rank r on cuda:r (and fail past the GPU count)
    mesh = init_device_mesh(run['device_type'], (run['world'],))
    # bf16 (or fp16) parameters for compute on GPU, fp32 gradient reduction; fp32 throughout on CPU.
    pdt = getattr(torch, run['dtype']) if run['device_type'] == 'cuda' else torch.float32
    # cast_forward_inputs=False on the layers: FSDP's input cast rebuilds container arguments, and a
    # layer extends the KV-cache dict it is given in place (router logits travel in model.Routes,
    # an object FSDP does not traverse, for the same reason).
    layer_mp = MixedPrecisionPolicy(param_dtype=pdt, reduce_dtype=torch.float32, cast_forward_inputs=False)
    # MoEUT's shared layers run R times per forward: keep them unsharded between their uses
    # (reshard_after_forward=False) instead of re-gathering the same weights R times.
    reshard = model.cfg.model_type == 'dense'
    for layer in distinct_layers(model.core):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=layer_mp)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=pdt, reduce_dtype=torch.float32))
    return model


def make_optimizer(model, cfg, run):
    """AdamW on everything (the paper recipe: weight decay on every parameter, spec §8), or Muon.
    Muon orthogonalises the update of hidden weight MATRICES: torch.optim.Muon for the 2D ones (Q/K,
    dense V/O, dense MLP), ExpertMuon below for the 3D expert banks (each expert its own matrix).
    Embedding, LM head, norms, biases and routers stay on AdamW, as Muon's authors recommend.
    adjust_lr_fn='match_rms_adamw' scales Muon's step to AdamW's RMS, so one learning_rate serves both."""
    fused = run['device_type'] == 'cuda'
    betas = (cfg['beta1'], cfg['beta2'])
    if cfg['optimizer'] == 'adamw':
        return torch.optim.AdamW(model.parameters(), lr=cfg['learning_rate'], betas=betas,
                                 weight_decay=cfg['weight_decay'], fused=fused)
    if cfg['optimizer'] != 'muon':
        fail(f"optimizer must be 'adamw' or 'muon', got {cfg['optimizer']!r}")
    if run['distributed'] and cfg['parallelism'] == 'fsdp':
        fail("optimizer='muon' needs whole matrices; it does not work on FSDP shards (use parallelism='ddp')")
    hidden2, hidden3, rest = [], [], []
    for name, p in model.named_parameters():
        is_router = name.endswith(('expert_sel', 'sel_v', 'sel_o'))
        is_hidden = name.startswith(('core.', 'module.core.')) and p.ndim >= 2 and not is_router
        (hidden3 if is_hidden and p.ndim == 3 else hidden2 if is_hidden else rest).append(p)
    kw = dict(lr=cfg['learning_rate'], weight_decay=cfg['weight_decay'], adjust_lr_fn='match_rms_adamw')
    opts = [torch.optim.AdamW(rest, lr=cfg['learning_rate'], betas=betas, weight_decay=cfg['weight_decay'],
                              fused=fused)]
    opts += [torch.optim.Muon(hidden2, **kw)] if hidden2 else []
    opts += [ExpertMuon(hidden3, **kw)] if hidden3 else []
    return Optimizers(opts)


class ExpertMuon(torch.optim.Optimizer):
    """torch.optim.Muon's update for a bank of matrices [E, A, B]: momentum (Nesterov), then a
    Newton-Schulz orthogonalisation of every expert's [A, B] slice at once (bmm over E), the same
    coefficients, normalisation and lr adjustment as torch.optim.Muon applies to one 2D matrix."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                                      adjust_lr_fn=adjust_lr_fn))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g['params']:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault('momentum_buffer', torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - g['momentum'])
                update = p.grad.lerp(buf, g['momentum']) if g['nesterov'] else buf
                update = newton_schulz_batched(update, g['ns_coefficients'], g['ns_steps'], g['eps'])
                A, B = p.shape[1:]
                ratio = {'match_rms_adamw': 0.2 * math.sqrt(max(A, B)), None: math.sqrt(max(1, A / B)),
                         'original': math.sqrt(max(1, A / B))}[g['adjust_lr_fn']]
                p.mul_(1 - g['lr'] * g['weight_decay'])
                p.add_(update.to(p.dtype), alpha=-g['lr'] * ratio)


def newton_schulz_batched(g, coefficients, steps, eps):
    """Approximate orthogonalisation of each [A, B] slice of g [E, A, B] (quintic Newton-Schulz in bf16)."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(1) > g.size(2)
    if tall:
        x = x.transpose(1, 2)
    x = x / x.flatten(1).norm(dim=1).clamp(min=eps)[:, None, None]     # spectral norm <= 1, per expert
    for _ in range(steps):
        gram = x @ x.transpose(1, 2)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.transpose(1, 2) if tall else x


class Optimizers(list):
    """Several optimizers used as one (step, zero_grad, param_groups, state_dict), e.g. AdamW + Muon."""

    @property
    def param_groups(self):
        return [g for o in self for g in o.param_groups]

    @property
    def state(self):
        return {k: v for o in self for k, v in o.state.items()}

    def step(self, closure=None):
        for o in self:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return [o.state_dict() for o in self]

    def load_state_dict(self, states):
        for o, st in zip(self, states):
            o.load_state_dict(st)


def lr_at(it, cfg):
    """Linear warmup, then cosine from learning_rate to min_lr at lr_decay_iters, then min_lr."""
    if it < cfg['warmup_iters']:
        return cfg['learning_rate'] * (it + 1) / (cfg['warmup_iters'] + 1)
    if it >= cfg['lr_decay_iters']:
        return cfg['min_lr']
    ratio = (it - cfg['warmup_iters']) / max(1, cfg['lr_decay_iters'] - cfg['warmup_iters'])
    return cfg['min_lr'] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg['learning_rate'] - cfg['min_lr'])


# ---- checkpoints ------------------------------------------------------------------------------

def checkpoint_paths(out_dir):
    """Complete checkpoints, oldest first: ckpt_N.pt files and ckpt_N/ sharded directories (a save in
    progress, or killed mid-way, is a *.tmp name, and one found unreadable a *.corrupt name: never listed)."""
    if not os.path.isdir(out_dir):
        return []
    names = sorted(f for f in os.listdir(out_dir) if re.fullmatch(r'ckpt_\d+\.pt', f)
                   or re.fullmatch(r'ckpt_\d+', f) and os.path.isdir(os.path.join(out_dir, f)))
    return [os.path.join(out_dir, f) for f in names]


def remove_partial_saves(out_dir):
    """Delete ckpt_*.tmp files and directories: saves killed mid-way (never listed, never loadable, and
    as big as a checkpoint). Called by rank 0 at start, before this run saves anything."""
    import shutil
    for f in os.listdir(out_dir):
        if f.startswith('ckpt_') and f.endswith('.tmp'):
            p = os.path.join(out_dir, f)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def latest_checkpoint(out_dir):
    paths = checkpoint_paths(out_dir)
    return paths[-1] if paths else None


def newest_intact_checkpoint(out_dir, keys=('model_config', 'meta'), file_keys=('model',)):
    """(path, its load_checkpoint_meta, [(newer path, why it is unreadable)]) of the newest checkpoint in
    out_dir that reads and holds `keys` (and `file_keys` if a single file); path None if none does. A
    checkpoint holding pickled objects is not 'unreadable': load_checkpoint_meta refuses it with fail()."""
    bad = []
    for path in reversed(checkpoint_paths(out_dir)):
        try:
            ckpt = load_checkpoint_meta(path)
            need = keys if os.path.isdir(path) else keys + file_keys
            missing = [k for k in need if not isinstance(ckpt, dict) or k not in ckpt]
            if missing:
                raise BadCheckpoint(f"{path} is not a train.py checkpoint (no {missing[0]!r})")
            return path, ckpt, bad
        except BadCheckpoint as e:
            bad.append((path, str(e)))
    return None, None, bad


class BadCheckpoint(Exception):
    """A checkpoint that cannot be read (truncated, overwritten, incomplete). The message is one line."""


def load_checkpoint_meta(path):
    """Everything but the tensors of a sharded checkpoint (config, iteration, data position, RNG), or
    the whole of a single-file one. Loaded with weights_only=True: only tensors and plain Python values,
    so a checkpoint cannot run code (a pickled object with a __reduce__ is refused before anything runs).
    A sharded checkpoint's DCP .metadata is read too (with an allowlist: read_dcp_metadata)."""
    if os.path.isdir(path):
        read_dcp_metadata(path)
    return safe_load(os.path.join(path, 'meta.pt') if os.path.isdir(path) else path, path)


def safe_load(f, ckpt_path, what=None):
    """torch.load(f, weights_only=True) with one-line errors: fail() for a file that holds pickled
    objects (refused unread), BadCheckpoint for one that is not a readable checkpoint. `what` names f
    in them when it is not a file of its own (a value inside a sharded checkpoint)."""
    try:
        return torch.load(f, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r'GLOBAL ([\w.]+)', str(e))
        if m and what:
            fail(f"refused to load {what}: it holds a pickled Python object ({m[1]}) that loading would run "
                 f"(nothing was run); train.py never saves such objects")
        if m:
            fail(f"refused to load {f}: it holds a pickled Python object ({m[1]}) that loading would run "
                 f"(nothing was run). Checkpoints written by train.py before 2026-12-06 hold their numpy RNG "
                 f"state so: if you trust this one, convert it once with "
                 f"python train.py --convert_trusted_checkpoint={ckpt_path}")
        raise BadCheckpoint(f"{what or f} is not a readable checkpoint ({first_line(e)})") from None
    except (FileNotFoundError, IsADirectoryError) as e:
        raise BadCheckpoint(f"{ckpt_path} is incomplete ({e.filename} missing)") from None
    except OSError as e:
        fail(f"cannot read {what or f}: {e.strerror}")
    except Exception as e:      # zip, EOF and unpickling errors of a truncated or overwritten file
        raise BadCheckpoint(f"{what or f} is not a readable checkpoint ({first_line(e)})") from None


def first_line(e):
    """'Type: first sentence of the message' of an exception (torch's are paragraphs)."""
    msg = str(e).strip().split('\n')[0].split('. ')[0]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def read_dcp_metadata(path):
    """The .metadata of a sharded checkpoint: a pickle of torch.distributed.checkpoint's own dataclasses,
    which DCP itself unpickles without restriction. Read here through an allowlist of exactly those
    classes (and torch.Size / dtypes / layouts / paths), so a crafted one is refused, not run."""
    import pathlib
    import torch.distributed.checkpoint.metadata as md
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    allowed = {('torch.distributed.checkpoint.metadata', n): getattr(md, n) for n in (
        'Metadata', 'MetadataIndex', 'StorageMeta', 'TensorProperties', 'TensorStorageMetadata',
        'ChunkStorageMetadata', 'BytesStorageMetadata', '_MEM_FORMAT_ENCODING')}
    allowed.update({('torch.distributed.checkpoint.filesystem', '_StorageInfo'): _StorageInfo,
                    ('torch', 'Size'): torch.Size, ('torch.serialization', '_get_layout'): torch.serialization._get_layout,
                    ('pathlib', 'PosixPath'): pathlib.PosixPath, ('pathlib', 'PurePosixPath'): pathlib.PurePosixPath})
    name = os.path.join(path, '.metadata')

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, cls):
            if (module, cls) in allowed:
                return allowed[module, cls]
            if module == 'torch' and isinstance(getattr(torch, cls, None), torch.dtype):
                return getattr(torch, cls)
            fail(f"refused to load {name}: it holds a pickled Python object ({module}.{cls}) that loading would "
                 f"run (nothing was run); torch.distributed.checkpoint does not write such objects")
    try:
        with open(name, 'rb') as f:
            meta = Unpickler(f).load()
    except FileNotFoundError:
        raise BadCheckpoint(f"{path} is incomplete ({name} missing)") from None
    except OSError as e:
        fail(f"cannot read {name}: {e.strerror}")
    except Exception as e:
        raise BadCheckpoint(f"{name} is not readable ({first_line(e)})") from None
    if not isinstance(meta, md.Metadata) or not isinstance(meta.state_dict_metadata, dict) or any(
            not isinstance(s, _StorageInfo) or os.path.basename(str(s.relative_path)) != str(s.relative_path)
            for s in (meta.storage_data or {}).values()):
        raise BadCheckpoint(f"{name} is not the metadata of a sharded checkpoint (or names files outside {path})")
    return meta


def load_sharded(state, path):
    """torch.distributed.checkpoint.load(state) from the sharded checkpoint `path`, with nothing unpickled
    in full: DCP's reader would unpickle .metadata and every non-tensor value (the optimizer's param
    groups) without restriction; here .metadata goes through read_dcp_metadata and the values through
    weights_only=True (DCP already reads the tensors so)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            meta = read_dcp_metadata(path)
            if getattr(meta, 'storage_meta', None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    class Planner(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            obj = safe_load(value, path, f"{read_item.dest_index.fqn} of {path}")
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj
    try:
        dcp.load(state, storage_reader=Reader(path), planner=Planner())
    except dcp.api.CheckpointException as e:   # every rank's failure, wrapped: report the first one's cause
        cause = e
        while getattr(cause, 'failures', None):
            cause = next(iter(cause.failures.values()))[0]
        if isinstance(cause, SystemExit):
            raise cause from None
        fail(f"cannot load the sharded checkpoint {path}: {first_line(cause)}")


def numpy_rng_plain(st):
    """np.random.get_state()'s tuple as plain values (its key is a numpy array: a pickled object)."""
    name, key, pos, has_gauss, gauss = st
    return {'bit_generator': str(name), 'key': torch.from_numpy(np.asarray(key, dtype=np.int64)), 'pos': int(pos),
            'has_gauss': int(has_gauss), 'cached_gaussian': float(gauss)}


def convert_checkpoint(path):
    """Rewrite a checkpoint written before 2026-12-06 (its numpy RNG state was a pickled numpy array)
    in the format load_checkpoint_meta reads with weights_only=True; for a sharded one, its meta.pt.
    This unpickles the file in full, which runs whatever objects it holds: only for a file you trust."""
    if not os.path.exists(path):
        fail(f"convert_trusted_checkpoint: {path} does not exist")
    f = os.path.join(path, 'meta.pt') if os.path.isdir(path) else path
    try:
        torch.load(f, map_location='cpu', weights_only=True)
        print(f"{f} already loads safely: nothing to convert")
        return
    except Exception:
        pass
    try:
        ckpt = torch.load(f, map_location='cpu', weights_only=False)
    except Exception as e:
        fail(f"cannot read {f}: {first_line(e)}")
    for st in ckpt.get('rng', []) if isinstance(ckpt, dict) else []:
        if isinstance(st, dict) and isinstance(st.get('numpy'), tuple):
            st['numpy'] = numpy_rng_plain(st['numpy'])
    tmp = f + '.tmp'
    torch.save(ckpt, tmp)
    try:
        torch.load(tmp, map_location='cpu', weights_only=True)
    except Exception as e:
        os.remove(tmp)
        m = re.search(r'GLOBAL ([\w.]+)', str(e))
        fail(f"cannot convert {f}: it holds {m[1] if m else 'objects'} besides the RNG state, which train.py never saves")
    os.replace(tmp, f)
    print(f"converted {f}: it now loads with weights_only=True")


def check_model_state(model, path, ckpt, what):
    """fail() naming the first tensor of checkpoint `path` whose name or shape does not fit `model` (built
    from `what`), instead of load_state_dict's many-line error. A sharded checkpoint's shapes come from
    its .metadata, without reading its tensors."""
    if os.path.isdir(path):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        have = {k[6:]: tuple(v.size) for k, v in read_dcp_metadata(path).state_dict_metadata.items()
                if k.startswith('model.') and isinstance(v, TensorStorageMetadata)}
    else:
        have = {k.removeprefix('_orig_mod.').removeprefix('module.'): tuple(v.shape) if torch.is_tensor(v) else None
                for k, v in ckpt['model'].items()}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    diffs = [f"{k} is missing" for k in want if k not in have] + \
            [f"{k} is not a tensor of the model" for k in have if k not in want] + \
            [f"{k} is {list(have[k]) if have[k] is not None else 'not a tensor'} in the checkpoint, {list(want[k])} "
             f"in the model" for k in want if k in have and have[k] != want[k]]
    if diffs:
        fail(f"checkpoint {path} does not match {what}: {diffs[0]}"
             + (f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ''))


def model_and_optim_state(model, optimizer, run, cfg, full=True):
    """Model and optimizer state keyed by parameter names (unwrapped, uncompiled), so a checkpoint
    resumes at any world size and under either parallelism. full: gathered whole tensors (on CPU under
    FSDP); else each rank's shards (DTensors), for torch.distributed.checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    fsdp = run['distributed'] and cfg['parallelism'] == 'fsdp'
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=full, cpu_offload=fsdp and full))


def load_model_and_optim_state(model, optimizer, path, ckpt, run, cfg):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    # a param group's 'fused' flag is restored with it: keep this run's (a CPU checkpoint resumed on a GPU)
    fused = [g.get('fused') for g in optimizer.param_groups]
    if os.path.isdir(path):    # sharded: DCP reshards to this run's layout (any world size, or none)
        m, o = model_and_optim_state(model, optimizer, run, cfg, full=False)
        state = {'model': m, 'optimizer': o}
        load_sharded(state, path)
        set_state_dict(model, optimizer, model_state_dict=state['model'], optim_state_dict=state['optimizer'])
    else:
        set_state_dict(model, optimizer, model_state_dict=ckpt['model'], optim_state_dict=ckpt['optimizer'],
                       options=StateDictOptions(full_state_dict=True))
    for g, f in zip(optimizer.param_groups, fused):
        if f is not None:
            g['fused'] = f


def save_checkpoint(path, state, keep):
    """Atomic: write a temp file in the same directory, fsync, rename. A crash mid-save leaves the
    previous checkpoints untouched and never a truncated ckpt_*.pt; a failed write (disk full) removes
    its temp file and stops with one line."""
    tmp, error = path + '.tmp', None
    try:
        torch.save(state, tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:      # torch.save's C++ writer raises RuntimeError
        error = e.with_traceback(None)         # the frames (of it and the error before it) hold the
        error.__context__ = error.__cause__ = None     # open file, whose space stays taken until closed
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if error is not None:
        gc.collect()
        if os.path.exists(tmp):
            os.remove(tmp)
        save_failed(path, error, state)
    os.replace(tmp, path)
    prune_checkpoints(os.path.dirname(path), keep)


def save_failed(path, e, state):
    """One line for a checkpoint write that failed (its temp file already removed); for a full disk, the
    directory and the bytes the checkpoint needs. torch.save reports a full disk as a RuntimeError
    ('unexpected pos ...'), so the free space decides too."""
    import shutil
    out_dir = os.path.dirname(path) or '.'
    need = sum(t.numel() * t.element_size() for t in tensors_in(state))
    free = shutil.disk_usage(out_dir).free
    if getattr(e, 'errno', None) == errno.ENOSPC or free < need:
        fail(f"no space left on the device of out_dir {out_dir}: checkpoint {os.path.basename(path)} needs about "
             f"{need:,} bytes, {free:,} are free. The partial file was removed and the previous checkpoints "
             f"are intact: free space, then --init_from=resume")
    fail(f"cannot write checkpoint {path}: {write_error(e)}")


def write_error(e):
    """What went wrong in a failed write, in a few words: OSError's strerror, or the one torch's C++ file
    writer puts inside its RuntimeError ('... open file failed with strerror: Permission denied')."""
    m = re.search(r'strerror: (.+)', str(e))
    return getattr(e, 'strerror', None) or (m[1].strip() if m else first_line(e))


def tensors_in(obj):
    """Every tensor in a nest of dicts / lists / tuples."""
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [t for x in obj for t in tensors_in(x)] if isinstance(obj, (list, tuple)) else []


def save_sharded_checkpoint(path, tensors, meta_state, run, keep):
    """Every rank writes its own shards with torch.distributed.checkpoint into path.tmp/; rank 0 adds
    meta.pt and renames the directory once all ranks are done, so a crash leaves no complete-looking
    partial checkpoint."""
    import shutil
    import torch.distributed.checkpoint as dcp
    tmp = path + '.tmp'
    if run['master'] and os.path.exists(tmp):       # a save that was killed earlier
        shutil.rmtree(tmp)
    if run['distributed']:
        dist.barrier()
    try:
        dcp.save(tensors, checkpoint_id=tmp)
        if run['master']:
            torch.save(meta_state, os.path.join(tmp, 'meta.pt'))
    except BaseException as e:       # DCP wraps every rank's failure: a full disk is an OSError inside
        cause = e
        while getattr(cause, 'failures', None):
            cause = next(iter(cause.failures.values()))[0]
        if run['master']:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(cause, (OSError, RuntimeError)):
            save_failed(path, cause, tensors)
        raise
    if run['master']:
        if os.path.isdir(path):      # the same iteration saved again: the new one wins
            shutil.rmtree(path)
        os.replace(tmp, path)
        prune_checkpoints(os.path.dirname(path), keep)


def prune_checkpoints(out_dir, keep):
    import shutil
    for old in checkpoint_paths(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


def rng_state(run):
    """This rank's RNG streams: CPU, numpy, and its own GPU's (only that one: a resume may see a
    different number of GPUs, and a CPU run should not touch CUDA). Tensors and plain values only."""
    st = {'torch': torch.get_rng_state(), 'numpy': numpy_rng_plain(np.random.get_state())}
    if run['device_type'] == 'cuda':
        st['cuda'] = torch.cuda.get_rng_state(run['device'])
    return st


def set_rng_state(st, run):
    torch.set_rng_state(st['torch'])
    n = st['numpy']
    np.random.set_state((n['bit_generator'], n['key'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    if run['device_type'] == 'cuda' and st.get('cuda') is not None:
        cuda = st['cuda']
        if isinstance(cuda, (list, tuple)):   # checkpoints before this change saved every visible GPU's
            i = torch.device(run['device']).index or 0
            cuda = cuda[i] if i < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, run['device'])


# ---- evaluation -------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, data_dir, cfg, run, autocast, core=None):
    """Mean CE on fixed windows spread evenly over each split (the same every eval), split over the
    ranks and averaged with all_reduce, so eval costs 1/world per rank."""
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
            w = 1.0 if len(chunk) else 0.0
            x, y = read_windows(path, dtype, chunk if len(chunk) else all_starts[:1], cfg['block_size'],
                                meta['vocab_size'])
            with autocast:
                o = model(x.to(run['device']), y.to(run['device']))
            tot += w * torch.stack([o.ce.double() * y.numel(), torch.tensor(y.numel(), device=run['device'])])
            if core is not None and 'depth_hist' in getattr(core, 'stats', {}):
                hist = hist + w * core.stats['depth_hist'].double() * y.numel()   # halting: tokens per depth
        if run['distributed']:
            dist.all_reduce(tot)
            if torch.is_tensor(hist):
                dist.all_reduce(hist)
        out[split] = (tot[0] / tot[1]).item()
        if torch.is_tensor(hist):
            out[f'{split}_depth_hist'] = hist.long().tolist()
    model.train()
    return out


# ---- the loop ---------------------------------------------------------------------------------

def train(cfg, run):
    """Train as configured, holding out_dir's lock (rank 0). However it ends (done, a signal, fail(), an
    exception), the lock is released and the SIGTERM/SIGINT handlers it installs are put back, so an
    in-process caller keeps its own."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    lock = lock_out_dir(cfg['out_dir']) if run['master'] else None
    on_exit = []                 # what _train set up and must be undone however it ends
    try:
        _train(cfg, run, on_exit)
    finally:
        for undo in on_exit:
            undo()
        for s, h in handlers.items():
            signal.signal(s, h)
        if lock:
            unlock_out_dir(*lock)


def watch_signals(master):
    """Python runs signal handlers only between bytecodes: while the main thread is inside one long torch
    op (a CPU backward of a paper-sized model takes minutes) on_signal waits for it. The C-level handler
    also writes each signal's number to a pipe (signal.set_wakeup_fd), which this thread reads at once:
    it says that the first SIGINT/SIGTERM was received, and a second Ctrl-C ends the process there and
    then, without a checkpoint. Returns the function that undoes it (None outside the main thread)."""
    import threading
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:           # not the main thread: on_signal alone
        os.close(r)
        os.close(w)
        return None

    def watch():
        seen = 0
        while data := os.read(r, 64):
            for signum in data:
                if signum not in (signal.SIGINT, signal.SIGTERM):
                    continue
                seen += 1
                if seen == 1 and master:
                    print(f"{signal.Signals(signum).name}: checkpointing at the end of this step, then exiting "
                          f"(Ctrl-C again: exit now, without a checkpoint)", flush=True)
                elif seen > 1 and signum == signal.SIGINT:
                    # a save cut short is only a ckpt_*.tmp, which the next start removes
                    print("interrupted twice: exiting without a checkpoint", file=sys.stderr, flush=True)
                    sys.stdout.flush()
                    os._exit(1)
        os.close(r)
    threading.Thread(target=watch, daemon=True).start()

    def undo():
        if w not in closed:
            signal.set_wakeup_fd(old)
            os.close(w)          # the thread reads the end of the pipe and stops
            closed.append(w)
    closed = []
    return undo


def lock_out_dir(out_dir):
    """Create out_dir and hold an exclusive flock on out_dir/train.lock for the run's life (the OS drops
    it when the process dies, however it dies), so a second train.py on the same out_dir refuses instead
    of mixing its checkpoints and log with this run's. Returns what unlock_out_dir needs."""
    import fcntl
    created = not os.path.isdir(out_dir)
    path = os.path.join(out_dir, 'train.lock')
    try:
        os.makedirs(out_dir, exist_ok=True)
        if not os.access(out_dir, os.W_OK):      # read-only filesystem or permissions
            raise PermissionError(errno.EACCES, 'not writable')
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        fail(f"cannot write to out_dir {out_dir}: {e.strerror or e}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = os.pread(fd, 20, 0).decode(errors='replace').strip() or '?'
        os.close(fd)
        fail(f"out_dir {out_dir} is in use by another train.py (pid {pid} holds {path}): wait for it to end "
             f"or stop it, or use another out_dir")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, out_dir, created


def unlock_out_dir(fd, out_dir, created):
    os.close(fd)                 # releases the flock
    try:                         # a run that stopped before writing anything leaves no out_dir behind
        if created and os.listdir(out_dir) == ['train.lock']:
            os.remove(os.path.join(out_dir, 'train.lock'))
            os.rmdir(out_dir)
    except OSError:
        pass


def claim_out_dir(cfg, run):
    """A from-scratch run: out_dir must not hold another run's checkpoints or log.jsonl (they would be
    mixed with this run's, and keep_last would prune the other run's checkpoints), unless
    overwrite=True, which deletes them (and its plots and unreadable checkpoints) first and says so."""
    out = cfg['out_dir']
    ckpts = checkpoint_paths(out)
    logged = os.path.exists(os.path.join(out, 'log.jsonl'))
    if (ckpts or logged) and not cfg['overwrite']:
        fail(f"out_dir {out} holds another run ({len(ckpts)} checkpoint(s){', log.jsonl' if logged else ''}): "
             f"continue it with --init_from=resume, choose another out_dir, or pass --overwrite=True to "
             f"delete its checkpoints and logs first")
    if run['distributed']:
        dist.barrier()           # every rank has looked before rank 0 deletes anything
    old = ckpts + [os.path.join(out, f) for f in sorted(os.listdir(out)) if f.endswith('.corrupt')
                   or f in ('log.jsonl', 'expert_usage.png', 'loss.png', 'depth_hist.png')] if ckpts or logged else []
    if old and run['master']:
        import shutil
        for p in old:
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        print(f"overwrite=True: deleted the previous run's {', '.join(os.path.basename(p) for p in old)} from {out}")


def _train(cfg, run, on_exit):
    master = run['master']
    if cfg['wandb_log'] and master:
        try:
            import wandb  # noqa: F401  (imported again where the run starts)
        except ImportError:
            fail("wandb_log=True but wandb is not installed: pip install wandb, or --wandb_log=False")
    torch.manual_seed(cfg['seed'] + run['rank'])
    data_dir = ensure_data(cfg, run)
    meta = load_meta(data_dir)
    accum_local = cfg['gradient_accumulation_steps'] // run['world']
    batches = Batches(os.path.join(data_dir, 'train.bin'), cfg['block_size'], cfg['batch_size'],
                      accum_local, run['rank'], run['world'], cfg['seed'])

    if master:                   # before anything reads or writes out_dir: killed saves take disk space
        remove_partial_saves(cfg['out_dir'])
    if run['distributed']:
        dist.barrier()
    ckpt = None
    if cfg['init_from'] == 'resume':
        path, ckpt, bad = newest_intact_checkpoint(cfg['out_dir'], ('config', 'model_config', 'meta', 'iter_num',
                                                                   'best_val_loss', 'data_pos', 'rng'),
                                                   ('model', 'optimizer'))
        if run['distributed']:
            dist.barrier()       # every rank has chosen before rank 0 renames the unreadable ones
        for p, why in bad:       # set aside, so they are neither resumed nor counted by keep_last
            if master:
                os.replace(p, p + '.corrupt')
                print(f"warning: {why}: renamed to {os.path.basename(p)}.corrupt"
                      + (f", resuming from {path}" if path else ''))
        if path is None:
            fail(f"init_from='resume' but no {'intact ' if bad else ''}checkpoint in {cfg['out_dir']}")
        old_batch = ckpt['config']['batch_size'] * ckpt['config']['gradient_accumulation_steps']
        if old_batch != cfg['batch_size'] * cfg['gradient_accumulation_steps']:
            fail(f"checkpoint {path} was trained with a global batch of {old_batch} sequences, this run has "
                 f"{cfg['batch_size'] * cfg['gradient_accumulation_steps']}: its data position would not carry over")
        for k in ('dataset', 'seed'):         # the data position counts windows of this stream
            if ckpt['config'].get(k) != cfg[k]:
                fail(f"checkpoint {path} was trained with {k}={ckpt['config'].get(k)!r}, config says {cfg[k]!r}: "
                     f"its data position would not carry over")
        if ckpt['model_config'].get('vocab_size') != meta['vocab_size']:
            fail(f"checkpoint {path} has vocab_size {ckpt['model_config'].get('vocab_size')}, {data_dir}/meta.json "
                 f"says {meta['vocab_size']}: was the dataset prepared again, with another tokenizer?")
        for k in asdict(ModelConfig()):       # the architecture must be the checkpoint's
            if k in cfg and k != 'vocab_size' and ckpt['config'].get(k) != cfg[k]:
                fail(f"checkpoint {path} has {k}={ckpt['config'].get(k)!r}, config says {cfg[k]!r}")
    elif cfg['init_from'] == 'scratch':
        claim_out_dir(cfg, run)
    else:
        fail(f"init_from must be 'scratch' or 'resume', got {cfg['init_from']!r}")

    torch.manual_seed(cfg['seed'])            # identical initial weights on every rank
    model, mcfg = build_model(cfg, run, meta['vocab_size'])
    wrapped = wrap_model(model, run, cfg)
    optimizer = make_optimizer(wrapped, cfg, run)
    iter_num, best_val, resumed_at, scaler_state = 0, float('inf'), -1, None
    if ckpt is not None:
        check_model_state(model, path, ckpt, 'the model its config describes')
        load_model_and_optim_state(wrapped, optimizer, path, ckpt, run, cfg)
        iter_num, best_val, batches.pos = ckpt['iter_num'], ckpt['best_val_loss'], ckpt['data_pos']
        resumed_at = iter_num if ckpt.get('evaluated', True) else -1   # see the eval below
        scaler_state = ckpt.get('scaler')
        set_rng_state(ckpt['rng'][run['rank']] if run['rank'] < len(ckpt['rng']) else ckpt['rng'][0], run)
        if master:
            print(f"resumed from {path} at iter {iter_num}")
            trim_log(cfg['out_dir'], iter_num)
        del ckpt
    else:
        torch.manual_seed(cfg['seed'] + run['rank'])   # dropout / expert-dropout streams differ per rank
    fwd = wrapped
    if cfg['compile'] and mcfg.halting != 'none':
        model.core.compile_layers()           # halting: per layer, dynamic shapes (see halting.py)
    elif cfg['compile']:
        fwd = torch.compile(wrapped)

    ptdtype = getattr(torch, run['dtype'])
    autocast = torch.autocast(run['device_type'], dtype=ptdtype) if run['dtype'] != 'float32' else nullcontext()
    scaler = torch.amp.GradScaler(run['device_type'], enabled=run['dtype'] == 'float16')
    if scaler_state and scaler.is_enabled():   # fp16 resume: keep the calibrated loss scale
        scaler.load_state_dict(scaler_state)
    tokens_per_step = cfg['batch_size'] * cfg['block_size'] * cfg['gradient_accumulation_steps']
    if master:
        print(describe(mcfg))
        print(f"{run['world']} process(es), {run['device']}, {run['dtype']}, {tokens_per_step} tokens/step")
    wandb = None
    if cfg['wandb_log'] and master:
        import wandb
        wandb.init(project=cfg['wandb_project'], name=cfg['wandb_run_name'], config=cfg)

    flops_step = 3 * flops_per_token(mcfg, cfg['block_size']) * tokens_per_step
    if master and run['device_type'] == 'cpu' and flops_step > 1e12:
        print(f"warning: {flops_step / 1e12:.1f} TFLOP per step is a GPU-sized configuration: on this CPU each "
              f"step takes minutes. Ctrl-C / SIGTERM are acknowledged at once but checkpoint only at the end of "
              f"the step; Ctrl-C twice exits at once, without a checkpoint")

    stop = {'signal': None}                  # SIGTERM/SIGINT: finish the step, checkpoint, exit 0
    unwatch = watch_signals(master)          # says so at once, and exits at once on a second Ctrl-C
    def on_signal(signum, frame):
        if signum == signal.SIGINT and stop['signal'] is not None and unwatch is None:
            # a second Ctrl-C means "now": skip the checkpoint. A save cut short is only a ckpt_*.tmp,
            # which the next start removes, so the last complete checkpoint stays the one to resume.
            raise SystemExit("interrupted twice: exiting without a checkpoint")
        stop['signal'] = signum
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    if unwatch:
        on_exit.append(unwatch)

    fmt = cfg['checkpoint_format']
    if fmt == 'auto':
        fmt = 'sharded' if run['distributed'] and cfg['parallelism'] == 'fsdp' else 'file'
    if fmt not in ('file', 'sharded'):
        fail(f"checkpoint_format must be 'auto', 'file' or 'sharded', got {fmt!r}")

    def checkpoint(evaluated=True):
        """evaluated: the eval of iter_num ran before this save (a resume does not repeat it)."""
        m_state, o_state = model_and_optim_state(wrapped, optimizer, run, cfg, full=fmt == 'file')
        rngs = [None] * run['world']
        if run['distributed']:
            dist.all_gather_object(rngs, rng_state(run))
        else:
            rngs = [rng_state(run)]
        state = {'config': cfg, 'model_config': asdict(mcfg), 'iter_num': iter_num, 'best_val_loss': best_val,
                 'data_pos': batches.pos, 'rng': rngs, 'meta': meta, 'evaluated': evaluated,
                 'scaler': scaler.state_dict() if scaler.is_enabled() else None}
        path = os.path.join(cfg['out_dir'], f'ckpt_{iter_num:07d}')
        if fmt == 'sharded':
            save_sharded_checkpoint(path, {'model': m_state, 'optimizer': o_state}, state, run, cfg['keep_last'])
        elif master:
            path += '.pt'
            save_checkpoint(path, {'model': m_state, 'optimizer': o_state, **state}, cfg['keep_last'])
        if master:
            print(f"saved {path}")
        if run['distributed']:
            dist.barrier()

    t0, bad_steps, losses, first_loss, last_loss = time.time(), 0, [], None, None
    last_routing = None
    last_log_t, last_log_it = t0, iter_num
    while True:
        at_resume = iter_num == resumed_at      # that eval (and its checkpoint) happened before the save
        if (iter_num % cfg['eval_interval'] == 0 or iter_num == cfg['max_iters'] or cfg['eval_only']) \
                and not (at_resume and not cfg['eval_only']):
            ev = evaluate(fwd, data_dir, cfg, run, autocast, model.core)
            if master:
                print(f"eval {iter_num}: train {ev['train']:.4f}, val {ev['val']:.4f}, "
                      f"val ppl {math.exp(min(ev['val'], 30)):.2f}")
                if 'val_depth_hist' in ev:
                    h = ev['val_depth_hist']
                    mean = sum(d * n for d, n in enumerate(h)) / max(1, sum(h))
                    print(f"eval {iter_num}: val depth mean {mean:.2f}, tokens per depth 0..R {h}")
                    append_log(cfg['out_dir'], {'iter': iter_num, 'val/depth_hist': h, 'val/mean_depth': mean})
                append_log(cfg['out_dir'], {'iter': iter_num, 'val/loss': ev['val'], 'train/eval_loss': ev['train']})
                if wandb:
                    wandb.log({'iter': iter_num, 'val/loss': ev['val'], 'train/eval_loss': ev['train']})
            if master and cfg['diagnostics']:
                write_plots(cfg['out_dir'], last_routing, ev.get('val_depth_hist'), wandb)
            if cfg['eval_only']:
                break
            improved = ev['val'] < best_val
            best_val = min(best_val, ev['val'])
            if iter_num > 0 and (improved or cfg['always_save_checkpoint']):
                checkpoint()
        if iter_num >= cfg['max_iters']:
            break

        lr = lr_at(iter_num, cfg)
        for g in optimizer.param_groups:
            g['lr'] = lr
        micro = batches.next_step(cfg['overfit_batch'])
        if cfg['overfit_batch'] and iter_num == 0 and master:
            show_example(micro[0], meta)
        for i, (x, y) in enumerate(micro):
            last = i == len(micro) - 1
            if run['distributed']:    # all-reduce gradients only on the last micro-step
                if cfg['parallelism'] == 'ddp':
                    wrapped.require_backward_grad_sync = last
                else:
                    wrapped.set_requires_gradient_sync(last)
            x, y = x.to(run['device'], non_blocking=True), y.to(run['device'], non_blocking=True)
            with autocast:
                out = fwd(x, y)
            scaler.scale(out.loss / len(micro)).backward()
            losses.append(torch.stack([out.loss.detach(), out.reg_loss.detach(),
                                       *halting_stats(model.core)]).float())
        scaler.unscale_(optimizer)
        # on every rank: under FSDP the grad norms are collectives (printing stays on rank 0)
        log_now = (iter_num + 1) % cfg['log_interval'] == 0 and cfg['diagnostics']
        if log_now:     # before clipping: what the loss asked for, per parameter group
            diag = {**grad_norms(model), **logit_stats(out.logits)}
        norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg['grad_clip'] or float('inf'))
        if scaler.is_enabled():     # fp16: GradScaler skips overflowing steps itself (expected while it calibrates)
            scaler.step(optimizer)
            finite = torch.isfinite(out.loss.detach()).float()
            if run['distributed']:  # one verdict for all ranks, so the fail() below fires on every one
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            bad = not bool(finite)
        else:                       # one small sync per step buys safety against a poisoned update
            bad = not bool(torch.isfinite(norm))
            if not bad:
                optimizer.step()
        if not bad:
            bad_steps = 0
        else:
            bad_steps += 1
            if master:
                print(f"warning: non-finite loss/grad at iter {iter_num}, step skipped ({bad_steps} in a row)")
            if bad_steps >= cfg['max_bad_steps']:
                fail(f"{bad_steps} non-finite steps in a row at iter {iter_num}: lower learning_rate, "
                     f"check the data, or use bfloat16 instead of float16")
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1

        if iter_num % cfg['log_interval'] == 0 and run['distributed']:   # the global batch's loss, not rank 0's
            mean = torch.stack(losses).mean(0, keepdim=True)
            dist.all_reduce(mean)
            losses[:] = [mean[0] / run['world']]
        if iter_num % cfg['log_interval'] == 0 and master:
            lv = torch.stack(losses).mean(0).tolist()
            first_loss = lv[0] if first_loss is None else first_loss
            last_loss = lv[0]
            losses.clear()
            dt = (time.time() - last_log_t) / max(1, iter_num - last_log_it)
            last_log_t, last_log_it = time.time(), iter_num
            tps = tokens_per_step / dt
            eta = (cfg['max_iters'] - iter_num) * dt
            extra = f", depth {lv[2]:.2f}, ACT N+R / MoR aux {lv[3]:.4f}" if len(lv) > 2 else ''
            if run['device_type'] == 'cuda':
                extra += f", peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            reg = 'reg+halt' if len(lv) > 2 else 'reg'     # halting cores add ponder/aux into their loss term
            print(f"iter {iter_num}: loss {lv[0]:.4f}, {reg} {lv[1]:.4f}{extra}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                  f"{tps:,.0f} tok/s, {flops_step / dt / 1e12:.2f} TFLOP/s, ETA {eta / 60:.1f} min")
            record = {'iter': iter_num, 'train/loss': lv[0], 'train/reg_loss': lv[1], 'lr': lr,
                      'tokens_per_s': tps}
            if len(lv) > 2:
                record.update({'train/mean_depth': lv[2], 'train/ponder_aux': lv[3]})
            if cfg['diagnostics']:
                routing = routing_report(model)
                record.update({k: round(v, 4) for k, v in diag.items()})
                record.update(routing_summary(routing))
                last_routing = routing
                if iter_num % cfg['eval_interval'] == 0:      # the console gets them per eval; log.jsonl always
                    print('       ' + ', '.join(f"{k} {v:.3g}" for k, v in record.items()
                                                if k.startswith(('grad/', 'logits/', 'dead/', 'balance/'))))
            append_log(cfg['out_dir'], record)
            if wandb:
                wandb.log(record)
        elif iter_num % cfg['log_interval'] == 0:
            losses.clear()
            routing_report(model)          # keep every rank's counters to one interval

        stopping = stop['signal'] is not None
        if run['distributed']:       # stop together: one rank's signal stops all
            flag = torch.tensor(int(stopping), device=run['device'])
            dist.all_reduce(flag)
            stopping = bool(flag.item())
        if stopping:
            if master:
                print(f"signal received: checkpointing at iter {iter_num} and exiting")
            checkpoint(evaluated=False)
            break
    for s, h in handlers.items():    # the loop is over: signals act as before it (train() also restores
        signal.signal(s, h)          # them when this function fails)
    if unwatch:
        unwatch()
    if wandb:
        wandb.finish()
    if cfg['overfit_batch'] and master and first_loss is not None:
        final = torch.stack(losses).mean(0)[0].item() if losses else last_loss
        if final is not None and final > 0.1 * first_loss:
            print(f"hint: the batch was not overfit (loss {first_loss:.3f} -> {final:.3f}). Try a higher "
                  f"learning_rate or more max_iters, grad_clip=0, warmup_iters=0, entropy_reg=0")


# ---- diagnostics (cheap: computed only at log time) -------------------------------------------

def grad_norms(model):
    """L2 norm of the gradient of each parameter group (before clipping)."""
    groups = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = ('embedding' if 'embedding' in name else 'lm_head' if 'lm_head' in name
             else 'router' if name.endswith(('expert_sel', 'sel_v', 'sel_o')) or '.halt' in name or '.router' in name
             else 'norm' if '.ln' in name or 'norm' in name
             else 'ffn' if '.ffn.' in name or '.fc' in name else 'attention' if 'att' in name
             else 'other')
        groups[g] = groups.get(g, 0) + p.grad.detach().float().pow(2).sum()
    return {f'grad/{k}': v.sqrt().item() for k, v in groups.items()}


@torch.no_grad()
def logit_stats(logits):
    """Largest |logit| and the mean entropy (nats) of the predictive distribution: collapsing or
    exploding logits show up here before the loss does."""
    lp = torch.log_softmax(logits.float(), -1)
    return {'logits/max_abs': logits.abs().max().item(), 'logits/entropy': -(lp.exp() * lp).sum(-1).mean().item()}


def routing_summary(report):
    """Scalars of routing_report: dead experts and usage balance (entropy / max) per bank."""
    out = {}
    for key, r in report.items():
        out[f'dead/{key}'] = r['dead']
        out[f'balance/{key}'] = round(r['entropy_ratio'], 4)
    return out


_NO_PLOTS_SAID = []


def write_plots(out_dir, routing, depth_hist, wandb=None):
    """PNGs in out_dir: expert usage heatmap (bank x expert), loss curves, depth histogram.
    matplotlib is optional: without it, nothing is drawn (said once per process)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        if not _NO_PLOTS_SAID:
            _NO_PLOTS_SAID.append(True)
            print("note: no plots (matplotlib is not installed); the diagnostics are in log.jsonl")
        return
    import json
    written = []
    if routing:
        keys = [k for k in routing if k.startswith('ff')] + [k for k in routing if not k.startswith('ff')]
        width = max(len(routing[k]['usage']) for k in keys)
        grid = np.full((len(keys), width), np.nan)
        for i, k in enumerate(keys):
            u = routing[k]['usage'].numpy()
            grid[i, :len(u)] = u * len(u)           # 1 = its fair share
        fig, ax = plt.subplots(figsize=(10, 0.4 * len(keys) + 1.5))
        im = ax.imshow(grid, aspect='auto', cmap='viridis', interpolation='nearest')
        ax.set_yticks(range(len(keys)), keys)
        ax.set_xlabel('expert')
        ax.set_title('routed slots / fair share, last log interval (0 = dead expert)')
        fig.colorbar(im)
        written.append(_save(fig, out_dir, 'expert_usage.png', plt))
    log_path = os.path.join(out_dir, 'log.jsonl')
    if os.path.exists(log_path):
        with open(log_path) as f:
            recs = [json.loads(line) for line in f]
        tr = [(r['iter'], r['train/loss']) for r in recs if 'train/loss' in r]
        va = [(r['iter'], r['val/loss']) for r in recs if 'val/loss' in r]
        if tr:
            fig, ax = plt.subplots(figsize=(7, 4))
            ax.plot(*zip(*tr), label='train (ce + reg)')
            if va:
                ax.plot(*zip(*va), 'o-', label='val ce')
            ax.set_xlabel('iter')
            ax.set_ylabel('loss')
            ax.legend()
            written.append(_save(fig, out_dir, 'loss.png', plt))
    if depth_hist:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(range(len(depth_hist)), depth_hist)
        ax.set_xlabel('steps through the shared group')
        ax.set_ylabel('val tokens')
        written.append(_save(fig, out_dir, 'depth_hist.png', plt))
    if wandb:
        wandb.log({os.path.basename(w)[:-4]: wandb.Image(w) for w in written})


def _save(fig, out_dir, name, plt):
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path + '.tmp.png', dpi=90)      # atomic, like every other file we write
    os.replace(path + '.tmp.png', path)
    plt.close(fig)
    return path


def halting_stats(core):
    """(mean depth, ponder or aux loss) of the last forward of a halting core; () for plain models.
    Detached tensors, read only at log time: no GPU sync per step."""
    st = getattr(core, 'stats', None)
    if not st or 'mean_depth' not in st:
        return ()
    aux = st.get('ponder', st.get('aux'))
    return st['mean_depth'].float(), (aux if aux is not None else st['mean_depth'] * 0).float()


def show_example(xy, meta):
    """Print the first input/target pair decoded, so an off-by-one in the data slicing is visible."""
    import prepare
    enc = prepare.get_tokenizer(meta['tokenizer'])
    x, y = xy
    print(f"input : {enc.decode(x[0, :64].tolist())!r}")
    print(f"target: {enc.decode(y[0, :64].tolist())!r}")


def trim_log(out_dir, iter_num):
    """On resume: drop the log.jsonl records written after the checkpoint, which the resumed run logs
    again (rewritten to a temp file, then renamed)."""
    import json
    path = os.path.join(out_dir, 'log.jsonl')
    if not os.path.exists(path):
        return
    def keep(line):
        try:
            return json.loads(line).get('iter', 0) <= iter_num
        except ValueError:      # a line cut short when the run was killed
            return False
    with open(path) as f:
        lines = [line if line.endswith('\n') else line + '\n' for line in f if line.strip() and keep(line)]
    try:
        with open(path + '.tmp', 'w') as f:
            f.writelines(lines)
    except OSError as e:
        os.remove(path + '.tmp')
        fail(f"cannot write {path}.tmp: {e.strerror} (log.jsonl is unchanged)")
    os.replace(path + '.tmp', path)


def append_log(out_dir, record):
    """One JSON line per log interval in out_dir/log.jsonl (machine-readable loss curve)."""
    import json
    path = os.path.join(out_dir, 'log.jsonl')
    try:
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')
    except OSError as e:
        fail(f"cannot write {path}: {e.strerror}")


if __name__ == '__main__':
    main()

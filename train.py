"""
Train MoEUT (or the dense baseline). One file, nanoGPT style: the config is the globals below,
overridden by config files and --key=value (configurator.py).

    python train.py                                     # tiny default on CPU (prepares data first)
    python train.py config/moeut_126m.py --batch_size=16
    torchrun --standalone --nproc_per_node=8 train.py config/moeut_126m.py
    torchrun --nnodes=2 --node_rank=0 --rdzv_endpoint=HOST:29500 --nproc_per_node=8 train.py ...

Under torchrun, parallelism='ddp' wraps the model in DistributedDataParallel (from 2 processes on) and
'fsdp' shards it with FSDP2 (fully_shard). total_batch_size is the GLOBAL batch (sequences per optimizer
step) and batch_size the largest micro-batch per process; the gradient accumulation follows
(data.batch_plan), so a config means the same training at any world size.
"""
import gc
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import torch
import torch.distributed as dist

from checkpoint import (append_log, check_model_state, claim_out_dir, convert_checkpoint,
                        load_model_and_optim_state, lock_out_dir, remove_partial_saves, resume_checkpoint,
                        save_training_state, set_rng_state, trim_log, unlock_out_dir)
from configurator import configure, config_keys, fail
from data import batch_plan, describe_data, ensure_data, evaluate, evaluate_sources, load_meta, make_batches
from diagnostics import diagnostics_record, grad_norms, halting_stats, logit_stats, show_example
from halting import build_lm, set_depth
from model import ModelConfig, describe, distinct_layers, flops_per_token, routing_report, update_balance_bias
from muon import ExpertMuon, make_optimizer  # noqa: F401  (ExpertMuon: train.ExpertMuon, as before)
from plot import write_plots
from signals import stop_on_signals

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
init_from = 'scratch'           # 'scratch', 'resume' (latest checkpoint in out_dir), or 'hf:DIR' (an hf.py export's weights)
export_hf = ''                  # a directory: when training ends, export the last checkpoint there (hf.py)
overwrite = False               # scratch into an out_dir holding another run: delete its checkpoints and logs first
convert_trusted_checkpoint = '' # a checkpoint path: rewrite a pre-2026-12-06 checkpoint so it loads safely, then exit
                                # (unpickles it in full, which runs whatever it holds: only for a file you trust)
wandb_log = False
wandb_project = 'nanomoeut'
wandb_run_name = 'run'
diagnostics = True              # routing/grad/logit diagnostics at log time, PNG plots at eval (matplotlib)
# data
dataset = 'shakespeare_bytes'   # data/<dataset>/{train,val}.bin, made by prepare.py; or a weighted mixture of
                                # several, 'fineweb:0.7,code:0.3' (docs/data.md)
total_batch_size = 0            # sequences per optimizer step, over all processes; 0 = batch_size x
                                # gradient_accumulation_steps (how configs before 2026-12-06 said it)
batch_size = 16                 # the largest micro-batch per process (GPU memory); accumulation makes up the rest
block_size = 256
gradient_accumulation_steps = 1  # only with total_batch_size=0: global micro-batches of batch_size per step
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
n_repeats = 0                   # eval with this many repeats of the shared group (0 = as trained; ACT: the cap)
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
compile_mode = ''               # with compile=True: '' (torch.compile's default) or 'reduce-overhead' (CUDA graphs: no
                                # host launch cost; pays where the host, not the GPU, bounds the step: see README;
                                # one process, no gradient accumulation)
activation_checkpointing = False  # recompute each shared-layer application in backward: less memory, ~1/3 more compute
cpu_threads = 0                 # CPU runs: torch threads per process; 0 = auto (the cores other processes leave
                                # idle, by the load average: extra threads on busy cores thrash, see README)
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
    if cfg['export_hf'] and run['master']:
        from hf import export_checkpoint
        print(f"exported {export_checkpoint(cfg['out_dir'], cfg['export_hf'])} -> {cfg['export_hf']}")


# ---- distributed / device ---------------------------------------------------------------------

def set_current_cuda_device(dev):
    """Make CUDA device `dev` ('cuda', 'cuda:1') the current one: Triton kernels and CUDA graphs run on
    the current device, whatever device their tensors name. Used by sample.py too."""
    index = torch.device(dev).index or 0
    if index >= torch.cuda.device_count():
        fail(f"device={dev!r} but this process sees {torch.cuda.device_count()} GPU(s)")
    torch.cuda.set_device(index)


# the torch.compile modes train.py offers: the default, and 'reduce-overhead', which replays the step as CUDA graphs
COMPILE_MODES = ('', 'reduce-overhead')


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
    for k in ('total_batch_size', 'max_iters', 'warmup_iters', 'lr_decay_iters', 'keep_last'):
        if not isinstance(cfg[k], int) or cfg[k] < 0:
            fail(f"{k} must be an integer >= 0, got {cfg[k]!r}")
    # the optimizers reject some of these with a traceback, others (a negative min_lr) not at all
    for k, ok, want in (('learning_rate', lambda v: v > 0, '> 0'), ('min_lr', lambda v: v >= 0, '>= 0'),
                        ('weight_decay', lambda v: v >= 0, '>= 0'), ('grad_clip', lambda v: v >= 0, '>= 0'),
                        ('beta1', lambda v: 0 <= v < 1, 'in [0, 1)'), ('beta2', lambda v: 0 <= v < 1, 'in [0, 1)')):
        if not math.isfinite(cfg[k]) or not ok(cfg[k]):
            fail(f"{k} must be {want}, got {cfg[k]!r}")
    if cfg['compile_mode'] not in COMPILE_MODES:
        fail(f"compile_mode must be one of {', '.join(map(repr, COMPILE_MODES))}, got {cfg['compile_mode']!r}")
    if cfg['compile_mode'] and not cfg['compile']:
        fail(f"compile_mode={cfg['compile_mode']!r} needs compile=True")
    if cfg['checkpoint_format'] not in ('auto', 'file', 'sharded'):
        fail(f"checkpoint_format must be 'auto', 'file' or 'sharded', got {cfg['checkpoint_format']!r}")
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
    else:
        set_cpu_threads(cfg, int(os.environ.get('LOCAL_WORLD_SIZE', 1)), rank == 0)
    if distributed:
        dist.init_process_group(backend='nccl' if dev.startswith('cuda') else 'gloo')
        if cfg['parallelism'] not in ('ddp', 'fsdp'):
            fail(f"parallelism must be 'ddp' or 'fsdp', got {cfg['parallelism']!r}")
    dt = cfg['dtype']
    if dt == 'auto':
        dt = 'bfloat16' if dev.startswith('cuda') else 'float32'
    if dt not in ('float32', 'bfloat16', 'float16'):
        fail(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dt!r}")
    return dict(distributed=distributed, rank=rank, world=world, device=dev, dtype=dt,
                master=rank == 0, device_type='cuda' if dev.startswith('cuda') else 'cpu')


def set_cpu_threads(cfg, local_world, say):
    """torch's CPU threads for this process: cpu_threads if set, else OMP_NUM_THREADS if set (torchrun sets
    1), else this process's share of the cores that the 1-minute load average says are idle."""
    if not isinstance(cfg['cpu_threads'], int) or cfg['cpu_threads'] < 0:
        fail(f"cpu_threads must be an integer >= 0, got {cfg['cpu_threads']!r}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    if cfg['cpu_threads']:
        n, why = cfg['cpu_threads'], 'cpu_threads'
    elif os.environ.get('OMP_NUM_THREADS'):
        n, why = torch.get_num_threads(), 'OMP_NUM_THREADS'
    else:
        load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else 0.0
        n = max(1, min(cores - round(load), cores) // local_world)
        why = f"auto: {cores} cores, load average {load:.1f}; set cpu_threads to choose"
    torch.set_num_threads(n)
    if say:
        print(f"cpu threads per process: {n} ({why})")


# ---- model / optimizer ------------------------------------------------------------------------

def build_model(cfg, run, vocab_size):
    try:
        mcfg = ModelConfig.from_dict({**cfg, 'vocab_size': vocab_size})
    except (ValueError, TypeError) as e:
        fail(str(e))
    if cfg['compile'] and mcfg.halting_core and run['distributed'] and cfg['parallelism'] == 'fsdp':
        fail("compile=True for a halting model (compiled per layer, or whole for MoR expert-choice) has not "
             "been tested under FSDP: use parallelism='ddp' or compile=False")
    try:            # some checks live in the modules (halting.py): their ValueError is a config error too
        model = set_depth(build_lm(mcfg), n_repeats=cfg['n_repeats']).to(run['device'])
    except ValueError as e:
        fail(str(e))
    if cfg['compile_mode'] == 'reduce-overhead' and mcfg.halting_core and not mcfg.halt_buckets \
            and not model.core.one_graph():
        fail("compile_mode='reduce-overhead' for a halting model needs halt_buckets: without it the active "
             "rows change shape every step, and CUDA graphs would record every shape anew")
    return model, mcfg


def wrap_model(model, run, cfg):
    """DDP or FSDP2 under torchrun (DDP only past one process); plain module otherwise. Returns the module
    to call."""
    if not run['distributed']:
        return model
    if cfg['parallelism'] == 'ddp' and run['world'] == 1:
        # nothing to synchronise, and torch.compile splits a DDP module's graph at every gradient bucket
        # (docs/results.md: MoEUT-126M's shipped config, 381 -> 352 ms/step, on two different H100s)
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


def lr_at(it, cfg):
    """Linear warmup, then cosine from learning_rate to min_lr at lr_decay_iters, then min_lr."""
    if it < cfg['warmup_iters']:
        return cfg['learning_rate'] * (it + 1) / (cfg['warmup_iters'] + 1)
    if it >= cfg['lr_decay_iters']:
        return cfg['min_lr']
    ratio = (it - cfg['warmup_iters']) / max(1, cfg['lr_decay_iters'] - cfg['warmup_iters'])
    return cfg['min_lr'] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg['learning_rate'] - cfg['min_lr'])


# ---- the loop ---------------------------------------------------------------------------------

def train(cfg, run):
    """Train as configured, holding out_dir's lock (rank 0). However it ends (done, a signal, fail(), an
    exception), the lock is released and the SIGTERM/SIGINT handlers it installs are put back, so an
    in-process caller keeps its own."""
    lock = lock_out_dir(cfg['out_dir']) if run['master'] else None
    on_exit = []                 # what _train set up and must be undone however it ends
    try:
        _train(cfg, run, on_exit)
    finally:
        for undo in on_exit:
            undo()
        if lock:
            unlock_out_dir(*lock)


def _train(cfg, run, on_exit):
    master = run['master']
    if cfg['wandb_log'] and master:
        try:
            import wandb  # noqa: F401  (imported again where the run starts)
        except ImportError:
            fail("wandb_log=True but wandb is not installed: pip install wandb, or --wandb_log=False")
    total, micro, accum = batch_plan(cfg, run['world'])
    if cfg['compile_mode'] == 'reduce-overhead' and (accum > 1 or run['world'] > 1):
        # the first micro-batch's gradients would stay in graph memory that the next micro-batch's backward
        # overwrites (pytorch/pytorch#96693); under DDP/FSDP the mode has not been tested
        fail(f"compile_mode='reduce-overhead' takes one micro-batch per step in one process, here {accum} "
             f"micro-batch(es) x {run['world']} process(es): set total_batch_size={total} batch_size={total} "
             f"(the global batch as one micro-batch), or compile_mode=''")
    torch.manual_seed(cfg['seed'] + run['rank'])
    sources = ensure_data(cfg, run)          # [(name, data_dir, weight)]: one dataset, or a mixture's
    data_dir = sources[0][1]
    meta = load_meta(data_dir)               # a mixture's datasets share its tokenizer
    batches = make_batches(cfg, sources, micro, accum, run)

    if master:                   # before anything reads or writes out_dir: killed saves take disk space
        remove_partial_saves(cfg['out_dir'])
    if run['distributed']:
        dist.barrier()
    path, ckpt = None, None
    if cfg['init_from'] == 'resume':
        path, ckpt = resume_checkpoint(cfg, run, meta, data_dir)
    elif cfg['init_from'] != 'scratch' and not cfg['init_from'].startswith('hf:'):
        fail(f"init_from must be 'scratch', 'resume' or 'hf:DIR', got {cfg['init_from']!r}")
    else:
        claim_out_dir(cfg, run)             # a new run (from an export's weights, too)

    torch.manual_seed(cfg['seed'])            # identical initial weights on every rank
    model, mcfg = build_model(cfg, run, meta['vocab_size'])
    if cfg['activation_checkpointing']:
        if type(model.core).__name__ != 'MoEUT':
            fail("activation_checkpointing=True is implemented for MoEUT without halting (model_type='moeut', "
                 "halting='none')")
        model.core.activation_checkpointing = True
    if cfg['init_from'].startswith('hf:'):
        from hf import init_from_hf
        init_from_hf(model, cfg['init_from'][3:])
    wrapped = wrap_model(model, run, cfg)
    optimizer = make_optimizer(wrapped, cfg, run)
    iter_num, best_val, resumed_at, scaler_state = 0, float('inf'), -1, None
    if ckpt is not None:
        check_model_state(model, path, ckpt, 'the model its config describes')
        load_model_and_optim_state(wrapped, optimizer, path, ckpt, run, cfg)
        iter_num, best_val = ckpt['iter_num'], ckpt['best_val_loss']
        batches.load_state(ckpt, path)
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
    mode = {'mode': cfg['compile_mode']} if cfg['compile_mode'] else {}
    whole = cfg['compile'] and hasattr(model.core, 'one_graph') and model.core.one_graph()
    if cfg['compile'] and hasattr(model.core, 'compile_layers') and not whole:
        model.core.compile_layers(**mode)     # per layer: halting.HaltingMoEUT.compile_layers says which shapes
    elif cfg['compile']:
        # static shapes: a second batch size would otherwise make dynamo mark it dynamic, and every later
        # graph, the training step's too, would compile for symbolic shapes. An eval's short last batch
        # (63 windows in Shakespeare's val split) did that: MoEUT-44M's first training step, compiled so on
        # an H100 on 2026-12-07, had not finished after 6 minutes. data.evaluate(pad=True) now fills that
        # batch, so one eval graph serves every eval.
        fwd = torch.compile(wrapped, dynamic=False, **mode)
    # a model compiled whole whose eval keeps a data-dependent number of tokens (MoR's causal threshold)
    # evaluates eagerly: compile_layers beside the whole graph would compile every layer a second time,
    # for dynamic shapes (an eval is forward-only, every eval_interval steps)
    eval_fwd = wrapped if whole and not model.core.one_graph(training=False) else fwd
    graphs = cfg['compile_mode'] == 'reduce-overhead'
    # the evals of a model compiled for static shapes run full batches (evaluate's pad): every compiled model
    # without halting (the whole model, or compile_layers' layers of a loop without halting), and a MoR model
    # whose eval is compiled whole too (mor_causal_eval=False)
    pad_evals = cfg['compile'] and (mcfg.halting == 'none' or (whole and eval_fwd is fwd))

    ptdtype = getattr(torch, run['dtype'])
    autocast = torch.autocast(run['device_type'], dtype=ptdtype) if run['dtype'] != 'float32' else nullcontext()
    scaler = torch.amp.GradScaler(run['device_type'], enabled=run['dtype'] == 'float16')
    if scaler_state and scaler.is_enabled():   # fp16 resume: keep the calibrated loss scale
        scaler.load_state_dict(scaler_state)
    tokens_per_step = total * cfg['block_size']
    if master:
        print(describe(mcfg))
        print(describe_data(cfg, sources, total))
        how = '' if wrapped is model and not (run['distributed'] and cfg['parallelism'] == 'fsdp') else \
            f" ({cfg['parallelism'].upper()})"
        print(f"{run['world']} process(es){how}, {run['device']}, {run['dtype']}, {total} sequences/step = {micro} "
              f"per micro-batch x {accum} accumulation x {run['world']} process(es), {tokens_per_step} tokens/step")
    wandb = None
    if cfg['wandb_log'] and master:
        import wandb
        wandb.init(project=cfg['wandb_project'], name=cfg['wandb_run_name'], config=cfg)

    flops_step = 3 * flops_per_token(mcfg, cfg['block_size']) * tokens_per_step
    if master and run['device_type'] == 'cpu' and flops_step > 1e12:
        print(f"warning: {flops_step / 1e12:.1f} TFLOP per step is a GPU-sized configuration: on this CPU each "
              f"step takes minutes. Ctrl-C / SIGTERM are acknowledged at once but checkpoint only at the end of "
              f"the step; Ctrl-C twice exits at once, without a checkpoint")

    stop, restore_signals = stop_on_signals(master, on_exit)   # SIGTERM/SIGINT: finish the step, checkpoint, exit

    def checkpoint(evaluated=True):
        """evaluated: the eval of iter_num ran before this save (a resume does not repeat it)."""
        save_training_state(wrapped, optimizer, run, cfg, {
            'config': cfg, 'model_config': asdict(mcfg), 'iter_num': iter_num, 'best_val_loss': best_val,
            **batches.state(), 'meta': meta, 'evaluated': evaluated,
            'scaler': scaler.state_dict() if scaler.is_enabled() else None})

    t0, bad_steps, losses, first_loss, last_loss = time.time(), 0, [], None, None
    verdicts = []      # (iter, skipped: a 0-dim bool tensor, already known on the host)
    last_flag = None   # the previous step's stop flag, summed over ranks
    last_routing = None
    last_log_t, last_log_it = t0, iter_num
    compile_t0, first_iter = None, iter_num  # the first forward compiles (~1 min for MoEUT-126M on an H100): say so
    while True:
        if cfg['compile'] and compile_t0 is None:
            compile_t0 = time.time()
            if master:
                print("compiling the model (first step)...", flush=True)
        at_resume = iter_num == resumed_at      # that eval (and its checkpoint) happened before the save
        if (iter_num % cfg['eval_interval'] == 0 or iter_num == cfg['max_iters'] or cfg['eval_only']) \
                and not (at_resume and not cfg['eval_only']):
            ev = evaluate_sources(cfg, sources, lambda d: evaluate(eval_fwd, d, cfg, run, autocast, model.core,
                                                                   pad=pad_evals))
            per_source = {k: v for k, v in ev.items() if k.startswith('val/')}    # a mixture's
            if master:
                print(f"eval {iter_num}: train {ev['train']:.4f}, val {ev['val']:.4f}, val ppl "
                      f"{math.exp(min(ev['val'], 30)):.2f}" + ''.join(f", {k} {v:.4f}" for k, v in per_source.items()))
                if 'val_depth_hist' in ev:
                    h = ev['val_depth_hist']
                    mean = sum(d * n for d, n in enumerate(h)) / max(1, sum(h))
                    print(f"eval {iter_num}: val depth mean {mean:.2f}, tokens per depth 0..R {h}")
                    append_log(cfg['out_dir'], {'iter': iter_num, 'val/depth_hist': h, 'val/mean_depth': mean})
                record = {'iter': iter_num, 'val/loss': ev['val'], 'train/eval_loss': ev['train'], **per_source}
                append_log(cfg['out_dir'], record)
                if wandb:
                    wandb.log(record)
            if master and cfg['diagnostics']:
                write_plots(cfg['out_dir'], last_routing, ev.get('val_depth_hist'), wandb, mcfg.n_heads)
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
                if cfg['parallelism'] == 'fsdp':
                    wrapped.set_requires_gradient_sync(last)
                elif wrapped is not model:   # DDP (a single process runs unwrapped: wrap_model)
                    wrapped.require_backward_grad_sync = last
            x, y = x.to(run['device'], non_blocking=True), y.to(run['device'], non_blocking=True)
            if graphs:   # a new iteration: the graphs may reuse the memory of what they returned before
                torch.compiler.cudagraph_mark_step_begin()   # (the last loss was copied into `losses`)
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
            verdicts.append((iter_num, finite < 1, True))
        else:                       # a poisoned update never lands (the norm is global: one verdict for all ranks)
            verdicts.append((iter_num, *step_if_finite(optimizer, norm)))
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        update_balance_bias(model)   # moe_balance 'aux_free'/'global': this step's loads, on every rank (else a no-op)
        iter_num += 1
        # read the verdicts on the host where they were not read already: at each log line, eval and the end
        if verdicts[-1][2] or iter_num % cfg['log_interval'] == 0 or iter_num % cfg['eval_interval'] == 0 \
                or iter_num >= cfg['max_iters'] or len(verdicts) >= 64:
            bad_steps = count_bad_steps(verdicts, bad_steps, cfg['max_bad_steps'], master)
        if compile_t0 and master and iter_num == first_iter + 1:     # (and the eval before it, if any)
            print(f"compiled in {time.time() - compile_t0:.1f} s", flush=True)

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
            if cfg['diagnostics']:      # the console gets them per eval; log.jsonl always
                last_routing = routing_report(model)
                record.update(diagnostics_record(diag, last_routing, mcfg.n_heads,
                                                 iter_num % cfg['eval_interval'] == 0))
            append_log(cfg['out_dir'], record)
            if wandb:
                wandb.log(record)
        elif iter_num % cfg['log_interval'] == 0:
            losses.clear()
            routing_report(model)          # keep every rank's counters to one interval

        stopping = stop['signal'] is not None
        if run['distributed'] and run['world'] > 1:   # any rank's signal stops all, at one step: the
            # last step's summed flag (nearly ready), as reading this step's would wait for the GPU to finish it
            flag = torch.tensor(int(stopping), device=run['device'])
            dist.all_reduce(flag)
            stopping, last_flag = last_flag is not None and bool(last_flag.item()), flag
        if stopping:
            bad_steps = count_bad_steps(verdicts, bad_steps, cfg['max_bad_steps'], master)
            if master:
                print(f"signal received: checkpointing at iter {iter_num} and exiting")
            checkpoint(evaluated=False)
            break
    restore_signals()                # the loop is over: signals act as before it
    if wandb:
        wandb.finish()
    if cfg['overfit_batch'] and master and first_loss is not None:
        final = torch.stack(losses).mean(0)[0].item() if losses else last_loss
        if final is not None and final > 0.1 * first_loss:
            print(f"hint: the batch was not overfit (loss {first_loss:.3f} -> {final:.3f}). Try a higher "
                  f"learning_rate or more max_iters, grad_clip=0, warmup_iters=0, entropy_reg=0")


def step_if_finite(optimizer, norm):
    """optimizer.step() unless the gradient norm is non-finite. Returns (skipped, known): skipped is a 0-dim
    bool tensor; known says whether the host has already waited for it. Fused AdamW (the default on CUDA)
    skips on the device through its found_inf input, as GradScaler drives it (parameters, moments and
    step count untouched), so the step needs no host sync and the host keeps enqueueing the next one.
    Other optimizers are told on the host: one small sync per step."""
    bad = ~torch.isfinite(norm)
    # not under FSDP: there the norm is a DTensor, which fused AdamW's found_inf does not take
    if isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get('fused') and type(bad) is torch.Tensor:
        optimizer.found_inf = bad.float()
        optimizer.step()
        return bad, False
    skipped = bool(bad)
    if not skipped:
        optimizer.step()
    return torch.tensor(skipped), True


def count_bad_steps(verdicts, bad_steps, max_bad, master):
    """Reads the pending step verdicts (one sync for all), warns about each skipped step and stops after
    max_bad in a row. Returns the run of skipped steps so far; empties verdicts."""
    flags = torch.stack([bad for _, bad, _ in verdicts]).tolist() if verdicts else []
    for (it, _, _), skipped in zip(verdicts, flags):
        if not skipped:
            bad_steps = 0
            continue
        bad_steps += 1
        if master:
            print(f"warning: non-finite loss/grad at iter {it}, step skipped ({bad_steps} in a row)")
        if bad_steps >= max_bad:
            fail(f"{bad_steps} non-finite steps in a row at iter {it}: lower learning_rate, "
                 f"check the data, or use bfloat16 instead of float16")
    verdicts.clear()
    return bad_steps


if __name__ == '__main__':
    main()

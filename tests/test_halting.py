"""Per-token dynamic depth (halting.py): the nine tests of spec/halting.md "Tests that prove it", for
ACT, MoR expert-choice (top-k and causal threshold mode), MoR token-choice and forced depths, under both
attention semantics (active-only, last-kv). Tiny models on CPU."""
import copy
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from model import LM, AttentionMask, ModelConfig, MoEUTLayer, make_attn_context, rope  # noqa: E402
from halting import HaltingMoEUT, build_lm, forced_depths, random_depths  # noqa: E402

BASE = dict(vocab_size=53, block_size=32, d_model=32, n_layers=8, group_size=2, n_heads=2, d_head=8,
            att_n_experts=3, att_k=2, ff_n_experts=5, ff_k=2, d_expert=8)
R = 4                     # n_layers / group_size
KV = ('active-only', 'last-kv')
# mechanisms whose decisions are causal (and so can decode with a cache); 'forced' = forced_depths
MECHS = {
    'act': dict(halting='act'),
    'act_mean': dict(halting='act', halt_output='mean'),
    'mor_token': dict(halting='mor', mor_routing='token'),
    'mor_expert': dict(halting='mor', mor_capacity=(1.0, 0.7, 0.5, 0.3)),
    'forced': dict(halting='act'),
}


pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


def make_lm(seed=0, **kw) -> LM:
    torch.manual_seed(seed)
    lm = build_lm(ModelConfig(**{**BASE, **kw}))
    core = lm.core
    with torch.no_grad():     # halting params that make depths differ from token to token
        if hasattr(core, 'halt'):
            core.halt.weight.normal_(0, 1.5)
            core.halt.bias.fill_(-0.3)
        if hasattr(core, 'router'):
            core.router.weight.normal_(0, 1.0)
            core.router.bias.normal_(0, 0.5)
    return lm


def depths_for(mech, B, T, seed=1):
    if mech != 'forced':
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, R + 1, (B, T), generator=g)


def run(model, depths, *args, **kw):
    core = model.core if isinstance(model, LM) else model
    if depths is None:
        return model(*args, **kw)
    with forced_depths(core, depths):
        return model(*args, **kw)


# -------------------------------------------------------------------------------------------------
# The dense reference (test 3): every token runs every step through the layers, torch.where freezes
# the ones that halted; attention of all T queries with masks of its own. Swapped in via rows_cls.
# -------------------------------------------------------------------------------------------------

class DenseRows:
    def __init__(self, run, pos, per_row=None, everyone=False, counts=None):
        self.run, self.pos, self.n, self.all = run, pos, int(run.sum()), False

    def _m(self, full):
        return self.run.view(*self.run.shape, *[1] * (full.dim() - 2))

    def gather(self, full):
        return full

    def scatter(self, full, rows):
        return torch.where(self._m(full), rows.to(full.dtype), full)

    def add(self, full, rows):
        return torch.where(self._m(full), full + rows, full)

    def mean(self, rows):
        w = self.run.float()
        return (rows * w).sum() / w.sum()

    def route_rows(self):
        return None, self.run.flatten()

    def attention(self, ctx, kv, buf):
        return DenseAttention(self, ctx, kv, buf)


class DenseAttention:
    def __init__(self, rows, ctx, kv, buf):
        self.rows, self.ctx, self.kv, self.buf, self.pos = rows, ctx, kv, buf, ctx.pos

    def attend(self, q, k, v, cache, n_rot, base):
        assert cache is None
        run, pos = self.rows.run, self.rows.pos
        B, T = run.shape
        q, k = rope(q, pos, n_rot, base), rope(k, pos, n_rot, base)
        if self.kv == 'last-kv':          # frozen K/V: overwrite only where the token runs this step
            m = run[:, None, :, None]
            self.buf['k'] = k = torch.where(m, k, self.buf.get('k', torch.zeros_like(k)))
            self.buf['v'] = v = torch.where(m, v, self.buf.get('v', torch.zeros_like(v)))
            self.buf['seen'] = visible = self.buf.get('seen', torch.zeros_like(run)) | run
        else:
            visible = run
        allowed = torch.ones(T, T, dtype=torch.bool).tril() & visible[:, None, :]
        if self.ctx.mask is not None:
            allowed = allowed & self.ctx.mask.reshape(-1, T, T)
        lonely = ~allowed.any(-1, keepdim=True)
        allowed = allowed | (lonely & torch.eye(T, dtype=torch.bool))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=1.0)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def close(a, b, atol=2e-5, rtol=1e-4):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# -------------------------------------------------------------------------------------------------
# 1. No halting (or forced depth R) equals the plain MoEUT loop with the same weights
# -------------------------------------------------------------------------------------------------

PLAIN_EQUIV = {
    'forced_R': (dict(halting='act'), 'R'),
    'act_never_halts': (dict(halting='act', act_bias_init=-30.0, halt_output='last'), None),
    'mor_expert_gate1': (dict(halting='mor', mor_capacity=(1.0,) * R, mor_gate='none', mor_aux_coef=0.0), None),
    'mor_token_forced_R': (dict(halting='mor', mor_routing='token'), 'R'),
}


@pytest.mark.parametrize('kv', KV)
@pytest.mark.parametrize('case', list(PLAIN_EQUIV))
def test_1_full_depth_equals_plain_loop_exactly(case, kv):
    kw, forced = PLAIN_EQUIV[case]
    torch.manual_seed(0)
    plain = LM(ModelConfig(**BASE))
    halt = build_lm(ModelConfig(**BASE, **kw, halt_kv=kv))
    missing, unexpected = halt.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(('core.halt', 'core.router')) for k in missing)
    idx = torch.randint(0, BASE['vocab_size'], (3, 13))
    depths = torch.full((3, 13), R) if forced else None
    a = plain(idx, idx)
    b = run(halt, depths, idx, idx)
    a.loss.backward()
    b.loss.backward()
    assert float(halt.core.stats['mean_depth']) == R
    assert torch.equal(a.logits, b.logits)                 # bit for bit
    gp, gh = grads(plain), grads(halt)
    if case == 'act_never_halts':     # ponder cost τ·mean(N+R): R = 1 - Σh carries a ~1e-13 gradient
        close(b.reg_loss - a.reg_loss, halt.cfg.act_tau * halt.core.stats['ponder'])
        for n, g in gp.items():
            close(g, gh[n], atol=1e-7, rtol=1e-6)
        return
    assert torch.equal(a.reg_loss, b.reg_loss)            # the entropy regulariser too
    for n, g in gp.items():
        assert torch.equal(g, gh[n]), n


# -------------------------------------------------------------------------------------------------
# 2. Forced exit at k for every token equals a k-step model
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kv', KV)
def test_2_forced_exit_at_k_equals_k_step_model(kv):
    torch.manual_seed(0)
    halt = build_lm(ModelConfig(**BASE, halting='act', halt_kv=kv))
    idx = torch.randint(0, BASE['vocab_size'], (2, 11))
    for k in range(1, R):
        short = LM(ModelConfig(**{**BASE, 'n_layers': k * BASE['group_size']}))
        short.load_state_dict(halt.state_dict(), strict=False)
        a = short(idx, idx)
        b = run(halt, torch.full((2, 11), k), idx, idx)
        assert torch.equal(a.logits, b.logits), k
        assert torch.equal(a.reg_loss, b.reg_loss), k
        assert torch.equal(halt.core.stats['depth_hist'], F.one_hot(torch.tensor(k), R + 1).float())


# -------------------------------------------------------------------------------------------------
# 3. Random per-token depths: gather/scatter path == dense torch.where reference (outputs, losses,
#    parameter and input gradients), for every mechanism and both KV semantics
# -------------------------------------------------------------------------------------------------

DENSE_CASES = {**MECHS,
               'mor_expert_threshold': dict(halting='mor', mor_capacity=(1.0, 0.7, 0.5, 0.3)),
               'middle_cycle': dict(halting='act', n_prelude=1, n_coda=1, halt_output='mean'),
               'forced_padding_mask': dict(halting='act')}


@pytest.mark.parametrize('kv', KV)
@pytest.mark.parametrize('case', list(DENSE_CASES))
def test_3_compact_path_equals_dense_reference(case, kv):
    lm = make_lm(**DENSE_CASES[case], halt_kv=kv)
    core = lm.core
    ref = copy.deepcopy(core)
    ref.rows_cls = DenseRows
    B, T, d = 3, 14, BASE['d_model']
    train = case != 'mor_expert_threshold'      # threshold mode is the eval mode
    depths = depths_for('forced' if case.startswith('forced') else case, B, T)
    mask = None
    if case == 'forced_padding_mask':           # left padding: row 1's first 3 keys hidden
        src = torch.zeros(B, T, dtype=torch.bool)
        src[1, :3] = True
        mask = AttentionMask(src, torch.ones(T, T, dtype=torch.bool).triu(1))
    ctx = make_attn_context(T, 0, mask, 'cpu')
    torch.manual_seed(5)
    x0, w = torch.randn(B, T, d), torch.randn(B, T, d)
    outs = []
    for m in (core, ref):
        m.train(train)
        x = x0.clone().requires_grad_()
        out, loss = run(m, depths, x, ctx)
        ((out * w).sum() + loss).backward()
        outs.append((out, loss, x.grad, grads(m), m.trace['depth'], m.stats))
    (o1, l1, gx1, g1, d1, s1), (o2, l2, gx2, g2, d2, s2) = outs
    assert torch.equal(d1, d2)                                     # same decisions
    assert 0 < float(s1['mean_depth']) < R or case == 'mor_expert_threshold'
    close(o1, o2)
    close(l1, l2)
    close(gx1, gx2)
    assert g1.keys() == g2.keys()
    for n in g1:
        close(g1[n], g2[n], atol=5e-5), n


# -------------------------------------------------------------------------------------------------
# 4. Causality: changing tokens after position t leaves logits <= t unchanged
# -------------------------------------------------------------------------------------------------

CAUSAL = {**MECHS, 'mor_expert_threshold': MECHS['mor_expert']}
CAUSAL.pop('mor_expert')


@pytest.mark.parametrize('kv', KV)
@pytest.mark.parametrize('mech', list(CAUSAL))
def test_4_causal(mech, kv):
    lm = make_lm(**CAUSAL[mech], halt_kv=kv)
    B, T, t = 2, 12, 6
    idx = torch.randint(0, BASE['vocab_size'], (B, T))
    idx2 = idx.clone()
    idx2[:, t + 1:] = torch.randint(0, BASE['vocab_size'], (B, T - t - 1))
    depths = depths_for(mech, B, T)
    depths2 = None if depths is None else torch.cat([depths[:, :t + 1], depths.flip(1)[:, t + 1:]], 1)
    for train in ((False,) if mech == 'mor_expert_threshold' else (False, True)):
        lm.train(train)
        a = run(lm, depths, idx).logits
        b = run(lm, depths2, idx2).logits
        # equal up to float noise: a different active set changes N, hence the matmul blocking
        close(a[:, :t + 1], b[:, :t + 1], atol=1e-5, rtol=0)
        assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_4_mor_topk_is_not_causal_and_refuses_a_cache():
    """Top-k over the sequence is documented as non-causal: decoding with it is refused."""
    lm = make_lm(**MECHS['mor_expert'])
    idx = torch.randint(0, BASE['vocab_size'], (1, 5))
    with pytest.raises(ValueError, match='not causal'):
        lm(idx, kv_cache={})                     # train mode: top-k
    lm.eval()
    lm.core.cfg.mor_causal_eval = False
    with pytest.raises(ValueError, match='not causal'):
        lm(idx, kv_cache={})


# -------------------------------------------------------------------------------------------------
# 5. Decode token by token with the (step, layer) cache == full forward; chunked prefill too
# -------------------------------------------------------------------------------------------------

DECODE = {**CAUSAL, 'middle_cycle': dict(halting='mor', mor_routing='token', n_prelude=1, n_coda=1)}


@pytest.mark.parametrize('kv', KV)
@pytest.mark.parametrize('mech', list(DECODE))
def test_5_decode_equals_full_forward(mech, kv):
    lm = make_lm(**DECODE[mech], halt_kv=kv).eval()
    B, T = 2, 12
    idx = torch.randint(0, BASE['vocab_size'], (B, T))
    depths = depths_for(mech, B, T)
    full = run(lm, depths, idx).logits
    full_depth = lm.core.trace['depth']
    assert full_depth.unique().numel() > 1             # depths really differ between tokens
    for chunks in ([1] * T, [5, 4, 3], [1, 7, 4]):
        cache, outs, ds, t0 = {}, [], [], 0
        for c in chunks:
            dc = None if depths is None else depths[:, t0:t0 + c]
            outs.append(run(lm, dc, idx[:, t0:t0 + c], kv_cache=cache).logits)
            ds.append(lm.core.trace['depth'])
            t0 += c
        close(torch.cat(outs, 1), full, atol=1e-5)
        assert torch.equal(torch.cat(ds, 1), full_depth), chunks
        assert cache['n_past'] == T


@pytest.mark.parametrize('kv', KV)
def test_5_chunk_after_a_prompt_that_halted_early(kv):
    """A chunk whose tokens reach a step that every earlier token skipped: that (step, layer) cache is
    still empty while the model's causal mask spans the whole past (active-only used to crash)."""
    lm = make_lm(**MECHS['forced'], halt_kv=kv).eval()
    idx = torch.randint(0, BASE['vocab_size'], (2, 7))
    depths = torch.tensor([[1, 1, 1, R, R, 2, R], [1, 1, 1, 2, R, R, 2]])
    full = run(lm, depths, idx).logits
    cache = {}
    a = run(lm, depths[:, :3], idx[:, :3], kv_cache=cache).logits
    b = run(lm, depths[:, 3:], idx[:, 3:], kv_cache=cache).logits
    close(torch.cat([a, b], 1), full, atol=1e-5)


@pytest.mark.parametrize('kv', KV)
@pytest.mark.parametrize('mech', ['act', 'mor_token', 'mor_expert'])
def test_5_generate_with_halting_is_the_argmax_of_full_forwards(mech, kv):
    """Halting models decode through their own growing (step, layer) cache: every greedy token equals
    the argmax of a full forward over its prefix, within the context and past it (sliding window)."""
    lm = make_lm(**MECHS[mech], halt_kv=kv, block_size=12).eval()
    prompt = torch.randint(0, BASE['vocab_size'], (2, 5))
    out = lm.generate(prompt, 12, temperature=0)
    assert out.shape == (2, 17)
    with torch.no_grad():
        for t in range(5, 17):
            ctx = out[:, max(0, t - 12):t]
            assert torch.equal(lm(ctx).logits[:, -1].argmax(-1), out[:, t]), t


# -------------------------------------------------------------------------------------------------
# 6. Compute accounting: rows processed at step r == active tokens; total == Σ depths
# -------------------------------------------------------------------------------------------------

def count_rows(core):
    """Rows entering each shared layer call and each σ-MoE call, recorded by forward hooks."""
    calls = {'layer': [], 'ffn': []}
    hooks = []
    for layer in core.layers:
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a: calls['layer'].append(a[0].shape[0] * a[0].shape[1])))
        hooks.append(layer.ffn.register_forward_pre_hook(
            lambda m, a: calls['ffn'].append(a[0].shape[0] * a[0].shape[1])))
    return calls, hooks


@pytest.mark.parametrize('kv', KV)
@pytest.mark.parametrize('mech', ['forced', 'act', 'mor_expert', 'mor_token'])
def test_6_rows_processed_equal_active_tokens(mech, kv):
    lm = make_lm(**MECHS[mech], halt_kv=kv)
    core, G = lm.core, BASE['group_size']
    B, T = 3, 16
    idx = torch.randint(0, BASE['vocab_size'], (B, T))
    depths = depths_for(mech, B, T)
    calls, hooks = count_rows(core)
    run(lm, depths, idx, idx).loss.backward()
    for h in hooks:
        h.remove()
    assert calls['layer'] == calls['ffn']
    per_step = calls['layer'][::G]
    assert calls['layer'] == [n for n in per_step for _ in range(G)]
    if mech == 'forced':
        expected = [int((depths > r).sum()) for r in range(R)]
    elif mech == 'mor_expert':     # capacities (1, .7, .5, .3) of T=16 per sequence: 16, 11, 8, 4
        expected = [B * max(1, int(c * T)) for c in MECHS['mor_expert']['mor_capacity']]
    else:                          # active count from the hooks must match the model's own depths
        d = core.trace['depth']
        expected = [int((d > r).sum()) for r in range(R)]
    expected = [n for n in expected if n > 0]
    assert per_step == expected
    assert sum(calls['layer']) == G * int(core.trace['depth'].sum())      # total = Σ depths
    assert sum(per_step) < B * T * R                                     # something was skipped


# -------------------------------------------------------------------------------------------------
# 7. ACT invariants
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kv', KV)
def test_7_act_weights_sum_to_one_and_depth_in_range(kv):
    lm = make_lm(halting='act', halt_kv=kv)
    idx = torch.randint(0, BASE['vocab_size'], (3, 16))
    lm(idx, idx)
    p, depth = lm.core.trace['act_p'], lm.core.trace['depth']
    close(p.sum(-1), torch.ones_like(p[..., 0]), atol=1e-6, rtol=0)      # also for tokens stopped at R
    assert (p >= 0).all()
    assert ((depth >= 1) & (depth <= R)).all() and (depth == R).any() and (depth < R).any()
    steps_with_weight = (p > 0).sum(-1)
    assert torch.equal(steps_with_weight, depth)                        # no weight after halting
    # the loop's last step takes the remainder even when Σh never reached 1 - eps
    lm.core.halt.weight.data.zero_()
    lm.core.halt.bias.data.fill_(-4.0)                                  # h = 0.018: never halts early
    lm(idx, idx)
    p = lm.core.trace['act_p']
    assert (lm.core.trace['depth'] == R).all()
    close(p.sum(-1), torch.ones_like(p[..., 0]), atol=1e-6, rtol=0)


def test_7_ponder_cost_trains_the_halting_unit():
    lm = make_lm(halting='act', entropy_reg=0.0, att_entropy_reg=0.0, act_tau=0.1)
    idx = torch.randint(0, BASE['vocab_size'], (2, 10))
    out = lm(idx, idx)
    ponder = out.reg_loss                      # = τ·mean(N + R) alone: regulariser is off
    assert ponder.requires_grad
    close(ponder, 0.1 * lm.core.stats['ponder'])
    ponder.backward()
    assert lm.core.halt.weight.grad.abs().sum() > 0 and lm.core.halt.bias.grad.abs() > 0
    assert all(v.grad_fn is None and not v.requires_grad for v in lm.core.stats.values())


@pytest.mark.slow
def test_7_larger_tau_lowers_mean_depth():
    """Toy task (predict the token two back): after the same training, a larger τ runs shallower."""
    def train(tau):
        torch.manual_seed(0)
        lm = build_lm(ModelConfig(**BASE, halting='act', act_tau=tau, act_bias_init=-1.0))
        opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(25):
            idx = torch.randint(0, BASE['vocab_size'], (4, 16), generator=g)
            tgt = torch.roll(idx, 2, 1)
            tgt[:, :2] = -1
            loss = lm(idx, tgt).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(lm.core.stats['mean_depth'])
    low, high = train(0.0), train(0.2)
    assert high < low - 0.5, (low, high)


# -------------------------------------------------------------------------------------------------
# 8. A sequence alone and inside a batch gives identical outputs
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kv', KV)
@pytest.mark.parametrize('mech', list(MECHS))
def test_8_no_cross_row_leakage(mech, kv):
    lm = make_lm(**MECHS[mech], halt_kv=kv)
    B, T = 3, 12
    idx = torch.randint(0, BASE['vocab_size'], (B, T))
    depths = depths_for(mech, B, T)
    batch = run(lm, depths, idx, idx)
    batch_depth = lm.core.trace['depth']
    for b in range(B):
        alone = run(lm, None if depths is None else depths[b:b + 1], idx[b:b + 1], idx[b:b + 1])
        close(alone.logits[0], batch.logits[b], atol=1e-5)
        assert torch.equal(lm.core.trace['depth'][0], batch_depth[b])


# -------------------------------------------------------------------------------------------------
# 9. Edge cases: zero active tokens in a row, none at all, all active, T = 1: no NaN forward/backward
# -------------------------------------------------------------------------------------------------

def _edge_depths():
    d = torch.randint(1, R + 1, (3, 9))
    d[1] = 0                          # a row that never runs the loop
    d[2, :4] = 0
    d[0, :] = 1                       # a row whose tokens all stop after step 1 while others go on
    return {'rows_idle': d, 'none_active': torch.zeros(3, 9, dtype=torch.long),
            'all_active': torch.full((3, 9), R), 'T1': torch.tensor([[0], [2], [R]])}


@pytest.mark.parametrize('kv', KV)
@pytest.mark.parametrize('case', list(_edge_depths()))
def test_9_edge_cases_finite(case, kv):
    d = _edge_depths()[case]
    lm = make_lm(halting='act', halt_kv=kv, halt_output='mean', n_coda=1)
    B, T = d.shape
    idx = torch.randint(0, BASE['vocab_size'], (B, T))
    out = run(lm, d, idx, idx)
    out.loss.backward()
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in lm.parameters() if p.grad is not None)
    assert torch.equal(lm.core.trace['depth'], d)
    # decode the same depths token by token: also finite, also equal
    lm.eval()
    full = run(lm, d, idx).logits
    cache = {}
    steps = [run(lm, d[:, t:t + 1], idx[:, t:t + 1], kv_cache=cache).logits for t in range(T)]
    close(torch.cat(steps, 1), full, atol=1e-5)


def test_9_init_depth_counts_prelude_and_coda():
    """Spec §7 scales the init by s = sqrt(2 / total depth): with middle-cycle sharing that is the looped
    layers plus the unique prelude and coda layers every token runs through."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**BASE, 'd_model': 256, 'ff_n_experts': 32, 'd_expert': 64}, halting='act',
                      n_prelude=2, n_coda=2)
    lm = build_lm(cfg)
    s = math.sqrt(2 / (cfg.n_layers + 4))
    for layer in (lm.core.prelude[0], lm.core.layers[0], lm.core.coda[1]):
        std = layer.ffn.keys.std().item()
        assert abs(std / (s / math.sqrt(cfg.d_model)) - 1) < 0.03, std


def test_9_a_sequence_that_never_runs_leaves_the_entropy_regulariser_alone():
    """The entropy regulariser averages per-sequence expert marginals over the sequences that ran the
    layer: a sequence whose tokens all exit at depth 0 must not pull it (it has no marginal)."""
    lm = make_lm(**MECHS['forced'], act_tau=0.0)
    idx = torch.randint(0, BASE['vocab_size'], (2, 6))
    d = torch.tensor([[1, 2, 3, 4, 2, 1], [0, 0, 0, 0, 0, 0]])
    both = run(lm, d, idx).reg_loss
    alone = run(lm, d[:1], idx[:1]).reg_loss
    assert alone.abs() > 0
    close(both, alone, atol=1e-6)


@pytest.mark.parametrize('mech', ['act', 'mor_expert', 'mor_token'])
def test_9_T1_and_zero_depth_tokens_keep_their_state(mech):
    lm = make_lm(**MECHS[mech])
    out = lm(torch.tensor([[3], [4]]), torch.tensor([[1], [2]]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    core = lm.core
    x = torch.randn(2, 5, BASE['d_model'])
    d = torch.tensor([[0, 0, 1, 2, 0], [0, 0, 0, 0, 0]])
    with forced_depths(core, d):
        y, _ = core(x, make_attn_context(5, 0, None, 'cpu'))
    assert torch.equal(y[d == 0], x[d == 0])          # halted before step 0: untouched


# -------------------------------------------------------------------------------------------------
# Plumbing: config files, checkpoint compatibility, stats, config errors, the bench helpers
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['shakespeare_act', 'shakespeare_mor', 'moeut_126m_act', 'moeut_126m_mor'])
def test_config_files_build_a_halting_model(name):
    from dataclasses import fields
    from configurator import apply_overrides
    settings = {f.name: f.default for f in fields(ModelConfig)}
    cwd = os.getcwd()
    os.chdir(REPO)                    # config files read config/<base>.py relative to the repo, as in nanoGPT
    try:
        apply_overrides(settings, [f'config/{name}.py'], ignore_unknown_file_keys=True)
    finally:
        os.chdir(cwd)
    cfg = ModelConfig.from_dict(settings)
    assert cfg.halting in ('act', 'mor')
    if name.startswith('shakespeare'):
        lm = build_lm(cfg)
        assert isinstance(lm.core, HaltingMoEUT)
        idx = torch.randint(0, cfg.vocab_size, (2, 8))
        assert torch.isfinite(lm(idx, idx).loss)


def test_bad_config_is_one_clear_error():
    with pytest.raises(ValueError, match='halt_kv'):
        build_lm(ModelConfig(**BASE, halting='act', halt_kv='everything'))
    with pytest.raises(ValueError, match='mor_capacity'):
        build_lm(ModelConfig(**BASE, halting='mor', mor_capacity=(1.0, 0.5)))
    with pytest.raises(ValueError, match='weighted'):
        build_lm(ModelConfig(**BASE, halting='mor', halt_output='weighted'))
    with pytest.raises(ValueError, match='mor_capacity'):     # a scalar, not one fraction per step
        build_lm(ModelConfig(**BASE, halting='mor', mor_capacity=0.5))
    with pytest.raises(ValueError, match=r'act_eps must be in \(0, 1\)'):
        build_lm(ModelConfig(**BASE, halting='act', act_eps=1.0))
    build_lm(ModelConfig(**BASE, halting='act', mor_capacity=(1.0, 0.5)))   # unused by ACT: no error


def test_model_py_does_not_import_halting_py():
    """model.py builds plain models and counts any config's parameters without halting.py; a config that
    needs halting.py's core gets one clear line pointing at build_lm."""
    code = ("import sys; from model import LM, ModelConfig, param_counts\n"
            "LM(ModelConfig(vocab_size=11, d_model=8, n_layers=2, n_heads=1, d_head=4, ff_n_experts=2, ff_k=1,"
            " d_expert=4, att_n_experts=2, att_k=1))\n"
            "param_counts(ModelConfig(halting='act', n_prelude=1))\n"
            "assert 'halting' not in sys.modules, 'model.py imported halting.py'")
    import subprocess
    r = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with pytest.raises(ValueError, match='halting.build_lm'):
        LM(ModelConfig(**BASE, halting='act'))


@pytest.mark.parametrize('kw', [dict(halting='act', n_prelude=1, n_coda=1), dict(halting='mor'),
                                dict(halting='mor', mor_routing='token', input_injection='concat'),
                                dict(recurrence='random', n_prelude=2, n_coda=1, input_injection='concat'),
                                dict(input_injection='add', random_init_state=True)])
def test_param_counts_match_the_module(kw):
    """model.param_counts counts halting.py's core without building it: the sum must match the module."""
    from model import param_counts
    lm = build_lm(ModelConfig(**BASE, **kw))
    assert param_counts(lm.cfg)['total'] == sum(p.numel() for p in lm.parameters())


@pytest.mark.parametrize('spread', [True, False])
def test_random_depths_skip_fraction(spread):
    g = torch.Generator().manual_seed(0)
    for skip in (0.0, 0.25, 0.5, 0.75):
        d = random_depths(16, 1024, 9, skip, generator=g, spread=spread)
        assert d.min() >= 1 and d.max() <= 9
        assert abs(1 - d.float().mean().item() / 9 - skip) < 0.01
        if spread and 0 < skip:           # every step keeps some tokens
            assert all((d > r).any() for r in range(9)) and (d == 1).any()


def test_bench_smoke(capsys, monkeypatch):
    """The halting table (python bench.py --what=halting), tiny shapes on the CPU."""
    monkeypatch.setattr(sys, 'argv', ['bench.py'])      # bench.py reads its config from the command line
    import bench
    bench.halting_table(smoke=True)
    out = capsys.readouterr().out
    assert out.count('\n') == 3 + 14 and 'skip 50%' in out and 'bucketed, skip 50%' in out and 'one graph' in out


@pytest.mark.slow
@pytest.mark.parametrize('kv', KV)
def test_compiled_layers_equal_eager(kv):
    """compile_layers (what train.py compile=True does for halting models): same loss and gradients as
    eager, over batches whose steps have every token active, then ragged active counts (the dynamic
    shapes and recompiles). aot_eager: dynamo + autograd tracing without inductor, fast on CPU."""
    eager = make_lm(halting='act', halt_kv=kv)
    comp = copy.deepcopy(eager)
    comp.core.compile_layers(backend='aot_eager')
    for seed in range(3):
        idx = torch.randint(0, 53, (2, 12 + 3 * seed), generator=torch.Generator().manual_seed(seed))
        out = {}
        for name, m in (('eager', eager), ('compiled', comp)):
            m.zero_grad(set_to_none=True)
            loss = m(idx, idx).loss
            loss.backward()
            out[name] = loss.detach(), grads(m), m.core.trace['depth'].clone()
        assert torch.equal(out['eager'][2], out['compiled'][2])           # same halting decisions
        assert 0 < out['eager'][2].float().mean() < R                       # ragged: some halted early
        close(out['eager'][0], out['compiled'][0])
        assert out['eager'][1].keys() == out['compiled'][1].keys()
        for n in out['eager'][1]:
            close(out['eager'][1][n], out['compiled'][1][n])


@pytest.mark.parametrize('train,causal', [(True, True), (False, False)])
def test_mor_expert_compiles_as_one_graph(train, causal):
    """MoR expert-choice keeps a fixed number of tokens per step, so its forward (training, and eval
    without the causal threshold) needs no host value: fullgraph=True traces it as ONE graph (what lets
    train.py compile it whole, with CUDA graphs; a graph break fails here), and through AOT autograd it
    gives eager's loss, depths and gradients. The causal threshold (eval) is data-dependent: not one graph."""
    kw = dict(MECHS['mor_expert'], mor_causal_eval=causal)
    eager = make_lm(**kw)
    comp = copy.deepcopy(eager)
    assert eager.core.one_graph(training=train) and eager.core.one_graph(training=False) == (not causal)
    eager.train(train), comp.train(train)
    fwd = torch.compile(comp, fullgraph=True, backend='aot_eager', dynamic=False)
    idx = torch.randint(0, 53, (2, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, f, m in (('eager', eager, eager), ('compiled', fwd, comp)):
        loss = f(idx, idx).loss
        loss.backward()
        out[name] = loss.detach(), grads(m), m.core.trace['depth'].clone()
    assert torch.equal(out['eager'][2], out['compiled'][2]) and 0 < out['eager'][2].float().mean() < R
    close(out['eager'][0], out['compiled'][0])
    assert out['eager'][1].keys() == out['compiled'][1].keys() and out['eager'][1]
    for n in out['eager'][1]:
        close(out['eager'][1][n], out['compiled'][1][n])
    assert not make_lm(**MECHS['act']).core.one_graph()


# =================================================================================================
# 10. The decision rules against an INDEPENDENT per-token reference
#
# Test 3 checks the gather/scatter plumbing against a dense torch.where variant of the same model, so
# both sides share HaltingMoEUT's decision code (_start, _decide, _mor_expert, the gate, the output mix)
# and a wrong ACT or MoR rule passes on both. The reference below shares none of it: it re-derives,
# from spec/halting.md and the model's own parameters only, token by token in plain Python loops, the
# depths, the output state, the halting loss and (through autograd on the same parameters) every
# gradient. It calls nothing of halting.py: a step is the shared MoEUTLayers (model.py, unchanged) on
# the whole [B, T] sequence with an attention written here from the spec's semantics; the outputs of
# tokens that do not run the step are computed but thrown away. Tiny sizes, float64 weights (the model
# keeps its halting sums and router logits in fp32, hence tolerances ~1e-5), and every decision is
# asserted to be far from its threshold, so float noise cannot flip one.
# =================================================================================================

REF_B = 2
NO_REG = dict(entropy_reg=0.0, att_entropy_reg=0.0)     # the model's loss is then the halting loss alone


def ref_core(seed=0, **kw):
    """A float64 HaltingMoEUT with BASE's shapes (R = 4 steps of G = 2 layers), regularisers off."""
    torch.manual_seed(seed)
    return build_lm(ModelConfig(**{**BASE, **NO_REG, **kw})).core.double()


def ref_input(T, seed=3):
    return torch.randn(REF_B, T, BASE['d_model'], dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))


class RefAttention:
    """Stands in for AttnContext inside model.attend (a context with .attend handles attention itself)
    for one shared layer at one step, from the spec's two semantics, no cache, position = index:
      active-only: query i of a running token sees key j <= i iff token j runs this step;
      last-kv:     query i of a running token sees key j <= i iff token j ran this layer at least once,
                   with the K/V of its latest run (frozen: (b, t) -> (k, v) of this layer).
    A query of a token that does not run sees only itself; its output is discarded by the caller."""

    def __init__(self, run, kv, frozen):
        self.run, self.kv, self.frozen = run, kv, frozen
        self.pos = torch.arange(len(run[0]))

    def attend(self, q, k, v, cache, n_rot, base):
        assert cache is None
        B, H, T, dh = q.shape
        q, k = rope(q, self.pos, n_rot, base), rope(k, self.pos, n_rot, base)
        run, allowed = self.run, torch.zeros(B, 1, T, T, dtype=torch.bool)
        ks, vs = [], []
        for b in range(B):
            kb, vb = [], []
            for t in range(T):
                if self.kv == 'last-kv':
                    if run[b][t]:
                        self.frozen[b, t] = (k[b, :, t], v[b, :, t])
                    kt, vt = self.frozen.get((b, t), (k[b, :, t], v[b, :, t]))
                else:
                    kt, vt = k[b, :, t], v[b, :, t]
                kb.append(kt)
                vb.append(vt)
            ks.append(torch.stack(kb, 1))
            vs.append(torch.stack(vb, 1))
            for i in range(T):
                for j in range(T):
                    if not run[b][i]:
                        allowed[b, 0, i, j] = i == j
                    elif self.kv == 'active-only':
                        allowed[b, 0, i, j] = j <= i and run[b][j]
                    else:
                        allowed[b, 0, i, j] = j <= i and (b, j) in self.frozen
        k, v = torch.stack(ks), torch.stack(vs)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1.0)


def ref_step(core, state, run, kv='active-only', frozen=None):
    """One step: the G shared MoEUTLayers on the whole sequence; returns the new state of every token
    with run[b][t] (None for the others). state: per-token [d] tensors, state[b][t]."""
    frozen = frozen if frozen is not None else [{} for _ in core.layers]
    x = torch.stack([torch.stack(row) for row in state])
    for layer, fr in zip(core.layers, frozen):
        x = layer(x, RefAttention(run, kv, fr))
    return [[x[b, t] if run[b][t] else None for t in range(len(run[b]))] for b in range(len(run))]


def ref_norm_linear(norm, lin, s):
    """lin(LayerNorm(s)) for one token's state s [d], from the parameters (the model's peri-LN in front
    of its halting unit / router; the spec's formula is lin(s))."""
    return F.linear(F.layer_norm(s, s.shape, norm.weight, norm.bias, norm.eps), lin.weight, lin.bias)


def stack2(rows):
    return torch.stack([torch.stack(r) for r in rows])


MARGIN = 1e-4     # every decision of the reference must clear its threshold by this much


def val(t):
    return float(t.detach())


def ref_act(core, x0, kv):
    """ACT (spec "ACT"): after each step h = sigmoid(w·LN(state) + b) of the NEW state; a token halts
    once its Σh reaches 1 - eps (or at step R) and its last step gets the remainder 1 - Σ previous h.
    Output Σ p_n·state_n ('auto'/'weighted') or the mean of its step states ('mean'); loss τ·mean(N + R).
    Returns out [B, T, d], loss, depth [B, T], p [B, T, R]."""
    cfg, R = core.cfg, core.n_repeats
    B, T, _ = x0.shape
    state = [[x0[b, t] for t in range(T)] for b in range(B)]
    run = [[True] * T for _ in range(B)]
    zero = x0.new_zeros(())
    cum = [[zero] * T for _ in range(B)]
    rem = [[zero] * T for _ in range(B)]
    depth = [[0] * T for _ in range(B)]
    p = [[[zero] * R for _ in range(T)] for _ in range(B)]
    seen = [[[] for _ in range(T)] for _ in range(B)]         # the states after each of the token's steps
    frozen = [{} for _ in core.layers]
    for n in range(R):
        if not any(map(any, run)):
            break
        y = ref_step(core, state, run, kv, frozen)
        nxt = [[False] * T for _ in range(B)]
        for b in range(B):
            for t in range(T):
                if not run[b][t]:
                    continue
                state[b][t] = y[b][t]
                seen[b][t].append(y[b][t])
                depth[b][t] += 1
                h = torch.sigmoid(ref_norm_linear(core.halt_norm, core.halt, y[b][t]))[0]
                total = val(cum[b][t] + h)
                if n < R - 1:
                    assert abs(total - (1 - cfg.act_eps)) > MARGIN, 'decision too close to call'
                if total >= 1 - cfg.act_eps or n == R - 1:
                    p[b][t][n] = rem[b][t] = 1 - cum[b][t]
                else:
                    p[b][t][n] = h
                    cum[b][t] = cum[b][t] + h
                    nxt[b][t] = True
        run = nxt
    if cfg.halt_output == 'mean':
        out = stack2([[sum(seen[b][t]) / len(seen[b][t]) for t in range(T)] for b in range(B)])
    else:
        out = stack2([[sum(p[b][t][n] * seen[b][t][n] for n in range(len(seen[b][t]))) for t in range(T)]
                      for b in range(B)])
    loss = cfg.act_tau * stack2([[depth[b][t] + rem[b][t] for t in range(T)] for b in range(B)]).mean()
    p = stack2([[torch.stack(p[b][t]) for t in range(T)] for b in range(B)])
    return out, loss, torch.tensor(depth), p


def ref_mor_expert(core, x0, topk):
    """MoR expert-choice (spec "MoR router"). Before step r the router scores the tokens still alive
    (those that ran step r-1; all before step 0) from their current state; capacity_r (default (R-r)/R,
    derived here, not read from the model) of T continue, but never more than are alive: top-k by score
    (topk, training) or sigmoid(score) > 0.5 (causal eval); capacity 1 keeps every alive token. A chosen
    token's update is gated: state + alpha·sigmoid(score)·(step(state) - state). The aux loss is, summed
    over the steps, the mean over the alive tokens of BCE(score, chosen). Output: the last state."""
    cfg, R = core.cfg, core.n_repeats
    B, T, _ = x0.shape
    cap = tuple(cfg.mor_capacity) or tuple((R - r) / R for r in range(R))
    state = [[x0[b, t] for t in range(T)] for b in range(B)]
    alive = [[True] * T for _ in range(B)]
    depth = [[0] * T for _ in range(B)]
    aux = x0.new_zeros(())
    for r in range(R):
        score = [[ref_norm_linear(core.router_norm, core.router, state[b][t])[r] if alive[b][t] else None
                  for t in range(T)] for b in range(B)]
        chosen = [[False] * T for _ in range(B)]
        for b in range(B):
            cand = [t for t in range(T) if alive[b][t]]
            if cap[r] >= 1:
                keep = cand
            elif topk:
                k = min(max(1, math.floor(cap[r] * T)), len(cand))    # T chosen so cap·T is whole
                ranked = sorted(cand, key=lambda t: -val(score[b][t]))
                if k < len(ranked):
                    assert val(score[b][ranked[k - 1]] - score[b][ranked[k]]) > MARGIN, 'top-k tie'
                keep = ranked[:k]
            else:
                assert all(abs(val(score[b][t])) > MARGIN for t in cand), 'threshold tie'
                keep = [t for t in cand if val(score[b][t]) > 0]      # sigmoid(score) > 0.5
            for t in keep:
                chosen[b][t] = True
        if core.training and topk:
            bce = [F.softplus(score[b][t]) - float(chosen[b][t]) * score[b][t]     # BCE with logits
                   for b in range(B) for t in range(T) if alive[b][t]]
            aux = aux + sum(bce) / len(bce)
        if not any(map(any, chosen)):
            break
        y = ref_step(core, state, chosen)
        for b in range(B):
            for t in range(T):
                if chosen[b][t]:
                    g = cfg.mor_alpha * torch.sigmoid(score[b][t]) if cfg.mor_gate == 'router' else 1.0
                    state[b][t] = state[b][t] + g * (y[b][t] - state[b][t])
                    depth[b][t] += 1
        alive = chosen
    loss = cfg.mor_aux_coef * aux if core.training and topk else x0.new_zeros(())
    return stack2(state), loss, torch.tensor(depth)


def ref_mor_token(core, x0):
    """MoR token-choice (spec "MoR router", halting.py's docstring for the gate): at entry
    p = softmax(router(LN(x))) over R depths, depth = argmax + 1; every step runs ungated except the
    token's last one, whose update is scaled by alpha·p[argmax]. Balancing loss R·Σ_i f_i·P_i (f_i =
    fraction of tokens choosing depth i+1, a constant; P_i = mean p_i, with gradient). Output: last state."""
    cfg, R = core.cfg, core.n_repeats
    B, T, _ = x0.shape
    probs = [[torch.softmax(ref_norm_linear(core.router_norm, core.router, x0[b, t]), 0) for t in range(T)]
             for b in range(B)]
    depth, gate = [[0] * T for _ in range(B)], [[None] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            top2 = probs[b][t].topk(2).values
            assert val(top2[0] - top2[1]) > MARGIN, 'argmax tie'
            c = int(probs[b][t].detach().argmax())
            depth[b][t], gate[b][t] = c + 1, cfg.mor_alpha * probs[b][t][c]
    state = [[x0[b, t] for t in range(T)] for b in range(B)]
    for r in range(R):
        run = [[depth[b][t] > r for t in range(T)] for b in range(B)]
        if not any(map(any, run)):
            break
        y = ref_step(core, state, run)
        for b in range(B):
            for t in range(T):
                if run[b][t]:
                    g = gate[b][t] if (cfg.mor_gate == 'router' and r == depth[b][t] - 1) else 1.0
                    state[b][t] = state[b][t] + g * (y[b][t] - state[b][t])
    loss = x0.new_zeros(())
    if core.training:
        n = B * T
        f = [sum(depth[b][t] == i + 1 for b in range(B) for t in range(T)) / n for i in range(R)]
        P = sum(probs[b][t] for b in range(B) for t in range(T)) / n
        loss = cfg.mor_balance_coef * R * sum(f[i] * P[i] for i in range(R))
    return stack2(state), loss, torch.tensor(depth)


def model_vs_ref(core, x0, ref_fn, train=True, loss_only=False):
    """Forward + backward of the model and of the reference on the same parameters: returns
    {name: (model value, reference value)} for out, loss, the input gradient and every parameter
    gradient, and the model's depths. Backward of (out·w).sum() + loss (or of the loss alone)."""
    core.train(train)
    T = x0.shape[1]
    w = torch.randn(x0.shape, dtype=x0.dtype, generator=torch.Generator().manual_seed(7))
    res, depths = [], None
    for side in ('model', 'ref'):
        core.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        if side == 'model':
            out, loss = core(x, make_attn_context(T, 0, None, 'cpu'))
            extra = (core.trace['depth'].clone(), dict(core.trace))
        else:
            out, loss, *extra = ref_fn(core, x)
        obj = loss if loss_only else (out * w).sum() + loss
        if obj.requires_grad:
            obj.backward()
        g = {n: p.grad.clone() for n, p in core.named_parameters() if p.grad is not None}
        res.append(dict(out=out.detach(), loss=loss.detach(), x_grad=x.grad, grads=g, extra=extra))
    return res


def assert_model_matches_ref(m, r, atol=1e-5, rtol=1e-4):
    close(m['out'], r['out'], atol=atol, rtol=rtol)
    close(m['loss'].double(), r['loss'].double(), atol=1e-7, rtol=1e-5)
    if r['x_grad'] is not None or m['x_grad'] is not None:
        close(m['x_grad'], r['x_grad'], atol=atol, rtol=rtol)
    assert m['grads'].keys() >= r['grads'].keys()
    for n, g in m['grads'].items():          # a parameter the reference leaves untouched gets 0
        torch.testing.assert_close(g, r['grads'].get(n, torch.zeros_like(g)), atol=atol, rtol=rtol, msg=n)


# ---- ACT ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('output,kv', [('auto', 'active-only'), ('auto', 'last-kv'), ('mean', 'active-only')])
def test_10_act_matches_per_token_reference(output, kv):
    """Pins: the halting unit reads the state AFTER the step; threshold 1 - eps; remainder at the last
    step (and at step R); p sums to 1; output Σ p_n·state_n of the states after each step ('auto'), or
    their plain mean ('mean', divided by the token's depth); ponder loss τ·mean(N + R) and its gradient
    through R and p; both KV semantics; every parameter and input gradient."""
    core = ref_core(halting='act', halt_output=output, halt_kv=kv, act_tau=0.1)
    with torch.no_grad():
        core.halt.weight.normal_(0, 1.5, generator=torch.Generator().manual_seed(11))
        core.halt.bias.fill_(-0.3)
    m, r = model_vs_ref(core, ref_input(6), lambda c, x: ref_act(c, x, kv))
    r_depth, r_p = r['extra']
    assert torch.equal(m['extra'][0], r_depth)
    assert r_depth.unique().numel() >= 3                 # depths really differ from token to token
    close(m['extra'][1]['act_p'].double(), r_p.detach(), atol=1e-6, rtol=0)
    assert_model_matches_ref(m, r)


def test_10_act_hand_set_bias():
    """Halting weight 0, bias b: h = sigmoid(b) for every token at every step, so the decisions are
    known by hand, and since every token runs the same steps, state_n is the plain MoEUT loop after n
    steps (exact: no halting code involved). Pins depth and p for:
      h = 0.6, eps 0.01:  0.6 < 0.99, 1.2 >= 0.99          -> depth 2, p = (0.6, 0.4)
      h = 0.497, eps 0.01: 0.994 in [1 - eps, 1 + eps)      -> depth 2, p = (0.497, 0.503)
      h = 0.46, eps 0.1:  0.92 in [0.9, 1.1)                -> depth 2, p = (0.46, 0.54)
      h = 0.2, eps 0.01:  Σh never reaches 0.99 before R    -> depth R, p = (.2, .2, .2, .4)
    and the output Σ p_n·state_n, the 'mean' output (state_1 + state_2)/2, the ponder loss τ(N + R)."""
    T = 5
    x0 = ref_input(T)
    ctx = make_attn_context(T, 0, None, 'cpu')
    for h, eps, p_want in ((0.6, 0.01, (0.6, 0.4)), (0.497, 0.01, (0.497, 0.503)),
                           (0.46, 0.1, (0.46, 0.54)), (0.2, 0.01, (0.2, 0.2, 0.2, 0.4))):
        for output in ('auto', 'mean'):
            core = ref_core(halting='act', act_eps=eps, halt_output=output, act_tau=0.1).train()
            with torch.no_grad():
                core.halt.weight.zero_()
                core.halt.bias.fill_(math.log(h / (1 - h)))
                plain, s = [], x0
                for _ in p_want:                         # the plain loop, step by step
                    for layer in core.layers:
                        s = layer(s, ctx)
                    plain.append(s)
                out, loss = core(x0, ctx)
            N = len(p_want)
            assert (core.trace['depth'] == N).all(), (h, eps)
            p = core.trace['act_p'].double()
            want_p = torch.tensor(p_want + (0.0,) * (R - N), dtype=torch.float64)
            close(p, want_p.expand_as(p), atol=1e-6, rtol=0)
            want = sum(pn * sn for pn, sn in zip(p_want, plain)) if output == 'auto' else sum(plain) / N
            close(out, want, atol=1e-6, rtol=1e-5)
            close(loss.double(), torch.tensor(0.1 * (N + p_want[-1]), dtype=torch.float64), atol=1e-6, rtol=0)


# ---- MoR expert-choice ----------------------------------------------------------------------------

MOR_EXPERT_REF = {
    # default capacities (derived by the reference from the spec: (R-r)/R) with T = 8: 8, 6, 4, 2 tokens
    'topk_default_capacity': (dict(mor_aux_coef=0.1), True),
    # capacity rises after a drop: at most the alive tokens continue (4, not 6), a halted token never
    # comes back; router biases of steps 1..3 pushed negative, so alive tokens with scores below 0 must
    # still beat every halted one
    'topk_capacity_rises': (dict(mor_aux_coef=0.1, mor_capacity=(1.0, 0.5, 0.75, 0.25)), True),
    # no aux loss, alpha 0.5: the router's whole gradient comes through the gate alpha·sigmoid(score)
    'topk_gate_grad_alpha_half': (dict(mor_aux_coef=0.0, mor_alpha=0.5), True),
    # causal eval: sigmoid(score) > 0.5 among the alive replaces top-k; no loss
    'threshold_eval': (dict(mor_capacity=(1.0, 0.7, 0.5, 0.3)), False),
}


@pytest.mark.parametrize('case', list(MOR_EXPERT_REF))
def test_10_mor_expert_matches_per_token_reference(case):
    """Pins: who continues before each step (top capacity_r·T of the alive by the router score of the
    state AFTER the previous step, never more than are alive, never a halted token; or the causal
    threshold), the gate alpha·sigmoid(score) on the UPDATE (not the whole state), the BCE aux target
    (1 = chosen), the loss, and every gradient (the router's through the gate and the BCE)."""
    kw, train = MOR_EXPERT_REF[case]
    core = ref_core(halting='mor', **kw)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(12)
        core.router.weight.normal_(0, 1.0, generator=gen)
        core.router.bias.normal_(0, 0.5, generator=gen)
        if case == 'topk_capacity_rises':
            core.router.bias[1:] -= 1.5
    T = 8
    m, r = model_vs_ref(core, ref_input(T), lambda c, x: ref_mor_expert(c, x, topk=train), train=train)
    r_depth = r['extra'][0]
    assert torch.equal(m['extra'][0], r_depth)
    if train:      # the capacities' combinatorics, per sequence: tokens running step r = min(cap_r·T, alive)
        cap = kw.get('mor_capacity', (1.0, 0.75, 0.5, 0.25))
        counts = [T]
        for c in cap[1:]:
            counts.append(min(int(c * T), counts[-1]))
        for b in range(REF_B):
            assert [int((r_depth[b] > s).sum()) for s in range(R)] == counts
    else:
        assert r_depth.unique().numel() >= 3
    if case == 'topk_gate_grad_alpha_half':
        g = m['grads'].get('router.weight')
        assert float(m['loss']) == 0
        assert g is not None and g.abs().sum() > 0, 'no gradient reaches the router through the gate'
    assert_model_matches_ref(m, r)


def test_10_mor_default_capacity_schedule():
    """Spec: capacities like (R-r)/R: for R = 4, (1, .75, .5, .25) of T."""
    core = ref_core(halting='mor')
    assert core.capacity == (1.0, 0.75, 0.5, 0.25)


def test_10_mor_alpha_hand_formula():
    """Capacity 1 at every step, router weight 0 and bias b_r: every token runs every step with the gate
    g_r = alpha·sigmoid(b_r), so state_{r+1} = state_r + g_r·(f(state_r) - state_r) with f the plain
    G-layer pass (every token active: exact). alpha = 0.5 differs from alpha = 1 and each matches the
    formula; the aux loss is Σ_r BCE(b_r, 1) = Σ_r softplus(-b_r) times its coefficient."""
    T = 5
    x0 = ref_input(T)
    ctx = make_attn_context(T, 0, None, 'cpu')
    bias = torch.tensor([0.3, -0.8, 1.2, -0.2], dtype=torch.float64)
    outs = {}
    for alpha in (1.0, 0.5):
        core = ref_core(halting='mor', mor_capacity=(1.0,) * R, mor_alpha=alpha, mor_aux_coef=0.1).train()
        with torch.no_grad():
            core.router.weight.zero_()
            core.router.bias.copy_(bias)
            s = x0
            for r in range(R):
                f = s
                for layer in core.layers:
                    f = layer(f, ctx)
                s = s + alpha * torch.sigmoid(bias[r]) * (f - s)
            out, loss = core(x0, ctx)
        assert (core.trace['depth'] == R).all()
        close(out, s, atol=1e-6, rtol=1e-5)
        close(loss.double(), 0.1 * F.softplus(-bias).sum(), atol=1e-6, rtol=0)
        outs[alpha] = out
    assert (outs[1.0] - outs[0.5]).abs().max() > 1e-2


# ---- MoR token-choice -----------------------------------------------------------------------------

@pytest.mark.parametrize('gate', ['router', 'none'])
def test_10_mor_token_matches_per_token_reference(gate):
    """Pins: depth = argmax + 1 of the entry softmax (1..R), the gate alpha·p[argmax] on the update of
    the token's LAST step only, the balancing loss R·Σ f_i·P_i (f from the argmax, a constant) and every
    gradient. With mor_gate='none' the router's only gradient is the balancing loss's: it is checked
    from a backward of the loss alone, and must be non-zero."""
    core = ref_core(halting='mor', mor_routing='token', mor_gate=gate, mor_alpha=0.7, mor_balance_coef=0.5)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(13)
        core.router.weight.normal_(0, 1.0, generator=gen)
        core.router.bias.normal_(0, 0.5, generator=gen)
    m, r = model_vs_ref(core, ref_input(6), ref_mor_token, loss_only=gate == 'none')
    r_depth = r['extra'][0]
    assert torch.equal(m['extra'][0], r_depth)
    assert r_depth.unique().numel() >= 3
    if gate == 'none':
        g = m['grads'].get('router.weight')
        assert g is not None and g.abs().sum() > 0, 'no gradient reaches the router from the balancing loss'
    assert_model_matches_ref(m, r)

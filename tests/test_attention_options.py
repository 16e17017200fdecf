"""The attention options (docs/options.md "Attention options"): n_kv_heads (GQA/MQA), qk_norm, ssmax
(Scalable-Softmax), attn_window (sliding window). Each one: causal, decodes like the full forward (growing
and static cache, token by token and chunked), trains its parameters, compiles; and off by default
changes nothing (the golden tests in test_model.py are the bit-exact proof). Tiny models, CPU."""
import copy
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import (AttentionMask, ModelConfig, flops_per_token, param_counts, sdpa,  # noqa: E402
                   static_kv_cache)
from halting import build_lm  # noqa: E402

V = 61
OPTIONS = {
    'gqa': dict(n_kv_heads=2),
    'mqa': dict(n_kv_heads=1),
    'qk_norm': dict(qk_norm=True),
    'ssmax': dict(ssmax=True),
    'window': dict(attn_window=5),
    'all': dict(n_kv_heads=2, qk_norm=True, ssmax=True, attn_window=4),
}
KINDS = ('moeut', 'dense')


pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


def tiny(**kw):
    base = dict(vocab_size=V, block_size=64, d_model=32, n_layers=4, group_size=2, n_heads=4, d_head=8,
                att_n_experts=4, att_k=2, ff_n_experts=6, ff_k=2, d_expert=8, d_ff=48)
    return ModelConfig(**{**base, **kw})


def make(kind, seed=0, **kw):
    torch.manual_seed(seed)
    model = build_lm(tiny(model_type=kind, **kw))
    with torch.no_grad():      # SSMax's s away from its init, so a wrong key count shows
        for m in model.modules():
            if getattr(m, 'ssmax', None) is not None:
                m.ssmax.uniform_(0.5, 1.5)
    return model


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def causal(n):
    return torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)


def attention_modules(model):
    return [m for m in model.modules() if type(m).__name__ in ('SwitchHead', 'DenseAttention')]


# ---- off by default: nothing added -------------------------------------------------------------

class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


OPTION_OPS = {'qk_norm': {'rms_norm', '_fused_rms_norm', 'rsqrt'}, 'ssmax': {'log'},
              'gqa': {'repeat_interleave'}}


@pytest.mark.parametrize('kind', KINDS)
def test_defaults_add_no_parameters_and_no_ops(kind, monkeypatch):
    """Off (the default), the model has the parameters and shapes it always had and its forward runs
    none of the options' ops; the full-sequence forward keeps SDPA's is_causal fast path (no mask)."""
    model = make(kind).eval()
    sd = model.state_dict()
    assert not [k for k in sd if any(s in k for s in ('q_norm', 'k_norm', 'ssmax'))]
    H, dh, d = 4, 8, 32
    for m in attention_modules(model):
        shapes = [m.q.weight.shape, m.k.weight.shape] if kind == 'moeut' else [m.qkv.weight.shape]
        assert shapes == ([(H * dh, d)] * 2 if kind == 'moeut' else [(3 * H * dh, d)])
    assert param_counts(model.cfg)['total'] == sum(p.numel() for p in model.parameters())
    assert model.state_dict().keys() == make(kind, n_kv_heads=4).state_dict().keys()   # = n_heads: the same
    idx = torch.randint(0, V, (2, 12))
    calls, sdpa_fn = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention',
                        lambda *a, **kw: calls.append(kw) or sdpa_fn(*a, **kw))
    with OpCount() as off:
        model(idx)
    assert not set(off.ops) & set().union(*OPTION_OPS.values()), off.ops
    assert len(calls) == 4 and all(kw['attn_mask'] is None and kw['is_causal'] and 'enable_gqa' not in kw
                                   for kw in calls)
    for opts in (dict(qk_norm=True), dict(ssmax=True)):             # the check can see each option's ops
        on = count_ops(kind, opts, idx)
        assert set(on.ops) & OPTION_OPS['qk_norm' if 'qk_norm' in opts else 'ssmax'], opts


def count_ops(kind, opts, idx):
    with OpCount() as c:
        make(kind, **opts).eval()(idx)
    return c


# ---- config errors ----------------------------------------------------------------------------

@pytest.mark.parametrize('kw, msg', [
    (dict(n_kv_heads=3), 'n_kv_heads (3) must divide n_heads (4)'),
    (dict(n_kv_heads=8), 'n_kv_heads (8) must divide n_heads (4)'),
    (dict(n_kv_heads=-1), 'n_kv_heads (-1) must divide n_heads (4)'),
    (dict(attn_window=-2), 'attn_window must be >= 0'),
    (dict(attn_window=8, halting='act'), "attn_window needs halting='none'"),
])
def test_config_errors_are_one_clear_line(kw, msg):
    with pytest.raises(ValueError) as e:
        tiny(**kw)
    assert msg in str(e.value) and '\n' not in str(e.value)


# ---- every option: causal, decodes like the full forward ----------------------------------------

@pytest.mark.parametrize('opt', list(OPTIONS))
@pytest.mark.parametrize('kind', KINDS)
def test_causality(kind, opt):
    model = make(kind, **OPTIONS[opt]).eval()
    idx = torch.randint(0, V, (2, 20))
    base = model(idx).logits
    for t in (0, 6, 18):
        changed = idx.clone()
        changed[:, t + 1:] = torch.randint(0, V, changed[:, t + 1:].shape)
        torch.testing.assert_close(model(changed).logits[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-5)
    changed = idx.clone()
    changed[:, 5] = (changed[:, 5] + 1) % V
    assert not torch.allclose(model(changed).logits[:, 5:], base[:, 5:])


@pytest.mark.parametrize('opt', list(OPTIONS))
@pytest.mark.parametrize('kind', KINDS)
def test_kv_cache_decode_equals_full_forward(kind, opt):
    """Token by token and in chunks, through the growing cache and the static one (a ring of
    attn_window slots when windowed, also when a chunk is longer than the window)."""
    model = make(kind, **OPTIONS[opt]).eval()
    T = 19
    idx = torch.randint(0, V, (2, T))
    full = model(idx).logits
    for chunks in ([1] * T, [5, 1, 7, 6], [9, 1, 1, 8]):
        for cache in ({}, static_kv_cache(T, 'cpu'), static_kv_cache(T + 5, 'cpu')):
            got, t0 = [], 0
            for c in chunks:
                got.append(model(idx[:, t0:t0 + c], kv_cache=cache).logits)
                t0 += c
            close(torch.cat(got, 1), full)


@pytest.mark.parametrize('kind', KINDS)
def test_kv_cache_holds_only_kv_heads_and_the_window(kind):
    """GQA: the cache stores n_kv_heads heads of K (and of V in the dense baseline; SwitchHead's V has
    every head). Window W: the growing cache never holds more than W-1 keys, the static one W slots."""
    W, Hkv = 4, 2
    model = make(kind, n_kv_heads=Hkv, attn_window=W).eval()
    idx = torch.randint(0, V, (1, 30))
    Hv = 4 if kind == 'moeut' else Hkv
    grow, static = {}, static_kv_cache(30, 'cpu')
    for t in range(30):
        model(idx[:, t:t + 1], kv_cache=grow)
        model(idx[:, t:t + 1], kv_cache=static)
        for layer in range(4):
            assert grow[layer]['k'].shape == (1, Hkv, min(t + 1, W - 1), 8)
            assert grow[layer]['v'].shape == (1, Hv, min(t + 1, W - 1), 8)
            assert static[layer]['k'].shape == (1, Hkv, W, 8) and static[layer]['v'].shape == (1, Hv, W, 8)


def test_generate_with_a_window_is_the_argmax_of_full_forwards():
    """generate() decodes from the static cache (a ring of W slots here); every greedy token is the
    argmax of a full forward over its prefix, also past block_size (where generate re-encodes)."""
    model = make('moeut', attn_window=3, n_kv_heads=2, ssmax=True, block_size=12).eval()
    prompt = torch.randint(0, V, (2, 5))
    out = model.generate(prompt, 12, temperature=0)
    for t in range(5, out.shape[1]):
        assert torch.equal(model(out[:, max(0, t - 12):t]).logits[:, -1].argmax(-1), out[:, t]), t


# ---- each option does what it says -------------------------------------------------------------

@pytest.mark.parametrize('kind', KINDS)
def test_gqa_equals_full_heads_with_shared_kv_weights(kind):
    """Query head h reads KV head h // (H / n_kv_heads): the GQA model equals a plain model whose K
    (and dense V) weights repeat each KV head's rows for its group."""
    gqa = make(kind, n_kv_heads=2).eval()
    full = make(kind, seed=1).eval()
    sd = gqa.state_dict()
    for name, w in list(sd.items()):
        if name.endswith('attention.k.weight'):                    # [Hkv*dh, d] -> [H*dh, d]
            sd[name] = w.view(2, 8, -1).repeat_interleave(2, 0).reshape(32, -1)
        elif name.endswith('attn.qkv.weight'):
            q, k, v = w.split([32, 16, 16])
            rep = lambda t: t.view(2, 8, -1).repeat_interleave(2, 0).reshape(32, -1)  # noqa: E731
            sd[name] = torch.cat([q, rep(k), rep(v)])
    full.load_state_dict(sd)
    idx = torch.randint(0, V, (2, 15))
    close(gqa(idx).logits, full(idx).logits)


@pytest.mark.parametrize('kind', KINDS)
def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k(kind):
    """RMS-normalised per head: scaling W_q and W_k changes nothing (it changes the plain model)."""
    idx = torch.randint(0, V, (2, 12))
    for norm in (True, False):
        model = make(kind, qk_norm=norm).eval()
        before = model(idx).logits
        with torch.no_grad():
            for m in attention_modules(model):
                if kind == 'moeut':
                    m.q.weight.mul_(3.0)
                    m.k.weight.mul_(0.5)
                else:
                    m.qkv.weight[:32].mul_(3.0)
                    m.qkv.weight[32:64].mul_(0.5)
        if norm:
            close(model(idx).logits, before, 1e-4)
        else:
            assert not torch.allclose(model(idx).logits, before, atol=1e-3)


def test_qk_norm_is_per_head_rms_before_rope():
    """q and k of a head leave qk_heads with RMS g / d_head^(1/4) (gain g = 1 at init)."""
    from model import qk_heads
    model = make('moeut', qk_norm=True)
    x = torch.randn(2, 5, 32) * 7
    q = qk_heads(x, 4, 8, model.core.layers[0].attention.q_norm)
    rms = q.pow(2).mean(-1).sqrt()
    close(rms, torch.full_like(rms, 8 ** -0.25), 1e-4)


def test_sdpa_ssmax_is_softmax_of_s_log_n_times_the_logits():
    """Against the formula written out: logits q·k (q, k pre-scaled), times s_h·log(n) with n the keys
    the query sees: q+1 under is_causal, the True entries of its mask row, or all keys; with GQA."""
    torch.manual_seed(0)
    B, H, Hkv, T, dh = 2, 4, 2, 7, 8
    q, k, v = torch.randn(B, H, T, dh), torch.randn(B, Hkv, T, dh), torch.randn(B, Hkv, T, dh)
    s = torch.tensor([0.3, 0.7, 1.1, 1.9])
    band = ~causal(T) & (torch.arange(T)[None] > torch.arange(T)[:, None] - 3)    # True = attend
    pad = torch.ones(B, 1, T, T, dtype=torch.bool)
    pad[1, ..., 0] = False                                      # row 1 hides key 0 from everyone
    pad = pad & ~causal(T)
    for mask, is_causal in ((None, True), (None, False), (band, False), (pad, False)):
        allowed = ~causal(T) if is_causal else (torch.ones(T, T, dtype=torch.bool) if mask is None else mask)
        kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        n = allowed.sum(-1, keepdim=True).clamp(min=1).float()
        z = (q @ kk.transpose(-1, -2)) * s[:, None, None] * n.log()
        want = z.masked_fill(~allowed, float('-inf')).softmax(-1) @ vv
        want = torch.nan_to_num(want)                               # pad row 1, query 0: sees nothing
        got = torch.nan_to_num(sdpa(q, k, v, mask, is_causal, s))
        close(got, want)


@pytest.mark.parametrize('kind', KINDS)
def test_ssmax_counts_visible_keys_so_left_padding_changes_nothing(kind):
    """n counts the keys a query attends to: a sequence behind masked left padding gives the logits it
    gives alone (RoPE is relative, so the shifted positions cancel). Counting the padded keys would not."""
    model = make(kind, ssmax=True).eval()
    idx = torch.randint(0, V, (1, 10))
    P = 6
    padded = torch.cat([torch.zeros(1, P, dtype=torch.long), idx], 1)
    T = P + 10
    is_pad = torch.arange(T) < P
    # causal; padded keys hidden from everyone but themselves (a padded query must see something)
    masked = causal(T) | (is_pad[None, :] & ~torch.eye(T, dtype=torch.bool))
    out = model(padded, mask=AttentionMask(None, masked)).logits[:, P:]
    close(out, model(idx).logits, 1e-4)


@pytest.mark.parametrize('kind', KINDS)
def test_window_equals_the_band_mask_it_stands_for(kind):
    """attn_window=W is causal attention to keys (p-W, p]: the same weights with an explicit band mask
    and no window give the same logits (SSMax on in both: n = min(p+1, W) either way)."""
    W, T = 4, 18
    win = make(kind, attn_window=W, ssmax=True).eval()
    plain = make(kind, ssmax=True).eval()
    plain.load_state_dict(win.state_dict())
    idx = torch.randint(0, V, (2, T))
    band = causal(T) | (torch.arange(T)[None, :] <= torch.arange(T)[:, None] - W)     # True = hidden
    close(win(idx).logits, plain(idx, mask=AttentionMask(None, band)).logits)
    assert not torch.allclose(win(idx).logits, plain(idx).logits, atol=1e-3)
    # receptive field: n_layers·(W-1) tokens back; anything older cannot matter
    changed = idx.clone()
    changed[:, 0] = (changed[:, 0] + 1) % V
    reach = 4 * (W - 1)
    torch.testing.assert_close(win(changed).logits[:, reach + 1:], win(idx).logits[:, reach + 1:],
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize('kind', KINDS)
def test_window_with_masks_and_a_cache_equals_the_masked_full_forward(kind):
    """Chunks with a [T, T] position mask and a [B, past+T] padding mask (absolute key positions, cut
    to the keys the windowed cache still has) equal one masked forward."""
    model = make(kind, attn_window=4, ssmax=True).eval()
    idx = torch.randint(0, V, (2, 14))
    pad = torch.zeros(2, 14, dtype=torch.bool)
    pad[1, 9] = True
    full = model(idx, mask=AttentionMask(pad, causal(14))).logits
    for chunks in ((0, 5, 6, 14), (0, 1, 2, 3, 10, 14)):
        cache, got = {}, []
        for a, b in zip(chunks[:-1], chunks[1:]):
            mask = AttentionMask(pad[:, :b], causal(b - a))
            got.append(model(idx[:, a:b], mask=mask, kv_cache=cache).logits)
        close(torch.cat(got, 1), full)
    assert not torch.allclose(full, model(idx).logits, atol=1e-4)        # the padding mask did something


# ---- training: gradients, counts, compile ------------------------------------------------------

@pytest.mark.parametrize('kind', KINDS)
def test_gradients_reach_the_new_parameters(kind):
    model = make(kind, **OPTIONS['all']).train()
    idx = torch.randint(0, V, (2, 16))
    model(idx, idx).loss.backward()
    for m in attention_modules(model):
        for p in (m.q_norm.weight, m.k_norm.weight, m.ssmax):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_ssmax_starts_at_plain_softmax_for_the_full_context():
    """s = 1/log(block_size) at init: the last query of a full block scales its logits by exactly 1."""
    torch.manual_seed(0)
    model = build_lm(tiny(ssmax=True, block_size=48))
    for m in attention_modules(model):
        close(m.ssmax * math.log(48), torch.ones(4))


@pytest.mark.parametrize('opts', [OPTIONS['all'], dict(n_kv_heads=1, qk_norm=True, ssmax=True)])
@pytest.mark.parametrize('kind', ['moeut', 'moeut_att1', 'dense'])
def test_param_counts_match_the_module(kind, opts):
    extra = dict(att_n_experts=1) if kind == 'moeut_att1' else {}
    model = make(kind.split('_')[0], **opts, **extra)
    assert param_counts(model.cfg)['total'] == sum(p.numel() for p in model.parameters())


def test_flops_count_the_smaller_k_v_and_the_window():
    d, H, dh, T = 32, 4, 8, 64
    for kind, kv_proj in (('moeut', 1), ('dense', 2)):     # SwitchHead: K only; dense: K and V
        full = flops_per_token(tiny(model_type=kind))
        gqa = flops_per_token(tiny(model_type=kind, n_kv_heads=1))
        assert full - gqa == 2 * 4 * kv_proj * d * (H - 1) * dh          # 2 FLOPs per MAC, 4 layers
    W = 5
    keys = sum(min(t + 1, W) for t in range(T)) / T                       # mean visible keys
    diff = flops_per_token(tiny()) - flops_per_token(tiny(attn_window=W))
    assert diff == pytest.approx(2 * 4 * 2 * (T / 2 - keys) * H * dh, rel=0.02)


# ---- halting: GQA, qk_norm and SSMax work there too ----------------------------------------------

@pytest.mark.parametrize('kv', ['active-only', 'last-kv'])
def test_halting_with_options_decodes_like_the_full_forward(kv):
    from halting import forced_depths
    model = make('moeut', halting='act', halt_kv=kv, n_kv_heads=2, qk_norm=True, ssmax=True).eval()
    idx = torch.randint(0, V, (2, 11))
    depths = torch.randint(0, 3, (2, 11), generator=torch.Generator().manual_seed(1))
    with forced_depths(model.core, depths):
        full = model(idx).logits
    for chunks in ([1] * 11, [4, 5, 2]):
        cache, got, t0 = {}, [], 0
        for c in chunks:
            with forced_depths(model.core, depths[:, t0:t0 + c]):
                got.append(model(idx[:, t0:t0 + c], kv_cache=cache).logits)
            t0 += c
        close(torch.cat(got, 1), full)
    with forced_depths(model.core, depths):      # and it is causal
        changed = idx.clone()
        changed[:, 7:] = (changed[:, 7:] + 1) % V
        torch.testing.assert_close(model(changed).logits[:, :7], full[:, :7], rtol=0, atol=1e-5)


class RefAttention:
    """test_halting.py's dense reference attention (every token in its slot, torch.where freezes the
    halted ones; masks from the run pattern), with GQA and SSMax through model.sdpa."""
    def __init__(self, rows, ctx, kv, buf):
        self.rows, self.ctx, self.kv, self.buf, self.pos = rows, ctx, kv, buf, ctx.pos

    def attend(self, q, k, v, cache, n_rot, base, ssmax=None):
        from model import rope
        run, pos = self.rows.run, self.rows.pos
        T = run.shape[1]
        q, k = rope(q, pos, n_rot, base), rope(k, pos, n_rot, base)
        visible = run
        if self.kv == 'last-kv':
            m = run[:, None, :, None]
            self.buf['k'] = k = torch.where(m, k, self.buf.get('k', torch.zeros_like(k)))
            self.buf['v'] = v = torch.where(m, v, self.buf.get('v', torch.zeros_like(v)))
            self.buf['seen'] = visible = self.buf.get('seen', torch.zeros_like(run)) | run
        allowed = ~causal(T) & visible[:, None, :]
        allowed = allowed | (~allowed.any(-1, keepdim=True) & torch.eye(T, dtype=torch.bool))
        return sdpa(q, k, v, allowed[:, None], False, ssmax)


@pytest.mark.parametrize('kv', ['active-only', 'last-kv'])
def test_halting_with_options_equals_the_dense_reference(kv):
    """Ragged forced depths: the gather/scatter path (keys: the tokens that run the step, or their
    frozen K/V) equals the dense reference, outputs and gradients; SSMax's n is the keys each query
    sees at that step."""
    from halting import forced_depths
    from test_halting import DenseRows

    class RefRows(DenseRows):
        def attention(self, ctx, kv, buf):
            return RefAttention(self, ctx, kv, buf)
    model = make('moeut', halting='act', halt_kv=kv, n_kv_heads=2, qk_norm=True, ssmax=True)
    ref = copy.deepcopy(model)
    ref.core.rows_cls = RefRows
    idx = torch.randint(0, V, (3, 13))
    depths = torch.randint(1, 3, (3, 13), generator=torch.Generator().manual_seed(2))
    out = []
    for m in (model, ref):
        with forced_depths(m.core, depths):
            o = m(idx, idx)
        o.loss.backward()
        out.append((o.logits, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    close(out[0][0], out[1][0])
    for n, g in out[0][1].items():
        close(g, out[1][1][n], 5e-5)


@pytest.mark.slow
def test_compiled_training_step_equals_eager():
    """torch.compile(fullgraph=True) with every option on: same loss and gradients as eager. Both whole
    models through aot_eager (dynamo and the traced backward: no graph breaks), and the attention module,
    where the options' ops are, through inductor (its code generation; a whole model would spend
    ~1.5 min compiling C++ kernels on a cold 2-core CI machine)."""
    from model import make_attn_context
    for kind in KINDS:
        torch._dynamo.reset()
        eager = make(kind, **OPTIONS['all'], n_layers=2).train()
        comp = copy.deepcopy(eager)
        idx = torch.randint(0, V, (2, 16))
        got = {}
        for name, m, f in (('eager', eager, eager), ('compiled', comp, torch.compile(comp, fullgraph=True,
                                                                                     backend='aot_eager'))):
            loss = f(idx, idx).loss
            loss.backward()
            got[name] = loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        close(got['compiled'][0], got['eager'][0], 1e-4)
        assert got['compiled'][1].keys() == got['eager'][1].keys()
        for n, g in got['eager'][1].items():
            close(got['compiled'][1][n], g, 1e-4)
    torch._dynamo.reset()
    att = make('dense', **OPTIONS['all']).core.layers[0].attn
    ctx = make_attn_context(12, 0, None, 'cpu', window=4)            # the band mask: the masked GQA path
    a = torch.randn(2, 12, 32)
    outs = []
    for f in (att, torch.compile(att, fullgraph=True)):
        x = a.clone().requires_grad_()
        y = f(x, ctx)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y, x.grad, att.ssmax.grad.clone(), att.q_norm.weight.grad.clone()))
        att.zero_grad()
    for e, c in zip(*outs):
        close(c, e, 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('kind', KINDS)
def test_generate_cuda_graph_with_options_equals_eager(kind):
    """The CUDA-graph step on the ring cache (and compiled): the same greedy tokens as the eager step,
    each the argmax of a full forward over its prefix in fp32."""
    model = make(kind, **OPTIONS['all'], block_size=24).cuda().eval()
    prompt = torch.randint(0, V, (3, 6), device='cuda')
    eager = model.generate(prompt, 30, temperature=0, cuda_graph=False)
    assert torch.equal(model.generate(prompt, 30, temperature=0, cuda_graph=True), eager)
    assert torch.equal(model.generate(prompt, 30, temperature=0, cuda_graph=True, compile=True), eager)
    for t in range(6, eager.shape[1]):
        assert torch.equal(model(eager[:, max(0, t - 24):t]).logits[:, -1].argmax(-1), eager[:, t])
    with torch.autocast('cuda', dtype=torch.bfloat16):
        a = model.generate(prompt, 30, temperature=0, cuda_graph=True)
        b = model.generate(prompt, 30, temperature=0, cuda_graph=False)
    assert torch.equal(a, b)

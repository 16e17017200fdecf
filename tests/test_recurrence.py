"""Recurrent depth beyond a fixed R (spec/recurrence.md): test-time depth (more or fewer repeats at
inference), random depth with truncated backprop, input injection and a random initial state, per-token
exit for models trained without a halting unit. Tiny models on CPU."""
import copy
import io
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from model import LM, ModelConfig  # noqa: E402
from halting import (HaltingMoEUT, build_lm, depth_curve, forced_depths, recurrence_state,  # noqa: E402
                     sample_repeats, set_depth, set_recurrence_state)

BASE = dict(vocab_size=53, block_size=32, d_model=32, n_layers=8, group_size=2, n_heads=2, d_head=8,
            att_n_experts=3, att_k=2, ff_n_experts=5, ff_k=2, d_expert=8)
R = 4                     # n_layers / group_size
V = BASE['vocab_size']


pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


def decode_matches(lm, idx, full, depth, chunk_plans):
    """Cached decoding of idx in each plan's chunks gives the full forward's logits and per-token depths."""
    for chunks in chunk_plans:
        cache, outs, ds, t0 = {}, [], [], 0
        for c in chunks:
            outs.append(lm(idx[:, t0:t0 + c], kv_cache=cache).logits)
            ds.append(lm.core.trace['depth'])
            t0 += c
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-4)
        assert torch.equal(torch.cat(ds, 1), depth), chunks


def make(seed=0, **kw) -> LM:
    """A tiny model; halting units/routers set so that depths differ from token to token."""
    torch.manual_seed(seed)
    return spread_depths(build_lm(ModelConfig(**{**BASE, **kw})))


@torch.no_grad()
def spread_depths(lm: LM) -> LM:
    """Halting unit / MoR router weights large enough that depths differ from token to token."""
    if hasattr(lm.core, 'halt'):
        lm.core.halt.weight.normal_(0, 1.5)
        lm.core.halt.bias.fill_(-0.3)
    if hasattr(lm.core, 'router'):
        lm.core.router.weight.normal_(0, 1.0)
        lm.core.router.bias.normal_(0, 0.5)
    return lm


def tokens(B=2, T=12, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def layer_calls(core):
    """Number of calls of the shared layer 0 (= repeats run) since the hook went in."""
    calls = []
    core.layers[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    return calls


# -------------------------------------------------------------------------------------------------
# Test-time depth
# -------------------------------------------------------------------------------------------------

LOOPED = {
    'plain': dict(),
    'none_core': dict(input_injection='add'),
    'act': dict(halting='act'),
    'act_middle_cycle': dict(halting='act', n_prelude=1, n_coda=1),
    'mor_token': dict(halting='mor', mor_routing='token'),
    'mor_expert': dict(halting='mor', mor_capacity=(1.0, 0.7, 0.5, 0.3)),
}


@pytest.mark.parametrize('case', list(LOOPED))
def test_eval_repeats_R_is_todays_model_exactly(case):
    """n_repeats = the trained R changes nothing, bit for bit; training mode ignores the override."""
    lm = make(**LOOPED[case]).eval()
    idx = tokens()
    a = lm(idx).logits
    set_depth(lm, n_repeats=R)
    assert torch.equal(lm(idx).logits, a)
    set_depth(lm, n_repeats=2 * R)
    assert not torch.equal(lm(idx).logits, a)
    lm.train()
    calls = layer_calls(lm.core)
    lm(idx, idx)
    assert len(calls) <= R             # training keeps its own depth
    set_depth(lm, n_repeats=0)
    lm.eval()
    assert torch.equal(lm(idx).logits, a)


@pytest.mark.parametrize('n', [1, 3, 2 * R, 3 * R])
def test_plain_model_with_n_repeats_equals_a_model_trained_that_deep(n):
    """A plain MoEUT run with n repeats is exactly the plain model with n_layers = n·G, same weights;
    the halting core (halting='none', via per-token exit with threshold 0) agrees."""
    lm = make().eval()
    deep = LM(ModelConfig(**{**BASE, 'n_layers': n * BASE['group_size']})).eval()
    deep.load_state_dict(lm.state_dict())
    idx = tokens()
    set_depth(lm, n_repeats=n)
    assert torch.equal(lm(idx).logits, deep(idx).logits)
    set_depth(lm, n_repeats=n, exit_threshold=0.0)
    assert isinstance(lm.core, HaltingMoEUT)
    assert torch.equal(lm(idx).logits, deep(idx).logits)
    assert (lm.core.trace['depth'] == n).all()


def test_act_runs_until_every_token_halts_or_the_cap():
    """ACT at inference: n_repeats is the cap. Tokens that halt before R are unaffected by a higher
    cap; tokens that never halt run to the cap, with the remainder rule at the cap (Σp = 1)."""
    lm = make(halting='act').eval()
    idx = tokens()
    with torch.no_grad():
        lm.core.halt.weight.zero_()
        lm.core.halt.bias.fill_(0.0)          # h = 1/2 per step: every token halts after 2 steps
    a = lm(idx).logits
    set_depth(lm, n_repeats=3 * R)
    assert torch.equal(lm(idx).logits, a) and (lm.core.trace['depth'] == 2).all()
    with torch.no_grad():
        lm.core.halt.bias.fill_(-30.0)        # never halts: runs to the cap, the last step weighs ~1
    for cap in (2, R, 2 * R):
        set_depth(lm, n_repeats=cap)
        out = lm(idx).logits
        assert (lm.core.trace['depth'] == cap).all()
        p = lm.core.trace['act_p']
        assert p.shape[-1] == cap
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
        plain = LM(ModelConfig(**{**BASE, 'n_layers': cap * BASE['group_size']})).eval()
        plain.load_state_dict(lm.state_dict(), strict=False)
        torch.testing.assert_close(out, plain(idx).logits, atol=1e-5, rtol=1e-5)


def test_act_mixed_depths_beyond_R():
    lm = make(halting='act').eval()
    with torch.no_grad():
        lm.core.halt.bias.fill_(-2.5)
    idx = tokens(3, 16)
    set_depth(lm, n_repeats=3 * R)
    lm(idx)
    d = lm.core.trace['depth']
    assert d.max() > R and d.min() < 3 * R and d.min() >= 1
    torch.testing.assert_close(lm.core.trace['act_p'].sum(-1), torch.ones(d.shape))


def test_mor_token_choice_past_R_sends_the_deepest_on():
    lm = make(halting='mor', mor_routing='token').eval()
    idx = tokens(3, 16)
    lm(idx)
    d0 = lm.core.trace['depth'].clone()
    assert (d0 == R).any() and (d0 < R).any()
    set_depth(lm, n_repeats=2 * R)
    lm(idx)
    d = lm.core.trace['depth']
    assert torch.equal(d, torch.where(d0 == R, 2 * R, d0))
    set_depth(lm, n_repeats=2)
    lm(idx)
    assert torch.equal(lm.core.trace['depth'], d0.clamp(max=2))


DECODE = {
    'plain_exit0': (dict(), 0.0),
    'act': (dict(halting='act'), None),
    'act_middle_cycle_last_kv': (dict(halting='act', n_prelude=1, n_coda=1, halt_kv='last-kv'), None),
    'mor_token': (dict(halting='mor', mor_routing='token'), None),
    'mor_expert_threshold': (dict(halting='mor', mor_capacity=(1.0, 0.7, 0.5, 0.3)), None),
}


@pytest.mark.parametrize('case', list(DECODE))
def test_decode_with_more_repeats_equals_full_forward(case):
    """Test-time depth 2R with the (step, layer) cache equals the full forward, token by token and in
    chunks; with a coda, the deeper repeats' cache keys must not collide with the coda's."""
    kw, exit_threshold = DECODE[case]
    lm = make(**kw).eval()
    set_depth(lm, n_repeats=2 * R, exit_threshold=exit_threshold)
    idx = tokens(2, 12)
    full = lm(idx).logits
    depth = lm.core.trace['depth'].clone() if hasattr(lm.core, 'trace') else None
    decode_matches(lm, idx, full, depth, ([1] * 12, [5, 4, 3]))


def test_plain_generate_with_more_repeats():
    """The static-cache (CUDA-graph-able) decode of a plain MoEUT follows the override too."""
    lm = make(block_size=16).eval()
    set_depth(lm, n_repeats=2 * R)
    prompt = tokens(2, 5)
    out = lm.generate(prompt, 8, temperature=0)
    with torch.no_grad():
        for t in range(5, 13):
            assert torch.equal(lm(out[:, :t]).logits[:, -1].argmax(-1), out[:, t]), t


def test_set_depth_errors_are_one_line():
    dense = LM(ModelConfig(**{**BASE, 'model_type': 'dense', 'd_ff': 16}))
    with pytest.raises(ValueError, match='looped model'):
        set_depth(dense, n_repeats=3)
    set_depth(dense)                                      # nothing asked: fine
    lm = make()
    with pytest.raises(ValueError, match='n_repeats must be an int >= 0'):
        set_depth(lm, n_repeats=-1)
    with pytest.raises(ValueError, match='halting unit'):
        set_depth(make(halting='act'), exit_threshold=1e-3)
    with pytest.raises(ValueError, match='n_coda=0'):
        set_depth(make(input_injection='add', n_coda=1), exit_threshold=1e-3)
    with pytest.raises(ValueError, match='exit_criterion'):
        set_depth(lm, exit_threshold=1e-3, exit_criterion='argmax')


def test_depth_curve_prints_loss_per_repeats(capsys, tmp_path):
    lm = make()
    idx = tokens(2, 12)
    rows = depth_curve(lm, [(idx[:, :-1], idx[:, 1:])], plot=str(tmp_path / 'curve.png'))
    assert [r for r, _, _ in rows] == list(range(1, 2 * R + 1))
    assert all(math.isfinite(loss) for _, loss, _ in rows) and [d for _, _, d in rows] == list(range(1, 2 * R + 1))
    set_depth(lm, n_repeats=3)
    lm.eval()
    assert rows[2][1] == pytest.approx(lm(idx[:, :-1], idx[:, 1:]).ce.item())
    assert lm.core.eval_repeats == 3                     # restored
    out = capsys.readouterr().out
    assert out.count('\n| ') == 2 * R + 1
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / 'curve.png').exists()
    except ImportError:
        assert 'matplotlib is not installed' in out and not os.listdir(tmp_path)


# -------------------------------------------------------------------------------------------------
# Random depth (Huginn): the sampler, the depths the forward runs, truncated backprop
# -------------------------------------------------------------------------------------------------

def lognormal_poisson_pmf(mean, n, sigma=0.5):
    """P(r = 1 + j), j < n, by quadrature over τ ~ N(-σ²/2, σ) of Poisson(j; (mean - 1)·e^τ)."""
    tau = torch.linspace(-sigma ** 2 / 2 - 9 * sigma, -sigma ** 2 / 2 + 9 * sigma, 20001, dtype=torch.float64)
    w = torch.exp(-(tau + sigma ** 2 / 2) ** 2 / (2 * sigma ** 2)) / (sigma * math.sqrt(2 * math.pi))
    lam = (mean - 1) * tau.exp()
    j = torch.arange(n, dtype=torch.float64)[:, None]
    pois = torch.exp(j * lam.log() - lam - torch.lgamma(j + 1))
    return torch.trapezoid(pois * w, tau, dim=1)


@pytest.mark.parametrize('mean', [2.5, 6.0])
def test_sampler_is_the_lognormal_poisson_with_that_mean(mean):
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = torch.tensor([sample_repeats(mean, g) for _ in range(n)])
    assert draws.min() >= 1
    assert abs(draws.double().mean().item() - mean) < 4 * draws.double().std().item() / math.sqrt(n)
    pmf = lognormal_poisson_pmf(mean, 80)
    assert abs(pmf.sum().item() - 1) < 1e-6
    emp = torch.bincount(draws - 1, minlength=80)[:80].double() / n
    assert 0.5 * (emp - pmf).abs().sum().item() < 0.02          # total variation
    wrong = lognormal_poisson_pmf(mean + 1, 80)                  # the test can tell a mean off by one
    assert 0.5 * (emp - wrong).abs().sum().item() > 0.05


def random_lm(seed=0, **kw):
    return make(seed, **{'recurrence': 'random', 'mean_repeats': 3.0, **kw})


def test_forward_runs_the_drawn_depths_the_same_on_every_rank():
    """Each training forward runs the next draw of the model's sampler; two models built after the same
    seed (two ranks) draw the same depths, another seed other ones; eval runs R."""
    a, b, c = random_lm(), random_lm(), random_lm(seed=1)
    state = recurrence_state(a)
    assert state == recurrence_state(b) and state['draws'] == 0 and state != recurrence_state(c)
    ran = {}
    for name, lm in (('a', a), ('b', b), ('c', c)):
        calls = layer_calls(lm.core)
        ran[name] = []
        for _ in range(12):
            before = len(calls)
            lm(tokens(), tokens()).loss.backward()
            ran[name].append(len(calls) - before)
            assert lm.core.stats['mean_depth'] == ran[name][-1]
    assert ran['a'] == ran['b'] != ran['c']
    g = torch.Generator()
    assert ran['a'] == [sample_repeats(3.0, g.manual_seed(state['seed'] + i)) for i in range(12)]
    assert len(set(ran['a'])) > 2
    a.eval()
    calls = layer_calls(a.core)
    a(tokens())
    assert len(calls) == R and recurrence_state(a)['draws'] == 12      # eval draws nothing


def test_compiled_loop_without_halting_is_static_whatever_the_depth(monkeypatch):
    """compile_layers (train.py compile=True) on a random-depth model without halting: every step runs
    every token, so the layers compile for static shapes, once per (batch size, mode): new drawn depths
    and later steps compile nothing, and no shape becomes symbolic."""
    torch._dynamo.reset()
    lm = random_lm(input_injection='add')
    symbolic = []         # per compiled graph: does any input have a symbolic size?

    def backend(gm, inputs):
        symbolic.append(any(isinstance(a, torch.SymInt) or (torch.is_tensor(a) and any(
            isinstance(d, torch.SymInt) for d in a.shape)) for a in inputs))
        return gm.forward
    lm.core.compile_layers(backend=backend)
    calls = []
    with monkeypatch.context() as m:
        m.setattr(torch.nn.Module, 'compile', lambda self, **kw: calls.append(kw['dynamic']))
        random_lm().core.compile_layers()
        make(halting='act').core.compile_layers()
    assert calls[0] is False and calls[-1] is True      # (ACT's active rows change every step: dynamic)
    try:
        depths = set()
        for i in range(8):
            if i == 2:
                before = len(symbolic)
            lm(tokens(), tokens()).loss.backward()
            depths.add(lm.core.stats['mean_depth'])
        assert len(depths) > 2, 'the test needs several drawn depths'
        assert symbolic and len(symbolic) == before, 'recompiled for a new drawn depth'
        assert not any(symbolic), 'a layer compiled for symbolic shapes'
    finally:
        torch._dynamo.reset()


def test_sampler_state_round_trips_through_checkpoints():
    a = random_lm()
    for _ in range(5):
        a(tokens(), tokens())
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = random_lm(seed=7)                                # another seed: the checkpoint must set it
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    assert recurrence_state(b) == recurrence_state(a) == {'seed': recurrence_state(a)['seed'], 'draws': 5}
    calls_a, calls_b = layer_calls(a.core), layer_calls(b.core)
    for _ in range(6):
        a(tokens(), tokens())
        b(tokens(), tokens())
    assert calls_a == calls_b
    c = random_lm(seed=9)
    set_recurrence_state(c, recurrence_state(a))
    assert recurrence_state(c) == recurrence_state(a)
    with pytest.raises(ValueError, match='no random depth'):
        set_recurrence_state(make(), recurrence_state(a))
    assert recurrence_state(make()) is None


def saved_bytes(lm, idx):
    """Bytes of the tensors autograd saves for backward during one training forward (the graph)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lm(idx, idx)
    return total[0], out


@pytest.mark.parametrize('inject', ['add', 'concat'])
def test_no_grad_repeats_build_no_graph(inject):
    """6 repeats with backprop_repeats=2 save exactly what 2 repeats save: the first 4 leave no graph."""
    kw = dict(n_layers=12, backprop_repeats=2, input_injection=inject, entropy_reg=0.0, att_entropy_reg=0.0)
    trunc = make(**kw)
    short = make(**{**kw, 'n_layers': 4})                   # k = R: nothing truncated, same core class
    short.load_state_dict(trunc.state_dict())
    full = make(**{**kw, 'backprop_repeats': 6})
    full.load_state_dict(trunc.state_dict())
    idx = tokens()
    b_trunc, b_short, b_full = (saved_bytes(m, idx)[0] for m in (trunc, short, full))
    assert b_trunc == b_short and b_full > 2.5 * b_trunc


@pytest.mark.parametrize('inject', ['add', 'concat'])
def test_truncated_backprop_grads_come_from_the_last_repeats_only(inject):
    """Parameter gradients of backprop_repeats=k equal those of the full-backprop model with the state
    detached before repeat R-k (e, the injected input, keeps its gradient: the prelude still learns),
    and differ from full backprop."""
    kw = dict(n_layers=12, input_injection=inject, n_prelude=1,
              entropy_reg=0.0, att_entropy_reg=0.0)      # the regulariser pools only repeats with gradient
    trunc = make(backprop_repeats=2, **kw)
    ref = make(**kw)
    ref.load_state_dict(trunc.state_dict())
    full = copy.deepcopy(ref)
    orig_step = ref.core._step

    def step(xa, rows, r, *a):                   # cut the state where it enters repeat 4 (before injection)
        return orig_step(xa.detach() if r == 4 else xa, rows, r, *a)
    ref.core._step = step
    idx = tokens()
    grads = []
    for m in (trunc, ref, full):
        m.zero_grad()
        m(idx, idx).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    g_trunc, g_ref, g_full = grads
    assert g_trunc.keys() == g_ref.keys()
    for n in g_trunc:
        torch.testing.assert_close(g_trunc[n], g_ref[n], atol=1e-6, rtol=1e-5), n
    assert any(not torch.allclose(g_trunc[n], g_full[n]) for n in g_trunc if n.startswith('core.layers'))
    assert g_trunc['core.prelude.0.ffn.keys'].abs().sum() > 0 and g_trunc['embedding.weight'].abs().sum() > 0


def test_input_injection_add_is_state_plus_input_before_each_repeat():
    """input_injection='add' equals the plain loop with e (the embedding) added in front of every repeat."""
    inj = make(input_injection='add').eval()
    plain = LM(ModelConfig(**BASE)).eval()
    plain.load_state_dict(inj.state_dict())
    e = {}
    plain.embedding.register_forward_hook(lambda m, i, o: e.update(x=o))
    plain.core.layers[0].register_forward_pre_hook(lambda m, args: (args[0] + e['x'],) + args[1:])
    idx = tokens()
    assert torch.equal(inj(idx).logits, plain(idx).logits)


def test_concat_adapter_can_pass_the_state_or_restart_from_the_input():
    d = BASE['d_model']
    lm = make(input_injection='concat').eval()
    plain = LM(ModelConfig(**BASE)).eval()
    plain.load_state_dict(lm.state_dict(), strict=False)
    idx = tokens()
    with torch.no_grad():
        lm.core.adapter.weight.copy_(torch.cat([torch.eye(d), torch.zeros(d, d)], 1))    # [I, 0]: the state
    torch.testing.assert_close(lm(idx).logits, plain(idx).logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        lm.core.adapter.weight.copy_(torch.cat([torch.zeros(d, d), torch.eye(d)], 1))    # [0, I]: e again
    one = LM(ModelConfig(**{**BASE, 'n_layers': BASE['group_size']})).eval()
    one.load_state_dict(lm.state_dict(), strict=False)
    torch.testing.assert_close(lm(idx).logits, one(idx).logits, atol=1e-5, rtol=1e-5)   # = 1 repeat


def test_random_initial_state_trains_from_noise_and_evaluates_from_zeros():
    lm = make(input_injection='add', random_init_state=True)
    seen = []
    lm.core.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    e = {}
    lm.embedding.register_forward_hook(lambda m, i, o: e.update(x=o.detach()))
    idx = tokens()
    a, b = lm(idx, idx).loss, lm(idx, idx).loss
    assert a != b                                          # fresh noise every training forward
    noise = seen[R] - e['x']                               # step 0's input of the 2nd forward: s_0 + e
    sd = BASE['d_model'] ** -0.5
    # a normal truncated at ±3σ has std 0.987σ
    assert abs(noise.std().item() - 0.987 * sd) < 0.1 * sd and noise.abs().max() <= 3 * sd + 1e-6
    lm.eval()
    seen.clear()
    x1, x2 = lm(idx).logits, lm(idx).logits
    assert torch.equal(x1, x2) and torch.equal(seen[0], e['x'])       # eval: s_0 = 0


def test_huginn_shape_composes_and_decodes():
    """Prelude 2 / core / coda 2, concat injection, random initial state, random depth with truncated
    backprop: trains (finite, every part gets gradient), evaluates at R and at 2R, decodes = full forward."""
    lm = make(n_prelude=2, n_coda=2, input_injection='concat', random_init_state=True, recurrence='random',
              mean_repeats=4.0, backprop_repeats=2)
    idx = tokens()
    out = lm(idx, idx)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for name in ('core.prelude.0.ffn.keys', 'core.coda.1.ffn.keys', 'core.layers.0.ffn.keys', 'core.adapter.weight'):
        assert lm.get_parameter(name).grad.abs().sum() > 0, name
    lm.eval()
    for n in (R, 2 * R):
        set_depth(lm, n_repeats=n)
        full = lm(idx).logits
        cache = {}
        steps = [lm(idx[:, t:t + 1], kv_cache=cache).logits for t in range(idx.shape[1])]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('kw, msg', [
    (dict(recurrence='random', halting='act'), "need halting='none'"),
    (dict(backprop_repeats=2, halting='mor'), "need halting='none'"),
    (dict(recurrence='often'), 'recurrence must be one of'),
    (dict(recurrence='random', mean_repeats=0.5), 'mean_repeats'),
    (dict(random_init_state=True), "random_init_state needs input_injection"),
    (dict(backprop_repeats=2), "backprop_repeats needs input_injection"),
    (dict(input_injection='mul'), 'input_injection must be one of'),
])
def test_bad_recurrence_config_is_one_clear_error(kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_lm(ModelConfig(**BASE, **kw))


def test_dense_model_refuses_recurrence_keys():
    with pytest.raises(ValueError, match="need model_type='moeut'"):
        ModelConfig(**{**BASE, 'model_type': 'dense'}, recurrence='random')


# -------------------------------------------------------------------------------------------------
# Per-token exit at inference (models trained without a halting unit)
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('criterion', ['kl', 'entropy'])
@pytest.mark.parametrize('kv', ['latest', 'skip'])
def test_exit_threshold_0_is_the_full_depth_model(criterion, kv):
    lm = make().eval()
    idx = tokens(3, 14)
    a = lm(idx).logits
    set_depth(lm, exit_threshold=0.0, exit_criterion=criterion, exit_kv=kv)
    assert isinstance(lm.core, HaltingMoEUT) and not any(k.startswith('core.') and 'layers' not in k
                                                         for k in lm.state_dict())
    assert torch.equal(lm(idx).logits, a)
    assert (lm.core.trace['depth'] == R).all()


@pytest.mark.parametrize('criterion', ['kl', 'entropy'])
def test_training_never_exits(criterion):
    """Per-token exit is an inference rule: at a threshold under which tokens do exit in eval, a training
    forward still runs every token to depth R."""
    lm = make().eval()
    idx = tokens(3, 14)
    set_depth(lm, exit_threshold=exit_threshold_for(lm, idx, 0.5, criterion), exit_criterion=criterion)
    lm(idx)
    assert (lm.core.trace['depth'] < R).any()              # the threshold fires in eval
    lm.train()
    lm(idx, idx)
    assert (lm.core.trace['depth'] == R).all()


def exit_threshold_for(lm, idx, q=0.5, criterion='kl'):
    """A threshold that lets about a fraction q of the (token, step) checks exit, from the full-depth run."""
    set_depth(lm, exit_threshold=0.0, exit_criterion=criterion)
    crit = []
    with forced_depths(lm.core, torch.full(idx.shape, 1)):
        prev = F.log_softmax(lm(idx).logits, -1)
    for r in range(2, R + 1):
        with forced_depths(lm.core, torch.full(idx.shape, r)):
            cur = F.log_softmax(lm(idx).logits, -1)
        if criterion == 'kl':
            crit.append((cur.exp() * (cur - prev)).sum(-1))
        else:
            crit.append(((cur.exp() * cur).sum(-1) - (prev.exp() * prev).sum(-1)).abs())
        prev = cur
    return torch.quantile(torch.stack(crit).flatten(), q).item()


@pytest.mark.parametrize('criterion', ['kl', 'entropy'])
def test_exit_follows_its_criterion(criterion):
    """Every token exits at the first repeat r >= 2 where the criterion between its distributions of
    repeats r-1 and r falls under the threshold (or runs to the end). The distributions come from
    forced runs: up to repeat r the exit run and the forced run with depths min(D, r) are the same
    computation, where D are the exit depths. Semantics 'latest' = forced runs with last-kv."""
    lm = make(halt_kv='last-kv').eval()
    with torch.no_grad():               # peaked distributions: KL(p_r || p_r-1) far from KL(p_r-1 || p_r)
        lm.lm_head.weight.mul_(10)
    idx = tokens(4, 16)
    thr = exit_threshold_for(lm, idx, 0.4, criterion)
    set_depth(lm, exit_threshold=thr, exit_criterion=criterion)
    out = lm(idx).logits
    D = lm.core.trace['depth'].clone()
    assert D.min() >= 2 and D.min() < R and D.max() == R
    set_depth(lm, exit_threshold=None)                     # forced runs, cfg.halt_kv = 'last-kv'
    P = []
    for r in range(1, R + 1):
        with forced_depths(lm.core, D.clamp(max=r)):
            P.append(F.log_softmax(lm(idx).logits.float(), -1))
    torch.testing.assert_close(P[-1], F.log_softmax(out.float(), -1), atol=1e-5, rtol=0)
    for r in range(2, R + 1):
        cur, prev = P[r - 1], P[r - 2]
        if criterion == 'kl':
            c = (cur.exp() * (cur - prev)).sum(-1)
        else:
            c = ((cur.exp() * cur).sum(-1) - (prev.exp() * prev).sum(-1)).abs()
        running = D >= r                                   # tokens that ran repeat r
        exits = running & (D == r) & (r < R)
        margin = 1e-6
        assert (c[exits] < thr + margin).all(), r
        assert (c[running & (D > r)] >= thr - margin).all(), r


@pytest.mark.parametrize('kv', ['latest', 'skip'])
@pytest.mark.parametrize('n', [R, 2 * R])
def test_exit_decode_equals_full_forward(kv, n):
    lm = make().eval()
    idx = tokens(2, 12)
    thr = exit_threshold_for(lm, idx, 0.5)
    set_depth(lm, n_repeats=n, exit_threshold=thr, exit_kv=kv)
    full = lm(idx).logits
    depth = lm.core.trace['depth'].clone()
    assert depth.unique().numel() > 1
    decode_matches(lm, idx, full, depth, ([1] * 12, [5, 4, 3], [1, 7, 4]))


def test_exit_generate_is_the_argmax_of_full_forwards():
    lm = make(block_size=12).eval()
    prompt = tokens(2, 5)
    set_depth(lm, exit_threshold=exit_threshold_for(lm, tokens(2, 12), 0.5))
    out = lm.generate(prompt, 10, temperature=0)
    with torch.no_grad():
        for t in range(5, 15):
            ctx = out[:, max(0, t - 12):t]
            assert torch.equal(lm(ctx).logits[:, -1].argmax(-1), out[:, t]), t


def test_exit_saves_compute():
    """Exited tokens leave the tensors: the rows entering the shared layer shrink with the exits."""
    lm = make().eval()
    idx = tokens(2, 12)
    set_depth(lm, exit_threshold=exit_threshold_for(lm, idx, 0.6))
    calls = layer_calls(lm.core)
    lm(idx)
    rows = [math.prod(s[:2]) for s in calls]
    d = lm.core.trace['depth']
    assert rows == [int((d > r).sum()) for r in range(R)] and rows[-1] < rows[0]


# -------------------------------------------------------------------------------------------------
# Depth follows difficulty: the synthetic addition corpus, and ACT trained on it
# -------------------------------------------------------------------------------------------------

def test_addition_corpus_and_its_difficulty_labels(tmp_path):
    import random
    import numpy as np
    import synthetic
    rng = random.Random(3)
    for _ in range(200):                     # the text is the column-wise sum, least significant first
        p = synthetic.addition_problem(rng, 4)
        a = int(''.join(p[0:12:3])[::-1])
        b = int(''.join(p[1:12:3])[::-1])
        assert int((''.join(p[2:12:3]) + p[12])[::-1]) == a + b and len(p) == 13
    ids = synthetic.token_stream('addition', 50, seed=0)
    labels = synthetic.difficulty(ids)
    assert labels[:13] == [-1] * 13 and labels[13] == 0        # the first problem's start is unseen
    for s0 in [i + 1 for i, t in enumerate(ids[:-1]) if t == 256]:
        p = bytes(ids[s0:s0 + 13]).decode()
        carry_in = [0]
        for i in range(4):
            carry_in.append((int(p[3 * i]) + int(p[3 * i + 1]) + carry_in[-1]) // 10)
        want = [0, 1 + carry_in[0], 0, 0, 1 + carry_in[1], 0, 0, 1 + carry_in[2], 0, 0, 1 + carry_in[3],
                1 + carry_in[4], 0]
        assert labels[s0:s0 + 13] == want, p
    meta = synthetic.prepare_synthetic('addition', str(tmp_path / 'add'), n=400, verbose=False)
    train = np.memmap(tmp_path / 'add' / 'train.bin', dtype=meta['dtype'], mode='r')
    assert meta['vocab_size'] == 257 and meta['train_tokens'] + meta['val_tokens'] == 400 * 14
    assert set(np.unique(train).tolist()) <= set(range(48, 58)) | {256}
    assert sorted(os.listdir(tmp_path / 'add')) == ['meta.json', 'problems.jsonl', 'train.bin', 'val.bin']
    with pytest.raises(ValueError, match='unknown synthetic task'):
        synthetic.prepare_synthetic('parity', str(tmp_path / 'p'))
    assert not (tmp_path / 'p').exists()


def addition_config(**over):
    """config/addition_act.py's model, as train.py would read it."""
    from dataclasses import fields
    from configurator import apply_overrides
    settings = {f.name: f.default for f in fields(ModelConfig)}
    settings.update(batch_size=0, learning_rate=0.0, warmup_iters=0)      # the training keys used here
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        apply_overrides(settings, ['config/addition_act.py'], ignore_unknown_file_keys=True)
    finally:
        os.chdir(cwd)
    train = {k: settings[k] for k in ('batch_size', 'block_size', 'learning_rate', 'warmup_iters')}
    return ModelConfig.from_dict({**settings, 'vocab_size': 257, **over}), train


def train_addition(steps, seed=0, **over):
    """AdamW on random windows of the addition stream, as train.py would with config/addition_act.py
    (linear warm-up, then constant: the test stops well before its cosine would matter)."""
    import synthetic
    cfg, t = addition_config(**over)
    data = torch.tensor(synthetic.token_stream('addition', 20000, seed=seed))
    torch.manual_seed(seed)
    lm = build_lm(cfg)
    opt = torch.optim.AdamW(lm.parameters(), lr=t['learning_rate'], betas=(0.9, 0.99), weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    T = t['block_size']
    for it in range(steps):
        for group in opt.param_groups:
            group['lr'] = t['learning_rate'] * min(1.0, (it + 1) / t['warmup_iters'])
        st = torch.randint(0, len(data) - T - 1, (t['batch_size'],), generator=g)
        xy = torch.stack([data[s:s + T + 1] for s in st])
        loss = lm(xy[:, :-1], xy[:, 1:]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
    return lm


def act_depths_on_addition():
    """Prints {difficulty: mean repeats} of the model test_act_depth_follows_difficulty_on_addition trains, as
    JSON. Its test runs it in a process of its own (ACT_RUN), one thread as under one_thread."""
    import json
    import synthetic
    torch.set_num_threads(1)
    lm = train_addition(800, seed=1)
    val = synthetic.token_stream('addition', 400, seed=99)        # problems the training never saw
    by = synthetic.depth_by_difficulty(lm, val, 64)
    print(json.dumps({lab: depth for lab, (depth, _) in by.items()}))


ACT_RUN = [sys.executable, '-c', f'import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); '
                                 'import test_recurrence; test_recurrence.act_depths_on_addition()']


@pytest.mark.slow
@pytest.mark.background(ACT_RUN)    # two minutes of one core: started before the first test (conftest.py)
def test_act_depth_follows_difficulty_on_addition(background):
    """config/addition_act.py's model, 800 steps on the CPU (about two minutes): ACT runs the positions that
    predict a sum digit deeper than those that predict a random operand digit. Mean repeats by
    difficulty 0 / 1 / 2 at step 800 were 2.71 / 5.22 / 5.43 with seed 1 (and 2.95 / 3.71 / 4.28 before
    SwitchHead's projections of LN(x) became one matmul, which changed only the summation order), and
    4.06 / 5.81 / 5.89 in a process of its own since; the margins below are under half the smaller gap.
    Seed 0, which passed before that change by 2.2 and 2.6, now collapses to one repeat everywhere: a
    seed's outcome rests on float rounding (docs/depth.md), so a change of summation order may need
    another seed here; so may fewer steps (seed 1 fails the margins at 500 steps and passes at 600,
    seed 0 fails at every count from 200 to 800). (Carry vs no carry, 2 vs 1, not asserted.)"""
    import json
    d = {int(lab): depth for lab, depth in json.loads(background).items()}
    assert d[1] > d[0] + 0.3 and d[2] > d[0] + 0.5, d


def test_bench_depth_curve_from_a_checkpoint(tmp_path, monkeypatch, capsys):
    """python bench.py --what=depth_curve --depth_ckpt=DIR: reads the checkpoint's validation data,
    prints the loss per repeats and, on the addition corpus, the depth per difficulty."""
    from dataclasses import asdict
    import synthetic
    monkeypatch.chdir(tmp_path)
    meta = synthetic.prepare_synthetic('addition', n=600, val_fraction=0.2, verbose=False)
    lm = make(halting='act', vocab_size=257, block_size=16)
    os.makedirs('out')
    torch.save({'model': lm.state_dict(), 'model_config': asdict(lm.cfg), 'config': {'dataset': 'addition'},
                'meta': meta}, 'out/ckpt_0000010.pt')
    monkeypatch.setattr(sys, 'argv', ['bench.py'])
    import bench
    monkeypatch.setattr(bench, 'device', 'cpu')
    monkeypatch.setattr(bench, 'depth_ckpt', 'out')
    monkeypatch.setattr(bench, 'depth_windows', 8)
    bench.bench_depth_curve()
    out = capsys.readouterr().out
    assert 'ckpt_0000010.pt: addition, 8 windows of 16 tokens' in out
    assert out.count('\n| ') == 2 * R + 1 and 'mean depth by difficulty' in out
    monkeypatch.setattr(bench, 'depth_ckpt', 'nowhere')
    with pytest.raises(SystemExit, match='no checkpoint'):
        bench.bench_depth_curve()


def test_bench_exit_decode_from_a_checkpoint(tmp_path, monkeypatch, capsys):
    """python bench.py --what=exit_decode: per-token exit off, never exiting (KL < 0) and at a threshold;
    the never-exiting row is the full-depth model (same loss, R repeats), a huge threshold exits every
    token as soon as the criterion exists: after its second repeat (KL between repeats 2 and 1)."""
    from dataclasses import asdict
    import synthetic
    monkeypatch.chdir(tmp_path)
    meta = synthetic.prepare_synthetic('addition', n=600, val_fraction=0.2, verbose=False)
    lm = make(vocab_size=257, block_size=32)
    os.makedirs('out')
    torch.save({'model': lm.state_dict(), 'model_config': asdict(lm.cfg), 'config': {'dataset': 'addition'},
                'meta': meta}, 'out/ckpt_0000010.pt')
    monkeypatch.setattr(sys, 'argv', ['bench.py'])
    import bench
    for k, v in dict(device='cpu', depth_ckpt='out', depth_windows=8, exit_batch=2, exit_prompt=8, exit_new=8,
                     exit_thresholds='1e9').items():
        monkeypatch.setattr(bench, k, v)
    bench.bench_exit_decode()
    rows = [ln.split(' | ') for ln in capsys.readouterr().out.splitlines() if ln.startswith(('| off', '| KL'))]
    assert [r[0] for r in rows] == ['| off (plain MoEUT decode)', '| KL < 0', '| KL < 1e+09']
    assert rows[0][2] == rows[1][2] == f'{R:.2f} of {R}' and rows[0][3] == rows[1][3]
    assert rows[2][2] == f'2.00 of {R}'
    monkeypatch.setattr(bench, 'exit_new', 32)
    with pytest.raises(SystemExit, match='exceed the model'):
        bench.bench_exit_decode()

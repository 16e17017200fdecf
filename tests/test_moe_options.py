"""Routing and balancing options (issue 22): aux-free / Switch / global-batch balancing, router noise,
normalised top-k, shared experts, MoE++ null experts, a top-k schedule over the repeats and the conv
router. Each option: causal, cached decoding equals the full forward, gradients where they belong; off,
nothing changes (tests/test_model.py's golden tests hold). All on CPU in float32."""
import os
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cvmm as C  # noqa: E402
import model as M  # noqa: E402
from cvmm import cvmm, cvmm_mlp, cvmm_prepare  # noqa: E402
from model import (LM, flops_per_token, param_counts, routing_report,  # noqa: E402
                   static_kv_cache, update_balance_bias)


from test_model import tiny  # noqa: E402  (the same tiny MoEUT / dense shapes)


# one entry per option; each has something to say in eval (the decode tests) where it can
OPTIONS = {
    'aux_free': dict(moe_balance='aux_free'),
    'switch': dict(moe_balance='switch', entropy_reg=0.0, att_entropy_reg=0.0),
    'global': dict(moe_balance='global'),
    'router_noise': dict(router_noise=0.3),
    'norm_topk': dict(norm_topk=True),
    'shared': dict(ff_n_shared=2, d_shared=4),
    'null': dict(ff_n_null=2, ff_null_identity=1),
    'k_schedule': dict(ff_k_schedule=(3, 1)),
    'conv': dict(router_type='conv', router_kernel=3),
}


def make(seed=0, **kw):
    """A model whose option state is not at its neutral start: random aux-free biases and conv taps, so
    that decoding tests have something to get wrong."""
    torch.manual_seed(seed)
    model = LM(tiny(**kw))
    with torch.no_grad():
        for m in model.modules():
            for name, buf in m.named_buffers(recurse=False):
                if name.startswith('balance_bias'):
                    buf.copy_(torch.randn_like(buf) * 0.1)
            if hasattr(m, 'router_conv'):
                m.router_conv.normal_(0, 0.5)
    return model


# ---- off by default ------------------------------------------------------------------------------

def test_defaults_add_no_parameters_or_buffers():
    keys = set(LM(tiny()).state_dict())
    assert not any(s in k for k in keys for s in ('balance', 'shared', 'conv', 'load'))
    m = LM(tiny()).core.layers[0].ffn
    assert dict(m.named_buffers()).keys() == {'usage'}
    assert M.update_balance_bias(LM(tiny())) is None          # nothing to update, no collective


@pytest.mark.parametrize('kw, msg', [
    (dict(moe_balance='loss_free'), "moe_balance must be 'entropy', 'aux_free', 'switch' or 'global'"),
    (dict(model_type='dense', router_noise=0.1), "router_noise=0.1 needs model_type='moeut'"),
    (dict(moe_balance='switch', balance_coef=0.0), "needs balance_coef > 0"),
    (dict(balance_coef=0.1), "balance_coef is used by moe_balance='switch' or 'global' only"),
    (dict(bias_update_rate=0.01), "bias_update_rate is used by moe_balance='aux_free' only"),
    (dict(moe_balance='aux_free', bias_update_rate=0.0), "bias_update_rate must be > 0"),
    (dict(router_noise=-1.0), 'router_noise must be >= 0'),
    (dict(ff_n_null=-1), 'ff_n_null must be an int >= 0'),
    (dict(d_shared=16), 'd_shared / shared_scale set but ff_n_shared=0'),
    (dict(ff_n_shared=1, shared_scale='big'), "shared_scale must be 'auto' or a number > 0"),
    (dict(ff_n_shared=1, shared_scale='-1'), "shared_scale must be 'auto' or a number > 0"),
    (dict(router_type='mlp'), "router_type must be 'linear' or 'conv'"),
    (dict(router_kernel=2), "router_kernel is used by router_type='conv' only"),
    (dict(router_type='conv', router_kernel=0), 'router_kernel must be an int >= 1'),
    (dict(ff_k_schedule=(2, 2, 2)), 'ff_k_schedule needs 2 values'),
    (dict(ff_k_schedule=(2, 7)), 'in 1..6'),
    (dict(ff_k_schedule=(2.0, 1)), 'ff_k_schedule must be a tuple of ints'),
    (dict(halting='act', moe_balance='switch'), "moe_balance='switch' is not implemented with halting='act'"),
    (dict(halting='mor', router_type='conv'), "router_type='conv' is not implemented with halting='mor'"),
    (dict(halting='act', ff_k_schedule=(2, 2)), 'is not implemented with halting'),
])
def test_config_errors_are_one_clear_line(kw, msg):
    with pytest.raises(ValueError) as e:
        tiny(**kw)
    assert msg in str(e.value) and '\n' not in str(e.value) and str(e.value).startswith('model config: ')


def test_allowed_combinations():
    """Every balancing method may keep the entropy term; aux-free balancing runs inside halting cores."""
    for mode in ('aux_free', 'switch', 'global'):
        tiny(moe_balance=mode, entropy_reg=0.01, att_entropy_reg=0.001)
    tiny(moe_balance='aux_free', halting='act')
    tiny(ff_n_shared=1, shared_scale='0.5', ff_n_null=1, ff_k_schedule=(6, 7), norm_topk=True,
         router_noise=0.1, router_type='conv')


# ---- every option: causal, cache-exact, gradients ----------------------------------------------

@pytest.mark.parametrize('opt', list(OPTIONS))
def test_causality(opt):
    model = make(**OPTIONS[opt]).eval()
    idx = torch.randint(0, 61, (2, 16))
    base = model(idx).logits
    for t in (0, 6, 14):
        changed = idx.clone()
        changed[:, t + 1:] = torch.randint(0, 61, changed[:, t + 1:].shape)
        torch.testing.assert_close(model(changed).logits[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-5)


@pytest.mark.parametrize('opt', list(OPTIONS))
def test_kv_cache_decode_equals_full_forward(opt):
    """Growing and static caches, token by token and in chunks."""
    model = make(**OPTIONS[opt]).eval()
    idx = torch.randint(0, 61, (2, 13))
    full = model(idx).logits
    for cache in ({}, static_kv_cache(16, 'cpu')):
        steps = [model(idx[:, t:t + 1], kv_cache=cache).logits for t in range(13)]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    for cache in ({}, static_kv_cache(13, 'cpu')):
        chunks = [model(idx[:, a:b], kv_cache=cache).logits for a, b in ((0, 5), (5, 6), (6, 8), (8, 13))]
        torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('opt', list(OPTIONS))
def test_gradients_reach_every_parameter_and_no_buffer(opt):
    model = make(**OPTIONS[opt]).train()
    idx = torch.randint(0, 61, (2, 12))
    model(idx, idx).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
        if name.endswith('router_conv'):         # [d, kernel]: every tap learns, not only the current token's
            assert (p.grad.abs().sum(0) > 0).all(), name
    for name, b in model.named_buffers():
        assert not b.requires_grad and b.grad is None, name


def test_param_counts_and_flops_follow_the_options():
    every = dict(ff_n_shared=2, d_shared=4, ff_n_null=2, ff_null_identity=1, ff_k_schedule=(3, 1),
                 router_type='conv', router_kernel=3, moe_balance='aux_free')
    model = LM(tiny(**every))
    assert param_counts(model.cfg)['total'] == sum(p.numel() for p in model.parameters())
    d = 32
    base = flops_per_token(tiny(ff_k=2))
    # schedule (3, 1) over 2 repeats of 2 layers = ff_k 2 everywhere; the rest adds per layer application
    per_app = 3 * d + 2 * d * 8 + d * 3     # router rows of the 3 null ids, shared MLP, conv taps (MACs)
    assert flops_per_token(model.cfg) == base + 2 * 4 * per_app
    assert flops_per_token(tiny(ff_k_schedule=(3, 1))) == base
    assert flops_per_token(tiny(ff_k_schedule=(3, 3))) == flops_per_token(tiny(ff_k=3))
    active = param_counts(tiny(ff_k_schedule=(3, 1)))['active_per_token']
    assert active == param_counts(tiny(ff_k=3))['active_per_token']      # the largest k


# ---- aux-free balancing (DeepSeek, arXiv 2408.15664) -------------------------------------------

def test_aux_free_bias_moves_the_choice_not_the_weights():
    model = make(moe_balance='aux_free')
    ffn = model.core.layers[0].ffn
    logits = torch.randn(5, 7, 6)
    with torch.no_grad():
        ffn.balance_bias.zero_()
        ffn.balance_bias[4] = 10.0                  # expert 4 wins every choice ...
    idx, w = ffn._pick(logits, 2, False)
    assert (idx == 4).any(-1).all()
    torch.testing.assert_close(w, torch.sigmoid(logits).gather(-1, idx), rtol=0, atol=0)   # ... at its own score
    att = model.core.layers[0].attention
    with torch.no_grad():
        att.balance_bias_v.view(2, 4)[1, 3] = 10.0  # head 1's expert 3
    a = torch.randn(1, 5, 32)
    sel, w = att.route(a, 'v', None)
    ids = sel.slot.new_empty(sel.slot.shape).index_put_((sel.slot.long(),), sel.expert).view(1, 5, 2, 2)
    assert (ids[:, :, 1] == 1 * 4 + 3).any(-1).all()
    logits = F.linear(a, att.sel_v).float().unflatten(-1, (2, 4))
    torch.testing.assert_close(w, torch.sigmoid(logits).gather(-1, ids - torch.tensor([0, 4])[:, None]))


def test_aux_free_update_uses_the_step_loads_and_the_sign_rule():
    rate = 0.25
    model = make(moe_balance='aux_free', bias_update_rate=rate)
    banks = list(M._balance_banks(model))
    assert len(banks) == 2 * 3                       # per layer: σ-MoE, V, O
    before = {(id(m), s): getattr(m, 'balance_bias' + s).clone() for m, s in banks}
    routing_report(model)
    model.train()
    for _ in range(2):                               # two micro-batches of one step
        model(torch.randint(0, 61, (2, 9)))
    # the diagnostics counters counted the same slots
    counts = {(id(m), s): getattr(m, 'usage' + s).clone() for m, s in banks}
    with torch.no_grad():
        model.eval()(torch.randint(0, 61, (2, 9)))   # eval forwards do not count
    for m, s in banks:
        assert torch.equal(getattr(m, 'load' + s), counts[(id(m), s)])
    update_balance_bias(model)
    for li, layer in enumerate(model.core.layers):
        for m, s, groups in ((layer.ffn, '', 1), (layer.attention, '_v', 2), (layer.attention, '_o', 2)):
            load = counts[(id(m), s)].view(groups, -1).double()
            want = rate * torch.sign(load.mean(-1, keepdim=True) - load).flatten().float()
            got = getattr(m, 'balance_bias' + s) - before[(id(m), s)]
            torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
            assert (getattr(m, 'load' + s) == 0).all()      # reset for the next step


def test_balancing_state_is_checkpointed_exactly():
    for mode, name in (('aux_free', 'balance_bias'), ('global', 'balance_f')):
        model = make(moe_balance=mode).train()
        model(torch.randint(0, 61, (2, 9)))
        update_balance_bias(model)
        sd = model.state_dict()
        keys = [k for k in sd if name in k]
        assert len(keys) == 6 and not any('load' in k for k in sd)
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(sd, os.path.join(tmp, 'ckpt.pt'))
            fresh = LM(tiny(moe_balance=mode))
            fresh.load_state_dict(torch.load(os.path.join(tmp, 'ckpt.pt'), weights_only=True))
        for k in keys:
            assert torch.equal(fresh.state_dict()[k], sd[k]), k
            assert sd[k].abs().sum() > 0
        idx = torch.randint(0, 61, (2, 9))
        assert torch.equal(fresh.eval()(idx).logits, model.eval()(idx).logits)


BALANCED = {'aux_free': dict(moe_balance='aux_free', bias_update_rate=0.125), 'global': dict(moe_balance='global')}


def balance_state_after_two_steps(rank, world, mode):
    """Rank `rank` of `world` trains two steps' forwards on its share of a fixed global batch (world=1:
    every share, as micro-batches) with update_balance_bias after each; returns the balancing buffers."""
    torch.manual_seed(0)
    model = LM(tiny(**BALANCED[mode])).train()
    data = torch.randint(0, 61, (2 * 2, 9), generator=torch.Generator().manual_seed(1))
    for step in range(2):
        for r in range(rank, 2, world):
            model(data[(r + step) % 2::2])          # step 1 hands each rank the other share
        update_balance_bias(model)
    return {k: v for k, v in model.state_dict().items() if 'balance' in k}


def _ddp_worker(rank, world, tmp):
    torch.distributed.init_process_group('gloo', init_method=f'file://{tmp}/rendezvous', rank=rank,
                                         world_size=world)
    try:
        torch.save({mode: balance_state_after_two_steps(rank, world, mode) for mode in BALANCED},
                   f'{tmp}/rank{rank}.pt')
    finally:
        torch.distributed.destroy_process_group()


def test_balancing_state_is_identical_on_every_rank():
    """Two gloo processes see different data; after the all-reduced update every rank holds the same
    aux-free biases and global-batch fractions, the ones one process gets from the whole global batch."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_ddp_worker, args=(2, tmp), nprocs=2)
        states = [torch.load(f'{tmp}/rank{r}.pt', weights_only=True) for r in range(2)]
    for mode in BALANCED:
        want = balance_state_after_two_steps(0, 1, mode)
        assert len(want) == 6
        for k, v in want.items():
            assert torch.equal(states[0][mode][k], states[1][mode][k]), (mode, k)
            torch.testing.assert_close(states[0][mode][k], v, rtol=0, atol=1e-6)
    assert any(v.abs().sum() > 0 for v in states[0]['aux_free'].values())


# ---- Switch and global-batch balancing losses ----------------------------------------------------

def capture_ff(model):
    """Per σ-MoE layer: the router logits and the picks of every application (forward hooks)."""
    seen = {li: [] for li in range(len(model.core.layers))}
    for li, layer in enumerate(model.core.layers):
        def hook(m, args, kwargs, out, li=li):
            logits = F.linear(args[1], m.expert_sel).float()
            k = m.k_schedule[kwargs['repeat']] if m.k_schedule else m.k
            seen[li].append((logits, torch.sigmoid(logits).topk(k, -1).indices))
        layer.ffn.register_forward_hook(hook, with_kwargs=True)
    return seen


def test_switch_loss_is_E_sum_f_P():
    model = make(moe_balance='switch', entropy_reg=0.0, att_entropy_reg=0.0, att_balance_coef=0.0,
                 balance_coef=0.5).train()
    seen = capture_ff(model)
    idx = torch.randint(0, 61, (3, 11))
    reg = model(idx, idx).reg_loss
    want = 0.0
    for apps in seen.values():
        z = torch.cat([l.flatten(0, 1) for l, _ in apps])
        counts = torch.bincount(torch.cat([i.flatten() for _, i in apps]), minlength=6).float()
        f, P = counts / counts.sum(), torch.softmax(z, -1).mean(0)
        want += 0.5 * 6 * (f * P).sum()
    torch.testing.assert_close(reg, want, rtol=1e-6, atol=1e-7)
    reg.backward()          # through P: the routers and what feeds them, nothing after the last router
    grads = {n: p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()}
    assert all(grads[f'core.layers.{li}.ffn.expert_sel'] for li in range(2))
    assert not any(grads[n] for n in grads if n.startswith(('lm_head', 'out_norm')))


def capture_att(model):
    """Per (SwitchHead layer, bank 'v'/'o'): the [B, T, H, E] router logits of every application."""
    seen = {}
    for li, layer in enumerate(model.core.layers):
        att = layer.attention

        def route(a, bank, routes, ctx=None, logits=None, att=att, orig=att.route, li=li):
            z = logits if logits is not None else F.linear(a, getattr(att, 'sel_' + bank))
            seen.setdefault((li, bank), []).append(z.detach().float().unflatten(-1, (att.H, att.E)))
            return orig(a, bank, routes, ctx, logits)
        att.route = route
    return seen


def test_switch_loss_balances_attention_per_head():
    """For SwitchHead's V and O banks the Switch loss is E * sum_e f_e P_e per head (f: the head's share of
    picks per expert, P: its mean softmax over the expert logits), averaged over heads."""
    model = make(moe_balance='switch', entropy_reg=0.0, att_entropy_reg=0.0, balance_coef=1e-9,
                 att_balance_coef=1.0).train()
    seen = capture_att(model)
    reg = model(torch.randint(0, 61, (2, 8))).reg_loss
    want = 0.0
    for (li, bank), apps in seen.items():
        att = model.core.layers[li].attention
        z = torch.cat([t.flatten(0, 1) for t in apps])                         # [rows, H, E]
        picks = F.one_hot(torch.sigmoid(z).topk(att.top_k, -1).indices, att.E).sum((0, 2)).float()
        f, P = picks / picks.sum(-1, keepdim=True), torch.softmax(z, -1).mean(0)
        want += (att.E * (f * P).sum(-1)).mean()
    assert len(seen) == 2 * 2                  # 2 layers x (V, O)
    torch.testing.assert_close(reg, want, rtol=1e-5, atol=1e-5)   # (the σ-MoE term: 1e-9 x ~1)
    reg.backward()
    att = model.core.layers[0].attention
    assert att.sel_v.grad.abs().sum() > 0 and att.sel_o.grad.abs().sum() > 0 and model.lm_head.weight.grad is None


def test_global_f_is_the_previous_global_batch():
    """f of 'global' is the whole previous step's load fractions: micro-batches split any way give the
    same f, and before the first update f is uniform (the loss is then exactly coef per bank)."""
    kw = dict(moe_balance='global', entropy_reg=0.0, att_entropy_reg=0.0, balance_coef=1.0,
              att_balance_coef=1.0)
    a, b = make(**kw).train(), make(**kw).train()
    idx = torch.randint(0, 61, (4, 10))
    reg = a(idx).reg_loss
    torch.testing.assert_close(reg, torch.tensor(2 * 3.0))      # 2 layers x (ff, V, O) x 1
    for i in range(4):
        b(idx[i:i + 1])
    report = routing_report(a)
    update_balance_bias(a)
    update_balance_bias(b)
    for li in range(2):
        f = a.core.layers[li].ffn.balance_f
        assert torch.equal(f, b.core.layers[li].ffn.balance_f)
        torch.testing.assert_close(f.double(), report[f'ff{li}']['usage'], rtol=0, atol=1e-7)
        fv = a.core.layers[li].attention.balance_f_v.view(2, 4)
        torch.testing.assert_close(fv.sum(-1), torch.ones(2))
    # the next step's loss uses that f: E * sum f * P with P of the new batch
    kw_ff = dict(kw, att_balance_coef=0.0)
    c = make(**kw_ff).train()
    c.load_state_dict(a.state_dict())
    seen = capture_ff(c)
    reg = c(idx[:2]).reg_loss
    want = sum(6 * (c.core.layers[li].ffn.balance_f * torch.softmax(torch.cat(
        [l.flatten(0, 1) for l, _ in apps]), -1).mean(0)).sum() for li, apps in seen.items())
    torch.testing.assert_close(reg, want, rtol=1e-6, atol=1e-7)


# ---- noise, normalised top-k, top-k schedule ----------------------------------------------------

def test_router_noise_moves_training_choices_only():
    torch.manual_seed(0)
    plain, noisy = LM(tiny()), LM(tiny(router_noise=0.5))
    noisy.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 61, (2, 12))
    torch.testing.assert_close(noisy.eval()(idx).logits, plain.eval()(idx).logits, rtol=0, atol=0)
    ffn = noisy.core.layers[0].ffn
    logits = torch.randn(64, 6)
    i_train, w_train = ffn._pick(logits, 2, True)
    i_eval, _ = ffn._pick(logits, 2, False)
    assert not torch.equal(i_train.sort(-1).values, i_eval.sort(-1).values)
    torch.testing.assert_close(w_train, torch.sigmoid(logits).gather(-1, i_train), rtol=0, atol=0)
    # and the modules' own forwards take the noise in training only: the σ-MoE's picks (its usage
    # counts) and SwitchHead's (the weights at the picked experts) move between train and eval mode
    # with noise, and not without it
    x, a = torch.randn(2, 32, 32), torch.randn(2, 32, 32)
    for model, noise in ((plain, False), (noisy, True)):
        ffn, att, used, w = model.core.layers[0].ffn, model.core.layers[0].attention, [], []
        for mode in (True, False):
            ffn.usage.zero_()
            with torch.no_grad():
                ffn.train(mode)(x, x)
                w.append(att.train(mode).route(a, 'o', None)[1])
            used.append(ffn.usage.clone())
        assert torch.equal(*used) != noise and torch.equal(*w) != noise


def test_norm_topk_weights_sum_to_one():
    model = make(norm_topk=True)
    logits = torch.randn(3, 5, 6)
    idx, w = model.core.layers[0].ffn._pick(logits, 2, False)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 5))
    s = torch.sigmoid(logits).gather(-1, idx)
    torch.testing.assert_close(w, s / s.sum(-1, keepdim=True))
    _, w = model.core.layers[0].attention.route(torch.randn(1, 4, 32), 'o', None)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 4, 2))


def test_k_schedule_picks_k_per_repeat():
    model = make(ff_k_schedule=(3, 1)).eval()
    seen = capture_ff(model)
    routing_report(model)
    model(torch.randint(0, 61, (2, 7)))
    # 14 tokens: repeat 0 picks 3 per token, repeat 1 picks 1, in each of the 2 layers
    report_counts = [model.core.layers[li].ffn.usage.sum().item() for li in range(2)]
    assert report_counts == [14 * 4, 14 * 4]
    assert [i.shape[-1] for _, i in seen[0]] == [3, 1]


# ---- shared experts ------------------------------------------------------------------------------

def test_shared_expert_auto_scale_matches_routed_norm_and_is_printed_once(capsys):
    torch.manual_seed(0)
    model = LM(tiny(ff_n_shared=2, d_shared=4))
    out = capsys.readouterr().out
    assert out.count("shared_scale='auto'") == 1
    for layer in model.core.layers:
        m = layer.ffn
        lam = m.shared_scale.item()
        assert f'{lam:.4g}' in out and 0.01 < lam < 10
        x = torch.randn(400, 32)
        with torch.no_grad():
            idx, w = m._pick(F.linear(F.layer_norm(x, (32,)), m.expert_sel).float(), 2, False)
            routed = m._experts(x, cvmm_prepare(idx, 6), idx, w).norm(dim=-1).mean()
            shared = (lam * m._shared(x)).norm(dim=-1).mean()
        assert abs(shared / routed - 1) < 0.15        # other random inputs: the same norms
    fixed = LM(tiny(ff_n_shared=1, shared_scale='0.25'))
    assert 'shared_scale' not in capsys.readouterr().out
    assert fixed.core.layers[0].ffn.shared_scale.item() == 0.25
    assert 'core.layers.0.ffn.shared_scale' in fixed.state_dict()


def test_shared_expert_is_added_to_the_routed_output():
    model = make(ff_n_shared=1, d_shared=16, shared_scale='0.5').eval()
    m = model.core.layers[1].ffn
    x, r = torch.randn(1, 6, 32), torch.randn(1, 6, 32)
    with torch.no_grad():
        y = m(x, r)
        up, down = m.shared_up.clone(), m.shared_down.clone()
        m.shared_down.zero_()
        routed = m(x, r)
    torch.testing.assert_close(y - routed, 0.5 * F.relu(x @ up.T) @ down.T, rtol=1e-5, atol=1e-6)


# ---- MoE++ null experts ------------------------------------------------------------------------

def test_null_experts_have_no_weights_and_cost_no_rows():
    model = make(ff_n_null=3, ff_null_identity=2).eval()
    m = model.core.layers[0].ffn
    assert m.keys.shape[0] == m.values.shape[0] == 6 and m.expert_sel.shape[0] == 11
    with torch.no_grad():
        m.expert_sel[6], m.expert_sel[9] = 1.0, -1.0    # a token picks zero expert 6 or identity 9 first
    seen = {}
    real_mlp = M.cvmm_mlp

    def spy(x, sel, w1, w2, sw, n_null=0):
        seen.update(sel=sel, n_null=n_null, S=sel.slot.numel())
        return real_mlp(x, sel, w1, w2, sw, n_null=n_null)
    M.cvmm_mlp = spy
    try:
        x, r = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
        logits = F.linear(r, m.expert_sel).float()
        idx = torch.sigmoid(logits).topk(2, -1).indices
        y = m(x, r)
    finally:
        M.cvmm_mlp = real_mlp
    sel, S = seen['sel'], seen['S']
    real = int((idx < 6).sum())
    assert seen['n_null'] == 5 and S == 2 * 9 * 2
    assert (idx == 6).sum() > 4 and (idx == 9).sum() > 4
    assert int(sel.offsets[6]) == real <= S * 2 // 3     # the kernels walk rows offsets[0]:offsets[6] only
    # each output: the real experts' sum plus w * x per identity pick, nothing for a zero pick
    w = torch.sigmoid(logits).gather(-1, idx)
    for b, t in [(0, 0), (1, 4), (1, 8)]:
        want = torch.zeros(32)
        for e, we in zip(idx[b, t].tolist(), w[b, t]):
            if e < 6:
                want += we * F.relu(x[b, t] @ m.keys[e]) @ m.values[e]
            elif e >= 9:
                want += we * x[b, t]
        torch.testing.assert_close(y[b, t], want, rtol=1e-5, atol=1e-6)
    model.train()(torch.randint(0, 61, (2, 5)))
    rep = routing_report(model)
    u = rep['ff0']['usage']
    assert len(u) == 11 and rep['ff0']['null_frac'] == pytest.approx(u[6:].sum().item())
    assert rep['ff0']['identity_frac'] == pytest.approx(u[9:].sum().item())


@pytest.mark.parametrize('S,N,sorted_rows', [(300, 200, False), (300, 129, True), (64, 7, False), (1, 5, True)])
def test_null_rows_zeroed_exactly(S, N, sorted_rows, monkeypatch):
    """cvmm's buffers for kernels that write only real slots: exactly the null slots' rows are zeroed
    (row slot_i, or row i in sorted order), over several 64-row programs and column blocks, and the
    rest is left to the kernels (NaN-poisoned here, so it shows)."""
    if C.triton is None:
        pytest.skip('needs triton')
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    empty = torch.empty
    monkeypatch.setattr(torch, 'empty', lambda *a, **k: empty(*a, **k).fill_(float('nan'))
                        if (k.get('dtype') or torch.float32).is_floating_point else empty(*a, **k))
    E, n = 5, 3
    ids = torch.randint(0, E + n, (S,), generator=torch.Generator().manual_seed(S + N))
    sel = cvmm_prepare(ids.to(dev), E + n)
    bank = torch.ones(E, 1, 1, device=dev)           # only its number of experts matters here
    out = C._new_out(S, N, torch.ones(1, device=dev), sel.slot, sel.offsets, bank, sorted_rows=sorted_rows)
    null = (torch.arange(S) >= int(sel.offsets[E])) if sorted_rows else (ids >= E)
    assert out.shape == (S, N) and null.any() == bool((ids >= E).any())
    assert (out[null.to(dev)] == 0).all() and out[~null.to(dev)].isnan().all()
    no_nulls = torch.ones(E + n, 1, 1, device=dev)
    assert C._new_out(S, N, torch.ones(1, device=dev), sel.slot, sel.offsets, no_nulls).isnan().all()


@pytest.mark.parametrize('impl', ['torch', 'triton'])
def test_cvmm_null_ids_equal_a_zero_bank(impl, monkeypatch):
    """cvmm / cvmm_mlp with n_null: the same outputs and gradients as a bank with zero experts appended
    for the null ids, though the null slots never reach a kernel (the Triton path's buffers are
    poisoned with NaN here: a row left unwritten would show)."""
    if impl == 'triton' and C.triton is None:
        pytest.skip('needs triton')
    dev = 'cuda' if impl == 'triton' and torch.cuda.is_available() else 'cpu'   # else the interpreter
    monkeypatch.setattr(C, 'IMPL', impl)
    if impl == 'triton':   # every fresh float buffer of the op starts as NaN
        empty, empty_like = torch.empty, torch.empty_like
        monkeypatch.setattr(torch, 'empty', lambda *a, **k: empty(*a, **k).fill_(float('nan'))
                            if (k.get('dtype') or torch.float32).is_floating_point else empty(*a, **k))
        monkeypatch.setattr(torch, 'empty_like', lambda t, **k: empty_like(t, **k).fill_(float('nan'))
                            if empty_like(t, **k).is_floating_point() else empty_like(t, **k))
    g = torch.Generator().manual_seed(0)
    N, K, E, n, d, h = 12, 3, 5, 2, 16, 8
    ids = torch.randint(0, E + n, (N, K), generator=g)
    ids[0] = E                                          # a token with only null picks
    x, w1, w2 = (torch.randn(*s, generator=g) for s in ((N, d), (E, d, h), (E, h, d)))
    sw, go = torch.rand(N, K, generator=g), torch.randn(N, d, generator=g)
    zero = lambda t: torch.cat([t, t.new_zeros(n, *t.shape[1:])])   # noqa: E731
    for fn in ('mlp', 'two'):
        ts = [t.to(dev, copy=True).requires_grad_() for t in (x, w1, w2, sw)]
        run = (lambda x, a, b, s, sel, nn: cvmm_mlp(x, sel, a, b, s, n_null=nn)) if fn == 'mlp' else \
            (lambda x, a, b, s, sel, nn: cvmm(torch.relu(cvmm(x, sel, a, n_null=nn)), sel, b, s, n_null=nn))
        y = run(*ts, cvmm_prepare(ids.to(dev), E + n), n)
        (y * go.to(dev)).sum().backward()
        y, ts = y.cpu(), [t.grad.cpu() for t in ts]
        with monkeypatch.context() as mp:
            mp.setattr(C, 'IMPL', 'torch')
            rs = [t.clone().requires_grad_() for t in (x, w1, w2, sw)]
            want = run(rs[0], zero(rs[1]), zero(rs[2]), rs[3], cvmm_prepare(ids, E + n), 0)
            (want * go).sum().backward()
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        assert (y[0] == 0).all()
        for a, b in zip(ts, rs):
            torch.testing.assert_close(a, b.grad, rtol=1e-5, atol=1e-5)
        assert (ts[3][ids >= E] == 0).all()             # null slots get no gradient
    with pytest.raises(ValueError, match='prepared for 7 experts, bank has 5 and 1 null ids'):
        cvmm(x, cvmm_prepare(ids, E + n), w1, n_null=1)
    with pytest.raises(ValueError, match='prepared for 7 experts, bank has 5$'):
        cvmm(x, cvmm_prepare(ids, E + n), w1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('opt', ['aux_free', 'shared', 'null', 'k_schedule', 'conv'])
def test_generate_cuda_graph_equals_eager(opt):
    """generate()'s captured, replayed decode step (static cache) with the option on: the eager
    static-cache step's tokens, in fp32 and under bf16 autocast."""
    model = make(**OPTIONS[opt], block_size=24).cuda().eval()
    prompt = torch.randint(0, 61, (3, 5), device='cuda')
    for amp in (False, True):
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
            a = model.generate(prompt, 12, temperature=0, cuda_graph=True)
            b = model.generate(prompt, 12, temperature=0, cuda_graph=False)
        assert torch.equal(a, b), amp


# ---- conv router ---------------------------------------------------------------------------------

def test_conv_router_starts_as_the_linear_router():
    torch.manual_seed(0)
    plain = LM(tiny())
    torch.manual_seed(0)
    conv = LM(tiny(router_type='conv', router_kernel=4))
    idx = torch.randint(0, 61, (2, 10))
    torch.testing.assert_close(conv(idx, idx).loss, plain(idx, idx).loss, rtol=0, atol=0)


def test_conv_router_mixes_only_the_past_kernel():
    """Token t's σ-MoE router input depends on tokens t-K+1..t (through the conv) and no earlier ones."""
    model = make(router_type='conv', router_kernel=3).eval()
    m = model.core.layers[0].ffn
    r = torch.randn(1, 9, 32)
    u = m._conv(r, None, None)
    r2 = r.clone()
    r2[:, 4] += 1.0
    u2 = m._conv(r2, None, None)
    changed = (u2 - u).abs().sum(-1)[0] > 0
    assert changed.tolist() == [False] * 4 + [True] * 3 + [False] * 2


def test_conv_router_cache_survives_a_repeated_position():
    """generate()'s CUDA-graph capture runs one warm-up step and then moves the static cache's position
    back: the step replayed at that position must give what it would have without the warm-up."""
    model = make(router_type='conv', router_kernel=3).eval()
    idx = torch.randint(0, 61, (2, 8))
    full = model(idx).logits
    cache = static_kv_cache(8, 'cpu')
    model(idx[:, :5], kv_cache=cache)
    model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache)       # the warm-up, a dummy token
    cache['pos'] -= 1
    steps = [model(idx[:, t:t + 1], kv_cache=cache).logits for t in range(5, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 5:], rtol=1e-5, atol=1e-5)
    out = model.generate(idx[:, :4], 4, temperature=0)               # the static cache, on CPU
    for t in range(4, 8):
        assert torch.equal(model(out[:, :t]).logits[:, -1].argmax(-1), out[:, t])


# ---- torch.compile -------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('backend', ['aot_eager', pytest.param('inductor', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='inductor on CPU compiles C++ for minutes; run on the GPU host'))])
def test_compile_with_the_options_on(backend):
    """One graph (fullgraph) for a model with most options on, and one with the Switch loss: the compiled
    training step gives the eager loss and gradients, and updates the same loads. On CPU the graph
    goes through dynamo and AOT autograd (aot_eager: what breaks a graph or a custom op's fake shows)."""
    dev = 'cuda' if backend == 'inductor' else 'cpu'
    for kw in (dict(moe_balance='aux_free', norm_topk=True, ff_n_shared=1, d_shared=8,
                    ff_n_null=1, ff_null_identity=1, ff_k_schedule=(3, 2), router_type='conv'),
               dict(moe_balance='switch', entropy_reg=0.0)):
        torch._dynamo.reset()
        eager = make(**kw).to(dev).train()
        comp = make(**kw).to(dev).train()
        idx = torch.randint(0, 61, (2, 12), device=dev)
        fn = torch.compile(comp, fullgraph=True, backend=backend)
        a, b = eager(idx, idx), fn(idx, idx)
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-5)
        a.loss.backward()
        b.loss.backward()
        for (name, p), q in zip(eager.named_parameters(), comp.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
        for (name, x), y in zip(eager.named_buffers(), comp.buffers()):
            assert torch.equal(x, y), name

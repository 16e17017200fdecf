"""The researcher's toolkit: routing diagnostics, gradient/logit stats, Muon for expert banks."""
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import plot  # noqa: E402
import train  # noqa: E402
from model import LM, ModelConfig, routing_report  # noqa: E402


def tiny(**kw):
    base = dict(vocab_size=53, block_size=32, d_model=32, n_layers=4, group_size=2, n_heads=2, d_head=8,
                att_n_experts=3, att_k=2, ff_n_experts=6, ff_k=2, d_expert=8)
    base.update(kw)
    return ModelConfig(**base)


def test_routing_report_equals_direct_count_of_topk():
    """Capture each σ-MoE/SwitchHead router input with hooks, redo the top-k by hand, and compare the
    counts with what routing_report says."""
    torch.manual_seed(0)
    model = LM(tiny()).eval()
    cfg = model.cfg
    direct = {}
    hooks = []
    for li, layer in enumerate(model.core.layers):
        def ff_hook(m, args, out, li=li):
            idx = torch.sigmoid(args[1] @ m.expert_sel.T).topk(cfg.ff_k, -1).indices
            direct[f'ff{li}'] = direct.get(f'ff{li}', 0) + torch.bincount(idx.flatten(), minlength=cfg.ff_n_experts)

        def att_hook(m, args, out, li=li):
            for kind, w in (('v', m.sel_v), ('o', m.sel_o)):
                s = torch.sigmoid(args[0] @ w.T).unflatten(-1, (cfg.n_heads, cfg.att_n_experts))
                idx = s.topk(cfg.att_k, -1).indices + torch.arange(cfg.n_heads)[:, None] * cfg.att_n_experts
                n = cfg.n_heads * cfg.att_n_experts
                direct[f'{kind}{li}'] = direct.get(f'{kind}{li}', 0) + torch.bincount(idx.flatten(), minlength=n)
        hooks += [layer.ffn.register_forward_hook(ff_hook), layer.attention.register_forward_hook(att_hook)]
    with torch.no_grad():
        model(torch.randint(0, 53, (3, 17)))
        model(torch.randint(0, 53, (2, 9)))
    report = routing_report(model)
    assert set(report) == set(direct) == {'ff0', 'ff1', 'v0', 'v1', 'o0', 'o1'}
    for key, counts in direct.items():
        frac = counts.double() / counts.sum()
        torch.testing.assert_close(report[key]['usage'], frac)
        assert report[key]['dead'] == int((counts == 0).sum())
        ent = -(frac[frac > 0] * frac[frac > 0].log()).sum().item()
        assert report[key]['entropy_ratio'] == pytest.approx(ent / math.log(len(counts)))
    # counters were reset: a report with no forward in between is all zeros / all dead
    assert routing_report(model)['ff0']['dead'] == cfg.ff_n_experts


def test_dead_expert_is_reported():
    torch.manual_seed(0)
    model = LM(tiny(ff_k=1)).eval()
    with torch.no_grad():
        layer = model.core.layers[0]
        layer.ln_ff.weight.zero_()                          # router input = all ones for every token
        layer.ln_ff.bias.fill_(1.0)
        layer.ffn.expert_sel.uniform_(0, 1)
        layer.ffn.expert_sel[4] = -1.0                      # so expert 4 can never win
        model(torch.randint(0, 53, (2, 30)))
    rep = routing_report(model)
    assert rep['ff0']['usage'][4] == 0 and rep['ff0']['dead'] >= 1


def test_grad_norms_groups_add_up_to_total():
    torch.manual_seed(0)
    model = LM(tiny())
    x = torch.randint(0, 53, (2, 12))
    model(x, x).loss.backward()
    groups = train.grad_norms(model)
    assert {'grad/embedding', 'grad/lm_head', 'grad/router', 'grad/norm', 'grad/ffn', 'grad/attention'} <= set(groups)
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()
    assert math.sqrt(sum(v ** 2 for v in groups.values())) == pytest.approx(total, rel=1e-5)


def test_logit_stats():
    logits = torch.zeros(2, 3, 8)
    st = train.logit_stats(logits)
    assert st['logits/max_abs'] == 0 and st['logits/entropy'] == pytest.approx(math.log(8))
    logits = torch.tensor([[[0., 0., 5., -7.], [1., 1., 1., 1.]]])   # the largest |logit| is negative
    st = train.logit_stats(logits)
    p = logits.softmax(-1)
    assert st['logits/max_abs'] == 7
    assert st['logits/entropy'] == pytest.approx(-(p * p.log()).sum(-1).mean().item())


def test_expert_muon_equals_torch_muon_on_each_slice():
    torch.manual_seed(0)
    w = torch.randn(5, 12, 7)
    grads = [torch.randn(5, 12, 7) for _ in range(3)]
    bank = torch.nn.Parameter(w.clone())
    slices = [torch.nn.Parameter(w[i].clone()) for i in range(5)]
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn='match_rms_adamw')
    opt3, opt2 = train.ExpertMuon([bank], **kw), torch.optim.Muon(slices, **kw)
    for g in grads:                    # several steps: momentum buffers must agree too
        bank.grad = g.clone()
        for i, p in enumerate(slices):
            p.grad = g[i].clone()
        opt3.step()
        opt2.step()
    torch.testing.assert_close(bank.detach(), torch.stack([p.detach() for p in slices]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(bank.detach(), w)
    wide = torch.nn.Parameter(torch.randn(3, 4, 9))      # wide slices take the other branch
    wide_slices = [torch.nn.Parameter(wide[i].detach().clone()) for i in range(3)]
    g = torch.randn(3, 4, 9)
    wide.grad = g.clone()
    for i, p in enumerate(wide_slices):
        p.grad = g[i].clone()
    train.ExpertMuon([wide], **kw).step()
    torch.optim.Muon(wide_slices, **kw).step()
    torch.testing.assert_close(wide.detach(), torch.stack([p.detach() for p in wide_slices]), rtol=1e-5, atol=1e-6)


def test_muon_groups_and_a_tiny_model_trains():
    torch.manual_seed(0)
    model = LM(tiny())
    cfg = {'optimizer': 'muon', 'learning_rate': 3e-3, 'beta1': 0.9, 'beta2': 0.99, 'weight_decay': 0.0,
           'parallelism': 'ddp'}
    opt = train.make_optimizer(model, cfg, {'device_type': 'cpu', 'distributed': False})
    kinds = [type(o).__name__ for o in opt]
    assert kinds == ['AdamW', 'Muon', 'ExpertMuon']
    adam_ids = {id(p) for g in opt[0].param_groups for p in g['params']}
    named = dict(model.named_parameters())
    for name in ('embedding.weight', 'lm_head.weight', 'lm_head.bias', 'out_norm.weight',
                 'core.layers.0.ffn.expert_sel', 'core.layers.0.attention.sel_v'):
        assert id(named[name]) in adam_ids, name
    assert id(named['core.layers.0.attention.q.weight']) in {id(p) for p in opt[1].param_groups[0]['params']}
    assert id(named['core.layers.0.ffn.keys']) in {id(p) for p in opt[2].param_groups[0]['params']}
    x = torch.randint(0, 53, (4, 16))
    losses = []
    for _ in range(25):
        out = model(x, x.roll(-1, 1))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.ce.item())
    assert losses[-1] < 0.7 * losses[0]
    states = opt.state_dict()
    assert isinstance(states, list) and len(states) == 3
    opt.load_state_dict(states)


def test_write_plots(tmp_path):
    model = LM(tiny()).eval()
    with torch.no_grad():
        model(torch.randint(0, 53, (2, 10)))
    rep = routing_report(model)
    grids = plot.usage_grids(rep, n_heads=model.cfg.n_heads)     # fair-share multiples, heads x experts
    u = np.asarray(rep['ff0']['usage'], dtype=float)
    assert grids['ff0'] == [(u * len(u)).round(3).tolist()]
    H = model.cfg.n_heads
    assert len(grids['v0']) == H and len(grids['v0'][0]) == len(rep['v0']['usage']) // H
    pytest.importorskip('matplotlib')          # (requirements.txt installs it for this test)
    train.append_log(str(tmp_path), {'iter': 1, 'train/loss': 3.0})
    train.append_log(str(tmp_path), {'iter': 2, 'train/loss': 2.5, 'val/loss': 2.7})
    train.write_plots(str(tmp_path), routing_report(model), [0, 3, 5])
    for name in ('expert_usage.png', 'loss.png', 'depth_hist.png'):
        assert (tmp_path / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert not list(tmp_path.glob('*.tmp*'))

"""
The optimizer: AdamW, or Muon for the hidden weight matrices (torch.optim.Muon for 2D ones, ExpertMuon
here for the 3D expert banks), several optimizers stepped as one (Optimizers).
"""
import math

import torch

from configurator import fail


def make_optimizer(model, cfg, run):
    """AdamW on everything (the paper recipe: weight decay on every parameter, spec §8), or Muon.
    Muon orthogonalises the update of hidden weight MATRICES: torch.optim.Muon for the 2D ones (Q/K,
    dense V/O, dense MLP), ExpertMuon below for the 3D expert banks (each expert its own matrix).
    Embedding, LM head, norms, biases and routers stay on AdamW, as Muon's authors recommend.
    adjust_lr_fn='match_rms_adamw' scales Muon's step to AdamW's RMS, so one learning_rate serves both."""
    fused = run['device_type'] == 'cuda'
    betas = (cfg['beta1'], cfg['beta2'])
    if cfg['optimizer'] == 'adamw':
        return torch.optim.AdamW(model.parameters(), lr=cfg['learning_rate'], betas=betas,
                                 weight_decay=cfg['weight_decay'], fused=fused)
    if cfg['optimizer'] != 'muon':
        fail(f"optimizer must be 'adamw' or 'muon', got {cfg['optimizer']!r}")
    if run['distributed'] and cfg['parallelism'] == 'fsdp':
        fail("optimizer='muon' needs whole matrices; it does not work on FSDP shards (use parallelism='ddp')")
    hidden2, hidden3, rest = [], [], []
    for name, p in model.named_parameters():
        is_router = name.endswith(('expert_sel', 'sel_v', 'sel_o', 'router_conv'))
        is_hidden = name.startswith(('core.', 'module.core.')) and p.ndim >= 2 and not is_router
        (hidden3 if is_hidden and p.ndim == 3 else hidden2 if is_hidden else rest).append(p)
    kw = dict(lr=cfg['learning_rate'], weight_decay=cfg['weight_decay'], adjust_lr_fn='match_rms_adamw')
    opts = [torch.optim.AdamW(rest, lr=cfg['learning_rate'], betas=betas, weight_decay=cfg['weight_decay'],
                              fused=fused)]
    opts += [torch.optim.Muon(hidden2, **kw)] if hidden2 else []
    opts += [ExpertMuon(hidden3, **kw)] if hidden3 else []
    return Optimizers(opts)


class ExpertMuon(torch.optim.Optimizer):
    """torch.optim.Muon's update for a bank of matrices [E, A, B]: momentum (Nesterov), then a
    Newton-Schulz orthogonalisation of every expert's [A, B] slice at once (bmm over E), the same
    coefficients, normalisation and lr adjustment as torch.optim.Muon applies to one 2D matrix."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                                      adjust_lr_fn=adjust_lr_fn))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g['params']:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault('momentum_buffer', torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - g['momentum'])
                update = p.grad.lerp(buf, g['momentum']) if g['nesterov'] else buf
                update = newton_schulz_batched(update, g['ns_coefficients'], g['ns_steps'], g['eps'])
                A, B = p.shape[1:]
                ratio = {'match_rms_adamw': 0.2 * math.sqrt(max(A, B)), None: math.sqrt(max(1, A / B)),
                         'original': math.sqrt(max(1, A / B))}[g['adjust_lr_fn']]
                p.mul_(1 - g['lr'] * g['weight_decay'])
                p.add_(update.to(p.dtype), alpha=-g['lr'] * ratio)


def newton_schulz_batched(g, coefficients, steps, eps):
    """Approximate orthogonalisation of each [A, B] slice of g [E, A, B] (quintic Newton-Schulz in bf16)."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(1) > g.size(2)
    if tall:
        x = x.transpose(1, 2)
    x = x / x.flatten(1).norm(dim=1).clamp(min=eps)[:, None, None]     # spectral norm <= 1, per expert
    for _ in range(steps):
        gram = x @ x.transpose(1, 2)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.transpose(1, 2) if tall else x


class Optimizers(list):
    """Several optimizers used as one (step, zero_grad, param_groups, state_dict), e.g. AdamW + Muon."""

    @property
    def param_groups(self):
        return [g for o in self for g in o.param_groups]

    @property
    def state(self):
        return {k: v for o in self for k, v in o.state.items()}

    def step(self, closure=None):
        for o in self:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return [o.state_dict() for o in self]

    def load_state_dict(self, states):
        for o, st in zip(self, states):
            o.load_state_dict(st)


"""
What train.py logs besides the loss, computed only at log time (cheap): gradient norms per parameter
group, logit statistics, routing balance and dead experts, halting depth; and one decoded example.
"""
import torch


def grad_norms(model):
    """L2 norm of the gradient of each parameter group (before clipping)."""
    groups = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = ('embedding' if 'embedding' in name else 'lm_head' if 'lm_head' in name
             else 'router' if name.endswith(('expert_sel', 'sel_v', 'sel_o', 'router_conv')) or '.halt' in name or '.router' in name
             else 'norm' if '.ln' in name or 'norm' in name
             else 'ffn' if '.ffn.' in name or '.fc' in name else 'attention' if 'att' in name
             else 'other')
        groups[g] = groups.get(g, 0) + p.grad.detach().float().pow(2).sum()
    return {f'grad/{k}': v.sqrt().item() for k, v in groups.items()}


@torch.no_grad()
def logit_stats(logits):
    """Largest |logit| and the mean entropy (nats) of the predictive distribution: collapsing or
    exploding logits show up here before the loss does."""
    lp = torch.log_softmax(logits.float(), -1)
    return {'logits/max_abs': logits.abs().max().item(), 'logits/entropy': -(lp.exp() * lp).sum(-1).mean().item()}


def routing_summary(report):
    """Scalars of routing_report: dead experts and usage balance (entropy / max) per bank."""
    out = {}
    for key, r in report.items():
        out[f'dead/{key}'] = r['dead']
        out[f'balance/{key}'] = round(r['entropy_ratio'], 4)
        if 'null_frac' in r:     # ff_n_null: the share of picks that went to MoE++ null experts
            out[f'null/{key}'] = round(r['null_frac'], 4)
    return out



def halting_stats(core):
    """(mean depth, ponder or aux loss) of the last forward of a halting core; () for plain models.
    Detached tensors, read on the host only at log time: no GPU sync per step. The caller copies them
    (torch.stack) before the next step: a model replayed as CUDA graphs overwrites them then."""
    st = getattr(core, 'stats', None)
    if not st or 'mean_depth' not in st:
        return ()
    aux = st.get('ponder', st.get('aux'))
    return st['mean_depth'].float(), (aux if aux is not None else st['mean_depth'] * 0).float()


def show_example(xy, meta):
    """Print the first input/target pair decoded, so an off-by-one in the data slicing is visible."""
    import prepare
    enc = prepare.get_tokenizer(meta['tokenizer'])
    x, y = xy
    print(f"input : {enc.decode(x[0, :64].tolist())!r}")
    print(f"target: {enc.decode(y[0, :64].tolist())!r}")


def diagnostics_record(diag, routing, n_heads, show):
    """log.jsonl entries of a log interval: `diag` (grad_norms, logit_stats of its last step) and the
    routing of the interval (routing_report); show: also print them, and record each bank's usage for
    plot.py's heatmaps (at eval intervals: a few hundred numbers)."""
    from plot import usage_grids
    record = {k: round(v, 4) for k, v in diag.items()}
    record.update(routing_summary(routing))
    if show:
        print('       ' + ', '.join(f"{k} {v:.3g}" for k, v in record.items()))
        record['usage'] = usage_grids(routing, n_heads)
    return record

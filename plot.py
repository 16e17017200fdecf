"""
Plots of training runs, drawn from their out_dir/log.jsonl (train.py draws them at every eval when
matplotlib is installed):

    python plot.py out/a [out/b ...] [--to=DIR]

loss.png         train and val cross-entropy (not CE + the routers' regularisers) of every run on one
                 axis; into the run's out_dir, or for several runs into --to (default: the current directory)
expert_usage.png per run: routed slots per expert over the last logged interval, as a multiple of the
                 fair share (0 = a dead expert): σ-MoE layers x experts, and for SwitchHead's V and O
                 routers one panel per layer of heads x experts
depth_hist.png   per run, halting models only: val tokens per number of passes through the shared group
"""
import json
import os
import sys

import numpy as np

_NO_PLOTS_SAID = []


def _pyplot():
    """matplotlib.pyplot with a file-only backend, or None (said once per process)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        if not _NO_PLOTS_SAID:
            _NO_PLOTS_SAID.append(True)
            print("note: no plots (matplotlib is not installed); the diagnostics are in log.jsonl")
        return None
    return plt


def usage_grids(routing, n_heads=None):
    """routing_report's usage as fair-share multiples: {bank: [[...]]}, one row for a σ-MoE bank ('ff0'),
    heads x experts for a SwitchHead bank ('v0', 'o0': its experts are numbered h*E + e)."""
    grids = {}
    for key, r in routing.items():
        u = np.asarray(r['usage'], dtype=float) * len(r['usage'])
        if not key.startswith('ff') and n_heads and len(u) % n_heads == 0:
            u = u.reshape(n_heads, -1)
        grids[key] = np.atleast_2d(u).round(3).tolist()
    return grids


def read_log(out_dir):
    path = os.path.join(out_dir, 'log.jsonl')
    if not os.path.exists(path):
        return []
    recs = []
    with open(path) as f:
        for line in f:
            try:
                recs.append(json.loads(line))
            except ValueError:       # a line cut short when the run was killed
                pass
    return recs


def draw_loss(plt, runs, path):
    """runs: {label: log records}. Train CE per log interval (loss minus the regularisers), val CE per eval."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, recs) in enumerate(runs.items()):
        color = f'C{i}'
        tr = [(r['iter'], r['train/loss'] - r.get('train/reg_loss', 0.0)) for r in recs if 'train/loss' in r]
        va = [(r['iter'], r['val/loss']) for r in recs if 'val/loss' in r]
        if tr:
            ax.plot(*zip(*tr), color=color, alpha=0.6, label=f'{label} train CE')
        if va:
            ax.plot(*zip(*va), 'o-', color=color, label=f'{label} val CE')
    ax.set_xlabel('iter')
    ax.set_ylabel('cross-entropy (nats/token)')
    ax.legend(fontsize='small')
    return _save(fig, path, plt)


def draw_usage(plt, grids, path):
    ff = [k for k in grids if k.startswith('ff')]
    att = [k for k in grids if not k.startswith('ff')]
    panels = ([('σ-MoE feed-forward: layer x expert', ff)] if ff else []) + [(k, [k]) for k in att]
    rows = [len(keys) if len(keys) > 1 or keys[0].startswith('ff') else len(grids[keys[0]]) for _, keys in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 0.6 + sum(0.3 * r + 0.9 for r in rows)), squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels):
        if len(keys) > 1 or keys[0].startswith('ff'):      # one row per layer
            width = max(len(grids[k][0]) for k in keys)
            grid = np.full((len(keys), width), np.nan)
            for i, k in enumerate(keys):
                grid[i, :len(grids[k][0])] = grids[k][0]
            labels, ylabel = [f'layer {k[2:]}' for k in keys], 'layer'
        else:
            k = keys[0]
            grid = np.asarray(grids[k], dtype=float)
            labels, ylabel = [f'head {h}' for h in range(len(grid))], 'head'
            title = f"SwitchHead {'value' if k[0] == 'v' else 'output'} experts, layer {k[1:]}: head x expert"
        im = ax.imshow(grid, aspect='auto', cmap='viridis', interpolation='nearest', vmin=0)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_ylabel(ylabel)
        ax.set_xlabel('expert')
        ax.set_title(title, fontsize='medium')
        fig.colorbar(im, ax=ax)
    fig.suptitle('routed slots / fair share over the last log interval (0 = dead expert)')
    return _save(fig, path, plt)


def draw_depth(plt, hist, path):
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(range(len(hist)), hist)
    ax.set_xticks(range(len(hist)))          # depths are whole passes
    ax.set_xlabel('passes through the shared group')
    ax.set_ylabel('val tokens')
    return _save(fig, path, plt)


def _save(fig, path, plt):
    fig.tight_layout()
    fig.savefig(path + '.tmp.png', dpi=90)      # atomic, like every other file we write
    os.replace(path + '.tmp.png', path)
    plt.close(fig)
    return path


def write_plots(out_dir, routing, depth_hist, wandb=None, n_heads=None):
    """train.py at eval: loss.png from log.jsonl, expert_usage.png from `routing` (routing_report),
    depth_hist.png from `depth_hist`. Returns the paths written."""
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    if routing:
        written.append(draw_usage(plt, usage_grids(routing, n_heads), os.path.join(out_dir, 'expert_usage.png')))
    recs = read_log(out_dir)
    if any('train/loss' in r for r in recs):
        written.append(draw_loss(plt, {os.path.basename(os.path.normpath(out_dir)): recs},
                                 os.path.join(out_dir, 'loss.png')))
    if depth_hist:
        written.append(draw_depth(plt, depth_hist, os.path.join(out_dir, 'depth_hist.png')))
    if wandb:
        wandb.log({os.path.basename(w)[:-4]: wandb.Image(w) for w in written})
    return written


def plot_runs(out_dirs, to=None):
    """What `python plot.py` draws; returns the paths written."""
    plt = _pyplot()
    if plt is None:
        return []
    runs, written = {}, []
    for d in out_dirs:
        recs = read_log(d)
        if not recs:
            raise SystemExit(f"error: {os.path.join(d, 'log.jsonl')} is missing or empty: not a train.py out_dir")
        runs[os.path.normpath(d)] = recs     # out/a/ (a shell glob of folders) is labelled out/a
        usage = [r['usage'] for r in recs if 'usage' in r]
        if usage:
            written.append(draw_usage(plt, usage[-1], os.path.join(d, 'expert_usage.png')))
        depth = [r['val/depth_hist'] for r in recs if 'val/depth_hist' in r]
        if depth:
            written.append(draw_depth(plt, depth[-1], os.path.join(d, 'depth_hist.png')))
    to = to or (out_dirs[0] if len(out_dirs) == 1 else '.')
    if any('train/loss' in r for recs in runs.values() for r in recs):
        written.append(draw_loss(plt, runs, os.path.join(to, 'loss.png')))
    return written


if __name__ == '__main__':
    args = sys.argv[1:]
    to = next((a.split('=', 1)[1] for a in args if a.startswith('--to=')), None)
    dirs = [a for a in args if not a.startswith('--')]
    if not dirs or any(a in ('-h', '--help') for a in args):
        print(__doc__.strip())
        sys.exit(0 if dirs or args else 2)
    for p in plot_runs(dirs, to):
        print(f"wrote {p}")

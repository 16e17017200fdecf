"""
Per-token dynamic depth for MoEUT: each token decides how many passes through the G shared layers it
takes, and a token that has stopped costs nothing (design: ../shared/spec/halting.md, "spec" below).

    for r in range(R):                      # one step = one pass through the G shared layers
        rows = Rows(run)                    #   which tokens run this step (a gather/scatter plan)
        xa   = rows.gather(x)               #   gather: [1, N_active, d]
        ya   = G layers(xa)                 #   step: σ-MoE, V/O experts and norms see only active rows
        x    = rows.scatter(x, ya)          #   scatter: halted tokens keep their state
        run  = decide(r, ya)                #   decide who runs step r+1

Mechanisms (config `halting`):
  'act'  Adaptive Computation Time (Graves 2016, arXiv 1603.08983), as in Universal Transformers:
         after each step a halting unit h = sigmoid(w·LN(x) + b); a token halts once Σh ≥ 1 - eps and its
         last step takes the remainder R = 1 - Σ_{n<N} h_n, so the step weights p sum to exactly 1.
         Output Σ p_n·x_n; loss τ·mean(N + R) (gradient through R). Causal: decisions read one token.
  'mor'  Mixture-of-Recursions (Bae et al. 2025, arXiv 2507.10524).
         expert-choice: before step r a router scores the tokens still alive; the top capacity_r·T per
         sequence continue, their update scaled by alpha·sigmoid(score); a BCE aux loss teaches the score
         to predict selection. Top-k over the sequence is NOT causal (a token's depth depends on later
         tokens): in eval mode (mor_causal_eval) and for decoding, sigmoid(score) > 0.5 replaces top-k,
         so report eval loss in that mode.
         token-choice: a router picks each token's depth once at entry (softmax over R, argmax); the
         update of its last step is scaled by alpha·p; a balancing loss spreads the depths. Causal.
  'none' no halting unit: the plain loop (every token runs every step, no host syncs), for the options
         below. Same parameter names as model.MoEUT, so a plain checkpoint loads into this core.
  Forced depths (`forced_depths(core, depths)`) override all: for tests and benchmarks.

Compute: per-token maps (LayerNorms, σ-MoE, SwitchHead's V/O experts and routers) run on the flat
active rows; only attention re-pads them per sequence ([B, T_active_max], valid slots first), which with
no cache is plain causal attention on the compacted tokens. So work at step r ∝ active tokens, and
the entropy regulariser (spec/moeut.md §6) pools only rows that ran.
halt_buckets = K > 0 (PaddedRows): every map runs on that padded [B, Tb] layout instead, Tb rounded up to
one of at most K sizes, so the shapes stop changing with each step's exact counts and compile_layers can
compile each bucket once with static shapes. Padding is invisible: masked keys, never scattered, weight 0
in the regulariser, not counted in the routing statistics (docs/depth.md "Bucketed steps").
MoR expert-choice needs neither: its top-k keeps fixed counts, so a training forward reads no host value
and torch.compile takes the whole model as one graph (one_graph(); train.py does, CUDA graphs allowed).

Attention over halted tokens (config `halt_kv`, spec "Token dropping"):
  'active-only' (default; MoR recursion-wise caching, Mixture-of-Depths): at step r, tokens attend only
      to tokens that also run step r. The decode cache of step r holds exactly those tokens.
  'last-kv': a halted token stays visible with the K/V it had at its last step; the (step, layer) caches
      get its frozen K/V copied forward, so decoding still equals the full forward.
  Per-token exit (below) names them as Huginn does: 'latest' = last-kv (its default; zero-shot, since
  the model trained with every token at every step), 'skip' = active-only.
Positions travel explicitly (slot ≠ position after compaction); masks are built from positions, never
is_causal on queries ≠ keys; a query with no visible key attends to itself (no NaN), output discarded.

Also: per-token running mean of step outputs as the final state (halt_output='mean'), and
"middle-cycle" sharing: n_prelude / n_coda unique layers around the looped group (MoR §2.1).

Recurrent depth beyond a fixed R (../shared/spec/recurrence.md; Huginn: Geiping et al. 2025, arXiv
2502.05171):
  test-time depth   set_depth(model, n_repeats=n): eval mode runs n repeats instead of the trained R
                    (plain MoEUT too); ACT runs until every token halts, at most n. depth_curve() prints
                    the loss against n.
  random depth      recurrence='random' (halting='none'): each training step's R ~ a log-normal Poisson
                    with mean mean_repeats (DepthSampler: the same on every rank, state in the
                    state_dict); backprop_repeats=k: only the last k repeats carry gradient.
  input injection   input_injection='add' (state + e) or 'concat' (Huginn's adapter on [state, e]) before
                    every repeat, e = the prelude's output; random_init_state: training starts from noise.
  per-token exit    set_depth(model, exit_threshold=t) for a model without a halting unit: a token stops
                    once KL(p_r || p_r-1) < t (or the entropy change, exit_criterion='entropy').
This file builds on model.py, never the reverse: build_lm(cfg) is how a config becomes a model.
"""
import math
import os
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (LM, AttnContext, ModelConfig, MoEUTLayer, Routes, distinct_layers, marginal_neg_entropy,
                   rope, sdpa)


# -------------------------------------------------------------------------------------------------
# The gather/scatter plan of one step
# -------------------------------------------------------------------------------------------------

class Rows:
    """The tokens that run one step. run: [B, T] bool. Per-token maps see them as flat rows [1, N, ...]
    (or, when every token runs, the untouched [B, T, ...] tensors: then the step is the plain MoEUT
    step, bit for bit). Attention sees them re-padded per sequence: [B, Tm] slots, valid ones first.
    per_row: [B, k] sorted token indices when every sequence runs exactly k tokens (MoR top-k): no
    host sync, no padding. Otherwise one host sync per step reads N and Tm (shapes depend on them),
    unless the caller passes them as counts (MoR token-choice reads every step's at once).
    everyone: the caller knows that every token runs (halting='none', step 0 of ACT and MoR
    token-choice): no sync either."""
    pad_rows = None          # PaddedRows: which rows are padding (routed_counts in model.py skips them)

    def __init__(self, run: torch.Tensor, pos: torch.Tensor, per_row: Optional[torch.Tensor] = None,
                 everyone: bool = False, counts: Optional[list] = None):
        """counts: (N, longest count) when the caller read them already (no sync here)."""
        B, T = run.shape
        self.B, self.T, self.run, self.pos = B, T, run, pos          # pos: [B, T] absolute positions
        if everyone:                 # the caller knows every token runs: no host sync (the plain loop)
            self.n, self.tm = B * T, T
        elif per_row is not None:
            self.n, self.tm = per_row.numel(), per_row.shape[1]
        else:
            per_seq = run.sum(1)
            self.n, self.tm = counts or torch.stack([per_seq.sum(), per_seq.max()]).tolist()
        self.all = self.n == B * T
        if self.all or self.n == 0:
            return
        dev = run.device
        if per_row is not None:
            idx = (per_row + torch.arange(B, device=dev)[:, None] * T).flatten()
        else:
            # sorted: sequence-major, then time. nonzero_static: n is known, so no second host sync
            idx = torch.nonzero_static(run.flatten(), size=self.n).squeeze(1)
        self.idx, self.b, self.t = idx, idx // T, idx % T
        self.rope_pos = pos.flatten().index_select(0, idx)            # [N] positions of the active rows
        if self.n == B * self.tm:                                     # same count in every sequence
            self.pad_idx = None
        else:
            start = per_seq.cumsum(0) - per_seq
            self.pad_idx = self.b * self.tm + torch.arange(self.n, device=dev) - start[self.b]
        self.pos_pad = self._pad1(self.rope_pos, 0)                   # [B, Tm]
        self.t_pad = self._pad1(self.t, 0)
        self.valid_pad = self._pad1(torch.ones(self.n, dtype=torch.bool, device=dev), False)

    # ---- per-token tensors: [B, T, ...] <-> rows [1, N, ...] (out-of-place: autograd needs the old x)
    def gather(self, full):
        return full if self.all else full.flatten(0, 1).index_select(0, self.idx).unsqueeze(0)

    def scatter(self, full, rows):
        """full with the active tokens' entries replaced by rows; the others are untouched."""
        if self.all:
            return rows.to(full.dtype)
        return full.flatten(0, 1).index_copy(0, self.idx, rows[0].to(full.dtype)).view_as(full)

    def add(self, full, rows):
        if self.all:
            return full + rows
        return full.flatten(0, 1).index_add(0, self.idx, rows[0].to(full.dtype)).view_as(full)

    def mean(self, rows):
        return rows.mean()

    def route_rows(self):
        """(sequence id of each row or None = [B, T] layout, row weights or None): for the regulariser."""
        return (None, None) if self.all else (self.b, None)

    # ---- attention layout: rows [1, H, N, dh] <-> padded [B, H, Tm, dh]
    def _pad1(self, v, fill):
        if self.pad_idx is None:
            return v.view(self.B, self.tm)
        return v.new_full((self.B * self.tm,), fill).index_copy(0, self.pad_idx, v).view(self.B, self.tm)

    def pad(self, t):
        if self.all:
            return t
        H, dh = t.shape[1], t.shape[3]
        flat = t[0].transpose(0, 1)                                   # [N, H, dh]
        if self.pad_idx is not None:
            flat = flat.new_zeros(self.B * self.tm, H, dh).index_copy(0, self.pad_idx, flat)
        return flat.reshape(self.B, self.tm, H, dh).transpose(1, 2)

    def unpad(self, t):
        if self.all:
            return t
        flat = t.transpose(1, 2).reshape(self.B * self.tm, t.shape[1], t.shape[3])
        if self.pad_idx is not None:
            flat = flat.index_select(0, self.pad_idx)
        return flat.transpose(0, 1).unsqueeze(0)

    def write_kv(self, buf: dict, k, v):
        """last-kv: put the active tokens' new K/V into the per-layer buffer of all T tokens."""
        if self.all:
            buf.update(k=k, v=v, pos=self.pos, valid=torch.ones_like(self.run))
            return
        if 'k' not in buf:       # K may have fewer heads than V (n_kv_heads: SwitchHead shares K only)
            k0, v0 = (t.new_zeros(self.B, t.shape[1], self.T, t.shape[3]) for t in (k, v))
            buf.update(k=k0, v=v0, pos=self.pos, valid=torch.zeros_like(self.run))
        for name, new in (('k', k), ('v', v)):
            old = buf[name]
            B, H, T, dh = old.shape
            flat = old.transpose(1, 2).reshape(B * T, H, dh).index_copy(0, self.idx, new[0].transpose(0, 1))
            buf[name] = flat.view(B, T, H, dh).transpose(1, 2)
        buf['valid'] = buf['valid'] | self.run

    def attention(self, ctx: AttnContext, kv: str, buf: dict):
        return CompactAttention(self, ctx, kv, buf)


class PaddedRows(Rows):
    """halt_buckets = K > 0: the tokens that run one step in ONE layout for every map, [B, Tb] slots, each
    sequence's active tokens first (in time order), then padding. Tb = the most active tokens of any
    sequence rounded UP to a multiple of ceil(T / K): at most K shapes, so layers compiled with static
    shapes compile once per bucket, and the shapes no longer change with every step's exact counts.
    Attention runs on this layout as it is (no re-padding); causal in slot order puts every padding key
    after every real query. Padding slots hold a copy of token 0 (finite; their outputs are never read
    back): not scattered, weight 0 in the regulariser (route_rows), off the routing counts (pad_rows).
    Compute: B·Tb rows instead of the N active ones (bench.py measures the trade). One host sync as in
    Rows (N and the longest count), or none when the caller knows them (every token runs at step 0 of
    ACT and MoR token-choice; token-choice reads every step's counts at once)."""

    def __init__(self, run: torch.Tensor, pos: torch.Tensor, buckets: int, everyone: bool = False,
                 counts: Optional[list] = None):
        """counts: (N, longest count) when the caller read them already (no sync here)."""
        B, T = run.shape
        self.B, self.T, self.run, self.pos = B, T, run, pos
        if everyone:                 # the caller knows every token runs (step 0 of ACT, MoR token-choice)
            self.n, self.tm, self.all = B * T, T, True
            return
        dev = run.device
        per_seq = run.sum(1)
        # what needs no host value is queued before the sync: the GPU still has the last step to run
        # then, while after it, it waits for whatever Python launches next
        idx = torch.nonzero_static(run.flatten(), size=B * T, fill_value=0).squeeze(1)   # active first
        b = idx // T
        rank = torch.arange(B * T, device=dev) - (per_seq.cumsum(0) - per_seq)[b]     # place in its sequence
        self.n, tm = counts or torch.stack([per_seq.sum(), per_seq.max()]).tolist()
        self.all = self.n == B * T
        if self.all or self.n == 0:
            self.tm = T if self.all else 0
            return
        step = -(-T // buckets)
        self.tm = tm = min(T, -(-tm // step) * step)
        self.idx = idx[:self.n]                                                     # sequence-major, then time
        self.pad_idx = b[:self.n] * tm + rank[:self.n]                              # slot of each active token
        self.src = idx.new_zeros(B * tm).index_copy(0, self.pad_idx, self.idx)     # token of each slot
        self.valid_pad = torch.arange(tm, device=dev) < per_seq[:, None]           # [B, Tb]
        self.pad_rows = ~self.valid_pad.flatten()
        self.pos_pad = self.rope_pos = pos.flatten().index_select(0, self.src).view(B, tm)
        self.t_pad = (self.src % T).view(B, tm)

    def gather(self, full):
        if self.all:
            return full
        return full.flatten(0, 1).index_select(0, self.src).view(self.B, self.tm, *full.shape[2:])

    def _real(self, rows, dtype):
        """The active tokens' rows, in the order of self.idx."""
        return rows.flatten(0, 1).index_select(0, self.pad_idx).to(dtype)

    def scatter(self, full, rows):
        if self.all:
            return rows.to(full.dtype)
        return full.flatten(0, 1).index_copy(0, self.idx, self._real(rows, full.dtype)).view_as(full)

    def add(self, full, rows):
        if self.all:
            return full + rows
        return full.flatten(0, 1).index_add(0, self.idx, self._real(rows, full.dtype)).view_as(full)

    def mean(self, rows):
        if self.all:
            return rows.mean()
        return torch.where(self.valid_pad, rows, torch.zeros_like(rows)).sum() / self.n

    def route_rows(self):
        """[B, Tb] layout (sequence ids follow from the shape), padding weighted 0."""
        return (None, None) if self.all else (None, self.valid_pad.flatten())

    def pad(self, t):
        return t                     # already in the attention layout

    def unpad(self, t):
        return t

    def write_kv(self, buf: dict, k, v):
        if self.all:
            return super().write_kv(buf, k, v)
        B, T, tm = self.B, self.T, self.tm
        if 'k' not in buf:
            k0, v0 = (t.new_zeros(B, t.shape[1], T, t.shape[3]) for t in (k, v))
            buf.update(k=k0, v=v0, pos=self.pos, valid=torch.zeros_like(self.run))
        # each slot's row in the [B*T] buffer; padding goes to rows past its end, dropped again
        dest = torch.where(self.pad_rows, B * T + torch.arange(B * tm, device=k.device), self.src)
        for name, new in (('k', k), ('v', v)):
            old = buf[name]
            H, dh = old.shape[1], old.shape[3]
            flat = torch.cat([old.transpose(1, 2).reshape(B * T, H, dh), old.new_zeros(B * tm, H, dh)])
            flat = flat.index_copy(0, dest, new.transpose(1, 2).reshape(B * tm, H, dh))[:B * T]
            buf[name] = flat.view(B, T, H, dh).transpose(1, 2)
        buf['valid'] = buf['valid'] | self.run


def _cache_append(cache: dict, k, v, pos, valid):
    """One (step, layer) cache: keys already rotated, with their positions and validity (slots of a
    padded block, or tokens that never ran this layer, are invalid)."""
    if 'k' in cache:
        k, v = torch.cat([cache['k'], k], 2), torch.cat([cache['v'], v], 2)
        pos, valid = torch.cat([cache['pos'], pos], 1), torch.cat([cache['valid'], valid], 1)
    cache.update(k=k, v=v, pos=pos, valid=valid)
    return k, v, pos, valid


class CompactAttention:
    """Stands in for AttnContext inside model.attend (which hands over to .attend): runs attention for
    the active rows of one (step, layer). q, k, v arrive as rows [1, H, N, dh] (or [B, H, T, dh])."""

    def __init__(self, rows: Rows, ctx: AttnContext, kv: str, buf: dict):
        self.rows, self.ctx, self.kv, self.buf = rows, ctx, kv, buf
        self.pos = ctx.pos
        self.pad_rows = rows.pad_rows        # padding rows (PaddedRows) that routed_counts must not count

    def attend(self, q, k, v, cache, n_rot, base, ssmax=None):
        rows, ctx = self.rows, self.ctx
        pos = ctx.pos if rows.all else rows.rope_pos        # slot index != position: rotate explicitly
        cs = ctx.cos_sin if rows.all else None              # LM.forward's, computed at ctx.pos
        q, k = rope(q, pos, n_rot, base, cs), rope(k, pos, n_rot, base, cs)
        q = rows.pad(q)
        if self.kv == 'last-kv':     # keys: all tokens, halted ones with the K/V of their last step
            rows.write_kv(self.buf, k, v)
            k, v, kpos, kvalid = (self.buf[n] for n in ('k', 'v', 'pos', 'valid'))
        elif rows.all:               # keys: only the tokens that run this step
            kpos, kvalid = rows.pos, torch.ones_like(rows.run)
        else:
            k, v, kpos, kvalid = rows.pad(k), rows.pad(v), rows.pos_pad, rows.valid_pad
        n_past = cache['k'].shape[2] if cache is not None and 'k' in cache else 0
        if cache is not None:
            k, v, kpos, kvalid = _cache_append(cache, k, v, kpos, kvalid)
        causal_base = ctx.mask is None and (ctx.is_causal or rows.T == 1)
        # ctx.mask spans the model's whole cache, this (step, layer) may hold fewer keys: a chunk after
        # a prompt whose tokens all halted before this step (active-only). Then only _mask fits.
        mask_fits = ctx.mask is None or ctx.mask.shape[-1] == k.shape[-2]
        if n_past == 0 and rows.all and mask_fits:   # nobody halted yet: exactly model.attend
            mask, is_causal = ctx.mask, ctx.is_causal
        elif n_past == 0 and self.kv == 'active-only' and causal_base:
            # compacted slots are in time order with the valid ones first: causal in slot order is
            # causal in position, padded keys come after every valid query (and padded queries,
            # discarded, see at least themselves). So flash attention still applies.
            mask, is_causal = None, True       # (one slot: causal is trivially right; no SymBool under compile)
        else:
            mask, is_causal = self._mask(kpos, kvalid, n_past), False
        # GQA and SSMax as in model.attend; SSMax's n counts the keys this mask shows (tokens at this step)
        out = sdpa(q, k, v, mask, is_causal, ssmax)
        return rows.unpad(out)

    def _mask(self, kpos, kvalid, n_past):
        """[B, 1, Tm, Tk] bool, True = attend, from positions (spec: is_causal is wrong once queries !=
        keys). ctx.mask, if any, is indexed by (new-token index, absolute key position)."""
        rows, ctx = self.rows, self.ctx
        if rows.all:
            qpos, qt, qvalid = rows.pos, torch.arange(rows.T, device=kpos.device).expand(rows.B, -1), None
        else:
            qpos, qt, qvalid = rows.pos_pad, rows.t_pad, rows.valid_pad
        # index of each query's own key among the new keys: its token (last-kv) or its slot
        own = qt if rows.all or self.kv == 'last-kv' else torch.arange(rows.tm, device=kpos.device)
        if ctx.mask is None:
            ok = (kpos[:, None, :] <= qpos[:, :, None]) if ctx.is_causal else \
                torch.ones(qpos.shape + kpos.shape[-1:], dtype=torch.bool, device=kpos.device)
        else:
            m = ctx.mask.reshape(-1, *ctx.mask.shape[-2:]).expand(rows.B, -1, -1)     # [B, T, Tk]
            b = torch.arange(rows.B, device=kpos.device)[:, None, None]
            ok = m[b, qt[:, :, None], kpos.clamp(min=0)[:, None, :]]
        ok = ok & kvalid[:, None, :]
        if qvalid is not None:
            ok = ok & qvalid[:, :, None]
        # a query with nothing to see (a padded slot, or masked out entirely) gets its own key: no NaN
        lonely = ~ok.any(-1, keepdim=True)
        own_key = torch.arange(ok.shape[-1], device=ok.device) == (own + n_past)[..., None]
        return (ok | (lonely & own_key))[:, None]


# -------------------------------------------------------------------------------------------------
# Entropy regulariser over the rows that actually ran (spec/moeut.md §6, pooled per sequence)
# -------------------------------------------------------------------------------------------------

class RouteLog:
    """Router logits of every layer application, with the sequence id of each row."""

    def __init__(self, B: int):
        self.B, self.by_layer = B, {}

    def add(self, key, routes: dict, rows: Optional[Rows]):
        bidx, keep = (None, None) if rows is None else rows.route_rows()
        d = self.by_layer.setdefault(key, {'ff': [], 'v': [], 'o': []})
        for kind, zs in routes.items():
            d[kind] += [(z, bidx, keep) for z in zs]

    def loss(self, cfg: ModelConfig, x) -> torch.Tensor:
        loss = x.new_zeros((), dtype=torch.float32)
        for d in self.by_layer.values():          # same order and sums as MoEUT.reg_loss
            if d['ff']:
                loss = loss + cfg.entropy_reg * self.neg_entropy(d['ff'])
            if d['v']:
                loss = loss + cfg.att_entropy_reg * (self.neg_entropy(d['v']) + self.neg_entropy(d['o']))
        return loss

    def neg_entropy(self, entries) -> torch.Tensor:
        if all(b is None and w is None for _, b, w in entries):    # nobody halted: the plain formula
            return marginal_neg_entropy([z for z, _, _ in entries])
        zs, bs, ws = [], [], []
        for z, b, w in entries:
            if b is None:
                b = torch.arange(z.shape[0], device=z.device).repeat_interleave(z.shape[1])
            zs.append(z.flatten(0, 1))
            bs.append(b)
            ws.append(torch.ones(b.shape, device=z.device) if w is None else w.float())
        p = torch.softmax(torch.cat(zs).float(), dim=-1)                         # [M, ..., E]
        b, w = torch.cat(bs), torch.cat(ws)
        w = w.view(-1, *[1] * (p.dim() - 1))
        p_sum = p.new_zeros(self.B, *p.shape[1:]).index_add(0, b, p * w)
        count = w.new_zeros(self.B, *[1] * (p.dim() - 1)).index_add(0, b, w)
        p = p_sum / count.clamp(min=1)                         # per-sequence marginal over experts
        entropy = -(p * p.clamp(min=1e-30).log()).sum(-1)
        # mean over the sequences that ran this layer at all: one with no rows has no marginal (its
        # entropy would read 0 and pull the mean)
        ran = (count.squeeze(-1) > 0).expand_as(entropy)
        return -(entropy * ran).sum() / ran.sum().clamp(min=1)


# -------------------------------------------------------------------------------------------------
# The halting core: MoEUT's interface, the plain model's parameter names plus the halting unit/router
# -------------------------------------------------------------------------------------------------

class LoopState:
    """The halting state of one forward (depth so far, who runs next, the mechanism's bookkeeping): plain
    attributes, so torch.compile traces a loop that needs no host value (MoR expert-choice top-k,
    HaltingMoEUT.one_graph) as one graph (it cannot trace types.SimpleNamespace)."""
    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


class HaltingMoEUT(nn.Module):
    """The looped group with everything round the plain loop: halting (ACT, MoR), prelude/coda,
    random depth, input injection, test-time depth and per-token exit. halting='none' is the plain
    loop (every token runs every repeat) with the same parameter names as model.MoEUT, so a plain
    checkpoint loads into it."""
    rows_cls = Rows          # tests swap in a dense torch.where reference

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        def bad(msg):
            raise ValueError(f"model config: {msg}")
        checks = (('halting', ('none', 'act', 'mor')), ('halt_kv', ('active-only', 'last-kv')),
                  ('halt_output', ('auto', 'last', 'mean', 'weighted')), ('mor_routing', ('expert', 'token')),
                  ('mor_gate', ('router', 'none')), ('recurrence', ('fixed', 'random')),
                  ('input_injection', ('none', 'add', 'concat')))
        for key, allowed in checks:
            if getattr(cfg, key) not in allowed:
                bad(f"{key} must be one of {allowed}, got {getattr(cfg, key)!r}")
        if cfg.halt_output == 'weighted' and cfg.halting != 'act':
            bad("halt_output='weighted' (Σ p·state) needs halting='act'")
        if cfg.n_prelude < 0 or cfg.n_coda < 0:
            bad("n_prelude and n_coda must be >= 0")
        self.cfg, G = cfg, cfg.group_size
        self.n_repeats = R = cfg.n_layers // G     # with halting, n_layers counts the looped part only
        if cfg.halting == 'act' and not 0 < cfg.act_eps < 1:
            bad(f"act_eps must be in (0, 1) (a token halts once its halting sum reaches 1 - act_eps), "
                f"got {cfg.act_eps}")
        cap = cfg.mor_capacity
        if cfg.halting == 'mor' and not (isinstance(cap, (tuple, list)) and (
                not cap or (len(cap) == R and all(isinstance(c, (int, float)) and 0 < c <= 1 for c in cap)))):
            bad(f"mor_capacity needs {R} fractions in (0, 1] (one per step), or () for the default, "
                f"got {cap!r}")
        if (cfg.recurrence == 'random' or cfg.backprop_repeats) and cfg.halting != 'none':
            bad("recurrence='random' and backprop_repeats need halting='none' (ACT and MoR set each "
                "token's depth themselves)")
        if cfg.backprop_repeats < 0 or not (cfg.mean_repeats == 0 or cfg.mean_repeats >= 1):
            bad(f"backprop_repeats must be >= 0 and mean_repeats 0 (= n_layers/group_size) or >= 1, got "
                f"{cfg.backprop_repeats} and {cfg.mean_repeats}")
        if cfg.backprop_repeats and cfg.input_injection == 'none':
            bad("backprop_repeats needs input_injection='add' or 'concat': without it the embedding and prelude "
                "reach the loss only through the first repeat, which runs without gradient")
        if cfg.random_init_state and cfg.input_injection == 'none':
            bad("random_init_state needs input_injection='add' or 'concat' (else the loop never sees the input)")
        cap = tuple(cap) if isinstance(cap, (tuple, list)) and cap else tuple((R - r) / R for r in range(R))
        self.capacity = cap
        self.kv = cfg.halt_kv
        self.output = cfg.halt_output if cfg.halt_output != 'auto' else \
            ('weighted' if cfg.halting == 'act' else 'last')
        self.layers = nn.ModuleList([MoEUTLayer(cfg) for _ in range(G)])      # = MoEUT's names
        self.prelude = nn.ModuleList([MoEUTLayer(cfg) for _ in range(cfg.n_prelude)])
        self.coda = nn.ModuleList([MoEUTLayer(cfg) for _ in range(cfg.n_coda)])
        d = cfg.d_model
        if cfg.halting == 'act':
            # peri-LN: a norm in front of a map that feeds a sigmoid. Zero weight, negative bias: every
            # token starts with the same small h, so early training runs deep (spec "ACT").
            self.halt_norm = nn.LayerNorm(d)
            self.halt = nn.Linear(d, 1)
            nn.init.zeros_(self.halt.weight)
            nn.init.constant_(self.halt.bias, cfg.act_bias_init)
        elif cfg.halting == 'mor':
            # MoR: one router column per step (expert-choice) or per depth (token-choice)
            self.router_norm = nn.LayerNorm(d)
            self.router = nn.Linear(d, R)
            nn.init.zeros_(self.router.bias)
        if cfg.input_injection == 'concat':
            # Huginn's adapter [state, e] -> state; fan-in init keeps the mean variance of the two
            self.adapter = nn.Linear(2 * d, d, bias=False)
            nn.init.normal_(self.adapter.weight, 0, (2 * d) ** -0.5)
        if cfg.recurrence == 'random':
            self.depth_sampler = DepthSampler(cfg.mean_repeats or R)
        self.forced_depths: Optional[torch.Tensor] = None     # [B, T] ints in 0..R, see forced_depths()
        self.eval_repeats = 0         # > 0: repeats in eval mode (ACT: the cap), see set_depth()
        self.exit = None              # per-token exit at inference (set_depth): threshold, criterion, kv, head
        self.stats: dict = {}
        self.trace: dict = {}

    def _route(self, h):
        """MoR router logits: matmul in the autocast dtype, the rest in fp32 (as model.py's routers)."""
        return self.router(self.router_norm(h)).float()

    def repeats(self) -> int:
        """Repeats of the next forward: drawn per training step (recurrence='random'), eval_repeats in
        eval mode if set, else R = n_layers / group_size."""
        if self.training and self.cfg.recurrence == 'random':
            return self.depth_sampler()
        return self.eval_repeats if self.eval_repeats and not self.training else self.n_repeats

    # ---- the loop ------------------------------------------------------------------------------
    def forward(self, x, ctx: AttnContext, kv_cache: Optional[dict] = None):
        B, T, _ = x.shape
        cfg, G = self.cfg, len(self.layers)
        collect = self.training and (cfg.entropy_reg > 0 or cfg.att_entropy_reg > 0)
        log = RouteLog(B) if collect else None
        pos = ctx.pos.expand(B, T) if ctx.pos.dim() == 1 else ctx.pos
        x = self._unique(self.prelude, range(cfg.n_prelude), x, ctx, kv_cache, log)
        e = x                                        # input injection re-reads the prelude's output
        if cfg.random_init_state:                    # Huginn: s_0 ~ N(0, σ²), σ the embedding's init std
            x = nn.init.trunc_normal_(torch.empty_like(e), std=cfg.d_model ** -0.5, a=-3 * cfg.d_model ** -0.5,
                                      b=3 * cfg.d_model ** -0.5) if self.training else torch.zeros_like(e)

        R = self.repeats()
        # truncated backprop: the first R - k repeats run without a graph (memory and time scale with k)
        n_free = R - cfg.backprop_repeats if self.training and 0 < cfg.backprop_repeats < R else 0
        s = self._start(x, pos, kv_cache, R)         # decides who runs step 0
        kv = self.exit.kv if s.mode == 'exit' else self.kv
        buckets, counts = self._bucket_plan(s, R, kv_cache, x.device)
        out = torch.zeros_like(x) if s.output == 'weighted' else x      # 'weighted' Σp·x / 'mean'
        bufs = [{} for _ in range(G)]                # last-kv: each token's K/V at its last step
        steps = 0
        for r in range(R):
            rows = self._rows(r, s, pos, buckets, counts)
            if rows.n == 0:
                break                                # everyone has halted
            steps += 1
            with torch.no_grad() if r < n_free else nullcontext():
                xa = rows.gather(x)                  # gather: only the active tokens
                ya = self._step(xa, rows, r, ctx, kv_cache, bufs, log if r >= n_free else None, kv, e)
                gate = s.gate(r) if s.gate is not None else None
                if gate is not None:                 # MoR: the step's update scaled by the router
                    ya = xa + rows.gather(gate)[..., None] * (ya - xa)
                x = rows.scatter(x, ya)              # scatter: halted tokens keep their state
                s.depth = s.depth + s.run
                self._decide(r, rows, ya, s)         # decide who runs step r+1 (ACT: this step's p)
                if s.output == 'weighted':
                    out = rows.add(out, rows.gather(s.p)[..., None] * ya)
                elif s.output == 'mean':             # v <- v + (x - v)/n over the token's own steps
                    va = rows.gather(out)
                    out = rows.scatter(out, va + (ya - va) / rows.gather(s.depth).clamp(min=1)[..., None])
        if s.output == 'last':
            out = x
        if kv == 'last-kv' and kv_cache is not None:
            # decoding: deeper (step, layer) caches get the frozen K/V of tokens that stopped earlier
            for r in range(steps, R):
                for l, buf in enumerate(bufs):
                    if buf:
                        _cache_append(kv_cache.setdefault(self._key(r, l), {}),
                                      buf['k'], buf['v'], buf['pos'], buf['valid'])
        # coda caches keyed apart from the loop's, whose keys grow with the repeats (test-time depth)
        out = self._unique(self.coda, [('coda', i) for i in range(cfg.n_coda)], out, ctx, kv_cache, log)

        loss = log.loss(cfg, out) if log is not None else out.new_zeros((), dtype=torch.float32)
        if self.training and s.loss is not None:
            loss = loss + s.loss()
        self._record(s)
        return out, loss

    def _bucket_plan(self, s, R, kv_cache, device):
        """(halt_buckets for this forward, 0 = exact rows; each step's (N, Tm) where known ahead, else None).
        Not with a KV cache (decoding: the caches keep exactly the real tokens, as without), nor per-token
        exit (its criterion keeps the exact rows). MoR token-choice fixes every depth at entry, so ONE
        sync reads all steps' counts."""
        buckets = self.cfg.halt_buckets if kv_cache is None and s.mode != 'exit' else 0
        counts = [None] * R
        if s.mode == 'token':
            c = (s.target[None] > torch.arange(R, device=device)[:, None, None]).sum(2)     # [R, B]
            counts = torch.stack([c.sum(1), c.amax(1)], 1).tolist()
        return buckets, counts

    def _rows(self, r, s, pos, buckets, counts):
        """The tokens that run step r: padded to one of the buckets' static shapes (PaddedRows), or
        exactly (rows_cls). MoR expert top-k rows are a fixed [B, k] already, and a step everyone runs
        is the plain one."""
        everyone = s.everyone or (r == 0 and s.all_at_start)
        if buckets and s.per_row is None and not s.everyone:
            return PaddedRows(s.run, pos, buckets, everyone=everyone, counts=counts[r])
        return self.rows_cls(s.run, pos, s.per_row, everyone=everyone, counts=counts[r])

    def _key(self, r, l):
        """kv_cache key of loop layer l at step r: absolute depth, like MoEUT's r*G + l."""
        return self.cfg.n_prelude + r * len(self.layers) + l

    def _step(self, xa, rows, r, ctx, kv_cache, bufs, log, kv, e):
        """One step: input injection, then the G shared layers (MoEUTLayer, unchanged) on the active rows."""
        if self.cfg.input_injection == 'add':
            xa = xa + rows.gather(e)
        elif self.cfg.input_injection == 'concat':
            xa = self.adapter(torch.cat([xa, rows.gather(e).to(xa.dtype)], -1))
        for l, layer in enumerate(self.layers):
            cache = kv_cache.setdefault(self._key(r, l), {}) if kv_cache is not None else None
            routes = Routes() if log is not None else None
            xa = layer(xa, rows.attention(ctx, kv, bufs[l]), cache, routes)
            if log is not None:
                log.add(('loop', l), routes, rows)
        return xa

    def _unique(self, layers, keys, x, ctx, kv_cache, log):
        """Prelude / coda layers: every token, plain MoEUT semantics and cache."""
        for key, layer in zip(keys, layers):
            cache = kv_cache.setdefault(key, {}) if kv_cache is not None else None
            routes = Routes() if log is not None else None
            x = layer(x, ctx, cache, routes)
            if log is not None:
                log.add(('unique', key), routes, None)
        return x

    def one_graph(self, training: bool = True) -> bool:
        """Whether a forward in this mode needs no host value, so that torch.compile can take the whole
        model as one graph with static shapes (and CUDA graphs): MoR expert-choice, whose top-k keeps a
        fixed number of tokens per sequence at every step (in eval too with mor_causal_eval=False; its
        causal threshold keeps a data-dependent number). train.py compiles such a model whole instead of
        layer by layer: at 16 x 1024 tokens with half the token-steps skipped, one H100, its step took
        0.63x the plain loop's, both as CUDA graphs (docs/depth.md). A capacity of 1 past the first step
        costs a host sync (a graph break) there."""
        return self.cfg.halting == 'mor' and self.cfg.mor_routing == 'expert' and (
            training or not self.cfg.mor_causal_eval)

    def compile_layers(self, **kwargs):
        """torch.compile for a halting model (train.py compile=True) whose loop cannot be one graph (see
        one_graph): each step's shapes come from a host sync. So each layer is compiled on its own, in
        place (parameter names unchanged); gather, scatter and decisions stay eager. A few variants per
        layer compile on first use (every token active / the same count per sequence / ragged). Removes
        most of the eager per-step launch overhead, which is what made steps with few active tokens cost
        almost as much as full ones. Without halt_buckets, with dynamic shapes since the active-row count
        changes every step; with halt_buckets = K, static shapes: each of the at most K bucket shapes
        compiles once (specialised kernels, no symbolic-shape work on the host at each call). A loop
        without halting (halting='none') runs every token at every step: static shapes, whatever the
        drawn depth."""
        K = self.cfg.halt_buckets
        # Without buckets, Python ints that change (row counts) cost one recompile each before dynamo makes
        # them symbolic, on top of the variants above: the default limit of 8 per function is too tight.
        # With K buckets, each layer function sees up to K + 1 + R shapes (buckets, every token, MoR top-k
        # rows) in training and again in eval, and the G (+ prelude/coda) layers share its code object.
        limit = 64 if not K else 2 * (K + 2 + self.n_repeats) * len(distinct_layers(self))
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 2 * limit)
        # without halting (random depth, truncated backprop, injection, prelude/coda) every token runs every
        # step: one shape per batch size, so static too (a layer's call under symbolic shapes measured
        # ~4.5 ms of host work on the halting path, docs/history.md)
        dynamic = not K and self.cfg.halting != 'none'
        for layer in distinct_layers(self):
            layer.compile(dynamic=dynamic, **kwargs)

    # ---- decisions -----------------------------------------------------------------------------
    def _start(self, x, pos, kv_cache, R):
        """Halting state at loop entry for R repeats: depth so far, who runs step 0, bookkeeping."""
        B, T, _ = x.shape
        cfg = self.cfg
        s = LoopState(depth=torch.zeros(B, T, dtype=torch.long, device=x.device),
                      run=torch.ones(B, T, dtype=torch.bool, device=x.device), per_row=None,
                      gate=None, loss=None, target=None, output=self.output, mode=None, p_trace=[],
                      R=R, everyone=False, all_at_start=False)
        if self.forced_depths is not None:
            d = self.forced_depths.to(x.device)
            if d.shape != (B, T) or bool(((d < 0) | (d > R)).any()):
                raise ValueError(f"forced depths must be [B, T] = {(B, T)} ints in 0..{R}")
            s.mode, s.target, s.run = 'forced', d, d > 0
            if s.output == 'weighted':
                s.output = 'last'
        elif cfg.halting == 'none' and self.exit is not None and not self.training:
            s.mode, s.prev = 'exit', None            # per-token exit, see _exit
        elif cfg.halting == 'none':
            s.mode, s.everyone = 'none', True        # the plain loop: no decisions, no host syncs
        elif cfg.halting == 'act':
            s.mode, s.all_at_start = 'act', True                # every token runs step 0
            s.cum = x.new_zeros(B, T, dtype=torch.float32)      # Σh of the steps taken so far
            s.rem = x.new_zeros(B, T, dtype=torch.float32)      # the remainder R (has gradient)
            s.loss = lambda: cfg.act_tau * (s.depth + s.rem).mean()    # ponder cost τ·mean(N + R)
        elif cfg.mor_routing == 'token':
            s.mode, s.all_at_start = 'token', True              # every depth is >= 1
            p = torch.softmax(self._route(x), dim=-1)            # [B, T, R]: depth of each token, once
            choice = p.argmax(-1)
            # test-time depth: a cap below the trained R truncates; above it, the deepest choice runs on
            s.target, s.run = torch.where(choice == self.n_repeats - 1, R, (choice + 1).clamp(max=R)), \
                torch.ones_like(s.run)
            g = cfg.mor_alpha * p.gather(-1, choice[..., None])[..., 0]
            if cfg.mor_gate == 'router':                         # scale the update of the last step
                s.gate = lambda r: torch.where(s.target == r + 1, g, torch.ones_like(g))
            if self.training:                  # balancing (Switch-style): R · Σ_i f_i · P_i
                f = F.one_hot(choice, self.n_repeats).float().mean((0, 1))
                bal = self.n_repeats * (f * p.mean((0, 1))).sum()
                s.aux = bal.detach()
                s.loss = lambda: cfg.mor_balance_coef * bal
        else:
            s.mode = 'expert'
            s.topk = self.training or not cfg.mor_causal_eval
            s.all_at_start = self.capacity[0] >= 1              # then every token runs step 0: no sync
            if s.topk and kv_cache is not None:
                raise ValueError("MoR expert-choice top-k is not causal and cannot decode with a KV cache; "
                                 "use eval mode with mor_causal_eval=True (sigmoid > 0.5 threshold)")
            s.k, s.aux = T, x.new_zeros((), dtype=torch.float32)
            s.loss = lambda: cfg.mor_aux_coef * s.aux
            self._mor_expert(0, self.rows_cls(s.run, pos, everyone=True), x, s)   # router before step 0
        return s

    def _decide(self, r, rows, ya, s):
        """After step r, from the new states of the rows that ran it: who runs step r+1."""
        R = s.R
        if s.mode in ('forced', 'token'):
            s.run = s.target > r + 1
        elif s.mode == 'exit':
            self._exit(r, rows, ya, s)
        elif s.mode == 'act':
            h = torch.sigmoid(self.halt(self.halt_norm(ya)).float())[..., 0]
            h = rows.scatter(torch.zeros_like(s.cum), h)              # 0 for tokens that did not run
            stop = s.run & ((s.cum + h >= 1 - self.cfg.act_eps) | (r == R - 1))
            s.p = torch.where(stop, 1 - s.cum, torch.where(s.run, h, torch.zeros_like(h)))
            s.rem = torch.where(stop, 1 - s.cum, s.rem)               # last step: the remainder
            s.cum = s.cum + torch.where(s.run & ~stop, h, torch.zeros_like(h))
            s.run = s.run & ~stop
            s.p_trace.append(s.p.detach())
        elif s.mode == 'expert' and r + 1 < R:
            self._mor_expert(r + 1, rows, ya, s)
        elif s.mode == 'expert':
            s.run = torch.zeros_like(s.run)

    def _exit(self, r, rows, ya, s):
        """Per-token exit (Huginn's zero-shot criterion): a token stops once its next-token distribution
        barely moved over its last step: KL(p_r || p_{r-1}) < threshold, or |H(p_r) - H(p_{r-1})| <
        threshold ('entropy'). p_r reads the state through the LM's output norm and head. The first check
        is after step 2 (step 1 has nothing to compare with)."""
        ex = self.exit
        norm, head = ex.head
        logp = F.log_softmax(head(norm(ya)).float(), dim=-1).flatten(0, -2)      # [N, V], rows in flat order
        if ex.criterion == 'entropy':
            logp_h = -(logp.exp() * logp).sum(-1)
        if s.prev is None:
            stop = torch.zeros(logp.shape[0], dtype=torch.bool, device=logp.device)
        elif ex.criterion == 'kl':
            stop = (logp.exp() * (logp - s.prev)).sum(-1).clamp(min=0) < ex.threshold
        else:
            stop = (logp_h - s.prev).abs() < ex.threshold
        if r == s.R - 1:
            return
        run = s.run.flatten().clone()
        if rows.all:
            run = ~stop
        else:
            run[rows.idx] = ~stop
        s.run = run.view_as(s.run)
        keep = logp_h if ex.criterion == 'entropy' else logp
        s.prev = keep[~stop]                         # the next step's rows: these, in the same order

    def _mor_expert(self, r, rows, ya, s):
        """MoR expert-choice before step r: score the alive tokens (those that ran r-1); keep the top
        capacity_r·T per sequence (training) or those with sigmoid(score) > 0.5 (causal mode). Steps past
        the trained R (test-time depth) reuse the last step's router column and capacity."""
        rt = min(r, self.n_repeats - 1)
        logit = self._route(ya)[..., rt]
        score = rows.scatter(torch.full(s.run.shape, -math.inf, device=ya.device), logit)
        T = s.run.shape[1]
        if self.capacity[rt] >= 1:
            run, per_row = s.run, s.per_row
        elif s.topk:
            s.k = min(max(1, int(self.capacity[rt] * T)), s.k)   # hierarchical: a subset of the alive
            per_row = score.topk(s.k, dim=1).indices.sort(dim=1).values     # time order, for causality
            run = torch.zeros_like(s.run).scatter(1, per_row, True)
        else:
            run, per_row = s.run & (torch.sigmoid(score) > 0.5), None
        if self.training and s.topk:   # BCE: the score should predict selection (threshold at decode)
            target = rows.gather(run.float())
            s.aux = s.aux + rows.mean(F.binary_cross_entropy_with_logits(logit, target, reduction='none'))
        s.run, s.per_row = run, per_row
        if self.cfg.mor_gate == 'router':
            g = self.cfg.mor_alpha * torch.sigmoid(score)
            s.gate = lambda _r: g

    def _record(self, s):
        """Detached stats for logging (no .item(): no GPU sync) and per-token traces for sample.py."""
        R = s.R
        depth = s.depth.detach()
        hist = torch.zeros(R + 1, device=depth.device).scatter_add_(
            0, depth.flatten(), torch.ones(depth.numel(), device=depth.device)) / depth.numel()
        mean = depth.float().mean()
        self.stats = {'mean_depth': mean, 'skipped': 1 - mean / R, 'depth_hist': hist}
        self.trace = {'depth': depth}
        if s.mode == 'act':
            self.stats['ponder'] = (s.depth + s.rem).mean().detach()
            p = s.p_trace + [torch.zeros_like(depth, dtype=torch.float32)] * (R - len(s.p_trace))
            self.trace['act_p'] = torch.stack(p, -1)
        if getattr(s, 'aux', None) is not None:
            self.stats['aux'] = s.aux.detach()


# -------------------------------------------------------------------------------------------------
# Random depth (Huginn, spec/recurrence.md): the number of repeats of each training step
# -------------------------------------------------------------------------------------------------

def sample_repeats(mean: float, generator: torch.Generator, sigma: float = 0.5) -> int:
    """Huginn's log-normal Poisson depth: λ = (mean - 1)·exp(τ), τ ~ N(-σ²/2, σ), r = 1 + Poisson(λ).
    E[exp(τ)] = 1, so E[r] = mean exactly (Huginn's sampler has mean r̄ + 1; here the +1 is inside
    the mean). At least 1, heavy-tailed above."""
    tau = torch.randn((), generator=generator, dtype=torch.float64) * sigma - sigma ** 2 / 2
    lam = (mean - 1) * tau.exp()
    return 1 + int(torch.poisson(lam.reshape(1), generator=generator))


class DepthSampler(nn.Module):
    """Draws each training step's repeats. Every rank must draw the same ones: the seed comes from the
    global RNG at construction (train.py seeds it alike on every rank before building the model), and
    draw i uses a generator seeded (seed + i). The state (seed, draws so far) is the module's extra
    state: it rides in every state_dict and checkpoint, so a resumed run continues the sequence."""

    def __init__(self, mean: float):
        super().__init__()
        self.mean = float(mean)
        self.seed, self.draws = int(torch.randint(0, 2 ** 62, ())), 0

    def forward(self) -> int:
        g = torch.Generator().manual_seed(self.seed + self.draws)
        self.draws += 1
        return sample_repeats(self.mean, g)

    def get_extra_state(self):
        return torch.tensor([self.seed, self.draws])

    def set_extra_state(self, state):
        self.seed, self.draws = (int(v) for v in state)


def recurrence_state(model) -> Optional[dict]:
    """The random-depth sampler's state ({'seed', 'draws'}), None for models without random depth."""
    sampler = getattr(model.core, 'depth_sampler', None)
    return None if sampler is None else {'seed': sampler.seed, 'draws': sampler.draws}


def set_recurrence_state(model, state: dict):
    sampler = getattr(model.core, 'depth_sampler', None)
    if sampler is None:
        raise ValueError("set_recurrence_state: the model has no random depth (recurrence='random')")
    sampler.seed, sampler.draws = int(state['seed']), int(state['draws'])


# -------------------------------------------------------------------------------------------------
# Building the LM, and its depth at inference
# -------------------------------------------------------------------------------------------------

def build_lm(cfg: ModelConfig) -> LM:
    """The LM of any config: with this file's core where the config needs it (cfg.halting_core), else
    model.py's own. Use it wherever a model is built from a config (train.py, sample.py)."""
    return LM(cfg, core=HaltingMoEUT if cfg.halting_core else None)


def set_depth(model: LM, n_repeats: int = 0, exit_threshold: Optional[float] = None, exit_criterion: str = 'kl',
              exit_kv: str = 'latest') -> LM:
    """Depth at inference (eval mode; training keeps its own). Returns the model, changed in place.

    n_repeats > 0: run that many repeats of the shared group instead of the trained R (0 = as trained).
        Plain MoEUT and the halting core run exactly n; ACT runs until every token has halted, at most
        n (its remainder rule moves to the new cap); MoR expert-choice reuses its last step's router
        column and capacity past R, token-choice sends the tokens that chose depth R on to n.
    exit_threshold (models trained without a halting unit; None = off): per-token exit, see
        HaltingMoEUT._exit; 0 computes the criterion and never exits (= full depth). A plain MoEUT's
        core is swapped for halting.py's (same layers, shared, no new parameters).
    exit_kv: what deeper repeats see of a token that exited:
        'latest' (Huginn's rule; = halt_kv 'last-kv'): its K/V of the same layer-in-group from its last
            repeat. Zero-shot: the model never trained with exits, so this only approximates the state
            the token would have had. Decoding with the cache equals the full forward.
        'skip' (= 'active-only'): exited tokens are invisible at deeper repeats."""
    core = model.core
    if not isinstance(n_repeats, int) or n_repeats < 0:
        raise ValueError(f"n_repeats must be an int >= 0 (0 = as trained), got {n_repeats!r}")
    if not hasattr(core, 'eval_repeats'):
        if n_repeats or exit_threshold is not None:
            raise ValueError("n_repeats / exit_threshold need a looped model (model_type='moeut')")
        return model
    if exit_threshold is not None:
        cfg = model.cfg
        if exit_threshold < 0 or exit_criterion not in ('kl', 'entropy') or exit_kv not in ('latest', 'skip'):
            raise ValueError(f"per-token exit needs exit_threshold >= 0, exit_criterion 'kl' or 'entropy' and "
                             f"exit_kv 'latest' or 'skip'; got {exit_threshold}, {exit_criterion!r}, {exit_kv!r}")
        if cfg.halting != 'none':
            raise ValueError(f"per-token exit is for models trained without a halting unit; halting="
                             f"{cfg.halting!r} decides each token's depth itself")
        if cfg.n_coda:
            raise ValueError("per-token exit reads the state through the LM head and cannot run the coda "
                             "layers at every repeat: it needs n_coda=0")
        if not isinstance(core, HaltingMoEUT):        # plain MoEUT: the same layers in halting.py's core
            with torch.device('meta'):
                new = HaltingMoEUT(cfg)
            new.layers = core.layers
            model.core = core = new.train(core.training)
        core.exit = SimpleNamespace(threshold=float(exit_threshold), criterion=exit_criterion,
                                    kv='last-kv' if exit_kv == 'latest' else 'active-only',
                                    head=(model.out_norm, model.lm_head))
    elif isinstance(core, HaltingMoEUT):
        core.exit = None
    core.eval_repeats = n_repeats
    return model


@torch.no_grad()
def depth_curve(model: LM, batches, repeats=None, plot: str = '', autocast=None) -> list:
    """Mean next-token loss against the repeats run at inference (1 .. 2R by default), on batches of
    (x, y) token tensors; prints a table and, if matplotlib is installed and `plot` names a file,
    writes the curve there. A model that extrapolates has a curve that falls, then flattens.
    Returns [(repeats, loss, mean depth)]."""
    core = model.core
    if not hasattr(core, 'eval_repeats'):
        raise ValueError("depth_curve needs a looped model (model_type='moeut')")
    repeats = list(repeats or range(1, 2 * core.n_repeats + 1))
    was_training, old = model.training, core.eval_repeats
    model.eval()
    rows = []
    try:
        for r in repeats:
            core.eval_repeats = r
            tot = cnt = dep = 0.0
            for x, y in batches:
                with autocast or nullcontext():
                    ce = model(x, y).ce
                n = (y != -1).sum().item()
                tot, cnt = tot + ce.item() * n, cnt + n
                dep += float(core.stats['mean_depth']) * n if 'mean_depth' in getattr(core, 'stats', {}) else r * n
            rows.append((r, tot / cnt, dep / cnt))
    finally:
        core.eval_repeats = old
        model.train(was_training)
    print(f"trained R = {core.n_repeats}\n| repeats | loss | mean depth |\n|---|---|---|")
    for r, loss, dep in rows:
        print(f"| {r} | {loss:.4f} | {dep:.2f} |")
    if plot:
        try:
            import matplotlib
            matplotlib.use('Agg')
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot")
            return rows
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r for r, _, _ in rows], [v for _, v, _ in rows], marker='o')
        ax.axvline(core.n_repeats, color='grey', linestyle=':', label=f'trained R = {core.n_repeats}')
        ax.set_xlabel('repeats at inference')
        ax.set_ylabel('loss (nats/token)')
        ax.legend()
        fig.tight_layout()
        tmp = plot + '.tmp.png'
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, plot)
        print(f"wrote {plot}")
    return rows


# -------------------------------------------------------------------------------------------------
# Forced depths, for tests and benchmarks
# -------------------------------------------------------------------------------------------------

@contextmanager
def forced_depths(core: HaltingMoEUT, depths: torch.Tensor):
    """with forced_depths(model.core, depths): model(idx) -- every token runs exactly depths[b, t]
    steps (0..R), whatever the halting mechanism would decide; no halting losses."""
    old, core.forced_depths = core.forced_depths, depths
    try:
        yield core
    finally:
        core.forced_depths = old


def random_depths(B: int, T: int, R: int, skip: float, generator=None, device=None,
                  spread: bool = True) -> torch.Tensor:
    """Per-token depths in 1..R whose expected mean is R·(1 - skip), i.e. an expected fraction `skip` of
    token-steps skipped. spread: the max-entropy law p(d) ∝ exp(λd) with that mean, so every step keeps
    some tokens (realistic for halting); else each token gets floor or ceil of the mean, so whole steps
    vanish (flatters the timing)."""
    m = min(max(R * (1 - skip), 1.0), float(R))
    if not spread or m in (1.0, float(R)):
        lo = math.floor(m)
        d = lo + (torch.rand(B, T, generator=generator) < (m - lo)).long()
        return d.clamp(1, R).to(device)
    levels = torch.arange(1, R + 1, dtype=torch.float64)
    lo, hi = -50.0, 50.0
    for _ in range(100):                               # bisection on λ: the mean grows with λ
        lam = (lo + hi) / 2
        p = torch.softmax(lam * levels, 0)
        lo, hi = (lam, hi) if float((p * levels).sum()) < m else (lo, lam)
    idx = torch.multinomial(p.float().expand(B * T, R), 1, replacement=True, generator=generator)
    return (idx.view(B, T) + 1).to(device)

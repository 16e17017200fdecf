"""
MoEUT: Mixture-of-Experts Universal Transformers (Csordás, Irie, Schmidhuber, Potts, Manning,
NeurIPS 2024, arXiv 2405.16039), plus a dense pre-LN GPT baseline of the same code.

Read top to bottom, in the paper's order:
  1. σ-MoE feedforward block                   -> SigmaMoE                  (spec §3)
  2. SwitchHead attention + half-RoPE          -> SwitchHead, rope(), attend() (spec §4, §5)
  3. entropy regulariser over experts          -> marginal_neg_entropy()    (spec §6)
  4. layer grouping, G layers repeated         -> MoEUT.forward             (spec §1)
  5. peri-layernorm                            -> MoEUTLayer.forward        (spec §2)
The numbered facts this file must satisfy are in ../shared/spec/moeut.md ("spec §N" below).
"""
import math
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from cvmm import cvmm, cvmm_mlp, cvmm_prepare, topk_ids


@dataclass
class ModelConfig:
    model_type: str = 'moeut'       # 'moeut' or 'dense' (the pre-LN GPT baseline)
    vocab_size: int = 50304
    block_size: int = 1024          # context length used for training and generation
    d_model: int = 768
    n_layers: int = 18              # total depth; MoEUT applies G distinct layers n_layers/G times
    n_heads: int = 4
    d_head: int = 96
    # MoEUT
    group_size: int = 2             # G, spec §1
    att_n_experts: int = 10         # V/O experts per head (1 = dense V/O with a sigmoid output gate)
    att_k: int = 2
    ff_n_experts: int = 254
    ff_k: int = 12
    d_expert: int = 128
    entropy_reg: float = 0.01       # γ, σ-MoE balancing (spec §6)
    att_entropy_reg: float = 0.001  # δ, SwitchHead balancing
    ff_expert_dropout: float = 0.0
    att_expert_dropout: float = 0.0
    # dense baseline
    d_ff: int = 3072
    # both
    dropout: float = 0.0
    rope_base: float = 10000.0
    # --- per-token dynamic depth: halting.py owns this block (spec/halting.md) ---
    halting: str = 'none'           # 'none' | 'act' (Graves 2016) | 'mor' (Bae et al. 2025)
    halt_kv: str = 'active-only'    # what deeper queries see of halted tokens: 'active-only' | 'last-kv'
    halt_output: str = 'auto'       # final state: 'auto' (ACT Σp·state, MoR last) | 'last' | 'mean' | 'weighted'
    n_prelude: int = 0              # unique layers before the looped group ("middle-cycle"), run by all tokens
    n_coda: int = 0                 # unique layers after it; with halting, n_layers counts the looped part only
    act_tau: float = 0.01           # ponder cost τ·mean(N + R)
    act_eps: float = 0.01           # a token halts once its Σh reaches 1 - eps
    act_bias_init: float = -3.0     # halting-unit bias; negative = early training runs deep
    mor_routing: str = 'expert'     # 'expert' (top-k tokens continue before each step) | 'token' (depth at entry)
    mor_capacity: tuple = ()        # expert-choice: fraction of T kept before step r; () = (R-r)/R
    mor_gate: str = 'router'        # 'router': step update × alpha·router score; 'none': gate 1 = plain loop
    mor_alpha: float = 1.0
    mor_aux_coef: float = 0.001     # expert-choice BCE teaching scores to predict top-k selection
    mor_balance_coef: float = 0.1   # token-choice balancing loss
    mor_causal_eval: bool = True    # eval: expert-choice uses sigmoid > 0.5 (causal) instead of top-k
    halt_buckets: int = 0           # > 0: each step's active tokens padded to one of this many static shapes
    # --- end of halting block ---
    # --- attention options (docs/options.md "Attention options"); all off by default, and off changes nothing ---
    n_kv_heads: int = 0             # GQA/MQA: K (and, in the dense baseline, V) heads; 0 = n_heads
    qk_norm: bool = False           # RMS-normalise q and k per head (learned gain over d_head) before RoPE
    ssmax: bool = False             # Scalable-Softmax: logits × s_h·log(visible keys), s_h learned per head
    attn_window: int = 0            # sliding-window causal attention over the last W keys; 0 = all
    # --- routing and balancing options (issue 22): all off by default, and off they change nothing.
    #     Validated in _check_routing_options; docs/options.md "Routing and balancing options" has the table. ---
    moe_balance: str = 'entropy'    # 'entropy' (the regulariser above only) | 'aux_free' (per-expert choice
                                    # bias, DeepSeek loss-free) | 'switch' (E·Σ f·P aux loss) | 'global' (the
                                    # same loss with f of the whole global batch)
    balance_coef: float = 0.01      # weight of the 'switch'/'global' loss of each σ-MoE layer
    att_balance_coef: float = 0.001  # the same for the SwitchHead V and O routers (0: entropy term only)
    bias_update_rate: float = 0.001  # 'aux_free': each bias moves by ± this after every optimizer step
    router_noise: float = 0.0       # std of Gaussian noise on the top-k choice scores, training only
    norm_topk: bool = False         # the k picked weights renormalised to sum to 1 (σ-MoE and V/O)
    ff_n_shared: int = 0            # always-on shared experts beside the routed ones (one dense ReLU MLP)
    d_shared: int = 0               # width of each shared expert; 0 = d_expert
    shared_scale: str = 'auto'      # their output scale: 'auto' (matched to the routed output at init) or a number
    ff_n_null: int = 0              # MoE++ zero experts: ids E.. that output 0 and cost no compute
    ff_null_identity: int = 0       # MoE++ identity experts (output = weight * x), ids after the zero ones
    ff_k_schedule: tuple = ()       # σ-MoE top-k per repeat of the group, e.g. (16, 12, 8); () = ff_k everywhere
    router_type: str = 'linear'     # 'linear' | 'conv': a causal depthwise conv over the σ-MoE router input
    router_kernel: int = 4          # 'conv': its length in tokens
    # --- end of routing block ---
    # --- recurrent depth (spec/recurrence.md): halting.py owns this block too ---
    recurrence: str = 'fixed'       # 'fixed': R = n_layers/G repeats | 'random': R drawn per step (Huginn)
    mean_repeats: float = 0.0       # random: mean of the log-normal Poisson depth (0 = n_layers/G)
    backprop_repeats: int = 0       # > 0: only the last k repeats carry gradient, earlier ones run no_grad
    input_injection: str = 'none'   # 'none' | 'add' (state + e) | 'concat' (adapter on [state, e]) per repeat
    random_init_state: bool = False  # training starts the loop from noise, not e (needs input_injection)

    @property
    def halting_core(self) -> bool:
        """Whether the looped group runs in halting.py's core (build the LM with halting.build_lm)."""
        return self.model_type == 'moeut' and (
            self.halting != 'none' or self.n_prelude > 0 or self.n_coda > 0 or self.recurrence != 'fixed'
            or self.backprop_repeats > 0 or self.input_injection != 'none' or self.random_init_state)
    # --- end of recurrent depth block ---

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"model config: {msg}")
        self._check_routing_options(bad)
        if self.model_type not in ('moeut', 'dense'):
            bad(f"model_type must be 'moeut' or 'dense', got {self.model_type!r}")
        for k in ('vocab_size', 'block_size', 'd_model', 'n_layers', 'n_heads', 'd_head'):
            if getattr(self, k) < 1:
                bad(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.model_type == 'dense' and self.d_ff < 1:
            bad(f"d_ff must be >= 1, got {self.d_ff}")
        if self.model_type == 'dense' and self.halting != 'none':
            bad(f"halting={self.halting!r} needs model_type='moeut' (the dense baseline has no looped group)")
        if not isinstance(self.halt_buckets, int) or self.halt_buckets < 0 or (self.halt_buckets and
                                                                              self.halting == 'none'):
            bad(f"halt_buckets must be an int >= 0, and > 0 only with halting='act' or 'mor' (it pads the "
                f"tokens that halting drops), got {self.halt_buckets!r} with halting={self.halting!r}")
        if self.model_type == 'dense' and (self.recurrence != 'fixed' or self.backprop_repeats or
                                           self.input_injection != 'none' or self.random_init_state):
            bad("recurrence / backprop_repeats / input_injection / random_init_state need model_type='moeut' "
                "(the dense baseline has no looped group)")
        if not 0 <= self.dropout <= 1:
            bad(f"dropout must be in [0, 1], got {self.dropout}")
        for k in ('ff_expert_dropout', 'att_expert_dropout'):
            if not 0 <= getattr(self, k) < 1:    # 1 would hide every expert from the top-k
                bad(f"{k} must be in [0, 1), got {getattr(self, k)}")
        if (self.n_prelude or self.n_coda) and self.halting == 'none' and self.recurrence == 'fixed' \
                and self.input_injection == 'none':
            bad("n_prelude/n_coda (unique layers around the looped group) need halting='act' or 'mor' "
                "(or recurrence='random' / input_injection)")
        if self.model_type == 'moeut':
            for k in ('group_size', 'd_expert', 'ff_n_experts', 'att_n_experts'):
                if getattr(self, k) < 1:
                    bad(f"{k} must be >= 1, got {getattr(self, k)}")
            if self.n_layers % self.group_size != 0:
                bad(f"n_layers ({self.n_layers}) must be a multiple of group_size ({self.group_size})")
            if not 1 <= self.ff_k <= self.ff_n_experts:
                bad(f"ff_k ({self.ff_k}) must be in 1..ff_n_experts ({self.ff_n_experts})")
            if self.att_n_experts > 1 and not 1 <= self.att_k <= self.att_n_experts:
                bad(f"att_k ({self.att_k}) must be in 1..att_n_experts ({self.att_n_experts})")
        if not (0 <= self.n_kv_heads <= self.n_heads and (self.n_kv_heads == 0 or
                                                          self.n_heads % self.n_kv_heads == 0)):
            bad(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}); 0 = n_heads")
        if self.attn_window < 0:
            bad(f"attn_window must be >= 0 (0 = attend to every earlier key), got {self.attn_window}")
        if self.attn_window and self.halting != 'none':
            bad("attn_window needs halting='none' (halting's per-step KV caches are not windowed)")

    def _check_routing_options(self, bad):
        """The routing block (issue 22). Every balancing method may run alongside the entropy term
        (entropy_reg / att_entropy_reg stay as set: zero them for a method alone). Refused: keys that would
        be ignored, and combinations not implemented (halting cores own their loop and regulariser)."""
        defaults = {f.name: f.default for f in fields(self)}
        block = ('moe_balance', 'balance_coef', 'att_balance_coef', 'bias_update_rate', 'router_noise',
                 'norm_topk', 'ff_n_shared', 'd_shared', 'shared_scale', 'ff_n_null', 'ff_null_identity',
                 'ff_k_schedule', 'router_type', 'router_kernel')
        changed = [k for k in block if getattr(self, k) != defaults[k]]
        if self.model_type != 'moeut' and changed:
            bad(f"{changed[0]}={getattr(self, changed[0])!r} needs model_type='moeut' "
                f"(the dense baseline has no routers)")
        if self.moe_balance not in ('entropy', 'aux_free', 'switch', 'global'):
            bad(f"moe_balance must be 'entropy', 'aux_free', 'switch' or 'global', got {self.moe_balance!r}")
        uses = {'balance_coef': ('switch', 'global'), 'att_balance_coef': ('switch', 'global'),
                'bias_update_rate': ('aux_free',)}
        for k, modes in uses.items():
            if k in changed and self.moe_balance not in modes:
                bad(f"{k} is used by moe_balance={' or '.join(map(repr, modes))} only "
                    f"(moe_balance={self.moe_balance!r})")
        if self.moe_balance == 'aux_free' and not self.bias_update_rate > 0:
            bad(f"bias_update_rate must be > 0 with moe_balance='aux_free', got {self.bias_update_rate}")
        aux = self.moe_balance in ('switch', 'global')
        if aux and not (self.balance_coef > 0 and self.att_balance_coef >= 0):
            bad(f"moe_balance={self.moe_balance!r} needs balance_coef > 0 and att_balance_coef >= 0, got "
                f"{self.balance_coef} and {self.att_balance_coef}")
        if not self.router_noise >= 0:
            bad(f"router_noise must be >= 0, got {self.router_noise}")
        for k in ('ff_n_shared', 'd_shared', 'ff_n_null', 'ff_null_identity'):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 0:
                bad(f"{k} must be an int >= 0, got {getattr(self, k)!r}")
        if self.ff_n_shared == 0 and ('d_shared' in changed or 'shared_scale' in changed):
            bad("d_shared / shared_scale set but ff_n_shared=0 (no shared expert)")
        if self.shared_scale != 'auto':
            try:
                scale = float(self.shared_scale)
            except (TypeError, ValueError):
                scale = float('nan')
            if not 0 < scale < float('inf'):
                bad(f"shared_scale must be 'auto' or a number > 0, got {self.shared_scale!r}")
        if self.router_type not in ('linear', 'conv'):
            bad(f"router_type must be 'linear' or 'conv', got {self.router_type!r}")
        if self.router_type == 'linear' and 'router_kernel' in changed:
            bad("router_kernel is used by router_type='conv' only")
        if not isinstance(self.router_kernel, int) or self.router_kernel < 1:
            bad(f"router_kernel must be an int >= 1, got {self.router_kernel!r}")
        sched = self.ff_k_schedule
        if not isinstance(sched, (tuple, list)) or not all(isinstance(k, int) for k in sched):
            bad(f"ff_k_schedule must be a tuple of ints (one top-k per repeat), got {sched!r}")
        n_ids = self.ff_n_experts + self.ff_n_null + self.ff_null_identity
        R = self.n_layers // self.group_size if self.group_size >= 1 else 0
        if sched and (len(sched) != R or not all(1 <= k <= n_ids for k in sched)):
            bad(f"ff_k_schedule needs {R} values (one per repeat: n_layers/group_size) in 1..{n_ids}, "
                f"got {sched!r}")
        if self.halting != 'none':
            for k, ok in (('moe_balance', self.moe_balance in ('entropy', 'aux_free')),
                          ('router_type', self.router_type == 'linear'), ('ff_k_schedule', not sched)):
                if not ok:
                    bad(f"{k}={getattr(self, k)!r} is not implemented with halting={self.halting!r} "
                        f"(halting.py runs its own loop, cache and regulariser)")

    @property
    def n_rot(self) -> int:
        # spec §5: half of each head, rounded DOWN to an even number (d_head 82 -> 41 -> 40)
        n = self.d_head // 2
        return n - n % 2

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @classmethod
    def from_dict(cls, d: dict) -> 'ModelConfig':
        """Pick the model keys out of a larger config (e.g. train.py's globals)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class AttentionMask(NamedTuple):
    """Public mask API (spec §4): boolean, True = masked OUT. src_length_mask [B, T_k] hides keys
    (padding); position_mask [T_q, T_k] hides key positions per query. AttentionMask(None, None) means
    no masking at all; passing mask=None to the model means causal."""
    src_length_mask: Optional[torch.Tensor]
    position_mask: Optional[torch.Tensor]


# -------------------------------------------------------------------------------------------------
# 1. σ-MoE feedforward (paper: MoE feedforward blocks; spec §3)
#    s = sigmoid(LN_ff(x) W_S);  E(x) = topK(s);  y = Σ_{e∈E(x)} s_e · ReLU(x W1_e) W2_e
# -------------------------------------------------------------------------------------------------

class SigmaMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, d, h = cfg.ff_n_experts, cfg.d_model, cfg.d_expert
        self.k, self.expert_dropout = cfg.ff_k, cfg.ff_expert_dropout
        # MoE++ null ids after the E real experts (zero, then identity): router rows, no expert weights
        self.n_zero, self.n_identity = cfg.ff_n_null, cfg.ff_null_identity
        n_ids = E + self.n_zero + self.n_identity
        self.keys = nn.Parameter(torch.empty(E, d, h))        # W1
        self.values = nn.Parameter(torch.empty(E, h, d))      # W2
        self.expert_sel = nn.Parameter(torch.empty(n_ids, d))  # W_S (F.linear layout)
        # routed slots per expert since the last routing_report(): free (the sort's offsets), no sync
        self.register_buffer('usage', torch.zeros(n_ids, dtype=torch.long), persistent=False)
        # routing options (issue 22): nothing below exists or runs with the defaults
        self.k_schedule = tuple(cfg.ff_k_schedule)
        self.noise, self.norm_topk = cfg.router_noise, cfg.norm_topk
        _balance_buffers(self, '', n_ids, 1, cfg)
        if cfg.ff_n_shared:      # always-on shared expert(s): one dense ReLU MLP of their total width
            W = cfg.ff_n_shared * (cfg.d_shared or h)
            self.shared_up = nn.Parameter(torch.empty(W, d))
            self.shared_down = nn.Parameter(torch.empty(d, W))
            # λ, a buffer: the checkpoint keeps the one the run trained with ('auto': LM.reset_parameters)
            self.shared_auto = cfg.shared_scale == 'auto'
            lam = 1.0 if self.shared_auto else float(cfg.shared_scale)
            self.register_buffer('shared_scale', torch.tensor(lam))
        if cfg.router_type == 'conv':   # depthwise taps [d, kernel]; the last tap is the current token
            self.router_conv = nn.Parameter(torch.empty(d, cfg.router_kernel))

    def forward(self, x: torch.Tensor, router_in: torch.Tensor, routes: Optional[list] = None, *,
                cache: Optional[dict] = None, ctx: Optional['AttnContext'] = None, repeat: int = 0,
                loads: Optional[list] = None):
        """repeat: which application of the shared layer this is (ff_k_schedule); cache/ctx: the layer's
        KV-cache dict and context (router_type='conv' keeps its last inputs there); loads: per-call
        expert counts for the 'switch' loss (Routes.loads)."""
        B, T, d = x.shape
        if hasattr(self, 'router_conv'):
            router_in = self._conv(router_in, cache, ctx)
        # The matmul runs in the autocast dtype; sigmoid, top-K and the regulariser in fp32.
        logits = F.linear(router_in, self.expert_sel).float()             # [B, T, E]
        if routes is not None:
            routes.append(logits)
        k = self.k_schedule[repeat] if self.k_schedule else self.k
        idx, weights = self._pick(logits, k, self.training)
        sel = cvmm_prepare(idx, self.expert_sel.shape[0])   # sorted once, used by both projections
        counts = routed_counts(sel, idx, ctx)
        self.usage += counts
        if self.training:
            _count_loads(self, '', counts, loads)
        y = self._experts(x.reshape(B * T, d), sel, idx, weights.reshape(B * T, k))
        y = y.view(B, T, d)
        if hasattr(self, 'shared_up'):
            y = y + self.shared_scale * self._shared(x)
        return y

    def _pick(self, logits, k: int, train: bool):
        """(ids [..., k], weights [..., k]): top-k of the sigmoid scores; weights = their raw sigmoid,
        no softmax (renormalised to sum 1 only with norm_topk)."""
        scores = torch.sigmoid(logits)
        idx = _topk_indices(scores, k, self.expert_dropout if train else 0.0,
                            getattr(self, 'balance_bias', None), self.noise if train else 0.0)
        weights = scores.gather(-1, idx)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return idx, weights

    def _experts(self, x, sel, idx, weights):
        """y = sum_k w_k relu(x W1[e_k]) W2[e_k]: both projections and the relu in one op (cvmm.cvmm_mlp).
        Null picks (ids past the bank) sort after the real ones and the kernels see only the real rows;
        an identity pick adds w * x."""
        n_null = self.n_zero + self.n_identity
        if not n_null:
            return cvmm_mlp(x, sel, self.keys, self.values, weights)
        y = cvmm_mlp(x, sel, self.keys, self.values, weights, n_null=n_null)
        if self.n_identity:
            identity = idx.reshape(weights.shape) >= self.keys.shape[0] + self.n_zero
            w_id = (weights * identity).sum(-1, keepdim=True)
            y = y + (w_id * x).to(y.dtype)
        return y

    def _shared(self, x):
        return F.linear(F.relu(F.linear(x, self.shared_up)), self.shared_down)

    def _conv(self, r, cache: Optional[dict], ctx: Optional['AttnContext']):
        """Causal depthwise conv over time: u_t = sum_j w[:, j] * r_{t-K+1+j} (zeros before the first
        token). Decoding keeps the last K router inputs in the layer's cache dict, in a ring indexed by
        absolute position mod K: a token written twice at one position (the static cache's CUDA-graph
        warm-up step, later replayed) leaves it exact, as it does the K/V buffers."""
        B, T, d = r.shape
        K = self.router_conv.shape[1]
        if cache is None:
            hist = r.new_zeros(B, K - 1, d)
        else:
            if 'ff_conv' not in cache:
                cache['ff_conv'] = r.new_zeros(B, K, d)
            ring, pos = cache['ff_conv'], ctx.pos
            # the K-1 positions before pos[0] (any before the sequence: slots not written yet, zeros)
            past = pos[0] - (K - 1) + torch.arange(K - 1, device=r.device)
            hist = ring.index_select(1, past.remainder(K))
            n = min(T, K)
            ring.index_copy_(1, pos[T - n:].remainder(K), r[:, T - n:].to(ring.dtype))
        u = torch.cat([hist.to(r.dtype), r], dim=1).transpose(1, 2)                # [B, d, K-1+T]
        return F.conv1d(u, self.router_conv.unsqueeze(1), groups=d).transpose(1, 2)

    @torch.no_grad()
    def _auto_shared_scale(self, n: int = 512) -> float:
        """shared_scale='auto': λ = mean |routed output| / mean |shared output| over n random
        unit-variance inputs, with the weights as they are (call at init), averaged over the repeats' k.
        A fixed generator: the global RNG stream (the rest of the init) is not touched."""
        d = self.keys.shape[1]
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(0)).to(self.keys)
        logits = F.linear(F.layer_norm(x, (d,)), self.expert_sel).float()   # the conv starts as identity
        ks = self.k_schedule or (self.k,)
        routed = 0.0
        for k in ks:
            idx, w = self._pick(logits, k, False)
            sel = cvmm_prepare(idx, self.expert_sel.shape[0])
            routed += self._experts(x, sel, idx, w).norm(dim=-1).mean().item() / len(ks)
        return routed / self._shared(x).norm(dim=-1).mean().clamp(min=1e-30).item()


def _topk_indices(scores: torch.Tensor, k: int, expert_dropout: float,
                  bias: Optional[torch.Tensor] = None, noise: float = 0.0) -> torch.Tensor:
    """Top-k expert ids. The choice alone may be biased (moe_balance='aux_free'), noisy (router_noise,
    train only), or miss randomly dropped experts (expert dropout, train only): the weights are still
    read from the plain scores."""
    if bias is not None:
        scores = scores + bias
    if noise > 0:
        scores = scores + noise * torch.randn_like(scores)
    if expert_dropout > 0:
        drop = torch.rand_like(scores) < expert_dropout
        scores = scores.masked_fill(drop, float('-inf'))
    return topk_ids(scores, k)       # torch.topk on CPU, a Triton kernel on CUDA (cvmm.topk_ids)


def routed_counts(sel, idx: torch.Tensor, ctx) -> torch.Tensor:
    """Slots routed to each id (the sort's offsets: free). halting.py's bucketed steps (halt_buckets) run
    padding rows, flagged by ctx.pad_rows ([rows] bool): they route like any row, but usage and the
    balancing loads must count tokens only, so their picks come off again."""
    counts = sel.offsets[1:] - sel.offsets[:-1]
    pad = getattr(ctx, 'pad_rows', None)
    if pad is None:
        return counts
    ids = idx.reshape(pad.shape[0], -1)                     # [rows, picks per row]
    padded = pad[:, None].expand_as(ids).flatten().to(counts.dtype)
    return counts - torch.zeros_like(counts).index_add(0, ids.flatten(), padded)


# ---- balancing state (moe_balance 'aux_free' / 'global'), shared by the σ-MoE and SwitchHead routers ----

def _balance_buffers(m: nn.Module, suffix: str, n: int, groups: int, cfg: ModelConfig):
    """load: slots routed to each id by training forwards since the last update_balance_bias() (int64,
    exact; not checkpointed: zero after every step). aux_free: balance_bias, added to the choice scores
    (checkpointed; no gradient). global: balance_f, the load fractions of the last global batch
    (checkpointed, uniform at start). groups: routers sharing the buffers (SwitchHead: one per head)."""
    m.balance, m.balance_groups, m.bias_update_rate = cfg.moe_balance, groups, cfg.bias_update_rate
    if cfg.moe_balance in ('aux_free', 'global'):
        m.register_buffer('load' + suffix, torch.zeros(n, dtype=torch.long), persistent=False)
    if cfg.moe_balance == 'aux_free':
        m.register_buffer('balance_bias' + suffix, torch.zeros(n))
    if cfg.moe_balance == 'global':
        m.register_buffer('balance_f' + suffix, torch.full((n,), groups / n))


def _count_loads(m: nn.Module, suffix: str, counts: torch.Tensor, loads: Optional[list]):
    """Training forwards: accumulate the loads update_balance_bias() reads; 'switch' hands this call's
    counts to the regulariser (Routes.loads)."""
    if m.balance in ('aux_free', 'global'):
        getattr(m, 'load' + suffix).add_(counts)
    elif m.balance == 'switch' and loads is not None:
        loads.append(counts)


def _balance_banks(model: nn.Module):
    """(module, suffix) of every router bank with balancing state."""
    for m in model.modules():
        for suffix in ('', '_v', '_o'):
            if isinstance(getattr(m, 'load' + suffix, None), torch.Tensor):
                yield m, suffix


@torch.no_grad()
def update_balance_bias(model: nn.Module, group=None):
    """Call after every optimizer step, on every rank (a collective under torch.distributed): sums
    each router's loads over the step's micro-batches (accumulated by the forwards) and over the
    data-parallel ranks of `group` (one all-reduce for all layers), then
      aux_free: bias_e += rate * sign(mean load - load_e) per router (per head for SwitchHead), so every
                rank applies the same update and the biases stay identical;
      global:   balance_f = this global batch's load fractions, the f of the next step's loss;
    and resets the loads. Nothing to do (no collective) when moe_balance is 'entropy' or 'switch'."""
    banks = list(_balance_banks(model))
    if not banks:
        return
    loads = [getattr(m, 'load' + s) for m, s in banks]
    total = torch.cat(loads)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total, group=group)
    for (m, s), part in zip(banks, total.split([t.numel() for t in loads])):
        part = part.view(m.balance_groups, -1).double()          # [groups, ids]
        if m.balance == 'aux_free':
            err = part.mean(-1, keepdim=True) - part                # > 0: under-loaded, raise its bias
            getattr(m, 'balance_bias' + s).add_((m.bias_update_rate * err.sign()).flatten().float())
        else:
            f = getattr(m, 'balance_f' + s).view_as(part)
            n = part.sum(-1, keepdim=True)
            f.copy_(torch.where(n > 0, part / n.clamp(min=1), f.double()))   # no routed slots: keep it
        getattr(m, 'load' + s).zero_()


# -------------------------------------------------------------------------------------------------
# 2. SwitchHead attention (paper: MoE self-attention; spec §4) with half-RoPE (spec §5)
# -------------------------------------------------------------------------------------------------

def rope(x: torch.Tensor, pos: torch.Tensor, n_rot: int, base: float,
         cos_sin: Optional[tuple] = None) -> torch.Tensor:
    """GPT-NeoX rotate-half RoPE on the first n_rot channels of x [B, H, T, d_head]. pos holds the
    ABSOLUTE positions, [T] or [B, T] (spec §5: a cached decode step must rotate at past_len + i).
    cos_sin: rope_cos_sin(pos, ...) computed once per forward (every layer rotates at the same pos)."""
    if n_rot == 0:
        return x
    cos, sin = cos_sin if cos_sin is not None else rope_cos_sin(pos, n_rot, base)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    xr, xp = x[..., :n_rot], x[..., n_rot:]
    x1, x2 = xr.chunk(2, dim=-1)
    xr = xr * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([xr, xp], dim=-1)


def rope_cos_sin(pos: torch.Tensor, n_rot: int, base: float, dtype=torch.float32):
    """cos, sin of the rotation angles, [T, n_rot] (or [B, 1, T, n_rot] for per-sequence positions)."""
    if torch.compiler.is_compiling():
        # one opaque op under torch.compile: inductor otherwise inlines this small table into each of the
        # 2 x n_layers rotations and recomputes pow/sin/cos for every element of [B, H, T, d_head]
        return torch.ops.nanomoeut.rope_cos_sin(pos, n_rot, base, dtype)
    return _rope_cos_sin(pos, n_rot, base, dtype)


def _rope_cos_sin(pos: torch.Tensor, n_rot: int, base: float, dtype: torch.dtype):
    inv_freq = 1.0 / (base ** (torch.arange(0, n_rot, 2, device=pos.device).float() / n_rot))
    ang = pos.float()[..., None] * inv_freq                    # [..., T, n_rot/2]
    ang = torch.cat([ang, ang], dim=-1)
    if ang.dim() == 3:                                          # per-sequence positions: [B, 1, T, n]
        ang = ang.unsqueeze(1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


@torch.library.custom_op("nanomoeut::rope_cos_sin", mutates_args=())
def _rope_cos_sin_op(pos: torch.Tensor, n_rot: int, base: float,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_cos_sin(pos, n_rot, base, dtype)


@_rope_cos_sin_op.register_fake
def _(pos, n_rot, base, dtype):
    shape = (*pos.shape, n_rot) if pos.dim() < 2 else (pos.shape[0], 1, pos.shape[1], n_rot)
    return pos.new_empty(shape, dtype=dtype), pos.new_empty(shape, dtype=dtype)


class AttnContext(NamedTuple):
    """What every attention layer of one forward pass shares: absolute positions of the new tokens,
    and the SDPA mask (True = attend, SDPA's convention) or is_causal for the plain causal case.
    static_len > 0: the KV cache is a fixed [B, H, static_len, d_head] buffer (see static_kv_cache).
    cos_sin: RoPE's cos/sin at pos, computed once per forward (LM.forward) rather than in every layer.
    window > 0 (attn_window): the growing cache keeps only the last window-1 keys; with static_len, the
    cache is a ring of `window` slots instead (the mask, made from positions, already holds the window)."""
    pos: torch.Tensor
    mask: Optional[torch.Tensor]
    is_causal: bool
    static_len: int = 0
    cos_sin: Optional[tuple] = None
    window: int = 0


def attend(q, k, v, ctx: AttnContext, cache: Optional[dict], n_rot: int, base: float,
           ssmax: Optional[torch.Tensor] = None):
    """Rotate q, k at their absolute positions, extend the KV cache, run SDPA. q: [B, H, T, dh]; k, v:
    [B, H_kv, T, dh] (GQA: H_kv divides H; SwitchHead's V keeps all H). The cache stores k, v as they
    come, so only the KV heads. q and k arrive pre-scaled by d_head^-1/4 each (spec §4): scale=1."""
    if hasattr(ctx, 'attend'):   # halting.py: its context attends over the gathered active tokens itself
        return ctx.attend(q, k, v, cache, n_rot, base, **({} if ssmax is None else {'ssmax': ssmax}))
    q, k = rope(q, ctx.pos, n_rot, base, ctx.cos_sin), rope(k, ctx.pos, n_rot, base, ctx.cos_sin)
    if cache is not None and ctx.static_len and ctx.window:
        k, v = _ring_write(cache, k, v, ctx)
    elif cache is not None and ctx.static_len:   # write at the positions; the mask hides the unwritten tail
        if 'k' not in cache:     # zeros, not empty: masked-out values still enter SDPA's weighted sum
            cache['k'], cache['v'] = (t.new_zeros(t.shape[0], t.shape[1], ctx.static_len, t.shape[3])
                                      for t in (k, v))
        cache['k'].index_copy_(2, ctx.pos, k)
        cache['v'].index_copy_(2, ctx.pos, v)
        k, v = cache['k'], cache['v']
    elif cache is not None:      # cached keys are stored already rotated
        if 'k' in cache:
            k, v = torch.cat([cache['k'], k], dim=2), torch.cat([cache['v'], v], dim=2)
        if ctx.window:           # the next query (position n_past) needs at most the last window-1 keys
            drop = k.shape[2] - min(k.shape[2], ctx.window - 1)
            cache['k'], cache['v'] = k[:, :, drop:], v[:, :, drop:]
        else:
            cache['k'], cache['v'] = k, v
    return sdpa(q, k, v, ctx.mask, ctx.is_causal, ssmax)


def _ring_write(cache: dict, k, v, ctx: AttnContext):
    """Static cache with a sliding window: a ring of W = ctx.window slots (key at position p in slot
    p % W). Returns the keys to attend over: the ring as it was (static_attn_context masks its stale and
    empty slots) followed by the new keys, so a query early in a chunk still sees the keys the chunk's
    later tokens overwrite. Then the chunk's last min(T, W) keys go into the ring."""
    W, T = ctx.window, k.shape[2]
    if 'k' not in cache:
        cache['k'], cache['v'] = (t.new_zeros(t.shape[0], t.shape[1], W, t.shape[3]) for t in (k, v))
    k_all, v_all = torch.cat([cache['k'], k], dim=2), torch.cat([cache['v'], v], dim=2)
    m = min(T, W)
    slots = ctx.pos[T - m:] % W
    cache['k'].index_copy_(2, slots, k[:, :, T - m:])
    cache['v'].index_copy_(2, slots, v[:, :, T - m:])
    return k_all, v_all


def sdpa(q, k, v, mask: Optional[torch.Tensor], is_causal: bool, ssmax: Optional[torch.Tensor] = None):
    """SDPA at scale 1, with GQA (k, v with fewer heads than q; head h reads KV head h // (H/H_kv)) and
    Scalable-Softmax: logits × ssmax[h]·log(n), n = keys this query sees (visible_keys)."""
    if ssmax is not None:     # a factor per query row: scaling q scales its logits, and keeps SDPA's kernels
        log_n = visible_keys(mask, is_causal, q.shape[2], k.shape[2], q.device).log()
        q = q * (ssmax[:, None, None] * log_n).to(q.dtype)
    H = q.shape[1]
    # Repeat the shared heads (after the cache, which keeps them unrepeated) where SDPA's own GQA does not
    # serve: SwitchHead shares K but not V, and SDPA wants both or neither; and with a mask, since on CUDA
    # the memory-efficient kernel (the one that takes a mask) has no GQA and SDPA could fall back to math.
    if k.shape[1] != H and (mask is not None or v.shape[1] == H):
        k = k.repeat_interleave(H // k.shape[1], dim=1)
    if v.shape[1] != H and mask is not None:
        v = v.repeat_interleave(H // v.shape[1], dim=1)
    gqa = {'enable_gqa': True} if k.shape[1] != H else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=1.0, **gqa)


def visible_keys(mask: Optional[torch.Tensor], is_causal: bool, Tq: int, Tk: int, device) -> torch.Tensor:
    """How many keys each query attends to (float, >= 1; broadcasts to [B, H, Tq, 1]): the True entries
    of its row of the SDPA mask (so padding and the window are not counted), q+1 under is_causal (SDPA
    aligns it top-left), else every key. A query that sees nothing counts 1 (log 0 would be -inf)."""
    if mask is not None:
        n = mask.sum(-1, keepdim=True)
    elif is_causal:
        n = torch.arange(1, Tq + 1, device=device)[:, None]
    else:
        n = torch.full((Tq, 1), Tk, device=device)
    return n.clamp(min=1).float()


def qk_heads(x: torch.Tensor, n_heads: int, d_head: int, norm: Optional[nn.Module]) -> torch.Tensor:
    """[B, T, n_heads*d_head] -> [B, n_heads, T, d_head], scaled by d_head^-1/4 (spec §4). qk_norm:
    RMS-normalised per head first; the norm would undo any scale before it, so the d_head^-1/4 comes
    after it and the logits keep the usual 1/sqrt(d_head) of two unit-RMS vectors."""
    B, T, _ = x.shape
    if norm is None:
        return (x * d_head ** -0.25).view(B, T, n_heads, d_head).transpose(1, 2)
    return (norm(x.view(B, T, n_heads, d_head)) * d_head ** -0.25).transpose(1, 2)


def attention_extras(module: nn.Module, cfg: ModelConfig):
    """The attention options' parameters on a SwitchHead / DenseAttention: qk_norm's gains over d_head
    (shared by the heads, one for q and one for k) and SSMax's s per head. Absent when off."""
    module.q_norm = module.k_norm = module.ssmax = None
    if cfg.qk_norm:
        module.q_norm, module.k_norm = nn.RMSNorm(cfg.d_head, eps=1e-6), nn.RMSNorm(cfg.d_head, eps=1e-6)
    if cfg.ssmax:
        module.ssmax = nn.Parameter(torch.empty(cfg.n_heads))


def ssmax_init(cfg: ModelConfig) -> float:
    """s = 1/log(block_size): at the training context's last position the logits are plain softmax's;
    queries that see fewer keys start out softer."""
    return 1 / math.log(max(cfg.block_size, 2))


class SwitchHead(nn.Module):
    """Dense Q, K; V and O are banks of E experts per head, top-k of them chosen per token and head by
    sigmoid routers on LN_att(x). V experts read the RAW residual x (peri-LN, spec §2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, dh, d, E = cfg.n_heads, cfg.d_head, cfg.d_model, cfg.att_n_experts
        self.H, self.dh, self.E, self.top_k = H, dh, E, cfg.att_k
        self.n_rot, self.base, self.expert_dropout = cfg.n_rot, cfg.rope_base, cfg.att_expert_dropout
        self.Hkv = cfg.kv_heads     # GQA for K only: V experts stay per head (docs/options.md "Attention options")
        self.q = nn.Linear(d, H * dh, bias=False)
        self.k = nn.Linear(d, self.Hkv * dh, bias=False)
        attention_extras(self, cfg)
        if E > 1:
            self.v = nn.Parameter(torch.empty(H * E, d, dh))      # head h's expert e is h*E + e
            self.o = nn.Parameter(torch.empty(H * E, dh, d))
            self.sel_v = nn.Parameter(torch.empty(H * E, d))
            self.sel_o = nn.Parameter(torch.empty(H * E, d))
            self.register_buffer('usage_v', torch.zeros(H * E, dtype=torch.long), persistent=False)
            self.register_buffer('usage_o', torch.zeros(H * E, dtype=torch.long), persistent=False)
            # routing options (issue 22), per head; nothing exists or runs with the defaults
            self.noise, self.norm_topk = cfg.router_noise, cfg.norm_topk
            for bank in ('_v', '_o'):
                _balance_buffers(self, bank, H * E, H, cfg)
        else:   # E == 1: dense V/O and a per-head sigmoid gate on each head's output
            self.v = nn.Parameter(torch.empty(H * dh, d))
            self.o = nn.Parameter(torch.empty(d, H * dh))
            self.sel_o = nn.Parameter(torch.empty(H, d))

    def route(self, a: torch.Tensor, bank: str, routes: Optional['Routes'], ctx=None, logits=None):
        """Per head: sigmoid of fp32 router logits, top-k, weights = raw sigmoid. bank: 'v' or 'o'.
        Returns the sorted routing with expert ids shifted into head h's bank (h*E + e), and the
        weights [B, T, H, k]. The routing options act per head (bias, noise, norm_topk, balancing).
        ctx: the layer's attention context, for routed_counts. logits: a @ W_S already computed."""
        usage = getattr(self, 'usage_' + bank)
        if logits is None:
            logits = F.linear(a, getattr(self, 'sel_' + bank))
        logits = logits.float().unflatten(-1, (self.H, self.E))                     # [B, T, H, E]
        if routes is not None:
            routes[bank].append(logits)
        scores = torch.sigmoid(logits)
        bias = getattr(self, 'balance_bias_' + bank, None)
        idx = _topk_indices(scores, self.top_k, self.expert_dropout if self.training else 0.0,
                            bias.view(self.H, self.E) if bias is not None else None,
                            self.noise if self.training else 0.0)
        weights = scores.gather(-1, idx)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        idx = idx + torch.arange(self.H, device=idx.device)[:, None] * self.E
        sel = cvmm_prepare(idx, self.H * self.E)
        counts = routed_counts(sel, idx, ctx)
        usage += counts
        if self.training:
            _count_loads(self, '_' + bank, counts, routes.loads[bank] if routes is not None else None)
        return sel, weights

    def forward(self, a, x, ctx: AttnContext, cache=None, routes=None):
        """a = LN_att(x) feeds Q, K and both routers; x (raw residual) feeds V."""
        B, T, d = x.shape
        H, dh = self.H, self.dh
        if self.E > 1:
            # Q, K and both routers read a: one matmul, so the backward writes one gradient of a, not
            # four that autograd must then add (MoEUT-126M compiled: 1.05x tokens/s, docs/results.md)
            z = F.linear(a, torch.cat([self.q.weight, self.k.weight, self.sel_v, self.sel_o]))
            q, k, lv, lo = z.split([H * dh, self.Hkv * dh, H * self.E, H * self.E], -1)
            q, k = qk_heads(q, H, dh, self.q_norm), qk_heads(k, self.Hkv, dh, self.k_norm)
            v_sel, v_w = self.route(a, 'v', routes, ctx, lv)
            o_sel, o_w = self.route(a, 'o', routes, ctx, lo)
            # V: slots [N, H, k] read token rows (fan H*k), contracted over each head's k picks
            v = cvmm(x.reshape(B * T, d), v_sel, self.v, v_w.reshape(B * T * H, self.top_k))
            v = v.view(B, T, H, dh).transpose(1, 2)
        else:
            q = qk_heads(self.q(a), H, dh, self.q_norm)
            k = qk_heads(self.k(a), self.Hkv, dh, self.k_norm)
            v = F.linear(x, self.v).view(B, T, H, dh).transpose(1, 2)
        att = attend(q, k, v, ctx, cache, self.n_rot, self.base, self.ssmax)  # [B, H, T, dh]
        att = att.transpose(1, 2)                                             # [B, T, H, dh]
        if self.E > 1:
            # O: slots [N, H, k] read (token, head) rows (fan k); ONE weighted sum over all H*k picks
            y = cvmm(att.reshape(B * T * H, dh), o_sel, self.o, o_w.reshape(B * T, H * self.top_k))
            return y.view(B, T, d)
        gate = torch.sigmoid(F.linear(a, self.sel_o))                         # [B, T, H]
        return F.linear((att * gate[..., None]).reshape(B, T, H * dh), self.o)


# -------------------------------------------------------------------------------------------------
# 3. Entropy regularisation (spec §6). For each shared layer, pool the router logits of all its
#    applications (R repeats) over time: p_b = mean_{t,r} softmax(z_{b,t,r}); loss = -(1/B) Σ_b H(p_b).
# -------------------------------------------------------------------------------------------------

def marginal_neg_entropy(logits: list) -> torch.Tensor:
    """logits: R tensors [B, T, ..., E] (one per application of the layer). Returns -mean H(p) where p
    is the per-sequence (and per-head, for attention) marginal over experts, pooled over T*R rows."""
    z = torch.cat(logits, dim=1).float()                                   # [B, T*R, ..., E]
    log_p = torch.logsumexp(F.log_softmax(z, dim=-1), dim=1) - math.log(z.shape[1])   # [B, ..., E]
    entropy = -(log_p.exp() * log_p).sum(-1)
    return -entropy.mean()


def switch_balance_loss(logits: list, f: torch.Tensor) -> torch.Tensor:
    """The Switch / GShard load-balancing loss E * sum_e f_e P_e, averaged over heads: logits, R tensors
    [B, T, ..., E] (one per application of the layer); f [heads, E], the fraction of picks each expert
    got (no gradient). P_e is the mean router probability over every row, taken as the softmax of the
    raw logits, as the entropy term does (the sigmoid scores do not sum to 1). 1 when uniform."""
    z = torch.cat([t.flatten(0, 1) for t in logits]).float()                     # [rows, ..., E]
    P = torch.softmax(z, dim=-1).mean(0).view_as(f)                               # [heads, E]
    return (f.shape[-1] * (f.detach() * P).sum(-1)).mean()


# -------------------------------------------------------------------------------------------------
# 4-5. The layer with peri-LayerNorm (spec §2) and the grouped stack (layer grouping, spec §1)
# -------------------------------------------------------------------------------------------------

class MoEUTLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_att = nn.LayerNorm(cfg.d_model)
        self.ln_ff = nn.LayerNorm(cfg.d_model)
        self.attention = SwitchHead(cfg)
        self.ffn = SigmaMoE(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, ctx: AttnContext, cache=None, routes=None, repeat: int = 0):
        """repeat: which application of this shared layer (the σ-MoE's ff_k_schedule)."""
        # peri-LN: norms only in front of maps that feed a softmax/sigmoid; the residual, V, O and
        # the experts see raw x, so signal magnitude can grow across the shared, repeated layers.
        a = self.ln_att(x)
        x = x + self.drop(self.attention(a, x, ctx, cache, routes))
        # no dropout on the σ-MoE branch (spec §2, as the official layer)
        return x + self.ffn(x, self.ln_ff(x), routes['ff'] if routes else None, cache=cache, ctx=ctx,
                            repeat=repeat, loads=routes.loads['ff'] if routes else None)


class Routes:
    """The router logits of one shared layer's applications, handed back for the regulariser:
    routes['ff'], routes['v'], routes['o'] are lists the layer appends to. A plain object on purpose:
    FSDP2 rebuilds list/dict arguments that hold grad tensors, so appends to a list passed in would
    land in a copy (and the regulariser would silently be zero)."""

    def __init__(self):
        self.lists = {'ff': [], 'v': [], 'o': []}
        self.loads = {'ff': [], 'v': [], 'o': []}     # moe_balance='switch': each call's expert counts

    def __getitem__(self, kind):
        return self.lists[kind]

    def items(self):
        return self.lists.items()


class MoEUT(nn.Module):
    """The non-LM core: [B, T, d_model] -> [B, T, d_model] and the regulariser (spec §1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_repeats = cfg.n_layers // cfg.group_size
        self.eval_repeats = 0       # test-time depth: > 0 runs that many repeats in eval mode (halting.set_depth)
        self.layers = nn.ModuleList([MoEUTLayer(cfg) for _ in range(cfg.group_size)])

    def forward(self, x, ctx: AttnContext, kv_cache: Optional[dict] = None):
        G = len(self.layers)
        aux = self.cfg.moe_balance in ('switch', 'global')
        collect = self.training and (self.cfg.entropy_reg > 0 or self.cfg.att_entropy_reg > 0 or aux)
        routes = [Routes() if collect else None for _ in range(G)]
        R = self.eval_repeats if self.eval_repeats and not self.training else self.n_repeats
        for r in range(R):                                # A B A B ...: layer li at depth r*G + li
            for li, layer in enumerate(self.layers):
                cache = kv_cache.setdefault(r * G + li, {}) if kv_cache is not None else None
                if self.training and getattr(self, 'activation_checkpointing', False):   # train.py's key
                    from torch.utils.checkpoint import checkpoint
                    x = checkpoint(layer, x, ctx, cache, routes[li], r, use_reentrant=False)
                else:
                    x = layer(x, ctx, cache, routes[li], r)
        return x, self.reg_loss(routes, x)

    def reg_loss(self, routes, x) -> torch.Tensor:
        """γ Σ_layers L_mlp + δ Σ_layers (L_V + L_O); zero in eval mode (spec §6). moe_balance 'switch' /
        'global' add their aux loss (balance_loss); an entropy term with a zero weight is then skipped."""
        cfg = self.cfg
        aux = cfg.moe_balance in ('switch', 'global')
        loss = x.new_zeros((), dtype=torch.float32)
        for rt in routes:
            if rt is None:
                continue
            if rt['ff'] and not (aux and cfg.entropy_reg == 0):
                loss = loss + self.cfg.entropy_reg * marginal_neg_entropy(rt['ff'])
            if rt['v'] and not (aux and cfg.att_entropy_reg == 0):
                loss = loss + self.cfg.att_entropy_reg * (marginal_neg_entropy(rt['v']) +
                                                          marginal_neg_entropy(rt['o']))
        if aux:
            loss = loss + self.balance_loss(routes)
        return loss

    def balance_loss(self, routes) -> torch.Tensor:
        """moe_balance 'switch' / 'global': per shared layer, pooled over its applications,
        balance_coef * L(σ-MoE) + att_balance_coef * (L(V) + L(O)) with L = switch_balance_loss.
        'switch': f from this micro-batch's picks. 'global': f = balance_f, the load fractions of the
        previous optimizer step's whole global batch (every micro-batch, every rank; update_balance_bias),
        a one-step-stale estimate that costs no collective in the forward and gives every micro-batch
        of a step the same f, however the batch is split (uniform before the first update)."""
        cfg = self.cfg
        loss = 0.0
        for layer, rt in zip(self.layers, routes):
            if rt is None:
                continue
            banks = [('ff', layer.ffn, '', cfg.balance_coef)]
            if rt['v'] and cfg.att_balance_coef > 0:
                banks += [(b, layer.attention, '_' + b, cfg.att_balance_coef) for b in ('v', 'o')]
            for kind, m, suffix, coef in banks:
                if cfg.moe_balance == 'switch':
                    f = torch.stack(rt.loads[kind]).sum(0).view(m.balance_groups, -1).float()
                    f = f / f.sum(-1, keepdim=True)
                else:
                    f = getattr(m, 'balance_f' + suffix).view(m.balance_groups, -1)
                loss = loss + coef * switch_balance_loss(rt[kind], f)
        return loss


# -------------------------------------------------------------------------------------------------
# Dense pre-LN GPT baseline: same attention/RoPE code, ReLU MLP with biases.
# -------------------------------------------------------------------------------------------------

class DenseAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
        self.H, self.dh, self.n_rot, self.base = H, dh, cfg.n_rot, cfg.rope_base
        self.Hkv = cfg.kv_heads      # GQA: K and V shared by groups of H/Hkv query heads
        self.qkv = nn.Linear(d, (H + 2 * self.Hkv) * dh, bias=False)     # [q heads | k heads | v heads]
        self.proj = nn.Linear(H * dh, d, bias=False)
        attention_extras(self, cfg)

    def forward(self, a, ctx: AttnContext, cache=None):
        B, T, _ = a.shape
        H, Hkv, dh = self.H, self.Hkv, self.dh
        q, k, v = self.qkv(a).split([H * dh, Hkv * dh, Hkv * dh], dim=-1)
        q, k = qk_heads(q, H, dh, self.q_norm), qk_heads(k, Hkv, dh, self.k_norm)
        v = v.view(B, T, Hkv, dh).transpose(1, 2)
        y = attend(q, k, v, ctx, cache, self.n_rot, self.base, self.ssmax)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * dh))


class DenseBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = DenseAttention(cfg)
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, ctx, cache=None):
        x = x + self.drop(self.attn(self.ln1(x), ctx, cache))
        return x + self.drop(self.fc_out(F.relu(self.fc(self.ln2(x)))))


class Dense(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList([DenseBlock(cfg) for _ in range(cfg.n_layers)])

    def forward(self, x, ctx, kv_cache=None):
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, kv_cache.setdefault(i, {}) if kv_cache is not None else None)
        return x, x.new_zeros((), dtype=torch.float32)


# -------------------------------------------------------------------------------------------------
# The language model: embedding (no scaling, no positions) -> core -> LayerNorm -> lm_head (spec §1)
# -------------------------------------------------------------------------------------------------

class LMOutput(NamedTuple):
    logits: torch.Tensor
    loss: Optional[torch.Tensor]      # ce + reg_loss (what to backprop), None without targets
    ce: Optional[torch.Tensor]
    reg_loss: torch.Tensor


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig, core=None):
        """core: the class of the part between embedding and output norm (called with cfg; MoEUT's
        interface). Default: MoEUT or the dense stack. Configs with cfg.halting_core run halting.py's
        core, which halting.build_lm(cfg) passes in: this file does not import halting.py."""
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if core is not None:
            self.core = core(cfg)
        elif cfg.halting_core:
            raise ValueError("model config: halting / n_prelude / n_coda / recurrence / input_injection run in "
                             "halting.py's core: build the model with halting.build_lm(cfg)")
        elif cfg.model_type == 'dense':
            self.core = Dense(cfg)
        else:
            self.core = MoEUT(cfg)
        self.out_norm = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.reset_parameters()

    # ---- initialisation (spec §7) ----
    @torch.no_grad()
    def reset_parameters(self):
        cfg = self.cfg
        # total depth, not G (spec §7): the deepest path a token can take, unique prelude/coda included
        s = math.sqrt(2 / (cfg.n_layers + cfg.n_prelude + cfg.n_coda))
        d, H, dh = cfg.d_model, cfg.n_heads, cfg.d_head
        nn.init.kaiming_normal_(self.embedding.weight, mode='fan_in', nonlinearity='linear')
        for m in self.modules():
            if getattr(m, 'ssmax', None) is not None:        # attention options (attention_extras)
                nn.init.constant_(m.ssmax, ssmax_init(cfg))
            if isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, SigmaMoE):
                nn.init.normal_(m.expert_sel, 0, s / math.sqrt(d))
                _renorm_rows(m.expert_sel)
                nn.init.normal_(m.keys, 0, s / math.sqrt(d))
                nn.init.normal_(m.values, 0, s / math.sqrt(m.keys.shape[0] * cfg.d_expert))
                if hasattr(m, 'shared_up'):      # fan-in init, as the dense baseline's MLP
                    nn.init.normal_(m.shared_up, 0, s / math.sqrt(d))
                    nn.init.normal_(m.shared_down, 0, s / math.sqrt(m.shared_down.shape[1]))
                if hasattr(m, 'router_conv'):    # the identity: the router starts as the plain one
                    nn.init.zeros_(m.router_conv)
                    nn.init.ones_(m.router_conv[:, -1])
            elif isinstance(m, SwitchHead):
                for w in (m.q.weight, m.k.weight, m.v):
                    nn.init.normal_(w, 0, s / math.sqrt(d))
                nn.init.normal_(m.o, 0, s / math.sqrt(H * dh))
                for w in ([m.sel_v] if m.E > 1 else []) + [m.sel_o]:
                    nn.init.normal_(w, 0, s / math.sqrt(d))
                    _renorm_rows(w)
            elif isinstance(m, DenseBlock):
                # the same fan-in scheme for the baseline, so the comparison is about architecture
                for lin in (m.attn.qkv, m.fc):
                    nn.init.normal_(lin.weight, 0, s / math.sqrt(lin.in_features))
                for lin in (m.attn.proj, m.fc_out):
                    nn.init.normal_(lin.weight, 0, s / math.sqrt(lin.in_features))
                nn.init.zeros_(m.fc.bias)
                nn.init.zeros_(m.fc_out.bias)
        auto = [m for m in self.modules() if getattr(m, 'shared_auto', False)]
        if auto and not auto[0].keys.is_meta:    # shared_scale='auto': match the routed output's norm
            lams = [m._auto_shared_scale() for m in auto]
            for m, lam in zip(auto, lams):
                m.shared_scale.fill_(lam)
            print(f"shared experts: shared_scale='auto' -> {', '.join(f'{v:.4g}' for v in lams)} "
                  f"(per σ-MoE layer: mean routed / shared output norm at init)")

    # ---- forward ----
    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                mask: Optional[AttentionMask] = None, kv_cache: Optional[dict] = None) -> LMOutput:
        """idx [B, T] token ids; targets [B, T] (ignore_index -1). kv_cache: a dict the caller keeps
        ({} to start); it is extended in place, and new tokens are placed after what it holds."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be [batch, time], got shape {tuple(idx.shape)}")
        static = kv_cache is not None and 'static_len' in kv_cache
        if static:
            ctx = static_attn_context(idx.shape[1], kv_cache, mask, self.cfg)
        else:
            past = cache_length(kv_cache)
            ctx = make_attn_context(idx.shape[1], past, mask, idx.device, self.cfg.attn_window)
        if self.cfg.n_rot:
            ctx = ctx._replace(cos_sin=rope_cos_sin(ctx.pos, self.cfg.n_rot, self.cfg.rope_base,
                                                    self._compute_dtype(idx.device)))
        x, reg_loss = self.core(self.embedding(idx), ctx, kv_cache)
        if static:
            kv_cache['pos'] += idx.shape[1]          # on the device: no host sync, graph-capturable
        elif kv_cache is not None:
            kv_cache['n_past'] = past + idx.shape[1]
        logits = self.lm_head(self.out_norm(x))
        ce = loss = None
        if targets is not None:
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
            loss = ce + reg_loss
        return LMOutput(logits, loss, ce, reg_loss)

    def _compute_dtype(self, device) -> torch.dtype:
        """The dtype q and k come out of their projections in (autocast's, else the weights')."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.lm_head.weight.dtype

    # ---- generation ----
    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 cuda_graph: Optional[bool] = None, compile: bool = False):
        """Sample continuations of idx [B, T] with the KV cache. temperature 0 = greedy. A row that
        emitted eos_token keeps emitting it; generation stops early when every row has.
        MoEUT and dense models decode from a static cache (static_kv_cache); on CUDA the one-token step
        is captured once as a CUDA graph and replayed, because an eager MoEUT step is pure launch
        overhead (cuda_graph=False: eager). Halting models keep the growing cache (their per-step
        caches hold different numbers of tokens, so the step shapes are not static).
        compile=True: torch.compile the one-token step before capturing it, fusing its ~2,000 small
        kernels (worth its compile time only for long generations)."""
        block = self.cfg.block_size
        if idx.shape[1] > block:
            raise ValueError(f"prompt of {idx.shape[1]} tokens is longer than block_size {block}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
            raise ValueError(f"generate: need top_k >= 1 (or None) and 0 < top_p <= 1 (or None), got "
                             f"top_k={top_k}, top_p={top_p}")
        static = isinstance(self.core, (MoEUT, Dense))     # halting.py's core: per-step caches grow
        if cuda_graph is None:
            cuda_graph = static and idx.is_cuda
        if cuda_graph and not (static and idx.is_cuda):
            raise ValueError("generate: cuda_graph=True needs a CUDA model without halting")
        if compile and not cuda_graph:
            raise ValueError("generate: compile=True compiles the CUDA-graph decode step; it needs "
                             "cuda_graph (a CUDA model without halting)")
        model = self._matmul_weights_in_autocast_dtype() if cuda_graph else self
        cache = static_kv_cache(min(block, idx.shape[1] + max_new_tokens), idx.device) if static else {}
        logits = model(idx, kv_cache=cache).logits[:, -1]
        # no step when no token will be fed back through the cache (a full-context prompt slides at once;
        # the capture's warm-up would write past the end of the cache)
        step = self._decode_step(model, cache, idx.shape[0], cuda_graph, compile) \
            if max_new_tokens > 1 and idx.shape[1] < block else None
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_token is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token), nxt)
                done |= nxt == eos_token
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            if i == max_new_tokens - 1 or (eos_token is not None and bool(done.all())):
                break
            if idx.shape[1] <= block:
                logits = step(nxt)
            else:   # past the context: slide the window (re-encode the last block_size tokens)
                logits = model(idx[:, -block:]).logits[:, -1]
        return idx

    def _matmul_weights_in_autocast_dtype(self):
        """Under autocast, `self` as a function whose matmul weights (linears, routers, expert banks)
        are held already cast, so a replayed step does not re-cast every weight every time (that was
        1/3 of a MoEUT-126M decode step). Same numbers: autocast casts them to these very values.
        The embedding and the norms keep their dtype, as autocast would."""
        if not torch.is_autocast_enabled('cuda'):
            return self
        dt = torch.get_autocast_dtype('cuda')
        low = {n: p.to(dt) for n, p in self.named_parameters()
               if p.dim() >= 2 and p.is_floating_point() and not n.startswith('embedding.')}

        def run(*args, **kwargs):
            return torch.func.functional_call(self, low, args, kwargs)
        return run

    @staticmethod
    def _decode_step(model, cache: dict, B: int, cuda_graph: bool, compile: bool = False):
        """A function tok [B] -> logits [B, V] for the next position, extending the cache by one."""
        if not cuda_graph:
            return lambda tok: model(tok[:, None], kv_cache=cache).logits[:, -1]
        if compile:      # static shapes; the position is a tensor, so one compile serves every step
            model = torch.compile(model, dynamic=False)
        dev = cache['pos'].device
        tok = torch.zeros(B, 1, dtype=torch.long, device=dev)
        pos = cache['pos'].clone()
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream(dev)
        # autocast's weight-cast cache would hand later eager calls casts that only a replay fills; and
        # warm-up and capture share one autocast state, so a compiled step is not recompiled mid-capture
        amp = torch.autocast('cuda', dtype=torch.get_autocast_dtype('cuda'),
                             enabled=torch.is_autocast_enabled('cuda'), cache_enabled=False)
        with torch.cuda.device(dev), amp:   # the model's GPU, whichever is current
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):    # warm-up outside the capture: compiles, workspaces
                model(tok, kv_cache=cache)
            torch.cuda.current_stream(dev).wait_stream(side)
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(dev)):
                logits = model(tok, kv_cache=cache).logits[:, -1]
        cache['pos'].copy_(pos)              # undo the warm-up (the first replay overwrites its K/V)

        def step(nxt):
            tok.copy_(nxt[:, None])
            with torch.cuda.device(dev):     # replay on the model's GPU's current stream
                graph.replay()
            return logits
        return step

    # ---- loading the official implementation's weights ----
    def load_official_state_dict(self, sd: dict):
        """Weights saved by the official MoEUTLM (RobertCsordas/moeut) under its names."""
        ren = {'transformer.': 'core.', '.ln1.': '.ln_att.', '.ln2.': '.ln_ff.'}
        out = {}
        for k, v in sd.items():
            for a, b in ren.items():
                k = k.replace(a, b)
            out[k] = v
        self.load_state_dict(out)


@torch.no_grad()
def _renorm_rows(w: torch.Tensor):
    """Give every router row the same L2 norm while keeping the tensor's overall std (spec §7), so no
    expert starts out favoured."""
    std = w.std()
    w.div_(w.norm(dim=-1, keepdim=True))
    w.mul_(std / w.std())


def cache_length(kv_cache: Optional[dict]) -> int:
    """Tokens already in the cache. Stored explicitly: with halting, deeper layers' caches hold fewer."""
    return kv_cache.get('n_past', 0) if kv_cache else 0


def static_kv_cache(length: int, device) -> dict:
    """A fixed-size KV cache for decoding: every layer's keys/values live in [B, H, length, d_head]
    buffers (made at the first forward) and the next position is a device tensor, so a decode step has
    static shapes and no host sync and can be captured once as a CUDA graph (LM.generate). Causal only.
    It holds at most `length` tokens; writing past that is a device-side index error. The buffers take
    the dtype of the first forward's keys: keep one autocast state for the cache's life. With
    attn_window < length the buffers are a ring of attn_window slots instead (static_attn_context)."""
    return {'static_len': length, 'pos': torch.zeros((), dtype=torch.long, device=device)}


def static_attn_context(T: int, kv_cache: dict, mask: Optional[AttentionMask], cfg: ModelConfig):
    """New tokens sit at pos .. pos+T-1 and see every buffer slot at or before their own position."""
    if mask is not None:
        raise ValueError("a static KV cache decodes causally: pass mask=None")
    if cfg.halting != 'none':
        raise ValueError("halting models decode with the growing KV cache ({}), not static_kv_cache")
    L = kv_cache['static_len']
    if T > L:
        raise ValueError(f"{T} new tokens do not fit a static KV cache of {L}")
    pos = kv_cache['pos'] + torch.arange(T, device=kv_cache['pos'].device)
    W = cfg.attn_window
    if not 0 < W < L:       # no window, or one that cannot bite within L positions
        allowed = torch.arange(L, device=pos.device) <= pos[:, None]               # [T, L]
        return AttnContext(pos, allowed, False, L)
    # a ring of W slots (_ring_write); slot j holds the newest position < pos[0] that is j mod W
    last = kv_cache['pos'] - 1
    slot_pos = last - torch.remainder(last - torch.arange(W, device=pos.device), W)      # < 0: empty
    kpos = torch.cat([slot_pos, pos])                                                    # ring, then new
    seen = torch.cat([slot_pos >= 0, torch.ones(T, dtype=torch.bool, device=pos.device)])
    allowed = seen & (kpos <= pos[:, None]) & (kpos > pos[:, None] - W)                   # [T, W + T]
    return AttnContext(pos, allowed, False, L, window=W)


def make_attn_context(T: int, past: int, mask: Optional[AttentionMask], device,
                      window: int = 0) -> AttnContext:
    """Positions of the new tokens, and the SDPA mask. mask=None: causal (the fast is_causal path when
    there is no past; with a cache, new token i sees every past key and new keys <= i).
    An AttentionMask (True = masked out) is inverted to SDPA's True = attend.
    window (attn_window): also hide keys W or more positions back (_window_context once that can bite)."""
    if window and past + T > window:
        return _window_context(T, past, mask, device, window)
    ctx = _full_context(T, past, mask, device)
    return ctx._replace(window=window) if window else ctx    # the cache still keeps only window-1 keys


def _window_context(T: int, past: int, mask: Optional[AttentionMask], device, W: int) -> AttnContext:
    """Sliding window: the cache holds the last min(past, W-1) keys; query at p sees keys in (p-W, p].
    A given AttentionMask is ANDed in; its key axis counts absolute positions 0..past+T-1 (or only the
    new tokens, if T wide, as without a window) and is cut to the keys the cache still has."""
    n_old = min(past, W - 1)
    kpos = torch.arange(past - n_old, past + T, device=device)
    pos, Tk = kpos[n_old:], n_old + T
    if mask is None and T == 1:          # decode: the W-1 cached keys and its own, all visible
        return AttnContext(pos, None, False, window=W)
    allowed = kpos > pos[:, None] - W                                          # [T, Tk]
    if mask is None:
        return AttnContext(pos, allowed & (kpos <= pos[:, None]), False, window=W)
    src, posm = mask
    if posm is not None:
        posm = posm.to(torch.bool)
        posm = F.pad(posm, (Tk - posm.shape[-1], 0), value=False) if posm.shape[-1] < Tk else posm[..., -Tk:]
        allowed = allowed & ~posm
    if src is not None:
        allowed = allowed & ~src.to(torch.bool)[:, None, None, -Tk:]
    return AttnContext(pos, allowed, False, window=W)


def _full_context(T: int, past: int, mask: Optional[AttentionMask], device) -> AttnContext:
    pos = torch.arange(past, past + T, device=device)
    Tk = past + T
    if mask is None:
        if past == 0:
            return AttnContext(pos, None, T > 1)
        if T == 1:
            return AttnContext(pos, None, False)
        allowed = torch.arange(Tk, device=device)[None, :] <= pos[:, None]      # [T, Tk]
        return AttnContext(pos, allowed, False)
    src, posm = mask
    if src is None and posm is None:
        return AttnContext(pos, None, False)
    masked = torch.zeros(1, 1, T, Tk, dtype=torch.bool, device=device)
    if posm is not None:
        if posm.shape[-1] < Tk:    # a [T, T] mask for the new tokens: the cached past stays visible
            posm = F.pad(posm, (Tk - posm.shape[-1], 0), value=False)
        masked = masked | posm.to(torch.bool)
    if src is not None:
        masked = masked | src.to(torch.bool)[:, None, None, :]
    return AttnContext(pos, ~masked, False)


@torch.no_grad()
def sample_next(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                top_p: Optional[float], generator=None) -> torch.Tensor:
    """One token per row from logits [B, V]: greedy at temperature 0, else temperature, then keep the
    top_k most likely and/or the smallest set whose probability reaches top_p (nucleus)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p       # mass before this token already enough
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float('-inf'))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def distinct_layers(core: nn.Module) -> list:
    """Every distinct layer module of a core: the shared (or dense) layers, then a halting model's
    prelude and coda layers."""
    return [*getattr(core, 'layers', []), *getattr(core, 'prelude', []), *getattr(core, 'coda', [])]


@torch.no_grad()
def routing_report(model: nn.Module) -> dict:
    """What the routers did since the last call, per shared layer li: for the σ-MoE ('ff{li}') and the
    SwitchHead V/O banks ('v{li}', 'o{li}'): the fraction of routed slots each expert got, how many got
    none (dead), and the entropy of that usage over its maximum log(E) (1 = perfectly balanced).
    With MoE++ null experts the σ-MoE usage covers their ids too (after the real experts), and
    'null_frac' / 'identity_frac' say what fraction of its picks went to null (zero or identity) /
    identity ids.
    Reads and resets the usage counters (one host sync: call it at log time, not every step)."""
    report = {}
    for li, layer in enumerate(distinct_layers(model.core)):   # prelude/coda layers numbered after the group
        ffn = getattr(layer, 'ffn', None)
        banks = {'ff': getattr(getattr(layer, 'ffn', None), 'usage', None),
                 'v': getattr(getattr(layer, 'attention', None), 'usage_v', None),
                 'o': getattr(getattr(layer, 'attention', None), 'usage_o', None)}
        for kind, counts in banks.items():
            if counts is None:
                continue
            c = counts.double().cpu()
            frac = c / c.sum().clamp(min=1)
            entropy = -(frac * frac.clamp(min=1e-30).log()).sum().item()
            report[f'{kind}{li}'] = {'usage': frac, 'dead': int((c == 0).sum()),
                                     'entropy_ratio': entropy / math.log(len(c)) if len(c) > 1 else 1.0}
            if kind == 'ff' and len(c) > ffn.keys.shape[0]:    # MoE++ null ids: picks that cost nothing
                E, n_zero = ffn.keys.shape[0], ffn.n_zero
                report[f'{kind}{li}']['null_frac'] = frac[E:].sum().item()
                report[f'{kind}{li}']['identity_frac'] = frac[E + n_zero:].sum().item()
            counts.zero_()
    return report


# -------------------------------------------------------------------------------------------------
# Parameter and FLOP accounting (what a user wants to see before launching a run)
# -------------------------------------------------------------------------------------------------

def param_counts(cfg: ModelConfig) -> dict:
    """total, non-embedding (total minus token embedding and lm_head), and active per token: the
    non-embedding weights one token actually multiplies by in one pass over the distinct layers."""
    d, V, H, dh = cfg.d_model, cfg.vocab_size, cfg.n_heads, cfg.d_head
    emb = V * d + V * d + V      # embedding + lm_head (with bias)
    ln = 2 * d
    kv = cfg.kv_heads
    extras = 2 * dh * cfg.qk_norm + H * cfg.ssmax          # attention options' gains and scales
    if cfg.model_type == 'dense':
        per = 2 * d * H * dh + 2 * d * kv * dh + 2 * d * cfg.d_ff + cfg.d_ff + d + 2 * ln + extras
        layers, active_per = cfg.n_layers * per, per
    else:
        E, k = cfg.att_n_experts, cfg.att_k
        att = d * H * dh + d * kv * dh + extras
        if E > 1:
            att_total = att + 2 * H * E * d * dh + 2 * H * E * d
            att_active = att + 2 * H * k * d * dh + 2 * H * E * d
        else:
            att_total = att_active = att + 2 * H * dh * d + H * d
        ff_extra = _ff_extra_params(cfg)
        ff_total = 2 * cfg.ff_n_experts * d * cfg.d_expert + _n_router_ids(cfg) * d + ff_extra
        ff_k = max(cfg.ff_k_schedule) if cfg.ff_k_schedule else cfg.ff_k     # the largest top-k
        ff_active = 2 * ff_k * d * cfg.d_expert + _n_router_ids(cfg) * d + ff_extra
        layers = cfg.group_size * (att_total + ff_total + 2 * ln)
        active_per = att_active + ff_active + 2 * ln
    total = layers + emb + ln
    if cfg.halting_core:
        # halting.py's core: prelude/coda layers, the halting unit or router (LayerNorm + linear), the
        # input-injection adapter. Counted here because this file does not import halting.py;
        # tests/test_halting.py checks the sum against the module.
        R = cfg.n_layers // cfg.group_size
        total += (cfg.n_prelude + cfg.n_coda) * layers // cfg.group_size
        total += {'act': 2 * d + d + 1, 'mor': 2 * d + d * R + R}.get(cfg.halting, 0)
        total += 2 * d * d if cfg.input_injection == 'concat' else 0
    distinct = cfg.group_size + cfg.n_prelude + cfg.n_coda if cfg.model_type == 'moeut' else cfg.n_layers
    return {'total': total, 'non_embedding': total - emb, 'active_per_token': active_per * distinct}


def flops_per_token(cfg: ModelConfig, T: Optional[int] = None) -> int:
    """Forward FLOPs (2 per multiply-add) per token at context T: every weight matmul a token runs
    through in all layer applications (n_layers, plus prelude/coda layers of a halting model, every
    token at full depth), attention scores and mixing over the T/2 keys a causal query sees on
    average, the routers, and the LM head. With MoE++ null experts, an upper bound: every pick counted
    as a real expert (how many are null depends on the data)."""
    T = T or cfg.block_size
    d, H, dh, V = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.vocab_size
    kv, W = cfg.kv_heads, cfg.attn_window
    att_scores = 2 * T * H * dh // 2        # QK^T and AV over on average T/2 visible keys
    if 0 < W < T:                           # sliding window: min(t+1, W) keys, averaged over t < T
        att_scores = 2 * (W * (W + 1) // 2 + (T - W) * W) * H * dh // T
    if cfg.model_type == 'dense':
        per_layer = 2 * d * H * dh + 2 * d * kv * dh + 2 * d * cfg.d_ff + att_scores
    else:
        E, k = cfg.att_n_experts, cfg.att_k
        vo = 2 * H * k * d * dh + 2 * H * E * d if E > 1 else 2 * H * dh * d + H * d
        per_layer = (d * H * dh + d * kv * dh + vo + att_scores + 2 * cfg.ff_k * d * cfg.d_expert
                     + _n_router_ids(cfg) * d + _ff_extra_params(cfg))
        if cfg.ff_k_schedule:      # the top-k of each repeat instead of ff_k (no halting: no prelude/coda)
            per_layer -= 2 * cfg.ff_k * d * cfg.d_expert
            return 2 * (sum(cfg.group_size * (per_layer + 2 * k * d * cfg.d_expert) for k in cfg.ff_k_schedule)
                        + d * V)
    return 2 * ((cfg.n_layers + cfg.n_prelude + cfg.n_coda) * per_layer + d * V)


def _n_router_ids(cfg: ModelConfig) -> int:
    """Rows of the σ-MoE router: the experts and the MoE++ null ids."""
    return cfg.ff_n_experts + cfg.ff_n_null + cfg.ff_null_identity


def _ff_extra_params(cfg: ModelConfig) -> int:
    """Weights of the σ-MoE options every token multiplies by (shared experts, the conv router's
    taps); as multiply-adds per token too (a depthwise tap is one per channel)."""
    shared = 2 * cfg.d_model * cfg.ff_n_shared * (cfg.d_shared or cfg.d_expert)
    return shared + (cfg.d_model * cfg.router_kernel if cfg.router_type == 'conv' else 0)


def describe(cfg: ModelConfig) -> str:
    c = param_counts(cfg)
    f = flops_per_token(cfg)
    return (f"{cfg.model_type} d_model={cfg.d_model} n_layers={cfg.n_layers} vocab={cfg.vocab_size}: "
            f"total {c['total'] / 1e6:.2f}M, non-embedding {c['non_embedding'] / 1e6:.2f}M, "
            f"active per token {c['active_per_token'] / 1e6:.2f}M, "
            f"forward {f / 1e6:.1f} MFLOP/token at T={cfg.block_size}")


if __name__ == '__main__':
    # python model.py config/moeut_126m.py --vocab_size=8000  -> parameter counts of that config
    import sys
    from configurator import configure
    settings = {f.name: f.default for f in fields(ModelConfig)}
    configure(settings, sys.argv[1:], ignore_unknown_file_keys=True)
    try:
        cfg = ModelConfig.from_dict(settings)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(describe(cfg))

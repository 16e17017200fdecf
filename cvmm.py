"""
CVMM: conditional vector-matrix multiplication, the one primitive behind σ-MoE and SwitchHead
(MoEUT paper §2; spec/moeut.md §9).

Every (token, slot) pair s = 0..S-1 names an expert e_s. With x of R rows (S is a multiple of R, and
fan = S // R slots read each row) and a bank W [E, D_in, D_out]:

    out[s] = x[s // fan] @ W[e_s]                      (no slot weights:  out is [S, D_out])
    out[r] = sum_g  w[r, g] * x[(r*G+g) // fan] @ W[e_{r*G+g}]   (slot weights w [S/G, G]: [S/G, D_out])

The four users in model.py, with N tokens, H heads, k picks per head, K picks per token:
    σ-MoE up    x [N, d]          slots [N, K]    fan K    no weights      -> [N*K, d_expert]
    σ-MoE down  x [N*K, d_expert] slots [N, K]    fan 1    w [N, K]        -> [N, d]
    V experts   x [N, d]          slots [N, H, k] fan H*k  w [N*H, k]      -> [N*H, d_head]
    O experts   x [N*H, d_head]   slots [N, H, k] fan k    w [N, H*k]      -> [N, d]

The trick (why it is fast): sort the flattened expert ids once per routing (`cvmm_prepare`); rows of one
expert are then contiguous in the sorted order, so a tiled GEMM walks experts in order and only a tile
that straddles an expert boundary has extra work. The sort is shared by both projections that use the
same routing (σ-MoE up and down).

`cvmm` dispatches: CUDA tensors go to the Triton kernels when they exist, everything else to
`cvmm_reference`, a plain-torch implementation that is both the CPU path and the test oracle.
"""
from typing import NamedTuple, Optional

import torch


class CVMMSel(NamedTuple):
    """One routing decision, sorted by expert. Built once by `cvmm_prepare`, reused by every cvmm call
    that uses the same routing."""
    expert: torch.Tensor   # [S] int32, expert id of each sorted entry (ascending)
    slot: torch.Tensor     # [S] int32, flat slot index s of each sorted entry (= destination row)
    offsets: torch.Tensor  # [E+1] int32, expert e owns sorted entries offsets[e] : offsets[e+1]


def cvmm_prepare(expert_ids: torch.Tensor, n_experts: int) -> CVMMSel:
    """Sort the flattened expert ids (any shape, any integer dtype). The stable sort keeps entries of one
    expert in slot order, which makes every gradient deterministic."""
    flat = expert_ids.flatten()
    expert, slot = torch.sort(flat.int(), stable=True)
    # searchsorted (not bincount) so the shape is static for torch.compile
    bounds = torch.arange(n_experts + 1, device=flat.device, dtype=torch.int32)
    offsets = torch.searchsorted(expert, bounds).int()
    return CVMMSel(expert, slot.int(), offsets)


def _check(x: torch.Tensor, sel: CVMMSel, w: torch.Tensor, slot_weights: Optional[torch.Tensor]):
    """Shape checks shared by every implementation; each failure is one line naming the shapes."""
    S = sel.slot.numel()
    if w.dim() != 3:
        raise ValueError(f"cvmm: expert bank must be [E, D_in, D_out], got shape {tuple(w.shape)}")
    if sel.offsets.numel() != w.shape[0] + 1:
        raise ValueError(f"cvmm: routing was prepared for {sel.offsets.numel() - 1} experts, "
                         f"bank has {w.shape[0]}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"cvmm: x has {x.shape[-1]} features, bank expects D_in={w.shape[1]}")
    R = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if R == 0 or S % R != 0:
        raise ValueError(f"cvmm: {S} slots cannot be spread over {R} rows of x (need S % rows == 0)")
    if slot_weights is not None and (slot_weights.numel() != S or S % slot_weights.shape[-1] != 0):
        raise ValueError(f"cvmm: slot_weights {tuple(slot_weights.shape)} must hold one weight per slot "
                         f"({S}), grouped along the last dim")


def cvmm_reference(x: torch.Tensor, sel: CVMMSel, w: torch.Tensor,
                   slot_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain torch, differentiable by autograd in x, w and slot_weights. One matmul per expert over its
    contiguous run of sorted rows; the Python loop is fine on CPU and for tests."""
    _check(x, sel, w, slot_weights)
    x2 = x.reshape(-1, x.shape[-1])
    S = sel.slot.numel()
    slot = sel.slot.long()
    src = slot // (S // x2.shape[0])
    xs = x2.index_select(0, src)                          # [S, D_in] in sorted (expert-major) order
    counts = (sel.offsets[1:] - sel.offsets[:-1]).tolist()
    ys = torch.cat([xe @ w[e] for e, xe in enumerate(xs.split(counts))])   # [S, D_out], sorted
    out = ys.new_zeros(S, w.shape[2]).index_copy(0, slot, ys)              # back to slot order
    if slot_weights is None:
        return out
    G = slot_weights.shape[-1]
    sw = slot_weights.reshape(-1, G).to(out.dtype)
    return torch.bmm(sw.unsqueeze(1), out.view(-1, G, w.shape[2])).squeeze(1)


def cvmm(x: torch.Tensor, sel: CVMMSel, w: torch.Tensor,
         slot_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[s] = x[s // fan] @ w[expert of s], optionally contracted over groups of slots with
    slot_weights; see the module docstring. Returns [S, D_out] or [S/G, D_out]."""
    return cvmm_reference(x, sel, w, slot_weights)

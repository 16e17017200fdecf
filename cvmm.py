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

`cvmm_mlp(x, sel, w1, w2, slot_weights)` is the σ-MoE MLP (up, relu, down contracted with the slot
weights) as one op on the same kernels, with the relu and its gradient fused into GEMM epilogues. Its
hidden-sized tensors (h, its gradient, sw * h) never leave the op, so they are kept in expert-sorted row
order: each tile reads and writes them as contiguous rows instead of gathering and scattering.

The trick (why it is fast): sort the flattened expert ids once per routing (`cvmm_prepare`); rows of one
expert are then contiguous in the sorted order, so a tiled GEMM walks experts in order. The sort is
shared by both projections that use the same routing (σ-MoE up and down).

Dispatch (`cvmm`): CUDA tensors go to the Triton kernels below, CPU tensors to `cvmm_reference`, a
plain-torch implementation that is both the CPU path and the test oracle. Override with the env var
`CVMM_IMPL=triton|torch` (default `auto`), read at import into the module global `IMPL`, which tests may
also set directly; `triton` on CPU needs `TRITON_INTERPRET=1` set before triton is imported.

torch.compile: both paths are the custom op `nanomoeut::cvmm` (and `nanomoeut::cvmm_mlp`) (torch.library.custom_op + register_fake
+ register_autograd; backward op `nanomoeut::cvmm_bwd`), so `torch.compile(fullgraph=True)` sees one
opaque node per call. On CPU the op runs the reference (whose `.tolist()` would otherwise break the
graph) and plain-torch gradients (`_torch_bwd`). Eager calls skip the op's Python dispatch: CPU goes
straight to `cvmm_reference`, Triton through a torch.autograd.Function with the same forward/backward.

Determinism: every kernel is run-to-run bit-identical (no atomics; the weight gradient gives each
(expert, tile) to one program that loops over that expert's rows). The slot contractions (over G slots
in the forward, over `fan` slots in the x gradient) write a [S, D] intermediate in slot order and sum it
with torch (`CVMM_CONTRACT=sum`, default). `CVMM_CONTRACT=atomic` instead adds into an fp32 buffer from
the GEMM epilogue: not deterministic, and measured ~2x slower on H100 (bench.py --what=cvmm).

Tiles are picked by rule from static shapes (see `_gemm`, `_gradw`; measured with
bench.py --what=cvmm_tune), so nothing is autotuned again for a new row count. Plain tiles (weight
tiles, and rows of cvmm_mlp's expert-sorted hidden tensors) are loaded by TMA on Hopper where their
rows are 16-byte aligned (`CVMM_TMA=0` turns it off); gathered rows are loaded by pointer. A product with
K <= 128 runs in the small-K kernel, its slot-weight dot included (`CVMM_SMALLK_DOTS=0`: in the general one).
Bad expert ids: cvmm_prepare raises on CPU; on CUDA (and under compile) it uses torch._assert_async, and
the kernels never read out of bounds either way (ids outside [0, E) fall outside every expert's range).

Null experts (MoE++, arXiv 2410.07348): `cvmm(..., n_null=n)` / `cvmm_mlp(..., n_null=n)` take a routing
prepared for E + n ids with a bank of E experts. Ids E.. sort after the real ones, and the kernels walk
only offsets[0..E], so those slots cost nothing: their output rows are 0 and they get no gradient.
A contraction over slots reads only the real slots' product rows (`_contract` with `_real_slots`), so
the null rows are neither written nor read; in the other outputs that only real slots write, a small
kernel zeroes the null slots' rows (`_new_out`). Neither runs on the n_null=0 path.
"""
import os
import threading
from typing import NamedTuple, Optional

import torch

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # the torch path needs no triton
    triton = None

IMPL = os.environ.get("CVMM_IMPL", "auto")          # auto | triton | torch
CONTRACT = os.environ.get("CVMM_CONTRACT", "sum")   # sum (deterministic) | atomic
TMA = os.environ.get("CVMM_TMA", "1") == "1"         # plain tiles by TMA where allowed (see _w_desc)
SMALLK_DOTS = os.environ.get("CVMM_SMALLK_DOTS", "1") == "1"   # 0: the slot-weight dot in the general kernel
OVERLAP = os.environ.get("CVMM_OVERLAP", "1") == "1"   # 0: backward weight gradients on the main stream
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class CVMMSel(NamedTuple):
    """One routing decision, sorted by expert. Built once by `cvmm_prepare`, reused by every cvmm call
    that uses the same routing."""
    expert: torch.Tensor   # [S] int32, expert id of each sorted entry (ascending)
    slot: torch.Tensor     # [S] int32, flat slot index s of each sorted entry (= destination row)
    offsets: torch.Tensor  # [E+1] int32, expert e owns sorted entries offsets[e] : offsets[e+1]


def cvmm_prepare(expert_ids: torch.Tensor, n_experts: int) -> CVMMSel:
    """Sort the flattened expert ids (any shape, any integer dtype). The stable sort keeps entries of one
    expert in slot order, which makes every gradient deterministic.
    Ids outside [0, n_experts) raise on CPU (the sorted ends give min and max for free); on CUDA and
    under torch.compile they trigger torch._assert_async (a device-side assert, no host sync)."""
    if expert_ids.is_floating_point() or expert_ids.is_complex() or expert_ids.dtype == torch.bool:
        raise TypeError(f"cvmm_prepare: expert ids must be integers, got {expert_ids.dtype}")
    if expert_ids.numel() >= 2 ** 31:
        raise ValueError(f"cvmm_prepare: {expert_ids.numel()} slots; slots and offsets are int32 (< 2**31)")
    flat = expert_ids.flatten()
    if flat.is_cuda and n_experts < 2 ** 15 and flat.dtype != torch.int16:
        # a radix sort makes one pass per 8 bits of key: 16-bit keys take 2 passes where int64 ids (as
        # top-k returns them) take 8. Ids out of range become n_experts first, so the range check below
        # still sees them and nothing wraps into range.
        flat = torch.where((flat >= 0) & (flat < n_experts), flat, n_experts).to(torch.int16)
    # sorted in their own dtype, range-checked, then int32: casting first would wrap ids >= 2**32 into range
    expert, slot = torch.sort(flat, stable=True)
    if flat.numel():
        bad = (expert[0] < 0) | (expert[-1] >= n_experts)
        if flat.is_cuda or torch.compiler.is_compiling():
            torch._assert_async(~bad, f"cvmm_prepare: expert id out of range [0, {n_experts})")
        elif bad:
            raise ValueError(f"cvmm_prepare: expert ids must lie in [0, {n_experts}), got min "
                             f"{expert[0].item()} max {expert[-1].item()}")
    expert = expert.int()
    # searchsorted (not bincount) so the shape is static for torch.compile
    bounds = torch.arange(n_experts + 1, device=flat.device, dtype=torch.int32)
    offsets = torch.searchsorted(expert, bounds).int()
    return CVMMSel(expert, slot.int(), offsets)


def topk_ids(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ids of each row's k largest scores (last dim): the experts a token routes to, as
    scores.topk(k, dim=-1, sorted=False).indices. CUDA tensors go to a Triton kernel (torch.topk's radix
    select measured 3x slower at the σ-MoE routers' shapes and 19x at SwitchHead's, [N*H, E] with
    E ~ 10, on an H100); in a row, ids come in descending score, ties to the lower id, and NaN scores
    are never preferred (torch.topk prefers them). Elsewhere (and for float64 or past 4096 experts)
    torch.topk, whose order is unspecified."""
    E = scores.shape[-1] if scores.dim() else 0
    if not 0 < k <= E:
        raise ValueError(f"topk_ids: need 0 < k <= experts, got k={k} with scores of shape {tuple(scores.shape)}")
    if not _use_triton(scores) or E > 4096 or scores.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return scores.topk(k, dim=-1, sorted=False).indices
    if torch.compiler.is_compiling():
        return torch.ops.nanomoeut.topk_ids(scores, k)
    return _topk_impl(scores, k)


def _check(x: torch.Tensor, sel: CVMMSel, w: torch.Tensor, slot_weights: Optional[torch.Tensor],
           n_null: int = 0):
    """Shape checks shared by every implementation; each failure is one line naming the shapes."""
    S = sel.slot.numel()
    if w.dim() != 3:
        raise ValueError(f"cvmm: expert bank must be [E, D_in, D_out], got shape {tuple(w.shape)}")
    if sel.offsets.numel() != w.shape[0] + 1 + n_null:
        nulls = f" and {n_null} null ids" if n_null else ""
        raise ValueError(f"cvmm: routing was prepared for {sel.offsets.numel() - 1} experts, "
                         f"bank has {w.shape[0]}{nulls}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"cvmm: x must be [..., D_in] with D_in >= 1, got shape {tuple(x.shape)}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"cvmm: x has {x.shape[-1]} features, bank expects D_in={w.shape[1]}")
    R = x.numel() // x.shape[-1]
    if R == 0 or S == 0 or S % R != 0:
        raise ValueError(f"cvmm: {S} slots cannot be spread over {R} rows of x (need rows >= 1 and "
                         f"slots a positive multiple of rows)")
    if slot_weights is not None and (slot_weights.dim() == 0 or slot_weights.numel() != S
                                     or S % slot_weights.shape[-1] != 0):
        raise ValueError(f"cvmm: slot_weights {tuple(slot_weights.shape)} must hold one weight per slot "
                         f"({S}), grouped along the last dim")


def cvmm_reference(x: torch.Tensor, sel: CVMMSel, w: torch.Tensor,
                   slot_weights: Optional[torch.Tensor] = None, n_null: int = 0) -> torch.Tensor:
    """Plain torch, differentiable by autograd in x, w and slot_weights. One matmul per expert over its
    contiguous run of sorted rows; the Python loop is fine on CPU and for tests. Slots routed to the
    n_null ids past the bank are left out (rows of zeros)."""
    _check(x, sel, w, slot_weights, n_null)
    x2 = x.reshape(-1, x.shape[-1])
    S = sel.slot.numel()
    E = w.shape[0]
    counts = (sel.offsets[1:E + 1] - sel.offsets[:E]).tolist()
    slot = sel.slot.long()[:sum(counts)] if n_null else sel.slot.long()
    src = slot // (S // x2.shape[0])
    xs = x2.index_select(0, src)                          # [S, D_in] in sorted (expert-major) order
    ys = torch.cat([xe @ w[e] for e, xe in enumerate(xs.split(counts))])   # [S, D_out], sorted
    out = ys.new_zeros(S, w.shape[2]).index_copy(0, slot, ys)              # back to slot order
    if slot_weights is None:
        return out
    G = slot_weights.shape[-1]   # contracted in (at least) fp32, as the Triton path scales its fp32 accumulator
    acc = torch.promote_types(out.dtype, torch.float32)
    sw = slot_weights.reshape(-1, G).to(acc)
    with torch.autocast(out.device.type, enabled=False):     # autocast would run the bmm in bf16/fp16
        y = torch.bmm(sw.unsqueeze(1), out.view(-1, G, w.shape[2]).to(acc)).squeeze(1)
    return y.to(out.dtype)


# ----------------------------------------------------------------------------------------------------
# Triton kernels (spec §9). Both walk the expert-sorted order given by sel.slot / sel.offsets.

if triton is not None:
    @triton.jit
    def _row_tile(off_ptr, pid_m, E, BLOCK_E: tl.constexpr, BM: tl.constexpr):
        """(expert e, its sorted rows, end of its rows) for row tile pid_m. Tiles never straddle experts:
        expert e owns ceil(count_e / BM) tiles, laid out expert after expert; the program finds its
        expert from a cumsum over the E+1 offsets. e >= E past the last tile (the grid is an upper
        bound, so it needs no host sync): the caller returns at once."""
        eids = tl.arange(0, BLOCK_E)
        lo = tl.load(off_ptr + eids, mask=eids < E, other=0)
        hi = tl.load(off_ptr + eids + 1, mask=eids < E, other=0)
        n_tiles = (hi - lo + BM - 1) // BM
        cum = tl.cumsum(n_tiles, 0)                              # inclusive: tiles of experts <= e
        e = tl.sum((cum <= pid_m).to(tl.int32), 0)
        first_tile = tl.sum(tl.where(eids == e, cum - n_tiles, 0), 0)
        start = tl.load(off_ptr + e, mask=e < E, other=0)
        end = tl.load(off_ptr + e + 1, mask=e < E, other=0)
        return e, start + (pid_m - first_tile) * BM + tl.arange(0, BM), end

    @triton.jit
    def _w_tile(w_desc, e, k0, n0, K, N, TRANS_W: tl.constexpr):
        """The [BK, BN] weight tile at (k0, n0) of expert e, loaded by TMA from the bank [E, D_in, D_out]
        viewed as [E*D_in, D_out]: rows k of W[e] (K = D_in, a multiple of BK, see _w_desc), or rows n
        when the bank is used transposed (the x gradient: N = D_in, tile [BN, BK] transposed). There,
        rows past the expert's N belong to the next expert and land in masked-off output columns;
        TMA zero-fills past the bank's end."""
        if TRANS_W:
            return tl.trans(w_desc.load([e * N + n0, k0]))
        else:
            return w_desc.load([e * K + k0, n0])

    @triton.jit
    def _cvmm_gemm_kernel(a_ptr, w_ptr, out_ptr, slot_ptr, off_ptr, scale_ptr, x2_ptr, dots_ptr,
                          E, K, N, S, A_DIV, OUT_DIV, X2_DIV,
                          stride_a, stride_we, stride_wk, stride_wn, stride_out, stride_x2,
                          HAS_SCALE: tl.constexpr, HAS_DOTS: tl.constexpr, ATOMIC: tl.constexpr,
                          EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_E: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          RELU: tl.constexpr = False, RELU_MASK: tl.constexpr = False,
                          HS_OUT: tl.constexpr = False, hs_ptr=None, stride_hs=0,
                          A_SORTED: tl.constexpr = False, HID_SORTED: tl.constexpr = False,
                          w_desc=None, W_TMA: tl.constexpr = False, TRANS_W: tl.constexpr = False):
        """out[slot_i] = scale[slot_i] * (A[slot_i // A_DIV] @ W[e_i])   for sorted entries i.

        Forward (A = x, A_DIV = fan, W as is) and x gradient (A = grad, A_DIV = G or 1, W transposed by
        strides). Tiles never straddle experts (_row_tile), so each program does one plain GEMM tile
        with one weight matrix (the official kernel loops over every expert inside a shared tile,
        which wastes work when experts have few rows, e.g. at decode). Rows are gathered from A and
        scattered to out by slot, in fp32 accumulation.
        HAS_DOTS (slot-weight gradient): dots[pid_n, slot_i] = <acc_i, X2[slot_i // X2_DIV]> over this
        N tile, summed over tiles by the caller (deterministic, no atomics).
        Fused epilogues of the σ-MoE MLP (`cvmm_mlp`): RELU applies relu to the output (up-projection);
        with HAS_DOTS, RELU_MASK zeroes the gradient where X2 (= the relu output h) is 0, and HS_OUT also
        writes hs[slot_i] = scale * X2 row, so the weight gradient can run unscaled (scaling a tile in
        registers inside its loop measured 1.6x slower). A_SORTED: A's rows are in sorted order (row i,
        not slot_i // A_DIV); HID_SORTED: so are out, X2 and hs (cvmm_mlp's hidden tensors)."""
        pid = tl.program_id(0)
        n_tiles_n = tl.cdiv(N, BN)
        pid_m = pid // n_tiles_n          # N fastest: the programs sharing an A tile run together (L2)
        pid_n = pid % n_tiles_n
        e, rows, end = _row_tile(off_ptr, pid_m, E, BLOCK_E, BM)
        if e >= E:
            return
        rmask = rows < end
        slot = tl.load(slot_ptr + rows, mask=rmask, other=0).to(tl.int64)   # masked rows read row 0
        srow = tl.where(rmask, rows, 0).to(tl.int64)     # the sorted position, for sorted operands
        hrow = srow if HID_SORTED else slot              # row of out / X2 / hs
        offs_n = pid_n * BN + tl.arange(0, BN)
        nmask = offs_n < N
        omask = rmask[:, None] & nmask[None, :]
        offs_k = tl.arange(0, BK)
        a_ptrs = a_ptr + (srow if A_SORTED else slot // A_DIV)[:, None] * stride_a + offs_k[None, :]
        # the epilogue's operands do not depend on the product: load them (and write hs) before the
        # main loop, so their latency hides behind it
        if HAS_SCALE:
            sc = tl.load(scale_ptr + slot, mask=rmask, other=0.0).to(tl.float32)
        if HAS_DOTS:
            x2 = tl.load(x2_ptr + (hrow if HID_SORTED else slot // X2_DIV)[:, None] * stride_x2
                         + offs_n[None, :], mask=nmask[None, :], other=0.0)
            if HS_OUT:
                tl.store(hs_ptr + hrow[:, None] * stride_hs + offs_n[None, :],
                         (x2.to(tl.float32) * sc[:, None]).to(hs_ptr.dtype.element_ty), mask=omask)
        w_ptrs = (w_ptr + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk
                  + offs_n[None, :] * stride_wn)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kmask = offs_k < K - k0
            a = tl.load(a_ptrs) if EVEN_K else tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            if W_TMA:
                b = _w_tile(w_desc, e, k0, pid_n * BN, K, N, TRANS_W)
            elif EVEN_K:
                b = tl.load(w_ptrs, mask=nmask[None, :], other=0.0)
            else:
                b = tl.load(w_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
            if DOT_F32:  # bf16 under TRITON_INTERPRET (its bf16 tl.dot is broken)
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BK
            w_ptrs += BK * stride_wk
        if HAS_DOTS:
            # columns past N are zero in x2 but, with a transposed TMA weight tile, hold the next
            # expert's products: mask them so its overflow cannot reach this dot (0 * inf)
            tl.store(dots_ptr + pid_n * S + slot,
                     tl.sum(tl.where(nmask[None, :], acc, 0.0) * x2.to(tl.float32), 1), mask=rmask)
            if RELU_MASK:
                acc = tl.where(x2 > 0, acc, 0.0)
        if HAS_SCALE:
            acc = acc * sc[:, None]
        if RELU:
            acc = tl.maximum(acc, 0.0)
        if ATOMIC:
            tl.atomic_add(out_ptr + (slot // OUT_DIV)[:, None] * stride_out + offs_n[None, :], acc,
                          mask=omask, sem="relaxed")
        else:
            tl.store(out_ptr + hrow[:, None] * stride_out + offs_n[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def _cvmm_smallk_kernel(a_ptr, w_ptr, out_ptr, slot_ptr, off_ptr, scale_ptr,
                            E, K, N, A_DIV, stride_a, stride_we, stride_wk, stride_wn, stride_out,
                            HAS_SCALE: tl.constexpr, STAGES: tl.constexpr, DOT_F32: tl.constexpr,
                            PRECISION: tl.constexpr, BLOCK_E: tl.constexpr, BM: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr, A_SORTED: tl.constexpr = False,
                            w_desc=None, W_TMA: tl.constexpr = False, TRANS_W: tl.constexpr = False,
                            HAS_DOTS: tl.constexpr = False, x2_ptr=None, dots_ptr=None, X2_DIV=1,
                            stride_x2=0):
        """The same product as _cvmm_gemm_kernel for K <= BK (the σ-MoE down-projection, d_expert 128;
        SwitchHead O, d_head): one program per row tile loads its A tile once and loops over all of N.
        With K this small a tile is two MMA steps and the kernel is bound by writing its [S, N] output;
        looping over N lets the pipeline prefetch the next weight tile while this one is stored
        (measured 1.3x faster than a program per (row tile, N tile) on an H100). A_SORTED as there.
        HAS_DOTS: dots[slot_i] = <unscaled row i, X2[slot_i // X2_DIV]>, summed over N in registers
        (SwitchHead V's x gradient with its slot-weight gradient)."""
        e, rows, end = _row_tile(off_ptr, tl.program_id(0), E, BLOCK_E, BM)
        if e >= E:
            return
        rmask = rows < end
        slot = tl.load(slot_ptr + rows, mask=rmask, other=0).to(tl.int64)
        offs_k = tl.arange(0, BK)
        kmask = offs_k < K
        arow = tl.where(rmask, rows, 0).to(tl.int64) if A_SORTED else slot // A_DIV
        a = tl.load(a_ptr + arow[:, None] * stride_a + offs_k[None, :], mask=kmask[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
        if HAS_SCALE:
            sc = tl.load(scale_ptr + slot, mask=rmask, other=0.0).to(tl.float32)
        w_base = w_ptr + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk
        o_base = out_ptr + slot[:, None] * stride_out
        if HAS_DOTS:
            x2_base = x2_ptr + (slot // X2_DIV)[:, None] * stride_x2
            dot = tl.zeros((BM,), dtype=tl.float32)
        for n0 in tl.range(0, N, BN, num_stages=STAGES):
            offs_n = n0 + tl.arange(0, BN)
            nmask = offs_n < N
            if W_TMA:
                b = _w_tile(w_desc, e, 0, n0, K, N, TRANS_W)
            else:
                b = tl.load(w_base + offs_n[None, :] * stride_wn, mask=kmask[:, None] & nmask[None, :],
                            other=0.0)
            if DOT_F32:
                b = b.to(tl.float32)
            acc = tl.dot(a, b, input_precision=PRECISION)
            if HAS_DOTS:   # past N: x2 is 0, and acc masked (a transposed TMA tile holds the next expert)
                x2 = tl.load(x2_base + offs_n[None, :], mask=nmask[None, :], other=0.0)
                dot += tl.sum(tl.where(nmask[None, :], acc, 0.0) * x2.to(tl.float32), 1)
            if HAS_SCALE:
                acc = acc * sc[:, None]
            tl.store(o_base + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=rmask[:, None] & nmask[None, :])
        if HAS_DOTS:
            tl.store(dots_ptr + slot, dot, mask=rmask)

    @triton.jit
    def _cvmm_gradw_kernel(x_ptr, g_ptr, gw_ptr, slot_ptr, off_ptr, scale_ptr,
                           K, N, X_DIV, G_DIV, stride_x, stride_g, stride_gs, stride_ge, stride_gk,
                           HAS_SCALE: tl.constexpr, SCALE_X: tl.constexpr, DOT_F32: tl.constexpr,
                           PRECISION: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                           X_SORTED: tl.constexpr = False, G_SORTED: tl.constexpr = False,
                           x_desc=None, g_desc=None, X_TMA: tl.constexpr = False, G_TMA: tl.constexpr = False):
        """gw[e] = sum over sorted rows i of expert e:  x[slot_i // X_DIV]^T scale[slot_i] g[slot_i // G_DIV].

        One program per (expert, BK x BN tile of gw[e]) loops over that expert's contiguous rows
        offsets[e]:offsets[e+1] in chunks of BR, accumulating in fp32 registers. Every output element
        is written by exactly one program in a fixed summation order: deterministic, no atomics and no
        zero-init (experts without rows get zeros). Grid: (tiles of gw[e], E, splits), expert slower
        than tile so the programs reading the same gathered rows run together. With few experts
        (SwitchHead: heads x experts banks of thousands of rows each) the third axis splits each
        expert's rows into contiguous parts, each written to its own fp32 slice of gw (stride_gs),
        which the caller sums in a fixed order: still deterministic. X_SORTED / G_SORTED: that operand's rows
        are in sorted order (row i instead of slot_i // DIV; cvmm_mlp's hidden tensors). X_TMA / G_TMA:
        that sorted operand's row chunks come by TMA; rows past the expert's end then hold the next
        expert's values, which meet the other operand's zero-masked rows (a non-finite value there
        would reach this expert's gradient as NaN, but it already makes the next expert's gradient,
        hence the step, non-finite)."""
        pid = tl.program_id(0)
        e = tl.program_id(1)
        n_tiles_n = tl.cdiv(N, BN)
        offs_k = (pid // n_tiles_n) * BK + tl.arange(0, BK)
        offs_n = (pid % n_tiles_n) * BN + tl.arange(0, BN)
        kmask = offs_k < K
        nmask = offs_n < N
        start = tl.load(off_ptr + e)
        end = tl.load(off_ptr + e + 1)
        # split s of the expert's rows (a third grid axis; the caller sums the splits' fp32 partials)
        chunk = tl.cdiv(tl.cdiv(end - start, tl.num_programs(2)), BR) * BR
        start = tl.minimum(start + tl.program_id(2) * chunk, end)
        end = tl.minimum(start + chunk, end)
        acc = tl.zeros((BK, BN), dtype=tl.float32)
        # the row gathers depend on the slot ids: load the next chunk's ids one iteration ahead, so
        # the gathers do not wait on a dependent load (measured 1.25x faster on an H100)
        nxt = tl.load(slot_ptr + start + tl.arange(0, BR), mask=start + tl.arange(0, BR) < end, other=0)
        for r0 in range(start, end, BR):
            rows = r0 + tl.arange(0, BR)
            rmask = rows < end
            slot = nxt.to(tl.int64)
            nxt = tl.load(slot_ptr + rows + BR, mask=rows + BR < end, other=0)
            if X_TMA:
                xa = x_desc.load([r0, (pid // n_tiles_n) * BK])
            else:
                xa = tl.load(x_ptr + (rows.to(tl.int64) if X_SORTED else slot // X_DIV)[:, None] * stride_x
                             + offs_k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            if G_TMA:
                g = g_desc.load([r0, (pid % n_tiles_n) * BN])
            else:
                g = tl.load(g_ptr + (rows.to(tl.int64) if G_SORTED else slot // G_DIV)[:, None] * stride_g
                            + offs_n[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
            if HAS_SCALE:  # the slot weight, on whichever operand is cheaper to touch
                s = tl.load(scale_ptr + slot, mask=rmask, other=0.0).to(tl.float32)
                if SCALE_X:
                    xa = (xa.to(tl.float32) * s[:, None]).to(xa.dtype)
                else:
                    g = (g.to(tl.float32) * s[:, None]).to(g.dtype)
            if DOT_F32:
                xa = xa.to(tl.float32)
                g = g.to(tl.float32)
            acc = tl.dot(tl.trans(xa), g, acc, input_precision=PRECISION)
        tl.store(gw_ptr + tl.program_id(2).to(tl.int64) * stride_gs + e.to(tl.int64) * stride_ge
                 + offs_k[:, None] * stride_gk + offs_n[None, :],
                 acc.to(gw_ptr.dtype.element_ty), mask=kmask[:, None] & nmask[None, :])

    @triton.jit
    def _topk_kernel(x_ptr, out_ptr, R, E, stride_x, K: tl.constexpr, BR: tl.constexpr, BE: tl.constexpr):
        """BR rows per program, each whole in registers: K rounds of (row max, the lowest not-yet-taken
        column holding it). A NaN counts as -inf; a row of -inf (all experts dropped) still yields K
        distinct valid ids."""
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = tl.arange(0, BE)
        rmask = rows < R
        free = rmask[:, None] & (cols < E)[None, :]
        v = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=free,
                    other=float("-inf")).to(tl.float32)
        v = tl.where(v != v, float("-inf"), v)
        for j in tl.static_range(K):
            cand = tl.where(free, v, float("-inf"))
            m = tl.max(cand, 1)
            idx = tl.min(tl.where(free & (cand == m[:, None]), cols[None, :], BE), 1)
            idx = tl.where(idx < BE, idx, tl.min(tl.where(free, cols[None, :], BE), 1))
            tl.store(out_ptr + rows.to(tl.int64) * K + j, idx.to(tl.int64), mask=rmask)
            free = free & (cols[None, :] != idx[:, None])


    @triton.jit
    def _zero_null_rows_kernel(out_ptr, slot_ptr, off_ptr, E, S, N, stride_out, SORTED: tl.constexpr,
                               BR: tl.constexpr, BN: tl.constexpr):
        """Zeroes the rows of out that null slots own: sorted entries offsets[E]:S (row slot_i, or row i
        where out is in sorted order). Programs wholly before the first null entry return at once."""
        first = tl.load(off_ptr + E)
        if tl.program_id(0) * BR + BR <= first:
            return
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        rmask = (rows >= first) & (rows < S)
        dst = rows.to(tl.int64) if SORTED else tl.load(slot_ptr + rows, mask=rmask, other=0).to(tl.int64)
        for n0 in range(0, N, BN):
            offs_n = n0 + tl.arange(0, BN)
            tl.store(out_ptr + dst[:, None] * stride_out + offs_n[None, :],
                     tl.zeros((BR, BN), dtype=out_ptr.dtype.element_ty), mask=rmask[:, None] & (offs_n < N)[None, :])


    @triton.jit
    def _contract_real_kernel(p_ptr, real_ptr, out_ptr, R, N, stride_p, stride_out, G: tl.constexpr,
                              BR: tl.constexpr, BN: tl.constexpr):
        """out[r] = sum over g of p[r*G + g] for the slots real[r*G + g] != 0 only, in fp32, g in order.
        The null slots' rows are never read (masked loads fetch nothing), nor need they be written."""
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        rmask, cmask = rows < R, cols < N
        acc = tl.zeros((BR, BN), dtype=tl.float32)
        for g in tl.static_range(G):
            s = rows.to(tl.int64) * G + g
            keep = tl.load(real_ptr + s, mask=rmask, other=0) != 0
            acc += tl.load(p_ptr + s[:, None] * stride_p + cols[None, :], mask=keep[:, None] & cmask[None, :],
                           other=0.0).to(tl.float32)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _topk_impl(scores, k):
    E = scores.shape[-1]
    x = scores.reshape(-1, E)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape[0], k, device=x.device, dtype=torch.int64)
    BE = max(16, _np2(E))
    # one warp per program, over 256 scores of 16 rows (E 10) up to one row of 512 (E 387): for 32768
    # rows the σ-MoE's top-12 of 254 took 0.071 ms, against 0.133 with 4 warps over 4 rows, and top-16
    # of 387 0.227 against 0.288 (H100, 2026-12-07)
    BR = max(1, min(32, 256 // BE))
    if x.shape[0]:
        _topk_kernel[(triton.cdiv(x.shape[0], BR),)](x, out, x.shape[0], E, x.stride(0), K=k, BR=BR, BE=BE,
                                                     num_warps=max(1, min(8, BR * BE // 1024)))
    return out.view(*scores.shape[:-1], k)


@torch.library.custom_op("nanomoeut::topk_ids", mutates_args=())
def _topk_op(scores: torch.Tensor, k: int) -> torch.Tensor:
    return _topk_impl(scores, k)


@_topk_op.register_fake
def _(scores, k):
    return scores.new_empty(*scores.shape[:-1], k, dtype=torch.int64)


def _w_desc(w, transpose, K, BK, BN):
    """A TMA descriptor for a bank's [BK, BN] weight tiles (see _w_tile), or None where TMA cannot take
    it (off: CVMM_TMA=0; GPUs before Hopper; rows not 16-byte aligned), and the kernels load by pointer.
    Nor where a K tile would reach into the next expert's rows (K % BK != 0): those rows would meet
    zero A columns, and 0 * inf would let one expert's overflow poison another's output.
    Measured on an H100: the small-K kernel 6% faster."""
    E, D_in, D_out = w.shape
    if not w.is_contiguous() or (not transpose and K % BK):
        return None
    return _rows_desc(w.view(E * D_in, D_out), [BN, BK] if transpose else [BK, BN])


_BOUND = threading.local()   # .devices: the CUDA devices whose context this thread has bound


def _rows_desc(t, block):
    """TMA descriptor of a contiguous 2-D tensor, or None (see _w_desc)."""
    if not (TMA and t.is_contiguous() and (t.shape[1] * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0):
        return None
    if t.is_cuda:
        if torch.version.hip or torch.cuda.get_device_capability(t.device)[0] < 9:
            return None
        # Triton encodes a host descriptor (driver API) before its launcher makes the CUDA context
        # current. On a thread that has not used CUDA yet, for a kernel that another thread loaded (the
        # autograd engine's thread, after a no-grad forward), that failed with "invalid device
        # context". A runtime call binds the device's primary context to this thread first: a stream
        # query, once per thread and device, but not on a stream being captured into a CUDA graph (the
        # capturing thread is bound already; a graph captured from another thread than the one
        # launching here is not covered).
        bound = _BOUND.__dict__.setdefault("devices", set())
        if t.device not in bound:
            with torch.cuda.device(t.device):
                if not torch.cuda.is_current_stream_capturing():
                    torch.cuda.current_stream().query()
                    bound.add(t.device)
    return TensorDescriptor.from_tensor(t, block)


def _np2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _precision(dtype, dot_f32):
    if dtype == torch.float32:
        return "tf32" if torch.get_float32_matmul_precision() != "highest" else "ieee"
    return "ieee" if dot_f32 else "tf32"  # ignored for 16-bit operands


def _contract(out, group, real=None):
    """The deterministic slot contraction of a [S, N] product (a Triton gather-sum kernel and writing
    the product in expert-sorted order measured no faster than this torch sum at DRAM bandwidth).
    real: with null ids, which slots are real ([S] bool); the product's null rows were never written
    and are never read, so the null picks save this DRAM-bound pass's bytes too (MoEUT-126M with 24.7%
    null picks: 1.02x the tokens/s of the model without null ids, against 0.996x before; H100,
    2026-12-07, docs/options.md)."""
    S, N = out.shape
    if group == 1:
        return out
    if real is None:
        return out.view(S // group, group, N).sum(1)
    y = torch.empty(S // group, N, device=out.device, dtype=out.dtype)
    BR, BN = 32, min(128, _np2(N))
    if S:
        _contract_real_kernel[(triton.cdiv(S // group, BR), triton.cdiv(N, BN))](
            out, real, y, S // group, N, out.stride(0), y.stride(0), G=group, BR=BR, BN=BN)
    return y


def _real_slots(slot, offsets, w):
    """[S] bool in slot order: True where the slot's id is a real expert of the bank w (its sorted entry
    is before offsets[E]). No host sync: the flags are scattered through the sorted order."""
    S = slot.numel()
    first_null = offsets[w.shape[0]]
    flags = torch.arange(S, device=slot.device, dtype=offsets.dtype) < first_null
    return torch.empty(S, device=slot.device, dtype=torch.bool).index_put_((slot.long(),), flags)


def _product_out(S, N, like, slot, offsets, w, group, sorted_rows=False):
    """(the [S, N] buffer a product kernel writes, the real-slot flags for its contraction or None).
    With null ids and a contraction (group > 1), the null slots' rows are left unwritten and never read
    (`_contract` sums the real slots only); otherwise they are zeros, not garbage (`_new_out`: h and
    grad_pre, in sorted order, are read past an expert's end by TMA)."""
    if group > 1 and _n_null(offsets, w):
        return torch.empty(S, N, device=like.device, dtype=like.dtype), _real_slots(slot, offsets, w)
    return _new_out(S, N, like, slot, offsets, w, sorted_rows=sorted_rows), None


def _new_out(rows, N, like, slot, offsets, w, sorted_rows=False):
    """torch.empty(rows, N) for a kernel that writes the rows of real experts' slots only. With null ids
    (offsets past the bank w's E experts) the null slots' rows are zeroed first, and only they. Zeroing
    the whole [S, N] product instead writes as many bytes as the product kernel itself: with it,
    MoEUT-126M with 102 null ids trained at 0.96x the speed of the model without (H200, 2026-12-06);
    zeroing only the null rows, 1.01x (H100, 2026-12-07; docs/options.md)."""
    out = torch.empty(rows, N, device=like.device, dtype=like.dtype)
    S = slot.numel()
    if _n_null(offsets, w) and S:
        BR = 64
        _zero_null_rows_kernel[(triton.cdiv(S, BR),)](out, slot, offsets, w.shape[0], S, N, out.stride(0),
                                                      SORTED=sorted_rows, BR=BR, BN=min(128, _np2(N)))
    return out


def _row_block(S, E):
    """BM, the rows of a tile: follows the mean rows per expert (small at decode, where a big tile would
    be mostly padding), between 16 and 128."""
    return min(128, max(16, _np2(S // E)))


def _gemm_smallk(a, a_div, w, transpose, slot, offsets, scale, group, K, N, swk, swn, cfg=None, a_sorted=False,
                 x2=None, x2_div=1):
    """Launch _cvmm_smallk_kernel for _gemm (K <= 128): (out [S // group, N], dots [S] fp32 or None). BM by
    _row_block; BN 64 (32 in fp32, whose tiles are twice the bytes), 4 warps, 4 stages: best of the
    tiles tried at the MoEUT-126M and -244M shapes (bench.py --what=cvmm_tune)."""
    S, E = slot.numel(), w.shape[0]
    f32 = a.dtype == torch.float32
    dot_f32 = _INTERPRET and a.dtype == torch.bfloat16
    c = dict(BM=_row_block(S, E), BN=32 if f32 else 64, warps=4, stages=3 if f32 else 4)
    c.update(cfg or {})
    out, real = _product_out(S, N, a, slot, offsets, w, group)
    BK = max(16, _np2(K))
    desc = _w_desc(w, transpose, K, BK, c["BN"])
    dots = None
    if x2 is not None:   # null slots' dots are never written
        dots = (torch.zeros if _n_null(offsets, w) else torch.empty)(S, device=a.device, dtype=torch.float32)
    _cvmm_smallk_kernel[(min(S, triton.cdiv(S, c["BM"]) + E),)](
        a, w, out, slot, offsets, scale if scale is not None else a, E, K, N, a_div, a.stride(0),
        w.stride(0), swk, swn, out.stride(0), HAS_SCALE=scale is not None, STAGES=c["stages"],
        DOT_F32=dot_f32, PRECISION=_precision(a.dtype, dot_f32), BLOCK_E=max(16, _np2(E)), BM=c["BM"],
        BN=c["BN"], BK=BK, num_warps=c["warps"], A_SORTED=a_sorted, w_desc=desc, W_TMA=desc is not None,
        TRANS_W=transpose, HAS_DOTS=x2 is not None, x2_ptr=x2, dots_ptr=dots, X2_DIV=x2_div,
        stride_x2=x2.stride(0) if x2 is not None else 0)
    return _contract(out, group, real), dots


def _gemm(a, a_div, w, transpose, slot, offsets, scale, group, x2=None, x2_div=1, cfg=None, relu=False,
          relu_mask=False, hs=None, a_sorted=False, hid_sorted=False):
    """Launch _cvmm_gemm_kernel; returns (out [S // group, N], dots [S] fp32 or None).
    Tiles are picked by rule from static shapes (no autotune, so nothing re-runs for a new row count):
    BM by _row_block, BN shrinks when there would be too few programs to fill the GPU. A plain product
    with K <= 128 goes to _cvmm_smallk_kernel. relu / relu_mask / hs: the fused epilogues (see the
    kernel)."""
    assert x2 is not None or (hs is None and not relu_mask), "hs / relu_mask act on the X2 epilogue"
    assert not hid_sorted or ((relu or x2 is not None) and group == 1), "sorted out: cvmm_mlp's h, grad_pre"
    S, E = slot.numel(), w.shape[0]
    K, N = (w.shape[2], w.shape[1]) if transpose else (w.shape[1], w.shape[2])
    swk, swn = (w.stride(2), w.stride(1)) if transpose else (w.stride(1), w.stride(2))
    atomic = group > 1 and CONTRACT == "atomic"
    # the plain dot epilogue (no relu mask, hs or sorted hidden rows: cvmm_mlp's grad_pre keeps the general
    # kernel) runs in the small-K kernel too: SwitchHead V's x gradient with its slot-weight dot (K = d_head)
    # took 0.73 ms there and 0.53 in the small-K kernel at the MoEUT-126M shapes (H100, 2026-12-07;
    # docs/results.md), its outputs bit-identical and the dots equal to fp32 rounding
    if K <= 128 and not relu and not atomic and (x2 is None or (SMALLK_DOTS and not relu_mask and hs is None
                                                                and not hid_sorted)):
        return _gemm_smallk(a, a_div, w, transpose, slot, offsets, scale, group, K, N, swk, swn, cfg,
                            a_sorted, x2, x2_div)
    f32 = a.dtype == torch.float32
    dot_f32 = _INTERPRET and a.dtype == torch.bfloat16
    BM = _row_block(S, E)
    BK = min(32 if f32 else 64, max(16, _np2(K)))
    BN = min(128, max(16, _np2(N)))
    warps, stages = (8 if BM * BN >= 128 * 128 else 4), 3
    if x2 is not None and BM == 128:   # the slot-weight dot epilogue: 4 warps, as measured fastest:
        # cvmm_mlp's grad_pre (+ relu mask, hs) on 128-row tiles in 16-bit (measured in bf16; fp32
        # tiles are twice the registers), the plain dot on 64-row tiles
        BM, warps, stages = (128, 4, 3) if relu_mask and not f32 else (64, 4, 4)
    if cfg:  # explicit tiles (bench.py --what=cvmm_tune)
        BM, BN, BK, warps, stages = (cfg.get(k, v) for k, v in
                                     dict(BM=BM, BN=BN, BK=BK, warps=warps, stages=stages).items())
    m_tiles = min(S, triton.cdiv(S, BM) + E)       # upper bound on the real number of tiles
    while not cfg and BN > 32 and m_tiles * triton.cdiv(N, BN) < 264:   # ~2 programs per H100 SM
        BN //= 2
    n_tiles = triton.cdiv(N, BN)
    if atomic:
        out, real = torch.zeros(S // group, N, device=a.device, dtype=torch.float32), None
    else:
        out, real = _product_out(S, N, a, slot, offsets, w, group, sorted_rows=hid_sorted)
    new = torch.zeros if _n_null(offsets, w) else torch.empty   # null slots' dots are never written
    dots = new(n_tiles, S, device=a.device, dtype=torch.float32) if x2 is not None else None
    desc = _w_desc(w, transpose, K, BK, BN)
    _cvmm_gemm_kernel[(m_tiles * n_tiles,)](
        a, w, out, slot, offsets, scale if scale is not None else a, x2 if x2 is not None else a,
        dots if dots is not None else out, E, K, N, S, a_div, group, x2_div,
        a.stride(0), w.stride(0), swk, swn, out.stride(0), x2.stride(0) if x2 is not None else 0,
        HAS_SCALE=scale is not None, HAS_DOTS=x2 is not None, ATOMIC=atomic, EVEN_K=K % BK == 0,
        DOT_F32=dot_f32, PRECISION=_precision(a.dtype, dot_f32), BLOCK_E=max(16, _np2(E)),
        BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages, RELU=relu, RELU_MASK=relu_mask,
        HS_OUT=hs is not None, hs_ptr=hs, stride_hs=hs.stride(0) if hs is not None else 0,
        A_SORTED=a_sorted, HID_SORTED=hid_sorted, w_desc=desc, W_TMA=desc is not None, TRANS_W=transpose)
    out = out.to(a.dtype) if atomic else _contract(out, group, real)
    return out, (dots.sum(0) if dots is not None else None)


def _gradw(x, x_div, g, g_div, scale, slot, offsets, w, cfg=None, gw=None, x_sorted=False, g_sorted=False):
    E, K, N = w.shape
    f32 = x.dtype == torch.float32
    dot_f32 = _INTERPRET and x.dtype == torch.bfloat16
    BK, BN = min(128, max(16, _np2(K))), min(128, max(16, _np2(N)))
    BR = 32 if f32 else 64
    scale_x = scale is not None and K < N   # scale the narrower operand (σ-MoE down: h, not grad_out)
    if scale_x and not f32:
        BN = min(256, max(16, _np2(N)))
    elif not f32 and _deep_k(E, K, N, BN, _sm_count(x.device), x.device):
        BK = 256
    warps, stages = (8 if BK * BN >= 128 * 128 else 4), 3
    if cfg:
        BK, BN, BR, warps, stages, scale_x = (cfg.get(k, v) for k, v in dict(
            BK=BK, BN=BN, BR=BR, warps=warps, stages=stages, scale_x=scale_x).items())
    if E > 65535:   # the grid's second axis
        raise ValueError(f"cvmm: the Triton weight gradient takes at most 65535 experts, got {E}")
    tiles = triton.cdiv(K, BK) * triton.cdiv(N, BN)
    split = (cfg or {}).get("split") or _row_splits(tiles * E, slot.numel() // E, _sm_count(x.device))
    if split > 1:   # fp32 partials, one slice per part of the rows
        out = torch.empty(split, E, K, N, device=x.device, dtype=torch.float32)
    else:
        out = gw = torch.empty(E, K, N, device=x.device, dtype=w.dtype) if gw is None else gw
    grid = (tiles, E, split)
    # TMA for the sorted operand only when the other one is gathered (its masked rows zero the extras)
    xd = _rows_desc(x, [BR, BK]) if x_sorted and not g_sorted and x.shape[1] == K else None
    gd = _rows_desc(g, [BR, BN]) if g_sorted and not x_sorted and g.shape[1] == N else None
    _cvmm_gradw_kernel[grid](
        x, g, out, slot, offsets, scale if scale is not None else x, K, N, x_div, g_div,
        x.stride(0), g.stride(0), out.stride(0) if split > 1 else 0, out.stride(-3), out.stride(-2),
        HAS_SCALE=scale is not None, SCALE_X=scale_x, DOT_F32=dot_f32,
        PRECISION=_precision(x.dtype, dot_f32), BK=BK, BN=BN, BR=BR, num_warps=warps, num_stages=stages,
        X_SORTED=x_sorted, G_SORTED=g_sorted, x_desc=xd, g_desc=gd, X_TMA=xd is not None, G_TMA=gd is not None)
    if split > 1:   # the splits' partials, summed in a fixed order
        total = out.sum(0)
        gw = total.to(w.dtype) if gw is None else gw.copy_(total)
    return gw


_SMS = {}


def _sm_count(device):
    """Streaming multiprocessors of a CUDA device (0 elsewhere: no row splits)."""
    if device.type != "cuda":
        return 0
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def _deep_k(E, K, N, BN, sms, device=None):
    """Whether _gradw's tiles take 256 of K (d_model) instead of 128: where the (expert, tile) programs
    of 128-deep tiles overflow one wave of `sms` and those of 256-deep tiles fit in one. SwitchHead V's
    weight gradient at MoEUT-126M (40 experts, 768 x 96): 240 programs of 128 x 128 took 0.448 ms, 120 of
    256 x 128 0.320 ms (H100, 2026-12-08, bench.py --what=cvmm_tune --tune_only=sh_grad_w); at 244M (160
    programs of 256, more than a wave) it did not pay. Hopper only: the tiles' 3 stages take 144 KB of
    shared memory."""
    if K <= 128 or not sms or (device is not None and torch.cuda.get_device_capability(device)[0] < 9):
        return False
    n = triton.cdiv(N, BN) * E
    return n * triton.cdiv(K, 128) > sms >= n * triton.cdiv(K, 256)


def _row_splits(programs, rows_per_expert, sms):
    """Into how many parts (1-4) _gradw splits each expert's rows. Its tiles use most of an SM's
    registers, so the (expert, tile) programs run in waves of about `sms`; a last wave left mostly
    empty is what splitting fills. Only where the waves would be under 85% full (SwitchHead's O bank
    at 44M and 244M; never the σ-MoE banks, whose hundreds of experts fill them) and each part keeps
    >= 512 rows: the parts' fp32 partials cost traffic, and splitting a well-filled grid measured up
    to 2x slower."""
    def filled(s):
        return programs * s / (-(-programs * s // sms) * sms)
    if not sms or filled(1) >= 0.85:
        return 1
    return max((s for s in range(1, 5) if s == 1 or rows_per_expert // s >= 512), key=lambda s: (filled(s), -s))


# ----------------------------------------------------------------------------------------------------
# The custom ops. Inputs are already checked, cast and contiguous: x [R, D_in], slot [S], offsets [E+1],
# w [E, D_in, D_out], sw [S/G, G] or None.

def _use_triton(t: torch.Tensor) -> bool:
    return triton is not None and (IMPL == "triton" or (IMPL == "auto" and t.is_cuda))


def _sel(slot, offsets):
    return CVMMSel(torch.empty(0, dtype=torch.int32, device=slot.device), slot, offsets)


def _n_null(offsets, w):
    """Null ids past the bank's experts (see the module docstring): the offsets say so by their length."""
    return offsets.numel() - 1 - w.shape[0]


def _fwd_impl(x, slot, offsets, w, sw):
    with torch.autocast(x.device.type, enabled=False):
        if not _use_triton(x):
            return cvmm_reference(x, _sel(slot, offsets), w, sw, _n_null(offsets, w))
        fan = slot.numel() // x.shape[0]
        return _gemm(x, fan, w, False, slot, offsets, sw, 1 if sw is None else sw.shape[1])[0]


@torch.library.custom_op("nanomoeut::cvmm", mutates_args=())
def _cvmm_op(x: torch.Tensor, slot: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor,
             sw: Optional[torch.Tensor]) -> torch.Tensor:
    return _fwd_impl(x, slot, offsets, w, sw)


@_cvmm_op.register_fake
def _(x, slot, offsets, w, sw):
    return x.new_empty(slot.shape[0] // (1 if sw is None else sw.shape[1]), w.shape[2])


_SIDE = {}


def _side_stream(x):
    """A second CUDA stream per device for the backward ops: a weight gradient (latency-bound: cvmm_mlp's
    grad_W2, SwitchHead's grad_W) runs on it beside grad_x and its DRAM-bound contraction. None on CPU,
    or when OVERLAP (env CVMM_OVERLAP=0) is off. Outputs are bit-identical either way."""
    if not (OVERLAP and x.is_cuda):
        return None
    if x.device not in _SIDE:
        _SIDE[x.device] = torch.cuda.Stream(x.device)
    return _SIDE[x.device]


def _torch_bwd(grad, x, slot, offsets, w, sw):
    """Plain-torch gradients, the op's CPU path (used under torch.compile): the kernels' formulas with
    one matmul per expert over its sorted rows. Returns (grad_x, grad_w, grad_sw or None)."""
    S, slot = slot.numel(), slot.long()
    fan, G = S // x.shape[0], (1 if sw is None else sw.shape[1])
    E = w.shape[0]
    counts = (offsets[1:E + 1] - offsets[:E]).tolist()
    slot = slot[:sum(counts)]              # null slots (ids past the bank) get no gradient
    src = slot // fan
    xs = x.index_select(0, src)                               # [S, D_in], sorted
    gu = grad.index_select(0, slot // G)                      # [S, D_out], sorted, not yet scaled
    gxs = torch.cat([ge @ w[e].T for e, ge in enumerate(gu.split(counts))])   # d out_s / d (x W_e)
    if sw is not None:
        scale = sw.flatten()[slot].to(gu.dtype)[:, None]
        gsw = torch.zeros_like(sw).view(-1).index_copy_(0, slot, (gxs * xs).sum(1).to(sw.dtype))
        gu, gxs = gu * scale, gxs * scale
    gx = torch.zeros_like(x).index_add_(0, src, gxs)
    gw = torch.stack([xe.T @ ge for xe, ge in zip(xs.split(counts), gu.split(counts))])
    return gx, gw, (gsw.view_as(sw) if sw is not None else None)


def _bwd_impl(grad, x, slot, offsets, w, sw, need_x, need_w, need_sw):
    """(grad_x, grad_w, grad_sw); the ones not needed come back as empty tensors."""
    with torch.autocast(x.device.type, enabled=False):
        gx = gw = gsw = None
        if not _use_triton(x):
            gx, gw, gsw = _torch_bwd(grad, x, slot, offsets, w, sw)
        else:
            S = slot.numel()
            fan, G = S // x.shape[0], (1 if sw is None else sw.shape[1])
            # with slot weights, the slot-weight gradient's kernel also writes hs = sw * x rows, so the
            # weight gradient runs unscaled; only where x has one row per slot (fan 1, as the σ-MoE
            # down-projection), since otherwise hs is fan times the size of x (SwitchHead V: H*k)
            hs = x.new_empty(S, x.shape[1]) if need_w and need_sw and fan == 1 else None
            # without hs the weight gradient reads only the inputs: run it beside grad_x (see OVERLAP).
            # SwitchHead's V backward 0.967 -> 0.844 ms, O's 0.564 -> 0.513 at the MoEUT-126M shapes, the
            # compiled step 126.8 -> 122.3 ms (medians of five interleaved repeats; H100, 2026-12-07)
            side = _side_stream(x) if need_w and hs is None and (need_x or need_sw) else None
            if side is not None:
                gw = torch.empty_like(w)
                side.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(side):
                    _gradw(x, fan, grad, G, sw, slot, offsets, w, gw=gw)
            if need_x or need_sw:   # grad_x[r] = sum over its fan slots of (sw * grad) @ W^T
                gx, gsw = _gemm(grad, G, w, True, slot, offsets, sw, fan, x if need_sw else None, fan, hs=hs)
            if side is not None:   # join before any tensor the side stream reads can be freed
                torch.cuda.current_stream(x.device).wait_stream(side)
            elif need_w:
                gw = (_gradw(hs, 1, grad, G, None, slot, offsets, w) if hs is not None
                      else _gradw(x, fan, grad, G, sw, slot, offsets, w))
            if gsw is not None:
                gsw = gsw.view_as(sw).to(sw.dtype)
        e = x.new_empty   # a fresh empty tensor per unused output: custom-op outputs may not alias
        return (gx if need_x else e(0), gw if need_w else e(0), gsw if need_sw else e(0))


@torch.library.custom_op("nanomoeut::cvmm_bwd", mutates_args=())
def _cvmm_bwd_op(grad: torch.Tensor, x: torch.Tensor, slot: torch.Tensor, offsets: torch.Tensor,
                 w: torch.Tensor, sw: Optional[torch.Tensor], need_x: bool, need_w: bool,
                 need_sw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(grad, x, slot, offsets, w, sw, need_x, need_w, need_sw)


@_cvmm_bwd_op.register_fake
def _(grad, x, slot, offsets, w, sw, need_x, need_w, need_sw):
    e = x.new_empty
    return (torch.empty_like(x) if need_x else e(0), torch.empty_like(w) if need_w else e(0),
            torch.empty_like(sw) if need_sw else e(0))


def _setup_context(ctx, inputs, output):
    x, slot, offsets, w, sw = inputs
    ctx.save_for_backward(x, slot, offsets, w, sw)


def _backward(ctx, grad, bwd=lambda *a: torch.ops.nanomoeut.cvmm_bwd(*a)):
    x, slot, offsets, w, sw = ctx.saved_tensors
    nx, _, _, nw, nsw = ctx.needs_input_grad
    nsw = nsw and sw is not None
    gx, gw, gsw = bwd(grad.contiguous(), x, slot, offsets, w, sw, nx, nw, nsw)
    return gx if nx else None, None, None, gw if nw else None, gsw if nsw else None


_cvmm_op.register_autograd(_backward, setup_context=_setup_context)


class _CVMMFunction(torch.autograd.Function):
    """The same forward/backward for eager mode: the custom op's Python dispatch costs tens of us per
    call, which dominates at decode. torch.compile uses the custom op instead."""
    @staticmethod
    def forward(ctx, x, slot, offsets, w, sw):
        _setup_context(ctx, (x, slot, offsets, w, sw), None)
        return _fwd_impl(x, slot, offsets, w, sw)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad, _bwd_impl)


def _checked_inputs(name, x, sel, banks: dict, slot_weights):
    """The checks and casts cvmm and cvmm_mlp share, after their shape checks: one device, routing from
    cvmm_prepare, float slot weights; x and the banks in the autocast dtype (the matmuls run in it),
    then of one dtype, which the Triton path must support. Returns (x, [banks])."""
    ts = [x, *banks.values(), sel.slot, sel.offsets] + ([slot_weights] if slot_weights is not None else [])
    if any(t.device != x.device for t in ts):
        raise ValueError(f"{name}: all tensors must be on one device, got "
                         f"{sorted({str(t.device) for t in ts})}")
    if sel.slot.dtype != torch.int32 or sel.offsets.dtype != torch.int32:
        raise TypeError(f"{name}: sel must come from cvmm_prepare (int32 slot and offsets)")
    if slot_weights is not None and not slot_weights.is_floating_point():
        raise TypeError(f"{name}: slot_weights must be floating point, got {slot_weights.dtype}")
    if not all(t.is_floating_point() for t in [x, *banks.values()]):
        raise TypeError(f"{name}: x and {' and '.join(banks)} must be floating point, got "
                        f"{' and '.join(str(t.dtype) for t in [x, *banks.values()])}")
    ws = list(banks.values())
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, ws = x.to(dt), [w.to(dt) for w in ws]
    if any(w.dtype != x.dtype for w in ws):
        raise TypeError(f"{name}: x and {' and '.join(banks)} must have one dtype, got "
                        f"{' and '.join(str(t.dtype) for t in [x, *ws])}")
    if _use_triton(x) and x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: the Triton path takes float32/bfloat16/float16, got {x.dtype}")
    return x, ws


def _pad(t: torch.Tensor, pads: list) -> torch.Tensor:
    """t with zeros appended to its last dims (pads: trailing-dim counts, last dim first, as F.pad)."""
    return torch.nn.functional.pad(t, [v for p in pads for v in (0, p)]) if any(pads) else t


def _pad_width(n: int, slots: int, experts: int) -> int:
    """How many zero columns make a width of n a multiple of 16 elements. The kernels take row strides
    as arguments, and Triton specialises an integer argument only when it divides by 16: at any other
    stride the compiler cannot prove the rows aligned (nor can TMA take them). At MoEUT-44M (d_model
    412, d_head 82) the kernels were 4-9x slower for it. Padding the operands with zeros is exact (the
    extra products are 0) but copies the whole bank, so it is done only where experts get several rows
    each (training, prefill), not at decode, which reads just the picked experts' weights."""
    return -n % 16 if slots >= 4 * experts else 0


def cvmm(x: torch.Tensor, sel: CVMMSel, w: torch.Tensor,
         slot_weights: Optional[torch.Tensor] = None, n_null: int = 0) -> torch.Tensor:
    """out[s] = x[s // fan] @ w[expert of s], optionally contracted over groups of slots with
    slot_weights; see the module docstring. Returns [S, D_out] or [S/G, D_out].
    Under autocast x and w run in the autocast dtype (fp32 accumulation always); slot_weights keep
    their dtype (they scale the fp32 accumulator). n_null: sel was prepared for E + n_null ids; slots
    of the ids past the bank are null (zero rows, no compute)."""
    _check(x, sel, w, slot_weights, n_null)
    x, (w,) = _checked_inputs("cvmm", x, sel, {"w": w}, slot_weights)
    if not _use_triton(x) and not torch.compiler.is_compiling():
        return cvmm_reference(x, sel, w, slot_weights, n_null)
    if slot_weights is not None:
        slot_weights = slot_weights.reshape(-1, slot_weights.shape[-1]).contiguous()
    D_out = w.shape[2]
    if _use_triton(x):   # widths to multiples of 16 (see _pad_width); autograd slices the gradients
        p_in, p_out = (_pad_width(n, sel.slot.numel(), w.shape[0]) for n in (w.shape[1], D_out))
        x, w = _pad(x, [p_in]), _pad(w, [p_out, p_in])
    args = (x.reshape(-1, x.shape[-1]).contiguous(), sel.slot.contiguous(), sel.offsets.contiguous(),
            w.contiguous(), slot_weights)
    if torch.compiler.is_compiling():
        y = torch.ops.nanomoeut.cvmm(*args)
    elif not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in args):
        y = _fwd_impl(*args)
    else:
        y = _CVMMFunction.apply(*args)
    return y if y.shape[1] == D_out else y[:, :D_out].contiguous()


# ----------------------------------------------------------------------------------------------------
# The σ-MoE MLP as one op (paper eq. 5-6 with the sigmoid scores as slot weights):
#     y[n] = sum_k  sw[n, k] * relu(x[n] @ W1[e_nk]) @ W2[e_nk]
# Same kernels as two cvmm calls, but the relu is fused into the up-projection's epilogue, its
# gradient mask into the down-projection's grad-h epilogue (which already reads h), and nothing else
# touches the [N*K, d_expert] hidden tensor. Saves one elementwise pass forward and one backward.

def _mlp_fwd_impl(x, slot, offsets, w1, w2, sw):
    """(y, h) with h = relu(x W1) [S, d_expert] in expert-sorted row order (row i is slot slot[i]),
    kept for the backward. The torch path sorts its h too, so either backward can take either
    forward's h."""
    with torch.autocast(x.device.type, enabled=False):
        if not _use_triton(x):
            sel, n = _sel(slot, offsets), _n_null(offsets, w1)
            h = torch.relu(cvmm_reference(x, sel, w1, n_null=n))
            return cvmm_reference(h, sel, w2, sw, n), h.index_select(0, slot.long())
        fan = slot.numel() // x.shape[0]
        h = _gemm(x, fan, w1, False, slot, offsets, None, 1, relu=True, hid_sorted=True)[0]
        return _gemm(h, 1, w2, False, slot, offsets, sw, sw.shape[1], a_sorted=True)[0], h


@torch.library.custom_op("nanomoeut::cvmm_mlp", mutates_args=())
def _mlp_op(x: torch.Tensor, slot: torch.Tensor, offsets: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
            sw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _mlp_fwd_impl(x, slot, offsets, w1, w2, sw)


@_mlp_op.register_fake
def _(x, slot, offsets, w1, w2, sw):
    return x.new_empty(slot.shape[0] // sw.shape[1], w2.shape[2]), x.new_empty(slot.shape[0], w1.shape[2])


def _mlp_bwd_impl(grad, x, slot, offsets, w1, w2, sw, h, need_x, need_w1, need_w2, need_sw):
    """(grad_x, grad_w1, grad_w2, grad_sw); the ones not needed come back as empty tensors."""
    with torch.autocast(x.device.type, enabled=False):
        fan, G = slot.numel() // x.shape[0], sw.shape[1]
        if not _use_triton(x):
            h = torch.empty_like(h).index_copy_(0, slot.long(), h)   # back to slot order
            gh, gw2, gsw = _torch_bwd(grad, h, slot, offsets, w2, sw)
            gx, gw1, _ = _torch_bwd(gh * (h > 0), x, slot, offsets, w1, None)
        else:
            # hs rows of null slots are never written, but grad_W2 reads the rows after the last real
            # expert's by TMA (against zero-masked rows of grad): they must be finite, hence zeros
            hs = _new_out(*h.shape, h, slot, offsets, w1, sorted_rows=True) if need_w2 else None
            # grad wrt the up-projection's pre-activation (relu mask fused), grad_sw, and hs = sw * h
            gpre, gsw = _gemm(grad, G, w2, True, slot, offsets, sw, 1, h, 1, relu_mask=True, hs=hs,
                              hid_sorted=True)
            # grad_W2 is independent of the rest: run it beside them (see OVERLAP), into a tensor
            # allocated on this stream
            side = _side_stream(x) if need_w2 and (need_x or need_w1) else None
            gw2 = torch.empty_like(w2) if need_w2 else None
            if side is not None:
                side.wait_stream(torch.cuda.current_stream(x.device))
            if need_w2:
                with torch.cuda.stream(side):   # None: the current stream
                    _gradw(hs, 1, grad, G, None, slot, offsets, w2, gw=gw2, x_sorted=True)
            gx = _gemm(gpre, 1, w1, True, slot, offsets, None, fan, a_sorted=True)[0] if need_x else None
            gw1 = _gradw(x, fan, gpre, 1, None, slot, offsets, w1, g_sorted=True) if need_w1 else None
            if side is not None:   # join before any tensor the side stream reads can be freed
                torch.cuda.current_stream(x.device).wait_stream(side)
        e = x.new_empty   # fresh per unused output (no aliasing between custom-op outputs)
        return (gx if need_x else e(0), gw1 if need_w1 else e(0), gw2 if need_w2 else e(0),
                gsw.view_as(sw).to(sw.dtype) if need_sw else e(0))


@torch.library.custom_op("nanomoeut::cvmm_mlp_bwd", mutates_args=())
def _mlp_bwd_op(grad: torch.Tensor, x: torch.Tensor, slot: torch.Tensor, offsets: torch.Tensor,
                w1: torch.Tensor, w2: torch.Tensor, sw: torch.Tensor, h: torch.Tensor, need_x: bool,
                need_w1: bool, need_w2: bool, need_sw: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _mlp_bwd_impl(grad, x, slot, offsets, w1, w2, sw, h, need_x, need_w1, need_w2, need_sw)


@_mlp_bwd_op.register_fake
def _(grad, x, slot, offsets, w1, w2, sw, h, need_x, need_w1, need_w2, need_sw):
    e = x.new_empty
    return (torch.empty_like(x) if need_x else e(0), torch.empty_like(w1) if need_w1 else e(0),
            torch.empty_like(w2) if need_w2 else e(0), torch.empty_like(sw) if need_sw else e(0))


def _mlp_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])


def _mlp_backward(ctx, grad, _grad_h=None, bwd=lambda *a: torch.ops.nanomoeut.cvmm_mlp_bwd(*a)):
    """h is internal (cvmm_mlp returns y only), so its incoming gradient is always None or zero."""
    x, slot, offsets, w1, w2, sw, h = ctx.saved_tensors
    nx, _, _, nw1, nw2, nsw = ctx.needs_input_grad
    gx, gw1, gw2, gsw = bwd(grad.contiguous(), x, slot, offsets, w1, w2, sw, h, nx, nw1, nw2, nsw)
    return gx if nx else None, None, None, gw1 if nw1 else None, gw2 if nw2 else None, gsw if nsw else None


_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup_context)


class _MLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, slot, offsets, w1, w2, sw):
        y, h = _mlp_fwd_impl(x, slot, offsets, w1, w2, sw)
        _mlp_setup_context(ctx, (x, slot, offsets, w1, w2, sw), (y, h))
        return y

    @staticmethod
    def backward(ctx, grad):
        return _mlp_backward(ctx, grad, None, _mlp_bwd_impl)


def cvmm_mlp(x: torch.Tensor, sel: CVMMSel, w1: torch.Tensor, w2: torch.Tensor,
             slot_weights: torch.Tensor, n_null: int = 0) -> torch.Tensor:
    """The σ-MoE MLP: cvmm(relu(cvmm(x, sel, w1)), sel, w2, slot_weights) in one op, [N, D_out].
    x [..., D_in] (N rows), w1 [E, D_in, d_expert], w2 [E, d_expert, D_out], slot_weights [N, K].
    n_null: null ids past the bank, as in cvmm."""
    if slot_weights is None:
        raise TypeError("cvmm_mlp: slot_weights (the [rows, K] expert scores) are required")
    if w1.dim() != 3 or w2.dim() != 3 or w1.shape[0] != w2.shape[0] or w1.shape[2] != w2.shape[1]:
        raise ValueError(f"cvmm_mlp: banks must be [E, D_in, d_expert] and [E, d_expert, D_out], got "
                         f"{tuple(w1.shape)} and {tuple(w2.shape)}")
    _check(x, sel, w1, slot_weights, n_null)
    R, S = x.numel() // x.shape[-1], sel.slot.numel()
    if slot_weights.numel() != S or slot_weights.shape[-1] != S // R:
        raise ValueError(f"cvmm_mlp: slot_weights {tuple(slot_weights.shape)} must be [rows, K] = "
                         f"[{R}, {S // R}]")
    x, (w1, w2) = _checked_inputs("cvmm_mlp", x, sel, {"w1": w1, "w2": w2}, slot_weights)
    if not _use_triton(x) and not torch.compiler.is_compiling():
        return cvmm(torch.relu(cvmm(x, sel, w1, n_null=n_null)), sel, w2, slot_weights, n_null)   # the reference
    D_out = w2.shape[2]
    if _use_triton(x):   # widths to multiples of 16 (see _pad_width); the padded hidden units stay 0
        p_in, p_hid, p_out = (_pad_width(n, S, w1.shape[0]) for n in (w1.shape[1], w1.shape[2], D_out))
        x, w1, w2 = _pad(x, [p_in]), _pad(w1, [p_hid, p_in]), _pad(w2, [p_out, p_hid])
    args = (x.reshape(-1, x.shape[-1]).contiguous(), sel.slot.contiguous(), sel.offsets.contiguous(),
            w1.contiguous(), w2.contiguous(), slot_weights.reshape(R, -1).contiguous())
    if torch.compiler.is_compiling():
        y = torch.ops.nanomoeut.cvmm_mlp(*args)[0]
    elif not torch.is_grad_enabled() or not any(t.requires_grad for t in args):
        y = _mlp_fwd_impl(*args)[0]
    else:
        y = _MLPFunction.apply(*args)
    return y if y.shape[1] == D_out else y[:, :D_out].contiguous()

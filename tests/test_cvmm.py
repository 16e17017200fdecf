"""CVMM tests: the torch reference against a naive loop and gradcheck, the Triton kernels against the
reference (on CPU through TRITON_INTERPRET=1, set by conftest.py; on CUDA for real), determinism,
errors, autocast and torch.compile."""
import os
import subprocess
import sys
import threading

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # so plain `pytest` works too
import cvmm as C  # noqa: E402
from cvmm import cvmm, cvmm_mlp, cvmm_prepare, cvmm_reference, topk_ids  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.fixture
def impl():
    """Set cvmm.IMPL for one test, restore afterwards."""
    old = C.IMPL
    yield lambda v: setattr(C, "IMPL", v)
    C.IMPL = old


def usage(name, N=7, d=24, E=5, K=3, de=16, H=2, k=2, dtype=torch.float32, device="cpu", ids=None):
    """Inputs of one of the four users in the cvmm docstring: (x, expert ids, bank, slot weights)."""
    g = torch.Generator().manual_seed(len(name) * 7 + N)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    if name in ("up", "down"):
        ids = torch.randint(0, E, (N, K), generator=g) if ids is None else ids
        sw = torch.rand(N, K, generator=g).to(device, dtype)
        if name == "up":
            return r(N, d), ids.to(device), r(E, d, de) / d ** 0.5, None
        return r(N * K, de), ids.to(device), r(E, de, d) / de ** 0.5, sw
    # SwitchHead: head h picks among its own E experts h*E .. h*E+E-1
    ids = torch.randint(0, E, (N, H, k), generator=g) + torch.arange(H)[:, None] * E if ids is None else ids
    if name == "V":
        return r(N, d), ids.to(device), r(H * E, d, de) / d ** 0.5, torch.rand(N * H, k, generator=g).to(device, dtype)
    return r(N * H, de), ids.to(device), r(H * E, de, d) / de ** 0.5, torch.rand(N, H * k, generator=g).to(device, dtype)


def naive(x, ids, w, sw):
    """The definition, one row at a time."""
    x2, ids = x.reshape(-1, x.shape[-1]), ids.flatten()
    S = ids.numel()
    fan = S // x2.shape[0]
    out = torch.stack([x2[s // fan] @ w[ids[s]] for s in range(S)])
    if sw is None:
        return out
    G = sw.shape[-1]
    sw = sw.reshape(-1, G)
    return torch.stack([sum(sw[r, g] * out[r * G + g] for g in range(G)) for r in range(S // G)])


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", ["up", "down", "V", "O"])
def test_reference_matches_naive_loop(name):
    x, ids, w, sw = usage(name)
    out = cvmm_reference(x, cvmm_prepare(ids, w.shape[0]), w, sw)
    assert out.shape == naive(x, ids, w, sw).shape
    assert rel(out, naive(x, ids, w, sw)) < 1e-6


@pytest.mark.parametrize("name", ["down", "O"])
def test_reference_gradcheck(name):
    x, ids, w, sw = usage(name, N=3, d=5, de=4, E=3, dtype=torch.float64)
    sel = cvmm_prepare(ids, w.shape[0])
    f = lambda x, w, sw: cvmm_reference(x, sel, w, sw)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), w.requires_grad_(), sw.requires_grad_()))


def test_prepare_keeps_slot_order_within_an_expert():
    """The sort is stable: the entries of one expert stay in slot order (what makes the weight gradient's
    row loop, and so every gradient, run-to-run deterministic, and h's row order in cvmm_mlp defined)."""
    ids = torch.randint(0, 5, (1000,), generator=torch.Generator().manual_seed(0))
    sel = cvmm_prepare(ids, 5)
    key = sel.expert.long() * ids.numel() + sel.slot.long()   # sorted by (expert, slot), strictly
    assert (key[1:] > key[:-1]).all()
    assert torch.equal(ids[sel.slot.long()], sel.expert.long())


@pytest.mark.parametrize("mode", ["fp16", "autocast_bf16"])
def test_reference_contracts_slot_weights_in_fp32(impl, mode):
    """The reference scales the per-slot products by fp32 slot weights (an fp32 contraction, as the Triton
    path scales its fp32 accumulator): weights 1 + 2**-11 / 1 + 2**-9 are not rounded to the 16-bit dtype of
    x and w, in fp16 and under CPU autocast bf16 (whose bmm would run in bf16) alike."""
    impl("torch")
    N, K, E, de, d = 64, 4, 5, 16, 64
    dt = torch.float16 if mode == "fp16" else torch.bfloat16
    x, ids, w, _ = usage("down", N=N, K=K, E=E, de=de, d=d, dtype=dt)
    sw = torch.full((N, K), 1 + (2 ** -11 if mode == "fp16" else 2 ** -9))   # exact in fp32, not in dt
    sel = cvmm_prepare(ids, E)
    want = (sw.double()[..., None] * cvmm(x, sel, w).double().view(N, K, d)).sum(1)   # the 16-bit products
    if mode == "fp16":
        out = cvmm(x, sel, w, sw)
        assert (out != want.to(dt)).float().mean() < 0.02   # (rounded once, but for the last fp32 bits)
    else:
        with torch.autocast("cpu", dtype=dt):
            out = cvmm(x, sel, w, sw)
        plain = cvmm(x, sel, w, sw)
        assert out.dtype == dt and torch.equal(out, plain)
        assert (out != want.to(dt)).float().mean() < 0.02   # weights rounded to bf16 would miss ~30%
        exact = torch.stack([sum(sw[n, k].double() * x[n * K + k].double() @ w[ids[n, k]].double()
                                 for k in range(K)) for n in range(N)])
        assert rel(out, exact) < 1e-2 and rel(plain, exact) < 1e-2


# ---- router top-k (topk_ids) ---------------------------------------------------------------------

@pytest.mark.parametrize("shape,k", [((37, 254), 12), ((9, 4, 10), 2), ((5, 7), 7), ((3, 1), 1), ((0, 6), 2),
                                     ((70, 33), 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_topk_ids_matches_torch_topk(impl, shape, k, dtype):
    """The Triton top-k picks the same experts as torch.topk (as sets: torch's order is unspecified;
    where fp16 scores tie, the same scores), k distinct ones in descending score, on 2-D and 3-D
    scores, k = E, one expert, no rows, and a transposed view."""
    g = torch.Generator().manual_seed(shape[0] * 100 + k)
    scores = torch.rand(*shape, generator=g).to(dtype)
    want = scores.float().topk(k, dim=-1, sorted=False).indices
    impl("triton")
    for s in (scores, scores.transpose(0, -1).contiguous().transpose(0, -1)):   # also a non-contiguous view
        got = topk_ids(s.to(DEV), k).cpu()
        assert got.dtype == torch.int64 and got.shape == want.shape
        picked = scores.float().gather(-1, got)
        assert torch.equal(picked.sort(-1).values, scores.float().gather(-1, want).sort(-1).values)
        if dtype == torch.float32:   # no ties
            assert torch.equal(got.sort(-1).values, want.sort(-1).values)
        assert (got.sort(-1).values.diff(dim=-1) > 0).all()      # distinct
        assert (picked[..., :-1] >= picked[..., 1:]).all()         # descending


def test_topk_ids_ties_nan_and_dropped_rows(impl):
    """Ties go to the lower id; NaN scores are never preferred; a row whose scores are all -inf (every
    expert dropped) still gets k distinct ids in range, so the routing never reads out of bounds."""
    impl("triton")
    s = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.9],
                      [float("nan"), 0.2, 0.3, float("nan"), 0.1],
                      [float("-inf")] * 5,
                      [float("nan")] * 5])
    got = topk_ids(s.to(DEV), 3).cpu()
    assert got[0].tolist() == [1, 2, 4]
    assert got[1].tolist() == [2, 1, 4]
    for row in got[2:]:
        assert sorted(row.tolist()) == [0, 1, 2]


def test_topk_ids_errors_and_cpu_path(impl):
    impl("torch")
    s = torch.rand(4, 6)
    assert torch.equal(topk_ids(s, 2), s.topk(2, dim=-1, sorted=False).indices)
    for k in (0, 7):
        with pytest.raises(ValueError, match=f"need 0 < k <= experts, got k={k} with scores of shape"):
            topk_ids(s, k)


def run(x, ids, w, sw, E=None):
    """Forward + backward with a fixed random output gradient: [out, grad_x, grad_w, (grad_sw)]."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    sw = sw.detach().requires_grad_() if sw is not None else None
    out = cvmm(x, cvmm_prepare(ids, E or w.shape[0]), w, sw)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    return [out] + list(torch.autograd.grad(out, [x, w] + ([sw] if sw is not None else []), go))


def grads_for(f, args, go, need=None):
    """f(*args) and the gradients, for the output gradient go, of the args flagged in need (default
    all); the others are constants."""
    need = need or [True] * len(args)
    ps = [t.detach().requires_grad_(n) for t, n in zip(args, need)]
    y = f(*ps)
    return [y] + list(torch.autograd.grad(y, [p for p, n in zip(ps, need) if n], go))


def compare(impl, args, dtype, device=DEV):
    """Triton in `dtype` vs the fp32 reference on the same (rounded) inputs."""
    x, ids, w, sw = args
    impl("torch")
    want = run(x.cpu().float(), ids.cpu(), w.cpu().float(), sw.cpu().float() if sw is not None else None)
    impl("triton")
    got = run(x.to(device, dtype), ids.to(device), w.to(device, dtype), sw.to(device) if sw is not None else None)
    tol = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    assert got[0].dtype == dtype and got[2].dtype == dtype and got[0].is_contiguous()
    for name, a, b in zip(["out", "grad_x", "grad_w", "grad_sw"], got, want):
        assert a.shape == b.shape, name
        assert rel(a.cpu(), b) < tol, (name, rel(a.cpu(), b))


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
CASES = {  # awkward shapes: (usage, kwargs)
    "up": ("up", {}),
    "down": ("down", {}),
    "V": ("V", {}),
    "O": ("O", {}),
    "ragged_rows": ("down", dict(N=37, d=40, de=24, E=4)),          # no tile multiple anywhere
    "zero_row_experts": ("down", dict(N=9, E=16, ids=torch.randint(0, 3, (9, 3)) * 5)),
    "one_expert": ("down", dict(N=20, E=1)),
    "K1": ("down", dict(N=11, K=1)),
    "many_experts": ("up", dict(N=50, E=300, K=2, d=32, de=16)),   # 300 experts, few rows each
    "many_experts_w": ("down", dict(N=50, E=300, K=2, d=32, de=16)),
    "one_row": ("down", dict(N=1)),
    "one_row_up": ("up", dict(N=1)),
    "big_tiles": ("down", dict(N=300, K=4, E=3, d=72, de=40)),      # BM 128, several tiles per expert
    "E17": ("down", dict(N=40, K=2, E=17, ids=torch.arange(80).reshape(40, 2) % 17)),  # 2**4 + 1, all used:
    # the last expert's rows lie past a power-of-two block of experts
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(impl, case, dtype):
    name, kw = CASES[case]
    compare(impl, usage(name, **kw), dtype)


@pytest.mark.parametrize("case", ["down", "O"])
def test_triton_atomic_contraction(impl, case, monkeypatch):
    """CVMM_CONTRACT=atomic (fp32 atomics into the output instead of the product and a sum): the same
    results as the reference, to fp32 rounding (its summation order is not fixed)."""
    monkeypatch.setattr(C, "CONTRACT", "atomic")
    name, kw = CASES[case]
    compare(impl, usage(name, **kw), torch.float32)


def test_slot_weight_dot_in_either_kernel(impl, monkeypatch):
    """SwitchHead V's x gradient computes its slot-weight dot in the small-K kernel (K = d_head <= 128);
    CVMM_SMALLK_DOTS=0 puts it back in the general kernel's epilogue. Both match the reference, and each
    other: grad_x and grad_w exactly, the dots to fp32 rounding (summed over N in another order)."""
    args = usage("V")
    compare(impl, args, torch.float32)
    x, ids, w, sw = (t.to(DEV) for t in args)
    got = {}
    for flag in (True, False):
        monkeypatch.setattr(C, "SMALLK_DOTS", flag)
        got[flag] = run(x, ids, w, sw)
    compare(impl, args, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(got[True][:3], got[False][:3]))
    assert rel(got[True][3], got[False][3]) < 1e-6


@pytest.mark.parametrize("case", ["up", "down", "V", "O", "ragged_rows", "big_tiles"])
def test_triton_pointer_weight_loads(impl, case, monkeypatch):
    """The kernels' pointer path for weight tiles (TMA off, as on GPUs before Hopper)."""
    monkeypatch.setattr(C, "TMA", False)
    name, kw = CASES[case]
    compare(impl, usage(name, **kw), torch.float32)


@pytest.mark.parametrize("name", ["up", "down", "V", "O", "mlp"])
def test_triton_pads_widths_to_multiples_of_16(impl, name, monkeypatch):
    """Widths that are not multiples of 16 (here 7 and 5; d_model 412 and d_head 82 at MoEUT-44M) reach
    the kernels zero-padded to 16, where their rows are aligned (see cvmm._pad_width), and the results
    are the reference's, in the caller's shapes, contiguous."""
    seen = []
    for fn in ("_gemm", "_gradw"):   # every operand and bank the kernels get, by its row width
        orig = getattr(C, fn)
        monkeypatch.setattr(C, fn, lambda a, *r, _orig=orig, **k: seen.append(
            [a.shape[-1]] + [t.shape[-1] for t in r if torch.is_tensor(t) and t.dim() == 3]) or _orig(a, *r, **k))
    if name == "mlp":
        args = mlp_inputs(N=9, d=7, de=5)   # 27 slots, 5 experts: padded (see _pad_width)
        impl("torch")
        want = mlp_grads(mlp, *args)
        impl("triton")
        got = mlp_grads(fused_mlp, *(t.to(DEV) for t in args))
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.is_contiguous() and rel(a.cpu(), b) < 2e-5
    else:
        x, ids, w, sw = usage(name, N=20, d=7, de=5)
        compare(impl, (x, ids, w, sw), torch.float32)
        assert C._w_desc(w.half(), True, w.shape[2], 16, 16) is None   # unpadded, TMA could not take it
    assert seen and all(n % 16 == 0 for widths in seen for n in widths), seen


def test_triton_decode_does_not_pad(impl, monkeypatch):
    """At decode (fewer than 4 slots per expert) the widths stay as they are: padding would copy every
    expert's weights where the step reads only the picked ones'. Same results either way."""
    seen = []
    orig = C._gemm
    monkeypatch.setattr(C, "_gemm", lambda a, *r, **k: seen.append(a.shape[-1]) or orig(a, *r, **k))
    compare(impl, usage("down", N=1, d=7, de=5), torch.float32)
    assert seen and 7 in seen and all(n in (5, 7) for n in seen), seen


@pytest.mark.parametrize("name", ["up", "down"])
def test_triton_overflow_stays_in_its_expert(impl, name):
    """An expert whose weights overflowed (inf) poisons only the rows routed to it: no weight tile of
    another expert reads into its rows (K = 40 or 24 is not a multiple of the K tile)."""
    impl("triton")
    x, ids, w, sw = usage(name, N=30, d=40, de=24, E=4)
    w = w.clone()
    w[2] = float("inf")
    out = cvmm(x.to(DEV), cvmm_prepare(ids.to(DEV), 4), w.to(DEV), sw.to(DEV) if sw is not None else None).cpu()
    impl("torch")
    want = cvmm(x, cvmm_prepare(ids, 4), w, sw)
    ok = want.isfinite().all(-1)          # rows that never touch expert 2
    assert ok.any() and (~ok).any()
    assert out[ok].isfinite().all() and rel(out[ok], want[ok]) < 2e-5


def test_triton_weight_grad_deterministic(impl):
    """The same bits run to run. Under the CPU interpreter the programs run one after another, so that
    alone cannot fail here (test_cuda_large_deterministic checks it on the GPU): the fixed-order slot
    contraction is pinned as well, which CVMM_CONTRACT=atomic would not give."""
    impl("triton")
    args = usage("down", N=200, K=4, E=3, d=40, de=24, device=DEV)
    a, b = run(*args), run(*args)
    for t, u in zip(a, b):
        assert torch.equal(t, u)
    x, ids, w, sw = args
    per_slot = cvmm(x, cvmm_prepare(ids, 3), w, sw.reshape(-1, 1)).view(200, 4, -1)   # each slot's product
    assert torch.equal(a[0], per_slot.sum(1))


@pytest.mark.parametrize("split", [2, 3, 7])
def test_triton_weight_grad_row_splits(impl, split):
    """With few experts of many rows each (SwitchHead's banks) the weight gradient splits each expert's
    rows over several programs and sums their fp32 partials in a fixed order: the reference's gradient,
    bit-identical run to run, zeros for an expert without rows, and parts left empty when there are
    more parts than row chunks (7 here)."""
    impl("triton")
    g = torch.Generator().manual_seed(split)
    E, K, N, rows = 3, 40, 24, 300
    ids = torch.randint(0, E - 1, (rows,), generator=g)          # the last expert gets no rows
    sel = cvmm_prepare(ids[:, None].to(DEV), E)
    x, go, sc = torch.randn(rows, K, generator=g), torch.randn(rows, N, generator=g), torch.rand(rows, generator=g)
    want = torch.stack([x[ids == e].T @ (sc[ids == e, None] * go[ids == e]) for e in range(E)])
    for dtype, tol in [(torch.float32, 2e-5), (torch.float16, 5e-3)]:
        args = (x.to(DEV, dtype), 1, go.to(DEV, dtype), 1, sc.to(DEV), sel.slot, sel.offsets,
                torch.empty(E, K, N, device=DEV, dtype=dtype))
        got, again = (C._gradw(*args, cfg=dict(split=split)) for _ in range(2))
        assert got.dtype == dtype and got.shape == (E, K, N) and torch.equal(got, again)
        assert rel(got.cpu().float(), want) < tol and got[E - 1].eq(0).all()


def test_row_splits_through_the_fused_mlp(impl, monkeypatch):
    """The split weight gradient on cvmm_mlp's real backward (grad_W2 into a preallocated tensor, the
    sorted operands): the same gradients as the reference."""
    monkeypatch.setattr(C, "_row_splits", lambda *a: 3)
    args = mlp_inputs(N=60, K=2, E=3, d=32, de=16)
    impl("torch")
    want = mlp_grads(mlp, *args)
    impl("triton")
    got = mlp_grads(fused_mlp, *(t.to(DEV) for t in args))
    for a, b in zip(got, want):
        assert rel(a.cpu(), b) < 2e-5


def test_weight_grad_split_rule():
    """Splits only where the (expert, tile) programs leave the waves of one program per SM under 85%
    full, into the 1-4 parts that fill them best, each of at least 512 rows: never for the σ-MoE banks,
    and for SwitchHead's O bank at the 44M / 244M shapes (measured faster there on an H100)."""
    sms = 132
    assert C._row_splits(6 * 254, 1548, sms) == 1        # MoEUT-126M grad_W1: 6 tiles x 254 experts
    assert C._row_splits(4 * 155, 2536, sms) == 1        # MoEUT-44M grad_W1: 620 programs, 94% full
    assert C._row_splits(6 * 40, 6553, sms) == 1         # 126M SwitchHead V: 240 programs, 91% full
    assert C._row_splits(2 * 32, 8192, sms) == 2         # 44M O: 64 programs -> 128 (97%)
    assert C._row_splits(4 * 40, 6553, sms) == 4         # 244M O: 160 programs (61%) -> 640 (97%)
    assert C._row_splits(8 * 40, 6553, sms) == 2         # 244M V: 81% -> 97%; 4 parts as full, fewer wins
    assert C._row_splits(64, 1000, sms) == 1             # 2 parts would hold under 512 rows
    assert C._row_splits(10, 10 ** 6, 0) == 1            # no GPU


def test_weight_grad_deep_k_rule():
    """256-deep K tiles only where 128-deep ones overflow one wave of programs and 256-deep ones fit:
    SwitchHead V's bank at the 126M shapes (measured faster there on an H100), not at 44M or 244M, and never
    the σ-MoE banks."""
    sms = 132
    assert C._deep_k(40, 768, 96, 128, sms)               # 126M V: 240 programs -> 120
    assert not C._deep_k(40, 1024, 128, 128, sms)         # 244M V: 320 -> 160, more than a wave
    assert not C._deep_k(32, 416, 96, 128, sms)           # 44M V: 128 programs already fit
    assert not C._deep_k(254, 768, 128, 128, sms)         # 126M grad_W1: 1524 programs
    assert not C._deep_k(40, 128, 768, 128, sms)          # K <= 128: nothing deeper to take
    assert not C._deep_k(40, 768, 96, 128, 0)             # no GPU


def test_triton_weight_grad_deep_k_tiles(impl):
    """The weight gradient with 256-deep K tiles (as _deep_k picks on Hopper) equals the reference's."""
    impl("triton")
    x, ids, w, sw = usage("V", N=12, d=288, de=16)   # K = 288: one full 256-deep tile and one partial
    sel = cvmm_prepare(ids, w.shape[0])
    fan, G = sel.slot.numel() // x.shape[0], sw.shape[1]
    g = torch.randn(sel.slot.numel() // G, w.shape[2])
    got = C._gradw(x, fan, g, G, sw.reshape(-1, G).contiguous(), sel.slot, sel.offsets, w, cfg=dict(BK=256))
    wr = w.clone().requires_grad_()
    cvmm_reference(x, sel, wr, sw).backward(g)
    assert rel(got, wr.grad) < 1e-5


def test_triton_default_contraction_is_sum_of_slot_products(impl):
    """CVMM_CONTRACT=sum (the default, deterministic): the contracted output is the [S, D] product of
    the scaled slots, each rounded to the output dtype, summed by torch in slot order; bit for bit."""
    impl("triton")
    x, ids, w, sw = usage("down", N=64, K=4, E=3, de=16, d=32, dtype=torch.float16, device=DEV)
    sw = sw.float()
    sel = cvmm_prepare(ids, 3)
    out = cvmm(x, sel, w, sw)
    per_slot = cvmm(x, sel, w, sw.reshape(-1, 1))      # G = 1: the same scaled products, uncontracted
    assert torch.equal(out, per_slot.view(64, 4, 32).sum(1))


def test_triton_fp16_weight_grad_accumulates_in_fp32(impl):
    """The weight gradient of an expert with many rows (2048, many row chunks) accumulates in fp32: an
    fp16 running sum would lose the small terms once it grows."""
    impl("triton")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2048, 16, generator=g).half().to(DEV)
    w = (torch.randn(1, 16, 24, generator=g) / 4).half().to(DEV)
    go = torch.rand(2048, 24, generator=g).half().to(DEV)
    sel = cvmm_prepare(torch.zeros(2048, 1, dtype=torch.long, device=DEV), 1)
    gw = grads_for(lambda w: cvmm(x, sel, w), [w], go)[1]
    assert rel(gw[0].cpu(), x.cpu().double().T @ go.cpu().double()) < 1e-3


@pytest.mark.parametrize("view", ["x", "sw", "grad"])
@pytest.mark.parametrize("op", ["cvmm", "mlp"])
def test_triton_transposed_views(impl, op, view):
    """A non-contiguous 2-D x, slot-weight tensor or upstream gradient (a transpose somewhere upstream or
    downstream) gives the reference's output and gradients: nothing reads it as if contiguous."""
    T = lambda t: t.T.contiguous().T  # noqa: E731  the same values, transposed strides
    if op == "cvmm":   # σ-MoE down: x [N*K, d_expert], slot weights [N, K]
        x, ids, w, sw = usage("down", N=20, K=3, E=5)
        f = lambda sel: lambda x, w, sw: cvmm(x, sel, w, sw)  # noqa: E731
        args = [x, w, sw]
    else:
        x, ids, w1, w2, sw = mlp_inputs(N=20, K=3, E=5)
        f = lambda sel: lambda x, w1, w2, sw: cvmm_mlp(x, sel, w1, w2, sw)  # noqa: E731
        args = [x, w1, w2, sw]
    go = torch.randn(20, 24, generator=torch.Generator().manual_seed(1))
    if view == "x":
        args[0] = T(args[0])
    elif view == "sw":
        args[-1] = T(args[-1])
    else:
        go = T(go)
    assert not (args[0] if view == "x" else args[-1] if view == "sw" else go).is_contiguous()
    impl("torch")
    want = grads_for(f(cvmm_prepare(ids, 5)), args, go)
    impl("triton")   # .to(DEV) keeps the strides
    got = grads_for(f(cvmm_prepare(ids.to(DEV), 5)), [t.to(DEV) for t in args], go.to(DEV))
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel(a.cpu(), b) < 2e-5, i


@pytest.mark.parametrize("need", [("x",), ("w",), ("sw",), ("w", "sw"), ("x", "sw")], ids="+".join)
def test_triton_partial_grads(impl, need):
    """σ-MoE down-projection (slot weights, fan 1) with only some inputs needing grad (frozen experts,
    detached scores, a frozen input): the gradients asked for are the reference's."""
    x, ids, w, sw = usage("down", N=20, K=3, E=5)
    go = torch.randn(20, 24, generator=torch.Generator().manual_seed(1))
    flags = [n in need for n in ("x", "w", "sw")]
    f = lambda sel: lambda x, w, sw: cvmm(x, sel, w, sw)  # noqa: E731
    impl("torch")
    want = grads_for(f(cvmm_prepare(ids, 5)), [x, w, sw], go, flags)
    impl("triton")
    got = grads_for(f(cvmm_prepare(ids.to(DEV), 5)), [t.to(DEV) for t in (x, w, sw)], go.to(DEV), flags)
    assert len(got) == len(want) == 1 + len(need)
    for name, a, b in zip(("out",) + need, got, want):
        assert rel(a.cpu(), b) < 2e-5, name


def test_triton_noncontiguous_and_batched_x(impl):
    impl("triton")
    x, ids, w, sw = usage("up", N=12, device=DEV)
    xt = x.reshape(3, 4, -1).transpose(0, 1)                  # non-contiguous, 3D
    wt = w.transpose(1, 2).contiguous().transpose(1, 2)       # non-contiguous bank
    sel = cvmm_prepare(ids.view(3, 4, -1).transpose(0, 1), w.shape[0])
    impl("torch")
    want = cvmm(xt.cpu(), C.CVMMSel(*(t.cpu() for t in sel)), w.cpu())
    impl("triton")
    assert rel(cvmm(xt, sel, wt).cpu(), want) < 2e-5


def test_autocast(impl):
    """Under autocast the matmuls run in the autocast dtype; fp32 slot weights keep their precision."""
    x, ids, w, sw = usage("down", N=16, device=DEV)
    impl("torch")
    want = run(x.cpu(), ids.cpu(), w.cpu(), sw.cpu())
    impl("triton")
    dt = torch.bfloat16  # on CPU the interpreted kernels upcast bf16 dots (its bf16 tl.dot is broken)
    with torch.autocast(DEV, dtype=dt):
        got = run(x, ids, w, sw)
    assert got[0].dtype == dt and got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    for a, b in zip(got, want):
        assert rel(a.cpu(), b) < 3e-2


def test_errors(impl, monkeypatch):
    x, ids, w, sw = usage("down")
    sel = cvmm_prepare(ids, w.shape[0])
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 5\)"):
        cvmm_prepare(ids + 1, 5)
    with pytest.raises(ValueError, match="must lie in"):
        cvmm_prepare(ids - 1, 5)
    with pytest.raises(TypeError, match="must be integers"):
        cvmm_prepare(ids.float(), 5)
    with pytest.raises(TypeError, match="must be integers"):
        cvmm_prepare(ids > 0, 5)
    with pytest.raises(ValueError, match="must lie in"):        # not truncated into range by an int32 cast
        cvmm_prepare(ids.long() + 2 ** 32, 5)
    for mode in ("torch", "triton"):
        impl(mode)
        with pytest.raises(ValueError, match="prepared for 5 experts, bank has 4"):
            cvmm(x, sel, w[:4], sw)
        with pytest.raises(ValueError, match="bank expects D_in"):
            cvmm(x[:, :-1], sel, w, sw)
        with pytest.raises(ValueError, match="cannot be spread over"):
            cvmm(x[:-1], sel, w, sw)
        with pytest.raises(ValueError, match="one weight per slot"):
            cvmm(x, sel, w, sw[:-1])
        with pytest.raises(ValueError, match=r"\[E, D_in, D_out\]"):
            cvmm(x, sel, w[0], sw)
        with pytest.raises(TypeError, match="must have one dtype"):
            cvmm(x.half(), sel, w, sw)
        with pytest.raises(TypeError, match="int32"):
            cvmm(x, C.CVMMSel(sel.expert, sel.slot.long(), sel.offsets), w, sw)
        with pytest.raises(TypeError, match="must be floating point"):
            cvmm(x.long(), sel, w.long())
        empty = cvmm_prepare(ids[:, :0], w.shape[0])                 # top-0: no slots at all
        with pytest.raises(ValueError, match="0 slots cannot be spread"):
            cvmm(x, empty, w, sw[:, :0])
        with pytest.raises(ValueError, match="D_in >= 1"):
            cvmm(x[0, 0], sel, w)
        with pytest.raises(ValueError, match="D_in >= 1"):                  # zero features
            cvmm(torch.zeros(4, 0), cvmm_prepare(torch.zeros(4, 1, dtype=torch.long), 2),
                 torch.zeros(2, 0, 3))
        x1, ids1, w1, sw1 = usage("down", N=1, K=1)                          # one slot, one weight
        with pytest.raises(ValueError, match="one weight per slot"):       # but 0-dim: no group dim
            cvmm(x1, cvmm_prepare(ids1, 5), w1, sw1.reshape(()))
        with pytest.raises(TypeError, match="slot_weights must be floating point"):
            cvmm(x, sel, w, (sw * 10).long())
        with pytest.raises(TypeError, match="int32"):
            cvmm(x, C.CVMMSel(sel.expert, sel.slot, sel.offsets.long()), w, sw)
        with pytest.raises(ValueError, match="one device"):                # meta stands in for a GPU
            cvmm(x.to("meta"), sel, w, sw)
    with pytest.raises(TypeError, match="Triton path takes"):
        cvmm(x.double(), sel, w.double(), sw)
    # the weight gradient's grid has one program column per expert (CUDA caps that axis at 65535):
    # refused before any launch (the kernel is stubbed out; 65536 interpreted programs take minutes)
    monkeypatch.setattr(C, "_cvmm_gradw_kernel", None)
    E = 65536
    sel = cvmm_prepare(torch.tensor([[0], [1], [E - 1], [5]]), E)
    with pytest.raises(ValueError, match="at most 65535 experts"):
        C._gradw(torch.randn(4, 16), 1, torch.randn(4, 16), 1, None, sel.slot, sel.offsets,
                 torch.zeros(E, 16, 16))


def mlp(x, ids, w1, w2, sw):
    sel = cvmm_prepare(ids, w1.shape[0])
    return cvmm(torch.relu(cvmm(x, sel, w1)), sel, w2, sw)


def fused_mlp(x, ids, w1, w2, sw):
    return cvmm_mlp(x, cvmm_prepare(ids, w1.shape[0]), w1, w2, sw)


def mlp_inputs(N=7, d=24, E=5, K=3, de=16, ids=None, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + N)
    ids = torch.randint(0, E, (N, K), generator=g) if ids is None else ids
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return [t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in
            (r(N, d), ids, r(E, d, de) / d ** 0.5, r(E, de, d) / de ** 0.5, torch.rand(N, K, generator=g))]


def mlp_grads(f, x, ids, w1, w2, sw):
    ps = [t.detach().clone().requires_grad_() for t in (x, w1, w2, sw)]
    y = f(ps[0], ids, ps[1], ps[2], ps[3])
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    return [y] + list(torch.autograd.grad(y, ps, go))


MLP_CASES = {"basic": {}, "ragged": dict(N=37, d=40, de=24, E=4), "K1": dict(N=11, K=1),
             "zero_row_experts": dict(N=9, E=16, ids=torch.randint(0, 3, (9, 3)) * 5),
             "one_row": dict(N=1), "many_experts": dict(N=50, E=300, K=2, d=32, de=16),
             "big_tiles": dict(N=300, K=4, E=3, d=72, de=40)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(MLP_CASES))
def test_fused_mlp_matches_two_cvmm_reference(impl, case, dtype):
    """cvmm_mlp (fused relu and relu-grad epilogues, hs for grad_W2) equals relu between two reference
    cvmm calls, in the output and all four gradients."""
    args = [t.to(dtype).float() if t.is_floating_point() else t for t in mlp_inputs(**MLP_CASES[case])]
    impl("torch")   # on the inputs rounded to dtype, so relu flips no sign between the two
    want = mlp_grads(mlp, *args)
    x, ids, w1, w2, sw = args   # the op's own CPU implementation (what torch.compile runs on CPU)
    sel = cvmm_prepare(ids, w1.shape[0])
    y, h = C._mlp_fwd_impl(x, sel.slot, sel.offsets, w1, w2, sw)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = C._mlp_bwd_impl(go, x, sel.slot, sel.offsets, w1, w2, sw, h, True, True, True, True)
    assert all(rel(a, b) < 1e-5 for a, b in zip([y, *grads], want))
    impl("triton")
    x, ids, w1, w2, sw = args
    got = mlp_grads(fused_mlp, x.to(DEV, dtype), ids.to(DEV), w1.to(DEV, dtype), w2.to(DEV, dtype), sw.to(DEV))
    tol = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    for name, a, b in zip(["y", "grad_x", "grad_w1", "grad_w2", "grad_sw"], got, want):
        assert a.shape == b.shape and rel(a.cpu(), b) < tol, (name, rel(a.cpu(), b))


def test_fused_mlp_deterministic(impl):
    """Two runs, the same bits (on the CPU the interpreter is sequential, so this guards the host-side code
    only; test_cuda_large_deterministic checks the kernels on the GPU; partial gradients:
    test_fused_mlp_partial_grads)."""
    impl("triton")
    x, ids, w1, w2, sw = mlp_inputs(N=200, K=4, E=3, d=40, de=24, device=DEV)
    a, b = mlp_grads(fused_mlp, x, ids, w1, w2, sw), mlp_grads(fused_mlp, x, ids, w1, w2, sw)
    assert all(torch.equal(t, u) for t, u in zip(a, b))


@pytest.mark.parametrize("fwd_impl,bwd_impl", [("triton", "triton"), ("torch", "torch"), ("torch", "triton"),
                                               ("triton", "torch")])
def test_fused_mlp_hidden_in_sorted_order(impl, fwd_impl, bwd_impl):
    """Both paths save the hidden activation h in expert-sorted row order (row i is slot sel.slot[i]),
    with ragged experts and one without rows, so either backward takes either forward's h."""
    x, ids, w1, w2, sw = mlp_inputs(N=37, K=3, E=6, d=40, de=24, ids=torch.randint(0, 5, (37, 3)))
    sel = cvmm_prepare(ids, w1.shape[0])
    impl("torch")
    want_grads = mlp_grads(mlp, x, ids, w1, w2, sw)[1:]   # by autograd through two reference calls
    impl(fwd_impl)
    dev = DEV if fwd_impl == "triton" else "cpu"
    _, h = C._mlp_fwd_impl(*(t.to(dev) for t in (x, sel.slot, sel.offsets, w1, w2, sw)))
    want = torch.relu(cvmm_reference(x, sel, w1))
    assert rel(h.cpu(), want[sel.slot.long()]) < 2e-5
    impl(bwd_impl)
    dev = DEV if bwd_impl == "triton" else "cpu"
    go = torch.randn(37, 40, generator=torch.Generator().manual_seed(1))
    got = C._mlp_bwd_impl(*(t.to(dev) for t in (go, x, sel.slot, sel.offsets, w1, w2, sw, h)), True, True, True, True)
    for name, a, b in zip(["grad_x", "grad_w1", "grad_w2", "grad_sw"], got, want_grads):
        assert rel(a.cpu(), b) < 2e-5, name


@pytest.mark.parametrize("name", ["cvmm_up", "cvmm_down", "mlp"])
def test_triton_overflow_gradients_stay_in_their_expert(impl, name):
    """An expert with inf weights that no token uses leaves every output and gradient finite (weight
    tiles reaching past an expert's rows, and the grad_sw dot over masked-off columns, would turn
    0 * inf into NaN). Widths 40 / 24 are not multiples of the tiles."""
    impl("triton")
    if name == "mlp":
        x, ids, w1, w2, sw = mlp_inputs(N=30, d=40, de=24, E=4, ids=torch.randint(0, 2, (30, 3)) * 3)
        w1, w2 = w1.clone(), w2.clone()
        w1[1], w2[1] = float("inf"), float("inf")
        got = mlp_grads(fused_mlp, *(t.to(DEV) for t in (x, ids, w1, w2, sw)))
        got = [got[0], got[1], got[2][[0, 3]], got[3][[0, 3]], got[4]]   # expert 1's own grads aside
    else:
        x, ids, w, sw = usage(name[5:], N=30, d=40, de=24, E=4, ids=torch.randint(0, 2, (30, 3)) * 3)
        w = w.clone()
        w[1] = float("inf")
        got = run(x.to(DEV), ids.to(DEV), w.to(DEV), sw.to(DEV) if sw is not None else None)
        got[2] = got[2][[0, 3]]
    assert all(t.isfinite().all() for t in got), [t.isfinite().all().item() for t in got]


def partial_grads(f, args, need):
    """Gradients of the inputs named in `need` (of x, w1, w2, sw) only; the others stay constants."""
    x, ids, w1, w2, sw = args
    ps = {n: t.detach().clone().requires_grad_(n in need) for n, t in zip("x w1 w2 sw".split(), (x, w1, w2, sw))}
    y = f(ps["x"], ids, ps["w1"], ps["w2"], ps["sw"])
    return torch.autograd.grad(y.float().square().sum(), [ps[n] for n in need])


NEEDS = [("x",), ("w2",), ("w1", "sw"), ("x", "w2", "sw")]


@pytest.mark.parametrize("need", NEEDS, ids="+".join)
def test_fused_mlp_partial_grads(impl, need):
    """Only some inputs need grad (frozen experts, a detached input): the others are skipped, these
    still right (several unused gradient outputs at once must not alias, see the op)."""
    args = mlp_inputs(N=30, K=3, E=4, d=24, de=16, device=DEV)
    impl("torch")
    want = partial_grads(mlp, [t.cpu() for t in args], need)
    impl("triton")
    got = partial_grads(fused_mlp, args, need)
    assert all(rel(a.cpu(), b) < 2e-5 for a, b in zip(got, want))


def test_fused_mlp_autocast(impl):
    """Under autocast both banks run in the autocast dtype, as x does; gradients keep their inputs' fp32."""
    x, ids, w1, w2, sw = mlp_inputs(N=30, K=3, E=4, device=DEV)
    impl("torch")
    want = mlp_grads(mlp, *(t.cpu() for t in (x, ids, w1, w2, sw)))
    impl("triton")
    dt = torch.bfloat16
    with torch.autocast(DEV, dtype=dt):
        got = mlp_grads(fused_mlp, x, ids, w1, w2, sw)
    assert got[0].dtype == dt and all(t.dtype == torch.float32 for t in got[1:])
    for name, a, b in zip(["y", "grad_x", "grad_w1", "grad_w2", "grad_sw"], got, want):
        assert rel(a.cpu(), b) < 3e-2, (name, rel(a.cpu(), b))


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="the CUDA compile tests cover this; CPU compiles are slow on the GPU host")
def test_fused_mlp_partial_grads_compiled(impl):
    """The same under torch.compile(fullgraph=True), where the backward is the custom op cvmm_mlp_bwd."""
    impl("torch")
    args = mlp_inputs(N=30, K=3, E=4, d=24, de=16)
    for need in NEEDS:
        want = partial_grads(mlp, args, need)
        got = partial_grads(torch.compile(fused_mlp, fullgraph=True), args, need)
        assert all(rel(a, b) < 1e-5 for a, b in zip(got, want)), need


def test_fused_mlp_errors(impl):
    x, ids, w1, w2, sw = mlp_inputs()
    sel = cvmm_prepare(ids, 5)
    for mode in ("torch", "triton"):
        impl(mode)
        with pytest.raises(ValueError, match=r"\[E, d_expert, D_out\]"):
            cvmm_mlp(x, sel, w1, w2[:, :-1], sw)
        with pytest.raises(ValueError, match=r"must be \[rows, K\]"):
            cvmm_mlp(x, sel, w1, w2, sw.reshape(-1, 1))
        with pytest.raises(ValueError, match="bank expects D_in"):
            cvmm_mlp(x[:, :-1], sel, w1, w2, sw)
        with pytest.raises(TypeError, match="slot_weights .* are required"):
            cvmm_mlp(x, sel, w1, w2, None)
        with pytest.raises(ValueError, match="banks must be"):   # 5 and 6 experts: not one routing
            cvmm_mlp(x, sel, w1, torch.cat([w2, w2[:1]]), sw)


def check_compiled(device, dtype, tol, fn=mlp):
    x, ids, w1, _ = usage("up", N=40, d=64, de=32, E=9, K=3, device=device, dtype=dtype)
    w2 = usage("down", N=40, d=64, de=32, E=9, K=3, device=device, dtype=dtype)[2]
    sw = torch.rand(40, 3, device=device)
    outs = []
    for f in (mlp, torch.compile(fn, fullgraph=True)):
        ps = [t.detach().clone().requires_grad_() for t in (x, w1, w2, sw)]
        y = f(ps[0], ids, ps[1], ps[2], ps[3])
        outs.append([y] + list(torch.autograd.grad(y.float().square().sum(), ps)))
    for a, b in zip(*outs):
        assert rel(a, b) < tol


@pytest.mark.skipif(CUDA, reason="the CUDA compile tests cover this; CPU compiles are slow on the GPU host")
def test_compile_cpu_reference_path(impl):
    """fullgraph=True: the reference's .tolist() lives inside the custom op, so no graph break."""
    impl("torch")
    check_compiled("cpu", torch.float32, 1e-5)
    check_compiled("cpu", torch.float32, 1e-5, fused_mlp)


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="the CUDA compile tests cover this; CPU compiles are slow on the GPU host")
def test_compile_triton_path_with_padding_and_topk(impl):
    """fullgraph=True through the Triton path's extra steps: the router top-k op (topk_ids) and the
    zero-padding of widths that are not multiples of 16 around the cvmm_mlp op, against eager."""
    impl("triton")
    g = torch.Generator().manual_seed(3)
    x, w1, w2, router = (torch.randn(*s, generator=g) for s in [(24, 7), (4, 7, 5), (4, 5, 7), (7, 4)])

    def sigma_moe(x, w1, w2, router):
        scores = torch.sigmoid(x @ router)
        idx = topk_ids(scores, 2)
        return cvmm_mlp(x, cvmm_prepare(idx, 4), w1, w2, scores.gather(-1, idx))
    outs = []
    for f in (sigma_moe, torch.compile(sigma_moe, fullgraph=True)):
        ps = [t.clone().requires_grad_() for t in (x, w1, w2, router)]
        y = f(*ps)
        outs.append([y] + list(torch.autograd.grad(y.square().sum(), ps)))
    for a, b in zip(*outs):
        assert a.shape == b.shape and rel(a, b) < 1e-5


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_compile_cuda_sigma_moe(impl, dtype):
    impl("auto")
    check_compiled("cuda", dtype, 1e-5)
    check_compiled("cuda", dtype, 1e-2 if dtype == torch.bfloat16 else 1e-5, fused_mlp)  # vs two cvmm


@needs_cuda
def test_cuda_device_mismatch_and_bad_ids(impl):
    impl("auto")
    x, ids, w, sw = usage("down", device="cuda")
    with pytest.raises(ValueError, match="one device"):
        cvmm(x, cvmm_prepare(ids, w.shape[0]), w.cpu(), sw)


@needs_cuda
@pytest.mark.parametrize("E", [5, 254, 32767])
def test_cuda_prepare_narrow_keys(E):
    """On CUDA the ids are sorted as 16-bit keys: the same stable order, expert ids and offsets as the
    int64 sort on the CPU, and an id out of range (negative, = E, or one that int16 would wrap into range)
    still trips the device-side assert."""
    ids = torch.randint(0, E, (4096, 12), generator=torch.Generator().manual_seed(E))
    want, got = cvmm_prepare(ids, E), cvmm_prepare(ids.cuda(), E)
    for a, b in zip(want, got):
        assert b.dtype == torch.int32 and torch.equal(a, b.cpu())
    for bad in (-1, E, E + 2 ** 16):
        # a device-side assert poisons the CUDA context, so each check runs in a fresh process
        code = (f"import torch, sys; sys.path.insert(0, {REPO!r}); from cvmm import cvmm_prepare; "
                f"ids = torch.zeros(64, dtype=torch.long, device='cuda'); ids[7] = {bad}; "
                f"cvmm_prepare(ids, {E}); torch.cuda.synchronize()")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode != 0 and "assert" in r.stderr.lower(), (bad, r.stderr[-500:])


@needs_cuda
@pytest.mark.parametrize("rows", [1, 8, 64])
def test_cuda_decode_shapes(impl, rows):
    """Decode: a handful of tokens over the MoEUT-126M bank (254 experts, d 768, K 12)."""
    x, ids, w, sw = usage("down", N=rows, K=12, E=254, d=768, de=128, device="cuda")
    compare(impl, (x, ids, w, sw), torch.bfloat16)


@needs_cuda
def test_cuda_large_deterministic(impl):
    impl("auto")
    x, ids, w, sw = usage("down", N=4096, K=12, E=254, d=768, de=128, device="cuda", dtype=torch.bfloat16)
    a, b = run(x, ids, w, sw), run(x, ids, w, sw)
    for t, u in zip(a, b):
        assert torch.equal(t, u)
    compare(impl, (x, ids, w, sw), torch.bfloat16)


@needs_cuda
def test_cuda_thread_without_context(impl):
    """Kernels another thread loaded, launched from a thread whose first CUDA call is that launch (the
    autograd engine's thread after a no-grad forward). Triton builds TMA descriptors before its
    launcher makes the CUDA context current, which failed there with "invalid device context"."""
    impl("triton")
    x, ids, w1, w2, sw = mlp_inputs(N=64, d=64, de=32, E=8, K=2, device="cuda", dtype=torch.bfloat16)
    if C._w_desc(w1, False, 64, 64, 32) is None:
        pytest.skip("no TMA descriptors here (GPU before Hopper, ROCm or CVMM_TMA=0)")
    sel = cvmm_prepare(ids, 8)
    args = (x, sel.slot, sel.offsets, w1, w2, sw)
    y, h = C._mlp_fwd_impl(*args)                      # loads the kernels on this thread
    go = torch.randn_like(y)
    want = [y, h, *C._mlp_bwd_impl(go, *args, h, True, True, True, True)]
    got = {}

    def work():
        try:
            got["out"] = [*C._mlp_fwd_impl(*args), *C._mlp_bwd_impl(go, *args, h, True, True, True, True)]
        except Exception as e:  # reported below, with its message
            got["error"] = e
    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert "error" not in got, got.get("error")
    for a, b in zip(got["out"], want):
        assert torch.equal(a, b)

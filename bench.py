"""
Benchmarks (GPU). One function per section, picked with --what:
    $ python bench.py --what=cvmm                  # CVMM kernels vs dense / reference / torch._grouped_mm
    $ python bench.py --what=cvmm_tune             # tile sweeps behind the rules in cvmm.py
    $ python bench.py --what=train                 # training step: MoEUT-126M vs compiled dense-126M
      (rows may override keys: --train_models=config/moeut_1b.py,config/moeut_1b.py+activation_checkpointing=True;
       ':reduce-overhead' instead of ':compile' compiles with CUDA graphs; '+cvmm_overlap=0' and the
       other CVMM_FLAGS set a cvmm.py switch for that row; with --train_repeats rows that differ only in
       those share one compiled model, so e.g. ...:compile,...:compile+cvmm_overlap=0 is a clean A/B)
    $ python bench.py --what=profile               # top CUDA kernels and host ops of a training step (train_models' first)
    $ python bench.py --what=decode                # KV-cache decode vs re-running the prefix (same model)
      (add --train_models=config/moeut_126m.py for MoEUT-126M: the default list starts with the dense one)
    $ python bench.py --what=halting               # forced-depth halting step times
    $ python bench.py --what=halting_profile       # is a halting step GPU- or host-bound?
    $ python bench.py --what=depth_curve --depth_ckpt=out/addition_act --device=cpu   # loss vs test-time repeats
    $ python bench.py --what=ablation              # the MoE/attention options, one train.py run each (docs/options.md)
      (--ablation_parallel=4: runs share the GPU; --ablation_timing=True: time each option's step instead)
    $ python bench.py --what=exit_decode --depth_ckpt=out/addition_huginn --device=cpu --exit_prompt=16 --exit_new=48
Add new sections (whole-model training speed, halting, decode, ...) as `bench_<what>()` functions; they
read the globals below, which configurator.py lets you override from the command line.
"""
import contextlib
import statistics
import time

import torch

what = "cvmm"           # which section to run
dtype = "bfloat16"      # bfloat16 | float16 | float32
tokens = 32768          # cvmm: tokens per batch (e.g. 32 x 1024)
cvmm_repeats = 5        # cvmm: interleaved dense / cvmm_mlp fwd+bwd repeats for the % of dense
tune_only = ""          # cvmm_tune: comma-separated kinds to sweep ('' = all): small_k, big_k, grad_pre, grad_w, sh_grad_w
seed = 1337
device = "cuda"        # "cpu" only to smoke-test this script (with TRITON_INTERPRET=1 CVMM_IMPL=triton)
# train / profile / decode: models as config files, ':compile' = torch.compile; ratios vs the first
train_models = "config/dense_126m.py:compile,config/moeut_126m.py,config/moeut_126m.py:compile"
train_batch = 32
train_block = 1024
train_vocab = 50304     # gpt2's 50257 padded to a multiple of 64
train_steps = 10
train_repeats = 1       # train: > 1 builds every model first, then times them in turn this many rounds (medians)
decode_ctx = 1024       # decode: prompt length
decode_new = 64         # decode: tokens generated
halting_batch = "16"    # halting: comma-separated batch sizes (x 1024 tokens)
halting_compile = False  # halting: torch.compile the plain model, compile_layers() the halting ones
halting_skip = 0.75     # halting_profile: fraction of token-steps skipped (spread depths); < 0 = plain loop
halting_buckets = 32    # halting: halt_buckets of the table's 'bucketed' rows (static shapes per step)
halting_only = ""       # halting: '|'-separated parts of row names to run ('' = all; the plain row always runs)
halting_compile_mode = ""  # halting: torch.compile mode of every row (plain too), e.g. 'reduce-overhead'
depth_ckpt = ""         # depth_curve: a train.py checkpoint (.pt), or an out_dir (its latest)
depth_windows = 64      # depth_curve: validation windows (of the checkpoint's block_size) per point
depth_max = 0           # depth_curve: repeats 1 .. depth_max (0 = twice the trained R)
depth_exit = -1.0       # depth_curve: >= 0: per-token exit (KL) at this threshold, for models without halting
depth_plot = "depth_curve.png"   # depth_curve: written if matplotlib is installed ('' = none)
exit_thresholds = "0.001,0.01,0.1"   # exit_decode: KL thresholds of per-token exit, each against exit off
exit_batch = 4          # exit_decode: sequences decoded together, prompted from the depth_ckpt run's val split
exit_prompt = 64        # exit_decode: prompt tokens per sequence
exit_new = 128          # exit_decode: tokens generated per sequence (greedy)
ablation_config = "config/moeut_44m.py"  # ablation: the base model and recipe of every variant
ablation_variants = "all"   # ablation: comma-separated variant names (see ablation_rows), 'all' = every one; name@S: seed S
ablation_parallel = 1       # ablation: runs at once on the device (> 1: faster sweeps, tokens/s not comparable)
ablation_compiled = ""      # ablation: variants to run once more with compile=True (rows 'name+compile'), 'all' = every one
ablation_compile_mode = ""  # ablation: train.py's compile_mode for those rows ('reduce-overhead': CUDA graphs, for
                            # MoEUT-44M, whose compiled step is bound by the host: README, 'Training speed')
ablation_dataset = ""       # ablation: data/<name>; '' = 'shakespeare' (gpt2 tokens), 'shakespeare_bytes' in smoke
ablation_iters = 200        # ablation: optimizer steps of every variant (~2 passes over Shakespeare at 16 x 1024)
ablation_batch = 16         # ablation: sequences per step (one micro-batch)
ablation_block = 1024       # ablation: tokens per sequence
ablation_lr = 2.5e-4        # ablation: peak learning rate (the paper's; 5e-4 and 1e-3 measured far worse at 200 steps):
                            # 10 warmup steps, cosine to a tenth at ablation_iters
ablation_log = 10           # ablation: log interval; tokens/s = the median of the intervals after the first
ablation_eval_iters = 4     # ablation: eval batches per split (4 x 16 windows of 1024 cover Shakespeare's val split)
ablation_out = "out/ablation"   # ablation: one out_dir per variant below it, and ablation.md (the table; not in timing mode)
ablation_smoke = False      # ablation: a tiny model, 4 steps (also with --device=cpu): checks that it all runs
ablation_timing = False     # ablation: no training; time each run's training step in this process, one after
                            # another (same-run ratios), at ablation_batch x ablation_block, vocabulary train_vocab
ablation_rounds = 3         # ablation timing: interleaved rounds of train_steps steps per row; a row's ms is the median

from configurator import configure  # noqa: E402

configure(globals())


def timeit(fn, warmup=5, rep=20):
    """Median milliseconds of fn() after warm-up, with CUDA events (triton's do_bench when present).
    do_bench times as many calls as fit in 100 ms, so a call longer than 20 ms (a 64-token decode)
    is timed here instead, 5 times after one warm-up call: a median of one sample is no median."""
    if device == "cpu":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    try:
        from triton.testing import do_bench
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        if ms <= 20:
            return ms
        warmup, rep = 1, 5
    except ImportError:
        pass
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def graphed(f):
    """f captured in a CUDA graph (after a warm-up call on a side stream); returns graph.replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        f()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        f()
    return graph.replay


def table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    print()


# ----------------------------------------------------------------------------------------------------
MLP_SHAPES = [("MoEUT-126M", 768, 254, 12), ("MoEUT-244M", 1024, 387, 16)]   # (name, d_model, E, K)


def mlp_inputs(d, E, K, de=128):
    """σ-MoE MLP inputs at one MLP_SHAPES entry, in `dtype` on `device`: x, w1, w2 and the slot weights sw
    (all requiring grad), and the expert ids picked by a random sigmoid router."""
    dt, dev = getattr(torch, dtype), device
    x = torch.randn(tokens, d, device=dev, dtype=dt, requires_grad=True)
    router = torch.randn(d, E, device=dev, dtype=dt) / d ** 0.5
    w1 = (torch.randn(E, d, de, device=dev, dtype=dt) / d ** 0.5).requires_grad_()
    w2 = (torch.randn(E, de, d, device=dev, dtype=dt) / (E * de) ** 0.5).requires_grad_()
    with torch.no_grad():
        sw, ids = torch.sigmoid(x @ router).float().topk(K, dim=-1)
    return x, w1, w2, sw.requires_grad_(), ids


def mlp_kernels(C, x, K, w1, w2, sel, sw):
    """The kernels of cvmm_mlp in order, on its MoEUT inputs and random gradients: (name, tuning kind,
    fn(cfg)). Kinds: the tile sweep bench_cvmm_tune runs on that kernel (None: product + torch sum,
    swept as the product)."""
    dev, dt = x.device, x.dtype
    slot, off = sel.slot, sel.offsets
    with torch.no_grad():   # cvmm_mlp keeps h (and its gradient, hs) in expert-sorted row order
        h = C._gemm(x, K, w1, False, slot, off, None, 1, relu=True, hid_sorted=True)[0]
    g_out, g_h = torch.randn(x.shape[0], w2.shape[2], device=dev, dtype=dt), torch.randn_like(h)
    hs = torch.empty_like(h)
    sw = sw.detach().contiguous()
    return [
        ("fwd up + relu (gather, fan K)", "big_k",
         lambda c=None: C._gemm(x, K, w1, False, slot, off, None, 1, cfg=c, relu=True, hid_sorted=True)),
        ("fwd down (+ weights, contraction)", None,
         lambda c=None: C._gemm(h, 1, w2, False, slot, off, sw, K, cfg=c, a_sorted=True)),
        ("fwd down, product only (small-K kernel)", "small_k",
         lambda c=None: C._gemm(h, 1, w2, False, slot, off, sw, 1, cfg=c, a_sorted=True)),
        ("bwd grad_pre (relu mask) + grad_sw + hs", "grad_pre",
         lambda c=None: C._gemm(g_out, K, w2, True, slot, off, sw, 1, h, 1, cfg=c, relu_mask=True, hs=hs,
                                hid_sorted=True)),
        ("bwd grad_W2 (from hs, unscaled)", "grad_w",
         lambda c=None: C._gradw(hs, 1, g_out, K, None, slot, off, w2, cfg=c, x_sorted=True)),
        ("bwd grad_x (contraction over K)", None,
         lambda c=None: C._gemm(g_h, 1, w1, True, slot, off, None, K, cfg=c, a_sorted=True)),
        ("bwd grad_x, product only (small-K kernel)", "small_k",
         lambda c=None: C._gemm(g_h, 1, w1, True, slot, off, None, 1, cfg=c, a_sorted=True)),
        ("bwd grad_W1", "grad_w",
         lambda c=None: C._gradw(x, K, g_h, 1, None, slot, off, w1, cfg=c, g_sorted=True)),
    ]


# SwitchHead's V and O banks: (name, d_model, heads, experts per head, k, d_head); d_head 82 and 96 are
# padded to 128-wide tiles
SH_SHAPES = [("MoEUT-44M", 412, 4, 8, 2, 82), ("MoEUT-126M", 768, 4, 10, 2, 96), ("MoEUT-244M", 1024, 4, 10, 2, 128)]


def sh_gradw_kernels(C, d, H, E, k, dh):
    """SwitchHead's two weight gradients as its backward calls them, on random routing and gradients:
    (name, fn(cfg), FLOPs, fn() giving the torch reference's gradient). V: x [tokens, d] and grad_v
    [tokens * H, dh] into [H * E, d, dh]; O: att [tokens * H, dh] and grad_out [tokens, d] into
    [H * E, dh, d]; one routing for both."""
    dt, dev = getattr(torch, dtype), device
    with torch.no_grad():
        sw, ids = torch.sigmoid(torch.randn(tokens, H, E, device=dev)).topk(k, -1)
        sel = C.cvmm_prepare(ids + torch.arange(H, device=dev)[:, None] * E, H * E)
    # widths as cvmm pads them (to multiples of 16: MoEUT-44M's d 412 and d_head 82 run as 416 and 96)
    d, dh = (n + C._pad_width(n, sel.slot.numel(), H * E) for n in (d, dh))
    sw = sw.reshape(tokens * H, k).to(dt).contiguous()
    x, g_out = (torch.randn(tokens, d, device=dev, dtype=dt) for _ in range(2))
    att, g_v = (torch.randn(tokens * H, dh, device=dev, dtype=dt) for _ in range(2))
    wv, wo = torch.zeros(H * E, d, dh, device=dev, dtype=dt), torch.zeros(H * E, dh, d, device=dev, dtype=dt)
    fl = 2 * sel.slot.numel() * d * dh

    def reference(a, w, sw_, g):   # the weight gradient through the torch reference, in fp32
        w = w.float().requires_grad_()
        C.cvmm_reference(a.float(), sel, w, sw_.float()).backward(g.float())
        return w.grad
    sw_o = sw.view(tokens, H * k)   # O's slot weights: a token's H * k slots in one row
    return [("V grad_W", lambda c=None: C._gradw(x, H * k, g_v, k, sw, sel.slot, sel.offsets, wv, cfg=c), fl,
             lambda: reference(x, wv, sw, g_v)),
            ("O grad_W", lambda c=None: C._gradw(att, k, g_out, H * k, sw_o, sel.slot, sel.offsets, wo, cfg=c), fl,
             lambda: reference(att, wo, sw_o, g_out))]


def bench_cvmm():
    """σ-MoE MLP projections (up -> relu -> down with sigmoid weights), MoEUT-126M and -244M shapes, with
    random routing from a sigmoid router. Dense baseline of equal FLOPs: relu(X W1) W2 with
    d_ff = K * d_expert (a dense MLP doing exactly the same multiply-adds)."""
    import cvmm as C
    dt = getattr(torch, dtype)
    dev = device
    torch.manual_seed(seed)
    print(f"device: {torch.cuda.get_device_name() if dev == 'cuda' else dev}, torch {torch.__version__}, dtype {dtype}, "
          f"{tokens} tokens\n")

    def grouped_mm_mlp(x, sel, w1, w2, sw):
        # torch._grouped_mm wants the rows of each expert contiguous: gather, two grouped GEMMs, then the
        # same scatter + contraction as the reference
        S, d = sel.slot.numel(), x.shape[1]
        slot = sel.slot.long()
        offs = sel.offsets[1:]
        xs = x.index_select(0, slot // (S // x.shape[0]))
        h = torch.relu(torch._grouped_mm(xs, w1, offs=offs))
        y = torch._grouped_mm(h, w2, offs=offs)
        y = y.new_empty(S, d).index_copy(0, slot, y)
        return torch.bmm(sw.reshape(-1, 1, sw.shape[-1]).to(y.dtype), y.view(-1, sw.shape[-1], d)).squeeze(1)

    def cvmm_mlp(fn):
        return lambda x, sel, w1, w2, sw: fn(torch.relu(fn(x, sel, w1)), sel, w2, sw)

    def with_contract(mode, f):
        def g(*a):
            with cvmm_set({"CONTRACT": mode}):
                return f(*a)
        return g

    impls = {
        "cvmm_mlp triton (fused relu)": C.cvmm_mlp,
        "cvmm triton, two calls + torch relu": cvmm_mlp(C.cvmm),
        "cvmm triton, atomic contraction": with_contract("atomic", cvmm_mlp(C.cvmm)),
        "torch reference": cvmm_mlp(C.cvmm_reference),
        "torch._grouped_mm": grouped_mm_mlp,
    }
    for name, d, E, K in MLP_SHAPES:
        de = 128
        S = tokens * K
        flops = 2 * 2 * S * d * de                        # two projections, 2*S*D_in*D_out each
        x, w1, w2, sw, ids = mlp_inputs(d, E, K, de)
        sel = C.cvmm_prepare(ids, E)
        t_prep = timeit(lambda: C.cvmm_prepare(ids, E))
        # the dense MLP doing the same FLOPs
        xd = torch.randn(tokens, d, device=dev, dtype=dt, requires_grad=True)
        d1 = (torch.randn(d, K * de, device=dev, dtype=dt) / d ** 0.5).requires_grad_()
        d2 = (torch.randn(K * de, d, device=dev, dtype=dt) / (K * de) ** 0.5).requires_grad_()
        runs = {"dense MLP, equal FLOPs": (lambda: torch.relu(xd @ d1) @ d2, [xd, d1, d2])}
        for iname, f in impls.items():
            runs[iname] = (lambda f=f: f(x, sel, w1, w2, sw), [x, w1, w2, sw])
        rows, dense, fbs = [], None, {}
        for iname, (f, params) in runs.items():
            try:
                with torch.no_grad():
                    t_f = timeit(f)
                go = torch.randn_like(f())

                def fb(f=f, params=params, go=go):
                    torch.autograd.grad(f(), params, go)
                t_fb = timeit(fb)
                fbs[iname] = fb
            except Exception as e:  # e.g. torch._grouped_mm missing or unsupported here
                rows.append([iname, f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:60]})", "", "", "", "", ""])
                continue
            tf, tfb = flops / t_f / 1e9, 3 * flops / t_fb / 1e9
            dense = dense or (tf, tfb)
            rows.append([iname, f"{t_f:.3f}", f"{tf:.0f}", f"{100 * tf / dense[0]:.0f}%",
                         f"{t_fb:.3f}", f"{tfb:.0f}", f"{100 * tfb / dense[1]:.0f}%"])
        print(f"### {name} σ-MoE MLP: d_model {d}, E {E}, K {K}, d_expert {de}, {tokens} tokens "
              f"({flops / 1e9:.0f} GFLOP fwd, {3 * flops / 1e9:.0f} GFLOP fwd+bwd); "
              f"cvmm_prepare {t_prep * 1e3:.0f} us (not included)\n")
        table(["implementation", "fwd ms", "fwd TFLOP/s", "fwd % dense", "fwd+bwd ms", "fwd+bwd TFLOP/s",
               "fwd+bwd % dense"], rows)
        # the bar (fwd+bwd % of dense): the dense time alone moves by up to 5% between runs, so repeat
        # dense and cvmm_mlp in turn and compare medians
        pair = [fbs[k] for k in list(runs)[:2] if k in fbs]
        reps = [[timeit(f) for f in pair] for _ in range(cvmm_repeats)] if len(pair) == 2 else []
        if reps:
            med = [statistics.median(r[i] for r in reps) for i in range(2)]
            ratios = sorted(100 * r[0] / r[1] for r in reps)
            print(f"fwd+bwd, {cvmm_repeats} interleaved repeats: dense {med[0]:.3f} ms, cvmm_mlp {med[1]:.3f} ms "
                  f"(medians) = {100 * med[0] / med[1]:.1f}% of dense; per repeat {ratios[0]:.1f}-{ratios[-1]:.1f}%\n")
        # where the cvmm time goes (deterministic contraction); each kernel does S * d * de multiply-adds
        rows = []
        for pname, _, f in mlp_kernels(C, x.detach(), K, w1.detach(), w2.detach(), sel, sw):
            t = timeit(f)
            rows.append([pname, f"{t:.3f}", f"{2 * S * d * de / t / 1e9:.0f}"])
        table([f"{name} kernel", "ms", "TFLOP/s"], rows)

    # decode: a few tokens, memory-bound (every active expert's weights are read once)
    d, E, K, de = 768, 254, 12, 128
    w1 = torch.randn(E, d, de, device=dev, dtype=dt) / d ** 0.5
    w2 = torch.randn(E, de, d, device=dev, dtype=dt) / (E * de) ** 0.5
    router = torch.randn(d, E, device=dev, dtype=dt) / d ** 0.5
    rows = []
    for n in [1, 8, 64]:
        x = torch.randn(n, d, device=dev, dtype=dt)
        sw, ids = torch.sigmoid(x @ router).float().topk(K, dim=-1)
        sel = C.cvmm_prepare(ids, E)
        n_active = ids.unique().numel()
        xd, d1, d2 = x, torch.randn(d, K * de, device=dev, dtype=dt), torch.randn(K * de, d, device=dev, dtype=dt)
        row = [n, n_active]
        with torch.no_grad():
            for f in [lambda: torch.relu(xd @ d1) @ d2, lambda: C.cvmm_mlp(x, sel, w1, w2, sw),
                      lambda: impls["torch reference"](x, sel, w1, w2, sw),
                      lambda: C.cvmm_prepare(ids, E)]:
                row.append(f"{timeit(f) * 1e3:.1f}")
        if dev == "cuda":  # replayed from a CUDA graph: kernel time without Python launch overhead
            for f in [lambda: torch.relu(xd @ d1) @ d2, lambda: C.cvmm_mlp(x, sel, w1, w2, sw)]:
                row.append(f"{timeit(graphed(f)) * 1e3:.1f}")
        gb = n_active * 2 * d * de * x.element_size() / 1e9
        row.append(f"{gb / (float(row[-1]) * 1e-6):.0f}")
        rows.append(row)
    print("### decode, MoEUT-126M MLP (E 254, K 12), forward only, microseconds\n")
    table(["tokens", "active experts", "dense MLP equal FLOPs us", "cvmm_mlp us", "torch reference us",
           "cvmm_prepare us", "dense, CUDA graph us", "cvmm_mlp, CUDA graph us", "GB/s of expert weights (graph)"], rows)


# bench_cvmm_tune's configs per kind, as measured for the rules in cvmm.py ("rule" = what the rule picks)
TUNE_SWEEPS = {
    "small_k": [dict(BM=bm, BN=bn, warps=w, stages=st) for bm, bn, w, st in [
        (128, 64, 4, 4), (128, 64, 4, 3), (128, 64, 4, 2), (128, 128, 8, 3), (128, 128, 4, 3), (64, 128, 4, 4),
        (256, 64, 8, 3), (128, 256, 8, 2), (64, 64, 4, 4), (64, 64, 4, 2)]],
    "big_k": [dict(BM=bm, BN=bn, BK=bk, warps=w, stages=st) for bm, bn, bk, w, st in [
        (128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (64, 128, 64, 4, 4), (128, 128, 128, 8, 2), (64, 128, 64, 4, 3)]],
    "grad_pre": [dict(BM=bm, BN=bn, BK=bk, warps=w, stages=st) for bm, bn, bk, w, st in [
        (128, 128, 64, 4, 3), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 8, 4)]],
    "grad_w": [dict(BK=bk, BN=bn, BR=br, warps=w, stages=st) for bk, bn, br, w, st in [
        (128, 128, 64, 8, 3), (128, 128, 32, 8, 5), (128, 256, 64, 8, 3), (128, 128, 64, 4, 3), (128, 128, 64, 8, 4)]],
    # SwitchHead's weight gradients (SH_SHAPES): tiles over d_model (D) and d_head (DH), row splits
    "sh_grad_w": [dict(D=td, DH=th, BR=br, warps=w, stages=st, split=sp) for td, th, br, w, st, sp in [
        (128, 128, 64, 8, 3, 1), (128, 128, 64, 8, 3, 2), (256, 128, 64, 8, 3, 1), (128, 32, 64, 4, 3, 1),
        (256, 32, 64, 8, 3, 1), (128, 64, 64, 4, 3, 1), (256, 64, 64, 8, 3, 1), (128, 64, 64, 4, 4, 2),
        (128, 128, 128, 8, 3, 1), (64, 128, 64, 4, 3, 1)]],
}


def bench_cvmm_tune():
    """Sweep tile configs of the cvmm_mlp kernels at the MoEUT-126M and -244M MLP shapes, and of SwitchHead's
    weight gradients at SH_SHAPES (the measurements behind the tile rules in cvmm.py); tune_only picks the
    kinds (e.g. 'small_k,grad_w')."""
    import cvmm as C
    torch.manual_seed(seed)
    kinds = [k for k in tune_only.split(",") if k] or list(TUNE_SWEEPS)
    if set(kinds) - set(TUNE_SWEEPS):
        raise SystemExit(f"bench.py: tune_only takes kinds among {', '.join(TUNE_SWEEPS)}, got {tune_only!r}")
    rows = []
    for name, d, E, K in MLP_SHAPES if set(kinds) - {"sh_grad_w"} else []:   # the σ-MoE kernels' kinds
        de, S = 128, tokens * K
        x, w1, w2, sw, ids = (t.detach() for t in mlp_inputs(d, E, K, de))
        for pname, kind, f in mlp_kernels(C, x, K, w1, w2, C.cvmm_prepare(ids, E), sw):
            if kind not in kinds:
                continue
            for c in [None] + TUNE_SWEEPS[kind]:
                try:
                    t = timeit(lambda: f(c))
                    rows.append([f"{name} {pname}", c or "rule", f"{t:.3f}", f"{2 * S * d * de / t / 1e9:.0f}"])
                except Exception as e:
                    rows.append([f"{name} {pname}", c, f"n/a ({type(e).__name__})", ""])
    if rows:
        table(["part", "config", "ms", "TFLOP/s"], rows)
    rows = []
    for name, d, H, E, k, dh in SH_SHAPES if "sh_grad_w" in kinds else []:
        for pname, f, fl, reference in sh_gradw_kernels(C, d, H, E, k, dh):
            ref = reference()
            for c in [None] + TUNE_SWEEPS["sh_grad_w"]:
                # V's bank is [E, d, dh] (BK tiles d), O's [E, dh, d] (BK tiles dh)
                cfg = c and {**{k_: v for k_, v in c.items() if k_ not in ("D", "DH")},
                             **(dict(BK=c["D"], BN=c["DH"]) if pname[0] == "V" else dict(BK=c["DH"], BN=c["D"]))}
                label = "rule" if c is None else (f"d {c['D']} x d_head {c['DH']}, BR {c['BR']}, {c['warps']} warps, "
                                                  f"{c['stages']} stages, split {c['split']}")
                try:
                    err = ((f(cfg).float() - ref).abs().max() / ref.abs().max()).item()
                    t = timeit(lambda: f(cfg))
                    rows.append([f"{name} {pname}", label, f"{t:.3f}", f"{fl / t / 1e9:.0f}", f"{err:.1e}"])
                except Exception as e:
                    rows.append([f"{name} {pname}", label, f"n/a ({type(e).__name__})", "", ""])
    if rows:
        print("### SwitchHead weight gradients (V: [H*E, d, dh], O: [H*E, dh, d])\n")
        table(["part", "config", "ms", "TFLOP/s", "max error / max |reference|"], rows)


# ----------------------------------------------------------------------------------------------------
# whole-model training speed (issue: MoEUT-126M vs compiled dense-126M, same run)
PEAK_BF16_TFLOPS = {   # dense bf16 tensor-core peak by device name (vendor datasheets, no sparsity)
    "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0,
}


def peak_tflops():
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for key, v in PEAK_BF16_TFLOPS.items():
        if key in name:
            return name, v
    return name, None


def model_config(path, **over):
    from dataclasses import fields
    from configurator import apply_overrides
    from model import ModelConfig
    settings = {f.name: f.default for f in fields(ModelConfig)}
    apply_overrides(settings, [path], ignore_unknown_file_keys=True)
    settings.update(over)
    return ModelConfig.from_dict(settings)


def train_step(cfg, compiled, batch, block):
    """A closure running one bf16 forward+backward+AdamW step of a fresh model on fixed random tokens."""
    from halting import build_lm
    torch.manual_seed(seed)
    model = build_lm(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    # compiled: False, True, or a torch.compile mode ('reduce-overhead': the step's graphs as CUDA graphs)
    fwd = torch.compile(model, dynamic=False, **({'mode': compiled} if isinstance(compiled, str) else {})) \
        if compiled else model    # static shapes, as train.py compiles (see halting_step)
    x = torch.randint(0, cfg.vocab_size, (batch, block), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch, block), device=device)

    def step():
        with torch.autocast(device, dtype=getattr(torch, dtype)):
            out = fwd(x, y)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, model


def time_steps(step, n_warm, n):
    """(ms per step, peak GiB) of n steps after n_warm: CUDA events on the GPU; elsewhere wall time, and
    no peak (None)."""
    for _ in range(n_warm):
        step()
    if not device.startswith("cuda"):
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        return (time.perf_counter() - t0) * 1e3 / n, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        step()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n, torch.cuda.max_memory_allocated() / 2**30


def free_memory():
    """Return what freed models held to the device (after their last reference is dropped)."""
    import gc
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def timed_train_step(cfg, compiled, batch, block, ckpt=False, spec=None):
    """(ms per step, peak GiB) of a fresh model's train_step over train_steps after a warm-up, or None when
    it runs out of GPU memory; the model is freed before this returns. ckpt: activation checkpointing.
    spec: a bench row's name, to print its share of null-id picks."""
    step = model = None
    try:
        step, model = train_step(cfg, compiled, batch, block)
        model.core.activation_checkpointing = ckpt     # train.py's key (model.MoEUT.forward reads it)
        timed = time_steps(step, 5 if compiled else 3, train_steps)
        if spec is not None:
            null_share(spec, model)
    except torch.OutOfMemoryError:
        timed = None
    del step, model
    free_memory()
    return timed


def train_spec(spec):
    """One train_models entry, 'config/x.py[:compile|:reduce-overhead][+key=value...]' -> (path, compiled,
    {ModelConfig key: value}, activation_checkpointing); ':reduce-overhead' compiles in that torch.compile
    mode (CUDA graphs), and compiled is then that string. Values are Python literals or plain strings, without commas (the
    entries' separator): e.g. config/moeut_1b.py:compile+activation_checkpointing=True, or
    config/moeut_126m.py:compile+recurrence=random+mean_repeats=9+backprop_repeats=2."""
    import ast
    head, *over = spec.split("+")
    path, _, mode = head.partition(":")
    if mode not in ("", "compile", "reduce-overhead"):
        raise SystemExit(f"bench.py: train_models entry {spec!r}: the mode after ':' can only be 'compile' "
                         f"or 'reduce-overhead'")
    keys = {}
    for item in over:
        k, sep, raw = item.partition("=")
        if not sep or not k:
            raise SystemExit(f"bench.py: train_models entry {spec!r}: {item!r} is not key=value")
        try:
            keys[k] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):   # not a literal: a plain string, as configurator.py reads it
            keys[k] = raw
    compiled = {"": False, "compile": True}.get(mode, mode)
    return path, compiled, keys, bool(keys.pop("activation_checkpointing", False))


# train_models keys that set a cvmm.py switch (its env var) while that row runs, not a model key:
# e.g. config/moeut_126m.py:compile+cvmm_overlap=0
CVMM_FLAGS = {"cvmm_contract": ("CONTRACT", ("sum", "atomic")), "cvmm_overlap": ("OVERLAP", (0, 1)),
              "cvmm_tma": ("TMA", (0, 1)), "cvmm_smallk_dots": ("SMALLK_DOTS", (0, 1))}


def cvmm_flags(spec, keys):
    """Takes the cvmm_* keys out of a train_models entry's keys: {cvmm module global: value}. One line for
    an unknown switch or a value it does not take."""
    flags = {}
    for k in [k for k in keys if k.startswith("cvmm_")]:
        if k not in CVMM_FLAGS:
            raise SystemExit(f"bench.py: train_models entry {spec!r}: {k} is not a cvmm switch "
                             f"({', '.join(CVMM_FLAGS)})")
        name, allowed = CVMM_FLAGS[k]
        v = keys.pop(k)
        if v not in allowed or isinstance(v, bool):
            raise SystemExit(f"bench.py: train_models entry {spec!r}: {k} takes {' or '.join(map(str, allowed))}, "
                             f"got {v!r}")
        flags[name] = v if isinstance(v, str) else bool(v)
    return flags


@contextlib.contextmanager
def cvmm_set(flags):
    """cvmm.py's switches as in flags while inside (the custom ops read them when they run)."""
    import cvmm as C
    old = {k: getattr(C, k) for k in flags}
    for k, v in flags.items():
        setattr(C, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(C, k, v)


def train_config(spec, path, keys):
    """The ModelConfig of a train_models entry at train_vocab / train_block; one line for a key that is
    not a ModelConfig field (from_dict would drop it) or a value it refuses."""
    from dataclasses import fields
    from model import ModelConfig
    unknown = sorted(set(keys) - {f.name for f in fields(ModelConfig)})
    if unknown:
        raise SystemExit(f"bench.py: train_models entry {spec!r}: {', '.join(unknown)} is not a model key "
                         f"(model.ModelConfig, or activation_checkpointing)")
    try:
        return model_config(path, vocab_size=train_vocab, block_size=train_block, **keys)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"bench.py: train_models entry {spec!r}: {e}")


def null_share(spec, model):
    """Prints the share of σ-MoE picks that went to MoE++ null ids in the steps run so far (the timed ones;
    the warm-up with train_repeats > 1): the compute those picks skip depends on it. Nothing for a model
    without null ids."""
    from model import routing_report
    fracs = [r['null_frac'] for r in routing_report(model).values() if 'null_frac' in r]
    if fracs:
        print(f"{spec}: {100 * sum(fracs) / len(fracs):.1f}% of the σ-MoE picks went to null ids", flush=True)


def interleaved_train_steps(rows):
    """[(median ms per step, its own peak GiB or None off CUDA) or None when out of memory], one per row
    (spec, cfg, compiled, ckpt, cvmm flags) of bench_train: every model is built and warmed up first
    (warmed_row), then each is timed in turn, train_repeats rounds of train_steps steps, so a machine's slow
    minutes fall on every row alike. A row that runs out of memory in the rounds (with every other model
    resident) is dropped from them. Rows that differ only in their cvmm switches share one model (and one
    compilation: the custom ops read the switches when they run), except under CUDA graphs
    (':reduce-overhead'), which replay what they recorded."""
    built, times = [], [[] for _ in rows]
    allow_recompiles(len(rows))
    for spec, cfg, compiled, ckpt, flags in rows:
        twin = next((j for j, (b, r) in enumerate(zip(built, rows)) if b[0] is not None and compiled != 'reduce-overhead'
                     and r[1:4] == (cfg, compiled, ckpt)), None)
        if twin is not None:   # its peak: the twin's, with one step's transient memory under this row's switches
            step, peak = built[twin]
            with cvmm_set(rows[twin][4]):
                before = row_peak(step)
            with cvmm_set(flags):
                built.append([step, peak if peak is None else peak - before + row_peak(step)])
            continue
        try:
            with cvmm_set(flags):
                built.append(list(warmed_row(cfg, compiled, train_batch, train_block, ckpt, spec)))
        except ValueError as e:   # as bench_train
            raise SystemExit(f"bench.py: train_models entry {spec!r}: {e}")
    for _ in range(train_repeats):
        for i, row in enumerate(built):
            if row[0] is None:
                continue
            try:
                with cvmm_set(rows[i][4]):
                    times[i].append(time_steps(row[0], 0, train_steps)[0])
                continue
            except torch.OutOfMemoryError:
                pass
            for other in built:    # its twins go too (freed outside the except block: its traceback holds the step)
                if other is not row and other[0] is row[0]:
                    other[0] = None
            row[0], times[i] = None, []
            free_memory()
    return [(statistics.median(t), row[1]) if t and row[0] is not None else None for t, row in zip(times, built)]


def bench_train():
    """ms/step, tokens/s, peak memory and MFU of each model in `train_models` (config files, with
    ':compile' to torch.compile it and '+key=value' overrides, see train_spec), measured in one run;
    ratios against the first entry. A row that runs out of GPU memory says OOM and the rest go on.
    train_repeats > 1: medians of that many interleaved rounds, every model resident (interleaved_train_steps)."""
    from model import flops_per_token
    if not isinstance(train_repeats, int) or train_repeats < 1:
        raise SystemExit(f"bench.py: train_repeats must be a positive integer, got {train_repeats!r}")
    name, peak = peak_tflops()
    rows, base = [], None
    parsed = []
    for spec in train_models.split(","):
        path, compiled, keys, ckpt = train_spec(spec)
        flags = cvmm_flags(spec, keys)
        parsed.append((spec, train_config(spec, path, keys), compiled, ckpt, flags))
    timed = interleaved_train_steps(parsed) if train_repeats > 1 else None
    for i, (spec, cfg, compiled, ckpt, flags) in enumerate(parsed):
        try:
            with cvmm_set(flags):
                ms, mem = ((timed[i] if timed is not None else
                            timed_train_step(cfg, compiled, train_batch, train_block, ckpt, spec)) or (None, None))
        except ValueError as e:   # a model the keys make invalid (halting.build_lm's checks)
            raise SystemExit(f"bench.py: train_models entry {spec!r}: {e}")
        if ms is None:
            alone = timed is None and torch.cuda.is_available()   # with repeats, the other rows were resident
            rows.append([spec, "OOM", "", "", f"> {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f}"
                         if alone else "–", "", "", ""])
            print(rows[-1], flush=True)
            continue
        tok_s = train_batch * train_block / ms * 1e3
        tflops = 3 * flops_per_token(cfg, train_block) * tok_s / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        base = base or (tok_s, mem)
        no_mem = mem is None    # the CPU smoke test: no peak-memory counter
        rows.append([spec, f"{ms:.1f}", f"{tok_s:,.0f}", f"{tok_s / base[0]:.2f}", '–' if no_mem else f"{mem:.1f}",
                     '–' if no_mem else f"{mem / base[1]:.2f}", f"{tflops:.0f}", mfu])
        print(rows[-1], flush=True)
    print(f"\n{name}, {dtype}, batch {train_batch} x {train_block}, vocab {train_vocab}, "
          + (f"medians of {train_repeats} interleaved rounds (peak: a row's own), " if train_repeats > 1 else "") +
          f"MFU vs {peak} TFLOP/s (active FLOPs: 3 x forward FLOPs/token, 2 per multiply-add, incl. attention and LM head)\n")
    table(["model", "ms/step", "tokens/s", "x first", "peak GiB", "x first", "TFLOP/s", "MFU"], rows)


def bench_profile():
    """Where a training step of train_models' first entry spends its time, over 3 profiled steps: every CUDA
    kernel, aggregated by name (kernel_rows), and the host side, op by op (host_rows). A compiled step
    whose host side takes longer than its kernels is bound by the host: CUDA graphs (':reduce-overhead')
    remove that part."""
    spec = train_models.split(",")[0]
    path, compiled, keys, ckpt = train_spec(spec)
    flags = cvmm_flags(spec, keys)
    with cvmm_set(flags):
        profile_step(spec, train_config(spec, path, keys), compiled, ckpt)


def profile_step(spec, cfg, compiled, ckpt):
    """bench_profile's work for one parsed entry (under its cvmm switches)."""
    from torch.profiler import ProfilerActivity, profile
    step, model = train_step(cfg, compiled, train_batch, train_block)
    model.core.activation_checkpointing = ckpt
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = 3
    for _ in range(n):
        step()
    sync()
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda, record_shapes=True) as prof:
        for _ in range(n):
            step()
        sync()
    events = prof.events()
    rows, total, launches = kernel_rows(events, n)
    print(f"\n{spec}, batch {train_batch} x {train_block}, vocab {train_vocab}: "
          f"{total:.1f} ms of CUDA kernels per step, {launches} launches per step\n")
    table(KERNEL_COLUMNS, rows)
    if cuda:
        print("\nby custom op: the σ-MoE and SwitchHead's V and O banks run the same kernels, so the rows above "
              "mix them; here each op's kernels (its contraction included) by op and input shapes\n")
        table(OP_COLUMNS, op_rows(prof, n, total))
    rows, total, calls, wait = host_rows(events, n)
    print(f"\nthe host side: {total:.1f} ms per step inside {calls} op calls (their self time: what an op "
          f"spends outside the ops it calls, e.g. a custom op's Python and its Triton launches; the "
          f"profiler's own cost included), and {wait:.1f} ms per step waiting for the GPU (synchronize)\n")
    table(HOST_COLUMNS, rows)


KERNEL_COLUMNS = ["share", "cumulative", "ms/step", "launches/step", "µs each", "kernel"]   # kernel_rows' cells


def kernel_rows(events, n_steps: int, top: int = 40):
    """(rows, ms per step, launches per step) of the CUDA kernels among profiler events, by total time:
    share, cumulative share, ms and launches per step, mean µs per launch, name (120 characters)."""
    tot, cnt = {}, {}
    for ev in events:
        # GPU-side user annotations (inductor's "## Call CompiledFxGraph ... ##", "Optimizer.step#...") span
        # kernels already counted: not kernels themselves
        if ev.device_type == torch.autograd.DeviceType.CUDA and not getattr(ev, "is_user_annotation", False):
            tot[ev.name] = tot.get(ev.name, 0.0) + ev.device_time
            cnt[ev.name] = cnt.get(ev.name, 0) + 1
    total, rows, acc = sum(tot.values()) or 1.0, [], 0.0
    for name in sorted(tot, key=tot.get, reverse=True)[:top]:
        acc += tot[name]
        rows.append([f"{100 * tot[name] / total:.1f}%", f"{100 * acc / total:.1f}%",
                     f"{tot[name] / n_steps / 1e3:.3f}", f"{cnt[name] / n_steps:g}",
                     f"{tot[name] / cnt[name]:.1f}", name[:120].replace("|", "/")])
    return rows, total / n_steps / 1e3, round(sum(cnt.values()) / n_steps)


OP_COLUMNS = ["share", "ms/step", "calls/step", "op", "input shapes"]   # op_rows' cells


def op_rows(prof, n_steps: int, total_ms: float):
    """The custom ops' (nanomoeut::*) GPU time, grouped by op and input shapes, by time: share of the
    step's kernel time, ms and calls per step, name, the first five input shapes."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key.startswith("nanomoeut::"):
            ms = e.device_time_total / n_steps / 1e3
            shapes = " ".join("x".join(map(str, sh)) for sh in e.input_shapes[:5] if sh)
            rows.append((ms, [f"{100 * ms / (total_ms or 1):.1f}%", f"{ms:.3f}", f"{e.count / n_steps:g}",
                              e.key, shapes]))
    return [r for _, r in sorted(rows, key=lambda t: -t[0])]


HOST_COLUMNS = ["share", "self ms/step", "inclusive ms/step", "calls/step", "self µs each", "op"]   # host_rows'


def host_rows(events, n_steps: int, top: int = 25):
    """(rows, ms per step, calls per step, ms per step waiting for the GPU) of the host side among profiler
    events: each CPU op's self time (inside it, outside the ops it calls), summed by name, per step, by
    self time: share of the total, self and inclusive ms per step, calls per step, mean self µs per call,
    name (120 characters). The CUDA synchronize calls are the host waiting for the GPU, not host work:
    they are left out of the rows and the total and counted apart."""
    own, incl, cnt, wait = {}, {}, {}, 0.0
    for ev in events:
        if ev.device_type != torch.autograd.DeviceType.CPU:
            continue
        if "Synchronize" in ev.name:    # cudaDeviceSynchronize, cudaStreamSynchronize, cudaEventSynchronize
            wait += ev.self_cpu_time_total
            continue
        own[ev.name] = own.get(ev.name, 0.0) + ev.self_cpu_time_total
        incl[ev.name] = incl.get(ev.name, 0.0) + ev.cpu_time_total
        cnt[ev.name] = cnt.get(ev.name, 0) + 1
    total, rows = sum(own.values()) or 1.0, []
    for name in sorted(own, key=own.get, reverse=True)[:top]:
        rows.append([f"{100 * own[name] / total:.1f}%", f"{own[name] / n_steps / 1e3:.3f}",
                     f"{incl[name] / n_steps / 1e3:.3f}", f"{cnt[name] / n_steps:g}",
                     f"{own[name] / cnt[name]:.1f}", name[:120].replace("|", "/")])
    return rows, total / n_steps / 1e3, round(sum(cnt.values()) / n_steps), wait / n_steps / 1e3


@torch.no_grad()
def bench_decode():
    """Greedy decoding of train_models' first entry at a decode_ctx-token context, per generated token:
    the static KV cache (one token per step; CUDA graph as generate() does it, and eager) vs re-running
    the whole decode_ctx-token window for every new token (eager, and as a CUDA graph too, so the
    comparison is not only about launch overhead). Plus generate() end to end (prefill + capture +
    decode_new tokens)."""
    from halting import build_lm
    from model import static_kv_cache
    path = train_models.split(",")[0].partition(":")[0]
    cfg = model_config(path, vocab_size=train_vocab, block_size=decode_ctx + decode_new)
    torch.manual_seed(seed)
    model = build_lm(cfg).to(device).eval()
    low = getattr(torch, dtype)

    def amp():   # autocast without its weight-cast cache (graphs are captured inside it)
        return torch.autocast(device, dtype=low, cache_enabled=False)

    def per_token(B, prompt, graph, precast=True, compile=False):
        with amp():
            f = model._matmul_weights_in_autocast_dtype() if precast else model
            cache = static_kv_cache(cfg.block_size, device)
            f(prompt, kv_cache=cache)
            step, tok = model._decode_step(f, cache, B, graph, compile), prompt[:, -1]

            def run():
                cache['pos'].fill_(decode_ctx)
                for _ in range(decode_new):
                    step(tok)
            return timeit(run) / decode_new

    rows = []
    for B in (1, 16):
        prompt = torch.randint(0, cfg.vocab_size, (B, decode_ctx), device=device)
        ms = {'cached, CUDA graph': per_token(B, prompt, True),
              'cached, CUDA graph, compiled step': per_token(B, prompt, True, compile=True),
              'cached, CUDA graph, weights cast every step': per_token(B, prompt, True, False),
              'cached, eager': per_token(B, prompt, False, False)}

        def full(f=model):
            with amp():
                return f(prompt).logits[:, -1].argmax(-1)
        ms['uncached, eager'] = timeit(full)
        with amp():
            f = model._matmul_weights_in_autocast_dtype()
        ms['uncached, CUDA graph'] = timeit(graphed(lambda: full(f)))
        with amp():
            a = model.generate(prompt, decode_new, temperature=0)
            b = model.generate(prompt, decode_new, temperature=0, cuda_graph=False)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(prompt, decode_new, temperature=0)
            torch.cuda.synchronize()
            e2e = (time.perf_counter() - t0) * 1e3
        print(B, {k: round(v, 2) for k, v in ms.items()}, flush=True)
        for name, t in ms.items():
            rows.append([B, name, f"{t:.2f}", f"{B / t * 1e3:,.0f}", f"{ms['uncached, eager'] / t:.1f}x",
                         f"{ms['uncached, CUDA graph'] / t:.1f}x"])
        rows.append([B, f"generate(), {decode_new} tokens incl. prefill + capture", f"{e2e / decode_new:.2f}",
                     f"{B * decode_new / e2e * 1e3:,.0f}", f"{ms['uncached, eager'] * decode_new / e2e:.1f}x",
                     f"graph = eager tokens: {torch.equal(a, b)}"])
        print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}, {path}, {dtype} autocast, context {decode_ctx}, greedy; "
          f"ms per generated token (per step for the whole batch)\n")
    table(["batch", "decode", "ms/step", "tokens/s", "vs uncached eager", "vs uncached graph"], rows)


# ----------------------------------------------------------------------------------------------------
# per-token dynamic depth (halting.py): step time and peak memory vs the fraction of token-steps skipped
HALTING_SHAPE = dict(d_model=768, n_layers=18, group_size=2, n_heads=4, d_head=96, att_n_experts=10,
                     att_k=2, ff_n_experts=254, ff_k=12, d_expert=128)           # MoEUT-126M
HALTING_SMOKE_SHAPE = dict(d_model=64, n_layers=8, group_size=2, n_heads=2, d_head=16, att_n_experts=4,
                           att_k=2, ff_n_experts=8, ff_k=2, d_expert=16)


def mor_capacities(R, skip):
    """MoR expert-choice capacities c_r = q**r (every token runs step 0, each later step keeps a fixed
    share of the previous one's), q chosen so that the steps skip `skip` of the R·T token-steps."""
    if not 0 <= skip < (R - 1) / R:
        raise ValueError(f"mor_capacities: with step 0 run by every token, R = {R} steps skip between 0 and "
                         f"{(R - 1) / R:.3f} of the token-steps, not {skip}")
    lo, hi = 0.0, 1.0
    for _ in range(60):   # bisection: the mean capacity grows with q
        q = (lo + hi) / 2
        lo, hi = (q, hi) if sum(q ** r for r in range(R)) / R < 1 - skip else (lo, q)
    return tuple(q ** r for r in range(R))


def halting_step(B, seq, vocab, halting='act', skip=None, spread=True, kv='active-only', compile=False,
                 smoke=False, device='cuda', dtype=torch.bfloat16, buckets=0, mode='', whole=False):
    """A fresh MoEUT-126M (HALTING_SMOKE_SHAPE if smoke) and a function running one fwd+bwd on random
    tokens under autocast (off on CPU). skip: forced depths skipping that fraction of the token-steps
    (None: the mechanism decides; halting='none': the plain loop; halting='mor': MoR expert-choice with
    mor_capacities skipping that fraction). compile: torch.compile for the plain model, compile_layers()
    for halting ones (mode: its torch.compile mode, '' = default), or the whole model as one graph with
    whole=True (MoR expert-choice, whose steps keep fixed counts: no host sync). buckets: halt_buckets
    (0 = exact rows). Returns (model, step)."""
    from contextlib import nullcontext
    from halting import build_lm, forced_depths, random_depths
    from model import ModelConfig
    shape = HALTING_SMOKE_SHAPE if smoke else HALTING_SHAPE
    mor = halting == 'mor' and skip is not None   # MoR expert-choice, capacities skipping that fraction
    cfg = ModelConfig(vocab_size=vocab, block_size=seq, halting=halting, mor_gate='none', halt_kv=kv,
                      halt_buckets=buckets if halting != 'none' else 0,
                      mor_capacity=mor_capacities(shape['n_layers'] // shape['group_size'], skip) if mor else (),
                      **shape)
    model = build_lm(cfg).to(device)
    fwd = model
    if compile and (halting == 'none' or whole):
        # static shapes: dynamo's dynamic-size guess is kept per code object, across torch.compile calls, so
        # a second batch size in one run would otherwise compile this baseline for a symbolic batch
        fwd = torch.compile(model, dynamic=False, **({'mode': mode} if mode else {}))
    elif compile:
        model.core.compile_layers(**({'backend': 'aot_eager'} if smoke else {}), **({'mode': mode} if mode else {}))
    idx = torch.randint(0, vocab, (B, seq), device=device)
    depths = None if skip is None or mor else \
        random_depths(B, seq, cfg.n_layers // cfg.group_size, skip, device=device, spread=spread)
    forced = (lambda: forced_depths(model.core, depths)) if depths is not None else nullcontext

    def step():
        with torch.autocast(device, dtype=dtype, enabled=device != 'cpu'), forced():
            loss = fwd(idx, idx).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    return model, step


def halting_table(batches=(8, 32), seq=1024, vocab=8000, iters=10, warmup=3, smoke=False, compile=False,
                  buckets=32, only='', mode=''):
    """fwd+bwd time of MoEUT-126M (spec/moeut.md §8 shapes) with forced depths skipping 0/25/50/75% of
    the token-steps, and MoR expert-choice, vs the plain MoEUT loop in the same run. CUDA events, bf16
    autocast. compile: the plain model under torch.compile, halting ones with compile_layers(), the
    'one graph' rows whole (eager tables run those as the row above them).
    buckets: halt_buckets of the 'bucketed' rows (each step padded to one of that many static shapes,
    compiled with static shapes) beside the same rows with the exact active rows.
    only: '|'-separated parts of row names; runs just the rows containing one (and the plain baseline).
    mode: torch.compile mode of every row, the plain one included (e.g. 'reduce-overhead': CUDA graphs).
    smoke: tiny shapes on the CPU (checks that the table runs)."""
    cuda = torch.cuda.is_available() and not smoke
    dev = 'cuda' if cuda else 'cpu'
    if smoke:
        batches, seq, vocab, iters, warmup = (2,), 64, 97, 2, 1
    # depths spread over 1..R (every step keeps some tokens), except 'tight' (floor/ceil of the mean)
    runs = [('plain MoEUT', 'none', None), ('halting, skip 0%', 'act', 0.0), ('halting, skip 25%', 'act', 0.25),
            ('halting, skip 50%', 'act', 0.5), ('halting, skip 75%', 'act', 0.75),
            ('halting, skip 50% tight', 'act', 0.5), ('halting last-kv, skip 50%', 'act', 0.5),
            ('MoR expert-choice, capacities (R-r)/R', 'mor', None),
            ('MoR expert-choice, skip 50%', 'mor', 0.5), ('MoR expert-choice, skip 50%, one graph', 'mor', 0.5),
            ('halting bucketed, skip 25%', 'act', 0.25), ('halting bucketed, skip 50%', 'act', 0.5),
            ('halting bucketed, skip 75%', 'act', 0.75), ('halting bucketed last-kv, skip 50%', 'act', 0.5)]
    if only:
        runs = [r for r in runs if r[1] == 'none' or any(part in r[0] for part in only.split('|'))]
    print(f"{'compiled' + (f' (mode {mode})' if mode else '') if compile else 'eager'}, bucketed rows: "
          f"halt_buckets={buckets}\n| B×T | run | skipped | "
          f"fwd+bwd ms | speed-up vs plain | peak GiB |\n|---|---|---|---|---|---|")
    for B in batches:
        base_ms = None
        for name, halting, skip in runs:
            torch.manual_seed(0)
            model, one = halting_step(B, seq, vocab, halting, skip, spread='tight' not in name,
                                      kv='last-kv' if 'last-kv' in name else 'active-only', compile=compile,
                                      smoke=smoke, device=dev, buckets=buckets if 'bucketed' in name else 0,
                                      mode=mode, whole='one graph' in name)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            for _ in range(warmup):
                one()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                for _ in range(iters):
                    one()
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end) / iters
                peak = torch.cuda.max_memory_allocated() / 2**30
            else:
                t0 = time.perf_counter()
                for _ in range(iters):
                    one()
                ms, peak = (time.perf_counter() - t0) * 1000 / iters, float('nan')
            skipped = float(model.core.stats['skipped']) if halting != 'none' else 0.0
            base_ms = base_ms or ms
            print(f"| {B}×{seq} | {name} | {skipped:.0%} | {ms:.1f} | {base_ms / ms:.2f}× | {peak:.2f} |")
            del model, one


def bench_halting():
    """MoEUT-126M step time with forced per-token depths (halting_table); --device=cpu: a tiny smoke run."""
    halting_table(batches=tuple(int(b) for b in str(halting_batch).split(',')), compile=halting_compile,
                  smoke=device == "cpu", buckets=halting_buckets, only=halting_only, mode=halting_compile_mode)


def trained_model(ckpt):
    """(model in eval mode on `device`, checkpoint, its path, the val.bin of its dataset, that file's dtype)
    of a train.py checkpoint file or out_dir (its latest)."""
    import os
    import numpy as np
    from checkpoint import latest_checkpoint, load_checkpoint_meta
    from data import parse_dataset
    from halting import build_lm
    from model import ModelConfig
    path = latest_checkpoint(ckpt) if os.path.isdir(ckpt) else ckpt
    if not path or not os.path.isfile(path):
        raise SystemExit(f"bench.py: depth_ckpt={ckpt!r}: no checkpoint file (ckpt_*.pt) there")
    ck = load_checkpoint_meta(path)
    model = build_lm(ModelConfig(**ck['model_config']))
    model.load_state_dict({k.removeprefix('_orig_mod.').removeprefix('module.'): v for k, v in ck['model'].items()})
    model.to(device).eval()
    sources = parse_dataset(ck['config']['dataset'])
    if len(sources) > 1:
        raise SystemExit(f"bench.py: {path} was trained on the mixture {ck['config']['dataset']!r}: this reads "
                         f"one dataset's val split (train.py's per-dataset val losses are in its log.jsonl)")
    return model, ck, path, os.path.join('data', sources[0][0], 'val.bin'), np.dtype(ck['meta']['dtype'])


def val_batches(data, dt, block, windows=None):
    """Batches of 16 (x, y) windows of `block` tokens, spread evenly over the val file, on `device`."""
    import os
    import numpy as np
    from data import read_windows
    n_win = (os.path.getsize(data) // dt.itemsize - 1) // block
    starts = np.linspace(0, n_win - 1, min(windows or depth_windows, n_win)).astype(np.int64) * block
    return [tuple(t.to(device) for t in read_windows(data, dt, starts[i:i + 16], block))
            for i in range(0, len(starts), 16)]


def bench_exit_decode():
    """Per-token exit (models trained without a halting unit, halting.set_depth): greedy decoding with
    the KV cache, tokens/s (median of 3) and mean repeats per generated token, and the validation loss, with exit off
    and at each KL threshold of exit_thresholds, at the trained depth. Rows: 'off' is the plain MoEUT
    decode (a CUDA graph on a GPU); 'KL < 0' runs the exit machinery (halting.py's core, growing
    cache) but never exits, which separates that path's cost from what exiting saves."""
    import numpy as np
    from data import read_windows
    from halting import set_depth
    model, ck, path, data, dt = trained_model(depth_ckpt)
    R, block = model.core.n_repeats, model.cfg.block_size
    if exit_prompt + exit_new > block:
        raise SystemExit(f"bench.py: exit_prompt + exit_new ({exit_prompt + exit_new}) exceed the model's "
                         f"block_size {block}")
    n = (np.memmap(data, dtype=dt, mode='r').shape[0] - 1) // exit_prompt
    starts = np.linspace(0, n - 1, exit_batch).astype(np.int64) * exit_prompt
    prompt = read_windows(data, dt, starts, exit_prompt)[0].to(device)
    batches = val_batches(data, dt, block)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    thresholds = [None, 0.0] + [float(t) for t in str(exit_thresholds).split(",") if t.strip()]
    rows = []
    print(f"{path}: {ck['config']['dataset']}, trained R = {R}, {exit_batch} x ({exit_prompt} prompt + {exit_new} "
          f"greedy) tokens, {device}")
    for t in thresholds:
        set_depth(model, exit_threshold=t)
        with torch.no_grad():
            model.generate(prompt, 4, temperature=0.0)                      # warm-up (graph capture on CUDA)
            times = []
            for _ in range(3):   # the median of 3
                sync()
                t0 = time.perf_counter()
                out = model.generate(prompt, exit_new, temperature=0.0)
                sync()
                times.append(time.perf_counter() - t0)
            secs = statistics.median(times)
            if t is None:
                depth = float(R)
            else:   # the cached decode equals the full forward (halting.py), so read the depths off one
                model(out)
                depth = model.core.trace['depth'][:, exit_prompt:].float().mean().item()
            loss = sum(model(x, y).ce.item() * x.shape[0] for x, y in batches) / sum(x.shape[0] for x, _ in batches)
        rows.append(["off (plain MoEUT decode)" if t is None else f"KL < {t:g}", f"{exit_batch * exit_new / secs:,.0f}",
                     f"{depth:.2f} of {R}", f"{loss:.4f}"])
        print(rows[-1], flush=True)
    table(["exit", "decode tokens/s", "mean repeats per generated token", "val loss"], rows)


def bench_depth_curve():
    """Validation loss against the repeats run at inference (1 .. 2R) of a trained looped model: the
    curve of spec/recurrence.md (halting.depth_curve). For the synthetic addition data, also the mean
    depth per difficulty of the position (synthetic.py)."""
    import numpy as np
    from halting import depth_curve, set_depth
    model, ck, path, data, dt = trained_model(depth_ckpt)
    if depth_exit >= 0:
        set_depth(model, exit_threshold=depth_exit)
    block, batches = model.cfg.block_size, val_batches(data, dt, model.cfg.block_size)
    R = model.core.n_repeats
    print(f"{path}: {ck['config']['dataset']}, {sum(x.shape[0] for x, _ in batches)} windows of {block} tokens"
          + (f", per-token exit at KL < {depth_exit}" if depth_exit >= 0 else ''))
    depth_curve(model, batches, range(1, (depth_max or 2 * R) + 1), plot=depth_plot)
    if ck['config']['dataset'] == 'addition' and hasattr(model.core, 'trace'):
        import synthetic
        ids = np.memmap(data, dtype=dt, mode='r')[:depth_windows * block].tolist()
        set_depth(model, exit_threshold=depth_exit if depth_exit >= 0 else None)
        by = synthetic.depth_by_difficulty(model.cpu(), ids, block)
        print("mean depth by difficulty (0 random digit / end, 1 sum digit, 2 sum digit with a carry in): "
              + ", ".join(f"{lab}: {d:.2f} ({n} tokens)" for lab, (d, n) in by.items()))


def bench_halting_profile():
    """Is a halting step GPU- or host-bound? Wall time vs summed CUDA kernel time of MoEUT-126M fwd+bwd
    at halting_batch x 1024 with halting_skip of the token-steps skipped (halt_buckets=halting_buckets,
    halting_compile / halting_compile_mode as the table's), then the top kernels and the top ops by CPU
    time (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile
    B, skip, T = int(str(halting_batch).split(",")[0]), float(halting_skip), train_block
    cpu = device == "cpu"
    torch.manual_seed(seed)
    _, one = halting_step(B, T, 8000, "act" if skip >= 0 else "none", skip if skip >= 0 else None,
                          compile=halting_compile, smoke=cpu, device=device, dtype=getattr(torch, dtype),
                          buckets=halting_buckets if skip >= 0 else 0, mode=halting_compile_mode)
    n = 1 if cpu else 3
    for _ in range(n + 1):
        one()
    sync = torch.cuda.synchronize if not cpu else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        one()
    sync()
    wall = (time.perf_counter() - t0) / n * 1e3
    acts = [ProfilerActivity.CPU] + ([] if cpu else [ProfilerActivity.CUDA])
    with profile(activities=acts) as prof:
        for _ in range(n):
            one()
        sync()
    ka = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in ka if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"{B}x{T}, skip {skip:.0%}{' (plain loop)' if skip < 0 else f', halt_buckets={halting_buckets}'}, "
          f"{('compiled' + (f' ({halting_compile_mode})' if halting_compile_mode else '')) if halting_compile else 'eager'}: "
          f"{wall:.1f} ms per step (wall), {gpu / n / 1e3:.1f} ms of CUDA kernels per step (profiled)\n")
    if not cpu:
        rows, _, launches = kernel_rows(prof.events(), n, top=30)
        print(f"{launches} kernel launches per step")
        table(KERNEL_COLUMNS, rows)
    print(ka.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))


# ----------------------------------------------------------------------------------------------------
# ablation of the routing and attention options (docs/options.md): one train.py run per variant, same
# seed, data and steps, read back from each run's log.jsonl into one markdown table
ABLATION_SMOKE_SHAPE = dict(d_model=32, n_layers=4, group_size=2, n_heads=2, d_head=16, att_n_experts=4,
                            att_k=2, ff_n_experts=8, ff_k=2, d_expert=16)


def ablation_rows(shape):
    """(name, {key: value}) of every variant of a base model of this shape (ff_n_experts, ff_k, n_heads,
    n_layers, group_size); 'paper' (the entropy regularisers, nothing else) first: the others' baseline.
    The other balancing methods run alone (both entropy regularisers off), as docs/options.md says to
    compare them. Null experts at 10% and 40% of E; the top-k schedule falls linearly over the repeats
    from 4k/3 to 2k/3 with the same mean k (the same expert compute)."""
    E, k, R = shape['ff_n_experts'], shape['ff_k'], shape['n_layers'] // shape['group_size']
    alone = dict(entropy_reg=0.0, att_entropy_reg=0.0)
    ks = [max(1, round(k * (4 / 3 - 2 / 3 * i / max(1, R - 1)))) for i in range(R)]
    ks[R // 2] += R * k - sum(ks)
    return [('paper', {}),
            ('aux_free', dict(moe_balance='aux_free', **alone)),
            ('switch', dict(moe_balance='switch', **alone)),
            ('global', dict(moe_balance='global', **alone)),
            ('shared', dict(ff_n_shared=1)),
            ('null10', dict(ff_n_null=max(1, round(0.1 * E)))),
            ('null40', dict(ff_n_null=max(1, round(0.4 * E)))),
            ('k_schedule', dict(ff_k_schedule=tuple(ks))),
            ('conv_router', dict(router_type='conv')),
            ('gqa', dict(n_kv_heads=max(1, shape['n_heads'] // 2))),
            ('qk_norm', dict(qk_norm=True)),
            ('ssmax', dict(ssmax=True))]


def ablation_arg(key, value):
    """--key=value as configurator.py reads it back (a tuple without spaces: one argv entry)."""
    if isinstance(value, tuple):
        value = '(' + ','.join(map(str, value)) + (',)' if len(value) == 1 else ')')
    return f"--{key}={value}"


def ablation_setup(smoke):
    """(train.py args shared by every variant, the base model's shape, a line describing the runs)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"bench.py: device={device!r} but CUDA is not available (--device=cpu runs the smoke version)")
    ds = ablation_dataset or ('shakespeare_bytes' if smoke else 'shakespeare')
    if smoke:
        iters, batch, block, log, evals = 4, 4, 32, 2, 2
        base = [ablation_arg(k, v) for k, v in ABLATION_SMOKE_SHAPE.items()]
        shape = dict(ABLATION_SMOKE_SHAPE)
    else:
        iters, batch, block = ablation_iters, ablation_batch, ablation_block
        log, evals = ablation_log, ablation_eval_iters
        import train
        from configurator import ConfigError, apply_overrides
        shape = {k: getattr(train, k) for k in ('ff_n_experts', 'ff_k', 'n_heads', 'n_layers', 'group_size')}
        try:        # the shape the runs will have: train.py's defaults, then the config file
            apply_overrides(shape, [ablation_config], ignore_unknown_file_keys=True)
        except ConfigError as e:
            raise SystemExit(f"bench.py: ablation_config: {e}")
        base = [ablation_config]
    for k, v in (('ablation_iters', iters), ('ablation_batch', batch), ('ablation_block', block),
                 ('ablation_log', log), ('ablation_eval_iters', evals)):
        if not isinstance(v, int) or v < 1:
            raise SystemExit(f"bench.py: {k} must be a positive integer, got {v!r}")
    if iters % log:     # the last log record (its routing, with the usage grid) must be the last step's
        raise SystemExit(f"bench.py: ablation_iters ({iters}) must be a multiple of ablation_log ({log})")
    # train.py would prepare a missing Shakespeare set itself, but a missing tokenizer package would then
    # fail every variant in turn: do it once here (timing runs need no data)
    if not ablation_timing:
        from data import AUTO_DATASETS, ensure_data
        try:
            ensure_data({'dataset': ds, 'block_size': block}, {'master': True, 'distributed': False})
        except SystemExit as e:
            hint = f"; or copy data/{ds} from a machine where it is prepared" if ds in AUTO_DATASETS else ""
            raise SystemExit(f"bench.py: {e}{hint}")
    lr = float(ablation_lr)
    common = base + [f"--dataset={ds}", f"--device={device}", f"--max_iters={iters}",
                     f"--lr_decay_iters={iters}", f"--warmup_iters={min(10, iters // 4)}", f"--learning_rate={lr}",
                     f"--min_lr={lr / 10}", f"--eval_interval={iters}", f"--eval_iters={evals}",
                     f"--log_interval={log}", f"--batch_size={batch}", f"--total_batch_size={batch}",
                     f"--block_size={block}", "--diagnostics=True", "--wandb_log=False", "--overwrite=True",
                     "--init_from=scratch"]
    if not device.startswith("cpu"):
        common.append(f"--dtype={dtype}")
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else device
    about = (f"{'smoke shape' if smoke else ablation_config}, data/{ds}, {iters} steps of {batch} x {block} tokens, "
             f"lr {lr:g} ({min(10, iters // 4)} warmup steps, cosine to {lr / 10:g}), seed {seed}; {gpu}, "
             f"torch {torch.__version__}, {'float32' if device.startswith('cpu') else dtype}; "
             f"{time.strftime('%Y-%m-%d')}")
    return common, shape, about


def ablation_start(args, out):
    """Starts train.py with args into out_dir `out` (its output in out/train.log). Returns
    (process, start time, log path)."""
    import os
    import subprocess
    import sys
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, 'train.log')
    train_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')
    with open(log, 'w') as f:
        p = subprocess.Popen([sys.executable, train_py, *args, f"--out_dir={out}"], stdout=f,
                             stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED='1'))
    return p, time.time(), log


def ablation_finish(p, t0, log):
    """Waits for a run of ablation_start. Returns (seconds, None) or (seconds, the last line it printed)
    when it failed."""
    p.wait()
    wall = time.time() - t0
    if p.returncode == 0:
        return wall, None
    with open(log, errors='replace') as f:
        lines = [line.strip() for line in f if line.strip()]
    return wall, f"exit {p.returncode}: {lines[-1] if lines else 'no output'} (see {log})"


def ablation_metrics(out, n_experts):
    """What a finished run logged: final val loss; tokens/s, the median of the log intervals after the
    first (which holds the step-0 eval, compilation and kernel builds); and the routing of its last log
    interval: σ-MoE balance over the E real experts (usage entropy / log E and the busiest expert's
    load over the fair share, from the usage grid logged with it), real experts with no picks, the
    share of picks that went to null experts, SwitchHead V/O balance and dead experts (as logged)."""
    import math
    from plot import read_log
    recs = read_log(out)
    train = [r for r in recs if 'train/loss' in r]
    val = [r['val/loss'] for r in recs if 'val/loss' in r]
    if not train or len(val) < 2:
        return None
    last = train[-1]
    m = {'val': val[-1], 'tps': statistics.median(r['tokens_per_s'] for r in train[1:] or train)}
    ent, load, dead = [], [], 0
    for key, grid in sorted(last.get('usage', {}).items()):
        if key.startswith('ff'):
            u = [x for row in grid for x in row][:n_experts]    # fair-share multiples; null ids come after E
            tot = sum(u)
            p = [x / tot for x in u if x > 0]
            ent.append(-sum(x * math.log(x) for x in p) / math.log(n_experts) if n_experts > 1 else 1.0)
            load.append(max(u) * n_experts / tot)
            dead += sum(x == 0 for x in u)
    if ent:
        m.update(ff_balance=statistics.mean(ent), ff_load=max(load), ff_dead=dead)
    nulls = [v for k, v in last.items() if k.startswith('null/ff')]
    if nulls:
        m['null'] = statistics.mean(nulls)
    att = [v for k, v in last.items() if k.startswith(('balance/v', 'balance/o'))]
    if att:
        m['att_balance'] = statistics.mean(att)
        m['att_dead'] = sum(v for k, v in last.items() if k.startswith(('dead/v', 'dead/o')))
    return m


def ablation_table(rows):
    """The markdown table of ablation rows: (name, keys set, seconds, metrics or the reason it failed)."""
    header = ["variant", "keys set", "val loss", "Δ val", "tokens/s", "× paper", "ff balance", "ff max/fair",
              "ff dead", "null picks", "att balance", "att dead", "wall s"]
    got = {name: m for name, _, _, m in rows if isinstance(m, dict)}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, keys, wall, m in rows:
        if not isinstance(m, dict):
            cells = [name, keys or "(baseline)", "failed: " + str(m).replace("|", "/")]
            cells += [""] * (len(header) - 4) + [f"{wall:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        # the baseline: paper with the same compile flag and seed where that ran; paper@S itself, and a
        # seeded row whose paper@S did not run, against the first seed's paper (then marked *)
        head, at, tail = name.partition('@')
        variant, flag = head.removesuffix('+compile'), '+compile' if head.endswith('+compile') else ''
        base = got.get('paper' + flag + at + tail) if at and variant != 'paper' else None
        mark = '*' if at and variant != 'paper' and base is None else ''
        base = base or got.get('paper' + flag)
        f = lambda key, fmt: format(m[key], fmt) if key in m else '–'   # noqa: E731
        lines.append("| " + " | ".join([
            name, keys or '(baseline)', f"{m['val']:.4f}", f"{m['val'] - base['val']:+.4f}{mark}" if base else '–',
            f"{m['tps']:,.0f}", f"{m['tps'] / base['tps']:.2f}{mark}" if base else '–', f('ff_balance', '.4f'),
            f('ff_load', '.2f'), f('ff_dead', 'd'), f('null', '.3f'), f('att_balance', '.4f'), f('att_dead', 'd'),
            f"{wall:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def ablation_plan(variants):
    """The runs ablation_variants / ablation_compiled ask for: [(label, variant, compiled, seed)]. An entry
    'name@S' runs the variant with seed S (label 'name@S', e.g. paper@1338 to see the seed noise)."""
    def parse(entry):
        name, at, s = entry.partition('@')
        if name not in variants:
            raise SystemExit(f"bench.py: unknown ablation variant {name!r}: choose from {', '.join(variants)}")
        if at and not (s.isascii() and s.isdecimal()):
            raise SystemExit(f"bench.py: ablation entry {entry!r}: the seed after '@' must be an integer")
        return name, int(s) if at else seed, at + s

    def listed(text):
        return [v for e in str(text).split(",") if e for v in (variants if e == "all" else [e])]
    runs = []
    for comp, group in ((False, listed(ablation_variants)), (True, listed(ablation_compiled))):
        for e in group:
            name, s, tail = parse(e)
            runs.append((name + ("+compile" if comp else "") + tail, name, comp, s))
    if not runs:
        raise SystemExit(f"bench.py: no ablation variant chosen: choose from {', '.join(variants)}")
    labels = [r[0] for r in runs]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:   # one out_dir per label: a repeated run would overwrite the other's log and checkpoints
        raise SystemExit(f"bench.py: ablation runs listed twice: {', '.join(twice)} (name@seed runs another seed)")
    return runs


def allow_recompiles(rows):
    """Every row compiles the same forward code for another config, and all stay alive for the rounds: past
    dynamo's default limit the later rows would run eager without saying so in the table."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * rows)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 64 * rows)


def row_peak(step):
    """The GiB one more step of a warmed-up model allocates above what was allocated before it (its
    transient memory; interleaved_train_steps compares twins by it); None off CUDA."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - resident) / 2**30


def warmed_row(cfg, compiled, batch, block, ckpt=False, spec=None):
    """(step, its own peak GiB or None off CUDA) of a fresh model's train_step, compiled and warmed up, or
    (None, None) when it runs out of GPU memory. The peak: one step after the warm-up (compilation and
    CUDA-graph recording left out), less what was allocated before this row was built. ckpt and spec as
    timed_train_step's."""
    cuda = device.startswith("cuda")
    step = model = None
    try:
        resident = torch.cuda.memory_allocated() if cuda else 0    # the rows built before this one
        step, model = train_step(cfg, compiled, batch, block)
        model.core.activation_checkpointing = ckpt
        for _ in range(5 if compiled else 3):
            step()
        if spec is not None:
            null_share(spec, model)
        if not cuda:
            return step, None
        return step, (torch.cuda.memory_allocated() - resident) / 2**30 + row_peak(step)   # model + one step
    except torch.OutOfMemoryError:
        pass
    step = model = None     # outside the except block, whose traceback would keep the activations alive
    free_memory()
    return None, None


def ablation_timing_table(runs, variants, smoke):
    """ms per training step (fwd + bwd + AdamW, bf16 on CUDA) of every planned run, in this process, so the
    ratios to paper (paper+compile for compiled rows) come from one run. Every row is built, compiled and
    warmed first; then ablation_rounds rounds time each row's train_steps in turn, and a row's ms is its
    median round, so drift and a background compile hit every row alike, and the spread column says how
    far a row's rounds disagree (a gap between rows smaller than it is noise). Rows with '@seed' are the
    same model and are timed once per row anyway. The model: ablation_config (the smoke shape on the CPU)
    with each variant's keys, ablation_batch x ablation_block tokens, vocabulary train_vocab (smoke: 256)."""
    import statistics
    batch, block = (4, 32) if smoke else (ablation_batch, ablation_block)
    vocab = 256 if smoke else train_vocab
    cuda = device.startswith("cuda")
    allow_recompiles(len(runs))
    built = []      # (label, step or None when out of memory, the row's own peak GiB or None)
    for label, name, comp, _ in runs:
        keys = variants[name]
        try:
            if smoke:
                from model import ModelConfig
                cfg = ModelConfig(vocab_size=vocab, block_size=block, **ABLATION_SMOKE_SHAPE, **keys)
            else:
                cfg = model_config(ablation_config, vocab_size=vocab, block_size=block, **keys)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"bench.py: ablation variant {label!r}: {e}")
        print(f"{label}: {'compiling and ' if comp else ''}warming up ...", flush=True)
        built.append((label, *warmed_row(cfg, comp and (ablation_compile_mode or True), batch, block)))
    times = {label: [] for label, _, _ in built}
    for r in range(ablation_rounds):
        for i, (label, step, mem) in enumerate(built):
            if step is None:
                continue
            try:
                times[label].append(time_steps(step, 0, train_steps)[0])
                continue
            except torch.OutOfMemoryError:   # with every other row's model resident (see the table's title)
                pass
            built[i], times[label], step = (label, None, mem), [], None    # freed outside the except block
            free_memory()
        print(f"round {r + 1}/{ablation_rounds}: " + ", ".join(
            f"{label} {t[-1]:.1f} ms" for label, t in times.items() if t), flush=True)   # a cut-short sweep keeps it
    ms_of = {label: statistics.median(t) for label, t in times.items() if t}
    rows = []
    for label, _, mem in built:
        base = ms_of.get('paper+compile' if '+compile' in label else 'paper')
        ms = ms_of.get(label)
        if ms is None:
            rows.append([label, "OOM", "", "", "", ""])
            continue
        spread = (max(times[label]) - min(times[label])) / ms * 100
        rows.append([label, f"{ms:.1f}", f"{batch * block / ms * 1e3:,.0f}", f"{base / ms:.2f}" if base else '–',
                     f"{spread:.1f}%", '–' if mem is None else f"{mem:.1f}"])
    gpu = torch.cuda.get_device_name() if cuda else device
    print(f"\n{'smoke shape' if smoke else ablation_config}, {batch} x {block} tokens, vocabulary {vocab}, "
          f"{gpu}, {dtype} autocast, {'compile mode ' + ablation_compile_mode + ', ' if ablation_compile_mode else ''}"
          f"one process, every row's model resident: the median of {ablation_rounds} interleaved rounds of "
          f"{train_steps} steps per row; peak GiB: a row's own, over one step after its warm-up; "
          f"{time.strftime('%Y-%m-%d')}\n")
    table(["variant", "ms/step", "tokens/s", "× paper", "spread", "peak GiB"], rows)


def bench_ablation():
    """The routing and attention options against the paper's MoEUT (docs/options.md, 'Ablation'): train.py
    once per variant (ablation_rows; ablation_variants picks some, 'name@seed' another seed) from
    ablation_config, same seed, data and steps, eager (ablation_compiled: some again compiled), each in
    its own out_dir under ablation_out, ablation_parallel of them at once on the device; then one
    markdown table from their log.jsonl files, printed and written to ablation_out/ablation.md
    (rewritten after every run, so a cut-short sweep keeps what it measured).
    --device=cpu or --ablation_smoke=True: a tiny model for 4 steps (a check that it all runs).
    ablation_timing=True: no training, each run's step timed in this process instead (ablation_timing_table)."""
    import os
    smoke = bool(ablation_smoke) or device.startswith("cpu")
    if not isinstance(ablation_parallel, int) or ablation_parallel < 1:
        raise SystemExit(f"bench.py: ablation_parallel must be a positive integer, got {ablation_parallel!r}")
    if not isinstance(ablation_rounds, int) or ablation_rounds < 1:
        raise SystemExit(f"bench.py: ablation_rounds must be a positive integer, got {ablation_rounds!r}")
    from train import COMPILE_MODES   # the modes train.py, which runs every row, offers
    if ablation_compile_mode not in COMPILE_MODES:
        raise SystemExit(f"bench.py: ablation_compile_mode must be one of {', '.join(map(repr, COMPILE_MODES))}, "
                         f"got {ablation_compile_mode!r}")
    common, shape, about = ablation_setup(smoke)
    variants = dict(ablation_rows(shape))
    runs = ablation_plan(variants)
    if ablation_timing:
        return ablation_timing_table(runs, variants, smoke)
    os.makedirs(ablation_out, exist_ok=True)
    table_path = os.path.join(ablation_out, "ablation.md")
    shared = (f"; {ablation_parallel} runs at a time shared the device, so tokens/s is not a speed comparison"
              if ablation_parallel > 1 and len(runs) > 1 else "")
    print(f"ablation: {len(runs)} run(s), {about}{shared}", flush=True)
    rows, pending, started, text = [None] * len(runs), {}, 0, ""
    try:
        while started < len(runs) or pending:
            while len(pending) < ablation_parallel and started < len(runs):
                label, name, comp, s = runs[started]
                args = common + [ablation_arg(k, v) for k, v in variants[name].items()] + \
                    [f"--compile={comp}", f"--seed={s}"] + \
                    ([f"--compile_mode={ablation_compile_mode}"] if comp and ablation_compile_mode else [])
                pending[started] = ablation_start(args, os.path.join(ablation_out, label))
                started += 1
            done = [i for i in sorted(pending) if pending[i][0].poll() is not None]
            if not done:
                time.sleep(0.2)
                continue
            i = done[0]
            wall, err = ablation_finish(*pending.pop(i))
            label, name, _, _ = runs[i]
            m = err or ablation_metrics(os.path.join(ablation_out, label), shape['ff_n_experts']) or \
                "no val loss in its log.jsonl"
            rows[i] = (label, " ".join(ablation_arg(k, v)[2:] for k, v in variants[name].items()), wall, m)
            table = ablation_table([r for r in rows if r is not None])
            line = next(x for x in table.splitlines() if x.startswith(f"| {label} |"))
            print(f"[{sum(r is not None for r in rows)}/{len(runs)}] {label}, {wall:.0f} s: {line}", flush=True)
            text = f"{about}; eager (rows +compile: torch.compile){shared}\n\n" + table
            with open(table_path + ".tmp", "w") as f:
                f.write(text)
            os.replace(table_path + ".tmp", table_path)
    finally:    # an error or Ctrl-C here must not leave runs training with nobody to read them
        for p, _, _ in pending.values():
            p.terminate()
            p.wait()
    print("\n" + text)
    print(f"(written to {table_path})")


if __name__ == "__main__":
    fn = globals().get(f"bench_{what}")
    if fn is None:
        raise SystemExit(f"bench.py: unknown --what={what!r}; have "
                         f"{[k[6:] for k in globals() if k.startswith('bench_')]}")
    t0 = time.time()
    fn()
    print(f"({what} took {time.time() - t0:.0f} s)")

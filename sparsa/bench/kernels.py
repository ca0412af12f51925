"""Micro-benchmark of the native quantized kernels against torch's ops.

    sparsa bench kernels [--n 8192 --k 4096 --threads 2 --rows 1,2,4,8]
                                           [--moe-dram-layers 8]

Prints weight bandwidth (GB/s of weight bytes read, the figure that bounds decode) for the
int8 and int4 GEMV/small-GEMM kernels beside torch's ``_weight_int8pack_mm`` (bf16 path),
``_weight_int4pack_mm_for_cpu`` and fp32 ``F.linear``, the fused MoE op on mixtral-mini's
expert shapes, and the crossover against dequantize + fp32 GEMM. Best of several repeats
(the CPU may be shared).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from sparsa.kernels import available, ops
from sparsa.layers.quantization.matmul import int4_matmul_reference, int8_matmul_reference
from sparsa.layers.quantization.schemes import quantize_int4_packed, quantize_int8_padded


def best_time(fn: Callable[[], object], min_time: float = 0.3, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt > min_time / repeats:
                break
        best = min(best, dt / n)
    return best


def bench_gemv(n: int, k: int, rows: list[int], group: int) -> None:
    w = torch.randn(n, k) * 0.02
    q8, s8 = quantize_int8_padded(w)
    q4, sm = quantize_int4_packed(w, group, clip_search=False)
    b8, b4 = q8.numel() + 4 * n, q4.numel() + 2 * sm.numel()
    wf = w.contiguous()
    s8b = s8.to(torch.bfloat16)
    # torch's int4 layout: pack once from the same int4 values
    q4t = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.randint(0, 16, (n, k), dtype=torch.int32), group)
    szt = torch.rand(k // group, n, 2).to(torch.bfloat16)
    print(f"weight {n}x{k}: int8 {b8 / 1e6:.1f} MB, int4 (G{group}) {b4 / 1e6:.1f} MB, "
          f"fp32 {4 * n * k / 1e6:.1f} MB; GB/s = weight bytes / time")
    print(f"{'T':>3} {'ours int8':>10} {'exact int8':>10} {'torch int8':>10} {'ours int4':>10} "
          f"{'torch int4':>10} {'fp32 linear':>11} {'deq8+gemm':>10} {'deq4+gemm':>10}")
    kp8 = q8.shape[1]
    cases = [  # (bytes read, op(x fp32, x bf16))
        (b8, lambda x, xb: ops.int8_gemm(x, q8, s8)),
        (b8, lambda x, xb: ops.int8_gemm(x, q8, s8, exact=True)),
        (b8, lambda x, xb: torch.ops.aten._weight_int8pack_mm(xb, q8, s8b)),
        (b4, lambda x, xb: ops.int4_gemm(x, q4, sm, group)),
        (b4, lambda x, xb: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, q4t, group, szt)),
        (4 * n * k, lambda x, xb: F.linear(x, wf)),
        (b8, lambda x, xb: int8_matmul_reference(F.pad(x, (0, kp8 - k)), q8, s8)),
        (b4, lambda x, xb: int4_matmul_reference(x, q4, sm, group)),
    ]
    for t in rows:
        x = torch.randn(t, k)
        xb = x.to(torch.bfloat16)
        r = [nbytes / best_time(lambda f=f, x=x, xb=xb: f(x, xb)) for nbytes, f in cases]
        print(f"{t:>3} " + " ".join(f"{v / 1e9:>10.1f}" for v in r))


def bench_moe(hidden: int, inter: int, experts: int, top_k: int, group: int,
              rows: list[int]) -> None:
    w13 = torch.randn(experts, 2 * inter, hidden) * 0.02
    w2 = torch.randn(experts, hidden, inter) * 0.02
    p8 = [quantize_int8_padded(w13[e]) + quantize_int8_padded(w2[e]) for e in range(experts)]
    p4 = [quantize_int4_packed(w13[e], group, False) + quantize_int4_packed(w2[e], group, False)
          for e in range(experts)]
    t8 = [torch.stack([p[i] for p in p8]) for i in range(4)]
    t4 = [torch.stack([p[i] for p in p4]) for i in range(4)]
    per8 = sum(t[0].numel() * t.element_size() for t in t8)  # bytes of one expert
    per4 = sum(t[0].numel() * t.element_size() for t in t4)
    print(f"fused MoE, {experts} experts top-{top_k}, hidden {hidden}, ffn {inter}: "
          f"GB/s of the active experts' bytes")
    for t in rows:
        x = torch.randn(t, hidden)
        ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(t)])
        tw = torch.rand(t, top_k)
        active = len(set(ids.flatten().tolist()))
        args = (x, ids, tw)
        d8 = best_time(lambda a=args: ops.moe_int8(a[0], *t8, a[1], a[2]))
        d4 = best_time(lambda a=args: ops.moe_int4(a[0], *t4, group, a[1], a[2]))
        print(f"  T={t:>2}: int8 {active * per8 / d8 / 1e9:5.1f} GB/s ({d8 * 1e3:.2f} ms), "
              f"int4 {active * per4 / d4 / 1e9:5.1f} GB/s ({d4 * 1e3:.2f} ms)")


def bench_moe_dram(hidden: int, inter: int, experts: int, top_k: int, group: int,
                   layers: int) -> None:
    """Batch-1 fused MoE with the weights coming from DRAM, as in a decode step: `layers`
    independent expert sets (more bytes than the L3 holds) called one after another."""
    torch.manual_seed(0)
    sets8, sets4 = [], []
    for _ in range(layers):
        w13 = torch.randn(experts, 2 * inter, hidden) * 0.02
        w2 = torch.randn(experts, hidden, inter) * 0.02
        p8 = [quantize_int8_padded(w13[e]) + quantize_int8_padded(w2[e]) for e in range(experts)]
        p4 = [quantize_int4_packed(w13[e], group, False) + quantize_int4_packed(w2[e], group,
                                                                                False)
              for e in range(experts)]
        sets8.append([torch.stack([p[i] for p in p8]) for i in range(4)])
        sets4.append([torch.stack([p[i] for p in p4]) for i in range(4)])
    x = torch.randn(1, hidden)
    ids = torch.randperm(experts)[:top_k][None]
    tw = torch.full((1, top_k), 1.0 / top_k)
    for name, sets, call in (
            ("int8", sets8, lambda t: ops.moe_int8(x, *t, ids, tw)),
            ("int4", sets4, lambda t: ops.moe_int4(x, t[0], t[1], t[2], t[3], group, ids, tw))):
        active = top_k * sum(t[0].numel() * t.element_size() for t in sets[0])
        d = best_time(lambda sets=sets, call=call: [call(t) for t in sets]) / layers
        print(f"  {name}: {d * 1e6:.0f} us per layer, {active / d / 1e9:.1f} GB/s "
              f"of active expert bytes from DRAM ({layers} layers in turn)")


def bench_roofline(threads: list[int], rounds: int = 5) -> None:
    """Batch-1 GEMV weight bandwidth of each tile instruction set this CPU runs (AVX2,
    AVX-VNNI, AVX-512 VNNI) as a share of the native read probe at the same thread count,
    interleaved round by round (the box's bandwidth drifts); weights from DRAM."""
    import statistics

    from sparsa.kernels import load, tuning

    ext = load()
    start = ext.vnni()
    isas = [(0, "AVX2")]
    for mode, name in ((1, "AVX-512 VNNI"), (2, "AVX-VNNI")):
        try:
            ext.set_vnni_mode(mode)
            isas.append((mode, name))
        except RuntimeError:  # not on this CPU
            pass
    ext.set_vnni_mode(start)
    gen = torch.Generator().manual_seed(0)
    slots = ("int8", "int8_short", "int4", "int4_short")
    sets = {s: tuning.gemv_sets(s, gen) for s in slots}
    buf = torch.ones(1 << 30, dtype=torch.uint8)
    print(f"GEMV weight GB/s (median of {rounds}) and share of the native read probe at the "
          f"same threads; tuning {tuning.current(ext)}")
    try:
        for th in threads:
            torch.set_num_threads(th)
            read, rates = [], {}
            ext.read_bandwidth(buf, th)
            for _ in range(rounds):
                read.append(buf.numel() / ext.read_bandwidth(buf, th) / 1e9)
                for mode, name in isas:
                    ext.set_vnni_mode(mode)
                    for s in slots:
                        rates.setdefault((name, s), []).append(tuning.gemv_pass(s, sets[s]))
            rd = statistics.median(read)
            print(f"threads {th}: read probe {rd:.1f} GB/s ({min(read):.1f}-{max(read):.1f})")
            for _, name in isas:
                cells = "  ".join(f"{s} {statistics.median(rates[(name, s)]):5.1f} "
                                  f"({statistics.median(rates[(name, s)]) / rd:4.0%})"
                                  for s in slots)
                print(f"  {name:<13} {cells}")
    finally:
        ext.set_vnni_mode(start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,2,4,8,16")
    p.add_argument("--skip-moe", action="store_true")
    p.add_argument("--moe-dram-layers", type=int, default=0,
                   help="also time batch-1 MoE over this many expert sets in turn (weights "
                        "from DRAM), on the mixtral-mini and Qwen3-MoE-mini shapes")
    p.add_argument("--roofline", action="store_true",
                   help="only this: batch-1 GEMV bandwidth of each tile instruction set as a "
                        "share of the native read probe, at 1 and --threads threads")
    args = p.parse_args(argv)
    if not available():
        raise SystemExit("native kernels unavailable (see sparsa.kernels.unavailable_reason)")
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    if args.roofline:
        bench_roofline(sorted({1, args.threads}))
        return
    print(f"threads {args.threads}, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    bench_gemv(args.n, args.k, rows, args.group)
    if not args.skip_moe:
        bench_moe(1024, 2816, 8, 2, args.group, [1, 2, 4, 8])
    if args.moe_dram_layers:
        for shape in ((1024, 2816, 8, 2), (1024, 384, 64, 8)):
            print("fused MoE from DRAM, hidden {}, ffn {}, {} experts top-{}".format(*shape))
            bench_moe_dram(*shape, args.group, args.moe_dram_layers)


if __name__ == "__main__":
    main()

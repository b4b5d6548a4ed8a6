#!/usr/bin/env python3
"""Decode-attention latency: gsrq fused kernels vs fp16 SDPA (and flash-attn) at LLaMA-3-8B shapes.

One layer, one decode step: 32 query heads, 8 KV heads, head_dim 128, batch
1/8/32, contexts 4k..128k, GSRQ at 1 bit and 0.5 bit (GSRQConfig.from_bits:
D=64, Kc=256, M=8 / M=4; 4 exact sink tokens, everything else coded). Times
are CUDA-event medians over many iterations on torch's current stream. GB/s
columns: bytes of the cache read per step divided by the time ("KV GB/s": the
bytes each method actually stores; "fp16-equiv GB/s": the fp16 cache size over
the gsrq time, i.e. how fast the same context is attended). The encode column
is the fused RQ encode kernel for one decode step's new keys *and* values
(batch tokens x 8 heads).

Usage:
    python benches/bench_decode_attention.py [--batch 1,8,32] [--ctx 4096,...] [--bits 1,0.5]
        [--iters 50] [--budget 240] [--out table.md]

Without a CUDA device it prints the analytic memory table only and exits 0.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from gsrq.attention import CompressedKV, decode_attention
from gsrq.config import GSRQConfig

HQ, HKV, HD, SINKS = 32, 8, 128, 4
LAYERS = 32  # LLaMA-3-8B, for the whole-model memory table


def cuda_time_ms(fn, iters: int, warmup: int = 5) -> float:
    """Median milliseconds of fn() measured with CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time_ms(fn, iters: int) -> float:
    """Median milliseconds of fn captured in a CUDA graph (no Python/launch overhead); NaN if capture fails."""
    try:
        cur = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            fn()
        cur.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return cuda_time_ms(graph.replay, iters)
    except Exception as exc:  # noqa: BLE001 - a bench column, not a test
        print(f"(graph capture failed: {exc})", file=sys.stderr)
        return float("nan")


def make_ckv(batch: int, ctx: int, cfg: GSRQConfig, device: str) -> CompressedKV:
    """A random compressed cache made directly on the device (codes uniform, codebooks normal)."""
    g = torch.Generator(device=device).manual_seed(0)
    coded = ctx - SINKS
    parts = {}
    for kind, kc in (("key", cfg.keys), ("value", cfg.values)):
        C = HD // kc.D
        R = kc.bytes_per_token(HD)
        parts[f"{kind}_codes"] = torch.randint(0, 256, (batch, HKV, coded, R), generator=g, device=device, dtype=torch.uint8)
        parts[f"{kind}_codebooks"] = torch.randn(1, C, kc.M, kc.Kc, kc.D, generator=g, device=device) * kc.M**-0.5
        parts[f"{kind}_bits"] = kc.code_bits
    ex = lambda n: torch.randn(batch, HKV, n, HD, generator=g, device=device).half()  # noqa: E731
    return CompressedKV(
        sink_keys=ex(SINKS), sink_values=ex(SINKS), window_keys=ex(0), window_values=ex(0), **parts
    )


def ckv_bytes(ckv: CompressedKV) -> int:
    ts = [ckv.sink_keys, ckv.sink_values, ckv.key_codes, ckv.value_codes, ckv.window_keys, ckv.window_values]
    return sum(t.numel() * t.element_size() for t in ts)


def memory_table(ctx: int = 131072) -> str:
    """KV-cache bytes of one ctx-token sequence in LLaMA-3-8B (all 32 layers)."""
    rows = ["| cache | bytes per token per layer | 128k-token sequence, 32 layers |", "|---|---:|---:|"]
    fp16 = 2 * HKV * HD * 2
    rows.append(f"| fp16 | {fp16} | {fp16 * ctx * LAYERS / 2**30:.2f} GiB |")
    for bits in (1.0, 0.5):
        cfg = GSRQConfig.from_bits(bits)
        per_tok = HKV * (cfg.keys.bytes_per_token(HD) + cfg.values.bytes_per_token(HD))
        books = sum(HD // k.D * k.M * k.Kc * k.D * 2 for k in (cfg.keys, cfg.values))  # fp16 codebooks per layer
        exact = SINKS * fp16
        total = LAYERS * ((ctx - SINKS) * per_tok + exact + books)
        rows.append(f"| gsrq {bits:g} bit (+{SINKS} exact sinks, fp16 codebooks) | {per_tok} | {total / 2**30:.2f} GiB |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--ctx", default="4096,16384,32768,65536,131072")
    p.add_argument("--bits", default="1,0.5")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--budget", type=float, default=240.0, help="seconds; later sizes are skipped once spent")
    p.add_argument("--out", default=None, help="also write the markdown tables here")
    args = p.parse_args(argv)
    lines = ["### KV-cache memory (LLaMA-3-8B, analytic)", "", memory_table(), ""]
    if not torch.cuda.is_available():
        lines.append("No CUDA device: latency not measured.")
        text = "\n".join(lines)
        print(text)
        if args.out:
            open(args.out, "w").write(text + "\n")
        return 0

    try:
        from flash_attn import flash_attn_with_kvcache  # type: ignore
    except ImportError:
        flash_attn_with_kvcache = None
    dev = "cuda"
    name = torch.cuda.get_device_name()
    batches = [int(x) for x in args.batch.split(",")]
    ctxs = [int(x) for x in args.ctx.split(",")]
    rates = [float(x) for x in args.bits.split(",")]
    head = "| bits | batch | ctx | gsrq µs | gsrq graph µs | encode µs | SDPA fp16 µs | flash µs | speedup vs SDPA | KV GB/s gsrq | fp16-equiv GB/s | KV GB/s SDPA |"
    lines += [
        f"### Decode attention, one layer ({name}; 32 q heads, 8 KV heads, head_dim 128; median of {args.iters})",
        "",
        head,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def emit(row: str) -> None:
        # written through, so a run cut short by a time limit keeps its rows
        lines.append(row)
        print(row, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(row + "\n")

    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    t_start = time.perf_counter()
    scale = 1 / math.sqrt(HD)
    from gsrq import kernels

    for bits in rates:
        cfg = GSRQConfig.from_bits(bits)
        for B in batches:
            for ctx in ctxs:
                if time.perf_counter() - t_start > args.budget:
                    emit(f"| {bits:g} | {B} | {ctx} | skipped (time budget) |")
                    continue
                try:
                    ckv = make_ckv(B, ctx, cfg, dev)
                    q = torch.randn(B, HQ, HD, device=dev, dtype=torch.float16)
                    t_gsrq = cuda_time_ms(lambda: decode_attention(q, ckv, scale), args.iters)
                    t_graph = graph_time_ms(lambda: decode_attention(q, ckv, scale), args.iters)
                    new_k = torch.randn(B, HKV, HD, device=dev, dtype=torch.float16)
                    kb, vb = ckv.key_codebooks, ckv.value_codebooks

                    def enc():
                        kernels.rq_encode_cuda(new_k, kb)
                        kernels.rq_encode_cuda(new_k, vb)

                    t_enc = cuda_time_ms(enc, args.iters)
                    gsrq_bytes = ckv_bytes(ckv)
                    del ckv
                    k16 = torch.randn(B, HKV, ctx, HD, device=dev, dtype=torch.float16)
                    v16 = torch.randn_like(k16)
                    q4 = q.unsqueeze(2)
                    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q4, k16, v16, scale=scale, enable_gqa=True)  # noqa: E731
                    t_sdpa = cuda_time_ms(sdpa, args.iters)
                    fp16_bytes = 2 * k16.numel() * 2
                    t_flash = float("nan")
                    if flash_attn_with_kvcache is not None:
                        kc, vc = k16.transpose(1, 2).contiguous(), v16.transpose(1, 2).contiguous()
                        del k16, v16
                        qf = q.unsqueeze(1)
                        lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
                        t_flash = cuda_time_ms(lambda: flash_attn_with_kvcache(qf, kc, vc, cache_seqlens=lens, softmax_scale=scale), args.iters)
                        del kc, vc
                    else:
                        del k16, v16
                    row = (
                        f"| {bits:g} | {B} | {ctx} | {t_gsrq * 1e3:.1f} | {t_graph * 1e3:.1f} | {t_enc * 1e3:.1f} | "
                        f"{t_sdpa * 1e3:.1f} | {'n/a' if math.isnan(t_flash) else f'{t_flash * 1e3:.1f}'} | "
                        f"{t_sdpa / (t_gsrq if math.isnan(t_graph) else min(t_gsrq, t_graph)):.2f}x | "
                        f"{gsrq_bytes / t_gsrq / 1e6:.0f} | {fp16_bytes / t_gsrq / 1e6:.0f} | {fp16_bytes / t_sdpa / 1e6:.0f} |"
                    )
                except torch.cuda.OutOfMemoryError:
                    row = f"| {bits:g} | {B} | {ctx} | out of memory |"
                torch.cuda.empty_cache()
                emit(row)
    emit("")
    emit("speedup: SDPA time over the faster of the two gsrq columns; graph: the same call captured in a CUDA graph.")
    emit(f"Command: `python benches/bench_decode_attention.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())

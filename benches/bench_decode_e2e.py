#!/usr/bin/env python3
"""End-to-end decode speed and memory: randomly initialised LLaMA-3-8B, fp16 cache vs GSRQCache.

Weights do not matter for speed, so the model is a random-init LLaMA-3-8B
config (32 layers, 32 query heads, 8 KV heads, head_dim 128, 128k vocabulary,
fp16; ``--layers`` changes the layer count, the table says which was used).
For each batch and context the cache is filled with ``ctx`` tokens, then
``--steps`` greedy decode steps of the whole model are timed (CUDA-synchronised
wall clock, after one warm-up step): decode tokens/s, the KV cache's bytes and
the peak GPU memory of the run (weights included).

Filling (``--fill``): ``random`` (default) writes random keys/values of the
context length into every layer's cache through the cache's own ``update``
(GSRQ encodes them with the CUDA encode kernel), which takes a second instead
of a long-context prefill; decode speed does not depend on the values.
``model`` runs the real chunked prefill of a random prompt (and reports its
time).

fp16 rows: ``DynamicCache`` with ``sdpa`` attention. GSRQ rows: ``GSRQCache``
(random codebooks from GSRQConfig.from_bits, 4 exact sinks, no window) on a
model switched to ``attn_implementation="gsrq"`` by
``gsrq.enable_fused_attention``: every decode step runs the fused decode
attention kernels over the packed codes (the last column counts those calls;
it must be layers x (steps + 1)).

Usage:
    python benches/bench_decode_e2e.py [--batch 1,8] [--ctx 4096,16384,32768] [--bits 1] [--steps 16]
        [--layers 32] [--fill random|model] [--budget 300] [--out table.md]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from gsrq.config import GSRQConfig

CHUNK = 4096


class RandomBooks:
    """Random codebooks with the part of the gsrq.Codebooks contract GSRQCache.from_codebooks reads."""

    def __init__(self, cfg: GSRQConfig, layers: int, kv_heads: int, head_dim: int, seed: int = 0):
        import numpy as np

        self.config = cfg
        self.num_layers, self.num_kv_heads, self.head_dim = layers, kv_heads, head_dim
        rng = np.random.default_rng(seed)
        self._books = {}
        for layer in range(layers):
            for kind in ("keys", "values"):
                k = cfg.kind(kind)
                shape = (1, head_dim // k.D, k.M, k.Kc, k.D)
                self._books[(layer, kind)] = (rng.standard_normal(shape) * k.M**-0.5).astype(np.float32)

    def codebooks(self, layer, kind):
        return self._books[(layer, kind)]

    def aux(self, layer, kind, name):
        return None


def llama3_8b_config(layers: int, attn: str, tiny: bool = False):
    """LLaMA-3-8B's shapes (``tiny``: a 2-layer miniature with the same head layout, for dry runs)."""
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(
            vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=128, max_position_embeddings=8192, attn_implementation=attn,
        )
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, attn_implementation=attn,
    )


def cache_bytes(cache) -> int:
    """Bytes the cache holds for the sequences (GSRQ: codes + exact tokens; fp16: keys + values)."""
    if hasattr(cache, "memory_bytes"):
        return int(cache.memory_bytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def fill_random(model, cache, batch: int, ctx: int, dev: str) -> None:
    """Write ``ctx`` random key/value tokens into every layer through ``cache.update`` (one layer at a time)."""
    cfg = model.config
    g = torch.Generator(device=dev).manual_seed(0)
    dt = next(model.parameters()).dtype
    for layer in range(cfg.num_hidden_layers):
        shape = (batch, cfg.num_key_value_heads, ctx, cfg.head_dim)
        k = torch.randn(shape, generator=g, device=dev, dtype=dt)
        v = torch.randn(shape, generator=g, device=dev, dtype=dt)
        cache.update(k, v, layer)
        del k, v


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def run_one(model, cache, batch: int, ctx: int, steps: int, kw: str, dev: str = "cuda", fill: str = "random") -> dict:
    g = torch.Generator(device=dev).manual_seed(0)
    _sync(dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        if fill == "model":
            ids = torch.randint(0, model.config.vocab_size, (batch, ctx), generator=g, device=dev)
            for s in range(0, ctx, CHUNK):
                out = model(input_ids=ids[:, s : s + CHUNK], use_cache=True, logits_to_keep=1, **{kw: cache})
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        else:
            fill_random(model, cache, batch, ctx, dev)
            tok = torch.randint(0, model.config.vocab_size, (batch, 1), generator=g, device=dev)
        _sync(dev)
        t_prefill = time.perf_counter() - t0
        out = model(input_ids=tok, use_cache=True, logits_to_keep=1, **{kw: cache})  # warm-up step
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(dev)
        t1 = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=tok, use_cache=True, logits_to_keep=1, **{kw: cache})
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(dev)
        t_dec = time.perf_counter() - t1
    return {
        "tok_s": batch * steps / t_dec,
        "ms_step": 1e3 * t_dec / steps,
        "prefill_s": t_prefill,
        "kv_gib": cache_bytes(cache) / 2**30,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", default="1,8")
    p.add_argument("--ctx", default="4096,16384,32768")
    p.add_argument("--bits", default="1")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--fill", choices=("random", "model"), default="random", help="how the context gets into the cache")
    p.add_argument("--budget", type=float, default=300.0, help="seconds; later sizes are skipped once spent")
    p.add_argument("--out", default=None)
    p.add_argument("--dry-run-cpu", action="store_true", help="tiny model on the CPU: checks the script, measures nothing useful")
    args = p.parse_args(argv)
    dev = "cpu" if args.dry_run_cpu else "cuda"
    if args.out:
        open(args.out, "w").close()

    def emit(s: str) -> None:
        # written through, so a run cut short by a time limit keeps its rows
        print(s, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(s + "\n")

    def finish() -> int:
        emit("")
        emit(f"Command: `python benches/bench_decode_e2e.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
        return 0

    if dev == "cuda" and not torch.cuda.is_available():
        emit("No CUDA device: end-to-end decode not measured.")
        return finish()
    try:
        from transformers import DynamicCache, LlamaForCausalLM

        from gsrq import attention
        from gsrq.cache import GSRQCache, generate_cache_kwarg
    except ImportError as exc:
        emit(f"Cannot run: {exc}")
        return finish()
    kw = generate_cache_kwarg()
    where = torch.cuda.get_device_name() if dev == "cuda" else "CPU (dry run, tiny model)"
    layers = 2 if args.dry_run_cpu else args.layers
    emit(f"### End-to-end decode, random-init LLaMA-3-8B shapes ({layers} layers, fp16) on {where}")
    emit("")
    emit(
        f"fp16: DynamicCache + `sdpa`. GSRQ: GSRQCache + `attn_implementation=\"gsrq\"` (fused decode attention). "
        f"Context filled by `--fill {args.fill}`; {args.steps} timed decode steps after one warm-up step. "
        "Peak GPU memory includes the weights."
    )
    emit("")
    path = "fused" if dev == "cuda" else "reference"
    t_start = time.perf_counter()
    torch.manual_seed(0)
    mcfg = llama3_8b_config(layers, "sdpa", tiny=args.dry_run_cpu)
    with torch.device(dev):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.float16 if dev == "cuda" else torch.float32)
        try:
            model = LlamaForCausalLM(mcfg).eval()
        finally:
            torch.set_default_dtype(prev)
    attention.enable_fused_attention(model)
    emit(f"Model built in {time.perf_counter() - t_start:.0f} s.")
    emit("")
    emit(f"| cache | batch | ctx | tokens/s | ms/step | speedup | KV cache GiB | peak GPU GiB | fill s | {path} calls |")
    emit("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    books = {
        b: RandomBooks(
            GSRQConfig.from_bits(float(b), sinks=4, window=0), mcfg.num_hidden_layers, mcfg.num_key_value_heads, mcfg.head_dim
        )
        for b in args.bits.split(",")
    }
    for B in (int(x) for x in args.batch.split(",")):
        for ctx in (int(x) for x in args.ctx.split(",")):
            base = None
            runs = [("fp16", None)] + [(f"gsrq {b} bit", b) for b in books]
            for label, b in runs:
                if time.perf_counter() - t_start > args.budget:
                    emit(f"| {label} | {B} | {ctx} | skipped (time budget) |")
                    continue
                cache = None
                try:
                    model.config._attn_implementation = "sdpa" if b is None else "gsrq"
                    cache = DynamicCache() if b is None else GSRQCache.from_codebooks(books[b], model.config, dev)
                    before, fell_back = attention.CALLS[path], attention.CALLS["fallback"]
                    r = run_one(model, cache, B, ctx, args.steps, kw, dev, args.fill)
                    fused = attention.CALLS[path] - before
                    fell_back = attention.CALLS["fallback"] - fell_back
                    if b is None:
                        base = r["tok_s"]
                    speed = f"{r['tok_s'] / base:.2f}x" if base else "n/a"
                    emit(
                        f"| {label} | {B} | {ctx} | {r['tok_s']:.1f} | {r['ms_step']:.1f} | {speed} | "
                        f"{r['kv_gib']:.3f} | {r['peak_gib']:.1f} | {r['prefill_s']:.1f} | {fused} |"
                    )
                    if b is not None and (fused == 0 or fell_back):
                        emit(f"| ^ warning: {fell_back} decode-attention calls fell back to dequantize + attention |")
                except torch.cuda.OutOfMemoryError:
                    emit(f"| {label} | {B} | {ctx} | out of memory |")
                del cache
                if dev == "cuda":
                    torch.cuda.empty_cache()
    return finish()


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""End-to-end decode speed and memory: randomly initialised LLaMA-3-8B, fp16 cache vs GSRQCache.

Weights do not matter for speed, so the model is a random-init LLaMA-3-8B
config (32 layers, 32 query heads, 8 KV heads, head_dim 128, fp16). For each
batch and context: prefill a random prompt of ``ctx`` tokens (in chunks,
logits only for the last position), then time ``--steps`` greedy decode steps
(CUDA-synchronised wall clock) and report tokens/s, the KV cache's bytes and
the peak GPU memory. GSRQ codebooks are random (GSRQConfig.from_bits; 4 exact
sinks). The attention implementation is ``--attn`` (default: ``gsrq``,
registered by gsrq.attention.register_transformers_attention). With ``gsrq``
the fused kernels run on the decode steps where the cache attaches its compressed view to the keys it returns
(``gsrq.attention.attach_compressed``); elsewhere the model attends to the
cache's dense reconstruction. The last column counts the decode-attention
calls that ran the fused kernels.

Usage:
    python benches/bench_decode_e2e.py [--batch 1,8] [--ctx 4096,32768] [--bits 1] [--steps 32]
        [--layers 32] [--budget 300] [--out table.md]
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
    total = 0
    seen = set()
    for layer in getattr(cache, "layers", []):
        for v in vars(layer).values():
            if isinstance(v, torch.Tensor) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def run_one(model, cache, batch: int, ctx: int, steps: int, kw: str, dev: str = "cuda") -> dict:
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, ctx), generator=g, device=dev)
    _sync(dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, ctx, CHUNK):
            out = model(input_ids=ids[:, s : s + CHUNK], use_cache=True, logits_to_keep=1, **{kw: cache})
        _sync(dev)
        t_prefill = time.perf_counter() - t0
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
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
    p.add_argument("--ctx", default="4096,32768")
    p.add_argument("--bits", default="1")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--attn", default=None, help="attention implementation for the GSRQ runs")
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
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        from gsrq import attention
        from gsrq.cache import GSRQCache, generate_cache_kwarg
    except ImportError as exc:
        emit(f"Cannot run: {exc}")
        return finish()
    attn = args.attn or attention.register_transformers_attention()
    assert attn in ALL_ATTENTION_FUNCTIONS
    kw = generate_cache_kwarg()
    where = torch.cuda.get_device_name() if dev == "cuda" else "CPU (dry run, tiny model)"
    emit(f"### End-to-end decode, random-init LLaMA-3-8B ({args.layers} layers, fp16) on {where}")
    emit("")
    emit(f"GSRQ runs use attention implementation `{attn}`; fp16 runs use `sdpa` with DynamicCache. {args.steps} decode steps.")
    emit("")
    emit("| cache | batch | ctx | tokens/s | ms/step | speedup | KV cache GiB | peak GPU GiB | prefill s | fused calls |")
    emit("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    t_start = time.perf_counter()
    torch.manual_seed(0)
    mcfg = llama3_8b_config(args.layers, "sdpa", tiny=args.dry_run_cpu)
    with torch.device(dev):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.float16 if dev == "cuda" else torch.float32)
        try:
            model = LlamaForCausalLM(mcfg).eval()
        finally:
            torch.set_default_dtype(prev)
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
                try:
                    model.config._attn_implementation = "sdpa" if b is None else attn
                    cache = DynamicCache() if b is None else GSRQCache.from_codebooks(books[b], model.config, dev)
                    before = attention.CALLS["fused"]
                    r = run_one(model, cache, B, ctx, args.steps, kw, dev)
                    fused = attention.CALLS["fused"] - before
                    del cache
                    if b is None:
                        base = r["tok_s"]
                    speed = f"{r['tok_s'] / base:.2f}x" if base else "n/a"
                    emit(
                        f"| {label} | {B} | {ctx} | {r['tok_s']:.1f} | {r['ms_step']:.1f} | {speed} | "
                        f"{r['kv_gib']:.3f} | {r['peak_gib']:.1f} | {r['prefill_s']:.1f} | {fused} |"
                    )
                except torch.cuda.OutOfMemoryError:
                    emit(f"| {label} | {B} | {ctx} | out of memory |")
                if dev == "cuda":
                    torch.cuda.empty_cache()
    return finish()


if __name__ == "__main__":
    sys.exit(main())

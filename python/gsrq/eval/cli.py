"""``gsrq eval {ppl,recon,longbench}``: the evaluation command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from gsrq.errors import InvalidValueError

DEFAULT_CODEBOOKS = Path(os.environ.get("GSRQ_CODEBOOKS", Path.home() / ".cache" / "gsrq" / "codebooks"))


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {s!r}")
    return vals


def _common(p: argparse.ArgumentParser, *, methods_default: str) -> None:
    p.add_argument("--model", default="smollm2", help="smollm2 (embedded), a .gguf file, a model directory or a cached hub id")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside the --model directory")
    p.add_argument("--codebooks", type=Path, default=DEFAULT_CODEBOOKS,
                   help="directory of cached codebooks (missing ones are calibrated and saved here)")
    p.add_argument("--calib-tokens", type=int, default=65536, help="calibration tokens for missing codebooks")
    p.add_argument("--calib-seq-len", type=int, default=1024, help="calibration window length")
    p.add_argument("--calib-text", default="wiki", help="calibration text: wiki (its calibration split) or a file")
    p.add_argument("--sinks", type=int, default=4, help="first tokens kept exact")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if methods_default is not None:
        p.add_argument("--methods", default=methods_default,
                       help="comma-separated: fp16, kivi2, gsrq:B[:opts], km:B[:opts], file:PATH")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", required=True)

    p = sub.add_parser("ppl", help="held-out perplexity with fake-quantized KV caches")
    _common(p, methods_default="fp16,kivi2,km:1,gsrq:1,gsrq:0.5")
    p.add_argument("--text", default="wiki", help="wiki (held-out articles) or a UTF-8 file")
    p.add_argument("--ctx", type=int, default=1024, help="tokens per window")
    p.add_argument("--windows", type=int, default=8, help="number of windows")
    p.add_argument("--window", type=_int_list, default=[0],
                   help="exact sliding window(s) of recent tokens, comma-separated (e.g. 0,64)")
    p.add_argument("--json", type=Path, default=None, help="write the rows as JSON")
    p.add_argument("--csv", type=Path, default=None, help="write the rows as CSV")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of perplexity against bits")
    p.set_defaults(_eval=run_ppl)

    p = sub.add_parser("recon", help="per-layer reconstruction error of keys and values")
    _common(p, methods_default="gsrq:1")
    p.add_argument("--text", default="wiki")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results"), help="directory for PNG plots")
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(_eval=run_recon)

    p = sub.add_parser("longbench", help="LongBench tasks with a cache method")
    _common(p, methods_default=None)
    p.add_argument("--data", required=True, help="directory of LongBench {task}.jsonl files")
    p.add_argument("--tasks", default="en", help="comma-separated tasks, 'en' (English tasks) or 'all'")
    p.add_argument("--max-length", type=int, required=True, help="prompt tokens kept (middle truncation)")
    p.add_argument("--method", default="fp16", help="fp16, kivi2, gsrq:B[:opts], km:B[:opts] or file:PATH")
    p.add_argument("--fake-quant", action="store_true",
                   help="simulate GSRQ with fake quantization instead of the compressed GSRQCache")
    p.add_argument("--chat", choices=("auto", "on", "off"), default="auto", help="chat template use")
    p.add_argument("--limit", type=int, default=None, help="samples per task (default: all)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="write scores and predictions as JSON")
    p.set_defaults(_eval=run_longbench)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return int(args._eval(args) or 0)


def _calib(args):
    from gsrq.eval.methods import CalibrationSettings

    return CalibrationSettings(tokens=args.calib_tokens, seq_len=args.calib_seq_len, text=args.calib_text)


def _load(args, dtype=None, device="cpu"):
    from gsrq.eval.methods import load_model_and_tokenizer

    t0 = time.perf_counter()
    model, tok, model_id = load_model_and_tokenizer(args.model, gguf_file=args.gguf_file, dtype=dtype, device=device)
    print(f"model {model_id} loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return model, tok, model_id


# ---------------------------------------------------------------------- ppl
PPL_HEADERS = ["method", "window", "code bits", "bits @ctx", "bits @32k", "perplexity", "x fp16"]


def ppl_table(rows, ctx: int) -> str:
    from gsrq.eval.table import format_table

    base = {r.window: r.ppl for r in rows if r.spec.lower() in ("fp16", "fp32", "exact", "none")}
    base0 = next(iter(base.values()), None)
    headers = list(PPL_HEADERS)
    headers[3] = f"bits @{ctx}"
    out = []
    for r in rows:
        ref = base.get(r.window, base0)
        out.append([r.method, r.window, r.code_bits, r.bits_ctx, r.bits_32k, r.ppl,
                    r.ppl / ref if ref else float("nan")])
    return format_table(headers, out)


def run_ppl(args) -> int:
    from gsrq.eval.methods import eval_text, parse_methods
    from gsrq.eval.ppl import eval_windows, identity_check, ppl_rows

    methods = parse_methods(args.methods)
    model, tok, model_id = _load(args)
    windows = eval_windows(tok, eval_text(args.text), args.ctx, args.windows)
    progress = not args.no_progress
    print(f"held-out text: {args.text}, {windows.shape[0]} windows x {windows.shape[1]} tokens, "
          f"sinks={args.sinks}, exact window={','.join(map(str, args.window))}", file=sys.stderr)
    exact = identity_check(model, windows[0], sinks=args.sinks)
    print(f"identity check (fake-quant path with the identity reproduces the logits bit for bit): "
          f"{'exact' if exact else 'MISMATCH'}", file=sys.stderr)
    if not exact:
        raise InvalidValueError("the identity quantizer did not reproduce the model's logits exactly")
    t0 = time.perf_counter()
    rows = ppl_rows(model, tok, model_id, methods, windows, sinks=args.sinks, exact_windows=args.window,
                    codebook_dir=args.codebooks, calib=_calib(args), progress=progress,
                    log=lambda s: print(s, file=sys.stderr))
    print(ppl_table(rows, args.ctx))
    print(f"\n{model_id}, {args.text} held-out, ctx {args.ctx}, {args.windows} windows, sinks {args.sinks}; "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    _write_outputs(args, [r.to_dict() for r in rows])
    if args.plot:
        from gsrq.eval.plots import plot_ppl_vs_bits

        pts = [(f"{r.method}" + (f" w{r.window}" if r.window else ""), r.bits_ctx, r.ppl) for r in rows]
        ref = next((r.ppl for r in rows if r.spec.lower() == "fp16" and r.window == 0), None)
        plot_ppl_vs_bits(pts, args.plot, reference=ref, title=f"{model_id}: held-out perplexity, ctx {args.ctx}")
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def _write_outputs(args, records) -> None:
    from gsrq.eval.table import write_csv, write_json

    if getattr(args, "json", None):
        write_json(args.json, records)
    if getattr(args, "csv", None):
        write_csv(args.csv, records)


# -------------------------------------------------------------------- recon
def run_recon(args) -> int:
    from gsrq.eval import methods as M
    from gsrq.eval.plots import plot_recon
    from gsrq.eval.ppl import eval_windows
    from gsrq.eval.recon import HEADERS, capture_kv, layer_metrics, summary_rows
    from gsrq.eval.table import format_table

    methods = M.parse_methods(args.methods)
    model, tok, model_id = _load(args)
    windows = eval_windows(tok, M.eval_text(args.text), args.ctx, args.windows)
    captured = capture_kv(model, windows)
    records = {}
    for method in methods:
        cbs = None
        if method.needs_codebooks:
            cbs, _ = M.load_or_calibrate(method, model, tok, model_id, args.codebooks, _calib(args),
                                         progress=not args.no_progress, log=lambda s: print(s, file=sys.stderr))
        per_layer = layer_metrics(captured, M.quantizer_factory(method, cbs), sinks=args.sinks)
        print(f"\n{method.label} — {args.text} held-out, {args.windows} x {args.ctx} tokens, sinks {args.sinks}")
        print(format_table(HEADERS, summary_rows(per_layer), floatfmt=".4g"))
        slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in method.spec)
        path = plot_recon(per_layer, Path(args.out) / f"recon-{slug}.png", title=f"{model_id}: {method.label}")
        print(f"plot: {path}", file=sys.stderr)
        records[method.spec] = per_layer
    _write_outputs(args, records)
    return 0


# ---------------------------------------------------------------- longbench
def longbench_cache_factory(method, model, cbs, *, sinks: int, fake_quant: bool):
    """A zero-argument callable that makes a fresh cache for one generation (None: the default cache)."""
    from gsrq.eval.methods import quantizer_factory
    from gsrq.eval.ppl import FakeQuantCache

    if method.name == "fp16":
        return None
    if method.name == "kivi" or fake_quant:
        factory = quantizer_factory(method, cbs)
        return lambda: FakeQuantCache(factory, sinks=sinks, exact_prefill=True)
    from gsrq.cache import GSRQCache

    return lambda: GSRQCache.from_codebooks(cbs, model.config, sinks=sinks)


def run_longbench(args) -> int:
    import torch

    from gsrq.eval import longbench as lb
    from gsrq.eval.methods import load_or_calibrate, parse_method
    from gsrq.eval.table import format_table

    if args.tasks in ("en", "all"):
        tasks = list(lb.ENGLISH_TASKS if args.tasks == "en" else lb.TASKS)
    else:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in lb.PROMPTS:
            raise InvalidValueError(f"unknown LongBench task {t!r}; tasks: {', '.join(lb.TASKS)}")
    data = Path(args.data).expanduser()
    if not data.is_dir():
        lb.load_task(args.data, tasks[0])  # raises the explanatory error
    method = parse_method(args.method)
    model, tok, model_id = _load(args, dtype=getattr(torch, args.dtype), device=args.device)
    cbs = None
    if method.needs_codebooks:
        cbs, _ = load_or_calibrate(method, model, tok, model_id, args.codebooks, _calib(args),
                                   progress=not args.no_progress, log=lambda s: print(s, file=sys.stderr))
    factory = longbench_cache_factory(method, model, cbs, sinks=args.sinks, fake_quant=args.fake_quant)
    results = lb.run_longbench(model, tok, data, tasks, max_length=args.max_length, cache_factory=factory,
                               chat=args.chat, limit=args.limit, progress=not args.no_progress)
    rows = [[r.task, r.samples, r.score if r.score is not None else r.note, r.seconds] for r in results]
    avg = lb.average(results)
    rows.append(["average", sum(r.samples for r in results), avg if avg is not None else "n/a", sum(r.seconds for r in results)])
    print(f"LongBench, {model_id}, method {method.label}, max_length {args.max_length}")
    print(format_table(["task", "samples", "score", "seconds"], rows, floatfmt=".2f"))
    if args.json:
        from gsrq.eval.table import write_json

        write_json(args.json, {"model": model_id, "method": method.spec, "max_length": args.max_length,
                               "average": avg,
                               "tasks": [r.__dict__ for r in results]})
    return 0

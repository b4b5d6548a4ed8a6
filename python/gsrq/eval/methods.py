"""Cache methods compared by the evaluation, and where their codebooks come from.

A method spec is a short string:

- ``fp16`` — the unquantized cache (fake-quantized by the identity).
- ``kivi2`` (``kivi4`` …) — KIVI-style scalar quantization at 2 (4 …) bits,
  groups of 32 (:mod:`gsrq.eval.kivi`).
- ``gsrq:B`` — GSRQ codebooks learnt by Gain-Shape K-means at a code rate of
  ``B`` bits per element (``GSRQConfig.from_bits(B)``); ``km:B`` — the same
  residual quantizer learnt by weighted k-means (the KM-RQ baseline).
  Options follow after more colons: ``nograd`` (no gradient weights),
  ``initgrad`` (weights in the initialisation only), ``perhead``, and
  ``FIELD=VALUE`` for ``D``, ``Kc``, ``M`` (both kinds), ``tau``, ``beam``,
  ``iters``, ``init_iters``, ``max_samples``, ``seed``, ``key_rotation``,
  ``key_scale``, ``key_norm``. Example: ``gsrq:1:nograd:D=16:M=2``.
- ``file:PATH`` — an existing codebook file.

Codebooks of ``gsrq``/``km`` specs are looked up in a directory, keyed by a
hash of the configuration, the model and the calibration settings; missing
ones are calibrated with :func:`gsrq.calibration.calibrate` and saved there.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsrq.config import GSRQConfig, KindConfig
from gsrq.errors import ConfigError, InvalidValueError

_FIELD_TYPES: dict[str, type] = {
    "tau": float,
    "beam": int,
    "iters": int,
    "init_iters": int,
    "max_samples": int,
    "seed": int,
    "key_rotation": str,
    "key_scale": bool,
    "key_scale_fit": str,
    "key_scale_power": float,
    "key_norm": bool,
}


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"expected a boolean, got {s!r}")


@dataclass(frozen=True)
class Method:
    """One cache method of an evaluation.

    name: ``"fp16"``, ``"kivi"``, ``"gsrq"`` (GSRQ/KM-RQ codebooks) or ``"file"``.
    spec: the string it was parsed from; label: a readable name for tables.
    kivi_bits: KIVI code bits; config: GSRQ configuration (``gsrq`` methods);
    path: the codebook file of a ``file:`` spec.
    """

    name: str
    spec: str
    label: str
    kivi_bits: int = 0
    config: GSRQConfig | None = None
    path: Path | None = None

    @property
    def needs_codebooks(self) -> bool:
        return self.name in ("gsrq", "file")


def parse_method(spec: str) -> Method:
    """Parse one method spec (see the module docstring)."""
    s = spec.strip()
    if not s:
        raise ConfigError("empty method spec")
    low = s.lower()
    if low in ("fp16", "fp32", "exact", "none"):
        return Method("fp16", s, "fp16")
    m = re.fullmatch(r"kivi:?(\d+)", low)
    if m:
        bits = int(m.group(1))
        if not 1 <= bits <= 8:
            raise ConfigError(f"KIVI bits must be in 1..=8, got {bits} in {spec!r}")
        return Method("kivi", s, f"KIVI {bits}-bit", kivi_bits=bits)
    if low.startswith("file:"):
        path = Path(s[5:]).expanduser()
        return Method("file", s, f"file {path.name}", path=path)
    parts = s.split(":")
    head = parts[0].lower()
    if head not in ("gsrq", "gskm", "km") or len(parts) < 2:
        raise ConfigError(
            f"unknown method {spec!r}: use fp16, kivi2, gsrq:BITS[:opts], km:BITS[:opts] or file:PATH"
        )
    try:
        bits = float(parts[1])
    except ValueError:
        raise ConfigError(f"bits must be a number in method {spec!r}, got {parts[1]!r}") from None
    learner = "km" if head == "km" else "gskm"
    overrides: dict[str, Any] = {"method": learner}
    shape: dict[str, int] = {}
    tags: list[str] = []
    for opt in parts[2:]:
        o = opt.strip()
        if o.lower() == "nograd":
            overrides["grad_weights"] = "off"
            tags.append("no grad weights")
        elif o.lower() == "initgrad":
            overrides["grad_weights"] = "init"
            tags.append("grad weights in init")
        elif o.lower() == "perhead":
            overrides["per_head"] = True
            tags.append("per head")
        elif "=" in o:
            k, v = o.split("=", 1)
            if k in ("D", "Kc", "M"):
                try:
                    shape[k] = int(v)
                except ValueError:
                    raise ConfigError(f"{k} must be an integer in method {spec!r}") from None
            elif k in _FIELD_TYPES:
                typ = _FIELD_TYPES[k]
                try:
                    overrides[k] = _parse_bool(v) if typ is bool else typ(v)
                except ValueError:
                    raise ConfigError(f"{k}={v!r} is not a {typ.__name__} in method {spec!r}") from None
            else:
                raise ConfigError(f"unknown option {k!r} in method {spec!r}")
            tags.append(o)
        else:
            raise ConfigError(f"unknown option {o!r} in method {spec!r}")
    if shape:
        base = GSRQConfig.from_bits(bits) if bits in GSRQConfig.preset_rates() else GSRQConfig()
        kc = KindConfig(
            D=shape.get("D", base.keys.D), Kc=shape.get("Kc", base.keys.Kc), M=shape.get("M", base.keys.M)
        )
        cfg = GSRQConfig(keys=kc, values=kc, **overrides)
        if not math.isclose(cfg.code_bits_per_element, bits):
            raise ConfigError(
                f"method {spec!r}: D={kc.D}, Kc={kc.Kc}, M={kc.M} give {cfg.code_bits_per_element:g} bits, not {bits:g}"
            )
    else:
        cfg = GSRQConfig.from_bits(bits, **overrides)
    name = "KM-RQ" if learner == "km" else "GSRQ"
    label = f"{name} {bits:g} bit" + (f" ({', '.join(tags)})" if tags else "")
    return Method("gsrq", s, label, config=cfg)


def parse_methods(specs: str) -> list[Method]:
    """Parse a comma-separated list of method specs."""
    out = [parse_method(s) for s in specs.split(",") if s.strip()]
    if not out:
        raise ConfigError("no methods given")
    return out


# ------------------------------------------------------------------ shapes
def model_shape(hf_config: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a transformers config."""
    cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return layers, kv, int(hd)


def rates(method: Method, config: GSRQConfig | None, ctx: int, *, head_dim: int, num_kv_heads: int,
          sinks: int, window: int) -> dict[str, float]:
    """Bits per element: ``code`` (code rate) and ``total`` (everything held,
    for one layer and one ``ctx``-token sequence; see the rate reports)."""
    from gsrq.eval.kivi import kivi_rate_report

    if method.name == "fp16":
        return {"code": 16.0, "total": 16.0}
    if method.name == "kivi":
        rep = kivi_rate_report(ctx, head_dim=head_dim, num_kv_heads=num_kv_heads, bits=method.kivi_bits,
                               sinks=sinks, window=window)
        return {"code": float(method.kivi_bits), "total": rep["total"]}
    cfg = (config or method.config).replace(sinks=sinks, window=window)
    total = cfg.bits_per_element(ctx, head_dim=head_dim, num_kv_heads=num_kv_heads)
    return {"code": cfg.code_bits_per_element, "total": float(total)}


def cache_bytes(method: Method, config: GSRQConfig | None, ctx: int, *, num_layers: int, head_dim: int,
                num_kv_heads: int, sinks: int, window: int) -> float:
    """Bytes of the whole cache (all layers, keys and values) of one ``ctx``-token sequence."""
    r = rates(method, config, ctx, head_dim=head_dim, num_kv_heads=num_kv_heads, sinks=sinks, window=window)
    elements = 2 * ctx * num_kv_heads * head_dim * num_layers
    return r["total"] * elements / 8


# --------------------------------------------------------------- quantizers
def quantizer_factory(method: Method, codebooks: Any = None, *, device: Any = "cpu"):
    """``(layer, kind) -> callable`` mapping ``[B, Hkv, T, hd]`` to its reconstruction."""
    from gsrq.eval.kivi import KiviQuantizer
    from gsrq.eval.ppl import identity_quantizer

    if method.name == "fp16":
        return lambda layer, kind: identity_quantizer
    if method.name == "kivi":
        qs = {kind: KiviQuantizer(kind, method.kivi_bits) for kind in ("keys", "values")}
        return lambda layer, kind: qs[kind]
    if codebooks is None:
        raise InvalidValueError(f"method {method.spec!r} needs codebooks")
    from gsrq.quantizer import KVQuantizer

    built: dict[tuple[int, str], Any] = {}

    def factory(layer: int, kind: str):
        key = (layer, kind)
        if key not in built:
            built[key] = KVQuantizer.from_codebooks(codebooks, layer, kind, device).fake_quant
        return built[key]

    return factory


# ---------------------------------------------------------------- codebooks
@dataclass
class CalibrationSettings:
    """How missing codebooks are calibrated: ``tokens`` of ``text`` in ``seq_len`` windows."""

    tokens: int = 65536
    seq_len: int = 1024
    text: str = "wiki"
    extra: dict[str, Any] = field(default_factory=dict)


def codebook_key(config: GSRQConfig, model_id: str, hf_config: Any, calib: CalibrationSettings) -> str:
    """Hash of everything that decides a calibration's result."""
    layers, kv, hd = model_shape(hf_config)
    payload = {
        "config": config.replace(sinks=GSRQConfig().sinks, window=GSRQConfig().window).to_dict(),
        "model": model_id,
        "shape": [layers, kv, hd],
        "tokens": calib.tokens,
        "seq_len": calib.seq_len,
        "text": calib.text,
        "extra": calib.extra,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def codebook_path(directory: Path, method: Method, model_id: str, hf_config: Any, calib: CalibrationSettings) -> Path:
    cfg = method.config
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model_id).name)[:40]
    return Path(directory) / f"{tag}-{cfg.method}-{cfg.code_bits_per_element:g}b-{codebook_key(cfg, model_id, hf_config, calib)}.safetensors"


def run_calibration(model: Any, tokenizer: Any, config: GSRQConfig, calib: CalibrationSettings, *,
                    model_id: str | None = None, progress: bool = True) -> Any:
    """Calibrate codebooks for ``model`` (via :func:`gsrq.calibration.calibrate`)."""
    from gsrq import data
    from gsrq.calibration import calibrate

    text, summary = data.read_text(calib.text)
    return calibrate(model, tokenizer, text, config, tokens=calib.tokens, seq_len=calib.seq_len,
                         model_id=model_id, text_summary=summary, progress=progress, **calib.extra)


def load_or_calibrate(method: Method, model: Any, tokenizer: Any, model_id: str, directory: Path | None,
                      calib: CalibrationSettings, *, progress: bool = True, log=print) -> tuple[Any, Path | None]:
    """Codebooks of a ``gsrq``/``file`` method: from its file, from the cache
    directory, or calibrated now (and saved to the directory).

    Returns ``(codebooks, path)``.
    """
    from gsrq.codebooks import Codebooks

    if method.name == "file":
        if not method.path.is_file():
            raise InvalidValueError(f"codebook file {str(method.path)!r} does not exist")
        cbs = Codebooks.load(method.path)
        cbs.check_model(model.config)
        return cbs, method.path
    if method.name != "gsrq":
        raise InvalidValueError(f"method {method.spec!r} has no codebooks")
    path = None
    if directory is not None:
        path = codebook_path(Path(directory), method, model_id, model.config, calib)
        if path.is_file():
            cbs = Codebooks.load(path)
            cbs.check_model(model.config)
            log(f"[{method.label}] codebooks: {path}")
            return cbs, path
    log(f"[{method.label}] calibrating {method.config.describe()} on {calib.tokens} tokens of {calib.text} ...")
    t0 = time.perf_counter()
    cbs = run_calibration(model, tokenizer, method.config, calib, model_id=model_id, progress=progress)
    log(f"[{method.label}] calibrated in {time.perf_counter() - t0:.0f} s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        cbs.save(path)
        cbs = Codebooks.load(path)  # evaluate exactly what is stored (16-bit codebooks)
        log(f"[{method.label}] saved {path}")
    return cbs, path


def load_model_and_tokenizer(spec: str, *, gguf_file: str | None = None, dtype: Any = None,
                             device: str = "cpu") -> tuple[Any, Any, str]:
    """``(model, tokenizer, model_id)`` for ``smollm2``, a .gguf file, a directory or a cached hub id."""
    from gsrq import data

    return data.load_model(spec, gguf_file=gguf_file, dtype=dtype, device=device)


def eval_text(source: str) -> str:
    """Evaluation text: ``wiki`` gives the held-out wiki articles (never used in
    calibration); anything else is read as a UTF-8 file."""
    from gsrq import data

    if source == "wiki":
        return data.heldout_text()
    path = Path(source).expanduser()
    if not path.is_file():
        raise InvalidValueError(f"text file {str(path)!r} does not exist")
    return path.read_text(encoding="utf-8")


__all__ = [
    "CalibrationSettings",
    "Method",
    "cache_bytes",
    "codebook_key",
    "codebook_path",
    "eval_text",
    "load_model_and_tokenizer",
    "load_or_calibrate",
    "model_shape",
    "parse_method",
    "parse_methods",
    "quantizer_factory",
    "rates",
]

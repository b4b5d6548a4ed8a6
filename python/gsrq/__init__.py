"""gsrq — Gain-Shape Residual Quantization of LLM key/value caches.

Heavy parts (torch, transformers) are imported lazily: ``import gsrq`` alone
only loads the Rust core.
"""

from __future__ import annotations

import importlib
from typing import Any

from gsrq.errors import (
    CalibrationError,
    CodebookFormatError,
    ConfigError,
    GsrqError,
    InvalidValueError,
    KernelUnavailableError,
    ModelMismatchError,
    ShapeError,
)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "pack_codes": "gsrq.pack",
    "unpack_codes": "gsrq.pack",
    "packed_size": "gsrq.pack",
    "Codebooks": "gsrq.codebooks",
    "kmeans": "gsrq.engine",
    "gskm": "gsrq.engine",
    "ResidualQuantizer": "gsrq.engine",
    "reconstruction_metrics": "gsrq.engine",
    "GSRQConfig": "gsrq.config",
    "KindConfig": "gsrq.config",
    "calibrate": "gsrq.calibration",
    "GSRQCache": "gsrq.cache",
    "track_padding": "gsrq.cache",
    "enable_fused_attention": "gsrq.attention",
    "register_transformers_attention": "gsrq.attention",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gsrq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "CalibrationError",
    "CodebookFormatError",
    "ConfigError",
    "GsrqError",
    "InvalidValueError",
    "KernelUnavailableError",
    "ModelMismatchError",
    "ShapeError",
    *_LAZY,
]

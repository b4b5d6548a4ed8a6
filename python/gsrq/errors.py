"""The gsrq exception tree.

Every error gsrq raises on bad input derives from :class:`GsrqError`; the Rust
core raises these same classes. I/O failures stay :class:`OSError`.

- :class:`ShapeError` — wrong shape, size or dtype (also a ``ValueError``)
- :class:`InvalidValueError` — NaN/inf, a negative weight, a code that does not
  fit its bit width, ``k > n`` … (also a ``ValueError``)
- :class:`CodebookFormatError` — a truncated, corrupt or foreign codebook file
- :class:`ModelMismatchError` — a codebook file made for another model; the
  message names the field that differs
- :class:`ConfigError` — an impossible :class:`gsrq.GSRQConfig`
- :class:`CalibrationError` — a model or text calibration cannot use
- :class:`KernelUnavailableError` — a CUDA kernel that cannot be loaded here
"""

from __future__ import annotations


class GsrqError(Exception):
    """Base class of every error gsrq raises on bad input."""


class ShapeError(GsrqError, ValueError):
    """Wrong shape, size or dtype of an argument."""


class InvalidValueError(GsrqError, ValueError):
    """A value that is not allowed (NaN/inf, negative weight, out-of-range code...)."""


class CodebookFormatError(GsrqError, ValueError):
    """A codebook file that is truncated, corrupt, of another version or inconsistent."""


class ModelMismatchError(GsrqError, ValueError):
    """A codebook file does not match the model it is used with."""


class ConfigError(GsrqError, ValueError):
    """An impossible or inconsistent configuration."""


class CalibrationError(GsrqError, ValueError):
    """Calibration cannot run on this model or text."""


class KernelUnavailableError(GsrqError, RuntimeError):
    """A CUDA kernel cannot be loaded or launched on this machine."""


__all__ = [
    "GsrqError",
    "ShapeError",
    "InvalidValueError",
    "CodebookFormatError",
    "ModelMismatchError",
    "ConfigError",
    "CalibrationError",
    "KernelUnavailableError",
]

"""Codebook files: the trained codebooks of every layer, with what they were made for.

A codebook file is a safetensors file (any safetensors reader can load its
tensors) whose ``__metadata__["gsrq"]`` is a JSON document:

.. code-block:: text

    format_version   1
    library_version  gsrq version that wrote the file
    model            {id, config_hash, num_layers, num_kv_heads, num_attention_heads,
                      head_dim, model_type, fingerprint: {...}}
    config           GSRQConfig.to_dict()
    calibration      free-form summary (text, tokens, tau, seed, timings ...)
    dtype            storage dtype of the tensors: float16 | bfloat16 | float32

Tensors (docs/format.md): ``layers.{l}.{keys|values}.codebooks`` float32
``[H, C, M, Kc, D]`` for every layer ``l`` (``H`` = 1 when the codebooks are
shared by the KV heads, else num_kv_heads; ``C = head_dim / D``), plus optional
auxiliary tensors ``layers.{l}.{kind}.{name}`` (e.g. ``scale`` ``[H, head_dim]``).

Reading and writing run in Rust: every defect of a file raises
:class:`~gsrq.errors.CodebookFormatError` naming the field or tensor, and
:meth:`Codebooks.save` is atomic (temporary file, fsync, rename).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from gsrq import _gsrq
from gsrq.config import KINDS, GSRQConfig
from gsrq.errors import CodebookFormatError, ConfigError, InvalidValueError, ModelMismatchError

__all__ = ["Codebooks", "model_fingerprint", "FORMAT_VERSION", "DTYPES", "FINGERPRINT_FIELDS"]

FORMAT_VERSION = 1
DTYPES = ("float16", "bfloat16", "float32")

#: Fields of a transformers config that decide whether codebooks fit a model,
#: in the order :meth:`Codebooks.check_model` compares them.
FINGERPRINT_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "num_key_value_heads",
    "num_attention_heads",
    "head_dim",
    "hidden_size",
    "vocab_size",
    "rope_theta",
)


def _field(cfg: Any, name: str) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name)
    return getattr(cfg, name, None)


def _positive_int(cfg: Any, name: str) -> int:
    v = _field(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InvalidValueError(f"model config field {name} must be a positive integer, got {v!r}")
    return v


def model_fingerprint(hf_config: Any) -> dict[str, Any]:
    """The fields of a transformers config that codebooks depend on, plus their hash.

    hf_config: a ``transformers.PretrainedConfig`` or its ``to_dict()``.
    Returns ``{model_type, num_hidden_layers, num_key_value_heads,
    num_attention_heads, head_dim, hidden_size, vocab_size[, rope_theta],
    config_hash}``: ``head_dim`` falls back to ``hidden_size //
    num_attention_heads``, ``num_key_value_heads`` to ``num_attention_heads``,
    ``rope_theta`` is read from ``rope_parameters`` where transformers keeps it;
    ``config_hash`` is the sha256 (hex) of the other fields as sorted JSON.
    """
    model_type = _field(hf_config, "model_type")
    if not isinstance(model_type, str) or not model_type:
        raise InvalidValueError(f"model config field model_type must be a non-empty string, got {model_type!r}")
    layers = _positive_int(hf_config, "num_hidden_layers")
    heads = _positive_int(hf_config, "num_attention_heads")
    hidden = _positive_int(hf_config, "hidden_size")
    kv_heads = _field(hf_config, "num_key_value_heads")
    kv_heads = heads if kv_heads is None else _positive_int(hf_config, "num_key_value_heads")
    head_dim = _field(hf_config, "head_dim")
    head_dim = hidden // heads if head_dim is None else _positive_int(hf_config, "head_dim")
    vocab = _positive_int(hf_config, "vocab_size")
    fp: dict[str, Any] = {
        "model_type": model_type,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "num_attention_heads": heads,
        "head_dim": head_dim,
        "hidden_size": hidden,
        "vocab_size": vocab,
    }
    rope = _field(hf_config, "rope_theta")
    if rope is None:
        params = _field(hf_config, "rope_parameters")
        if isinstance(params, Mapping):
            rope = params.get("rope_theta")
    if rope is not None:
        fp["rope_theta"] = float(rope)
    fp["config_hash"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
    return fp


def _is_fingerprint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "config_hash" in obj and "num_hidden_layers" in obj


class Codebooks:
    """Trained codebooks of every layer and kind, with their metadata.

    meta: the metadata document (see the module docstring), JSON-serialisable.
    tensors: ``{name: array}``; converted to read-only float32 copies.

    The constructor validates everything a file must satisfy (the same Rust
    checks as :meth:`save` and :meth:`load`): a missing or misshapen codebook
    or a bad metadata field raises :class:`~gsrq.errors.CodebookFormatError`,
    NaN/inf raises :class:`~gsrq.errors.InvalidValueError`.
    """

    def __init__(self, meta: Mapping[str, Any], tensors: Mapping[str, Any], *, _validated: bool = False) -> None:
        if not isinstance(meta, Mapping):
            raise CodebookFormatError(f"meta must be a dict, got {type(meta).__name__}")
        try:
            self._meta_json = json.dumps(meta, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise CodebookFormatError(f"metadata is not JSON-serialisable: {e}") from None
        self._meta: dict[str, Any] = json.loads(self._meta_json)
        arrays: dict[str, np.ndarray] = {}
        for name, t in tensors.items():
            if _validated and isinstance(t, np.ndarray) and t.dtype == np.float32:
                arr = t
            else:
                arr = np.array(t, dtype=np.float32, copy=True, order="C")
            arr.flags.writeable = False
            arrays[str(name)] = arr
        self._tensors = arrays
        if not _validated:
            dtype = self._meta.get("dtype")
            _gsrq.validate_codebook(self._meta_json, self._tensors, dtype if dtype in DTYPES else "float32")
        try:
            self._config = GSRQConfig.from_dict(self._meta["config"])
        except (ConfigError, TypeError) as e:
            raise CodebookFormatError(f"metadata field config is invalid: {e}") from None

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str], dtype: str | None = None) -> None:
        """Write the file atomically; ``dtype`` (float16 | bfloat16 | float32)
        defaults to the metadata's. An existing file at ``path`` is replaced
        only once the new one is complete on disk."""
        dtype = self.dtype if dtype is None else dtype
        if dtype not in DTYPES:
            raise InvalidValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        meta = dict(self._meta)
        meta["dtype"] = dtype
        _gsrq.write_codebook_file(os.fspath(path), json.dumps(meta, sort_keys=True), self._tensors, dtype)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Codebooks":
        """Read and validate a codebook file; tensors come back as float32."""
        meta_json, tensors, _dtype = _gsrq.read_codebook_file(os.fspath(path))
        return cls(json.loads(meta_json), tensors, _validated=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Codebooks":
        """Parse a codebook file held in memory (same checks as :meth:`load`)."""
        meta_json, tensors, _dtype = _gsrq.parse_codebook_bytes(bytes(data))
        return cls(json.loads(meta_json), tensors, _validated=True)

    @classmethod
    def build(
        cls,
        config: GSRQConfig,
        hf_config_or_fingerprint: Any,
        tensors: Mapping[str, Any],
        calibration: Mapping[str, Any],
        model_id: str,
        dtype: str = "float16",
    ) -> "Codebooks":
        """Assemble the metadata for freshly trained codebooks.

        config: the configuration they were trained with.
        hf_config_or_fingerprint: the model's transformers config (or its
            dict), or a :func:`model_fingerprint` result.
        tensors: ``layers.{l}.{kind}.codebooks`` float ``[H, C, M, Kc, D]`` for
            every layer and kind, plus any auxiliary tensors.
        calibration: free-form JSON-serialisable summary (text, tokens, tau, seed ...).
        model_id: name or path of the model.
        dtype: storage dtype of :meth:`save`.
        """
        if not isinstance(config, GSRQConfig):
            raise ConfigError(f"config must be a GSRQConfig, got {type(config).__name__}")
        if dtype not in DTYPES:
            raise InvalidValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        fp = dict(hf_config_or_fingerprint) if _is_fingerprint(hf_config_or_fingerprint) else model_fingerprint(
            hf_config_or_fingerprint
        )
        config.validate_for(fp["head_dim"], fp["num_key_value_heads"])
        from gsrq import __version__

        meta = {
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "model": {
                "id": str(model_id),
                "config_hash": fp["config_hash"],
                "num_layers": fp["num_hidden_layers"],
                "num_kv_heads": fp["num_key_value_heads"],
                "num_attention_heads": fp["num_attention_heads"],
                "head_dim": fp["head_dim"],
                "model_type": fp["model_type"],
                "fingerprint": fp,
            },
            "config": config.to_dict(),
            "calibration": dict(calibration),
            "dtype": dtype,
        }
        return cls(meta, tensors)

    # ----------------------------------------------------------------- access
    @property
    def meta(self) -> dict[str, Any]:
        """A copy of the metadata document."""
        return copy.deepcopy(self._meta)

    @property
    def tensors(self) -> Mapping[str, np.ndarray]:
        """All tensors by name (read-only float32 arrays)."""
        return dict(self._tensors)

    @property
    def config(self) -> GSRQConfig:
        return self._config

    @property
    def dtype(self) -> str:
        """Storage dtype recorded in the metadata."""
        return self._meta["dtype"]

    @property
    def model_id(self) -> str:
        return self._meta["model"]["id"]

    @property
    def num_layers(self) -> int:
        return self._meta["model"]["num_layers"]

    @property
    def head_dim(self) -> int:
        return self._meta["model"]["head_dim"]

    @property
    def num_kv_heads(self) -> int:
        return self._meta["model"]["num_kv_heads"]

    @property
    def calibration(self) -> dict[str, Any]:
        return copy.deepcopy(self._meta["calibration"])

    def _key(self, layer: int, kind: str, name: str) -> str:
        if kind not in KINDS:
            raise InvalidValueError(f"kind must be 'keys' or 'values', got {kind!r}")
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.num_layers:
            raise InvalidValueError(f"layer must be an integer in 0..{self.num_layers - 1}, got {layer!r}")
        return f"layers.{int(layer)}.{kind}.{name}"

    def codebooks(self, layer: int, kind: str) -> np.ndarray:
        """Codebooks of one layer and kind: float32 ``[H, C, M, Kc, D]`` (read-only)."""
        return self._tensors[self._key(layer, kind, "codebooks")]

    def aux(self, layer: int, kind: str, name: str) -> np.ndarray | None:
        """Auxiliary tensor ``layers.{layer}.{kind}.{name}`` (float32, read-only), or None."""
        return self._tensors.get(self._key(layer, kind, name))

    # ------------------------------------------------------------ model check
    def check_model(self, hf_config: Any) -> None:
        """Raise :class:`~gsrq.errors.ModelMismatchError` naming the first field
        of :data:`FINGERPRINT_FIELDS` where ``hf_config`` differs from the model
        the file was made for."""
        try:
            theirs = model_fingerprint(hf_config)
        except InvalidValueError as e:
            raise ModelMismatchError(f"cannot compare the model with the codebook file: {e}") from None
        m = self._meta["model"]
        ours = m.get("fingerprint")
        if not isinstance(ours, Mapping):  # files without a fingerprint: the basic fields
            ours = {
                "model_type": m["model_type"],
                "num_hidden_layers": m["num_layers"],
                "num_key_value_heads": m["num_kv_heads"],
                "num_attention_heads": m["num_attention_heads"],
                "head_dim": m["head_dim"],
            }
        for field in FINGERPRINT_FIELDS:
            if field not in ours and field not in theirs:
                continue
            a, b = ours.get(field, "absent"), theirs.get(field, "absent")
            if a != b:
                raise ModelMismatchError(
                    f"codebook file was made for {m['id']!r} ({m['model_type']}): "
                    f"{field} {a} (file) != {b} (model)"
                )

    def __repr__(self) -> str:
        return (
            f"Codebooks(model={self.model_id!r}, layers={self.num_layers}, head_dim={self.head_dim}, "
            f"kv_heads={self.num_kv_heads}, {self._config.describe()}, dtype={self.dtype})"
        )

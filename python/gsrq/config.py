"""GSRQ configuration: how keys and values are quantized, calibrated and cached.

A :class:`GSRQConfig` travels inside every codebook file (its ``to_dict`` form)
so that a cache built from the file quantizes exactly as calibration assumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from gsrq.errors import ConfigError

METHODS = ("gskm", "km")
GRAD_WEIGHTS = ("all", "init", "off")
ROTATIONS = ("none", "hadamard", "hadamard_signs")
KEY_SCALE_FITS = ("rms", "grad")
KINDS = ("keys", "values")


@dataclass(frozen=True)
class KindConfig:
    """Residual quantizer shape for one kind (keys or values).

    D: chunk length (channels per sub-vector; must divide head_dim).
    Kc: codewords per codebook (code width ``ceil(log2 Kc)`` bits).
    M: residual stages.
    """

    D: int = 64
    Kc: int = 256
    M: int = 8

    def __post_init__(self) -> None:
        for name in ("D", "Kc", "M"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.Kc < 2 or self.Kc > 65536:
            raise ConfigError(f"Kc must be in 2..=65536, got {self.Kc}")

    @property
    def code_bits(self) -> int:
        """Bits of one code, ``ceil(log2 Kc)``."""
        return max(1, math.ceil(math.log2(self.Kc)))

    @property
    def bits_per_element(self) -> float:
        """Code bits per channel of a compressed token: ``M * code_bits / D``."""
        return self.M * self.code_bits / self.D

    def chunks(self, head_dim: int) -> int:
        """Chunk positions per head vector; raises if D does not divide head_dim."""
        if head_dim % self.D:
            raise ConfigError(f"D={self.D} does not divide head_dim={head_dim}")
        return head_dim // self.D

    def codes_per_token(self, head_dim: int) -> int:
        """Codes stored per token and KV head: chunks x stages."""
        return self.chunks(head_dim) * self.M

    def bytes_per_token(self, head_dim: int) -> int:
        """Packed bytes per token and KV head (one packed row)."""
        return math.ceil(self.codes_per_token(head_dim) * self.code_bits / 8)


# Defaults per code rate, from the ablation under the full protocol (README "Quality",
# docs/results/quality.md; SmolLM2-135M, held-out wiki, 64k calibration tokens): whole-head
# chunks (D=64) with many stages of Kc=256 at <= 1 bit, D=32 at 2 bits; more stages for keys
# than for values at the same total (10/6 at 1 bit: keys move perplexity more); keys quantized
# as unit vectors with a 16-bit norm (key_norm) after a per-KV-head channel scale fitted from
# the keys' loss gradients (key_scale_fit="grad", folded into the query by the fused kernel);
# GSKM at <= 1 bit, weighted KM at 2 bits (D=32, where KM measured better); 98304 calibration
# samples per codebook (more data was one of the strongest levers).
# Codebooks stay shared across KV heads: per-head codebooks are strong per *code* bit but
# multiply the codebook memory by num_kv_heads. Pass per_head=True where codebooks are
# amortised over many sequences.
# 0.75 and 0.375 bits were not measured: they follow the measured rates' pattern.
# D=64 chunks need head_dim % 64 == 0 (SmolLM2: 64, LLaMA-3-8B: 128).
_LEVERS: dict[str, Any] = {"key_norm": True, "key_scale": True, "key_scale_fit": "grad"}
_FROM_BITS: dict[float, dict[str, Any]] = {
    2.0: {"keys": KindConfig(D=32, Kc=256, M=10), "values": KindConfig(D=32, Kc=256, M=6), "method": "km",
          **_LEVERS},
    1.0: {"keys": KindConfig(D=64, Kc=256, M=10), "values": KindConfig(D=64, Kc=256, M=6), **_LEVERS},
    0.75: {"keys": KindConfig(D=64, Kc=256, M=8), "values": KindConfig(D=64, Kc=256, M=4), **_LEVERS},
    0.5: {"keys": KindConfig(D=64, Kc=256, M=5), "values": KindConfig(D=64, Kc=256, M=3), **_LEVERS},
    0.375: {"keys": KindConfig(D=64, Kc=256, M=4), "values": KindConfig(D=64, Kc=256, M=2), **_LEVERS},
}


@dataclass(frozen=True)
class GSRQConfig:
    """Everything that decides how a KV cache is quantized.

    keys / values: residual quantizer shape of each kind.
    method: codebook learner, ``"gskm"`` (Gain-Shape K-means) or ``"km"``
        (weighted k-means, the VQLLM-style baseline).
    grad_weights: where gradient sample weights enter the learner: ``"all"``
        (every sum and mean), ``"init"`` (spherical initialisation only) or
        ``"off"``.
    tau: weight scale, ``w = log(1 + tau * |g| / median|g|)``.
    per_head: one codebook set per KV head instead of one shared by all heads.
    sinks: first tokens of a sequence kept exact.
    window: most recent tokens kept exact (0: none).
    seed: seed of sampling and initialisation.
    init_iters / iters: spherical k-means initialisation / alternating (or
        Lloyd) iterations.
    max_samples: calibration samples kept per codebook (seeded subsampling).
    beam: beam width of encoding over the residual stages (1: greedy).
    key_rotation: fixed orthogonal rotation of each key head vector before
        quantization (``"hadamard"``, ``"hadamard_signs"`` or ``"none"``).
    key_scale: per-channel key scales fixed at calibration.
    key_scale_fit: how the key scales are fitted: ``"rms"`` (the channel's
        root-mean-square over the calibration keys, pooled over heads with
        shared codebooks) or ``"grad"`` (from the loss gradients of the keys,
        one row per KV head: the code domain is ``y = x * E[g^2]^(p/2)``, so
        channels the loss is sensitive to get a larger share of the error
        budget; ``p`` = ``key_scale_power``).
    key_scale_power: the exponent ``p`` of ``key_scale_fit="grad"``.
    key_norm: store each key's l2 norm in 16 bits and quantize the unit vector.
    """

    keys: KindConfig = field(default_factory=KindConfig)
    values: KindConfig = field(default_factory=KindConfig)
    method: str = "gskm"
    grad_weights: str = "all"
    tau: float = 1.0
    per_head: bool = False
    sinks: int = 4
    window: int = 0
    seed: int = 0
    init_iters: int = 20
    iters: int = 10
    max_samples: int = 98304
    beam: int = 1
    key_rotation: str = "none"
    key_scale: bool = False
    key_norm: bool = False
    key_scale_fit: str = "rms"
    key_scale_power: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.keys, KindConfig) or not isinstance(self.values, KindConfig):
            raise ConfigError("keys and values must be KindConfig instances")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.grad_weights not in GRAD_WEIGHTS:
            raise ConfigError(f"grad_weights must be one of {GRAD_WEIGHTS}, got {self.grad_weights!r}")
        if self.key_rotation not in ROTATIONS:
            raise ConfigError(f"key_rotation must be one of {ROTATIONS}, got {self.key_rotation!r}")
        if self.key_scale_fit not in KEY_SCALE_FITS:
            raise ConfigError(f"key_scale_fit must be one of {KEY_SCALE_FITS}, got {self.key_scale_fit!r}")
        p = self.key_scale_power
        if not (isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) and p > 0):
            raise ConfigError(f"key_scale_power must be a finite positive number, got {p!r}")
        if not (isinstance(self.tau, (int, float)) and math.isfinite(self.tau) and self.tau > 0):
            raise ConfigError(f"tau must be a finite positive number, got {self.tau!r}")
        for name in ("sinks", "window", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {v!r}")
        for name in ("init_iters", "iters", "max_samples", "beam"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")

    # ----------------------------------------------------------------- presets
    @classmethod
    def from_bits(cls, bits: float, **overrides: Any) -> "GSRQConfig":
        """The measured-best configuration at a code rate of ``bits`` per element.

        Supported rates: 2, 1, 0.75, 0.5 and 0.375. Any field can be overridden.
        """
        key = float(bits)
        if key not in _FROM_BITS:
            raise ConfigError(
                f"no preset for {bits} bits per element; choose one of "
                f"{sorted(_FROM_BITS)} or give keys/values KindConfigs"
            )
        params: dict[str, Any] = dict(_FROM_BITS[key])
        params.update(overrides)
        return cls(**params)

    @staticmethod
    def preset_rates() -> list[float]:
        return sorted(_FROM_BITS)

    # ------------------------------------------------------------------- rates
    def kind(self, kind: str) -> KindConfig:
        if kind not in KINDS:
            raise ConfigError(f"kind must be 'keys' or 'values', got {kind!r}")
        return self.keys if kind == "keys" else self.values

    def validate_for(self, head_dim: int, num_kv_heads: int | None = None) -> None:
        """Raise ConfigError if this configuration cannot serve a model with these shapes."""
        for kind in KINDS:
            self.kind(kind).chunks(head_dim)
        if self.key_rotation != "none" and head_dim & (head_dim - 1):
            raise ConfigError(f"key_rotation={self.key_rotation!r} needs a power-of-two head_dim, got {head_dim}")

    @property
    def code_bits_per_element(self) -> float:
        """Mean code rate of keys and values, no overhead (what from_bits names)."""
        return (self.keys.bits_per_element + self.values.bits_per_element) / 2

    def bits_per_element(
        self,
        context_len: int | None = None,
        *,
        head_dim: int | None = None,
        num_kv_heads: int | None = None,
        codebook_bits: int = 16,
        exact_bits: int = 16,
    ) -> float:
        """Bits per cached element, averaged over keys and values.

        Without ``context_len``: the code rate alone. With it (and the model's
        ``head_dim`` and ``num_kv_heads``): everything held for one layer of a
        ``context_len``-token sequence — codes, 16-bit per-token key norms,
        exact sink and window tokens, per-channel key scales and the codebooks
        themselves (amortised over that one sequence) — divided by the number
        of elements cached.
        """
        if context_len is None:
            return self.code_bits_per_element
        return self.rate_report(
            context_len,
            head_dim=head_dim,
            num_kv_heads=num_kv_heads,
            codebook_bits=codebook_bits,
            exact_bits=exact_bits,
        )["total"]

    def rate_report(
        self,
        context_len: int,
        *,
        head_dim: int | None,
        num_kv_heads: int | None,
        codebook_bits: int = 16,
        exact_bits: int = 16,
    ) -> dict[str, float]:
        """Bits per element split into parts, for one layer of one sequence."""
        if head_dim is None or num_kv_heads is None:
            raise ConfigError("bits_per_element with a context length needs head_dim and num_kv_heads")
        if context_len < 1:
            raise ConfigError(f"context_len must be >= 1, got {context_len}")
        self.validate_for(head_dim)
        exact = min(context_len, self.sinks + self.window)
        coded = context_len - exact
        elements = 2 * context_len * num_kv_heads * head_dim  # keys + values
        parts = {"codes": 0.0, "norms": 0.0, "exact": 0.0, "codebooks": 0.0, "scales": 0.0}
        heads_with_books = num_kv_heads if self.per_head else 1
        for kind in KINDS:
            kc = self.kind(kind)
            parts["codes"] += coded * num_kv_heads * kc.bytes_per_token(head_dim) * 8
            parts["exact"] += exact * num_kv_heads * head_dim * exact_bits
            parts["codebooks"] += heads_with_books * kc.chunks(head_dim) * kc.M * kc.Kc * kc.D * codebook_bits
        if self.key_norm:
            parts["norms"] += coded * num_kv_heads * 16
        if self.key_scale:
            parts["scales"] += self.key_scale_rows(num_kv_heads) * head_dim * 16
        out = {k: v / elements for k, v in parts.items()}
        out["total"] = sum(out.values())
        out["total_without_overhead"] = out["codes"] * context_len / max(coded, 1) if coded else 0.0
        return out

    def key_scale_rows(self, num_kv_heads: int) -> int:
        """Rows of the fitted key scale: one per KV head (``grad`` fit or per-head codebooks), else 1."""
        return num_kv_heads if (self.per_head or self.key_scale_fit == "grad") else 1

    # ---------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GSRQConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}")
        params = dict(d)
        for kind in KINDS:
            if kind in params:
                kd = params[kind]
                if isinstance(kd, dict):
                    extra = sorted(set(kd) - {"D", "Kc", "M"})
                    if extra:
                        raise ConfigError(f"unknown field(s) {extra} in config.{kind}")
                    params[kind] = KindConfig(**kd)
                elif not isinstance(kd, KindConfig):
                    raise ConfigError(f"config.{kind} must be an object with D, Kc, M")
        return cls(**params)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def config_hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> "GSRQConfig":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        k, v = self.keys, self.values
        return (
            f"{self.method} K[D={k.D},Kc={k.Kc},M={k.M}] V[D={v.D},Kc={v.Kc},M={v.M}] "
            f"{self.code_bits_per_element:g} bit, grad_weights={self.grad_weights}, tau={self.tau:g}"
        )

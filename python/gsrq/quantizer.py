"""Per-layer, per-kind GSRQ quantizer: encode head vectors to packed codes and back.

A :class:`KVQuantizer` holds the codebooks of one layer and one kind (keys or
values) and turns head vectors ``[B, Hkv, T, hd]`` into packed code rows
``uint8 [B, Hkv, T, R]`` (the layer of docs/contracts.md, "Packed cache rows")
and back. The cache, perplexity evaluation (fake quantization) and calibration
(the code domain of the key levers) all go through it, so they quantize
identically.

Key levers (keys only, fixed at calibration), applied in this order before
residual quantization and undone in reverse order after decoding:

1. rotation: ``y = x @ R`` with ``R`` an orthogonal ``[hd, hd]`` matrix
   (``"hadamard"``: the Sylvester Hadamard matrix divided by ``sqrt(hd)``;
   ``"hadamard_signs"``: ``diag(signs) @`` that matrix, ``signs`` a ``±1``
   vector ``[hd]`` stored with the codebooks as ``layers.{l}.keys.signs``);
2. channel scale: ``y = y / scale`` with ``scale`` ``[H, hd]`` positive
   (``layers.{l}.keys.scale``);
3. norm: ``n = ||y||`` per token and head, stored as float16, and the unit
   vector ``y / n`` is quantized; the reconstruction is multiplied by ``n``.

The code domain (what codebooks are trained on) is the output of these steps:
:meth:`KVQuantizer.to_code_domain`. With no lever the code domain is ``x``.

Encoding (``engine="auto"``) runs on the CPU through the Rust engine
(``gsrq._gsrq.rq_encode`` and ``pack_codes``) when the extension provides
them, on a CUDA device through the fused encode kernel
(:func:`gsrq.kernels.rq_encode_cuda`, straight into packed rows), and through
the pure-torch reference (:mod:`gsrq.reference`) elsewhere (or, after a
one-time RuntimeWarning, on a GPU whose kernels cannot load). All are greedy
with ties to the lowest index. Decoding is a torch gather on the codebooks'
device.

Input checks that need the values (NaN/inf inputs, float16 norm overflow,
out-of-range packed codes) read them on the host, which on a GPU would
synchronise every call; by default (``check_values=None``) they run for CPU
tensors only. ``check_values=True`` checks on every device.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch

from gsrq import reference
from gsrq.config import KINDS, KindConfig
from gsrq.errors import CodebookFormatError, ConfigError, InvalidValueError, ShapeError

ENGINES = ("auto", "torch", "rust", "cuda")

__all__ = ["ENGINES", "Encoded", "KVQuantizer", "hadamard_matrix", "pack_codes_fast", "unpack_codes_fast"]


class Encoded(NamedTuple):
    """Output of :meth:`KVQuantizer.encode`.

    packed: uint8 ``[B, Hkv, T, R]`` code rows (codes ordered ``c * M + m``).
    norms: float16 ``[B, Hkv, T]`` per-token norms when the norm lever is on, else None.
    """

    packed: torch.Tensor
    norms: torch.Tensor | None


def _rust_engine() -> Any | None:
    """The Rust extension module when it provides encoding and packing, else None."""
    try:
        from gsrq import _gsrq  # type: ignore[attr-defined]
    except ImportError:
        return None
    if hasattr(_gsrq, "rq_encode") and hasattr(_gsrq, "pack_codes"):
        return _gsrq
    return None


def hadamard_matrix(n: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """Orthogonal ``[n, n]`` float32 rotation: Sylvester Hadamard / sqrt(n), rows scaled by ``signs``.

    ``n`` must be a power of two; ``signs`` (``[n]``, entries ±1) multiplies row
    ``i`` by ``signs[i]``, i.e. ``x @ R == (x * signs) @ H / sqrt(n)``.
    """
    if n < 1 or n & (n - 1):
        raise ConfigError(f"a Hadamard rotation needs a power-of-two size, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / math.sqrt(n)
    if signs is not None:
        s = torch.as_tensor(signs, dtype=torch.float32).flatten()
        if s.shape != (n,):
            raise ShapeError(f"rotation signs must have shape [{n}], got {list(s.shape)}")
        if not bool(((s == 1) | (s == -1)).all()):
            raise InvalidValueError("rotation signs must all be +1 or -1")
        h = s[:, None] * h
    return h


def unpack_codes_fast(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """:func:`gsrq.reference.unpack_codes_torch` with byte-aligned fast paths (bits 1, 2, 4, 8, 16).

    packed: uint8 ``[..., nbytes]`` -> int64 codes ``[..., count]``.
    """
    lead = packed.shape[:-1]
    if bits == 8:
        return packed[..., :count].long()
    if bits == 16:
        p = packed[..., : 2 * count].long().reshape(*lead, count, 2)
        return p[..., 0] | (p[..., 1] << 8)
    if bits in (1, 2, 4):
        per = 8 // bits
        shifts = torch.arange(0, 8, bits, device=packed.device)
        vals = (packed.long().unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return vals.reshape(*lead, packed.shape[-1] * per)[..., :count]
    return reference.unpack_codes_torch(packed, bits, count)


def pack_codes_fast(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`gsrq.reference.pack_codes_torch` with byte-aligned fast paths (bits 1, 2, 4, 8, 16).

    codes: int ``[..., n]`` (each < 2**bits) -> uint8 ``[..., ceil(n * bits / 8)]``.
    """
    lead, n = codes.shape[:-1], codes.shape[-1]
    c = codes.long()
    if bits == 8:
        return c.to(torch.uint8)
    if bits == 16:
        return torch.stack([c & 0xFF, c >> 8], dim=-1).reshape(*lead, 2 * n).to(torch.uint8)
    if bits in (1, 2, 4):
        per = 8 // bits
        nbytes = (n * bits + 7) // 8
        if nbytes * per != n:
            c = torch.cat([c, c.new_zeros(*lead, nbytes * per - n)], dim=-1)
        shifts = torch.arange(0, 8, bits, device=codes.device)
        return (c.reshape(*lead, nbytes, per) << shifts).sum(-1).to(torch.uint8)
    return reference.pack_codes_torch(codes, bits)


_encode_warned: set[str] = set()


def _warn_encode_fallback(reason: str) -> None:
    if reason in _encode_warned:
        return
    _encode_warned.add(reason)
    warnings.warn(
        f"gsrq: CUDA encode kernel not used ({reason}); encoding with the torch reference", RuntimeWarning, stacklevel=4
    )


class KVQuantizer:
    """Residual quantizer of one layer and one kind.

    codebooks: float ``[H, C, M, Kc, D]`` (``H`` = 1 when shared by all KV
        heads, else the number of KV heads; ``C * D`` = head_dim).
    kind_config: the :class:`KindConfig` (D, Kc, M) the codebooks were trained for.
    rotation: optional orthogonal float ``[hd, hd]`` key rotation (``y = x @ rotation``).
    scale: optional positive float ``[H, hd]`` (or ``[hd]``) channel scale (``y = y / scale``);
        with shared codebooks (``H`` = 1) also ``[Hkv, hd]``, one row per KV head.
    norm: quantize unit vectors and keep float16 per-token norms.
    beam: beam width over residual stages (1: greedy). Beams > 1 need the Rust engine.
    engine: ``"auto"`` (Rust on CPU tensors when built, the CUDA encode kernel
        on CUDA tensors when it loads, torch elsewhere), ``"torch"``, ``"rust"``
        or ``"cuda"`` (the kernel or an error).
    threads: Rust engine threads (None: all cores).
    check_values: check input values (finite, norms within float16, codes < Kc):
        None checks CPU tensors only (no GPU sync), True every device, False never.

    Decoded vectors are float32 (the codebooks are kept in float32 on ``device``).
    """

    def __init__(
        self,
        codebooks: torch.Tensor | np.ndarray,
        kind_config: KindConfig,
        *,
        rotation: torch.Tensor | np.ndarray | None = None,
        scale: torch.Tensor | np.ndarray | None = None,
        norm: bool = False,
        beam: int = 1,
        engine: str = "auto",
        threads: int | None = None,
        device: torch.device | str | None = None,
        check_values: bool | None = None,
    ) -> None:
        if not isinstance(kind_config, KindConfig):
            raise ConfigError(f"kind_config must be a KindConfig, got {type(kind_config).__name__}")
        if engine not in ENGINES:
            raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
        if not isinstance(beam, int) or isinstance(beam, bool) or beam < 1:
            raise ConfigError(f"beam must be a positive integer, got {beam!r}")
        cb = torch.as_tensor(codebooks)
        if not cb.is_floating_point():
            raise ShapeError(f"codebooks must be a float tensor, got {cb.dtype}")
        if cb.dim() != 5:
            raise ShapeError(f"codebooks must have shape [H, C, M, Kc, D], got {list(cb.shape)}")
        H, C, M, Kc, D = cb.shape
        kc = kind_config
        if (M, Kc, D) != (kc.M, kc.Kc, kc.D):
            raise ShapeError(
                f"codebooks [H, C, M, Kc, D] = {list(cb.shape)} do not match the config "
                f"(M={kc.M}, Kc={kc.Kc}, D={kc.D})"
            )
        if H < 1 or C < 1:
            raise ShapeError(f"codebooks need H >= 1 and C >= 1, got {list(cb.shape)}")
        cb = cb.to(device=device, dtype=torch.float32)
        if not bool(torch.isfinite(cb).all()):
            raise InvalidValueError("codebooks contain NaN or inf")
        self.codebooks = cb.contiguous()
        self.kind_config = kc
        self.head_dim = C * D
        self.num_codebook_heads = H
        self.beam = beam
        self.engine = engine
        self.threads = threads
        self.norm = bool(norm)
        if check_values not in (None, True, False):
            raise ConfigError(f"check_values must be None, True or False, got {check_values!r}")
        self.check_values = check_values
        self._sqnorms: torch.Tensor | None = None
        hd = self.head_dim

        self.rotation: torch.Tensor | None = None
        if rotation is not None:
            r = torch.as_tensor(rotation).to(device=cb.device, dtype=torch.float32)
            if r.shape != (hd, hd):
                raise ShapeError(f"rotation must have shape [{hd}, {hd}], got {list(r.shape)}")
            eye = torch.eye(hd, device=r.device)
            if not torch.allclose(r @ r.T, eye, atol=1e-4):
                raise InvalidValueError("rotation must be an orthogonal matrix")
            self.rotation = r.contiguous()

        self.scale: torch.Tensor | None = None
        if scale is not None:
            s = torch.as_tensor(scale).to(device=cb.device, dtype=torch.float32)
            if s.dim() == 1:
                s = s.unsqueeze(0)
            # one row for all heads, one per codebook head, or (shared codebooks) one per KV head
            if s.dim() != 2 or s.shape[1] != hd or (H > 1 and s.shape[0] not in (1, H)):
                raise ShapeError(f"scale must have shape [{H}, {hd}] or [{hd}], got {list(s.shape)}")
            if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
                raise InvalidValueError("scale must be finite and positive")
            self.scale = s.contiguous()

    # ----------------------------------------------------------- construction
    @classmethod
    def from_codebooks(
        cls,
        cbs: Any,
        layer: int,
        kind: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        engine: str = "auto",
        threads: int | None = None,
        check_values: bool | None = None,
    ) -> "KVQuantizer":
        """The quantizer of ``layer`` and ``kind`` of a :class:`gsrq.Codebooks` object.

        Levers follow ``cbs.config`` (keys only): ``key_rotation``, ``key_scale``
        (aux tensor ``scale``), ``key_norm``. ``dtype`` must be None or float32:
        decoding always computes in float32 (callers cast to the model dtype).
        """
        if kind not in KINDS:
            raise ConfigError(f"kind must be 'keys' or 'values', got {kind!r}")
        if dtype not in (None, torch.float32):
            raise ConfigError(f"KVQuantizer computes in float32; dtype={dtype} is not supported")
        cfg = cbs.config
        num_layers = int(cbs.num_layers)
        if not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ConfigError(f"layer must be in 0..{num_layers - 1}, got {layer!r}")
        books = np.array(cbs.codebooks(layer, kind), dtype=np.float32, copy=True)  # files give read-only arrays
        hd = int(books.shape[1] * books.shape[4]) if books.ndim == 5 else None
        rotation = scale = None
        norm = False
        if kind == "keys":
            if cfg.key_rotation != "none":
                if hd is None:
                    raise CodebookFormatError(f"layers.{layer}.keys.codebooks must be 5-D, got {books.shape}")
                signs = None
                if cfg.key_rotation == "hadamard_signs":
                    signs = cbs.aux(layer, kind, "signs")
                    if signs is None:
                        raise CodebookFormatError(
                            f"key_rotation='hadamard_signs' but the file has no layers.{layer}.keys.signs tensor"
                        )
                    signs = torch.from_numpy(np.array(signs, dtype=np.float32, copy=True))
                rotation = hadamard_matrix(hd, signs)
            if cfg.key_scale:
                scale = cbs.aux(layer, kind, "scale")
                if scale is None:
                    raise CodebookFormatError(f"key_scale is on but the file has no layers.{layer}.keys.scale tensor")
                scale = np.array(scale, dtype=np.float32, copy=True)
            norm = bool(cfg.key_norm)
        return cls(
            torch.from_numpy(books),
            cfg.kind(kind),
            rotation=rotation,
            scale=scale,
            norm=norm,
            beam=cfg.beam,
            engine=engine,
            threads=threads,
            device=device,
            check_values=check_values,
        )

    def to(self, device: torch.device | str) -> "KVQuantizer":
        """This quantizer with its tensors on ``device`` (self when already there)."""
        device = torch.device(device)
        if self.codebooks.device == device:
            return self
        new = object.__new__(KVQuantizer)
        new.__dict__.update(self.__dict__)
        new.codebooks = self.codebooks.to(device)
        new.rotation = None if self.rotation is None else self.rotation.to(device)
        new.scale = None if self.scale is None else self.scale.to(device)
        new._sqnorms = None
        return new

    # ------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.codebooks.device

    @property
    def code_bits(self) -> int:
        return self.kind_config.code_bits

    @property
    def num_chunks(self) -> int:
        return int(self.codebooks.shape[1])

    @property
    def codes_per_token(self) -> int:
        """Codes per token and KV head: ``C * M``."""
        return self.num_chunks * self.kind_config.M

    @property
    def row_bytes(self) -> int:
        """``R``: packed bytes per token and KV head."""
        return math.ceil(self.codes_per_token * self.code_bits / 8)

    @property
    def bytes_per_token(self) -> int:
        """Bytes held per coded token and KV head: the packed row plus a float16 norm if any."""
        return self.row_bytes + (2 if self.norm else 0)

    @property
    def bits_per_element(self) -> float:
        """Bits held per coded element: packed row (with its byte padding) and norm, over head_dim."""
        return self.bytes_per_token * 8 / self.head_dim

    @property
    def codebook_bytes(self) -> int:
        """Bytes of the codebooks as they would be stored in 16-bit floats."""
        return int(self.codebooks.numel()) * 2

    @property
    def query_map(self) -> torch.Tensor | None:
        """``[H, hd, hd]`` float32 map with ``<q, x_hat> = n * <q @ query_map[h], rq_hat>``, or None.

        ``H``: codebook heads, or the KV heads when shared codebooks have
        per-KV-head scales.

        ``rq_hat`` is the plain residual reconstruction (sum of codewords) and
        ``n`` the stored norm (1 without the norm lever). None when there is
        no rotation and no scale.
        """
        if self.rotation is None and self.scale is None:
            return None
        hd = self.head_dim
        r = self.rotation if self.rotation is not None else torch.eye(hd, device=self.device)
        H = self.num_codebook_heads
        if self.scale is None:
            return r.unsqueeze(0).expand(H, hd, hd).contiguous()
        H = max(H, int(self.scale.shape[0]))  # per-KV-head scales with shared codebooks: one map per KV head
        return (r.unsqueeze(0) * self.scale.unsqueeze(1)).expand(H, hd, hd).contiguous()

    def __repr__(self) -> str:
        kc = self.kind_config
        levers = [n for n, on in (("rotation", self.rotation is not None), ("scale", self.scale is not None), ("norm", self.norm)) if on]
        return (
            f"KVQuantizer(H={self.num_codebook_heads}, C={self.num_chunks}, D={kc.D}, Kc={kc.Kc}, M={kc.M}, "
            f"levers={levers or 'none'}, device={self.device})"
        )

    # ----------------------------------------------------------- code domain
    def _check_x(self, x: torch.Tensor, name: str = "x") -> None:
        if not isinstance(x, torch.Tensor):
            raise ShapeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ShapeError(f"{name} must have shape [B, Hkv, T, head_dim], got {list(x.shape)}")
        if x.shape[-1] != self.head_dim:
            raise ShapeError(f"{name} has head_dim {x.shape[-1]}, the codebooks need {self.head_dim}")
        H = self.num_codebook_heads
        if H > 1 and x.shape[1] != H:
            raise ShapeError(f"{name} has {x.shape[1]} KV heads, the per-head codebooks have {H}")
        if self.scale is not None and self.scale.shape[0] > 1 and x.shape[1] != self.scale.shape[0]:
            raise ShapeError(f"{name} has {x.shape[1]} KV heads, the key scale has {self.scale.shape[0]} rows")
        if not x.is_floating_point():
            raise ShapeError(f"{name} must be a float tensor, got {x.dtype}")
        if self._check_values(x) and not bool(torch.isfinite(x).all()):
            raise InvalidValueError(f"{name} contains NaN or inf")

    def _check_values(self, t: torch.Tensor) -> bool:
        """Whether to run value checks on ``t`` (they read it on the host)."""
        return self.check_values if self.check_values is not None else t.device.type == "cpu"

    def _scale_b(self) -> torch.Tensor:
        # [H, hd] -> broadcastable over [B, Hkv, T, hd]
        assert self.scale is not None
        return self.scale[None, :, None, :]

    def to_code_domain(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Apply the key levers: x ``[B, Hkv, T, hd]`` -> (y float32 same shape, norms float16 ``[B, Hkv, T]`` or None).

        ``y`` is what the codebooks quantize (unit vectors with the norm lever).
        """
        self._check_x(x)
        y = x.to(device=self.device, dtype=torch.float32)
        if self.rotation is not None:
            y = y @ self.rotation
        if self.scale is not None:
            y = y / self._scale_b()
        norms = None
        if self.norm:
            n = torch.linalg.vector_norm(y, dim=-1)
            y = y / n.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
            norms = n.to(torch.float16)
            if self._check_values(norms) and not bool(torch.isfinite(norms).all()):
                raise InvalidValueError("a key norm overflows float16")
        return y, norms

    def from_code_domain(self, y: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        """Undo the key levers: y float32 ``[B, Hkv, T, hd]`` (+ norms ``[B, Hkv, T]``) -> x float32."""
        if self.norm:
            if norms is None:
                raise ShapeError("this quantizer keeps per-token norms; decode needs them")
            if norms.shape != y.shape[:-1]:
                raise ShapeError(f"norms must have shape {list(y.shape[:-1])}, got {list(norms.shape)}")
            y = y * norms.to(device=y.device, dtype=torch.float32).unsqueeze(-1)
        elif norms is not None:
            raise ShapeError("norms given to a quantizer without the norm lever")
        if self.scale is not None:
            y = y * self._scale_b()
        if self.rotation is not None:
            y = y @ self.rotation.T
        return y

    # ----------------------------------------------------------------- codes
    def _use_rust(self, y: torch.Tensor) -> Any | None:
        if self.engine in ("torch", "cuda"):  # 'cuda' computes unpacked codes with the torch reference
            if self.beam > 1:
                raise ConfigError(f"beam > 1 needs the Rust engine; engine={self.engine!r} is greedy only")
            return None
        eng = _rust_engine()
        if self.engine == "rust" or self.beam > 1:
            if eng is None:
                raise ConfigError(
                    "the Rust engine (gsrq._gsrq.rq_encode) is not available; build it with `make ext`"
                    + (" (beam > 1 needs it)" if self.beam > 1 else "")
                )
            return eng
        return eng if y.device.type == "cpu" else None

    def codes(self, y: torch.Tensor) -> torch.Tensor:
        """Greedy (or beam) RQ codes of code-domain vectors: y ``[B, Hkv, T, hd]`` -> int64 ``[B, Hkv, T, C, M]``."""
        B, Hkv, T, hd = y.shape
        C, M, D = self.num_chunks, self.kind_config.M, self.kind_config.D
        H = self.num_codebook_heads
        eng = self._use_rust(y)
        if eng is None:
            if H == 1:
                return reference.rq_encode_torch(y, self.codebooks[0])
            return torch.stack([reference.rq_encode_torch(y[:, h], self.codebooks[h]) for h in range(H)], dim=1)
        out = torch.empty(B, Hkv, T, C, M, dtype=torch.int64)
        ycpu = y.detach().to("cpu", torch.float32)
        cbcpu = self.codebooks.to("cpu")
        for h in range(H):
            heads = slice(None) if H == 1 else slice(h, h + 1)
            for c in range(C):
                xs = np.ascontiguousarray(ycpu[:, heads, :, c * D : (c + 1) * D].reshape(-1, D).numpy())
                cb = np.ascontiguousarray(cbcpu[h, c].numpy())
                codes = eng.rq_encode(xs, cb, self.beam, self.threads)
                out[:, heads, :, c, :] = torch.from_numpy(np.asarray(codes).astype(np.int64)).reshape(B, -1, T, M)
        return out.to(y.device)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of codewords: int codes ``[B, Hkv, T, C, M]`` -> code-domain float32 ``[B, Hkv, T, hd]``."""
        C, M, Kc, D = self.num_chunks, self.kind_config.M, self.kind_config.Kc, self.kind_config.D
        if codes.dim() != 5 or codes.shape[-2:] != (C, M):
            raise ShapeError(f"codes must have shape [B, Hkv, T, {C}, {M}], got {list(codes.shape)}")
        B, Hkv, T = codes.shape[:3]
        H = self.num_codebook_heads
        if H > 1 and Hkv != H:
            raise ShapeError(f"codes have {Hkv} KV heads, the per-head codebooks have {H}")
        # one flat table [H * C * M * Kc, D]; row of (h, c, m, code) = ((h * C + c) * M + m) * Kc + code
        offset = (torch.arange(C * M, device=self.device) * Kc).view(C, M)
        idx = codes.to(self.device).long() + offset
        if H > 1:
            idx = idx + (torch.arange(H, device=self.device) * (C * M * Kc)).view(1, H, 1, 1, 1)
        words = torch.nn.functional.embedding(idx, self.codebooks.view(-1, D))  # [B, Hkv, T, C, M, D]
        return words.sum(-2).reshape(B, Hkv, T, C * D)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """int codes ``[B, Hkv, T, C, M]`` -> packed uint8 rows ``[B, Hkv, T, R]`` (little-endian bitstream)."""
        flat = codes.reshape(*codes.shape[:3], self.codes_per_token)
        eng = _rust_engine() if (self.engine != "torch" and flat.device.type == "cpu") else None
        if eng is not None:
            packed = eng.pack_codes(np.ascontiguousarray(flat.numpy().astype(np.uint16)), self.code_bits)
            return torch.from_numpy(np.asarray(packed, dtype=np.uint8))
        return pack_codes_fast(flat, self.code_bits)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """packed uint8 ``[B, Hkv, T, R]`` -> int64 codes ``[B, Hkv, T, C, M]``."""
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
            raise ShapeError(f"packed codes must be a uint8 tensor, got {getattr(packed, 'dtype', type(packed))}")
        if packed.dim() != 4 or packed.shape[-1] != self.row_bytes:
            raise ShapeError(f"packed codes must have shape [B, Hkv, T, {self.row_bytes}], got {list(packed.shape)}")
        codes = unpack_codes_fast(packed.to(self.device), self.code_bits, self.codes_per_token)
        if (
            self.kind_config.Kc < (1 << self.code_bits)
            and self._check_values(codes)
            and bool((codes >= self.kind_config.Kc).any())
        ):
            raise InvalidValueError(f"packed codes hold a code >= Kc={self.kind_config.Kc}")
        return codes.reshape(*packed.shape[:3], self.num_chunks, self.kind_config.M)

    # ------------------------------------------------------------ main API
    def encode(self, x: torch.Tensor) -> Encoded:
        """x float ``[B, Hkv, T, hd]`` -> :class:`Encoded` (packed uint8 ``[B, Hkv, T, R]``, norms or None).

        Tensors come back on the codebooks' device. On a CUDA device the fused
        encode kernel writes the packed rows (see the class docstring).
        """
        y, norms = self.to_code_domain(x)
        packed = self._encode_cuda(y) if self._use_cuda(y) else None
        if packed is None:
            packed = self.pack(self.codes(y)).to(self.device)
        return Encoded(packed, norms)

    def _use_cuda(self, y: torch.Tensor) -> bool:
        """Whether encode runs the CUDA kernel (raises for engine='cuda' where it cannot)."""
        if self.engine == "cuda":
            if not y.is_cuda:
                raise ConfigError(f"engine='cuda' needs the codebooks on a CUDA device, they are on {y.device}")
            if self.beam > 1:
                raise ConfigError("engine='cuda' encodes greedily; beam > 1 needs the Rust engine")
            return True
        return self.engine == "auto" and self.beam == 1 and y.is_cuda

    def _codeword_sqnorms(self) -> torch.Tensor:
        """float32 ``[H, C, M, Kc]`` squared codeword norms (computed once per device)."""
        if self._sqnorms is None or self._sqnorms.device != self.codebooks.device:
            self._sqnorms = (self.codebooks**2).sum(-1).contiguous()
        return self._sqnorms

    def _encode_cuda(self, y: torch.Tensor) -> torch.Tensor | None:
        """Packed rows ``[B, Hkv, T, R]`` from the CUDA kernel; None (after a warning once) if it cannot run."""
        from gsrq import kernels
        from gsrq.errors import KernelUnavailableError

        B, Hkv, T, hd = y.shape
        x = y.transpose(1, 2).reshape(B * T, Hkv, hd)  # [N, Hkv, hd], token-major as the kernel reads it
        try:
            out = kernels.rq_encode_cuda(x, self.codebooks, self.code_bits, norms=self._codeword_sqnorms())
        except KernelUnavailableError as exc:
            if self.engine == "cuda":
                raise
            _warn_encode_fallback(str(exc))
            return None
        return out.view(B, T, Hkv, self.row_bytes).transpose(1, 2).contiguous()

    def decode(self, packed: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        """packed uint8 ``[B, Hkv, T, R]`` (+ float16 norms ``[B, Hkv, T]``) -> float32 ``[B, Hkv, T, hd]``."""
        return self.from_code_domain(self.decode_codes(self.unpack(packed)), norms)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))`` without packing: x ``[B, Hkv, T, hd]`` -> reconstruction in x's dtype and device."""
        y, norms = self.to_code_domain(x)
        rec = self.from_code_domain(self.decode_codes(self.codes(y)), norms)
        return rec.to(device=x.device, dtype=x.dtype)

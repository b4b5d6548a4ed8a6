"""The codebook engine: weighted k-means, Gain-Shape K-means and residual quantization.

Validating wrappers around the Rust core (``gsrq._gsrq``). Every function takes
numpy arrays (or anything :func:`numpy.asarray` accepts, including CPU torch
tensors), converts them to C-contiguous ``float32`` and releases the GIL while
the Rust code runs on a rayon pool: the global one (``threads=None``, sized by
``RAYON_NUM_THREADS`` or the CPU count) or a private pool of ``threads``
workers. Results are bitwise identical for any thread count.

Bad input raises :class:`gsrq.ShapeError` (wrong ``ndim``, ``D = 0``,
mismatched lengths) or :class:`gsrq.InvalidValueError` (NaN/inf, negative or
all-zero weights, ``k > N``, unknown options).

The algorithms (see ``DESIGN.md`` §1 and the Rust module docs):

* :func:`kmeans` — Lloyd's algorithm with per-sample weights; k-means++
  (weighted D² sampling) or random initialisation; an empty cluster is
  re-seeded at the sample with the largest ``w·‖x − c‖²`` (distinct samples,
  largest first).
* :func:`gskm` — Gain-Shape K-means: codeword ``g_k·s_k``; spherical k-means
  initialisation on unit vectors (zero vectors stay zero), then alternating
  steps with bfloat16-rounded gains.
* :class:`ResidualQuantizer` — stages trained on the residuals of the previous
  ones; greedy or beam-search encoding.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from gsrq import _gsrq
from gsrq.errors import InvalidValueError, ShapeError

__all__ = ["kmeans", "gskm", "ResidualQuantizer", "reconstruction_metrics"]


def _to_numpy(a: Any, name: str) -> np.ndarray:
    if hasattr(a, "detach") and hasattr(a, "cpu") and hasattr(a, "numpy"):  # torch tensor
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            a = a.float()
        a = a.numpy()
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as e:
        raise ShapeError(f"{name} cannot be converted to an array: {e}") from e
    if arr.dtype == object or np.iscomplexobj(arr) or not (
        np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
    ):
        raise ShapeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    return arr


def _matrix(x: Any, name: str = "x", allow_empty: bool = False) -> np.ndarray:
    """``x`` as a C-contiguous float32 ``[N, D]`` array (``N >= 1`` unless ``allow_empty``)."""
    arr = _to_numpy(x, name)
    if arr.ndim != 2:
        raise ShapeError(f"{name} must be 2-D [N, D], got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ShapeError(f"{name} must have at least one column (D = 0), got shape {arr.shape}")
    if arr.shape[0] == 0 and not allow_empty:
        raise ShapeError(f"{name} must have at least one row (N = 0), got shape {arr.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        # NaN/inf (and values beyond the float32 range, which become inf) are
        # reported by the Rust core with their row and column.
        return np.ascontiguousarray(arr, dtype=np.float32)


def _weights(weights: Any, n: int) -> np.ndarray | None:
    if weights is None:
        return None
    w = _to_numpy(weights, "weights")
    if w.ndim != 1:
        raise ShapeError(f"weights must be 1-D [N], got shape {w.shape}")
    if w.shape[0] != n:
        raise ShapeError(f"weights has {w.shape[0]} entries but x has {n} rows")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(out).all():
        i = int(np.flatnonzero(~np.isfinite(out))[0])
        raise InvalidValueError(f"weights[{i}] is not finite in float32 ({w[i]!r})")
    if (out < 0).any():
        i = int(np.flatnonzero(out < 0)[0])
        raise InvalidValueError(f"weights[{i}] is negative ({w[i]!r})")
    if not (out > 0).any():
        raise InvalidValueError("weights are all zero")
    return out


def _int(v: Any, name: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise InvalidValueError(f"{name} must be an integer, got {v!r}")
    v = int(v)
    if v < minimum:
        raise InvalidValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _threads(threads: Any) -> int | None:
    return None if threads is None else _int(threads, "threads", 1)


def _seed(seed: Any) -> int:
    s = _int(seed, "seed", 0)
    if s >= 2**64:
        raise InvalidValueError(f"seed must be < 2**64, got {s}")
    return s


def _k(k: Any, n: int, name: str = "k") -> int:
    k = _int(k, name, 1)
    if k > n:
        raise InvalidValueError(f"{name} = {k} exceeds the number of samples N = {n}")
    return k


def _init_centroids(c0: Any, k: int, d: int) -> np.ndarray | None:
    if c0 is None:
        return None
    c = _matrix(c0, "init_centroids")
    if c.shape != (k, d):
        raise ShapeError(f"init_centroids must have shape [{k}, {d}], got {c.shape}")
    return c


def kmeans(
    x: Any,
    k: int,
    *,
    weights: Any = None,
    iters: int = 20,
    init: str = "kmeans++",
    seed: int = 0,
    threads: int | None = None,
    init_centroids: Any = None,
    return_history: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted k-means (Lloyd).

    Args:
        x: samples, shape ``[N, D]``, converted to float32.
        k: number of centroids, ``1 <= k <= N`` (and at most the number of
            samples of positive weight).
        weights: per-sample weights, shape ``[N]``, ``>= 0``, not all zero;
            ``None`` means all ones.
        iters: Lloyd iterations (assignment + update).
        init: ``"kmeans++"`` (weighted D² sampling) or ``"random"`` (``k``
            distinct samples of positive weight).
        seed: seed of the engine's own generator (SplitMix64).
        threads: ``None`` for the global rayon pool, else a pool of that size.
        init_centroids: optional starting centroids ``[k, D]`` replacing
            ``init``.
        return_history: also return the objective history.

    Returns:
        ``centroids`` float32 ``[k, D]`` and ``labels`` int64 ``[N]`` (the
        nearest returned centroid of each sample, ties to the lowest index);
        with ``return_history`` also ``history`` float64 ``[iters + 1]``: the
        weighted SSE ``Σ w‖x − c‖²`` after each assignment step, the last one
        for the returned centroids. It never increases.
    """
    xa = _matrix(x)
    n, d = xa.shape
    k = _k(k, n)
    if init not in ("kmeans++", "random"):
        raise InvalidValueError(f'init must be "kmeans++" or "random", got {init!r}')
    res = _gsrq.kmeans(
        xa,
        k,
        _weights(weights, n),
        _int(iters, "iters", 0),
        init,
        _seed(seed),
        _threads(threads),
        _init_centroids(init_centroids, k, d),
        bool(return_history),
    )
    return tuple(res)  # type: ignore[return-value]


def gskm(
    x: Any,
    k: int,
    *,
    weights: Any = None,
    init_iters: int = 20,
    iters: int = 10,
    seed: int = 0,
    threads: int | None = None,
    weights_in_init_only: bool = False,
    init_centroids: Any = None,
    return_history: bool = False,
    init: str = "kmeans++",
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gain-Shape K-means (DESIGN.md §1).

    Codeword ``k`` is ``g_k · s_k`` with a unit shape ``s_k`` and a gain
    ``g_k >= 1e-4``. Spherical initialisation: weighted k-means
    (``init_iters`` Lloyd iterations, k-means++ seeding) on the unit vectors
    ``x/‖x‖`` (zero rows stay zero) seeded by ``init``; shapes = normalised centroids; gains =
    weighted mean ``‖x‖`` of the samples nearest to each spherical centroid
    (a memberless cluster gets the mean norm of all samples). Then ``iters``
    alternating steps: gains rounded to bfloat16 and clamped at 1e-4; assign
    to ``argmax 2 g⟨x, s⟩ − g²``; shape = normalised weighted member sum;
    gain = weighted mean of ``⟨x, s_old⟩`` clamped at 1e-4; clusters without
    member weight keep shape and gain.

    Args:
        x: samples ``[N, D]``, converted to float32.
        k: number of codewords.
        weights: ``[N]`` non-negative weights, or ``None``.
        init_iters: iterations of the spherical k-means initialisation.
        iters: alternating gain/shape iterations.
        seed: seed of the k-means++ seeding.
        threads: ``None`` (global pool) or a thread count.
        weights_in_init_only: use the weights in the spherical
            initialisation only, every sample counting once afterwards.
        init_centroids: optional ``[k, D]`` starting centroids of the
            spherical k-means (on unit-vector data), replacing ``init``.
        return_history: also return the objective history.
        init: seeding of the spherical k-means, ``"kmeans++"`` (weighted D²
            sampling on the unit vectors) or ``"random"``.

    Returns:
        ``codebook`` float32 ``[k, D]`` and ``labels`` int64 ``[N]`` (the
        l2-nearest codeword of each sample); with ``return_history`` also
        float64 ``[iters + 1]``: the weighted SSE of each alternating
        assignment, then of the final labels against ``codebook``.
    """
    xa = _matrix(x)
    n, d = xa.shape
    k = _k(k, n)
    if init not in ("kmeans++", "random"):
        raise InvalidValueError(f'init must be "kmeans++" or "random", got {init!r}')
    res = _gsrq.gskm(
        xa,
        k,
        _weights(weights, n),
        _int(init_iters, "init_iters", 0),
        _int(iters, "iters", 0),
        _seed(seed),
        _threads(threads),
        bool(weights_in_init_only),
        _init_centroids(init_centroids, k, d),
        bool(return_history),
        init,
    )
    return tuple(res)  # type: ignore[return-value]


class ResidualQuantizer:
    """Residual quantizer: ``stages`` codebooks of ``codebook_size`` codewords of length ``dim``.

    Stage ``m`` is learned on the residuals left by the greedy encoding with
    stages ``< m``, by GSKM (``method="gskm"``) or weighted k-means
    (``method="km"``), with a seed derived from ``seed`` and ``m``.

    Args:
        dim: vector length ``D``.
        codebook_size: codewords per stage ``Kc`` (at most 65536; codes are
            ``uint16``).
        stages: number of stages ``M``.
        method: ``"gskm"`` or ``"km"``.
        seed: training seed.
        iters: alternating iterations (GSKM) or Lloyd iterations (KM);
            default 10 for GSKM and 20 for KM.
        init_iters: spherical-initialisation iterations of GSKM.
        weights_in_init_only: GSKM option, see :func:`gskm`.
        init: seeding of KM stages and of GSKM's spherical k-means,
            ``"kmeans++"`` or ``"random"``.
        threads: ``None`` (global pool) or a thread count.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        stages: int,
        method: str = "gskm",
        *,
        seed: int = 0,
        iters: int | None = None,
        init_iters: int = 20,
        weights_in_init_only: bool = False,
        init: str = "kmeans++",
        threads: int | None = None,
    ) -> None:
        self.dim = _int(dim, "dim", 1)
        self.codebook_size = _int(codebook_size, "codebook_size", 1)
        if self.codebook_size > 65536:
            raise InvalidValueError(f"codebook_size = {codebook_size} exceeds 65536 (codes are uint16)")
        self.stages = _int(stages, "stages", 1)
        if method not in ("gskm", "km"):
            raise InvalidValueError(f'method must be "gskm" or "km", got {method!r}')
        if init not in ("kmeans++", "random"):
            raise InvalidValueError(f'init must be "kmeans++" or "random", got {init!r}')
        self.method = method
        self.seed = _seed(seed)
        self.iters = _int(iters if iters is not None else (10 if method == "gskm" else 20), "iters", 0)
        self.init_iters = _int(init_iters, "init_iters", 0)
        self.weights_in_init_only = bool(weights_in_init_only)
        self.init = init
        self.threads = _threads(threads)
        self._codebooks: np.ndarray | None = None

    @property
    def bits_per_element(self) -> float:
        """Code bits per vector element: ``stages · ceil(log2 Kc) / dim`` (codebooks not counted)."""
        return self.stages * math.ceil(math.log2(self.codebook_size)) / self.dim

    @property
    def codebooks(self) -> np.ndarray:
        """The codebooks, float32 ``[stages, codebook_size, dim]`` (read-only view)."""
        cb = self._require_fitted()
        view = cb.view()
        view.flags.writeable = False
        return view

    @property
    def is_fitted(self) -> bool:
        return self._codebooks is not None

    @classmethod
    def from_codebooks(cls, codebooks: Any, method: str = "gskm", **opts: Any) -> ResidualQuantizer:
        """A quantizer using given codebooks ``[stages, Kc, D]`` (converted to float32)."""
        cb = _to_numpy(codebooks, "codebooks")
        if cb.ndim != 3 or 0 in cb.shape:
            raise ShapeError(f"codebooks must have shape [stages, Kc, D] with sizes >= 1, got {cb.shape}")
        with np.errstate(over="ignore", invalid="ignore"):
            cb32 = np.ascontiguousarray(cb, dtype=np.float32)
        if not np.isfinite(cb32).all():
            raise InvalidValueError("codebooks contain a non-finite value")
        m, kc, d = cb32.shape
        rq = cls(d, kc, m, method, **opts)
        rq._codebooks = cb32.copy()
        return rq

    def _require_fitted(self) -> np.ndarray:
        if self._codebooks is None:
            raise InvalidValueError("this ResidualQuantizer has no codebooks yet: call fit() or use from_codebooks()")
        return self._codebooks

    def _check_dim(self, xa: np.ndarray, name: str = "x") -> None:
        if xa.shape[1] != self.dim:
            raise ShapeError(f"{name} has D = {xa.shape[1]} columns, the quantizer has dim = {self.dim}")

    def fit(self, x: Any, weights: Any = None) -> ResidualQuantizer:
        """Learn the codebooks from ``x`` ``[N, dim]`` (``N >= codebook_size``) with optional weights ``[N]``."""
        xa = _matrix(x)
        self._check_dim(xa)
        _k(self.codebook_size, xa.shape[0], "codebook_size")
        self._codebooks = _gsrq.rq_fit(
            xa,
            _weights(weights, xa.shape[0]),
            self.codebook_size,
            self.stages,
            self.method,
            self.seed,
            self.iters,
            self.init_iters,
            self.weights_in_init_only,
            self.threads,
            self.init,
        )
        return self

    def encode(self, x: Any, beam: int | None = None) -> np.ndarray:
        """Codes of ``x`` ``[N, dim]``: uint16 ``[N, stages]``.

        ``beam=None`` or 1 is greedy (nearest codeword of the current
        residual, ties to the lowest index); ``beam=B`` keeps the ``B`` best
        partial reconstructions by full residual error at every stage.
        """
        cb = self._require_fitted()
        xa = _matrix(x, allow_empty=True)
        self._check_dim(xa)
        b = 1 if beam is None else _int(beam, "beam", 1)
        return _gsrq.rq_encode(xa, cb, b, self.threads)

    def decode(self, codes: Any) -> np.ndarray:
        """Reconstruction float32 ``[N, dim]`` of integer codes ``[N, stages]`` (each ``< codebook_size``)."""
        cb = self._require_fitted()
        c = _to_numpy(codes, "codes")
        if c.ndim != 2 or c.shape[1] != self.stages:
            raise ShapeError(f"codes must have shape [N, {self.stages}], got {c.shape}")
        if not np.issubdtype(c.dtype, np.integer):
            raise ShapeError(f"codes must be integers, got dtype {c.dtype}")
        if c.size and (c.min() < 0 or c.max() >= self.codebook_size):
            bad = np.argwhere((c < 0) | (c >= self.codebook_size))[0]
            raise InvalidValueError(
                f"code {c[bad[0], bad[1]]} at row {bad[0]}, stage {bad[1]} is out of range for Kc = {self.codebook_size}"
            )
        return _gsrq.rq_decode(np.ascontiguousarray(c, dtype=np.uint16), cb, self.threads)

    def __repr__(self) -> str:
        return (
            f"ResidualQuantizer(dim={self.dim}, codebook_size={self.codebook_size}, stages={self.stages}, "
            f"method={self.method!r}, fitted={self.is_fitted})"
        )


def reconstruction_metrics(x: Any, x_hat: Any) -> dict[str, float]:
    """Quality of a reconstruction ``x_hat`` of ``x`` (same shape, vectors along the last axis).

    Returns (computed in float64):

    * ``mse`` — mean squared error per element;
    * ``rel_mse`` — ``Σ‖x − x̂‖² / Σ‖x‖²`` (NaN when ``x`` is all zeros);
    * ``cosine`` — mean cosine similarity of the vectors (1 when both are
      zero, 0 when exactly one is);
    * ``gain_error`` — ``mean |‖x‖ − ‖x̂‖| / mean ‖x‖`` (NaN when ``x`` is all zeros).
    """
    a = _to_numpy(x, "x").astype(np.float64)
    b = _to_numpy(x_hat, "x_hat").astype(np.float64)
    if a.shape != b.shape:
        raise ShapeError(f"x has shape {a.shape} but x_hat has shape {b.shape}")
    if a.ndim == 0 or a.size == 0:
        raise ShapeError(f"x must hold at least one vector, got shape {a.shape}")
    for arr, name in ((a, "x"), (b, "x_hat")):
        if not np.isfinite(arr).all():
            raise InvalidValueError(f"{name} contains a non-finite value")
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    err = ((a - b) ** 2).sum(axis=1)
    na = np.sqrt((a * a).sum(axis=1))
    nb = np.sqrt((b * b).sum(axis=1))
    dot = (a * b).sum(axis=1)
    both = (na > 0) & (nb > 0)
    cos = np.where(both, dot / np.where(both, na * nb, 1.0), np.where((na == 0) & (nb == 0), 1.0, 0.0))
    total = float((na * na).sum())
    mean_norm = float(na.mean())
    return {
        "mse": float(err.sum() / a.size),
        "rel_mse": float(err.sum() / total) if total > 0 else float("nan"),
        "cosine": float(cos.mean()),
        "gain_error": float(np.abs(na - nb).mean() / mean_norm) if mean_norm > 0 else float("nan"),
    }

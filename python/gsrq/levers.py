"""Key levers fitted at calibration, and the code domain that codebooks are trained on.

The key levers of :class:`gsrq.quantizer.KVQuantizer` (keys only), applied in
this order before residual quantization:

1. rotation ``y = x @ R``: ``R = H / sqrt(hd)`` (``"hadamard"``) or
   ``diag(signs) @ H / sqrt(hd)`` (``"hadamard_signs"``); the ``±1`` signs
   ``[hd]`` are drawn from the configuration seed and the layer
   (:func:`rotation_signs`, the same draw as :func:`gsrq.calibration.calibrate`)
   and stored as ``layers.{l}.keys.signs``;
2. per-channel scale ``y = y / scale``, stored as ``layers.{l}.keys.scale``:
   ``key_scale_fit="rms"``: ``scale`` float32 ``[Hkv, hd]`` is the
   root-mean-square of each rotated channel of each KV head over the
   calibration keys (:func:`fit_key_scale`); ``key_scale_fit="grad"``:
   ``scale = E[g^2]^(-p/2)`` from the loss gradients ``g`` of the rotated keys,
   per KV head and channel (:func:`fit_key_scale_grad`), so the code domain is
   ``y = x * E[g^2]^(p/2)``: channels whose errors move the loss more are
   stretched and get a larger share of the codebooks' accuracy;
3. norm: the unit vector ``y / ||y||`` is quantized, ``||y||`` kept in float16.

All three are linear maps of the key (or a per-token scalar), so attention
absorbs them in the query (:attr:`KVQuantizer.query_map`) and the fused
lookup-table kernel still works: it builds its tables from ``q @ query_map``
and multiplies each token's score by its stored norm.

Gradient weights follow the chain rule. With ``x = f(y)`` the map back from
the code domain, the loss gradient seen by a code-domain sample is
``g_y = J^T g_x``:

* rotation ``x = y @ R^T``: ``g_y = g_x @ R``;
* scale ``y_1 = y_2 * scale``: ``g_2 = g_1 * scale``;
* norm ``y_2 = n * u`` (``n`` stored): ``g_u = n * g_2``.

So a quantization error ``e`` in the code domain changes the loss by about
``<g_y, e>``, exactly as ``<g_x, e_x>`` did before the levers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gsrq.config import GSRQConfig
from gsrq.errors import ConfigError, InvalidValueError, ShapeError
from gsrq.quantizer import hadamard_matrix

__all__ = ["KeyLevers", "fit_key_levers", "fit_key_scale", "fit_key_scale_grad", "rotation_signs"]

#: floor of a fitted channel scale, relative to the largest channel RMS of the layer
SCALE_FLOOR = 1e-6
#: added to every channel's mean squared gradient, relative to the head's mean over channels
GRAD_SCALE_EPS = 1e-3


def rotation_signs(seed: int, layer: int, head_dim: int) -> np.ndarray:
    """Seeded ``±1`` float32 ``[head_dim]`` signs of layer ``layer``'s key rotation."""
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ConfigError(f"head_dim must be a positive integer, got {head_dim!r}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5167, int(layer)]))
    return rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=head_dim)


def fit_key_scale(y: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-channel scales of (rotated) keys: y float ``[Hkv, N, hd]`` -> float32 ``[Hkv, hd]``.

    The scale of a channel of a KV head is its root-mean-square over the ``N``
    tokens, floored at ``SCALE_FLOOR`` times the largest channel RMS of the
    layer (a dead channel would otherwise blow up after division), and rounded to
    float16 values (how a codebook file stores it) so calibration trains with
    exactly the scale the cache will use.
    """
    a = torch.as_tensor(y).to(torch.float64)
    if a.dim() != 3 or a.shape[1] < 1:
        raise ShapeError(f"keys for scale fitting must have shape [Hkv, N >= 1, hd], got {list(a.shape)}")
    if not bool(torch.isfinite(a).all()):
        raise InvalidValueError("keys for scale fitting contain NaN or inf")
    rms = a.pow(2).mean(dim=1).sqrt()
    top = rms.max()
    if not bool(top > 0):
        raise InvalidValueError("cannot fit key scales: the keys are all zero")
    # rounded to float16, the precision a codebook file stores them in
    return torch.maximum(rms, top * SCALE_FLOOR).to(torch.float16).to(torch.float32).numpy()


def fit_key_scale_grad(sq_grad: np.ndarray | torch.Tensor, power: float = 0.5) -> np.ndarray:
    """Per-channel key scales from gradient energy: ``[Hkv, hd]`` mean ``g^2`` -> float32 ``[Hkv, hd]``.

    ``sq_grad`` holds the mean squared loss gradient of each (rotated) key
    channel of each KV head over the calibration tokens. The scale is
    ``(e + GRAD_SCALE_EPS * mean_c e)^(-power/2)``, normalised to a geometric
    mean of 1 per KV head and rounded to float16 values (the stored
    precision): ``y = x / scale`` multiplies channel ``c`` by
    ``E[g_c^2]^(power/2)``.
    """
    e = torch.as_tensor(sq_grad).to(torch.float64)
    if e.dim() != 2 or e.shape[1] < 1:
        raise ShapeError(f"mean squared gradients must have shape [Hkv, hd], got {list(e.shape)}")
    if not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
        raise InvalidValueError("mean squared gradients must be finite and non-negative")
    if not (isinstance(power, (int, float)) and power > 0):
        raise InvalidValueError(f"power must be a positive number, got {power!r}")
    m = e.mean(dim=1, keepdim=True)
    if not bool((m > 0).all()):
        raise InvalidValueError("cannot fit gradient key scales: a KV head has all-zero key gradients")
    s = (e + GRAD_SCALE_EPS * m).pow(-float(power) / 2)
    s = s / s.log().mean(dim=1, keepdim=True).exp()
    return s.to(torch.float16).to(torch.float32).numpy()


@dataclass
class KeyLevers:
    """The fitted key levers of one layer.

    rotation: float32 ``[hd, hd]`` orthogonal or None; signs: float32 ``[hd]``
    (``hadamard_signs``) or None; scale: float32 ``[Hkv, hd]`` or None; norm: bool.
    """

    rotation: torch.Tensor | None
    signs: np.ndarray | None
    scale: np.ndarray | None
    norm: bool

    @property
    def any(self) -> bool:
        return self.rotation is not None or self.scale is not None or self.norm

    def aux_tensors(self) -> dict[str, np.ndarray]:
        """The tensors a codebook file stores for these levers: ``{"signs": [hd], "scale": [Hkv, hd]}`` (present ones)."""
        out: dict[str, np.ndarray] = {}
        if self.signs is not None:
            out["signs"] = np.asarray(self.signs, dtype=np.float32)
        if self.scale is not None:
            out["scale"] = np.asarray(self.scale, dtype=np.float32)
        return out

    def to_code_domain(
        self, x: torch.Tensor, g: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Keys ``[Hkv, N, hd]`` (and their loss gradients) -> code domain.

        Returns ``(y, g_y, norms)``: float32 ``[Hkv, N, hd]``, the transformed
        gradients (None when ``g`` is None) and float32 norms ``[Hkv, N]`` (None
        without the norm lever; rounded to float16 as the cache stores them).
        Matches :meth:`KVQuantizer.to_code_domain` on the same tensors.
        """
        y = torch.as_tensor(x).to(torch.float32)
        gy = None if g is None else torch.as_tensor(g).to(torch.float32)
        if y.dim() != 3:
            raise ShapeError(f"keys must have shape [Hkv, N, hd], got {list(y.shape)}")
        if gy is not None and gy.shape != y.shape:
            raise ShapeError(f"gradients have shape {list(gy.shape)}, keys {list(y.shape)}")
        if self.rotation is not None:
            y = y @ self.rotation
            gy = None if gy is None else gy @ self.rotation
        if self.scale is not None:
            s = torch.from_numpy(np.asarray(self.scale, dtype=np.float32))
            if s.shape[0] not in (1, y.shape[0]) or s.shape[1] != y.shape[2]:
                raise ShapeError(f"scale {list(s.shape)} does not fit keys {list(y.shape)}")
            s = s[:, None, :]
            y = y / s
            gy = None if gy is None else gy * s
        norms = None
        if self.norm:
            n = torch.linalg.vector_norm(y, dim=-1)
            y = y / n.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
            norms = n.to(torch.float16).to(torch.float32)
            gy = None if gy is None else gy * norms.unsqueeze(-1)
        return y, gy, norms


def fit_key_levers(config: GSRQConfig, layer: int, keys: Any, grads: Any = None) -> KeyLevers:
    """Fit the key levers of ``config`` for ``layer`` from calibration keys float ``[Hkv, N, hd]``.

    The rotation needs no data (signs come from ``config.seed``); the scale is
    the channel RMS of each KV head after the rotation (``key_scale_fit="rms"``)
    or comes from the keys' loss gradients ``grads`` ``[Hkv, N, hd]``
    (``"grad"``), also after the rotation.
    """
    if not isinstance(config, GSRQConfig):
        raise ConfigError(f"config must be a GSRQConfig, got {type(config).__name__}")
    x = torch.as_tensor(keys).to(torch.float32)
    if x.dim() != 3:
        raise ShapeError(f"keys must have shape [Hkv, N, hd], got {list(x.shape)}")
    hd = int(x.shape[-1])
    rotation = signs = None
    if config.key_rotation != "none":
        if config.key_rotation == "hadamard_signs":
            signs = rotation_signs(config.seed, layer, hd)
        rotation = hadamard_matrix(hd, None if signs is None else torch.from_numpy(signs))
    scale = None
    if config.key_scale and config.key_scale_fit == "grad":
        if grads is None:
            raise ConfigError('key_scale_fit="grad" needs the keys\' loss gradients')
        g = torch.as_tensor(grads).to(torch.float32)
        if g.shape != x.shape:
            raise ShapeError(f"gradients have shape {list(g.shape)}, keys {list(x.shape)}")
        g = g if rotation is None else g @ rotation
        scale = fit_key_scale_grad(g.double().pow(2).mean(dim=1), config.key_scale_power)
    elif config.key_scale:
        y = x if rotation is None else x @ rotation
        scale = fit_key_scale(y)
    return KeyLevers(rotation, signs, scale, bool(config.key_norm))

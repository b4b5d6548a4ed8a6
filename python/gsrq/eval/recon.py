"""Reconstruction quality of keys and values, per layer, on held-out text.

Keys and values are captured with a plain :class:`transformers.DynamicCache`
forward (post-RoPE keys, exactly what ``Cache.update`` receives) over windows
of held-out text; the first ``sinks`` positions of each window are left out
(the cache keeps them exact). For every head vector ``x`` (``head_dim``
channels of one token and KV head) and its reconstruction ``x_hat``:

- ``mse``: mean of ``(x - x_hat)^2`` over all elements;
- ``nmse``: ``sum |x - x_hat|^2 / sum |x|^2``;
- ``cosine``: mean of ``<x, x_hat> / (|x| |x_hat|)``;
- ``gain_err``: mean of ``| |x_hat| - |x| | / |x|`` (relative norm error).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache

from gsrq.errors import InvalidValueError, ShapeError

METRICS = ("mse", "nmse", "cosine", "gain_err")
KINDS = ("keys", "values")


def capture_kv(model: torch.nn.Module, windows: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Keys and values of every layer on ``windows`` (int64 ``[N, T]``).

    Returns one dict per layer, ``{"keys": [N, Hkv, T, hd], "values": ...}``, float32.
    """
    from gsrq.eval.ppl import cache_kwarg

    if windows.dim() != 2:
        raise ShapeError(f"windows must be [N, T], got {tuple(windows.shape)}")
    per_layer: list[dict[str, list[torch.Tensor]]] = []
    with torch.no_grad():
        for w in windows:
            cache = DynamicCache()
            model(input_ids=w.reshape(1, -1), use_cache=True, **{cache_kwarg(model): cache})
            for i, layer in enumerate(cache.layers):
                if len(per_layer) <= i:
                    per_layer.append({"keys": [], "values": []})
                per_layer[i]["keys"].append(layer.keys.float())
                per_layer[i]["values"].append(layer.values.float())
    return [{k: torch.cat(v, dim=0) for k, v in d.items()} for d in per_layer]


def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    """Metrics of the module docstring over head vectors (last axis), any leading shape."""
    if x.shape != x_hat.shape:
        raise ShapeError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} differ")
    if x.numel() == 0:
        raise InvalidValueError("no vectors to compare")
    x = x.double().reshape(-1, x.shape[-1])
    y = x_hat.double().reshape(-1, x.shape[-1])
    err = x - y
    nx = x.norm(dim=-1)
    ny = y.norm(dim=-1)
    cos = (x * y).sum(-1) / (nx * ny).clamp_min(1e-30)
    return {
        "mse": float(err.pow(2).mean()),
        "nmse": float(err.pow(2).sum() / x.pow(2).sum().clamp_min(1e-30)),
        "cosine": float(cos.mean()),
        "gain_err": float(((ny - nx).abs() / nx.clamp_min(1e-30)).mean()),
    }


def layer_metrics(
    captured: list[dict[str, torch.Tensor]],
    quantizers: Callable[[int, str], Callable[[torch.Tensor], torch.Tensor] | None],
    *,
    sinks: int = 4,
) -> dict[str, dict[str, list[float]]]:
    """``{kind: {metric: [value per layer]}}`` of ``quantizers`` on captured K/V."""
    out = {kind: {m: [] for m in METRICS} for kind in KINDS}
    for layer, kv in enumerate(captured):
        for kind in KINDS:
            x = kv[kind][..., sinks:, :]
            if x.shape[-2] == 0:
                raise InvalidValueError(f"windows of {kv[kind].shape[-2]} tokens leave nothing after {sinks} sinks")
            q = quantizers(layer, kind)
            x_hat = x if q is None else q(x)
            for m, v in reconstruction_metrics(x, x_hat).items():
                out[kind][m].append(v)
    return out


def summary_rows(per_layer: dict[str, dict[str, list[float]]]) -> list[list]:
    """Table rows ``[layer, K mse, K nmse, K cos, K gain, V mse, ...]`` plus a ``mean`` row."""
    n = len(per_layer["keys"]["mse"])
    rows = []
    for i in range(n):
        rows.append([str(i)] + [per_layer[k][m][i] for k in KINDS for m in METRICS])
    rows.append(["mean"] + [sum(per_layer[k][m]) / n for k in KINDS for m in METRICS])
    return rows


HEADERS = ["layer"] + [f"{k[0].upper()} {m}" for k in KINDS for m in METRICS]

__all__ = ["HEADERS", "METRICS", "capture_kv", "layer_metrics", "reconstruction_metrics", "summary_rows"]

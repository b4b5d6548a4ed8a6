"""PNG plots of evaluation results (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def plot_ppl_vs_bits(points: Sequence[tuple[str, float, float]], path: Path, *, title: str = "",
                     reference: float | None = None) -> Path:
    """Perplexity (log scale) against bits per element.

    points: ``(label, bits, perplexity)``; ``reference``: the fp16 perplexity,
    drawn as a horizontal line. Returns the path written.
    """
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, bits, ppl in points:
        ax.scatter([bits], [ppl], s=36)
        ax.annotate(label, (bits, ppl), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=1, label=f"fp16 {reference:.2f}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bits per element (incl. overhead)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "Held-out perplexity vs KV-cache bits")
    ax.grid(True, which="both", alpha=0.3)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_recon(per_layer: dict[str, dict[str, Sequence[float]]], path: Path, *, title: str = "") -> Path:
    """Per-layer reconstruction metrics: one panel per metric, one line per kind.

    per_layer: ``{kind: {metric: [value per layer]}}``.
    """
    plt = _figure()
    metrics = list(next(iter(per_layer.values())))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4))
    if len(metrics) == 1:
        axes = [axes]
    for ax, metric in zip(axes, metrics):
        for kind, vals in per_layer.items():
            ax.plot(range(len(vals[metric])), vals[metric], marker=".", label=kind)
        ax.set_xlabel("layer")
        ax.set_title(metric)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)

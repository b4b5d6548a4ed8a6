"""Calibration: from a transformers model and text to a GSRQ codebook file.

Pipeline (DESIGN.md §1):

1. **Capture.** The text is cut into windows of ``seq_len`` tokens. Each window
   runs through the model with a :class:`CaptureCache`, a ``DynamicCache``
   whose ``update`` records the post-RoPE keys and the values of every layer
   exactly as the attention layers hand them to the cache. No model code is
   patched.
2. **Gradient weights, same pass.** The captured tensors stay in the autograd
   graph; the next-token cross-entropy ``L`` of the window is differentiated
   with ``torch.autograd.grad(L, [K_0, V_0, K_1, ...])``. This is the total
   derivative ``∂L/∂x`` of the cached tensors (every path through later
   layers counts). All parameters are frozen, so backward computes activation
   gradients only. Each sample — one chunk of ``D`` channels of one token's
   key or value in one KV head and layer — gets ``‖∂L/∂x‖``; per codebook,
   ``w = log(1 + λ‖g‖)`` with ``λ = τ / median‖g‖`` over its samples.
3. **Streaming subsampling.** Calibration never holds all K/V: before the
   first window a seeded uniform subset (without replacement) of at most
   ``config.max_samples`` sample slots of the whole run is drawn, and each
   window copies only its selected rows into fixed buffers. The first
   ``config.sinks`` positions of every window are excluded (the cache keeps
   them exact), and so is the last (its gradient is zero: no prediction
   inside the window depends on it). A seeded ``heldout_fraction`` of the windows never trains; its
   samples measure reconstruction quality.
4. **Training.** One residual quantizer per (layer, kind, chunk position
   ``j`` [, KV head when ``per_head``]) through the Rust engine
   (:class:`gsrq.engine.ResidualQuantizer`), GSKM or KM, weights per
   ``config.grad_weights``.
5. **Result.** A :class:`gsrq.codebooks.Codebooks` with the calibration
   summary in its metadata; :func:`run` (``gsrq calibrate``) saves it.

Models: LlamaForCausalLM and the same structure (Mistral, Qwen2, Qwen3,
SmolLM2 ...) — a decoder whose layers are ``model.model.layers[i].self_attn``
with ``k_proj``/``v_proj`` and that passes its K/V through ``Cache.update``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from gsrq.config import KINDS, GSRQConfig, KindConfig
from gsrq.errors import CalibrationError, ConfigError

#: model_type values known to follow the LLaMA layout (others are accepted if the structure matches)
LLAMA_LIKE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "olmo2")
DEFAULT_TOKENS = 65536
DEFAULT_SEQ_LEN = 1024
DEFAULT_HELDOUT_FRACTION = 1 / 16
DEFAULT_HELDOUT_SAMPLES = 8192


# ----------------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelShape:
    """KV-cache geometry of a LLaMA-like model."""

    num_layers: int
    num_kv_heads: int
    num_attention_heads: int
    head_dim: int
    model_type: str


def model_shape(model: Any) -> ModelShape:
    """Check that ``model`` is LLaMA-like and return its KV geometry.

    Raises CalibrationError naming what is missing or different.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise CalibrationError(f"{type(model).__name__} has no .config; expected a transformers causal LM")
    model_type = str(getattr(config, "model_type", "") or "")
    if getattr(config, "is_encoder_decoder", False):
        raise CalibrationError(f"model_type {model_type!r} is an encoder-decoder model; calibration needs a LLaMA-like decoder")
    for name in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        v = getattr(config, name, None)
        if not isinstance(v, int) or v < 1:
            raise CalibrationError(f"model_type {model_type!r} is not LLaMA-like: config has no positive integer {name}")
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv:
        raise CalibrationError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        other = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
        if other:
            raise CalibrationError(f"model_type {model_type!r} is not LLaMA-like: it has layer types {other}")
    decoder = getattr(model, "model", None)
    blocks = getattr(decoder, "layers", None)
    if blocks is None or len(blocks) != layers:
        raise CalibrationError(
            f"model_type {model_type!r} ({type(model).__name__}) is not LLaMA-like: expected "
            f"model.model.layers with {layers} decoder layers"
        )
    for i, block in enumerate(blocks):
        attn = getattr(block, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise CalibrationError(
                f"model_type {model_type!r} is not LLaMA-like: layer {i} has no self_attn with q/k/v/o projections"
            )
    if model.get_input_embeddings() is None:
        raise CalibrationError(f"model_type {model_type!r} has no input embeddings")
    return ModelShape(layers, int(kv), heads, int(head_dim), model_type)


def _cache_kwarg(model: Any) -> str:
    """Name of the forward argument that takes a Cache (``cache`` from transformers 5.2x, else ``past_key_values``)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _make_capture_cache_class() -> type:
    from transformers import DynamicCache

    class CaptureCache(DynamicCache):
        """A DynamicCache that also records what every layer's ``update`` receives.

        ``captured[layer] = (key_states, value_states)``, each
        ``[batch, kv_heads, seq, head_dim]`` in the model dtype: post-RoPE keys
        and values, the very tensors attention then uses (graph kept, so
        gradients with respect to them can be taken).
        """

        def __init__(self) -> None:
            super().__init__()
            self.captured: dict[int, tuple[Any, Any]] = {}

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # type: ignore[override]
            if layer_idx in self.captured:
                raise CalibrationError(f"layer {layer_idx} updated the cache twice in one forward pass")
            self.captured[layer_idx] = (key_states, value_states)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return CaptureCache


_CAPTURE_CLASS: type | None = None


def CaptureCache() -> Any:  # noqa: N802 - behaves as the class constructor
    """A new capturing cache (class built lazily so importing gsrq does not import transformers)."""
    global _CAPTURE_CLASS
    if _CAPTURE_CLASS is None:
        _CAPTURE_CLASS = _make_capture_cache_class()
    return _CAPTURE_CLASS()


def capture_kv(model: Any, input_ids: Any, *, grad: bool = True) -> tuple[list[Any], list[Any], list[Any] | None, list[Any] | None, float]:
    """Run ``model`` on ``input_ids`` ``[B, T]`` (LongTensor) and capture its KV cache input.

    Returns ``(keys, values, key_grads, value_grads, loss)``: lists over layers
    of ``[B, kv_heads, T, head_dim]`` tensors (model dtype, detached); the
    gradients of the mean next-token cross-entropy over the ``B·(T-1)``
    predictions with respect to them (None when ``grad`` is False, then
    ``loss`` is NaN). Parameters must not require gradients (see
    :func:`freeze`) — only activation gradients are computed.
    """
    import torch

    shape = model_shape(model)
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise CalibrationError(f"input_ids must be [batch, seq >= 2], got {list(input_ids.shape)}")
    ids = input_ids.to(model.device)
    cache = CaptureCache()
    kw = {_cache_kwarg(model): cache, "use_cache": True}
    loss_value = float("nan")
    if grad:
        with torch.enable_grad():
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            out = model(inputs_embeds=emb, **kw)
            _check_captured(cache, shape, ids.shape)
            logits = out.logits[:, :-1]
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            tensors = [t for layer in range(shape.num_layers) for t in cache.captured[layer]]
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            loss_value = float(loss.detach())
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]
        kg = [g.detach() for g in grads[0::2]]
        vg = [g.detach() for g in grads[1::2]]
        del out, logits, loss, emb
    else:
        with torch.no_grad():
            model(input_ids=ids, logits_to_keep=1, **kw)
        _check_captured(cache, shape, ids.shape)
        kg = vg = None
    keys = [cache.captured[i][0].detach() for i in range(shape.num_layers)]
    values = [cache.captured[i][1].detach() for i in range(shape.num_layers)]
    return keys, values, kg, vg, loss_value


def _check_captured(cache: Any, shape: ModelShape, ids_shape: Any) -> None:
    missing = [i for i in range(shape.num_layers) if i not in cache.captured]
    if missing:
        raise CalibrationError(
            f"layers {missing[:8]} never called Cache.update: this model does not pass its KV through the cache API"
        )
    b, t = ids_shape
    want = (b, shape.num_kv_heads, t, shape.head_dim)
    for i in range(shape.num_layers):
        for kind, x in zip(KINDS, cache.captured[i]):
            if tuple(x.shape) != want:
                raise CalibrationError(f"layer {i} {kind} have shape {list(x.shape)}, expected {list(want)} [batch, kv_heads, seq, head_dim]")


def freeze(model: Any) -> None:
    """``requires_grad_(False)`` on every parameter, so backward computes only activation gradients."""
    for p in model.parameters():
        p.requires_grad_(False)


# ------------------------------------------------------------------ weights math
def chunk_norms(g: Any, D: int) -> Any:
    """l2 norm of each length-``D`` chunk of the last axis: ``[..., hd]`` -> ``[..., hd // D]`` (float32)."""
    import torch

    g = torch.as_tensor(g)
    if g.shape[-1] % D:
        raise ConfigError(f"D={D} does not divide the last axis {g.shape[-1]}")
    return g.float().reshape(*g.shape[:-1], g.shape[-1] // D, D).norm(dim=-1)


def gradient_weights(grad_norms: np.ndarray, tau: float) -> np.ndarray:
    """Sample weights ``log(1 + λ·‖g‖)``, ``λ = τ / median(‖g‖)``, float32 ``[N]``.

    grad_norms: non-negative float ``[N]`` of one codebook. When the median is 0
    (more than half the gradients vanish) λ uses the mean of the non-zero
    norms instead; all-zero norms give uniform weights 1.
    """
    g = np.asarray(grad_norms, dtype=np.float64)
    if g.ndim != 1 or g.size == 0:
        raise CalibrationError(f"grad_norms must be a non-empty 1-D array, got shape {g.shape}")
    if not np.isfinite(g).all() or (g < 0).any():
        raise CalibrationError("gradient norms must be finite and non-negative")
    med = float(np.median(g))
    if med <= 0:
        nz = g[g > 0]
        if nz.size == 0:
            return np.ones(g.shape, dtype=np.float32)
        med = float(nz.mean())
    return np.log1p((tau / med) * g).astype(np.float32)


# -------------------------------------------------------------------- sampling
@dataclass
class _Plan:
    """Which sample slots of the run are kept: sorted global indices over (window, head-slot, position)."""

    windows: list[int]  # window indices, in processing order
    per_window: int  # slots per window: heads_pooled * positions
    positions: int  # usable positions per window (seq_len - skip)
    skip: int  # first positions skipped (sinks)
    selected: np.ndarray  # int64 sorted, size S

    def rows(self, ordinal: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(destination rows, pooled-head index, token position) of the ordinal-th window."""
        lo, hi = ordinal * self.per_window, (ordinal + 1) * self.per_window
        a, b = np.searchsorted(self.selected, [lo, hi])
        local = self.selected[a:b] - lo
        return np.arange(a, b), local // self.positions, self.skip + local % self.positions


def _plan(windows: list[int], heads_pooled: int, seq_len: int, skip: int, limit: int, rng: np.random.Generator) -> _Plan:
    """Seeded uniform choice of at most ``limit`` slots over (window, pooled head, position).

    Positions ``skip .. seq_len - 2``: the first ``skip`` (sinks, kept exact by
    the cache) and the last one (no prediction inside the window depends on it,
    so its gradient — and gradient weight — is zero) are never sampled.
    """
    positions = seq_len - skip - 1
    total = len(windows) * heads_pooled * positions
    size = min(limit, total)
    sel = np.sort(rng.choice(total, size=size, replace=False)) if size < total else np.arange(total)
    return _Plan(windows, heads_pooled * positions, positions, skip, sel.astype(np.int64))


def _gather(x: Any, heads: np.ndarray, pos: np.ndarray, per_head: bool, D: int) -> np.ndarray:
    """Rows of a window's ``[H, T, hd]`` tensor as ``[Hc, C, n, D]`` float32 numpy."""
    import torch

    H, _T, hd = x.shape
    C = hd // D
    if per_head:
        rows = x[:, torch.from_numpy(pos).to(x.device)]  # [H, n, hd]
        out = rows.reshape(H, -1, C, D).permute(0, 2, 1, 3)
    else:
        rows = x[torch.from_numpy(heads).to(x.device), torch.from_numpy(pos).to(x.device)]  # [n, hd]
        out = rows.reshape(1, -1, C, D).permute(0, 2, 1, 3)
    return out.float().cpu().numpy()


def _gather_norms(n: Any, heads: np.ndarray, pos: np.ndarray, per_head: bool) -> np.ndarray:
    """Rows of a window's chunk-norm tensor ``[H, T, C]`` as ``[Hc, C, n]``."""
    import torch

    if per_head:
        rows = n[:, torch.from_numpy(pos).to(n.device)]  # [H, n, C]
        out = rows.permute(0, 2, 1)
    else:
        rows = n[torch.from_numpy(heads).to(n.device), torch.from_numpy(pos).to(n.device)]  # [n, C]
        out = rows.t().unsqueeze(0)
    return out.float().cpu().numpy()


def hadamard(n: int) -> np.ndarray:
    """Sylvester Hadamard matrix divided by ``sqrt(n)`` (orthogonal), float32 ``[n, n]``; n a power of two."""
    if n < 1 or n & (n - 1):
        raise ConfigError(f"a Hadamard rotation needs a power-of-two size, got {n}")
    h = np.ones((1, 1), dtype=np.float64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / math.sqrt(n)).astype(np.float32)


def apply_post_levers(buf: np.ndarray, scale: np.ndarray | None, norm: bool, grad: np.ndarray | None = None,
                      rows: np.ndarray | None = None) -> None:
    """Channel scale then unit norm of key samples, in place (the code domain of the key levers).

    buf: float32 ``[Hc, C, n, D]`` (rotated) key chunks; sample ``s`` of every
    chunk ``c`` is the same token and head. scale: ``[Hc, head_dim]`` (one row
    per codebook set, as :class:`gsrq.quantizer.KVQuantizer` takes it) or
    None: ``y / scale``. norm: divide each head vector by
    its l2 norm. grad: the matching ``dL/dy`` ``[Hc, C, n, D]``, turned in place
    into the gradient with respect to the code-domain vector (times scale,
    times norm). rows: with pooled samples (``Hc == 1``) and one scale row per
    KV head, the KV head ``[n]`` of every sample (which row of ``scale`` it takes).
    """
    Hc, C, n, D = buf.shape
    if scale is not None and rows is not None:
        s = scale[rows].reshape(n, C, D).transpose(1, 0, 2)[None]  # [1, C, n, D]
        buf /= s
        if grad is not None:
            grad *= s
    elif scale is not None:
        s = scale.reshape(Hc, C, 1, D)
        buf /= s
        if grad is not None:
            grad *= s
    if norm:
        nrm = np.sqrt(np.square(buf, dtype=np.float64).sum(axis=(1, 3))).astype(np.float32)  # [Hc, n]
        nrm = np.where(nrm > 0, nrm, np.float32(1.0))[:, None, :, None]
        buf /= nrm
        if grad is not None:
            grad *= nrm


def _codebook_seed(seed: int, layer: int, kind: str, head: int, chunk: int) -> int:
    ss = np.random.SeedSequence([seed, layer, KINDS.index(kind), head, chunk])
    return int(ss.generate_state(1, dtype=np.uint64)[0] & ((1 << 63) - 1))


def _round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 copy of ``a`` rounded to the storage dtype (float16 | bfloat16 | float32)."""
    import torch

    if dtype not in ("float16", "bfloat16", "float32"):
        raise ConfigError(f"storage dtype must be float16, bfloat16 or float32, got {dtype!r}")
    return torch.from_numpy(np.array(a, dtype=np.float32)).to(getattr(torch, dtype)).float().numpy()


def _finite_metrics(m: dict[str, float]) -> dict[str, float | None]:
    return {k: (float(v) if math.isfinite(v) else None) for k, v in m.items()}


# ----------------------------------------------------------------- calibration
def calibrate(
    model: Any,
    tokenizer: Any,
    text: str,
    config: GSRQConfig | None = None,
    *,
    tokens: int = DEFAULT_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    model_id: str | None = None,
    text_summary: dict[str, Any] | None = None,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    heldout_samples: int = DEFAULT_HELDOUT_SAMPLES,
    threads: int | None = None,
    progress: bool = True,
    storage_dtype: str = "float16",
) -> Any:
    """Learn GSRQ codebooks for ``model``'s KV cache from ``text``.

    model: a LLaMA-like transformers causal LM (any device and dtype; its
        parameters are frozen — ``requires_grad_(False)`` — by this call).
    tokenizer: its tokenizer. text: calibration text (str).
    config: the :class:`GSRQConfig` (default ``GSRQConfig.from_bits(1.0)``).
    tokens: tokens to use, cut into ``tokens // seq_len`` windows of
        ``seq_len``; a ``heldout_fraction`` of the windows (seeded, at least
        one when there are two or more) only measures reconstruction
        (at most ``heldout_samples`` samples per codebook).
    threads: CPU threads of the Rust engine (None: all).

    Returns a :class:`gsrq.codebooks.Codebooks` whose metadata ``calibration``
    holds the text summary, tokens, seq_len, τ, seed, timings, samples per
    codebook and held-out reconstruction metrics per kind.
    Raises CalibrationError (model not LLaMA-like, text too short, too few
    samples for Kc) or ConfigError (D not dividing head_dim ...).
    """
    import torch
    from tqdm.auto import tqdm

    from gsrq import __version__
    from gsrq.codebooks import Codebooks
    from gsrq.data import token_windows
    from gsrq.engine import ResidualQuantizer, reconstruction_metrics
    from gsrq.levers import fit_key_scale_grad

    t_start = time.perf_counter()
    config = GSRQConfig.from_bits(1.0) if config is None else config
    if not isinstance(config, GSRQConfig):
        raise ConfigError(f"config must be a GSRQConfig, got {type(config).__name__}")
    shape = model_shape(model)
    config.validate_for(shape.head_dim, shape.num_kv_heads)
    if not isinstance(tokens, int) or not isinstance(seq_len, int) or seq_len < 2 or tokens < seq_len:
        raise CalibrationError(f"need integers seq_len >= 2 and tokens >= seq_len, got tokens={tokens!r}, seq_len={seq_len!r}")
    if not 0 <= heldout_fraction < 1:
        raise CalibrationError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if storage_dtype not in ("float16", "bfloat16", "float32"):
        raise ConfigError(f"storage_dtype must be float16, bfloat16 or float32, got {storage_dtype!r}")
    skip = min(config.sinks, seq_len - 2)

    windows = token_windows(tokenizer, text, seq_len, tokens)
    want = tokens // seq_len
    if windows.shape[0] < want:
        raise CalibrationError(
            f"the text gives {windows.shape[0]} windows of {seq_len} tokens ({windows.shape[0] * seq_len} tokens); "
            f"{tokens} tokens need {want}: give a longer text or fewer --tokens"
        )
    n_win = windows.shape[0]
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0x6C1B]))
    n_eval = 0 if n_win < 2 or heldout_fraction == 0 else max(1, round(n_win * heldout_fraction))
    order = rng.permutation(n_win)
    eval_w = sorted(int(i) for i in order[:n_eval])
    train_w = sorted(int(i) for i in order[n_eval:])

    H, hd = shape.num_kv_heads, shape.head_dim
    per_head = config.per_head
    pooled = 1 if per_head else H
    Hc = H if per_head else 1
    plan = _plan(train_w, pooled, seq_len, skip, config.max_samples, rng)
    S = plan.selected.size
    for kind in KINDS:
        kc = config.kind(kind)
        if S < kc.Kc:
            raise CalibrationError(
                f"{kind}: {S} samples per codebook ({len(train_w)} training windows x {pooled} pooled heads x "
                f"{seq_len - skip - 1} positions) is fewer than Kc={kc.Kc}: use more tokens"
            )
    eval_plan = _plan(eval_w, pooled, seq_len, skip, heldout_samples, rng) if eval_w else None
    use_grad = config.grad_weights != "off"
    grad_scale = config.key_scale and config.key_scale_fit == "grad"
    need_grad = use_grad or grad_scale  # gradient key scales need the gradients even without gradient weights

    # key levers (DESIGN: rotation, then channel scale, then norm): the rotation is applied at
    # capture, scale and norm once the scale statistics of all training windows are in
    rotations: dict[int, Any] = {}
    aux: dict[str, np.ndarray] = {}
    if config.key_rotation != "none":
        for layer in range(shape.num_layers):
            signs = np.ones(hd, dtype=np.float32)
            if config.key_rotation == "hadamard_signs":
                srng = np.random.default_rng(np.random.SeedSequence([config.seed, 0x5167, layer]))
                signs = srng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=hd)
                aux[f"layers.{layer}.keys.signs"] = signs
            rotations[layer] = torch.from_numpy(hadamard(hd) * signs[:, None]).to(model.device)
    post_levers = config.key_scale or config.key_norm
    # per KV head sums of squared keys (rms fit) or of squared key gradients (grad fit)
    ssq = {layer: torch.zeros(H, hd, dtype=torch.float64) for layer in range(shape.num_layers)} if config.key_scale else {}
    ssq_count = 0
    # the KV head of every pooled sample slot (shared codebooks), for per-KV-head scales
    slot_heads = np.zeros(S, dtype=np.int64)
    eslot_heads = np.zeros(eval_plan.selected.size if eval_plan is not None else 0, dtype=np.int64)

    # sample buffers [Hc, C, S, D] per (layer, kind); gradient chunk norms [Hc, C, S]
    # (full key gradients [Hc, C, S, D] when key scale/norm change the code domain after capture)
    bufs: dict[tuple[int, str], np.ndarray] = {}
    gbufs: dict[tuple[int, str], np.ndarray] = {}
    gfull: dict[int, np.ndarray] = {}
    ebufs: dict[tuple[int, str], np.ndarray] = {}
    for layer in range(shape.num_layers):
        for kind in KINDS:
            kc = config.kind(kind)
            C = hd // kc.D
            bufs[layer, kind] = np.empty((Hc, C, S, kc.D), dtype=np.float32)
            if use_grad:
                if kind == "keys" and post_levers:
                    gfull[layer] = np.empty((Hc, C, S, kc.D), dtype=np.float32)
                else:
                    gbufs[layer, kind] = np.empty((Hc, C, S), dtype=np.float32)
            if eval_plan is not None:
                ebufs[layer, kind] = np.empty((Hc, C, eval_plan.selected.size, kc.D), dtype=np.float32)

    freeze(model)
    was_training = model.training
    model.eval()
    losses: list[float] = []
    t0 = time.perf_counter()
    jobs = [(w, True, i) for i, w in enumerate(train_w)] + [(w, False, i) for i, w in enumerate(eval_w)]
    jobs.sort()
    for w, is_train, ordinal in tqdm(jobs, desc="capture K/V" + (" + gradients" if need_grad else ""), unit="window", disable=not progress):
        ids = windows[w : w + 1]
        grad = need_grad and is_train
        keys, values, kgs, vgs, loss = capture_kv(model, ids, grad=grad)
        if grad:
            losses.append(loss)
        p = plan if is_train else eval_plan
        dst, heads, pos = p.rows(ordinal)
        if not per_head and dst.size:
            (slot_heads if is_train else eslot_heads)[dst] = heads
        if is_train and config.key_scale:
            ssq_count += seq_len - skip
        for layer in range(shape.num_layers):
            for kind, xs, gs in (("keys", keys, kgs), ("values", values, vgs)):
                D = config.kind(kind).D
                x = xs[layer][0]  # [H, T, hd]
                g = gs[layer][0] if grad else None
                if kind == "keys" and layer in rotations:
                    x = x.float() @ rotations[layer]
                    g = None if g is None else g.float() @ rotations[layer]  # dL/dy = dL/dx R for y = x R
                if is_train and kind == "keys" and config.key_scale:
                    src = g if grad_scale else x
                    assert src is not None
                    ssq[layer] += src[:, skip:].double().pow(2).sum(dim=1).cpu()
                if dst.size == 0:
                    continue
                if is_train:
                    bufs[layer, kind][:, :, dst] = _gather(x, heads, pos, per_head, D)
                    if g is not None and use_grad and kind == "keys" and post_levers:
                        gfull[layer][:, :, dst] = _gather(g, heads, pos, per_head, D)
                    elif g is not None and use_grad:
                        gbufs[layer, kind][:, :, dst] = _gather_norms(chunk_norms(g, D), heads, pos, per_head)
                else:
                    ebufs[layer, kind][:, :, dst] = _gather(x, heads, pos, per_head, D)
        del keys, values, kgs, vgs
    if was_training:
        model.train()
    t_capture = time.perf_counter() - t0

    # training
    t0 = time.perf_counter()
    tensors: dict[str, np.ndarray] = {}
    per_layer: dict[str, list[dict[str, float | None]]] = {k: [] for k in KINDS}
    totals = sum(Hc * (hd // config.kind(k).D) for k in KINDS) * shape.num_layers
    bar = tqdm(total=totals, desc=f"train {config.method} codebooks", unit="codebook", disable=not progress)
    for layer in range(shape.num_layers):
        if post_levers:
            scale = None
            if grad_scale:
                # from the mean squared key gradients, one row per KV head (also with shared codebooks)
                scale = fit_key_scale_grad(ssq[layer].numpy() / max(ssq_count, 1), config.key_scale_power)
                aux[f"layers.{layer}.keys.scale"] = scale
            elif config.key_scale:
                # RMS per channel, [Hc, hd]: per KV head with per-head codebooks, pooled over heads when shared
                sums = ssq[layer].numpy() if per_head else ssq[layer].numpy().sum(axis=0, keepdims=True)
                scale = np.sqrt(sums / max(ssq_count * (1 if per_head else H), 1)).astype(np.float32)
                scale = np.maximum(scale, np.float32(1e-6) * max(float(scale.max()), 1e-30))
                aux[f"layers.{layer}.keys.scale"] = scale
            row_heads = slot_heads if (grad_scale and not per_head) else None
            g = gfull.pop(layer, None)
            apply_post_levers(bufs[layer, "keys"], scale, config.key_norm, g, rows=row_heads)
            if g is not None:
                gbufs[layer, "keys"] = np.linalg.norm(g, axis=-1)
            if eval_plan is not None:
                apply_post_levers(ebufs[layer, "keys"], scale, config.key_norm,
                                  rows=eslot_heads if row_heads is not None else None)
        for kind in KINDS:
            kc = config.kind(kind)
            C = hd // kc.D
            out = np.empty((Hc, C, kc.M, kc.Kc, kc.D), dtype=np.float32)
            recon = np.empty_like(ebufs[layer, kind]) if eval_plan is not None else None
            for h in range(Hc):
                for c in range(C):
                    x = bufs[layer, kind][h, c]
                    weights = gradient_weights(gbufs[layer, kind][h, c], config.tau) if use_grad else None
                    rq = ResidualQuantizer(
                        kc.D,
                        kc.Kc,
                        kc.M,
                        config.method,
                        seed=_codebook_seed(config.seed, layer, kind, h, c),
                        iters=config.iters,
                        init_iters=config.init_iters,
                        weights_in_init_only=config.grad_weights == "init",
                        threads=threads,
                    ).fit(x, weights)
                    # metrics with the codebooks as the file stores them
                    out[h, c] = _round_to(rq.codebooks, storage_dtype)
                    if recon is not None:
                        stored = ResidualQuantizer.from_codebooks(out[h, c], config.method, threads=threads)
                        xe = ebufs[layer, kind][h, c]
                        recon[h, c] = stored.decode(stored.encode(xe, beam=config.beam))
                    bar.update(1)
            tensors[f"layers.{layer}.{kind}.codebooks"] = out
            if recon is not None:
                # metrics on whole head vectors: [Hc, C, n, D] -> [Hc, n, hd]
                a = ebufs[layer, kind].transpose(0, 2, 1, 3).reshape(Hc, -1, hd)
                b = recon.transpose(0, 2, 1, 3).reshape(Hc, -1, hd)
                per_layer[kind].append(_finite_metrics(reconstruction_metrics(a, b)))
            del bufs[layer, kind]
            gbufs.pop((layer, kind), None)
            ebufs.pop((layer, kind), None)
    bar.close()
    tensors.update(aux)
    t_train = time.perf_counter() - t0

    heldout: dict[str, Any] = {}
    for kind in KINDS:
        if per_layer[kind]:
            names = per_layer[kind][0].keys()
            mean = {}
            for n in names:
                vals = [m[n] for m in per_layer[kind] if m[n] is not None]
                mean[n] = float(np.mean(vals)) if vals else None
            heldout[kind] = {"mean_over_layers": mean, "per_layer": per_layer[kind]}
    calibration = {
        "text": dict(text_summary) if text_summary else {"chars": len(text)},
        "tokens": int(n_win * seq_len),
        "tokens_requested": int(tokens),
        "seq_len": int(seq_len),
        "windows": {"train": len(train_w), "heldout": len(eval_w)},
        "positions_skipped_per_window": int(skip),
        "sample_positions": [int(skip), int(seq_len - 1)],  # half-open range of window positions sampled
        "samples_per_codebook": int(S),
        "samples_available_per_codebook": int(len(train_w) * plan.per_window),
        "heldout_samples_per_codebook": int(eval_plan.selected.size) if eval_plan is not None else 0,
        "tau": float(config.tau),
        "seed": int(config.seed),
        "grad_weights": config.grad_weights,
        "method": config.method,
        "mean_loss": float(np.mean(losses)) if losses else None,
        "model_dtype": str(getattr(model, "dtype", "")).replace("torch.", ""),
        "device": str(getattr(model, "device", "")),
        "library_version": __version__,
        "torch_version": torch.__version__,
        "seconds": {
            "capture": round(t_capture, 2),
            "train": round(t_train, 2),
            "total": round(time.perf_counter() - t_start, 2),
        },
        "heldout_reconstruction": heldout,
    }
    if config.key_rotation != "none" or post_levers:
        calibration["heldout_reconstruction_domain"] = "keys in the code domain of the key levers"
    try:
        import transformers

        calibration["transformers_version"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is needed to get here
        pass
    return Codebooks.build(config, model.config, tensors, calibration, model_id or _model_id(model), dtype=storage_dtype)


def _model_id(model: Any) -> str:
    return str(getattr(model.config, "_name_or_path", "") or type(model).__name__)


# ---------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gsrq calibrate``."""
    g = parser.add_argument_group("model and text")
    g.add_argument("--model", default="smollm2", help="smollm2 (default), a model directory, a .gguf file or a cached hub id")
    g.add_argument("--gguf-file", default=None, help="GGUF file name inside the --model directory")
    g.add_argument("--text", default="wiki", help="calibration text: a UTF-8 file, or 'wiki' (the calibration split of the wiki articles)")
    g.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"calibration tokens (default {DEFAULT_TOKENS})")
    g.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help=f"tokens per window (default {DEFAULT_SEQ_LEN})")
    g.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="model dtype during capture (default bfloat16)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    q = parser.add_argument_group("quantizer (--bits preset, or explicit shapes)")
    q.add_argument("--bits", type=float, default=None, help=f"preset rate, one of {GSRQConfig.preset_rates()} (default 1)")
    for prefix, what in (("", "keys and values"), ("key-", "keys"), ("value-", "values")):
        q.add_argument(f"--{prefix}D", type=int, default=None, dest=f"{prefix.replace('-', '_')}D", help=f"chunk length of {what}")
        q.add_argument(f"--{prefix}Kc", type=int, default=None, dest=f"{prefix.replace('-', '_')}Kc", help=f"codebook size of {what}")
        q.add_argument(f"--{prefix}M", type=int, default=None, dest=f"{prefix.replace('-', '_')}M", help=f"residual stages of {what}")
    q.add_argument("--method", choices=("gskm", "km"), default=None, help="codebook learner (default gskm)")
    q.add_argument("--tau", type=float, default=None, help="gradient weight scale tau (default 1)")
    q.add_argument("--grad-weights", choices=("all", "init", "off"), default=None, help="where gradient weights enter the learner (default all)")
    q.add_argument("--no-grad-weights", action="store_true", help="same as --grad-weights off")
    q.add_argument("--per-head", action="store_true", help="one codebook set per KV head instead of shared")
    q.add_argument("--max-samples", type=int, default=None, help="samples kept per codebook (default from the config)")
    q.add_argument("--iters", type=int, default=None, help="GSKM alternating / KM Lloyd iterations")
    q.add_argument("--init-iters", type=int, default=None, help="GSKM spherical-initialisation iterations")
    q.add_argument("--sinks", type=int, default=None, help="leading exact tokens (also skipped in calibration windows)")
    q.add_argument("--key-rotation", choices=("none", "hadamard", "hadamard_signs"), default=None, help="key lever: rotation")
    q.add_argument("--key-scale", nargs="?", const="rms", default=None, choices=("none", "rms", "grad"),
                   help="key lever: per-channel scales fixed at calibration, fitted from the keys' RMS (rms, the "
                        "default of a bare --key-scale) or their loss gradients (grad); none turns a preset's off")
    q.add_argument("--key-scale-power", type=float, default=None, help="exponent p of --key-scale grad (default 0.5)")
    q.add_argument("--key-norm", action="store_true", help="key lever: quantize unit keys, store norms")
    q.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    o = parser.add_argument_group("output")
    o.add_argument("--out", required=True, help="codebook file to write (.safetensors)")
    o.add_argument("--storage-dtype", choices=("float16", "bfloat16", "float32"), default="float16", help="dtype of the stored codebooks")
    o.add_argument("--threads", type=int, default=None, help="CPU threads for training (default all)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> GSRQConfig:
    """The GSRQConfig that the command-line arguments describe."""
    shapes = {n: getattr(args, n) for n in ("D", "Kc", "M", "key_D", "key_Kc", "key_M", "value_D", "value_Kc", "value_M")}
    explicit = any(v is not None for v in shapes.values())
    if args.bits is not None and explicit:
        raise ConfigError("give either --bits or explicit --D/--Kc/--M (and --key-*/--value-*), not both")
    overrides: dict[str, Any] = {}
    for name in ("method", "tau", "max_samples", "iters", "init_iters", "sinks", "seed"):
        v = getattr(args, name)
        if v is not None:
            overrides[name] = v
    if args.no_grad_weights and args.grad_weights not in (None, "off"):
        raise ConfigError("--no-grad-weights contradicts --grad-weights " + args.grad_weights)
    if args.no_grad_weights:
        overrides["grad_weights"] = "off"
    elif args.grad_weights is not None:
        overrides["grad_weights"] = args.grad_weights
    if args.per_head:
        overrides["per_head"] = True
    if args.key_rotation is not None:
        overrides["key_rotation"] = args.key_rotation
    if args.key_scale is not None:
        overrides["key_scale"] = args.key_scale != "none"
        if args.key_scale != "none":
            overrides["key_scale_fit"] = args.key_scale
    if args.key_scale_power is not None:
        overrides["key_scale_power"] = args.key_scale_power
    if args.key_norm:
        overrides["key_norm"] = True
    if not explicit:
        return GSRQConfig.from_bits(1.0 if args.bits is None else args.bits, **overrides)
    base = KindConfig()
    kinds = {}
    for kind, prefix in (("keys", "key_"), ("values", "value_")):
        params = {}
        for f in ("D", "Kc", "M"):
            v = shapes[prefix + f] if shapes[prefix + f] is not None else shapes[f]
            params[f] = v if v is not None else getattr(base, f)
        kinds[kind] = KindConfig(**params)
    return GSRQConfig(keys=kinds["keys"], values=kinds["values"], **overrides)


def summary_lines(cbs: Any, path: str | None = None) -> list[str]:
    """Human-readable summary of a calibration result."""
    cfg = cbs.config
    cal = cbs.calibration if hasattr(cbs, "calibration") else cbs.meta["calibration"]
    hd, H, L = cbs.head_dim, cbs.num_kv_heads, cbs.num_layers
    n_books = sum(int(np.prod(cbs.codebooks(layer, kind).shape[:2])) for layer in range(L) for kind in KINDS)
    lines = [
        f"model         {cbs.model_id}  ({L} layers, {H} KV heads, head_dim {hd})",
        f"config        {cfg.describe()}" + (", per head" if cfg.per_head else ", shared by KV heads"),
        f"calibration   {cal['tokens']} tokens in {cal['windows']['train']}+{cal['windows']['heldout']} windows of "
        f"{cal['seq_len']} (train+held-out), {cal['samples_per_codebook']} samples per codebook, seed {cal['seed']}",
        f"codebooks     {n_books} residual quantizers x stages ({L} layers x keys/values)",
    ]
    if path is not None and os.path.exists(path):
        lines.append(f"file          {path}  {os.path.getsize(path):,} bytes ({cbs.dtype})")
    rates = []
    for ctx in (1024, 4096, 32768):
        rates.append(f"{ctx}: {cfg.bits_per_element(ctx, head_dim=hd, num_kv_heads=H):.3f}")
    lines.append(f"bits/element  codes {cfg.code_bits_per_element:g}; with sinks+codebooks at context " + ", ".join(rates))
    for kind, m in cal.get("heldout_reconstruction", {}).items():
        mm = m["mean_over_layers"]
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(
            f"held-out {kind:<6} rel_mse {fmt(mm.get('rel_mse'))}  cosine {fmt(mm.get('cosine'))}  "
            f"gain_error {fmt(mm.get('gain_error'))}  (mean over layers)"
        )
    s = cal["seconds"]
    lines.append(f"time          capture {s['capture']:.1f} s, training {s['train']:.1f} s, total {s['total']:.1f} s")
    return lines


def run(args: argparse.Namespace) -> int:
    """``gsrq calibrate``: load, calibrate, save, print the summary."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = config_from_args(args)  # config errors before the slow model load
    out = str(args.out)
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise CalibrationError(f"output directory {parent!r} does not exist")
    import torch

    from gsrq.data import load_model, read_text

    t0 = time.perf_counter()
    text, text_summary = read_text(args.text)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    progress = not args.no_progress
    if progress:
        print(f"loading {args.model} ({args.dtype}, {device}) ...", file=sys.stderr)
    model, tokenizer, model_id = load_model(args.model, gguf_file=args.gguf_file, dtype=dtype, device=device)
    t_load = time.perf_counter() - t0
    cbs = calibrate(
        model,
        tokenizer,
        text,
        config,
        tokens=args.tokens,
        seq_len=args.seq_len,
        model_id=model_id,
        text_summary=text_summary,
        threads=args.threads,
        progress=progress,
        storage_dtype=args.storage_dtype,
    )
    cbs.save(out)
    total = time.perf_counter() - t0
    for line in summary_lines(cbs, out):
        print(line)
    print(f"end to end    {total:.1f} s (model and text loading {t_load:.1f} s)")
    return 0


__all__ = [
    "CaptureCache",
    "ModelShape",
    "add_arguments",
    "calibrate",
    "capture_kv",
    "chunk_norms",
    "config_from_args",
    "freeze",
    "gradient_weights",
    "apply_post_levers",
    "hadamard",
    "model_shape",
    "run",
    "summary_lines",
]

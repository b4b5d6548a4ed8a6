"""Perplexity with fake quantization of the KV cache.

The protocol (DESIGN.md §1): a full-sequence forward over each window of
held-out text, in which every cached key and value except the first ``sinks``
tokens is replaced by its reconstruction ``x_hat = q(x)`` before attention.
Optionally an exact sliding window: query ``i`` sees the keys and values of
positions ``j`` with ``i - j < window`` exact and older ones reconstructed —
per (query, key) pair, as a streaming cache with an exact window would give.

:class:`FakeQuantCache` is a ``transformers`` :class:`~transformers.DynamicCache`
whose ``update`` returns reconstructions. Without a window the model's own
attention runs on them (so an identity quantizer reproduces the model's
logits bit for bit). With a window the forward must run under
:func:`fake_quant_attention`, which routes attention to
:func:`window_attention`: scores are computed with both the exact and the
reconstructed keys and chosen per (query, key) by distance.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache

from gsrq.errors import InvalidValueError, ShapeError

# x [B, Hkv, T, hd] -> x_hat, same shape and dtype
Quantizer = Callable[[torch.Tensor], torch.Tensor]
# (layer, kind) -> quantizer, or None for "keep exact"
QuantizerFactory = Callable[[int, str], "Quantizer | None"]

ATTN_IMPL = "gsrq_fakequant"


def identity_quantizer(x: torch.Tensor) -> torch.Tensor:
    """The identity ``x -> x`` (a copy): fake quantization that changes nothing."""
    return x.clone()


class FakeQuantCache(DynamicCache):
    """A DynamicCache whose ``update`` hands attention reconstructed keys/values.

    quantizers: ``quantizers(layer, kind) -> callable | None``; the callable maps
        ``[B, Hkv, T, hd]`` to a tensor of the same shape and dtype (``None``:
        that layer/kind stays exact).
    sinks: the first ``sinks`` positions of the cache are always exact.
    exact_prefill: the first ``update`` of each layer (the prompt, in
        generation) returns exact tensors; later ones return reconstructions —
        a cache that attends the prompt exactly and stores it compressed.
    window: ``0`` — attention sees the reconstructions of every position after
        the sinks; ``> 0`` — the exact tensors are returned and the
        reconstructions kept for :func:`window_attention` (run the model under
        :func:`fake_quant_attention`).

    The cache stores exact keys and values and re-quantizes the whole cached
    sequence on every ``update``: built for full-sequence forwards (perplexity)
    and for simulating a quantized cache during generation.
    """

    def __init__(self, quantizers: QuantizerFactory, *, sinks: int = 4, window: int = 0,
                 exact_prefill: bool = False) -> None:
        super().__init__()
        if not isinstance(sinks, int) or sinks < 0:
            raise InvalidValueError(f"sinks must be a non-negative integer, got {sinks!r}")
        if not isinstance(window, int) or window < 0:
            raise InvalidValueError(f"window must be a non-negative integer, got {window!r}")
        self.quantizers = quantizers
        self.sinks = sinks
        self.window = window
        self.exact_prefill = exact_prefill
        self._reconstructed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _fake(self, x: torch.Tensor, layer_idx: int, kind: str) -> torch.Tensor:
        q = self.quantizers(layer_idx, kind)
        if q is None or x.shape[-2] <= self.sinks:
            return x
        coded = x[..., self.sinks :, :]
        x_hat = q(coded)
        if x_hat.shape != coded.shape or x_hat.dtype != coded.dtype:
            raise ShapeError(
                f"quantizer for layer {layer_idx} {kind} returned {tuple(x_hat.shape)} {x_hat.dtype}, "
                f"expected {tuple(coded.shape)} {coded.dtype}"
            )
        return torch.cat([x[..., : self.sinks, :], x_hat], dim=-2)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        first = len(self.layers) <= layer_idx or self.layers[layer_idx].get_seq_length() == 0
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if first and self.exact_prefill:
            if self.window > 0:
                self._reconstructed[layer_idx] = (keys, values)
            return keys, values
        k_hat = self._fake(keys, layer_idx, "keys")
        v_hat = self._fake(values, layer_idx, "values")
        if self.window > 0:
            self._reconstructed[layer_idx] = (k_hat, v_hat)
            return keys, values
        return k_hat, v_hat

    def reconstructed(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructed keys and values of a layer (window mode), ``[B, Hkv, T, hd]`` each."""
        try:
            return self._reconstructed[layer_idx]
        except KeyError:
            raise InvalidValueError(
                f"no reconstructed keys/values for layer {layer_idx}: window attention needs a "
                "FakeQuantCache with window > 0"
            ) from None


def window_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    gsrq_fake_quant: FakeQuantCache | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention where key/value ``j`` is exact for query ``i`` iff
    ``i - j < window`` or ``j < sinks``, and reconstructed otherwise.

    query: ``[B, Hq, Tq, hd]``; key/value: exact ``[B, Hkv, Tk, hd]`` (the last
    ``Tq`` cache positions are the queries'). Returns ``[B, Tq, Hq, hd]`` in
    the query dtype (the transformers attention-interface convention). Padding
    masks are not supported (perplexity windows have none).
    """
    cache = gsrq_fake_quant
    if not isinstance(cache, FakeQuantCache):
        raise InvalidValueError("window attention needs the FakeQuantCache passed as gsrq_fake_quant=")
    k_hat, v_hat = cache.reconstructed(module.layer_idx)
    B, Hq, Tq, hd = query.shape
    Hkv, Tk = key.shape[1], key.shape[2]
    if Hq % Hkv:
        raise ShapeError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    G = Hq // Hkv
    q = query.float().reshape(B, Hkv, G * Tq, hd)
    s_exact = torch.matmul(q, key.float().transpose(-1, -2)) * scaling
    s_quant = torch.matmul(q, k_hat.float().transpose(-1, -2)) * scaling
    pos_q = torch.arange(Tk - Tq, Tk, device=query.device)
    pos_k = torch.arange(Tk, device=query.device)
    dist = pos_q[:, None] - pos_k[None, :]  # [Tq, Tk]
    exact = (dist < cache.window) | (pos_k < cache.sinks)[None, :]
    exact = exact.repeat(G, 1)  # rows ordered (g, q) like the reshaped query
    causal = (dist >= 0).repeat(G, 1)
    scores = torch.where(exact, s_exact, s_quant).masked_fill(~causal, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = torch.matmul(p * exact, value.float()) + torch.matmul(p * ~exact, v_hat.float())
    out = out.reshape(B, Hq, Tq, hd).transpose(1, 2).contiguous()
    return out.to(query.dtype), None


AttentionInterface.register(ATTN_IMPL, window_attention)


@contextlib.contextmanager
def fake_quant_attention(model: torch.nn.Module) -> Iterator[None]:
    """Route the model's attention to :func:`window_attention` inside the block."""
    config = model.config
    old = config._attn_implementation
    config._attn_implementation = ATTN_IMPL
    try:
        yield
    finally:
        config._attn_implementation = old


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the forward argument that takes a cache: ``cache`` (transformers
    >= 5.2x) or ``past_key_values`` (earlier 5.x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def generate_cache_kwarg() -> str:
    """Name of ``generate``'s cache argument: ``cache`` (newer 5.x) or ``past_key_values``."""
    from transformers.generation import utils as gen_utils

    names = getattr(gen_utils, "ALL_CACHE_NAMES", None)
    return "cache" if names and "cache" in names else "past_key_values"


def forward_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    quantizers: QuantizerFactory | None,
    *,
    sinks: int = 4,
    window: int = 0,
) -> torch.Tensor:
    """Logits ``[B, T, vocab]`` of one full-sequence forward.

    input_ids: int64 ``[B, T]``. ``quantizers=None`` runs the plain model.
    """
    with torch.no_grad():
        if quantizers is None:
            return model(input_ids=input_ids).logits
        cache = FakeQuantCache(quantizers, sinks=sinks, window=window)
        kwargs = {cache_kwarg(model): cache, "use_cache": True}
        if window > 0:
            with fake_quant_attention(model):
                return model(input_ids=input_ids, gsrq_fake_quant=cache, **kwargs).logits
        return model(input_ids=input_ids, **kwargs).logits


@dataclass
class PplResult:
    """Summed negative log-likelihood (nats) over ``tokens`` predicted tokens."""

    nll: float
    tokens: int
    window_nll: list[float]

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


def window_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Sum of next-token NLL: logits ``[1, T, V]`` predict ``input_ids[0, 1:]``."""
    return float(F.cross_entropy(logits[0, :-1].float(), input_ids[0, 1:], reduction="sum"))


def perplexity(
    model: torch.nn.Module,
    windows: Sequence[torch.Tensor] | torch.Tensor,
    quantizers: QuantizerFactory | None,
    *,
    sinks: int = 4,
    window: int = 0,
    progress: bool = True,
    desc: str = "ppl",
) -> PplResult:
    """Perplexity of ``model`` on token windows (each int64 ``[T]``), one forward per window."""
    from tqdm.auto import tqdm

    if len(windows) == 0:
        raise InvalidValueError("perplexity needs at least one token window")
    total, count, per = 0.0, 0, []
    for w in tqdm(windows, desc=desc, disable=not progress, leave=False):
        ids = torch.as_tensor(w).reshape(1, -1).long()
        if ids.shape[1] < 2:
            raise ShapeError(f"a perplexity window needs >= 2 tokens, got {ids.shape[1]}")
        logits = forward_logits(model, ids, quantizers, sinks=sinks, window=window)
        nll = window_nll(logits, ids)
        per.append(nll)
        total += nll
        count += ids.shape[1] - 1
    return PplResult(nll=total, tokens=count, window_nll=per)


def eval_windows(tokenizer, text: str, ctx: int, n: int) -> torch.Tensor:
    """The first ``n`` consecutive ``ctx``-token windows of ``text`` (int64 ``[n, ctx]``),
    cut by :func:`gsrq.data.token_windows`; raises if the text is too short."""
    from gsrq import data

    if ctx < 2 or n < 1:
        raise InvalidValueError(f"need ctx >= 2 and at least one window, got ctx={ctx}, windows={n}")
    w = data.token_windows(tokenizer, text, ctx, max_tokens=ctx * n)
    if w.shape[0] < n:
        raise InvalidValueError(f"the text fills only {w.shape[0]} windows of {ctx} tokens, {n} asked")
    return w


@dataclass
class PplRow:
    """One line of the perplexity table."""

    method: str
    spec: str
    window: int
    code_bits: float
    bits_ctx: float
    bits_32k: float
    ppl: float
    nll: float
    tokens: int
    seconds: float
    codebooks: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def ppl_rows(
    model,
    tokenizer,
    model_id: str,
    methods,
    windows: torch.Tensor,
    *,
    sinks: int = 4,
    exact_windows: Sequence[int] = (0,),
    codebook_dir=None,
    calib=None,
    progress: bool = True,
    log=print,
) -> list[PplRow]:
    """Perplexity of every method (and every exact-window size) on ``windows`` ``[N, T]``."""
    import time

    from gsrq.eval import methods as M

    calib = calib or M.CalibrationSettings()
    _, kv, hd = M.model_shape(model.config)
    ctx = int(windows.shape[1])
    rows: list[PplRow] = []
    for method in methods:
        cbs, path = (None, None)
        if method.needs_codebooks:
            cbs, path = M.load_or_calibrate(method, model, tokenizer, model_id, codebook_dir, calib,
                                            progress=progress, log=log)
        cfg = cbs.config if cbs is not None else method.config
        factory = M.quantizer_factory(method, cbs)
        for w in exact_windows:
            t0 = time.perf_counter()
            res = perplexity(model, windows, factory, sinks=sinks, window=w, progress=progress,
                             desc=f"{method.label} w={w}")
            r_ctx = M.rates(method, cfg, ctx, head_dim=hd, num_kv_heads=kv, sinks=sinks, window=w)
            r_32k = M.rates(method, cfg, 32768, head_dim=hd, num_kv_heads=kv, sinks=sinks, window=w)
            rows.append(PplRow(method.label, method.spec, w, r_ctx["code"], r_ctx["total"], r_32k["total"],
                               res.ppl, res.nll, res.tokens, time.perf_counter() - t0,
                               str(path) if path else None))
            log(f"  {method.label:<28} window={w:<3} ppl={res.ppl:.3f}")
    return rows


def identity_check(model, window_ids: torch.Tensor, *, sinks: int = 4) -> bool:
    """True iff the identity quantizer reproduces the plain model's logits bit for bit on one window."""
    ids = window_ids.reshape(1, -1)
    plain = forward_logits(model, ids, None)
    fake = forward_logits(model, ids, lambda layer, kind: identity_quantizer, sinks=sinks)
    return bool(torch.equal(plain, fake))


__all__ = [
    "FakeQuantCache",
    "PplResult",
    "cache_kwarg",
    "fake_quant_attention",
    "forward_logits",
    "generate_cache_kwarg",
    "identity_quantizer",
    "perplexity",
    "PplRow",
    "eval_windows",
    "identity_check",
    "ppl_rows",
    "window_attention",
]

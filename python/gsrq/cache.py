"""GSRQCache: a transformers cache that stores keys and values as packed GSRQ codes.

Per decoder layer (:class:`GSRQLayer`), in sequence order:

- the first ``sinks`` tokens, exact (model dtype);
- older tokens, encoded into packed code rows ``uint8 [B, Hkv, Tc, R]`` (plus
  float16 key norms when the norm lever is on);
- the most recent ``window`` tokens, exact.

A call of ``update`` with ``n`` new tokens returns the keys and values that
the model attends to: ``sinks + decode(coded) + window + the n new tokens``,
the new tokens exact (so the prompt is attended exactly at prefill), all in
the model dtype. Then the new tokens are stored: the first ones fill the
sinks, and every token that falls out of the exact window is encoded. A token
at position ``p >= sinks`` is thus attended exactly by the calls that bring the
sequence to a length ``L <= p + window + 1`` and through its reconstruction
afterwards.

By default the model's own attention consumes that dense reconstruction.
Fused decode attention takes the compressed form instead: :meth:`GSRQLayer.append`
stores the new tokens like ``update`` and returns the
:class:`~gsrq.attention.CompressedKV` of exactly what ``update`` would have
returned; :meth:`GSRQLayer.compressed_view` shows what is stored. When the
model attends with ``attn_implementation="gsrq"`` (``fused="auto"``, the
default) or ``fused=True``, a single-token ``update`` (a decode step) returns
placeholders carrying that view (:func:`gsrq.attention.attach_compressed`)
and :func:`gsrq.attention.gsrq_attention_forward` runs the fused kernels (the
torch reference on the CPU) over the packed codes; prefill stays exact.

Left padding: :meth:`GSRQCache.set_padding` (called by the forward pre-hook of
:func:`track_padding` / :func:`gsrq.attention.enable_fused_attention` from the
prompt's attention mask) tells the cache how many padding tokens open each
row. The first update then stores each row's first ``sinks`` real tokens as
its exact sinks and moves the padding behind them (the view's ``positions``
maps the stored order back to sequence order), so a padded row is stored as
its unpadded run would be, plus masked padding tokens among the coded ones.

Works with the layered cache API of transformers 5.x (``Cache`` /
``CacheLayerMixin``): greedy, sampling and beam search (``reorder_cache``),
``crop``, ``batch_select_indices`` and ``batch_repeat_interleave``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from gsrq.attention import (
    CONSUMED_ATTR,
    CompressedKV,
    attach_compressed,
    is_gsrq_attention,
    register_transformers_attention,
)
from gsrq.config import GSRQConfig
from gsrq.errors import ConfigError, InvalidValueError, ModelMismatchError, ShapeError
from gsrq.quantizer import KVQuantizer

__all__ = ["GSRQCache", "GSRQLayer", "FUSED_MODES", "generate_cache_kwarg", "model_shapes", "track_padding"]

#: Values of ``GSRQCache(fused=...)``.
FUSED_MODES = (True, False, "auto")

register_transformers_attention()  # so attn_implementation="gsrq" is known once gsrq.cache is imported


def generate_cache_kwarg() -> str:
    """Name of the keyword that passes a cache to ``model.generate`` and ``forward``.

    ``"cache"`` on transformers versions that renamed it, else ``"past_key_values"``.
    """
    from transformers.generation.utils import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


def model_shapes(model_config: Any) -> dict[str, int]:
    """``num_layers``, ``num_kv_heads`` and ``head_dim`` of a transformers decoder config."""
    cfg = model_config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config(decoder=True)
    try:
        num_layers = int(cfg.num_hidden_layers)
        num_heads = int(cfg.num_attention_heads)
    except AttributeError as e:
        raise ModelMismatchError(f"model config lacks {e.name or 'a field'}; only decoder LLM configs are supported") from e
    kv = getattr(cfg, "num_key_value_heads", None)
    num_kv_heads = int(kv) if kv is not None else num_heads
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is None:
        head_dim = int(cfg.hidden_size) // num_heads
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise ConfigError(f"GSRQCache supports full-attention layers only; the model has {other}")
    return {"num_layers": num_layers, "num_kv_heads": num_kv_heads, "head_dim": int(head_dim)}


def _cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return b if a.shape[2] == 0 else (a if b.shape[2] == 0 else torch.cat([a, b], dim=2))


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a compact tensor with storage of its own.

    Held tensors must not be views into the model's projection outputs: those
    would stay alive with them and memory_bytes would not see them.
    """
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


#: Smallest capacity step (tokens) of the coded-row buffers; growth is geometric above it.
MIN_CODE_CHUNK = 256
#: Capacity growth factor of the coded-row buffers.
GROWTH = 1.5
#: Extra slots of the exact-window buffer beyond ``window`` (at least ``window``): the
#: window's tokens move to its front once every ``capacity - window`` appended tokens.
MIN_WINDOW_SLACK = 16


def _grown(capacity: int, need: int) -> int:
    """Capacity (tokens) after growing ``capacity`` to hold ``need``: ×GROWTH, at least MIN_CODE_CHUNK more."""
    return max(need, int(capacity * GROWTH), capacity + MIN_CODE_CHUNK)


def _with_capacity(t: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    """A new buffer like ``t`` (token axis 2) of ``capacity`` tokens holding ``t[:, :, :used]`` at its front."""
    shape = list(t.shape)
    shape[2] = capacity
    out = torch.empty(shape, dtype=t.dtype, device=t.device)
    if used:
        out[:, :, :used] = t[:, :, :used]
    return out


def _to_sequence_order(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Stored order -> sequence order of ``x`` ``[B, Hkv, T, hd]``; ``positions`` int64 ``[B, Th]`` (slot -> position)."""
    B, Hkv, _, hd = x.shape
    th = positions.shape[1]
    slots = positions.argsort(dim=1)  # position -> slot (a permutation of 0..Th-1 per row)
    idx = slots[:, None, :, None].expand(B, Hkv, th, hd)
    return torch.cat([x.gather(2, idx), x[:, :, th:]], dim=2)


class GSRQLayer(CacheLayerMixin):
    """One decoder layer's GSRQ cache.

    key_quantizer / value_quantizer: the layer's :class:`KVQuantizer` for keys and values.
    sinks: first tokens kept exact. window: most recent tokens kept exact.
    fused: decode steps (single-token updates) return placeholder keys/values
        carrying the compressed view for ``attn_implementation="gsrq"``:
        True always, False never, ``"auto"`` when ``attn_config`` (the model's
        text config, set by :class:`GSRQCache`) names the gsrq attention.

    Held tensors (``B`` batch, ``Hkv`` KV heads, ``hd`` head_dim; model dtype for exact ones):
    ``sink_keys``/``sink_values`` ``[B, Hkv, Ts, hd]``, ``key_codes``/``value_codes``
    uint8 ``[B, Hkv, Tc, R]``, ``key_norms`` float16 ``[B, Hkv, Tc]`` or None,
    ``window_keys``/``window_values`` ``[B, Hkv, Tw, hd]``.

    Storage: the coded rows and key norms live in capacity buffers
    (``[B, Hkv, capacity, R]`` / ``[B, Hkv, capacity]``) that grow
    geometrically (×``GROWTH``, at least ``MIN_CODE_CHUNK`` tokens a time), so
    a decode step writes its new row in place and the reallocations of a
    generation are amortised (counted in ``reallocations``). The exact window
    lives in a buffer of ``window + max(window, MIN_WINDOW_SLACK)`` slots used
    as a sliding run ``[w0, w1)``: new tokens are written at ``w1``, tokens
    leaving the window advance ``w0`` and are encoded straight from the buffer,
    and the run moves to the front only when it reaches the end (≤ ``window``
    tokens copied every ``capacity - window`` steps). ``key_codes`` etc. are
    views ``[:, :, :Tc]`` / ``[:, :, w0:w1]`` of these buffers, valid until the
    next update, crop or batch operation (views handed out earlier keep their
    contents across later appends, except window slots reused after a move to
    the front). :meth:`memory_report` counts the bytes in use and the bytes
    reserved; :meth:`shrink_to_fit` releases the spare capacity.
    """

    is_sliding = False
    is_compileable = False

    def __init__(
        self,
        key_quantizer: KVQuantizer,
        value_quantizer: KVQuantizer,
        *,
        sinks: int,
        window: int,
        fused: bool | str = "auto",
        attn_config: Any = None,
    ) -> None:
        super().__init__()
        if not any(fused is m or (isinstance(m, str) and fused == m) for m in FUSED_MODES):
            raise ConfigError(f"fused must be True, False or 'auto', got {fused!r}")
        for name, q in (("key_quantizer", key_quantizer), ("value_quantizer", value_quantizer)):
            if not isinstance(q, KVQuantizer):
                raise ConfigError(f"{name} must be a KVQuantizer, got {type(q).__name__}")
        if value_quantizer.norm or value_quantizer.rotation is not None or value_quantizer.scale is not None:
            raise ConfigError("key levers (rotation, scale, norm) do not apply to values")
        if key_quantizer.head_dim != value_quantizer.head_dim:
            raise ConfigError(
                f"key and value codebooks disagree on head_dim: {key_quantizer.head_dim} vs {value_quantizer.head_dim}"
            )
        for name, v in (("sinks", sinks), ("window", window)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {v!r}")
        self.key_quantizer = key_quantizer
        self.value_quantizer = value_quantizer
        self.sinks = sinks
        self.window = window
        self.fused = fused
        self.attn_config = attn_config
        self._clear()

    def _clear(self) -> None:
        # left padding: per-row pad counts waiting for the first update, and afterwards the
        # stored order of the first Th tokens (positions: slot -> sequence position, int64 [B, Th])
        self.pending_pads: list[int] | None = None
        self.head_positions: torch.Tensor | None = None
        self._last_placeholder: torch.Tensor | None = None
        self.keys = self.values = None
        self.sink_keys = self.sink_values = None
        # capacity buffers (see the class docstring) and their fill
        self._kc_buf = self._vc_buf = self._kn_buf = None
        self._wk_buf = self._wv_buf = None
        self._tc = 0
        self._w0 = self._w1 = 0
        #: buffer reallocations so far (coded rows, norms, window), for diagnostics and tests
        self.reallocations = 0
        self.is_initialized = False

    # ------------------------------------------------------------ stored views
    @property
    def key_codes(self) -> torch.Tensor | None:
        """uint8 ``[B, Hkv, Tc, R]``: a view of the key-code buffer."""
        return None if self._kc_buf is None else self._kc_buf[:, :, : self._tc]

    @property
    def value_codes(self) -> torch.Tensor | None:
        """uint8 ``[B, Hkv, Tc, R]``: a view of the value-code buffer."""
        return None if self._vc_buf is None else self._vc_buf[:, :, : self._tc]

    @property
    def key_norms(self) -> torch.Tensor | None:
        """float16 ``[B, Hkv, Tc]`` (a view of the norm buffer), or None without the norm lever."""
        return None if self._kn_buf is None else self._kn_buf[:, :, : self._tc]

    @property
    def window_keys(self) -> torch.Tensor | None:
        """``[B, Hkv, Tw, hd]``: a view of the window buffer."""
        return None if self._wk_buf is None else self._wk_buf[:, :, self._w0 : self._w1]

    @property
    def window_values(self) -> torch.Tensor | None:
        """``[B, Hkv, Tw, hd]``: a view of the window buffer."""
        return None if self._wv_buf is None else self._wv_buf[:, :, self._w0 : self._w1]

    @property
    def code_capacity(self) -> int:
        """Coded tokens the buffers hold without reallocating."""
        return 0 if self._kc_buf is None else int(self._kc_buf.shape[2])

    @property
    def window_capacity(self) -> int:
        """Slots of the exact-window buffer."""
        return 0 if self._wk_buf is None else int(self._wk_buf.shape[2])

    def _window_slots(self) -> int:
        return self.window + max(self.window, MIN_WINDOW_SLACK)

    def _reserve_codes(self, need: int) -> None:
        """Make the code (and norm) buffers hold ``need`` tokens, growing geometrically."""
        cap = self.code_capacity
        if need <= cap:
            return
        new = _grown(cap, need)
        self._kc_buf = _with_capacity(self._kc_buf, self._tc, new)
        self._vc_buf = _with_capacity(self._vc_buf, self._tc, new)
        if self._kn_buf is not None:
            self._kn_buf = _with_capacity(self._kn_buf.unsqueeze(-1), self._tc, new).squeeze(-1)
        self.reallocations += 1

    def _push_codes(self, packed_k: torch.Tensor, packed_v: torch.Tensor, norms: torch.Tensor | None) -> None:
        n = packed_k.shape[2]
        if n == 0:
            return
        self._reserve_codes(self._tc + n)
        t0, t1 = self._tc, self._tc + n
        self._kc_buf[:, :, t0:t1] = packed_k
        self._vc_buf[:, :, t0:t1] = packed_v
        if self._kn_buf is not None:
            self._kn_buf[:, :, t0:t1] = norms
        self._tc = t1

    def _window_room(self, n: int) -> bool:
        """Make room for ``n`` tokens after the window run; False if the buffer cannot hold window + n."""
        tw = self._w1 - self._w0
        cap = self.window_capacity
        if tw + n > cap:
            return False
        if self._w1 + n > cap:  # move the run to the front (<= window tokens)
            if tw:
                run_k = self._wk_buf[:, :, self._w0 : self._w1].clone()
                run_v = self._wv_buf[:, :, self._w0 : self._w1].clone()
                self._wk_buf[:, :, :tw] = run_k
                self._wv_buf[:, :, :tw] = run_v
            self._w0, self._w1 = 0, tw
        return True

    def _set_window(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the window by ``keys``/``values`` ``[B, Hkv, n, hd]`` (reallocating if they do not fit)."""
        n = keys.shape[2]
        cap = max(self._window_slots(), n)
        if self.window_capacity < cap:
            self._wk_buf = _with_capacity(keys, 0, cap)
            self._wv_buf = _with_capacity(values, 0, cap)
            self.reallocations += 1
        if n:
            self._wk_buf[:, :, :n] = keys
            self._wv_buf[:, :, :n] = values
        self._w0, self._w1 = 0, n

    # -------------------------------------------------------------- transformers API
    @property
    def is_croppable(self) -> bool:  # type: ignore[override]
        """Crop restores the exact earlier state only when no window delays encoding."""
        return self.window == 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        """Allocate empty state on ``key_states``' device and dtype (batch and heads taken from it)."""
        B, Hkv, _, hd = key_states.shape
        if hd != self.key_quantizer.head_dim:
            raise ShapeError(f"keys have head_dim {hd}, the codebooks were trained for {self.key_quantizer.head_dim}")
        for q in (self.key_quantizer, self.value_quantizer):
            if q.num_codebook_heads > 1 and q.num_codebook_heads != Hkv:
                raise ShapeError(f"the model has {Hkv} KV heads, the per-head codebooks have {q.num_codebook_heads}")
        dev, dt = key_states.device, key_states.dtype
        self.device, self.dtype = dev, dt
        self.key_quantizer = self.key_quantizer.to(dev)
        self.value_quantizer = self.value_quantizer.to(dev)
        empty = torch.empty(B, Hkv, 0, hd, device=dev, dtype=dt)
        self.sink_keys, self.sink_values = empty, empty.clone()
        self._wk_buf = torch.empty(B, Hkv, self._window_slots(), hd, device=dev, dtype=dt)
        self._wv_buf = torch.empty_like(self._wk_buf)
        self._w0 = self._w1 = self._tc = 0
        # code buffers start empty; the first encoded tokens allocate them
        self._kc_buf = torch.empty(B, Hkv, 0, self.key_quantizer.row_bytes, device=dev, dtype=torch.uint8)
        self._vc_buf = torch.empty(B, Hkv, 0, self.value_quantizer.row_bytes, device=dev, dtype=torch.uint8)
        self._kn_buf = torch.empty(B, Hkv, 0, device=dev, dtype=torch.float16) if self.key_quantizer.norm else None
        self.is_initialized = True

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ShapeError(f"{name} must be a tensor [B, Hkv, T, head_dim], got {getattr(t, 'shape', type(t))}")
            if not t.is_floating_point():
                raise ShapeError(f"{name} must be a float tensor, got {t.dtype}")
        if key_states.shape != value_states.shape:
            raise ShapeError(f"key_states {list(key_states.shape)} and value_states {list(value_states.shape)} differ")
        if self.is_initialized:
            B, Hkv = self.sink_keys.shape[:2]
            if key_states.shape[:2] != (B, Hkv) or key_states.shape[3] != self.sink_keys.shape[3]:
                raise ShapeError(
                    f"new states {list(key_states.shape)} do not match the cache [B={B}, Hkv={Hkv}, T, "
                    f"hd={self.sink_keys.shape[3]}]"
                )

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> CompressedKV:
        """Store new tokens; return the compressed view of what this call attends to.

        key_states, value_states: ``[B, Hkv, n, hd]``, model dtype. The view
        holds the sinks and codes as they were before the call and, as its
        exact window, the earlier window followed by the ``n`` new tokens.
        """
        self._check_states(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        key_states = key_states.to(self.dtype)
        value_states = value_states.to(self.dtype)
        first = self.get_seq_length() == 0
        fields = self._stored_fields()  # taken before storing: the view's coded part is what was held
        if first and self.pending_pads is not None:
            win_k, win_v = key_states, value_states  # the view keeps sequence order; the store does not
            self._begin_padding(key_states.shape[2])
            key_states, value_states = self._to_stored_order(key_states), self._to_stored_order(value_states)
            self._store(key_states, value_states)
        else:
            win_k, win_v = self._store(key_states, value_states)
        return CompressedKV(window_keys=win_k, window_values=win_v, **fields)

    # ----------------------------------------------------------- left padding
    def set_padding(self, pads: Sequence[int] | None) -> None:
        """Padding tokens opening each row of the coming prompt (``[B]`` ints), before the first update.

        None or all zeros: no padding. The first update then keeps each row's
        first ``sinks`` real tokens as its sinks (see :class:`GSRQCache`).
        """
        if self.get_seq_length() > 0:
            raise ConfigError("set_padding must come before the first update (the cache already holds tokens)")
        if pads is None:
            self.pending_pads = None
            return
        pads = [int(p) for p in pads]
        if any(p < 0 for p in pads):
            raise InvalidValueError(f"pad counts must be non-negative, got {pads}")
        self.pending_pads = pads if any(pads) else None

    def _begin_padding(self, prompt: int) -> None:
        """Build ``head_positions`` for a first update of ``prompt`` tokens from ``pending_pads``."""
        pads, self.pending_pads = self.pending_pads, None
        B = self.sink_keys.shape[0]
        if len(pads) != B:
            raise ShapeError(f"padding is known for {len(pads)} rows, the first update has {B}")
        rows = []
        for b, p in enumerate(pads):
            if p >= prompt:
                raise ShapeError(f"row {b} has {p} padding tokens, the first update only {prompt} tokens")
            k = min(self.sinks, prompt - p)  # real tokens that become this row's sinks
            rows.append(list(range(p, p + k)) + list(range(p)))
        th = max(len(r) for r in rows)
        rows = [r + list(range(len(r), th)) for r in rows]
        if all(r == list(range(th)) for r in rows):
            return  # no sinks to move (sinks=0)
        self.head_positions = torch.tensor(rows, dtype=torch.int64).to(self.device)

    def _to_stored_order(self, x: torch.Tensor) -> torch.Tensor:
        """Sequence order -> stored order of a first update ``x`` ``[B, Hkv, P, hd]``."""
        if self.head_positions is None:
            return x
        B, Hkv, _, hd = x.shape
        th = self.head_positions.shape[1]
        idx = self.head_positions[:, None, :, None].expand(B, Hkv, th, hd)
        return torch.cat([x.gather(2, idx), x[:, :, th:]], dim=2)

    def _placeholder(self, like: torch.Tensor, tokens: int) -> torch.Tensor:
        """A zero-memory NaN ``[B, Hkv, tokens, hd]`` stand-in (any attention but gsrq's yields NaN)."""
        B, Hkv, _, hd = like.shape
        return like.new_full((1, 1, 1, 1), float("nan")).expand(B, Hkv, tokens, hd)

    def fused_active(self) -> bool:
        """Whether single-token updates hand the compressed view to the attention (see ``fused``)."""
        if self.fused is True or self.fused is False:
            return self.fused
        return self.attn_config is not None and is_gsrq_attention(getattr(self.attn_config, "_attn_implementation", None))

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new tokens ``[B, Hkv, n, hd]``; return the earlier window followed by them (keys, values).

        Decode steps (sinks full, window + n fitting the window buffer) write
        the new tokens into the window buffer and encode the tokens leaving the
        window straight from it, so they copy O(n) data; the returned window is
        then a view of the buffer. Otherwise (prefill, sinks still filling) the
        window is rebuilt from ``window + new``.
        """
        n = key_states.shape[2]
        if self.sink_keys.shape[2] >= self.sinks and self._window_room(n):
            w0 = self._w0
            self._wk_buf[:, :, self._w1 : self._w1 + n] = key_states
            self._wv_buf[:, :, self._w1 : self._w1 + n] = value_states
            self._w1 += n
            out_k, out_v = self._wk_buf[:, :, w0 : self._w1], self._wv_buf[:, :, w0 : self._w1]
            move = self._w1 - self._w0 - self.window
            if move > 0:
                self._encode_push(out_k[:, :, :move], out_v[:, :, :move])
                self._w0 += move
            return out_k, out_v
        tail_k = _cat(self.window_keys, key_states)
        tail_v = _cat(self.window_values, value_states)
        out_k, out_v = tail_k, tail_v
        # the first `sinks` tokens of the sequence stay exact for good
        need = self.sinks - self.sink_keys.shape[2]
        if need > 0:
            take = min(need, tail_k.shape[2])
            self.sink_keys = _own(_cat(self.sink_keys, tail_k[:, :, :take]))
            self.sink_values = _own(_cat(self.sink_values, tail_v[:, :, :take]))
            tail_k, tail_v = tail_k[:, :, take:], tail_v[:, :, take:]
        # tokens that left the exact window are encoded
        move = tail_k.shape[2] - self.window
        if move > 0:
            self._encode_push(tail_k[:, :, :move], tail_v[:, :, :move])
            tail_k, tail_v = tail_k[:, :, move:], tail_v[:, :, move:]
        self._set_window(tail_k, tail_v)
        return out_k, out_v

    def _encode_push(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Encode ``[B, Hkv, n, hd]`` tokens leaving the window and append their rows to the code buffers."""
        enc_k = self.key_quantizer.encode(keys)
        enc_v = self.value_quantizer.encode(values)
        self._push_codes(enc_k.packed, enc_v.packed, enc_k.norms if self._kn_buf is not None else None)

    def reconstruct(self, view: CompressedKV) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense keys and values ``[B, Hkv, T, hd]`` of a view, in the model dtype: sinks, decoded codes, window."""
        parts_k = [view.sink_keys]
        parts_v = [view.sink_values]
        if view.key_codes.shape[2] > 0:
            parts_k.append(self.key_quantizer.decode(view.key_codes, view.key_norms).to(self.dtype))
            parts_v.append(self.value_quantizer.decode(view.value_codes).to(self.dtype))
        parts_k.append(view.window_keys)
        parts_v.append(view.window_values)
        parts_k = [p for p in parts_k if p.shape[2] > 0] or [view.window_keys]
        parts_v = [p for p in parts_v if p.shape[2] > 0] or [view.window_values]
        keys, values = torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2)
        if view.positions is not None and view.positions.shape[1] > 0:
            keys, values = _to_sequence_order(keys, view.positions), _to_sequence_order(values, view.positions)
        return keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``[B, Hkv, n, hd]`` new keys/values; return the full ``[B, Hkv, T, hd]`` keys/values to attend to.

        The returned tensors are sinks + reconstruction of the coded tokens +
        exact window + the new tokens (exact), in the model dtype, in sequence
        order. On a decode step (``n == 1``) with :meth:`fused_active`, they are
        instead zero-memory placeholders of that shape whose keys carry the
        :class:`CompressedKV` (for ``attn_implementation="gsrq"``).
        """
        if self._last_placeholder is not None and not getattr(self._last_placeholder, CONSUMED_ATTR, False):
            self._last_placeholder = None
            raise ConfigError(
                "GSRQCache(fused=True) returned a compressed view that the model's attention did not read: "
                "the model must attend with attn_implementation='gsrq' (gsrq.enable_fused_attention(model)), "
                "or build the cache with fused='auto' or False"
            )
        view = self.append(key_states, value_states)
        if key_states.shape[2] == 1 and self.fused_active():
            T = view.num_tokens
            key = attach_compressed(self._placeholder(view.window_keys, T), view)
            self._last_placeholder = key
            return key, self._placeholder(view.window_values, T)
        return self.reconstruct(view)

    def compressed_view(self, valid: torch.Tensor | None = None) -> CompressedKV:
        """The stored state as a :class:`CompressedKV` (``valid``: optional bool ``[B, T]`` padding mask)."""
        if not self.is_initialized:
            raise ShapeError("the cache layer holds nothing yet")
        return CompressedKV(window_keys=self.window_keys, window_values=self.window_values, valid=valid,
                            **self._stored_fields())

    def _stored_fields(self) -> dict[str, Any]:
        """The :class:`CompressedKV` fields of the sinks, the coded tokens and the codebooks held now."""
        return dict(
            sink_keys=self.sink_keys,
            sink_values=self.sink_values,
            key_codes=self.key_codes,
            value_codes=self.value_codes,
            key_codebooks=self.key_quantizer.codebooks,
            value_codebooks=self.value_quantizer.codebooks,
            key_bits=self.key_quantizer.code_bits,
            value_bits=self.value_quantizer.code_bits,
            key_norms=self.key_norms,
            query_map=self.key_quantizer.query_map,
            value_map=None,
            positions=self.head_positions,
        )

    def get_mask_sizes(self, query_length: Any) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for the mask; accepts a query length or a cache_position tensor."""
        q = int(query_length.shape[0]) if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.get_seq_length() + q, 0

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return int(self.sink_keys.shape[2] + self.key_codes.shape[2] + self.window_keys.shape[2])

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        """Batch rows held (AttributeError before the first update, as transformers' layers)."""
        if not self.is_initialized:
            raise AttributeError("batch_size")
        return int(self.sink_keys.shape[0])

    @property
    def max_batch_size(self) -> int:
        return self.batch_size

    @property
    def num_sink(self) -> int:
        return 0 if not self.is_initialized else int(self.sink_keys.shape[2])

    @property
    def num_coded(self) -> int:
        return 0 if not self.is_initialized else int(self.key_codes.shape[2])

    @property
    def num_window(self) -> int:
        return 0 if not self.is_initialized else int(self.window_keys.shape[2])

    # --------------------------------------------------------------- batch ops
    #: The stored state, as views (see the class docstring).
    _STATE = ("sink_keys", "sink_values", "key_codes", "value_codes", "key_norms", "window_keys", "window_values")
    #: The tensors really held (buffers with their spare capacity).
    _HELD = ("sink_keys", "sink_values", "_kc_buf", "_vc_buf", "_kn_buf", "_wk_buf", "_wv_buf", "head_positions")

    def _map(self, fn: Any) -> None:
        """Apply a batch-axis function to every held tensor, buffers whole (capacity and fill are kept)."""
        if not self.is_initialized:
            return
        for name in self._HELD:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, _own(fn(t)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search (codes are per row, so this is lossless)."""
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (negative), or keep the first ``tokens_to_remove`` (positive).

        Tokens left keep their current form: exact ones stay exact, coded ones
        stay coded (the window refills as new tokens arrive). Only the fill
        counts change (no copy); :meth:`shrink_to_fit` releases the capacity.
        """
        if not self.is_initialized:
            return
        n = int(tokens_to_remove)
        length = self.get_seq_length()
        keep = length + n if n < 0 else (length if n == 0 else min(n, length))
        keep = max(keep, 0)
        if self.head_positions is not None:
            if keep == 0:
                self.head_positions = None
            elif keep < self.head_positions.shape[1]:
                raise InvalidValueError(
                    f"cannot crop a left-padded cache to {keep} tokens: its first "
                    f"{self.head_positions.shape[1]} are stored out of sequence order"
                )
        ts, tc = self.sink_keys.shape[2], self._tc
        if keep < ts:
            self.sink_keys = _own(self.sink_keys[:, :, :keep])
            self.sink_values = _own(self.sink_values[:, :, :keep])
        self._tc = max(0, min(tc, keep - ts))
        self._w1 = self._w0 + max(0, keep - ts - tc)

    def shrink_to_fit(self) -> None:
        """Reallocate the code, norm and window buffers to exactly what they hold (frees the spare capacity).

        The next encoded token grows the code buffers again (geometrically).
        """
        if not self.is_initialized:
            return
        self._kc_buf = _own(self.key_codes)
        self._vc_buf = _own(self.value_codes)
        if self._kn_buf is not None:
            self._kn_buf = _own(self.key_norms)
        self._wk_buf, self._wv_buf = _own(self.window_keys), _own(self.window_values)
        self._w0, self._w1 = 0, self._wk_buf.shape[2]

    def reset(self) -> None:
        self._clear()

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    # ------------------------------------------------------------- accounting
    def memory_report(self) -> dict[str, int]:
        """Bytes of this layer: in use ``codes``, ``norms``, ``exact`` (sinks + window), and ``reserved``.

        ``codes``/``norms``/``exact`` count the tokens cached (what the
        compressed format needs); ``reserved`` is all the bytes allocated for
        them, including the spare capacity of the growable buffers
        (``reserved >= codes + norms + exact``; equal after :meth:`shrink_to_fit`
        only when the window buffer holds exactly the window).
        """
        if not self.is_initialized:
            return {"codes": 0, "norms": 0, "exact": 0, "reserved": 0}

        def nbytes(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        return {
            "codes": nbytes(self.key_codes) + nbytes(self.value_codes),
            "norms": nbytes(self.key_norms),
            "exact": sum(nbytes(t) for t in (self.sink_keys, self.sink_values, self.window_keys, self.window_values)),
            "reserved": sum(
                nbytes(getattr(self, name))
                for name in ("sink_keys", "sink_values", "_kc_buf", "_vc_buf", "_kn_buf", "_wk_buf", "_wv_buf")
            ),
        }

    def num_elements(self) -> int:
        """Key and value elements cached: ``2 * B * Hkv * T * hd``."""
        if not self.is_initialized:
            return 0
        B, Hkv, _, hd = self.sink_keys.shape
        return 2 * B * Hkv * self.get_seq_length() * hd

    def codebook_bytes(self) -> int:
        """Bytes of this layer's codebooks in 16-bit floats (shared by every sequence)."""
        return self.key_quantizer.codebook_bytes + self.value_quantizer.codebook_bytes


class GSRQCache(Cache):
    """A transformers cache holding keys and values as GSRQ codes; pass it to ``model.generate``.

    Build it with :meth:`from_pretrained` (codebook file + model) or
    :meth:`from_codebooks` (a :class:`gsrq.Codebooks` and the model config),
    or directly from per-layer quantizers.
    ``sinks``/``window`` default to the codebooks' config, kept as ``gsrq_config``.

    fused: how decode steps attend (see :class:`GSRQLayer`). ``"auto"``: through
    the fused decode attention when ``model_config`` (the model's config, read
    at every step) says ``attn_implementation="gsrq"``
    (:func:`gsrq.attention.enable_fused_attention`), else through the dense
    reconstruction. True: always (the model must attend with "gsrq"; if its
    attention ignores the compressed view the next update raises ConfigError).
    False: never. On CUDA the fused path runs the kernels; on the CPU the
    torch reference of the same algorithm.

    Left padding: call :meth:`set_padding` with the prompt's attention mask
    before the first forward, or let :func:`track_padding` do it.
    """

    def __init__(
        self,
        key_quantizers: Sequence[KVQuantizer],
        value_quantizers: Sequence[KVQuantizer],
        *,
        sinks: int = 4,
        window: int = 0,
        config: GSRQConfig | None = None,
        fused: bool | str = "auto",
        model_config: Any = None,
    ) -> None:
        if len(key_quantizers) != len(value_quantizers) or not key_quantizers:
            raise ConfigError(
                f"need one key and one value quantizer per layer, got {len(key_quantizers)} and {len(value_quantizers)}"
            )
        attn_config = model_config
        if attn_config is not None and hasattr(attn_config, "get_text_config"):
            attn_config = attn_config.get_text_config(decoder=True)
        layers = [
            GSRQLayer(k, v, sinks=sinks, window=window, fused=fused, attn_config=attn_config)
            for k, v in zip(key_quantizers, value_quantizers)
        ]
        super().__init__(layers=layers)
        self.sinks = sinks
        self.window = window
        self.fused = fused
        self.gsrq_config = config

    def set_padding(self, attention_mask: torch.Tensor | None) -> None:
        """Learn each row's left padding from the prompt's attention mask, before the first forward.

        attention_mask: ``[B, P]`` (0 = padding, 1 = token; any int/bool/float
        dtype) of the batch whose first forward comes next (with beams: the
        expanded batch, as ``generate`` passes it). Row ``b`` opens with
        ``pads[b]`` = the number of leading zeros; its first ``sinks`` real
        tokens become its sinks. None: no padding. Reads the mask on the host
        once (one device sync when it lives on a GPU).
        """
        if self.get_seq_length() > 0:
            raise ConfigError("set_padding must come before the first forward (the cache already holds tokens)")
        pads = None
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
                raise ShapeError(
                    f"attention_mask must be a [batch, prompt] tensor, got {getattr(attention_mask, 'shape', type(attention_mask))}"
                )
            m = attention_mask.detach().to("cpu") != 0
            if m.shape[1] == 0 or not bool(m.any(dim=1).all()):
                raise InvalidValueError("attention_mask has a row without any token (all padding)")
            pads = (m.long().cumsum(dim=1) == 0).sum(dim=1).tolist()
        for layer in self.layers:
            layer.set_padding(pads)

    @classmethod
    def from_codebooks(
        cls,
        codebooks: Any,
        model_config: Any,
        device: torch.device | str | None = None,
        *,
        sinks: int | None = None,
        window: int | None = None,
        engine: str = "auto",
        threads: int | None = None,
        fused: bool | str = "auto",
        check_values: bool | None = None,
    ) -> "GSRQCache":
        """A cache from a :class:`gsrq.Codebooks` object checked against ``model_config``.

        Raises :class:`gsrq.ModelMismatchError` (naming the field) when the
        codebooks were made for another model. ``device`` None: the device of
        the first keys seen. ``model_config`` is kept for ``fused="auto"``.
        ``engine``, ``threads``, ``check_values``: see :class:`KVQuantizer`.
        """
        shapes = model_shapes(model_config)
        for field in ("num_layers", "num_kv_heads", "head_dim"):
            have = int(getattr(codebooks, field))
            if have != shapes[field]:
                raise ModelMismatchError(f"codebooks have {field}={have}, the model has {field}={shapes[field]}")
        check = getattr(codebooks, "check_model", None)
        if check is not None:
            check(model_config)
        cfg: GSRQConfig = codebooks.config
        cfg.validate_for(shapes["head_dim"], shapes["num_kv_heads"])
        kq, vq = (
            [
                KVQuantizer.from_codebooks(
                    codebooks, layer, kind, device, engine=engine, threads=threads, check_values=check_values
                )
                for layer in range(shapes["num_layers"])
            ]
            for kind in ("keys", "values")
        )
        return cls(
            kq,
            vq,
            sinks=cfg.sinks if sinks is None else sinks,
            window=cfg.window if window is None else window,
            config=cfg,
            fused=fused,
            model_config=model_config,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        model: Any,
        *,
        sinks: int | None = None,
        window: int | None = None,
        engine: str = "auto",
        threads: int | None = None,
        fused: bool | str = "auto",
        check_values: bool | None = None,
    ) -> "GSRQCache":
        """A cache from a codebook file (see docs/format.md) for ``model`` (a transformers model), on its device."""
        from gsrq.codebooks import Codebooks

        cbs = Codebooks.load(path)
        device = None
        try:
            device = next(model.parameters()).device
        except (AttributeError, StopIteration):
            pass
        return cls.from_codebooks(
            cbs, model.config, device, sinks=sinks, window=window, engine=engine, threads=threads, fused=fused,
            check_values=check_values,
        )

    # ------------------------------------------------------------- accounting
    def memory_report(self, include_codebooks: bool = False) -> dict[str, int]:
        """Bytes summed over layers.

        In use: ``codes``, ``norms``, ``exact``, ``codebooks`` (0 unless
        included) and their sum ``total``. ``reserved``: bytes allocated for
        the cached sequences, spare buffer capacity included (plus the
        codebooks when included); ``reserved >= total``.
        """
        out = {"codes": 0, "norms": 0, "exact": 0, "codebooks": 0}
        reserved = 0
        for layer in self.layers:
            rep = layer.memory_report()
            reserved += rep.pop("reserved")
            for k, v in rep.items():
                out[k] += v
            if include_codebooks:
                out["codebooks"] += layer.codebook_bytes()
        out["total"] = sum(out.values())
        out["reserved"] = reserved + out["codebooks"]
        return out

    def memory_bytes(self, include_codebooks: bool = False, reserved: bool = False) -> int:
        """Bytes in use for the cached sequences: packed codes, key norms, exact sink and window tokens.

        ``reserved=True``: the bytes allocated instead, spare capacity of the
        growable buffers included (see :meth:`GSRQLayer.memory_report`).
        Codebooks (16-bit, shared by all sequences) are added with ``include_codebooks``.
        """
        rep = self.memory_report(include_codebooks)
        return rep["reserved"] if reserved else rep["total"]

    def reserved_bytes(self, include_codebooks: bool = False) -> int:
        """Bytes allocated for the cached sequences (``memory_bytes(reserved=True)``)."""
        return self.memory_bytes(include_codebooks, reserved=True)

    def shrink_to_fit(self) -> None:
        """Release every layer's spare buffer capacity (:meth:`GSRQLayer.shrink_to_fit`)."""
        for layer in self.layers:
            layer.shrink_to_fit()

    def codebook_bytes(self) -> int:
        """Bytes of all layers' codebooks in 16-bit floats."""
        return sum(layer.codebook_bytes() for layer in self.layers)

    def num_elements(self) -> int:
        """Key and value elements cached over all layers."""
        return sum(layer.num_elements() for layer in self.layers)

    def bits_per_element(self, include_codebooks: bool = False) -> float:
        """Bits in use (:meth:`memory_bytes`, not the reserved capacity) over cached key/value elements (0.0 while empty)."""
        n = self.num_elements()
        return 8 * self.memory_bytes(include_codebooks) / n if n else 0.0


_HOOK_ATTR = "_gsrq_padding_hook"


def _padding_pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("past_key_values")
    if cache is None:
        cache = kwargs.get("cache")
    mask = kwargs.get("attention_mask")
    if isinstance(cache, GSRQCache) and isinstance(mask, torch.Tensor) and mask.dim() == 2:
        if cache.get_seq_length() == 0:
            cache.set_padding(mask)


def track_padding(model: torch.nn.Module) -> torch.nn.Module:
    """Install (once) a forward pre-hook: a GSRQCache's first forward passes its attention mask to :meth:`GSRQCache.set_padding`.

    ``model.generate`` with a left-padded batch then keeps each row's first
    real tokens as its sinks. Returns ``model``.
    """
    if getattr(model, _HOOK_ATTR, None) is None:
        setattr(model, _HOOK_ATTR, model.register_forward_pre_hook(_padding_pre_hook, with_kwargs=True))
    return model

"""Decode attention over a compressed KV segment.

:class:`CompressedKV` is what a :class:`gsrq.GSRQCache` layer hands to decode
attention: exact sink and window tokens plus packed codes of everything in
between. The fused CUDA kernel and the pure-torch reference both take it.

Key levers are folded into the query so the kernel never sees them:
``score(q, coded token t) = key_norms[t] * <q @ query_map, k_hat_t>`` and the
coded part of the output is ``(sum_t p_t v_hat_t) @ value_map``, where
``k_hat``/``v_hat`` are the plain RQ reconstructions (sum of codewords).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass

import torch


@dataclass
class CompressedKV:
    """One layer's cache for one decode step.

    Shapes: ``B`` batch, ``Hkv`` KV heads, ``hd`` head_dim, ``Ts``/``Tc``/``Tw``
    sink, coded and window token counts, ``H`` codebook heads (1 if shared,
    else Hkv), ``C``/``M``/``Kc``/``D`` chunks, stages, codewords, chunk length.

    sink_keys, sink_values: ``[B, Hkv, Ts, hd]``, model dtype (exact).
    key_codes, value_codes: uint8 ``[B, Hkv, Tc, R]`` packed rows (docs/format.md,
        codes ordered ``c * M + m``).
    key_codebooks, value_codebooks: float ``[H, C, M, Kc, D]``.
    key_bits, value_bits: code width in bits.
    window_keys, window_values: ``[B, Hkv, Tw, hd]`` exact recent tokens.
    key_norms: ``[B, Hkv, Tc]`` float or None — per-token key scale.
    query_map: ``[H, hd, hd]`` or None — applied to the query for coded keys.
    value_map: ``[H, hd, hd]`` or None — applied to the coded value sum.
    valid: bool ``[B, Ts + Tc + Tw]`` or None — False marks padding, in the
        order sinks, coded, window.
    positions: int64 ``[B, Th]`` or None — the sequence position of each of
        the first ``Th`` stored tokens when the cache stores them out of
        sequence order (a left-padded batch keeps each row's first real tokens
        as its sinks and moves the padding behind them); stored token
        ``j >= Th`` is at position ``j``. None: stored in sequence order.
        Attention itself is order-free; this maps a sequence-order mask onto
        the stored order (:func:`gsrq_attention_forward`).

    Codes, key norms and the window may be views into larger buffers (a
    :class:`gsrq.GSRQLayer` hands out ``[:, :, :Tc]`` views of its capacity
    buffers): the fused kernels read any batch/head strides in place as long
    as each code row's ``R`` bytes (each window token's ``hd`` elements) are
    contiguous and rows follow each other along the token axis; other layouts
    are copied by the launcher.
    """

    sink_keys: torch.Tensor
    sink_values: torch.Tensor
    key_codes: torch.Tensor
    value_codes: torch.Tensor
    key_codebooks: torch.Tensor
    value_codebooks: torch.Tensor
    key_bits: int
    value_bits: int
    window_keys: torch.Tensor
    window_values: torch.Tensor
    key_norms: torch.Tensor | None = None
    query_map: torch.Tensor | None = None
    value_map: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    positions: torch.Tensor | None = None

    @property
    def num_coded(self) -> int:
        return int(self.key_codes.shape[2])

    @property
    def num_tokens(self) -> int:
        return int(self.sink_keys.shape[2] + self.key_codes.shape[2] + self.window_keys.shape[2])


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def validate_decode_inputs(q: torch.Tensor, ckv: CompressedKV) -> None:
    """Raise :class:`gsrq.errors.ShapeError` naming the first inconsistent field."""
    from gsrq.errors import ShapeError
    from gsrq.kernels import codebook_layout

    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ShapeError(f"q must be a [batch, q_heads, head_dim] tensor, got {getattr(q, 'shape', type(q))}")
    if q.dtype not in _FLOAT_DTYPES:
        raise ShapeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    B, Hq, hd = q.shape
    sk = ckv.sink_keys
    if sk.dim() != 4:
        raise ShapeError(f"sink_keys must be [B, Hkv, Ts, head_dim], got {tuple(sk.shape)}")
    Hkv = sk.shape[1]
    if Hkv < 1 or Hq % Hkv:
        raise ShapeError(f"q has {Hq} heads, not a multiple of the {Hkv} KV heads of sink_keys")
    Tc = ckv.key_codes.shape[2] if ckv.key_codes.dim() == 4 else -1
    for name in ("sink_keys", "sink_values", "window_keys", "window_values"):
        t = getattr(ckv, name)
        if t.dim() != 4 or t.shape[0] != B or t.shape[1] != Hkv or t.shape[3] != hd:
            raise ShapeError(f"{name} must be [{B}, {Hkv}, T, {hd}], got {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ShapeError(f"{name} must be a float tensor, got {t.dtype}")
        if t.device != q.device:
            raise ShapeError(f"{name} is on {t.device}, q on {q.device}")
    if ckv.sink_values.shape[2] != ckv.sink_keys.shape[2]:
        raise ShapeError("sink_values and sink_keys hold different token counts")
    if ckv.window_values.shape[2] != ckv.window_keys.shape[2]:
        raise ShapeError("window_values and window_keys hold different token counts")
    for kind in ("key", "value"):
        codes = getattr(ckv, f"{kind}_codes")
        books = getattr(ckv, f"{kind}_codebooks")
        bits = getattr(ckv, f"{kind}_bits")
        if codes.dtype != torch.uint8 or codes.dim() != 4:
            raise ShapeError(f"{kind}_codes must be uint8 [B, Hkv, Tc, R], got {codes.dtype} {tuple(codes.shape)}")
        if codes.shape[:3] != (B, Hkv, Tc):
            raise ShapeError(f"{kind}_codes must be [{B}, {Hkv}, {Tc}, R], got {tuple(codes.shape)}")
        if books.dtype not in _FLOAT_DTYPES:
            raise ShapeError(f"{kind}_codebooks must be float [H, C, M, Kc, D], got {books.dtype} {tuple(books.shape)}")
        if bits is None:
            raise ShapeError(f"{kind}_bits must be an int, got None")
        *_, R = codebook_layout(books, Hkv, hd, bits, f"{kind}_codebooks", f"{kind}_bits")
        if codes.shape[3] != R:
            raise ShapeError(f"{kind}_codes rows hold {codes.shape[3]} bytes, C*M*bits needs {R}")
        if codes.device != q.device or books.device != q.device:
            raise ShapeError(f"{kind}_codes / {kind}_codebooks must be on {q.device}")
    if ckv.key_norms is not None:
        kn = ckv.key_norms
        if tuple(kn.shape) != (B, Hkv, Tc) or kn.dtype not in _FLOAT_DTYPES:
            raise ShapeError(f"key_norms must be float [{B}, {Hkv}, {Tc}], got {kn.dtype} {tuple(kn.shape)}")
    for name in ("query_map", "value_map"):
        m = getattr(ckv, name)
        if m is not None and (m.dim() != 3 or m.shape[0] not in (1, Hkv) or tuple(m.shape[1:]) != (hd, hd)):
            raise ShapeError(f"{name} must be [1 or {Hkv}, {hd}, {hd}], got {tuple(m.shape)}")
    if ckv.valid is not None:
        T = ckv.num_tokens
        if ckv.valid.dtype != torch.bool or tuple(ckv.valid.shape) != (B, T):
            raise ShapeError(f"valid must be bool [{B}, {T}], got {ckv.valid.dtype} {tuple(ckv.valid.shape)}")
    if ckv.positions is not None:
        pos = ckv.positions
        if pos.dim() != 2 or pos.shape[0] != B or pos.shape[1] > ckv.num_tokens or pos.dtype != torch.int64:
            raise ShapeError(
                f"positions must be int64 [{B}, Th <= {ckv.num_tokens}], got {pos.dtype} {tuple(pos.shape)}"
            )


# ---------------------------------------------------------------------------
# dispatcher
# ---------------------------------------------------------------------------

# Fast-path limits of the fused kernels (cuda/decode_attention.cu).
MAX_FAST_CODEBOOK = 256
_MAX_GB = 8
_SPLIT_THREADS = 512  # kSplitThreads in cuda/decode_attention.cu
_MERGE_THREADS = 128  # kMergeThreads
_MAX_SPLITS = 64
_MIN_SPLIT_TOKENS = 256
_warned: set[str] = set()
#: How many decode_attention calls took each path (for benchmarks and diagnostics).
CALLS = {"fused": 0, "fallback": 0, "reference": 0}


def _warn_once(reason: str) -> None:
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(
        f"gsrq: fused decode attention not used ({reason}); falling back to dequantize + attention",
        RuntimeWarning,
        stacklevel=3,
    )


@dataclass(frozen=True)
class FusedPlan:
    """Launch geometry of the fused kernels for one call."""

    gb: int  # query heads per split block
    splits: int  # S
    tokens_per_split: int
    split_smem: int  # bytes of dynamic shared memory of the split kernel
    merge_smem: int


def split_shared_bytes(gb: int, cmk_k: int, cmk_v: int) -> int:
    """Dynamic shared memory of gsrq_decode_attention_split: LUT + histogram + scratch."""
    return 4 * (gb * cmk_k + gb * cmk_v + 32 + _MAX_GB)


def merge_shared_bytes(hd: int, exact_tokens: int, splits: int) -> int:
    return 4 * (hd + exact_tokens + splits + 32)


@functools.lru_cache(maxsize=256)
def plan_fused(
    batch: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    exact_tokens: int,
    coded_tokens: int,
    cmk_k: int,
    cmk_v: int,
    smem_limit: int,
    num_sms: int,
) -> FusedPlan | str:
    """Choose GB and the context split; returns a reason string when unsupported."""
    G = q_heads // kv_heads
    gb = None
    for cand in range(min(G, _MAX_GB), 0, -1):
        if G % cand == 0 and split_shared_bytes(cand, cmk_k, cmk_v) <= smem_limit:
            gb = cand
            break
    if gb is None:
        return f"lookup tables need {split_shared_bytes(1, cmk_k, cmk_v)} B of shared memory, the device allows {smem_limit}"
    units = batch * kv_heads * (G // gb)
    if coded_tokens > 0:
        s = -(-2 * num_sms // units)
        s = max(1, min(s, _MAX_SPLITS, -(-coded_tokens // _MIN_SPLIT_TOKENS)))
        tps = -(-coded_tokens // s)
        s = -(-coded_tokens // tps)
    else:
        s, tps = 0, 0
    merge = merge_shared_bytes(head_dim, exact_tokens, s)
    if merge > 48 * 1024:
        return f"{exact_tokens} exact tokens exceed the merge kernel's shared memory"
    return FusedPlan(gb, s, tps, split_shared_bytes(gb, cmk_k, cmk_v), merge)


def fused_unsupported_reason(q: torch.Tensor, ckv: CompressedKV) -> str | None:
    """Why the fused CUDA path cannot serve this call, or None when it can."""
    if not q.is_cuda:
        return "q is not on a CUDA device"
    for kind in ("key", "value"):
        Kc = getattr(ckv, f"{kind}_codebooks").shape[3]
        if Kc > MAX_FAST_CODEBOOK:
            return f"{kind} codebooks have Kc={Kc} > {MAX_FAST_CODEBOOK}"
    if ckv.num_coded >= 2**31 - 1:
        return "more than 2^31 coded tokens"
    if q.dtype not in _MERGE_KERNELS:
        return f"q dtype {q.dtype}"
    from gsrq import kernels
    from gsrq.errors import KernelUnavailableError

    try:
        idx = kernels._device_index(q.device)
        kernels.REGISTRY.get("gsrq_decode_attention_split", idx)
        kernels.REGISTRY.get(_MERGE_KERNELS[q.dtype], idx)
    except KernelUnavailableError as exc:
        return f"kernels unavailable: {exc}"
    return None


def decode_attention(q: torch.Tensor, ckv: CompressedKV, scale: float) -> torch.Tensor:
    """Attention of one new query token per sequence over a compressed cache.

    q: ``[batch, q_heads, head_dim]``, fp16 / bf16 (fp32 accepted); ``q_heads``
    a multiple of the KV heads (GQA). scale: softmax scale (usually
    ``head_dim ** -0.5``). Returns ``[batch, q_heads, head_dim]`` in q's dtype.

    On CUDA the fused kernels run (LUT scoring over packed key codes, per-code
    value accumulation, log-sum-exp merge with the exact tokens); a
    configuration they do not cover falls back to dequantize + attention with a
    one-time RuntimeWarning. On the CPU the pure-torch reference of the same
    algorithm (:func:`gsrq.reference.fused_decode_attention_ref`) runs.
    """
    from gsrq import reference

    validate_decode_inputs(q, ckv)
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        from gsrq.errors import InvalidValueError

        raise InvalidValueError(f"scale must be a finite positive number, got {scale}")
    if not q.is_cuda:
        CALLS["reference"] += 1
        return reference.fused_decode_attention_ref(q, ckv, scale)
    reason = fused_unsupported_reason(q, ckv)
    if reason is None:
        from gsrq.errors import KernelUnavailableError

        try:
            out = _decode_attention_cuda(q, ckv, scale)
        except KernelUnavailableError as exc:
            out = f"kernel launch failed: {exc}"
        if isinstance(out, torch.Tensor):
            CALLS["fused"] += 1
            return out
        reason = out
    _warn_once(reason)
    CALLS["fallback"] += 1
    return reference.decode_attention_dequant(q, ckv, scale)


_MERGE_KERNELS = {
    torch.float32: "gsrq_decode_attention_merge_f32",
    torch.float16: "gsrq_decode_attention_merge_f16",
    torch.bfloat16: "gsrq_decode_attention_merge_bf16",
}
_NORM_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


_LIMITS: dict[int, tuple[int, int]] = {}


def _device_limits(idx: int) -> tuple[int, int]:
    """(opt-in shared memory per block, SM count) of CUDA device ``idx``."""
    lim = _LIMITS.get(idx)
    if lim is None:
        props = torch.cuda.get_device_properties(idx)
        lim = (int(getattr(props, "shared_memory_per_block_optin", 48 * 1024)), int(props.multi_processor_count))
        _LIMITS[idx] = lim
    return lim


def _word_reads(codes: torch.Tensor, bits: int) -> bool:
    """Whether the split kernel may read these packed rows as aligned 32-bit words."""
    return (
        bits == 8
        and codes.shape[3] % 4 == 0
        and codes.data_ptr() % 4 == 0
        and codes.stride(0) % 4 == 0
        and codes.stride(1) % 4 == 0
    )


def _rows_view(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` uint8 ``[B, Hkv, Tc, R]`` as the split kernel reads it: rows of R contiguous bytes, one after
    another along the token axis; batch and head axes may have any stride (a view into a capacity buffer
    ``[B, Hkv, capacity, R]`` passes as is). Other layouts are copied."""
    R = codes.shape[3]
    if codes.stride(3) == 1 and (codes.shape[2] <= 1 or codes.stride(2) == R):
        return codes
    return codes.contiguous()


def _window_view(x: torch.Tensor) -> torch.Tensor:
    """Exact window ``[B, Hkv, Tw, hd]`` as the merge kernel reads it: tokens of ``hd`` contiguous elements one
    after another (batch/head strides free, e.g. a view of a cache's window buffer); others are copied."""
    hd = x.shape[3]
    if x.stride(3) == 1 and (x.shape[2] <= 1 or x.stride(2) == hd):
        return x
    return x.contiguous()


def _norms_view(norms: torch.Tensor) -> torch.Tensor:
    """Key norms ``[B, Hkv, Tc]`` with a unit token stride (batch/head strides free); others are copied."""
    return norms if norms.shape[2] <= 1 or norms.stride(2) == 1 else norms.contiguous()


def _decode_attention_cuda(q: torch.Tensor, ckv: CompressedKV, scale: float) -> torch.Tensor | str:
    """The fused CUDA path; returns a reason string if this call cannot use it."""
    import numpy as np

    from gsrq import kernels, reference

    dev = q.device
    idx = kernels._device_index(dev)
    smem_limit, num_sms = _device_limits(idx)
    B, Hq, hd = q.shape
    Hkv = ckv.sink_keys.shape[1]
    G = Hq // Hkv
    Ts, Tc, Tw = ckv.sink_keys.shape[2], ckv.num_coded, ckv.window_keys.shape[2]
    _, Ck, Mk, Kck, _ = ckv.key_codebooks.shape
    Hv, Cv, Mv, Kcv, Dv = ckv.value_codebooks.shape
    cmk_k, cmk_v = Ck * Mk * Kck, Cv * Mv * Kcv
    plan = plan_fused(B, Hq, Hkv, hd, Ts + Tw, Tc, cmk_k, cmk_v, smem_limit, num_sms)
    if isinstance(plan, str):
        return plan
    S = plan.splits
    valid = ckv.valid.contiguous() if ckv.valid is not None else None
    T = Ts + Tc + Tw
    f32 = torch.float32
    if S > 0:
        lut = reference.decode_lut(q, ckv, scale).contiguous()
        # views into a cache's capacity buffers are read in place (batch/head strides passed below)
        kcodes = _rows_view(ckv.key_codes)
        vcodes = _rows_view(ckv.value_codes)
        norms = _norms_view(ckv.key_norms) if ckv.key_norms is not None else None
        m_part = torch.empty(B, Hq, S, dtype=f32, device=dev)
        l_part = torch.empty(B, Hq, S, dtype=f32, device=dev)
        hist = torch.empty(B, Hq, S, cmk_v, dtype=f32, device=dev)
        kernels.REGISTRY.launch(
            "gsrq_decode_attention_split",
            idx,
            (S, Hkv * (G // plan.gb), B),
            (_SPLIT_THREADS,),
            plan.split_smem,
            lut.data_ptr(),
            kcodes.data_ptr(),
            vcodes.data_ptr(),
            norms.data_ptr() if norms is not None else 0,
            np.int32(_NORM_KIND[norms.dtype] if norms is not None else 0),
            valid.data_ptr() if valid is not None else 0,
            np.int32(Ts),
            np.int32(T),
            m_part.data_ptr(),
            l_part.data_ptr(),
            hist.data_ptr(),
            np.int32(Tc),
            np.int32(plan.tokens_per_split),
            np.int32(S),
            np.int32(Hkv),
            np.int32(G),
            np.int32(plan.gb),
            np.int32(Ck * Mk),
            np.int32(Kck),
            np.int32(ckv.key_bits),
            np.int32(kcodes.shape[3]),
            np.int32(_word_reads(kcodes, ckv.key_bits)),
            np.int32(Cv * Mv),
            np.int32(Kcv),
            np.int32(ckv.value_bits),
            np.int32(vcodes.shape[3]),
            np.int32(_word_reads(vcodes, ckv.value_bits)),
            np.int64(kcodes.stride(0)),
            np.int64(kcodes.stride(1)),
            np.int64(vcodes.stride(0)),
            np.int64(vcodes.stride(1)),
            np.int64(norms.stride(0) if norms is not None else 0),
            np.int64(norms.stride(1) if norms is not None else 0),
        )
    else:
        m_part = l_part = hist = None
    dt = q.dtype
    qc = q.contiguous()
    sk, sv = ckv.sink_keys.to(dt).contiguous(), ckv.sink_values.to(dt).contiguous()
    wk, wv = _window_view(ckv.window_keys.to(dt)), _window_view(ckv.window_values.to(dt))
    out_exact = torch.empty(B, Hq, hd, dtype=f32, device=dev)
    hist_out = torch.empty(B, Hq, cmk_v, dtype=f32, device=dev)
    kernels.REGISTRY.launch(
        _MERGE_KERNELS[dt],
        idx,
        (Hq, B),
        (_MERGE_THREADS,),
        plan.merge_smem,
        qc.data_ptr(),
        sk.data_ptr(),
        sv.data_ptr(),
        wk.data_ptr(),
        wv.data_ptr(),
        valid.data_ptr() if valid is not None else 0,
        np.int32(T),
        m_part.data_ptr() if m_part is not None else 0,
        l_part.data_ptr() if l_part is not None else 0,
        hist.data_ptr() if hist is not None else 0,
        out_exact.data_ptr(),
        hist_out.data_ptr(),
        np.float32(scale),
        np.int32(Ts),
        np.int32(Tc),
        np.int32(Tw),
        np.int32(S),
        np.int32(Hkv),
        np.int32(G),
        np.int32(hd),
        np.int32(cmk_v),
        np.int64(wk.stride(0)),
        np.int64(wk.stride(1)),
        np.int64(wv.stride(0)),
        np.int64(wv.stride(1)),
    )
    out = out_exact
    if S > 0:
        coded = reference._hist_dot_books(hist_out.view(B, Hq, Cv, Mv, Kcv), ckv.value_codebooks.float())
        if ckv.value_map is not None:
            coded = reference._apply_map(coded, ckv.value_map.float())
        out = out + coded
    return out.to(dt)


# ---------------------------------------------------------------------------
# transformers hook
# ---------------------------------------------------------------------------

#: Attribute under which a cache attaches the :class:`CompressedKV` of a decode
#: step to the key tensor it returns from ``update``.
COMPRESSED_ATTR = "_gsrq_compressed"


def attach_compressed(key: torch.Tensor, ckv: CompressedKV) -> torch.Tensor:
    """Mark ``key`` (returned by a cache's ``update``) as standing for ``ckv``; returns ``key``.

    :func:`gsrq_attention_forward` then attends over ``ckv`` with the fused
    kernels instead of over ``key``/``value``, so a cache can hand the model a
    placeholder instead of a dense reconstruction on decode steps.
    """
    setattr(key, COMPRESSED_ATTR, ckv)
    return key


#: Attribute set on a key placeholder once :func:`gsrq_attention_forward` consumed its view.
CONSUMED_ATTR = "_gsrq_consumed"


def _valid_from_mask(mask: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
    """bool ``[B, T]`` from a transformers mask ``[B, 1, q_len, kv_len]`` (bool: True attends; float: 0 attends)."""
    if mask is None:
        return None
    row = mask[:, 0, -1, :num_tokens]
    return row if row.dtype == torch.bool else row == 0


def stored_order_valid(valid: torch.Tensor | None, ckv: CompressedKV) -> torch.Tensor | None:
    """A sequence-order mask ``[B, T]`` (or None) as the bool mask ``[B, T]`` of ``ckv``'s stored order.

    Combines it with ``ckv.valid`` (already in stored order). No host sync.
    """
    if valid is not None:
        valid = valid.to(device=ckv.sink_keys.device, dtype=torch.bool)
        if valid.shape[0] != ckv.sink_keys.shape[0]:
            valid = valid.expand(ckv.sink_keys.shape[0], -1)
        if ckv.positions is not None and ckv.positions.shape[1] > 0:
            head = valid.gather(1, ckv.positions)
            valid = torch.cat([head, valid[:, head.shape[1] :]], dim=1)
        if ckv.valid is not None:
            valid = valid & ckv.valid
        return valid.contiguous()
    return ckv.valid


def gsrq_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (``attn_implementation="gsrq"``).

    query ``[B, Hq, q_len, hd]``. When ``q_len == 1`` and ``key`` carries a
    :class:`CompressedKV` (:func:`attach_compressed`), returns
    :func:`decode_attention` over it as ``[B, 1, Hq, hd]`` (the model's mask,
    in sequence order, becomes the view's ``valid`` in stored order);
    otherwise (prefill, or a cache that attached nothing) it is transformers'
    SDPA attention.
    """
    ckv = getattr(key, COMPRESSED_ATTR, None)
    if ckv is None or query.shape[2] != 1:
        if ckv is not None:
            from gsrq.errors import ShapeError

            raise ShapeError(f"a compressed view serves one query token, got {query.shape[2]}")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    setattr(key, CONSUMED_ATTR, True)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    valid = stored_order_valid(_valid_from_mask(attention_mask, ckv.num_tokens), ckv)
    if valid is not ckv.valid:
        ckv = dataclasses.replace(ckv, valid=valid)
    out = decode_attention(query[:, :, 0], ckv, scale)
    return out.unsqueeze(1), None


def is_gsrq_attention(name: object) -> bool:
    """Whether transformers' attention registry maps ``name`` to :func:`gsrq_attention_forward`."""
    if not isinstance(name, str):
        return False
    try:
        from transformers import AttentionInterface

        return AttentionInterface._global_mapping.get(name) is gsrq_attention_forward
    except (ImportError, AttributeError):
        return False


def register_transformers_attention(name: str = "gsrq") -> str:
    """Register :func:`gsrq_attention_forward` in transformers' attention registry; returns ``name``.

    Also registers SDPA's mask builder under ``name`` (models build their masks
    through ``ALL_MASK_ATTENTION_FUNCTIONS[attn_implementation]``). After this,
    ``from_pretrained(..., attn_implementation=name)``,
    ``model.set_attn_implementation(name)`` and ``LlamaConfig(attn_implementation=name)``
    all work.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(name, gsrq_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # older 5.x: masks are built per implementation elsewhere
        return name
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def enable_fused_attention(model: torch.nn.Module, name: str = "gsrq") -> torch.nn.Module:
    """Let ``model`` attend through GSRQ's fused decode attention; returns ``model``.

    Registers ``name`` (:func:`register_transformers_attention`), switches the
    model to it (``model.set_attn_implementation(name)``, or its config's
    ``_attn_implementation``), and installs :func:`gsrq.cache.track_padding`,
    so a :class:`gsrq.GSRQCache` learns a left-padded prompt's padding from
    the attention mask of its first forward call. With a GSRQCache whose
    ``fused`` is ``"auto"`` (the default) or True, decode steps then run
    :func:`decode_attention` over the packed codes (fused CUDA kernels on a
    GPU, the torch reference on the CPU); prefill, and every call without a
    GSRQCache, is SDPA attention.
    """
    from gsrq.cache import track_padding

    register_transformers_attention(name)
    setter = getattr(model, "set_attn_implementation", None)
    try:
        if not callable(setter):
            raise AttributeError("set_attn_implementation")
        setter(name)
    except (AttributeError, TypeError, ValueError):  # older 5.x: the config attribute is what attention reads
        model.config._attn_implementation = name
    track_padding(model)
    return model

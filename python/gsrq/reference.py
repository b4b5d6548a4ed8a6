"""Pure-torch reference implementations: the oracle of every kernel.

These functions mirror the CUDA kernels and the Rust encoder one to one and are
written for clarity, not speed. Shapes use: ``T`` tokens, ``C`` chunk
positions per head vector, ``M`` residual stages, ``Kc`` codewords, ``D``
chunk length, ``b`` code bits.
"""

from __future__ import annotations

import torch


def unpack_codes_torch(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack the little-endian bitstream of docs/format.md.

    packed: uint8, shape ``[..., nbytes]``; returns int64 codes ``[..., count]``.
    Code ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``; stream bit ``j``
    is bit ``j % 8`` of byte ``j // 8``.
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    lead = packed.shape[:-1]
    bit_idx = torch.arange(count * bits, device=packed.device)
    byte = packed.long()[..., bit_idx // 8]
    stream = (byte >> (bit_idx % 8)) & 1
    stream = stream.reshape(*lead, count, bits)
    weights = (1 << torch.arange(bits, device=packed.device)).long()
    return (stream * weights).sum(-1)


def pack_codes_torch(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_codes_torch`: int codes ``[..., n]`` -> uint8 ``[..., ceil(n*bits/8)]``."""
    lead = codes.shape[:-1]
    n = codes.shape[-1]
    nbytes = (n * bits + 7) // 8
    shifts = torch.arange(bits, device=codes.device)
    stream = ((codes.long().unsqueeze(-1) >> shifts) & 1).reshape(*lead, n * bits)
    pad = nbytes * 8 - n * bits
    if pad:
        stream = torch.cat([stream, stream.new_zeros(*lead, pad)], dim=-1)
    stream = stream.reshape(*lead, nbytes, 8)
    return (stream << torch.arange(8, device=codes.device)).sum(-1).to(torch.uint8)


def rq_decode_torch(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Sum of the chosen codewords.

    codes: integer ``[..., C, M]``; codebooks: float ``[C, M, Kc, D]``.
    Returns ``[..., C * D]`` in the codebooks' dtype.
    """
    C, M, Kc, D = codebooks.shape
    if codes.shape[-2:] != (C, M):
        raise ValueError(f"codes end in {tuple(codes.shape[-2:])}, codebooks need ({C}, {M})")
    c_idx = torch.arange(C, device=codes.device).view(C, 1)
    m_idx = torch.arange(M, device=codes.device).view(1, M)
    words = codebooks[c_idx, m_idx, codes.long()]  # [..., C, M, D]
    return words.sum(-2).reshape(*codes.shape[:-2], C * D)


def rq_encode_torch(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Greedy residual encoding: x ``[..., C * D]`` -> int64 codes ``[..., C, M]``.

    Ties go to the lowest code index (torch.argmin's rule, also the Rust and
    CUDA encoders' rule). Distances are computed in float32.
    """
    C, M, Kc, D = codebooks.shape
    r = x.float().reshape(*x.shape[:-1], C, D)
    cb = codebooks.float()
    out = []
    for m in range(M):
        # ||r - c||^2 = ||r||^2 - 2 r.c + ||c||^2 ; ||r||^2 does not change the argmin
        dots = torch.einsum("...cd,ckd->...ck", r, cb[:, m])
        dist = (cb[:, m] ** 2).sum(-1) - 2 * dots
        code = dist.argmin(-1)
        out.append(code)
        r = r - cb[torch.arange(C, device=x.device), m, code]
    return torch.stack(out, dim=-1)


# --------------------------------------------------------------------------
# Decode attention over a CompressedKV (gsrq.attention.CompressedKV)
# --------------------------------------------------------------------------
#
# Shapes: ``B`` batch, ``Hq`` query heads, ``Hkv`` KV heads, ``G = Hq / Hkv``
# (GQA group), ``hd`` head_dim, ``Ts``/``Tc``/``Tw`` sink, coded and window
# tokens, codebooks ``[H, C, M, Kc, D]`` with ``H`` 1 (shared) or ``Hkv``.


def _head_index(num_q_heads: int, num_kv_heads: int, h_books: int, device: torch.device) -> torch.Tensor:
    """For each query head, the index of its codebook / lever head (0 when shared)."""
    group = num_q_heads // num_kv_heads
    kv = torch.arange(num_q_heads, device=device) // group
    return kv if h_books > 1 else torch.zeros_like(kv)


def _q_dot_books(qc: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """``<q chunk, codeword>`` for every codeword: qc ``[B, Hq, C, D]``, books
    ``[H, C, M, Kc, D]`` (H = 1 shared, else one per KV head) -> ``[B, Hq, C, M, Kc]``."""
    B, Hq, C, D = qc.shape
    H = books.shape[0]
    if H == 1:
        return torch.einsum("bhcd,cmkd->bhcmk", qc, books[0])
    G = Hq // H
    out = torch.einsum("bgqcd,gcmkd->bgqcmk", qc.reshape(B, H, G, C, D), books)
    return out.reshape(B, Hq, *out.shape[3:])


def _hist_dot_books(hist: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """``sum_{m,k} hist[b,h,c,m,k] * books[h_b, c, m, k, :]``: ``[B, Hq, C, M, Kc]`` -> ``[B, Hq, C*D]``."""
    B, Hq = hist.shape[:2]
    H, C, M, Kc, D = books.shape
    if H == 1:
        out = torch.einsum("bhcmk,cmkd->bhcd", hist, books[0])
    else:
        G = Hq // H
        out = torch.einsum("bgqcmk,gcmkd->bgqcd", hist.reshape(B, H, G, C, M, Kc), books)
    return out.reshape(B, Hq, C * D)


def _apply_map(x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Row vectors times per-head matrices: x ``[B, Hq, hd]``, maps ``[H, hd, hd]`` -> ``x @ maps[h_b]``."""
    B, Hq, hd = x.shape
    H = maps.shape[0]
    if H == 1:
        return x @ maps[0]
    G = Hq // H
    return torch.einsum("bgqi,gij->bgqj", x.reshape(B, H, G, hd), maps).reshape(B, Hq, hd)


def _unpack_rows(codes: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 ``[B, Hkv, Tc, R]`` -> int64 ``[B, Hkv, Tc, count]`` (empty-safe)."""
    if codes.shape[2] == 0:
        return torch.zeros(*codes.shape[:3], count, dtype=torch.long, device=codes.device)
    return unpack_codes_torch(codes, bits, count)


def dequantize_compressed(ckv) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruct the coded keys and values of a CompressedKV, levers applied.

    Returns float32 ``(keys, values)``, each ``[B, Hkv, Tc, hd]``, such that
    plain attention over them gives exactly the scores and outputs of
    CompressedKV's definition: ``key = key_norm * (k_hat @ query_map^T)`` (so
    ``<q, key> = key_norm * <q @ query_map, k_hat>``) and
    ``value = v_hat @ value_map``.
    """
    out = []
    for codes, books, bits in (
        (ckv.key_codes, ckv.key_codebooks, ckv.key_bits),
        (ckv.value_codes, ckv.value_codebooks, ckv.value_bits),
    ):
        H, C, M, Kc, D = books.shape
        B, Hkv, Tc, _ = codes.shape
        idx = _unpack_rows(codes, bits, C * M).view(B, Hkv, Tc, C, M)
        books = books.float()
        if H == 1:
            rec = rq_decode_torch(idx, books[0])
        else:
            rec = torch.stack([rq_decode_torch(idx[:, h], books[h]) for h in range(Hkv)], dim=1)
        out.append(rec)
    keys, values = out
    hd = keys.shape[-1]
    if ckv.query_map is not None:
        qm = ckv.query_map.float()
        qm = qm.expand(keys.shape[1], hd, hd) if qm.shape[0] == 1 else qm
        keys = torch.einsum("bgtj,gij->bgti", keys, qm)
    if ckv.key_norms is not None:
        keys = keys * ckv.key_norms.float().unsqueeze(-1)
    if ckv.value_map is not None:
        vm = ckv.value_map.float()
        vm = vm.expand(values.shape[1], hd, hd) if vm.shape[0] == 1 else vm
        values = torch.einsum("bgti,gij->bgtj", values, vm)
    return keys, values


def decode_attention_dequant(q: torch.Tensor, ckv, scale: float) -> torch.Tensor:
    """Dequantize-then-attend: the plain definition of decode attention.

    q: ``[B, Hq, hd]`` (fp16 / bf16 / fp32). Keys and values are the exact sink
    tokens, the reconstructed coded tokens (:func:`dequantize_compressed`) and
    the exact window tokens, in that order; ``ckv.valid`` (bool ``[B, T]``)
    masks padding. Softmax in float32. Returns ``[B, Hq, hd]`` in q's dtype; a
    row without any valid token is zero.
    """
    B, Hq, hd = q.shape
    Hkv = ckv.sink_keys.shape[1]
    G = Hq // Hkv
    kc, vc = dequantize_compressed(ckv)
    keys = torch.cat([ckv.sink_keys.float(), kc, ckv.window_keys.float()], dim=2)  # [B, Hkv, T, hd]
    values = torch.cat([ckv.sink_values.float(), vc, ckv.window_values.float()], dim=2)
    keys = keys.repeat_interleave(G, dim=1)
    values = values.repeat_interleave(G, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", q.float(), keys) * scale
    if ckv.valid is not None:
        scores = scores.masked_fill(~ckv.valid.bool()[:, None, :], float("-inf"))
    mx = scores.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    p = torch.exp(scores - mx)
    denom = p.sum(-1, keepdim=True)
    p = torch.where(denom > 0, p / denom.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(p))
    return torch.einsum("bht,bhtd->bhd", p, values).to(q.dtype)


def decode_lut(q: torch.Tensor, ckv, scale: float) -> torch.Tensor:
    """Key lookup tables of fused decode attention.

    Returns float32 ``[B, Hq, C * M * Kc]`` with
    ``lut[b, h, (c*M + m)*Kc + k] = scale * <q'[b, h, c*D:(c+1)*D], CBk[h_b, c, m, k]>``,
    ``q' = q @ query_map[h_b]`` (or q), ``h_b`` the codebook head of query head h.
    """
    B, Hq, hd = q.shape
    Hkv = ckv.sink_keys.shape[1]
    books = ckv.key_codebooks.float()
    H, C, M, Kc, D = books.shape
    qf = q.float()
    if ckv.query_map is not None:
        qf = _apply_map(qf, ckv.query_map.float())
    lut = _q_dot_books(qf.view(B, Hq, C, D), books)
    return (lut * scale).reshape(B, Hq, C * M * Kc)


def fused_decode_attention_ref(
    q: torch.Tensor, ckv, scale: float, split_tokens: int | None = None
) -> torch.Tensor:
    """Decode attention computed the way the fused CUDA kernels compute it.

    q: ``[B, Hq, hd]``; returns ``[B, Hq, hd]`` in q's dtype.

    1. LUT (:func:`decode_lut`); coded score ``s_t = key_norm[t] * sum_i lut[i*Kc + code_i(t)]``.
    2. The coded tokens are cut into splits of ``split_tokens`` (default: one
       split). Per split: ``m = max s_t``, ``p_t = exp(s_t - m)``, ``l = sum p_t``
       and the value-code histogram ``hist[j*Kcv + vcode_j(t)] += p_t``.
    3. Merge with the exact sink/window tokens by log-sum-exp:
       ``Mx = max(exact scores, m_s)``, ``w_s = exp(m_s - Mx)``,
       ``L = sum_e exp(s_e - Mx) + sum_s w_s l_s``;
       ``out = sum_e exp(s_e - Mx) v_e / L + ((sum_s w_s hist_s / L) . CBv) @ value_map``.
    Masked (padding) tokens get no weight; a row with no valid token is zero.
    """
    B, Hq, hd = q.shape
    Hkv = ckv.sink_keys.shape[1]
    G = Hq // Hkv
    Ts, Tc, Tw = ckv.sink_keys.shape[2], ckv.key_codes.shape[2], ckv.window_keys.shape[2]
    dev = q.device
    neg_inf = float("-inf")
    kb = ckv.key_codebooks
    vb = ckv.value_codebooks.float()
    _, Ck, Mk, Kck, _ = kb.shape
    Hv, Cv, Mv, Kcv, Dv = vb.shape
    heads_kv = torch.arange(Hq, device=dev) // G

    valid = ckv.valid.bool() if ckv.valid is not None else torch.ones(B, Ts + Tc + Tw, dtype=torch.bool, device=dev)
    v_sink, v_coded, v_win = valid[:, :Ts], valid[:, Ts : Ts + Tc], valid[:, Ts + Tc :]

    # exact tokens
    ek = torch.cat([ckv.sink_keys, ckv.window_keys], dim=2).float()[:, heads_kv]  # [B, Hq, Te, hd]
    ev = torch.cat([ckv.sink_values, ckv.window_values], dim=2).float()[:, heads_kv]
    es = torch.einsum("bhd,bhtd->bht", q.float(), ek) * scale
    es = es.masked_fill(~torch.cat([v_sink, v_win], dim=1)[:, None, :], neg_inf)

    # coded tokens: scores from the LUT
    lut = decode_lut(q, ckv, scale)  # [B, Hq, CMk*Kck]
    kcodes = _unpack_rows(ckv.key_codes, ckv.key_bits, Ck * Mk)[:, heads_kv]  # [B, Hq, Tc, CMk]
    offs = torch.arange(Ck * Mk, device=dev) * Kck
    gathered = torch.gather(lut, 2, (kcodes + offs).reshape(B, Hq, Tc * Ck * Mk))
    cs = gathered.view(B, Hq, Tc, Ck * Mk).sum(-1)
    if ckv.key_norms is not None:
        cs = cs * ckv.key_norms.float()[:, heads_kv]
    cs = cs.masked_fill(~v_coded[:, None, :], neg_inf)
    vcodes = _unpack_rows(ckv.value_codes, ckv.value_bits, Cv * Mv)[:, heads_kv]  # [B, Hq, Tc, CMv]
    voffs = torch.arange(Cv * Mv, device=dev) * Kcv

    L_tok = Tc if not split_tokens else int(split_tokens)
    ms, ls, hists = [], [], []
    for t0 in range(0, Tc, max(L_tok, 1)):
        s = cs[:, :, t0 : t0 + L_tok]
        m = s.amax(-1)  # [B, Hq]
        p = torch.where(torch.isfinite(s), torch.exp(s - torch.where(torch.isfinite(m), m, 0.0)[..., None]), 0.0)
        hist = torch.zeros(B, Hq, Cv * Mv * Kcv, device=dev)
        idx = (vcodes[:, :, t0 : t0 + L_tok] + voffs).reshape(B, Hq, -1)
        hist.scatter_add_(2, idx, p.unsqueeze(-1).expand(*p.shape, Cv * Mv).reshape(B, Hq, -1))
        ms.append(m)
        ls.append(p.sum(-1))
        hists.append(hist)

    m_all = torch.stack(ms, -1) if ms else torch.full((B, Hq, 0), neg_inf, device=dev)  # [B, Hq, S]
    mx = torch.maximum(es.amax(-1) if Ts + Tw else torch.full((B, Hq), neg_inf, device=dev),
                       m_all.amax(-1) if ms else torch.full((B, Hq), neg_inf, device=dev))
    mx_safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    pe = torch.where(torch.isfinite(es), torch.exp(es - mx_safe[..., None]), 0.0)
    ws = torch.where(torch.isfinite(m_all), torch.exp(m_all - mx_safe[..., None]), 0.0)
    denom = pe.sum(-1)
    if ms:
        denom = denom + (ws * torch.stack(ls, -1)).sum(-1)
    inv = torch.where(denom > 0, 1.0 / denom.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(denom))
    out = torch.einsum("bht,bhtd->bhd", pe, ev) * inv[..., None]
    if ms:
        hist = (torch.stack(hists, 2) * ws[..., None]).sum(2) * inv[..., None]  # [B, Hq, CMKv]
        coded = _hist_dot_books(hist.view(B, Hq, Cv, Mv, Kcv), vb)
        if ckv.value_map is not None:
            coded = _apply_map(coded, ckv.value_map.float())
        out = out + coded
    return out.to(q.dtype)


def random_compressed_kv(
    batch: int,
    kv_heads: int,
    head_dim: int,
    *,
    sinks: int,
    coded: int,
    window: int,
    key_cfg: tuple[int, int, int],
    value_cfg: tuple[int, int, int],
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    per_head: bool = False,
    key_norms: bool = False,
    maps: bool = False,
    padding: int = 0,
    seed: int = 0,
):
    """A random but well-formed :class:`gsrq.attention.CompressedKV` (tests, benchmarks).

    key_cfg / value_cfg: ``(D, Kc, M)``. Codes are uniform in ``[0, Kc)`` and
    packed with the documented layout; codebooks are float32 normals scaled so
    a reconstruction has roughly unit variance per channel. ``padding`` marks
    the first ``padding`` positions of batch row ``b`` (for odd ``b``) as
    padding in ``valid`` (left padding), which then is not None.
    """
    from gsrq.attention import CompressedKV

    gen = torch.Generator(device="cpu").manual_seed(seed)
    dev = torch.device(device)

    def normal(*shape, std=1.0, dt=torch.float32):
        return (torch.randn(*shape, generator=gen) * std).to(dt).to(dev)

    parts = {}
    for kind, (D, Kc, M) in (("key", key_cfg), ("value", value_cfg)):
        C = head_dim // D
        bits = max(1, (Kc - 1).bit_length())
        H = kv_heads if per_head else 1
        parts[f"{kind}_codebooks"] = normal(H, C, M, Kc, D, std=M**-0.5)
        n = C * M
        if Kc == 1 << bits and (n * bits) % 8 == 0:
            rows = torch.randint(0, 256, (batch, kv_heads, coded, n * bits // 8), generator=gen, dtype=torch.int32)
            packed = rows.to(torch.uint8)
        else:
            codes = torch.randint(0, Kc, (batch, kv_heads, coded, n), generator=gen)
            packed = pack_codes_torch(codes, bits) if coded else torch.zeros(
                batch, kv_heads, 0, (n * bits + 7) // 8, dtype=torch.uint8
            )
        parts[f"{kind}_codes"] = packed.to(dev)
        parts[f"{kind}_bits"] = bits
    H = kv_heads if per_head else 1
    T = sinks + coded + window
    valid = None
    if padding:
        valid = torch.ones(batch, T, dtype=torch.bool)
        valid[1::2, : min(padding, T)] = False
        valid = valid.to(dev)
    eye = torch.eye(head_dim)
    return CompressedKV(
        sink_keys=normal(batch, kv_heads, sinks, head_dim, dt=dtype),
        sink_values=normal(batch, kv_heads, sinks, head_dim, dt=dtype),
        window_keys=normal(batch, kv_heads, window, head_dim, dt=dtype),
        window_values=normal(batch, kv_heads, window, head_dim, dt=dtype),
        key_norms=(torch.rand(batch, kv_heads, coded, generator=gen) * 1.5 + 0.25).to(dev) if key_norms else None,
        query_map=(eye + normal(H, head_dim, head_dim, std=0.1).cpu()).to(dev) if maps else None,
        value_map=(eye + normal(H, head_dim, head_dim, std=0.1).cpu()).to(dev) if maps else None,
        valid=valid,
        **parts,
    )

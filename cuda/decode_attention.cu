// Fused decode attention over packed RQ codes (one new query token per sequence).
//
// The host (python/gsrq/attention.py) runs three steps per layer:
//
// 1. LUT (torch, one batched GEMM): lut[b, qh, c, m, k] = scale * <q'_chunk(c), CBk[h, c, m, k]>,
//    q' = q @ query_map (or q), float32 [B, Hq, Ck*Mk*Kck].
// 2. gsrq_decode_attention_split: grid (S, Hkv * G/GB, B), 512 threads. Block
//    (split s, KV head g, q-head slice) owns coded tokens [s*L, min((s+1)*L, Tc))
//    and GB query heads of g's GQA group. It copies their LUT rows into shared
//    memory, then
//      pass 1: score_t = key_norm[t] * sum_i lut[i*Kck + code_i(t)] (i = c*M + m),
//              max over the split -> m;
//      pass 2: recomputes each score (key codes are re-read, mostly from L2),
//              p_t = exp(score_t - m), l = sum p_t, and adds p_t to the value-code
//              histogram hist[j*Kcv + vcode_j(t)] (shared memory, atomicAdd).
//    The value side never reconstructs a vector per token: sum_t p_t v_hat_t =
//    sum_{j, k} hist[j, k] * CBv[j, k] is formed once at the end. Two passes
//    instead of an online rescale keep the histogram exact (rescaling
//    C*M*Kc bins on every new maximum would cost more than re-reading the codes).
//    Writes m [B, Hq, S], l [B, Hq, S], hist [B, Hq, S, Cv*Mv*Kcv].
//    Code rows and key norms may be views into larger buffers (a cache's
//    capacity buffers [B, Hkv, capacity, R]): row (b, g, t) of key codes starts at
//    kcodes + b * k_stride_b + g * k_stride_h + t * Rk (byte strides), likewise
//    vcodes; its norm is key_norms[b * n_stride_b + g * n_stride_h + t] (element strides).
// 3. gsrq_decode_attention_merge_{f16,bf16,f32}: grid (Hq, B), 128 threads.
//    Scores the exact sink and window tokens, then merges them with the S
//    split partials by log-sum-exp:
//      Mx = max(exact scores, m_s), w_s = exp(m_s - Mx), L = sum_e exp(s_e - Mx) + sum_s w_s l_s
//      out_exact = sum_e exp(s_e - Mx) v_e / L          float32 [B, Hq, hd]
//      hist_out  = sum_s w_s hist_s / L                 float32 [B, Hq, Cv*Mv*Kcv]
//    The host finishes with out = out_exact + (hist_out . CBv) @ value_map (a GEMM).
//
// The exact window (win_k / win_v) may likewise be a view [:, :, w0:w1] of a larger
// buffer: token (b, g, e) starts at win + b * w*_stride_b + g * w*_stride_h + e * hd.
//
// Masks: valid (uint8 [B, Ts+Tc+Tw], 0 = padding, order sinks, coded, window) or
// null. A split or row without any valid token contributes nothing; a row with no
// valid token at all returns zeros.
#include <cfloat>

#include "gsrq/common.cuh"

namespace {

constexpr int kSplitThreads = 512;
constexpr int kMergeThreads = 128;
constexpr int kMaxGB = 8;

// Reduce one value over the block; every thread gets the result. scratch: >= 32 floats.
template <bool kMax>
__device__ float block_reduce(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = kMax ? gsrq::warp_max(v) : gsrq::warp_sum(v);
    __syncthreads();  // scratch free
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = lane < nwarps ? scratch[lane] : (kMax ? -INFINITY : 0.f);
    r = kMax ? gsrq::warp_max(r) : gsrq::warp_sum(r);
    return r;
}

// Calls f(i, code_i) for the `count` codes of a packed row. With `words` set
// (host-checked: 8-bit codes, row length and base address multiples of 4) the
// row is read as 32-bit words, four codes per load; otherwise code by code.
template <typename F>
__device__ __forceinline__ void for_each_code(const uint8_t* __restrict__ row, int count, int bits, int row_bytes,
                                              bool words, F&& f) {
    if (words) {
        const uint32_t* w = reinterpret_cast<const uint32_t*>(row);
        const int nw = (count + 3) >> 2;
        for (int j = 0; j < nw; ++j) {
            const uint32_t v = __ldg(w + j);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int i = 4 * j + k;
                if (i < count) f(i, (v >> (8 * k)) & 0xffu);
            }
        }
    } else {
        for (int i = 0; i < count; ++i) f(i, gsrq::load_code(row, i, bits, row_bytes));
    }
}

// Score of coded token t for GB query heads, from the shared LUT.
__device__ __forceinline__ void coded_scores(const uint8_t* __restrict__ krow, const float* __restrict__ lut_s,
                                             int CMk, int Kck, int bits_k, int Rk, bool words_k, int GB, float norm,
                                             float (&s)[kMaxGB]) {
    const int lut_stride = CMk * Kck;
#pragma unroll
    for (int gq = 0; gq < kMaxGB; ++gq) s[gq] = 0.f;
    for_each_code(krow, CMk, bits_k, Rk, words_k, [&](int i, uint32_t code) {
        // min(): a code >= Kc (never written by the encoder) must not index past the table
        const int base = i * Kck + min(static_cast<int>(code), Kck - 1);
#pragma unroll
        for (int gq = 0; gq < kMaxGB; ++gq)
            if (gq < GB) s[gq] += lut_s[gq * lut_stride + base];
    });
#pragma unroll
    for (int gq = 0; gq < kMaxGB; ++gq) s[gq] *= norm;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kSplitThreads) gsrq_decode_attention_split(
    const float* __restrict__ lut, const uint8_t* __restrict__ kcodes, const uint8_t* __restrict__ vcodes,
    const void* __restrict__ key_norms, int norm_kind, const uint8_t* __restrict__ valid, int valid_offset,
    int valid_len, float* __restrict__ m_out, float* __restrict__ l_out, float* __restrict__ hist_out, int Tc,
    int tokens_per_split, int S, int Hkv, int G, int GB, int CMk, int Kck, int bits_k, int Rk, int words_k, int CMv,
    int Kcv, int bits_v, int Rv, int words_v, long long k_stride_b, long long k_stride_h, long long v_stride_b,
    long long v_stride_h, long long n_stride_b, long long n_stride_h) {
    extern __shared__ __align__(16) float smem[];
    const int CMKk = CMk * Kck;
    const int CMKv = CMv * Kcv;
    float* lut_s = smem;                  // [GB][CMKk]
    float* hist_s = lut_s + GB * CMKk;    // [GB][CMKv]
    float* red = hist_s + GB * CMKv;      // [32]
    float* mrow = red + 32;               // [kMaxGB]

    const int s_idx = blockIdx.x;
    const int slices = G / GB;
    const int g = blockIdx.y / slices;
    const int qh0 = g * G + (blockIdx.y - g * slices) * GB;
    const int b = blockIdx.z;
    const int Hq = Hkv * G;
    const int tid = threadIdx.x;
    const int t0 = s_idx * tokens_per_split;
    const int t1 = min(Tc, t0 + tokens_per_split);
    const uint8_t* kbase = kcodes + b * k_stride_b + g * k_stride_h;
    const uint8_t* vbase = vcodes + b * v_stride_b + g * v_stride_h;
    const long long nbase = b * n_stride_b + g * n_stride_h;

    const float* lut_src = lut + (static_cast<long long>(b) * Hq + qh0) * CMKk;
    for (int i = tid; i < GB * CMKk; i += blockDim.x) lut_s[i] = lut_src[i];
    for (int i = tid; i < GB * CMKv; i += blockDim.x) hist_s[i] = 0.f;
    __syncthreads();

    // pass 1: maxima
    float mx[kMaxGB];
#pragma unroll
    for (int gq = 0; gq < kMaxGB; ++gq) mx[gq] = -INFINITY;
    for (int t = t0 + tid; t < t1; t += blockDim.x) {
        if (valid != nullptr && !valid[static_cast<long long>(b) * valid_len + valid_offset + t]) continue;
        const float norm = key_norms != nullptr ? gsrq::load_as_float(key_norms, nbase + t, norm_kind) : 1.f;
        float sc[kMaxGB];
        coded_scores(kbase + static_cast<long long>(t) * Rk, lut_s, CMk, Kck, bits_k, Rk, words_k != 0, GB, norm, sc);
#pragma unroll
        for (int gq = 0; gq < kMaxGB; ++gq) mx[gq] = fmaxf(mx[gq], sc[gq]);
    }
#pragma unroll
    for (int gq = 0; gq < kMaxGB; ++gq) {
        if (gq < GB) {  // GB is uniform over the block: every thread reaches the barriers
            const float r = block_reduce<true>(mx[gq], red);
            if (tid == 0) mrow[gq] = r;
        }
    }
    __syncthreads();
#pragma unroll
    for (int gq = 0; gq < kMaxGB; ++gq) mx[gq] = gq < GB ? mrow[gq] : 0.f;

    // pass 2: exp, sums and value-code histograms
    float ls[kMaxGB];
#pragma unroll
    for (int gq = 0; gq < kMaxGB; ++gq) ls[gq] = 0.f;
    for (int t = t0 + tid; t < t1; t += blockDim.x) {
        if (valid != nullptr && !valid[static_cast<long long>(b) * valid_len + valid_offset + t]) continue;
        const float norm = key_norms != nullptr ? gsrq::load_as_float(key_norms, nbase + t, norm_kind) : 1.f;
        float p[kMaxGB];
        coded_scores(kbase + static_cast<long long>(t) * Rk, lut_s, CMk, Kck, bits_k, Rk, words_k != 0, GB, norm, p);
#pragma unroll
        for (int gq = 0; gq < kMaxGB; ++gq) {
            p[gq] = gq < GB ? expf(p[gq] - mx[gq]) : 0.f;
            ls[gq] += p[gq];
        }
        const uint8_t* vrow = vbase + static_cast<long long>(t) * Rv;
        for_each_code(vrow, CMv, bits_v, Rv, words_v != 0, [&](int j, uint32_t code) {
            const int base = j * Kcv + min(static_cast<int>(code), Kcv - 1);
#pragma unroll
            for (int gq = 0; gq < kMaxGB; ++gq)
                if (gq < GB) atomicAdd(hist_s + gq * CMKv + base, p[gq]);
        });
    }
#pragma unroll
    for (int gq = 0; gq < kMaxGB; ++gq) {
        if (gq < GB) {
            const float r = block_reduce<false>(ls[gq], red);
            if (tid == 0) {
                const long long o = (static_cast<long long>(b) * Hq + qh0 + gq) * S + s_idx;
                m_out[o] = mrow[gq];
                l_out[o] = r;
            }
        }
    }
    __syncthreads();
    for (int i = tid; i < GB * CMKv; i += blockDim.x) {
        const int gq = i / CMKv;
        const int k = i - gq * CMKv;
        hist_out[((static_cast<long long>(b) * Hq + qh0 + gq) * S + s_idx) * CMKv + k] = hist_s[i];
    }
}

namespace {

template <typename T>
__device__ void decode_merge(const T* __restrict__ q, const T* __restrict__ sink_k, const T* __restrict__ sink_v,
                             const T* __restrict__ win_k, const T* __restrict__ win_v,
                             const uint8_t* __restrict__ valid, int valid_len, const float* __restrict__ m_part,
                             const float* __restrict__ l_part, const float* __restrict__ hist,
                             float* __restrict__ out_exact, float* __restrict__ hist_out, float scale, int Ts, int Tc,
                             int Tw, int S, int Hkv, int G, int hd, int CMKv, long long wk_stride_b,
                             long long wk_stride_h, long long wv_stride_b, long long wv_stride_h) {
    extern __shared__ __align__(16) float smem[];
    const int Te = Ts + Tw;
    float* qs = smem;         // [hd]
    float* pe = qs + hd;      // [Te] exact scores, then weights
    float* ws = pe + Te;      // [S] split weights
    float* red = ws + S;      // [32]

    const int qh = blockIdx.x;
    const int b = blockIdx.y;
    const int Hq = Hkv * G;
    const int g = qh / G;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int nwarps = blockDim.x >> 5;
    const long long bh = static_cast<long long>(b) * Hq + qh;
    const long long bg = static_cast<long long>(b) * Hkv + g;
    // window tokens may be a view into a larger buffer: element strides of its batch and head axes
    const T* wk_base = win_k + b * wk_stride_b + g * wk_stride_h;
    const T* wv_base = win_v + b * wv_stride_b + g * wv_stride_h;

    for (int d = tid; d < hd; d += blockDim.x) qs[d] = gsrq::to_float<T>(q[bh * hd + d]);
    __syncthreads();

    for (int e = warp; e < Te; e += nwarps) {
        const bool sink = e < Ts;
        const T* k = sink ? sink_k + (bg * Ts + e) * hd : wk_base + static_cast<long long>(e - Ts) * hd;
        const int vi = sink ? e : Ts + Tc + (e - Ts);
        float dot = 0.f;
        for (int d = lane; d < hd; d += 32) dot = fmaf(qs[d], gsrq::to_float<T>(k[d]), dot);
        dot = gsrq::warp_sum(dot);
        if (lane == 0) {
            const bool ok = valid == nullptr || valid[static_cast<long long>(b) * valid_len + vi];
            pe[e] = ok ? dot * scale : -INFINITY;
        }
    }
    __syncthreads();

    float mx = -INFINITY;
    for (int e = tid; e < Te; e += blockDim.x) mx = fmaxf(mx, pe[e]);
    for (int s = tid; s < S; s += blockDim.x) mx = fmaxf(mx, m_part[bh * S + s]);
    mx = block_reduce<true>(mx, red);

    float lsum = 0.f;
    for (int e = tid; e < Te; e += blockDim.x) {
        const float v = pe[e];
        const float p = v == -INFINITY ? 0.f : expf(v - mx);
        pe[e] = p;
        lsum += p;
    }
    for (int s = tid; s < S; s += blockDim.x) {
        const float m = m_part[bh * S + s];
        const float w = m == -INFINITY ? 0.f : expf(m - mx);
        ws[s] = w;
        lsum += w * l_part[bh * S + s];
    }
    lsum = block_reduce<false>(lsum, red);  // contains __syncthreads: pe / ws visible
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;

    for (int d = tid; d < hd; d += blockDim.x) {
        float acc = 0.f;
        for (int e = 0; e < Te; ++e) {
            const bool sink = e < Ts;
            const T* v = sink ? sink_v + (bg * Ts + e) * hd : wv_base + static_cast<long long>(e - Ts) * hd;
            acc = fmaf(pe[e], gsrq::to_float<T>(v[d]), acc);
        }
        out_exact[bh * hd + d] = acc * inv;
    }
    for (int i = tid; i < CMKv; i += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < S; ++s) acc = fmaf(ws[s], hist[(bh * S + s) * CMKv + i], acc);
        hist_out[bh * CMKv + i] = acc * inv;
    }
}

}  // namespace

#define GSRQ_MERGE(NAME, T)                                                                                      \
    extern "C" __global__ void __launch_bounds__(kMergeThreads) NAME(                                           \
        const T* __restrict__ q, const T* __restrict__ sink_k, const T* __restrict__ sink_v,                     \
        const T* __restrict__ win_k, const T* __restrict__ win_v, const uint8_t* __restrict__ valid,             \
        int valid_len, const float* __restrict__ m_part, const float* __restrict__ l_part,                       \
        const float* __restrict__ hist, float* __restrict__ out_exact, float* __restrict__ hist_out, float scale, \
        int Ts, int Tc, int Tw, int S, int Hkv, int G, int hd, int CMKv, long long wk_stride_b,                   \
        long long wk_stride_h, long long wv_stride_b, long long wv_stride_h) {                                   \
        decode_merge<T>(q, sink_k, sink_v, win_k, win_v, valid, valid_len, m_part, l_part, hist, out_exact,     \
                        hist_out, scale, Ts, Tc, Tw, S, Hkv, G, hd, CMKv, wk_stride_b, wk_stride_h, wv_stride_b, \
                        wv_stride_h);                                                                            \
    }

GSRQ_MERGE(gsrq_decode_attention_merge_f32, float)
GSRQ_MERGE(gsrq_decode_attention_merge_f16, __half)
GSRQ_MERGE(gsrq_decode_attention_merge_bf16, __nv_bfloat16)

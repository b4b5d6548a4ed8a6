// gsrq_rq_encode_{f32,f16,bf16}: greedy residual quantization of one layer's
// keys or values, all stages fused, written straight into packed rows.
//
// x:        [N, Hkv, head_dim] (f32 / f16 / bf16), contiguous
// cb:       float32 [H, C, M, Kc, D], contiguous (H = 1: shared by all KV heads)
// cb_norms: float32 [H, C, M, Kc], ||codeword||^2 (computed by the host as
//           (cb ** 2).sum(-1), the reference's expression)
// out:      uint8 [N, Hkv, R], R = ceil(C*M*bits/8); codes ordered c*M + m
//
// Block: 256 threads (8 warps) for TOK = 8*tpw tokens of one KV head; grid
// (ceil(N / TOK), Hkv). For each chunk c the block keeps the TOK residuals in
// shared memory; for each stage m the stage's codebook streams through shared
// memory in tiles of 32 codewords (row stride D+1: conflict-free), lane l of a
// warp scores codeword k0+l against the warp's tokens:
//     dist = ||c_k||^2 - 2 <r, c_k>   (fp32, same expression as rq_encode_torch)
// and keeps the strictly smaller distance, so within a lane the lowest index
// wins ties; the warp reduction then prefers (smaller dist, then lower index),
// which is torch.argmin's and the Rust encoder's rule. The chosen codeword is
// subtracted (fp32, exact same operation as the reference) before the next
// stage. Codes go to shared memory and each packed byte is assembled by one
// thread at the end: no two threads write the same byte, no atomics.
//
// Dynamic shared memory: TOK*D*4 + 32*(D+1)*4 + TOK*C*M*2 bytes (host checks
// it fits in 48 KiB, choosing tpw in {4, 2, 1}).
//
// gsrq_rq_encode_rows_{f32,f16,bf16}: the same encoding for few rows (a decode
// step's new tokens), where the tiled kernel would leave the GPU idle and wait
// on its barriers: one 256-thread block per (token, KV head); thread t scores
// codewords t, t+256, ... reading them from global memory (L2-resident), the
// block reduces (distance, index) with the same tie rule. Identical arithmetic
// (sequential fmaf over d), so both kernels return identical codes.
// Dynamic shared memory: D*4 + C*M*2 bytes (+ static reduction scratch).
#include <cfloat>

#include "gsrq/common.cuh"

namespace {

constexpr int kWarps = 8;
constexpr int kTile = 32;
constexpr int kMaxTpw = 4;

template <typename T>
__device__ void rq_encode(const T* __restrict__ x, const float* __restrict__ cb, const float* __restrict__ cb_norms,
                          uint8_t* __restrict__ out, long long N, int Hkv, int H, int C, int M, int Kc, int D,
                          int bits, int R, int tpw) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int TOK = kWarps * tpw;
    const int CM = C * M;
    const int head_dim = C * D;
    float* res = reinterpret_cast<float*>(smem);               // [TOK][D]
    float* tile = res + TOK * D;                                // [kTile][D+1]
    uint16_t* codes = reinterpret_cast<uint16_t*>(tile + kTile * (D + 1));  // [TOK][CM]

    const int h = blockIdx.y;
    const int hb = H == 1 ? 0 : h;
    const long long n0 = static_cast<long long>(blockIdx.x) * TOK;
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;

    for (int c = 0; c < C; ++c) {
        __syncthreads();  // previous chunk's residual reads are done
        for (int idx = tid; idx < TOK * D; idx += blockDim.x) {
            const int tok = idx / D;
            const int d = idx - tok * D;
            const long long n = n0 + tok;
            res[idx] = n < N ? gsrq::to_float<T>(x[(n * Hkv + h) * head_dim + c * D + d]) : 0.f;
        }
        for (int m = 0; m < M; ++m) {
            const long long book = (static_cast<long long>(hb) * C + c) * M + m;
            const float* cbm = cb + book * Kc * D;
            const float* nm = cb_norms + book * Kc;
            float best_d[kMaxTpw];
            int best_i[kMaxTpw];
#pragma unroll
            for (int j = 0; j < kMaxTpw; ++j) {
                best_d[j] = FLT_MAX;
                best_i[j] = 0;
            }
            for (int k0 = 0; k0 < Kc; k0 += kTile) {
                __syncthreads();  // tile (and residual updates) ready for reuse
                for (int idx = tid; idx < kTile * D; idx += blockDim.x) {
                    const int kk = idx / D;
                    const int d = idx - kk * D;
                    tile[kk * (D + 1) + d] = (k0 + kk < Kc) ? cbm[static_cast<long long>(k0 + kk) * D + d] : 0.f;
                }
                __syncthreads();
                const int k = k0 + lane;
                if (k < Kc) {
                    const float norm = nm[k];
                    const float* w = tile + lane * (D + 1);
#pragma unroll
                    for (int j = 0; j < kMaxTpw; ++j) {
                        if (j < tpw) {
                            const float* r = res + (warp * tpw + j) * D;
                            float dot = 0.f;
                            for (int d = 0; d < D; ++d) dot = fmaf(r[d], w[d], dot);
                            const float dist = norm - 2.f * dot;
                            // strict '<': the lowest index of this lane wins ties;
                            // the lane's first codeword always initialises its best
                            if (k0 == 0 || dist < best_d[j]) {
                                best_d[j] = dist;
                                best_i[j] = k;
                            }
                        }
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < kMaxTpw; ++j) {
                if (j < tpw) {
                    float bd = best_d[j];
                    int bi = lane < Kc ? best_i[j] : 0x7fffffff;
                    if (lane >= Kc) bd = FLT_MAX;
#pragma unroll
                    for (int o = 16; o > 0; o >>= 1) {
                        const float od = __shfl_xor_sync(0xffffffffu, bd, o);
                        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
                        if (od < bd || (od == bd && oi < bi)) {
                            bd = od;
                            bi = oi;
                        }
                    }
                    const int tok = warp * tpw + j;
                    if (lane == 0) codes[tok * CM + c * M + m] = static_cast<uint16_t>(bi);
                    const float* word = cbm + static_cast<long long>(bi) * D;
                    float* r = res + tok * D;
                    for (int d = lane; d < D; d += 32) r[d] = r[d] - word[d];
                }
            }
            __syncwarp();
        }
    }
    __syncthreads();
    for (int idx = tid; idx < TOK * R; idx += blockDim.x) {
        const int tok = idx / R;
        const int j = idx - tok * R;
        const long long n = n0 + tok;
        if (n < N) out[(n * Hkv + h) * R + j] = gsrq::assemble_byte(codes + tok * CM, CM, bits, j);
    }
}

}  // namespace

#define GSRQ_ENCODE(NAME, T)                                                                                     \
    extern "C" __global__ void __launch_bounds__(256) NAME(                                                     \
        const T* __restrict__ x, const float* __restrict__ cb, const float* __restrict__ cb_norms,               \
        uint8_t* __restrict__ out, long long N, int Hkv, int H, int C, int M, int Kc, int D, int bits, int R,     \
        int tpw) {                                                                                               \
        rq_encode<T>(x, cb, cb_norms, out, N, Hkv, H, C, M, Kc, D, bits, R, tpw);                                \
    }

namespace {

constexpr int kRowThreads = 256;

template <typename T>
__device__ void rq_encode_rows(const T* __restrict__ x, const float* __restrict__ cb,
                               const float* __restrict__ cb_norms, uint8_t* __restrict__ out, long long N, int Hkv,
                               int H, int C, int M, int Kc, int D, int bits, int R) {
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ float red_d[kRowThreads / 32];
    __shared__ int red_i[kRowThreads / 32];
    float* res = reinterpret_cast<float*>(smem);                // [D]
    uint16_t* codes = reinterpret_cast<uint16_t*>(res + D);      // [C*M]
    const long long n = blockIdx.x;
    const int h = blockIdx.y;
    const int hb = H == 1 ? 0 : h;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int head_dim = C * D;
    if (n >= N) return;

    for (int c = 0; c < C; ++c) {
        __syncthreads();
        for (int d = tid; d < D; d += blockDim.x) res[d] = gsrq::to_float<T>(x[(n * Hkv + h) * head_dim + c * D + d]);
        __syncthreads();
        for (int m = 0; m < M; ++m) {
            const long long book = (static_cast<long long>(hb) * C + c) * M + m;
            const float* cbm = cb + book * Kc * D;
            const float* nm = cb_norms + book * Kc;
            float bd = FLT_MAX;
            int bi = 0x7fffffff;
            for (int k = tid; k < Kc; k += blockDim.x) {
                const float* w = cbm + static_cast<long long>(k) * D;
                float dot = 0.f;
                for (int d = 0; d < D; ++d) dot = fmaf(res[d], __ldg(w + d), dot);
                const float dist = nm[k] - 2.f * dot;
                if (bi == 0x7fffffff || dist < bd) {  // first codeword of this thread, or strictly nearer
                    bd = dist;
                    bi = k;
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                const float od = __shfl_xor_sync(0xffffffffu, bd, o);
                const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
                if (od < bd || (od == bd && oi < bi)) {
                    bd = od;
                    bi = oi;
                }
            }
            if (lane == 0) {
                red_d[warp] = bd;
                red_i[warp] = bi;
            }
            __syncthreads();
            if (warp == 0) {
                const int nw = blockDim.x >> 5;
                bd = lane < nw ? red_d[lane] : FLT_MAX;
                bi = lane < nw ? red_i[lane] : 0x7fffffff;
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) {
                    const float od = __shfl_xor_sync(0xffffffffu, bd, o);
                    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
                    if (od < bd || (od == bd && oi < bi)) {
                        bd = od;
                        bi = oi;
                    }
                }
                if (lane == 0) {
                    red_i[0] = bi;
                    codes[c * M + m] = static_cast<uint16_t>(bi);
                }
            }
            __syncthreads();
            const int win = red_i[0];
            const float* word = cbm + static_cast<long long>(win) * D;
            for (int d = tid; d < D; d += blockDim.x) res[d] = res[d] - word[d];
            __syncthreads();
        }
    }
    for (int j = tid; j < R; j += blockDim.x)
        out[(n * Hkv + h) * R + j] = gsrq::assemble_byte(codes, C * M, bits, j);
}

}  // namespace

#define GSRQ_ENCODE_ROWS(NAME, T)                                                                                \
    extern "C" __global__ void __launch_bounds__(kRowThreads) NAME(                                             \
        const T* __restrict__ x, const float* __restrict__ cb, const float* __restrict__ cb_norms,               \
        uint8_t* __restrict__ out, long long N, int Hkv, int H, int C, int M, int Kc, int D, int bits, int R) {  \
        rq_encode_rows<T>(x, cb, cb_norms, out, N, Hkv, H, C, M, Kc, D, bits, R);                                \
    }

GSRQ_ENCODE_ROWS(gsrq_rq_encode_rows_f32, float)
GSRQ_ENCODE_ROWS(gsrq_rq_encode_rows_f16, __half)
GSRQ_ENCODE_ROWS(gsrq_rq_encode_rows_bf16, __nv_bfloat16)

GSRQ_ENCODE(gsrq_rq_encode_f32, float)
GSRQ_ENCODE(gsrq_rq_encode_f16, __half)
GSRQ_ENCODE(gsrq_rq_encode_bf16, __nv_bfloat16)

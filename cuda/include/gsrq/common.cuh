// Shared device helpers of the gsrq kernels.
//
// Packed code layout (docs/format.md): code i of a row occupies stream bits
// [i*bits, (i+1)*bits); stream bit j is bit (j % 8) of byte (j / 8); a row is
// padded with zero bits to a whole number of bytes. 1 <= bits <= 16, so one
// code touches at most three bytes.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace gsrq {

// Code `i` of a packed row of `row_bytes` bytes. Bytes past the row are never
// read (they are taken as zero, which only happens for the padding bits).
__device__ __forceinline__ uint32_t load_code(const uint8_t* __restrict__ row, int i, int bits, int row_bytes) {
    const int bit = i * bits;
    const int byte = bit >> 3;
    const int shift = bit & 7;
    uint32_t v = __ldg(row + byte);
    if (byte + 1 < row_bytes) v |= static_cast<uint32_t>(__ldg(row + byte + 1)) << 8;
    if (byte + 2 < row_bytes) v |= static_cast<uint32_t>(__ldg(row + byte + 2)) << 16;
    return (v >> shift) & ((1u << bits) - 1u);
}

// Byte `j` of the packed row whose codes are codes[0..count) (bits each).
// Used by writers that assemble whole bytes, so no two threads ever write the
// same byte.
__device__ __forceinline__ uint8_t assemble_byte(const uint16_t* codes, int count, int bits, int j) {
    uint32_t out = 0;
    const int first_bit = j * 8;
    int i = first_bit / bits;
    for (; i < count; ++i) {
        const int start = i * bits;  // stream bit where code i begins
        if (start >= first_bit + 8) break;
        const uint32_t code = codes[i];
        // place code bits [0, bits) at stream position start, clip to this byte
        const int rel = start - first_bit;  // may be negative
        uint32_t part = rel >= 0 ? (code << rel) : (code >> (-rel));
        out |= part;
    }
    return static_cast<uint8_t>(out & 0xffu);
}

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Scalar kind flags passed by the host for tensors whose dtype varies at run time.
enum ScalarKind : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

__device__ __forceinline__ float load_as_float(const void* p, int64_t i, int kind) {
    if (kind == kF16) return __half2float(static_cast<const __half*>(p)[i]);
    if (kind == kBF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    return static_cast<const float*>(p)[i];
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

}  // namespace gsrq

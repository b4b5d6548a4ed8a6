// gsrq_unpack_codes: packed uint8 rows -> uint16 codes (docs/format.md layout).
//
// packed: uint8 [rows, row_bytes]; out: uint16 [rows, count].
// One thread per output code, grid-stride loop; row_bytes >= ceil(count*bits/8)
// is checked by the host.
#include "gsrq/common.cuh"

extern "C" __global__ void gsrq_unpack_codes(const uint8_t* __restrict__ packed, uint16_t* __restrict__ out,
                                             long long rows, int row_bytes, int count, int bits) {
    const long long total = rows * static_cast<long long>(count);
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const long long r = idx / count;
        const int i = static_cast<int>(idx - r * count);
        out[idx] = static_cast<uint16_t>(gsrq::load_code(packed + r * row_bytes, i, bits, row_bytes));
    }
}

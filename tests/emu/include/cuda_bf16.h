// CPU stand-in for <cuda_bf16.h> used by the kernel emulation tests (tests/emu).
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
    uint16_t x;
};

inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = static_cast<uint32_t>(h.x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even (inputs here are finite)
    __nv_bfloat16 h;
    h.x = static_cast<uint16_t>(u >> 16);
    return h;
}

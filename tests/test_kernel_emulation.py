"""The CUDA kernels' own source, run on the CPU under a small emulation of the CUDA execution model.

``tests/emu/include`` provides a CPU runtime (one std::thread per CUDA thread,
barriers for ``__syncthreads``, per-warp buffers for shuffles, std::atomic_ref
for atomics) and stand-ins for the fp16/bf16 headers. Each ``cuda/*.cu`` is
compiled unchanged by g++ (only ``extern __shared__`` is rewritten to an
ordinary ``extern`` array) and its kernels are called with a parameter array
built exactly like cuda.core builds it. The launchers of ``gsrq.kernels`` and
``gsrq.attention`` run unmodified, with only the final launch redirected, so
this checks the kernels' indexing, synchronisation, reductions, packing and
the host code's argument lists against the torch references — on machines
without a GPU. (It says nothing about speed or about the real compiler.)
"""

from __future__ import annotations

import ctypes
import math
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gsrq import attention, kernels
from gsrq.reference import (
    fused_decode_attention_ref,
    pack_codes_torch,
    random_compressed_kv,
    rq_encode_torch,
    unpack_codes_torch,
)

ROOT = Path(__file__).resolve().parent.parent
SMEM_TYPE = {"decode_attention": "float", "encode": "unsigned char", "unpack": None}

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")


def test_every_cu_source_is_emulated():
    """A new cuda/*.cu cannot slip past the emulation: SMEM_TYPE must name every source."""
    assert set(SMEM_TYPE) == {p.stem for p in (ROOT / "cuda").glob("*.cu")}


def _kernel_names(src: str) -> list[str]:
    names = re.findall(r'extern "C" __global__ void(?: __launch_bounds__\([^)]*\))? (gsrq_\w+)\(', src)
    names += re.findall(r"^GSRQ_\w+\((gsrq_\w+),", src, flags=re.M)
    return names


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """ctypes handles of emu_<kernel>(gx, gy, gz, block, smem, params) for every kernel."""
    out = tmp_path_factory.mktemp("emu")
    libs = {}
    for stem, smem_type in SMEM_TYPE.items():
        src = (ROOT / "cuda" / f"{stem}.cu").read_text()
        names = _kernel_names(src)
        assert names, stem
        patched = out / f"{stem}.patched.cu"
        patched.write_text(src.replace("extern __shared__", "extern"))
        lines = ['#include "emu_runtime.h"']
        if smem_type:
            lines += [
                f"alignas(16) {smem_type} smem[kEmuSmem / sizeof({smem_type})];",
                f"namespace {{ alignas(16) {smem_type} smem[kEmuSmem / sizeof({smem_type})]; }}",
            ]
        lines += [f'#include "{patched}"'] + [f"GSRQ_EMU_EXPORT({n})" for n in names]
        wrapper = out / f"{stem}.emu.cpp"
        wrapper.write_text("\n".join(lines) + "\n")
        so = out / f"{stem}.so"
        cmd = [
            "g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w",
            f"-I{ROOT / 'tests' / 'emu' / 'include'}", f"-I{ROOT / 'cuda' / 'include'}", str(wrapper), "-o", str(so),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]
        lib = ctypes.CDLL(str(so))
        for n in names:
            fn = getattr(lib, f"emu_{n}")
            fn.argtypes = [ctypes.c_uint] * 5 + [ctypes.POINTER(ctypes.c_void_p)]
            fn.restype = None
            libs[n] = fn
    return libs


def _ctype(value):
    if isinstance(value, np.int32):
        return ctypes.c_int32(int(value))
    if isinstance(value, np.int64):
        return ctypes.c_int64(int(value))
    if isinstance(value, np.float32):
        return ctypes.c_float(float(value))
    if isinstance(value, int):  # a device pointer (here: a CPU tensor's data_ptr)
        return ctypes.c_void_p(value)
    raise TypeError(f"kernel argument of type {type(value).__name__}")


@pytest.fixture
def on_emulator(emu, monkeypatch):
    """gsrq.kernels / gsrq.attention with launches running on the emulator and CPU tensors accepted."""
    calls = []

    def launch(name, device_index, grid, block, shmem, *args):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        vals = [_ctype(a) for a in args]
        params = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
        emu[name](grid[0], grid[1], grid[2], block[0], int(shmem), params)
        calls.append(name)

    def check(name, t, dtype=None):
        if dtype is not None and t.dtype != dtype:
            raise kernels.ShapeError(f"{name} must be {dtype}, got {t.dtype}")

    monkeypatch.setattr(kernels.REGISTRY, "launch", launch)
    monkeypatch.setattr(kernels, "_check_cuda_tensor", check)
    monkeypatch.setattr(kernels, "_device_index", lambda device: 0)
    props = SimpleNamespace(shared_memory_per_block_optin=227 * 1024, multi_processor_count=3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda idx: props)
    monkeypatch.setattr(attention, "_LIMITS", {})
    return calls


@pytest.mark.parametrize("bits, count", [(1, 13), (4, 9), (8, 16), (10, 7), (13, 5), (16, 3)])
def test_unpack_kernel(on_emulator, bits, count):
    codes = torch.randint(0, 1 << bits, (70, count), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes_torch(codes, bits)
    got = kernels.unpack_codes_cuda(packed, bits, count)
    assert on_emulator == ["gsrq_unpack_codes"]
    assert torch.equal(got.to(torch.int64), codes)


ENCODE_CASES = [
    # N, Hkv, hd, D, Kc, M, per_head, dtype
    (6, 2, 64, 16, 256, 2, False, torch.float32),
    (5, 3, 64, 32, 200, 2, True, torch.float16),
    (9, 1, 32, 8, 16, 3, False, torch.bfloat16),
    (5, 2, 64, 16, 1000, 1, False, torch.float32),  # 10-bit codes across bytes
    (3, 1, 128, 64, 256, 8, False, torch.float16),  # the 1-bit preset
]


@pytest.mark.parametrize("variant", ["tiled", "rows"])
@pytest.mark.parametrize("case", ENCODE_CASES, ids=[f"enc{i}" for i in range(len(ENCODE_CASES))])
def test_encode_kernels(on_emulator, case, variant):
    N, Hkv, hd, D, Kc, M, per_head, dtype = case
    C = hd // D
    H = Hkv if per_head else 1
    g = torch.Generator().manual_seed(N + Kc)
    books = torch.randn(H, C, M, Kc, D, generator=g) * (0.7 ** torch.arange(M)).view(1, 1, M, 1, 1)
    x = torch.randn(N, Hkv, hd, generator=g).to(dtype)
    packed = kernels.rq_encode_cuda(x, books, variant=variant)
    assert on_emulator == [f"gsrq_rq_encode_{'rows_' if variant == 'rows' else ''}{dict(zip([torch.float32, torch.float16, torch.bfloat16], ['f32', 'f16', 'bf16']))[dtype]}"]
    bits = max(1, (Kc - 1).bit_length())
    ref = torch.stack([rq_encode_torch(x[:, h].float(), books[h if per_head else 0]) for h in range(Hkv)], dim=1)
    # exact fma on the CPU vs torch's einsum: identical codes except on float32 near-ties (none at these sizes)
    assert torch.equal(unpack_codes_torch(packed, bits, C * M).view(N, Hkv, C, M), ref)
    assert torch.equal(packed, pack_codes_torch(ref.reshape(N, Hkv, C * M), bits))


DECODE_CASES = [
    # B, Hkv, G, hd, Ts, Tc, Tw, key cfg, value cfg, extras
    (1, 2, 4, 128, 4, 700, 3, (64, 256, 8), (64, 256, 8), {"dtype": torch.float16}),
    (1, 1, 3, 64, 0, 300, 5, (16, 256, 2), (32, 200, 3), {"dtype": torch.bfloat16, "key_norms": True, "padding": 40}),
    (2, 2, 2, 64, 2, 90, 0, (8, 16, 2), (64, 256, 3), {"dtype": torch.float32, "maps": True, "per_head": True}),
    (1, 2, 1, 64, 3, 0, 4, (16, 256, 2), (16, 256, 2), {"dtype": torch.float16, "padding": 2}),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=[f"dec{i}" for i in range(len(DECODE_CASES))])
def test_decode_attention_kernels(on_emulator, case):
    B, Hkv, G, hd, Ts, Tc, Tw, kcfg, vcfg, extra = case
    extra = dict(extra)
    dtype = extra.pop("dtype")
    ckv = random_compressed_kv(B, Hkv, hd, sinks=Ts, coded=Tc, window=Tw, key_cfg=kcfg, value_cfg=vcfg, dtype=dtype,
                               seed=Tc, **extra)
    q = (torch.randn(B, Hkv * G, hd, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    scale = 1 / math.sqrt(hd)
    out = attention._decode_attention_cuda(q, ckv, scale)
    assert isinstance(out, torch.Tensor), out
    want_calls = ["gsrq_decode_attention_split"] if Tc else []
    want_calls.append(f"gsrq_decode_attention_merge_{ {torch.float16: 'f16', torch.bfloat16: 'bf16', torch.float32: 'f32'}[dtype] }".replace(" ", ""))
    assert on_emulator == want_calls
    ref = fused_decode_attention_ref(q.float(), ckv, scale)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5}[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    # the float32 result before the cast is tight
    out32 = attention._decode_attention_cuda(q.float(), ckv, scale)
    torch.testing.assert_close(out32, ref, atol=2e-5, rtol=1e-4)


def _in_buffer(t: torch.Tensor, capacity: int, seed: int) -> torch.Tensor:
    """``t`` ``[B, Hkv, T, ...]`` as the view ``[:, :, :T]`` of a garbage-filled buffer of ``capacity`` tokens."""
    shape = list(t.shape)
    shape[2] = capacity
    g = torch.Generator().manual_seed(seed)
    if t.dtype == torch.uint8:
        buf = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    else:
        buf = torch.full(shape, float("nan"), dtype=t.dtype)  # any read past the view poisons the result
    buf[:, :, : t.shape[2]] = t
    view = buf[:, :, : t.shape[2]]
    assert not view.is_contiguous() or t.shape[0] * t.shape[1] == 1
    return view


STRIDED_CASES = [
    # B, Hkv, G, hd, Ts, Tc, Tw, key cfg, value cfg, extras
    (2, 2, 2, 64, 2, 300, 3, (64, 256, 8), (64, 256, 8), {"dtype": torch.float16}),  # 32-bit word reads
    (2, 1, 3, 64, 0, 150, 2, (16, 256, 2), (32, 200, 3), {"dtype": torch.float32, "key_norms": True, "padding": 9}),
]


@pytest.mark.parametrize("case", STRIDED_CASES, ids=[f"strided{i}" for i in range(len(STRIDED_CASES))])
def test_decode_attention_on_buffer_views(on_emulator, monkeypatch, case):
    """Codes, key norms and the exact window handed over as views into larger buffers are read in place (no copy)."""
    B, Hkv, G, hd, Ts, Tc, Tw, kcfg, vcfg, extra = case
    extra = dict(extra)
    dtype = extra.pop("dtype")
    dense = random_compressed_kv(B, Hkv, hd, sinks=Ts, coded=Tc, window=Tw, key_cfg=kcfg, value_cfg=vcfg,
                                 dtype=dtype, seed=Tc + 1, **extra)
    cap = Tc + 37
    fields = {f.name: getattr(dense, f.name) for f in attention.dataclasses.fields(dense)}
    fields["key_codes"] = _in_buffer(dense.key_codes, cap, 1)
    fields["value_codes"] = _in_buffer(dense.value_codes, cap, 2)
    if dense.key_norms is not None:
        fields["key_norms"] = _in_buffer(dense.key_norms, cap, 3)
    fields["window_keys"] = _in_buffer(dense.window_keys, Tw + 5, 4)
    fields["window_values"] = _in_buffer(dense.window_values, Tw + 5, 5)
    strided = attention.CompressedKV(**fields)

    passed = []
    real_rows, real_norms = attention._rows_view, attention._norms_view

    def rows(t):
        out = real_rows(t)
        passed.append(out.data_ptr() == t.data_ptr() and out.stride() == t.stride())
        return out

    def norms(t):
        out = real_norms(t)
        passed.append(out.data_ptr() == t.data_ptr() and out.stride() == t.stride())
        return out

    real_window = attention._window_view

    def window(t):
        out = real_window(t)
        passed.append(out.data_ptr() == t.data_ptr() and out.stride() == t.stride())
        return out

    monkeypatch.setattr(attention, "_rows_view", rows)
    monkeypatch.setattr(attention, "_norms_view", norms)
    monkeypatch.setattr(attention, "_window_view", window)
    q = (torch.randn(B, Hkv * G, hd, generator=torch.Generator().manual_seed(2)) * 2).to(dtype)
    scale = 1 / math.sqrt(hd)
    out = attention._decode_attention_cuda(q, strided, scale)
    assert isinstance(out, torch.Tensor), out
    assert passed == [True] * (5 if dense.key_norms is not None else 4)  # the views went to the kernels as they are
    ref = fused_decode_attention_ref(q.float(), dense, scale)
    tol = {torch.float16: 2e-3, torch.float32: 2e-5}[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    if kcfg[1] == 256 and (hd // kcfg[0]) * kcfg[2] % 4 == 0:
        assert attention._word_reads(strided.key_codes, dense.key_bits)


def test_decode_attention_on_cache_layer_views(on_emulator):
    """A GSRQLayer's stored state (views into its growable buffers) through the kernels equals the reference."""
    from gsrq.cache import GSRQLayer
    from gsrq.config import KindConfig
    from gsrq.quantizer import KVQuantizer

    hd, Hkv, B = 64, 2, 2
    g = torch.Generator().manual_seed(7)
    kc = KindConfig(16, 256, 2)
    books = torch.randn(1, hd // 16, 2, 256, 16, generator=g) * torch.tensor([1.0, 0.5]).view(1, 1, 2, 1, 1)
    kq = KVQuantizer(books, kc, norm=True, engine="torch")
    vq = KVQuantizer(books.clone(), kc, engine="torch")
    layer = GSRQLayer(kq, vq, sinks=2, window=3)
    K = torch.randn(B, Hkv, 60, hd, generator=g).half()
    V = torch.randn(B, Hkv, 60, hd, generator=g).half()
    layer.update(K[:, :, :40], V[:, :, :40])
    for t in range(40, 60):
        layer.update(K[:, :, t : t + 1], V[:, :, t : t + 1])
    view = layer.compressed_view()
    assert view.key_codes.shape[2] == 55 and layer.code_capacity > 55  # a view into a larger buffer
    assert view.key_codes.data_ptr() == layer._kc_buf.data_ptr() and not view.key_codes.is_contiguous()
    q = (torch.randn(B, 2 * Hkv, hd, generator=g) * 2).half()
    out = attention._decode_attention_cuda(q, view, hd**-0.5)
    assert isinstance(out, torch.Tensor), out
    ref = fused_decode_attention_ref(q.float(), view, hd**-0.5)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)

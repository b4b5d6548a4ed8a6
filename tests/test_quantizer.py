"""KVQuantizer against the pure-torch references and hand-built oracles."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gsrq import reference
from gsrq.config import GSRQConfig, KindConfig
from gsrq.errors import CodebookFormatError, ConfigError, InvalidValueError, ShapeError
from gsrq.quantizer import KVQuantizer, _rust_engine, hadamard_matrix, pack_codes_fast, unpack_codes_fast


def make_books(H: int, hd: int, kc: KindConfig, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    C = hd // kc.D
    # later stages smaller, like real residual codebooks
    scale = torch.tensor([0.5**m for m in range(kc.M)]).view(1, 1, kc.M, 1, 1)
    return torch.randn(H, C, kc.M, kc.Kc, kc.D, generator=g) * scale


def rand_x(B: int, Hkv: int, T: int, hd: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, Hkv, T, hd, generator=torch.Generator().manual_seed(seed))


def bitstream_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Independent oracle of docs/format.md: code i at stream bits [i*bits, (i+1)*bits), LSB first."""
    flat = codes.reshape(-1, codes.shape[-1])
    nbytes = math.ceil(codes.shape[-1] * bits / 8)
    out = np.zeros((flat.shape[0], nbytes), dtype=np.uint8)
    for r, row in enumerate(flat):
        acc = 0
        for i, c in enumerate(row):
            acc |= int(c) << (i * bits)
        out[r] = np.frombuffer(acc.to_bytes(nbytes, "little"), dtype=np.uint8)
    return out.reshape(*codes.shape[:-1], nbytes)


@pytest.mark.parametrize(
    "kc,H",
    [
        (KindConfig(D=8, Kc=16, M=2), 1),
        (KindConfig(D=8, Kc=16, M=2), 2),
        (KindConfig(D=4, Kc=12, M=3), 1),  # 4-bit codes that do not fill their range
        (KindConfig(D=16, Kc=256, M=1), 2),
    ],
)
def test_encode_decode_match_reference(kc: KindConfig, H: int) -> None:
    hd, Hkv = 16, 2
    books = make_books(H, hd, kc)
    q = KVQuantizer(books, kc, engine="torch")
    x = rand_x(2, Hkv, 5, hd)
    enc = q.encode(x)
    assert enc.norms is None
    C = hd // kc.D
    assert enc.packed.dtype == torch.uint8
    assert enc.packed.shape == (2, Hkv, 5, math.ceil(C * kc.M * kc.code_bits / 8))
    assert q.row_bytes == kc.bytes_per_token(hd)
    # reference codes, per codebook head
    if H == 1:
        ref_codes = reference.rq_encode_torch(x, books[0])
    else:
        ref_codes = torch.stack([reference.rq_encode_torch(x[:, h], books[h]) for h in range(H)], dim=1)
    flat = ref_codes.reshape(2, Hkv, 5, C * kc.M).numpy()
    np.testing.assert_array_equal(enc.packed.numpy(), bitstream_pack(flat, kc.code_bits))
    # decode == sum of the chosen codewords
    dec = q.decode(enc.packed)
    if H == 1:
        ref_dec = reference.rq_decode_torch(ref_codes, books[0])
    else:
        ref_dec = torch.stack([reference.rq_decode_torch(ref_codes[:, h], books[h]) for h in range(H)], dim=1)
    torch.testing.assert_close(dec, ref_dec, rtol=0, atol=1e-6)
    # fake_quant (no packing) is the same thing, in x's dtype
    torch.testing.assert_close(q.fake_quant(x), dec, rtol=0, atol=0)
    assert q.fake_quant(x.double()).dtype == torch.float64


def test_codes_are_greedy_nearest() -> None:
    """Stage-1 code is the nearest codeword by brute force; reconstruction error shrinks with stages."""
    kc = KindConfig(D=8, Kc=16, M=3)
    books = make_books(1, 16, kc)
    q = KVQuantizer(books, kc, engine="torch")
    x = rand_x(1, 2, 7, 16)
    codes = q.codes(x)
    chunks = x.reshape(1, 2, 7, 2, 8)
    d = ((chunks.unsqueeze(-2) - books[0, :, 0].view(1, 1, 1, 2, 16, 8)) ** 2).sum(-1)
    torch.testing.assert_close(codes[..., 0], d.argmin(-1), rtol=0, atol=0)
    errs = []
    for m in range(1, 4):
        qm = KVQuantizer(books[:, :, :m], KindConfig(D=8, Kc=16, M=m), engine="torch")
        errs.append(float(((qm.fake_quant(x) - x) ** 2).mean()))
    assert errs[0] > errs[1] > errs[2]


def test_exact_codewords_reconstruct_exactly() -> None:
    """Vectors that are codewords come back unchanged (M=1)."""
    kc = KindConfig(D=8, Kc=16, M=1)
    books = make_books(1, 16, kc)
    q = KVQuantizer(books, kc, engine="torch")
    idx = torch.tensor([[3, 7], [15, 0], [9, 9]])  # [T, C]
    x = torch.stack([torch.cat([books[0, 0, 0, i], books[0, 1, 0, j]]) for i, j in idx]).view(1, 1, 3, 16)
    enc = q.encode(x)
    torch.testing.assert_close(q.unpack(enc.packed)[0, 0, :, :, 0], idx, rtol=0, atol=0)
    torch.testing.assert_close(q.decode(enc.packed), x, rtol=0, atol=0)


def test_hadamard_matrix() -> None:
    h2 = hadamard_matrix(2)
    torch.testing.assert_close(h2, torch.tensor([[1.0, 1.0], [1.0, -1.0]]) / math.sqrt(2))
    h = hadamard_matrix(16)
    torch.testing.assert_close(h @ h.T, torch.eye(16), rtol=0, atol=1e-6)
    signs = torch.tensor([1.0, -1.0] * 8)
    hs = hadamard_matrix(16, signs)
    x = torch.randn(3, 16)
    torch.testing.assert_close(x @ hs, (x * signs) @ h)
    with pytest.raises(ConfigError, match="power-of-two"):
        hadamard_matrix(12)
    with pytest.raises(InvalidValueError, match=r"\+1 or -1"):
        hadamard_matrix(4, torch.tensor([1.0, 2.0, 1.0, 1.0]))


@pytest.mark.parametrize("rot,scale,norm", [(True, False, False), (False, True, False), (False, False, True), (True, True, True)])
def test_key_levers_against_manual_oracle(rot: bool, scale: bool, norm: bool) -> None:
    hd, H = 16, 2
    kc = KindConfig(D=8, Kc=16, M=2)
    books = make_books(H, hd, kc)
    if norm:  # unit-vector domain: shrink codewords to that scale
        books = books / 4
    g = torch.Generator().manual_seed(5)
    R = hadamard_matrix(hd, torch.where(torch.rand(hd, generator=g) < 0.5, -1.0, 1.0)) if rot else None
    S = (torch.rand(H, hd, generator=g) + 0.5) if scale else None
    q = KVQuantizer(books, kc, rotation=R, scale=S, norm=norm, engine="torch")
    x = rand_x(2, H, 6, hd) * 3
    # oracle: forward levers by hand, reference RQ, inverse levers by hand
    y = x.clone()
    if rot:
        y = y @ R
    if scale:
        y = y / S.view(1, H, 1, hd)
    n = None
    if norm:
        n = y.norm(dim=-1)
        y = y / n.unsqueeze(-1)
        n = n.half()
    codes = torch.stack([reference.rq_encode_torch(y[:, h], books[h]) for h in range(H)], dim=1)
    rq_hat = torch.stack([reference.rq_decode_torch(codes[:, h], books[h]) for h in range(H)], dim=1)
    rec = rq_hat * (n.float().unsqueeze(-1) if norm else 1)
    if scale:
        rec = rec * S.view(1, H, 1, hd)
    if rot:
        rec = rec @ R.T
    enc = q.encode(x)
    if norm:
        torch.testing.assert_close(enc.norms, n, rtol=0, atol=0)
    else:
        assert enc.norms is None
    torch.testing.assert_close(q.decode(enc.packed, enc.norms), rec, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.fake_quant(x), rec, rtol=1e-5, atol=1e-5)
    # the query map folds rotation and scale into the query: <q, x_hat> = n * <q @ qm[h], rq_hat>
    qv = torch.randn(2, H, 1, hd)
    qm = q.query_map
    if rot or scale:
        assert qm is not None and qm.shape == (H, hd, hd)
        lhs = (qv * rec).sum(-1)
        rhs = ((qv @ qm.unsqueeze(0)) * rq_hat).sum(-1) * (n.float() if norm else 1)
        torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4)
    else:
        assert qm is None
    if norm:
        with pytest.raises(ShapeError, match="norms"):
            q.decode(enc.packed)


def _fake_codebooks(cfg: GSRQConfig, books: dict, aux: dict | None = None) -> SimpleNamespace:
    aux = aux or {}
    return SimpleNamespace(
        config=cfg,
        num_layers=1,
        codebooks=lambda layer, kind: books[kind],
        aux=lambda layer, kind, name: aux.get((kind, name)),
    )


def test_from_codebooks_levers() -> None:
    kc = KindConfig(D=8, Kc=16, M=2)
    kb, vb = make_books(1, 16, kc, 1).numpy(), make_books(1, 16, kc, 2).numpy()
    signs = np.where(np.arange(16) % 3 == 0, -1.0, 1.0).astype(np.float32)
    scale = np.linspace(0.5, 2.0, 16, dtype=np.float32)[None]
    for arr in (kb, vb, signs, scale):  # codebook files hand out read-only arrays
        arr.flags.writeable = False
    cfg = GSRQConfig(keys=kc, values=kc, key_rotation="hadamard_signs", key_scale=True, key_norm=True)
    cbs = _fake_codebooks(cfg, {"keys": kb, "values": vb}, {("keys", "signs"): signs, ("keys", "scale"): scale})
    k = KVQuantizer.from_codebooks(cbs, 0, "keys")
    v = KVQuantizer.from_codebooks(cbs, 0, "values")
    torch.testing.assert_close(k.rotation, hadamard_matrix(16, torch.tensor(signs)))
    torch.testing.assert_close(k.scale, torch.tensor(scale))
    assert k.norm and not v.norm and v.rotation is None and v.scale is None
    torch.testing.assert_close(k.codebooks, torch.tensor(kb))
    with pytest.raises(CodebookFormatError, match="signs"):
        KVQuantizer.from_codebooks(_fake_codebooks(cfg, {"keys": kb, "values": vb}, {("keys", "scale"): scale}), 0, "keys")
    with pytest.raises(CodebookFormatError, match="scale"):
        KVQuantizer.from_codebooks(_fake_codebooks(cfg, {"keys": kb, "values": vb}, {("keys", "signs"): signs}), 0, "keys")
    with pytest.raises(ConfigError, match="layer"):
        KVQuantizer.from_codebooks(cbs, 1, "keys")
    with pytest.raises(ConfigError, match="kind"):
        KVQuantizer.from_codebooks(cbs, 0, "queries")


def test_bits_per_element() -> None:
    assert KVQuantizer(make_books(1, 16, KindConfig(8, 256, 1)), KindConfig(8, 256, 1)).bits_per_element == 1.0
    assert KVQuantizer(make_books(1, 16, KindConfig(16, 256, 2)), KindConfig(16, 256, 2)).bits_per_element == 1.0
    # 3 codes of 4 bits = 12 bits -> 2 bytes per row: byte padding is counted
    q = KVQuantizer(make_books(1, 16, KindConfig(16, 12, 3)), KindConfig(16, 12, 3))
    assert q.row_bytes == 2 and q.bits_per_element == 1.0
    qn = KVQuantizer(make_books(1, 16, KindConfig(8, 256, 1)), KindConfig(8, 256, 1), norm=True)
    assert qn.bytes_per_token == 4 and qn.bits_per_element == 2.0


def test_bad_input_raises() -> None:
    kc = KindConfig(D=8, Kc=12, M=2)
    books = make_books(2, 16, kc)
    q = KVQuantizer(books, kc, engine="torch")
    with pytest.raises(ShapeError, match="head_dim"):
        q.encode(torch.randn(1, 2, 3, 8))
    with pytest.raises(ShapeError, match="KV heads"):
        q.encode(torch.randn(1, 3, 3, 16))
    with pytest.raises(ShapeError, match=r"\[B, Hkv, T, head_dim\]"):
        q.encode(torch.randn(2, 3, 16))
    bad = torch.randn(1, 2, 3, 16)
    bad[0, 1, 2, 5] = float("nan")
    with pytest.raises(InvalidValueError, match="NaN"):
        q.encode(bad)
    with pytest.raises(ShapeError, match="uint8"):
        q.decode(torch.zeros(1, 2, 3, q.row_bytes, dtype=torch.int32))
    with pytest.raises(ShapeError, match=str(q.row_bytes)):
        q.decode(torch.zeros(1, 2, 3, q.row_bytes + 1, dtype=torch.uint8))
    with pytest.raises(InvalidValueError, match="Kc=12"):
        q.decode(torch.full((1, 2, 3, q.row_bytes), 0xFF, dtype=torch.uint8))
    with pytest.raises(ShapeError, match="do not match"):
        KVQuantizer(books, KindConfig(D=8, Kc=16, M=2))
    with pytest.raises(ShapeError, match=r"\[H, C, M, Kc, D\]"):
        KVQuantizer(books[0], kc)
    nanbooks = books.clone()
    nanbooks[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(InvalidValueError, match="codebooks"):
        KVQuantizer(nanbooks, kc)
    with pytest.raises(InvalidValueError, match="orthogonal"):
        KVQuantizer(books, kc, rotation=torch.ones(16, 16))
    with pytest.raises(InvalidValueError, match="positive"):
        KVQuantizer(books, kc, scale=-torch.ones(16))
    with pytest.raises(ConfigError, match="engine"):
        KVQuantizer(books, kc, engine="gpu")
    with pytest.raises(ConfigError, match="CUDA device"):
        KVQuantizer(books, kc, engine="cuda").encode(torch.randn(1, 2, 1, 16))
    with pytest.raises(ConfigError, match="check_values"):
        KVQuantizer(books, kc, check_values="yes")
    with pytest.raises(ConfigError, match="beam"):
        KVQuantizer(books, kc, beam=2, engine="torch").encode(torch.randn(1, 2, 1, 16))


@pytest.mark.skipif(_rust_engine() is None, reason="the Rust engine (gsrq._gsrq.rq_encode) is not built")
@pytest.mark.parametrize("H", [1, 2])
def test_rust_engine_matches_torch(H: int) -> None:
    kc = KindConfig(D=8, Kc=16, M=3)
    books = make_books(H, 16, kc)
    x = rand_x(2, 2, 9, 16)
    rust = KVQuantizer(books, kc, engine="rust").encode(x)
    torch_ = KVQuantizer(books, kc, engine="torch").encode(x)
    torch.testing.assert_close(rust.packed, torch_.packed, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 11, 12, 16])
@pytest.mark.parametrize("n", [1, 7, 16])
def test_fast_pack_unpack_match_reference(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 1 << bits, (2, 3, 5, n), generator=g)
    packed = pack_codes_fast(codes, bits)
    ref = reference.pack_codes_torch(codes, bits)
    torch.testing.assert_close(packed, ref, rtol=0, atol=0)
    np.testing.assert_array_equal(packed.numpy(), bitstream_pack(codes.numpy(), bits))
    torch.testing.assert_close(unpack_codes_fast(packed, bits, n), codes, rtol=0, atol=0)


def test_matches_engine_residual_quantizer() -> None:
    """Codes and reconstruction agree with gsrq.engine.ResidualQuantizer per chunk position."""
    from gsrq.engine import ResidualQuantizer

    kc = KindConfig(D=8, Kc=16, M=3)
    books = make_books(1, 16, kc)
    x = rand_x(2, 2, 9, 16)
    for engine in ("torch", "auto"):
        q = KVQuantizer(books, kc, engine=engine)
        codes = q.codes(x)
        rec = q.fake_quant(x)
        for c in range(2):
            rq = ResidualQuantizer.from_codebooks(books[0, c].numpy())
            xs = x[..., c * 8 : (c + 1) * 8].reshape(-1, 8).numpy()
            ref = rq.encode(xs)
            np.testing.assert_array_equal(codes[..., c, :].reshape(-1, 3).numpy(), ref)
            np.testing.assert_allclose(rec[..., c * 8 : (c + 1) * 8].reshape(-1, 8).numpy(), rq.decode(ref), atol=1e-5)


# ------------------------------------------------------------ CUDA encode path (kernel on the CPU emulator)
@pytest.fixture(scope="module")
def encode_emu(tmp_path_factory):
    """ctypes handles of the encode kernels compiled from cuda/encode.cu for the CPU emulation (tests/emu)."""
    import ctypes
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("g++") is None:
        pytest.skip("needs g++ (C++20)")
    from test_kernel_emulation import _kernel_names

    root = Path(__file__).resolve().parent.parent
    out = tmp_path_factory.mktemp("encode_emu")
    src = (root / "cuda" / "encode.cu").read_text()
    names = _kernel_names(src)
    patched = out / "encode.patched.cu"
    patched.write_text(src.replace("extern __shared__", "extern"))
    wrapper = out / "encode.emu.cpp"
    wrapper.write_text(
        "\n".join(
            ['#include "emu_runtime.h"', "alignas(16) unsigned char smem[kEmuSmem];",
             "namespace { alignas(16) unsigned char smem[kEmuSmem]; }", f'#include "{patched}"']
            + [f"GSRQ_EMU_EXPORT({n})" for n in names]
        )
        + "\n"
    )
    so = out / "encode.so"
    cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", f"-I{root / 'tests' / 'emu' / 'include'}",
           f"-I{root / 'cuda' / 'include'}", str(wrapper), "-o", str(so)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    lib = ctypes.CDLL(str(so))
    fns = {}
    for n in names:
        fn = getattr(lib, f"emu_{n}")
        fn.argtypes = [ctypes.c_uint] * 5 + [ctypes.POINTER(ctypes.c_void_p)]
        fn.restype = None
        fns[n] = fn
    return fns


@pytest.mark.parametrize("levers", [False, True])
@pytest.mark.parametrize("T, variant", [(1, "rows"), (13, "tiled")])  # a decode step and a (small) prefill
def test_encode_cuda_path_matches_rust(encode_emu, monkeypatch, levers, T, variant) -> None:
    """KVQuantizer.encode through the CUDA branch (real host code and kernel source, emulated on the CPU)
    gives the packed rows of the Rust encoder, for [B, Hkv, T, hd] in any batch/head/token layout."""
    import ctypes

    from gsrq import kernels
    from test_kernel_emulation import _ctype

    launched = []

    def launch(name, device_index, grid, block, shmem, *args):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        vals = [_ctype(a) for a in args]
        params = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
        encode_emu[name](grid[0], grid[1], grid[2], block[0], int(shmem), params)
        launched.append(name)

    monkeypatch.setattr(kernels.REGISTRY, "launch", launch)
    monkeypatch.setattr(kernels, "_check_cuda_tensor", lambda name, t, dtype=None: None)
    monkeypatch.setattr(kernels, "_device_index", lambda device: 0)
    monkeypatch.setattr(KVQuantizer, "_use_cuda", lambda self, y: True)
    if variant == "tiled":  # what auto picks above ROWS_KERNEL_MAX rows; forced here to keep the emulation small
        monkeypatch.setattr(kernels, "ROWS_KERNEL_MAX", 0)

    kc = KindConfig(D=8, Kc=16, M=3)
    H = 2 if levers else 1
    books = make_books(H, 16, kc, seed=3)
    extra = dict(rotation=hadamard_matrix(16), scale=torch.rand(H, 16) + 0.5, norm=True) if levers else {}
    if levers:
        books = books / books.reshape(-1, 8).norm(dim=-1).mean()
    x = rand_x(3, 2, T, 16, seed=T)
    got = KVQuantizer(books, kc, engine="auto", **extra).encode(x)
    assert launched == [f"gsrq_rq_encode_{'rows_' if variant == 'rows' else ''}f32"]
    want = KVQuantizer(books, kc, engine="rust" if _rust_engine() else "torch", **extra).encode(x)
    assert got.packed.shape == (3, 2, T, want.packed.shape[-1]) and got.packed.is_contiguous()
    torch.testing.assert_close(got.packed, want.packed, rtol=0, atol=0)
    if levers:
        torch.testing.assert_close(got.norms, want.norms, rtol=0, atol=0)


def test_value_checks_only_where_free() -> None:
    """NaN checks read values on the host: CPU tensors by default, every device with check_values=True."""
    kc = KindConfig(D=8, Kc=16, M=2)
    books = make_books(1, 16, kc)
    meta = torch.empty(1, device="meta")
    cpu = torch.empty(1)
    assert KVQuantizer(books, kc)._check_values(cpu) and not KVQuantizer(books, kc)._check_values(meta)
    assert KVQuantizer(books, kc, check_values=True)._check_values(meta)
    assert not KVQuantizer(books, kc, check_values=False)._check_values(cpu)
    x = rand_x(1, 2, 3, 16)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidValueError, match="NaN"):
        KVQuantizer(books, kc).encode(x)
    KVQuantizer(books, kc, check_values=False, engine="torch").encode(x)  # unchecked: codes of garbage, no error


def test_encode_cuda_unavailable_falls_back_once(monkeypatch) -> None:
    """engine='auto' on a GPU whose kernels cannot load: one RuntimeWarning, then the torch reference."""
    from gsrq import kernels, quantizer
    from gsrq.errors import KernelUnavailableError

    def unavailable(*a, **k):
        raise KernelUnavailableError("no manifest (test)")

    monkeypatch.setattr(kernels, "rq_encode_cuda", unavailable)
    monkeypatch.setattr(KVQuantizer, "_use_cuda", lambda self, y: True)
    monkeypatch.setattr(quantizer, "_encode_warned", set())
    kc = KindConfig(D=8, Kc=16, M=2)
    books = make_books(1, 16, kc)
    x = rand_x(2, 2, 5, 16)
    q = KVQuantizer(books, kc)
    with pytest.warns(RuntimeWarning, match="no manifest"):
        got = q.encode(x)
    torch.testing.assert_close(got.packed, KVQuantizer(books, kc, engine="torch").encode(x).packed, rtol=0, atol=0)
    q.encode(x)  # no second warning (filterwarnings=error would raise)
    strict = KVQuantizer(books, kc, engine="cuda")
    with pytest.raises(KernelUnavailableError):
        strict._encode_cuda(x)

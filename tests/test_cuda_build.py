"""CPU tests of the CUDA build (cuda/build.py) and the kernel loader (gsrq.kernels).

The build is exercised for real with nvcc (one architecture, into a temporary
directory); the packaged kernel directory (``make cuda``) is checked for every
architecture the wheel ships.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gsrq import kernels
from gsrq.errors import KernelUnavailableError, ShapeError

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_KERNELS = {
    "unpack.fatbin": ["gsrq_unpack_codes"],
    "encode.fatbin": [
        "gsrq_rq_encode_bf16",
        "gsrq_rq_encode_f16",
        "gsrq_rq_encode_f32",
        "gsrq_rq_encode_rows_bf16",
        "gsrq_rq_encode_rows_f16",
        "gsrq_rq_encode_rows_f32",
    ],
    "decode_attention.fatbin": [
        "gsrq_decode_attention_merge_bf16",
        "gsrq_decode_attention_merge_f16",
        "gsrq_decode_attention_merge_f32",
        "gsrq_decode_attention_split",
    ],
}
SHIPPED_ARCHS = ["sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "cuda" / file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build_module():
    return _load("gsrq_cuda_build", "build.py")


build = _build_module()
check = _load("gsrq_cuda_check_wheel", "check_wheel.py")


def _nvcc_or_skip():
    try:
        return build.find_nvcc()
    except build.BuildError as exc:
        pytest.skip(f"no nvcc here: {exc}")


def find_cuobjdump() -> str | None:
    """cuobjdump from PATH, the CUDA wheels (nvidia-cuda-cuobjdump, in requirements-dev) or triton's toolkit."""
    w = check.find_cuobjdump()
    if w:
        return w
    for entry in sys.path:
        hits = glob.glob(os.path.join(entry, "triton/backends/nvidia/bin/cuobjdump"))
        if hits:
            return hits[0]
    return None


def test_every_cu_source_is_built():
    """The build covers every cuda/*.cu: the expected list below is the source directory's, not a hand-kept one."""
    assert {p.stem + ".fatbin" for p in (ROOT / "cuda").glob("*.cu")} == set(EXPECTED_KERNELS)


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    """All kernels built for sm_90 only (the architecture of the GPU machines)."""
    _nvcc_or_skip()
    out = tmp_path_factory.mktemp("kernels")
    manifest = build.build(out, [90], jobs=2, quiet=True)
    return out, manifest


def test_build_writes_fatbins_and_manifest(small_build):
    out, manifest = small_build
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["archs"] == ["sm_90", "compute_90"]
    assert {e["file"]: e["kernels"] for e in manifest["fatbins"]} == EXPECTED_KERNELS
    umask = os.umask(0)
    os.umask(umask)
    for name in ["manifest.json"] + [e["file"] for e in manifest["fatbins"]]:
        assert (out / name).stat().st_mode & 0o777 == 0o644 & ~umask  # readable by all, like any package file
    for e in manifest["fatbins"]:
        data = (out / e["file"]).read_bytes()
        assert len(data) == e["bytes"] > 1000
        assert build.hashlib.sha256(data).hexdigest() == e["sha256"]
        assert kernels.verify_fatbin(e, out) == data


def test_build_is_incremental_and_repairs(small_build):
    out, manifest = small_build
    fat = out / "unpack.fatbin"
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.fatbin")}
    again = build.build(out, [90], jobs=1, quiet=True)
    assert again["fatbins"] == manifest["fatbins"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.fatbin")} == before  # nothing recompiled
    # a damaged fatbin fails the loader's hash check, and the next build replaces it
    fat.write_bytes(fat.read_bytes()[:-7] + b"garbage")
    entry = next(e for e in manifest["fatbins"] if e["file"] == "unpack.fatbin")
    with pytest.raises(KernelUnavailableError, match="sha256"):
        kernels.verify_fatbin(entry, out)
    build.build(out, [90], jobs=1, quiet=True)
    assert kernels.verify_fatbin(entry, out)
    assert {p.name for p in out.glob("*.fatbin")} == set(EXPECTED_KERNELS)


def test_cuobjdump_lists_sass_and_symbols(small_build):
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not installed")
    out, manifest = small_build
    for e in manifest["fatbins"]:
        listing = subprocess.run([tool, "-lelf", "-lptx", str(out / e["file"])], capture_output=True, text=True, check=True).stdout
        assert "sm_90.cubin" in listing and "sm_90.ptx" in listing
        syms = subprocess.run([tool, "-symbols", str(out / e["file"])], capture_output=True, text=True, check=True).stdout
        assert check.entry_symbols(syms) == e["kernels"]


def test_parse_archs():
    assert build.parse_archs("sm_90, 80") == [80, 90]
    assert build.parse_archs(None) == [80, 86, 89, 90]
    with pytest.raises(build.BuildError):
        build.parse_archs("ninety")
    flags, names = build.gencode_flags([80, 90])
    assert names == ["sm_80", "sm_90", "compute_90"]
    assert "arch=compute_90,code=[sm_90,compute_90]" in flags


def test_packaged_kernels_ship_every_arch():
    """The kernel directory `make cuda` fills (and the wheel packs)."""
    d = ROOT / "python" / "gsrq" / "_kernels"
    if not (d / "manifest.json").is_file():
        pytest.skip("kernels not built in this checkout (run `make cuda`)")
    manifest = kernels.load_manifest(d)
    assert manifest["archs"] == SHIPPED_ARCHS
    assert {e["file"]: e["kernels"] for e in manifest["fatbins"]} == EXPECTED_KERNELS
    for e in manifest["fatbins"]:
        assert e["archs"] == SHIPPED_ARCHS
        kernels.verify_fatbin(e, d)
    tool = find_cuobjdump()
    if tool:
        listing = subprocess.run([tool, "-lelf", str(d / "decode_attention.fatbin")], capture_output=True, text=True, check=True).stdout
        for arch in SHIPPED_ARCHS[:-1]:
            assert f"{arch}.cubin" in listing


def test_env_override_dir(monkeypatch, tmp_path, small_build):
    out, manifest = small_build
    monkeypatch.setenv(kernels.KERNEL_DIR_ENV, str(tmp_path))
    assert kernels.kernel_dir() == tmp_path
    with pytest.raises(KernelUnavailableError, match=str(tmp_path)):
        kernels.load_manifest()
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(KernelUnavailableError, match="unreadable"):
        kernels.load_manifest()
    monkeypatch.setenv(kernels.KERNEL_DIR_ENV, str(out))
    assert kernels.load_manifest()["fatbins"] == manifest["fatbins"]
    assert kernels.REGISTRY.entry_for("gsrq_rq_encode_f16")["file"] == "encode.fatbin"
    with pytest.raises(KernelUnavailableError, match="not in"):
        kernels.REGISTRY.entry_for("gsrq_no_such_kernel")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_loader_without_cuda_raises():
    with pytest.raises(KernelUnavailableError, match="no CUDA device"):
        kernels.REGISTRY.get("gsrq_unpack_codes", 0)
    assert kernels.kernels_available() is False
    with pytest.raises(KernelUnavailableError, match="CUDA tensors"):
        kernels.unpack_codes_cuda(torch.zeros(2, 3, dtype=torch.uint8), 4, 6)
    with pytest.raises(KernelUnavailableError):
        kernels.rq_encode_cuda(torch.zeros(2, 1, 8), torch.zeros(1, 1, 1, 4, 8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_info_without_gpu(monkeypatch, small_build, capsys):
    out, _ = small_build
    monkeypatch.setenv(kernels.KERNEL_DIR_ENV, str(out))
    parser = argparse.ArgumentParser()
    kernels.add_arguments(parser)
    assert kernels.run(parser.parse_args([])) == 0
    text = capsys.readouterr().out
    assert "GPU:            none" in text
    assert str(out) in text and "GSRQ_KERNEL_DIR" in text
    for names in EXPECTED_KERNELS.values():
        for n in names:
            assert n in text
    assert text.count("sha256 ok") == 3
    rep = kernels.info()
    assert rep["gpu"] is None and all(f["sha256_ok"] and not f["loaded"] for f in rep["fatbins"])
    assert kernels.run(parser.parse_args(["--json"])) == 0
    assert json.loads(capsys.readouterr().out)["kernel_dir"] == str(out)


def _wheel(path: Path, kernel_dir: Path, *, drop: str | None = None, extra: dict[str, bytes] | None = None,
           ext: bool = True, manifest: dict | None = None) -> Path:
    """A wheel-shaped zip holding the kernel directory (optionally altered)."""
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        if ext:
            zf.writestr("gsrq/_gsrq.abi3.so", b"\x7fELF")
        for f in sorted(kernel_dir.iterdir()):
            if f.name == drop or f.name.startswith("."):
                continue
            data = json.dumps(manifest).encode() if (f.name == "manifest.json" and manifest is not None) else f.read_bytes()
            zf.writestr(f"gsrq/_kernels/{f.name}", data)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def test_check_wheel_accepts_a_complete_wheel_and_names_each_defect(small_build, tmp_path):
    out, manifest = small_build
    assert check.check_wheel(_wheel(tmp_path / "ok.whl", out), [90]) == []
    # the shipped architectures are not in a sm_90-only build
    assert any("archs" in p for p in check.check_wheel(tmp_path / "ok.whl", [80, 86, 89, 90]))
    probs = check.check_wheel(_wheel(tmp_path / "a.whl", out, drop="encode.fatbin"), [90])
    assert any("encode.fatbin (from cuda/encode.cu) is not in the wheel" in p for p in probs)
    probs = check.check_wheel(_wheel(tmp_path / "b.whl", out, ext=False), [90])
    assert probs == ["no Rust extension gsrq/_gsrq*.so in the wheel"]
    probs = check.check_wheel(_wheel(tmp_path / "c.whl", out, drop="manifest.json"), [90])
    assert any("manifest.json" in p for p in probs)
    probs = check.check_wheel(_wheel(tmp_path / "d.whl", out, extra={"gsrq/_kernels/old.fatbin": b"x"}), [90])
    assert any("old.fatbin is in the wheel but no cuda/*.cu produces it" in p for p in probs)
    stale = json.loads(json.dumps(manifest))
    stale["fatbins"][0]["source_hash"] = "0" * 64
    probs = check.check_wheel(_wheel(tmp_path / "e.whl", out, manifest=stale), [90])
    assert probs == [f"{stale['fatbins'][0]['file']}: built from another version of cuda/{stale['fatbins'][0]['source']}, "
                     "its headers or flags (stale)"]
    fewer = json.loads(json.dumps(manifest))
    fewer["fatbins"][1]["kernels"] = fewer["fatbins"][1]["kernels"][:1]
    probs = check.check_wheel(_wheel(tmp_path / "f.whl", out, manifest=fewer), [90])
    assert any("PTX entries" in p for p in probs)
    # corrupted bytes: the sha256 check fails, whatever else does
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    fat = bad / "unpack.fatbin"
    fat.write_bytes(fat.read_bytes()[:-5] + b"xxxxx")
    probs = check.check_wheel(_wheel(tmp_path / "g.whl", bad), [90], use_cuobjdump=False)
    assert probs == ["unpack.fatbin: bytes in the wheel do not match the manifest's sha256/size"]
    assert "not a readable wheel" in check.check_wheel(tmp_path / "missing.whl", [90])[0]


def test_check_wheel_cli(small_build, tmp_path, capsys):
    out, _ = small_build
    good = _wheel(tmp_path / "ok.whl", out)
    assert check.main([str(good), "--archs", "90"]) == 0
    assert "one per cuda/*.cu" in capsys.readouterr().out
    assert check.main([str(_wheel(tmp_path / "x.whl", out, drop="unpack.fatbin")), "--archs", "90"]) == 1
    assert "unpack.fatbin (from cuda/unpack.cu) is not in the wheel" in capsys.readouterr().err


def test_codebook_layout():
    """The one shape check of codebooks + code width shared by the encode launcher and decode attention."""
    books = torch.zeros(1, 2, 3, 256, 32)
    assert kernels.codebook_layout(books, 4, 64, None) == (1, 2, 3, 256, 32, 8, 6)
    assert kernels.codebook_layout(torch.zeros(4, 1, 5, 1000, 64), 4, 64, 12)[-2:] == (12, (5 * 12 + 7) // 8)
    for args, match in [((torch.zeros(2, 2, 3, 256, 32), 4, 64, None), "2 heads"),
                        ((books, 4, 128, None), "C\\*D=64"),
                        ((books, 4, 64, 7), "bits=7 cannot hold codes of Kc=256"),
                        ((books, 4, 64, 17), "bits=17"),
                        ((books, 4, 64, True), "bits=True"),
                        ((torch.zeros(2, 3, 256, 32), 4, 64, None), "must be \\[H, C, M, Kc, D\\]")]:
        with pytest.raises(ShapeError, match=match):
            kernels.codebook_layout(*args)

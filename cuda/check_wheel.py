#!/usr/bin/env python3
"""Check that a gsrq wheel carries the extension and a fatbin of every ``cuda/*.cu``, built from these sources.

Usage: ``python cuda/check_wheel.py dist/gsrq-*.whl [--archs 80,86,89,90]``

Checks, each failure named (exit status 1):

* the wheel holds the Rust extension ``gsrq/_gsrq*.so`` (or ``.pyd``);
* ``gsrq/_kernels/manifest.json`` lists exactly one fatbin per ``cuda/*.cu`` of
  this checkout, and the wheel holds exactly those fatbins;
* every fatbin's bytes match the manifest's sha256 and size, and its PTX entry
  names match the manifest's kernel list (nothing compiled away);
* every fatbin was built from this checkout's source and headers with this
  nvcc and the shipped flags (``source_hash`` recomputed as ``cuda/build.py``
  does), so a stale fatbin cannot ship;
* the manifest and every fatbin cover SASS of each architecture plus PTX of the
  highest; where ``cuobjdump`` is installed (``nvidia-cuda-cuobjdump``), the
  fatbin's own listing must show those cubins and PTX, and its entry symbols
  must equal the manifest's kernels.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _build_module():
    spec = importlib.util.spec_from_file_location("gsrq_cuda_build", HERE / "build.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


build = _build_module()


def find_cuobjdump() -> str | None:
    """cuobjdump from $GSRQ_CUOBJDUMP, PATH, or the CUDA wheels of this interpreter."""
    v = os.environ.get("GSRQ_CUOBJDUMP")
    if v:
        return v
    w = shutil.which("cuobjdump")
    if w:
        return w
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            continue
        for pattern in ("nvidia/cu*/bin/cuobjdump", "nvidia/cuda_cuobjdump/bin/cuobjdump"):
            hits = sorted(glob.glob(os.path.join(entry, pattern)), reverse=True)
            if hits:
                return hits[0]
    return None


def entry_symbols(listing: str) -> list[str]:
    """Kernel entry names of a ``cuobjdump -symbols`` listing (``STO_ENTRY`` or ``ENTRY`` column, by version)."""
    out = set()
    for ln in listing.splitlines():
        tok = ln.split()
        if len(tok) >= 2 and tok[0] == "FUNC" and ("ENTRY" in tok or "STO_ENTRY" in tok):
            out.add(tok[-1])
    return sorted(out)


def cuobjdump_problems(tool: str, name: str, data: bytes, arch_names: list[str], kernels: list[str]) -> list[str]:
    """What cuobjdump says is missing from one fatbin (empty: nothing)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        listing = subprocess.run([tool, "-lelf", "-lptx", str(path)], capture_output=True, text=True)
        syms = subprocess.run([tool, "-symbols", str(path)], capture_output=True, text=True)
    if listing.returncode or syms.returncode:
        return [f"{name}: cuobjdump failed: {(listing.stderr or syms.stderr).strip()}"]
    out = []
    for arch in arch_names:
        want = f"{arch}.cubin" if arch.startswith("sm_") else f"{arch.replace('compute_', 'sm_')}.ptx"
        if want not in listing.stdout:
            out.append(f"{name}: no {want} in the fatbin (cuobjdump -lelf -lptx)")
    entries = entry_symbols(syms.stdout)
    if entries != sorted(kernels):
        out.append(f"{name}: cuobjdump finds kernels {entries}, the manifest lists {sorted(kernels)}")
    return out


def check_wheel(wheel: Path, archs: list[int], *, sources_dir: Path = HERE, use_cuobjdump: bool = True) -> list[str]:
    """Every problem of ``wheel`` (empty list: the wheel is good)."""
    problems: list[str] = []
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        return [f"{wheel}: not a readable wheel ({exc})"]
    with zf:
        names = set(zf.namelist())
        if not any(n.startswith("gsrq/_gsrq") and n.endswith((".so", ".pyd")) for n in names):
            problems.append("no Rust extension gsrq/_gsrq*.so in the wheel")
        sources = sorted(sources_dir.glob("*.cu"))
        if not sources:
            return problems + [f"no .cu sources in {sources_dir}"]
        if "gsrq/_kernels/manifest.json" not in names:
            return problems + ["no gsrq/_kernels/manifest.json in the wheel (were the kernels built? GSRQ_SKIP_CUDA?)"]
        try:
            manifest = json.loads(zf.read("gsrq/_kernels/manifest.json"))
            entries = {e["source"]: e for e in manifest["fatbins"]}
        except (ValueError, KeyError, TypeError) as exc:
            return problems + [f"unreadable manifest in the wheel: {exc}"]

        gflags, arch_names = build.gencode_flags(archs)
        flags = build.BASE_FLAGS + gflags
        version = build.nvcc_version(build.find_nvcc())
        if manifest.get("archs") != arch_names:
            problems.append(f"manifest archs {manifest.get('archs')}, expected {arch_names}")
        if manifest.get("nvcc") != version:
            problems.append(f"manifest nvcc {manifest.get('nvcc')}, this nvcc is {version}")
        want_files = {s.stem + ".fatbin" for s in sources}
        have_files = {n.removeprefix("gsrq/_kernels/") for n in names if n.startswith("gsrq/_kernels/") and n.endswith(".fatbin")}
        for f in sorted(want_files - have_files):
            problems.append(f"{f} (from cuda/{f.removesuffix('.fatbin')}.cu) is not in the wheel")
        for f in sorted(have_files - want_files):
            problems.append(f"{f} is in the wheel but no cuda/*.cu produces it")
        for s in sorted(set(entries) - {s.name for s in sources}):
            problems.append(f"the manifest lists {s}, which is not in cuda/")
        tool = find_cuobjdump() if use_cuobjdump else None
        for src in sources:
            e = entries.get(src.name)
            if e is None:
                problems.append(f"cuda/{src.name} has no manifest entry")
                continue
            member = f"gsrq/_kernels/{e.get('file')}"
            if e.get("file") != src.stem + ".fatbin" or member not in names:
                continue  # reported above
            data = zf.read(member)
            if hashlib.sha256(data).hexdigest() != e.get("sha256") or len(data) != e.get("bytes"):
                problems.append(f"{e['file']}: bytes in the wheel do not match the manifest's sha256/size")
            if build.source_hash(src, flags, version) != e.get("source_hash"):
                problems.append(f"{e['file']}: built from another version of cuda/{src.name}, its headers or flags (stale)")
            if e.get("archs") != arch_names:
                problems.append(f"{e['file']}: archs {e.get('archs')}, expected {arch_names}")
            ptx = build.kernel_names(data)
            if not ptx or ptx != sorted(e.get("kernels", [])):
                problems.append(f"{e['file']}: PTX entries {ptx}, the manifest lists {e.get('kernels')}")
            if tool:
                problems += cuobjdump_problems(tool, e["file"], data, arch_names, e.get("kernels", []))
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wheel", type=Path)
    p.add_argument("--archs", default=os.environ.get("GSRQ_CUDA_ARCHS"), help="comma list, default 80,86,89,90")
    p.add_argument("--require-cuobjdump", action="store_true", help="fail when cuobjdump is not installed")
    args = p.parse_args(argv)
    try:
        archs = build.parse_archs(args.archs)
        tool = find_cuobjdump()
        if args.require_cuobjdump and tool is None:
            print("[gsrq wheel] error: cuobjdump not found (pip install nvidia-cuda-cuobjdump)", file=sys.stderr)
            return 1
        problems = check_wheel(args.wheel, archs)
    except build.BuildError as exc:
        print(f"[gsrq wheel] error: {exc}", file=sys.stderr)
        return 1
    if problems:
        print(f"[gsrq wheel] {args.wheel} is not shippable:", file=sys.stderr)
        for msg in problems:
            print(f"  - {msg}", file=sys.stderr)
        return 1
    with zipfile.ZipFile(args.wheel) as zf:
        kern = sorted(n for n in zf.namelist() if n.startswith("gsrq/_kernels/"))
    print(f"[gsrq wheel] {args.wheel}: extension and {len(kern) - 1} fatbins, one per cuda/*.cu, built from these "
          f"sources for {', '.join(build.gencode_flags(archs)[1])}" + ("; cuobjdump agrees" if tool else "; cuobjdump not installed"))
    for n in kern:
        print(f"  {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

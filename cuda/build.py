#!/usr/bin/env python3
"""Compile every ``cuda/*.cu`` into a fatbin and write ``manifest.json``.

Usage: ``python cuda/build.py --out python/gsrq/_kernels [--archs 80,86,89,90] [--jobs N] [--force]``

Each fatbin holds SASS for the requested architectures plus PTX of the
highest one (``-gencode arch=compute_XX,code=[sm_XX,compute_XX]``). nvcc is
taken from ``$GSRQ_NVCC`` / ``$NVCC``, else from the ``nvidia-cuda-nvcc`` wheel
of the running interpreter (``site-packages/nvidia/cu*/bin/nvcc``), else from
``$CUDA_HOME/bin`` or ``PATH``. Headers come from the same toolkit
(``include`` and ``include/cccl``, the ``nvidia-cuda-runtime`` and
``nvidia-cuda-cccl`` wheels) and from ``cuda/include``.

A file is recompiled only when the hash of its source, every header under
``cuda/include``, the nvcc version and the flags differ from the manifest
entry of the fatbin already in ``--out`` (and that fatbin's sha256 matches),
so repeated builds are fast. Outputs are written to temporary files and
renamed, so an interrupted build never leaves a half-written fatbin or
manifest.

manifest.json::

    {"format": 1, "nvcc": "13.5.37", "archs": ["sm_80", ..., "compute_90"],
     "fatbins": [{"file": "unpack.fatbin", "source": "unpack.cu", "sha256": "...",
                  "source_hash": "...", "archs": [...], "kernels": ["gsrq_unpack_codes"],
                  "bytes": 12345}, ...]}
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_ARCHS = (80, 86, 89, 90)
# -O3 for host and device; no --use_fast_math: the kernels must agree with the
# float32 reference (expf, not __expf; IEEE division). -lineinfo for profilers.
BASE_FLAGS = ["-O3", "-std=c++17", "-lineinfo", "--no-compress", "-Xptxas=-O3"]
MANIFEST_FORMAT = 1


class BuildError(RuntimeError):
    pass


def find_nvcc() -> Path:
    """The nvcc to use (see the module docstring for the search order)."""
    for var in ("GSRQ_NVCC", "NVCC"):
        v = os.environ.get(var)
        if v:
            p = Path(v)
            if not p.is_file():
                raise BuildError(f"${var} points to {v}, which is not a file")
            return p
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            continue
        for cand in sorted(glob.glob(os.path.join(entry, "nvidia", "cu*", "bin", "nvcc")), reverse=True):
            return Path(cand)
        cand = os.path.join(entry, "nvidia", "cuda_nvcc", "bin", "nvcc")
        if os.path.isfile(cand):
            return Path(cand)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        v = os.environ.get(var)
        if v and os.path.isfile(os.path.join(v, "bin", "nvcc")):
            return Path(v) / "bin" / "nvcc"
    w = shutil.which("nvcc")
    if w:
        return Path(w)
    raise BuildError(
        "nvcc not found: install the PyPI packages nvidia-cuda-nvcc, nvidia-cuda-runtime and "
        "nvidia-cuda-cccl into this interpreter, or set $GSRQ_NVCC / $CUDA_HOME"
    )


def include_dirs(nvcc: Path) -> list[Path]:
    """Toolkit include dirs next to nvcc (runtime headers and CCCL) plus cuda/include."""
    top = nvcc.resolve().parent.parent
    dirs = [HERE / "include"]
    for d in (top / "include", top / "include" / "cccl"):
        if d.is_dir():
            dirs.append(d)
    # the cccl wheel may also live in its own directory on older layouts
    for entry in sys.path:
        d = Path(entry) / "nvidia" / "cuda_cccl" / "include"
        if entry and d.is_dir():
            dirs.append(d)
    return dirs


def nvcc_version(nvcc: Path) -> str:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise BuildError(f"{nvcc} --version failed: {out.stderr.strip()}")
    m = re.search(r"V(\d+\.\d+\.\d+)", out.stdout)
    return m.group(1) if m else out.stdout.strip().splitlines()[-1]


def gencode_flags(archs: list[int]) -> tuple[list[str], list[str]]:
    """-gencode flags: SASS for every arch, PTX of the highest. Returns (flags, arch names)."""
    flags: list[str] = []
    names: list[str] = []
    top = max(archs)
    for a in sorted(archs):
        if a == top:
            flags += ["-gencode", f"arch=compute_{a},code=[sm_{a},compute_{a}]"]
        else:
            flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        names.append(f"sm_{a}")
    names.append(f"compute_{top}")
    return flags, names


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_hash(src: Path, flags: list[str], version: str) -> str:
    h = hashlib.sha256()
    h.update(version.encode())
    h.update("\0".join(flags).encode())
    h.update(src.read_bytes())
    for hdr in sorted((HERE / "include").rglob("*")):
        if hdr.is_file():
            h.update(str(hdr.relative_to(HERE)).encode())
            h.update(hdr.read_bytes())
    return h.hexdigest()


_ENTRY = re.compile(rb"\.entry\s+([A-Za-z_][A-Za-z0-9_]*)")


def kernel_names(fatbin: bytes) -> list[str]:
    """extern "C" kernel names, read from the PTX entries embedded in the fatbin."""
    return sorted({m.group(1).decode() for m in _ENTRY.finditer(fatbin)})


def _public_mode() -> int:
    """0644 under the process umask (mkstemp creates files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o644 & ~umask


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _public_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def compile_one(nvcc: Path, src: Path, out: Path, flags: list[str]) -> tuple[float, str]:
    """Compile src into out (atomically). Returns (seconds, nvcc stderr)."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    t = time.perf_counter()
    cmd = [str(nvcc), "--fatbin", *flags, "-o", tmp, str(src)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise BuildError(f"nvcc failed on {src.name} (exit {r.returncode}):\n{' '.join(cmd)}\n{r.stderr}{r.stdout}")
        os.chmod(tmp, _public_mode())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return time.perf_counter() - t, r.stderr


def load_manifest(out_dir: Path) -> dict:
    p = out_dir / "manifest.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def parse_archs(text: str | None) -> list[int]:
    if not text:
        return list(DEFAULT_ARCHS)
    archs = []
    for part in re.split(r"[,;\s]+", text.strip()):
        if not part:
            continue
        part = part.removeprefix("sm_").removeprefix("compute_")
        if not part.isdigit():
            raise BuildError(f"bad architecture {part!r} (expected e.g. 80,86,89,90)")
        archs.append(int(part))
    if not archs:
        raise BuildError("empty architecture list")
    return sorted(set(archs))


def build(out_dir: Path, archs: list[int], jobs: int, force: bool = False, quiet: bool = False) -> dict:
    """Build every cuda/*.cu into out_dir; returns the manifest written."""
    sources = sorted(HERE.glob("*.cu"))
    if not sources:
        raise BuildError(f"no .cu files in {HERE}")
    nvcc = find_nvcc()
    version = nvcc_version(nvcc)
    gflags, arch_names = gencode_flags(archs)
    incs = [f"-I{d}" for d in include_dirs(nvcc)]
    flags = BASE_FLAGS + gflags
    out_dir.mkdir(parents=True, exist_ok=True)
    old = {e.get("source"): e for e in load_manifest(out_dir).get("fatbins", [])}

    def log(msg: str) -> None:
        if not quiet:
            print(f"[gsrq cuda] {msg}", file=sys.stderr, flush=True)

    log(f"nvcc {version} ({nvcc}), archs {', '.join(arch_names)}, {len(sources)} file(s), {jobs} job(s)")
    todo, entries = [], {}
    for src in sources:
        fat = out_dir / (src.stem + ".fatbin")
        sh = source_hash(src, flags, version)
        prev = old.get(src.name)
        if (
            not force
            and prev
            and prev.get("source_hash") == sh
            and fat.is_file()
            and sha256_file(fat) == prev.get("sha256")
        ):
            entries[src.name] = prev
            log(f"{src.name}: up to date")
        else:
            todo.append((src, fat, sh))

    t0 = time.perf_counter()
    with futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        running = {pool.submit(compile_one, nvcc, src, fat, flags + incs): (src, fat, sh) for src, fat, sh in todo}
        for i, fut in enumerate(futures.as_completed(running), 1):
            src, fat, sh = running[fut]
            secs, stderr = fut.result()
            data = fat.read_bytes()
            kernels = kernel_names(data)
            if not kernels:
                raise BuildError(f"{fat.name}: no kernel entries found in the fatbin")
            entries[src.name] = {
                "file": fat.name,
                "source": src.name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "source_hash": sh,
                "archs": arch_names,
                "kernels": kernels,
                "bytes": len(data),
            }
            warn = f" (nvcc: {stderr.strip()})" if stderr.strip() else ""
            log(f"[{i}/{len(todo)}] {src.name} -> {fat.name}: {len(data)} bytes, {len(kernels)} kernel(s), {secs:.1f} s{warn}")
    if todo:
        log(f"compiled {len(todo)} file(s) in {time.perf_counter() - t0:.1f} s")

    # drop fatbins whose source is gone
    live = {e["file"] for e in entries.values()}
    for stale in out_dir.glob("*.fatbin"):
        if stale.name not in live:
            stale.unlink()
    manifest = {
        "format": MANIFEST_FORMAT,
        "nvcc": version,
        "archs": arch_names,
        "fatbins": [entries[s.name] for s in sources],
    }
    _atomic_write(out_dir / "manifest.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE.parent / "python" / "gsrq" / "_kernels")
    p.add_argument("--archs", default=os.environ.get("GSRQ_CUDA_ARCHS"), help="comma list, default 80,86,89,90")
    p.add_argument("--jobs", type=int, default=int(os.environ.get("GSRQ_CUDA_JOBS", "0")) or (os.cpu_count() or 1))
    p.add_argument("--force", action="store_true", help="recompile even when up to date")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        build(args.out, parse_archs(args.archs), args.jobs, args.force, args.quiet)
    except BuildError as e:
        print(f"[gsrq cuda] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

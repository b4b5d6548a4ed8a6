"""Loader of gsrq's precompiled CUDA kernels, their launchers, and ``gsrq info``.

The fatbins (built by ``cuda/build.py``) live in ``gsrq/_kernels`` next to a
``manifest.json`` listing each file's sha256, architectures and kernel names.
``$GSRQ_KERNEL_DIR`` points the loader to another directory instead.

Kernels are loaded with cuda-python's ``cuda.core`` (``ObjectCode.from_fatbin``)
after the fatbin's sha256 is checked against the manifest, and launched on
torch's *current* stream (wrapped through the ``__cuda_stream__`` protocol),
so they order with the surrounding torch work and can be captured in CUDA
graphs. Every failure (no CUDA device, cuda-core missing, a missing or altered
fatbin, a kernel absent from the manifest) raises
:class:`gsrq.errors.KernelUnavailableError` with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsrq.errors import KernelUnavailableError, ShapeError

KERNEL_DIR_ENV = "GSRQ_KERNEL_DIR"
MANIFEST = "manifest.json"
_DEFAULT_SMEM = 48 * 1024


def kernel_dir() -> Path:
    """Directory holding the fatbins: ``$GSRQ_KERNEL_DIR`` if set, else ``gsrq/_kernels``."""
    override = os.environ.get(KERNEL_DIR_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent / "_kernels"


def load_manifest(directory: Path | None = None) -> dict[str, Any]:
    """Parse ``manifest.json`` of the kernel directory; raises KernelUnavailableError."""
    d = directory or kernel_dir()
    p = d / MANIFEST
    if not p.is_file():
        hint = " (build them with `make cuda`)" if os.environ.get(KERNEL_DIR_ENV) is None else ""
        raise KernelUnavailableError(f"no CUDA kernel manifest at {p}{hint}")
    try:
        manifest = json.loads(p.read_text())
        entries = manifest["fatbins"]
        for e in entries:
            for key in ("file", "sha256", "kernels", "archs"):
                if key not in e:
                    raise KeyError(key)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KernelUnavailableError(f"unreadable kernel manifest {p}: {exc!r}") from exc
    return manifest


def codebook_layout(books: Any, num_kv_heads: int, head_dim: int, bits: Any, name: str = "codebooks",
                    bits_name: str = "bits") -> tuple[int, ...]:
    """Check codebooks ``[H, C, M, Kc, D]`` against ``num_kv_heads`` / ``head_dim`` and a code width.

    ``bits`` None picks the narrowest width that holds ``Kc`` codes. Returns
    ``(H, C, M, Kc, D, bits, R)`` with ``R = ceil(C*M*bits/8)`` packed bytes per
    row; raises :class:`ShapeError` naming ``name`` (or ``bits_name``) otherwise.
    """
    if books.dim() != 5:
        raise ShapeError(f"{name} must be [H, C, M, Kc, D], got shape {tuple(books.shape)}")
    H, C, M, Kc, D = (int(v) for v in books.shape)
    if H not in (1, num_kv_heads):
        raise ShapeError(f"{name} have {H} heads; expected 1 or {num_kv_heads} (the KV heads)")
    if C * D != head_dim:
        raise ShapeError(f"{name} cover C*D={C * D} channels, head_dim is {head_dim}")
    need = max(1, (Kc - 1).bit_length())
    bits = need if bits is None else bits
    if isinstance(bits, bool) or not isinstance(bits, int) or not need <= bits <= 16:
        raise ShapeError(f"{bits_name}={bits!r} cannot hold codes of Kc={Kc} (need {need}..=16)")
    return H, C, M, Kc, D, bits, (C * M * bits + 7) // 8


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_fatbin(entry: dict[str, Any], directory: Path | None = None) -> bytes:
    """Read one manifest entry's fatbin and check its sha256; returns the bytes."""
    d = directory or kernel_dir()
    path = d / entry["file"]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KernelUnavailableError(f"cannot read fatbin {path}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise KernelUnavailableError(
            f"fatbin {path} has sha256 {digest[:16]}…, the manifest says {entry['sha256'][:16]}…: "
            "rebuild the kernels (`make cuda`) or fix $GSRQ_KERNEL_DIR"
        )
    return data


def _torch():
    import torch

    return torch


def _cuda_core() -> Any:
    """The cuda.core namespace (``cuda.core`` from 0.4 on, ``cuda.core.experimental`` before)."""
    try:
        import cuda.core as cc

        if hasattr(cc, "ObjectCode") and hasattr(cc, "launch"):
            return cc
    except ImportError:
        pass
    try:
        import cuda.core.experimental as cce
    except ImportError as exc:
        raise KernelUnavailableError(f"cuda-core is not importable ({exc}); pip install cuda-core") from exc
    return cce


class _TorchStream:
    """A torch stream seen through the ``__cuda_stream__`` protocol of cuda.core."""

    __slots__ = ("handle",)

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


@dataclass
class _DeviceKernels:
    device: Any  # cuda.core.Device
    objects: dict[str, Any] = field(default_factory=dict)  # fatbin file -> ObjectCode
    kernels: dict[str, Any] = field(default_factory=dict)  # kernel name -> Kernel
    smem_set: dict[str, int] = field(default_factory=dict)  # kernel name -> opted-in bytes
    binary: dict[str, int] = field(default_factory=dict)  # kernel name -> SASS version loaded (e.g. 90)


class KernelRegistry:
    """Loads fatbins lazily per device and hands out cuda.core kernels."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[int, _DeviceKernels] = {}
        self._manifest: dict[str, Any] | None = None
        self._dir: Path | None = None
        self._verified: dict[str, bytes] = {}
        self._local = threading.local()

    # --------------------------------------------------------------- lookup
    def _entries(self) -> tuple[Path, dict[str, Any]]:
        d = kernel_dir()
        if self._manifest is None or self._dir != d:
            self._manifest = load_manifest(d)
            self._dir = d
            self._verified = {}
        return d, self._manifest

    def entry_for(self, name: str) -> dict[str, Any]:
        _, manifest = self._entries()
        for e in manifest["fatbins"]:
            if name in e["kernels"]:
                return e
        raise KernelUnavailableError(f"kernel {name!r} is not in {self._dir / MANIFEST}")

    def _device(self, index: int) -> _DeviceKernels:
        Device = _cuda_core().Device
        dk = self._devices.get(index)
        if dk is None:
            try:
                dev = Device(index)
                dev.set_current()
            except Exception as exc:  # noqa: BLE001 - any driver error means: no kernels here
                raise KernelUnavailableError(f"cannot use CUDA device {index} through cuda.core: {exc}") from exc
            dk = _DeviceKernels(dev)
            self._devices[index] = dk
        if getattr(self._local, "current", None) != index:
            dk.device.set_current()
            self._local.current = index
        return dk

    def get(self, name: str, device_index: int) -> Any:
        """The cuda.core Kernel ``name`` for CUDA device ``device_index``."""
        torch = _torch()
        if not torch.cuda.is_available():
            raise KernelUnavailableError("no CUDA device: torch.cuda.is_available() is False")
        with self._lock:
            dk = self._device(device_index)
            k = dk.kernels.get(name)
            if k is not None:
                return k
            d, _ = self._entries()
            entry = self.entry_for(name)
            obj = dk.objects.get(entry["file"])
            if obj is None:
                data = self._verified.get(entry["file"])
                if data is None:
                    data = verify_fatbin(entry, d)
                    self._verified[entry["file"]] = data
                ObjectCode = _cuda_core().ObjectCode
                try:
                    if hasattr(ObjectCode, "from_fatbin"):
                        obj = ObjectCode.from_fatbin(data, name=entry["file"])
                    else:  # cuda-core < 0.3
                        obj = ObjectCode(data, "fatbin")
                except Exception as exc:  # noqa: BLE001
                    raise KernelUnavailableError(f"cannot load {d / entry['file']}: {exc}") from exc
                dk.objects[entry["file"]] = obj
            try:
                k = obj.get_kernel(name)
                # querying a per-device attribute loads the code for this device now (CUDA loads lazily),
                # so a fatbin without SASS/PTX for this GPU fails here, not at the first launch
                dk.binary[name] = int(k.attributes.binary_version)
            except Exception as exc:  # noqa: BLE001
                cap = torch.cuda.get_device_capability(device_index)
                raise KernelUnavailableError(
                    f"cannot get kernel {name!r} from {entry['file']} on sm_{cap[0]}{cap[1]} "
                    f"(fatbin archs: {', '.join(entry['archs'])}): {exc}"
                ) from exc
            dk.kernels[name] = k
            return k

    def ensure_shared_memory(self, name: str, device_index: int, nbytes: int) -> None:
        """Allow ``nbytes`` of dynamic shared memory for kernel ``name`` (opt-in above 48 KiB)."""
        if nbytes <= _DEFAULT_SMEM:
            return
        k = self.get(name, device_index)
        dk = self._devices[device_index]
        if dk.smem_set.get(name, 0) >= nbytes:
            return
        try:
            k.attributes.max_dynamic_shared_size_bytes = int(nbytes)
        except (AttributeError, TypeError):
            # this cuda.core exposes the attribute read-only: set it through the driver
            self._set_smem_driver(name, k, device_index, nbytes)
        except Exception as exc:  # noqa: BLE001
            raise KernelUnavailableError(f"cannot allow {nbytes} B of shared memory for {name}: {exc}") from exc
        dk.smem_set[name] = int(nbytes)

    @staticmethod
    def _set_smem_driver(name: str, k: Any, device_index: int, nbytes: int) -> None:
        try:
            from cuda.bindings import driver

            attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            handle = k.handle
            if isinstance(handle, driver.CUfunction):
                (err,) = driver.cuFuncSetAttribute(handle, attr, int(nbytes))
            else:  # cuda.core loads libraries: a context-independent CUkernel, set per device
                (err,) = driver.cuKernelSetAttribute(attr, int(nbytes), handle, driver.CUdevice(device_index))
        except Exception as exc:  # noqa: BLE001
            raise KernelUnavailableError(f"cannot allow {nbytes} B of shared memory for {name}: {exc}") from exc
        if err != driver.CUresult.CUDA_SUCCESS:
            raise KernelUnavailableError(f"cannot allow {nbytes} B of shared memory for {name}: {err}")

    def launch(self, name: str, device_index: int, grid, block, shmem: int, *args: Any) -> None:
        """Launch kernel ``name`` on torch's current stream of ``device_index``.

        Pointer arguments are Python ints (``tensor.data_ptr()``); scalars must
        be numpy scalars of the kernel's parameter type (np.int32, np.int64,
        np.float32).
        """
        cc = _cuda_core()
        torch = _torch()
        k = self.get(name, device_index)
        self.ensure_shared_memory(name, device_index, shmem)
        stream = _TorchStream(torch.cuda.current_stream(device_index).cuda_stream)
        try:
            # the device's primary context (shared with torch) must be current for the launch
            with torch.cuda.device(device_index):
                cc.launch(stream, cc.LaunchConfig(grid=grid, block=block, shmem_size=int(shmem)), k, *args)
        except Exception as exc:  # noqa: BLE001
            raise KernelUnavailableError(f"launch of {name} failed: {exc}") from exc


REGISTRY = KernelRegistry()


def kernels_available(device: Any = None) -> bool:
    """True when the gsrq kernels can be loaded on ``device`` (a torch device or index)."""
    try:
        torch = _torch()
        if not torch.cuda.is_available():
            return False
        idx = _device_index(device)
        REGISTRY.get("gsrq_unpack_codes", idx)
        return True
    except KernelUnavailableError:
        return False


def _device_index(device: Any) -> int:
    torch = _torch()
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    d = torch.device(device)
    if d.type != "cuda":
        raise KernelUnavailableError(f"gsrq kernels run on CUDA devices, got {d}")
    return d.index if d.index is not None else torch.cuda.current_device()


# ---------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------


def _np():
    import numpy as np

    return np


def _check_cuda_tensor(name: str, t: Any, dtype: Any = None) -> None:
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise ShapeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_cuda:
        raise KernelUnavailableError(f"{name} is on {t.device}; the CUDA kernels need CUDA tensors")
    if dtype is not None and t.dtype != dtype:
        raise ShapeError(f"{name} must be {dtype}, got {t.dtype}")


def unpack_codes_cuda(packed: Any, bits: int, count: int) -> Any:
    """GPU unpacking: uint8 ``[..., nbytes]`` -> uint16 codes ``[..., count]`` (docs/format.md).

    ``nbytes`` must be at least ``ceil(count * bits / 8)``; extra bytes are ignored.
    """
    torch = _torch()
    np = _np()
    _check_cuda_tensor("packed", packed, torch.uint8)
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ShapeError(f"bits must be an integer in 1..=16, got {bits!r}")
    if not isinstance(count, int) or count < 0:
        raise ShapeError(f"count must be a non-negative integer, got {count!r}")
    if packed.dim() == 0:
        raise ShapeError("packed must have at least one dimension")
    need = (count * bits + 7) // 8
    nbytes = packed.shape[-1]
    if nbytes < need:
        raise ShapeError(f"packed rows hold {nbytes} bytes, {count} codes of {bits} bits need {need}")
    lead = packed.shape[:-1]
    rows = int(np.prod(lead)) if lead else 1
    out = torch.empty(*lead, count, dtype=torch.uint16, device=packed.device)
    total = rows * count
    if total == 0:
        return out
    src = packed.contiguous()
    threads = 256
    blocks = min((total + threads - 1) // threads, 16384)  # grid-stride loop beyond
    REGISTRY.launch(
        "gsrq_unpack_codes",
        _device_index(packed.device),
        (blocks,),
        (threads,),
        0,
        src.data_ptr(),
        out.data_ptr(),
        np.int64(rows),
        np.int32(nbytes),
        np.int32(count),
        np.int32(bits),
    )
    return out


_ENCODE_KERNELS = {"float32": "gsrq_rq_encode_f32", "float16": "gsrq_rq_encode_f16", "bfloat16": "gsrq_rq_encode_bf16"}


def encode_shared_bytes(D: int, CM: int, tpw: int) -> int:
    """Dynamic shared memory of gsrq_rq_encode_* (see cuda/encode.cu)."""
    tok = 8 * tpw
    return tok * D * 4 + 32 * (D + 1) * 4 + tok * CM * 2


def encode_plan(D: int, CM: int) -> int | None:
    """Tokens per warp for the encode kernel, or None if no variant fits 48 KiB of shared memory."""
    for tpw in (4, 2, 1):
        if encode_shared_bytes(D, CM, tpw) <= _DEFAULT_SMEM:
            return tpw
    return None


ROWS_KERNEL_MAX = 1024  # rows (tokens x KV heads) up to which the one-block-per-row kernel is used


def rq_encode_cuda(
    x: Any, codebooks: Any, bits: int | None = None, norms: Any = None, variant: str = "auto"
) -> Any:
    """Fused greedy RQ encoding into packed rows on the GPU.

    x: ``[N, Hkv, head_dim]`` fp32 / fp16 / bf16 (CUDA). codebooks:
    ``[H, C, M, Kc, D]`` (H = 1 or Hkv, ``C * D == head_dim``). bits: code
    width (default ``ceil(log2 Kc)``). norms: optional precomputed float32
    ``[H, C, M, Kc]`` squared codeword norms. Returns uint8 ``[N, Hkv, R]``,
    ``R = ceil(C*M*bits/8)``, codes ordered ``c*M + m`` — the rows of
    ``pack_codes_torch(rq_encode_torch(...))``.

    variant: ``"tiled"`` (codebooks streamed through shared memory, 8-32
    tokens per block: prefill), ``"rows"`` (one block per token and head:
    decode steps) or ``"auto"`` (rows when ``N * Hkv <= ROWS_KERNEL_MAX``).
    Both give identical codes.
    """
    torch = _torch()
    np = _np()
    _check_cuda_tensor("x", x)
    _check_cuda_tensor("codebooks", codebooks)
    if x.dim() != 3:
        raise ShapeError(f"x must be [N, Hkv, head_dim], got shape {tuple(x.shape)}")
    name = _ENCODE_KERNELS.get(str(x.dtype).removeprefix("torch."))
    if name is None:
        raise ShapeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    N, Hkv, hd = x.shape
    H, C, M, Kc, D, bits, R = codebook_layout(codebooks, Hkv, hd, None if bits is None else int(bits))
    if variant not in ("auto", "tiled", "rows"):
        raise ShapeError(f"variant must be 'auto', 'tiled' or 'rows', got {variant!r}")
    tpw = encode_plan(D, C * M)
    if variant == "auto":
        variant = "rows" if N * Hkv <= ROWS_KERNEL_MAX or tpw is None else "tiled"
    if variant == "tiled" and tpw is None:
        raise KernelUnavailableError(f"encode kernel: D={D}, C*M={C * M} do not fit in shared memory")
    out = torch.empty(N, Hkv, R, dtype=torch.uint8, device=x.device)
    if N == 0:
        return out
    cb = codebooks.float().contiguous()
    if norms is None:
        norms = (cb**2).sum(-1)
    norms = norms.float().contiguous()
    xc = x.contiguous()
    common = (
        xc.data_ptr(), cb.data_ptr(), norms.data_ptr(), out.data_ptr(), np.int64(N), np.int32(Hkv), np.int32(H),
        np.int32(C), np.int32(M), np.int32(Kc), np.int32(D), np.int32(bits), np.int32(R),
    )
    if variant == "rows":
        REGISTRY.launch(
            name.replace("gsrq_rq_encode_", "gsrq_rq_encode_rows_"),
            _device_index(x.device),
            (N, Hkv),
            (256,),
            D * 4 + C * M * 2,
            *common,
        )
        return out
    tok = 8 * tpw
    REGISTRY.launch(
        name,
        _device_index(x.device),
        ((N + tok - 1) // tok, Hkv),
        (256,),
        encode_shared_bytes(D, C * M, tpw),
        *common,
        np.int32(tpw),
    )
    return out


# ---------------------------------------------------------------------------
# gsrq info
# ---------------------------------------------------------------------------


def info() -> dict[str, Any]:
    """What ``gsrq info`` prints, as a dict (works without a GPU)."""
    out: dict[str, Any] = {"kernel_dir": str(kernel_dir()), "kernel_dir_env": os.environ.get(KERNEL_DIR_ENV)}
    try:
        torch = _torch()
        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
        out["torch"] = None
    try:
        import cuda.core

        out["cuda_core"] = cuda.core.__version__
    except ImportError as exc:
        out["cuda_core"] = None
        out["cuda_core_error"] = str(exc)
    if has_gpu:
        idx = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        out["gpu"] = {"index": idx, "name": torch.cuda.get_device_name(idx), "capability": f"{cap[0]}.{cap[1]}"}
    else:
        out["gpu"] = None
    fatbins = []
    try:
        manifest = load_manifest()
        out["nvcc"] = manifest.get("nvcc")
        out["archs"] = manifest.get("archs")
        for e in manifest["fatbins"]:
            rec = {"file": e["file"], "kernels": e["kernels"], "archs": e["archs"], "bytes": e.get("bytes")}
            try:
                verify_fatbin(e)
                rec["sha256_ok"] = True
            except KernelUnavailableError as exc:
                rec["sha256_ok"] = False
                rec["error"] = str(exc)
            if has_gpu and rec["sha256_ok"]:
                try:
                    for k in e["kernels"]:
                        REGISTRY.get(k, out["gpu"]["index"])
                    rec["loaded"] = True
                    sass = {REGISTRY._devices[out["gpu"]["index"]].binary.get(k) for k in e["kernels"]}
                    rec["sass"] = sorted(f"sm_{v}" for v in sass if v)
                except KernelUnavailableError as exc:
                    rec["loaded"] = False
                    rec["error"] = str(exc)
            else:
                rec["loaded"] = False
                if not has_gpu:
                    rec.setdefault("error", "no CUDA device")
            fatbins.append(rec)
    except KernelUnavailableError as exc:
        out["manifest_error"] = str(exc)
    out["fatbins"] = fatbins
    return out


def add_arguments(parser: Any) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: Any) -> int:
    rep = info()
    if getattr(args, "json", False):
        print(json.dumps(rep, indent=1))
        return 0
    gpu = rep["gpu"]
    print(f"GPU:            {gpu['name']} (compute capability {gpu['capability']})" if gpu else "GPU:            none (no CUDA device visible to torch)")
    print(f"torch:          {rep.get('torch')} (CUDA {rep.get('torch_cuda')})")
    print(f"cuda-core:      {rep.get('cuda_core') or 'not installed'}")
    src = f" (from ${KERNEL_DIR_ENV})" if rep["kernel_dir_env"] else ""
    print(f"kernel dir:     {rep['kernel_dir']}{src}")
    if "manifest_error" in rep:
        print(f"kernels:        unavailable: {rep['manifest_error']}")
        return 0
    print(f"built with:     nvcc {rep.get('nvcc')} for {', '.join(rep.get('archs') or [])}")
    for f in rep["fatbins"]:
        state = f"loaded ({', '.join(f.get('sass', []))})" if f["loaded"] else f"not loaded ({f.get('error', '')})"
        sha = "sha256 ok" if f["sha256_ok"] else "SHA256 MISMATCH"
        print(f"  {f['file']}: {f['bytes']} bytes, {sha}, {state}")
        for k in f["kernels"]:
            print(f"      {k}")
    return 0


if __name__ == "__main__":  # python -m gsrq.kernels [--json]: the same report as `gsrq info`
    import argparse
    import sys

    _p = argparse.ArgumentParser(prog="python -m gsrq.kernels", description="GPU and CUDA kernels found")
    add_arguments(_p)
    sys.exit(run(_p.parse_args()))

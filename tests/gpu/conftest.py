"""GPU tests: skipped (not failed) without a CUDA device or below compute capability 8.0.

The fatbins ship SASS for sm_80, sm_86, sm_89 and sm_90 (+ PTX), so every
device from Ampere on runs them; older devices skip. A GPU that should run the
kernels but cannot load them fails loudly (the `kernels` fixture).
"""

from __future__ import annotations

import pytest
import torch

MIN_CAPABILITY = (8, 0)


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    cap = torch.cuda.get_device_capability()
    if cap < MIN_CAPABILITY:
        return f"compute capability {cap[0]}.{cap[1]} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _skip_reason()
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def kernels():
    """The gsrq.kernels module with every kernel loaded on the current device (fails if they cannot load)."""
    from gsrq import kernels as k

    idx = torch.cuda.current_device()
    for entry in k.load_manifest()["fatbins"]:
        for name in entry["kernels"]:
            k.REGISTRY.get(name, idx)
    return k


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

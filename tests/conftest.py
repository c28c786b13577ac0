"""Shared fixtures: the array devices and CPU ISAs every kernel test runs on."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# The cpu_isa fixture deliberately holds one ISA for all examples of a test.
settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile("ci")


def _cuda_skip_reason(library: str) -> str | None:
    from recserve import kernels

    info = kernels.build_info()
    if not info["cuda"]:
        return "recserve was built without CUDA kernels (RECSERVE_CUDA=OFF or no nvcc at build time)"
    if info["cuda_devices"] == 0:
        return "no CUDA device visible on this machine"
    try:
        if library == "cupy":
            import cupy  # noqa: F401
        else:
            import torch

            if not torch.cuda.is_available():
                return "torch is installed without CUDA support"
    except ImportError:
        return f"{library} is not installed"
    return None


class Device:
    """Moves NumPy test data to one array library and back."""

    def __init__(self, name: str):
        self.name = name
        self.is_cuda = name != "numpy"

    def put(self, a):
        if a is None or self.name == "numpy":
            return a
        if self.name == "cupy":
            import cupy

            return cupy.asarray(a)
        import torch

        return torch.as_tensor(np.ascontiguousarray(a), device="cuda")

    def get(self, a) -> np.ndarray:
        if self.name == "numpy":
            return np.asarray(a)
        if self.name == "cupy":
            import cupy

            assert isinstance(a, cupy.ndarray), f"expected a CuPy array back, got {type(a)}"
            return cupy.asnumpy(a)
        import torch

        assert isinstance(a, torch.Tensor) and a.is_cuda, f"expected a CUDA tensor back, got {type(a)}"
        return a.cpu().numpy()

    def __repr__(self) -> str:
        return self.name


@pytest.fixture(params=["numpy", "cupy", "torch"])
def device(request) -> Device:
    if request.param != "numpy":
        reason = _cuda_skip_reason(request.param)
        if reason:
            pytest.skip(reason)
    return Device(request.param)


@pytest.fixture(params=["cupy", "torch"])
def cuda_device(request) -> Device:
    """A CUDA array library only: for behaviour that exists on the GPU path alone."""
    reason = _cuda_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return Device(request.param)


@pytest.fixture(params=["scalar", "avx2", "avx512", "avx512bf16", "amx"])
def cpu_isa(request):
    """Runs a CPU test once per SIMD path this CPU supports, then restores the best."""
    from recserve import _C

    supported = _C.build_info()["cpu_isas_supported"]
    if request.param not in supported:
        pytest.skip(f"this CPU does not support {request.param} (supports {supported})")
    _C._set_isa(request.param)
    yield request.param
    _C._set_isa("best")


@pytest.fixture
def expect_cuda_build() -> bool:
    return os.environ.get("RECSERVE_EXPECT_CUDA_BUILD") == "1"


@pytest.fixture
def cpu_isa_best():
    """The default (best) CPU ISA, for tests not parametrised over ISAs."""
    from recserve import _C

    _C._set_isa("best")
    return _C.build_info()["cpu_isa"]

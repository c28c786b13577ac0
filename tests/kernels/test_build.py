"""The build: what build_info reports, CPU ISA selection, and CUDA-free imports."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recserve import _C, kernels


def _needed_libraries(module) -> list[str]:
    """DT_NEEDED entries of a compiled module (what the loader must find)."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    out = subprocess.run([readelf, "-d", module.__file__], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].split("]", 1)[0] for line in out.splitlines() if "(NEEDED)" in line]


def test_build_info_reports_the_contract_keys():
    info = kernels.build_info()
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list)
    assert info["version"] == "0.1.0"
    assert info["cpu_isa"] in info["cpu_isas_supported"]
    assert info["cpu_threads"] >= 1
    if not info["cuda"]:
        assert info["cuda_archs"] == [] and info["cuda_devices"] == 0


def test_cuda_build_when_ci_asks_for_one(expect_cuda_build):
    info = kernels.build_info()
    if expect_cuda_build:
        assert info["cuda"], f"RECSERVE_EXPECT_CUDA_BUILD=1 but the CUDA kernels did not load: {info}"
        assert info["cuda_archs"], "a CUDA build must list its architectures"
        assert "cuda_error" not in info
    else:
        assert "cuda_error" not in info, info.get("cuda_error")


def test_cpu_module_links_no_cuda_library():
    needed = _needed_libraries(_C)
    assert not [lib for lib in needed if "cuda" in lib.lower()], needed


def test_cuda_module_links_cudart_statically_and_counts_no_device_without_a_driver():
    if not kernels.build_info()["cuda"]:
        pytest.skip("recserve was built without CUDA kernels")
    from recserve import _C_cuda

    needed = _needed_libraries(_C_cuda)
    assert not [lib for lib in needed if "cudart" in lib or lib.startswith("libcuda.")], needed
    has_driver = any(Path(p).exists() for p in ("/dev/nvidiactl", "/proc/driver/nvidia"))
    if not has_driver:
        assert _C_cuda.device_count() == 0


def test_cuda_array_without_cuda_build_gets_an_actionable_error():
    if kernels.build_info()["cuda"]:
        pytest.skip("this build has CUDA kernels")
    from recserve.kernels import _cuda

    with pytest.raises(RuntimeError, match="rebuild with RECSERVE_CUDA=ON"):
        _cuda.topk_inner_product(None, None, 1)


def test_isa_can_be_lowered_and_restored():
    supported = _C.build_info()["cpu_isas_supported"]
    try:
        for isa in supported:
            _C._set_isa(isa)
            assert _C._isa() == isa
        with pytest.raises(ValueError, match="not supported on this CPU"):
            _C._set_isa("sse9")
    finally:
        _C._set_isa("best")
    assert _C._isa() == supported[-1]


def _cmake() -> str:
    beside_python = Path(sys.executable).with_name("cmake")
    found = str(beside_python) if beside_python.exists() else shutil.which("cmake")
    if found is None:
        pytest.skip("cmake is not installed")
    return found


def _configure(tmp_path, *defines: str) -> subprocess.CompletedProcess:
    import pybind11

    repo = Path(__file__).resolve().parents[2]
    if not (repo / "CMakeLists.txt").exists():
        pytest.skip("the tests are not running from a source checkout")
    return subprocess.run(
        [_cmake(), "-S", str(repo), "-B", str(tmp_path / "build"), f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
         f"-DPython_EXECUTABLE={sys.executable}", *defines],
        capture_output=True, text=True, timeout=300,
    )


def test_cmake_rejects_an_unknown_cuda_mode(tmp_path):
    result = _configure(tmp_path, "-DRECSERVE_CUDA=MAYBE")
    assert result.returncode != 0
    assert "RECSERVE_CUDA must be AUTO, ON or OFF, got 'MAYBE'" in result.stdout + result.stderr


def test_cmake_off_builds_the_cpu_module_only(tmp_path):
    result = _configure(tmp_path, "-DRECSERVE_CUDA=OFF")
    assert result.returncode == 0, result.stderr
    assert "recserve: CUDA kernels OFF (RECSERVE_CUDA=OFF)" in result.stdout


def test_cmake_on_without_nvcc_fails_with_the_fix(tmp_path):
    if shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("a CUDA compiler is on this machine, so RECSERVE_CUDA=ON would succeed")
    result = _configure(tmp_path, "-DRECSERVE_CUDA=ON")
    assert result.returncode != 0
    assert "RECSERVE_CUDA=ON but no CUDA compiler was found" in result.stdout + result.stderr

"""Kernels compiled one instantiation at a time into a disk cache, and warmed up in parallel.

NVRTC runs here without a GPU (the ``test`` extra installs it): these tests compile real
instantiations into a temporary cache (``NNFAST_KERNEL_CACHE``). Loading the binaries needs a
device; the per-device function cache is checked with a stand-in ``cupy`` module that records
what would be loaded.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from nnfast.backends import cuda_compile, cuda_launch, cupy_backend

CHEAP = ["sgd_multi<float>", "act_forward<double, 1>", "ce_prepare"]


def _require_nvrtc():
    try:
        cuda_compile.nvrtc_version()
    except Exception as err:
        pytest.skip(f"NVRTC is not usable here: {err}")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    _require_nvrtc()
    monkeypatch.setenv("NNFAST_KERNEL_CACHE", str(tmp_path / "kernels"))
    return tmp_path / "kernels"


def test_one_instantiation_is_compiled_and_then_read_from_the_cache(cache, monkeypatch):
    compiled = cuda_compile.compile_kernel("optim.cu", "sgd_multi<float>", "sm_90")
    assert compiled.path.parent == cache and compiled.path.suffix == ".cubin"
    image = compiled.path.read_bytes()
    assert compiled.lowered.startswith("_Z") and compiled.lowered.encode() in image
    assert b"adam_multi" not in image  # only the instantiation asked for

    def no_nvrtc():
        raise AssertionError("compiled again instead of reading the cache")

    monkeypatch.setattr(cuda_compile, "_nvrtc", no_nvrtc)
    assert cuda_compile.compile_kernel("optim.cu", "sgd_multi<float>", "sm_90") == compiled


def test_the_cache_key_holds_the_source_the_arch_and_the_name(cache, monkeypatch):
    paths = {cuda_compile.compile_kernel("optim.cu", n, a).path
             for n, a in [("sgd_multi<float>", "sm_90"), ("sgd_multi<float>", "sm_80"),
                          ("sgd_multi<double>", "sm_90"), ("sgd_multi<float>", "compute_80")]}
    assert len(paths) == 4 and any(p.suffix == ".ptx" for p in paths)
    edited = cuda_compile._source("optim.cu") + "\n// an edit\n"
    monkeypatch.setattr(cuda_compile, "_source", lambda file: edited)
    assert cuda_compile.cached("optim.cu", "sgd_multi<float>", "sm_90") is None


def test_a_compile_error_carries_the_nvrtc_log(cache, monkeypatch):
    monkeypatch.setattr(cuda_compile, "_source", lambda file: "template <typename T> __global__ void k(T x) { y; }")
    with pytest.raises(cuda_compile.KernelCompileError,
                       match=r'(?s)k<float> of optim.cu for sm_90.*identifier "y" is undefined'):
        cuda_compile.compile_kernel("optim.cu", "k<float>", "sm_90")
    assert not any(cache.glob("*.name"))


@pytest.mark.parametrize("processes", [1, 2])
def test_warm_up_fills_the_cache(cache, processes):
    names = [*CHEAP[:2], ("cross_entropy.cu", CHEAP[2])]
    first = cuda_compile.warm_up(names, processes=processes, arch="sm_90")
    assert (first["kernels"], first["compiled"], first["cached"], first["arch"]) == (3, 3, 0, "sm_90")
    for name in CHEAP:
        assert cuda_compile.cached(cuda_compile.kernel_file(name), name, "sm_90") is not None
    again = cuda_compile.warm_up(CHEAP, processes=processes, arch="sm_90")
    assert (again["compiled"], again["cached"]) == (0, 3)
    assert len(list(cache.glob("*.cubin"))) == 3


def test_warm_up_names_are_checked(cache):
    with pytest.raises(ValueError, match=r"names: 'gemm<int>' is not an instantiation"):
        cuda_compile.warm_up(["gemm<int>"], arch="sm_90")
    with pytest.raises(ValueError, match=r"names: 'ce_prepare' is not an instantiation of kernels/optim.cu"):
        cuda_compile.warm_up([("optim.cu", "ce_prepare")], arch="sm_90")
    with pytest.raises(TypeError, match="names: expected a list"):
        cuda_compile.warm_up("ce_prepare", arch="sm_90")
    assert cupy_backend.warm_up is cuda_compile.warm_up


def test_warm_up_of_everything_lists_every_instantiation(cache, monkeypatch):
    seen = []
    monkeypatch.setattr(cuda_compile, "compile_kernel", lambda file, name, arch: seen.append((file, name)))
    result = cuda_compile.warm_up(processes=1, arch="sm_90")
    assert result["kernels"] == result["compiled"] == cuda_launch.total_instantiations() == len(set(seen))


def test_arch_for_a_device():
    _require_nvrtc()
    assert cuda_compile.arch_for("90") == "sm_90" and cuda_compile.arch_for(80) == "sm_80"
    assert cuda_compile.arch_for(95) == "compute_90"  # unknown to this NVRTC: PTX for the driver
    with pytest.raises(cuda_compile.KernelCompileError, match="compute capability 10"):
        cuda_compile.arch_for(10)


def test_functions_are_kept_per_device(cache, monkeypatch):
    """The same instantiation is loaded once per device, compiled once (the arch is the same)."""
    device = {"id": 0}
    loads = []

    class RawModule:
        def __init__(self, path):
            self.path, self.device = path, device["id"]
            loads.append(self)

        def get_function(self, name):
            return ("function", self.device, self.path, name)

    fake = types.ModuleType("cupy")
    fake.RawModule = RawModule
    fake.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=lambda: device["id"]),
        Device=lambda d: types.SimpleNamespace(compute_capability="90"))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cupy_backend, "_functions", {})
    monkeypatch.setattr(cupy_backend, "_arch", {})
    first = cupy_backend._function("optim.cu", "sgd_multi<float>")
    assert cupy_backend._function("optim.cu", "sgd_multi<float>") is first
    device["id"] = 1
    second = cupy_backend._function("optim.cu", "sgd_multi<float>")
    assert [m.device for m in loads] == [0, 1] and first[1:] != second[1:] and first[2:] == second[2:]
    assert first[3].startswith("_Z") and first[3].encode() in Path(first[2]).read_bytes()

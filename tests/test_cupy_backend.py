"""The CuPy backend: the op table against the NumPy reference on a GPU; clean failure without one.

Tests marked ``gpu`` need a CUDA device and skip with the reason otherwise. The
others always run: they check that nnfast imports and reports clearly where
CuPy or a GPU is missing, and that the launch configuration module never
imports CuPy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from nnfast.backends import backend_for, cuda_launch
from nnfast.backends.cupy_backend import cupy_unavailable_reason

from op_table import OPS, assert_matches_reference

REPO = Path(__file__).resolve().parents[1]
REASON = cupy_unavailable_reason()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(REASON is not None, reason=f"no usable GPU: {REASON}")
no_gpu_only = pytest.mark.skipif(REASON is None, reason="a GPU is usable here")

DTYPES = [np.float32, np.float64]


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=300, check=False)


# ===================================================================== no GPU needed
@no_gpu_only
def test_unavailable_reason_says_what_is_missing():
    assert isinstance(REASON, str) and REASON
    assert any(word in REASON for word in ("CuPy", "driver", "device", "NVRTC", "CUDA")), REASON


def test_unavailable_reason_without_cupy_names_the_install_command():
    proc = _run_python("""
        import sys
        sys.modules["cupy"] = None  # import cupy -> ImportError
        from nnfast.backends.cupy_backend import cupy_unavailable_reason
        print(cupy_unavailable_reason())
    """)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "CuPy is not installed" in out and 'pip install "nnfast[cuda12]"' in out and "[cuda13]" in out


def test_import_nnfast_without_cupy():
    proc = _run_python("""
        import sys
        sys.modules["cupy"] = None
        sys.modules["cupy_backends"] = None
        import nnfast
        names = nnfast.available_backends()
        assert "cupy" not in names and "numpy" in names, names
        from nnfast.backends import cuda_launch
        assert cuda_launch.gemm_launch(5, 7, 3, "float32").kernel.startswith("gemm<float")
        try:
            nnfast.set_backend("cupy")
        except nnfast.BackendError as err:
            print("BackendError:", err)
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "BackendError:" in proc.stdout and "CuPy is not installed" in proc.stdout, proc.stdout
    assert proc.stdout.strip().endswith("ok")


@no_gpu_only
def test_env_cupy_without_gpu_raises_backend_error():
    proc = _run_python("""
        import nnfast
        try:
            nnfast.get_backend()
        except nnfast.BackendError as err:
            print("BackendError:", err)
        else:
            print("no error")
    """, NNFAST_BACKEND="cupy")
    assert proc.returncode == 0, proc.stderr
    assert "BackendError:" in proc.stdout, proc.stdout
    assert "cupy" in proc.stdout and REASON in proc.stdout, proc.stdout


def test_cuda_launch_never_imports_cupy():
    proc = _run_python("""
        import sys
        from nnfast.backends import cuda_launch as cl
        for f in cl.KERNEL_FILES:
            cl.load_source(f)
            cl.name_expressions(f)
        cl.gemm_launch(4096, 4096, 4096, "float32", activation="relu", aligned=True)
        cl.cross_entropy_launches(32768, 32000, "float32", "mean")
        cl.softmax_launch(3, 50000, "float64", log=True)
        cl.bias_act_backward_launch(256, 10, "float32", "gelu", has_bias=True)
        cl.optimizer_launch("adam", 12, "float32")
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("cupy", "cupy_backends", "cupyx"))
        print("imported:", bad)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "imported: []" in proc.stdout, proc.stdout


def test_kernel_dir_and_sources():
    directory = cuda_launch.kernel_dir()
    assert (directory / "linear.cu").is_file()
    for file in cuda_launch.KERNEL_FILES:
        text = cuda_launch.load_source(file)
        assert '#include "' not in text, "local includes are inlined"
        assert "namespace nnf" in text


# ===================================================================== GPU
def _tol(dtype, length=1):
    if dtype == np.float64:
        return dict(rtol=1e-9, atol=1e-12 * max(length, 1))
    return dict(rtol=1e-4, atol=1e-5 * np.sqrt(max(length, 1)))


def _close(got, expected, dtype, length=1, what=""):
    expected = np.asarray(expected)
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype}, expected {expected.dtype}"
    scale = max(float(np.abs(expected).max()) if expected.size else 0.0, 1.0)
    tol = _tol(dtype, length)
    np.testing.assert_allclose(got, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=what)


@pytest.fixture(scope="module")
def gb():
    return backend_for("cupy")


@pytest.fixture(scope="module")
def ref():
    return backend_for("numpy")


# Sizes that matter to the CUDA kernels: partial tiles, vector and scalar tails, rows longer than a
# block (every row-thread count), several optimizer chunks.
KERNEL_SHAPES = {
    "linear_forward": [(1, 1, 1), (1, 7, 3), (5, 3, 11), (13, 17, 7), (4, 67, 5), (33, 9, 65), (64, 784, 256),
                       (130, 20, 140), (257, 129, 10), (300, 513, 257)],
    "activation_forward": [(1,), (7,), (3, 5), (2, 3, 4), (1023,), (5, 4097)],
    "softmax": [(1, 1), (3, 7), (5, 1030), (2, 5000), (2, 17000), (3, 50000)],
    "log_softmax": [(1, 1), (3, 7), (5, 1030), (2, 5000), (2, 17000), (3, 50000)],
    "softmax_cross_entropy": [(1, 1), (1, 5), (7, 1), (6, 10), (17, 33), (3, 1029), (5, 4100), (4, 32000),
                              (3, 50000)],
    "sgd_update": [(3, 5), (5,), (1, 1), (17, 4), (4097,), (3, 4096)],
    "adam_update": [(3, 5), (5,), (1, 1), (17, 4), (4097,), (3, 4096)],
}


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_op_table_on_the_gpu(gb, ref, op, dtype):
    """Every entry of the tests' op driver, at the kernels' sizes and at the driver's own."""
    rng = np.random.default_rng(sum(map(ord, op.name)))
    for shapes in (KERNEL_SHAPES[op.ops[0]], None):
        for sample in op.samples(rng, np.dtype(dtype), shapes=shapes):
            assert_matches_reference(op, gb, ref, sample, dtype, "cupy")


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_activation_on_a_misaligned_view(gb, ref, dtype):
    x = np.random.default_rng(2).standard_normal(1001).astype(dtype)
    dev = gb.asarray(x)[1:]  # 4 or 8 bytes past a 16-byte boundary
    got = gb.to_numpy(gb.activation_forward(dev, "gelu"))
    _close(got, ref.activation_forward(x[1:], "gelu"), dtype)


@gpu
@needs_gpu
def test_linear_large_tiles_match_cublas(gb):
    import cupy

    rng = np.random.default_rng(4)
    x = cupy.asarray(rng.standard_normal((1536, 1030)).astype(np.float32))
    W = cupy.asarray(rng.standard_normal((1030, 1536)).astype(np.float32))
    y, _ = gb.linear_forward(x, W, None, "identity")
    expected = cupy.matmul(x, W)
    assert float(cupy.abs(y - expected).max()) < 1e-3 * float(cupy.abs(expected).max())


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_on_a_misaligned_view(gb, ref, log, dtype):
    x = (np.random.default_rng(5).standard_normal((4, 33)) * 4).astype(dtype)
    misaligned = gb.asarray(np.concatenate([[0], x.ravel()]).astype(dtype))[1:].reshape(4, 33)
    _close(gb.to_numpy((gb.log_softmax if log else gb.softmax)(misaligned)),
           (ref.log_softmax if log else ref.softmax)(x), dtype, 33, "misaligned")


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_cross_entropy_edge_cases(gb, ref, dtype):
    rng = np.random.default_rng(7)
    cases = [
        (np.array([[1e4, -1e4, 0.0, 9999.0], [-1e4, -1e4, -1e4, -1e4 + 1]], dtype), np.array([3, 0]), {}),
        (rng.standard_normal((3, 4)).astype(dtype), np.full(3, -100), {}),  # every row ignored: 0, not NaN
        (rng.standard_normal((5, 4)).astype(dtype), np.array([0, 2, 2, 3, 1]), {"ignore_index": 2}),
        (rng.standard_normal((4, 6)).astype(dtype), np.array([5, 0, 1, 2], dtype=np.uint8), {}),
    ]
    for logits, labels, options in cases:
        loss, grad = gb.softmax_cross_entropy(gb.asarray(logits), gb.asarray(labels), **options)
        loss_ref, grad_ref = ref.softmax_cross_entropy(logits, labels, **options)
        _close(gb.to_numpy(loss), loss_ref, dtype, logits.shape[1], f"{options} loss")
        _close(gb.to_numpy(grad), grad_ref, dtype, logits.shape[1], f"{options} grad")


@gpu
@needs_gpu
@pytest.mark.parametrize("read", ["float", "to_numpy", "nf_to_numpy", "synchronize", "get", "next_call"])
def test_bad_label_raises_and_the_context_stays_usable(gb, ref, read):
    import cupy

    rng = np.random.default_rng(8)
    logits = rng.standard_normal((6, 5)).astype(np.float32)
    bad = np.array([0, 1, -100, 7, 2, -3])  # 7 at row 3 is the first bad label
    loss, grad = gb.softmax_cross_entropy(gb.asarray(logits), gb.asarray(bad))
    with pytest.raises(ValueError, match=r"got 7 at row 3"):
        if read == "float":
            float(loss)
        elif read == "to_numpy":
            gb.to_numpy(loss)
        elif read == "nf_to_numpy":
            import nnfast

            nnfast.to_numpy(loss)
        elif read == "synchronize":
            gb.synchronize()
        elif read == "get":
            loss.get()
        else:
            cupy.cuda.get_current_stream().synchronize()  # the first call has finished
            gb.softmax_cross_entropy(gb.asarray(logits), gb.asarray(np.zeros(6, np.int64)))
    # The error is raised once; the device and the backend keep working.
    import nnfast

    good = np.array([0, 1, 2, 3, 4, 0])
    loss, grad = gb.softmax_cross_entropy(gb.asarray(logits), gb.asarray(good))
    expected = ref.softmax_cross_entropy(logits, good)[0]
    _close(gb.to_numpy(loss), expected, np.float32, 5)
    _close(nnfast.to_numpy(loss), expected, np.float32, 5)
    _close(np.float32(float(loss)), expected, np.float32, 5)
    assert float(cupy.asarray([1.0, 2.0]).sum()) == 3.0
    gb.synchronize()


@gpu
@needs_gpu
def test_auto_picks_cupy_when_a_gpu_answers():
    assert backend_for("auto").name == "cupy"


@gpu
@needs_gpu
def test_huge_label_never_reads_out_of_bounds(gb):
    logits = gb.asarray(np.zeros((2, 3), np.float32))
    loss, grad = gb.softmax_cross_entropy(logits, gb.asarray(np.array([2**40, 1])))
    with pytest.raises(ValueError, match=r"got 1099511627776 at row 0"):
        gb.to_numpy(loss)
    assert np.all(gb.to_numpy(grad)[0] == 0)


@gpu
@needs_gpu
def test_mixed_dtype_parameters_and_one_launch_per_dtype(gb, ref):
    rng = np.random.default_rng(11)
    p = [rng.standard_normal(7).astype(np.float32), rng.standard_normal((2, 3))]
    g = [rng.standard_normal(7).astype(np.float32), rng.standard_normal((2, 3))]
    dev_p, dev_g = [gb.asarray(a) for a in p], [gb.asarray(a) for a in g]
    gb.sgd_update(dev_p, dev_g, [], lr=0.1)
    ref.sgd_update(p, g, [], lr=0.1)
    for got, exp in zip(dev_p, p):
        _close(gb.to_numpy(got), exp, exp.dtype.type)

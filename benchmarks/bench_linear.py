"""GEMM / linear: ``act(x @ W + b)`` fused (ReLU epilogue) and its backward (dW, db, dx).

Work model: forward ``2·B·I·O`` flop, backward ``4·B·I·O`` flop (see :mod:`nnfast.bench`).
"""


def test_linear_forward(run_case, impl, dtype, case):
    run_case("linear_forward", impl, dtype, case)


def test_linear_backward(run_case, impl, dtype, case):
    run_case("linear_backward", impl, dtype, case)

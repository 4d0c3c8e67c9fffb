"""Element-wise activations, forward and backward: the activation table's benchmarked rows
(ReLU, erf-GELU, tanh, Mish, HardSwish).

Work model: forward reads x and writes y, ``2·n·s`` bytes; backward reads dy
and the saved tensor and writes dx, ``3·n·s`` bytes (s = bytes per element).
"""


def test_activation_forward(run_case, impl, dtype, case):
    run_case("activation_forward", impl, dtype, case)


def test_activation_backward(run_case, impl, dtype, case):
    run_case("activation_backward", impl, dtype, case)

"""Optimizer updates over the parameters of the benchmark MLPs: SGD (momentum 0.9) and Adam.

Work model: SGD reads p, g, v and writes p, v, ``5·n·s`` bytes; Adam reads
p, g, m, v and writes p, m, v, ``7·n·s`` bytes. Updates are in place, so
every call moves the parameters a little (lr 1e-3 / 1e-4: they stay finite).
"""


def test_sgd_update(run_case, impl, dtype, case):
    run_case("sgd_update", impl, dtype, case)


def test_adam_update(run_case, impl, dtype, case):
    run_case("adam_update", impl, dtype, case)

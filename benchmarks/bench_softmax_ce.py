"""Row kernels: softmax, log-softmax and the fused softmax cross-entropy (loss + dlogits).

Work model: softmax / log-softmax ``2·B·C·s`` bytes; cross-entropy
``2·B·C·s + 8·B`` bytes (logits read once, int64 labels, dlogits written).
"""


def test_softmax(run_case, impl, dtype, case):
    run_case("softmax", impl, dtype, case)


def test_log_softmax(run_case, impl, dtype, case):
    run_case("log_softmax", impl, dtype, case)


def test_softmax_cross_entropy(run_case, impl, dtype, case):
    run_case("softmax_cross_entropy", impl, dtype, case)

"""One training step of an MLP through the layer API: forward, softmax-CE, backward, SGD step.

MLPs [64,128,10] batch 64, [784,512,512,10] batch 1024 and [784,1024,1024,10]
batch 256, ReLU, SGD with momentum 0.9. At the small size the cost is Python
dispatch; at the large ones it is the GEMMs. Work model: ``6·B·Σ(in·out)`` flop.
"""


def test_train_step(run_case, impl, dtype, case):
    run_case("train_step", impl, dtype, case)

"""Training of an MLP through the layer API: forward, softmax-CE, backward, SGD step.

One step of [64,128,10] batch 64, [784,256,256,10] batch 128 and [784,1024,1024,10] batch 256, and
an epoch of 60,000 samples through [784,256,256,10] in batches of 128; ReLU, SGD with momentum 0.9.
Each through ``nf.TrainStep`` and through the eager loop of layer calls (the ``TrainStep`` and
``eager`` variants). At the small size the cost is dispatch; at the large ones it is the GEMMs.
Work model: ``6·B·Σ(in·out)`` flop, B the samples of one call.
"""


def test_train_step(run_case, impl, dtype, case):
    run_case("train_step", impl, dtype, case)

"""The training cases of ``nnfast bench``: the shapes, the epoch row, and what each variant computes.

Values only: every callable is checked against a training loop written out here from the layer API,
never for speed.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

import nnfast as nf
from nnfast import bench
from nnfast.bench import cases
from nnfast.backends import backend_for
from nnfast.op_spec import Shape
from nnfast.ops import SGD_LR, SGD_MOMENTUM

from test_bench_smoke import _check_figures, _parse

SPEC = bench.OPS["train_step"]
# An epoch of 10 samples in batches of 4: two full batches and a last one of 2.
TINY_EPOCH = Shape("small", ((12, 8, 5), 4, 10), "[12,8,5] b4, epoch of 10")
TINY_STEP = Shape("small", ((12, 8, 5), 4), "[12,8,5] b4")
BACKENDS = [b for b in ("numpy", "numba") if b in nf.available_backends()]


def test_the_training_rows_are_the_target_shapes_and_an_mnist_sized_epoch():
    dims = [s.dims for s in SPEC.shapes]
    assert dims == [((64, 128, 10), 64), ((784, 256, 256, 10), 128), ((784, 1024, 1024, 10), 256),
                    ((784, 256, 256, 10), 128, 60000)]
    assert SPEC.variants == ("TrainStep", "eager")
    epoch = SPEC.shapes[-1]
    assert bench.work(SPEC, epoch, 4) == 6.0 * 60000 * (784 * 256 + 256 * 256 + 256 * 10)
    assert bench.work(SPEC, SPEC.shapes[1], 4) == 6.0 * 128 * (784 * 256 + 256 * 256 + 256 * 10)
    assert cases.shape_record(SPEC, epoch) == {"sizes": [784, 256, 256, 10], "batch": 128, "samples": 60000}
    assert cases.shape_record(SPEC, SPEC.shapes[0]) == {"sizes": [64, 128, 10], "batch": 64}


def _reference_losses(shape: Shape, dtype: str, passes: int) -> list[float]:
    """The loss of every step of ``passes`` calls of the case, from layer calls on NumPy written out here."""
    data = cases.inputs(SPEC, "eager", shape, dtype)
    sizes, batch = shape.dims[:2]
    with nf.use_backend("numpy"):
        model = nf.MLP(list(sizes), activation="relu", dtype=dtype, seed=0)
        loss_fn = nf.SoftmaxCrossEntropy()
        opt = nf.SGD(model.parameters(), lr=SGD_LR, momentum=SGD_MOMENTUM)
    losses = []
    for _ in range(passes):
        for start in range(0, len(data["x"]), batch):
            opt.zero_grad()
            loss, dlogits = loss_fn(model.forward(data["x"][start:start + batch]),
                                    data["labels"][start:start + batch])
            model.backward(dlogits)
            opt.step()
            losses.append(float(loss))
    return losses


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", SPEC.variants)
@pytest.mark.parametrize("shape", [TINY_STEP, TINY_EPOCH], ids=["step", "epoch"])
def test_each_variant_trains_on_every_batch_in_order(backend, variant, shape):
    fn = bench.make_nnfast(backend_for(backend), SPEC, variant, shape, "float64")
    # A second call goes on from the parameters the first left: the next epoch, on the same batches.
    reference = _reference_losses(shape, "float64", passes=2)
    steps = 3 if shape is TINY_EPOCH else 1
    assert len(reference) == 2 * steps
    assert float(fn()) == pytest.approx(reference[steps - 1], rel=1e-10)
    assert float(fn()) == pytest.approx(reference[-1], rel=1e-10)
    assert reference[steps - 1] != reference[-1]
    step = getattr(fn, "train_step", None)
    assert (step is not None) == (variant == "TrainStep")
    if step is not None:  # a plan for the batch, and one for the last, smaller batch of an epoch
        assert sorted(step.plan_names) == sorted(
            f"{'fused' if backend == 'numba' else 'eager'} (batch {b})" for b in ((4, 2) if steps == 3 else (4,)))


def test_torch_runs_every_batch_of_an_epoch():
    torch = pytest.importorskip("torch")
    data = cases.inputs(SPEC, "eager", TINY_EPOCH, "float64")
    fn = bench.make_torch(torch, "cpu", SPEC, "eager", TINY_EPOCH, "float64")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5)).double()
    opt = torch.optim.SGD(model.parameters(), lr=SGD_LR, momentum=SGD_MOMENTUM)
    x, labels = torch.from_numpy(data["x"]), torch.from_numpy(data["labels"])
    for start in range(0, 10, 4):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x[start:start + 4]), labels[start:start + 4])
        loss.backward()
        opt.step()
    assert fn().item() == pytest.approx(loss.item(), rel=1e-12)


def test_an_epoch_row_gets_its_own_table(tmp_path, monkeypatch, capsys):
    spec = dataclasses.replace(SPEC, bench=dataclasses.replace(SPEC.bench, shapes=(TINY_STEP, TINY_EPOCH)))
    monkeypatch.setitem(bench.OPS, "train_step", spec)
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = _parse("--quick", "--backend", "numpy", "--ops", "train_step", "--no-torch", "--no-progress",
                  "--json", str(out), "--markdown", str(md))
    assert bench.run(args) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["errors"] == []
    rows = {(r["variant"], r["label"]): r for r in report["results"]}
    assert set(rows) == {(v, s.label) for v in SPEC.variants for s in (TINY_STEP, TINY_EPOCH)}
    epoch = rows["TrainStep", TINY_EPOCH.label]
    assert epoch["shape"] == {"sizes": [12, 8, 5], "batch": 4, "samples": 10}
    assert math.isclose(epoch["work"], 6.0 * 10 * (12 * 8 + 8 * 5))
    _check_figures(report)
    text = md.read_text(encoding="utf-8")
    step_table, _, epoch_table = text.partition("Training epoch")
    assert "| [12,8,5] | TrainStep | 4 | float64 |" not in text  # float32 is the default
    assert "| [12,8,5] | TrainStep | 4 | float32 |" in step_table and "| [12,8,5] | eager | 4 | float32 |" in step_table
    assert "ms/step" in step_table and "s/epoch" not in step_table
    assert "| [12,8,5] | TrainStep | 4 | 10 | float32 |" in epoch_table and "numpy s/epoch" in epoch_table
    assert "|---|---|---|---|---|---:|" in epoch_table  # five label columns, then the figures
    printed = capsys.readouterr().out
    assert "Training epoch" in printed and "samples" in printed

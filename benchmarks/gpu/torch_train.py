"""``nnfast train``'s run, step for step, in PyTorch eager mode: the yardstick of the device script.

The same data (nnfast's loaders), the same MLP with the same initial weights
(nnfast's initialisation, copied), the same shuffled batches (nnfast's
generator and order), the same loss, optimizer and hyperparameters, so the
losses and accuracies should match ``nnfast train``'s to float32 rounding and
the times compare one eager step loop with another. Matrix products in full
float32 (PyTorch's default; TF32 off). Prints ``nnfast train``'s epoch lines;
``--json FILE`` writes them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(","))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="as nnfast train --data (default: the digits)")
    parser.add_argument("--hidden", type=_sizes, default=(256, 256))
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)

    try:
        import torch
    except ImportError as err:
        print(f"torch_train: PyTorch is not installed here ({err})")
        return 3
    import numpy as np

    import nnfast as nf
    from nnfast.activations import BY_NAME
    from nnfast.data import load_dataset
    from nnfast.train import DEFAULT_LR

    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    dev = torch.device(args.device)
    data = load_dataset(args.data)
    sizes = [data.features, *args.hidden, data.classes]
    with nf.use_backend("numpy"):
        reference = nf.MLP(sizes, activation=args.activation, dtype="float32", seed=args.seed)
    layers = []
    for i, p in enumerate(range(0, len(reference.parameters()), 2)):
        W, b = (reference.parameters()[p + k].data for k in (0, 1))
        linear = torch.nn.Linear(W.shape[0], W.shape[1]).to(dev)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(W.T)))
            linear.bias.copy_(torch.from_numpy(b))
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(_activation(torch, BY_NAME[args.activation]))
    model = torch.nn.Sequential(*layers)
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:  # nnfast's Adam decouples its weight decay by default: AdamW
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)

    x_train, y_train = torch.from_numpy(data.x_train).to(dev), torch.from_numpy(data.y_train).to(dev)
    x_test, y_test = torch.from_numpy(data.x_test).to(dev), torch.from_numpy(data.y_test).to(dev)
    n = data.x_train.shape[0]
    batches = math.ceil(n / args.batch_size)
    shuffle_rng = np.random.default_rng([args.seed, 1])  # nnfast train's shuffling
    print(f"training {sizes} ({args.activation}) on {data.name}: {n} train / {data.x_test.shape[0]} test, "
          f"torch {torch.__version__} on {dev}, {args.optimizer} lr {lr}, {args.epochs} epochs", flush=True)
    history = []
    for epoch in range(args.epochs):
        order = torch.from_numpy(shuffle_rng.permutation(n)).to(dev)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        began = time.perf_counter()
        for batch in range(batches):
            idx = order[batch * args.batch_size:(batch + 1) * args.batch_size]
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach().double() * idx.shape[0]
        with torch.no_grad():
            correct = sum(int((model(x_test[i:i + 4096]).argmax(1) == y_test[i:i + 4096]).sum())
                          for i in range(0, x_test.shape[0], 4096))
        mean_loss = float(loss_sum) / n
        seconds = time.perf_counter() - began
        accuracy = correct / x_test.shape[0]
        history.append({"epoch": epoch + 1, "loss": mean_loss, "test_accuracy": accuracy, "seconds": seconds,
                        "samples_per_second": n / seconds})
        print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {mean_loss:.4f}  test acc {100 * accuracy:6.2f}%  "
              f"{seconds:6.2f} s  {n / seconds:9.0f} samples/s", flush=True)
    print(f"final test accuracy: {100 * history[-1]['test_accuracy']:.2f}%")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"torch": torch.__version__, "device": str(dev), "sizes": sizes, "history": history}, f,
                      indent=1)
    return 0


def _activation(torch, row):
    """A row of nnfast's activation table as a PyTorch module (the row's PyTorch forward, default parameter)."""
    from nnfast.activations import resolve

    alpha = resolve(row.name)[1]

    class Activation(torch.nn.Module):
        def forward(self, x):
            return row.torch_forward(torch.nn.functional, x, alpha)

    return Activation()


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    sys.exit(main())

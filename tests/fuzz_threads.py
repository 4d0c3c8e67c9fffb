"""Kernels of one backend called from several Python threads at once (used by test_concurrency.py).

``python fuzz_threads.py BACKEND [THREADS] [ROUNDS]`` runs the check in a
fresh process and prints ``ok <calls>``: a backend whose kernels are not
thread-safe may abort the whole process, which must not take pytest with it.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

import nnfast as nf
from nnfast.backends import backend_for

# (batch, in, out) and element counts: small ones, and ones above the kernels' parallel thresholds.
LINEAR_SHAPES = [(3, 5, 7), (64, 33, 17), (256, 300, 260)]
ELEMENTS = [7, 1000, 70_000, 300_000]


def _cases(rng: np.random.Generator):
    """Closures ``backend -> tuple of host arrays``, one per op and size."""
    cases = []
    for dtype in (np.float32, np.float64):
        for batch, n_in, n_out in LINEAR_SHAPES:
            x = rng.standard_normal((batch, n_in)).astype(dtype)
            W = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(dtype)
            b = rng.standard_normal(n_out).astype(dtype)
            dy = rng.standard_normal((batch, n_out)).astype(dtype)
            labels = rng.integers(0, n_out, size=batch)
            labels[::5] = -100

            def linear(be, x=x, W=W, b=b, dy=dy):
                y, saved = be.linear_forward(be.asarray(x), be.asarray(W), be.asarray(b), "gelu")
                return (y,) + be.linear_backward(be.asarray(dy), be.asarray(x), be.asarray(W), saved, "gelu")

            def ce(be, x=x, W=W, labels=labels):
                logits = be.asarray(x @ W)
                return be.softmax_cross_entropy(logits, be.asarray(labels), label_smoothing=0.1) + \
                    (be.softmax(logits), be.log_softmax(logits))

            cases += [linear, ce]
        for n in ELEMENTS:
            x = (rng.standard_normal(n) * 4).astype(dtype)
            dy = rng.standard_normal(n).astype(dtype)

            def act(be, x=x, dy=dy, name=["relu", "sigmoid", "silu", "elu", "gelu_tanh"][n % 5]):
                y = be.activation_forward(be.asarray(x), name)
                saved = be.asarray(x) if name in ("silu", "gelu_tanh") else y
                return y, be.activation_backward(be.asarray(dy), saved, name)

            def optim(be, x=x, dy=dy):
                p, m, v = be.asarray(x.copy()), be.asarray(dy.copy() * 0.1), be.asarray(np.abs(dy) * 0.01)
                for step in (1, 2):
                    be.adam_update([p], [be.asarray(dy)], [m], [v], step=step, lr=0.01, weight_decay=0.01)
                q, vel = be.asarray(x.copy()), be.asarray(dy.copy())
                be.sgd_update([q], [be.asarray(dy)], [vel], lr=0.1, momentum=0.9, nesterov=True)
                return p, m, v, q, vel

            cases += [act, optim]
    return cases


def _host(backend, out):
    return tuple(None if a is None else np.array(backend.to_numpy(a)) for a in out)


def check(name: str, threads: int = 4, rounds: int = 3) -> int:
    """Run every case in ``threads`` threads at once, ``rounds`` times; compare with a serial run."""
    backend = backend_for(name)
    cases = _cases(np.random.default_rng(0))
    expected = [_host(backend, case(backend)) for case in cases]
    barrier = threading.Barrier(threads)
    errors: list[str] = []
    calls = [0] * threads

    def worker(t: int) -> None:
        order = np.random.default_rng(t).permutation(len(cases))
        try:
            with nf.use_backend(backend):
                for _ in range(rounds):
                    barrier.wait(timeout=120)
                    for i in order:
                        got = _host(backend, cases[i](backend))
                        calls[t] += 1
                        for k, (g, e) in enumerate(zip(got, expected[i])):
                            if e is None:
                                assert g is None
                                continue
                            tol = 1e-5 if e.dtype == np.float32 else 1e-12
                            np.testing.assert_allclose(g, e, rtol=tol, atol=tol,
                                                       err_msg=f"thread {t}, case {i}, output {k}")
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(f"thread {t}: {type(err).__name__}: {err}")
            barrier.abort()

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in pool), "a kernel call hung"
    assert not errors, "\n".join(errors[:3])
    return sum(calls)


if __name__ == "__main__":
    args = sys.argv[1:]
    total = check(args[0], *(int(a) for a in args[1:]))
    print(f"ok {total}")

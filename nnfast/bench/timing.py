"""Timing: clocks (wall clock, CUDA events), warm-up, calibration, and side-by-side sampling."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable


class Clock:
    """Times calls of a callable: wall clock on the CPU."""

    device = "cpu"

    def sync(self) -> None:
        """Wait for queued work (nothing to wait for on the CPU)."""

    def time(self, fn: Callable[[], Any], number: int) -> float:
        """Seconds per call, averaged over ``number`` back-to-back calls."""
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - t0) / number


class _EventClock(Clock):
    """Times GPU work with a pair of CUDA events around the calls."""

    device = "gpu"

    def _events(self) -> tuple[Any, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def _elapsed_ms(self, start: Any, end: Any) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def time(self, fn: Callable[[], Any], number: int) -> float:
        start, end = self._events()
        self.sync()
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return self._elapsed_ms(start, end) / 1e3 / number


class CupyClock(_EventClock):
    """Times GPU work with CUDA events on the current stream."""

    def __init__(self) -> None:
        import cupy

        self.cupy = cupy

    def sync(self) -> None:
        self.cupy.cuda.runtime.deviceSynchronize()

    def _events(self) -> tuple[Any, Any]:
        return self.cupy.cuda.Event(), self.cupy.cuda.Event()

    def _elapsed_ms(self, start: Any, end: Any) -> float:
        return self.cupy.cuda.get_elapsed_time(start, end)


class TorchCudaClock(_EventClock):
    """Times PyTorch CUDA work with CUDA events."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch

    def sync(self) -> None:
        self.torch.cuda.synchronize()

    def _events(self) -> tuple[Any, Any]:
        cuda = self.torch.cuda
        return cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)

    def _elapsed_ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end)


@dataclass
class Settings:
    """How long to measure: warm-up, samples, rounds and the minimum duration of a sample."""

    repeat: int = 10  # samples per implementation and case
    rounds: int = 3  # the samples are taken in this many rounds over the implementations
    min_time: float = 0.02  # seconds per sample, at least
    warmup_time: float = 0.1  # seconds of warm-up after the first call
    # Seconds of untimed calls before each implementation's block of samples: OpenBLAS's idle threads spin for
    # ~0.1-0.2 s after a call (measured on 2 cores: a Numba GEMM right after one ran at half speed, 0.05 s later
    # still at 0.55x, 0.2 s later at full speed); PyTorch's OpenMP threads do the same.
    switch_time: float = 0.2
    max_time: float = 3.0  # seconds of samples per implementation and case, at most (>= 3 samples)


QUICK = Settings(repeat=3, rounds=1, min_time=0.002, warmup_time=0.001, switch_time=0.002, max_time=0.5)
FULL = Settings()


@dataclass
class Timed:
    """One implementation of a case, being measured.

    ``before``, when given, runs before each block of calls (the warm-up,
    and each round's samples): it sets up the conditions of this
    measurement, e.g. starts or stops a competing process.
    """

    key: str
    fn: Callable[[], Any]
    clock: Clock
    number: int = 1
    repeat: int = 1
    samples: list[float] = field(default_factory=list)
    before: Callable[[], None] | None = None


def _warm(t: Timed, seconds: float, calls: int) -> float:
    """Untimed calls (at least ``calls``, for at least ``seconds``); the last call's duration."""
    t0 = time.perf_counter()
    done = 0
    single = 0.0
    while True:
        single = t.clock.time(t.fn, 1)
        done += 1
        if done >= calls and time.perf_counter() - t0 >= seconds:
            return single


def _prepare(t: Timed, settings: Settings) -> None:
    """First call (compilation, allocation), warm-up, then calibrate the calls per sample."""
    if t.before is not None:
        t.before()
    t.fn()
    t.clock.sync()
    # at least 3 calls: libraries initialise lazily, and that is not kernel time
    single = max(_warm(t, settings.warmup_time, 3), 1e-7)
    t.number = max(1, int(math.ceil(settings.min_time / single)))
    per_sample = single * t.number
    t.repeat = max(3, min(settings.repeat, int(settings.max_time / per_sample)))


def measure(timed: list[Timed], settings: Settings) -> None:
    """Sample every implementation side by side.

    The samples are taken in ``rounds`` rounds; in each round every
    implementation gets a block of samples, the order reversing from one
    round to the next, so that a load that comes and goes on a shared machine
    falls on all of them alike. Each block starts with untimed calls for
    ``switch_time``: thread pools of different libraries (BLAS, OpenMP,
    Numba's) keep spinning on their cores for a while after their work, and
    the calls right after a switch of library would share the cores with
    them, which is not the kernel's time (nor what a program using one
    library sees).
    """
    for t in timed:
        _prepare(t, settings)
    rounds = max(1, settings.rounds)
    order = list(timed)
    for r in range(rounds):
        for t in order:
            quota = math.ceil(t.repeat * (r + 1) / rounds) - math.ceil(t.repeat * r / rounds)
            if quota <= 0:
                continue
            if t.before is not None:
                t.before()
            if r or len(timed) > 1:
                _warm(t, settings.switch_time, 1)
            for _ in range(quota):
                t.samples.append(t.clock.time(t.fn, t.number))
        order.reverse()


def figures(t: Timed, amount: float) -> dict[str, Any]:
    median = statistics.median(t.samples)
    return {
        "median_s": median,
        "min_s": min(t.samples),
        "samples": len(t.samples),
        "calls_per_sample": t.number,
        "rate": amount / median / 1e9,
    }

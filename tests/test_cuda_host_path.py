"""The CuPy backend's host side on the CPU emulation: no host-device synchronisation per call.

* Bad-label flags: copied to pinned memory behind each cross-entropy call, on the stream it
  ran on, with an event of their own; looked at without waiting once that event is done, waited
  for only when a value is read; never drained on a count; the message names the first bad row
  and its label even after the labels' buffer was reused.
* SM count and memory size asked of the driver once per device.

The emulated CuPy runs every launch and copy at once; here its events are replaced by ones
that stay pending until waited for, and its streams by distinct ones, so the order of waits
and copies is what the backend makes of them.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuda_emulation as emu
import nnfast as nf
from nnfast.backends.cuda_label_checks import LabelChecks

pytestmark = pytest.mark.skipif(emu.unavailable_reason() is not None,
                                reason=f"no CUDA emulation here: {emu.unavailable_reason()}")


@pytest.fixture
def gpu(kernel_modules):
    with emu.emulated_cupy_backend() as backend:
        yield backend


class _Log:
    """What the backend asked of the emulated CUDA runtime, in order."""

    def __init__(self):
        self.events: list["_PendingEvent"] = []
        self.calls: list[tuple] = []


class _PendingEvent:
    """An event that completes only when the host waits for it (as if the GPU were far behind)."""

    log: _Log

    def __init__(self, *args, **kwargs):
        self.done = False
        self.stream = None
        self.log.events.append(self)

    def record(self, stream=None):
        self.stream = stream
        self.log.calls.append(("record", stream.ptr if stream is not None else None))

    def synchronize(self):
        self.log.calls.append(("wait", self.stream.ptr if self.stream is not None else None))
        self.done = True


class _Stream(emu._Stream):
    def __init__(self, ptr):
        self.ptr = ptr


@pytest.fixture
def slow_device(gpu, monkeypatch):
    """Events stay pending until waited for; the current stream can be switched (``log.use(ptr)``)."""
    log = _Log()
    monkeypatch.setattr(_PendingEvent, "log", log, raising=False)
    monkeypatch.setattr(gpu.xp.cuda, "Event", _PendingEvent)
    current = {"stream": _Stream(0)}
    monkeypatch.setattr(gpu.xp.cuda, "get_current_stream", lambda: current["stream"])
    copy = emu._Runtime.memcpyAsync

    def memcpy(dst, src, size, kind, stream):
        log.calls.append(("copy", stream))
        copy(dst, src, size, kind, stream)

    monkeypatch.setattr(gpu.xp.cuda.runtime, "memcpyAsync", staticmethod(memcpy))
    log.use = lambda ptr: current.update(stream=_Stream(ptr))
    return gpu, log


def test_no_call_waits_and_nothing_is_drained(slow_device):
    gpu, log = slow_device
    logits = gpu.asarray(np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32))
    labels = gpu.asarray(np.zeros(6, np.int64))
    losses = []
    for i in range(300):
        labels[...] = np.array([0, 1, 2, 3, 0, 1])
        if i in (150, 151):
            labels[i - 148] = 9 + i  # rows 2 and 3 of calls 150 and 151
        losses.append(gpu.softmax_cross_entropy(logits, labels)[0])
    labels[...] = 0  # the buffer is reused: the message must not read it again
    assert len(gpu._labels) == 300
    assert not any(call[0] == "wait" for call in log.calls)
    with pytest.raises(ValueError, match="got 159 at row 2"):
        float(losses[-1])  # a read waits for the checks, oldest first, up to the first bad one
    assert sum(call[0] == "wait" for call in log.calls) == 151 and len(gpu._labels) == 149
    with pytest.raises(ValueError, match="got 160 at row 3"):
        gpu.to_numpy(losses[0])
    gpu.synchronize()
    assert len(gpu._labels) == 0


def test_finished_checks_are_read_without_waiting(slow_device):
    gpu, log = slow_device
    logits = gpu.asarray(np.ones((3, 2), np.float32))
    gpu.softmax_cross_entropy(logits, gpu.asarray(np.array([0, 5, 1])))
    gpu.softmax_cross_entropy(logits, gpu.asarray(np.array([0, 1, 1])))
    log.events[0].done = True  # the first call finished, the second has not
    with pytest.raises(ValueError, match="got 5 at row 1"):
        gpu.softmax_cross_entropy(logits, gpu.asarray(np.array([1, 1, 1])))
    assert not any(call[0] == "wait" for call in log.calls) and len(gpu._labels) == 1


def test_the_flag_is_copied_and_waited_for_on_the_stream_of_its_call(slow_device):
    gpu, log = slow_device
    logits = gpu.asarray(np.ones((3, 2), np.float32))
    log.use(7)
    loss, _ = gpu.softmax_cross_entropy(logits, gpu.asarray(np.array([0, 1, 4])))
    log.use(9)  # another stream is current when the loss is read
    with pytest.raises(ValueError, match="got 4 at row 2"):
        float(loss)
    assert log.calls[-3:] == [("copy", 7), ("record", 7), ("wait", 7)]


def test_pinned_slots_are_reused(gpu):
    checks = LabelChecks(gpu.xp)
    info = gpu.asarray(np.array([4, 4, 0]))  # ce_prepare's: no bad row among 4
    for _ in range(1500):  # the emulated device is done at once: each poll reads the copy
        checks.track(info, 4, 3, -100)
        checks.poll()
    assert len(checks) == 0 and len(checks._blocks) == 1
    for _ in range(600):  # unread: a second block of slots, nothing drained
        checks.track(info, 4, 3, -100)
    assert len(checks) == 600 and len(checks._blocks) == 2
    checks.track(gpu.asarray(np.array([1, 3, -7])), 4, 3, -100)
    with pytest.raises(ValueError, match="got -7 at row 1"):
        checks.check_all()
    assert len(checks) == 0


def test_device_properties_are_asked_once_per_device(gpu, monkeypatch):
    asked = []

    class Device(emu._Device):
        def __init__(self, device=None):
            super().__init__()
            asked.append(device)
            self.mem_info = (0, (device + 1) * 2**30)

    monkeypatch.setattr(gpu.xp.cuda, "Device", Device)
    device = {"id": 0}
    monkeypatch.setattr(gpu.xp.cuda.runtime, "getDevice", staticmethod(lambda: device["id"]))
    with nf.use_backend(gpu):
        layer = nf.Linear(5, 3)
        for _ in range(4):
            layer.forward(np.ones((2, 5), np.float32))
        assert gpu.memory_limit() == 2**30
        device["id"] = 1
        layer.forward(np.ones((2, 5), np.float32))
        assert gpu.memory_limit() == 2 * 2**30 and gpu._sm_count == emu._Device.sm_count
    assert asked == [0, 1]
    assert gpu.launch_settings()[0] == 1

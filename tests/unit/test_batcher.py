"""The dynamic batcher with a real (pure numpy) run function: batch formation, caps,
preferred sizes, a bounded queue, deadlines, unbatchable models and failures."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge_runtime.serving.batcher import Batcher, BatchSettings, QueueFullError, RequestTimeoutError

pytestmark = pytest.mark.unit


class Model:
    """Doubles its input; records the batch sizes it saw; can be slowed or made to fail."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.sizes: list[int] = []
        self.delay, self.fail = delay, fail
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.gate.wait()
        self.sizes.append(len(feeds["x"]))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("boom")
        return {"y": feeds["x"] * 2}


def _x(i: float, rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, 2), i, np.float32)}


def test_results_go_back_to_their_requests() -> None:
    m = Model()
    m.gate.clear()  # hold the worker so requests pile up
    b = Batcher(m, BatchSettings(max_batch=8, max_delay_ms=50))
    futs = [b.submit(_x(i), 1) for i in range(6)]
    m.gate.set()
    for i, f in enumerate(futs):
        np.testing.assert_array_equal(f.result(5)["y"], np.full((1, 2), 2 * i))
    assert sum(m.sizes) == 6 and max(m.sizes) > 1
    b.close()


def test_max_batch_is_a_cap_and_multi_row_requests_are_not_split() -> None:
    m = Model()
    m.gate.clear()
    b = Batcher(m, BatchSettings(max_batch=4, max_delay_ms=20))
    futs = [b.submit(_x(i, rows=3), 3) for i in range(4)]
    m.gate.set()
    for f in futs:
        assert f.result(5)["y"].shape == (3, 2)
    assert all(s <= 4 for s in m.sizes[1:]) and sum(m.sizes) == 12
    b.close()


def test_preferred_size_dispatches_without_waiting() -> None:
    m = Model()
    b = Batcher(m, BatchSettings(max_batch=8, max_delay_ms=2000, preferred=(2,)))
    t0 = time.monotonic()
    f1, f2 = b.submit(_x(1), 1), b.submit(_x(2), 1)
    f1.result(5), f2.result(5)
    assert time.monotonic() - t0 < 1.0  # did not wait for the 2 s delay
    b.close()


def test_queue_full_rejects_at_once() -> None:
    m = Model()
    m.gate.clear()
    b = Batcher(m, BatchSettings(max_batch=1, max_queue=3))
    first = b.submit(_x(0), 1)
    time.sleep(0.05)  # the worker holds the first one
    held = [b.submit(_x(i), 1) for i in range(3)]
    with pytest.raises(QueueFullError, match="queue is full"):
        b.submit(_x(9), 1)
    m.gate.set()
    for f in [first, *held]:
        f.result(5)
    b.close()


def test_expired_requests_are_dropped_not_computed() -> None:
    m = Model()
    m.gate.clear()
    expired = []
    b = Batcher(m, BatchSettings(max_batch=1))
    b.observer.on_expired = lambda: expired.append(1)
    first = b.submit(_x(0), 1)
    time.sleep(0.05)
    late = b.submit(_x(1), 1, timeout_ms=10)
    time.sleep(0.1)
    m.gate.set()
    first.result(5)
    with pytest.raises(RequestTimeoutError, match="over its timeout"):
        late.result(5)
    assert m.sizes == [1] and expired == [1]  # the late one never reached the model
    b.close()


def test_unbatchable_runs_one_at_a_time_in_order() -> None:
    m = Model()
    m.gate.clear()
    b = Batcher(m, BatchSettings(max_batch=8, batchable=False))
    futs = [b.submit(_x(i), 1) for i in range(5)]
    m.gate.set()
    assert [float(f.result(5)["y"][0, 0]) for f in futs] == [0, 2, 4, 6, 8]
    assert m.sizes == [1] * 5
    b.close()


def test_a_failing_model_fails_the_batch_not_the_worker() -> None:
    m = Model(fail=True)
    b = Batcher(m, BatchSettings())
    with pytest.raises(RuntimeError, match="boom"):
        b.submit(_x(1), 1).result(5)
    m.fail = False
    assert b.submit(_x(1), 1).result(5)["y"][0, 0] == 2
    b.close()


def test_close_drains() -> None:
    m = Model(delay=0.01)
    b = Batcher(m, BatchSettings(max_batch=1))
    futs = [b.submit(_x(i), 1) for i in range(5)]
    b.close(drain=True)
    assert all(f.done() and f.exception() is None for f in futs)


@pytest.mark.parametrize(
    "settings,msg",
    [
        (BatchSettings(max_batch=0), "max_batch must be >= 1"),
        (BatchSettings(max_delay_ms=-1), "max_delay_ms"),
        (BatchSettings(max_queue=0), "max_queue"),
        (BatchSettings(max_batch=4, preferred=(8,)), "preferred batch sizes"),
    ],
)
def test_settings_are_validated(settings: BatchSettings, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        Batcher(Model(), settings)

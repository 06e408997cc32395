"""The dynamic batcher with a real (pure numpy) run function: batch formation, caps,
preferred sizes, a bounded queue, deadlines, unbatchable models and failures; batches formed
in place at submit time, one hand-off per batch to a sink, instances, statistics off the
model's thread."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge_runtime.serving.batcher import (
    Batcher,
    BatchObserver,
    BatchReport,
    BatchSettings,
    QueueFullError,
    RequestTimeoutError,
)

pytestmark = pytest.mark.unit


class Model:
    """Doubles its input; records the batch sizes it saw; can be slowed or made to fail."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.sizes: list[int] = []
        self.delay, self.fail = delay, fail
        self.gate = threading.Event()
        self.gate.set()
        self.threads: set[str] = set()
        self.instances: list[int] = []
        self.fed: list[dict[str, np.ndarray]] = []

    def __call__(self, feeds: dict[str, np.ndarray], instance: int) -> tuple[dict[str, np.ndarray], str]:
        self.gate.wait()
        self.sizes.append(len(feeds["x"]))
        self.threads.add(threading.current_thread().name)
        self.instances.append(instance)
        self.fed.append(feeds)
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("boom")
        return {"y": feeds["x"] * 2}, f"tag-{instance}"


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
        (BatchSettings(instances=0), "instances must be >= 1"),
    ],
)
def test_settings_are_validated(settings: BatchSettings, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        Batcher(Model(), settings)


class ListSink:
    """A sink that records each hand-off (what an event loop receives per batch)."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[object, object, object]]] = []
        self.done = threading.Event()
        self.expected = 0

    def deliver(self, items: list[tuple[object, object, object]]) -> None:
        self.calls.append(items)
        if sum(len(c) for c in self.calls) >= self.expected:
            self.done.set()


def test_a_batch_goes_back_to_a_sink_in_one_hand_off() -> None:
    m = Model()
    m.gate.clear()
    b = Batcher(m, BatchSettings(max_batch=8))
    sink = ListSink()
    sink.expected = 7
    held = b.submit(_x(-1), 1)  # the worker takes this one and waits at the gate
    time.sleep(0.05)
    for i in range(7):
        b.submit_to(sink, i, _x(i), 1)
    m.gate.set()
    held.result(5)
    assert sink.done.wait(5)
    assert len(sink.calls) == 1 and [t for t, _, _ in sink.calls[0]] == list(range(7))
    for token, out, err in sink.calls[0]:
        assert err is None
        np.testing.assert_array_equal(out["y"], np.full((1, 2), 2 * token))  # type: ignore[index, operator]
    assert m.sizes == [1, 7]
    b.close()


def test_rows_are_copied_into_the_batch_at_submit_so_the_model_thread_never_concatenates() -> None:
    m = Model()
    m.gate.clear()
    b = Batcher(m, BatchSettings(max_batch=4))
    held = b.submit(_x(-1), 1)
    time.sleep(0.05)
    futs = [b.submit(_x(i), 1) for i in range(3)]
    m.gate.set()
    held.result(5)
    [f.result(5) for f in futs]
    batch = m.fed[1]["x"]
    # one buffer of max_batch rows, of which the batch is a view: no concatenation happened
    assert batch.base is not None and batch.base.shape == (4, 2) and batch.flags.c_contiguous
    np.testing.assert_array_equal(batch[:, 0], [0, 1, 2])
    b.close()


def test_requests_of_another_shape_start_a_new_batch_instead_of_failing_one() -> None:
    m = Model()
    m.gate.clear()
    b = Batcher(m, BatchSettings(max_batch=8))
    held = b.submit(_x(-1), 1)
    time.sleep(0.05)
    small = [b.submit({"x": np.full((1, 2), i, np.float32)}, 1) for i in range(2)]
    wide = b.submit({"x": np.full((1, 5), 7, np.float32)}, 1)
    m.gate.set()
    held.result(5)
    assert [f.result(5)["y"].shape for f in small] == [(1, 2), (1, 2)]
    assert wide.result(5)["y"].shape == (1, 5)
    assert m.sizes == [1, 2, 1]
    b.close()


def test_instances_run_batches_side_by_side_each_on_its_own_instance() -> None:
    m = Model(delay=0.2)
    b = Batcher(m, BatchSettings(max_batch=1, instances=2))
    t0 = time.monotonic()
    futs = [b.submit(_x(i), 1) for i in range(4)]
    [f.result(5) for f in futs]
    elapsed = time.monotonic() - t0
    assert sorted(set(m.instances)) == [0, 1] and len(m.threads) == 2
    assert elapsed < 0.75, elapsed  # 4 runs of 0.2 s on 2 instances, not 0.8 s in a row
    b.close()


def test_statistics_run_on_the_post_thread_not_the_models() -> None:
    reports: list[tuple[BatchReport, str]] = []
    seen = threading.Event()

    def after(report: BatchReport) -> None:
        reports.append((report, threading.current_thread().name))
        seen.set()

    m = Model()
    b = Batcher(m, BatchSettings(), BatchObserver(after_batch=after), name="cls")
    b.submit(_x(3), 1).result(5)
    assert seen.wait(5)
    report, thread = reports[0]
    assert thread == "post-cls" and thread not in m.threads
    assert report.rows == 1 and report.tag == "tag-0" and report.outputs is not None and len(report.enqueued) == 1


def test_statistics_that_raise_never_stop_the_batcher() -> None:
    def after(report: BatchReport) -> None:
        raise RuntimeError("a broken statistics hook")

    b = Batcher(Model(), BatchSettings(), BatchObserver(after_batch=after))
    for i in range(3):
        assert b.submit(_x(i), 1).result(5)["y"][0, 0] == 2 * i
    b.close()


def test_an_idle_model_runs_a_request_at_once_on_the_callers_thread() -> None:
    m = Model()
    b = Batcher(m, BatchSettings(max_batch=8, inline_max_ms=50))
    assert b.try_inline(_x(1), 1, 0.05) is None  # no run time known yet: never inline blind
    b.submit(_x(1), 1).result(5)  # one queued run teaches it the one-row time
    out, tag = b.try_inline(_x(3), 1, 0.05) or ({}, None)
    assert out["y"][0, 0] == 6 and tag == "tag-0"
    assert threading.current_thread().name in m.threads  # it ran here, not on the batcher's thread
    b.close()


def test_no_inline_run_while_a_batch_runs_or_waits_or_when_too_slow() -> None:
    m = Model()
    b = Batcher(m, BatchSettings(max_batch=8))
    b.submit(_x(1), 1).result(5)
    m.gate.clear()
    running = b.submit(_x(2), 1)
    time.sleep(0.05)
    assert b.try_inline(_x(3), 1, 10.0) is None  # the model is busy
    queued = b.submit(_x(4), 1)
    assert b.try_inline(_x(5), 1, 10.0) is None  # and a request waits
    m.gate.set()
    running.result(5), queued.result(5)
    assert b.try_inline(_x(6), 1, 0.0) is None  # a one-row run is known to take longer than allowed
    assert b.try_inline(_x(6), 1, 10.0) is not None
    b.close()

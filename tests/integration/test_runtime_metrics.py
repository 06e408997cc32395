"""Runtime metrics that must follow the truth: the queue depth at scrape time."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from edge_runtime.contracts.bundle import load_public_keys
from edge_runtime.serving.batcher import BatchSettings
from edge_runtime.serving.runtime import Runtime
from tests.fleet_models import inputs, make_bundle

pytestmark = pytest.mark.integration


def _depth(rt: Runtime) -> int:
    m = re.search(r'edgert_queue_depth\{model="cls"\} (\d+)', rt.metrics.registry.render())
    assert m, "no queue depth for the model"
    return int(m.group(1))


def test_queue_depth_is_read_when_scraped_and_falls_back_to_zero(tmp_path: Path, keys: Path) -> None:
    bundle = make_bundle(tmp_path / "slow.edgepkg", keys / "signing.key", "1.0.0", "slow")  # ~3 ms a run
    rt = Runtime(load_public_keys([keys / "signing.pub"]), threads=1, batching=BatchSettings(max_batch=1))
    try:
        rt.load(bundle)
        x = inputs(1)
        subs = [rt.submit("cls", {"x": x}) for _ in range(40)]
        time.sleep(0.005)
        assert _depth(rt) > 0  # requests wait behind the one running
        for s in subs:
            s.result(30)
        assert _depth(rt) == 0  # drained: the gauge says so (it used to keep the last submit's value)
    finally:
        rt.close()

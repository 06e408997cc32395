"""Frame sources in a real daemon: image folder and video file, results over SSE, frame
dropping when inference falls behind, the prediction cache, and resumable batch scoring."""

from __future__ import annotations

import csv
import http.client
import json
import re
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.contracts.client import Client
from tests.conftest import Daemon, edgert

pytestmark = pytest.mark.e2e


def _sse_events(port: int, n: int, query: str = "") -> list[dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v2/stream" + query)
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
    events = []
    while len(events) < n:
        line = r.fp.readline().decode()
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
    conn.close()
    return events


def _video(frames_dir: Path, out: Path) -> Path:
    import cv2

    imgs = [cv2.resize(cv2.imread(str(p)), (300, 400)) for p in sorted(frames_dir.rglob("*.png"))[:12]]
    w = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), 10, (300, 400))
    for img in imgs:
        w.write(img)
    w.release()
    return out


def test_image_and_video_sources_stream_results(
    installed_state: Path, orientation_data: tuple[Path, Path], tmp_path: Path
) -> None:
    video = _video(orientation_data[1], tmp_path / "pages.avi")
    cfg = tmp_path / "edgert.yaml"
    cfg.write_text(
        "sources:\n"
        f"  - {{name: pages, model: orientation, kind: images, uri: '{orientation_data[1]}', fps: 20}}\n"
        f"  - {{name: clip, model: orientation, kind: video, uri: '{video}', fps: 20}}\n"
    )
    d = Daemon(installed_state, "--config", str(cfg))
    try:
        events = _sse_events(d.port, 6, "?source=pages")
        assert {e["source"] for e in events} == {"pages"}
        for e in events:
            top = e["outputs"]["fetch_name_0"][0]  # type: ignore[index]
            assert e["model"] == "orientation" and e["version"] == "1.0.0"
            # the frame id is its path under the folder: <true label>/page-....png
            assert top["label"] == str(e["frame"]).split("/")[0]
        clip = _sse_events(d.port, 3, "?source=clip")
        assert all(e["source"] == "clip" and str(e["frame"]).isdigit() for e in clip)
        text = Client(d.url).metrics()
        assert re.search(r'edgert_frames_inferred_total\{source="clip"\} [1-9]', text)
    finally:
        assert d.stop() == 0


def test_frames_dropped_when_inference_falls_behind(
    installed_state: Path, orientation_data: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg = tmp_path / "edgert.yaml"
    # 0 fps = as fast as the folder can be read: far faster than the model runs.
    cfg.write_text(
        "sources:\n"
        f"  - {{name: flood, model: orientation, kind: images, uri: '{orientation_data[1]}', fps: 0, queue: 1}}\n"
    )
    d = Daemon(installed_state, "--config", str(cfg), "--threads", "1")
    try:
        _sse_events(d.port, 5)
        text = Client(d.url).metrics()
        dropped = float(re.search(r'edgert_frames_dropped_total\{source="flood"\} (\S+)', text).group(1))  # type: ignore[union-attr]
        captured = float(re.search(r'edgert_frames_captured_total\{source="flood"\} (\S+)', text).group(1))  # type: ignore[union-attr]
        inferred = float(re.search(r'edgert_frames_inferred_total\{source="flood"\} (\S+)', text).group(1))  # type: ignore[union-attr]
        assert dropped > 0 and captured >= dropped + inferred
    finally:
        assert d.stop() == 0


def test_prediction_cache(installed_state: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "edgert.yaml"
    cfg.write_text("models:\n  orientation:\n    cache: {entries: 8, max_age_s: 60}\n")
    d = Daemon(installed_state, "--config", str(cfg))
    try:
        c = Client(d.url)
        x = np.random.default_rng(3).standard_normal((1, 3, 224, 224)).astype(np.float32)
        first = c.infer("orientation", x)["fetch_name_0"]
        for _ in range(4):
            np.testing.assert_array_equal(c.infer("orientation", x)["fetch_name_0"], first)
        c.infer("orientation", x + 1)
        text = c.metrics()
        assert 'edgert_cache_hits_total{model="orientation"} 4' in text
        assert 'edgert_cache_misses_total{model="orientation"} 2' in text
    finally:
        assert d.stop() == 0


def test_batch_infer_resumes(
    orientation_bundle: Path, keys: Path, orientation_data: tuple[Path, Path], tmp_path: Path
) -> None:
    out, table = tmp_path / "scores.jsonl", tmp_path / "scores.csv"
    args = [
        "infer",
        str(orientation_bundle),
        str(orientation_data[1]),
        "-o",
        str(out),
        "--trust",
        str(keys / "signing.pub"),
    ]
    edgert(*args, check=True)
    lines = out.read_text().splitlines()
    n = len(list(orientation_data[1].rglob("*.png")))
    assert len(lines) == n
    correct = sum(
        json.loads(x)["outputs"]["fetch_name_0"][0]["label"] == json.loads(x)["id"].split("/")[0] for x in lines
    )
    assert correct / n >= 0.9
    # Simulate a crash: keep 10 whole lines and half of the 11th, then run again.
    out.write_text("\n".join(lines[:10]) + "\n" + lines[10][: len(lines[10]) // 2])
    proc = edgert(*args, "--csv", str(table), check=True)
    assert f"scored {n - 10} new items" in proc.stderr
    again = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert sorted(again) == sorted(json.loads(x)["id"] for x in lines)  # every item exactly once
    with open(table) as f:
        assert len(list(csv.reader(f))) == n + 1


def test_batch_infer_video(
    orientation_bundle: Path, keys: Path, orientation_data: tuple[Path, Path], tmp_path: Path
) -> None:
    video = _video(orientation_data[1], tmp_path / "v.avi")
    out = tmp_path / "v.jsonl"
    edgert(
        "infer", str(orientation_bundle), str(video), "-o", str(out), "--trust", str(keys / "signing.pub"), check=True
    )
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert ids == [f"frame-{i:06d}" for i in range(12)]

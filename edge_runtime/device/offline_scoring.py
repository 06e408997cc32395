"""`edgert infer BUNDLE INPUT`: offline scoring of an image folder, a video file or a folder
of .npy arrays at full batch size, written as JSON lines (and optionally CSV).

Re-running on the same output resumes: items already in the file are skipped, and a line cut
short by a crash is discarded, so every item ends up exactly once.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from edge_runtime.serving.preprocess import IMAGE_SUFFIXES, preprocess, read_image
from edge_runtime.serving.results import summarize
from edge_runtime.serving.runtime import Runtime

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm")


def _done_ids(out: Path) -> set[str]:
    """Ids already scored; truncates a torn last line left by a crash."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(out, "r+b") as f:
            f.truncate(len(keep))
    ids = set()
    for line in keep.splitlines():
        try:
            ids.add(json.loads(line)["id"])
        except (ValueError, KeyError):
            continue
    return ids


def _items(src: Path, runtime: Runtime, model: str) -> tuple[int, Iterator[tuple[str, np.ndarray]]]:
    handle = runtime.get(model)
    spec = handle.manifest.preprocess
    if src.is_file() and src.suffix.lower() in VIDEO_SUFFIXES:
        import cv2

        if spec is None:
            raise ValueError(f"{src}: video needs image preprocessing, and the bundle has none")
        cap = cv2.VideoCapture(str(src))
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))

        def video() -> Iterator[tuple[str, np.ndarray]]:
            i = 0
            while True:
                ok, frame = cap.read()
                if not ok:
                    cap.release()
                    return
                yield f"frame-{i:06d}", preprocess(frame, spec)
                i += 1

        return total, video()
    if not src.is_dir():
        raise ValueError(f"{src}: expected an image folder, a folder of .npy arrays, or a video file")
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (*IMAGE_SUFFIXES, ".npy"))
    if not files:
        raise ValueError(f"{src}: no images or .npy files")

    def folder() -> Iterator[tuple[str, np.ndarray]]:
        for p in files:
            if p.suffix.lower() == ".npy":
                arr = np.load(p, allow_pickle=False)
            elif spec is None:
                raise ValueError(f"{p}: images need preprocessing, and the bundle has none")
            else:
                arr = preprocess(read_image(p), spec)
            yield str(p.relative_to(src)), arr

    return len(files), folder()


def run_batch(runtime: Runtime, model: str, src: Path, out: Path, csv_out: Path | None, quiet: bool = False) -> int:
    handle = runtime.get(model)
    if len(handle.inputs) != 1:
        raise ValueError(f"model {model!r} has {len(handle.inputs)} inputs; batch scoring takes single-input models")
    name = handle.inputs[0].name
    batch = handle.settings.max_batch if handle.settings.batchable else 1
    done = _done_ids(out)
    total, items = _items(src, runtime, model)
    written = 0
    progress = Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=quiet)
    with progress, open(out, "a") as f:
        task = progress.add_task("score", total=total, completed=len(done))
        pending: list[tuple[str, np.ndarray]] = []

        def flush() -> None:
            nonlocal written
            if not pending:
                return
            outputs = runtime.infer(model, {name: np.stack([a for _, a in pending])})
            for i, (item_id, _) in enumerate(pending):
                row = {k: v[i : i + 1] for k, v in outputs.items()}
                line: dict[str, Any] = {"id": item_id, "model": model, "version": handle.current.version}
                line["outputs"] = summarize(row, handle.manifest.labels)
                f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())  # what is written stays written: a rerun resumes after it
            written += len(pending)
            progress.advance(task, len(pending))
            pending.clear()

        for item_id, arr in items:
            if item_id in done:
                continue
            pending.append((item_id, arr))
            if len(pending) >= batch:
                flush()
        flush()
    if csv_out is not None:
        _to_csv(out, csv_out)
    return written


def _to_csv(jsonl: Path, dest: Path) -> None:
    with open(jsonl) as src, open(dest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "output", "label", "score"])
        for line in src:
            doc = json.loads(line)
            for name, value in doc["outputs"].items():
                if isinstance(value, list) and value:
                    w.writerow([doc["id"], name, value[0]["label"], value[0]["score"]])
                else:
                    w.writerow([doc["id"], name, "", value.get("mean", "")])

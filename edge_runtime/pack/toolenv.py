"""The isolated tool environment for TFLite conversion (TensorFlow + onnx2tf).

onnx2tf pins old TensorFlow, numpy and ONNX versions (1.29.24: tensorflow 2.19, numpy 1.26,
onnx 1.19) that cannot live beside this project's own, so conversion runs in a venv of its own,
as a subprocess. It is created on first use (from PyPI; the only step that needs the network),
reused after, and lives in ``$EDGERT_TOOLS_DIR`` (default ``~/.cache/edge-runtime/tools``).
``EDGERT_TOOLS_OFFLINE=1`` forbids creating it: a missing environment is then an error that
says how to create it. Conversion itself runs with every proxy variable pointing nowhere, so a
tool that tries to download something (onnx2tf fetches a sample calibration file unless it
finds one) fails loudly instead of reaching out; the tests also run it in an empty network
namespace. A device never has any of this.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import venv
from collections.abc import Callable
from pathlib import Path

ONNX2TF = "onnx2tf==1.29.24"
# onnx2tf's own metadata pins TensorFlow and friends; these are imported at run time but not
# declared by it.
EXTRA = ["sng4onnx==1.0.5", "tf-keras==2.19.0"]
STAMP = "edgert-tools.json"


class ToolEnvError(Exception):
    pass


def tools_dir() -> Path:
    return Path(os.environ.get("EDGERT_TOOLS_DIR") or Path.home() / ".cache" / "edge-runtime" / "tools")


def env_path() -> Path:
    return tools_dir() / ("tflite-" + ONNX2TF.replace("==", "-"))


def python() -> Path:
    return env_path() / "bin" / "python"


def ready() -> bool:
    stamp = env_path() / STAMP
    return stamp.exists() and json.loads(stamp.read_text()).get("packages") == [ONNX2TF, *EXTRA]


def ensure(log: Callable[[str], object] = print) -> Path:
    """The tool env's python, creating the env if needed."""
    if ready():
        return python()
    if os.environ.get("EDGERT_TOOLS_OFFLINE") == "1":
        raise ToolEnvError(
            f"the TFLite converter environment is missing ({env_path()}) and EDGERT_TOOLS_OFFLINE=1 forbids "
            "creating it; run `edgert tools install` on a machine with PyPI access (or copy that folder)"
        )
    path = env_path()
    log(f"creating the TFLite converter environment in {path} (first use; TensorFlow, onnx2tf: a few minutes)")
    path.parent.mkdir(parents=True, exist_ok=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    cmd = [str(python()), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off",
           ONNX2TF, *EXTRA]  # fmt: skip
    # pip's own lines as progress (a few minutes of silence otherwise): every package it collects
    # and the final install are reported; the rest is kept for the error message.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    started = time.monotonic()
    for line in proc.stdout:
        line = line.rstrip()
        tail = [*tail[-40:], line]
        if line.startswith(("Collecting ", "Installing collected packages", "Successfully installed")):
            log(f"  tool env [{time.monotonic() - started:4.0f} s] {line[:150]}")
    if proc.wait() != 0:
        raise ToolEnvError("could not create the TFLite converter environment: " + "\n".join(tail[-15:]))
    (path / STAMP).write_text(json.dumps({"packages": [ONNX2TF, *EXTRA], "python": sys.version.split()[0]}))
    return python()


def offline_env() -> dict[str, str]:
    """The environment conversions run in: no proxy leads anywhere, no telemetry, quiet TF."""
    nowhere = "http://127.0.0.1:9"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy",)}
    env.update({"HTTP_PROXY": nowhere, "HTTPS_PROXY": nowhere, "http_proxy": nowhere, "https_proxy": nowhere,
                "ALL_PROXY": nowhere, "all_proxy": nowhere, "NO_PROXY": "", "no_proxy": "",
                "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "PYTHONNOUSERSITE": "1",
                "PIP_NO_INDEX": "1"})  # fmt: skip
    env.pop("PYTHONPATH", None)
    return env

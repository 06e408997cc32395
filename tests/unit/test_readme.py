"""The README says what the program does: its CLI block lists every subcommand's flags and no flag
the parser lacks; its configuration block lists every config field."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from edge_runtime.cli.main import build_parser

pytestmark = pytest.mark.unit

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _block(heading: str) -> str:
    section = README.split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


def _commands(parser: argparse.ArgumentParser, path: str = "") -> dict[str, set[str]]:
    """'pack' -> its long options (shown in --help); nested: 'fleet rollout' -> ..."""
    found: dict[str, set[str]] = {}
    opts = {o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings if o.startswith("--")}
    found[path] = opts - {"--help", "--version", "--verbose"}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_commands(sub, f"{path} {name}".strip()))
    return found


def test_every_flag_is_in_the_readme_cli_block_and_none_that_is_not_real() -> None:
    block = _block("CLI")
    commands = _commands(build_parser())
    missing = {f"{cmd}: {o}" for cmd, opts in commands.items() for o in opts if not re.search(rf"{o}\b", block)}
    assert not missing, f"flags missing from the README's CLI block: {sorted(missing)}"
    known = set().union(*commands.values()) | {"--version", "--verbose", "--help"}
    unknown = sorted(set(re.findall(r"--[a-z][a-z0-9-]*", block)) - known)
    assert not unknown, f"the README's CLI block lists flags the program does not have: {unknown}"


def test_every_config_field_is_in_the_readme_configuration_block() -> None:
    from pydantic import BaseModel

    from edge_runtime.device.config import ServeConfig

    block = _block("Configuration (`edgert serve --config edgert.yaml`)")

    def fields(model: type[BaseModel], prefix: str = "") -> list[str]:
        out = []
        for name, info in model.model_fields.items():
            out.append(prefix + name)
            ann = info.annotation
            for arg in (*getattr(ann, "__args__", ()), ann):
                for sub in (*getattr(arg, "__args__", ()), arg):
                    if isinstance(sub, type) and issubclass(sub, BaseModel):
                        out += fields(sub, prefix + name + ".")
        return out

    missing = [f for f in fields(ServeConfig) if not re.search(rf"\b{f.rsplit('.', 1)[-1]}:", block)]
    assert not missing, f"config fields missing from the README's configuration block: {missing}"


def test_the_layout_section_names_every_package_folder_and_no_other() -> None:
    root = Path(__file__).resolve().parents[2]
    block = _block("Layout")
    listed = set(re.findall(r"^  ([a-z_]+)/", block, re.M))
    real = {p.name for p in (root / "edge_runtime").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert listed == real, f"README Layout lists {sorted(listed)}, the package holds {sorted(real)}"
    top = set(re.findall(r"^([a-z]+)/", block, re.M))
    assert top and all((root / t).is_dir() for t in top), top


def test_shell_completion_comes_from_the_parser(tmp_path: Path) -> None:
    """`edgert completion bash` completes subcommands and each subcommand's flags in a real bash."""
    import shutil
    import subprocess

    from edge_runtime.cli.completion import script

    if not shutil.which("bash"):
        pytest.skip("no bash here")
    (tmp_path / "c.sh").write_text(script("bash"))
    probe = """source {f}
    complete_at() {{ COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _edgert; echo "${{COMPREPLY[@]}}"; }}
    complete_at edgert pa; complete_at edgert serve --gr; complete_at edgert fleet rollout --str"""
    out = subprocess.run(["bash", "-c", probe.format(f=tmp_path / "c.sh")], capture_output=True, text=True).stdout
    assert out.splitlines() == ["pack", "--group --grpc-port", "--strategy"], out
    assert script("zsh").startswith("autoload -U +X bashcompinit")

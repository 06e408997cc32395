"""The CLI's one console (stderr) and its refusal helper."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True, soft_wrap=True)


def fail(message: str) -> int:
    """Print a refusal (user data: no rich markup) and return the failure exit code."""
    console.print(message, style="red", markup=False)
    return 1

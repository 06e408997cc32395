"""The CLI's one console (stderr) and its refusal helper."""

from __future__ import annotations

from rich.console import Console

# log_path=False: lines for people carry no source file and line (-v shows tracebacks instead)
console = Console(stderr=True, soft_wrap=True, log_path=False)


def fail(message: str) -> int:
    """Print a refusal (user data: no rich markup) and return the failure exit code."""
    console.print(message, style="red", markup=False)
    return 1


def describe_error(e: BaseException) -> str:
    """One line for a person: what was wrong, without a traceback or a library's URL."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        parts = []
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
        return "; ".join(parts)
    return str(e) or type(e).__name__

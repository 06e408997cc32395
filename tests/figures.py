"""Figures a test measured, printed at the end of the run (pytest's terminal summary), so that a CI
log shows them although pytest captures test output: e.g. the arm64 job's serve, update, rollback
and refusal figures."""

from __future__ import annotations

FIGURES: list[tuple[str, str, str]] = []


def record(section: str, what: str, figure: str) -> None:
    FIGURES.append((section, what, figure))

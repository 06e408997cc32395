"""Bounded JSON from the network: size and nesting depth are checked before the parser runs.

``json.loads`` recurses once per nesting level, so a 2 kB message of ``[[[[...`` raises
``RecursionError`` deep inside whatever thread called it (an MQTT network thread, once, which
then never ran again). Every message a device or the controller reads from the broker, and every
JSON body the daemon reads, goes through ``parse_json``: one linear scan counts the depth
outside strings, and anything too large or too deep is refused with a ``WireError`` that says
which limit and by how much, before any parsing.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32


class WireError(ValueError):
    """A message refused before or while parsing; ``reason`` is a short label for counting."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def nesting_depth(raw: bytes, limit: int) -> int:
    """The deepest ``[``/``{`` nesting outside strings, scanning stops once past ``limit``."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def parse_json(raw: bytes | bytearray | memoryview, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``raw`` as JSON within the limits, or raise ``WireError`` (never RecursionError)."""
    data = bytes(raw)
    if len(data) > max_bytes:
        raise WireError("oversized", f"{len(data)} bytes, limit {max_bytes}")
    if nesting_depth(data, max_depth) > max_depth:
        raise WireError("too-deep", f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WireError("malformed", f"not JSON: {e}") from e
    except RecursionError as e:  # belt and braces: the scan above should make this unreachable
        raise WireError("too-deep", "JSON nested too deep to parse") from e

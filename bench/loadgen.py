"""A lean closed-loop HTTP load generator: C keep-alive connections on one asyncio loop, each
sending a pre-encoded request and waiting for its answer before the next. One process, no
per-request encoding, so it takes as little of the shared cores as a Python client can.

    python bench/loadgen.py HOST PORT REQUEST_FILE CONCURRENCY SECONDS   -> JSON on stdout

REQUEST_FILE holds the complete HTTP request (head and body) sent as is.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def _one(host: str, port: int, request: bytes, stop: float, lat: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if status == 200:
                lat.append((time.perf_counter() - t0) * 1000)
            else:
                errors[0] += 1
    except (OSError, asyncio.IncompleteReadError):
        errors[0] += 1
    finally:
        writer.close()


async def run(host: str, port: int, request: bytes, concurrency: int, seconds: float) -> dict[str, object]:
    lat: list[float] = []
    errors = [0]
    t0 = time.perf_counter()
    stop = t0 + seconds
    await asyncio.gather(*(_one(host, port, request, stop, lat, errors) for _ in range(concurrency)))
    return {"latencies": lat, "errors": errors[0], "wall": time.perf_counter() - t0}


def main() -> None:
    host, port, path, conc, seconds = sys.argv[1:6]
    request = open(path, "rb").read()  # noqa: SIM115
    result = asyncio.run(run(host, int(port), request, int(conc), float(seconds)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

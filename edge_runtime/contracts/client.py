"""Python client for the daemon: numpy in, numpy out, over the binary tensor extension.

    >>> c = Client("http://127.0.0.1:8000")          # or Client("unix:/run/edgert.sock")
    >>> c.infer("orientation", batch)["fetch_name_0"]

One keep-alive connection per client; a client is not shared between threads.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import urlparse

import numpy as np

from edge_runtime.contracts.oip import HEADER_LENGTH, decode_response, encode_request


class ClientError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class _TCPConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # see server.Handler.setup


class Client:
    """A small Open Inference Protocol v2 client (keep-alive HTTP or a unix socket), binary tensors by
    default. Owns one connection; never retries a request on its own (inference is not idempotent
    for stateful models)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 60.0) -> None:
        self.url = url
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.url.startswith("unix:"):
                self._conn = _UnixConnection(self.url[5:], self.timeout)
            else:
                u = urlparse(self.url)
                self._conn = _TCPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=self.timeout)
        return self._conn

    def _request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=headers or {})
                resp = conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.close()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                self.close()  # a kept-alive connection the server closed: retry once on a new one
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _json(self, path: str) -> tuple[int, Any]:
        status, _, data = self._request("GET", path)
        return status, json.loads(data) if data else None

    def live(self) -> bool:
        return self._json("/v2/health/live")[0] == 200

    def ready(self) -> bool:
        return self._json("/v2/health/ready")[0] == 200

    def metadata(self, model: str) -> dict[str, Any]:
        status, doc = self._json(f"/v2/models/{model}")
        if status != 200:
            raise ClientError(status, doc.get("error", "") if isinstance(doc, dict) else "")
        return dict(doc)

    def metrics(self) -> str:
        return self._request("GET", "/metrics")[2].decode()

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray] | np.ndarray,
        version: str | None = None,
        timeout_ms: float | None = None,
    ) -> dict[str, np.ndarray]:
        if isinstance(inputs, np.ndarray):
            meta = self.metadata(model)
            inputs = {meta["inputs"][0]["name"]: inputs}
        body, header_len = encode_request(inputs, binary=True)
        headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_len)}
        if timeout_ms is not None:
            doc = json.loads(body[: header_len or len(body)])
            doc["parameters"]["timeout_ms"] = timeout_ms
            head = json.dumps(doc, separators=(",", ":")).encode()
            body, headers[HEADER_LENGTH] = head + body[header_len:], str(len(head))
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        status, resp_headers, data = self._request("POST", path, body, headers)
        if status != 200:
            try:
                message = json.loads(data).get("error", "")
            except ValueError:
                message = data[:200].decode(errors="replace")
            raise ClientError(status, message)
        length = resp_headers.get(HEADER_LENGTH.lower())
        return decode_response(data, int(length) if length else None)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

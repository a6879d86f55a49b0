"""Limits on how much and how slowly a client may send, so no connection can tie up the server.

- `GuardedH11Protocol`: uvicorn's h11 protocol with a deadline for request headers
  (uvicorn has none: a client that stalls mid-header otherwise keeps its connection forever).
- `RequestLimits`: ASGI middleware that reads the body before the app sees it, refusing
  more than `max_bytes` (413, checked against Content-Length before reading) and a body
  that stalls for `body_timeout` seconds (408).
"""
from __future__ import annotations

import asyncio
import json
from typing import Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class GuardedH11Protocol(H11Protocol):
    header_timeout = 10.0   # set by the server from --header-timeout

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: Optional[asyncio.TimerHandle] = None
        self._arm()

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.header_timeout, self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline = None
        partial = bool(self.conn.trailing_data[0])
        never_asked = self.cycle is None
        if self._between_requests() and (partial or never_asked) and not self.transport.is_closing():
            self.conn.send(h11.ConnectionClosed()) if self.conn.our_state is not h11.ERROR else None
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self._between_requests():
            self._arm()  # a new request starts arriving: its headers get header_timeout seconds
        super().data_received(data)

    def connection_lost(self, exc) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)


class _Refused(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class RequestLimits:
    """ASGI middleware: bounded request bodies, read in full (with a stall timeout) before the app runs."""

    def __init__(self, app, max_bytes: int, body_timeout: float):
        self.app, self.max_bytes, self.body_timeout = app, max_bytes, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            body = await self._read_body(scope, receive)
        except _Refused as e:
            return await _send_error(send, e.status, e.message, e.code)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: http.disconnect, which handlers watch for

        await self.app(scope, replay, send)

    async def _read_body(self, scope, receive) -> bytes:
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            raise _Refused(413, f"request body larger than {self.max_bytes} bytes (--max-request-bytes)",
                           "request_too_large")
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                raise _Refused(408, f"request body not received within {self.body_timeout:g}s "
                                    "(--body-timeout)", "request_timeout") from None
            if message["type"] == "http.disconnect":
                raise _Refused(400, "client disconnected", "disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _Refused(413, f"request body larger than {self.max_bytes} bytes (--max-request-bytes)",
                               "request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def _send_error(send, status: int, message: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

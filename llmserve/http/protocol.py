"""uvicorn's HTTP protocol with a header deadline and a header size cap (slowloris).

uvicorn (0.54) times out idle keep-alive connections (`timeout_keep_alive`) but nothing
bounds how long a client may take to *send* a request's headers: a connection that dribbles
one header byte every few seconds is held forever, and enough of them exhaust the server's
file descriptors. llama.cpp-style local servers are often reachable on a LAN, so the guard
here closes a connection whose request line and headers have not all arrived within
--timeout_headers seconds of the request's first byte (or of the connection's start), and
answers 431 when they exceed --max_header_bytes. Bodies are bounded by http/guard.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def guarded_protocol(timeout_headers: float, max_header_bytes: int) -> type[asyncio.Protocol]:
    """A HttpToolsProtocol subclass with these limits (uvicorn.run(http=...) takes a class)."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None
            self._header_bytes: int | None = 0  # None: between headers and the next request
            self._tail = b""

        def _arm(self) -> None:
            self._disarm()
            self._header_bytes, self._tail = 0, b""
            self._header_timer = self.loop.call_later(timeout_headers, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            self.logger.info("closing a connection whose request headers took over %g s",
                             timeout_headers)
            self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._header_bytes is not None:
                # NOTE: count up to the blank line that ends the headers, so a body arriving
                # in the same read never counts (3 bytes kept: the line may straddle reads)
                window = self._tail + data
                end = window.find(b"\r\n\r\n")
                self._header_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._tail))
                self._tail = window[-3:]
                if self._header_bytes > max_header_bytes:
                    self._disarm()
                    self._header_bytes = None
                    self._reply_431()
                    return
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            self._header_bytes = None
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._header_bytes, self._tail = 0, b""  # the next request's headers count from here

        def _reply_431(self) -> None:
            msg = b"request headers too large"
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
                b"content-length: " + str(len(msg)).encode() + b"\r\nconnection: close\r\n\r\n"
                + msg
            )
            self.transport.close()

    return GuardedHttpToolsProtocol

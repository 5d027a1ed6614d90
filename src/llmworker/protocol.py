"""The HTTP/1.1 connection: uvicorn's httptools protocol, with the bounds a server
facing strangers needs.

uvicorn alone starts no timer before a connection's first request and reads headers
without limit, so a client that connects and sends nothing, or trickles its headers or
body, holds a socket for as long as it likes. Here:

- a request's line and headers must arrive within ``HTTP_IDLE_TIMEOUT_S`` of its first
  byte (or of the connection, for its first request), however they trickle in;
- a body must keep coming: a connection that sends nothing of it for
  ``HTTP_IDLE_TIMEOUT_S`` is closed, and a whole request may take six times that;
- between requests uvicorn's keep-alive timeout applies; while a response streams (an
  event stream), the client owes nothing;
- a request with more than ``HTTP_MAX_HEADERS`` headers, or more than
  ``HTTP_MAX_HEADER_BYTES`` of request line and headers, is answered 431 and closed.
"""

from __future__ import annotations

from asyncio import TimerHandle, Transport

import httptools
import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from llmworker.settings import Settings

log = structlog.get_logger("llmworker.http")


class _Refused(Exception):
    """Raised inside a parser callback to stop reading a request that is over a bound."""


class BoundedHttpProtocol(HttpToolsProtocol):
    # Class attributes: uvicorn builds one protocol per connection from the class it is
    # given, also in the processes of --workers, which call configure() at start-up.
    idle_timeout_s = 20.0
    max_headers = 100
    max_header_bytes = 32768

    @classmethod
    def configure(cls, settings: Settings) -> None:
        cls.idle_timeout_s = settings.http_idle_timeout_s
        cls.max_headers = settings.http_max_headers
        cls.max_header_bytes = settings.http_max_header_bytes

    def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._idle: TimerHandle | None = None
        # A request is being read (or none has begun): silence counts.
        self._reading = True
        # Between a request's first byte and the end of its headers.
        self._in_head = False
        self._head_bytes = 0
        self._raw_head_bytes = 0
        self._headers = 0
        self._started = self.loop.time()
        self._arm(self.idle_timeout_s)

    def shutdown(self) -> None:
        """The server stops: open event streams end now (api.py), instead of holding the
        shutdown until uvicorn cancels them."""
        closing = self.app_state.get("closing")
        if closing is not None:
            closing.set()
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Refused):
                self._refuse(str(exc.__context__))
                return
            self._invalid()
            return
        except httptools.HttpParserError:
            self._invalid()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        if self._in_head and not self.transport.is_closing():
            # Headers still incomplete: the parser holds what came so far. (Complete ones
            # are counted apart, exactly, in on_url and on_header.)
            self._raw_head_bytes += len(data)
            if self._raw_head_bytes > self.max_header_bytes:
                self._refuse(f"more than {self.max_header_bytes} bytes of headers")
                return
        if not self._reading:
            self._disarm()
        elif not self._in_head:
            # A body that keeps coming keeps the connection, within the whole deadline.
            left = self._started + 6 * self.idle_timeout_s - self.loop.time()
            self._arm(min(self.idle_timeout_s, max(0.0, left)))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        if not self._reading:
            # A new request on a kept-alive connection: its own head deadline.
            self._reading = True
            self._started = self.loop.time()
            self._arm(self.idle_timeout_s)
        self._headers = 0

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers += 1
        if self._headers > self.max_headers:
            raise _Refused(f"more than {self.max_headers} headers")
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_header_bytes:
            raise _Refused(f"more than {self.max_header_bytes} bytes of headers")

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # Read in full: the answer may take long (an event stream) and the client owes
        # nothing meanwhile.
        self._reading = False
        self._in_head = False
        self._head_bytes = 0
        self._raw_head_bytes = 0
        self._disarm()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._idle = self.loop.call_later(seconds, self._idle_out)

    def _disarm(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _idle_out(self) -> None:
        self._idle = None
        if self._reading and not self.transport.is_closing():
            log.debug("http_connection_idle", client=_peer(self.client))
            self.transport.close()

    def _invalid(self) -> None:
        log.debug("http_request_invalid", client=_peer(self.client))
        self.send_400_response("Invalid HTTP request received.")

    def _refuse(self, why: str) -> None:
        """431: the request's headers are over a bound; the connection closes."""
        log.info("http_headers_refused", reason=why, client=_peer(self.client))
        message = f"Request header fields too large: {why}.".encode()
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(message)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + message
        )
        self.transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "-"

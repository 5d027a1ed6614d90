"""The HTTP/1.1 connection: uvicorn's httptools protocol, with the bounds a server
facing strangers needs.

uvicorn alone starts no timer before a connection's first request and reads headers
without limit, so a client that connects and sends nothing, or trickles its headers or
body, holds a socket for as long as it likes. Here a connection is always in one of four
phases, each with its rule:

- waiting for a request: closed at a fixed deadline, ``HTTP_IDLE_TIMEOUT_S`` after it
  opened, or uvicorn's keep-alive timeout after the last answer; stray bytes (empty
  lines) do not extend it;
- reading a request's line and headers: they must all arrive within
  ``HTTP_IDLE_TIMEOUT_S`` of the request's first byte, however they trickle in; more
  than ``HTTP_MAX_HEADERS`` headers, or more than ``HTTP_MAX_HEADER_BYTES`` of line and
  headers, are answered 431 and the connection closed;
- reading its body: the body must keep coming (nothing for ``HTTP_IDLE_TIMEOUT_S``
  closes the connection) and the whole request must be read within six times that;
  while uvicorn itself has paused reading (the app has not taken what came), the client
  owes nothing;
- answering: the client owes nothing (an event stream may last hours).
"""

from __future__ import annotations

from asyncio import TimerHandle, Transport
from typing import Literal

import httptools
import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from llmworker.settings import Settings

log = structlog.get_logger("llmworker.http")

# A whole request (line, headers and body) may take this many idle timeouts.
WHOLE_REQUEST_IDLE_TIMEOUTS = 6


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
        self._timer: TimerHandle | None = None
        # Which part of a request the parser is in (None: between requests).
        self._parsing: Literal["head", "body"] | None = None
        self._head_bytes = 0
        self._raw_head_bytes = 0
        self._headers = 0
        self._request_deadline = 0.0
        self._waiting_deadline = self.loop.time() + self.idle_timeout_s
        self._arm_at(self._waiting_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """The server stops: open event streams end now (api.py), instead of holding the
        shutdown until uvicorn cancels them."""
        closing = self.app_state.get("closing")
        if closing is not None:
            closing.set()
        super().shutdown()

    # -- reading ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        began_in_head = self._parsing == "head"
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
        if self.transport.is_closing():
            return
        if began_in_head and self._parsing == "head":
            # Headers still incomplete after a whole read: the parser holds what came.
            # (Complete ones are counted apart, exactly, in on_url and on_header.)
            self._raw_head_bytes += len(data)
            if self._raw_head_bytes > self.max_header_bytes:
                self._refuse(f"more than {self.max_header_bytes} bytes of headers")
                return
        self._schedule()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._parsing = "head"
        self._head_bytes = self._raw_head_bytes = self._headers = 0
        self._request_deadline = (
            self.loop.time() + WHOLE_REQUEST_IDLE_TIMEOUTS * self.idle_timeout_s
        )
        self._arm_at(self.loop.time() + self.idle_timeout_s)

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
        self._parsing = "body"
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._parsing = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Waiting for the next request (unless one was pipelined): one timer, ours, with
        # uvicorn's keep-alive timeout as a fixed deadline.
        self._unset_keepalive_if_required()
        self._waiting_deadline = self.loop.time() + self.timeout_keep_alive
        self._schedule()

    # -- timers ----------------------------------------------------------------------

    def _answering(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _schedule(self) -> None:
        """The timer the connection's phase calls for (the head's was set when it began)."""
        if self._parsing == "body":
            idle = self.loop.time() + self.idle_timeout_s
            self._arm_at(min(idle, self._request_deadline))
        elif self._parsing is None:
            if self._answering():
                self._disarm()
            else:
                self._arm_at(self._waiting_deadline)

    def _arm_at(self, when: float) -> None:
        self._disarm()
        self._timer = self.loop.call_at(when, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._parsing == "body" and self.flow.read_paused:
            # uvicorn stopped reading (the app has not taken what came): not the client.
            self._arm_at(self.loop.time() + self.idle_timeout_s)
            return
        if self._parsing is None and self._answering():
            return
        log.debug(
            "http_connection_idle", phase=self._parsing or "waiting", client=_peer(self.client)
        )
        self.transport.close()

    # -- refusing --------------------------------------------------------------------

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

"""HTTP/1.1 plumbing of the local Hub: keep-alive connections, request bodies, faults, replies."""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from ._server_api import Request, Response, Route
from ._server_store import HubRequestError

if TYPE_CHECKING:
    from .server import LocalHub

logger = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
# Seconds an idle keep-alive connection stays open before its thread ends.
IDLE_TIMEOUT = 120


class _ConnectionDropped(Exception):
    """The connection ends without a reply: a ``cut`` fault, or a client that went away."""


class HubHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that tracks its open connections, so stopping can close them."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], hub: LocalHub) -> None:
        self.hub = hub
        self._connections: set[socket.socket] = set()
        super().__init__(address, HubRequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.hub._lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.hub._lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down every open connection, which ends the threads waiting on them."""
        with self.hub._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # Already closed by the peer.


class HubRequestHandler(BaseHTTPRequestHandler):
    """Serves one connection: parses each request, applies faults, runs the route, replies."""

    protocol_version = "HTTP/1.1"
    server_version = "hf-lifecycle-local-hub"
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT
    server: HubHTTPServer

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        # The default line contains the query string, which carries LFS upload signatures.
        logger.debug("%s %s -> %s", self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s: " + format, self.address_string(), *args)

    # ------------------------------------------------------------------ request bodies

    def _prepare_body(self) -> None:
        self._remaining: int | None = None
        self._chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        self._body_done = False
        self._body_read = 0
        self._cut_after: int | None = None
        if not self._chunked:
            length = self.headers.get("Content-Length") or "0"
            if not length.isdigit():
                self.close_connection = True
                raise HubRequestError(400, f"Invalid Content-Length {length!r}.")
            self._remaining = int(length)
            self._body_done = self._remaining == 0

    def _read(self, size: int, *, line: bool = False) -> bytes:
        """Read up to ``size`` bytes, or one line of at most ``size`` bytes, of the body."""
        try:
            data = self.rfile.readline(size) if line else self.rfile.read(size)
        except OSError as err:
            raise _ConnectionDropped() from err
        if not data:
            raise _ConnectionDropped()
        return data

    def _raw_chunks(self) -> Iterator[bytes]:
        if self._chunked:
            while True:
                size_field = self._read(1024, line=True).split(b";")[0].strip()
                if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size_field):
                    self.close_connection = True
                    raise HubRequestError(400, f"Invalid chunk size {size_field[:20]!r}.")
                size = int(size_field, 16)
                if size == 0:
                    while self._read(1024, line=True) not in (b"\r\n", b"\n"):
                        pass  # Trailer fields are ignored.
                    return
                while size > 0:
                    data = self._read(min(size, _CHUNK))
                    size -= len(data)
                    yield data
                self._read(16, line=True)
        else:
            assert self._remaining is not None
            while self._remaining > 0:
                data = self._read(min(self._remaining, _CHUNK))
                self._remaining -= len(data)
                yield data

    def _iter_body(self) -> Iterator[bytes]:
        """Yield the request body once. A ``cut`` fault resets the connection part way."""
        if self._body_done:
            return
        self._body_done = True
        for data in self._raw_chunks():
            if self._cut_after is not None and self._body_read + len(data) >= self._cut_after:
                keep = self._cut_after - self._body_read
                if keep > 0:
                    self._body_read += keep
                    yield data[:keep]
                raise _ConnectionDropped()
            self._body_read += len(data)
            yield data

    def _read_body(self) -> bytes:
        return b"".join(self._iter_body())

    def _drain_body(self) -> None:
        for _ in self._iter_body():
            pass

    # ------------------------------------------------------------------ dispatch

    def _base_url(self) -> str:
        host = self.headers.get("Host") or ""
        if not _HOST.match(host):
            address, port = self.server.server_address[:2]
            host = f"{address}:{port}"
        return f"http://{host}"

    def _user(self, route: Route) -> str | None:
        value = self.headers.get("Authorization")
        if route.kind == "lfs_upload" or not value:
            # LFS upload URLs are signed, because the client sends those PUTs without a token.
            return None
        scheme, _, token = value.partition(" ")
        user = (
            self.server.hub._user_for_token(token.strip()) if scheme.lower() == "bearer" else None
        )
        if user is None:
            raise HubRequestError(
                401,
                "Invalid credentials in Authorization header",
                headers={"X-Error-Message": "Invalid credentials in Authorization header"},
            )
        return user

    def _dispatch(self) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        segments = [unquote(part) for part in url.path.split("/")[1:]]
        if segments and segments[-1] == "":
            segments.pop()
        route = hub._routes.route(self.command, segments)
        kind = route.kind if route is not None else "other"
        hub.stats._count(kind)
        try:
            response = self._handle(url, segments, route, kind)
        except _ConnectionDropped:
            self._reset_connection()
            return
        except HubRequestError as err:
            logger.debug("%s %s rejected: %d %s", self.command, url.path, err.status, err.message)
            response = _error_response(err)
        except Exception:
            logger.exception("Local Hub failed on %s %s", self.command, url.path)
            response = _error_response(HubRequestError(500, "Internal error of the local Hub."))
        try:
            self._finish_body()
            self._send(response)
        except _ConnectionDropped:
            self._reset_connection()
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("%s %s: the client closed the connection", self.command, url.path)
            self.close_connection = True

    def _handle(
        self, url: SplitResult, segments: list[str], route: Route | None, kind: str
    ) -> Response:
        """Apply the faults for ``kind``, then run the route. Raises to reject the request."""
        hub = self.server.hub
        self._prepare_body()
        if any(part in ("..", ".") for part in segments):
            raise HubRequestError(400, f"Invalid path {url.path!r}: '.' and '..' are not allowed.")

        fault = hub.faults._take(kind)
        if fault.delay:
            hub._stop_event.wait(fault.delay)
        if fault.cut_after is not None:
            self._cut_after = fault.cut_after
            self._drain_body()
            raise _ConnectionDropped()
        if fault.status is not None:
            self._drain_body()
            raise HubRequestError(
                fault.status, f"Injected fault: this {kind} request fails with {fault.status}."
            )

        if route is None:
            raise HubRequestError(404, f"No endpoint for {self.command} {url.path}.")
        request = Request(
            method=self.command,
            segments=segments,
            query=parse_qs(url.query, keep_blank_values=True),
            headers=self.headers,
            user=self._user(route),
            base_url=self._base_url(),
            read_body=self._read_body,
            iter_body=self._iter_body,
        )
        return route.handler(request, *route.args)

    def _finish_body(self) -> None:
        """Read what is left of the request body, so the next request on the connection parses."""
        if not self._body_done and not self.close_connection:
            if self._remaining is not None and self._remaining > 64 * _CHUNK:
                self.close_connection = True  # Cheaper to drop the connection than to read it.
                return
            self._drain_body()

    def _reset_connection(self) -> None:
        """Close the socket with a TCP reset, as a network failure would."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        logger.debug("%s %s -> connection reset", self.command, urlsplit(self.path).path)

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        headers = dict(response.headers)
        length = response.length if response.file is not None else len(response.body)
        headers["Content-Length"] = str(length)
        if self.close_connection:
            headers["Connection"] = "close"
        for name, value in headers.items():
            self.send_header(name, _header_safe(value))
        self.end_headers()
        if self.command == "HEAD":
            return
        if response.file is None:
            self.wfile.write(response.body)
            return
        with open(response.file, "rb") as handle:
            handle.seek(response.offset)
            left = response.length
            while left > 0:
                data = handle.read(min(left, _CHUNK))
                if not data:
                    logger.error("Blob %s is shorter than its recorded size", response.file)
                    raise _ConnectionDropped()
                self.wfile.write(data)
                left -= len(data)


def _error_response(err: HubRequestError) -> Response:
    headers = {"Content-Type": "application/json", **err.headers}
    if err.error_code is not None:
        headers["X-Error-Code"] = err.error_code
        headers.setdefault("X-Error-Message", err.message)
    body = json.dumps({"error": err.message}).encode()
    return Response(err.status, body, headers)


def _header_safe(value: str) -> str:
    """Return ``value`` as one line of ASCII, the only text every client accepts in a header."""
    return " ".join(value.splitlines()).encode("ascii", "backslashreplace").decode("ascii")

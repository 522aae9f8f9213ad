"""A Hugging Face Hub-compatible HTTP server that stores repositories in a local folder.

It serves the endpoints that ``huggingface_hub`` (checked with 2.4.0) and ``transformers``
use to create repositories, upload with the classic LFS protocol, commit, list and download,
so Hub code runs over real HTTP on a machine without network access::

    from hf_lifecycle.hub.server import LocalHub

    with LocalHub("./hub") as hub:
        hub.add_user("alice", token="hf_alice_local_token")
        # Point the client at it before importing huggingface_hub:
        #   HF_ENDPOINT=<hub.endpoint> HF_HUB_DISABLE_XET=1

The server cannot speak the Xet protocol, so clients must run with ``HF_HUB_DISABLE_XET=1``.
Pull requests, organizations and gated repositories are not implemented. Tokens live in
memory only. Repositories, commits and file content persist under ``path``, so a restarted
server serves the same repositories.

Concurrency: the server handles each connection on its own thread. ``add_user``, ``faults``
and ``stats`` may be used from any thread while it serves. Two servers must not share one
``path`` at the same time, because each server serializes writes with its own locks.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from hf_lifecycle.errors import ConfigurationError

from ._server_handler import HubHTTPServer
from ._server_routes import HubRoutes
from ._server_store import RESERVED_NAMESPACES, HubRequestError, RepoStore, validate_name

logger = logging.getLogger(__name__)

REQUEST_KINDS = (
    "whoami",
    "create_repo",
    "repo_info",
    "tree",
    "paths_info",
    "preupload",
    "lfs_batch",
    "lfs_upload",
    "lfs_verify",
    "commit",
    "resolve",
    "branch",
    "tag",
    "refs",
    "commits",
    "validate_yaml",
    "delete_repo",
    "settings",
    "other",
)
"""Kinds of request that :class:`Stats` counts. ``other`` covers unknown routes."""

FAULT_KINDS = REQUEST_KINDS + ("any",)
"""Kinds that :class:`Faults` accepts. ``any`` matches every request."""

__all__ = ["FAULT_KINDS", "REQUEST_KINDS", "Faults", "LocalHub", "Stats"]


def _check_kind(kind: str) -> str:
    if kind not in FAULT_KINDS:
        raise ConfigurationError(
            f"Unknown request kind {kind!r}: use one of {', '.join(FAULT_KINDS)}."
        )
    return kind


def _check_times(times: int | None) -> int | None:
    if times is not None and (not isinstance(times, int) or times < 1):
        raise ConfigurationError(
            f"Invalid times={times!r}: use a count >= 1, or None for every request."
        )
    return times


@dataclass
class _Rule:
    action: str  # "fail", "delay" or "cut"
    kind: str
    remaining: int | None  # None: applies until cleared
    status: int = 500
    seconds: float = 0.0
    after_bytes: int = 0


@dataclass(frozen=True)
class _FaultAction:
    """The faults for one request: a wait, then a connection reset or an error reply."""

    delay: float = 0.0
    status: int | None = None
    cut_after: int | None = None


class Faults:
    """Failures injected into the next requests of a kind, for testing clients' error handling.

    Each call adds a rule that applies to the next ``times`` requests of ``kind`` (``None``:
    every request until :meth:`clear`). A delay combines with a failure or a cut, and a cut
    wins over a failure. Rules of one action apply in the order they were added.
    """

    def __init__(self) -> None:
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()

    def fail(self, kind: str, *, status: int = 500, times: int | None = 1) -> None:
        """Reply to the next ``times`` requests of ``kind`` with ``status`` and a JSON error."""
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise ConfigurationError(
                f"Invalid status {status!r}: use an HTTP error status, 400 to 599."
            )
        self._add(_Rule("fail", _check_kind(kind), _check_times(times), status=status))

    def delay(self, kind: str, *, seconds: float, times: int | None = 1) -> None:
        """Wait ``seconds`` before handling the next ``times`` requests of ``kind``."""
        if not isinstance(seconds, (int, float)) or seconds < 0:
            raise ConfigurationError(f"Invalid delay {seconds!r}: use a number of seconds >= 0.")
        self._add(_Rule("delay", _check_kind(kind), _check_times(times), seconds=float(seconds)))

    def cut(self, kind: str, *, after_bytes: int = 0, times: int | None = 1) -> None:
        """Read ``after_bytes`` of the request body, then reset the connection without a reply."""
        if not isinstance(after_bytes, int) or after_bytes < 0:
            raise ConfigurationError(f"Invalid after_bytes={after_bytes!r}: use a byte count >= 0.")
        rule = _Rule("cut", _check_kind(kind), _check_times(times), after_bytes=after_bytes)
        self._add(rule)

    def clear(self) -> None:
        """Remove every rule."""
        with self._lock:
            self._rules.clear()

    def _add(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def _take(self, kind: str) -> _FaultAction:
        """Consume the rules that apply to one request of ``kind`` and return what to do."""
        with self._lock:
            delay = self._consume("delay", kind)
            cut = self._consume("cut", kind)
            fail = self._consume("fail", kind) if cut is None else None
        return _FaultAction(
            delay=delay.seconds if delay is not None else 0.0,
            status=fail.status if fail is not None else None,
            cut_after=cut.after_bytes if cut is not None else None,
        )

    def _consume(self, action: str, kind: str) -> _Rule | None:
        for rule in self._rules:
            if rule.action == action and rule.kind in (kind, "any"):
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        self._rules.remove(rule)
                return rule
        return None


class Stats:
    """Requests received per kind, and content bytes uploaded, since start or :meth:`reset`.

    ``uploaded_bytes`` counts the bodies of LFS uploads and the decoded content of regular files
    in commit requests, as the server reads them. Bodies that an injected fault discards are not
    counted.
    """

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._uploaded = 0
        self._lock = threading.Lock()

    def __getitem__(self, kind: str) -> int:
        """Return the number of requests of ``kind``, or of all kinds for ``"any"``."""
        _check_kind(kind)
        with self._lock:
            return sum(self._counts.values()) if kind == "any" else self._counts[kind]

    @property
    def requests(self) -> dict[str, int]:
        """A copy of the request counts, by kind, without zero entries."""
        with self._lock:
            return dict(self._counts)

    @property
    def uploaded_bytes(self) -> int:
        with self._lock:
            return self._uploaded

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._uploaded = 0

    def _count(self, kind: str) -> None:
        with self._lock:
            self._counts[kind] += 1

    def _add_uploaded(self, size: int) -> None:
        with self._lock:
            self._uploaded += size

    def __repr__(self) -> str:
        return f"Stats(requests={self.requests}, uploaded_bytes={self.uploaded_bytes})"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class LocalHub:
    """A local Hub server over the repositories stored in ``path``.

    ``port=0`` picks a free port, and :attr:`endpoint` gives the address once started. The
    server binds 127.0.0.1 unless ``host`` is passed. On any other address, every client that
    can reach it can read the public repositories. Use it as a context manager, or call
    :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigurationError(f"Invalid port {port!r}: use 0 (any free port) to 65535.")
        if not isinstance(host, str) or not host:
            raise ConfigurationError(f"Invalid host {host!r}: use an address such as '127.0.0.1'.")
        self.path = Path(path)
        self.host = host
        self.port = port
        self.faults = Faults()
        self.stats = Stats()
        self._lock = threading.Lock()
        self._tokens: dict[str, str] = {}
        self._store = RepoStore(self.path)
        self._routes = HubRoutes(self._store, secrets.token_bytes(32), self.stats._add_uploaded)
        self._stop_event = threading.Event()
        self._server: HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """The URL to use as ``HF_ENDPOINT``, such as ``http://127.0.0.1:8008``."""
        if self._server is None:
            raise RuntimeError(
                "The local Hub is not running: call start() or use it in a with block."
            )
        port = self._server.server_address[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{port}"

    def add_user(self, name: str, *, token: str) -> None:
        """Register user ``name`` with a token for it. A user may have several tokens."""
        try:
            validate_name(name, "user name")
        except HubRequestError as err:
            raise ConfigurationError(err.message) from err
        if name in RESERVED_NAMESPACES:
            raise ConfigurationError(f"Invalid user name {name!r}: the name is reserved.")
        if not isinstance(token, str) or not token.strip() or token != token.strip():
            raise ConfigurationError("Invalid token: use a non-empty string without spaces.")
        with self._lock:
            owner = self._tokens.get(token)
            if owner is not None and owner != name:
                raise ConfigurationError(
                    f"This token is already registered for user {owner!r}. Use a distinct token "
                    f"for {name!r}."
                )
            self._tokens[token] = name

    def _user_for_token(self, token: str) -> str | None:
        with self._lock:
            return self._tokens.get(token)

    def start(self) -> LocalHub:
        """Bind the port and serve on a background thread. Returns ``self``."""
        if self._server is not None:
            raise RuntimeError(f"The local Hub is already running at {self.endpoint}.")
        if not _is_loopback(self.host):
            logger.warning(
                "Local Hub binds %s, a non-loopback address: anyone who can reach it can read "
                "its public repositories.",
                self.host,
            )
        self._stop_event.clear()
        server_class = HubHTTPServer
        if ":" in self.host:
            server_class = type(
                "HubHTTPServer6", (HubHTTPServer,), {"address_family": socket.AF_INET6}
            )
        self._server = server_class((self.host.strip("[]"), self.port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},  # how long stop() may wait for the accept loop
            name=f"local-hub-{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.info("Local Hub serving %s from %s", self.endpoint, self.path)
        return self

    def stop(self) -> None:
        """Stop serving, close open keep-alive connections and wait for their threads."""
        server, thread = self._server, self._thread
        if server is None:
            return
        endpoint = self.endpoint
        self._stop_event.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join()
        self._server = None
        self._thread = None
        logger.info("Local Hub at %s stopped", endpoint)

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = self.endpoint if self._server is not None else "stopped"
        return f"LocalHub(path={str(self.path)!r}, {state})"

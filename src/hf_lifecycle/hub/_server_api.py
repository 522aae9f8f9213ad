"""Shared pieces of the local Hub's endpoints: parsed requests, replies and access checks."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._server_store import (
    HubRequestError,
    RepoKey,
    RepoMeta,
    RepoStore,
    bad_request,
    repo_not_found,
    validate_name,
)


@dataclass
class Request:
    """One parsed HTTP request. ``segments`` are the URL path segments, each percent-decoded."""

    method: str
    segments: list[str]
    query: dict[str, list[str]]
    headers: Any
    user: str | None
    base_url: str
    read_body: Callable[[], bytes]
    iter_body: Callable[[], Iterator[bytes]]

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        return (self.param(name) or "").lower() in ("1", "true", "yes")

    def json(self) -> Any:
        body = self.read_body()
        if not body:
            return {}
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise bad_request(f"Invalid JSON body: {err}.") from err


@dataclass
class Response:
    """A reply. ``file`` streams ``length`` bytes of a blob from ``offset`` instead of ``body``."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    file: Path | None = None
    offset: int = 0
    length: int = 0


def json_response(
    value: Any, status: int = 200, content_type: str = "application/json"
) -> Response:
    return Response(status, json.dumps(value).encode(), {"Content-Type": content_type})


@dataclass(frozen=True)
class Route:
    kind: str
    handler: Callable[..., Response]
    args: tuple[Any, ...] = ()


class RepoEndpoints:
    """Base of the endpoint classes: the store, and who may read or write a repository.

    ``count_upload`` is called with the number of content bytes each upload delivers.
    ``secret`` signs the LFS upload URLs, since the client sends those PUTs without a token.
    """

    def __init__(self, store: RepoStore, secret: bytes, count_upload: Callable[[int], None]):
        self.store = store
        self._secret = secret
        self._count_upload = count_upload

    def _key(self, raw: tuple[str, str, str]) -> RepoKey:
        repo_type, namespace, name = raw
        validate_name(namespace, "namespace")
        validate_name(name, "repository name")
        return RepoKey(repo_type, namespace, name)

    def _readable(self, request: Request, raw: tuple[str, str, str]) -> tuple[RepoKey, RepoMeta]:
        """Return the repository if the request may read it. Only the owner reads a private one."""
        key = self._key(raw)
        meta = self.store.get_repo(key)
        if meta is None or (meta.private and request.user != meta.owner):
            raise repo_not_found(key)
        return key, meta

    def _writable(self, request: Request, raw: tuple[str, str, str]) -> tuple[RepoKey, RepoMeta]:
        key, meta = self._readable(request, raw)
        if request.user is None:
            raise HubRequestError(401, f"Writing to {key.url_path} requires a token.")
        if request.user != meta.owner:
            raise HubRequestError(
                403, f"User {request.user!r} has no write access to {key.url_path}."
            )
        return key, meta

    def _repo_url(self, request: Request, key: RepoKey) -> str:
        return f"{request.base_url}/{key.url_path}"

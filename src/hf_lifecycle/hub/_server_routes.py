"""Endpoints of the local Hub: routing and the logic behind each Hub API call.

Each endpoint takes a parsed :class:`Request` and returns a :class:`Response`. The HTTP
plumbing (body framing, faults, keep-alive) is in ``_server_handler``, and the upload
endpoints are in ``_server_uploads``. Content formats follow what
the ``huggingface_hub`` client parses, checked against huggingface_hub 2.4.0.
"""

from __future__ import annotations

import hashlib
import html
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, quote

from ._server_api import Request, Response, Route, json_response
from ._server_store import (
    DEFAULT_BRANCH,
    REPO_TYPES,
    RESERVED_NAMESPACES,
    URL_PREFIXES,
    Commit,
    FileEntry,
    HubRequestError,
    RepoKey,
    bad_request,
    folder_oid,
    validate_branch_name,
    validate_file_path,
    validate_name,
)
from ._server_uploads import UploadEndpoints

_TYPE_BY_PLURAL = {plural: singular for singular, plural in REPO_TYPES.items()}
_TYPE_BY_URL_PREFIX = {prefix.rstrip("/"): kind for kind, prefix in URL_PREFIXES.items() if prefix}
_REPO_INFO_ALWAYS = ("_id", "id")


class HubRoutes(UploadEndpoints):
    """Every Hub endpoint over one :class:`RepoStore`, and the routing table that selects one."""

    # ------------------------------------------------------------------ routing

    def route(self, method: str, segments: list[str]) -> Route | None:
        """Return the endpoint for a request, or None when no endpoint matches."""
        if segments and segments[0] == "api":
            return self._route_api(method, segments[1:])
        return self._route_web(method, segments)

    def _route_api(self, method: str, rest: list[str]) -> Route | None:
        fixed = {
            ("GET", "whoami-v2"): Route("whoami", self.whoami),
            ("GET", "agent-harnesses"): Route("other", self.agent_harnesses),
            ("POST", "validate-yaml"): Route("validate_yaml", self.validate_yaml),
            ("POST", "repos/create"): Route("create_repo", self.create_repo),
            ("DELETE", "repos/delete"): Route("delete_repo", self.delete_repo),
        }
        if (method, "/".join(rest)) in fixed:
            return fixed[(method, "/".join(rest))]
        if len(rest) < 3 or rest[0] not in _TYPE_BY_PLURAL:
            return None
        key = (_TYPE_BY_PLURAL[rest[0]], rest[1], rest[2])
        action, tail = (rest[3], rest[4:]) if len(rest) > 3 else ("", [])
        table: dict[tuple[str, str], tuple[str, Callable[..., Response]]] = {
            ("GET", ""): ("repo_info", self.repo_info),
            ("GET", "revision"): ("repo_info", self.repo_info),
            ("GET", "tree"): ("tree", self.tree),
            ("POST", "paths-info"): ("paths_info", self.paths_info),
            ("POST", "preupload"): ("preupload", self.preupload),
            ("POST", "commit"): ("commit", self.commit),
            ("POST", "branch"): ("branch", self.create_branch),
            ("DELETE", "branch"): ("branch", self.delete_branch),
            ("POST", "tag"): ("tag", self.create_tag),
            ("DELETE", "tag"): ("tag", self.delete_tag),
            ("GET", "refs"): ("refs", self.refs),
            ("GET", "commits"): ("commits", self.commits),
            ("PUT", "settings"): ("settings", self.update_settings),
            ("GET", "xet-read-token"): ("other", self.xet_token),
            ("GET", "xet-write-token"): ("other", self.xet_token),
        }
        if (method, action) not in table:
            return None
        if (
            action
            in ("revision", "tree", "paths-info", "preupload", "commit", "branch", "tag", "commits")
            and not tail
        ):
            return None
        kind, handler = table[(method, action)]
        return Route(kind, handler, (key, tail))

    def _route_web(self, method: str, segments: list[str]) -> Route | None:
        repo_type = "model"
        if segments and segments[0] in _TYPE_BY_URL_PREFIX:
            repo_type = _TYPE_BY_URL_PREFIX[segments[0]]
            segments = segments[1:]
        if len(segments) < 3:
            return None
        namespace, name, rest = segments[0], segments[1], segments[2:]
        if name.endswith(".git") and rest[:3] == ["info", "lfs", "objects"]:
            key = (repo_type, namespace, name[: -len(".git")])
            if method == "POST" and rest[3:] == ["batch"]:
                return Route("lfs_batch", self.lfs_batch, (key,))
            if method == "POST" and rest[3:] == ["verify"]:
                return Route("lfs_verify", self.lfs_verify, (key,))
            if method == "PUT" and len(rest) == 4:
                return Route("lfs_upload", self.lfs_upload, (key, rest[3]))
            return None
        if method in ("GET", "HEAD") and rest[0] == "resolve" and len(rest) >= 3:
            return Route("resolve", self.resolve, ((repo_type, namespace, name), rest[1], rest[2:]))
        return None

    # ------------------------------------------------------------------ account and repositories

    def whoami(self, request: Request) -> Response:
        if request.user is None:
            raise HubRequestError(401, "A token is required: send 'Authorization: Bearer <token>'.")
        return json_response(
            {
                "type": "user",
                "id": hashlib.sha1(request.user.encode()).hexdigest()[:24],
                "name": request.user,
                "fullname": request.user,
                "email": None,
                "emailVerified": False,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "local", "role": "write"},
                },
            }
        )

    def agent_harnesses(self, request: Request) -> Response:
        # The client fetches this registry to describe the calling tool in its User-Agent.
        return json_response({"standardEnvVars": [], "harnesses": {}})

    def xet_token(self, request: Request, raw: tuple[str, str, str], tail: list[str]) -> Response:
        raise HubRequestError(
            501,
            "This server does not implement Xet storage: run the client with HF_HUB_DISABLE_XET=1 "
            "so that large files go through the LFS batch API.",
        )

    def validate_yaml(self, request: Request) -> Response:
        """Check that the README front matter is closed. The YAML itself is not parsed."""
        payload = request.json()
        content = payload.get("content", "") if isinstance(payload, dict) else ""
        lines = content.splitlines() if isinstance(content, str) else []
        if (
            lines
            and lines[0].strip() == "---"
            and not any(line.strip() == "---" for line in lines[1:])
        ):
            return json_response(
                {
                    "errors": [{"message": "The metadata block opened by '---' is never closed."}],
                    "warnings": [],
                },
                status=400,
            )
        return json_response({"errors": [], "warnings": []})

    def _repo_key_from_body(self, request: Request) -> tuple[RepoKey, dict[str, Any]]:
        payload = request.json()
        if not isinstance(payload, dict):
            raise bad_request("Expected a JSON object with 'name', 'organization' and 'type'.")
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise bad_request(
                f"Invalid repository type {repo_type!r}: use one of {sorted(REPO_TYPES)}."
            )
        if request.user is None:
            raise HubRequestError(401, "Creating or deleting a repository requires a token.")
        namespace = payload.get("organization") or request.user
        name = payload.get("name")
        validate_name(namespace, "namespace")
        validate_name(name, "repository name")
        return RepoKey(repo_type, namespace, name), payload

    def create_repo(self, request: Request) -> Response:
        key, payload = self._repo_key_from_body(request)
        if key.namespace != request.user:
            raise HubRequestError(
                403,
                f"You don't have the rights to create a repository under the namespace "
                f"{key.namespace!r}: user {request.user!r} may only create repositories under "
                f"{request.user!r}.",
            )
        if key.namespace in RESERVED_NAMESPACES:
            raise bad_request(f"Invalid namespace {key.namespace!r}: the name is reserved.")
        visibility = payload.get("visibility")
        if visibility not in (None, "public", "private", "protected"):
            raise bad_request(f"Invalid visibility {visibility!r}: use 'public' or 'private'.")
        private = visibility in ("private", "protected") or bool(payload.get("private"))
        url = self._repo_url(request, key)
        if not self.store.create_repo(key, owner=request.user, private=private):
            return json_response(
                {"error": f"You already created this {key.type} repo: {key.id}", "url": url},
                status=409,
            )
        return json_response({"url": url, "name": key.id, "id": key.id})

    def delete_repo(self, request: Request) -> Response:
        key, _ = self._repo_key_from_body(request)
        self._writable(request, (key.type, key.namespace, key.name))
        self.store.delete_repo(key)
        return json_response({})

    def update_settings(
        self, request: Request, raw: tuple[str, str, str], tail: list[str]
    ) -> Response:
        """Change a repository's visibility. Gating is not supported."""
        key, _ = self._writable(request, raw)
        payload = request.json()
        if not isinstance(payload, dict):
            raise bad_request("Expected a JSON object with 'visibility' or 'private'.")
        if payload.get("gated") not in (None, False):
            raise bad_request("Gated repositories are not supported by this server.")
        visibility = payload.get("visibility")
        if visibility is None and isinstance(payload.get("private"), bool):
            visibility = "private" if payload["private"] else "public"
        if visibility is not None:
            if visibility not in ("public", "private", "protected"):
                raise bad_request(f"Invalid visibility {visibility!r}: use 'public' or 'private'.")
            self.store.set_private(key, visibility != "public")
        return json_response({})

    def repo_info(self, request: Request, raw: tuple[str, str, str], tail: list[str]) -> Response:
        key, meta = self._readable(request, raw)
        commit = self.store.resolve(key, "/".join(tail) or DEFAULT_BRANCH)
        with_blobs = request.flag("blobs")
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry.size, blobId=entry.git_oid)
                if entry.lfs:
                    sibling["lfs"] = {
                        "size": entry.size,
                        "sha256": entry.sha256,
                        "pointerSize": entry.pointer_size,
                    }
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{key.type}/{key.id}".encode()).hexdigest()[:24],
            "id": key.id,
            "author": key.namespace,
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": meta.created_at,
            "private": meta.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(entry.size for entry in commit.files.values()),
        }
        if key.type == "model":
            info["modelId"] = key.id
        if request.flag("securityStatus"):
            info["securityRepoStatus"] = {"scansDone": True, "filesWithIssues": []}
        expand = request.query.get("expand", []) + request.query.get("expand[]", [])
        if expand:
            # Like the Hub: with expand, only the requested properties come back.
            info = {
                name: value
                for name, value in info.items()
                if name in expand or name in _REPO_INFO_ALWAYS
            }
        return json_response(info)

    # ------------------------------------------------------------------ listings

    def _tree_entry(
        self, files: dict[str, FileEntry], path: str, last: dict[str, Commit] | None
    ) -> dict[str, Any]:
        entry = files.get(path)
        if entry is None:
            item: dict[str, Any] = {
                "type": "directory",
                "oid": folder_oid(files, path),
                "size": 0,
                "path": path,
            }
        else:
            item = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
            if entry.lfs:
                item["lfs"] = {
                    "oid": entry.sha256,
                    "size": entry.size,
                    "pointerSize": entry.pointer_size,
                }
        if last is not None and path in last:
            commit = last[path]
            item["lastCommit"] = {"id": commit.id, "title": commit.title, "date": commit.date}
        return item

    def tree(self, request: Request, raw: tuple[str, str, str], tail: list[str]) -> Response:
        key, _ = self._readable(request, raw)
        commit = self.store.resolve(key, tail[0])
        folder = "/".join(tail[1:]).strip("/")
        if folder:
            validate_file_path(folder)
        files = commit.files
        prefix = folder + "/" if folder else ""
        if folder in files or (folder and not any(p.startswith(prefix) for p in files)):
            raise HubRequestError(
                404,
                f"{folder!r} is not a folder at revision {tail[0]} of {key.id}.",
                error_code="EntryNotFound",
                headers={"X-Repo-Commit": commit.id},
            )
        paths: set[str] = set()
        for path in files:
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            depth = len(parts) if request.flag("recursive") else 1
            for i in range(1, min(depth, len(parts)) + 1):
                paths.add(prefix + "/".join(parts[:i]))
        last = self.store.last_commits(key, commit, paths) if request.flag("expand") else None
        return json_response([self._tree_entry(files, path, last) for path in sorted(paths)])

    def paths_info(self, request: Request, raw: tuple[str, str, str], tail: list[str]) -> Response:
        key, _ = self._readable(request, raw)
        commit = self.store.resolve(key, "/".join(tail))
        try:
            form = parse_qs(request.read_body().decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError as err:
            raise bad_request("Invalid form body: expected UTF-8 'paths=...' fields.") from err
        requested = [
            validate_file_path(path.strip("/")) for path in form.get("paths", []) if path.strip("/")
        ]
        expand = (form.get("expand", ["false"])[-1]).lower() in ("1", "true")
        files = commit.files
        found = [
            p
            for p in dict.fromkeys(requested)
            if p in files or any(f.startswith(p + "/") for f in files)
        ]
        last = self.store.last_commits(key, commit, found) if expand else None
        return json_response([self._tree_entry(files, path, last) for path in found])

    def refs(self, request: Request, raw: tuple[str, str, str], tail: list[str]) -> Response:
        key, _ = self._readable(request, raw)
        refs = self.store.refs(key)

        def listing(table: str, prefix: str) -> list[dict[str, str]]:
            return [
                {"name": name, "ref": f"{prefix}{name}", "targetCommit": sha}
                for name, sha in sorted(refs[table].items())
            ]

        return json_response(
            {
                "branches": listing("branches", "refs/heads/"),
                "tags": listing("tags", "refs/tags/"),
                "converts": [],
                "pullRequests": [],
            }
        )

    def commits(self, request: Request, raw: tuple[str, str, str], tail: list[str]) -> Response:
        key, _ = self._readable(request, raw)
        head = self.store.resolve(key, "/".join(tail))
        formatted = "formatted" in request.query.get("expand[]", []) + request.query.get(
            "expand", []
        )
        items = []
        for commit in self.store.history(key, head):
            item: dict[str, Any] = {
                "id": commit.id,
                "title": commit.title,
                "message": commit.message,
                "authors": [{"user": commit.author, "avatar": None}],
                "date": commit.date,
            }
            if formatted:
                item["formatted"] = {
                    "title": html.escape(commit.title),
                    "message": html.escape(commit.message),
                }
            items.append(item)
        return json_response(items)

    # ------------------------------------------------------------------ branches and tags

    def create_branch(
        self, request: Request, raw: tuple[str, str, str], tail: list[str]
    ) -> Response:
        key, _ = self._writable(request, raw)
        name = validate_branch_name("/".join(tail))
        payload = request.json()
        start = payload.get("startingPoint") if isinstance(payload, dict) else None
        target = self.store.resolve(key, start or DEFAULT_BRANCH)
        self.store.create_ref(key, "branches", name, target)
        return json_response({})

    def delete_branch(
        self, request: Request, raw: tuple[str, str, str], tail: list[str]
    ) -> Response:
        key, _ = self._writable(request, raw)
        self.store.delete_ref(key, "branches", "/".join(tail))
        return json_response({})

    def create_tag(self, request: Request, raw: tuple[str, str, str], tail: list[str]) -> Response:
        key, _ = self._writable(request, raw)
        payload = request.json()
        tag = payload.get("tag") if isinstance(payload, dict) else None
        if not isinstance(tag, str):
            raise bad_request("Expected a JSON body with a 'tag' name.")
        target = self.store.resolve(key, "/".join(tail))
        self.store.create_ref(key, "tags", validate_branch_name(tag), target)
        return json_response({})

    def delete_tag(self, request: Request, raw: tuple[str, str, str], tail: list[str]) -> Response:
        key, _ = self._writable(request, raw)
        self.store.delete_ref(key, "tags", "/".join(tail))
        return json_response({})

    # ------------------------------------------------------------------ downloads

    def resolve(
        self, request: Request, raw: tuple[str, str, str], revision: str, parts: list[str]
    ) -> Response:
        key, _ = self._readable(request, raw)
        commit = self.store.resolve(key, revision)
        path = validate_file_path("/".join(parts))
        entry = commit.files.get(path)
        if entry is None:
            raise HubRequestError(
                404,
                f"Entry not found: {path!r} at revision {revision} of {key.url_path}.",
                error_code="EntryNotFound",
                headers={"X-Repo-Commit": commit.id},
            )

        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "X-Repo-Commit": commit.id,
            "ETag": f'"{entry.etag}"',
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)

        span = _parse_range(request.headers.get("Range"), entry.size)
        blob = self.store.blob_path(entry.sha256)
        if span is None:
            return Response(200, headers=headers, file=blob, offset=0, length=entry.size)
        start, end = span
        if start >= entry.size or start > end:
            headers["Content-Range"] = f"bytes */{entry.size}"
            return Response(416, headers=headers)
        end = min(end, entry.size - 1)
        headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        return Response(206, headers=headers, file=blob, offset=start, length=end - start + 1)


def _parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """Return ``(start, end)`` of a single ``bytes=`` range, or None to serve the whole file.

    A suffix range ``bytes=-N`` means the last N bytes. Multiple ranges are ignored, which
    RFC 9110 allows, so the whole file is served.
    """
    if not value or not value.strip().startswith("bytes=") or "," in value:
        return None
    first, _, last = value.strip()[len("bytes=") :].partition("-")
    first, last = first.strip(), last.strip()
    if not first:
        if not last.isdigit():
            return None
        suffix = int(last)
        if suffix == 0:
            return (size, size)
        return (max(size - suffix, 0), size - 1)
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    return (int(first), int(last) if last else size - 1)

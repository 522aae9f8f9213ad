"""Upload endpoints of the local Hub: preupload, the LFS batch API and commits."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Iterator
from typing import Any

from ._server_api import RepoEndpoints, Request, Response, json_response
from ._server_patterns import GitAttributes, GitIgnore, upload_mode
from ._server_store import (
    Commit,
    FileEntry,
    HubRequestError,
    Operation,
    RepoKey,
    bad_request,
    git_blob_oid,
    lfs_pointer,
    repo_not_found,
    stream_to_file,
    validate_file_path,
)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
LFS_CONTENT_TYPE = "application/vnd.git-lfs+json"


class UploadEndpoints(RepoEndpoints):
    # ------------------------------------------------------------------ uploads

    def _read_text_file(self, commit: Commit, path: str) -> str | None:
        entry = commit.files.get(path)
        if entry is None:
            return None
        return self.store.read_blob(entry).decode("utf-8", errors="replace")

    def preupload(self, request: Request, raw: tuple[str, str, str], tail: list[str]) -> Response:
        key, _ = self._writable(request, raw)
        commit = self.store.resolve(key, "/".join(tail))
        payload = request.json()
        files = payload.get("files") if isinstance(payload, dict) else None
        if not isinstance(files, list):
            raise bad_request("Expected a JSON body with a 'files' list.")

        attributes_text = self._read_text_file(commit, ".gitattributes")
        attributes = GitAttributes(attributes_text) if attributes_text is not None else None
        ignore_text = payload.get("gitIgnore")
        if not isinstance(ignore_text, str):
            ignore_text = self._read_text_file(commit, ".gitignore")
        ignore = GitIgnore(ignore_text) if ignore_text is not None else None

        replies = []
        for item in files:
            if not isinstance(item, dict) or not isinstance(item.get("size"), int):
                raise bad_request(
                    "Each entry of 'files' needs 'path', 'sample' and an integer 'size'."
                )
            path = validate_file_path(item.get("path"))
            try:
                sample = base64.b64decode(item.get("sample") or "", validate=True)
            except (binascii.Error, TypeError) as err:
                raise bad_request(f"Invalid base64 'sample' for {path!r}.") from err
            mode = upload_mode(path, item["size"], sample, attributes)
            reply: dict[str, Any] = {
                "path": path,
                "uploadMode": mode,
                "shouldIgnore": ignore is not None and ignore.ignores(path),
            }
            existing = commit.files.get(path)
            if existing is not None:
                # The client compares this with its sha256 (LFS) or git blob id (regular).
                reply["oid"] = existing.sha256 if existing.lfs else existing.git_oid
            replies.append(reply)
        return json_response({"files": replies, "commitOid": commit.id})

    def _upload_signature(self, key: RepoKey, oid: str, size: int) -> str:
        message = f"{key.type}/{key.id}\n{oid}\n{size}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def lfs_batch(self, request: Request, raw: tuple[str, str, str]) -> Response:
        key, _ = self._writable(request, raw)
        payload = request.json()
        if not isinstance(payload, dict) or not isinstance(payload.get("objects"), list):
            raise bad_request("Expected an LFS batch request with an 'objects' list.")
        if payload.get("operation") != "upload":
            raise bad_request(
                f"Unsupported LFS operation {payload.get('operation')!r}: only 'upload' is "
                "supported. Download files through /resolve."
            )
        base = f"{request.base_url}/{key.url_path}.git/info/lfs/objects"
        objects = []
        for item in payload["objects"]:
            oid = item.get("oid") if isinstance(item, dict) else None
            size = item.get("size") if isinstance(item, dict) else None
            if (
                not isinstance(oid, str)
                or not _SHA256.match(oid)
                or not isinstance(size, int)
                or size < 0
            ):
                objects.append(
                    {
                        "oid": str(oid),
                        "size": size if isinstance(size, int) else 0,
                        "error": {
                            "code": 422,
                            "message": "Expected a sha256 'oid' and a size >= 0.",
                        },
                    }
                )
                continue
            reply: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not self.store.has_lfs_object(key, oid):
                signature = self._upload_signature(key, oid, size)
                reply["actions"] = {
                    "upload": {"href": f"{base}/{oid}?size={size}&sig={signature}"},
                    "verify": {"href": f"{base}/verify"},
                }
            objects.append(reply)
        return json_response(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            content_type=LFS_CONTENT_TYPE,
        )

    def lfs_upload(self, request: Request, raw: tuple[str, str, str], oid: str) -> Response:
        """Store the body of a signed upload URL, after checking its size and sha256."""
        key = self._key(raw)
        size_text = request.param("size") or ""
        signature = request.param("sig") or ""
        if not _SHA256.match(oid) or not size_text.isdigit():
            raise bad_request(
                "Invalid LFS upload URL: expected /<sha256>?size=<bytes>&sig=<signature>."
            )
        expected = self._upload_signature(key, oid, int(size_text))
        if not hmac.compare_digest(expected, signature):
            raise HubRequestError(
                403, "Invalid LFS upload signature: request a new upload URL from the batch API."
            )
        if self.store.get_repo(key) is None:
            raise repo_not_found(key)
        temp = self.store.new_upload_file()
        try:
            sha256, size = stream_to_file(self._counted(request.iter_body()), temp)
            if size != int(size_text) or sha256 != oid:
                raise bad_request(
                    f"Uploaded content does not match the LFS object: expected sha256 {oid} and "
                    f"{size_text} bytes, received sha256 {sha256} and {size} bytes."
                )
            self.store.adopt_blob(temp, oid)
        finally:
            temp.unlink(missing_ok=True)
        self.store.add_lfs_object(key, oid)
        return Response(200)

    def _counted(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self._count_upload(len(chunk))
            yield chunk

    def lfs_verify(self, request: Request, raw: tuple[str, str, str]) -> Response:
        key, _ = self._writable(request, raw)
        payload = request.json()
        oid = payload.get("oid") if isinstance(payload, dict) else None
        size = payload.get("size") if isinstance(payload, dict) else None
        if not isinstance(oid, str) or not _SHA256.match(oid):
            raise bad_request("Expected a JSON body with a sha256 'oid' and a 'size'.")
        if not self.store.has_lfs_object(key, oid):
            raise HubRequestError(404, f"LFS object {oid} was never uploaded to {key.url_path}.")
        actual = self.store.blob_path(oid).stat().st_size
        if size is not None and size != actual:
            raise HubRequestError(422, f"LFS object {oid} has {actual} bytes, not {size}.")
        return json_response({}, content_type=LFS_CONTENT_TYPE)

    # ------------------------------------------------------------------ commits

    def _parse_operation(self, key: RepoKey, line_key: str, value: dict[str, Any]) -> Operation:
        path = validate_file_path(
            str(value.get("path", "")).rstrip("/")
            if line_key == "deletedFolder"
            else value.get("path")
        )
        if line_key == "file":
            content = value.get("content", "")
            encoding = value.get("encoding", "base64")
            if not isinstance(content, str):
                raise bad_request(f"Invalid content for {path!r}: expected a string.")
            if encoding == "base64":
                try:
                    data = base64.b64decode(content, validate=True)
                except binascii.Error as err:
                    raise bad_request(f"Invalid base64 content for {path!r}.") from err
            elif encoding in ("utf-8", "utf8"):
                data = content.encode("utf-8")
            else:
                raise bad_request(f"Unsupported encoding {encoding!r} for {path!r}: use 'base64'.")
            self._count_upload(len(data))
            entry = FileEntry(path, len(data), self.store.put_blob(data), git_blob_oid(data), False)
            return Operation("add", path, entry)
        if line_key == "lfsFile":
            oid = value.get("oid")
            if (
                value.get("algo", "sha256") != "sha256"
                or not isinstance(oid, str)
                or not _SHA256.match(oid)
            ):
                raise bad_request(f"Invalid LFS reference for {path!r}: expected a sha256 'oid'.")
            if not self.store.has_lfs_object(key, oid):
                raise HubRequestError(
                    422,
                    f"LFS object {oid} for {path!r} was never uploaded to {key.url_path}: "
                    "upload it through the LFS batch API before committing.",
                )
            size = self.store.blob_path(oid).stat().st_size
            if value.get("size") is not None and value["size"] != size:
                raise HubRequestError(
                    422, f"LFS object {oid} has {size} bytes, not {value['size']}."
                )
            entry = FileEntry(path, size, oid, git_blob_oid(lfs_pointer(oid, size)), True)
            return Operation("add", path, entry)
        if line_key == "deletedFile":
            return Operation("delete_file", path)
        if line_key == "deletedFolder":
            return Operation("delete_folder", path)
        raise bad_request(
            f"Unknown commit operation {line_key!r}: use file, lfsFile, deletedFile or "
            "deletedFolder."
        )

    def commit(self, request: Request, raw: tuple[str, str, str], tail: list[str]) -> Response:
        key, _ = self._writable(request, raw)
        if request.flag("create_pr"):
            raise bad_request("Pull requests are not supported by this server: commit to a branch.")
        branch = "/".join(tail)
        if branch.startswith("refs/heads/"):
            branch = branch[len("refs/heads/") :]

        lines = [line for line in request.read_body().splitlines() if line.strip()]
        if not lines:
            raise bad_request("Empty commit body: expected NDJSON lines starting with a header.")
        items = []
        for number, line in enumerate(lines, start=1):
            try:
                item = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
                raise bad_request(
                    f"Invalid JSON on line {number} of the commit body: {err}."
                ) from err
            if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
                raise bad_request(
                    f"Line {number} of the commit body needs 'key' and an object 'value'."
                )
            items.append(item)

        if items[0].get("key") != "header":
            raise bad_request("The first line of a commit body must be the 'header'.")
        header = items[0]["value"]
        summary = header.get("summary")
        if not isinstance(summary, str) or not summary.strip():
            raise bad_request("The commit header needs a non-empty 'summary'.")
        parent = header.get("parentCommit")
        if parent is not None and not isinstance(parent, str):
            raise bad_request("'parentCommit' must be a commit sha.")

        operations = [
            self._parse_operation(key, item.get("key"), item["value"]) for item in items[1:]
        ]
        commit = self.store.commit(
            key,
            branch=branch,
            operations=operations,
            title=summary.strip(),
            message=str(header.get("description") or ""),
            author=request.user or "",
            parent_commit=parent,
        )
        return json_response(
            {
                "success": True,
                "commitOid": commit.id,
                "commitUrl": f"{self._repo_url(request, key)}/commit/{commit.id}",
                "hookOutput": "",
            }
        )

"""On-disk storage of the local Hub: repositories, refs, commits and content-addressed blobs.

Layout under the root folder::

    blobs/<sha256[:2]>/<sha256>                  file content, stored once, byte for byte
    repos/<type>s/<namespace>/<name>/repo.json   owner, visibility, creation date
    repos/<type>s/<namespace>/<name>/refs.json   branch and tag heads
    repos/<type>s/<namespace>/<name>/commits/<sha1>.json   one commit with its full file list
    repos/<type>s/<namespace>/<name>/lfs/<sha256>          marker: LFS object uploaded to this repo

Every JSON file is replaced atomically, and a commit file is written before the ref that
points to it, so a crash leaves at most an unreferenced commit. Mutations of one repository
are serialized by a per-repository lock, and reads take no lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from hf_lifecycle._io import TEMP_PREFIX, atomic_write_bytes, atomic_write_json

from ._server_patterns import DEFAULT_GITATTRIBUTES

# URL path prefix and storage folder of each repository type, as the Hub names them.
REPO_TYPES = {"model": "models", "dataset": "datasets", "space": "spaces", "kernel": "kernels"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
DEFAULT_BRANCH = "main"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# First path segments that the Hub's URL scheme reserves, so they cannot be namespaces.
RESERVED_NAMESPACES = frozenset({"api", "datasets", "spaces", "kernels", "models"})


class HubRequestError(Exception):
    """A request that the Hub rejects, with the HTTP status and the ``X-Error-Code`` to send."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = dict(headers or {})


def bad_request(message: str) -> HubRequestError:
    return HubRequestError(400, message)


def now_iso() -> str:
    """Return the current UTC time in the Hub's date format, ``2024-05-01T12:00:00.000Z``."""
    moment = datetime.now(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def git_blob_oid(data: bytes) -> str:
    """Return the git object id of a blob, as ``git hash-object`` computes it."""
    digest = hashlib.sha1(f"blob {len(data)}\0".encode())
    digest.update(data)
    return digest.hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """Return the pointer file that git stores in place of an LFS object."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


def validate_name(value: str, label: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value or "--" in value:
        raise bad_request(
            f"Invalid {label} {value!r}: use 1 to 96 letters, digits, '-', '_' or '.', starting "
            "with a letter or digit, without '--' or '..'."
        )
    return value


def validate_file_path(path: Any) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside a repository, else raise 400."""
    if not isinstance(path, str) or not path:
        raise bad_request(f"Invalid file path {path!r}: expected a non-empty string.")
    if path.startswith("/") or "\\" in path or "\0" in path:
        raise bad_request(f"Invalid file path {path!r}: use a relative path with '/' separators.")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise bad_request(
            f"Invalid file path {path!r}: empty, '.' and '..' segments are not allowed."
        )
    if parts[0] == ".git" or ".git" in parts:
        raise bad_request(f"Invalid file path {path!r}: files under '.git/' cannot be committed.")
    return path


def validate_branch_name(name: str) -> str:
    if (
        not name
        or name.startswith(("refs/", "/", "-"))
        or name.endswith(("/", ".lock"))
        or ".." in name
        or "//" in name
        or _SHA1.match(name)
        or any(ch in name for ch in " ~^:?*[\\\0")
    ):
        raise bad_request(
            f"Invalid branch or tag name {name!r}: use a plain git ref name such as 'dev' or "
            "'v1.0', not a commit sha or a 'refs/...' path."
        )
    return name


@dataclass(frozen=True)
class RepoKey:
    """A repository's type (``model``, ``dataset``, ``space`` or ``kernel``) and id."""

    type: str
    namespace: str
    name: str

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def url_path(self) -> str:
        """The repository's path in web URLs, such as ``datasets/alice/data``."""
        return f"{URL_PREFIXES[self.type]}{self.id}"


@dataclass(frozen=True)
class FileEntry:
    """One file in a commit. ``lfs`` files are served from the blob of ``sha256``."""

    path: str
    size: int
    sha256: str
    git_oid: str
    lfs: bool

    @property
    def etag(self) -> str:
        """The value the Hub sends as ETag: the sha256 for LFS files, the git blob id otherwise."""
        return self.sha256 if self.lfs else self.git_oid

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "sha256": self.sha256,
            "gitOid": self.git_oid,
            "lfs": self.lfs,
        }

    @classmethod
    def from_json(cls, path: str, data: dict[str, Any]) -> FileEntry:
        return cls(path, data["size"], data["sha256"], data["gitOid"], data["lfs"])


@dataclass(frozen=True)
class Commit:
    id: str
    parents: tuple[str, ...]
    title: str
    message: str
    author: str
    date: str
    files: dict[str, FileEntry] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parents": list(self.parents),
            "title": self.title,
            "message": self.message,
            "author": self.author,
            "date": self.date,
            "files": {path: entry.to_json() for path, entry in sorted(self.files.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Commit:
        files = {path: FileEntry.from_json(path, item) for path, item in data["files"].items()}
        return cls(
            data["id"],
            tuple(data["parents"]),
            data["title"],
            data["message"],
            data["author"],
            data["date"],
            files,
        )


@dataclass(frozen=True)
class RepoMeta:
    key: RepoKey
    owner: str
    private: bool
    created_at: str


@dataclass
class Operation:
    """One line of a commit request after validation.

    ``kind`` is ``add`` (``entry`` set) or ``delete_file`` / ``delete_folder`` (``path`` only).
    """

    kind: str
    path: str
    entry: FileEntry | None = None


class RepoStore:
    """Repositories and blobs under one root folder. Safe to call from several threads."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs"
        self._repos = self.root / "repos"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._repos.mkdir(parents=True, exist_ok=True)
        self._locks: dict[RepoKey, threading.RLock] = {}
        self._locks_guard = threading.Lock()

    # ------------------------------------------------------------------ blobs

    def blob_path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise bad_request(f"Invalid sha256 {sha256!r}: expected 64 lowercase hex digits.")
        return self._blobs / sha256[:2] / sha256

    def has_blob(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def put_blob(self, data: bytes) -> str:
        """Store ``data`` under its sha256 and return the sha256. Storing twice is a no-op."""
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.blob_path(sha256)
        if not target.is_file():
            target.parent.mkdir(exist_ok=True)
            atomic_write_bytes(target, data)
        return sha256

    def new_upload_file(self) -> Path:
        """Return a fresh temporary path in the blob folder, for a body being streamed to disk."""
        return self._blobs / f"{TEMP_PREFIX}upload-{os.getpid()}-{uuid.uuid4().hex}"

    def adopt_blob(self, temp: Path, sha256: str) -> None:
        """Move a verified upload into the blob store under its sha256."""
        target = self.blob_path(sha256)
        target.parent.mkdir(exist_ok=True)
        os.replace(temp, target)

    def read_blob(self, entry: FileEntry) -> bytes:
        return self.blob_path(entry.sha256).read_bytes()

    # ------------------------------------------------------------------ repositories

    def _repo_dir(self, key: RepoKey) -> Path:
        return self._repos / REPO_TYPES[key.type] / key.namespace / key.name

    def _lock(self, key: RepoKey) -> threading.RLock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.RLock())

    def get_repo(self, key: RepoKey) -> RepoMeta | None:
        try:
            data = json.loads((self._repo_dir(key) / "repo.json").read_text("utf-8"))
        except FileNotFoundError:
            return None
        return RepoMeta(key, data["owner"], data["private"], data["createdAt"])

    def create_repo(self, key: RepoKey, *, owner: str, private: bool) -> bool:
        """Create a repository whose first commit adds the default ``.gitattributes``.

        Returns False, and changes nothing, when the repository already exists.
        """
        with self._lock(key):
            if self.get_repo(key) is not None:
                return False
            folder = self._repo_dir(key)
            (folder / "commits").mkdir(parents=True, exist_ok=True)
            (folder / "lfs").mkdir(exist_ok=True)
            created_at = now_iso()
            data = DEFAULT_GITATTRIBUTES.encode()
            entry = FileEntry(
                ".gitattributes", len(data), self.put_blob(data), git_blob_oid(data), False
            )
            first = self._write_commit(
                key,
                parents=(),
                title="initial commit",
                message="",
                author=owner,
                files={entry.path: entry},
            )
            atomic_write_json(
                folder / "refs.json", {"branches": {DEFAULT_BRANCH: first.id}, "tags": {}}
            )
            # repo.json is written last: until it exists, the repository does not exist.
            atomic_write_json(
                folder / "repo.json",
                {
                    "id": key.id,
                    "type": key.type,
                    "owner": owner,
                    "private": private,
                    "createdAt": created_at,
                },
            )
            return True

    def delete_repo(self, key: RepoKey) -> None:
        """Delete a repository's refs and commits. Blobs stay: other repositories may share them."""
        with self._lock(key):
            folder = self._repo_dir(key)
            if not (folder / "repo.json").is_file():
                raise repo_not_found(key)
            # Renaming first makes the deletion atomic for readers.
            trash = folder.with_name(f"{TEMP_PREFIX}deleted-{folder.name}-{uuid.uuid4().hex[:8]}")
            os.replace(folder, trash)
            shutil.rmtree(trash)

    def set_private(self, key: RepoKey, private: bool) -> None:
        with self._lock(key):
            meta = self.get_repo(key)
            if meta is None:
                raise repo_not_found(key)
            atomic_write_json(
                self._repo_dir(key) / "repo.json",
                {
                    "id": key.id,
                    "type": key.type,
                    "owner": meta.owner,
                    "private": private,
                    "createdAt": meta.created_at,
                },
            )

    # ------------------------------------------------------------------ refs and commits

    def refs(self, key: RepoKey) -> dict[str, dict[str, str]]:
        """Return ``{"branches": {name: sha}, "tags": {name: sha}}``."""
        return json.loads((self._repo_dir(key) / "refs.json").read_text("utf-8"))

    def load_commit(self, key: RepoKey, sha: str) -> Commit | None:
        if not _SHA1.match(sha):
            return None
        try:
            data = json.loads((self._repo_dir(key) / "commits" / f"{sha}.json").read_text("utf-8"))
        except FileNotFoundError:
            return None
        return Commit.from_json(data)

    def resolve(self, key: RepoKey, revision: str) -> Commit:
        """Return the commit that a branch, a tag or a full commit sha names, else raise 404."""
        refs = self.refs(key)
        name = revision
        for prefix, table in (("refs/heads/", "branches"), ("refs/tags/", "tags")):
            if name.startswith(prefix) and name[len(prefix) :] in refs[table]:
                return self._must_load(key, refs[table][name[len(prefix) :]])
        if name in refs["branches"]:
            return self._must_load(key, refs["branches"][name])
        if name in refs["tags"]:
            return self._must_load(key, refs["tags"][name])
        commit = self.load_commit(key, name)
        if commit is None:
            raise HubRequestError(
                404,
                f"Invalid rev id: {revision} is neither a branch, a tag nor a commit of {key.id}.",
                error_code="RevisionNotFound",
            )
        return commit

    def _must_load(self, key: RepoKey, sha: str) -> Commit:
        commit = self.load_commit(key, sha)
        if commit is None:
            raise HubRequestError(500, f"Commit {sha} of {key.id} is missing from the store.")
        return commit

    def history(self, key: RepoKey, head: Commit) -> Iterator[Commit]:
        """Yield ``head`` and its ancestors along first parents, newest first."""
        commit: Commit | None = head
        while commit is not None:
            yield commit
            commit = self.load_commit(key, commit.parents[0]) if commit.parents else None

    def _write_commit(
        self,
        key: RepoKey,
        *,
        parents: tuple[str, ...],
        title: str,
        message: str,
        author: str,
        files: dict[str, FileEntry],
    ) -> Commit:
        date = now_iso()
        seed = json.dumps(
            [
                list(parents),
                title,
                message,
                author,
                date,
                sorted(f.git_oid for f in files.values()),
                sorted(files),
                uuid.uuid4().hex,
            ],
        )
        sha = hashlib.sha1(seed.encode()).hexdigest()
        commit = Commit(sha, parents, title, message, author, date, files)
        atomic_write_json(self._repo_dir(key) / "commits" / f"{sha}.json", commit.to_json())
        return commit

    def commit(
        self,
        key: RepoKey,
        *,
        branch: str,
        operations: Iterable[Operation],
        title: str,
        message: str,
        author: str,
        parent_commit: str | None,
    ) -> Commit:
        """Apply ``operations`` on top of ``branch`` and move the branch to the new commit.

        Raises 412 when ``parent_commit`` is given and is not the branch head, and 404
        EntryNotFound when a deleted file or folder does not exist.
        """
        with self._lock(key):
            refs = self.refs(key)
            if branch not in refs["branches"]:
                raise HubRequestError(
                    404,
                    f"Invalid rev id: {branch} is not a branch of {key.id}. Commit to a branch.",
                    error_code="RevisionNotFound",
                )
            head = self._must_load(key, refs["branches"][branch])
            if parent_commit is not None and parent_commit != head.id:
                raise HubRequestError(
                    412,
                    f"A commit has happened since {parent_commit}: {branch} is now at {head.id}. "
                    "Fetch the new head and retry.",
                )
            files = dict(head.files)
            for operation in operations:
                _apply(files, operation, key)
            new = self._write_commit(
                key,
                parents=(head.id,),
                title=title,
                message=message,
                author=author,
                files=files,
            )
            refs["branches"][branch] = new.id
            atomic_write_json(self._repo_dir(key) / "refs.json", refs)
            return new

    def create_ref(self, key: RepoKey, table: str, name: str, target: Commit) -> None:
        """Create a branch (``table="branches"``) or tag (``"tags"``), 409 when it exists."""
        with self._lock(key):
            refs = self.refs(key)
            if name in refs[table]:
                kind = "Branch" if table == "branches" else "Tag"
                raise HubRequestError(409, f"{kind} {name!r} already exists in {key.id}.")
            refs[table][name] = target.id
            atomic_write_json(self._repo_dir(key) / "refs.json", refs)

    def delete_ref(self, key: RepoKey, table: str, name: str) -> None:
        with self._lock(key):
            refs = self.refs(key)
            if name not in refs[table]:
                kind = "branch" if table == "branches" else "tag"
                raise HubRequestError(
                    404,
                    f"Invalid rev id: no {kind} {name!r} in {key.id}.",
                    error_code="RevisionNotFound",
                )
            if table == "branches" and name == DEFAULT_BRANCH:
                raise HubRequestError(403, f"The default branch {name!r} cannot be deleted.")
            del refs[table][name]
            atomic_write_json(self._repo_dir(key) / "refs.json", refs)

    # ------------------------------------------------------------------ LFS objects

    def has_lfs_object(self, key: RepoKey, sha256: str) -> bool:
        """Return whether an LFS object with this sha256 was uploaded to this repository."""
        return (self._repo_dir(key) / "lfs" / sha256).is_file() and self.has_blob(sha256)

    def add_lfs_object(self, key: RepoKey, sha256: str) -> None:
        marker = self._repo_dir(key) / "lfs" / sha256
        if not marker.is_file():
            marker.parent.mkdir(exist_ok=True)
            marker.touch()

    def last_commits(self, key: RepoKey, head: Commit, paths: Iterable[str]) -> dict[str, Commit]:
        """Map each file or folder path to the newest commit up to ``head`` that changed it."""
        pending = set(paths)
        found: dict[str, Commit] = {}
        commits = list(self.history(key, head))
        for index, commit in enumerate(commits):
            if not pending:
                break
            parent = commits[index + 1] if index + 1 < len(commits) else None
            for path in list(pending):
                if parent is None or _subtree(commit.files, path) != _subtree(parent.files, path):
                    found[path] = commit
                    pending.discard(path)
        return found


def repo_not_found(key: RepoKey) -> HubRequestError:
    return HubRequestError(
        404,
        f"Repository Not Found: {key.url_path} does not exist, or it is private and the "
        "request's token does not belong to its owner.",
        error_code="RepoNotFound",
    )


def _subtree(files: dict[str, FileEntry], path: str) -> list[tuple[str, str]]:
    if path in files:
        return [(path, files[path].git_oid)]
    prefix = path + "/"
    return sorted((p, e.git_oid) for p, e in files.items() if p.startswith(prefix))


def _apply(files: dict[str, FileEntry], operation: Operation, key: RepoKey) -> None:
    path = operation.path
    if operation.kind == "add":
        assert operation.entry is not None
        # A file cannot sit where a folder is, nor under a path that is a file.
        if any(p.startswith(path + "/") for p in files):
            raise bad_request(
                f"Cannot add file {path!r}: a folder of that name exists in {key.id}."
            )
        for parent in PurePosixPath(path).parents:
            if str(parent) in files:
                raise bad_request(
                    f"Cannot add file {path!r}: {str(parent)!r} is a file in {key.id}."
                )
        files[path] = operation.entry
    elif operation.kind == "delete_file":
        if path not in files:
            raise HubRequestError(
                404,
                f"A file with this name doesn't exist: {path!r} in {key.id}.",
                error_code="EntryNotFound",
            )
        del files[path]
    else:
        prefix = path.rstrip("/") + "/"
        doomed = [p for p in files if p.startswith(prefix)]
        if not doomed:
            raise HubRequestError(
                404,
                f"A folder with this name doesn't exist: {path!r} in {key.id}.",
                error_code="EntryNotFound",
            )
        for p in doomed:
            del files[p]


def folder_oid(files: dict[str, FileEntry], folder: str) -> str:
    """Return a stable id for a folder's content: a sha1 over its files' paths and git ids."""
    prefix = folder + "/" if folder else ""
    digest = hashlib.sha1()
    for path in sorted(p for p in files if p.startswith(prefix)):
        digest.update(f"{path[len(prefix) :]}\0{files[path].git_oid}\n".encode())
    return digest.hexdigest()


def stream_to_file(chunks: Iterable[bytes], target: Path) -> tuple[str, int]:
    """Write ``chunks`` to ``target`` and return their sha256 and total size."""
    digest = hashlib.sha256()
    size = 0
    with open(target, "wb") as handle:
        for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
            handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    return digest.hexdigest(), size

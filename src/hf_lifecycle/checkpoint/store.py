"""The checkpoint folder: atomic commit, manifest, commit-order index, listing and deletion.

Layout of ``checkpoint_dir``::

    checkpoint-step-200/      one committed checkpoint (manifest.json written last)
    checkpoint-step-300/
    .index.json               cache of every manifest's listing fields, keyed by folder identity
    .tmp-...                  a save in progress (never listed; removed when its writer is gone)

A save fills a ``.tmp-`` folder, fsyncs every file, writes ``manifest.json``
last, fsyncs the folder, and renames it onto its final name: the rename is the
commit point. Replacing an existing checkpoint swaps the two folders in one
``renameat2(RENAME_EXCHANGE)`` call where the platform has it, so the old
checkpoint stays complete until the new one takes its place.

Order: each manifest carries a ``sequence`` one above the largest committed
before it. Newest and latest always mean the highest sequence, never names,
steps or modification times.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: commits are serialized within one process only.
    fcntl = None

from hf_lifecycle._io import HOST as _HOST
from hf_lifecycle._io import (
    atomic_write_bytes,
    dumps_json,
    fsync_dir,
    json_safe,
    metric_value,
    pid_alive,
)
from hf_lifecycle.checkpoint.info import CheckpointInfo
from hf_lifecycle.checkpoint.tensorfile import FileRecord, checksum_file, new_hasher
from hf_lifecycle.errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    ConfigurationError,
    InvalidCheckpointNameError,
)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "hf-lifecycle-checkpoint"
MANIFEST_VERSION = 1
INDEX_NAME = ".index.json"
_TEMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_DELETE_PREFIX = ".del-"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@-]*$")
_MAX_NAME = 200


def validate_name(name: object, root: str | os.PathLike[str] | None = None) -> str:
    """Return ``name`` if it is a safe checkpoint folder name, else raise InvalidCheckpointNameError."""
    if not isinstance(name, str):
        raise InvalidCheckpointNameError(name, f"expected a str, got {type(name).__name__}")
    if not name:
        raise InvalidCheckpointNameError(name, "the name is empty")
    if os.path.isabs(name) or name.startswith("~"):
        raise InvalidCheckpointNameError(name, "absolute paths are not allowed")
    if "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        raise InvalidCheckpointNameError(name, "path separators are not allowed")
    if ".." in name:
        raise InvalidCheckpointNameError(name, "'..' is not allowed")
    if len(name) > _MAX_NAME:
        raise InvalidCheckpointNameError(name, f"longer than {_MAX_NAME} characters")
    if not _NAME_PATTERN.match(name):
        raise InvalidCheckpointNameError(
            name, "it must start with a letter or digit and contain no spaces or control characters"
        )
    if root is not None:
        base = Path(root).resolve()
        if (base / name).resolve().parent != base:
            raise InvalidCheckpointNameError(name, f"it resolves outside {base}")
    return name


def _rename_exchange(source: Path, target: Path) -> bool:
    """Swap two paths atomically with renameat2(RENAME_EXCHANGE). Returns False where unsupported."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(
        at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), rename_exchange
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(source))


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return None
    return _LIBC


def _owner_gone(folder_name: str, stale_after: float, mtime: float) -> bool:
    # Temporary names end in -<host>-<pid>-<random>; a folder of a live local writer stays.
    parts = folder_name.rsplit("-", 3)
    if len(parts) == 4 and parts[1] == _HOST and parts[2].isdigit():
        return int(parts[2]) != os.getpid() and not pid_alive(int(parts[2]))
    # Files written by the atomic writes of _io (the index) end in .<host>.<pid>.<random>.
    dotted = folder_name.rsplit(".", 3)
    if len(dotted) == 4 and dotted[1] == _HOST and dotted[2].isdigit():
        return int(dotted[2]) != os.getpid() and not pid_alive(int(dotted[2]))
    return time.time() - mtime > stale_after


class PendingCheckpoint:
    """A checkpoint being written: files go into ``temp_dir`` until :meth:`CheckpointStore.commit`."""

    def __init__(self, name: str, temp_dir: Path) -> None:
        self.name = name
        self.temp_dir = temp_dir
        self.files: dict[str, FileRecord] = {}

    def add(self, relative_path: str, record: FileRecord) -> None:
        self.files[relative_path] = record


class CheckpointStore:
    """Owns one checkpoint folder. Thread-safe: commits and deletions are serialized by a lock.

    Where ``fcntl`` exists, commits, imports and deletions also hold an exclusive ``flock`` on
    the folder itself, so stores in several processes never commit the same sequence.
    """

    def __init__(self, root: str | os.PathLike[str], *, clean_leftovers: bool = True) -> None:
        self.root = Path(root).expanduser().resolve()
        self._lock = threading.RLock()
        self._folder_lock_depth = 0
        self._entries: dict[str, dict[str, Any]] = {}
        self._identities: dict[str, list[int]] = {}
        # Identity of each folder that listing skipped for lack of a valid manifest, so that a
        # folder is read and logged again only after it changes.
        self._skipped: dict[str, list[int]] = {}
        # Names this store deleted, kept in the index so a Hub push can prune exactly those.
        self._retired: set[str] = set()
        self._loaded_index = False
        if self.root.exists() and not self.root.is_dir():
            raise CheckpointSaveError(
                f"checkpoint_dir {self.root} exists and is not a folder; pass another path.",
                path=str(self.root),
            )
        self.root.mkdir(parents=True, exist_ok=True)
        if clean_leftovers:
            self.remove_leftovers()

    # Leftovers ------------------------------------------------------------------------------

    def remove_leftovers(self, stale_after: float = 3600.0) -> list[str]:
        """Remove temporary folders whose writer is gone, and undo an interrupted replacement."""
        removed = []
        with self._lock:
            for entry in list(os.scandir(self.root)):
                name = entry.name
                mtime = entry.stat(follow_symlinks=False).st_mtime
                if not name.startswith((_TEMP_PREFIX, _OLD_PREFIX, _DELETE_PREFIX)):
                    continue
                if not _owner_gone(name, stale_after, mtime):
                    continue
                if name.startswith(_OLD_PREFIX) and entry.is_dir(follow_symlinks=False):
                    original = name[len(_OLD_PREFIX) :].rsplit("-", 3)[0]
                    if not (self.root / original).exists() and _NAME_PATTERN.match(original):
                        # A replacement stopped between its two renames: the old copy goes back.
                        os.rename(entry.path, self.root / original)
                        logger.warning("Restored checkpoint %s after an interrupted replace", original)
                        continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                removed.append(name)
            if removed:
                fsync_dir(self.root)
                logger.info("Removed %d leftover temporary folders from %s", len(removed), self.root)
        return removed

    @contextlib.contextmanager
    def _writing(self):
        """Hold the thread lock and, where the platform has flock, a lock on the folder."""
        with self._lock:
            if fcntl is None or self._folder_lock_depth:
                # Nested call: a second flock from this process on a new descriptor would block.
                self._folder_lock_depth += 1
                try:
                    yield
                finally:
                    self._folder_lock_depth -= 1
                return
            fd = os.open(self.root, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError as err:
                    # NOTE: some network file systems cannot lock a folder. Commits from two
                    # processes may then share a sequence number, which retention tolerates.
                    logger.debug("Cannot lock %s (%s); committing without the lock", self.root, err)
                self._folder_lock_depth = 1
                yield
            finally:
                self._folder_lock_depth = 0
                os.close(fd)  # Closing the descriptor releases the flock.

    # Writing --------------------------------------------------------------------------------

    def check_replaceable(self, name: str) -> None:
        """Raise ConfigurationError if ``name`` exists in the folder and is not a checkpoint.

        Saving under an existing name replaces that folder, which is right only for a checkpoint.
        """
        target = self.root / validate_name(name, self.root)
        if not target.exists() and not target.is_symlink():
            return
        if target.is_symlink() or not (target / MANIFEST_NAME).is_file():
            raise ConfigurationError(
                f"{target} exists and is not a checkpoint, so saving checkpoint {name!r} would "
                f"delete it. Pass another name, or move that folder out of {self.root}."
            )

    def begin(self, name: str) -> PendingCheckpoint:
        self.check_replaceable(name)
        suffix = f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temp_dir = self.root / f"{_TEMP_PREFIX}{name}-{suffix}"
        temp_dir.mkdir()
        return PendingCheckpoint(name, temp_dir)

    def abort(self, pending: PendingCheckpoint) -> None:
        shutil.rmtree(pending.temp_dir, ignore_errors=True)

    def next_sequence(self) -> int:
        entries = self.list()
        return (entries[-1].sequence + 1) if entries else 1

    def commit(self, pending: PendingCheckpoint, manifest: dict[str, Any]) -> CheckpointInfo:
        """Write the manifest last, then rename the folder into place. Returns the new record."""
        with self._writing():
            sequence = self.next_sequence()
            manifest = dict(manifest)
            manifest.update(
                format=MANIFEST_FORMAT,
                format_version=MANIFEST_VERSION,
                name=pending.name,
                sequence=sequence,
                files={path: record.to_dict() for path, record in sorted(pending.files.items())},
            )
            manifest_path = pending.temp_dir / MANIFEST_NAME
            data = encode_manifest(manifest)
            with open(manifest_path, "xb", buffering=0) as handle:
                handle.write(data)
                os.fsync(handle.fileno())
            fsync_dir(pending.temp_dir)
            final = self.root / pending.name
            replaced = final.exists()
            if replaced:
                self.check_replaceable(pending.name)
                self._replace(pending.temp_dir, final)
            else:
                os.rename(pending.temp_dir, final)
            fsync_dir(self.root)
            if replaced:
                logger.warning(
                    "Replaced existing checkpoint %s with a new save of the same name", pending.name
                )
            info = self._record(final, manifest)
            self._entries[pending.name] = self._index_entry(manifest)
            self._retired.discard(pending.name)
            self._identities[pending.name] = self._identity(final)
            self._write_index()
            logger.info("Committed checkpoint %s (sequence %d)", pending.name, sequence)
            return info

    def _replace(self, temp_dir: Path, final: Path) -> None:
        if _rename_exchange(temp_dir, final):
            # temp_dir now contains the old checkpoint; the new one is already in place.
            fsync_dir(self.root)
            shutil.rmtree(temp_dir, ignore_errors=True)
            return
        aside = self.root / f"{_OLD_PREFIX}{final.name}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(final, aside)
        os.rename(temp_dir, final)
        fsync_dir(self.root)
        shutil.rmtree(aside, ignore_errors=True)

    def staging_dir(self, purpose: str) -> Path:
        """Create a temporary folder in the store, on its file system, removed if left orphaned."""
        suffix = f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        folder = self.root / f"{_TEMP_PREFIX}{purpose}-{suffix}"
        folder.mkdir()
        return folder

    def import_folder(self, name: str, source: Path) -> CheckpointInfo:
        """Adopt a complete checkpoint folder (downloaded from the Hub) as the newest checkpoint.

        Every file is verified against the manifest first; ``source`` must be inside
        this store so the final rename is atomic.
        """
        validate_name(name, self.root)
        manifest = read_manifest(source)
        for relative, expected in manifest_files(manifest).items():
            path = source / relative
            if not path.is_file():
                raise CheckpointCorruptedError(
                    f"Checkpoint file {path} is corrupted: the file is missing.",
                    path=str(source), file=str(path),
                )
            if checksum_file(path) != expected:
                raise CheckpointCorruptedError(
                    f"Checkpoint file {path} is corrupted: checksum mismatch.",
                    path=str(source), file=str(path),
                )
        with self._writing():
            manifest = dict(manifest, name=name, sequence=self.next_sequence())
            data = encode_manifest(manifest)
            manifest_path = source / MANIFEST_NAME
            os.unlink(manifest_path)
            with open(manifest_path, "xb", buffering=0) as handle:
                handle.write(data)
                os.fsync(handle.fileno())
            fsync_dir(source)
            final = self.root / name
            if final.exists():
                self.check_replaceable(name)
                self._replace(source, final)
            else:
                os.rename(source, final)
            fsync_dir(self.root)
            self._entries[name] = self._index_entry(manifest)
            self._retired.discard(name)
            self._identities[name] = self._identity(final)
            self._write_index()
            logger.info("Imported checkpoint %s (sequence %d)", name, manifest["sequence"])
            return self._record(final, manifest)

    # Deleting -------------------------------------------------------------------------------

    def delete(self, names: Iterable[str]) -> list[str]:
        """Delete committed checkpoints by name. Only folders inside this store are touched."""
        deleted = []
        with self._writing():
            try:
                for name in names:
                    validate_name(name, self.root)
                    folder = self.root / name
                    if not (folder / MANIFEST_NAME).is_file():
                        logger.debug("Not deleting %s: it is not a committed checkpoint", folder)
                        continue
                    suffix = f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                    trash = self.root / f"{_DELETE_PREFIX}{name}-{suffix}"
                    os.rename(folder, trash)
                    self._entries.pop(name, None)
                    self._identities.pop(name, None)
                    self._retired.add(name)
                    deleted.append(name)
                    fsync_dir(self.root)
                    shutil.rmtree(trash, ignore_errors=True)
                    logger.info("Deleted checkpoint %s", name)
            finally:
                # Also when a later deletion failed: the index must not list those already gone.
                if deleted:
                    self._write_index()
        return deleted

    def retired(self) -> set[str]:
        """Names of checkpoints this folder deleted (through retention) and has not saved again."""
        with self._lock:
            if not self._loaded_index:
                self._load_index()
            return set(self._retired) - set(self._entries)

    def forget_retired(self, names: Iterable[str]) -> None:
        with self._lock:
            self._retired.difference_update(names)
            self._write_index()

    # Reading --------------------------------------------------------------------------------

    def list(self) -> list[CheckpointInfo]:
        """Return every committed checkpoint, oldest first (by commit sequence)."""
        with self._lock:
            self._refresh()
            records = [self._info_from_entry(entry) for entry in self._entries.values()]
        records.sort(key=lambda info: info.sequence)
        return records

    def latest(self) -> CheckpointInfo | None:
        records = self.list()
        return records[-1] if records else None

    def get(self, name: str) -> CheckpointInfo:
        validate_name(name, self.root)
        for info in self.list():
            if info.name == name:
                return info
        if (self.root / name).is_dir():
            # Not listed but present: raise the manifest's own error, which names the file.
            read_manifest(self.root / name)
        available = ", ".join(info.name for info in reversed(self.list()[-5:])) or "none"
        raise CheckpointNotFoundError(
            f"No checkpoint named {name!r} in {self.root} (newest: {available}). "
            f"Call list_checkpoints() to see what is there.",
            path=str(self.root / name),
        )

    def read_manifest(self, name: str) -> dict[str, Any]:
        folder = self.root / validate_name(name, self.root)
        return read_manifest(folder)

    def verify(self, name: str) -> list[str]:
        """Check every file of a checkpoint against its manifest. Returns the bad files' paths."""
        folder = self.root / validate_name(name, self.root)
        manifest = read_manifest(folder)
        bad = []
        for relative, expected in manifest_files(manifest).items():
            path = folder / relative
            if not path.is_file() or checksum_file(path) != expected:
                bad.append(str(path))
        return bad

    # Index ----------------------------------------------------------------------------------

    def _refresh(self) -> None:
        if not self._loaded_index:
            self._load_index()
        present: dict[str, list[int]] = {}
        for entry in os.scandir(self.root):
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                present[entry.name] = self._identity(entry.path)
            except FileNotFoundError:
                continue  # Deleted since the scan.
        changed = False
        for name in list(self._entries):
            if name not in present:
                del self._entries[name]
                self._identities.pop(name, None)
                changed = True
        for name, identity in present.items():
            if name in self._entries and self._identities.get(name) == identity:
                continue
            if self._skipped.get(name) == identity:
                continue
            try:
                manifest = read_manifest(self.root / name)
            except (CheckpointCorruptedError, OSError) as err:
                if name in self._entries:
                    del self._entries[name]
                    changed = True
                # A folder without a valid manifest is not a committed checkpoint. A manifest
                # that exists but fails to parse was damaged after the commit, so it gets a warning.
                if identity[-1] >= 0:
                    logger.warning("Skipping checkpoint folder %s: %s", name, err)
                self._skipped[name] = identity
                continue
            self._skipped.pop(name, None)
            self._entries[name] = self._index_entry(manifest)
            self._identities[name] = identity
            changed = True
        if changed:
            self._write_index()

    def _load_index(self) -> None:
        self._loaded_index = True
        try:
            with open(self.root / INDEX_NAME, encoding="utf-8") as handle:
                data = json.load(handle)
            for entry in data["entries"]:
                name = entry["name"]
                # The index contains the manifests' listing fields, so they get the same checks.
                if not isinstance(name, str) or not isinstance(entry["sequence"], int):
                    raise ValueError(f"invalid name or sequence in the entry {entry!r:.200}")
                invalid = _invalid_listing_field(entry)
                if invalid is not None:
                    raise ValueError(f"invalid {invalid!r} in the entry of {name!r}")
                self._identities[name] = list(entry.pop("identity"))
                self._entries[name] = entry
            self._retired = {name for name in data.get("retired", []) if isinstance(name, str)}
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, RecursionError) as err:
            logger.warning("Rebuilding unreadable checkpoint index %s: %s", self.root / INDEX_NAME, err)
            self._entries.clear()
            self._identities.clear()

    def _write_index(self) -> None:
        entries = [
            dict(entry, identity=self._identities.get(name, [0, 0]))
            for name, entry in self._entries.items()
        ]
        entries.sort(key=lambda entry: entry["sequence"])
        index = {"format_version": 1, "entries": entries, "retired": sorted(self._retired)}
        try:
            # Compact JSON uses json's C encoder: with a thousand checkpoints, indenting made this
            # write, which every commit and deletion does, several times slower.
            data = json.dumps(index, separators=(",", ":"), allow_nan=False).encode("utf-8")
        except ValueError:
            data = dumps_json(index).encode("utf-8")
        try:
            atomic_write_bytes(self.root / INDEX_NAME, data, durable=False)
        except OSError as err:
            # The index is a cache: listing still works from the manifests without it.
            logger.warning("Could not write checkpoint index %s: %s", self.root / INDEX_NAME, err)

    def _identity(self, folder: str | os.PathLike[str]) -> list[int]:
        # Editing or damaging manifest.json in place leaves the folder's own inode and mtime
        # unchanged, so the manifest's stat is part of the identity. Size -1: no manifest.
        # os.stat on strings, not pathlib: listing calls this once per checkpoint folder.
        stat = os.stat(folder)
        try:
            manifest = os.stat(os.path.join(folder, MANIFEST_NAME))
        except FileNotFoundError:
            return [stat.st_ino, stat.st_mtime_ns, 0, 0, -1]
        return [
            stat.st_ino, stat.st_mtime_ns, manifest.st_ino, manifest.st_mtime_ns, manifest.st_size
        ]

    @staticmethod
    def _index_entry(manifest: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "name": manifest["name"],
            "sequence": int(manifest["sequence"]),
            "step": manifest.get("step"),
            "epoch": manifest.get("epoch"),
            "metrics": json_safe(dict(manifest.get("metrics") or {})),
            "timestamp": float(manifest.get("timestamp") or 0.0),
        }

    def _info_from_entry(self, entry: Mapping[str, Any]) -> CheckpointInfo:
        return CheckpointInfo(
            name=entry["name"],
            path=os.path.join(self.root, entry["name"]),
            sequence=entry["sequence"],
            step=entry.get("step"),
            epoch=entry.get("epoch"),
            metrics={k: metric_value(v) for k, v in (entry.get("metrics") or {}).items()},
            timestamp=entry.get("timestamp", 0.0),
        )

    def _record(self, folder: Path, manifest: Mapping[str, Any]) -> CheckpointInfo:
        return self._info_from_entry(dict(self._index_entry(manifest), name=folder.name))


MANIFEST_CHECKSUM_KEY = "manifest_checksum"


def _manifest_digest(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    hasher = new_hasher()
    hasher.update(canonical.encode("utf-8"))
    return hasher.hexdigest()


def encode_manifest(manifest: Mapping[str, Any]) -> bytes:
    """Serialize a manifest with a checksum of its own content, so any edit to it is detected."""
    safe = json_safe(dict(manifest))
    body = {key: value for key, value in safe.items() if key != MANIFEST_CHECKSUM_KEY}
    body[MANIFEST_CHECKSUM_KEY] = _manifest_digest(body)
    return json.dumps(body, indent=2, allow_nan=False).encode("utf-8")


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and validate a checkpoint's manifest. A missing or malformed one is corruption."""
    path = Path(folder) / MANIFEST_NAME
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        raise CheckpointCorruptedError(
            f"Checkpoint {folder} has no {MANIFEST_NAME}; it was never committed.",
            path=str(folder),
            file=str(path),
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointCorruptedError(
            f"Checkpoint file {path} is corrupted: not valid JSON ({err}).",
            path=str(folder),
            file=str(path),
        ) from err
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != MANIFEST_FORMAT
        or not isinstance(manifest.get("sequence"), int)
        or not isinstance(manifest.get("files"), dict)
        or not isinstance(manifest.get("name"), str)
    ):
        raise CheckpointCorruptedError(
            f"Checkpoint file {path} is corrupted: not an hf-lifecycle manifest.",
            path=str(folder),
            file=str(path),
        )
    invalid = _invalid_listing_field(manifest)
    if invalid is not None:
        raise CheckpointCorruptedError(
            f"Checkpoint file {path} is corrupted: the {invalid!r} field has the wrong type.",
            path=str(folder),
            file=str(path),
        )
    recorded = manifest.get(MANIFEST_CHECKSUM_KEY)
    body = {key: value for key, value in manifest.items() if key != MANIFEST_CHECKSUM_KEY}
    try:
        digest = _manifest_digest(body)
    except (ValueError, RecursionError):
        digest = None  # NaN literals or nesting deeper than the encoder allows: never written here.
    if recorded is None or recorded != digest:
        raise CheckpointCorruptedError(
            f"Checkpoint file {path} is corrupted: its content does not match its checksum.",
            path=str(folder),
            file=str(path),
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise CheckpointCorruptedError(
            f"Checkpoint {folder} uses manifest format version {version!r}; this hf-lifecycle reads "
            f"up to version {MANIFEST_VERSION}. Upgrade hf-lifecycle to load it.",
            path=str(folder),
            file=str(path),
        )
    return manifest


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _invalid_listing_field(manifest: Mapping[str, Any]) -> str | None:
    """Return the name of the first field that listing and retention read with a wrong type."""
    if isinstance(manifest["sequence"], bool):
        return "sequence"
    for key in ("step", "epoch"):
        value = manifest.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            return key
    timestamp = manifest.get("timestamp")
    if timestamp is not None and not _is_number(timestamp):
        return "timestamp"
    metrics = manifest.get("metrics")
    if metrics is None:
        return None
    if not isinstance(metrics, dict):
        return "metrics"
    for value in metrics.values():
        # json_safe stores NaN and the infinities as strings, which metric_value reads back.
        if not _is_number(metric_value(value)):
            return "metrics"
    return None


def manifest_files(manifest: Mapping[str, Any]) -> dict[str, FileRecord]:
    """Return the manifest's file table, each path checked to stay inside the checkpoint."""
    records = {}
    for relative, entry in manifest["files"].items():
        if (
            not isinstance(relative, str)
            or relative.startswith(("/", "\\"))
            or ".." in relative.replace("\\", "/").split("/")
            or not isinstance(entry, dict)
        ):
            raise CheckpointCorruptedError(
                f"Manifest of checkpoint {manifest.get('name')!r} lists an invalid file {relative!r}.",
                path=None,
                file=str(relative),
            )
        records[relative] = FileRecord(
            size=int(entry["size"]),
            checksum=str(entry["checksum"]),
            algorithm=str(entry.get("algorithm", "xxh3_128")),
        )
    return records

"""Hub half of HFManager: repository creation, pushes, the background queue, resume from the Hub.

Repository layout::

    checkpoints/<name>/...        every file of a committed checkpoint, manifest.json included
    checkpoints/latest.json       pointer to the newest complete checkpoint on the Hub
    experiment_metadata.json      hyperparameters, metrics history, environment
    README.md, metrics.png        model card and metric curves
    model.safetensors, config.json, ...   the final model, at the root

A checkpoint's files and ``checkpoints/latest.json`` always change in the same
commit, so an interrupted push leaves the pointer on the previous complete
checkpoint. Files the Hub already stores with the same content are skipped by
the client, which compares the server's object ids with the local ones.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hf_lifecycle._version import __version__
from hf_lifecycle.errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    HubAuthenticationError,
    HubError,
    PushError,
)

logger = logging.getLogger(__name__)

CHECKPOINTS_PREFIX = "checkpoints"
LATEST_POINTER = f"{CHECKPOINTS_PREFIX}/latest.json"
POINTER_FORMAT = "hf-lifecycle-latest"
_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
_RETRYABLE_NAMES = {
    "TransportError",
    "TimeoutException",
    "NetworkError",
    "RemoteProtocolError",
    "ConnectError",
    "ReadError",
    "WriteError",
    "ProtocolError",
}
_URL_QUERY = re.compile(r"(https?://[^\s'\"?#]+)[?#][^\s'\"]*")


def is_retryable(error: BaseException) -> bool:
    """True for errors that a later attempt may not hit: 5xx, 429, 408, timeouts, dropped connections."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return status in _RETRYABLE_STATUS
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if any(cls.__name__ in _RETRYABLE_NAMES for cls in type(error).__mro__):
        return True
    # huggingface_hub wraps a failed LFS upload in a RuntimeError whose cause is the HTTP error.
    cause = _wrapped_cause(error)
    return cause is not None and is_retryable(cause)


def _wrapped_cause(error: BaseException) -> BaseException | None:
    """Return the ``__cause__`` of an error that has no HTTP status of its own, else None."""
    cause = error.__cause__
    if _status(error) is not None or cause is None or cause is error:
        return None
    return cause


def _status(error: BaseException) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


def describe_error(error: BaseException, *, max_causes: int = 3) -> str:
    """Describe an error and up to ``max_causes`` of its causes in one line.

    Request headers (which carry the token) are left out, and so are URL query strings, which
    carry the signatures of LFS upload URLs.
    """
    status = _status(error)
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    text = _URL_QUERY.sub(r"\1", text)
    if len(text) > 300:
        text = text[:300] + "..."
    description = f"HTTP {status}: {text}" if status else f"{type(error).__name__}: {text}"
    cause = _wrapped_cause(error)
    if cause is not None and max_causes > 0:
        description += f" (caused by {describe_error(cause, max_causes=max_causes - 1)})"
    return description


def resolve_token(explicit: str | None) -> str | None:
    """Return ``explicit``, else ``HF_TOKEN``, else the token saved by ``hf auth login``."""
    if explicit:
        return explicit
    from huggingface_hub import get_token

    return get_token()


def hub_endpoint() -> str:
    """Return the Hub URL, making huggingface_hub agree with ``HF_ENDPOINT`` (and
    ``HF_HUB_DISABLE_XET``) when they were set after its import.

    huggingface_hub reads ``HF_ENDPOINT`` once, at import. A caller who sets it afterwards
    expects it to apply, and some client calls (YAML validation of model cards) always use the
    import-time value: left alone they would reach the public Hub. So the client's constants
    are updated to the variable, with a warning saying to set it before the import.
    """
    from huggingface_hub import constants

    _apply_late_xet_setting(constants)
    configured = os.environ.get("HF_ENDPOINT", "").rstrip("/")
    current = constants.ENDPOINT.rstrip("/")
    if configured and configured != current:
        logger.warning(
            "HF_ENDPOINT=%s was set after huggingface_hub was imported (it still used %s); "
            "using %s. Set HF_ENDPOINT before importing huggingface_hub or transformers.",
            configured, current, configured,
        )
        constants.ENDPOINT = configured
        constants.HUGGINGFACE_CO_URL_TEMPLATE = configured + "/{repo_id}/resolve/{revision}/{filename}"
        return configured
    return current


def _apply_late_xet_setting(constants: Any) -> None:
    """Set huggingface_hub's ``HF_HUB_DISABLE_XET`` constant when the variable was set late.

    The client reads the constant at every upload, so setting it takes effect. Left alone,
    uploads request a Xet token from servers without Xet and fail.
    """
    requested = os.environ.get("HF_HUB_DISABLE_XET", "").upper() in constants.ENV_VARS_TRUE_VALUES
    if requested and not constants.HF_HUB_DISABLE_XET:
        logger.warning(
            "HF_HUB_DISABLE_XET was set after huggingface_hub was imported; applying it. "
            "Set it before importing huggingface_hub or transformers."
        )
        constants.HF_HUB_DISABLE_XET = True


class PushQueue:
    """Runs push jobs one at a time, in submission order, in a background thread.

    A job that fails with a retryable error is retried with exponential backoff.
    After the last attempt the failure is logged as a warning and kept until
    :meth:`take_failures` hands it to the caller.
    """

    def __init__(self, *, retries: int, retry_wait: float, max_wait: float = 30.0) -> None:
        self._retries = retries
        self._retry_wait = retry_wait
        self._max_wait = max_wait
        self._queue: queue.Queue[tuple[str, Callable[[], None]] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending: list[str] = []
        self._failures: list[tuple[str, BaseException]] = []
        self._thread: threading.Thread | None = None

    def submit(self, label: str, job: Callable[[], None]) -> None:
        with self._lock:
            self._pending.append(label)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="hf-lifecycle-push", daemon=True
                )
                self._thread.start()
        self._queue.put((label, job))

    def pending(self) -> list[str]:
        with self._lock:
            return list(self._pending)

    def take_failures(self) -> list[tuple[str, BaseException]]:
        with self._lock:
            failures, self._failures = self._failures, []
            return failures

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted job finished. Returns False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            label, job = item
            try:
                self._attempt(label, job)
            finally:
                with self._lock:
                    self._pending.remove(label)
                    self._idle.notify_all()

    def _attempt(self, label: str, job: Callable[[], None]) -> None:
        try:
            run_with_retries(job, label, retries=self._retries, retry_wait=self._retry_wait,
                             max_wait=self._max_wait)
        except Exception as err:  # noqa: BLE001 - every failure is kept and raised from wait()
            logger.warning("Push of %s failed: %s", label, describe_error(err))
            with self._lock:
                self._failures.append((label, err))


def run_with_retries(
    job: Callable[[], Any], label: str, *, retries: int, retry_wait: float, max_wait: float = 30.0
) -> Any:
    """Call ``job``, retrying retryable errors with exponential backoff; re-raise the last error."""
    attempt = 0
    while True:
        try:
            return job()
        except Exception as err:
            if attempt >= retries or not is_retryable(err):
                raise
            wait = min(retry_wait * 2**attempt, max_wait)
            attempt += 1
            logger.info(
                "Push of %s failed (%s); retry %d/%d in %.1f s",
                label, describe_error(err), attempt, retries, wait,
            )
            time.sleep(wait)


class HubSync:
    """Pushes a manager's files to one Hub repository and fetches checkpoints back from it."""

    def __init__(
        self,
        repo_id: str,
        *,
        token: str | None,
        private: bool,
        retries: int = 4,
        retry_wait: float = 2.0,
        on_token: Callable[[str], None] | None = None,
    ) -> None:
        self.repo_id = repo_id
        self.private = private
        self._explicit_token = token
        self._token: str | None = None
        # Told about the token once it is found, so the tracker can redact it everywhere.
        self._on_token = on_token
        self._api: Any = None
        self._repo_ready = False
        self._lock = threading.RLock()
        self.queue = PushQueue(retries=retries, retry_wait=retry_wait)
        # Checkpoints whose push failed stay protected from retention until a push succeeds.
        self.unpushed: set[str] = set()
        # Seconds the exit hook waits for pending pushes. close(timeout=...) sets it to 0 once
        # it has given up on them.
        self.exit_timeout = 600.0
        self._register_exit_flush()

    def __repr__(self) -> str:
        return f"HubSync(repo_id={self.repo_id!r}, private={self.private})"

    # Client ----------------------------------------------------------------------------------

    def token(self, *, required: bool) -> str | None:
        if self._token is None:
            # Looked up again while missing, so a token set or saved later is used.
            self._token = resolve_token(self._explicit_token)
            if self._token and self._on_token is not None:
                self._on_token(self._token)
        if required and not self._token:
            raise HubAuthenticationError(
                f"No Hugging Face token found for pushing to {self.repo_id}. Pass "
                f"HFManager(hf_token=...), set the HF_TOKEN environment variable, or run "
                f"`hf auth login`.",
                repo_id=self.repo_id,
            )
        return self._token

    @property
    def api(self) -> Any:
        if self._api is None:
            from huggingface_hub import HfApi

            self._api = HfApi(
                endpoint=hub_endpoint(),
                token=self.token(required=False) or False,
                library_name="hf-lifecycle",
                library_version=__version__,
            )
        return self._api

    @property
    def repo_url(self) -> str:
        return f"{hub_endpoint()}/{self.repo_id}"

    def _translate(self, error: BaseException, action: str) -> HubError:
        status = _status(error)
        if status in (401, 403):
            return HubAuthenticationError(
                f"The Hub rejected the token while trying to {action} {self.repo_id} "
                f"(HTTP {status}). Check that the token is valid and has write access: pass "
                f"hf_token=..., set HF_TOKEN, or run `hf auth login`.",
                repo_id=self.repo_id,
            )
        return HubError(f"Could not {action} {self.repo_id}: {describe_error(error)}", repo_id=self.repo_id)

    def ensure_repo(self) -> str:
        """Create the repository on first use (exist_ok) and return its URL."""
        with self._lock:
            if self._repo_ready:
                return self.repo_url
            token = self.token(required=True)
            try:
                url = self.api.create_repo(
                    self.repo_id, private=self.private, exist_ok=True, token=token
                )
            except Exception as err:
                if is_retryable(err):
                    raise
                raise self._translate(err, "create the repository") from err
            self._repo_ready = True
            logger.info("Using Hub repository %s", self.repo_id)
            return str(url)

    # Pushing ---------------------------------------------------------------------------------

    def commit(self, operations: list[Any], message: str) -> Any:
        """Create one commit on the default branch. Unchanged files are skipped by the client.

        A repository deleted since this object created it is created again, once per call.
        """
        from huggingface_hub.errors import RepositoryNotFoundError

        for attempt in (1, 2):
            self.ensure_repo()
            try:
                return self.api.create_commit(
                    self.repo_id,
                    operations=operations,
                    commit_message=message,
                    token=self.token(required=True),
                )
            except RepositoryNotFoundError as err:
                with self._lock:
                    self._repo_ready = False
                if attempt == 2:
                    raise self._translate(err, "push to") from err
                logger.warning(
                    "Hub repository %s no longer exists; creating it again", self.repo_id
                )
            except Exception as err:
                if is_retryable(err):
                    raise
                raise self._translate(err, "push to") from err

    def remote_checkpoints(self) -> set[str]:
        """Names of the checkpoint folders the Hub holds."""
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

        try:
            entries = self.api.list_repo_tree(
                self.repo_id, path_in_repo=CHECKPOINTS_PREFIX, token=self.token(required=False)
            )
            return {
                entry.path.split("/", 1)[1]
                for entry in entries
                if type(entry).__name__ == "RepoFolder" and "/" in entry.path
            }
        except (EntryNotFoundError, RepositoryNotFoundError):
            return set()

    def checkpoints_newest_first(self, revision: str | None) -> list[str]:
        """Names of the Hub's checkpoints, newest first by the commit order in their manifests."""
        if revision is None:
            return []
        order = []
        for name in self.remote_checkpoints():
            try:
                manifest = self.read_json(f"{CHECKPOINTS_PREFIX}/{name}/manifest.json", revision)
            except HubError as err:
                logger.warning("Skipping checkpoint %s on the Hub: %s", name, err)
                continue
            if isinstance(manifest, dict):
                sequence = _number(manifest.get("sequence"))
                order.append((sequence, _number(manifest.get("timestamp")), name))
        return [name for *_, name in sorted(order, reverse=True)]

    def wait(self, timeout: float | None = None) -> None:
        """Wait for background pushes; raise PushError for any that failed."""
        # NOTE: huggingface_hub 2.4 sends commit and upload requests without a read timeout, so
        # with timeout=None a server that accepts a request and never replies blocks this wait,
        # and close() and push() with it, until the connection drops. close(timeout=...) and
        # wait_for_pushes(timeout=...) bound the wait, but push() does not.
        finished = self.queue.wait(timeout)
        failures = self.queue.take_failures()
        if failures:
            names = [label for label, _ in failures]
            details = "; ".join(f"{label}: {describe_error(err)}" for label, err in failures)
            raise PushError(
                f"Pushing to {self.repo_id} failed for {', '.join(names)} ({details}). The "
                f"checkpoints are still on disk; call push() to upload them again.",
                repo_id=self.repo_id,
                checkpoints=names,
            ) from failures[-1][1]
        if not finished:
            raise PushError(
                f"Timed out waiting for pushes of {', '.join(self.queue.pending())} to "
                f"{self.repo_id}; they continue in the background.",
                repo_id=self.repo_id,
                checkpoints=self.queue.pending(),
            )

    def protected(self, finished: str | None = None) -> set[str]:
        """Checkpoints that retention must keep: those queued for a push or whose push failed.

        ``finished`` names a push whose job has succeeded but not yet returned, so the queue
        still lists it once; that listing does not count.
        """
        pending = self.queue.pending()
        if finished is not None and finished in pending:
            pending.remove(finished)
        return set(pending) | set(self.unpushed)

    # Fetching --------------------------------------------------------------------------------

    def head(self) -> str | None:
        """Return the commit id of the default branch, or None when the repository does not exist."""
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            return self.api.repo_info(self.repo_id, token=self.token(required=False)).sha
        except RepositoryNotFoundError:
            return None

    def read_json(self, path_in_repo: str, revision: str) -> dict[str, Any] | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            local = hf_hub_download(
                self.repo_id,
                path_in_repo,
                revision=revision,
                token=self.token(required=False),
                endpoint=hub_endpoint(),
            )
        except EntryNotFoundError:
            return None
        try:
            with open(local, encoding="utf-8") as handle:
                return json.load(handle)
        except (ValueError, RecursionError) as err:
            # ValueError covers invalid JSON and invalid UTF-8.
            raise HubError(
                f"{path_in_repo} in {self.repo_id} at {revision[:12]} is not valid JSON "
                f"({type(err).__name__}: {str(err)[:200]}).",
                repo_id=self.repo_id,
            ) from err

    def latest_pointer(self, revision: str) -> dict[str, Any] | None:
        pointer = self.read_json(LATEST_POINTER, revision)
        if pointer is not None and (
            not isinstance(pointer, dict)
            or pointer.get("format") != POINTER_FORMAT
            or not isinstance(pointer.get("name"), str)
        ):
            raise HubError(
                f"{LATEST_POINTER} in {self.repo_id} is not an hf-lifecycle pointer.",
                repo_id=self.repo_id,
            )
        return pointer

    def download_checkpoint(self, name: str, revision: str, destination: Path) -> Path:
        """Download one checkpoint folder at ``revision`` into ``destination``; return its folder."""
        from huggingface_hub import snapshot_download

        folder = f"{CHECKPOINTS_PREFIX}/{name}"
        try:
            manifest = self.read_json(f"{folder}/manifest.json", revision)
        except HubError as err:
            raise CheckpointCorruptedError(
                f"Checkpoint {name} in Hub repository {self.repo_id} is corrupted: {err}",
                path=f"{self.repo_id}/{folder}",
                file=f"{self.repo_id}/{folder}/manifest.json",
            ) from err
        if manifest is None:
            raise CheckpointNotFoundError(
                f"No checkpoint named {name!r} in Hub repository {self.repo_id}.",
                path=f"{self.repo_id}/{folder}",
            )
        snapshot_download(
            self.repo_id,
            revision=revision,
            endpoint=hub_endpoint(),
            allow_patterns=[f"{folder}/*"],
            local_dir=destination,
            token=self.token(required=False),
        )
        return destination / CHECKPOINTS_PREFIX / name

    # Interpreter exit ------------------------------------------------------------------------

    def _register_exit_flush(self) -> None:
        _FLUSH_AT_EXIT.add(self)
        _register_exit_hook()

    def unregister_exit_flush(self) -> None:
        _FLUSH_AT_EXIT.discard(self)

    def flush_at_exit(self, timeout: float | None = None) -> None:
        if timeout is None:
            timeout = self.exit_timeout
        pending = self.queue.pending()
        if pending:
            logger.warning(
                "Waiting for %d Hub pushes to %s before exiting: %s",
                len(pending), self.repo_id, ", ".join(pending),
            )
        finished = self.queue.wait(timeout)
        failures = self.queue.take_failures()
        lost = [label for label, _ in failures] + ([] if finished else self.queue.pending())
        if lost:
            message = (
                f"hf-lifecycle: NOT PUSHED to {self.repo_id}: {', '.join(lost)}. "
                f"The files are still on disk; run HFManager(repo_id={self.repo_id!r}).push() "
                f"to upload them."
            )
            if logger.hasHandlers():
                logger.error("%s", message)
            else:
                # Without logging configuration the message must still reach the terminal.
                print(message, file=sys.stderr)


# HubSync objects whose pending pushes are flushed when the interpreter exits.
_FLUSH_AT_EXIT: weakref.WeakSet[HubSync] = weakref.WeakSet()
_exit_hook_lock = threading.Lock()
_exit_hook_registered = False


def _flush_all_at_exit() -> None:
    for sync in list(_FLUSH_AT_EXIT):
        sync.flush_at_exit()


def _register_exit_hook() -> None:
    """Register :func:`_flush_all_at_exit` to run at interpreter exit, once per process.

    Uploads use ThreadPoolExecutor, which rejects new work once the exit hook of
    concurrent.futures has run, and that hook runs before any ``atexit`` function. The flush
    is therefore registered with the same hook list as concurrent.futures
    (``threading._register_atexit``, Python 3.9+), which runs in reverse order of
    registration: importing concurrent.futures.thread first puts the flush ahead of it.
    """
    global _exit_hook_registered
    with _exit_hook_lock:
        if _exit_hook_registered:
            return
        import concurrent.futures.thread  # noqa: F401 - registers its exit hook before ours

        registered = False
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            try:
                register(_flush_all_at_exit)
                registered = True
            except RuntimeError:
                pass  # Raised once interpreter shutdown has begun.
        if not registered:
            # NOTE: a flush from atexit runs after concurrent.futures has shut down, so a push
            # that hashes or uploads several files in parallel fails and is reported lost.
            atexit.register(_flush_all_at_exit)
        _exit_hook_registered = True


def _number(value: Any) -> float:
    """Return ``value`` if it is an int or float (not a bool), else 0, for sorting."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def checkpoint_operations(name: str, folder: Path) -> list[Any]:
    """Commit operations that upload a committed checkpoint: its manifest and the files it lists.

    Files that the manifest does not list stay local. A listed file that is missing, or is a
    symbolic link (which could point anywhere on this machine), raises
    :class:`CheckpointCorruptedError` instead of being uploaded.
    """
    from huggingface_hub import CommitOperationAdd

    from hf_lifecycle.checkpoint.store import MANIFEST_NAME, manifest_files, read_manifest

    root = folder.resolve()
    operations = []
    for relative in sorted([MANIFEST_NAME, *manifest_files(read_manifest(folder))]):
        path = folder / relative
        if path.is_symlink() or not path.is_file() or not path.resolve().is_relative_to(root):
            raise CheckpointCorruptedError(
                f"Not pushing checkpoint {name}: {path} is missing, a symbolic link, or outside "
                f"{folder}. Delete the checkpoint or restore the file.",
                path=str(folder),
                file=str(path),
            )
        operations.append(CommitOperationAdd(f"{CHECKPOINTS_PREFIX}/{name}/{relative}", str(path)))
    return operations


def pointer_operation(info: Any) -> Any:
    from huggingface_hub import CommitOperationAdd

    pointer = {
        "format": POINTER_FORMAT,
        "format_version": 1,
        "name": info.name,
        "sequence": info.sequence,
        "step": info.step,
        "epoch": info.epoch,
        "metrics": {k: v for k, v in info.metrics.items() if v == v and abs(v) != float("inf")},
        "timestamp": info.timestamp,
    }
    data = (json.dumps(pointer, indent=2, sort_keys=True) + "\n").encode("utf-8")
    return CommitOperationAdd(LATEST_POINTER, data)


def file_operations(files: Iterable[tuple[str, Path | bytes]]) -> list[Any]:
    """Commit operations that upload files (a path) or in-memory content (bytes)."""
    from huggingface_hub import CommitOperationAdd

    return [
        CommitOperationAdd(path_in_repo, content if isinstance(content, bytes) else str(content))
        for path_in_repo, content in files
    ]


def delete_folder_operation(name: str) -> Any:
    from huggingface_hub import CommitOperationDelete

    return CommitOperationDelete(f"{CHECKPOINTS_PREFIX}/{name}/", is_folder=True)


"""Asynchronous saves: an exact snapshot on the caller's thread, the write on a worker thread.

The snapshot copies every tensor of the state into buffers kept from the
previous save (pinned host memory for accelerator tensors), so after the first
save no memory is allocated and the copy runs at memory speed. The worker then
writes, commits and runs the after-commit steps exactly as a synchronous save
would. At most one save is in flight: the next one waits for it, or is skipped
when the caller asks for that.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from hf_lifecycle.checkpoint.format import EncodedState
from hf_lifecycle.checkpoint.serialize import CheckpointState

logger = logging.getLogger(__name__)


class SnapshotBuffers:
    """Host buffers reused across snapshots, keyed by tensor name, shape and dtype."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        source = tensor.detach()
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
            pin = source.device.type == "cuda"
            buffer = torch.empty(source.shape, dtype=source.dtype, pin_memory=pin)
            self._buffers[key] = buffer
        buffer.copy_(source, non_blocking=source.device.type == "cuda")
        return buffer

    def retain_only(self, keys: set[str]) -> None:
        """Drop buffers of tensors that the latest snapshot no longer has."""
        for key in list(self._buffers):
            if key not in keys:
                del self._buffers[key]

    def nbytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())


def snapshot_state(state: CheckpointState, buffers: SnapshotBuffers) -> CheckpointState:
    """Return ``state`` with every tensor replaced by a copy that later training cannot change."""
    used: set[str] = set()

    def copy_all(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        copied = {}
        for key, tensor in tensors.items():
            slot = f"{prefix}/{key}"
            used.add(slot)
            copied[key] = buffers.copy(slot, tensor)
        return copied

    snapshot = CheckpointState(
        model_aliases=dict(state.model_aliases),
        model_extra=state.model_extra,
        config=state.config,
    )
    if state.model is not None:
        snapshot.model = copy_all("model", state.model)
    for name, encoded in state.components.items():
        copied = EncodedState()
        copied.tree = encoded.tree
        copied.pickled = encoded.pickled
        copied.tensors = copy_all(name, encoded.tensors)
        snapshot.components[name] = copied
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # Non-blocking device-to-host copies must land before the write.
    buffers.retain_only(used)
    return snapshot


class BackgroundWriter:
    """Runs one save job at a time on a worker thread and keeps its error for the caller."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._running: str | None = None
        self._error: BaseException | None = None
        self.buffers = SnapshotBuffers()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running is not None

    def submit(self, label: str, job: Callable[[], Any]) -> None:
        """Start ``job`` on the worker. The caller must have waited for the previous job."""
        with self._lock:
            if self._running is not None:
                raise RuntimeError(f"A save ({self._running}) is still in flight.")
            self._running = label
            self._thread = threading.Thread(
                target=self._run, args=(label, job), name="hf-lifecycle-save", daemon=False
            )
            self._thread.start()

    def _run(self, label: str, job: Callable[[], Any]) -> None:
        try:
            job()
        except BaseException as err:  # noqa: BLE001 - kept and raised from wait()
            logger.error("Background save of %s failed: %s", label, err)
            with self._lock:
                self._error = err
        finally:
            with self._lock:
                self._running = None
                self._done.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no save is in flight; raise the last job's error, once. False on timeout."""
        with self._lock:
            finished = self._done.wait_for(lambda: self._running is None, timeout)
            error, self._error = self._error, None
        if error is not None:
            raise error
        return finished

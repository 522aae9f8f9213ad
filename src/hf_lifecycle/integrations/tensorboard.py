"""TensorBoard event files for the metrics logged through :meth:`HFManager.log_metrics`.

The files go to ``local_dir/runs/``, the folder the Hugging Face Hub reads for the
"Training metrics" tab of a repository, and :meth:`HFManager.push` uploads them with the
metadata. Writing needs tensorboardX (``pip install "hf-lifecycle[tensorboard]"``); without
it, one INFO line is logged and metrics are still tracked in the metadata file.

Each call writes its events synchronously and flushes them with an fsync, so a crash of the
training process loses nothing logged before it. tensorboardX's ``SummaryWriter`` queues
events for a background thread and gives no such point, so the events are written with its
``EventsWriter`` directly.

A writer opened on a folder that already contains event files starts its file with a
``SessionLog.START`` event at the step of its first metric. TensorBoard then discards every
older event at that step or later, so a run resumed from a checkpoint shows one curve,
without the steps the interrupted run logged after that checkpoint.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["RUNS_DIRNAME", "TensorBoardLogger", "event_files"]

logger = logging.getLogger(__name__)

RUNS_DIRNAME = "runs"
_EVENTS_MARKER = "tfevents"


def event_files(log_dir: str | os.PathLike[str]) -> list[Path]:
    """Return the TensorBoard event files under ``log_dir``, sorted by path."""
    root = Path(log_dir)
    if not root.is_dir():
        return []
    return sorted(
        path for path in root.rglob("*") if path.is_file() and _EVENTS_MARKER in path.name
    )


def _scalar(value: Any) -> float:
    if hasattr(value, "item"):
        value = value.item()
    return float(value)


class TensorBoardLogger:
    """Appends scalar metrics to one event file in ``log_dir``, opened on the first call.

    Thread-safe: every method takes one lock, so :meth:`read_files` never reads half a record.
    After :meth:`close`, the next :meth:`add_scalars` opens a new file.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        self.log_dir = Path(log_dir)
        self._lock = threading.Lock()
        self._writer: Any = None
        # None: not tried yet. False: tensorboardX is missing, so logging is off.
        self._available: bool | None = None

    @property
    def enabled(self) -> bool:
        """False once opening a writer found tensorboardX missing."""
        return self._available is not False

    def add_scalars(self, metrics: Mapping[str, Any], step: int) -> None:
        """Write one scalar event per metric at ``step``, then flush the file to disk.

        Values may be numbers, numpy scalars or one-element tensors. NaN and infinities
        are written as they are, as TensorBoard shows them.
        """
        if not metrics:
            return
        with self._lock:
            writer = self._open(step)
            if writer is None:
                return
            from tensorboardX.proto.event_pb2 import Event
            from tensorboardX.summary import scalar

            wall_time = time.time()
            for name, value in metrics.items():
                event = Event(wall_time=wall_time, step=step, summary=scalar(name, _scalar(value)))
                writer.write_event(event)
            writer.flush()

    def read_files(self) -> list[tuple[str, bytes]]:
        """Return ``(path relative to log_dir's parent, content)`` of every event file.

        The content is read under the writer's lock, so it ends on a complete record even
        while another thread logs.
        """
        base = self.log_dir.parent
        with self._lock:
            return [
                (path.relative_to(base).as_posix(), path.read_bytes())
                for path in event_files(self.log_dir)
            ]

    def close(self) -> None:
        """Flush and close the event file. Safe to call twice."""
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def _open(self, first_step: int) -> Any:
        if self._writer is not None or self._available is False:
            return self._writer
        try:
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event, SessionLog
        except ImportError:
            self._available = False
            logger.info(
                "tensorboardX is not installed, so no TensorBoard event files are written to "
                '%s. Install it with: pip install "hf-lifecycle[tensorboard]"',
                self.log_dir,
            )
            return None
        self._available = True
        restart = bool(event_files(self.log_dir))
        self.log_dir.mkdir(parents=True, exist_ok=True)

        # EventsWriter names files by the second. TensorBoard reads files in name order, so the
        # nanosecond suffix keeps two files opened within one second in creation order.
        writer = EventsWriter(str(self.log_dir / "events"), filename_suffix=f".{time.time_ns()}")
        if restart:
            writer.write_event(
                Event(
                    wall_time=time.time(),
                    step=first_step,
                    session_log=SessionLog(status=SessionLog.START),
                )
            )

        self._writer = writer
        logger.info("Writing TensorBoard events to %s", self.log_dir)
        return writer

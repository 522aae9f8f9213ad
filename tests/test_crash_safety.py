"""Crash safety: SIGKILL at any point of a save, and saves that fail with an OSError."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_lifecycle import CheckpointSaveError, HFManager, KeepAll, KeepLastN

SCRIPT = Path(__file__).parent / "scripts" / "save_until_killed.py"
TEMP_PREFIXES = (".tmp-", ".old-", ".del-")


def saver_model() -> torch.nn.Module:
    """The architecture the saver script checkpoints."""
    return torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 8))


class Saver:
    """The saver script, driven one command at a time over its stdin and stdout."""

    def __init__(self, checkpoint_dir: Path, local_dir: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(checkpoint_dir), str(local_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.read_line() == "ready"

    def read_line(self) -> str:
        line = self.process.stdout.readline()
        assert line, f"the saver script exited with {self.process.wait()}"
        return line.strip()

    def send(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def read_until_exit(self) -> tuple[list[str], int]:
        lines = []
        while not (line := self.read_line()).startswith("exit "):
            lines.append(line)
        return lines, int(line.split()[1])

    def run(self, command: str) -> tuple[list[str], int]:
        self.send(command)
        return self.read_until_exit()

    def kill_while_saving(self, saves_before: int, delay: float) -> int:
        """Start the save loop, SIGKILL it ``delay`` s after it announces save ``saves_before``."""
        self.send("loop")
        pid, announced = None, -1
        while pid is None or announced < saves_before:
            words = self.read_line().split()
            if words[0] == "pid":
                pid = int(words[1])
            elif words[0] == "saving":
                announced = int(words[1])
            else:
                raise AssertionError(f"unexpected output {words}")
        if delay:
            time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        _, code = self.read_until_exit()
        return code

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def assert_recovered(checkpoint_dir: Path, local_dir: Path, required: tuple[str, ...] = ()) -> None:
    """A new manager finds only complete checkpoints, loses none, and removes every leftover.

    Retention is KeepLastN(3), so at least 3 checkpoints are committed at any moment (more when
    a kill came between a commit and its retention run), and the names in ``required``, which
    are replaced but never deleted, always exist.
    """
    manager = HFManager(
        local_dir=local_dir, checkpoint_dir=checkpoint_dir, retention_policy=KeepLastN(3)
    )
    entries = os.listdir(checkpoint_dir)
    assert [name for name in entries if name.startswith(TEMP_PREFIXES)] == []

    listed = [checkpoint["name"] for checkpoint in manager.list_checkpoints()]
    assert len(listed) >= 3, listed
    for name in required:
        assert name in listed, name
    assert sorted(name for name in entries if not name.startswith(".")) == sorted(listed)
    for name in listed:
        assert manager.store.verify(name) == [], name

    model = saver_model()
    loaded = manager.load_latest_checkpoint(model)
    assert loaded["name"] == listed[0]
    assert model[0].weight[0, 0].item() == loaded["custom_state"]["marker"]


# Events that change which names exist. Killing at event i stops the child just before it, so
# the point after each of these events is the state right after the change.
NAMESPACE_EVENTS = {"mkdir", "rename", "replace", "rename_exchange", "rmtree", "unlink"}


def kill_points(events: list[str], spread: int) -> list[int]:
    """Pick 1-based event numbers: right after each namespace change, plus ``spread`` evenly spaced.

    Of a run of equal events (the unlinks inside one rmtree), only the first and last count.
    """
    points = {1 + (len(events) - 1) * index // (spread - 1) for index in range(spread)}
    for index, event in enumerate(events):
        if event not in NAMESPACE_EVENTS:
            continue
        inside_run = 0 < index < len(events) - 1 and events[index - 1] == event == events[index + 1]
        if not inside_run:
            points.add(min(index + 2, len(events)))
    return sorted(points)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_at_event_recovers(tmp_path):
    checkpoint_dir, local_dir = tmp_path / "ckpt", tmp_path / "out"
    saver = Saver(checkpoint_dir, local_dir)
    try:
        saver.run("round")
        lines, code = saver.run("round")
        assert code == 0, lines
        events = lines[-1].split()[1:]
        assert "rename_exchange" in events, events

        for point in kill_points(events, spread=10):
            lines, code = saver.run(f"kill-at {point}")
            assert code == -signal.SIGKILL, (point, events[point - 1], lines)
            assert_recovered(checkpoint_dir, local_dir, required=("latest",))
    finally:
        saver.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_after_saving_recovers(tmp_path):
    checkpoint_dir, local_dir = tmp_path / "ckpt", tmp_path / "out"
    saver = Saver(checkpoint_dir, local_dir)
    try:
        saver.run("round")
        for index, delay in enumerate([0.0, 0.0, 0.001, 0.003, 0.006, 0.01, 0.02, 0.04]):
            code = saver.kill_while_saving(saves_before=index % 2, delay=delay)
            assert code == -signal.SIGKILL
            assert_recovered(checkpoint_dir, local_dir)
    finally:
        saver.close()


# Saves that fail with an OSError -------------------------------------------------------------


def checkpoint_fsyncs(monkeypatch, checkpoint_dir: Path, fail_at: int | None) -> list[str]:
    """Record fsyncs of files under ``checkpoint_dir``, and raise ENOSPC from the ``fail_at``-th."""
    calls: list[str] = []
    real_fsync = os.fsync
    root = str(checkpoint_dir.resolve())

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if stat.S_ISREG(os.fstat(fd).st_mode) and path.startswith(root + os.sep):
            calls.append(path)
            if len(calls) == fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def manager_with_two(folder: Path) -> tuple[HFManager, torch.nn.Module]:
    """A manager holding "a" and "b", switched to KeepLastN(1) so a retention run would delete."""
    manager = HFManager(
        local_dir=folder / "out", checkpoint_dir=folder / "ckpt", retention_policy=KeepAll()
    )
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    optimizer = torch.optim.AdamW(model.parameters())
    for name in ("a", "b"):
        manager.save_checkpoint(model, optimizer, name=name, custom_state={"name": name})
    manager.retention_policy = KeepLastN(1)
    return manager, model


def assert_untouched(manager: HFManager) -> None:
    assert sorted(os.listdir(manager.checkpoint_dir)) == [".index.json", "a", "b"]
    assert [checkpoint["name"] for checkpoint in manager.list_checkpoints()] == ["b", "a"]
    for name in ("a", "b"):
        assert manager.store.verify(name) == [], name


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_failed_fsync_raises_save_error(tmp_path, monkeypatch):
    probe, model = manager_with_two(tmp_path / "probe")
    with monkeypatch.context() as patch:
        calls = checkpoint_fsyncs(patch, probe.checkpoint_dir, fail_at=None)
        probe.save_checkpoint(
            model, torch.optim.AdamW(model.parameters()), name="c", custom_state={}
        )
    fsync_count = len(calls)
    assert fsync_count >= 5

    for fail_at in range(1, fsync_count + 1):
        manager, model = manager_with_two(tmp_path / f"fail-{fail_at}")
        with monkeypatch.context() as patch:
            checkpoint_fsyncs(patch, manager.checkpoint_dir, fail_at=fail_at)
            with pytest.raises(CheckpointSaveError) as caught:
                manager.save_checkpoint(
                    model, torch.optim.AdamW(model.parameters()), name="c", custom_state={}
                )

        assert caught.value.__cause__.errno == errno.ENOSPC, fail_at
        assert "'c'" in str(caught.value)
        assert_untouched(manager)


def test_failed_rename_raises_save_error(tmp_path, monkeypatch):
    manager, model = manager_with_two(tmp_path)
    real_rename = os.rename

    def rename(source, target, *args, **kwargs):
        if os.path.basename(source).startswith(".tmp-c-"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), source)
        return real_rename(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(CheckpointSaveError) as caught:
        manager.save_checkpoint(model, name="c")

    assert caught.value.__cause__.errno == errno.EIO
    assert_untouched(manager)


def test_failed_save_keeps_metadata(tmp_path, monkeypatch):
    manager, model = manager_with_two(tmp_path)
    metadata = Path(manager.local_dir) / "experiment_metadata.json"
    before = metadata.read_bytes()

    with monkeypatch.context() as patch:
        checkpoint_fsyncs(patch, manager.checkpoint_dir, fail_at=1)
        with pytest.raises(CheckpointSaveError):
            manager.save_checkpoint(model, name="c")

    assert metadata.read_bytes() == before

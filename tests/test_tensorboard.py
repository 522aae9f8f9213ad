"""TensorBoard event files written by HFManager.log_metrics, read back with TensorBoard itself."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, snapshot_download

pytest.importorskip("tensorboardX")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

from hf_lifecycle import HFManager  # noqa: E402
from hf_lifecycle.integrations.tensorboard import TensorBoardLogger, event_files  # noqa: E402

TENSORBOARDX_MODULES = (
    "tensorboardX",
    "tensorboardX.event_file_writer",
    "tensorboardX.proto.event_pb2",
    "tensorboardX.summary",
)


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    accumulator = event_accumulator.EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def as_float32(value: float) -> float:
    # Event files store scalars as 32-bit floats.
    return float(np.float32(value))


def test_values_at_steps(tmp_path):
    manager = HFManager(local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")
    losses = [2.5, 1.75, 1.125, 0.8]
    for step, loss in enumerate(losses, start=1):
        manager.log_metrics(
            {"loss": torch.tensor(loss), "lr": np.float64(0.1 / step)}, step=step * 10
        )
    manager.log_metrics({"accuracy": 0.5})
    manager.close()

    scalars = read_scalars(tmp_path / "out" / "runs")
    assert scalars["loss"] == [(step * 10, as_float32(loss)) for step, loss in enumerate(losses, 1)]
    assert scalars["lr"][-1] == (40, as_float32(0.1 / 4))
    assert scalars["accuracy"] == [(41, 0.5)]


def test_flushed_before_crash(tmp_path):
    code = textwrap.dedent(
        f"""
        import os, signal
        from hf_lifecycle import HFManager
        manager = HFManager(
            local_dir={str(tmp_path / "out")!r}, checkpoint_dir={str(tmp_path / "ckpt")!r}
        )
        for step in range(1, 4):
            manager.log_metrics({{"loss": 1.0 / step}}, step=step)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert result.returncode == -9
    scalars = read_scalars(tmp_path / "out" / "runs")
    assert scalars["loss"] == [(step, as_float32(1.0 / step)) for step in range(1, 4)]


def test_resume_purges_later_steps(tmp_path):
    directories = dict(local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")
    first = HFManager(**directories)
    for step in range(1, 11):
        first.log_metrics({"loss": float(step)}, step=step)
    first.log_metrics({"eval_loss": 0.25}, step=10)
    first.close()

    # A resumed run logs steps 6 to 8 again, with other values.
    second = HFManager(**directories)
    for step in range(6, 9):
        second.log_metrics({"loss": float(step) + 0.5}, step=step)
    second.close()

    assert len(event_files(tmp_path / "out" / "runs")) == 2
    steps = [(step, float(step)) for step in range(1, 6)]
    steps += [(step, float(step) + 0.5) for step in range(6, 9)]
    scalars = read_scalars(tmp_path / "out" / "runs")
    assert scalars["loss"] == steps
    # Purged although the resumed run has not logged eval_loss yet.
    assert scalars.get("eval_loss", []) == []


def test_missing_tensorboardx(tmp_path, monkeypatch, caplog):
    for name in TENSORBOARDX_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    manager = HFManager(local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")
    with caplog.at_level(logging.INFO, logger="hf_lifecycle.integrations.tensorboard"):
        manager.log_metrics({"loss": 1.0}, step=1)
        manager.log_metrics({"loss": 0.5}, step=2)
    manager.close()

    notices = [
        record for record in caplog.records if "tensorboardX is not installed" in record.message
    ]
    assert len(notices) == 1
    assert notices[0].levelno == logging.INFO
    assert 'pip install "hf-lifecycle[tensorboard]"' in notices[0].message
    assert not (tmp_path / "out" / "runs").exists()
    assert [record["value"] for record in manager.tracker.history("loss")] == [1.0, 0.5]


def test_reopens_after_close(tmp_path):
    logger = TensorBoardLogger(tmp_path / "runs")
    logger.add_scalars({"loss": 1.0}, 1)
    logger.close()
    logger.close()
    logger.add_scalars({"loss": 0.5}, 2)
    logger.close()
    assert read_scalars(tmp_path / "runs")["loss"] == [(1, 1.0), (2, 0.5)]


def test_read_files_paths(tmp_path):
    logger = TensorBoardLogger(tmp_path / "runs")
    assert logger.read_files() == []
    logger.add_scalars({"loss": 1.0}, 1)
    files = logger.read_files()
    logger.close()
    assert len(files) == 1
    assert files[0][0].startswith("runs/events.out.tfevents.")
    assert files[0][1] == next((tmp_path / "runs").iterdir()).read_bytes()


def test_push_uploads_events(tmp_path, hub, repo_id):
    manager = HFManager(
        repo_id=repo_id, local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt"
    )
    for step in range(1, 4):
        manager.log_metrics({"loss": 1.0 / step}, step=step)
    manager.push(push_checkpoints=False)
    manager.close()

    events = [path for path in HfApi().list_repo_files(repo_id) if path.startswith("runs/")]
    assert len(events) == 1
    local = snapshot_download(repo_id, allow_patterns=["runs/*"], local_dir=tmp_path / "download")
    scalars = read_scalars(f"{local}/runs")
    assert scalars["loss"] == [(step, as_float32(1.0 / step)) for step in range(1, 4)]


def test_checkpoint_push_uploads_events(tmp_path, hub, repo_id):
    manager = HFManager(
        repo_id=repo_id, local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt"
    )
    manager.log_metrics({"loss": 1.0}, step=1)
    manager.save_checkpoint(torch.nn.Linear(2, 2), step=1, push=True)
    manager.close()

    files = HfApi().list_repo_files(repo_id)
    assert any(path.startswith("runs/events.out.tfevents.") for path in files)

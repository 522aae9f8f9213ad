"""Asynchronous saves: exact snapshots, crash safety, and errors raised where the caller waits."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import hf_lifecycle.manager as manager_module
from hf_lifecycle import CheckpointSaveError, HFManager, KeepLastN


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(8, 16)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def new_manager(tmp_path: Path, **options) -> HFManager:
    return HFManager(local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt", **options)


def state_copy(module_or_optimizer) -> dict:
    state = module_or_optimizer.state_dict()
    if "state" in state:
        return {
            index: {key: value.clone() for key, value in entry.items()}
            for index, entry in state["state"].items()
        }
    return {key: value.clone() for key, value in state.items()}


def load_into_new_objects(manager: HFManager, name: str):
    """Load checkpoint ``name`` into a new model and AdamW optimizer, and return both."""
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters())
    manager.load_checkpoint(name, model, optimizer)
    return model, optimizer


def assert_same_moments(optimizer: torch.optim.Optimizer, moments: dict) -> None:
    for index, entry in moments.items():
        for key, value in entry.items():
            assert torch.equal(optimizer.state_dict()["state"][index][key], value), key


def test_snapshot_ignores_later_changes(tmp_path):
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters())
    train_step(model, optimizer)
    manager = new_manager(tmp_path, model=model, optimizer=optimizer, async_save=True)
    weights = state_copy(model)
    moments = state_copy(optimizer)

    manager.save_checkpoint(step=1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    train_step(model, optimizer)
    manager.wait_for_checkpoints()

    fresh, fresh_optimizer = load_into_new_objects(manager, "checkpoint-step-1")
    for key, value in weights.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert_same_moments(fresh_optimizer, moments)


def delay_deferred_copy(monkeypatch, seconds: float) -> None:
    """Make the worker start its copy of the optimizer state ``seconds`` late."""
    from hf_lifecycle.checkpoint import writer

    run = writer.DeferredCopy.run

    def late_run(self, buffers):
        time.sleep(seconds)
        return run(self, buffers)

    monkeypatch.setattr(writer.DeferredCopy, "run", late_run)


def test_optimizer_step_waits_for_copy(tmp_path, monkeypatch):
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters())
    train_step(model, optimizer)
    manager = new_manager(tmp_path, model=model, optimizer=optimizer, async_save=True)
    moments = state_copy(optimizer)
    delay_deferred_copy(monkeypatch, 0.3)

    manager.save_checkpoint(step=1)
    train_step(model, optimizer)  # Its step() must wait until the state is copied.
    manager.wait_for_checkpoints()

    fresh, fresh_optimizer = load_into_new_objects(manager, "checkpoint-step-1")
    assert_same_moments(fresh_optimizer, moments)


def test_state_changed_outside_step_fails_save(tmp_path, monkeypatch):
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters())
    train_step(model, optimizer)
    manager = new_manager(tmp_path, model=model, optimizer=optimizer, async_save=True)
    manager.save_checkpoint(step=1)
    manager.wait_for_checkpoints()
    delay_deferred_copy(monkeypatch, 0.3)

    manager.save_checkpoint(step=2)
    first_state = next(iter(optimizer.state.values()))
    first_state["exp_avg"].add_(1.0)  # In place, outside optimizer.step().

    with pytest.raises(CheckpointSaveError) as caught:
        manager.wait_for_checkpoints()
    assert "changed in place" in str(caught.value)
    assert "wait_for_checkpoints()" in str(caught.value)
    assert [entry["name"] for entry in manager.list_checkpoints()] == ["checkpoint-step-1"]


class WrappedOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer the way accelerate's AcceleratedOptimizer does: it subclasses
    Optimizer without calling its __init__, so it has no step hooks of its own."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # noqa: D107
        self.optimizer = optimizer

    @property
    def state(self):
        return self.optimizer.state

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        return self.optimizer.step(closure)


def test_wrapped_optimizer_step_waits(tmp_path, monkeypatch):
    model = make_model()
    optimizer = WrappedOptimizer(torch.optim.AdamW(model.parameters()))
    train_step(model, optimizer)
    manager = new_manager(tmp_path, model=model, optimizer=optimizer, async_save=True)
    moments = state_copy(optimizer)
    delay_deferred_copy(monkeypatch, 0.3)

    manager.save_checkpoint(step=1)
    assert len(optimizer.optimizer._optimizer_step_pre_hooks) == 1
    train_step(model, optimizer)
    manager.wait_for_checkpoints()

    fresh, fresh_optimizer = load_into_new_objects(manager, "checkpoint-step-1")
    assert_same_moments(fresh_optimizer, moments)


class HandRolledOptimizer:
    """An optimizer-like object with no torch step hooks: its state is copied by the call."""

    def __init__(self) -> None:
        self.momentum = torch.ones(1000)

    def state_dict(self):
        return {"state": {0: {"momentum": self.momentum}}, "param_groups": [{"params": [0]}]}


def test_hookless_optimizer_copied_by_call(tmp_path, monkeypatch):
    optimizer = HandRolledOptimizer()
    manager = new_manager(tmp_path, model=make_model(), async_save=True)
    delay_deferred_copy(monkeypatch, 0.3)

    path = manager.save_checkpoint(optimizer=optimizer, step=1)
    optimizer.momentum.add_(1.0)
    manager.wait_for_checkpoints()

    from safetensors.torch import load_file

    saved = load_file(Path(path) / "optimizer.safetensors")
    assert [torch.equal(value, torch.ones(1000)) for value in saved.values()] == [True]


def test_close_removes_step_hook(tmp_path):
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters())
    train_step(model, optimizer)
    manager = new_manager(tmp_path, model=model, optimizer=optimizer, async_save=True)
    hooks_before = len(optimizer._optimizer_step_pre_hooks)

    manager.save_checkpoint(step=1)
    assert len(optimizer._optimizer_step_pre_hooks) == hooks_before + 1
    manager.close()

    assert len(optimizer._optimizer_step_pre_hooks) == hooks_before


def test_async_returns_final_path(tmp_path):
    manager = new_manager(tmp_path, model=make_model())

    path = manager.save_checkpoint(step=3, blocking=False)
    manager.wait_for_checkpoints()

    assert path == str(manager.checkpoint_dir / "checkpoint-step-3")
    assert (Path(path) / "manifest.json").is_file()


def test_retention_runs_after_async_commit(tmp_path):
    manager = new_manager(tmp_path, model=make_model(), async_save=True,
                          retention_policy=KeepLastN(2))

    for step in range(1, 5):
        manager.save_checkpoint(step=step)
    manager.close()

    names = [entry["name"] for entry in manager.list_checkpoints()]
    assert names == ["checkpoint-step-4", "checkpoint-step-3"]


def failing_write(monkeypatch) -> threading.Event:
    """Make every write fail with ENOSPC; the returned event is set once one has failed."""
    failed = threading.Event()

    def broken(*args, **kwargs):
        failed.set()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manager_module, "write_state", broken)
    return failed


def test_worker_error_raised_by_wait(tmp_path, monkeypatch):
    manager = new_manager(tmp_path, model=make_model())
    manager.save_checkpoint(step=1)
    failing_write(monkeypatch)

    manager.save_checkpoint(step=2, blocking=False)

    with pytest.raises(CheckpointSaveError) as caught:
        manager.wait_for_checkpoints()
    assert "No space left" in str(caught.value)
    assert [entry["name"] for entry in manager.list_checkpoints()] == ["checkpoint-step-1"]


def test_worker_error_raised_by_next_save(tmp_path, monkeypatch):
    manager = new_manager(tmp_path, model=make_model())
    failed = failing_write(monkeypatch)
    manager.save_checkpoint(step=1, blocking=False)
    assert failed.wait(30)
    monkeypatch.undo()

    with pytest.raises(CheckpointSaveError):
        manager.save_checkpoint(step=2, blocking=False)
    manager.save_checkpoint(step=3, blocking=False)
    manager.close()

    assert [entry["name"] for entry in manager.list_checkpoints()] == ["checkpoint-step-3"]


def test_worker_error_raised_by_close(tmp_path, monkeypatch):
    manager = new_manager(tmp_path, model=make_model())
    failing_write(monkeypatch)
    manager.save_checkpoint(step=1, blocking=False)

    with pytest.raises(CheckpointSaveError):
        manager.close()


def test_skip_if_busy_skips(tmp_path, monkeypatch):
    release = threading.Event()
    started = threading.Event()
    original = manager_module.write_state

    def slow_write(*args, **kwargs):
        started.set()
        release.wait(30)
        return original(*args, **kwargs)

    monkeypatch.setattr(manager_module, "write_state", slow_write)
    manager = new_manager(tmp_path, model=make_model())
    manager.save_checkpoint(step=1, blocking=False)
    assert started.wait(30)

    skipped = manager.save_checkpoint(step=2, blocking=False, skip_if_busy=True)
    release.set()
    manager.close()

    assert skipped is None
    assert [entry["name"] for entry in manager.list_checkpoints()] == ["checkpoint-step-1"]


CHILD = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from hf_lifecycle import HFManager, KeepAll

    folder = sys.argv[1]
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
    manager = HFManager(local_dir=os.path.join(folder, "out"),
                        checkpoint_dir=os.path.join(folder, "ckpt"), model=model,
                        retention_policy=KeepAll())
    manager.save_checkpoint(step=1)
    print("first", flush=True)
    for step in range(2, 1000):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        manager.save_checkpoint(step=step, blocking=False)
        print("submitted", step, flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [1, 2, 4, 7])
def test_sigkill_during_async_write(tmp_path, kill_after):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    submitted = 0
    for line in process.stdout:
        if line.startswith("submitted"):
            submitted += 1
            if submitted >= kill_after:
                break
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    manager = new_manager(tmp_path)
    names = [entry["name"] for entry in manager.list_checkpoints()]
    assert "checkpoint-step-1" in names
    leftovers = [name for name in os.listdir(manager.checkpoint_dir) if name.startswith(".tmp-")]
    assert leftovers == []
    for name in names:
        assert manager.store.verify(name) == [], name
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
    loaded = manager.load_latest_checkpoint(model)
    assert loaded["name"] == names[0]


def test_threaded_snapshot_is_exact(tmp_path):
    # Above 8 MiB the copy is split into byte ranges for several threads. The ranges cut
    # tensors in the middle, so this checks that every tensor still arrives whole.
    from hf_lifecycle.checkpoint.serialize import build_state
    from hf_lifecycle.checkpoint.writer import SnapshotBuffers, snapshot_state

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1536), torch.nn.Linear(1536, 1000))
    custom = {
        "transposed": torch.randn(300, 200).t(),  # Not contiguous, so not copied as raw bytes.
        "half": torch.randn(777, dtype=torch.bfloat16),
        "empty": torch.empty(0),
        # 300 small tensors (19 MB) take the torch._foreach_copy_ path, split between threads.
        "many": [torch.randn(16384) for _ in range(300)],
    }
    state = build_state(
        model=model, optimizer=None, scheduler=None, rng_state=None, custom_state=custom,
        config=None, allow_pickle=False,
    )
    buffers = SnapshotBuffers()
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        snapshot, deferred = snapshot_state(state, buffers)
        again, _ = snapshot_state(state, buffers)  # Reuses the buffers of the first snapshot.
    finally:
        torch.set_num_threads(threads)
        buffers.release()
    assert deferred is None
    for key, value in model.state_dict().items():
        assert torch.equal(snapshot.model[key], value), key
        assert snapshot.model[key].data_ptr() != value.data_ptr(), key
        assert again.model[key].data_ptr() == snapshot.model[key].data_ptr(), key
    tensors = snapshot.components["custom_state"].tensors
    for key, value in state.components["custom_state"].tensors.items():
        assert torch.equal(tensors[key], value), key


@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_split_ranges_cover_every_byte(parts):
    from hf_lifecycle.checkpoint.writer import _split_ranges

    sizes = [7, 1, 4096, 13, 100_000, 3]
    ranges, start = [], 0
    for size in sizes:
        ranges.append((10_000_000 + start, start, size))  # (destination, source, nbytes)
        start += size
    shares = _split_ranges(ranges, parts)

    assert len(shares) == parts
    pieces = [piece for share in shares for piece in share]
    position = 0
    for destination, source, nbytes in pieces:
        assert nbytes > 0
        assert source == position
        assert destination == 10_000_000 + position
        position += nbytes
    assert position == sum(sizes)
    totals = [sum(piece[2] for piece in share) for share in shares]
    assert max(totals) - min(totals) <= -(-sum(sizes) // parts)


def test_pickled_custom_state_frozen_at_call(tmp_path, monkeypatch):
    manager = new_manager(tmp_path, model=make_model())
    write_state = manager_module.write_state

    def late_write(*args, **kwargs):
        time.sleep(0.3)  # The change below happens before the worker writes.
        return write_state(*args, **kwargs)

    monkeypatch.setattr(manager_module, "write_state", late_write)
    history = collections.deque([1])  # Not JSON: saved with pickle.

    manager.save_checkpoint(
        step=1, custom_state={"history": history}, allow_pickle=True, blocking=False
    )
    history.append(2)
    manager.wait_for_checkpoints()

    loaded = manager.load_checkpoint("checkpoint-step-1", allow_pickle=True)
    assert list(loaded["custom_state"]["history"]) == [1]


def test_scheduler_changed_tensor_lr_kept(tmp_path, monkeypatch):
    # LR schedulers change a tensor lr in place (fill_), outside optimizer.step().
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train_step(model, optimizer)
    manager = new_manager(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler)
    delay_deferred_copy(monkeypatch, 0.3)

    manager.save_checkpoint(step=1, blocking=False)
    scheduler.step()
    manager.wait_for_checkpoints()

    fresh = make_model()
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=torch.tensor(0.5))
    manager.load_checkpoint("checkpoint-step-1", fresh, fresh_optimizer)
    assert float(fresh_optimizer.param_groups[0]["lr"]) == pytest.approx(1e-3)

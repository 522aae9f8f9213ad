"""Checkpoint order, replacement by name, and detection of corrupted or truncated files."""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
from pathlib import Path

import pytest
import torch

from hf_lifecycle import CheckpointCorruptedError, HFManager, KeepAll

MANIFEST = "manifest.json"


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def trained(seed: int = 0):
    model = tiny_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def new_manager(tmp_path: Path, **kwargs) -> HFManager:
    kwargs.setdefault("retention_policy", KeepAll())
    return HFManager(local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt", **kwargs)


def listed_names(manager: HFManager) -> list[str]:
    return [checkpoint["name"] for checkpoint in manager.list_checkpoints()]


def flip_byte(path: Path, position: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(position)
        value = handle.read(1)[0]
        handle.seek(position)
        handle.write(bytes([value ^ 0x01]))


# Order ---------------------------------------------------------------------------------------


def test_order_step_restarts_each_epoch(tmp_path):
    manager = new_manager(tmp_path)
    model = tiny_model()
    committed = []
    for epoch in range(2):
        for step in range(3):
            name = f"epoch{epoch}-step{step}"
            manager.save_checkpoint(model, epoch=epoch, step=step, name=name)
            committed.append(name)

    assert listed_names(manager) == committed[::-1]
    assert manager.load_latest_checkpoint(tiny_model())["name"] == committed[-1]


@pytest.mark.parametrize("steps", [(9, 10), (10, 9)], ids=["9-then-10", "10-then-9"])
def test_order_unpadded_names(tmp_path, steps):
    manager = new_manager(tmp_path)
    model = tiny_model()
    for step in steps:
        manager.save_checkpoint(model, step=step)

    expected = [f"checkpoint-step-{step}" for step in reversed(steps)]
    assert listed_names(manager) == expected
    assert manager.load_latest_checkpoint(tiny_model())["name"] == expected[0]


class SteppedClock:
    """A stand-in for the time module whose ``time()`` calls ``now``."""

    def __init__(self, now) -> None:
        self.time = now

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.mark.parametrize("tick", [0.0, -0.01], ids=["same-instant", "clock-backwards"])
def test_order_saves_within_one_second(tmp_path, monkeypatch, tick):
    # The manifests' timestamps are equal, or step back as after a clock adjustment, all within
    # one second, so only the commit order can sort them.
    clock = itertools.count()
    monkeypatch.setattr(
        "hf_lifecycle.manager.time", SteppedClock(lambda: 1_700_000_000.5 + tick * next(clock))
    )
    manager = new_manager(tmp_path)
    model = tiny_model()
    names = [f"run-{index}" for index in range(12)]
    random.Random(3).shuffle(names)
    for name in names:
        manager.save_checkpoint(model, name=name)

    listed = manager.list_checkpoints()
    assert {int(checkpoint["timestamp"]) for checkpoint in listed} == {1_700_000_000}
    assert [checkpoint["name"] for checkpoint in listed] == names[::-1]
    assert manager.load_latest_checkpoint(tiny_model())["name"] == names[-1]
    os.remove(tmp_path / "ckpt" / ".index.json")
    assert listed_names(new_manager(tmp_path)) == names[::-1]


@pytest.mark.parametrize("keep_index", [True, False], ids=["cached", "rebuilt"])
def test_order_seen_by_new_manager(tmp_path, keep_index):
    manager = new_manager(tmp_path)
    model = tiny_model()
    names = ["checkpoint-step-10", "checkpoint-step-9", "b", "a"]
    for name in names:
        manager.save_checkpoint(model, name=name)
    if not keep_index:
        os.remove(tmp_path / "ckpt" / ".index.json")

    assert listed_names(new_manager(tmp_path)) == names[::-1]


def test_replace_same_name(tmp_path, caplog):
    manager = new_manager(tmp_path)
    model = tiny_model()
    manager.save_checkpoint(model, name="a", custom_state={"version": 1})
    manager.save_checkpoint(model, name="b", custom_state={"version": 1})
    with caplog.at_level(logging.WARNING, logger="hf_lifecycle"):
        manager.save_checkpoint(model, name="a", custom_state={"version": 2})

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Replaced" in message and "a" in message for message in warnings), warnings
    assert listed_names(manager) == ["a", "b"]
    assert manager.load_checkpoint("a")["custom_state"] == {"version": 2}
    assert sorted(os.listdir(tmp_path / "ckpt")) == [".index.json", "a", "b"]


def test_replace_seen_by_new_manager(tmp_path):
    manager = new_manager(tmp_path)
    model = tiny_model()
    manager.save_checkpoint(model, name="a", custom_state={"version": 1})
    manager.save_checkpoint(model, name="b")
    manager.save_checkpoint(model, name="a", custom_state={"version": 2})

    reopened = new_manager(tmp_path)
    assert listed_names(reopened) == ["a", "b"]
    assert reopened.load_latest_checkpoint(tiny_model())["custom_state"] == {"version": 2}


# Corruption ----------------------------------------------------------------------------------

# (file, byte position): a negative position counts from the end of the file.
CORRUPTIONS = [
    ("model.safetensors", 0),  # header length
    ("model.safetensors", 12),  # header JSON
    ("model.safetensors", -1),  # tensor data
    ("optimizer.json", 20),
    ("optimizer.safetensors", 12),
    ("optimizer.safetensors", -1),
    ("scheduler.json", 5),
    ("rng_state.json", -3),
    ("rng_state.safetensors", -1),
    ("custom_state.json", 3),
    ("custom_state.safetensors", -1),
    ("config.json", 4),
]
DATA_FILES = sorted({name for name, _ in CORRUPTIONS})


@pytest.fixture
def two_checkpoints(tmp_path):
    """Save "old" then "new", each with every kind of file, and return the manager."""
    manager = new_manager(tmp_path)
    for name, seed in (("old", 1), ("new", 2)):
        model, optimizer, scheduler = trained(seed)
        manager.save_checkpoint(
            model,
            optimizer,
            scheduler,
            name=name,
            custom_state={"table": torch.arange(6.0), "epoch": seed},
            config={"hidden": 8, "seed": seed},
        )
    return manager


def state_copy(module_or_optimizer) -> dict[str, torch.Tensor]:
    state = module_or_optimizer.state_dict()
    if "state" in state:
        return {
            f"{index}.{key}": value.clone()
            for index, entry in state["state"].items()
            for key, value in entry.items()
        }
    return {key: value.clone() for key, value in state.items()}


def assert_unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_checkpoint_has_every_file(two_checkpoints):
    folder = Path(two_checkpoints.checkpoint_dir) / "new"
    assert sorted(os.listdir(folder)) == sorted(DATA_FILES + [MANIFEST])


@pytest.mark.parametrize(("filename", "position"), CORRUPTIONS)
def test_corrupt_byte_load_raises(two_checkpoints, filename, position):
    path = Path(two_checkpoints.checkpoint_dir) / "new" / filename
    flip_byte(path, position % path.stat().st_size)
    model, optimizer, scheduler = trained(seed=5)
    model_before, optimizer_before = state_copy(model), state_copy(optimizer)

    with pytest.raises(CheckpointCorruptedError) as caught:
        two_checkpoints.load_checkpoint("new", model, optimizer, scheduler)

    assert caught.value.file == str(path)
    assert filename in str(caught.value)
    assert_unchanged(model_before, state_copy(model))
    assert_unchanged(optimizer_before, state_copy(optimizer))


@pytest.mark.parametrize("filename", DATA_FILES)
def test_truncated_file_load_raises(two_checkpoints, filename):
    path = Path(two_checkpoints.checkpoint_dir) / "new" / filename
    os.truncate(path, path.stat().st_size // 2)
    model = tiny_model(seed=5)
    before = state_copy(model)

    with pytest.raises(CheckpointCorruptedError) as caught:
        two_checkpoints.load_checkpoint("new", model)

    assert caught.value.file == str(path)
    assert_unchanged(before, state_copy(model))


@pytest.mark.parametrize("filename", ["model.safetensors", "optimizer.json", "config.json"])
def test_missing_file_load_raises(two_checkpoints, filename):
    path = Path(two_checkpoints.checkpoint_dir) / "new" / filename
    path.unlink()

    with pytest.raises(CheckpointCorruptedError) as caught:
        two_checkpoints.load_checkpoint("new", tiny_model())

    assert caught.value.file == str(path)


@pytest.mark.parametrize(("filename", "position"), CORRUPTIONS)
def test_corrupt_latest_falls_back(two_checkpoints, caplog, filename, position):
    path = Path(two_checkpoints.checkpoint_dir) / "new" / filename
    flip_byte(path, position % path.stat().st_size)
    model = tiny_model(seed=5)

    with caplog.at_level(logging.WARNING, logger="hf_lifecycle"):
        loaded = two_checkpoints.load_latest_checkpoint(model)

    assert loaded["name"] == "old"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("new" in message and filename in message for message in warnings), warnings
    expected, _, _ = trained(seed=1)
    assert_unchanged(state_copy(expected), state_copy(model))


# A manifest that is not valid JSON makes the folder "not a committed checkpoint": listing
# skips it, and loading it by name raises naming manifest.json.


@pytest.mark.parametrize("keep_index", [True, False], ids=["cached", "rebuilt"])
def test_corrupt_manifest_not_listed(two_checkpoints, tmp_path, keep_index):
    folder = Path(two_checkpoints.checkpoint_dir)
    flip_byte(folder / "new" / MANIFEST, 0)
    if not keep_index:
        os.remove(folder / ".index.json")

    assert listed_names(new_manager(tmp_path)) == ["old"]
    assert listed_names(two_checkpoints) == ["old"]


def test_corrupt_manifest_load_raises(two_checkpoints):
    path = Path(two_checkpoints.checkpoint_dir) / "new" / MANIFEST
    flip_byte(path, 0)
    model = tiny_model(seed=5)
    before = state_copy(model)

    with pytest.raises(CheckpointCorruptedError) as caught:
        two_checkpoints.load_checkpoint("new", model)

    assert caught.value.file == str(path)
    assert_unchanged(before, state_copy(model))


def test_corrupt_manifest_latest_falls_back(two_checkpoints, caplog):
    flip_byte(Path(two_checkpoints.checkpoint_dir) / "new" / MANIFEST, 0)

    with caplog.at_level(logging.WARNING, logger="hf_lifecycle"):
        loaded = two_checkpoints.load_latest_checkpoint(tiny_model())

    assert loaded["name"] == "old"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("new" in message and MANIFEST in message for message in warnings), warnings


def test_truncated_manifest_not_listed(two_checkpoints, tmp_path):
    path = Path(two_checkpoints.checkpoint_dir) / "new" / MANIFEST
    os.truncate(path, path.stat().st_size // 2)

    assert listed_names(new_manager(tmp_path)) == ["old"]
    with pytest.raises(CheckpointCorruptedError):
        two_checkpoints.load_checkpoint("new", tiny_model())

"""Exact resume: a run split by a checkpoint ends bitwise equal to the same run done straight."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_lifecycle import HFManager

SCRIPT = Path(__file__).parent / "scripts" / "resume_train.py"
_spec = importlib.util.spec_from_file_location("resume_train", SCRIPT)
resume_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(resume_train)

STEPS = 10
SEED = 7


def straight_run() -> dict:
    model, optimizer, scheduler = resume_train.build(seed=SEED)
    resume_train.seed_everything(SEED)
    resume_train.train(model, optimizer, scheduler, STEPS)
    return resume_train.snapshot(model, optimizer, scheduler)


def first_half(manager: HFManager) -> None:
    model, optimizer, scheduler = resume_train.build(seed=SEED)
    resume_train.seed_everything(SEED)
    resume_train.train(model, optimizer, scheduler, STEPS // 2)
    manager.save_checkpoint(model, optimizer, scheduler, step=STEPS // 2)


def assert_same_run(expected: dict, actual: dict) -> None:
    for key, tensor in expected["model"].items():
        assert torch.equal(actual["model"][key], tensor), f"weight {key}"

    expected_state = expected["optimizer"]["state"]
    actual_state = actual["optimizer"]["state"]
    assert sorted(actual_state) == sorted(expected_state)
    for index, entries in expected_state.items():
        assert sorted(actual_state[index]) == sorted(entries)
        for key, value in entries.items():
            assert torch.equal(actual_state[index][key], value), f"optimizer state {index}.{key}"
    assert actual["optimizer"]["param_groups"] == expected["optimizer"]["param_groups"]
    assert actual["scheduler"] == expected["scheduler"]

    assert torch.equal(actual["random"]["torch"], expected["random"]["torch"])
    assert np.array_equal(actual["random"]["numpy"], expected["random"]["numpy"])
    assert actual["random"]["python"] == expected["random"]["python"]


def test_resume_in_process_bitwise(tmp_path):
    expected = straight_run()
    manager = HFManager(local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")
    first_half(manager)

    model, optimizer, scheduler = resume_train.build(seed=SEED + 1)
    resume_train.seed_everything(SEED + 1)
    manager.load_latest_checkpoint(model, optimizer, scheduler)
    resume_train.train(model, optimizer, scheduler, STEPS - STEPS // 2)

    assert_same_run(expected, resume_train.snapshot(model, optimizer, scheduler))


@pytest.mark.slow
def test_resume_new_process_bitwise(tmp_path):
    expected = straight_run()
    checkpoint_dir, local_dir = tmp_path / "ckpt", tmp_path / "out"
    first_half(HFManager(local_dir=local_dir, checkpoint_dir=checkpoint_dir))

    result_path = tmp_path / "resumed.pt"
    arguments = [checkpoint_dir, local_dir, STEPS - STEPS // 2, result_path]
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, arguments)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr

    actual = torch.load(result_path, weights_only=False)
    assert_same_run(expected, actual)


def test_resume_split_run_differs_without_load(tmp_path):
    # Guards the comparison itself: fresh objects that skip the load must not pass as resumed.
    expected = straight_run()
    model, optimizer, scheduler = resume_train.build(seed=SEED + 1)
    resume_train.seed_everything(SEED + 1)
    resume_train.train(model, optimizer, scheduler, STEPS)

    with pytest.raises(AssertionError):
        assert_same_run(expected, resume_train.snapshot(model, optimizer, scheduler))

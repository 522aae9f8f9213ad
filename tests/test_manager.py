"""HFManager: retention after saves, argument fallbacks, default names, loading, metadata."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import safetensors
import torch

from hf_lifecycle import (
    CheckpointNotFoundError,
    HFManager,
    KeepAll,
    KeepBestM,
    KeepLastN,
    RepoIdRequiredError,
    SerializationError,
)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def new_manager(tmp_path: Path, **kwargs) -> HFManager:
    return HFManager(local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt", **kwargs)


def listed_steps(manager: HFManager) -> list[int]:
    return [checkpoint["step"] for checkpoint in manager.list_checkpoints()]


def saved_tensor_names(path: str) -> list[str]:
    with safetensors.safe_open(os.path.join(path, "model.safetensors"), framework="pt") as handle:
        return sorted(handle.keys())


def first_weight(model: torch.nn.Module) -> torch.Tensor:
    return next(iter(model.parameters())).detach().clone()


# Retention -----------------------------------------------------------------------------------


def test_retention_default_keeps_last_three(tmp_path):
    manager = new_manager(tmp_path)
    model = tiny_model()
    for step in range(1, 6):
        manager.save_checkpoint(model, step=step)

    assert listed_steps(manager) == [5, 4, 3]
    assert sorted(os.listdir(manager.checkpoint_dir)) == [
        ".index.json",
        "checkpoint-step-3",
        "checkpoint-step-4",
        "checkpoint-step-5",
    ]


def test_retention_last_or_best(tmp_path):
    manager = new_manager(tmp_path, retention_policy=KeepLastN(1) | KeepBestM(1, "loss"))
    model = tiny_model()
    for step, loss in enumerate([0.1, 0.5, 0.6, 0.7], start=1):
        manager.save_checkpoint(model, step=step, metrics={"loss": loss})

    assert listed_steps(manager) == [4, 1]


def test_retention_dry_run_deletes_nothing(tmp_path):
    manager = new_manager(tmp_path, retention_policy=KeepAll())
    model = tiny_model()
    for step in range(1, 5):
        manager.save_checkpoint(model, step=step)
    manager.retention_policy = KeepLastN(2)

    would_delete = manager.cleanup_checkpoints(dry_run=True)

    assert would_delete == ["checkpoint-step-1", "checkpoint-step-2"]
    assert listed_steps(manager) == [4, 3, 2, 1]
    assert manager.cleanup_checkpoints() == would_delete
    assert listed_steps(manager) == [4, 3]


def test_retention_skipped_after_failed_save(tmp_path):
    manager = new_manager(tmp_path, retention_policy=KeepAll())
    model = tiny_model()
    for step in (1, 2):
        manager.save_checkpoint(model, step=step)
    manager.retention_policy = KeepLastN(1)
    model.register_buffer("phase", torch.zeros(2, dtype=torch.complex128))

    with pytest.raises(SerializationError):
        manager.save_checkpoint(model, step=3)

    assert listed_steps(manager) == [2, 1]


def test_retention_callable_policy(tmp_path):
    received = []

    def keep_even_steps(checkpoints):
        received.append([checkpoint.step for checkpoint in checkpoints])
        return [checkpoint.name for checkpoint in checkpoints if checkpoint.step % 2 == 0]

    manager = new_manager(tmp_path, retention_policy=keep_even_steps)
    model = tiny_model()
    for step in range(1, 6):
        manager.save_checkpoint(model, step=step)

    assert listed_steps(manager) == [5, 4, 2]
    assert received[-1] == [2, 4, 5]


# Argument fallbacks --------------------------------------------------------------------------


def test_save_none_uses_constructor_objects(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    manager = new_manager(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler)

    path = manager.save_checkpoint(step=1)

    files = sorted(os.listdir(path))
    for expected in ("model.safetensors", "optimizer.json", "scheduler.json"):
        assert expected in files
    assert saved_tensor_names(path) == sorted(model.state_dict())


def test_load_none_uses_set_model(tmp_path):
    manager = new_manager(tmp_path)
    model = tiny_model(seed=1)
    manager.set_model(model)
    manager.save_checkpoint(step=1)
    saved = first_weight(model)
    with torch.no_grad():
        next(iter(model.parameters())).zero_()

    manager.load_checkpoint("checkpoint-step-1")

    assert torch.equal(first_weight(model), saved)


def test_save_explicit_empty_model_used(tmp_path):
    manager = new_manager(tmp_path, model=tiny_model())
    empty = torch.nn.Sequential()
    assert not empty  # The case under test: a falsy module passed explicitly.

    path = manager.save_checkpoint(model=empty, step=1)

    assert saved_tensor_names(path) == []


def test_load_explicit_empty_model_used(tmp_path):
    model = tiny_model()
    manager = new_manager(tmp_path, model=model)
    manager.save_checkpoint(model=torch.nn.Sequential(), step=1)
    before = first_weight(model)

    manager.load_checkpoint("checkpoint-step-1", model=torch.nn.Sequential())

    assert torch.equal(first_weight(model), before)


def test_save_returns_absolute_path(tmp_path):
    manager = HFManager(local_dir="out", checkpoint_dir="ckpt")

    path = manager.save_checkpoint(tiny_model(), step=3)

    assert os.path.isabs(path)
    assert path == str((tmp_path / "ckpt" / "checkpoint-step-3").resolve())
    assert os.path.isfile(os.path.join(path, "manifest.json"))


@pytest.mark.parametrize(
    ("step", "epoch", "expected"),
    [
        (7, None, "checkpoint-step-7"),
        (None, 2, "checkpoint-epoch-2"),
        (7, 2, "checkpoint-step-7"),
        (0, None, "checkpoint-step-0"),
        (None, 0, "checkpoint-epoch-0"),
    ],
)
def test_default_name(tmp_path, step, epoch, expected):
    manager = new_manager(tmp_path)
    path = manager.save_checkpoint(tiny_model(), step=step, epoch=epoch)
    assert os.path.basename(path) == expected


def test_default_name_unique_without_counters(tmp_path):
    manager = new_manager(tmp_path, retention_policy=KeepAll())
    model = tiny_model()
    manager.save_checkpoint(model, name="checkpoint-2")
    names = [os.path.basename(manager.save_checkpoint(model)) for _ in range(3)]

    assert len(set(names + ["checkpoint-2"])) == 4
    assert len(manager.list_checkpoints()) == 4


def test_push_without_repo_id_raises(tmp_path):
    manager = new_manager(tmp_path)
    with pytest.raises(RepoIdRequiredError) as caught:
        manager.save_checkpoint(tiny_model(), step=1, push=True)

    assert isinstance(caught.value, ValueError)
    assert "repo_id" in str(caught.value)
    assert os.listdir(manager.checkpoint_dir) == []


def test_auto_push_without_repo_id_raises(tmp_path):
    with pytest.raises(RepoIdRequiredError) as caught:
        new_manager(tmp_path, auto_push=True)
    assert "repo_id" in str(caught.value)


@pytest.mark.parametrize(
    "map_location",
    ["cpu", torch.device("cpu"), {"cpu": "cpu"}, {"cuda:0": "cpu"}],
    ids=["str", "device", "dict", "dict-other-device"],
)
def test_load_map_location(tmp_path, map_location):
    manager = new_manager(tmp_path)
    table = torch.arange(6.0).reshape(2, 3)
    manager.save_checkpoint(tiny_model(), step=1, custom_state={"table": table})

    loaded = manager.load_checkpoint("checkpoint-step-1", tiny_model(), map_location=map_location)

    assert loaded["custom_state"]["table"].device.type == "cpu"
    assert torch.equal(loaded["custom_state"]["table"], table)


def test_load_map_location_callable(tmp_path):
    manager = new_manager(tmp_path)
    table = torch.arange(6.0)
    manager.save_checkpoint(tiny_model(), step=1, custom_state={"table": table})
    saved_devices = []

    def move(tensor, saved_device):
        saved_devices.append(saved_device)
        return tensor + 1

    loaded = manager.load_checkpoint("checkpoint-step-1", tiny_model(), map_location=move)

    assert saved_devices == ["cpu"]
    assert torch.equal(loaded["custom_state"]["table"], table + 1)


def test_load_latest_empty_returns_none(tmp_path):
    manager = new_manager(tmp_path)
    assert manager.load_latest_checkpoint(tiny_model()) is None


def test_load_unknown_name_raises(tmp_path):
    manager = new_manager(tmp_path)
    manager.save_checkpoint(tiny_model(), step=1)

    with pytest.raises(CheckpointNotFoundError) as caught:
        manager.load_checkpoint("checkpoint-step-2", tiny_model())

    assert isinstance(caught.value, FileNotFoundError)
    assert "'checkpoint-step-2'" in str(caught.value)


def test_load_returns_manifest_fields(tmp_path):
    manager = new_manager(tmp_path)
    manager.save_checkpoint(
        tiny_model(), step=4, epoch=1, metrics={"loss": 0.25}, config={"width": 8},
        custom_state={"note": "x"},
    )

    loaded = manager.load_latest_checkpoint(tiny_model())

    assert loaded["step"] == 4
    assert loaded["epoch"] == 1
    assert loaded["metrics"] == {"loss": 0.25}
    assert loaded["config"] == {"width": 8}
    assert loaded["custom_state"] == {"note": "x"}


# Metadata and summary ------------------------------------------------------------------------


def run_with_history(tmp_path: Path) -> HFManager:
    manager = new_manager(tmp_path)
    manager.track_hyperparameters({"lr": 0.01, "layers": [8, 2], "optimizer": {"name": "adamw"}})
    for step, loss in enumerate([0.9, 0.4, 0.6]):
        manager.log_metrics({"loss": loss}, step=step)
    model = tiny_model()
    manager.save_checkpoint(model, step=2, metrics={"loss": 0.6})
    manager.save_final_model(model, format="safetensors")
    return manager


def test_metadata_file_contents(tmp_path):
    manager = run_with_history(tmp_path)

    path = manager.save_metadata()

    assert path == str(tmp_path / "out" / "experiment_metadata.json")
    metadata = json.loads(Path(path).read_text())
    assert metadata["hyperparameters"]["optimizer"] == {"name": "adamw"}
    assert [record["value"] for record in metadata["metrics_history"]["loss"]] == [0.9, 0.4, 0.6]
    assert metadata["best_metrics"]["loss"]["value"] == 0.4
    assert metadata["best_metrics"]["loss"]["step"] == 1
    assert metadata["last_metrics"]["loss"]["value"] == 0.6
    assert [checkpoint["name"] for checkpoint in metadata["checkpoints"]] == ["checkpoint-step-2"]
    assert metadata["final_model"]["format"] == "safetensors"


def test_metadata_lists_kept_checkpoints(tmp_path):
    manager = new_manager(tmp_path, retention_policy=KeepLastN(2))
    model = tiny_model()
    for step in range(1, 4):
        manager.save_checkpoint(model=model, step=step)

    metadata = json.loads((tmp_path / "out" / "experiment_metadata.json").read_text())
    names = [checkpoint["name"] for checkpoint in metadata["checkpoints"]]
    assert names == ["checkpoint-step-3", "checkpoint-step-2"]
    assert names == [checkpoint["name"] for checkpoint in manager.list_checkpoints()]


def test_metadata_environment(tmp_path):
    metadata = json.loads(Path(run_with_history(tmp_path).save_metadata()).read_text())
    environment = metadata["environment"]

    assert environment["python_version"].count(".") == 2
    for package in ("torch", "transformers", "huggingface_hub"):
        assert environment["packages"][package], package
    assert environment["packages"]["torch"] == torch.__version__
    assert environment["git"] is None  # The test runs in a folder outside any git checkout.


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_metadata_git_commit(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "train.py").write_text("print('train')\n")
    git = ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com"]
    for arguments in (["init", "-q"], ["add", "train.py"], ["commit", "-q", "-m", "Add train"]):
        subprocess.run(git + arguments, cwd=checkout, check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=checkout, check=True, capture_output=True, text=True
    ).stdout.strip()
    monkeypatch.chdir(checkout)

    manager = HFManager(local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")
    metadata = json.loads(Path(manager.save_metadata()).read_text())

    assert metadata["environment"]["git"]["commit"] == head
    assert metadata["environment"]["git"]["dirty"] is False


def test_metadata_bad_hyperparameter_names_key(tmp_path):
    manager = new_manager(tmp_path)
    with pytest.raises(SerializationError) as caught:
        manager.track_hyperparameters({"optimizer": {"factory": object()}})

    assert isinstance(caught.value, TypeError)
    assert "optimizer.factory" in str(caught.value)


def test_summary_lists_run(tmp_path):
    manager = run_with_history(tmp_path)

    summary = manager.get_summary()

    assert "loss: last 0.6 at step 2, best 0.4 at step 1" in summary
    assert "checkpoint-step-2" in summary
    assert str(tmp_path / "out" / "final_model") in summary
    assert "lr: 0.01" in summary


def test_metadata_reopened_history(tmp_path):
    run_with_history(tmp_path)

    reopened = new_manager(tmp_path)
    metadata = json.loads(Path(reopened.save_metadata()).read_text())

    assert [record["value"] for record in metadata["metrics_history"]["loss"]] == [0.9, 0.4, 0.6]
    assert metadata["final_model"]["format"] == "safetensors"


def test_new_manager_removes_stale_temporaries(tmp_path):
    # A temporary of the metadata file left by a writer that was killed: pid 2**22 + 1 is above
    # Linux's default pid_max, so no live process has it.
    manager = new_manager(tmp_path)
    from hf_lifecycle._io import HOST

    stale = manager.local_dir / f".tmp-experiment_metadata.json.{HOST}.{2**22 + 1}.abcd1234"
    stale.write_text("{}")
    live = manager.local_dir / f".tmp-experiment_metadata.json.{HOST}.{os.getpid()}.abcd1234"
    live.write_text("{}")

    new_manager(tmp_path)

    assert not stale.exists()
    assert live.exists()


class WithExtraTensors(torch.nn.Module):
    """A module whose extra state (get_extra_state) contains a tensor."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)
        self.extra = {"table": torch.arange(3.0) * scale, "name": "table"}

    def get_extra_state(self):
        return self.extra

    def set_extra_state(self, state) -> None:
        self.extra = state


@pytest.mark.parametrize("blocking", [True, False])
def test_extra_state_tensors_round_trip(tmp_path, blocking):
    manager = new_manager(tmp_path)
    manager.save_checkpoint(model=WithExtraTensors(2.0), step=1, blocking=blocking)
    manager.wait_for_checkpoints()

    restored = WithExtraTensors(0.0)
    manager.load_checkpoint("checkpoint-step-1", model=restored)

    assert torch.equal(restored.extra["table"], torch.arange(3.0) * 2.0)
    assert restored.extra["name"] == "table"


class WithConjugateView(torch.nn.Module):
    """A complex buffer and a lazy .conj() view of it, which shares its bytes."""

    def __init__(self) -> None:
        super().__init__()
        values = torch.tensor([1 + 2j, 3 - 4j])
        self.register_buffer("values", values)
        self.register_buffer("conjugate", values.conj())


def test_conjugate_view_not_stored_as_alias(tmp_path):
    manager = new_manager(tmp_path)
    original = WithConjugateView()
    manager.save_checkpoint(model=original, name="complex")

    restored = WithConjugateView()
    with torch.no_grad():
        restored.values.zero_()
    manager.load_checkpoint("complex", model=restored)

    assert restored.conjugate.resolve_conj().tolist() == [1 - 2j, 3 + 4j]
    assert restored.values.tolist() == [1 + 2j, 3 - 4j]


def test_colliding_tensor_names_kept_apart(tmp_path):
    # "a.b" at the top and "b" inside "a" get the same generated name.
    manager = new_manager(tmp_path)
    custom = {"a.b": torch.zeros(3), "a": {"b": torch.ones(3)}, "x[0]": torch.full((2,), 5.0),
              "x": [torch.full((2,), 7.0)]}
    manager.save_checkpoint(model=tiny_model(), step=1, custom_state=custom)

    loaded = manager.load_checkpoint("checkpoint-step-1")["custom_state"]

    assert torch.equal(loaded["a.b"], torch.zeros(3))
    assert torch.equal(loaded["a"]["b"], torch.ones(3))
    assert torch.equal(loaded["x[0]"], torch.full((2,), 5.0))
    assert torch.equal(loaded["x"][0], torch.full((2,), 7.0))


def test_cleanup_failing_midway_keeps_metadata_exact(tmp_path, monkeypatch):
    manager = new_manager(tmp_path, retention_policy=KeepAll())
    for step in range(4):
        manager.save_checkpoint(model=tiny_model(), step=step)
    manager.retention_policy = KeepLastN(1)
    real_rename = os.rename
    renames = []

    def failing_second_rename(source, target):
        renames.append(source)
        if len(renames) == 2:
            raise PermissionError(13, "Permission denied")
        return real_rename(source, target)

    monkeypatch.setattr(os, "rename", failing_second_rename)
    with pytest.raises(PermissionError):
        manager.cleanup_checkpoints()
    monkeypatch.undo()

    metadata = json.loads((tmp_path / "out" / "experiment_metadata.json").read_text())
    on_disk = [checkpoint["name"] for checkpoint in manager.list_checkpoints()]
    assert len(on_disk) == 3
    assert [checkpoint["name"] for checkpoint in metadata["checkpoints"]] == on_disk

"""Bad input raises before anything is written, and no load path ever unpickles by default."""

from __future__ import annotations

import json
import os
import pickle
import shlex
from pathlib import Path

import pytest
import safetensors
import torch

from hf_lifecycle import (
    CheckpointCorruptedError,
    CheckpointError,
    ConfigurationError,
    HFManager,
    InvalidCheckpointNameError,
    KeepAll,
    SerializationError,
    load_model_weights,
)
from hf_lifecycle.checkpoint.store import encode_manifest
from hf_lifecycle.checkpoint.tensorfile import checksum_file


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def new_manager(tmp_path: Path) -> HFManager:
    return HFManager(
        local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt", retention_policy=KeepAll()
    )


def tree(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its size (-1 for folders)."""
    listing = {}
    for folder, subfolders, files in os.walk(root):
        for name in subfolders:
            listing[os.path.join(folder, name)] = -1
        for name in files:
            path = os.path.join(folder, name)
            listing[path] = os.path.getsize(path)
    return listing


# Bad input -----------------------------------------------------------------------------------

BAD_NAMES = ["../x", "a/b", "", ".hidden", "a..b", "..", "x/../y", "a\\b", "~user", "with space"]


@pytest.fixture
def saved_once(tmp_path):
    """A manager that already contains one checkpoint, and the file tree after that save."""
    manager = new_manager(tmp_path)
    manager.save_checkpoint(tiny_model(), name="existing")
    return manager, tree(tmp_path)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_save_bad_name_writes_nothing(saved_once, tmp_path, name):
    manager, before = saved_once
    with pytest.raises(InvalidCheckpointNameError) as caught:
        manager.save_checkpoint(tiny_model(), name=name)

    assert isinstance(caught.value, ValueError)
    assert repr(name) in str(caught.value)
    assert tree(tmp_path) == before


def test_save_absolute_name_writes_nothing(saved_once, tmp_path):
    manager, before = saved_once
    name = str(tmp_path / "elsewhere")
    with pytest.raises(InvalidCheckpointNameError) as caught:
        manager.save_checkpoint(tiny_model(), name=name)

    assert repr(name) in str(caught.value)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name", BAD_NAMES + ["/etc"])
def test_load_bad_name_raises(saved_once, name):
    manager, _ = saved_once
    with pytest.raises(InvalidCheckpointNameError) as caught:
        manager.load_checkpoint(name, tiny_model())

    assert repr(name) in str(caught.value)


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden"])
def test_final_model_bad_name_writes_nothing(saved_once, tmp_path, name):
    manager, before = saved_once
    with pytest.raises(InvalidCheckpointNameError) as caught:
        manager.save_final_model(tiny_model(), name=name)

    assert repr(name) in str(caught.value)
    assert tree(tmp_path) == before


def test_final_model_bad_format_writes_nothing(saved_once, tmp_path):
    manager, before = saved_once
    with pytest.raises(ConfigurationError) as caught:
        manager.save_final_model(tiny_model(), format="onnx")

    assert isinstance(caught.value, ValueError)
    assert "'onnx'" in str(caught.value)
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("argument", "value"),
    [("step", -1), ("step", True), ("step", 1.5), ("step", "3"), ("epoch", -2), ("epoch", False)],
)
def test_save_bad_counter_writes_nothing(saved_once, tmp_path, argument, value):
    manager, before = saved_once
    with pytest.raises(ConfigurationError) as caught:
        manager.save_checkpoint(tiny_model(), **{argument: value})

    assert isinstance(caught.value, ValueError)
    assert argument in str(caught.value)
    assert repr(value) in str(caught.value)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("value", ["low", None, [0.1], object()])
def test_save_bad_metric_writes_nothing(saved_once, tmp_path, value):
    manager, before = saved_once
    with pytest.raises(SerializationError) as caught:
        manager.save_checkpoint(tiny_model(), metrics={"loss": value})

    assert isinstance(caught.value, TypeError)
    assert caught.value.key == "loss"
    assert repr(value) in str(caught.value)
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("custom_state", "key"),
    [
        ({"handle": object()}, "custom_state.handle"),
        ({"items": [1, {2, 3}]}, "custom_state.items[1]"),
        (lambda: None, "custom_state"),
    ],
    ids=["object", "set-in-list", "function"],
)
def test_save_custom_state_not_json(saved_once, tmp_path, custom_state, key):
    manager, before = saved_once
    with pytest.raises(SerializationError) as caught:
        manager.save_checkpoint(tiny_model(), custom_state=custom_state)

    assert isinstance(caught.value, TypeError)
    assert caught.value.key == key
    assert key in str(caught.value)
    assert "allow_pickle" in str(caught.value)
    assert tree(tmp_path) == before


def test_save_unsupported_dtype_writes_nothing(saved_once, tmp_path):
    manager, before = saved_once
    model = tiny_model()
    model.register_buffer("phase", torch.zeros(3, dtype=torch.complex128))
    with pytest.raises(SerializationError) as caught:
        manager.save_checkpoint(model, name="complex")

    assert caught.value.key == "phase"
    assert "complex128" in str(caught.value)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("repo_id", ["bad repo", "a/b/c", "../etc", "-start/name", "", 42])
def test_bad_repo_id_creates_nothing(tmp_path, repo_id):
    with pytest.raises(ConfigurationError) as caught:
        HFManager(repo_id=repo_id, local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")

    assert isinstance(caught.value, ValueError)
    assert repr(repo_id) in str(caught.value)
    assert os.listdir(tmp_path) == []


# Pickle --------------------------------------------------------------------------------------


class Payload:
    """Touches ``marker`` when unpickled, the way a hostile checkpoint runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class Point:
    """A custom object that only pickle can store."""

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


def full_checkpoint(manager: HFManager, name: str = "full") -> Path:
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    custom_state = {
        "table": torch.arange(4),
        "pair": (1, "two"),
        "by_epoch": {1: 0.5, 2: float("nan")},
        "array": __import__("numpy").arange(3.0),
    }
    path = manager.save_checkpoint(
        model, optimizer, scheduler, name=name, custom_state=custom_state, config={"width": 8}
    )
    return Path(path)


def test_checkpoint_holds_no_pickle(tmp_path):
    folder = full_checkpoint(new_manager(tmp_path))

    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        assert path.suffix in (".json", ".safetensors"), path.name
        assert not data.startswith(b"PK\x03\x04"), path.name
        if path.suffix == ".json":
            json.loads(data)
        else:
            with safetensors.safe_open(str(path), framework="pt") as handle:
                assert list(handle.keys()), path.name


def test_payload_runs_when_unpickled(tmp_path):
    # Guards the tests below: the payload they plant does run code once unpickled.
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


PLANTED_NAMES = [
    "custom_state.pkl",
    "rng_state.pkl",
    "extra.pkl",
    "optimizer.pt",
    "scheduler.pt",
    "model.pt",
    "pytorch_model.bin",
    "training_args.bin",
]


def plant_payloads(folder: Path, marker: Path) -> None:
    """Write the payload under every plausible name, as a raw pickle and as a torch.save zip."""
    for name in PLANTED_NAMES:
        if name.endswith(".pkl"):
            (folder / name).write_bytes(pickle.dumps({"custom_state": Payload(marker)}))
        else:
            torch.save(Payload(marker), folder / name)


def every_load_path(tmp_path: Path, name: str) -> None:
    """Run each call that reads a checkpoint folder, through a new manager too."""
    manager = new_manager(tmp_path)
    manager.list_checkpoints()
    manager.get_summary()
    manager.save_metadata()
    manager.store.verify(name)
    for call in (
        lambda: manager.load_checkpoint(name, tiny_model()),
        lambda: manager.load_latest_checkpoint(tiny_model()),
    ):
        try:
            call()
        except CheckpointError:
            pass


def test_planted_pickles_never_loaded(tmp_path):
    marker = tmp_path / "marker"
    folder = full_checkpoint(new_manager(tmp_path))
    plant_payloads(folder, marker)

    every_load_path(tmp_path, "full")
    assert not marker.exists()


def mark_custom_state_pickled(folder: Path, marker: Path) -> None:
    """Edit a checkpoint so that its manifest declares a pickled custom_state.

    The edit recomputes every checksum, the manifest's own included, as an attacker could.
    """
    state_tree = {"__type__": "pickle", "key": "custom_state"}
    (folder / "custom_state.json").write_text(json.dumps(state_tree))
    (folder / "custom_state.pkl").write_bytes(pickle.dumps({"custom_state": Payload(marker)}))
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["components"]["custom_state"] = {
        "files": ["custom_state.json", "custom_state.pkl"],
        "pickle": True,
    }
    manifest["files"].pop("custom_state.safetensors", None)
    for name in ("custom_state.json", "custom_state.pkl"):
        manifest["files"][name] = checksum_file(folder / name).to_dict()
    manifest_path.write_bytes(encode_manifest(manifest))


def test_manifest_marked_pickle_not_loaded(tmp_path):
    marker = tmp_path / "marker"
    folder = full_checkpoint(new_manager(tmp_path))
    mark_custom_state_pickled(folder, marker)

    every_load_path(tmp_path, "full")
    assert not marker.exists()


def test_manifest_marked_pickle_load_raises(tmp_path):
    marker = tmp_path / "marker"
    manager = new_manager(tmp_path)
    mark_custom_state_pickled(full_checkpoint(manager), marker)

    with pytest.raises(CheckpointError) as caught:
        manager.load_checkpoint("full", tiny_model())

    assert "allow_pickle=True" in str(caught.value)
    assert not marker.exists()


def test_manifest_marked_pickle_opt_in_runs(tmp_path):
    # Guards the two tests above: the edited checkpoint does reach the unpickler on opt-in.
    marker = tmp_path / "marker"
    manager = new_manager(tmp_path)
    mark_custom_state_pickled(full_checkpoint(manager), marker)

    manager.load_checkpoint("full", tiny_model(), allow_pickle=True)
    assert marker.exists()


def test_final_model_weights_reject_payload(tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "final"
    folder.mkdir()
    torch.save(Payload(marker), folder / "pytorch_model.bin")

    with pytest.raises(pickle.UnpicklingError):
        load_model_weights(tiny_model(), folder)
    assert not marker.exists()


def test_allow_pickle_round_trip(tmp_path):
    manager = new_manager(tmp_path)
    custom_state = {"point": Point(1, 2), "count": 3}
    path = manager.save_checkpoint(tiny_model(), custom_state=custom_state, allow_pickle=True)

    assert (Path(path) / "custom_state.pkl").is_file()
    loaded = manager.load_latest_checkpoint(tiny_model(), allow_pickle=True)
    assert loaded["custom_state"] == custom_state


def test_pickled_checkpoint_needs_opt_in(tmp_path):
    manager = new_manager(tmp_path)
    custom_state = {"point": Point(1, 2)}
    manager.save_checkpoint(tiny_model(), name="p", custom_state=custom_state, allow_pickle=True)

    with pytest.raises(CheckpointError) as caught:
        manager.load_checkpoint("p", tiny_model())
    assert "allow_pickle=True" in str(caught.value)


def test_manifest_value_edit_detected(tmp_path):
    # An edit that keeps the JSON valid (a changed step) is caught by the manifest's own checksum.
    manager = new_manager(tmp_path)
    folder = full_checkpoint(manager)
    manifest_path = folder / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"sequence": 1', '"sequence": 7'))

    with pytest.raises(CheckpointCorruptedError) as caught:
        manager.load_checkpoint("full", tiny_model())

    assert caught.value.file == str(manifest_path)

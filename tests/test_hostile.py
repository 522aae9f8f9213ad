"""Hostile files and input: a crafted checkpoint, a bad argument or a second writer must end in
an hf_lifecycle error, and must never lose or hide the checkpoints already saved.

A crafted checkpoint here carries correct checksums (the attacker recomputes them), so only the
structure checks stand between its content and the caller.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from pathlib import Path

import pytest
import torch

from hf_lifecycle import (
    CheckpointCorruptedError,
    ConfigurationError,
    HFManager,
    KeepAll,
    KeepLastN,
    SerializationError,
)
from hf_lifecycle.checkpoint.store import MANIFEST_NAME, CheckpointStore, encode_manifest
from hf_lifecycle.checkpoint.tensorfile import checksum_file, read_tensors, write_bytes

DEEP = 100_000  # Nesting depth far beyond Python's recursion limit.


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def new_manager(tmp_path: Path, **options) -> HFManager:
    options.setdefault("retention_policy", KeepAll())
    return HFManager(local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt", **options)


def two_checkpoints(tmp_path: Path) -> HFManager:
    """A manager with an intact "good" checkpoint and a newer "bad" one for a test to craft."""
    manager = new_manager(tmp_path)
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    for name in ("good", "bad"):
        manager.save_checkpoint(
            model, optimizer, name=name, step=1, metrics={"loss": 1.0},
            custom_state={"a": [1]}, config={"hidden": 4},
        )
    return manager


def craft(folder: Path, *, files: dict[str, bytes] | None = None, edit=None) -> None:
    """Replace files of a committed checkpoint and edit its manifest, keeping checksums valid."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    for relative, data in (files or {}).items():
        (folder / relative).unlink(missing_ok=True)
        (folder / relative).write_bytes(data)
        manifest["files"][relative] = checksum_file(folder / relative).to_dict()
    if edit is not None:
        edit(manifest)
    (folder / MANIFEST_NAME).unlink()
    (folder / MANIFEST_NAME).write_bytes(encode_manifest(manifest))


def listed(manager: HFManager) -> list[str]:
    return [entry["name"] for entry in manager.list_checkpoints()]


# Manifests whose listing fields have the wrong type ------------------------------------------

BAD_LISTING_FIELDS = {
    "metrics list": lambda m: m.update(metrics=[1]),
    "metrics str": lambda m: m.update(metrics="ab"),
    "metric value list": lambda m: m.update(metrics={"loss": [1]}),
    "timestamp str": lambda m: m.update(timestamp="abc"),
    "timestamp list": lambda m: m.update(timestamp=[1]),
    "step list": lambda m: m.update(step=[1]),
    "epoch str": lambda m: m.update(epoch="2"),
    "sequence bool": lambda m: m.update(sequence=True),
}


@pytest.mark.parametrize("edit", BAD_LISTING_FIELDS.values(), ids=BAD_LISTING_FIELDS.keys())
def test_bad_listing_field_skipped(tmp_path, edit):
    manager = two_checkpoints(tmp_path)
    craft(manager.checkpoint_dir / "bad", edit=edit)

    assert listed(new_manager(tmp_path)) == ["good"]


@pytest.mark.parametrize("edit", BAD_LISTING_FIELDS.values(), ids=BAD_LISTING_FIELDS.keys())
def test_bad_listing_field_save_works(tmp_path, edit):
    manager = two_checkpoints(tmp_path)
    craft(manager.checkpoint_dir / "bad", edit=edit)
    fresh = new_manager(tmp_path, retention_policy=KeepLastN(1))

    fresh.save_checkpoint(tiny_model(), name="after")

    assert listed(fresh) == ["after"]


def test_deep_manifest_skipped(tmp_path):
    manager = two_checkpoints(tmp_path)
    (manager.checkpoint_dir / "bad" / MANIFEST_NAME).write_text("[" * DEEP + "]" * DEEP)

    assert listed(new_manager(tmp_path)) == ["good"]


# State files with a valid checksum but a hostile structure ------------------------------------


def deep() -> bytes:
    return b"[" * DEEP + b"]" * DEEP


def deep_object() -> bytes:
    return b'{"a":' * DEEP + b"1" + b"}" * DEEP


HOSTILE_FILES = {
    "deep json": {"custom_state.json": deep()},
    "not json": {"custom_state.json": b"{"},
    "not utf-8": {"custom_state.json": b"\xff\xfe"},
    "dtype not a dtype": {"custom_state.json": b'{"__type__": "dtype", "value": "load"}'},
    "unknown device": {"custom_state.json": b'{"__type__": "device", "value": "nowhere"}'},
    "float not a number": {"custom_state.json": b'{"__type__": "float", "value": "zz"}'},
    "tuple without items": {"custom_state.json": b'{"__type__": "tuple"}'},
    "dict item not a pair": {"custom_state.json": b'{"__type__": "dict", "items": [[1]]}'},
    "dict key unhashable": {"custom_state.json": b'{"__type__": "dict", "items": [[[1], 2]]}'},
    "tensor key a list": {"custom_state.json": b'{"__type__": "tensor", "key": [1]}'},
    "ndarray unknown dtype": {
        "custom_state.json": b'{"__type__": "ndarray", "key": "k", "dtype": "zz"}'
    },
    "optimizer not a dict": {"optimizer.json": b"[1, 2]"},
    "optimizer without groups": {"optimizer.json": b'{"state": {}}'},
    "optimizer group a number": {"optimizer.json": b'{"state": {}, "param_groups": [5]}'},
    "rng python not a state": {"rng_state.json": b'{"python": 5}'},
    "rng numpy not a state": {"rng_state.json": b'{"numpy": [1, 2]}'},
    "config deep": {"config.json": deep_object()},
}


@pytest.mark.parametrize("files", HOSTILE_FILES.values(), ids=HOSTILE_FILES.keys())
def test_hostile_state_load_raises(tmp_path, files):
    manager = two_checkpoints(tmp_path)
    craft(manager.checkpoint_dir / "bad", files=files)

    with pytest.raises(CheckpointCorruptedError):
        manager.load_checkpoint("bad", tiny_model())


@pytest.mark.parametrize("files", HOSTILE_FILES.values(), ids=HOSTILE_FILES.keys())
def test_hostile_state_latest_falls_back(tmp_path, files):
    manager = two_checkpoints(tmp_path)
    craft(manager.checkpoint_dir / "bad", files=files)

    loaded = manager.load_latest_checkpoint(tiny_model())

    assert loaded["name"] == "good"


HOSTILE_MANIFESTS = {
    "size not a number": lambda m: m["files"]["custom_state.json"].update(size="x"),
    "size missing": lambda m: m["files"]["custom_state.json"].pop("size"),
    "file entry a list": lambda m: m["files"].update({"custom_state.json": [1]}),
    "components a list": lambda m: m.update(components=[1]),
    "components a str": lambda m: m.update(components="model"),
    "component a list": lambda m: m["components"].update(custom_state=[1]),
    "aliases a list": lambda m: m["components"]["model"].update(aliases=[1]),
    "files a str": lambda m: m["components"]["custom_state"].update(files="custom_state.json"),
}


@pytest.mark.parametrize("edit", HOSTILE_MANIFESTS.values(), ids=HOSTILE_MANIFESTS.keys())
def test_hostile_manifest_load_raises(tmp_path, edit):
    manager = two_checkpoints(tmp_path)
    craft(manager.checkpoint_dir / "bad", edit=edit)

    with pytest.raises(CheckpointCorruptedError):
        manager.load_checkpoint("bad", tiny_model())


# Safetensors headers ------------------------------------------------------------------------


def safetensors_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


HOSTILE_HEADERS = {
    "deep list": (deep(), b""),
    "deep object": (deep_object(), b""),
    "float offsets": (
        b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0.5, 4.5]}}', b"\0" * 8
    ),
    "huge empty shape": (
        b'{"t": {"dtype": "F32", "shape": [0, 1180591620717411303424], "data_offsets": [0, 0]}}',
        b"",
    ),
    "float shape": (b'{"t": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}', b"\0" * 4),
    "shape a str": (b'{"t": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}', b"\0" * 4),
}


@pytest.mark.parametrize("header, data", HOSTILE_HEADERS.values(), ids=HOSTILE_HEADERS.keys())
def test_hostile_header_raises(tmp_path, header, data):
    path = safetensors_file(tmp_path / "t.safetensors", header, data)

    with pytest.raises(CheckpointCorruptedError):
        read_tensors(path)


# Two writers in one checkpoint folder --------------------------------------------------------


def commit_one(store: CheckpointStore, name: str) -> None:
    pending = store.begin(name)
    pending.add("data.json", write_bytes(pending.temp_dir / "data.json", b"{}"))
    store.commit(pending, {})


def test_second_store_waits_for_commit(tmp_path):
    # The first store pauses between choosing its sequence number and renaming its folder. A
    # second store, as in a second process, must not commit the same number meanwhile.
    first, second = CheckpointStore(tmp_path), CheckpointStore(tmp_path)
    chosen, release = threading.Event(), threading.Event()
    choose = first.next_sequence

    def slow_next_sequence() -> int:
        value = choose()
        chosen.set()
        release.wait(5)
        return value

    first.next_sequence = slow_next_sequence
    writer = threading.Thread(target=commit_one, args=(first, "a"))
    writer.start()
    chosen.wait(5)
    other = threading.Thread(target=commit_one, args=(second, "b"))
    other.start()
    other.join(0.5)
    release.set()
    writer.join(5)
    other.join(5)

    sequences = [info.sequence for info in CheckpointStore(tmp_path).list()]
    assert sorted(sequences) == [1, 2]


def manager_with_copied_checkpoint(tmp_path: Path) -> HFManager:
    """Return a KeepLastN(1) manager whose folder has "own" and "copied" with one sequence.

    A folder copied in from another run can carry a sequence number already in use.
    """
    manager = new_manager(tmp_path / "run", retention_policy=KeepLastN(1))
    other = new_manager(tmp_path / "other")
    other.save_checkpoint(tiny_model(), name="copied")
    manager.save_checkpoint(tiny_model(), name="own")
    (other.checkpoint_dir / "copied").rename(manager.checkpoint_dir / "copied")
    return manager


def test_duplicate_sequence_keeps_retention(tmp_path):
    manager = manager_with_copied_checkpoint(tmp_path)

    manager.save_checkpoint(tiny_model(), name="newest")

    assert set(listed(manager)) == {"newest", "copied", "own"}


def test_duplicate_sequence_others_deleted(tmp_path):
    manager = manager_with_copied_checkpoint(tmp_path)
    manager.save_checkpoint(tiny_model(), name="middle")

    manager.save_checkpoint(tiny_model(), name="newest")

    assert "middle" not in listed(manager)


# Loading into objects the checkpoint does not fit ------------------------------------------


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def wider_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 5))


def test_wrong_shape_load_raises(tmp_path):
    manager = two_checkpoints(tmp_path)

    with pytest.raises(ConfigurationError) as caught:
        manager.load_checkpoint("good", wider_model())

    assert "1.weight" in str(caught.value)


def test_wrong_shape_load_changes_nothing(tmp_path):
    manager = two_checkpoints(tmp_path)
    model = wider_model()
    before = weights(model)

    with pytest.raises(ConfigurationError):
        manager.load_checkpoint("good", model)

    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_missing_key_load_raises(tmp_path):
    manager = two_checkpoints(tmp_path)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.Linear(2, 2))

    with pytest.raises(ConfigurationError) as caught:
        manager.load_checkpoint("good", model)

    assert "2.weight" in str(caught.value)


def test_wrong_optimizer_load_changes_nothing(tmp_path):
    manager = two_checkpoints(tmp_path)
    model = tiny_model()
    torch.nn.init.zeros_(model[0].weight)
    optimizer = torch.optim.Adam(list(model.parameters())[:2])

    with pytest.raises(ConfigurationError):
        manager.load_checkpoint("good", model, optimizer)

    assert torch.count_nonzero(model[0].weight) == 0


# Bad arguments --------------------------------------------------------------------------------


def cyclic_dict() -> dict:
    value: dict = {}
    value["self"] = value
    return value


def cyclic_list() -> list:
    value: list = []
    value.append(value)
    return value


def nested_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


BAD_CUSTOM_STATES = {
    "dict containing itself": cyclic_dict(),
    "list containing itself": cyclic_list(),
    "nested too deeply": nested_list(5000),
    "meta tensor": {"t": torch.empty(3, device="meta")},
}


@pytest.mark.parametrize("state", BAD_CUSTOM_STATES.values(), ids=BAD_CUSTOM_STATES.keys())
@pytest.mark.parametrize("blocking", [True, False])
def test_bad_custom_state_raises(tmp_path, state, blocking):
    manager = new_manager(tmp_path)

    with pytest.raises(SerializationError):
        manager.save_checkpoint(tiny_model(), name="x", custom_state=state, blocking=blocking)
        manager.wait_for_checkpoints()

    assert listed(manager) == []


def test_meta_model_raises(tmp_path):
    manager = new_manager(tmp_path)
    with torch.device("meta"):
        model = torch.nn.Linear(2, 2)

    with pytest.raises(SerializationError):
        manager.save_checkpoint(model, name="x")


def test_huge_int_metric_raises(tmp_path):
    manager = new_manager(tmp_path)

    with pytest.raises(SerializationError):
        manager.save_checkpoint(tiny_model(), name="x", metrics={"loss": 10**400})


BAD_MAP_LOCATIONS = {
    "unknown device": "nodevice",
    "dict to unknown device": {"cpu": "nodevice"},
    "object": object(),
    "float": 1.5,
}


@pytest.mark.parametrize(
    "map_location", BAD_MAP_LOCATIONS.values(), ids=BAD_MAP_LOCATIONS.keys()
)
def test_bad_map_location_raises(tmp_path, map_location):
    manager = two_checkpoints(tmp_path)

    with pytest.raises(ConfigurationError):
        manager.load_checkpoint("good", tiny_model(), map_location=map_location)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_absent_device_map_location_raises(tmp_path):
    manager = two_checkpoints(tmp_path)

    with pytest.raises(ConfigurationError):
        manager.load_latest_checkpoint(tiny_model(), map_location="cuda")


# The final model must not replace other folders ----------------------------------------------


@pytest.mark.parametrize("name", ["checkpoints", "runs"])
def test_final_model_keeps_other_folders(tmp_path, name):
    manager = HFManager(local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "out" / "checkpoints")
    manager.save_checkpoint(tiny_model(), name="kept")
    manager.log_metrics({"loss": 1.0}, step=1)

    with pytest.raises(ConfigurationError):
        manager.save_final_model(tiny_model(), name=name, format="safetensors")

    assert listed(manager) == ["kept"]


def test_final_model_replaces_itself(tmp_path):
    manager = new_manager(tmp_path)
    manager.save_final_model(tiny_model(), format="safetensors", config={"hidden": 4})

    folder = Path(manager.save_final_model(tiny_model(), format="pt"))

    assert sorted(path.name for path in folder.iterdir()) == ["pytorch_model.bin"]


@pytest.mark.parametrize("blocking", [True, False])
def test_checkpoint_keeps_foreign_folder(tmp_path, blocking):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "table.csv").write_text("1,2\n")
    manager = HFManager(local_dir=tmp_path / "out", checkpoint_dir=tmp_path)

    with pytest.raises(ConfigurationError):
        manager.save_checkpoint(tiny_model(), name="data", blocking=blocking)

    assert (tmp_path / "data" / "table.csv").read_text() == "1,2\n"


def test_checkpoint_replaces_checkpoint(tmp_path):
    manager = new_manager(tmp_path)
    manager.save_checkpoint(tiny_model(), name="same", step=1)

    manager.save_checkpoint(tiny_model(), name="same", step=2)

    assert manager.list_checkpoints()[0]["step"] == 2


# A damaged index -------------------------------------------------------------------------------

BAD_INDEX_ENTRIES = {
    "sequence a str": {"sequence": "x"},
    "sequence missing": {"sequence": None},
    "metrics a list": {"metrics": [1]},
}


@pytest.mark.parametrize("change", BAD_INDEX_ENTRIES.values(), ids=BAD_INDEX_ENTRIES.keys())
def test_bad_index_entry_rebuilt(tmp_path, change):
    manager = two_checkpoints(tmp_path)
    index_path = manager.checkpoint_dir / ".index.json"
    index = json.loads(index_path.read_text())
    index["entries"][0].update(change)
    entry = index["entries"][0]
    index["entries"][0] = {key: value for key, value in entry.items() if value is not None}
    index_path.write_text(json.dumps(index))

    assert listed(new_manager(tmp_path)) == ["bad", "good"]


class Killed(BaseException):
    """Stands for the process dying at the point where it is raised."""


def test_final_model_replace_without_exchange(tmp_path, monkeypatch):
    # Where renameat2(RENAME_EXCHANGE) is missing (macOS, NFS), the old folder is removed by
    # rmtree; dying during that removal must still leave a complete final model.
    import shutil

    from hf_lifecycle import final_model

    manager = new_manager(tmp_path)
    manager.save_final_model(tiny_model(), format="safetensors")
    monkeypatch.setattr(final_model, "_rename_exchange", lambda source, target: False)
    remove = shutil.rmtree
    calls = []

    def remove_then_die(path, *args, **kwargs):
        remove(path, *args, **kwargs)
        calls.append(path)
        if len(calls) == 1:
            raise Killed()

    monkeypatch.setattr(final_model.shutil, "rmtree", remove_then_die)

    with pytest.raises(Killed):
        manager.save_final_model(tiny_model(), format="safetensors")

    assert (manager.local_dir / "final_model" / "model.safetensors").is_file()


# Threads sharing one manager ------------------------------------------------------------------


def test_threads_background_saves_all_commit(tmp_path, monkeypatch):
    from hf_lifecycle import manager as manager_module

    manager = new_manager(tmp_path, async_save=True)
    first_done = threading.Event()
    commit = manager.store.commit

    def gated_commit(pending, manifest):
        if pending.name == "first":
            first_done.wait(10)
        return commit(pending, manifest)

    snapshot = manager_module.snapshot_state

    def slow_snapshot(state, buffers, **options):
        # Long enough for both threads to see the writer idle before either submits.
        time.sleep(0.2)
        return snapshot(state, buffers, **options)

    manager.store.commit = gated_commit
    manager.save_checkpoint(tiny_model(), name="first")
    monkeypatch.setattr(manager_module, "snapshot_state", slow_snapshot)
    errors = []

    def save(name: str) -> None:
        try:
            manager.save_checkpoint(tiny_model(), name=name)
        except Exception as err:  # noqa: BLE001 - collected for the assert
            errors.append(err)

    threads = [threading.Thread(target=save, args=(name,)) for name in ("second", "third")]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # Both threads now wait for "first".
    first_done.set()
    for thread in threads:
        thread.join(10)
    manager.wait_for_checkpoints()

    assert errors == []


# Files that are not regular files ------------------------------------------------------------


@pytest.mark.parametrize("filename", ["custom_state.json", "model.safetensors"])
def test_fifo_in_checkpoint_load_raises(tmp_path, filename):
    manager = two_checkpoints(tmp_path)
    path = manager.checkpoint_dir / "bad" / filename
    path.unlink()
    os.mkfifo(path)  # Opening a FIFO for reading waits for a writer that never comes.
    outcome = []

    def load() -> None:
        try:
            manager.load_checkpoint("bad", tiny_model())
        except Exception as err:  # noqa: BLE001 - checked below
            outcome.append(err)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    loader.join(10)

    assert isinstance(outcome[0] if outcome else None, CheckpointCorruptedError)


# Sharded (DCP) checkpoints must not unpickle ---------------------------------------------------


class RunsCommand:
    """A pickle payload: unpickling it runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class WithExtraState(torch.nn.Module):
    """A model whose state dict contains a non-tensor entry, which DCP stores as pickled bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.extra = "kept"

    def get_extra_state(self):
        return self.extra

    def set_extra_state(self, state) -> None:
        self.extra = state


def plant_sharded(folder: Path, model_state: dict, metadata: object = None) -> None:
    """Turn a checkpoint into a sharded one holding ``model_state``, optionally with the DCP
    metadata file replaced by the pickle of ``metadata``."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from hf_lifecycle.distributed import SHARDED_FOLDER, SHARDED_FORMAT

    dcp.save({"model": model_state}, checkpoint_id=folder / SHARDED_FOLDER, no_dist=True)
    if metadata is not None:
        (folder / SHARDED_FOLDER / ".metadata").write_bytes(pickle.dumps(metadata))
    files = {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted((folder / SHARDED_FOLDER).rglob("*"))
        if path.is_file()
    }

    def edit(manifest):
        manifest["components"]["sharded"] = {
            "format": SHARDED_FORMAT,
            "contents": ["model"],
            "world_size": 1,
            "files": sorted(files),
        }
        del manifest["components"]["model"]

    craft(folder, files=files, edit=edit)


def test_sharded_metadata_never_unpickled(tmp_path):
    marker = tmp_path / "ran"
    manager = new_manager(tmp_path)
    folder = Path(manager.save_checkpoint(WithExtraState(), name="sharded"))
    plant_sharded(folder, WithExtraState().state_dict(), RunsCommand(f"touch {marker}"))

    with pytest.raises(CheckpointCorruptedError):
        manager.load_checkpoint("sharded", WithExtraState())

    assert not marker.exists()


def test_sharded_bytes_never_unpickled(tmp_path):
    marker = tmp_path / "ran"
    manager = new_manager(tmp_path)
    folder = Path(manager.save_checkpoint(WithExtraState(), name="sharded"))
    state = WithExtraState().state_dict()
    state["_extra_state"] = RunsCommand(f"touch {marker}")
    plant_sharded(folder, state)

    with pytest.raises(CheckpointCorruptedError):
        manager.load_checkpoint("sharded", WithExtraState())

    assert not marker.exists()


def test_sharded_extra_state_loads(tmp_path):
    manager = new_manager(tmp_path)
    folder = Path(manager.save_checkpoint(WithExtraState(), name="sharded"))
    saved = WithExtraState()
    saved.extra = "saved"
    plant_sharded(folder, saved.state_dict())
    model = WithExtraState()

    manager.load_checkpoint("sharded", model)

    assert model.extra == "saved"


# A damaged metadata file in local_dir ---------------------------------------------------------

BAD_METADATA = {
    "nested too deeply": lambda data: "[" * 100_000 + "]" * 100_000,
    "final model a str": lambda data: json.dumps(dict(data, final_model="x")),
}


@pytest.mark.parametrize("rewrite", BAD_METADATA.values(), ids=BAD_METADATA.keys())
def test_bad_metadata_save_works(tmp_path, rewrite):
    manager = new_manager(tmp_path)
    path = Path(manager.save_metadata())
    path.write_text(rewrite(json.loads(path.read_text())))
    fresh = new_manager(tmp_path)

    fresh.save_checkpoint(tiny_model(), name="after")

    assert listed(fresh) == ["after"]


def test_read_only_folder_save_error(tmp_path, monkeypatch):
    import errno

    from hf_lifecycle import CheckpointSaveError

    manager = new_manager(tmp_path)
    make_folder = Path.mkdir

    def read_only_mkdir(self, *args, **kwargs):
        if self.name.startswith(".tmp-"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return make_folder(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)

    with pytest.raises(CheckpointSaveError):
        manager.save_checkpoint(tiny_model(), name="x")


class CountingModule(torch.nn.Module):
    """Two layers and a count kept as extra state."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.count = 1

    def get_extra_state(self):
        return {"count": self.count}

    def set_extra_state(self, state) -> None:
        self.count = state["count"]


def test_extra_state_naming_a_weight_rejected(tmp_path):
    manager = new_manager(tmp_path)
    folder = Path(manager.save_checkpoint(model=CountingModule(), name="crafted"))
    tree = json.loads((folder / "model_extra.json").read_text())
    tree["a.weight"] = 3  # An entry that would replace a weight with a number.
    craft(folder, files={"model_extra.json": json.dumps(tree).encode()})
    target = CountingModule()
    before = {
        key: value.clone() for key, value in target.state_dict().items() if key != "_extra_state"
    }

    with pytest.raises(CheckpointCorruptedError) as caught:
        manager.load_checkpoint("crafted", model=target)

    assert "model_extra.json" in str(caught.value)
    for key, value in before.items():
        assert torch.equal(target.state_dict()[key], value), key

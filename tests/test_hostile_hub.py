"""Hostile content on either side of a push: planted files in a checkpoint folder, crafted
files on the Hub, and a repository that disappears mid-run.

Everything runs against the LocalHub shared by the whole test run, over HTTP with the real
huggingface_hub client.
"""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, constants

from hf_lifecycle import CheckpointCorruptedError, HFManager, HubError, KeepAll

TOKEN = os.environ["HF_TOKEN"]

# huggingface_hub 2.4 passes LFS upload bodies as data=, which httpx2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def owner_api() -> HfApi:
    return HfApi(endpoint=constants.ENDPOINT, token=TOKEN)


def new_manager(folder: Path, repo_id: str, **options) -> HFManager:
    options.setdefault("push_retry_wait", 0.05)
    options.setdefault("retention_policy", KeepAll())
    return HFManager(
        repo_id, local_dir=folder / "outputs", checkpoint_dir=folder / "checkpoints", **options
    )


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def repo_files(repo_id: str) -> set[str]:
    return set(owner_api().list_repo_files(repo_id))


# Planted files in a local checkpoint -----------------------------------------------------------


def test_symlink_in_checkpoint_not_pushed(hub, repo_id, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    manager = new_manager(tmp_path, repo_id)
    folder = Path(manager.save_checkpoint(tiny_model(), name="ckpt"))
    (folder / "link.txt").symlink_to(secret)

    manager.push(push_metadata=False)

    assert "checkpoints/ckpt/link.txt" not in repo_files(repo_id)


def test_symlinked_listed_file_not_pushed(hub, repo_id, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    manager = new_manager(tmp_path, repo_id)
    folder = Path(manager.save_checkpoint(tiny_model(), name="ckpt"))
    (folder / "rng_state.json").unlink()
    (folder / "rng_state.json").symlink_to(secret)

    with pytest.raises(CheckpointCorruptedError):
        manager.push(push_metadata=False)


def test_unlisted_file_not_pushed(hub, repo_id, tmp_path):
    manager = new_manager(tmp_path, repo_id, auto_push=True)
    folder = Path(manager.save_checkpoint(tiny_model(), name="ckpt", blocking=True))
    manager.wait_for_pushes()
    (folder / "notes.txt").write_text("written after the commit")

    manager.save_checkpoint(tiny_model(), name="next")
    manager.wait_for_pushes()
    manager.push(push_metadata=False)

    assert "checkpoints/ckpt/notes.txt" not in repo_files(repo_id)


def test_pushed_checkpoint_has_manifest_files(hub, repo_id, tmp_path):
    manager = new_manager(tmp_path, repo_id)
    folder = Path(manager.save_checkpoint(tiny_model(), name="ckpt"))

    manager.push(push_metadata=False)

    local = {f"checkpoints/ckpt/{path.name}" for path in folder.iterdir()}
    assert local <= repo_files(repo_id)


# Crafted files on the Hub ---------------------------------------------------------------------

HOSTILE_POINTERS = {
    "not json": b"{",
    "a list": b"[1, 2]",
    "nested too deeply": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("content", HOSTILE_POINTERS.values(), ids=HOSTILE_POINTERS.keys())
def test_hostile_hub_pointer_raises(hub, repo_id, tmp_path, content):
    owner_api().create_repo(repo_id)
    owner_api().create_commit(
        repo_id,
        [CommitOperationAdd("checkpoints/latest.json", content)],
        commit_message="Add a pointer",
    )
    manager = new_manager(tmp_path, repo_id)

    with pytest.raises(HubError):
        manager.load_latest_checkpoint(tiny_model())


def test_hostile_hub_manifest_falls_back(hub, repo_id, tmp_path):
    manager = new_manager(tmp_path / "first", repo_id)
    for name in ("older", "newer"):
        manager.save_checkpoint(tiny_model(), name=name)
    manager.push(push_metadata=False)
    owner_api().create_commit(
        repo_id,
        [CommitOperationAdd("checkpoints/newer/manifest.json", b"[" * 100_000)],
        commit_message="Damage the newest manifest",
    )
    fresh = new_manager(tmp_path / "second", repo_id)

    loaded = fresh.load_latest_checkpoint(tiny_model())

    assert loaded["name"] == "older"


# The repository disappears mid-run ------------------------------------------------------------


def test_deleted_repo_push_recreates(hub, repo_id, tmp_path):
    manager = new_manager(tmp_path, repo_id)
    manager.save_checkpoint(tiny_model(), name="first")
    manager.push(push_metadata=False)
    owner_api().delete_repo(repo_id)
    manager.save_checkpoint(tiny_model(), name="second")

    manager.push(push_metadata=False)

    assert "checkpoints/second/manifest.json" in repo_files(repo_id)


# The server ----------------------------------------------------------------------------------


def post(hub, path: str, body: bytes) -> int:
    """Send an authenticated POST to ``hub`` and return the reply's status."""
    address = urlsplit(hub.endpoint)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        connection.request("POST", path, body=body, headers={"Authorization": f"Bearer {TOKEN}"})
        return connection.getresponse().status
    finally:
        connection.close()


DEEP_JSON = b"[" * 100_000 + b"]" * 100_000


def test_server_deep_json_body_rejected(hub, repo_id):
    owner_api().create_repo(repo_id)

    assert post(hub, f"/api/models/{repo_id}/preupload/main", DEEP_JSON) == 400


def test_server_deep_commit_line_rejected(hub, repo_id):
    owner_api().create_repo(repo_id)
    header = json.dumps({"key": "header", "value": {"summary": "deep"}}).encode()

    assert post(hub, f"/api/models/{repo_id}/commit/main", header + b"\n" + DEEP_JSON) == 400

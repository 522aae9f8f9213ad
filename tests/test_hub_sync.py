"""HFManager against a real Hub protocol: the huggingface_hub client over HTTP to LocalHub.

Faults are injected by the server (``hub.faults``), never by mocking the client. The client
retries LFS batch, upload and verify requests itself with waits of 1 to 8 s, but not the commit
request, so the tests fail commits rather than uploads wherever a fault should be retried by
hf-lifecycle.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError

from hf_lifecycle import (
    CheckpointCorruptedError,
    ConfigurationError,
    HFManager,
    HubAuthenticationError,
    KeepAll,
    KeepLastN,
    PushError,
    RepoIdRequiredError,
)
from hf_lifecycle.hub.sync import describe_error, is_retryable
from hf_lifecycle.tracking import REDACTED

SCRIPTS = Path(__file__).parent / "scripts"
_spec = importlib.util.spec_from_file_location("resume_train", SCRIPTS / "resume_train.py")
resume_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(resume_train)

TOKEN = os.environ["HF_TOKEN"]
LATEST = "checkpoints/latest.json"
SERVER_LOGGER = "hf_lifecycle.hub._server_handler"

# huggingface_hub 2.4 passes LFS upload bodies as data=, which httpx2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


# Helpers ---------------------------------------------------------------------------------


def owner_api() -> HfApi:
    return HfApi(endpoint=constants.ENDPOINT, token=TOKEN)


def make_manager(folder: Path, repo_id: str | None, **options) -> HFManager:
    options.setdefault("push_retry_wait", 0.05)
    return HFManager(
        repo_id, local_dir=folder / "outputs", checkpoint_dir=folder / "checkpoints", **options
    )


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


def hub_checkpoints(repo_id: str) -> set[str]:
    """Names of the checkpoint folders at the head of ``repo_id``."""
    paths = owner_api().list_repo_files(repo_id)
    folders = (path for path in paths if path.startswith("checkpoints/") and path != LATEST)
    return {path.split("/")[1] for path in folders}


def hub_pointer(repo_id: str) -> dict:
    with open(hf_hub_download(repo_id, LATEST, token=TOKEN), encoding="utf-8") as handle:
        return json.load(handle)


def local_names(manager: HFManager) -> set[str]:
    return {item["name"] for item in manager.list_checkpoints()}


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` by relative path, without the client's ``.cache`` folder."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and ".cache" not in path.relative_to(folder).parts
    }


def folder_names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if not path.name.startswith("."))


def temporary_names(folder: Path) -> list[str]:
    """Leftovers of an unfinished write or download: hidden entries other than the index."""
    hidden = (path.name for path in folder.iterdir() if path.name.startswith("."))
    return sorted(name for name in hidden if name != ".index.json")


def card_front_matter(text: str) -> dict:
    empty, front_matter, _ = text.split("---\n", 2)
    assert empty == ""
    return yaml.safe_load(front_matter)


def card_metrics(front_matter: dict) -> dict[str, float]:
    metrics = {}
    for entry in front_matter["model-index"]:
        for result in entry["results"]:
            for metric in result["metrics"]:
                metrics[metric["type"]] = metric["value"]
    return metrics


def resolved_paths(caplog: pytest.LogCaptureFixture, repo_id: str) -> set[str]:
    """Repository paths requested through /resolve, from the server's DEBUG line per request.

    The line's arguments are the method, the URL path and the status.
    """
    prefix = f"/{repo_id}/resolve/"
    paths = set()
    for record in caplog.records:
        if record.name != SERVER_LOGGER or len(record.args) != 3:
            continue
        url_path = unquote(str(record.args[1]))
        if url_path.startswith(prefix):
            paths.add(url_path[len(prefix) :].split("/", 1)[1])
    return paths


# Push and snapshot --------------------------------------------------------------------


def test_push_matches_local_files(hub, repo_id, tmp_path):
    model = small_model()
    manager = make_manager(
        tmp_path, repo_id, model=model, auto_push=True, retention_policy=KeepLastN(2)
    )
    saved = {}
    for step, loss, accuracy in ((1, 0.9, 0.5), (2, 0.4, 0.8), (3, 0.6, 0.7)):
        with torch.no_grad():
            model.weight.add_(0.25)
        manager.log_metrics({"loss": loss, "accuracy": accuracy}, step=step)
        path = Path(manager.save_checkpoint(step=step, metrics={"loss": loss}))
        saved[path.name] = files_under(path)
    manager.wait_for_pushes()
    final = Path(manager.save_final_model(format="safetensors", config={"hidden_size": 4}))
    manager.push(push_final_model=True)
    manager.close()

    remote = Path(snapshot_download(repo_id, local_dir=tmp_path / "snapshot", token=TOKEN))
    assert local_names(manager) == {"checkpoint-step-2", "checkpoint-step-3"}
    # prune_hub_checkpoints is off by default: the Hub keeps what retention deleted locally.
    assert hub_checkpoints(repo_id) == set(saved)
    for name, files in saved.items():
        assert files_under(remote / "checkpoints" / name) == files, name
    assert hub_pointer(repo_id)["name"] == "checkpoint-step-3"

    local = manager.local_dir
    metadata = (remote / "experiment_metadata.json").read_bytes()
    assert metadata == (local / "experiment_metadata.json").read_bytes()
    assert (remote / "model.safetensors").read_bytes() == (final / "model.safetensors").read_bytes()
    assert (remote / "config.json").read_bytes() == (final / "config.json").read_bytes()
    assert (remote / "README.md").read_bytes() == (local / "README.md").read_bytes()

    front_matter = card_front_matter((remote / "README.md").read_text(encoding="utf-8"))
    assert card_metrics(front_matter) == {"loss": 0.4, "accuracy": 0.8}


def test_second_push_uploads_nothing(hub, repo_id, tmp_path):
    manager = make_manager(tmp_path, repo_id, model=small_model())
    manager.log_metrics({"loss": 0.5}, step=1)
    manager.save_checkpoint(step=1)
    manager.save_final_model(format="safetensors", config={"hidden_size": 4})
    manager.push(push_final_model=True)
    assert hub.stats.uploaded_bytes > 0
    head = owner_api().repo_info(repo_id).sha

    hub.stats.reset()
    manager.push(push_final_model=True)

    assert hub.stats.uploaded_bytes == 0
    assert hub.stats["commit"] == 0
    assert owner_api().repo_info(repo_id).sha == head
    manager.close()


# Retries and failures -----------------------------------------------------------------


def test_commit_500_retried(hub, repo_id, tmp_path):
    hub.faults.fail("commit", status=500, times=3)
    manager = make_manager(
        tmp_path, repo_id, model=small_model(), auto_push=True, retention_policy=KeepLastN(2)
    )
    names = []
    for step in range(1, 5):
        path = Path(manager.save_checkpoint(step=step))
        assert path.is_dir()
        names.append(path.name)
    manager.wait_for_pushes()

    assert hub_checkpoints(repo_id) == set(names)
    # One commit per checkpoint, plus the three rejected attempts.
    assert hub.stats["commit"] == len(names) + 3
    assert hub_pointer(repo_id)["name"] == names[-1]
    assert local_names(manager) == set(names[-2:])
    manager.close()


def test_failed_pushes_keep_checkpoints(hub, repo_id, tmp_path):
    hub.faults.fail("commit", status=500, times=None)
    manager = make_manager(
        tmp_path, repo_id, model=small_model(), auto_push=True, retention_policy=KeepLastN(1),
        push_retries=1,
    )
    names = [Path(manager.save_checkpoint(step=step)).name for step in (1, 2, 3)]

    with pytest.raises(PushError) as failure:
        manager.wait_for_pushes()

    for name in names:
        assert name in str(failure.value)
    assert failure.value.checkpoints == names
    assert local_names(manager) == set(names)
    for name in names:
        assert (manager.checkpoint_dir / name / "manifest.json").is_file()

    hub.faults.clear()
    manager.push()
    assert hub_checkpoints(repo_id) == set(names)
    # Once pushed, the checkpoints that retention held back are deleted.
    assert local_names(manager) == {names[-1]}
    manager.close()


def test_close_raises_push_error(hub, repo_id, tmp_path):
    hub.faults.fail("commit", status=500, times=None)
    manager = make_manager(tmp_path, repo_id, model=small_model(), auto_push=True, push_retries=0)
    manager.save_checkpoint(step=1)

    with pytest.raises(PushError) as failure:
        manager.close()

    assert failure.value.checkpoints == ["checkpoint-step-1"]
    manager.close()  # The failure was reported once; a second close has nothing to raise.


def test_exit_raises_push_error(hub, repo_id, tmp_path):
    hub.faults.fail("commit", status=500, times=None)

    with pytest.raises(PushError) as failure:
        with make_manager(tmp_path, repo_id, model=small_model(), push_retries=0) as manager:
            manager.save_checkpoint(step=1, push=True)

    assert failure.value.checkpoints == ["checkpoint-step-1"]


def test_exit_keeps_training_error(hub, repo_id, tmp_path, caplog):
    hub.faults.fail("commit", status=500, times=None)

    with pytest.raises(KeyError, match="training failed"):
        with make_manager(tmp_path, repo_id, model=small_model(), push_retries=0) as manager:
            manager.save_checkpoint(step=1, push=True)
            raise KeyError("training failed")

    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert any("checkpoint-step-1" in record.getMessage() for record in errors)


def test_cut_upload_keeps_latest(hub, repo_id, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512)  # 1 MiB of float32 weights; safetensors files go to LFS.
    manager = make_manager(tmp_path, repo_id, model=model, push_retries=0)
    manager.save_checkpoint(step=1, push=True)
    manager.wait_for_pushes()
    with torch.no_grad():
        model.weight.add_(1.0)  # No random draw, so only the weights file differs from step 1.
    half = 512 * 512 * 4 // 2
    # The client retries a cut upload once by itself, so its retry gets a final 400.
    hub.faults.cut("lfs_upload", after_bytes=half, times=1)
    hub.faults.fail("lfs_upload", status=400, times=1)
    hub.stats.reset()

    manager.save_checkpoint(step=2, push=True)
    with pytest.raises(PushError) as failure:
        manager.wait_for_pushes()

    assert failure.value.checkpoints == ["checkpoint-step-2"]
    assert "HTTP 400" in str(failure.value)
    assert "sig=" not in str(failure.value)
    assert hub.stats["lfs_upload"] == 2
    assert hub.stats["commit"] == 0
    assert hub_pointer(repo_id)["name"] == "checkpoint-step-1"
    assert hub_checkpoints(repo_id) == {"checkpoint-step-1"}

    hub.faults.clear()
    manager.push()
    assert hub_pointer(repo_id)["name"] == "checkpoint-step-2"
    manager.close()


def test_wrapped_network_error_retried():
    import httpx2

    try:
        try:
            raise httpx2.RemoteProtocolError("Server disconnected without sending a response.")
        except httpx2.RemoteProtocolError as cause:
            raise RuntimeError("Error while uploading 'model.safetensors' to the Hub.") from cause
    except RuntimeError as wrapped:
        error = wrapped

    assert is_retryable(error)
    assert "RemoteProtocolError" in describe_error(error)


# Resume from the Hub ------------------------------------------------------------------


def test_resume_from_hub_bitwise(hub, repo_id, tmp_path, caplog):
    steps, seed = 10, 7
    model, optimizer, scheduler = resume_train.build(seed=seed)
    resume_train.seed_everything(seed)
    resume_train.train(model, optimizer, scheduler, steps)
    expected = resume_train.snapshot(model, optimizer, scheduler)

    first = make_manager(tmp_path / "first", repo_id, auto_push=True)
    model, optimizer, scheduler = resume_train.build(seed=seed)
    resume_train.seed_everything(seed)
    for train_steps, step in ((2, 2), (2, 4), (1, 5)):
        resume_train.train(model, optimizer, scheduler, train_steps)
        first.save_checkpoint(model, optimizer, scheduler, step=step)
    first.close()

    caplog.set_level(logging.DEBUG, logger=SERVER_LOGGER)
    second = make_manager(tmp_path / "second", repo_id)
    model, optimizer, scheduler = resume_train.build(seed=seed + 1)
    state = second.load_latest_checkpoint(model, optimizer, scheduler)

    assert state["name"] == "checkpoint-step-5"
    assert folder_names(second.checkpoint_dir) == ["checkpoint-step-5"]
    assert temporary_names(second.checkpoint_dir) == []
    folder = "checkpoints/checkpoint-step-5/"
    paths = resolved_paths(caplog, repo_id)
    assert LATEST in paths
    assert f"{folder}model.safetensors" in paths
    assert {path for path in paths if path != LATEST and not path.startswith(folder)} == set()

    resume_train.train(model, optimizer, scheduler, steps - 5)
    actual = resume_train.snapshot(model, optimizer, scheduler)
    for key, tensor in expected["model"].items():
        assert torch.equal(actual["model"][key], tensor), key
    for index, entries in expected["optimizer"]["state"].items():
        for key, value in entries.items():
            assert torch.equal(actual["optimizer"]["state"][index][key], value), f"{index}.{key}"
    assert actual["scheduler"] == expected["scheduler"]
    assert torch.equal(actual["random"]["torch"], expected["random"]["torch"])
    assert np.array_equal(actual["random"]["numpy"], expected["random"]["numpy"])
    assert actual["random"]["python"] == expected["random"]["python"]
    second.close()


def test_load_named_from_hub(hub, repo_id, tmp_path):
    model = small_model()
    first = make_manager(tmp_path / "first", repo_id, model=model, auto_push=True)
    weights = {}
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.add_(1.0)
        weights[step] = model.weight.detach().clone()
        first.save_checkpoint(step=step)
    first.close()

    second = make_manager(tmp_path / "second", repo_id)
    target = torch.nn.Linear(4, 2)
    state = second.load_checkpoint("checkpoint-step-1", target)

    assert state["step"] == 1
    assert torch.equal(target.weight, weights[1])
    assert local_names(second) == {"checkpoint-step-1"}
    second.close()


def test_corrupted_hub_file_rejected(hub, repo_id, tmp_path):
    first = make_manager(tmp_path / "first", repo_id, model=small_model(), auto_push=True)
    path = Path(first.save_checkpoint(step=1))
    first.close()
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    owner_api().upload_file(
        path_or_fileobj=bytes(data),
        path_in_repo="checkpoints/checkpoint-step-1/model.safetensors",
        repo_id=repo_id,
    )

    second = make_manager(tmp_path / "second", repo_id)
    with pytest.raises(CheckpointCorruptedError):
        second.load_checkpoint("checkpoint-step-1", torch.nn.Linear(4, 2))

    assert folder_names(second.checkpoint_dir) == []
    assert temporary_names(second.checkpoint_dir) == []
    second.close()


def test_corrupted_hub_latest_falls_back(hub, repo_id, tmp_path):
    first = make_manager(
        tmp_path / "first", repo_id, model=small_model(), auto_push=True,
        retention_policy=KeepAll(),
    )
    first.save_checkpoint(step=1)
    path = Path(first.save_checkpoint(step=2))
    first.close()
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    owner_api().upload_file(
        path_or_fileobj=bytes(data),
        path_in_repo="checkpoints/checkpoint-step-2/model.safetensors",
        repo_id=repo_id,
    )

    second = make_manager(tmp_path / "second", repo_id)
    loaded = second.load_latest_checkpoint(torch.nn.Linear(4, 2))

    assert loaded["name"] == "checkpoint-step-1"
    assert folder_names(second.checkpoint_dir) == ["checkpoint-step-1"]
    second.close()


# Privacy and the token ----------------------------------------------------------------


def test_private_repo_hidden(hub, repo_id, tmp_path, intruder_token):
    manager = make_manager(tmp_path, repo_id, model=small_model(), private=True, auto_push=True)
    manager.save_checkpoint(step=1)
    manager.close()

    assert owner_api().repo_info(repo_id).private is True
    intruder = HfApi(endpoint=constants.ENDPOINT, token=intruder_token)
    with pytest.raises(RepositoryNotFoundError):
        intruder.repo_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, LATEST, token=intruder_token, cache_dir=tmp_path / "intruder")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=constants.ENDPOINT, token=False).repo_info(repo_id)


def test_env_token_redacted_in_values(hub, repo_id, tmp_path, monkeypatch):
    # A token found through HF_TOKEN (not passed as hf_token=) is scrubbed from stored values.
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    manager = make_manager(tmp_path, repo_id, model=small_model(), auto_push=True)
    manager.track_hyperparameters({"remote": f"https://user:{TOKEN}@example.invalid"})
    manager.save_checkpoint(step=1)
    manager.close()

    assert manager.tracker.hyperparameters["remote"] == REDACTED
    assert TOKEN not in (manager.local_dir / "experiment_metadata.json").read_text()


def test_token_never_written(hub, repo_id, tmp_path, caplog, capfd):
    for name in (None, "hf_lifecycle", "huggingface_hub", "httpx", "httpx2", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    api_key = "sk-not-a-real-key-0000"
    manager = make_manager(
        tmp_path, repo_id, model=small_model(), hf_token=TOKEN, private=True, auto_push=True,
        push_retries=0,
    )
    manager.track_hyperparameters({"hf_token": TOKEN, "api_key": api_key, "lr": 0.1})
    manager.log_metrics({"loss": 0.5}, step=1)
    manager.save_checkpoint(step=1)
    manager.save_final_model(format="safetensors", config={"hidden_size": 4})
    manager.push(push_final_model=True)
    hub.faults.fail("commit", status=500, times=None)
    manager.save_checkpoint(step=2)
    with pytest.raises(PushError) as failure:
        manager.wait_for_pushes()
    hub.faults.clear()
    manager.close()
    remote = Path(snapshot_download(repo_id, local_dir=tmp_path / "snapshot", token=TOKEN))

    for folder in (manager.local_dir, manager.checkpoint_dir, remote):
        for path in folder.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path
                assert api_key.encode() not in path.read_bytes(), path
    for record in caplog.records:
        assert TOKEN not in record.getMessage(), record.name
    assert TOKEN not in caplog.text
    captured = capfd.readouterr()
    assert TOKEN not in captured.err
    assert TOKEN not in captured.out
    assert TOKEN not in repr(manager)
    assert TOKEN not in manager.get_summary()
    assert TOKEN not in str(failure.value)
    assert TOKEN not in str(failure.value.__cause__)
    for folder in (manager.local_dir, remote):
        metadata_path = folder / "experiment_metadata.json"
        hyperparameters = json.loads(metadata_path.read_text(encoding="utf-8"))["hyperparameters"]
        assert hyperparameters["hf_token"] == REDACTED
        assert hyperparameters["api_key"] == REDACTED


@pytest.fixture
def no_token(tmp_path, monkeypatch):
    """No HF_TOKEN and an empty HF_HOME, so huggingface_hub finds no token at all."""
    from huggingface_hub import get_token

    home = tmp_path / "empty-hf-home"
    home.mkdir()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    # get_token() reads HF_TOKEN at each call, but the token file paths were fixed at import.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    assert get_token() is None


@pytest.mark.parametrize("auto_push", [False, True])
def test_missing_token_writes_nothing(hub, repo_id, tmp_path, no_token, auto_push):
    manager = make_manager(tmp_path, repo_id, model=small_model(), auto_push=auto_push)

    with pytest.raises(HubAuthenticationError) as failure:
        manager.save_checkpoint(step=1, push=True)

    message = str(failure.value)
    assert "hf_token=" in message
    assert "HF_TOKEN" in message
    assert "hf auth login" in message
    assert files_under(manager.checkpoint_dir) == {}
    assert files_under(manager.local_dir) == {}
    with pytest.raises(RepositoryNotFoundError):
        owner_api().repo_info(repo_id)


def test_missing_token_push(hub, repo_id, tmp_path, no_token):
    manager = make_manager(tmp_path, repo_id, model=small_model())
    manager.save_checkpoint(step=1)

    with pytest.raises(HubAuthenticationError, match="HF_TOKEN"):
        manager.push()

    assert not (manager.local_dir / "README.md").exists()
    with pytest.raises(RepositoryNotFoundError):
        owner_api().repo_info(repo_id)


def test_token_found_later(hub, repo_id, tmp_path, no_token, monkeypatch):
    manager = make_manager(tmp_path, repo_id, model=small_model())
    manager.save_checkpoint(step=1)
    with pytest.raises(HubAuthenticationError):
        manager.push()

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    manager.push()

    assert hub_checkpoints(repo_id) == {"checkpoint-step-1"}
    manager.close()


def test_rejected_token(hub, repo_id, tmp_path):
    rejected = "hf_unknown_token_0000"
    manager = make_manager(tmp_path, repo_id, model=small_model(), hf_token=rejected)
    manager.save_checkpoint(step=1)

    with pytest.raises(HubAuthenticationError) as failure:
        manager.push()

    assert failure.value.repo_id == repo_id
    assert rejected not in str(failure.value)
    manager.save_checkpoint(step=2, push=True)
    with pytest.raises(PushError) as background:
        manager.wait_for_pushes()
    assert isinstance(background.value.__cause__, HubAuthenticationError)
    manager.close()


# Configuration errors and pruning -----------------------------------------------------


def test_push_needs_repo_id(tmp_path):
    manager = make_manager(tmp_path, None, model=small_model())

    with pytest.raises(RepoIdRequiredError, match="repo_id"):
        manager.push()


def test_push_needs_final_model(hub, repo_id, tmp_path):
    manager = make_manager(tmp_path, repo_id, model=small_model())

    with pytest.raises(ConfigurationError, match="save_final_model"):
        manager.push(push_final_model=True)

    with pytest.raises(RepositoryNotFoundError):
        owner_api().repo_info(repo_id)


def test_prune_hub_checkpoints(hub, repo_id, tmp_path):
    manager = make_manager(
        tmp_path, repo_id, model=small_model(), auto_push=True, retention_policy=KeepLastN(1),
        prune_hub_checkpoints=True,
    )
    names = [Path(manager.save_checkpoint(step=step)).name for step in (1, 2, 3)]
    manager.wait_for_pushes()
    assert hub_checkpoints(repo_id) == set(names)

    manager.push()

    assert hub_checkpoints(repo_id) == {names[-1]}
    assert hub_pointer(repo_id)["name"] == names[-1]
    manager.close()


def test_prune_keeps_foreign_checkpoints(hub, repo_id, tmp_path):
    # A run resumed on a new machine has one checkpoint locally; pruning must not delete
    # the Hub checkpoints it never had. Step 3, which it downloaded and then retired, goes.
    first = make_manager(tmp_path / "a", repo_id, model=small_model(), retention_policy=KeepAll())
    names = [Path(first.save_checkpoint(step=step)).name for step in (1, 2, 3)]
    first.push()
    first.close()
    second = make_manager(
        tmp_path / "b", repo_id, model=small_model(), retention_policy=KeepLastN(1),
        prune_hub_checkpoints=True,
    )
    second.load_latest_checkpoint()
    second.save_checkpoint(step=4)

    second.push()

    assert hub_checkpoints(repo_id) == set(names[:2]) | {"checkpoint-step-4"}
    second.close()


def test_retention_after_late_push(hub, repo_id, tmp_path):
    # The commit of step 1 is held until after step 2 (not pushed) is saved, so retention
    # can delete step 1 only once its push has finished.
    hub.faults.delay("commit", seconds=0.5, times=1)
    manager = make_manager(tmp_path, repo_id, model=small_model(), retention_policy=KeepLastN(1))
    manager.save_checkpoint(step=1, push=True)
    manager.save_checkpoint(step=2)

    manager.wait_for_pushes()

    assert local_names(manager) == {"checkpoint-step-2"}
    assert hub_checkpoints(repo_id) == {"checkpoint-step-1"}
    manager.close()


# Interpreter exit ---------------------------------------------------------------------


def run_exit_script(folder: Path, repo_id: str, count: int) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    assert env["HF_ENDPOINT"] == constants.ENDPOINT
    command = [
        sys.executable, str(SCRIPTS / "push_at_exit.py"), repo_id,
        str(folder / "checkpoints"), str(folder / "outputs"), str(count),
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_exit_flushes_pushes(hub, repo_id, tmp_path):
    # Holding the first commit keeps both pushes queued when the script's main() returns.
    hub.faults.delay("commit", seconds=1.0, times=1)

    result = run_exit_script(tmp_path, repo_id, 2)

    assert result.returncode == 0, result.stderr
    assert "Waiting for" in result.stderr
    assert hub_checkpoints(repo_id) == {"checkpoint-step-1", "checkpoint-step-2"}
    assert hub_pointer(repo_id)["name"] == "checkpoint-step-2"
    assert "NOT PUSHED" not in result.stderr


@pytest.mark.slow
def test_exit_reports_lost_pushes(hub, repo_id, tmp_path):
    hub.faults.fail("commit", status=500, times=None)

    result = run_exit_script(tmp_path, repo_id, 2)

    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "NOT PUSHED" in line]
    assert len(lines) == 1, result.stderr
    assert "checkpoint-step-1" in lines[0]
    assert "checkpoint-step-2" in lines[0]
    assert folder_names(tmp_path / "checkpoints") == ["checkpoint-step-1", "checkpoint-step-2"]


def test_late_endpoint_variable_applies(hub, repo_id, tmp_path, monkeypatch, caplog):
    # The client read another endpoint at import; HF_ENDPOINT set later must still win, so
    # no call goes to the endpoint the client started with.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    template = "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    manager = make_manager(tmp_path, repo_id, model=small_model())
    manager.save_checkpoint(step=1)

    manager.push()

    assert hub_checkpoints(repo_id) == {"checkpoint-step-1"}
    assert constants.ENDPOINT == hub.endpoint
    assert "set after huggingface_hub was imported" in caplog.text
    manager.close()


def test_late_disable_xet_variable_applies(hub, repo_id, tmp_path, monkeypatch, caplog):
    # The client read HF_HUB_DISABLE_XET as unset at import. Left that way, an upload would ask
    # the local server (which has no Xet) for a Xet write token and fail.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    manager = make_manager(tmp_path, repo_id, model=small_model())
    manager.save_checkpoint(step=1)

    manager.push()

    assert hub_checkpoints(repo_id) == {"checkpoint-step-1"}
    assert constants.HF_HUB_DISABLE_XET is True
    assert "HF_HUB_DISABLE_XET was set after huggingface_hub was imported" in caplog.text
    manager.close()


def metadata_checkpoint_names(folder: Path) -> list[str]:
    metadata = json.loads((folder / "outputs" / "experiment_metadata.json").read_text())
    return [checkpoint["name"] for checkpoint in metadata["checkpoints"]]


@pytest.mark.parametrize("blocking", [True, False])
def test_metadata_lists_kept_checkpoints_after_pushes(hub, repo_id, tmp_path, blocking):
    # Retention deletes a pushed checkpoint only once its push is done, in the push job. The
    # metadata file must follow that deletion too.
    manager = make_manager(tmp_path, repo_id, auto_push=True, retention_policy=KeepLastN(1))
    for step in range(1, 4):
        manager.save_checkpoint(small_model(), step=step, blocking=blocking)
    manager.close()

    names = metadata_checkpoint_names(tmp_path)
    assert names == ["checkpoint-step-3"]
    assert names == [checkpoint["name"] for checkpoint in manager.list_checkpoints()]


def test_failing_policy_still_pushes(hub, repo_id, tmp_path):
    def broken_policy(checkpoints):
        raise ValueError("policy failed")

    manager = make_manager(tmp_path, repo_id, auto_push=True, retention_policy=broken_policy)

    with pytest.raises(ValueError, match="policy failed"):
        manager.save_checkpoint(small_model(), step=1)
    manager.wait_for_pushes()

    assert hub_checkpoints(repo_id) == {"checkpoint-step-1"}
    assert metadata_checkpoint_names(tmp_path) == ["checkpoint-step-1"]
    manager.close()


def test_close_timeout_abandons_stalled_push(hub, repo_id, tmp_path, caplog):
    hub.faults.delay("commit", seconds=2.0, times=1)  # A Hub that stops responding for a while.
    manager = make_manager(tmp_path, repo_id, auto_push=True)
    manager.save_checkpoint(small_model(), step=1)

    with pytest.raises(PushError) as caught:
        manager.close(timeout=0.2)

    assert "Timed out" in str(caught.value)
    assert caught.value.checkpoints == ["checkpoint-step-1"]
    assert folder_names(tmp_path / "checkpoints") == ["checkpoint-step-1"]
    # The exit hook reports the push as lost at once instead of waiting for it.
    manager._hub.flush_at_exit()
    assert "NOT PUSHED" in caplog.text
    manager.wait_for_pushes()  # Let the held commit finish before the server stops.


@pytest.mark.parametrize("timeout", [-1, "10", float("nan"), True])
def test_close_rejects_bad_timeout(tmp_path, timeout):
    manager = make_manager(tmp_path, None)

    with pytest.raises(ConfigurationError, match="Invalid timeout"):
        manager.close(timeout=timeout)

"""HFManager with several ranks: DDP and FSDP2 runs of two gloo processes on the CPU.

Each multi-process test starts tests/distributed/worker.py once per rank, with the
environment torchrun gives its workers (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a
free port), and compares what the ranks wrote. The workers' process group times out after
60 s, so a hang fails the worker well before the test's own timeout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from safetensors import safe_open

from hf_lifecycle import ConfigurationError, HFManager, load_model_weights
from hf_lifecycle.checkpoint.store import read_manifest
from hf_lifecycle.distributed import RankGroup, is_sharded, rank_rng_state

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).parent / "distributed" / "worker.py"
WORKER_TIMEOUT = 150
sys.path.insert(0, str(WORKER.parent))
import worker  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    env = dict(os.environ)  # Carries the local Hub's HF_ENDPOINT and HF_TOKEN.
    env.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
    )
    return env


def run_ranks(*arguments: object, world_size: int = 2) -> list[subprocess.CompletedProcess]:
    """Run the worker on ``world_size`` ranks, as torchrun would, and wait for all of them."""
    port = free_port()
    command = [sys.executable, str(WORKER), *map(str, arguments)]
    processes = [
        subprocess.Popen(command, env=worker_env(rank, world_size, port), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(world_size)
    ]
    results = []
    for rank, process in enumerate(processes):
        try:
            output, _ = process.communicate(timeout=WORKER_TIMEOUT)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(command, process.returncode, output))
    return results


def assert_ranks_succeeded(results: list[subprocess.CompletedProcess]) -> None:
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stdout[-4000:]}"


def read_results(out: Path, label: str, world_size: int = 2) -> list[dict]:
    paths = [out / f"{label}-rank{rank}.json" for rank in range(world_size)]
    return [json.loads(path.read_text()) for path in paths]


def checkpoint_names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if not path.name.startswith("."))


def temporary_folders(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob(".tmp-*"))


# One process -----------------------------------------------------------------------------------


def test_rank_group_without_process_group():
    group = RankGroup()
    assert group.enabled is False
    assert group.rank == 0
    assert group.world_size == 1
    assert group.gather("gathering", 5) == [5]
    assert group.run_on_main("running", lambda: 7) == 7


def test_rank_group_rejects_enabled_without_group():
    with pytest.raises(ConfigurationError, match="init_process_group"):
        RankGroup(enabled=True)
    with pytest.raises(ConfigurationError, match="True, False or None"):
        RankGroup(enabled="yes")


def test_rank_group_passes_errors_unchanged():
    def fail():
        raise KeyError("missing")

    with pytest.raises(KeyError):
        RankGroup().run_everywhere("running", fail)


def test_rank_rng_state_picks_this_rank():
    states = [{"torch": "zero"}, {"torch": "one"}]
    assert rank_rng_state(states, 1, 2) == {"torch": "one"}
    assert rank_rng_state(states, 0, 1) == {"torch": "zero"}
    assert rank_rng_state(states, 2, 3) is None
    assert rank_rng_state({"torch": "single"}, 1, 2) == {"torch": "single"}


def test_plain_model_is_not_sharded():
    assert is_sharded(worker.Net()) is False
    assert is_sharded(None) is False


# Two ranks -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_ddp_saves_retention_and_push(tmp_path, hub, repo_id):
    assert_ranks_succeeded(run_ranks("ddp_hub", tmp_path, "--repo-id", repo_id))
    rank0, rank1 = read_results(tmp_path, "ddp_hub")
    saved = [f"checkpoint-step-{step}" for step in (2, 4, 6, 8)]

    assert [Path(path).name for path in rank0["paths"]] == saved
    assert rank1["paths"] == rank0["paths"]
    # Rank 0's push thread deletes what retention no longer keeps once a push finishes, so a
    # listing taken in between may still show it, on either rank. Each listing contains the two
    # newest checkpoints and nothing that was not saved yet, newest first.
    for index in range(len(saved)):
        expected = saved[: index + 1][::-1]
        for listing in (rank0["listings"][index], rank1["listings"][index]):
            assert listing[:2] == expected[:2]
            assert all(name in expected for name in listing)
            assert listing == [name for name in expected if name in listing]
    assert rank1["final"] == rank0["final"]
    assert rank0["final"] == ["checkpoint-step-8", "checkpoint-step-6"]
    checkpoint_dir = tmp_path / "ckpt"
    assert checkpoint_names(checkpoint_dir) == ["checkpoint-step-6", "checkpoint-step-8"]
    assert temporary_folders(checkpoint_dir) == []

    manager = HFManager(local_dir=tmp_path / "check", checkpoint_dir=checkpoint_dir)
    for name in ("checkpoint-step-6", "checkpoint-step-8"):
        assert manager.store.verify(name) == []
        manifest = read_manifest(checkpoint_dir / name)
        with safe_open(checkpoint_dir / name / "model.safetensors", "pt") as weights:
            keys = list(weights.keys())
        assert "layers.0.weight" in keys
        assert not any(key.startswith("module.") for key in keys)
        assert "rng_state.json" in manifest["files"]

    api = HfApi()
    files = api.list_repo_files(repo_id)
    for name in saved:
        assert f"checkpoints/{name}/manifest.json" in files
    titles = [commit.title for commit in api.list_repo_commits(repo_id)]
    for name in saved:
        assert titles.count(f"Add checkpoint {name}") == 1
    pointer = json.loads(Path(api.hf_hub_download(repo_id, "checkpoints/latest.json")).read_text())
    assert pointer["name"] == "checkpoint-step-8"


def load_snapshot(path: Path) -> dict:
    # The snapshot contains Python's random.getstate() tuple, which weights_only rejects.
    return torch.load(path, weights_only=False)


def assert_same_state(expected: dict, actual: dict) -> None:
    for key, tensor in expected["model"].items():
        assert torch.equal(actual["model"][key], tensor), f"weight {key}"
    for index, entries in expected["optimizer"]["state"].items():
        for key, value in entries.items():
            actual_value = actual["optimizer"]["state"][index][key]
            assert torch.equal(actual_value, value), f"optimizer {index}.{key}"
    assert actual["scheduler"] == expected["scheduler"]
    assert torch.equal(actual["rng"]["torch"], expected["rng"]["torch"])
    assert np.array_equal(actual["rng"]["numpy"], expected["rng"]["numpy"])
    assert actual["rng"]["python"] == expected["rng"]["python"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_resume_is_bitwise(tmp_path):
    assert_ranks_succeeded(run_ranks("ddp_resume", tmp_path, "--phase", "first"))
    straight = [load_snapshot(tmp_path / f"straight-rank{rank}.pt") for rank in (0, 1)]
    half = [load_snapshot(tmp_path / f"half-rank{rank}.pt") for rank in (0, 1)]
    # The ranks draw different data and dropout masks from their own generators.
    assert not torch.equal(straight[0]["rng"]["torch"], straight[1]["rng"]["torch"])

    # The DDP checkpoint loads into an unwrapped model in this process.
    single = HFManager(local_dir=tmp_path / "single-outputs", checkpoint_dir=tmp_path / "ckpt")
    model = worker.Net()
    single.load_latest_checkpoint(model)
    for key, tensor in half[0]["model"].items():
        assert torch.equal(model.state_dict()[key], tensor), f"weight {key}"

    # And a checkpoint of an unwrapped model loads into the DDP model of every rank.
    torch.manual_seed(123)
    plain_model = worker.Net()
    plain = HFManager(local_dir=tmp_path / "plain-outputs", checkpoint_dir=tmp_path / "plain-ckpt")
    plain.save_checkpoint(plain_model, step=1)

    assert_ranks_succeeded(run_ranks("ddp_resume", tmp_path, "--phase", "second"))
    for rank in (0, 1):
        loaded = torch.load(tmp_path / f"plain-into-ddp-rank{rank}.pt", weights_only=True)
        for key, tensor in plain_model.state_dict().items():
            assert torch.equal(loaded[key], tensor), f"rank {rank} weight {key}"
        resumed = load_snapshot(tmp_path / f"resumed-rank{rank}.pt")
        assert_same_state(straight[rank], resumed)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp2_reshards_to_two_and_one_rank(tmp_path):
    assert_ranks_succeeded(run_ranks("fsdp", tmp_path, "--phase", "save"))
    # A first save failed in rank 1's shard writer: every rank raised, nothing was committed.
    for result in read_results(tmp_path, "fsdp-shard-failure"):
        assert result["ranks"] == [1]
        assert "No space left on device (injected)" in result["message"]
        assert result["listing"] == []
        assert result["temporary"] == []
    checkpoint = tmp_path / "ckpt" / "checkpoint-step-3"
    manifest = read_manifest(checkpoint)
    sharded = manifest["components"]["sharded"]
    assert sharded["world_size"] == 2
    assert sharded["contents"] == ["model", "optimizer"]
    for relative in ("dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"):
        assert relative in manifest["files"]
    assert "model" not in manifest["components"]

    torch.manual_seed(321)
    plain_model = worker.Net()
    plain = HFManager(local_dir=tmp_path / "plain-outputs", checkpoint_dir=tmp_path / "plain-ckpt")
    plain.save_checkpoint(plain_model, torch.optim.AdamW(plain_model.parameters()), step=1)

    assert_ranks_succeeded(run_ranks("fsdp", tmp_path, "--phase", "load"))
    for result in read_results(tmp_path, "fsdp-plain"):
        assert result["ranks"] == [0, 1]
        assert "keyed by parameter position" in result["error"]
    plain_into_fsdp = torch.load(tmp_path / "plain-into-fsdp.pt", weights_only=True)
    for key, tensor in plain_model.state_dict().items():
        assert torch.equal(plain_into_fsdp[key], tensor), f"unsharded checkpoint: weight {key}"
    saved = torch.load(tmp_path / "full-save.pt", weights_only=True)
    loaded_two = torch.load(tmp_path / "full-load.pt", weights_only=True)
    assert sorted(loaded_two) == sorted(saved)
    for key, tensor in saved.items():
        assert torch.equal(loaded_two[key], tensor), f"two ranks: weight {key}"
    after_save = torch.load(tmp_path / "after-step-save.pt", weights_only=True)
    after_load = torch.load(tmp_path / "after-step-load.pt", weights_only=True)
    for key, tensor in after_save.items():
        assert torch.equal(after_load[key], tensor), f"step after loading: weight {key}"

    # One process without a process group reads the shards into an unsharded model.
    torch.manual_seed(0)
    model = worker.Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    manager = HFManager(local_dir=tmp_path / "single-outputs", checkpoint_dir=tmp_path / "ckpt")
    loaded = manager.load_latest_checkpoint(model, optimizer)
    assert loaded["step"] == 3
    for key, tensor in saved.items():
        assert torch.equal(model.state_dict()[key], tensor), f"one rank: weight {key}"
    assert len(optimizer.state) == len(list(model.parameters()))

    final = worker.Net()
    load_model_weights(final, tmp_path / "outputs" / "final_model")
    for key, tensor in saved.items():
        assert torch.equal(final.state_dict()[key], tensor), f"final model: weight {key}"


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_retention_follows_rank0_metrics(tmp_path):
    results = run_ranks("metrics", tmp_path)
    assert_ranks_succeeded(results)
    rank0, rank1 = read_results(tmp_path, "metrics")
    assert rank1["listings"] == rank0["listings"]
    # Rank 0's val_loss falls at every save, so the last checkpoint is also the best.
    assert rank0["listings"][-1] == ["checkpoint-step-4"]
    assert checkpoint_names(tmp_path / "ckpt") == ["checkpoint-step-4"]
    manifest = read_manifest(tmp_path / "ckpt" / "checkpoint-step-4")
    assert manifest["metrics"] == {"val_loss": 1.0}
    # Only rank 0 logs the library's INFO lines.
    assert "Loaded checkpoint checkpoint-step-4" in results[0].stdout
    assert "Loaded checkpoint" not in results[1].stdout
    assert checkpoint_names(tmp_path / "solo-ckpt") == ["checkpoint-step-4"]


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_failed_save_raises_on_every_rank(tmp_path):
    results = run_ranks("failure", tmp_path)
    # Rank 0 kills itself in the last save, and rank 1 then fails in the save's collective.
    assert results[0].returncode == -9, results[0].stdout[-4000:]
    assert results[1].returncode != 0
    assert "DistributedError" in results[1].stdout
    rank0, rank1 = read_results(tmp_path, "failure")
    for rank, result in enumerate((rank0, rank1)):
        assert result["serialize"]["ranks"] == [1], f"rank {rank}"
        assert result["serialize"]["seconds"] < worker.PROCESS_GROUP_TIMEOUT.total_seconds()
        assert "custom_state.position" in result["serialize"]["message"]
        assert result["after_serialize"] == ["checkpoint-step-2"], f"rank {rank}"
        assert result["temp_after_serialize"] == []
        assert result["write"]["ranks"] == [0], f"rank {rank}"
        assert result["write"]["seconds"] < worker.PROCESS_GROUP_TIMEOUT.total_seconds()
        assert result["after_write"] == ["checkpoint-step-2"], f"rank {rank}"
        assert result["temp_after_write"] == []
        assert result["loaded_after_damage"] == "checkpoint-step-2", f"rank {rank}"

    checkpoint_dir = tmp_path / "ckpt"
    # The save that rank 0 died in left its temporary folder, named with rank 0's pid.
    assert len(temporary_folders(checkpoint_dir)) == 1
    manager = HFManager(local_dir=tmp_path / "next", checkpoint_dir=checkpoint_dir)
    assert temporary_folders(checkpoint_dir) == []
    listing = [entry["name"] for entry in manager.list_checkpoints()]
    assert listing == ["checkpoint-step-7", "checkpoint-step-2"]


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_missing_rank_is_named(tmp_path):
    run_ranks("absent", tmp_path)
    result = json.loads((tmp_path / "absent-rank0.json").read_text())
    assert result["ranks"] == [1]
    assert "Creating the HFManager" in result["message"]
    assert result["seconds"] < worker.ABSENT_SLEEP.total_seconds()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_digits_ddp_example(tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}",
        str(ROOT / "examples" / "train_digits_ddp.py"), "--run-dir", str(run_dir), "--epochs", "2",
    ]
    env = worker_env(0, 2, 0)
    # torchrun sets the rank variables itself.
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(name)
    env.pop("MASTER_PORT")
    completed = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                               timeout=WORKER_TIMEOUT, check=False)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "Resumed from checkpoint-step-25" in completed.stdout
    assert "Test accuracy" in completed.stdout
    assert (run_dir / "outputs" / "final_model" / "model.safetensors").is_file()
    checkpoints = checkpoint_names(run_dir / "checkpoints")
    assert checkpoints
    assert temporary_folders(run_dir / "checkpoints") == []


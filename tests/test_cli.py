"""The hf-lifecycle command line, through typer's CliRunner and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from typer.testing import CliRunner

from hf_lifecycle import HFManager, KeepBestM, KeepLastN
from hf_lifecycle.cli import app

EXECUTABLE = Path(sys.executable).with_name("hf-lifecycle")
VAL_LOSSES = {1: 0.5, 2: 0.3, 3: 0.4, 4: 0.6, 5: 0.7}
COMMANDS = [
    "list",
    "show",
    "verify",
    "cleanup",
    "summary",
    "plot",
    "push",
    "pull",
    "hub",
    "hub serve",
]


def build_run(root: Path, *, keep_last: int = 5) -> HFManager:
    """Save one checkpoint per entry of VAL_LOSSES with a tiny model, as a training run would."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    manager = HFManager(
        local_dir=root / "outputs",
        checkpoint_dir=root / "checkpoints",
        retention_policy=KeepLastN(keep_last) | KeepBestM(1, metric="val_loss"),
    )
    manager.track_hyperparameters({"lr": 0.1, "hub_token": "hf_cli_fixture_token"})
    for step, val_loss in VAL_LOSSES.items():
        model(torch.randn(2, 3)).sum().backward()
        optimizer.step()
        manager.log_metrics({"loss": val_loss + 0.1, "val_loss": val_loss}, step=step)
        manager.save_checkpoint(model, optimizer, step=step, metrics={"val_loss": val_loss})
    manager.save_metadata()
    manager.close()
    return manager


@pytest.fixture
def run_dir(tmp_path) -> Path:
    build_run(tmp_path)
    return tmp_path


def invoke(*arguments: str):
    return CliRunner().invoke(app, list(arguments), catch_exceptions=False)


def dirs(root: Path) -> list[str]:
    return ["--checkpoint-dir", str(root / "checkpoints"), "--local-dir", str(root / "outputs")]


def checkpoint_names(root: Path) -> list[str]:
    return sorted(
        path.name for path in (root / "checkpoints").iterdir() if not path.name.startswith(".")
    )


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_one_line_error(result, text: str) -> None:
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ")
    assert text in result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output + result.stderr


# Help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    result = CliRunner().invoke(app, command.split() + ["--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_no_arguments_shows_help():
    result = CliRunner().invoke(app, [])
    assert "list" in result.output
    assert "cleanup" in result.output


# list ---------------------------------------------------------------------------------------


def test_list_table(run_dir):
    result = invoke("list", *dirs(run_dir))
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[1] == "Policy: last 5 or best 1 by val_loss (min) (from metadata)"
    assert lines[2].split() == ["NAME", "STEP", "EPOCH", "METRICS", "SIZE", "KEPT", "BY"]
    names = [line.split()[0] for line in lines[3:]]
    assert names == [f"checkpoint-step-{step}" for step in (5, 4, 3, 2, 1)]
    assert "best 1 by val_loss (min)" in lines[6]


def test_list_json(run_dir):
    result = invoke("list", *dirs(run_dir), "--json")
    assert result.exit_code == 0
    payload = json.loads(result.stdout)
    entries = payload["checkpoints"]
    assert [entry["step"] for entry in entries] == [5, 4, 3, 2, 1]
    assert entries[0]["kept_by"] == ["last 5", "newest"]
    assert entries[3]["kept_by"] == ["last 5", "best 1 by val_loss (min)"]
    assert entries[3]["metrics"] == {"val_loss": 0.3}
    folder = Path(entries[0]["path"])
    assert entries[0]["size"] == sum(path.stat().st_size for path in folder.iterdir())
    assert payload["policy_source"] == "metadata"


def test_list_policy_options(run_dir):
    result = invoke("list", *dirs(run_dir), "--keep-last", "1", "--json")
    entries = json.loads(result.stdout)["checkpoints"]
    assert [entry["kept_by"] for entry in entries] == [["last 1", "newest"], [], [], [], []]


def test_list_best_mode_guessed(run_dir):
    arguments = ("--keep-best", "1", "--metric", "val_accuracy", "--json")
    result = invoke("list", *dirs(run_dir), *arguments)
    assert json.loads(result.stdout)["policy"] == "best 1 by val_accuracy (max)"


def test_list_without_policy(run_dir):
    arguments = ("--checkpoint-dir", str(run_dir / "checkpoints"), "--local-dir", "missing")
    result = invoke("list", *arguments)
    assert result.exit_code == 0
    assert "Policy: n/a" in result.stdout
    assert result.stdout.splitlines()[3].endswith("n/a")
    payload = json.loads(invoke("list", *arguments, "--json").stdout)
    assert payload["checkpoints"][0]["kept_by"] is None


def test_list_missing_folder(tmp_path):
    result = invoke("list", "--checkpoint-dir", str(tmp_path / "nowhere"))
    assert_one_line_error(result, "does not exist")
    assert not (tmp_path / "nowhere").exists()


def test_list_metric_needs_keep_best(run_dir):
    result = invoke("list", *dirs(run_dir), "--metric", "val_loss")
    assert_one_line_error(result, "--keep-best")


# show ---------------------------------------------------------------------------------------


def test_show_json(run_dir):
    result = invoke("show", "checkpoint-step-2", *dirs(run_dir)[:2], "--json")
    assert result.exit_code == 0
    payload = json.loads(result.stdout)
    assert payload["manifest"]["step"] == 2
    assert payload["manifest"]["metrics"] == {"val_loss": 0.3}
    model = {entry["name"]: entry for entry in payload["tensors"]["model.safetensors"]}
    assert model["0.weight"]["shape"] == [4, 3]
    assert model["0.weight"]["dtype"] == "F32"
    assert model["2.bias"]["shape"] == [2]
    optimizer = {entry["name"] for entry in payload["tensors"]["optimizer.safetensors"]}
    assert "optimizer.state[0].exp_avg" in optimizer


def test_show_reads_headers_only(run_dir):
    # Damaged tensor data leaves the header intact, so show still lists the tensors.
    flip_last_byte(run_dir / "checkpoints" / "checkpoint-step-3" / "model.safetensors")
    result = invoke("show", "checkpoint-step-3", *dirs(run_dir)[:2])
    assert result.exit_code == 0
    assert "Tensors in model.safetensors" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines()]
    assert ["0.weight", "F32", "[4,", "3]"] in rows


def test_show_unknown(run_dir):
    result = invoke("show", "checkpoint-step-99", *dirs(run_dir)[:2])
    assert_one_line_error(result, "checkpoint-step-99")


def test_show_rejects_path(run_dir):
    result = invoke("show", "../outputs", *dirs(run_dir)[:2])
    assert_one_line_error(result, "Invalid checkpoint name")


# verify -------------------------------------------------------------------------------------


def test_verify_ok(run_dir):
    result = invoke("verify", *dirs(run_dir)[:2])
    assert result.exit_code == 0
    assert result.stdout.count("ok ") == len(VAL_LOSSES)


def test_verify_corrupted(run_dir):
    bad = run_dir / "checkpoints" / "checkpoint-step-2" / "optimizer.safetensors"
    flip_last_byte(bad)
    result = invoke("verify", *dirs(run_dir)[:2])
    assert result.exit_code == 1
    assert f"FAILED  checkpoint-step-2: {bad}" in result.stdout
    assert str(bad) in result.stderr
    payload = json.loads(invoke("verify", *dirs(run_dir)[:2], "--json").stdout)
    assert payload["ok"] is False
    failed = [entry for entry in payload["checkpoints"] if not entry["ok"]]
    assert failed == [{"name": "checkpoint-step-2", "bad_files": [str(bad)], "ok": False}]


def test_verify_one_name(run_dir):
    flip_last_byte(run_dir / "checkpoints" / "checkpoint-step-2" / "model.safetensors")
    result = invoke("verify", "checkpoint-step-4", *dirs(run_dir)[:2])
    assert result.exit_code == 0
    assert result.stdout == "ok      checkpoint-step-4\n"


def test_verify_broken_manifest(run_dir):
    manifest = run_dir / "checkpoints" / "checkpoint-step-1" / "manifest.json"
    manifest.write_text("{not json")
    result = invoke("verify", *dirs(run_dir)[:2])
    assert result.exit_code == 1
    assert str(manifest) in result.stderr


def test_verify_missing_file(run_dir):
    missing = run_dir / "checkpoints" / "checkpoint-step-5" / "rng_state.json"
    missing.unlink()
    result = invoke("verify", "checkpoint-step-5", *dirs(run_dir)[:2])
    assert result.exit_code == 1
    assert str(missing) in result.stdout


# cleanup ------------------------------------------------------------------------------------


def test_cleanup_dry_run(run_dir):
    before = checkpoint_names(run_dir)
    arguments = ("--keep-last", "1", "--dry-run", "--json")
    result = invoke("cleanup", *arguments, *dirs(run_dir)[:2])
    assert result.exit_code == 0
    payload = json.loads(result.stdout)
    assert payload["delete"] == [f"checkpoint-step-{step}" for step in (1, 2, 3, 4)]
    assert payload["dry_run"] is True
    assert checkpoint_names(run_dir) == before


def test_cleanup_applies_policy(run_dir):
    arguments = ("--keep-last", "1", "--keep-best", "1", "--metric", "val_loss")
    result = invoke("cleanup", *arguments, *dirs(run_dir)[:2])
    assert result.exit_code == 0
    assert "Deleted 3: checkpoint-step-1, checkpoint-step-3, checkpoint-step-4" in result.stdout
    assert checkpoint_names(run_dir) == ["checkpoint-step-2", "checkpoint-step-5"]
    assert sorted(os.listdir(run_dir / "outputs")) == ["experiment_metadata.json", "runs"]


def test_cleanup_keeps_newest(run_dir):
    arguments = ("--keep-best", "1", "--metric", "val_loss", "--mode", "max", "--json")
    payload = json.loads(invoke("cleanup", *arguments, *dirs(run_dir)[:2]).stdout)
    assert payload["keep"] == ["checkpoint-step-5"]
    assert checkpoint_names(run_dir) == ["checkpoint-step-5"]


def test_cleanup_needs_policy(run_dir):
    result = invoke("cleanup", *dirs(run_dir)[:2])
    assert_one_line_error(result, "cleanup needs a policy")
    assert len(checkpoint_names(run_dir)) == len(VAL_LOSSES)


def test_cleanup_rejects_bad_mode(run_dir):
    arguments = ("--keep-best", "1", "--metric", "val_loss", "--mode", "sideways")
    result = invoke("cleanup", *arguments, *dirs(run_dir)[:2])
    assert result.exit_code == 2
    assert len(checkpoint_names(run_dir)) == len(VAL_LOSSES)


# summary and plot ---------------------------------------------------------------------------


def test_summary_matches_manager(tmp_path):
    manager = build_run(tmp_path)
    result = invoke("summary", *dirs(tmp_path))
    assert result.exit_code == 0
    assert result.stdout == manager.get_summary()
    assert "hf_cli_fixture_token" not in result.stdout


def test_summary_json(run_dir):
    result = invoke("summary", "--local-dir", str(run_dir / "outputs"), "--json")
    payload = json.loads(result.stdout)
    assert payload["best_metrics"]["val_loss"]["step"] == 2
    assert payload["hyperparameters"]["lr"] == 0.1
    assert payload["hyperparameters"]["hub_token"] == "<redacted>"


def test_summary_missing_metadata(tmp_path):
    result = invoke("summary", "--local-dir", str(tmp_path))
    assert_one_line_error(result, "experiment_metadata.json")


def test_plot_png(run_dir):
    target = run_dir / "plots" / "curves.png"
    arguments = ("--local-dir", str(run_dir / "outputs"), "--output", str(target))
    result = invoke("plot", *arguments, "--metric", "val_loss")
    assert result.exit_code == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_unknown_metric(run_dir):
    arguments = ("--local-dir", str(run_dir / "outputs"), "--metric", "bleu")
    result = invoke("plot", *arguments)
    assert_one_line_error(result, "bleu")


# push and pull ------------------------------------------------------------------------------


def test_push_and_pull(run_dir, hub, repo_id):
    result = invoke("push", "--repo-id", repo_id, *dirs(run_dir), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["checkpoints"][0] == "checkpoint-step-5"
    files = HfApi().list_repo_files(repo_id)
    assert "checkpoints/checkpoint-step-1/manifest.json" in files
    assert "experiment_metadata.json" in files
    assert any(path.startswith("runs/") and "tfevents" in path for path in files)
    assert len(checkpoint_names(run_dir)) == len(VAL_LOSSES)
    # The metadata that push rewrites still records the run's own policy.
    listed = json.loads(invoke("list", *dirs(run_dir), "--json").stdout)
    assert listed["policy"] == "last 5 or best 1 by val_loss (min)"

    target = run_dir / "pulled"
    result = invoke("pull", "--repo-id", repo_id, "--checkpoint-dir", str(target), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "checkpoint-step-5"
    result = invoke(
        "pull", "--repo-id", repo_id, "checkpoint-step-2", "--checkpoint-dir", str(target)
    )
    assert result.exit_code == 0, result.stderr
    assert "checkpoint-step-2 (step 2)" in result.stdout
    assert sorted(os.listdir(target)) == [".index.json", "checkpoint-step-2", "checkpoint-step-5"]
    assert invoke("verify", "--checkpoint-dir", str(target)).exit_code == 0


def test_push_final_model(run_dir, hub, repo_id):
    manager = HFManager(local_dir=run_dir / "outputs", checkpoint_dir=run_dir / "checkpoints")
    manager.save_final_model(torch.nn.Linear(2, 2), format="safetensors")
    result = invoke("push", "--repo-id", repo_id, "--final-model", *dirs(run_dir))
    assert result.exit_code == 0, result.stderr
    assert "and the final model" in result.stdout
    assert "model.safetensors" in HfApi().list_repo_files(repo_id)


def test_pull_unknown_repo(tmp_path, hub, repo_id):
    result = invoke("pull", "--repo-id", repo_id, "--checkpoint-dir", str(tmp_path / "c"))
    assert_one_line_error(result, "has no checkpoint")


def test_pull_unknown_name(tmp_path, hub, repo_id):
    build_run(tmp_path)
    invoke("push", "--repo-id", repo_id, *dirs(tmp_path))
    arguments = (
        "pull",
        "--repo-id",
        repo_id,
        "checkpoint-step-77",
        "--checkpoint-dir",
        str(tmp_path / "c"),
    )
    result = invoke(*arguments)
    assert_one_line_error(result, "checkpoint-step-77")


def test_push_without_token(run_dir, hub, repo_id, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = invoke("push", "--repo-id", repo_id, *dirs(run_dir))
    assert_one_line_error(result, "token")


# Real subprocesses --------------------------------------------------------------------------


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    """Run the installed console script; the environment carries the test Hub's HF_* settings."""
    return subprocess.run(
        [str(EXECUTABLE), *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )


@pytest.mark.slow
def test_subprocess_inspection(run_dir):
    listed = run_cli("list", *dirs(run_dir), "--json")
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)["checkpoints"]) == len(VAL_LOSSES)

    shown = run_cli("show", "checkpoint-step-1", *dirs(run_dir)[:2])
    assert shown.returncode == 0, shown.stderr
    assert "Tensors in model.safetensors" in shown.stdout

    summary = run_cli("summary", "--local-dir", str(run_dir / "outputs"))
    assert summary.returncode == 0, summary.stderr
    assert "val_loss: last 0.7 at step 5, best 0.3 at step 2 (min)" in summary.stdout

    plotted = run_cli("plot", "--local-dir", str(run_dir / "outputs"), "--output", "m.png")
    assert plotted.returncode == 0, plotted.stderr
    assert (run_dir / "m.png").is_file()


@pytest.mark.slow
def test_subprocess_verify_and_cleanup(run_dir):
    bad = run_dir / "checkpoints" / "checkpoint-step-3" / "model.safetensors"
    flip_last_byte(bad)
    verified = run_cli("verify", *dirs(run_dir)[:2])
    assert verified.returncode == 1
    assert str(bad) in verified.stderr
    assert verified.stderr.count("Error:") == 1
    assert "Traceback" not in verified.stderr

    before = checkpoint_names(run_dir)
    dry = run_cli("cleanup", "--keep-last", "1", "--dry-run", *dirs(run_dir)[:2])
    assert dry.returncode == 0, dry.stderr
    assert "Would delete 4" in dry.stdout
    assert checkpoint_names(run_dir) == before

    cleaned = run_cli("cleanup", "--keep-last", "2", *dirs(run_dir)[:2])
    assert cleaned.returncode == 0, cleaned.stderr
    assert checkpoint_names(run_dir) == ["checkpoint-step-4", "checkpoint-step-5"]

    missing = run_cli("show", "checkpoint-step-1", *dirs(run_dir)[:2])
    assert missing.returncode == 1
    assert missing.stderr.startswith("Error: No checkpoint named 'checkpoint-step-1'")
    assert "Traceback" not in missing.stderr


@pytest.mark.slow
def test_subprocess_push_pull(run_dir, hub, repo_id):
    pushed = run_cli("push", "--repo-id", repo_id, *dirs(run_dir))
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.startswith(f"Pushed {len(VAL_LOSSES)} checkpoints")

    target = run_dir / "elsewhere"
    pulled = run_cli("pull", "--repo-id", repo_id, "--checkpoint-dir", str(target), "--json")
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)["step"] == 5
    assert (target / "checkpoint-step-5" / "manifest.json").is_file()

    usage = run_cli("pull")
    assert usage.returncode == 2
    assert "--repo-id" in usage.stderr


@pytest.mark.slow
def test_subprocess_closed_pipe_is_quiet(run_dir):
    # The reader closes its end before the command writes, as `| head` does once satisfied.
    process = subprocess.Popen(
        [str(EXECUTABLE), "list", *dirs(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    process.wait(timeout=120)

    assert "Error" not in stderr
    assert "Traceback" not in stderr
    assert process.returncode == 1

"""Tests for hyperparameter and metric tracking, the environment record and the metadata file."""

from __future__ import annotations

import enum
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_lifecycle.errors import ConfigurationError, SerializationError
from hf_lifecycle.tracking import (
    METADATA_FORMAT,
    REDACTED,
    ExperimentTracker,
    build_metadata,
    collect_environment,
    format_summary,
    read_metadata,
    write_metadata,
)

SECRET = "hf_abcdefSECRETvalue1234567890"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Precision(enum.Enum):
    BF16 = "bf16"


def _metadata_for(tracker: ExperimentTracker, **overrides: object) -> dict:
    arguments = {
        "checkpoints": [],
        "final_model": None,
        "run": {"repo_id": "user/model", "local_dir": "/runs/a", "checkpoint_dir": "/runs/a/ckpt"},
        "environment": {"python_version": "3.11"},
    }
    arguments.update(overrides)
    return build_metadata(tracker, **arguments)


# --------------------------------------------------------------------------- metric history


def test_history_keeps_every_step():
    tracker = ExperimentTracker()
    for step, loss in [(0, 2.0), (10, 1.5), (20, 1.25)]:
        tracker.log_metrics({"loss": loss}, step=step)
    tracker.log_metrics({"accuracy": 0.5}, step=20)

    assert [r["step"] for r in tracker.history("loss")] == [0, 10, 20]
    assert [r["value"] for r in tracker.history("loss")] == [2.0, 1.5, 1.25]
    assert all(isinstance(r["timestamp"], float) for r in tracker.history("loss"))
    assert [r["name"] for r in tracker.history()] == ["loss", "loss", "loss", "accuracy"]
    assert tracker.history("missing") == []
    assert tracker.metric_names == ["loss", "accuracy"]
    assert tracker.last() == {
        "loss": {"value": 1.25, "step": 20},
        "accuracy": {"value": 0.5, "step": 20},
    }


def test_auto_step_follows_largest_step():
    tracker = ExperimentTracker()
    assert tracker.log_metrics({"loss": 1.0}) == 0
    assert tracker.log_metrics({"loss": 0.9}) == 1
    assert tracker.log_metrics({"loss": 0.8}, step=10) == 10
    assert tracker.log_metrics({"loss": 0.7}) == 11
    # An explicit smaller step does not move the automatic step back.
    assert tracker.log_metrics({"loss": 0.6}, step=3) == 3
    assert tracker.log_metrics({"loss": 0.5}) == 12
    assert tracker.log_metrics({}) == 13
    assert tracker.log_metrics({}, step=40) == 40
    assert tracker.history_length() == 6


def test_log_metrics_converts_numeric_types():
    tracker = ExperimentTracker()
    tracker.log_metrics(
        {
            "int": 3,
            "numpy": np.float32(0.5),
            "numpy_int": np.int64(7),
            "tensor": torch.tensor(0.25),
            "one_element": torch.tensor([1.5]),
            "array": np.array(2.0),
        },
        step=0,
    )
    last = tracker.last()
    for name, expected in [
        ("int", 3.0),
        ("numpy", 0.5),
        ("numpy_int", 7.0),
        ("tensor", 0.25),
        ("one_element", 1.5),
        ("array", 2.0),
    ]:
        assert last[name]["value"] == expected
        assert type(last[name]["value"]) is float


@pytest.mark.parametrize(
    "value, fragment",
    [
        (True, "bool"),
        ("0.5", "str"),
        (None, "NoneType"),
        (torch.tensor([1.0, 2.0]), "2 elements"),
        (np.array([1.0, 2.0, 3.0]), "3 elements"),
        (torch.tensor(True), "bool"),
        (np.bool_(False), "bool"),
    ],
)
def test_log_metrics_rejects_non_numbers(value, fragment):
    tracker = ExperimentTracker()
    tracker.log_metrics({"loss": 1.0}, step=0)
    with pytest.raises(SerializationError) as caught:
        tracker.log_metrics({"ok": 1.0, "bad_metric": value}, step=1)
    assert caught.value.key == "bad_metric"
    assert "bad_metric" in str(caught.value)
    assert fragment in str(caught.value)
    # Validation happens before anything is recorded.
    assert tracker.history_length() == 1
    assert tracker.metric_names == ["loss"]


@pytest.mark.parametrize("step", [-1, True, 1.0, "3"])
def test_log_metrics_rejects_invalid_step(step):
    tracker = ExperimentTracker()
    with pytest.raises(ConfigurationError, match="step"):
        tracker.log_metrics({"loss": 1.0}, step=step)
    assert tracker.history_length() == 0


def test_nan_and_inf_stored_but_never_best():
    tracker = ExperimentTracker()
    tracker.log_metrics({"loss": math.nan, "accuracy": math.inf}, step=0)
    tracker.log_metrics({"loss": 0.7, "accuracy": 0.4}, step=1)
    tracker.log_metrics({"loss": -math.inf, "accuracy": 0.9}, step=2)
    tracker.log_metrics({"loss": 0.9, "accuracy": 0.6, "diverged": math.nan}, step=3)

    assert math.isnan(tracker.history("loss")[0]["value"])
    assert tracker.last()["loss"]["value"] == 0.9
    best = tracker.best()
    assert best["loss"] == {"value": 0.7, "step": 1, "mode": "min"}
    assert best["accuracy"] == {"value": 0.9, "step": 2, "mode": "max"}
    assert "diverged" not in best
    assert math.isnan(tracker.last()["diverged"]["value"])


def test_best_tie_and_explicit_mode():
    tracker = ExperimentTracker()
    for step, value in enumerate([3.0, 1.0, 1.0, 2.0]):
        tracker.log_metrics({"perplexity": value, "margin": value}, step=step)
    tracker.set_metric_mode("margin", "max")

    assert tracker.best()["perplexity"] == {"value": 1.0, "step": 1, "mode": "min"}
    assert tracker.best()["margin"] == {"value": 3.0, "step": 0, "mode": "max"}
    with pytest.raises(ConfigurationError, match="'min' or 'max'"):
        tracker.set_metric_mode("margin", "largest")


@pytest.mark.parametrize(
    "name, mode",
    [
        ("eval_loss", "min"),
        ("train/loss", "min"),
        ("word_error_rate", "min"),
        ("perplexity", "min"),
        ("eval_accuracy", "max"),
        ("val_acc", "max"),
        ("valAcc", "max"),
        ("top1_acc", "max"),
        ("f1", "max"),
        ("macro_f1", "max"),
        ("precision@5", "max"),
        ("recall", "max"),
        ("roc_auc", "max"),
        ("bleu4", "max"),
        ("rougeLsum", "max"),
        ("mAP", "max"),
        ("map50", "max"),
        ("mean_iou", "max"),
        ("episode_reward", "max"),
        ("eval_score", "max"),
        ("heatmap_loss", "min"),
        ("accumulation_steps", "min"),
    ],
)
def test_metric_mode_guessed_from_name(name, mode):
    assert ExperimentTracker().metric_mode(name) == mode


def test_truncate_drops_later_records():
    tracker = ExperimentTracker()
    tracker.log_metrics({"loss": 1.0, "accuracy": 0.1})
    tracker.log_metrics({"loss": 0.8})
    mark = tracker.history_length()
    tracker.log_metrics({"loss": 0.1, "accuracy": 0.99})
    tracker.log_metrics({"loss": 0.05})

    tracker.truncate(mark)

    assert tracker.history_length() == 3
    assert [r["value"] for r in tracker.history("loss")] == [1.0, 0.8]
    assert tracker.best()["accuracy"]["value"] == 0.1
    assert tracker.log_metrics({"loss": 0.7}) == 2
    tracker.truncate(100)
    assert tracker.history_length() == 4
    tracker.truncate(0)
    assert tracker.metric_names == []
    assert tracker.log_metrics({"loss": 0.7}) == 0
    with pytest.raises(ConfigurationError):
        tracker.truncate(-1)


# --------------------------------------------------------------------------- hyperparameters


def test_hyperparameters_convert_and_merge(tmp_path):
    tracker = ExperimentTracker()
    tracker.track_hyperparameters(
        {
            "lr": np.float64(3e-4),
            "epochs": torch.tensor(3),
            "optimizer": {"name": "adamw", "betas": (0.9, 0.999)},
            "output_dir": tmp_path / "out",
            "precision": Precision.BF16,
            "tokenizer_name": "bert-base-uncased",
            "warmup": None,
        }
    )
    tracker.track_hyperparameters({"optimizer": {"weight_decay": 0.01}, "epochs": 5})

    hyperparameters = tracker.hyperparameters
    assert hyperparameters["lr"] == 3e-4
    assert type(hyperparameters["lr"]) is float
    assert hyperparameters["epochs"] == 5
    assert hyperparameters["optimizer"] == {
        "name": "adamw",
        "betas": [0.9, 0.999],
        "weight_decay": 0.01,
    }
    assert hyperparameters["output_dir"] == str(tmp_path / "out")
    assert hyperparameters["precision"] == "bf16"
    assert hyperparameters["tokenizer_name"] == "bert-base-uncased"
    assert hyperparameters["warmup"] is None
    # The property returns a copy.
    hyperparameters["optimizer"]["name"] = "sgd"
    assert tracker.hyperparameters["optimizer"]["name"] == "adamw"


def test_redaction_by_key_name_at_any_depth():
    tracker = ExperimentTracker()
    tracker.track_hyperparameters(
        {
            "hub_token": "abc",
            "HF_TOKEN": "abc",
            "database": {"Password": "pw", "host": "db.local", "nested": [{"api_key": 1}]},
            "aws_secret_access_key": object(),
            "private_key_path": "/keys/id_rsa",
            "credentials": {"user": "x"},
            "batch_size": 8,
        }
    )
    hyperparameters = tracker.hyperparameters
    assert hyperparameters["hub_token"] == REDACTED
    assert hyperparameters["HF_TOKEN"] == REDACTED
    assert hyperparameters["database"]["Password"] == REDACTED
    assert hyperparameters["database"]["host"] == "db.local"
    assert hyperparameters["database"]["nested"] == [{"api_key": REDACTED}]
    assert hyperparameters["aws_secret_access_key"] == REDACTED
    assert hyperparameters["private_key_path"] == REDACTED
    assert hyperparameters["credentials"] == REDACTED
    assert hyperparameters["batch_size"] == 8


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("hub_token", True),
        ("HF_TOKEN", True),
        ("hubToken", True),
        ("token", True),
        ("db_password", True),
        ("openai_api_key", True),
        ("client_secret", True),
        ("pad_token_id", False),
        ("eos_token_id", False),
        ("max_tokens", False),
        ("average_tokens_across_devices", False),
        ("tokenizer_name", False),
    ],
)
def test_secret_key_names(key, secret):
    tracker = ExperimentTracker()
    tracker.track_hyperparameters({key: "value"})

    assert (tracker.hyperparameters[key] == REDACTED) is secret


def test_redaction_by_secret_value():
    tracker = ExperimentTracker(secrets=[SECRET, None, ""])
    tracker.track_hyperparameters(
        {
            "auth_header": f"Bearer {SECRET}",
            "urls": ["https://example.com", f"https://x:{SECRET}@example.com"],
            "model": "gpt2",
        }
    )
    later_secret = "later-secret-value"
    tracker.track_hyperparameters({"remote": f"ssh://{later_secret}@host"})
    tracker.add_secret(later_secret)

    hyperparameters = tracker.hyperparameters
    assert hyperparameters["auth_header"] == REDACTED
    assert hyperparameters["urls"] == ["https://example.com", REDACTED]
    assert hyperparameters["model"] == "gpt2"
    assert hyperparameters["remote"] == REDACTED
    assert SECRET not in json.dumps(tracker.to_dict())
    assert later_secret not in json.dumps(tracker.to_dict())


@pytest.mark.parametrize(
    "hyperparameters, key, type_name",
    [
        ({"optimizer": {"betas": (0.9, {1, 2})}}, "optimizer.betas[1]", "set"),
        ({"layers": [1, 2, torch.zeros(3)]}, "layers[2]", "torch.Tensor"),
        ({"weights": np.ones(2)}, "weights", "numpy.ndarray"),
        ({"fn": len}, "fn", "builtin_function_or_method"),
        ({"nested": {3: "x"}}, "nested.3", "int"),
        ({"scale": 1 + 2j}, "scale", "complex"),
    ],
)
def test_bad_hyperparameter_changes_nothing(hyperparameters, key, type_name):
    tracker = ExperimentTracker()
    tracker.track_hyperparameters({"lr": 0.1, "optimizer": {"name": "sgd"}})
    before = tracker.hyperparameters

    with pytest.raises(SerializationError) as caught:
        tracker.track_hyperparameters({"lr": 0.5, "new": 1, **hyperparameters})

    assert caught.value.key == key
    assert repr(key) in str(caught.value)
    assert type_name in str(caught.value)
    assert "str" in str(caught.value)
    assert tracker.hyperparameters == before


def test_self_referencing_hyperparameters_rejected():
    looped: dict = {"a": 1}
    looped["self"] = looped
    tracker = ExperimentTracker()
    with pytest.raises(SerializationError) as caught:
        tracker.track_hyperparameters({"config": looped})
    assert caught.value.key == "config.self"
    assert tracker.hyperparameters == {}


# --------------------------------------------------------------------------- serialization


def test_round_trip_through_metadata_file(tmp_path):
    tracker = ExperimentTracker(secrets=[SECRET])
    tracker.track_hyperparameters({"lr": 0.001, "hub_token": SECRET, "schedule": [1, 2]})
    tracker.set_metric_mode("margin", "max")
    tracker.log_metrics({"loss": 1.0, "margin": 0.1})
    tracker.log_metrics({"loss": math.nan, "margin": math.inf})
    tracker.log_metrics({"loss": -math.inf, "accuracy": 0.5})
    tracker.log_metrics({"loss": 0.5})
    checkpoint = {
        "name": "checkpoint-step-3",
        "path": str(tmp_path / "checkpoint-step-3"),
        "sequence": 1,
        "step": 3,
        "epoch": 0,
        "metrics": {"loss": 0.5, "grad_norm": math.nan},
        "timestamp": 1.0,
    }

    metadata = _metadata_for(tracker, checkpoints=[checkpoint])
    written = write_metadata(tmp_path / "run" / "metadata.json", metadata)

    assert written == str((tmp_path / "run" / "metadata.json").resolve())
    text = Path(written).read_text(encoding="utf-8")
    assert SECRET not in text
    # Strict JSON: no bare NaN or Infinity literals.
    json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    loaded = read_metadata(written)
    assert loaded["format"] == METADATA_FORMAT
    assert loaded["format_version"] == 1
    assert math.isnan(loaded["checkpoints"][0]["metrics"]["grad_norm"])
    assert loaded["last_metrics"]["loss"]["value"] == 0.5
    assert loaded["best_metrics"]["loss"] == {"value": 0.5, "step": 3, "mode": "min"}

    restored = ExperimentTracker.from_dict(loaded, secrets=[SECRET])
    assert restored.hyperparameters == tracker.hyperparameters
    assert restored.hyperparameters["hub_token"] == REDACTED
    assert restored.metric_mode("margin") == "max"
    assert restored.history_length() == tracker.history_length()
    original_history = tracker.history()
    restored_history = restored.history()
    for original, record in zip(original_history, restored_history, strict=True):
        assert record["name"] == original["name"]
        assert record["step"] == original["step"]
        assert record["timestamp"] == original["timestamp"]
        if math.isnan(original["value"]):
            assert math.isnan(record["value"])
        else:
            assert record["value"] == original["value"]
    assert restored.best() == tracker.best()
    assert restored.log_metrics({"loss": 0.4}) == 4


def test_to_dict_round_trip_after_truncate():
    tracker = ExperimentTracker()
    tracker.log_metrics({"loss": 1.0, "accuracy": 0.2})
    mark = tracker.history_length()
    tracker.log_metrics({"accuracy": 0.3, "loss": 0.9})

    data = json.loads(json.dumps(tracker.to_dict()))
    restored = ExperimentTracker.from_dict(data)
    restored.truncate(mark)

    assert [r["name"] for r in restored.history()] == ["loss", "accuracy"]
    assert restored.log_metrics({"loss": 0.95}) == 1


def test_from_dict_rejects_malformed_data():
    with pytest.raises(ConfigurationError, match="metrics_history"):
        ExperimentTracker.from_dict({"metrics_history": {"loss": [{"step": -1, "value": 1.0}]}})
    with pytest.raises(ConfigurationError, match="metrics_history"):
        ExperimentTracker.from_dict({"metrics_history": {"loss": [{"step": 1, "value": "x"}]}})
    with pytest.raises(ConfigurationError, match="mapping"):
        ExperimentTracker.from_dict([1, 2])


def test_read_metadata_rejects_other_files(tmp_path):
    cases = {
        "not_json.json": "{not json",
        "other_format.json": json.dumps({"format": "something-else", "format_version": 1}),
        "array.json": "[1, 2]",
        "newer.json": json.dumps({"format": METADATA_FORMAT, "format_version": 99}),
        "bad_history.json": json.dumps(
            {"format": METADATA_FORMAT, "format_version": 1, "metrics_history": []}
        ),
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_text(content, encoding="utf-8")
        with pytest.raises(ConfigurationError) as caught:
            read_metadata(path)
        assert str(path) in str(caught.value), name
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path / "missing.json")


def test_write_metadata_names_unserializable_key(tmp_path):
    tracker = ExperimentTracker()
    metadata = _metadata_for(tracker, final_model={"path": "/m", "format": "safetensors", "x": {1}})
    with pytest.raises(SerializationError) as caught:
        write_metadata(tmp_path / "metadata.json", metadata)
    assert caught.value.key == "final_model.x"
    assert not (tmp_path / "metadata.json").exists()


def test_build_metadata_redacts_secret_everywhere(tmp_path):
    tracker = ExperimentTracker(secrets=[SECRET])
    tracker.log_metrics({"loss": 1.0})
    metadata = _metadata_for(
        tracker,
        run={"repo_id": "user/model", "remote": f"https://user:{SECRET}@hub"},
        checkpoints=[{"name": "c", "sequence": 0, "note": SECRET}],
        final_model={"path": f"/tmp/{SECRET}", "format": "safetensors"},
    )
    assert SECRET not in json.dumps(metadata)
    assert metadata["run"]["remote"] == REDACTED
    assert metadata["run"]["repo_id"] == "user/model"
    assert metadata["metrics_history"]["loss"][0]["value"] == 1.0
    assert metadata["updated_at"].endswith("+00:00")


# --------------------------------------------------------------------------- environment


def _git(repo: Path, *arguments: str) -> None:
    subprocess.run(
        [
            "git",
            "-c",
            "user.name=Test",
            "-c",
            "user.email=test@example.com",
            "-c",
            "commit.gpgsign=false",
            *arguments,
        ],
        cwd=repo,
        check=True,
        capture_output=True,
    )


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_collect_environment_in_git_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "train.py").write_text("print('v1')\n", encoding="utf-8")
    _git(repo, "add", "train.py")
    _git(repo, "commit", "-q", "-m", "Add training script")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()

    clean = collect_environment(repo)
    assert clean["git"] == {"commit": head, "dirty": False}

    (repo / "outputs.log").write_text("untracked\n", encoding="utf-8")
    assert collect_environment(repo)["git"]["dirty"] is False

    (repo / "train.py").write_text("print('v2')\n", encoding="utf-8")
    assert collect_environment(repo)["git"] == {"commit": head, "dirty": True}


def test_collect_environment_outside_git_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    folder = tmp_path / "plain"
    folder.mkdir()

    environment = collect_environment(folder)

    assert environment["git"] is None
    assert environment["python_version"].count(".") == 2
    assert environment["python_implementation"]
    assert environment["platform"]
    assert environment["packages"]["torch"] == torch.__version__
    assert environment["packages"]["numpy"] == np.__version__
    assert set(environment["packages"]) == {
        "hf_lifecycle",
        "torch",
        "transformers",
        "huggingface_hub",
        "safetensors",
        "numpy",
    }
    cuda = environment["cuda"]
    assert cuda["available"] == torch.cuda.is_available()
    assert cuda["version"] == torch.version.cuda
    assert cuda["device_count"] == len(cuda["devices"])
    json.dumps(environment)


def test_environment_omits_host_and_user(tmp_path, monkeypatch):
    import getpass
    import socket

    monkeypatch.setenv("HF_LIFECYCLE_TEST_MARKER", "env-marker-value")
    text = json.dumps(collect_environment(tmp_path))
    assert "env-marker-value" not in text
    assert f'"{socket.gethostname()}"' not in text
    assert f'"{getpass.getuser()}"' not in text


# --------------------------------------------------------------------------- summary and plot


def test_summary_shows_values_not_secret():
    tracker = ExperimentTracker(secrets=[SECRET])
    tracker.track_hyperparameters(
        {"lr": 0.001, "hub_token": SECRET, "optimizer": {"betas": [0.9, 0.99]}, "note": SECRET}
    )
    tracker.log_metrics({"eval_loss": 0.9, "eval_accuracy": 0.6}, step=100)
    tracker.log_metrics({"eval_loss": 0.5, "eval_accuracy": 0.8}, step=200)
    tracker.log_metrics({"eval_loss": 0.7, "eval_accuracy": 0.7, "bad": math.nan}, step=300)
    checkpoints = [
        {
            "name": "checkpoint-step-200",
            "sequence": 1,
            "step": 200,
            "epoch": 1,
            "metrics": {"eval_loss": 0.5},
        },
        {
            "name": "checkpoint-step-300",
            "sequence": 2,
            "step": 300,
            "epoch": 2,
            "metrics": {"eval_loss": 0.7},
        },
    ]
    run = {
        "repo_id": "user/model",
        "local_dir": "/runs/a",
        "checkpoint_dir": "/runs/a/ckpt",
        "remote": f"https://{SECRET}@hub",
    }
    summary = format_summary(
        tracker,
        run=run,
        checkpoints=checkpoints,
        final_model={"path": "/runs/a/final", "format": "safetensors"},
    )

    assert SECRET not in summary
    assert "user/model" in summary
    assert "/runs/a/ckpt" in summary
    assert "lr: 0.001" in summary
    assert f"hub_token: {REDACTED}" in summary
    assert "optimizer.betas: [0.9, 0.99]" in summary
    assert "eval_loss: last 0.7 at step 300, best 0.5 at step 200 (min)" in summary
    assert "eval_accuracy: last 0.7 at step 300, best 0.8 at step 200 (max)" in summary
    assert "bad: last nan at step 300, best none" in summary
    assert summary.index("checkpoint-step-300") < summary.index("checkpoint-step-200")
    assert "checkpoint-step-300  step 300  epoch 2  eval_loss=0.7" in summary
    assert "path: /runs/a/final" in summary
    assert "format: safetensors" in summary


def test_format_summary_without_final_model():
    summary = format_summary(ExperimentTracker(), run={}, checkpoints=[], final_model=None)
    final_section = summary.split("Final model")[1]
    assert final_section.strip() == "none"
    assert "repo_id: none" in summary


def test_plot_writes_png(tmp_path):
    tracker = ExperimentTracker()
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "accuracy": step / 5})
    tracker.log_metrics({"loss": math.nan, "accuracy": math.inf})

    path = tracker.plot(tmp_path / "plots" / "metrics.png")

    assert path == str((tmp_path / "plots" / "metrics.png").resolve())
    assert Path(path).read_bytes()[:8] == PNG_SIGNATURE
    only_loss = tracker.plot(tmp_path / "loss.png", names=["loss"])
    assert Path(only_loss).read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ConfigurationError, match="never logged"):
        tracker.plot(tmp_path / "x.png", names=["missing"])


def test_plot_without_metrics_returns_none(tmp_path, caplog):
    caplog.set_level("INFO", logger="hf_lifecycle.tracking")
    assert ExperimentTracker().plot(tmp_path / "empty.png") is None
    assert not (tmp_path / "empty.png").exists()
    assert "No metrics" in caplog.text


@pytest.mark.parametrize("name", ["lr", "learning_rate", "epoch", "train_runtime",
                                  "train_samples_per_second", "grad_norm", "total_flos"])
def test_best_skips_unranked_quantity(name):
    tracker = ExperimentTracker()
    tracker.log_metrics({name: 1.0, "loss": 1.0}, step=1)
    tracker.log_metrics({name: 0.5, "loss": 0.5}, step=2)

    assert name not in tracker.best()
    assert tracker.best()["loss"]["value"] == 0.5


def test_best_ranks_unranked_with_mode():
    tracker = ExperimentTracker()
    tracker.set_metric_mode("lr", "max")
    tracker.log_metrics({"lr": 1.0}, step=1)
    tracker.log_metrics({"lr": 0.5}, step=2)

    assert tracker.best()["lr"]["value"] == 1.0

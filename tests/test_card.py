"""Tests for the model card and the metric plot written beside it."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from hf_lifecycle.errors import ConfigurationError
from hf_lifecycle.hub.card import build_model_card, write_card_files
from hf_lifecycle.tracking import (
    REDACTED,
    ExperimentTracker,
    build_metadata,
    read_metadata,
    write_metadata,
)

REPO_ID = "alice/digits-mlp"
TOKEN = "hf_cardTestSECRET0123456789"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)
CODE_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)

ENVIRONMENT = {
    "python_version": "3.11.7",
    "python_implementation": "CPython",
    "platform": "Linux-6.1-x86_64-with-glibc2.36",
    "machine": "x86_64",
    "packages": {
        "hf_lifecycle": "0.1.0",
        "torch": "2.13.0",
        "transformers": "5.25.0",
        "huggingface_hub": "2.4.0",
        "safetensors": "0.8.0",
        "numpy": "2.1.0",
    },
    "cuda": {
        "available": True,
        "version": "12.8",
        "device_count": 2,
        "devices": ["NVIDIA H200", "NVIDIA H200"],
    },
    "git": {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": True},
}

CHECKPOINTS = [
    {
        "name": "checkpoint-step-20",
        "path": "/home/alice/run/checkpoints/checkpoint-step-20",
        "sequence": 3,
        "step": 20,
        "epoch": 2,
        "metrics": {"loss": 0.5},
        "timestamp": 1.0,
    },
    {
        "name": "checkpoint-step-40",
        "path": "/home/alice/run/checkpoints/checkpoint-step-40",
        "sequence": 5,
        "step": 40,
        "epoch": 4,
        "metrics": {"loss": 0.2, "accuracy": 0.9},
        "timestamp": 2.0,
    },
]


def _tracker() -> ExperimentTracker:
    tracker = ExperimentTracker(secrets=[TOKEN])
    tracker.track_hyperparameters(
        {
            "learning_rate": 0.001,
            "batch_size": 32,
            "dataset": "digits",
            "hub_token": TOKEN,
            "push_url": f"https://alice:{TOKEN}@example.invalid/repo",
            "columns": "pixels|label",
            "optimizer": {"name": "AdamW", "betas": [0.9, 0.999]},
        }
    )
    losses = [2.0, 1.0, 0.5, 0.3, 0.2]
    accuracies = [0.5, 0.6, 0.7, 0.85, 0.9]
    for index, (loss, accuracy) in enumerate(zip(losses, accuracies)):
        tracker.log_metrics({"loss": loss, "accuracy": accuracy}, step=index * 10)
    tracker.log_metrics({"loss": math.nan, "grad_norm": math.inf}, step=50)
    tracker.log_metrics({"grad_norm": math.nan}, step=60)
    return tracker


def _final_model(folder: Path, *, config: dict | None = None, format: str = "safetensors") -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    weights = "model.safetensors" if format == "safetensors" else "pytorch_model.bin"
    (folder / weights).write_bytes(b"not read by the card")
    files = [weights]
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
        files.append("config.json")
    return {"name": folder.name, "path": str(folder), "format": format, "files": sorted(files)}


def _metadata(tracker: ExperimentTracker, final_model: dict | None = None) -> dict:
    return build_metadata(
        tracker,
        checkpoints=CHECKPOINTS,
        final_model=final_model,
        run={"repo_id": REPO_ID, "local_dir": "/home/alice/run"},
        environment=ENVIRONMENT,
    )


def _front_matter(text: str) -> dict:
    match = FRONT_MATTER.match(text)
    assert match is not None, text[:200]
    return yaml.safe_load(match.group(1))


def _model_index_values(front_matter: dict) -> dict[str, float]:
    results = front_matter["model-index"][0]["results"]
    return {metric["type"]: metric["value"] for result in results for metric in result["metrics"]}


def _tables(text: str) -> list[list[str]]:
    """Return each Markdown table in ``text`` as its list of row lines."""
    tables: list[list[str]] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def _row_cells(line: str) -> list[str]:
    """Split a table row as the markdown-rs table grammar does.

    A backslash escapes a following backslash or pipe, so only a pipe after an odd run of
    backslashes stays inside the cell.
    """
    cells: list[str] = []
    current = ""
    index = 0
    while index < len(line):
        pair = line[index : index + 2]
        if pair in ("\\\\", "\\|"):
            current += pair
            index += 2
            continue
        if line[index] == "|":
            cells.append(current)
            current = ""
        else:
            current += line[index]
        index += 1
    cells.append(current)
    return [cell.strip() for cell in cells[1:-1]]


def _row(text: str, first_cell: str) -> list[str]:
    for table in _tables(text):
        for line in table:
            cells = _row_cells(line)
            if cells and cells[0] == first_cell:
                return cells
    raise AssertionError(f"no table row starts with {first_cell!r}")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Write the card files once per module, because each plot takes a few tenths of a second."""
    tmp_path = tmp_path_factory.mktemp("written")
    tracker = _tracker()
    final_model = _final_model(tmp_path / "final_model")
    metadata = _metadata(tracker, final_model)
    out = tmp_path / "card"
    paths = write_card_files(out, metadata, repo_id=REPO_ID, tracker=tracker)
    return {
        "paths": paths,
        "folder": out,
        "text": (out / "README.md").read_text(encoding="utf-8"),
        "metadata": metadata,
        "tracker": tracker,
    }


# --------------------------------------------------------------------------- files and front matter


def test_write_card_files_returns_paths(written):
    assert written["paths"] == ["README.md", "metrics.png"]
    assert sorted(path.name for path in written["folder"].iterdir()) == ["README.md", "metrics.png"]


def test_plot_is_png(written):
    data = (written["folder"] / "metrics.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert "![metrics](metrics.png)" in written["text"]


def test_front_matter_parses(written):
    front_matter = _front_matter(written["text"])
    assert front_matter["library_name"] == "pytorch"
    assert front_matter["tags"][:2] == ["hf-lifecycle", "pytorch"]
    assert "safetensors" in front_matter["tags"]
    assert front_matter["model-index"][0]["name"] == "digits-mlp"

    card_data = ModelCard(written["text"]).data.to_dict()
    assert card_data["library_name"] == "pytorch"
    assert card_data["model-index"] == front_matter["model-index"]


def test_model_index_equals_best_metrics(written):
    best = written["tracker"].best()
    values = _model_index_values(_front_matter(written["text"]))
    assert values == {"loss": best["loss"]["value"], "accuracy": best["accuracy"]["value"]}
    assert values["loss"] == 0.2
    assert values["accuracy"] == 0.9

    eval_results = ModelCard(written["text"]).data.eval_results
    assert {result.metric_type: result.metric_value for result in eval_results} == values


def test_model_index_skips_nan_metric(written):
    values = _model_index_values(_front_matter(written["text"]))
    assert "grad_norm" not in values
    assert all(math.isfinite(value) for value in values.values())


def test_model_index_dataset_from_hyperparameters(written):
    result = _front_matter(written["text"])["model-index"][0]["results"][0]
    assert result["dataset"] == {"name": "digits", "type": "digits"}
    assert result["task"] == {"type": "other"}


def test_model_index_dataset_defaults_to_custom():
    tracker = ExperimentTracker()
    tracker.log_metrics({"loss": 1.0}, step=0)
    card = build_model_card(_metadata(tracker), repo_id=REPO_ID)
    result = _front_matter(str(card))["model-index"][0]["results"][0]
    assert result["dataset"] == {"name": "custom", "type": "custom"}


# --------------------------------------------------------------------------- body


def test_metrics_table_values(written):
    assert _row(written["text"], "`loss`") == ["`loss`", "NaN", "50", "0.2", "40", "min"]
    assert _row(written["text"], "`accuracy`") == ["`accuracy`", "0.9", "40", "0.9", "40", "max"]
    assert _row(written["text"], "`grad_norm`") == ["`grad_norm`", "NaN", "60", "—", "—", "min"]


def test_hyperparameters_table_values(written):
    text = written["text"]
    assert _row(text, "`learning_rate`") == ["`learning_rate`", "`0.001`"]
    assert _row(text, "`batch_size`") == ["`batch_size`", "`32`"]
    assert _row(text, "`optimizer.name`") == ["`optimizer.name`", "`AdamW`"]
    assert _row(text, "`optimizer.betas`") == ["`optimizer.betas`", "`[0.9, 0.999]`"]


def test_secret_only_redacted(written):
    text = written["text"]
    assert TOKEN not in text
    assert _row(text, "`hub_token`") == ["`hub_token`", f"`{REDACTED}`"]
    assert _row(text, "`push_url`") == ["`push_url`", f"`{REDACTED}`"]


def test_hand_built_secret_key_redacted():
    metadata = {"hyperparameters": {"wandb": {"api_key": "abc123plain"}, "epochs": 3}}
    text = str(build_model_card(metadata, repo_id=REPO_ID))
    assert "abc123plain" not in text
    assert _row(text, "`wandb.api_key`") == ["`wandb.api_key`", f"`{REDACTED}`"]
    assert _row(text, "`epochs`") == ["`epochs`", "`3`"]


def test_pipe_in_value_keeps_columns(written):
    text = written["text"]
    assert _row(text, "`columns`") == ["`columns`", "`pixels\\|label`"]
    tables = _tables(text)
    assert len(tables) == 4
    for table in tables:
        header_count = len(_row_cells(table[0]))
        for line in table:
            assert len(_row_cells(line)) == header_count, line


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ("a|b", "`a\\|b`"),
        ("a\\|b", "`a\\|b`"),
        ("a\\\\|b", "`a\\\\\\|b`"),
        ("||", "`\\|\\|`"),
    ],
)
def test_pipe_after_backslashes_in_cell(value, cell):
    text = str(build_model_card({"hyperparameters": {"path": value, "k": 1}}, repo_id=REPO_ID))
    assert _row(text, "`path`") == ["`path`", cell]
    assert _row(text, "`k`") == ["`k`", "`1`"]


def test_line_break_in_value_stays_in_row():
    metadata = {"hyperparameters": {"prompt": "first line\nsecond | line"}}
    text = str(build_model_card(metadata, repo_id=REPO_ID))
    assert _row(text, "`prompt`") == ["`prompt`", "`first line\\nsecond \\| line`"]


def test_checkpoints_newest_first(written):
    table = next(table for table in _tables(written["text"]) if "Checkpoint" in table[0])
    names = [_row_cells(line)[0] for line in table[2:]]
    assert names == ["`checkpoint-step-40`", "`checkpoint-step-20`"]
    assert _row_cells(table[2]) == [
        "`checkpoint-step-40`",
        "40",
        "4",
        "`loss=0.2`, `accuracy=0.9`",
    ]
    assert "/home/alice" not in written["text"]


def test_environment_section(written):
    text = written["text"]
    assert _row(text, "Python") == ["Python", "3.11.7 (CPython)"]
    assert _row(text, "PyTorch") == ["PyTorch", "2.13.0"]
    assert _row(text, "Transformers") == ["Transformers", "5.25.0"]
    assert _row(text, "huggingface_hub") == ["huggingface_hub", "2.4.0"]
    assert _row(text, "Platform") == ["Platform", "Linux-6.1-x86_64-with-glibc2.36"]
    assert _row(text, "CUDA devices") == ["CUDA devices", "CUDA 12.8: NVIDIA H200, NVIDIA H200"]
    assert _row(text, "Git commit") == [
        "Git commit",
        "`0123456789abcdef0123456789abcdef01234567` with uncommitted changes",
    ]


def test_description_opens_body():
    metadata = _metadata(_tracker())
    card = build_model_card(metadata, repo_id=REPO_ID, description="An MLP for 8x8 digits.")
    assert "# digits-mlp\n\nAn MLP for 8x8 digits.\n" in card.text


def test_code_snippets_compile(written):
    blocks = CODE_BLOCK.findall(written["text"])
    assert len(blocks) == 2
    for block in blocks:
        compile(block, "<card snippet>", "exec")


def test_how_to_load_plain_weights(written):
    text = written["text"]
    assert 'hf_hub_download("alice/digits-mlp", "model.safetensors")' in text
    assert "load_model_weights(model, path)" in text
    assert "safetensors.torch.load_file" in text
    assert 'HFManager(repo_id="alice/digits-mlp")' in text
    assert "manager.load_latest_checkpoint(model, optimizer)" in text
    assert "AutoModel" not in text


def test_how_to_load_pt_weights(tmp_path):
    final_model = _final_model(tmp_path / "final_model", format="pt")
    text = str(build_model_card(_metadata(_tracker(), final_model), repo_id=REPO_ID))
    assert 'hf_hub_download("alice/digits-mlp", "pytorch_model.bin")' in text
    assert "torch.load(path, weights_only=True)" in text
    assert "safetensors" not in _front_matter(text)["tags"]


def test_how_to_load_without_final_model():
    text = str(build_model_card(_metadata(_tracker()), repo_id=REPO_ID))
    assert "This run saved no final model." in text
    assert "hf_hub_download" not in text
    assert "load_latest_checkpoint" in text


# --------------------------------------------------------------------------- library name


def test_library_name_transformers_config(tmp_path):
    config = {"model_type": "bert", "architectures": ["BertForSequenceClassification"]}
    final_model = _final_model(tmp_path / "final_model", config=config)
    paths = write_card_files(
        tmp_path / "card", _metadata(_tracker(), final_model), repo_id=REPO_ID
    )
    assert paths == ["README.md", "metrics.png"]
    text = (tmp_path / "card" / "README.md").read_text(encoding="utf-8")
    front_matter = _front_matter(text)
    assert front_matter["library_name"] == "transformers"
    expected_tags = ["hf-lifecycle", "pytorch", "transformers", "bert", "safetensors"]
    assert front_matter["tags"] == expected_tags
    assert 'AutoModel.from_pretrained("alice/digits-mlp")' in text
    assert "`BertForSequenceClassification`" in text
    assert "hf_hub_download" not in text


def test_library_name_architectures_only(tmp_path):
    final_model = _final_model(tmp_path / "final_model", config={"architectures": ["TinyNet"]})
    card = build_model_card(_metadata(_tracker()), repo_id=REPO_ID, final_model=final_model)
    assert card.data.library_name == "transformers"


def test_library_name_plain_config_is_pytorch(tmp_path):
    final_model = _final_model(tmp_path / "final_model", config={"hidden_size": 16})
    card = build_model_card(_metadata(_tracker()), repo_id=REPO_ID, final_model=final_model)
    assert card.data.library_name == "pytorch"
    assert "transformers" not in card.data.tags


def test_final_model_argument_overrides_metadata(tmp_path):
    plain = _final_model(tmp_path / "plain")
    transformers_model = _final_model(tmp_path / "hf", config={"model_type": "gpt2"})
    metadata = _metadata(_tracker(), plain)
    card = build_model_card(metadata, repo_id=REPO_ID, final_model=transformers_model)
    assert card.data.library_name == "transformers"


def test_config_mapping_in_final_model():
    final_model = {"format": "safetensors", "config": {"model_type": "llama"}}
    card = build_model_card({}, repo_id=REPO_ID, final_model=final_model)
    assert card.data.library_name == "transformers"
    assert "llama" in card.data.tags


# --------------------------------------------------------------------------- plot and determinism


def test_plot_from_metadata_without_tracker(tmp_path):
    metadata = _metadata(_tracker())
    paths = write_card_files(tmp_path / "card", metadata, repo_id=REPO_ID)
    assert paths == ["README.md", "metrics.png"]
    assert (tmp_path / "card" / "metrics.png").read_bytes().startswith(PNG_SIGNATURE)


def test_no_plot_without_metrics(tmp_path):
    tracker = ExperimentTracker()
    tracker.track_hyperparameters({"epochs": 1})
    paths = write_card_files(tmp_path / "card", _metadata(tracker), repo_id=REPO_ID)
    text = (tmp_path / "card" / "README.md").read_text(encoding="utf-8")
    assert paths == ["README.md"]
    assert not (tmp_path / "card" / "metrics.png").exists()
    assert "![metrics]" not in text
    assert "No metrics were logged." in text
    assert "model-index" not in _front_matter(text)


def test_no_plot_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    paths = write_card_files(tmp_path / "card", _metadata(_tracker()), repo_id=REPO_ID)
    text = (tmp_path / "card" / "README.md").read_text(encoding="utf-8")
    assert paths == ["README.md"]
    assert not (tmp_path / "card" / "metrics.png").exists()
    assert "![metrics]" not in text
    assert _model_index_values(_front_matter(text))["loss"] == 0.2


def test_plot_path_none_omits_image():
    card = build_model_card(_metadata(_tracker()), repo_id=REPO_ID, plot_path=None)
    assert "![metrics]" not in card.text


def test_checkpoints_without_sequence_keep_order():
    checkpoints = [{"name": "first", "step": 1}, {"name": "second", "step": 2}]
    text = str(build_model_card({"checkpoints": checkpoints}, repo_id=REPO_ID))
    table = next(table for table in _tables(text) if "Checkpoint" in table[0])
    assert [_row_cells(line)[0] for line in table[2:]] == ["`first`", "`second`"]
    assert _row_cells(table[2]) == ["`first`", "1", "—", "—"]


def test_card_is_deterministic(tmp_path):
    metadata = _metadata(_tracker(), _final_model(tmp_path / "final_model"))
    first = str(build_model_card(metadata, repo_id=REPO_ID))
    second = str(build_model_card(metadata, repo_id=REPO_ID))
    assert first == second
    assert metadata["updated_at"] not in first


def test_card_from_metadata_file(tmp_path):
    tracker = _tracker()
    path = write_metadata(tmp_path / "metadata.json", _metadata(tracker))
    from_file = read_metadata(path)
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    expected = str(build_model_card(_metadata(tracker), repo_id=REPO_ID))
    assert str(build_model_card(from_file, repo_id=REPO_ID)) == expected
    # Without read_metadata, NaN arrives as the string "NaN", and the card reads it as NaN.
    assert str(build_model_card(raw, repo_id=REPO_ID)) == expected


# --------------------------------------------------------------------------- invalid input


@pytest.mark.parametrize("repo_id", [None, "", "a/b/c", "bad repo", "x--y"])
def test_invalid_repo_id_rejected(repo_id):
    with pytest.raises(ConfigurationError, match="repo_id"):
        build_model_card({}, repo_id=repo_id)


def test_invalid_repo_id_writes_nothing(tmp_path):
    with pytest.raises(ConfigurationError):
        write_card_files(tmp_path / "card", _metadata(_tracker()), repo_id="a/b/c")
    assert not (tmp_path / "card").exists()


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        (["not", "a", "mapping"], "metadata must be a mapping"),
        ({"hyperparameters": [1, 2]}, "'hyperparameters' must be a mapping"),
        ({"checkpoints": {"a": 1}}, "'checkpoints' must be a list"),
        ({"checkpoints": ["checkpoint-step-10"]}, r"checkpoints\[0\] must be a mapping"),
        ({"best_metrics": {"loss": 0.5}}, r"best_metrics\['loss'\] must be a mapping"),
    ],
)
def test_malformed_metadata_rejected(metadata, match):
    with pytest.raises(ConfigurationError, match=match):
        build_model_card(metadata, repo_id=REPO_ID)


def test_model_index_skips_nonfinite_values():
    metadata = {
        "best_metrics": {
            "loss": {"value": 0.25, "step": 3, "mode": "min"},
            "reward": {"value": "Infinity", "step": 4, "mode": "max"},
            "error": {"value": math.nan, "step": 5, "mode": "min"},
            "label": {"value": "n/a", "step": 6, "mode": "min"},
        }
    }
    card = build_model_card(metadata, repo_id=REPO_ID)
    assert _model_index_values(_front_matter(str(card))) == {"loss": 0.25}


def test_invalid_final_model_rejected():
    with pytest.raises(ConfigurationError, match="final_model must be a mapping"):
        build_model_card({}, repo_id=REPO_ID, final_model="model.safetensors")

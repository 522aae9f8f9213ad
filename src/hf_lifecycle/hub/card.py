"""The model card (the Hub repository's ``README.md``) and the metric plot shown in it.

:func:`build_model_card` turns the metadata document of a run, as built by
:func:`hf_lifecycle.tracking.build_metadata` or read by
:func:`hf_lifecycle.tracking.read_metadata`, into a :class:`huggingface_hub.ModelCard`.
The YAML front matter carries ``library_name``, ``tags`` and a ``model-index`` with the best
value of each metric. The body lists the hyperparameters, the metrics, the kept checkpoints
and the environment, and shows how to load the weights. :func:`write_card_files` writes the
card and ``metrics.png`` into a folder that is then uploaded as it is.

The card depends only on its arguments and on the final model's ``config.json``. It
contains no clock reading, and building it never calls the Hub. Checkpoint and final model
paths on the training machine are left out of it.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hf_lifecycle._io import atomic_write_text, json_safe, metric_value
from hf_lifecycle.errors import ConfigurationError
from hf_lifecycle.final_model import PT_WEIGHTS, SAFETENSORS_WEIGHTS
from hf_lifecycle.tracking import REDACTED, ExperimentTracker, _is_secret_key

__all__ = [
    "BASE_TAGS",
    "CARD_FILENAME",
    "DEFAULT_DATASET",
    "DEFAULT_TASK_TYPE",
    "PLOT_FILENAME",
    "build_model_card",
    "write_card_files",
]

logger = logging.getLogger(__name__)

CARD_FILENAME = "README.md"
PLOT_FILENAME = "metrics.png"
BASE_TAGS = ("hf-lifecycle", "pytorch")
# The metrics come from an arbitrary training loop, which matches no single Hub task id.
DEFAULT_TASK_TYPE = "other"
DEFAULT_DATASET = "custom"

_EMPTY_CELL = "—"
_DEFAULT_DESCRIPTION = "A PyTorch model trained and uploaded with hf-lifecycle."

# Every placeholder is filled by str.format, so the template itself contains no other braces.
_CARD_TEMPLATE = """\
---
{front_matter}
---

# {title}

{description}

## Training hyperparameters

{hyperparameters}

## Metrics

{metrics}

## Checkpoints

{checkpoints}

## Environment

{environment}

## How to load

{how_to_load}
"""

_ENVIRONMENT_PACKAGES = (
    ("hf-lifecycle", "hf_lifecycle"),
    ("PyTorch", "torch"),
    ("Transformers", "transformers"),
    ("huggingface_hub", "huggingface_hub"),
    ("safetensors", "safetensors"),
)

_LINE_BREAKS = re.compile(r"\r\n|\r|\n")
_PIPE_WITH_BACKSLASHES = re.compile(r"(\\*)\|")
_BACKTICK_RUN = re.compile(r"`+")
_PLAIN_LINK_TARGET = re.compile(r"[A-Za-z0-9._/-]+")


# --------------------------------------------------------------------------- input checks


def _check_repo_id(repo_id: object) -> str:
    if repo_id is None:
        raise ConfigurationError("repo_id is required: pass repo_id='namespace/name'.")
    try:
        validate_repo_id(repo_id)  # type: ignore[arg-type]
    except HFValidationError as err:
        raise ConfigurationError(
            f"Invalid repo_id {repo_id!r}: {err} Use 'namespace/name', for example "
            f"'alice/digits-mlp'."
        ) from err
    return str(repo_id)


def _section(metadata: Mapping[str, Any], key: str, expected: type) -> Any:
    """Return ``metadata[key]``, or ``expected()`` when the key is missing or None.

    Raises ConfigurationError when the value has another type.
    """
    value = metadata.get(key)
    if value is None:
        return expected()
    if not isinstance(value, expected):
        kind = "mapping" if expected is dict else "list"
        raise ConfigurationError(
            f"Invalid metadata: {key!r} must be a {kind}, not {type(value).__name__}. Pass "
            f"the document returned by build_metadata() or read_metadata()."
        )
    return value


def _check_metadata(metadata: object) -> Mapping[str, Any]:
    if not isinstance(metadata, Mapping):
        raise ConfigurationError(
            f"metadata must be a mapping, not {type(metadata).__name__}. Pass the document "
            f"returned by build_metadata() or read_metadata()."
        )
    for key in ("hyperparameters", "metric_modes", "environment"):
        _section(metadata, key, dict)
    for key in ("last_metrics", "best_metrics"):
        for name, entry in _section(metadata, key, dict).items():
            if not isinstance(entry, Mapping):
                raise ConfigurationError(
                    f"Invalid metadata: {key}[{name!r}] must be a mapping with 'value' and "
                    f"'step', not {type(entry).__name__}."
                )
    for index, checkpoint in enumerate(_section(metadata, "checkpoints", list)):
        if not isinstance(checkpoint, Mapping):
            raise ConfigurationError(
                f"Invalid metadata: checkpoints[{index}] must be a mapping, not "
                f"{type(checkpoint).__name__}."
            )
    return metadata


def _check_final_model(final_model: object) -> Mapping[str, Any] | None:
    if final_model is None or isinstance(final_model, Mapping):
        return final_model
    raise ConfigurationError(
        f"final_model must be a mapping or None, not {type(final_model).__name__}. Pass the "
        f"final_model entry of the run's metadata."
    )


# --------------------------------------------------------------------------- Markdown pieces


def _code(text: str) -> str:
    """Wrap ``text`` in a Markdown code span, so ``<redacted>``, ``*`` and ``_`` show literally."""
    if text == "":
        return '`""`'
    fence = "`" * (max((len(run) for run in _BACKTICK_RUN.findall(text)), default=0) + 1)
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{padding}{text}{padding}{fence}"


def _escape_pipe(match: re.Match[str]) -> str:
    backslashes = match.group(1)
    if len(backslashes) % 2 == 1:
        return match.group(0)
    return backslashes + "\\|"


def _cell(text: str) -> str:
    """Make ``text`` fit in one table cell.

    GitHub-flavored Markdown splits table rows before it parses code spans, so a ``|``
    ends the cell even inside backticks unless it is escaped (GFM spec, tables extension).
    The table grammar of markdown-rs, a port of micromark, reads ``\\\\`` as one escaped
    backslash, so a pipe stays in the cell only after an odd number of backslashes, and one
    is added where the count is even.
    Line breaks become the two characters ``\\n``.
    """
    # NOTE: a value with an odd run of backslashes right before a pipe shows one backslash
    # short, because one code span cannot show that text and keep the pipe escaped.
    return _PIPE_WITH_BACKSLASHES.sub(_escape_pipe, _LINE_BREAKS.sub(r"\\n", text))


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_cell(text) for text in header) + " |"]
    lines.append("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_cell(text) for text in row) + " |")
    return "\n".join(lines)


def _code_block(source: str) -> str:
    return f"```python\n{source.rstrip()}\n```"


def _format_number(value: Any) -> str:
    value = metric_value(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return _EMPTY_CELL if value is None else str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.6g}"


def _format_step(value: Any) -> str:
    return _EMPTY_CELL if value is None else str(value)


def _format_hyperparameter(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(json_safe(value), ensure_ascii=False)
    return str(value)


def _flatten_hyperparameters(
    mapping: Mapping[str, Any], prefix: str = ""
) -> list[tuple[str, Any]]:
    """List the leaves of nested dicts as ``(dotted key, value)``.

    The value under any key that looks like a credential becomes ``REDACTED``. The tracker
    already redacts them, and this repeats it for metadata built by hand.
    """
    items: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if _is_secret_key(str(key)):
            items.append((dotted, REDACTED))
        elif isinstance(value, Mapping) and value:
            items.extend(_flatten_hyperparameters(value, dotted))
        else:
            items.append((dotted, value))
    return items


# --------------------------------------------------------------------------- final model


def _final_model_config(final_model: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Return the final model's ``config.json`` as a dict, or None when it has none.

    A ``config`` mapping in the description wins. Otherwise ``config.json`` is read from the
    final model folder at ``path``, unless ``files`` is given and does not list it.
    """
    if final_model is None:
        return None
    config = final_model.get("config")
    if isinstance(config, Mapping):
        return dict(config)
    path = final_model.get("path")
    files = final_model.get("files")
    if not isinstance(path, str) or (isinstance(files, list) and "config.json" not in files):
        return None
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return None
    try:
        loaded = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        logger.warning(
            "Ignoring %s in the model card because it cannot be read: %s", config_path, err
        )
        return None
    return loaded if isinstance(loaded, dict) else None


def _is_transformers_config(config: Mapping[str, Any] | None) -> bool:
    if config is None:
        return False
    model_type = config.get("model_type")
    architectures = config.get("architectures")
    has_type = isinstance(model_type, str) and bool(model_type)
    has_architectures = isinstance(architectures, list) and bool(architectures)
    return has_type or has_architectures


def _weights_filename(final_model: Mapping[str, Any]) -> str:
    """Return the weights file of the final model: the one in ``files``, else by ``format``."""
    files = final_model.get("files")
    if isinstance(files, list):
        for candidate in (SAFETENSORS_WEIGHTS, PT_WEIGHTS):
            if candidate in files:
                return candidate
    return PT_WEIGHTS if final_model.get("format") == "pt" else SAFETENSORS_WEIGHTS


# --------------------------------------------------------------------------- front matter


def _dataset_name(hyperparameters: Mapping[str, Any]) -> str:
    """Return the ``dataset`` hyperparameter (a str, or a mapping's ``name`` or ``id``)."""
    dataset = hyperparameters.get("dataset")
    if isinstance(dataset, Mapping):
        dataset = dataset.get("name") or dataset.get("id")
    if isinstance(dataset, str) and dataset.strip() and dataset != REDACTED:
        return dataset.strip()
    return DEFAULT_DATASET


def _eval_results(
    best_metrics: Mapping[str, Any], hyperparameters: Mapping[str, Any]
) -> list[EvalResult]:
    """Build one EvalResult per metric whose best value is a finite number."""
    dataset = _dataset_name(hyperparameters)
    results = []
    for name, best in best_metrics.items():
        value = metric_value(best.get("value")) if isinstance(best, Mapping) else None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        if not math.isfinite(value):
            continue
        results.append(
            EvalResult(
                task_type=DEFAULT_TASK_TYPE,
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type=str(name),
                metric_value=value,
            )
        )
    return results


def _tags(config: Mapping[str, Any] | None, final_model: Mapping[str, Any] | None) -> list[str]:
    tags = list(BASE_TAGS)
    if _is_transformers_config(config):
        tags.append("transformers")
        model_type = config.get("model_type")  # type: ignore[union-attr]
        if isinstance(model_type, str) and model_type:
            tags.append(model_type)
    if final_model is not None and _weights_filename(final_model) == SAFETENSORS_WEIGHTS:
        tags.append("safetensors")
    return list(dict.fromkeys(tags))


# --------------------------------------------------------------------------- body sections


def _hyperparameters_section(hyperparameters: Mapping[str, Any]) -> str:
    flat = _flatten_hyperparameters(hyperparameters)
    if not flat:
        return "No hyperparameters were tracked."
    rows = [(_code(key), _code(_format_hyperparameter(value))) for key, value in flat]
    return _table(("Hyperparameter", "Value"), rows)


def _metric_mode(
    name: str, best: Mapping[str, Any], metric_modes: Mapping[str, Any], guesser: ExperimentTracker
) -> str:
    mode = best.get("mode") or metric_modes.get(name)
    return mode if mode in ("min", "max") else guesser.metric_mode(name)


def _plot_markdown(plot_path: str) -> str:
    # A link target with spaces or brackets needs the <...> form to stay one target.
    target = plot_path if _PLAIN_LINK_TARGET.fullmatch(plot_path) else f"<{plot_path}>"
    return f"![metrics]({target})"


def _metrics_section(metadata: Mapping[str, Any], plot_path: str | None) -> str:
    last_metrics = _section(metadata, "last_metrics", dict)
    best_metrics = _section(metadata, "best_metrics", dict)
    metric_modes = _section(metadata, "metric_modes", dict)
    names = list(dict.fromkeys([*last_metrics, *best_metrics]))
    if not names:
        return "No metrics were logged."

    guesser = ExperimentTracker()
    rows = []
    for name in names:
        last = last_metrics.get(name) or {}
        best = best_metrics.get(name) or {}
        rows.append(
            (
                _code(name),
                _format_number(last.get("value")),
                _format_step(last.get("step")),
                _format_number(best.get("value")),
                _format_step(best.get("step")),
                _metric_mode(name, best, metric_modes, guesser),
            )
        )
    parts = [
        "Best values ignore NaN and infinities. A mode of `min` means smaller is better.",
        _table(("Metric", "Last", "Last step", "Best", "Best step", "Mode"), rows),
    ]
    if plot_path:
        parts.append(_plot_markdown(plot_path))
    return "\n\n".join(parts)


def _newest_first(checkpoints: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Order checkpoints by descending ``sequence``, or keep the given order when any lacks one."""
    sequences = [checkpoint.get("sequence") for checkpoint in checkpoints]
    if all(isinstance(sequence, int) and not isinstance(sequence, bool) for sequence in sequences):
        return sorted(checkpoints, key=lambda checkpoint: checkpoint["sequence"], reverse=True)
    return list(checkpoints)


def _checkpoints_section(metadata: Mapping[str, Any]) -> str:
    checkpoints = _newest_first(_section(metadata, "checkpoints", list))
    if not checkpoints:
        return "No checkpoints were kept."
    rows = []
    for checkpoint in checkpoints:
        metrics = checkpoint.get("metrics")
        metrics = metrics if isinstance(metrics, Mapping) else {}
        metric_text = ", ".join(
            _code(f"{name}={_format_number(value)}") for name, value in metrics.items()
        )
        rows.append(
            (
                _code(str(checkpoint.get("name", "unnamed"))),
                _format_step(checkpoint.get("step")),
                _format_step(checkpoint.get("epoch")),
                metric_text or _EMPTY_CELL,
            )
        )
    return "Newest first.\n\n" + _table(("Checkpoint", "Step", "Epoch", "Metrics"), rows)


def _cuda_text(cuda: Any) -> str:
    if not isinstance(cuda, Mapping):
        return "not recorded"
    if not cuda.get("available"):
        return "not available"
    devices = cuda.get("devices") or []
    version = cuda.get("version")
    text = f"CUDA {version}" if version else "CUDA"
    if devices:
        text += ": " + ", ".join(str(device) for device in devices)
    elif cuda.get("device_count"):
        text += f": {cuda['device_count']} devices"
    return text


def _git_text(git: Any) -> str:
    if not isinstance(git, Mapping) or not git.get("commit"):
        return "not recorded (not run from a git checkout)"
    text = _code(str(git["commit"]))
    if git.get("dirty"):
        text += " with uncommitted changes"
    return text


def _environment_section(metadata: Mapping[str, Any]) -> str:
    environment = _section(metadata, "environment", dict)
    if not environment:
        return "No environment was recorded."
    packages = environment.get("packages")
    packages = packages if isinstance(packages, Mapping) else {}

    python = environment.get("python_version") or "not recorded"
    implementation = environment.get("python_implementation")
    rows = [("Python", f"{python} ({implementation})" if implementation else str(python))]
    for label, key in _ENVIRONMENT_PACKAGES:
        if key not in packages:
            rows.append((label, "not recorded"))
        else:
            version = packages[key]
            rows.append((label, str(version) if version else "not installed"))
    rows.append(("Platform", str(environment.get("platform") or "not recorded")))
    rows.append(("CUDA devices", _cuda_text(environment.get("cuda"))))
    rows.append(("Git commit", _git_text(environment.get("git"))))
    return _table(("Component", "Version"), rows)


def _load_final_model_text(
    repo_id: str, final_model: Mapping[str, Any] | None, config: Mapping[str, Any] | None
) -> str:
    quoted = json.dumps(repo_id)
    if final_model is None:
        return "This run saved no final model. The weights are in the checkpoints listed above."
    if _is_transformers_config(config):
        source = (
            "from transformers import AutoModel\n\n"
            f"model = AutoModel.from_pretrained({quoted})\n"
        )
        text = "The final model is a transformers model:\n\n" + _code_block(source)
        architectures = config.get("architectures")  # type: ignore[union-attr]
        if isinstance(architectures, list) and architectures:
            names = ", ".join(_code(str(name)) for name in architectures)
            text += (
                f"\n\nThe saved architecture is {names}. Load it with its own class, or with "
                f"the matching `AutoModelFor...` class, to get the task head too."
            )
        return text

    filename = _weights_filename(final_model)
    source = (
        "from huggingface_hub import hf_hub_download\n"
        "from hf_lifecycle import load_model_weights\n\n"
        "model = MyModel()  # build the same architecture as in training\n"
        f"path = hf_hub_download({quoted}, {json.dumps(filename)})\n"
        "load_model_weights(model, path)\n"
    )
    text = f"The final weights are in `{filename}`:\n\n" + _code_block(source)
    if filename == SAFETENSORS_WEIGHTS:
        text += (
            "\n\nWithout hf-lifecycle, `safetensors.torch.load_file(path)` returns the state "
            "dict. Weights that were tied in training are stored once, so pass `strict=False` "
            "to `model.load_state_dict` when the model ties them."
        )
    else:
        text += (
            "\n\nWithout hf-lifecycle, `torch.load(path, weights_only=True)` returns the state "
            "dict for `model.load_state_dict`."
        )
    return text


def _resume_text(repo_id: str, has_checkpoints: bool) -> str:
    if not has_checkpoints:
        return "The run kept no checkpoints to resume from."
    source = (
        "from hf_lifecycle import HFManager\n\n"
        f"manager = HFManager(repo_id={json.dumps(repo_id)})\n"
        "# Returns None when no checkpoint is found.\n"
        "state = manager.load_latest_checkpoint(model, optimizer)\n"
    )
    return (
        "To continue training, load the newest checkpoint into the model and the optimizer. "
        "Pass `scheduler=` as well when the run used one. The random number generator states "
        "saved with the checkpoint are restored too.\n\n" + _code_block(source)
    )


# --------------------------------------------------------------------------- public API


def build_model_card(
    metadata: Mapping[str, Any],
    *,
    repo_id: str,
    plot_path: str | None = PLOT_FILENAME,
    final_model: Mapping[str, Any] | None = None,
    description: str = "",
) -> ModelCard:
    """Build the model card of a run from its metadata document.

    ``final_model`` describes the saved final model (``path``, ``format``, ``files`` and
    optionally ``config``) and defaults to ``metadata["final_model"]``. ``library_name`` is
    ``"transformers"`` when its ``config.json`` has ``model_type`` or ``architectures``, and
    ``"pytorch"`` otherwise. ``plot_path`` is the plot's path relative to the card, or None to
    show no plot. ``description`` opens the body.

    The ``model-index`` has one result per metric with a finite best value, equal to that
    value, on the dataset named by the ``dataset`` hyperparameter (``"custom"`` without one).
    Raises ConfigurationError for an invalid ``repo_id`` or malformed metadata.
    """
    repo_id = _check_repo_id(repo_id)
    metadata = _check_metadata(metadata)
    if final_model is None:
        final_model = metadata.get("final_model")
    final_model = _check_final_model(final_model)
    if plot_path is not None and (not isinstance(plot_path, str) or not plot_path.strip()):
        raise ConfigurationError(
            f"Invalid plot_path {plot_path!r}: pass a path relative to the card, such as "
            f"{PLOT_FILENAME!r}, or None for no plot."
        )
    if not isinstance(description, str):
        raise ConfigurationError(f"description must be a str, not {type(description).__name__}.")

    hyperparameters = _section(metadata, "hyperparameters", dict)
    config = _final_model_config(final_model)
    model_name = repo_id.split("/")[-1]
    eval_results = _eval_results(_section(metadata, "best_metrics", dict), hyperparameters)
    card_data = ModelCardData(
        library_name="transformers" if _is_transformers_config(config) else "pytorch",
        tags=_tags(config, final_model),
        model_name=model_name,
        eval_results=eval_results or None,
    )

    how_to_load = "\n\n".join(
        (
            _load_final_model_text(repo_id, final_model, config),
            _resume_text(repo_id, bool(_section(metadata, "checkpoints", list))),
        )
    )
    content = _CARD_TEMPLATE.format(
        front_matter=card_data.to_yaml(),
        title=model_name,
        description=description.strip() or _DEFAULT_DESCRIPTION,
        hyperparameters=_hyperparameters_section(hyperparameters),
        metrics=_metrics_section(metadata, plot_path),
        checkpoints=_checkpoints_section(metadata),
        environment=_environment_section(metadata),
        how_to_load=how_to_load,
    )
    return ModelCard(content)


def _tracker_from_metadata(metadata: Mapping[str, Any]) -> ExperimentTracker:
    return ExperimentTracker.from_dict(
        {
            "metrics_history": _section(metadata, "metrics_history", dict),
            "metric_modes": _section(metadata, "metric_modes", dict),
        }
    )


def write_card_files(
    folder: str | os.PathLike[str],
    metadata: Mapping[str, Any],
    *,
    repo_id: str,
    final_model: Mapping[str, Any] | None = None,
    tracker: ExperimentTracker | None = None,
    description: str = "",
) -> list[str]:
    """Write ``README.md`` and the metric plot into ``folder`` and return their relative paths.

    The plot is drawn from ``tracker`` when given, else from ``metadata["metrics_history"]``.
    It is written as ``metrics.png`` and linked from the card only when matplotlib is
    importable and at least one metric was logged. Both files are replaced atomically, and a
    ``metrics.png`` left by an earlier call stays in place when no new plot is drawn.
    """
    repo_id = _check_repo_id(repo_id)
    metadata = _check_metadata(metadata)
    _check_final_model(final_model)
    if tracker is not None and not isinstance(tracker, ExperimentTracker):
        raise ConfigurationError(
            f"tracker must be an ExperimentTracker or None, not {type(tracker).__name__}."
        )
    source = tracker if tracker is not None else _tracker_from_metadata(metadata)
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)

    plot = source.plot(target / PLOT_FILENAME)
    card = build_model_card(
        metadata,
        repo_id=repo_id,
        plot_path=PLOT_FILENAME if plot is not None else None,
        final_model=final_model,
        description=description,
    )
    atomic_write_text(target / CARD_FILENAME, str(card))

    written = [CARD_FILENAME] if plot is None else [CARD_FILENAME, PLOT_FILENAME]
    logger.info("Wrote the model card files %s to %s", ", ".join(written), target)
    return written

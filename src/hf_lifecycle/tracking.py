"""Hyperparameter and metric tracking, the environment record, the metadata file and the summary.

:class:`ExperimentTracker` keeps the hyperparameters and the full metric history of one run.
:func:`build_metadata` turns it, together with the checkpoint list and the environment from
:func:`collect_environment`, into the versioned JSON document that :func:`write_metadata`
stores beside the checkpoints and :func:`read_metadata` loads back.

No secret is ever stored: hyperparameters whose key names look like credentials, and every
string that contains a registered secret value (such as the Hub token), become ``REDACTED``.
"""

from __future__ import annotations

import copy
import datetime
import enum
import io
import json
import logging
import math
import numbers
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import PurePath
from typing import Any, Literal

from ._io import atomic_write_bytes, atomic_write_json, json_safe, metric_value
from .errors import ConfigurationError, SerializationError

__all__ = [
    "ExperimentTracker",
    "METADATA_FORMAT",
    "METADATA_FORMAT_VERSION",
    "MetricMode",
    "REDACTED",
    "SECRET_MARKERS",
    "build_metadata",
    "collect_environment",
    "format_summary",
    "read_metadata",
    "write_metadata",
]

logger = logging.getLogger(__name__)

MetricMode = Literal["min", "max"]

SECRET_MARKERS = (
    "token",
    "password",
    "passwd",
    "secret",
    "api_key",
    "apikey",
    "credential",
    "private_key",
)
REDACTED = "<redacted>"

METADATA_FORMAT = "hf-lifecycle-metadata"
METADATA_FORMAT_VERSION = 1

# "token" inside "tokenizer", "tokenize" or "tokenise" names a text tokenizer, not a credential.

# Words in a metric name that mean a larger value is better. Every other metric is minimized.
_MAXIMIZED_WORDS = frozenset(
    {
        "acc",
        "accuracy",
        "f1",
        "precision",
        "recall",
        "auc",
        "bleu",
        "rouge",
        "score",
        "map",
        "iou",
        "reward",
    }
)

_PACKAGE_DISTRIBUTIONS = {
    "hf_lifecycle": "hf-lifecycle",
    "torch": "torch",
    "transformers": "transformers",
    "huggingface_hub": "huggingface_hub",
    "safetensors": "safetensors",
    "numpy": "numpy",
}
_GIT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class _Record:
    name: str
    step: int
    value: float
    timestamp: float


# --------------------------------------------------------------------------- value conversion


def _is_secret_key(key: str) -> bool:
    """Return True when a key name looks like a credential (``hub_token``, ``api_key``, ``password``).

    The name is split into words. "token" counts only as the last word, so ``hf_token`` and
    ``access_token`` are secrets while ``pad_token_id``, ``max_tokens`` and ``tokenizer_name``
    are not. The other markers count anywhere in the name.
    """
    lowered = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()  # hubToken -> hub_token
    words = [word for word in re.split(r"[^a-z0-9]+", lowered) if word]
    if words and words[-1] == "token":
        return True
    joined = "_".join(words)
    return any(marker in joined for marker in SECRET_MARKERS if marker != "token")


def _contains_secret(text: str, secrets: Sequence[str]) -> bool:
    return any(secret in text for secret in secrets)


def _type_name(value: object) -> str:
    cls = type(value)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _child_key(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _unwrap_scalar(value: object, *, allow_one_element: bool) -> tuple[bool, Any]:
    """Return ``(True, python_value)`` for a numpy scalar or a 0-dim array or tensor.

    With ``allow_one_element``, arrays and tensors of any shape holding exactly one element
    unwrap too. Every other value returns ``(False, None)``. numpy and torch are looked up
    in ``sys.modules``, because a value cannot be one of their types unless the module is
    already imported.
    """
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if isinstance(value, numpy.generic):
            return True, value.item()
        if isinstance(value, numpy.ndarray):
            if value.ndim == 0 or (allow_one_element and value.size == 1):
                return True, value.reshape(()).item()
            return False, None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        if value.dim() == 0 or (allow_one_element and value.numel() == 1):
            return True, value.reshape(()).item()
    return False, None


def _element_count(value: object) -> int | None:
    """Return the element count of a numpy array or torch tensor, or None for other types."""
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.ndarray):
        return int(value.size)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return int(value.numel())
    return None


class _JSONConverter:
    """Copies a nested value into plain JSON types, naming the dotted key of any failure.

    Tuples become lists, numpy scalars and 0-dim tensors become Python numbers,
    ``pathlib`` paths become str and enums become their value. With ``redact_keys``, the
    value under a key that looks like a credential becomes ``REDACTED`` without being
    inspected. Every str that contains one of ``secrets`` becomes ``REDACTED``.
    """

    def __init__(self, *, subject: str, redact_keys: bool, secrets: Sequence[str]) -> None:
        self._subject = subject
        self._redact_keys = redact_keys
        self._secrets = secrets
        self._open_containers: set[int] = set()

    def convert_mapping(self, mapping: Mapping[Any, Any], key: str) -> dict[str, Any]:
        if id(mapping) in self._open_containers:
            raise SerializationError(
                f"Cannot store {self._subject} {key!r}: the mapping contains itself. "
                f"Pass a copy without the cycle.",
                key=key,
            )
        self._open_containers.add(id(mapping))
        try:
            result: dict[str, Any] = {}
            for child, value in mapping.items():
                if not isinstance(child, str):
                    dotted = _child_key(key, str(child))
                    raise SerializationError(
                        f"Cannot store {self._subject} {dotted!r}: its key {child!r} has type "
                        f"{_type_name(child)}, but keys must be str. Convert the key with "
                        f"str() first.",
                        key=dotted,
                    )
                child_key = _child_key(key, child)
                if self._redact_keys and _is_secret_key(child):
                    logger.debug(
                        "Redacted %s %s because its name looks secret", self._subject, child_key
                    )
                    result[str(child)] = REDACTED
                else:
                    result[str(child)] = self.convert(value, child_key)
            return result
        finally:
            self._open_containers.discard(id(mapping))

    def convert(self, value: Any, key: str) -> Any:
        if isinstance(value, enum.Enum):
            return self.convert(value.value, key)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str):
            text = str(value)
            return REDACTED if _contains_secret(text, self._secrets) else text
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value)
        if isinstance(value, PurePath):
            return self.convert(str(value), key)
        if isinstance(value, Mapping):
            return self.convert_mapping(value, key)
        if isinstance(value, (list, tuple)):
            return self._convert_sequence(value, key)
        unwrapped, item = _unwrap_scalar(value, allow_one_element=False)
        if unwrapped and isinstance(item, (bool, int, float, str)):
            return self.convert(item, key)
        raise self._unsupported(value, key)

    def _convert_sequence(self, sequence: list[Any] | tuple[Any, ...], key: str) -> list[Any]:
        if id(sequence) in self._open_containers:
            raise SerializationError(
                f"Cannot store {self._subject} {key!r}: the list contains itself. "
                f"Pass a copy without the cycle.",
                key=key,
            )
        self._open_containers.add(id(sequence))
        try:
            return [self.convert(item, f"{key}[{index}]") for index, item in enumerate(sequence)]
        finally:
            self._open_containers.discard(id(sequence))

    def _unsupported(self, value: object, key: str) -> SerializationError:
        hint = "for example str(value) or float(value)"
        if _element_count(value) is not None:
            hint = "for example value.item() for one element or value.tolist() for several"
        return SerializationError(
            f"Cannot store {self._subject} {key!r} of type {_type_name(value)} as JSON. "
            f"Convert it to a str or a number first, {hint}.",
            key=key,
        )


def _scrub_secrets(value: Any, secrets: Sequence[str]) -> Any:
    """Copy ``value``, replacing every str that contains one of ``secrets`` with ``REDACTED``."""
    if isinstance(value, str):
        return REDACTED if _contains_secret(value, secrets) else value
    if isinstance(value, Mapping):
        return {key: _scrub_secrets(item, secrets) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub_secrets(item, secrets) for item in value]
    return value


def _merge_into(target: dict[str, Any], updates: Mapping[str, Any]) -> None:
    """Merge ``updates`` into ``target``. Nested dicts merge key by key, other values replace."""
    for key, value in updates.items():
        current = target.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            _merge_into(current, value)
        else:
            target[key] = value


def _metric_float(name: str, value: Any) -> float:
    """Convert one logged metric value to float, or raise SerializationError naming the metric."""
    if isinstance(value, bool):
        raise SerializationError(
            f"Cannot log metric {name!r}: bool is not a number. Log float(value) instead.",
            key=name,
        )
    if isinstance(value, numbers.Real):
        return float(value)
    unwrapped, item = _unwrap_scalar(value, allow_one_element=True)
    if unwrapped:
        if isinstance(item, bool):
            raise SerializationError(
                f"Cannot log metric {name!r}: a {_type_name(value)} holding a bool is not a "
                f"number. Log float(value) instead.",
                key=name,
            )
        if isinstance(item, numbers.Real):
            return float(item)
    count = _element_count(value)
    if count is not None:
        raise SerializationError(
            f"Cannot log metric {name!r}: a {_type_name(value)} with {count} elements is not "
            f"one number. Reduce it first, for example value.mean().item().",
            key=name,
        )
    raise SerializationError(
        f"Cannot log metric {name!r} of type {_type_name(value)}: metric values must be "
        f"int, float, a numpy scalar or a one-element tensor.",
        key=name,
    )


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ConfigurationError(
            f"Invalid step {step!r}: the step must be a non-negative int, or None to use the "
            f"step after the largest one logged so far."
        )
    return int(step)


def _check_mode(mode: Any) -> MetricMode:
    if mode not in ("min", "max"):
        raise ConfigurationError(f"Invalid metric mode {mode!r}: use 'min' or 'max'.")
    return mode


def _name_words(name: str) -> set[str]:
    """Split a metric name into lower-case words at separators and at camelCase boundaries.

    Both splits are kept, so "mAP" yields "map" and "valAcc" yields "acc".
    """
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    camel_split = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).lower()
    words.update(re.split(r"[^a-z0-9]+", camel_split))
    words.discard("")
    return words


# Quantities that are logged beside metrics but have no better or worse value: a "best"
# learning rate or throughput means nothing, so best() leaves them out unless a mode is set.
_UNRANKED_WORDS = frozenset({"lr", "epoch", "runtime", "flos", "momentum"})
_UNRANKED_PHRASES = ("learning_rate", "per_second", "grad_norm")


def _is_unranked(name: str) -> bool:
    words = _name_words(name)
    joined = "_".join(word for word in re.split(r"[^a-z0-9]+", name.lower()) if word)
    return (
        bool(words & _UNRANKED_WORDS)
        or joined == "step"
        or any(phrase in joined for phrase in _UNRANKED_PHRASES)
    )


def _guess_metric_mode(name: str) -> MetricMode:
    """Guess whether larger values of a metric are better, from the words of its name.

    A word matches when it is one of the maximized words, also with trailing digits
    ("acc1", "bleu4", "map50") or a plural "s". Any word starting with "rouge" matches too,
    such as "rouge1" and "rougeLsum".
    """
    for word in _name_words(name):
        candidates = {word, word.rstrip("0123456789"), word.removesuffix("s")}
        if candidates & _MAXIMIZED_WORDS or word.startswith("rouge"):
            return "max"
    return "min"


# --------------------------------------------------------------------------- tracker


class ExperimentTracker:
    """Hyperparameters and the full metric history of one training run.

    Every logged value is kept in logging order, so :meth:`history_length` can mark the
    position of a checkpoint and :meth:`truncate` can drop what a resumed run logs again.

    Thread safety: every method takes one internal lock, so a training loop may log while
    another thread builds the metadata. The tracker is not shared between processes; in a
    distributed run, log from one rank only.
    """

    def __init__(self, *, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.RLock()
        self._secrets: list[str] = []
        self._hyperparameters: dict[str, Any] = {}
        self._records: list[_Record] = []
        self._modes: dict[str, MetricMode] = {}
        self._next_step = 0
        for secret in secrets:
            self.add_secret(secret)

    # ----------------------------------------------------------------- secrets and hyperparameters

    def add_secret(self, value: str | None) -> None:
        """Register an exact secret string, such as the Hub token, that must never be stored.

        Every hyperparameter string that contains it, including those tracked already,
        becomes ``REDACTED``. None and the empty string are ignored, so a missing token can
        be passed as it is.
        """
        if value is None or value == "":
            return
        if not isinstance(value, str):
            raise ConfigurationError(
                f"A secret must be a str, not {_type_name(value)}. Pass the token text itself."
            )
        with self._lock:
            if value in self._secrets:
                return
            self._secrets.append(value)
            self._hyperparameters = _scrub_secrets(self._hyperparameters, (value,))

    def track_hyperparameters(self, hyperparameters: Mapping[str, Any]) -> None:
        """Merge ``hyperparameters`` into the tracked ones, nested dicts key by key.

        Values must be JSON-representable: str, int, float, bool, None and nested
        dicts, lists and tuples of them. numpy scalars and 0-dim tensors become Python
        numbers, paths become str and enums become their value. Keys that look like
        credentials (see :data:`SECRET_MARKERS`) are stored as ``REDACTED`` at any depth.

        Raises SerializationError, naming the dotted key such as ``optimizer.betas[1]``,
        for any other type. Everything is validated first, so a failed call changes nothing.
        """
        if not isinstance(hyperparameters, Mapping):
            raise ConfigurationError(
                f"Hyperparameters must be a mapping of str keys, not "
                f"{_type_name(hyperparameters)}. Pass a dict, or vars(args) for argparse."
            )
        with self._lock:
            converter = _JSONConverter(
                subject="hyperparameter", redact_keys=True, secrets=tuple(self._secrets)
            )
            converted = converter.convert_mapping(hyperparameters, "")
            _merge_into(self._hyperparameters, converted)

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """A deep copy of the tracked hyperparameters."""
        with self._lock:
            return copy.deepcopy(self._hyperparameters)

    # ----------------------------------------------------------------- metrics

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> int:
        """Append one value per metric at ``step`` and return the step used.

        With ``step=None`` the step is one past the largest step logged so far, or 0 for
        the first call. Values may be int, float, numpy scalars or one-element tensors.
        NaN and infinities are stored as they are, and never count as best. An empty
        mapping logs nothing and returns the step that would have been used.
        """
        if not isinstance(metrics, Mapping):
            raise ConfigurationError(
                f"Metrics must be a mapping of names to numbers, not {_type_name(metrics)}."
            )
        checked_step = None if step is None else _check_step(step)
        # Tensors are read here, outside the lock, because .item() may wait for the GPU.
        values: list[tuple[str, float]] = []
        for name, value in metrics.items():
            if not isinstance(name, str):
                raise SerializationError(
                    f"Metric names must be str, not {_type_name(name)} ({name!r}).",
                    key=repr(name),
                )
            if not name:
                raise ConfigurationError("Metric names must not be empty.")
            values.append((name, _metric_float(name, value)))

        with self._lock:
            used_step = self._next_step if checked_step is None else checked_step
            if not values:
                return used_step
            timestamp = time.time()
            for name, value in values:
                self._records.append(_Record(name, used_step, value, timestamp))
            self._next_step = max(self._next_step, used_step + 1)
            return used_step

    def history(self, name: str | None = None) -> list[dict[str, Any]]:
        """Return logged records in logging order.

        For one metric each record is ``{"step", "value", "timestamp"}``. With
        ``name=None`` every metric is included and each record also has ``"name"``.
        A metric that was never logged has an empty history.
        """
        with self._lock:
            if name is None:
                return [
                    {
                        "name": record.name,
                        "step": record.step,
                        "value": record.value,
                        "timestamp": record.timestamp,
                    }
                    for record in self._records
                ]
            return [
                {"step": record.step, "value": record.value, "timestamp": record.timestamp}
                for record in self._records
                if record.name == name
            ]

    @property
    def metric_names(self) -> list[str]:
        """Names of the logged metrics, in the order they were first logged."""
        with self._lock:
            return list(dict.fromkeys(record.name for record in self._records))

    def last(self) -> dict[str, dict[str, Any]]:
        """Return the most recently logged ``{"value", "step"}`` of each metric."""
        with self._lock:
            return {
                record.name: {"value": record.value, "step": record.step}
                for record in self._records
            }

    def best(self) -> dict[str, dict[str, Any]]:
        """Return the best finite ``{"value", "step", "mode"}`` of each metric.

        The mode comes from :meth:`metric_mode`. On a tie the earliest record wins.
        Metrics without any finite value are left out, and so are quantities with no better
        value (learning rate, epoch, runtime, throughput, gradient norm) unless
        :meth:`set_metric_mode` gave them a mode.
        """
        with self._lock:
            result: dict[str, dict[str, Any]] = {}
            modes: dict[str, MetricMode] = {}
            for record in self._records:
                if not math.isfinite(record.value):
                    continue
                if record.name not in self._modes and _is_unranked(record.name):
                    continue
                if record.name not in modes:
                    modes[record.name] = self.metric_mode(record.name)
                mode = modes[record.name]
                current = result.get(record.name)
                if current is None:
                    improved = True
                elif mode == "max":
                    improved = record.value > current["value"]
                else:
                    improved = record.value < current["value"]
                if improved:
                    result[record.name] = {"value": record.value, "step": record.step, "mode": mode}
            return result

    def set_metric_mode(self, name: str, mode: MetricMode) -> None:
        """Set whether smaller (``"min"``) or larger (``"max"``) values of a metric are better."""
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"Invalid metric name {name!r}: use a non-empty str.")
        checked = _check_mode(mode)
        with self._lock:
            self._modes[name] = checked

    def metric_mode(self, name: str) -> MetricMode:
        """Return the mode set for ``name``, or the mode guessed from its words.

        Names with a word such as "acc", "accuracy", "f1", "precision", "recall", "auc",
        "bleu", "rouge", "score", "map", "iou" or "reward" are maximized, every other metric
        (loss, error, perplexity and so on) is minimized.
        """
        with self._lock:
            explicit = self._modes.get(name)
        return explicit if explicit is not None else _guess_metric_mode(name)

    def history_length(self) -> int:
        """Return the number of logged records, which marks a checkpoint's position."""
        with self._lock:
            return len(self._records)

    def truncate(self, length: int) -> None:
        """Drop the records logged after position ``length``, as a resumed run logs them again.

        A ``length`` at or past the end drops nothing. The next automatic step becomes one
        past the largest step that remains.
        """
        if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 0:
            raise ConfigurationError(
                f"Invalid history length {length!r}: use a non-negative int returned by "
                f"history_length()."
            )
        with self._lock:
            dropped = len(self._records) - int(length)
            if dropped <= 0:
                return
            del self._records[int(length) :]
            self._next_step = max((record.step for record in self._records), default=-1) + 1
            logger.debug("Dropped %s metric records logged after position %s", dropped, length)

    # ----------------------------------------------------------------- serialization

    def to_dict(self) -> dict[str, Any]:
        """Return the tracker's state as plain data for JSON.

        ``metrics_history`` maps each metric name to its records, and each record carries
        ``index``, its position in the logging order, so :meth:`from_dict` can restore the
        order across metrics. NaN and infinities are kept as floats; pass the result
        through ``json_safe`` before strict JSON encoding.
        """
        with self._lock:
            history: dict[str, list[dict[str, Any]]] = {}
            for index, record in enumerate(self._records):
                history.setdefault(record.name, []).append(
                    {
                        "step": record.step,
                        "value": record.value,
                        "timestamp": record.timestamp,
                        "index": index,
                    }
                )
            return {
                "format_version": METADATA_FORMAT_VERSION,
                "hyperparameters": copy.deepcopy(self._hyperparameters),
                "metric_modes": dict(self._modes),
                "metrics_history": history,
            }

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, secrets: Iterable[str] = ()
    ) -> ExperimentTracker:
        """Rebuild a tracker from :meth:`to_dict` output or from a metadata document.

        Metric values written by ``json_safe`` ("NaN", "Infinity") become floats again.
        Records without ``index`` are ordered by timestamp after the indexed ones.
        Raises ConfigurationError when the data is malformed.
        """
        if not isinstance(data, Mapping):
            raise ConfigurationError(
                f"Tracker data must be a mapping, not {_type_name(data)}. Pass the output of "
                f"ExperimentTracker.to_dict() or read_metadata()."
            )
        tracker = cls(secrets=secrets)
        hyperparameters = data.get("hyperparameters") or {}
        if not isinstance(hyperparameters, Mapping):
            raise ConfigurationError("Invalid tracker data: 'hyperparameters' must be a mapping.")
        tracker.track_hyperparameters(hyperparameters)

        modes = data.get("metric_modes") or {}
        if not isinstance(modes, Mapping):
            raise ConfigurationError("Invalid tracker data: 'metric_modes' must be a mapping.")
        for name, mode in modes.items():
            tracker.set_metric_mode(name, mode)

        tracker._records = _records_from_history(data.get("metrics_history") or {})
        tracker._next_step = max((record.step for record in tracker._records), default=-1) + 1
        return tracker

    # ----------------------------------------------------------------- plotting

    def plot(
        self, path: str | os.PathLike[str], *, names: Iterable[str] | None = None
    ) -> str | None:
        """Save a PNG with one panel per metric (value against step) and return its path.

        ``names`` selects metrics, and a name that was never logged raises
        ConfigurationError. NaN and infinities are left out of the curves. Returns None,
        with an INFO log, when nothing is logged or matplotlib is not installed. Draws on
        matplotlib's Agg canvas directly, so the global backend and pyplot stay untouched.
        """
        with self._lock:
            series: dict[str, list[tuple[int, float]]] = {}
            for record in self._records:
                series.setdefault(record.name, []).append((record.step, record.value))
            best = self.best()
        target = os.path.abspath(os.fspath(path))

        if names is None:
            selected = list(series)
        else:
            selected = [names] if isinstance(names, str) else list(names)
            unknown = [name for name in selected if name not in series]
            if unknown:
                raise ConfigurationError(
                    f"Cannot plot metrics {unknown}: they were never logged. "
                    f"Logged metrics: {sorted(series)}."
                )
        if not selected:
            logger.info("No metrics were logged, so no plot was written to %s", target)
            return None
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            logger.info(
                "matplotlib is not installed, so no plot was written to %s. "
                "Install it with: pip install 'hf-lifecycle[plot]'",
                target,
            )
            return None

        columns = min(2, len(selected))
        rows = math.ceil(len(selected) / columns)
        figure = Figure(figsize=(6.0 * columns, 3.5 * rows), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(rows, columns, squeeze=False).flatten()
        for axis, name in zip(axes[: len(selected)], selected, strict=True):
            points = [(step, value) for step, value in series[name] if math.isfinite(value)]
            axis.plot([step for step, _ in points], [value for _, value in points], marker=".")
            if name in best:
                axis.scatter([best[name]["step"]], [best[name]["value"]], color="tab:red", zorder=3)
            axis.set_title(name)
            axis.set_xlabel("step")
            axis.grid(True, alpha=0.3)
        for axis in axes[len(selected) :]:
            axis.set_visible(False)

        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        atomic_write_bytes(target, buffer.getvalue())
        logger.debug("Wrote the metric plot to %s", target)
        return target


def _records_from_history(history: Any) -> list[_Record]:
    """Rebuild the ordered record list from ``{name: [{"step", "value", ...}]}``."""
    if not isinstance(history, Mapping):
        raise ConfigurationError("Invalid tracker data: 'metrics_history' must be a mapping.")
    keyed: list[tuple[float, float, _Record]] = []
    for name, records in history.items():
        if not isinstance(name, str) or not isinstance(records, list):
            raise ConfigurationError(
                f"Invalid tracker data: metrics_history[{name!r}] must be a list of records "
                f"under a str name."
            )
        for position, record in enumerate(records):
            where = f"metrics_history[{name!r}][{position}]"
            if not isinstance(record, Mapping):
                raise ConfigurationError(f"Invalid tracker data: {where} must be a mapping.")
            try:
                step = _check_step(record.get("step"))
                value = _metric_float(name, metric_value(record.get("value")))
            except (ConfigurationError, SerializationError) as err:
                raise ConfigurationError(f"Invalid tracker data at {where}: {err}") from err
            timestamp = record.get("timestamp", 0.0)
            index = record.get("index")
            if not isinstance(timestamp, (int, float)) or isinstance(timestamp, bool):
                raise ConfigurationError(
                    f"Invalid tracker data: {where} has an invalid timestamp. Expected a number."
                )
            if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
                raise ConfigurationError(
                    f"Invalid tracker data: {where} has an invalid index. Expected an int."
                )
            sort_index = math.inf if index is None else float(index)
            record_time = float(timestamp)
            keyed.append((sort_index, record_time, _Record(name, step, value, record_time)))
    keyed.sort(key=lambda item: (item[0], item[1]))
    return [record for _, _, record in keyed]


# --------------------------------------------------------------------------- environment


def _package_version(distribution: str) -> str | None:
    try:
        return importlib_metadata.version(distribution)
    except importlib_metadata.PackageNotFoundError:
        return None


def _cuda_environment() -> dict[str, Any]:
    """Describe CUDA through torch. Device names are read only when CUDA is available.

    ``torch.cuda.is_available()`` does not initialise CUDA, so a machine without it is
    left uninitialised.
    """
    info: dict[str, Any] = {"available": False, "version": None, "device_count": 0, "devices": []}
    try:
        import torch
    except ImportError:
        return info
    info["version"] = torch.version.cuda
    if not torch.cuda.is_available():
        return info
    info["available"] = True
    count = torch.cuda.device_count()
    info["device_count"] = count
    try:
        info["devices"] = [torch.cuda.get_device_name(index) for index in range(count)]
    except (RuntimeError, AssertionError) as err:
        logger.warning("Could not read the CUDA device names: %s", err)
    return info


def _run_git(git: str, arguments: list[str], cwd: str) -> str | None:
    """Run one read-only git command in ``cwd`` and return its stripped stdout, or None."""
    # With GIT_OPTIONAL_LOCKS=0, `git status` skips the index refresh that takes index.lock
    # (documented in git(1)), so it cannot make a concurrent git command fail on that lock.
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0", GIT_TERMINAL_PROMPT="0", LC_ALL="C")
    try:
        completed = subprocess.run(
            [git, *arguments],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        logger.warning("git %s timed out after %s s in %s", arguments[0], _GIT_TIMEOUT_S, cwd)
        return None
    except OSError as err:
        logger.debug("git %s failed to start in %s: %s", arguments[0], cwd, err)
        return None
    if completed.returncode != 0:
        return None
    return completed.stdout.strip()


def _git_state(cwd: str) -> dict[str, Any] | None:
    """Return ``{"commit", "dirty"}`` for the checkout containing ``cwd``, or None.

    ``dirty`` is True when tracked files differ from HEAD (staged or not). Untracked files
    do not count, because a run usually writes its outputs inside the checkout.
    """
    git = shutil.which("git")
    if git is None:
        return None
    commit = _run_git(git, ["rev-parse", "--verify", "HEAD"], cwd)
    if not commit:
        return None
    status = _run_git(git, ["status", "--porcelain", "--untracked-files=no"], cwd)
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def collect_environment(cwd: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Describe the software and hardware a run uses, for the metadata file.

    Records the Python version and implementation, the platform string and the machine.
    Package versions of hf_lifecycle and its main dependencies come from package metadata,
    so transformers is never imported. CUDA is described by availability, devices and
    version. The git commit and dirty flag are those of the checkout containing ``cwd``
    (default: the current folder).
    ``git`` is None outside a checkout, before the first commit, or without git.
    No host name, user name or environment variable is recorded.
    """
    folder = os.getcwd() if cwd is None else os.fspath(cwd)
    return {
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": {
            name: _package_version(distribution)
            for name, distribution in _PACKAGE_DISTRIBUTIONS.items()
        },
        "cuda": _cuda_environment(),
        "git": _git_state(folder),
    }


# --------------------------------------------------------------------------- metadata file


def _plain_dict(item: Any, description: str) -> dict[str, Any]:
    """Return a checkpoint or model description as a dict, calling ``to_dict()`` if present."""
    if hasattr(item, "to_dict"):
        item = item.to_dict()
    if not isinstance(item, Mapping):
        raise ConfigurationError(f"Each {description} must be a mapping, not {_type_name(item)}.")
    return dict(item)


def build_metadata(
    tracker: ExperimentTracker,
    *,
    checkpoints: list[dict[str, Any]],
    final_model: dict[str, Any] | None,
    run: dict[str, Any],
    environment: dict[str, Any],
) -> dict[str, Any]:
    """Assemble the metadata document of a run from one consistent snapshot of ``tracker``.

    ``checkpoints`` items may also be objects with ``to_dict()``, such as CheckpointInfo.
    Strings anywhere in the document that contain one of the tracker's secrets become
    ``REDACTED``. ``metric_modes`` contains the modes set with
    :meth:`ExperimentTracker.set_metric_mode`, so :meth:`ExperimentTracker.from_dict`
    restores the tracker from this document.
    """
    with tracker._lock:
        state = tracker.to_dict()
        last = tracker.last()
        best = tracker.best()
        secrets = tuple(tracker._secrets)
    checkpoint_dicts = [_plain_dict(item, "checkpoint") for item in checkpoints]
    model = None if final_model is None else _plain_dict(final_model, "final model")
    return {
        "format": METADATA_FORMAT,
        "format_version": METADATA_FORMAT_VERSION,
        "run": _scrub_secrets(_plain_dict(run, "run description"), secrets),
        "hyperparameters": state["hyperparameters"],
        "metric_modes": state["metric_modes"],
        "metrics_history": state["metrics_history"],
        "last_metrics": last,
        "best_metrics": best,
        "checkpoints": _scrub_secrets(checkpoint_dicts, secrets),
        "final_model": _scrub_secrets(model, secrets),
        "environment": _scrub_secrets(_plain_dict(environment, "environment"), secrets),
        "updated_at": _last_change(state["metrics_history"], checkpoint_dicts),
    }


def _last_change(history: dict[str, list[dict[str, Any]]], checkpoints: list[dict[str, Any]]) -> str | None:
    # Derived from the content, not the clock, so an unchanged run writes identical bytes and a
    # second push finds nothing to upload.
    times = [record.get("timestamp") for records in history.values() for record in records]
    times += [item.get("timestamp") for item in checkpoints]
    finite = [value for value in times if isinstance(value, (int, float)) and value > 0]
    if not finite:
        return None
    return datetime.datetime.fromtimestamp(max(finite), datetime.timezone.utc).isoformat()


def write_metadata(path: str | os.PathLike[str], metadata: Mapping[str, Any]) -> str:
    """Write ``metadata`` atomically as strict JSON and return the file's absolute path.

    NaN and infinities are written as "NaN", "Infinity" and "-Infinity", paths as str.
    Raises SerializationError, naming the dotted key, for a value JSON cannot hold.
    """
    if not isinstance(metadata, Mapping):
        raise ConfigurationError(f"Metadata must be a mapping, not {_type_name(metadata)}.")
    converter = _JSONConverter(subject="metadata value", redact_keys=False, secrets=())
    document = converter.convert_mapping(metadata, "")
    target = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    atomic_write_json(target, document)
    logger.debug("Wrote run metadata to %s", target)
    return target


def _restore_values(container: Any, where: str, path: str) -> None:
    """Undo ``json_safe`` on the ``"value"`` of each record in a list or a name-keyed mapping."""
    records = container.values() if isinstance(container, Mapping) else container
    for record in records:
        if not isinstance(record, dict):
            raise ConfigurationError(
                f"{path} is not valid metadata: {where} contains an entry that is not an object."
            )
        if "value" in record:
            record["value"] = metric_value(record["value"])


def _restore_metric_mapping(container: Any) -> None:
    if isinstance(container, dict):
        for name, value in container.items():
            container[name] = metric_value(value)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a metadata file written by :func:`write_metadata`.

    Metric values stored as "NaN", "Infinity" or "-Infinity" become floats again.
    Raises ConfigurationError, naming the path, when the file is not valid metadata, and
    FileNotFoundError when it does not exist.
    """
    target = os.path.abspath(os.fspath(path))
    try:
        with open(target, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ConfigurationError(
            f"{target} is not valid metadata: it is not UTF-8 JSON ({err})."
        ) from err
    if not isinstance(data, dict) or data.get("format") != METADATA_FORMAT:
        raise ConfigurationError(
            f"{target} is not valid metadata: expected a JSON object with "
            f'"format": "{METADATA_FORMAT}".'
        )
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigurationError(
            f"{target} is not valid metadata: format_version {version!r} is not a positive int."
        )
    if version > METADATA_FORMAT_VERSION:
        raise ConfigurationError(
            f"{target} has metadata format_version {version}, but this hf_lifecycle reads "
            f"versions up to {METADATA_FORMAT_VERSION}. Upgrade hf-lifecycle to read it."
        )

    expected_types = {
        "metrics_history": dict,
        "last_metrics": dict,
        "best_metrics": dict,
        "checkpoints": list,
        "hyperparameters": dict,
    }
    for key, expected in expected_types.items():
        if key in data and not isinstance(data[key], expected):
            raise ConfigurationError(
                f"{target} is not valid metadata: {key!r} must be a JSON "
                f"{'object' if expected is dict else 'array'}."
            )
    if not isinstance(data.get("final_model"), (dict, type(None))):
        raise ConfigurationError(
            f"{target} is not valid metadata: 'final_model' must be a JSON object or null."
        )
    for name, records in data.get("metrics_history", {}).items():
        if not isinstance(records, list):
            raise ConfigurationError(
                f"{target} is not valid metadata: metrics_history[{name!r}] must be an array."
            )
        _restore_values(records, f"metrics_history[{name!r}]", target)
    _restore_values(data.get("last_metrics", {}), "last_metrics", target)
    _restore_values(data.get("best_metrics", {}), "best_metrics", target)
    for index, checkpoint in enumerate(data.get("checkpoints", [])):
        if not isinstance(checkpoint, dict):
            raise ConfigurationError(
                f"{target} is not valid metadata: checkpoints[{index}] must be an object."
            )
        _restore_metric_mapping(checkpoint.get("metrics"))
    if isinstance(data.get("final_model"), dict):
        _restore_metric_mapping(data["final_model"].get("metrics"))
    return data


# --------------------------------------------------------------------------- summary


def _format_number(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.6g}"
    return str(value)


def _format_hyperparameter(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(json_safe(value))
    return str(value)


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """List the leaves of nested dicts as ``(dotted key, value)``, keeping lists whole."""
    items: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        dotted = _child_key(prefix, key)
        if isinstance(value, Mapping) and value:
            items.extend(_flatten(value, dotted))
        else:
            items.append((dotted, value))
    return items


def _newest_first(checkpoints: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Order checkpoints by descending ``sequence``, or reverse the list when any lacks one."""
    sequences = [checkpoint.get("sequence") for checkpoint in checkpoints]
    if all(isinstance(sequence, int) for sequence in sequences):
        return sorted(checkpoints, key=lambda checkpoint: checkpoint["sequence"], reverse=True)
    return list(reversed(checkpoints))


def _checkpoint_line(checkpoint: Mapping[str, Any], width: int = 0) -> str:
    # Names padded to ``width``, so the steps and metrics of the lines start in one column.
    parts = [str(checkpoint.get("name", "?")).ljust(width)]
    if checkpoint.get("step") is not None:
        parts.append(f"step {checkpoint['step']}")
    if checkpoint.get("epoch") is not None:
        parts.append(f"epoch {checkpoint['epoch']}")
    metrics = checkpoint.get("metrics") or {}
    parts.extend(f"{name}={_format_number(metric_value(value))}" for name, value in metrics.items())
    return "  " + "  ".join(parts)


def format_summary(
    tracker: ExperimentTracker,
    *,
    run: Mapping[str, Any],
    checkpoints: list[dict[str, Any]],
    final_model: Mapping[str, Any] | None,
) -> str:
    """Describe a run as readable multi-line text.

    Lists the run's repo_id, local_dir and checkpoint_dir, the hyperparameters (as dotted
    keys), the last and best value of each metric with their steps, the kept checkpoints
    newest first, and the final model's path and format. Every occurrence of one of the
    tracker's secrets is replaced with ``REDACTED``.
    """
    with tracker._lock:
        hyperparameters = tracker.hyperparameters
        metric_names = tracker.metric_names
        last = tracker.last()
        best = tracker.best()
        modes = {name: tracker.metric_mode(name) for name in metric_names}
        secrets = tuple(tracker._secrets)

    run_fields = dict(run)
    lines = ["Run"]
    for key in ("repo_id", "local_dir", "checkpoint_dir"):
        value = run_fields.pop(key, None)
        lines.append(f"  {key}: {'none' if value is None else value}")
    lines.extend(f"  {key}: {value}" for key, value in run_fields.items())

    lines += ["", "Hyperparameters"]
    flat = _flatten(hyperparameters)
    lines.extend(f"  {key}: {_format_hyperparameter(value)}" for key, value in flat)
    if not flat:
        lines.append("  none")

    lines += ["", "Metrics"]
    for name in metric_names:
        latest = last[name]
        text = f"  {name}: last {_format_number(latest['value'])} at step {latest['step']}"
        if name in best:
            text += (
                f", best {_format_number(best[name]['value'])} at step {best[name]['step']}"
                f" ({modes[name]})"
            )
        elif not _is_unranked(name):
            text += f", best none ({modes[name]}, no finite value)"
        lines.append(text)
    if not metric_names:
        lines.append("  none")

    lines += ["", "Checkpoints kept (newest first)"]
    ordered = _newest_first([_plain_dict(item, "checkpoint") for item in checkpoints])
    width = max((len(str(checkpoint.get("name", "?"))) for checkpoint in ordered), default=0)
    lines.extend(_checkpoint_line(checkpoint, width).rstrip() for checkpoint in ordered)
    if not ordered:
        lines.append("  none")

    lines += ["", "Final model"]
    if final_model is None:
        lines.append("  none")
    else:
        model = _plain_dict(final_model, "final model")
        lines.append(f"  path: {model.get('path', 'unknown')}")
        lines.append(f"  format: {model.get('format', 'unknown')}")

    text = "\n".join(lines) + "\n"
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text

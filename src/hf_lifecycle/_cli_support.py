"""Helpers of the ``hf-lifecycle`` command line: policies, sizes, tensor headers and output."""

from __future__ import annotations

import ast
import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hf_lifecycle._io import json_safe, metric_value
from hf_lifecycle.checkpoint.tensorfile import _MAX_HEADER, _corrupted, _parse_header
from hf_lifecycle.errors import ConfigurationError
from hf_lifecycle.retention import (
    AnyOf,
    KeepAll,
    KeepBestM,
    KeepEveryNSteps,
    KeepLastN,
    RetentionPolicy,
)
from hf_lifecycle.tracking import ExperimentTracker

_POLICY_CLASSES = {
    cls.__name__: cls for cls in (AnyOf, KeepAll, KeepBestM, KeepEveryNSteps, KeepLastN)
}


# Retention policies -------------------------------------------------------------------------


def policy_from_options(
    keep_last: int | None, keep_best: int | None, metric: str | None, mode: str | None
) -> RetentionPolicy | None:
    """Build the policy that ``--keep-last``, ``--keep-best``, ``--metric`` and ``--mode`` describe.

    Returns None when none of them is given. Without ``--mode``, the mode is guessed from the
    metric's name as the tracker does: accuracy-like names are maximized, others minimized.
    """
    if keep_best is None and (metric is not None or mode is not None):
        raise ConfigurationError(
            "--metric and --mode describe --keep-best; pass --keep-best M too."
        )
    if keep_best is not None and metric is None:
        raise ConfigurationError(
            "--keep-best needs --metric, the metric logged with each checkpoint, such as "
            "--metric eval_loss."
        )
    policies: list[RetentionPolicy] = []
    if keep_last is not None:
        policies.append(KeepLastN(keep_last))
    if keep_best is not None:
        chosen = mode if mode is not None else ExperimentTracker().metric_mode(metric)
        policies.append(KeepBestM(keep_best, metric=metric, mode=chosen))
    if not policies:
        return None
    return policies[0] if len(policies) == 1 else AnyOf(tuple(policies))


def policy_from_repr(text: object) -> RetentionPolicy | None:
    """Rebuild a built-in policy from its ``repr``, as the metadata file records it.

    The text is parsed, never evaluated: only calls of the built-in policy classes with
    constant arguments are accepted. Returns None for anything else, such as a callable.
    """
    if not isinstance(text, str):
        return None
    try:
        tree = ast.parse(text, mode="eval")
        policy = _build_policy(tree.body)
    except (SyntaxError, ValueError, TypeError):
        return None
    return policy if isinstance(policy, RetentionPolicy) else None


def _build_policy(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, str)):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_build_policy(item) for item in node.elts)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _POLICY_CLASSES
        and not any(keyword.arg is None for keyword in node.keywords)
    ):
        arguments = [_build_policy(item) for item in node.args]
        keywords = {keyword.arg: _build_policy(keyword.value) for keyword in node.keywords}
        return _POLICY_CLASSES[node.func.id](*arguments, **keywords)
    raise ValueError(f"unsupported expression {ast.dump(node)[:80]}")


# Sizes and tensor headers -------------------------------------------------------------------


def folder_size(folder: str | os.PathLike[str]) -> int:
    """Return the bytes of every regular file under ``folder``, without following links."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return total


def format_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def read_tensor_header(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """List the tensors of a safetensors file from its header alone, never reading tensor data.

    Raises CheckpointCorruptedError when the header is unreadable or does not fit the file.
    """
    path = os.fspath(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise _corrupted(path, "the file is missing") from None
    with handle:
        file_size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _corrupted(path, "the file is shorter than a safetensors header")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(_MAX_HEADER, file_size - 8):
            raise _corrupted(path, f"the header length {header_size} exceeds the file")
        raw = handle.read(header_size)
    header, _ = _parse_header(path, raw, file_size - 8 - header_size)
    return [
        {"name": name, "dtype": entry["dtype"], "shape": entry["_shape"]}
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    ]


# Output -------------------------------------------------------------------------------------


def to_json(data: Any) -> str:
    """Return strict JSON (NaN and infinities as strings) for scripts to parse."""
    return json.dumps(json_safe(data), indent=2, sort_keys=False)


def format_metrics(metrics: Mapping[str, Any] | None) -> str:
    if not metrics:
        return "-"
    parts = []
    for name, value in metrics.items():
        number = metric_value(value)
        parts.append(f"{name}={number:.6g}" if isinstance(number, float) else f"{name}={number}")
    return " ".join(parts)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Align ``rows`` under ``headers`` in columns separated by two spaces."""
    cells = [list(map(str, headers))] + [
        ["-" if cell is None else str(cell) for cell in row] for row in rows
    ]
    widths = [max(len(row[index]) for row in cells) for index in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]
    return "\n".join(lines)


def one_line(error: BaseException) -> str:
    """Return the error's message on one line, for a command's error output."""
    text = " ".join(str(error).split())
    return text or type(error).__name__

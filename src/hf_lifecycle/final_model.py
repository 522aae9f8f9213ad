"""The final model folder: weights in the names transformers reads, plus config.json.

Tied weights (an LM head sharing its embedding) are stored once, as
transformers' ``save_pretrained`` does, and come back tied through
:func:`load_model_weights` or ``from_pretrained``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from hf_lifecycle._io import atomic_write_bytes, fsync_dir, temp_path
from hf_lifecycle.checkpoint.serialize import (
    ALIASES_METADATA_KEY,
    config_to_json,
    join_shared,
    split_shared,
    unwrap_model,
)
from hf_lifecycle.checkpoint.store import _rename_exchange
from hf_lifecycle.checkpoint.tensorfile import read_tensors, write_bytes, write_tensors
from hf_lifecycle.errors import ConfigurationError

logger = logging.getLogger(__name__)

SAFETENSORS_WEIGHTS = "model.safetensors"
PT_WEIGHTS = "pytorch_model.bin"
# Files that save_model_folder writes, and so the only ones it may replace.
_MODEL_FILES = frozenset({SAFETENSORS_WEIGHTS, PT_WEIGHTS, "config.json"})


def save_model_folder(
    model: torch.nn.Module,
    folder: str | os.PathLike[str],
    *,
    format: Literal["pt", "safetensors"],
    config: Any = None,
    state_dict: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights and ``config`` into ``folder``, replacing it atomically.

    ``state_dict``, when given, is written in place of ``model.state_dict()``: the
    full state gathered from a sharded model, for example.
    """
    if not isinstance(model, torch.nn.Module):
        raise ConfigurationError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    config_text = config_to_json(config) if config is not None else None
    folder = Path(folder)
    _check_replaceable(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path(folder)
    temp.mkdir()
    try:
        state = dict(state_dict) if state_dict is not None else unwrap_model(model).state_dict()
        if format == "safetensors":
            tensors, aliases, extra = split_shared(state)
            if extra:
                raise ConfigurationError(
                    f"The model's state dict contains non-tensor entries ({', '.join(sorted(extra))}), "
                    f"which safetensors cannot store; use format='pt'."
                )
            metadata = {"format": "pt"}
            if aliases:
                metadata[ALIASES_METADATA_KEY] = json.dumps(aliases, sort_keys=True)
            write_tensors(temp / SAFETENSORS_WEIGHTS, tensors, metadata)
        else:
            with open(temp / PT_WEIGHTS, "xb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
        if config_text is not None:
            write_bytes(temp / "config.json", config_text.encode("utf-8"))
        fsync_dir(temp)
        if folder.exists():
            if not _rename_exchange(temp, folder):
                # Two renames, so the slow removal runs only once the new folder is in place.
                aside = temp_path(folder)
                os.rename(folder, aside)
                os.rename(temp, folder)
                temp = aside
        else:
            os.rename(temp, folder)
        fsync_dir(folder.parent)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return folder


# Records which model files in local_dir save_final_model linked there (by inode and size),
# so that a later save replaces or removes only those and never a file of the user's.
PUBLISHED_RECORD = ".hf_lifecycle_final_model.json"


def publish_model_files(folder: Path, root: Path) -> list[str]:
    """Link the model files of ``folder`` into ``root``, so ``from_pretrained(root)`` loads them.

    Each file is hard-linked (copied where links are not supported) under a temporary name
    and renamed into place. Model files that an earlier call linked into ``root`` and that
    ``folder`` lacks, such as the weights of the other format, are removed: ``from_pretrained``
    prefers ``model.safetensors`` and would otherwise load stale weights. A model file in
    ``root`` that no call linked there (the user's own, or a symlink) is left alone, and then
    nothing is linked: an empty list is returned, with a warning. Returns the names linked.
    """
    owned = _read_published(root)
    foreign = [
        name
        for name in sorted(_MODEL_FILES)
        if _lexists(root / name) and not _owned(root / name, owned)
    ]
    if foreign:
        logger.warning(
            "The final model is saved in %s only: %s in %s was not written by save_final_model, "
            "so it is left alone. Move it away to load the final model from %s itself.",
            folder, " and ".join(foreign), root, root,
        )
        return []
    sources = {name: folder / name for name in sorted(_MODEL_FILES) if (folder / name).is_file()}
    # Recorded before anything changes. After an interruption, the next publish then counts
    # as its own the files linked so far and the earlier model's (such as the other format's
    # weights), and replaces or removes them.
    expected = {name: list(identities) for name, identities in owned.items()}
    for name, path in sources.items():
        expected[name] = expected.get(name, []) + [_identity(path)]
    _write_published(root, expected)
    published: dict[str, list[list[int]]] = {}
    try:
        for name in sorted(_MODEL_FILES):
            target = root / name
            if name not in sources:
                target.unlink(missing_ok=True)
                continue
            _link_or_copy(sources[name], target)
            published[name] = [_identity(target)]
        fsync_dir(root)
    except BaseException:
        # Leave no mix of this model's files and an earlier one's in root.
        for name in _MODEL_FILES:
            if _owned(root / name, expected):
                (root / name).unlink(missing_ok=True)
        raise
    _write_published(root, published)
    return sorted(published)


def _link_or_copy(source: Path, target: Path) -> None:
    temp = temp_path(target)
    try:
        try:
            os.link(source, temp)
        except OSError:
            shutil.copyfile(source, temp)
            with open(temp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def _identity(path: Path) -> list[int]:
    stat = os.stat(path)
    return [stat.st_ino, stat.st_size]


def _lexists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _owned(path: Path, owned: Mapping[str, list[list[int]]]) -> bool:
    """Return True when ``path`` is a regular file that a publish linked (same inode and size)."""
    if path.is_symlink() or not path.is_file():
        return False
    return _identity(path) in owned.get(path.name, [])


def _read_published(root: Path) -> dict[str, list[list[int]]]:
    try:
        data = json.loads((root / PUBLISHED_RECORD).read_text(encoding="utf-8"))
        files = data["files"]
        return {
            str(name): [[int(number) for number in identity] for identity in identities]
            for name, identities in files.items()
        }
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as err:
        logger.warning("Ignoring unreadable %s: %s", root / PUBLISHED_RECORD, err)
        return {}


def _write_published(root: Path, files: Mapping[str, list[list[int]]]) -> None:
    atomic_write_bytes(
        root / PUBLISHED_RECORD,
        json.dumps({"format_version": 1, "files": dict(files)}, sort_keys=True).encode("utf-8"),
    )


def _check_replaceable(folder: Path) -> None:
    """Raise ConfigurationError unless ``folder`` is absent or holds only a saved model's files.

    Saving replaces the whole folder, so a name that points at the checkpoint folder, the
    TensorBoard runs or any other data would delete it.
    """
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise ConfigurationError(
            f"Cannot save the final model to {folder}: it exists and is not a folder. Pass "
            f"another name."
        )
    others = sorted(entry.name for entry in folder.iterdir() if entry.name not in _MODEL_FILES)
    if others:
        raise ConfigurationError(
            f"Cannot save the final model to {folder}: the folder contains files that saving would "
            f"delete ({', '.join(others[:5])}). Pass another name, or empty the folder first."
        )


def load_model_weights(
    model: torch.nn.Module, path: str | os.PathLike[str], *, strict: bool = True
) -> torch.nn.Module:
    """Load weights saved by :meth:`HFManager.save_final_model` (folder or file) into ``model``."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / SAFETENSORS_WEIGHTS, path / PT_WEIGHTS]
        found = [candidate for candidate in candidates if candidate.is_file()]
        if not found:
            raise FileNotFoundError(
                f"No {SAFETENSORS_WEIGHTS} or {PT_WEIGHTS} in {path}; pass the folder that "
                f"save_final_model returned."
            )
        path = found[0]
    if path.suffix == ".safetensors":
        tensors, metadata = read_tensors(path)
        state = join_shared(tensors, json.loads(metadata.get(ALIASES_METADATA_KEY, "{}")))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    target = unwrap_model(model)
    if not strict:
        target.load_state_dict(state, strict=False)
        return model
    # Tied weights saved once are filled from their alias; anything else missing is an error.
    target.load_state_dict(state, strict=True)
    return model

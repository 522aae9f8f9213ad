"""The files of one checkpoint: what a save writes, and how a load reads it back.

A checkpoint folder holds::

    model.safetensors          model weights (shared tensors stored once, aliases in metadata)
    model_extra.json           non-tensor entries of the model's state dict, when there are any
    model_extra.safetensors    tensors inside those entries (get_extra_state), when there are any
    optimizer.json/.safetensors
    scheduler.json/.safetensors
    rng_state.json/.safetensors
    custom_state.json/.safetensors
    custom_state.pkl           only when the caller opted in to pickle for that save
    config.json                when a config was given
    manifest.json              written last; sizes and checksums of every file above
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hf_lifecycle._io import dumps_json
from hf_lifecycle.checkpoint.format import (
    EncodedState,
    MapLocation,
    check_component,
    check_has_data,
    decode_state,
    dumps_pickled,
    encode_state,
    loads_pickled,
)
from hf_lifecycle.checkpoint.store import PendingCheckpoint, manifest_files
from hf_lifecycle.checkpoint.tensorfile import (
    FileRecord,
    read_tensors,
    read_verified_bytes,
    write_bytes,
    write_tensors,
)
from hf_lifecycle.errors import (
    CheckpointCorruptedError,
    CheckpointError,
    ConfigurationError,
    SerializationError,
)

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
MODEL_EXTRA_FILE = "model_extra.json"
MODEL_EXTRA_TENSORS_FILE = "model_extra.safetensors"
CONFIG_FILE = "config.json"
PICKLE_FILE = "custom_state.pkl"
STATE_COMPONENTS = ("optimizer", "scheduler", "rng_state", "custom_state")
ALIASES_METADATA_KEY = "hf_lifecycle.aliases"


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DistributedDataParallel / DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(
            model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
        ):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def check_fits(
    name: str, loaded: LoadedCheckpoint, model: torch.nn.Module | None, optimizer: Any
) -> None:
    """Raise ConfigurationError, before anything changes, when ``loaded`` does not fit.

    ``load_state_dict`` copies every matching tensor before it reports the others, so a
    checkpoint of another architecture would otherwise leave the model half overwritten.
    """
    problems: list[str] = []
    if model is not None and loaded.model_state is not None:
        problems += _model_mismatches(unwrap_model(model), loaded.model_state)
    if optimizer is not None and loaded.optimizer is not None:
        saved = [len(group["params"]) for group in loaded.optimizer["param_groups"]]
        current = [len(group["params"]) for group in optimizer.param_groups]
        if saved != current:
            problems.append(
                f"the optimizer has parameter groups of sizes {current}, the checkpoint {saved}"
            )
    if problems:
        raise ConfigurationError(
            f"Checkpoint {name!r} does not fit the objects passed to load it: "
            f"{'; '.join(problems)}. Nothing was changed. Load it into the model and optimizer "
            f"it was saved from, or pass model=None or optimizer=None to skip one."
        )


def _model_mismatches(model: torch.nn.Module, saved: Mapping[str, Any]) -> list[str]:
    current = model.state_dict()
    problems = []
    for key in sorted(set(saved) & set(current)):
        old, new = saved[key], current[key]
        if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor) and old.shape != new.shape:
            problems.append(f"{key} has shape {list(new.shape)}, the checkpoint {list(old.shape)}")
    # Load pre-hooks may rename or drop keys (to read older layouts), so only modules without
    # them get the key check that strict loading would make afterwards.
    if not any(module._load_state_dict_pre_hooks for module in model.modules()):
        missing = sorted(set(current) - set(saved))
        unexpected = sorted(set(saved) - set(current))
        if missing:
            problems.append(f"the checkpoint lacks {', '.join(missing[:5])}")
        if unexpected:
            problems.append(f"the model has no {', '.join(unexpected[:5])}")
    return problems[:8]


def split_shared(
    state: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """Split a state dict into unique tensors, aliases of shared tensors, and non-tensor entries.

    Tied weights (an LM head sharing its embedding's storage) are stored once; the
    alias map records which names point at the stored one.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    extra: dict[str, Any] = {}
    seen: dict[tuple, str] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            extra[key] = value
            continue
        if value.numel() and value.device.type != "meta":
            # data_ptr() already includes the storage offset, and it is much cheaper than asking
            # for the storage, which matters for models with thousands of tensors. A .conj()
            # or negated view shares the bytes but not the values.
            identity = (
                value.device, value.data_ptr(), tuple(value.shape), value.stride(), value.dtype,
                value.is_conj(), value.is_neg(),
            )
            if identity in seen:
                aliases[key] = seen[identity]
                continue
            seen[identity] = key
        tensors[key] = value
    return tensors, aliases, extra


def join_shared(tensors: dict[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    state = dict(tensors)
    for alias, target in aliases.items():
        if target not in state:
            raise SerializationError(
                f"Weight {alias!r} is stored as an alias of {target!r}, which the file does not hold.",
                key=alias,
            )
        state[alias] = state[target]
    return state


@dataclasses.dataclass
class CheckpointState:
    """Everything one save writes, already split into tensors and JSON."""

    model: dict[str, torch.Tensor] | None = None
    model_aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    model_extra: EncodedState | None = None
    components: dict[str, EncodedState] = dataclasses.field(default_factory=dict)
    config: bytes | None = None

    def tensor_count(self) -> int:
        count = len(self.model or {})
        return count + sum(len(part.tensors) for part in self.components.values())


def build_state(
    *,
    model: torch.nn.Module | None,
    optimizer: Any,
    scheduler: Any,
    rng_state: Mapping[str, Any] | None,
    custom_state: Any,
    config: Any,
    allow_pickle: bool,
) -> CheckpointState:
    """Collect and encode the state to save. Raises before any file is written."""
    state = CheckpointState()
    if model is not None:
        tensors, aliases, extra = split_shared(unwrap_model(model).state_dict())
        for key, tensor in tensors.items():
            check_has_data(f"model.{key}", tensor)
        state.model = tensors
        state.model_aliases = aliases
        if extra:
            state.model_extra = encode_state(extra, root="model", allow_pickle=False)
    if optimizer is not None:
        state.components["optimizer"] = encode_state(optimizer.state_dict(), root="optimizer")
    if scheduler is not None:
        state.components["scheduler"] = encode_state(scheduler.state_dict(), root="scheduler")
    if rng_state is not None:
        state.components["rng_state"] = encode_state(rng_state, root="rng_state")
    if custom_state is not None:
        state.components["custom_state"] = encode_state(
            custom_state, root="custom_state", allow_pickle=allow_pickle
        )
    if config is not None:
        state.config = config_to_json(config).encode("utf-8")
    return state


def config_to_json(config: Any) -> str:
    """Serialize a PretrainedConfig, a dataclass or a dict to the text of a config.json."""
    if hasattr(config, "to_json_string") and callable(config.to_json_string):
        return config.to_json_string(use_diff=False)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise SerializationError(
            f"config must be a transformers PretrainedConfig, a dataclass instance or a dict, "
            f"got {type(config).__name__}.",
            key="config",
        )
    try:
        return json.dumps(dict(config), indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        bad = _first_unserializable(config, "config")
        raise SerializationError(
            f"{bad} is not JSON-serializable ({err}); use plain numbers, strings, lists and dicts "
            f"in config.",
            key=bad,
        ) from err


def _first_unserializable(value: Any, key: str) -> str:
    if isinstance(value, Mapping):
        for k, v in value.items():
            found = _first_unserializable(v, f"{key}.{k}")
            if found:
                return found
        return ""
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _first_unserializable(item, f"{key}[{index}]")
            if found:
                return found
        return ""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return key
    return ""


def write_state(pending: PendingCheckpoint, state: CheckpointState) -> dict[str, Any]:
    """Write every file of ``state`` into the pending folder. Returns the manifest's components."""
    folder = pending.temp_dir
    components: dict[str, Any] = {}
    if state.model is not None:
        metadata = {"format": "pt"}
        if state.model_aliases:
            metadata[ALIASES_METADATA_KEY] = json.dumps(state.model_aliases, sort_keys=True)
        pending.add(MODEL_FILE, write_tensors(folder / MODEL_FILE, state.model, metadata))
        entry: dict[str, Any] = {"files": [MODEL_FILE], "aliases": dict(state.model_aliases)}
        if state.model_extra is not None:
            pending.add(
                MODEL_EXTRA_FILE, write_bytes(folder / MODEL_EXTRA_FILE, _tree_bytes(state.model_extra))
            )
            entry["files"].append(MODEL_EXTRA_FILE)
            if state.model_extra.tensors:
                # Tensors inside extra state (get_extra_state), referenced from its JSON tree.
                pending.add(
                    MODEL_EXTRA_TENSORS_FILE,
                    write_tensors(folder / MODEL_EXTRA_TENSORS_FILE, state.model_extra.tensors),
                )
                entry["files"].append(MODEL_EXTRA_TENSORS_FILE)
        components["model"] = entry
    for name, encoded in state.components.items():
        files = [f"{name}.json"]
        pending.add(files[0], write_bytes(folder / files[0], _tree_bytes(encoded)))
        if encoded.tensors:
            files.append(f"{name}.safetensors")
            pending.add(files[1], write_tensors(folder / files[1], encoded.tensors))
        if encoded.pickled:
            files.append(PICKLE_FILE)
            data = encoded.pickled_bytes
            if data is None:
                data = dumps_pickled(encoded.pickled)
            pending.add(PICKLE_FILE, write_bytes(folder / PICKLE_FILE, data))
        components[name] = {"files": files, "pickle": bool(encoded.pickled)}
    if state.config is not None:
        pending.add(CONFIG_FILE, write_bytes(folder / CONFIG_FILE, state.config))
        components["config"] = {"files": [CONFIG_FILE]}
    return components


def _tree_bytes(encoded: EncodedState) -> bytes:
    # Compact JSON goes through json's C encoder, about 8x faster than the indenting one on an
    # optimizer tree of thousands of tensors. encode_state already tags non-finite floats, so
    # allow_nan=False only fails on a tree built some other way, which dumps_json handles.
    try:
        text = json.dumps(encoded.tree, separators=(",", ":"), allow_nan=False) + "\n"
    except ValueError:
        text = dumps_json(encoded.tree)
    return text.encode("utf-8")


@dataclasses.dataclass
class LoadedCheckpoint:
    """A checkpoint read back from disk, verified, with its state decoded."""

    manifest: dict[str, Any]
    model_state: dict[str, torch.Tensor] | None
    optimizer: Any = None
    scheduler: Any = None
    rng_state: Any = None
    custom_state: Any = None
    config: dict[str, Any] | None = None


def read_state(
    folder: Path,
    manifest: dict[str, Any],
    *,
    map_location: MapLocation = None,
    allow_pickle: bool = False,
) -> LoadedCheckpoint:
    """Read and verify every file a manifest lists, then decode the state. Never unpickles by default.

    Files that match their checksums but not the structure this library writes (crafted, or
    written by other code) raise :class:`CheckpointCorruptedError`, like damaged ones.
    """
    try:
        return _read_state(folder, manifest, map_location, allow_pickle)
    except (CheckpointError, ConfigurationError):
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as err:
        # SerializationError is a TypeError: a missing tensor or alias is corruption here too.
        raise CheckpointCorruptedError(
            f"Checkpoint {folder} is corrupted: its content does not have the structure "
            f"hf-lifecycle writes ({type(err).__name__}: {str(err)[:200]}).",
            path=str(folder),
        ) from err


def _read_state(
    folder: Path, manifest: dict[str, Any], map_location: MapLocation, allow_pickle: bool
) -> LoadedCheckpoint:
    records = manifest_files(manifest)
    components = manifest.get("components") or {}
    if not isinstance(components, dict) or not all(
        isinstance(entry, dict) and isinstance(entry.get("files", []), list)
        for entry in components.values()
    ):
        raise ValueError("the manifest's components are not a table of file lists")
    loaded = LoadedCheckpoint(manifest=manifest, model_state=None)

    def record(relative: str) -> FileRecord:
        if relative not in records:
            raise CheckpointCorruptedError(
                f"Checkpoint {folder} lists {relative} as a component but has no checksum for it.",
                path=str(folder),
                file=str(folder / relative),
            )
        return records[relative]

    if "model" in components:
        tensors, _ = read_tensors(folder / MODEL_FILE, record(MODEL_FILE))
        state: dict[str, Any] = join_shared(tensors, components["model"].get("aliases") or {})
        model_files = components["model"].get("files", [])
        if MODEL_EXTRA_FILE in model_files:
            tree = json.loads(read_verified_bytes(folder / MODEL_EXTRA_FILE, record(MODEL_EXTRA_FILE)))
            extra_tensors: dict[str, torch.Tensor] = {}
            if MODEL_EXTRA_TENSORS_FILE in model_files:
                extra_tensors, _ = read_tensors(
                    folder / MODEL_EXTRA_TENSORS_FILE, record(MODEL_EXTRA_TENSORS_FILE)
                )
            extra = decode_state(tree, extra_tensors)
            if not isinstance(extra, dict) or set(extra) & set(state):
                raise CheckpointCorruptedError(
                    f"Checkpoint {folder} is corrupted: {MODEL_EXTRA_FILE} is not a table of "
                    f"entries apart from the model's tensors.",
                    path=str(folder),
                    file=str(folder / MODEL_EXTRA_FILE),
                )
            state.update(extra)
        loaded.model_state = state
    for name in STATE_COMPONENTS:
        if name not in components:
            continue
        entry = components[name]
        tree = json.loads(read_verified_bytes(folder / f"{name}.json", record(f"{name}.json")))
        tensors = {}
        if f"{name}.safetensors" in entry.get("files", []):
            tensors, _ = read_tensors(folder / f"{name}.safetensors", record(f"{name}.safetensors"))
        pickled = None
        if entry.get("pickle"):
            if not allow_pickle:
                raise CheckpointError(
                    f"Checkpoint {folder} contains pickled {name} values, and pickle can run code "
                    f"from the file. Load it with allow_pickle=True only if you trust it.",
                    path=str(folder),
                )
            pickled = loads_pickled(read_verified_bytes(folder / PICKLE_FILE, record(PICKLE_FILE)))
        # Only optimizer state may stay a view into the read buffer: load_state_dict copies or
        # keeps it as ordinary tensors. RNG setters read raw storage, and custom state goes back
        # to the caller, so both get tensors of their own.
        value = decode_state(
            tree,
            tensors,
            pickled=pickled,
            map_location=map_location if name == "custom_state" else "cpu",
            copy_tensors=name != "optimizer",
        )
        if name != "custom_state":
            check_component(name, value)
        setattr(loaded, name, value)
    if "config" in components:
        loaded.config = json.loads(read_verified_bytes(folder / CONFIG_FILE, record(CONFIG_FILE)))
    return loaded

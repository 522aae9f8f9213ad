"""Training state as tensors plus JSON, and back, without pickle.

A nested state (an optimizer ``state_dict``, a scheduler's, RNG states, the
caller's ``custom_state``) is split into a JSON tree and a flat mapping of
tensors. The tree keeps every type that matters for an exact round trip:
tuples, dicts with integer keys, non-finite floats and NumPy arrays are tagged
with ``"__type__"`` markers, and each tensor is replaced by a reference to its
key in the companion safetensors file.

Objects that neither JSON nor safetensors can represent are an error, unless
the caller opted in to pickle for that save; pickled values are then kept in a
separate file that loading reads only when the caller opts in again.
"""

from __future__ import annotations

import enum
import io
import math
import pickle
import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from hf_lifecycle.errors import ConfigurationError, SerializationError

TYPE_KEY = "__type__"
_SCALARS = (str, int, bool, type(None))


class EncodedState:
    """A state split into a JSON tree, its tensors, and (only when opted in) pickled values."""

    def __init__(self) -> None:
        self.tree: Any = None
        self.tensors: dict[str, torch.Tensor] = {}
        self.pickled: dict[str, Any] = {}
        # The pickled values already serialized, when they must not change after the save
        # call (an asynchronous save); None to serialize them when the file is written.
        self.pickled_bytes: bytes | None = None


def encode_state(state: Any, *, root: str, allow_pickle: bool = False) -> EncodedState:
    """Split ``state`` into a JSON tree and tensors. ``root`` names the state in error messages."""
    encoded = EncodedState()
    try:
        encoded.tree = _encode(state, root, encoded, allow_pickle)
    except RecursionError:
        raise SerializationError(
            f"{root} contains itself, or is nested deeper than Python's recursion limit. Pass a "
            f"copy without the cycle, or flatten it.",
            key=root,
        ) from None
    return encoded


def _encode(value: Any, key: str, out: EncodedState, allow_pickle: bool) -> Any:
    # Tensors first: an optimizer's state is mostly tensors, thousands of them in a deep model.
    if isinstance(value, torch.Tensor):
        if value.is_meta:
            check_has_data(key, value)
        key = _unused(key, out.tensors)
        out.tensors[key] = value
        return {TYPE_KEY: "tensor", "key": key, "device": str(value.device)}
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {TYPE_KEY: "float", "value": repr(value)}
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return _fallback(value, key, out, allow_pickle)
        key = _unused(key, out.tensors)
        out.tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
        return {TYPE_KEY: "ndarray", "key": key, "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return _encode(value.item(), key, out, allow_pickle)
    if isinstance(value, torch.dtype):
        return {TYPE_KEY: "dtype", "value": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {TYPE_KEY: "device", "value": str(value)}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        items = [_encode(item, f"{key}[{index}]", out, allow_pickle) for index, item in enumerate(value)]
        return {TYPE_KEY: "tuple", "items": items}
    if isinstance(value, list):
        return [_encode(item, f"{key}[{index}]", out, allow_pickle) for index, item in enumerate(value)]
    if isinstance(value, dict):
        # OrderedDict and defaultdict come back as plain dicts, which load_state_dict accepts.
        if all(isinstance(k, str) and k != TYPE_KEY for k in value):
            return {k: _encode(v, f"{key}.{k}", out, allow_pickle) for k, v in value.items()}
        items = []
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool, type(None))) or isinstance(k, enum.Enum):
                return _fallback(value, key, out, allow_pickle)
            items.append([k, _encode(v, f"{key}[{k!r}]", out, allow_pickle)])
        return {TYPE_KEY: "dict", "items": items}
    return _fallback(value, key, out, allow_pickle)


def _unused(key: str, used_names: Mapping[str, Any]) -> str:
    """Return ``key``, or ``key#2``, ``key#3``... when another value already has that name.

    Names are built from the path (``a.b``, ``a[0]``), and different paths can give the same
    name: ``{"a.b": x, "a": {"b": y}}``. The tree records the name each value got.
    """
    if key not in used_names:
        return key
    number = 2
    while f"{key}#{number}" in used_names:
        number += 1
    return f"{key}#{number}"


def check_has_data(key: str, tensor: torch.Tensor) -> None:
    """Raise SerializationError for a tensor on the meta device, which has a shape but no data."""
    if tensor.device.type == "meta":
        raise SerializationError(
            f"{key} is a tensor on the meta device, which has no data to save. Materialize "
            f"it first, for example with module.to_empty(device='cpu') and then loading weights.",
            key=key,
        )


def _fallback(value: Any, key: str, out: EncodedState, allow_pickle: bool) -> Any:
    if not allow_pickle:
        raise SerializationError(
            f"{key} contains a {type(value).__module__}.{type(value).__qualname__}, which JSON and "
            f"safetensors cannot store. Convert it to tensors, numbers, strings, lists or dicts, "
            f"or pass allow_pickle=True to this call if the checkpoint will only be loaded by "
            f"code you trust.",
            key=key,
        )
    key = _unused(key, out.pickled)
    out.pickled[key] = value
    return {TYPE_KEY: "pickle", "key": key}


MapLocation = Callable[[torch.Tensor, str], torch.Tensor] | str | torch.device | Mapping | None


def decode_state(
    tree: Any,
    tensors: Mapping[str, torch.Tensor],
    *,
    pickled: Mapping[str, Any] | None = None,
    map_location: MapLocation = "cpu",
    copy_tensors: bool = False,
) -> Any:
    """Rebuild a state from :func:`encode_state`'s parts.

    ``map_location`` works as in :func:`torch.load`: ``None`` restores each tensor
    to the device it was saved from (falling back to the CPU when that device is
    absent), a device or string moves every tensor there, a dict remaps device
    names, and a callable receives ``(tensor, saved_device)``.
    """
    return _decode(tree, tensors, pickled or {}, map_location, copy_tensors)


def _decode(value: Any, tensors, pickled, map_location, copy_tensors) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors, pickled, map_location, copy_tensors) for item in value]
    if not isinstance(value, dict):
        return value
    kind = value.get(TYPE_KEY)
    if kind is None:
        return {k: _decode(v, tensors, pickled, map_location, copy_tensors) for k, v in value.items()}
    if kind == "tensor":
        tensor = _lookup(tensors, value["key"])
        if copy_tensors:
            tensor = tensor.clone()
        return place_tensor(tensor, value.get("device", "cpu"), map_location)
    if kind == "ndarray":
        array = _lookup(tensors, value["key"]).numpy()
        return np.array(array, dtype=np.dtype(value["dtype"]), copy=True)
    if kind == "float":
        return float(value["value"])
    if kind == "tuple":
        return tuple(_decode(item, tensors, pickled, map_location, copy_tensors) for item in value["items"])
    if kind == "dict":
        return {
            k: _decode(v, tensors, pickled, map_location, copy_tensors) for k, v in value["items"]
        }
    if kind == "dtype":
        dtype = getattr(torch, value["value"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{value['value']!r} is not a torch dtype")
        return dtype
    if kind == "device":
        try:
            return torch.device(value["value"])
        except RuntimeError as err:
            raise ValueError(f"{value['value']!r} is not a torch device") from err
    if kind == "pickle":
        if value["key"] not in pickled:
            raise SerializationError(
                f"{value['key']} was saved with pickle; load it with allow_pickle=True, "
                f"and only if you trust the checkpoint.",
                key=value["key"],
            )
        return pickled[value["key"]]
    raise SerializationError(f"Unknown type marker {kind!r} in checkpoint state.", key=str(kind))


def _lookup(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    try:
        return tensors[key]
    except KeyError:
        raise SerializationError(
            f"Checkpoint state refers to tensor {key!r}, which its tensor file does not hold.",
            key=key,
        ) from None


def place_tensor(tensor: torch.Tensor, saved_device: str, map_location: MapLocation) -> torch.Tensor:
    """Move a loaded CPU tensor to the device ``map_location`` selects, as :func:`torch.load` does."""
    if map_location is None:
        target = saved_device
        if not _device_available(target):
            target = "cpu"
    elif callable(map_location):
        return map_location(tensor, saved_device)
    elif isinstance(map_location, Mapping):
        target = map_location.get(saved_device, saved_device)
        if not _device_available(str(target)):
            target = "cpu"
    else:
        target = map_location
    if torch.device(target).type == "cpu":
        return tensor
    return tensor.to(target)


def check_map_location(map_location: Any) -> None:
    """Raise ConfigurationError for a ``map_location`` that no load could use, before any I/O."""
    if map_location is None or callable(map_location):
        return
    targets = list(map_location.values()) if isinstance(map_location, Mapping) else [map_location]
    for target in targets:
        try:
            device = torch.device(target)
        except (RuntimeError, TypeError) as err:
            raise ConfigurationError(
                f"Invalid map_location {map_location!r}: {target!r} is not a device. Pass "
                f"'cpu', 'cuda:0', a torch.device, a dict from saved to new device names, a "
                f"function (tensor, saved_device) -> tensor, or None."
            ) from err
        # A dict entry falls back to the CPU when its device is absent; a plain target does not.
        absent = device.type in ("cuda", "mps") and not _device_available(str(device))
        if absent and not isinstance(map_location, Mapping):
            raise ConfigurationError(
                f"Invalid map_location {map_location!r}: this machine has no {device.type} "
                f"device. Pass map_location='cpu', or None to use the saved devices where present."
            )


def _device_available(device: str) -> bool:
    kind = torch.device(device).type
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return False


def dumps_pickled(pickled: Mapping[str, Any]) -> bytes:
    return pickle.dumps(dict(pickled), protocol=pickle.HIGHEST_PROTOCOL)


def loads_pickled(data: bytes) -> dict[str, Any]:
    """Unpickle opted-in values. Only called when the caller passed ``allow_pickle=True``."""
    return pickle.load(io.BytesIO(data))  # noqa: S301 - explicit opt-in by the caller


# RNG states ---------------------------------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """Capture the Python, NumPy, torch CPU and (when initialised) CUDA generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def check_component(name: str, value: Any) -> None:
    """Raise ValueError unless a decoded optimizer, scheduler or RNG state has the saved shape.

    Loading applies these states only after the model is loaded, so a malformed one found
    there would leave the run half restored.
    """
    if name == "rng_state":
        # A list contains one state per rank. Each is tried on new generators, not the global ones.
        for state in value if isinstance(value, list) else [value]:
            _check_rng_state(state)
        return
    if not isinstance(value, dict):
        raise ValueError(f"the {name} state is a {type(value).__name__}, not a dict")
    if name == "optimizer" and not (
        isinstance(value.get("state"), dict)
        and isinstance(value.get("param_groups"), list)
        and all(
            isinstance(group, dict) and isinstance(group.get("params"), list)
            for group in value["param_groups"]
        )
    ):
        raise ValueError("the optimizer state has no 'state' dict and 'param_groups' list")


def _check_rng_state(state: Any) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"an RNG state is a {type(state).__name__}, not a dict")
    if "python" in state:
        random.Random().setstate(state["python"])
    if "numpy" in state:
        np.random.RandomState().set_state(tuple(state["numpy"]))
    if "torch" in state:
        try:
            torch.Generator().set_state(state["torch"].cpu())
        except RuntimeError as err:
            raise ValueError(f"the torch RNG state is invalid ({err})") from err
    if "cuda" in state and not all(isinstance(item, torch.Tensor) for item in state["cuda"]):
        raise ValueError("the CUDA RNG states are not tensors")


def restore_rng_state(state: Mapping[str, Any]) -> None:
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(tuple(state["numpy"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            for index, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, index)

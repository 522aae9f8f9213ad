"""Loading ``torch.distributed.checkpoint`` (DCP) folders without running code from them.

DCP (checked with torch 2.13) reads its ``.metadata`` file with ``pickle.load`` and the
non-tensor values of a state dict with ``torch.load(weights_only=False)``, so a crafted sharded
checkpoint could run any code while it loads. Here the metadata goes through an unpickler that
builds only DCP's own metadata types, and the values through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

METADATA_NAME = ".metadata"

# Globals that DCP metadata pickles refer to, besides the classes of its metadata module and
# the torch dtypes. Each one only builds a value: none reads files or runs a command.
_ALLOWED_GLOBALS = frozenset(
    {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
    }
)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == dcp_metadata.__name__:
            value = getattr(dcp_metadata, name, None)
            if isinstance(value, type) and value.__module__ == module:
                return value
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"the DCP metadata refers to {module}.{name}, which DCP metadata never contains"
        )


def read_metadata(path: str | Path) -> Any:
    """Unpickle a DCP ``.metadata`` file, rejecting anything but DCP's metadata types."""
    with open(path, "rb") as handle:
        return _MetadataUnpickler(handle).load()


class SafeFileSystemReader(FileSystemReader):
    """A DCP reader whose metadata is unpickled by :func:`read_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("rank") is not None:
            # Per-rank metadata files are written only without a coordinator, which
            # hf-lifecycle never does.
            raise pickle.UnpicklingError("per-rank DCP metadata is not supported")
        metadata = read_metadata(Path(self.path) / METADATA_NAME)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor values load with weights_only=True."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        # The parent class loads with weights_only=False. Handing it a fresh pickle of a value
        # that the weights-only unpickler accepted keeps its bookkeeping without that risk.
        safe = io.BytesIO()
        torch.save(loaded, safe)
        safe.seek(0)
        super().load_bytes(read_item, safe)

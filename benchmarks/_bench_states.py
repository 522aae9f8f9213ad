"""The training states the checkpoint benchmark saves and loads, and cache helpers."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch

# Width of the large state's square Linear layers is chosen so that the state reaches the
# requested size with this many layers.
LARGE_LAYERS = 5
# fp32 parameter + AdamW exp_avg + exp_avg_sq: 12 bytes of state per parameter.
_BYTES_PER_PARAMETER = 12
SMALL_WIDTH = 128
# Rows in the batch of the training step that follows each asynchronous save.
TRAIN_BATCH = 32


@dataclasses.dataclass
class TrainingState:
    """A model and its AdamW optimizer, with every optimizer state tensor populated."""

    label: str
    description: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    nbytes: int
    tensor_count: int
    batch: torch.Tensor

    def forward_backward(self) -> None:
        """Run one forward and backward pass on the state's training batch."""
        self.model(self.batch).square().mean().backward()


def _populate(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor
) -> None:
    loss = model(batch).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Return every tensor that a checkpoint of ``model`` and ``optimizer`` writes."""
    tensors = list(model.state_dict().values())
    for per_param in optimizer.state_dict()["state"].values():
        tensors.extend(value for value in per_param.values() if isinstance(value, torch.Tensor))
    return tensors


def _finish(
    label: str, description: str, model: torch.nn.Module, batch: torch.Tensor
) -> TrainingState:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _populate(model, optimizer, batch)
    tensors = state_tensors(model, optimizer)
    nbytes = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    # The batch of the training step that follows an asynchronous save: a small one, so the
    # forward and backward passes that overlap with the background copy are short.
    train_batch = torch.randn(TRAIN_BATCH, batch.shape[1])
    return TrainingState(label, description, model, optimizer, nbytes, len(tensors), train_batch)


def build_large_state(size_gb: float) -> TrainingState:
    """Build an MLP of square fp32 Linear layers whose weights + AdamW state total ``size_gb``."""
    per_layer = size_gb * 1e9 / LARGE_LAYERS / _BYTES_PER_PARAMETER
    width = max(64, round(math.sqrt(per_layer) / 64) * 64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(LARGE_LAYERS)))
    description = f"{LARGE_LAYERS} x Linear({width}, {width}), fp32, AdamW"
    return _finish("large", description, model, torch.randn(4, width))


def build_small_state(blocks: int) -> TrainingState:
    """Build a deep stack of small Linear + LayerNorm blocks, with 4 model tensors per block."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(blocks):
        layers += [torch.nn.Linear(SMALL_WIDTH, SMALL_WIDTH), torch.nn.LayerNorm(SMALL_WIDTH)]
    model = torch.nn.Sequential(*layers)
    description = (
        f"{blocks} x (Linear({SMALL_WIDTH}, {SMALL_WIDTH}) + LayerNorm({SMALL_WIDTH})), "
        f"{4 * blocks} model tensors, fp32, AdamW"
    )
    return _finish("small", description, model, torch.randn(8, SMALL_WIDTH))


def files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(item for item in path.rglob("*") if item.is_file())


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to drop the cached pages of every file under ``path``.

    The files were fsynced before this is called, so their pages are clean and
    ``POSIX_FADV_DONTNEED`` evicts them. The next read then comes from the disk, or from
    whatever cache the disk itself has below the guest.
    """
    for file in files_under(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fsync_tree(path: Path) -> None:
    """Call fsync on every file under ``path`` and on every folder that contains one."""
    folders = {path} if path.is_dir() else {path.parent}
    for file in files_under(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        folders.add(file.parent)
    for folder in folders:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

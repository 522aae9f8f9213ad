"""The save and load methods the checkpoint benchmark compares.

Every save is durable: the method's own call, then an fsync of each file it wrote
(for methods that do not fsync themselves). Every load ends with the state inside
the same model and optimizer objects, except the plain read, which only reads bytes.
"""

from __future__ import annotations

import inspect
import mmap
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from _bench_states import TrainingState, fsync_tree, state_tensors
from hf_lifecycle import HFManager

BLOCK = 16 * 1024 * 1024
_DIRECT_ALIGNMENT = 4096


class Method:
    """One way to save and load a training state. ``key`` names it in the results."""

    key = ""
    label = ""
    has_load = True

    def __init__(self, state: TrainingState, folder: Path) -> None:
        self.state = state
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def available(self) -> str | None:
        """Return why the method cannot run here, or None when it can."""
        return None

    def switch_state(self, state: TrainingState) -> bool:
        """Save ``state`` from now on, keeping everything else.

        Return False where that is not possible.
        """
        self.state = state
        return True

    def output(self, rep: int) -> Path:
        return self.folder / f"rep-{rep}"

    def save(self, rep: int) -> dict[str, float]:
        """Save the state for repetition ``rep`` and return the timings by operation, in seconds."""
        return {"save": _timed(self._save, self.output(rep))}

    def load(self, rep: int) -> float:
        """Load what repetition ``rep`` saved back into the state and return the seconds it took."""
        return _timed(self._load, self.output(rep))

    def _save(self, path: Path) -> None:
        raise NotImplementedError

    def _load(self, path: Path) -> None:
        raise NotImplementedError

    def remove(self, rep: int) -> None:
        path = self.output(rep)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _timed(function, *args, **kwargs) -> float:
    start = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - start


def _fill_with_state(buffer: torch.Tensor, state: TrainingState) -> None:
    """Copy the bytes of every tensor that a checkpoint of ``state`` writes into ``buffer``."""
    offset = 0
    for tensor in state_tensors(state.model, state.optimizer):
        flat = tensor.detach().reshape(-1).view(torch.uint8)
        buffer[offset : offset + flat.numel()].copy_(flat)
        offset += flat.numel()


class DiskLimit(Method):
    """Plain ``os.write`` of the state's bytes in 16 MiB blocks + fsync, and ``readinto`` back."""

    key = "disk"
    label = "plain write/read, 16 MiB blocks"

    def __init__(self, state: TrainingState, folder: Path) -> None:
        super().__init__(state, folder)
        # The same bytes as the state, gathered into one buffer that is already paged in,
        # so that neither the writes nor the reads pay for page faults.
        self.buffer = torch.empty(state.nbytes, dtype=torch.uint8)
        _fill_with_state(self.buffer, state)
        self.view = memoryview(self.buffer.numpy())

    def _save(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for start in range(0, len(self.view), BLOCK):
                block = self.view[start : start + BLOCK]
                while block:
                    block = block[os.write(fd, block) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _load(self, path: Path) -> None:
        with open(path, "rb", buffering=0) as handle:
            position = 0
            while position < len(self.view):
                count = handle.readinto(self.view[position : position + BLOCK])
                if not count:
                    raise EOFError(f"{path} is shorter than the {len(self.view)} bytes written")
                position += count


class DiskDirect(Method):
    """``O_DIRECT`` writes of the state's bytes in 16 MiB blocks + fsync, and ``O_DIRECT`` reads.

    This bypasses the page cache, so it shows what the device itself sustains. The byte count
    is rounded up to a multiple of 4 KiB, as ``O_DIRECT`` requires.
    """

    key = "disk_direct"
    label = "O_DIRECT write/read, 16 MiB blocks"

    def __init__(self, state: TrainingState, folder: Path) -> None:
        super().__init__(state, folder)
        self.size = -(-state.nbytes // _DIRECT_ALIGNMENT) * _DIRECT_ALIGNMENT
        # An anonymous mapping is page-aligned, as O_DIRECT needs its buffers to be.
        self.mapping = mmap.mmap(-1, self.size)
        self.view = memoryview(self.mapping)
        _fill_with_state(torch.frombuffer(self.mapping, dtype=torch.uint8), state)

    def available(self) -> str | None:
        if not hasattr(os, "O_DIRECT"):
            return "this platform has no O_DIRECT"
        probe = self.folder / "probe"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
            try:
                os.write(fd, self.view[:_DIRECT_ALIGNMENT])
            finally:
                os.close(fd)
        except OSError as err:
            return f"the file system rejects O_DIRECT ({err})"
        finally:
            probe.unlink(missing_ok=True)
        return None

    def _save(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
        try:
            for start in range(0, self.size, BLOCK):
                written = os.write(fd, self.view[start : start + BLOCK])
                if written != min(BLOCK, self.size - start):
                    raise OSError(f"short O_DIRECT write to {path}: {written} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)

    def _load(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            for start in range(0, self.size, BLOCK):
                count = os.readv(fd, [self.view[start : start + BLOCK]])
                if count != min(BLOCK, self.size - start):
                    raise EOFError(f"short O_DIRECT read from {path}: {count} bytes")
        finally:
            os.close(fd)


class TorchSave(Method):
    """``torch.save`` of both state dicts + fsync.

    The load is ``torch.load(weights_only=True)``, then ``load_state_dict`` into the model and
    the optimizer.
    """

    key = "torch"
    label = "torch.save / torch.load"

    def output(self, rep: int) -> Path:
        return self.folder / f"rep-{rep}.pt"

    def _save(self, path: Path) -> None:
        state = {
            "model": self.state.model.state_dict(),
            "optimizer": self.state.optimizer.state_dict(),
        }
        with open(path, "xb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())

    def _load(self, path: Path) -> None:
        state = torch.load(path, weights_only=True)
        self.state.model.load_state_dict(state["model"])
        self.state.optimizer.load_state_dict(state["optimizer"])


_OPTIMIZER_PREFIX = "optimizer.state."


class SafetensorsFile(Method):
    """safetensors ``save_file`` of the model + flattened optimizer tensors + fsync; ``load_file``.

    The load also puts the tensors back with ``load_state_dict``, taking the optimizer's
    param_groups from the live optimizer (they are small and would travel as JSON).
    ``load_file`` returns tensors backed by a memory map of the file (safetensors 0.8), and
    ``Optimizer.load_state_dict`` keeps them as they are. The optimizer's bytes are therefore
    read from the disk on first use, after the clock stops, so this load reads only the model.
    """

    key = "safetensors"
    label = "safetensors save_file / load_file"

    def output(self, rep: int) -> Path:
        return self.folder / f"rep-{rep}.safetensors"

    def _save(self, path: Path) -> None:
        from safetensors.torch import save_file

        flat = {f"model.{key}": value for key, value in self.state.model.state_dict().items()}
        for index, per_param in self.state.optimizer.state_dict()["state"].items():
            for name, value in per_param.items():
                flat[f"{_OPTIMIZER_PREFIX}{index}.{name}"] = value
        save_file(flat, path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _load(self, path: Path) -> None:
        from safetensors.torch import load_file

        flat = load_file(path)
        model_state = {}
        optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            if key.startswith(_OPTIMIZER_PREFIX):
                index, name = key[len(_OPTIMIZER_PREFIX) :].split(".", 1)
                optimizer_state.setdefault(int(index), {})[name] = value
            else:
                model_state[key[len("model.") :]] = value
        self.state.model.load_state_dict(model_state)
        groups = self.state.optimizer.state_dict()["param_groups"]
        self.state.optimizer.load_state_dict({"state": optimizer_state, "param_groups": groups})


class AccelerateState(Method):
    """accelerate ``save_state`` + fsync of every file it wrote; ``load_state``."""

    key = "accelerate"
    label = "accelerate save_state / load_state"

    def __init__(self, state: TrainingState, folder: Path) -> None:
        super().__init__(state, folder)
        self.accelerator = None
        try:
            from accelerate import Accelerator
        except ImportError as err:
            self._missing = f"accelerate is not importable ({err})"
            return
        self._missing = None
        self.accelerator = Accelerator(cpu=True)
        self.model, self.optimizer = self.accelerator.prepare(state.model, state.optimizer)

    def available(self) -> str | None:
        return self._missing

    def switch_state(self, state: TrainingState) -> bool:
        return False  # The Accelerator saves the objects it prepared in __init__.

    def _save(self, path: Path) -> None:
        self.accelerator.save_state(str(path))
        fsync_tree(path)

    def _load(self, path: Path) -> None:
        self.accelerator.load_state(str(path))


class LibrarySync(Method):
    """``HFManager.save_checkpoint`` (durable, checksummed); ``load_checkpoint`` (verified)."""

    key = "hf_lifecycle"
    label = "hf_lifecycle save_checkpoint / load_checkpoint"

    def __init__(self, state: TrainingState, folder: Path) -> None:
        super().__init__(state, folder)
        self.manager = HFManager(
            checkpoint_dir=folder / "checkpoints", local_dir=folder / "outputs"
        )

    def name(self, rep: int) -> str:
        return f"{self.key}-rep-{rep}"

    def output(self, rep: int) -> Path:
        return self.manager.checkpoint_dir / self.name(rep)

    def save(self, rep: int) -> dict[str, float]:
        return {"save": _timed(self._save_checkpoint, rep)}

    def _save_checkpoint(self, rep: int, **options: Any) -> None:
        self.manager.save_checkpoint(
            model=self.state.model, optimizer=self.state.optimizer, step=rep, name=self.name(rep),
            **options,
        )

    def load(self, rep: int) -> float:
        return _timed(
            self.manager.load_checkpoint,
            self.name(rep),
            model=self.state.model,
            optimizer=self.state.optimizer,
        )


def async_save_missing(manager: HFManager) -> str | None:
    """Return why ``save_checkpoint(blocking=False)`` cannot be benchmarked, or None."""
    parameters = inspect.signature(manager.save_checkpoint).parameters
    if "blocking" not in parameters:
        return "HFManager.save_checkpoint has no blocking parameter"
    if not hasattr(manager, "wait_for_checkpoints"):
        return "HFManager has no wait_for_checkpoints method"
    return None


class LibraryAsync(LibrarySync):
    """``save_checkpoint(blocking=False)``, followed by one training step as a loop would run
    it: a forward and backward pass on a batch of 32 rows, then ``optimizer.step()``. The
    time blocked is the call plus the time ``step()`` waits for the background copy of the
    optimizer state (timed by a step pre-hook registered after the library's). The total
    runs until ``wait_for_checkpoints()`` returns, training step included."""

    key = "hf_lifecycle_async"
    label = "hf_lifecycle save_checkpoint(blocking=False)"
    has_load = False  # It writes the same checkpoint as the sync save, so the load is the same.
    # The memory measurement turns this off: the step's gradients would count as the save's.
    train_between = True

    def __init__(self, state: TrainingState, folder: Path) -> None:
        super().__init__(state, folder)
        self._hooked = False
        self._step_entered = 0.0

    def available(self) -> str | None:
        return async_save_missing(self.manager)

    def _record_step_entry(self, *_: Any) -> None:
        self._step_entered = time.perf_counter()

    def save(self, rep: int) -> dict[str, float]:
        start = time.perf_counter()
        self._save_checkpoint(rep, blocking=False)
        call = time.perf_counter() - start
        if not self.train_between:
            self.manager.wait_for_checkpoints()
            return {"blocked": call, "save": time.perf_counter() - start}
        if not self._hooked:
            # Registered after the save, so it runs after the library's hook.
            self.state.optimizer.register_step_pre_hook(self._record_step_entry)
            self._hooked = True
        compute_start = time.perf_counter()
        self.state.forward_backward()
        step_called = time.perf_counter()
        self.state.optimizer.step()
        self.state.optimizer.zero_grad(set_to_none=True)
        waited = self._step_entered - step_called
        self.manager.wait_for_checkpoints()
        return {
            "call": call,
            "blocked": call + waited,
            "forward_backward": step_called - compute_start,
            "save": time.perf_counter() - start,
        }


METHODS = [DiskLimit, DiskDirect, TorchSave, SafetensorsFile, AccelerateState, LibrarySync, LibraryAsync]

"""Runs launched with torchrun: rank detection, decisions on rank 0, failures gathered from
every rank, and sharded (FSDP) model and optimizer state written with
``torch.distributed.checkpoint`` (DCP).

Every :class:`RankGroup` method that takes an ``action`` is a collective once a
process group is initialized: each rank must call it, in the same order. A rank
that raises inside one of them does not leave the others waiting. The outcome
of every rank is gathered, and all ranks raise :class:`DistributedError`
naming the ranks that failed. A rank that never arrives (a crash or a hang)
makes the others fail when the process group's timeout runs out, because every
collective here runs on the default group and uses its timeout.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import pickle
import re
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from hf_lifecycle._io import fsync_dir
from hf_lifecycle.checkpoint.store import PendingCheckpoint, manifest_files
from hf_lifecycle.checkpoint.tensorfile import checksum_file
from hf_lifecycle.errors import CheckpointCorruptedError, ConfigurationError, DistributedError

logger = logging.getLogger(__name__)

SHARDED_FOLDER = "dcp"
SHARDED_FORMAT = "torch.distributed.checkpoint"
_MAX_MESSAGE = 500
_T = TypeVar("_T")


def is_distributed() -> bool:
    """True when ``torch.distributed`` has an initialized default process group."""
    return dist.is_available() and dist.is_initialized()


def _checkpoint_exception() -> type[BaseException]:
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


@dataclasses.dataclass(frozen=True)
class RankFailure:
    """One rank's failure inside a collective step, as gathered on every rank."""

    rank: int
    failed_ranks: tuple[int, ...]
    error_type: str
    message: str
    keep_index: int = -1  # Index of the error's type in the step's ``keep`` types, or -1.


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= _MAX_MESSAGE else line[:_MAX_MESSAGE] + "..."


def _failure(rank: int, error: BaseException, keep: Sequence[type[BaseException]]) -> RankFailure:
    # DCP gathers the failures of every rank into one CheckpointException and raises it on all
    # ranks. The report names the ranks and errors inside it, not each rank that re-raised it.
    if isinstance(error, _checkpoint_exception()):
        failures = error.failures
        details = "; ".join(
            f"rank {failed}: {type(wrapped[0]).__name__}: {_describe(wrapped[0])}"
            for failed, wrapped in sorted(failures.items())
        )
        return RankFailure(rank, tuple(sorted(failures)), "CheckpointException", details)
    keep_index = next((index for index, kind in enumerate(keep) if isinstance(error, kind)), -1)
    return RankFailure(rank, (rank,), type(error).__name__, _describe(error), keep_index)


class RankGroup:
    """The ranks of one run, and the collectives that keep them in step.

    Without an initialized process group there is one rank, and every method
    runs its function locally and lets its exceptions propagate unchanged.
    """

    def __init__(self, enabled: bool | None = None) -> None:
        """``enabled=None`` follows the process group; False acts as one rank even with one."""
        if enabled not in (None, True, False):
            raise ConfigurationError(f"distributed must be True, False or None, got {enabled!r}.")
        if enabled and not is_distributed():
            raise ConfigurationError(
                "distributed=True needs an initialized process group: call "
                "torch.distributed.init_process_group() first, or pass distributed=None."
            )
        self.enabled = is_distributed() if enabled is None else enabled
        self.rank = dist.get_rank() if self.enabled else 0
        self.world_size = dist.get_world_size() if self.enabled else 1
        # Set while this thread runs the function of a step. A step called from inside another
        # one runs locally: only rank 0 may be inside it, so a collective there would wait forever.
        self._inside = threading.local()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"RankGroup(rank={self.rank}, world_size={self.world_size}, enabled={self.enabled})"

    def _collective(
        self, action: str, operation: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        try:
            return operation(*args, **kwargs)
        except RuntimeError as err:
            raise DistributedError(
                f"{action}: a collective operation across {self.world_size} ranks failed on rank "
                f"{self.rank} ({_describe(err)}). Another rank crashed, did not respond within "
                f"the process group's timeout, or did not make the same HFManager call. Every "
                f"rank must make the same calls in the same order.",
            ) from err

    def gather(self, action: str, value: _T) -> list[_T]:
        """Return every rank's ``value``, indexed by rank."""
        if not self.enabled:
            return [value]
        values: list[Any] = [None] * self.world_size
        self._collective(action, dist.all_gather_object, values, value)
        return values

    def run_everywhere(
        self,
        action: str,
        function: Callable[[], _T],
        *,
        keep: Sequence[type[BaseException]] = (),
    ) -> _T:
        """Run ``function`` on every rank and return this rank's result once all ranks succeeded.

        If any rank raised, every rank raises: the error itself on a rank that
        raised one of the ``keep`` types, when every failing rank did, else
        :class:`DistributedError` naming the failing ranks. ``keep`` types must
        accept a message as their only argument.
        """
        if not self.enabled or self._nested():
            return function()
        result: Any = None
        error: BaseException | None = None
        try:
            result = self._run(function)
        except (Exception, _checkpoint_exception()) as err:  # noqa: BLE001 - gathered, re-raised
            # DCP's CheckpointException derives from BaseException only, so it is named here.
            error = err
        record = None if error is None else _failure(self.rank, error, keep)
        failures = [entry for entry in self.gather(action, record) if entry is not None]
        if failures:
            raise self._failure_error(action, failures, error, keep) from error
        return result

    def run_on_main(
        self,
        action: str,
        function: Callable[[], _T],
        *,
        keep: Sequence[type[BaseException]] = (),
    ) -> _T:
        """Run ``function`` on rank 0 only and return its result on every rank.

        The result must be picklable. If rank 0 raised, every rank raises as in
        :meth:`run_everywhere`.
        """
        if not self.enabled or self._nested():
            return function()
        error: BaseException | None = None
        payload: list[Any] = [None]
        if self.is_main:
            try:
                payload = [(None, self._run(function))]
            except Exception as err:  # noqa: BLE001 - broadcast, then re-raised on every rank
                error = err
                payload = [(_failure(self.rank, err, keep), None)]
        self._collective(action, dist.broadcast_object_list, payload, src=0)
        failure, result = payload[0]
        if failure is not None:
            raise self._failure_error(action, [failure], error, keep) from error
        return result

    def _nested(self) -> bool:
        return getattr(self._inside, "active", False)

    def _run(self, function: Callable[[], _T]) -> _T:
        self._inside.active = True
        try:
            return function()
        finally:
            self._inside.active = False

    def _failure_error(
        self,
        action: str,
        failures: list[RankFailure],
        error: BaseException | None,
        keep: Sequence[type[BaseException]],
    ) -> BaseException:
        failed = sorted({rank for entry in failures for rank in entry.failed_ranks})
        # Every rank re-raises DCP's CheckpointException, so its text would repeat once per rank.
        parts: dict[str, None] = {}
        for entry in failures:
            if entry.error_type == "CheckpointException":
                parts[entry.message] = None
            elif len(failures) == 1:
                parts[f"{entry.error_type}: {entry.message}"] = None
            else:
                parts[f"rank {entry.rank}: {entry.error_type}: {entry.message}"] = None
        details = "; ".join(parts).rstrip(".")
        message = f"{action} failed on rank {', '.join(map(str, failed))}: {details}."
        if all(entry.keep_index >= 0 for entry in failures):
            if error is not None and isinstance(error, tuple(keep)):
                return error
            return keep[failures[0].keep_index](message)
        return DistributedError(f"{message} Every rank stopped at this step.", ranks=failed)

    def wait_after_failure(self) -> None:
        """Wait for every rank after a failed step, so rank 0's cleanup ends before any returns.

        The barrier's own error (a process group broken by the failure) is dropped,
        because the step's error is the one to report.
        """
        if not self.enabled:
            return
        try:
            dist.barrier()
        except RuntimeError as err:
            logger.debug("Barrier after a failed step failed too: %s", err)

    def synchronize(self, action: str) -> None:
        """Wait until every rank arrives. On gloo, rank 0's error names the ranks that did not."""
        if not self.enabled:
            return
        timeout = process_group_timeout()
        if dist.get_backend() != "gloo" or timeout is None:
            self._collective(action, dist.barrier)
            return
        try:
            dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
        except RuntimeError as err:
            # Rank 0's message reads "Ranks 1, 3 failed to pass monitoredBarrier in ... ms".
            found = re.search(r"Ranks? ([\d, ]+) failed to pass", str(err))
            missing = [int(rank) for rank in re.findall(r"\d+", found.group(1))] if found else []
            raise DistributedError(
                f"{action}: rank {', '.join(map(str, missing)) or 'unknown'} did not arrive within "
                f"{timeout} ({_describe(err)}). Every rank must create the HFManager and make the "
                f"same calls.",
                ranks=missing,
            ) from err


def on_main_rank(action: str) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """Decorate a method of an object with a ``_ranks`` :class:`RankGroup` to run on rank 0 only.

    Every rank calls the method; rank 0 runs it and the others return its result.
    """

    def decorate(method: Callable[..., _T]) -> Callable[..., _T]:
        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> _T:
            return self._ranks.run_on_main(action, lambda: method(self, *args, **kwargs))

        return wrapper

    return decorate


def process_group_timeout() -> datetime.timedelta | None:
    """Return the default process group's timeout, or None where the backend hides it (gloo
    exposes it)."""
    try:
        group = dist.distributed_c10d._get_default_group()
        return group._get_backend(torch.device("cpu")).options._timeout
    except (AttributeError, RuntimeError, ValueError):
        return None


def quiet_other_ranks(rank: int) -> None:
    """Keep the library's INFO and WARNING lines to rank 0, so a run logs each event once.

    A filter on the ``hf_lifecycle`` logger would not see the records of its
    child loggers (``hf_lifecycle.manager`` and the like), so the level is raised
    instead, and only when the caller has not set one.
    """
    package_logger = logging.getLogger("hf_lifecycle")
    if rank != 0 and package_logger.level == logging.NOTSET:
        package_logger.setLevel(logging.ERROR)


def rank_rng_state(saved: Any, rank: int, world_size: int) -> Mapping[str, Any] | None:
    """This rank's RNG state from a checkpoint: an entry of a per-rank list, or the single state."""
    if not isinstance(saved, list):
        return saved
    if len(saved) != world_size and rank == 0:
        logger.warning(
            "The checkpoint contains the RNG states of %d ranks and this run has %d: %s",
            len(saved), world_size,
            "ranks beyond the saved ones keep their current RNG state" if world_size > len(saved)
            else "the states of the extra saved ranks are not used",
        )
    return saved[rank] if rank < len(saved) else None


# Sharded state -------------------------------------------------------------------------------


def is_sharded(model: torch.nn.Module | None) -> bool:
    """True for a model whose parameters are split across ranks: FSDP2 (``fully_shard``), whose
    parameters are DTensors, and FSDP1 (``FullyShardedDataParallel``)."""
    # NOTE: only FSDP2 is tested. FSDP1 in torch 2.13 raises on a machine without an
    # accelerator, so its save and load through DCP have not been run.
    # Both kinds need an initialized process group, and the check below visits every parameter.
    if model is None or not dist.is_available() or not dist.is_initialized():
        return False
    from torch.distributed.tensor import DTensor

    if any(isinstance(parameter, DTensor) for parameter in model.parameters()):
        return True
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(module, FullyShardedDataParallel) for module in model.modules())


def sharded_state(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """This rank's shards of the model (and optimizer) state, keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    # NOTE: an optimizer that has not stepped yet gets its state created by a step with zero
    # gradients and a zero learning rate (torch 2.13), which sets Adam's step count to 1.
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded(state: dict[str, Any], folder: Path) -> None:
    """Write this rank's shards into ``folder`` with DCP. A collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=folder)


def record_sharded_files(
    pending: PendingCheckpoint, contents: Sequence[str], world_size: int
) -> dict[str, Any]:
    """Checksum the DCP files of a pending checkpoint for its manifest; return the component."""
    folder = pending.temp_dir / SHARDED_FOLDER
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            relative = path.relative_to(pending.temp_dir).as_posix()
            pending.add(relative, checksum_file(path))
            files.append(relative)
    fsync_dir(folder)
    return {
        "format": SHARDED_FORMAT,
        "contents": list(contents),
        "world_size": world_size,
        "files": files,
    }


def verify_sharded_files(
    folder: Path, manifest: Mapping[str, Any], rank: int, world_size: int
) -> None:
    """Check this rank's share of a checkpoint's DCP files against the manifest.

    The files are dealt to the ranks in turn, so each file is read once per load.
    """
    records = manifest_files(manifest)
    entry = manifest["components"]["sharded"]
    for relative in entry["files"][rank::world_size]:
        path = folder / relative
        expected = records.get(relative)
        if expected is None or not path.is_file() or checksum_file(path) != expected:
            reason = "not in the manifest" if expected is None else (
                "the file is missing" if not path.is_file() else "checksum mismatch"
            )
            raise CheckpointCorruptedError(
                f"Checkpoint file {path} is corrupted: {reason}.", path=str(folder), file=str(path)
            )


def load_sharded(
    folder: Path, entry: Mapping[str, Any], model: torch.nn.Module | None, optimizer: Any
) -> None:
    """Load the DCP shards of checkpoint ``folder`` into ``model`` and ``optimizer``, resharding
    them to this run's ranks.

    Works with any number of ranks, including one process without a process
    group, which reads full tensors into an unsharded model.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    from hf_lifecycle._safe_dcp import (
        METADATA_NAME,
        SafeFileSystemReader,
        SafeLoadPlanner,
        read_metadata,
    )

    contents = entry.get("contents") or []
    if model is None:
        logger.warning(
            "Checkpoint %s contains sharded state, and no model was given; nothing was loaded",
            folder.name,
        )
        return
    with_optimizer = optimizer is not None and "optimizer" in contents
    if optimizer is not None and not with_optimizer:
        logger.warning(
            "Checkpoint %s contains no optimizer state; the optimizer is unchanged", folder.name
        )
    sharded_folder = folder / SHARDED_FOLDER
    try:
        # Checked here too, so that a crafted file fails before any tensor is copied.
        read_metadata(sharded_folder / METADATA_NAME)
    except (pickle.UnpicklingError, OSError, EOFError, AttributeError, ValueError) as err:
        raise CheckpointCorruptedError(
            f"Checkpoint {folder} is corrupted: its DCP metadata cannot be read safely ({err}).",
            path=str(folder),
            file=str(sharded_folder / METADATA_NAME),
        ) from err
    state = sharded_state(model, optimizer if with_optimizer else None)
    with warnings.catch_warnings():
        # torch 2.13 warns that it assumes a single process even when no_dist=True requests it.
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled", category=UserWarning
        )
        try:
            dcp.load(
                state,
                checkpoint_id=sharded_folder,
                storage_reader=SafeFileSystemReader(sharded_folder),
                planner=SafeLoadPlanner(),
                no_dist=not is_distributed(),
            )
        except _checkpoint_exception() as err:
            causes = [failure[0] for failure in err.failures.values()]
            if not causes or not all(isinstance(cause, pickle.UnpicklingError) for cause in causes):
                raise
            raise CheckpointCorruptedError(
                f"Checkpoint {folder} is corrupted: a value in its DCP files is not plain data "
                f"({_describe(causes[0])}).",
                path=str(folder),
            ) from err
    if with_optimizer:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
    else:
        set_model_state_dict(model, state["model"])


def load_full_model_state(model: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """Load an unsharded state dict (read in full by every rank) into a sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True))


def full_model_state(model: torch.nn.Module) -> dict[str, Any]:
    """Gather the whole model state dict on rank 0, on the CPU; other ranks get an empty dict.

    A collective: every rank calls it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def check_loadable(
    manifest: Mapping[str, Any], model: torch.nn.Module | None, optimizer: Any
) -> None:
    """Reject, before anything changes, the one combination a load cannot do."""
    components = manifest.get("components") or {}
    if "sharded" in components or "optimizer" not in components:
        return
    if optimizer is not None and is_sharded(model):
        raise ConfigurationError(
            f"Checkpoint {manifest.get('name')!r} was saved from an unsharded model, and its "
            f"optimizer state is keyed by parameter position, which a sharded (FSDP) optimizer "
            f"cannot load. Pass optimizer=None to load only the weights, or resume with the "
            f"unsharded setup that saved it."
        )


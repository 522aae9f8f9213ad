"""HFManager: the front door that wires the checkpoint store, retention, tracking and the Hub."""

from __future__ import annotations

import collections
import dataclasses
import datetime as _dt
import logging
import numbers
import os
import re
import shutil
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from hf_lifecycle._io import remove_stale_temps
from hf_lifecycle._version import __version__
from hf_lifecycle.checkpoint.format import (
    capture_rng_state,
    check_map_location,
    encode_state,
    restore_rng_state,
)
from hf_lifecycle.checkpoint.info import CheckpointInfo
from hf_lifecycle.checkpoint.serialize import (
    build_state,
    check_fits,
    read_state,
    unwrap_model,
    write_state,
)
from hf_lifecycle.checkpoint.store import CheckpointStore, validate_name
from hf_lifecycle.checkpoint.writer import BackgroundWriter, DeferredCopy, snapshot_state
from hf_lifecycle.distributed import (
    SHARDED_FOLDER,
    RankGroup,
    check_loadable,
    full_model_state,
    is_sharded,
    load_full_model_state,
    load_sharded,
    on_main_rank,
    quiet_other_ranks,
    rank_rng_state,
    record_sharded_files,
    save_sharded,
    sharded_state,
    verify_sharded_files,
)
from hf_lifecycle.errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    ConfigurationError,
    DistributedError,
    HubError,
    PushError,
    RepoIdRequiredError,
    SerializationError,
)
from hf_lifecycle.final_model import publish_model_files, save_model_folder
from hf_lifecycle.hub.sync import (
    HubSync,
    checkpoint_operations,
    describe_error,
    delete_folder_operation,
    file_operations,
    pointer_operation,
    run_with_retries,
)
from hf_lifecycle.integrations.tensorboard import RUNS_DIRNAME, TensorBoardLogger
from hf_lifecycle.retention import RetentionPlan, RetentionPolicy, as_policy, plan_retention
from hf_lifecycle.tracking import (
    ExperimentTracker,
    build_metadata,
    collect_environment,
    format_summary,
    read_metadata,
    write_metadata,
)

logger = logging.getLogger(__name__)

METADATA_FILENAME = "experiment_metadata.json"
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def _check_repo_id(repo_id: object) -> str | None:
    if repo_id is None:
        return None
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise ConfigurationError(
            f"Invalid repo_id {repo_id!r}: expected 'namespace/name' (or 'name'), using letters, "
            f"digits, '-', '_' and '.', for example 'alice/digits-mlp'."
        )
    return repo_id


def _check_counter(value: object, label: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise ConfigurationError(f"{label} must be a non-negative int or None, got {value!r}.")
    return int(value)


def _check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ConfigurationError(
            f"metrics must be a dict of name to number, got {type(metrics).__name__}."
        )
    checked = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise ConfigurationError(f"Metric names must be non-empty strings, got {key!r}.")
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise SerializationError(
                f"Metric {key!r} has value {value!r} of type {type(value).__name__}; "
                f"metrics must be numbers.",
                key=key,
            )
        try:
            checked[key] = float(value)
        except OverflowError:
            raise SerializationError(
                f"Metric {key!r} is an int too large for a float; pass it as a float or scale it.",
                key=key,
            ) from None
    return checked


@dataclasses.dataclass
class _SaveRequest:
    """A save's checked arguments and encoded state, before anything is written."""

    state: Any
    sharded: dict[str, Any] | None
    name: str | None
    step: int | None
    epoch: int | None
    metrics: dict[str, float]
    push: bool
    history_length: int
    optimizer: Any = None


def _check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout >= 0:
        raise ConfigurationError(
            f"Invalid timeout {timeout!r}: pass a number of seconds >= 0, or None to wait as "
            f"long as it takes."
        )
    return float(timeout)


def _step_hook_target(optimizer: Any) -> torch.optim.Optimizer | None:
    """Return the optimizer whose step pre-hooks run on ``optimizer.step()``, or None.

    Wrappers such as accelerate's AcceleratedOptimizer subclass Optimizer without its
    hook machinery, and call the optimizer they wrap (``.optimizer``), whose hooks do run.
    """
    for candidate in (optimizer, getattr(optimizer, "optimizer", None)):
        if (
            isinstance(candidate, torch.optim.Optimizer)
            and hasattr(candidate, "_optimizer_step_pre_hooks")
            and getattr(type(candidate).step, "hooked", False)
        ):
            return candidate
    return None


class HFManager:
    """Checkpoints, retention, tracking and Hub sync for one training run.

    Arguments left as ``None`` in a method fall back to the objects given to the
    constructor or to :meth:`set_model`, :meth:`set_optimizer` and
    :meth:`set_scheduler`; an object passed explicitly is always used, even a
    falsy one such as an empty ``nn.Sequential``.

    Concurrency: one manager may be used from several threads. Their saves take
    turns, and commits and deletions in a checkpoint folder are serialized.
    Several processes may read one checkpoint folder, but only one manager should
    save into it at a time.

    Distributed runs: with an initialized ``torch.distributed`` process group,
    every rank creates the manager with the same arguments and makes the same
    calls, except :meth:`log_metrics`, :meth:`track_hyperparameters`,
    :meth:`list_checkpoints` and :meth:`get_summary`, which stay local. Rank 0
    names each checkpoint and writes the replicated state (model, optimizer and
    scheduler of a DDP run), the manifest and the metadata. It also commits,
    applies retention with its own metrics and pushes. Every rank's RNG state is
    saved and restored to that rank. The shards of an FSDP model and its optimizer are
    written by every rank with ``torch.distributed.checkpoint`` into the same
    checkpoint folder and load with any number of ranks. ``checkpoint_dir``
    must be one folder that every rank can read and write (a shared file system across
    nodes). A failure on any rank makes every rank raise
    :class:`~hf_lifecycle.DistributedError`. Saves are always blocking there,
    and only rank 0 logs below ERROR. ``distributed=False`` turns all of this off
    for code that calls the manager from rank 0 alone (the Trainer callback does),
    and ``distributed=True`` requires a process group.
    """

    def __init__(
        self,
        repo_id: str | None = None,
        local_dir: str | os.PathLike[str] = "./outputs",
        checkpoint_dir: str | os.PathLike[str] = "./checkpoints",
        hf_token: str | None = None,
        private: bool = False,
        retention_policy: RetentionPolicy | Any = None,
        auto_push: bool = False,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        *,
        prune_hub_checkpoints: bool = False,
        push_retries: int = 4,
        push_retry_wait: float = 2.0,
        async_save: bool = False,
        distributed: bool | None = None,
    ) -> None:
        self.repo_id = _check_repo_id(repo_id)
        if hf_token is not None and (not isinstance(hf_token, str) or not hf_token.strip()):
            raise ConfigurationError("hf_token must be a non-empty string or None.")
        self.private = bool(private)
        self.auto_push = bool(auto_push)
        if self.auto_push and self.repo_id is None:
            raise RepoIdRequiredError(
                "auto_push=True needs a repo_id to push to: pass repo_id='namespace/name'."
            )
        self.retention_policy = as_policy(retention_policy)
        self._token = hf_token
        self.local_dir = Path(local_dir).expanduser().resolve()
        if self.local_dir.exists() and not self.local_dir.is_dir():
            raise ConfigurationError(f"local_dir {self.local_dir} exists and is not a folder.")
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self._ranks = RankGroup(enabled=distributed)
        if self._ranks.enabled:
            quiet_other_ranks(self._ranks.rank)
        # With several ranks, only rank 0 removes leftovers, before any rank starts a save.
        self.store = CheckpointStore(checkpoint_dir, clean_leftovers=not self._ranks.enabled)
        self.checkpoint_dir = self.store.root
        self._model = model
        self._optimizer = optimizer
        self._scheduler = scheduler
        self._final_model: dict[str, Any] | None = None
        self.tracker = self._open_tracker()
        self._tensorboard = TensorBoardLogger(self.local_dir / RUNS_DIRNAME)
        self.prune_hub_checkpoints = bool(prune_hub_checkpoints)
        self.async_save = bool(async_save)
        self._warned_sync = False
        self._environment: dict[str, Any] | None = None
        # Optimizers whose step waits for the background copy of their state, with the hook
        # handles that close() removes.
        self._guarded_optimizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._pending_copy: DeferredCopy | None = None
        # Serializes listing, retention and metadata writes between the caller's thread, the
        # background save and the push jobs.
        self._bookkeeping = threading.RLock()
        self._writer = BackgroundWriter()
        self._save_lock = threading.Lock()
        if isinstance(push_retries, bool) or not isinstance(push_retries, int) or push_retries < 0:
            raise ConfigurationError(f"push_retries must be an int >= 0, got {push_retries!r}.")
        self._push_retries = push_retries
        self._push_retry_wait = float(push_retry_wait)
        self._hub: HubSync | None = None
        if self.repo_id is not None:
            self._hub = HubSync(
                self.repo_id,
                token=hf_token,
                private=self.private,
                retries=push_retries,
                retry_wait=self._push_retry_wait,
                on_token=self.tracker.add_secret,
            )
        if self._ranks.enabled:
            self._ranks.synchronize("Creating the HFManager")
            self._ranks.run_on_main(
                "Removing leftover temporary folders", self._remove_leftovers
            )
        else:
            remove_stale_temps(self.local_dir)

    # Wiring ----------------------------------------------------------------------------------

    def _remove_leftovers(self) -> None:
        self.store.remove_leftovers()
        remove_stale_temps(self.local_dir)

    def _open_tracker(self) -> ExperimentTracker:
        secrets = [self._token] if self._token else []
        path = self.local_dir / METADATA_FILENAME
        if not path.exists():
            return ExperimentTracker(secrets=secrets)
        try:
            metadata = read_metadata(path)
            tracker = ExperimentTracker.from_dict(metadata, secrets=secrets)
        except ConfigurationError as err:
            logger.warning("Starting a new metrics history: %s", err)
            return ExperimentTracker(secrets=secrets)
        self._final_model = metadata.get("final_model")
        logger.info("Continuing the metrics history found in %s", path)
        return tracker

    def set_model(self, model: torch.nn.Module | None) -> None:
        self._model = model

    def set_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        self._optimizer = optimizer

    def set_scheduler(self, scheduler: Any) -> None:
        self._scheduler = scheduler

    @property
    def model(self) -> torch.nn.Module | None:
        return self._model

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._optimizer

    @property
    def scheduler(self) -> Any:
        return self._scheduler

    @property
    def repo_url(self) -> str | None:
        """URL of the Hub repository, or None without a repo_id."""
        return self._hub.repo_url if self._hub is not None else None

    def __repr__(self) -> str:
        return (
            f"HFManager(repo_id={self.repo_id!r}, local_dir={str(self.local_dir)!r}, "
            f"checkpoint_dir={str(self.checkpoint_dir)!r}, private={self.private}, "
            f"auto_push={self.auto_push}, retention_policy={self.retention_policy!r})"
        )

    def _require_repo_id(self, action: str) -> str:
        if self.repo_id is None:
            raise RepoIdRequiredError(
                f"{action} needs a Hub repository, and this manager has no repo_id: create it with "
                f"HFManager(repo_id='namespace/name', ...)."
            )
        return self.repo_id

    # Tracking --------------------------------------------------------------------------------

    def track_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        self.tracker.track_hyperparameters(hyperparameters)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Record ``metrics`` at ``step`` and write them to TensorBoard under ``local_dir/runs``."""
        used_step = self.tracker.log_metrics(metrics, step=step)
        if self._ranks.is_main:
            self._tensorboard.add_scalars(metrics, used_step)

    # Saving ----------------------------------------------------------------------------------

    def _default_name(self, step: int | None, epoch: int | None) -> str:
        if step is not None:
            return f"checkpoint-step-{step}"
        if epoch is not None:
            return f"checkpoint-epoch-{epoch}"
        sequence = self.store.next_sequence()
        while (self.checkpoint_dir / f"checkpoint-{sequence}").exists():
            sequence += 1
        return f"checkpoint-{sequence}"

    def save_checkpoint(
        self,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        epoch: int | None = None,
        step: int | None = None,
        metrics: dict[str, float] | None = None,
        custom_state: Any = None,
        config: Any = None,
        name: str | None = None,
        push: bool | None = None,
        *,
        allow_pickle: bool = False,
        blocking: bool | None = None,
        skip_if_busy: bool = False,
    ) -> str | None:
        """Save a checkpoint atomically and return its absolute path.

        The checkpoint contains the model weights, optimizer and scheduler state, the
        RNG states, ``custom_state`` and ``config``. After the commit, retention
        runs and, with ``push=True`` or ``auto_push``, the checkpoint is queued for
        the Hub. ``allow_pickle=True`` lets ``custom_state`` hold objects that JSON
        and safetensors cannot represent; loading such a checkpoint then needs
        ``allow_pickle=True`` too.

        ``blocking=False`` (the default when the manager was created with
        ``async_save=True``) returns once an exact snapshot of the state is taken;
        a worker thread writes and commits it, then applies retention and queues
        the push. The state of a ``torch.optim.Optimizer`` is copied by the worker:
        the next ``optimizer.step()`` waits for that copy, and an in-place change
        made some other way before it finishes fails the save. At most one save is
        in flight: the call waits for the previous one, or returns None without
        saving when ``skip_if_busy=True``. Errors of
        a background save are raised by the next save, :meth:`wait_for_checkpoints`
        and :meth:`close`.
        """
        request = self._ranks.run_everywhere(
            "Preparing a checkpoint",
            lambda: self._prepare_save(
                model, optimizer, scheduler, epoch, step, metrics, custom_state, config, name,
                push, allow_pickle,
            ),
        )
        if self._ranks.enabled:
            wants_background = blocking is False or (blocking is None and self.async_save)
            if wants_background and not self._warned_sync:
                logger.warning(
                    "Saving synchronously: background saves are not used with several ranks"
                )
                self._warned_sync = True
            return self._save_on_ranks(request)
        state, step, epoch = request.state, request.step, request.epoch
        checked_metrics, name, push = request.metrics, request.name, request.push
        blocking = not self.async_save if blocking is None else bool(blocking)
        # Threads take turns from here to the submit: otherwise two of them could both see the
        # writer idle, and share its snapshot buffers.
        if not self._save_lock.acquire(blocking=not skip_if_busy):
            logger.info("Skipped a checkpoint save: another thread is starting one")
            return None
        try:
            if self._writer.busy and skip_if_busy:
                logger.info("Skipped a checkpoint save: the previous one is still being written")
                return None
            self._writer.wait()  # Raises the previous background save's error, if any.
            name = name or self._default_name(step, epoch)
            self.store.check_replaceable(name)
            history_length = request.history_length
            if blocking:
                info = self._write_and_commit(
                    name, state, step=step, epoch=epoch, metrics=checked_metrics,
                    history_length=history_length,
                )
                self._after_commit(info, push=push)
                return info.path
            defer = frozenset()
            if self._guard_optimizer(request.optimizer):
                defer = frozenset({"optimizer"})
            snapshot, deferred = snapshot_state(state, self._writer.buffers, defer=defer)
            self._pending_copy = deferred

            def job() -> None:
                if deferred is not None:
                    deferred.run(self._writer.buffers)
                info = self._write_and_commit(
                    name, snapshot, step=step, epoch=epoch, metrics=checked_metrics,
                    history_length=history_length,
                )
                self._after_commit(info, push=push)

            self._writer.submit(name, job)
            return str(self.checkpoint_dir / name)
        finally:
            self._save_lock.release()

    def _prepare_save(
        self, model, optimizer, scheduler, epoch, step, metrics, custom_state, config, name, push,
        allow_pickle,
    ) -> _SaveRequest:
        """Check a save's arguments and encode its state; raises before any file is written."""
        model = self._model if model is None else model
        optimizer = self._optimizer if optimizer is None else optimizer
        scheduler = self._scheduler if scheduler is None else scheduler
        step = _check_counter(step, "step")
        epoch = _check_counter(epoch, "epoch")
        checked_metrics = _check_metrics(metrics)
        push = self.auto_push if push is None else bool(push)
        if push:
            # A missing token raises here, before anything is written.
            self._hub_sync("save_checkpoint(push=True)").token(required=True)
        name = validate_name(name, self.checkpoint_dir) if name is not None else None
        if model is not None and not isinstance(model, torch.nn.Module):
            raise ConfigurationError(
                f"model must be a torch.nn.Module, got {type(model).__name__}."
            )

        # Sharded model and optimizer state goes to DCP; the RNG states of all ranks are
        # gathered later, so with several ranks neither is part of the encoded state.
        sharded = sharded_state(model, optimizer) if is_sharded(model) else None
        state = build_state(
            model=model if sharded is None else None,
            optimizer=optimizer if sharded is None else None,
            scheduler=scheduler,
            rng_state=None if self._ranks.enabled else capture_rng_state(),
            custom_state=custom_state,
            config=config,
            allow_pickle=allow_pickle,
        )
        return _SaveRequest(
            state=state, sharded=sharded, name=name, step=step, epoch=epoch,
            metrics=checked_metrics, push=push, history_length=self.tracker.history_length(),
            optimizer=optimizer if sharded is None else None,
        )

    def _save_on_ranks(self, request: _SaveRequest) -> str:
        """Save one checkpoint with every rank and return its path on every rank.

        Rank 0 creates the temporary folder (its name carries rank 0's pid, so the
        next start removes it if rank 0 dies), every rank writes its DCP shards
        there, rank 0 writes the rest and commits. Any failure aborts the folder.
        """
        ranks = self._ranks
        rng_states = ranks.gather("Gathering RNG states", capture_rng_state())
        rank0: dict[str, Any] = {}

        def begin() -> tuple[str, str]:
            name = request.name or self._default_name(request.step, request.epoch)
            rank0["pending"] = self.store.begin(name)
            return rank0["pending"].name, str(rank0["pending"].temp_dir)

        def write() -> None:
            if request.sharded is not None:
                save_sharded(request.sharded, Path(temp_dir) / SHARDED_FOLDER)
            if ranks.is_main:
                request.state.components["rng_state"] = encode_state(rng_states, root="rng_state")
                rank0["components"] = write_state(rank0["pending"], request.state)
                if request.sharded is not None:
                    rank0["components"]["sharded"] = record_sharded_files(
                        rank0["pending"], sorted(request.sharded), ranks.world_size
                    )

        def commit() -> CheckpointInfo:
            manifest = self._manifest(
                rank0["components"], step=request.step, epoch=request.epoch,
                metrics=request.metrics, history_length=request.history_length,
            )
            info = self.store.commit(rank0["pending"], manifest)
            self._after_commit(info, push=request.push)
            return info

        name, temp_dir = ranks.run_on_main("Starting a checkpoint", begin)
        try:
            ranks.run_everywhere(f"Writing checkpoint {name}", write)
            info = ranks.run_on_main(f"Committing checkpoint {name}", commit)
        except BaseException as err:
            if ranks.is_main:
                self.store.abort(rank0["pending"])
            if isinstance(err, DistributedError):
                ranks.wait_after_failure()
            raise
        return info.path

    def _guard_optimizer(self, optimizer: Any) -> bool:
        """Make ``optimizer.step()`` wait for a background save's copy of its state.

        Returns False, and the save copies the optimizer's state before returning, for an
        object without torch's step hooks.
        """
        optimizer = _step_hook_target(optimizer)
        if optimizer is None:
            return False
        if optimizer not in self._guarded_optimizers:
            manager = weakref.ref(self)

            def wait_for_copy(*_: Any) -> None:
                owner = manager()
                pending = owner._pending_copy if owner is not None else None
                if pending is not None:
                    pending.wait()

            self._guarded_optimizers[optimizer] = optimizer.register_step_pre_hook(wait_for_copy)
        return True

    def wait_for_checkpoints(self, timeout: float | None = None) -> None:
        """Block until the background save (if any) is committed; raise its error."""
        if not self._writer.wait(timeout):
            raise CheckpointSaveError(
                f"Timed out after {timeout} s waiting for a background save to finish.",
                path=str(self.checkpoint_dir),
            )

    def _write_and_commit(
        self, name, state, *, step, epoch, metrics, history_length
    ) -> CheckpointInfo:
        pending = None
        try:
            pending = self.store.begin(name)
            components = write_state(pending, state)
            manifest = self._manifest(
                components, step=step, epoch=epoch, metrics=metrics, history_length=history_length
            )
            return self.store.commit(pending, manifest)
        except OSError as err:
            if pending is not None:
                self.store.abort(pending)
            raise CheckpointSaveError(
                f"Saving checkpoint {name!r} in {self.checkpoint_dir} failed: {err}. Nothing was "
                f"committed and no earlier checkpoint was touched; free space or fix permissions "
                f"there, or pass another checkpoint_dir.",
                path=str(self.checkpoint_dir / name),
            ) from err
        except BaseException:
            if pending is not None:
                self.store.abort(pending)
            raise

    @staticmethod
    def _manifest(components, *, step, epoch, metrics, history_length) -> dict[str, Any]:
        now = time.time()
        return {
            "epoch": epoch,
            "step": step,
            "metrics": metrics,
            "timestamp": now,
            "created_at": _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(),
            "library_version": __version__,
            "torch_version": torch.__version__,
            "components": components,
            "tracking": {"history_length": history_length},
        }

    def _after_commit(self, info: CheckpointInfo, *, push: bool) -> None:
        # Order: protect the new checkpoint from retention until it is pushed, apply retention,
        # write the metadata of the checkpoints that remain, then queue the push, whose job
        # uploads that metadata. The folder is listed once for all of these.
        hub = self._hub_sync("Pushing a checkpoint") if push else None
        if hub is not None:
            hub.token(required=True)  # A missing token fails here, in the caller's thread.
            hub.unpushed.add(info.name)
        retention_error = None
        # Held from the listing to the metadata write, so that retention in another thread (a
        # push job, cleanup_checkpoints) cannot delete in between and leave the file stale.
        with self._bookkeeping:
            try:
                checkpoints, _ = self._apply_retention(self._protected_checkpoints())
            except Exception as err:  # noqa: BLE001 - raised below, once metadata and push are done
                retention_error = err
                checkpoints = None
            try:
                self._write_metadata(checkpoints=checkpoints)
            except OSError as err:
                logger.warning(
                    "Checkpoint %s is saved, but writing the metadata failed: %s", info.name, err
                )
        if hub is not None:
            self._enqueue_push(info)
        if retention_error is not None:
            raise retention_error

    # Retention -------------------------------------------------------------------------------

    def _protected_checkpoints(self) -> set[str]:
        # A checkpoint whose push has not succeeded yet must stay on disk.
        return self._hub.protected() if self._hub is not None else set()

    @on_main_rank("Applying the retention policy")
    def cleanup_checkpoints(self, dry_run: bool = False) -> list[str]:
        """Apply the retention policy. Returns the names deleted (or, with dry_run, to delete)."""
        if dry_run:
            return list(self._plan_retention(self._protected_checkpoints()).delete)
        _, deleted = self._apply_retention(self._protected_checkpoints(), update_metadata=True)
        return deleted

    def _apply_retention(
        self,
        protected: set[str],
        checkpoints: list[CheckpointInfo] | None = None,
        *,
        update_metadata: bool = False,
    ) -> tuple[list[CheckpointInfo], list[str]]:
        """Delete what the policy does not keep; return the remaining checkpoints and the deleted.

        With ``update_metadata``, a deletion also rewrites the metadata file, so that it never
        lists a deleted checkpoint.
        """
        with self._bookkeeping:
            if checkpoints is None:
                checkpoints = self.store.list()
            plan = self._plan_retention(protected, checkpoints)
            if not plan.delete:
                return checkpoints, []
            try:
                deleted = self.store.delete(plan.delete)
            except BaseException:
                if update_metadata:
                    self._rewrite_metadata_after_deletion()  # Some may be gone already.
                raise
            remaining = [item for item in checkpoints if item.name not in set(deleted)]
            if update_metadata and deleted:
                self._rewrite_metadata_after_deletion(remaining)
            return remaining, deleted

    def _rewrite_metadata_after_deletion(
        self, checkpoints: list[CheckpointInfo] | None = None
    ) -> None:
        try:
            self._write_metadata(checkpoints=checkpoints)
        except OSError as err:
            logger.warning("Deleted checkpoints, but rewriting the metadata failed: %s", err)

    def _plan_retention(
        self, protected: set[str], checkpoints: list[CheckpointInfo] | None = None
    ) -> RetentionPlan:
        """Plan retention over the checkpoints whose commit order is unambiguous.

        Checkpoints that share a sequence number (a folder copied in from another run, or
        saved by a second process without file locks) are kept and left out of the plan,
        because which of them is newer is unknown.
        """
        if checkpoints is None:
            checkpoints = self.store.list()
        counts = collections.Counter(info.sequence for info in checkpoints)
        shared = sorted(info.name for info in checkpoints if counts[info.sequence] > 1)
        if shared:
            logger.warning(
                "Retention keeps checkpoints %s: they share sequence numbers, so their commit "
                "order is unknown. Move all but one of each out of %s to apply retention to them.",
                ", ".join(shared), self.checkpoint_dir,
            )
        unique = [info for info in checkpoints if counts[info.sequence] == 1]
        return plan_retention(self.retention_policy, unique, protected=protected)

    # Loading ---------------------------------------------------------------------------------

    def list_checkpoints(self) -> list[dict[str, Any]]:
        """Committed checkpoints, newest first (by commit order)."""
        return [info.to_dict() for info in reversed(self.store.list())]

    def load_checkpoint(
        self,
        name: str,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        map_location: Any = None,
        *,
        allow_pickle: bool = False,
    ) -> dict[str, Any]:
        """Load a checkpoint into the model, optimizer and scheduler, and restore the RNG states.

        Every file is verified against its checksum before any object is changed.
        """
        check_map_location(map_location)
        info = self._ranks.run_on_main(
            f"Finding checkpoint {name!r}",
            lambda: self._find_checkpoint(name),
            keep=(CheckpointNotFoundError, CheckpointCorruptedError),
        )
        return self._load(info, model, optimizer, scheduler, map_location, allow_pickle)

    def _find_checkpoint(self, name: str) -> CheckpointInfo:
        try:
            return self.store.get(name)
        except CheckpointNotFoundError:
            if self._hub is None:
                raise
            return self._fetch_from_hub(name)

    def load_latest_checkpoint(
        self,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        map_location: Any = None,
        *,
        allow_pickle: bool = False,
    ) -> dict[str, Any] | None:
        """Load the newest intact checkpoint; corrupted ones are skipped with a warning.

        With an empty checkpoint folder and a ``repo_id``, the latest complete
        checkpoint on the Hub (only that one) is downloaded, verified and loaded.
        """
        check_map_location(map_location)
        local = self._ranks.run_on_main("Finding the latest checkpoint", self._load_candidates)
        for info in reversed(local):
            try:
                return self._load(info, model, optimizer, scheduler, map_location, allow_pickle)
            except CheckpointCorruptedError as err:
                logger.warning("Skipping corrupted checkpoint %s: %s", info.name, err)
        return None

    def _load_candidates(self) -> list[CheckpointInfo]:
        local = self.store.list()
        if not local and self._hub is not None:
            info = self._fetch_latest_intact_from_hub()
            local = [info] if info is not None else []
        return local

    def _fetch_latest_intact_from_hub(self) -> CheckpointInfo | None:
        """Download the Hub's latest checkpoint, or the newest older one if it is corrupted."""
        try:
            return self._fetch_from_hub(None)
        except CheckpointCorruptedError as err:
            logger.warning("The latest checkpoint on the Hub is corrupted, trying older ones: %s", err)
        hub = self._hub_sync("Loading from the Hub")
        revision = hub.head()
        latest = (hub.latest_pointer(revision) or {}).get("name") if revision else None
        for name in hub.checkpoints_newest_first(revision):
            if name == latest:
                continue  # Already tried above. Its manifest may be unreadable, so not listed first.
            try:
                return self._fetch_from_hub(name)
            except CheckpointCorruptedError as err:
                logger.warning("Skipping corrupted checkpoint %s on the Hub: %s", name, err)
        return None

    def _load(self, info, model, optimizer, scheduler, map_location, allow_pickle) -> dict[str, Any]:
        model = self._model if model is None else model
        optimizer = self._optimizer if optimizer is None else optimizer
        scheduler = self._scheduler if scheduler is None else scheduler
        folder = Path(info.path)
        # Every rank reads and verifies before any rank changes an object, and a corrupted
        # checkpoint raises CheckpointCorruptedError on every rank alike.
        manifest, loaded = self._ranks.run_everywhere(
            f"Reading checkpoint {info.name}",
            lambda: self._read_checkpoint(folder, model, optimizer, map_location, allow_pickle),
            keep=(CheckpointCorruptedError,),
        )
        self._ranks.run_everywhere(
            f"Loading checkpoint {info.name}",
            lambda: self._apply_checkpoint(folder, manifest, loaded, model, optimizer, scheduler),
        )
        history_length = (manifest.get("tracking") or {}).get("history_length")
        if isinstance(history_length, int) and history_length < self.tracker.history_length():
            self.tracker.truncate(history_length)
        logger.info("Loaded checkpoint %s", info.name)
        result = info.to_dict()
        result.update(custom_state=loaded.custom_state, config=loaded.config)
        return result

    def _read_checkpoint(self, folder, model, optimizer, map_location, allow_pickle):
        manifest = self.store.read_manifest(folder.name)
        check_loadable(manifest, model, optimizer)
        loaded = read_state(folder, manifest, map_location=map_location, allow_pickle=allow_pickle)
        if "sharded" in (manifest.get("components") or {}):
            verify_sharded_files(folder, manifest, self._ranks.rank, self._ranks.world_size)
        elif not is_sharded(model):
            check_fits(folder.name, loaded, model, optimizer)
        return manifest, loaded

    def _apply_checkpoint(self, folder, manifest, loaded, model, optimizer, scheduler) -> None:
        sharded = (manifest.get("components") or {}).get("sharded")
        if sharded is not None:
            # A collective with several ranks. Every rank reaches it, because the read
            # succeeded everywhere.
            load_sharded(folder, sharded, model, optimizer)
        if model is not None and sharded is None:
            if loaded.model_state is None:
                logger.warning("Checkpoint %s contains no model weights; the model is unchanged", folder.name)
            elif is_sharded(model):
                load_full_model_state(model, loaded.model_state)
            else:
                unwrap_model(model).load_state_dict(loaded.model_state)
        if optimizer is not None and sharded is None:
            if loaded.optimizer is None:
                logger.warning("Checkpoint %s contains no optimizer state; the optimizer is unchanged", folder.name)
            else:
                optimizer.load_state_dict(loaded.optimizer)
        if scheduler is not None:
            if loaded.scheduler is None:
                logger.warning("Checkpoint %s contains no scheduler state; the scheduler is unchanged", folder.name)
            else:
                scheduler.load_state_dict(loaded.scheduler)
        rng_state = rank_rng_state(loaded.rng_state, self._ranks.rank, self._ranks.world_size)
        if rng_state is not None:
            restore_rng_state(rng_state)

    # Final model -----------------------------------------------------------------------------

    def save_final_model(
        self,
        model: torch.nn.Module | None = None,
        name: str = "final_model",
        format: Literal["pt", "safetensors"] = "pt",
        config: Any = None,
    ) -> str:
        """Save the trained weights (and ``config.json``) into ``local_dir/name`` and return that folder.

        ``format="safetensors"`` writes ``model.safetensors`` and ``format="pt"``
        writes ``pytorch_model.bin``, the names transformers' ``from_pretrained`` reads.
        The same files are also linked into ``local_dir`` itself, replacing those of an
        earlier final model, so ``from_pretrained(local_dir)`` loads the latest one.
        """
        if format not in ("pt", "safetensors"):
            raise ConfigurationError(
                f"Unsupported format {format!r}: use format='safetensors' (recommended) or 'pt'."
            )
        validate_name(name, self.local_dir)
        model = self._model if model is None else model
        if model is None:
            raise ConfigurationError(
                "save_final_model needs a model: pass model= or call set_model() first."
            )
        state = None
        if is_sharded(model):
            # Every rank sends its shards; rank 0 receives the whole state dict on the CPU.
            state = self._ranks.run_everywhere(
                "Gathering the full model state", lambda: full_model_state(model)
            )
        self._final_model = self._write_final_model(model, name, format, config, state)
        return self._final_model["path"]

    @on_main_rank("Saving the final model")
    def _write_final_model(self, model, name, format, config, state) -> dict[str, Any]:
        folder = save_model_folder(
            model, self.local_dir / name, format=format, config=config, state_dict=state
        )
        self._final_model = {
            "name": name,
            "path": str(folder),
            "format": format,
            "files": sorted(path.name for path in folder.iterdir()),
            "also_in_local_dir": [],
        }
        try:
            self._final_model["also_in_local_dir"] = publish_model_files(folder, self.local_dir)
        except OSError as err:
            try:
                self._write_metadata()
            except OSError as metadata_error:
                logger.warning("Writing the metadata failed too: %s", metadata_error)
            raise CheckpointSaveError(
                f"The final model is saved in {folder}, but linking its files into "
                f"{self.local_dir} failed: {err}. Load it from {folder}, or free space or fix "
                f"permissions in {self.local_dir} and save again.",
                path=str(folder),
            ) from err
        self.save_metadata()
        logger.info("Saved the final model to %s", folder)
        return self._final_model

    # Metadata and summary --------------------------------------------------------------------

    def _run_info(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "local_dir": str(self.local_dir),
            "checkpoint_dir": str(self.checkpoint_dir),
            "retention_policy": repr(self.retention_policy),
        }

    def _metadata(self, checkpoints: list[CheckpointInfo] | None = None) -> dict[str, Any]:
        if checkpoints is None:
            checkpoints = self.store.list()
        if self._environment is None:
            # Collected once: the package versions and the git state of the code this process
            # runs do not change while it runs, and the git call costs milliseconds per save.
            self._environment = collect_environment(os.getcwd())
        return build_metadata(
            self.tracker,
            checkpoints=[info.to_dict() for info in reversed(checkpoints)],
            final_model=self._final_model,
            run=self._run_info(),
            environment=self._environment,
        )

    @on_main_rank("Writing the metadata")
    def save_metadata(self, filename: str = METADATA_FILENAME) -> str:
        """Write hyperparameters, metrics, checkpoints and environment to ``local_dir/filename``."""
        validate_name(filename, self.local_dir)
        return self._write_metadata(filename)

    def _write_metadata(
        self, filename: str = METADATA_FILENAME, *, checkpoints: list[CheckpointInfo] | None = None
    ) -> str:
        with self._bookkeeping:
            return write_metadata(self.local_dir / filename, self._metadata(checkpoints))

    def get_summary(self) -> str:
        return format_summary(
            self.tracker,
            run=self._run_info(),
            checkpoints=self.list_checkpoints(),
            final_model=self._final_model,
        )

    # Hub -------------------------------------------------------------------------------------

    def _hub_sync(self, action: str) -> HubSync:
        self._require_repo_id(action)
        assert self._hub is not None
        return self._hub

    def _enqueue_push(self, info: CheckpointInfo) -> None:
        """Queue the push of a checkpoint that ``_after_commit`` already marked as unpushed."""
        hub = self._hub_sync("Pushing a checkpoint")
        folder = Path(info.path)
        metadata_path = self.local_dir / METADATA_FILENAME

        def job() -> None:
            operations = checkpoint_operations(info.name, folder) + [pointer_operation(info)]
            if metadata_path.exists():
                # Bytes, not the path: the file may be replaced while the upload runs.
                operations += file_operations([(METADATA_FILENAME, metadata_path.read_bytes())])
                operations += file_operations(self._tensorboard.read_files())
            hub.commit(operations, f"Add checkpoint {info.name}")
            hub.unpushed.discard(info.name)
            logger.info("Pushed checkpoint %s to %s", info.name, hub.repo_id)
            # Retention skipped this checkpoint while its push was pending; apply it now. The
            # queue lists the checkpoint as pending until this job returns, so it is passed as
            # finished to leave it unprotected.
            try:
                self._apply_retention(hub.protected(finished=info.name), update_metadata=True)
            except Exception as err:  # noqa: BLE001 - the push itself succeeded
                # The next save runs retention again and raises this error to the caller.
                logger.warning(
                    "Pushed %s, but applying retention after it failed: %s", info.name, err
                )

        hub.queue.submit(info.name, job)

    @on_main_rank("Waiting for pushes")
    def wait_for_pushes(self, timeout: float | None = None) -> None:
        """Block until background pushes finish; raise PushError naming any that failed."""
        if self._hub is not None:
            self._hub.wait(timeout)

    @on_main_rank("push()")
    def push(
        self,
        push_checkpoints: bool = True,
        push_metadata: bool = True,
        push_final_model: bool = False,
        commit_message: str = "Upload training artifacts",
    ) -> None:
        """Upload checkpoints, metadata, model card and (optionally) the final model in one commit.

        Background pushes are flushed first, and any that failed raise PushError
        here; calling push() again then uploads every local checkpoint.
        """
        hub = self._hub_sync("push()")
        if push_final_model and self._final_model is None:
            raise ConfigurationError(
                "push_final_model=True, but no final model was saved: call save_final_model() first."
            )
        hub.token(required=True)
        hub.wait()
        checkpoints = self.store.list() if push_checkpoints else []
        operations: list[Any] = []
        for info in checkpoints:
            operations += checkpoint_operations(info.name, Path(info.path))
        if checkpoints:
            operations.append(pointer_operation(checkpoints[-1]))
        pruned: list[str] = []
        if push_checkpoints and self.prune_hub_checkpoints:
            # Only checkpoints this folder's retention deleted: a run resumed on a new machine
            # has just one checkpoint locally, and the Hub's others must survive its push.
            local_names = {info.name for info in checkpoints}
            pruned = sorted((hub.remote_checkpoints() & self.store.retired()) - local_names)
            operations += [delete_folder_operation(name) for name in pruned]
        if push_metadata or push_final_model:
            operations += self._card_operations(hub.repo_id, include_metadata=push_metadata)
        if push_final_model:
            folder = Path(self._final_model["path"])
            operations += file_operations(
                (path.name, path) for path in sorted(folder.iterdir()) if path.is_file()
            )
        if not operations:
            logger.info("Nothing to push to %s", hub.repo_id)
            return
        self._commit_with_retries(
            hub,
            operations,
            commit_message,
            action="push()",
            next_step="Local files are unchanged; call push() again.",
            checkpoints=[info.name for info in checkpoints],
        )
        hub.unpushed.difference_update(info.name for info in checkpoints)
        if pruned:
            self.store.forget_retired(pruned)
            logger.info("Removed %d checkpoints from %s: %s", len(pruned), hub.repo_id, ", ".join(pruned))
        # Retention kept these checkpoints while their push was failing; apply it now.
        self.cleanup_checkpoints()
        logger.info(
            "Pushed %d checkpoints%s%s to %s",
            len(checkpoints),
            ", metadata" if push_metadata else "",
            ", final model" if push_final_model else "",
            hub.repo_url,
        )

    def _commit_with_retries(
        self, hub: HubSync, operations: list[Any], commit_message: str, *,
        action: str, next_step: str, checkpoints: list[str] | None = None,
    ) -> None:
        """Commit ``operations`` with the manager's retries; wrap a final non-Hub error in PushError."""
        try:
            run_with_retries(
                lambda: hub.commit(operations, commit_message),
                action,
                retries=self._push_retries,
                retry_wait=self._push_retry_wait,
            )
        except HubError:
            raise
        except Exception as err:
            raise PushError(
                f"{action} to {hub.repo_id} failed: {describe_error(err)}. {next_step}",
                repo_id=hub.repo_id,
                checkpoints=checkpoints or [],
            ) from err

    def _card_operations(self, repo_id: str, *, include_metadata: bool) -> list[Any]:
        from hf_lifecycle.hub.card import write_card_files

        metadata = self._metadata()
        write_metadata(self.local_dir / METADATA_FILENAME, metadata)
        written = write_card_files(
            self.local_dir,
            metadata,
            repo_id=repo_id,
            final_model=self._final_model,
            tracker=self.tracker,
        )
        files = [(relative, self.local_dir / relative) for relative in written]
        if include_metadata:
            files.append((METADATA_FILENAME, self.local_dir / METADATA_FILENAME))
            # Event files are read under the writer's lock, so each upload ends on a whole record.
            files += self._tensorboard.read_files()
        return file_operations(files)

    @on_main_rank("pull_checkpoint()")
    def pull_checkpoint(self, name: str | None = None) -> dict[str, Any] | None:
        """Download checkpoint ``name`` (the Hub's latest when None) unless it is already local.

        Returns the checkpoint's listing entry, as in :meth:`list_checkpoints`, without loading
        anything into a model, or None when the Hub has no checkpoint. A local checkpoint of
        the same name is returned as it is, without contacting the Hub for its files.
        """
        hub = self._hub_sync("pull_checkpoint()")
        if name is None:
            revision = hub.head()
            pointer = hub.latest_pointer(revision) if revision is not None else None
            if pointer is None:
                return None
            name = pointer["name"]
        validate_name(name, self.checkpoint_dir)
        for info in self.store.list():
            if info.name == name:
                return info.to_dict()
        return self._fetch_from_hub(name).to_dict()

    def _fetch_from_hub(self, name: str | None) -> CheckpointInfo | None:
        """Download one checkpoint (the Hub's latest when ``name`` is None) into the local store."""
        hub = self._hub_sync("Loading from the Hub")
        revision = hub.head()
        if revision is None:
            if name is None:
                return None
            raise CheckpointNotFoundError(
                f"No checkpoint named {name!r} locally, and Hub repository {hub.repo_id} does not "
                f"exist.",
                path=str(self.checkpoint_dir / name),
            )
        if name is None:
            pointer = hub.latest_pointer(revision)
            if pointer is None:
                return None
            name = validate_name(pointer["name"], self.checkpoint_dir)
        staging = self.store.staging_dir("hub")
        try:
            folder = hub.download_checkpoint(name, revision, staging)
            info = self.store.import_folder(name, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("Downloaded checkpoint %s from %s at %s", name, hub.repo_id, revision[:12])
        return info

    @on_main_rank("register_custom_model()")
    def register_custom_model(
        self,
        model: torch.nn.Module | None = None,
        config: Any = None,
        repo_id: str | None = None,
        model_name: str | None = None,
        description: str = "",
        push_to_hub: bool = False,
        commit_message: str = "Upload custom model",
    ) -> str | None:
        """Register a custom architecture with transformers' Auto classes; optionally push it.

        Saves a self-contained folder under ``local_dir`` (weights, config with
        ``auto_map``, the modeling and configuration sources, a model card) that
        loads with ``AutoModel.from_pretrained(folder, trust_remote_code=True)``.
        Returns the repository URL when pushed, else None.
        """
        from hf_lifecycle.registry import register_custom_model as register

        repo_id = _check_repo_id(repo_id)
        target_repo = repo_id or self.repo_id
        if push_to_hub and target_repo is None:
            self._require_repo_id("register_custom_model(push_to_hub=True)")
        if push_to_hub and (not isinstance(commit_message, str) or not commit_message.strip()):
            raise ConfigurationError(
                f"commit_message must be a non-empty string, got {commit_message!r}."
            )
        model = self._model if model is None else model
        hub = None
        if push_to_hub:
            hub = self._hub if target_repo == self.repo_id else HubSync(
                target_repo, token=self._token, private=self.private,
                retries=self._push_retries, retry_wait=self._push_retry_wait,
            )
            hub.token(required=True)
        registered = register(
            model,
            config,
            output_dir=self.local_dir / "custom_models",
            model_name=model_name,
            description=description,
            repo_id=target_repo,
        )
        if hub is None:
            return None
        operations = file_operations(
            (path.relative_to(registered.folder).as_posix(), path)
            for path in sorted(registered.folder.rglob("*"))
            if path.is_file()
        )
        try:
            self._commit_with_retries(
                hub,
                operations,
                commit_message,
                action=f"Pushing custom model {registered.model_type}",
                next_step=(
                    f"The folder {registered.folder} is written, so call "
                    f"register_custom_model(push_to_hub=True) again to upload it."
                ),
            )
        finally:
            if hub is not self._hub:
                hub.unregister_exit_flush()
        logger.info("Pushed custom model %s to %s", registered.model_type, hub.repo_url)
        return hub.repo_url

    # Lifecycle -------------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Flush the background save and pushes; raise the first error. Safe to call twice.

        ``timeout`` limits the wait for pushes, in seconds: a Hub that stops responding would
        otherwise hold this call, and the program's exit, for as long as the connection
        stays open. When it runs out, :class:`PushError` names the checkpoints not pushed;
        they stay on disk, and the program exits without waiting for them.
        """
        timeout = _check_timeout(timeout)
        try:
            self._writer.wait()
        finally:
            self._writer.buffers.release()  # A snapshot's buffers are as large as the state.
            for handle in list(self._guarded_optimizers.values()):
                handle.remove()
            self._guarded_optimizers.clear()
            self._tensorboard.close()
            if self._hub is not None:
                self._flush_hub(timeout)

    @on_main_rank("Waiting for pushes")
    def _flush_hub(self, timeout: float | None = None) -> None:
        if self._hub is None:
            return
        try:
            self._hub.wait(timeout)
        finally:
            if self._hub.queue.pending():
                # Timed out: the exit hook reports these as not pushed instead of waiting.
                self._hub.exit_timeout = 0.0
            else:
                self._hub.unregister_exit_flush()

    def __enter__(self) -> HFManager:
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        if exc_type is None:
            self.close()
            return
        # An exception is already propagating: report push failures without masking it.
        try:
            self.close()
        except (PushError, CheckpointSaveError) as err:
            logger.error("%s", err)

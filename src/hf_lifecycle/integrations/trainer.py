"""A transformers ``Trainer`` callback that saves, tracks and pushes through :class:`HFManager`.

Usage::

    manager = HFManager(repo_id="alice/tiny-gpt2", retention_policy=KeepLastN(2))
    trainer = Trainer(model, args, train_dataset=data,
                      callbacks=[HFLifecycleCallback(manager)])
    resume_trainer_from_manager(trainer, manager)   # or trainer.train() for a new run
    manager.close()

Each Trainer save becomes a manager checkpoint that also contains the ``TrainerState``.
Resuming writes the manager's checkpoint back as a Trainer ``checkpoint-N`` folder and
passes it to ``trainer.train(resume_from_checkpoint=...)``. The Trainer then restores
everything itself: weights, optimizer, scheduler, RNG states, and the position in the data,
including skipping the batches already seen in the current epoch and reloading the RNG after
that skip. Re-implementing those steps outside the Trainer would depend on its private
training loop, and any difference in the order of RNG draws changes every later loss.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as err:
    raise ImportError(
        "hf_lifecycle.integrations.trainer needs transformers. Install it with: "
        'pip install "hf-lifecycle[transformers]"'
    ) from err

import torch

from hf_lifecycle._io import fsync_dir
from hf_lifecycle.checkpoint.serialize import MODEL_EXTRA_FILE, MODEL_FILE, read_state
from hf_lifecycle.checkpoint.tensorfile import write_tensors
from hf_lifecycle.errors import CheckpointCorruptedError, ConfigurationError
from hf_lifecycle.manager import HFManager

__all__ = [
    "CUSTOM_STATE_KEY",
    "HFLifecycleCallback",
    "export_trainer_checkpoint",
    "resume_trainer_from_manager",
]

logger = logging.getLogger(__name__)

CUSTOM_STATE_KEY = "transformers_trainer"
"""Key of the ``custom_state`` entry that contains what the Trainer needs to resume."""

# File names the Trainer reads in a checkpoint-N folder (transformers.trainer, 4.46 to 5.x).
_TRAINER_STATE = "trainer_state.json"
_OPTIMIZER = "optimizer.pt"
_SCHEDULER = "scheduler.pt"
_SCALER = "scaler.pt"
_RNG_STATE = "rng_state.pth"
_WEIGHTS_PT = "pytorch_model.bin"


def _numbers(logs: Mapping[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in logs.items()
        if isinstance(value, numbers.Real) and not isinstance(value, bool)
    }


class HFLifecycleCallback(TrainerCallback):
    """Sends a Trainer's logs, hyperparameters, checkpoints and final model to ``manager``.

    * ``on_train_begin``: ``args`` and the model's config go to ``track_hyperparameters``
      (the config under ``model_config``). The tracker stores keys that look like
      credentials, such as ``hub_token``, as ``<redacted>``.
    * ``on_log``: every numeric value goes to ``log_metrics`` at ``state.global_step``.
    * ``on_save``: the model, optimizer and LR scheduler become a manager checkpoint at
      ``state.global_step``, with retention and, when ``push`` or the manager's
      ``auto_push`` requests it, a push. Its metrics, which retention policies such as
      ``KeepBestM(metric="eval_loss")`` read, are the latest training ``loss`` and the
      latest ``eval_*`` values. The ``TrainerState`` is stored in ``custom_state``.
    * ``on_train_end``: with ``save_final_model``, the model is saved as safetensors with
      its config into ``local_dir/final_model_name`` and, when the manager has a
      ``repo_id``, pushed with the checkpoints, metadata and model card.

    Only the process with ``state.is_world_process_zero`` talks to the manager, so in a
    multi-process Trainer run create the manager with ``HFManager(..., distributed=False)``:
    a rank-aware manager would wait at its first save for ranks that never call it.

    NOTE: under FSDP or DeepSpeed, rank 0 alone cannot gather the full state dict. A resumed
    multi-process run gets no RNG state back, because the Trainer then looks for one
    ``rng_state_<rank>.pth`` per process and only rank 0's state is saved. Neither is tested.
    """

    def __init__(
        self,
        manager: HFManager,
        *,
        push: bool | None = None,
        save_final_model: bool = True,
        final_model_name: str = "final_model",
    ) -> None:
        if not isinstance(manager, HFManager):
            raise ConfigurationError(
                f"HFLifecycleCallback needs an HFManager, got {type(manager).__name__}."
            )
        self.manager = manager
        self.push = push
        self.save_final_model = bool(save_final_model)
        self.final_model_name = final_model_name
        self._last_loss: dict[str, float] = {}
        self._last_eval: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        hyperparameters = json.loads(args.to_json_string())
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            hyperparameters["model_config"] = json.loads(config.to_json_string(use_diff=False))
        self.manager.track_hyperparameters(hyperparameters)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        metrics = _numbers(logs)
        if not metrics:
            return
        self.manager.log_metrics(metrics, step=state.global_step)
        if "loss" in metrics:
            self._last_loss = {"loss": metrics["loss"]}
        evaluated = {key: value for key, value in metrics.items() if key.startswith("eval_")}
        if evaluated:
            self._last_eval = evaluated

    def on_save(
        self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs
    ):
        if not state.is_world_process_zero:
            return
        # The same dict TrainerState.save_to_json writes, passed through JSON so it is plain data.
        trainer_state = {"trainer_state": json.loads(json.dumps(dataclasses.asdict(state)))}
        scaler = _trainer_scaler_state(args, state)
        if scaler is not None:
            trainer_state["scaler"] = scaler
        self.manager.save_checkpoint(
            model=model,
            optimizer=optimizer,
            scheduler=lr_scheduler,
            epoch=math.floor(state.epoch or 0),
            step=state.global_step,
            metrics={**self._last_loss, **self._last_eval},
            custom_state={CUSTOM_STATE_KEY: trainer_state},
            config=getattr(model, "config", None),
            push=self.push,
        )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or not self.save_final_model or model is None:
            return
        self.manager.save_final_model(
            model,
            name=self.final_model_name,
            format="safetensors",
            config=getattr(model, "config", None),
        )
        if self.manager.repo_id is not None:
            self.manager.push(push_final_model=True, commit_message="Upload the final model")


def _trainer_scaler_state(args: Any, state: Any) -> dict[str, Any] | None:
    # The gradient scaler (fp16 mixed precision) is not passed to callbacks, but the Trainer
    # has just written its state into its own checkpoint folder.
    path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / _SCALER
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def export_trainer_checkpoint(
    manager: HFManager,
    output_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
) -> str | None:
    """Write a manager checkpoint as a Trainer ``checkpoint-N`` folder inside ``output_dir``.

    ``name`` defaults to the newest local checkpoint, or, with an empty checkpoint folder
    and a ``repo_id``, to the Hub's latest, which is downloaded first. Returns the folder to
    pass to ``trainer.train(resume_from_checkpoint=...)``, or None when there is no
    checkpoint. Every file is verified against its checksum while it is read.

    The folder contains ``model.safetensors`` (or ``pytorch_model.bin`` when the state dict has
    non-tensor entries), ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``,
    ``trainer_state.json``, ``config.json`` and, for fp16 runs, ``scaler.pt``. Metric
    records the manager logged after this checkpoint are dropped, as the resumed run logs
    those steps again.
    """
    found = _read_checkpoint(manager, name)
    if found is None:
        return None
    info, manifest, loaded = found
    custom_state = loaded.custom_state if isinstance(loaded.custom_state, Mapping) else {}
    saved = custom_state.get(CUSTOM_STATE_KEY)
    if not isinstance(saved, Mapping) or not isinstance(saved.get("trainer_state"), Mapping):
        raise ConfigurationError(
            f"Checkpoint {info['name']!r} in {manager.checkpoint_dir} contains no Trainer state, "
            f"so the Trainer cannot resume from it. Resume from a checkpoint saved by "
            f"HFLifecycleCallback, or load this one with manager.load_checkpoint()."
        )
    trainer_state = dict(saved["trainer_state"])
    target = Path(output_dir) / f"checkpoint-{trainer_state['global_step']}"
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    temp.mkdir()
    try:
        _write_trainer_files(temp, manifest, loaded, saved, trainer_state)
        if target.exists():
            shutil.rmtree(target)
        os.rename(temp, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(temp, ignore_errors=True)

    history_length = (manifest.get("tracking") or {}).get("history_length")
    if isinstance(history_length, int) and history_length < manager.tracker.history_length():
        manager.tracker.truncate(history_length)
    logger.info("Wrote checkpoint %s as Trainer checkpoint %s", info["name"], target)
    return str(target)


def _read_checkpoint(manager: HFManager, name: str | None) -> tuple[dict, dict, Any] | None:
    """Find, verify and decode a checkpoint: ``name``, else the newest intact one."""
    if name is not None:
        if manager.repo_id is not None:
            info = manager.pull_checkpoint(name)
        else:
            info = manager.store.get(name).to_dict()
        manifest = manager.store.read_manifest(info["name"])
        return info, manifest, read_state(Path(info["path"]), manifest)
    candidates = [entry.to_dict() for entry in reversed(manager.store.list())]
    if not candidates and manager.repo_id is not None:
        pulled = manager.pull_checkpoint()
        candidates = [pulled] if pulled is not None else []
    for info in candidates:
        try:
            manifest = manager.store.read_manifest(info["name"])
            return info, manifest, read_state(Path(info["path"]), manifest)
        except CheckpointCorruptedError as err:
            logger.warning("Skipping corrupted checkpoint %s: %s", info["name"], err)
    return None


def _write_trainer_files(target, manifest, loaded, saved, trainer_state) -> None:
    components = manifest.get("components") or {}
    model_files = (components.get("model") or {}).get("files", [])
    if MODEL_EXTRA_FILE in model_files:
        # safetensors stores tensors only, and the Trainer reads pytorch_model.bin as well.
        torch.save(loaded.model_state, target / _WEIGHTS_PT)
    elif loaded.model_state is not None:
        # Tied weights are written under every name, so the Trainer finds no key missing.
        write_tensors(target / MODEL_FILE, loaded.model_state, {"format": "pt"}, durable=False)
    if loaded.optimizer is not None:
        torch.save(loaded.optimizer, target / _OPTIMIZER)
    if loaded.scheduler is not None:
        torch.save(loaded.scheduler, target / _SCHEDULER)
    if saved.get("scaler") is not None:
        torch.save(dict(saved["scaler"]), target / _SCALER)
    if loaded.rng_state is not None:
        torch.save(_trainer_rng_state(loaded.rng_state), target / _RNG_STATE)
    if loaded.config is not None:
        text = json.dumps(loaded.config, indent=2, sort_keys=True) + "\n"
        (target / "config.json").write_text(text, encoding="utf-8")
    # The layout TrainerState.save_to_json writes.
    text = json.dumps(trainer_state, indent=2, sort_keys=True) + "\n"
    (target / _TRAINER_STATE).write_text(text, encoding="utf-8")


def _trainer_rng_state(rng_state: Mapping[str, Any]) -> dict[str, Any]:
    """Convert the manager's RNG record to the keys of the Trainer's ``rng_state.pth``."""
    converted: dict[str, Any] = {}
    if "python" in rng_state:
        converted["python"] = rng_state["python"]
    if "numpy" in rng_state:
        converted["numpy"] = rng_state["numpy"]
    if "torch" in rng_state:
        converted["cpu"] = rng_state["torch"]
    cuda = rng_state.get("cuda")
    if cuda and torch.cuda.is_available():
        # A single-process Trainer restores one device's state: the current device's.
        index = torch.cuda.current_device()
        converted["cuda"] = cuda[index] if index < len(cuda) else cuda[0]
    return converted


def resume_trainer_from_manager(
    trainer: transformers.Trainer,
    manager: HFManager,
    *,
    name: str | None = None,
    **train_kwargs: Any,
) -> Any:
    """Run ``trainer.train()``, resumed from the manager's checkpoint when there is one.

    The checkpoint (see :func:`export_trainer_checkpoint` for which one) is written as a
    Trainer folder in a temporary folder inside ``manager.local_dir``, which is removed when
    training returns or raises. Returns what ``trainer.train`` returns.
    """
    if "resume_from_checkpoint" in train_kwargs:
        raise ConfigurationError(
            "resume_trainer_from_manager chooses resume_from_checkpoint itself; call "
            "trainer.train(resume_from_checkpoint=...) directly to resume from another folder."
        )
    staging = Path(tempfile.mkdtemp(prefix=".trainer-resume-", dir=manager.local_dir))
    try:
        checkpoint = export_trainer_checkpoint(manager, staging, name=name)
        if checkpoint is None:
            logger.info(
                "No checkpoint to resume from in %s; training from the start",
                manager.checkpoint_dir,
            )
        return trainer.train(resume_from_checkpoint=checkpoint, **train_kwargs)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

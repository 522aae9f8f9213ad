"""HFLifecycleCallback on a tiny GPT-2 Trainer: tracking, retention, Hub push, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from huggingface_hub import hf_hub_download  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hf_lifecycle import ConfigurationError, HFManager, KeepBestM, KeepLastN  # noqa: E402
from hf_lifecycle.integrations.trainer import (  # noqa: E402
    CUSTOM_STATE_KEY,
    HFLifecycleCallback,
    export_trainer_checkpoint,
    resume_trainer_from_manager,
)
from hf_lifecycle.tracking import REDACTED, read_metadata  # noqa: E402

VOCAB = 32
SEQUENCE = 8
BATCH = 4
EXAMPLES = 32
EPOCHS = 2
SAVE_STEPS = 5
CRASH_STEP = 12
TOTAL_STEPS = EPOCHS * EXAMPLES // BATCH
HUB_TOKEN = "hf_trainer_args_token_not_real_42"


class Interrupted(Exception):
    """Stands in for a crash in the middle of training."""


class CrashAt(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted(f"stopped at step {self.step}")


class LossRecorder(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def token_data(seed: int, count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (count, SEQUENCE), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def make_trainer(output_dir, callbacks, **overrides):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2
    )
    model = transformers.GPT2LMHeadModel(config)
    settings = dict(
        per_device_train_batch_size=BATCH,
        num_train_epochs=EPOCHS,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        eval_strategy="steps",
        eval_steps=SAVE_STEPS,
        use_cpu=True,
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    args = transformers.TrainingArguments(str(output_dir), **settings)
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=token_data(0, EXAMPLES),
        eval_dataset=token_data(1, 8),
        callbacks=callbacks,
    )


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    """Training losses by step of the same run without the callback and without a stop."""
    recorder = LossRecorder()
    make_trainer(tmp_path_factory.mktemp("reference"), [recorder]).train()
    return recorder.losses


def manager_losses(manager: HFManager) -> dict[int, float]:
    return {record["step"]: record["value"] for record in manager.tracker.history("loss")}


@pytest.mark.slow
def test_callback_run(tmp_path, hub, repo_id, reference_losses):
    policy = KeepLastN(1) | KeepBestM(1, metric="eval_loss")
    manager = HFManager(
        repo_id=repo_id,
        local_dir=tmp_path / "out",
        checkpoint_dir=tmp_path / "ckpt",
        retention_policy=policy,
        auto_push=True,
    )
    trainer = make_trainer(
        tmp_path / "trainer", [HFLifecycleCallback(manager)], hub_token=HUB_TOKEN
    )
    with manager:
        trainer.train()

    assert manager_losses(manager) == reference_losses
    eval_losses = {
        record["step"]: record["value"] for record in manager.tracker.history("eval_loss")
    }
    assert sorted(eval_losses) == list(range(SAVE_STEPS, TOTAL_STEPS, SAVE_STEPS)) + [TOTAL_STEPS]

    best_step = min(eval_losses, key=lambda step: (eval_losses[step], -step))
    kept = {entry["name"]: entry for entry in manager.list_checkpoints()}
    assert set(kept) == {f"checkpoint-step-{TOTAL_STEPS}", f"checkpoint-step-{best_step}"}
    for entry in kept.values():
        assert entry["metrics"]["eval_loss"] == eval_losses[entry["step"]]
        assert entry["metrics"]["loss"] == reference_losses[entry["step"]]

    metadata = read_metadata(tmp_path / "out" / "experiment_metadata.json")
    hyperparameters = metadata["hyperparameters"]
    assert hyperparameters["learning_rate"] == 1e-2
    assert hyperparameters["hub_token"] == REDACTED
    assert hyperparameters["model_config"]["n_layer"] == 2
    assert HUB_TOKEN not in (tmp_path / "out" / "experiment_metadata.json").read_text()
    assert len(metadata["metrics_history"]["loss"]) == TOTAL_STEPS

    weights = load_file(hf_hub_download(repo_id, "model.safetensors"))
    for key, tensor in trainer.model.state_dict().items():
        if key in weights:
            assert torch.equal(weights[key], tensor), key
    config = json.loads(open(hf_hub_download(repo_id, "config.json")).read())
    assert config["model_type"] == "gpt2"


@pytest.mark.slow
def test_resume_matches_uninterrupted(tmp_path, reference_losses):
    directories = dict(local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")
    manager = HFManager(**directories, retention_policy=KeepLastN(2))
    trainer = make_trainer(tmp_path / "first", [HFLifecycleCallback(manager), CrashAt(CRASH_STEP)])
    with pytest.raises(Interrupted):
        trainer.train()
    manager.close()
    resume_step = CRASH_STEP - CRASH_STEP % SAVE_STEPS
    assert manager.store.latest().step == resume_step

    manager = HFManager(**directories, retention_policy=KeepLastN(2))
    recorder = LossRecorder()
    # A fresh output folder: the Trainer's own checkpoints of the first attempt are not used.
    trainer = make_trainer(tmp_path / "second", [HFLifecycleCallback(manager), recorder])
    resume_trainer_from_manager(trainer, manager)
    manager.close()

    assert min(recorder.losses) == resume_step + 1
    for step, loss in recorder.losses.items():
        assert loss == reference_losses[step], f"step {step}"
    assert manager_losses(manager) == reference_losses
    assert not list(tmp_path.joinpath("out").glob(".trainer-resume-*"))


def test_export_writes_trainer_files(tmp_path):
    manager = HFManager(local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")
    trainer = make_trainer(
        tmp_path / "trainer",
        [HFLifecycleCallback(manager, save_final_model=False)],
        max_steps=SAVE_STEPS,
        eval_strategy="no",
    )
    trainer.train()
    manager.close()

    folder = export_trainer_checkpoint(manager, tmp_path / "export")
    assert os.path.basename(folder) == f"checkpoint-{SAVE_STEPS}"
    names = sorted(os.listdir(folder))
    assert names == sorted(
        [
            "config.json",
            "model.safetensors",
            "optimizer.pt",
            "rng_state.pth",
            "scheduler.pt",
            "trainer_state.json",
        ]
    )
    state = transformers.TrainerState.load_from_json(os.path.join(folder, "trainer_state.json"))
    assert state.global_step == SAVE_STEPS
    weights = load_file(os.path.join(folder, "model.safetensors"))
    # The tied LM head is written under its own name too, so loading reports no missing key.
    assert torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])
    assert not (tmp_path / "out" / "final_model").exists()


def test_export_needs_trainer_state(tmp_path):
    manager = HFManager(local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")
    manager.save_checkpoint(torch.nn.Linear(2, 2), step=1)
    with pytest.raises(ConfigurationError, match="contains no Trainer state"):
        export_trainer_checkpoint(manager, tmp_path / "export")


def test_export_empty_returns_none(tmp_path):
    manager = HFManager(local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")
    assert export_trainer_checkpoint(manager, tmp_path / "export") is None


def test_export_from_hub(tmp_path, hub, repo_id):
    manager = HFManager(
        repo_id=repo_id, local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt"
    )
    trainer = make_trainer(
        tmp_path / "trainer",
        [HFLifecycleCallback(manager, push=True, save_final_model=False)],
        max_steps=SAVE_STEPS,
        eval_strategy="no",
    )
    trainer.train()
    manager.close()

    elsewhere = HFManager(
        repo_id=repo_id, local_dir=tmp_path / "out2", checkpoint_dir=tmp_path / "ckpt2"
    )
    folder = export_trainer_checkpoint(elsewhere, tmp_path / "export")
    assert os.path.basename(folder) == f"checkpoint-{SAVE_STEPS}"
    assert [entry["name"] for entry in elsewhere.list_checkpoints()] == [
        f"checkpoint-step-{SAVE_STEPS}"
    ]
    custom = elsewhere.load_checkpoint(f"checkpoint-step-{SAVE_STEPS}")["custom_state"]
    assert custom[CUSTOM_STATE_KEY]["trainer_state"]["global_step"] == SAVE_STEPS


def test_resume_rejects_explicit_folder(tmp_path):
    manager = HFManager(local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")
    with pytest.raises(ConfigurationError, match="resume_from_checkpoint"):
        resume_trainer_from_manager(object(), manager, resume_from_checkpoint="elsewhere")


def test_callback_needs_manager():
    with pytest.raises(ConfigurationError, match="needs an HFManager"):
        HFLifecycleCallback(object())


def test_missing_transformers_message():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "try:\n"
        "    import hf_lifecycle.integrations.trainer\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert 'pip install "hf-lifecycle[transformers]"' in result.stdout

"""Train a small MLP whose result depends on every random generator, for the exact-resume tests.

Imported by the tests for the straight run and the first half of a split run. Run as a
script, it finishes a split run in a new process::

    resume_train.py CHECKPOINT_DIR LOCAL_DIR STEPS RESULT_PATH

It builds fresh objects from a different seed, loads the latest checkpoint into them,
trains STEPS more steps, and writes :func:`snapshot` to RESULT_PATH with ``torch.save``.
"""

from __future__ import annotations

import random
import sys

import numpy as np
import torch

FEATURES = 8
BATCH = 16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Return a fixed regression data set, drawn from its own seeded generator."""
    generator = torch.Generator().manual_seed(1234)
    inputs = torch.randn(256, FEATURES, generator=generator)
    targets = inputs @ torch.randn(FEATURES, 1, generator=generator)
    return inputs, targets


def build(seed: int):
    """Return a dropout MLP, its AdamW optimizer and a StepLR scheduler, initialised from ``seed``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 32),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.3),
        torch.nn.Linear(32, 1),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    return model, optimizer, scheduler


def train(model, optimizer, scheduler, steps: int) -> None:
    """Train ``steps`` steps, drawing batches, noise and loss weights from all three RNGs."""
    inputs, targets = make_data()
    model.train()
    for _ in range(steps):
        index = torch.randint(0, inputs.shape[0], (BATCH,))
        noise = torch.from_numpy(np.random.normal(0.0, 0.05, size=(BATCH, FEATURES))).float()
        weight = random.gauss(1.0, 0.1)
        loss = weight * torch.nn.functional.mse_loss(model(inputs[index] + noise), targets[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def next_random() -> dict[str, object]:
    """Draw the next numbers from each generator, to compare the RNG states after training."""
    return {
        "torch": torch.rand(4),
        "numpy": np.random.rand(4),
        "python": [random.random() for _ in range(4)],
    }


def snapshot(model, optimizer, scheduler) -> dict[str, object]:
    """Return copies of everything an exact resume must reproduce, then the next random numbers."""
    return {
        "model": {key: value.clone() for key, value in model.state_dict().items()},
        "optimizer": _clone(optimizer.state_dict()),
        "scheduler": _clone(scheduler.state_dict()),
        "random": next_random(),
    }


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: _clone(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(item) for item in value)
    return value


def main(argv: list[str]) -> None:
    from hf_lifecycle import HFManager

    checkpoint_dir, local_dir, steps, result_path = argv
    model, optimizer, scheduler = build(seed=99)
    seed_everything(99)
    manager = HFManager(local_dir=local_dir, checkpoint_dir=checkpoint_dir)
    loaded = manager.load_latest_checkpoint(model, optimizer, scheduler)
    if loaded is None:
        raise SystemExit(f"no checkpoint found in {checkpoint_dir}")
    train(model, optimizer, scheduler, int(steps))
    torch.save(snapshot(model, optimizer, scheduler), result_path)


if __name__ == "__main__":
    main(sys.argv[1:])

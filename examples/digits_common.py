"""Data, model and training loop shared by the digits examples.

The loop is resumable to the bit: the batch order of each epoch comes from a
generator seeded with the epoch number, and a checkpoint records how many
batches of the current epoch were already consumed.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclasses.dataclass
class DigitsConfig:
    """Hyperparameters of the digits run."""

    hidden_size: int = 128
    dropout: float = 0.1
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    epochs: int = 6
    seed: int = 0
    dataset: str = "sklearn-digits"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DigitsMLP(nn.Module):
    """Two-layer perceptron over the 64 pixels of an 8x8 digit."""

    def __init__(self, input_size: int = 64, hidden_size: int = 128, num_classes: int = 10,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.dropout = dropout
        self.net = nn.Sequential(
            nn.Linear(input_size, hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


@dataclasses.dataclass
class Splits:
    """Train, validation and test tensors."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def steps_per_epoch(self, config: DigitsConfig) -> int:
        return (len(self.x_train) + config.batch_size - 1) // config.batch_size


def load_splits(seed: int) -> Splits:
    """Load scikit-learn's digits (shipped with the package) and split 70/15/15."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        features, labels, test_size=0.3, random_state=seed, stratify=labels
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest
    )
    return Splits(*(torch.from_numpy(a) for a in (x_train, y_train, x_val, y_val, x_test, y_test)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_model(config: DigitsConfig, steps_per_epoch: int):
    seed_everything(config.seed)
    model = DigitsMLP(hidden_size=config.hidden_size, dropout=config.dropout)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch
    )
    return model, optimizer, scheduler


@torch.no_grad()
def evaluate(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Return (mean cross-entropy, accuracy) without touching any random generator."""
    was_training = model.training
    model.eval()
    logits = model(features)
    loss = nn.functional.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    model.train(was_training)
    return loss, accuracy


def epoch_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 10_007 + epoch)
    return torch.randperm(size, generator=generator)


def run_training(manager, model, optimizer, scheduler, splits: Splits, config: DigitsConfig,
                 save_every: int, *, resume: bool) -> None:
    """Train for ``config.epochs``, checkpointing every ``save_every`` steps; print one line a step."""
    start_epoch, start_batch, global_step = 0, 0, 0
    if resume:
        loaded = manager.load_latest_checkpoint()
        if loaded is None:
            print("No checkpoint found; starting from scratch.", flush=True)
        else:
            position = loaded["custom_state"]
            start_epoch = position["epoch"]
            start_batch = position["batch_in_epoch"]
            global_step = loaded["step"]
            print(f"Resumed from {loaded['name']} (epoch {start_epoch}, "
                  f"batch {start_batch}, step {global_step}).", flush=True)
    steps_per_epoch = splits.steps_per_epoch(config)
    model.train()
    for epoch in range(start_epoch, config.epochs):
        order = epoch_order(len(splits.x_train), config.seed, epoch)
        first = start_batch if epoch == start_epoch else 0
        for batch in range(first, steps_per_epoch):
            index = order[batch * config.batch_size : (batch + 1) * config.batch_size]
            loss = nn.functional.cross_entropy(model(splits.x_train[index]), splits.y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            global_step += 1
            manager.log_metrics({"train_loss": loss.item(), "lr": scheduler.get_last_lr()[0]},
                                step=global_step)
            print(f"step {global_step} epoch {epoch} loss {loss.item():.8f}", flush=True)
            if global_step % save_every == 0:
                val_loss, val_accuracy = evaluate(model, splits.x_val, splits.y_val)
                metrics = {"train_loss": loss.item(), "val_loss": val_loss,
                           "val_accuracy": val_accuracy}
                manager.log_metrics({"val_loss": val_loss, "val_accuracy": val_accuracy},
                                    step=global_step)
                # Position of the next batch, so a resume skips exactly what was consumed.
                next_epoch, next_batch = (epoch, batch + 1)
                if next_batch == steps_per_epoch:
                    next_epoch, next_batch = epoch + 1, 0
                manager.save_checkpoint(
                    step=global_step, epoch=epoch, metrics=metrics,
                    custom_state={"epoch": next_epoch, "batch_in_epoch": next_batch},
                    config=config.to_dict(),
                )
    val_loss, val_accuracy = evaluate(model, splits.x_val, splits.y_val)
    if global_step % save_every == 0:
        print(f"Training finished at step {global_step}: val_loss {val_loss:.4f}, "
              f"val_accuracy {val_accuracy:.4f}", flush=True)
        return
    manager.log_metrics({"val_loss": val_loss, "val_accuracy": val_accuracy}, step=global_step)
    manager.save_checkpoint(
        step=global_step, epoch=config.epochs - 1,
        metrics={"val_loss": val_loss, "val_accuracy": val_accuracy},
        custom_state={"epoch": config.epochs, "batch_in_epoch": 0}, config=config.to_dict(),
    )
    print(f"Training finished at step {global_step}: val_loss {val_loss:.4f}, "
          f"val_accuracy {val_accuracy:.4f}", flush=True)

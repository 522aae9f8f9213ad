"""The record that describes one committed checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as listed by the store and seen by retention policies.

    ``sequence`` is the commit counter: a larger value was committed later. It, and never
    the name, step or modification time, decides which checkpoint is newest.
    """

    name: str
    path: str
    sequence: int
    step: int | None = None
    epoch: int | None = None
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    timestamp: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "sequence": self.sequence,
            "step": self.step,
            "epoch": self.epoch,
            "metrics": dict(self.metrics),
            "timestamp": self.timestamp,
        }

"""Building blocks of the plain test models.

The absolute import below (rather than a relative one) checks that registration rewrites both
forms to the flat relative imports that transformers' loader follows.
"""

import math

import torch
from torch import nn

from custom_models.activations import soft_clip


class ResidualBlock(nn.Module):
    """A residual layer with a gain (a persistent buffer) and a fixed phase table.

    The phase table is a non-persistent buffer: it is not in the state dict, so a loaded model
    must recompute it in its constructor.
    """

    def __init__(self, width, limit):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.limit = limit
        self.register_buffer("gain", torch.linspace(0.5, 1.5, width))
        phase = torch.sin(torch.arange(width, dtype=torch.float32) * math.pi / width)
        self.register_buffer("phase", phase, persistent=False)

    def forward(self, hidden):
        update = soft_clip(self.linear(self.norm(hidden)), self.limit)
        return hidden + update * self.gain + self.phase

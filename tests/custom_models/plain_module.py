"""Plain torch.nn.Module models, registered through the generated PreTrainedModel wrapper."""

import torch
from torch import nn

from .layers import ResidualBlock


class PlainNet(nn.Module):
    """Token embedding, residual blocks and an output head that shares the embedding matrix."""

    def __init__(self, vocab_size, width, depth=2, limit=3.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, limit) for _ in range(depth))
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids):
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(hidden)


class ConfigNet(nn.Module):
    """A regressor that takes its whole config object, as modules written for transformers do."""

    def __init__(self, config):
        super().__init__()
        self.proj = nn.Linear(config.in_features, config.out_features)
        self.register_buffer("offset", torch.linspace(-1.0, 1.0, config.out_features))

    def forward(self, features):
        return self.proj(features) + self.offset

"""Activation functions for the plain test models."""

import torch


def soft_clip(values, limit):
    """Squash ``values`` smoothly into (-limit, limit)."""
    return limit * torch.tanh(values / limit)

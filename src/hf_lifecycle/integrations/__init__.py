"""Integrations with other tools: the transformers Trainer and TensorBoard.

Each module imports its tool only when used, so ``import hf_lifecycle`` needs neither.
"""

"""The trainable parameters of a module (`requires_grad`): what optimizers, EMA, masks and clipping cover; a
frozen VAE or frozen buffers never are."""

from __future__ import annotations

import torch


def named_trainable_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """name → parameter of every trainable parameter of `module`, in registration order."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters of `module`, in registration order."""
    return list(named_trainable_parameters(module).values())

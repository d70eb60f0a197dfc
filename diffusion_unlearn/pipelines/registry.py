"""The backbones by name: the built-in ones (imported here, which registers them) and any registered later with
`register_backbone`. Model folders, sampler defaults, latent caching, pretraining and conversion look a
backbone up here instead of testing its name."""

from __future__ import annotations

import torch

from diffusion_unlearn.fileio import UserError
from diffusion_unlearn.pipelines.backbone import DDPMBackbone
from diffusion_unlearn.pipelines.base import BACKBONES, Backbone, register_backbone
from diffusion_unlearn.pipelines.latent_backbone import LatentDiTBackbone

__all__ = ["BACKBONES", "Backbone", "DDPMBackbone", "LatentDiTBackbone", "backbone_class",
           "backbone_for_architecture", "backbone_for_denoiser", "register_backbone"]


def backbone_class(name: str) -> type[Backbone]:
    """The backbone registered as `name`."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)} (re-convert the model)")
    return BACKBONES[name]


def backbone_for_denoiser(denoiser: torch.nn.Module, preferred: str | None = None) -> type[Backbone]:
    """The backbone `denoiser` belongs to: `preferred` if it owns it, else the first registered one that does."""
    if preferred in BACKBONES and BACKBONES[preferred].owns(denoiser):
        return BACKBONES[preferred]
    for cls in BACKBONES.values():
        if cls.owns(denoiser):
            return cls
    raise ValueError(f"no registered backbone takes a {type(denoiser).__name__} denoiser")


def backbone_for_architecture(architecture: str) -> type[Backbone]:
    """The backbone whose denoisers `pretrain --backbone ARCHITECTURE` builds."""
    for cls in BACKBONES.values():
        if architecture in cls.architectures:
            return cls
    known = [a for cls in BACKBONES.values() for a in cls.architectures]
    raise UserError(f"unknown backbone {architecture!r}; choose one of {', '.join(known)}")

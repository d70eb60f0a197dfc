"""The backbone interface: what the loop, the methods, the model folder and the sampler need from a diffusion
model, declared once (`Backbone`), and the registry of backbones by name (`register_backbone`).

A backbone is a class: its instances wrap one trainable denoiser (the U-Net, the DiT transformer; never a
frozen VAE) for the loop and the methods; its class attributes and class methods say how its model folders
are laid out, how it samples by default, and how a fresh denoiser is built. `pipelines/registry.py` looks
backbones up; nothing else tests a backbone's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol, Sequence

import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from diffusion_unlearn.registries import register


@dataclass(frozen=True)
class SamplerDefaults:
    """What an unset `SamplerConfig` field becomes on this backbone: the sampler, steps per sampler, the
    guidance scale per purpose (`eval`: sample sets that are scored or saved; `grid`: pictures to look at), and
    the sampling precision `auto` means on CUDA per purpose (float32 where unnamed, and always off CUDA)."""

    sampler: str
    steps: dict[str, int]
    guidance_scale: dict[str, float]
    cuda_precision: dict[str, str] = field(default_factory=dict)


class Backbone(Protocol):
    """A class-conditional diffusion backbone. Instances: `denoiser` is the trainable module (unwrapped),
    `model` the module to call (possibly wrapped by accelerate/DDP); the null class is `num_classes`."""

    name: ClassVar[str]  # the `backbone` of a model folder's diffusion_unlearn.json
    pipeline_class: ClassVar[type[DiffusionPipeline]]  # the diffusers pipeline its model folders hold
    sampler_defaults: ClassVar[SamplerDefaults]
    supports_latent_cache: ClassVar[bool]  # whether cached VAE moments can stand in for images
    architectures: ClassVar[tuple[str, ...]]  # the `pretrain --backbone` values that build its denoiser
    needs_vae: ClassVar[bool]  # whether it denoises a VAE's latents (pretraining loads or trains one first)

    denoiser: torch.nn.Module
    model: torch.nn.Module
    num_classes: int
    null_class: int

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the denoiser denoises (latents for a latent backbone)."""

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable parameters by name (what masks, Fisher diagonals and EWC anchors are keyed by)."""

    def noised(self, x0: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, ε) for clean inputs x0 (images in [−1, 1]); steps and noise drawn unless given."""

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, *, cfg_dropout: float = 0.0,
            guidance_w: float | None = None) -> torch.Tensor:
        """ε_θ(x_t, t, c̃) with CFG label dropout, or guided (1+w)ε_c − wε_∅ when `guidance_w` is given."""

    def per_sample_loss(self, x0: torch.Tensor, labels: torch.Tensor, *, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None, cfg_dropout: float = 0.0,
                        guidance_w: float | None = None) -> torch.Tensor:
        """The training loss per sample (B,) of images x0 (B, C, H, W) in [−1, 1]."""

    def generate(self, classes: Sequence[int], per_class: int, sampler) -> tuple[torch.Tensor, torch.Tensor]:
        """`per_class` guided samples of each class (a resolved `SamplerConfig`): images (N, C, H, W) in
        [−1, 1] on the CPU and their labels (N,)."""

    @classmethod
    def from_parts(cls, denoiser: torch.nn.Module, vae: AutoencoderKL | None = None,
                   model: torch.nn.Module | None = None) -> Backbone:
        """The backbone around `denoiser` (and its frozen `vae`); `model` is the module to call."""

    @classmethod
    def owns(cls, denoiser: torch.nn.Module) -> bool:
        """Whether `denoiser` is a denoiser of this backbone (which backbone a model folder is saved as)."""

    @classmethod
    def pipeline(cls, denoiser: torch.nn.Module, vae: AutoencoderKL | None = None) -> DiffusionPipeline:
        """A `pipeline_class` pipeline around `denoiser` (what a model folder saves, what sampling calls)."""

    @classmethod
    def denoiser_of(cls, pipeline: DiffusionPipeline) -> torch.nn.Module:
        """The trainable denoiser of a loaded pipeline."""

    @classmethod
    def vae_of(cls, pipeline: DiffusionPipeline) -> AutoencoderKL | None:
        """The frozen VAE of a loaded pipeline, or None."""

    @classmethod
    def prepare_loaded(cls, pipeline: DiffusionPipeline) -> None:
        """Set up a pipeline just loaded from a model folder (e.g. freeze its VAE)."""

    @classmethod
    def image_shape(cls, denoiser: torch.nn.Module, vae: AutoencoderKL | None = None) -> tuple[int, int, int]:
        """(C, H, W) of the images the model generates and trains on (decoded images for a latent backbone)."""

    @classmethod
    def check_preset(cls, preset: str) -> None:
        """A one-line error, before any work, when `preset` names no size of this backbone's denoisers."""

    @classmethod
    def build_denoiser(cls, architecture: str, preset: str, *, channels: int, image_size: int, num_classes: int,
                       vae: AutoencoderKL | None = None) -> torch.nn.Module:
        """A randomly initialised denoiser of `architecture` and size `preset` for `channels`×`image_size`²
        images of `num_classes` classes (on `vae`'s latents when the backbone needs one)."""


BACKBONES: dict[str, type[Backbone]] = {}  # name → backbone class, in registration order


def register_backbone(cls: type[Backbone]) -> type[Backbone]:
    """Add `cls` to the registry under `cls.name` (usable as a class decorator); a name is registered once."""
    return register(BACKBONES, cls, "backbone")

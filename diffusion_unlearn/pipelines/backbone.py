"""The pixel-space DDPM backbone (the `Backbone` interface, pipelines/base.py): everything a forget method needs
from a diffusion model, and nothing else.

A method calls `per_sample_loss` (the denoising loss with optional CFG label dropout, or on the guided
output), `noised`/`eps` (one x_t, several predictions), `named_parameters` and `generate`, and never looks
inside the model, so any method runs on any backbone.

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import AutoencoderKL, UNet2DModel

from diffusion_unlearn import global_batch
from diffusion_unlearn.diffusion import NoiseSchedule, antithetic_timesteps
from diffusion_unlearn.models.factory import build_unet, check_unet_preset
from diffusion_unlearn.models.unet_lineage import ClassConditionalUNet
from diffusion_unlearn.parameters import named_trainable_parameters
from diffusion_unlearn.pipelines.base import SamplerDefaults, register_backbone
from diffusion_unlearn.pipelines.pipeline_class_conditional import (ClassConditionalPipeline, guided_eps, predict_eps,
                                                                    training_scheduler, unet_num_classes,
                                                                    unet_sample_shape)
from diffusion_unlearn.pipelines.sampling import generate


def drop_labels(labels: torch.Tensor, prob: float, null_class: int) -> torch.Tensor:
    """CFG label dropout: each label becomes the null class with probability `prob` (a keyed draw per sample inside
    a keyed batch, global_batch.py)."""
    if prob <= 0:
        return labels
    drop = global_batch.rand_like(labels.float(), "label_drop") < prob  # (B,)
    return torch.where(drop, torch.full_like(labels, null_class), labels)


@register_backbone
class DDPMBackbone:
    """Pixel-space class-conditional DDPM (the lineage U-Net or diffusers' UNet2DModel).

    `model` is the module to call (possibly wrapped by accelerate/DDP); `denoiser` the unwrapped U-Net.
    """

    name = "ddpm"
    pipeline_class = ClassConditionalPipeline
    # the quick-look sampler: DDIM, 50 steps, s = 3 (the lineage's w = 2) for every purpose
    sampler_defaults = SamplerDefaults(sampler="ddim", steps={"ddim": 50, "ddpm": 50},
                                       guidance_scale={"eval": 3.0, "grid": 3.0})
    supports_latent_cache = False
    architectures = ("lineage-unet", "diffusers-unet")
    needs_vae = False

    def __init__(self, denoiser: torch.nn.Module, schedule: NoiseSchedule | None = None,
                 model: torch.nn.Module | None = None):
        self.denoiser = denoiser
        self.model = denoiser if model is None else model
        self.num_classes = unet_num_classes(denoiser)
        self.null_class = self.num_classes
        self.schedule = (schedule or NoiseSchedule()).to(next(denoiser.parameters()).device)

    # -- the model folder and building

    @classmethod
    def from_parts(cls, denoiser: torch.nn.Module, vae: AutoencoderKL | None = None,
                   model: torch.nn.Module | None = None) -> DDPMBackbone:
        return cls(denoiser, model=model)

    @classmethod
    def owns(cls, denoiser: torch.nn.Module) -> bool:
        return isinstance(denoiser, (ClassConditionalUNet, UNet2DModel))

    @classmethod
    def pipeline(cls, denoiser: torch.nn.Module, vae: AutoencoderKL | None = None) -> ClassConditionalPipeline:
        return ClassConditionalPipeline(unet=denoiser, scheduler=training_scheduler())

    @classmethod
    def denoiser_of(cls, pipeline: ClassConditionalPipeline) -> torch.nn.Module:
        return pipeline.unet

    @classmethod
    def vae_of(cls, pipeline: ClassConditionalPipeline) -> None:
        return None

    @classmethod
    def prepare_loaded(cls, pipeline: ClassConditionalPipeline) -> None:
        pass

    @classmethod
    def image_shape(cls, denoiser: torch.nn.Module, vae: AutoencoderKL | None = None) -> tuple[int, int, int]:
        return unet_sample_shape(denoiser)

    @classmethod
    def check_preset(cls, architecture: str, preset: str) -> None:
        check_unet_preset(architecture, preset)

    @classmethod
    def build_denoiser(cls, architecture: str, preset: str, *, channels: int, image_size: int, num_classes: int,
                       vae: AutoencoderKL | None = None) -> torch.nn.Module:
        return build_unet(architecture, preset, channels=channels, image_size=image_size, num_classes=num_classes)

    # -- what the loop and the methods call
    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return unet_sample_shape(self.denoiser)

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable parameters by name (what masks, Fisher diagonals and EWC anchors are keyed by)."""
        return named_trainable_parameters(self.denoiser)

    def noised(self, x0: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, ε), x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε: antithetic steps and fresh noise unless given."""
        if t is None:
            t = antithetic_timesteps(x0.shape[0], self.schedule.num_steps, x0.device)  # (B,)
        if noise is None:
            noise = global_batch.randn_like(x0, "noise")  # (B, C, H, W)
        return self.schedule.q_sample(x0, t, noise), t, noise

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, *, cfg_dropout: float = 0.0,
            guidance_w: float | None = None) -> torch.Tensor:
        """ε_θ(x_t, t, c̃) with CFG label dropout, or the guided (1+w)ε_c − wε_∅ when `guidance_w` is given."""
        if guidance_w is None:
            return predict_eps(self.model, x_t, t, drop_labels(labels, cfg_dropout, self.null_class))
        return guided_eps(self.model, x_t, t, labels, 1.0 + guidance_w, self.null_class)

    def per_sample_loss(self, x0: torch.Tensor, labels: torch.Tensor, *, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None, cfg_dropout: float = 0.0,
                        guidance_w: float | None = None) -> torch.Tensor:
        """ℓ_i = Σ_{C,H,W} (ε − ε_θ(x_t, t, c̃))² per sample (L_simple, reference §1.2); antithetic t and fresh
        ε unless given.

        `guidance_w` takes the loss on the guided output (1+w)ε_c − wε_∅ instead (the reference's Fisher
        and SalUn-mask quirk, §7.7); `cfg_dropout` replaces labels by the null class with that probability.
        """
        x_t, t, noise = self.noised(x0, t, noise)
        eps = self.eps(x_t, t, labels, cfg_dropout=cfg_dropout, guidance_w=guidance_w)  # (B, C, H, W)
        return (noise - eps).square().flatten(1).sum(dim=1)  # (B,)

    def generate(self, classes: Sequence[int], per_class: int, sampler) -> tuple[torch.Tensor, torch.Tensor]:
        """`per_class` guided samples of each class from the current weights (a `SamplerConfig` says how):
        images (N, C, H, W) in [-1, 1] on the CPU and their labels (N,)."""
        images, labels, _ = generate(self.pipeline(self.denoiser), classes, per_class, sampler)
        return images, labels

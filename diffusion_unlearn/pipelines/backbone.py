"""The backbone adapter: everything a forget method needs from a diffusion model, and nothing else.

A method calls `per_sample_loss` (the denoising loss with optional CFG label dropout, or on the guided
output), `noised`/`eps` (one x_t, several predictions), `named_parameters` and `generate`, and never looks
inside the model, so any method runs on any backbone.
"""

from __future__ import annotations

import torch

from diffusion_unlearn.diffusion import NoiseSchedule, antithetic_timesteps
from diffusion_unlearn.pipelines.pipeline_class_conditional import (ClassConditionalPipeline, guided_eps, predict_eps,
                                                                    training_scheduler, unet_num_classes,
                                                                    unet_sample_shape)


def drop_labels(labels: torch.Tensor, prob: float, null_class: int) -> torch.Tensor:
    """CFG label dropout: each label becomes the null class with probability `prob`."""
    if prob <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < prob  # (B,)
    return torch.where(drop, torch.full_like(labels, null_class), labels)


class DDPMBackbone:
    """Pixel-space class-conditional DDPM (the lineage U-Net or diffusers' UNet2DModel).

    `model` is the module to call (possibly wrapped by accelerate/DDP); `unet` the unwrapped one.
    """

    kind = "ddpm"

    def __init__(self, unet: torch.nn.Module, schedule: NoiseSchedule | None = None,
                 model: torch.nn.Module | None = None):
        self.unet = unet
        self.model = unet if model is None else model
        self.num_classes = unet_num_classes(unet)
        self.null_class = self.num_classes
        self.schedule = (schedule or NoiseSchedule()).to(next(unet.parameters()).device)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return unet_sample_shape(self.unet)

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable parameters by name (what masks, Fisher diagonals and EWC anchors are keyed by)."""
        return {n: p for n, p in self.unet.named_parameters() if p.requires_grad}

    def noised(self, x0: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, ε), x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε: antithetic steps and fresh noise unless given."""
        if t is None:
            t = antithetic_timesteps(x0.shape[0], self.schedule.num_steps, x0.device)  # (B,)
        if noise is None:
            noise = torch.randn_like(x0)  # (B, C, H, W)
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

    def generate(self, classes: list[int], per_class: int, sampler) -> tuple[torch.Tensor, torch.Tensor]:
        """`per_class` guided samples of each class from the current weights (a `SamplerConfig` says how):
        images (N, C, H, W) in [-1, 1] on the CPU and their labels (N,)."""
        from diffusion_unlearn.sample import generate  # the CLI-level sampler: per-index seeds, batching

        pipeline = ClassConditionalPipeline(unet=self.unet, scheduler=training_scheduler())
        images, labels, _ = generate(pipeline, classes, per_class, sampler)
        return images, labels

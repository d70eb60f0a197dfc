"""The backbone adapter for a latent DiT: the same interface as `DDPMBackbone`, in the VAE's latent space.

A method calls `per_sample_loss(x0, labels, *, cfg_dropout, guidance_w)` on images in [−1, 1] exactly as on
the pixel DDPM; this adapter encodes them (a VAE posterior SAMPLE × scaling_factor, as the original's
training and the reference's unlearning, reference §4.1) and returns the DiT training loss.

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from diffusion_unlearn import global_batch
from diffusion_unlearn.fileio import UserError
from diffusion_unlearn.models.dit_transformer import ClassConditionalDiT
from diffusion_unlearn.models.factory import build_dit, dit_spec
from diffusion_unlearn.parameters import named_trainable_parameters
from diffusion_unlearn.pipelines.backbone import drop_labels
from diffusion_unlearn.pipelines.base import SamplerDefaults, register_backbone
from diffusion_unlearn.pipelines.guidance import guided_output
from diffusion_unlearn.pipelines.pipeline_dit import (FID_GUIDANCE_SCALE, GRID_GUIDANCE_SCALE,
                                                      ClassConditionalDiTPipeline, SpacedDiffusion, dit_output,
                                                      dit_training_scheduler)
from diffusion_unlearn.pipelines.sampling import generate
from diffusion_unlearn.vae import latent_side


def posterior_sample(dist: DiagonalGaussianDistribution) -> torch.Tensor:
    """mean + std·ε (B, C, h, w), ε a keyed draw per sample inside a keyed batch (global_batch.py), else the
    distribution's own `sample()` (the global RNG)."""
    eps = global_batch.draw("posterior", dist.mean.shape[0],
                            lambda g, n: torch.randn((n, *dist.mean.shape[1:]), generator=g))
    if eps is None:
        return dist.sample()
    return dist.mean + dist.std * eps.to(dist.mean.device, dist.parameters.dtype)


@register_backbone
class LatentDiTBackbone:
    """Latent-space class-conditional DiT with its VAE.

    `model` is the module to call (possibly wrapped by accelerate/DDP); `denoiser` the unwrapped transformer.
    `schedule` is the full 1000-step training process (`num_steps`, `q_sample`).
    """

    name = "dit"
    pipeline_class = ClassConditionalDiTPipeline
    # the original's paper-faithful sampler (reference §4.1): the 250-step respaced ancestral `ddpm`, at s = 1.5
    # for sample sets that are scored (`sample_ddp.py`, FID) and s = 4.0 for grids (`sample.py`)
    sampler_defaults = SamplerDefaults(sampler="ddpm", steps={"ddpm": 250, "ddim": 50},
                                       guidance_scale={"eval": FID_GUIDANCE_SCALE, "grid": GRID_GUIDANCE_SCALE},
                                       cuda_precision={"grid": "bf16"})
    supports_latent_cache = True
    architectures = ("dit",)
    needs_vae = True

    def __init__(self, denoiser: ClassConditionalDiT, vae: AutoencoderKL | None,
                 model: torch.nn.Module | None = None, schedule: SpacedDiffusion | None = None):
        self.denoiser = denoiser
        self.model = denoiser if model is None else model
        self.vae = vae
        self.num_classes = int(denoiser.config.num_classes)
        self.null_class = self.num_classes
        self.schedule = schedule or SpacedDiffusion.from_scheduler_config(dit_training_scheduler().config)

    # -- the model folder and building

    @classmethod
    def from_parts(cls, denoiser: ClassConditionalDiT, vae: AutoencoderKL | None = None,
                   model: torch.nn.Module | None = None) -> LatentDiTBackbone:
        return cls(denoiser, vae, model=model)

    @classmethod
    def owns(cls, denoiser: torch.nn.Module) -> bool:
        return isinstance(denoiser, ClassConditionalDiT)

    @classmethod
    def pipeline(cls, denoiser: ClassConditionalDiT, vae: AutoencoderKL | None = None) -> ClassConditionalDiTPipeline:
        return ClassConditionalDiTPipeline(transformer=denoiser, vae=vae, scheduler=dit_training_scheduler())

    @classmethod
    def denoiser_of(cls, pipeline: ClassConditionalDiTPipeline) -> ClassConditionalDiT:
        return pipeline.transformer

    @classmethod
    def vae_of(cls, pipeline: ClassConditionalDiTPipeline) -> AutoencoderKL:
        return pipeline.vae

    @classmethod
    def prepare_loaded(cls, pipeline: ClassConditionalDiTPipeline) -> None:
        pipeline.vae.requires_grad_(False)  # frozen: never in masks, optimizers, EMA or state

    @classmethod
    def image_shape(cls, denoiser: ClassConditionalDiT, vae: AutoencoderKL | None = None) -> tuple[int, int, int]:
        """The VAE's in-channels and the latent side × the VAE's downsampling factor 2^(levels − 1)."""
        if vae is None:
            raise ValueError("a DiT needs its VAE")
        side = int(denoiser.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
        return (int(vae.config.in_channels), side, side)

    @classmethod
    def check_preset(cls, architecture: str, preset: str) -> None:
        dit_spec(preset)

    @classmethod
    def build_denoiser(cls, architecture: str, preset: str, *, channels: int, image_size: int, num_classes: int,
                       vae: AutoencoderKL | None = None) -> ClassConditionalDiT:
        """A fresh DiT on the latents `vae` makes of `image_size` images."""
        if vae is None:
            raise ValueError("a DiT needs its VAE")
        return build_dit(preset, latent_channels=int(vae.config.latent_channels),
                         latent_size=latent_side(vae, image_size), num_classes=num_classes)

    # -- what the loop and the methods call

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the latents the model denoises."""
        cfg = self.denoiser.config
        return (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable parameters by name (`pos_embed` is a buffer, never among them)."""
        return named_trainable_parameters(self.denoiser)

    @torch.no_grad()
    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) from images (B, 3, H, W) in [−1, 1], or from precomputed posterior moments
        (B, 2C, h, w) (mean and log variance, as `vae.encode(x).latent_dist.parameters`): a posterior sample
        × scaling_factor either way."""
        c, h, w = self.sample_shape
        if self.vae is None:
            raise UserError("this DiT backbone has no VAE: it cannot encode images")
        sf = self.vae.config.scaling_factor
        if tuple(x0.shape[1:]) == (2 * c, h, w):
            return posterior_sample(DiagonalGaussianDistribution(x0.float())) * sf  # (B, C, h, w)
        z = posterior_sample(self.vae.encode(x0.to(self.vae.dtype)).latent_dist).float() * sf  # (B, C, h, w)
        if tuple(z.shape[1:]) != (c, h, w):
            raise UserError(f"the VAE encodes {tuple(x0.shape[1:])} images to {tuple(z.shape[1:])} latents, "
                            f"the DiT takes {(c, h, w)}")
        return z

    def noised(self, x0: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_t, t, ε) for images (or moments) x0: a posterior sample, uniform t (not antithetic), fresh ε."""
        z0 = self.encode(x0)  # (B, C, h, w)
        return self._noised_latents(z0, t, noise)

    def _noised_latents(self, z0: torch.Tensor, t: torch.Tensor | None, noise: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if t is None:
            t = global_batch.randint(0, self.schedule.num_steps, z0.shape[0], "timesteps", z0.device)  # (B,)
        if noise is None:
            noise = global_batch.randn_like(z0, "noise")  # (B, C, h, w)
        return self.schedule.q_sample(z0, t, noise), t, noise

    def output(self, z_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, *, cfg_dropout: float = 0.0,
               guidance_w: float | None = None) -> torch.Tensor:
        """The model output [ε, v] (B, C_out, h, w) with CFG label dropout, or with ε guided as (1+w)ε_c − wε_∅
        on every ε channel (v from the conditional half) when `guidance_w` is given."""
        steps = self.schedule.model_timesteps(t)  # (B,)
        if guidance_w is None:
            return dit_output(self.model, z_t, steps, drop_labels(labels, cfg_dropout, self.null_class))
        return guided_output(lambda xs, ts, ys: dit_output(self.model, xs, ts, ys), z_t, steps, labels,
                             1.0 + guidance_w, self.null_class, channels=z_t.shape[1])

    def eps(self, z_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, *, cfg_dropout: float = 0.0,
            guidance_w: float | None = None) -> torch.Tensor:
        """ε_θ(z_t, t, c̃) (B, C, h, w): the ε channels of `output`."""
        return self.output(z_t, t, labels, cfg_dropout=cfg_dropout, guidance_w=guidance_w)[:, :z_t.shape[1]]

    def per_sample_loss(self, x0: torch.Tensor, labels: torch.Tensor, *, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None, cfg_dropout: float = 0.0,
                        guidance_w: float | None = None) -> torch.Tensor:
        """ℓ_i = mse + vb per sample, the original's `training_losses` (§4.1): mse = mean_{C,h,w}(ε − ε̂)²;
        vb = the variational-bound term (bits/dim) with ε̂ DETACHED, so it trains only the variance channels
        (present when the model predicts its variance). Uniform t, fresh ε and a fresh posterior sample."""
        z0 = self.encode(x0)  # (B, C, h, w)
        z_t, t, noise = self._noised_latents(z0, t, noise)
        out = self.output(z_t, t, labels, cfg_dropout=cfg_dropout, guidance_w=guidance_w)  # (B, C_out, h, w)
        c = z0.shape[1]
        eps = out[:, :c]  # (B, C, h, w)
        loss = (noise - eps).square().flatten(1).mean(dim=1)  # (B,)
        if out.shape[1] == 2 * c:
            frozen = torch.cat([eps.detach(), out[:, c:]], dim=1)  # (B, 2C, h, w)
            loss = loss + self.schedule.vb_terms(z0, z_t, t, frozen)  # (B,)
        return loss

    def generate(self, classes: Sequence[int], per_class: int, sampler) -> tuple[torch.Tensor, torch.Tensor]:
        """`per_class` guided samples of each class from the current weights (a `SamplerConfig`: `ddpm` is the
        paper-faithful sampler, `ddim` the fast one): images (N, 3, H, W) in [−1, 1] on the CPU and labels (N,)."""
        images, labels, _ = generate(self.pipeline(self.denoiser, self.vae), classes, per_class, sampler,
                                     progress=False)
        return images, labels

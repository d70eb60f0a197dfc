"""Guided sampling of a latent DiT: the original's respaced diffusion in tensors, and a diffusers pipeline.

`SpacedDiffusion` is the original DiT's `GaussianDiffusion` behind `SpacedDiffusion` (guided-diffusion's
`respace.py`; reference §4.1): float64 coefficients cast to float32 on use, the model fed
the ORIGINAL step indices, learned-range variance. Two samplers run on it:

* paper-faithful `ddpm`: 250 evenly respaced steps (`space_timesteps(1000, "250")`), ancestral steps with the
  predicted variance, no x̂0 clipping; guidance on the first 3 latent channels, the 4th and the variance from
  the conditional half (`forward_with_cfg`); scale 1.5 for FID, 4.0 for grids;
* fast `ddim`: DDIM (η = 0 by default, no clipping) on N evenly respaced steps.

The null label is `transformer.config.num_classes` (diffusers' `DiTPipeline` hard-codes 1000).

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline
from tqdm.auto import tqdm

from diffusion_unlearn.diffusion import q_sample
from diffusion_unlearn.fileio import UserError
# diffusers only loads a custom component class whose module is already imported.
from diffusion_unlearn.models.dit_transformer import ClassConditionalDiT
from diffusion_unlearn.pipelines.guidance import guided_output
from diffusion_unlearn.pipelines.pipeline_class_conditional import Precision, bf16_autocast
from diffusion_unlearn.seeds import image_generators

FID_GUIDANCE_SCALE = 1.5  # the original's sample_ddp.py
GRID_GUIDANCE_SCALE = 4.0  # the original's sample.py
GUIDED_CHANNELS = 3  # forward_with_cfg guides eps[:, :3] only (an upstream quirk kept for FID reproducibility)

# ----------------------------------------------------------------------------- the respaced process


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> list[int]:
    """The kept original steps, ascending: guided-diffusion's `space_timesteps`, section by section with a
    fractional stride accumulated and Python-rounded (for one section: round(i·(T−1)/(n−1)))."""
    if isinstance(section_counts, str):
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise UserError(f"cannot take {count} steps out of a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) of a Gaussian discretised into 1/255 bins on [−1, 1] (guided-diffusion's decoder NLL)."""
    def cdf(v):
        return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v ** 3)))
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class SpacedDiffusion:
    """The diffusion process on the kept steps `timestep_map` of a base schedule, β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}}.

    Indices `t` below are respaced indices 0..num_steps−1; the model is fed `timestep_map[t]`."""

    def __init__(self, base_betas: np.ndarray, use_timesteps: Sequence[int]):
        keep = set(int(s) for s in use_timesteps)
        last, betas, kept = 1.0, [], []
        for i, ac in enumerate(np.cumprod(1.0 - base_betas)):
            if i in keep:
                betas.append(1 - ac / last)
                last = ac
                kept.append(i)
        b = np.array(betas, dtype=np.float64)  # (S,)
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        self.num_steps = len(b)
        self.timestep_map = torch.tensor(kept, dtype=torch.long)  # (S,)
        self.betas = torch.from_numpy(b)
        self.alphas_cumprod = torch.from_numpy(ac)
        self.alphas_cumprod_prev = torch.from_numpy(ac_prev)
        self.sqrt_alphas_cumprod = torch.from_numpy(np.sqrt(ac))
        self.sqrt_one_minus_alphas_cumprod = torch.from_numpy(np.sqrt(1.0 - ac))
        self.sqrt_recip_alphas_cumprod = torch.from_numpy(np.sqrt(1.0 / ac))
        self.sqrt_recipm1_alphas_cumprod = torch.from_numpy(np.sqrt(1.0 / ac - 1))
        self.posterior_log_variance_clipped = torch.from_numpy(
            np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1 else np.zeros(0))
        self.log_betas = torch.from_numpy(np.log(b))
        self.posterior_mean_coef1 = torch.from_numpy(b * np.sqrt(ac_prev) / (1.0 - ac))
        self.posterior_mean_coef2 = torch.from_numpy((1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac))

    @classmethod
    def from_scheduler_config(cls, config, steps: int | str | None = None) -> "SpacedDiffusion":
        """The process of a diffusers scheduler config (linear betas), respaced to `steps` (None: all)."""
        num = int(config["num_train_timesteps"])
        if config.get("trained_betas") is not None:
            base = np.asarray(config["trained_betas"], dtype=np.float64)
        elif config.get("beta_schedule", "linear") == "linear":
            base = np.linspace(config["beta_start"], config["beta_end"], num, dtype=np.float64)
        else:
            raise UserError(f"DiT sampling supports the linear beta schedule only, not {config['beta_schedule']!r}")
        return cls(base, range(num) if steps is None else space_timesteps(num, str(steps)))

    @staticmethod
    def _at(arr: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """arr[t] as float32 (B, 1, ..., 1), as guided-diffusion's `_extract_into_tensor`."""
        return arr.to(t.device)[t].float().view(-1, *([1] * (ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original step indices the model is fed for respaced indices `t`."""
        return self.timestep_map.to(t.device)[t]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε (float64 square roots cast to float32 on use)."""
        return q_sample(x0, t, noise, self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log variance of q(x_{t−1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, x_t.dim()) * x0 + self._at(
            self.posterior_mean_coef2, t, x_t.dim()) * x_t
        return mean, self._at(self.posterior_log_variance_clipped, t, x_t.dim())

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, log variance, x̂0) of p(x_{t−1} | x_t) from the output [ε, v] (learned range, no clipping)."""
        eps, v = model_output.split(x_t.shape[1], dim=1)  # (B, C, H, W) each
        min_log = self._at(self.posterior_log_variance_clipped, t, x_t.dim())
        max_log = self._at(self.log_betas, t, x_t.dim())
        frac = (v + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        x0 = self._at(self.sqrt_recip_alphas_cumprod, t, x_t.dim()) * x_t - self._at(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.dim()) * eps
        mean, _ = self.q_posterior(x0, x_t, t)
        return mean, log_variance, x0

    def p_sample(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
                 ) -> torch.Tensor:
        """One ancestral step with the predicted variance (no noise at t = 0)."""
        mean, log_variance, _ = self.p_mean_variance(model_output, x_t, t)
        nonzero = (t != 0).float().view(-1, *([1] * (x_t.dim() - 1)))  # (B, 1, 1, 1)
        return mean + nonzero * torch.exp(0.5 * log_variance) * noise

    def ddim_sample(self, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                    eta: float = 0.0) -> torch.Tensor:
        """One DDIM step (η = 0: deterministic), no x̂0 clipping; ᾱ_prev of the first kept step is 1."""
        ab = self._at(self.alphas_cumprod, t, x_t.dim())
        ab_prev = self._at(self.alphas_cumprod_prev, t, x_t.dim())
        x0 = self._at(self.sqrt_recip_alphas_cumprod, t, x_t.dim()) * x_t - self._at(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.dim()) * eps
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        mean = x0 * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma ** 2) * eps
        nonzero = (t != 0).float().view(-1, *([1] * (x_t.dim() - 1)))
        return mean + nonzero * sigma * noise

    def vb_terms(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor
                 ) -> torch.Tensor:
        """Per-sample variational-bound term in bits/dim: KL(q ‖ p) for t > 0, decoder NLL at t = 0."""
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        mean, log_var, _ = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1) / np.log(2.0)  # (B,)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(1) / np.log(2.0)  # (B,)
        return torch.where(t == 0, nll, kl)


# ----------------------------------------------------------------------------- guidance


def dit_output(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
               bf16: bool = False) -> torch.Tensor:
    """The model output (ε and, with learned sigma, v), float32; `bf16`: under bf16 autocast (sampling on GPU;
    training follows `--mixed-precision` through accelerate instead)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(x, t, labels)
    return (out.sample if hasattr(out, "sample") else out).float()


def guided_dit_output(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, scale: float,
                      null_class: int, guided_channels: int = GUIDED_CHANNELS, bf16: bool = False) -> torch.Tensor:
    """The original's `forward_with_cfg` on one batch (`guided_output`): ε_u + s(ε_c − ε_u) on the first
    `guided_channels` channels, every other channel (the rest of ε, the variance) from the conditional half;
    `bf16`: the model under bf16 autocast, the combination in float32."""
    return guided_output(lambda xs, ts, ys: dit_output(model, xs, ts, ys, bf16), x, t, labels, scale, null_class,
                         guided_channels)


# ----------------------------------------------------------------------------- the pipeline


def dit_training_scheduler() -> DDPMScheduler:
    """The training process as a diffusers scheduler config (the record `SpacedDiffusion` is built from)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         variance_type="learned_range", clip_sample=False, timestep_spacing="linspace")


class ClassConditionalDiTPipeline(DiffusionPipeline):
    """Class-conditional latent DiT sampling: paper-faithful `ddpm` (default 250 steps) or fast `ddim`."""

    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer: ClassConditionalDiT, vae: AutoencoderKL, scheduler: DDPMScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)

    @torch.no_grad()
    def sample_latents(self, class_labels: Sequence[int] | torch.Tensor, *, guidance_scale: float = FID_GUIDANCE_SCALE,
                       num_inference_steps: int = 250, sampler: str = "ddpm", eta: float = 0.0, seed: int = 0,
                       indices: Sequence[int] | None = None, batch_size: int = 64,
                       guided_channels: int = GUIDED_CHANNELS, precision: Precision = "fp32",
                       progress: bool = True) -> torch.Tensor:
        """Latents (N, C, h, w) on the CPU; latent n uses the generator of `indices[n]` for all its noise.
        `precision`: "fp32" as the original's `sample_ddp.py` (which also allows TF32 matmuls: torch's global
        `allow_tf32` setting applies here), "bf16" the transformer under bf16 autocast (CUDA only)."""
        if sampler not in ("ddpm", "ddim"):
            raise UserError(f"unknown DiT sampler {sampler!r}; choose ddpm (paper-faithful) or ddim (fast)")
        model = self.transformer
        if sampler == "ddpm" and not model.config.learn_sigma:
            raise UserError("the paper-faithful sampler needs a model that predicts its variance (learn_sigma)")
        labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()  # (N,)
        indices = list(range(len(labels))) if indices is None else list(indices)
        device = model.device
        bf16 = bf16_autocast(precision, device)
        diffusion = SpacedDiffusion.from_scheduler_config(self.scheduler.config, num_inference_steps)
        cfg = model.config
        shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        null_class = cfg.num_classes
        was_training = model.training
        model.eval()
        out = []
        bar = tqdm(total=-(-len(labels) // batch_size) * diffusion.num_steps, desc="sampling", disable=not progress,
                   leave=False)
        for start in range(0, len(labels), batch_size):
            y = labels[start:start + batch_size].to(device)  # (B,)
            gens = image_generators(seed, indices[start:start + batch_size])
            x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)  # (B, C, h, w)
            for i in reversed(range(diffusion.num_steps)):
                t = torch.full((len(y),), i, device=device, dtype=torch.long)  # (B,) respaced index
                output = guided_dit_output(model, x, diffusion.model_timesteps(t), y, guidance_scale, null_class,
                                           guided_channels, bf16)  # (B, C_out, h, w)
                noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)  # (B, C, h, w)
                if sampler == "ddpm":
                    x = diffusion.p_sample(output, x, t, noise)
                else:
                    x = diffusion.ddim_sample(output[:, :shape[0]], x, t, noise, eta)
                bar.update(1)
            out.append(x.cpu())
        bar.close()
        model.train(was_training)
        return torch.cat(out) if out else torch.empty(0, *shape)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images (N, 3, H, W) in [−1, 1] on the CPU: `vae.decode(z / scaling_factor)` in batches."""
        sf = self.vae.config.scaling_factor
        out = [self.vae.decode(z.to(self.vae.device, self.vae.dtype) / sf).sample.float().clamp(-1, 1).cpu()
               for z in latents.split(batch_size)]
        return torch.cat(out)

    def __call__(self, class_labels: Sequence[int] | torch.Tensor, *, vae_batch_size: int = 16, **kwargs
                 ) -> torch.Tensor:
        """Images (N, 3, H, W) in [−1, 1] on the CPU; keyword arguments as `sample_latents`."""
        return self.decode(self.sample_latents(class_labels, **kwargs), vae_batch_size)

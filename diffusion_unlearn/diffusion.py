"""The DDPM forward process as the lineage code defines it (reference §1.2).

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

import numpy as np
import torch

from diffusion_unlearn import global_batch

NUM_TRAIN_TIMESTEPS = 1000


def linear_betas(num_steps: int = NUM_TRAIN_TIMESTEPS, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    """β_t = linspace(start, end) built in float64, then cast to float32, exactly as the reference."""
    return torch.from_numpy(np.linspace(start, end, num_steps, dtype=np.float64)).float()  # (T,)


class NoiseSchedule:
    """ᾱ_t = Π_{s≤t}(1 − β_s) in float32, indexed by the 0-based step t (so ᾱ_0 = 1 − β_0)."""

    def __init__(self, betas: torch.Tensor | None = None):
        self.betas = linear_betas() if betas is None else betas.float()  # (T,)
        self.alphas_cumprod = (1 - self.betas).cumprod(dim=0)  # (T,)
        self.num_steps = len(self.betas)

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        self.betas = self.betas.to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε (float32 square roots of the float32 ᾱ)."""
        return q_sample(x0, t, noise, self.alphas_cumprod.sqrt(), (1.0 - self.alphas_cumprod).sqrt())


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
             sqrt_one_minus_alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε for any schedule, from its tables √ᾱ and √(1−ᾱ) (T,), taken at `t` (B,) and
    cast to float32."""
    shape = (-1, *([1] * (x0.dim() - 1)))
    a = sqrt_alphas_cumprod.to(t.device)[t].float().view(shape)  # (B, 1, 1, 1)
    b = sqrt_one_minus_alphas_cumprod.to(t.device)[t].float().view(shape)  # (B, 1, 1, 1)
    return a * x0 + b * noise


def antithetic_timesteps(batch: int, num_steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw B//2+1 uniform steps, append T−1−t for each, keep the first B (reference §1.2). Inside a keyed batch
    (global_batch.py) the vector is drawn for the GLOBAL batch, so the pairs span processes, and sliced."""
    def pairs(generator: torch.Generator | None, n: int) -> torch.Tensor:
        t = torch.randint(0, num_steps, (n // 2 + 1,), generator=generator,
                          device="cpu" if generator is not None else device)  # (n//2+1,)
        return torch.cat([t, num_steps - 1 - t])[:n]  # (n,)

    keyed = global_batch.draw("timesteps", batch, pairs)
    return pairs(None, batch) if keyed is None else keyed.to(device)  # (B,)

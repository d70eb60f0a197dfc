"""SFRon (Huang et al.), as the DualOptim reference runs it on DDPM (reference §2.1).

Forget loss: adaptive gradient ascent ℓ_F = −Σ_i w_i ℓ_i with w_i = sg[ℓ_i^{−λ} / Σ_j ℓ_j^{−λ}] (λ = 0.5),
so samples the model still fits well get the larger ascent weight. Retain loss: ρ·L_simple with CFG label
dropout, as in pretraining. The mask is the Fisher ratio (saliency.ratio_mask), applied to forget gradients.

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusion_unlearn import global_batch
from diffusion_unlearn.method_args import SFRonArgs
from diffusion_unlearn.methods.base import Method


def adaptive_weights(losses: torch.Tensor, lam: float) -> torch.Tensor:
    """w_i = ℓ_i^{−λ} / Σ_j ℓ_j^{−λ}, detached; computed as 1/(ℓ^λ + 1e-8) like the reference. Inside a keyed
    batch (global_batch.py) j runs over the GLOBAL batch: this process's rows of the whole batch's weights."""
    inv = 1.0 / (losses.detach() ** lam + 1e-8)  # (B_local,)
    return inv / global_batch.gather(inv).sum()  # (B_local,)


@dataclass
class SFRon(Method, SFRonArgs):
    paper = "Huang et al., Unified Gradient-Based Machine Unlearning with Remain Geometry Enhancement (NeurIPS 2024)"
    mask_kind = "fisher-ratio"
    mask_retain = False  # only the forget gradient is masked

    def forget_loss(self, backbone, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ_F = −Σ_i w_i ℓ_i (the loop multiplies by α_k)."""
        losses = backbone.per_sample_loss(x, y, cfg_dropout=self.forget_dropout)  # (B,)
        return -global_batch.sum_share(adaptive_weights(losses, self.adaptive_lambda) * losses)

"""SalUn (Fan et al.) on a class-conditional DDPM, as the DualOptim reference builds it (reference §2.2).

Mask: the top `topk_fraction` (50 %) of all weights by |Σ_batches ∇ forget loss| (saliency.topk_mask), on the
conditional output without clipping; the reference's guided output and per-batch clip are the
`fisher_on_guided_output`/`fisher_clip` switches (§7.7). Forget loss, random label: the forget images are pulled
towards the model's own detached prediction under another label at the same x_t. Both the forget and the retain
gradients are masked (the reference's alternating "salun" branch; the joint step masks its one gradient).

Paper recipes (presets): the original joint update, one shared Adam, ρ = 1e-3 (`digits-salun-joint`); and the
alternating update with DualOptim of Appendix C.4/B.2, η_f = 4e-5, η_r = 1e-4 (`digits-salun`). The reference's
joint loop clips before masking (§7.4); ours masks first, as every other path.

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from diffusion_unlearn import global_batch
from diffusion_unlearn.method_args import SalUnArgs
from diffusion_unlearn.methods.base import Method


def pseudo_labels(labels: torch.Tensor, num_classes: int, rule: str) -> torch.Tensor:
    """c' ≠ c: (c+1) mod K (`next`, the reference's, §2.2) or uniform over the other K−1 classes (`random`)."""
    if rule == "next":
        return (labels + 1) % num_classes
    offset = global_batch.randint(1, num_classes, labels.shape[0], "pseudo_labels", labels.device)  # (B,) 1..K−1
    return (labels + offset) % num_classes


@dataclass
class SalUn(Method, SalUnArgs):
    paper = "Fan et al., SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency (ICLR 2024)"
    mask_kind = "topk"
    mask_retain = True

    def forget_loss(self, backbone, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ_F = mean over all elements of (ε_θ(x_t, t, c) − sg[ε_θ(x_t, t, c')])² (MSE mean, reference §2.2)."""
        x_t, t, _ = backbone.noised(x)  # (B, C, H, W), (B,)
        with torch.no_grad():
            target = backbone.eps(x_t, t, pseudo_labels(y, backbone.num_classes, self.salun_label),
                                  cfg_dropout=self.forget_dropout)  # (B, C, H, W)
        prediction = backbone.eps(x_t, t, y, cfg_dropout=self.forget_dropout)  # (B, C, H, W)
        return torch.nn.functional.mse_loss(prediction, target)

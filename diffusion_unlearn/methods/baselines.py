"""The simple baselines of the unlearning literature, on a class-conditional DDPM (DualOptim paper Section 4.1).

GA (gradient ascent, Thudi et al.): ascend L_simple on the forget images. RL (random label, Golatkar et al.):
fit the forget images under a random other label with the true noise as target. FT (fine-tuning, Warnecke et
al.): retain steps only, no forget loss. All three take the usual retain loss; pure GA or RL is
`--retain-steps 0`. None has a mask of its own (`--mask FILE` adds one).

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusion_unlearn.method_args import FineTuneArgs, GradientAscentArgs, RandomLabelArgs
from diffusion_unlearn.methods.base import Method
from diffusion_unlearn.methods.salun import pseudo_labels


@dataclass
class GradientAscent(Method, GradientAscentArgs):
    paper = "Thudi et al., Unrolling SGD: Understanding Factors Influencing Machine Unlearning (EuroS&P 2022)"

    def forget_loss(self, backbone, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ_F = −mean_i ℓ_i (the reference's `ga`, §2.1)."""
        return -backbone.per_sample_loss(x, y, cfg_dropout=self.forget_dropout).mean()


@dataclass
class RandomLabel(Method, RandomLabelArgs):
    paper = "Golatkar et al., Eternal Sunshine of the Spotless Net: Selective Forgetting in Deep Networks (CVPR 2020)"

    def forget_loss(self, backbone, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ_F = mean_i ℓ(x_i, c'_i), c'_i uniform over the other classes: the forget images relabelled."""
        labels = pseudo_labels(y, backbone.num_classes, "random")  # (B,)
        return backbone.per_sample_loss(x, labels, cfg_dropout=self.forget_dropout).mean()


@dataclass
class FineTune(Method, FineTuneArgs):
    paper = "Warnecke et al., Machine Unlearning of Features and Labels (NDSS 2023)"
    forget_loss = None  # retain steps only

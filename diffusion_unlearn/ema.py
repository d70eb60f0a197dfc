"""Exponential moving average of the trainable weights: shadow ← μ·shadow + (1 − μ)·θ (reference §1.3).

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

import torch

from diffusion_unlearn.parameters import named_trainable_parameters


class EMA:
    """`warmup` uses μ_k = min(μ, (1 + k)/(10 + k)) so short runs (the digits default) are not dominated
    by the initial weights; the reference has no warm-up (800k iterations make it irrelevant)."""

    def __init__(self, model: torch.nn.Module, rate: float, warmup: bool = False):
        self.rate, self.warmup, self.updates = rate, warmup, 0
        params = named_trainable_parameters(model)
        self.names, self.params = list(params), list(params.values())
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        mu = min(self.rate, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.rate
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - mu)
        self.updates += 1

    def weights(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        torch._foreach_copy_([params[n] for n in self.names], self.shadow)

    def state_dict(self) -> dict:
        return {"rate": self.rate, "updates": self.updates, "shadow": self.weights()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        for s, n in zip(self.shadow, self.names):
            s.copy_(state["shadow"][n])

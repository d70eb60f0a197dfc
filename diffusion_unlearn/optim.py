"""DualOptim (paper §3.4, Algorithm 1): separate optimizer states for the forget and the retain objective.

Both optimizers cover the same parameters. `forget_step` steps the forget optimizer on the forget gradient,
`retain_step` the retain optimizer on the retain gradient. With `shared=True` one optimizer does both steps,
so its momentum mixes the two objectives (the single-optimizer baseline of Table 6 / reference §3.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from diffusion_unlearn.fileio import UserError

# torch built-ins that make sense for fine-tuning a diffusion model; Lion is not in torch (Table 6 row left out).
OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop", "adagrad", "adamax", "nadam", "radam")


@dataclass
class OptimizerSpec:
    """One optimizer and its hyperparameters. weight_decay defaults to 0: torch's AdamW default (0.01)
    would move weights the saliency mask freezes; the reference uses Adam/AdamW without decay."""

    name: str = "adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    weight_decay: float = 0.0
    eps: float = 1e-8

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        name = self.name.lower()
        params = list(params)
        betas = tuple(self.betas)
        if name in ("adamw", "adam", "adamax", "nadam", "radam"):
            cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "adamax": torch.optim.Adamax,
                   "nadam": torch.optim.NAdam, "radam": torch.optim.RAdam}[name]
            return cls(params, lr=self.lr, betas=betas, eps=self.eps, weight_decay=self.weight_decay)
        if name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if name == "rmsprop":
            return torch.optim.RMSprop(params, lr=self.lr, momentum=self.momentum, eps=self.eps,
                                       weight_decay=self.weight_decay)
        if name == "adagrad":
            return torch.optim.Adagrad(params, lr=self.lr, eps=self.eps, weight_decay=self.weight_decay)
        raise UserError(f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}")


class DualOptim:
    """A forget optimizer and a retain optimizer over the same parameters (or one shared optimizer)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], forget: OptimizerSpec, retain: OptimizerSpec,
                 shared: bool = False):
        params = [p for p in params if p.requires_grad]
        self.shared = shared
        self.retain_optimizer = retain.build(params)
        # Shared: the retain optimizer (the pretraining family, reference `opt_R`) does both steps.
        self.forget_optimizer = self.retain_optimizer if shared else forget.build(params)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.retain_optimizer] if self.shared else [self.forget_optimizer, self.retain_optimizer]

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def forget_step(self) -> None:
        self.forget_optimizer.step()

    def retain_step(self) -> None:
        self.retain_optimizer.step()

    def state_dict(self) -> dict:
        return {"shared": self.shared, "forget": self.forget_optimizer.state_dict(),
                "retain": self.retain_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["shared"] != self.shared:
            raise UserError("optimizer state was saved with a different --optim setting (dual vs shared)")
        self.retain_optimizer.load_state_dict(state["retain"])
        if not self.shared:
            self.forget_optimizer.load_state_dict(state["forget"])

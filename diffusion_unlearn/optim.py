"""DualOptim (paper §3.4, Algorithm 1): separate optimizer states for the forget and the retain objective.

Both optimizers cover the same parameters. `forget_step` steps the forget optimizer on the forget gradient,
`retain_step` the retain optimizer on the retain gradient. With mode `shared` one optimizer does both steps,
so its momentum mixes the two objectives (the single-optimizer baseline of Table 6 / reference §3.1); modes
`dual-m` and `dual-v` decouple only Adam's first or only its second moment (Table 17).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Iterable

import torch

from diffusion_unlearn.config import OptimizerName
from diffusion_unlearn.fileio import UserError

OPTIMIZERS = typing.get_args(OptimizerName)


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


class SplitAdam(torch.optim.Optimizer):
    """One Adam(W) holding a forget and a retain set of moments, for the partial decoupling of Table 17 (C.6).

    `split` names the moments each side keeps apart ("m", "v", both or neither); the others are shared. A step of
    one side updates its moments (the shared ones included) with that side's lr, eps and weight decay (adam: L2 in
    the gradient, adamw: decoupled), exactly as torch's Adam/AdamW; each moment's bias correction counts that
    moment's own updates. With both moments split it equals two Adams (dual), with neither one Adam (shared).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], forget: OptimizerSpec, retain: OptimizerSpec,
                 split: str):
        specs = {"forget": forget, "retain": retain}
        for spec in specs.values():
            if spec.name.lower() not in ("adam", "adamw"):
                raise UserError(f"partial decoupling needs adam or adamw on both sides, got {spec.name!r}")
        for i, moment in enumerate("mv"):
            if moment not in split and forget.betas[i] != retain.betas[i]:
                raise UserError(f"the shared moment {moment} needs the same beta{i + 1} on both sides, "
                                f"got {forget.betas[i]} and {retain.betas[i]}")
        sides = {side: {"lr": spec.lr, "betas": tuple(spec.betas), "eps": spec.eps, "weight_decay": spec.weight_decay,
                        "decoupled": spec.name.lower() == "adamw"} for side, spec in specs.items()}
        super().__init__(list(params), {"sides": sides, "split": split})

    @torch.no_grad()
    def step(self, side: str) -> None:  # type: ignore[override]
        for group in self.param_groups:
            h = group["sides"][side]
            beta1, beta2 = h["betas"]
            m_key, v_key = (f"{moment}_{side if moment in group['split'] else 'shared'}" for moment in "mv")
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                for key in (m_key, v_key):
                    if key not in state:
                        state[key], state[key + "_updates"] = torch.zeros_like(p), 0
                    state[key + "_updates"] += 1
                grad = p.grad
                if h["weight_decay"] and h["decoupled"]:
                    p.mul_(1 - h["lr"] * h["weight_decay"])
                elif h["weight_decay"]:
                    grad = grad.add(p, alpha=h["weight_decay"])
                m, v = state[m_key], state[v_key]
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias_correction1 = 1 - beta1 ** state[m_key + "_updates"]
                bias_correction2_sqrt = (1 - beta2 ** state[v_key + "_updates"]) ** 0.5
                p.addcdiv_(m, (v.sqrt() / bias_correction2_sqrt).add_(h["eps"]), value=-h["lr"] / bias_correction1)


MODES = ("dual", "shared", "dual-m", "dual-v")  # dual-m: separate first moments, shared second; dual-v: the reverse


class DualOptim:
    """A forget optimizer and a retain optimizer over the same parameters (`dual`), one shared optimizer
    (`shared`), or one SplitAdam sharing the second (`dual-m`) or the first (`dual-v`) moments."""

    def __init__(self, params: Iterable[torch.nn.Parameter], forget: OptimizerSpec, retain: OptimizerSpec,
                 mode: str = "dual"):
        if mode not in MODES:
            raise UserError(f"unknown optimizer setup {mode!r}; choose one of {', '.join(MODES)}")
        params = [p for p in params if p.requires_grad]
        self.mode = mode
        self.split = SplitAdam(params, forget, retain, split=mode[-1]) if mode.startswith("dual-") else None
        # Shared: the retain optimizer (the pretraining family, reference `opt_R`) does both steps.
        self.retain_optimizer = self.split or retain.build(params)
        self.forget_optimizer = self.retain_optimizer if mode != "dual" else forget.build(params)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.forget_optimizer, self.retain_optimizer] if self.mode == "dual" else [self.retain_optimizer]

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def forget_step(self) -> None:
        self.split.step("forget") if self.split else self.forget_optimizer.step()

    def retain_step(self) -> None:
        self.split.step("retain") if self.split else self.retain_optimizer.step()

    def state_dict(self) -> dict:
        return {"mode": self.mode, "forget": self.forget_optimizer.state_dict(),
                "retain": self.retain_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.mode:
            raise UserError(f"optimizer state was saved with a different --optim setting ({state['mode']}, "
                            f"not {self.mode}); resume with the same setting")
        self.retain_optimizer.load_state_dict(state["retain"])
        if self.mode == "dual":
            self.forget_optimizer.load_state_dict(state["forget"])

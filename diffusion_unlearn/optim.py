"""DualOptim (paper Section 3.4, Algorithm 1): separate optimizer states for the forget and the retain objective.

Both optimizers cover the same parameters. `forget_step` steps the forget optimizer on the forget gradient,
`retain_step` the retain optimizer on the retain gradient. With mode `shared` one optimizer does both steps,
so its momentum mixes the two objectives (the single-optimizer baseline of Table 6 / reference §3.1); modes
`dual-m` and `dual-v` decouple only Adam's first or only its second moment (Table 17).

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch.optim.adam import adam as adam_update
from torch.optim.sgd import sgd as sgd_update

from diffusion_unlearn.config import OptimizerName
from diffusion_unlearn.fileio import UserError

OPTIMIZERS = typing.get_args(OptimizerName)
MASKED_STATE_OPTIMIZERS = ("adamw", "adam", "sgd")  # the forget side keeps state only where the mask is 1
FUSED_OPTIMIZERS = ("adamw", "adam", "sgd")  # torch has a fused (one pass per tensor) step for these


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
        """torch's fused optimizer (Adam, AdamW, SGD: one pass over each tensor, `FUSED_OPTIMIZERS`) or its
        multi-tensor (`foreach`) one (the others), over `params` in parameter groups of at most `GROUP_ELEMENTS`
        elements: a foreach step makes whole-group temporaries (Adam's √v, ...), so bounded groups bound them
        (2.7 GB less at DiT-XL/2), and each of its passes over a small group stays in the CPU's cache; each
        element's update is the same, group by group. The fused AdamW step of the CIFAR-10 U-Net takes ~0.2 × the
        foreach step's time on this project's CPU (benchmarks/bench_overhead.py); it rounds differently from foreach
        in the last bit, so runs compare like with like."""
        name = self.name.lower()
        params = size_groups(list(params))
        betas = tuple(self.betas)
        if name in ("adamw", "adam", "adamax", "nadam", "radam"):
            cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "adamax": torch.optim.Adamax,
                   "nadam": torch.optim.NAdam, "radam": torch.optim.RAdam}[name]
            kernel = {"fused": True} if name in FUSED_OPTIMIZERS else {"foreach": True}
            return cls(params, lr=self.lr, betas=betas, eps=self.eps, weight_decay=self.weight_decay, **kernel)
        if name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                   fused=True)
        if name == "rmsprop":
            return torch.optim.RMSprop(params, lr=self.lr, momentum=self.momentum, eps=self.eps,
                                       weight_decay=self.weight_decay, foreach=True)
        if name == "adagrad":
            return torch.optim.Adagrad(params, lr=self.lr, eps=self.eps, weight_decay=self.weight_decay,
                                       foreach=True)
        raise UserError(f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}")


# 1 M elements (4 MB in float32) per parameter group: a CIFAR-10 U-Net AdamW step takes ~0.55 × the time of
# 16 M-element groups on one CPU thread (benchmarks/bench_overhead.py), the update being the same
GROUP_ELEMENTS = 1 << 20


def size_groups(params: list[torch.nn.Parameter], limit: int = GROUP_ELEMENTS) -> list[dict]:
    """`params` in order, cut into groups of at most `limit` elements (a larger tensor is a group of its own)."""
    groups: list[list[torch.nn.Parameter]] = [[]]
    size = 0
    for p in params:
        if groups[-1] and size + p.numel() > limit:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.numel()
    return [{"params": g} for g in groups if g]


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


@dataclass
class MaskPositions:
    """The flat positions of a mask's True entries, ascending (the order `masked_select` packs in), kept in about
    one byte per entry: each position's gap to the previous one (the first: the position itself) as uint8, and
    the few gaps a byte cannot hold beside them. Found once when the mask is set; `positions()` decodes them with
    one cumulative sum in a fraction of the time of `nonzero` on the mask each step (bench_overhead.py), at
    1 byte per masked-in entry where int32 positions would cost 4 (DiT-XL/2 at density 0.3: 0.2 GB, not 0.8)."""

    gaps: torch.Tensor  # (n,) uint8: the gap to the previous position, 0 where it is one of the far gaps
    far_at: torch.Tensor  # (k,) int64: the entries after a gap > 255
    far_gaps: torch.Tensor  # (k,) int64: those gaps

    @classmethod
    def of(cls, mask: torch.Tensor) -> MaskPositions:
        where = mask.flatten().nonzero().squeeze(1)  # (n,) int64, ascending
        gaps = torch.diff(where, prepend=where.new_zeros(1))  # (n,) ≥ 1 after the first
        far_at = (gaps > 255).nonzero().squeeze(1)  # (k,)
        return cls(gaps.masked_fill(gaps > 255, 0).to(torch.uint8), far_at, gaps[far_at])

    def __len__(self) -> int:
        return self.gaps.numel()

    def positions(self) -> torch.Tensor:
        """(n,) int64: the flat positions, ascending."""
        where = self.gaps.to(torch.int64)  # (n,)
        where.index_copy_(0, self.far_at, self.far_gaps)
        return where.cumsum_(0)


class MaskedStateOptimizer:
    """The forget side of DualOptim with its state only where the gradient mask is 1 (docs/performance.md).

    Under the mask, the forget gradient is 0 wherever m = 0, so a dense Adam(W)'s moments (or SGD's momentum)
    stay exactly 0 there and its update is exactly 0: those entries need not exist. Per parameter we keep the
    moments of the masked-in entries only, packed in the mask's order (`masked_select`). A step gathers the
    masked-in weights and gradients of a chunk of parameters, runs torch's own functional update on them
    (`torch.optim.adam.adam` — what `Adam`/`AdamW(fused=True)` run — or `torch.optim.sgd.sgd`) and scatters the
    weights back: the result is bitwise the dense update's (tests/test_optim.py). Masked-out weights never move,
    also with weight decay > 0, where a dense AdamW would shrink them (decoupled decay multiplies every weight).
    Memory: 2 × (mask density) × parameters of state (Adam's moments in two flat buffers, `_allocate_moments`),
    about one byte per masked-in entry for their positions (`MaskPositions`), plus one chunk of packed weights,
    gradients and decoded positions while stepping.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], masks: Sequence[torch.Tensor], spec: OptimizerSpec,
                 chunk_elements: int = GROUP_ELEMENTS):
        name = spec.name.lower()
        if name not in MASKED_STATE_OPTIMIZERS:
            raise ValueError(f"masked state needs one of {MASKED_STATE_OPTIMIZERS}, got {spec.name!r}")
        self.spec, self.name, self.chunk_elements = spec, name, chunk_elements
        self.params = list(params)
        # once: the masks are fixed (no host sync per step)
        self.positions = [MaskPositions.of(m.to(device=p.device, dtype=torch.bool)) for p, m in zip(self.params, masks)]
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in self.params]

    def _chunks(self) -> list[list[int]]:
        """Indices of the parameters with a gradient and a masked-in entry, in chunks of ~chunk_elements."""
        chunks, current, size = [], [], 0
        for i, p in enumerate(self.params):
            if p.grad is None or not len(self.positions[i]):
                continue
            current.append(i)
            size += p.numel()
            if size >= self.chunk_elements:
                chunks, current, size = chunks + [current], [], 0
        return chunks + ([current] if current else [])

    @torch.no_grad()
    def step(self) -> None:
        spec = self.spec
        if self.name != "sgd" and not any(self.state):
            self._allocate_moments()
        for chunk in self._chunks():
            # the flat positions of the masked-in entries, decoded once for the gathers and the scatter:
            # index_select/scatter_ run ~10 × faster than masked_select/masked_scatter_ on CPU, and scatter_ ~1.7 ×
            # faster than index_copy_ (each position is written once: the same copy)
            where = [self._positions(i) for i in chunk]  # (n_i,) each
            weights = [self.params[i].view(-1).index_select(0, j) for i, j in zip(chunk, where)]  # (n_i,) each
            grads = [self.params[i].grad.view(-1).index_select(0, j) for i, j in zip(chunk, where)]  # (n_i,) each
            states = [self.state[i] for i in chunk]
            if self.name == "sgd":
                buffers = [st.get("momentum_buffer") for st in states]
                sgd_update(weights, grads, buffers, fused=True, weight_decay=spec.weight_decay,
                           momentum=spec.momentum, lr=spec.lr, dampening=0.0, nesterov=False, maximize=False)
                for st, buf in zip(states, buffers):
                    if spec.momentum != 0:
                        st["momentum_buffer"] = buf
            else:
                for st, w in zip(states, weights):
                    if not st:  # a parameter without a gradient when the moments were allocated
                        st |= {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(w),
                               "exp_avg_sq": torch.zeros_like(w)}
                beta1, beta2 = spec.betas
                adam_update(weights, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                            [], [st["step"] for st in states], fused=True,
                            decoupled_weight_decay=self.name == "adamw", amsgrad=False, beta1=beta1, beta2=beta2,
                            lr=spec.lr, weight_decay=spec.weight_decay, eps=spec.eps, maximize=False)
            for i, j, w in zip(chunk, where, weights):
                self.params[i].view(-1).scatter_(0, j, w)

    def _allocate_moments(self) -> None:
        """Adam's two moments of every parameter with a masked-in entry as views of two flat buffers, allocated
        before any step temporaries: two large allocations the C allocator maps on their own, where one small
        tensor per parameter lands between the step's freed gradients and temporaries in its heap and fragments
        it (docs/performance.md)."""
        sizes = [len(pos) for pos in self.positions]
        device = self.params[0].device if self.params else None
        flat = {k: torch.zeros(sum(sizes), device=device) for k in ("exp_avg", "exp_avg_sq")}  # (Σ n_i,) each
        views = {k: v.split(sizes) for k, v in flat.items()}
        for i, n in enumerate(sizes):
            if n:
                self.state[i] = {"step": torch.tensor(0.0), **{k: views[k][i] for k in flat}}

    def _positions(self, i: int) -> torch.Tensor:
        """(n_i,) int64: the flat positions of parameter i's masked-in entries, ascending."""
        return self.positions[i].positions()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"masked_state": self.name, "state": {i: dict(st) for i, st in enumerate(self.state) if st}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("masked_state") != self.name:
            raise UserError("the saved forget-optimizer state is not a masked state of the same optimizer; "
                            "resume with the same settings or pass --restart")
        self.state = [dict(state["state"].get(i, {})) for i in range(len(self.params))]


MODES = ("dual", "shared", "dual-m", "dual-v")  # dual-m: separate first moments, shared second; dual-v: the reverse


class DualOptim:
    """A forget optimizer and a retain optimizer over the same parameters (`dual`), one shared optimizer
    (`shared`), or one SplitAdam sharing the second (`dual-m`) or the first (`dual-v`) moments.

    `masks` (bool, one per trainable parameter, the gradient mask's): under `dual` with an Adam(W) or SGD forget
    side, that side keeps its state only where the mask is 1 (`MaskedStateOptimizer`), bitwise the same update
    at a fraction of the memory."""

    def __init__(self, params: Iterable[torch.nn.Parameter], forget: OptimizerSpec, retain: OptimizerSpec,
                 mode: str = "dual", masks: Sequence[torch.Tensor] | None = None):
        if mode not in MODES:
            raise UserError(f"unknown optimizer setup {mode!r}; choose one of {', '.join(MODES)}")
        params = [p for p in params if p.requires_grad]
        self.mode = mode
        self.split = SplitAdam(params, forget, retain, split=mode[-1]) if mode.startswith("dual-") else None
        # Shared: the retain optimizer (the pretraining family, reference `opt_R`) does both steps.
        self.retain_optimizer = self.split or retain.build(params)
        if mode != "dual":
            self.forget_optimizer = self.retain_optimizer
        elif masks is not None and forget.name.lower() in MASKED_STATE_OPTIMIZERS:
            self.forget_optimizer = MaskedStateOptimizer(params, masks, forget)
        else:
            self.forget_optimizer = forget.build(params)

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

"""Time outside the forward and backward passes in one SFRon + DualOptim iteration of the CIFAR-10 U-Net
(38.6 M, random weights, batch 8, the yardstick's `iter` work): mask, clip, both optimizer steps, EMA, each timed
on its own, against the forward + backward passes. Prints one JSON line.

    python benchmarks/bench_overhead.py                    # CPU, 2 threads, batch 8, median of 3 after 1 warm-up
    python benchmarks/bench_overhead.py --device cuda --batch-size 64

Three variants run interleaved in one process, on the same model and gradients: `library` (the library's own
objects: `GradientMask`, the accelerator's clip, `DualOptim` on torch's fused optimizer steps, `EMA`, the rest on
torch's multi-tensor kernels), `before` (as at commit b317a7f: the masked-state forget step finds the mask's
positions with `nonzero` every step, and both optimizers step 16 M-element chunks / parameter groups, the retain
side with foreach; the forget side's kernel is today's) and `loops` (the same arithmetic as per-tensor Python
loops, as the published code does it: the first "before").
Target (issue 12): the `library` overhead ≤ 5 % of the iteration.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import torch
from accelerate import Accelerator

from diffusion_unlearn.config import ForgetConfig, build_config, resolve_device
from diffusion_unlearn.data import ImageDataset
from diffusion_unlearn.models.factory import build_unet
from diffusion_unlearn.optim import DualOptim, MaskedStateOptimizer, size_groups
from diffusion_unlearn.pipelines.backbone import DDPMBackbone
from diffusion_unlearn.saliency import GradientMask
from diffusion_unlearn.unlearn import Unlearner, optimizer_spec

PARTS = ("forget_fwd_bwd", "mask", "forget_clip", "forget_step", "retain_fwd_bwd", "retain_clip", "retain_step", "ema")
OVERHEAD = ("mask", "forget_clip", "forget_step", "retain_clip", "retain_step", "ema")


def synthetic_dataset(n: int, num_classes: int = 10) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    return ImageDataset(name="synthetic", split="train", root=None, class_names=[str(i) for i in range(num_classes)],
                        channels=3, image_size=32, transform_id="synthetic", targets=torch.arange(n) % num_classes,
                        pixels=torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8))


class LoopParts:
    """The per-tensor forms of mask, clip, optimizer steps and EMA (separate optimizer states, same settings)."""

    def __init__(self, learner: Unlearner, cfg: ForgetConfig):
        self.params, self.factors = learner.params, learner.grad_mask.factors
        self.forget = torch.optim.AdamW(self.params, **_adam_kwargs(cfg, "forget"), foreach=False)
        self.retain = torch.optim.AdamW(self.params, **_adam_kwargs(cfg, "retain"), foreach=False)
        self.shadow, self.rate, self.clip = [p.detach().clone() for p in self.params], cfg.ema_rate, cfg.grad_clip

    def mask(self) -> None:
        for p, m in zip(self.params, self.factors):
            p.grad.mul_(m)

    def clip_grads(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=False)

    @torch.no_grad()
    def ema(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p, 1.0 - self.rate)


BEFORE_GROUP_ELEMENTS = 1 << 24  # optim.GROUP_ELEMENTS before


class NonzeroPositions(MaskedStateOptimizer):
    """The masked-state forget step finding the mask's positions with `nonzero` every step (the "before")."""

    def __init__(self, params, masks, spec):
        super().__init__(params, masks, spec, chunk_elements=BEFORE_GROUP_ELEMENTS)
        self.masks = masks

    def _positions(self, i: int) -> torch.Tensor:
        return self.masks[i].flatten().nonzero().squeeze(1)  # (n_i,)


def _adam_kwargs(cfg: ForgetConfig, side: str) -> dict:
    spec = optimizer_spec(cfg, side)
    return dict(lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, weight_decay=spec.weight_decay)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--density", type=float, default=0.5, help="mask density (the yardstick's: 0.5)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    unet = build_unet("lineage-unet", "cifar10", channels=3, image_size=32, num_classes=10).to(device)
    data = synthetic_dataset(40 * args.batch_size)
    forget_set, retain_set = data.with_classes([0]), data.with_classes(list(range(1, 10)))
    mask = {n: torch.rand(q.shape, device=device) < args.density for n, q in unet.named_parameters()}
    cfg = build_config(ForgetConfig, dict(batch_size=args.batch_size, optim="dual", iterations=10**6))
    acc = Accelerator(cpu=device == "cpu")
    learner = Unlearner(cfg, DDPMBackbone(unet), forget_set, retain_set, GradientMask(unet, mask), acc)
    loops = LoopParts(learner, cfg)
    before_forget = NonzeroPositions(learner.params, learner.grad_mask.factors, optimizer_spec(cfg, "forget"))
    before_retain = torch.optim.AdamW(size_groups(learner.params, BEFORE_GROUP_ELEMENTS), **_adam_kwargs(cfg, "retain"),
                                      foreach=True)
    assert isinstance(learner.optim, DualOptim)

    def fwd_bwd(loss_of: Callable, stream) -> Callable[[], None]:
        def run() -> None:
            loss = learner._loss(stream, loss_of)  # the loop's own batch and keyed draws
            learner.optim.zero_grad()
            acc.backward(loss)
        return run

    clip = lambda: acc.clip_grad_norm_(learner.params, cfg.grad_clip)  # noqa: E731
    steps = {
        "library": dict(mask=learner.grad_mask.apply, forget_clip=clip, forget_step=learner.optim.forget_step,
                        retain_clip=clip, retain_step=learner.optim.retain_step, ema=learner.ema.update),
        "before": dict(mask=learner.grad_mask.apply, forget_clip=clip, forget_step=before_forget.step,
                       retain_clip=clip, retain_step=before_retain.step, ema=learner.ema.update),
        "loops": dict(mask=loops.mask, forget_clip=loops.clip_grads, forget_step=loops.forget.step,
                      retain_clip=loops.clip_grads, retain_step=loops.retain.step, ema=loops.ema),
    }
    passes = dict(forget_fwd_bwd=fwd_bwd(learner.method.forget_loss, learner.forget_stream),
                  retain_fwd_bwd=fwd_bwd(learner.method.retain_loss, learner.retain_stream))
    times = {v: {part: [] for part in PARTS} for v in steps}
    learner.backbone.model.train()
    for repeat in range(args.repeats + 1):  # the first round is the warm-up
        for variant, parts in steps.items():
            for part in PARTS:
                fn = passes.get(part) or parts[part]
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if repeat:
                    times[variant][part].append(time.perf_counter() - start)
    result = {"benchmark": "loop_overhead", "device": device, "threads": torch.get_num_threads(),
              "batch_size": args.batch_size, "repeats": args.repeats, "mask_density": args.density,
              "load_average": [round(x, 2) for x in os.getloadavg()]}
    for variant, parts in times.items():
        med = {part: statistics.median(ts) for part, ts in parts.items()}
        iteration, overhead = sum(med.values()), sum(med[part] for part in OVERHEAD)
        result[variant] = {**{f"{part}_s": round(v, 4) for part, v in med.items()},
                           "iteration_s": round(iteration, 4), "overhead_s": round(overhead, 4),
                           "overhead_fraction": round(overhead / iteration, 4)}
    for before in ("before", "loops"):
        ratio = result[before]["overhead_s"] / result["library"]["overhead_s"]
        result[f"overhead_{before}_over_library"] = round(ratio, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Sampling as a library: per-index seeds, class plans, guided generation from any backbone's pipeline, labelled
grids and class parsing. The `sample` command (sample.py), `eval`, `study`, the loop's grids and SA's replay
all draw through `generate`."""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from PIL import Image

from diffusion_unlearn.config import SamplerConfig
from diffusion_unlearn.fileio import UserError
from diffusion_unlearn.grids import labelled_grid

CLASS_STRIDE = 1_000_000  # image index = class · stride + j: a class's j-th sample never depends on the others


class Pipeline(Protocol):
    """A class-conditional sampling pipeline (every backbone's `pipeline_class` takes these keywords)."""

    def __call__(self, class_labels: Sequence[int] | torch.Tensor, *, guidance_scale: float,
                 num_inference_steps: int, sampler: str, eta: float, seed: int, indices: Sequence[int],
                 batch_size: int, progress: bool) -> torch.Tensor:
        """Images (N, C, H, W) in [−1, 1] on the CPU; image n uses the generator of `indices[n]`."""


def is_resolved(sampler: SamplerConfig) -> bool:
    """Whether every per-backbone field is set (samplers must be resolved before they draw)."""
    return None not in (sampler.sampler, sampler.steps, sampler.guidance_scale)


def parse_classes(spec: str, num_classes: int) -> list[int]:
    """'all', '0,3,5' or '0-9' → class indices, each checked against the model's classes."""
    if spec in ("all", ""):
        return list(range(num_classes))
    classes: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            classes.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise UserError(f"cannot read classes {spec!r}; use e.g. 0,3,5 or 0-9 or all") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"class {bad[0]} is outside the model's classes 0..{num_classes - 1}")
    return classes


def class_sample_plan(classes: Sequence[int], per_class: int) -> tuple[torch.Tensor, list[int]]:
    """Labels (class-major) and their seed indices."""
    labels = torch.tensor([c for c in classes for _ in range(per_class)], dtype=torch.long)  # (N,)
    indices = [c * CLASS_STRIDE + j for c in classes for j in range(per_class)]
    return labels, indices


def generate(pipeline: Pipeline, classes: Sequence[int], per_class: int, sampler: SamplerConfig,
             progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """`per_class` guided samples of each class: images (N, C, H, W) in [-1, 1], labels, indices. On a DiT,
    `sampler.sampler` "ddpm" is the paper-faithful respaced ancestral sampler, "ddim" the fast DDIM one. A sampling
    precision left `auto` (a sampler not passed through `resolve_sampler`) samples in float32."""
    labels, indices = class_sample_plan(classes, per_class)
    return draw_images(pipeline, labels, indices, sampler, progress), labels, indices


def draw_images(pipeline: Pipeline, labels: torch.Tensor, indices: Sequence[int], sampler: SamplerConfig,
                progress: bool = True) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] of the given labels (N,), image n seeded by `indices[n]`, in batches of
    `sampler.sample_batch_size` (the batch composition fixes every float)."""
    if not is_resolved(sampler):
        raise ValueError(f"sampler {sampler} has unset fields; fill them with resolve_sampler(...) first")
    precision = "fp32" if sampler.sampling_precision == "auto" else sampler.sampling_precision
    return pipeline(labels, guidance_scale=sampler.guidance_scale, num_inference_steps=sampler.steps,
                    sampler=sampler.sampler, eta=sampler.eta, seed=sampler.sample_seed, indices=list(indices),
                    batch_size=sampler.sample_batch_size, precision=precision, progress=progress)


def class_grid(pipeline: Pipeline, class_names: Sequence[str], classes: Sequence[int],
               per_class: int, sampler: SamplerConfig, title: str | None = None) -> Image.Image:
    """A labelled grid: one row of `per_class` samples per class."""
    images, _, _ = generate(pipeline, classes, per_class, sampler, progress=False)
    return labelled_grid(images, [class_names[c] for c in classes], per_class, title=title)

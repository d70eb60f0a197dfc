"""The `sample` subcommand: labelled grids and PNG folders from a model folder."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
from PIL import Image

from diffusion_unlearn.config import SampleConfig, SamplerConfig, protocol_deviations, resolve_device
from diffusion_unlearn.fileio import UserError, write_json
from diffusion_unlearn.grids import labelled_grid, save_image_atomic, save_png_folder
from diffusion_unlearn.modelfolder import load_model_folder
from diffusion_unlearn.pipelines.pipeline_class_conditional import ClassConditionalPipeline
from diffusion_unlearn.pipelines.pipeline_dit import ClassConditionalDiTPipeline
from diffusion_unlearn.sampler_defaults import is_resolved, resolve_sampler

Pipeline = ClassConditionalPipeline | ClassConditionalDiTPipeline  # both take the same sampler keywords

CLASS_STRIDE = 1_000_000  # image index = class · stride + j: a class's j-th sample never depends on the others


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
    `sampler.sampler` "ddpm" is the paper-faithful respaced ancestral sampler, "ddim" the fast DDIM one."""
    if not is_resolved(sampler):
        raise ValueError(f"sampler {sampler} has unset fields; fill them with resolve_sampler(...) first")
    labels, indices = class_sample_plan(classes, per_class)
    images = pipeline(labels, guidance_scale=sampler.guidance_scale, num_inference_steps=sampler.steps,
                      sampler=sampler.sampler, eta=sampler.eta, seed=sampler.seed, indices=indices,
                      batch_size=sampler.sample_batch_size, progress=progress)
    return images, labels, indices


def class_grid(pipeline: Pipeline, class_names: Sequence[str], classes: Sequence[int],
               per_class: int, sampler: SamplerConfig, title: str | None = None) -> Image.Image:
    images, _, _ = generate(pipeline, classes, per_class, sampler, progress=False)
    return labelled_grid(images, [class_names[c] for c in classes], per_class, title=title)


def sample(cfg: SampleConfig) -> dict:
    if not cfg.grid and not cfg.out_dir:
        raise UserError("nothing to write: pass --grid FILE.png and/or --out-dir DIR")
    if cfg.per_class < 1:
        raise UserError(f"--per-class must be at least 1, got {cfg.per_class} (nothing would be written)")
    loaded = load_model_folder(cfg.model, resolve_device(cfg.device))
    cfg = replace(cfg, sampler=resolve_sampler(cfg.sampler, loaded.meta.backbone, "grid" if cfg.grid else "eval"))
    classes = parse_classes(cfg.classes, loaded.meta.num_classes)
    images, labels, indices = generate(loaded.pipeline, classes, cfg.per_class, cfg.sampler)
    record = {"model": str(cfg.model), "classes": classes, "per_class": cfg.per_class, "protocol": cfg.protocol,
              "protocol_deviations": protocol_deviations(cfg), **cfg.sampler.describe()}
    if cfg.grid:
        title = f"{loaded.path.name}: s={cfg.sampler.guidance_scale:g}, {cfg.sampler.sampler} {cfg.sampler.steps}"
        names = [loaded.meta.class_names[c] for c in classes]
        save_image_atomic(labelled_grid(images, names, cfg.per_class, title=title), cfg.grid)
    if cfg.out_dir:
        save_png_folder(images, cfg.out_dir, indices)
        write_json(f"{cfg.out_dir}/samples.json", {**record, "labels": labels.tolist(), "indices": indices})
    return record

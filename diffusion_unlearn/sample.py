"""The `sample` subcommand: labelled grids and PNG folders from a model folder (or a `forget` run folder).

The PNG folder is drawn at the evaluation sampler (`resolve_sampler(..., "eval")`: what `eval` scores), the
grid at the grid sampler; one generation serves both where the two agree. The drawing itself is the sampling
library's (pipelines/sampling.py)."""

from __future__ import annotations

from dataclasses import replace

from diffusion_unlearn.config import SampleConfig, protocol_deviations, resolve_device
from diffusion_unlearn.fileio import UserError, write_json
from diffusion_unlearn.grids import labelled_grid, save_image_atomic, save_png_folder
from diffusion_unlearn.modelfolder import load_model_folder
from diffusion_unlearn.pipelines.sampling import generate, parse_classes
from diffusion_unlearn.sampler_defaults import resolve_sampler


def sample(cfg: SampleConfig) -> dict:
    """Write `cfg.grid` and/or `cfg.out_dir`; returns the record of what was drawn (the PNG folder's sampler,
    else the grid's, at the top level; the grid's under `grid_sampler` when both are written)."""
    if not cfg.grid and not cfg.out_dir:
        raise UserError("nothing to write: pass --grid FILE.png and/or --out-dir DIR")
    device = resolve_device(cfg.device)
    loaded = load_model_folder(cfg.model, device)
    classes = parse_classes(cfg.classes, loaded.meta.num_classes)
    purposes = [p for p, wanted in (("eval", cfg.out_dir), ("grid", cfg.grid)) if wanted]
    samplers = {p: resolve_sampler(cfg.sampler, loaded.meta.backbone, p, device) for p in purposes}
    drawn = {}
    for p in purposes:
        same = [q for q in drawn if samplers[q] == samplers[p]]
        drawn[p] = drawn[same[0]] if same else generate(loaded.pipeline, classes, cfg.per_class, samplers[p])
    primary = replace(cfg, sampler=samplers[purposes[0]])
    record = {"model": str(cfg.model), "classes": classes, "per_class": cfg.per_class, "protocol": cfg.protocol,
              "protocol_deviations": protocol_deviations(primary), **primary.sampler.describe()}
    if cfg.grid and cfg.out_dir:
        record["grid_sampler"] = samplers["grid"].describe()
    if cfg.grid:
        images, _, _ = drawn["grid"]
        grid = samplers["grid"]
        title = f"{loaded.path.name}: s={grid.guidance_scale:g}, {grid.sampler} {grid.steps}"
        names = [loaded.meta.class_names[c] for c in classes]
        save_image_atomic(labelled_grid(images, names, cfg.per_class, title=title), cfg.grid)
    if cfg.out_dir:
        images, labels, indices = drawn["eval"]
        save_png_folder(images, cfg.out_dir, indices)
        write_json(f"{cfg.out_dir}/samples.json", {**record, "labels": labels.tolist(), "indices": indices})
    return record

"""Per-backbone sampler defaults: what a `SamplerConfig` field left unset (None) becomes once the model is loaded.

DDPM models keep the quick-look sampler (DDIM, 50 steps, s = 3; the lineage's w = 2). DiT models get the
original's paper-faithful sampler (reference §4.1): the 250-step respaced ancestral `ddpm`, at s = 1.5 for sample
sets that are scored (`sample_ddp.py`, FID) and s = 4.0 for grids (`sample.py`). Sampling precision `auto` is
float32 (the published samplers' precision; `--protocol paper` sets it explicitly), except DiT grids on CUDA, which
are pictures to look at and keep bf16 autocast for speed. Explicit values always win.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch

from diffusion_unlearn.config import SamplerConfig
from diffusion_unlearn.pipelines.pipeline_class_conditional import bf16_autocast
from diffusion_unlearn.pipelines.pipeline_dit import FID_GUIDANCE_SCALE, GRID_GUIDANCE_SCALE

Purpose = Literal["eval", "grid"]  # eval: sample sets that are scored or saved; grid: pictures to look at

# backbone → its default sampler, steps per sampler, guidance scale and CUDA sampling precision per purpose
BACKBONE_SAMPLERS: dict[str, dict] = {
    "ddpm": {"sampler": "ddim", "steps": {"ddim": 50, "ddpm": 50}, "guidance_scale": {"eval": 3.0, "grid": 3.0},
             "cuda_precision": {"eval": "fp32", "grid": "fp32"}},
    "dit": {"sampler": "ddpm", "steps": {"ddpm": 250, "ddim": 50},
            "guidance_scale": {"eval": FID_GUIDANCE_SCALE, "grid": GRID_GUIDANCE_SCALE},
            "cuda_precision": {"eval": "fp32", "grid": "bf16"}},
}


def resolve_sampler(sampler: SamplerConfig, backbone: str, purpose: Purpose,
                    device: torch.device | str = "cpu") -> SamplerConfig:
    """A copy of `sampler` with every unset field filled from `backbone`'s defaults for `purpose` on `device`
    (sampling precision `auto`: float32 off CUDA); bf16 off CUDA is refused here, before any work."""
    if backbone not in BACKBONE_SAMPLERS or purpose not in ("eval", "grid"):
        raise ValueError(f"no sampler defaults for backbone {backbone!r}, purpose {purpose!r}")
    defaults = BACKBONE_SAMPLERS[backbone]
    name = defaults["sampler"] if sampler.sampler is None else sampler.sampler
    precision = sampler.sampling_precision
    if precision == "auto":
        precision = defaults["cuda_precision"][purpose] if torch.device(device).type == "cuda" else "fp32"
    bf16_autocast(precision, device)
    return replace(sampler, sampler=name,
                   steps=defaults["steps"][name] if sampler.steps is None else sampler.steps,
                   guidance_scale=(defaults["guidance_scale"][purpose] if sampler.guidance_scale is None
                                   else sampler.guidance_scale),
                   sampling_precision=precision)


def is_resolved(sampler: SamplerConfig) -> bool:
    """Whether every per-backbone field is set (samplers must be resolved before they draw)."""
    return None not in (sampler.sampler, sampler.steps, sampler.guidance_scale)

"""Per-backbone sampler defaults: what a `SamplerConfig` field left unset (None) becomes once the model is loaded.

Each backbone declares its own (`Backbone.sampler_defaults`): DDPM models keep the quick-look sampler (DDIM,
50 steps, s = 3), DiT models the original's paper-faithful one (reference §4.1). Sampling precision `auto` is
float32 (the published samplers' precision; `--protocol paper` sets it explicitly), except where a backbone's
`cuda_precision` says otherwise for a purpose on CUDA (DiT grids: pictures to look at, bf16 for speed).
Explicit values always win.

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch

from diffusion_unlearn.config import SamplerConfig
from diffusion_unlearn.pipelines.pipeline_class_conditional import bf16_autocast
from diffusion_unlearn.pipelines.registry import backbone_class

Purpose = Literal["eval", "grid"]  # eval: sample sets that are scored or saved; grid: pictures to look at


def resolve_sampler(sampler: SamplerConfig, backbone: str, purpose: Purpose,
                    device: torch.device | str = "cpu") -> SamplerConfig:
    """A copy of `sampler` with every unset field filled from backbone `backbone`'s defaults for `purpose` on
    `device` (sampling precision `auto`: float32 off CUDA); bf16 off CUDA is refused here, before any work."""
    defaults = backbone_class(backbone).sampler_defaults
    if purpose not in defaults.guidance_scale:
        raise ValueError(f"no sampler defaults for backbone {backbone!r}, purpose {purpose!r}")
    name = defaults.sampler if sampler.sampler is None else sampler.sampler
    precision = sampler.sampling_precision
    if precision == "auto":
        precision = defaults.cuda_precision.get(purpose, "fp32") if torch.device(device).type == "cuda" else "fp32"
    bf16_autocast(precision, device)
    return replace(sampler, sampler=name,
                   steps=defaults.steps[name] if sampler.steps is None else sampler.steps,
                   guidance_scale=(defaults.guidance_scale[purpose] if sampler.guidance_scale is None
                                   else sampler.guidance_scale),
                   sampling_precision=precision)

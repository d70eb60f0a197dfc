"""What every forget method shares: its declaration to the loop and the retain loss most methods use.

A method is a small dataclass. Its fields are its own arguments (`ForgetConfig.method_args`, validated
against the fields' types: an unknown key names the method and its arguments), except `RUN_FIELDS`, which it
takes from the run (`from_config`); a built-in method declares them in its torch-free arguments class
(method_args.py). It declares `mask_kind` ("fisher-ratio", "topk" or None: which saliency mask `forget()`
builds), `mask_retain` (whether retain gradients are masked too), `forget_loss` (None: no forget steps),
`supports_latent_cache` (whether cached VAE moments can stand in for its data) and `artefacts`
(the files `prepare` writes beside the run, each recording its provenance; they depend only on the base model
and the method's settings, so a study makes them once and shares them, and `--restart` removes them).
`prepare` may cache artefacts beside the run and choose the data the retain steps draw from. Register a new
method with `methods.register_method`.

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from diffusion_unlearn.data import ImageDataset
from diffusion_unlearn.method_args import RUN_FIELDS, MethodArgs


@dataclass
class Method(MethodArgs):
    paper: ClassVar[str]  # where the method comes from
    mask_kind: ClassVar[str | None] = None
    mask_retain: ClassVar[bool] = False
    supports_latent_cache: ClassVar[bool] = True
    artefacts: ClassVar[tuple[str, ...]] = ()  # files `prepare` caches beside the run (shared by a study's cells)

    @classmethod
    def from_config(cls, cfg) -> Method:
        """The method configured from a ForgetConfig: its `method_args` and the run's `RUN_FIELDS`."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**cfg.method_args, **{k: getattr(cfg, k) for k in RUN_FIELDS if k in names})

    @property
    def forget_dropout(self) -> float:
        """Label dropout inside the forget loss: none (correct) unless the reference quirk is on."""
        return self.cfg_dropout if self.cfg_dropout_in_forget_loss else 0.0

    def prepare(self, backbone, forget_set: ImageDataset, retain_set: ImageDataset, out_dir: Path) -> ImageDataset:
        """Work before the loop (on the original weights); returns the data the retain steps draw from."""
        return retain_set

    def artefact_settings(self) -> dict:
        """The settings the files `prepare` caches depend on besides the base weights (keys of shared copies)."""
        return {}

    def retain_loss(self, backbone, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ_R = ρ · mean_i ℓ_i with CFG label dropout (L_simple, as pretraining)."""
        return self.retain_alpha * backbone.per_sample_loss(x, y, cfg_dropout=self.cfg_dropout).mean()

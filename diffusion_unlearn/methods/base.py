"""What every forget method shares: its declaration to the loop and the retain loss most methods use.

A method is a small dataclass whose fields are named like the ForgetConfig fields they take (`from_config`).
It declares `mask_kind` ("fisher-ratio", "topk" or None: which saliency mask `forget()` builds), `mask_retain`
(whether retain gradients are masked too), `forget_loss` (None: no forget steps), `supports_latent_cache`
(whether cached VAE moments can stand in for its data) and `shared_artifacts` (the files `prepare` writes
beside the run that depend only on the base model and the seed, which a study makes once and shares).
`prepare` may cache artefacts beside the run and choose the data the retain steps draw from. Register a new
method with `methods.register_method`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from diffusion_unlearn.data import ImageDataset


@dataclass
class Method:
    retain_alpha: float = 1.0  # ρ
    cfg_dropout: float = 0.1  # label dropout in the retain loss, as pretraining
    cfg_dropout_in_forget_loss: bool = False  # reference quirk §7.6: ascend the null branch too

    name: ClassVar[str]
    paper: ClassVar[str]  # where the method comes from
    mask_kind: ClassVar[str | None] = None
    mask_retain: ClassVar[bool] = False
    supports_latent_cache: ClassVar[bool] = True
    shared_artifacts: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_config(cls, cfg) -> Method:
        """The method configured from the ForgetConfig fields of the same names."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    @property
    def forget_dropout(self) -> float:
        """Label dropout inside the forget loss: none (correct) unless the reference quirk is on."""
        return self.cfg_dropout if self.cfg_dropout_in_forget_loss else 0.0

    def prepare(self, backbone, forget_set: ImageDataset, retain_set: ImageDataset, out_dir: Path) -> ImageDataset:
        """Work before the loop (on the original weights); returns the data the retain steps draw from."""
        return retain_set

    def retain_loss(self, backbone, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ_R = ρ · mean_i ℓ_i with CFG label dropout (L_simple, as pretraining)."""
        return self.retain_alpha * backbone.per_sample_loss(x, y, cfg_dropout=self.cfg_dropout).mean()

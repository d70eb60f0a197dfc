"""Selective Amnesia (Heng & Soh) on a class-conditional DDPM, as the DualOptim reference runs it (§2.3).

Before the loop, on the original weights θ*: the model's own samples of every class, generated once
(`replay.safetensors` beside the run, uint8), and the Fisher diagonal over all of them, each sample's gradient
summed over the diffusion steps before squaring (`sa_fisher.safetensors`). Both are reused on resume.
Forget loss: L_simple on uniform-noise surrogates x̃ ~ U[−1, 1] labelled c_f. Retain loss: ρ·L_simple on the
replay of the retained classes + λ·Σ_i F_i (θ_i − θ*_i)² (EWC). The reference takes one joint step on
surrogate + replay + EWC without label dropout (preset `digits-sa`); `--optim dual --schedule alternate` is the
dual variant: the surrogate loss in the forget step, replay + EWC in the retain step. The reference computes
the Fisher on [0, 1] images with 10 % label dropout (§2.3, §7.10): `sa_fisher_as_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffusion_unlearn.config import SamplerConfig
from diffusion_unlearn.data import ImageDataset
from diffusion_unlearn.fileio import save_safetensors_atomic
from diffusion_unlearn.methods.base import Method
from diffusion_unlearn.saliency import Mask, timestep_summed_fisher

REPLAY_FILE, FISHER_FILE = "replay.safetensors", "sa_fisher.safetensors"
REFERENCE_FISHER_DROPOUT = 0.1  # the SA Fisher keeps the training label dropout in the reference (§2.3)


def ewc_penalty(params: dict[str, torch.Tensor], fisher: Mask, anchor: Mask) -> torch.Tensor:
    """Σ_i F_i (θ_i − θ*_i)² over all parameters (SA's EWC term, §2.3)."""
    return sum(((p - anchor[n]).square() * fisher[n]).sum() for n, p in params.items())


@dataclass
class SelectiveAmnesia(Method):
    forget_class: int = 0
    ewc_lambda: float = 10.0
    sa_samples_per_class: int = 500
    sa_fisher_timesteps: int = 1000
    sa_fisher_chunk: int = 50
    sa_fisher_as_reference: bool = False
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seed: int = 0

    name = "sa"
    supports_latent_cache = False  # its forget loss draws surrogate images and its retain set is generated
    shared_artifacts = (REPLAY_FILE, FISHER_FILE)  # the base model's samples of every class and their Fisher
    paper = "Heng & Soh, Selective Amnesia: A Continual Learning Approach to Forgetting in Deep Generative Models " \
            "(NeurIPS 2023)"

    def prepare(self, backbone, forget_set: ImageDataset, retain_set: ImageDataset, out_dir: Path) -> ImageDataset:
        """Replay set, θ* and F; returns the replay of the retained classes (labels as generated)."""
        replay = self.replay_set(backbone, forget_set, out_dir / REPLAY_FILE)
        params = backbone.named_parameters()
        self.anchor = {n: p.detach().clone() for n, p in params.items()}
        device = next(iter(params.values())).device
        if (out_dir / FISHER_FILE).exists():
            self.fisher = {n: f.to(device) for n, f in load_file(out_dir / FISHER_FILE).items()}
        else:
            images, labels = replay.get_batch(torch.arange(len(replay)))  # (N, C, H, W) in [-1, 1], (N,)
            quirk = self.sa_fisher_as_reference
            self.fisher = timestep_summed_fisher(
                backbone, ((images + 1) / 2 if quirk else images).to(device), labels.to(device),
                timesteps=self.sa_fisher_timesteps, chunk=self.sa_fisher_chunk,
                cfg_dropout=REFERENCE_FISHER_DROPOUT if quirk else 0.0, seed=self.seed)
            save_safetensors_atomic(self.fisher, out_dir / FISHER_FILE)
        return replay.with_classes([c for c in range(replay.num_classes) if c != self.forget_class])

    def replay_set(self, backbone, like: ImageDataset, path: Path) -> ImageDataset:
        """`sa_samples_per_class` samples of every class from the current weights, quantised to uint8 and cached."""
        if not path.exists():
            images, labels = backbone.generate(list(range(like.num_classes)), self.sa_samples_per_class,
                                               self.sampler)  # (N, C, H, W) in [-1, 1], (N,)
            pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, H, W)
            save_safetensors_atomic({"pixels": pixels, "labels": labels}, path)
        saved = load_file(path)
        return ImageDataset(name="sa-replay", split="train", root=str(path), class_names=like.class_names,
                            channels=like.channels, image_size=like.image_size, transform_id="sa-replay-uint8",
                            targets=saved["labels"], pixels=saved["pixels"])

    def forget_loss(self, backbone, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ_F = mean_i ℓ(x̃_i, c_f), x̃ ~ U[−1, 1]^{C×H×W} drawn afresh each step; `x` gives only the shape."""
        surrogate = torch.rand_like(x) * 2 - 1  # (B, C, H, W)
        return backbone.per_sample_loss(surrogate, y, cfg_dropout=self.forget_dropout).mean()

    def retain_loss(self, backbone, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ_R = ρ · mean_i ℓ(x_i, c_i) on replay images + λ · Σ_i F_i (θ_i − θ*_i)²."""
        ewc = ewc_penalty(backbone.named_parameters(), self.fisher, self.anchor)
        return super().retain_loss(backbone, x, y) + self.ewc_lambda * ewc

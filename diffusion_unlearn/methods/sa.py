"""Selective Amnesia (Heng & Soh) on a class-conditional DDPM, as the DualOptim reference runs it (§2.3).

Before the loop, on the original weights θ*: the model's own samples of every class, generated once
(`replay.safetensors` beside the run, uint8), and the Fisher diagonal over all of them, each sample's gradient
summed over the diffusion steps before squaring (`sa_fisher.safetensors`). Both record what made them (sampler,
counts, seeds, Fisher settings, the base weights' hash) and are reused only when that matches.
Forget loss: L_simple on uniform-noise surrogates x̃ ~ U[−1, 1] labelled c_f. Retain loss: ρ·L_simple on the
replay of the retained classes + λ·Σ_i F_i (θ_i − θ*_i)² (EWC). The reference takes one joint step on
surrogate + replay + EWC without label dropout (preset `digits-sa`); `--optim dual --schedule alternate` is the
dual variant: the surrogate loss in the forget step, replay + EWC in the retain step. The reference computes
the Fisher on [0, 1] images with 10 % label dropout (§2.3, §7.10): `sa_fisher_as_reference`. `sa_fisher`: a
Fisher made elsewhere (e.g. SA's published `fisher_dict.pkl` through `convert --from lineage-sa-fisher`) instead
of computing one; it must cover exactly the model's trainable parameters.

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffusion_unlearn import global_batch
from diffusion_unlearn.data import ImageDataset
from diffusion_unlearn.fileio import UserError, save_safetensors_atomic
from diffusion_unlearn.method_args import SelectiveAmnesiaArgs
from diffusion_unlearn.methods.base import Method
from diffusion_unlearn.provenance import Provenance, check_reuse, settings_of, weights_fingerprint
from diffusion_unlearn.saliency import Mask, timestep_summed_fisher

REPLAY_FILE, FISHER_FILE = "replay.safetensors", "sa_fisher.safetensors"
REFERENCE_FISHER_DROPOUT = 0.1  # the SA Fisher keeps the training label dropout in the reference (§2.3)


def ewc_penalty(params: dict[str, torch.Tensor], fisher: Mask, anchor: Mask) -> torch.Tensor:
    """Σ_i F_i (θ_i − θ*_i)² over all parameters (SA's EWC term, §2.3)."""
    return sum(((p - anchor[n]).square() * fisher[n]).sum() for n, p in params.items())


def save_fisher(fisher: Mask, path: str | Path, source: str) -> None:
    """An SA Fisher diagonal as `.safetensors` (parameter name → F_i), its origin in the metadata."""
    save_safetensors_atomic(fisher, Path(path), metadata={"kind": "sa-fisher", "source": source})


def load_fisher(path: str | Path, params: dict[str, torch.Tensor]) -> Mask:
    """An SA Fisher file, checked to hold one tensor of the right shape per parameter of `params`, on their
    device."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise UserError(f"SA Fisher {path} is not a .safetensors file; import SA's fisher_dict.pkl with "
                        "`diffusion-unlearn convert --from lineage-sa-fisher fisher_dict.pkl --out FILE.safetensors`")
    fisher = load_file(str(path))
    missing, extra = sorted(set(params) - set(fisher)), sorted(set(fisher) - set(params))
    if missing or extra:
        raise UserError(f"SA Fisher {path} does not match the model: {len(missing)} parameters without an entry "
                        f"{missing[:1]}, {len(extra)} unknown entries {extra[:1]}; it was made for another model")
    for n, p in params.items():
        if fisher[n].shape != p.shape:
            raise UserError(f"SA Fisher {path}: {n} has shape {tuple(fisher[n].shape)}, the model {tuple(p.shape)}")
    return {n: fisher[n].to(p.device, p.dtype) for n, p in params.items()}


def _reusable(path: Path, record: Provenance) -> bool:
    """Whether `path` exists; when it does, it must have been made as `record` says (else one-line UserError)."""
    if not path.exists():
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        on_disk = Provenance.from_json((f.metadata() or {}).get("provenance"))
    check_reuse(on_disk, record, path)
    return True


@dataclass
class SelectiveAmnesia(Method, SelectiveAmnesiaArgs):
    supports_latent_cache = False  # its forget loss draws surrogate images and its retain set is generated
    artefacts = (REPLAY_FILE, FISHER_FILE)  # the base model's samples of every class and their Fisher
    paper = "Heng & Soh, Selective Amnesia: A Continual Learning Approach to Forgetting in Deep Generative Models " \
            "(NeurIPS 2023)"

    def prepare(self, backbone, forget_set: ImageDataset, retain_set: ImageDataset, out_dir: Path) -> ImageDataset:
        """Replay set, θ* and F; returns the replay of the retained classes (labels as generated)."""
        params = backbone.named_parameters()
        self.fisher = load_fisher(self.sa_fisher, params) if self.sa_fisher else None  # a bad file fails first
        made_with = {"base_weights_sha256": weights_fingerprint(params), "classes": forget_set.num_classes,
                     **self.artefact_settings()}
        replay = self.replay_set(backbone, forget_set, out_dir / REPLAY_FILE, Provenance("sa-replay", made_with))
        self.anchor = {n: p.detach().clone() for n, p in params.items()}
        device = next(iter(params.values())).device
        fisher_record = Provenance("sa-fisher", made_with)
        if self.fisher is None and _reusable(out_dir / FISHER_FILE, fisher_record):
            self.fisher = {n: f.to(device) for n, f in load_file(out_dir / FISHER_FILE).items()}
        elif self.fisher is None:
            images, labels = replay.get_batch(torch.arange(len(replay)))  # (N, C, H, W) in [-1, 1], (N,)
            quirk = self.sa_fisher_as_reference
            self.fisher = timestep_summed_fisher(
                backbone, ((images + 1) / 2 if quirk else images).to(device), labels.to(device),
                timesteps=self.sa_fisher_timesteps, chunk=self.sa_fisher_chunk,
                cfg_dropout=REFERENCE_FISHER_DROPOUT if quirk else 0.0, seed=self.seed)
            save_safetensors_atomic(self.fisher, out_dir / FISHER_FILE,
                                    metadata={"provenance": fisher_record.to_json()})
        return replay.with_classes([c for c in range(replay.num_classes) if c != self.forget_class])

    def artefact_settings(self) -> dict:
        """What the replay set and the Fisher depend on besides the base weights and the classes (not the
        forgotten class: one replay and Fisher serve every class)."""
        return {"samples_per_class": self.sa_samples_per_class, "fisher_timesteps": self.sa_fisher_timesteps,
                "fisher_chunk": self.sa_fisher_chunk, "fisher_seed": self.seed,
                "fisher_as_reference": self.sa_fisher_as_reference,
                **{f"sampler.{k}": v for k, v in settings_of(self.sampler).items()}}

    def replay_set(self, backbone, like: ImageDataset, path: Path, record: Provenance) -> ImageDataset:
        """`sa_samples_per_class` samples of every class from the current weights, quantised to uint8 and cached."""
        if not _reusable(path, record):
            images, labels = backbone.generate(list(range(like.num_classes)), self.sa_samples_per_class,
                                               self.sampler)  # (N, C, H, W) in [-1, 1], (N,)
            pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, H, W)
            save_safetensors_atomic({"pixels": pixels, "labels": labels}, path,
                                    metadata={"provenance": record.to_json()})
        saved = load_file(path)
        return ImageDataset(name="sa-replay", split="train", root=str(path), class_names=like.class_names,
                            channels=like.channels, image_size=like.image_size, transform_id="sa-replay-uint8",
                            targets=saved["labels"], pixels=saved["pixels"])

    def forget_loss(self, backbone, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ_F = mean_i ℓ(x̃_i, c_f), x̃ ~ U[−1, 1]^{C×H×W} drawn afresh each step; `x` gives only the shape
        (+ λ·EWC with `sa_ewc_step: forget`)."""
        surrogate = global_batch.rand_like(x, "surrogate") * 2 - 1  # (B, C, H, W)
        loss = backbone.per_sample_loss(surrogate, y, cfg_dropout=self.forget_dropout).mean()
        return loss + self._ewc(backbone) if self.sa_ewc_step == "forget" else loss

    def retain_loss(self, backbone, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ_R = ρ · mean_i ℓ(x_i, c_i) on replay images + λ · Σ_i F_i (θ_i − θ*_i)² (the EWC term only with
        `sa_ewc_step: retain`, the published placement)."""
        loss = super().retain_loss(backbone, x, y)
        return loss + self._ewc(backbone) if self.sa_ewc_step == "retain" else loss

    def _ewc(self, backbone) -> torch.Tensor:
        """λ · Σ_i F_i (θ_i − θ*_i)²."""
        return self.ewc_lambda * ewc_penalty(backbone.named_parameters(), self.fisher, self.anchor)

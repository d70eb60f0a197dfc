"""A model folder: a diffusers pipeline folder (`model_index.json`, `unet/` or `transformer/` + `vae/`,
`scheduler/`, safetensors) plus `diffusion_unlearn.json`, which says which backbone it holds (`ddpm`: a
pixel-space U-Net, `dit`: a latent DiT with its frozen VAE), which weights (raw or EMA), the classes, and the
null-class convention. `ClassConditionalPipeline` / `ClassConditionalDiTPipeline.from_pretrained(folder)` load
it in plain diffusers too."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.utils import logging as diffusers_logging

from diffusion_unlearn.data import ImageDataset, load_dataset
from diffusion_unlearn.fileio import UserError, atomic_dir, read_json, write_json
from diffusion_unlearn.models.dit_transformer import ClassConditionalDiT
from diffusion_unlearn.pipelines.backbone import DDPMBackbone
from diffusion_unlearn.pipelines.latent_backbone import LatentDiTBackbone
from diffusion_unlearn.pipelines.pipeline_class_conditional import (ClassConditionalPipeline, training_scheduler,
                                                                    unet_num_classes, unet_sample_shape)
from diffusion_unlearn.pipelines.pipeline_dit import ClassConditionalDiTPipeline, dit_training_scheduler

META_FILE = "diffusion_unlearn.json"
NULL_CONVENTION = "class index K = num_classes is the null (unconditional) class"


@dataclass
class ModelMeta:
    class_names: list[str]
    weights: str = "ema"  # "raw" or "ema"
    backbone: str = "ddpm"
    dataset: str | None = None
    excluded_classes: list[int] = field(default_factory=list)
    forgotten_classes: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    null_convention: str = NULL_CONVENTION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


PIPELINES = {"ddpm": ClassConditionalPipeline, "dit": ClassConditionalDiTPipeline}
Pipeline = ClassConditionalPipeline | ClassConditionalDiTPipeline


def image_shape(denoiser: torch.nn.Module, vae: AutoencoderKL | None = None) -> tuple[int, int, int]:
    """(C, H, W) of the images a model generates and trains on: the U-Net's own, or for a latent DiT the
    VAE's in-channels and the latent side × the VAE's downsampling factor 2^(levels − 1)."""
    if not isinstance(denoiser, ClassConditionalDiT):
        return unet_sample_shape(denoiser)
    if vae is None:
        raise ValueError("a DiT needs its VAE")
    side = int(denoiser.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    return (int(vae.config.in_channels), side, side)


@dataclass
class LoadedModel:
    pipeline: Pipeline
    meta: ModelMeta
    path: Path

    @property
    def unet(self) -> torch.nn.Module:
        """The trainable denoiser: the U-Net, or the DiT transformer (never the frozen VAE)."""
        return self.pipeline.transformer if self.meta.backbone == "dit" else self.pipeline.unet

    @property
    def vae(self) -> AutoencoderKL | None:
        return self.pipeline.vae if self.meta.backbone == "dit" else None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images (for a DiT: decoded images, not latents)."""
        return image_shape(self.unet, self.vae)

    def backbone(self, model: torch.nn.Module | None = None) -> DDPMBackbone | LatentDiTBackbone:
        """The adapter forget methods run on; `model` is the (possibly accelerate-wrapped) denoiser to call."""
        if self.meta.backbone == "dit":
            return LatentDiTBackbone(self.unet, self.vae, model=model)
        return DDPMBackbone(self.unet, model=model)


def save_model_folder(path: str | Path, unet: torch.nn.Module, meta: ModelMeta,
                      vae: AutoencoderKL | None = None, extra: dict[str, dict] | None = None) -> Path:
    """Write atomically: a killed write never leaves a half folder at `path`. A `ClassConditionalDiT` is saved
    with its `vae` (meta `backbone: dit`), any other denoiser as a pixel-space DDPM. `extra` maps file names to
    objects `torch.save`d into the same atomic write (e.g. a training state beside its weights)."""
    path = Path(path)
    if unet_num_classes(unet) != meta.num_classes:
        raise ValueError("class names do not match the model's class count")
    c, h, _ = image_shape(unet, vae)
    dit = isinstance(unet, ClassConditionalDiT)
    pipeline = (ClassConditionalDiTPipeline(transformer=unet, vae=vae, scheduler=dit_training_scheduler()) if dit
                else ClassConditionalPipeline(unet=unet, scheduler=training_scheduler()))
    with atomic_dir(path) as tmp:
        pipeline.save_pretrained(tmp)
        record = dataclasses.asdict(dataclasses.replace(meta, backbone="dit" if dit else "ddpm"))
        record.update(num_classes=meta.num_classes, null_class=meta.num_classes, channels=c, image_size=h,
                      model_class=type(unet).__name__)
        write_json(tmp / META_FILE, record)
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / name)
    return path


def load_model_folder(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model folder not found: {path} (train one with `diffusion-unlearn pretrain` "
                        "or convert a checkpoint with `diffusion-unlearn convert`)")
    for name in ("model_index.json", META_FILE):
        if not (path / name).is_file():
            raise UserError(f"{path} is not a diffusion-unlearn model folder: {name} is missing")
    record = read_json(path / META_FILE)
    fields = {f.name for f in dataclasses.fields(ModelMeta)}
    meta = ModelMeta(**{k: v for k, v in record.items() if k in fields})
    if meta.backbone not in PIPELINES:
        raise UserError(f"{path}/{META_FILE} names backbone {meta.backbone!r}; expected one of "
                        f"{', '.join(PIPELINES)} (re-convert the model)")
    try:
        diffusers_logging.disable_progress_bar()  # a bar for loading two components is noise
        pipeline = PIPELINES[meta.backbone].from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - corrupt or truncated weights
        raise UserError(f"cannot read the model in {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    finally:
        diffusers_logging.enable_progress_bar()
    if meta.backbone == "dit":
        pipeline.vae.requires_grad_(False)  # frozen: never in masks, optimizers, EMA or state
    pipeline.to(device)
    return LoadedModel(pipeline=pipeline, meta=meta, path=path)


def load_model_dataset(loaded: LoadedModel, name: str, root: str | None, split: str = "train") -> ImageDataset:
    """Dataset `name` as the model sees it: an image folder (e.g. ImageNet's train/) ADM-center-cropped to the
    model's image side; digits and CIFAR-10 at their own size (`check_model_data` compares)."""
    return load_dataset(name, root, split, image_size=loaded.sample_shape[1] if name == "imagefolder" else None)


def check_model_data(loaded: LoadedModel, dataset, forget_class: int) -> None:
    """A one-line error, before any work, when the class or the dataset does not fit the model."""
    k = loaded.meta.num_classes
    if not 0 <= forget_class < k:
        raise UserError(f"--forget-class {forget_class} is outside the model's classes 0..{k - 1}")
    c, h, _ = loaded.sample_shape
    if (dataset.channels, dataset.image_size) != (c, h):
        raise UserError(f"dataset {dataset.name} has {dataset.channels}-channel {dataset.image_size}px images but "
                        f"the model takes {c}-channel {h}px images; pass the dataset the model was trained on")
    if dataset.num_classes != k:
        raise UserError(f"dataset {dataset.name} has {dataset.num_classes} classes, the model {k}")

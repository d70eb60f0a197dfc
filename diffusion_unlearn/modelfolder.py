"""A model folder: a diffusers pipeline folder (`model_index.json`, `unet/`, `scheduler/`, safetensors)
plus `diffusion_unlearn.json`, which says which weights it holds (raw or EMA), the classes, and the
null-class convention. `ClassConditionalPipeline.from_pretrained(folder)` loads it in plain diffusers too."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging

from diffusion_unlearn.fileio import UserError, atomic_dir, read_json, write_json
from diffusion_unlearn.pipelines.pipeline_class_conditional import (ClassConditionalPipeline, training_scheduler,
                                                                    unet_num_classes, unet_sample_shape)

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


@dataclass
class LoadedModel:
    pipeline: ClassConditionalPipeline
    meta: ModelMeta
    path: Path

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipeline.unet

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return unet_sample_shape(self.unet)


def save_model_folder(path: str | Path, unet: torch.nn.Module, meta: ModelMeta) -> Path:
    """Write atomically: a killed write never leaves a half folder at `path`."""
    path = Path(path)
    if unet_num_classes(unet) != meta.num_classes:
        raise ValueError("class names do not match the model's class count")
    c, h, _ = unet_sample_shape(unet)
    with atomic_dir(path) as tmp:
        ClassConditionalPipeline(unet=unet, scheduler=training_scheduler()).save_pretrained(tmp)
        record = dataclasses.asdict(meta)
        record.update(num_classes=meta.num_classes, null_class=meta.num_classes, channels=c, image_size=h,
                      model_class=type(unet).__name__)
        write_json(tmp / META_FILE, record)
    return path


def load_model_folder(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model folder not found: {path} (train one with `diffusion-unlearn pretrain` "
                        "or convert a checkpoint with `diffusion-unlearn convert`)")
    for name in ("model_index.json", META_FILE):
        if not (path / name).is_file():
            raise UserError(f"{path} is not a diffusion-unlearn model folder: {name} is missing")
    try:
        diffusers_logging.disable_progress_bar()  # a bar for loading two components is noise
        pipeline = ClassConditionalPipeline.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - corrupt or truncated weights
        raise UserError(f"cannot read the model in {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    finally:
        diffusers_logging.enable_progress_bar()
    record = read_json(path / META_FILE)
    fields = {f.name for f in dataclasses.fields(ModelMeta)}
    meta = ModelMeta(**{k: v for k, v in record.items() if k in fields})
    pipeline.to(device)
    return LoadedModel(pipeline=pipeline, meta=meta, path=path)


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

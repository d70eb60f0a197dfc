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
from diffusion_unlearn.pipelines.base import Backbone
from diffusion_unlearn.pipelines.pipeline_class_conditional import unet_num_classes
from diffusion_unlearn.pipelines.registry import BACKBONES, backbone_class, backbone_for_denoiser
from diffusion_unlearn.pipelines.sampling import Pipeline

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
    pipeline: Pipeline
    meta: ModelMeta
    path: Path

    @property
    def backbone_class(self) -> type[Backbone]:
        return backbone_class(self.meta.backbone)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The trainable denoiser: the U-Net, or the DiT transformer (never the frozen VAE)."""
        return self.backbone_class.denoiser_of(self.pipeline)

    @property
    def vae(self) -> AutoencoderKL | None:
        return self.backbone_class.vae_of(self.pipeline)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images (for a DiT: decoded images, not latents)."""
        return self.backbone_class.image_shape(self.denoiser, self.vae)

    def backbone(self, model: torch.nn.Module | None = None) -> Backbone:
        """The adapter forget methods run on; `model` is the (possibly accelerate-wrapped) denoiser to call."""
        return self.backbone_class.from_parts(self.denoiser, self.vae, model)


def save_model_folder(path: str | Path, denoiser: torch.nn.Module, meta: ModelMeta,
                      vae: AutoencoderKL | None = None, extra: dict[str, dict] | None = None) -> Path:
    """Write atomically: a killed write never leaves a half folder at `path`. The backbone is `meta.backbone`
    when that one takes `denoiser`, else the registered backbone that does (a `ClassConditionalDiT` is saved
    with its `vae` as `dit`). `extra` maps file names to objects `torch.save`d into the same atomic write (e.g.
    a training state beside its weights)."""
    path = Path(path)
    if unet_num_classes(denoiser) != meta.num_classes:
        raise ValueError("class names do not match the model's class count")
    cls = backbone_for_denoiser(denoiser, meta.backbone)
    c, h, _ = cls.image_shape(denoiser, vae)
    with atomic_dir(path) as tmp:
        cls.pipeline(denoiser, vae).save_pretrained(tmp)
        record = dataclasses.asdict(dataclasses.replace(meta, backbone=cls.name))
        record.update(num_classes=meta.num_classes, null_class=meta.num_classes, channels=c, image_size=h,
                      model_class=type(denoiser).__name__)
        write_json(tmp / META_FILE, record)
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / name)
    return path


def model_folder_path(path: str | Path) -> Path:
    """The model folder `path` names: itself, or the `model/` of a `forget` run folder."""
    path = Path(path)
    if not (path / META_FILE).is_file() and (path / "model" / META_FILE).is_file():
        return path / "model"
    return path


def read_model_meta(path: str | Path) -> ModelMeta:
    """The `ModelMeta` of the model folder at `path` (its diffusion_unlearn.json; unknown keys ignored)."""
    record = read_json(Path(path) / META_FILE)
    fields = {f.name for f in dataclasses.fields(ModelMeta)}
    return ModelMeta(**{k: v for k, v in record.items() if k in fields})


def load_model_folder(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model folder at `path`, or the `model/` of the `forget` run folder at `path`, on `device`."""
    path = model_folder_path(path)
    if not path.is_dir():
        raise UserError(f"model folder not found: {path} (pass a model folder or a `forget` run folder holding "
                        "model/; train one with `diffusion-unlearn pretrain` or convert a checkpoint with "
                        "`diffusion-unlearn convert`)")
    for name in ("model_index.json", META_FILE):
        if not (path / name).is_file():
            raise UserError(f"{path} is not a diffusion-unlearn model folder: {name} is missing (pass a model "
                            "folder or a `forget` run folder holding model/)")
    meta = read_model_meta(path)
    if meta.backbone not in BACKBONES:
        raise UserError(f"{path}/{META_FILE} names backbone {meta.backbone!r}; expected one of "
                        f"{', '.join(BACKBONES)} (re-convert the model)")
    cls = BACKBONES[meta.backbone]
    try:
        diffusers_logging.disable_progress_bar()  # a bar for loading two components is noise
        pipeline = cls.pipeline_class.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - corrupt or truncated weights
        raise UserError(f"cannot read the model in {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    finally:
        diffusers_logging.enable_progress_bar()
    cls.prepare_loaded(pipeline)
    pipeline.to(device)
    return LoadedModel(pipeline=pipeline, meta=meta, path=path)


def load_model_and_data(model: str | Path, dataset: str, data_root: str | None, forget_class: int,
                        device: str | torch.device = "cpu") -> tuple[LoadedModel, ImageDataset]:
    """The model folder, its training dataset as the model sees it, both checked against each other and
    `forget_class` (`check_model_data`) before any work."""
    loaded = load_model_folder(model, device)
    data = load_model_dataset(loaded, dataset, data_root)
    check_model_data(loaded, data, forget_class)
    return loaded, data


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

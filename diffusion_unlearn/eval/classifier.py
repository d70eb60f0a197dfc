"""The FA classifier: a small CNN for 8x8 digits, a timm network for 32 px and larger.

A trained classifier is a folder with `classifier.safetensors` and `classifier.json`. It takes images in
[-1, 1] at the dataset resolution and applies its own normalisation (and optional resize) inside.

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from diffusion_unlearn.config import ClassifierConfig, resolve_device
from diffusion_unlearn.data import ImageDataset, load_dataset
from diffusion_unlearn.fileio import (UserError, atomic_dir, file_hash, load_pickled_checkpoint, read_json,
                                      save_safetensors_atomic, strip_prefix, write_json)

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "classifier.safetensors"
META_FILE = "classifier.json"
DIGITS_ARCH = "digits-cnn"
IDENTITY_NORM = {"mean": [0.5], "std": [0.5]}  # on [0, 1] images: the identity on [-1, 1]


# ----------------------------------------------------------------------------- networks


class DigitsCNN(nn.Module):
    """Three 3x3 conv layers and a 128-d penultimate layer, for 8x8 one-channel digits."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.LazyLinear(feature_dim), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # (B, K)


def build_network(arch: str, num_classes: int, channels: int, image_size: int) -> nn.Module:
    """`digits-cnn` or any timm architecture name, randomly initialised."""
    if arch == DIGITS_ARCH:
        net = DigitsCNN(num_classes, channels)
        net(torch.zeros(1, channels, image_size, image_size))  # materialise the lazy layer
        return net
    import timm

    if not timm.is_model(arch):
        raise UserError(f"unknown classifier architecture {arch!r} (pass '{DIGITS_ARCH}' or a timm model name)")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=channels)


def penultimate(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Features before the classification layer, (B, D)."""
    if isinstance(net, DigitsCNN):
        return net.features(x)
    return net.forward_head(net.forward_features(x), pre_logits=True)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a timm/torchvision checkpoint: safetensors, or a `.pt`/`.pth` holding a state dict (plain or
    under "state_dict"/"model"), `module.` prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"classifier weights {path} not found; pass a local timm/torchvision state dict file")
    if path.suffix == ".safetensors":
        try:
            state = load_file(path)
        except Exception as e:  # noqa: BLE001 - re-raised with a fix
            raise UserError(f"cannot read {path} as safetensors ({type(e).__name__}); pass an intact file") from e
    else:
        state = load_pickled_checkpoint(path)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict (pass a timm/torchvision ImageNet checkpoint)")
    return strip_prefix(state)


def load_init_weights(net: nn.Module, path: str) -> None:
    """Load an ImageNet checkpoint (timm/torchvision state dict) into `net`, all but its classifier head."""
    head = net.pretrained_cfg["classifier"]
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(head + ".")}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit this architecture ({str(e).splitlines()[1].strip()[:200]})") from e
    missing = [k for k in missing if not k.startswith(head + ".")]
    if missing or unexpected:
        raise UserError(
            f"{path} does not fit this architecture ({len(missing)} missing keys, {len(unexpected)} unexpected, "
            f"e.g. {(missing + unexpected)[0]}); pass a checkpoint of the same --arch"
        )


# ----------------------------------------------------------------------------- the loaded classifier


class FAClassifier(nn.Module):
    """A trained classifier for images in [-1, 1] at its dataset's resolution."""

    def __init__(self, net: nn.Module, meta: dict, path: Path | None = None):
        super().__init__()
        self.net = net
        self.meta = meta
        self.path = path  # the folder it was loaded from; None while training
        self.class_names: list[str] = list(meta["class_names"])
        self.weights_sha256 = file_hash(path / WEIGHTS_FILE) if path is not None else None
        norm = meta["normalisation"]
        self.register_buffer("mean", torch.tensor(norm["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(norm["std"]).view(1, -1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def logits(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Logits (N, K) on the CPU for images (N, C, H, W) in [-1, 1]."""
        return self._batched(self.net, x, batch_size)

    def features(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Penultimate features (N, D) on the CPU for images (N, C, H, W) in [-1, 1]."""
        return self._batched(lambda h: penultimate(self.net, h), x, batch_size)

    @torch.no_grad()
    def _batched(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int) -> torch.Tensor:
        self._check_shape(x)
        self.eval()
        out = [fn(self.prepare(chunk.to(self.device))).float().cpu() for chunk in x.split(batch_size)]
        return torch.cat(out)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → the network's input: its normalisation, then its resize (bilinear, antialiased:
        torchvision's `Resize` on PIL images, as the reference's classifiers read their inputs, §5.1)."""
        x = ((x.float() + 1) / 2 - self.mean) / self.std  # (B, C, H, W)
        size = self.meta["resize"]
        if size is not None:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True)  # (B, C, S, S)
        return x

    def _check_shape(self, x: torch.Tensor) -> None:
        want = (self.meta["channels"], self.meta["image_size"], self.meta["image_size"])
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise UserError(
                f"images of shape {tuple(x.shape)} do not fit the classifier at {self.path}, which expects "
                f"(N, {want[0]}, {want[1]}, {want[2]}); use a classifier trained on the same dataset and resolution"
            )


def check_classifier_classes(clf: FAClassifier, class_names: list[str]) -> None:
    """A one-line UserError unless the classifier knows exactly the model's classes, in the model's order."""
    theirs, ours = clf.class_names, list(class_names)
    if theirs == ours:
        return
    how = ("train one on the model's dataset, or import an ImageNet classifier with the model's names "
           "(`import-classifier FILE --class-names index` for DiT folders converted with --class-names index)")
    if len(theirs) != len(ours):
        raise UserError(f"classifier {clf.path} has {len(theirs)} classes, the model {len(ours)}; {how}")
    i = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
    raise UserError(f"classifier {clf.path} names class {i} {theirs[i]!r}, the model {ours[i]!r}; {how}")


def load_classifier(path: str | os.PathLike, device: str = "cpu") -> FAClassifier:
    """Load a classifier folder written by `train_classifier`."""
    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file() or not (path / META_FILE).is_file():
        raise UserError(
            f"{path} is not a classifier folder (it needs {WEIGHTS_FILE} and {META_FILE}); "
            "train one with `diffusion-unlearn train-classifier`"
        )
    try:
        meta = read_json(path / META_FILE)
        net = build_network(meta["arch"], meta["num_classes"], meta["channels"], meta["image_size"])
        net.load_state_dict(load_file(path / WEIGHTS_FILE))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(
            f"{path} holds a damaged classifier ({type(e).__name__}: {str(e).splitlines()[0][:120]}); retrain it"
        ) from e
    return FAClassifier(net.requires_grad_(False), meta, path).to(device)


# ----------------------------------------------------------------------------- training


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels in each direction, replicating the border."""
    b, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")  # (B, C, H+2m, W+2m)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=generator).to(x.device)  # (B, 1) each
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]  # (B, C, H, W)


def augment(x: torch.Tensor, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1/8 of the size; random horizontal flips with `hflip`."""
    x = random_shift(x, max(1, x.shape[-1] // 8), generator)  # (B, C, H, W)
    if hflip:
        flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)  # (B,)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


@torch.no_grad()
def accuracy(clf: FAClassifier, data: ImageDataset, batch_size: int = 512) -> float:
    correct = 0
    for idx in torch.arange(len(data)).split(batch_size):
        images, labels = data.get_batch(idx)
        correct += (clf.logits(images).argmax(1) == labels).sum().item()
    return correct / len(data)


def train_classifier(cfg: ClassifierConfig) -> Path:
    """Train the FA classifier on the train split, test it, and write its folder to `cfg.out`."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    train = load_dataset(cfg.dataset, root=cfg.data_root, split="train")
    test = load_dataset(cfg.dataset, root=cfg.data_root, split="test")
    arch = cfg.arch or (DIGITS_ARCH if cfg.dataset == "digits" else "resnet34")
    if cfg.init is not None and arch == DIGITS_ARCH:
        raise UserError(f"--init needs a timm architecture, not {DIGITS_ARCH} (pass --arch resnet34)")
    net = build_network(arch, train.num_classes, train.channels, train.image_size)
    norm = IDENTITY_NORM
    if cfg.init is not None:
        load_init_weights(net, cfg.init)
        norm = {"mean": list(net.pretrained_cfg["mean"]), "std": list(net.pretrained_cfg["std"])}
    meta = {
        "format": "diffusion-unlearn-classifier/1",
        "arch": arch,
        "num_classes": train.num_classes,
        "class_names": train.class_names,
        "channels": train.channels,
        "image_size": train.image_size,
        "input_range": "[-1,1]",
        "normalisation": norm,  # applied to images mapped to [0, 1]
        "resize": cfg.resize,
        "dataset": cfg.dataset,
        "train_split": train.split,
        "test_split": test.split,
        "transform_id": train.transform_id,
        "config": asdict(cfg),
    }
    clf = FAClassifier(net, meta).to(device)
    _fit(clf, train, cfg)
    meta["test_accuracy"] = accuracy(clf, test)
    logger.info("classifier test accuracy on %s/%s: %.4f", cfg.dataset, test.split, meta["test_accuracy"])
    out = Path(cfg.out)
    with atomic_dir(out) as tmp:
        save_safetensors_atomic(net.state_dict(), tmp / WEIGHTS_FILE)
        write_json(tmp / META_FILE, meta)
    return out


def _fit(clf: FAClassifier, train: ImageDataset, cfg: ClassifierConfig) -> None:
    """AdamW with a cosine learning rate, light augmentation, cross-entropy; a last batch of one is
    dropped (BatchNorm needs two images)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = len(train) // cfg.batch_size + (len(train) % cfg.batch_size >= 2)
    opt = torch.optim.AdamW(clf.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    hflip = cfg.dataset != "digits"  # mirrored digits are other glyphs
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="classifier", unit="step")
    for _ in range(cfg.epochs):
        clf.net.train()
        for idx in torch.randperm(len(train), generator=gen).split(cfg.batch_size)[:steps_per_epoch]:
            images, labels = train.get_batch(idx)  # (B, C, H, W), (B,)
            images = augment(images.to(clf.device), hflip, gen)
            loss = F.cross_entropy(clf.net(clf.prepare(images)), labels.to(clf.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

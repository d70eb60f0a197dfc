"""Datasets (digits, CIFAR-10 python batches, image folders), forget/retain splits and a resumable BatchStream.

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

import codecs
import copy
import hashlib
import os
import pickle
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .fileio import UserError, file_hash
from .global_batch import BatchKey, keyed_generator

DATASETS = ("digits", "cifar10", "imagefolder")
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageDataset(torch.utils.data.Dataset):
    """Labelled images as float32 (C, H, W) in [-1, 1], held in memory (`pixels`) or loaded lazily (`files`).

    `rows` maps this view's items to rows of `pixels`/`files`, so subsets share the underlying storage.
    """

    def __init__(
        self, *, name: str, split: str, root: str | None, class_names: list[str], channels: int,
        image_size: int, transform_id: str, targets: torch.Tensor, pixels: torch.Tensor | None = None,
        pixel_max: int = 255, files: list[str] | None = None, rows: torch.Tensor | None = None,
    ) -> None:
        self.name, self.split, self.root = name, split, root
        self.class_names, self.channels, self.image_size = class_names, channels, image_size
        self.transform_id = transform_id
        self.targets = targets.long()  # (N,)
        self._pixels = pixels  # (M, C, H, W) uint8 in 0..pixel_max, or None when lazy
        self._pixel_max = pixel_max
        self._files = files
        self._rows = torch.arange(len(targets)) if rows is None else rows  # (N,) rows of pixels/files

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.get_batch(torch.tensor([i]))
        return x[0], int(y[0])

    def get_batch(self, indices: torch.Tensor, flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] and labels (B,) of the items at `indices`; those where the bool (B,)
        `flip` is set are mirrored horizontally."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        y = self.targets[indices]  # (B,)
        rows = self._rows[indices]  # (B,)
        if self._pixels is None:
            x = torch.stack([self._load(int(r)) for r in rows])  # (B, C, H, W)
        else:
            x = self._pixels[rows].float() / self._pixel_max * 2 - 1  # (B, C, H, W)
        if flip is not None:
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, y

    def fingerprint(self) -> str:
        """SHA-256 of what this view's images are: dataset, split, transform, labels, and the pixels (in
        memory) or each file's path, size and modification time (lazy)."""
        h = hashlib.sha256("|".join([self.name, self.split, str(self.root), self.transform_id,
                                     str(self.image_size), str(self.channels)]).encode())
        h.update(self.targets.numpy().tobytes())
        if self._pixels is not None:
            h.update(self._pixels[self._rows].numpy().tobytes())
        else:
            for r in self._rows.tolist():
                st = os.stat(self._files[r])
                h.update(f"{self._files[r]}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def _load(self, row: int) -> torch.Tensor:
        """Decode one image file: convert, then ADM's center crop to `image_size`."""
        mode, size = ("L" if self.channels == 1 else "RGB"), self.image_size
        with Image.open(self._files[row]) as im:
            im = adm_center_crop(im.convert(mode), size)
        x = torch.from_numpy(np.array(im, dtype=np.uint8)).reshape(size, size, self.channels)  # (H, W, C)
        return x.permute(2, 0, 1).float() / 255 * 2 - 1  # (C, H, W)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageDataset:
        """A view of the items at `indices` (integer positions) with the same metadata."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        view = copy.copy(self)
        view.targets, view._rows = self.targets[idx], self._rows[idx]
        return view

    def with_classes(self, classes: Sequence[int]) -> ImageDataset:
        """Keep only the items labelled with one of `classes`; labels are not renumbered."""
        wanted = torch.as_tensor(list(classes), dtype=torch.long)
        bad = [c for c in wanted.tolist() if not 0 <= c < self.num_classes]
        if bad:
            raise UserError(f"class(es) {bad} not in {self.name}; use classes in 0..{self.num_classes - 1}")
        return self.subset(torch.isin(self.targets, wanted).nonzero().squeeze(1))


def adm_center_crop(im: Image.Image, size: int) -> Image.Image:
    """ADM's `center_crop_arr`, which DiT's training and the reference's data use (reference §4.2): halve both
    sides (floor, BOX filter) while the shorter side is at least 2·size, BICUBIC-resize so the shorter side is
    `size` (the other: round(side·scale)), then crop size×size at offset ((W − size)//2, (H − size)//2)."""
    while min(im.size) >= 2 * size:
        im = im.resize((im.width // 2, im.height // 2), Image.BOX)
    scale = size / min(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return im.crop((left, top, left + size, top + size))


def load_dataset(
    name: str, root: str | None = None, split: str = "train", image_size: int | None = None
) -> ImageDataset:
    """Load `name` ("digits", "cifar10" or "imagefolder") as an ImageDataset."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; pass one of {', '.join(DATASETS)}")
    if split not in SPLITS and name != "imagefolder":
        raise UserError(f"unknown split {split!r} for {name}; pass one of {', '.join(SPLITS)}")
    if name == "digits":
        return _load_digits(split, image_size)
    if name == "cifar10":
        return _load_cifar10(root, split, image_size)
    return _load_imagefolder(root, split, image_size)


def _check_native_size(name: str, image_size: int | None, native: int) -> None:
    if image_size not in (None, native):
        raise UserError(f"{name} images are {native}x{native}, got image size {image_size}; pass --image-size {native}")


def _load_digits(split: str, image_size: int | None) -> ImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_native_size("digits", image_size, 8)
    d = load_digits()
    train, test = train_test_split(np.arange(len(d.target)), test_size=0.2, stratify=d.target, random_state=0)
    rows = np.sort(train if split == "train" else test)
    pixels = torch.from_numpy(d.images[rows].astype(np.uint8)).unsqueeze(1)  # (N, 1, 8, 8) in 0..16
    return ImageDataset(
        name="digits", split=split, root=None, class_names=[str(k) for k in range(10)], channels=1, image_size=8,
        transform_id="digits-0to16-minus1to1", targets=torch.from_numpy(d.target[rows]), pixels=pixels, pixel_max=16,
    )


# ----------------------------------------------------------------------------- CIFAR-10

_CIFAR_HOW = ("download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extract it "
              "and pass --data-root DIR (the folder holding cifar-10-batches-py/)")
_CIFAR_OFFICIAL = {  # name: (size in bytes, MD5)
    **{f"data_batch_{i}": (31035704, md5) for i, md5 in enumerate([
        "c99cafc152244af753f735de768cd75f", "d4bba439e000b95fd0a9bffe97cbabec", "54ebc095f3ab1f0389bbae665268c751",
        "634d18415352ddfa80567beed471001a", "482c414d41f54cd18b22e5b47cb7c3cb"], start=1)},
    "test_batch": (31035526, "40351d587109b95175f43aff81a1287e"),
    "batches.meta": (158, "5ff9c542aee3614f3951f8cda6e48888"),
}
_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's array-rebuild function, wherever this numpy keeps it
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays and builtins: anything else in the file is refused, never run."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return _PICKLE_ALLOWED[(module, name)]


def _read_cifar_pickle(path: Path) -> Any:
    """Unpickle one CIFAR-10 file safely; official-size files must match the official MD5."""
    size, md5 = _CIFAR_OFFICIAL.get(path.name, (None, None))
    if path.stat().st_size == size and file_hash(path, "md5") != md5:
        raise UserError(f"{path} is corrupt (MD5 mismatch); delete it and re-download cifar-10-python.tar.gz")
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - re-raised with a fix
        raise UserError(f"cannot read {path} as a CIFAR-10 python batch ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]}); {_CIFAR_HOW}") from e


def _load_cifar10(root: str | None, split: str, image_size: int | None) -> ImageDataset:
    _check_native_size("cifar10", image_size, 32)
    if root is None:
        raise UserError(f"cifar10 needs a local copy: {_CIFAR_HOW}")
    folder = Path(root) / "cifar-10-batches-py"
    folder = folder if folder.is_dir() else Path(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in [*names, "batches.meta"] if not (folder / n).is_file()]
    if missing:
        raise UserError(f"CIFAR-10 file(s) {', '.join(missing)} not found in {folder}; {_CIFAR_HOW}")
    batches = [_read_cifar_pickle(folder / n) for n in names]
    meta = _read_cifar_pickle(folder / "batches.meta")
    try:
        data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in batches])
        labels = np.concatenate([np.asarray(b[b"labels"], dtype=np.int64) for b in batches])  # (N,)
        class_names = [n.decode() for n in meta[b"label_names"]]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{folder} does not hold CIFAR-10 python batches ({type(e).__name__}); {_CIFAR_HOW}") from e
    if len(labels) != len(data) or labels.min() < 0 or labels.max() >= len(class_names):
        raise UserError(f"labels in {folder} do not match its images or class names; {_CIFAR_HOW}")
    return ImageDataset(
        name="cifar10", split=split, root=str(root), class_names=class_names, channels=3, image_size=32,
        transform_id="cifar10-raw", targets=torch.from_numpy(labels), pixels=torch.from_numpy(data),  # (N, 3, 32, 32)
    )


# ----------------------------------------------------------------------------- image folders


def _load_imagefolder(root: str | None, split: str, image_size: int | None) -> ImageDataset:
    how = "pass --data-root DIR holding one subfolder of images per class (optionally under DIR/train, DIR/test)"
    if root is None or not Path(root).is_dir():
        raise UserError(f"image folder {root} not found; {how}")
    folder = Path(root) / split
    if not folder.is_dir():
        if any((Path(root) / s).is_dir() for s in SPLITS):
            raise UserError(f"{root} has split folders but no {split}/; add it or pass another split")
        folder = Path(root)
    class_names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[str] = []
    labels: list[int] = []
    for k, c in enumerate(class_names):
        found = sorted(str(p) for p in (folder / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not found:
            raise UserError(f"class folder {folder / c} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            "add some or remove the folder")
        files += found
        labels += [k] * len(found)
    if not files:
        raise UserError(f"no class subfolders with images in {folder}; {how}")
    try:
        with Image.open(files[0]) as im:
            mode, (w, h) = ("L" if im.mode in ("1", "L", "LA") else "RGB"), im.size
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"cannot read image {files[0]} ({type(e).__name__}); fix or remove the file") from e
    if image_size is None:
        if w != h:
            raise UserError(f"images in {folder} are not square ({files[0]} is {w}x{h}); "
                            "pass --image-size N to resize and center-crop them")
        image_size = w
    return ImageDataset(
        name="imagefolder", split=split, root=str(root), class_names=class_names, channels=1 if mode == "L" else 3,
        image_size=image_size, transform_id=f"imagefolder-{mode}-admcrop{image_size}",
        targets=torch.tensor(labels), files=files,
    )


# ----------------------------------------------------------------------------- splits and batches


def forget_retain_split(ds: ImageDataset, forget_class: int) -> tuple[ImageDataset, ImageDataset]:
    """(forget, retain): the images of `forget_class` and all the others."""
    if not 0 <= forget_class < ds.num_classes:
        raise UserError(f"forget class {forget_class} is out of range for {ds.name}; "
                        f"pass a class in 0..{ds.num_classes - 1}")
    forget = ds.targets == forget_class  # (N,)
    return ds.subset(forget.nonzero().squeeze(1)), ds.subset((~forget).nonzero().squeeze(1))


class BatchStream:
    """Endless shuffled GLOBAL batches of exactly `batch_size` items, of which process `rank` of `world` takes the
    contiguous rows [rank·B/world, (rank+1)·B/world); `state_dict` (the batch counter) resumes it bitwise under any
    process count.

    Batch n holds positions n·B … (n+1)·B − 1 of the epochs' permutations laid end to end (a batch that crosses an
    epoch end continues in the next epoch's permutation); epoch e's permutation comes from a generator keyed by
    (seed, name, e). With `hflip`, each image is flipped with probability 1/2, drawn per sample from the batch's
    key and passed to the dataset's `get_batch` (a latent moment set picks its flipped image's encoding,
    `latents.LatentMoments`). `key` is the last batch's `BatchKey`: compute its loss inside
    `global_batch.keyed(stream.key)` and every other per-sample draw is keyed too.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int, hflip: bool = False, *,
                 name: str = "batches", rank: int = 0, world: int = 1) -> None:
        if len(dataset) == 0:
            raise UserError(f"no images to draw batches from in {dataset.name} ({dataset.split}); "
                            "check the data folder and the classes kept")
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}; pass --batch-size N")
        if batch_size % world:
            raise UserError(f"batch size {batch_size} does not split into {world} equal slices, one per process; "
                            f"pass a batch size that {world} divides")
        self.dataset, self.batch_size, self.hflip, self.seed, self.name = dataset, batch_size, hflip, seed, name
        self.lo, self.hi, self.world = rank * batch_size // world, (rank + 1) * batch_size // world, world
        self.batches = 0  # batches drawn so far
        self.key: BatchKey | None = None  # the last batch's
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def epoch(self) -> int:
        """The epoch the next item comes from."""
        return self.batches * self.batch_size // len(self.dataset)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(len(self.dataset),  # (N,)
                                                 generator=keyed_generator(self.seed, self.name, "epoch", epoch))}
        return self._perms[epoch]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows of the next global batch: images (B/world, C, H, W) and labels (B/world,)."""
        n, start = len(self.dataset), self.batches * self.batch_size
        self.key = BatchKey(self.seed, self.name, self.batches, self.batch_size, self.lo, self.hi, self.world)
        positions = torch.arange(start + self.lo, start + self.hi)  # (b,) places in the epochs laid end to end
        items = torch.cat([self._permutation(int(e))[positions[positions // n == e] % n]
                           for e in torch.unique(positions // n)])  # (b,) dataset indices, in batch order
        flip = None
        if self.hflip:
            flip = (torch.rand(self.batch_size, generator=self.key.generator("flip")) < 0.5)[self.lo:self.hi]  # (b,)
        self.batches += 1
        return self.dataset.get_batch(items, flip)  # (b, C, H, W), (b,)

    __next__ = next

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def state_dict(self) -> dict:
        return {"batches": self.batches, "items": len(self.dataset)}

    def load_state_dict(self, d: dict) -> None:
        if d["items"] != len(self.dataset):
            raise UserError(f"the saved batch stream covers {d['items']} images but this dataset has "
                            f"{len(self.dataset)}; resume with the same data settings")
        self.batches = d["batches"]

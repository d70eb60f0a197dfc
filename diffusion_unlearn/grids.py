"""Labelled sample grids (one row per class) and PNG folders named by image index."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw

from diffusion_unlearn.fileio import atomic_path


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (N, C, H, W) → uint8 round((x + 1)/2 · 255), clamped (no per-image stretch): the PNGs
    we write and the images FID reads. uint8 images (e.g. from a sample store) are returned as they are."""
    if images.dtype == torch.uint8:
        return images
    return ((images.float() + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) → float in [-1, 1]: the images a sample store or a PNG holds, as classifiers read them."""
    return images.float() / 255 * 2 - 1


def as_saved(images: torch.Tensor) -> torch.Tensor:
    """Float samples (N, C, H, W) as a PNG or the evaluation's sample store holds them (clamped to [-1, 1] and
    quantised to uint8): a probe that judges these scores what `eval` scores, not values no saved image has."""
    return from_uint8(to_uint8(images))


def _to_pil(img: torch.Tensor) -> Image.Image:
    arr = img.permute(1, 2, 0).numpy()  # (H, W, C)
    return Image.fromarray(arr[..., 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")


def labelled_grid(images: torch.Tensor, row_labels: Sequence[str], per_row: int, *, cell: int = 48,
                  title: str | None = None) -> Image.Image:
    """A grid with one row of `per_row` images per label; small images are upscaled (nearest) to `cell`."""
    imgs = to_uint8(images)
    pad, label_w, title_h = 2, 8 * max(len(s) for s in row_labels) + 12, 18 if title else 0
    width = label_w + per_row * (cell + pad) + pad
    height = title_h + len(row_labels) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill="black")
    for r, label in enumerate(row_labels):
        y0 = title_h + pad + r * (cell + pad)
        draw.text((4, y0 + cell // 2 - 5), label, fill="black")
        for c in range(per_row):
            i = r * per_row + c
            if i < len(imgs):
                tile = _to_pil(imgs[i]).convert("RGB").resize((cell, cell), Image.NEAREST)
                canvas.paste(tile, (label_w + pad + c * (cell + pad), y0))
    return canvas


def save_image_atomic(image: Image.Image, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_png_folder(images: torch.Tensor, folder: str | Path, indices: Sequence[int]) -> None:
    """One PNG per image, named by its index in the sample set (`000042.png`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for img, i in zip(to_uint8(images), indices):
        save_image_atomic(_to_pil(img), folder / f"{int(i):06d}.png")

"""Checks before work (counts are the configs' own validation): readable inputs, a writable output place and enough free disk, each a one-line
`UserError` raised before any model is loaded, so that no run fails after minutes of work on something a glance
at its options could have told."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

from diffusion_unlearn.fileio import UserError, writing


def check_readable_file(path: str | os.PathLike, what: str, fix: str) -> None:
    """`path` is a file this process can read; else `<what> not found: <path> (<fix>)`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path} ({fix})")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(folder: str | os.PathLike, option: str) -> None:
    """Files can be created in `folder` (or, while it does not exist yet, in its nearest existing parent): a
    temporary file is written there and removed."""
    place = _existing_ancestor(Path(folder))
    if not place.is_dir():
        raise UserError(f"{option} {folder}: {place} is a file, not a folder; choose another path")
    with writing(folder):
        fd, tmp = tempfile.mkstemp(prefix=".write-check.", dir=place)
        os.close(fd)
        os.unlink(tmp)


def weights_bytes(model_folder: str | os.PathLike, skip: tuple[str, ...] = ("vae",)) -> int:
    """Bytes of a model folder's denoiser weights (its `*.safetensors` / `*.bin` files outside `skip`)."""
    folder = Path(model_folder)
    files = [p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file()
             and not set(p.relative_to(folder).parts[:-1]) & set(skip)]
    return sum(p.stat().st_size for p in files)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def check_free_space(folder: str | os.PathLike, needed: int, what: str, option: str = "--out") -> None:
    """At least `needed` bytes are free where `folder` is (or will be)."""
    free = shutil.disk_usage(_existing_ancestor(Path(folder))).free
    if free < needed:
        raise UserError(f"{option} {folder}: about {_gb(needed)} needed for {what}, {_gb(free)} free; "
                        f"free some disk space or choose another {option}")


def check_disk_for(folder: str | os.PathLike, model_folder: str | os.PathLike, copies: Mapping[str, float],
                   option: str = "--out") -> None:
    """Free space for `copies` (what → how many copies of the model's weights) written under `folder`: the
    estimate is the model's weight bytes × the total count."""
    needed = int(weights_bytes(model_folder) * sum(copies.values()))
    check_free_space(folder, needed, " + ".join(f"{n:g}× {what}" for what, n in copies.items()) + " of the model's "
                     "weights", option)

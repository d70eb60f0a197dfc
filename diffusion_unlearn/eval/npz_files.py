"""The `.npz` files users bring and expect from this field's tools.

- Sample batches as DiT's `sample_ddp.py` and OpenAI's evaluator (ADM `evaluations/evaluator.py`) read them:
  `arr_0` uint8 (N, H, W, C); we add `arr_1`, the int64 class labels (ADM's class-conditional batches do too).
- Reference statistics: ADM's reference batches (e.g. `VIRTUAL_imagenet256_labeled.npz`, against which DiT's
  FID 2.27 is measured) hold `mu` (D,) and `sigma` (D, D) of TF-Inception pool3 features (beside `arr_0` and
  spatial statistics we do not use). Ours (`diffusion-unlearn fid-stats`) hold the same two keys plus `count`
  and a JSON `record` (extractor, its weights hash, dataset, selection), so either kind reads the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from diffusion_unlearn.fileio import UserError, atomic_path


def write_samples_npz(path: str | Path, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    """uint8 images (N, C, H, W) → `arr_0` (N, H, W, C) [+ `arr_1` labels (N,)], written atomically."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError("write_samples_npz takes uint8 images (N, C, H, W)")
    arrays = {"arr_0": images.permute(0, 2, 3, 1).contiguous().numpy()}
    if labels is not None:
        arrays["arr_1"] = labels.numpy().astype(np.int64)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def read_samples_npz(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`arr_0` (N, H, W, C) uint8 → images (N, C, H, W); `arr_1` labels when present."""
    with _open(path) as data:
        if "arr_0" not in data.files:
            raise UserError(f"{path} holds no `arr_0` sample batch (keys: {', '.join(data.files)})")
        arr = data["arr_0"]
        if arr.dtype != np.uint8 or arr.ndim != 4:
            raise UserError(f"{path}: `arr_0` is {arr.dtype} of shape {arr.shape}; expected uint8 (N, H, W, C)")
        labels = torch.from_numpy(data["arr_1"]).long() if "arr_1" in data.files else None
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), labels


def write_reference_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray, count: int, record: dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64),
                     count=np.int64(count), record=np.array(json.dumps(record, sort_keys=True)))


def read_reference_statistics(path: str | Path, dim: int | None = None) -> tuple[dict, dict]:
    """({"mu", "sigma"} in float64, what the file says of itself) of our `fid-stats` file or an ADM reference
    batch; `dim` checks the feature size against the extractor's."""
    with _open(path) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise UserError(f"{path} holds no FID reference statistics (missing {', '.join(missing)}; keys: "
                            f"{', '.join(data.files)}); pass a `diffusion-unlearn fid-stats` file or an ADM "
                            "reference batch")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise UserError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
        if dim is not None and len(mu) != dim:
            raise UserError(f"{path} holds {len(mu)}-d statistics, the feature extractor gives {dim}-d features; "
                            "use statistics of the same extractor")
        if "record" in data.files:
            about = {"kind": "diffusion-unlearn fid-stats", **json.loads(str(data["record"])),
                     "count": int(data["count"])}
        else:
            about = {"kind": "ADM reference batch (mu/sigma of TF-Inception pool3)",
                     "count": int(len(data["arr_0"])) if "arr_0" in data.files else None}
        return {"mu": mu, "sigma": sigma}, {"path": str(path), **about}


def _open(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable .npz file ({e}); pass the file `np.savez` wrote") from e

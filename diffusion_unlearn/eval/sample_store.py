"""A sample store: generated images in shards on disk, made by any number of processes, the same bytes for all.

A sample set is a *plan*: a label and an image index per image, class-major; each index keeps its own seed
(`image_seed(seed, index)`), so an image never depends on who made it. The plan is cut into shards of a fixed
size; shard s is made by process s mod N, one generation batch per shard, so batch composition (and with it
every float) is the same for 1 and N processes. A shard (`shard-00012.safetensors`) holds uint8 images, labels,
indices and the features computed from them; it is written atomically, so a killed run resumes from its
finished shards. `store.json` records the settings that made the store (model, sampler, plan, feature
extractors); a store made with other settings is refused. See docs/cluster.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from safetensors.torch import load_file, save_file

from diffusion_unlearn.fileio import UserError, atomic_path, read_json, write_json

STORE_FILE = "store.json"
FORMAT = "diffusion-unlearn-sample-store/1"
CLASS_STRIDE = 1_000_000  # image index = class · stride + j: a class's j-th sample never depends on the others


@dataclass(frozen=True)
class SamplePlan:
    """Labels (N,) and seed indices (N,) of a sample set, class-major: `per_class[c]` images of each class."""

    labels: torch.Tensor
    indices: torch.Tensor

    @staticmethod
    def of(per_class: dict[int, int]) -> SamplePlan:
        labels = [c for c, n in per_class.items() for _ in range(n)]
        indices = [c * CLASS_STRIDE + j for c, n in per_class.items() for j in range(n)]
        return SamplePlan(torch.tensor(labels, dtype=torch.long), torch.tensor(indices, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self) -> dict:
        counts = torch.bincount(self.labels).tolist() if len(self) else []
        return {"count": len(self), "per_class": {str(c): n for c, n in enumerate(counts) if n}}


class Processes(Protocol):
    """What the store needs of a process group (accelerate's `PartialState` has it)."""

    process_index: int
    num_processes: int
    is_main_process: bool

    def wait_for_everyone(self) -> None: ...


@dataclass
class OneProcess:
    process_index: int = 0
    num_processes: int = 1
    is_main_process: bool = True

    def wait_for_everyone(self) -> None:
        pass


Generate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (labels, indices) → uint8 images (n, C, H, W)
Features = Callable[[torch.Tensor], dict[str, torch.Tensor]]  # uint8 images → {name: (n, D)}


class SampleStore:
    def __init__(self, root: str | Path, plan: SamplePlan, record: dict, shard_size: int = 500):
        if shard_size < 1:
            raise UserError(f"shard size {shard_size} must be at least 1")
        self.root, self.plan, self.shard_size = Path(root), plan, shard_size
        self.record = {"format": FORMAT, **record, "plan": plan.describe(), "shard_size": shard_size,
                       "plan_sha256": _plan_hash(plan)}

    @property
    def num_shards(self) -> int:
        return (len(self.plan) + self.shard_size - 1) // self.shard_size

    def shard_path(self, s: int) -> Path:
        return self.root / f"shard-{s:05d}.safetensors"

    def open(self, processes: Processes) -> None:
        """Create the store, or check that the one on disk was made with the same settings (one line naming each
        difference otherwise). The main process writes `store.json`; the others wait for it."""
        path = self.root / STORE_FILE
        if path.is_file():
            stored = read_json(path)
            diff = [f"{k}: {stored.get(k)!r} there, {v!r} now" for k, v in self.record.items() if stored.get(k) != v]
            if diff:
                raise UserError(f"the sample store {self.root} was made with other settings ({'; '.join(diff)}); "
                                "pass another --store folder or delete it")
        elif processes.is_main_process:
            write_json(path, self.record)
        processes.wait_for_everyone()

    def fill(self, processes: Processes, generate: Generate, features: Features,
             progress: Callable[[int], None] | None = None) -> int:
        """Make this process's missing shards (s ≡ rank mod N); returns how many images it made. `progress` gets
        the images each finished shard added (called on every process)."""
        made = 0
        for s in range(processes.process_index, self.num_shards, processes.num_processes):
            if self.shard_path(s).is_file():
                continue
            part = slice(s * self.shard_size, (s + 1) * self.shard_size)
            labels, indices = self.plan.labels[part], self.plan.indices[part]  # (n,), (n,)
            images = generate(labels, indices)  # (n, C, H, W) uint8
            if images.dtype != torch.uint8 or len(images) != len(labels):
                raise ValueError("generate must return one uint8 image per plan entry")
            tensors = {"images": images.contiguous(), "labels": labels, "indices": indices,
                       **{f"features.{k}": v.float().contiguous() for k, v in features(images).items()}}
            with atomic_path(self.shard_path(s)) as tmp:
                save_file(tensors, str(tmp))
            made += len(labels)
            if progress is not None:
                progress(len(labels))
        return made

    def finished(self) -> bool:
        return all(self.shard_path(s).is_file() for s in range(self.num_shards))

    def read(self) -> dict[str, torch.Tensor]:
        """All shards in plan order: images, labels, indices and `features.NAME`; checked against the plan."""
        missing = [s for s in range(self.num_shards) if not self.shard_path(s).is_file()]
        if missing:
            raise UserError(f"the sample store {self.root} lacks shards {missing[:5]}; rerun the same command "
                            "to finish it")
        shards = [load_file(self.shard_path(s)) for s in range(self.num_shards)]
        out = {k: torch.cat([sh[k] for sh in shards]) for k in shards[0]}
        if not torch.equal(out["indices"], self.plan.indices) or not torch.equal(out["labels"], self.plan.labels):
            raise UserError(f"the sample store {self.root} does not hold the planned images; delete it and rerun")
        return out


def _plan_hash(plan: SamplePlan) -> str:
    import hashlib

    h = hashlib.sha256(plan.labels.numpy().tobytes())
    h.update(plan.indices.numpy().tobytes())
    return h.hexdigest()


def select(stored: dict[str, torch.Tensor], classes: Sequence[int]) -> dict[str, torch.Tensor]:
    """The entries of a read store whose label is one of `classes`."""
    keep = torch.isin(stored["labels"], torch.as_tensor(list(classes)))
    return {k: v[keep] for k, v in stored.items()}

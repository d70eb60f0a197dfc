"""The `sample` subcommand: labelled grids, PNG folders and `.npz` sample batches from a model folder (or a
`forget` run folder).

The sample set (`--out-dir`, `--npz`) is drawn at the evaluation sampler (`resolve_sampler(..., "eval")`: what
`eval` scores) through a sample store (eval/sample_store.py, in OUT_DIR/store or `--store`): one shard per
generation batch of `sample_batch_size` images, shard s made by process s mod N under `accelerate launch`, each
image seeded by its index, so the images are the same bytes for 1 and N processes (and the same as one process
drawing the whole set in those batches); a killed run resumes from its finished shards. The main process then
writes the PNG folder, `samples.json` and the `.npz`. The grid is drawn by the main process alone at the grid
sampler (taken from the store where the two samplers agree). The drawing itself is the sampling library's
(pipelines/sampling.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from tqdm.auto import tqdm

from diffusion_unlearn.config import SampleConfig, SamplerConfig, protocol_deviations, resolve_device
from diffusion_unlearn.eval.npz_files import write_samples_npz
from diffusion_unlearn.eval.sample_store import Processes, SamplePlan, SampleStore
from diffusion_unlearn.fileio import UserError, write_json
from diffusion_unlearn.grids import labelled_grid, save_image_atomic, save_png_folder, to_uint8
from diffusion_unlearn.modelfolder import LoadedModel, load_model_folder
from diffusion_unlearn.pipelines.sampling import draw_images, generate, parse_classes
from diffusion_unlearn.preflight import check_writable_dir
from diffusion_unlearn.provenance import model_files_identity
from diffusion_unlearn.sampler_defaults import resolve_sampler

STORE_KIND = "sample"


def sample(cfg: SampleConfig) -> dict | None:
    """Write `cfg.grid`, `cfg.out_dir` and/or `cfg.npz`; returns the record of what was drawn (the sample set's
    sampler, else the grid's, at the top level; the grid's under `grid_sampler` when both are written). Every
    process of an `accelerate launch` calls it; the main process writes the outputs and returns the record, the
    others return None."""
    if not (cfg.grid or cfg.out_dir or cfg.npz):
        raise UserError("nothing to write: pass --grid FILE.png, --out-dir DIR and/or --npz FILE.npz")
    for option, folder in (("--out-dir", cfg.out_dir), ("--npz", cfg.npz and Path(cfg.npz).parent),
                           ("--grid", cfg.grid and Path(cfg.grid).parent)):
        if folder:
            check_writable_dir(folder, option)
    # accelerate's CPU processes (gloo) need cpu=True: `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu`
    processes = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or cfg.device == "cpu")
    if not (cfg.out_dir or cfg.npz or processes.is_main_process):
        return None  # the grid is the main process's alone
    device = str(processes.device) if processes.num_processes > 1 else resolve_device(cfg.device)
    loaded = load_model_folder(cfg.model, device)
    classes = parse_classes(cfg.classes, loaded.meta.num_classes)
    purposes = [p for p, wanted in (("eval", cfg.out_dir or cfg.npz), ("grid", cfg.grid)) if wanted]
    samplers = {p: resolve_sampler(cfg.sampler, loaded.meta.backbone, p, device) for p in purposes}
    primary = replace(cfg, sampler=samplers[purposes[0]])
    record = {"model": str(cfg.model), "classes": classes, "per_class": cfg.per_class, "protocol": cfg.protocol,
              "protocol_deviations": protocol_deviations(primary), **primary.sampler.describe(),
              "num_processes": processes.num_processes}
    stored = None
    if "eval" in samplers:
        store = sample_store(store_folder(cfg), loaded, SamplePlan.of({c: cfg.per_class for c in classes}),
                             samplers["eval"])
        fill(store, loaded, samplers["eval"], processes)
        if processes.is_main_process:
            stored = store.read()  # images (N, C, H, W) uint8, labels (N,), indices (N,)
            record["store"] = str(store.root)
    if not processes.is_main_process:
        return None
    if "grid" in samplers:
        if "eval" in samplers:
            record["grid_sampler"] = samplers["grid"].describe()
        same = stored is not None and samplers["grid"] == samplers["eval"]
        images = stored["images"] if same else generate(loaded.pipeline, classes, cfg.per_class, samplers["grid"])[0]
        grid = samplers["grid"]
        title = f"{loaded.path.name}: s={grid.guidance_scale:g}, {grid.sampler} {grid.steps}"
        names = [loaded.meta.class_names[c] for c in classes]
        save_image_atomic(labelled_grid(images, names, cfg.per_class, title=title), cfg.grid)
    if cfg.out_dir:
        save_png_folder(stored["images"], cfg.out_dir, stored["indices"].tolist())
        write_json(f"{cfg.out_dir}/samples.json", {**record, "labels": stored["labels"].tolist(),
                                                    "indices": stored["indices"].tolist()})
    if cfg.npz:
        write_samples_npz(cfg.npz, stored["images"], stored["labels"])
        record["npz"] = str(cfg.npz)
    return record


def store_folder(cfg: SampleConfig) -> Path:
    """`--store`, else OUT_DIR/store, else FILE.store beside `--npz FILE.npz`."""
    if cfg.store:
        return Path(cfg.store)
    return Path(cfg.out_dir) / "store" if cfg.out_dir else Path(cfg.npz).with_suffix(".store")


def sample_store(root: Path, loaded: LoadedModel, plan: SamplePlan, sampler: SamplerConfig) -> SampleStore:
    """The store of `plan` drawn from `loaded` at `sampler`, one shard per generation batch; its record names
    every setting that changes an image (the shard size, i.e. the batch size, is recorded by the store)."""
    record = {"kind": STORE_KIND, "model_backbone": loaded.meta.backbone,
              "model_files_sha256": model_files_identity(loaded.path),
              **{f"sampler.{k}": v for k, v in sampler.describe().items()}}
    return SampleStore(root, plan, record, shard_size=sampler.sample_batch_size)


def fill(store: SampleStore, loaded: LoadedModel, sampler: SamplerConfig, processes: Processes) -> None:
    """Make this process's missing shards, then wait for the others. One bar on the main process counts the
    images in every process's finished shards (read from the store's folder) and shows images/s."""
    store.open(processes)

    def shard_images(labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        images = draw_images(loaded.pipeline, labels, indices.tolist(), sampler,
                             progress=processes.is_main_process)  # (n, C, H, W) in [-1, 1], one batch
        return to_uint8(images)  # (n, C, H, W) uint8

    bar = tqdm(total=len(store.plan), initial=finished_images(store), desc="sample set", unit="img",
               disable=not processes.is_main_process, dynamic_ncols=True)
    store.fill(processes, shard_images, lambda images: {}, lambda _: bar.update(finished_images(store) - bar.n))
    processes.wait_for_everyone()
    bar.update(finished_images(store) - bar.n)
    bar.close()


def finished_images(store: SampleStore) -> int:
    """Images in the store's finished shards, whichever process made them."""
    n = len(store.plan)
    return sum(min(store.shard_size, n - s * store.shard_size) for s in range(store.num_shards)
               if store.shard_path(s).is_file())

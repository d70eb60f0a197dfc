"""`study`: does DualOptim make unlearning better and more stable across forget sets? (paper Section 4, Table 1/3,
Figure 2, Table 14). Runs methods × optimizer setups × forgotten classes × seeds (× forget lrs) from one base
model, each cell evaluated alike, and writes a table, a CSV of every cell and FA/FID-over-iterations plots.

Layout of `--out`: `cells/<cell>/forget/` (the `forget` run, its log holding the curve points),
`cells/<cell>/result.json` (written last: a cell with it is finished and never rerun), `shared/` (masks and SA's
replay/Fisher, which depend on the class and seed but not on the optimizer), `base/` and `retrain/` (the
reference rows), and the outputs `table.md`, `cells.csv`, `summary.json`, `curves.png`, `lr-sensitivity.png`.
Every reused file records the settings that made it (provenance.py): shared files are named by a key of their
settings, and a finished cell or a score made with other settings is refused (`--restart` discards them).

Cells run in this process (`--executor inline`, `--jobs N`: N processes), as submitit local jobs (`local`) or as
one SLURM array task each (`slurm`); job logs go to `jobs/`. Every cell and shared file is made under a claim
(claims.py), so study processes and jobs sharing one `--out` make each once; `cells/<cell>/runs.jsonl` records
who ran a cell. The study process waits until every cell has its `result.json`, making itself those whose claim
went stale, and then writes the outputs. See docs/cluster.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm

from diffusion_unlearn.claims import is_stale, owner, read_claim, release, try_claim
from diffusion_unlearn.config import (CONFIG_DIR, ForgetConfig, MaskSettings, PretrainConfig, RelearnConfig,
                                      SamplerConfig, StudyConfig, build_config, preset_path, resolve_device,
                                      yaml_values)
from diffusion_unlearn.data import ImageDataset, forget_retain_split
from diffusion_unlearn.eval.classifier import FAClassifier, check_classifier_classes, load_classifier
from diffusion_unlearn.eval.evaluate import fid_extractor_kind, sample_metrics
from diffusion_unlearn.eval.ood import OODCalibration, calibration_for, calibration_sets
from diffusion_unlearn.eval.fid import find_inception_weights
from diffusion_unlearn.eval.study_report import censored_steps, write_study_outputs
from diffusion_unlearn.fileio import UserError, append_jsonl, read_json, write_json
from diffusion_unlearn.methods import METHODS, build_method
from diffusion_unlearn.modelfolder import LoadedModel, load_model_and_data, load_model_folder
from diffusion_unlearn.pipelines.sampling import Pipeline, parse_classes
from diffusion_unlearn.preflight import check_writable_dir
from diffusion_unlearn.pretrain import pretrain
from diffusion_unlearn.provenance import (NO_EFFECT, Provenance, check_reuse, model_files_identity, settings_of,
                                          short_key)
from diffusion_unlearn.relearn import parse_shots, relearn, variant_record
from diffusion_unlearn.saliency import compute_mask, mask_description, mask_metadata, save_mask
from diffusion_unlearn.sampler_defaults import resolve_sampler
from diffusion_unlearn.stopping import STOPPING_FILE
from diffusion_unlearn.unlearn import OutputPaths, Probe, forget, mask_record, run_record

OPTIM_SETUPS = ("dual", "shared")
# StudyConfig settings that choose which cells and baselines exist; each cell records its own coordinates
GRID_SETTINGS = frozenset({"methods", "optims", "classes", "seeds", "forget_lrs", "retrain_dir", "train_retrain",
                           "retrain_preset"})
# StudyConfig settings that choose where and how cells run, never what they compute
CLUSTER_SETTINGS = frozenset({"executor", "partition", "gpus_per_cell", "cpus_per_cell", "time_limit",
                              "array_parallelism"})
# StudyConfig settings that a cell records through its forget run's settings (the stop settings, passed to every
# cell with --until-forgotten) or only when relearning (the `relearn` section): left out of the study's own record,
# so that the records of studies without them stay as they were
STOP_SETTINGS = frozenset({"until_forgotten", "target_fa", "probe_every", "probe_samples", "max_iterations"})
RELEARN_SECTION = "relearn."
STUDY_FOLDERS = ("cells", "shared", "base", "retrain-scores", "relearn-refs")  # what --restart discards
POLL_SECONDS = 2.0  # how often a waiting study process looks for finished cells


@dataclass(frozen=True)
class Cell:
    method: str
    optim: str
    forget_class: int
    seed: int
    forget_lr: float | None = None  # None: the preset's

    @property
    def name(self) -> str:
        lr = "" if self.forget_lr is None else f"-lr{self.forget_lr:g}"
        return f"{self.method}-{self.optim}-c{self.forget_class}-s{self.seed}{lr}"


def _split_list(spec: str, what: str, cast=str) -> list:
    try:
        items = [cast(x.strip()) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"cannot read --{what} {spec!r}; give a comma-separated list") from None
    return items


def iterations_per_method(spec: str, methods: list[str]) -> dict[str, int]:
    """`--iterations`: '' (presets), '150' (all methods) or 'sfron=150,sa=300'."""
    if not spec.strip():
        return {}
    if "=" not in spec:
        return dict.fromkeys(methods, _split_list(spec, "iterations", int)[0])
    out = {}
    for part in _split_list(spec, "iterations"):
        name, _, value = part.partition("=")
        if name not in methods or not value.isdigit():
            raise UserError(f"--iterations {spec!r}: {part!r} is not METHOD=N for a method in {', '.join(methods)}")
        out[name] = int(value)
    return out


def plan_cells(cfg: StudyConfig, num_classes: int) -> list[Cell]:
    """The grid, class-major so that a killed study leaves whole classes done; checked before any work."""
    methods = _split_list(cfg.methods, "methods")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods {cfg.methods!r}: unknown {unknown or 'empty'}; choose from {', '.join(METHODS)}")
    optims = _split_list(cfg.optims, "optims")
    if not optims or any(o not in OPTIM_SETUPS for o in optims):
        raise UserError(f"--optims {cfg.optims!r}: choose from {', '.join(OPTIM_SETUPS)}")
    seeds = _split_list(cfg.seeds, "seeds", int)
    lrs = _split_list(cfg.forget_lrs, "forget-lrs", float) or [None]
    classes = parse_classes(cfg.classes, num_classes)
    return [Cell(m, o, c, s, lr) for s in seeds for c in classes for m in methods for lr in lrs for o in optims]


def method_preset(prefix: str, method: str, optim: str) -> Path | None:
    """`<prefix><method>-<optim>.yaml`, else `<prefix><method>.yaml`, among the named presets (configs/) or as a
    path (a folder of one's own presets): a method whose dual variant differs from its published form beyond the
    optimizer (SA) has a preset per setup."""
    for name in (f"{prefix}{method}-{optim}.yaml", f"{prefix}{method}.yaml"):
        for path in (CONFIG_DIR / name, Path(name)):
            if path.is_file():
                return path
    return None


def sampler_overrides(sampler: SamplerConfig) -> dict:
    """The study's sampler fields that a cell's runs take over their preset's: those not at the SamplerConfig
    defaults (field by field; the rest stay the preset's)."""
    unset = SamplerConfig()
    return {f.name: getattr(sampler, f.name) for f in dataclasses.fields(SamplerConfig)
            if getattr(sampler, f.name) != getattr(unset, f.name)}


def forget_config(cfg: StudyConfig, cell: Cell, out: Path) -> ForgetConfig:
    """A cell's `forget` settings: the method's preset for the cell's optimizer setup (`method_preset`), then the
    study's overrides. `dual`: alternate forget/retain steps with two optimizers; `shared`: one optimizer on the preset's
    schedule (the method as published). A forget-lr sweep sets the forget lr (dual) or the one lr (shared)."""
    path = method_preset(cfg.preset_prefix, cell.method, cell.optim)
    preset = yaml_values(ForgetConfig, path) if path is not None else {}
    values = {"method": cell.method, "model": cfg.model, "dataset": cfg.dataset, "data_root": cfg.data_root,
              "forget_class": cell.forget_class, "seed": cell.seed, "out": str(out), "optim": cell.optim,
              "device": cfg.device, "sampler": sampler_overrides(cfg.sampler)}
    if cell.optim == "dual":
        values["schedule"] = "alternate"
    if cfg.batch_size is not None:
        values["batch_size"] = cfg.batch_size
    if cfg.until_forgotten:  # the cap replaces the presets' iteration counts (ForgetConfig.planned_iterations)
        values |= {"until_forgotten": True, "classifier": cfg.classifier,
                   **{k: getattr(cfg, k) for k in STOP_SETTINGS - {"until_forgotten"} if getattr(cfg, k) is not None}}
    iterations = iterations_per_method(cfg.iterations, _split_list(cfg.methods, "methods"))
    if cell.method in iterations:
        values["iterations"] = iterations[cell.method]
    if cell.forget_lr is not None:
        values["forget_lr" if cell.optim == "dual" else "retain_lr"] = cell.forget_lr
    forget_cfg = build_config(ForgetConfig, preset, values)
    forget_cfg.checkpoint_every = max(1, min(forget_cfg.checkpoint_every, cfg.curve_every))
    return forget_cfg


# ----------------------------------------------------------------------------- evaluation


@dataclass
class Evaluator:
    """The study's one way to score weights: final (`fa_samples`, `retain_samples_per_class`) or curve counts;
    `cfg.sampler` is resolved for the model (_evaluator)."""

    cfg: StudyConfig
    dataset: ImageDataset
    classifier: FAClassifier
    ood: OODCalibration | None = None  # the classifier's in-distribution test (fa_in_distribution, ood_rate)

    def __call__(self, pipeline: Pipeline, forget_class: int, curve: bool = False) -> dict:
        cfg = self.cfg
        fa_n, retain_n = ((cfg.curve_fa_samples, cfg.curve_retain_per_class) if curve
                          else (cfg.fa_samples, cfg.retain_samples_per_class))
        scores = sample_metrics(pipeline, self.dataset, self.classifier, forget_class, fa_n, retain_n, cfg.sampler,
                                fid_extractor=fid_extractor_kind(cfg, self.dataset.channels),
                                reference_count=cfg.fid_reference_count, cache_dir=cfg.cache_dir,
                                inception_weights=cfg.fid_weights, device=resolve_device(cfg.device),
                                fid_protocol=cfg.fid_protocol, ood=self.ood, progress=False)
        return {k: scores.get(k) for k in ("fa", "fa_in_distribution", "ood_rate", "retain_accuracy", "fid",
                                           "forget_fid", "forget_mean_prob", "fid_reference_count",
                                           "fid_feature_extractor")}


def _evaluator(cfg: StudyConfig, dataset: ImageDataset, backbone: str) -> Evaluator:
    resolved = replace(cfg, sampler=resolve_sampler(cfg.sampler, backbone, "eval", resolve_device(cfg.device)))
    classifier = load_classifier(cfg.classifier, resolve_device(cfg.device))
    return Evaluator(resolved, dataset, classifier, calibration_for(classifier, *calibration_sets(classifier, dataset)))


def study_record(cfg: StudyConfig, kind: str, **extra) -> Provenance:
    """What a study's scores depend on: every study setting except the grid's coordinates and where cells run
    (so a study started inline may finish on a cluster), the base model's identity, and `extra`."""
    settings = {k: v for k, v in settings_of(cfg, NO_EFFECT | GRID_SETTINGS | CLUSTER_SETTINGS | STOP_SETTINGS).items()
                if not k.startswith(RELEARN_SECTION)}
    return Provenance(kind, {**settings, "base_model_files": model_files_identity(cfg.model), **extra})


# ----------------------------------------------------------------------------- relearning


def relearn_settings(cfg: StudyConfig) -> dict:
    """The `relearn` section's fields that are set (the others take RelearnConfig's defaults); {} without --relearn."""
    if not cfg.relearn.shots.strip():
        return {}
    return {k: v for k, v in dataclasses.asdict(cfg.relearn).items() if v is not None}


def relearn_config(cfg: StudyConfig, model: Path, forget_class: int, seed: int, out: Path) -> RelearnConfig:
    """`relearn` of `model` for a cell or a reference row: the study's relearn settings, classifier and evaluation
    sampler (pass the evaluator's `cfg`, whose sampler is resolved as `relearn` resolves it and records it), the
    cell's seed (which K images, the fine-tuning's draws)."""
    return build_config(RelearnConfig, {
        "model": str(model), "dataset": cfg.dataset, "data_root": cfg.data_root, "forget_class": forget_class,
        "classifier": cfg.classifier, "out": str(out), "seed": seed, "device": cfg.device,
        "sampler": dataclasses.asdict(cfg.sampler), **relearn_settings(cfg)})


def relearn_columns(variants: list[dict], max_steps: int) -> dict:
    """A relearn run's per-K outcome as result columns: `steps_to_relearn_k<K>` (censored: "not within N" counts
    as N + 1, `relearned_k<K>` false; eval/study_report.censored_steps), `steps_to_relearn` ({K: steps}) and the
    curves under `relearn`."""
    out: dict = {"steps_to_relearn": {}, "relearn": []}
    for v in variants:
        steps, relearned = censored_steps(v["steps_to_relearn"], max_steps)
        k = v["shots"]
        out |= {f"steps_to_relearn_k{k}": steps, f"relearned_k{k}": relearned}
        out["steps_to_relearn"][str(k)] = steps
        out["relearn"].append({"shots": k, "steps_to_relearn": steps, "relearned": relearned, "curve": v["curve"]})
    return out


def relearn_protocol(rcfg: RelearnConfig) -> str:
    """The table's protocol line of the study's relearning."""
    return (f"relearning: K = {rcfg.shots} forgotten-class images (0: retained classes only), fine-tuned for up "
            f"to N = {rcfg.max_steps} steps (lr {rcfg.lr:g}, batch {rcfg.batch_size}), probes of "
            f"{rcfg.probe_samples} samples every {rcfg.probe_every} steps; steps to relearn: the first probe with "
            f"fa_in_distribution ≥ {rcfg.relearned_at:g}, \"not within N\" counted as N + 1 (censored); the "
            "retrain and base rows relearn alike, per class and seed")


def finished_relearn(rcfg: RelearnConfig) -> list[dict] | None:
    """The finished variants of a relearn run (each refused when made with other settings), or None when one is
    missing."""
    variants = []
    for k in parse_shots(rcfg.shots):
        path = Path(rcfg.out) / f"k{k}" / "result.json"
        if not path.is_file():
            return None
        saved = read_json(path)
        check_reuse(Provenance.from_dict(saved.get("provenance")), variant_record(rcfg, k), path)
        variants.append(saved)
    return variants


def reference_relearn(cfg: StudyConfig, references: dict[str, dict[int, Path]], pairs: list[tuple[int, int]],
                      root: Path) -> dict[str, dict[tuple[int, int], dict]]:
    """Relearn rows of the reference models (`references`: name → class → model folder) for each (class, seed)
    of the cells, each made once across study processes: name → (class, seed) → relearn columns."""
    runs = {(name, c, s): relearn_config(cfg, models[c], c, s, root / "relearn-refs" / f"{name}-c{c}-s{s}")
            for name, models in references.items() for c, s in pairs if c in models}
    units = [Work(Path(r.out), lambda r=r: finished_relearn(r) is not None, lambda r=r: relearn(r))
             for r in runs.values()]
    for work in tqdm(units, desc="study: relearning the references", disable=not units):
        run_claimed(work, claim_time_limit(cfg))
    wait_for(units, claim_time_limit(cfg))
    out: dict[str, dict[tuple[int, int], dict]] = {name: {} for name in references}
    for (name, c, s), r in runs.items():
        out[name][(c, s)] = relearn_columns(finished_relearn(r), r.max_steps)
    return out


def reused_json(path: Path, record: Provenance) -> dict | None:
    """The JSON at `path` when it exists and records `record` (else a one-line UserError); None when absent."""
    if not path.exists():
        return None
    saved = read_json(path)
    check_reuse(Provenance.from_dict(saved.get("provenance") if isinstance(saved, dict) else None), record, path)
    return saved


def reference_scores(evaluator: Evaluator, model: Path, forget_class: int, out: Path) -> dict:
    """Final and curve-count scores of a fixed model (the base model, a retrain baseline), cached in `out` with the
    settings that made them."""
    record = study_record(evaluator.cfg, "study-scores", model=str(model), model_files=model_files_identity(model),
                          forget_class=forget_class)
    saved = reused_json(out, record)
    if saved is None:
        pipeline = load_model_folder(model, resolve_device(evaluator.cfg.device)).pipeline
        saved = {"model": str(model), "forget_class": forget_class, **evaluator(pipeline, forget_class),
                 "curve": evaluator(pipeline, forget_class, curve=True), "provenance": record.to_dict()}
        write_json(out, saved)
    return saved


# ----------------------------------------------------------------------------- claimed work


class Work(NamedTuple):
    """A unit of work made once across processes: `make()` under a claim on `folder` until `done()`."""

    folder: Path
    done: Callable[[], bool]
    make: Callable[[], object]


def run_claimed(work: Work, stale_after: float | None) -> bool:
    """Make `work` when it is not done and no live process holds its claim; True when this process made it.
    The claim is released afterwards, also when `make` fails (the next process retries it)."""
    if work.done():
        return False
    claim = try_claim(work.folder, stale_after)
    if claim is None:
        return False
    try:
        if work.done():  # finished between our look and our claim
            return False
        work.make()
        return True
    finally:
        release(work.folder, claim)


def wait_for(units: list[Work], stale_after: float | None, jobs: tuple = (), bar: tqdm | None = None) -> None:
    """Poll until every unit is done. A unit whose claim went stale (its process or job died) is made here, and so
    is an unclaimed one once none of our `jobs` is left to take it; a failed job's error is raised."""
    while True:
        left = [w for w in units if not w.done()]
        if bar is not None:
            bar.update(len(units) - len(left) - bar.n)
        if not left:
            return
        for job in jobs:
            if job.done():
                job.result()  # raises the job's error (its log is in the job folder)
        running = any(not job.done() for job in jobs)
        for work in left:
            held = read_claim(work.folder)
            if (held is None and not running) or (held is not None and is_stale(held, stale_after)):
                run_claimed(work, stale_after)
        if any(not w.done() for w in left):
            time.sleep(POLL_SECONDS)


def claim_time_limit(cfg: StudyConfig) -> float | None:
    """When a claim is stale besides its process being gone on this host: on SLURM, past the job's time limit
    (the job has been killed by then); elsewhere only when its process is gone."""
    return 60.0 * cfg.time_limit if cfg.executor == "slurm" else None


# ----------------------------------------------------------------------------- cells


@dataclass
class SharedArtifacts:
    """What a cell shares with the other cells of its class and seed, made once before the cells run: its
    saliency mask file (SFRon, SalUn; `mask` and `mask_kind` say how) or the files its method declares in
    `Method.artefacts` (SA's replay and Fisher: all classes, the base model's), which the cell's run folder
    links."""

    files: list[Path]
    mask: MaskSettings | None = None
    mask_kind: str | None = None
    mask_record: Provenance | None = None

    @property
    def ready(self) -> bool:
        """All files exist; a mask also records these settings (SA's files are checked by SA when reused)."""
        if not all(p.exists() for p in self.files):
            return False
        if self.mask_record is not None:
            check_reuse(Provenance.from_dict(mask_metadata(self.files[0]).get("provenance")), self.mask_record,
                        self.files[0])
        return True


def shared_artifacts(cfg: StudyConfig, cell: Cell, root: Path) -> SharedArtifacts | None:
    """A cell's shared files, named by a key of the settings they depend on (a changed preset makes new ones)."""
    fc = forget_config(cfg, cell, root / "unused")
    method = build_method(fc)
    if method.artefacts:
        folder = root / "shared" / f"{cell.method}-s{cell.seed}-{short_key(method.artefact_settings())}"
        return SharedArtifacts([folder / name for name in method.artefacts])
    kind = method.mask_kind
    if kind is None:
        return None
    record = mask_record(fc)
    path = root / "shared" / f"mask-{kind}-c{cell.forget_class}-s{cell.seed}-{short_key(record.settings)}.safetensors"
    return SharedArtifacts([path], fc.mask, kind, record)


def prepare_shared(cfg: StudyConfig, cells: list[Cell], root: Path, loaded: LoadedModel, dataset: ImageDataset) -> None:
    """Make the shared files the unfinished cells need, each once across study processes (claimed in
    `shared/.claims/`); waits for those another process is making."""
    todo: dict[Path, tuple[Cell, SharedArtifacts]] = {}
    for cell in cells:
        if not (root / "cells" / cell.name / "result.json").exists():
            art = shared_artifacts(cfg, cell, root)
            if art is not None and not art.ready:
                todo.setdefault(art.files[0], (cell, art))
    claims = root / "shared" / ".claims"  # one claim folder per shared file, named by its path under shared/
    units = [Work(claims / "--".join(first.relative_to(root / "shared").parts), lambda art=art: art.ready,
                  lambda cell=cell, art=art: make_shared(cfg, cell, art, loaded, dataset))
             for first, (cell, art) in todo.items()]
    bar = tqdm(total=len(units), desc="study: masks and SA replay", disable=not units)
    for work in units:
        run_claimed(work, claim_time_limit(cfg))
        bar.update(1)
    wait_for(units, claim_time_limit(cfg))
    bar.close()


def make_shared(cfg: StudyConfig, cell: Cell, art: SharedArtifacts, loaded: LoadedModel, dataset: ImageDataset
                ) -> None:
    """A mask (SFRon, SalUn) or the files of `Method.prepare` (SA's replay and Fisher) for `cell`'s class and seed."""
    torch.manual_seed(cell.seed)
    forget_set, retain_set = forget_retain_split(dataset, cell.forget_class)
    if art.mask is not None:
        mask = compute_mask(loaded.backbone(), forget_set, retain_set, art.mask, art.mask_kind, cell.seed)
        save_mask(art.files[0], mask, {**mask_description(art.mask, art.mask_kind, cell.forget_class),
                                       "model": str(cfg.model), "provenance": art.mask_record.to_dict()})
    else:
        folder = art.files[0].parent
        folder.mkdir(parents=True, exist_ok=True)
        fc = forget_config(cfg, cell, folder)
        fc = replace(fc, sampler=resolve_sampler(fc.sampler, loaded.meta.backbone, "grid",  # as `forget` does
                                                 resolve_device(cfg.device)))
        build_method(fc).prepare(loaded.backbone(), forget_set, retain_set, folder)


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def cell_folder(cfg: StudyConfig, cell: Cell) -> Path:
    return Path(cfg.out) / "cells" / cell.name


def cell_record(cfg: StudyConfig, cell: Cell, relearning: bool = True) -> Provenance:
    """What a cell's result was made with: the study's record, its forget run's settings and, when `relearning`,
    the study's relearn settings."""
    fc = forget_config(cfg, cell, cell_folder(cfg, cell) / "forget")
    return study_record(cfg, "study-cell", **{f"forget.{k}": v for k, v in run_record(fc).settings.items()},
                        **{f"{RELEARN_SECTION}{k}": v for k, v in relearn_settings(cfg).items() if relearning})


def result_before_relearning(cfg: StudyConfig, cell: Cell) -> dict | None:
    """With --relearn: the cell's `result.json` when an earlier sitting finished it without relearning, with the
    same settings otherwise (the cell then only relearns); else None."""
    path = cell_folder(cfg, cell) / "result.json"
    if not relearn_settings(cfg) or not path.exists():
        return None
    saved = read_json(path)
    try:
        check_reuse(Provenance.from_dict(saved.get("provenance")), cell_record(cfg, cell, relearning=False), path)
    except UserError:
        return None
    return saved


def cell_done(cfg: StudyConfig, cell: Cell) -> bool:
    """The cell has its `result.json`, relearning included when the study relearns."""
    path = cell_folder(cfg, cell) / "result.json"
    return path.exists() and (not relearn_settings(cfg) or "steps_to_relearn" in read_json(path))


def cell_result(cfg: StudyConfig, cell: Cell) -> dict | None:
    """A finished cell's `result.json` (refused when made with other settings); None when not finished, or when
    it still has to relearn (result_before_relearning)."""
    if result_before_relearning(cfg, cell) is not None:
        return None
    return reused_json(cell_folder(cfg, cell) / "result.json", cell_record(cfg, cell))


def cell_work(cfg: StudyConfig, cell: Cell, evaluator: Evaluator) -> Work:
    return Work(cell_folder(cfg, cell), lambda: cell_done(cfg, cell), lambda: run_cell(cfg, cell, evaluator))


def stopping_columns(run_folder: Path) -> dict:
    """An --until-forgotten run's outcome as result columns: `iterations_to_forget` (the stop iteration; the cap
    when not forgotten), `forgotten`, and the stop probes' curve (`stop_curve`)."""
    summary = read_json(run_folder / STOPPING_FILE)
    return {"iterations_to_forget": summary["stop_iteration"], "forgotten": summary["forgotten"],
            **{k: summary[k] for k in ("target_fa", "probe_every", "max_iterations")}, "stop_curve": summary["curve"]}


def run_cell(cfg: StudyConfig, cell: Cell, evaluator: Evaluator) -> dict:
    """One cell: `forget` with a curve probe (until forgotten, with --until-forgotten), the final evaluation, and
    with --relearn the relearning of its model (`relearn/`; only this when an earlier sitting finished the cell
    without relearning); `result.json` last. Each run appends who made it (host, pid, SLURM job id) to
    `runs.jsonl`."""
    folder = cell_folder(cfg, cell)
    paths = OutputPaths(folder / "forget")
    record = cell_record(cfg, cell)
    result = result_before_relearning(cfg, cell)
    if result is None:
        finished = reused_json(folder / "result.json", record)
        if finished is not None:
            return finished
    append_jsonl(folder / "runs.jsonl", {k: v for k, v in owner().items() if k != "token"})
    if result is None:
        result = forget_and_score(cfg, cell, evaluator)
    if relearn_settings(cfg):
        rcfg = relearn_config(evaluator.cfg, paths.model, cell.forget_class, cell.seed, folder / "relearn")
        started = time.perf_counter()
        result |= {**relearn_columns(relearn(rcfg)["variants"], rcfg.max_steps),
                   "seconds_relearn": time.perf_counter() - started}
    result["provenance"] = record.to_dict()
    write_json(folder / "result.json", result)
    return result


def forget_and_score(cfg: StudyConfig, cell: Cell, evaluator: Evaluator) -> dict:
    """A cell's forget run (reused when finished with the cell's settings) and final scores: its result columns
    without relearning and provenance."""
    root = Path(cfg.out)
    folder = cell_folder(cfg, cell)
    paths = OutputPaths(folder / "forget")
    fc = forget_config(cfg, cell, paths.root)
    art = shared_artifacts(cfg, cell, root)
    if art is not None and art.mask is not None:
        fc = replace(fc, mask=replace(fc.mask, file=str(art.files[0])))
    elif art is not None:
        for src in art.files:
            _link_or_copy(src, paths.root / src.name)
    started = time.perf_counter()
    if not paths.model.exists() or paths.state.exists():
        probe = Probe(cfg.curve_every, lambda pipeline: evaluator(pipeline, cell.forget_class, curve=True))
        forget(fc, probe=probe)
    else:  # a finished run whose result was not written yet: reused when made with the cell's settings
        made = read_json(paths.model / "diffusion_unlearn.json").get("history", [{}])[-1].get("provenance")
        check_reuse(Provenance.from_dict(made), run_record(fc), paths.model)
    seconds_forget = time.perf_counter() - started
    pipeline = load_model_folder(paths.model, resolve_device(cfg.device)).pipeline
    scores = evaluator(pipeline, cell.forget_class)
    curve = [{"iteration": r["iteration"] + 1, **{k: r[k] for k in ("fa", "retain_accuracy", "fid")}}
             for r in map(json.loads, paths.log.read_text().splitlines()) if "fa" in r]
    extra = stopping_columns(paths.root) if fc.until_forgotten else {}
    return {**dataclasses.asdict(cell), "cell": cell.name, "schedule": fc.schedule, "iterations": fc.iterations,
            "batch_size": fc.batch_size, "forget_lr_used": fc.forget_optimizer.lr,
            "retain_lr_used": fc.retain_optimizer.lr,
            **scores, "curve": curve, **extra, "seconds_forget": seconds_forget,
            "seconds_total": time.perf_counter() - started}


_WORKER: dict[str, Evaluator] = {}  # an inline `--jobs` worker process's evaluator, built once


def _start_worker(cfg: StudyConfig, threads: int) -> None:
    torch.set_num_threads(threads)
    loaded, dataset = load_model_and_data(cfg.model, cfg.dataset, cfg.data_root, 0)
    _WORKER["evaluator"] = _evaluator(cfg, dataset, loaded.meta.backbone)


def _run_cell_in_worker(cfg: StudyConfig, cell: Cell) -> bool:
    return run_claimed(cell_work(cfg, cell, _WORKER["evaluator"]), claim_time_limit(cfg))


def cells_job(cfg: StudyConfig, cells: list[Cell], threads: int | None = None) -> list[str]:
    """A submitit job (local or SLURM): runs, in this process, each of `cells` that is not finished and not
    claimed by a live process; returns the names of those it ran."""
    if threads is not None:
        torch.set_num_threads(threads)
    loaded, dataset = load_model_and_data(cfg.model, cfg.dataset, cfg.data_root, 0)
    evaluator = _evaluator(cfg, dataset, loaded.meta.backbone)
    return [cell.name for cell in cells if run_claimed(cell_work(cfg, cell, evaluator), claim_time_limit(cfg))]


# ----------------------------------------------------------------------------- executors


def slurm_parameters(cfg: StudyConfig) -> dict:
    """submitit AutoExecutor parameters of a SLURM cell: one task on one node with `--gpus-per-cell` GPUs."""
    params = {"name": "diffusion-unlearn-study", "timeout_min": cfg.time_limit, "nodes": 1, "tasks_per_node": 1,
              "gpus_per_node": cfg.gpus_per_cell, "slurm_array_parallelism": cfg.array_parallelism}
    if cfg.partition:
        params["slurm_partition"] = cfg.partition
    if cfg.cpus_per_cell is not None:
        params["cpus_per_task"] = cfg.cpus_per_cell
    return params


def submit_cells(cfg: StudyConfig, cells: list[Cell]) -> tuple:
    """Submit the unfinished `cells`: local, `--jobs` submitit jobs that each work through all of them (claims
    split them); slurm, a job array of one task per cell. Job logs and pickles go to `<out>/jobs/`."""
    import submitit

    folder = Path(cfg.out) / "jobs"
    if cfg.executor == "slurm":
        try:
            executor = submitit.AutoExecutor(folder, cluster="slurm")
        except RuntimeError:
            raise UserError("--executor slurm needs SLURM (srun/sbatch) on this machine: run the study on the "
                            "cluster's login node, or use --executor local here") from None
        executor.update_parameters(**slurm_parameters(cfg))
        return tuple(executor.map_array(cells_job, [cfg] * len(cells), [[cell] for cell in cells]))
    executor = submitit.LocalExecutor(folder)
    gpus = min(cfg.gpus_per_cell, torch.cuda.device_count())
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    jobs = []
    for i in range(min(cfg.jobs, len(cells))):
        visible = [(i * gpus + k) % max(1, torch.cuda.device_count()) for k in range(gpus)]  # job i: its own GPUs
        executor.update_parameters(timeout_min=cfg.time_limit, gpus_per_node=gpus, visible_gpus=visible)
        jobs.append(executor.submit(cells_job, cfg, cells, threads))
    return tuple(jobs)


def run_inline(cfg: StudyConfig, cells: list[Cell], evaluator: Evaluator, bar: tqdm) -> None:
    """Run the cells in this process (`--jobs N`: in N processes with cores/N threads each), skipping those
    another process has claimed."""
    if cfg.jobs == 1:
        for cell in cells:
            bar.set_postfix_str(cell.name)
            run_claimed(cell_work(cfg, cell, evaluator), claim_time_limit(cfg))
            bar.update(1)
        return
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    with ProcessPoolExecutor(cfg.jobs, mp_context=get_context("spawn"), initializer=_start_worker,
                             initargs=(cfg, threads)) as pool:
        for _ in pool.map(_run_cell_in_worker, [cfg] * len(cells), cells):
            bar.update(1)


# ----------------------------------------------------------------------------- references


def retrain_models(cfg: StudyConfig, classes: list[int], root: Path) -> dict[int, Path]:
    """Retrain baselines by forgotten class: from `--retrain-dir` (model folders whose metadata excludes exactly
    that class) and, with `--train-retrain`, trained for the classes still missing."""
    found: dict[int, Path] = {}
    if cfg.retrain_dir is not None:
        folder = Path(cfg.retrain_dir)
        if not folder.is_dir():
            raise UserError(f"--retrain-dir {folder} is not a folder; pass a folder of retrain model folders")
        for sub in sorted(p for p in folder.iterdir() if (p / "diffusion_unlearn.json").is_file()):
            excluded = read_json(sub / "diffusion_unlearn.json").get("excluded_classes", [])
            if len(excluded) == 1:
                found.setdefault(excluded[0], sub)
    missing = [c for c in classes if c not in found]
    if missing and cfg.train_retrain:
        for c in missing:
            out = root / "retrain" / f"class-{c}"
            values = yaml_values(PretrainConfig, preset_path(cfg.retrain_preset))
            pretrain(build_config(PretrainConfig, {**values, "dataset": cfg.dataset, "data_root": cfg.data_root,
                                                   "exclude_class": c, "out": str(out), "device": cfg.device}))
            found[c] = out
    elif missing and cfg.retrain_dir is not None:
        raise UserError(f"--retrain-dir {cfg.retrain_dir} has no retrain model for classes {missing} (model folders "
                        "whose diffusion_unlearn.json excludes exactly that class); add them or pass --train-retrain")
    return found


# ----------------------------------------------------------------------------- the subcommand


def check_inputs(cfg: StudyConfig) -> tuple[StudyConfig, list[Cell], LoadedModel, ImageDataset]:
    """The study's config, its cells, the base model and the dataset as the model sees it; fails before any work.
    The sampler stays as given: the evaluation resolves it for the model (_evaluator), the cells' runs take the
    fields set over their presets' (sampler_overrides)."""
    if not cfg.model:
        raise UserError("--model is required: the base model folder to unlearn from (e.g. the demo's "
                        ".cache/diffusion-unlearn/digits-base-seed0)")
    if not cfg.classifier:
        raise UserError("--classifier is required: an FA classifier folder (`train-classifier`, or the demo's "
                        ".cache/diffusion-unlearn/digits-classifier)")
    check_writable_dir(cfg.out, "--out")
    loaded, dataset = load_model_and_data(cfg.model, cfg.dataset, cfg.data_root, 0, resolve_device(cfg.device))
    check_classifier_classes(load_classifier(cfg.classifier), loaded.meta.class_names)
    if fid_extractor_kind(cfg, dataset.channels) == "inception":
        find_inception_weights(cfg.fid_weights)
    if cfg.executor == "slurm" and cfg.jobs != 1:
        raise UserError("--jobs counts cells at once on this machine; with --executor slurm set "
                        "--array-parallelism instead")
    cells = plan_cells(cfg, dataset.num_classes)
    if relearn_settings(cfg):
        parse_shots(cfg.relearn.shots)  # a bad K list fails now
    for cell in {replace(c, forget_class=0, seed=0) for c in cells}:
        forget_config(cfg, cell, Path(cfg.out) / "check")  # unknown preset keys etc. fail now
    return cfg, cells, loaded, dataset


def study(cfg: StudyConfig) -> dict:
    started = time.perf_counter()
    cfg, cells, loaded, dataset = check_inputs(cfg)
    root = Path(cfg.out)
    if cfg.restart:
        for name in STUDY_FOLDERS:
            shutil.rmtree(root / name, ignore_errors=True)
    for cell in cells:
        cell_result(cfg, cell)  # a finished cell made with other settings is refused before any work
    root.mkdir(parents=True, exist_ok=True)
    classes = sorted({c.forget_class for c in cells})
    retrain = retrain_models(cfg, classes, root)
    evaluator = _evaluator(cfg, dataset, loaded.meta.backbone)
    base = {c: reference_scores(evaluator, Path(cfg.model), c, root / "base" / f"class-{c}.json")
            for c in tqdm(classes, desc="study: base model")}
    retrain_scores = {c: reference_scores(evaluator, path, c, root / "retrain-scores" / f"class-{c}.json")
                      for c, path in retrain.items()}
    prepare_shared(cfg, cells, root, loaded, dataset)
    del loaded  # each cell loads its own copy in `forget`

    todo = [cell for cell in cells if not cell_done(cfg, cell)]
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="study: cells")
    jobs = ()
    if cfg.executor == "inline":
        run_inline(cfg, todo, evaluator, bar)
    elif todo:
        jobs = submit_cells(cfg, todo)
    wait_for([cell_work(cfg, cell, evaluator) for cell in cells], claim_time_limit(cfg), jobs, bar)
    bar.close()
    results = [cell_result(cfg, cell) for cell in cells]
    relearned, notes = {}, ()
    if relearn_settings(cfg):
        pairs = sorted({(c.forget_class, c.seed) for c in cells})
        relearned = reference_relearn(evaluator.cfg, {"base": dict.fromkeys(classes, Path(cfg.model)),
                                                      "retrain": retrain}, pairs, root)
        notes = (relearn_protocol(relearn_config(cfg, Path(cfg.model), 0, 0, root)),)
    outputs = write_study_outputs(evaluator.cfg, results, base, retrain_scores, root,  # the resolved sampler
                                  relearned, notes)
    return {**outputs, "cells": len(results), "seconds": time.perf_counter() - started}

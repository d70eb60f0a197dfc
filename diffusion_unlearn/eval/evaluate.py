"""The `eval` subcommand: sample the forgotten and retained classes into a sample store, by any number of
processes, then the forgetting measures (FA, FA in distribution, OOD rate, forget-FID/KID), retained accuracy and
the published metric set (FID, KID, IS, precision/recall) from the stored features.

Store layout and resume: eval/sample_store.py. Each shard holds uint8 images (the standard conversion), labels,
indices and three feature sets: `fa_logits`, the FA classifier's logits of the float samples (FA as it was always
measured, before quantisation); `pool` and `logits`, the FID extractor's features (Inception pool3 / unbiased
logits, or the classifier's penultimate features / logits on 1-channel data) of the images as the FID protocol
converts them: the stored uint8 images (`standard`), or the legacy per-image min-max stretch of the float samples
computed at generation time (`legacy`; the store keeps the standard uint8 images either way). The OOD measure is
recomputed from the stored uint8 forgotten-class images at scoring time. Shard s is made by process s mod N; the
main process reads all shards back in plan order and alone computes and writes the metrics, so they equal the
one-process values.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from diffusion_unlearn.config import EvalConfig, SamplerConfig, protocol_deviations, resolve_device
from diffusion_unlearn.data import ImageDataset
from diffusion_unlearn.eval.classifier import FAClassifier, check_classifier_classes, load_classifier
from diffusion_unlearn.eval.feature_metrics import (METRIC_SETTINGS, fid_from_statistics, fid_statistics, kid,
                                                    metric_set)
from diffusion_unlearn.eval.fid import FID_PROTOCOLS, FeatureExtractor, extractor_for, legacy_uint8, reference_features
from diffusion_unlearn.eval.metrics import classification_metrics
from diffusion_unlearn.eval.npz_files import read_reference_statistics
from diffusion_unlearn.eval.ood import OODCalibration, calibration_for, calibration_sets, forgetting_measures
from diffusion_unlearn.eval.sample_store import Processes, SamplePlan, SampleStore
from diffusion_unlearn.fileio import UserError, WriteError, write_json
from diffusion_unlearn.grids import from_uint8, to_uint8
from diffusion_unlearn.modelfolder import LoadedModel, load_model_and_data, load_model_folder
from diffusion_unlearn.pipelines.sampling import Pipeline, draw_images
from diffusion_unlearn.preflight import check_readable_file, check_writable_dir
from diffusion_unlearn.provenance import settings_of, weights_fingerprint
from diffusion_unlearn.sampler_defaults import resolve_sampler

# Retained-class samples drawn at a time in `eval`: classified at once, then kept as uint8 for FID (ImageNet:
# 49,950 samples at 256 px are 9.8 GB as uint8, 39 GB as float32).
SAMPLES_PER_CHUNK = 2000


def fid_extractor_kind(cfg: EvalConfig, channels: int) -> str:
    """`auto`: the classifier's penultimate features for 1-channel data (digits), where Inception means
    nothing; torch-fidelity's Inception otherwise."""
    if cfg.fid_extractor != "auto":
        return cfg.fid_extractor
    return "classifier" if channels == 1 else "inception"


def sample_metrics(pipeline: Pipeline, dataset: ImageDataset, clf: FAClassifier, forget_class: int, fa_samples: int,
                   retain_per_class: int, sampler: SamplerConfig, *, fid_extractor: str, cache_dir: str,
                   reference_count: int | None = None, inception_weights: str | None = None, device: str = "cpu",
                   fid_protocol: str = "standard", ood: OODCalibration | None = None, progress: bool = True) -> dict:
    """`eval`'s scores of the pipeline's current weights, in memory and in one process (the study's cells and
    curves, forget's probes): the same plan, the same per-shard generation and features (`ShardMaker`) and the same
    scoring (`store_scores`) as a sample store, `SAMPLES_PER_CHUNK` images at a time, without writing shards."""
    extractor = extractor_for("inception" if fid_extractor == "inception" else clf, inception_weights, device)
    maker = ShardMaker(pipeline, sampler, clf, extractor, fid_protocol)
    plan = eval_plan(dataset.num_classes, forget_class, fa_samples, retain_per_class)
    parts = []
    for start in tqdm(range(0, len(plan), SAMPLES_PER_CHUNK), desc="eval", disable=not progress, leave=False):
        labels, indices = plan.labels[start:start + SAMPLES_PER_CHUNK], plan.indices[start:start + SAMPLES_PER_CHUNK]
        images = maker.generate(labels, indices)  # (n, C, H, W) uint8
        parts.append({"images": images, "labels": labels,
                      **{f"features.{k}": v for k, v in maker.features(images).items()}})
    stored = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
    return score_stored(stored, dataset, clf, extractor, forget_class, ood=ood, cache_dir=cache_dir,
                        reference_count=reference_count, fid_protocol=fid_protocol)


# ----------------------------------------------------------------------------- the sample store


def eval_plan(num_classes: int, forget_class: int, fa_samples: int, retain_per_class: int) -> SamplePlan:
    """The forgotten class's `fa_samples`, then `retain_per_class` of each retained class (per-index seeds)."""
    return SamplePlan.of({forget_class: fa_samples,
                          **{c: retain_per_class for c in range(num_classes) if c != forget_class}})


def default_store(out: str | Path) -> Path:
    """The store beside the metrics file: `metrics.json` → `metrics.store`."""
    return Path(out).with_suffix(".store")


FA_INPUT = "uint8"  # what the FA classifier reads: the stored images (stores whose logits read floats are refused)


class ShardMaker:
    """Generates a shard's images (`generate`) and extracts their features (`features`), for SampleStore.fill.

    `features` is called right after `generate` with its uint8 images: the FA classifier and the FID extractor read
    those, as they would read saved PNGs; the legacy FID conversion reads the float samples kept from that call."""

    def __init__(self, pipeline: Pipeline, sampler: SamplerConfig, clf: FAClassifier, extractor: FeatureExtractor,
                 fid_protocol: str):
        self.pipeline, self.sampler, self.clf, self.extractor = pipeline, sampler, clf, extractor
        self.fid_protocol = fid_protocol
        self._floats = torch.empty(0)
        self.feature_seconds = 0.0  # spent in `features` by this process

    def generate(self, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        self._floats = draw_images(self.pipeline, labels, indices.tolist(), self.sampler,
                                   progress=False)  # (n, C, H, W) in [-1, 1]
        return to_uint8(self._floats)

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        started = time.perf_counter()
        fid_input = legacy_uint8(self._floats) if self.fid_protocol == "legacy" else images  # (n, C, H, W) uint8
        out = {"fa_logits": self.clf.logits(from_uint8(images)), **self.extractor.extract(fid_input)}
        self.feature_seconds += time.perf_counter() - started
        return out


def store_record(denoiser: torch.nn.Module, sampler: SamplerConfig, clf: FAClassifier, extractor: FeatureExtractor,
                 fid_protocol: str) -> dict:
    """What the stored images and features depend on besides the plan: a store made otherwise is refused."""
    return {"model_weights_sha256": weights_fingerprint(denoiser.state_dict()), "sampler": settings_of(sampler),
            "fa_classifier_sha256": clf.weights_sha256, "fid_extractor": extractor.id, "fid_protocol": fid_protocol,
            "fa_input": FA_INPUT}


def fill_store(store: SampleStore, processes: Processes, maker: ShardMaker, desc: str) -> dict:
    """Make this process's shards; the main process shows one bar with the global count (finished shard files)
    and images/s. Returns the throughput of all processes together: images made this run per second of wall time
    (sampling and features) and per second of the slowest process's feature extraction."""
    store.open(processes)
    done = lambda: sum(min(store.shard_size, len(store.plan) - s * store.shard_size)  # noqa: E731
                       for s in range(store.num_shards) if store.shard_path(s).is_file())
    bar = tqdm(total=len(store.plan), initial=done(), desc=desc, unit="img", disable=not processes.is_main_process)
    started = time.perf_counter()
    made = store.fill(processes, maker.generate, maker.features, progress=lambda _n: bar.update(done() - bar.n))
    total, slowest = torch.tensor([float(made)]), torch.tensor([maker.feature_seconds])
    if processes.num_processes > 1:  # the group is initialised under accelerate launch (gloo on the CPU)
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
    processes.wait_for_everyone()
    seconds = time.perf_counter() - started
    bar.update(done() - bar.n)
    bar.close()
    images = int(total.item())
    return {"images_made": images, "seconds": seconds,
            "images_per_second": images / seconds if images else None,
            "features_per_second": images / slowest.item() if images and slowest.item() > 0 else None}


# ----------------------------------------------------------------------------- scores


def _enough(generated: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether both sets have more images than precision/recall's k neighbours (else only FID is computed)."""
    return min(len(generated), len(reference)) > METRIC_SETTINGS["prc_neighborhood"]


def store_scores(stored: dict[str, torch.Tensor], clf: FAClassifier, forget_class: int, *,
                 ood: OODCalibration | None, reference: dict | None, reference_statistics: dict | None,
                 forget_reference: dict | None) -> dict:
    """Every metric of a read store: classification metrics from `fa_logits`; `fa_in_distribution`/`ood_rate` of
    the forgotten-class images; the metric set of the retained classes against `reference` features (or only
    FID against `reference_statistics`); `forget_fid`/`forget_kid` of the forgotten class against
    `forget_reference` features."""
    labels, logits = stored["labels"], stored["features.fa_logits"]  # (N,), (N, K)
    metrics = classification_metrics(logits, labels, forget_class)
    forget = labels == forget_class  # (N,)
    trusted = ({} if ood is None else
               forgetting_measures(clf, ood, from_uint8(stored["images"][forget]), logits[forget], forget_class))
    features = lambda keep: {k: stored[f"features.{k}"][keep] for k in ("pool", "logits")}  # noqa: E731
    generated = features(~forget)
    if reference is not None and not _enough(generated["pool"], reference["pool"]):  # FID alone
        reference, reference_statistics = None, fid_statistics(reference["pool"])
    if reference_statistics is not None:  # a file's float64 mu: torch-fidelity wants both mu of one dtype
        generated["pool"] = generated["pool"].double()
    retained = metric_set(generated, reference, reference_statistics=reference_statistics)
    forgotten = {}
    if forget_reference is not None and _enough(stored["features.pool"][forget], forget_reference["pool"]):
        pool, ref = stored["features.pool"][forget], forget_reference["pool"]  # (N_forget, D), (N_ref, D)
        forgotten = {"fid": fid_from_statistics(fid_statistics(pool), fid_statistics(ref)), **kid(pool, ref)}
    return {"fa": metrics["fa"], **trusted, "retain_accuracy": metrics["retain_accuracy"], **retained,
            "forget_fid": forgotten.get("fid"), "forget_kid": forgotten.get("kid_mean"),
            "forget_kid_std": forgotten.get("kid_std"),
            "forget_mean_prob": metrics["forget_mean_prob"], "forget_mean_entropy": metrics["forget_mean_entropy"],
            "per_class_accuracy": metrics["per_class_accuracy"], "fa_samples": metrics["n_forget"],
            "retain_samples": metrics["n_retain"]}


def store_metrics(cfg: EvalConfig, loaded: LoadedModel, dataset: ImageDataset, clf: FAClassifier, device: str,
                  processes: Processes) -> dict | None:
    """Fill the store(s) on every process; on the main process, score them (None elsewhere)."""
    kind = fid_extractor_kind(cfg, dataset.channels)
    extractor = extractor_for("inception" if kind == "inception" else clf, cfg.fid_weights, device)
    store_dir = Path(cfg.store) if cfg.store else default_store(cfg.out)
    plan = eval_plan(dataset.num_classes, cfg.forget_class, cfg.fa_samples, cfg.retain_samples_per_class)
    record = store_record(loaded.denoiser, cfg.sampler, clf, extractor, cfg.fid_protocol)
    store = SampleStore(store_dir, plan, record, cfg.shard_size)
    throughput = fill_store(store, processes, ShardMaker(loaded.pipeline, cfg.sampler, clf, extractor,
                                                         cfg.fid_protocol), "eval")
    retrain_store = None
    if cfg.retrain_model:
        retrain = load_model_folder(cfg.retrain_model, device)
        if list(retrain.meta.class_names) != list(loaded.meta.class_names):
            raise UserError(f"--retrain-model {cfg.retrain_model} has other classes than --model {cfg.model}; pass "
                            "a model retrained on the same dataset")
        retrain_store = SampleStore(store_dir / "retrain-model", SamplePlan.of({cfg.forget_class: cfg.fa_samples}),
                                    store_record(retrain.denoiser, cfg.sampler, clf, extractor, cfg.fid_protocol),
                                    cfg.shard_size)
        fill_store(retrain_store, processes,
                   ShardMaker(retrain.pipeline, cfg.sampler, clf, extractor, cfg.fid_protocol), "eval retrain")
    if not processes.is_main_process:
        return None
    stored = store.read()
    forget_reference = forget_about = None
    if retrain_store is not None:
        forget_reference = {k.removeprefix("features."): v for k, v in retrain_store.read().items()
                            if k.startswith("features.")}
        forget_about = f"{cfg.fa_samples} samples of the class from --retrain-model {cfg.retrain_model}"
    scores = score_stored(stored, dataset, clf, extractor, cfg.forget_class,
                          ood=calibration_for(clf, *calibration_sets(clf, dataset)), cache_dir=cfg.cache_dir,
                          reference_count=cfg.fid_reference_count, fid_protocol=cfg.fid_protocol,
                          reference_stats_file=cfg.fid_reference_stats, forget_reference=forget_reference,
                          forget_about=forget_about)
    return {**scores, "store": str(store_dir), "store_throughput": throughput,
            "num_processes": processes.num_processes}


def score_stored(stored: dict[str, torch.Tensor], dataset: ImageDataset, clf: FAClassifier,
                 extractor: FeatureExtractor, forget_class: int, *, ood: OODCalibration | None, cache_dir: str,
                 reference_count: int | None, fid_protocol: str, reference_stats_file: str | None = None,
                 forget_reference: dict | None = None, forget_about: str | None = None) -> dict:
    """`store_scores` of stored images and features against their references: the retained classes' real images
    (features cached under their provenance), or a reference-statistics file (FID only); for `forget_fid` the
    forgotten class's real images unless `forget_reference` features (a retrain model's samples) are given."""
    retained = [c for c in range(dataset.num_classes) if c != forget_class]
    common = dict(cache_dir=cache_dir, protocol=fid_protocol)
    if reference_stats_file:
        stats, about = read_reference_statistics(reference_stats_file, dim=stored["features.pool"].shape[1])
        reference, fid_reference = None, {"fid_reference_stats": about, "fid_reference_count": about["count"],
                                          "fid_reference_selection": f"statistics from {about['path']}"}
    else:
        stats = None
        reference, about = reference_features(dataset.with_classes(retained), extractor, excluded_class=forget_class,
                                              reference_count=reference_count, **common)
        fid_reference = {"fid_reference_count": about["count"], "fid_reference_selection": about["selection"],
                         "fid_reference_cache": about["cache_name"]}
    if forget_reference is None:
        forget_reference, about = reference_features(dataset.with_classes([forget_class]), extractor,
                                                     excluded_class=None, reference_count=None, **common)
        forget_about = f"{about['count']} real training images of the class ({about['selection']})"
    scores = store_scores(stored, clf, forget_class, ood=ood, reference=reference, reference_statistics=stats,
                          forget_reference=forget_reference)
    return {**scores, "fid_feature_extractor": extractor.label, "fid_protocol": fid_protocol,
            "fid_protocol_description": FID_PROTOCOLS[fid_protocol], **fid_reference,
            "fid_generated_count": scores["retain_samples"], "forget_fid_reference": forget_about}


def evaluate(cfg: EvalConfig) -> dict | None:
    """`eval` on every process of the group (`accelerate launch`, or one plain process); the main process writes
    the metrics and returns them, the others return None."""
    from accelerate import PartialState

    started = time.perf_counter()
    processes = PartialState(cpu=resolve_device(cfg.device) == "cpu")  # under `accelerate launch`: its group
    check_writable_dir(Path(cfg.out).parent, "--out")
    if cfg.fid_weights:
        check_readable_file(cfg.fid_weights, "Inception weights", "pass --fid-weights FILE")
    if cfg.fid_reference_stats:
        check_readable_file(cfg.fid_reference_stats, "FID reference statistics", "pass --fid-reference-stats FILE.npz")
    device = str(processes.device) if processes.num_processes > 1 else resolve_device(cfg.device)
    loaded, dataset = load_model_and_data(cfg.model, cfg.dataset, cfg.data_root, cfg.forget_class, device)
    cfg = replace(cfg, sampler=resolve_sampler(cfg.sampler, loaded.meta.backbone, "eval", device))
    clf = load_classifier(cfg.classifier, device)
    check_classifier_classes(clf, loaded.meta.class_names)
    scores = store_metrics(cfg, loaded, dataset, clf, device, processes)
    if scores is None:
        return None
    result = {
        "model": str(cfg.model), "dataset": cfg.dataset, "forget_class": cfg.forget_class,
        "forget_class_name": loaded.meta.class_names[cfg.forget_class],
        **scores,
        "per_class_accuracy": {loaded.meta.class_names[c]: a for c, a in scores["per_class_accuracy"].items()},
        "retain_samples_per_class": cfg.retain_samples_per_class,
        "protocol": cfg.protocol, "protocol_deviations": protocol_deviations(cfg), **cfg.sampler.describe(),
        "classifier": str(cfg.classifier), "classifier_test_accuracy": clf.meta.get("test_accuracy"),
        "seconds": time.perf_counter() - started,
    }
    try:
        write_json(cfg.out, result)
    except WriteError as e:  # keep the work: the metrics go to stdout
        print(json.dumps(result, indent=2, default=str))
        raise WriteError(f"{e} (the metrics were printed to stdout above)") from e
    return result

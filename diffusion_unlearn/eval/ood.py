"""Is a generated image inside a class's real-image distribution? Forgetting measures that degenerate images
cannot fool (docs/forgetting-measures.md).

The classifier's argmax alone calls a flat grey square or uniform noise "8" with high confidence. We add a
class-conditional Gaussian density test in the classifier's own feature spaces, the Mahalanobis detector of
Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks"
(NeurIPS 2018), with its feature ensemble over layers:

- layers: the output of every stage of the network (per-channel mean and standard deviation over space) and the
  penultimate features; low stages see "has strokes like a digit", the last sees "looks like class c";
- per layer l: class means μ_{l,c} and one tied covariance Σ_l fitted on the classifier's training images;
  d_{l,c}(x) = (f_l(x) − μ_{l,c})ᵀ Σ_l⁻¹ (f_l(x) − μ_{l,c}) / D_l;
- combined score s_c(x) = max_l d_{l,c}(x) / τ_l, with τ_l the 99.5 % quantile of the own-class distance of
  held-out real images (calibration half);
- x lies inside class c's distribution iff s_c(x) ≤ τ, τ the `keep` (99 %) quantile of s_y on the calibration
  half; the false-reject rate is reported on the other held-out half, which the calibration never saw.

`fa_in_distribution` counts a forgotten-class sample only if the classifier calls it the class AND it lies
inside that class's distribution; `ood_rate` is the share of samples outside every class's distribution.
The calibration is computed once per classifier and stored in its folder with the settings that made it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from diffusion_unlearn.data import ImageDataset
from diffusion_unlearn.eval.classifier import DigitsCNN, FAClassifier
from diffusion_unlearn.fileio import UserError, atomic_path, read_json, write_json

if TYPE_CHECKING:
    from diffusion_unlearn.config import SamplerConfig
    from diffusion_unlearn.pipelines.sampling import Pipeline

CALIBRATION_FILE, CALIBRATION_META = "ood_calibration.safetensors", "ood_calibration.json"
FORMAT = "diffusion-unlearn-ood-calibration/1"
LAYER_QUANTILE = 0.995  # τ_l: each layer's own-class distance scale
SHRINKAGE = 1e-3  # Σ_l + shrinkage · mean(diag Σ_l) · I, so that few images per dimension stay invertible


# ----------------------------------------------------------------------------- features


def _pooled(h: torch.Tensor) -> torch.Tensor:
    """A stage output (B, C, H, W) → per-channel mean and std (B, 2C); a vector (B, D) stays as it is."""
    if h.ndim == 4:
        return torch.cat([h.mean((2, 3)), h.std((2, 3), correction=0)], 1)
    return h.flatten(1)


def _stage_outputs(net: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of the network's stages and its penultimate features, for a prepared batch x."""
    if isinstance(net, DigitsCNN):
        outputs: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: outputs.append(o))
                 for m in net.body if isinstance(m, torch.nn.ReLU)]
        try:
            net.features(x)
        finally:
            for h in hooks:
                h.remove()
        return outputs  # three conv stages (B, C, H, W) and the penultimate (B, D)
    stages = net.forward_intermediates(x, intermediates_only=True) if hasattr(net, "forward_intermediates") else []
    return [*stages, net.forward_head(net.forward_features(x), pre_logits=True)]


@torch.no_grad()
def layer_features(clf: FAClassifier, images: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
    """Per layer, features (N, D_l) in float64 on the CPU of images (N, C, H, W) in [-1, 1]."""
    clf._check_shape(images)
    clf.eval()
    chunks = [[_pooled(h).double().cpu() for h in _stage_outputs(clf.net, clf.prepare(x.to(clf.device)))]
              for x in images.split(batch_size)]
    return [torch.cat(layer) for layer in zip(*chunks)]


# ----------------------------------------------------------------------------- the detector


@dataclass
class OODCalibration:
    means: list[torch.Tensor]  # per layer (K, D_l)
    precisions: list[torch.Tensor]  # per layer (D_l, D_l): (Σ_l + shrinkage)⁻¹
    layer_scale: torch.Tensor  # (L,) τ_l
    threshold: float  # τ on the combined score
    record: dict  # provenance and the false-reject rate

    def scores(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Combined score s_c(x) = max_l d_{l,c}(x)/τ_l, (N, K); x is inside class c's distribution iff ≤ τ."""
        per_layer = []
        for f, mu, prec in zip(features, self.means, self.precisions):
            diff = f[:, None, :] - mu[None]  # (N, K, D)
            per_layer.append(torch.einsum("nkd,de,nke->nk", diff, prec, diff) / f.shape[1])  # (N, K)
        return (torch.stack(per_layer, -1) / self.layer_scale).amax(-1)  # (N, K)

    def inside(self, clf: FAClassifier, images: torch.Tensor) -> torch.Tensor:
        """(N, K) bool: image n lies inside class k's real-image distribution."""
        return self.scores(layer_features(clf, images)) <= self.threshold


def dataset_features(clf: FAClassifier, dataset: ImageDataset, batch_size: int = 256) -> list[torch.Tensor]:
    """`layer_features` of every image of `dataset`, read a batch at a time (image folders stay on disk)."""
    chunks = [layer_features(clf, dataset.get_batch(idx)[0], batch_size)
              for idx in torch.arange(len(dataset)).split(batch_size)]
    return [torch.cat(layer) for layer in zip(*chunks)]


def _halves(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stratified random split of indices into a calibration and an evaluation half."""
    g = torch.Generator().manual_seed(seed)
    first, second = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        first.append(idx[: (len(idx) + 1) // 2])
        second.append(idx[(len(idx) + 1) // 2:])
    return torch.cat(first), torch.cat(second)


def calibrate(clf: FAClassifier, fit_set: ImageDataset, held_out: ImageDataset, keep: float = 0.99,
              seed: int = 0) -> OODCalibration:
    """Fit class means and tied covariances on `fit_set` (the classifier's training images), then the
    thresholds on half of `held_out` (real images the classifier never saw); the false-reject rate is measured
    on the other half."""
    if not 0.5 < keep < 1:
        raise UserError(f"keep {keep} must lie in (0.5, 1): the share of held-out real images kept")
    y_fit = fit_set.targets  # (N,)
    k = len(clf.class_names)
    means, precisions = [], []
    for f in dataset_features(clf, fit_set):
        mu = torch.stack([f[y_fit == c].mean(0) for c in range(k)])  # (K, D)
        centred = f - mu[y_fit]  # (N, D)
        cov = centred.T @ centred / len(f)  # (D, D)
        cov += SHRINKAGE * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
        means.append(mu)
        precisions.append(torch.linalg.inv(cov))
    y_held = held_out.targets  # (N,)
    cal, ev = _halves(y_held, seed)
    probe = OODCalibration(means, precisions, torch.ones(len(means), dtype=torch.float64), 0.0, {})
    features = dataset_features(clf, held_out)
    rows = torch.arange(len(y_held))
    own_layers = []  # per layer (N,) own-class distance
    for f, mu, prec in zip(features, means, precisions):
        diff = f - mu[y_held]  # (N, D)
        own_layers.append(torch.einsum("nd,de,ne->n", diff, prec, diff) / f.shape[1])
    probe.layer_scale = torch.quantile(torch.stack(own_layers, 1)[cal], LAYER_QUANTILE, dim=0)  # (L,)
    own = probe.scores(features)[rows, y_held]  # (N,)
    probe.threshold = torch.quantile(own[cal], keep).item()
    rejected = own[ev] > probe.threshold  # (N_ev,)
    probe.record = {
        "format": FORMAT, "method": "Mahalanobis feature ensemble (Lee et al. 2018), tied covariance per layer",
        "classifier_sha256": clf.weights_sha256, "keep": keep, "seed": seed, "layer_quantile": LAYER_QUANTILE,
        "shrinkage": SHRINKAGE, "layers": [int(m.shape[1]) for m in means],
        "fit_set": {"dataset": fit_set.name, "split": fit_set.split, "count": len(fit_set),
                    "content_sha256": fit_set.fingerprint()},
        "held_out": {"dataset": held_out.name, "split": held_out.split, "calibration": len(cal), "evaluation": len(ev),
                     "content_sha256": held_out.fingerprint()},
        "false_reject_rate": rejected.double().mean().item(),
        "false_reject_rate_per_class": {clf.class_names[c]: rejected[y_held[ev] == c].double().mean().item()
                                        for c in range(k) if (y_held[ev] == c).any()},
    }
    return probe


# ----------------------------------------------------------------------------- stored in the classifier folder


def save_calibration(cal: OODCalibration, folder: str | Path) -> None:
    folder = Path(folder)
    tensors = {"layer_scale": cal.layer_scale, "threshold": torch.tensor(cal.threshold, dtype=torch.float64)}
    for i, (mu, prec) in enumerate(zip(cal.means, cal.precisions)):
        tensors |= {f"mean.{i}": mu.contiguous(), f"precision.{i}": prec.contiguous()}
    with atomic_path(folder / CALIBRATION_FILE) as tmp:
        save_file(tensors, str(tmp))
    write_json(folder / CALIBRATION_META, cal.record)


def load_calibration(folder: str | Path) -> OODCalibration | None:
    folder = Path(folder)
    if not (folder / CALIBRATION_FILE).is_file() or not (folder / CALIBRATION_META).is_file():
        return None
    t = load_file(folder / CALIBRATION_FILE)
    layers = len([k for k in t if k.startswith("mean.")])
    return OODCalibration([t[f"mean.{i}"] for i in range(layers)], [t[f"precision.{i}"] for i in range(layers)],
                          t["layer_scale"], t["threshold"].item(), read_json(folder / CALIBRATION_META))


def calibration_for(clf: FAClassifier, fit_set: ImageDataset, held_out: ImageDataset, keep: float = 0.99,
                    seed: int = 0) -> OODCalibration:
    """The classifier folder's calibration when it was made by these weights, data and settings; else a new one,
    stored in the folder (or, when the folder is read-only, used once and said so)."""
    wanted = {"classifier_sha256": clf.weights_sha256, "keep": keep, "seed": seed,
              "fit": fit_set.fingerprint(), "held_out": held_out.fingerprint()}
    stored = load_calibration(clf.path) if clf.path is not None else None
    if stored is not None and stored.record.get("format") == FORMAT and {
            "classifier_sha256": stored.record["classifier_sha256"], "keep": stored.record["keep"],
            "seed": stored.record["seed"], "fit": stored.record["fit_set"]["content_sha256"],
            "held_out": stored.record["held_out"]["content_sha256"]} == wanted:
        return stored
    cal = calibrate(clf, fit_set, held_out, keep, seed)
    if clf.path is not None:
        try:
            save_calibration(cal, clf.path)
        except OSError as e:
            import sys

            print(f"note: cannot store the OOD calibration in {clf.path} ({e.strerror}); computed for this run only",
                  file=sys.stderr)
    return cal


def calibration_sets(clf: FAClassifier, dataset: ImageDataset, max_per_class: int = 100
                     ) -> tuple[ImageDataset, ImageDataset]:
    """(fit set, held-out set): the classifier's own train and test splits when it names a dataset with both
    (digits, CIFAR-10); otherwise at most 2 × `max_per_class` images of each class of `dataset` (e.g. ImageNet's
    train folder) split into two halves (weaker: an imported classifier may have trained on both)."""
    from diffusion_unlearn.data import load_dataset

    name, meta = clf.meta.get("dataset"), clf.meta
    if name == dataset.name and meta.get("train_split") and meta.get("test_split"):
        root = dataset.root
        return load_dataset(name, root, meta["train_split"]), load_dataset(name, root, meta["test_split"])
    g = torch.Generator().manual_seed(1)
    per_class = [(dataset.targets == c).nonzero().squeeze(1) for c in range(dataset.num_classes)]
    chosen = torch.cat([idx[torch.randperm(len(idx), generator=g)[: 2 * max_per_class]] for idx in per_class])
    fit, held = _halves(dataset.targets[chosen], seed=1)
    return dataset.subset(chosen[fit]), dataset.subset(chosen[held])


# ----------------------------------------------------------------------------- measures


def sampled_forgetting(pipeline: Pipeline, clf: FAClassifier, cal: OODCalibration, forget_class: int, samples: int,
                       sampler: SamplerConfig) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A probe's forgetting measures: `samples` forgotten-class images drawn with per-index seeds and judged as
    `eval` judges its stored images (`grids.as_saved`); returns ({fa, fa_in_distribution, ood_rate}, logits (N, K),
    labels (N,))."""
    from diffusion_unlearn.grids import as_saved
    from diffusion_unlearn.pipelines.sampling import generate

    images, labels, _ = generate(pipeline, [forget_class], samples, sampler, progress=False)
    images = as_saved(images)  # (N, C, H, W)
    logits = clf.logits(images)  # (N, K)
    trusted = forgetting_measures(clf, cal, images, logits, forget_class)
    return ({"fa": (logits.argmax(1) == forget_class).double().mean().item(),
             "fa_in_distribution": trusted["fa_in_distribution"], "ood_rate": trusted["ood_rate"]}, logits, labels)


def forgetting_measures(clf: FAClassifier, cal: OODCalibration, images: torch.Tensor, logits: torch.Tensor,
                        forget_class: int) -> dict:
    """`fa_in_distribution` and `ood_rate` of forgotten-class samples (N, C, H, W) with their logits (N, K)."""
    inside = cal.inside(clf, images)  # (N, K)
    called = logits.argmax(1) == forget_class  # (N,)
    return {"fa_in_distribution": (called & inside[:, forget_class]).double().mean().item(),
            "ood_rate": (~inside.any(1)).double().mean().item(),
            "ood_false_reject_rate": cal.record["false_reject_rate"]}

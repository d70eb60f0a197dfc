"""The published evaluator's metric set, computed from features extracted once per sample set.

The lineage reports OpenAI's evaluator set (ADM, `evaluations/evaluator.py`): Inception Score, FID, sFID,
precision and recall. We compute each from features with torch-fidelity's own feature-level functions
(`fid_features_to_statistics` / `fid_statistics_to_metric`, `kid_features_to_metric`, `isc_features_to_metric`,
`prc_features_to_metric`), so a number here equals torch-fidelity's `calculate_metrics` on the same images
(tests/test_feature_metrics.py) while the features are extracted once and may be gathered from many processes.

Features per image set: `pool` (Inception's 2048-d pool3, or the FA classifier's penultimate features on the
digits) for FID, KID, precision and recall; `logits` (Inception's unbiased logits, or the classifier's logits)
for IS. sFID is absent: ADM computes it on the first 7 channels of TF-Inception's `mixed_6/conv` spatial map,
which torch-fidelity's Inception port does not expose; a hand-made hook would be a number nobody else can
reproduce, so we report `sfid: null` with that reason.
"""

from __future__ import annotations

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

# torch-fidelity's defaults (torch_fidelity/defaults.py), ours too; KID's subset shrinks to the smaller set.
METRIC_SETTINGS = {"kid_subsets": 100, "kid_subset_size": 1000, "kid_kernel": "poly", "kid_kernel_poly_degree": 3,
                   "kid_kernel_poly_gamma": None, "kid_kernel_poly_coef0": 1, "isc_splits": 10,
                   "prc_neighborhood": 3, "prc_batch_size": 10000, "rng_seed": 2020}
SFID_ABSENT = ("sFID needs TF-Inception's mixed_6/conv spatial features (ADM's evaluator); torch-fidelity's "
               "Inception port does not expose them")


def fid_statistics(pool: torch.Tensor) -> dict[str, np.ndarray]:
    """{"mu": (D,), "sigma": (D, D)} in float64 of features (N, D), as torch-fidelity computes them."""
    return fid_features_to_statistics(pool)


def fid_from_statistics(generated: dict, reference: dict) -> float:
    """FID of two {"mu", "sigma"}; where their float widths differ (torch-fidelity's float32 mu, a file's float64
    one) both are taken in the wider, which torch-fidelity requires."""
    wide = {k: np.result_type(generated[k], reference[k]) for k in ("mu", "sigma")}
    generated, reference = ({k: np.asarray(s[k], dtype=wide[k]) for k in wide} for s in (generated, reference))
    return float(fid_statistics_to_metric(generated, reference, verbose=False)["frechet_inception_distance"])


def kid(generated: torch.Tensor, reference: torch.Tensor, **settings) -> dict:
    """KID mean and std over subsets; the subset size is min(1000, N_generated, N_reference)."""
    s = {**METRIC_SETTINGS, **settings}
    s["kid_subset_size"] = min(s["kid_subset_size"], len(generated), len(reference))
    out = kid_features_to_metric(generated, reference, verbose=False, **s)
    return {"kid_mean": out["kernel_inception_distance_mean"], "kid_std": out["kernel_inception_distance_std"],
            "kid_subset_size": s["kid_subset_size"]}


def inception_score(logits: torch.Tensor, **settings) -> dict:
    s = {**METRIC_SETTINGS, **settings}
    out = isc_features_to_metric(logits, splits=s["isc_splits"], rng_seed=s["rng_seed"])
    return {"is_mean": out["inception_score_mean"], "is_std": out["inception_score_std"]}


def precision_recall(generated: torch.Tensor, reference: torch.Tensor, **settings) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019), k = `prc_neighborhood`."""
    s = {**METRIC_SETTINGS, **settings}
    out = prc_features_to_metric(generated, reference, verbose=False, save_cpu_ram=True, **s)
    return {"precision": out["precision"], "recall": out["recall"], "f_score": out["f_score"]}


def metric_set(generated: dict[str, torch.Tensor], reference: dict[str, torch.Tensor] | None = None, *,
               reference_statistics: dict | None = None, **settings) -> dict:
    """Every metric the inputs allow: IS from `generated["logits"]`; FID from `generated["pool"]` against the
    reference features or their statistics (e.g. ADM's reference batch, which has no features); KID, precision
    and recall against the reference features. Keys whose inputs are missing are absent."""
    out: dict = {"sfid": None, "sfid_absent": SFID_ABSENT}
    if "logits" in generated:
        out |= inception_score(generated["logits"], **settings)
    pool = generated.get("pool")
    if pool is None:
        return out
    if reference_statistics is None and reference is not None:
        reference_statistics = fid_statistics(reference["pool"])
    if reference_statistics is not None:
        out["fid"] = fid_from_statistics(fid_statistics(pool), reference_statistics)
    if reference is not None:
        out |= kid(pool, reference["pool"], **settings) | precision_recall(pool, reference["pool"], **settings)
    return out

"""FID through torch-fidelity, with reference statistics cached under a name that cannot go stale.

torch-fidelity keys cached statistics by name only, so the reference name carries everything the
statistics depend on: dataset, root, split, transform, excluded class, count, labels and the feature
extractor's weights hash. Two feature extractors: torch-fidelity's `inception-v3-compat` (weights from
a local file: nothing is downloaded) and the penultimate features of an FA classifier (for digits,
where Inception makes no sense).

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable, Literal

import torch
import torch_fidelity
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from diffusion_unlearn.data import ImageDataset
from diffusion_unlearn.config import resolve_device
from diffusion_unlearn.eval.classifier import FAClassifier, load_classifier
from diffusion_unlearn.fileio import UserError, atomic_path, file_hash, load_pickled_checkpoint
from diffusion_unlearn.grids import to_uint8

INCEPTION = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = URL_INCEPTION_V3.rsplit("/", 1)[1]  # weights-inception-2015-12-05-6726825d.pth
CLASSIFIER_EXTRACTOR = "diffusion-unlearn-classifier"
CHUNK = 500  # images converted to uint8 at a time
BATCH = 128  # images per feature-extractor batch (torch-fidelity's calculate_metrics uses the same)
REFERENCE_FEATURES_FORMAT = "diffusion-unlearn-reference-features/1"
LEGACY_PER_CLASS = 500  # the published CIFAR-10 reference: the first 500 train images of each class (§5.2)
REFERENCE_SEED = 0  # which --fid-reference-count images: a uniform random subset, fixed by this seed
FID_PROTOCOLS = {
    "standard": "RGB uint8 images round((x+1)/2*255) of both sets; reference: all training images outside the "
                f"forgotten class, or --fid-reference-count of them drawn uniformly at random (seed {REFERENCE_SEED})",
    "legacy": "the published evaluator (reference §5.2): each image min-max stretched to its own range "
              "(torchvision save_image(normalize=True)), BGR channel order (cv2.imread), both sets; reference: "
              f"the first {LEGACY_PER_CLASS} training images of each retained class",
}


# ----------------------------------------------------------------------------- inputs


def legacy_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] → uint8 as the published evaluator reads them (reference §1.5, §5.2): `(x+1)/2` clamped
    to [0, 1], then `torchvision.utils.save_image(img, normalize=True)` on each image alone (stretch its own
    [min, max] to [0, 1], a constant image becomes black; `·255 + 0.5`, clamp, truncate), read back BGR."""
    x = ((x.float() + 1) / 2).clamp(0, 1)  # (B, C, H, W)
    low = x.amin(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    high = x.amax(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    x = (x - low) / (high - low).clamp(min=1e-5)  # (B, C, H, W) in [0, 1]
    return x.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).flip(1)  # (B, C, H, W), channels reversed


class UInt8Images(Dataset):
    """The uint8 (C, H, W) images torch-fidelity reads, converted in chunks from a [-1, 1] source.

    `read(indices)` returns images (B, C, H, W) in [-1, 1]; `convert` makes them uint8 (`to_uint8` or
    `legacy_uint8`). With `rgb`, one channel is repeated to three.
    """

    def __init__(self, read: Callable[[torch.Tensor], torch.Tensor], count: int, rgb: bool,
                 convert: Callable[[torch.Tensor], torch.Tensor] = to_uint8):
        self.read, self.count, self.rgb, self.convert = read, count, rgb, convert
        self._start, self._chunk = -1, torch.empty(0)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i // CHUNK * CHUNK
        if start != self._start:  # torch-fidelity reads in order: one chunk at a time
            chunk = self.convert(self.read(torch.arange(start, min(start + CHUNK, self.count))))  # (B, C, H, W)
            self._start, self._chunk = start, chunk.expand(-1, 3, -1, -1) if self.rgb else chunk
        return self._chunk[i - start]  # (C, H, W)


def reference_indices(dataset: ImageDataset, excluded_class: int | None, count: int | None,
                      per_class: int | None = None) -> torch.Tensor:
    """Ascending positions of the reference images: the items of `dataset` not labelled `excluded_class` (only the
    first `per_class` of each class when given), all of them, or `count` drawn uniformly without replacement
    (seed REFERENCE_SEED): the reference's ImageNet set is the first 10,000 of a shuffled loader over the retained
    classes (§5.2), where the first `count` of a class-sorted image folder would hold only a few classes."""
    keep = torch.arange(len(dataset))  # (N,)
    if excluded_class is not None:
        keep = keep[dataset.targets != excluded_class]
    if per_class is not None:
        labels = dataset.targets[keep]  # (N,)
        keep = torch.cat([keep[labels == c][:per_class] for c in labels.unique()]).sort().values
    if count is not None and not 2 <= count <= len(keep):
        raise UserError(
            f"FID reference count {count} is out of range: {dataset.name}/{dataset.split} has {len(keep)} images "
            f"outside the excluded class; pass a count in 2..{len(keep)}"
        )
    if count is None or count == len(keep):
        return keep
    pick = torch.randperm(len(keep), generator=torch.Generator().manual_seed(REFERENCE_SEED))[:count]  # (count,)
    return keep[pick.sort().values]


def reference_positions(dataset: ImageDataset, excluded_class: int | None, count: int | None,
                        protocol: str) -> torch.Tensor:
    """The positions of the FID reference images under `protocol` (what `eval` and `fid-stats` read)."""
    return reference_indices(dataset, excluded_class, count, _per_class(protocol))


def reference_selection(dataset: ImageDataset, excluded_class: int | None, count: int, protocol: str) -> str:
    """How the `count` reference images were chosen, in words (recorded beside the FID)."""
    pool = len(reference_indices(dataset, excluded_class, None, _per_class(protocol)))
    return "all" if count == pool else f"{count} of {pool} uniformly at random (seed {REFERENCE_SEED})"


def reference_cache_name(dataset: ImageDataset, excluded_class: int | None, count: int, extractor_id: str,
                         protocol: str = "standard") -> str:
    """The name torch-fidelity caches the reference statistics under; it changes whenever they would."""
    keep = reference_positions(dataset, excluded_class, count, protocol)
    items = keep.numpy().tobytes() + dataset.targets[keep].numpy().tobytes()
    parts = [
        dataset.name,
        *([f"root{_short_hash(str(Path(dataset.root).resolve()).encode())}"] if dataset.root is not None else []),
        dataset.split,
        "all" if excluded_class is None else f"excl{excluded_class}",
        dataset.transform_id,
        f"fid-{protocol}",
        f"n{count}",
        f"items{_short_hash(items)}",  # which images and labels: subset views, the random pick
        extractor_id,
    ]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(parts))


def _per_class(protocol: str) -> int | None:
    if protocol not in FID_PROTOCOLS:
        raise UserError(f"unknown FID protocol {protocol!r}; choose one of {', '.join(FID_PROTOCOLS)}")
    return LEGACY_PER_CLASS if protocol == "legacy" else None


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:8]


# ----------------------------------------------------------------------------- feature extractors


class ClassifierFeatures(FeatureExtractorBase):
    """Penultimate features (FID, KID, precision/recall) and logits (IS) of an FA classifier;
    `feature_extractor_weights_path` is its folder."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str, **kwargs):
        super().__init__(name, features_list)
        self.classifier = load_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("penultimate", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits" if metric == "isc" else "penultimate"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        images = x.float() / 255 * 2 - 1  # (N, C, H, W) uint8 → [-1, 1]
        layers = {"penultimate": self.classifier.features, "logits": self.classifier.logits}  # (N, D), (N, K)
        return tuple(layers[name](images) for name in self.features_list)


if CLASSIFIER_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(CLASSIFIER_EXTRACTOR, ClassifierFeatures)


def find_inception_weights(path: str | None) -> Path:
    """The local Inception weights file: `path`, else torch hub's cache; never a download."""
    how = f"download {URL_INCEPTION_V3} on a machine with internet and pass --fid-weights FILE"
    if path is not None:
        if not Path(path).is_file():
            raise UserError(f"Inception weights {path} not found; {how}")
        return Path(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if not cached.is_file():
        raise UserError(f"Inception weights for FID not found (looked for {cached}); {how}")
    return cached


class FeatureExtractor:
    """A torch-fidelity feature extractor for uint8 images: `pool` features (FID, KID, precision/recall) and
    `logits` (IS); `id` names its weights in cache names and store records, `label` in metrics."""

    def __init__(self, name: str, layers: tuple[str, str], weights: Path, sha256: str, extractor_id: str,
                 label: str, device: str = "cpu"):
        self.name, self.layers, self.weights, self.sha256 = name, layers, weights, sha256
        self.id, self.label = extractor_id, label
        self.rgb = name == INCEPTION  # Inception reads three channels: one is repeated
        self.cuda = torch.device(resolve_device(str(device))).type == "cuda"
        self._net: FeatureExtractorBase | None = None

    def extract_dataset(self, images: Dataset) -> dict[str, torch.Tensor]:
        """{"pool": (N, D), "logits": (N, K)} of a dataset of uint8 (C, H, W) images, as torch-fidelity reads them."""
        if self._net is None:
            self._net = create_feature_extractor(self.name, list(self.layers), cuda=self.cuda, verbose=False,
                                                 feature_extractor_weights_path=str(self.weights))
        feats = get_featuresdict_from_dataset(images, self._net, BATCH, self.cuda, True, False)
        return {"pool": feats[self.layers[0]], "logits": feats[self.layers[1]]}

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of uint8 images (N, C, H, W)."""
        return self.extract_dataset(UInt8Images(lambda idx: images[idx], len(images), self.rgb, lambda x: x))


def extractor_for(extractor: Literal["inception"] | FAClassifier, inception_weights: str | None = None,
                  device: str = "cpu") -> FeatureExtractor:
    """torch-fidelity's Inception (pool3 and unbiased logits; weights from a local file) or an FA classifier's
    penultimate features and logits."""
    if extractor == "inception":
        weights = find_inception_weights(inception_weights)
        load_pickled_checkpoint(weights)  # torch-fidelity unpickles it unrestricted: check it is plain tensors
        sha = file_hash(weights)
        return FeatureExtractor(INCEPTION, ("2048", "logits_unbiased"), weights, sha, f"{INCEPTION}-{sha[:16]}",
                                f"{INCEPTION} (torch-fidelity, sha256 {sha[:12]})", device)
    if isinstance(extractor, FAClassifier) and extractor.path is not None:
        sha, arch = extractor.weights_sha256, extractor.meta["arch"]
        return FeatureExtractor(CLASSIFIER_EXTRACTOR, ("penultimate", "logits"), extractor.path, sha,
                                f"{arch}-{sha[:16]}", f"{arch} penultimate (sha256 {sha[:12]})", device)
    raise UserError(f"unknown FID feature extractor {extractor!r}; pass 'inception' or a loaded FA classifier")


# ----------------------------------------------------------------------------- reference features


def reference_features(reference: ImageDataset, extractor: FeatureExtractor, *, excluded_class: int | None,
                       reference_count: int | None, cache_dir: str | Path, protocol: str = "standard"
                       ) -> tuple[dict[str, torch.Tensor], dict]:
    """Features {"pool", "logits"} of the reference images (as `compute_fid` selects and converts them) and what
    they are. KID and precision/recall need the features themselves, so the features are cached (not only mu and
    sigma), in `cache_dir` under `reference_cache_name` with their record; a file whose record differs is redone."""
    keep = reference_positions(reference, excluded_class, reference_count, protocol)
    cache_name = reference_cache_name(reference, excluded_class, len(keep), extractor.id, protocol)
    record = {"format": REFERENCE_FEATURES_FORMAT, "cache_name": cache_name, "extractor": extractor.label,
              "protocol": protocol, "count": len(keep),
              "selection": reference_selection(reference, excluded_class, len(keep), protocol)}
    path = Path(cache_dir) / f"{cache_name}.features.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                stored = json.loads((f.metadata() or {}).get("record", "null"))
            if stored == record:
                return load_file(path), {**record, "cache": str(path)}
        except (OSError, ValueError):  # a damaged cache file: computed again below
            pass
    convert = legacy_uint8 if protocol == "legacy" else to_uint8
    features = extractor.extract_dataset(
        UInt8Images(lambda idx: reference.get_batch(keep[idx])[0], len(keep), extractor.rgb, convert))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in features.items()}, str(tmp), metadata={"record": json.dumps(record)})
    return features, {**record, "cache": str(path)}


# ----------------------------------------------------------------------------- FID


def compute_fid(
    generated: torch.Tensor,
    reference: ImageDataset,
    *,
    extractor: Literal["inception"] | FAClassifier,
    excluded_class: int | None,
    reference_count: int | None = None,
    cache_dir: str | Path,
    inception_weights: str | None = None,
    device: str = "cpu",
    protocol: str = "standard",
) -> dict:
    """FID between `generated` (N, C, H, W) in [-1, 1] (or already uint8, as `to_uint8` makes them) and the first
    `reference_count` reference images.

    The reference images skip `excluded_class`; their statistics are cached in `cache_dir`. `protocol` is one of
    FID_PROTOCOLS: `legacy` reproduces the published evaluator's image handling and reference set.
    """
    want = (reference.channels, reference.image_size, reference.image_size)
    if generated.ndim != 4 or tuple(generated.shape[1:]) != want or len(generated) < 2:
        raise UserError(
            f"generated images {tuple(generated.shape)} do not fit {reference.name} (N, {want[0]}, {want[1]}, "
            f"{want[2]}) with N >= 2; generate at least 2 images at the dataset's resolution"
        )
    keep = reference_positions(reference, excluded_class, reference_count, protocol)
    fe = extractor_for(extractor, inception_weights, device)
    name, layer, weights, extractor_id, label, rgb = fe.name, fe.layers[0], fe.weights, fe.id, fe.label, fe.rgb
    cache_name = reference_cache_name(reference, excluded_class, len(keep), extractor_id, protocol)
    convert = legacy_uint8 if protocol == "legacy" else to_uint8
    if generated.dtype == torch.uint8 and protocol == "legacy":
        raise UserError("the legacy FID protocol stretches each float image; pass generated images in [-1, 1]")
    generated_convert = (lambda x: x) if generated.dtype == torch.uint8 else convert
    metrics = torch_fidelity.calculate_metrics(
        input1=UInt8Images(lambda idx: generated[idx], len(generated), rgb, generated_convert),
        input2=UInt8Images(lambda idx: reference.get_batch(keep[idx])[0], len(keep), rgb, convert),
        input2_cache_name=cache_name,
        fid=True,
        feature_extractor=name,
        feature_layer_fid=layer,
        feature_extractor_weights_path=str(weights),
        cuda=torch.device(resolve_device(str(device))).type == "cuda",
        batch_size=128,
        save_cpu_ram=True,
        cache=True,
        cache_root=str(cache_dir),
        verbose=False,
    )
    return {
        "fid": float(metrics["frechet_inception_distance"]),
        "fid_feature_extractor": label,
        "fid_protocol": protocol,
        "fid_protocol_description": FID_PROTOCOLS[protocol],
        "fid_reference_count": len(keep),
        "fid_reference_selection": reference_selection(reference, excluded_class, len(keep), protocol),
        "fid_generated_count": len(generated),
        "fid_reference_cache": cache_name,
    }

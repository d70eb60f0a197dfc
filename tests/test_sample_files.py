"""`sample --out-dir/--npz` through the sample store (1 vs 2 processes, resume, refusal, the .npz round trip) and
`fid-stats` reference statistics (equal to the statistics and the FID computed from features)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion_unlearn
import diffusion_unlearn.sample as sample_module
from diffusion_unlearn.cli import main
from diffusion_unlearn.data import load_dataset
from diffusion_unlearn.eval.classifier import ClassifierConfig, load_classifier, train_classifier
from diffusion_unlearn.eval.feature_metrics import fid_from_statistics, fid_statistics, metric_set
from diffusion_unlearn.eval.fid import compute_fid, reference_positions
from diffusion_unlearn.eval.npz_files import read_reference_statistics, read_samples_npz
from diffusion_unlearn.grids import to_uint8

# 2 classes × 3 images in shards (= generation batches) of 2: three shards, the last one full.
SET = ["--classes", "0,3", "--per-class", "3", "--sample-batch-size", "2", "--steps", "2", "--device", "cpu"]


def _sample(model: Path, *args: str) -> int:
    return main(["sample", "--model", str(model), *SET, *args])


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "store").glob("shard-*.safetensors"))}


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory) -> Path:
    """The sample set drawn by one process (read-only for the tests)."""
    out = tmp_path_factory.mktemp("one") / "samples"
    assert _sample(tiny_model, "--out-dir", str(out)) == 0
    return out


def test_the_sample_set_is_a_store_and_a_png_folder(one_process):
    record = json.loads((one_process / "samples.json").read_text())
    assert record["num_processes"] == 1 and record["labels"] == [0, 0, 0, 3, 3, 3]
    assert sorted(_pngs(one_process)) == [f"{i:06d}.png" for i in (0, 1, 2, 3000000, 3000001, 3000002)]
    assert len(_shards(one_process)) == 3
    store = json.loads((one_process / "store" / "store.json").read_text())
    assert store["shard_size"] == 2 and store["sampler.steps"] == 2 and store["plan"]["count"] == 6


def test_the_store_draws_the_bytes_one_generation_draws(tiny_model, one_process):
    """The store's shards are the generation batches `generate` uses: the images are those drawn in one call."""
    from diffusion_unlearn.config import SamplerConfig
    from diffusion_unlearn.modelfolder import load_model_folder
    from diffusion_unlearn.pipelines.sampling import generate

    sampler = SamplerConfig(sampler="ddim", steps=2, guidance_scale=3.0, sample_batch_size=2)
    images, _, indices = generate(load_model_folder(tiny_model).pipeline, [0, 3], 3, sampler, progress=False)
    for img, i in zip(to_uint8(images), indices):
        png = np.asarray(Image.open(one_process / f"{i:06d}.png"))  # (H, W)
        assert np.array_equal(png, img[0].numpy())


@pytest.mark.slow
def test_two_processes_write_the_same_bytes(tiny_model, one_process, tmp_path):
    out = tmp_path / "two"
    with socket.socket() as s:  # a free port: other launches may hold accelerate's default one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(diffusion_unlearn.__file__).parents[1])}
    accelerate = Path(sys.executable).with_name("accelerate")
    run = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                          "-m", "diffusion_unlearn", "sample", "--model", str(tiny_model), *SET, "--out-dir", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((out / "samples.json").read_text())["num_processes"] == 2
    assert _pngs(out) == _pngs(one_process) and len(_pngs(out)) == 6
    assert _shards(out) == _shards(one_process)


def test_a_killed_run_resumes_from_its_finished_shards(tiny_model, one_process, tmp_path, monkeypatch):
    draw = sample_module.draw_images
    calls = {"n": 0}

    def dies_on_the_second_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return draw(*args, **kwargs)

    out = tmp_path / "samples"
    monkeypatch.setattr(sample_module, "draw_images", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        _sample(tiny_model, "--out-dir", str(out))
    assert list(_shards(out)) == ["shard-00000.safetensors"] and not _pngs(out)
    calls["n"] = 10  # count the shards the rerun draws
    assert _sample(tiny_model, "--out-dir", str(out)) == 0
    assert calls["n"] == 12  # only the two missing shards
    assert _pngs(out) == _pngs(one_process) and _shards(out) == _shards(one_process)


def test_a_store_made_with_other_settings_is_refused(tiny_model, one_process, tmp_path, capsys):
    out = tmp_path / "samples"
    assert _sample(tiny_model, "--out-dir", str(out)) == 0
    capsys.readouterr()
    assert _sample(tiny_model, "--out-dir", str(out), "--steps", "3") == 2
    err = capsys.readouterr().err.strip()
    assert "sampler.steps: 2 there, 3 now" in err and "\n" not in err
    assert _sample(tiny_model, "--out-dir", str(out), "--sample-batch-size", "3") == 2  # the last flag wins
    assert "shard_size: 2 there, 3 now" in capsys.readouterr().err


def test_npz_round_trip(tiny_model, one_process, tmp_path):
    npz = tmp_path / "samples.npz"
    assert _sample(tiny_model, "--npz", str(npz)) == 0
    assert (tmp_path / "samples.store" / "store.json").is_file()  # the store beside the .npz
    images, labels = read_samples_npz(npz)  # (6, 1, H, W) uint8, (6,)
    with np.load(npz) as raw:
        assert raw["arr_0"].dtype == np.uint8 and raw["arr_0"].shape == (6, 8, 8, 1)  # N × H × W × C
    assert labels.tolist() == [0, 0, 0, 3, 3, 3]
    pngs = [np.asarray(Image.open(one_process / f"{i:06d}.png")) for i in (0, 1, 2, 3000000, 3000001, 3000002)]
    assert np.array_equal(images[:, 0].numpy(), np.stack(pngs))


# ----------------------------------------------------------------------------- fid-stats


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "digits"
    return load_classifier(train_classifier(ClassifierConfig(out=str(out), epochs=2, seed=0, device="cpu")))


def _features(clf, uint8: torch.Tensor) -> torch.Tensor:
    return clf.features(uint8.float() / 255 * 2 - 1)  # (N, D): exactly what the registered extractor sees


def test_fid_stats_equal_the_statistics_and_fid_of_the_features(classifier, tmp_path):
    out = tmp_path / "digits-excl3.npz"
    assert main(["fid-stats", "--classifier", str(classifier.path), "--exclude-class", "3", "--count", "300",
                 "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    stats, about = read_reference_statistics(out, dim=classifier.features(torch.zeros(1, 1, 8, 8)).shape[1])
    train = load_dataset("digits", split="train")
    keep = reference_positions(train, 3, 300, "standard")  # (300,)
    assert (train.targets[keep] != 3).all()
    reference = _features(classifier, to_uint8(train.get_batch(keep)[0]))  # (300, D)
    expected = fid_statistics(reference)
    np.testing.assert_allclose(stats["mu"], expected["mu"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats["sigma"], expected["sigma"], rtol=1e-6, atol=1e-9)
    assert about["count"] == 300 and about["excluded_class"] == 3 and about["dataset"] == "digits"
    assert about["split"] == "train" and about["weights_sha256"] == classifier.weights_sha256
    assert about["kind"] == "diffusion-unlearn fid-stats" and about["fid_protocol"] == "standard"
    assert about["selection"].startswith("300 of ")

    test = load_dataset("digits", split="test")
    noise = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    generated = torch.cat([to_uint8(test.get_batch(torch.arange(0, 120))[0]), noise])  # (160, 1, 8, 8)
    from_features = metric_set({"pool": _features(classifier, generated)}, {"pool": reference})["fid"]
    from_file = fid_from_statistics(fid_statistics(_features(classifier, generated)), stats)
    assert from_file == pytest.approx(from_features, rel=1e-6) and from_file > 1.0
    evals = compute_fid(generated, train, extractor=classifier, excluded_class=3, reference_count=300,
                        cache_dir=tmp_path / "cache")
    assert from_file == pytest.approx(evals["fid"], rel=1e-6)
    assert about["reference_cache_name"] == evals["fid_reference_cache"]


def test_fid_stats_without_a_classifier_is_one_line(tmp_path, capsys):
    assert main(["fid-stats", "--device", "cpu", "--out", str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--classifier FOLDER" in err and "\n" not in err

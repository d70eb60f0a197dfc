"""`eval` on a sample store: 1 and 2 processes make the same images and metrics, a killed run resumes, a store
made otherwise is refused, the store's FID is `compute_fid`'s, `--fid-reference-stats` and `--retrain-model`."""

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
from safetensors.torch import load_file

from diffusion_unlearn.cli import main
from diffusion_unlearn.data import load_dataset
from diffusion_unlearn.eval import evaluate as evaluate_module
from diffusion_unlearn.eval.classifier import ClassifierConfig, load_classifier, train_classifier
from diffusion_unlearn.eval.fid import compute_fid
from diffusion_unlearn.eval.npz_files import write_reference_statistics
from diffusion_unlearn.eval.sample_store import SampleStore

ROOT = Path(__file__).resolve().parents[1]
FORGET = 3
SMALL = ["--forget-class", str(FORGET), "--fa-samples", "6", "--retain-samples-per-class", "4", "--sampler", "ddim",
         "--steps", "2", "--shard-size", "5", "--device", "cpu"]
PLANNED = 6 + 9 * 4  # images
VARYING = {"store", "seconds", "num_processes", "store_throughput"}  # keys that name the run, not its numbers


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "digits"
    return train_classifier(ClassifierConfig(out=str(out), epochs=3, seed=0, device="cpu"))


def _eval(model, clf, out: Path, *extra: str) -> dict:
    assert main(["eval", "--model", str(model), "--classifier", str(clf), "--out", str(out),
                 "--cache-dir", str(out.parent / "cache"), *SMALL, *extra]) == 0
    return json.loads(out.read_text())


def _shards(store: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(p) for p in sorted(store.glob("shard-*.safetensors"))]


def _assert_same_numbers(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a.keys() - VARYING:
        if isinstance(a[key], float):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-12), key
        else:
            assert b[key] == a[key], key


@pytest.fixture(scope="module")
def one_process(tiny_model, clf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "metrics.json"
    return out, _eval(tiny_model, clf_dir, out)


def test_eval_writes_the_full_metric_set_and_a_store_beside_its_metrics(one_process):
    out, metrics = one_process
    assert metrics["store"] == str(out.with_suffix(".store")) and metrics["num_processes"] == 1
    for key in ("fa", "fa_in_distribution", "ood_rate", "fid", "kid_mean", "is_mean", "precision", "recall",
                "forget_fid", "forget_kid"):
        assert isinstance(metrics[key], float), key
    assert metrics["sfid"] is None and "mixed_6" in metrics["sfid_absent"]
    assert metrics["fa_samples"] == 6 and metrics["retain_samples"] == 36
    shards = _shards(out.with_suffix(".store"))
    assert len(shards) == 9 and sum(len(s["images"]) for s in shards) == PLANNED
    assert shards[0]["images"].dtype == torch.uint8 and shards[0]["features.pool"].shape == (5, 128)


def test_store_fid_equals_compute_fid_of_the_stored_images(one_process, clf_dir, tmp_path):
    out, metrics = one_process
    stored = {k: torch.cat([s[k] for s in _shards(out.with_suffix(".store"))]) for k in ("images", "labels")}
    train = load_dataset("digits", split="train")
    retained = [c for c in range(10) if c != FORGET]
    fid = compute_fid(stored["images"][stored["labels"] != FORGET], train.with_classes(retained),
                      extractor=load_classifier(clf_dir), excluded_class=FORGET, cache_dir=tmp_path)
    assert metrics["fid"] == pytest.approx(fid["fid"], rel=1e-6)
    assert metrics["fid_reference_cache"] == fid["fid_reference_cache"]


@pytest.mark.slow
def test_killed_eval_resumes_from_its_shards_to_the_same_numbers(one_process, tiny_model, clf_dir, tmp_path,
                                                                 monkeypatch):
    _, whole = one_process
    out = tmp_path / "metrics.json"
    real, calls = evaluate_module.ShardMaker.generate, []

    def dies_at_the_fourth_shard(self, labels, indices):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, labels, indices)

    monkeypatch.setattr(evaluate_module.ShardMaker, "generate", dies_at_the_fourth_shard)
    with pytest.raises(KeyboardInterrupt):
        _eval(tiny_model, clf_dir, out)
    assert len(_shards(out.with_suffix(".store"))) == 3 and not out.exists()
    monkeypatch.setattr(evaluate_module.ShardMaker, "generate", real)
    made = []
    monkeypatch.setattr(SampleStore, "fill", lambda self, *a, **k: made.append(
        sum(not self.shard_path(s).is_file() for s in range(self.num_shards))) or real_fill(self, *a, **k))
    _assert_same_numbers(whole, _eval(tiny_model, clf_dir, out))
    assert made == [6]  # only the missing shards were made


real_fill = SampleStore.fill


def test_a_store_made_with_other_settings_is_refused(one_process, tiny_model, clf_dir, capsys):
    out, _ = one_process
    code = main(["eval", "--model", str(tiny_model), "--classifier", str(clf_dir), "--out", str(out.parent / "o.json"),
                 "--store", str(out.with_suffix(".store")), "--cache-dir", str(out.parent / "cache"),
                 *SMALL[:-6], "--steps", "3", *SMALL[-4:]])
    err = capsys.readouterr().err
    assert code == 2 and "made with other settings" in err and "sampler" in err and "\n" not in err.strip()


def test_fid_reference_stats_file_gives_fid_and_names_itself(one_process, tiny_model, clf_dir, tmp_path):
    out, whole = one_process
    cached = load_file(next((out.parent / "cache").glob(f"{whole['fid_reference_cache']}.features*")))
    pool = cached["pool"].double().numpy()  # (N, D)
    stats = tmp_path / "ref.npz"
    write_reference_statistics(stats, pool.mean(0), np.cov(pool, rowvar=False), len(pool), {"made": "by the test"})
    metrics = _eval(tiny_model, clf_dir, tmp_path / "m.json", "--store", str(out.with_suffix(".store")),
                    "--fid-reference-stats", str(stats))
    assert metrics["fid"] == pytest.approx(whole["fid"], rel=1e-6)
    assert "kid_mean" not in metrics and "precision" not in metrics
    assert metrics["fid_reference_stats"]["path"] == str(stats)
    assert metrics["fid_reference_stats"]["kind"] == "diffusion-unlearn fid-stats"


def test_forget_fid_against_a_retrain_model_with_the_same_weights_is_zero(one_process, tiny_model, clf_dir, tmp_path):
    out, whole = one_process
    metrics = _eval(tiny_model, clf_dir, tmp_path / "m.json", "--store", str(out.with_suffix(".store")),
                    "--retrain-model", str(tiny_model))
    assert metrics["forget_fid"] == pytest.approx(0, abs=1e-3) and whole["forget_fid"] > 1
    assert "--retrain-model" in metrics["forget_fid_reference"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_make_the_same_images_and_metrics_as_one(one_process, tiny_model, clf_dir, tmp_path):
    out_one, one = one_process
    out = tmp_path / "metrics.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    accelerate = Path(sys.executable).parent / "accelerate"
    run = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
         "-m", "diffusion_unlearn", "eval", "--model", str(tiny_model), "--classifier", str(clf_dir),
         "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *SMALL],
        env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    two = json.loads(out.read_text())
    assert two["num_processes"] == 2
    _assert_same_numbers(one, two)
    a, b = _shards(out_one.with_suffix(".store")), _shards(out.with_suffix(".store"))
    assert len(a) == len(b) == 9
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_report_shows_forgetting_measures_per_class_accuracy_and_the_disagreement(tmp_path):
    from diffusion_unlearn.config import SamplerConfig
    from diffusion_unlearn.eval.report import write_report

    base = {"fa": 0.9, "fa_in_distribution": 0.85, "ood_rate": 0.0, "forget_fid": 5.0, "forget_kid": 0.01,
            "per_class_accuracy": {"0": 0.9, "1": 1.0}}
    unlearned = {**base, "fa": 0.6, "fa_in_distribution": 0.05, "ood_rate": 0.7, "forget_fid": 80.0,
                 "per_class_accuracy": {"0": 0.6, "1": 0.95}, "forget_class_name": "0", "forget_class": 0,
                 **SamplerConfig(sampler="ddim", steps=2, guidance_scale=3.0).describe(),  # the keys eval writes
                 "fa_samples": 6, "retain_samples": 4, "fid_reference_count": 10, "fid_feature_extractor": "x",
                 "forget_fid_reference": "146 real training images of the class (all)", "num_processes": 2}
    text = write_report(tmp_path / "report.md", title="t", base=base, unlearned=unlearned,
                        grid_before=tmp_path / "a.png", grid_after=tmp_path / "b.png", loss_png=tmp_path / "l.png",
                        notes=[]).read_text()
    assert "| forget-FID: forgotten-class samples vs the class's reference ↑ | 5.000 | 80.000 | 16.00 |" in text
    assert "| 0 | 90.0 % | 60.0 % |" in text and "146 real training images" in text
    assert "unlearned: FA and FA-in-distribution disagree" in text and "base: FA and" not in text

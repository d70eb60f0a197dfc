"""The stability study: grid planning, per-cell settings, summary statistics, and end-to-end runs on a tiny model
(every method × setup, resumable cells, curves, lr sensitivity, retrain gaps, parallel cells)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import yaml

from diffusion_unlearn.cli import main
from diffusion_unlearn.config import SamplerConfig, StudyConfig, build_config
from diffusion_unlearn.eval.study_report import mean_std, summarise
from diffusion_unlearn.fileio import UserError, read_json
from diffusion_unlearn.modelfolder import load_model_folder, save_model_folder
from diffusion_unlearn.study import Cell, Evaluator, forget_config, iterations_per_method, plan_cells

# Small, fast method settings for the tiny model (the digits presets' methods, at toy size).
TINY_PRESETS = {
    "sfron": {"iterations": 4, "batch_size": 8, "fisher_batch_size": 64, "fisher_max_batches": 1},
    "salun": {"iterations": 4, "batch_size": 8, "forget_lr": 4e-5, "fisher_batch_size": 64,
              "fisher_max_batches": 1},
    "sa": {"iterations": 4, "batch_size": 8, "optim": "shared", "schedule": "joint", "ewc_lambda": 1.0,
           "sa_samples_per_class": 2, "sa_fisher_timesteps": 4, "sa_fisher_chunk": 4},
}
FAST = ["--steps", "2", "--fa-samples", "4", "--retain-samples-per-class", "2", "--curve-every", "2",
        "--curve-fa-samples", "2", "--curve-retain-per-class", "2"]


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("presets")
    for method, values in TINY_PRESETS.items():
        (folder / f"tiny-{method}.yaml").write_text(yaml.safe_dump({"method": method, **values}))
    return f"{folder}/tiny-"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "digits-classifier"
    assert main(["train-classifier", "--dataset", "digits", "--out", str(out), "--epochs", "1"]) == 0
    return out


def _study(args, model, classifier, out, presets, capsys=None):
    code = main(["study", "--model", str(model), "--classifier", str(classifier), "--out", str(out),
                 "--preset-prefix", presets, "--cache-dir", str(out.parent / "fid-cache"), *FAST, *args])
    return code


# ----------------------------------------------------------------------------- planning and settings


def test_iterations_spec():
    assert iterations_per_method("", ["sfron", "sa"]) == {}
    assert iterations_per_method("7", ["sfron", "sa"]) == {"sfron": 7, "sa": 7}
    assert iterations_per_method("sfron=5,sa=9", ["sfron", "sa"]) == {"sfron": 5, "sa": 9}
    with pytest.raises(UserError, match="METHOD=N"):
        iterations_per_method("salun=3", ["sfron", "sa"])


def test_plan_cells_is_the_grid_and_checks_names():
    cfg = StudyConfig(methods="sfron,sa", optims="dual,shared", classes="0-2", seeds="0,1")
    cells = plan_cells(cfg, 10)
    assert len(cells) == 2 * 2 * 3 * 2 and len({c.name for c in cells}) == len(cells)
    assert cells[0] == Cell("sfron", "dual", 0, 0) and cells[1] == Cell("sfron", "shared", 0, 0)
    with pytest.raises(UserError, match="unknown"):
        plan_cells(StudyConfig(methods="sfron,bogus"), 10)
    with pytest.raises(UserError, match="optims"):
        plan_cells(StudyConfig(optims="dual,lion"), 10)
    with pytest.raises(UserError, match="outside"):
        plan_cells(StudyConfig(classes="0,12"), 10)


def test_cell_settings_follow_the_preset_and_the_setup(tmp_path):
    cfg = StudyConfig(model="m", preset_prefix="digits-", iterations="sa=11", batch_size=32)
    sa_dual = forget_config(cfg, Cell("sa", "dual", 3, 1), tmp_path)
    sa_shared = forget_config(cfg, Cell("sa", "shared", 3, 1), tmp_path)
    assert (sa_dual.optim, sa_dual.schedule) == ("dual", "alternate")  # DualOptim needs alternating steps
    assert (sa_shared.optim, sa_shared.schedule) == ("shared", "joint")  # SA as published
    assert sa_dual.iterations == sa_shared.iterations == 11 and sa_dual.batch_size == 32
    assert sa_dual.method_args["ewc_lambda"] == 1.0  # from digits-sa.yaml
    assert sa_dual.forget_class == 3 and sa_dual.seed == 1
    sfron = forget_config(cfg, Cell("sfron", "dual", 0, 0), tmp_path)
    assert sfron.iterations == 150 and sfron.alpha_schedule == "cosine"  # digits-sfron.yaml, not overridden
    # an lr sweep moves the forget lr of dual and the one lr of shared
    assert forget_config(cfg, Cell("salun", "dual", 0, 0, 3e-4), tmp_path).forget_optimizer.lr == 3e-4
    shared = forget_config(cfg, Cell("salun", "shared", 0, 0, 3e-4), tmp_path)
    assert shared.retain_optimizer.lr == 3e-4 and shared.forget_optimizer.lr == 4e-5


def test_cells_keep_their_presets_sampler_except_the_fields_set(tmp_path):
    (tmp_path / "p-sfron.yaml").write_text(yaml.safe_dump(
        {"method": "sfron", "sampler": {"sampler": "ddpm", "steps": 250, "guidance_scale": 4.0,
                                        "sample_batch_size": 32}}))
    prefix = f"{tmp_path}/p-"
    kept = forget_config(StudyConfig(model="m", preset_prefix=prefix), Cell("sfron", "dual", 0, 0), tmp_path)
    assert kept.sampler == SamplerConfig(sampler="ddpm", steps=20, guidance_scale=4.0, sample_batch_size=32)
    study = build_config(StudyConfig, {"model": "m", "preset_prefix": prefix, "guidance_scale": 2.0, "eta": 1.0})
    cell = forget_config(study, Cell("sfron", "dual", 0, 0), tmp_path).sampler
    assert (cell.sampler, cell.steps, cell.guidance_scale, cell.eta, cell.sample_batch_size) == \
        ("ddpm", 20, 2.0, 1.0, 32)


def test_evaluator_passes_the_fid_protocol_and_reference_count(monkeypatch):
    seen = {}

    def fake_metrics(*args, **kw):
        seen.update(kw)
        return dict.fromkeys(("fa", "retain_accuracy", "fid", "forget_mean_prob", "fid_reference_count",
                              "fid_feature_extractor"), 0.0)

    monkeypatch.setattr("diffusion_unlearn.study.sample_metrics", fake_metrics)
    cfg = build_config(StudyConfig, {"fid_protocol": "legacy", "fid_reference_count": 123, "device": "cpu",
                                     "fid_extractor": "inception"})
    Evaluator(cfg, SimpleNamespace(channels=3), None)(None, 0)
    assert (seen["fid_protocol"], seen["reference_count"]) == ("legacy", 123)


# ----------------------------------------------------------------------------- statistics


def test_mean_std_and_summary_on_known_values():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))
    cells = [{"method": "sfron", "optim": "dual", "forget_lr": None, "schedule": "alternate", "iterations": 4,
              "seconds_total": 1.0, "forget_class": c, "fa": fa, "retain_accuracy": 0.9, "fid": fid}
             for c, fa, fid in ((0, 0.0, 10.0), (1, 0.2, 14.0))]
    retrain = {0: {"fa": 0.1, "retain_accuracy": 0.95, "fid": 11.0}}
    rows = summarise(cells, {}, retrain)
    row = rows[0]
    assert row["n"] == 2 and row["fa"] == pytest.approx(0.1) and row["fa_std"] == pytest.approx(math.sqrt(0.02))
    assert row["fid"] == 12.0 and row["fid_std"] == pytest.approx(math.sqrt(8.0))
    assert row["fa_gap"] == pytest.approx(0.1) and row["fid_gap"] == pytest.approx(1.0)  # class 0 only
    assert rows[1]["method"] == "retrain" and rows[1]["fa"] == 0.1


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_study_runs_every_method_and_setup_and_resumes(tiny_model, classifier, presets, tmp_path, monkeypatch):
    out = tmp_path / "study"
    assert _study(["--classes", "0,1"], tiny_model, classifier, out, presets) == 0
    rows = list(csv.DictReader((out / "cells.csv").open()))
    assert len(rows) == 3 * 2 * 2
    assert {(r["method"], r["optim"]) for r in rows} == {(m, o) for m in TINY_PRESETS for o in ("dual", "shared")}
    assert {r["schedule"] for r in rows if r["method"] == "sa"} == {"alternate", "joint"}
    for r in rows:
        assert 0.0 <= float(r["fa"]) <= 1.0 and float(r["fid"]) > 0
    result = read_json(out / "cells" / "sfron-dual-c1-s0" / "result.json")
    assert [p["iteration"] for p in result["curve"]] == [2, 4]
    # one mask per method and class, one SA replay for the whole study, shared by both setups
    assert len(list((out / "shared").glob("mask-*.safetensors"))) == 4
    assert len(list((out / "shared").glob("sa-s0-*/sa_fisher.safetensors"))) == 1  # named by a key of its settings
    table = (out / "table.md").read_text()
    for method in TINY_PRESETS:
        assert f"| {method} | dual | 2 |" in table and f"| {method} | shared | 2 |" in table
    assert "| base | – | 2 |" in table and "ddim 2 steps" in table and "sa + shared: schedule joint" in table
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # a finished study reruns nothing and writes the same table
    import diffusion_unlearn.study as study_module

    monkeypatch.setattr(study_module, "forget", lambda *a, **k: pytest.fail("a finished cell was rerun"))
    assert _study(["--classes", "0,1"], tiny_model, classifier, out, presets) == 0
    assert (out / "table.md").read_text() == table


@pytest.mark.slow
def test_lr_sensitivity_retrain_gap_and_parallel_cells(tiny_model, classifier, presets, tmp_path):
    retrain = tmp_path / "retrain"
    loaded = load_model_folder(tiny_model, "cpu")
    save_model_folder(retrain / "without-zero", loaded.denoiser, replace(loaded.meta, excluded_classes=[0]))
    out = tmp_path / "study"
    args = ["--methods", "sfron", "--classes", "0", "--forget-lrs", "1e-4,1e-3", "--retrain-dir", str(retrain),
            "--jobs", "2"]
    assert _study(args, tiny_model, classifier, out, presets) == 0
    rows = list(csv.DictReader((out / "cells.csv").open()))
    assert sorted((r["optim"], float(r["forget_lr"])) for r in rows) == [
        ("dual", 1e-4), ("dual", 1e-3), ("shared", 1e-4), ("shared", 1e-3)]
    assert {float(r["retain_lr_used"]) for r in rows if r["optim"] == "shared"} == {1e-4, 1e-3}
    summary = json.loads((out / "summary.json").read_text())
    assert all(r["fa_gap"] is not None for r in summary["rows"] if r["method"] == "sfron")
    assert "gap FA" in (out / "table.md").read_text()
    assert (out / "lr-sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    # a class without a retrain model is named before any work
    assert _study([*args[:4], "--classes", "0,1", "--retrain-dir", str(retrain)], tiny_model, classifier,
                  tmp_path / "other", presets) == 2


def test_bad_inputs_fail_before_work(tiny_model, classifier, presets, tmp_path, capsys):
    assert _study(["--methods", "sfron,nope"], tiny_model, classifier, tmp_path / "s", presets) == 2
    assert "unknown" in capsys.readouterr().err
    assert main(["study", "--model", str(tiny_model), "--out", str(tmp_path / "s")]) == 2
    assert "--classifier is required" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_until_forgotten_and_relearn_study_finishes_and_resumes(tiny_model, classifier, tmp_path, monkeypatch):
    """Second edition: every cell runs until forgotten (the cap when not); a later sitting with --relearn only
    relearns the finished cells; the base and retrain models get relearn rows; a finished study reruns nothing."""
    (tmp_path / "p-sfron.yaml").write_text(yaml.safe_dump(
        {**TINY_PRESETS["sfron"], "method": "sfron", "probe_retain_per_class": 1}))
    retrain = tmp_path / "retrain"
    loaded = load_model_folder(tiny_model, "cpu")
    save_model_folder(retrain / "without-zero", loaded.denoiser, replace(loaded.meta, excluded_classes=[0]))
    out = tmp_path / "study"
    args = ["--methods", "sfron", "--classes", "0", "--retrain-dir", str(retrain), "--until-forgotten",
            "--max-iterations", "4", "--probe-every", "2", "--probe-samples", "4"]
    assert _study(args, tiny_model, classifier, out, f"{tmp_path}/p-") == 0
    assert "steps_to_relearn" not in read_json(out / "cells" / "sfron-dual-c0-s0" / "result.json")
    import diffusion_unlearn.study as study_module

    with monkeypatch.context() as m:
        m.setattr(study_module, "forget", lambda *a, **k: pytest.fail("a finished forget run was rerun"))
        args += ["--relearn", "1", "--relearn-steps", "2", "--relearn-probe-every", "1", "--relearn-batch-size", "4",
                 "--relearn-probe-samples", "4"]
        assert _study(args, tiny_model, classifier, out, f"{tmp_path}/p-") == 0
    result = read_json(out / "cells" / "sfron-dual-c0-s0" / "result.json")
    assert result["iterations_to_forget"] in (2, 4) and isinstance(result["forgotten"], bool)
    assert result["forgotten"] or result["iterations_to_forget"] == 4  # not forgotten: the cap
    assert [p["iteration"] for p in result["stop_curve"]][-1] == result["iterations_to_forget"]
    steps = result["steps_to_relearn_k1"]
    assert steps == result["steps_to_relearn"]["1"] and (steps <= 2) == result["relearned_k1"]  # N + 1 = 3: not
    rows = list(csv.DictReader((out / "cells.csv").open()))
    assert len(rows) == 2 and {"iterations_to_forget", "steps_to_relearn_k1", "fa_in_distribution_vs_retrain",
                               "steps_to_relearn_k1_vs_retrain"} <= set(rows[0])
    summary = read_json(out / "summary.json")
    assert set(summary["references_relearn"]) == {"base", "retrain"}
    assert {r["measure"] for r in summary["stability"]} >= {"iterations_to_forget", "fa_in_distribution", "fid"}
    table = (out / "table.md").read_text()
    assert "## Stability: std(dual)/std(shared)" in table and "until forgotten" in table
    assert "relearning: K = 1" in table
    assert (out / "probes.png").read_bytes()[:4] == b"\x89PNG"  # every cell's stop and relearn probes

    monkeypatch.setattr(study_module, "forget", lambda *a, **k: pytest.fail("a finished cell was rerun"))
    monkeypatch.setattr(study_module, "relearn", lambda *a, **k: pytest.fail("a finished relearn was rerun"))
    assert _study(args, tiny_model, classifier, out, f"{tmp_path}/p-") == 0
    assert (out / "table.md").read_text() == table

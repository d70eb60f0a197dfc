"""The second edition's statistics and settings: the std(dual)/std(shared) ratio with its bootstrap CI and
Levene's test on numbers whose answer is known, the censoring of "not within N" and of the cap, the signed gap
to the retrain model, and how the study's stop and relearn flags reach each cell's runs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffusion_unlearn.config import RelearnConfig, StudyConfig, build_config
from diffusion_unlearn.eval.study_report import (censored_steps, levene_p, stability, std_ratio_ci, summarise,
                                                 table_markdown, with_gaps)
from diffusion_unlearn.fileio import UserError
from diffusion_unlearn.study import Cell, forget_config, relearn_columns, relearn_config, study_record


def _normal(std: float, n: int, seed: int) -> list[float]:
    z = np.random.default_rng(seed).standard_normal(n)
    return list(std * (z - z.mean()) / z.std(ddof=1))  # sample std exactly `std`


def test_std_ratio_of_std_one_and_two_is_a_half_with_a_covering_ci():
    a, b = _normal(1.0, 60, 1), _normal(2.0, 60, 2)
    ratio, low, high = std_ratio_ci(a, b)
    assert ratio == pytest.approx(0.5)
    assert low < 0.5 < high and high < 1.0  # covers the truth, excludes "no difference"
    assert std_ratio_ci(a, b) == (ratio, low, high)  # a fixed seed: the same interval
    assert levene_p(a, b) < 0.01


def test_identical_samples_have_ratio_one_and_levene_p_one():
    a = _normal(1.0, 20, 3)
    ratio, low, high = std_ratio_ci(a, list(a))
    assert ratio == pytest.approx(1.0) and low < 1.0 < high
    assert levene_p(a, list(a)) == pytest.approx(1.0)


def test_too_few_cells_give_no_ratio():
    assert all(math.isnan(v) for v in std_ratio_ci([1.0], [1.0, 2.0]))
    assert math.isnan(levene_p([1.0], [1.0, 2.0]))


def test_censoring_counts_not_within_n_as_n_plus_one():
    assert censored_steps(None, 300) == (301, False)
    assert censored_steps(0, 300) == (0, True) and censored_steps(300, 300) == (300, True)
    cols = relearn_columns([{"shots": 5, "steps_to_relearn": None, "curve": []},
                            {"shots": 1, "steps_to_relearn": 20, "curve": []}], 40)
    assert (cols["steps_to_relearn_k5"], cols["relearned_k5"]) == (41, False)
    assert (cols["steps_to_relearn_k1"], cols["relearned_k1"]) == (20, True)
    assert cols["steps_to_relearn"] == {"5": 41, "1": 20}


def _cell(optim, c, seed, **values):
    return {"method": "sfron", "optim": optim, "forget_lr": None, "schedule": "alternate", "iterations": 4,
            "seconds_total": 1.0, "forget_class": c, "seed": seed, "steps_to_relearn": {"5": 0}, **values}


def test_summary_aggregates_censored_values_and_signed_gaps():
    cells = [_cell("dual", 0, 0, iterations_to_forget=20, forgotten=True, fa_in_distribution=0.0,
                   steps_to_relearn_k5=11, relearned_k5=False),  # N = 10: not within N
             _cell("dual", 1, 0, iterations_to_forget=40, forgotten=False, fa_in_distribution=0.02,
                   steps_to_relearn_k5=5, relearned_k5=True)]
    retrain = {0: {"fa_in_distribution": 0.0}, 1: {"fa_in_distribution": 0.0}}
    relearned = {"retrain": {(0, 0): {"steps_to_relearn_k5": 7}, (1, 0): {"steps_to_relearn_k5": 9}},
                 "base": {(0, 0): {"steps_to_relearn_k5": 0}, (1, 0): {"steps_to_relearn_k5": 0}}}
    rows = summarise(cells, {0: {"fa_in_distribution": 0.5}, 1: {"fa_in_distribution": 0.5}}, retrain, relearned)
    dual = rows[0]
    assert dual["iterations_to_forget"] == 30 and dual["not_forgotten"] == 1
    assert dual["steps_to_relearn_k5"] == 8 and dual["not_relearned_k5"] == 1
    assert dual["steps_to_relearn_k5_vs_retrain"] == pytest.approx(0.0)  # (11 − 7 + 5 − 9) / 2
    assert dual["steps_to_relearn_k5_vs_retrain_std"] == pytest.approx(math.sqrt(32))
    assert dual["steps_to_relearn_k5_gap"] == pytest.approx(4.0)  # mean |gap|
    assert dual["fa_in_distribution_vs_retrain"] == pytest.approx(0.01)
    base, retrain_row = rows[1], rows[2]
    assert base["method"] == "base" and base["steps_to_relearn_k5"] == 0 and base["not_relearned_k5"] == 0
    assert retrain_row["steps_to_relearn_k5"] == 8 and retrain_row["fa_in_distribution"] == 0.0
    assert [c["steps_to_relearn_k5_vs_retrain"] for c in with_gaps(cells, retrain, relearned["retrain"])] == [4, -4]
    table = table_markdown(rows, [], (("iterations_to_forget", "it", False),))
    assert "1 not forgotten, 1 not relearned (K=5)" in table


def test_stability_compares_dual_with_shared_per_method():
    dual = [_cell("dual", c, 0, fid=v) for c, v in enumerate(_normal(1.0, 8, 4))]
    shared = [_cell("shared", c, 0, fid=v) for c, v in enumerate(_normal(2.0, 8, 5))]
    only_dual = [{**c, "method": "sa"} for c in dual]  # no shared cells: no comparison
    (row,) = [r for r in stability(dual + shared + only_dual) if r["measure"] == "fid"]
    assert row["method"] == "sfron" and (row["n_dual"], row["n_shared"]) == (8, 8)
    assert row["ratio"] == pytest.approx(0.5) and row["ci_low"] < 0.5 < row["ci_high"]
    assert row["std_dual"] == pytest.approx(1.0) and 0 <= row["levene_p"] <= 1
    assert table_markdown([], [], (), [row]).count("## Stability: std(dual)/std(shared)") == 1


def test_study_flags_reach_each_cells_runs(tmp_path):
    cfg = build_config(StudyConfig, {"model": "m", "classifier": "clf", "until_forgotten": True,
                                     "max_iterations": 40, "probe_every": 5, "relearn": "1,5", "relearn_steps": 30,
                                     "relearn_lr": 1e-3})
    fc = forget_config(cfg, Cell("sfron", "dual", 3, 1), tmp_path)
    assert (fc.until_forgotten, fc.max_iterations, fc.probe_every, fc.classifier) == (True, 40, 5, "clf")
    assert fc.planned_iterations == 40 and fc.target_fa == 0.01  # unset: the preset's, else ForgetConfig's
    rc = relearn_config(cfg, tmp_path / "model", 3, 1, tmp_path / "r")
    assert (rc.shots, rc.max_steps, rc.lr, rc.seed, rc.forget_class) == ("1,5", 30, 1e-3, 1, 3)
    assert rc.batch_size == RelearnConfig().batch_size  # unset: relearn's default
    assert rc.sampler.steps == cfg.sampler.steps  # the study's evaluation sampler
    with pytest.raises(UserError, match="--max-iterations"):
        build_config(StudyConfig, {"until_forgotten": True, "iterations": "150"})


def test_a_plain_study_records_no_stop_or_relearn_settings(tmp_path):
    (tmp_path / "m").mkdir()
    plain = study_record(StudyConfig(model=str(tmp_path / "m")), "study-cell").settings
    assert not any(k.startswith("relearn.") or k in ("until_forgotten", "max_iterations") for k in plain)
    with_flags = build_config(StudyConfig, {"model": str(tmp_path / "m"), "classifier": "c", "until_forgotten": True,
                                            "relearn": "5"})
    assert study_record(with_flags, "study-cell").settings == plain | {"classifier": "c"}

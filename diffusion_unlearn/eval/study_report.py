"""The study's outputs: `table.md` (paper Table 1/3 style: mean ± std over forgotten classes and seeds, gap to the
retrain baseline, and the stability table std(dual)/std(shared)), `cells.csv` (one row per cell), `summary.json`,
`curves.png` (paper Figure 2 style: FA and FID over unlearning iterations, mean line and ±1 std band per optimizer
setup) and `lr-sensitivity.png`. The statistics are defined in docs/stopping-and-relearning.md ("Study")."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from diffusion_unlearn.eval.report import save_figure
from diffusion_unlearn.fileio import atomic_path, write_json

FA, RA, FID = ("fa", "FA %", True), ("retain_accuracy", "retained acc. %", True), ("fid", "FID", False)
METRICS = (FA, RA, FID)  # the curves' measures (and the plain study's first table columns)
# Every per-cell measure of the table, the gaps and the stability test (key, label, shown in %); relearning adds
# `steps_to_relearn_k<K>` per K (relearn_measures). A measure no cell has is left out.
MEASURES = (("iterations_to_forget", "iterations to forget", False), FA,
            ("fa_in_distribution", "FA in distribution %", True), RA, FID, ("forget_fid", "forget FID", False))
CSV_FIELDS = ("cell", "method", "optim", "schedule", "forget_class", "seed", "forget_lr", "forget_lr_used",
              "retain_lr_used", "iterations", "batch_size", "fa", "retain_accuracy", "fid", "forget_mean_prob",
              "seconds_forget", "seconds_total", "fa_in_distribution", "ood_rate", "forget_fid",
              "iterations_to_forget", "forgotten", "seconds_relearn")
GAP = "_vs_retrain"  # a cell's measure minus the retrain model's (same class; same seed for relearning)
SETUPS = ("dual", "shared")  # the stability ratio: std over the dual cells / std over the shared cells
RESAMPLES, BOOTSTRAP_SEED, LEVEL = 2000, 0, 0.95


def censored_steps(found: int | None, max_steps: int) -> tuple[int, bool]:
    """Steps to relearn as a number: the step found, or N + 1 when "not within N" (flag False). Statistics then
    use N + 1, a lower bound of the unobserved value: a mean over censored cells is a lower bound of the mean."""
    return (found, True) if found is not None else (max_steps + 1, False)


def relearn_measures(results: list[dict]) -> tuple[tuple[str, str, bool], ...]:
    """`steps_to_relearn_k<K>` for each K the cells relearned from."""
    shots = sorted({int(k) for r in results for k in (r.get("steps_to_relearn") or {})})
    return tuple((f"steps_to_relearn_k{k}", f"steps to relearn (K={k})", False) for k in shots)


def measures_of(results: list[dict]) -> tuple[tuple[str, str, bool], ...]:
    """The measures at least one cell has, in table order."""
    return tuple(m for m in MEASURES + relearn_measures(results) if any(_value(r, m[0]) is not None for r in results))


def _value(r: dict | None, key: str) -> float | None:
    v = None if r is None else r.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value), NaN-free."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    m = sum(values) / len(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return m, math.sqrt(var)


def group_key(r: dict) -> tuple:
    return r["method"], r["optim"], r["forget_lr"]


def retrain_reference(r: dict, retrain: dict[int, dict], relearned: dict[tuple[int, int], dict]) -> dict | None:
    """The retrain model's measures for a cell: its scores for the cell's class, and its relearn columns for the
    cell's class and seed; None without a retrain model of that class."""
    if r["forget_class"] not in retrain:
        return None
    return {**retrain[r["forget_class"]], **relearned.get((r["forget_class"], r.get("seed")), {})}


def with_gaps(results: list[dict], retrain: dict[int, dict], relearned: dict[tuple[int, int], dict] | None = None
              ) -> list[dict]:
    """Copies of the cells with `<measure>_vs_retrain` = cell − retrain model, where both have the measure."""
    out = []
    for r in results:
        ref = retrain_reference(r, retrain, relearned or {})
        gaps = {f"{key}{GAP}": _value(r, key) - _value(ref, key) for key, _, _ in measures_of([r])
                if _value(ref, key) is not None}
        out.append({**r, **gaps})
    return out


def summarise(results: list[dict], base: dict[int, dict], retrain: dict[int, dict],
              relearned: dict[str, dict[tuple[int, int], dict]] | None = None) -> list[dict]:
    """One row per (method, optimizer setup, forget lr): mean ± std of each measure (`<key>`, `<key>_std`), the
    signed gap to the retrain model of the same class (`<key>_vs_retrain`, `_std`) and its mean absolute value
    (`<key>_gap`), and the count of censored cells (`not_forgotten`, `not_relearned_k<K>`). Then the reference
    rows: the base and retrain models (their relearn rows over the cells' classes and seeds)."""
    relearned = relearned or {}
    measures = measures_of(results)
    cells_with_gaps = with_gaps(results, retrain, relearned.get("retrain"))
    groups: dict[tuple, list[dict]] = {}
    for r in cells_with_gaps:
        groups.setdefault(group_key(r), []).append(r)
    rows = []
    for (method, optim, lr), cells in groups.items():
        row = {"method": method, "optim": optim, "forget_lr": lr, "n": len(cells),
               "schedule": cells[0]["schedule"], "iterations": cells[0]["iterations"],
               "seconds_per_cell": mean_std([c["seconds_total"] for c in cells])[0]}
        for key, _, _ in measures:
            row[key], row[f"{key}_std"] = mean_std([_value(c, key) for c in cells])
            gaps = [c[f"{key}{GAP}"] for c in cells if f"{key}{GAP}" in c]
            row[f"{key}{GAP}"], row[f"{key}{GAP}_std"] = mean_std(gaps) if gaps else (None, None)
            row[f"{key}_gap"] = mean_std([abs(g) for g in gaps])[0] if gaps else None
        if any("forgotten" in c for c in cells):
            row["not_forgotten"] = sum(not c.get("forgotten", True) for c in cells)
        for key, _, _ in relearn_measures(cells):
            row[f"not_relearned_k{key.rsplit('_k', 1)[1]}"] = sum(
                not c.get(f"relearned_k{key.rsplit('_k', 1)[1]}", True) for c in cells)
        rows.append(row)
    for name, ref in (("base", base), ("retrain", retrain)):
        if ref:
            relearn_rows = list(relearned.get(name, {}).values())
            row = {"method": name, "optim": "–", "forget_lr": None, "n": len(ref), "schedule": "–",
                   "iterations": 0, "seconds_per_cell": None}
            for key, _, _ in measures:
                values = [s.get(key) for s in (relearn_rows if key.startswith("steps_to_relearn") else ref.values())]
                row[key], row[f"{key}_std"] = mean_std(values)
                row[f"{key}{GAP}"] = row[f"{key}{GAP}_std"] = row[f"{key}_gap"] = None
            for key, _, _ in relearn_measures(results):
                k = key.rsplit("_k", 1)[1]
                row[f"not_relearned_k{k}"] = sum(not r.get(f"relearned_k{k}", True) for r in relearn_rows)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- stability: std(dual) / std(shared)


def std_ratio_ci(a: list[float], b: list[float], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = LEVEL) -> tuple[float, float, float]:
    """std(a)/std(b) (sample stds, n − 1) and its percentile bootstrap interval: each of `resamples` draws
    resamples a and b with replacement, each within itself (fixed seed). Needs two values on each side (else NaNs);
    a resample whose b values are all equal has ratio ∞ (or NaN when a's are too; left out of the percentiles)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)  # (n_a,), (n_b,)
    if len(x) < 2 or len(y) < 2:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    sx = x[rng.integers(0, len(x), (resamples, len(x)))].std(axis=1, ddof=1)  # (R,)
    sy = y[rng.integers(0, len(y), (resamples, len(y)))].std(axis=1, ddof=1)  # (R,)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.float64(x.std(ddof=1)) / np.float64(y.std(ddof=1))
        boot = sx / sy  # (R,)
    tail = 100 * (1 - level) / 2
    kept = boot[~np.isnan(boot)]  # (R',) ∞ stays: an order statistic, not interpolated
    low, high = np.percentile(kept, [tail, 100 - tail], method="inverted_cdf") if len(kept) else (math.nan, math.nan)
    return float(ratio), float(low), float(high)


def levene_p(a: list[float], b: list[float]) -> float:
    """p-value of Levene's test of equal spread with the median as centre (Brown–Forsythe; scipy); NaN when a side
    has fewer than two values or both are constant."""
    from scipy.stats import levene

    if len(a) < 2 or len(b) < 2:
        return math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(levene(a, b, center="median").pvalue)


def stability(results: list[dict], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> list[dict]:
    """Per method (and forget lr) with both setups, per measure: the spread of the dual cells against the shared
    cells (over forgotten classes and seeds): stds, their ratio with its bootstrap CI, and Levene's p-value."""
    rows = []
    for method, lr in dict.fromkeys((r["method"], r["forget_lr"]) for r in results):
        cells = {o: [r for r in results if (r["method"], r["forget_lr"], r["optim"]) == (method, lr, o)]
                 for o in SETUPS}
        if not all(cells.values()):
            continue
        for key, label, pct in measures_of(cells["dual"] + cells["shared"]):
            a, b = ([v for c in cells[o] if (v := _value(c, key)) is not None] for o in SETUPS)
            ratio, low, high = std_ratio_ci(a, b, resamples, seed)
            rows.append({"method": method, "forget_lr": lr, "measure": key, "label": label, "pct": pct,
                         "n_dual": len(a), "n_shared": len(b), "std_dual": mean_std(a)[1],
                         "std_shared": mean_std(b)[1], "ratio": ratio, "ci_low": low, "ci_high": high,
                         "levene_p": levene_p(a, b)})
    return rows


def _number(v: float, digits: int = 2) -> str:
    return "–" if v is None or math.isnan(v) else ("∞" if math.isinf(v) else f"{v:.{digits}f}")


def stability_markdown(rows: list[dict], resamples: int = RESAMPLES) -> list[str]:
    """The "Stability: std(dual)/std(shared)" table, a line per method and measure."""
    if not rows:
        return []
    has_lr = any(r["forget_lr"] is not None for r in rows)
    head = ["method", *(["forget lr"] if has_lr else []), "measure", "cells dual / shared", "std dual",
            "std shared", "std(dual)/std(shared) [95 % CI]", "Levene p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        scale = 100 if r["pct"] else 1
        lines.append("| " + " | ".join([
            r["method"], *([f"{r['forget_lr']:g}" if r["forget_lr"] else "preset"] if has_lr else []),
            r["label"], f"{r['n_dual']} / {r['n_shared']}", _number(scale * r["std_dual"]),
            _number(scale * r["std_shared"]),
            f"{_number(r['ratio'])} [{_number(r['ci_low'])}, {_number(r['ci_high'])}]",
            _number(r["levene_p"], 3)]) + " |")
    return ["## Stability: std(dual)/std(shared)", "",
            "Spread over forgotten classes and seeds of each measure with DualOptim (dual) against one shared "
            "optimizer (shared). Ratio < 1: dual spreads less. 95 % CI: percentile bootstrap over "
            f"{resamples} resamples of the cells, with replacement within each setup (seed {BOOTSTRAP_SEED}); a CI "
            "that excludes 1 is a difference at the 5 % level. Levene p: Levene's test of equal variances with "
            "the median as centre (Brown–Forsythe, scipy.stats.levene). Censored values (the cap, N + 1) enter "
            "as they are.", "", *lines, ""]


# ----------------------------------------------------------------------------- the table


def _cell(mean: float, std: float, pct: bool) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    scale = 100 if pct else 1
    return f"{scale * mean:.1f} ± {scale * std:.1f}" if pct else f"{mean:.2f} ± {std:.2f}"


def _censored(r: dict) -> str:
    counts = [f"{r['not_forgotten']} not forgotten"] if r.get("not_forgotten") else []
    counts += [f"{n} not relearned (K={key.rsplit('_k', 1)[1]})" for key, n in r.items()
               if key.startswith("not_relearned_k") and n]
    return ", ".join(counts) or "–"


def table_markdown(rows: list[dict], protocol: list[str], measures: tuple = METRICS,
                   stable: list[dict] | None = None) -> str:
    has_gap = any(r.get(f"{k}{GAP}") is not None for r in rows for k, _, _ in measures)
    gap_measures = [m for m in measures if any(r.get(f"{m[0]}{GAP}") is not None for r in rows)]
    has_lr = any(r["forget_lr"] is not None for r in rows)
    has_censored = any("not_forgotten" in r or any(k.startswith("not_relearned_k") for k in r) for r in rows)
    head = ["method", "optimizer", *(["forget lr"] if has_lr else []), "cells",
            *[label for _, label, _ in measures], *[f"gap {label.removesuffix(' %')}" for _, label, _ in gap_measures],
            *(["censored"] if has_censored else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        values = [r["method"], r["optim"], *([f"{r['forget_lr']:g}" if r["forget_lr"] else "preset"]
                                             if has_lr else []), str(r["n"]),
                  *[_cell(r.get(k), r.get(f"{k}_std"), pct) for k, _, pct in measures],
                  *[_cell(r.get(f"{k}{GAP}"), r.get(f"{k}{GAP}_std"), pct) for k, _, pct in gap_measures],
                  *([_censored(r)] if has_censored else [])]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(["# Unlearning stability study", "",
                      "Mean ± standard deviation over forgotten classes and seeds (one cell per class × seed)"
                      + ("; gap: cell − retrain model of the same class (and seed, for relearning), mean ± std "
                         "(summary.json also has the mean |gap|)." if has_gap else "."), "",
                      *lines, "", *stability_markdown(stable or []), "## Protocol", "",
                      *[f"- {p}" for p in protocol], ""])


def write_csv(results: list[dict], path: Path) -> None:
    """Every cell, the CSV_FIELDS first, then the columns some cells add (per-K relearn columns, gaps)."""
    extra = [k for k in dict.fromkeys(k for r in results for k in r)
             if k not in CSV_FIELDS and (k.startswith(("steps_to_relearn_k", "relearned_k")) or k.endswith(GAP))]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*CSV_FIELDS, *extra], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(results)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def _curve_points(cells: list[dict], base: dict[int, dict], key: str) -> tuple[list[int], list[float], list[float]]:
    """Mean and std over cells of a metric at each curve iteration (iteration 0: the base model)."""
    by_iteration: dict[int, list[float]] = {}
    for c in cells:
        points = [{"iteration": 0, **base[c["forget_class"]]["curve"]}] if c["forget_class"] in base else []
        for p in points + c["curve"]:
            by_iteration.setdefault(p["iteration"], []).append(p[key])
    its = sorted(by_iteration)
    stats = [mean_std(by_iteration[i]) for i in its]
    return its, [m for m, _ in stats], [s for _, s in stats]


def _method_panels(results: list[dict], path: Path, title: str, xlabel: str, draw, log_x: bool = False) -> None:
    """One row per method, columns FA and FID; `draw(ax, method, key, scale)` plots a panel's lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in results))
    fig, axes = plt.subplots(len(methods), 2, figsize=(10, 3.2 * len(methods)), squeeze=False)
    for row, method in zip(axes, methods):
        for ax, (key, label, pct) in zip(row, (METRICS[0], METRICS[2])):
            draw(ax, method, key, 100 if pct else 1)
            if log_x:
                ax.set_xscale("log")
            ax.set_title(f"{method}: {title}{label}")
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    save_figure(fig, path)


def curves_plot(results: list[dict], base: dict[int, dict], retrain: dict[int, dict], path: Path) -> None:
    """Figure 2 style: FA and FID over unlearning iterations, a line (mean) and band (±1 std) per setup, the
    retrain baseline dashed."""

    def draw(ax, method: str, key: str, scale: float) -> None:
        groups: dict[tuple, list[dict]] = {}
        for r in results:
            if r["method"] == method:
                groups.setdefault((r["optim"], r["forget_lr"]), []).append(r)
        for (optim, lr), cells in groups.items():
            its, mean, std = _curve_points(cells, base, key)
            line, = ax.plot(its, [scale * m for m in mean], lw=1.5, label=optim if lr is None else f"{optim} lr={lr:g}")
            low, high = (0.0, 100.0) if scale == 100 else (-math.inf, math.inf)  # a share's band stays in 0..100 %
            ax.fill_between(its, [max(low, scale * (m - s)) for m, s in zip(mean, std)],
                            [min(high, scale * (m + s)) for m, s in zip(mean, std)], color=line.get_color(), alpha=0.2)
        if retrain:
            ax.axhline(scale * mean_std([s[key] for s in retrain.values()])[0], color="red", ls="--", lw=1,
                       label="retrain")

    _method_panels(results, path, "", "unlearning iteration", draw)


def probes_plot(results: list[dict], relearned: dict[str, dict[tuple[int, int], dict]], path: Path) -> None:
    """Every cell's probes, one thin line per cell: fa_in_distribution while forgetting (`stop_curve`, until the
    stop) and while relearning from the first K's images (the retrain model's runs dashed red). One row per
    method; where the mean curves of `curves_plot` hide who stopped when, these show each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in results))
    colours = dict(zip(SETUPS, ("tab:blue", "tab:orange")))

    def fa_line(ax, curve: list[dict], x: str, **kw) -> None:  # one probe curve: fa_in_distribution in % over x
        ax.plot([p[x] for p in curve], [100 * p["fa_in_distribution"] for p in curve], **kw)

    fig, axes = plt.subplots(len(methods), 2, figsize=(10, 3.2 * len(methods)), squeeze=False)
    for (forgetting, relearning), method in zip(axes, methods):
        cells = [r for r in results if r["method"] == method]
        for optim in dict.fromkeys(r["optim"] for r in cells):
            mine = [r for r in cells if r["optim"] == optim]
            for i, r in enumerate(mine):
                kw = dict(color=colours.get(optim), lw=0.8, alpha=0.5, label=optim if i == 0 else None)
                fa_line(forgetting, r.get("stop_curve") or [], "iteration", **kw)
                if r.get("relearn"):
                    fa_line(relearning, r["relearn"][0]["curve"], "step", **kw)
        for i, ref in enumerate(relearned.get("retrain", {}).values()):
            if ref.get("relearn"):
                fa_line(relearning, ref["relearn"][0]["curve"], "step", color="red", ls="--", lw=0.8, alpha=0.6,
                        label="retrain" if i == 0 else None)
        shots = next((r["relearn"][0]["shots"] for r in cells if r.get("relearn")), None)
        forgetting.set_title(f"{method}: FA in distribution % while forgetting")
        forgetting.set_xlabel("unlearning iteration")
        relearning.set_title(f"{method}: ... while relearning from K = {shots} images")
        relearning.set_xlabel("fine-tuning step")
        for ax in (forgetting, relearning):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # a panel without lines (no relearning) gets no legend
                ax.legend(fontsize=8)
    save_figure(fig, path)


def lr_plot(results: list[dict], path: Path) -> None:
    """Final FA and FID against the forget lr (shared: its one lr), mean ± std per setup."""

    def draw(ax, method: str, key: str, scale: float) -> None:
        for optim in dict.fromkeys(r["optim"] for r in results):
            cells = [r for r in results if r["method"] == method and r["optim"] == optim]
            lrs = sorted({c["forget_lr"] for c in cells})
            stats = [mean_std([c[key] for c in cells if c["forget_lr"] == lr]) for lr in lrs]
            ax.errorbar(lrs, [scale * m for m, _ in stats], yerr=[scale * s for _, s in stats], capsize=3,
                        marker="o", label=optim)

    _method_panels(results, path, "final ", "forget lr (shared: its one lr)", draw, log_x=True)


def _length(r: dict) -> str:
    """How long a cell's run was: its iterations, or until forgotten with its target and cap."""
    if "max_iterations" not in r:
        return f"{r['iterations']} iterations"
    return (f"until forgotten (fa_in_distribution ≤ {r['target_fa']:g} on two consecutive probes every "
            f"{r['probe_every']} iterations; cap {r['max_iterations']}, the iterations to forget of a cell that "
            "reaches it)")


def protocol_lines(cfg, results: list[dict], sample_scores: dict, notes: tuple[str, ...] = ()) -> list[str]:
    s = cfg.sampler
    per_setup = sorted({(r["method"], r["optim"], r["schedule"], _length(r), r["batch_size"],
                         r["forget_lr_used"], r["retain_lr_used"]) for r in results})
    return [
        f"model `{cfg.model}`, dataset {cfg.dataset}, classifier `{cfg.classifier}`; presets `{cfg.preset_prefix}"
        f"<method>-<optim>.yaml` where present, else `{cfg.preset_prefix}<method>.yaml`",
        f"sampler {s.sampler} {s.steps} steps (η={s.eta:g}), guidance s={s.guidance_scale:g} (lineage w="
        f"{s.guidance_scale - 1:g}), sampler seed {s.sample_seed}",
        f"final scores: FA on {cfg.fa_samples} samples of the forgotten class; retained accuracy and FID on "
        f"{cfg.retain_samples_per_class} samples per retained class vs {sample_scores.get('fid_reference_count')} "
        f"real images ({sample_scores.get('fid_feature_extractor')})",
        f"curves: every {cfg.curve_every} iterations, {cfg.curve_fa_samples} forgotten-class samples and "
        f"{cfg.curve_retain_per_class} per retained class (FID on so few samples is biased upward: compare curves "
        "with each other, not with the table)",
        *[f"{m} + {o}: schedule {sch}, {it}, batch {b}, forget lr {fl:g}, retain lr {rl:g}"
          + (" (shared: one optimizer at the retain lr)" if o == "shared" else "")
          for m, o, sch, it, b, fl, rl in per_setup],
        *notes,
    ]


def write_study_outputs(cfg, results: list[dict], base: dict[int, dict], retrain: dict[int, dict],
                        root: Path, relearned: dict[str, dict[tuple[int, int], dict]] | None = None,
                        notes: tuple[str, ...] = ()) -> dict:
    """The outputs from the finished cells, the reference scores (class → scores), the reference relearn rows
    (name → (class, seed) → relearn columns) and extra protocol lines."""
    relearned = relearned or {}
    rows = summarise(results, base, retrain, relearned)
    stable = stability(results)
    sample_scores = next(iter(base.values()), {})
    table = root / "table.md"
    with atomic_path(table) as tmp:
        tmp.write_text(table_markdown(rows, protocol_lines(cfg, results, sample_scores, notes), measures_of(results),
                                      stable))
    write_csv(with_gaps(results, retrain, relearned.get("retrain")), root / "cells.csv")
    write_json(root / "summary.json", {"rows": rows, "stability": stable, "cells": len(results),
                                       "references_relearn": {name: [{"forget_class": c, "seed": s, **v}
                                                                     for (c, s), v in refs.items()]
                                                              for name, refs in relearned.items()}})
    curves_plot(results, base, retrain, root / "curves.png")
    outputs = {"table": str(table), "csv": str(root / "cells.csv"), "curves": str(root / "curves.png")}
    if any(r.get("stop_curve") for r in results):
        probes_plot(results, relearned, root / "probes.png")
        outputs["probes"] = str(root / "probes.png")
    if any(r["forget_lr"] is not None for r in results):
        lr_plot(results, root / "lr-sensitivity.png")
        outputs["lr_sensitivity"] = str(root / "lr-sensitivity.png")
    return outputs

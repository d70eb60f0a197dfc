"""The study's outputs: `table.md` (paper Table 1/3 style: mean ± std over forgotten classes and seeds, gap to the
retrain baseline), `cells.csv` (one row per cell), `summary.json`, `curves.png` (paper Figure 2 style: FA and FID
over unlearning iterations, mean line and ±1 std band per optimizer setup) and `lr-sensitivity.png`."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from diffusion_unlearn.eval.report import save_figure
from diffusion_unlearn.fileio import atomic_path, write_json

METRICS = (("fa", "FA %", True), ("retain_accuracy", "retained acc. %", True), ("fid", "FID", False))
CSV_FIELDS = ("cell", "method", "optim", "schedule", "forget_class", "seed", "forget_lr", "forget_lr_used",
              "retain_lr_used", "iterations", "batch_size", "fa", "retain_accuracy", "fid", "forget_mean_prob",
              "seconds_forget", "seconds_total")


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


def summarise(results: list[dict], base: dict[int, dict], retrain: dict[int, dict]) -> list[dict]:
    """One row per (method, optimizer setup, forget lr): mean ± std of each metric, and the mean absolute gap
    to the retrain baseline of the same forgotten class (over the cells that have one)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(group_key(r), []).append(r)
    rows = []
    for (method, optim, lr), cells in groups.items():
        row = {"method": method, "optim": optim, "forget_lr": lr, "n": len(cells),
               "schedule": cells[0]["schedule"], "iterations": cells[0]["iterations"],
               "seconds_per_cell": mean_std([c["seconds_total"] for c in cells])[0]}
        for key, _, _ in METRICS:
            row[key], row[f"{key}_std"] = mean_std([c[key] for c in cells])
            gaps = [abs(c[key] - retrain[c["forget_class"]][key]) for c in cells if c["forget_class"] in retrain]
            row[f"{key}_gap"] = mean_std(gaps)[0] if gaps else None
        rows.append(row)
    for name, ref in (("base", base), ("retrain", retrain)):
        if ref:
            row = {"method": name, "optim": "–", "forget_lr": None, "n": len(ref), "schedule": "–",
                   "iterations": 0, "seconds_per_cell": None}
            for key, _, _ in METRICS:
                row[key], row[f"{key}_std"] = mean_std([s[key] for s in ref.values()])
                row[f"{key}_gap"] = None
            rows.append(row)
    return rows


def _cell(mean: float, std: float, pct: bool) -> str:
    if math.isnan(mean):
        return "–"
    scale = 100 if pct else 1
    return f"{scale * mean:.1f} ± {scale * std:.1f}" if pct else f"{mean:.2f} ± {std:.2f}"


def table_markdown(rows: list[dict], protocol: list[str]) -> str:
    has_gap = any(r.get("fa_gap") is not None for r in rows)
    has_lr = any(r["forget_lr"] is not None for r in rows)
    head = ["method", "optimizer", *(["forget lr"] if has_lr else []), "cells",
            *[label for _, label, _ in METRICS], *(["gap FA", "gap RA", "gap FID"] if has_gap else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        values = [r["method"], r["optim"], *([f"{r['forget_lr']:g}" if r["forget_lr"] else "preset"]
                                             if has_lr else []), str(r["n"]),
                  *[_cell(r[k], r[f"{k}_std"], pct) for k, _, pct in METRICS]]
        if has_gap:
            values += ["–" if r.get(f"{k}_gap") is None else
                       (f"{100 * r[f'{k}_gap']:.1f}" if pct else f"{r[f'{k}_gap']:.2f}") for k, _, pct in METRICS]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(["# Unlearning stability study", "",
                      "Mean ± standard deviation over forgotten classes and seeds (one cell per class × seed)"
                      + ("; gap: mean |cell − retrain model of the same class|." if has_gap else "."), "",
                      *lines, "", "## Protocol", "", *[f"- {p}" for p in protocol], ""])


def write_csv(results: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
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


def protocol_lines(cfg, results: list[dict], sample_scores: dict) -> list[str]:
    s = cfg.sampler
    per_setup = sorted({(r["method"], r["optim"], r["schedule"], r["iterations"], r["batch_size"],
                         r["forget_lr_used"], r["retain_lr_used"]) for r in results})
    return [
        f"model `{cfg.model}`, dataset {cfg.dataset}, classifier `{cfg.classifier}`; presets `{cfg.preset_prefix}"
        "<method>.yaml`",
        f"sampler {s.sampler} {s.steps} steps (η={s.eta:g}), guidance s={s.guidance_scale:g} (lineage w="
        f"{s.guidance_scale - 1:g}), sampler seed {s.sample_seed}",
        f"final scores: FA on {cfg.fa_samples} samples of the forgotten class; retained accuracy and FID on "
        f"{cfg.retain_samples_per_class} samples per retained class vs {sample_scores.get('fid_reference_count')} "
        f"real images ({sample_scores.get('fid_feature_extractor')})",
        f"curves: every {cfg.curve_every} iterations, {cfg.curve_fa_samples} forgotten-class samples and "
        f"{cfg.curve_retain_per_class} per retained class (FID on so few samples is biased upward: compare curves "
        "with each other, not with the table)",
        *[f"{m} + {o}: schedule {sch}, {it} iterations, batch {b}, forget lr {fl:g}, retain lr {rl:g}"
          + (" (shared: one optimizer at the retain lr)" if o == "shared" else "")
          for m, o, sch, it, b, fl, rl in per_setup],
    ]


def write_study_outputs(cfg, results: list[dict], base: dict[int, dict], retrain: dict[int, dict],
                        root: Path) -> dict:
    rows = summarise(results, base, retrain)
    sample_scores = next(iter(base.values()), {})
    table = root / "table.md"
    with atomic_path(table) as tmp:
        tmp.write_text(table_markdown(rows, protocol_lines(cfg, results, sample_scores)))
    write_csv(results, root / "cells.csv")
    write_json(root / "summary.json", {"rows": rows, "cells": len(results)})
    curves_plot(results, base, retrain, root / "curves.png")
    outputs = {"table": str(table), "csv": str(root / "cells.csv"), "curves": str(root / "curves.png")}
    if any(r["forget_lr"] is not None for r in results):
        lr_plot(results, root / "lr-sensitivity.png")
        outputs["lr_sensitivity"] = str(root / "lr-sensitivity.png")
    return outputs

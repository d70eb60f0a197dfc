"""A Markdown report of one unlearning run: before/after grids, the metrics table, the loss plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffusion_unlearn.fileio import atomic_path


def loss_plot(log_path: str | Path, out_png: str | Path) -> None:
    """Forget and retain losses (and α_k) per iteration from a `log.jsonl`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line]
    it = [r["iteration"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, title in zip(axes, ("forget_loss", "retain_loss", "alpha"),
                              ("forget loss α_k·ℓ_F", "retain loss ℓ_R", "α_k")):
        ax.plot(it, [r.get(key, float("nan")) for r in records], lw=1)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    save_figure(fig, out_png)


def save_figure(fig, path: str | Path) -> None:
    """A matplotlib figure laid out tight, written atomically as PNG (110 dpi), then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f} %" if pct else f"{v:.3f}"


def metrics_table(base: dict, unlearned: dict) -> str:
    rows = [("FA (classifier argmax says the forgotten class) ↓", "fa", True),
            ("FA in distribution (argmax and inside the class's real-image distribution) ↓", "fa_in_distribution",
             True),
            ("forgotten-class samples outside every class's distribution", "ood_rate", True),
            ("forget-FID: forgotten-class samples vs the class's reference ↑", "forget_fid", False),
            ("forget-KID: forgotten-class samples vs the class's reference ↑", "forget_kid", False),
            ("retained-class accuracy ↑", "retain_accuracy", True),
            ("FID on retained classes ↓", "fid", False), ("KID on retained classes ↓", "kid_mean", False),
            ("Inception Score on retained classes ↑", "is_mean", False),
            ("precision on retained classes ↑", "precision", True), ("recall on retained classes ↑", "recall", True),
            ("mean p(forgotten class) ↓", "forget_mean_prob", False),
            ("mean entropy on forgotten class", "forget_mean_entropy", False)]
    lines = ["| metric | base | unlearned | unlearned / base |", "|---|---|---|---|"]
    for label, key, pct in rows:
        b, u = base.get(key), unlearned.get(key)
        ratio = f"{u / b:.2f}" if b not in (None, 0) and u is not None else "–"
        lines.append(f"| {label} | {_fmt(b, pct)} | {_fmt(u, pct)} | {ratio} |")
    return "\n".join(lines)


def per_class_table(base: dict, unlearned: dict) -> str:
    """Classifier accuracy on each class's samples (the forgotten class's is its FA), grid rows in order."""
    before, after = base.get("per_class_accuracy", {}), unlearned.get("per_class_accuracy", {})
    lines = ["| class (grid row) | accuracy before | accuracy after |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(before.get(name), True)} | {_fmt(after.get(name), True)} |" for name in after]
    return "\n".join(lines)


FA_DISAGREEMENT = 0.2  # |fa − fa_in_distribution| above which the report explains the gap


def fa_disagreement(name: str, metrics: dict) -> str | None:
    """A sentence when FA and FA-in-distribution tell different stories (docs/forgetting-measures.md)."""
    fa, fa_in = metrics.get("fa"), metrics.get("fa_in_distribution")
    if fa is None or fa_in is None or abs(fa - fa_in) <= FA_DISAGREEMENT:
        return None
    return (f"**{name}: FA and FA-in-distribution disagree** ({_fmt(fa, True)} vs {_fmt(fa_in, True)}): "
            f"{_fmt(fa - fa_in, True)} of the forgotten-class samples are called the class by the classifier but lie "
            f"outside its real-image distribution ({_fmt(metrics.get('ood_rate'), True)} outside every class's); "
            "look at the grid: these are not drawings of the class.")


def write_report(path: str | Path, *, title: str, base: dict, unlearned: dict, grid_before: Path, grid_after: Path,
                 loss_png: Path, notes: list[str], stopping: dict | None = None) -> Path:
    """`stopping`: a `forget --until-forgotten` run's stopping.json, shown (with its warning) after the metrics."""
    from diffusion_unlearn.stopping import report_section

    path = Path(path)
    rel = lambda p: os.path.relpath(p, path.parent)  # noqa: E731
    protocol = (f"{unlearned['sampler']} {unlearned['steps']} steps (η={unlearned['eta']}), guidance s="
                f"{unlearned['guidance_scale']:g} (lineage w={unlearned['guidance_w']:g}), seed {unlearned['sample_seed']}; "
                f"FA on {unlearned['fa_samples']} samples, retained accuracy and FID on {unlearned['retain_samples']} "
                f"samples vs {unlearned['fid_reference_count']} real images; FID features: "
                f"{unlearned['fid_feature_extractor']}")
    text = "\n".join([
        f"# {title}", "",
        f"Forgotten class: **{unlearned['forget_class_name']}** (index {unlearned['forget_class']}).", "",
        metrics_table(base, unlearned), "",
        *[f"{line}\n" for line in (fa_disagreement("base", base), fa_disagreement("unlearned", unlearned)) if line],
        f"In-distribution test: Mahalanobis feature ensemble on the classifier, false-reject rate "
        f"{_fmt(unlearned.get('ood_false_reject_rate'), True)} on held-out real images "
        "(docs/forgetting-measures.md).", "",
        f"Protocol: {protocol}.", "",
        f"forget-FID/KID reference: {unlearned.get('forget_fid_reference', '–')}; sFID: "
        f"{unlearned.get('sfid_absent', '–')}; metrics made by {unlearned.get('num_processes', 1)} process(es).", "",
        *([report_section(stopping)] if stopping else []),
        "## Samples (one row per class)", "",
        "| before | after |", "|---|---|",
        f"| ![before]({rel(grid_before)}) | ![after]({rel(grid_after)}) |", "",
        per_class_table(base, unlearned), "",
        "## Losses", "", f"![losses]({rel(loss_png)})", "",
        *([f"- {n}" for n in notes]), "",
    ])
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path

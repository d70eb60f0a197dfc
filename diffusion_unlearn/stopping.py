"""Stop when forgotten: `forget --until-forgotten` (docs/stopping-and-relearning.md).

Every `probe_every` iterations (and after the last) the current weights draw `probe_samples` images of the
forgotten class and `probe_retain_per_class` of each retained class; the probe measures `fa`,
`fa_in_distribution` and `ood_rate` (eval/ood.py, the evaluation's own measures) and the retained accuracy. The
run stops once `fa_in_distribution` ≤ `target_fa` on `CONSECUTIVE` consecutive probes, or at
`max_iterations` (the cap: "not forgotten"). α's schedule runs over `max_iterations`, so it never depends on
where a run stops. Each probe and each decision is a key of its iteration's log record: a resumed run replays
the decisions from `log.jsonl` and stops at the same iteration.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from diffusion_unlearn.config import ForgetConfig, SamplerConfig
from diffusion_unlearn.data import ImageDataset
from diffusion_unlearn.eval.classifier import FAClassifier, check_classifier_classes, load_classifier
from diffusion_unlearn.eval.metrics import classification_metrics
from diffusion_unlearn.eval.ood import OODCalibration, calibration_for, calibration_sets, sampled_forgetting
from diffusion_unlearn.fileio import write_json
from diffusion_unlearn.grids import as_saved
from diffusion_unlearn.modelfolder import LoadedModel
from diffusion_unlearn.pipelines.sampling import Pipeline, generate
from diffusion_unlearn.sampler_defaults import resolve_sampler

CONSECUTIVE = 2  # probes in a row on which the target must hold
PROBE_KEY, STOP_KEY = "stop_probe", "stop"  # keys of a probed iteration's log record
CAP = "cap"  # the stop reason of a run that reached max_iterations without meeting the target
TARGET_MET = "target"
STOPPING_FILE = "stopping.json"  # the run's stop iteration, reason and probe curve

# Settings that matter only with --until-forgotten: left out of a plain run's provenance, so that the records
# of runs without it stay as they were.
STOP_SETTINGS = ("until_forgotten", "classifier", "probe_every", "probe_samples", "probe_retain_per_class",
                 "target_fa", "max_iterations")

Measure = Callable[[Pipeline], dict]  # a pipeline → {"fa", "fa_in_distribution", "ood_rate", "retain_accuracy"}


def check_stopping_options(cfg: ForgetConfig) -> None:
    """Before any model is loaded: with --until-forgotten, the classifier folder must hold a classifier."""
    if cfg.until_forgotten:
        load_classifier(cfg.classifier)


def probe_measure(cfg: ForgetConfig, loaded: LoadedModel, dataset: ImageDataset, device: torch.device | str
                  ) -> Measure:
    """The run's probe measure: its classifier (checked against the model's classes) with the OOD calibration
    the evaluation uses, at the evaluation's sampler (the run's sampler settings resolved for "eval")."""
    clf = load_classifier(cfg.classifier, str(device))
    check_classifier_classes(clf, loaded.meta.class_names)
    cal = calibration_for(clf, *calibration_sets(clf, dataset))
    sampler = resolve_sampler(cfg.sampler, loaded.meta.backbone, "eval", device)
    return forgetting_probe(clf, cal, cfg.forget_class, loaded.meta.num_classes, cfg.probe_samples,
                            cfg.probe_retain_per_class, sampler)


def forgetting_probe(clf: FAClassifier, cal: OODCalibration, forget_class: int, num_classes: int, samples: int,
                     retain_per_class: int, sampler: SamplerConfig) -> Measure:
    """The measure of one probe: `samples` forgotten-class images (fa, fa_in_distribution, ood_rate) and
    `retain_per_class` images of each other class (retained accuracy), all with per-index seeds."""
    retained = [c for c in range(num_classes) if c != forget_class]

    def measure(pipeline: Pipeline) -> dict:
        forgetting, logits, labels = sampled_forgetting(pipeline, clf, cal, forget_class, samples, sampler)
        r_images, r_labels, _ = generate(pipeline, retained, retain_per_class, sampler, progress=False)
        m = classification_metrics(torch.cat([logits, clf.logits(as_saved(r_images))]),
                                   torch.cat([labels, r_labels]), forget_class)
        return {**forgetting, "retain_accuracy": m["retain_accuracy"]}

    return measure


@dataclass(frozen=True)
class StopRule:
    """Stop once `fa_in_distribution` ≤ `target_fa` on the last `consecutive` probes."""

    target_fa: float
    consecutive: int = CONSECUTIVE

    def holds(self, point: dict) -> bool:
        return point["fa_in_distribution"] <= self.target_fa

    def met(self, curve: list[dict]) -> bool:
        last = curve[-self.consecutive:]
        return len(last) == self.consecutive and all(self.holds(p) for p in last)


@dataclass
class UntilForgotten:
    """The probe of `--until-forgotten` and its decisions. `curve` holds one point per probe ("iteration":
    iterations done); `reason` is set once the run must stop (TARGET_MET or CAP)."""

    rule: StopRule
    measure: Callable[[], dict]  # a `Measure` bound to the pipeline of the weights in training
    every: int
    cap: int
    curve: list[dict] = field(default_factory=list)
    reason: str | None = None

    def probe(self, iterations_done: int) -> dict:
        """Measure the weights after `iterations_done` iterations; the log-record keys of this probe."""
        point = {"iteration": iterations_done, **self.measure()}
        point["target_met"] = self.rule.holds(point)
        self.curve.append(point)
        if self.rule.met(self.curve):
            self.reason = TARGET_MET
        elif iterations_done >= self.cap:
            self.reason = CAP
        return {PROBE_KEY: {k: v for k, v in point.items() if k != "iteration"},
                **({STOP_KEY: self.reason} if self.reason else {})}

    def replay(self, records: list[dict]) -> None:
        """The curve and decision of the iterations a resumed run keeps (its log records, in order)."""
        self.curve = [{"iteration": r["iteration"] + 1, **r[PROBE_KEY]} for r in records if PROBE_KEY in r]
        self.reason = next((r[STOP_KEY] for r in reversed(records) if STOP_KEY in r), None)

    def summary(self) -> dict:
        """What the run's JSON says: forgotten or not, where and why it stopped, and the probe curve."""
        stop = self.curve[-1]["iteration"] if self.curve else None
        return {"forgotten": self.reason == TARGET_MET, "stop_iteration": stop,
                "stop_reason": _REASONS.get(self.reason, "not stopped"), "target_fa": self.rule.target_fa,
                "consecutive": self.rule.consecutive, "probe_every": self.every, "max_iterations": self.cap,
                "curve": self.curve}


_REASONS = {TARGET_MET: f"fa_in_distribution at or below the target on {CONSECUTIVE} consecutive probes",
            CAP: "reached max_iterations without meeting the target"}


def until_forgotten(cfg: ForgetConfig, measure: Callable[[], dict]) -> UntilForgotten:
    """The stop rule and cadence of a run's config around its bound probe measure."""
    return UntilForgotten(StopRule(cfg.target_fa), measure, cfg.probe_every, cfg.max_iterations)


def warning_line(summary: dict) -> str | None:
    """The one-line warning of a run that reached the cap without forgetting, else None."""
    if summary["forgotten"]:
        return None
    last = summary["curve"][-1]["fa_in_distribution"] if summary["curve"] else float("nan")
    return (f"warning: NOT FORGOTTEN: fa_in_distribution {last:.3f} > target {summary['target_fa']} after "
            f"{summary['stop_iteration']} iterations (--max-iterations); raise --max-iterations, the forget lr or "
            "α, and see `forgotten: false` in the run's stopping.json")


def finish(summary: dict, out: Path) -> None:
    """Write `stopping.json` into the run folder and say on stderr when the target was not met."""
    write_json(out / STOPPING_FILE, summary)
    line = warning_line(summary)
    if line:
        print(f"forget: {line}", file=sys.stderr)


def report_section(summary: dict) -> str:
    """The report's "Stopping" section: the warning first when not forgotten, then the probe curve."""
    line = warning_line(summary)
    head = [f"**{line}**", ""] if line else []
    rows = [f"| {p['iteration']} | {_pct(p['fa'])} | {_pct(p['fa_in_distribution'])} | {_pct(p['ood_rate'])} | "
            f"{_pct(p['retain_accuracy'])} | {'yes' if p['target_met'] else 'no'} |" for p in summary["curve"]]
    return "\n".join([
        "## Stopping (--until-forgotten)", "", *head,
        f"Stopped after **{summary['stop_iteration']}** iterations: {summary['stop_reason']} "
        f"(target fa_in_distribution ≤ {summary['target_fa']}, probes every {summary['probe_every']} iterations, "
        f"cap {summary['max_iterations']}).", "",
        "| iteration | FA | FA in distribution | OOD rate | retained accuracy | target met |", "|---|---|---|---|---|---|",
        *rows, ""])


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"

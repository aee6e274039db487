"""Studies: the paper's controlled comparisons as one command.

A study is a list of variants (a pretrain config plus overrides, and optional probe overrides) run under
one budget (image size, model, epochs, probe protocol) for several seeds, each variant as
pretrain -> probe (fast mode, linear heads + k-NN), plus the baselines that need no pretraining (the same
network at random init, raw pixels). Every run is an ordinary `ldae pretrain` / `ldae probe` process in
the study's directory, so a study inherits their guarantees: a finished run is skipped, an interrupted
one resumed, a killed study continues where it stopped when the same command is run again. Variants
with the same pretrain config share its runs (e.g. one pretrain probed at several depths).

Results: results.json (every run's numbers and time, and mean / std over seeds), results.md (the table,
with the paper's ImageNet number beside each row that has one) and results.png (bars with seed std).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from ldae_cli.checkpoint import read_metadata
from ldae_cli.errors import Interrupted, LdaeError, Terminated
from ldae_cli.reporting import console, read_metrics
from ldae_cli.rundir import CHECKPOINT

Baseline = Literal["random-init", "pixels"]


@dataclass
class Variant:
    name: str
    pretrain: Optional[str] = None  # its pretrain config (a path or a bundled name); null: the study's
    set: dict[str, Any] = field(default_factory=dict)  # overrides of that config (`--set` keys)
    probe_set: dict[str, Any] = field(default_factory=dict)  # overrides of the budget's probe, e.g. probe.depth
    paper: Optional[float] = None  # the paper's ImageNet linear-probe top-1 for this setting, where it has one
    paper_row: Optional[str] = None  # which row of the paper's tables that is


@dataclass
class StudyConfig:
    name: str = "study"
    description: str = ""
    pretrain: str = "final.yaml"  # the pretrain config every variant starts from
    variants: list[Variant] = field(default_factory=list)
    baselines: list[Baseline] = field(default_factory=list)  # probed on the first variant's architecture and data

    def validate(self) -> None:
        if not self.variants:
            raise LdaeError("variants: a study needs at least one variant")
        names = [v.name for v in self.variants]
        if len(set(names)) < len(names):
            raise LdaeError(f"variants: names must differ, got {names}")


@dataclass
class BudgetConfig:
    """What every run of a study gets: pretrain and probe overrides, and how long a run takes on the machine
    the budget is named for (for the estimate printed before a study starts)."""

    name: str = "budget"
    description: str = ""
    pretrain: dict[str, Any] = field(default_factory=dict)  # --set overrides of every pretrain run
    probe_config: str = "probe/small-fast.yaml"
    probe: dict[str, Any] = field(default_factory=dict)  # --set overrides of every probe
    pretrain_minutes: float = 10.0
    probe_minutes: float = 2.0


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


def as_sets(overrides: dict[str, Any]) -> list[str]:
    """`--set` arguments; values as JSON, which the config loader reads back as the same YAML values."""
    return [a for key, value in overrides.items() for a in ("--set", f"{key}={json.dumps(value)}")]


@dataclass
class Run:
    """One process of the study: a pretrain or a probe, with where it writes and how it is started."""

    kind: Literal["pretrain", "probe"]
    out: Path
    args: list[str]  # a new run's arguments (without --out)
    label: str

    def state(self) -> str:
        """'done', 'resume' (an unfinished checkpoint) or 'new'."""
        if self.kind == "probe" and (self.out / "results.json").exists():
            return "done"
        ckpt = self.out / CHECKPOINT
        if not ckpt.exists():
            return "new"
        if self.kind == "pretrain" and read_metadata(ckpt)["extra"].get("finished"):
            return "done"
        return "resume"

    def command(self) -> list[str]:
        if self.state() == "resume":
            return [self.kind, "--resume", str(self.out)]
        # a directory a killed start left behind belongs to this study: it is started over
        force = ["--force"] if self.out.exists() and any(self.out.iterdir()) else []
        return [*self.args, "--out", str(self.out), *force]


@dataclass
class Plan:
    pretrains: dict[str, Run]  # by pretrain spec hash
    probes: list[tuple[str, int, Run]]  # (row name, seed, run)


def plan(study: StudyConfig, budget: BudgetConfig, seeds: int, out: Path, extra: dict[str, Any]) -> Plan:
    """Every run of the study: one pretrain per distinct (config, overrides, seed), one probe per row and seed."""
    pretrains: dict[str, Run] = {}
    probes = []
    first_ckpt: dict[int, Path] = {}
    for variant in study.variants:
        config = variant.pretrain or study.pretrain
        for seed in range(seeds):
            overrides = {**budget.pretrain, **variant.set, **extra, "run.seed": seed}
            key = hashlib.sha256(json.dumps([config, overrides], sort_keys=True).encode()).hexdigest()[:10]
            if key not in pretrains:
                pretrains[key] = Run("pretrain", out / "pretrain" / f"{slug(variant.name)}-s{seed}",
                                     ["pretrain", "--config", config, *as_sets(overrides)], f"{variant.name}, seed {seed}")
            ckpt = pretrains[key].out / CHECKPOINT
            first_ckpt.setdefault(seed, ckpt)
            probe = {**budget.probe, **variant.probe_set, "run.seed": seed}
            probes.append((variant.name, seed, Run("probe", out / "probe" / f"{slug(variant.name)}-s{seed}",
                                                   ["probe", "--ckpt", str(ckpt), "--config", budget.probe_config,
                                                    *as_sets(probe)], f"{variant.name}, seed {seed}")))
    for baseline in study.baselines:
        for seed in range(seeds):
            probe = {**budget.probe, "run.seed": seed, **({"probe.features": "pixels"} if baseline == "pixels" else {})}
            flags = ["--random-init"] if baseline == "random-init" else []
            name = "random init (same network)" if baseline == "random-init" else "raw pixels"
            probes.append((name, seed, Run("probe", out / "probe" / f"{baseline}-s{seed}",
                                           ["probe", "--ckpt", str(first_ckpt[seed]), "--config", budget.probe_config,
                                            *flags, *as_sets(probe)], f"{name}, seed {seed}")))
    return Plan(pretrains, probes)


def estimate_minutes(p: Plan, budget: BudgetConfig) -> tuple[int, int, float]:
    """(pretrain runs to go, probes to go, minutes) by the budget's per-run times."""
    pretrains = sum(r.state() != "done" for r in p.pretrains.values())
    probes = sum(r.state() != "done" for _, _, r in p.probes)
    return pretrains, probes, pretrains * budget.pretrain_minutes + probes * budget.probe_minutes


def launch(run: Run, nproc: int) -> None:
    """One `ldae` process, its output on this terminal; a failure or a stop ends the study with one line."""
    prefix = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"] if nproc > 1 else \
        [sys.executable]
    proc = subprocess.Popen([*prefix, "-m", "ldae_cli", *run.command()], env=os.environ.copy())
    try:
        code = proc.wait()
    except KeyboardInterrupt as exc:  # Ctrl-C reaches the child too; SIGTERM is passed on: it saves, then stops
        if isinstance(exc, Terminated):
            proc.terminate()
        code = proc.wait()
    if code in (130, 143):
        raise Interrupted(f"study interrupted during {run.kind} {run.label}; every finished run is kept. Run the same "
                          "command again to continue", code)
    if code != 0:
        raise LdaeError(f"{run.kind} {run.label} failed (exit {code}, its error is above; its run is {run.out}); fix "
                        "it and run the same command again: finished runs are skipped")
    if run.state() != "done":
        raise LdaeError(f"{run.kind} {run.label} stopped before its last step ({run.out}), e.g. at a time limit; run "
                        "the same command again to continue it")


def execute(p: Plan, nproc: int) -> None:
    todo = [r for r in p.pretrains.values() if r.state() != "done"] + [r for _, _, r in p.probes if r.state() != "done"]
    for i, run in enumerate(todo, 1):
        console.print(f"[bold]study {i}/{len(todo)}[/bold]: {run.kind} {run.label} ({run.state()}) -> {run.out}")
        launch(run, nproc)


def wall_seconds(records: list[dict]) -> float | None:
    """A run's training time over all its invocations (each restarts `time_s` from zero when it resumes)."""
    total, last = 0.0, 0.0
    for r in records:
        if "time_s" in r:
            total, last = (total + last, r["time_s"]) if r["time_s"] < last else (total, r["time_s"])
    return round(total + last, 1) if records else None


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return round(mean, 2), None
    return round(mean, 2), round(math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)), 2)


def collect(study: StudyConfig, p: Plan, seeds: int) -> dict:
    """Every probe's own results.json, and mean / std over seeds per row."""
    paper = {v.name: (v.paper, v.paper_row) for v in study.variants}
    rows: dict[str, dict] = {}
    for name, seed, run in p.probes:
        result = json.loads((run.out / "results.json").read_text())
        row = rows.setdefault(name, {"name": name, "runs": []})
        pretrain = next((r for r in p.pretrains.values() if str(r.out / CHECKPOINT) == result["checkpoint"]), None)
        pretrain_s = None
        if pretrain is not None and name in paper:  # the baselines borrow a run's checkpoint but not its time
            pretrain_s = wall_seconds(read_metrics(pretrain.out / "metrics.jsonl"))
        row["runs"].append({"seed": seed, "linear_top1": result["best_top1"], "knn_top1": result["knn_top1"],
                            "probe": str(run.out), "probe_s": result.get("seconds"), "pretrain_s": pretrain_s})
    for row in rows.values():
        row["linear_mean"], row["linear_std"] = mean_std([r["linear_top1"] for r in row["runs"]])
        row["knn_mean"], row["knn_std"] = mean_std([r["knn_top1"] for r in row["runs"] if r["knn_top1"] is not None])
        row["paper"], row["paper_row"] = paper.get(row["name"], (None, None))
    return {"study": study.name, "description": study.description, "seeds": seeds, "rows": list(rows.values())}


def _cell(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def write_results(results: dict, out: Path, command: str, budget: BudgetConfig) -> list[Path]:
    """results.json, results.md and results.png in `out`."""
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    rows = results["rows"]
    first = rows[0]
    lines = [f"# Study `{results['study']}`, budget `{budget.name}`, {results['seeds']} seed(s)", "",
             results["description"].strip(), "",
             "| variant | linear probe top-1 | k-NN top-1 | linear vs first row | paper (ImageNet) |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        delta = "" if row is first or row["linear_mean"] is None or first["linear_mean"] is None else \
            f"{row['linear_mean'] - first['linear_mean']:+.2f}"
        paper = f"{row['paper']:.1f} ({row['paper_row']})" if row["paper"] is not None else "-"
        lines.append(f"| {row['name']} | {_cell(row['linear_mean'], row['linear_std'])} | "
                     f"{_cell(row['knn_mean'], row['knn_std'])} | {delta} | {paper} |")
    minutes = [r["pretrain_s"] / 60 for row in rows for r in row["runs"] if r["pretrain_s"]]
    lines += ["", f"Mean ± sample std over seeds {', '.join(map(str, range(results['seeds'])))}; top-1 % on the "
                  "evaluation split (the best of the probe's heads, chosen on that split). Budget: "
                  f"{budget.description.strip()}",
              f"Pretrain runs took {min(minutes):.1f}-{max(minutes):.1f} min each." if minutes else "",
              "The paper's numbers are ImageNet linear-probe accuracies of a ViT-½L encoder after 400 epochs; "
              "they show the direction of each change, not a value to reach at this budget.", "",
              f"Reproduce: `{command}`", ""]
    (out / "results.md").write_text("\n".join(lines))
    return [out / "results.json", out / "results.md", bar_chart(results, out / "results.png", budget.name)]


def bar_chart(results: dict, path: Path, budget: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4), dpi=120)
    xs = range(len(rows))
    for offset, key, label in ((-0.2, "linear", "linear probe"), (0.2, "knn", "k-NN")):
        means = [r[f"{key}_mean"] or 0.0 for r in rows]
        stds = [r[f"{key}_std"] or 0.0 for r in rows]
        bars = ax.bar([x + offset for x in xs], means, 0.4, yerr=stds, capsize=3, label=label)
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], fontsize=7, padding=2)
    ax.set_xticks(list(xs), [r["name"] for r in rows], rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("top-1 % (eval split)")
    ax.set_title(f"study {results['study']} (budget {budget}, {results['seeds']} seed(s), mean ± std)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_study(study: StudyConfig, budget: BudgetConfig, seeds: int, out: Path, extra: dict[str, Any], nproc: int,
              command: str) -> list[Path]:
    p = plan(study, budget, seeds, out, extra)
    pretrains, probes, minutes = estimate_minutes(p, budget)
    console.print(f"study {study.name}, budget {budget.name}, {seeds} seed(s): {pretrains} pretrain run(s) and "
                  f"{probes} probe(s) to go of {len(p.pretrains)} and {len(p.probes)}; estimated "
                  f"{minutes:.0f} min ({budget.pretrain_minutes:g} per pretrain, {budget.probe_minutes:g} per probe)")
    started = time.time()
    execute(p, nproc)
    out.mkdir(parents=True, exist_ok=True)
    written = write_results(collect(study, p, seeds), out, command, budget)
    console.print(f"study {study.name} done in {(time.time() - started) / 60:.1f} min; wrote "
                  f"{', '.join(str(w) for w in written)}")
    console.print((out / "results.md").read_text())
    return written

"""A study's runs: one `ldae pretrain` per distinct (config, overrides, seed), one `ldae probe` per row and seed,
each an ordinary child process started with `--continue` in its directory of the study. The child starts its run,
continues it, or, when the run is finished and its resolved settings are the ones asked for, says so and exits;
a directory holding another run is refused by the child, so a study never publishes another study's numbers.
Runs go seed by seed (every row of seed 0, then seed 1, ...), so a study stopped early has whole seeds.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ldae_cli.model.diffusion import Denoiser, NoiseSchedule
from ldae_cli.model.models import build_model
from ldae_cli.model.objectives import build_objective
from ldae_cli.model.tokenizers import load_tokenizer
from ldae_cli.runs.checkpoint import read_metadata
from ldae_cli.runs.distributed import resolve_device
from ldae_cli.runs.logs import console
from ldae_cli.runs.rundir import CHECKPOINT, write_atomically
from ldae_cli.runs.slurm import JobOptions
from ldae_cli.settings.training import PretrainConfig
from ldae_cli.studies.shares import Share, shares, visible_gpus
from ldae_cli.studies.spec import (
    BASELINE_NAMES,
    BudgetConfig,
    DataFacts,
    StudyConfig,
    Variant,
    budget_overrides,
    check_rows,
    depth_variants,
    pixel_dim_variants,
    resolve,
    settings_of,
    slug,
    survey,
    total_steps,
)
from ldae_cli.train.budget import BASE_CONFIG
from ldae_cli.train.dryrun import seconds_per_image, training_flops_per_image
from ldae_cli.train.engine_pretrain import stand_in, synthetic_step

TIMINGS = "timings.json"


def as_sets(overrides: dict[str, Any]) -> list[str]:
    """`--set` arguments."""
    return [a for setting in settings_of(overrides) for a in ("--set", setting)]


@dataclass
class Run:
    """One child process of the study: a pretrain or a probe, where it writes and how it is started."""

    kind: Literal["pretrain", "probe"]
    out: Path
    args: list[str]  # the command without --out
    label: str
    steps: int = 0  # a pretrain's optimizer steps
    batch: int = 0  # and its global batch
    speed: str = ""  # pretrains with the same speed key run at the same speed (objective, model, tokens, batch)
    flops: float = 0.0  # a pretrain's training FLOPs per image (dryrun.training_flops_per_image)
    own: list[str] = field(default_factory=list)  # its settings beyond the budget's (what --dry-run lists)
    pretrain: "Run | None" = field(default=None, repr=False, compare=False)  # a probe's: the run it reads

    def finished(self) -> bool:
        if self.kind == "probe":
            return (self.out / "results.json").is_file()
        return (self.out / CHECKPOINT).is_file() and bool(read_metadata(self.out / CHECKPOINT)["extra"].get("finished"))

    def done_steps(self) -> int:
        ckpt = self.out / CHECKPOINT
        return int(read_metadata(ckpt)["extra"].get("step", 0)) if self.kind == "pretrain" and ckpt.is_file() else 0

    def command(self) -> list[str]:
        return [*self.args, "--out", str(self.out), "--continue"]


@dataclass
class Row:
    """A row of the results: a variant (or a baseline) and its runs per seed."""

    name: str
    variant: Variant | None  # None: a baseline
    baseline: str | None
    versus: str | None  # the row it is compared with (None: it is the reference)
    pretrains: dict[int, Run] = field(default_factory=dict)  # seed -> the pretrain whose checkpoint it probes
    probes: dict[int, Run] = field(default_factory=dict)  # seed -> its probe


@dataclass
class Plan:
    study: StudyConfig
    budget: BudgetConfig
    seeds: int
    out: Path
    pretrains: dict[str, Run]  # by the hash of (config, overrides)
    settings: dict[str, PretrainConfig]  # their resolved settings, by the same hash
    facts: dict[tuple, DataFacts]
    rows: list[Row]
    reference: str
    budget_flops: float  # training FLOPs per image of the network budget.images_per_second is for (l-DAE's)

    def runs(self) -> list[Run]:
        """Every run in the study's order: seed by seed, a seed's pretrains then its probes."""
        return [run for seed in range(self.seeds) for run in self.seed_runs(seed)]

    def seed_runs(self, seed: int) -> list[Run]:
        """The pretrains of this seed (each once), then its probes."""
        pretrains = {id(row.pretrains[seed]): row.pretrains[seed] for row in self.rows}
        return list(pretrains.values()) + [row.probes[seed] for row in self.rows]


def variants_of(study: StudyConfig, base: dict[str, Any]) -> tuple[list[Variant], str]:
    """The study's variants (a depth sweep's for the budget's model) and its reference row."""
    if study.depth_sweep is not None:
        variants, split = depth_variants(study.depth_sweep, resolve(study.pretrain, base).model)
        return variants, study.reference or split
    if study.pixel_dim_sweep is not None:
        s = resolve(study.pretrain, base)
        variants, largest = pixel_dim_variants(study.pixel_dim_sweep, s.data, s.tokenizer)
        return variants, study.reference or largest
    return study.variants, study.reference or study.variants[0].name


def pretrain_folder(
    out: Path, shared: Path | None, variant: Variant, config: str, budget: BudgetConfig, seed: int
) -> Path:
    """OUT/pretrain/<row>-s<seed>; in a shared folder, named by what the run sets beyond the budget, so that two
    studies asking for the same run find one folder (its child refuses a run whose resolved settings differ)."""
    if shared is None:
        return out / "pretrain" / f"{slug(variant.name)}-s{seed}"
    own = {k: v for k, v in variant.set.items() if k not in budget.pretrain or budget.pretrain[k] != v}
    return shared / f"{slug(' '.join([Path(config).stem, *settings_of(dict(sorted(own.items())))]))}-s{seed}"


def relative(path: Path, out: Path) -> str:
    """A run's folder as the study names it: relative to the study's, which a shared pretrain folder may be beside."""
    return Path(os.path.relpath(path, out)).as_posix()


def make_plan(
    study: StudyConfig, budget: BudgetConfig, seeds: int, out: Path, extra: dict[str, Any], shared: Path | None = None
) -> Plan:
    """Every run of the study, each pretrain's settings resolved and its data surveyed (refused if upsampled);
    pretrains in `shared` when given (`--pretrains`), else in the study's folder."""
    variants, reference = variants_of(study, {**budget.pretrain, **extra})
    pretrains: dict[str, Run] = {}
    settings: dict[str, PretrainConfig] = {}
    rows = []
    for variant in variants:
        config = variant.pretrain or study.pretrain
        row = Row(variant.name, variant, None, None if variant.name == reference else variant.versus or reference)
        keys = budget_overrides(budget, study.pretrain, config)
        scaled = {k: v for k, v in keys.items() if budget.pretrain[k] != v}  # its own blr, where the budget scales it
        for seed in range(seeds):
            overrides = {**keys, **variant.set, **extra, "run.seed": seed}
            key = hashlib.sha256(json.dumps([config, overrides], sort_keys=True).encode()).hexdigest()[:16]
            if key not in pretrains:
                settings[key] = resolve(config, overrides)
                pretrains[key] = Run(
                    "pretrain",
                    pretrain_folder(out, shared, variant, config, budget, seed),
                    ["pretrain", "--config", config, *as_sets(overrides)],
                    f"{variant.name}, seed {seed}",
                    own=[config, *settings_of({**scaled, **variant.set})],
                )
            row.pretrains[seed] = pretrains[key]
            probe = {**budget.probe, **variant.probe_set, "run.seed": seed}
            row.probes[seed] = probe_run(budget, out, variant.name, seed, pretrains[key], probe)
        rows.append(row)
    for baseline in study.baselines:
        name = BASELINE_NAMES[baseline]
        row = Row(name, None, baseline, reference)
        for seed in range(seeds):
            row.pretrains[seed] = rows[0].pretrains[seed]  # its architecture (random init) and data
            probe = {**budget.probe, "run.seed": seed, **({"probe.features": "pixels"} if baseline == "pixels" else {})}
            row.probes[seed] = probe_run(
                budget,
                out,
                name,
                seed,
                row.pretrains[seed],
                probe,
                ["--random-init"] if baseline == "random-init" else [],
            )
        rows.append(row)
    check_rows([r.name for r in rows], {r.name: r.versus for r in rows}, f"study {study.name}")
    facts = survey(list(settings.values()), budget.name)
    for key, run in pretrains.items():
        s = settings[key]
        width, encoder, decoder, heads = s.model.resolved()
        run.steps, run.batch = total_steps(s, facts), s.optim.batch_size
        run.speed = (
            f"{s.objective} {width} {encoder}+{decoder} {heads} "
            f"{(s.data.settled_size // s.tokenizer.patch) ** 2} {s.optim.batch_size}"
        )
        run.flops = training_flops_per_image(s)
    base = resolve(BASE_CONFIG, {**budget.pretrain, **extra})
    base.data.image_size = base.data.image_size or next(iter(settings.values())).data.settled_size  # the data's
    budget_flops = training_flops_per_image(base)
    return Plan(study, budget, seeds, out, pretrains, settings, facts, rows, reference, budget_flops)


def probe_run(
    budget: BudgetConfig,
    out: Path,
    name: str,
    seed: int,
    pretrain: Run,
    overrides: dict[str, Any],
    flags: Sequence[str] = (),
) -> Run:
    own = {key: value for key, value in overrides.items() if key != "run.seed" and budget.probe.get(key) != value}
    return Run(
        "probe",
        out / "probe" / f"{slug(name)}-s{seed}",
        [
            "probe",
            "--ckpt",
            str(pretrain.out / CHECKPOINT),
            "--config",
            budget.probe_config,
            *flags,
            *as_sets(overrides),
        ],
        f"{name}, seed {seed}",
        own=[f"of {relative(pretrain.out, out)}", *flags, *settings_of(own)],
        pretrain=pretrain,
    )


class Timings:
    """Seconds each run's launches took (start to exit: process start, PCA fit and online probes included) and the
    steps they made, in the study's timings.json: the estimate's measured speeds and the study's total time."""

    def __init__(self, out: Path):
        self.path = out / TIMINGS
        self.runs: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def add(self, plan: Plan, run: Run, seconds: float, steps: int) -> None:
        entry = self.runs.setdefault(relative(run.out, plan.out), {"seconds": 0.0, "steps": 0})
        entry["seconds"], entry["steps"] = round(entry["seconds"] + seconds, 1), entry["steps"] + steps
        if run.kind == "pretrain":
            entry["speed"] = run.speed
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, (json.dumps(self.runs, indent=1) + "\n").encode())

    def seconds_per_step(self, speed: str) -> float | None:
        done = [e for e in self.runs.values() if e.get("speed") == speed and e["steps"]]
        return sum(e["seconds"] for e in done) / sum(e["steps"] for e in done) if done else None

    def probe_seconds(self) -> float | None:
        done = [e["seconds"] for key, e in self.runs.items() if key.startswith("probe/")]
        return sum(done) / len(done) if done else None


def to_go(plan: Plan, timings: Timings, timed: dict[str, tuple[float, str]]) -> tuple[dict[int, float], list[str]]:
    """The seconds each unfinished run takes (by id), and where the speeds came from, in words: each pretrain's
    remaining steps at the speed this study measured for its model, else at the seconds per step `timed` now on
    this machine (--dry-run), else at the budget's images per second; each probe at its measured mean (or the
    budget's)."""
    seconds: dict[int, float] = {}
    sources, now = set(), set()  # where the speeds came from; the speeds timed now, in words
    budget = plan.budget
    for run in (r for r in plan.pretrains.values() if not r.finished()):
        rate, source = timings.seconds_per_step(run.speed), "study"
        if rate is None and run.speed in timed:
            (rate, speed), source = timed[run.speed], "now"
            now.add(speed)
        elif rate is None:  # the budget's speed is its l-DAE network's: another network's scales by its FLOPs
            rate, source = run.batch / budget.images_per_second * run.flops / plan.budget_flops, "budget"
        sources.add(source)
        seconds[id(run)] = (run.steps - run.done_steps()) * rate
    rest = " where this study has measured none" if "study" in sources else ""
    how = [
        text
        for source, text in (
            ("study", "pretrains at the speed this study measured"),
            (
                "now",
                f"pretrains at {', '.join(sorted(now))}, the training step alone, timed now{rest}: data loading, "
                "the PCA fit, online probes, checkpoints and process starts come on top",
            ),
            (
                "budget",
                f"pretrains at budget {budget.name}'s {budget.images_per_second:g} img/s{rest} (its l-DAE "
                "network's; another network or objective at that rate times their training FLOPs' ratio)",
            ),
        )
        if source in sources
    ]
    probe_s = timings.probe_seconds()
    for run in (r for row in plan.rows for r in row.probes.values() if not r.finished()):
        seconds[id(run)] = probe_s or 60 * budget.probe_minutes
    how.append(
        f"probes {probe_s / 60:.1f} min as measured"
        if probe_s
        else f"probes {budget.probe_minutes:g} min, the budget's figure"
    )
    return seconds, how


def schedule(seconds: Sequence[float], after: Sequence[int | None], at_once: int | None) -> float:
    """The wall time of runs started in their order on `at_once` slots (None: one each), a run not before the run
    it waits for (`after`, an earlier index) has ended: whenever a slot is free, the first run that may start does
    (list scheduling, as the study's runs go)."""
    slots = at_once or len(seconds)
    waiting, now = list(range(len(seconds))), 0.0
    ends: dict[int, float] = {}
    running: list[float] = []
    while waiting:
        ready = [i for i in waiting if (first := after[i]) is None or ends.get(first, math.inf) <= now]
        for i in ready[: slots - len(running)]:
            waiting.remove(i)
            ends[i] = now + seconds[i]
            heapq.heappush(running, ends[i])
        now = heapq.heappop(running)  # until a run ends
    return max(ends.values(), default=0.0)


def wall_time(plan: Plan, seconds: dict[int, float], at_once: int | None) -> float:
    """The study's wall time with `at_once` runs at once (None: every run at once), a probe after its pretrain."""
    runs = plan.runs()
    index = {id(run): i for i, run in enumerate(runs)}
    waits = [index[id(r.pretrain)] if r.pretrain is not None else None for r in runs]
    return schedule([seconds.get(id(r), 0.0) for r in runs], waits, at_once)


def estimate(
    plan: Plan, timings: Timings, timed: dict[str, tuple[float, str]] | None = None, at_once: int | None = 1
) -> str:
    """What is left to run and how long it takes with `at_once` runs at once (None: every run at once, as on a
    cluster with room), seed by seed, a probe once its pretrain has ended; and one after another where that differs."""
    seconds, how = to_go(plan, timings, timed or {})
    pretrains = sum(id(r) in seconds for r in plan.pretrains.values())
    wall, serial = wall_time(plan, seconds, at_once) / 60, sum(seconds.values()) / 60
    parallel = f" with {at_once or 'every run'} at once" if at_once != 1 else ""
    parallel += f", {serial:.0f} min one after another" if parallel and f"{wall:.0f}" != f"{serial:.0f}" else ""
    return (
        f"{pretrains} pretrain run(s) and {len(seconds) - pretrains} probe(s) to go of {len(plan.pretrains)} and "
        f"{sum(len(r.probes) for r in plan.rows)}; about {wall:.0f} min{parallel} ({'; '.join(how)})"
    )


TIMING_SECONDS = 2.0  # the longest a --dry-run spends timing one model's steps, roughly


def time_steps(plan: Plan, nproc: int, timings: Timings, threads: int | None = None) -> dict[str, tuple[float, str]]:
    """Seconds per step of each model still to pretrain that this study has not timed yet, timed on this machine now
    with `threads` torch threads (a run's share of the CPU cores; restored after): optimizer steps of its network on
    synthetic images, as many as its batch where that stays within TIMING_SECONDS (and its speed, in words)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return timed_steps(plan, nproc, timings)
    finally:
        torch.set_num_threads(before)


def timed_steps(plan: Plan, nproc: int, timings: Timings) -> dict[str, tuple[float, str]]:
    timed: dict[str, tuple[float, str]] = {}
    for key, run in plan.pretrains.items():
        s = plan.settings[key]
        if (
            run.speed in timed
            or timings.seconds_per_step(run.speed) is not None
            or run.finished()
            or (s.run.precision == "bf16" and resolve_device(s.run.device).type == "cpu")
        ):  # a GPU budget: its figure
            continue
        tokenizer = (
            stand_in(s.tokenizer)
            if s.tokenizer.kind == "pca" and not s.tokenizer.path
            else load_tokenizer(s.tokenizer)[0]
        )
        denoiser = Denoiser(s.diffusion, tokenizer, NoiseSchedule(s.diffusion), s.data.settled_size)
        objective = build_objective(s, denoiser, build_model(s.model, denoiser.in_dim, denoiser.out_dim, denoiser.grid))
        device, micro, sample = resolve_device(s.run.device), run.batch // nproc, 1
        while True:  # 1, 16, 256, ... images, up to the batch of one GPU, while 4 steps take under TIMING_SECONDS
            per_image = seconds_per_image(synthetic_step(s, objective, sample, device), sample)
            larger = min(sample * 16, micro)
            if larger <= sample or 4 * per_image * larger > TIMING_SECONDS:
                break
            sample = larger
        timed[run.speed] = (
            per_image * run.batch / nproc,
            f"{1 / per_image:,.0f} img/s per device ({sample} synthetic images on {device})",
        )
    return timed


def dry_run(
    plan: Plan, nproc: int, jobs: int = 1, launch: str | None = None, options: JobOptions | None = None
) -> None:
    """`ldae study --dry-run`: every run, what its folder holds, how many run at once and what each gets (its share of
    this machine, or its SLURM job), and the time the rest takes so; nothing is written, trained or submitted."""
    options = options or JobOptions()
    slots = shares(jobs, nproc) if launch is None else []  # refuses more GPUs than this machine shows
    runs, budget, timings = plan.runs(), plan.budget, Timings(plan.out)
    threads = slots[0].env.get("OMP_NUM_THREADS") if slots else None
    # --launch slurm's jobs run on the cluster's GPUs, not here: the budget's figure
    timed = {} if launch == "slurm" else time_steps(plan, nproc, timings, int(threads) if threads else None)
    together = {
        None: "one at a time" if jobs == 1 else f"{jobs} at once",
        "slurm": "every job at once, as SLURM allows",
        "local": "every job at once on this machine (submitit's local executor)",
    }[launch]
    console.print(
        f"study {plan.study.name}, budget {budget.name}, {plan.seeds} seed(s) in {plan.out}: {len(runs)} "
        f"runs, {sum(run.finished() for run in runs)} finished, {together} (--dry-run: nothing is written, "
        "trained or submitted)",
        soft_wrap=True,
    )
    console.print(
        f"every pretrain: {' '.join(settings_of(budget.pretrain))}\nevery probe: {budget.probe_config} "
        f"{' '.join(settings_of(budget.probe))}\n{what_each_gets(slots, nproc, launch, options)}",
        soft_wrap=True,
        markup=False,
    )
    seconds, _ = to_go(plan, timings, timed)
    for index, run in enumerate(runs, 1):
        steps = run.done_steps()
        state = "done" if run.finished() else f"to continue from step {steps:,}" if steps else "to run"
        size = [f"{run.steps:,} steps of {run.batch:,} images"] if run.kind == "pretrain" else []
        limit, left = 60 * options.time_min, seconds.get(id(run), 0.0)
        requeued = (  # submitit requeues a job at its time limit and the run continues from its checkpoint
            f"; about {left / 60:,.0f} min, over --time {options.time_min}: requeued about "
            f"{math.ceil(left / limit) - 1} times at its time limit"
            if launch == "slurm" and left > limit
            else ""
        )
        console.print(
            f"{index}/{len(runs)} {run.kind} {run.label}: {state} ({', '.join([*run.own, *size])}) -> "
            f"{relative(run.out, plan.out)}{requeued}",
            soft_wrap=True,
        )
    at_once = jobs if launch is None else None
    shared_cpu = at_once != 1 and launch != "slurm" and not visible_gpus()
    caveat = (
        f"; {at_once or 'all'} runs at once share this machine's CPU cores and memory, so speeds measured with one "
        "run on it are optimistic"
        if shared_cpu
        else "; SLURM's queue waits come on top"
        if launch == "slurm"
        else ""
    )
    console.print(f"time: {estimate(plan, timings, timed, at_once)}{caveat}", soft_wrap=True)


def what_each_gets(slots: list[Share], nproc: int, launch: str | None, options: JobOptions) -> str:
    """Each run's share of this machine (the slots' shares, in words), or the jobs --launch submits."""
    if launch == "slurm":
        extra = "".join(f", --slurm {key}={value}" for key, value in options.sbatch.items())
        return (
            f"one job per pretrain with {nproc} GPU(s) and {options.cpus_per_task} CPU cores per task, partition "
            f"{options.partition or '(the cluster default)'}, time limit {options.time_min} min{extra}; one job per "
            "probe with 1 GPU, held until its pretrain succeeds (afterok)"
        )
    if launch == "local":
        return (
            f"one job per pretrain with {nproc} process(es), one per probe held until its pretrain succeeds, all "
            "on this machine"
        )
    texts = [slot.text for slot in slots]
    if len(set(texts)) == 1:
        return f"each run: {texts[0]}"
    return f"slots (each run takes the first free one): {', '.join(texts)}"

"""`ldae pretrain --data DIR --budget 30m`: a pretrain run sized to the data and the time, as overrides of a config.

`parse_budget` reads the time (30m, 2h, 1d on this machine; 8xH100:12h for N GPUs of a kind), `size_run` turns
what the data is (`DataFacts`) and a speed into the keys it sets, by these rules:

- Image size: the data's native size, the median short side rounded down to a multiple of the patch (as
  data.native_image_size decides it), at most 256 (the paper's resolution): never upsampled.
- Patch: a power of two from 2 to 32 giving 16-64 tokens (an 8x8 grid at most, the paper's 256 tokens being
  beyond a budget run); the most tokens at which some model gets MIN_EPOCHS epochs, else the fewest.
- d = min(16, D // 3) for a PCA: docs/studies/latent-dim found d = 16 ahead of 64 and 128 (and 8, 32 level with
  it) at D = 192, docs/studies/pixel-dim d = 16 at D = 48 level with the pixels, and the paper's optimum is d =
  16-32 of D = 768; below D = 48 a third is kept, so the PCA still drops most of each patch.
- Model: the largest of the ladder (the `cpu` study budget's width 128 with 4 + 4 blocks, then the presets T, S,
  B, half-L, L) that has at most PARAMS_PER_IMAGE block parameters per training image and gets MIN_EPOCHS epochs
  in the budget; else the smallest.
- Batch: 128 on this machine (the `cpu` study budget's), 256 per GPU (docs/bench-pretrain-step-h200.json), halved
  until an epoch has at least 8 steps. Epochs: what TRAIN_SHARE of the budget pays for at the speed, rounded down
  to 2 significant digits, at most MAX_EPOCHS; a tenth of them warm-up (the `cpu` budget's share). The run stops
  at the budget whatever the estimate said (run.time_limit_minutes; --resume continues it).
- Online probe: on only when it can meet its own floor (online_probe.online_fit_size), else off, saying why.

`--config` with `--budget` sizes that config (default final.yaml, the paper's l-DAE recipe); `--set` applies after
the sizing (its data.* keys before it too: they say what is sized). A budget sizes a new run: with --resume,
--init-from or --continue it is refused (save the sized config with --print-config and give it with --config).
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, NamedTuple

from ldae_cli.errors import LdaeError
from ldae_cli.settings.training import PCA_DIM

FORMS = "a time on this machine (30m, 2h, 1d) or GPUs and a time (8xH100:12h; GPUs H100, H200)"
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# training FLOP/s per GPU: half-L (256 tokens, bf16, compiled) ran at 445.5 TFLOP/s, 64 % of the matmul peak, on
# an H200 (docs/bench-pretrain-step-h200.json); an H100 has the same compute, so the same figure is assumed
GPU_FLOPS = {"H100": 445.5e12, "H200": 445.5e12}
BASE_CONFIG = "final.yaml"
MAX_SIDE, PATCHES, TOKENS = 256, (2, 4, 8, 16, 32), (16, 64)
MIN_EPOCHS = 4  # the `cpu` studies' pretrains: 4 epochs were far ahead of the untrained network
MAX_EPOCHS = 400  # the paper's schedule: a longer budget finishes early
PARAMS_PER_IMAGE = 250  # the paper: half-L's 302M block parameters on ImageNet's 1.28M images, 236 per image
TRAIN_SHARE = 0.85  # the rest for the PCA fit, data loading, online probes and checkpoints
CPU_BATCH, GPU_BATCH, MIN_STEPS_PER_EPOCH = 128, 256, 8
SMALL_BLR = 2.0e-3  # the `cpu` budget's lr for the smallest rung; the presets keep the config's


class Budget(NamedTuple):
    seconds: float
    gpus: int  # 0: this machine, its speed measured
    gpu: str | None
    text: str


class Rung(NamedTuple):
    size: str  # model.size: a preset, or custom
    width: int
    encoder_depth: int
    decoder_depth: int
    num_heads: int

    @property
    def params(self) -> int:
        """Block parameters (attention 4 w^2, MLP 8 w^2)."""
        return 12 * self.width**2 * (self.encoder_depth + self.decoder_depth)


class Candidate(NamedTuple):
    patch: int
    image_size: int
    rung: Rung
    batch: int  # global

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def flops(self) -> float:
        """Training FLOPs per image (models.model_flops_per_image), patches in and out as pixels."""
        from ldae_cli.model.models import model_flops_per_image

        side, pixels = self.image_size // self.patch, self.patch**2 * 3
        return model_flops_per_image(
            dict(
                grid=[side, side],
                width=self.rung.width,
                mlp_ratio=4.0,
                in_dim=pixels,
                out_dim=pixels,
                encoder_depth=self.rung.encoder_depth,
                decoder_depth=self.rung.decoder_depth,
            )
        )


@dataclass(frozen=True)
class DataFacts:
    name: str  # the data folder's (or archive's) name: the run's
    images: int  # training images (data.limit applied)
    classes: int  # classes of the training split (0: unlabelled)
    eval_images: int  # images of the evaluation split (0: none)
    side: int  # the median short side of a sample of the training images


class Sized(NamedTuple):
    overrides: dict  # dotted config key -> value
    lines: list[str]  # what was decided and why


def parse_budget(text: str) -> Budget:
    """'30m', '2h', '1d', '90s', '1.5h'; 'NxGPU:TIME' for N GPUs of a kind with a throughput figure."""
    m = re.fullmatch(r"(?:(\d+)[xX]([A-Za-z0-9]+):)?(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not m or float(m[3]) <= 0 or (m[1] is not None and int(m[1]) < 1):
        raise LdaeError(f"--budget {text!r}: expected {FORMS}")
    gpu = m[2].upper() if m[2] else None
    if gpu is not None and gpu not in GPU_FLOPS:
        raise LdaeError(
            f"--budget {text!r}: no throughput figure for {m[2]} (known: {', '.join(GPU_FLOPS)}); give "
            "a time alone to size the run at this machine's measured speed"
        )
    return Budget(float(m[3]) * UNITS[m[4]], int(m[1] or 0), gpu, text)


def ladder() -> list[Rung]:
    """The model sizes a budget picks from, smallest first."""
    from ldae_cli.model.models import SIZES

    return [Rung("custom", 128, 4, 4, 4)] + [Rung(name, *SIZES[name]) for name in ("T", "S", "B", "half-L", "L")]


def patch_choices(side: int) -> list[int]:
    """Patches giving 16-64 tokens at this side, most tokens first (else the patch giving the most)."""
    fit = [p for p in PATCHES if TOKENS[0] <= (side // p) ** 2 <= TOKENS[1]]
    return fit or [next(p for p in PATCHES if (side // p) ** 2 <= TOKENS[1])]


def round_down(x: float) -> float:
    """`x` rounded down to 2 significant digits (an estimate's noise changes it seldom)."""
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    return float(f"{math.floor(x / step + 1e-9) * step:.2g}")


def size_run(
    facts: DataFacts,
    budget: Budget,
    speed: Callable[[Candidate], float],
    probe,
    pca: bool = True,
    objective: str = "ldae",
) -> Sized:
    """The keys a budget sets for this data (module docstring: the rules); `speed(candidate)` is training images per
    second, all ranks together; `probe` the config's OnlineProbeConfig, `objective` its objective."""
    side = min(facts.side, MAX_SIDE)
    if side < 4:
        raise LdaeError(
            f"--budget: the images of {facts.name} are {facts.side} px (median short side); a run needs "
            "at least 4 px, 2x2 patches of 2 px"
        )
    rungs = ladder()
    allowed = [r for r in rungs if r.params <= PARAMS_PER_IMAGE * facts.images] or rungs[:1]
    seconds = budget.seconds * TRAIN_SHARE
    ranks = max(1, budget.gpus)
    per_rank = GPU_BATCH if budget.gpus else CPU_BATCH
    while per_rank > 1 and facts.images < per_rank * ranks * MIN_STEPS_PER_EPOCH:
        per_rank //= 2
    batch = per_rank * ranks

    def epochs(c: Candidate) -> float:
        return seconds * speed(c) / facts.images

    candidates = [Candidate(p, side // p * p, r, batch) for p in patch_choices(side) for r in reversed(allowed)]
    pick = next((c for c in candidates if epochs(c) >= MIN_EPOCHS), candidates[-1])  # the fewest tokens, smallest
    reached = epochs(pick) >= MIN_EPOCHS
    epoch_count = max(round_down(min(epochs(pick), MAX_EPOCHS)), round_down(batch / facts.images))
    full = pick.patch**2 * 3
    d = min(PCA_DIM, full // 3)
    r = pick.rung
    preset = r.size != "custom"
    overrides = {
        "data.image_size": pick.image_size,
        "tokenizer.patch": pick.patch,
        **({"tokenizer.dim": d, "tokenizer.fit_patches": min(1_000_000, max(200_000, 100 * full))} if pca else {}),
        "model.size": r.size,
        "model.width": None if preset else r.width,
        "model.encoder_depth": None if preset else r.encoder_depth,
        "model.decoder_depth": None if preset else r.decoder_depth,
        "model.num_heads": None if preset else r.num_heads,
        **({} if preset else {"optim.blr": SMALL_BLR}),
        "optim.batch_size": batch,
        "optim.epochs": epoch_count,
        "optim.warmup_epochs": round_down(epoch_count / 10),
        "run.time_limit_minutes": round(budget.seconds / 60, 2),
        "run.compile": budget.gpus > 0,
    }
    overrides["online_probe.enabled"], probe_line = probe_decision(facts, probe, overrides, ranks, objective)
    why = (
        f"the most tokens, then the largest model of at most {PARAMS_PER_IMAGE} block parameters per training "
        f"image, that get {MIN_EPOCHS} epochs"
        if reached
        else f"the fewest tokens and the smallest model: none gets {MIN_EPOCHS} epochs in this budget"
    )
    lines = [
        (
            f"--budget {budget.text} sized this run for {facts.name} ({facts.images:,} training images"
            f"{f', {facts.classes} classes' if facts.classes else ''}):"
        ),
        (
            f"  image size {pick.image_size}: median short side {facts.side} rounded down to a multiple of the patch "
            f"({f'capped at {MAX_SIDE}, the paper' if facts.side > MAX_SIDE else 'native, never upsampled'})"
        ),
        f"  patch {pick.patch}: {pick.tokens} tokens of D = {full} values, and model {r.size} ({why})",
        (
            f"  d {d}: the PCA keeps min({PCA_DIM}, D/3) (docs/studies/latent-dim: d = 16 ahead of 64 and 128)"
            if pca
            else "  d: the config's tokenizer keeps every pixel"
        ),
        (
            f"  model {r.size}: width {r.width}, {r.encoder_depth} + {r.decoder_depth} blocks, {r.params / 1e6:.1f}M "
            "block parameters" + ("" if preset else " (the cpu study budget's size)")
        ),
        (
            f"  batch {batch}, {epoch_count:g} epochs, warm-up {overrides['optim.warmup_epochs']:g} (what "
            f"{TRAIN_SHARE:.0%} of the budget pays for, at most {MAX_EPOCHS})"
        ),
        f"  {probe_line}",
        (
            f"  expected: about {clock_text(epoch_count * facts.images / speed(pick))} of training at "
            f"{speed(pick):,.0f} img/s; the run stops at {budget.text} whatever (run.time_limit_minutes)"
        ),
    ]
    return Sized(overrides, lines)


def probe_decision(facts: DataFacts, probe, overrides: dict, ranks: int, objective: str) -> tuple[bool, str]:
    """Whether the online probe can meet its floor at this size of run (online_probe.online_fit_size), and the line
    saying so or why not."""
    from ldae_cli.model.models import ModelConfig
    from ldae_cli.settings.optim import OptimConfig
    from ldae_cli.train.online_probe import online_fit_size

    keys = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("model.")}
    optim = OptimConfig(
        batch_size=overrides["optim.batch_size"],
        epochs=overrides["optim.epochs"],
        warmup_epochs=overrides["optim.warmup_epochs"],
    )
    cfg = SimpleNamespace(
        objective=objective, online_probe=probe, run=SimpleNamespace(seed=0), model=ModelConfig(**keys), optim=optim
    )
    try:
        per_class = online_fit_size(
            cfg,
            SimpleNamespace(rank=0, world=ranks),
            facts.images,
            facts.classes,
            min(probe.test_images, facts.eval_images),
        )
    except LdaeError as exc:
        return False, f"online probe: off: {exc}"
    return True, f"online probe: on: up to {per_class:,} fit images per class, at most {probe.max_share:.0%} of the run"


def clock_text(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 120
        else f"{seconds / 60:.0f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )


def sized_flags(
    text: str, config: str | None, overrides: list[str], flags: dict, preview: str | None, others: dict
) -> tuple[str, dict]:
    """`--budget TEXT`: the config to start from (--config, else final.yaml) and the command line's flags with the
    sized keys added (so they sit between the config and --set), after saying what was decided and why: as YAML
    comments above --print-config's YAML, else on the console. `others`: options a budget cannot go with."""
    budget = parse_budget(text)
    given = next((option for option, value in others.items() if value), None)
    if given is not None:
        raise LdaeError(
            f"--budget sizes a new run and cannot go with {given} (a run's recipe is its checkpoint's); "
            f"save the sized config with --print-config and give it with --config and {given}"
        )
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if preview is None and ranks != max(1, budget.gpus):
        raise LdaeError(
            f"--budget {text} sizes a run for {budget.gpus or 'this machine in'} "
            f"{'GPUs' if budget.gpus else 'one process'}, and this launch has {ranks} process(es); save "
            f"it with --print-config and start it with `torchrun --nproc-per-node {max(1, budget.gpus)} "
            "-m ldae_cli pretrain --config FILE`"
        )
    from ldae_cli.config import load_config
    from ldae_cli.data.discovery import settle_data
    from ldae_cli.runs.logs import console
    from ldae_cli.runs.rundir import RUNS
    from ldae_cli.train.engine_pretrain import PretrainConfig

    base = config or BASE_CONFIG
    # the data a --set names is what gets sized; its other keys apply after the sizing (a config with only some
    # of them, e.g. epochs without the warm-up, need not be valid)
    cfg = load_config(PretrainConfig, base, [o for o in overrides if o.strip().startswith("data.")], flags)
    settle_data(cfg.data)  # its notes are said when the sized config is loaded
    if not cfg.data.path:
        raise LdaeError("--budget sizes a run to your data: give --data DIR")
    if cfg.tokenizer.kind == "trained" or cfg.tokenizer.path:
        raise LdaeError(
            f"--budget chooses the tokenizer's patch and d, and {base} reads a tokenizer file "
            f"(tokenizer.path {cfg.tokenizer.path}); set tokenizer.path=null, or size the run by hand"
        )
    facts = data_facts(cfg.data)
    speed, assumed = measured_speed(cfg, budget)
    sized = size_run(facts, budget, speed, cfg.online_probe, pca=cfg.tokenizer.kind == "pca", objective=cfg.objective)
    lines = [*sized.lines, f"  ({assumed()})"]
    if preview == "config":  # stdout is the YAML alone: the decisions go above it as comments
        sys.stdout.write("".join(f"# {line}\n" for line in lines))
    else:
        console.print("\n".join(lines), markup=False)
    out = cfg.run.out_dir or str(RUNS / "pretrain" / facts.name)
    return base, {**flags, **sized.overrides, "run.out_dir": out}


def data_facts(data) -> DataFacts:
    """What sizing needs of the data a resolved DataConfig names (file listings and a sample of image headers)."""
    from ldae_cli.data.pipeline import median_short_side
    from ldae_cli.data.sources import open_source
    from ldae_cli.runs.rundir import data_name

    train = open_source(data, "train")
    classes = len(train.classes) if data.source != "images" else 0
    held = 0
    if classes >= 2:
        try:
            held = len(open_source(data, "eval"))
        except LdaeError:
            held = 0  # no evaluation split: the online probe is off, said so
    side = median_short_side(train)
    if side is None:
        raise LdaeError(f"--budget: none of the sampled images of {data.path} could be read to measure their size")
    return DataFacts(data_name(data), min(len(train), data.limit or len(train)), classes, held, side)


def measured_speed(cfg, budget: Budget) -> tuple[Callable[[Candidate], float], Callable[[], str]]:
    """Images per second of a candidate, all ranks together: for GPUs the documented figure over its FLOPs, here
    the FLOP rate dryrun.estimate_images_per_second finds for the config's network at the candidate's width and
    tokens (one timing each); and the sentence saying what the last estimate assumed."""
    import copy

    from ldae_cli.train.dryrun import estimate_images_per_second

    said, rates = [""], {}

    def speed(c: Candidate) -> float:
        if budget.gpus:
            assert budget.gpu is not None  # parse_budget: N x GPU comes with its kind
            said[0] = (
                f"assumed: {GPU_FLOPS[budget.gpu] / 1e12:.1f} TFLOP/s per {budget.gpu}, what half-L reached "
                "on an H200 (docs/bench-pretrain-step-h200.json); a smaller network reaches less"
            )
            return budget.gpus * GPU_FLOPS[budget.gpu] / c.flops
        if (c.rung.width, c.tokens) not in rates:
            timed = copy.deepcopy(cfg)
            timed.data.image_size, timed.tokenizer.patch, timed.tokenizer.dim = c.image_size, c.patch, PCA_DIM
            (
                timed.model.size,
                timed.model.width,
                timed.model.encoder_depth,
                timed.model.decoder_depth,
                timed.model.num_heads,
            ) = c.rung
            timed.optim.batch_size, timed.optim.micro_batch = c.batch, None
            rate, assumed = estimate_images_per_second(timed)
            rates[c.rung.width, c.tokens] = rate * c.flops, assumed
        flops_per_second, said[0] = rates[c.rung.width, c.tokens]
        return flops_per_second / c.flops

    return speed, lambda: said[0]

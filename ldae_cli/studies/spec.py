"""What a study is: its variants (a pretrain config plus overrides, and probe overrides), the budget every run gets,
and each run's settings resolved from the two before anything runs, as `ldae pretrain` resolves them: to refuse a
budget that would upsample the data, to plan the runs and to estimate their time."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from ldae_cli.config import load_config
from ldae_cli.data.pipeline import median_short_side, native_image_size
from ldae_cli.data.sources import open_source, resolve_path
from ldae_cli.errors import LdaeError
from ldae_cli.runs.distributed import DistContext
from ldae_cli.settings.optim import plan_steps
from ldae_cli.settings.training import PCA_DIM, DataConfig, ModelConfig, PretrainConfig, TokenizerConfig

LDAE_PAPER = "Chen, Liu, Xie, He 2024 (Deconstructing Denoising Diffusion Models for Self-Supervised Learning)"
PAPER_NOTE = (
    "The paper's numbers are ImageNet linear-probe top-1 of a ViT-½L encoder after 400 epochs: the "
    "direction of a change, not a value to reach here."
)
Baseline = Literal["random-init", "pixels"]
BASELINE_NAMES = {"random-init": "random init (same network)", "pixels": "raw pixels"}


@dataclass
class Variant:
    name: str
    pretrain: Optional[str] = None  # its pretrain config (a path or a bundled name); null: the study's
    set: dict[str, Any] = field(default_factory=dict)  # overrides of that config (`--set` keys), after the budget's
    probe_set: dict[str, Any] = field(default_factory=dict)  # overrides of the budget's probe, e.g. probe.depth
    family: Optional[str] = None  # rows read together on the page (e.g. one latent-scale rule)
    versus: Optional[str] = None  # the row this one is compared with; null: the study's reference
    paper: Optional[float] = None  # the paper's ImageNet linear-probe top-1 for this setting, where it gives one
    paper_row: Optional[str] = None  # where in the paper that is, or what it says where it gives no number
    paper_source: Optional[str] = None  # the publication `paper` is from; null: the l-DAE paper (LDAE_PAPER)


@dataclass
class DepthSweep:
    """One variant per encoder cut k = 1 .. every block of the budget's model (probe.depth = k), the paper's number
    beside each k whose share k / N of the blocks is one of its cuts (after `paper` blocks of `of`)."""

    of: int = 24
    paper: dict[int, float] = field(default_factory=dict)


@dataclass
class PixelDimSweep:
    """The paper's Fig. 4 at the budget's sequence length: `pairs` (image size, patch) pairs from the budget's own,
    each halving both (always the same tokens, D = 3 p^2 falling 4x a pair), each pair a pixel DAE and an l-DAE with
    PCA d = min(dim, D); the paper's number and words beside each D it names."""

    pairs: int = 3
    dim: int = PCA_DIM
    paper: dict[int, float] = field(default_factory=dict)  # D -> the paper's pixel-tokenizer top-1
    paper_rows: dict[int, str] = field(default_factory=dict)  # D -> where in Fig. 4 that D is, or what it says


@dataclass
class StudyConfig:
    name: str = "study"
    description: str = ""  # what is compared and what the paper finds; a page's settings come from its runs
    pretrain: str = "final.yaml"  # the pretrain config every variant starts from
    variants: list[Variant] = field(default_factory=list)
    baselines: list[Baseline] = field(default_factory=list)  # probed on the first variant's architecture and data
    reference: Optional[str] = None  # the row the others are compared with; null: the first (a sweep's: the split)
    depth_sweep: Optional[DepthSweep] = None  # instead of variants: one per encoder cut of the budget's model
    pixel_dim_sweep: Optional[PixelDimSweep] = None  # instead of variants: Fig. 4's pairs below the budget's
    paper_note: Optional[str] = None  # what the paper numbers are; null: PAPER_NOTE (the l-DAE paper's ViT-1/2L)

    def validate(self) -> None:
        if [bool(self.variants), self.depth_sweep is not None, self.pixel_dim_sweep is not None].count(True) != 1:
            raise LdaeError("a study gives one of variants (one or more), depth_sweep or pixel_dim_sweep")


@dataclass
class BudgetConfig:
    """What every run of a study gets (pretrain and probe overrides), and the speed of the machine the budget is
    made for, which the estimate printed before a study uses until the study has timed runs of its own.

    optim.blr is stated for the study's own pretrain config (l-DAE's, whose paper blr is final.yaml's): a variant
    with a config of its own (another method's recipe) gets it scaled by that config's paper blr over the study
    config's (`budget_overrides`), so every method keeps its paper's blr relative to l-DAE's."""

    name: str = "budget"
    pretrain: dict[str, Any] = field(default_factory=dict)  # --set overrides of every pretrain run
    probe_config: str = "probe/small-fast.yaml"
    probe: dict[str, Any] = field(default_factory=dict)  # --set overrides of every probe
    images_per_second: float = 500.0  # pretraining speed, every process start and PCA fit included
    probe_minutes: float = 2.0  # one probe, start to end

    def validate(self) -> None:
        if not (self.images_per_second > 0 and self.probe_minutes > 0):
            raise LdaeError(f"budget {self.name}: images_per_second and probe_minutes must be positive")


def settings_of(overrides: dict[str, Any]) -> list[str]:
    """KEY=VALUE, values as JSON, which the config loader reads back as the same YAML values."""
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


def resolve(config: str, overrides: dict[str, Any]) -> PretrainConfig:
    """The config `ldae pretrain --config CONFIG --set KEY=VALUE ...` loads (its data settled when the run starts)."""
    return load_config(PretrainConfig, config, settings_of(overrides))


def budget_overrides(budget: BudgetConfig, study_config: str, config: str) -> dict[str, Any]:
    """The budget's pretrain keys for a run of `config`: its optim.blr times config's blr / study_config's (both
    as their files give them: the papers' own), where the two differ."""
    keys = dict(budget.pretrain)
    if "optim.blr" in keys and config != study_config:
        own, base = resolve(config, {}).optim.blr, resolve(study_config, {}).optim.blr
        if own != base:
            keys["optim.blr"] = float(f"{keys['optim.blr'] * own / base:.4g}")
    return keys


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


def depth_variants(sweep: DepthSweep, model: ModelConfig) -> tuple[list[Variant], str]:
    """The sweep's variants for this model, and the name of the one at the encoder/decoder split."""
    _, encoder, decoder, _ = model.resolved()
    blocks = encoder + decoder
    variants = []
    for k in range(1, blocks + 1):
        cut = k * sweep.of / blocks
        paper = sweep.paper.get(int(cut)) if cut.is_integer() else None
        variants.append(
            Variant(
                f"after {k} of {blocks} blocks" + (" (the split)" if k == encoder else ""),
                probe_set={"probe.depth": k},
                paper=paper,
                paper_row=f"A: {int(cut)} of {sweep.of}" if paper is not None else None,
            )
        )
    return variants, variants[encoder - 1].name


def pixel_dim_variants(sweep: PixelDimSweep, data: DataConfig, tokenizer: TokenizerConfig) -> tuple[list[Variant], str]:
    """The sweep's variants below the budget's image size and patch, and the name of the largest D's pixel DAE."""
    if data.image_size is None:
        raise LdaeError(
            "pixel_dim_sweep: its pairs halve the budget's data.image_size, which this budget leaves to "
            "the data; give one, e.g. --set data.image_size=256"
        )
    if data.image_size >> (sweep.pairs - 1) < 1 or tokenizer.patch >> (sweep.pairs - 1) < 1:
        raise LdaeError(
            f"pixel_dim_sweep: {sweep.pairs} pairs halve {data.image_size}/{tokenizer.patch} below one "
            "pixel; give fewer pairs or a larger budget"
        )
    variants = []
    for i in range(sweep.pairs):
        size, patch = data.image_size >> i, tokenizer.patch >> i
        pair, full = f"{size}/{patch}", 3 * patch * patch
        pixel = f"pixel DAE {pair} (D = {full})"
        variants.append(
            Variant(
                pixel,
                family=pair,
                paper=sweep.paper.get(full),
                paper_row=sweep.paper_rows.get(full),
                set={
                    "data.image_size": size,
                    "tokenizer.patch": patch,
                    "tokenizer.kind": "pixel",
                    "tokenizer.dim": None,
                    "tokenizer.latent_scale": "none",
                },
            )
        )
        dim = min(sweep.dim, full)
        variants.append(
            Variant(
                f"l-DAE {pair} (d = {dim})",
                family=pair,
                versus=pixel,
                set={"data.image_size": size, "tokenizer.patch": patch, "tokenizer.dim": dim},
            )
        )
    return variants, variants[0].name


def check_rows(names: list[str], versus: dict[str, str | None], where: str) -> None:
    """Row names distinct (also as run directory names), every comparison naming a row."""
    slugs = [slug(n) for n in names]
    if len(set(slugs)) < len(slugs):
        raise LdaeError(f"{where}: row names must differ (also in letters and digits alone), got {names}")
    for name, other in versus.items():
        if other is not None and other not in names:
            raise LdaeError(
                f"{where}: row '{name}' is compared with '{other}', which is not a row; rows: {', '.join(names)}"
            )


@dataclass
class DataFacts:
    """What a study needs to know of the data its runs train on."""

    native: int | None  # the median short side of its training images
    train_images: int
    location: Path


def data_key(data: DataConfig) -> tuple:
    return data.source, data.path, data.train_split, data.limit


_ARCHIVES: dict[tuple, DataFacts] = {}  # this process's surveys of archives, by the archive's size and time


def facts_of(data: DataConfig) -> DataFacts:
    """What a study needs of `data`'s training split: reading it takes seconds, so an archive's (a file, whose size
    and modification time say whether it changed) is surveyed once per process; a folder every time."""
    location = resolve_path(data)
    stat = location.stat() if location.is_file() else None
    key = (*data_key(data), str(location), stat.st_size, stat.st_mtime_ns) if stat else None
    if key is not None and key in _ARCHIVES:
        return _ARCHIVES[key]
    source = open_source(data, "train")
    facts = DataFacts(median_short_side(source), min(len(source), data.limit or len(source)), location)
    if key is not None:
        _ARCHIVES[key] = facts
    return facts


def survey(settings: list[PretrainConfig], budget: str) -> dict[tuple, DataFacts]:
    """The data of every run; a run whose data.image_size is above its data's native size is refused."""
    facts: dict[tuple, DataFacts] = {}
    for s in settings:
        key = data_key(s.data)
        if key not in facts:
            facts[key] = facts_of(s.data)
        if s.data.image_size is None:  # the size the run will settle it to (data.pipeline.resolve_image_size)
            s.data.image_size = native_image_size(s.data, s.tokenizer.patch)[0]
        native = facts[key].native
        if native is not None and s.data.image_size > native:
            p = s.tokenizer.patch
            raise LdaeError(
                f"budget {budget}: data.image_size {s.data.image_size} is above the native "
                f"{native}x{native} of {s.data.source} at {facts[key].location} (the median short side of "
                f"its training images); a study never upsamples, since an upsampled {p}x{p} patch carries "
                f"fewer than its {p * p * 3} values: use a budget at or below {native}, or --set "
                f"data.image_size={native}"
            )
    return facts


def total_steps(s: PretrainConfig, facts: dict[tuple, DataFacts]) -> int:
    """Optimizer steps of a pretrain run with these settings (as the run plans them)."""
    return plan_steps(facts[data_key(s.data)].train_images, s.optim, 0, DistContext()).total_steps

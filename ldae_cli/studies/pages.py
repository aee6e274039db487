"""A study's page: results.json, results.md and results.png, all written from what `results.collect` read back from
the runs (their resolved settings, numbers, timings), never from a budget's or study's description of them."""

from __future__ import annotations

import io
import json
from pathlib import Path, PurePosixPath

from ldae_cli.runs.rundir import write_atomically
from ldae_cli.studies.results import NO_DIFFERENCE
from ldae_cli.studies.spec import LDAE_PAPER, PAPER_NOTE

# how each pretrain setting reads on the page, in this order
SETTING_TEXT = {
    "data": "{}",
    "image_size": "{0}×{0} images",
    "patch": "{0}×{0} patches",
    "D": "D = {}",
    "tokens": "{} tokens",
    "tokenizer": "{} tokenizer",
    "d": "d = {}",
    "latent_scale": "latent scale {}",
    "noise_scale": "noise scale s = {}",
    "model": "{}",
    "batch": "batch {}",
    "epochs": "{:g} epochs",
    "steps": "{:,} steps",
    "lr": "lr {:.3g}",
    "warmup_epochs": "warm-up {:g} epochs",
    "ema": "EMA {}",
    "optimizer": "{}",
    "augmentation": "{}",
    "objective": "{}",
}
PROBE_TEXT = {
    "mode": "{}",
    "epochs": "{:g} epochs",
    "batch": "batch {}",
    "blrs": "heads at blr {}",
    "knn_k": "k-NN k = {}",
    "t": "t = {}",
    "depth": "after {} blocks",
    "features": "features: {}",
    "limit": "{} images per split",
    "eval_split": "eval split {}",
}
COLUMN_NAMES = {"noise_scale": "noise scale s", "image_size": "image", "latent_scale": "latent scale"}


def setting_text(key: str, value, texts: dict[str, str]) -> str:
    if value is None:
        return {
            "depth": "after the encoder/decoder split",
            "ema": "no EMA",
            "limit": "full splits",
            "eval_split": "default eval split",
        }.get(key, f"{key} none")
    return texts[key].format(value)


def common_and_varying(settings: list[dict], texts: dict[str, str]) -> tuple[list[str], list[str]]:
    """The settings in `texts` every row shares (as text), and every key that differs between rows, in `texts` or
    not (a setting the page has no words for is still a column where rows differ in it)."""
    common, varying = [], []
    for key in dict.fromkeys([*texts, *(k for s in settings for k in s)]):
        if all(key not in s for s in settings):
            continue  # recorded by a later version: a page from before it renders as it did
        values = {json.dumps(s.get(key)) for s in settings}
        if len(values) != 1:
            varying.append(key)
        elif key in texts:
            common.append(setting_text(key, settings[0].get(key), texts))
    return common, varying


def cell(stat: dict) -> str:
    if stat.get("mean") is None:
        return "-"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}" if stat.get("std") is not None else f"{stat['mean']:.2f}"


def delta(stat: dict) -> tuple[str, str]:
    p = stat.get("paired")
    if p is None:
        return "", ""
    value = f"{p['mean']:+.2f} ± {p['se']:.2f}" if p["se"] is not None else f"{p['mean']:+.2f}"
    return value, f"**{p['verdict']}**" if p["verdict"] != NO_DIFFERENCE else p["verdict"]


def paper_cell(row: dict) -> str:
    if row["paper"] is not None:
        return f"{row['paper']:.1f} ({row['paper_row']})"
    return row["paper_row"] or "-"


def sources(results: dict) -> list[str]:
    """Where each paper number comes from, and the rows neither source gives one for; only where some row cites a
    publication other than the l-DAE paper (a study of the l-DAE paper's own rows says so in its note)."""
    rows = results["rows"]
    if not any(r.get("paper_source") for r in rows):
        return []
    cited = [
        f"{r['name']}: {r['paper']:.1f}, {r.get('paper_source') or LDAE_PAPER}, {r['paper_row']}"
        for r in rows
        if r["paper"] is not None
    ]
    none = [r["name"] for r in rows if r["paper"] is None]
    return [
        "Paper numbers: "
        + "; ".join(cited)
        + "."
        + (f" '-': a number found in neither source ({', '.join(none)})." if none else ""),
        "",
    ]


def what_ran(results: dict) -> tuple[list[str], list[str], list[str]]:
    """The 'What ran' paragraph, and the pretrain and probe keys that differ between rows."""
    variants = [r for r in results["rows"] if r["settings"] is not None]
    common, varying = common_and_varying([r["settings"] for r in variants], SETTING_TEXT)
    probe_common, probe_varying = common_and_varying([r["probe"] for r in variants], PROBE_TEXT)
    data = []
    for d in results["dataset"]:
        identity = f", training data sha256 {d['train_sha256'][:16]}…" if d["train_sha256"] else ""
        # the file's name, not its path: the page is read away from the machine the study ran on
        data.append(
            f"`{d['source']}` (`{PurePosixPath(d['path']).name}`, {d['train_images']:,} training images, "
            f"native {d['native_size']}×{d['native_size']}{identity})"
        )
    lines = [f"Data: {'; '.join(data)}.", ""]
    if common:
        lines += [f"Every pretrain run: {', '.join(common)}.", ""]
    chosen = {r["probe"].get("select", "eval") for r in variants}  # results from before probe.select: on eval
    how = {
        "eval": "the best of its linear heads (one per blr) is chosen on the eval split",
        "holdout": "its linear head (one per blr) is chosen on a seeded 10 % of the training split held out from "
        "the heads, and its top-1 on the eval split is reported",
    }
    if probe_common:
        lines += [
            f"Every probe: {', '.join(probe_common)}; "
            f"{how[chosen.pop()] if len(chosen) == 1 else 'its linear head is chosen as probe.select says'}.",
            "",
        ]
    return lines, varying, probe_varying


def results_table(results: dict) -> list[str]:
    families = any(r["family"] for r in results["rows"])
    head = [
        "row",
        *(["family"] if families else []),
        "vs",
        "linear top-1",
        "Δ linear (paired)",
        "verdict",
        "k-NN top-1",
        "Δ k-NN (paired)",
        "verdict",
        "paper (ImageNet)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in results["rows"]:
        cells = [row["name"]] + ([row["family"] or ""] if families else []) + [row["versus"] or "(reference)"]
        cells += [cell(row["linear"]), *delta(row["linear"]), cell(row["knn"]), *delta(row["knn"]), paper_cell(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def rows_table(results: dict, varying: list[str], probe_varying: list[str]) -> list[str]:
    if not varying and not probe_varying:
        return []
    head = ["row"] + [COLUMN_NAMES.get(k, k) for k in varying] + [f"probe {k}" for k in probe_varying]
    lines = ["## What differs between rows", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in results["rows"]:
        settings = row["settings"] or {}
        cells = [row["name"]] + [str(settings.get(k, "-")) if row["settings"] else "-" for k in varying]
        cells += [str(row["probe"].get(k)) for k in probe_varying]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def share_text(percent: float) -> str:
    return f"{percent:.2f}" if percent < 99.95 else f"{percent:.3f}"  # 99.99 and 100 differ in what they keep


def patch_table(results: dict) -> list[str]:
    lines = [
        "## Patch space",
        "",
        "Share of the patch variance in the top d PCA components (%), and the global latent scale s(d) = "
        "√(mean of the top d eigenvalues) that `latent_scale: global` divides by: the noise a run adds on each "
        "kept component is s·σ in pixel units (the pixel tokenizer: σ). Measured by this study's PCA fits.",
        "",
    ]
    for space in results["patch_space"]:
        dims = list(space["share_pct"])
        lines += [
            f"{space['data']}, {space['image_size']}×{space['image_size']} images, {space['patch']}×"
            f"{space['patch']} patches (D = {space['D']}; PCA `{space['pca']}`, {space['patches']:,} patches):",
            "",
            "| d | " + " | ".join(map(str, dims)) + " |",
            "|" + " --- |" * (len(dims) + 1),
            "| variance share % | " + " | ".join(share_text(space["share_pct"][d]) for d in dims) + " |",
            "| global scale s(d) | " + " | ".join(f"{space['global_scale'][d]:.3f}" for d in dims) + " |",
            "",
        ]
    return lines


def legend(results: dict) -> str:
    seeds = len(results["seeds"])
    if seeds < 2:
        return (
            "One seed: no standard error can be computed, so every verdict is 'no difference shown'; Δ is the "
            "difference of that seed's runs."
        )
    t = next((r[m]["paired"]["t"] for r in results["rows"] for m in ("linear", "knn") if r[m].get("paired")), None)
    return (
        f"Δ: the mean over seeds {', '.join(map(str, results['seeds']))} of (row − the row named in 'vs'), runs "
        f"paired by run.seed, ± its standard error; a verdict is 'ahead' or 'behind' only when |Δ| > t(0.975, "
        f"n − 1) × standard error ({t} at {seeds} seeds), else 'no difference shown'. Top-1 cells: mean ± "
        "sample std over seeds."
    )


def markdown(results: dict) -> str:
    seeds = results["seeds"]
    title = f"# Study `{results['study']}`: budget `{results['budget']['name']}`, {len(seeds)} seed(s)"
    partial = (
        []
        if len(seeds) == results["seeds_planned"]
        else [
            f"**Partial:** {len(seeds)} of {results['seeds_planned']} planned seeds are complete; the study was "
            "stopped or is still running.",
            "",
        ]
    )
    ran, varying, probe_varying = what_ran(results)
    pretrain_min = [r["pretrain_s"] / 60 for row in results["rows"] for r in row["runs"] if r["pretrain_s"]]
    timing = (
        [f"Pretrain runs trained for {min(pretrain_min):.1f}–{max(pretrain_min):.1f} min each."] if pretrain_min else []
    )
    timing.append(
        f"The study's runs took {results['minutes']:.0f} min in all (every launch, start to exit, on the "
        "machine it ran on)."
    )
    lines = [
        title,
        "",
        *partial,
        results["description"],
        "",
        "## What ran",
        "",
        *ran,
        *rows_table(results, varying, probe_varying),
        "## Results",
        "",
        *results_table(results),
        "",
        legend(results),
        "",
        results.get("paper_note", PAPER_NOTE),
        "",
        *sources(results),
        *patch_table(results),
        " ".join(timing),
        "",
        f"Reproduce: `{results['command']}`",
        "",
    ]
    return "\n".join(lines)


def chart(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.2), dpi=120)
    xs = range(len(rows))
    tops = [(r[key]["mean"] or 0.0) + (r[key]["std"] or 0.0) for r in rows for key in ("linear", "knn")]
    ax.set_ylim(0, 1.2 * max(tops, default=1.0) or 1.0)  # headroom: the legend sits above the tallest bar's label
    for offset, key, label in ((-0.2, "linear", "linear probe"), (0.2, "knn", "k-NN")):
        means = [r[key]["mean"] or 0.0 for r in rows]
        bars = ax.bar(
            [x + offset for x in xs], means, 0.4, yerr=[r[key]["std"] or 0.0 for r in rows], capsize=3, label=label
        )
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], fontsize=7, padding=2)
    ax.set_xticks(list(xs), [r["name"] for r in rows], rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("top-1 % (eval split)")
    data = ", ".join(sorted({d["source"] for d in results["dataset"]}))
    ax.set_title(
        f"study {results['study']}: {data}, budget {results['budget']['name']}, {len(results['seeds'])} "
        "seed(s), mean ± std",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncols=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_atomically(path, buffer.getvalue())
    plt.close(fig)
    return path


def write(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "results.json", (json.dumps(results, indent=1) + "\n").encode())
    write_atomically(out / "results.md", markdown(results).encode())
    return [out / "results.json", out / "results.md", chart(results, out / "results.png")]

"""What a checkpoint is, for `ldae info` and `ldae.info`: kind and versions, training progress, the resolved
config in brief, network and tokenizer, the provenance chain (each parent verified by its sha256), size, parameter
count and the run's last metrics. `describe_checkpoint` returns plain JSON-able data; `render` draws it with rich.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rich.console import Group, RenderableType
from rich.table import Table
from safetensors import safe_open

from ldae_cli.errors import LdaeError
from ldae_cli.runs.checkpoint import load_checkpoint, read_metadata, sha256_file
from ldae_cli.runs.logs import read_metrics
from ldae_cli.runs.rundir import CHECKPOINT, METRICS

# pretrained.TIMM_WEIGHTS, named here so that describing an ldae checkpoint never imports pretrained (and timm,
# seconds to import); a timm export folder is read through pretrained
TIMM_WEIGHTS = "model.safetensors"
NETWORK_SECTION = {"pretrain": "model", "finetune": "model", "detect": "model", "tokenizer": "net", "probe": "heads"}
CONFIG_SUMMARY = {
    "data": ("source", "path", "image_size"),
    "model": ("size", "width", "encoder_depth", "decoder_depth", "num_heads", "ckpt", "t"),
    "tokenizer": ("kind", "path", "patch", "dim", "latent_scale"),
    "diffusion": ("schedule", "target", "loss_weight", "input_space", "output_space"),
    "mae": ("mask_ratio", "norm_pix_loss", "decoder_width", "decoder_depth", "decoder_heads"),
    "mocov3": ("temperature", "momentum", "momentum_cosine", "mlp_dim", "dim", "freeze_patch_embed", "crop_scale"),
    "pca": ("patch", "dim", "patches", "positions"),
    "probe": ("features", "fast", "t", "depth", "blrs", "epochs", "batch_size"),
    "optim": ("batch_size", "epochs", "iterations", "blr", "lr", "ema"),
}
NETWORK_KEYS = (
    "width",
    "embed_dim",
    "encoder_depth",
    "decoder_depth",
    "depth",
    "num_heads",
    "patch_size",
    "img_size",
    "grid",
    "mlp_ratio",
)
TOKENIZER_KEYS = ("kind", "patch", "dim", "latent_scale", "stride", "latent_channels")
DETAIL_KEYS = {
    "pca": ("patch", "dim", "n_patches", "variance_explained", "image_size", "dataset"),
    "encoder": ("t", "depth", "image_size"),
    "probe": ("encoder", "random_init"),
    "finetune": ("weights", "best"),
}
RESULT_FILES = {"probe": "results.json", "detect": "eval.json", "tokenizer": "report.json"}
BOOKKEEPING = {"step", "epoch", "time_s", "img_per_s", "data_wait", "skipped_images", "online_probe_s"}


def describe_checkpoint(path: str | os.PathLike) -> dict:
    """Everything `ldae info` shows about an ldae checkpoint, a run directory (its checkpoint.safetensors) or a
    `ldae export --format timm` folder, as plain data. A damaged or foreign file raises the checkpoint module's
    one-line LdaeError."""
    path = Path(path)
    if path.is_dir() and (path / CHECKPOINT).is_file():
        path = path / CHECKPOINT
    elif path.is_dir() and not ((path / "config.json").is_file() and (path / TIMM_WEIGHTS).is_file()):
        raise LdaeError(
            f"{path}: neither a run directory ({CHECKPOINT}) nor an `ldae export --format timm` "
            f"folder (config.json + {TIMM_WEIGHTS}); give a checkpoint file or one of those"
        )
    folder = _timm_folder(path)
    if folder is not None:
        return _describe_timm(folder)
    # read as every stage reads it: a file they refuse (non-finite weights, metadata that does not fit its tensors)
    # is refused here with the same line, never described as normal
    ck = load_checkpoint(path)
    kind, extra, config, provenance = ck.kind, ck.extra, ck.config, ck.provenance
    info = {
        "path": str(path),
        "kind": kind,
        "format": "ldae checkpoint",
        "format_version": ck.format_version,
        "package_version": ck.package_version,
        "created": provenance.get("created"),
        "command": provenance.get("command"),
        "file_size": path.stat().st_size,
        "sha256": ck.sha256,
        "parameters": _parameters(path, NETWORK_SECTION.get(kind, "" if kind == "encoder" else None)),
        "training": _training(extra, config),
        "config": _config_summary(config),
        "network": _pick(_network_spec(extra), NETWORK_KEYS),
        "tokenizer": _pick(extra.get("tokenizer"), TOKENIZER_KEYS),
        "details": _pick(extra, DETAIL_KEYS.get(kind, ())),
        "parents": _parents(provenance),
        "metrics": None,
        "results": None,
    }
    if "step" in extra:  # a training run's checkpoint: its run directory holds the metrics and results
        info["metrics"] = _last_metrics(path.parent / METRICS)
        info["results"] = _results(kind, path.parent)
    return info


def _timm_folder(path: Path) -> Path | None:
    if not (path.is_dir() or path.name == TIMM_WEIGHTS):
        return None
    from ldae_cli.model.pretrained import timm_export

    return timm_export(path)


def _timm_provenance(folder: Path) -> dict:
    from ldae_cli.model.pretrained import read_timm_config, timm_provenance

    return timm_provenance(read_timm_config(folder))


def _describe_timm(folder: Path) -> dict:
    from ldae_cli.model.pretrained import read_timm_config, timm_provenance

    config = read_timm_config(folder)
    weights = folder / TIMM_WEIGHTS
    about = config.get("ldae") or {}
    parents = _parents(timm_provenance(config))
    # the folder keeps no training config; its source pretrain checkpoint does, when it is still there
    source = read_metadata(parents[0]["path"])["config"] if parents and parents[0]["status"] == "ok" else {}
    details = {
        **_pick(about, ("t", "depth", "image_size")),
        "architecture": config.get("architecture"),
        **_pick(config.get("pretrained_cfg"), ("input_size", "mean", "std")),
    }
    return {
        "path": str(folder),
        "kind": "encoder",
        "format": "timm export folder",
        "format_version": None,
        "package_version": about.get("package_version", ""),
        "created": None,
        "command": None,
        "file_size": weights.stat().st_size,
        "sha256": sha256_file(weights),
        "parameters": _parameters(weights, ""),
        "training": None,
        "config": _config_summary(source),
        "network": _pick(config["model_args"], NETWORK_KEYS),
        "tokenizer": None,
        "details": details,
        "parents": parents,
        "metrics": None,
        "results": None,
    }


def _pick(source: dict | None, keys) -> dict:
    """The entries of `source` named in `keys` that are set, in that order."""
    source = source if isinstance(source, dict) else {}
    return {k: source[k] for k in keys if source.get(k) is not None}


def _network_spec(extra: dict) -> dict | None:
    return extra.get("model_spec") or extra.get("timm_kwargs") or extra.get("backbone")


# the section of each pretraining objective (PretrainConfig.objective), shown for a run of that objective only
OBJECTIVE_SECTIONS = {"ldae": "diffusion", "mae": "mae", "mocov3": "mocov3"}


def _config_summary(config: dict) -> dict:
    objective = config.get("objective", "ldae")
    others = {section for name, section in OBJECTIVE_SECTIONS.items() if name != objective}
    summary = {
        section: _pick(config.get(section), keys) for section, keys in CONFIG_SUMMARY.items() if section not in others
    }
    if "objective" in config:
        summary = {"objective": {"objective": objective}, **summary}
    return {section: values for section, values in summary.items() if values}


def _parameters(path: Path, section: str | None) -> int | None:
    """Values in the network's tensors (`section.*`; every tensor for ''), read from the header only; None for a
    file without a network (a PCA)."""
    if section is None:
        return None
    prefix = f"{section}." if section else ""
    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys() if name.startswith(prefix))


def _training(extra: dict, config: dict) -> dict | None:
    if "total_steps" not in extra:  # no train state: not a training checkpoint, or a run's best weights
        return None
    epochs = (config.get("optim") or {}).get("epochs") or (config.get("probe") or {}).get("epochs")
    return {
        "step": extra["step"],
        "total_steps": extra.get("total_steps"),
        "epoch": extra.get("epoch"),
        "epochs": epochs,
        "finished": extra.get("finished"),
    }


def _parents(provenance: dict) -> list[dict]:
    """The checkpoints this one was made from, each followed to its own parents when its recorded path still holds
    the recorded sha256 ('ok'); 'missing' when nothing is there any more, 'changed' when another file is."""
    chain = []
    for ref in provenance.get("parents", []):
        entry = {k: ref.get(k) for k in ("role", "kind", "path", "sha256")}
        path = Path(ref.get("path") or "")
        if not path.is_file():
            entry["status"] = "missing"
        elif sha256_file(path) != ref.get("sha256"):
            entry["status"] = "changed"
        else:
            entry["status"] = "ok"
            folder = _timm_folder(path)  # a run started from a timm export records its model.safetensors
            entry["parents"] = _parents(
                _timm_provenance(folder) if folder is not None else read_metadata(path)["provenance"]
            )
        chain.append(entry)
    return chain


def _last_metrics(file: Path) -> dict | None:
    """The last value of every quantity in metrics.jsonl, with the step it was logged at."""
    records = read_metrics(file)
    if not records:
        return None
    last = {}
    for record in records:
        for key, value in record.items():
            if key not in BOOKKEEPING and isinstance(value, (int, float)) and not isinstance(value, bool):
                last[key] = {"value": value, "step": record.get("step")}
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    return {"file": str(file), "last_step": max(steps, default=None), "values": last}


def _results(kind: str, folder: Path) -> dict | None:
    """The headline numbers of the run's results file (probe results.json, detect eval.json, tokenizer
    report.json); None when there is none or it is torn."""
    if kind not in RESULT_FILES or not (folder / RESULT_FILES[kind]).is_file():
        return None
    file = folder / RESULT_FILES[kind]
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError:
        return None
    if kind == "probe":
        best = data["heads"][data["best_head"]]
        return {
            "file": str(file),
            "best_top1": data["best_top1"],
            "best_blr": best["blr"],
            "knn_top1": data.get("knn_top1"),
            "eval_split": data.get("eval_split"),
        }
    flat = {}
    for key, value in data.items():
        for sub, number in value.items() if isinstance(value, dict) else [("", value)]:
            if isinstance(number, (int, float)) and not isinstance(number, bool):
                flat[f"{key}_{sub}" if sub else key] = number
    return {"file": str(file), **flat}


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

STATUS_STYLE = {"ok": "green", "missing": "red", "changed": "yellow"}


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k} {_text(v)}" for k, v in value.items()) + ")"
    return str(value)


def _settings(values: dict) -> str:
    return "  ".join(f"{k} [bold]{_text(v)}[/bold]" for k, v in values.items())


def render(info: dict) -> Group:
    """The description as rich renderables: what the file is, its config, provenance and last metrics."""
    parts: list[RenderableType] = [_overview(info)]
    config = Table(title="configuration", show_header=False, title_justify="left")
    config.add_column(style="cyan")
    config.add_column()
    for section, values in info["config"].items():
        config.add_row(section, _settings(values))
    for name, label in (("network", "network"), ("tokenizer", "tokenizer in use"), ("details", "details")):
        if info.get(name):
            config.add_row(label, _settings(info[name]))
    if config.row_count:
        parts.append(config)
    parts.append(_provenance_table(info["parents"]) if info["parents"] else "provenance: made from no other checkpoint")
    if info.get("metrics") or info.get("results"):
        parts.append(_metrics_table(info))
    return Group(*parts)


def _overview(info: dict) -> Table:
    table = Table(title=f"{info['path']}", show_header=False, title_justify="left")
    table.add_column(style="cyan")
    table.add_column(overflow="fold")
    version = f", format version {info['format_version']}" if info["format_version"] else ""
    table.add_row("kind", f"[bold]{info['kind']}[/bold] ({info['format']}{version})")
    if info["package_version"]:
        table.add_row(
            "written by", f"ldae {info['package_version']}" + (f", {info['created']}" if info["created"] else "")
        )
    if info["command"]:
        table.add_row("command", info["command"])
    table.add_row("size", f"{info['file_size'] / 2**20:,.2f} MB")
    table.add_row("sha256", info["sha256"])
    if info["parameters"] is not None:
        table.add_row("parameters", f"{info['parameters']:,}")
    run = info["training"]
    if run:
        epochs = f" of {_text(run['epochs'])}" if run["epochs"] is not None else ""
        state = "finished" if run["finished"] else "[yellow]not finished[/yellow] (continue with --resume)"
        table.add_row(
            "training",
            f"step {run['step']:,} / {_text(run['total_steps'])}, epoch {_text(run['epoch'])}{epochs}: {state}",
        )
    return table


def _provenance_table(parents: list[dict]) -> Table:
    table = Table(title="provenance: the checkpoints it was made from", title_justify="left")
    for column in ("status", "role", "kind", "path", "sha256"):
        table.add_column(column, overflow="fold")
    _add_parents(table, parents, 0)
    return table


def _add_parents(table: Table, parents: list[dict], depth: int) -> None:
    for p in parents:
        style = STATUS_STYLE[p["status"]]
        table.add_row(
            f"[{style}]{p['status']}[/{style}]",
            "  " * depth + ("└ " if depth else "") + str(p["role"]),
            str(p["kind"]),
            str(p["path"]),
            (p["sha256"] or "")[:12],
        )
        _add_parents(table, p.get("parents", []), depth + 1)


def _metrics_table(info: dict) -> Table:
    metrics, results = info.get("metrics"), info.get("results") or {}
    table = Table(title="last metrics", title_justify="left")
    for column in ("quantity", "value", "step"):
        table.add_column(column, justify="left" if column == "quantity" else "right")
    for key, entry in metrics["values"].items() if metrics else ():
        table.add_row(key, _text(entry["value"]), _text(entry["step"]))
    for key, value in results.items():
        if key != "file":
            table.add_row(f"{key} ({Path(results['file']).name})", _text(value), "")
    run = info["training"]
    if metrics and run and metrics["last_step"] not in (None, run["step"]):
        table.caption = (
            f"metrics.jsonl goes to step {metrics['last_step']:,}; this checkpoint is at step {run['step']:,}"
        )
    return table

"""`ldae report`: the pictures a run's files hold, drawn by the same helpers the stages use."""

from __future__ import annotations

from pathlib import Path

from ldae_cli.data.plots import save_filters, save_panels
from ldae_cli.errors import LdaeError
from ldae_cli.runs.checkpoint import load_checkpoint, read_metadata
from ldae_cli.runs.logs import read_metrics
from ldae_cli.runs.outputs import refuse_to_replace

LOSS_KEYS = ("loss", "eval_loss", "ema_eval_loss")
ONLINE_KEYS = ("online_knn_top1", "online_linear_top1")
ACCURACY_KEYS = ("top1", "ema_top1")


def output(path: Path) -> Path:
    """report.png in a run directory; <stem>.report.png beside a checkpoint."""
    return path / "report.png" if path.is_dir() else path.with_name(path.stem + ".report.png")


def online_title(path: Path, records: list[dict]) -> str:
    """The online probe's panel title: what it fits and tests on, as its last record says."""
    last = next((r for r in reversed(records) if "online_fit_images" in r), None)
    if last is None:
        return f"{path.name}: online probe top-1 %"
    return (
        f"{path.name}: online probe top-1 %\n(fit {last['online_fit_images']:,} train images, "
        f"{last['online_fit_per_class']}/class; test {last['online_test_images']:,} eval images)"
    )


def main(paths: list[str], force: bool = False) -> list[Path]:
    for item in paths:
        refuse_to_replace(output(Path(item)), force, "report", "picture")
    written = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            metrics = path / "metrics.jsonl"
            if not metrics.exists():
                raise LdaeError(f"{path}: no metrics.jsonl in this run directory")
            records = read_metrics(metrics)
            png = save_panels(
                records,
                output(path),
                [
                    (LOSS_KEYS, f"{path.name}: loss", True),
                    (ONLINE_KEYS, online_title(path, records), False),
                    (ACCURACY_KEYS, f"{path.name}: top-1 % (eval split)", False),
                ],
            )
            if png is None:
                raise LdaeError(f"{metrics}: no step-wise values to plot")
            written.append(png)
        elif path.suffix == ".safetensors":
            kind = read_metadata(path)["kind"]
            if kind != "pca":
                raise LdaeError(
                    f"{path}: a '{kind}' checkpoint; report draws PCA filters (kind 'pca') and run directories' metrics"
                )
            ckpt = load_checkpoint(path, "pca")
            ckpt.require("patch")
            pca = ckpt.section("pca")
            written.append(
                save_filters(
                    pca["basis"],
                    ckpt.extra["patch"],
                    output(path),
                    eigenvalues=pca.get("eigenvalues"),
                    dim=ckpt.extra.get("dim"),
                )
            )
        else:
            raise LdaeError(f"{path}: expected a run directory or a .safetensors PCA checkpoint")
    return written

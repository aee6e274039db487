"""`ldae info` (ldae_cli/model/describe.py, stages/info.py) on real tiny checkpoints: what each kind says, the
provenance chain verified by sha256, the run's last metrics, JSON output and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import train_tiny
from safetensors.torch import save_file

from ldae_cli.errors import LdaeError
from ldae_cli.model.describe import describe_checkpoint
from ldae_cli.model.pretrained import export_encoder, export_timm
from ldae_cli.runs.checkpoint import load_checkpoint
from ldae_cli.runs.logs import read_metrics
from ldae_cli.stages import info as stage
from ldae_cli.stages import probe


@pytest.fixture(scope="module")
def runs(pattern_tree, tmp_path_factory) -> dict[str, Path]:
    """A 2-step pretrain run (with its fitted PCA), a fast probe of it, and both of its exports."""
    root = tmp_path_factory.mktemp("info")
    ckpt = train_tiny(
        "final.yaml",
        pattern_tree,
        root / "pre",
        **{"tokenizer.patch": 4, "tokenizer.dim": 8, "online_probe.per_class": 1, "online_probe.max_share": 1},
    )
    sets = [
        "probe.fast=true",
        "probe.epochs=2",
        "probe.warmup_epochs=1",
        "probe.batch_size=8",
        "probe.blrs=[0.01,1.0]",
        "probe.select=eval",
        "run.progress=false",
        "data.num_workers=0",
        f"run.out_dir={root / 'probe'}",
    ]  # select eval: the heads train on all 16 images, 2 steps an epoch
    probe.main(None, sets, {}, ckpt=str(ckpt), random_init=False)
    return {
        "pretrain": ckpt,
        "pca": root / "pre" / "pca.safetensors",
        "probe": root / "probe",
        "encoder": export_encoder(ckpt, root / "encoder.safetensors"),
        "timm": export_timm(ckpt, root / "timm"),
        "root": root,
    }


def test_a_pretrain_checkpoint(runs):
    info = describe_checkpoint(runs["pretrain"])
    ck = load_checkpoint(runs["pretrain"])
    assert info["kind"] == "pretrain" and info["format"] == "ldae checkpoint" and info["format_version"] == 1
    assert info["package_version"] == ck.package_version and info["sha256"] == ck.sha256
    assert info["file_size"] == runs["pretrain"].stat().st_size
    assert info["parameters"] == sum(t.numel() for t in ck.section("model").values())
    assert info["training"] == {"step": 2, "total_steps": 2, "epoch": 1.0, "epochs": 1.0, "finished": True}
    assert info["config"]["data"]["source"] == "imagefolder" and info["config"]["data"]["image_size"] == 32
    assert info["config"]["model"]["width"] == 32 and info["config"]["diffusion"]["target"] == "x0"
    assert info["config"]["optim"]["batch_size"] == 8
    assert info["network"]["width"] == 32 and info["network"]["num_heads"] == 2
    assert info["tokenizer"] == {"kind": "pca", "patch": 4, "dim": 8, "latent_scale": "global"}
    pca_sha = load_checkpoint(runs["pca"]).sha256
    assert info["parents"] == [
        {"role": "tokenizer", "kind": "pca", "path": str(runs["pca"]), "sha256": pca_sha, "status": "ok", "parents": []}
    ]
    records = read_metrics(runs["pretrain"].parent / "metrics.jsonl")
    last_loss = [r for r in records if "loss" in r][-1]
    assert info["metrics"]["values"]["loss"] == {"value": last_loss["loss"], "step": 2}
    assert "online_linear_top1" in info["metrics"]["values"] and info["metrics"]["last_step"] == 2
    assert "time_s" not in info["metrics"]["values"]  # bookkeeping stays out
    assert describe_checkpoint(runs["pretrain"].parent) == info  # a run directory names its checkpoint


def test_a_pca_checkpoint_has_no_training_and_no_metrics(runs):
    info = describe_checkpoint(runs["pca"])
    assert info["kind"] == "pca" and info["training"] is None and info["parameters"] is None
    assert info["metrics"] is None  # the pretrain run's metrics.jsonl beside it is not its own
    details = info["details"]
    assert details["patch"] == 4 and details["dim"] == 8 and 0 < details["variance_explained"] <= 1
    assert info["config"]["pca"]["patches"] == 4000 and info["parents"] == []


def test_a_probe_follows_its_provenance_and_reads_results_json(runs):
    info = describe_checkpoint(runs["probe"])
    results = json.loads((runs["probe"] / "results.json").read_text())
    assert info["kind"] == "probe" and info["training"]["finished"] and info["training"]["epochs"] == 2
    assert info["results"]["best_top1"] == results["best_top1"] and info["results"]["knn_top1"] == results["knn_top1"]
    assert info["results"]["best_blr"] == results["heads"][results["best_head"]]["blr"]
    assert info["details"]["encoder"] == results["encoder"]
    [pretrain] = info["parents"]
    assert (pretrain["role"], pretrain["kind"], pretrain["status"]) == ("pretrain", "pretrain", "ok")
    assert [p["kind"] for p in pretrain["parents"]] == ["pca"] and pretrain["parents"][0]["status"] == "ok"


def test_exports_ldae_and_timm_describe_the_same_encoder(runs):
    enc, timm = describe_checkpoint(runs["encoder"]), describe_checkpoint(runs["timm"])
    assert enc["kind"] == timm["kind"] == "encoder" and timm["format"] == "timm export folder"
    weights = load_checkpoint(runs["encoder"]).tensors
    assert enc["parameters"] == timm["parameters"] == sum(t.numel() for t in weights.values())
    assert enc["network"] == timm["network"] and timm["network"]["depth"] == 1
    assert timm["details"]["t"] == enc["details"]["t"] == 10
    # the folder keeps no config; its verified source does
    assert timm["config"] == enc["config"] and timm["config"]["data"]["source"] == "imagefolder"
    for info in (enc, timm):
        assert [(p["kind"], p["status"]) for p in info["parents"]] == [("pretrain", "ok")]
        assert info["parents"][0]["parents"][0]["kind"] == "pca"
    assert describe_checkpoint(runs["timm"] / "model.safetensors") == timm


def test_a_moved_or_replaced_parent_is_marked(runs, tmp_path):
    copy = tmp_path / "copy.safetensors"
    shutil.copy(runs["pretrain"], copy)
    encoder = export_encoder(copy, tmp_path / "enc.safetensors")
    assert describe_checkpoint(encoder)["parents"][0]["status"] == "ok"
    shutil.copy(runs["pca"], copy)  # another file under the recorded name
    [parent] = describe_checkpoint(encoder)["parents"]
    assert parent["status"] == "changed" and "parents" not in parent
    copy.unlink()
    assert describe_checkpoint(encoder)["parents"][0]["status"] == "missing"


def test_json_output_is_the_description(runs, capsys):
    returned = stage.main(str(runs["probe"]), as_json=True)
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(returned)) and printed["kind"] == "probe"


def test_tables_show_kind_progress_provenance_and_metrics(runs, capsys, monkeypatch):
    from ldae_cli.runs.logs import console

    monkeypatch.setattr(console, "width", 200)
    run = stage.main(str(runs["probe"]))["training"]
    out = capsys.readouterr().out
    pretrain_sha = load_checkpoint(runs["pretrain"]).sha256
    assert run["step"] == run["total_steps"] == 4  # 16 images, batch 8, 2 epochs
    for text in (
        "probe (ldae checkpoint, format version 1)",
        "step 4 / 4",
        "finished",
        "best_top1 (results.json)",
        "knn_top1 (results.json)",
        "provenance: the checkpoints it was made from",
    ):
        assert text in out, text
    rows = [" ".join(line.replace("│", " ").split()) for line in out.splitlines()]
    assert f"ok pretrain pretrain {runs['pretrain']} {pretrain_sha[:12]}" in rows
    assert any(row.startswith("ok └ tokenizer pca ") for row in rows)


def test_damaged_foreign_and_odd_inputs_are_one_line_errors(runs, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(runs["pretrain"].read_bytes()[:-1000])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": __import__("torch").zeros(2)}, str(foreign))
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    cases = {
        truncated: "checkpoint is truncated",
        foreign: "without ldae metadata, not an ldae checkpoint",
        png: "not an ldae checkpoint",
        tmp_path / "nope.safetensors": "checkpoint not found",
        tmp_path: "neither a run directory (checkpoint.safetensors) nor an `ldae export --format timm` folder",
    }
    for path, message in cases.items():
        with pytest.raises(LdaeError, match=None) as caught:
            describe_checkpoint(path)
        assert message in str(caught.value) and "\n" not in str(caught.value), (path, caught.value)

"""`ldae detect`: ViTDet Mask R-CNN from a folded encoder. Synthetic COCO-format data (boxes + polygon
masks) trains 2 iterations and evaluates end to end; the loading report is exact for every model size;
window/global blocks follow the quarter rule; resume is exact; bad data and checkpoints fail in one line."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, train_tiny, write_image_tree
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from ldae_cli.config import load_config
from ldae_cli.errors import LdaeError
from ldae_cli.model import detection
from ldae_cli.model.models import SIZES, build_timm_vit
from ldae_cli.model.pretrained import fold_encoder, load_encoder, load_pretrained
from ldae_cli.runs.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from ldae_cli.stages import detect as stage
from ldae_cli.train import engine_detect

# detectron2 imports timm's old module path and uses torch.jit.script; stage runs silence both, the
# direct builds here do not
pytestmark = [
    pytest.mark.filterwarnings("ignore:Importing from timm.models.layers:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
]


class MetaParams(TorchFunctionMode):
    """`with torch.device("meta")` for weights (sizes of every model in seconds, no memory), except the
    scalar math detectron2 reads back with .item() while building (drop-path rates), which stays on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            func in _device_constructors()
            and func not in (torch.linspace, torch.tensor)
            and kwargs.get("device") is None
        ):
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory) -> Path:
    """A real tiny l-DAE run: width 32, 8 encoder blocks (so window and global blocks both occur), patch 4, 32^2."""
    base = tmp_path_factory.mktemp("pre")
    images = write_image_tree(base / "imgs", classes=("a", "b"), per_class=4, size=(32, 32), splits=("train",))
    return train_tiny(
        "final.yaml",
        images,
        base / "run",
        **{"tokenizer.patch": 4, "tokenizer.dim": 8, "model.encoder_depth": 8, "model.decoder_depth": 1},
    )


def detect_sets(coco: Path, out: Path, **extra) -> list[str]:
    """--set overrides that shrink cpu-tiny to a 2-iteration run on the synthetic COCO set."""
    sets = {
        "data.path": str(coco),
        "data.train_split": "train",
        "data.eval_split": "val",
        "data.image_size": 64,
        "data.num_workers": 0,
        "backbone.size": None,
        "model.pyramid_channels": 16,
        "model.box_fc_dim": 32,
        "model.roi_batch_per_image": 32,
        "optim.batch_size": 2,
        "optim.iterations": 2,
        "optim.warmup_iterations": 1,
        "optim.lr_steps": "[0.5]",
        "run.out_dir": str(out),
        "run.progress": False,
        "run.log_every": 1,
        "run.save_every": 100,
        "run.device": "cpu",
    }
    sets.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in sets.items()]


SCRATCH = {
    "backbone.size": "custom",
    "backbone.width": 32,
    "backbone.depth": 8,
    "backbone.num_heads": 2,
    "backbone.patch_size": 4,
    "backbone.pretrain_image_size": 32,
}


def run(overrides, resume=None, ckpt=None, from_scratch=False, eval_only=False, config="detect/cpu-tiny"):
    return stage.main(
        config, overrides, {}, resume, ckpt=ckpt and str(ckpt), from_scratch=from_scratch, eval_only=eval_only
    )


# --------------------------------------------------------------------------------------------- structure


def test_global_blocks_at_each_quarter():
    assert detection.global_block_indexes(12) == [2, 5, 8, 11]  # ViTDet-B
    assert detection.global_block_indexes(24) == [5, 11, 17, 23]  # ViTDet-L
    assert detection.global_block_indexes(8) == [1, 3, 5, 7]
    assert detection.global_block_indexes(4) == [0, 1, 2, 3]
    assert detection.global_block_indexes(2) == [0, 1]
    spec = detection.BackboneSpec(32, 12, 2, 16, 256)
    with MetaParams():
        model = detection.build_detector(
            spec, detection.DetectorSpec(image_size=1024, num_classes=3, drop_path=0.1, window_size=8)
        )
    windows = [block.window_size for block in model.backbone.net.blocks]
    assert windows == [8, 8, 0, 8, 8, 0, 8, 8, 0, 8, 8, 0]
    # relative positions: 8x8 windows, or the whole 64x64 grid in global blocks
    assert [tuple(b.attn.rel_pos_h.shape) for b in model.backbone.net.blocks[1:3]] == [(15, 16), (127, 16)]
    drop = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.backbone.net.blocks]
    assert drop[0] == 0.0 and drop[-1] == pytest.approx(0.1)
    assert isinstance(model.backbone.net.blocks[0].mlp.act, torch.nn.GELU)
    assert model.backbone.net.blocks[0].mlp.act.approximate == "tanh"
    # patch 16 gives exactly ViTDet's pyramid p2..p6 (strides 4..64) with anchors 32..512
    assert list(model.backbone.output_shape()) == ["p2", "p3", "p4", "p5", "p6"]
    anchors = detection.detector_config(spec, detection.DetectorSpec(1024, 3, 0.1, 8)).proposal_generator
    assert anchors.anchor_generator.strides == [4, 8, 16, 32, 64]
    assert anchors.anchor_generator.sizes == [[32], [64], [128], [256], [512]]


@pytest.mark.parametrize("size", list(SIZES))
def test_loading_report_is_exact_for_every_size(size):
    """Every folded-encoder tensor lands in backbone.net; only rel-pos and pyramid/heads start fresh."""
    width, enc, _, heads = SIZES[size]
    kwargs = dict(
        img_size=(256, 256),
        patch_size=16,
        embed_dim=width,
        depth=enc,
        num_heads=heads,
        mlp_ratio=4.0,
        class_token=False,
        global_pool="avg",
        final_norm=False,
        fc_norm=False,
        num_classes=0,
        act_layer="gelu_tanh",
    )
    with MetaParams():
        encoder = build_timm_vit(kwargs).state_dict()  # the fold writes exactly these names and shapes
        spec = detection.BackboneSpec.from_timm_kwargs(kwargs, size)
        model = detection.build_detector(spec, detection.DetectorSpec(1024, 80, 0.1, 8))
    report = detection.loading_report(detection.shapes(model.state_dict()), detection.shapes(encoder))
    assert report.ok, report.to_dict()
    assert sorted(report.loaded) == sorted(detection.NET_PREFIX + k for k in encoder)
    assert report.loaded_params == sum(v.numel() for v in encoder.values())
    assert sorted(report.fresh_rel_pos) == sorted(
        f"{detection.NET_PREFIX}blocks.{i}.attn.rel_pos_{a}" for i in range(enc) for a in "hw"
    )
    assert all(not k.startswith(detection.NET_PREFIX) for k in report.fresh_new)
    assert len(report.loaded) + len(report.fresh_rel_pos) + len(report.fresh_new) == len(model.state_dict())


def test_loading_report_names_anything_else():
    kwargs = dict(img_size=(32, 32), patch_size=4, embed_dim=32, depth=2, num_heads=2)
    spec = detection.BackboneSpec.from_timm_kwargs(kwargs, "x")
    with MetaParams():
        model = detection.build_detector(spec, detection.DetectorSpec(64, 2, 0.0, 8, 16, 32, 32))
    target = detection.shapes(model.state_dict())
    good = {
        k[len(detection.NET_PREFIX) :]: v
        for k, v in target.items()
        if k.startswith(detection.NET_PREFIX) and not k.endswith(detection.REL_POS)
    }
    assert detection.loading_report(target, good).ok
    extra = {**good, "cls_token": (1, 1, 32)}
    with pytest.raises(LdaeError, match=r"unexpected in the encoder \['cls_token'\]"):
        detection.loading_report(target, extra).check("ck")
    short = {k: v for k, v in good.items() if k != "blocks.1.mlp.fc2.weight"}
    with pytest.raises(LdaeError, match=r"missing from the encoder \['blocks.1.mlp.fc2.weight'\]"):
        detection.loading_report(target, short).check("ck")
    wrong = {**good, "pos_embed": (1, 65, 32)}  # a class-token position embedding
    with pytest.raises(LdaeError, match=r"shape mismatch \['pos_embed: \(1, 65, 32\) vs \(1, 64, 32\)'\]"):
        detection.loading_report(target, wrong).check("ck")


def test_folded_encoder_computes_the_same_features_in_detectron2(pretrain_ckpt):
    """At the pretraining size (no interpolation) with one 8x8 window over the 8x8 grid and zero relative
    positions, detectron2's ViT loaded from the fold is the timm ViT: same blocks, tanh-GELU, no class token."""
    vit, kwargs, _ = load_encoder(pretrain_ckpt)
    folded, _ = fold_encoder(load_pretrained(pretrain_ckpt))
    assert set(folded) == set(vit.state_dict())  # what the every-size report test takes from timm
    spec = detection.BackboneSpec.from_timm_kwargs(kwargs, "x")
    model = detection.build_detector(spec, detection.DetectorSpec(32, 2, 0.0, 8, 16, 32, 32)).eval()
    detection.load_encoder_into(model, vit.state_dict(), "x")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ours = model.backbone.net(x)["last_feat"].flatten(2).transpose(1, 2)
        timm_out = vit.forward_features(x)
    torch.testing.assert_close(ours, timm_out, atol=1e-5, rtol=1e-5)


def test_configs_carry_the_papers_recipe():
    b = load_config(stage.DetectConfig, "detect/vitdet-B")
    lg = load_config(stage.DetectConfig, "detect/vitdet-L")
    assert (b.backbone.size, b.backbone.drop_path, lg.backbone.size, lg.backbone.drop_path) == ("B", 0.1, "L", 0.2)
    for cfg in (b, lg):
        assert cfg.backbone.window_size == 8 and cfg.optim.layer_decay == 0.95
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.batch_size) == (1e-4, 0.1, 64)
        assert cfg.data.image_size == 1024 and cfg.data.scale_range == [0.1, 2.0]
        assert cfg.optim.milestones() == [163889, 177546] and cfg.optim.warmup_iterations == 250
    tiny = load_config(stage.DetectConfig, "detect/cpu-tiny")
    assert tiny.backbone.shape() == (128, 4, 4) and tiny.run.device == "cpu"
    with pytest.raises(LdaeError, match="optim.lr_steps"):
        load_config(stage.DetectConfig, "detect/cpu-tiny", ["optim.iterations=3"])


# --------------------------------------------------------------------------------------------- end to end


def test_train_two_iterations_and_evaluate(coco, pretrain_ckpt, tmp_path):
    out = tmp_path / "det"
    # batch 2 as 2 micro-batches of 1: the accumulation path
    path = run(detect_sets(coco, out, **{"optim.micro_batch": 1}), ckpt=pretrain_ckpt)
    ck = load_checkpoint(path, "detect")
    assert ck.extra["step"] == 2 and ck.extra["finished"] and ck.extra["init"] == "pretrain"
    assert ck.extra["class_names"] == ["square", "disc"] and ck.extra["num_classes"] == 2
    assert ck.extra["backbone"] == {
        "width": 32,
        "depth": 8,
        "num_heads": 2,
        "patch_size": 4,
        "pretrain_image_size": 32,
        "mlp_ratio": 4.0,
    }
    parent = ck.provenance["parents"][0]
    assert parent["role"] == "pretrain" and parent["sha256"] == sha256_file(pretrain_ckpt)
    report = json.loads((out / "load_report.json").read_text())
    assert report["ok"] and report["loaded"] == 2 + 1 + 8 * 12 and len(report["fresh_rel_pos"]) == 16
    assert set(ck.extra["eval"]) == {"step", "bbox", "segm"} and set(ck.extra["eval"]["bbox"]) >= set(
        engine_detect.AP_KEYS
    )
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    assert all(math.isfinite(r[k]) for r in train_records for k in ("loss",) + engine_detect.LOSSES)
    assert "bbox_AP" in records[-1] and "segm_AP" in records[-1]
    assert json.loads((out / "eval.json").read_text())["bbox"] == ck.extra["eval"]["bbox"]
    assert not list(out.rglob("*.pth"))  # nothing pickled into the run directory

    again = run(["run.progress=false", f"run.out_dir={tmp_path / 'ev'}"], ckpt=path, eval_only=True, config=None)
    assert json.loads(again.read_text())["segm"] == ck.extra["eval"]["segm"]


def test_resume_is_exact_from_scratch(coco, tmp_path):
    sets = {**SCRATCH, "optim.iterations": 4, "optim.lr_steps": "[0.75]"}
    full = run(detect_sets(coco, tmp_path / "full", **sets), from_scratch=True)
    run(detect_sets(coco, tmp_path / "cut", **sets, **{"run.stop_after_steps": 2}), from_scratch=True)
    cut = load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")
    assert cut.extra["step"] == 2 and not cut.extra["finished"] and cut.extra["eval"] is None
    assert cut.extra["init"] == "scratch" and cut.provenance["parents"] == []
    with pytest.raises(LdaeError, match="optim.lr"):
        run(["optim.lr=0.5"], resume=str(tmp_path / "cut"), config=None)
    run([], resume=str(tmp_path / "cut"), config=None)
    a, b = load_checkpoint(full), load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")
    assert b.extra["step"] == 4
    for section in ("model", "optim"):
        ta, tb = a.section(section), b.section(section)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), section

    def losses(run_dir):
        return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(tmp_path / "full") == losses(tmp_path / "cut")
    with pytest.raises(LdaeError, match="already holds a detect checkpoint"):
        run(detect_sets(coco, tmp_path / "full", **sets), from_scratch=True)


# --------------------------------------------------------------------------------------------- errors


@pytest.fixture
def broken_coco(coco, tmp_path) -> Path:
    root = tmp_path / "broken"
    shutil.copytree(coco, root)
    return root


def test_data_errors_name_the_file(broken_coco):
    root = broken_coco
    with pytest.raises(
        LdaeError,
        match=r"instances_train2017.json: COCO annotations not found.*found "
        r"instances_train.json, instances_val.json",
    ):
        detection.register_coco_split(root, "train2017")
    (root / "annotations" / "instances_val.json").write_text('{"images": [1, 2,')
    with pytest.raises(LdaeError, match=r"instances_val.json: not valid JSON \(line 1"):
        detection.register_coco_split(root, "val")
    (root / "annotations" / "instances_val.json").write_text("[1, 2]")
    with pytest.raises(LdaeError, match=r"instances_val.json: not a COCO instances file"):
        detection.register_coco_split(root, "val")
    (root / "annotations" / "instances_val.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(LdaeError, match=r"instances_val.json: not a COCO instances file"):
        detection.register_coco_split(root, "val")
    (root / "train" / "000001.png").unlink()
    with pytest.raises(LdaeError, match=r"instances_train.json: 1 of 4 images are missing from .*\(first: 000001"):
        detection.register_coco_split(root, "train")
    shutil.rmtree(root / "train")
    with pytest.raises(LdaeError, match=r"train: image folder for split 'train' not found"):
        detection.register_coco_split(root, "train")
    with pytest.raises(LdaeError, match="data.path .*: not a folder"):
        detection.register_coco_split(root / "nope", "train")


def test_checkpoint_errors(coco, pretrain_ckpt, tmp_path):
    with pytest.raises(LdaeError, match="needs --ckpt PRETRAIN"):
        run(detect_sets(coco, tmp_path / "a"))
    with pytest.raises(LdaeError, match=r"is a 'pretrain' checkpoint, expected 'detect'"):
        run(detect_sets(coco, tmp_path / "b"), ckpt=pretrain_ckpt, eval_only=True)
    with pytest.raises(LdaeError, match=r"width 32, 8 blocks, 2 heads, but this config is for backbone.size B"):
        run(detect_sets(coco, tmp_path / "c", **{"backbone.size": "B"}), ckpt=pretrain_ckpt)
    with pytest.raises(LdaeError, match="data.path is not set"):
        run(detect_sets(coco, tmp_path / "d", **{"data.path": None}), ckpt=pretrain_ckpt)
    with pytest.raises(LdaeError, match="backbone.size is null"):
        run(detect_sets(coco, tmp_path / "e"), from_scratch=True)


def test_cli_reports_a_wrong_kind_in_one_line(coco, tmp_path, run_main):
    bogus = tmp_path / "x.safetensors"
    save_checkpoint(bogus, "probe", {"w": torch.zeros(1)}, {})
    r = run_main("detect", "--config", "detect/cpu-tiny", "--ckpt", bogus, "--data", coco)
    assert r.returncode != 0
    assert "is a 'probe' checkpoint, expected 'pretrain' or 'encoder'" in r.stderr
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------------- real data

COCO_MINI = REPO_ROOT.parent / "shared" / "data" / "coco-mini.tar.gz"


@pytest.mark.slow
@pytest.mark.skipif(not COCO_MINI.exists(), reason="needs ../shared/data/coco-mini.tar.gz")
def test_coco_mini_runs_for_real(tmp_path):
    """The real COCO mini set (80 categories, crowd regions, RLE and polygon masks): a few iterations of
    cpu-tiny from scratch, then COCO evaluation on its 79 val images."""
    import tarfile

    with tarfile.open(COCO_MINI) as tar:
        tar.extractall(tmp_path, filter="data")
    path = run(
        [
            f"data.path={tmp_path / 'coco-mini'}",
            f"run.out_dir={tmp_path / 'run'}",
            "run.progress=false",
            "optim.iterations=4",
            "optim.warmup_iterations=1",
            "optim.lr_steps=[0.5]",
        ],
        from_scratch=True,
    )
    ck = load_checkpoint(path, "detect")
    assert ck.extra["num_classes"] == 80 and ck.extra["finished"]
    assert set(ck.extra["eval"]) == {"step", "bbox", "segm"}


@pytest.mark.slow
@pytest.mark.skipif(not COCO_MINI.exists(), reason="needs ../shared/data/coco-mini.tar.gz")
def test_coco_mini_runs_from_an_mae_checkpoint(tmp_path):
    """`ldae detect` from a tiny MAE run (the kind of checkpoint the paper's Table 6 sets beside l-DAE): its folded
    encoder loads in full, two iterations train and COCO evaluation runs on the real mini set."""
    import tarfile

    images = write_image_tree(tmp_path / "imgs", classes=("a", "b"), per_class=4, size=(32, 32), splits=("train",))
    mae = train_tiny(
        "baselines/mae.yaml",
        images,
        tmp_path / "mae",
        **{
            "tokenizer.patch": 4,
            "model.encoder_depth": 4,
            "model.decoder_depth": 0,
            "mae.decoder_width": 16,
            "mae.decoder_depth": 1,
            "mae.decoder_heads": 2,
            "online_probe.enabled": False,
        },
    )
    with tarfile.open(COCO_MINI) as tar:
        tar.extractall(tmp_path, filter="data")
    path = run(
        [
            f"data.path={tmp_path / 'coco-mini'}",
            f"run.out_dir={tmp_path / 'run'}",
            "run.progress=false",
            "backbone.size=null",
            "optim.iterations=2",
            "optim.warmup_iterations=1",
            "optim.lr_steps=[0.5]",
        ],
        ckpt=mae,
    )
    ck = load_checkpoint(path, "detect")
    assert ck.extra["init"] == "pretrain" and ck.extra["finished"] and ck.extra["num_classes"] == 80
    assert ck.provenance["parents"][0]["sha256"] == sha256_file(mae)
    assert json.loads((tmp_path / "run" / "load_report.json").read_text())["ok"]
    assert set(ck.extra["eval"]) == {"step", "bbox", "segm"}


@pytest.mark.slow
def test_two_ranks_under_torchrun(coco, tmp_path):
    """2 gloo ranks (torchrun): each takes its half of every global batch; evaluation gathers both shards."""
    sets = detect_sets(coco, tmp_path / "ddp", **SCRATCH)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29547",
            "-m",
            "ldae_cli",
            "detect",
            "--config",
            "detect/cpu-tiny",
            "--from-scratch",
            *sum((["--set", s] for s in sets), []),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    ck = load_checkpoint(tmp_path / "ddp" / "checkpoint.safetensors", "detect")
    assert ck.extra["world_size"] == 2 and ck.extra["finished"] and ck.extra["eval"]["bbox"]

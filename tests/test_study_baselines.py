"""The `baselines` study (l-DAE against MAE and MoCo v3 on one encoder): each method's paper optimiser with its blr
scaled by the budget, one encoder for every method, each run's training FLOPs by its objective (what a study's and
a pretrain's time estimates scale by), and a page that names where each paper number comes from."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ldae_cli.settings.contrastive import MocoV3Config
from ldae_cli.stages.study import load
from ldae_cli.studies import pages, runner
from ldae_cli.studies.results import objective_text
from ldae_cli.studies.spec import LDAE_PAPER, BudgetConfig, StudyConfig, resolve
from ldae_cli.train.dryrun import training_flops_per_image


def plan_of(budget: str, data, tmp_path):
    return runner.make_plan(
        load("study", "baselines", StudyConfig),
        load("budget", budget, BudgetConfig),
        1,
        tmp_path,
        {"data.source": "imagefolder", "data.path": str(data), "optim.batch_size": 8},
    )


@pytest.mark.parametrize("budget", ["cpu", "gpu"])
def test_each_method_keeps_its_papers_optimiser_with_the_blr_the_budget_scales_on_one_encoder(
    budget, pattern_tree, tmp_path
):
    plan = plan_of(budget, pattern_tree, tmp_path)
    by_name = {run.label.split(",")[0]: (run, plan.settings[key]) for key, run in plan.pretrains.items()}
    assert [r.name for r in plan.rows] == ["l-DAE", "MAE", "MoCo v3", "random init (same network)", "raw pixels"]
    ldae, mae = by_name["l-DAE"][1], by_name["MAE"][1]
    scale = load("budget", budget, BudgetConfig).pretrain["optim.blr"] / 1.0e-4  # over l-DAE's paper blr
    assert ldae.optim.blr == pytest.approx(1.0e-4 * scale) and mae.optim.blr == pytest.approx(1.5e-4 * scale)
    assert (ldae.objective, ldae.optim.betas, ldae.optim.weight_decay, ldae.data.crop) == (
        "ldae",
        [0.9, 0.999],
        0.0,
        "center",
    )
    assert (
        mae.objective,
        mae.optim.betas,
        mae.optim.weight_decay,
        mae.data.crop,
        mae.data.crop_scale,
        mae.data.hflip,
    ) == ("mae", [0.9, 0.95], 0.05, "random-resized", [0.2, 1.0], True)
    for key in ("batch_size", "epochs", "warmup_epochs"):  # every method sees the same images
        assert getattr(mae.optim, key) == getattr(ldae.optim, key)
    width, encoder, _, heads = ldae.model.resolved()
    assert mae.model.resolved()[:2] + (mae.model.resolved()[3], mae.tokenizer.patch, mae.data.image_size) == (
        width,
        encoder,
        heads,
        ldae.tokenizer.patch,
        ldae.data.image_size,
    )
    assert f"optim.blr={mae.optim.blr}" in by_name["MAE"][0].own  # --dry-run lists the scaled blr
    assert by_name["MAE"][0].speed != by_name["l-DAE"][0].speed
    assert plan.budget_flops == by_name["l-DAE"][0].flops > by_name["MAE"][0].flops
    moco = by_name["MoCo v3"][1]
    assert (moco.objective, moco.optim.betas, moco.optim.weight_decay, moco.data.crop, moco.data.hflip) == (
        "mocov3",
        [0.9, 0.999],
        0.1,
        "center",
        False,
    )  # its views are its augmentation
    assert moco.optim.blr == pytest.approx(1.5e-4 * scale) and by_name["MoCo v3"][0].flops > plan.budget_flops
    assert moco.model.resolved()[:2] + (moco.model.resolved()[3], moco.tokenizer.patch) == (
        width,
        encoder,
        heads,
        ldae.tokenizer.patch,
    )


def test_training_flops_per_image_follow_the_objective_on_the_same_encoder():
    cpu = load("budget", "cpu", BudgetConfig).pretrain  # 32x32, 8x8 patches (16 tokens), width 128, 4 + 4 blocks
    ldae = resolve("final.yaml", cpu)
    mae = resolve(
        "baselines/mae.yaml",
        {
            **cpu,
            "tokenizer.dim": None,
            "model.decoder_depth": 0,
            "mae.decoder_width": 64,
            "mae.decoder_depth": 2,
            "mae.decoder_heads": 2,
        },
    )
    w, pixels = 128, 192

    def blocks(depth, tokens, width):  # multiply-adds of ViT blocks: qkv + proj + MLP, scores + values
        return depth * (tokens * 12 * width * width + 2 * tokens * tokens * width)

    ldae_macs = blocks(8, 16, w) + 16 * w * (pixels + pixels)
    mae_macs = blocks(4, 4, w) + 4 * w * pixels + blocks(2, 16, 64) + 16 * 64 * (w + pixels)  # 4 of 16 seen
    assert training_flops_per_image(ldae) == 2 * 3 * ldae_macs
    assert training_flops_per_image(mae) == 2 * 3 * mae_macs
    assert training_flops_per_image(mae) / training_flops_per_image(ldae) == pytest.approx(mae_macs / ldae_macs)
    assert 0.15 < mae_macs / ldae_macs < 0.25

    # MoCo v3 (its config section read as `objective: mocov3` will give it): two views through the base encoder and
    # heads with backward, and through the momentum encoder and projector forward only
    moco = SimpleNamespace(
        **{k: getattr(ldae, k) for k in ("data", "tokenizer", "model", "diffusion")},
        objective="mocov3",
        mocov3=MocoV3Config(mlp_dim=512, dim=32),
    )
    encoder = blocks(4, 16, w) + 16 * w * pixels
    projector, predictor = w * 512 + 512 * 512 + 512 * 32, 32 * 512 + 512 * 32
    moco_macs = 2 * (3 * (encoder + projector + predictor) + encoder + projector)
    assert training_flops_per_image(moco) == 2 * moco_macs
    assert training_flops_per_image(moco) > training_flops_per_image(ldae)
    assert objective_text(moco).startswith("MoCo v3, tau 0.2, momentum 0.99 to 1 (cosine), heads 512 hidden, 32 out")
    assert objective_text(mae) == (
        "MAE, 75% of patches hidden, decoder width 64, 2 blocks, 2 heads, normalised pixel targets"
    )


def row(name, paper=None, paper_row=None, source=None):
    stat = {"mean": 40.0, "std": 0.5}
    return {
        "name": name,
        "family": None,
        "versus": None,
        "paper": paper,
        "paper_row": paper_row,
        "paper_source": source,
        "linear": stat,
        "knn": stat,
    }


def test_the_page_names_each_paper_numbers_source_and_the_rows_neither_source_has():
    study = load("study", "baselines", StudyConfig)
    assert [v.paper for v in study.variants] == [66.6, 68.0, 76.7] and "ViT-B" in study.paper_note
    rows = [
        row("l-DAE", 66.6, "Table 5a"),
        row("MoCo v3", 76.7, "ViT-B, 300 ep", "Chen, Xie, He 2021"),
        row("raw pixels"),
    ]
    text = pages.sources({"rows": rows})[0]
    assert text == (
        f"Paper numbers: l-DAE: 66.6, {LDAE_PAPER}, Table 5a; MoCo v3: 76.7, Chen, Xie, He 2021, ViT-B, "
        "300 ep. '-': a number found in neither source (raw pixels)."
    )
    assert pages.results_table({"rows": rows})[-1].endswith("| - |")
    assert pages.sources({"rows": rows[:1] + rows[2:]}) == []  # the l-DAE paper alone: its own studies' pages

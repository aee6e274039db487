"""`ldae study` at toy size (two variants, two seeds, a baseline): it runs every child with --continue, continues
what was stopped, extends itself when seeds are added, refuses to reuse a run whose settings differ and a budget
that would upsample; its page is the runs' own numbers and settings, each row compared with its reference over
paired seeds; Ctrl-C stops the whole study; the matched-noise latent scale."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import study_args, train_tiny, write_image_tree

from ldae_cli.config import BUNDLED_CONFIGS, config_from_dict
from ldae_cli.errors import Interrupted, LdaeError, Terminated
from ldae_cli.model.models import ModelConfig
from ldae_cli.model.tokenizers import PCATokenizer, TokenizerConfig
from ldae_cli.runs.checkpoint import load_checkpoint, read_metadata
from ldae_cli.settings.evaluation import LinearProbeConfig
from ldae_cli.stages.study import load
from ldae_cli.studies import local, pages, patchspace, runner
from ldae_cli.studies.results import NO_DIFFERENCE, paired, t_quantile
from ldae_cli.studies.spec import BudgetConfig, DepthSweep, PixelDimSweep, StudyConfig, depth_variants

TOY_BUDGET = {
    "name": "toy",
    "pretrain": {
        "data.image_size": 32,
        "data.num_workers": 0,
        "tokenizer.patch": 4,
        "tokenizer.dim": 8,
        "tokenizer.fit_patches": 4000,
        "model.size": "custom",
        "model.width": 32,
        "model.encoder_depth": 1,
        "model.decoder_depth": 1,
        "model.num_heads": 2,
        "optim.batch_size": 8,
        "optim.epochs": 1.5,
        "optim.warmup_epochs": 0.5,
        "run.compile": False,
        "run.progress": False,
        "run.log_every": 1,
        "run.device": "cpu",
    },
    "probe_config": "probe/small-fast.yaml",
    "probe": {
        "probe.epochs": 3,
        "probe.warmup_epochs": 0.3,
        "probe.batch_size": 8,
        "probe.blrs": [0.1, 10.0],
        "data.num_workers": 0,
        "run.progress": False,
        "run.device": "cpu",
    },
    "images_per_second": 100.0,
    "probe_minutes": 0.1,
}
TOY_STUDY = {
    "name": "toy",
    "description": "l-DAE against the pixel DAE, at toy size.",
    "pretrain": "final.yaml",
    "reference": "l-DAE",
    "variants": [
        {"name": "l-DAE", "paper": 64.5, "paper_row": "T3.5"},
        {
            "name": "pixel DAE",
            "set": {"tokenizer.kind": "pixel", "tokenizer.dim": None, "tokenizer.latent_scale": "none"},
        },
    ],
    "baselines": ["random-init"],
}


@pytest.fixture
def toy(tmp_path, pattern_tree):
    return study_args(tmp_path, pattern_tree, TOY_STUDY, TOY_BUDGET)


def test_a_study_runs_continues_extends_and_pages_its_runs_own_numbers(toy, run_main, tmp_path):
    out = tmp_path / "out"
    # two runs at once throughout (the order and the numbers are --jobs 1's: tests/test_study_parallel.py)
    stopped = run_main(*toy, "--seeds", "1", "--jobs", "2", "--set", "run.stop_after_steps=1")  # pretrains stop at 1
    assert stopped.returncode == 1 and "stopped before its last step" in stopped.stderr
    first = out / "pretrain" / "l-dae-s0" / "checkpoint.safetensors"
    assert load_checkpoint(first).extra["step"] == 1
    one = run_main(*toy, "--seeds", "1", "--jobs", "2")
    assert one.returncode == 0, one.stderr
    assert "pretrain l-DAE, seed 0 (continued from step 1)" in one.stdout
    assert load_checkpoint(first).extra["finished"] and load_checkpoint(first).extra["step"] == 3
    assert "One seed: no standard error" in (out / "results.md").read_text()

    two = run_main(
        *toy, "--seeds", "2", "--jobs", "2"
    )  # a seed added: the finished runs are checked and kept, seed 1 runs
    assert two.returncode == 0, two.stderr
    assert "pretrain l-DAE, seed 0 (finished: checked to be this study's run)" in two.stdout
    assert "pretrain l-DAE, seed 1 (new)" in two.stdout and "at the speed this study measured" in two.stdout
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["l-DAE", "pixel DAE", "random init (same network)"]
    assert results["seeds"] == [0, 1] and results["budget"]["name"] == "toy" and results["reference"] == "l-DAE"
    assert results["command"].startswith("ldae study ") and "--out" not in results["command"]  # where is no setting
    assert [v["name"] for v in results["variants"]] == ["l-DAE", "pixel DAE"]
    assert results["dataset"][0]["train_sha256"] == read_metadata(first)["extra"]["data_identity"]
    own = {}
    for row in results["rows"]:
        own[row["name"]] = {}
        for run in row["runs"]:
            assert not run["probe"].startswith("/") and (out / run["probe"] / "results.json").is_file()
            own[row["name"]][run["seed"]] = json.loads((out / run["probe"] / "results.json").read_text())["best_top1"]
        assert row["linear"]["mean"] == round(sum(own[row["name"]].values()) / 2, 2)
    diffs = [own["pixel DAE"][s] - own["l-DAE"][s] for s in (0, 1)]
    pixel = results["rows"][1]["linear"]["paired"]
    assert pixel["mean"] == round(sum(diffs) / 2, 2) and pixel["se"] == round(abs(diffs[0] - diffs[1]) / 2, 2)
    assert results["rows"][0]["linear"].get("paired") is None  # the reference
    # the page says what the runs ran, from their checkpoints: here 3-step runs on 4x4 patches (D = 48)
    page = (out / "results.md").read_text()
    assert "32×32 images, 4×4 patches, D = 48, 64 tokens" in page and "3 steps" in page
    assert f"Data: `imagefolder` (`{Path(toy[-1]).name}`, 16 training images" in page  # no path of this machine
    assert "| pixel DAE | l-DAE |" in page and "64.5 (T3.5)" in page and "12.71 at 2 seeds" in page
    eigen = load_checkpoint(out / "pretrain" / "l-dae-s0" / "pca.safetensors").tensors["pca.eigenvalues"].double()
    assert results["patch_space"][0]["share_pct"]["8"] == round(100 * float(eigen[:8].sum() / eigen.sum()), 3)
    noise = results["rows"][0]["settings"]["noise_scale"]
    assert noise == pytest.approx(math.sqrt(float(eigen[:8].mean())), abs=1e-3)
    assert results["rows"][1]["settings"]["noise_scale"] == 1.0  # the pixel DAE: sigma in pixels
    # every setting of the probe's typed config (fast worded as the mode, batch_size as batch), and its data
    probe_keys = {f.name for f in dataclasses.fields(LinearProbeConfig)} - {"fast", "batch_size"}
    assert set(results["rows"][0]["probe"]) == probe_keys | {"mode", "batch", "limit", "eval_split"}
    assert (out / "results.png").stat().st_size > 1000

    before = (out / "results.json").read_text()
    changed = run_main(
        *toy, "--seeds", "2", "--jobs", "2", "--set", "optim.epochs=3"
    )  # other settings, same run directories
    assert changed.returncode == 1 and "a study never replaces a run" in changed.stderr
    assert (out / "results.json").read_text() == before


def test_the_estimate_counts_the_steps_the_settings_give_and_learns_from_measured_runs(toy, tmp_path):
    study, budget = load("study", toy[1], StudyConfig), load("budget", toy[3], BudgetConfig)
    plan = runner.make_plan(
        study, budget, 2, tmp_path / "out", {"data.source": "imagefolder", "data.path": toy[-1], "optim.epochs": 30}
    )
    assert {r.steps for r in plan.pretrains.values()} == {60}  # 30 epochs of 16 images at batch 8: the override counts
    timings = runner.Timings(plan.out)
    # 4 pretrains x 60 steps x 8 images at the budget's 100 img/s (19 s) and 6 probes at its 0.1 min (36 s)
    assert runner.estimate(plan, timings).startswith("4 pretrain run(s) and 6 probe(s) to go of 4 and 6; about 1 min")
    timings.add(plan, plan.rows[0].pretrains[0], 120.0, 60)  # a run of this model measured at 2 s a step
    assert "about 9 min (pretrains at the speed this study measured" in runner.estimate(plan, timings)


def test_a_budget_that_upsamples_is_refused(toy, run_main, tmp_path):
    res = run_main(*toy, "--seeds", "1", "--set", "data.image_size=64")
    assert res.returncode == 1
    assert "data.image_size 64 is above the native 32x32" in res.stderr and "never upsamples" in res.stderr
    assert not (tmp_path / "out").exists()


def test_a_study_checks_every_section_of_its_runs_config_as_ldae_pretrain_does(toy, run_main, tmp_path):
    res = run_main(*toy, "--seeds", "1", "--set", "online_probe.evry=5")  # a section a study once did not read
    assert res.returncode == 1 and "unknown config key 'online_probe.evry'; did you mean" in res.stderr
    assert not (tmp_path / "out").exists()


def test_a_probe_setting_the_page_has_no_words_for_is_a_column_where_rows_differ():
    probes = [{"t": 10, "momentum": 0.9}, {"t": 10, "momentum": 0.8}]
    common, varying = pages.common_and_varying(probes, pages.PROBE_TEXT)
    assert "t = 10" in common and varying == ["momentum"]


def test_paired_differences_standard_errors_and_verdicts():
    import scipy.stats

    for df in (1, 2, 3, 5, 10, 40):
        assert t_quantile(0.975, df) == pytest.approx(scipy.stats.t.ppf(0.975, df), rel=1e-6)
    reference = {0: 40.0, 1: 41.0, 2: 42.0}
    ahead = paired({0: 41.0, 1: 42.1, 2: 42.9}, reference)  # diffs 1.0, 1.1, 0.9: se 0.0577, 4.30 x se = 0.25
    assert ahead == {"seeds": 3, "mean": 1.0, "se": 0.06, "t": 4.3, "verdict": "ahead"}
    assert paired({0: 39.0, 1: 40.1, 2: 40.9}, reference)["verdict"] == "behind"
    noisy = paired({0: 43.0, 1: 40.0, 2: 43.0}, reference)  # diffs 3, -1, 1: mean 1 < 4.30 x 1.15
    assert noisy["verdict"] == NO_DIFFERENCE and noisy["se"] == 1.15
    one = paired({0: 50.0}, {0: 40.0})  # one seed: no standard error, nothing shown
    assert one["verdict"] == NO_DIFFERENCE and one["se"] is None and one["mean"] == 10.0
    assert paired({0: 41.0, 1: 42.0, 5: 99.0}, {0: 40.0, 1: 41.0})["seeds"] == 2  # only seeds both rows have


class FakeChild:
    """A child process that runs until it is waited for (it saved and exited `code`) and records SIGTERM."""

    def __init__(self, *args, **kwargs):
        self.terminated, self.pid = False, 0

    def poll(self):
        return None

    def wait(self):
        return 0

    def terminate(self):
        self.terminated = True


@pytest.mark.parametrize("signal, code", [(KeyboardInterrupt(), 130), (Terminated(), 143)])
def test_a_stop_saves_every_running_child_and_ends_the_whole_study(signal, code, toy, monkeypatch, tmp_path):
    children: list[FakeChild] = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: children.append(FakeChild()) or children[-1])
    stops = [signal]
    monkeypatch.setattr(local.time, "sleep", lambda s: stops and (_ for _ in ()).throw(stops.pop()))
    study, budget = load("study", toy[1], StudyConfig), load("budget", toy[3], BudgetConfig)
    extra = {"data.source": "imagefolder", "data.path": toy[-1]}
    plan = runner.make_plan(study, budget, 1, tmp_path / "out", extra)
    with pytest.raises(Interrupted) as stop:
        local.execute(plan, 1, 2, lambda seeds: None)
    assert stop.value.code == code and "run the same command again" in str(stop.value)
    assert len(children) == 2  # both pretrains of seed 0 were running; the probes waited for them
    assert "pretrain l-DAE, seed 0, pretrain pixel DAE, seed 0" in str(stop.value)
    # SIGTERM is passed on to each; Ctrl-C reached them from the terminal already
    assert [c.terminated for c in children] == [isinstance(signal, Terminated)] * 2


def test_every_bundled_study_and_budget_loads_and_no_budget_upsamples_cifar10(run_main):
    studies = {p.stem: load("study", p.stem, StudyConfig) for p in sorted((BUNDLED_CONFIGS / "study").glob("*.yaml"))}
    assert {"pixel-vs-latent", "pixel-dim", "latent-dim", "noise", "depth", "trajectory"} <= set(studies)
    files = (BUNDLED_CONFIGS / "study" / "budget").glob("*.yaml")
    budgets = {p.stem: load("budget", p.stem, BudgetConfig) for p in files}
    assert {"cpu", "cpu-long", "cpu-64", "gpu", "gpu-64", "paper"} <= set(budgets)
    for (
        name,
        budget,
    ) in budgets.items():  # CIFAR-10's at its native 32x32, the -64 ones Tiny-ImageNet's 64x64 at D = 768
        size = (budget.pretrain.get("data.image_size"), budget.pretrain.get("tokenizer.patch"))
        assert name == "paper" or size == ((64, 16) if name.endswith("-64") else (32, 8))
    for name in ("cpu", "cpu-64"):  # the same network and step, a wider patch embedding
        model = {k: v for k, v in budgets[name].pretrain.items() if k.startswith(("model.", "optim.batch"))}
        assert model == {k: v for k, v in budgets["cpu"].pretrain.items() if k.startswith(("model.", "optim.batch"))}
    res = run_main("study", "no-such-study")
    assert res.returncode == 1 and "pixel-dim" in res.stderr


@pytest.mark.slow
def test_every_bundled_study_plans_on_cifar10_at_the_cpu_and_gpu_budgets(tmp_path):
    """Resolving every run of every study refuses nothing: no study or budget upsamples CIFAR-10."""
    for budget in ("cpu", "cpu-long", "gpu"):
        for path in sorted((BUNDLED_CONFIGS / "study").glob("*.yaml")):
            plan = runner.make_plan(
                load("study", path.stem, StudyConfig),
                load("budget", budget, BudgetConfig),
                1,
                tmp_path,
                {"data.source": "cifar10"},
            )
            assert all(f.native == 32 and f.train_images == 50000 for f in plan.facts.values())


@pytest.mark.parametrize("budget", ["cpu-64", "gpu-64"])
def test_the_64_pixel_budgets_plan_d_768_at_64_pixels_and_refuse_smaller_images(budget, tmp_path, pattern_tree):
    small = {"data.source": "imagefolder", "data.path": str(pattern_tree)}  # 32x32 images
    with pytest.raises(LdaeError, match="data.image_size 64 is above the native 32x32.*never upsamples"):
        runner.make_plan(
            load("study", "pixel-vs-latent", StudyConfig), load("budget", budget, BudgetConfig), 1, tmp_path, small
        )
    photos = write_image_tree(tmp_path / "photos", per_class=2, size=(64, 64))
    plan = runner.make_plan(
        load("study", "pixel-dim", StudyConfig),
        load("budget", budget, BudgetConfig),
        1,
        tmp_path,
        {"data.source": "imagefolder", "data.path": str(photos), "optim.batch_size": 2},
    )
    assert [r.name for r in plan.rows] == [
        "pixel DAE 64/16 (D = 768)",
        "l-DAE 64/16 (d = 16)",
        "pixel DAE 32/8 (D = 192)",
        "l-DAE 32/8 (d = 16)",
        "pixel DAE 16/4 (D = 48)",
        "l-DAE 16/4 (d = 16)",
    ]
    assert plan.reference == "pixel DAE 64/16 (D = 768)" and plan.rows[0].variant.paper == 23.6
    assert {(s.data.image_size // s.tokenizer.patch) ** 2 for s in plan.settings.values()} == {16}
    if budget == "gpu-64":  # the training FLOPs an image that gpu_study.sh's plan quotes: 2.11 GFLOP
        from ldae_cli.model.models import model_flops_per_image

        width = plan.settings[next(iter(plan.settings))].model.width
        spec = dict(grid=[4, 4], width=width, mlp_ratio=4.0, in_dim=768, out_dim=768, encoder_depth=6, decoder_depth=6)
        assert round(model_flops_per_image(spec) / 1e9, 2) == 2.11


TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyimagenet-b100.tar.gz"


@pytest.mark.slow
def test_gpu_study_plans_pixel_dim_at_d_768_on_the_tinyimagenet_archive(tmp_path):
    """One command on a GPU machine; DRY_RUN=1 shows its plan anywhere (the GPU budget's speed is its own figure)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_study.sh"
    res = subprocess.run(
        ["bash", str(script), "tinyimagenet"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DRY_RUN": "1", "TINY": str(TINY), "RUNS": str(tmp_path / "runs"), "PYTHON": sys.executable},
    )
    assert res.returncode == 0, res.stderr
    assert "study pixel-dim, budget gpu-64, 1 seed(s)" in res.stdout and "12 runs" in res.stdout
    for row in ("pixel DAE 64/16 (D = 768)", "l-DAE 64/16 (d = 16)", "pixel DAE 16/4 (D = 48)"):
        assert f"pretrain {row}, seed 0: to run" in res.stdout
    assert res.stdout.count("960 steps of 512 images") == 6
    assert "about 6 min (pretrains at budget gpu-64's 12000 img/s" in res.stdout
    assert not (tmp_path / "runs").exists()  # nothing written


def test_the_pixel_dim_sweep_keeps_the_cifar10_pairs_at_the_cpu_budget():
    study, budget = load("study", "pixel-dim", StudyConfig), load("budget", "cpu", BudgetConfig)
    variants, reference = runner.variants_of(study, budget.pretrain)
    assert [(v.name, v.versus, v.set.get("tokenizer.dim")) for v in variants] == [
        ("pixel DAE 32/8 (D = 192)", None, None),
        ("l-DAE 32/8 (d = 16)", "pixel DAE 32/8 (D = 192)", 16),
        ("pixel DAE 16/4 (D = 48)", None, None),
        ("l-DAE 16/4 (d = 16)", "pixel DAE 16/4 (D = 48)", 16),
        ("pixel DAE 8/2 (D = 12)", None, None),
        ("l-DAE 8/2 (d = 12)", "pixel DAE 8/2 (D = 12)", 12),
    ]
    assert reference == "pixel DAE 32/8 (D = 192)"
    with pytest.raises(LdaeError, match="below one pixel"):
        runner.variants_of(StudyConfig(pixel_dim_sweep=PixelDimSweep(pairs=5)), budget.pretrain)
    with pytest.raises(LdaeError, match="leaves to the data; give one, e.g. --set data.image_size=256"):
        runner.variants_of(study, load("budget", "paper", BudgetConfig).pretrain)  # final.yaml: native size


def test_studies_given_one_pretrains_folder_share_the_runs_they_both_ask_for(tmp_path, pattern_tree):
    budget = config_from_dict(BudgetConfig, TOY_BUDGET)
    sweep = StudyConfig(name="sweep", pixel_dim_sweep=PixelDimSweep(pairs=2, dim=8))
    data = {"data.source": "imagefolder", "data.path": str(pattern_tree)}
    shared = tmp_path / "pretrains"
    a = runner.make_plan(sweep, budget, 2, tmp_path / "a", data, shared)
    b = runner.make_plan(config_from_dict(StudyConfig, TOY_STUDY), budget, 2, tmp_path / "b", data, shared)
    rows_a, rows_b = ({row.name: row.pretrains for row in p.rows} for p in (a, b))
    for seed in (0, 1):  # 32/4 is the toy budget's own pair: l-DAE and the pixel DAE are the same runs in both
        assert rows_a["l-DAE 32/4 (d = 8)"][seed].out == rows_b["l-DAE"][seed].out == shared / f"final-s{seed}"
        assert rows_a["pixel DAE 32/4 (D = 48)"][seed].out == rows_b["pixel DAE"][seed].out
    assert rows_a["l-DAE 16/2 (d = 8)"][0].out.name == "final-data-image-size-16-tokenizer-patch-2-s0"
    assert len({r.out for r in [*a.pretrains.values(), *b.pretrains.values()]}) == 8  # 4 runs a seed, 2 shared
    probe = rows_b["l-DAE"][0]
    assert b.rows[0].probes[0].out.parent == tmp_path / "b" / "probe" and probe.out.parent == shared
    assert runner.relative(probe.out, b.out) == "../pretrains/final-s0"


def test_the_depth_sweep_follows_the_models_blocks():
    sweep = DepthSweep(24, {9: 58.5, 12: 64.5, 15: 59.7})
    variants, split = depth_variants(
        sweep, ModelConfig(size="custom", width=64, encoder_depth=4, decoder_depth=4, num_heads=4)
    )
    assert [v.probe_set["probe.depth"] for v in variants] == list(range(1, 9))
    assert split == "after 4 of 8 blocks (the split)"
    assert {v.probe_set["probe.depth"]: v.paper for v in variants if v.paper} == {3: 58.5, 4: 64.5, 5: 59.7}
    variants, split = depth_variants(
        sweep, ModelConfig(size="custom", width=64, encoder_depth=6, decoder_depth=6, num_heads=4)
    )
    assert split == "after 6 of 12 blocks (the split)" and [v.paper for v in variants if v.paper] == [64.5]


def test_a_fixed_latent_scale_puts_the_same_noise_on_the_kept_components_at_every_d():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(48, 48))[0].T
    eigenvalues = torch.linspace(4.0, 0.01, 48)
    mean = torch.zeros(48)
    at_16 = PCATokenizer(mean, basis, eigenvalues, 4, 16).scale[0]
    assert at_16 == pytest.approx(float(eigenvalues[:16].mean().sqrt()))
    for d in (8, 32, 48):
        fixed = PCATokenizer(mean, basis, eigenvalues, 4, d, "fixed", 16)
        assert torch.allclose(fixed.scale, at_16.expand(d))
        again = PCATokenizer.from_export(*fixed.export())  # a pretrain checkpoint keeps the rule
        assert torch.equal(again.scale, fixed.scale)
        assert PCATokenizer(mean, basis, eigenvalues, 4, d).scale[0] != pytest.approx(float(at_16))  # global moves
    with pytest.raises(LdaeError, match="scale_dim"):
        TokenizerConfig(kind="pixel", latent_scale="fixed", scale_dim=16).validate()
    with pytest.raises(LdaeError, match="latent_scale 'fixed'"):
        TokenizerConfig(latent_scale="global", scale_dim=16).validate()


def test_the_patch_space_of_a_pixel_only_study_is_measured_by_a_pca_of_its_own(pattern_tree, tmp_path):
    pixel = {"tokenizer.kind": "pixel", "tokenizer.patch": 4, "tokenizer.dim": None, "tokenizer.latent_scale": "none"}
    ckpt = train_tiny("final.yaml", pattern_tree, tmp_path / "pixel", **pixel)
    [space] = patchspace.tables(tmp_path, [ckpt], {48})
    assert space["D"] == 48 and space["pca"] == "patchspace/imagefolder-32-p4.safetensors"
    assert list(space["share_pct"]) == [8, 16, 32] and 0 < space["share_pct"][8] < space["share_pct"][32] < 100
    assert patchspace.noise_scale(ckpt) == {"noise_scale": 1.0}


def test_a_pages_command_leaves_out_where_the_runs_went():
    from ldae_cli.stages.study import reproduce

    argv = ["study", "pixel-dim", "--pretrains", "/runs/shared", "--out=/runs/a", "--seeds", "3", "--pretrains=x"]
    assert reproduce(argv) == "ldae study pixel-dim --seeds 3"


def test_an_archive_is_surveyed_once_a_process_until_it_changes(tmp_path):
    import tarfile

    from ldae_cli.settings.training import DataConfig
    from ldae_cli.studies.spec import facts_of

    def archive(per_class: int) -> DataConfig:
        tree = write_image_tree(tmp_path / f"tree{per_class}", per_class=per_class, size=(24, 24))
        with tarfile.open(tmp_path / "data.tar", "w") as tar:
            tar.add(tree / "train", arcname="train")
        return DataConfig(source="imagefolder", path=str(tmp_path / "data.tar"))

    assert facts_of(archive(4)).train_images == 12
    os.utime(tmp_path / "data.tar", ns=(1, 1))  # another modification time: surveyed again, then kept
    again = facts_of(DataConfig(source="imagefolder", path=str(tmp_path / "data.tar")))
    assert facts_of(DataConfig(source="imagefolder", path=str(tmp_path / "data.tar"))) is again  # unchanged: kept
    assert facts_of(archive(5)).train_images == 15  # more images: surveyed again

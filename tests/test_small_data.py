"""Small data is said, not suffered: the online probe's floor and measured share, the probe's protocol picked by the
data's size and its head chosen on a holdout, and log axes that print 1e-19."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import TOKENS, one_line, sets, snapshot, tiny_overrides, unchanged, write_pattern_tree

ON_TINY = {"online_probe.per_class": 1, "online_probe.max_share": 1}  # the floor lowered to what tiny data holds


@pytest.fixture(scope="module")
def twelve(tmp_path_factory) -> Path:
    """2 classes x 12 training images (and 4 evaluation images each): enough for the online probe's floor of 10."""
    root = tmp_path_factory.mktemp("twelve")
    write_pattern_tree(root, per_class=12, splits=("train",))
    return write_pattern_tree(root, per_class=4, splits=("val",), seed=1)


def pretrain(data: Path, out: Path, **extra) -> list[str]:
    return ["pretrain", "--config", "final.yaml", *sets(tiny_overrides(data, out, **{**TOKENS, **extra}))]


def online_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "online_knn_top1" in r]


# --- the online probe: on only at its floor, said either way -----------------------------------------------------


@pytest.mark.parametrize(
    "data,extra,said",
    [
        (
            "world",
            {},
            "online probe: off: 16 training images over 2 classes give 8 per class, below its floor of 10 "
            "(online_probe.per_class)",
        ),
        (
            "twelve",
            {},
            "online probe: off: its 4% share of the run (online_probe.max_share) pays for 0 fit images per "
            "class, below its floor of 10",
        ),
        (
            "twelve",
            {"online_probe.max_share": 1},
            "online probe: on: fit up to 12 train images per class, test 8 eval images",
        ),
    ],
    ids=["too-few-images-per-class", "share-pays-for-too-few", "floor-met"],
)
def test_the_online_probe_runs_only_at_its_floor_and_the_plan_and_the_start_say_why(
    data, extra, said, world, twelve, run_main, tmp_path
):
    """generic: a probe on 1 image per class reads as a number; below the floor it is off, with the reason, in
    --dry-run and in the start (and no online record is written), and on when the floor is met."""
    images = world.images if data == "world" else twelve
    before = snapshot(images)
    plan = run_main(*pretrain(images, tmp_path / "dry", **extra), "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert said in " ".join(plan.stdout.split())
    assert not (tmp_path / "dry").exists()
    out = tmp_path / "run"
    res = run_main(*pretrain(images, out, **extra))
    assert res.returncode == 0, res.stderr
    if ": off: " in said:
        assert said in " ".join(res.stdout.split()) and online_records(out) == []
    else:
        assert "online probe top-1 % (fit 24 train images, 12/class; test 8 eval images)" in res.stdout
        assert [r["step"] for r in online_records(out)] == [1, 2, 3]  # 3 steps: a quarter apart is every step
    unchanged(before)


@pytest.mark.parametrize(
    "images,classes,tested,share,fragment",
    [
        (16, 2, 16, 0.04, "16 training images over 2 classes give 8 per class, below its floor of 10"),
        (50_000, 10, 1000, 0.04, None),
        (500, 10, 100, 0.001, "its 0% share of the run (online_probe.max_share) pays for 0 fit images per class"),
        (40, 1, 8, 0.04, "no usable labelled train and evaluation splits (it has no labelled images)"),
        (40, 2, 0, 0.04, "no usable labelled train and evaluation splits (it has no labelled images)"),
    ],
)
def test_the_floor_is_checked_against_the_data_and_the_share(images, classes, tested, share, fragment):
    """generic: the floor's two reasons (too few images per class, a share that pays for fewer) and no labels."""
    from ldae_cli.config import load_config
    from ldae_cli.errors import LdaeError
    from ldae_cli.runs.distributed import DistContext
    from ldae_cli.train.engine_pretrain import PretrainConfig
    from ldae_cli.train.online_probe import online_fit_size

    cfg = load_config(
        PretrainConfig,
        "final.yaml",
        ["optim.batch_size=8", "optim.epochs=10", "optim.warmup_epochs=1", f"online_probe.max_share={share}"],
    )
    if fragment is None:
        assert online_fit_size(cfg, DistContext(), images, classes, tested) >= cfg.online_probe.per_class
    else:
        with pytest.raises(LdaeError, match=re.escape(fragment)):
            online_fit_size(cfg, DistContext(), images, classes, tested)


def test_a_measured_share_over_max_share_makes_the_probe_run_less_often(twelve, run_main, tmp_path):
    """silent-wrong: the cost model is a model; the probe measures its own share after each probe and, over
    max_share, probes less often, saying so. At 1 % of a 36-step run, the first probe alone is over."""
    out = tmp_path / "run"
    res = run_main(
        *pretrain(
            twelve,
            out,
            **{
                "online_probe.per_class": 1,
                "online_probe.max_share": 0.01,
                "online_probe.test_images": 2,
                "optim.epochs": 12,
            },
        )
    )
    assert res.returncode == 0, res.stderr
    said = re.search(
        r"online probe: (\d+)% of the run's time so far, over online_probe.max_share 1%: probing "
        r"every ([\d,]+) steps instead of 9",
        res.stdout,
    )
    assert said and int(said.group(1)) > 1 and int(said.group(2).replace(",", "")) > 9, res.stdout
    steps = [r["step"] for r in online_records(out)]
    assert steps[0] == 9 and steps[-1] == 36 and len(steps) < 4  # fewer than the 4 of the planned cadence


# --- the probe's protocol by the data's size ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,said,resolved",
    [
        (
            (),
            "probe: 16 training images, fewer than the full protocol's batch 16,384: using the small-data protocol "
            "(probe/small-fast)",
            {"fast": True, "batch_size": 1024, "blrs": [0.1, 1.0, 10.0, 100.0], "select": "holdout"},
        ),
        (
            ("probe.batch_size=8",),
            "probe: 16 training images: the full protocol, batch 8",
            {"fast": False, "batch_size": 8, "blrs": [1e-4, 1e-3, 1e-2, 1e-1], "select": "holdout"},
        ),
    ],
    ids=["small-data", "a-batch-fits"],
)
def test_probe_without_config_picks_its_protocol_by_the_datas_size_and_says_which(
    extra, said, resolved, world, run_main, tmp_path
):
    """generic: `ldae probe` without --config on 16 images wanted a batch of 16,384; it now takes the small-data
    protocol, and the full one only when a batch fits, saying which; --set still has the last word."""
    import yaml

    plan = run_main("probe", "--ckpt", world.ckpt, "--out", tmp_path / "p", *sets(list(extra)), "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert said in " ".join(plan.stdout.split())
    res = run_main("probe", "--ckpt", world.ckpt, "--out", tmp_path / "p", *sets(list(extra)), "--print-config")
    assert res.returncode == 0, res.stderr
    printed = yaml.safe_load(res.stdout[re.search(r"^data:$", res.stdout, re.M).start() :])["probe"]
    assert {k: printed[k] for k in resolved} == resolved
    assert not (tmp_path / "p").exists()


def test_a_config_names_the_protocol_and_nothing_is_picked(world, run_main, tmp_path):
    res = run_main(
        "probe",
        "--ckpt",
        world.ckpt,
        "--config",
        "probe/ldae.yaml",
        "--out",
        tmp_path / "p",
        *sets(["probe.batch_size=8"]),
        "--dry-run",
    )
    assert res.returncode == 0, res.stderr
    assert "protocol" not in res.stdout and not (tmp_path / "p").exists()


# --- probe.select: holdout -----------------------------------------------------------------------------------------


def test_holdout_selection_reports_both_numbers_and_is_deterministic_by_seed(world, run_main, tmp_path):
    """silent-wrong: the best head on the eval split is an optimistic number; the default chooses the head on a
    seeded tenth of the train split and reports its eval top-1 beside the best-on-eval one, named, every time the
    same for a seed."""
    runs = {}
    for name in ("a", "b"):
        res = run_main(
            "probe", "--ckpt", world.ckpt, "--out", tmp_path / name, *sets(["run.progress=false", "data.num_workers=0"])
        )
        assert res.returncode == 0, res.stderr
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
        r = runs[name]
        assert r["select"] == "holdout" and r["holdout_images"] == 2  # a tenth of each class of 8, at least one
        assert r["selected_top1"] == r["heads"][r["selected_head"]]["top1"]
        assert r["best_top1"] == max(h["top1"] for h in r["heads"]) and r["selected_top1"] <= r["best_top1"]
        best_held = max(h["holdout_top1"] for h in r["heads"])
        assert r["heads"][r["selected_head"]]["holdout_top1"] == best_held
        line = " ".join(res.stdout.split())
        assert (
            f"top-1 {r['selected_top1']:.2f} % on val: head {r['selected_head']} (blr "
            f"{r['heads'][r['selected_head']]['blr']:g}), chosen on 2 held-out train images (probe.select "
            f"holdout); best on val itself {r['best_top1']:.2f} % (head {r['best_head']}, optimistic)"
        ) in line
    for r in runs.values():
        r.pop("seconds")
    assert runs["a"] == runs["b"]


def test_holdout_split_is_seeded_stratified_and_center_cropped(world):
    from ldae_cli.config import load_config
    from ldae_cli.data.discovery import settle_data
    from ldae_cli.data.pipeline import build_dataset
    from ldae_cli.train.engine_probe import ProbeConfig, holdout_split

    cfg = load_config(
        ProbeConfig,
        None,
        [f"data.path={world.images}", "data.image_size=32", "data.cache=never", "data.crop=random-resized"],
    )
    settle_data(cfg.data)
    ds = build_dataset(cfg.data, "train", augment=True, seed=0)
    train, held = holdout_split(ds, 0)
    assert held.labels_tensor().bincount().tolist() == [1, 1] and len(train) == 14
    assert sorted(train.subset + held.subset) == list(range(16)) and held.crop == "center" and not held.hflip
    assert train.crop == ds.crop == "random-resized"  # the heads' images keep their augmentation
    assert holdout_split(ds, 0)[1].subset == held.subset != holdout_split(ds, 2)[1].subset


def test_select_eval_reports_the_best_on_eval_and_says_it_is_optimistic(world, run_main, tmp_path):
    res = run_main(
        "probe",
        "--ckpt",
        world.ckpt,
        "--out",
        tmp_path / "p",
        *sets(["probe.select=eval", "run.progress=false", "data.num_workers=0"]),
    )
    assert res.returncode == 0, res.stderr
    r = json.loads((tmp_path / "p" / "results.json").read_text())
    assert r["select"] == "eval" and r["selected_head"] == r["best_head"] and r["holdout_images"] == 0
    assert "chosen on the val split itself (probe.select eval: optimistic)" in " ".join(res.stdout.split())


def test_a_bad_select_is_one_line_and_writes_nothing(world, run_main, tmp_path):
    before = snapshot(world.root)
    line = one_line(
        run_main("probe", "--ckpt", world.ckpt, "--out", tmp_path / "p", *sets(["probe.select=test"])),
        1,
        "probe.select",
    )
    assert "holdout" in line and "eval" in line
    assert not (tmp_path / "p").exists()
    unchanged(before)


# --- the studies record which selection they used --------------------------------------------------------------------


def test_committed_studies_render_as_eval_and_a_holdout_study_says_so():
    """generic: the committed pages render byte for byte, those from before probe.select as chosen on the eval
    split; a study whose probes chose on a holdout says so."""
    from ldae_cli.studies import pages

    docs = sorted((Path(__file__).resolve().parent.parent / "docs" / "studies").glob("**/results.json"))
    assert len(docs) >= 9
    for path in docs:
        results = json.loads(path.read_text())
        page = pages.markdown(results)
        holdout = results["rows"][0]["probe"].get("select") == "holdout"
        assert page == (path.parent / "results.md").read_text()
        assert ("held out from the heads" if holdout else "is chosen on the eval split") in page
    results = json.loads(docs[0].read_text())  # a page from before probe.select
    for row in results["rows"]:
        row["probe"]["select"] = "holdout"
    page = pages.markdown(results)
    assert "chosen on a seeded 10 % of the training split held out from the heads" in page
    assert "is chosen on the eval split" not in page

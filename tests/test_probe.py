"""Linear probing: LARS as MAE uses it, the head, multi-lr equivalence, every target type, baselines."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import train_tiny, train_tiny_conv_vae

from ldae_cli.errors import LdaeError
from ldae_cli.runs.checkpoint import load_checkpoint
from ldae_cli.runs.logs import read_metrics
from ldae_cli.settings.optim import lr_at, set_lr
from ldae_cli.stages import probe as stage
from ldae_cli.train.heads import ProbeHeads, evaluate, head_step, knn_accuracy, lars_for_heads, with_lowest


def test_lars_matches_a_hand_computation():
    """Weights: trust ratio 0.001*|w|/|g|, momentum 0.9; biases: plain momentum SGD, no adaptation."""
    heads = ProbeHeads(3, 2, 1)
    w0 = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    b0 = torch.tensor([0.5, -0.5])
    with torch.no_grad():
        heads.heads[0].weight.copy_(w0)
        heads.heads[0].bias.copy_(b0)
    opt = lars_for_heads(heads, [2.0], momentum=0.9)
    for g in opt.param_groups:
        g["lr"] = g["lr_scale"]
    grads = [
        (torch.tensor([[0.1, 0.2, -0.3], [0.4, 0.0, 0.1]]), torch.tensor([1.0, -2.0])),
        (torch.tensor([[-0.2, 0.1, 0.0], [0.3, -0.1, 0.2]]), torch.tensor([0.5, 0.5])),
    ]
    w, b, buf_w, buf_b = w0.clone(), b0.clone(), None, None
    for gw, gb in grads:
        heads.heads[0].weight.grad, heads.heads[0].bias.grad = gw.clone(), gb.clone()
        opt.step()
        dw = gw * (0.001 * w.norm() / gw.norm())  # LARS adaptation, weights only
        buf_w = dw if buf_w is None else 0.9 * buf_w + dw
        buf_b = gb if buf_b is None else 0.9 * buf_b + gb
        w, b = w - 2.0 * buf_w, b - 2.0 * buf_b
        torch.testing.assert_close(heads.heads[0].weight.detach(), w, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(heads.heads[0].bias.detach(), b, rtol=1e-6, atol=1e-7)


def _blobs(n=200, dim=8, seed=0):
    """Two Gaussian blobs 8 standard deviations apart: separable with overwhelming probability."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    centres = torch.zeros(2, dim)
    centres[1, 0] = 8.0
    return centres[labels] + torch.randn(n, dim, generator=g), labels


def _train(feats, labels, lrs, steps=200, batch=50, seed=0):
    torch.manual_seed(seed)
    heads = ProbeHeads(feats.shape[1], 2, len(lrs))
    opt = lars_for_heads(heads, lrs)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randperm(len(feats), generator=g)[:batch]
        set_lr(opt, lr_at(step, steps, 10, 1.0))  # warm-up + cosine multiplying each head's own lr
        head_step(heads, opt, feats[idx], labels[idx])
    return heads


def test_bn_linear_head_separates_gaussian_blobs():
    feats, labels = _blobs()
    test_feats, test_labels = _blobs(seed=1)
    # LARS moves a weight matrix by 0.001 * lr of its own norm per step: a large lr trains quickly
    heads = _train(feats, labels, [50.0])
    assert float(evaluate(heads, feats, labels)[1][0]) == 100.0
    assert float(evaluate(heads, test_feats, test_labels)[1][0]) == 100.0
    assert heads.bn.weight is None and heads.bn.bias is None  # BatchNorm without affine


def test_multi_lr_heads_equal_separate_runs():
    feats, labels = _blobs()
    lrs = [0.01, 0.3, 3.0]
    # every run starts from the same initial weights and sees the same feature batches
    torch.manual_seed(0)
    init = ProbeHeads(8, 2, 1).heads[0].state_dict()
    results = []
    for lr_set in ([lrs], [[lr] for lr in lrs]):
        for group in lr_set:
            torch.manual_seed(0)
            heads = ProbeHeads(8, 2, len(group))
            for h in heads.heads:
                h.load_state_dict(init)
            opt = lars_for_heads(heads, group)
            g = torch.Generator().manual_seed(0)
            for step in range(100):
                idx = torch.randperm(len(feats), generator=g)[:50]
                set_lr(opt, lr_at(step, 100, 10, 1.0))
                head_step(heads, opt, feats[idx], labels[idx])
            results += [h.weight.detach().clone() for h in heads.heads]
    joint_w, separate_w = results[:3], results[3:]
    for a, b in zip(joint_w, separate_w):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(joint_w[0], joint_w[2])  # the lrs really differ


def test_knn_on_separable_features():
    """Cosine k-NN: blobs along different axes are apart in angle."""
    feats, labels = _blobs()
    test_feats, test_labels = _blobs(seed=1)
    shift = torch.zeros(8)
    shift[1] = 8.0
    feats[labels == 0] += shift
    test_feats[test_labels == 0] += shift
    assert knn_accuracy(feats, labels, test_feats, test_labels, k=20) == 100.0
    assert knn_accuracy(feats, labels, test_feats, 1 - test_labels, k=20) == 0.0


def _probe(ckpt, out, *extra, random_init=False):
    sets = [
        "probe.fast=true",
        "probe.epochs=5",
        "probe.warmup_epochs=1",
        "probe.batch_size=8",
        "probe.blrs=[0.01,1.0]",
        "run.progress=false",
        "data.num_workers=0",
        f"run.out_dir={out}",
        *extra,
    ]
    return stage.main(None, sets, {}, ckpt=str(ckpt), random_init=random_init)


@pytest.mark.parametrize(
    "target,extra",
    [
        ("x0", {}),
        (
            "z0",
            {
                "diffusion.target": "z0",
                "diffusion.loss_weight": "gamma2",
                "diffusion.output_space": "latent",
                "diffusion.input_space": "latent",
            },
        ),
        (
            "eps",
            {
                "diffusion.target": "eps",
                "diffusion.output_space": "latent",
                "diffusion.input_space": "latent",
                "diffusion.schedule": "linear-gamma2",
                "diffusion.loss_weight": "1",
            },
        ),
    ],
)
def test_probe_works_from_every_target_type(target, extra, pattern_tree, tmp_path):
    ckpt = train_tiny(
        "final.yaml", pattern_tree, tmp_path / target, **{"tokenizer.patch": 4, "tokenizer.dim": 8}, **extra
    )
    results = _probe(ckpt, tmp_path / f"probe-{target}")
    assert len(results["heads"]) == 2 and 0 <= results["best_top1"] <= 100
    assert results["knn_top1"] is not None
    saved = load_checkpoint(tmp_path / f"probe-{target}" / "checkpoint.safetensors", "probe")
    assert saved.extra["finished"] and saved.provenance["parents"][0]["sha256"] == load_checkpoint(ckpt).sha256
    assert json.loads((tmp_path / f"probe-{target}" / "results.json").read_text())["best_head"] in (0, 1)
    last = read_metrics(tmp_path / f"probe-{target}" / "metrics.jsonl")[-1]  # what TensorBoard plots
    assert last["probe_best_top1"] == results["best_top1"] and last["probe_knn_top1"] == results["knn_top1"]


def test_baselines_random_init_and_pixels(pattern_tree, tmp_path):
    ckpt = train_tiny("final.yaml", pattern_tree, tmp_path / "pre", **{"tokenizer.patch": 4, "tokenizer.dim": 8})
    rand = _probe(ckpt, tmp_path / "rand", random_init=True)
    assert rand["random_init"] and "random-init" in rand["encoder"]
    pixels = _probe(ckpt, tmp_path / "pix", "probe.features=pixels")
    assert pixels["encoder"] == "raw pixels"

    def head(run):
        return load_checkpoint(tmp_path / run / "checkpoint.safetensors").tensors["heads.heads.0.weight"]

    assert head("pix").shape == (2, 3 * 32 * 32) and head("rand").shape == (2, 32)


def test_full_protocol_stops_and_resumes(pattern_tree, tmp_path):
    ckpt = train_tiny("final.yaml", pattern_tree, tmp_path / "pre", **{"tokenizer.patch": 4, "tokenizer.dim": 8})
    sets = [
        "probe.epochs=2",
        "probe.warmup_epochs=1",
        "probe.batch_size=8",
        "probe.blrs=[0.1]",
        "run.progress=false",
        "data.num_workers=0",
        "probe.extract_batch=4",
    ]
    first = stage.main(
        None, sets + [f"run.out_dir={tmp_path / 'a'}", "run.stop_after_steps=1"], {}, ckpt=str(ckpt), random_init=False
    )
    assert first == {}
    assert load_checkpoint(tmp_path / "a" / "checkpoint.safetensors").extra["step"] == 1
    resumed = stage.main(None, [], {}, str(tmp_path / "a"))
    whole = stage.main(None, sets + [f"run.out_dir={tmp_path / 'b'}"], {}, ckpt=str(ckpt), random_init=False)
    a = load_checkpoint(tmp_path / "a" / "checkpoint.safetensors").section("heads")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.safetensors").section("heads")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["heads"] == whole["heads"]


def test_probe_errors_are_clear(pattern_tree, tmp_path):
    with pytest.raises(LdaeError, match="needs --ckpt"):
        stage.main(None, ["data.source=imagefolder", f"data.path={pattern_tree}"], {}, ckpt=None, random_init=False)
    pca = tmp_path / "pre" / "pca.safetensors"
    train_tiny("final.yaml", pattern_tree, tmp_path / "pre", **{"tokenizer.patch": 4, "tokenizer.dim": 8})
    with pytest.raises(LdaeError, match="is a 'pca' checkpoint; probe reads a pretrain checkpoint"):
        stage.main(None, [], {}, ckpt=str(pca), random_init=False)
    with pytest.raises(LdaeError, match="probe.blrs"):
        stage.main(
            None, ["probe.blrs=[]"], {}, ckpt=str(tmp_path / "pre" / "checkpoint.safetensors"), random_init=False
        )


def test_probe_reads_a_conv_tokenizer_model_through_the_adaln_network(pattern_tree, tmp_path):
    """Table 1 rows put a conv VAE in front of the network: no plain-ViT fold exists, the probe still works."""
    tok = train_tiny_conv_vae(pattern_tree, tmp_path / "tok")
    ckpt = train_tiny(
        "trajectory/T1.5.yaml", pattern_tree, tmp_path / "pre", **{"tokenizer.path": tok, "tokenizer.patch": 4}
    )
    results = _probe(ckpt, tmp_path / "probe")
    assert "conv-vae latents" in results["encoder"] and len(results["heads"]) == 2
    rand = _probe(ckpt, tmp_path / "rand", random_init=True)
    assert rand["random_init"] and "conv-vae latents" in rand["encoder"]


def test_two_ranks_give_the_one_process_result(pattern_tree, tmp_path):
    """torchrun with 2 gloo ranks: each extracts its shard of the features, every rank trains the same heads."""
    import os
    import subprocess
    import sys

    ckpt = train_tiny("final.yaml", pattern_tree, tmp_path / "pre", **{"tokenizer.patch": 4, "tokenizer.dim": 8})
    one = _probe(ckpt, tmp_path / "one")
    sets = [
        "probe.fast=true",
        "probe.epochs=5",
        "probe.warmup_epochs=1",
        "probe.batch_size=8",
        "probe.blrs=[0.01,1.0]",
        "run.progress=false",
        "data.num_workers=0",
        f"run.out_dir={tmp_path / 'two'}",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29542",
        "-m",
        "ldae_cli",
        "probe",
        "--ckpt",
        str(ckpt),
        *sum((["--set", s] for s in sets), []),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    # the same heads and accuracies; the last-step loss may differ in float rounding (features arrive in rank order)
    for h2, h1 in zip(two["heads"], one["heads"]):
        assert h2.pop("train_loss") == pytest.approx(h1.pop("train_loss"), rel=1e-5)
    assert two["heads"] == one["heads"] and two["knn_top1"] == one["knn_top1"]


def _fast_heads(blrs, tmp_path, monkeypatch):
    """Fast mode on the Trainer, with two Gaussian blobs as the extracted features (train and eval)."""
    from types import SimpleNamespace

    from ldae_cli.model.pretrained import FeatureEncoder
    from ldae_cli.runs.distributed import DistContext
    from ldae_cli.train import engine_probe
    from ldae_cli.train.session import Session

    feats, labels = _blobs()
    monkeypatch.setattr(engine_probe, "extract", lambda encoder, dataset, ctx, label, **reading: (feats, labels))
    cfg = stage.ProbeConfig()
    cfg.probe.blrs, cfg.probe.batch_size, cfg.probe.epochs, cfg.probe.warmup_epochs = blrs, 50, 25, 1
    cfg.probe.fast, cfg.probe.select, cfg.run.progress, cfg.run.log_every = True, "eval", False, 4
    dataset = SimpleNamespace(num_classes=2, classes=["a", "b"])
    session = Session("probe", "probe", cfg, DistContext(), tmp_path, None)
    engine_probe.train(session, FeatureEncoder(None, 8, "blobs", []), dataset, dataset, {}, lambda results: None)
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_a_diverging_head_is_logged_alone_and_the_others_go_on(tmp_path, monkeypatch):
    """blr 1e30 sends its head to inf within two LARS steps; `loss` is the best head's and stays finite."""
    records = _fast_heads([200.0, 1e30], tmp_path, monkeypatch)
    assert "probe_best_top1" in records[-1]  # after the last loss line: the evaluation
    last = [r for r in records if "loss" in r][-1]
    assert set(last) >= {"loss", "loss_blr200", "loss_blr1e+30"}
    assert last["loss_blr1e+30"] is None  # non-finite values are written as null
    assert last["loss"] == pytest.approx(last["loss_blr200"]) and last["loss"] < 0.3  # ln 2 = 0.69 untrained


def test_every_head_diverging_stops_the_probe(tmp_path, monkeypatch):
    with pytest.raises(
        LdaeError,
        match=r"loss became (inf|nan) between steps 0 and 4;.*Every probe head diverged: "
        r"lower probe.blrs \(now \[1e\+30, 1e\+31\]\)",
    ):
        _fast_heads([1e30, 1e31], tmp_path, monkeypatch)


def test_results_table_marks_the_best_head_and_diverged_heads():
    from rich.console import Console

    rows = [
        {"blr": 0.1, "lr": 0.4, "train_loss": 0.52, "top1": 61.0, "top5": 95.7},
        {"blr": 1e30, "lr": 4e30, "train_loss": None, "top1": 10.0, "top5": 50.0},
    ]
    console = Console(width=120, record=True)
    console.print(stage.results_table(rows, 53.05, "probe"))
    text = console.export_text()
    assert "0 *" in text and "0.52" in text and "diverged" in text and "53.05" in text


def test_lowest_head_loss_is_finite_while_any_head_is():
    inf, nan = float("inf"), float("nan")
    assert with_lowest(torch.tensor([0.7, nan, inf]))[0] == 0.7
    for diverged in ([inf, inf], [nan, inf], [nan, nan]):
        assert not with_lowest(torch.tensor(diverged))[0].isfinite()
    assert with_lowest(torch.tensor([0.7, 0.5]))[1:].tolist() == pytest.approx([0.7, 0.5])


def test_the_online_probe_agrees_with_the_offline_one_and_has_a_panel_of_its_own(pattern_tree, tmp_path):
    """The k-NN and linear top-1 logged at the last step (live weights) are those of the saved checkpoint, read back
    and folded as `ldae probe` reads it, on the same fit and test subsets; TensorBoard and `ldae report` show
    them in a panel of their own, titled with what they fit and test on."""
    from ldae_cli.config import config_from_dict
    from ldae_cli.model.pretrained import load_pretrained
    from ldae_cli.runs.distributed import DistContext
    from ldae_cli.stages import pretrain, report
    from ldae_cli.train.online_probe import OnlineProbe, online_subsets

    ckpt = train_tiny(
        "final.yaml",
        pattern_tree,
        tmp_path / "pre",
        **{
            "tokenizer.patch": 4,
            "tokenizer.dim": 8,
            "optim.epochs": 2,
            "optim.ema": 0.9,
            "online_probe.per_class": 1,
            "online_probe.max_share": 1,
        },
    )
    logged = [json.loads(x) for x in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    online = [r for r in logged if "online_knn_top1" in r]
    assert [r["step"] for r in online] == [1, 2, 3, 4]  # a quarter of 4 steps apart, and the last one
    cfg = config_from_dict(pretrain.PretrainConfig, load_checkpoint(ckpt).config)
    fit, test = online_subsets(cfg, DistContext())
    # a floor of 1 per class and the whole run to spend: every training image, 8 per class, said in the title
    assert len(fit) == 16 and fit.labels_tensor().bincount().tolist() == [8, 8] and len(test) == 16
    assert online[-1]["online_fit_images"] == 16 and online[-1]["online_fit_per_class"] == 8
    offline = OnlineProbe(cfg.online_probe, None, fit, test, None, 0, 0)
    knn, linear = offline.measure(load_pretrained(ckpt), DistContext())  # the EMA weights, as the probe reads them
    assert online[-1]["online_knn_top1"] == round(knn, 2) and online[-1]["online_linear_top1"] == round(linear, 2)
    title = offline.title()
    assert title == "online probe top-1 % (fit 16 train images, 8/class; test 16 eval images)"
    events = b"".join(p.read_bytes() for p in (tmp_path / "pre" / "tensorboard").glob("events.out.tfevents.*"))
    assert title.encode() in events  # the Custom Scalars chart of the two accuracies
    assert "fit 16 train images, 8/class; test 16 eval images" in report.online_title(tmp_path / "pre", logged)
    assert report.main([str(tmp_path / "pre")])[0].stat().st_size > 1000


def test_the_online_fit_subset_is_class_balanced_and_sized_to_its_cost_share():
    from ldae_cli.train.online_probe import OnlineProbeConfig, balanced_subset, online_fit_per_class

    s = OnlineProbeConfig()
    # CIFAR-10 at the cpu budget: 1,560 steps of 128 images, 4 + 4 blocks, 4 probes: 10,980 fit images affordable
    assert online_fit_per_class(s, 1560 * 128, 3 * (4 + 4), 4, 1560, 10) == 1098
    probed = 4 * (10 * 1098 + s.test_images)  # images the probes read: an encoder forward each
    assert probed * 4 / (3 * 8) <= s.max_share * 1560 * 128  # the share of the run's compute, as forwards of all blocks
    assert (
        online_fit_per_class(s, 400 * 1_281_167, 3 * (12 + 12), 12, 400 * 625, 1000) == 20
    )  # ImageNet: the 20k cap wins
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 10)
    picked = balanced_subset(labels, 4, seed=0)
    assert labels[picked].bincount().tolist() == [4, 3, 4] and picked == sorted(picked)
    assert picked == balanced_subset(labels, 4, seed=0) and picked != balanced_subset(labels, 4, seed=1)


def test_raw_pixels_without_an_image_size_are_probed_at_the_images_own_size(pattern_tree, tmp_path):
    """data.image_size null (no checkpoint names one): the pixel baseline settles it to the data's 32, as pretrain
    would, and the heads read 3 x 32 x 32 features."""
    sets = [
        "probe.features=pixels",
        "probe.fast=true",
        "probe.epochs=1",
        "probe.batch_size=8",
        "probe.blrs=[0.1]",
        "run.progress=false",
        "data.num_workers=0",
        f"run.out_dir={tmp_path}",
    ]
    results = stage.main(None, sets, {"data.path": str(pattern_tree)})
    assert results["encoder"] == "raw pixels"
    saved = load_checkpoint(tmp_path / "checkpoint.safetensors", "probe")
    assert saved.config["data"]["image_size"] == 32 and saved.tensors["heads.heads.0.weight"].shape == (2, 3 * 32 * 32)


def test_a_dry_run_of_an_encoder_probe_without_ckpt_asks_for_one(pattern_tree, tmp_path):
    with pytest.raises(LdaeError, match="probe needs --ckpt"):
        stage.main(None, [f"run.out_dir={tmp_path}"], {"data.path": str(pattern_tree)}, preview="plan")

"""train-tokenizer: the three autoencoders behind the Tokenizer interface, the VQGAN-style losses, the
training stage (patch AE reaches PCA, exact resume, the report) and the checkpoint pretrain reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldae_cli.config import load_config
from ldae_cli.errors import LdaeError
from ldae_cli.model.autoencoders import (
    AutoencoderConfig,
    PatchDiscriminator,
    PerceptualLoss,
    build_autoencoder,
    hinge_d_loss,
)
from ldae_cli.model.patches import patchify
from ldae_cli.model.tokenizers import TOKENIZER_KINDS, TokenizerConfig, build_tokenizer, load_tokenizer
from ldae_cli.runs.checkpoint import load_checkpoint
from ldae_cli.stages import train_tokenizer as stage
from ldae_cli.train.engine_tokenizer import TokenizerObjective
from ldae_cli.train.session import load_run_config


def make_tokenizer(net, mean, std, latent_scale):
    """The registered tokenizer class of `net`'s kind around it."""
    return TOKENIZER_KINDS[net.spec["kind"]](net, mean, std, latent_scale)


def load_trained_tokenizer(ck, latent_scale, patch=4, dim=None):
    return load_tokenizer(
        TokenizerConfig(kind="trained", path=str(ck.path), patch=patch, dim=dim, latent_scale=latent_scale)
    )[0]


TINY_CONV = dict(
    kind="conv-vae",
    stride=2,
    latent_channels=2,
    token_group=2,
    channels=8,
    channel_mult=[1, 2],
    res_blocks=1,
    attention=True,
)
SPECS = {
    "conv-vae": TINY_CONV,
    "patch-vae": dict(kind="patch-vae", patch=4, dim=8),
    "patch-ae": dict(kind="patch-ae", patch=4, dim=8),
}


def write_images(root: Path, n_train: int, n_val: int, size: int = 16, rank: int = 8, seed: int = 0) -> Path:
    """Images tiled from 4x4 patches of a rank-`rank` Gaussian model (variances 1 down to 1/4) plus faint
    noise: the top `rank` PCA components hold nearly all the variance, with a clear gap after them."""
    rng = np.random.default_rng(seed)
    atoms = np.linalg.qr(rng.normal(size=(48, rank)))[0].T  # orthonormal directions in patch space
    std = 0.12 * np.sqrt(np.linspace(1.0, 0.25, rank))
    for split, n in (("train", n_train), ("val", n_val)):
        d = root / split / "x"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            g = size // 4
            patches = 0.5 + (rng.normal(size=(g * g, rank)) * std) @ atoms + rng.normal(0, 0.01, (g * g, 48))
            img = patches.reshape(g, g, 4, 4, 3).transpose(0, 2, 1, 3, 4).reshape(size, size, 3)
            Image.fromarray((img.clip(0, 1) * 255).round().astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("tok-imgs"), 64, 16)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> Path:
    """Random VGG16 convolution weights in the torchvision layout: the loss runs, the numbers mean nothing."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}
    path = tmp_path_factory.mktemp("vgg") / "vgg16.safetensors"
    save_file(state, str(path))
    return path


def tiny_sets(data: Path, out: Path, **extra) -> list[str]:
    sets = {
        "data.source": "imagefolder",
        "data.path": str(data),
        "data.image_size": 16,
        "data.num_workers": 0,
        "data.hflip": False,  # the synthetic patch model is not flip-symmetric
        "tokenizer.kind": "patch-ae",
        "tokenizer.patch": 4,
        "tokenizer.dim": 8,
        "loss.kl_weight": 0,
        "optim.batch_size": 8,
        "optim.epochs": 1,
        "optim.warmup_epochs": 0,
        "optim.blr": 0.1,
        "report.images": 16,
        "report.stats_images": 64,
        "report.pca_patches": 1000,
        "report.grid_images": 4,
        "run.out_dir": str(out),
        "run.progress": False,
        "run.log_every": 1,
        "run.save_every": 1000,
        "run.device": "cpu",
    }
    sets.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in sets.items()]


def tiny_conv_sets(**extra) -> dict:
    sets = {f"tokenizer.{k}": v for k, v in TINY_CONV.items()}
    sets["tokenizer.channel_mult"] = "[1,2]"
    sets["loss.kl_weight"] = 1e-6
    sets.update(extra)
    return sets


# --- the tokenizers --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(SPECS))
def test_round_trip_shapes_export_and_frozen_but_differentiable(kind):
    torch.manual_seed(0)
    net = build_autoencoder(SPECS[kind])
    tok = make_tokenizer(net, torch.randn(net.token_dim), torch.rand(net.token_dim) + 0.5, "whiten")
    assert tok.kind == kind and tok.patch == 4 and tok.token_dim == 8
    x = torch.rand(3, 3, 16, 24) * 2 - 1
    z = tok.encode(x)
    assert z.shape == (3, 4 * 6, 8)
    assert tok.decode(z, (4, 6)).shape == x.shape
    assert tok.grid(32) == (8, 8)
    with pytest.raises(LdaeError, match="not divisible"):
        tok.grid(30)
    tensors, desc = tok.export()  # what a pretrain checkpoint stores
    again = build_tokenizer(desc, tensors)
    assert torch.equal(again.encode(x), z) and again.latent_scale == "whiten"
    torch.testing.assert_close(again.decode(z, (4, 6)), tok.decode(z, (4, 6)))
    # frozen: no parameter takes gradients, and a parent's .train() leaves it in eval mode...
    tok.train()
    assert not tok.net.training and not any(p.requires_grad for p in tok.parameters())
    # ...but gradients reach its input (the z0 target re-encodes the network's image output)
    xi = x.clone().requires_grad_(True)
    tok.encode(xi).square().sum().backward()
    assert xi.grad is not None and xi.grad.abs().sum() > 0


def test_conv_vae_token_is_a_square_of_latent_positions():
    net = build_autoencoder({**TINY_CONV, "stride": 4, "channel_mult": [1, 1, 2], "latent_channels": 3})
    assert net.patch == 8 and net.token_dim == 2 * 2 * 3  # DiT: per-token dim = 4 x channels
    mean, logvar = net.posterior(torch.zeros(1, 3, 32, 32))
    assert mean.shape == logvar.shape == (1, 16, 12)
    assert build_autoencoder(AutoencoderConfig().spec()).patch == 16  # LDM's stride 8, 2x2 tokens at 256^2


@pytest.mark.parametrize("kind", ["patch-vae", "patch-ae"])
def test_linear_tokenizers_are_one_affine_map_per_patch(kind):
    torch.manual_seed(1)
    net = build_autoencoder(SPECS[kind])
    tok = make_tokenizer(net, torch.randn(8), torch.rand(8) + 0.5, "global")
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    a, b = tok.affine()
    torch.testing.assert_close(patchify(x, 4) @ a.T + b, tok.encode(x))
    z = tok.encode(x)
    torch.testing.assert_close(tok.decode_patches(z), patchify(tok.decode(z, (2, 2)), 4))
    assert (
        tok.is_linear
        and not make_tokenizer(build_autoencoder(TINY_CONV), torch.zeros(8), torch.ones(8), "none").is_linear
    )


def test_latent_scale_options_centre_and_scale():
    net = build_autoencoder(SPECS["patch-ae"])
    mean, std = torch.arange(8.0), torch.linspace(1, 4, 8)
    shift = lambda s: make_tokenizer(net, mean, std, s)  # noqa: E731
    assert torch.equal(shift("none").shift, torch.zeros(8)) and torch.equal(shift("none").scale, torch.ones(8))
    assert torch.equal(shift("whiten").shift, mean)
    torch.testing.assert_close(shift("whiten").scale, std, rtol=1e-7, atol=0)
    torch.testing.assert_close(shift("global").scale, std.square().mean().sqrt().expand(8))


# --- configuration errors --------------------------------------------------------------------------


def test_perceptual_loss_refuses_to_start_without_weights(tmp_path):
    with pytest.raises(LdaeError, match=r"loss\.vgg_weights is empty.*VGG16 state dict saved as \.safetensors"):
        load_config(stage.TrainTokenizerConfig, "tokenizer/vqgan")
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(LdaeError, match=r"loss\.vgg_weights: .*nope\.safetensors not found; expected a torchvision"):
        PerceptualLoss(str(missing))
    bad = tmp_path / "bad.safetensors"
    save_file({"features.0.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(LdaeError, match=r"loss\.vgg_weights: .*lacks features\.0\.bias"):
        PerceptualLoss(str(bad))
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(LdaeError, match=r"loss\.vgg_weights: .*not a readable safetensors file"):
        PerceptualLoss(str(bad))


def test_config_errors_name_the_key():
    with pytest.raises(LdaeError, match=r"tokenizer\.channel_mult has 4 levels but stride 2 needs 2"):
        load_config(stage.TrainTokenizerConfig, "tokenizer/conv-vae", ["tokenizer.stride=2"])
    with pytest.raises(LdaeError, match="tokenizer.stride: must be a power of two"):
        load_config(stage.TrainTokenizerConfig, "tokenizer/conv-vae", ["tokenizer.stride=6"])
    with pytest.raises(LdaeError, match="tokenizer.dim"):
        load_config(stage.TrainTokenizerConfig, "tokenizer/patch-ae", ["tokenizer.dim=769"])
    cfg = load_config(stage.TrainTokenizerConfig, "tokenizer/patch-ae", ["loss.kl_weight=1e-6"])
    with pytest.raises(LdaeError, match="'patch-ae' has no KL term: set loss.kl_weight=0"):
        TokenizerObjective(build_autoencoder(cfg.tokenizer.spec()), cfg.loss)
    with pytest.raises(LdaeError, match="--config"):
        stage.main(None, [], {}, None)


def test_every_paper_config_loads():
    cfgs = {
        name: load_config(stage.TrainTokenizerConfig, f"tokenizer/{name}", ["loss.vgg_weights=x.safetensors"])
        for name in ("vqgan", "vqgan-noperceptual", "conv-vae", "patch-vae", "patch-ae")
    }
    assert cfgs["vqgan"].loss.perceptual_weight > 0 and cfgs["vqgan"].loss.adversarial_weight > 0
    no_perceptual = cfgs["vqgan-noperceptual"].loss
    assert no_perceptual.perceptual_weight == 0 and no_perceptual.adversarial_weight > 0
    assert cfgs["conv-vae"].loss.adversarial_weight == 0 and cfgs["conv-vae"].tokenizer.kind == "conv-vae"
    assert {c.tokenizer.kind for c in cfgs.values()} == {"conv-vae", "patch-vae", "patch-ae"}
    for name, c in cfgs.items():  # 16 dims per 16x16-pixel token, as the trajectory rows expect
        net = build_autoencoder(c.tokenizer.spec())
        assert (net.patch, net.token_dim) == (16, 16), name


# --- the losses ------------------------------------------------------------------------------------


def test_perceptual_loss_with_user_weights(vgg_file, tmp_path):
    torch.manual_seed(0)
    loss = PerceptualLoss(str(vgg_file))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert torch.allclose(loss(x, x), torch.zeros(2), atol=1e-6)
    d = loss(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad.abs().sum() > 0 and not any(p.requires_grad for p in loss.parameters())
    # LPIPS's learned channel weights, when supplied, replace the uniform ones
    widths = (64, 128, 256, 512, 512)
    lin = tmp_path / "lin.safetensors"
    save_file({f"lin{i}.model.1.weight": torch.zeros(1, w, 1, 1) for i, w in enumerate(widths)}, str(lin))
    assert torch.equal(PerceptualLoss(str(vgg_file), str(lin))(x, y.detach()), torch.zeros(2))
    save_file({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, str(lin))
    with pytest.raises(LdaeError, match=r"loss\.lpips_weights: .*five linear layers"):
        PerceptualLoss(str(vgg_file), str(lin))


def test_patch_discriminator_and_hinge_loss():
    logits = PatchDiscriminator(layers=3, channels=8)(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 1, 2, 2)  # a map of patch logits
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0  # confident and right: no loss
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 1.0


# --- training -------------------------------------------------------------------------------------


def test_patch_ae_reaches_the_pca_error(images, tmp_path):
    """The linear AE's optimum spans the PCA subspace: trained to convergence, its held-out MSE is the PCA's."""
    out = tmp_path / "ae"
    cfg = load_config(
        stage.TrainTokenizerConfig,
        "tokenizer/patch-ae",
        tiny_sets(images, out, **{"optim.epochs": 150, "optim.blr": 0.5, "optim.batch_size": 16, "run.log_every": 200}),
    )
    path = stage.run(cfg, "ae")
    report = json.loads((out / "report.json").read_text())
    mse = lambda db: 4.0 / 10 ** (db / 10)  # noqa: E731 - PSNR back to MSE for images in [-1, 1]
    assert abs(mse(report["psnr"]) / mse(report["pca_psnr"]) - 1) <= 0.05, report
    ck = load_checkpoint(path, "tokenizer")
    assert ck.extra["finished"] and ck.extra["report"] == report
    assert (out / "reconstructions.png").exists() and (out / "loss.png").exists()
    # the stored statistics make `whiten` latents zero-mean, unit-variance on the training images
    tok = load_trained_tokenizer(ck, "whiten")
    from ldae_cli.data.pipeline import build_dataset, to_unit_range

    z = tok.encode(to_unit_range(build_dataset(cfg.data, "train").cached)).reshape(-1, 8)
    torch.testing.assert_close(z.mean(0), torch.zeros(8), atol=1e-3, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(8), atol=1e-3, rtol=0)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).tensors


def test_resume_is_bit_exact_with_every_loss(images, vgg_file, tmp_path):
    """Conv VAE + perceptual + discriminator (switching on mid-run): stop, resume, same bits as one run."""
    sets = tiny_conv_sets(
        **{
            "optim.epochs": 0.5,
            "loss.perceptual_weight": 1.0,
            "loss.vgg_weights": vgg_file,
            "loss.adversarial_weight": 0.5,
            "loss.disc_start": 2,
            "loss.disc_channels": 8,
            "loss.disc_layers": 2,
            "optim.blr": 0.01,
            "report.pca_reference": False,
        }
    )
    full = load_config(stage.TrainTokenizerConfig, "tokenizer/vqgan", tiny_sets(images, tmp_path / "full", **sets))
    stage.run(full, "full")
    cut = load_config(
        stage.TrainTokenizerConfig,
        "tokenizer/vqgan",
        tiny_sets(images, tmp_path / "cut", **sets, **{"run.stop_after_steps": 1}),
    )
    stage.run(cut, "cut")
    partial = load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors", "tokenizer")
    assert partial.extra["step"] == 1 and not partial.extra["finished"]
    with pytest.raises(LdaeError, match=r"stopped at step 1 of 4.*--resume"):
        load_trained_tokenizer(partial, "global")
    stage.main(None, [], {}, str(tmp_path / "cut"))
    a, b = _tensors(tmp_path / "full" / "checkpoint.safetensors"), _tensors(tmp_path / "cut" / "checkpoint.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("optim_disc.") for k in a) and "stats.mean" in a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    log = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert log("full")[-1].keys() >= {"perceptual", "g", "d_weight", "d_loss", "kl"}
    assert [r["loss"] for r in log("full")] == [r["loss"] for r in log("cut")]
    with pytest.raises(LdaeError, match="loss.kl_weight"):
        load_run_config(
            stage.TrainTokenizerConfig, "tokenizer", None, ["loss.kl_weight=0.5"], {}, str(tmp_path / "cut")
        )


def test_checkpoint_fits_pretrain_contract(images, tmp_path):
    cfg = load_config(
        stage.TrainTokenizerConfig,
        "tokenizer/patch-vae",
        tiny_sets(
            images,
            tmp_path / "vae",
            **{
                "tokenizer.kind": "patch-vae",
                "loss.kl_weight": 1e-6,
                "optim.epochs": 0.25,
                "report.pca_reference": False,
            },
        ),
    )
    ck = load_checkpoint(stage.run(cfg, "vae"), "tokenizer")
    assert "pca_psnr" not in ck.extra["report"] and ck.extra["report"]["psnr"] > 0
    tok = load_trained_tokenizer(ck, "global", dim=8)
    assert tok.kind == "patch-vae" and tok.is_linear
    with pytest.raises(LdaeError, match="tokenizer.patch is 16 but .* 4x4 pixels; set tokenizer.patch=4"):
        load_trained_tokenizer(ck, "global", patch=16)
    with pytest.raises(LdaeError, match="tokenizer.dim is 32 but .* 8 dims per token"):
        load_trained_tokenizer(ck, "global", dim=32)
    with pytest.raises(LdaeError, match="already holds a tokenizer checkpoint"):
        stage.run(cfg, "vae")


def test_a_missing_held_out_split_fails_before_training(images, tmp_path):
    cfg = load_config(
        stage.TrainTokenizerConfig,
        "tokenizer/patch-ae",
        tiny_sets(images, tmp_path / "r", **{"data.eval_split": "nope"}),
    )
    with pytest.raises(LdaeError, match="no 'nope' folder"):
        stage.run(cfg, "r")
    assert not (tmp_path / "r" / "checkpoint.safetensors").exists()


def test_every_configurable_tokenizer_kind_resolves_through_the_registry():
    import typing

    from ldae_cli.settings.training import TokenizerConfig as Section

    kinds = typing.get_args(typing.get_type_hints(Section)["kind"])
    assert set(kinds) <= set(TOKENIZER_KINDS) and all(hasattr(TOKENIZER_KINDS[k], "configured") for k in kinds)
    assert load_tokenizer(TokenizerConfig(kind="pixel", patch=4, latent_scale="none"))[0].token_dim == 48
    with pytest.raises(LdaeError, match=r"^x: unknown tokenizer kind 'vq'; this ldae knows pca, pixel, trained, "):
        build_tokenizer({"kind": "vq"}, {}, "x")


def test_a_null_image_size_is_settled_to_the_images_own(images, tmp_path, capsys):
    """data.image_size null: the run reads the images at their 16 pixels (a multiple of the 4-pixel tokens)."""
    cfg, _ = load_run_config(
        stage.TrainTokenizerConfig,
        "tokenizer",
        "tokenizer/patch-ae",
        tiny_sets(images, tmp_path / "r", **{"data.image_size": "null"}),
        {},
        None,
        adjust=stage.settle,
    )
    assert cfg.data.image_size == 16 and "data: image size 16 (native" in capsys.readouterr().out

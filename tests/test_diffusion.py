"""Noise schedules and loss weights against their formulas (SPEC §3), and the objective's checks."""

from __future__ import annotations

import math

import pytest
import torch

from ldae_cli.config import load_config
from ldae_cli.errors import LdaeError
from ldae_cli.model.diffusion import Denoiser, DiffusionConfig, NoiseSchedule, loss_weights, schedule_table
from ldae_cli.model.tokenizers import PixelTokenizer
from ldae_cli.stages.pretrain import PretrainConfig


def test_ddpm_gamma_squared_is_the_cumulative_product_of_one_minus_beta():
    gamma, sigma = schedule_table("ddpm", 1000, 0.5)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]  # linear from beta_1 to beta_T
    product = 1.0
    for t in (1, 2, 500, 1000):
        product = math.prod(1 - b for b in betas[:t])
        assert gamma[t].item() ** 2 == pytest.approx(product, rel=1e-12)
        assert sigma[t].item() ** 2 == pytest.approx(1 - product, rel=1e-10)
    assert gamma[0] == 1 and sigma[0] == 0
    assert bool((gamma[1:] < gamma[:-1]).all())  # strictly more noise at every step
    assert product == pytest.approx(4.0358e-5, rel=1e-3)  # DDPM's gamma_T^2 (almost pure noise)


def test_linear_gamma2_is_variance_preserving_and_linear_in_gamma_squared():
    gamma, sigma = schedule_table("linear-gamma2", 100, 0.5)
    t = torch.arange(101, dtype=torch.float64)
    torch.testing.assert_close(gamma**2, 1 - t / 100, rtol=0, atol=1e-15)
    torch.testing.assert_close(gamma**2 + sigma**2, torch.ones(101, dtype=torch.float64), rtol=0, atol=1e-15)


def test_linear_sigma_keeps_gamma_one_and_ends_at_root_two():
    gamma, sigma = schedule_table("linear-sigma", 1000, 0.5)
    assert bool((gamma == 1).all())
    assert sigma[0] == 0 and sigma[1000].item() == pytest.approx(math.sqrt(2), abs=1e-15)
    assert sigma[250].item() == pytest.approx(math.sqrt(2) / 4, abs=1e-15)
    assert NoiseSchedule(DiffusionConfig()).sigma[-1].item() == pytest.approx(math.sqrt(2), rel=1e-7)


def test_constant_schedule_has_one_noise_level_and_samples_its_own_t():
    gamma, sigma = schedule_table("constant", 1000, math.sqrt(1 / 3))
    assert bool((gamma == 1).all()) and sigma[0] == 0
    assert bool((sigma[1:] == math.sqrt(1 / 3)).all())
    schedule = NoiseSchedule(DiffusionConfig(schedule="constant", constant_t=25))
    assert schedule.sample_t(5, torch.Generator().manual_seed(0), "cpu").tolist() == [25] * 5


@pytest.mark.parametrize("kind", ["1", "gamma2", "snr", "inv1p"])
def test_loss_weights_match_their_formulas(kind):
    gamma, sigma = schedule_table("linear-gamma2", 10, 0.5)
    weight = loss_weights(kind, gamma, sigma)
    for t in range(1, 11):
        g, s = gamma[t].item(), sigma[t].item()
        expected = {"1": 1.0, "gamma2": g * g, "snr": g * g / (s * s), "inv1p": 1 / (1 + s * s)}[kind]
        assert weight[t].item() == pytest.approx(expected, rel=1e-12)
    schedule = NoiseSchedule(DiffusionConfig(schedule="linear-gamma2", timesteps=10, loss_weight=kind))
    torch.testing.assert_close(schedule.weight, weight.float())


def test_unknown_schedule_or_weight_is_an_error_naming_the_choices():
    with pytest.raises(
        LdaeError,
        match=r"diffusion.schedule: unknown schedule 'cosine'; choose one of ddpm, "
        r"linear-gamma2, linear-sigma, constant",
    ):
        schedule_table("cosine", 10, 0.5)
    with pytest.raises(LdaeError, match=r"diffusion.loss_weight: unknown weighting 'sqrt'"):
        loss_weights("sqrt", torch.ones(3), torch.ones(3))
    with pytest.raises(LdaeError, match=r"diffusion.schedule: 'cosine' is not one of"):  # a config never gets there
        load_config(PretrainConfig, None, ["diffusion.schedule=cosine"])


def test_tail_weight_needs_an_orthonormal_tokenizer():
    class Opaque(PixelTokenizer):
        orthonormal = False
        kind = "opaque"

    with pytest.raises(LdaeError, match="diffusion.tail_weight needs a tokenizer with an orthonormal basis"):
        Denoiser(DiffusionConfig(tail_weight=0.1), Opaque(4), NoiseSchedule(DiffusionConfig()), 16)
    Denoiser(DiffusionConfig(tail_weight=1.0), Opaque(4), NoiseSchedule(DiffusionConfig()), 16)

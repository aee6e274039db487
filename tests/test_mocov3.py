"""MoCo v3's pieces (ldae_cli/model/mocov3.py): each loss term against a direct computation, the momentum update and
its schedule, the views keyed by (seed, step), the frozen patch projection, and two gloo ranks equal to one process
on the whole batch (loss, gradients, the heads' BatchNorm statistics, the momentum encoder).
benchmarks/check_mocov3_official.py checks the same pieces against the official code."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from ldae_cli.config import load_config
from ldae_cli.model.diffusion import Denoiser, NoiseSchedule
from ldae_cli.model.models import build_model
from ldae_cli.model.mocov3 import (BLUR, BLUR_P, FLIP, GREY, HEIGHT, LEFT, SOLARIZE, SOLARIZE_P, TOP, WIDTH,
                                   MocoV3Objective, apply_views, info_nce, momentum_at)
from ldae_cli.model.tokenizers import PixelTokenizer
from ldae_cli.runs.distributed import DistContext, ddp_wrap
from ldae_cli.settings.contrastive import MocoV3Config
from ldae_cli.settings.training import DEFAULT_T, PretrainConfig

SIZE, PATCH, BATCH, SEED = 16, 4, 8, 3
CONFIG = "baselines/mocov3.yaml"


def objective(**sets) -> MocoV3Objective:
    """A tiny MoCo v3 objective (mocov3.yaml at 16 px, 4-pixel patches, width 32, 2 blocks), its adaLN weights
    random so that t and the gates matter."""
    overrides = {"data.image_size": SIZE, "tokenizer.patch": PATCH, "model.size": "custom", "model.width": 32,
                 "model.encoder_depth": 2, "model.num_heads": 2, "mocov3.mlp_dim": 64, "mocov3.dim": 16, **sets}
    cfg = load_config(PretrainConfig, CONFIG, [f"{k}={v}" for k, v in overrides.items()])
    denoiser = Denoiser(cfg.diffusion, PixelTokenizer(PATCH), NoiseSchedule(cfg.diffusion), SIZE)
    torch.manual_seed(0)
    net = build_model(cfg.model, denoiser.in_dim, denoiser.out_dim, denoiser.grid)
    with torch.no_grad():
        for block in net.blocks:
            block.ada.net[-1].weight.normal_(0, 0.05)
    return MocoV3Objective(cfg, denoiser, net).train()


def tokenize(x: torch.Tensor) -> torch.Tensor:
    return PixelTokenizer(PATCH).encode(x)


def images(n: int = BATCH) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def direct_ctr(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """ctr(q_i, k) written out: -log softmax_j(cos(q_i, k_j) / tau) at j = i, times 2 tau, in float64."""
    q, k = q.double(), k.double()
    out = []
    for i in range(q.shape[0]):
        logits = [float(q[i] @ k[j] / (q[i].norm() * k[j].norm())) / tau for j in range(k.shape[0])]
        out.append(2 * tau * (math.log(sum(math.exp(v) for v in logits)) - logits[i]))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_info_nce_is_the_scaled_cross_entropy_of_each_query_against_all_keys(tau):
    q, k = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(int(tau * 10))).unbind()
    assert torch.allclose(info_nce(q, k, tau).double(), direct_ctr(q, k, tau), atol=1e-5)


def test_the_loss_pairs_each_view_s_query_with_the_other_view_s_key():
    obj = objective()
    x1, x2 = tokenize(torch.rand(2, BATCH, 3, SIZE, SIZE).flatten(0, 1) * 2 - 1).chunk(2)
    loss = obj.loss_from_tokens(x1, x2)
    with torch.no_grad():  # the same modules by hand, view by view (each BatchNorm sees one view's batch)
        h1, h2 = obj.pooled(obj.net, torch.cat([x1, x2])).chunk(2)
        proj, pred = obj.heads["projector"], obj.heads["predictor"]
        q1, q2 = pred(proj(h1)), pred(proj(h2))
        m1, m2 = obj.pooled(obj.momentum["encoder"], torch.cat([x1, x2])).chunk(2)
        k1, k2 = obj.momentum["projector"](m1), obj.momentum["projector"](m2)
    tau = obj.cfg.temperature
    expected = direct_ctr(q1, k2, tau) + direct_ctr(q2, k1, tau)
    assert torch.allclose(loss.detach().double(), expected, atol=1e-5)
    assert not torch.allclose(loss.detach().double(), direct_ctr(q1, k1, tau) + direct_ctr(q2, k2, tau), atol=1e-3)


def test_momentum_schedule_endpoints():
    cfg = MocoV3Config(momentum=0.99)
    assert momentum_at(0, 100, cfg) == pytest.approx(0.99)
    assert momentum_at(50, 100, cfg) == pytest.approx(0.995)
    assert momentum_at(100, 100, cfg) == pytest.approx(1.0)
    ms = [momentum_at(k, 100, cfg) for k in range(101)]
    assert all(a <= b for a, b in zip(ms, ms[1:]))
    assert momentum_at(70, 100, MocoV3Config(momentum=0.99, momentum_cosine=False)) == 0.99


def test_momentum_update_blends_the_base_encoder_and_projector_at_the_next_step_s_momentum():
    obj = objective(**{"mocov3.momentum": 0.9})
    base, mom = obj.ema_pairs()
    assert len(base) == len(mom) and all(not p.requires_grad for p in mom)
    assert all(torch.equal(b, m) for b, m in zip(base, mom))  # the copy starts equal
    with torch.no_grad():
        for p in base:
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in mom]
    obj.after_step(3, 10)
    m = momentum_at(4, 10, obj.cfg)
    for b, old, new in zip(base, before, mom):
        assert torch.allclose(new, m * old + (1 - m) * b, atol=1e-6)
    predictor_ids = {id(p) for p in obj.heads["predictor"].parameters()}
    assert not predictor_ids & {id(p) for p in base}  # the predictor has no momentum twin
    assert isinstance(obj.momentum["encoder"].final, torch.nn.Identity)  # no denoising head in the copy


def test_views_are_keyed_by_seed_and_step_whatever_the_split():
    obj, imgs = objective(), images()
    (params,) = obj.draw(SEED, 5, BATCH, "cpu")
    assert torch.equal(params, obj.draw(SEED, 5, BATCH, "cpu")[0])
    assert not torch.equal(params, obj.draw(SEED, 6, BATCH, "cpu")[0])
    assert not torch.equal(params, obj.draw(SEED + 1, 5, BATCH, "cpu")[0])
    whole = apply_views(imgs, params, obj.kernel)
    assert whole.dtype == torch.uint8 and whole.shape == (2 * BATCH, 3, SIZE, SIZE)
    for pieces in (2, 4):  # two or four ranks' slices
        n = BATCH // pieces
        parts = [apply_views(imgs[i:i + n], params[i:i + n], obj.kernel).view(2, n, 3, SIZE, SIZE)
                 for i in range(0, BATCH, n)]
        assert torch.equal(torch.cat(parts, 1).flatten(0, 1), whole)
    assert not torch.equal(whole[:BATCH], whole[BATCH:])


def test_view_draws_follow_the_recipe():
    (p,) = objective().draw(SEED, 0, 4000, "cpu")
    top, left, h, w = (p[..., c] for c in (TOP, LEFT, HEIGHT, WIDTH))
    assert bool((top >= 0).all() and (left >= 0).all() and (top + h <= SIZE).all() and (left + w <= SIZE).all())
    assert bool((h * w >= math.floor(0.08 * SIZE * SIZE)).all())
    for col, rates in ((BLUR, BLUR_P), (SOLARIZE, SOLARIZE_P), (FLIP, (0.5, 0.5)), (GREY, (0.2, 0.2))):
        for view, rate in enumerate(rates):
            assert abs(float(p[:, view, col].mean()) - rate) < 5 * math.sqrt(rate * (1 - rate) / 4000) + 1e-9


def test_the_patch_projection_stays_frozen_and_out_of_the_optimizer():
    obj = objective()
    embed = obj.net.embed.weight.clone()
    optimizer = torch.optim.AdamW(obj.param_groups(0.1), lr=1e-2, weight_decay=0.1)
    obj(images(), None, *obj.draw(SEED, 0, BATCH, "cpu")).mean().backward()
    assert obj.net.embed.weight.grad is None and obj.net.embed.bias.grad is None
    trainable = {id(p) for p in obj.param_groups(0.1)}
    assert id(obj.net.embed.weight) not in trainable and id(obj.net.final.linear.weight) not in trainable
    assert all(p.grad is not None for p in obj.param_groups(0.1))
    optimizer.step()
    assert torch.equal(obj.net.embed.weight, embed)
    assert objective(**{"mocov3.freeze_patch_embed": False}).net.embed.weight.requires_grad


# ------------------------------------------------------------------ two gloo ranks equal one process

def run_steps(runner, obj: MocoV3Objective, rank: int, world: int, steps: int = 2) -> dict[str, torch.Tensor]:
    """The engine's step as optimizer_step does it: this rank's rows of the global batch and of the view draw, the
    loss sum / per-rank count, SGD, then the momentum update. What every rank must agree on, by name."""
    per_rank, imgs = BATCH // world, images()
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    optimizer = torch.optim.SGD(obj.param_groups(0.0), lr=0.05)
    out = {}
    for step in range(steps):
        per_sample = runner(imgs[sl], None, obj.draw(SEED, step, BATCH, "cpu")[0][sl])
        (per_sample.sum() / per_rank).backward()
        out[f"{step}.loss_sum"] = per_sample.detach().sum().reshape(1)
        named = dict(obj.named_parameters())
        out.update({f"{step}.grad.{n}": p.grad.clone() for n, p in named.items() if p.grad is not None})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        obj.after_step(step, steps)
    out.update({f"state.{n}": v.clone() for n, v in obj.state_dict().items() if "running" in n or "momentum." in n})
    return out


def rank_main(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        obj = objective()
        runner = ddp_wrap(obj, DistContext(rank, world, 0, torch.device("cpu")))
        save_file(run_steps(runner, obj, rank, world), os.path.join(folder, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process(tmp_path):
    mp.spawn(rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    obj = objective()
    one = run_steps(obj, obj, 0, 1)
    assert set(ranks[0]) == set(one)
    grads = [k for k in one if ".grad." in k]
    assert any("heads.projector.1.weight" in k for k in grads) and any("blocks.1.attn" in k for k in grads)
    for key, expected in one.items():
        if key.endswith("loss_sum"):  # the global batch's mean loss: each rank's sum over its share, summed
            got = ranks[0][key] + ranks[1][key]
        else:  # DDP-averaged gradients, the heads' BatchNorm statistics, the momentum encoder: every rank holds them
            assert torch.allclose(ranks[0][key], ranks[1][key], atol=1e-6), key
            got = ranks[0][key]
        # float32 sums in another order (a bug, a rank's own BatchNorm statistics say, is off by 1e-2 or more)
        tolerance = 5e-5 * float(expected.abs().max()) + 1e-6
        assert float((got - expected).abs().max()) <= tolerance, (key, float((got - expected).abs().max()))


def test_the_trained_encoder_is_what_export_folds_and_the_probe_reads():
    """The base encoder's pooled features (before the heads) are the folded timm ViT's output at DEFAULT_T."""
    from ldae_cli.model.models import build_timm_vit, fold_to_vit

    obj = objective()
    dim = PATCH * PATCH * 3
    state, kwargs = fold_to_vit(obj.net, DEFAULT_T, PATCH, (torch.eye(dim), torch.zeros(dim)))
    vit = build_timm_vit(kwargs).eval()
    vit.load_state_dict(state)
    x = torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(vit(x), obj.pooled(obj.net, tokenize(x)), atol=1e-5)

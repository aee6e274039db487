"""Throughput of the full pretrain step against the bare model's forward + backward, in one run.

Full step = what `ldae pretrain` runs per optimizer step once images are on the device: uint8 ->
[-1, 1], PCA encode, per-step noise draw, inverse PCA to the image, the DiT-style network, the x0
loss on the PCA basis, backward, AdamW. Bare = the same network's forward + backward on a random
input of the same shape, with a plain MSE loss and no optimizer. Both are compiled the same way.

    python benchmarks/pretrain_step.py                                    # CPU: a small model
    python benchmarks/pretrain_step.py --size half-L --image 256 --patch 16 --batch 256 --compile   # GPU

Prints img/s of each, their ratio (the full step must keep >= 0.9 of the bare model), model TFLOP/s
and, on CUDA, MFU against a bf16 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ldae_cli.model.diffusion import Denoiser, DiffusionConfig, NoiseSchedule
from ldae_cli.model.models import ModelConfig, build_model, model_flops_per_image
from ldae_cli.model.objectives import LDAEObjective
from ldae_cli.model.pca import principal_components
from ldae_cli.model.tokenizers import PCATokenizer
from ldae_cli.settings.training import PretrainConfig
from ldae_cli.train.engine_pretrain import optimizer_step


def synthetic_pca(patch: int, dim: int) -> PCATokenizer:
    """A valid orthonormal basis with a decaying spectrum (its values do not affect the cost)."""
    full = patch * patch * 3
    a = torch.randn(full, full, dtype=torch.float64) / full**0.5
    cov = a @ a.T + torch.diag(torch.logspace(0, -4, full, dtype=torch.float64))
    eig, basis = principal_components(cov)
    return PCATokenizer(torch.zeros(full), basis, eig, patch, dim)


def trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Give the adaLN-Zero layers non-zero weights, as after the first training steps.

    At init every gate is zero, so the backward matmuls of each block multiply zeros, which the
    GPU runs measurably faster (lower power): a bare model that never steps would look faster than
    it ever is in training. Both sides of the comparison get the same weights.
    """
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in [*model.blocks, model.final]:
            last = block.ada.net[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=gen) * 0.02)
            last.bias.copy_(torch.randn(last.bias.shape, generator=gen) * 0.02)
        model.final.linear.weight.copy_(torch.randn(model.final.linear.weight.shape, generator=gen) * 0.02)
    return model


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def matmul_peak(device: torch.device) -> float:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sec = timed(lambda: a @ b, 10, 3, device)
    return 2 * n**3 / sec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="custom", help="model size preset (T, S, B, half-L, L) or custom")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4, help="encoder = decoder blocks for --size custom")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--image", type=int, default=32)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--profile", type=int, default=0, help="profile this many steps of each and print top kernels")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = ModelConfig(size=args.size)
    if args.size == "custom":
        cfg.width, cfg.encoder_depth, cfg.decoder_depth, cfg.num_heads = args.width, args.depth, args.depth, args.heads
    diff = DiffusionConfig()  # l-DAE: image in, image out, x0 target, w_i = 1 / 0.1
    tok = synthetic_pca(args.patch, args.dim)
    den = Denoiser(diff, tok, NoiseSchedule(diff), args.image).to(device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    den.amp_dtype = amp
    b, n_tok = args.batch, den.grid[0] * den.grid[1]

    # --- bare model: forward + backward only
    torch.manual_seed(0)
    bare = trained_like(build_model(cfg, den.in_dim, den.out_dim, den.grid)).to(device)
    x = torch.randn(b, n_tok, den.in_dim, device=device)
    t = torch.randint(1, 1001, (b,), device=device)

    def bare_loss(inp, tt):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = bare(inp, tt)
        return (out.float() - inp).square().mean()

    bare_fn = torch.compile(bare_loss) if args.compile else bare_loss

    def bare_step():
        bare_fn(x, t).backward()
        bare.zero_grad(set_to_none=True)

    # --- full step: the engine's own optimizer_step on in-memory uint8 images
    torch.manual_seed(0)
    model = trained_like(build_model(cfg, den.in_dim, den.out_dim, den.grid)).to(device)
    objective = LDAEObjective(PretrainConfig(), den, model)
    runner = torch.compile(objective) if args.compile else objective
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    images = torch.randint(0, 256, (b, 3, args.image, args.image), dtype=torch.uint8, device=device)
    labels = torch.full((b,), -1, dtype=torch.long, device=device)
    step = [0]

    def full_step():
        draw = objective.draw(0, step[0], b, device)
        optimizer_step(runner, model, optimizer, [(images, labels)], draw, 0, b, None, False)
        step[0] += 1

    t0 = time.perf_counter()
    sec_bare = timed(bare_step, args.steps, args.warmup, device)
    sec_full = timed(full_step, args.steps, args.warmup, device)
    # second pass of each, interleaved, so drift (clocks, other load) shows up as spread
    sec_bare2 = timed(bare_step, args.steps, 1, device)
    sec_full2 = timed(full_step, args.steps, 1, device)
    bare_ips = b / min(sec_bare, sec_bare2)
    full_ips = b / min(sec_full, sec_full2)
    flops = model_flops_per_image(model.spec)
    res = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "size": args.size,
        "width": model.spec["width"],
        "blocks": model.spec["encoder_depth"] + model.spec["decoder_depth"],
        "tokens": n_tok,
        "batch": b,
        "compile": args.compile,
        "precision": "bf16-autocast" if amp else "fp32",
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "bare_img_per_s": round(bare_ips, 1),
        "full_img_per_s": round(full_ips, 1),
        "ratio_full_over_bare": round(full_ips / bare_ips, 3),
        "spread_bare": round(abs(sec_bare - sec_bare2) / min(sec_bare, sec_bare2), 3),
        "spread_full": round(abs(sec_full - sec_full2) / min(sec_full, sec_full2), 3),
        "model_gflop_per_img": round(flops / 1e9, 2),
        "full_tflops": round(full_ips * flops / 1e12, 1),
        "bench_seconds": round(time.perf_counter() - t0, 1),
    }
    if device.type == "cuda":
        peak = matmul_peak(device)
        res["matmul_peak_tflops"] = round(peak / 1e12, 1)
        res["mfu_full"] = round(full_ips * flops / peak, 3)
        res["mfu_bare"] = round(bare_ips * flops / peak, 3)
        res["max_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for name, fn in (("bare", bare_step), ("full", full_step)):
            with profile(activities=acts) as prof:
                for _ in range(args.profile):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"--- {name}: top kernels over {args.profile} steps")
            print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60))
    width = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

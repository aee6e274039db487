"""fit-pca: streaming covariance, eigenbasis, patch sampling, the PCA tokenizer and the CLI stage."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT
from PIL import Image

from ldae_cli.config import load_config
from ldae_cli.data.sources import default_locations
from ldae_cli.model.patches import patchify, random_patches, unpatchify
from ldae_cli.model.pca import CovarianceAccumulator, principal_components
from ldae_cli.model.tokenizers import PCATokenizer, TokenizerConfig, latent_normalization, load_tokenizer
from ldae_cli.runs.checkpoint import load_checkpoint
from ldae_cli.stages.fit_pca import FitPCAConfig


def correlated(n: int, dim: int, seed: int = 0, offset: float = 0.0) -> torch.Tensor:
    """Correlated float64 data with distinct variances along a random basis."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, -2, dim, dtype=torch.float64)
    return (torch.randn(n, dim, generator=g, dtype=torch.float64) * scales) @ mix + offset


# --- the accumulator and the eigenbasis ----------------------------------------------------------


def test_covariance_over_uneven_batches_matches_numpy():
    x = correlated(3001, 12, offset=1e4)  # a large offset: naive sum-of-squares would lose digits
    acc = CovarianceAccumulator(12)
    start = 0
    for size in (1, 2, 997, 0, 1500, 13, 488):
        acc.update(x[start : start + size])
        start += size
    assert start == len(x) and acc.n == len(x)
    ref = np.cov(x.numpy(), rowvar=False)
    np.testing.assert_allclose(acc.mean.numpy(), x.numpy().mean(0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(acc.covariance().numpy(), ref, rtol=1e-9, atol=1e-12)
    assert acc.covariance().dtype == torch.float64


def test_covariance_accepts_float32_batches_and_accumulates_in_float64():
    x = correlated(2000, 6, seed=2).float()
    acc = CovarianceAccumulator(6)
    for chunk in x.split(300):
        acc.update(chunk)
    np.testing.assert_allclose(
        acc.covariance().numpy(), np.cov(x.double().numpy(), rowvar=False), rtol=1e-10, atol=1e-12
    )


def test_principal_components_descending_orthonormal_and_diagonalising():
    x = correlated(4000, 10, seed=1)
    cov = torch.from_numpy(np.cov(x.numpy(), rowvar=False))
    eigenvalues, basis = principal_components(cov)
    assert basis.shape == (10, 10) and eigenvalues.shape == (10,)
    assert torch.all(eigenvalues[:-1] >= eigenvalues[1:]) and eigenvalues[-1] >= 0
    torch.testing.assert_close(basis @ basis.T, torch.eye(10, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(basis @ cov @ basis.T, torch.diag(eigenvalues), rtol=0, atol=1e-10)
    ref = np.sort(np.linalg.eigvalsh(cov.numpy()))[::-1]
    np.testing.assert_allclose(eigenvalues.numpy(), ref, rtol=1e-10, atol=1e-13)
    # signs are fixed: the largest-magnitude entry of each row is positive
    assert torch.all(basis.gather(1, basis.abs().argmax(1, keepdim=True)) > 0)
    e2, b2 = principal_components(cov.clone())
    assert torch.equal(b2, basis)


def test_random_patches_are_the_pixels_at_the_sampled_positions():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 11, 9, generator=g)
    p, k = 4, 5
    out = random_patches(images, p, k, torch.Generator().manual_seed(42))
    assert out.shape == (3 * k, p * p * 3)
    # replay the generator to recover the sampled top-left corners
    g = torch.Generator().manual_seed(42)
    ys = torch.randint(0, 11 - p + 1, (3, k), generator=g)
    xs = torch.randint(0, 9 - p + 1, (3, k), generator=g)
    for b in range(3):
        for j in range(k):
            y, x = int(ys[b, j]), int(xs[b, j])
            window = images[b : b + 1, :, y : y + p, x : x + p]
            # same layout as the tokenizer: patchify of the window is exactly this patch
            torch.testing.assert_close(out[b * k + j], patchify(window, p)[0, 0], rtol=0, atol=0)
            # and explicitly (row, col, channel) order
            torch.testing.assert_close(out[b * k + j], window[0].permute(1, 2, 0).reshape(-1), rtol=0, atol=0)


def test_random_patches_cover_all_positions():
    images = torch.arange(8 * 8, dtype=torch.float32).reshape(1, 1, 8, 8).expand(1, 3, 8, 8)
    out = random_patches(images, 2, 2000, torch.Generator().manual_seed(0))
    corners = set(out[:, 0].long().tolist())  # value of the top-left pixel encodes the position
    assert corners == {r * 8 + c for r in range(7) for c in range(7)}


def test_grid_positions_are_the_tokenizer_grid():
    images = torch.arange(8 * 8, dtype=torch.float32).reshape(1, 1, 8, 8).expand(1, 3, 8, 8)
    out = random_patches(images, 2, 500, torch.Generator().manual_seed(0), grid=True)
    corners = set(out[:, 0].long().tolist())
    assert corners == {r * 8 + c for r in range(0, 8, 2) for c in range(0, 8, 2)}
    assert set(map(tuple, out.tolist())) <= set(map(tuple, patchify(images, 2)[0].tolist()))


def test_patchify_unpatchify_round_trip_and_layout():
    x = torch.randn(2, 3, 8, 12)
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 6, 48)
    torch.testing.assert_close(tokens[1, 4], x[1, :, 4:8, 4:8].permute(1, 2, 0).reshape(-1), rtol=0, atol=0)
    assert torch.equal(unpatchify(tokens, 4, (2, 3)), x)


# --- the tokenizer on a fitted basis -------------------------------------------------------------


def fitted_tokenizer(dim: int, latent_scale: str = "global", n: int = 5000, seed: int = 0):
    patches = correlated(n, 48, seed=seed, offset=0.3)
    acc = CovarianceAccumulator(48)
    for chunk in patches.split(777):
        acc.update(chunk)
    eigenvalues, basis = principal_components(acc.covariance())
    tok = PCATokenizer(acc.mean, basis, eigenvalues, patch=4, dim=dim, latent_scale=latent_scale)
    return tok, patches.float(), acc, basis


def test_pca_tokenizer_full_dim_round_trip_is_exact():
    tok, patches, _, _ = fitted_tokenizer(48)
    images = unpatchify(patches[:64].reshape(1, 64, 48), 4, (8, 8))
    back = tok.decode(tok.encode(images), (8, 8))
    torch.testing.assert_close(back, images, rtol=0, atol=2e-5)


def test_pca_tokenizer_partial_dim_is_the_orthogonal_projection():
    tok, patches, acc, basis = fitted_tokenizer(10)
    x = patches[:200].double()
    v = basis[:10]
    expected = (x - acc.mean) @ v.T @ v + acc.mean
    got = tok.decode_patches(tok.encode_patches(patches[:200])).double()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    # projecting twice changes nothing, and the residual is orthogonal to the kept components
    again = tok.decode_patches(tok.encode_patches(got.float())).double()
    torch.testing.assert_close(again, got, rtol=0, atol=1e-4)
    residual = x - got
    assert (residual @ v.T).abs().max() < 1e-4
    # affine() is the same map as encode
    a, b = tok.affine()
    torch.testing.assert_close(patches[:200] @ a.T + b, tok.encode_patches(patches[:200]), rtol=1e-4, atol=1e-4)
    # kept_energy equals the squared norm of the latent before scaling
    z = tok.encode_patches(patches[:200]) * tok.scale
    torch.testing.assert_close(tok.kept_energy(patches[:200] - tok.mean), z.square().sum(-1), rtol=1e-4, atol=1e-4)


def test_latent_scale_global_gives_unit_rms_on_fitted_data():
    tok, patches, _, _ = fitted_tokenizer(16, "global")
    z = tok.encode_patches(patches).double()
    assert abs(z.square().mean().sqrt().item() - 1) < 2e-3
    assert torch.allclose(tok.scale, tok.scale[0].expand(16))  # one scalar for all components
    assert z.std(0).max() > 2 * z.std(0).min()  # ... so components keep their relative sizes


def test_latent_scale_whiten_gives_unit_std_per_component():
    tok, patches, _, _ = fitted_tokenizer(16, "whiten")
    z = tok.encode_patches(patches).double()
    torch.testing.assert_close(z.std(0), torch.ones(16, dtype=torch.float64), rtol=0, atol=1e-3)
    assert z.mean(0).abs().max() < 1e-3


def test_latent_scale_none_is_the_raw_projection():
    tok, patches, acc, basis = fitted_tokenizer(8, "none")
    z = tok.encode_patches(patches[:50]).double()
    torch.testing.assert_close(z, (patches[:50].double() - acc.mean) @ basis[:8].T, rtol=0, atol=1e-4)
    for kind in ("global", "whiten", "none"):
        assert latent_normalization(torch.zeros(4), torch.ones(4), kind)[1].shape == (4,)


def test_tokenizer_rejects_bad_shapes_and_dims():
    from ldae_cli.errors import LdaeError

    with pytest.raises(LdaeError, match="between 1 and 48"):
        PCATokenizer(torch.zeros(48), torch.eye(48), torch.ones(48), 4, 49)
    with pytest.raises(LdaeError, match="do not fit"):
        PCATokenizer(torch.zeros(48), torch.eye(48), torch.ones(48), 3, 8)
    with pytest.raises(LdaeError, match="not divisible"):
        patchify(torch.zeros(1, 3, 10, 10), 4)


# --- the stage through the CLI -------------------------------------------------------------------


def test_fit_pca_cli_on_a_tiny_imagefolder(cli, image_tree, tmp_path):
    out = tmp_path / "out" / "pca.safetensors"
    res = cli(
        "fit-pca",
        "--source",
        "imagefolder",
        "--data",
        image_tree,
        "--patch",
        "4",
        "--dim",
        "8",
        "--patches",
        "3000",
        "--image-size",
        "16",
        "--out",
        out,
        "--set",
        "pca.patches_per_image=20",
        "--set",
        "data.num_workers=0",
    )
    assert res.returncode == 0, res.stderr
    assert "variance explained by d = 8 of 48 components" in res.stdout
    shown = float(res.stdout.split("components:")[1].split("%")[0])
    ck = load_checkpoint(out, "pca")
    assert ck.extra["patch"] == 4 and ck.extra["dim"] == 8 and ck.extra["n_patches"] == 192  # all 12 x 16, once
    assert ck.extra["image_size"] == 16 and ck.extra["dataset"] == "imagefolder"
    assert abs(100 * ck.extra["variance_explained"] - shown) < 0.01
    t = ck.section("pca")
    assert t["basis"].shape == (48, 48) and t["mean"].shape == (48,) and t["eigenvalues"].shape == (48,)
    torch.testing.assert_close(t["basis"] @ t["basis"].T, torch.eye(48, dtype=t["basis"].dtype), rtol=0, atol=1e-6)
    assert torch.all(t["eigenvalues"][:-1] >= t["eigenvalues"][1:])
    assert float(t["eigenvalues"][:8].sum() / t["eigenvalues"].sum()) == pytest.approx(ck.extra["variance_explained"])
    assert t["mean"].abs().max() <= 1.0  # images were in [-1, 1]
    # side outputs
    filters = out.with_name("pca.filters.png")
    with Image.open(filters) as im:
        assert im.width > 8 * 4 and im.height > 4
    resolved = load_config(FitPCAConfig, out.with_name("pca.config.yaml"))
    assert resolved.pca.patch == 4 and resolved.pca.dim == 8 and resolved.data.path == str(image_tree)
    assert ck.config["pca"]["patches"] == 3000
    # the checkpoint builds a tokenizer
    tok = load_tokenizer(TokenizerConfig(path=str(out), patch=4))[0]
    assert tok.token_dim == 8 and tok.encode(torch.zeros(1, 3, 16, 16)).shape == (1, 16, 8)


def test_fit_pca_is_reproducible_and_default_out(run_main, image_tree, tmp_path):
    cli = run_main  # in-process: same code path as the console script, without two interpreter starts
    args = (
        "fit-pca",
        "--source",
        "imagefolder",
        "--data",
        image_tree,
        "--patch",
        "2",
        "--dim",
        "4",
        "--patches",
        "500",
        "--image-size",
        "8",
        "--set",
        "data.num_workers=0",
    )
    assert cli(*args).returncode == 0
    first = (
        tmp_path / "runs" / "pca" / f"{Path(image_tree).name}-p2-d4-8px.safetensors"
    )  # named after the data and size
    a = load_checkpoint(first).tensors
    first.rename(tmp_path / "a.safetensors")
    refused = cli(*args)  # the fit's config and filters are still there: nothing is replaced without --force
    assert refused.returncode == 1 and f"{first.stem}.config.yaml already exists" in refused.stderr
    assert not first.exists()
    assert cli(*args, "--force").returncode == 0
    b = load_checkpoint(first).tensors
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fit_pca_cli_errors_are_one_line(run_main, image_tree, tmp_path):
    cli = run_main
    res = cli(
        "fit-pca",
        "--source",
        "imagefolder",
        "--data",
        image_tree,
        "--patch",
        "32",
        "--dim",
        "4",
        "--image-size",
        "16",
        "--patches",
        "5000",
        "--out",
        tmp_path / "x.safetensors",
    )
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "larger than the images" in res.stderr
    res = cli("fit-pca", "--patch", "4", "--dim", "4", "--patches", "10")
    assert res.returncode == 1 and "pca.patches" in res.stderr and res.stderr.count("\n") == 1


# --- acceptance on real CIFAR-10 -----------------------------------------------------------------


def _cifar_archive() -> Path | None:
    for place in default_locations("cifar10"):
        if place.exists():
            return place
    shared = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
    return shared if shared.exists() else None


def _decode_split(archive: Path, split: str) -> np.ndarray:
    """All images of a split as uint8 (N, 32, 32, 3), decoded with PIL directly (independent of ldae)."""
    blobs = []
    with tarfile.open(archive, "r:*") as tar:
        for m in tar:
            parts = m.name.split("/")
            if m.isfile() and len(parts) >= 3 and parts[-3] == split and m.name.endswith(".jpg"):
                blobs.append(tar.extractfile(m).read())
    out = np.empty((len(blobs), 32, 32, 3), np.uint8)
    for i, blob in enumerate(blobs):
        with Image.open(io.BytesIO(blob)) as im:
            out[i] = np.asarray(im.convert("RGB"))
    return out


def _grid_patches(images: np.ndarray, p: int) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N * H/p * W/p, p*p*C) float64 in [-1, 1], (row, col, channel) layout."""
    n, h, w, c = images.shape
    x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, p * p * c)
    # torch for the big products: numpy's OpenBLAS with 2 threads is erratic on these 2-core machines
    return torch.from_numpy(x).double() / 127.5 - 1.0


@pytest.mark.slow
def test_cifar10_pca_reconstruction_within_one_percent_of_exact(tmp_path, capsys):
    archive = _cifar_archive()
    if archive is None:
        pytest.skip("CIFAR-10 JPEG archive not found (../shared/data/cifar10-jpg.tar.gz)")
    out = tmp_path / "cifar-pca.safetensors"
    t0 = time.time()
    # the command under test runs in its own process while this one builds the exact reference
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ldae_cli",
            "fit-pca",
            "--source",
            "cifar10",
            "--data",
            str(archive),
            "--image-size",
            "32",
            "--patch",
            "4",
            "--dim",
            "16",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        train = _decode_split(archive, "train")
        test = _decode_split(archive, "test")
        assert train.shape == (50_000, 32, 32, 3) and test.shape == (10_000, 32, 32, 3)
        # exact PCA on ALL training grid patches (50,000 x 64): float64 covariance + numpy's eigh
        d, full = 16, 48
        total = torch.zeros(full, dtype=torch.float64)
        outer = torch.zeros(full, full, dtype=torch.float64)
        count = 0
        for chunk in np.array_split(train, 10):
            x = _grid_patches(chunk, 4)
            total += x.sum(0)
            outer += x.T @ x  # exact: the pixel values are multiples of 1/127.5 summed in float64
            count += len(x)
        assert count == 50_000 * 64
        mu = total / count
        cov = ((outer - count * torch.outer(mu, mu)) / (count - 1)).numpy()
        w, v = np.linalg.eigh(cov)
        assert np.all(np.diff(w) >= 0)
        v_exact = torch.from_numpy(np.ascontiguousarray(v[:, ::-1][:, :d].T))  # (d, D), largest first
        test_patches = _grid_patches(test, 4)
        assert test_patches.shape == (10_000 * 64, full)
        centred = test_patches - mu
        resid = centred - (centred @ v_exact.T) @ v_exact
        err_exact = float(resid.square().mean())
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "variance explained by d = 16 of 48" in stdout
    ck = load_checkpoint(out, "pca")
    assert ck.extra["n_patches"] == 1_000_000 and ck.extra["image_size"] == 32
    # our fitted components, applied through the tokenizer to every test grid patch
    tok = load_tokenizer(TokenizerConfig(path=str(out), patch=4, dim=16))[0]
    images = torch.from_numpy(test).permute(0, 3, 1, 2).float() / 127.5 - 1
    errs = []
    for chunk in images.split(2000):
        recon = tok.decode(tok.encode(chunk), (8, 8))
        errs.append((recon.double() - chunk.double()).square().sum())
    err_ours = float(sum(errs) / images.numel())
    rel = (err_ours - err_exact) / err_exact
    with capsys.disabled():  # shown in every run, not only when the test fails
        print(
            f"\nCIFAR-10 test grid patches (10,000 x 64), d = 16 of 48: mean squared reconstruction error "
            f"fit-pca {err_ours:.6g} vs exact PCA on all train patches {err_exact:.6g} "
            f"({100 * rel:+.3f}%), {time.time() - t0:.1f} s"
        )
    assert err_ours > 0 and err_exact > 0
    assert abs(rel) <= 0.01


# --- no more patches than the images hold ---------------------------------------------------------

OVERSAMPLING = [  # images, image size, patch, pca.patches -> what `fit-pca` says before it fits (None: nothing)
    (
        10,
        64,
        16,
        1_000_000,
        "fitting on each of the 160 distinct patches (10 images x 16 positions on the 16-pixel "
        "grid) once, not on --patches 1,000,000: more draws would only repeat them; the fit is "
        "rank-deficient: 160 distinct patches for D = 768 dimensions; components beyond 160 are "
        "noise: add images",
    ),
    (
        100,
        16,
        4,
        3000,
        "fitting on each of the 1,600 distinct patches (100 images x 16 positions on the 4-pixel grid) "
        "once, not on --patches 3,000: more draws would only repeat them",
    ),  # D = 48: full rank
    (100, 16, 4, 1600, None),  # exactly the distinct ones
    (1000, 64, 16, 10_000, None),  # 16,000 distinct: random draws, full rank
]


@pytest.mark.parametrize("images, size, patch, patches, said", OVERSAMPLING)
def test_the_warning_says_each_distinct_patch_is_taken_once_and_when_the_fit_is_rank_deficient(
    images, size, patch, patches, said
):
    from ldae_cli.model.pca import PCAConfig, oversampling

    assert oversampling(images, size, PCAConfig(patch=patch, patches=patches)) == said


def test_fit_pca_stops_at_the_distinct_patches_and_says_the_fit_is_rank_deficient(run_main, tmp_path):
    from helpers import write_image_tree

    tree = write_image_tree(tmp_path / "tree", classes=("a", "b"), per_class=5, size=(64, 64), splits=("train",))
    out = tmp_path / "pca.safetensors"
    started = time.perf_counter()
    res = run_main(
        "fit-pca",
        "--source",
        "imagefolder",
        "--data",
        tree,
        "--patch",
        "16",
        "--dim",
        "8",
        "--image-size",
        "64",
        "--out",
        out,
        "--set",
        "data.num_workers=0",
    )  # --patches 1,000,000
    assert res.returncode == 0, res.stderr
    assert time.perf_counter() - started < 20  # 160 patches, not a million
    said = " ".join(res.stdout.split())
    assert (
        "fitting on each of the 160 distinct patches (10 images x 16 positions on the 16-pixel grid) once, not on "
        "--patches 1,000,000"
        in said
        and "the fit is rank-deficient: 160 distinct patches for D = 768 dimensions; components beyond 160 are noise"
        in said
    )
    ck = load_checkpoint(out, "pca")
    assert ck.extra["n_patches"] == 160
    # the exact PCA of the 160 grid patches: their mean, and no variance beyond the 159 directions they span
    images = (
        torch.stack(
            [
                torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                for p in sorted((tree / "train").rglob("*.png"))
            ]
        ).double()
        / 127.5
        - 1
    )
    patches = patchify(images, 16).reshape(-1, 768)
    torch.testing.assert_close(ck.tensors["pca.mean"], patches.mean(0), rtol=0, atol=1e-6)  # fp32 pixels
    eigenvalues = ck.tensors["pca.eigenvalues"]
    assert eigenvalues[158] > 1e-4 and eigenvalues[159:].abs().max() < 1e-9

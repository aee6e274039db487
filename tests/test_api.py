"""`import ldae_cli as ldae`: a lazy, torch-free import; encoders from every source computing the same features;
features of folders, file lists and tensors; denoising as `ldae denoise` does it."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import train_tiny
from safetensors.torch import load_file, save_file

import ldae_cli as ldae
from ldae_cli import api
from ldae_cli.data.imagefiles import collect_images
from ldae_cli.data.pipeline import load_image_file, to_unit_range
from ldae_cli.errors import LdaeError
from ldae_cli.model.patches import patchify
from ldae_cli.model.pretrained import export_encoder, export_timm, load_pretrained


@pytest.fixture(scope="module")
def trained(pattern_tree, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api")
    ckpt = train_tiny(
        "final.yaml",
        pattern_tree,
        root / "pre",
        **{"tokenizer.patch": 4, "tokenizer.dim": 8, "model.encoder_depth": 2, "optim.epochs": 2},
    )
    return {
        "pretrain": ckpt,
        "encoder": export_encoder(ckpt, root / "enc.safetensors", t=20),
        "timm": export_timm(ckpt, root / "timm", t=20),
        "images": pattern_tree / "val",
    }


def test_import_does_not_import_torch():
    code = "import ldae_cli, sys; assert 'torch' not in sys.modules; print(ldae_cli.__version__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ldae.__version__


def test_the_api_names_are_documented_functions():
    assert set(api.__all__) <= set(ldae.__all__) and set(api.__all__) <= set(dir(ldae))
    for name in api.__all__:
        value = getattr(ldae, name)  # a submodule of the same name would shadow the function
        assert inspect.isfunction(value) and value is getattr(api, name), name
        assert value.__doc__ and len(value.__doc__) > 40, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = ldae.nope


def test_timm_folder_encoder_and_pretrain_give_the_same_features(trained):
    images = trained["images"]
    from_timm = ldae.load_encoder(trained["timm"])
    from_encoder = ldae.load_encoder(trained["encoder"])
    folded = ldae.load_encoder(trained["pretrain"], t=20)
    assert not from_timm.training and not folded.training
    reference = ldae.extract_features(folded, images)
    assert reference.shape == (16, 32) and reference.dtype == torch.float32
    for encoder in (from_timm, from_encoder):
        torch.testing.assert_close(ldae.extract_features(encoder, images), reference, atol=1e-5, rtol=1e-5)
    # and the adaLN network itself at the same t (final.yaml reads image patches)
    pre = load_pretrained(trained["pretrain"])
    x = to_unit_range(torch.stack([load_image_file(f, 32) for f in sorted(images.rglob("*.png"))]))
    with torch.no_grad():
        expected = pre.model.features(patchify(x, 4), torch.full((len(x),), 20)).mean(1)
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=1e-5)


def test_features_of_a_folder_files_and_tensors_agree(trained):
    encoder = ldae.load_encoder(trained["timm"])
    files = collect_images([trained["images"]])
    assert files == sorted(trained["images"].rglob("*.png"))  # sorted file order, recursively
    from_folder = ldae.extract_features(encoder, trained["images"], batch_size=5)  # batches of 5, 5, 5, 1
    from_files = ldae.extract_features(encoder, [str(f) for f in files[:3]])
    pixels = torch.stack([load_image_file(f, 32) for f in files])
    from_uint8 = ldae.extract_features(encoder, pixels)
    from_float = ldae.extract_features(encoder, to_unit_range(pixels), device="cpu")
    torch.testing.assert_close(from_folder[:3], from_files, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(from_uint8, from_folder, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(from_float, from_folder, atol=1e-6, rtol=1e-6)
    single = ldae.extract_features(encoder, pixels[0])
    torch.testing.assert_close(single, from_folder[:1], atol=1e-6, rtol=1e-6)


def test_feature_inputs_are_checked(trained, tmp_path):
    encoder = ldae.load_encoder(trained["timm"])
    (tmp_path / "empty").mkdir()
    cases = [
        (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "expected a (N, 3, 32, 32) batch"),
        (torch.full((1, 3, 32, 32), 255.0), "float values must lie in [-1, 1]"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.int64), "expected uint8 or float"),
        (tmp_path / "empty", "no images in this folder"),
        (tmp_path / "nope", "no such image or folder"),
    ]
    for images, message in cases:
        with pytest.raises(LdaeError) as caught:
            ldae.extract_features(encoder, images)
        assert message in str(caught.value)


def test_denoise_is_the_stages_and_its_noise_depends_only_on_seed_and_index(trained):
    pre = ldae.load_pretrained(trained["pretrain"])
    files = collect_images([trained["images"]])
    noisy, denoised = ldae.denoise(pre, trained["images"], sigma=0.5, seed=3)  # 16 images: one batch of 16
    assert noisy.shape == denoised.shape == (16, 3, 32, 32)
    clean = to_unit_range(torch.stack([load_image_file(f, 32) for f in files]))
    step = pre.timestep(sigma=0.5)
    ref_noisy, ref_denoised = pre.denoise(clean, step, 3)
    torch.testing.assert_close(noisy, ref_noisy)
    torch.testing.assert_close(denoised, ref_denoised)
    # a later image's noise does not depend on the images before it in the call
    tail_noisy, _ = ldae.denoise(pre, clean[8:], sigma=0.5, seed=3)
    head_noisy, _ = ldae.denoise(pre, clean[:8], sigma=0.5, seed=3)
    torch.testing.assert_close(head_noisy, noisy[:8])
    assert not torch.allclose(tail_noisy, noisy[8:])  # index 0 again: the first images' noise
    other, _ = ldae.denoise(pre, clean[:8], sigma=0.5, seed=4)
    assert not torch.allclose(other, noisy[:8])
    by_t, _ = ldae.denoise(pre, clean[:2], t=step, seed=3)
    torch.testing.assert_close(by_t, noisy[:2])


def test_load_encoder_refuses_damaged_and_foreign_timm_folders(trained, tmp_path):
    folder = tmp_path / "timm"
    folder.mkdir()
    (folder / "config.json").write_text((trained["timm"] / "config.json").read_text())
    state = load_file(trained["timm"] / "model.safetensors")
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(LdaeError, match="holds NaN or infinite values"):
        ldae.load_encoder(folder)
    config = json.loads((folder / "config.json").read_text())
    del config["model_args"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LdaeError, match="no model_args"):
        ldae.load_encoder(folder)
    (folder / "config.json").unlink()
    with pytest.raises(LdaeError, match="a folder without config.json;"):
        ldae.load_encoder(folder)
    with pytest.raises(LdaeError, match="exported with depth 2; export again with --depth 1"):
        ldae.load_encoder(trained["timm"], depth=1)


def test_a_timm_folder_records_its_source_for_provenance(trained):
    from ldae_cli.model.pretrained import load_encoder as load_with_source

    _, kwargs, source = load_with_source(trained["timm"])
    assert source.path == trained["timm"] / "model.safetensors" and source.kind == "encoder"
    assert source.extra["t"] == 20 and kwargs["depth"] == 2
    [parent] = source.provenance["parents"]
    assert parent["role"] == "pretrain" and parent["path"] == str(trained["pretrain"])
    ref = source.parent_ref("init")  # what a fine-tuning run records: the weights file and its sha256
    assert ref["path"] == str(trained["timm"] / "model.safetensors") and len(ref["sha256"]) == 64
    _, _, again = load_with_source(ref["path"])  # and it can be read back from there
    assert again.sha256 == source.sha256

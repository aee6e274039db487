"""The config system: YAML -> typed dataclasses, unknown keys, type errors, overrides, `base:` chains."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from ldae_cli.config import (
    BUNDLED_CONFIGS,
    config_from_dict,
    dump_yaml,
    find_config,
    load_config,
    parse_override,
    to_dict,
)
from ldae_cli.errors import LdaeError
from ldae_cli.stages.fit_pca import FitPCAConfig


@dataclass
class Optim:
    lr: float = 1e-3
    epochs: int = 10
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup: Optional[float] = None


@dataclass
class Toy:
    name: str = "toy"
    optim: Optim = field(default_factory=Optim)
    flag: bool = False


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(LdaeError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, "config errors must be one line"
    return msg


# --- unknown keys ---------------------------------------------------------------------------------


def test_unknown_top_level_key_names_it_and_the_closest_valid_key(tmp_path):
    cfg = write(tmp_path / "c.yaml", "dta:\n  source: cifar10\n")
    msg = error_of(load_config, FitPCAConfig, cfg)
    assert "'dta'" in msg and "did you mean 'data'" in msg


def test_unknown_nested_key_gives_dotted_path_and_closest_name(tmp_path):
    cfg = write(tmp_path / "c.yaml", "data:\n  sorce: cifar10\n")
    msg = error_of(load_config, FitPCAConfig, cfg)
    assert "'data.sorce'" in msg
    assert "'data.source'" in msg


def test_unknown_key_deeper_via_set_override():
    msg = error_of(load_config, Toy, None, ["optim.lrr=0.1"])
    assert "'optim.lrr'" in msg and "'optim.lr'" in msg


def test_unknown_key_without_close_match_lists_valid_keys():
    msg = error_of(load_config, FitPCAConfig, None, ["pca.zzzzzzzz=1"])
    assert "pca.zzzzzzzz" in msg
    for valid in ("patch", "dim", "patches", "patches_per_image", "batch_images", "seed"):
        assert valid in msg


# --- type errors --------------------------------------------------------------------------------


def test_type_error_names_key_and_expected_type():
    msg = error_of(load_config, FitPCAConfig, None, ["pca.patch=abc"])
    assert "pca.patch" in msg and "integer" in msg and "'abc'" in msg


def test_float_type_error_and_bool_type_error():
    assert "optim.lr" in error_of(load_config, Toy, None, ["optim.lr=fast"])
    assert "number" in error_of(load_config, Toy, None, ["optim.lr=fast"])
    msg = error_of(load_config, Toy, None, ["flag=maybe"])
    assert "flag" in msg and "true or false" in msg


def test_non_integral_float_for_int_is_rejected_integral_is_accepted():
    assert "optim.epochs" in error_of(load_config, Toy, None, ["optim.epochs=2.5"])
    cfg = load_config(Toy, None, ["optim.epochs=3.0"])
    assert cfg.optim.epochs == 3 and isinstance(cfg.optim.epochs, int)


def test_literal_choice_error_lists_valid_values_and_suggests():
    msg = error_of(load_config, FitPCAConfig, None, ["data.source=cifar"])
    assert "data.source" in msg
    for choice in ("'fashion-mnist'", "'cifar10'", "'imagefolder'", "'images'"):
        assert choice in msg
    assert "did you mean 'cifar10'" in msg
    msg = error_of(load_config, Toy, None, ["optim.schedule=linear"])
    assert "'cosine'" in msg and "'constant'" in msg and "'step'" in msg


def test_section_given_a_scalar_is_an_error(tmp_path):
    cfg = write(tmp_path / "c.yaml", "pca: 4\n")
    msg = error_of(load_config, FitPCAConfig, cfg)
    assert "pca" in msg and "mapping" in msg


def test_list_items_are_type_checked_with_index():
    msg = error_of(load_config, Toy, None, ["optim.betas=[0.9, high]"])
    assert "optim.betas[1]" in msg


def test_validate_hook_runs_on_loaded_values():
    msg = error_of(load_config, FitPCAConfig, None, ["pca.patch=4", "pca.dim=49"])
    assert "pca.dim" in msg and "48" in msg


# --- YAML number quirks -------------------------------------------------------------------------


def test_yaml_exponent_without_dot_becomes_float(tmp_path):
    # YAML 1.1 (PyYAML) reads `1e-4` as a *string*; a float field must still get the number
    cfg = write(tmp_path / "c.yaml", "optim:\n  lr: 1e-4\n  warmup: 5e-1\n  betas: [9e-1, 1]\n")
    toy = load_config(Toy, cfg)
    assert toy.optim.lr == pytest.approx(1e-4) and isinstance(toy.optim.lr, float)
    assert toy.optim.warmup == pytest.approx(0.5) and isinstance(toy.optim.warmup, float)
    assert toy.optim.betas == [0.9, 1.0] and all(isinstance(b, float) for b in toy.optim.betas)
    toy = load_config(Toy, None, ["optim.lr=3e-4"])
    assert toy.optim.lr == pytest.approx(3e-4) and isinstance(toy.optim.lr, float)


def test_optional_accepts_null():
    toy = load_config(Toy, None, ["optim.warmup=2"])
    assert toy.optim.warmup == 2.0
    assert load_config(Toy, None, ["optim.warmup=null"]).optim.warmup is None


# --- precedence ---------------------------------------------------------------------------------


def test_set_overrides_beat_flags_beat_file_beat_defaults(tmp_path):
    cfg = write(tmp_path / "c.yaml", "pca:\n  patch: 4\n  dim: 8\n  seed: 3\n")
    loaded = load_config(FitPCAConfig, cfg, ["pca.dim=12"], {"pca.patch": 8, "pca.dim": 10, "out": None})
    assert loaded.pca.patch == 8  # flag beats file
    assert loaded.pca.dim == 12  # --set beats flag and file
    assert loaded.pca.seed == 3  # file beats default
    assert loaded.pca.patches == 1_000_000  # default
    assert loaded.out is None  # a flag given as None changes nothing


def test_later_set_wins_and_values_are_parsed_as_yaml():
    cfg = load_config(Toy, None, ["optim.epochs=5", "optim.epochs=7", "flag=true", "name=null-ish"])
    assert cfg.optim.epochs == 7 and cfg.flag is True and cfg.name == "null-ish"


def test_malformed_set_is_a_clear_error():
    assert "KEY=VALUE" in error_of(parse_override, "pca.patch")
    assert "empty" in error_of(parse_override, "=3")
    msg = error_of(load_config, FitPCAConfig, None, ["pca.patch.x=3"])
    assert "pca.patch" in msg


# --- base: inheritance --------------------------------------------------------------------------


def test_base_inheritance_merges_sections(tmp_path):
    write(tmp_path / "base.yaml", "data:\n  source: cifar10\n  image_size: 32\npca:\n  patch: 8\n  dim: 16\n")
    child = write(tmp_path / "rows" / "child.yaml", "base: ../base.yaml\npca:\n  dim: 32\n")
    cfg = load_config(FitPCAConfig, child)
    assert (cfg.data.source, cfg.data.image_size, cfg.pca.patch, cfg.pca.dim) == ("cifar10", 32, 8, 32)


def test_base_chain_of_three_and_set_on_top(tmp_path):
    write(tmp_path / "a.yaml", "pca:\n  patch: 8\n  dim: 4\n  seed: 1\n")
    write(tmp_path / "b.yaml", "base: a.yaml\npca:\n  dim: 8\n")
    c = write(tmp_path / "c.yaml", "base: b.yaml\npca:\n  seed: 2\n")
    cfg = load_config(FitPCAConfig, c, ["pca.seed=5"])
    assert (cfg.pca.patch, cfg.pca.dim, cfg.pca.seed) == (8, 8, 5)


def test_base_by_bundled_name(tmp_path):
    child = write(tmp_path / "child.yaml", "base: fmnist-pca\npca:\n  dim: 8\n")
    cfg = load_config(FitPCAConfig, child)
    assert cfg.data.source == "fashion-mnist" and cfg.pca.patch == 4 and cfg.pca.dim == 8


def test_base_loop_is_detected(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    b = write(tmp_path / "b.yaml", "base: a.yaml\n")
    assert "loops" in error_of(load_config, FitPCAConfig, b)


def test_unknown_key_in_base_file_is_reported(tmp_path):
    write(tmp_path / "base.yaml", "pca:\n  dimm: 3\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\n")
    msg = error_of(load_config, FitPCAConfig, child)
    assert "'pca.dimm'" in msg and "'pca.dim'" in msg


# --- finding configs ----------------------------------------------------------------------------


def test_find_config_by_bare_name_and_relative_name():
    expected = (BUNDLED_CONFIGS / "demo" / "fmnist-pca.yaml").resolve()
    assert find_config("fmnist-pca").resolve() == expected
    assert find_config("fmnist-pca.yaml").resolve() == expected
    assert find_config("demo/fmnist-pca").resolve() == expected
    cfg = load_config(FitPCAConfig, "fmnist-pca")
    assert cfg.pca.patch == 4 and cfg.pca.dim == 8 and cfg.data.source == "fashion-mnist"


def test_find_config_unknown_name_is_a_clear_error():
    msg = error_of(find_config, "no-such-config-xyz")
    assert "no-such-config-xyz" in msg and "not found" in msg


def test_find_config_does_not_return_a_directory():
    # configs/demo is a folder, not a config: it must be "not found", not an IsADirectoryError later
    msg = error_of(load_config, FitPCAConfig, "demo")
    assert "not found" in msg


def test_find_config_searches_LDAE_CONFIGS(tmp_path, monkeypatch):
    write(tmp_path / "mine" / "sub" / "my-run.yaml", "pca:\n  dim: 5\n")
    monkeypatch.setenv("LDAE_CONFIGS", str(tmp_path / "mine"))
    assert find_config("my-run") == tmp_path / "mine" / "sub" / "my-run.yaml"
    assert load_config(FitPCAConfig, "my-run").pca.dim == 5


def test_ambiguous_bare_name_is_an_error(tmp_path, monkeypatch):
    write(tmp_path / "mine" / "x" / "dup.yaml", "{}\n")
    write(tmp_path / "mine" / "y" / "dup.yaml", "{}\n")
    monkeypatch.setenv("LDAE_CONFIGS", str(tmp_path / "mine"))
    msg = error_of(find_config, "dup")
    assert "ambiguous" in msg and "x/dup.yaml" in msg and "y/dup.yaml" in msg


def test_invalid_yaml_names_the_line(tmp_path):
    cfg = write(tmp_path / "bad.yaml", "pca:\n  patch: 4\n  dim: [1, 2\n")
    msg = error_of(load_config, FitPCAConfig, cfg)
    assert "bad.yaml" in msg and "not valid YAML" in msg and "line" in msg


def test_non_mapping_yaml_is_rejected(tmp_path):
    cfg = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    assert "mapping" in error_of(load_config, FitPCAConfig, cfg)


# --- round trips --------------------------------------------------------------------------------


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(FitPCAConfig, "fmnist-pca", ["data.crop_scale=[0.5, 1.0]", "out=x.safetensors"])
    (tmp_path / "resolved.yaml").write_text(dump_yaml(cfg))
    again = load_config(FitPCAConfig, tmp_path / "resolved.yaml")
    assert again == cfg
    assert config_from_dict(FitPCAConfig, to_dict(cfg)) == cfg

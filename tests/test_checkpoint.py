"""The checkpoint format: safetensors + ldae metadata, atomic writes, one-line errors for bad files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ldae_cli.runs.checkpoint as ckpt_mod
from ldae_cli.errors import LdaeError
from ldae_cli.runs.checkpoint import (
    FORMAT_VERSION,
    flatten_optimizer,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
    sha256_file,
    unflatten_optimizer,
)

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "ldae_cli"


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.w": torch.randn(5, 7, generator=g),
        "model.b": torch.randn(7, generator=g).double(),
        "model.idx": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "model.half": torch.randn(3, generator=g).half(),
        "pca.mean": torch.randn(4, generator=g),
    }


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(LdaeError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def saved(tmp_path) -> Path:
    return save_checkpoint(tmp_path / "a.safetensors", "pca", tensors(), {"pca": {"patch": 4}}, extra={"dim": 16})


def test_round_trip_everything(tmp_path):
    parent = save_checkpoint(tmp_path / "parent.safetensors", "pca", tensors(1), {"p": 1})
    parent_ckpt = load_checkpoint(parent)
    config = {"model": {"width": 128, "depth": [4, 4]}, "optim": {"lr": 1e-4, "name": "adamw"}, "flag": None}
    extra = {"step": 123, "metrics": {"loss": 0.25}, "note": "héllo"}
    path = save_checkpoint(
        tmp_path / "sub" / "child.safetensors",
        "pretrain",
        tensors(),
        config,
        parents=[parent_ckpt.parent_ref("tokenizer")],
        extra=extra,
    )
    ck = load_checkpoint(path, kind="pretrain")
    assert ck.kind == "pretrain" and ck.format_version == FORMAT_VERSION and ck.package_version
    assert ck.config == config and ck.extra == extra
    assert ck.sha256 == sha256_file(path) and re.fullmatch(r"[0-9a-f]{64}", ck.sha256)
    (ref,) = ck.provenance["parents"]
    assert ref == {"role": "tokenizer", "path": str(parent), "sha256": sha256_file(parent), "kind": "pca"}
    for key in ("created", "command", "python", "torch"):
        assert key in ck.provenance
    original = tensors()
    assert set(ck.tensors) == set(original)
    for k, v in original.items():
        assert ck.tensors[k].dtype == v.dtype and ck.tensors[k].shape == v.shape
        assert torch.equal(ck.tensors[k], v)
    assert set(ck.section("model")) == {"w", "b", "idx", "half"}
    assert torch.equal(ck.section("pca")["mean"], original["pca.mean"])
    meta = read_metadata(path)
    assert meta["kind"] == "pretrain" and meta["config"] == config


def test_non_contiguous_and_shared_tensors_are_saved(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    t = {"a": base, "tied": base, "view": base.T, "row": base[1]}
    path = save_checkpoint(tmp_path / "t.safetensors", "probe", t, {})
    ck = load_checkpoint(path)
    assert torch.equal(ck.tensors["a"], base) and torch.equal(ck.tensors["tied"], base)
    assert torch.equal(ck.tensors["view"], base.T) and torch.equal(ck.tensors["row"], base[1])


def test_wrong_kind_names_file_and_both_kinds(saved):
    msg = one_line_error(load_checkpoint, saved, kind="pretrain")
    assert str(saved) in msg and "'pca'" in msg and "'pretrain'" in msg
    msg = one_line_error(load_checkpoint, saved, kind=("probe", "finetune"))
    assert "'probe'" in msg and "'finetune'" in msg and "'pca'" in msg
    assert load_checkpoint(saved, kind=("pretrain", "pca")).kind == "pca"


def test_unknown_kind_refused_on_save(tmp_path):
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "x.safetensors", "weights", tensors(), {})


def test_truncated_data_is_one_line_error(saved, tmp_path):
    data = saved.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    msg = one_line_error(load_checkpoint, cut)
    assert str(cut) in msg and "truncated" in msg
    # the metadata alone is readable, but loading is refused (it would fail inside safetensors)
    msg = one_line_error(read_metadata, cut)
    assert "truncated" in msg


def test_truncated_inside_header_is_one_line_error(saved, tmp_path):
    data = saved.read_bytes()
    (n,) = np.frombuffer(data[:8], dtype="<u8")
    assert n > 40
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: 8 + int(n) // 2])
    msg = one_line_error(load_checkpoint, cut)
    assert str(cut) in msg and "truncated" in msg
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(data[:5])
    msg = one_line_error(load_checkpoint, tiny)
    assert "not an ldae checkpoint" in msg and "too short" in msg


def test_random_bytes_is_not_an_ldae_checkpoint(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    msg = one_line_error(load_checkpoint, junk)
    assert str(junk) in msg and "not an ldae checkpoint" in msg
    # a small header length pointing at non-JSON bytes
    bad_json = tmp_path / "badjson.safetensors"
    bad_json.write_bytes(np.uint64(16).tobytes() + b"\xff\xfe not json at all" + b"\0" * 32)
    assert "not an ldae checkpoint" in one_line_error(load_checkpoint, bad_json)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert "not an ldae checkpoint" in one_line_error(load_checkpoint, empty)


def test_plain_safetensors_without_ldae_metadata(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(3)}, str(plain), metadata={"format": "pt"})
    msg = one_line_error(load_checkpoint, plain)
    assert str(plain) in msg and "without ldae metadata" in msg and "not an ldae checkpoint" in msg
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.ones(3)}, str(bare))
    assert "without ldae metadata" in one_line_error(read_metadata, bare)


def test_newer_format_version_is_refused(tmp_path):
    newer = tmp_path / "newer.safetensors"
    save_file({"w": torch.ones(3)}, str(newer), metadata={"ldae.kind": "pca", "ldae.format_version": "99"})
    msg = one_line_error(load_checkpoint, newer)
    assert "format version 99" in msg and "upgrade" in msg


def test_damaged_metadata_json(tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file(
        {"w": torch.ones(3)},
        str(bad),
        metadata={"ldae.kind": "pca", "ldae.format_version": "1", "ldae.config": "{not json"},
    )
    assert "metadata is damaged" in one_line_error(load_checkpoint, bad)


def test_missing_file_and_directory(tmp_path):
    assert "not found" in one_line_error(load_checkpoint, tmp_path / "nope.safetensors")
    assert "directory" in one_line_error(load_checkpoint, tmp_path)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    out = tmp_path / "run"
    for i in range(3):
        save_checkpoint(out / "ck.safetensors", "pretrain", tensors(i), {"i": i})
    assert sorted(p.name for p in out.iterdir()) == ["ck.safetensors"]
    assert load_checkpoint(out / "ck.safetensors").config == {"i": 2}


def test_interrupted_write_keeps_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "ck.safetensors", "pretrain", tensors(0), {"v": "old"})
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")  # something partial reached the temp file
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, "pretrain", tensors(1), {"v": "new"})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.safetensors"]
    assert load_checkpoint(path).config == {"v": "old"}


def _model_and_opt(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.05)
    return model, opt


def _step(model, opt, seed: int):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def test_optimizer_state_round_trip_gives_identical_steps(tmp_path):
    model, opt = _model_and_opt(0)
    for s in range(3):
        _step(model, opt, s)
    opt_tensors, rest = flatten_optimizer(opt.state_dict())
    model_tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    path = save_checkpoint(
        tmp_path / "ck.safetensors",
        "pretrain",
        {**model_tensors, **{f"optim.{k}": v for k, v in opt_tensors.items()}},
        {},
        extra={"optim": rest},
    )
    # continue the original for two more steps
    for s in range(3, 5):
        _step(model, opt, s)

    ck = load_checkpoint(path, "pretrain")
    model2, opt2 = _model_and_opt(123)  # different init: everything must come from the checkpoint
    model2.load_state_dict(ck.section("model"))
    restored = unflatten_optimizer(ck.section("optim"), ck.extra["optim"])
    original = opt.state_dict()
    assert restored["state"].keys() == original["state"].keys()
    for idx in original["state"]:
        assert restored["state"][idx].keys() == original["state"][idx].keys()
    opt2.load_state_dict(restored)
    assert opt2.state_dict()["param_groups"][0]["betas"][0] == 0.8
    for s in range(3, 5):
        _step(model2, opt2, s)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for idx in sa:
        assert sa[idx].keys() == sb[idx].keys()
        for key in sa[idx]:
            assert torch.equal(torch.as_tensor(sa[idx][key]), torch.as_tensor(sb[idx][key]))


def test_optimizer_non_tensor_state_survives(tmp_path):
    state = {
        "state": {0: {"step": 7, "momentum_buffer": torch.ones(2)}, 1: {"step": 3}},
        "param_groups": [{"lr": 0.1, "params": [0, 1]}],
    }
    t, rest = flatten_optimizer(state)
    rest = json.loads(json.dumps(rest))  # it is stored as JSON metadata
    back = unflatten_optimizer(t, rest)
    assert back["state"][0]["step"] == 7 and back["state"][1]["step"] == 3
    assert torch.equal(back["state"][0]["momentum_buffer"], torch.ones(2))
    assert back["param_groups"] == state["param_groups"]


def test_project_never_uses_pickle():
    offenders = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bpickle\b|torch\.load\(|torch\.save\(|\bdill\b|cloudpickle", line):
                offenders.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{lineno}: {line.strip()}")
    assert not offenders, "pickle-based serialization found:\n" + "\n".join(offenders)
    assert len(list(PACKAGE_DIR.rglob("*.py"))) >= 10

"""The `ldae` command line as a user meets it: help, one-line errors, --debug tracebacks."""

from __future__ import annotations

import pytest
from helpers import run_cli

SUBCOMMANDS = ("fit-pca", "train-tokenizer", "pretrain", "probe", "finetune", "detect", "denoise")


def assert_one_line_error(res, *fragments: str) -> str:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = res.stderr.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{res.stderr}"
    assert lines[0].startswith("error: ")
    for frag in fragments:
        assert frag in lines[0], f"{frag!r} not in {lines[0]!r}"
    return lines[0]


def test_help_lists_all_subcommands():
    res = run_cli("--help")
    assert res.returncode == 0
    for name in SUBCOMMANDS:
        assert name in res.stdout
    assert run_cli().returncode in (0, 2)  # no arguments: help, not a crash
    assert "Traceback" not in run_cli().stderr


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(run_main, name):
    res = run_main(name, "--help")
    assert res.returncode == 0, res.stderr
    assert "Usage" in res.stdout and name in res.stdout
    if name != "denoise":
        assert "--config" in res.stdout


def test_fit_pca_help_shows_its_options():
    out = run_cli("fit-pca", "-h").stdout
    for opt in ("--patch", "--dim", "--patches", "--image-size", "--out", "--data", "--source", "--set"):
        assert opt in out


def test_help_shows_the_defaults_it_names():
    # rich reads "[default: ...]" inside a help text as markup and drops it; the text must survive
    out = " ".join(run_cli("denoise", "-h").stdout.split())
    assert "(default: the newest pretrain checkpoint anywhere under runs/)" in out and "(default: if present)" in out
    assert "(default: 0)" in out and "[default:" not in out  # one style for literal and config-backed defaults
    assert "(default: 16)" in " ".join(run_cli("fit-pca", "-h").stdout.split())


def test_help_defaults_are_the_configs_defaults():
    # cli.py names these defaults in its help without importing torch-heavy modules; keep them in step
    from ldae_cli.model.pca import PCAConfig
    from ldae_cli.model.pretrained import DEFAULT_T
    from ldae_cli.stages.prepare_data import PrepareConfig

    fit = " ".join(run_cli("fit-pca", "-h").stdout.split())
    s = PCAConfig()
    for option, value in (
        ("Patch size p (D = p*p*3).", s.patch),
        ("Kept components d.", s.dim),
        ("Random patches to sample.", s.patches),
    ):
        assert f"{option} (default: {value})" in fit
    assert f"(default: {PrepareConfig().margin:g})" in " ".join(run_cli("prepare-data", "-h").stdout.split())
    assert f"folded at. (default: {DEFAULT_T})" in " ".join(run_cli("probe", "-h").stdout.split())


def test_version():
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("ldae ")


def test_config_type_error_is_one_line(tmp_path):
    # through a real interpreter, exactly as a user runs it
    res = run_cli("fit-pca", "--set", "pca.patch=abc", cwd=tmp_path)
    assert_one_line_error(res, "pca.patch", "integer")
    assert res.returncode == 1
    assert res.stdout == ""


def test_unknown_key_is_one_line_with_suggestion(run_main):
    res = run_main("fit-pca", "--set", "pca.ptch=3")
    assert_one_line_error(res, "pca.ptch", "did you mean 'pca.patch'")


def test_bracketed_text_in_messages_survives(run_main):
    # messages go through rich: text like "[min, max]" must be printed, not taken for markup
    res = run_main("fit-pca", "--set", "data.crop_scale=[0.5]")
    assert_one_line_error(res, "data.crop_scale", "[min, max]", "[0.5]")


def test_missing_config_file_is_one_line(run_main):
    res = run_main("fit-pca", "--config", "no-such-config")
    assert_one_line_error(res, "no-such-config", "not found")


def test_missing_dataset_is_one_line(run_main, tmp_path):
    res = run_main("fit-pca", "--source", "imagefolder", "--data", tmp_path / "nope", "--patch", "4")
    assert_one_line_error(res, "dataset not found", str(tmp_path / "nope"))


def test_wrong_file_as_dataset_is_one_line(run_main, tmp_path):
    # a checkpoint passed where a data folder or archive is expected
    out = tmp_path / "pca.safetensors"
    out.write_bytes(b"\x10" + b"\0" * 63)
    res = run_main("fit-pca", "--source", "imagefolder", "--data", out, "--patch", "2", "--dim", "4")
    line = assert_one_line_error(res, str(out))
    assert "archive" in line


def test_unexpected_exception_is_one_line_and_debug_reraises(run_main, monkeypatch):
    # a bug (not an LdaeError) still prints one line naming the exception, and --debug shows it all
    from ldae_cli.stages import fit_pca

    def boom(*args, **kwargs):
        raise RuntimeError("internal failure [x]\nsecond line")

    monkeypatch.setattr(fit_pca, "load_config", boom)
    res = run_main("fit-pca", "--patch", "4", "--dim", "4", "--source", "imagefolder")
    assert_one_line_error(res, "RuntimeError", "internal failure [x]", "--debug")
    with pytest.raises(RuntimeError):
        run_main("--debug", "fit-pca", "--patch", "4", "--dim", "4", "--source", "imagefolder")


@pytest.mark.parametrize("name", ["train-tokenizer", "probe", "finetune", "detect"])
def test_other_stages_fail_in_one_line_on_a_bad_key(run_main, name):
    # whether or not a stage is built yet, a bad invocation must not dump a traceback
    res = run_main(name, "--set", "no_such_key_anywhere=1")
    assert_one_line_error(res)


def test_debug_shows_the_traceback(tmp_path):
    res = run_cli("--debug", "fit-pca", "--set", "pca.patch=abc", cwd=tmp_path)
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "LdaeError" in res.stderr and "pca.patch" in res.stderr


def test_usage_errors_exit_non_zero_without_traceback(run_main):
    res = run_main("fit-pca", "--no-such-flag")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "--no-such-flag" in res.stderr
    res = run_main("no-such-command")
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_ldae_console_script_is_installed():
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "ldae"
    exe = str(exe) if exe.exists() else shutil.which("ldae")
    if exe is None:
        pytest.skip("the `ldae` console script is not installed in this environment")
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "fit-pca" in res.stdout

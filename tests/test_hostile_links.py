"""Reliability matrix, part three: links, FIFOs, devices and damaged bookkeeping where ldae keeps its own files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from helpers import one_line, pretrain_args, snapshot, unchanged

from ldae_cli.runs.rundir import CONFIG, LOCK, MARKER, METRICS, remove_entry

USER_TEXT = b"the user's own words\n"


@contextlib.contextmanager
def deadline(seconds: int = 60):
    """Fail instead of hanging: a FIFO opened for writing with no reader blocks forever."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s (blocked on a FIFO?)")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def user_file(tmp_path: Path) -> Path:
    folder = tmp_path / "user"
    folder.mkdir(exist_ok=True)
    (folder / "thesis.txt").write_bytes(USER_TEXT)
    return folder / "thesis.txt"


def replace(path: Path, make) -> None:
    """Put `make(path)` (a link, FIFO, folder, device, file) where ldae's entry `path` is."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    make(path)


def link_to_user_file(tmp_path):
    return lambda p: p.symlink_to(user_file(tmp_path))


def fifo(p: Path) -> None:
    os.mkfifo(p)


def device(p: Path) -> None:
    try:
        os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers: what is written vanishes
    except PermissionError:
        pytest.skip("making a device node needs root")


def lock_naming(pid):
    return lambda p: p.write_text(
        json.dumps(
            {"pid": pid, "host": socket.gethostname(), "command": "ldae pretrain", "since": "2026-01-01T10:00:00"}
        )
    )


def pid1_is_unrelated() -> bool:
    try:
        command = Path("/proc/1/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return False
    return "ldae" not in command and not Path(command).name.startswith("python")


def resume(world, run):
    return ["pretrain", "--resume", str(run)]


def force(world, run):
    return [*pretrain_args(world, run, **{"tokenizer.path": world.pca}), "--force"]


# (id, entry of the copied unfinished run, what is put there, the command, fragments of its one line, category)
CASES = [
    ("metrics-link", METRICS, link_to_user_file, resume, ("metrics.jsonl is a symbolic link",), "data-loss"),
    ("loss-png-link", "loss.png", link_to_user_file, resume, ("loss.png is a symbolic link",), "data-loss"),
    ("lock-link", LOCK, link_to_user_file, resume, (".ldae.lock is a symbolic link",), "data-loss"),
    (
        "tensorboard-link",
        "tensorboard",
        lambda t: lambda p: p.symlink_to(user_file(t).parent, target_is_directory=True),
        resume,
        ("tensorboard is a symbolic link, not the folder ldae keeps there",),
        "data-loss",
    ),
    ("config-link", CONFIG, link_to_user_file, resume, ("ldae-config.yaml is a symbolic link",), "data-loss"),
    (
        "marker-garbage",
        MARKER,
        lambda t: lambda p: p.write_bytes(b"\x00\xffnot json"),
        force,
        (
            ".ldae-run.json, the marker of what ldae wrote",
            "is damaged (not valid JSON",
            "delete it if",
            "move the folder away",
        ),
        "generic",
    ),
    (
        "marker-truncated",
        MARKER,
        lambda t: lambda p: p.write_text('{"format": 1, "run_id": "ab'),
        resume,
        ("is damaged (not valid JSON, e.g. truncated)", "delete it if"),
        "generic",
    ),
    (
        "marker-directory",
        MARKER,
        lambda t: lambda p: p.mkdir(),
        force,
        ("is damaged (a folder, not a file)", "delete it if"),
        "generic",
    ),
    (
        "lock-directory",
        LOCK,
        lambda t: lambda p: p.mkdir(),
        resume,
        (".ldae.lock is a folder, not the file",),
        "generic",
    ),
    ("lock-fifo", LOCK, lambda t: fifo, resume, (".ldae.lock is a FIFO",), "generic"),
    (
        "lock-pid-2**40",
        LOCK,
        lambda t: lock_naming(2**40),
        resume,
        (f"names pid {2**40}, which no process can have", "delete"),
        "silent-wrong",
    ),
    (
        "lock-pid-negative",
        LOCK,
        lambda t: lock_naming(-5),
        resume,
        ("names pid -5, which no process can have",),
        "silent-wrong",
    ),
    (
        "lock-pid-1",
        LOCK,
        lambda t: lock_naming(1),
        resume,
        ("names pid 1, which is a live process but not an ldae run", "delete"),
        "silent-wrong",
    ),
    # cases of our own
    (
        "metrics-dangling-link",
        METRICS,
        lambda t: lambda p: p.symlink_to(t / "user" / "new.txt"),
        resume,
        ("metrics.jsonl is a symbolic link",),
        "data-loss",
    ),  # O_CREAT through it would make a file of the user's
    ("metrics-fifo", METRICS, lambda t: fifo, resume, ("metrics.jsonl is a FIFO",), "generic"),  # append blocked
    ("metrics-device", METRICS, lambda t: device, resume, ("metrics.jsonl is a device",), "silent-wrong"),
    ("lock-device", LOCK, lambda t: device, resume, (".ldae.lock is a device",), "generic"),
    ("pca-link", "pca.safetensors", link_to_user_file, resume, ("pca.safetensors is a symbolic link",), "data-loss"),
    (
        "marker-link-to-another-runs",
        MARKER,
        lambda t: lambda p: p.symlink_to(t / "other" / MARKER),
        force,
        ("is damaged (a symbolic link, not a file)",),
        "data-loss",
    ),  # its manifest would say what --force deletes
]


@pytest.mark.parametrize("name,entry,make,command,fragments,category", CASES, ids=[c[0] for c in CASES])
def test_a_hostile_entry_in_a_run_is_named_before_anything_is_written(
    name, entry, make, command, fragments, category, world, run_main, tmp_path
):
    if name == "lock-pid-1" and not pid1_is_unrelated():
        pytest.skip("pid 1 here is not readable or is a Python process")
    run = tmp_path / "run"
    shutil.copytree(world.cut.parent, run)
    shutil.copytree(world.cut.parent, tmp_path / "other")
    assert entry == LOCK or (run / entry).exists()  # ldae's own entry, which the case replaces
    replace(run / entry, make(tmp_path))
    before = snapshot(tmp_path, world.root)
    with deadline():
        line = one_line(run_main(*command(world, run)), 1, str(run / entry), *fragments)
    assert "ldae did not write" not in line
    unchanged(before)
    assert not (tmp_path / "user" / "new.txt").exists()
    if (tmp_path / "user").exists():
        assert (tmp_path / "user" / "thesis.txt").read_bytes() == USER_TEXT


def test_a_lock_naming_a_live_process_that_is_not_ldae_says_so(world, run_main, tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        run = shutil.copytree(world.cut.parent, tmp_path / "run")
        lock_naming(sleeper.pid)(run / LOCK)
        before = snapshot(tmp_path, world.root)
        one_line(
            run_main("pretrain", "--resume", str(run)),
            1,
            f"names pid {sleeper.pid}, which is a live process but not an ldae run (sleep)",
            f"delete {run / LOCK} if no ldae run uses {run}",
        )
        unchanged(before)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_force_keeps_a_users_file_in_a_folder_ldae_lists(world, run_main, tmp_path):
    run = shutil.copytree(world.ckpt.parent, tmp_path / "run")
    (run / "tensorboard" / "notes.txt").write_bytes(USER_TEXT)
    before = snapshot(tmp_path, world.root)
    line = one_line(run_main(*force(world, run)), 1, "tensorboard/notes.txt", "ldae did not write")
    assert "--force replaces only what ldae wrote" in line
    unchanged(before)
    # the mechanism itself: a listed folder is emptied of what ldae writes there, never removed whole
    assert any(p.name.startswith("events.out.tfevents.") for p in (run / "tensorboard").iterdir())
    remove_entry(run / "tensorboard")
    assert sorted(p.name for p in (run / "tensorboard").iterdir()) == ["notes.txt"]
    assert (run / "tensorboard" / "notes.txt").read_bytes() == USER_TEXT


def test_force_removes_a_link_to_a_users_file_as_a_link(world, run_main, tmp_path):
    run = shutil.copytree(world.ckpt.parent, tmp_path / "run")
    replace(run / METRICS, link_to_user_file(tmp_path))
    before = snapshot(tmp_path / "user")
    assert run_main(*force(world, run)).returncode == 0
    unchanged(before)
    assert not (run / METRICS).is_symlink() and (run / METRICS).stat().st_size > 0


@pytest.mark.parametrize(
    "entry,code,fragment", [(LOCK, 0, None), (METRICS, 1, "metrics.jsonl is a FIFO")], ids=["lock-fifo", "metrics-fifo"]
)
def test_info_never_blocks_on_a_fifo(entry, code, fragment, world, run_main, tmp_path):
    run = shutil.copytree(world.ckpt.parent, tmp_path / "run")
    replace(run / entry, fifo)
    before = snapshot(tmp_path)
    with deadline(30):
        res = run_main("info", str(run))
    if fragment is None:
        assert res.returncode == 0, res.stderr
    else:
        one_line(res, code, str(run / entry), fragment)
    unchanged(before)

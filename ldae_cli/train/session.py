"""The run settings every stage shares and the session a stage runs in: how its config is loaded or
continued, its process group, its run directory.

A stage opens a `session` for its run: the distributed context (torchrun or a world of one) and the
run directory (a resumed run's own, else run.out_dir or runs/<kind>/<name>), locked for this run, marked
as ldae's with the manifest of what it writes, and holding the resolved config (ldae-config.yaml;
ownership rules: rundir.py). A start that fails before its first step removes what it wrote (and the
directory, when it made it); the same command starts again a run killed before its first checkpoint.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, Protocol, TypeVar

import yaml

from ldae_cli.config import dump_yaml, load_config, to_dict
from ldae_cli.data.discovery import detect, settle_data
from ldae_cli.data.pipeline import DataConfig, resolve_image_size
from ldae_cli.errors import Finished, LdaeError
from ldae_cli.runs import rundir
from ldae_cli.runs.checkpoint import Checkpoint, load_checkpoint, sha256_file, stored_config
from ldae_cli.runs.distributed import DistContext, init, shutdown
from ldae_cli.runs.logs import console, note_kept
from ldae_cli.runs.rundir import CHECKPOINT
from ldae_cli.settings.training import RunConfig

# keys a resumed run may change: where things are and how they are run, not what is computed; stages add theirs
RESUMABLE = (
    "data.path",
    "data.num_workers",
    "data.cache",
    "data.verify",
    "data.on_bad_image",
    "run.device",
    "run.compile",
    "run.log_every",
    "run.save_every",
    "run.time_limit_minutes",
    "run.stop_after_steps",
    "run.progress",
    "run.out_dir",
    "run.tensorboard",
    "run.wandb",
)


def resume_path(resume: str) -> Path:
    """--resume takes a run directory or its checkpoint file."""
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise LdaeError(f"--resume {resume}: no checkpoint there (expected a run directory holding {CHECKPOINT})")
    return path


def resume_base(stored: dict) -> dict:
    """The stored config to continue from, minus the limits of the interrupted invocation (give them again) and
    its directory (a resumed run writes where its checkpoint is now, wherever the stored config says it was)."""
    return {
        **stored,
        "run": {**stored.get("run", {}), "stop_after_steps": None, "time_limit_minutes": None, "out_dir": None},
    }


def config_differences(stored: dict, current: dict, allowed: tuple[str, ...]) -> list[str]:
    """`key: stored -> current` for each key that differs and is not in `allowed` (dotted prefixes)."""

    def flat(d, prefix=""):
        out: dict[str, Any] = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
        return out

    a, b = flat(stored), flat(current)
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not k.startswith(allowed)
    ]


def check_resume_config(stored: dict, current: dict, allowed: tuple[str, ...]) -> None:
    """A resumed run must continue the same recipe; only keys in `allowed` (paths, devices, logging) may change."""
    changed = config_differences(stored, current, allowed)
    if changed:
        raise LdaeError(
            f"--resume continues the stored run, but the config differs ({', '.join(changed[:4])}); resume "
            f"without changing the recipe (only {', '.join(allowed)} may change) or start a new run "
            "directory"
        )


def load_run_config(
    cls: type,
    kind: str,
    config: str | None,
    overrides: list[str],
    flags: dict[str, Any],
    resume: str | None,
    resumable: tuple[str, ...] = (),
    cont: bool = False,
    base: dict | None = None,
    adjust: Callable[[Any], None] | None = None,
) -> tuple[Any, Checkpoint | None]:
    """The config to run and, with --resume, the run's checkpoint: its stored recipe, of which only the
    RESUMABLE keys (and the stage's `resumable` ones) may change. With --continue (`cont`), the config of the
    command line, and the checkpoint in its --out when there is one, which must hold that same recipe. A new run's
    config: defaults < `base` (e.g. the checkpoint a probe reads) < config file < flags < --set, its data resolved."""
    if resume is not None and cont:
        raise LdaeError(
            "--resume continues a run directory and --continue starts or continues the run in --out; give one of them"
        )
    if resume is None:
        cfg = load_config(cls, config, overrides, flags, base=base)
        resolve_data(cfg)
        if adjust is not None:  # settings a new run takes from the files it names (e.g. a PCA's patch size)
            adjust(cfg)
        return cfg, (continued(cls, kind, cfg, RESUMABLE + resumable) if cont else None)
    ckpt = load_resumable(resume_path(resume), kind, cls)
    cfg = load_config(cls, config, overrides, flags, base=resume_base(ckpt.config))
    resolve_data(cfg, resuming=True)
    check_resume_config(recipe(cls, ckpt), to_dict(cfg), RESUMABLE + resumable)
    return cfg, ckpt


def resolve_data(cfg: Any, resuming: bool = False) -> None:
    """A new run's data settled before any work (DataConfig.resolve), what was found said on one rank. A resumed
    run keeps its stored settings: only a --data given again is looked at, for its kind."""
    data = getattr(cfg, "data", None)
    if not isinstance(data, DataConfig):
        return
    if resuming:
        if data.source == "auto":
            data.source = detect(data.path, data.train_split).source
        return
    for note in settle_data(data):
        if os.environ.get("RANK", "0") == "0":
            console.print(note)


def recipe(cls: type, ckpt: Checkpoint) -> dict:
    """The stored config with the defaults of keys added since it was written (which ran as their defaults do)."""
    return to_dict(stored_config(cls, ckpt))


def settle_image_size(data: DataConfig, patch: int) -> None:
    """A new run's image size (data.resolve_image_size, null: the images' own in `patch` steps), said on one rank."""
    for note in resolve_image_size(data, patch):
        if os.environ.get("RANK", "0") == "0":
            console.print(note)


def load_resumable(path: Path, kind: str, cls: type) -> Checkpoint:
    """A checkpoint to resume: an ldae file of this kind, finite, whose stored recipe reads as this ldae's config
    and whose train state is consistent."""
    ckpt = load_checkpoint(path, kind)
    stored_config(cls, ckpt)  # the stored recipe must read as this ldae's config before anything overrides it
    check_train_state(ckpt)
    return ckpt


def check_train_state(ck: Checkpoint) -> None:
    """The step counters a resume computes with: whole numbers in range (an edited file fails here, in one line)."""
    ck.require("step", "total_steps", "steps_per_epoch")
    step, total, per_epoch = (ck.extra[k] for k in ("step", "total_steps", "steps_per_epoch"))
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (step, total, per_epoch))
    if not numbers or not (
        isinstance(step, int) and isinstance(total, int) and 0 <= step <= total and total > 0 and per_epoch > 0
    ):
        raise LdaeError(
            f"{ck.path}: its train state (step {step!r} of {total!r}, {per_epoch!r} steps per epoch) is "
            "not a valid position in a run; the file was edited or damaged; use an earlier checkpoint"
        )


def continued(cls: type, kind: str, cfg: Any, allowed: tuple[str, ...]) -> Checkpoint | None:
    """--continue: the checkpoint in --out to resume (None: nothing there yet, a new run starts), after checking
    it holds this same recipe; a run that has finished ends the command (`Finished`)."""
    if not cfg.run.out_dir:
        raise LdaeError("--continue starts or continues the run in --out; give --out DIR")
    path = Path(cfg.run.out_dir) / CHECKPOINT
    if not path.exists():
        return None
    ckpt = load_resumable(path, kind, cls)
    changed = config_differences(recipe(cls, ckpt), to_dict(cfg), allowed)
    if changed:
        raise LdaeError(
            f"--continue: {path.parent} holds another run (its config differs: {', '.join(changed[:4])}); "
            "pick another --out for this one, or run it as it was"
        )
    same_data = ckpt.config.get("data", {}).get("path") == to_dict(cfg).get("data", {}).get("path")
    if ckpt.extra.get("finished") and same_data and not evaluation_pending(ckpt):
        raise Finished(f"{path.parent}: this run has already finished (step {ckpt.extra['step']:,}); nothing to do")
    return ckpt


def evaluation_pending(ck: Checkpoint) -> bool:
    """A run stopped after its last step but before its final evaluation (resuming finishes it)."""
    if "eval" not in ck.extra:
        return False
    latest = ck.extra["eval"]
    return not isinstance(latest, dict) or latest.get("step") != ck.extra.get("total_steps")


def verified_parent(ck: Checkpoint, role: str, given: str | None = None) -> str:
    """The checkpoint `ck` was made from (its provenance entry with this role), at `given` or where the record
    says it was; read only when its sha256 is the recorded one, so a resumed run never reads other weights."""
    record = next((p for p in ck.provenance.get("parents", []) if p.get("role") == role), None)
    if record is None:
        raise LdaeError(f"{ck.path}: records no {role} checkpoint it was made from")
    path = given or record["path"]
    if not Path(path).is_file():
        raise LdaeError(
            f"{ck.path} was made from {record['path']}, which is not there any more; give its new location with --ckpt"
        )
    if sha256_file(path) != record["sha256"]:
        raise LdaeError(
            f"{path} is not the {role} checkpoint {ck.path} was made from (sha256 differs from the "
            f"recorded {record['sha256'][:12]}...); give the original with --ckpt"
        )
    return str(path)


def refuse_force(resume: str | None, cont: bool, force: bool) -> None:
    """--force replaces a run; --resume and --continue keep the one there, so with either it would do nothing."""
    if force and (resume is not None or cont):
        keeps = f"--resume {resume}" if resume is not None else "--continue"
        raise LdaeError(f"--force replaces a run, and {keeps} continues the one there; give one of them")


def same_parent(ck: Checkpoint, option: str, given: str | None, roles: tuple[str, ...]) -> None:
    """`option` (--ckpt, --init-from) given again on a continued run may only name the checkpoint the run was made
    from (its provenance entry of one of `roles`, wherever it is now): the run reads its weights from `ck`."""
    if given is None:
        return
    record = next((p for p in ck.provenance.get("parents", []) if p.get("role") in roles), None)
    if record is None:
        raise LdaeError(
            f"{ck.path.parent} holds a run started without {option}, which continuing it does not read; "
            f"leave out {option} {given}"
        )
    if not Path(given).is_file() or sha256_file(given) != record["sha256"]:
        raise LdaeError(
            f"{ck.path.parent} holds a run started from {record['path']}, not from {option} {given} "
            f"(sha256 differs); continuing it reads its own checkpoint: leave out {option}"
        )


def refuse_inputs_inside(
    command: str, kind: str, out: str | None, name: str | None, inputs: dict[str, str | None]
) -> None:
    """The folder a new run claims (--out, else runs/<kind>/<name>) may not hold one of its `inputs` (option ->
    path): starting there with --force would remove it. Judged where the paths resolve, through any link."""
    home = rundir.resolve(command, kind, out, name, None).resolve()
    for option, given in inputs.items():
        if given and Path(given).resolve().is_relative_to(home):
            raise LdaeError(
                f"{option} {given} lies in {home}, the folder this run would write (and --force would "
                "replace); pick another --out"
            )


class StageConfig(Protocol):
    run: RunConfig  # every stage's config has its run section


# a stage's config dataclass: Session[PretrainConfig] lets an editor follow session.cfg.optim.blr
C = TypeVar("C", bound=StageConfig)


@dataclass
class Session(Generic[C]):
    """One invocation of a stage: its config, process group and run directory. The directory is private: each path a
    stage writes there comes from `output`, which lists it in the run's manifest (so --force replaces it)."""

    command: str  # the subcommand, for messages (`ldae <command> --resume ...`)
    kind: str  # the checkpoint kind it writes
    cfg: C  # the stage's resolved config dataclass (with a `run: RunConfig` section)
    ctx: DistContext
    _dir: Path
    resume: Checkpoint | None
    manifest: rundir.Manifest | None = None  # on the main rank
    created: set[str] = field(default_factory=set)  # what this invocation added to the manifest
    training: bool = False  # set when the first step starts: a failure before it is a failed start

    @property
    def run(self) -> RunConfig:
        return self.cfg.run

    @property
    def config(self) -> dict:
        return to_dict(self.cfg)

    @property
    def checkpoint(self) -> Path:
        return self.output(CHECKPOINT)

    def output(self, name: str) -> Path:
        """The path of `name` in the run directory, recorded as ldae's in the run's manifest (before it is written); a
        link, FIFO or device there is an error naming it (rundir.check_own)."""
        rundir.check_own(self._dir / name, folder=name in rundir.FOLDERS)
        if self.manifest is not None and name not in self.manifest.files:
            self.manifest.add(name)
            self.created.add(name)
        return self._dir / name

    def undo_start(self) -> None:
        """Remove what this invocation wrote (a start that failed before its first step); the marker too when
        nothing of ldae's is left."""
        if self.manifest is None:
            return
        for name in sorted(self.created):
            rundir.remove_entry(self._dir / name)
        self.manifest.discard(*self.created)
        if not self.manifest.files:
            (self._dir / rundir.MARKER).unlink(missing_ok=True)


def same_unsaved_run(cfg: Any, allowed: tuple[str, ...]) -> Callable[[Path], bool]:
    """Whether a run directory of ours holds this same run (its resolved config equal but for `allowed` keys),
    stopped before its first checkpoint: the same command may then start it again."""

    def check(path: Path) -> bool:
        if (path / CHECKPOINT).exists() or not (path / rundir.CONFIG).is_file():
            return False
        try:
            stored = yaml.safe_load((path / rundir.CONFIG).read_text())
            check_resume_config(stored, to_dict(cfg), allowed)
        except (OSError, yaml.YAMLError, LdaeError, AttributeError):
            return False
        return True

    return check


def kept_config(config_file: str | None, out_dir: Path) -> set[str]:
    """The --config file, when it lies in the run directory: the user's, kept and never replaced."""
    if not config_file or not Path(config_file).is_file():
        return set()
    path = Path(config_file).resolve()
    return {path.name} if path.parent == out_dir.resolve() else set()


@contextlib.contextmanager
def session(
    command: str,
    kind: str,
    cfg: C,
    name: str | None,
    resume: Checkpoint | None = None,
    force: bool = False,
    *,
    config_file: str | None = None,
    resumable: tuple[str, ...] = (),
) -> Iterator[Session[C]]:
    out_dir = rundir.resolve(command, kind, cfg.run.out_dir, name, resume.path if resume is not None else None)
    ctx = init(cfg.run.device)
    lock = rundir.RunLock(out_dir, command)
    created = not out_dir.exists()
    s = None
    try:
        manifest = None
        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            if resume is None:
                manifest = rundir.claim(
                    out_dir,
                    command,
                    force,
                    kept_config(config_file, out_dir),
                    same_unsaved_run(cfg, RESUMABLE + resumable),
                    kind=kind,
                )
            else:
                manifest = rundir.adopt(out_dir, command)
            litter = rundir.remove_temp_files(out_dir)
            if litter:
                console.print(f"removed {len(litter)} temp file(s) an interrupted save left in {out_dir}")
        s = Session(command, kind, cfg, ctx, out_dir, resume, manifest)
        if ctx.is_main and (resume is None or not (out_dir / rundir.CONFIG).exists()):  # a resume keeps its start's
            rundir.write_atomically(s.output(rundir.CONFIG), dump_yaml(cfg).encode())
        note_kept(
            f"the checkpoint of step {resume.extra.get('step')} in {out_dir} (continue with `ldae {command} "
            f"--resume {out_dir}`)"
            if resume is not None
            else None
        )
        yield s
    except BaseException:
        if ctx.is_main and lock.held and resume is None and not (s is not None and s.training):
            if s is not None:
                s.undo_start()
            lock.release()
            if created and out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()
        raise
    finally:
        lock.release()
        shutdown(ctx)

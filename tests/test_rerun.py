"""Every training stage run again into its own folder: `--force` replaces a finished run or one stopped halfway
(every file it wrote is in its manifest, so none reads as a user's), `--continue` finishes the stopped one and
leaves the finished one as it is; a file the run did not write is still refused."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
from helpers import TOKENS, one_line, probe_args, sets, tiny_overrides
from test_detect import SCRATCH, detect_sets
from test_trained_tokenizers import tiny_sets

from ldae_cli.runs.checkpoint import read_metadata

# detectron2 imports timm's old module path and uses torch.jit.script (as in test_detect.py)
pytestmark = [
    pytest.mark.filterwarnings("ignore:Importing from timm.models.layers:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
]


# each stage's command for a tiny run in `out`, stopped after `steps` steps (None: to its end), saving every step;
# finished, it has written all its outputs (curves, evaluations, a best checkpoint, a report)
STAGES = {
    "pretrain": lambda world, coco, out, steps: [
        "pretrain",
        "--config",
        "final.yaml",
        *sets(
            tiny_overrides(
                world.images,
                out,
                **TOKENS,
                **{
                    "optim.epochs": 2,
                    "online_probe.enabled": False,
                    "tokenizer.path": world.pca,
                    "run.save_every": 1,
                    "run.stop_after_steps": steps,
                },
            )
        ),
    ],
    "train-tokenizer": lambda world, coco, out, steps: [
        "train-tokenizer",
        "--config",
        "tokenizer/patch-ae",
        *sets(
            tiny_sets(
                world.images,
                out,
                **{
                    "data.eval_split": "val",
                    "report.images": 4,
                    "report.stats_images": 8,
                    "report.pca_reference": False,
                    "run.save_every": 1,
                    "run.stop_after_steps": steps,
                },
            )
        ),
    ],
    "probe": lambda world, coco, out, steps: probe_args(
        world, out, "probe.epochs=2", "run.save_every=1", f"run.stop_after_steps={steps or 'null'}"
    ),
    "finetune": lambda world, coco, out, steps: [
        "finetune",
        "--config",
        "finetune/cifar10",
        "--ckpt",
        world.ckpt,
        "--out",
        out,
        *sets(
            [
                "data.source=imagefolder",
                f"data.path={world.images}",
                "data.num_workers=0",
                "optim.batch_size=8",
                "optim.epochs=1",
                "run.progress=false",
                "run.device=cpu",
                "run.save_every=1",
                f"run.stop_after_steps={steps or 'null'}",
            ]
        ),
    ],
    "detect": lambda world, coco, out, steps: [
        "detect",
        "--config",
        "detect/cpu-tiny",
        "--from-scratch",
        *sets(
            detect_sets(coco, out, **SCRATCH, **{"eval.every": 1, "run.save_every": 1, "run.stop_after_steps": steps})
        ),
    ],
}


def first_run(run_main, args, out: Path, halfway: bool) -> None:
    assert run_main(*args(out, 1 if halfway else None)).returncode == 0
    assert (read_metadata(out / "checkpoint.safetensors")["extra"]["finished"]) != halfway


def finished(out: Path) -> bool:
    extra = read_metadata(out / "checkpoint.safetensors")["extra"]
    return extra["finished"] and extra["step"] == extra["total_steps"]


def manifest(out: Path) -> set[str]:
    return set(json.loads((out / ".ldae-run.json").read_text())["files"])


@pytest.mark.parametrize("halfway", [False, True], ids=["finished", "halfway"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_force_replaces_the_run_and_refuses_a_users_file(stage, halfway, world, coco, run_main, tmp_path):
    args = partial(STAGES[stage], world, coco)
    out = tmp_path / "run"
    first_run(run_main, args, out, halfway)
    (out / "notes.txt").write_text("mine")
    one_line(run_main(*args(out, None), "--force"), 1, "notes.txt", "ldae did not write")
    (out / "notes.txt").unlink()
    res = run_main(*args(out, None), "--force")
    assert res.returncode == 0, res.stderr[-2000:]
    assert finished(out)
    assert {p.name for p in out.iterdir()} - {".ldae-run.json"} <= manifest(out)


@pytest.mark.parametrize("halfway", [False, True], ids=["finished", "halfway"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_continue_finishes_the_run_and_keeps_a_users_file(stage, halfway, world, coco, run_main, tmp_path):
    args = partial(STAGES[stage], world, coco)
    out = tmp_path / "run"
    first_run(run_main, args, out, halfway)
    (out / "notes.txt").write_text("mine")
    res = run_main(*args(out, None), "--continue")
    assert res.returncode == 0, res.stderr[-2000:]
    assert finished(out) and (out / "notes.txt").read_text() == "mine"
    assert ("already finished" in res.stdout + res.stderr) != halfway
    assert {p.name for p in out.iterdir()} - {".ldae-run.json", "notes.txt"} <= manifest(out)

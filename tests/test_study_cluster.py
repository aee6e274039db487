"""`ldae study --launch local|slurm`: every run a submitit job (a probe held until its pretrain has finished), the
jobs recorded in the study's jobs.json, and the same command again never submitting a run twice: finished runs
skipped, pending or running jobs left alone, a failed run named with its error and log and submitted again."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import traceback
from types import SimpleNamespace

import pytest
import yaml
from helpers import study_args
from test_study import TOY_BUDGET, TOY_STUDY

from ldae_cli.errors import Interrupted, Terminated
from ldae_cli.runs.checkpoint import read_metadata
from ldae_cli.studies import cluster, runner

BAD_PROBE = {"probe.blrs": [-1.0]}  # refused by the probe stage when it runs, not when the study is planned
BROKEN = {**TOY_STUDY, "variants": [TOY_STUDY["variants"][0], {**TOY_STUDY["variants"][1], "probe_set": BAD_PROBE}]}
BAD_LINE = "probe.blrs: give one or more positive base learning rates, got [-1.0]"


@pytest.fixture
def toy(tmp_path, pattern_tree) -> list[str]:
    """`ldae study` of test_study's toy study and budget (its study.yaml rewritten by the tests that fix a cause)."""
    return study_args(tmp_path, pattern_tree, TOY_STUDY, TOY_BUDGET)


def jobs_of(out) -> dict[str, list[str]]:
    return {run: [j["id"] for j in entry["jobs"]] for run, entry in json.loads((out / "jobs.json").read_text()).items()}


def rows_of(out) -> list:
    return json.loads((out / "results.json").read_text())["rows"]


def test_a_local_launch_names_a_failed_run_finishes_the_others_and_pages_once_all_have(toy, run_main, tmp_path):
    out = (tmp_path / "out").resolve()
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(BROKEN))
    first = run_main(*toy, "--launch", "local")
    assert first.returncode == 1 and "fix the cause and run the same command again" in first.stderr
    failed = jobs_of(out)["probe/pixel-dae-s0"][-1]
    log = out / "slurm" / failed / f"{failed}_0_log.err"
    assert f"1 run(s) failed (4 of 5 runs finished): probe pixel DAE, seed 0: {BAD_LINE} (log: {log})" in first.stderr
    assert BAD_LINE in log.read_text()
    assert all((out / "probe" / p / "results.json").is_file() for p in ("l-dae-s0", "random-init-same-network-s0"))
    assert not (out / "results.json").exists()
    timed = json.loads((out / "timings.json").read_text())  # each finished run's time, submission to end
    assert sorted(timed) == [
        "pretrain/l-dae-s0",
        "pretrain/pixel-dae-s0",
        "probe/l-dae-s0",
        "probe/random-init-same-network-s0",
    ]
    assert all(t["seconds"] > 0 for t in timed.values()) and timed["pretrain/l-dae-s0"]["steps"] == 3
    assert sorted(jobs_of(out)) == [
        "pretrain/l-dae-s0",
        "pretrain/pixel-dae-s0",
        "probe/l-dae-s0",
        "probe/pixel-dae-s0",
        "probe/random-init-same-network-s0",
    ]

    (tmp_path / "study.yaml").write_text(yaml.safe_dump(TOY_STUDY))  # the cause fixed
    second = run_main(*toy, "--launch", "local")
    assert second.returncode == 0, second.stderr
    assert f"failed: probe pixel DAE, seed 0: {BAD_LINE} (log: {log}); submitted again" in second.stdout
    assert second.stdout.count("submitted job") == 1 and "probe pixel DAE, seed 0: finished (job" in second.stdout
    jobs = jobs_of(out)
    assert len(jobs.pop("probe/pixel-dae-s0")) == 2 and all(len(ids) == 1 for ids in jobs.values())
    rows, jobs = rows_of(out), jobs_of(out)
    assert [r["name"] for r in rows] == ["l-DAE", "pixel DAE", "random init (same network)"]

    third = run_main(*toy, "--launch", "local")  # every run finished: nothing submitted, the same page
    assert third.returncode == 0 and "submitted" not in third.stdout and "wrote" in third.stdout
    assert rows_of(out) == rows and jobs_of(out) == jobs


class FakeSlurm:
    """SLURM as submitit shows it, faked: AutoExecutor records each job's parameters and the object it would pickle,
    SlurmJob reads the state this cluster gives the job; `run` executes a job's command in this process as a node
    would, its traceback written to the job's error log as submitit does."""

    def __init__(self, monkeypatch):
        import submitit
        from submitit.core.utils import JobPaths

        self.submitted: dict[str, tuple[dict, object]] = {}
        self.states: dict[str, str] = {}
        cluster = self

        class Job:
            def __init__(self, folder, job_id):
                self.job_id, self.paths = job_id, JobPaths(folder, job_id, 0)

            @property
            def state(self):
                return cluster.states[self.job_id]

            def done(self):
                return self.state not in ("PENDING", "RUNNING")

            def cancel(self, check=True):
                cluster.states[self.job_id] = "CANCELLED by 0"

        class Executor:
            def __init__(self, folder, cluster):
                self.folder, self.params = folder, {}

            def update_parameters(self, **params):
                self.params.update(params)

            def submit(self, fn):
                job_id = str(100 + len(cluster.submitted))
                cluster.submitted[job_id], cluster.states[job_id] = (self.params, fn), "PENDING"
                return Job(self.folder, job_id)

        self.job = Job
        monkeypatch.setattr(submitit, "AutoExecutor", Executor)
        monkeypatch.setattr(submitit, "SlurmJob", Job)

    def fail(self, job_id: str, folder, log: str, state: str) -> None:
        path = self.job(str(folder), job_id).paths.stderr
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(log)
        self.states[job_id] = state

    def run(self, job_id: str, folder) -> None:
        params, fn = self.submitted[job_id]
        try:
            fn.run()
            self.states[job_id] = "COMPLETED"
        except Exception:
            self.fail(
                job_id, folder, f"submitit ERROR - job triggered an exception\n{traceback.format_exc()}", "FAILED"
            )


def test_a_slurm_launch_holds_probes_until_their_pretrains_and_resubmits_only_what_failed(
    toy, run_main, tmp_path, monkeypatch
):
    cluster, out = FakeSlurm(monkeypatch), (tmp_path / "out").resolve()
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(BROKEN))
    slurm = [*toy, "--launch", "slurm", "--nproc", "2", "--partition", "gpu", "--time", "30", "--slurm", "account=p"]
    first = run_main(*slurm)
    assert first.returncode == 0, first.stderr
    assert not (out / "results.json").exists() and "once every run has finished it writes the pages" in first.stdout
    jobs = {run: ids[0] for run, ids in jobs_of(out).items()}
    assert sorted(jobs.values()) == sorted(cluster.submitted)  # one job per run
    for run, job in jobs.items():
        params, fn = cluster.submitted[job]
        gpus = 2 if run.startswith("pretrain/") else 1
        assert params["gpus_per_node"] == params["tasks_per_node"] == gpus and params["nodes"] == 1
        assert params["slurm_partition"] == "gpu" and params["timeout_min"] == 30
        assert fn.command()[-3:] == ["--out", str(out / run), "--continue"]
        extra = params["slurm_additional_parameters"]
        assert extra.get("account") == "p" and extra.get("dependency") == {
            "probe/l-dae-s0": f"afterok:{jobs['pretrain/l-dae-s0']}",
            "probe/random-init-same-network-s0": f"afterok:{jobs['pretrain/l-dae-s0']}",
            "probe/pixel-dae-s0": f"afterok:{jobs['pretrain/pixel-dae-s0']}",
        }.get(run)
    assert f"pretrain l-DAE, seed 0: submitted (job {jobs['pretrain/l-dae-s0']}, log slurm/" in first.stdout

    cluster.states[jobs["pretrain/l-dae-s0"]] = "RUNNING"
    again = run_main(*slurm)  # pending and running jobs are left alone
    assert again.returncode == 0 and "submitted job" not in again.stdout and len(cluster.submitted) == 5
    assert "pretrain l-DAE, seed 0: RUNNING" in again.stdout and "probe l-DAE, seed 0: PENDING" in again.stdout

    timeout = f"slurmstepd: error: *** JOB {jobs['pretrain/pixel-dae-s0']} CANCELLED AT 10:00 DUE TO TIME LIMIT ***"
    cluster.fail(jobs["pretrain/pixel-dae-s0"], out / "slurm" / "%j", f"...\n{timeout}\n", "TIMEOUT")
    held = jobs["probe/pixel-dae-s0"]
    late = run_main(*slurm)  # the pretrain submitted again, its probe's job (never to start) cancelled and replaced
    assert (
        late.returncode == 1
        and f"1 run(s) failed (0 of 5 runs finished): pretrain pixel DAE, seed 0: {timeout} (log: " in late.stderr
        and "; submitted again: the same command again shows where they stand" in late.stderr
    )
    assert f"cancelled job {held} (probe pixel DAE, seed 0)" in late.stdout and cluster.states[held] == "CANCELLED by 0"
    jobs = {run: ids[-1] for run, ids in jobs_of(out).items()}
    assert len(cluster.submitted) == 7 and cluster.states[jobs["pretrain/l-dae-s0"]] == "RUNNING"
    dependency = cluster.submitted[jobs["probe/pixel-dae-s0"]][0]["slurm_additional_parameters"]["dependency"]
    assert dependency == f"afterok:{jobs['pretrain/pixel-dae-s0']}" and held not in jobs.values()

    for run in ("pretrain/l-dae-s0", "pretrain/pixel-dae-s0", "probe/l-dae-s0", "probe/pixel-dae-s0"):
        cluster.run(jobs[run], out / "slurm" / "%j")  # SLURM runs them in the order their dependencies allow
    log = out / "slurm" / jobs["probe/pixel-dae-s0"] / f"{jobs['probe/pixel-dae-s0']}_0_log.err"
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(TOY_STUDY))  # the cause fixed
    fixed = run_main(*slurm)
    assert fixed.returncode == 1
    assert f"1 run(s) failed (3 of 5 runs finished): probe pixel DAE, seed 0: {BAD_LINE} (log: " in (fixed.stderr)
    assert str(log) in fixed.stderr and f"{BAD_LINE} (log: {log}); submitted again" in fixed.stdout
    resubmitted = jobs_of(out)["probe/pixel-dae-s0"][-1]
    assert len(cluster.submitted) == 8 and resubmitted not in jobs.values()
    assert "dependency" not in cluster.submitted[resubmitted][0]["slurm_additional_parameters"]  # its pretrain is done
    assert "probe random init (same network), seed 0: PENDING" in fixed.stdout

    cluster.run(resubmitted, out / "slurm" / "%j")
    cluster.run(jobs["probe/random-init-same-network-s0"], out / "slurm" / "%j")
    done = run_main(*slurm)
    assert done.returncode == 0, done.stderr
    assert "submitted job" not in done.stdout and len(cluster.submitted) == 8
    assert [r["name"] for r in rows_of(out)] == ["l-DAE", "pixel DAE", "random init (same network)"]


def test_a_pretrain_job_that_stops_before_its_last_step_fails_so_its_probe_never_starts(
    toy, run_main, tmp_path, monkeypatch
):
    cluster, out = FakeSlurm(monkeypatch), (tmp_path / "out").resolve()
    one = {**TOY_STUDY, "variants": TOY_STUDY["variants"][:1], "baselines": []}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(one))
    slurm = [*toy, "--launch", "slurm", "--set", "run.stop_after_steps=1"]  # e.g. run.time_limit_minutes reached
    assert run_main(*slurm).returncode == 0
    jobs = {run: ids[0] for run, ids in jobs_of(out).items()}
    cluster.run(jobs["pretrain/l-dae-s0"], out / "slurm" / "%j")
    assert cluster.states[jobs["pretrain/l-dae-s0"]] == "FAILED"  # so SLURM never releases its afterok probe
    assert not read_metadata(out / "pretrain" / "l-dae-s0" / "checkpoint.safetensors")["extra"].get("finished")
    again = run_main(*slurm)
    assert again.returncode == 1 and "the run stopped before its last step; its job fails" in again.stderr
    assert f"cancelled job {jobs['probe/l-dae-s0']} (probe l-DAE, seed 0)" in again.stdout


@pytest.mark.skipif(shutil.which("srun") is not None, reason="this machine has SLURM")
def test_a_launch_without_slurm_or_with_jobs_is_one_line(toy, run_main, tmp_path):
    res = run_main(*toy, "--launch", "slurm")  # no SLURM on this machine
    assert res.returncode == 1 and "on a machine without SLURM use --launch local" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out" / "jobs.json").exists()
    res = run_main(*toy, "--launch", "local", "--jobs", "2")
    assert res.returncode == 1 and "with --launch local every run is a job of its own" in res.stderr


@pytest.mark.parametrize(
    "log, line",
    [
        ("Traceback ...\nldae_cli.errors.LdaeError: data.path: not found\n", "data.path: not found"),
        ("slurmstepd: error: *** JOB 7 CANCELLED DUE TO TIME LIMIT ***\n\n", "slurmstepd: error: *** JOB 7 CANCELLED"),
    ],
)
def test_a_jobs_error_line_is_the_stages_own_else_the_logs_last(log, line):
    from ldae_cli.runs.slurm import error_line

    assert error_line(log).startswith(line)


@pytest.mark.parametrize("stop, code", [(KeyboardInterrupt(), 130), (Terminated(), 143)])
def test_a_stopped_local_study_passes_sigterm_on_and_waits_for_its_jobs(stop, code, tmp_path):
    """Ctrl-C reaches the jobs from the terminal; SIGTERM goes to each job's controller (its id is the pid)."""
    # SIGINT at its default: a shell's background job (`pytest &`) starts with it ignored, and children inherit that
    controller = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if not isinstance(stop, Terminated):
        controller.send_signal(signal.SIGINT)  # the terminal's Ctrl-C, which the study does not repeat
    job = SimpleNamespace(job_id=str(controller.pid), wait=lambda: controller.wait(timeout=10))
    entry = cluster.Entry(runner.Run("pretrain", tmp_path / "run", ["pretrain"], "l-DAE, seed 0"), job, "submitted")
    try:
        with pytest.raises(Interrupted) as stopped:
            cluster.stop([entry], stop)
        assert stopped.value.code == code and "run the same command again to continue" in str(stopped.value)
        assert controller.returncode == -(signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
    finally:
        controller.kill()
        controller.wait()

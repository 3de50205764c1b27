"""End to end on the local 2-node Slurm cluster (helpers/slurm_cluster.py): `pretrain submit` runs the demo recipe
(tiny Llama + CLIP tower, ZeRO-3, fp32) as 2 nodes x 1 task. A job signalled mid-run checkpoints, requeues itself and
resumes; a --chain of jobs carries the run across jobs. Both end with every step's loss equal, bit for bit, to an
uninterrupted local run of the same config at the same world size (2)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers.runs import ROOT, launch, losses, write_config
from helpers.slurm_cluster import FINAL_STATES, SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 30  # long enough that a job signalled after step 2 is still training when the signal lands


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, assets, shapes) -> Path:
    root = tmp_path_factory.mktemp("slurm_e2e")
    return write_config(root / "demo.yaml", assets, shapes, **{"train.max_steps": STEPS})


@pytest.fixture(scope="module")
def reference(recipe) -> dict[int, float]:
    """Per-step losses of an uninterrupted local run (torchrun, 2 ranks) of the same config."""
    run = recipe.parent / "reference"
    out = launch(recipe, nproc=2, overrides=[f"run.output_dir={run}"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    return losses(run)


def _submit(cluster: SlurmCluster, config: Path, run: Path, *args: str) -> list[int]:
    """`pretrain submit` as a user runs it; returns the job ids it printed (one, or one per link of a chain)."""
    res = subprocess.run([sys.executable, "-m", "pretrain", "submit", str(config), "--nodes", "2", "--gpus-per-node",
                          "0", "--tasks-per-node", "1", "--exit-wait", "30", *args, f"run.output_dir={run}"],
                         env=cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    ids = [int(x) for x in re.findall(r"job (\d+)", res.stdout)]
    assert ids and ids[-1] == int(res.stdout.split()[-1])  # the contract: the job id is the last word
    return ids


def _logged_steps(run: Path) -> list[int]:
    """Steps in metrics.jsonl, in file order (complete lines only: rank 0 may be writing one)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def _logs(run: Path) -> str:
    return "".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted((run / "slurm").glob("*.out")))


def _wait_for_step(cluster: SlurmCluster, jobid: int, run: Path, step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _logged_steps(run) or _logged_steps(run)[-1] < step:
        state = cluster.job_state(jobid)
        assert state not in FINAL_STATES, f"job {jobid} ended ({state}) before step {step}\n{_logs(run)}"
        assert time.monotonic() < deadline, f"no step {step} in {timeout} s (job {state})\n{_logs(run)}"
        time.sleep(0.5)


def _check_run(run: Path, reference: dict[int, float]) -> None:
    """Each step logged exactly once, in order, and every loss equal to the uninterrupted run's."""
    assert _logged_steps(run) == list(range(1, STEPS + 1)), _logs(run)
    got = losses(run)
    assert [got[s] for s in range(1, STEPS + 1)] == [reference[s] for s in range(1, STEPS + 1)]
    assert (run / "DONE").read_text().strip() == str(STEPS) and not (run / "PREEMPTED").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"


def _rank_process(jobid: int, rank: int) -> psutil.Process:
    """The training process of task `rank` of a job (the cluster's nodes are namespaces of this machine)."""
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "train" in (p.info["cmdline"] or []) and p.environ().get("SLURM_JOB_ID") == str(jobid) \
                    and p.environ().get("SLURM_PROCID") == str(rank):
                return p
        except psutil.Error:
            continue
    pytest.fail(f"no task {rank} of job {jobid}")


def test_signalled_killed_and_lost_node_job_requeues_and_resumes_exactly(slurm_cluster, recipe, reference):
    """One job, three blows, checkpoints every 4 steps: USR1 (as --signal=USR1@T or a preemption sends it): a
    checkpoint, exit 75, a requeue. In the requeued job, once it committed a new checkpoint, task 1 killed (SIGKILL:
    an OOM kill, a segfault): a failure after a newer checkpoint, requeued (launch/restarts.py). In the next, node
    n2 lost (its slurmd and every process on it killed; it comes back a few seconds later): requeued again. Every
    loss equals the uninterrupted run's."""
    run = recipe.parent / "requeue"
    (jobid,) = _submit(slurm_cluster, recipe, run, "checkpoint.every_steps=4")
    # Wait until both ranks are training (their handlers are in place: a signal before that would kill them).
    _wait_for_step(slurm_cluster, jobid, run, 2, timeout=240)
    slurm_cluster.signal(jobid, "USR1")  # what --signal=USR1@T or a preemption sends the job's tasks
    _wait_for_new_checkpoint(slurm_cluster, jobid, run, restart=1)
    _rank_process(jobid, 1).kill()
    killed = time.monotonic()
    _wait_for_new_checkpoint(slurm_cluster, jobid, run, restart=2)
    requeued_in = time.monotonic() - killed
    slurm_cluster.lose_node("n2")
    time.sleep(3)
    slurm_cluster.restore_node("n2")
    info = slurm_cluster.wait_job(jobid, timeout=400)
    logs = _logs(run)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0") and int(info["Restarts"]) >= 3, logs
    first = _restart_log(run, jobid, 0)
    assert "0: signal 10" in first and "1: signal 10" in first, first
    assert "step finished with exit code 75" in logs and "a newer checkpoint was committed: restart 2" in logs
    assert requeued_in < 240, requeued_in
    _check_run(run, reference)


def _wait_for_new_checkpoint(cluster: SlurmCluster, jobid: int, run: Path, restart: int) -> None:
    """Until restart `restart` of the job resumed and committed a checkpoint newer than the one it resumed from."""
    deadline = time.monotonic() + 400
    while True:
        text = _restart_log(run, jobid, restart)
        resumed = re.search(r"resumed from \S+step_(\d+) at step", text)
        latest = run / "checkpoints" / "latest"
        if resumed and latest.is_file() and int(latest.read_text().strip()[5:]) > int(resumed.group(1)):
            return
        assert time.monotonic() < deadline and cluster.job_state(jobid) not in FINAL_STATES, _logs(run)
        time.sleep(0.5)


def _restart_log(run: Path, jobid: int, restart: int) -> str:
    path = run / "slurm" / f"demo-{jobid}.restart{restart}.out"
    return path.read_text() if path.exists() else ""


def test_chain_carries_the_run_across_jobs(slurm_cluster, recipe, reference):
    # train.stop_at_step is absolute and every link gets the same overrides: link 1 trains steps 1..k and stops
    # (exit 0, no DONE), link 2 resumes and trains to max_steps = k + 1 (DONE), link 3 finds DONE and does nothing.
    k = STEPS - 1
    run = recipe.parent / "chain"
    ids = _submit(slurm_cluster, recipe, run, "--chain", "3", f"train.stop_at_step={k}")
    assert len(ids) == 3
    infos = [slurm_cluster.wait_job(j, timeout=300) for j in ids]
    logs = _logs(run)
    assert [(i["JobState"], i["ExitCode"], i["Restarts"]) for i in infos] == [("COMPLETED", "0:0", "0")] * 3, logs
    assert f"resumed from {run}/checkpoints/step_{k:08d} at step {k}" in (
        run / "slurm" / f"demo-{ids[1]}.restart0.out").read_text()
    assert "the run has finished, nothing to do" in (run / "slurm" / f"demo-{ids[2]}.out").read_text()
    assert not list((run / "slurm").glob(f"demo-{ids[2]}.restart*"))  # the third link started no step
    _check_run(run, reference)

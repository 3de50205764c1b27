"""`pretrain submit` and the sbatch template: rendered output (no cluster needed), then the real thing on the local
2-node Slurm cluster (helpers/slurm_cluster.py, fixture `slurm_cluster` from conftest): quoting, a gloo all_reduce
across the nodes, requeue on exit 75, the restart cap, real failures, --chain and real preemption."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.slurm_cluster import ensure_slurm_installed, stand_in_python

from pretrain.cli.submit import main as submit_main
from pretrain.launch.slurm import (
    SlurmJobSpec,
    SlurmSpecError,
    directive_value,
    job_name,
    parse_time,
    render_script,
    submit,
    write_script,
)

CONFIG = """\
run: {{output_dir: {out}, name: {name}}}
model: {{llm: {{model_type: llama}}, vision: {{model_type: clip_vision_model}}}}
data: {{train: [{{urls: {urls}}}]}}
train: {{max_steps: 10, micro_batch_size: 2}}
"""


def _config(directory: Path, out: str, name: str = "demo") -> Path:
    (directory / "shards").mkdir(parents=True, exist_ok=True)
    for i in range(4):  # stand-ins: submit checks that the shards exist, never reads them
        (directory / "shards" / f"train-{i:06d}.tar").write_bytes(b"")
    urls = str(directory / "shards" / "train-{000000..000003}.tar")
    path = directory / "config.yaml"
    path.write_text(CONFIG.format(out=_yaml_str(out), name=_yaml_str(name), urls=_yaml_str(urls)))
    return path


def _yaml_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _dry_run(capsys, *argv: str) -> str:
    assert submit_main([*argv, "--dry-run"]) == 0
    text = capsys.readouterr().out
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)  # valid shell
    return text


def _directives(text: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]


def _code_lines(text: str) -> list[str]:
    """The script's lines without trailing comments."""
    return [re.sub(r"\s+# .*$", "", line) for line in text.splitlines()]


def _srun_line(text: str) -> str:
    start = text.index("\nsrun ")
    return text[start + 1: text.index("\nrc=$?", start)].replace("\\\n", " ")


# ------------------------------------------------------------------ rendering, no cluster
@pytest.mark.slow
def test_dry_run_gpu_nodes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path, "runs/gpu", name="llava 7b")
    (tmp_path / "site.sh").write_text("module purge\n")
    text = _dry_run(capsys, str(cfg), "--nodes", "4", "--gpus-per-node", "8", "--cpus-per-task", "12",
                    "--time", "2-00:00:00", "--partition", "gpu", "--account", "proj1", "--qos", "high",
                    "--module", "cuda/12.4", "--setup", "site.sh", "--env", "NCCL_SOCKET_IFNAME=ib0",
                    "--sbatch-option=--exclusive", "train.max_steps=7")
    run_dir = tmp_path / "runs" / "gpu"
    assert _directives(text) == [
        "--job-name=llava_7b", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12",
        "--time=2-00:00:00", "--partition=gpu", "--account=proj1", "--qos=high", f"--chdir={tmp_path}",
        f"--output={run_dir}/slurm/%x-%j.out", "--open-mode=append", "--signal=USR1@300", "--requeue",
        "--exclusive"]
    srun = _srun_line(text)
    assert srun.split()[:6] == ["srun", "--nodes=4", "--ntasks-per-node=8", "--wait=120", "--kill-on-bad-exit=0",
                                "--label"]
    assert "--cpus-per-task=12" in srun and '--output="$STEP_LOG"' in srun
    assert srun.endswith(f"{sys.executable} -m pretrain train {cfg} train.max_steps=7")
    for line in ["module load cuda/12.4", f"source {tmp_path}/site.sh", "export NCCL_SOCKET_IFNAME=ib0",
                 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 "export MASTER_PORT=$(( 20000 + (SLURM_JOB_ID + 7919 * RESTART) % 40000 ))",
                 f"OUTPUT_DIR={run_dir}", "REQUEUE=1", "MAX_RESTARTS=50",
                 f"STEP_LOG={run_dir}/slurm/llava_7b-%j.restart\"${{RESTART}}\".out"]:
        assert line in _code_lines(text), line
    assert 'if scontrol requeue "$SLURM_JOB_ID"; then' in text
    assert not run_dir.exists()  # a dry run writes nothing


@pytest.mark.slow
def test_dry_run_cpu_nodes_chain(tmp_path, capsys):
    cfg = _config(tmp_path, str(tmp_path / "run"))
    text = _dry_run(capsys, str(cfg), "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "3",
                    "--chain", "3", "--signal-secs", "0", "--max-restarts", "4")
    directives = _directives(text)
    assert "--ntasks-per-node=3" in directives and "--no-requeue" in directives
    assert not [d for d in directives if d.startswith(("--gpus", "--signal", "--time", "--partition"))]
    assert "REQUEUE=0" in _code_lines(text) and "MAX_RESTARTS=4" in _code_lines(text)
    assert _srun_line(text).split()[1:3] == ["--nodes=2", "--ntasks-per-node=3"]


@pytest.mark.parametrize(("flag", "workers", "want"), [([], "5", 6), (["--cpus-per-task", "2"], "5", 2),
                                                      ([], "auto", 8)])
@pytest.mark.slow
def test_cpus_per_task_default_to_the_loader_workers_plus_one(tmp_path, capsys, flag, workers, want):
    cfg = _config(tmp_path, str(tmp_path / "run"))
    text = _dry_run(capsys, str(cfg), "--nodes", "2", "--gpus-per-node", "4", *flag, f"data.num_workers={workers}")
    assert [d for d in _directives(text) if d.startswith("--cpus")] == [f"--cpus-per-task={want}"]
    assert f"--cpus-per-task={want}" in _srun_line(text).split()


@pytest.mark.parametrize(("extra", "message"), [
    (["train.max_stepz=3"], "max_stepz"),
    (["train.max_steps=many"], "train.max_steps"),
    (["train.global_batch_size=5"], "train.global_batch_size"),
    (["--gpus-per-node", "0"], "--tasks-per-node"),
    (["--tasks-per-node", "2"], "must equal --gpus-per-node"),
    (["--partition", "gpu;reboot"], "not a Slurm name"),
    (["--time", "1 day"], "--time"),
    (["--time", "5"], "no room for the checkpoint signal"),
    (["--env", "NOT-A-NAME=1"], "not a variable name"),
    (["--chain", "0"], "--chain"),
])
def test_bad_input_fails_before_submission(tmp_path, capsys, extra, message):
    cfg = _config(tmp_path, str(tmp_path / "run"))
    shape = ["--nodes", "1", "--gpus-per-node", "1"]
    # Not a dry run: a bad job must be refused before anything is written or sbatch is called.
    assert submit_main([str(cfg), *shape, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_preflight_lists_what_cannot_run_before_anything_is_written(tmp_path, capsys):
    cfg = _config(tmp_path, str(tmp_path / "run"))
    (tmp_path / "shards" / "train-000002.tar").unlink()
    bad = ["checkpoint.resume=/nope", f"model.init_from={tmp_path}/stage1/hf", "data.chat_template=none.jinja",
           f"data.val=[{{urls: '{tmp_path}/shards/val-*.tar'}}]"]
    assert submit_main([str(cfg), "--nodes", "1", "--gpus-per-node", "1", "--dry-run", *bad]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.resume: /nope: no such checkpoint" in err and "model.init_from:" in err
    assert "data.train.0.urls: 1 of 4 shards missing" in err and "train-000002.tar" in err
    assert "data.chat_template: none.jinja does not exist" in err
    assert f"data.val.0.urls: {tmp_path}/shards/val-*.tar: the pattern matches no file" in err
    assert not (tmp_path / "run").exists()


def test_submit_and_plan_give_the_same_integer_batch_fix(tmp_path, capsys):
    """Global batch 256 with micro-batch 32 on 2 x 8 GPUs: both name micro-batch 16, accumulation 1."""
    from pretrain.cli import main

    cfg = _config(tmp_path, str(tmp_path / "run"))
    batch = ["train.micro_batch_size=32", "train.global_batch_size=256"]
    assert submit_main([str(cfg), "--nodes", "2", "--gpus-per-node", "8", "--dry-run", *batch]) == 2
    err = capsys.readouterr().err
    assert "set train.micro_batch_size=16 train.grad_accum=1" in err and "0.5" not in err
    assert main(["plan", str(cfg), *batch, "--gpus", "16"]) == 0
    assert "16 GPUs: train.micro_batch_size=16 train.grad_accum=1" in capsys.readouterr().out
    assert submit_main([str(cfg), "--nodes", "2", "--gpus-per-node", "8", "--dry-run", *batch,
                        "train.micro_batch_size=16"]) == 0


def test_missing_config_fails(tmp_path, capsys):
    assert submit_main([str(tmp_path / "nope.yaml"), "--nodes", "1", "--gpus-per-node", "1"]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_values_reach_the_shell_quoted(tmp_path, capsys):
    evil = ["x; touch ~/pwned", "$(touch ~/pwned)", "x`touch ~/pwned`", "a'b\"c"]
    cfg = _config(tmp_path / evil[1], str(tmp_path / "run $(touch ~/pwned)"), name="x; rm -rf ~")
    text = _dry_run(capsys, str(cfg), "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "1",
                    "--env", f"FOO={evil[0]}", *[f"run.name={e}" for e in evil[1:]])
    assert f"--job-name={job_name(evil[-1])}" in _directives(text) and job_name(evil[-1]) == "a_b_c"
    assert f"export FOO={shlex.quote(evil[0])}" in text
    words = shlex.split(_srun_line(text))  # the shell's own reading of the line gives back the exact values
    assert words[-len(evil) + 1:] == [f"run.name={e}" for e in evil[1:]] and words[-len(evil)] == str(cfg)
    assert f"OUTPUT_DIR={shlex.quote(str(tmp_path / 'run $(touch ~/pwned)'))}" in text


def test_spec_checks():
    assert parse_time("90") == 5400 and parse_time("1:30") == 90 and parse_time("02:00:00") == 7200
    assert parse_time("1-2") == 93600 and parse_time("1-00:01:05") == 86465
    assert directive_value("gpu") == "gpu" and directive_value('a "b" c') == '"a \\"b\\" c"'
    with pytest.raises(SlurmSpecError, match="control character"):
        directive_value("a\nsrun evil")
    spec = SlurmJobSpec(config_path="c.yaml", output_dir="run\nrm -rf ~", job_name="x", nodes=1, gpus_per_node=0,
                        tasks_per_node=1)
    with pytest.raises(SlurmSpecError, match="control character"):
        render_script(spec)


# ------------------------------------------------------------------ on the local cluster
def _job(tmp_path: Path, name: str, command: list[str], nodes: int = 2, **kw) -> tuple[Path, Path]:
    """Render the real template with a test command in place of the trainer; returns (script, run dir)."""
    python = stand_in_python(tmp_path / f"{name}-python", command)
    spec = SlurmJobSpec(config_path="unused.yaml", output_dir=str(tmp_path / name), job_name=name, nodes=nodes,
                        gpus_per_node=0, tasks_per_node=1, python=str(python), workdir=str(tmp_path), **kw)
    return write_script(spec, render_script(spec)), tmp_path / name


def _bash(script: str) -> list[str]:
    return ["bash", "-c", script]


def _logs(run_dir: Path, pattern: str = "*.out") -> str:
    return "".join(p.read_text() for p in sorted((run_dir / "slurm").glob(pattern)))


@pytest.mark.slurm
def test_injection_executed_on_cluster(slurm_cluster, tmp_path, monkeypatch, capsys):
    markers = [tmp_path / f"pwned{i}" for i in range(4)]
    cfg = _config(tmp_path / f"cfg $(touch {markers[0]})", str(tmp_path / f"run `touch {markers[1]}` #\"'% x"),
                  name=f"x; rm -rf ~; touch {markers[2]}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    # A harmless program in place of Python: it prints what the trainer would get.
    override = f"run.name=$(touch {markers[3]})"
    assert submit_main([str(cfg), "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "1",
                        "--python", "/bin/echo", override]) == 0
    jobid = int(capsys.readouterr().out.split()[-1])  # the job id is the last word
    info = slurm_cluster.wait_job(jobid, timeout=30)
    run_dir = tmp_path / f"run `touch {markers[1]}` #\"'% x"
    assert info["JobState"] == "COMPLETED", _logs(run_dir)
    assert f"0: -m pretrain train {cfg} {override}\n" in _logs(run_dir, "*restart0.out")
    assert (run_dir / "slurm" / f"{job_name(f'$(touch {markers[3]})')}.sbatch").is_file()
    assert not [m for m in markers if m.exists()]


@pytest.mark.slurm
def test_gloo_all_reduce_across_two_nodes(slurm_cluster, tmp_path):
    code = ("import os, socket, torch, torch.distributed as dist\n"
            "rank, world = int(os.environ['SLURM_PROCID']), int(os.environ['SLURM_NTASKS'])\n"
            "dist.init_process_group('gloo', rank=rank, world_size=world)\n"  # env://: MASTER_ADDR/PORT
            "t = torch.tensor([float(rank + 1)])\n"
            "dist.all_reduce(t)\n"
            "print(f'rank={rank} host={socket.gethostname()} master={os.environ[\"MASTER_ADDR\"]} sum={t.item():g}')\n"
            "dist.destroy_process_group()\n")
    script, run_dir = _job(tmp_path, "gloo", [sys.executable, "-c", code])
    info = slurm_cluster.wait_job(slurm_cluster.sbatch(script), timeout=60)
    out = _logs(run_dir)
    assert info["JobState"] == "COMPLETED", out
    assert "0: rank=0 host=n1 master=n1 sum=3" in out and "1: rank=1 host=n2 master=n1 sum=3" in out


# A task's view under each GPU binding, CUDA_VISIBLE_DEVICES standing in for the GPUs this CPU cluster lacks: all
# of the node's devices (torchrun, plain srun), or one per task (what --gpus-per-task=1 / --gpu-bind set up).
BINDINGS = {"all": "export CUDA_VISIBLE_DEVICES=0,1,2,3; ",
            "one": "export CUDA_VISIBLE_DEVICES=$((SLURM_LOCALID + 2)); "}
GPU_PROBE = ("import os\n"
             "from pretrain import distributed as dist\n"
             "dist.environment_from_slurm_or_alone()\n"
             "local = os.environ['LOCAL_RANK']\n"
             "gpu = dist.bind_gpu()\n"
             "print(f\"rank={os.environ['RANK']} local={local} visible={os.environ['CUDA_VISIBLE_DEVICES']} \"\n"
             "      f\"cuda={gpu} LOCAL_RANK={os.environ['LOCAL_RANK']}\")\n")


@pytest.mark.slurm
@pytest.mark.parametrize("binding", ["all", "one"])
def test_each_task_picks_its_gpu_under_both_bindings(slurm_cluster, tmp_path, binding):
    # Two tasks on one node, so the second has SLURM_LOCALID (LOCAL_RANK) 1.
    command = _bash(BINDINGS[binding] + f"exec {shlex.quote(sys.executable)} -c {shlex.quote(GPU_PROBE)}")
    spec = SlurmJobSpec(config_path="unused.yaml", output_dir=str(tmp_path / "gpus"), job_name="gpus", nodes=1,
                        gpus_per_node=0, tasks_per_node=2, python=str(stand_in_python(tmp_path / "python", command)),
                        workdir=str(tmp_path))
    script = write_script(spec, render_script(spec))
    info = slurm_cluster.wait_job(slurm_cluster.sbatch(script), timeout=60)
    out = _logs(tmp_path / "gpus")
    assert info["JobState"] == "COMPLETED", out
    want = {"all": ["0: rank=0 local=0 visible=0,1,2,3 cuda=0 LOCAL_RANK=0",
                    "1: rank=1 local=1 visible=0,1,2,3 cuda=1 LOCAL_RANK=1"],
            "one": ["0: rank=0 local=0 visible=2 cuda=0 LOCAL_RANK=0",
                    "1: rank=1 local=1 visible=3 cuda=0 LOCAL_RANK=0"]}[binding]
    for line in want:
        assert line in out, out


@pytest.mark.slurm
def test_exit_75_requeues_and_resumes(slurm_cluster, tmp_path):
    script, run_dir = _job(tmp_path, "requeue", _bash(
        'R=${SLURM_RESTART_COUNT:-0}; echo "task $SLURM_PROCID restart $R"; [ "$R" -ge 1 ] || exit 75'))
    info = slurm_cluster.wait_job(slurm_cluster.sbatch(script), timeout=60)
    out = _logs(run_dir)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0"), out
    assert "1: task 1 restart 0" in out and "1: task 1 restart 1" in out
    assert "requeueing job" in out and len(list((run_dir / "slurm").glob("requeue-*.restart1.out"))) == 1


@pytest.mark.slurm
def test_restart_cap_stops_a_loop(slurm_cluster, tmp_path):
    script, run_dir = _job(tmp_path, "loop", _bash("exit 75"), nodes=1, max_restarts=1)
    info = slurm_cluster.wait_job(slurm_cluster.sbatch(script), timeout=60)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("FAILED", "1", "75:0"), _logs(run_dir)
    assert "giving up" in _logs(run_dir)


# A stand-in trainer that fails every time; on its first run it commits a checkpoint first (COMMITTED listing no
# files, then `latest`), as a run that crashes after its first periodic save.
FAILING = ('R=${SLURM_RESTART_COUNT:-0}; echo "task $SLURM_PROCID restart $R"; '
           'if [ "$R" = 0 ] && [ "$SLURM_PROCID" = 0 ]; then d=$RUN/checkpoints/step_00000002; mkdir -p $d; '
           'echo \'{"files": {}}\' > $d/COMMITTED; printf step_00000002 > $RUN/checkpoints/latest; fi; '
           '[ "$SLURM_PROCID" = 1 ] && exit 1; exit 0')


@pytest.mark.slurm
def test_failures_requeue_after_a_new_checkpoint_and_stop_at_the_second_without(slurm_cluster, tmp_path):
    """Restart 0 commits a checkpoint and crashes: requeued. Restart 1 crashes without a new one: tried once more.
    Restart 2 likewise: the second failure in a row without a new checkpoint stops the job, saying so."""
    command = _bash(f"RUN={shlex.quote(str(tmp_path / 'fail'))}; " + FAILING)
    script, run_dir = _job(tmp_path, "fail", command)
    info = slurm_cluster.wait_job(slurm_cluster.sbatch(script), timeout=90)
    out = _logs(run_dir)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("FAILED", "2", "1:0"), out
    assert "a newer checkpoint was committed: restart 1 of at most 50, resuming from step 2" in out
    assert "no new checkpoint since the last start: one more try: restart 2 of at most 50" in out
    assert "2 times in a row without a new checkpoint (newest: step 2): giving up" in out
    assert out.count("requeueing job") == 2 and "not requeueing" in out


@pytest.mark.slurm
def test_chain_runs_after_preemption_and_stops_when_done(slurm_cluster, tmp_path):
    # First link: "preempted" (75, no requeue in chain mode); second: finishes and writes DONE; third: no-op.
    out = tmp_path / "chain"
    script, run_dir = _job(tmp_path, "chain", _bash(
        f'cd {shlex.quote(str(out))} && if [ -e started ]; then touch DONE; else touch started; exit 75; fi'),
        nodes=1, requeue=False)
    ids = submit(script, chain=3, env=slurm_cluster.env)
    assert slurm_cluster.job_info(ids[1])["Dependency"].startswith(f"afterany:{ids[0]}")
    assert slurm_cluster.job_info(ids[2])["Dependency"].startswith(f"afterany:{ids[1]}")
    infos = [slurm_cluster.wait_job(j, timeout=60) for j in ids]
    logs = _logs(run_dir)
    assert [(i["JobState"], i["ExitCode"], i["Restarts"]) for i in infos] == [
        ("FAILED", "75:0", "0"), ("COMPLETED", "0:0", "0"), ("COMPLETED", "0:0", "0")], logs
    assert "requeue is off" in _logs(run_dir, f"*-{ids[0]}.out")
    assert "the run has finished, nothing to do" in _logs(run_dir, f"*-{ids[2]}.out")
    assert not list((run_dir / "slurm").glob(f"*-{ids[2]}.restart*"))  # the third never started a step


@pytest.mark.slurm
@pytest.mark.parametrize("how", ["preempt", "signal"])
def test_signalled_job_checkpoints_and_requeues(slurm_cluster, tmp_path, how):
    # The task stands in for the trainer: on SIGUSR1 it "checkpoints" (a marker file per task: what a task received
    # is read from the file system, not from Slurm's forwarding of its output) and exits 75. The signal comes from a
    # real preemption (Slurm sends the job's --signal at once), or from `scancel --signal=USR1` to the job's tasks.
    where = shlex.quote(str(tmp_path))
    script, run_dir = _job(tmp_path, "preempt", _bash(
        'if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then echo resumed; exit 0; fi\n'
        f'trap \'touch {where}/got_usr1.$SLURM_PROCID; echo "got USR1"; exit 75\' USR1\n'
        f'touch {where}/ready.$SLURM_PROCID; sleep 60 & wait'))
    jobid = slurm_cluster.sbatch(script)
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"ready.{rank}").exists() for rank in (0, 1)):  # both tasks have set their trap
        assert time.monotonic() < deadline, _logs(run_dir)
        time.sleep(0.2)
    if how == "preempt":
        slurm_cluster.preempt(jobid)
    else:
        slurm_cluster.signal(jobid, "USR1")
    info = slurm_cluster.wait_job(jobid, timeout=60)
    out = _logs(run_dir)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), out
    assert [(tmp_path / f"got_usr1.{rank}").exists() for rank in (0, 1)] == [True, True], out
    assert "step finished with exit code 75" in out and "requeueing job" in out, out
    assert "got USR1" in out and "0: resumed" in out and "1: resumed" in out


def test_sbatch_failure_is_reported(tmp_path, capsys, monkeypatch):
    # No sbatch on this machine: the script is written, submission fails with exit 1 and says why.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    cfg = _config(tmp_path, str(tmp_path / "run"))
    assert submit_main([str(cfg), "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pretrain submit:") and "sbatch" in err
    assert (tmp_path / "run" / "slurm" / "demo.sbatch").is_file()


def test_missing_slurm_fails_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="Slurm is not installed .*tools/install_slurm.sh"):
        ensure_slurm_installed()


def test_pretrain_command_has_submit(tmp_path, capsys):
    from pretrain.cli import main

    cfg = _config(tmp_path, str(tmp_path / "run"))
    # Overrides after the flags, as the contract writes them, reach the trainer's command line.
    assert main(["submit", str(cfg), "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1", "--dry-run",
                 "train.max_steps=3"]) == 0
    assert _srun_line(capsys.readouterr().out).endswith(f"train {cfg} train.max_steps=3")

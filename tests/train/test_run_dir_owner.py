"""One owner per run directory (pretrain.train.owner): real processes claim it; a second job is refused while the
owner lives and takes over once it is dead; the same job (a requeue, a restart) takes over at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from helpers.runs import ROOT

from pretrain.config import ConfigError
from pretrain.train import owner

CLAIM_AND_WAIT = textwrap.dedent("""
    import sys, time
    from pretrain.train.owner import claim
    claim(sys.argv[1])
    print("claimed", flush=True)
    time.sleep(600)
""")


def _owner_process(run_dir, job: str) -> subprocess.Popen:
    """Another job (its own job id) that owns `run_dir` and lives until killed."""
    env = {**os.environ, "SLURM_JOB_ID": job}
    proc = subprocess.Popen([sys.executable, "-c", CLAIM_AND_WAIT, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env)
    assert proc.stdout.readline().strip() == "claimed"
    return proc


@pytest.mark.slow
def test_a_second_job_is_refused_while_the_owner_lives_and_takes_over_when_it_died(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "2002")
    first = _owner_process(tmp_path, "1001")
    try:
        with pytest.raises(owner.RunDirOwned) as refused:
            owner.claim(tmp_path)
        message = str(refused.value)
        assert f"is in use by job 1001 on {os.uname().nodename} (pid {first.pid}, since " in message, message
        assert isinstance(refused.value, ConfigError)  # exit 2: not worth a restart
        assert json.loads((tmp_path / owner.OWNER).read_text())["job"] == "1001"  # untouched
    finally:
        first.kill()
        first.wait()
    start = time.monotonic()
    owner.claim(tmp_path)  # the owner is dead (SIGKILL): taken over
    assert time.monotonic() - start < 1.0
    mine = json.loads((tmp_path / owner.OWNER).read_text())
    assert (mine["job"], mine["pid"]) == ("2002", os.getpid())
    assert "is gone; this job (2002) takes it over" in caplog.text
    owner.release(tmp_path)
    assert not (tmp_path / owner.OWNER).exists()


@pytest.mark.slow
def test_the_same_job_takes_over_and_another_host_is_judged_by_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    same = _owner_process(tmp_path, "77")  # a requeued job keeps its id: its earlier incarnation is over
    try:
        owner.claim(tmp_path)
        assert json.loads((tmp_path / owner.OWNER).read_text())["pid"] == os.getpid()
    finally:
        same.kill()
        same.wait()
    path = tmp_path / owner.OWNER
    path.write_text(json.dumps({"job": "88", "host": "another-node", "pid": 1, "started": 0.0, "claimed": 0.0}))
    with pytest.raises(owner.RunDirOwned, match="in use by job 88 on another-node"):
        owner.claim(tmp_path)  # its heartbeat (the file's mtime) is fresh
    old = time.time() - owner.STALE_S - 5
    os.utime(path, (old, old))
    owner.claim(tmp_path)  # no heartbeat for longer than STALE_S: gone
    assert json.loads(path.read_text())["job"] == "77"
    before = path.stat().st_mtime
    os.utime(path, (old, old))
    owner.heartbeat(tmp_path)
    assert path.stat().st_mtime > before

"""A real Slurm cluster on this one machine, for tests: munged + slurmctld + 2 slurmd "nodes" (n1, n2) on loopback
addresses 127.0.0.11 / 127.0.0.12, all state in a private temporary directory.

Each slurmd runs in its own mount + UTS namespace with a private /etc/hosts and its node name as hostname, so that
jobs (which inherit both) resolve n1/n2 and `hostname` says which node they are on; the machine's own /etc/hosts is
never touched. Ports are picked free and the first job id is random, so two clusters (two test runs) can run
side by side. `cred_expire=5` makes a requeued job start again within seconds; two partitions (`batch`, default, low
priority with a 10 s GraceTime; `urgent`, high priority) make real preemption possible: see `SlurmCluster.preempt`.

Use the session fixture `slurm_cluster` (import it into conftest.py). Without Slurm installed it runs
tools/install_slurm.sh when it can (root, not CI); in CI (CI=true) a missing Slurm is a failure, never a skip.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pretrain.ports import free_port

REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / "tools" / "install_slurm.sh"
NODES = (("n1", "127.0.0.11"), ("n2", "127.0.0.12"))
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel")
# PREEMPTED is left out: with PreemptMode=REQUEUE it only passes on the way back to PENDING.
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "BOOT_FAIL", "DEADLINE"})
CLIENT_TIMEOUT = 15  # s; a client that cannot reach the controller retries for ~9 s before giving up

SLURM_CONF = """\
ClusterName=pretraintest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctl_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/sock,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
# Nodes declare more CPUs than this machine has, so several small test jobs run at once.
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=600
FirstJobId={first_job_id}
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
{nodes}
PartitionName=batch Nodes={node_names} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=10
PartitionName=urgent Nodes={node_names} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


class SlurmError(RuntimeError):
    """A cluster that would not start, or a client command that failed; the message carries the daemon logs."""


class SlurmCluster:
    """Start/stop the daemons and drive jobs with the real client commands (every call has a timeout)."""

    def __init__(self, root: str | Path, nodes: tuple[tuple[str, str], ...] = NODES, cpus_per_node: int = 4):
        self.root = Path(root)
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.conf = self.root / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for var in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":
                del self.env[var]  # a test run inside a Slurm job must not leak that job's settings
        self._procs: list[tuple[str, subprocess.Popen]] = []

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 30) -> None:
        for sub in ("etc", "munge", "state", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # munged refuses a socket directory others cannot traverse
        os.chmod(self.root / "munge", 0o755)
        self._write_config()
        try:
            self._start_munge()
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            for name, _addr in self.nodes:
                self._spawn(f"slurmd-{name}", self._in_node_namespace(name, ["slurmd", "-D", "-f", str(self.conf),
                                                                             "-N", name]))
            self._wait_nodes_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel every job, stop the daemons, then end what those jobs left behind (found by our SLURM_CONF)."""
        if any(p.poll() is None for name, p in self._procs if name == "slurmctld"):
            ids = self.squeue_ids()
            if ids:
                self.run("scancel", "--full", *map(str, ids), check=False, timeout=5)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.squeue_ids():
                time.sleep(0.3)
        for _name, proc in reversed(self._procs):
            _terminate(proc)
        self._procs.clear()
        self._kill_leftovers()

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _write_config(self) -> None:
        nodes = "\n".join(f"NodeName={n} NodeAddr={addr} NodeHostname={n} Port={free_port()} "
                          f"CPUs={self.cpus_per_node} State=UNKNOWN" for n, addr in self.nodes)
        self.conf.write_text(SLURM_CONF.format(
            root=self.root, ctl_port=free_port(), first_job_id=random.randrange(1000, 60000),
            nodes=nodes, node_names=",".join(n for n, _ in self.nodes)))
        hosts = "127.0.0.1 localhost\n" + "".join(f"{addr} {n}\n" for n, addr in self.nodes)
        (self.root / "etc" / "hosts").write_text(hosts)

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        m = self.root / "munge"
        self._spawn("munged", ["munged", "-F", "--force", f"--socket={m}/sock", f"--key-file={key}",
                               f"--pid-file={m}/munged.pid", f"--seed-file={m}/seed", f"--log-file={m}/munged.log"])
        _wait_for(lambda: (m / "sock").exists(), 10, "munged socket", self.logs)

    def _in_node_namespace(self, name: str, argv: list[str]) -> list[str]:
        # A private mount + UTS namespace: our /etc/hosts bound over the real one, hostname = node name.
        hosts = self.root / "etc" / "hosts"
        script = f'mount --bind "{hosts}" /etc/hosts && hostname "{name}" && exec "$@"'
        return ["unshare", "--mount", "--uts", "sh", "-c", script, "sh", *argv]

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.root / "log" / f"{name}.stdout", "ab") as log:  # the daemon keeps its own copy of the fd
            proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs.append((name, proc))
        time.sleep(0.05)
        if proc.poll() is not None:
            raise SlurmError(f"{name} exited at once ({proc.returncode})\n{self.logs()}")

    def _wait_nodes_idle(self, timeout: float) -> None:
        want = {n for n, _ in self.nodes}

        def idle() -> bool:
            for name, proc in self._procs:
                if proc.poll() is not None:
                    raise SlurmError(f"{name} died during start-up ({proc.returncode})\n{self.logs()}")
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=5).stdout
            states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
            return all(states.get(n) == "idle" for n in want)

        _wait_for(idle, timeout, "both nodes idle in sinfo", self.logs)

    def _kill_leftovers(self) -> None:
        marker = f"SLURM_CONF={self.conf}".encode()
        for pid_dir in Path("/proc").glob("[0-9]*"):
            if pid_dir.name == str(os.getpid()):
                continue
            try:
                if marker in (pid_dir / "environ").read_bytes().split(b"\0"):
                    os.kill(int(pid_dir.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue

    def logs(self, tail: int = 30) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ---------------------------------------------------------------- client commands
    def run(self, *argv: str, check: bool = True, timeout: float = CLIENT_TIMEOUT) -> subprocess.CompletedProcess:
        try:
            res = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise SlurmError(f"{' '.join(argv)}: no answer in {timeout} s\n{self.logs()}") from err
        if check and res.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}\n{self.logs()}")
        return res

    def sbatch(self, script: str | Path, *args: str) -> int:
        """Submit a script file with extra sbatch options; returns the job id."""
        out = self.run("sbatch", "--parsable", *args, str(script)).stdout.strip()
        return int(out.split(";")[0])

    def job_info(self, jobid: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, BatchHost, NodeList, Dependency, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(jobid)).stdout.strip()
        # One line of Key=Value pairs; a value may hold spaces (paths), so split only before the next `Key=`.
        fields = re.split(r" (?=[A-Za-z][\w:/]*=)", out)
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def job_state(self, jobid: int) -> str:
        return self.job_info(jobid).get("JobState", "UNKNOWN")

    def squeue_ids(self) -> list[int]:
        out = self.run("squeue", "-h", "-o", "%i", check=False, timeout=5).stdout
        return [int(x) for x in out.split() if x.isdigit()]

    def wait_job(self, jobid: int, timeout: float = 60, states: frozenset[str] = FINAL_STATES) -> dict[str, str]:
        """Poll until the job reaches one of `states` (default: any final state); returns its last job_info."""
        info: dict[str, str] = {}

        def reached() -> bool:
            nonlocal info
            info = self.job_info(jobid)
            return info.get("JobState") in states

        _wait_for(reached, timeout, f"job {jobid} in {sorted(states)} (last: {info})", self.logs, every=0.3)
        return info

    def signal(self, jobid: int, sig: str = "USR1", target: str = "steps") -> None:
        """Send a signal like Slurm does: to the job steps' tasks (`steps`, what `--signal=SIG@T` does), to the
        batch shell only (`batch`), or to everything (`full`)."""
        flags = {"steps": [], "batch": ["--batch"], "full": ["--full"]}[target]
        self.run("scancel", f"--signal={sig}", *flags, str(jobid))

    def lose_node(self, name: str) -> None:
        """The node `name` dies: its slurmd and every process of its namespace (job steps included) SIGKILLed at
        once."""
        (proc,) = [p for n, p in self._procs if n == f"slurmd-{name}"]
        namespace = os.readlink(f"/proc/{proc.pid}/ns/uts")
        for pid_dir in Path("/proc").glob("[0-9]*"):
            try:
                if os.readlink(pid_dir / "ns" / "uts") == namespace:
                    os.kill(int(pid_dir.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue
        proc.wait()
        self._procs = [(n, p) for n, p in self._procs if p is not proc]

    def restore_node(self, name: str) -> None:
        """The node comes back (a reboot): its slurmd again, which re-registers it (ReturnToService=2)."""
        self._spawn(f"slurmd-{name}", self._in_node_namespace(name, ["slurmd", "-D", "-f", str(self.conf), "-N",
                                                                     name]))

    def preempt(self, jobid: int, hold_s: float = 1.0) -> int:
        """Really preempt a running job of partition `batch`: an exclusive job on its nodes in the high-priority
        partition `urgent`. The victim's tasks get their --signal at once, SIGTERM after the 10 s GraceTime, and
        Slurm requeues the victim. Returns the id of the preempting job."""
        nodes = self.job_info(jobid)["NodeList"]
        return int(self.run("sbatch", "--parsable", "--partition=urgent", "--exclusive", f"--nodelist={nodes}",
                            f"--nodes={len(self.run('scontrol', 'show', 'hostnames', nodes).stdout.split())}",
                            "--output=/dev/null", f"--wrap=sleep {hold_s}").stdout.strip().split(";")[0])


def _terminate(proc: subprocess.Popen, grace: float = 5) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _wait_for(cond, timeout: float, what: str, logs, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SlurmError(f"timed out after {timeout} s waiting for {what}\n{logs()}")
        time.sleep(every)


def stand_in_python(path: Path, command: list[str]) -> Path:
    """An executable at `path` to give a job as its Python (`pretrain submit --python`, `SlurmJobSpec.python`): where
    the sbatch template starts the trainer (`PYTHON -m pretrain train CONFIG ...`) it runs `command` instead,
    ignoring those arguments; any other use (the template's `PYTHON -m pretrain.launch.restarts ...`) goes to this
    test's Python. So the real template runs with a small test program in place of training."""
    path.write_text("#!/bin/bash\n"
                    'if [ "$1" = -m ] && [ "$2" = pretrain ] && [ "$3" = train ]; then\n'
                    f"    exec {shlex.join(command)}\n"
                    "fi\n"
                    f'exec {shlex.quote(sys.executable)} "$@"\n')
    path.chmod(0o755)
    return path


def ensure_slurm_installed() -> None:
    """Fail (never skip) without Slurm in CI; elsewhere install it with tools/install_slurm.sh when we are root."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if not missing:
        return
    if os.environ.get("CI", "").lower() not in ("", "0", "false") or os.geteuid() != 0:
        pytest.fail(f"Slurm is not installed (missing: {', '.join(missing)}); run tools/install_slurm.sh "
                    "(as root; `make test` does it)", pytrace=False)
    res = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        pytest.fail(f"tools/install_slurm.sh failed ({res.returncode}):\n{res.stdout}\n{res.stderr}", pytrace=False)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running 2-node cluster for the whole test run; yields the SlurmCluster (use `.env` for subprocesses)."""
    ensure_slurm_installed()
    # A short path: the munge socket path must fit in a sockaddr_un (108 bytes).
    root = tempfile.mkdtemp(prefix="slurm-", dir="/tmp")
    cluster = SlurmCluster(root)
    try:
        try:
            cluster.start()
        except SlurmError as err:
            pytest.fail(f"the local Slurm cluster did not start: {err}", pytrace=False)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)

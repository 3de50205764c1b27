"""Local multi-process launch: torchrun with one process per GPU (or N CPU ranks), each running `pretrain train`.

The config is loaded and validated here first, so a bad key fails once, before N processes start.

Exit codes: 0 the run finished (or stopped at train.stop_at_step), 2 a config or usage error, 75 preempted (a signal
made the trainer commit a checkpoint and exit; run the same command again to resume), 76 the hang watchdog ended
the run, anything else a failure. With `max_restarts` a failure is restarted in-job, bounded (pretrain.launch.restarts).

When a run fails, the summary names the rank that stalled (the watchdog's verdict) or exited first (this launcher
watches torchrun's workers), not torchrun's "root cause", which is the first rank it saw fail: often a healthy one
that gave up waiting for the culprit.

Signals: SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to this launcher go to torchrun, which passes
them on to every worker (the trainer checkpoints and exits 75 on SIGUSR1 / SIGTERM) and kills the workers that have
not exited after `shutdown_timeout` seconds.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from pretrain.config import ConfigError, load_config
from pretrain.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_PREEMPTED, EXIT_STALLED, SHUTDOWN_TIMEOUT
from pretrain.launch.restarts import decide, newest_step
from pretrain.ports import free_port
from pretrain.train.watchdog import VERDICT, read_verdict

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def default_nproc() -> int:
    """One process per visible GPU, or 1 on a machine without GPUs."""
    import torch

    return torch.cuda.device_count() or 1


def torchrun_command(config: str, nproc: int, overrides: list[str], master_port: int,
                     shutdown_timeout: int = SHUTDOWN_TIMEOUT) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(master_port),
            "--signals-to-handle", ",".join(s.name for s in FORWARDED), "--shutdown-timeout", str(shutdown_timeout),
            "-m", "pretrain", "train", config, *overrides]


def _error(message: str) -> int:
    print(f"pretrain launch: {message}", file=sys.stderr)
    return EXIT_CONFIG


def launch_local(config: str, nproc: int | None, overrides: list[str], master_port: int | None = None,
                 shutdown_timeout: int = SHUTDOWN_TIMEOUT, max_restarts: int = 0) -> int:
    """Run `pretrain train CONFIG OVERRIDES` in `nproc` local processes (default: one per GPU, else 1), restarting
    after a failure up to `max_restarts` times (pretrain.launch.restarts), and return the exit code described in the
    module docstring."""
    nproc = default_nproc() if nproc is None else nproc
    if nproc < 1:
        return _error("--nproc must be at least 1")
    if shutdown_timeout < 1 or max_restarts < 0:
        return _error("--shutdown-timeout must be at least 1 s and --max-restarts at least 0")
    try:
        cfg = load_config(config, overrides)
        cfg.check_world_size(nproc)
    except ConfigError as err:
        return _error(str(err))
    env = dict(os.environ)
    # Without this, each CPU rank spawns a thread per core and 2 ranks on 2 cores thrash.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # The job this launcher is: its restarts own the run directory (pretrain.train.owner), another job does not.
    env.setdefault("PRETRAIN_JOB_ID", f"launch-{os.uname().nodename}-{os.getpid()}")
    run_dir = Path(cfg.run.output_dir)
    restarts, in_a_row = 0, 0
    while True:
        started = newest_step(run_dir)
        cmd = torchrun_command(config, nproc, overrides, master_port or free_port(), shutdown_timeout)
        code = _attempt(cmd, env, run_dir)
        if code in (EXIT_OK, EXIT_CONFIG, EXIT_PREEMPTED):
            return code
        decision = decide(code, started, newest_step(run_dir), in_a_row, restarts, max_restarts)
        if max_restarts:
            print(f"pretrain launch: {decision.message}", file=sys.stderr, flush=True)
        if not decision.restart:
            return code
        restarts, in_a_row = restarts + 1, decision.failures_in_a_row


def _attempt(cmd: list[str], env: dict[str, str], run_dir: Path) -> int:
    """One torchrun run; its exit code as this launcher reports it (the module docstring)."""
    marker = run_dir / "PREEMPTED"
    marker.unlink(missing_ok=True)
    (run_dir / VERDICT).unlink(missing_ok=True)
    code, first = _run_forwarding_signals(cmd, env)
    # torchrun reports any non-zero worker exit (and its own exit on a signal) as 1; the trainer leaves PREEMPTED
    # when it exited for a signal after a committed checkpoint, so the "resume me" code survives the launcher.
    if code != 0 and marker.exists():
        what = marker.read_text().strip()  # the step checkpointed on the signal, or why there is no new checkpoint
        print(f"pretrain launch: stopped on a signal {f'at step {what}' if what.isdigit() else f'({what})'}; the "
              f"last committed checkpoint stands and the same command resumes the run (exit {EXIT_PREEMPTED})",
              file=sys.stderr)
        return EXIT_PREEMPTED
    if code == 0:
        return 0
    verdict = read_verdict(run_dir)
    if verdict is not None:
        print(f"pretrain launch: the hang watchdog ended the run: {verdict['message']} (exit {EXIT_STALLED})",
              file=sys.stderr, flush=True)
        return EXIT_STALLED
    if first:
        print(f"pretrain launch: {first}; torchrun's \"root cause\" above is the first failure it noticed, often a "
              "rank that gave up waiting for this one", file=sys.stderr, flush=True)
    return 128 - code if code < 0 else code  # killed by a signal: the shell's convention, 128 + its number


class _FirstExit:
    """Which of torchrun's workers exited first, seen from here: each worker's RANK is read while it runs and a pidfd
    opened on it (readable the moment the process ends), so `wait` wakes on the first exit itself, not at a poll."""

    def __init__(self, torchrun_pid: int) -> None:
        self.pid, self.first = torchrun_pid, ""
        self.workers: dict[int, tuple[int, str]] = {}  # pid -> (pidfd, rank)
        self.exited: list[str] = []
        self.start = time.monotonic()

    def wait(self, timeout: float) -> None:
        """Take up the workers started since the last call, then wait up to `timeout` s for some to exit."""
        import psutil  # DeepSpeed's dependency

        try:
            for proc in psutil.Process(self.pid).children():
                rank = None if proc.pid in self.workers else proc.environ().get("RANK")
                if rank is not None:  # None also just after the fork, before torchrun's exec set the worker's env
                    self.workers[proc.pid] = (os.pidfd_open(proc.pid), rank)
        except (psutil.Error, OSError):
            pass
        live = {fd: rank for fd, rank in self.workers.values() if rank not in self.exited}
        if not live:
            time.sleep(timeout)
            return
        ready, _, _ = select.select(list(live), [], [], timeout)
        if not ready:
            return
        gone = sorted(live[fd] for fd in ready)
        if not self.exited:
            who = f"rank {gone[0]}" if len(gone) == 1 else f"ranks {', '.join(gone)} (together)"
            self.first = f"{who} exited first, {time.monotonic() - self.start:.1f} s after the start"
        self.exited += gone

    def close(self) -> None:
        for fd, _ in self.workers.values():
            os.close(fd)


def _run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run torchrun in its own session and hand it every signal in FORWARDED exactly once. (In our process group,
    a Ctrl-C would reach it twice, and subprocess's own KeyboardInterrupt path would SIGKILL it, orphaning the
    workers, which torchrun starts in sessions of their own.) Returns its exit code and which worker exited first."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    watch = _FirstExit(proc.pid)
    try:
        while proc.poll() is None:
            watch.wait(0.1)
        return proc.returncode, watch.first
    finally:
        watch.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

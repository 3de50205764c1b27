"""Slurm: render the sbatch script of a run (launch/templates/train.sbatch) and submit it, alone or as a --chain of
dependent jobs.

Safety of the rendered script: every value that reaches a shell line is `shlex.quote`d here, before the template
sees it, so the template only places finished shell words; values in `#SBATCH` lines (parsed by sbatch, not the
shell) are restricted to names Slurm accepts or double-quoted for sbatch's own parser, and control characters are
refused everywhere, since a newline in a directive would start a shell line.

The template is package data, read through importlib.resources, so an installed package (not only a source
checkout) finds it; slurm/train.sbatch is a link to it for users who start their own from it.
"""

from __future__ import annotations

import datetime
import importlib.resources
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from pretrain.atomic_file import write_atomic
from pretrain.exit_codes import EXIT_PREEMPTED

TEMPLATE = importlib.resources.files("pretrain.launch") / "templates" / "train.sbatch"

_NAME = re.compile(r"^[A-Za-z0-9_.+,-]+$")  # partition (a list is allowed), account and QOS names
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class SlurmSpecError(ValueError):
    """A job description that cannot be rendered safely or does not make sense."""


@dataclass
class SlurmJobSpec:
    """Everything the sbatch script needs; each task runs `PYTHON -m pretrain train CONFIG OVERRIDES...`."""

    config_path: str
    output_dir: str
    job_name: str
    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    overrides: list[str] = field(default_factory=list)
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    signal_secs: int = 300
    requeue: bool = True
    max_restarts: int = 50
    exit_wait: int = 120
    setup: str | None = None
    modules: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    sbatch_options: list[str] = field(default_factory=list)
    python: str = sys.executable
    workdir: str = field(default_factory=os.getcwd)

    @property
    def run_dir(self) -> str:
        """run.output_dir as the job sees it (relative paths are relative to the submit directory)."""
        return os.path.join(self.workdir, self.output_dir)

    def validate(self) -> None:
        if not re.match(r"^[A-Za-z0-9_.-]+$", self.job_name) or self.job_name.strip(".") == "":
            raise SlurmSpecError(f"job name {self.job_name!r}: letters, digits, _ . - only (see job_name())")
        for name in ("nodes", "tasks_per_node"):
            if getattr(self, name) < 1:
                raise SlurmSpecError(f"--{name.replace('_', '-')} must be at least 1")
        if self.gpus_per_node < 0 or (self.cpus_per_task is not None and self.cpus_per_task < 1):
            raise SlurmSpecError("--gpus-per-node must be >= 0 and --cpus-per-task >= 1")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise SlurmSpecError(f"one task per GPU: --tasks-per-node ({self.tasks_per_node}) must equal "
                                 f"--gpus-per-node ({self.gpus_per_node}) on GPU nodes")
        for key in ("partition", "account", "qos"):
            value = getattr(self, key)
            if value is not None and not _NAME.match(value):
                raise SlurmSpecError(f"--{key} {value!r} is not a Slurm name (letters, digits, _ . + - ,)")
        for module in self.modules:
            _check_plain(module, "--module")
            if module.startswith("-"):
                raise SlurmSpecError(f"--module {module!r}: a module name, not an option")
        for key in self.env:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise SlurmSpecError(f"--env {key!r}: not a variable name")
        if self.signal_secs < 0 or self.max_restarts < 0 or self.exit_wait < 0:
            raise SlurmSpecError("--signal-secs, --max-restarts and --exit-wait must be >= 0")
        if self.time is not None and self.signal_secs and parse_time(self.time) <= self.signal_secs + 60:
            raise SlurmSpecError(f"--time {self.time} leaves no room for the checkpoint signal {self.signal_secs} s "
                                 "before the limit (Slurm may send it up to 60 s early)")


def parse_time(text: str) -> int:
    """Slurm's time limit formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> seconds."""
    m = _TIME.match(text.strip())
    if not m:
        raise SlurmSpecError(f"--time {text!r}: expected minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
    days, a, b, c = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if days is not None:  # D-H, D-H:M, D-H:M:S
        return int(days) * 86400 + a * 3600 + int(b or 0) * 60 + int(c or 0)
    if b is None:
        return a * 60
    if c is None:
        return a * 60 + int(b)
    return a * 3600 + int(b) * 60 + int(c)


def _check_plain(value: str, what: str) -> str:
    if _CONTROL.search(value):
        raise SlurmSpecError(f"{what} {value!r} contains a control character (newline, tab, ...)")
    return value


def directive_value(value: str) -> str:
    """A value for an `#SBATCH` line: bare when it is a plain word, else double-quoted for sbatch's parser
    (which groups on double quotes and takes a backslash-escaped quote literally)."""
    _check_plain(value, "#SBATCH value")
    if re.match(r"^[A-Za-z0-9_./:%@+=,-]+$", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def job_name(run_name: str) -> str:
    """A Slurm job and file name from the run name: anything but letters, digits and _.- becomes _."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", run_name).strip(".") or "run"


def _slurm_path(path: str) -> str:
    """A literal path inside a Slurm file-name pattern (%j etc. are ours; a % of the user's is escaped)."""
    return path.replace("%", "%%")


def _directives(spec: SlurmJobSpec) -> list[str]:
    logs = _slurm_path(os.path.join(spec.run_dir, "slurm"))
    out = [f"--job-name={directive_value(spec.job_name)}",
           f"--nodes={spec.nodes}",
           f"--ntasks-per-node={spec.tasks_per_node}"]
    if spec.gpus_per_node:
        out.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_task:
        out.append(f"--cpus-per-task={spec.cpus_per_task}")
    for key in ("time", "partition", "account", "qos"):
        if getattr(spec, key):
            out.append(f"--{key}={directive_value(getattr(spec, key))}")
    out += [f"--chdir={directive_value(spec.workdir)}",
            f"--output={directive_value(logs + '/%x-%j.out')}",
            "--open-mode=append"]  # every restart of a job appends to the job's one batch log
    if spec.signal_secs:
        out.append(f"--signal=USR1@{spec.signal_secs}")  # to the srun tasks, not the batch shell
    out.append("--requeue" if spec.requeue else "--no-requeue")
    out += [directive_value(opt) for opt in spec.sbatch_options]
    return out


def _setup_lines(spec: SlurmJobSpec) -> list[str]:
    lines = [f"module load {shlex.quote(m)}" for m in spec.modules]
    if spec.setup:
        lines.append(f"source {shlex.quote(_check_plain(os.path.abspath(spec.setup), '--setup'))}")
    return lines


def train_command(spec: SlurmJobSpec) -> list[str]:
    config = os.path.abspath(os.path.join(spec.workdir, spec.config_path))
    return [spec.python, "-m", "pretrain", "train", config, *spec.overrides]


def render_script(spec: SlurmJobSpec, template: str | Path | None = None) -> str:
    """The sbatch script for `spec` (validated first), from `template` (default: the packaged train.sbatch)."""
    spec.validate()
    for value in [spec.output_dir, spec.workdir, spec.config_path, *spec.overrides, *spec.env.values()]:
        _check_plain(value, "value")
    if "\\" in spec.output_dir + spec.workdir:  # a backslash turns off Slurm's %j etc. in the log file names
        raise SlurmSpecError(f"run.output_dir {spec.output_dir!r} / working directory: no backslashes, please")
    text = Path(template).read_text() if template else TEMPLATE.read_text()
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True, autoescape=False)
    step_log = _slurm_path(os.path.join(spec.run_dir, "slurm")) + f"/{spec.job_name}-%j.restart"
    srun = [f"--nodes={spec.nodes}", f"--ntasks-per-node={spec.tasks_per_node}", f"--wait={spec.exit_wait}",
            "--kill-on-bad-exit=0", "--label"]
    if spec.cpus_per_task:
        srun.append(f"--cpus-per-task={spec.cpus_per_task}")  # 22.05+ srun no longer inherits it from sbatch
    context = {
        "header": f"{spec.job_name}, rendered {datetime.datetime.now().isoformat(timespec='seconds')}",
        "nodes": spec.nodes,
        "tasks_per_node": spec.tasks_per_node,
        "gpus_per_node": spec.gpus_per_node,
        "directives": _directives(spec),
        "output_dir": shlex.quote(spec.run_dir),
        "requeue": int(spec.requeue),
        "preempted_exit": EXIT_PREEMPTED,
        "python": shlex.quote(spec.python),
        "max_restarts": spec.max_restarts,
        "setup_lines": _setup_lines(spec),
        "env_lines": [f"export {k}={shlex.quote(v)}" for k, v in spec.env.items()],
        "srun_options": " ".join(srun),
        # The restart count is expanded by the shell in between two quoted literal parts.
        "step_log": shlex.quote(step_log) + '"${RESTART}"' + shlex.quote(".out"),
        "command": " ".join(shlex.quote(a) for a in train_command(spec)),
    }
    return env.from_string(text).render(context)


def write_script(spec: SlurmJobSpec, text: str) -> Path:
    """Write the script to RUN_DIR/slurm/<job name>.sbatch (and create the directory Slurm writes logs into)."""
    directory = Path(spec.run_dir, "slurm")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{spec.job_name}.sbatch"
    return write_atomic(path, text, file_mode=0o755)


def check_chain(chain: int) -> None:
    if chain < 1:
        raise SlurmSpecError("--chain must be at least 1")


def submit(script: str | Path, chain: int = 1, env: dict[str, str] | None = None, timeout: float = 60) -> list[int]:
    """sbatch the script `chain` times, each job after the previous one ends in any state (afterany); job ids."""
    check_chain(chain)
    ids: list[int] = []
    for _ in range(chain):
        argv = ["sbatch", "--parsable"]
        if ids:
            argv.append(f"--dependency=afterany:{ids[-1]}")
        done = f" (already submitted: {' '.join(map(str, ids))})" if ids else ""
        try:
            res = subprocess.run([*argv, str(script)], capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"sbatch gave no answer in {timeout} s: is slurmctld reachable?{done}") from None
        if res.returncode != 0:
            raise RuntimeError(f"sbatch failed ({res.returncode}): {res.stderr.strip()}{done}")
        ids.append(int(res.stdout.strip().split(";")[0]))
    return ids

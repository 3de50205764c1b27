"""`pretrain submit CONFIG --nodes N --gpus-per-node G [...] [key=value ...]`: validate the config, render the sbatch
script into RUN_DIR/slurm/<name>.sbatch and submit it (or a --chain of K dependent jobs); the last word printed is
the job id (the last job's, for a chain). `--dry-run` prints the script and submits nothing."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pretrain.launch.slurm import SlurmJobSpec


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("submit", help="submit a training run to Slurm", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(handler=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the run's YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, passed on to the trainer")
    shape = p.add_argument_group("job shape")
    shape.add_argument("--nodes", type=int, required=True)
    shape.add_argument("--gpus-per-node", type=int, required=True, help="0 for CPU-only nodes")
    shape.add_argument("--tasks-per-node", type=int, help="default: the GPUs per node (one task per GPU); "
                       "required with --gpus-per-node 0")
    shape.add_argument("--cpus-per-task", type=int, help="CPUs per task; default: data.num_workers + 1 (the "
                       f"loader workers and the training process itself), {AUTO_CPUS_PER_TASK} with num_workers auto")
    shape.add_argument("--time", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    site = p.add_argument_group("site")
    site.add_argument("--partition")
    site.add_argument("--account")
    site.add_argument("--qos")
    site.add_argument("--module", action="append", default=[], help="`module load` this (repeatable)")
    site.add_argument("--setup", help="a shell file sourced before the run (module loads, venv activation, ...)")
    site.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                      help="export this in the job, e.g. NCCL_SOCKET_IFNAME=ib0 (repeatable)")
    site.add_argument("--sbatch-option", action="append", default=[], metavar="OPT",
                      help="an extra #SBATCH line, e.g. --sbatch-option=--exclusive (repeatable)")
    site.add_argument("--python", default=sys.executable, help="the Python that runs `-m pretrain train` "
                      "(default: this one; it must exist on the compute nodes)")
    site.add_argument("--template", help="an sbatch template to use instead of slurm/train.sbatch")
    resume = p.add_argument_group("preemption and resume")
    resume.add_argument("--chain", type=int, default=1, metavar="K",
                        help="submit K jobs, each starting after the previous one ends (afterany); implies "
                             "--no-requeue. For clusters that do not allow requeue")
    resume.add_argument("--no-requeue", action="store_true", help="do not requeue when the trainer was preempted")
    resume.add_argument("--signal-secs", type=int, default=300,
                        help="send SIGUSR1 to the trainer this long before the time limit so it checkpoints "
                             "(default 300; 0 = none)")
    resume.add_argument("--max-restarts", type=int, default=50, help="requeues before giving up (default 50)")
    resume.add_argument("--exit-wait", type=int, default=120,
                        help="seconds srun lets the other tasks finish after the first one exits (default 120)")
    resume.add_argument("--job-name", help="default: run.name")
    p.add_argument("--dry-run", action="store_true", help="print the script; submit nothing, write nothing")


def _env_pairs(items: list[str]) -> dict[str, str]:
    from pretrain.launch.slurm import SlurmSpecError

    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SlurmSpecError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


# With data.num_workers: auto the workers follow the CPUs a task is given, so the job must ask for some: 8 per
# task is what a typical 8-GPU node (64+ cores) can give each GPU; --cpus-per-task asks for more or fewer.
AUTO_CPUS_PER_TASK = 8


def cpus_per_task(flag: int | None, num_workers: int | str) -> int:
    """--cpus-per-task, else one CPU per loader worker plus one for the training process: without it Slurm gives
    a task one CPU, and every worker of the task shares that core."""
    if flag is not None:
        return flag
    return AUTO_CPUS_PER_TASK if num_workers == "auto" else int(num_workers) + 1


def build_spec(args: argparse.Namespace) -> SlurmJobSpec:
    """Load and validate the config (a bad config fails here, not on the cluster) and describe the job."""
    from pretrain.config import load_config
    from pretrain.launch.slurm import SlurmJobSpec, SlurmSpecError, job_name
    from pretrain.train.preflight import preflight

    cfg = load_config(args.config, args.overrides)
    tasks = args.tasks_per_node if args.tasks_per_node is not None else args.gpus_per_node
    if tasks < 1:
        raise SlurmSpecError("CPU-only nodes (--gpus-per-node 0) need --tasks-per-node T")
    preflight(cfg, args.nodes * tasks)  # the trainer's own start checks: models, shards, resume, batch
    return SlurmJobSpec(
        config_path=args.config, overrides=list(args.overrides), output_dir=cfg.run.output_dir,
        job_name=job_name(args.job_name or cfg.run.name), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        tasks_per_node=tasks, cpus_per_task=cpus_per_task(args.cpus_per_task, cfg.data.num_workers),
        time=args.time, partition=args.partition,
        account=args.account, qos=args.qos, signal_secs=args.signal_secs,
        requeue=not (args.no_requeue or args.chain > 1), max_restarts=args.max_restarts, exit_wait=args.exit_wait,
        setup=args.setup, modules=list(args.module), env=_env_pairs(args.env), sbatch_options=list(args.sbatch_option),
        python=args.python)


def run(args: argparse.Namespace) -> int:
    from pretrain.config import ConfigError
    from pretrain.launch.slurm import SlurmSpecError, check_chain, render_script, submit, write_script

    try:
        spec = build_spec(args)
        check_chain(args.chain)
        text = render_script(spec, args.template)
    except (ConfigError, SlurmSpecError, OSError) as err:
        print(f"pretrain submit: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(text, end="")
        return 0
    path = write_script(spec, text)
    print(f"script: {path}")
    try:
        ids = submit(path, chain=args.chain)
    except (RuntimeError, OSError) as err:  # OSError: no sbatch on this machine
        print(f"pretrain submit: {err}", file=sys.stderr)
        return 1
    for i, jobid in enumerate(ids[:-1]):
        print(f"chain {i + 1}/{len(ids)}: job {jobid}")
    prefix = f"chain {len(ids)}/{len(ids)}: " if len(ids) > 1 else ""
    print(f"{prefix}Submitted batch job {ids[-1]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m pretrain.cli.submit ...`: the same command without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="pretrain submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    # argparse stops filling a positional list at the first option: take key=value words found after options too.
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if "=" not in x or x.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = [*args.overrides, *extra]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

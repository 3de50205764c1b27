"""Process exit codes that a launcher, an sbatch script or a user's script can act on: a leaf, shared by the trainer
(which exits with them), `launch/` (which passes them on and restarts on them) and the sbatch template (which
requeues on them); and the time a local launch gives the trainer to exit after a signal."""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved on a signal; resume me.
EXIT_STALLED = 76  # the hang watchdog ended the run (a rank made no progress); the last checkpoint stands.

# Failures never worth a restart: the same command fails the same way (a config error, a run directory that another
# live job owns). Any other non-zero code is a crash, a hang or a lost node: restarted, bounded
# (pretrain.launch.restarts).
NOT_RESTARTABLE = (EXIT_CONFIG,)

# Seconds the training processes get after a signal to finish their step, commit a checkpoint and exit (with
# EXIT_PREEMPTED) before a local launch kills them; torchrun's own default, 30 s, is short for a large model's save.
SHUTDOWN_TIMEOUT = 120

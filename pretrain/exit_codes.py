"""Process exit codes that a launcher, an sbatch script or a user's script can act on: a leaf, shared by the trainer
(which exits with them), `launch/` (which passes them on) and the sbatch template (which requeues on preemption)."""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved on a signal; resume me.

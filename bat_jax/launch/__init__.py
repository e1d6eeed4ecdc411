"""Launchers for `bat-jax pretrain`: a TPU VM pod, a SLURM GPU cluster, one local machine.

`commands` builds the command lines (pure functions, tested without gcloud or sbatch); `cli` is
`bat-jax launch tpu|slurm|local` (also `python -m bat_jax.launch ...` and the scripts in launch/), which
prints them with ``--dry-run`` or runs them. Every launcher runs the same `bat-jax pretrain` command each
time it is given the same arguments, so running it again after a preemption resumes from the workdir's
latest checkpoint. README "Scaling up" has a worked example of each.
"""

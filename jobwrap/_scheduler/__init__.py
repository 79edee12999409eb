"""The scheduler's side: what Slurm tells the job, its signals, the stop decision, requeue, ``jobwrap run``, sbatch.

Private: the public names are in :mod:`jobwrap`. Imports :mod:`jobwrap._storage` only.
"""

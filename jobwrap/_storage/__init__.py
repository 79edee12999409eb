"""Checkpoints on shared storage: the atomic, verified store, what a checkpoint holds, the directory's lock and log.

Private: the public names are in :mod:`jobwrap`. Imports nothing of jobwrap but
:mod:`jobwrap.errors`, :mod:`jobwrap._config` and :mod:`jobwrap._format`.
"""

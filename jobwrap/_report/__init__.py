"""What jobwrap tells a user about a run or a setup: its history, goodput, lead time, timeline, preflight checks.

Private: the public names are in :mod:`jobwrap`. Imports :mod:`jobwrap._storage` and :mod:`jobwrap._scheduler`.
"""

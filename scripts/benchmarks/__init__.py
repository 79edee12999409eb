"""jobwrap's benchmarks, one module per measurement; ``scripts/bench`` runs them (``python -m benchmarks``).

common.py holds what they share (the state, the clock's helpers, the work directory, the figures); report.py
writes docs/benchmarks.md from the results; __main__.py runs the full set. The rest measure one thing each and
import only common.py (report.py and __main__.py import the measurements, never the other way):

  save, pause, resume, step  jobwrap against torch.save / torch.load and the disk, on one process's state
  peers                      torch.distributed.checkpoint on the same state
  relaunch                   a real signal to `jobwrap run` -> the relaunched trainer's first new step
  resume_position            a mid-epoch resume's time to its first batch, by position in the epoch
  rank_pause, rank_write     periodic saves' pause and the signal's save with several ranks
  stripe_check, agreement    the striped save's check and the stop agreement between ranks (docs/multirank.md)
  persistent_workers         an epoch with persistent loader workers (docs/guide.md)

Those with a ``main()`` also run alone: ``scripts/bench NAME [args]`` (for example ``scripts/bench rank_pause
--quick``). tests/test_layout.py checks that no module here imports in a circle.
"""

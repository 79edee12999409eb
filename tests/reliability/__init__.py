"""jobwrap's reliability and security campaign: inject faults, count what happens, write docs/reliability.md.

Run it through ``scripts/reliability`` (which sets up ``.venv`` first)::

    scripts/reliability            # the full campaign (a few minutes on 2 cores)
    scripts/reliability --quick    # a small version of every section
    scripts/reliability --only kills,bad-files --seed 7 --out r.md

Every fault is real where the machine allows it: processes are SIGKILLed at
random moments (torch is imported once and each trial is an ``os.fork``),
small filesystems are real size-limited tmpfs mounts (root only; skipped with
the reason otherwise), signals are real signals. Where a fault cannot be made
real here (an EIO from the disk) it is injected at the system-call boundary and
the table says so. ``tests/test_reliability.py`` runs the quick sizes of the
same checks under pytest.

The modules, one section each: ``kills``, ``disk`` (on ``mounts``), ``badfiles``,
``hostile``, ``signals``, ``scheduler``, ``policy``. Each fault is a check
returning ``(ok, observed)``, declared with its expectation as a
``results.Fault``; ``__main__`` runs the sections and ``report`` writes the page.
Shared by all: ``training`` (a model whose content names its step, real
Sessions), ``files`` (checkpoint files: write, damage, audit), ``forked``
(training children to signal and kill), and ``internals``, the one module that
reaches into jobwrap's internals.
"""

"""Adapters for other projects' internals (torch and its DCP, torchdata, Lightning and its loggers, transformers,
W&B), and the table of tested releases (versions.py).

Every private attribute or function of another project that jobwrap relies on is reached
through one small adapter here, which names the versions it was checked on and falls back
to a safe path (replay, or a refusal naming the version) when it does not recognise what
it finds. Each adapter has a canary test in tests/test_compat.py; tests/test_layout.py checks
that no module outside this package imports another project's private names.
"""

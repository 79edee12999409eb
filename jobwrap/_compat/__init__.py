"""Adapters for other projects' internals (torch, torchdata, Lightning, transformers).

Every private attribute or function of another project that jobwrap relies on is reached
through one small adapter here, which names the versions it was checked on and falls back
to a safe path (replay, or a refusal naming the version) when it does not recognise what
it finds. Each adapter has a canary test in tests/test_compat.py.
"""

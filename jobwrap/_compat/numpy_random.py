"""NumPy's global random stream, as an object (checked on NumPy 2.x): ``numpy.random.mtrand._rand``.

The RandomState behind ``np.random.seed``/``np.random.rand`` is the stream jobwrap saves as the
process's NumPy state; when it looks for a dataset's own generators it leaves that one out, so
it is not saved twice under two names. NumPy exports no handle to it. Where it is gone, nothing
is left out (a dataset that holds the global stream has it restored twice, to the same state).
The canary is in tests/test_compat.py.
"""
from __future__ import annotations

import sys
from typing import Any


def global_stream() -> Any:
    """The legacy global RandomState of an imported NumPy, or None (NumPy not imported, or the name gone)."""
    numpy = sys.modules.get("numpy")
    mtrand = getattr(getattr(numpy, "random", None), "mtrand", None)
    return getattr(mtrand, "_rand", None)

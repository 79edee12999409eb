"""``python -m jobwrap`` is the ``jobwrap`` command."""
from jobwrap.cli import main

raise SystemExit(main())

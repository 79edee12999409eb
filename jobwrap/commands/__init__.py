"""One module per ``jobwrap`` subcommand, each with ``register(subparsers)``.

A command module defines ``NAME``, ``register(subparsers)`` that adds its
parser and sets ``func`` to a function taking the parsed namespace and
returning the exit code. Commands import torch lazily so that ``--help``,
``submit`` and ``ls`` start fast.
"""

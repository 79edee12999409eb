"""A Session's lifecycle: its phases, and the one table of the moves between them (pure).

    CREATED --start()--> STARTING --a checkpoint (or init_from) loaded--> RESUMING --first boundary--> TRAINING
                            |   \\--nothing to resume------------------------------------------------> TRAINING
                            \\--start failed--> CREATED
    TRAINING --a stop at a boundary--> STOPPING --committed--> PREEMPTED (Preempted raised)
    every started phase --close()--> CLOSED --start() again--> STARTING

RESUMING lasts until the first boundary frees the loaded checkpoint (the RNG streams are put
back there); STOPPING is the signal's save. A script that catches Preempted (or the failure of
the signal's save) and trains on stops again at its next boundary: STOPPING is entered again.
State that belongs to one feature (the batch in hand, the epoch's end, the background save)
lives with that feature, not here.
"""
from __future__ import annotations

import enum


class Phase(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RESUMING = "resuming"
    TRAINING = "training"
    STOPPING = "stopping"
    PREEMPTED = "preempted"
    CLOSED = "closed"


#: The phases in which the session is started: its trap installed, its directory claimed; close() undoes them.
STARTED = frozenset({Phase.STARTING, Phase.RESUMING, Phase.TRAINING, Phase.STOPPING, Phase.PREEMPTED})

#: Every allowed move, from each phase.
MOVES: dict[Phase, frozenset[Phase]] = {
    Phase.CREATED: frozenset({Phase.STARTING}),
    Phase.STARTING: frozenset({Phase.RESUMING, Phase.TRAINING, Phase.CREATED, Phase.CLOSED}),
    Phase.RESUMING: frozenset({Phase.TRAINING, Phase.CLOSED}),
    Phase.TRAINING: frozenset({Phase.STOPPING, Phase.CLOSED}),
    Phase.STOPPING: frozenset({Phase.PREEMPTED, Phase.STOPPING, Phase.CLOSED}),
    Phase.PREEMPTED: frozenset({Phase.STOPPING, Phase.CLOSED}),
    Phase.CLOSED: frozenset({Phase.STARTING}),
}


class PhaseError(RuntimeError):
    """A move the table forbids: a bug in jobwrap, not in the training script."""


def move(current: Phase, new: Phase) -> Phase:
    """``new``, when the table allows it from ``current``; else PhaseError (never a silent odd state)."""
    if new not in MOVES[current]:
        allowed = ", ".join(sorted(p.value for p in MOVES[current]))
        raise PhaseError(f"a Session cannot go from {current.value} to {new.value} (from {current.value}: "
                         f"{allowed}); this is a bug in jobwrap: please report it with this traceback")
    return new

"""Named crash points, for durability tests: with UNDERSTUDY_CRASH_AT="point@step" (comma-separated for several),
the trainer SIGKILLs itself when it reaches that point at that step. Deterministic where a timed kill is not:
tests/trainer/test_durability.py kills `understudy train` at each point and checks that `--resume` recovers.

Unset (always, outside tests), every check is one environment lookup.
"""

from __future__ import annotations

import os
import signal

from understudy.errors import UnderstudyError

ENV = "UNDERSTUDY_CRASH_AT"
POINTS = (
    "publish_before",  # the drafter folder is written, the registry publish has not started
    "publish_policy_after",  # the registry holds the step's policy version, not yet its drafter
    "publish_after",  # the registry holds the new drafter version; nothing else knows yet
    "metrics_write",  # half of the step's metrics.jsonl line is written (a torn line)
    "checkpoint_before_rename",  # the new checkpoint is written and fsynced under its temp name
    "checkpoint_after",  # the checkpoint is in place
    "rollout_worker",  # Ray executor: rollout worker 0 dies after its first decode step of the step (1-based)
)


class CrashPointError(UnderstudyError, ValueError):
    """UNDERSTUDY_CRASH_AT names an unknown point or a malformed step."""


def armed(point: str, step: int) -> bool:
    """True when UNDERSTUDY_CRASH_AT asks for a crash at `point` in `step`."""
    spec = os.environ.get(ENV, "")
    if not spec:
        return False
    for item in spec.split(","):
        name, _, at = item.strip().partition("@")
        if name not in POINTS or (at and not at.isdigit()):
            raise CrashPointError(f"{ENV}={spec!r}: {item!r} is not POINT or POINT@STEP with POINT one of "
                                  f"{', '.join(POINTS)}; unset {ENV} to train normally")
        if name == point and (not at or int(at) == step):
            return True
    return False


def kill() -> None:
    """Die now, as a power cut or the OOM killer would: no cleanup, no flush, no exit handlers."""
    os.kill(os.getpid(), signal.SIGKILL)


def reach(point: str, step: int) -> None:
    if armed(point, step):
        kill()

"""What goes wrong, by kind: the CLI prints a `UserError` as one line (exit 2), never a traceback.

Pure Python, importable by every layer (reporting a bad path must not first import torch or Ray).
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or an unusable environment, phrased for the user: what, where, what was expected."""


class ConfigError(UserError, ValueError):
    """A config problem, phrased for the user: file, key path, what was expected."""


class DataError(UserError, ValueError):
    """A data problem, phrased for the user as `file:line: what is wrong`."""


class ModelError(UserError, ValueError):
    """A model or tokenizer that cannot be loaded (no such directory, hub unreachable, gated...)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint directory that is missing, foreign, or from the wrong stage."""


class RewardError(UserError, RuntimeError):
    """A reward function that raised or answered something other than one float or None per completion: the same
    input fails the same way on every attempt, so Ray Train does not retry it."""


class ResourceError(UserError, RuntimeError):
    """The Ray cluster cannot hold the workers the config asks for."""


class OutOfMemory(RuntimeError):
    """Workers of a stage were killed for memory; the message says how far they got and what to change (exit 3)."""


class TrainingDiverged(RuntimeError):
    """A loss, gradient norm or weight became NaN or infinite (`engine/divergence.py`); never retried (exit 1)."""


class RunStopped(RuntimeError):
    """The run stopped early at a step boundary, with a checkpoint (`--stop-at-step`, preemption)."""

    def __init__(self, stage: str, step: int, reason: str) -> None:
        super().__init__(f"{stage}: stopped after step {step} ({reason}); run the same command again to continue "
                         "from there")
        self.step, self.reason = step, reason


# Failures that would recur on every attempt: bad input a worker found, and a run whose loss became non-finite.
# Matched by class name along the MRO, among rlhf_jobs' classes (Ray Train's controller needs to import none of them,
# and a class may move between modules).
DETERMINISTIC_FAILURES = frozenset({"UserError", "TrainingDiverged"})


def is_deterministic(error: BaseException) -> bool:
    """Whether running again would fail the same way (Ray Train does not restart such a run)."""
    return any(kind.__module__.startswith("rlhf_jobs.") and kind.__name__ in DETERMINISTIC_FAILURES
               for kind in type(error).__mro__)

"""Exit codes of `rlhf-jobs train` and `rlhf-jobs pipeline`: what a caller (a RayJob, the runner Job's
podFailurePolicy, a shell) can tell from them. helm/README.md's "Who retries what" is built on them."""

from __future__ import annotations

STAGE_FAILED = 1  # a stage failed for a reason that running it again would not change
BAD_INPUT = 2  # a config, record, path, value or cluster setup problem: fix it, then run again
OUT_OF_MEMORY = 3  # the workers ran out of memory: change the config (LoRA, fewer workers' batch...)
PREEMPTED = 75  # EX_TEMPFAIL: stopped with a checkpoint (preemption) or the cluster was unreachable: run again
DETERMINISTIC = (STAGE_FAILED, BAD_INPUT, OUT_OF_MEMORY)  # running again gives the same result


def of_driver(code: int | None) -> int:
    """The pipeline's exit code for a stage whose driver (`rlhf-jobs train`) exited with `code`."""
    return code if code in (BAD_INPUT, OUT_OF_MEMORY, PREEMPTED) else STAGE_FAILED

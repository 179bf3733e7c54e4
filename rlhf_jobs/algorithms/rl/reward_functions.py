"""Built-in reward functions, importable by name in `General.reward_functions`:

    rlhf_jobs.algorithms.rl.reward_functions:answer_match    1.0 when the completion's answer is the `answer` column's
    rlhf_jobs.algorithms.rl.reward_functions:format_regex    1.0 when the completion matches a pattern
    rlhf_jobs.algorithms.rl.reward_functions:length_penalty  -(characters / 512), at most -1

Every reward function has TRL's signature, `fn(prompts, completions, **columns) -> list[float | None]`: `prompts`
are the texts the policy was prompted with (the prompt format applied), `completions` its sampled answers (special
tokens dropped), `columns` the prompt records' other fields as lists aligned with them (e.g. `answer`); `None`
means no opinion on that completion. Pure Python: a file of your own can import these, or build variants with
`regex_reward(pattern)` and `length_penalty_over(max_chars)`:

    # my_rewards.py, named in the config as my_rewards.py:think_format
    from rlhf_jobs.algorithms.rl.reward_functions import regex_reward
    think_format = regex_reward(r"(?s)^<think>.*</think>.*$", name="think_format")
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

RewardFunction = Callable[..., list[float | None]]

_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?"
_GSM8K = re.compile(rf"####\s*\$?\s*({_NUMBER})")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANY_NUMBER = re.compile(_NUMBER)


def _number(text: str) -> Fraction | None:
    """`text` as an exact number: '1,234', '-3.50', '7/2'; None when it is not one."""
    text = text.strip().replace(",", "").rstrip(".")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def final_answer(text: str) -> Fraction | None:
    """The answer a text gives, in order of precedence: GSM8K's `#### 42`, the last `\\boxed{42}`, else the last
    number in it (`The answer is $1,234.` -> 1234). None when it has none."""
    if text is None:
        return None
    for pattern in (_GSM8K, _BOXED):
        found = pattern.findall(text)
        if found:
            numbers = _ANY_NUMBER.findall(found[-1])
            return _number(numbers[-1]) if numbers else None
    numbers = _ANY_NUMBER.findall(text)
    return _number(numbers[-1]) if numbers else None


def answer_match(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any] | None = None,
                 **columns: Any) -> list[float | None]:
    """1.0 when the completion's final answer (`final_answer`) equals the record's `answer` column (a number, or a
    text read the same way: GSM8K's `... #### 42`, `\\boxed{42}`, or its last number), else 0.0; None (no
    opinion) for a record without an answer."""
    if answer is None:
        raise ValueError("answer_match reads the prompt records' 'answer' field, and these records have none")
    rewards: list[float | None] = []
    for completion, expected in zip(completions, answer, strict=True):
        target = Fraction(expected) if isinstance(expected, int | float) and not isinstance(expected, bool) \
            else final_answer(str(expected)) if expected is not None else None
        if target is None:
            rewards.append(None)
            continue
        given = final_answer(completion)
        rewards.append(1.0 if given is not None and given == target else 0.0)
    return rewards


def regex_reward(pattern: str, name: str = "format_regex") -> RewardFunction:
    """A reward function: 1.0 for a completion that `re.fullmatch`es `pattern` (stripped of surrounding
    whitespace), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float | None]:
        return [1.0 if compiled.fullmatch(completion.strip()) else 0.0 for completion in completions]

    reward.__name__ = reward.__qualname__ = name
    return reward


# A final answer alone on the last line, as GSM8K writes it: "... #### 42".
DEFAULT_FORMAT = rf".*####\s*{_NUMBER}"


def format_regex(prompts: Sequence[str], completions: Sequence[str], format_pattern: Sequence[str | None] | None = None,
                 **columns: Any) -> list[float | None]:
    """1.0 for a completion that matches its record's `format_pattern` column (a Python regular expression, whole
    completion, `re.DOTALL`), or, for records without one, `DEFAULT_FORMAT` (text ending in GSM8K's `#### 42`);
    else 0.0. A fixed pattern of your own: `regex_reward(pattern)`."""
    patterns = format_pattern if format_pattern is not None else [None] * len(completions)
    return [1.0 if re.fullmatch(pattern or DEFAULT_FORMAT, completion.strip(), re.DOTALL) else 0.0
            for completion, pattern in zip(completions, patterns, strict=True)]


def length_penalty_over(max_chars: int, name: str = "length_penalty") -> RewardFunction:
    """A reward function: -(characters of the completion / max_chars), down to -1 at max_chars and beyond (weigh it
    with `General.reward_weights`)."""
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")

    def reward(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float | None]:
        return [-min(len(completion), max_chars) / max_chars for completion in completions]

    reward.__name__ = reward.__qualname__ = name
    return reward


length_penalty = length_penalty_over(512)

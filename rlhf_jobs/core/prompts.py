"""The prompt format, in one place, for every stage.

SFT trains on `prompt + response + EOS`, the reward model scores `prompt + response`, and PPO
generates after `prompt`: all three build `prompt` here so the reward model judges exactly
what the policy writes.

`instruction` (default) is the Dolly/Alpaca-style template below. `chat` uses the tokenizer's
chat template (the instruction, then the context, as one user turn). `raw` takes the
instruction text as is (e.g. Anthropic HH prompts ending in "\\n\\nAssistant:").
"""

from __future__ import annotations

from typing import Any

INTRO = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
INSTRUCTION_KEY = "### Instruction:"
INPUT_KEY = "### Input:"
RESPONSE_KEY = "### Response:"


def instruction_prompt(instruction: str, context: str | None = None) -> str:
    """The text before the response, ending with the response header and a newline."""
    parts = [INTRO, f"{INSTRUCTION_KEY}\n{instruction.strip()}"]
    if context and context.strip():
        parts.append(f"{INPUT_KEY}\n{context.strip()}")
    parts.append(f"{RESPONSE_KEY}\n")
    return "\n\n".join(parts)


def chat_prompt(instruction: str, context: str | None, tokenizer: Any) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "Dataset.prompt_format is 'chat' but the tokenizer has no chat template; "
            "use prompt_format: instruction"
        )
    content = instruction.strip() + (f"\n\n{context.strip()}" if context and context.strip() else "")
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def format_prompt(instruction: str, context: str | None, style: str, tokenizer: Any = None) -> str:
    if style == "instruction":
        return instruction_prompt(instruction, context)
    if style == "chat":
        return chat_prompt(instruction, context, tokenizer)
    if style == "raw":
        return instruction if not context else f"{instruction}\n\n{context}"
    raise ValueError(f"unknown prompt format {style!r}; expected instruction, chat or raw")


def join_response(prompt: str, response: str) -> str:
    """prompt + response, with one space between them when the prompt ends mid-line.

    Raw HH prompts end in "Assistant:" and a policy writes " Hello" after them; the templates end
    in a newline and need nothing.
    """
    response = response.strip()
    return prompt + response if not prompt or prompt[-1].isspace() else f"{prompt} {response}"


def record_prompt(record: dict[str, Any], style: str, tokenizer: Any = None) -> str:
    """The prompt of any stage's record: `instruction` (+ `context`) or `prompt`."""
    instruction = record.get("instruction") or record.get("prompt") or ""
    return format_prompt(instruction, record.get("context"), style, tokenizer)

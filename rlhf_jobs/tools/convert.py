"""Converting public data sets into the record files of each stage (`rlhf-jobs convert`).

Source formats (`source_format`, or "auto" to tell them apart by the first record's fields):

sft (and every stage whose records are SFT records)
  dolly           {"instruction", "context", "response", "category"} (databricks-dolly-15k style)
  oasst           OpenAssistant message trees (oasst1/oasst2 "trees" export): one tree per line,
                  either the root message itself or {"message_tree_id", "prompt": root message}
  oasst-messages  OpenAssistant flat export: one message per line with "parent_id"
rm, ppo (and every stage whose records are preference pairs or prompts)
  hh              Anthropic HH transcripts {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}
  pairs           {"prompt" | "instruction", "chosen", "rejected"}; "chosen"/"rejected" may also be
                  message lists [{"role", "content"}] (the last assistant content is the reply)
ppo, grpo (prompt records)
  gsm8k           GSM8K {"question", "answer": "... #### 42"} -> {"prompt": question, "answer": "42"} (the final
                  number, thousands separators dropped: what `answer_match` compares with)

OpenAssistant: every prompter message (not deleted, not rejected in review) becomes one record with
its best reply: the assistant reply with the lowest "rank" (unranked replies after ranked ones,
file order among equals) that is itself not deleted or rejected. The prompter text is the
`instruction`, the reply the `response`; for a follow-up turn, `context` holds the conversation
before it on that branch as "User: ..." / "Assistant: ..." lines (empty for the first turn).

HH: the prompt is the longest shared prefix of the two transcripts, cut after its last
"\\n\\nAssistant:", and kept as is (train it with `prompt_format: raw`); the replies are what follows,
stripped. Pairs whose replies are identical or empty, or whose transcripts differ before the last
assistant turn, are skipped and counted.

Input is a JSON array or JSON Lines (local path or any fsspec URL); output is JSON Lines, UTF-8.
Bad input raises `DataError` as `file:line: what is wrong`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlhf_jobs.core.data import PPO_SCHEMA, RM_SCHEMA, SFT_SCHEMA, read_numbered
from rlhf_jobs.core.errors import DataError
from rlhf_jobs.core.stages import REGISTRY, get

ASSISTANT_TAG = "\n\nAssistant:"
HUMAN_TAG = "\n\nHuman:"
logger = logging.getLogger(__name__)

Numbered = Sequence[tuple[int, Any]]
"""(line number, parsed JSON value) pairs, as read from a file."""


@dataclass
class Conversion:
    """The converted records, which source format they came from and why others were skipped."""

    source_format: str
    records: list[dict[str, Any]]
    skipped: Counter[str] = field(default_factory=Counter)


def write_jsonl(path: str, records: Iterable[dict[str, Any]]) -> int:
    """Write records as UTF-8 JSON Lines (non-ASCII kept as is); returns how many were written."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def source_formats(kind: str) -> tuple[str, ...]:
    """The formats `rlhf-jobs convert <kind>` reads: those of the stage's record schema."""
    _check_kind(kind)
    return tuple(FORMATS[get(kind).records.name])


def detect_format(kind: str, numbered: Numbered, location: str) -> str:
    """The source format of `kind` that the first record's fields match."""
    line, first = numbered[0]
    if not isinstance(first, dict):
        raise DataError(f"{location}:{line}: expected a JSON object, got {type(first).__name__}")
    for name in source_formats(kind):
        if FORMATS[get(kind).records.name][name].matches(first):
            return name
    raise DataError(
        f"{location}:{line}: cannot tell the source format from fields {sorted(first)}; "
        f"pass one of {', '.join(source_formats(kind))} for {kind}"
    )


# --- SFT ---------------------------------------------------------------------------------------


def sft_from_dolly(numbered: Numbered, location: str) -> Conversion:
    """{"instruction", "context", "response", ...} -> {"instruction", "context", "response"}."""
    result = Conversion("dolly", [])
    for line, record in numbered:
        _require_object(record, location, line)
        instruction = _string(record, "instruction", location, line)
        response = _string(record, "response", location, line)
        context = _string(record, "context", location, line, optional=True)
        if not instruction.strip() or not response.strip():
            result.skipped["empty instruction or response"] += 1
            continue
        result.records.append(
            {"instruction": instruction.strip(), "context": context.strip(), "response": response.strip()}
        )
    return result


def sft_from_oasst_trees(numbered: Numbered, location: str, lang: str | None = None) -> Conversion:
    """OpenAssistant trees (one per line) -> one SFT record per prompter message with its best reply."""
    result = Conversion("oasst", [])
    for line, tree in numbered:
        _require_object(tree, location, line)
        root = tree["prompt"] if isinstance(tree.get("prompt"), dict) else tree
        _check_message(root, location, line)
        _walk(root, [], result, location, line, lang)
    return result


def sft_from_oasst_messages(numbered: Numbered, location: str, lang: str | None = None) -> Conversion:
    """OpenAssistant flat messages (one per line, linked by "parent_id") -> SFT records."""
    messages: dict[str, dict[str, Any]] = {}
    lines: dict[str, int] = {}
    order: list[str] = []
    for line, message in numbered:
        _require_object(message, location, line)
        _check_message(message, location, line, nested=False)
        message_id = message["message_id"]
        if message_id in messages:
            raise DataError(f"{location}:{line}: duplicate message_id {message_id!r}")
        messages[message_id] = {**message, "replies": []}
        lines[message_id] = line
        order.append(message_id)
    result = Conversion("oasst-messages", [])
    roots = []
    for message_id in order:
        message = messages[message_id]
        parent_id = message.get("parent_id")
        if parent_id is None:
            roots.append(message_id)
        elif parent_id in messages:
            messages[parent_id]["replies"].append(message)
        else:
            result.skipped["parent message not in the file"] += 1
    for message_id in roots:
        _walk(messages[message_id], [], result, location, lines[message_id], lang)
    return result


def _walk(
    message: dict[str, Any],
    history: list[tuple[str, str]],
    result: Conversion,
    location: str,
    line: int,
    lang: str | None,
) -> None:
    """Emit a record for `message` if it is a prompter turn, then descend into its kept replies."""
    if not _kept(message):
        return
    if lang is not None and message.get("lang") not in (None, lang):
        result.skipped[f"language other than {lang}"] += 1
        return
    role, text = message["role"], message["text"]
    replies = [reply for reply in message.get("replies") or [] if _kept(reply)]
    for reply in replies:
        _check_message(reply, location, line)
    if role == "prompter":
        answers = [reply for reply in replies if reply["role"] == "assistant" and reply["text"].strip()]
        if answers:
            best = min(enumerate(answers), key=lambda item: _rank_key(item[1], item[0]))[1]
            context = "\n".join(f"{'User' if r == 'prompter' else 'Assistant'}: {t.strip()}" for r, t in history)
            result.records.append({"instruction": text.strip(), "context": context, "response": best["text"].strip()})
        else:
            result.skipped["prompter message without a usable reply"] += 1
    for reply in replies:
        _walk(reply, [*history, (role, text)], result, location, line, lang)


def _kept(message: dict[str, Any]) -> bool:
    return not message.get("deleted") and message.get("review_result") is not False


def _rank_key(message: dict[str, Any], index: int) -> tuple[bool, float, int]:
    rank = message.get("rank")
    ranked = isinstance(rank, int | float) and not isinstance(rank, bool)
    return (not ranked, rank if ranked else 0.0, index)


def _check_message(message: Any, location: str, line: int, nested: bool = True) -> None:
    where = f"{location}:{line}"
    if not isinstance(message, dict):
        raise DataError(f"{where}: expected an OpenAssistant message object, got {type(message).__name__}")
    for key in ("message_id", "text", "role"):
        if not isinstance(message.get(key), str):
            raise DataError(f"{where}: message is missing string field {key!r}")
    if message["role"] not in ("prompter", "assistant"):
        raise DataError(f"{where}: message role must be 'prompter' or 'assistant', got {message['role']!r}")
    if nested and not isinstance(message.get("replies", []), list):
        raise DataError(f"{where}: message field 'replies' must be a list")


# --- RM and PPO --------------------------------------------------------------------------------


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen reply, rejected reply) of two HH transcripts, or None if they share no prompt.

    The prompt is the longest shared prefix cut after its last "\\n\\nAssistant:"; the replies are
    the rest of each transcript, stripped, and must be the final turn (no "\\n\\nHuman:" in them).
    """
    size = next(
        (i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b), min(len(chosen), len(rejected))
    )
    shared = chosen[:size]
    cut = shared.rfind(ASSISTANT_TAG)
    if cut < 0:
        return None
    prompt = shared[: cut + len(ASSISTANT_TAG)]
    chosen_reply, rejected_reply = chosen[len(prompt) :], rejected[len(prompt) :]
    if HUMAN_TAG in chosen_reply or HUMAN_TAG in rejected_reply:
        return None
    return prompt, chosen_reply.strip(), rejected_reply.strip()


def rm_from_hh(numbered: Numbered, location: str) -> Conversion:
    """HH transcripts -> {"prompt", "chosen", "rejected"}; unusable pairs are skipped and counted."""
    result = Conversion("hh", [])
    for line, record in numbered:
        split = _hh_split(record, location, line, result)
        if split is None:
            continue
        prompt, chosen, rejected = split
        if not chosen or not rejected:
            result.skipped["empty reply"] += 1
        elif chosen == rejected:
            result.skipped["identical replies"] += 1
        else:
            result.records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return result


def rm_from_pairs(numbered: Numbered, location: str) -> Conversion:
    """{"prompt" | "instruction", "chosen", "rejected"} (strings or message lists) -> validated pairs.

    Output: {"prompt", "chosen", "rejected"}, plus "context" and "margin" when the input has them.
    """
    result = Conversion("pairs", [])
    for line, record in numbered:
        prompt, context, chosen, rejected = _pair(record, location, line)
        if not chosen or not rejected:
            result.skipped["empty reply"] += 1
            continue
        if chosen == rejected:
            result.skipped["identical replies"] += 1
            continue
        out: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if context:
            out["context"] = context
        margin = record.get("margin")
        if margin is not None:
            if isinstance(margin, bool) or not isinstance(margin, int | float):
                raise DataError(f"{location}:{line}: field 'margin' must be a number, got {type(margin).__name__}")
            out["margin"] = margin
        result.records.append(out)
    return result


def ppo_from_hh(numbered: Numbered, location: str) -> Conversion:
    """HH transcripts -> unique {"prompt"} records (the shared "\\n\\nHuman: ...\\n\\nAssistant:" text)."""
    result = Conversion("hh", [])
    seen: set[str] = set()
    for line, record in numbered:
        split = _hh_split(record, location, line, result)
        if split is None:
            continue
        prompt = split[0]
        if prompt in seen:
            result.skipped["duplicate prompt"] += 1
            continue
        seen.add(prompt)
        result.records.append({"prompt": prompt})
    return result


def ppo_from_pairs(numbered: Numbered, location: str) -> Conversion:
    """Preference pairs -> unique {"prompt"} records (with "context" when the input has one)."""
    result = Conversion("pairs", [])
    seen: set[tuple[str, str]] = set()
    for line, record in numbered:
        prompt, context, _, _ = _pair(record, location, line)
        if (prompt, context) in seen:
            result.skipped["duplicate prompt"] += 1
            continue
        seen.add((prompt, context))
        result.records.append({"prompt": prompt, "context": context} if context else {"prompt": prompt})
    return result


GSM8K_FINAL = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def prompts_from_gsm8k(numbered: Numbered, location: str) -> Conversion:
    """GSM8K {"question", "answer": "<reasoning> #### 42"} -> {"prompt": question, "answer": "42"}."""
    result = Conversion("gsm8k", [])
    for line, record in numbered:
        _require_object(record, location, line)
        question = _string(record, "question", location, line).strip()
        found = GSM8K_FINAL.findall(_string(record, "answer", location, line))
        if not question:
            result.skipped["empty question"] += 1
        elif not found:
            result.skipped["no final '#### <number>' in the answer"] += 1
        else:
            result.records.append({"prompt": question, "answer": found[-1].replace(",", "")})
    return result


def _hh_split(record: Any, location: str, line: int, result: Conversion) -> tuple[str, str, str] | None:
    _require_object(record, location, line)
    chosen = _string(record, "chosen", location, line)
    rejected = _string(record, "rejected", location, line)
    split = split_hh(chosen, rejected)
    if split is None:
        result.skipped["no shared prompt"] += 1
    return split


def _pair(record: Any, location: str, line: int) -> tuple[str, str, str, str]:
    """(prompt, context, chosen reply, rejected reply) of a preference record, all stripped."""
    _require_object(record, location, line)
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataError(f"{location}:{line}: missing field {key!r} (expected prompt, chosen, rejected)")
    chosen = _reply(record["chosen"], "chosen", location, line)
    rejected = _reply(record["rejected"], "rejected", location, line)
    key = "prompt" if "prompt" in record else "instruction"
    raw_prompt = record.get(key)
    if raw_prompt is None and isinstance(record["chosen"], list):
        raw_prompt = _before_last_assistant(record["chosen"])
    if isinstance(raw_prompt, list):
        raw_prompt = _render(raw_prompt, location, line)
    if not isinstance(raw_prompt, str) or not raw_prompt.strip():
        raise DataError(f"{location}:{line}: missing or empty field 'prompt' (or 'instruction')")
    context = _string(record, "context", location, line, optional=True)
    return raw_prompt.strip(), context.strip(), chosen, rejected


def _reply(value: Any, key: str, location: str, line: int) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        for message in reversed(value):
            if isinstance(message, dict) and message.get("role") == "assistant":
                content = message.get("content")
                if not isinstance(content, str):
                    raise DataError(f"{location}:{line}: field {key!r}: assistant 'content' must be a string")
                return content.strip()
        raise DataError(f"{location}:{line}: field {key!r} has no message with role 'assistant'")
    raise DataError(f"{location}:{line}: field {key!r} must be a string or a list of messages")


def _before_last_assistant(messages: list[Any]) -> list[Any]:
    for index in range(len(messages) - 1, -1, -1):
        if isinstance(messages[index], dict) and messages[index].get("role") == "assistant":
            return messages[:index]
    return messages


def _render(messages: list[Any], location: str, line: int) -> str:
    """A message list as a prompt: the content alone for one user turn, else "User: ..." lines."""
    turns = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"{location}:{line}: prompt messages must be objects with string 'content'")
        turns.append((message.get("role"), message["content"].strip()))
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n".join(f"{names.get(str(role), str(role).capitalize())}: {content}" for role, content in turns)


# --- shared ------------------------------------------------------------------------------------


def _require_object(record: Any, location: str, line: int) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{location}:{line}: expected a JSON object, got {type(record).__name__}")


def _string(record: dict[str, Any], key: str, location: str, line: int, optional: bool = False) -> str:
    value = record.get(key)
    if value is None:
        if optional:
            return ""
        raise DataError(f"{location}:{line}: missing field {key!r}")
    if not isinstance(value, str):
        raise DataError(f"{location}:{line}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _check_kind(kind: str) -> None:
    if kind not in REGISTRY:
        raise DataError(f"unknown kind {kind!r}; expected one of {', '.join(REGISTRY)}")


def convert_records(kind: str, input_path: str, source_format: str = "auto", *, lang: str | None = None) -> Conversion:
    """Read `input_path` and convert it to records of `kind`'s schema (a stage name), without writing.

    `lang` keeps only OpenAssistant messages in that language (e.g. "en"); other formats ignore it.
    """
    formats = source_formats(kind)
    numbered = read_numbered(input_path)
    if source_format == "auto":
        source_format = detect_format(kind, numbered, input_path)
    if source_format not in formats:
        raise DataError(
            f"unknown source format {source_format!r} for {kind}; expected auto or one of {', '.join(formats)}"
        )
    return FORMATS[get(kind).records.name][source_format].convert(numbered, input_path, lang)


def skipped_text(result: Conversion) -> str:
    """'3 skipped: 2 identical replies, 1 no shared prompt', or 'none skipped'."""
    if not result.skipped:
        return "none skipped"
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(result.skipped.items(), key=lambda item: -item[1]))
    return f"{sum(result.skipped.values())} skipped: {reasons}"


def report(result: Conversion, kind: str, input_path: str, output_path: str, detected: bool) -> list[str]:
    """What `rlhf-jobs convert` prints: the source format (and whether detected), counts, skips, next step."""
    how = "detected" if detected else "given"
    lines = [
        f"{input_path}: format {result.source_format} ({DESCRIPTIONS[result.source_format]}, {how})",
        f"wrote {len(result.records)} {kind} record(s) to {output_path}; {skipped_text(result)}",
    ]
    if result.source_format == "hh":
        lines.append(
            "note: these prompts are raw HH transcripts (\"\\n\\nHuman: ...\\n\\nAssistant:\"): train them with "
            "Dataset.prompt_format: raw, in every stage that reads them"
        )
    return lines


def convert(
    kind: str, input_path: str, output_path: str, source_format: str = "auto", *, lang: str | None = None
) -> int:
    """Convert `input_path` to `kind` records in the JSON Lines file `output_path`; returns the count.

    Raises `DataError` (with `file:line`) for bad input and when nothing is left to write.
    """
    return write_conversion(convert_records(kind, input_path, source_format, lang=lang), kind, input_path,
                            output_path)


def write_conversion(result: Conversion, kind: str, input_path: str, output_path: str) -> int:
    """Write the records of a conversion; nothing left to write is a `DataError` saying why."""
    logger.info("%s: %d %s record(s) from %s format, %s", input_path, len(result.records), kind,
                result.source_format, skipped_text(result))
    if not result.records:
        raise DataError(f"{input_path}: no {kind} records to write ({skipped_text(result)})")
    return write_jsonl(output_path, result.records)


# ---- the formats each record schema is converted from ------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """A source format: how to recognise its first record, and how to convert a file of it."""

    matches: Callable[[dict[str, Any]], bool]
    convert: Callable[[Numbered, str, str | None], Conversion]


def _pair_fields(first: dict[str, Any]) -> bool:
    return "chosen" in first and "rejected" in first


def _hh_transcripts(first: dict[str, Any]) -> bool:
    has_prompt = "prompt" in first or "instruction" in first
    return _pair_fields(first) and not has_prompt and isinstance(first["chosen"], str) and HUMAN_TAG in first["chosen"]


# Keyed by record schema name (`core.data.RecordSchema.name`): a stage converts from the formats of its
# schema, so a new stage on an existing schema (DPO on pairs, GRPO on prompts) needs no entry here.
# Tried in this order by `detect_format`.
FORMATS: dict[str, dict[str, Format]] = {
    SFT_SCHEMA.name: {
        "dolly": Format(lambda first: "instruction" in first and "response" in first,
                        lambda numbered, location, lang: sft_from_dolly(numbered, location)),
        "oasst": Format(lambda first: "replies" in first or isinstance(first.get("prompt"), dict),
                        sft_from_oasst_trees),
        "oasst-messages": Format(lambda first: "parent_id" in first and "message_id" in first,
                                 sft_from_oasst_messages),
    },
    RM_SCHEMA.name: {
        "hh": Format(_hh_transcripts, lambda numbered, location, lang: rm_from_hh(numbered, location)),
        "pairs": Format(_pair_fields, lambda numbered, location, lang: rm_from_pairs(numbered, location)),
    },
    PPO_SCHEMA.name: {
        "hh": Format(_hh_transcripts, lambda numbered, location, lang: ppo_from_hh(numbered, location)),
        "pairs": Format(_pair_fields, lambda numbered, location, lang: ppo_from_pairs(numbered, location)),
        "gsm8k": Format(lambda first: "question" in first and "answer" in first,
                        lambda numbered, location, lang: prompts_from_gsm8k(numbered, location)),
    },
}
DESCRIPTIONS = {
    "dolly": "Dolly-style instruction records",
    "oasst": "OpenAssistant message trees",
    "oasst-messages": "OpenAssistant flat messages",
    "hh": "Anthropic HH transcripts",
    "pairs": "preference pairs",
    "gsm8k": "GSM8K questions with answers",
}
ALL_FORMATS = tuple(dict.fromkeys(name for formats in FORMATS.values() for name in formats))

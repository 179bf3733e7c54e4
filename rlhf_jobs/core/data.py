"""Reading and validating the record files of every stage.

Files are a JSON array or JSON Lines, local or at any URL fsspec opens (http(s), s3, gs, hf,
...). Every record is checked before anything trains; a problem is reported as `file:line`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec

from rlhf_jobs.core.errors import DataError

if TYPE_CHECKING:
    import datasets


@dataclass(frozen=True)
class RecordSchema:
    """Which string fields a stage's records have: all of `required`, one of each `one_of` group."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    one_of: tuple[tuple[str, ...], ...] = ()
    numeric: tuple[str, ...] = ()
    check: Callable[[dict[str, Any]], str | None] | None = None
    keep: str = "head"  # which end of a too-long text the stage keeps: "head" (SFT) or "tail" (RM, PPO)
    # Keep the record's other fields as columns (prompt records: GRPO's reward functions read them, e.g. `answer`).
    keep_extra: bool = False

    def problem(self, record: Any) -> str | None:
        if not isinstance(record, dict):
            return f"expected a JSON object, got {type(record).__name__}"
        missing = [key for key in self.required if key not in record]
        for group in self.one_of:
            if not any(key in record for key in group):
                missing.append(" or ".join(group))
        if missing:
            return f"missing field {', '.join(repr(m) for m in missing)} (expected {self.describe()})"
        for group in self.one_of:
            if all(record.get(key) is None for key in group):
                return f"field {next(key for key in group if key in record)!r} is null: expected a string"
        for key, value in record.items():  # json reads NaN and Infinity, which no JSON standard has
            if isinstance(value, float) and not math.isfinite(value):
                return f"field {key!r} is {json.dumps(value)}: expected a finite number"
        for key in (*self.required, *self.optional, *(k for g in self.one_of for k in g)):
            value = record.get(key)
            if key in self.numeric:
                if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                    return f"field {key!r} must be a number, got {type(value).__name__}"
            elif value is None and key in self.required:
                return f"field {key!r} is null: expected a string"
            elif value is not None and not isinstance(value, str):
                return f"field {key!r} must be a string, got {type(value).__name__}"
        for key in self.required:
            if key not in self.numeric and not record[key].strip() and key != "context":
                return f"field {key!r} is empty"
        return self.check(record) if self.check else None

    def fields(self) -> tuple[str, ...]:
        return (*self.required, *(k for g in self.one_of for k in g), *self.optional)

    def project(self, record: dict[str, Any], extra: tuple[str, ...] = ()) -> dict[str, Any]:
        """The record with exactly this schema's fields and the `extra` ones (absent ones None), so columns line up."""
        return {key: record.get(key) for key in (*self.fields(), *extra)}

    def extra_fields(self, record: dict[str, Any]) -> list[str]:
        """The record's fields beyond the schema's, in its order."""
        known = self.fields()
        return [key for key in record if key not in known]

    def describe(self) -> str:
        fields = [*self.required, *(" | ".join(g) for g in self.one_of)]
        return "{" + ", ".join(f'"{f}"' for f in fields) + "}"


def _different_pair(record: dict[str, Any]) -> str | None:
    if record["chosen"].strip() == record["rejected"].strip():
        return "'chosen' and 'rejected' are identical: the pair teaches nothing"
    return None


SFT_SCHEMA = RecordSchema("sft", required=("instruction", "response"), optional=("context",))
RM_SCHEMA = RecordSchema(
    "rm",
    required=("chosen", "rejected"),
    one_of=(("instruction", "prompt"),),
    optional=("context", "margin"),
    numeric=("margin",),
    check=_different_pair,
    keep="tail",
)
# DPO reads the reward model's files (the same fields, the same converters, which are keyed by the schema's name);
# a pair whose chosen equals rejected is dropped and counted by the stage instead of stopping the run.
DPO_SCHEMA = dataclasses.replace(RM_SCHEMA, check=None)
PPO_SCHEMA = RecordSchema("ppo", required=(), one_of=(("prompt", "instruction"),), optional=("context",), keep="tail",
                          keep_extra=True)


def _read_text(location: str) -> str:
    try:
        with fsspec.open(location, "rt", encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        raise DataError(f"{location}: file not found") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{location}: not UTF-8 text ({err.reason})") from None
    except Exception as err:  # network and filesystem errors differ per protocol
        raise DataError(f"{location}: cannot read: {err}") from None


def _parse(location: str, text: str) -> list[tuple[int, Any]]:
    """(line number, record) pairs from a JSON array or JSON Lines text."""
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{location}:{err.lineno}: broken JSON array: {err.msg}") from None
        # Line numbers of objects in an array: find where each top-level element starts.
        decoder, lines, position = json.JSONDecoder(), [], text.index("[") + 1
        for _ in records:
            while text[position] in " \t\r\n,":
                position += 1
            lines.append(text.count("\n", 0, position) + 1)
            _, position = decoder.raw_decode(text, position)
        return list(zip(lines, records, strict=True))
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            pairs.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"{location}:{number}: broken JSON line: {err.msg}") from None
    return pairs


def read_numbered(location: str, expected: str = "") -> list[tuple[int, Any]]:
    """(line, record) pairs of a JSON array or JSON Lines file; an empty file is a `DataError`."""
    pairs = _parse(location, _read_text(location))
    if not pairs:
        raise DataError(f"{location}: no records" + (f" (expected {expected} per line)" if expected else ""))
    return pairs


def read_records(location: str, schema: RecordSchema) -> list[dict[str, Any]]:
    """All records of a file, validated; the first bad one raises `DataError` with its line.

    With `schema.keep_extra` every record gets every field any record has (None where it has none); a field must
    hold one JSON type in every record that sets it (it becomes one column)."""
    pairs = read_numbered(location, schema.describe())
    for number, record in pairs:
        problem = schema.problem(record)
        if problem:
            raise DataError(f"{location}:{number}: {problem}")
    extra = _extra_columns(location, pairs, schema) if schema.keep_extra else ()
    return [schema.project(record, extra) for _, record in pairs]


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _extra_columns(location: str, pairs: list[tuple[int, Any]], schema: RecordSchema) -> tuple[str, ...]:
    """Every field beyond the schema's that some record has, in first-seen order, each of one JSON type."""
    first: dict[str, tuple[str, int]] = {}
    for number, record in pairs:
        for key in schema.extra_fields(record):
            value = record[key]
            if value is None:
                first.setdefault(key, ("", number))
                continue
            kind = _json_type(value)
            seen, line = first.get(key, ("", number))
            if not seen:
                first[key] = (kind, number)
            elif seen != kind:
                raise DataError(f"{location}:{number}: field {key!r} is a {kind} here but a {seen} on line {line}: "
                                "each extra field is one column, of one type")
    return tuple(first)


# No tokenizer we know averages more characters per token than this (byte-level BPE on English: ~4;
# long runs of one character: up to a few dozen), so a text cut to max_tokens × this many characters
# tokenises to the same first (or last) max_tokens tokens.
CHARS_PER_TOKEN_BOUND = 64


def clip_text(text: str, max_tokens: int, keep: str = "head") -> str:
    """`text` cut to what `max_tokens` tokens can cover, keeping its head or tail.

    Tokenising a 40 MB string costs gigabytes (token and offset lists); the stage keeps at most
    max_tokens of it anyway. How many records were truncated is counted from the tokens, not here.
    """
    limit = max_tokens * CHARS_PER_TOKEN_BOUND
    if len(text) <= limit:
        return text
    return text[:limit] if keep == "head" else text[-limit:]


def clip_record(record: dict[str, Any], schema: RecordSchema, max_tokens: int) -> dict[str, Any]:
    return {key: clip_text(value, max_tokens, schema.keep) if isinstance(value, str) else value
            for key, value in record.items()}


def truncation_note(name: str, truncated: int, total: int, key: str, max_tokens: int, keep: str) -> str | None:
    """One line for the driver's log when records were longer than the stage's token limit."""
    if not truncated:
        return None
    cut = "their end is cut" if keep == "head" else "their start is cut"
    return (f"{name}: {truncated} of {total} record(s) longer than {key}={max_tokens} tokens "
            f"were truncated ({cut})")


def report_truncation(examples: list[dict[str, Any]], name: str, key: str, max_tokens: int,
                      keep: str) -> list[dict[str, Any]]:
    """Pop the tokenisers' `truncated` flags, print how many were set; the examples without them."""
    truncated = sum(bool(example.pop("truncated", False)) for example in examples)
    note = truncation_note(name, truncated, len(examples), key, max_tokens, keep)
    if note:
        print(note, flush=True)
    return examples


def load_splits(
    train_file: str,
    validation_file: str | None,
    validation_split_percentage: int,
    schema: RecordSchema,
    seed: int,
    max_tokens: int | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Train and validation `datasets.Dataset`s; a seeded split when there is no validation file.

    With `max_tokens`, texts are first cut to what that many tokens can cover (`clip_text`), so a
    huge record costs no more memory than a long one.
    """
    import datasets  # slow to import; the CLI's other commands never need it

    def read(location: str) -> datasets.Dataset:
        records = read_records(location, schema)
        if max_tokens:
            records = [clip_record(record, schema, max_tokens) for record in records]
        try:
            return datasets.Dataset.from_list(records)
        except (TypeError, ValueError) as err:  # pyarrow's ArrowInvalid/ArrowTypeError: an extra field's values
            raise DataError(f"{location}: its fields cannot be read as columns ({err}); give each field values of "
                            "one JSON type (lists of one element type, objects with the same fields)") from None

    train = read(train_file)
    if validation_file:
        return train, read(validation_file)
    if validation_split_percentage == 0:
        return train, None
    if len(train) < 2:
        raise DataError(f"{train_file}: {len(train)} record(s) is too few to hold out a validation split")
    split = train.train_test_split(test_size=validation_split_percentage / 100, seed=seed, shuffle=True)
    return split["train"], split["test"]

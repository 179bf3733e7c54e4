"""`rlhf_jobs.tools.convert`: public data set formats -> stage record files, on small fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_jobs.core.data import PPO_SCHEMA, RM_SCHEMA, SFT_SCHEMA, read_records
from rlhf_jobs.core.errors import DataError
from rlhf_jobs.tools.convert import convert, convert_records, detect_format, source_formats, split_hh

FIXTURES = Path(__file__).parent / "fixtures" / "convert"
SCHEMAS = {"sft": SFT_SCHEMA, "rm": RM_SCHEMA, "ppo": PPO_SCHEMA}


def run(kind: str, name: str, tmp_path: Path, source_format: str = "auto", **kwargs) -> list[dict]:
    output = tmp_path / "out" / f"{kind}.jsonl"
    count = convert(kind, str(FIXTURES / name), str(output), source_format, **kwargs)
    lines = output.read_text(encoding="utf-8").splitlines()
    assert count == len(lines)
    read_records(str(output), SCHEMAS[kind])  # what we write is what the stage reads
    return [json.loads(line) for line in lines]


def test_sft_from_dolly(tmp_path):
    assert run("sft", "dolly.jsonl", tmp_path) == [
        {"instruction": "What is the capital of France?", "context": "", "response": "Paris."},
        {
            "instruction": "Summarise the text.",
            "context": "Cats sleep a lot. They nap up to 16 hours a day.",
            "response": "Cats sleep up to 16 hours daily.",
        },
        {"instruction": "Say hello in German.", "context": "", "response": "Hallo! Schöne Grüße."},
    ]


def test_output_is_utf8_not_escaped(tmp_path):
    run("sft", "dolly.jsonl", tmp_path)
    assert "Schöne Grüße" in (tmp_path / "out" / "sft.jsonl").read_text(encoding="utf-8")


BOIL = "How do I boil an egg?"
BEST = "Boil it for 7 minutes, then cool it in cold water."
OASST_EN = [
    {"instruction": BOIL, "context": "", "response": BEST},
    {
        "instruction": "And for a runny yolk?",
        "context": f"User: {BOIL}\nAssistant: {BEST}",
        "response": "About 6 minutes.",
    },
]


def test_sft_from_oasst_trees_best_ranked_not_deleted(tmp_path):
    assert run("sft", "oasst_trees.jsonl", tmp_path) == [
        *OASST_EN,
        {"instruction": "Wie spät ist es?", "context": "", "response": "Ich kenne die Uhrzeit nicht."},
    ]


def test_sft_from_oasst_language_filter(tmp_path):
    assert run("sft", "oasst_trees.jsonl", tmp_path, lang="en") == OASST_EN


def test_sft_from_oasst_flat_messages(tmp_path):
    assert detect_format("sft", [(1, {"message_id": "x", "parent_id": None})], "f") == "oasst-messages"
    assert run("sft", "oasst_messages.jsonl", tmp_path) == OASST_EN


def test_rm_from_hh(tmp_path):
    result = convert_records("rm", str(FIXTURES / "hh.jsonl"))
    assert result.source_format == "hh"
    assert result.skipped == {"identical replies": 1}
    assert run("rm", "hh.jsonl", tmp_path) == [
        {"prompt": "\n\nHuman: What is 2+2?\n\nAssistant:", "chosen": "2+2 is 4.", "rejected": "Figure it out."},
        {
            "prompt": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant:",
            "chosen": "An apple.",
            "rejected": "A potato, obviously.",
        },
        {"prompt": "\n\nHuman: What is 2+2?\n\nAssistant:", "chosen": "It is four.", "rejected": "No."},
    ]


def test_split_hh_needs_a_shared_prompt():
    assert split_hh("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: c\n\nAssistant: b") is None
    # The transcripts differ before the last assistant turn: no single shared prompt.
    chosen = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
    assert split_hh(chosen, "\n\nHuman: a\n\nAssistant: x\n\nHuman: c\n\nAssistant: d") is None


def test_ppo_from_hh_deduplicates(tmp_path):
    assert run("ppo", "hh.jsonl", tmp_path) == [
        {"prompt": "\n\nHuman: What is 2+2?\n\nAssistant:"},
        {"prompt": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant:"},
        {"prompt": "\n\nHuman: Tell me a joke.\n\nAssistant:"},
    ]


def test_rm_from_pairs_with_message_lists(tmp_path):
    result = convert_records("rm", str(FIXTURES / "pairs.jsonl"))
    assert result.source_format == "pairs"
    assert result.skipped == {"identical replies": 1}
    assert run("rm", "pairs.jsonl", tmp_path) == [
        {"prompt": "What is the boiling point of water?", "chosen": "100 °C at sea level.", "rejected": "Look it up."},
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Whatever."},
        {
            "prompt": "Summarise.",
            "chosen": "It rained all day.",
            "rejected": "No.",
            "context": "Rain fell all day.",
            "margin": 2,
        },
    ]


def test_ppo_from_pairs(tmp_path):
    assert run("ppo", "pairs.jsonl", tmp_path) == [
        {"prompt": "What is the boiling point of water?"},
        {"prompt": "Name a colour."},
        {"prompt": "Summarise.", "context": "Rain fell all day."},
    ]


def test_broken_line_reports_file_and_line(tmp_path):
    path = FIXTURES / "broken.jsonl"
    with pytest.raises(DataError, match=rf"^{path}:2: broken JSON line"):
        convert("sft", str(path), str(tmp_path / "out.jsonl"))


def test_bad_record_in_json_array_reports_its_line(tmp_path):
    path = FIXTURES / "pairs_array.json"
    with pytest.raises(DataError, match=rf"^{path}:3: field 'chosen' must be a string or a list of messages"):
        convert("rm", str(path), str(tmp_path / "out.jsonl"))
    assert not (tmp_path / "out.jsonl").exists()


def test_missing_field_reports_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", "context": ""}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{bad}:2: missing field 'response'"):
        convert("sft", str(bad), str(tmp_path / "out.jsonl"), "dolly")


def test_unknown_format_and_kind(tmp_path):
    with pytest.raises(DataError, match="cannot tell the source format"):
        convert("sft", str(FIXTURES / "hh.jsonl"), str(tmp_path / "out.jsonl"))
    with pytest.raises(DataError, match="unknown source format 'dolly' for rm"):
        convert("rm", str(FIXTURES / "hh.jsonl"), str(tmp_path / "out.jsonl"), "dolly")
    with pytest.raises(DataError, match="unknown kind"):
        convert("kto", str(FIXTURES / "hh.jsonl"), str(tmp_path / "out.jsonl"))


def test_dpo_reads_the_reward_models_pairs_with_the_same_converters(tmp_path):
    assert source_formats("dpo") == source_formats("rm")
    convert("rm", str(FIXTURES / "hh.jsonl"), str(tmp_path / "rm.jsonl"))
    convert("dpo", str(FIXTURES / "hh.jsonl"), str(tmp_path / "dpo.jsonl"))
    assert (tmp_path / "dpo.jsonl").read_text() == (tmp_path / "rm.jsonl").read_text()


def test_nothing_left_to_write_is_an_error(tmp_path):
    only_identical = tmp_path / "same.jsonl"
    only_identical.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="no rm records to write"):
        convert("rm", str(only_identical), str(tmp_path / "out.jsonl"))


def test_cli_says_format_counts_skips_and_the_prompt_format(tmp_path, capsys):
    from rlhf_jobs.cli import main

    output = tmp_path / "rm.jsonl"
    assert main(["convert", "rm", "--input", str(FIXTURES / "hh.jsonl"), "--output", str(output)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{FIXTURES / 'hh.jsonl'}: format hh (Anthropic HH transcripts, detected)"
    assert lines[1] == f"wrote 3 rm record(s) to {output}; 1 skipped: 1 identical replies"
    assert "Dataset.prompt_format: raw" in lines[2]
    assert main(["convert", "sft", "--input", str(FIXTURES / "dolly.jsonl"), "--output", str(output),
                 "--format", "dolly"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("format dolly (Dolly-style instruction records, given)")


def test_format_choices_are_listed(capsys):
    from rlhf_jobs.cli import CONVERT_FORMATS, main
    from rlhf_jobs.tools.convert import ALL_FORMATS

    assert CONVERT_FORMATS == ALL_FORMATS
    with pytest.raises(SystemExit):
        main(["convert", "sft", "--input", "a", "--output", "b", "--format", "alpaca"])
    assert "choose from 'auto', 'dolly', 'oasst', 'oasst-messages', 'hh', 'pairs', 'gsm8k'" in capsys.readouterr().err


def test_prompts_with_answers_from_gsm8k(tmp_path):
    """GSM8K's {question, answer} -> prompt records whose `answer` is the final number (what answer_match compares),
    for grpo and ppo alike (the same prompt schema); an answer without `#### <number>` is skipped and counted."""
    expected = [
        {"prompt": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                   "How many clips did Natalia sell altogether in April and May?", "answer": "72"},
        {"prompt": "A company pays $1,200 a month. What does it pay in a year?", "answer": "14400"},
        {"prompt": "What is two minus five?", "answer": "-3"},
    ]
    assert run("ppo", "gsm8k.jsonl", tmp_path) == expected
    result = convert_records("grpo", str(FIXTURES / "gsm8k.jsonl"))
    assert result.source_format == "gsm8k" and result.records == expected
    assert dict(result.skipped) == {"no final '#### <number>' in the answer": 1}
    assert source_formats("grpo") == ("hh", "pairs", "gsm8k")

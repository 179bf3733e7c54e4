"""Data files: JSON array or JSONL, one `file:line` error for the first bad record."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_jobs.core.data import PPO_SCHEMA, RM_SCHEMA, SFT_SCHEMA, load_splits, read_records
from rlhf_jobs.core.errors import DataError


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_jsonl_and_array_give_the_same_records(tmp_path: Path) -> None:
    first, second = '{"instruction": "i", "response": "r"}', '{"instruction": "j", "context": "c", "response": "s"}'
    jsonl = write(tmp_path / "a.jsonl", f"{first}\n\n{second}\n")
    array = write(tmp_path / "a.json", f"[\n {first},\n {second}\n]")
    assert read_records(jsonl, SFT_SCHEMA) == read_records(array, SFT_SCHEMA)
    assert read_records(jsonl, SFT_SCHEMA)[0] == {"instruction": "i", "response": "r", "context": None}


def test_missing_field_reports_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"instruction": "i", "response": "r"}\n{"instruction": "i"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'response'"):
        read_records(path, SFT_SCHEMA)


def test_broken_line(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"instruction": "i", "response": "r"}\n{"instruction": "i", \n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: broken JSON line"):
        read_records(path, SFT_SCHEMA)


def test_array_line_numbers(tmp_path: Path) -> None:
    text = '[\n  {"instruction": "i", "response": "r"},\n\n  {"instruction": "i", "response": 3}\n]\n'
    path = write(tmp_path / "d.json", text)
    with pytest.raises(DataError, match=r"d\.json:4: field 'response' must be a string"):
        read_records(path, SFT_SCHEMA)


def test_rm_accepts_prompt_or_instruction_and_rejects_identical_pairs(tmp_path: Path) -> None:
    good = write(tmp_path / "rm.jsonl", '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
                 '{"instruction": "q", "chosen": "a", "rejected": "b", "margin": 1.5}\n')
    assert [r["margin"] for r in read_records(good, RM_SCHEMA)] == [None, 1.5]
    same = write(tmp_path / "same.jsonl", '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
                 '{"prompt": "p", "chosen": "same", "rejected": " same"}\n')
    with pytest.raises(DataError, match=r"same\.jsonl:2: 'chosen' and 'rejected' are identical"):
        read_records(same, RM_SCHEMA)
    neither = write(tmp_path / "n.jsonl", '{"chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"n\.jsonl:1: missing field 'instruction or prompt'"):
        read_records(neither, RM_SCHEMA)


def test_ppo_prompts(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", '{"prompt": "hello"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: expected a JSON object"):
        read_records(path, PPO_SCHEMA)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no records"):
        read_records(write(tmp_path / "e.jsonl", "\n"), SFT_SCHEMA)
    with pytest.raises(DataError, match="file not found"):
        read_records(str(tmp_path / "missing.jsonl"), SFT_SCHEMA)


def test_validation_split_is_deterministic(tmp_path: Path) -> None:
    lines = "".join(f'{{"instruction": "q{i}", "response": "r{i}"}}\n' for i in range(40))
    path = write(tmp_path / "d.jsonl", lines)
    first = load_splits(path, None, 10, SFT_SCHEMA, seed=3)
    second = load_splits(path, None, 10, SFT_SCHEMA, seed=3)
    assert len(first[1]) == 4 and len(first[0]) == 36
    assert first[1]["instruction"] == second[1]["instruction"]
    assert set(first[0]["instruction"]).isdisjoint(first[1]["instruction"])
    assert load_splits(path, None, 0, SFT_SCHEMA, seed=3)[1] is None


# ---- long records --------------------------------------------------------------------------------------


def test_clipping_keeps_every_token_the_stage_keeps(tiny_model: Path) -> None:
    """Cut to max_tokens × CHARS_PER_TOKEN_BOUND characters, a text tokenises to the same kept window."""
    from rlhf_jobs.algorithms.ppo import tokenize_prompts
    from rlhf_jobs.algorithms.rm import tokenize_pair
    from rlhf_jobs.algorithms.sft import tokenize_sft
    from rlhf_jobs.core.data import clip_record
    from rlhf_jobs.engine.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    long = "The quick brown fox jumps over the lazy dog; " * 20_000 + "=" * 5_000 + " zebra " * 3_000
    sft = {"instruction": "Tell a story.", "context": "", "response": long}
    rm = {"prompt": long, "chosen": "Yes. " + long, "rejected": long + " No."}
    ppo = {"prompt": long + " What next?"}
    assert len(clip_record(sft, SFT_SCHEMA, 64)["response"]) < len(long) / 100
    assert tokenize_sft(clip_record(sft, SFT_SCHEMA, 64), tokenizer, "instruction", 64) == tokenize_sft(
        sft, tokenizer, "instruction", 64)
    assert tokenize_pair(clip_record(rm, RM_SCHEMA, 64), tokenizer, "instruction", 64) == tokenize_pair(
        rm, tokenizer, "instruction", 64)
    assert tokenize_prompts([clip_record(ppo, PPO_SCHEMA, 32)], tokenizer, "raw", 32) == tokenize_prompts(
        [ppo], tokenizer, "raw", 32)


def test_truncated_records_are_counted_per_split(tiny_model: Path, tmp_path: Path, capsys) -> None:
    import json

    from rlhf_jobs.algorithms.sft import SFTTask
    from rlhf_jobs.core.loading import validate_config

    records = [{"instruction": f"q{i}", "response": "short"} for i in range(8)]
    records[0]["response"] = records[5]["response"] = "long " * 500
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    validation = tmp_path / "validation.jsonl"
    validation.write_text(json.dumps({"instruction": "v", "response": "long " * 500}) + "\n")
    config = validate_config({
        "General": {"base_model": str(tiny_model), "output_dir": str(tmp_path / "o"), "checkpoint_dir": "c"},
        "Dataset": {"train_file": str(train), "validation_file": str(validation), "max_length": 64},
    }, "sft")
    data = SFTTask().prepare(config)
    out = capsys.readouterr().out
    assert f"{train}: 2 of 8 record(s) longer than Dataset.max_length=64 tokens were truncated (their end is cut)" \
        in out
    assert f"{validation}: 1 of 1 record(s) longer than Dataset.max_length=64 tokens" in out
    assert all("truncated" not in example and len(example["input_ids"]) <= 64 for example in data["train"])


def test_a_40_mb_record_costs_no_gigabytes(tiny_model: Path, tmp_path: Path) -> None:
    """Measured: tokenising the whole 40 MB line peaked at 7.7 GB (50 s); cut first, about 0.6 GB (1 s)."""
    import json
    import subprocess
    import sys

    data = tmp_path / "train.jsonl"
    with data.open("w") as handle:
        handle.write(json.dumps({"instruction": "Repeat.", "response": "All work and no play. " * 1_820_000}) + "\n")
        for index in range(20):
            handle.write(json.dumps({"instruction": f"q{index}", "response": "a short answer"}) + "\n")
    assert data.stat().st_size > 40_000_000
    script = f"""
import resource
from rlhf_jobs.core.loading import validate_config
from rlhf_jobs.algorithms.sft import SFTTask
config = validate_config({{"General": {{"base_model": {str(tiny_model)!r}, "output_dir": "o", "checkpoint_dir": "c"}},
                          "Dataset": {{"train_file": {str(data)!r}, "validation_split_percentage": 0,
                                      "max_length": 256}}}}, "sft")
SFTTask().prepare(config)
print("peak MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-2000:]
    assert "1 of 21 record(s) longer than Dataset.max_length=256 tokens were truncated" in process.stdout
    peak = int(process.stdout.split("peak MB")[1])
    assert peak < 1500, f"peak RSS {peak} MB"


@pytest.mark.parametrize(("record", "expected"), [
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}',
     "field 'margin' is NaN: expected a finite number"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": -Infinity}',
     "field 'margin' is -Infinity: expected a finite number"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "score": Infinity}',
     "field 'score' is Infinity: expected a finite number"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": true}', "field 'margin' must be a number, got bool"),
    ('{"prompt": null, "chosen": "a", "rejected": "b"}', "field 'prompt' is null: expected a string"),
    ('{"prompt": "p", "chosen": null, "rejected": "b"}', "field 'chosen' is null: expected a string"),
])
def test_non_finite_numbers_and_nulls_are_refused_naming_the_line(tmp_path: Path, record: str, expected: str) -> None:
    """Python's json reads NaN and Infinity (no JSON standard has them): a NaN margin trained a NaN reward model."""
    path = write(tmp_path / "rm.jsonl", f'{{"prompt": "p", "chosen": "a", "rejected": "b"}}\n{record}\n')
    with pytest.raises(DataError) as raised:
        read_records(path, RM_SCHEMA)
    assert str(raised.value) == f"{path}:2: {expected}"


def test_a_null_response_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    path = write(tmp_path / "sft.json", '[\n {"instruction": "i", "response": "r"},\n {"instruction": "i", '
                 '"response": null}\n]')
    with pytest.raises(DataError, match=r"sft\.json:3: field 'response' is null: expected a string$"):
        read_records(path, SFT_SCHEMA)
    prompts = write(tmp_path / "p.jsonl", '{"prompt": null}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:1: field 'prompt' is null: expected a string$"):
        read_records(prompts, PPO_SCHEMA)

"""Data files: JSON array or JSONL, one `file:line` error for the first bad record."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_jobs.data import PPO_SCHEMA, RM_SCHEMA, SFT_SCHEMA, DataError, load_splits, read_records


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

"""`rlhf-jobs generate`: checkpoints side by side on the same prompts, built and scored as PPO does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf_jobs.algorithms.rl import rollout
from rlhf_jobs.cli import main
from rlhf_jobs.core.config import PPOTraining
from rlhf_jobs.core.prompts import join_response
from rlhf_jobs.engine.models import bos_ids, load_tokenizer
from rlhf_jobs.tools import generate

PROMPTS = [{"instruction": "Give me a tip for sleeping well."}, {"prompt": "What is a good breakfast?"},
           {"instruction": "Summarise this.", "context": "Cats sleep a lot."}]


def test_settings_default_to_ppo_and_flags_override(tmp_path: Path) -> None:
    settings = generate.settings_from([str(tmp_path)], {"max_new_tokens": 5, "temperature": None})
    assert (settings.prompt_format, settings.max_prompt_length) == ("instruction", 128)
    assert settings.training.max_new_tokens == 5 and settings.training.temperature == PPOTraining().temperature


def test_labels_are_directory_names_unless_they_repeat() -> None:
    assert generate.labels_for(["runs/a/sft", "runs/a/ppo"]) == ["sft", "ppo"]
    assert generate.labels_for(["runs/a/ppo", "runs/b/ppo"]) == ["runs/a/ppo", "runs/b/ppo"]


def test_bad_arguments_are_one_line_errors(tmp_path: Path, capsys) -> None:
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompts", "p.jsonl"]) == 2
    assert f"--model {tmp_path / 'nope'}: no such model directory" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--held-out", str(tmp_path)]) == 2
    assert "not a finished stage checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_answers_side_by_side_scored_like_ppo(
    tiny_model: Path, sft_checkpoint: Path, rm_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    output = tmp_path / "samples.jsonl"
    argv = ["generate", "--model", str(tiny_model), "--model", str(sft_checkpoint), "--rm", str(rm_checkpoint),
            "--prompts", str(prompts), "--max-new-tokens", "12", "--output", str(output)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["prompt"] for line in lines] == [
        "Give me a tip for sleeping well.", "What is a good breakfast?", "Summarise this. [Cats sleep a lot.]"]
    assert list(lines[0]["answers"]) == generate.labels_for([str(tiny_model), str(sft_checkpoint)])

    # The prompt text is PPO's, exactly; each score is the RM's score of prompt text + answer (joined as its
    # training pairs were), recomputed here.
    tokenizer = load_tokenizer(str(sft_checkpoint), padding_side="left")
    expected = rollout.tokenize_prompts(PROMPTS, tokenizer, "instruction", 128)
    assert [line["prompt_text"] for line in lines] == [p["text"] for p in expected]
    rm = AutoModelForSequenceClassification.from_pretrained(rm_checkpoint).eval()
    rm_tokenizer = AutoTokenizer.from_pretrained(rm_checkpoint)
    for line in lines:
        for answer in line["answers"].values():
            assert 0 < answer["tokens"] <= 12 and isinstance(answer["eos"], bool)
            ids = bos_ids(rm_tokenizer) + rm_tokenizer(join_response(line["prompt_text"], answer["text"]),
                                                       add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                score = rm(input_ids=torch.tensor([ids])).logits.item()
            assert answer["score"] == pytest.approx(score, abs=1e-3), answer
    assert "prompt 1: Give me a tip for sleeping well." in printed and f"written: {output}" in printed
    # A score column per model; the mean of each column last.
    header, *rows, mean = printed.split("\n\n")[0].splitlines()
    assert header.split() == ["prompt", *generate.labels_for([str(tiny_model), str(sft_checkpoint)])]
    scores = [[answer["score"] for answer in line["answers"].values()] for line in lines]
    for row, expected_scores in zip(rows, scores, strict=True):
        assert [float(cell) for cell in row.split()[-2:]] == pytest.approx(expected_scores, abs=1e-3)
    assert mean.split()[:4] == ["mean", "over", "3", "prompt(s)"]
    assert [float(cell) for cell in mean.split()[-2:]] == pytest.approx(
        [sum(column) / 3 for column in zip(*scores, strict=True)], abs=2e-3)

    # Sampling is seeded: the same command gives the same answers.
    assert main(argv) == 0
    assert [json.loads(line) for line in output.read_text().splitlines()] == lines


@pytest.mark.slow
def test_held_out_split_of_a_checkpoint(sft_checkpoint: Path, rm_checkpoint: Path, tmp_path: Path, capsys) -> None:
    from rlhf_jobs.core.data import SFT_SCHEMA, load_splits

    marker = json.loads((sft_checkpoint / "rlhf_stage.json").read_text())
    dataset = marker["config"]["Dataset"]
    _, held_out = load_splits(dataset["train_file"], None, dataset["validation_split_percentage"], SFT_SCHEMA, 42)
    output = tmp_path / "held-out.jsonl"
    assert main(["generate", "--model", str(sft_checkpoint), "--held-out", str(sft_checkpoint), "--rm",
                 str(rm_checkpoint), "--num", "3", "--output", str(output)]) == 0
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["prompt"].split(" [")[0] for line in lines] == [r["instruction"] for r in list(held_out)[:3]]


@pytest.mark.slow
def test_greedy_answers_are_each_model_s_most_likely_and_no_file_is_written_by_default(
    sft_checkpoint: Path, rm_checkpoint: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """`--greedy`: what each model prefers, the same whatever the seed; without --output nothing is written (it
    wrote samples.jsonl into the directory it ran from, the repository root)."""
    from transformers import AutoModelForCausalLM

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "--model", str(sft_checkpoint), "--rm", str(rm_checkpoint), "--prompts", str(prompts),
            "--greedy", "--max-new-tokens", "8"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main([*argv, "--seed", "7", "--temperature", "0.5"]) == 0
    assert capsys.readouterr().out == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"] and "written" not in first

    tokenizer = load_tokenizer(str(sft_checkpoint), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(sft_checkpoint).eval()
    prompt = rollout.tokenize_prompts(PROMPTS[:1], tokenizer, "instruction", 128)[0]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt["input_ids"]]), do_sample=False, max_new_tokens=8,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(out[0, len(prompt["input_ids"]):], skip_special_tokens=True)
    label, shown = first.split("prompt 1: ")[1].splitlines()[1].split(None, 1)
    assert (label, shown) == (sft_checkpoint.name, " ".join(expected.split()) or "(empty)")

"""The DPO stage: the loss against TRL 1.12's DPOTrainer (recorded fixture), tokenisation and truncation, bad input,
2 workers = 1 worker, precomputed = live reference, resume, LoRA and FSDP runs, `--stages sft,dpo`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLES, local_config, write_config

from rlhf_jobs.algorithms import dpo
from rlhf_jobs.core.config import DPOTraining
from rlhf_jobs.core.errors import ConfigError, DataError
from rlhf_jobs.core.loading import validate_config
from rlhf_jobs.engine import packing
from rlhf_jobs.engine.models import load_causal_lm, load_tokenizer

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "trl_dpo_reference.json").read_text())


def sample_pairs(count: int | None = None, indices: list[int] | None = None) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (SAMPLES / "sample_rm_data.jsonl").read_text().splitlines() if line]
    return [records[i] for i in indices] if indices is not None else records[:count]


def task_for(model_dir: Path, packed: bool, **training: Any) -> dpo.DPOTask:
    """A DPOTask set up as `build` sets it, without a worker."""
    task = dpo.DPOTask()
    task.training = DPOTraining(**training)
    task.tokenizer = load_tokenizer(str(model_dir))
    task.packed, task.rows = packed, packing.RowPlan(hidden_size=128)
    return task


# ---- the loss ------------------------------------------------------------------------------------------------


def test_loss_types_match_hand_computation() -> None:
    policy_c, policy_r = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
    ref_c, ref_r = torch.tensor([-11.0, -19.0]), torch.tensor([-11.5, -16.0])
    beta = 0.5
    # Δ = (π_c - ref_c) - (π_r - ref_r): pair 0: 1 - (-0.5) = 1.5; pair 1: -1 - 1 = -2
    delta = torch.tensor([1.5, -2.0])
    losses, chosen, rejected = dpo.dpo_loss(policy_c, policy_r, ref_c, ref_r, beta)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.75)), math.log1p(math.exp(1.0))])
    assert chosen.tolist() == pytest.approx([0.5, -0.5]) and rejected.tolist() == pytest.approx([-0.25, 0.5])
    cdpo, _, _ = dpo.dpo_loss(policy_c, policy_r, ref_c, ref_r, beta, label_smoothing=0.2)
    expected = [0.8 * math.log1p(math.exp(-b * d)) + 0.2 * math.log1p(math.exp(b * d))
                for b, d in ((beta, 1.5), (beta, -2.0))]
    assert cdpo.tolist() == pytest.approx(expected)
    hinge, _, _ = dpo.dpo_loss(policy_c, policy_r, ref_c, ref_r, beta, "hinge")
    assert hinge.tolist() == pytest.approx([0.25, 2.0])
    tokens_c, tokens_r = torch.tensor([4.0, 2.0]), torch.tensor([5.0, 1.0])
    ipo, _, _ = dpo.dpo_loss(policy_c, policy_r, ref_c, ref_r, beta, "ipo", 0.0, tokens_c, tokens_r)
    assert ipo.tolist() == pytest.approx([(1 / 4 + 0.5 / 5 - 1) ** 2, (-1 / 2 - 1 / 1 - 1) ** 2])
    assert torch.equal(-F.logsigmoid(beta * delta), losses)


def test_identical_policy_and_reference_give_log_2_for_every_loss_with_a_log() -> None:
    logps = torch.tensor([-30.0, -7.0])
    for smoothing in (0.0, 0.1, 0.4):
        losses, _, _ = dpo.dpo_loss(logps, logps - 3, logps, logps - 3, 0.1, label_smoothing=smoothing)
        assert losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7)


@pytest.fixture(scope="module")
def trl_models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fixture's policy (build_tiny_model seed 1) and reference (seed 0, the session's tiny model)."""
    from rlhf_jobs.tools.tiny_model import build_tiny_model

    assert FIXTURE["models"]["policy"].endswith("seed=1)") and FIXTURE["models"]["reference"].endswith("seed=0)")
    return {"policy": build_tiny_model(tmp_path_factory.mktemp("seed1") / "model", seed=1), "reference": tiny_model}


def test_our_token_ids_are_trls_on_the_fixture_pairs(trl_models: dict[str, Path]) -> None:
    """For our instruction prompts and the GPT-2 tokenizer, [BOS] prompt + response + EOS (BOS: none for GPT-2)
    is TRL's prompt ids + completion ids, with the response starting where TRL's completion does."""
    tokenizer = load_tokenizer(str(trl_models["policy"]))
    records = sample_pairs(indices=FIXTURE["record_indices"])
    for record, pair in zip(records, FIXTURE["pairs"], strict=True):
        example = dpo.tokenize_dpo(record, tokenizer, "instruction", FIXTURE["settings"]["max_length"])
        for side in ("chosen", "rejected"):
            assert example[f"{side}_ids"] == pair["prompt_ids"] + pair[f"{side}_ids"]
            assert example[f"{side}_start"] == len(pair["prompt_ids"])
        assert not example["truncated"] and not example["response_truncated"]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_loss_equals_trls_dpo_trainer_for_each_loss_type(trl_models: dict[str, Path], packed: bool) -> None:
    """TRL 1.12 DPOTrainer's loss on 4 pairs (policy seed 1, reference seed 0, fp32), through our task's own
    collate / forward / loss, within 1e-5 (of TRL's fp32 and fp64 runs); cDPO (label_smoothing 0.1) against the
    recorded formula value on TRL's log-probs."""
    recorded = FIXTURE["float32"]
    records = sample_pairs(indices=FIXTURE["record_indices"])
    beta = FIXTURE["settings"]["beta"]
    results = {}
    for loss_type, smoothing, name in (("sigmoid", 0.0, "sigmoid"), ("ipo", 0.0, "ipo"), ("hinge", 0.0, "hinge"),
                                       ("sigmoid", 0.1, "cdpo_label_smoothing_0.1")):
        task = task_for(trl_models["policy"], packed, beta=beta, loss_type=loss_type, label_smoothing=smoothing)
        policy = load_causal_lm(str(trl_models["policy"]), task.tokenizer, dropout=False).eval()
        task.reference = load_causal_lm(str(trl_models["reference"]), task.tokenizer, dropout=False).eval()
        examples = [dpo.tokenize_dpo(record, task.tokenizer, "instruction", 1024) for record in records]
        with torch.no_grad():
            losses, chosen, rejected = task.pair_losses(policy, task.collate(examples))
        expected = recorded["losses"][name]
        assert losses.mean().item() == pytest.approx(expected["loss"], abs=1e-5), name
        assert losses.mean().item() == pytest.approx(FIXTURE["float64"]["losses"][name]["loss"], abs=1e-5), name
        # Per pair, fp32 summation order: summed log-probs of ~-400 differ by up to 7e-5 between two fp32
        # computations (ours and TRL's alike: 2e-7 relative), which moves Δ by up to 1.5e-4 and a pair's loss by
        # up to 2.5e-5 (ipo, a loss of 25); the means over the batch agree within 5e-6.
        assert losses.tolist() == pytest.approx(expected["per_pair_loss"], abs=5e-5), name
        results[name] = (chosen, rejected)
    metrics = recorded["losses"]["sigmoid"]["metrics"]
    chosen, rejected = results["sigmoid"]
    assert chosen.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert rejected.mean().item() == pytest.approx(metrics["rewards/rejected"], abs=1e-5)
    assert (chosen - rejected).mean().item() == pytest.approx(metrics["rewards/margins"], abs=1e-5)
    assert (chosen > rejected).float().mean().item() == metrics["rewards/accuracies"]


# ---- tokenisation, truncation, bad input ---------------------------------------------------------------------


def test_too_long_pairs_keep_the_prompts_end_and_the_responses_start(tiny_llama: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_llama))
    bos = [tokenizer.bos_token_id]
    record = {"instruction": "word " * 200, "chosen": "yes it is", "rejected": "no"}
    whole = dpo.tokenize_dpo(record, tokenizer, "instruction", 4096)
    cut = dpo.tokenize_dpo(record, tokenizer, "instruction", 64)
    assert whole["chosen_ids"][:1] == bos and not whole["truncated"]
    for side in ("chosen", "rejected"):
        assert len(cut[f"{side}_ids"]) <= 64 and cut[f"{side}_ids"][:1] == bos
        response = whole[f"{side}_ids"][whole[f"{side}_start"]:]
        assert cut[f"{side}_ids"][cut[f"{side}_start"]:] == response, "the response is whole, EOS included"
        assert response[-1] == tokenizer.eos_token_id
        assert whole[f"{side}_ids"][-len(cut[f"{side}_ids"]) + 1:] == cut[f"{side}_ids"][1:], "the prompt's end"
    assert cut["truncated"] and not cut["response_truncated"]

    long_answer = {"instruction": "Say it.", "chosen": "yes " * 300, "rejected": "no " * 300}
    cut = dpo.tokenize_dpo(long_answer, tokenizer, "raw", 64)
    whole = dpo.tokenize_dpo(long_answer, tokenizer, "raw", 4096)
    assert cut["response_truncated"] and not cut["truncated"], "the short prompt is kept whole"
    for side in ("chosen", "rejected"):
        assert len(cut[f"{side}_ids"]) == 64 and cut[f"{side}_ids"] == whole[f"{side}_ids"][:64]


def dpo_config(tmp_path: Path, model: Path, train_file: Path | str, dataset: dict[str, Any] | None = None,
               **training: Any) -> dict[str, Any]:
    config = local_config("dpo", model_name=model, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "model",
                          train_file=train_file)
    config["General"]["model_pretrain"] = None
    config["Dataset"].update(dataset or {})
    config["Training"].update({"num_training_workers": 1, **training})
    return config


def test_pairs_are_dropped_when_identical_and_counted_when_cut(tiny_model: Path, tmp_path: Path, capsys) -> None:
    pairs = sample_pairs(12)
    pairs[3] = {**pairs[3], "rejected": f"  {pairs[3]['chosen']} "}  # the same after stripping
    long_prompt = {"instruction": "tell me " * 80, "chosen": "A", "rejected": "B"}
    same_after_cut = {"instruction": "Q", "chosen": "yes " * 100 + "A", "rejected": "yes " * 100 + "B"}
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in [*pairs, long_prompt, same_after_cut]))
    config = validate_config(dpo_config(tmp_path, tiny_model, data, {"validation_split_percentage": 0,
                                                                      "max_length": 64}), "dpo", paths=False)
    prepared = dpo.DPOTask().prepare(config)
    out = capsys.readouterr().out
    assert f"{data}: 2 of 14 pair(s) dropped: chosen and rejected are the same (after cutting to " \
           "Dataset.max_length=64 tokens)" in out
    assert f"{data}: " in out and "record(s) longer than Dataset.max_length=64 tokens were truncated" in out
    assert "have a response longer than Dataset.max_length=64" in out
    assert len(prepared["train"]) == 12 and prepared["eval"] is None
    assert [e["index"] for e in prepared["train"]] == list(range(12))
    assert all(len(e["chosen_ids"]) <= 64 and e["split"] == "train" for e in prepared["train"])


def test_bad_input_is_one_line_naming_the_line_or_key(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                    + json.dumps({"prompt": "a", "chosen": "b", "rejected": "  "}) + "\n")
    config = validate_config(dpo_config(tmp_path, tiny_model, data, {"validation_split_percentage": 0}), "dpo",
                             paths=False)
    with pytest.raises(DataError, match=rf"^{data}:2: field 'rejected' is empty$"):
        dpo.DPOTask().prepare(config)
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match="every pair's chosen equals its rejected"):
        dpo.DPOTask().prepare(config)
    for training, message in (({"beta": 0}, r"Training\.beta: Input should be greater than 0"),
                              ({"loss_type": "kto"}, r"Training\.loss_type: Input should be 'sigmoid', 'ipo' or"),
                              ({"loss_type": "ipo", "label_smoothing": 0.1},
                               r"label_smoothing \(0\.1\) is conservative DPO.*loss_type ipo has none"),
                              ({"label_smoothing": 0.5}, r"Training\.label_smoothing: Input should be less than 0\.5")):
        with pytest.raises(ConfigError, match=message):
            validate_config(dpo_config(tmp_path, tiny_model, data, **training), "dpo", paths=False)

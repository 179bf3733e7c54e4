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


# ---- 2 workers = 1 worker: gradients and precomputed reference log-probs (real process groups, no Ray) -----------


def dpo_steps(rank: int, world_size: int, policy_dir: str, reference_dir: str,
              layouts: dict[str, tuple[int, int, str, bool, bool]]) -> dict[str, dict[str, Any]]:
    """One optimizer step's gradient per layout (batch size, accumulation, strategy, packed, precomputed) through
    the trainer's own code (`accumulate_gradients`), the reference live (a frozen copy, sharded under FSDP) or
    precomputed by `reference_table` on this layout. All layouts of a worker count share one process group."""
    from rlhf_jobs.algorithms import supervised
    from rlhf_jobs.engine import sharding
    from rlhf_jobs.engine.models import unwrap
    from rlhf_jobs.engine.worker import Worker

    worker = Worker(rank, world_size, torch.device("cpu"))
    results = {}
    for name, (batch_size, accumulation, strategy, packed, precompute) in layouts.items():
        task = task_for(Path(policy_dir), packed, batch_size=batch_size, gradient_accumulation_steps=accumulation,
                        strategy=strategy, beta=0.5)
        examples = [{**dpo.tokenize_dpo(record, task.tokenizer, "instruction", 256), "split": "train",
                     "index": index} for index, record in enumerate(sample_pairs(8))]
        model = sharding.prepare(load_causal_lm(policy_dir, task.tokenizer, dropout=False), task.training, worker)
        reference = load_causal_lm(reference_dir, task.tokenizer, dropout=False).eval().requires_grad_(False)
        reference = sharding.prepare(reference, task.training, worker, trainable=False)
        table = task.reference_table(model, reference, examples, worker)
        if precompute:
            task.precomputed = {"train": table}
        else:
            task.reference = reference
        indices, _ = supervised.step_micro_batches(list(range(8)), 0, batch_size, accumulation, worker)
        batches = [task.collate([examples[i] for i in chunk]) for chunk in indices]
        _, items = supervised.accumulate_gradients(model, task, batches, task.training, worker)
        gradient = {key: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                    for key, p in unwrap(model).named_parameters()}
        results[name] = {"gradient": gradient, "items": items, "table": table, "window": task.window_sums()}
    return results


def test_the_same_global_batch_gives_the_same_gradient_in_every_layout(trl_models: dict[str, Path]) -> None:
    """Policy seed 1 against reference seed 0 (Δ ≠ 0): 8 pairs on 1 worker, 4 × accumulation 2, 4 on each of
    2 workers (DDP and FSDP, the reference sharded too), packed or padded, with the reference live or precomputed
    (each worker its share, summed): the same gradient, and the same precomputed table everywhere. Gradients
    reach ~4 (summed log-probs of a random policy): atol 1e-5 is float32 summation order, a pair weighted
    wrongly is off by far more."""
    from process_group import run_processes

    policy, reference = str(trl_models["policy"]), str(trl_models["reference"])
    one = run_processes(dpo_steps, 1, policy, reference, {"8 × 1 worker": (8, 1, "ddp", False, False),
                                                          "4 × accumulation 2, packed, precomputed":
                                                              (4, 2, "ddp", True, True)})
    two = run_processes(dpo_steps, 2, policy, reference, {"4 × 2 workers (DDP), packed": (4, 1, "ddp", True, False),
                                                          "4 × 2 workers (FSDP)": (4, 1, "fsdp", False, False),
                                                          "4 × 2 workers (FSDP), precomputed":
                                                              (4, 1, "fsdp", False, True)})
    expected = one[0]["8 × 1 worker"]
    assert expected["items"] == 8 and expected["table"].shape == (8, 2) and (expected["table"] < 0).all()
    for name in [*one[0], *two[0]]:
        ranks = [results[name] for results in (one if name in one[0] else two)]
        assert sum(rank["window"]["pairs"] for rank in ranks) == 8, name
        assert sum(rank["window"]["correct"] for rank in ranks) == expected["window"]["correct"], name
        for rank in ranks:
            assert rank["items"] == 8, name
            torch.testing.assert_close(rank["table"], expected["table"], rtol=1e-6, atol=1e-5, msg=name)
            for key, grad in expected["gradient"].items():
                torch.testing.assert_close(rank["gradient"][key], grad, rtol=2e-5, atol=1e-5, msg=f"{name}: {key}")


# ---- real runs ---------------------------------------------------------------------------------------------


def records(output_dir: Path, split: str = "train") -> dict[int, dict[str, Any]]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["split"] == split}


def run_config(tmp_path: Path, name: str, model: Path, **training: Any) -> Path:
    """A short DPO run from `model` (no SFT model: the reference is `model` too) on 48 sample pairs, 12 held out."""
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(p) + "\n" for p in sample_pairs(48)))
    config = dpo_config(tmp_path / name, model, data, {"validation_split_percentage": 25},
                        **{"batch_size": 4, "epochs": 1, "max_train_steps": 6, "learning_rate": 1e-3,
                           "warmup_ratio": 0.0, "logging_steps": 1, "eval_steps": 3, "save_dtype": "float32",
                           **training})
    return write_config(tmp_path / f"{name}.yaml", config)


def train(config: Path, *args: str) -> None:
    from rlhf_jobs.cli import main

    assert main(["train", "dpo", "--config_path", str(config), *args]) == 0


def assert_same(run: dict[int, dict[str, Any]], expected: dict[int, dict[str, Any]], keys: tuple[str, ...],
                rel: float, abs: float = 1e-7) -> None:
    assert sorted(run) == sorted(expected)
    for step, record in expected.items():
        for key in keys:
            assert run[step][key] == pytest.approx(record[key], rel=rel, abs=abs), (step, key)


@pytest.mark.slow
def test_precomputed_reference_equals_the_live_one_and_a_resume_reads_it(tiny_model: Path, tmp_path: Path,
                                                                         capfd) -> None:
    """Policy = reference at the start: the first loss is log 2. The losses, rewards and held-out metrics with the
    reference's log-probs computed once before training equal those with the live reference; a run stopped at
    step 3 and continued reads them from its checkpoint and computes what the uninterrupted run does."""
    from safetensors.torch import load_file

    train(run_config(tmp_path, "live", tiny_model), "--in-process")
    live, live_eval = records(tmp_path / "live" / "out"), records(tmp_path / "live" / "out", "eval")
    assert live[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (live[1]["margin"], live[1]["accuracy"]) == (0.0, 0.0)
    assert live_eval[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and sorted(live_eval) == [0, 3, 6]
    assert live_eval[6]["eval_accuracy"] > 0.5 and live_eval[6]["eval_loss"] < math.log(2)
    assert live[6]["margin"] > 0 and live[6]["rewards_chosen"] > live[6]["rewards_rejected"]

    train(run_config(tmp_path, "precomputed", tiny_model, precompute_reference=True), "--in-process")
    assert "reference log-probs of 36 train and 12 held-out pairs computed; reference freed" in capfd.readouterr().out
    # The same log-probs in other batches (another packing): float32 summation order, ~1e-6 on rewards of ~0.1-1.
    # Accuracy counts rewards of 0 at step 1 (policy = reference), which that noise may tip: from step 2 on.
    precomputed = records(tmp_path / "precomputed" / "out")
    keys = ("loss", "rewards_chosen", "rewards_rejected", "margin")
    assert_same(precomputed, live, keys, rel=1e-5, abs=1e-5)
    assert [precomputed[step]["accuracy"] for step in range(2, 7)] == [live[step]["accuracy"] for step in range(2, 7)]
    assert_same(records(tmp_path / "precomputed" / "out", "eval"), live_eval, ("eval_loss", "eval_margin"), rel=1e-5,
                abs=1e-5)

    split = run_config(tmp_path, "split", tiny_model, precompute_reference=True)
    train(split, "--in-process", "--stop-at-step", "3")
    saved = torch.load(next((tmp_path / "split" / "out" / "checkpoints").glob("step-*")) / "state.pt",
                       weights_only=False)
    assert saved["task"]["reference_logps"]["train"].shape == (36, 2)
    capfd.readouterr()
    train(split, "--in-process")
    assert "reference log-probs from the checkpoint" in capfd.readouterr().out
    assert_same(records(tmp_path / "split" / "out"), precomputed, (*keys, "accuracy"), rel=1e-6)
    final, expected = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("split", "precomputed"))
    for key, tensor in expected.items():
        torch.testing.assert_close(final[key], tensor, rtol=1e-6, atol=1e-7, msg=key)


def test_precomputed_log_probs_of_other_pairs_are_refused(tiny_model: Path) -> None:
    from rlhf_jobs.engine.worker import Worker

    config = validate_config(dpo_config(Path("/tmp/unused"), tiny_model, "x.jsonl", precompute_reference=True),
                             "dpo", paths=False)
    saved = {"task": {"reference_logps": {"fingerprint": "of other pairs", "train": torch.zeros(3, 2)}}}
    with pytest.raises(DataError, match=r"^Dataset\.train_file: the pairs are not those this run started with"):
        dpo.DPOTask().start(torch.nn.Linear(1, 1), config, Worker(0, 1, torch.device("cpu")), saved,
                            {"fingerprint": "of these pairs"})


@pytest.mark.slow
def test_lora_trains_against_its_disabled_adapter(tiny_model: Path, tmp_path: Path) -> None:
    """With LoRA the reference is the policy with its adapter disabled (no second model), live or precomputed."""
    lora = {"lora": {"r": 8, "alpha": 16}, "learning_rate": 1e-2}
    train(run_config(tmp_path, "lora", tiny_model, **lora), "--in-process")
    train(run_config(tmp_path, "lora-precomputed", tiny_model, precompute_reference=True, **lora), "--in-process")
    live, evaluation = records(tmp_path / "lora" / "out"), records(tmp_path / "lora" / "out", "eval")
    assert live[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evaluation[6]["eval_loss"] < evaluation[0]["eval_loss"] - 0.05
    assert evaluation[6]["eval_accuracy"] > evaluation[0]["eval_accuracy"] + 0.5
    assert_same(records(tmp_path / "lora-precomputed" / "out"), live, ("loss", "margin"), rel=1e-5, abs=1e-5)
    assert (tmp_path / "lora" / "model" / "model.safetensors").is_file(), "merged into a plain model"


@pytest.mark.slow
def test_fsdp_run_on_two_workers_trains(tiny_model: Path, tmp_path: Path) -> None:
    """FSDP over 2 Ray workers, the frozen reference sharded like the policy."""
    train(run_config(tmp_path, "fsdp", tiny_model, strategy="fsdp", num_training_workers=2, batch_size=2))
    steps, evaluation = records(tmp_path / "fsdp" / "out"), records(tmp_path / "fsdp" / "out", "eval")
    assert steps[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evaluation[6]["eval_loss"] < evaluation[0]["eval_loss"] - 0.05
    assert evaluation[6]["eval_accuracy"] > 0.5
    assert (tmp_path / "fsdp" / "model" / "rlhf_stage.json").is_file()


@pytest.mark.slow
def test_pipeline_sft_then_dpo_shows_both_models_answers(tmp_path: Path, repo_root: Path) -> None:
    """`rlhf-jobs pipeline --stages sft,dpo` with configs/local: DPO starts from this run's SFT model, the summary
    shows its held-out accuracy and margin, and held-out answers of both models are shown side by side (no
    reward model: no scores)."""
    import subprocess
    import sys

    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "rlhf_jobs.cli", "pipeline", "--backend", "local", "--workdir", str(workdir),
               "--tiny-model", "--in-process", "--stages", "sft,dpo", "--set", "Training.num_training_workers=1",
               "--set", "sft.Training.epochs=1", "--set", "dpo.Training.epochs=1"]
    done = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((workdir / "pipeline.json").read_text())
    assert {stage: entry["status"] for stage, entry in record["stages"].items()} == {"sft": "succeeded",
                                                                                     "dpo": "succeeded"}
    marker = json.loads((workdir / "dpo" / "rlhf_stage.json").read_text())
    assert marker["config"]["General"]["model_pretrain"] == str(workdir / "sft")
    row = next(line for line in done.stdout.splitlines() if line.startswith("dpo "))
    assert "succeeded" in row and "accuracy 0.00 → " in row and "margin 0.00 → " in row
    samples = [json.loads(line) for line in (workdir / "dpo-samples.jsonl").read_text().splitlines()]
    shown = f"the SFT model's and the DPO policy's answers to the {len(samples)} held-out prompts, not scored"
    assert shown in done.stdout
    assert len(samples) >= 5 and all(set(s["answers"]) == {"sft", "dpo"} for s in samples)
    assert all(answer["score"] is None for s in samples for answer in s["answers"].values())
    assert (workdir / "curves.png").stat().st_size > 10_000


def test_precompute_reference_may_change_when_a_run_resumes(tiny_model: Path, tmp_path: Path) -> None:
    """The out-of-memory advice names it: turning it on for the resume computes the same starting model's
    log-probs, so it is not part of the run's identity (a changed beta is)."""
    from rlhf_jobs.store import identity

    def of(**training: Any) -> dict[str, Any]:
        return identity.compute(validate_config(dpo_config(tmp_path, tiny_model, "x.jsonl", **training), "dpo",
                                                paths=False))

    assert of(precompute_reference=True) == of(precompute_reference=False)
    assert of(beta=0.2) != of(beta=0.1)

"""A recorded reference for our DPO: TRL 1.12 `DPOTrainer`'s loss, metrics, per-pair summed log-probs and token ids
on one fixed batch, written as JSON (tests/fixtures/trl_dpo_reference.json), so the main tests can compare our
implementation term by term without TRL installed.

Runs TRL's own code: the dataset preparation (`_prepare_dataset`: EOS added as text, prompt and prompt+completion
tokenised, completion ids = the tail after the prompt's ids), the collator (chosen rows then rejected rows, right
padding), `compute_loss` (loss and the logged `rewards/*`, `logps/*` metrics) and `compute_ref_log_probs` (the
summed completion log-probs, called on the policy and on the reference). Dropout off (TRL's default), beta 0.1,
loss types sigmoid, ipo, hinge, sigmoid with label_smoothing 0.1 (TRL 1.12 ignores it there: the same loss as
sigmoid) and robust with 0.1; conservative DPO (cDPO) is no longer a DPOTrainer loss in TRL 1.12, so its row is
the formula of TRL's CPO trainer and pre-1.0 `DPOTrainer` (`-(1-ε)·logσ(βΔ) - ε·logσ(-βΔ)`) evaluated on TRL's
log-probs, and marked as such. Everything once in float32 (as trained) and once in float64 (the same code with
the models in float64: formula differences then show beyond rounding).

    .venv-bench/bin/python bench/trl_dpo_reference.py                        # tiny models, writes the fixture
    .venv-bench/bin/python bench/trl_dpo_reference.py --policy P --reference R --pairs F --output out.json

Without --policy/--reference it builds the tiny GPT-2 twice (`build_tiny_model(dir, seed=1)` as the policy,
`seed=0` as the reference), which the main tests rebuild bit for bit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from common import DATA, REPO, RM_FILE, read_jsonl
from trl_side import dpo_records

BETA = 0.1
PAIR_INDICES = (0, 4, 11, 18)  # policy prefers chosen in 4 and 18, not in 0 and 11; 11 has `prompt`, 18 a long rejected
POLICY_SEED, REFERENCE_SEED = 1, 0
# name -> (TRL loss_type, label_smoothing)
LOSSES = {
    "sigmoid": ("sigmoid", 0.0),
    "ipo": ("ipo", 0.0),
    "hinge": ("hinge", 0.0),
    "sigmoid_label_smoothing_0.1": ("sigmoid", 0.1),
    "robust_label_smoothing_0.1": ("robust", 0.1),
}
CDPO_SMOOTHING = 0.1
TINY_MODELS = {"policy": f"rlhf_jobs.tools.tiny_model.build_tiny_model(dir, seed={POLICY_SEED})",
               "reference": f"rlhf_jobs.tools.tiny_model.build_tiny_model(dir, seed={REFERENCE_SEED})"}


def versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in ("trl", "transformers", "torch", "accelerate", "datasets")}


def tiny_models(work: Path) -> tuple[Path, Path]:
    """The policy (seed 1) and the reference (seed 0): two tiny GPT-2s with the same tokenizer."""
    from rlhf_jobs.tools.tiny_model import build_tiny_model

    return (build_tiny_model(work / f"policy-seed{POLICY_SEED}", seed=POLICY_SEED),
            build_tiny_model(work / f"reference-seed{REFERENCE_SEED}", seed=REFERENCE_SEED))


def write_fixture(path: Path, fixture: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"written to {path}")


def load(path: Path, dtype: torch.dtype) -> Any:
    """As TRL loads a model given as a path (`create_model_from_path`), in `dtype`."""
    from trl.trainer.utils import create_model_from_path

    return create_model_from_path(str(path), dtype=dtype)


def trainer_for(policy: Path, reference: Path, records: list[dict[str, str]], loss_type: str, smoothing: float,
                dtype: torch.dtype, output_dir: Path) -> Any:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(output_dir), beta=BETA, loss_type=[loss_type], label_smoothing=smoothing,
                     per_device_train_batch_size=len(records), use_cpu=True, bf16=False, fp16=False,
                     gradient_checkpointing=False, report_to="none", disable_dropout=True, dataset_num_proc=None,
                     disable_tqdm=True)
    return DPOTrainer(model=load(policy, dtype), ref_model=load(reference, dtype), args=args,
                      train_dataset=Dataset.from_list(records),
                      processing_class=AutoTokenizer.from_pretrained(str(policy)))


def batch_of(trainer: Any, rows: list[int]) -> dict[str, torch.Tensor]:
    return trainer.data_collator([trainer.train_dataset[i] for i in rows])


def loss_and_metrics(trainer: Any, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """`compute_loss` in training mode (dropout is off), and what it logged for this one batch."""
    trainer._metrics["train"].clear()
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    trainer._metrics["train"].clear()
    return float(loss), metrics


def summed_logps(trainer: Any, batch: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Summed completion log-probs per pair (`compute_ref_log_probs`, the reference's code, on both models)."""
    logps = {}
    for name, model in (("policy", trainer.model), ("reference", trainer.ref_model)):
        chosen, rejected = trainer.compute_ref_log_probs(model, batch)
        logps[f"{name}_chosen"], logps[f"{name}_rejected"] = chosen.tolist(), rejected.tolist()
    return logps


def cdpo(logps: dict[str, list[float]], smoothing: float) -> dict[str, Any]:
    """Conservative DPO on TRL's log-probs: -(1-ε)·logσ(βΔ) - ε·logσ(-βΔ), Δ = chosen log-ratio - rejected's."""
    def logsigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))

    per_pair = []
    for pc, pr, rc, rr in zip(logps["policy_chosen"], logps["policy_rejected"], logps["reference_chosen"],
                              logps["reference_rejected"], strict=True):
        delta = (pc - rc) - (pr - rr)
        per_pair.append(-(1 - smoothing) * logsigmoid(BETA * delta) - smoothing * logsigmoid(-BETA * delta))
    return {"source": "formula on TRL's log-probs (TRL 1.12 DPOTrainer has no cDPO loss)",
            "label_smoothing": smoothing, "loss": sum(per_pair) / len(per_pair), "per_pair_loss": per_pair}


def reference_values(policy: Path, reference: Path, records: list[dict[str, str]], dtype: torch.dtype,
                     work: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows = list(range(len(records)))
    results: dict[str, Any] = {"losses": {}}
    tokens: list[dict[str, Any]] = []
    for name, (loss_type, smoothing) in LOSSES.items():
        trainer = trainer_for(policy, reference, records, loss_type, smoothing, dtype, work / name)
        batch = batch_of(trainer, rows)
        if not tokens:
            tokens = [{key: trainer.train_dataset[i][key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")}
                      for i in rows]
            results["logps"] = summed_logps(trainer, batch)
            results["completion_tokens"] = {
                "chosen": [len(t["chosen_ids"]) for t in tokens], "rejected": [len(t["rejected_ids"]) for t in tokens]}
        loss, metrics = loss_and_metrics(trainer, batch)
        per_pair = [loss_and_metrics(trainer, batch_of(trainer, [i]))[0] for i in rows]
        results["losses"][name] = {"loss_type": loss_type, "label_smoothing": smoothing, "loss": loss,
                                   "per_pair_loss": per_pair, "metrics": metrics}
    results["losses"][f"cdpo_label_smoothing_{CDPO_SMOOTHING}"] = cdpo(results["logps"], CDPO_SMOOTHING)
    return results, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", type=Path, help="policy model dir (default: build_tiny_model seed 1)")
    parser.add_argument("--reference", type=Path, help="reference model dir (default: build_tiny_model seed 0)")
    parser.add_argument("--pairs", type=Path, default=DATA / RM_FILE, help="reward-model records (JSONL)")
    parser.add_argument("--indices", default=",".join(map(str, PAIR_INDICES)), help="records of the batch")
    parser.add_argument("--output", type=Path, default=REPO / "tests" / "fixtures" / "trl_dpo_reference.json")
    args = parser.parse_args()
    if (args.policy is None) != (args.reference is None):
        parser.error("give both --policy and --reference, or neither (the tiny models are built)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    indices = [int(i) for i in args.indices.split(",")]
    records = read_jsonl(args.pairs)
    batch_records = dpo_records([records[i] for i in indices])
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        built = args.policy is None
        policy, reference = tiny_models(work) if built else (args.policy, args.reference)
        fp32, tokens = reference_values(policy, reference, batch_records, torch.float32, work / "fp32")
        fp64, tokens64 = reference_values(policy, reference, batch_records, torch.float64, work / "fp64")
    assert tokens == tokens64
    models = TINY_MODELS if built else {"policy": str(args.policy), "reference": str(args.reference)}
    pairs_file = args.pairs.resolve()
    fixture = {
        "about": "TRL DPOTrainer on one batch: loss and logged metrics per loss type, summed completion log-probs "
                 "per pair (policy and reference), the token ids TRL built. Written by bench/trl_dpo_reference.py.",
        "command": "python bench/trl_dpo_reference.py " + " ".join(sys.argv[1:]),
        "versions": versions(),
        "models": models,
        "pairs_file": str(pairs_file.relative_to(REPO)) if pairs_file.is_relative_to(REPO) else str(pairs_file),
        "record_indices": indices,
        "settings": {"beta": BETA, "max_length": 1024, "truncation_mode": "keep_start", "disable_dropout": True,
                     "prompt_style": "instruction", "batch": "chosen rows then rejected rows, right-padded"},
        "pairs": [{**row, **ids} for row, ids in zip(batch_records, tokens, strict=True)],
        "float32": fp32,
        "float64": fp64,
    }
    write_fixture(args.output, fixture)
    for name, value in fp32["losses"].items():
        print(f"{name:32s} fp32 {value['loss']:.8f}  fp64 {fp64['losses'][name]['loss']:.8f}")


if __name__ == "__main__":
    main()

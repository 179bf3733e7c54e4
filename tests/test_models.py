"""Real models: fp32 master weights for bf16 checkpoints, BOS where the model expects it, LoRA export
and the clear errors for configs that do not fit a model (before any worker starts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import local_config, write_config

from rlhf_jobs.algorithms.rm import tokenize_pair
from rlhf_jobs.algorithms.sft import IGNORE_INDEX, tokenize_sft
from rlhf_jobs.cli import main
from rlhf_jobs.core.config import LoRA, SupervisedTraining
from rlhf_jobs.engine.export import exportable
from rlhf_jobs.engine.models import bos_ids, load_causal_lm, load_reward_model, load_tokenizer, stored_dtype

RECORD = {"instruction": "Name a colour.", "context": None, "response": "Blue."}
PAIR = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I will not."}


def changed_fraction(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    changed = sum(int((before[name].float() != after[name].float()).sum()) for name in before)
    return changed / sum(tensor.numel() for tensor in before.values())


def test_adamw_on_bf16_weights_rounds_most_updates_away(tiny_llama: Path) -> None:
    """The failure fp32 master weights prevent: one AdamW step at lr 1e-6 on the bf16 weights themselves."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)  # transformers 5 keeps the stored bf16
    assert model.dtype == torch.bfloat16
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    optimizer.step()
    assert changed_fraction(before, dict(model.named_parameters())) < 0.2


@pytest.mark.slow
def test_a_bf16_stored_model_trains_every_weight(tiny_llama: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    assert stored_dtype(str(tiny_llama)) == torch.bfloat16
    config = local_config("sft", base_model=tiny_llama, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "m")
    config["Training"].update(num_training_workers=1, max_train_steps=3, learning_rate=1e-6, warmup_ratio=0.0,
                              lr_scheduler="constant", weight_decay=0.0, save_dtype="float32")
    assert main(["train", "sft", "--config_path", str(write_config(tmp_path / "c.yaml", config)), "--in-process"]) == 0
    before, after = load_file(tiny_llama / "model.safetensors"), load_file(tmp_path / "m" / "model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in after.values())
    # Norm weights start at exactly 1.0 and move by ~1e-6: representable in fp32, not in bf16. The input
    # embedding rows of tokens no batch contained get no gradient, so they are left out.
    trained = [name for name in before if "embed_tokens" not in name]
    assert changed_fraction({n: before[n] for n in trained}, {n: after[n] for n in trained}) > 0.99


def test_bos_in_every_stage_for_llama_and_not_for_gpt2(tiny_llama: Path, tiny_model: Path) -> None:
    llama, gpt2 = load_tokenizer(str(tiny_llama)), load_tokenizer(str(tiny_model))
    assert bos_ids(llama) == [llama.bos_token_id] and bos_ids(gpt2) == []
    for tokenizer in (llama, gpt2):
        bos = bos_ids(tokenizer)
        sft = tokenize_sft(RECORD, tokenizer, "instruction", 64)
        assert sft["input_ids"][: len(bos)] == bos and sft["labels"][: len(bos)] == [IGNORE_INDEX] * len(bos)
        assert sft["input_ids"][-1] == tokenizer.eos_token_id and sft["labels"][-1] == tokenizer.eos_token_id
        pair = tokenize_pair(PAIR, tokenizer, "instruction", 12)  # truncated from the left, BOS kept
        for ids in (pair["chosen_ids"], pair["rejected_ids"]):
            assert len(ids) == 12 and ids[: len(bos)] == bos
            assert tokenizer.bos_token_id not in ids[len(bos) :] or tokenizer.bos_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("head", ["causal", "classifier"])
def test_merged_lora_export_is_a_plain_model_with_the_adapter_model_outputs(
    head: str, tiny_llama: Path, tmp_path: Path
) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_jobs.engine.adapters import lora_config

    tokenizer = load_tokenizer(str(tiny_llama))
    torch.manual_seed(0)
    if head == "causal":
        model, task, auto = load_causal_lm(str(tiny_llama), tokenizer), "CAUSAL_LM", AutoModelForCausalLM
    else:
        model, task = load_reward_model(str(tiny_llama), tokenizer), "SEQ_CLS"
        auto = AutoModelForSequenceClassification
    model = get_peft_model(model, lora_config(LoRA(r=4), task)).eval()
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    inputs = {"input_ids": torch.tensor([[1, 5, 9, 13, 2]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        expected = model(**inputs).logits
    exportable(model, SupervisedTraining(lora=LoRA(r=4)), torch.float32).save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    reloaded = auto.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


# ---- configs that do not fit the model: one clear error, nothing created -------------------------------


def sft_command(tmp_path: Path, base: Path, **training: object) -> list[str]:
    config = local_config("sft", base_model=base, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "m")
    config["Training"].update(training)
    return ["train", "sft", "--config_path", str(write_config(tmp_path / "c.yaml", config))]


@pytest.mark.parametrize(("training", "expected"), [
    ({"lora": {"target_modules": ["q_proj", "no_such_proj"]}}, "has no module named 'no_such_proj'"),
    ({"lora": {"target_modules": ["input_layernorm"]}}, "cannot add LoRA to LlamaForCausalLM"),
    ({"strategy": "fsdp", "mixed_precision": "fp16"}, "fp16 is not supported with strategy: fsdp"),
])
def test_a_config_that_does_not_fit_the_model_fails_before_any_worker_starts(
    training: dict, expected: str, tiny_llama: Path, tmp_path: Path, capsys
) -> None:
    assert main(sft_command(tmp_path, tiny_llama, **training)) == 2
    error = capsys.readouterr().err
    assert expected in error and error.count("\n") == 1, error
    assert not (tmp_path / "out").exists()


def test_lora_target_error_names_the_model_s_linear_layers(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    assert main(sft_command(tmp_path, tiny_llama, lora={"target_modules": ["query"]})) == 2
    error = capsys.readouterr().err
    assert "Training.lora" in error and "q_proj" in error and "down_proj" in error


def test_rollout_batch_larger_than_the_experience_batch_is_a_config_error(tmp_path: Path, capsys) -> None:
    config = local_config("ppo", output_dir=tmp_path / "o", checkpoint_dir=tmp_path / "c")
    config["Training"].update(experience_batch_size=8, rollout_batch_size=16)
    path = write_config(tmp_path / "ppo.yaml", config)
    assert main(["check-config", "ppo", "--config_path", str(path), "--no-check-paths"]) == 2
    assert "rollout_batch_size (16) must not exceed experience_batch_size (8)" in capsys.readouterr().err


def test_fsdp_refuses_a_model_without_decoder_layers() -> None:
    from rlhf_jobs.engine.sharding import ShardingError, check_shardable

    with pytest.raises(ShardingError, match="declares none"):
        check_shardable(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_adapter_only_export_loads_as_its_merged_base(tiny_llama: Path, tmp_path: Path) -> None:
    """export: adapter writes the adapter alone; a later stage (or models.load_*) reads it merged."""
    from peft import get_peft_model

    from rlhf_jobs.engine.adapters import lora_config

    tokenizer = load_tokenizer(str(tiny_llama))
    model = get_peft_model(load_causal_lm(str(tiny_llama), tokenizer), lora_config(LoRA(r=4), "CAUSAL_LM")).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    inputs = {"input_ids": torch.tensor([[1, 5, 9]])}
    with torch.no_grad():
        expected = model(**inputs).logits
    exportable(model, SupervisedTraining(lora=LoRA(r=4, export="adapter")), torch.float32).save_pretrained(
        tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    reloaded = load_causal_lm(str(tmp_path / "adapter"), tokenizer).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_running_out_of_memory_is_one_line_with_advice(tiny_llama: Path, tmp_path: Path) -> None:
    """Ray's OOM killer, made to fire at once (a 2% memory threshold), ends the command with exit code 3
    and one line naming the stage and what to change, instead of Ray's actor tables: the last line of the
    output as a terminal shows it (stdout and stderr together)."""
    import os
    import subprocess
    import sys

    command = sft_command(tmp_path, tiny_llama, max_failures=0)
    env = {**os.environ, "RAY_memory_usage_threshold": "0.02", "RAY_memory_monitor_refresh_ms": "100"}
    result = subprocess.run([sys.executable, "-m", "rlhf_jobs.cli", *command], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, timeout=600)
    assert result.returncode == 3, result.stdout[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("error: sft: the workers ran out of memory") and "Training.lora" in last, result.stdout
    assert "Training.strategy: fsdp" in last and "resumes from the last checkpoint" in last
    assert "Traceback" not in result.stdout, result.stdout


def test_gpt2_gelu_runs_fused_and_saves_unchanged(tiny_model: Path, tmp_path: Path) -> None:
    """GPT-2's `gelu_new` runs as PyTorch's fused tanh GELU: the same outputs and gradients as transformers'
    own module (to rounding), and a saved model keeps its config."""
    from transformers import AutoModelForCausalLM
    from transformers.activations import GELUTanh, NewGELUActivation

    tokenizer = load_tokenizer(str(tiny_model))
    ours = load_causal_lm(str(tiny_model), tokenizer)
    stock = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert any(isinstance(m, GELUTanh) for m in ours.modules())
    assert not any(isinstance(m, NewGELUActivation) for m in ours.modules())
    assert any(isinstance(m, NewGELUActivation) for m in stock.modules())
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    for model in (ours, stock):
        model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(ours(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    grads = {name: p.grad for name, p in stock.named_parameters()}
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name], rtol=1e-4, atol=1e-6)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["activation_function"] == "gelu_new"


@pytest.mark.parametrize("save_dtype", [torch.float32, torch.bfloat16])
def test_lora_on_a_bf16_base_is_merged_in_fp32(save_dtype: torch.dtype, tiny_llama: Path, tmp_path: Path) -> None:
    """LoRA + bf16 (base weights kept in bf16, adapters fp32) exported merged: the adapter is added to the base
    weights in fp32, then rounded once to the save dtype, i.e. what merging an fp32 copy of the model gives.
    Before (merged in bf16, then cast): 18.6% of the adapted weights kept their base value in an fp32 export,
    logits off by 1.7e-3 against the adapter's own effect of 1.6e-2 (a bf16 export was already right: peft's
    in-place bf16 add rounds once)."""
    import copy

    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlhf_jobs.engine.adapters import lora_config

    tokenizer = load_tokenizer(str(tiny_llama))
    base = load_causal_lm(str(tiny_llama), tokenizer, dtype=torch.bfloat16)
    torch.manual_seed(0)
    model = get_peft_model(base, lora_config(LoRA(r=4), "CAUSAL_LM")).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.float()  # fp32 adapters, as `add_lora` makes them
                if "lora_B" in name:
                    parameter.normal_(std=2e-4)  # a small trained adapter: changes below bf16's resolution
    reference = copy.deepcopy(model).float().merge_and_unload()  # merged in fp32
    expected = {name: tensor.to(save_dtype) for name, tensor in reference.state_dict().items()}
    exportable(model, SupervisedTraining(lora=LoRA(r=4)), save_dtype).save_pretrained(tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    adapted = [name for name in merged if name.endswith("proj.weight")]
    base_weights = load_file(tiny_llama / "model.safetensors")
    unchanged = sum(int((merged[n].float() == base_weights[n].float()).sum()) for n in adapted) / sum(
        merged[n].numel() for n in adapted)
    print(f"{save_dtype}: {unchanged:.1%} of the adapted weights kept their base value")
    assert all(merged[name].dtype == save_dtype for name in merged)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    inputs = {"input_ids": torch.tensor([[1, 5, 9, 13, 2, 40, 7]])}
    with torch.no_grad():
        effect = (reference(**inputs).logits - AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(
            **inputs).logits).abs().max().item()
        error = (AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(**inputs).logits
                 - reference(**inputs).logits).abs().max().item()
    print(f"{save_dtype}: adapter effect on logits {effect:.2e}, merged export off by {error:.2e}")
    assert error < (1e-6 if save_dtype == torch.float32 else effect)


def test_a_chat_template_that_writes_bos_gets_one_bos_in_every_stage(tiny_llama: Path, tmp_path: Path) -> None:
    """A Llama-3-style chat template writes BOS itself, and the tokenizer adds BOS too: SFT, the RM and PPO
    start every sequence with exactly one BOS (the text's), as a GPT-2-style tokenizer with that template does.
    Before: two BOS in every stage."""
    from rlhf_jobs.algorithms.ppo import tokenize_prompts
    from rlhf_jobs.core.prompts import record_prompt
    from rlhf_jobs.tools.tiny_model import CHAT_TEMPLATE

    tokenizer = load_tokenizer(str(tiny_llama))
    tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "llama3-style")
    tokenizer = load_tokenizer(str(tmp_path / "llama3-style"))
    bos = tokenizer.bos_token_id
    assert bos_ids(tokenizer) == [bos] and record_prompt(RECORD, "chat", tokenizer).startswith(tokenizer.bos_token)
    sft = tokenize_sft(RECORD, tokenizer, "chat", 64)
    pair = tokenize_pair(PAIR, tokenizer, "chat", 64)
    short_pair = tokenize_pair(PAIR, tokenizer, "chat", 8)  # truncated from the left: the BOS stays in front
    prompt = tokenize_prompts([PAIR], tokenizer, "chat", 64)[0]
    short_prompt = tokenize_prompts([PAIR], tokenizer, "chat", 6)[0]
    for ids in (sft["input_ids"], pair["chosen_ids"], pair["rejected_ids"], short_pair["chosen_ids"],
                prompt["input_ids"], short_prompt["input_ids"]):
        assert ids[0] == bos and ids.count(bos) == 1, ids
    assert len(short_pair["chosen_ids"]) == 8 and len(short_prompt["input_ids"]) == 6
    assert sft["labels"][0] == IGNORE_INDEX and sft["labels"].count(IGNORE_INDEX) < len(sft["labels"])
    # the text PPO hands the reward model wrote its BOS: the RM's tokenizer reads it back, once
    for example in (prompt, short_prompt):
        assert example["text"].startswith(tokenizer.bos_token) and example["text"].count(tokenizer.bos_token) == 1
        assert tokenizer(example["text"], add_special_tokens=False)["input_ids"] == example["input_ids"]

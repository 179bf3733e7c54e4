"""PPO: the algorithm's pieces against hand-computed numbers, masking, and real 2-worker runs (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import local_config, write_config

from rlhf_jobs.algorithms.rl import advantages as rl_advantages
from rlhf_jobs.algorithms.rl import losses, rollout
from rlhf_jobs.engine.batching import pad
from rlhf_jobs.engine.distributed import global_mean_var
from rlhf_jobs.engine.worker import Worker

CPU = torch.device("cpu")


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=1e-5, rtol=1e-5)


# ---- hand-computed values ----------------------------------------------------------------------------


def test_compute_gae_by_hand() -> None:
    # gamma 0.9, lam 0.5, gamma·lam 0.45. Row 0, three response tokens:
    #   t2: δ = 3 - 1.5 = 1.5                    A2 = 1.5
    #   t1: δ = 2 + 0.9·1.5 - 1.0 = 2.35         A1 = 2.35 + 0.45·1.5 = 3.025
    #   t0: δ = 1 + 0.9·1.0 - 0.5 = 1.4          A0 = 1.4 + 0.45·3.025 = 2.76125
    # Row 1, two tokens then padding (whose reward 9 and value 7 must be ignored; V after the end = 0):
    #   t1: δ = 2 + 0 - 1.0 = 1.0                A1 = 1.0
    #   t0: δ = 1 + 0.9·1.0 - 0.5 = 1.4          A0 = 1.4 + 0.45·1.0 = 1.85
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = rl_advantages.compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    close(advantages, [[2.76125, 3.025, 1.5], [1.85, 1.0, 0.0]])
    close(returns, [[3.26125, 4.025, 3.0], [2.35, 2.0, 0.0]])


def test_compute_gae_gamma_one_lam_one_is_reward_to_go_minus_value() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.4, 0.6]])
    advantages, returns = rl_advantages.compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    close(advantages, [[0.8, 0.6, 0.4]])
    close(returns, [[1.0, 1.0, 1.0]])


def test_kl_estimators_by_hand() -> None:
    # p = 0.5, q = 0.25: k1 = log 2 = 0.693147; r = q/p = 0.5, k3 = (0.5 - 1) - log 0.5 = 0.193147
    # p = 0.25, q = 0.5: k1 = -0.693147;        r = 2,        k3 = (2 - 1) - log 2   = 0.306853
    logp = torch.tensor([math.log(0.5), math.log(0.25)])
    ref_logp = torch.tensor([math.log(0.25), math.log(0.5)])
    close(losses.kl_estimate(logp, ref_logp, "k1"), [0.693147, -0.693147])
    close(losses.kl_estimate(logp, ref_logp, "k3"), [0.193147, 0.306853])
    close(losses.kl_estimate(logp, logp, "k3"), [0.0, 0.0])


def test_rewards_put_the_score_on_the_last_response_token() -> None:
    # kl_coeff 0.5: non-score = -0.5 × KL; the score goes on token 2 of row 0 and token 1 of row 1.
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, non_score = rl_advantages.compute_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coeff=0.5)
    close(non_score, [[-0.05, -0.1, -0.15], [-0.2, -0.25, 0.0]])
    close(rewards, [[-0.05, -0.1, 1.85], [-0.2, -1.25, 0.0]])


def test_masked_whiten_by_hand() -> None:
    # Masked values 1, 2, 4: mean 7/3; squared deviations 16/9, 1/9, 25/9, sum 42/9. Unbiased variance (as
    # TRL's masked_whiten) 42/9 / 2 = 7/3, std 1.527525 -> (-4/3, -1/3, 5/3) / std; the pad (100) is ignored.
    # (The population variance, 14/9, is what whitening used before.)
    values = torch.tensor([1.0, 2.0, 4.0, 100.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    close(losses.masked_mean(values, mask), 7.0 / 3.0)
    close(losses.masked_var(values, mask), 7.0 / 3.0)
    close(losses.masked_var(values, mask, unbiased=False), 14.0 / 9.0)
    close(losses.masked_whiten(values, mask), [-0.872872, -0.218218, 1.091089, 0.0])
    close(losses.masked_whiten(values, mask, shift_mean=False), [1.460462, 2.115115, 3.424423, 0.0])
    stats = global_mean_var(values, mask, CPU, unbiased=True)  # what the training loop passes, over all workers
    close(losses.masked_whiten(values, mask, stats=stats), [-0.872872, -0.218218, 1.091089, 0.0])


def test_global_mean_var_with_one_worker_matches_the_local_statistics() -> None:
    values = torch.tensor([[1.0, 2.0], [3.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    mean, var = global_mean_var(values, mask, CPU)
    assert mean == pytest.approx(2.0)
    assert var == pytest.approx(2.0 / 3.0)


def test_policy_loss_by_hand() -> None:
    # cliprange 0.2, per token: -A·ratio vs -A·clip(ratio, 0.8, 1.2), the larger counts:
    #   ratio 1.5, A  1: -1.5 vs -1.2 -> -1.2 (clipped)
    #   ratio 0.5, A  1: -0.5 vs -0.8 -> -0.5
    #   ratio 0.5, A -2:  1.0 vs  1.6 ->  1.6 (clipped)
    #   ratio 1.1, A -1:  1.1 vs  1.1 ->  1.1
    #   padding (ratio 3, A 5) ignored.      loss = (-1.2 - 0.5 + 1.6 + 1.1) / 4 = 0.25
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.1, 3.0]])
    old_logp = torch.full((1, 5), -2.0)
    logp = old_logp + ratios.log()
    advantages = torch.tensor([[1.0, 1.0, -2.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, stats = losses.policy_loss(logp, old_logp, advantages, mask, cliprange=0.2)
    close(loss, 0.25)
    close(stats["clip_fraction"], 0.5)
    expected_kl = sum(0.5 * math.log(r) ** 2 for r in (1.5, 0.5, 0.5, 1.1)) / 4  # = 0.141799
    close(stats["approx_kl"], expected_kl)


def test_value_loss_by_hand() -> None:
    # cliprange_value 0.2: V_clip = V_old + clip(V - V_old, ±0.2)
    #   V 1.0, V_old 0.5, R 2: V_clip 0.7; (1-2)² = 1 vs (0.7-2)² = 1.69 -> 1.69 (clipped)
    #   V 0.4, V_old 0.5, R 0: V_clip 0.4; 0.16 vs 0.16              -> 0.16
    #   V 0.0, V_old 1.0, R 0: V_clip 0.8; 0    vs 0.64              -> 0.64 (clipped)
    #   padding ignored.     loss = 0.5 × (1.69 + 0.16 + 0.64) / 3 = 0.415
    values = torch.tensor([[1.0, 0.4, 0.0, 9.0]])
    old_values = torch.tensor([[0.5, 0.5, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = losses.value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    close(loss, 0.415)
    close(stats["value_clip_fraction"], 2.0 / 3.0)


def test_adaptive_kl_controller() -> None:
    # KL 3 vs target 1: error clipped to 0.2; coeff 0.1 × (1 + 0.2 × 100 / 1000) = 0.102
    controller = rl_advantages.AdaptiveKLController(0.1, target=1.0, horizon=1000)
    controller.update(current_kl=3.0, n_steps=100)
    assert controller.value == pytest.approx(0.102)
    # KL 0.9 vs target 1: error -0.1; 0.102 × (1 - 0.1 × 500 / 1000) = 0.0969
    controller.update(current_kl=0.9, n_steps=500)
    assert controller.value == pytest.approx(0.0969)
    fixed = rl_advantages.AdaptiveKLController(0.1, target=None, horizon=1000)
    fixed.update(current_kl=3.0, n_steps=100)
    assert fixed.value == 0.1


# ---- masking ------------------------------------------------------------------------------------------


def test_response_mask_keeps_the_first_eos_and_drops_what_follows() -> None:
    eos = 0
    response = torch.tensor([[5, 7, 0, 3, 0], [5, 5, 5, 5, 5], [0, 4, 0, 4, 4]])
    close(rollout.response_mask(response, eos), [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])


def test_response_logprobs_reads_the_logits_before_each_response_token() -> None:
    # Prompt of 3 tokens, response of 2: the response tokens are predicted at positions 2 and 3.
    logits = torch.full((1, 5, 4), -1e9)
    logits[0, 2, 1] = 0.0  # position 2 predicts token 1 with certainty
    logits[0, 3, :] = 0.0  # position 3: uniform over 4 tokens
    logp = rollout.response_logprobs(logits, torch.tensor([[1, 2]]), temperature=1.0)
    close(logp, [[0.0, math.log(0.25)]])
    # Temperature divides the logits: [0, log 3] at T=1 becomes [0, log 3 / 2] at T=2 -> p = 1/(1+√3)
    logits = torch.zeros((1, 2, 2))
    logits[0, 0, 1] = math.log(3.0)
    close(rollout.response_logprobs(logits, torch.tensor([[0]]), temperature=2.0), [[-math.log(1 + math.sqrt(3))]])


def test_prompt_and_padding_positions_get_zero_gradient() -> None:
    torch.manual_seed(0)
    prompt_length, response = 4, torch.tensor([[3, 1, 0, 0], [2, 2, 2, 2]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    width = prompt_length + response.size(1)
    logits = torch.randn(2, width, 6, requires_grad=True)
    values = torch.randn(2, width, requires_grad=True)
    logp = rollout.response_logprobs(logits, response, temperature=0.7)
    response_values = values[:, prompt_length - 1 : -1]
    pg_loss, _ = losses.policy_loss(logp, logp.detach(), torch.randn(2, 4), mask, cliprange=0.2)  # ratio 1: unclipped
    vf_loss, _ = losses.value_loss(response_values, response_values.detach(), torch.randn(2, 4), mask,
                                   cliprange_value=0.2)
    (pg_loss + 0.1 * vf_loss).backward()
    for grad in (logits.grad.abs().flatten(2).sum(-1), values.grad.abs()):
        # positions 0..P-2 only see the prompt; position P-1+t predicts response token t
        assert torch.all(grad[:, : prompt_length - 1] == 0)
        predicting = grad[:, prompt_length - 1 : -1]
        assert torch.all(predicting[mask == 0] == 0)
        assert torch.all(predicting[mask == 1] > 0)
        assert torch.all(grad[:, -1] == 0)


def test_padding_embeddings_get_zero_gradient_through_a_real_model() -> None:
    """Left-padded prompt + response padded after EOS through GPT-2: pad inputs get exactly zero gradient."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                       eos_token_id=0, bos_token_id=0, pad_token_id=0)).eval()
    query = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    query_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    response = torch.tensor([[3, 0, 0], [4, 5, 6]])  # row 0: token, EOS, then padding
    mask = rollout.response_mask(response, eos_token_id=0)
    inputs = rollout.sequence_inputs(query, query_mask, response, mask)
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                   position_ids=inputs["position_ids"]).logits
    logp = rollout.response_logprobs(logits, response, temperature=1.0)
    loss, _ = losses.policy_loss(logp, logp.detach(), torch.ones_like(logp), mask.float(), cliprange=0.2)
    loss.backward()
    per_position = embeds.grad.abs().sum(-1)
    pads = inputs["attention_mask"] == 0
    assert pads.sum() == 3
    assert torch.all(per_position[pads] == 0)
    assert torch.all(per_position[0, 2:5] > 0)  # real prompt tokens and the first response token matter


# ---- data order -----------------------------------------------------------------------------------------


def test_every_prompt_is_used_once_per_epoch_on_any_number_of_workers() -> None:
    """The stream of prompts is one seeded shuffle of all of them per epoch, whatever the worker count: 2 workers
    taking 2 each from a global batch of 4, then 1 worker taking 4, serve each of the 7 prompts once per epoch."""
    prompts = [{"input_ids": [i], "text": str(i)} for i in range(7)]
    two = [Worker(rank, 2, CPU) for rank in range(2)]
    served = [p["input_ids"][0] for position in (0, 4) for w in two
              for p in rollout.prompt_batch(prompts, w, seed=1, position=position, global_batch=4)]
    served += [p["input_ids"][0] for position in (8, 12)
               for p in rollout.prompt_batch(prompts, Worker(0, 1, CPU), seed=1, position=position, global_batch=4)]
    one = [p["input_ids"][0]
           for p in rollout.prompt_batch(prompts, Worker(0, 1, CPU), seed=1, position=0, global_batch=16)]
    assert sorted(served) == sorted(one) and sorted(one[:7]) == sorted(one[7:14]) == list(range(7))
    assert one[:7] != one[7:14]  # reshuffled per epoch
    halves = [p["input_ids"][0]
              for w in two for p in rollout.prompt_batch(prompts, w, seed=1, position=0, global_batch=4)]
    assert sorted(halves) == sorted(one[:4])  # worker r takes every 2nd prompt of the global batch from r


def test_prompts_are_left_truncated_and_the_text_matches_the_ids(tiny_model: Path) -> None:
    from rlhf_jobs.engine.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    records = [{"prompt": "Describe the weather today in a few words.", "context": None}]
    full = rollout.tokenize_prompts(records, tokenizer, "instruction", 10_000)[0]
    short = rollout.tokenize_prompts(records, tokenizer, "instruction", 8)[0]
    assert short["input_ids"] == full["input_ids"][-8:]
    assert full["text"].endswith("### Response:\n")
    assert tokenizer(short["text"], add_special_tokens=False)["input_ids"] == short["input_ids"]


# ---- configuration and stage order -------------------------------------------------------------------------


def ppo_config(tmp_path: Path, model: Path, sft: Path | str | None, rm: Path | str | None, **training: object) -> dict:
    config = local_config(
        "ppo", model_name=model, rm_name=model, output_dir=tmp_path / "output", checkpoint_dir=tmp_path / "policy"
    )
    config["General"]["model_pretrain"] = str(sft) if sft else None
    config["General"]["rm_pretrain"] = str(rm) if rm else None
    config["Training"].update(training)
    return config


def test_local_config_and_conf_sample_validate(repo_root: Path) -> None:
    from rlhf_jobs.core.loading import load_config

    conf = load_config(repo_root / "configs" / "ppo.conf", "ppo", paths=False)
    assert conf.General.model_pretrain is None and conf.Training.experience_batch_size > 0
    local = load_config(repo_root / "configs" / "local" / "ppo.yaml", "ppo", paths=False)
    assert local.General.model_pretrain == "runs/local/sft" and local.General.rm_pretrain == "runs/local/rm"
    assert local.Training.num_training_workers == 2


@pytest.mark.parametrize(("key", "stage_words"), [("model_pretrain", "SFT stage first"),
                                                  ("rm_pretrain", "reward model stage first")])
def test_pretrain_path_without_marker_names_the_stage_to_run_first(
    tmp_path: Path, tiny_model: Path, key: str, stage_words: str
) -> None:
    from rlhf_jobs.cli import train_stage
    from rlhf_jobs.core.errors import CheckpointError

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")
    config = ppo_config(tmp_path, tiny_model, None, None)
    config["General"][key] = str(unfinished)
    with pytest.raises(CheckpointError, match=stage_words):
        train_stage("ppo", str(write_config(tmp_path / "ppo.yaml", config)))


# ---- real runs (2 Ray workers) --------------------------------------------------------------------------------


def held_out_scores(policy_dir: Path, rm_dir: Path, config: dict, samples: int = 4) -> float:
    """Mean RM score of `samples` sampled responses per held-out prompt, same seeds for every policy."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_jobs.core.data import PPO_SCHEMA, load_splits
    from rlhf_jobs.engine.models import load_tokenizer

    dataset, training = config["Dataset"], config["Training"]
    _, held_out = load_splits(dataset["train_file"], None, dataset["validation_split_percentage"], PPO_SCHEMA,
                              training.get("seed", 42))
    tokenizer = load_tokenizer(str(policy_dir), padding_side="left")
    prompts = rollout.tokenize_prompts(held_out, tokenizer, "instruction", dataset["max_prompt_length"])
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    rm_tokenizer = load_tokenizer(str(rm_dir))
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    query, query_mask = pad([p["input_ids"] for p in prompts], tokenizer.pad_token_id, side="left")
    scores = []
    with torch.no_grad():
        for sample in range(samples):
            torch.manual_seed(1000 + sample)
            output = policy.generate(
                input_ids=query, attention_mask=query_mask, do_sample=True, max_new_tokens=training["max_new_tokens"],
                temperature=training.get("temperature", 1.0), pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            response = output[:, query.size(1) :]
            mask = rollout.response_mask(response, tokenizer.eos_token_id)
            texts = [p["text"] + tokenizer.decode(r[: int(n)].tolist(), skip_special_tokens=True)
                     for p, r, n in zip(prompts, response, mask.sum(1), strict=True)]
            encoded = rm_tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
            scores.append(reward_model(**encoded).logits.squeeze(-1))
    return torch.cat(scores).mean().item()


def metric_records(output_dir: Path, split: str) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.mark.slow
def test_ppo_raises_the_held_out_score_and_resumes(
    tmp_path: Path, tiny_model: Path, sft_checkpoint: Path, rm_checkpoint: Path
) -> None:
    """Stop halfway (--stop-at-step), then rerun the same config on the same output_dir: it resumes, and
    the final policy (loaded from checkpoint_dir) outscores the SFT policy on held-out prompts."""
    from rlhf_jobs.cli import main
    from rlhf_jobs.store.markers import read_marker

    full = ppo_config(tmp_path, tiny_model, sft_checkpoint, rm_checkpoint)
    total = full["Training"]["training_iteration"]
    path = str(write_config(tmp_path / "full.yaml", full))
    assert main(["train", "ppo", "--config_path", path, "--stop-at-step", str(total // 2)]) == 0
    output = tmp_path / "output"
    assert [r["step"] for r in metric_records(output, "train")] == list(range(1, total // 2 + 1))
    assert not (tmp_path / "policy").exists(), "a stopped run writes no final policy"

    assert main(["train", "ppo", "--config_path", path]) == 0
    train = metric_records(output, "train")
    assert [r["step"] for r in train] == list(range(1, total + 1))  # continued at total // 2 + 1
    marker = read_marker(tmp_path / "policy")
    assert marker["stage"] == "ppo" and marker["iteration"] == total
    assert (tmp_path / "policy" / "critic" / "config.json").is_file()
    for name in ("score_mean", "score_std", "kl", "non_score_reward", "entropy", "policy_loss", "value_loss",
                 "clip_fraction", "value_clip_fraction", "approx_kl", "explained_variance", "response_length",
                 "eos_fraction", "kl_coeff", "time_rollout", "time_update", "tokens_per_second"):
        assert all(math.isfinite(r[name]) for r in train), name
    assert max(r["kl"] for r in train) < 10.0  # KL to the reference stays bounded
    evals = metric_records(output, "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == total

    before = held_out_scores(sft_checkpoint, rm_checkpoint, full)
    after = held_out_scores(tmp_path / "policy", rm_checkpoint, full)
    print(f"held-out RM score: SFT {before:.3f} -> PPO {after:.3f}; final kl {train[-1]['kl']:.3f}")
    assert after > before + 0.1


# ---- one in-process worker: every iteration starts on-policy ------------------------------------------------


@pytest.mark.parametrize("training", [
    {"lora": {"r": 4, "dropout": 0.1}, "learning_rate": 1e-2},
    {"mixed_precision": "bf16"},
], ids=["fp32-lora-dropout", "bf16-full"])
def test_every_iteration_starts_on_policy_and_the_first_has_kl_zero(
    training: dict, tiny_llama: Path, tmp_path: Path
) -> None:
    """A real run (the trainer's own loop, one worker in this process): the first minibatch of every iteration,
    before the optimizer steps, sees exactly the rollout's log-probs and values, also once the adapter is trained
    (iterations 2 and 3, LoRA dropout 0.1); under bf16 the reference computes the policy's function, KL exactly 0
    at iteration 1. Before: bf16 KL up to 2e-3 per token under DDP, LoRA dropout ratios off by up to 0.77."""
    from rlhf_jobs.cli import main

    config = ppo_config(tmp_path, tiny_llama, None, None, num_training_workers=1, training_iteration=3,
                        experience_batch_size=4, mini_batch_size=4, ppo_epochs=2, max_new_tokens=8, eval_steps=100,
                        save_critic=False, **training)
    config["Dataset"]["validation_split_percentage"] = 0
    path = str(write_config(tmp_path / "ppo.yaml", config))
    assert main(["train", "ppo", "--config_path", path, "--in-process"]) == 0
    train = metric_records(tmp_path / "output", "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert train[0]["kl"] == 0.0
    for record in train:
        assert record["first_update_max_log_ratio"] == 0.0, record
        assert record["first_update_max_value_change"] == 0.0, record
    assert train[-1]["approx_kl"] > 0  # the updates did move the policy

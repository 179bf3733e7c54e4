"""PPO's models before any update, on one worker without Ray: the critic starts on the score's scale,
the first minibatch sees ratio 1 and KL 0, micro-batched rollouts equal one batch, LoRA's reference
is the base model, and chunked log-probs equal the full-vocabulary computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import SAMPLES, local_config

from rlhf_jobs.algorithms import ppo
from rlhf_jobs.algorithms.rl import losses, rollout
from rlhf_jobs.algorithms.rl import rewards as rl_rewards
from rlhf_jobs.core.loading import validate_config
from rlhf_jobs.core.prompts import record_prompt
from rlhf_jobs.engine.batching import pad
from rlhf_jobs.engine.logprobs import entropy, selective_log_softmax
from rlhf_jobs.engine.models import load_tokenizer, unwrap
from rlhf_jobs.engine.worker import Worker

CPU = torch.device("cpu")
WORKER = Worker(0, 1, CPU)
PROMPTS = [{"prompt": "Name a colour of the sky."}, {"prompt": "Say hello politely, then stop."},
           {"prompt": "Give one word for happy."}, {"prompt": "What do bees make?"}]
STATS = {"mean": 0.3, "std": 2.5}


def ppo_setup(policy: Path, reward: Path, tmp_path: Path, **training: object) -> tuple:
    config = local_config("ppo", model_name=policy, rm_name=reward, output_dir=tmp_path / "o",
                          checkpoint_dir=tmp_path / "c")
    config["General"].update(model_pretrain=None, rm_pretrain=None)
    config["Training"].update({"num_training_workers": 1, "experience_batch_size": 4, "mini_batch_size": 4,
                               "max_new_tokens": 8, **training})
    config = validate_config(config, "ppo", paths=False)
    torch.manual_seed(0)
    models = ppo.load_models(config, WORKER, STATS)
    tokenizer = load_tokenizer(str(policy), padding_side="left")
    prompts = rollout.tokenize_prompts(PROMPTS, tokenizer, "instruction", 64)
    return config.Training, models, prompts


@pytest.fixture(scope="module")
def reward_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sequence classifier with a fixed (saved) score head, as a trained reward model has."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("rm") / "model"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    model.config.pad_token_id = model.config.eos_token_id
    model.save_pretrained(path)
    load_tokenizer(str(tiny_model)).save_pretrained(path)
    return path


@pytest.mark.parametrize("lora", [None, {"r": 4}])
def test_the_critic_starts_at_the_normalised_reward_model_score(
    tiny_model: Path, reward_model: Path, tmp_path: Path, lora
) -> None:
    """Read at the last response token (where the reward model reads), the critic's first value is the
    normalised score of the same tokens, (raw - mean) / std; GAE's last value is the one before it
    (TRL's convention). The rollout's own scores re-tokenise the text, which may merge tokens across
    the prompt/response boundary, so the reference here scores the critic's very tokens."""
    training, models, prompts = ppo_setup(tiny_model, reward_model, tmp_path, lora=lora)
    torch.manual_seed(1)
    batch = ppo.collect_experience(models, prompts, training, CPU)
    with torch.no_grad():
        values = unwrap(models.critic)(**batch.inputs)
    real = batch.inputs["attention_mask"].bool()
    sequences = [ids[keep].tolist() for ids, keep in zip(batch.inputs["input_ids"], real, strict=True)]
    input_ids, attention_mask = pad(sequences, models.rm_tokenizer.pad_token_id)
    raw = models.reward_scores(input_ids, attention_mask)
    last = real.size(1) - batch.response.size(1) + batch.mask.sum(1).long() - 1
    expected = (raw - STATS["mean"]) / STATS["std"]
    torch.testing.assert_close(values[torch.arange(batch.size), last], expected, rtol=1e-4, atol=1e-5)
    assert expected.std() > 0.01  # distinct scores: the comparison says something


@pytest.mark.parametrize("lora", [None, {"r": 4}])
def test_before_any_update_kl_is_zero_and_the_first_minibatch_ratio_is_one(
    tiny_model: Path, tmp_path: Path, lora
) -> None:
    training, models, prompts = ppo_setup(tiny_model, tiny_model, tmp_path, lora=lora, rollout_batch_size=2)
    torch.manual_seed(2)
    batch = ppo.collect_experience(models, prompts, training, CPU)
    assert torch.equal(batch.old_logp * batch.mask, batch.ref_logp * batch.mask)  # KL exactly 0
    width = batch.response.size(1)
    rows = torch.randperm(batch.size)  # the update's first minibatch: another order, another batch shape
    minibatch = {key: value[rows] for key, value in batch.inputs.items()}
    logp = rollout.response_logprobs(rollout.response_logits(models.policy, minibatch, width), batch.response[rows],
                                 training.temperature)
    ratio = (logp - batch.old_logp[rows]).exp() * batch.mask[rows] + (1 - batch.mask[rows])
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)


def test_micro_batched_rollout_forwards_equal_one_batch(tiny_model: Path, tmp_path: Path) -> None:
    training, models, prompts = ppo_setup(tiny_model, tiny_model, tmp_path)
    torch.manual_seed(3)
    responses = models.engine.generate([p["input_ids"] for p in prompts], rollout.Sampling.of(training))
    whole = ppo.judge_responses(models, prompts, responses, training, CPU)
    chunked = ppo.judge_responses(models, prompts, responses, training.model_copy(update={"rollout_batch_size": 1}),
                                  CPU)
    for name in ("old_logp", "ref_logp", "old_values", "raw_score", "entropy", "mask", "response"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=1e-5, atol=1e-5, msg=name)


def test_lora_reference_is_the_base_model_and_kl_starts_at_zero(tiny_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    training, models, prompts = ppo_setup(tiny_llama, tiny_llama, tmp_path, lora={"r": 4})
    assert models.reference is None and models.reward_model is None  # one base model each, shared
    torch.manual_seed(4)
    batch = ppo.collect_experience(models, prompts, training, CPU)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = base(**batch.inputs).logits
    expected = rollout.response_logprobs(logits, batch.response, training.temperature) * batch.mask
    torch.testing.assert_close(batch.ref_logp * batch.mask, expected, rtol=1e-5, atol=1e-5)
    kl = losses.kl_estimate(batch.old_logp, batch.ref_logp, "k1") * batch.mask
    assert kl.abs().max().item() == 0.0


def test_prompts_start_with_bos_for_a_llama_tokenizer_and_not_for_gpt2(tiny_llama: Path, tiny_model: Path) -> None:
    llama, gpt2 = load_tokenizer(str(tiny_llama)), load_tokenizer(str(tiny_model))
    for tokenizer, bos in ((llama, [llama.bos_token_id]), (gpt2, [])):
        example = rollout.tokenize_prompts(PROMPTS[:1], tokenizer, "instruction", 16)[0]
        assert len(example["input_ids"]) == 16  # left-truncated, BOS kept in front
        assert example["input_ids"][: len(bos)] == bos
        assert example["input_ids"].count(tokenizer.bos_token_id) == len(bos)
        body = tokenizer(record_prompt(PROMPTS[0], "instruction"), add_special_tokens=False)["input_ids"]
        assert example["input_ids"][len(bos) :] == body[-(16 - len(bos)) :]


# ---- chunked log-probs --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_log_probs_and_entropy_equal_the_full_vocabulary_computation(dtype, temperature) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(3, 11, 301) * 4).to(dtype).requires_grad_(True)
    index = torch.randint(0, 301, (3, 11))
    weights = torch.randn(3, 11)
    chunked = selective_log_softmax(logits, index, temperature, chunk_size=4)
    (chunked * weights).sum().backward()
    chunked_grad, logits.grad = logits.grad.clone(), None
    full = (logits.float() / temperature).log_softmax(-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    (full * weights).sum().backward()
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    # bf16 gradients are rounded to bf16 from two different fp32 computations: one ulp (2^-8) apart at most
    grad_tolerance = 1e-5 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(chunked_grad.float(), logits.grad.float(), rtol=grad_tolerance, atol=grad_tolerance)
    log_probs = (logits.detach().float() / temperature).log_softmax(-1)
    torch.testing.assert_close(entropy(logits.detach(), temperature, chunk_size=4),
                               -(log_probs.exp() * log_probs).sum(-1), rtol=1e-5, atol=1e-5)


def test_log_ratio_is_clamped_so_the_loss_stays_finite() -> None:
    logp = torch.tensor([[0.0, -1.0]])
    old_logp = torch.tensor([[-200.0, -1.0]])  # a ratio of e^200 overflows float32
    loss, stats = losses.policy_loss(logp, old_logp, torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2), cliprange=0.2)
    assert math.isfinite(loss.item()) and math.isfinite(stats["approx_kl"].item())


# ---- on-policy: no dropout, the first update sees the rollout's numbers -----------------------------------


@pytest.fixture(scope="module")
def llama_with_attention_dropout(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with `attention_dropout: 0.1` in its config (a float, not an `nn.Dropout`)."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("dropout") / "model"
    shutil.copytree(tiny_llama, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    return path


def train_adapters(models: ppo.PPOModels) -> None:
    """A trained adapter: B no longer zero, so lora_dropout changes the output when it is live."""
    with torch.no_grad():
        for model in (models.policy, models.critic):
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.1)


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_no_dropout_is_left_in_the_rl_models_and_the_first_update_is_on_policy(
    model: str, tiny_model: Path, llama_with_attention_dropout: Path, tmp_path: Path
) -> None:
    """LoRA dropout 0.1 and (Llama) attention dropout 0.1 in the config: all off once the adapters are added,
    so with a trained adapter the update's first forward (train mode, another row order) computes exactly the
    rollout's log-probs and values. Before: max |ratio - 1| 0.42 (GPT-2) / 0.77 (Llama), values off by 0.19."""
    from rlhf_jobs.engine.models import live_dropout

    path = tiny_model if model == "gpt2" else llama_with_attention_dropout
    training, models, prompts = ppo_setup(path, path, tmp_path, lora={"r": 4, "dropout": 0.1})
    assert live_dropout(models.policy) == [] and live_dropout(models.critic) == []
    train_adapters(models)
    torch.manual_seed(2)
    batch = ppo.collect_experience(models, prompts, training, CPU)
    models.policy.train(), models.critic.train()
    rows = torch.randperm(batch.size)  # the update's first minibatch: another order
    minibatch = {key: value[rows] for key, value in batch.inputs.items()}
    width, real = batch.response.size(1), batch.mask[rows].bool()
    logp = rollout.response_logprobs(rollout.response_logits(models.policy, minibatch, width), batch.response[rows],
                                 training.temperature)
    values = rollout.response_slice(models.critic(**minibatch), width)
    assert torch.equal(logp[real], batch.old_logp[rows][real])  # ratio exactly 1
    assert torch.equal(values[real], batch.old_values[rows][real])


def test_disable_dropout_finds_modules_module_rates_and_config_rates(llama_with_attention_dropout: Path) -> None:
    from rlhf_jobs.engine.models import disable_dropout, live_dropout, load_causal_lm

    tokenizer = load_tokenizer(str(llama_with_attention_dropout))
    model = load_causal_lm(str(llama_with_attention_dropout), tokenizer)  # dropout kept, as SFT loads it
    live = live_dropout(model)
    assert "model.layers.0.self_attn.attention_dropout" in live and "config.attention_dropout" in live
    model.add_module("extra", torch.nn.Dropout(0.3))
    assert "extra" in live_dropout(model)
    assert live_dropout(disable_dropout(model)) == []
    assert model.model.layers[1].self_attn.attention_dropout == 0.0 and model.extra.p == 0.0


# ---- sampling: exactly softmax(logits / temperature) ------------------------------------------------------------


@pytest.fixture(scope="module")
def model_with_generation_config(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 with a generation_config.json that reshapes sampling in every way a checkpoint can."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("generation") / "model"
    shutil.copytree(tiny_model, path)
    (path / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "top_k": 5, "top_p": 0.5, "min_p": 0.9, "repetition_penalty": 100.0,
        "no_repeat_ngram_size": 1, "bos_token_id": 0, "eos_token_id": 0,
    }))
    return path


def sample_by_hand(model: torch.nn.Module, prompts: list[dict], pad_id: int, temperature: float,
                   steps: int) -> torch.Tensor:
    """`steps` tokens per prompt drawn from softmax(logits / temperature) of full forwards, one multinomial draw
    for the batch per step (as `generate` draws)."""
    ids, mask = pad([p["input_ids"] for p in prompts], pad_id, side="left")
    width = ids.size(1)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
            token = torch.multinomial(torch.softmax(logits[:, -1].float() / temperature, -1), 1)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids[:, width:]


def test_responses_are_sampled_from_exactly_softmax_of_logits_over_temperature(
    model_with_generation_config: Path, tmp_path: Path
) -> None:
    """The rollout draws the very tokens a hand-written sampler draws from softmax(logits / T) with the same
    seed: neither the checkpoint's generation_config.json (top_k 5, top_p 0.5, min_p 0.9, repetition penalty,
    no-repeat n-grams) nor transformers' default top_k of 50 reshapes it. Before: the checkpoint's min_p,
    repetition penalty and no-repeat n-grams were merged in (its top_k/top_p were overridden)."""
    path = model_with_generation_config
    training, models, prompts = ppo_setup(path, path, tmp_path, temperature=0.7, max_new_tokens=10)
    torch.manual_seed(3)
    responses = models.engine.generate([p["input_ids"] for p in prompts], rollout.Sampling.of(training))
    torch.manual_seed(3)
    expected = sample_by_hand(unwrap(models.policy).eval(), prompts, models.tokenizer.pad_token_id, 0.7, 10)
    for response, tokens in zip(responses, expected, strict=True):
        assert len(response) > 1 and response == tokens[: len(response)].tolist()
    # and the checkpoint keeps its generation config for whoever loads it
    assert unwrap(models.policy).generation_config.top_k == 5


def test_truncated_sampling_is_refused_in_the_ppo_config(tmp_path: Path) -> None:
    from rlhf_jobs.core.errors import ConfigError

    for key, value in (("top_k", 50), ("top_p", 0.9)):
        config = local_config("ppo", output_dir=tmp_path / "o", checkpoint_dir=tmp_path / "c")
        config["Training"][key] = value
        with pytest.raises(ConfigError, match=rf"Training\.{key}: sampling from .* only makes the rollout "
                                              r"off-policy.*TRL forces top_k 0 and top_p 1"):
            validate_config(config, "ppo", paths=False)


# ---- the reward model scores the text it was trained on --------------------------------------------------------


def sentencepiece_style_tokenizer() -> object:
    """A Metaspace (SentencePiece-style) BPE tokenizer, as Llama 2's and Mistral's: it decodes a text's first
    token without the space it stands for."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [value for line in (SAMPLES / "sample_rm_data.jsonl").read_text().splitlines()
             for value in json.loads(line).values() if isinstance(value, str)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.train_from_iterator([*texts, "Human: Assistant:\n\n"], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=list("\n:.?!,'\"-"),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def test_the_reward_model_reads_a_response_as_it_read_its_training_pairs() -> None:
    """A raw HH prompt ending in "Assistant:" and a sampled answer "▁Hello ▁there": the reward model gets exactly
    the tokens `rm.tokenize_pair` made of the pair {prompt, chosen: "Hello there"}. Before: the response, decoded
    alone, lost its leading space and the RM scored "Assistant:Hello there"."""
    from rlhf_jobs.algorithms.rm import tokenize_pair

    tokenizer = sentencepiece_style_tokenizer()
    record = {"prompt": "Human: Say hello.\n\nAssistant:", "chosen": "Hello there", "rejected": "No."}
    prompts = rollout.tokenize_prompts([record], tokenizer, "raw", 64)
    full = tokenizer(record["prompt"] + " Hello there", add_special_tokens=False)["input_ids"]
    answer = full[len(tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]) :]
    assert tokenizer.decode(answer) == "Hello there"  # the leading space is gone once decoded alone
    response, mask = pad([[*answer, tokenizer.eos_token_id]], tokenizer.pad_token_id)
    scored = rl_rewards.reward_model_inputs(tokenizer, tokenizer, prompts, response, mask, 1024)
    assert scored == [tokenize_pair(record, tokenizer, "raw", 1024)["chosen_ids"]]
    assert tokenizer.decode(scored[0]).endswith("Assistant: Hello there")


def test_with_lora_the_shared_reward_model_reads_its_own_padding(tiny_llama: Path, tmp_path: Path) -> None:
    """With LoRA the reward model is the critic's base with the adapter disabled. Its tokenizer pads with BOS
    here while the policy's pads with EOS (same vocabulary): padded batches must score as each sequence alone.
    Before: the classifier looked for the policy's pad id, read a pad position and scored padding."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_jobs.engine.models import load_reward_model

    rm_dir = tmp_path / "rm"
    rm_tokenizer = load_tokenizer(str(tiny_llama))
    rm_tokenizer.pad_token = rm_tokenizer.bos_token
    torch.manual_seed(5)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    rm.config.pad_token_id = rm_tokenizer.pad_token_id
    rm.save_pretrained(rm_dir)
    rm_tokenizer.save_pretrained(rm_dir)
    _, models, _ = ppo_setup(tiny_llama, rm_dir, tmp_path, lora={"r": 4})
    assert models.reward_model is None and models.rm_tokenizer.pad_token_id != models.tokenizer.pad_token_id
    sequences = [[0, 5, 9, 13, 2, 40, 7], [0, 8, 3], [0, 21, 22, 23, 24]]
    input_ids, attention_mask = pad(sequences, models.rm_tokenizer.pad_token_id)
    scores = models.reward_scores(input_ids, attention_mask)
    alone = load_reward_model(str(rm_dir), models.rm_tokenizer).eval()
    with torch.no_grad():
        expected = torch.cat([alone(input_ids=torch.tensor([ids])).logits.squeeze(-1) for ids in sequences])
    torch.testing.assert_close(scores, expected.float(), rtol=1e-4, atol=1e-4)

"""Sharded loading under FSDP (`sharding.load_prepared`), in real 2-process gloo groups (no Ray).

Every worker must end as a full load leaves it (each worker loading the whole model, then sharding it): the same
weights, buffers (rotary `inv_freq` is in no state dict), tied embeddings, module modes, trainable flags and random
generator state, hence the same losses and weights after training steps (SFT and PPO, fp32 and bf16 compute); and
no worker's private memory grows by a full fp32 copy of the model while it loads.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SAMPLES
from process_group import run_processes
from torch.distributed.tensor import DTensor

from rlhf_jobs.algorithms import ppo, supervised
from rlhf_jobs.algorithms.rl.advantages import compute_gae, compute_rewards
from rlhf_jobs.algorithms.rl.losses import kl_estimate, masked_whiten
from rlhf_jobs.algorithms.rl.rollout import tokenize_prompts
from rlhf_jobs.algorithms.sft import SFTTask, tokenize_sft
from rlhf_jobs.core.config import LoRA, SupervisedTraining
from rlhf_jobs.core.errors import ModelError
from rlhf_jobs.core.loading import validate_config
from rlhf_jobs.engine import optim, sharding
from rlhf_jobs.engine.adapters import add_lora
from rlhf_jobs.engine.distributed import global_mean_var
from rlhf_jobs.engine.models import load_causal_lm, load_reward_model, load_tokenizer
from rlhf_jobs.engine.worker import Worker

CPU = torch.device("cpu")


def full_loading(build: Any, training: Any, worker: Worker, trainable: bool = True) -> torch.nn.Module:
    """What every worker did before sharded loading: load the whole model, then shard it."""
    return sharding.prepare(build(), training, worker, trainable)


@contextlib.contextmanager
def loading(how: str) -> Iterator[None]:
    """`how` = "sharded" (the trainers' own `sharding.load_prepared`) or "full" (`full_loading` in its place)."""
    saved = sharding.load_prepared
    if how == "full":
        sharding.load_prepared = full_loading
    try:
        yield
    finally:
        sharding.load_prepared = saved


@pytest.fixture(scope="module")
def llama_classifier(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama as a reward model with its own score head, stored in bf16 (as the RM stage saves it)."""
    tokenizer = load_tokenizer(str(tiny_llama))
    torch.manual_seed(3)
    model = load_reward_model(str(tiny_llama), tokenizer, dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp("classifier") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---- what a worker holds after loading --------------------------------------------------------------------------

# (model fixture, causal LM or reward model, mixed precision, LoRA)
CASES = [
    ("llama", "lm", "no", False),  # bf16 checkpoint, fp32 masters: rank 0 reads bf16; rotary buffers
    ("llama", "rm", "no", False),  # a new score head, drawn by rank 0 in the checkpoint's bf16
    ("gpt2", "lm", "bf16", True),  # tied embeddings; LoRA adapters over a bf16 base
    ("llama", "rm", "bf16", False),
    ("llama", "lm", "no", True),  # LoRA adapters (fp32) over an fp32 base read in bf16
]


def drawn_by_rank0(name: str, key: str, precision: str, lora: bool) -> bool:
    """Weights the checkpoint lacks, drawn while rank 0 reads the bf16 Llama for fp32 weights (a new score head,
    LoRA adapters over an fp32 base): the bf16 roundings of a full load's draws."""
    return name == "llama" and (key == "score.weight" or (lora and precision == "no" and "lora_" in key))


def loaded_state(rank: int, world_size: int, models: dict[str, str]) -> dict[str, Any]:
    """Each case loaded fully, then sharded, in the same process group (one start-up of the processes); and what
    loading a checkpoint with a NaN weight raises on each worker."""
    results: dict[str, Any] = {how: [loaded_case(rank, world_size, how, models[name], *case)
                                     for name, *case in CASES] for how in ("full", "sharded")}
    try:
        loaded_case(rank, world_size, "sharded", models["broken"], "lm", "no", False)
    except ModelError as error:
        results["broken"] = str(error)
    return results


def loaded_case(rank: int, world_size: int, how: str, model_dir: str, kind: str, precision: str,
                lora: bool) -> dict[str, Any]:
    training = SupervisedTraining(strategy="fsdp", mixed_precision=precision,
                                  lora=LoRA(r=4, alpha=8) if lora else None)
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(0)  # as `setup_worker` seeds every worker

    def build() -> torch.nn.Module:
        loader = load_causal_lm if kind == "lm" else load_reward_model
        model = loader(model_dir, tokenizer, dtype=sharding.load_dtype(training))
        return add_lora(model, training.lora, "CAUSAL_LM" if kind == "lm" else "SEQ_CLS") if lora else model

    with loading(how):
        model = sharding.load_prepared(build, training, Worker(rank, world_size, CPU))
    hf = sharding.hf_model(model)
    output = hf.get_output_embeddings()
    return {
        "weights": sharding.full_state_dict(model),
        "buffers": {key: value.clone() for key, value in model.named_buffers()},
        "dtypes": {key: value.dtype for key, value in model.named_parameters()},
        "trainable": [key for key, value in model.named_parameters() if value.requires_grad],
        "training": [key for key, module in model.named_modules() if module.training],
        "tied": output is not None and output.weight is hf.get_input_embeddings().weight,
        "generation_config": hf.generation_config.to_dict() if kind == "lm" else None,
        "random": torch.rand(4),  # the generator state every worker goes on with
    }


@pytest.fixture(scope="module")
def broken_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a NaN weight (a diverged run's)."""
    tokenizer = load_tokenizer(str(tiny_llama))
    model = load_causal_lm(str(tiny_llama), tokenizer, dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    path = tmp_path_factory.mktemp("broken") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_every_worker_holds_what_a_full_load_gives_it(tiny_llama: Path, tiny_model: Path, broken_llama: Path) -> None:
    models = {"llama": str(tiny_llama), "gpt2": str(tiny_model), "broken": str(broken_llama)}
    results = run_processes(loaded_state, 2, models)
    for result in results:  # only rank 0 reads the weights; every worker raises what it found (no hang)
        assert "layers.1.mlp.up_proj.weight holds NaN or inf" in result.get("broken", ""), result.get("broken")
    full, sharded = [result["full"] for result in results], [result["sharded"] for result in results]
    for rank in range(2):
        for (name, kind, precision, lora), old, new in zip(CASES, full[rank], sharded[rank], strict=True):
            case = f"rank {rank}, {name} {kind} {precision}{' LoRA' if lora else ''}"
            assert new["weights"].keys() == old["weights"].keys(), case  # full on rank 0, empty elsewhere
            for key, value in old["weights"].items():
                if drawn_by_rank0(name, key, precision, lora):
                    value = value.bfloat16().float()
                assert torch.equal(new["weights"][key], value), f"{case}: {key}"
            assert new["buffers"].keys() == old["buffers"].keys()
            for key, value in old["buffers"].items():
                assert torch.equal(new["buffers"][key], value), f"{case}: {key}"
            for key in ("dtypes", "trainable", "training", "tied", "generation_config"):
                assert new[key] == old[key], f"{case}: {key}"
            assert torch.equal(new["random"], old["random"]), case
        assert any(full[rank][index]["tied"] for index in range(len(CASES)))  # the tied case ties
        assert any(key.endswith("inv_freq") for key in full[rank][0]["buffers"])  # the rotary case has buffers


# ---- the same training -------------------------------------------------------------------------------------------

PROMPTS = [{"prompt": p} for p in ("Name a colour of the sky.", "Say hello politely.", "Give one word for happy.",
                                   "What do bees make?")]


def sft_steps(worker: Worker, model_dir: str, precision: str, how: str, steps: int = 3) -> dict[str, Any]:
    config = validate_config({
        "General": {"base_model": model_dir, "output_dir": "unused", "checkpoint_dir": "unused"},
        "Dataset": {"train_file": "unused"},
        "Training": {"strategy": "fsdp", "mixed_precision": precision, "num_training_workers": worker.world_size,
                     "batch_size": 2, "learning_rate": 1e-3},
    }, "sft", paths=False)
    training = config.Training
    torch.manual_seed(training.seed)
    task = SFTTask()
    with loading(how):
        model, tokenizer = supervised.load_model(task, config, worker)
    # What the optimizer is built from: every parameter a shard (the packing check's forwards gathered the root's)
    sharded = all(isinstance(parameter, DTensor) for parameter in model.parameters())
    lines = (SAMPLES / "sample_finetune_data.jsonl").read_text().splitlines()[:8]
    examples = [tokenize_sft(json.loads(line), tokenizer, "instruction", 128) for line in lines]
    optimizer = optim.build_optimizer(model, training)
    model.train()
    losses = []
    for step in range(steps):
        indices, _ = supervised.step_micro_batches(list(range(8)), 4 * step % 8, 2, 1, worker)
        batches = [task.collate([examples[i] for i in chunk]) for chunk in indices]
        torch.manual_seed(training.seed + 1_000_003 * (step + 1) + worker.rank)
        loss, _ = supervised.accumulate_gradients(model, task, batches, training, worker)
        optim.step([(optimizer, model)], training, None)
        losses.append(loss)
    return {"losses": losses, "packed": task.packed, "sharded": sharded, "weights": sharding.full_state_dict(model)}


def ppo_iterations(worker: Worker, model_dir: str, rm_dir: str, precision: str, how: str,
                   iterations: int = 2) -> dict[str, Any]:
    """PPO's own models and steps (`train_loop`'s rollout, rewards, advantages and update), on fixed prompts."""
    config = validate_config({
        "General": {"model_name": model_dir, "rm_name": rm_dir, "output_dir": "unused", "checkpoint_dir": "unused"},
        "Dataset": {"train_file": "unused"},
        "Training": {"strategy": "fsdp", "mixed_precision": precision, "num_training_workers": worker.world_size,
                     "max_new_tokens": 6, "experience_batch_size": 2, "mini_batch_size": 2,
                     "learning_rate": 1e-3, "critic_learning_rate": 1e-3},
    }, "ppo", paths=False)
    training = config.Training
    torch.manual_seed(training.seed)
    with loading(how):
        models = ppo.load_models(config, worker, None)
    with sharding.gathered(models.policy):  # what `generate` holds: the policy in the compute dtype
        gathered = sorted({str(parameter.dtype) for parameter in models.policy.parameters()})
    prompts = tokenize_prompts(PROMPTS, models.tokenizer, "instruction", 32)[worker.rank :: worker.world_size]
    optimizers = ppo.Optimizers.build(models, training, 4, CPU)
    statistics = []
    for iteration in range(iterations):
        torch.manual_seed(training.seed + 100_003 * iteration + worker.rank)
        batch = ppo.collect_experience(models, prompts, training, CPU)
        kl = kl_estimate(batch.old_logp, batch.ref_logp, training.kl_estimator) * batch.mask
        scores = ppo.shape_scores(batch.raw_score, batch.has_eos, None, training)
        rewards, _ = compute_rewards(scores, kl, batch.mask, training.kl_coeff)
        advantages, returns = compute_gae(rewards, batch.old_values, batch.mask, training.gamma, training.lam)
        advantages = masked_whiten(advantages, batch.mask,
                                   stats=global_mean_var(advantages, batch.mask, CPU, unbiased=True))
        stats, _ = ppo.ppo_update(models, optimizers, batch, advantages, returns, training)
        statistics.append({"response": batch.response, "score": batch.raw_score, "kl": kl, **stats})
    return {"statistics": statistics, "gathered": gathered, "policy": sharding.full_state_dict(models.policy),
            "critic": sharding.full_state_dict(models.critic)}


def trained(rank: int, world_size: int, model_dir: str, rm_dir: str) -> dict[str, dict[str, Any]]:
    """{how: {"sft no": ..., "ppo bf16": ...}}: loaded fully, then sharded, in the same process group."""
    worker = Worker(rank, world_size, CPU)
    return {how: {f"{stage} {precision}": run(precision, how)
                  for precision in ("no", "bf16")
                  for stage, run in (("sft", lambda p, h: sft_steps(worker, model_dir, p, h)),
                                     ("ppo", lambda p, h: ppo_iterations(worker, model_dir, rm_dir, p, h)))}
            for how in ("full", "sharded")}


def assert_equal(new: Any, old: Any, where: str) -> None:
    if isinstance(old, dict):
        assert new.keys() == old.keys(), where
        for key in old:
            assert_equal(new[key], old[key], f"{where}: {key}")
    elif isinstance(old, list):
        assert len(new) == len(old), where
        for index, (a, b) in enumerate(zip(new, old, strict=True)):
            assert_equal(a, b, f"{where}[{index}]")
    elif isinstance(old, torch.Tensor):
        assert torch.equal(new, old), where
    else:
        assert new == old, where


@pytest.mark.slow
def test_sharded_loading_trains_exactly_as_full_loading(tiny_llama: Path, llama_classifier: Path) -> None:
    """SFT (3 steps) and PPO (2 iterations) on 2 FSDP workers, fp32 and bf16 compute, from bf16 checkpoints (fp32
    masters): the same losses, statistics, responses and weights, bit for bit."""
    results = run_processes(trained, 2, str(tiny_llama), str(llama_classifier))
    full, sharded = [result["full"] for result in results], [result["sharded"] for result in results]
    for rank in range(2):
        assert_equal(sharded[rank], full[rank], f"rank {rank}")
    assert full[0]["sft no"]["packed"]  # the packing check ran on the sharded model too
    assert all(result[how][f"sft {precision}"]["sharded"] for result in results for how in ("full", "sharded")
               for precision in ("no", "bf16"))
    for run in full[0].values():
        assert run.get("weights") or run.get("policy")  # rank 0 gathered the trained weights
    for run in (full[0]["ppo no"], full[0]["ppo bf16"]):  # the policy trained, and responses were sampled
        assert run["statistics"][0]["response"].numel() > 0
    # generate holds the policy gathered in the compute dtype: a bf16 copy under bf16 mixed precision
    assert full[0]["ppo bf16"]["gathered"] == ["torch.bfloat16"] and full[0]["ppo no"]["gathered"] == ["torch.float32"]


# ---- memory ---------------------------------------------------------------------------------------------------

def private_memory_mib() -> float:
    """Resident memory of this process that is not a mapped file (the checkpoint's pages are: safetensors maps it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def loading_peaks(rank: int, world_size: int, model_dir: str, how: str) -> dict[str, float]:
    """How much this worker's memory grew, at its peak, while the model was loaded and sharded (sampled every ms)."""
    tokenizer = load_tokenizer(model_dir)
    training = SupervisedTraining(strategy="fsdp", mixed_precision="bf16")
    before = {"private": private_memory_mib(), "resident": resident_mib()}
    peaks = dict(before)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peaks["private"] = max(peaks["private"], private_memory_mib())
            peaks["resident"] = max(peaks["resident"], resident_mib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with loading(how):
        model = sharding.load_prepared(lambda: load_causal_lm(model_dir, tokenizer), training,
                                       Worker(rank, world_size, CPU))
    done.set()
    sampler.join()
    parameters = sum(p.numel() for p in sharding.hf_model(model).parameters())  # DTensors: the global count
    return {"private": peaks["private"] - before["private"], "resident": peaks["resident"] - before["resident"],
            "fp32_mib": parameters * 4 / 2**20}


@pytest.mark.slow
def test_no_worker_holds_a_full_fp32_copy_while_loading(tmp_path: Path) -> None:
    """An 83M-parameter Llama stored in bf16, fp32 masters over 2 workers: each worker's private memory grows by its
    fp32 shards (half a copy) and what is being sent, never by a full fp32 copy; loading it whole, then sharding,
    grew it by 1.5 copies. Rank 0 also maps the checkpoint's file (half a copy in bf16); the other worker never
    does: its file-backed growth (resident - private: the libraries' pages it touches) stays far below the file.
    (Its whole resident growth against 0.75 copy was too close to call on a fresh clone: 168 MiB against 166.)"""
    from rlhf_jobs.tools.tiny_model import LlamaShape, build_llama

    model_dir = build_llama(tmp_path / "model", LlamaShape(512, 16, 1536, 8, 4, vocab_size=32000))
    peaks = run_processes(loading_peaks, 2, str(model_dir), "sharded")
    copy = peaks[0]["fp32_mib"]
    assert copy > 300  # big enough to tell a copy from the process's own noise (~40 MiB)
    for rank, peak in enumerate(peaks):
        assert peak["private"] < 0.75 * copy, (rank, peak)
    assert peaks[1]["resident"] - peaks[1]["private"] < 0.25 * copy, peaks[1]  # the bf16 file is 0.5 copy

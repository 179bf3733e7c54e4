"""The stage registry: every fact about a pipeline stage, in one place, and the only list of stages.

Adding a stage (DPO, GRPO, ...) means one `Stage` entry here, its config type in `config.py`,
its record schema in `data.py` (if new), its trainer module and its tests. The CLI's choices, the
pipeline's graph of inputs, the converters' kinds, the model keys every check walks, the summary table,
the curves, the out-of-memory advice and the chart's generated files all read this registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_jobs.core.config import DPOConfig, GRPOConfig, PPOConfig, RMConfig, SFTConfig, StageConfig
from rlhf_jobs.core.data import DPO_SCHEMA, PPO_SCHEMA, RM_SCHEMA, SFT_SCHEMA, RecordSchema


@dataclass(frozen=True)
class Summary:
    """One figure of the summary table: `label first → last` of a metric."""

    label: str
    metric: str
    split: str = "eval"
    fmt: str = "{:.3f}"
    last_only: bool = False
    fallback: tuple[str, str] | None = None  # (metric, split) shown when `metric` was never logged


@dataclass(frozen=True)
class Curve:
    """One line of a panel in the curves PNG."""

    metric: str
    split: str
    label: str


@dataclass(frozen=True)
class TrainedModel:
    """A model the stage trains: the first set General key of `keys` names it; `task` is its head."""

    keys: tuple[str, ...]
    task: str  # CAUSAL_LM or SEQ_CLS

    def name(self, general: object) -> str:
        return next(value for key in self.keys if (value := getattr(general, key, None)))


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    product: str  # what its final model is called in messages: "SFT model", "PPO policy"
    config_type: type[StageConfig]
    records: RecordSchema
    trainer: str  # module with `train(config)`, imported only when training
    # General keys naming the model(s) the stage starts from (what --base-model replaces).
    base_model_keys: tuple[str, ...]
    # General keys that read another stage's final model: key -> that stage's name. The stages form a graph:
    # a pipeline wires such a key to the producing stage's model when that stage runs (or ran) in it, else the
    # config's own value is used (a finished model elsewhere, or None: the base model as is).
    inputs: dict[str, str] = field(default_factory=dict)
    # Inputs the stage can do without (GRPO's reward model): a local pipeline wires them exactly like `inputs`; the
    # chart's own chaining (`chainStages`) wires only `inputs`, the kuberay submitter an optional one when its
    # producing stage is part of the run.
    optional_inputs: dict[str, str] = field(default_factory=dict)
    trained: tuple[TrainedModel, ...] = ()
    step_name: str = "optimizer step"
    summary: tuple[Summary, ...] = ()
    panels: tuple[tuple[str, tuple[Curve, ...]], ...] = ()
    # What to try when its workers run out of memory (besides LoRA, FSDP and gradient checkpointing).
    memory_advice: str = "a smaller Training.batch_size with more gradient_accumulation_steps"
    # A policy stage: after a pipeline runs it, held-out answers of the model in this input key (e.g. the SFT
    # model) and of the stage's result are shown side by side, scored by the model in `reward_key` if set.
    compare_with: str | None = None
    reward_key: str | None = None
    # Whether `rlhf-jobs pipeline` runs it when no --stages are given (SFT -> RM -> PPO; DPO and GRPO are
    # alternatives to RM + PPO, asked for with --stages sft,dpo or sft,grpo).
    in_default_pipeline: bool = True

    @property
    def model_keys(self) -> tuple[str, ...]:
        """Every General key of this stage that names a model."""
        return (*self.base_model_keys, *self.all_inputs)

    @property
    def all_inputs(self) -> dict[str, str]:
        """Every General key that reads another stage's final model, required or optional -> that stage."""
        return {**self.inputs, **self.optional_inputs}


REGISTRY: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            name="sft", title="SFT", product="SFT model", config_type=SFTConfig, records=SFT_SCHEMA,
            trainer="rlhf_jobs.algorithms.sft",
            base_model_keys=("base_model",), trained=(TrainedModel(("base_model",), "CAUSAL_LM"),),
            summary=(Summary("eval loss", "eval_loss"),),
            panels=(("SFT loss", (Curve("loss", "train", "train loss"), Curve("eval_loss", "eval", "eval loss"))),),
        ),
        Stage(
            name="rm", title="reward model", product="reward model", config_type=RMConfig, records=RM_SCHEMA,
            trainer="rlhf_jobs.algorithms.rm",
            base_model_keys=("base_model",), trained=(TrainedModel(("base_model",), "SEQ_CLS"),),
            summary=(Summary("accuracy", "eval_accuracy", fmt="{:.2f}"),
                     Summary("margin", "eval_margin", fmt="{:.2f}")),
            panels=(("Reward model", (Curve("eval_accuracy", "eval", "eval accuracy"),
                                      Curve("loss", "train", "train loss"))),),
        ),
        Stage(
            name="ppo", title="PPO", product="PPO policy", config_type=PPOConfig, records=PPO_SCHEMA,
            trainer="rlhf_jobs.algorithms.ppo",
            base_model_keys=("model_name", "rm_name"),
            inputs={"model_pretrain": "sft", "rm_pretrain": "rm"},
            # The critic trains on the reward model's backbone.
            trained=(TrainedModel(("model_pretrain", "model_name"), "CAUSAL_LM"),
                     TrainedModel(("rm_pretrain", "rm_name"), "SEQ_CLS")),
            step_name="iteration",
            summary=(Summary("reward", "eval_score_mean", fallback=("score_mean", "train")),
                     Summary("KL", "kl", split="train", last_only=True)),
            panels=(
                ("PPO reward", (Curve("score_mean", "train", "rollout score"),
                                Curve("eval_score_mean", "eval", "held-out score"))),
                ("PPO KL to reference", (Curve("kl", "train", "KL"),)),
            ),
            memory_advice="smaller Training.rollout_batch_size / mini_batch_size or more gradient_accumulation_steps",
            compare_with="model_pretrain", reward_key="rm_pretrain",
        ),
        Stage(
            name="dpo", title="DPO", product="DPO policy", config_type=DPOConfig, records=DPO_SCHEMA,
            trainer="rlhf_jobs.algorithms.dpo",
            base_model_keys=("model_name",), inputs={"model_pretrain": "sft"},
            trained=(TrainedModel(("model_pretrain", "model_name"), "CAUSAL_LM"),),
            summary=(Summary("accuracy", "eval_accuracy", fmt="{:.2f}"),
                     Summary("margin", "eval_margin", fmt="{:.2f}")),
            panels=(("DPO preference", (Curve("eval_accuracy", "eval", "eval accuracy"),
                                        Curve("accuracy", "train", "train accuracy"))),
                    ("DPO loss and margin", (Curve("loss", "train", "train loss"),
                                             Curve("eval_loss", "eval", "eval loss"),
                                             Curve("eval_margin", "eval", "eval margin")))),
            memory_advice="Training.precompute_reference: true (no reference model while training), a smaller "
                          "Training.batch_size with more gradient_accumulation_steps, or a smaller "
                          "logprob_chunk_size",
            compare_with="model_pretrain", in_default_pipeline=False,
        ),
        Stage(
            name="grpo", title="GRPO", product="GRPO policy", config_type=GRPOConfig, records=PPO_SCHEMA,
            trainer="rlhf_jobs.algorithms.grpo",
            base_model_keys=("model_name", "rm_name"), inputs={"model_pretrain": "sft"},
            optional_inputs={"rm_pretrain": "rm"},
            trained=(TrainedModel(("model_pretrain", "model_name"), "CAUSAL_LM"),),
            step_name="iteration",
            summary=(Summary("reward", "eval_reward", fallback=("reward", "train")),
                     Summary("KL", "kl", split="train", last_only=True)),
            panels=(
                ("GRPO reward", (Curve("reward", "train", "rollout reward"),
                                 Curve("eval_reward", "eval", "held-out reward"))),
                ("GRPO KL to reference", (Curve("kl", "train", "KL"),)),
            ),
            memory_advice="smaller Training.rollout_batch_size / num_generations / mini_batch_size or more "
                          "gradient_accumulation_steps",
            compare_with="model_pretrain", reward_key="rm_pretrain", in_default_pipeline=False,
        ),
    )
}

NAMES: tuple[str, ...] = tuple(REGISTRY)
DEFAULT_PIPELINE: tuple[str, ...] = tuple(name for name, stage in REGISTRY.items() if stage.in_default_pipeline)


def get(name: str) -> Stage:
    if name not in REGISTRY:
        raise KeyError(f"unknown stage {name!r}; expected one of {', '.join(NAMES)}")
    return REGISTRY[name]


def upstream(name: str) -> tuple[str, ...]:
    """The stages whose final models `name` reads, directly or through them, in registry order."""
    found: set[str] = set()
    pending = list(get(name).all_inputs.values())
    while pending:
        stage = pending.pop()
        if stage not in found:
            found.add(stage)
            pending.extend(get(stage).all_inputs.values())
    return tuple(stage for stage in NAMES if stage in found)

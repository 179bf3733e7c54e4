"""Training configs: one typed model per stage (what every key means, its type and default).

Reading files, `--set` overrides and the messages for invalid values live in `loading.py`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from rlhf_jobs.core import locations

OPTIMIZERS = ("AdamW", "Adam", "SGD", "RMSprop")
LR_SCHEDULERS = ("linear", "cosine", "constant")
PROMPT_FORMATS = ("instruction", "chat", "raw")

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


def _location(kind: locations.Kind) -> tuple[AfterValidator, Any]:
    """Checks of a key that takes a location of `kind`: `locations.problem`, and its pattern in the JSON schema."""

    def check(value: str) -> str:
        problem = locations.problem(value, kind)
        if problem is not None:
            raise ValueError(problem)
        return value

    return AfterValidator(check), Field(json_schema_extra={"pattern": locations.pattern(kind)})


# A local path, a hub id or s3://bucket/prefix; and a local path or a URL fsspec opens (locations.py).
StorageLocation = Annotated[str, *_location(locations.STORAGE)]
DataLocation = Annotated[str, *_location(locations.DATA)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors.

    Lax typing on purpose: YAML reads `1e-5` as a string, and users write `epochs: 3.0`.
    Values that cannot be converted (`batch_size: two`) are still errors.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """Lax mode reads `epochs: true` as 1; a bool is only a bool."""
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and not _accepts_bool(field.annotation):
            raise ValueError("expected a number, got a bool")
        return value


def _accepts_bool(annotation: Any) -> bool:
    return annotation is bool or annotation is Any or any(_accepts_bool(arg) for arg in get_args(annotation))


# ---- resources ------------------------------------------------------------------------------------

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
_QUANTITY_FACTORS = {
    None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
}


def memory_bytes(value: int | str) -> int:
    """Bytes from an int or a Kubernetes quantity such as `4Gi` or `512M`."""
    if isinstance(value, int):
        return value
    match = _QUANTITY.match(value)
    if not match:
        raise ValueError(f"expected bytes as an integer or a quantity like '4Gi', got {value!r}")
    return int(float(match.group(1)) * _QUANTITY_FACTORS[match.group(2)])


class ResourcesPerWorker(Section):
    """What one Ray Train worker reserves; on Kubernetes, what each worker pod requests."""

    CPU: PositiveFloat = Field(1.0, description="CPU cores per worker.")
    GPU: NonNegativeFloat = Field(0.0, description="GPUs per worker; > 0 trains on CUDA.")
    memory: int | str | None = Field(
        None, description="Memory per worker: bytes, or a Kubernetes quantity like '4Gi'.",
        json_schema_extra={"pattern": _QUANTITY.pattern},  # for the chart's generated values schema
    )

    @field_validator("memory")
    @classmethod
    def _memory_parses(cls, value: int | str | None) -> int | str | None:
        if value is not None and memory_bytes(value) <= 0:
            raise ValueError("must be positive")
        return value

    def ray_resources(self) -> dict[str, float]:
        """The `resources_per_worker` dict that Ray's ScalingConfig takes."""
        resources = {"CPU": self.CPU}
        if self.GPU:
            resources["GPU"] = self.GPU
        if self.memory is not None:
            resources["memory"] = float(memory_bytes(self.memory))
        return resources


# ---- sections shared by the stages ---------------------------------------------------------------

REPORT_TO = ("tensorboard", "mlflow", "wandb", "none")
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


class LoRA(Section):
    """Low-rank adapters (peft) instead of full fine-tuning; the same block for SFT, RM and PPO."""

    r: PositiveInt = Field(16, description="Rank of the adapters.")
    alpha: PositiveFloat = Field(32.0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(0.0, description="Dropout on the adapters' input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]), or all-linear."
    )
    export: Literal["merged", "adapter"] = Field(
        "merged", description="Final model: merged into a plain Hugging Face model, or the adapter alone."
    )


class TrainingBase(Section):
    """Optimisation and Ray Train settings every stage shares."""

    optimizer: Literal[OPTIMIZERS] = Field("AdamW", description="Optimizer, by name.")
    learning_rate: PositiveFloat = Field(1e-5, description="Peak learning rate.")
    lr_scheduler: Literal[LR_SCHEDULERS] = Field("linear", description="Decay after warmup.")
    weight_decay: NonNegativeFloat = Field(
        0.0, description="Decoupled weight decay; never applied to biases and norm weights."
    )
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="Share of the steps spent warming up (exclusive with warmup_steps)."
    )
    warmup_steps: NonNegativeInt = Field(0, description="Warmup steps (exclusive with warmup_ratio).")
    gradient_accumulation_steps: PositiveInt = Field(1, description="Micro-batches per optimizer step.")
    max_grad_norm: PositiveFloat | None = Field(1.0, description="Gradient clipping; None disables.")
    num_training_workers: PositiveInt = Field(1, description="Ray Train workers (DDP ranks).")
    resources_per_worker: ResourcesPerWorker = Field(
        default_factory=ResourcesPerWorker, description="Resources each worker reserves."
    )
    seed: NonNegativeInt = Field(42, description="Seed for data order, splits and initialisation.")
    logging_steps: PositiveInt = Field(10, description="Log training metrics every N optimizer steps.")
    save_steps: PositiveInt | None = Field(
        None, description="Ray Train checkpoint every N steps; None = at the end of each epoch."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Autocast dtype.")
    max_failures: NonNegativeInt = Field(
        1, description="Times Ray Train restarts crashed workers from the last checkpoint."
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: a full copy per worker; fsdp: parameters, gradients and optimizer state sharded."
    )
    lora: LoRA | None = Field(None, description="Train LoRA adapters instead of every weight; None = full.")
    save_dtype: Literal[SAVE_DTYPES] = Field(
        "auto", description="dtype of the final model; auto = the dtype the base checkpoint was stored in."
    )
    report_to: list[Literal[REPORT_TO]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Where metrics go besides metrics.jsonl: tensorboard, mlflow, wandb, none.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainingBase:
        if self.warmup_ratio and self.warmup_steps:
            raise ValueError("set warmup_ratio or warmup_steps, not both")
        return self

    @property
    def use_gpu(self) -> bool:
        return self.resources_per_worker.GPU > 0


class StageConfig(Section):
    """Root of a stage config: General / Dataset / Training."""

    stage: str = ""  # filled in by the loader; not read from the file

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"stage"})


# ---- SFT ----------------------------------------------------------------------------------------


class ModelGeneral(Section):
    base_model: StorageLocation = Field(description="Hub name or local path of the model to start from.")
    output_dir: StorageLocation = Field(description="Ray Train checkpoints (for resume), metrics.jsonl, TensorBoard.")
    checkpoint_dir: StorageLocation = Field(description="Where the final Hugging Face model is written.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")


class DataFiles(Section):
    """Where a stage's records are, how validation is held out, how prompts are formatted."""

    train_file: DataLocation = Field(description="JSON array or JSONL file: local path or URL.")
    validation_file: DataLocation | None = Field(None, description="Validation data; None = split train_file.")
    validation_split_percentage: Annotated[int, Field(ge=0, le=50)] = Field(
        5, description="Share of train_file held out when there is no validation_file."
    )
    prompt_format: Literal[PROMPT_FORMATS] = Field(
        "instruction", description="instruction template, the tokenizer's chat template, or raw text."
    )


class TextDataset(DataFiles):
    max_length: PositiveInt = Field(512, description="Tokens per sequence (prompt + response).")
    preprocessing_num_workers: PositiveInt | None = Field(None, description="Processes for tokenizing.")


class SupervisedTraining(TrainingBase):
    batch_size: PositiveInt = Field(4, description="Sequences per worker per micro-batch.")
    epochs: PositiveInt = Field(1, description="Passes over the training data.")
    max_train_steps: PositiveInt | None = Field(None, description="Stop after N optimizer steps.")
    padding_free: bool = Field(
        True, description="Pack each micro-batch's sequences into as few rows as fit, none wider than a padded "
        "batch (the same loss and gradients; used where the model keeps packed sequences apart, checked at start).",
    )


class SFTConfig(StageConfig):
    General: ModelGeneral
    Dataset: TextDataset
    Training: SupervisedTraining = Field(default_factory=SupervisedTraining)


# ---- reward model ---------------------------------------------------------------------------------


class RMConfig(StageConfig):
    General: ModelGeneral
    Dataset: TextDataset
    Training: SupervisedTraining = Field(default_factory=SupervisedTraining)


# ---- PPO ----------------------------------------------------------------------------------------


class PPOGeneral(Section):
    model_name: StorageLocation = Field(
        description="Base policy (hub name or path); used as is if model_pretrain is None.")
    model_pretrain: StorageLocation | None = Field(None, description="SFT checkpoint_dir to start the policy from.")
    rm_name: StorageLocation = Field(description="Base reward model; used as is if rm_pretrain is None.")
    rm_pretrain: StorageLocation | None = Field(None, description="Reward-model checkpoint_dir to score with.")
    output_dir: StorageLocation = Field(description="Ray Train checkpoints (for resume), metrics.jsonl, TensorBoard.")
    checkpoint_dir: StorageLocation = Field(description="Where the final policy is written.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")


class PromptDataset(DataFiles):
    validation_split_percentage: Annotated[int, Field(ge=0, le=50)] = Field(
        10, description="Share of the prompts held out to measure the reward on unseen prompts."
    )
    max_prompt_length: PositiveInt = Field(128, description="Prompts are left-truncated to this length.")


ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp")
CRITIC_FREE = ADVANTAGE_ESTIMATORS[1:]
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")  # a baseline from the other completions of the same prompt
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")


class RLTraining(TrainingBase):
    """What every RL stage (PPO, GRPO) shares: rollouts of sampled responses, the clipped policy update over them,
    the KL to the frozen reference, held-out evaluation."""

    experience_batch_size: PositiveInt = Field(8, description="Prompts per worker per rollout.")
    rollout_batch_size: PositiveInt | None = Field(
        None, description="Prompts per generate call and per rollout forward; None = experience_batch_size."
    )
    logprob_chunk_size: PositiveInt = Field(
        256, description="Token positions per chunk when computing log-probs over the vocabulary."
    )
    mini_batch_size: PositiveInt | None = Field(
        None, description="Sequences per PPO update step; None = experience_batch_size (one minibatch)."
    )
    epochs: PositiveInt | None = Field(1, description="Passes over the prompts (unless training_iteration).")
    training_iteration: PositiveInt | None = Field(None, description="PPO iterations; overrides epochs.")
    ppo_epochs: PositiveInt = Field(4, description="Optimisation passes over each rollout.")
    learning_rate: PositiveFloat = Field(1e-5, description="Policy learning rate.")
    lr_scheduler: Literal[LR_SCHEDULERS] = Field(
        "constant", description="Schedule over the PPO updates (constant: the usual choice for PPO)."
    )
    save_steps: PositiveInt | None = Field(
        None, description="Ray Train checkpoint every N iterations; None = every eval_steps iterations."
    )
    kl_coeff: NonNegativeFloat = Field(0.05, description="Weight of the per-token KL penalty.")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="KL estimate in the reward.")
    cliprange: PositiveFloat = Field(0.2, description="Policy ratio clip.")
    max_new_tokens: PositiveInt = Field(32, description="Response length cap.")
    temperature: PositiveFloat = Field(1.0, description="Sampling temperature.")
    top_k: NonNegativeInt = Field(  # the schema's bound: `helm template` refuses it too
        0, description="Must stay 0: responses are sampled from the full softmax(logits / temperature).",
        json_schema_extra={"maximum": 0},
    )
    top_p: Annotated[float, Field(gt=0, le=1)] = Field(
        1.0, description="Must stay 1: responses are sampled from the full softmax(logits / temperature).",
        json_schema_extra={"minimum": 1},
    )
    eval_steps: PositiveInt = Field(5, description="Score held-out prompts every N iterations.")

    @field_validator("top_k", "top_p")
    @classmethod
    def _sampling_is_on_policy(cls, value: float, info: Any) -> float:
        """Truncated sampling draws responses from a distribution other than softmax(logits / temperature), whose
        log-probs the ratio and the KL use: the rollout would be off-policy (TRL forces top_k 0 and top_p 1)."""
        neutral = 0 if info.field_name == "top_k" else 1.0
        if value != neutral:
            kept = f"the {value} likeliest tokens" if info.field_name == "top_k" else f"the top {value} of the mass"
            raise ValueError(
                f"sampling from {kept} only makes the rollout off-policy: PPO trains on the log-probs of the full "
                f"softmax(logits / temperature) (TRL forces top_k 0 and top_p 1 too); remove it or set {neutral} "
                "(temperature still sharpens sampling)"
            )
        return value

    @model_validator(mode="after")
    def _length_known(self) -> RLTraining:
        if self.epochs is None and self.training_iteration is None:
            raise ValueError("set epochs or training_iteration")
        if self.rollout_batch_size and self.rollout_batch_size > self.experience_batch_size:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must not exceed "
                f"experience_batch_size ({self.experience_batch_size})"
            )
        if self.mini_batch_size and self.experience_batch_size % self.mini_batch_size:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) must divide "
                f"experience_batch_size ({self.experience_batch_size})"
            )
        mini_batch_size = self.mini_batch_size or self.experience_batch_size
        if mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) must divide the "
                f"mini-batch ({mini_batch_size} prompts): each update is split into that many micro-batches"
            )
        return self


class PPOTraining(RLTraining):
    advantage_estimator: Literal["gae"] = Field(
        "gae", description="gae only: PPO's advantages come from its critic (GAE). The critic-free estimators "
        "(grpo, dr_grpo, rloo, reinforce_pp) are the grpo stage's.",
    )
    save_critic: bool = Field(True, description="Also write the trained critic to checkpoint_dir/critic.")
    critic_learning_rate: PositiveFloat | None = Field(None, description="Critic LR; None = learning_rate.")
    target_kl: PositiveFloat | None = Field(None, description="Adaptive KL controller target; None = fixed.")
    kl_horizon: PositiveInt = Field(10000, description="Adaptive KL controller horizon (samples).")
    gamma: Annotated[float, Field(ge=0, le=1)] = Field(1.0, description="Discount.")
    lam: Annotated[float, Field(ge=0, le=1)] = Field(0.95, description="GAE lambda.")
    cliprange_value: PositiveFloat = Field(0.2, description="Value clip around the rollout values.")
    vf_coef: PositiveFloat = Field(0.1, description="Weight of the value loss.")
    normalize_score: bool = Field(True, description="Normalise scores with the RM's recorded mean/std.")
    score_clip: PositiveFloat | None = Field(5.0, description="Clip (normalised) scores to ±score_clip.")
    missing_eos_penalty: NonNegativeFloat = Field(1.0, description="Subtracted from the score without EOS.")
    whiten_rewards: bool = Field(False, description="Whiten per-token rewards before GAE.")

    @field_validator("advantage_estimator", mode="before")
    @classmethod
    def _critic_free_is_grpo(cls, value: Any) -> Any:
        """A critic-free estimator in PPO would be GRPO without its groups: say where it lives."""
        if value in CRITIC_FREE:
            raise ValueError(
                f"{value} is critic-free: the ppo stage estimates advantages with its critic (gae); train "
                f"`rlhf-jobs train grpo` with Training.advantage_estimator: {value} instead (no critic is loaded there)"
            )
        return value


class PPOConfig(StageConfig):
    General: PPOGeneral
    Dataset: PromptDataset
    Training: PPOTraining = Field(default_factory=PPOTraining)


# ---- GRPO (and Dr. GRPO, RLOO, REINFORCE++) -----------------------------------------------------------

# `path/to/file.py:name` or `package.module:name` (the function's name a Python identifier).
REWARD_FUNCTION_PATTERN = r"^[^:]+:[A-Za-z_][A-Za-z0-9_]*$"


def _reward_function_reference(value: str) -> str:
    target, colon, name = value.rpartition(":")
    if not colon or not target or not name.isidentifier():
        raise ValueError(f"{value!r}: expected path/to/file.py:function or package.module:function")
    if not target.endswith(".py") and not all(part.isidentifier() for part in target.split(".")):
        raise ValueError(f"{value!r}: {target!r} is neither a .py file nor a dotted module name "
                         "(expected path/to/file.py:function or package.module:function)")
    return value


RewardFunctionReference = Annotated[str, AfterValidator(_reward_function_reference),
                                    Field(json_schema_extra={"pattern": REWARD_FUNCTION_PATTERN})]


class GRPOGeneral(Section):
    model_name: StorageLocation = Field(
        description="Base policy (hub name or path); used as is if model_pretrain is None.")
    model_pretrain: StorageLocation | None = Field(None, description="SFT checkpoint_dir to start the policy from.")
    rm_name: StorageLocation | None = Field(
        None, description="Base reward model (optional: reward functions alone may score); used as is if "
        "rm_pretrain is None.")
    rm_pretrain: StorageLocation | None = Field(None, description="Reward-model checkpoint_dir to score with.")
    reward_functions: list[RewardFunctionReference] = Field(
        default_factory=list, description="Python reward functions, 'path/to/file.py:name' (relative to where "
        "rlhf-jobs runs) or 'package.module:name': fn(prompts, completions, **columns) -> list[float | None].",
    )
    reward_weights: list[float] | None = Field(
        None, description="One weight per reward function (None: all 1.0).")
    rm_weight: float = Field(1.0, description="Weight of the reward model's score in the total reward.")
    output_dir: StorageLocation = Field(description="Ray Train checkpoints (for resume), metrics.jsonl, TensorBoard.")
    checkpoint_dir: StorageLocation = Field(description="Where the final policy is written.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")

    @model_validator(mode="after")
    def _rewards_given(self) -> GRPOGeneral:
        if not (self.rm_name or self.rm_pretrain or self.reward_functions):
            raise ValueError("nothing scores the completions: set reward_functions (e.g. "
                             "['rlhf_jobs.algorithms.rl.reward_functions:answer_match']), a reward model "
                             "(rm_pretrain / rm_name), or both")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_functions):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} weight(s) for "
                             f"{len(self.reward_functions)} reward function(s): give one per function, in order")
        return self


class GRPOTraining(RLTraining):
    """The RL loop's settings as PPO names them, plus the critic-free estimators' own. `experience_batch_size`
    counts prompts; each is sampled `num_generations` times on the same worker."""

    advantage_estimator: Literal[CRITIC_FREE] = Field(
        "grpo", description="grpo: (r - group mean) / (group std + 1e-4); dr_grpo: r - group mean; rloo: r - mean "
        "of the other completions of the prompt; reinforce_pp: REINFORCE++ (token-level KL in the reward, "
        "discounted return-to-go, whitened over the batch).",
    )
    num_generations: PositiveInt = Field(
        8, description="Completions sampled per prompt (a group); at least 2 for grpo, dr_grpo and rloo.")
    mini_batch_size: PositiveInt | None = Field(
        None, description="Prompts per update step (with their num_generations completions each); None = "
        "experience_batch_size (one update per rollout and ppo_epoch).",
    )
    ppo_epochs: PositiveInt = Field(1, description="Optimisation passes over each rollout (TRL's num_iterations).")
    loss_aggregation: Literal[LOSS_AGGREGATIONS] = Field(
        "token_mean", description="token_mean: every completion token weighs the same; seq_mean_token_sum (Dr. "
        "GRPO): mean over completions of their summed token losses; seq_mean_token_mean (GRPO paper): mean over "
        "completions of their token means.",
    )
    kl_coeff: NonNegativeFloat = Field(
        0.0, description="Weight of the KL to the reference (0: no reference model is loaded, as TRL's default).")
    kl_estimator: Literal["k1", "k3"] = Field("k3", description="KL estimate (in the loss: k3 only).")
    kl_in_loss: bool | None = Field(
        None, description="KL as a loss term (kl_coeff × k3 per token, GRPO paper) or in the reward; None = the "
        "estimator's convention: in the loss for grpo and dr_grpo, in the reward for rloo and reinforce_pp.",
    )
    cliprange_low: PositiveFloat | None = Field(
        None, description="Lower ratio clip 1 - cliprange_low (DAPO's asymmetric clip); None = cliprange.")
    cliprange_high: PositiveFloat | None = Field(
        None, description="Upper ratio clip 1 + cliprange_high (DAPO: 0.28); None = cliprange.")
    gamma: Annotated[float, Field(ge=0, le=1)] = Field(
        1.0, description="Discount of REINFORCE++'s return-to-go (reinforce_pp only).")
    normalize_score: bool = Field(
        True, description="Normalise a reward model's scores with its recorded mean/std before weighting.")

    @property
    def kl_penalty_in_loss(self) -> bool:
        """Where the KL to the reference goes: the loss (True) or the reward (False)."""
        if self.kl_in_loss is not None:
            return self.kl_in_loss
        return self.advantage_estimator in ("grpo", "dr_grpo")

    @property
    def clip_low(self) -> float:
        return self.cliprange if self.cliprange_low is None else self.cliprange_low

    @property
    def clip_high(self) -> float:
        return self.cliprange if self.cliprange_high is None else self.cliprange_high

    @model_validator(mode="after")
    def _estimator_settings(self) -> GRPOTraining:
        if self.advantage_estimator in GROUP_ESTIMATORS and self.num_generations < 2:
            raise ValueError(f"num_generations {self.num_generations} with advantage_estimator "
                             f"{self.advantage_estimator}: its baseline is the group's other completions, so each "
                             "prompt needs at least 2 (TRL: 8)")
        if self.kl_coeff and self.kl_penalty_in_loss and self.kl_estimator != "k3":
            raise ValueError(f"kl_estimator {self.kl_estimator} as a loss term: its gradient is zero in expectation; "
                             "use k3 (the GRPO paper's), or kl_in_loss: false to put the KL in the reward")
        return self


class GRPOConfig(StageConfig):
    General: GRPOGeneral
    Dataset: PromptDataset
    Training: GRPOTraining = Field(default_factory=GRPOTraining)


# ---- DPO ----------------------------------------------------------------------------------------

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


class DPOGeneral(Section):
    model_name: str = Field(description="Base policy (hub name or path); used as is if model_pretrain is None.")
    model_pretrain: str | None = Field(None, description="SFT checkpoint_dir to start the policy from.")
    output_dir: str = Field(description="Ray Train checkpoints (for resume), metrics.jsonl, TensorBoard.")
    checkpoint_dir: str = Field(description="Where the final policy is written.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")


class DPOTraining(SupervisedTraining):
    """The supervised loop's settings (batch_size counts pairs) plus DPO's own."""

    learning_rate: PositiveFloat = Field(1e-6, description="Peak learning rate (TRL's DPO default).")
    beta: PositiveFloat = Field(0.1, description="Strength of the implicit KL to the reference (DPO's beta).")
    loss_type: Literal[DPO_LOSSES] = Field(
        "sigmoid", description="sigmoid (DPO), ipo (TRL's length-normalised IPO) or hinge (SLiC)."
    )
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = Field(
        0.0, description="Conservative DPO (sigmoid only): the share of pairs assumed mislabelled, "
        "-(1-e)·logσ(βΔ) - e·logσ(-βΔ).",
    )
    precompute_reference: bool = Field(
        False, description="Compute the reference's log-probs of every pair once before training, keep them with "
        "the run's checkpoints and free the reference model (less memory per step).",
    )
    eval_steps: PositiveInt | None = Field(
        None, description="Also evaluate every N optimizer steps (always at the start and the end of each epoch).",
    )
    logprob_chunk_size: PositiveInt = Field(
        256, description="Token positions per chunk when computing log-probs over the vocabulary."
    )

    @model_validator(mode="after")
    def _smoothing_is_sigmoid(self) -> DPOTraining:
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"label_smoothing ({self.label_smoothing}) is conservative DPO, a variant of loss_type "
                             f"sigmoid; loss_type {self.loss_type} has none: set label_smoothing to 0")
        return self


class DPOConfig(StageConfig):
    General: DPOGeneral
    Dataset: TextDataset
    Training: DPOTraining = Field(default_factory=DPOTraining)

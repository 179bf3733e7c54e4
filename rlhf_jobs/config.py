"""Training configs: one typed model per stage, loaded from `.conf`, YAML or JSON.

The `.conf` files of the original workflow are Python dict literals (`None`, `True`,
trailing commas, `#` comments). They are parsed with `ast.literal_eval`, never `eval`.
Every problem is reported as one `ConfigError` naming the file and the key path.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

OPTIMIZERS = ("AdamW", "Adam", "SGD", "RMSprop")
LR_SCHEDULERS = ("linear", "cosine", "constant")
PROMPT_FORMATS = ("instruction", "chat", "raw")

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class ConfigError(ValueError):
    """A config problem, phrased for the user: file, key path, what was expected."""


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
    base_model: str = Field(description="Hub name or local path of the model to start from.")
    output_dir: str = Field(description="Ray Train checkpoints (for resume), metrics.jsonl, TensorBoard.")
    checkpoint_dir: str = Field(description="Where the final Hugging Face model is written.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")


class DataFiles(Section):
    """Where a stage's records are, how validation is held out, how prompts are formatted."""

    train_file: str = Field(description="JSON array or JSONL file: local path or URL.")
    validation_file: str | None = Field(None, description="Validation data; None = split train_file.")
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
    model_name: str = Field(description="Base policy (hub name or path); used as is if model_pretrain is None.")
    model_pretrain: str | None = Field(None, description="SFT checkpoint_dir to start the policy from.")
    rm_name: str = Field(description="Base reward model; used as is if rm_pretrain is None.")
    rm_pretrain: str | None = Field(None, description="Reward-model checkpoint_dir to score with.")
    output_dir: str = Field(description="Ray Train checkpoints (for resume), metrics.jsonl, TensorBoard.")
    checkpoint_dir: str = Field(description="Where the final policy is written.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")


class PromptDataset(DataFiles):
    validation_split_percentage: Annotated[int, Field(ge=0, le=50)] = Field(
        10, description="Share of the prompts held out to measure the reward on unseen prompts."
    )
    max_prompt_length: PositiveInt = Field(128, description="Prompts are left-truncated to this length.")


class PPOTraining(TrainingBase):
    experience_batch_size: PositiveInt = Field(8, description="Prompts per worker per rollout.")
    rollout_batch_size: PositiveInt | None = Field(
        None, description="Prompts per generate call and per rollout forward; None = experience_batch_size."
    )
    logprob_chunk_size: PositiveInt = Field(
        256, description="Token positions per chunk when computing log-probs over the vocabulary."
    )
    save_critic: bool = Field(True, description="Also write the trained critic to checkpoint_dir/critic.")
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
    critic_learning_rate: PositiveFloat | None = Field(None, description="Critic LR; None = learning_rate.")
    kl_coeff: NonNegativeFloat = Field(0.05, description="Weight of the per-token KL penalty.")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="KL estimate in the reward.")
    target_kl: PositiveFloat | None = Field(None, description="Adaptive KL controller target; None = fixed.")
    kl_horizon: PositiveInt = Field(10000, description="Adaptive KL controller horizon (samples).")
    gamma: Annotated[float, Field(ge=0, le=1)] = Field(1.0, description="Discount.")
    lam: Annotated[float, Field(ge=0, le=1)] = Field(0.95, description="GAE lambda.")
    cliprange: PositiveFloat = Field(0.2, description="Policy ratio clip.")
    cliprange_value: PositiveFloat = Field(0.2, description="Value clip around the rollout values.")
    vf_coef: PositiveFloat = Field(0.1, description="Weight of the value loss.")
    max_new_tokens: PositiveInt = Field(32, description="Response length cap.")
    temperature: PositiveFloat = Field(1.0, description="Sampling temperature.")
    top_k: NonNegativeInt = Field(0, description="Top-k sampling; 0 disables.")
    top_p: Annotated[float, Field(gt=0, le=1)] = Field(1.0, description="Nucleus sampling.")
    normalize_score: bool = Field(True, description="Normalise scores with the RM's recorded mean/std.")
    score_clip: PositiveFloat | None = Field(5.0, description="Clip (normalised) scores to ±score_clip.")
    missing_eos_penalty: NonNegativeFloat = Field(1.0, description="Subtracted from the score without EOS.")
    whiten_rewards: bool = Field(False, description="Whiten per-token rewards before GAE.")
    eval_steps: PositiveInt = Field(5, description="Score held-out prompts every N iterations.")

    @model_validator(mode="after")
    def _length_known(self) -> PPOTraining:
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
                f"mini-batch ({mini_batch_size} sequences): each update is split into that many micro-batches"
            )
        return self


class PPOConfig(StageConfig):
    General: PPOGeneral
    Dataset: PromptDataset
    Training: PPOTraining = Field(default_factory=PPOTraining)


# ---- reading files -------------------------------------------------------------------------------


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw dict in a `.conf` (Python literal), `.yaml`/`.yml` or `.json` file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
        elif suffix == ".json":
            data = json.loads(text, object_pairs_hook=_unique_json_keys)
        elif suffix == ".conf":
            data = _read_conf(path, text)
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r}; expected .conf, .yaml, .yml or .json")
    except (SyntaxError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        line = getattr(err, "lineno", None)
        where = f"{path}:{line}" if line else str(path)
        detail = err.msg if isinstance(err, SyntaxError) else str(err)
        raise ConfigError(f"{where}: not a valid {suffix} config: {detail}") from None
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not a valid {suffix} config: {err}") from None
    except DuplicateKey as err:
        raise ConfigError(f"{path}{f':{err.line}' if err.line else ''}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with General/Dataset/Training, got {type(data).__name__}")
    return data


class DuplicateKey(Exception):
    """A key written twice in one mapping: the second would silently replace the first."""

    def __init__(self, key: Any, line: int | None = None, first: int | None = None) -> None:
        where = f" (first at line {first})" if first else ""
        super().__init__(f"key {key!r} appears twice in one mapping{where}; the second would replace the first: "
                         "merge them into one")
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key repeated in one mapping (PyYAML keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise DuplicateKey(key, line, seen[key])
            if isinstance(key, str | int | float | bool):
                seen[key] = line
        return super().construct_mapping(node, deep)


def _unique_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    repeated = next((key for index, key in enumerate(keys) if key in keys[:index]), None)
    if repeated is not None:
        raise DuplicateKey(repeated)
    return dict(pairs)


_LITERAL_NODES = (ast.Expression, ast.Dict, ast.List, ast.Tuple, ast.Set, ast.Constant, ast.Load)
_NODE_NAMES = {ast.Call: "a function call", ast.Name: "a name", ast.Attribute: "an attribute",
               ast.BinOp: "arithmetic", ast.Subscript: "a subscript", ast.Lambda: "a lambda"}


def _read_conf(path: Path, text: str) -> Any:
    """A `.conf` file's Python literal; anything else (calls, names, arithmetic) is named with its line."""
    tree = ast.parse(text, filename=str(path), mode="eval")
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            seen: dict[Any, int] = {}
            for key in node.keys:
                if isinstance(key, ast.Constant) and key.value in seen:
                    raise DuplicateKey(key.value, key.lineno, seen[key.value])
                if isinstance(key, ast.Constant):
                    seen[key.value] = key.lineno
        negative_number = isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd) and isinstance(
            node.operand, ast.Constant)
        if isinstance(node, _LITERAL_NODES) or negative_number or isinstance(node, ast.USub | ast.UAdd):
            continue
        what = next((name for kind, name in _NODE_NAMES.items() if isinstance(node, kind)), "an expression")
        segment = (ast.get_source_segment(text, node) or "").splitlines()[0][:60]
        raise ConfigError(
            f"{path}:{node.lineno}: only literals are allowed in a .conf file (dicts, lists, strings, numbers, "
            f"True/False/None); found {what}: {segment}"
        )
    return ast.literal_eval(tree)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`Training.epochs=1` -> (["Training", "epochs"], 1); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. Training.epochs=1")
    try:
        return key.strip().split("."), yaml.safe_load(value)
    except yaml.YAMLError as err:
        reason = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({reason}); quote it: KEY='\"...\"'") from None


class Origins:
    """Which argument a key path came from: a `--set` that set it (or a section above it), else the file."""

    def __init__(self, source: str, overrides: Sequence[str] = (), shown: Sequence[str] | None = None) -> None:
        """`shown[i]`: how to name `overrides[i]` (default `--set TEXT`), e.g. as typed on a pipeline's command line."""
        self.source = source
        self.overrides = []
        labels = shown if shown is not None else [f"--set {text}" for text in overrides]
        for text, label in zip(overrides, labels, strict=True):
            key, sep, _ = text.partition("=")
            if sep and key.strip():
                self.overrides.append((tuple(key.strip().split(".")), label))

    def of(self, loc: tuple[str, ...]) -> str:
        """`--set Training.epochs=x` when a --set wrote `loc`, else the config file."""
        for keys, label in reversed(self.overrides):  # the last --set of a key wins
            if tuple(loc[: len(keys)]) == keys:
                return label
        return self.source

    def __str__(self) -> str:
        return self.source


def _where(source: str | Origins, loc: tuple[str, ...]) -> str:
    return source.of(loc) if isinstance(source, Origins) else str(source)


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {key} is not a section")
        node[keys[-1]] = value
    return data


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (for did-you-mean suggestions)."""
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _describe(error: dict[str, Any], root: type[BaseModel]) -> str:
    loc = tuple(str(part) for part in error["loc"] if not str(part).startswith("function-after"))
    path = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        owner = _model_at(root, loc)
        known = list(owner.model_fields) if owner else []
        known = [k for k in known if k != "stage"]
        same_but_case = [k for k in known if k.lower() == loc[-1].lower()]
        hint = same_but_case or difflib.get_close_matches(loc[-1], known, n=1)
        suggestion = f"; did you mean {'.'.join((*loc[:-1], hint[0]))!r}?" if hint else ""
        return f"{path}: unknown key{suggestion} (known: {', '.join(known)})"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    given = error.get("input")
    shown = f" (got {given!r})" if not isinstance(given, dict) else ""
    message = error["msg"].removeprefix("Value error, ")
    return f"{path}: {message}{shown}"


def _is_url(location: str) -> bool:
    return "://" in location


def check_data_paths(config: StageConfig, source: str | Origins) -> None:
    """Local data files must exist (URLs are checked when read)."""
    dataset = config.Dataset
    for key in ("train_file", "validation_file"):
        location = getattr(dataset, key)
        if location and not _is_url(location) and not Path(location).is_file():
            raise ConfigError(f"{_where(source, ('Dataset', key))}: Dataset.{key}: file not found: {location}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
MODEL_KEYS = ("base_model", "model_name", "rm_name", "model_pretrain", "rm_pretrain")


def looks_local(location: str) -> bool:
    """Whether a model name is meant as a local path rather than a hub id (`name` or `org/name`).

    Always local: a path starting with `/`, `.` or `~`, or with two or more slashes. `runs/tiny-model`
    is local when it exists or when `runs/` does; otherwise it could be a hub id (see models.check_hub_model).
    """
    if location.startswith(("/", ".", "~")) or "\\" in location or location.count("/") > 1:
        return True
    return Path(location).exists() or (location.count("/") == 1 and Path(location.split("/")[0]).is_dir())


def local_model_problem(location: str) -> str | None:
    """Why a local path is not a loadable Hugging Face model directory (None if it looks like one)."""
    path = Path(location).expanduser()
    if not path.exists():
        from rlhf_jobs.hub import build_hint

        return f"no such model directory: {location} (relative paths start at {Path.cwd()}){build_hint(location)}"
    if not path.is_dir():
        return f"{location} is a file, expected a model directory (what save_pretrained writes)"
    missing = []
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        missing.append("config.json (nor adapter_config.json)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json or tokenizer_config.json)")
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors or *.bin)")
    if missing:
        return (f"{location} is a directory but not a Hugging Face model: no {', no '.join(missing)} "
                "(a model directory is what save_pretrained writes)")
    return None


def check_model_paths(config: StageConfig, source: str | Origins) -> None:
    """Model paths that look local must be model directories (anything else is taken for a hub id)."""
    general = config.General
    for key in MODEL_KEYS:
        location = getattr(general, key, None)
        if location and not _is_url(location) and looks_local(location):
            problem = local_model_problem(location)
            if key.endswith("_pretrain") and Path(location).expanduser().is_dir():
                continue  # a stage checkpoint: checkpoints.require_stage says which stage to run first
            if problem:
                raise ConfigError(f"{_where(source, ('General', key))}: General.{key}: {problem}")


def check_paths(config: StageConfig, source: str | Origins) -> None:
    check_data_paths(config, source)
    check_model_paths(config, source)


def _problems_message(errors: list[dict[str, Any]], config_type: type[StageConfig], stage: str,
                      source: str | Origins) -> str:
    """One message for every problem; those a --set caused are blamed on that --set, not the file."""
    blamed = []
    for error in errors:
        loc = tuple(str(part) for part in error["loc"] if not str(part).startswith("function-after"))
        blamed.append((_where(source, loc), _describe(error, config_type)))
    noun = "problem" if len(blamed) == 1 else "problems"
    origins = {origin for origin, _ in blamed}
    if origins == {str(source)}:
        body = "\n  ".join(problem for _, problem in blamed)
        return f"{source}: {len(blamed)} {noun} in the {stage} config:\n  {body}"
    if len(blamed) == 1:
        return f"{blamed[0][0]}: {blamed[0][1]}"
    body = "\n  ".join(f"{origin}: {problem}" for origin, problem in blamed)
    return f"{len(blamed)} {noun} in the {stage} config ({source} and --set):\n  {body}"


def validate_config(
    data: dict[str, Any], stage: str, source: str | Origins = "<config>", paths: bool = True
) -> StageConfig:
    """Validate a raw dict as the config of `stage`; one `ConfigError` for every problem found.

    `source` names the file; an `Origins` also knows which keys came from --set.
    """
    from rlhf_jobs import stages  # the registry imports this module's config types

    if stage not in stages.REGISTRY:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {', '.join(stages.NAMES)}")
    config_type = stages.REGISTRY[stage].config_type
    try:
        config = config_type.model_validate({**data, "stage": stage})
    except ValidationError as err:
        raise ConfigError(_problems_message(err.errors(), config_type, stage, source)) from None
    if paths:
        check_paths(config, source)
    return config


def load_config(
    path: str | Path, stage: str, overrides: list[str] | tuple[str, ...] = (), paths: bool = True
) -> StageConfig:
    """Read, override and validate a stage config file (`paths`: check that local files exist)."""
    data = apply_overrides(read_config_file(path), overrides)
    return validate_config(data, stage, source=Origins(str(path), list(overrides)), paths=paths)

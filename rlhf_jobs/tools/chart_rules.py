"""Rules across config keys, for the chart: `helm template` refuses what the trainer would refuse at start.

The trainers' cross-field rules are pydantic model validators in rlhf_jobs/core/config.py (`TrainingBase._one_warmup`,
`RLTraining._length_known`, which PPO and GRPO share). Helm cannot run Python, so each rule is also written here as
data: a kind of check, the keys it reads and the trainer's own message. `make schema` writes them into
helm/files/stages.json for every stage whose config has that validator (with the keys' defaults, from the config
models), and the chart's `rlhf-jobs.checkConfig` applies them with a `fail`. tests/test_chart.py keeps the two in
step: every model validator of every registry stage's config is listed here (or in TRAINER_ONLY, with the reason),
and for each rule a config that breaks it fails with the same message in `validate_config` and in `helm template`.

Kinds (operands: a key, or keys of which the first one set counts, e.g. `mini_batch_size or experience_batch_size`):
- `not_both`: a and b are both set and not zero;
- `one_of`: a and b are both null;
- `at_most`: a is set and a > b;
- `divides`: a is set and does not divide b.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from rlhf_jobs.core.config import RLTraining, TrainingBase

KINDS = ("not_both", "one_of", "at_most", "divides")


@dataclass(frozen=True)
class Rule:
    owner: type[BaseModel]  # the config section whose model validator this is (its subclasses have it too)
    validator: str  # that validator's name
    kind: str
    a: tuple[str, ...]
    b: tuple[str, ...]
    message: str  # the trainer's message; {a} and {b} stand for the operands' values


RULES: tuple[Rule, ...] = (
    Rule(TrainingBase, "_one_warmup", "not_both", ("warmup_ratio",), ("warmup_steps",),
         "set warmup_ratio or warmup_steps, not both"),
    Rule(RLTraining, "_length_known", "one_of", ("epochs",), ("training_iteration",),
         "set epochs or training_iteration"),
    Rule(RLTraining, "_length_known", "at_most", ("rollout_batch_size",), ("experience_batch_size",),
         "rollout_batch_size ({a}) must not exceed experience_batch_size ({b})"),
    Rule(RLTraining, "_length_known", "divides", ("mini_batch_size",), ("experience_batch_size",),
         "mini_batch_size ({a}) must divide experience_batch_size ({b})"),
    Rule(RLTraining, "_length_known", "divides", ("gradient_accumulation_steps",),
         ("mini_batch_size", "experience_batch_size"),
         "gradient_accumulation_steps ({a}) must divide the mini-batch ({b} prompts): each update is split into "
         "that many micro-batches"),
)
# "Model._validator" -> why the chart does not check it (the trainer still does, at start).
TRAINER_ONLY: dict[str, str] = {
    "DPOTraining._smoothing_is_sigmoid": "compares a key with one value of another (label_smoothing needs loss_type "
                                         "sigmoid), which none of the kinds above states",
    "GRPOTraining._estimator_settings": "compares keys with values of another (num_generations >= 2 for the group "
                                        "estimators, kl_estimator k3 when the KL is in the loss), which none of "
                                        "the kinds above states",
    "GRPOGeneral._rewards_given": "a reward model or a non-empty list of reward functions, and reward_weights as "
                                  "long as reward_functions: list lengths, which none of the kinds above states",
}


def sections(config_type: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """The General/Dataset/Training models of a stage's config type."""
    return {name: field.annotation for name, field in config_type.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)}


def stage_checks(config_type: type[BaseModel]) -> list[dict[str, Any]]:
    """The rules that apply to a stage's config, as the chart reads them from files/stages.json."""
    checks = []
    for section, model in sections(config_type).items():
        for rule in RULES:
            if not issubclass(model, rule.owner):
                continue
            fields = model.model_fields
            defaults = {key: fields[key].get_default(call_default_factory=True) for key in (*rule.a, *rule.b)}
            checks.append({"section": section, "kind": rule.kind, "a": list(rule.a), "b": list(rule.b),
                           "defaults": defaults, "message": rule.message})
    return checks

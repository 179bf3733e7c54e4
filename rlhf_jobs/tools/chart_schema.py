"""The chart's generated files, from the stage registry (rlhf_jobs/core/stages.py) and the pydantic config models:
the stage-config part of helm/values.schema.json, and helm/files/stages.json.

`configs.<stage>` in the chart's values is a stage's General/Dataset/Training config, so its schema is the
stage's config type's JSON schema (`model_json_schema`), adjusted to what the chart accepts:

- paths the chart fills in when empty (`output_dir: ""`, PPO's `model_pretrain`) are optional and may be
  `""` or `null`;
- numbers may also be numeric strings (`helm --set x=0.5` passes the string "0.5"; the trainers read
  numeric strings too), which the schema cannot bound: the trainer's own check still runs on the rendered config;
- `stage` (filled in by the loader) is not a key of the file;
- a list the trainer also takes as one item (`report_to: none`) may be one item.

The `stage` value's enum lists the registry's stages, and `storage.remote`'s pattern the URL schemes storage.py
reads. Everything else in values.schema.json is written by hand; this module replaces only
`properties.configs`, `properties.stage.enum`/`description`, `properties.storage.properties.remote` and the
`$defs` named `config.*`, so `make schema` keeps the hand-written part as it is.

helm/files/stages.json is what the templates know of the registry (Helm cannot run Python): the stages in
pipeline order, each with the General keys that read an earlier stage's final model (`Stage.inputs`).
`_helpers.tpl` reads it with `.Files.Get` for the release-name suffixes, the PPO-reads-SFT/RM chaining,
which release creates the run's PVC (the first stage's) and the next stage in NOTES.txt.

    python -m rlhf_jobs.tools.chart_schema            # rewrite both files
    python -m rlhf_jobs.tools.chart_schema --check    # exit 1 when either is stale
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from rlhf_jobs.core.paths import REPO_CHART

SCHEMA_FILE = REPO_CHART / "values.schema.json"
STAGES_FILE = REPO_CHART / "files" / "stages.json"
PREFIX = "config."
# General keys the chart fills in when they are empty (helm/templates/_helpers.tpl "rlhf-jobs.trainingConfig"),
# besides the stages' inputs.
CHART_PATHS = ("output_dir", "checkpoint_dir")
NUMERIC_STRING = r"^[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?$"
INTERNAL_KEYS = ("stage",)
# List fields whose validator also takes one item (config.TrainingBase._one_name_is_a_list).
ONE_OR_LIST = ("report_to",)


class StageEntry(Protocol):
    """What the generators read of a `stages.Stage`."""

    config_type: type[BaseModel]
    inputs: Mapping[str, str]


def chart_filled(registry: Mapping[str, StageEntry]) -> tuple[str, ...]:
    """General keys the chart fills in when empty: the paths of every stage and the inputs of any."""
    inputs = sorted({key for stage in registry.values() for key in stage.inputs})
    return (*CHART_PATHS, *inputs)


def generate(registry: Mapping[str, StageEntry]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the `configs` property, the `config.*` $defs) for a stage name -> Stage mapping."""
    defs: dict[str, Any] = {}
    properties = {}
    filled = chart_filled(registry)
    for stage, config_type in ((name, entry.config_type) for name, entry in registry.items()):
        schema = config_type.model_json_schema(mode="validation", ref_template="#/$defs/" + PREFIX + "{model}")
        for name, definition in schema.pop("$defs", {}).items():
            _add(defs, PREFIX + name, _adjust(definition))
        root = _adjust(schema)
        for key in INTERNAL_KEYS:
            root["properties"].pop(key, None)
        root["description"] = f"The {stage} stage's config ({config_type.__name__} in rlhf_jobs/core/config.py)."
        _add(defs, f"{PREFIX}{stage}", root)
        properties[stage] = {"$ref": f"#/$defs/{PREFIX}{stage}"}
    for definition in defs.values():
        if set(filled) & set(definition.get("properties", {})):
            _chart_fills(definition, filled)
        _one_or_list(definition)
    configs = {
        "type": "object",
        "description": "Training configs, one per stage: generated from rlhf_jobs/core/config.py by `make schema`.",
        "additionalProperties": False,
        "properties": properties,
    }
    return configs, defs


def _add(defs: dict[str, Any], name: str, definition: dict[str, Any]) -> None:
    if name in defs and defs[name] != definition:
        raise ValueError(f"two config models are both named {name.removeprefix(PREFIX)!r} with different fields")
    defs[name] = definition


def _adjust(node: Any) -> Any:
    """Drop pydantic's titles, let numbers be numeric strings too."""
    if isinstance(node, list):
        return [_adjust(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _adjust(value) for key, value in node.items() if key != "title"}
    if out.get("type") == "number":
        bounds = {k: out.pop(k) for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if k in out}
        number = {"type": "number", **bounds}
        out.pop("type")
        out["anyOf"] = [number, {"type": "string", "pattern": NUMERIC_STRING}]
    return out


def _one_or_list(definition: dict[str, Any]) -> None:
    properties = definition.get("properties", {})
    for key in ONE_OR_LIST:
        field = properties.get(key)
        if field is None or field.get("type") != "array":
            continue
        description = field.pop("description", None)
        properties[key] = {**({"description": description} if description else {}),
                           "anyOf": [field, field["items"]]}


def _chart_fills(definition: dict[str, Any], filled: tuple[str, ...]) -> None:
    properties = definition.get("properties", {})
    for key in filled:
        if key not in properties:
            continue
        field = properties[key]
        description = field.pop("description", "")
        # The location rule (rlhf_jobs/core/locations.py) stays; "" passes it.
        pattern = next((item["pattern"] for item in [field, *field.get("anyOf", [])] if "pattern" in item), None)
        properties[key] = {
            "description": f"{description} Empty or null: filled in by the chart under <mountPath>/<run>/.".strip(),
            "anyOf": [{"type": "string", **({"pattern": pattern} if pattern else {})}, {"type": "null"}],
        }
    if "required" in definition:
        definition["required"] = [key for key in definition["required"] if key not in filled]
        if not definition["required"]:
            del definition["required"]


def updated(schema: dict[str, Any], registry: Mapping[str, StageEntry]) -> dict[str, Any]:
    """`schema` with its generated part replaced."""
    configs, defs = generate(registry)
    out = copy.deepcopy(schema)
    out["properties"]["configs"] = configs
    names = list(registry)
    stage = out["properties"]["stage"]
    stage["enum"] = ["", *names]
    listed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
    stage["description"] = f"{listed}; empty = from the release name suffix."
    remote = out["properties"]["storage"]["properties"]["remote"]
    remote["pattern"] = remote_pattern()
    remote["description"] = (f"Object storage for the run instead of the PVC: "
                             f"{' or '.join(scheme + '://bucket/prefix' for scheme in _schemes())}.")
    kept = {name: value for name, value in out.get("$defs", {}).items() if not name.startswith(PREFIX)}
    out["$defs"] = {**kept, **dict(sorted(defs.items()))}
    return out


def _schemes() -> tuple[str, ...]:
    from rlhf_jobs.store.storage import SCHEMES

    return SCHEMES


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def stage_file(registry: Mapping[str, StageEntry]) -> dict[str, Any]:
    """helm/files/stages.json: the stages in pipeline order with their inputs (General key -> earlier stage) and
    the trainer's rules across config keys that apply to them (chart_rules.py)."""
    from rlhf_jobs.tools.chart_rules import stage_checks

    return {
        "comment": "Generated from rlhf_jobs/core/stages.py by `make schema`; do not edit. "
                   "Read by templates/_helpers.tpl.",
        "stages": [{"name": name, "inputs": dict(sorted(entry.inputs.items())), "checks": stage_checks(
            entry.config_type)} for name, entry in registry.items()],
    }


def remote_pattern() -> str:
    """`storage.remote`: empty, or a URL of a scheme storage.py reads (`s3://bucket[/prefix]`)."""
    return rf"^(({'|'.join(_schemes())})://[^/\s]+(/\S*)?)?$"


def main(argv: list[str] | None = None) -> int:
    from rlhf_jobs.core import stages

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file is stale")
    parser.add_argument("--schema", type=Path, default=SCHEMA_FILE)
    parser.add_argument("--stages", type=Path, default=STAGES_FILE)
    args = parser.parse_args(argv)
    return write_or_check({
        args.schema: render(updated(json.loads(args.schema.read_text()), stages.REGISTRY)),
        args.stages: render(stage_file(stages.REGISTRY)),
    }, args.check)


def write_or_check(fresh: dict[Path, str], check: bool) -> int:
    """Write each generated file, or with `check` exit 1 naming those whose committed text differs."""
    if check:
        stale = [path for path, text in fresh.items() if not path.is_file() or path.read_text() != text]
        for path in stale:
            print(f"{path} is stale: run `make schema`", file=sys.stderr)
        return 1 if stale else 0
    for path, text in fresh.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The stage-config part of the chart's values.schema.json, generated from the pydantic config models.

`configs.<stage>` in the chart's values is a stage's General/Dataset/Training config, so its schema is the
stage's config type's JSON schema (`model_json_schema`), adjusted to what the chart accepts:

- paths the chart fills in when empty (`output_dir: ""`, PPO's `model_pretrain`) are optional and may be
  `""` or `null`;
- numbers may also be numeric strings (`helm --set x=0.5` passes the string "0.5"; the trainers read
  numeric strings too), which the schema cannot bound: the trainer's own check still runs on the rendered config;
- `stage` (filled in by the loader) is not a key of the file.

Everything else in values.schema.json is written by hand; this module replaces only `properties.configs`
and the `$defs` named `config.*`, so `make schema` keeps the hand-written part as it is.

    python -m rlhf_jobs.backends.chart_schema            # rewrite helm/values.schema.json
    python -m rlhf_jobs.backends.chart_schema --check    # exit 1 when it is stale
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from rlhf_jobs.backends.helm import REPO_CHART

SCHEMA_FILE = REPO_CHART / "values.schema.json"
PREFIX = "config."
# General keys the chart fills in when they are empty (helm/templates/_helpers.tpl "rlhf-jobs.trainingConfig").
CHART_FILLED = ("output_dir", "checkpoint_dir", "model_pretrain", "rm_pretrain")
NUMERIC_STRING = r"^[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?$"
INTERNAL_KEYS = ("stage",)


def generate(config_types: Mapping[str, type[BaseModel]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the `configs` property, the `config.*` $defs) for a stage -> config type mapping."""
    defs: dict[str, Any] = {}
    properties = {}
    for stage, config_type in config_types.items():
        schema = config_type.model_json_schema(mode="validation", ref_template="#/$defs/" + PREFIX + "{model}")
        for name, definition in schema.pop("$defs", {}).items():
            _add(defs, PREFIX + name, _adjust(definition))
        root = _adjust(schema)
        for key in INTERNAL_KEYS:
            root["properties"].pop(key, None)
        root["description"] = f"The {stage} stage's config ({config_type.__name__} in rlhf_jobs/config.py)."
        _add(defs, f"{PREFIX}{stage}", root)
        properties[stage] = {"$ref": f"#/$defs/{PREFIX}{stage}"}
    for definition in defs.values():
        if set(CHART_FILLED) & set(definition.get("properties", {})):
            _chart_fills(definition)
    configs = {
        "type": "object",
        "description": "Training configs, one per stage: generated from rlhf_jobs/config.py by `make schema`.",
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


def _chart_fills(definition: dict[str, Any]) -> None:
    properties = definition.get("properties", {})
    for key in CHART_FILLED:
        if key not in properties:
            continue
        field = properties[key]
        description = field.pop("description", "")
        properties[key] = {
            "description": f"{description} Empty or null: filled in by the chart under <mountPath>/<run>/.".strip(),
            "anyOf": [{"type": "string"}, {"type": "null"}],
        }
    if "required" in definition:
        definition["required"] = [key for key in definition["required"] if key not in CHART_FILLED]
        if not definition["required"]:
            del definition["required"]


def updated(schema: dict[str, Any], config_types: Mapping[str, type[BaseModel]]) -> dict[str, Any]:
    """`schema` with its generated part replaced."""
    configs, defs = generate(config_types)
    out = copy.deepcopy(schema)
    out["properties"]["configs"] = configs
    kept = {name: value for name, value in out.get("$defs", {}).items() if not name.startswith(PREFIX)}
    out["$defs"] = {**kept, **dict(sorted(defs.items()))}
    return out


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    from rlhf_jobs import stages

    config_types = {name: stage.config_type for name, stage in stages.REGISTRY.items()}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed schema is stale")
    parser.add_argument("--schema", type=Path, default=SCHEMA_FILE)
    args = parser.parse_args(argv)
    current = args.schema.read_text()
    fresh = render(updated(json.loads(current), config_types))
    if args.check:
        if fresh != current:
            print(f"{args.schema} is stale: run `make schema`", file=sys.stderr)
            return 1
        return 0
    args.schema.write_text(fresh)
    print(f"wrote {args.schema}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

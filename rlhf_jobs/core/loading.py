"""Reading stage configs: `.conf`, YAML or JSON files, `--set` overrides, and one message for every problem.

The `.conf` files of the original workflow are Python dict literals (`None`, `True`,
trailing commas, `#` comments). They are parsed with `ast.literal_eval`, never `eval`.
Every problem is reported as one `ConfigError` naming the file and the key path.
"""

from __future__ import annotations

import ast
import difflib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rlhf_jobs.core import stages
from rlhf_jobs.core.config import StageConfig
from rlhf_jobs.core.errors import ConfigError

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


def looks_local(location: str) -> bool:
    """Whether a model name is meant as a local path rather than a hub id (`name` or `org/name`).

    Always local: a path starting with `/`, `.` or `~`, or with two or more slashes. `runs/tiny-model`
    is local when it exists or when `runs/` does; otherwise it could be a hub id (see models.check_hub_model).
    """
    if location.startswith(("/", ".", "~")) or "\\" in location or location.count("/") > 1:
        return True
    return Path(location).exists() or (location.count("/") == 1 and Path(location.split("/")[0]).is_dir())


def build_hint(location: str) -> str:
    """How to make a missing tiny model (the sample configs use one)."""
    if Path(location).name == "tiny-model":
        return f"; the sample configs' tiny model is built by: rlhf-jobs tiny-model --output {location}"
    return ""


def local_model_problem(location: str) -> str | None:
    """Why a local path is not a loadable Hugging Face model directory (None if it looks like one)."""
    path = Path(location).expanduser()
    if not path.exists():
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


def check_model_paths(config: StageConfig, source: str | Origins, keys: Sequence[str] | None = None) -> None:
    """Model paths that look local must be model directories (anything else is taken for a hub id).

    `keys`: only these General keys (default: every model key of the stage)."""
    general = config.General
    inputs = stages.get(config.stage).all_inputs
    for key in stages.get(config.stage).model_keys if keys is None else keys:
        location = getattr(general, key, None)
        if location and not _is_url(location) and looks_local(location):
            problem = local_model_problem(location)
            if key in inputs and Path(location).expanduser().is_dir():
                continue  # a stage's final model: checkpoints.require_stage says which stage to run first
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

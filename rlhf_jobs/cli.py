"""The `rlhf-jobs` command line."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from rlhf_jobs.config import STAGES

TRAINER_MODULES = {"sft": "rlhf_jobs.sft", "rm": "rlhf_jobs.rm", "ppo": "rlhf_jobs.ppo"}


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: printed as one line, exit code 2, no traceback."""
    from rlhf_jobs.checkpoints import CheckpointError
    from rlhf_jobs.config import ConfigError
    from rlhf_jobs.data import DataError
    from rlhf_jobs.ray_train import ResourceError

    return ConfigError, DataError, CheckpointError, ResourceError


def train_stage(stage: str, config_path: str, overrides: Sequence[str] = ()) -> None:
    """Validate everything the stage reads, then train it on Ray."""
    from rlhf_jobs.checkpoints import check_overwritable
    from rlhf_jobs.config import load_config

    config = load_config(config_path, stage, list(overrides))
    check_overwritable(config.General.checkpoint_dir)
    importlib.import_module(TRAINER_MODULES[stage]).train(config)


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override a config value, e.g. --set Training.epochs=1 (repeatable; VALUE is YAML)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-jobs", description="RLHF (SFT -> reward model -> PPO) on Ray Train, locally or on KubeRay."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train one stage on Ray Train")
    train.add_argument("stage", choices=STAGES)
    train.add_argument("--config_path", "--config-path", required=True, help=".conf, .yaml or .json config")
    _add_set(train)

    check = commands.add_parser("check-config", help="validate a stage config without training")
    check.add_argument("stage", choices=STAGES)
    check.add_argument("--config_path", "--config-path", required=True)
    check.add_argument("--no-check-paths", action="store_true", help="skip checking that files exist")
    _add_set(check)

    tiny = commands.add_parser("tiny-model", help="build a tiny GPT-2 + tokenizer from the sample data")
    tiny.add_argument("--output", required=True, help="directory to write the model to")
    tiny.add_argument("--data", nargs="*", type=Path, help="JSONL files to train the tokenizer on")

    convert = commands.add_parser("convert", help="convert public datasets to a stage's record format")
    convert.add_argument("kind", choices=STAGES)
    convert.add_argument("--input", required=True)
    convert.add_argument("--output", required=True)
    convert.add_argument("--format", default="auto", help="source format (default: detect)")

    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "train":
        train_stage(args.stage, args.config_path, args.overrides)
    elif args.command == "check-config":
        from rlhf_jobs.config import load_config

        config = load_config(args.config_path, args.stage, args.overrides, check_paths=not args.no_check_paths)
        print(f"{args.config_path}: valid {args.stage} config")
        print(config.model_dump_json(indent=2, exclude={"stage"}))
    elif args.command == "tiny-model":
        from rlhf_jobs.tiny_model import build_tiny_model

        print(f"tiny model written to {build_tiny_model(args.output, args.data)}")
    elif args.command == "convert":
        from rlhf_jobs.convert import convert

        count = convert(args.kind, args.input, args.output, args.format)
        print(f"{count} {args.kind} records written to {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

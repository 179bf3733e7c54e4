"""The `rlhf-jobs` command line."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf_jobs.core import exit_codes
from rlhf_jobs.core.errors import OutOfMemory, RunStopped, TrainingDiverged, UserError
from rlhf_jobs.core.stages import DEFAULT_PIPELINE
from rlhf_jobs.core.stages import NAMES as STAGES
from rlhf_jobs.core.stages import get as get_stage
from rlhf_jobs.tools.convert import ALL_FORMATS as CONVERT_FORMATS
from rlhf_jobs.tools.convert import source_formats
from rlhf_jobs.tools.tiny_model import LLAMA_SHAPES


def train_stage(stage: str, config_path: str, overrides: Sequence[str] = (), stop_at_step: int | None = None,
                on_config_change: str = "refuse", fresh: bool = False, in_process: bool = False) -> None:
    """Validate everything the stage reads, train it on Ray, then say in one line what it reached and where the
    final model is."""
    from rlhf_jobs.core.loading import load_config
    from rlhf_jobs.pipeline.report import finished_line
    from rlhf_jobs.train import train

    config = load_config(config_path, stage, list(overrides))
    started = time.monotonic()
    train(config, stop_at_step=stop_at_step, on_config_change=on_config_change, fresh=fresh, in_process=in_process)
    general = config.General
    print(finished_line(stage, general.output_dir, general.checkpoint_dir, time.monotonic() - started), flush=True)


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
    train.add_argument("--stop-at-step", type=int, metavar="N",
                       help="stop after optimizer step (PPO: iteration) N with a checkpoint; rerun to continue")
    train.add_argument("--on-config-change", choices=("refuse", "restart"), default="refuse",
                       help="output_dir holds a run of another config: refuse (default), or restart (move it aside)")
    train.add_argument("--fresh", action="store_true",
                       help="start over even with the same config: move this run's output_dir and final model aside")
    train.add_argument("--in-process", action="store_true",
                       help="run the one worker in this process (Ray Train's local mode): no Ray start-up (about 18 s "
                            "less on a 2-core machine), but running out of memory ends this process and a failed run "
                            "is not restarted; needs Training.num_training_workers 1 and no RAY_ADDRESS")
    _add_set(train)

    check = commands.add_parser("check-config", help="validate a stage config without training")
    check.add_argument("stage", choices=STAGES)
    check.add_argument("--config_path", "--config-path", required=True)
    check.add_argument("--no-check-paths", action="store_true", help="skip checking that files exist")
    _add_set(check)

    tiny = commands.add_parser("tiny-model", help="build a tiny GPT-2, or a random-init Llama of a given size, "
                                                  "with a tokenizer from the sample data (no hub needed)")
    tiny.add_argument("--output", required=True, help="directory to write the model to")
    tiny.add_argument("--data", nargs="*", type=Path, help="JSONL files to train the tokenizer on")
    tiny.add_argument("--llama", choices=tuple(LLAMA_SHAPES),
                      help="a random-init Llama-architecture model of this size (stored in bf16) instead of GPT-2")

    convert = commands.add_parser("convert", help="convert public datasets to a stage's record format")
    convert.add_argument("kind", choices=STAGES)
    convert.add_argument("--input", required=True)
    convert.add_argument("--output", required=True)
    convert.add_argument(
        "--format", default="auto", choices=("auto", *CONVERT_FORMATS),
        help="source format: auto (detect, the default); "
             + "; ".join(f"{kind}: {', '.join(source_formats(kind))}" for kind in STAGES),
    )

    generate = commands.add_parser(
        "generate", help="answers of one or several checkpoints to the same prompts, side by side, with RM scores")
    generate.add_argument("--model", action="append", required=True, metavar="DIR",
                          help="a trained model directory, e.g. runs/demo/sft (repeatable: one column each)")
    prompts = generate.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompts", metavar="FILE", help='JSONL/JSON records {"prompt" | "instruction", "context"?}')
    prompts.add_argument("--held-out", metavar="CHECKPOINT_DIR",
                         help="the held-out split of the stage that wrote this checkpoint, e.g. runs/demo/ppo")
    generate.add_argument("--rm", metavar="DIR", help="reward model to score with (default: a PPO model's rm_pretrain)")
    generate.add_argument("--num", type=int, default=8, help="how many prompts (default 8; 0 = all)")
    generate.add_argument("--output", metavar="FILE",
                          help="also write one JSON line per prompt here (default: only print the table)")
    generate.add_argument("--max-new-tokens", type=int, help="default: the PPO config's max_new_tokens")
    generate.add_argument("--temperature", type=float, help="default: the PPO config's temperature")
    generate.add_argument("--greedy", action="store_true",
                          help="the most likely token at every step instead of sampling: what each model "
                               "prefers, the same on every run")
    generate.add_argument("--seed", type=int, help="default: the PPO config's seed")

    pipeline = commands.add_parser("pipeline", help="run SFT -> RM -> PPO, locally or on KubeRay")
    pipeline.add_argument("--backend", choices=("local", "kuberay"), default="local")
    pipeline.add_argument("--stages", default=",".join(DEFAULT_PIPELINE),
                          help=f"comma-separated, from {','.join(STAGES)} (default: {','.join(DEFAULT_PIPELINE)}; "
                               "e.g. sft,dpo)")
    pipeline.add_argument("--from-stage", choices=STAGES, help="run this stage and the ones after it again")
    _add_set(pipeline)
    local = pipeline.add_argument_group("local backend")
    local.add_argument("--workdir", default="runs/pipeline", help="all outputs go here (default: runs/pipeline)")
    local.add_argument("--config-dir", default="configs/local", help="sft/rm/ppo configs (default: configs/local)")
    local.add_argument("--base-model", help="start SFT/RM/PPO from this model instead of the configs' one")
    local.add_argument("--tiny-model", action="store_true",
                       help="build the tiny model into WORKDIR/tiny-model (once) and use it as --base-model")
    local.add_argument("--in-process", action="store_true",
                       help="run each stage's one worker in this process, as `train --in-process` does (every stage "
                            "needs Training.num_training_workers 1)")
    cluster = pipeline.add_argument_group("kuberay backend")
    cluster.add_argument("--namespace", default="rlhf", help="Kubernetes namespace (default: rlhf)")
    cluster.add_argument("--run", default="default", help="pipeline run name; checkpoints go to <pvc>/<run>/")
    cluster.add_argument("--values", action="append", default=[], help="extra Helm values file (repeatable)")
    cluster.add_argument("--chart", default=None, help="path of the Helm chart (default: the repo's helm/)")
    cluster.add_argument("--timeout", type=float, default=6 * 3600, help="whole-pipeline timeout in seconds")
    cluster.add_argument("--in-cluster", action="store_true",
                         help="run the pipeline as a Job in the cluster (its ServiceAccount: make rbac) and return; "
                              "the same command again resumes it")
    cluster.add_argument("--image", default=None,
                         help="image of the --in-cluster runner (default: rlhf-jobs:<version>; it carries helm)")
    cluster.add_argument("--dry-run", action="store_true",
                         help="print the manifests of every stage and exit (needs helm, no cluster)")

    status = commands.add_parser("status", help="show a pipeline run's record (local: --workdir; else KubeRay)")
    status.add_argument("--workdir", help="a local pipeline's work directory (pipeline --backend local)")
    status.add_argument("--namespace", default="rlhf")
    status.add_argument("--run", default="default")

    delete = commands.add_parser("delete", help="uninstall a KubeRay pipeline run's releases (keeps the PVC)")
    delete.add_argument("--namespace", default="rlhf")
    delete.add_argument("--run", default="default")
    delete.add_argument("--chart", default=None)

    return parser


def run_local_pipeline(args: argparse.Namespace) -> int:
    from rlhf_jobs.pipeline.backends.local import LocalBackend
    from rlhf_jobs.pipeline.plan import PipelineOptions, parse_stages, run_pipeline
    from rlhf_jobs.pipeline.report import plot_curves, summary_table

    backend = LocalBackend(args.workdir, in_process=args.in_process)
    base_model = str(backend.workdir / "tiny-model") if args.tiny_model else args.base_model
    options = PipelineOptions(
        stages=parse_stages(args.stages), config_dir=args.config_dir, overrides=args.overrides,
        base_model=base_model, from_stage=args.from_stage,
    )
    if args.tiny_model and not (backend.workdir / "tiny-model" / "config.json").is_file():
        from rlhf_jobs.tools.tiny_model import build_tiny_model

        backend.stage_configs(dataclasses.replace(options, check_models=False))  # bad input fails before the build
        print(f"building the tiny model in {base_model}", flush=True)
        build_tiny_model(base_model)
    started = time.time()
    record = run_pipeline(backend, options)
    output_dirs = {stage: backend.stage_paths(stage)[0] for stage in record["stages"]}
    print("\n" + summary_table(record, output_dirs))
    print(f"\ntraining curves: {plot_curves(output_dirs, backend.workdir / 'curves.png')}")
    print(f"final models: {', '.join(backend.stage_paths(s)[1] for s in record['stages'])}")
    for stage, entry in record["stages"].items():
        if get_stage(stage).compare_with is None:
            continue
        samples = backend.workdir / f"{stage}-samples.jsonl"
        if entry.get("finished_at", 0) > started:
            show_samples(stage, entry["config"], samples)
        elif samples.is_file():
            print(f"sample answers: {samples}")
    return 0


def show_samples(stage: str, config: dict[str, Any], path: Path, count: int = 5) -> None:
    """After a policy stage (PPO, DPO, GRPO): every held-out prompt answered by the model it started from and by its
    result, sampled as the stage samples (seeded), each answer's reward-model score when it has a reward model
    (DPO has none; GRPO without one: its reward functions' weighted total), their means, and the first `count`
    answers. A handful of sampled answers is too few to compare two policies; all the held-out prompts are not."""
    from rlhf_jobs.tools import generate

    entry, general = get_stage(stage), config["General"]
    start, result = general.get(entry.compare_with), general["checkpoint_dir"]
    started_from = get_stage(entry.inputs[entry.compare_with]).product if start else "base model"
    reward_model = general.get(entry.reward_key) if entry.reward_key else None
    samples, _ = generate.compare([start or general[entry.base_model_keys[0]], result], held_out=result,
                                  reward_model=reward_model, limit=None)
    functions = [reference.rpartition(":")[2] for reference in general.get("reward_functions") or []]
    scored = "scored by the reward model" if reward_model else \
        f"scored by its reward functions ({', '.join(functions)}; their weighted total)" if functions else \
        f"not scored (a reward model scores them: rlhf-jobs generate --model ... --held-out {result} --rm DIR)"
    print(f"\nthe {started_from}'s and the {entry.product}'s answers to the {len(samples)} held-out prompts, "
          f"{scored}:")
    print(generate.table(samples, answers=count))
    print(f"sample answers: {generate.write_jsonl(samples, path)}")


def local_status(workdir: str) -> int:
    from rlhf_jobs.pipeline.backends.local import LocalBackend
    from rlhf_jobs.pipeline.report import status_text

    backend = LocalBackend(workdir)
    record = backend.load_record()
    if not record:
        print(f"no pipeline record in {backend.workdir} (expected {backend.workdir / 'pipeline.json'})")
        return 1
    print(status_text(record, backend.workdir, {stage: backend.stage_paths(stage)[0] for stage in record["stages"]}))
    return 0


def run_kuberay_pipeline(args: argparse.Namespace, clients=None, helm=None, sleep=time.sleep) -> int:
    """`rlhf-jobs pipeline --backend kuberay`: the stages as RayJobs, chained, recorded in a ConfigMap."""
    from rlhf_jobs.core import exit_codes
    from rlhf_jobs.pipeline.backends.helm import Helm, HelmError
    from rlhf_jobs.pipeline.backends.kube import RETRYABLE_STATUS, Clients, ClusterUnavailable, api_status
    from rlhf_jobs.pipeline.backends.kuberay import KubeRayBackend, status_table
    from rlhf_jobs.pipeline.backends.rayjob import StageFailed, WatchSettings
    from rlhf_jobs.pipeline.plan import PipelineOptions, parse_stages, run_pipeline

    helm = helm or Helm(args.chart)
    options = PipelineOptions(stages=parse_stages(args.stages), overrides=args.overrides,
                              from_stage=args.from_stage, check_paths=False)
    if args.in_cluster:
        local = None
        if shutil.which(helm.binary):  # bad values fail here, before the runner Job exists
            local = KubeRayBackend(None, helm, args.namespace, args.run, args.values)
            local.stage_configs(options)
        return start_runner(args, clients, {stage: local.rewards[stage] for stage in options.stages
                                            if local and stage in local.rewards})
    helm.check_version()  # --dry-run needs no cluster, but it renders with helm
    if args.dry_run:
        import yaml

        backend = KubeRayBackend(None, helm, args.namespace, args.run, args.values)
        backend.stage_configs(options)
        for stage in options.stages:
            for manifest in backend.rendered[stage].manifests:
                sys.stdout.write("---\n" + yaml.safe_dump(manifest, sort_keys=False))
        return 0
    deadline = time.monotonic() + args.timeout
    try:
        backend = KubeRayBackend(clients or Clients.from_environment(), helm, args.namespace, args.run, args.values,
                                 watch=WatchSettings(deadline=deadline), sleep=sleep)
        backend.preflight()
        print(f"pipeline run {args.run!r} in namespace {args.namespace} (record: ConfigMap {backend.record_name})")
        run_pipeline(backend, options)
    except StageFailed as err:  # exits as the stage's driver did: 75 = preempted, run again (exit_codes.py)
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except (ClusterUnavailable, HelmError) as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except Exception as err:
        if api_status(err) not in RETRYABLE_STATUS:
            raise
        print(f"error: the Kubernetes API server did not answer ({err}); nothing was lost: run the same command "
              "again to continue", file=sys.stderr)
        return exit_codes.PREEMPTED
    except KeyboardInterrupt:
        print("interrupted: running RayJobs keep running; re-run the same command to re-attach, "
              f"or `rlhf-jobs delete --namespace {args.namespace} --run {args.run}` to stop them", file=sys.stderr)
        return 130
    print(status_table(args.run, args.namespace, backend.load_record()))
    return 0


def start_runner(args: argparse.Namespace, clients=None, reward_files: dict | None = None) -> int:
    """`pipeline --backend kuberay --in-cluster`: the same pipeline command, run by a Job in the cluster; the
    reward-function files the stages' configs name on this machine (`reward_files`) go along."""
    from importlib.metadata import version

    import yaml

    from rlhf_jobs.pipeline.backends import runner
    from rlhf_jobs.pipeline.backends.kube import Clients

    extra = ["--stages", args.stages, "--timeout", str(int(args.timeout))]
    extra += [arg for item in args.overrides for arg in ("--set", item)]
    if args.from_stage:
        extra += ["--from-stage", args.from_stage]
    files, reward_args = runner.shipped_rewards(reward_files or {})
    values = {path: Path(path).read_text() for path in args.values}
    image = args.image or f"rlhf-jobs:{version('rlhf-jobs')}"
    objects = runner.manifests(args.namespace, args.run, image, values, [*extra, *reward_args], files=files)
    if args.dry_run:
        for manifest in objects:
            sys.stdout.write("---\n" + yaml.safe_dump(manifest, sort_keys=False))
        return 0
    name = runner.submit(clients or Clients.from_environment(), objects)
    print(f"pipeline run {args.run!r} started in the cluster as Job {args.namespace}/{name} ({image})\n"
          f"  follow : kubectl logs -n {args.namespace} -f job/{name}\n"
          f"  status : rlhf-jobs status --namespace {args.namespace} --run {args.run}\n"
          f"  resume : the same command again, once the Job has ended")
    return 0


def show_status(args: argparse.Namespace, clients=None) -> int:
    """`rlhf-jobs status`: a KubeRay run's record, from wherever a kubeconfig (or in-cluster config) reaches."""
    from rlhf_jobs.pipeline.backends import runner
    from rlhf_jobs.pipeline.backends.helm import Helm
    from rlhf_jobs.pipeline.backends.kube import Clients, ClusterUnavailable
    from rlhf_jobs.pipeline.backends.kuberay import KubeRayBackend, status_table

    try:
        clients = clients or Clients.from_environment()
        backend = KubeRayBackend(clients, Helm(), args.namespace, args.run)
        record = backend.load_record()
    except ClusterUnavailable as err:
        raise ClusterUnavailable(f"{err}; for a local pipeline: rlhf-jobs status --workdir DIR (the pipeline's "
                                 "default: runs/pipeline)") from None
    job = runner.read_job(clients, args.namespace, args.run) if clients.batch is not None else None
    if job is not None:
        print(f"runner Job {runner.runner_name(args.run)}: {runner.job_state(job)}")
    if not record:
        print(f"no pipeline run {args.run!r} in namespace {args.namespace}" + (" yet" if job is not None else ""))
        return 0 if job is not None else 1
    print(status_table(args.run, args.namespace, record))
    return 0


def delete_run(args: argparse.Namespace, clients=None) -> int:
    """`rlhf-jobs delete`: uninstall a run's releases and its record; the checkpoint PVC is kept."""
    from rlhf_jobs.pipeline.backends.helm import Helm
    from rlhf_jobs.pipeline.backends.kube import Clients
    from rlhf_jobs.pipeline.backends.kuberay import KubeRayBackend

    backend = KubeRayBackend(clients or Clients.from_environment(), Helm(args.chart), args.namespace, args.run)
    for release, uninstalled in backend.uninstall():
        print(f"{release}: {'uninstalled' if uninstalled else 'not installed'}")
    deleted = backend.delete_record()
    print(f"ConfigMap {backend.record_name}: {'deleted' if deleted else 'not found'}")
    print("the checkpoint PVC is kept; delete it with kubectl when its models are no longer needed")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "train":
        train_stage(args.stage, args.config_path, args.overrides, args.stop_at_step, args.on_config_change,
                    args.fresh, args.in_process)
    elif args.command == "check-config":
        from rlhf_jobs.core.loading import load_config

        config = load_config(args.config_path, args.stage, args.overrides, paths=not args.no_check_paths)
        print(f"{args.config_path}: valid {args.stage} config")
        print(config.model_dump_json(indent=2, exclude={"stage"}))
    elif args.command == "tiny-model":
        from rlhf_jobs.tools.tiny_model import build_llama, build_tiny_model, parameter_count

        if args.llama:
            path = build_llama(args.output, args.llama, data=args.data)
            print(f"Llama-architecture model ({parameter_count(LLAMA_SHAPES[args.llama]) / 1e6:.1f}M parameters, "
                  f"bf16) written to {path}")
        else:
            print(f"tiny model written to {build_tiny_model(args.output, args.data)}")
    elif args.command == "convert":
        from rlhf_jobs.tools.convert import convert_records, report, write_conversion

        result = convert_records(args.kind, args.input, args.format)
        write_conversion(result, args.kind, args.input, args.output)
        print("\n".join(report(result, args.kind, args.input, args.output, detected=args.format == "auto")))
    elif args.command == "generate":
        from rlhf_jobs.tools import generate

        generate.check_options(args.num, args.max_new_tokens, args.temperature, args.output)
        samples, _ = generate.compare(
            args.model, prompts_file=args.prompts, held_out=args.held_out, reward_model=args.rm, limit=args.num,
            overrides={"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed},
            greedy=args.greedy,
        )
        print(generate.table(samples))
        if args.output:
            print(f"written: {generate.write_jsonl(samples, args.output)}")
    elif args.command == "pipeline":
        if args.backend == "local":
            return run_local_pipeline(args)
        if args.in_process:
            print("error: --in-process runs the stages in this process: it is for --backend local", file=sys.stderr)
            return 2
        return run_kuberay_pipeline(args)
    elif args.command == "status":
        return local_status(args.workdir) if args.workdir else show_status(args)
    elif args.command == "delete":
        return delete_run(args)
    return 0


def last_word(message: str) -> None:
    """The command's closing line, on stderr, after everything written to stdout (a pipe buffers stdout)."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        last_word(f"error: {err}")
        return exit_codes.BAD_INPUT
    except RunStopped as stopped:
        last_word(str(stopped))
        return 0 if stopped.reason.startswith("--stop-at-step") else exit_codes.PREEMPTED  # EX_TEMPFAIL: try again
    except OutOfMemory as err:
        last_word(f"error: {err}")
        return exit_codes.OUT_OF_MEMORY
    except TrainingDiverged as err:
        last_word(f"error: {err}")
        return exit_codes.STAGE_FAILED
    except (KeyboardInterrupt, SystemExit):  # Ray Train turns Ctrl-C during training into SystemExit
        last_word("interrupted; re-run the same command to resume from the last checkpoint")
        return 130


if __name__ == "__main__":
    sys.exit(main())

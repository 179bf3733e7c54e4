"""The pipeline: config chaining, the record, skip/resume/--from-stage, and a real local run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhf_jobs.core.errors import CheckpointError, ConfigError, DataError
from rlhf_jobs.pipeline.backends.local import LocalBackend
from rlhf_jobs.pipeline.plan import PipelineOptions, plan, run_pipeline

REPO = Path(__file__).resolve().parents[1]


class RecordingBackend(LocalBackend):
    """The local backend with training replaced by a log of what would have run (for planning logic)."""

    def __init__(self, workdir: Path, fail: str | None = None) -> None:
        super().__init__(workdir)
        self.ran: list[str] = []
        self.configs: dict[str, dict[str, Any]] = {}
        self.fail = fail

    def run_stage(self, stage: str, config: dict[str, Any]) -> None:
        self.ran.append(stage)
        self.configs[stage] = config
        if stage == self.fail:
            raise RuntimeError(f"{stage} crashed")
        final = Path(config["General"]["checkpoint_dir"])  # what a stage leaves: its final model and marker
        final.mkdir(parents=True, exist_ok=True)
        (final / "rlhf_stage.json").write_text(json.dumps({"stage": stage}))


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "configs"
    directory.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (data / "sft.jsonl").write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", "response": "d"}\n')
    (data / "rm.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 2)
    (data / "ppo.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    common = {"num_training_workers": 1, "resources_per_worker": {"CPU": 1}}
    configs = {
        "sft": {"General": {"base_model": "gpt2", "output_dir": "o/sft", "checkpoint_dir": "ck/sft"},
                "Dataset": {"train_file": str(data / "sft.jsonl")}, "Training": common},
        "rm": {"General": {"base_model": "ck/sft", "output_dir": "o/rm", "checkpoint_dir": "ck/rm"},
               "Dataset": {"train_file": str(data / "rm.jsonl")}, "Training": common},
        "ppo": {"General": {"model_name": "gpt2", "rm_name": "gpt2", "model_pretrain": "ck/sft",
                            "rm_pretrain": "ck/rm", "output_dir": "o/ppo", "checkpoint_dir": "ck/ppo"},
                "Dataset": {"train_file": str(data / "ppo.jsonl")}, "Training": common},
    }
    for stage, config in configs.items():
        (directory / f"{stage}.yaml").write_text(yaml.safe_dump(config))
    return directory


def test_stages_are_chained_under_the_workdir(tmp_path: Path, config_dir: Path) -> None:
    backend = RecordingBackend(tmp_path / "run")
    run_pipeline(backend, PipelineOptions(config_dir=config_dir, base_model="tiny"))
    work = str((tmp_path / "run").resolve())
    assert backend.ran == ["sft", "rm", "ppo"]
    assert backend.configs["sft"]["General"] == {
        "base_model": "tiny", "output_dir": f"{work}/sft-output", "checkpoint_dir": f"{work}/sft"}
    assert backend.configs["rm"]["General"]["base_model"] == f"{work}/sft"
    ppo = backend.configs["ppo"]["General"]
    assert (ppo["model_pretrain"], ppo["rm_pretrain"]) == (f"{work}/sft", f"{work}/rm")
    assert (ppo["model_name"], ppo["rm_name"]) == ("tiny", "tiny")


def test_rerun_skips_finished_stages_and_reruns_changed_ones(tmp_path: Path, config_dir: Path) -> None:
    options = PipelineOptions(config_dir=config_dir)
    run_pipeline(RecordingBackend(tmp_path / "run"), options)
    again = RecordingBackend(tmp_path / "run")
    run_pipeline(again, options)
    assert again.ran == []

    changed = RecordingBackend(tmp_path / "run")
    run_pipeline(changed, PipelineOptions(config_dir=config_dir, overrides=["rm.Training.epochs=2"]))
    assert changed.ran == ["rm", "ppo"], "a changed stage re-runs, and so does every stage built on it"

    forced = RecordingBackend(tmp_path / "run")
    run_pipeline(forced, PipelineOptions(config_dir=config_dir, overrides=["rm.Training.epochs=2"], from_stage="ppo"))
    assert forced.ran == ["ppo"]


def test_failed_stage_is_resumed_not_restarted(tmp_path: Path, config_dir: Path) -> None:
    options = PipelineOptions(config_dir=config_dir)
    with pytest.raises(RuntimeError, match="rm crashed"):
        run_pipeline(RecordingBackend(tmp_path / "run", fail="rm"), options)
    record = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert record["stages"]["sft"]["status"] == "succeeded"
    assert record["stages"]["rm"]["status"] == "failed" and "rm crashed" in record["stages"]["rm"]["error"]
    steps = {p.stage: p.action for p in plan(RecordingBackend(tmp_path / "run"), options)}
    assert steps == {"sft": "skip", "rm": "resume", "ppo": "run"}


def test_bad_data_of_a_later_stage_fails_before_anything_runs(tmp_path: Path, config_dir: Path) -> None:
    ppo_data = yaml.safe_load((config_dir / "ppo.yaml").read_text())["Dataset"]["train_file"]
    Path(ppo_data).write_text('{"prompt": "a"}\n{"text": "b"}\n')
    backend = RecordingBackend(tmp_path / "run")
    with pytest.raises(DataError, match=r"ppo\.jsonl:2: missing field 'prompt or instruction'"):
        run_pipeline(backend, PipelineOptions(config_dir=config_dir))
    assert backend.ran == [] and not (tmp_path / "run").exists()


def test_bad_override_names_the_set_and_the_stage_config(tmp_path: Path, config_dir: Path) -> None:
    expected = (r"^--set rm\.Training\.epochz=2 \(for .*/rm\.yaml\): Training\.epochz: unknown key; "
                r"did you mean 'Training\.epochs'")
    backend = RecordingBackend(tmp_path / "run")
    with pytest.raises(ConfigError, match=expected):
        run_pipeline(backend, PipelineOptions(config_dir=config_dir, overrides=["rm.Training.epochz=2"]))
    assert backend.ran == []


def test_bad_override_for_every_stage_names_the_first_stage_it_breaks(tmp_path: Path, config_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--set Training\.epochs=zero \(for .*/sft\.yaml\): Training\.epochs"):
        run_pipeline(RecordingBackend(tmp_path / "run"), PipelineOptions(config_dir=config_dir,
                                                                          overrides=["Training.epochs=zero"]))
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(ConfigError, match=rf"^--set ppo\.Dataset\.train_file={missing} \(for .*/ppo\.yaml\): "
                                          r"Dataset\.train_file: file not found"):
        run_pipeline(RecordingBackend(tmp_path / "run"), PipelineOptions(
            config_dir=config_dir, overrides=[f"ppo.Dataset.train_file={missing}"]))


def test_a_bad_config_fails_before_the_tiny_model_is_built(tmp_path: Path, config_dir: Path) -> None:
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "rlhf_jobs.cli", "pipeline", "--backend", "local", "--workdir", str(workdir),
         "--config-dir", str(config_dir), "--tiny-model", "--set", "Training.epochz=1"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--set Training.epochz=1 (for " in done.stderr + done.stdout
    assert not (workdir / "tiny-model").exists()
    # configs/local asks for 2 workers: --in-process says so before building the model too
    in_process = subprocess.run(
        [sys.executable, "-m", "rlhf_jobs.cli", "pipeline", "--backend", "local", "--workdir", str(workdir),
         "--tiny-model", "--in-process"], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert in_process.returncode == 2, in_process.stdout + in_process.stderr
    assert "sft stage: --in-process runs one worker" in in_process.stderr
    assert not (workdir / "tiny-model").exists()


@pytest.mark.slow
def test_interrupted_ppo_resumes_without_redoing_sft_or_rm(tmp_path: Path) -> None:
    """Kill the real pipeline during PPO, re-run it: SFT and RM are skipped, PPO continues."""
    workdir = tmp_path / "demo"
    command = [sys.executable, "-m", "rlhf_jobs.cli", "pipeline", "--backend", "local", "--workdir", str(workdir),
               "--tiny-model", "--set", "ppo.Training.save_steps=1"]
    log = (tmp_path / "first.log").open("w")
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ppo_metrics = workdir / "ppo-output" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        lines = ppo_metrics.read_text().splitlines() if ppo_metrics.exists() else []
        if sum('"split": "train"' in line for line in lines) >= 2:
            break
        time.sleep(1)
    assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    record = json.loads((workdir / "pipeline.json").read_text())
    assert record["stages"]["ppo"]["status"] == "interrupted", record["stages"]["ppo"].get("error")
    done_before = max(json.loads(line)["step"] for line in ppo_metrics.read_text().splitlines())

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "== sft: skip" in second.stdout and "== rm: skip" in second.stdout
    assert "== ppo: resume" in second.stdout
    assert "resuming" in second.stdout + second.stderr
    steps = [json.loads(line)["step"] for line in ppo_metrics.read_text().splitlines()]
    resumed = steps[steps.index(done_before) + 1:]
    assert resumed and min(s for s in resumed) >= done_before - 1, "PPO restarted from scratch"
    assert (workdir / "curves.png").stat().st_size > 10_000
    # Looking at results: every held-out prompt's SFT and PPO answers and their reward-model scores.
    shown = "the SFT model's and the PPO policy's answers to the 12 held-out prompts, scored by the reward model"
    assert shown in second.stdout
    samples = [json.loads(line) for line in (workdir / "ppo-samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12
    assert all(set(s["answers"]) == {"sft", "ppo"} and all(isinstance(a["score"], float) for a in s["answers"].values())
               for s in samples)
    assert second.stdout.count("\nprompt ") == 5  # the first five answers are shown
    assert "PreemptionWatcher" not in second.stdout + second.stderr
    # This is the demo (`make demo`'s command, PPO stopped and resumed): the README's figures script reads its output,
    # in the shape of the README's block.
    from test_readme_figures import check_shape, readme_figures

    module = readme_figures()
    shown = module.parse(module.demo_block(second.stdout, workdir))
    check_shape(shown)
    assert shown["prompts"] == module.parse(module.readme_block((REPO / "README.md").read_text()))["prompts"]


def test_a_subset_of_stages_reads_a_finished_model_from_elsewhere(tmp_path: Path, config_dir: Path) -> None:
    """`--stages sft,ppo` with an existing reward model: no rm config needed, PPO reads the SFT model of this run
    and the reward model its config names."""
    (config_dir / "rm.yaml").unlink()
    reward_model = tmp_path / "elsewhere" / "rm"
    reward_model.mkdir(parents=True)
    (reward_model / "rlhf_stage.json").write_text(json.dumps({"stage": "rm"}))
    backend = RecordingBackend(tmp_path / "run")
    run_pipeline(backend, PipelineOptions(stages=["sft", "ppo"], config_dir=config_dir,
                                          overrides=[f"ppo.General.rm_pretrain={reward_model}"]))
    assert backend.ran == ["sft", "ppo"]
    ppo = backend.configs["ppo"]["General"]
    assert (ppo["model_pretrain"], ppo["rm_pretrain"]) == (str((tmp_path / "run" / "sft").resolve()),
                                                          str(reward_model))


def test_a_subset_whose_input_is_missing_fails_before_anything_runs(tmp_path: Path, config_dir: Path) -> None:
    backend = RecordingBackend(tmp_path / "run")
    missing = tmp_path / "no-rm-here"
    with pytest.raises(CheckpointError, match=rf"ppo\.yaml\): General\.rm_pretrain: {missing} does not exist; "
                                              r"run the reward model stage first"):
        run_pipeline(backend, PipelineOptions(stages=["sft", "ppo"], config_dir=config_dir,
                                              overrides=[f"ppo.General.rm_pretrain={missing}"]))
    assert backend.ran == [] and not (tmp_path / "run").exists()


def test_a_stage_runs_on_the_models_earlier_runs_of_the_pipeline_finished(tmp_path: Path, config_dir: Path) -> None:
    run_pipeline(RecordingBackend(tmp_path / "run"), PipelineOptions(config_dir=config_dir))
    (config_dir / "sft.yaml").unlink()
    (config_dir / "rm.yaml").unlink()
    again = RecordingBackend(tmp_path / "run")
    run_pipeline(again, PipelineOptions(stages=["ppo"], config_dir=config_dir))
    assert again.ran == [], "ppo alone, same config and the same finished inputs: nothing to do"
    changed = RecordingBackend(tmp_path / "run")
    run_pipeline(changed, PipelineOptions(stages=["ppo"], config_dir=config_dir, overrides=["Training.epochs=2"]))
    work = (tmp_path / "run").resolve()
    assert changed.ran == ["ppo"]
    assert (changed.configs["ppo"]["General"]["model_pretrain"], changed.configs["ppo"]["General"]["rm_pretrain"]) \
        == (str(work / "sft"), str(work / "rm"))


def test_a_stage_hash_covers_only_the_stages_it_reads_from(tmp_path: Path, config_dir: Path) -> None:
    """A reward model that does not start from the SFT model is not re-trained when the SFT config changes."""
    rm = yaml.safe_load((config_dir / "rm.yaml").read_text())
    rm["General"]["base_model"] = "gpt2"
    (config_dir / "rm.yaml").write_text(yaml.safe_dump(rm))
    run_pipeline(RecordingBackend(tmp_path / "run"), PipelineOptions(config_dir=config_dir))
    changed = RecordingBackend(tmp_path / "run")
    run_pipeline(changed, PipelineOptions(config_dir=config_dir, overrides=["sft.Training.epochs=2"]))
    assert changed.ran == ["sft", "ppo"]


def test_a_changed_or_forced_stage_moves_its_old_outputs_aside(tmp_path: Path, config_dir: Path) -> None:
    """Nothing is deleted: the old Ray checkpoints and final model of a re-run stage are kept beside it."""
    run = tmp_path / "run"
    run_pipeline(RecordingBackend(run), PipelineOptions(config_dir=config_dir))
    for name in ("rm-output", "rm"):
        (run / name).mkdir(exist_ok=True)
        (run / name / "weights").write_text(name)
    changed = RecordingBackend(run)
    run_pipeline(changed, PipelineOptions(config_dir=config_dir, overrides=["rm.Training.epochs=2"]))
    assert changed.ran == ["rm", "ppo"]
    for name in ("rm-output", "rm"):
        [kept] = run.glob(f"{name}.replaced-*")
        assert (kept / "weights").read_text() == name


def test_local_status_shows_the_record(tmp_path: Path, config_dir: Path, capsys) -> None:
    from rlhf_jobs.cli import main

    assert main(["status", "--workdir", str(tmp_path / "none")]) == 1
    assert "no pipeline record in" in capsys.readouterr().out
    with pytest.raises(RuntimeError):
        run_pipeline(RecordingBackend(tmp_path / "run", fail="rm"), PipelineOptions(config_dir=config_dir))
    capsys.readouterr()
    assert main(["status", "--workdir", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    record = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert lines[0] == f"pipeline in {(tmp_path / 'run').resolve()} (local backend):"
    assert lines[1].split() == ["stage", "status", "wall", "time", "finished", "config", "final", "model", "key",
                                "metrics"]
    sft, rm = lines[3].split(), lines[4].split()
    assert sft[:2] == ["sft", "succeeded"] and record["stages"]["sft"]["config_hash"] in sft
    assert rm[:2] == ["rm", "failed"] and str((tmp_path / "run" / "rm").resolve()) in rm
    assert lines[-1] == "rm: RuntimeError: rm crashed"


def test_in_process_pipeline_refuses_a_stage_it_cannot_run_before_any_runs(tmp_path: Path, config_dir: Path) -> None:
    backend = RecordingBackend(tmp_path / "run")
    backend.in_process = True
    with pytest.raises(ConfigError, match=r"^ppo stage: --in-process runs one worker.*must be 1 \(got 2\)"):
        run_pipeline(backend, PipelineOptions(config_dir=config_dir, overrides=["ppo.Training.num_training_workers=2"]))
    assert backend.ran == []


@pytest.mark.slow
def test_in_process_pipeline_runs_every_stage_without_ray(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    command = [sys.executable, "-m", "rlhf_jobs.cli", "pipeline", "--backend", "local", "--workdir", str(workdir),
               "--tiny-model", "--in-process", "--set", "Training.num_training_workers=1",
               "--set", "sft.Training.epochs=1", "--set", "rm.Training.epochs=1",
               "--set", "ppo.Training.training_iteration=2"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((workdir / "pipeline.json").read_text())
    assert {stage: entry["status"] for stage, entry in record["stages"].items()} == {
        "sft": "succeeded", "rm": "succeeded", "ppo": "succeeded"}
    assert "RayTrainWorker" not in done.stdout + done.stderr, "no Ray worker started"
    assert (workdir / "ppo" / "rlhf_stage.json").is_file()


def test_a_stage_whose_marker_is_gone_is_not_finished(tmp_path: Path, config_dir: Path) -> None:
    """It used to be skipped as finished (and so was every stage after it)."""
    run = tmp_path / "run"
    options = PipelineOptions(config_dir=config_dir)
    run_pipeline(RecordingBackend(run), options)
    (run / "rm" / "rlhf_stage.json").unlink()
    (run / "rm" / "weights").write_text("the old reward model")
    steps = {p.stage: (p.action, p.reason) for p in plan(RecordingBackend(run), options)}
    assert steps == {"sft": ("skip", "finished with the same config"),
                     "rm": ("run", "recorded as finished, but its final model has no rlhf_stage.json"),
                     "ppo": ("run", "rm runs again")}
    again = RecordingBackend(run)
    run_pipeline(again, options)
    assert again.ran == ["rm", "ppo"]
    [kept] = run.glob("rm.replaced-*")
    assert (kept / "weights").read_text() == "the old reward model", "moved aside, not deleted"


def test_from_stage_checks_its_inputs_before_moving_anything(tmp_path: Path, config_dir: Path) -> None:
    """`--from-stage ppo` with the SFT marker gone used to move the finished PPO model aside, then fail."""
    run = tmp_path / "run"
    run_pipeline(RecordingBackend(run), PipelineOptions(config_dir=config_dir))
    (run / "sft" / "rlhf_stage.json").unlink()
    before = sorted(p.name for p in run.iterdir())
    backend = RecordingBackend(run)
    expected = (rf"ppo\.yaml: General\.model_pretrain: {run.resolve() / 'sft'} has no rlhf_stage\.json, so it is not "
                r"a finished SFT checkpoint; run the SFT stage first")
    with pytest.raises(CheckpointError, match=expected):
        run_pipeline(backend, PipelineOptions(config_dir=config_dir, stages=["ppo"], from_stage="ppo"))
    assert backend.ran == [] and sorted(p.name for p in run.iterdir()) == before
    assert json.loads((run / "ppo" / "rlhf_stage.json").read_text())["stage"] == "ppo"
    # With every stage selected, the unfinished SFT stage runs first, and the stages built on it after it.
    everything = RecordingBackend(run)
    run_pipeline(everything, PipelineOptions(config_dir=config_dir, from_stage="ppo"))
    assert everything.ran == ["sft", "rm", "ppo"]


def test_dpo_runs_on_this_pipelines_sft_model_when_asked_for(tmp_path: Path, config_dir: Path) -> None:
    """`--stages sft,dpo`: DPO's policy (and reference) is this run's SFT model; the default pipeline has no DPO."""
    from rlhf_jobs.pipeline.plan import parse_stages

    data = yaml.safe_load((config_dir / "rm.yaml").read_text())["Dataset"]
    dpo = {"General": {"model_name": "gpt2", "model_pretrain": "ck/sft", "output_dir": "o/dpo",
                       "checkpoint_dir": "ck/dpo"}, "Dataset": data, "Training": {"num_training_workers": 1}}
    (config_dir / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    backend = RecordingBackend(tmp_path / "run")
    run_pipeline(backend, PipelineOptions(stages=parse_stages("dpo,sft"), config_dir=config_dir, base_model="tiny"))
    work = str((tmp_path / "run").resolve())
    assert backend.ran == ["sft", "dpo"]
    assert backend.configs["dpo"]["General"] == {"model_name": "tiny", "model_pretrain": f"{work}/sft",
                                                 "output_dir": f"{work}/dpo-output", "checkpoint_dir": f"{work}/dpo"}
    default = RecordingBackend(tmp_path / "other")
    run_pipeline(default, PipelineOptions(config_dir=config_dir))
    assert default.ran == ["sft", "rm", "ppo"]
    changed = RecordingBackend(tmp_path / "run")
    run_pipeline(changed, PipelineOptions(stages=["sft", "dpo"], config_dir=config_dir,
                                          overrides=["sft.Training.epochs=2"]))
    assert changed.ran == ["sft", "dpo"], "a changed SFT model re-runs DPO"


def test_grpo_runs_on_this_pipelines_sft_model_and_its_reward_model_only_when_rm_runs(tmp_path: Path,
                                                                                      config_dir: Path) -> None:
    """`--stages sft,grpo`: GRPO's policy is this run's SFT model and it has no reward model (its reward functions
    score; --base-model leaves the rm_name it set to null alone); `--stages sft,rm,grpo`: the optional input
    rm_pretrain is wired to this run's reward model, and a later `--stages grpo` keeps reading it (rm ran in this
    pipeline). The default pipeline has no GRPO."""
    (tmp_path / "data" / "grpo.jsonl").write_text('{"prompt": "What is 2 + 2?", "answer": "4"}\n'
                                                  '{"prompt": "What is 1 + 2?", "answer": "3"}\n')
    grpo = {"General": {"model_name": "gpt2", "model_pretrain": "ck/sft", "rm_name": None, "rm_pretrain": None,
                        "reward_functions": ["rlhf_jobs.algorithms.rl.reward_functions:answer_match"],
                        "output_dir": "o/grpo", "checkpoint_dir": "ck/grpo"},
            "Dataset": {"train_file": str(tmp_path / "data" / "grpo.jsonl")},
            "Training": {"num_training_workers": 1, "num_generations": 2}}
    (config_dir / "grpo.yaml").write_text(yaml.safe_dump(grpo))
    backend = RecordingBackend(tmp_path / "run")
    run_pipeline(backend, PipelineOptions(stages=["sft", "grpo"], config_dir=config_dir, base_model="tiny"))
    work = str((tmp_path / "run").resolve())
    assert backend.ran == ["sft", "grpo"]
    general = backend.configs["grpo"]["General"]
    assert (general["model_name"], general["model_pretrain"], general["rm_name"], general["rm_pretrain"]) == (
        "tiny", f"{work}/sft", None, None)
    with_rm = RecordingBackend(tmp_path / "run")
    run_pipeline(with_rm, PipelineOptions(stages=["sft", "rm", "grpo"], config_dir=config_dir, base_model="tiny"))
    assert with_rm.ran == ["rm", "grpo"], "sft is done; grpo reads a new input"
    assert with_rm.configs["grpo"]["General"]["rm_pretrain"] == f"{work}/rm"
    later = RecordingBackend(tmp_path / "run")
    run_pipeline(later, PipelineOptions(stages=["grpo"], config_dir=config_dir, base_model="tiny",
                                        overrides=["Training.epochs=2"]))
    assert later.configs["grpo"]["General"]["rm_pretrain"] == f"{work}/rm"
    default = RecordingBackend(tmp_path / "other")
    run_pipeline(default, PipelineOptions(config_dir=config_dir))
    assert default.ran == ["sft", "rm", "ppo"]

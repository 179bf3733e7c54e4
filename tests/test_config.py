"""Config loading: the original .conf format, YAML, JSON, overrides, and one clear error per problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlhf_jobs.core.config import ResourcesPerWorker, memory_bytes
from rlhf_jobs.core.errors import ConfigError
from rlhf_jobs.core.loading import load_config, validate_config

REPO = Path(__file__).resolve().parents[1]


def sft_dict(tmp_path: Path) -> dict:
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "context": "", "response": "b"}\n')
    return {
        "General": {"base_model": "gpt2", "output_dir": str(tmp_path / "out"), "checkpoint_dir": str(tmp_path / "ck")},
        "Dataset": {"train_file": str(data), "validation_file": None, "validation_split_percentage": 5},
        "Training": {"optimizer": "AdamW", "batch_size": 2, "epochs": 1, "learning_rate": 1e-5,
                     "num_training_workers": 2, "resources_per_worker": {"CPU": 1}},
    }


def test_original_conf_format_parses_without_eval(tmp_path: Path) -> None:
    conf = tmp_path / "finetune.conf"
    conf.write_text(
        "# I am python, not json\n"
        "{\n"
        '    "General": {"base_model": "gpt2", "output_dir": "/tmp/o", "checkpoint_dir": "/tmp/c",},\n'
        f'    "Dataset": {{"train_file": "{REPO}/configs/finetune.conf", "validation_file": None,}},\n'
        '    "Training": {"optimizer": "AdamW", "batch_size": 2, "epochs": 3, "learning_rate": 1e-5,\n'
        '                 "lr_scheduler": "linear", "weight_decay": 0.0, "num_training_workers": 2,\n'
        '                 "resources_per_worker": {"CPU": 32,},},\n'
        "}\n"
    )
    config = load_config(conf, "sft")
    assert config.Training.epochs == 3
    assert config.Training.resources_per_worker.ray_resources() == {"CPU": 32.0}
    assert config.Dataset.validation_file is None


def test_conf_with_code_is_refused_naming_the_line(tmp_path: Path) -> None:
    conf = tmp_path / "evil.conf"
    conf.write_text('# a comment\n{\n    "General": __import__("os").system("echo pwned"),\n}\n')
    with pytest.raises(ConfigError) as info:
        load_config(conf, "sft")
    assert str(info.value) == (
        f"{conf}:3: only literals are allowed in a .conf file (dicts, lists, strings, numbers, True/False/None); "
        'found a function call: __import__("os").system("echo pwned")'
    )


@pytest.mark.parametrize(("text", "found"), [("os.environ['HOME']", "a subscript"), ("1e-5 * 2", "arithmetic"),
                                             ("HOME", "a name")])
def test_conf_non_literals_are_named(tmp_path: Path, text: str, found: str) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text('{"General": {"output_dir": ' + text + ', "n": -1}}\n')
    with pytest.raises(ConfigError, match=f"c\\.conf:1: only literals are allowed .*; found {found}"):
        load_config(conf, "sft")


def test_set_errors_are_blamed_on_the_set_argument(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(sft_dict(tmp_path)))
    with pytest.raises(ConfigError) as info:
        load_config(path, "sft", ["Training.batch_size=two"])
    message = str(info.value)
    assert message.startswith("--set Training.batch_size=two: Training.batch_size: Input should be a valid integer")
    assert str(path) not in message
    with pytest.raises(ConfigError, match=r"^--set Training\.learning_rat=1: Training\.learning_rat: unknown key; "
                                          r"did you mean 'Training\.learning_rate'"):
        load_config(path, "sft", ["Training.learning_rat=1"])
    with pytest.raises(ConfigError, match=r"^--set Dataset\.train_file=nowhere\.jsonl: Dataset\.train_file: file not"):
        load_config(path, "sft", ["Dataset.train_file=nowhere.jsonl"])
    with pytest.raises(ConfigError, match=r"^--set 'Training\.epochs=\[1': the value is not valid YAML"):
        load_config(path, "sft", ["Training.epochs=[1"])


def test_file_and_set_problems_each_name_their_origin(tmp_path: Path) -> None:
    data = sft_dict(tmp_path)
    data["Training"]["epochz"] = 1
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(path, "sft", ["Training.resources_per_worker.CPU=-1"])
    lines = str(info.value).splitlines()
    assert lines[0] == f"2 problems in the sft config ({path} and --set):"
    assert any(line.startswith(f"  {path}: Training.epochz: unknown key") for line in lines)
    assert any(line.startswith("  --set Training.resources_per_worker.CPU=-1: Training.resources_per_worker.CPU")
               for line in lines)


def test_bundled_conf_files_validate() -> None:
    for stage, name in (("sft", "finetune.conf"), ("rm", "reward.conf")):
        config = load_config(REPO / "configs" / name, stage, paths=False)
        assert config.Training.num_training_workers == 2


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_yaml_and_json(tmp_path: Path, suffix: str) -> None:
    data = sft_dict(tmp_path)
    path = tmp_path / f"c{suffix}"
    path.write_text(yaml.safe_dump(data) if suffix == ".yaml" else json.dumps(data))
    assert load_config(path, "sft").Training.batch_size == 2


def test_yaml_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    data = sft_dict(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data).replace("1.0e-05", "1e-5"))
    assert "1e-5" in path.read_text()
    assert load_config(path, "sft").Training.learning_rate == pytest.approx(1e-5)


def test_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(sft_dict(tmp_path)))
    config = load_config(path, "sft", ["Training.epochs=4", "Training.resources_per_worker.GPU=1"])
    assert config.Training.epochs == 4
    assert config.Training.use_gpu


def test_bad_override_syntax(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(sft_dict(tmp_path)))
    with pytest.raises(ConfigError, match=r"expected KEY\.PATH=VALUE"):
        load_config(path, "sft", ["Training.epochs"])


def error_of(tmp_path: Path, mutate, stage: str = "sft") -> str:
    data = sft_dict(tmp_path)
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(path, stage)
    message = str(info.value)
    assert str(path) in message
    return message


def test_unknown_key_suggests_the_near_miss(tmp_path: Path) -> None:
    message = error_of(tmp_path, lambda d: d["Training"].update(learning_rat=1e-4))
    assert "Training.learning_rat: unknown key; did you mean 'Training.learning_rate'?" in message


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    message = error_of(tmp_path, lambda d: d["Training"].update(batch_size="two"))
    assert "Training.batch_size" in message and "'two'" in message


def test_impossible_values(tmp_path: Path) -> None:
    assert "Training.num_training_workers" in error_of(tmp_path, lambda d: d["Training"].update(num_training_workers=0))
    assert "Dataset.validation_split_percentage" in error_of(
        tmp_path, lambda d: d["Dataset"].update(validation_split_percentage=90)
    )
    assert "Training.optimizer" in error_of(tmp_path, lambda d: d["Training"].update(optimizer="Adamw"))


def test_several_problems_reported_together(tmp_path: Path) -> None:
    def mutate(d: dict) -> None:
        d["Training"].update(epochs=-1, lr_scheduler="step")
        del d["General"]["base_model"]

    message = error_of(tmp_path, mutate)
    assert "3 problems" in message
    assert "General.base_model: required key is missing" in message


def test_missing_data_file(tmp_path: Path) -> None:
    message = error_of(tmp_path, lambda d: d["Dataset"].update(train_file=str(tmp_path / "nope.jsonl")))
    assert "Dataset.train_file: file not found" in message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml", "sft")


def test_resources_case_typo_suggests(tmp_path: Path) -> None:
    message = error_of(tmp_path, lambda d: d["Training"].update(resources_per_worker={"cpu": 1}))
    assert "Training.resources_per_worker.cpu" in message and "did you mean" in message


def test_warmup_exclusive(tmp_path: Path) -> None:
    message = error_of(tmp_path, lambda d: d["Training"].update(warmup_ratio=0.1, warmup_steps=5))
    assert "warmup_ratio or warmup_steps" in message


def test_memory_quantities() -> None:
    assert memory_bytes("4Gi") == 4 * 2**30
    assert memory_bytes("512M") == 512 * 10**6
    assert memory_bytes(1024) == 1024
    assert ResourcesPerWorker(CPU=2, memory="1Gi").ray_resources() == {"CPU": 2.0, "memory": float(2**30)}
    with pytest.raises(ValueError):
        memory_bytes("lots")


def test_ppo_config_shape() -> None:
    config = validate_config(
        {"General": {"model_name": "gpt2", "rm_name": "gpt2", "output_dir": "/o", "checkpoint_dir": "/c"},
         "Dataset": {"train_file": "p.jsonl"},
         "Training": {"experience_batch_size": 4, "kl_coeff": 0.1}},
        "ppo", paths=False,
    )
    assert config.General.model_pretrain is None and config.Training.kl_coeff == 0.1


def test_non_finite_numbers_are_refused_naming_the_key(tmp_path: Path) -> None:
    """`learning_rate: .inf` trained into NaN and certified the model finished."""
    config = tmp_path / "c.yaml"
    data = sft_dict(tmp_path)
    text = yaml.safe_dump(data).replace("learning_rate: 1.0e-05", "learning_rate: .inf")
    config.write_text(text.replace("  epochs: 1\n", "  epochs: 1\n  warmup_ratio: .nan\n"))
    with pytest.raises(ConfigError) as raised:
        load_config(config, "sft")
    assert str(raised.value).splitlines()[1:] == ["  Training.learning_rate: Input should be a finite number (got inf)",
                                                  "  Training.warmup_ratio: Input should be a finite number (got nan)"]
    with pytest.raises(ConfigError, match=r"^--set Training.max_grad_norm=-.inf: Training.max_grad_norm: Input should "
                                          r"be a finite number"):
        load_config(config, "sft", ["Training.learning_rate=1e-5", "Training.warmup_ratio=0",
                                    "Training.max_grad_norm=-.inf"])


def test_a_bool_is_not_a_number(tmp_path: Path) -> None:
    """`epochs: true` was read as 1."""
    message = error_of(tmp_path, lambda d: d["Training"].update(epochs=True))
    assert "Training.epochs: expected a number, got a bool (got True)" in message
    assert "Training.resources_per_worker.CPU: expected a number" in error_of(
        tmp_path, lambda d: d["Training"].update(resources_per_worker={"CPU": False}))
    validate_config({**sft_dict(tmp_path), "General": {**sft_dict(tmp_path)["General"], "trust_remote_code": True}},
                    "sft")


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("c.yaml", "General: {}\nTraining:\n  epochs: 2\nTraining:\n  batch_size: 2\n",
     "c.yaml:4: key 'Training' appears twice in one mapping (first at line 2); the second would replace the first: "
     "merge them into one"),
    ("c.yaml", "Training:\n  epochs: 2\n  epochs: 3\n", "c.yaml:3: key 'epochs' appears twice in one mapping (first "
     "at line 2)"),
    ("c.json", '{"General": {}, "Training": {"epochs": 1}, "Training": {}}', "c.json: key 'Training' appears twice in "
     "one mapping; the second"),
    ("c.conf", "{\n 'General': {},\n 'General': {},\n}\n",
     "c.conf:3: key 'General' appears twice in one mapping (first at line 2)"),
])
def test_a_repeated_key_is_refused_naming_the_line(tmp_path: Path, name: str, text: str, expected: str) -> None:
    """PyYAML, json and ast keep the last of two equal keys: a second `Training:` block silently replaced the first."""
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path / name, "sft")
    assert str(raised.value).startswith(f"{tmp_path}/{expected}")

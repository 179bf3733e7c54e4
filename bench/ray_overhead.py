"""One SFT run of our loop, with Ray Train workers (`--mode ray`) or in Ray Train V2's local mode
(`--mode local`: `ScalingConfig(num_workers=0)` runs the same train function in this process, no
Ray started, no worker actor). run_all.py starts it in a fresh process per run, so Ray's start-up
is part of what `ray` measures. Prints one `RESULT {json}` line.

    python bench/ray_overhead.py --mode ray --model runs/bench/tiny-model \\
        --train-file runs/bench/data/sft.jsonl --run-dir runs/bench/ray-overhead --steps 60
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import Settings, metrics_records
from ours import sft_config, supervised_rate

from rlhf_jobs import launcher, sft


def run(mode: str, model: Path, train_file: Path, run_dir: Path, settings: Settings) -> dict[str, float]:
    config = sft_config(settings, model, train_file, run_dir, workers=1)
    data = sft.SFTTask().prepare(config)  # the driver's data preparation: the same in both modes, not timed
    start = time.perf_counter()
    started_at = time.time()
    if mode == "ray":
        launcher.init_ray(config.Training)
        ray_ready = time.perf_counter()
        launcher.run_trainer(config, sft.train_loop, data=data)
    else:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        ray_ready = time.perf_counter()
        TorchTrainer(
            sft.train_loop,
            train_loop_config={"stage": config.stage, "config": config.to_dict(), "data": data},
            scaling_config=ScalingConfig(num_workers=0),
            run_config=RunConfig(name=launcher.RUN_NAME, storage_path=str(Path(config.General.output_dir))),
        ).fit()
    end = time.perf_counter()
    records = metrics_records(Path(config.General.output_dir))
    return {
        "wall_seconds": end - start,
        "ray_init_seconds": ray_ready - start,
        # from the start to the end of the first logging window (model load, worker start, first steps)
        "first_window_seconds": records[0]["time"] - started_at if records else float("nan"),
        # from the last step's log to fit() returning (final checkpoint, model save, worker teardown)
        "after_last_step_seconds": end - start - (records[-1]["time"] - started_at) if records else float("nan"),
        "tokens_per_second": supervised_rate(config, "tokens"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("ray", "local"), required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--train-file", type=Path, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=Settings.sft_steps)
    args = parser.parse_args()
    result = run(args.mode, args.model, args.train_file, args.run_dir, Settings(sft_steps=args.steps))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

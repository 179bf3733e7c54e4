"""Run a function in N real processes joined by a gloo process group (no Ray), and collect what each returns.

The all-reduce paths of the trainers (token counts, whitening, metrics, evaluation sharding) are
only exercised for real with more than one process; a hang fails the test after `timeout` seconds.
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...], queue: Any) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    try:
        if world_size > 1:
            torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                                 world_size=world_size)
        # Serialised to bytes: torch would otherwise share tensors through memory the exiting child frees.
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        queue.put((rank, buffer.getvalue(), None))
    except BaseException:  # report it to the parent; the test fails with the child's traceback
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_processes(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """`fn(rank, world_size, *args)` in `world_size` processes; the results in rank order."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_entry, args=(rank, world_size, port, fn, args, queue))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    results: dict[int, Any] = {}
    try:
        for _ in processes:
            rank, value, error = queue.get(timeout=timeout)
            if error:
                raise AssertionError(f"rank {rank} failed:\n{error}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    except Exception as err:
        if "Empty" in type(err).__name__:
            raise AssertionError(f"the processes did not finish in {timeout:.0f}s (a collective hung?)") from None
        raise
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return [results[rank] for rank in range(world_size)]

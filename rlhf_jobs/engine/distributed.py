"""Numbers across the worker group: sums, and mean/variance of values spread over all workers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all workers (identity with one worker)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def global_items_divisor(local_items: float, device: torch.device) -> tuple[float, float]:
    """(items of a step on ALL workers, what each worker divides its summed loss by).

    Every item (label token, pair, response token) of an optimizer step weighs the same on any number of
    workers: the divisor is the step's item count over all workers / the worker count, because DDP and FSDP
    average gradients over the workers. Averaged over the workers, the quotients are the mean over all items,
    so 2 workers compute what 1 worker does with the same global batch. Every worker must call it.
    """
    (total,) = all_reduce_sum([float(local_items)], device)
    world_size = torch.distributed.get_world_size() if is_distributed() else 1
    return total, max(total, 1.0) / world_size


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory: allocated GPU memory on CUDA, resident memory (RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass
class Moments:
    """Count, sum and sum of squares of the values one worker saw; `reduce` adds up every worker's."""

    count: float = 0.0
    total: float = 0.0
    squares: float = 0.0

    def add(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> Moments:
        values = values.detach().double()
        weights = torch.ones_like(values) if mask is None else mask.detach().double()
        self.count += weights.sum().item()
        self.total += (values * weights).sum().item()
        self.squares += (values.pow(2) * weights).sum().item()
        return self

    def reduce(self, device: torch.device) -> Moments:
        self.count, self.total, self.squares = all_reduce_sum([self.count, self.total, self.squares], device)
        return self

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def var(self) -> float:
        """Population variance (never negative from rounding)."""
        return max(self.squares / max(self.count, 1) - self.mean**2, 0.0)

    @property
    def sample_var(self) -> float:
        """Unbiased variance, × count / (count - 1) (Bessel's correction; the population variance of one value)."""
        return self.var * self.count / (self.count - 1) if self.count > 1 else self.var

    @property
    def std(self) -> float:
        return math.sqrt(self.var)


def global_mean_var(values: torch.Tensor, mask: torch.Tensor, device: torch.device,
                    unbiased: bool = False) -> tuple[float, float]:
    """Mean and variance (population, or `unbiased`) of the masked values of ALL workers."""
    moments = Moments().add(values, mask).reduce(device)
    return moments.mean, moments.sample_var if unbiased else moments.var

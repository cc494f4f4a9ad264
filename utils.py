"""Distributed setup, metric logging and checkpoint I/O: what every other file shares."""
import datetime
import time
from collections import defaultdict, deque
from typing import Iterable, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

# ============ distributed ============


def is_dist_avail_and_initialized() -> bool:
    """True inside an initialised torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


# ============ metric logging ============


def all_reduce_sum(values: Sequence[float]) -> List[float]:
    """Sum numbers over all processes; the numbers themselves outside a distributed run.

    Reduced in float64, so counts stay exact up to 2**53.
    """
    if not is_dist_avail_and_initialized():
        return [float(v) for v in values]
    # NCCL reduces CUDA tensors only, gloo (CPU runs) CPU tensors; a mixed 'cpu:gloo,cuda:nccl'
    # group takes CPU tensors too. The original always used a cuda tensor, which broke CPU runs.
    device = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else 'cpu'
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class SmoothedValue:
    """A series of values: median / average over a recent window, and a global (weighted) average."""

    def __init__(self, window_size: int = 20, fmt: str = '{median:.4f} ({global_avg:.4f})') -> None:
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        """Record ``value`` as the mean of ``n`` samples (``n`` weights the global average)."""
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sum count and total over processes; the window stays local, as it is only for display."""
        count, self.total = all_reduce_sum([self.count, self.total])
        self.count = int(count)

    @property
    def median(self) -> float:
        return torch.tensor(list(self.deque), dtype=torch.float64).median().item() if self.deque else float('nan')

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else float('nan')

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float('nan')

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else float('nan')

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else float('nan')

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """Named SmoothedValues, a progress line every few iterations, and their reduction across processes."""

    def __init__(self, delimiter: str = '\t') -> None:
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, n: int = 1, **kwargs: float) -> None:
        """Record one value per meter name; tensors are read with ``.item()``."""
        for name, value in kwargs.items():
            self.meters[name].update(value.item() if isinstance(value, torch.Tensor) else float(value), n=n)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __str__(self) -> str:
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        """Reduce every meter in one collective; every process must hold the same meter names."""
        names = sorted(self.meters)
        reduced = all_reduce_sum([x for name in names for x in (self.meters[name].count, self.meters[name].total)])
        for i, name in enumerate(names):
            self.meters[name].count, self.meters[name].total = int(reduced[2 * i]), reduced[2 * i + 1]

    def log_every(self, iterable: Iterable, print_freq: int, header: str = '',
                  device: Optional[torch.device] = None) -> Iterator:
        """Yield from ``iterable``, printing progress every ``print_freq`` items and at the last one.

        The line holds the ETA, every meter, time per iteration and data-loading time, and the peak
        memory when ``device`` is a CUDA device (nothing CUDA is called otherwise).
        """
        num_iters = len(iterable)
        if num_iters == 0:
            # The original divided by this length at the end of the epoch.
            raise ValueError(f'{header} the data loader is empty: is the dataset empty, or smaller than the '
                             'batch size (times the number of processes) with drop_last=True?'.strip())
        iter_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue(fmt='{avg:.4f}')
        width = len(str(num_iters))
        start = end = time.time()
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == num_iters - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (num_iters - i - 1)))
                parts = [header, f'[{i:>{width}}/{num_iters}]', f'eta: {eta}', str(self),
                         f'time: {iter_time}', f'data: {data_time}']
                if device is not None and torch.device(device).type == 'cuda':
                    parts.append(f'max mem: {torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f}MB')
                print(self.delimiter.join(p for p in parts if p))
            end = time.time()
        total = time.time() - start
        print(f'{header} Total time: {datetime.timedelta(seconds=int(total))} ({total / num_iters:.4f} s / it)')


# ============ checkpoint I/O ============

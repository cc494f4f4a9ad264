"""Stopping a run cleanly: SIGTERM / SIGUSR1 become a stop request that every process agrees on, data
loader workers leave those signals to the training process and end with it, and a resumed run reads the
rest of the epoch that a stop interrupted (skip_batches).
"""
import itertools
import multiprocessing
import signal
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

import utils
from engine import TrainingStopped

# What schedulers send before they end a job (Slurm, Kubernetes, torchrun's agent: SIGTERM). SIGUSR2 stays
# free for submitit's requeue.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """SIGTERM / SIGUSR1 turned into a request that the training loop polls (``stop.requested``).

    Inside ``with StopRequest() as stop:`` the first such signal only records its name; the loop then
    saves a checkpoint and main() raises TrainingStopped (exit status EXIT_STOPPED). The handler removes
    itself, so that a second signal acts as without it: a second SIGTERM ends the process at once. Only
    signals still at their default action are taken, so a launcher keeps its own handlers (submitit
    ignores SIGTERM and requeues on SIGUSR2); the previous handlers come back on exit. Python runs signal
    handlers in the main thread: from another thread nothing is installed.
    """

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> 'StopRequest':
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) == signal.SIG_DFL:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        # Nothing printed here: the signal may have interrupted a print, and stdout is not reentrant.
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous[signum])

    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return self.signal_name is not None

    def agreed(self) -> bool:
        """Whether any process received one: a collective call, made by every process."""
        return utils.all_reduce_sum([float(self.requested())])[0] > 0

    def report(self, stopped: TrainingStopped, num_steps: int, output_dir: Optional[Path]) -> None:
        """Print where training stopped and what was saved, once every process is there (after the save)."""
        if utils.is_dist_avail_and_initialized():
            dist.barrier()
        saved = (f'saved {output_dir / "checkpoint.pth"}, from which the same command continues'
                 if output_dir is not None else 'nothing saved (no --output_dir)')
        print(f'Stopped by {self.signal_name or "a stop request on another process"} at epoch {stopped.epoch}, '
              f'step {stopped.step} of {num_steps}: {saved}')


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: SIGTERM / SIGUSR1 are for the training process, which ends its workers."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def end_workers_at_exit() -> None:
    """atexit: kill the DataLoader workers still alive at exit, those of a loader that an exception left
    behind (its iterator kept by the traceback, e.g. after a corrupt image).

    They ignore SIGTERM (ignore_stop_signals), and so the terminate() with which multiprocessing's exit
    handler, which runs after this one, ends daemonic children before joining them: the process would
    never exit, whether it ran ``python main.py`` or called main() (run_with_submitit.py). torch's SIGCHLD
    handler would report the kill as a worker failure, so it goes first.
    """
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for worker in workers:
            worker.kill()


class _SkipFirst(Sampler):
    """The indices of ``sampler`` after its first ``count``."""

    def __init__(self, sampler: Sampler, count: int) -> None:
        self.sampler = sampler
        self.count = count

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.count, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.count, 0)


def skip_batches(loader: DataLoader, num_batches: int) -> DataLoader:
    """``loader`` without the first ``num_batches`` batches of its epoch: the rest of an epoch that a stop
    interrupted. The sampler skips their indices, so no image of them is read; the order is the one that
    the epoch's seed (and set_epoch) fixes, as for the interrupted run, and the samples keep their seeds
    (seeding.SeededSampler numbers them before the skip). Its workers serve this one epoch and end with it."""
    return DataLoader(loader.dataset, sampler=_SkipFirst(loader.sampler, num_batches * loader.batch_size),
                      batch_size=loader.batch_size, drop_last=loader.drop_last, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                      generator=loader.generator)

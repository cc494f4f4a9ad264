"""Distributed setup, metric logging and checkpoint I/O: what every other file shares."""
import argparse
import builtins
import datetime
import os
import pathlib
import re
import time
import urllib.error
import urllib.parse
import warnings
from collections import defaultdict, deque
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

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


def setup_for_distributed(is_master: bool) -> None:
    """Silence ``print`` and warnings on every process but the master; ``print(..., force=True)`` still prints."""
    builtin_print = builtins.print

    def print(*args: Any, **kwargs: Any) -> None:
        force = kwargs.pop('force', False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print
    if not is_master:
        warnings.filterwarnings('ignore')


def _launcher_env() -> Optional[Tuple[int, int, int]]:
    """(rank, world size, local rank) from torchrun / torch.distributed.launch --use_env, else Slurm, else None."""
    env = os.environ
    if 'RANK' in env and 'WORLD_SIZE' in env:
        return int(env['RANK']), int(env['WORLD_SIZE']), int(env.get('LOCAL_RANK', 0))
    # A single Slurm task (srun / sbatch running `python main.py`) is a plain single-process run.
    if 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', 1)) > 1:
        return int(env['SLURM_PROCID']), int(env['SLURM_NTASKS']), int(env.get('SLURM_LOCALID', 0))
    return None


def init_distributed_mode(args: Any) -> None:
    """Join the process group that the launcher set up, or mark the run as single-process.

    Reads RANK / WORLD_SIZE / LOCAL_RANK (torchrun, ``torch.distributed.launch --use_env``) or
    SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (srun, submitit; then MASTER_ADDR and MASTER_PORT
    must be set by the launcher for the ``env://`` rendezvous, or ``--dist_url`` must name another
    one). Sets ``args.distributed``, ``args.rank``, ``args.world_size``, ``args.gpu`` (the local
    rank) and ``args.dist_backend``: NCCL for CUDA, gloo for CPU.

    Raises:
        ValueError: on a launch that cannot work (``--world_size`` without a launcher or
            disagreeing with it, a missing rendezvous address, more processes than GPUs).
    """
    launch = _launcher_env()
    if launch is None:
        if args.world_size != 1:
            raise ValueError(f'--world_size {args.world_size} needs a launcher that starts the processes: '
                             f'torchrun --nproc_per_node={args.world_size} main.py ... (or Slurm).')
        args.distributed, args.rank, args.gpu = False, 0, 0
        print('Not using distributed mode')
        return
    rank, world_size, local_rank = launch
    if args.world_size not in (1, world_size):
        raise ValueError(f'--world_size {args.world_size} disagrees with the launcher, which started {world_size} '
                         'processes; drop --world_size (the launcher sets it).')
    if args.dist_url == 'env://' and not ('MASTER_ADDR' in os.environ and 'MASTER_PORT' in os.environ):
        raise ValueError('distributed launch without MASTER_ADDR / MASTER_PORT: use torchrun, or export them '
                         '(e.g. the first node of the Slurm job and a free port), or pass --dist_url tcp://HOST:PORT.')
    args.distributed, args.rank, args.world_size, args.gpu = True, rank, world_size, local_rank
    if torch.device(args.device).type == 'cuda':
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f'local rank {local_rank} but only {torch.cuda.device_count()} GPU(s) on this node: '
                             'start at most one process per GPU.')
        torch.cuda.set_device(local_rank)
        args.dist_backend = 'nccl'
    else:
        args.dist_backend = 'gloo'
    print(f'| distributed init (rank {rank} of {world_size}, {args.dist_backend}): {args.dist_url}', flush=True)
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url, world_size=world_size, rank=rank)
    dist.barrier()
    setup_for_distributed(rank == 0)


# ============ metric logging ============


# The tensor of the last all_reduce_sum, referenced until the next one. Before torch 2.8 a gloo worker thread lets go of
# a reduced tensor a moment after wait() returns; were that the last reference while destroy_process_group() ran, the
# worker (which then needs the GIL to free a tensor made in Python) and the group's destructor (which holds the GIL
# and waits for the worker) would wait for each other: a hang at exit in 4 of 10 two-process runs on torch 2.4
# (pytorch/pytorch#154976, in torch 2.8, releases the GIL there).
_last_reduced: List[torch.Tensor] = []


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
    _last_reduced[:] = [tensor]
    return tensor.tolist()


def all_gather_object(obj: Any) -> List[Any]:
    """The ``obj`` of every process, by rank (picklable objects); ``[obj]`` outside a distributed run."""
    if not is_dist_avail_and_initialized():
        return [obj]
    gathered: List[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


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


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated, corrupt, or holding more than tensors and plain values."""


def save_on_master(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` on the master process only, atomically.

    The file is written next to ``path`` as ``.<name>.tmp``, flushed to disk and renamed over
    ``path``, so a kill during the write leaves the previous checkpoint intact (the original
    overwrote its only resume point in place). The temporary name is fixed, so the one a kill
    leaves behind is overwritten by the next save instead of piling up.
    """
    if not is_main_process():
        return
    folder, name = os.path.split(os.path.abspath(path))
    tmp_path = os.path.join(folder, f'.{name}.tmp')
    try:
        with open(tmp_path, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    # The rename itself reaches the disk with the folder's entry: after a crash of the machine, not
    # only of the process, the folder holds the new file or the old one.
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _pickled_paths() -> List[Tuple[type, str]]:
    """The pathlib classes as pickles name them, each with the class that rebuilds it here.

    Python 3.13 pickles ``pathlib._local.PosixPath``, earlier versions ``pathlib.PosixPath``. A concrete
    path of the other system (a WindowsPath on Linux) cannot be instantiated here and becomes its pure
    flavour, which holds the same path.
    """
    posix, windows = ((pathlib.PurePosixPath, pathlib.WindowsPath) if os.name == 'nt'
                      else (pathlib.PosixPath, pathlib.PureWindowsPath))
    classes = {'PurePath': pathlib.PurePath, 'PurePosixPath': pathlib.PurePosixPath,
               'PureWindowsPath': pathlib.PureWindowsPath, 'Path': pathlib.Path,
               'PosixPath': posix, 'WindowsPath': windows}
    return [(cls, f'{module}.{name}') for name, cls in classes.items() for module in ('pathlib', 'pathlib._local')]


def _pickled_globals() -> List[Any]:
    """What the original's checkpoints pickle besides tensors and plain values, in the form this torch takes.

    torch >= 2.6 takes (class, 'module.name') pairs, which map each name in _pickled_paths to its class; older
    torch takes classes only, each under its own name, so there a path pickled by another Python version or
    system (a name whose class differs here) stays refused.
    """
    if torch.__version__ >= (2, 6):
        return [argparse.Namespace, *_pickled_paths()]
    return [argparse.Namespace, *(cls for cls, name in _pickled_paths() if name == f'{cls.__module__}.{cls.__name__}')]


@contextmanager
def _safe_globals(allowed: List[Any]) -> Iterator[None]:
    """Allow ``allowed`` in weights-only loads inside the block only: torch's ``safe_globals``, or its equivalent
    on torch 2.4, which has only the process-wide ``add_safe_globals``."""
    if hasattr(torch.serialization, 'safe_globals'):  # torch >= 2.5
        with torch.serialization.safe_globals(allowed):
            yield
        return
    # What torch 2.5's safe_globals does: add to the process-wide list, then put back the list as it was.
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals(allowed)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def load_checkpoint(path_or_url: str) -> Dict[str, Any]:
    """Load a checkpoint on the CPU from a file or an https URL, with ``weights_only=True``.

    URLs go through torch.hub's cache (``$TORCH_HOME/hub/checkpoints``): a file already there is
    used without network. Checkpoints of the original code, which pickled ``argparse.Namespace`` as
    their ``args``, load too (that class only holds attributes), also those its Slurm launcher wrote,
    whose ``args`` hold ``pathlib`` paths (``output_dir``, ``job_dir``; building a path runs no code
    and touches no file; paths pickled by another Python version or system need torch >= 2.6); anything
    else that is not tensors or plain values is refused.

    Raises:
        CheckpointError: one line saying what is wrong with the file.
    """
    try:
        with _safe_globals(_pickled_globals()):
            if path_or_url.startswith(('https://', 'http://')):
                return torch.hub.load_state_dict_from_url(path_or_url, map_location='cpu', check_hash=True,
                                                          weights_only=True)
            return torch.load(path_or_url, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f'checkpoint {path_or_url}: no such file') from None
    except urllib.error.URLError as e:
        name = os.path.basename(urllib.parse.urlparse(path_or_url).path)
        raise CheckpointError(f'cannot download {path_or_url} ({e.reason}); without network, copy {name} into '
                              f'{os.path.join(torch.hub.get_dir(), "checkpoints")}/, or give a local file') from None
    except Exception as e:  # a truncated, foreign or refused file can fail anywhere in the unpickler
        message = str(e)
        # torch's refusal is a paragraph; its 'Unsupported global: GLOBAL x.y' (or, for a module it blocks,
        # 'unsupported GLOBAL x.y whose module x is blocked') part names the culprit.
        refused = re.search(r'unsupported (?:global: )?GLOBAL (\S+)', message, re.IGNORECASE)
        if refused and refused[1] in {name for _, name in _pickled_paths()}:
            raise CheckpointError(f'checkpoint {path_or_url} holds a {refused[1]}, a path as another Python version '
                                  f'or system pickles it, which torch {torch.__version__} cannot map to a class of '
                                  'this Python: load it with torch >= 2.6') from None
        if refused:
            raise CheckpointError(f'checkpoint {path_or_url} holds {refused[1]}, not only tensors and plain values, '
                                  'and is refused: unpickling it could run code (loaded with weights_only=True). '
                                  'Use files from sources you trust, saved as tensors and plain values') from None
        found = re.search(r'WeightsUnpickler error:\s*(.+)', message)
        reason = found[1] if found else message.strip().split('. ')[0]
        raise CheckpointError(f'checkpoint {path_or_url} is truncated or not a torch checkpoint '
                              f'({type(e).__name__}: {reason}): give a complete checkpoint file') from None


def weights_of(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The model weights in a checkpoint: its 'model' entry (official DeiT, DeiT III and CaiT files, this codebase's
    checkpoints) or the checkpoint itself (a bare state_dict, as the official ResMLP files), without the
    'module.' prefix of a model saved from inside DistributedDataParallel (the official CaiT files keep it)."""
    weights = checkpoint['model'] if 'model' in checkpoint else checkpoint
    if weights and all(key.startswith('module.') for key in weights):
        weights = {key[len('module.'):]: value for key, value in weights.items()}
    return weights


def load_pretrained(model: nn.Module, url: str,
                    adapt: Optional[Callable[[nn.Module, Dict[str, torch.Tensor]], None]] = None) -> None:
    """Load the official weights at ``url`` into ``model``, through torch.hub's cache (``load_checkpoint``).

    Strict, except for the classifier: a head ('head', 'head_dist') whose shape differs from the model's (another
    number of classes) keeps its fresh initialisation. ``adapt(model, state_dict)``, when given, changes the
    weights in place first (e.g. resizes the position embedding to the model's image size).
    """
    state_dict = dict(weights_of(load_checkpoint(url)))
    if adapt is not None:
        adapt(model, state_dict)
    own = model.state_dict()
    dropped = [key for key in ('head.weight', 'head.bias', 'head_dist.weight', 'head_dist.bias')
               if key in state_dict and key in own and state_dict[key].shape != own[key].shape]
    for key in dropped:
        del state_dict[key]
    missing, unexpected = model.load_state_dict(state_dict, strict=not dropped)
    if unexpected or set(missing) != set(dropped):
        raise RuntimeError(f'{url} does not fit {type(model).__name__} (missing {sorted(set(missing) - set(dropped))}, '
                           f'unexpected {unexpected})')

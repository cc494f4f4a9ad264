"""--log_dir: the run's scalars as TensorBoard event files, written by the master process only.

TensorBoard is optional (not in requirements.txt): it is imported only when --log_dir is given.
"""
import importlib
from contextlib import nullcontext
from typing import Any, ContextManager, Dict, Optional

MISSING = '--log_dir needs TensorBoard: pip install tensorboard'


def check_available() -> None:
    """Raise ValueError (one line, the install command) when TensorBoard cannot be imported."""
    try:
        importlib.import_module('torch.utils.tensorboard')
    except ImportError:
        raise ValueError(MISSING) from None


def open_writer(log_dir: str, purge_step: int) -> ContextManager[Optional[Any]]:
    """A SummaryWriter on ``log_dir`` (closed on leaving the ``with`` block); None (nothing written) without
    a ``log_dir``.

    Args:
        purge_step: the optimizer step the run starts at. A resumed run writes into the same folder, and
            TensorBoard's reader drops the events of steps >= purge_step that an earlier run left behind
            (the steps a killed run trained past its last checkpoint; torch's SummaryWriter(purge_step=...)),
            so no step shows twice. The per-epoch scalars (x = epoch, below purge_step) need no purge: main.py
            writes them after the epoch's checkpoint, so a resumed run never writes an epoch's again.
    """
    if not log_dir:
        return nullcontext(None)
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir, purge_step=purge_step)


def log_epoch(writer: Optional[Any], epoch: int, test_stats: Dict[str, float]) -> None:
    """test/loss, test/acc1, test/acc5 (and test_ema/... for the EMA) at x = ``epoch``, then flush: the events
    are on disk before the epoch's checkpoint, from which a resumed run continues."""
    if writer is None:
        return
    for key, value in test_stats.items():
        name = key.rsplit('_', 1)
        if name[1] != 'n':  # test_acc1 -> test/acc1, test_ema_acc1 -> test_ema/acc1
            writer.add_scalar('/'.join(name), value, epoch)
    writer.flush()

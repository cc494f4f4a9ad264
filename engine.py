"""One training epoch and one evaluation pass, on CPU or CUDA, in one or many processes."""
import itertools
import math
import os
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.utils import accuracy
from torch.utils.data import DistributedSampler

import models
import seeding
import utils
from losses import CosubLoss, DistillationLoss


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; raised on every process together, before the optimizer step."""


class TrainingStopped(Exception):
    """A stop was requested (main.py: SIGTERM / SIGUSR1); raised on every process together.

    Attributes:
        epoch: the epoch in progress.
        step: the number of its steps applied; the step under way was abandoned before its update.
        sums: this process's (count, total) of the epoch's 'loss' and 'lr' figures over the batches of the
            applied steps, from which train_one_epoch(resumed_sums=...) goes on; None between epochs.
    """

    def __init__(self, epoch: int, step: int, sums: Optional[Dict[str, Tuple[int, float]]] = None) -> None:
        super().__init__(epoch, step)
        self.epoch = epoch
        self.step = step
        self.sums = sums

    def __str__(self) -> str:
        # Read when printed: main.py adds the steps before a resumed run's first to ``step``.
        return f'training stopped at epoch {self.epoch}, step {self.step}'


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """The one precision switch: autocast to ``amp_dtype`` on ``device``, or full precision when None."""
    return nullcontext() if amp_dtype is None else torch.autocast(device_type=device.type, dtype=amp_dtype)


def _injected_nan_at() -> Optional[Tuple[int, int, int]]:
    """Test-only: ``DEIT_TEST_NAN_AT=rank:epoch:step`` makes that process's loss NaN at that step.

    tests/test_reliability.py uses it to make one process of two diverge; never set it otherwise.
    """
    value = os.environ.get('DEIT_TEST_NAN_AT')
    return tuple(int(v) for v in value.split(':')) if value else None


def _pause_point() -> Optional[Tuple[Tuple[int, int, int], str]]:
    """Test-only: ``DEIT_TEST_PAUSE_AT=rank:epoch:step:marker`` makes that process wait at that batch (see _pause);
    the step counts the batches of this call's loader (from the batch resumed at, after a stop mid-epoch).

    tests/test_reliability.py, tests/test_submitit.py and tests/test_e2e_main.py use it to signal or kill a run
    at a known step instead of after a guessed time; never set it otherwise.
    """
    value = os.environ.get('DEIT_TEST_PAUSE_AT')
    if not value:
        return None
    rank, epoch, step, marker = value.split(':', 3)
    return (int(rank), int(epoch), int(step)), marker


def _pause(marker: str, stop_requested: Optional[Callable[[], bool]]) -> None:
    """Test-only (_pause_point): create the file ``marker``, then wait until a stop is requested or a signal
    ends the process, at most a minute. Once only: nothing happens when ``marker`` exists already, so a
    resumed run passes the same step."""
    if os.path.exists(marker):
        return
    open(marker, 'w').close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (stop_requested is not None and stop_requested()):
        time.sleep(0.005)


def _test_hooks(epoch: int, step: int, loss_value: float, stop_requested: Optional[Callable[[], bool]]) -> float:
    """The test-only switches at this batch (DEIT_TEST_PAUSE_AT, DEIT_TEST_NAN_AT), inactive without their
    environment variables; returns the loss value, NaN where DEIT_TEST_NAN_AT says."""
    where = (utils.get_rank(), epoch, step)
    pause_at = _pause_point()
    if pause_at is not None and pause_at[0] == where:
        _pause(pause_at[1], stop_requested)
    return math.nan if _injected_nan_at() == where else loss_value


def _check_step(loss_value: float, stop: bool, epoch: int, step: int, num_steps: int,
                metric_logger: utils.MetricLogger) -> float:
    """Stop every process together: NonFiniteLossError when the loss of any process is not finite,
    else TrainingStopped when any process was asked to stop, with the epoch's figures so far in
    ``metric_logger``.

    Both decisions are summed over processes, in one collective per step, so that no process goes on
    to a collective (the DDP gradient all-reduce) that the others never join: the original exited one
    rank on a NaN and hung the rest.

    Returns:
        The loss averaged over the processes (reduced in the same collective).
    """
    local_bad = not math.isfinite(loss_value)
    bad_processes, stopping, loss_sum = utils.all_reduce_sum(
        [float(local_bad), float(stop), 0.0 if local_bad else loss_value])
    bad_processes = int(bad_processes)
    if bad_processes:
        where = f'loss is {loss_value}' if local_bad else 'loss is finite here'
        raise NonFiniteLossError(
            f'Non-finite loss at epoch {epoch}, step {step}/{num_steps} on {bad_processes} of '
            f'{utils.get_world_size()} process(es) ({where}); stopped before the optimizer step. '
            'Try a lower --lr, --clip-grad 1.0, or bf16 / full precision instead of fp16.')
    if stopping:
        meters = metric_logger.meters
        raise TrainingStopped(epoch, step, {name: (meters[name].count, meters[name].total) for name in _EPOCH_FIGURES})
    return loss_sum / utils.get_world_size()


# What train_one_epoch returns, averaged over the epoch's batches (log.txt's train_loss and train_lr).
_EPOCH_FIGURES = ('loss', 'lr')


class _WholeGroups:
    """The batches of ``loader`` up to its last complete group of ``accum_iter``: gradient accumulation drops
    the shorter group at the end of an epoch, as the loader drops a last, incomplete batch (drop_last=True).
    Its batches are not read."""

    def __init__(self, loader: Iterable, accum_iter: int) -> None:
        self.loader = loader
        self.length = len(loader) // accum_iter * accum_iter
        if self.length == 0:
            raise ValueError(f'--accum-iter {accum_iter} accumulates more batches than the {len(loader)} of an epoch: '
                             'lower --accum-iter or --batch-size')

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.loader), self.length)

    def __len__(self) -> int:
        return self.length


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    max_norm: float, model_ema: Optional[nn.Module]) -> None:
    """Apply the accumulated gradients: clip (after unscaling), step, update the loss scale and the EMA."""
    if max_norm:
        # Unscale first, so that max_norm bounds the true gradients and not the fp16-scaled ones.
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    scaler.step(optimizer)
    scaler.update()
    if model_ema is not None:
        model_ema.update(model)


def _gradient_sync(model: nn.Module, sync: bool):
    """Where ``sync`` is False, DDP's no_sync (reached through torch.compile's wrapper too): the backward pass
    adds the gradients up locally, without the all-reduce, which the last batch of an optimizer step does."""
    no_sync = getattr(model, 'no_sync', None)  # a plain module has none
    return nullcontext() if sync or no_sync is None else no_sync()


def _batch_loss(model: nn.Module, criterion: Union[DistillationLoss, CosubLoss], samples: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
    """The loss of one (mixed) batch. For cosub the model runs once on the batch twice over, as the original: drop
    path draws its masks per image, so the two copies of an image go through two different sub-models."""
    if isinstance(criterion, CosubLoss):
        samples = torch.cat((samples, samples))  # [2B, 3, H, W]
    return criterion(samples, model(samples), targets)


def _log_train(log_writer: Optional[Any], global_step: int, print_freq: int, loss: float,
               optimizer: torch.optim.Optimizer) -> None:
    """TensorBoard's train/loss and train/lr at every ``print_freq``-th optimizer step of the run."""
    if log_writer is not None and global_step % print_freq == 0:
        log_writer.add_scalar('train/loss', loss, global_step)
        log_writer.add_scalar('train/lr', optimizer.param_groups[0]['lr'], global_step)


def train_one_epoch(model: nn.Module, criterion: Union[DistillationLoss, CosubLoss], data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int,
                    scaler: Optional[torch.amp.GradScaler], amp_dtype: Optional[torch.dtype],
                    max_norm: float = 0.0, model_ema: Optional[nn.Module] = None, mixup_fn: Optional[Mixup] = None,
                    set_training_mode: bool = True, print_freq: int = 10,
                    stop_requested: Optional[Callable[[], bool]] = None, accum_iter: int = 1,
                    log_writer: Optional[Any] = None, first_step: int = 0,
                    seed: Optional[int] = None,
                    resumed_sums: Optional[Dict[str, Tuple[int, float]]] = None) -> Dict[str, float]:
    """Train ``model`` for one pass over ``data_loader``, one optimizer step every ``accum_iter`` batches.

    Args:
        criterion: called as ``criterion(samples, outputs, targets)``, on the mixed samples; a CosubLoss gets the
            samples twice over and their outputs (see _batch_loss).
        scaler: a GradScaler, enabled for fp16 only; None is the same as a disabled one.
        amp_dtype: None (full precision), torch.float16 or torch.bfloat16.
        max_norm: clip the gradient norm to this value (after unscaling); 0 disables clipping.
        model_ema: anything with ``.update(model)`` (timm's ModelEmaV3), updated every optimizer step.
        mixup_fn: timm's Mixup, applied on ``device``.
        set_training_mode: False keeps the model in eval mode (dropout, drop path off) while training.
        stop_requested: polled at the first batch of every optimizer step; when it returns True on any process,
            every process abandons the step before its first backward pass and raises TrainingStopped.
        accum_iter: batches per optimizer step. Each batch's loss is divided by accum_iter: the step follows
            the gradient of the mean loss over its batches, as one batch accum_iter times larger would.
        log_writer: a TensorBoard SummaryWriter: every ``print_freq``-th optimizer step of the run gets
            'train/loss' (mean over its batches and processes) and 'train/lr' at x = its index in the run.
        first_step: that index for this call's first optimizer step.
        seed: when given, the random generators are seeded at the start of every optimizer step from (seed, rank,
            its index in the run) (seeding.seed_step): its mixup / cutmix, drop path and dropout draw the same
            whatever ran before it, also in a run resumed at that step.
        resumed_sums: in a run resumed in the middle of this epoch, TrainingStopped.sums of the stopped run
            (this process's): the returned means then count the epoch's batches before the resumed one too, and
            equal bit for bit those of the run that never stopped.

    Returns:
        {'loss': mean loss, 'lr': mean learning rate} over the epoch's batches and all processes.

    Raises:
        NonFiniteLossError: on every process, when the loss of any process is NaN or infinite.
        TrainingStopped: on every process, when any process was asked to stop; ``step``: a multiple of accum_iter.
        ValueError: when the loader holds fewer than accum_iter batches (or none).
    """
    model.train(set_training_mode)
    scaler = scaler if scaler is not None else torch.amp.GradScaler(device.type, enabled=False)
    autocast = _autocast(device, amp_dtype)
    # timm's second-order optimizers (AdaHessian) need the graph of the gradients.
    is_second_order = getattr(optimizer, 'is_second_order', False)
    data_loader = _WholeGroups(data_loader, accum_iter) if accum_iter > 1 else data_loader

    metric_logger = utils.MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    metric_logger.add_meter('img/s', utils.SmoothedValue(fmt='{median:.1f}'))
    for name, (count, total) in (resumed_sums or {}).items():
        metric_logger.meters[name].count, metric_logger.meters[name].total = count, total
    header = f'Epoch: [{epoch}]'
    last, step_loss = time.perf_counter(), 0.0
    for step, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, header, device)):
        first_of_step, last_of_step = step % accum_iter == 0, (step + 1) % accum_iter == 0
        if first_of_step and seed is not None:
            seeding.seed_step(seed, utils.get_rank(), first_step + step // accum_iter)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        with _gradient_sync(model, last_of_step):
            with autocast:
                loss = _batch_loss(model, criterion, samples, targets)
            loss_value = _test_hooks(epoch, step, loss.item(), stop_requested)
            # Every batch is checked (one collective each, on every process); a stop is taken only before the
            # first batch of an optimizer step, so that it lands between two steps.
            stop = first_of_step and stop_requested is not None and stop_requested()
            step_loss += _check_step(loss_value, stop, epoch, step, len(data_loader), metric_logger) / accum_iter
            if first_of_step:
                optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss / accum_iter).backward(create_graph=is_second_order)
        if last_of_step:
            _optimizer_step(model, optimizer, scaler, max_norm, model_ema)
            _log_train(log_writer, first_step + step // accum_iter, print_freq, step_loss, optimizer)
            step_loss = 0.0

        now = time.perf_counter()
        metric_logger.update(loss=loss_value)
        metric_logger.update(lr=optimizer.param_groups[0]['lr'])
        metric_logger.meters['img/s'].update(samples.shape[0] * utils.get_world_size() / (now - last))
        last = now

    metric_logger.synchronize_between_processes()
    print('Averaged stats:', metric_logger)
    return {name: metric_logger.meters[name].global_avg for name in _EPOCH_FIGURES}


def _num_real_samples(data_loader: Iterable) -> Optional[int]:
    """How many of this process's samples are dataset items rather than a DistributedSampler's padding.

    With drop_last=False, DistributedSampler pads its index list to a multiple of the number of
    processes by repeating its first indices, and gives process r the positions r, r + W, r + 2W, ...
    of that padded list. The padding is the positions >= len(dataset), so on each process it is the
    tail: only the first len(range(r, min(total_size, len(dataset)), W)) samples are distinct items,
    and over all processes these cover every dataset index exactly once. None when the loader does
    not draw from a DistributedSampler (then nothing is padded).
    """
    sampler = getattr(getattr(data_loader, 'batch_sampler', None), 'sampler', None)
    if not isinstance(sampler, DistributedSampler):
        return None
    return len(range(sampler.rank, min(sampler.total_size, len(sampler.dataset)), sampler.num_replicas))


@torch.no_grad()
def _evaluate_models(data_loader: Iterable, models_: Sequence[nn.Module], device: torch.device,
                     amp_dtype: Optional[torch.dtype], head: str, print_freq: int) -> List[Dict[str, float]]:
    """evaluate() of each of ``models_`` in one pass over ``data_loader``: each batch is loaded once and scored by
    every model in turn, so each model's figures are those of a pass of its own."""
    num_real = _num_real_samples(data_loader)
    autocast = _autocast(device, amp_dtype)
    loggers = [utils.MetricLogger(delimiter='  ') for _ in models_]
    # Every process needs the same meters for the reduction, even one that saw only padding.
    for logger in loggers:
        for name in ('loss', 'acc1', 'acc5'):
            logger.add_meter(name, utils.SmoothedValue())

    previous_heads = []
    try:
        for model in models_:
            model.eval()
            previous_heads.append(models.set_eval_head(model, head))
        seen = 0
        for images, target in loggers[0].log_every(data_loader, print_freq, 'Test:', device):
            images = images.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            keep = target.shape[0] if num_real is None else min(max(num_real - seen, 0), target.shape[0])
            seen += target.shape[0]
            for model, logger in zip(models_, loggers):
                # Every process still runs the full batch, so that all run the same forward passes.
                with autocast:
                    output = model(images)
                if keep == 0:
                    continue
                output = output[:keep].float()
                # Top-5 of fewer than five classes is every class.
                acc1, acc5 = accuracy(output, target[:keep], topk=(1, min(5, output.shape[1])))
                logger.meters['loss'].update(F.cross_entropy(output, target[:keep]).item(), n=keep)
                logger.meters['acc1'].update(acc1.item(), n=keep)
                logger.meters['acc5'].update(acc5.item(), n=keep)
    finally:
        for model, previous in zip(models_, previous_heads):
            models.set_eval_head(model, previous)

    results = []
    for logger in loggers:
        logger.synchronize_between_processes()
        meters = logger.meters
        results.append({'acc1': meters['acc1'].global_avg, 'acc5': meters['acc5'].global_avg,
                        'loss': meters['loss'].global_avg, 'n': meters['acc1'].count})
    return results


def _print_scores(stats: Dict[str, float]) -> None:
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f}")


def evaluate(data_loader: Iterable, model: nn.Module, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             head: str = 'avg', print_freq: int = 10) -> Dict[str, float]:
    """Cross-entropy, top-1 and top-5 accuracy (%) of ``model`` on ``data_loader``, weighted by samples.

    Under distributed evaluation the sums are reduced over processes, and the padding that a
    DistributedSampler(drop_last=False) adds to even out the processes is not counted, so the result
    equals a single-process evaluation. Batches must follow the sampler's order, as torch's
    BatchSampler does.

    Args:
        amp_dtype: None (full precision), torch.float16 or torch.bfloat16.
        head: for a distilled model, 'avg' (both heads, the default), 'cls' or 'dist'; the model's
            previous choice is restored afterwards.

    Returns:
        {'acc1', 'acc5', 'loss', 'n'}, n being the number of samples counted.
    """
    stats, = _evaluate_models(data_loader, [model], device, amp_dtype, head, print_freq)
    _print_scores(stats)
    return stats


def evaluate_all(loader: Iterable, model: nn.Module, model_ema: Optional[nn.Module], device: torch.device,
                 amp_dtype: Optional[torch.dtype], head: str = 'avg') -> Dict[str, float]:
    """Evaluate ``model`` and, when given, its EMA (timm's ModelEmaV3: the weights in ``.module``); print the
    original's accuracy lines, the model's first; return their figures as 'test_*' and 'test_ema_*'.

    Both are scored in one pass over the batches, which are loaded once: the figures equal those of two
    evaluate() calls.
    """
    num_images = len(loader.dataset)
    evaluated = [model] + ([model_ema.module] if model_ema is not None else [])
    result = {}
    for stats, prefix, name in zip(_evaluate_models(loader, evaluated, device, amp_dtype, head, print_freq=10),
                                   ('test', 'test_ema'), ('network', 'model EMA')):
        _print_scores(stats)
        print(f'Accuracy of the {name} on the {num_images} test images: {stats["acc1"]:.1f}%')
        result.update({f'{prefix}_{k}': v for k, v in stats.items()})
    return result

"""Checkpoints of a run: what main.py writes each epoch, and how it resumes, finetunes or evaluates from one.

utils.save_on_master writes a file atomically and utils.load_checkpoint reads one with weights_only=True;
this module decides what goes in (weights, optimizer, schedule, scaler, EMA, epoch, args as a dict) and
puts it back into the objects of a run.
"""
import argparse
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from timm.scheduler import PlateauLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3

import models
import utils

# The flags that shape the learning rate schedule or scale its lr (builders.scaled_lr), as resume_schedule names them.
SCHEDULE_FLAGS = {k: f'--{k.replace("_", "-")}' for k in (
    'epochs', 'sched', 'lr', 'min_lr', 'warmup_epochs', 'warmup_lr', 'decay_epochs', 'cooldown_epochs',
    'patience_epochs', 'decay_rate', 'lr_noise', 'lr_noise_pct', 'lr_noise_std', 'unscale_lr', 'batch_size',
    'accum_iter')}
SCHEDULE_FLAGS.update(world_size='processes', actual_lr='actual lr')


def load_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str, strict: bool = True,
                 flag: str = '--model') -> Any:
    """model.load_state_dict, with its error (missing keys, shape mismatches) as one line naming ``source``
    and the flag (``flag``) that chose the model."""
    try:
        return model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as e:
        problems = [line.strip()[:200] for line in str(e).splitlines()[1:] if line.strip()]
        raise ValueError(f'{source} does not fit {type(model).__name__} ({"; ".join(problems[:3])}): '
                         f'check {flag}, --input-size and --nb-classes') from None


def load_finetune(model: nn.Module, path: str) -> None:
    """Initialise ``model`` from a checkpoint for finetuning.

    Classifier heads whose shape differs (another number of classes) are dropped, the patch part of
    ``pos_embed`` is resized to the model's grid (models.interpolate_pos_embed), and the keys left
    missing or unexpected are printed.
    """
    state_dict = dict(utils.weights_of(utils.load_checkpoint(path)))
    own = model.state_dict()
    classifier = getattr(model, 'pretrained_cfg', {}).get('classifier', 'head')
    prefixes = tuple(f'{c}.' for c in ((classifier,) if isinstance(classifier, str) else classifier))
    for key in list(state_dict):
        if key.startswith(prefixes) and key in own and state_dict[key].shape != own[key].shape:
            print(f'Removing key {key} from pretrained checkpoint (shape {tuple(state_dict[key].shape)}, '
                  f'the model has {tuple(own[key].shape)})')
            del state_dict[key]
    models.interpolate_pos_embed(model, state_dict)
    result = load_weights(model, state_dict, f'--finetune {path}', strict=False)
    print(f'Finetuning from {path}: missing keys {result.missing_keys}, unexpected keys {result.unexpected_keys}')


def restore(path: str, model: nn.Module, model_ema: Optional[ModelEmaV3], **training_state: Any) -> Dict[str, Any]:
    """Load weights from ``path``, and the training state too when the checkpoint holds one.

    Args:
        model: receives checkpoint['model'] (strict).
        model_ema: receives checkpoint['model_ema'], else a copy of the loaded weights.
        training_state: objects with load_state_dict, by checkpoint key (optimizer, lr_scheduler, scaler);
            loaded only when the checkpoint is one of a training run (official files hold weights only).

    Returns:
        {'ema_loaded': bool} plus, after a training checkpoint, 'start_epoch', 'start_step' (the step of
        that epoch to continue at), 'start_sums' (this process's figures of that epoch so far, for
        engine.train_one_epoch; None), 'max_accuracy', and for resume_schedule the checkpoint's 'lr_scheduler'
        state and 'args' (a dict; a Namespace in the original's checkpoints; None when absent).
    """
    checkpoint = utils.load_checkpoint(path)
    load_weights(model, utils.weights_of(checkpoint), f'--resume {path}')
    result: Dict[str, Any] = {'ema_loaded': 'model_ema' in checkpoint}
    if model_ema is not None:
        if 'model_ema' in checkpoint:
            load_weights(model_ema.module, checkpoint['model_ema'], f'--resume {path} (model_ema)')
        else:
            model_ema.set(model)
    if training_state and all(k in checkpoint for k in ('optimizer', 'lr_scheduler', 'epoch')):
        for key, obj in training_state.items():
            if checkpoint.get(key):  # a disabled GradScaler (CPU, bf16, float32) saved an empty state
                obj.load_state_dict(checkpoint[key])
        result['start_epoch'] = checkpoint['epoch'] + 1
        result['start_step'] = checkpoint.get('resume_step', 0)  # a checkpoint written on a stop request
        result['start_sums'] = _resumed_sums(checkpoint, path)
        result['max_accuracy'] = checkpoint.get('max_accuracy', -math.inf)
        result['lr_scheduler'], result['args'] = checkpoint['lr_scheduler'], checkpoint.get('args')
        print(f'Resumed from {path}: epoch {checkpoint["epoch"]} done, continuing at epoch {result["start_epoch"]}'
              + (f', step {result["start_step"]}' if result['start_step'] else ''))
    return result


def _resumed_sums(checkpoint: Dict[str, Any], path: str) -> Optional[Dict[str, Any]]:
    """This process's figures of the epoch that a stop interrupted (engine.TrainingStopped.sums), saved one per
    process; None from a checkpoint of a complete epoch, or one written by another number of processes."""
    sums = checkpoint.get('resume_sums')
    if sums is None:
        return None
    if len(sums) != utils.get_world_size():
        print(f'Note: {path} was written by {len(sums)} process(es) and this run has {utils.get_world_size()}: the '
              f'train_loss and train_lr of epoch {checkpoint["epoch"] + 1} average its batches from step '
              f'{checkpoint["resume_step"]} on only')
        return None
    return sums[utils.get_rank()]


def resume_schedule(lr_scheduler: Scheduler, optimizer: torch.optim.Optimizer, saved_state: Dict[str, Any],
                    saved_args: Any, args: argparse.Namespace) -> None:
    """Resume with the schedule of the command line (``lr_scheduler``, built from ``args``), not the checkpoint's.

    A resumed run then trains as a run of the resumed command from the start would, also one that extends
    --epochs: the checkpoint's schedule ended at its own --epochs and would train the added epochs at --min-lr.
    timm's train.py rebuilds its schedule from the command line likewise. timm's schedules are functions of
    the epoch: main.py evaluates this one at the resumed epoch. The flags that differ from the checkpoint's are
    printed in one line; for a checkpoint of the original (its lr already scaled, no actual_lr), the scaled lr
    is compared with this run's ('actual lr').
    """
    saved = vars(saved_args) if isinstance(saved_args, argparse.Namespace) else dict(saved_args or {})
    if 'lr' in saved and 'actual_lr' not in saved:
        saved = _original_schedule_args(saved)
    changed = [f'{SCHEDULE_FLAGS[k]} {saved[k]} -> {getattr(args, k)}' for k in SCHEDULE_FLAGS
               if k in saved and saved[k] != getattr(args, k)]
    if changed:
        print(f'Resuming with a new schedule: {", ".join(changed)}')
    plateau = isinstance(lr_scheduler, PlateauLRScheduler)
    if plateau and 'best' in saved_state:
        # The plateau schedule is a function of the metrics seen, not of the epoch: no command line can replay
        # it. What the run learnt stays (the best metric, and the lr decayed so far, in the optimizer's param
        # groups); the new flags (patience, decay rate, min lr) act from the resumed epoch on, and --epochs does
        # not shape this schedule, so extending a plateau run is exact. timm does not save its bad-epoch counter:
        # the patience counts afresh.
        lr_scheduler.load_state_dict(saved_state)
    for group, base in zip(optimizer.param_groups, lr_scheduler.base_values):
        if plateau:  # a new lr scaling (--lr, batch, processes) applies to the decayed lr as it would have
            group['lr'] *= base / group.get('initial_lr', base)
        group['initial_lr'] = base  # the restored optimizer keeps the checkpoint's; the schedule uses this one


def _original_schedule_args(saved: Dict[str, Any]) -> Dict[str, Any]:
    """The schedule flags of one of the original's checkpoints, in this codebase's terms, so that like is compared
    with like: the original overwrote args.lr with the lr it trained at (scaled, unless --unscale-lr), which is
    our actual_lr; and its --cooldown-epochs (10 by default) shaped nothing, as its loop ended at --epochs."""
    saved = {k: v for k, v in saved.items() if k != 'cooldown_epochs'}
    saved['actual_lr'] = saved.pop('lr')
    return saved


def training_checkpoint(epoch: int, model: nn.Module, model_ema: Optional[ModelEmaV3], args: argparse.Namespace,
                        max_accuracy: float, classes: List[str], **training_state: Any) -> Dict[str, Any]:
    """What restore() resumes from: the weights, the state_dicts of ``training_state`` (optimizer,
    lr_scheduler, scaler) by key, and ``epoch``, the last complete epoch."""
    checkpoint = {'model': model.state_dict(), **{k: obj.state_dict() for k, obj in training_state.items()},
                  'epoch': epoch, 'args': dict(vars(args)), 'max_accuracy': max_accuracy, 'classes': list(classes)}
    if model_ema is not None:
        checkpoint['model_ema'] = model_ema.module.state_dict()
    return checkpoint


def save_epoch(output_dir: Path, log_stats: Dict[str, Any], checkpoint: Dict[str, Any], is_best: bool,
               latest: bool = True) -> None:
    """End of an epoch, on the master process: its line in log.txt, then best_checkpoint.pth when ``is_best``,
    then checkpoint.pth when ``latest`` (main.py --checkpoint-every).

    The line goes first: a kill in between leaves the line of an epoch that the resumed run trains and logs
    again (drop_log_lines_from), never a resumed epoch without its line. best_checkpoint.pth goes before
    checkpoint.pth, since a run resumed from the latter would not save this best again.
    """
    if utils.is_main_process():
        with (output_dir / 'log.txt').open('a') as f:
            f.write(json.dumps(log_stats) + '\n')
    if is_best:
        utils.save_on_master(checkpoint, str(output_dir / 'best_checkpoint.pth'))
    if latest:
        utils.save_on_master(checkpoint, str(output_dir / 'checkpoint.pth'))


def drop_log_lines_from(log: Path, epoch: int) -> None:
    """Drop the lines of ``log`` (log.txt) of epochs >= ``epoch``, which this run trains again.

    Each epoch's line is written before its checkpoint, so a kill between the two leaves the line of an
    epoch that the resumed run trains and logs again; a line cut short by a kill goes too. Nothing is
    rewritten when nothing is dropped, and the rewrite is atomic.
    """
    if not log.exists():
        return

    def kept(line: str) -> bool:
        if not line.endswith('\n'):
            return False
        try:
            return json.loads(line)['epoch'] < epoch
        except (ValueError, KeyError, TypeError):  # not a line of this code's: not for it to judge
            return True

    lines = log.read_text().splitlines(keepends=True)
    keep = [line for line in lines if kept(line)]
    if len(keep) < len(lines):
        tmp = log.with_name(f'.{log.name}.tmp')
        tmp.write_text(''.join(keep))
        os.replace(tmp, log)
        print(f'{log}: dropped {len(lines) - len(keep)} line(s) of epochs from {epoch} on, which this run trains again')

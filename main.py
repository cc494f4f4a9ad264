"""DeiT training and evaluation: train (optionally with a teacher), --eval, --finetune, --resume.

    python main.py --eval --resume https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth \
        --data-path /path/to/imagenet
    torchrun --nproc_per_node=4 main.py --model deit_small_patch16_224 --batch-size 256 \
        --data-path /path/to/imagenet --output_dir /path/to/save

See README.md for every flow; ``python main.py --help`` lists the flags with their defaults.

Exit status: 0 done; 1 the run failed (a non-finite loss); 2 a user error (a bad flag, file, dataset or
checkpoint), reported in one line unless --debug; 3 stopped by SIGTERM / SIGUSR1 after saving a checkpoint,
from which the same command continues.
"""
import argparse
import atexit
import datetime
import itertools
import json
import math
import multiprocessing
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import get_pretrained_cfg
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler

import models
import utils
from datasets import DATA_SETS, INAT_CATEGORIES, CorruptImageError, build_dataset
from engine import NonFiniteLossError, TrainingStopped, evaluate, train_one_epoch
from losses import DISTILLATION_TYPES, DistillationLoss
from samplers import RASampler

# Schedulers whose length timm extends by --cooldown-epochs (the others have no end to cool down after).
CYCLIC_SCHEDULERS = ('cosine', 'tanh', 'poly')
SCHEDULERS = CYCLIC_SCHEDULERS + ('step', 'constant', 'plateau')

# Exit statuses of `python main.py` (see the module docstring); 1 is also Python's for an uncaught exception.
EXIT_FAILED, EXIT_USER_ERROR, EXIT_STOPPED = 1, 2, 3
# What main() reports in one line: mistakes in flags, files, data or checkpoints (CheckpointError is a ValueError).
USER_ERRORS = (ValueError, FileNotFoundError, CorruptImageError)
# What schedulers send before they end a job (Slurm, Kubernetes, torchrun's agent: SIGTERM). SIGUSR2 stays
# free for submitit's requeue.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def get_args_parser() -> argparse.ArgumentParser:
    """The flags of the original DeiT main.py (same spelling, type and default) and this codebase's additions.

    Built with add_help=False so that run_with_submitit.py can extend it through ``parents=[...]``.
    """
    parser = argparse.ArgumentParser('DeiT training and evaluation script', add_help=False)

    group = parser.add_argument_group('Batch and epochs')
    group.add_argument('--batch-size', default=64, type=int,
                       help='batch size per process (default: %(default)s); the learning rate scales with the '
                            'total batch, see --lr')
    group.add_argument('--epochs', default=300, type=int, help='number of training epochs (default: %(default)s)')
    group.add_argument('--bce-loss', action='store_true',
                       help='binary cross-entropy on the (mixed) one-hot targets instead of cross-entropy, '
                            'as DeiT III (default: off)')
    group.add_argument('--unscale-lr', action='store_true',
                       help='use --lr as given instead of scaling it by total batch / 512 (default: off)')

    group = parser.add_argument_group('Model')
    group.add_argument('--model', default='deit_base_patch16_224', type=str, metavar='MODEL',
                       help='model to train: one of the eight DeiT models or any timm model (default: %(default)s)')
    group.add_argument('--input-size', default=224, type=int, help='image side fed to the model (default: %(default)s)')
    group.add_argument('--nb-classes', default=None, type=int,
                       help='number of classes of the classifier (default: the number of classes of the dataset)')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate (default: %(default)s)')
    group.add_argument('--drop-path', type=float, default=0.1, metavar='PCT',
                       help='stochastic depth (drop path) rate (default: %(default)s)')
    group.add_argument('--model-ema', action='store_true',
                       help='keep an exponential moving average of the weights, evaluated every epoch (default: on)')
    group.add_argument('--no-model-ema', action='store_false', dest='model_ema', help='no weight EMA')
    parser.set_defaults(model_ema=True)
    group.add_argument('--model-ema-decay', type=float, default=0.99996,
                       help='EMA decay per optimizer step (default: %(default)s)')
    group.add_argument('--model-ema-force-cpu', action='store_true',
                       help='keep the EMA on the CPU to save GPU memory; it is then not evaluated during training '
                            '(default: off)')
    group.add_argument('--eval-head', default='avg', choices=models.EVAL_HEADS,
                       help='what a distilled model is evaluated with: the average of both heads, the class head or '
                            'the distillation head, as compared in the paper\'s Table 5 (default: %(default)s)')

    group = parser.add_argument_group('Optimizer')
    group.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER',
                       help='optimizer, any of timm.optim.list_optimizers() (default: %(default)s)')
    group.add_argument('--opt-eps', default=1e-8, type=float, metavar='EPSILON',
                       help='optimizer epsilon (default: %(default)s)')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA',
                       help='optimizer betas (default: the optimizer\'s own)')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM',
                       help='clip the gradient norm to this value (default: no clipping); 1.0 can help when the '
                            'loss spikes')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M',
                       help='momentum of SGD-like optimizers (default: %(default)s)')
    group.add_argument('--weight-decay', type=float, default=0.05, help='weight decay (default: %(default)s)')

    group = parser.add_argument_group('Learning rate schedule')
    group.add_argument('--sched', default='cosine', type=str, metavar='SCHEDULER', choices=SCHEDULERS,
                       help=f'learning rate schedule, one of {", ".join(SCHEDULERS)} (default: %(default)s)')
    group.add_argument('--lr', type=float, default=5e-4, metavar='LR',
                       help='base learning rate for a total batch of 512; the optimizer gets lr * batch-size * '
                            'processes / 512 unless --unscale-lr (default: %(default)s)')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                       help='learning rate noise on/off epoch fractions (default: no noise)')
    group.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT',
                       help='learning rate noise limit percent (default: %(default)s)')
    group.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV',
                       help='learning rate noise std-dev (default: %(default)s)')
    group.add_argument('--warmup-lr', type=float, default=1e-6, metavar='LR',
                       help='learning rate at the start of the warmup (default: %(default)s)')
    group.add_argument('--min-lr', type=float, default=1e-5, metavar='LR',
                       help='lower bound of the learning rate for schedules that decay to it (default: %(default)s)')
    group.add_argument('--decay-epochs', type=float, default=30, metavar='N',
                       help='epochs between decays of the step schedule (default: %(default)s)')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N',
                       help='epochs of linear warmup (default: %(default)s)')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N',
                       help='epochs at --min-lr added after the cosine / tanh / poly schedule ends (default: '
                            '%(default)s; the original parsed 10 but never trained them, so 0 keeps its schedule)')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N',
                       help='epochs without improvement before the plateau schedule decays (default: %(default)s)')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE',
                       help='learning rate decay factor of the step and plateau schedules (default: %(default)s)')

    group = parser.add_argument_group('Augmentation')
    group.add_argument('--color-jitter', type=float, default=0.3, metavar='PCT',
                       help='color jitter factor, unused while RandAugment is on (default: %(default)s)')
    group.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME',
                       help='RandAugment / AutoAugment policy, "none" to disable (default: %(default)s)')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing (default: %(default)s)')
    group.add_argument('--train-interpolation', type=str, default='bicubic',
                       help='training interpolation: random, bilinear or bicubic (default: %(default)s)')
    group.add_argument('--repeated-aug', action='store_true', default=None,
                       help='repeated augmentation, each image 3 times per epoch on different processes (default: '
                            'on when distributed, as the original; give it to use it in a single process too)')
    group.add_argument('--no-repeated-aug', action='store_false', dest='repeated_aug', help='no repeated augmentation')
    group.add_argument('--train-mode', action='store_true',
                       help='train with the model in training mode (dropout, drop path on) (default: on)')
    group.add_argument('--no-train-mode', action='store_false', dest='train_mode',
                       help='train with the model in eval mode')
    parser.set_defaults(train_mode=True)
    group.add_argument('--ThreeAugment', '--three-augment', action='store_true',
                       help='DeiT III\'s 3-Augment instead of RandAugment and random erasing (default: off)')
    group.add_argument('--src', action='store_true',
                       help='simple random crop (resize, padded random crop) instead of RandomResizedCrop '
                            '(default: off)')
    group.add_argument('--reprob', type=float, default=0.25, metavar='PCT',
                       help='random erasing probability (default: %(default)s)')
    group.add_argument('--remode', type=str, default='pixel', help='random erasing mode (default: %(default)s)')
    group.add_argument('--recount', type=int, default=1, help='random erasing count (default: %(default)s)')
    group.add_argument('--resplit', action='store_true',
                       help='not supported: it spares the clean split of AugMix augmentation splits from random '
                            'erasing, and DeiT uses no augmentation splits (the original ignored it)')

    group = parser.add_argument_group('Mixup and CutMix')
    group.add_argument('--mixup', type=float, default=0.8,
                       help='mixup alpha, mixup enabled if > 0 (default: %(default)s)')
    group.add_argument('--cutmix', type=float, default=1.0,
                       help='cutmix alpha, cutmix enabled if > 0 (default: %(default)s)')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                       help='cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)')
    group.add_argument('--mixup-prob', type=float, default=1.0,
                       help='probability of mixup or cutmix per batch (default: %(default)s)')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                       help='probability of cutmix instead of mixup when both are on (default: %(default)s)')
    group.add_argument('--mixup-mode', type=str, default='batch', choices=('batch', 'pair', 'elem'),
                       help='mix per batch, pair or element (default: %(default)s)')

    group = parser.add_argument_group('Distillation')
    group.add_argument('--teacher-model', default='regnety_160', type=str, metavar='MODEL',
                       help='teacher: any timm model or a model of this codebase (default: %(default)s)')
    group.add_argument('--teacher-path', type=str, default='',
                       help='teacher weights: a file or https URL, official format ({"model": ...}) or a '
                            'checkpoint.pth of this codebase (default: none)')
    group.add_argument('--distillation-type', default='none', choices=DISTILLATION_TYPES, type=str,
                       help='distillation through the distillation token (default: %(default)s)')
    group.add_argument('--distillation-alpha', default=0.5, type=float,
                       help='weight of the distillation term (default: %(default)s)')
    group.add_argument('--distillation-tau', default=1.0, type=float,
                       help='temperature of soft distillation (default: %(default)s)')

    group = parser.add_argument_group('Finetuning')
    group.add_argument('--finetune', default='',
                       help='initialise from this checkpoint (file or https URL): heads of another shape are '
                            'dropped, the position embedding is resized to --input-size (default: none)')
    group.add_argument('--attn-only', action='store_true',
                       help='train only the attention layers, embeddings, extra tokens and heads (default: off)')

    group = parser.add_argument_group('Data and run')
    group.add_argument('--data-path', default='/datasets01/imagenet_full_size/061417/', type=str,
                       help='dataset folder (default: %(default)s, the original\'s)')
    group.add_argument('--data-set', default='IMNET', choices=DATA_SETS, type=str,
                       help='dataset; DIGITS is built in and needs no download (default: %(default)s)')
    group.add_argument('--inat-category', default='name', choices=INAT_CATEGORIES, type=str,
                       help='iNaturalist label level (default: %(default)s)')
    group.add_argument('--skip-corrupt', action='store_true',
                       help='skip unreadable image files instead of stopping (default: off)')
    group.add_argument('--output_dir', '--output-dir', default='',
                       help='where to write checkpoints and logs; a checkpoint.pth found there is resumed '
                            '(default: no output)')
    group.add_argument('--seed', default=0, type=int, help='random seed (default: %(default)s)')
    group.add_argument('--debug', action='store_true',
                       help='show the traceback of errors that are otherwise reported in one line (default: off)')
    group.add_argument('--resume', default='',
                       help='checkpoint (file or https URL) to resume training from, or to evaluate with --eval '
                            '(default: none)')
    group.add_argument('--start_epoch', '--start-epoch', default=0, type=int, metavar='N',
                       help='first epoch, when not resuming (default: %(default)s)')
    group.add_argument('--eval', action='store_true', help='evaluate only (default: off)')
    group.add_argument('--eval-crop-ratio', default=0.875, type=float,
                       help='center-crop ratio of evaluation (default: %(default)s)')
    group.add_argument('--dist-eval', action='store_true',
                       help='split the evaluation over the processes instead of evaluating on each (default: off)')

    group = parser.add_argument_group('Hardware and speed')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                       help='device to use, cuda or cpu (default: cuda when a GPU is present, else cpu; '
                            'here %(default)s)')
    group.add_argument('--precision', default='auto', choices=('auto', 'fp16', 'bf16', 'off'),
                       help='mixed precision: auto is fp16 on CUDA (the original\'s) and off (float32) on the CPU '
                            '(default: %(default)s)')
    group.add_argument('--compile', action='store_true', help='torch.compile the model (default: off)')
    group.add_argument('--channels-last', action='store_true',
                       help='keep the (convnet) teacher in channels_last memory format (default: off)')
    group.add_argument('--fused', action=argparse.BooleanOptionalAction, default=None,
                       help='fused Adam / AdamW kernel (default: on with CUDA and --opt adam / adamw)')
    group.add_argument('--num_workers', '--num-workers', default=10, type=int,
                       help='data loading processes per training process (default: %(default)s)')
    group.add_argument('--pin-mem', action='store_true',
                       help='pin CPU memory in the data loader for faster transfer to the GPU (default: on; '
                            'used only with a GPU)')
    group.add_argument('--no-pin-mem', action='store_false', dest='pin_mem', help='do not pin memory')
    parser.set_defaults(pin_mem=True)
    group.add_argument('--persistent-workers', action='store_true',
                       help='keep the data loading processes between epochs (default: off)')

    group = parser.add_argument_group('Distributed')
    group.add_argument('--world_size', '--world-size', default=1, type=int,
                       help='number of processes; set by the launcher (torchrun, Slurm) (default: %(default)s)')
    group.add_argument('--dist_url', '--dist-url', default='env://',
                       help='rendezvous of the process group (default: %(default)s)')
    return parser


# ============ helpers ============


def check_args(args: argparse.Namespace) -> None:
    """Refuse combinations of flags that cannot work, with a message that says what to do."""
    if args.batch_size < 1 or args.epochs < 1:
        raise ValueError('--batch-size and --epochs must be positive')
    if args.resplit:
        raise ValueError('--resplit applies to AugMix augmentation splits, which DeiT does not use; drop the flag')
    if args.cooldown_epochs and args.sched not in CYCLIC_SCHEDULERS:
        raise ValueError(f'--cooldown-epochs extends the {", ".join(CYCLIC_SCHEDULERS)} schedules, not --sched '
                         f'{args.sched}')
    if args.persistent_workers and args.num_workers == 0:
        raise ValueError('--persistent-workers keeps data loading processes, and --num_workers 0 starts none')
    if args.fused and args.opt.lower() not in ('adam', 'adamw'):
        raise ValueError(f'--fused is a kernel of torch\'s Adam / AdamW, not of --opt {args.opt}')
    if torch.device(args.device).type == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda, but no GPU is visible: use --device cpu')
    if not args.eval:
        if args.distillation_type != 'none' and not args.teacher_path:
            raise ValueError(f'--distillation-type {args.distillation_type} needs --teacher-path: the weights of '
                             f'--teacher-model {args.teacher_model} trained on this dataset (file or https URL)')
        if args.bce_loss and mixup_active(args) and args.smoothing > 0:
            raise ValueError('--bce-loss binarises the mixed targets as the original, and label smoothing gives every '
                             'class a share of them: add --smoothing 0 (DeiT III\'s setting) or drop --bce-loss')
        if mixup_active(args) and args.batch_size % 2:
            raise ValueError(f'mixup / cutmix pair up the images of a batch: use an even --batch-size '
                             f'(got {args.batch_size}), or --mixup 0 --cutmix 0')
    check_models(args)


def check_models(args: argparse.Namespace) -> None:
    """Refuse an unknown --model or --teacher-model, an --input-size that the patches do not tile, or
    distillation into a model without distillation token.

    The models are built on the meta device: no memory, no weights, a fraction of a second, before any data.
    """
    distilling = not args.eval and args.distillation_type != 'none'
    names = [('--model', args.model)] + ([('--teacher-model', args.teacher_model)] if distilling else [])
    for flag, name in names:
        try:
            with torch.device('meta'):
                model = create_model(name, args.input_size, num_classes=args.nb_classes or 1000)
        except ValueError as e:
            raise ValueError(f'{flag}: {e}') from None
        patch_size = getattr(getattr(model, 'patch_embed', None), 'patch_size', None)
        if patch_size and any(args.input_size % p for p in patch_size):
            p = patch_size[0]
            raise ValueError(f'--input-size {args.input_size} is not a multiple of the patch size {p} of {flag} '
                             f'{name}: use a multiple of it, e.g. {max(p, round(args.input_size / p) * p)}')
        if flag == '--model' and distilling and not isinstance(model, models.DistilledVisionTransformer):
            raise ValueError(f'--distillation-type {args.distillation_type} trains the distillation token, and '
                             f'--model {name} has none: use a *_distilled_* model (e.g. '
                             'deit_base_distilled_patch16_224) or --distillation-type none')


def check_paths(args: argparse.Namespace) -> None:
    """Refuse a missing checkpoint file or an --output_dir that cannot be written, before any data is read."""
    teacher_path = args.teacher_path if not args.eval and args.distillation_type != 'none' else ''
    for flag, path in (('--resume', args.resume), ('--finetune', args.finetune), ('--teacher-path', teacher_path)):
        if path and not path.startswith(('https://', 'http://')) and not os.path.isfile(path):
            raise utils.CheckpointError(f'{flag} {path}: no such file')
    if args.output_dir and not args.eval:
        existing = Path(args.output_dir).absolute()
        while not existing.exists():  # the folder is made when training starts: its nearest existing parent
            existing = existing.parent
        if not existing.is_dir():
            raise ValueError(f'--output_dir {args.output_dir}: {existing} is a file, not a folder: choose another '
                             '--output_dir')
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f'--output_dir {args.output_dir}: {existing} is not writable: choose another '
                             '--output_dir, or make it writable')


def mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def git_revision() -> str:
    """The checkout's commit, marked when files differ from it; 'unknown' outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*cmd: str) -> str:
        return subprocess.run(['git', *cmd], cwd=here, capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha = git('rev-parse', 'HEAD')
        return sha + (' (with uncommitted changes)' if git('status', '--porcelain', '--untracked-files=no') else '')
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def seed_everything(*seeds: int) -> None:
    """Seed torch, numpy and random from a tuple such as (seed, rank, epoch), each tuple its own stream."""
    seed = int(np.random.SeedSequence(list(seeds)).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def amp_dtype_of(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """--precision as an autocast dtype; None is full precision. auto: fp16 on CUDA, as the original."""
    if precision == 'auto':
        precision = 'fp16' if device.type == 'cuda' else 'off'
    return {'fp16': torch.float16, 'bf16': torch.bfloat16, 'off': None}[precision]


def scaled_lr(args: argparse.Namespace) -> float:
    """The learning rate the optimizer gets: --lr for a total batch of 512, scaled linearly (Goyal et al.)."""
    if args.unscale_lr:
        return args.lr
    return args.lr * args.batch_size * utils.get_world_size() / 512.0


def build_data(args: argparse.Namespace, device: torch.device
               ) -> Tuple[Optional[Dataset], Dataset, Optional[DataLoader], DataLoader, int]:
    """Datasets and loaders (no training set with --eval) and the number of classes of the classifier."""
    dataset_val, nb_classes = build_dataset(is_train=False, args=args)
    dataset_train = None if args.eval else build_dataset(is_train=True, args=args)[0]
    if args.nb_classes is not None and args.nb_classes < nb_classes:
        raise ValueError(f'--nb-classes {args.nb_classes} is below the {nb_classes} classes of --data-set '
                         f'{args.data_set}')
    nb_classes = args.nb_classes or nb_classes

    world_size, rank = utils.get_world_size(), utils.get_rank()
    if args.distributed and args.dist_eval:
        if len(dataset_val) % world_size:
            print(f'Note: the {len(dataset_val)} evaluation images do not split evenly over {world_size} processes; '
                  'the padding images of the sampler are not counted.')
        sampler_val = DistributedSampler(dataset_val, num_replicas=world_size, rank=rank, shuffle=False)
    else:
        sampler_val = SequentialSampler(dataset_val)
    loader_kwargs = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and device.type == 'cuda',
                         persistent_workers=args.persistent_workers, worker_init_fn=ignore_stop_signals)
    if args.num_workers:
        atexit.unregister(end_workers_at_exit)  # registered once, after multiprocessing's handler: runs before it
        atexit.register(end_workers_at_exit)
    loader_val = DataLoader(dataset_val, sampler=sampler_val, batch_size=int(1.5 * args.batch_size),
                            drop_last=False, **loader_kwargs)
    if dataset_train is None:
        return None, dataset_val, None, loader_val, nb_classes

    repeated_aug = args.distributed if args.repeated_aug is None else args.repeated_aug
    if repeated_aug:
        sampler_train = RASampler(dataset_train, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    elif args.distributed:
        sampler_train = DistributedSampler(dataset_train, num_replicas=world_size, rank=rank, shuffle=True,
                                           seed=args.seed)
    else:
        sampler_train = RandomSampler(dataset_train)  # draws from torch's generator, which each epoch re-seeds
    print(f'Training sampler: {type(sampler_train).__name__}')
    loader_train = DataLoader(dataset_train, sampler=sampler_train, batch_size=args.batch_size, drop_last=True,
                              **loader_kwargs)
    return dataset_train, dataset_val, loader_train, loader_val, nb_classes


def build_optimizer(args: argparse.Namespace, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """timm's optimizer factory at the scaled lr (args.actual_lr); the fused Adam / AdamW kernel on CUDA."""
    fused = args.fused if args.fused is not None else device.type == 'cuda' and args.opt.lower() in ('adam', 'adamw')
    kwargs = dict(optimizer_kwargs(args), lr=args.actual_lr)
    if fused:
        kwargs['fused'] = True
    return create_optimizer_v2(model, **kwargs)


def create_model(name: str, input_size: int, **kwargs: Any) -> nn.Module:
    """models.build_model, at ``input_size`` for models built for one input size (ViTs); convnets take any."""
    cfg = get_pretrained_cfg(name)
    if name in models.DEIT_MODELS or (cfg is not None and cfg.fixed_input_size):
        kwargs['img_size'] = input_size
    return models.build_model(name, **kwargs)


def weights_of(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The model weights of an official file ({'model': ...}), a checkpoint of this codebase, or a bare state_dict."""
    return checkpoint['model'] if 'model' in checkpoint else checkpoint


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
    state_dict = dict(weights_of(utils.load_checkpoint(path)))
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


def train_attention_only(model: nn.Module, name: str) -> None:
    """--attn-only: freeze all but attention, position embedding, patch embedding, extra tokens and heads."""
    if not any('.attn.' in n for n, _ in model.named_parameters()):
        raise ValueError(f'--attn-only trains the attention layers, and --model {name} has none')
    kept = ('pos_embed', 'cls_token', 'dist_token', 'patch_embed.', 'head.', 'head_dist.')
    for n, p in model.named_parameters():
        p.requires_grad = '.attn.' in n or n.startswith(kept)


def build_teacher(args: argparse.Namespace, nb_classes: int, device: torch.device) -> nn.Module:
    """--teacher-model with the weights of --teacher-path, in eval mode on ``device``."""
    teacher = create_model(args.teacher_model, args.input_size, num_classes=nb_classes)
    load_weights(teacher, weights_of(utils.load_checkpoint(args.teacher_path)), f'--teacher-path {args.teacher_path}',
                 flag='--teacher-model')
    memory_format = torch.channels_last if args.channels_last else torch.preserve_format
    return teacher.to(device, memory_format=memory_format).eval()


def base_criterion(args: argparse.Namespace) -> nn.Module:
    """The original's choice: soft-target CE under mixup / cutmix, label smoothing, plain CE, or BCE."""
    if args.bce_loss:
        # As the original (DeiT III): mixed targets are binarised, every class in the mix a positive
        # (targets.gt(0.0)). Class indices (no mixup, where the original crashed) are one-hot encoded,
        # with label smoothing.
        return BinaryCrossEntropy(smoothing=args.smoothing, target_threshold=0.0 if mixup_active(args) else None)
    if mixup_active(args):
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def restore(path: str, model: nn.Module, model_ema: Optional[ModelEmaV3], **training_state: Any) -> Dict[str, Any]:
    """Load weights from ``path``, and the training state too when the checkpoint holds one.

    Args:
        model: receives checkpoint['model'] (strict).
        model_ema: receives checkpoint['model_ema'], else a copy of the loaded weights.
        training_state: objects with load_state_dict, by checkpoint key (optimizer, lr_scheduler, scaler);
            loaded only when the checkpoint is one of a training run (official files hold weights only).

    Returns:
        {'ema_loaded': bool} plus, after a training checkpoint, 'start_epoch', 'start_step' (the step of
        that epoch to continue at) and 'max_accuracy'.
    """
    checkpoint = utils.load_checkpoint(path)
    load_weights(model, weights_of(checkpoint), f'--resume {path}')
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
        result['max_accuracy'] = checkpoint.get('max_accuracy', -math.inf)
        print(f'Resumed from {path}: epoch {checkpoint["epoch"]} done, continuing at epoch {result["start_epoch"]}'
              + (f', step {result["start_step"]}' if result['start_step'] else ''))
    return result


def training_checkpoint(epoch: int, model: nn.Module, model_ema: Optional[ModelEmaV3], args: argparse.Namespace,
                        max_accuracy: float, classes: List[str], **training_state: Any) -> Dict[str, Any]:
    """What restore() resumes from: the weights, the state_dicts of ``training_state`` (optimizer,
    lr_scheduler, scaler) by key, and ``epoch``, the last complete epoch."""
    checkpoint = {'model': model.state_dict(), **{k: obj.state_dict() for k, obj in training_state.items()},
                  'epoch': epoch, 'args': dict(vars(args)), 'max_accuracy': max_accuracy, 'classes': list(classes)}
    if model_ema is not None:
        checkpoint['model_ema'] = model_ema.module.state_dict()
    return checkpoint


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
    the epoch's seed (and set_epoch) fixes, as for the interrupted run."""
    return DataLoader(loader.dataset, sampler=_SkipFirst(loader.sampler, num_batches * loader.batch_size),
                      batch_size=loader.batch_size, drop_last=loader.drop_last, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                      persistent_workers=loader.persistent_workers)


def evaluate_all(args: argparse.Namespace, loader: DataLoader, model: nn.Module, model_ema: Optional[ModelEmaV3],
                 device: torch.device, amp_dtype: Optional[torch.dtype]) -> Dict[str, float]:
    """Evaluate the model and, when given, its EMA; print the original's accuracy lines; return 'test_*' stats."""
    num_images = len(loader.dataset)
    stats = evaluate(loader, model, device, amp_dtype, head=args.eval_head)
    print(f'Accuracy of the network on the {num_images} test images: {stats["acc1"]:.1f}%')
    result = {f'test_{k}': v for k, v in stats.items()}
    if model_ema is not None:
        ema_stats = evaluate(loader, model_ema.module, device, amp_dtype, head=args.eval_head)
        print(f'Accuracy of the model EMA on the {num_images} test images: {ema_stats["acc1"]:.1f}%')
        result.update({f'test_ema_{k}': v for k, v in ema_stats.items()})
    return result


# ============ main ============


def main(args: argparse.Namespace) -> None:
    """Train, finetune or evaluate as the flags say (see get_args_parser)."""
    check_args(args)
    check_paths(args)
    utils.init_distributed_mode(args)
    print(f'git revision: {git_revision()}')
    print('\n'.join(f'{k}: {v}' for k, v in sorted(vars(args).items())))
    device = torch.device(args.device)
    print(f'Device: {device}')
    seed_everything(args.seed + utils.get_rank())
    torch.backends.cudnn.benchmark = True
    amp_dtype = amp_dtype_of(args.precision, device)
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None and not args.resume and (output_dir / 'checkpoint.pth').exists():
        args.resume = str(output_dir / 'checkpoint.pth')
        print(f'Found {args.resume}: resuming from it (pass --resume to choose another checkpoint)')

    # ============ preparing data ============
    dataset_train, dataset_val, loader_train, loader_val, nb_classes = build_data(args, device)

    # ============ building the model ============
    print(f'Creating model: {args.model}')
    model = create_model(args.model, args.input_size, num_classes=nb_classes, drop_rate=args.drop,
                         drop_path_rate=args.drop_path)
    if args.finetune:
        load_finetune(model, args.finetune)
    if args.attn_only:
        train_attention_only(model, args.model)
    model.to(device)
    model_without_ddp = model
    if args.distributed:
        model = DistributedDataParallel(model, device_ids=[args.gpu] if device.type == 'cuda' else None)
    # After DDP, which broadcasts rank 0's weights: every process's EMA starts from the same weights.
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model_without_ddp, decay=args.model_ema_decay,
                               device=torch.device('cpu') if args.model_ema_force_cpu else None)
    # The EMA is evaluated where it lives with the model (not with --model-ema-force-cpu on a GPU).
    ema_on_device = model_ema is not None and next(model_ema.parameters()).device == next(model.parameters()).device
    if args.compile:
        model = torch.compile(model)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    print(f'number of params: {n_parameters}')

    # ============ evaluating only ============
    if args.eval:
        ema_loaded = restore(args.resume, model_without_ddp, model_ema)['ema_loaded'] if args.resume else False
        evaluate_all(args, loader_val, model, model_ema if ema_loaded and ema_on_device else None, device, amp_dtype)
        return

    # ============ building the optimizer, schedule and loss ============
    args.actual_lr = scaled_lr(args)
    total_batch = args.batch_size * utils.get_world_size()
    print(f'base lr: {args.lr:.2e}  actual lr: {args.actual_lr:.2e}  (total batch {total_batch}, '
          f'{"--unscale-lr" if args.unscale_lr else "lr * total batch / 512"})')
    optimizer = build_optimizer(args, model_without_ddp, device)
    lr_scheduler, num_epochs = create_scheduler(args, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    mixup_fn = None
    if mixup_active(args):
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=nb_classes)
    teacher = build_teacher(args, nb_classes, device) if args.distillation_type != 'none' else None
    criterion = DistillationLoss(base_criterion(args), teacher, args.distillation_type, args.distillation_alpha,
                                 args.distillation_tau)

    # ============ resuming ============
    max_accuracy, start_step = -math.inf, 0
    if args.resume:
        state = restore(args.resume, model_without_ddp, model_ema, optimizer=optimizer, lr_scheduler=lr_scheduler,
                        scaler=scaler)
        args.start_epoch = state.get('start_epoch', args.start_epoch)
        start_step = state.get('start_step', 0)
        max_accuracy = state.get('max_accuracy', max_accuracy)
    # Only now, with every input checked and loaded, does the output folder change.
    if output_dir is not None and utils.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / 'args.json').write_text(json.dumps(vars(args), indent=2) + '\n')
        drop_log_lines_from(output_dir / 'log.txt', args.start_epoch)
    training_state = dict(optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler)

    # ============ training ============
    print(f'Start training for {num_epochs - args.start_epoch} epochs (epochs {args.start_epoch}..{num_epochs - 1})'
          + (f', from step {start_step} of epoch {args.start_epoch}' if start_step else ''))
    start_time = time.time()
    # Epoch e trains with the schedule's value for e (the original stepped at the end of e, one epoch late).
    lr_scheduler.step(args.start_epoch)
    with StopRequest() as stop:
        for epoch in range(args.start_epoch, num_epochs):
            # Re-seeded from (seed, rank, epoch): a resumed run draws what the uninterrupted run drew.
            seed_everything(args.seed, utils.get_rank(), epoch)
            if hasattr(loader_train.sampler, 'set_epoch'):
                loader_train.sampler.set_epoch(epoch)
            loader = skip_batches(loader_train, start_step) if start_step else loader_train
            try:
                train_stats = train_one_epoch(model, criterion, loader, optimizer, device, epoch, scaler, amp_dtype,
                                              args.clip_grad or 0.0, model_ema, mixup_fn,
                                              set_training_mode=args.train_mode, stop_requested=stop.requested)
            except TrainingStopped as stopped:
                stopped.step += start_step
                if output_dir is not None:  # the state after the last applied step, and the step to go on at
                    checkpoint = training_checkpoint(epoch - 1, model_without_ddp, model_ema, args, max_accuracy,
                                                     dataset_train.classes, **training_state)
                    checkpoint['resume_step'] = stopped.step
                    utils.save_on_master(checkpoint, str(output_dir / 'checkpoint.pth'))
                stop.report(stopped, len(loader_train), output_dir)
                raise
            start_step = 0
            test_stats = evaluate_all(args, loader_val, model, model_ema if ema_on_device else None, device,
                                      amp_dtype)
            lr_scheduler.step(epoch + 1, test_stats['test_acc1'])
            is_best = test_stats['test_acc1'] > max_accuracy
            max_accuracy = max(max_accuracy, test_stats['test_acc1'])
            print(f'Max accuracy: {max_accuracy:.2f}%')

            if output_dir is not None:
                log_stats = {**{f'train_{k}': v for k, v in train_stats.items()}, **test_stats,
                             'epoch': epoch, 'n_parameters': n_parameters}
                if utils.is_main_process():
                    # Before the checkpoints: a kill in between leaves the line of an epoch that the resumed run
                    # trains and logs again (drop_log_lines_from), never a resumed epoch without its line.
                    with (output_dir / 'log.txt').open('a') as f:
                        f.write(json.dumps(log_stats) + '\n')
                checkpoint = training_checkpoint(epoch, model_without_ddp, model_ema, args, max_accuracy,
                                                 dataset_train.classes, **training_state)
                if is_best:  # before checkpoint.pth too: a resumed run would not save this best again
                    utils.save_on_master(checkpoint, str(output_dir / 'best_checkpoint.pth'))
                utils.save_on_master(checkpoint, str(output_dir / 'checkpoint.pth'))
            if epoch + 1 < num_epochs and stop.agreed():
                stopped = TrainingStopped(epoch + 1, 0)
                stop.report(stopped, len(loader_train), output_dir)
                raise stopped

    total_time = datetime.timedelta(seconds=int(time.time() - start_time))
    print(f'Training time {total_time}')


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line; for an error that a DataLoader worker raised, the worker's
    message without the worker's traceback that torch puts in front of it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith('Caught ') and any(line.startswith('Original Traceback') for line in lines):
        return lines[-1].split(': ', 1)[-1]  # 'datasets.CorruptImageError: cannot read image ...'
    return ' '.join(lines)


def cli(argv: Optional[List[str]] = None) -> None:
    """``python main.py``: parse the command line, run main(), exit with one of the EXIT_* statuses.

    User errors and a diverged run end with one line on stderr (the traceback with --debug); any other
    exception keeps its traceback.
    """
    parser = argparse.ArgumentParser('DeiT training and evaluation script', parents=[get_args_parser()])
    args = parser.parse_args(argv)
    try:
        main(args)
    except TrainingStopped as e:
        parser.exit(EXIT_STOPPED, f'{parser.prog}: {e}\n')
    except (*USER_ERRORS, NonFiniteLossError) as e:
        if args.debug:
            raise
        status = EXIT_FAILED if isinstance(e, NonFiniteLossError) else EXIT_USER_ERROR
        parser.exit(status, f'{parser.prog}: error: {one_line(e)}\n')
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    cli()

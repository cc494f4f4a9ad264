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
import datetime
import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from timm.scheduler import create_scheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

import builders
import checkpoints
import models
import tensorboard_log
import utils
from datasets import DATA_SETS, INAT_CATEGORIES, CorruptImageError, report_skipped
from engine import NonFiniteLossError, TrainingStopped, evaluate_all, train_one_epoch
from losses import DISTILLATION_TYPES
from stopping import StopRequest, skip_batches

# Schedulers whose length timm extends by --cooldown-epochs (the others have no end to cool down after).
CYCLIC_SCHEDULERS = ('cosine', 'tanh', 'poly')
SCHEDULERS = CYCLIC_SCHEDULERS + ('step', 'constant', 'plateau')

# Exit statuses of `python main.py` (see the module docstring); 1 is also Python's for an uncaught exception.
EXIT_FAILED, EXIT_USER_ERROR, EXIT_STOPPED = 1, 2, 3
# What main() reports in one line: mistakes in flags, files, data or checkpoints (CheckpointError is a ValueError).
USER_ERRORS = (ValueError, FileNotFoundError, CorruptImageError)


class FlagParser(argparse.ArgumentParser):
    """argparse's parser, whose error for an unknown argument that glues two known flags together names them (the
    typo `--repeated-aug--bce-loss` of the original's README_revenge.md) instead of 'unrecognized arguments'."""

    def parse_args(self, args: Optional[Sequence[str]] = None,
                   namespace: Optional[argparse.Namespace] = None) -> argparse.Namespace:
        parsed, unknown = self.parse_known_args(args, namespace)
        flags = self._option_string_actions  # every spelling of every flag; argparse has no public accessor
        for arg in unknown:
            for i in range(2, len(arg) - 1):
                first, second = arg[:i], arg[i:]
                if first in flags and second.startswith('-') and second.split('=', 1)[0] in flags:
                    self.error(f'{arg} glues two flags together: write {first} {second}')
        if unknown:
            self.error(f'unrecognized arguments: {" ".join(unknown)}')
        return parsed


def get_args_parser() -> argparse.ArgumentParser:
    """The flags of the original DeiT main.py (same spelling, type and default) and this codebase's additions.

    Built with add_help=False so that run_with_submitit.py can extend it through ``parents=[...]``.
    """
    parser = argparse.ArgumentParser('DeiT training and evaluation script', add_help=False)

    group = parser.add_argument_group('Batch and epochs')
    group.add_argument('--batch-size', default=64, type=int,
                       help='batch size per process (default: %(default)s); the learning rate scales with the '
                            'total batch, see --lr')
    group.add_argument('--epochs', default=300, type=int,
                       help='number of training epochs (default: %(default)s); a --resume with a larger value extends '
                            'the run, its schedule stretched to the new length')
    group.add_argument('--accum-iter', '--accum_iter', default=1, type=int, metavar='N',
                       help='gradient accumulation: one optimizer step every N batches, each loss divided by N '
                            '(default: %(default)s, none); the effective batch, batch-size x N x processes, sets the '
                            'lr scaling: on 1 GPU, --accum-iter 8 takes the steps of 8 GPUs (add --repeated-aug). An '
                            'epoch\'s batches after its last complete group of N are not used (see README)')
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
                       help='clip the gradient norm to this value (default: no clipping); 0 disables clipping too '
                            '(the original zeroed every gradient with it); 1.0 can help when the loss spikes')
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
    group.add_argument('--cosub', action='store_true',
                       help='cosub (co-training 2L submodels): each batch runs twice through the model, stochastic '
                            'depth drawing two sub-models, each trained on the labels and on the other\'s '
                            'predictions with binary cross-entropy, as the original; needs --drop-path > 0, no '
                            'distillation (default: off)')
    group.add_argument('--dist-head-on-labels', action='store_true',
                       help='the control of the paper\'s section 5: no teacher, the distillation head of a '
                            '*_distilled_* model trained on the labels like the class head (a second class token), '
                            'the two terms weighed by --distillation-alpha; needs --distillation-type none '
                            '(default: off)')

    group = parser.add_argument_group('Finetuning')
    group.add_argument('--finetune', default='',
                       help='initialise from this checkpoint (file or https URL): heads of another shape are '
                            'dropped, the position embedding is resized to --input-size (default: none)')
    group.add_argument('--attn-only', action='store_true',
                       help='train only the attention layers, the class head and the position embedding, as the '
                            'original; everything else, head_dist included, stays frozen (default: off)')

    group = parser.add_argument_group('Data and run')
    group.add_argument('--data-path', default='/datasets01/imagenet_full_size/061417/', type=str,
                       help='dataset folder (default: %(default)s, the original\'s)')
    group.add_argument('--data-set', default='IMNET', choices=DATA_SETS, type=str,
                       help='dataset; DIGITS is built in and needs no download (default: %(default)s)')
    group.add_argument('--inat-category', default='name', choices=INAT_CATEGORIES, type=str,
                       help='iNaturalist label level (default: %(default)s)')
    group.add_argument('--skip-corrupt', action='store_true',
                       help='skip unreadable image files instead of stopping; how many were skipped so far is '
                            'printed each epoch and logged as train_skipped_images / test_skipped_images '
                            '(default: off)')
    group.add_argument('--output_dir', '--output-dir', default='',
                       help='where to write checkpoints and logs; a checkpoint.pth found there is resumed '
                            '(default: no output)')
    group.add_argument('--log_dir', '--log-dir', default='',
                       help='write TensorBoard scalars to this folder (default: none): train/loss and train/lr every '
                            '10 optimizer steps, test/ and test_ema/ loss, acc1, acc5 every epoch; a resumed run '
                            'continues the same folder. Needs `pip install tensorboard`; view with '
                            '`tensorboard --logdir DIR`')
    group.add_argument('--seed', default=0, type=int, help='random seed (default: %(default)s)')
    group.add_argument('--debug', action='store_true',
                       help='show the traceback of errors that are otherwise reported in one line (default: off)')
    group.add_argument('--resume', default='',
                       help='checkpoint (file or https URL) to resume training from, or to evaluate with --eval '
                            '(default: none). The schedule comes from this command (--epochs, --sched, --lr, ...): '
                            'the flags that differ from the checkpoint\'s are printed at start')
    group.add_argument('--start_epoch', '--start-epoch', default=0, type=int, metavar='N',
                       help='first epoch, when not resuming (default: %(default)s)')
    group.add_argument('--eval', action='store_true', help='evaluate only (default: off)')
    group.add_argument('--eval-crop-ratio', default=0.875, type=float,
                       help='center-crop ratio of evaluation (default: %(default)s)')
    group.add_argument('--eval-every', '--eval_every', default=1, type=int, metavar='N',
                       help='evaluate after every N-th epoch and after the last (default: %(default)s, as the '
                            'original); saves time where evaluating costs much next to an epoch (small datasets)')
    group.add_argument('--checkpoint-every', default=1, type=int, metavar='N',
                       help='write checkpoint.pth after every N-th epoch and the last (default: %(default)s); a stop '
                            'by SIGTERM / SIGUSR1 still saves, a kill loses up to N - 1 epochs')
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
    group.add_argument('--persistent-workers', action=argparse.BooleanOptionalAction, default=None,
                       help='keep the data loading processes from one epoch and evaluation to the next (default: on '
                            'when --num_workers > 0); --no-persistent-workers starts them anew for each pass')

    group = parser.add_argument_group('Distributed')
    group.add_argument('--distributed', action='store_true',
                       help='ignored, as by the original, whose commands keep it: the launcher decides, a run '
                            'started by torchrun or Slurm is distributed, `python main.py` is not (default: off)')
    group.add_argument('--world_size', '--world-size', default=1, type=int,
                       help='number of processes; set by the launcher (torchrun, Slurm) (default: %(default)s)')
    group.add_argument('--dist_url', '--dist-url', default='env://',
                       help='rendezvous of the process group (default: %(default)s)')
    return parser


# ============ helpers ============


def check_args(args: argparse.Namespace) -> None:
    """Refuse combinations of flags that cannot work, with a message that says what to do."""
    if args.batch_size < 1 or args.epochs < 1 or args.accum_iter < 1:
        raise ValueError('--batch-size, --epochs and --accum-iter must be positive')
    if args.eval_every < 1 or args.checkpoint_every < 1:
        raise ValueError('--eval-every and --checkpoint-every must be positive: 1 is after every epoch')
    if args.log_dir and args.checkpoint_every > 1:
        raise ValueError('--log_dir writes each epoch\'s scalars after its checkpoint, so that a resumed run never '
                         'writes them twice: use --checkpoint-every 1 with it')
    if args.eval_every > 1 and args.sched == 'plateau':
        raise ValueError('--sched plateau lowers the lr on the accuracy of every epoch: use --eval-every 1 with it')
    if args.log_dir:
        tensorboard_log.check_available()
    if args.resplit:
        raise ValueError('--resplit applies to AugMix augmentation splits, which DeiT does not use; drop the flag')
    builders.check_cosub(args)
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
        if args.bce_loss and builders.mixup_active(args) and args.smoothing > 0:
            raise ValueError('--bce-loss binarises the mixed targets as the original, and label smoothing gives every '
                             'class a share of them: add --smoothing 0 (DeiT III\'s setting) or drop --bce-loss')
        if builders.mixup_active(args) and args.batch_size % 2:
            raise ValueError(f'mixup / cutmix pair up the images of a batch: use an even --batch-size '
                             f'(got {args.batch_size}), or --mixup 0 --cutmix 0')
    check_models(args)


def check_models(args: argparse.Namespace) -> None:
    """Refuse an unknown --model or --teacher-model, an --input-size below the patch size, distillation into a model
    without distillation token or --cosub with one; say when the patches do not tile --input-size.

    The models are built on builders.skeleton_device() (the meta device: no memory, no weights, a fraction of a
    second), before any data.
    """
    distilling = not args.eval and args.distillation_type != 'none'
    names = [('--model', args.model)] + ([('--teacher-model', args.teacher_model)] if distilling else [])
    for flag, name in names:
        try:
            with builders.skeleton_device():
                model = builders.create_model(name, args.input_size, num_classes=args.nb_classes or 1000)
        except ValueError as e:
            raise ValueError(f'{flag}: {e}') from None
        patch_size = getattr(getattr(model, 'patch_embed', None), 'patch_size', (1,))[0]
        if args.input_size < patch_size:
            raise ValueError(f'--input-size {args.input_size} is smaller than the patch size {patch_size} of {flag} '
                             f'{name}: use at least {patch_size}')
        if args.input_size % patch_size:
            # As the original and timm: the patch convolution's stride leaves the remainder out (DeiT III-H, patch 14,
            # trains at 160 and 128 in its README's commands).
            seen = args.input_size // patch_size * patch_size
            print(f'Note: --input-size {args.input_size} is not a multiple of the patch size {patch_size} of {flag} '
                  f'{name}: its patches cover {seen} pixels, the last {args.input_size - seen} rows and columns of '
                  'each image are not seen')
        if flag == '--model' and args.cosub and not args.eval and isinstance(model, models.DistilledVisionTransformer):
            raise ValueError(f'--cosub trains a model with one head, and --model {name} has two: use a model without '
                             f'distillation token (e.g. {name.replace("_distilled", "")})')
        if flag == '--model' and distilling and not isinstance(model, models.DistilledVisionTransformer):
            raise ValueError(f'--distillation-type {args.distillation_type} trains the distillation token, and '
                             f'--model {name} has none: use a *_distilled_* model (e.g. '
                             'deit_base_distilled_patch16_224) or --distillation-type none')
        if flag == '--model':
            builders.check_distillation_head(args, model)


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
    builders.seed_everything(args.seed + utils.get_rank())
    torch.backends.cudnn.benchmark = True
    amp_dtype = builders.amp_dtype_of(args.precision, device)
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None and not args.resume and (output_dir / 'checkpoint.pth').exists():
        args.resume = str(output_dir / 'checkpoint.pth')
        print(f'Found {args.resume}: resuming from it (pass --resume to choose another checkpoint)')

    # ============ preparing data ============
    dataset_train, dataset_val, loader_train, loader_val, nb_classes = builders.build_data(args, device)

    # ============ building the model ============
    print(f'Creating model: {args.model}')
    model = builders.create_model(args.model, args.input_size, num_classes=nb_classes, drop_rate=args.drop,
                                  drop_path_rate=args.drop_path)
    if args.finetune:
        checkpoints.load_finetune(model, args.finetune)
    if args.attn_only:
        print(f'--attn-only: {builders.train_attention_only(model, args.model)} trainable parameters')
    builders.freeze_unused_head(args, model)
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
        ema_loaded = args.resume and checkpoints.restore(args.resume, model_without_ddp, model_ema)['ema_loaded']
        evaluate_all(loader_val, model, model_ema if ema_loaded and ema_on_device else None, device, amp_dtype,
                     args.eval_head)
        if args.skip_corrupt:
            report_skipped(None, dataset_val)
        return

    # ============ building the optimizer, schedule and loss ============
    args.actual_lr = builders.scaled_lr(args)
    world_size = utils.get_world_size()
    total_batch = args.batch_size * args.accum_iter * world_size
    print(f'base lr: {args.lr:.2e}  actual lr: {args.actual_lr:.2e}  (total batch {total_batch} = {args.batch_size} '
          f'x {args.accum_iter} accumulated x {world_size} process{"es" * (world_size > 1)}, '
          f'{"--unscale-lr" if args.unscale_lr else "lr * total batch / 512"})')
    optimizer = builders.build_optimizer(args, model_without_ddp, device)
    lr_scheduler, num_epochs = create_scheduler(args, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    mixup_fn = builders.build_mixup(args, nb_classes)
    criterion = builders.build_criterion(args, model_without_ddp, nb_classes, device)

    # ============ resuming ============
    max_accuracy, start_step, start_sums = -math.inf, 0, None
    if args.resume:
        state = checkpoints.restore(args.resume, model_without_ddp, model_ema, optimizer=optimizer, scaler=scaler)
        if 'start_epoch' in state:
            checkpoints.resume_schedule(lr_scheduler, optimizer, state['lr_scheduler'], state['args'], args)
        args.start_epoch = state.get('start_epoch', args.start_epoch)
        start_step, start_sums = state.get('start_step', 0), state.get('start_sums')
        max_accuracy = state.get('max_accuracy', max_accuracy)
    # Only now, with every input checked and loaded, does the output folder change.
    if output_dir is not None and utils.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / 'args.json').write_text(json.dumps(vars(args), indent=2) + '\n')
        checkpoints.drop_log_lines_from(output_dir / 'log.txt', args.start_epoch)
    training_state = dict(optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler)

    # ============ training ============
    print(f'Start training for {num_epochs - args.start_epoch} epochs (epochs {args.start_epoch}..{num_epochs - 1})'
          + (f', from step {start_step} of epoch {args.start_epoch}' if start_step else ''))
    start_time = time.time()
    # Epoch e trains with the schedule's value for e (the original stepped at the end of e, one epoch late).
    builders.start_schedule(lr_scheduler, args.start_epoch)
    steps_per_epoch = len(loader_train) // args.accum_iter  # optimizer steps: TensorBoard's x
    log_dir = args.log_dir if utils.is_main_process() else ''
    with StopRequest() as stop, tensorboard_log.open_writer(
            log_dir, purge_step=args.start_epoch * steps_per_epoch + start_step // args.accum_iter) as log_writer:
        for epoch in range(args.start_epoch, num_epochs):
            # Re-seeded from (seed, rank, epoch), each step and each sample from theirs (seeding.py): a run resumed
            # at any step draws what the uninterrupted run drew.
            builders.seed_everything(args.seed, utils.get_rank(), epoch)
            loader_train.sampler.set_epoch(epoch)
            loader = skip_batches(loader_train, start_step) if start_step else loader_train
            try:
                train_stats = train_one_epoch(model, criterion, loader, optimizer, device, epoch, scaler, amp_dtype,
                                              args.clip_grad or 0.0, model_ema, mixup_fn,
                                              set_training_mode=args.train_mode, stop_requested=stop.requested,
                                              accum_iter=args.accum_iter, log_writer=log_writer,
                                              first_step=epoch * steps_per_epoch + start_step // args.accum_iter,
                                              seed=args.seed, resumed_sums=start_sums)
            except TrainingStopped as stopped:
                stopped.step += start_step
                if output_dir is not None:
                    # The state after the last applied step, the step to go on at, and the epoch's figures so far.
                    checkpoint = checkpoints.training_checkpoint(epoch - 1, model_without_ddp, model_ema, args,
                                                                 max_accuracy, dataset_train.classes, **training_state)
                    checkpoint['resume_step'] = stopped.step
                    checkpoint['resume_sums'] = utils.all_gather_object(stopped.sums)  # one per process
                    utils.save_on_master(checkpoint, str(output_dir / 'checkpoint.pth'))
                stop.report(stopped, len(loader_train), output_dir)
                raise
            start_step, start_sums = 0, None
            test_stats = {}
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == num_epochs:
                test_stats = evaluate_all(loader_val, model, model_ema if ema_on_device else None, device, amp_dtype,
                                          args.eval_head)
            skipped = report_skipped(dataset_train, dataset_val) if args.skip_corrupt else {}
            lr_scheduler.step(epoch + 1, test_stats.get('test_acc1'))
            is_best = test_stats.get('test_acc1', -math.inf) > max_accuracy
            if test_stats:
                max_accuracy = max(max_accuracy, test_stats['test_acc1'])
                print(f'Max accuracy: {max_accuracy:.2f}%')

            stopping = epoch + 1 < num_epochs and stop.agreed()  # a stop between two epochs saves this one
            if output_dir is not None:
                log_stats = {**{f'train_{k}': v for k, v in train_stats.items()}, **test_stats, **skipped,
                             'epoch': epoch, 'n_parameters': n_parameters}
                checkpoint = checkpoints.training_checkpoint(epoch, model_without_ddp, model_ema, args, max_accuracy,
                                                             dataset_train.classes, **training_state)
                latest = stopping or (epoch + 1) % args.checkpoint_every == 0 or epoch + 1 == num_epochs
                checkpoints.save_epoch(output_dir, log_stats, checkpoint, is_best, latest)
            tensorboard_log.log_epoch(log_writer, epoch, test_stats)  # after the checkpoint: never logged twice
            if stopping:
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
    parser = FlagParser('DeiT training and evaluation script', parents=[get_args_parser()])
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

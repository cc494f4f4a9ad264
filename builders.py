"""The objects of a run, built from main.py's flags: data loaders, model, teacher, optimizer, loss, mixup.

main.py, benchmark.py and analyze.py build through these functions, so a model or a loader is the same
whichever script made it.
"""
import argparse
import atexit
import random
from typing import Any, Optional, Tuple, Union

import numpy as np
import timm.layers
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import get_pretrained_cfg
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import PlateauLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

import models
import utils
from checkpoints import load_weights
from datasets import build_dataset
from losses import CosubLoss, DistillationLoss
from samplers import RASampler
from seeding import SeededDataset, SeededSampler
from stopping import end_workers_at_exit, ignore_stop_signals


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
    """The learning rate the optimizer gets: --lr for a total batch of 512, scaled linearly (Goyal et al.) with the
    effective batch, batch size x accumulated batches (--accum-iter) x processes."""
    if args.unscale_lr:
        return args.lr
    return args.lr * args.batch_size * args.accum_iter * utils.get_world_size() / 512.0


def mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def build_mixup(args: argparse.Namespace, nb_classes: int) -> Optional[Mixup]:
    """timm's Mixup / CutMix with the flags' settings, or None when both are off."""
    if not mixup_active(args):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=nb_classes)


def create_model(name: str, input_size: int, **kwargs: Any) -> nn.Module:
    """models.build_model, at ``input_size`` for models built for one input size (ViTs); convnets take any."""
    cfg = get_pretrained_cfg(name)
    if name in models.DEIT_MODELS or (cfg is not None and cfg.fixed_input_size):
        kwargs['img_size'] = input_size
    return models.build_model(name, **kwargs)


def skeleton_device() -> torch.device:
    """Where to build a model only to read its structure: ``with skeleton_device(): model = ...``.

    The meta device: no memory, no weights, a fraction of a second. timm < 1.0.21's ViTs read their drop-path
    rates with ``Tensor.item()``, which a meta tensor cannot answer; with those the model is built on the CPU.
    """
    return torch.device('meta' if hasattr(timm.layers, 'calculate_drop_path_rates') else 'cpu')


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
    # The workers of both loaders live as long as the run, as in timm's train.py: starting them anew for each
    # training epoch and each evaluation costs seconds every epoch.
    persistent = args.num_workers > 0 if args.persistent_workers is None else args.persistent_workers
    loader_kwargs = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and device.type == 'cuda',
                         persistent_workers=persistent, worker_init_fn=ignore_stop_signals)
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
    # Each sample's augmentations are seeded from its place in the epoch (seeding.py). DataLoader draws a base seed
    # for its workers whenever it starts them; from torch's generator, that draw would shift RandomSampler's after
    # it in a resumed run, which starts workers where the run that never stopped kept its own: its own generator.
    loader_train = DataLoader(SeededDataset(dataset_train), sampler=SeededSampler(sampler_train, args.seed, rank),
                              batch_size=args.batch_size, drop_last=True, generator=torch.Generator(), **loader_kwargs)
    return dataset_train, dataset_val, loader_train, loader_val, nb_classes


# apex's optimizers that the original's commands name -> timm's implementation of the same update: timm's fused*
# names need NVIDIA apex, which no PyTorch wheel ships (it is built from source against one CUDA and torch).
APEX_OPTIMIZERS = {'fusedlamb': 'lamb'}


def build_optimizer(args: argparse.Namespace, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """timm's optimizer factory at the scaled lr (args.actual_lr); the fused Adam / AdamW kernel on CUDA.

    ``--opt fusedlamb`` (apex's FusedLAMB, DeiT III's optimizer) runs timm's ``lamb``, said in one line: the same
    LAMB update (Adam moments, weight decay added to the update, layer-wise trust ratio skipped where there is no
    weight decay, gradients clipped to a global norm of 1), in multi-tensor (foreach) kernels on CUDA.
    """
    opt = args.opt.lower()
    if opt in APEX_OPTIMIZERS:
        print(f'--opt {args.opt} is NVIDIA apex\'s: running timm\'s {APEX_OPTIMIZERS[opt]} instead, the same update '
              'without apex' + (' (multi-tensor kernels on CUDA)' if device.type == 'cuda' else ''))
        opt = APEX_OPTIMIZERS[opt]
    kwargs = dict(optimizer_kwargs(args), opt=opt, lr=args.actual_lr)
    fused = args.fused if args.fused is not None else device.type == 'cuda' and opt in ('adam', 'adamw')
    if fused:
        kwargs['fused'] = True
    return create_optimizer_v2(model, **kwargs)


def start_schedule(lr_scheduler: Scheduler, epoch: int) -> None:
    """Set the learning rate of ``epoch``, the first epoch this run trains: a fresh run's 0, or a resumed run's.

    timm's plateau schedule is a function of the epoch during its warm-up only. After the warm-up its lr is the
    one the optimizer holds (the scaled --lr on a fresh start, the restored, possibly decayed, lr on a resume),
    and it is not stepped here: step(0) without warm-up would set --warmup-lr (timm counts epoch 0 <= 0 as
    warm-up), which the plateau logic can only lower; and past the warm-up, timm < 1.0.23 hands the missing
    metric (None) on to ReduceLROnPlateau, which fails.
    """
    if isinstance(lr_scheduler, PlateauLRScheduler) and (lr_scheduler.warmup_t == 0 or epoch > lr_scheduler.warmup_t):
        return
    lr_scheduler.step(epoch)


def train_attention_only(model: nn.Module, name: str) -> int:
    """--attn-only: train what the original trains, the parameters with ``.attn.`` in their name, ``head`` and
    ``pos_embed``, and freeze everything else: the patch embedding, the extra tokens, the MLPs, the norms and
    ``head_dist`` (the original sets requires_grad on ``model.head`` only: 7.56M trainable parameters for
    deit_small_distilled_patch16_224).

    Returns:
        The number of trainable parameters left.
    """
    if not any('.attn.' in n for n, _ in model.named_parameters()):
        raise ValueError(f'--attn-only trains the attention layers, and --model {name} has none')
    for n, p in model.named_parameters():
        p.requires_grad = '.attn.' in n or n == 'pos_embed' or n.startswith('head.')
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_teacher(args: argparse.Namespace, nb_classes: int, device: torch.device) -> nn.Module:
    """--teacher-model with the weights of --teacher-path, in eval mode on ``device``."""
    teacher = create_model(args.teacher_model, args.input_size, num_classes=nb_classes)
    load_weights(teacher, utils.weights_of(utils.load_checkpoint(args.teacher_path)),
                 f'--teacher-path {args.teacher_path}', flag='--teacher-model')
    memory_format = torch.channels_last if args.channels_last else torch.preserve_format
    return teacher.to(device, memory_format=memory_format).eval()


def check_distillation_head(args: argparse.Namespace, model: nn.Module) -> None:
    """Refuse --dist-head-on-labels without a distillation head or with a teacher (--distillation-type soft/hard)."""
    if args.eval or not args.dist_head_on_labels:
        return
    if args.distillation_type != 'none':
        raise ValueError(f'--dist-head-on-labels trains the distillation head on the labels, without a teacher, and '
                         f'--distillation-type {args.distillation_type} trains it on the teacher: give one of them')
    if not isinstance(model, models.DistilledVisionTransformer):
        raise ValueError(f'--dist-head-on-labels trains the distillation head, and --model {args.model} has none: use '
                         'a *_distilled_* model (e.g. deit_tiny_distilled_patch16_224) or drop the flag')


def check_cosub(args: argparse.Namespace) -> None:
    """Refuse --cosub with what it cannot combine with: a teacher, a second head trained on the labels, or no
    stochastic depth to draw its two sub-models (a *_distilled_* model is refused in main.check_models)."""
    if args.eval or not args.cosub:
        return
    if args.distillation_type != 'none' or args.dist_head_on_labels:
        flag = '--dist-head-on-labels' if args.dist_head_on_labels else f'--distillation-type {args.distillation_type}'
        raise ValueError(f'--cosub trains two sub-models of one model on each other\'s predictions, without teacher '
                         f'or second head, and {flag} needs them: give one of the two')
    if args.drop_path <= 0 or not args.train_mode:
        raise ValueError('--cosub draws its two sub-models by stochastic depth: give a --drop-path above 0 (DeiT '
                         'III\'s recipes use 0.05 to 0.6), in training mode (no --no-train-mode)')


def freeze_unused_head(args: argparse.Namespace, model: nn.Module) -> None:
    """Freeze ``head_dist`` of a distilled model that no loss trains: --distillation-type none without
    --dist-head-on-labels (e.g. finetuning a distilled model), as the original allowed; a line says so.

    Frozen, it gets no gradient by design. Trainable, it got none either, and DDP, which runs without
    find_unused_parameters (a search of the graph at every step), failed at the second step ("Expected to have
    finished reduction in the prior iteration"). In one process nothing changes: AdamW skips a parameter
    without gradient (no update, no weight decay). Call it before DDP and the optimizer are built.
    log.txt's n_parameters, the trainable parameters, leaves the frozen head out.
    """
    if (args.eval or args.distillation_type != 'none' or args.dist_head_on_labels
            or not isinstance(model, models.DistilledVisionTransformer)):
        return
    model.head_dist.requires_grad_(False)
    evaluation = (f' and is still {"averaged in" if args.eval_head == "avg" else "used"} at evaluation (--eval-head '
                  f'{args.eval_head}); use --eval-head cls, or train it on the labels with --dist-head-on-labels'
                  if args.eval_head != 'cls' else '')
    print(f'Note: --distillation-type none: no loss trains the distillation head of {args.model}, so it is frozen: '
          f'it keeps its initial / loaded weights{evaluation}')


def build_criterion(args: argparse.Namespace, model: nn.Module, nb_classes: int, device: torch.device
                    ) -> Union[DistillationLoss, CosubLoss]:
    """The training loss of ``model`` (unwrapped): the base criterion, with the teacher of --distillation-type
    soft / hard, or with the distillation head on the labels (--dist-head-on-labels); or the cosub loss (--cosub)."""
    if args.cosub:
        # The original's label terms: binary cross-entropy on the mixed targets, binarised with --bce-loss
        # (targets.gt(0.0)); class indices (no mixup, where the original crashed) are one-hot encoded with
        # label smoothing, as Mixup would encode them.
        binarise = args.bce_loss and mixup_active(args)
        return CosubLoss(BinaryCrossEntropy(smoothing=args.smoothing, target_threshold=0.0 if binarise else None))
    teacher = build_teacher(args, nb_classes, device) if args.distillation_type != 'none' else None
    return DistillationLoss(base_criterion(args), teacher, args.distillation_type, args.distillation_alpha,
                            args.distillation_tau, dist_head_on_labels=args.dist_head_on_labels)


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

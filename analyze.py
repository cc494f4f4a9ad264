"""The paper's section 5 analyses (DeiT, Touvron et al. 2020) on any checkpoint of this codebase or official file.

    # top-1 / top-5 of the class head, the distillation head and their average (Table 5)
    python analyze.py heads out/checkpoint.pth --model deit_tiny_distilled_patch16_224 --data-set DIGITS \
        --input-size 32 --json heads.json
    # cosine similarity of the class and distillation tokens: learned parameters, then after each block
    python analyze.py tokens deit_base_distilled_patch16_224-df68dfff.pth --model deit_base_distilled_patch16_224 \
        --data-path /path/to/imagenet
    # how often classifiers disagree (Table 4): the heads of a student and its convnet teacher
    python analyze.py agree cls=out/checkpoint.pth:cls dist=out/checkpoint.pth:dist \
        teacher=regnety_160@regnety_160-a5fe301d.pth --model deit_base_distilled_patch16_224 --data-path ...
    # where the class and distillation tokens look in one image
    python analyze.py attention cat.jpg out/checkpoint.pth --out attention.png --method rollout
    # train loss, test top-1 (and the EMA's) and learning rate per epoch, runs overlaid
    python analyze.py curves runs/hard/log.txt soft=runs/soft/log.txt --out curves.png

Checkpoints: main.py's ('model' weights, 'model_ema' with --ema; --model defaults to the one it stored) or
official files ({'model': ...}), files or https URLs, loaded with weights_only=True. Data: main.py's flags and
defaults: the validation split, its evaluation transform and batch (1.5 x --batch-size). Each analysis is a
function of (model, loader, device) returning numbers; the commands print a table and write --json FILE.

Exit status: 0 done; 2 a user error (a bad file, model, image or flag), in one line on stderr unless --debug.
"""
import argparse
import json
import os
import sys
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, SequentialSampler

import builders
import models
import utils
from attention import METHODS, attention_maps
from checkpoints import load_weights
from datasets import DATA_SETS, INAT_CATEGORIES, CorruptImageError, build_eval_transform
from figures import MissingPackage, plot_attention, plot_curves, read_log

HEADS = ('cls', 'dist', 'avg')
DEFAULT_MODEL = 'deit_base_patch16_224'  # main.py's --model default
EXIT_USER_ERROR = 2
USER_ERRORS = (ValueError, FileNotFoundError, CorruptImageError, MissingPackage)

# ============ models and data ============


def load_model(path: str, model_name: Optional[str] = None, input_size: int = 224, nb_classes: Optional[int] = None,
               ema: bool = False) -> nn.Module:
    """The model of a checkpoint, on the CPU in eval mode.

    Args:
        path: file or https URL: a checkpoint of main.py, an official file ({'model': ...}) or a bare state_dict.
        model_name: any timm name; None takes the one main.py stored in the checkpoint, else main.py's default.
        nb_classes: classes of the classifier; None reads them from the checkpoint's 'head.weight'.
        ema: take the checkpoint's 'model_ema' weights instead of 'model'.
    """
    checkpoint = utils.load_checkpoint(path)
    if ema and 'model_ema' not in checkpoint:
        raise ValueError(f'{path} holds no EMA weights (model_ema): drop --ema, or give a checkpoint that main.py '
                         'wrote with its weight EMA on (the default)')
    state_dict = checkpoint['model_ema'] if ema else utils.weights_of(checkpoint)
    train_args = checkpoint.get('args') or {}  # the original code pickled an argparse.Namespace
    name = model_name or getattr(train_args, 'model', None) or dict(train_args).get('model', DEFAULT_MODEL)
    if nb_classes is None:
        if 'head.weight' not in state_dict:
            raise ValueError(f'{path} has no head.weight to read the number of classes from: pass --nb-classes')
        nb_classes = state_dict['head.weight'].shape[0]
    model = builders.create_model(name, input_size, num_classes=nb_classes)
    load_weights(model, state_dict, f'{path} ({name})', flag='the model name (--model, or MODEL@ in agree)')
    return model.eval()


def build_loader(args: argparse.Namespace, device: torch.device) -> Tuple[DataLoader, int]:
    """main.py --eval's validation loader (builders.build_data: the val split, its eval transform, in order, batch
    1.5 x --batch-size) and the number of classes of the classifier (--nb-classes, else the dataset's)."""
    if args.batch_size < 1:
        raise ValueError('--batch-size must be positive')
    # one process, evaluation only, main.py's defaults for the flags analyze.py does not take
    eval_args = argparse.Namespace(**{**vars(args), 'eval': True, 'distributed': False, 'dist_eval': False,
                                      'pin_mem': True, 'persistent_workers': False})
    _, _, _, loader, nb_classes = builders.build_data(eval_args, device)
    return loader, nb_classes


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def _progress(loader: DataLoader, header: str, print_freq: int = 10) -> Iterator:
    """The loader's batches, with a progress line and its ETA every ``print_freq`` batches (MetricLogger)."""
    return utils.MetricLogger(delimiter='  ').log_every(loader, print_freq, header)


def _require_distilled(model: nn.Module, analysis: str) -> None:
    if not isinstance(model, models.DistilledVisionTransformer):
        raise ValueError(f'{analysis} compares the class and distillation tokens, and {type(model).__name__} has no '
                         'distillation token: give a *_distilled_* model (--model) and its checkpoint')

# ============ analyses ============


@torch.no_grad()
def head_accuracies(model: nn.Module, loader: DataLoader, device: torch.device,
                    amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Dict[str, float]]:
    """Top-1 / top-5 accuracy (%) of the class head, the distillation head and their average (paper, Table 5).

    One pass: the tokens are computed once per batch and each head reads them through the model's own
    forward_head, so each figure equals engine.evaluate(loader, model, device, head=H) (main.py --eval-head H).

    Returns:
        {'cls': {'acc1', 'acc5'}, 'dist': {...}, 'avg': {...}}
    """
    _require_distilled(model, 'heads')
    model.to(device).eval()
    correct = {head: torch.zeros(2, dtype=torch.float64) for head in HEADS}
    total = 0
    previous = model.eval_head
    try:
        for images, target in _progress(loader, 'heads:'):
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                features = model.forward_features(images)  # [B, N + 2, D], after the final norm
                logits = {}
                for head in HEADS:
                    models.set_eval_head(model, head)
                    logits[head] = model.forward_head(features)
            for head, output in logits.items():
                # Top-5 of fewer than five classes is every class, as engine.evaluate counts it.
                top = output.float().topk(min(5, output.shape[1]), dim=1).indices  # [B, k]
                hits = top.eq(target[:, None])
                correct[head] += torch.tensor([hits[:, 0].sum().item(), hits.any(dim=1).sum().item()])
            total += target.shape[0]
    finally:
        models.set_eval_head(model, previous)
    return {head: {'acc1': 100 * c[0].item() / total, 'acc5': 100 * c[1].item() / total}
            for head, c in correct.items()}


@torch.no_grad()
def token_cosines(model: nn.Module, loader: DataLoader, device: torch.device,
                  amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """Cosine similarity of the class and distillation tokens (paper, section 5.1).

    Returns:
        {'params': cos(cls_token, dist_token) of the learned parameters,
         'blocks': for each block i, the mean over the images of cos(x[:, 0], x[:, 1]) of its output x,
         'blocks_normed': the same after the model's final norm (what the heads read after the last block)}
    """
    _require_distilled(model, 'tokens')
    model.to(device).eval()
    sums = torch.zeros(2, len(model.blocks), dtype=torch.float64, device=device)  # [before / after the norm, block]

    def record(index: int):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:  # output: [B, N + 2, D]
            tokens = output[:, :2].float()  # [B, 2, D]: class, distillation
            normed = model.norm(tokens)  # LayerNorm acts per token: the same as norming the whole sequence
            for row, x in enumerate((tokens, normed)):
                sums[row, index] += F.cosine_similarity(x[:, 0], x[:, 1], dim=-1).sum()
        return hook

    handles = [block.register_forward_hook(record(i)) for i, block in enumerate(model.blocks)]
    total = 0
    try:
        for images, _ in _progress(loader, 'tokens:'):
            with _autocast(device, amp_dtype):
                model.forward_features(images.to(device, non_blocking=True))
            total += images.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    params = F.cosine_similarity(model.cls_token.flatten().float(), model.dist_token.flatten().float(), dim=0)
    blocks, blocks_normed = (sums / total).tolist()
    return {'params': params.item(), 'blocks': blocks, 'blocks_normed': blocks_normed}


@torch.no_grad()
def token_movement(model: nn.Module, initial: nn.Module) -> Dict[str, float]:
    """How the learned class and distillation tokens of ``model`` relate, at initialisation (``initial``, the same
    architecture before training) and now.

    Returns:
        {'cos_init': cos(cls_token, dist_token) of ``initial``, 'cos_end': the same of ``model``,
         'moved_cls': ||cls_token - its initial value|| / ||initial value||, 'moved_dist': the same for dist_token}
    """
    _require_distilled(model, 'tokens')
    _require_distilled(initial, 'tokens')

    def cos(m: nn.Module) -> float:
        return F.cosine_similarity(m.cls_token.flatten().float(), m.dist_token.flatten().float(), dim=0).item()

    def moved(name: str) -> float:
        start, end = getattr(initial, name).float(), getattr(model, name).float()
        return ((end - start).norm() / start.norm()).item()

    return {'cos_init': cos(initial), 'cos_end': cos(model), 'moved_cls': moved('cls_token'),
            'moved_dist': moved('dist_token')}


@torch.no_grad()
def top1_predictions(model: nn.Module, loader: DataLoader, device: torch.device, head: str = 'avg',
                     amp_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The top-1 class (argmax) of every image of ``loader``, in its order: [N] on the CPU.

    ``head`` chooses the output of a distilled model (cls, dist or avg); any other classifier has one.
    """
    model.to(device).eval()
    previous = models.set_eval_head(model, head)
    predictions = []
    try:
        for images, _ in _progress(loader, f'top-1 ({head}):'):
            with _autocast(device, amp_dtype):
                logits = model(images.to(device, non_blocking=True))
            predictions.append(logits.float().argmax(dim=1).cpu())
    finally:
        models.set_eval_head(model, previous)
    return torch.cat(predictions)


def labels_of(loader: DataLoader) -> torch.Tensor:
    """The labels of the images of ``loader`` in its order: [N]. An in-order dataset's ``targets`` are read
    without decoding any image; otherwise (or when unreadable images are skipped) a pass over the loader."""
    dataset = loader.dataset
    if (isinstance(loader.sampler, SequentialSampler) and hasattr(dataset, 'targets')
            and not getattr(dataset, 'skip_corrupt', False)):
        return torch.as_tensor(list(dataset.targets), dtype=torch.long)
    return torch.cat([target for _, target in loader])


def top1_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (%) of predicted classes [N] against labels [N]."""
    return 100 * predictions.eq(labels).double().mean().item()


def disagreement(predictions: Sequence[torch.Tensor]) -> torch.Tensor:
    """[M, M]: the fraction of images on which the top-1 predictions of classifiers i and j differ (Table 4).

    Args:
        predictions: M tensors [N] of predicted classes, over the same images in the same order.
    """
    if not predictions or len({tuple(p.shape) for p in predictions}) != 1 or predictions[0].numel() == 0:
        raise ValueError('disagreement needs predictions of equal, non-zero length, one per classifier')
    stacked = torch.stack([p.flatten().cpu() for p in predictions])  # [M, N]
    return (stacked[:, None, :] != stacked[None, :, :]).double().mean(dim=-1)


# ============ command line ============


class Entry(NamedTuple):
    """One classifier of ``agree``: NAME=[MODEL@]PATH[:HEAD]."""
    name: str
    model: Optional[str]  # None: --model
    path: str
    head: str


def parse_entry(text: str) -> Entry:
    """``NAME=PATH[:HEAD]`` or ``NAME=MODEL@PATH[:HEAD]``; HEAD is cls, dist or avg (default avg).

    A ':' or '@' that belongs to the path stays in it: the HEAD suffix is only one of the three heads, MODEL
    holds no '/', and a string that names an existing file as a whole is taken as that file.
    """
    name, sep, spec = text.partition('=')
    if not sep or not name or not spec:
        raise ValueError(f'agree entry {text!r}: expected NAME=PATH[:HEAD] or NAME=MODEL@PATH[:HEAD], '
                         'e.g. student=out/checkpoint.pth:dist or teacher=regnety_160@regnety_160-a5fe301d.pth')
    head = 'avg'
    stem, colon, suffix = spec.rpartition(':')
    if colon and suffix in HEADS and not os.path.isfile(spec):
        spec, head = stem, suffix
    model = None
    prefix, at, rest = spec.partition('@')
    if at and prefix and rest and '/' not in prefix and not os.path.isfile(spec):
        model, spec = prefix, rest
    return Entry(name, model, spec, head)


def _named(text: str) -> tuple:
    """``NAME=LOG`` -> (NAME, LOG); a plain LOG is named after its folder (main.py's --output_dir)."""
    name, sep, path = text.partition('=')
    if sep and name and path and os.sep not in name and not os.path.isfile(text):
        return name, path
    return os.path.basename(os.path.dirname(os.path.abspath(text))) or text, text


def _check_output(path: Optional[str], flag: str) -> None:
    """Refuse an output file whose folder is missing before any work, not after an hour of evaluation."""
    if path:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ValueError(f'{flag} {path}: the folder {folder} does not exist or is not writable')


def _write_json(path: Optional[str], figures: Dict[str, Any]) -> None:
    if path:
        with open(path, 'w') as f:
            f.write(json.dumps(figures, indent=2) + '\n')
        print(f'wrote {path}')


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[f'{c:.3f}' if isinstance(c, float) else str(c) for c in row]
                                          for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return '\n'.join('  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def _setup(args: argparse.Namespace, *checkpoints: str) -> torch.device:
    """The device, once the checkpoint files exist and the output files can be written (before any data is
    read); prints what made the report (command, versions, device)."""
    for path in checkpoints:
        if not path.startswith(('https://', 'http://')) and not os.path.isfile(path):
            raise utils.CheckpointError(f'checkpoint {path}: no such file')
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"unknown --device '{args.device}' (cpu, cuda, cuda:1, ...)") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda, but no GPU is visible: use --device cpu')
    _check_output(getattr(args, 'json', None), '--json')
    _check_output(getattr(args, 'out', None), '--out')
    print(f'analyze.py {" ".join(args.argv)}')
    print(f'torch {torch.__version__}, timm {timm.__version__}, device {device}')
    return device


def _model(args: argparse.Namespace, path: str, nb_classes: Optional[int], name: Optional[str] = None) -> nn.Module:
    return load_model(path, name or args.model, args.input_size, nb_classes, args.ema)


def _distilled_model(args: argparse.Namespace, analysis: str) -> nn.Module:
    """The model of the checkpoint, refused before any data is read when it has no distillation token. Its classes
    are --nb-classes, else its checkpoint's."""
    model = _model(args, args.checkpoint, args.nb_classes)
    _require_distilled(model, analysis)
    return model


def _check_classes(model: nn.Module, nb_classes: int, args: argparse.Namespace) -> None:
    """Refuse a classifier of another number of classes than the data's (--nb-classes, else the dataset's)."""
    if model.num_classes != nb_classes:
        more = model.num_classes > nb_classes
        hint = f', or --nb-classes {model.num_classes} to evaluate it on these images' if more else ''
        raise ValueError(f'{args.checkpoint} classifies {model.num_classes} classes and --data-set {args.data_set} has '
                         f'{nb_classes}: give a checkpoint trained on this dataset{hint}')


def run_heads(args: argparse.Namespace) -> None:
    device = _setup(args, args.checkpoint)
    model = _distilled_model(args, 'heads')
    loader, nb_classes = build_loader(args, device)
    _check_classes(model, nb_classes, args)
    figures = head_accuracies(model, loader, device, builders.amp_dtype_of(args.precision, device))
    print(f'{len(loader.dataset)} images of --data-set {args.data_set}, {"EMA " if args.ema else ""}weights of '
          f'{args.checkpoint}')
    print(_table(('head', 'Acc@1', 'Acc@5'), [(h, figures[h]['acc1'], figures[h]['acc5']) for h in HEADS]))
    _write_json(args.json, figures)


def run_tokens(args: argparse.Namespace) -> None:
    device = _setup(args, args.checkpoint)
    model = _distilled_model(args, 'tokens')
    loader, nb_classes = build_loader(args, device)
    _check_classes(model, nb_classes, args)
    figures = token_cosines(model, loader, device, builders.amp_dtype_of(args.precision, device))
    print(f'cos(class token, distillation token) over {len(loader.dataset)} images (paper: 0.06 for the learned '
          'tokens, 0.93 after the last block)')
    rows = [('learned tokens', figures['params'], '')] + [
        (f'after block {i}', c, n) for i, (c, n) in enumerate(zip(figures['blocks'], figures['blocks_normed']))]
    print(_table(('where', 'cosine', 'after the final norm'), rows))
    _write_json(args.json, figures)


def run_agree(args: argparse.Namespace) -> None:
    entries = [parse_entry(text) for text in args.entries]
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f'agree: names must differ, got {", ".join(names)}')
    device = _setup(args, *(e.path for e in entries))
    loader, nb_classes = build_loader(args, device)
    # Every model loads before any pass over the data, so that a bad entry fails at once.
    classifiers = []
    for entry in entries:
        model = _model(args, entry.path, nb_classes, entry.model)
        if entry.head == 'dist' and not isinstance(model, models.DistilledVisionTransformer):
            raise ValueError(f'agree entry {entry.name}: {type(model).__name__} has no distillation head; use '
                             f'{entry.name}=...:cls or :avg')
        classifiers.append(model)
    amp_dtype = builders.amp_dtype_of(args.precision, device)
    labels = labels_of(loader)
    predictions = []
    for entry, model in zip(entries, classifiers):
        predictions.append(top1_predictions(model, loader, device, entry.head, amp_dtype))
        model.cpu()
    accuracies = [top1_accuracy(p, labels) for p in predictions]
    matrix = disagreement(predictions)
    print(f'Fraction of the {len(labels)} images on which the top-1 classes differ (paper, Table 4)')
    print(_table(('', 'Acc@1', *names), [(n, a, *row) for n, a, row in zip(names, accuracies, matrix.tolist())]))
    _write_json(args.json, {'names': names, 'acc1': accuracies, 'disagreement': matrix.tolist()})


def read_image(path: str) -> Image.Image:
    """An image file as RGB, or a ValueError that names it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'image {path}: no such file')
    try:
        with Image.open(path) as image:
            return image.convert('RGB')
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f'cannot read image {path} ({e}): give an image file that Pillow reads') from None


def run_attention(args: argparse.Namespace) -> None:
    device = _setup(args, args.checkpoint)
    image = build_eval_transform(args.input_size, args.eval_crop_ratio)(read_image(args.image))  # [3, H, W]
    model = _model(args, args.checkpoint, args.nb_classes).to(device)
    maps = attention_maps(model, image, args.method)
    plot_attention(image, maps, args.method, args.out, args.dpi)
    print(f'{METHODS[args.method]}, {tuple(maps.shape[1:])} patches: wrote {args.out}')
    names = ('cls', 'dist')[:len(maps)]
    _write_json(args.json, {'method': args.method, 'maps': {n: m.tolist() for n, m in zip(names, maps)}})


def run_curves(args: argparse.Namespace) -> None:
    _check_output(args.out, '--out')
    logs: Dict[str, List[Dict[str, Any]]] = {}
    for text in args.logs:
        name, path = _named(text)
        if name in logs:
            raise ValueError(f'two runs named {name}: name them, e.g. {name}2={path}')
        logs[name] = read_log(path)
    plot_curves(logs, args.out, args.dpi)
    rows = []
    for name, records in logs.items():
        acc = [r['test_acc1'] for r in records if 'test_acc1' in r]
        ema = [r['test_ema_acc1'] for r in records if 'test_ema_acc1' in r]
        rows.append((name, len(records), records[-1].get('train_loss', float('nan')), acc[-1] if acc else float('nan'),
                     max(acc, default=float('nan')), max(ema, default=float('nan'))))
    print(_table(('run', 'epochs', 'last train loss', 'last top-1', 'best top-1', 'best EMA top-1'), rows))
    print(f'wrote {args.out}')


def _flags(parser: argparse.ArgumentParser, func: Callable, data: bool = True) -> None:
    """The flags of the commands that load checkpoints, spelled and defaulted as main.py's; ``func`` runs it."""
    parser.set_defaults(func=func)
    group = parser.add_argument_group('Model')
    group.add_argument('--model', default=None, metavar='MODEL',
                       help='model of the checkpoint(s): one of the eight DeiT models or any timm model (default: the '
                            f'one main.py stored in the checkpoint, else main.py\'s default {DEFAULT_MODEL})')
    group.add_argument('--ema', action='store_true',
                       help="analyse the checkpoint's EMA weights (model_ema) instead of its model weights "
                            '(default: off)')
    group.add_argument('--input-size', default=224, type=int, help='image side fed to the model (default: %(default)s)')
    group.add_argument('--eval-crop-ratio', default=0.875, type=float,
                       help='center-crop ratio of the evaluation transform (default: %(default)s)')
    group.add_argument('--nb-classes', default=None, type=int,
                       help='classes of the classifier (default: those of --data-set; for attention, those of the '
                            'checkpoint)')
    group = parser.add_argument_group('Run')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                       help='cuda or cpu (default: cuda when a GPU is present, else cpu; here %(default)s)')
    group.add_argument('--json', default=None, metavar='FILE', help='also write the figures to this JSON file')
    group.add_argument('--debug', action='store_true', help='show the traceback of errors (default: one line)')
    if not data:  # attention: one image, in full precision
        return
    group.add_argument('--precision', default='auto', choices=('auto', 'fp16', 'bf16', 'off'),
                       help="mixed precision, as main.py's: auto is fp16 on CUDA and off on the CPU (default: "
                            '%(default)s)')
    group = parser.add_argument_group('Data (the validation split, as main.py --eval reads it)')
    group.add_argument('--data-set', default='IMNET', choices=DATA_SETS,
                       help='dataset; DIGITS is built in and needs no download (default: %(default)s)')
    group.add_argument('--data-path', default='/datasets01/imagenet_full_size/061417/',
                       help='dataset folder (default: %(default)s, main.py\'s)')
    group.add_argument('--inat-category', default='name', choices=INAT_CATEGORIES,
                       help='iNaturalist label level (default: %(default)s)')
    group.add_argument('--skip-corrupt', action='store_true',
                       help='skip unreadable image files instead of stopping (default: off)')
    group.add_argument('--batch-size', default=64, type=int,
                       help="main.py's --batch-size: batches of 1.5 x this many images (default: %(default)s)")
    group.add_argument('--num_workers', '--num-workers', default=10, type=int,
                       help='data loading processes (default: %(default)s)')


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('analyze.py', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    sub = commands.add_parser('heads', help='top-1 / top-5 of the class head, the distillation head and their average',
                              description='Top-1 / top-5 (%) of the class head, the distillation head and their '
                                          'average (Table 5), each as main.py --eval --eval-head H prints it. '
                                          'JSON: {"cls": {"acc1", "acc5"}, "dist": ..., "avg": ...}.')
    sub.add_argument('checkpoint', metavar='CHECKPOINT', help='file or https URL of a distilled model')
    _flags(sub, run_heads)

    sub = commands.add_parser('tokens', help='cosine similarity of the class and distillation tokens',
                              description='Cosine similarity of the class and distillation tokens: learned '
                                          'parameters, then after each block (its output, before the final norm) '
                                          'the mean over the images. Paper: 0.06, then up to 0.93. '
                                          'JSON: {"params": float, "blocks": [one per block]}.')
    sub.add_argument('checkpoint', metavar='CHECKPOINT', help='file or https URL of a distilled model')
    _flags(sub, run_tokens)

    sub = commands.add_parser('agree', help='pairwise disagreement of top-1 predictions (Table 4)',
                              description='Fraction of the images on which the top-1 classes of two classifiers '
                                          'differ, for every pair, and the top-1 (%) of each. '
                                          'JSON: {"names": [...], "acc1": [...], "disagreement": [[...]]}.')
    sub.add_argument('entries', nargs='+', metavar='ENTRY',
                     help='NAME=PATH[:HEAD] (a checkpoint of --model) or NAME=MODEL@PATH[:HEAD] (any timm model, '
                          'e.g. t=regnety_160@regnety_160-a5fe301d.pth); HEAD is cls, dist or avg (default: avg); '
                          '--ema applies to every entry')
    _flags(sub, run_agree)

    sub = commands.add_parser('attention', help='where the class and distillation tokens look in one image',
                              description='Attention of the class token (and the distillation token) to the '
                                          "patches of one image (after main.py's evaluation transform), drawn over "
                                          'it side by side. JSON: {"method", "maps": {"cls": [[...]], ...}}.')
    sub.add_argument('image', metavar='IMAGE', help='image file')
    sub.add_argument('checkpoint', metavar='CHECKPOINT', help='file or https URL of a DeiT / ViT model')
    sub.add_argument('--out', required=True, metavar='FILE.png', help='PNG file to write')
    sub.add_argument('--method', default='rollout', choices=tuple(METHODS),
                     help=f'rollout: {METHODS["rollout"]}; last: {METHODS["last"]} (default: %(default)s)')
    sub.add_argument('--dpi', default=100, type=int,
                     help='dots per inch: the PNG is (1 + tokens) x 3 by 3.5 inches (default: %(default)s)')
    _flags(sub, run_attention, data=False)

    sub = commands.add_parser('curves', help='train loss, test top-1 and learning rate per epoch of main.py runs',
                              description="Train loss, test top-1 (dashed: the EMA's, when logged) and learning "
                                          "rate per epoch, from main.py's log.txt files, runs overlaid.")
    sub.add_argument('logs', nargs='+', metavar='LOG',
                     help="log.txt of a run, labelled with its folder's name, or NAME=LOG to name it")
    sub.add_argument('--out', required=True, metavar='FILE.png', help='PNG file to write')
    sub.add_argument('--dpi', default=100, type=int,
                     help='dots per inch: the PNG is 15 x 4.5 inches (default: %(default)s)')
    sub.add_argument('--debug', action='store_true', help='show the traceback of errors (default: one line)')
    sub.set_defaults(func=run_curves)
    return parser


def _one_line(error: BaseException) -> str:
    """The error's message on one line; for one raised in a DataLoader worker, the worker's own message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith('Caught ') and any(line.startswith('Original Traceback') for line in lines):
        return lines[-1].split(': ', 1)[-1]
    return ' '.join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    """``python analyze.py``: run a subcommand; a user error exits with status 2 and one line on stderr."""
    parser = get_args_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        args.func(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        parser.exit(EXIT_USER_ERROR, f'{parser.prog} {args.command}: error: {_one_line(e)}\n')


if __name__ == '__main__':
    main()

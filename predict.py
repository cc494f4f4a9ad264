"""Top-k predictions for single images with a DeiT model: the original's torch.hub walkthrough as one command.

    python predict.py cat.jpg --model deit_base_patch16_224
    Prediction index 0: tabby                    , score: 0.567
    Prediction index 1: tiger cat                , score: 0.134
    ...

Weights come from the official URL through torch.hub's cache (``$TORCH_HOME/hub/checkpoints``, so a
file already there is used offline), or from ``--checkpoint``: an official file (``{'model': ...}``)
or a checkpoint written by main.py (its EMA weights when it has them, its stored class names). The
preprocessing is datasets.py's evaluation transform, the one main.py evaluates with.
"""
import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from PIL import Image
from timm.data import ImageNetInfo

import models
import utils
from datasets import build_eval_transform

DEFAULT_MODEL = 'deit_base_patch16_224'


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('predict.py', description='Top-k class predictions for images with a DeiT model.')
    parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files to classify')
    parser.add_argument('--model', default=None, type=str,
                        help=f'model name (default: the one stored in --checkpoint, else {DEFAULT_MODEL})')
    parser.add_argument('--checkpoint', default='', type=str,
                        help='weights file or https URL: an official DeiT file or a checkpoint written by main.py '
                             '(default: the official weights of --model, through the torch.hub cache)')
    parser.add_argument('--topk', default=5, type=int, help='number of classes printed per image (default: 5)')
    parser.add_argument('--input-size', '--input_size', default=None, type=int,
                        help="image size fed to the model (default: the checkpoint's training size, "
                             "else the model's own, 224 or 384)")
    parser.add_argument('--eval-crop-ratio', default=None, type=float,
                        help="center crop ratio: images are resized to input-size / ratio before the crop, "
                             "as in main.py's evaluation (default: the checkpoint's, else 0.875)")
    parser.add_argument('--head', '--eval-head', dest='head', default='avg', choices=models.EVAL_HEADS,
                        help='for distilled models: average of both heads, class head or distillation head '
                             '(default: avg, the paper\'s)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='device to run on (default: cuda when available, else cpu)')
    parser.add_argument('--json', action='store_true',
                        help='print one JSON document with every prediction instead of the text lines')
    return parser


def imagenet_class_names() -> List[str]:
    """The 1000 ImageNet-1k class names in index order, from the WordNet lemmas shipped with timm.

    The first lemma of each class ("tabby" of "tabby, tabby cat") is the name in pytorch/hub's
    imagenet_classes.txt, the file the original walkthrough reads, so the lines read as its output.
    """
    return [description.split(', ')[0] for description in ImageNetInfo('imagenet-1k').label_descriptions()]


def class_names(num_classes: int, stored: Optional[Sequence[str]] = None) -> List[str]:
    """Names for the outputs of a classifier with ``num_classes`` outputs.

    Args:
        num_classes: size of the classifier head.
        stored: the class list a main.py checkpoint holds (its dataset's ``.classes``), if any.
    """
    imagenet = ImageNetInfo('imagenet-1k')
    if stored is not None and len(stored) == num_classes:
        # An ImageNet folder stores WordNet ids (n01440764, ...); the readable names say more.
        if list(stored) == imagenet.label_names():
            return imagenet_class_names()
        return [str(name) for name in stored]
    if num_classes == imagenet.num_classes():
        return imagenet_class_names()
    return [str(i) for i in range(num_classes)]


def _weights_of(checkpoint: Dict[str, Any], path: str) -> Dict[str, torch.Tensor]:
    """The weights to predict with: main.py's EMA weights when kept (main.py evaluates them too), else 'model'."""
    for key in ('model_ema', 'model'):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    if 'head.weight' in checkpoint:  # a bare state_dict, as main.py's --finetune accepts
        return checkpoint
    raise ValueError(f"{path} holds no DeiT weights: expected a 'model' state_dict (official files and "
                     "main.py's checkpoints have one) or a bare state_dict")


def _check_name(name: str) -> str:
    if name not in models.DEIT_MODELS:
        raise ValueError(f"Unknown model '{name}'; choose one of {', '.join(models.DEIT_MODELS)}")
    return name


def _pretrained_model(args: argparse.Namespace) -> nn.Module:
    """The official weights of --model, through torch.hub's cache (models.build_model with pretrained=True)."""
    name = _check_name(args.model or DEFAULT_MODEL)
    kwargs = {} if args.input_size is None else {'img_size': args.input_size}
    try:
        return models.build_model(name, pretrained=True, **kwargs)
    except OSError as exc:  # urllib's URLError is an OSError: no network and nothing in the cache
        raise ValueError(f'cannot get the weights of {name} from {models.MODEL_URLS[name]} ({exc}); '
                         f'put that file in {torch.hub.get_dir()}/checkpoints/ or pass --checkpoint') from exc


def _checkpoint_model(args: argparse.Namespace) -> Tuple[nn.Module, Dict[str, Any], Optional[List[str]]]:
    """The model of --checkpoint; returns (model, the checkpoint's training args, its stored class names)."""
    checkpoint = utils.load_checkpoint(args.checkpoint)
    state_dict = _weights_of(checkpoint, args.checkpoint)
    train_args = checkpoint.get('args') or {}
    if isinstance(train_args, argparse.Namespace):  # checkpoints of the original code pickled the Namespace
        train_args = vars(train_args)
    name = _check_name(args.model or train_args.get('model') or DEFAULT_MODEL)
    if 'head.weight' not in state_dict:
        raise ValueError(f"{args.checkpoint} has no classifier ('head.weight'): not a classification checkpoint")
    # The head's shape gives the number of classes, whatever dataset the checkpoint was trained on.
    kwargs = {'num_classes': state_dict['head.weight'].shape[0]}
    input_size = args.input_size if args.input_size is not None else train_args.get('input_size')
    if input_size is not None:
        kwargs['img_size'] = input_size
    model = models.build_model(name, **kwargs)
    models.interpolate_pos_embed(model, state_dict)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        problems = '; '.join(line.strip()[:200] for line in str(exc).splitlines()[1:4] if line.strip())
        raise ValueError(f'{args.checkpoint} does not fit {name} ({problems}): pass the right --model') from None
    return model, train_args, checkpoint.get('classes')


def load_model(args: argparse.Namespace) -> Tuple[nn.Module, List[str], int, float]:
    """Build the model with its weights; returns (model in eval mode, class names, input size, crop ratio)."""
    if args.checkpoint:
        model, train_args, stored_classes = _checkpoint_model(args)
    else:
        model, train_args, stored_classes = _pretrained_model(args), {}, None
    models.set_eval_head(model, args.head)
    input_size = model.patch_embed.img_size[0]
    crop_ratio = args.eval_crop_ratio if args.eval_crop_ratio is not None else train_args.get('eval_crop_ratio', 0.875)
    return model.eval(), class_names(model.num_classes, stored_classes), input_size, crop_ratio


def read_image(path: str) -> Image.Image:
    """The image as RGB, fully decoded so that a truncated file fails here rather than in the transform."""
    with Image.open(path) as image:
        return image.convert('RGB')


@torch.inference_mode()
def predict(model: nn.Module, image: torch.Tensor, topk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """image: [3, H, W] normalised -> (scores [k], class indices [k]) of the k most likely classes."""
    logits = model(image.unsqueeze(0))  # [1, num_classes]
    scores = torch.softmax(logits.float(), dim=-1)[0]
    return torch.topk(scores, k=min(topk, scores.numel()))


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device '{name}' (cpu, cuda, cuda:1, ...)") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda, but no GPU is visible: use --device cpu')
    return device


def main(args: argparse.Namespace) -> int:
    """Print the predictions for every readable image; returns the exit code: 0, 1 if some image was unreadable,
    2 for a user error (a bad flag, an image file that does not exist)."""
    try:
        device = _device(args.device)
        if args.topk < 1:
            raise ValueError('--topk must be at least 1')
        missing = [path for path in args.images if not os.path.isfile(path)]
        if missing:  # before the weights, which may be a download
            raise ValueError(f'no such image file: {", ".join(missing)}')
        model, names, input_size, crop_ratio = load_model(args)
        transform = build_eval_transform(input_size, crop_ratio)
    except ValueError as exc:
        print(f'predict.py: error: {exc}', file=sys.stderr)
        return 2
    model.to(device)

    results, failed = [], False
    for path in args.images:
        try:
            image = read_image(path)
        except (OSError, Image.DecompressionBombError) as exc:
            print(f'error: cannot read image {path}: {exc}', file=sys.stderr)
            failed = True
            continue
        scores, indices = predict(model, transform(image).to(device), args.topk)
        predictions = [{'rank': rank, 'index': int(index), 'name': names[index], 'score': float(score)}
                       for rank, (score, index) in enumerate(zip(scores.tolist(), indices.tolist()))]
        results.append({'image': path, 'predictions': predictions})
        if not args.json:
            if len(args.images) > 1:
                print(f'==> {path} <==')
            for p in predictions:
                print(f"Prediction index {p['rank']}: {p['name']:<25}, score: {p['score']:.3f}")
            sys.stdout.flush()  # keep the order of these lines and the errors on stderr when both go to a terminal
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main(get_args_parser().parse_args()))

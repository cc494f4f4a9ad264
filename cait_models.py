"""CaiT: the models of the original's cait_models.py, registered in timm's registry under the original's names.

CaiT (Touvron et al., 2021, "Going deeper with Image Transformers", arXiv 2103.17239) adds LayerScale and
talking-heads attention to the patch blocks, then class-attention blocks (``blocks_token_only``) in which only the
class token attends. timm's ``Cait`` is the original's class (taken from it, with the same ``state_dict`` keys and
the same forward), so the models are timm's class with the original's configurations, names, arguments and
weight files.
"""
from functools import partial
from typing import Any, Dict, Tuple

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model
from timm.models.cait import Cait

import utils

_BASE_URL = 'https://dl.fbaipublicfiles.com/deit/'
# The official weights, trained with distillation on ImageNet-1k. The files hold {'model': state_dict} with the
# 'module.' prefix of DistributedDataParallel, which utils.weights_of removes.
MODEL_URLS: Dict[str, str] = {
    'cait_XXS24_224': _BASE_URL + 'XXS24_224.pth',
    'cait_XXS24': _BASE_URL + 'XXS24_384.pth',
    'cait_XXS36_224': _BASE_URL + 'XXS36_224.pth',
    'cait_XXS36': _BASE_URL + 'XXS36_384.pth',
    'cait_XS24': _BASE_URL + 'XS24_384.pth',
    'cait_S24_224': _BASE_URL + 'S24_224.pth',
    'cait_S24': _BASE_URL + 'S24_384.pth',
    'cait_S36': _BASE_URL + 'S36_384.pth',
    'cait_M36': _BASE_URL + 'M36_384.pth',
    'cait_M48': _BASE_URL + 'M48_448.pth',
}
MODELS: Tuple[str, ...] = tuple(MODEL_URLS)
# The image size of each file (in its name).
_IMG_SIZES = {name: int(url.rsplit('_', 1)[1].split('.')[0]) for name, url in MODEL_URLS.items()}

default_cfgs = {  # read by timm's register_model: the input size of each name (builders.create_model uses it)
    name: dict(url=MODEL_URLS[name], num_classes=1000, input_size=(3, size, size), crop_pct=1.0,
               interpolation='bicubic', fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
               first_conv='patch_embed.proj', classifier='head')
    for name, size in _IMG_SIZES.items()}


def _create(name: str, pretrained: bool, **kwargs: Any) -> Cait:
    """The one builder behind the registered names; takes the original's arguments (``cait_models``)."""
    # timm.create_model passes its pretrained-config kwargs to every entry point; the weights come from the
    # original's URLs instead.
    for key in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir'):
        kwargs.pop(key, None)
    # The original's names for timm's arguments.
    for original, ours in (('init_scale', 'init_values'), ('mlp_ratio_clstk', 'mlp_ratio_token_only')):
        if original in kwargs:
            kwargs[ours] = kwargs.pop(original)
    # The original's drop_rate is dropout after the position embedding and inside the patch blocks (attention
    # projection, MLP), none before the head; timm's drop_rate is the head's.
    drop_rate = kwargs.pop('drop_rate', 0.0)
    model_args = dict(patch_size=16, mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                      depth_token_only=2, pos_drop_rate=drop_rate, proj_drop_rate=drop_rate)
    model_args.update(kwargs)
    img_size = model_args.get('img_size', 224)
    if pretrained and img_size != _IMG_SIZES[name]:
        raise ValueError(f'The official weights of {name} are for img_size={_IMG_SIZES[name]}, not {img_size}: build '
                         f'it at that size, or finetune them to another (main.py --finetune {MODEL_URLS[name]})')
    model = Cait(**model_args)
    model.pretrained_cfg = dict(default_cfgs[name], architecture=name, input_size=(3, img_size, img_size),
                                num_classes=model.num_classes)
    if pretrained:
        utils.load_pretrained(model, MODEL_URLS[name])
    return model


@register_model
def cait_XXS24_224(pretrained: bool = False, **kwargs: Any) -> Cait:
    model_args = dict(img_size=224, embed_dim=192, depth=24, num_heads=4, init_values=1e-5)
    return _create('cait_XXS24_224', pretrained, **dict(model_args, **kwargs))


@register_model
def cait_XXS24(pretrained: bool = False, **kwargs: Any) -> Cait:
    model_args = dict(img_size=384, embed_dim=192, depth=24, num_heads=4, init_values=1e-5)
    return _create('cait_XXS24', pretrained, **dict(model_args, **kwargs))


@register_model
def cait_XXS36_224(pretrained: bool = False, **kwargs: Any) -> Cait:
    model_args = dict(img_size=224, embed_dim=192, depth=36, num_heads=4, init_values=1e-5)
    return _create('cait_XXS36_224', pretrained, **dict(model_args, **kwargs))


@register_model
def cait_XXS36(pretrained: bool = False, **kwargs: Any) -> Cait:
    model_args = dict(img_size=384, embed_dim=192, depth=36, num_heads=4, init_values=1e-5)
    return _create('cait_XXS36', pretrained, **dict(model_args, **kwargs))


@register_model
def cait_XS24(pretrained: bool = False, **kwargs: Any) -> Cait:
    model_args = dict(img_size=384, embed_dim=288, depth=24, num_heads=6, init_values=1e-5)
    return _create('cait_XS24', pretrained, **dict(model_args, **kwargs))


@register_model
def cait_S24_224(pretrained: bool = False, **kwargs: Any) -> Cait:
    model_args = dict(img_size=224, embed_dim=384, depth=24, num_heads=8, init_values=1e-5)
    return _create('cait_S24_224', pretrained, **dict(model_args, **kwargs))


@register_model
def cait_S24(pretrained: bool = False, **kwargs: Any) -> Cait:
    model_args = dict(img_size=384, embed_dim=384, depth=24, num_heads=8, init_values=1e-5)
    return _create('cait_S24', pretrained, **dict(model_args, **kwargs))


@register_model
def cait_S36(pretrained: bool = False, **kwargs: Any) -> Cait:
    model_args = dict(img_size=384, embed_dim=384, depth=36, num_heads=8, init_values=1e-6)
    return _create('cait_S36', pretrained, **dict(model_args, **kwargs))


@register_model
def cait_M36(pretrained: bool = False, **kwargs: Any) -> Cait:
    model_args = dict(img_size=384, embed_dim=768, depth=36, num_heads=16, init_values=1e-6)
    return _create('cait_M36', pretrained, **dict(model_args, **kwargs))


@register_model
def cait_M48(pretrained: bool = False, **kwargs: Any) -> Cait:
    model_args = dict(img_size=448, embed_dim=768, depth=48, num_heads=16, init_values=1e-6)
    return _create('cait_M48', pretrained, **dict(model_args, **kwargs))

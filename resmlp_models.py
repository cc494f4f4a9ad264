"""ResMLP: the models of the original's resmlp_models.py, registered in timm's registry under the original's names.

ResMLP (Touvron et al., 2021, "ResMLP: Feedforward networks for image classification with data-efficient
training", arXiv 2105.03404) replaces attention by a linear layer across the patches and LayerNorm by a per-channel
affine map. Written here with the original's ``state_dict`` keys (``patch_embed``, ``blocks.{i}.attn`` for the
patch mixing, ``norm1.alpha`` / ``norm1.beta``, ``gamma_1``, ``mlp``), so that the official files load as they are:
timm's ``MlpMixer`` builds the same network under other names (``stem``, ``linear_tokens``, ``ls1``).
"""
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models import register_model

import utils

_BASE_URL = 'https://dl.fbaipublicfiles.com/deit/'
# The official weights, by (name, weights): trained on ImageNet-1k without ('no_dist') or with ('dist')
# distillation, pretrained on ImageNet-21k and finetuned on 1k ('22k'), or self-supervised with DINO ('dino').
# The files hold a bare state_dict.
MODEL_URLS: Dict[Tuple[str, str], str] = {
    ('resmlp_12', 'no_dist'): _BASE_URL + 'resmlp_12_no_dist.pth',
    ('resmlp_12', 'dist'): _BASE_URL + 'resmlp_12_dist.pth',
    ('resmlp_24', 'no_dist'): _BASE_URL + 'resmlp_24_no_dist.pth',
    ('resmlp_24', 'dist'): _BASE_URL + 'resmlp_24_dist.pth',
    ('resmlp_24', 'dino'): _BASE_URL + 'resmlp_24_dino.pth',
    ('resmlp_36', 'no_dist'): _BASE_URL + 'resmlp_36_no_dist.pth',
    ('resmlp_36', 'dist'): _BASE_URL + 'resmlp_36_dist.pth',
    ('resmlpB_24', 'no_dist'): _BASE_URL + 'resmlpB_24_no_dist.pth',
    ('resmlpB_24', 'dist'): _BASE_URL + 'resmlpB_24_dist.pth',
    ('resmlpB_24', '22k'): _BASE_URL + 'resmlpB_24_22k.pth',
}
MODELS: Tuple[str, ...] = ('resmlp_12', 'resmlp_24', 'resmlp_36', 'resmlpB_24')

default_cfgs = {  # read by timm's register_model: the input size of each name (builders.create_model uses it)
    name: dict(url=MODEL_URLS[name, 'no_dist'], num_classes=1000, input_size=(3, 224, 224), crop_pct=0.9,
               interpolation='bicubic', fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
               first_conv='patch_embed.proj', classifier='head')
    for name in MODELS}


class Affine(nn.Module):
    """ResMLP's normalisation: a learned per-channel scale ``alpha`` and shift ``beta``, no statistics."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + self.beta


class ResMLPBlock(nn.Module):
    """Patch mixing (a linear layer across the N patches, ``attn``), then a channel MLP, each a residual branch
    with LayerScale (``gamma_1``, ``gamma_2``): the original's ``layers_scale_mlp_blocks``."""

    def __init__(self, dim: int, num_patches: int, drop: float = 0., drop_path: float = 0., act_layer: Any = nn.GELU,
                 init_values: float = 1e-4) -> None:
        super().__init__()
        self.norm1 = Affine(dim)
        self.attn = nn.Linear(num_patches, num_patches)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = Affine(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=4 * dim, act_layer=act_layer, drop=drop)
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, D] -> [B, N, D]."""
        mixed = self.attn(self.norm1(x).transpose(1, 2)).transpose(1, 2)  # mixes the N patches of each channel
        x = x + self.drop_path(self.gamma_1 * mixed)
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class ResMLP(nn.Module):
    """Patch embedding, ResMLP blocks, an affine map, the average over patches and a linear head: the original's
    ``resmlp_models``. ``drop_rate`` is the dropout inside the channel MLPs, ``drop_path_rate`` the stochastic
    depth of every block (the same rate for all, as the original), ``init_scale`` the initial LayerScale value.
    The patch-mixing layers are as wide as the number of patches, so a model takes one image size only.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, drop_rate: float = 0., drop_path_rate: float = 0.,
                 act_layer: Any = nn.GELU, init_scale: float = 1e-4) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        self.blocks = nn.ModuleList([
            ResMLPBlock(embed_dim, self.patch_embed.num_patches, drop=drop_rate, drop_path=drop_path_rate,
                        act_layer=act_layer, init_values=init_scale)
            for _ in range(depth)])
        self.norm = Affine(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The original's: linear layers (patch mixing included) truncated normal, std .02, zero biases."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Any = None) -> None:
        """A fresh head for ``num_classes`` classes (none for 0); the pooling stays the average over patches."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] images -> [B, N, D] patch features (the original returned their average)."""
        x = self.patch_embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: [B, N, D] -> logits [B, num_classes] of the average over patches."""
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _weights(pretrained: bool, **chosen: bool) -> str:
    """The original's boolean arguments (dist, dino, in_22k) as one choice of official file."""
    names = [name for name, value in chosen.items() if value]
    if names and not pretrained:
        raise ValueError(f'{names[0]}=True chooses official weights: add pretrained=True')
    if len(names) > 1:
        raise ValueError(f'{" and ".join(f"{n}=True" for n in names)} choose different official weights: give one')
    return {'dist': 'dist', 'dino': 'dino', 'in_22k': '22k'}[names[0]] if names else 'no_dist'


def _create(name: str, pretrained: bool, choices: Dict[str, bool], **kwargs: Any) -> ResMLP:
    """The one builder behind the registered names; ``choices`` are the original's arguments that pick the
    official file (dist, dino, in_22k)."""
    weights = _weights(pretrained, **choices)
    # timm.create_model passes its pretrained-config kwargs to every entry point; the weights come from the
    # original's URLs instead.
    for key in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir'):
        kwargs.pop(key, None)
    img_size = kwargs.get('img_size', 224)
    if pretrained and img_size != 224:
        raise ValueError(f'The official weights of {name} are for img_size=224, not {img_size}: the patch-mixing '
                         'layers are as wide as the number of patches')
    model = ResMLP(**kwargs)
    model.pretrained_cfg = dict(default_cfgs[name], architecture=name, input_size=(3, img_size, img_size),
                                url=MODEL_URLS[name, weights], num_classes=model.num_classes)
    if pretrained:
        utils.load_pretrained(model, MODEL_URLS[name, weights])
    return model


@register_model
def resmlp_12(pretrained: bool = False, dist: bool = False, **kwargs: Any) -> ResMLP:
    model_args = dict(patch_size=16, embed_dim=384, depth=12, init_scale=0.1)
    return _create('resmlp_12', pretrained, dict(dist=dist), **dict(model_args, **kwargs))


@register_model
def resmlp_24(pretrained: bool = False, dist: bool = False, dino: bool = False, **kwargs: Any) -> ResMLP:
    model_args = dict(patch_size=16, embed_dim=384, depth=24, init_scale=1e-5)
    return _create('resmlp_24', pretrained, dict(dist=dist, dino=dino), **dict(model_args, **kwargs))


@register_model
def resmlp_36(pretrained: bool = False, dist: bool = False, **kwargs: Any) -> ResMLP:
    model_args = dict(patch_size=16, embed_dim=384, depth=36, init_scale=1e-6)
    return _create('resmlp_36', pretrained, dict(dist=dist), **dict(model_args, **kwargs))


@register_model
def resmlpB_24(pretrained: bool = False, dist: bool = False, in_22k: bool = False, **kwargs: Any) -> ResMLP:
    model_args = dict(patch_size=8, embed_dim=768, depth=24, init_scale=1e-6)
    return _create('resmlpB_24', pretrained, dict(dist=dist, in_22k=in_22k), **dict(model_args, **kwargs))

"""DeiT III and the "three things" ViTs: the models of the original's models_v2.py, registered in timm's registry.

DeiT III (Touvron et al., 2022, "DeiT III: Revenge of the ViT", arXiv 2204.07118) trains plain ViTs with LayerScale;
"Three things everyone should know about Vision Transformers" (Touvron et al., 2022, arXiv 2203.09795) adds deeper
and parallel variants. One class, ``DeiT3``, builds all of them, with the original's ``state_dict`` keys
(``gamma_1``, ``gamma_2``, and ``norm11`` / ``attn1`` / ``mlp1`` / ``gamma_1_1`` ... for the second branch of a
parallel block), so that the official files load strictly. Written here because timm's ``VisionTransformer``
names the LayerScale and parallel-branch parameters differently (``ls1.gamma``, ``attns.0``) and draws the
stochastic depth rate linearly over the blocks, where the original draws every block at the same rate.
"""
from functools import partial
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models import register_model
from timm.models.vision_transformer import Attention

import utils

_BASE_URL = 'https://dl.fbaipublicfiles.com/deit/'
# The official weights, by (name, img_size, pretrained_21k): the files the original's entry points build the URL
# of. The 21k files are pretrained on ImageNet-21k and finetuned on ImageNet-1k. The huge model's files end in
# _v1, as the original's code names them (its README links the 1k file without _v1).
MODEL_URLS: Dict[Tuple[str, int, bool], str] = {
    ('deit_small_patch16_LS', 224, False): _BASE_URL + 'deit_3_small_224_1k.pth',
    ('deit_small_patch16_LS', 384, False): _BASE_URL + 'deit_3_small_384_1k.pth',
    ('deit_small_patch16_LS', 224, True): _BASE_URL + 'deit_3_small_224_21k.pth',
    ('deit_small_patch16_LS', 384, True): _BASE_URL + 'deit_3_small_384_21k.pth',
    ('deit_medium_patch16_LS', 224, False): _BASE_URL + 'deit_3_medium_224_1k.pth',
    ('deit_medium_patch16_LS', 224, True): _BASE_URL + 'deit_3_medium_224_21k.pth',
    ('deit_base_patch16_LS', 224, False): _BASE_URL + 'deit_3_base_224_1k.pth',
    ('deit_base_patch16_LS', 384, False): _BASE_URL + 'deit_3_base_384_1k.pth',
    ('deit_base_patch16_LS', 224, True): _BASE_URL + 'deit_3_base_224_21k.pth',
    ('deit_base_patch16_LS', 384, True): _BASE_URL + 'deit_3_base_384_21k.pth',
    ('deit_large_patch16_LS', 224, False): _BASE_URL + 'deit_3_large_224_1k.pth',
    ('deit_large_patch16_LS', 384, False): _BASE_URL + 'deit_3_large_384_1k.pth',
    ('deit_large_patch16_LS', 224, True): _BASE_URL + 'deit_3_large_224_21k.pth',
    ('deit_large_patch16_LS', 384, True): _BASE_URL + 'deit_3_large_384_21k.pth',
    ('deit_huge_patch14_LS', 224, False): _BASE_URL + 'deit_3_huge_224_1k_v1.pth',
    ('deit_huge_patch14_LS', 224, True): _BASE_URL + 'deit_3_huge_224_21k_v1.pth',
}
# Every model of the family normalises with eps 1e-6.
_LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)


def _cfg(img_size: int = 224) -> Dict[str, Any]:
    return dict(num_classes=1000, input_size=(3, img_size, img_size), crop_pct=0.875, interpolation='bicubic',
                fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv='patch_embed.proj', classifier='head')


class Block(nn.Module):
    """A pre-norm transformer block, optionally with LayerScale and with two parallel branches.

    The original's four block classes in one: ``Block`` and ``Layer_scale_init_Block`` (one branch, without and
    with LayerScale), ``Block_paralx2`` and ``Layer_scale_init_Block_paralx2`` (two branches whose outputs are
    added to the residual stream). Attribute names are the original's: branch 0 is ``norm1 / attn / gamma_1`` and
    ``norm2 / mlp / gamma_2``, branch 1 ``norm11 / attn1 / gamma_1_1`` and ``norm21 / mlp1 / gamma_2_1``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = True, attn_drop: float = 0.,
                 drop_path: float = 0., norm_layer: Any = nn.LayerNorm, act_layer: Any = nn.GELU,
                 layer_scale: bool = False, init_values: float = 1e-4, parallel: bool = False) -> None:
        super().__init__()
        suffixes = ('', '1') if parallel else ('',)
        # (norm, sublayer, LayerScale) attribute names of each branch, for the attention and the MLP residual.
        self.attn_branches = [(f'norm1{s}', f'attn{s}', f'gamma_1{"_" + s if s else ""}') for s in suffixes]
        self.mlp_branches = [(f'norm2{s}', f'mlp{s}', f'gamma_2{"_" + s if s else ""}') for s in suffixes]
        self.layer_scale = layer_scale
        # Registered in the original's order (norms, then sublayers, then LayerScale), so that the parameters and a
        # state_dict list in the same order as the original's.
        for norm, _, _ in self.attn_branches:
            setattr(self, norm, norm_layer(dim))
        for _, attn, _ in self.attn_branches:
            setattr(self, attn, Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop))
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        for norm, _, _ in self.mlp_branches:
            setattr(self, norm, norm_layer(dim))
        for _, mlp, _ in self.mlp_branches:
            setattr(self, mlp, Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer))
        if layer_scale:
            for _, _, gamma in self.attn_branches + self.mlp_branches:
                setattr(self, gamma, nn.Parameter(init_values * torch.ones(dim)))

    def _residual(self, x: torch.Tensor, branches: List[Tuple[str, str, str]]) -> torch.Tensor:
        """x plus each branch's sublayer of its normalised input, scaled by its LayerScale, through stochastic depth."""
        out = x
        for norm, layer, gamma in branches:
            y = getattr(self, layer)(getattr(self, norm)(x))
            out = out + self.drop_path(getattr(self, gamma) * y if self.layer_scale else y)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, D] -> [B, N, D]."""
        x = self._residual(x, self.attn_branches)
        return self._residual(x, self.mlp_branches)


class DeiT3(nn.Module):
    """ViT with a class token, LayerScale and parallel blocks as options: the original's ``vit_models``.

    The position embedding covers the patches only; the class token is added after it (timm's
    ``no_embed_class=True``). ``drop_rate`` is dropout before the head, ``drop_path_rate`` the stochastic depth of
    every block (the same rate for all, as the original), ``init_scale`` the initial LayerScale value.
    ``forward_features`` returns the normalised tokens [B, 1 + N, D] and ``forward_head`` reads the class token,
    as timm's models do (the original's ``forward_features`` returned the class token).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.,
                 qkv_bias: bool = True, drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.,
                 norm_layer: Any = _LAYER_NORM, act_layer: Any = nn.GELU,
                 layer_scale: bool = False, init_scale: float = 1e-4, parallel: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
                  drop_path=drop_path_rate, norm_layer=norm_layer, act_layer=act_layer, layer_scale=layer_scale,
                  init_values=init_scale, parallel=parallel)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # The original's initialisation: truncated normals (std .02, bounds +-2 absolute) for the embeddings and
        # the linear layers, zero biases, unit LayerNorms; the LayerScale values stay at init_scale.
        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Excluded from weight decay besides 1-D parameters, as the original."""
        return {'pos_embed', 'cls_token'}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh head for ``num_classes`` classes (none for 0); the class token stays the pooling."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] images -> [B, 1 + N, D] normalised tokens, the class token first."""
        x = self.patch_embed(x) + self.pos_embed
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: [B, 1 + N, D] -> logits [B, num_classes] from the class token."""
        x = self.head_drop(x[:, 0])
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def weights_url(name: str, img_size: int = 224, pretrained_21k: bool = False) -> str:
    """The official file the original loads for ``name`` at ``img_size``, or a ValueError naming the ones there are."""
    url = MODEL_URLS.get((name, img_size, pretrained_21k))
    if url is not None:
        return url
    available = [f'img_size={size}{", pretrained_21k=True" if in21k else ""}'
                 for (model, size, in21k) in MODEL_URLS if model == name]
    if not available:
        raise ValueError(f'{name} has no official weights (the original publishes none): use pretrained=False')
    raise ValueError(f'{name} has no official weights for img_size={img_size}'
                     f'{", pretrained_21k=True" if pretrained_21k else ""}; there are: {"; ".join(available)}')


def _create(name: str, pretrained: bool, img_size: int, pretrained_21k: bool, **kwargs: Any) -> DeiT3:
    """The one builder behind the registered names."""
    # timm.create_model passes its pretrained-config kwargs to every entry point; the weights come from the
    # original's URLs instead.
    for key in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir'):
        kwargs.pop(key, None)
    if pretrained_21k and not pretrained:
        raise ValueError('pretrained_21k=True chooses the official ImageNet-21k weights: add pretrained=True')
    if pretrained:
        weights_url(name, img_size, pretrained_21k)  # before building: a one-line error where there is no file
    model = DeiT3(img_size=img_size, **kwargs)
    url = MODEL_URLS.get((name, img_size, pretrained_21k), '')
    model.pretrained_cfg = dict(_cfg(img_size), architecture=name, url=url, num_classes=model.num_classes)
    if pretrained:
        utils.load_pretrained(model, url)
    return model


default_cfgs = {  # read by timm's register_model: the input size of each name (builders.create_model uses it)
    name: _cfg() for name in (
        'deit_tiny_patch16_LS', 'deit_small_patch16_LS', 'deit_medium_patch16_LS', 'deit_base_patch16_LS',
        'deit_large_patch16_LS', 'deit_huge_patch14_LS', 'deit_huge_patch14_52_LS', 'deit_huge_patch14_26x2_LS',
        'deit_Giant_48x2_patch14_LS', 'deit_giant_40x2_patch14_LS', 'deit_Giant_48_patch14_LS',
        'deit_giant_40_patch14_LS', 'deit_small_patch16_36_LS', 'deit_small_patch16_36', 'deit_small_patch16_18x2_LS',
        'deit_small_patch16_18x2', 'deit_base_patch16_18x2_LS', 'deit_base_patch16_18x2', 'deit_base_patch16_36x1_LS',
        'deit_base_patch16_36x1')}
MODELS: Tuple[str, ...] = tuple(default_cfgs)


# ============ DeiT III: Revenge of the ViT ============

@register_model
def deit_tiny_patch16_LS(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                         **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, layer_scale=True)
    return _create('deit_tiny_patch16_LS', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))


@register_model
def deit_small_patch16_LS(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                          **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, layer_scale=True)
    return _create('deit_small_patch16_LS', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))


@register_model
def deit_medium_patch16_LS(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                           **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=16, embed_dim=512, depth=12, num_heads=8, layer_scale=True)
    return _create('deit_medium_patch16_LS', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))


@register_model
def deit_base_patch16_LS(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                         **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, layer_scale=True)
    return _create('deit_base_patch16_LS', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))


@register_model
def deit_large_patch16_LS(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                          **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, layer_scale=True)
    return _create('deit_large_patch16_LS', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))


@register_model
def deit_huge_patch14_LS(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                         **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, layer_scale=True)
    return _create('deit_huge_patch14_LS', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))


@register_model
def deit_huge_patch14_52_LS(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                            **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=14, embed_dim=1280, depth=52, num_heads=16, layer_scale=True)
    return _create('deit_huge_patch14_52_LS', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))


@register_model
def deit_huge_patch14_26x2_LS(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                              **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=14, embed_dim=1280, depth=26, num_heads=16, layer_scale=True, parallel=True)
    return _create('deit_huge_patch14_26x2_LS', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))


@register_model
def deit_Giant_48x2_patch14_LS(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                               **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=14, embed_dim=1664, depth=48, num_heads=16, layer_scale=True, parallel=True)
    return _create('deit_Giant_48x2_patch14_LS', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))


@register_model
def deit_giant_40x2_patch14_LS(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                               **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, layer_scale=True, parallel=True)
    return _create('deit_giant_40x2_patch14_LS', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))


@register_model
def deit_Giant_48_patch14_LS(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                             **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=14, embed_dim=1664, depth=48, num_heads=16, layer_scale=True)
    return _create('deit_Giant_48_patch14_LS', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))


@register_model
def deit_giant_40_patch14_LS(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                             **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, layer_scale=True)
    return _create('deit_giant_40_patch14_LS', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))


# ============ Three things everyone should know about Vision Transformers ============

@register_model
def deit_small_patch16_36_LS(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                             **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=16, embed_dim=384, depth=36, num_heads=6, layer_scale=True)
    return _create('deit_small_patch16_36_LS', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))


@register_model
def deit_small_patch16_36(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                          **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=16, embed_dim=384, depth=36, num_heads=6)
    return _create('deit_small_patch16_36', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))


@register_model
def deit_small_patch16_18x2_LS(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                               **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=16, embed_dim=384, depth=18, num_heads=6, layer_scale=True, parallel=True)
    return _create('deit_small_patch16_18x2_LS', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))


@register_model
def deit_small_patch16_18x2(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                            **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=16, embed_dim=384, depth=18, num_heads=6, parallel=True)
    return _create('deit_small_patch16_18x2', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))


@register_model
def deit_base_patch16_18x2_LS(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                              **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=16, embed_dim=768, depth=18, num_heads=12, layer_scale=True, parallel=True)
    return _create('deit_base_patch16_18x2_LS', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))


@register_model
def deit_base_patch16_18x2(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                           **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=16, embed_dim=768, depth=18, num_heads=12, parallel=True)
    return _create('deit_base_patch16_18x2', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))


@register_model
def deit_base_patch16_36x1_LS(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                              **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=16, embed_dim=768, depth=36, num_heads=12, layer_scale=True)
    return _create('deit_base_patch16_36x1_LS', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))


@register_model
def deit_base_patch16_36x1(pretrained: bool = False, img_size: int = 224, pretrained_21k: bool = False,
                           **kwargs: Any) -> DeiT3:
    model_args = dict(patch_size=16, embed_dim=768, depth=36, num_heads=12)
    return _create('deit_base_patch16_36x1', pretrained, img_size, pretrained_21k, **dict(model_args, **kwargs))

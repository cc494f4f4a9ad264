"""The DeiT model family, registered in timm's registry.

The plain models are ``DeiT``: timm's ``VisionTransformer`` with the initialisation and weight decay
of timm 0.3.2, which trained the paper's models; the distilled ones add the distillation token of
the paper (Touvron et al., 2020, section 4) on top of it. After ``import models``,
``timm.create_model(name)`` builds these models for the eight DeiT names, and the original's later
families for theirs (DeiT III in models_v2.py, CaiT in cait_models.py, ResMLP in resmlp_models.py,
imported here so that one import registers every model); every other name (the convnet teachers,
e.g. ``regnety_160``) still comes from timm unchanged.
"""
import difflib
import math
import warnings
from functools import partial
from typing import Any, Dict, Optional, Set, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

import cait_models
import models_v2
import resmlp_models
import utils

__all__ = [
    'DEIT_MODELS', 'MODEL_FAMILIES', 'MODEL_URLS', 'PATCHCONVNET_MODELS', 'TEACHER_URLS', 'DeiT',
    'DistilledVisionTransformer', 'build_model', 'set_eval_head', 'interpolate_pos_embed',
]

_BASE_URL = 'https://dl.fbaipublicfiles.com/deit/'
MODEL_URLS: Dict[str, str] = {
    'deit_tiny_patch16_224': _BASE_URL + 'deit_tiny_patch16_224-a1311bcf.pth',
    'deit_small_patch16_224': _BASE_URL + 'deit_small_patch16_224-cd65a155.pth',
    'deit_base_patch16_224': _BASE_URL + 'deit_base_patch16_224-b5f2ef4d.pth',
    'deit_tiny_distilled_patch16_224': _BASE_URL + 'deit_tiny_distilled_patch16_224-b40b3cf7.pth',
    'deit_small_distilled_patch16_224': _BASE_URL + 'deit_small_distilled_patch16_224-649709d9.pth',
    'deit_base_distilled_patch16_224': _BASE_URL + 'deit_base_distilled_patch16_224-df68dfff.pth',
    'deit_base_patch16_384': _BASE_URL + 'deit_base_patch16_384-8de9b5d1.pth',
    'deit_base_distilled_patch16_384': _BASE_URL + 'deit_base_distilled_patch16_384-d0272ac0.pth',
}
DEIT_MODELS: Tuple[str, ...] = tuple(MODEL_URLS)
# The paper's teacher (Table 2); the model itself comes from timm's registry.
TEACHER_URLS: Dict[str, str] = {'regnety_160': _BASE_URL + 'regnety_160-a5fe301d.pth'}
# Every model of this codebase, by family; importing this module registers them all in timm's registry.
MODEL_FAMILIES: Dict[str, Tuple[str, ...]] = {
    'DeiT': DEIT_MODELS, 'DeiT III': models_v2.MODELS, 'CaiT': cait_models.MODELS, 'ResMLP': resmlp_models.MODELS}
# The original's patchconvnet_models.py, which stays out: build_model refuses these names.
PATCHCONVNET_MODELS: Tuple[str, ...] = ('S60', 'S120', 'B60', 'B120', 'L60', 'L120', 'S60_multi')

EVAL_HEADS = ('avg', 'cls', 'dist')


def _cfg(name: str) -> Dict[str, Any]:
    size = 384 if name.endswith('_384') else 224
    return dict(url=MODEL_URLS[name], num_classes=1000, input_size=(3, size, size), fixed_input_size=True,
                crop_pct=0.875, interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv='patch_embed.proj', classifier=('head', 'head_dist') if 'distilled' in name else 'head')


# timm's register_model registers these configurations with the names below. Re-registering a name clears the
# configuration timm had for it, and timm's own builders of these names (timm.models.deit.deit_*, the reference
# implementation) then logged "No pretrained configuration specified".
default_cfgs: Dict[str, Dict[str, Any]] = {name: _cfg(name) for name in MODEL_URLS}


class DeiT(VisionTransformer):
    """timm's ``VisionTransformer`` with the initialisation and weight decay the paper trained with.

    The paper's models were trained with timm 0.3.2, whose ViT differs from timm 1.0's in two
    places that change training from scratch, and nowhere else (forward, layout and weights are
    timm's):

    - ``cls_token`` is drawn from ``trunc_normal_(std=.02)`` like ``pos_embed``; timm >= 0.9 draws
      it from ``normal(std=1e-6)``. Linear layers (trunc_normal, std .02, zero bias) and LayerNorm
      (weight 1, bias 0) start as in timm 0.3.2 already.
    - ``no_weight_decay()`` is ``{'pos_embed', 'cls_token'}``: the optimizer decays every other
      parameter of two or more dimensions, ``dist_token`` included (timm 1.0 adds 'dist_token' and
      'reg_token' to the set).
    """

    def init_weights(self, mode: str = '', **kwargs: Any) -> None:
        """timm's init, then the class token as timm 0.3.2 drew it.

        ``kwargs`` reach timm's ``init_weights`` as its caller passed them: timm >= 1.0.23 adds
        ``needs_reset``, which earlier 1.0 releases do not take.
        """
        super().init_weights(mode, **kwargs)
        if self.cls_token is not None:
            # timm's trunc_normal_ cuts at the absolute bounds a=-2, b=2 (its defaults, as in timm
            # 0.3.2's call `trunc_normal_(self.cls_token, std=.02)`), i.e. at 100 std: in effect
            # untruncated. The same call as the original's, so the same distribution.
            trunc_normal_(self.cls_token, std=.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """The parameters timm 0.3.2's ViT excluded from weight decay (besides 1-D ones and biases)."""
        return {'pos_embed', 'cls_token'}


class DistilledVisionTransformer(DeiT):
    """ViT with a class token and a distillation token, each read by its own linear head.

    Tokens are ``[cls, dist, patches...]``; ``pos_embed`` is [1, N + 2, D] and covers both extra
    tokens. In training mode ``forward`` returns ``(class_logits, dist_logits)`` so that the
    distillation loss can supervise each head; in eval mode it returns what ``eval_head`` selects:
    the average of the two (the paper's default), the class head or the distillation head alone
    (the paper's Table 5 compares the three).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.cls_token is None or self.global_pool != 'token' or self.no_embed_class or self.reg_token is not None:
            raise ValueError('DistilledVisionTransformer needs class_token=True, global_pool="token", '
                             'no register tokens and pos_embed covering the extra tokens (the DeiT layout).')
        self.num_prefix_tokens = 2
        self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 2, self.embed_dim))
        self.head_dist = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.eval_head = 'avg'
        # The original's init for the new parameters (DeiT models.py): truncated normal, std .02 (bounds
        # +-2 absolute, as DeiT.init_weights explains).
        trunc_normal_(self.dist_token, std=.02)
        trunc_normal_(self.pos_embed, std=.02)
        if isinstance(self.head_dist, nn.Linear):
            trunc_normal_(self.head_dist.weight, std=.02)
            nn.init.zeros_(self.head_dist.bias)

    @torch.jit.ignore
    def get_classifier(self) -> Tuple[nn.Module, nn.Module]:
        return self.head, self.head_dist

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, 'token'):
            raise ValueError('The distilled model reads the class and distillation tokens: '
                             'global_pool must be "token".')
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, D] patch tokens ([B, H, W, D] with dynamic_img_size) -> [B, N + 2, D]."""
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            B, H, W, C = x.shape
            pos_embed = resample_abs_pos_embed(
                pos_embed, new_size=(H, W), old_size=self.patch_embed.grid_size, num_prefix_tokens=2)
            x = x.view(B, -1, C)
        extra = torch.cat((self.cls_token, self.dist_token), dim=1).expand(x.shape[0], -1, -1)
        return self.pos_drop(torch.cat((extra, x), dim=1) + pos_embed)

    def forward_head(
            self, x: torch.Tensor, pre_logits: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """x: [B, N + 2, D] normalised tokens -> logits [B, C], or a pair of them in training mode."""
        x_cls, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (x_cls + x_dist) / 2
        x_cls, x_dist = self.head(x_cls), self.head_dist(x_dist)
        if self.training and not torch.jit.is_scripting():
            return x_cls, x_dist
        if self.eval_head == 'cls':
            return x_cls
        if self.eval_head == 'dist':
            return x_dist
        return (x_cls + x_dist) / 2


def _unwrap(model: nn.Module) -> nn.Module:
    """The model under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, 'module'):  # DistributedDataParallel
            model = model.module
        elif hasattr(model, '_orig_mod'):  # torch.compile
            model = model._orig_mod
        else:
            return model


def set_eval_head(model: nn.Module, head: str) -> str:
    """Choose what a model returns in eval mode; returns the previous choice.

    Args:
        model: a DeiT (possibly wrapped in DDP or torch.compile) or any classifier.
        head: 'avg' (mean of both heads, the paper's default), 'cls' (class token head only) or
            'dist' (distillation token head only). A model without a distillation token has one
            head, which 'avg' and 'cls' both mean.
    """
    if head not in EVAL_HEADS:
        raise ValueError(f"Unknown eval head '{head}'; choose one of {', '.join(EVAL_HEADS)}.")
    model = _unwrap(model)
    if not isinstance(model, DistilledVisionTransformer):
        if head == 'dist':
            raise ValueError(f'{type(model).__name__} has no distillation token, so it has no distillation head; '
                             'use --eval-head cls or avg, or a *_distilled_* model.')
        return 'cls'
    previous, model.eval_head = model.eval_head, head
    return previous


def interpolate_pos_embed(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Resize ``state_dict['pos_embed']`` in place to ``model``'s patch grid.

    The patch part is resized bicubically as a 2-D grid; the extra tokens (class, distillation)
    are kept unchanged. How many extra tokens the checkpoint holds is read from the checkpoint
    itself: its token count minus the largest square number of patches that fits (none for the
    DeiT III and CaiT models, whose position embedding covers the patches only).
    """
    if 'pos_embed' not in state_dict:
        return
    pos_embed = state_dict['pos_embed']  # [1, extra + H*W, D]
    model = _unwrap(model)
    new_grid = model.patch_embed.grid_size
    num_tokens = pos_embed.shape[1]
    old_side = math.isqrt(num_tokens)
    num_extra = num_tokens - old_side * old_side
    if (old_side, old_side) == tuple(new_grid) and num_tokens == model.pos_embed.shape[1]:
        return
    extra, grid = pos_embed[:, :num_extra], pos_embed[:, num_extra:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2)  # [1, D, H, W]
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode='bicubic', align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)  # [1, H'*W', D]
    state_dict['pos_embed'] = torch.cat((extra, grid), dim=1)


def _create_deit(name: str, pretrained: bool = False, distilled: bool = False, **kwargs: Any) -> DeiT:
    """The one builder behind the eight registered names."""
    # timm.create_model passes its pretrained-config kwargs to every entry point; DeiT loads its
    # own official files instead (the original crashed on these kwargs with timm >= 0.9).
    for key in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir'):
        kwargs.pop(key, None)
    # --drop means what it meant for the original (timm 0.3's ViT): dropout after the position
    # embedding, the attention projection and the MLP. timm >= 0.9 moved `drop_rate` to the head.
    drop_rate = kwargs.pop('drop_rate', 0.0)
    model_args = dict(patch_size=16, mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                      pos_drop_rate=drop_rate, proj_drop_rate=drop_rate)
    model_args.update(kwargs)
    model_cls = DistilledVisionTransformer if distilled else DeiT
    model = model_cls(**model_args)
    model.pretrained_cfg = dict(default_cfgs[name], architecture=name, num_classes=model.num_classes,
                                input_size=(3, *model.patch_embed.img_size))
    if pretrained:
        # Another image size: the position embedding is resized; another class count: fresh heads.
        utils.load_pretrained(model, MODEL_URLS[name], adapt=interpolate_pos_embed)
    return model


def _register(fn):
    """timm's register_model, without its warning about the names timm's own deit.py registered.

    Replacing timm's entries with this project's models is the point of this module, so the
    "Overwriting ... in registry" warning (the original printed eight of them) says nothing useful.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message=f'Overwriting {fn.__name__} in registry')
        return register_model(fn)


@_register
def deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> DeiT:
    model_args = dict(embed_dim=192, depth=12, num_heads=3)
    return _create_deit('deit_tiny_patch16_224', pretrained, **dict(model_args, **kwargs))


@_register
def deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> DeiT:
    model_args = dict(embed_dim=384, depth=12, num_heads=6)
    return _create_deit('deit_small_patch16_224', pretrained, **dict(model_args, **kwargs))


@_register
def deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> DeiT:
    model_args = dict(embed_dim=768, depth=12, num_heads=12)
    return _create_deit('deit_base_patch16_224', pretrained, **dict(model_args, **kwargs))


@_register
def deit_tiny_distilled_patch16_224(pretrained: bool = False, **kwargs: Any) -> DistilledVisionTransformer:
    model_args = dict(embed_dim=192, depth=12, num_heads=3)
    return _create_deit('deit_tiny_distilled_patch16_224', pretrained, distilled=True, **dict(model_args, **kwargs))


@_register
def deit_small_distilled_patch16_224(pretrained: bool = False, **kwargs: Any) -> DistilledVisionTransformer:
    model_args = dict(embed_dim=384, depth=12, num_heads=6)
    return _create_deit('deit_small_distilled_patch16_224', pretrained, distilled=True, **dict(model_args, **kwargs))


@_register
def deit_base_distilled_patch16_224(pretrained: bool = False, **kwargs: Any) -> DistilledVisionTransformer:
    model_args = dict(embed_dim=768, depth=12, num_heads=12)
    return _create_deit('deit_base_distilled_patch16_224', pretrained, distilled=True, **dict(model_args, **kwargs))


@_register
def deit_base_patch16_384(pretrained: bool = False, **kwargs: Any) -> DeiT:
    model_args = dict(img_size=384, embed_dim=768, depth=12, num_heads=12)
    return _create_deit('deit_base_patch16_384', pretrained, **dict(model_args, **kwargs))


@_register
def deit_base_distilled_patch16_384(pretrained: bool = False, **kwargs: Any) -> DistilledVisionTransformer:
    model_args = dict(img_size=384, embed_dim=768, depth=12, num_heads=12)
    return _create_deit('deit_base_distilled_patch16_384', pretrained, distilled=True, **dict(model_args, **kwargs))


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with a clear error for an unknown name.

    The names of MODEL_FAMILIES build this codebase's models; any other timm name (a teacher such as
    ``regnety_160``) builds timm's model. The original's PatchConvNet names are refused.
    """
    if name in PATCHCONVNET_MODELS:
        raise ValueError(f'PatchConvNet ({name}) is not part of this codebase: timm has no reference implementation '
                         'to check it against')
    if not timm.is_model(name):
        # Matched in any case: cait_xxs24 finds cait_XXS24.
        ours = {model.lower(): model for names in MODEL_FAMILIES.values() for model in names}
        close = difflib.get_close_matches(name.lower(), ours, n=1)
        families = '; '.join(f"{family} models: {', '.join(names)}" for family, names in MODEL_FAMILIES.items())
        raise ValueError(f"Unknown model '{name}'{f' (did you mean {ours[close[0]]}?)' if close else ''}. "
                         f"{families}; any other timm model name also works (see timm.list_models()).")
    return timm.create_model(name, **kwargs)

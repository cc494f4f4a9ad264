"""torch.hub entry points: ``torch.hub.load(<checkout or repo>, name, pretrained=True)``.

Every model of the codebase: DeiT (models.py), DeiT III (models_v2.py; the original's hubconf left it out),
CaiT (cait_models.py) and ResMLP (resmlp_models.py). Every entry point takes ``pretrained`` (official weights
through torch.hub's cache), the original's arguments that choose among the official files (DeiT III:
``img_size``, ``pretrained_21k``; ResMLP: ``dist``, ``dino``, ``in_22k``) and the model's keyword arguments
(``num_classes``, ``img_size``, ``drop_path_rate``, ...).
"""
from cait_models import (  # noqa: F401  (the names are the hub's entry points)
    cait_M36,
    cait_M48,
    cait_S24,
    cait_S24_224,
    cait_S36,
    cait_XS24,
    cait_XXS24,
    cait_XXS24_224,
    cait_XXS36,
    cait_XXS36_224,
)
from models import (  # noqa: F401
    deit_base_distilled_patch16_224,
    deit_base_distilled_patch16_384,
    deit_base_patch16_224,
    deit_base_patch16_384,
    deit_small_distilled_patch16_224,
    deit_small_patch16_224,
    deit_tiny_distilled_patch16_224,
    deit_tiny_patch16_224,
)
from models_v2 import (  # noqa: F401
    deit_base_patch16_18x2,
    deit_base_patch16_18x2_LS,
    deit_base_patch16_36x1,
    deit_base_patch16_36x1_LS,
    deit_base_patch16_LS,
    deit_giant_40_patch14_LS,
    deit_giant_40x2_patch14_LS,
    deit_Giant_48_patch14_LS,
    deit_Giant_48x2_patch14_LS,
    deit_huge_patch14_26x2_LS,
    deit_huge_patch14_52_LS,
    deit_huge_patch14_LS,
    deit_large_patch16_LS,
    deit_medium_patch16_LS,
    deit_small_patch16_18x2,
    deit_small_patch16_18x2_LS,
    deit_small_patch16_36,
    deit_small_patch16_36_LS,
    deit_small_patch16_LS,
    deit_tiny_patch16_LS,
)
from resmlp_models import (  # noqa: F401
    resmlp_12,
    resmlp_24,
    resmlp_36,
    resmlpB_24,
)

dependencies = ["torch", "torchvision", "timm"]

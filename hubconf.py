"""torch.hub entry points: ``torch.hub.load(<checkout or repo>, name, pretrained=True)``.

Every entry point takes ``pretrained`` (official weights through torch.hub's cache) and the
model's keyword arguments (``num_classes``, ``img_size``, ``drop_path_rate``, ...).
"""
from models import (  # noqa: F401  (the names are the hub's entry points)
    deit_base_distilled_patch16_224,
    deit_base_distilled_patch16_384,
    deit_base_patch16_224,
    deit_base_patch16_384,
    deit_small_distilled_patch16_224,
    deit_small_patch16_224,
    deit_tiny_distilled_patch16_224,
    deit_tiny_patch16_224,
)

dependencies = ["torch", "torchvision", "timm"]

"""The code keeps to what the lowest declared versions of its requirements offer."""
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import models


def test_deits_build_with_the_init_weights_of_timm_before_1_0_23(monkeypatch):
    """timm 1.0.3-1.0.22's ``VisionTransformer.init_weights(self, mode='')`` has no ``needs_reset``; its
    ``__init__`` calls ``self.init_weights(weight_init)``."""
    timm_init = VisionTransformer.init_weights
    modes = []

    def init_weights(self, mode=''):
        modes.append(mode)
        timm_init(self, mode)

    monkeypatch.setattr(VisionTransformer, 'init_weights', init_weights)
    torch.manual_seed(0)
    for name in ('deit_tiny_patch16_224', 'deit_tiny_distilled_patch16_224'):
        # weight_init='skip' keeps this timm's __init__ from calling init_weights(needs_reset=False); the call
        # below is the one the older __init__ makes.
        model = timm.create_model(name, depth=2, weight_init='skip')
        assert isinstance(model, models.DeiT)
        model.init_weights('')
        assert model.cls_token.std() > 1e-3  # then the class token as timm 0.3.2 drew it (timm's: std 1e-6)
    assert modes == ['', '']

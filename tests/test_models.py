"""The DeiT family: sizes, checkpoint layout, equality with timm's reference, torch.hub."""
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import deit as timm_deit

import models

REPO = Path(__file__).resolve().parent.parent

# SPEC's table: (embed dim, heads, img size, distilled, parameters with 1000 classes).
TABLE = {
    'deit_tiny_patch16_224': (192, 3, 224, False, 5_717_416),
    'deit_small_patch16_224': (384, 6, 224, False, 22_050_664),
    'deit_base_patch16_224': (768, 12, 224, False, 86_567_656),
    'deit_tiny_distilled_patch16_224': (192, 3, 224, True, 5_910_800),
    'deit_small_distilled_patch16_224': (384, 6, 224, True, 22_436_432),
    'deit_base_distilled_patch16_224': (768, 12, 224, True, 87_338_192),
    'deit_base_patch16_384': (768, 12, 384, False, 86_859_496),
    'deit_base_distilled_patch16_384': (768, 12, 384, True, 87_630_032),
}


def test_table_covers_the_registered_names():
    assert set(TABLE) == set(models.DEIT_MODELS) == set(models.MODEL_URLS)


@pytest.mark.parametrize('name', TABLE)
def test_parameter_count_and_state_dict_layout(name):
    dim, heads, img, distilled, n_params = TABLE[name]
    model = timm.create_model(name)
    assert isinstance(model, models.DistilledVisionTransformer) == distilled
    assert sum(p.numel() for p in model.parameters()) == n_params
    sd = model.state_dict()
    tokens = (img // 16) ** 2 + (2 if distilled else 1)
    assert sd['pos_embed'].shape == (1, tokens, dim)
    assert sd['cls_token'].shape == (1, 1, dim)
    assert sd['patch_embed.proj.weight'].shape == (dim, 3, 16, 16)
    assert sd['head.weight'].shape == (1000, dim)
    assert ('dist_token' in sd) == distilled
    assert ('head_dist.weight' in sd) == distilled
    expected = {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias',
                'norm.weight', 'norm.bias', 'head.weight', 'head.bias'}
    if distilled:
        expected |= {'dist_token', 'head_dist.weight', 'head_dist.bias'}
    for i in range(12):
        for part in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2'):
            expected |= {f'blocks.{i}.{part}.weight', f'blocks.{i}.{part}.bias'}
    assert set(sd) == expected
    assert sd['blocks.0.attn.qkv.weight'].shape == (3 * dim, dim)
    assert sd['blocks.0.mlp.fc1.weight'].shape == (4 * dim, dim)
    assert model.blocks[0].attn.head_dim == 64 and model.blocks[0].attn.num_heads == heads
    assert model.norm.eps == 1e-6


def _timm_reference(name, **kwargs):
    """timm's own DeiT class for ``name``, built directly (our import replaced its registry entries)."""
    dim, heads, img, distilled, _ = TABLE[name]
    cls = timm_deit.VisionTransformerDistilled if distilled else timm_deit.VisionTransformer
    args = dict(img_size=img, patch_size=16, embed_dim=dim, depth=12, num_heads=heads, mlp_ratio=4,
                qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    args.update(kwargs)
    model = cls(**args)
    if distilled:
        model.set_distilled_training(True)
    return model


@pytest.mark.parametrize('name', TABLE)
def test_equal_to_timm_reference(name):
    # Full depth for the tiny models, two blocks for the others (the same code path).
    depth = 12 if 'tiny' in name else 2
    ours = timm.create_model(name, depth=depth)
    ref = _timm_reference(name, depth=depth)
    ref.load_state_dict(ours.state_dict(), strict=True)
    img = TABLE[name][2]
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for mode in (True, False):
            ours.train(mode)
            ref.train(mode)
            a, b = ours(x), ref(x)
            pairs = list(zip(a, b)) if isinstance(a, tuple) else [(a, b)]
            assert isinstance(a, tuple) == (mode and TABLE[name][3])
            for u, v in pairs:
                assert (u - v).abs().max().item() <= 1e-6


def test_eval_head_choice():
    model = timm.create_model('deit_tiny_distilled_patch16_224', depth=2, embed_dim=48, num_heads=3,
                              img_size=32, num_classes=7).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        cls_logits, dist_logits = model.head(tokens[:, 0]), model.head_dist(tokens[:, 1])
        assert torch.allclose(model(x), (cls_logits + dist_logits) / 2)
        assert models.set_eval_head(model, 'cls') == 'avg'
        assert torch.allclose(model(x), cls_logits)
        models.set_eval_head(model, 'dist')
        assert torch.allclose(model(x), dist_logits)
        model.train()
        out = model(x)
        assert isinstance(out, tuple) and len(out) == 2
    plain = timm.create_model('deit_tiny_patch16_224', depth=1, embed_dim=48, num_heads=3, img_size=32)
    assert models.set_eval_head(plain, 'cls') == 'cls'
    with pytest.raises(ValueError, match='no distillation token'):
        models.set_eval_head(plain, 'dist')
    with pytest.raises(ValueError, match='avg, cls, dist'):
        models.set_eval_head(model, 'both')


@pytest.mark.parametrize('name,img', [('deit_tiny_patch16_224', 384), ('deit_tiny_distilled_patch16_224', 64),
                                      ('deit_base_patch16_384', 224)])
def test_other_image_sizes(name, img):
    model = timm.create_model(name, img_size=img, depth=1, num_classes=5).eval()
    extra = 2 if 'distilled' in name else 1
    assert model.pos_embed.shape[1] == (img // 16) ** 2 + extra
    with torch.no_grad():
        out = model(torch.randn(1, 3, img, img))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


def test_kwargs_reach_the_model():
    model = timm.create_model('deit_small_patch16_224', num_classes=10, drop_rate=0.3, drop_path_rate=0.2, depth=3)
    assert model.head.out_features == 10
    # --drop is the original's dropout: after the position embedding, in attention and MLP; not the head.
    assert model.pos_drop.p == model.blocks[0].attn.proj_drop.p == model.blocks[0].mlp.drop2.p == 0.3
    assert model.head_drop.p == 0.0
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


def test_other_timm_names_are_untouched():
    resnet = models.build_model('resnet18', num_classes=3)
    assert type(resnet).__module__ == 'timm.models.resnet'
    with pytest.raises(ValueError) as err:
        models.build_model('deit_gigantic_patch16_224')
    for name in models.DEIT_MODELS:
        assert name in str(err.value)


def test_import_prints_no_warning():
    result = subprocess.run([sys.executable, '-W', 'error', '-c', 'import models; import hubconf'],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ''


def test_timms_own_deit_builders_still_find_their_configuration(caplog):
    # register_model clears the configuration timm had for a name registered again: without ours, timm's reference
    # builders of these names logged "No pretrained configuration specified for deit_tiny_patch16_224 model".
    for name in models.DEIT_MODELS:
        model = getattr(timm_deit, name)(depth=1, embed_dim=48, num_heads=3)
        assert type(model).__module__.startswith('timm.models.')  # timm's class, not ours
    assert [r.getMessage() for r in caplog.records if 'pretrained configuration' in r.getMessage()] == []
    assert [timm.get_pretrained_cfg(name).url for name in models.DEIT_MODELS] == list(models.MODEL_URLS.values())


def test_interpolate_pos_embed_matches_bicubic_resize():
    model = timm.create_model('deit_tiny_distilled_patch16_224', img_size=64, depth=1)  # 4x4 grid
    pos = torch.randn(1, 2 + 14 * 14, 192)
    sd = {'pos_embed': pos.clone()}
    models.interpolate_pos_embed(model, sd)
    grid = pos[:, 2:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode='bicubic', align_corners=False).permute(0, 2, 3, 1)
    assert sd['pos_embed'].shape == (1, 18, 192)
    assert torch.equal(sd['pos_embed'][:, :2], pos[:, :2])
    assert torch.allclose(sd['pos_embed'][:, 2:], expected.reshape(1, 16, 192))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A TORCH_HOME whose hub cache holds files written by the test under the official names."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    checkpoints = tmp_path / 'hub' / 'checkpoints'
    checkpoints.mkdir(parents=True)

    def write(name):
        sd = timm.create_model(name).state_dict()
        torch.save({'model': sd}, checkpoints / models.MODEL_URLS[name].rsplit('/', 1)[1])
        return sd
    return write


def test_pretrained_loads_from_hub_cache(hub_cache):
    name = 'deit_tiny_distilled_patch16_224'
    written = hub_cache(name)
    model = timm.create_model(name, pretrained=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, written[key]), key
    # New class count: the heads are new, everything else is the file's.
    model = timm.create_model(name, pretrained=True, num_classes=10)
    assert model.head.out_features == model.head_dist.out_features == 10
    assert torch.equal(model.blocks[3].mlp.fc2.weight, written['blocks.3.mlp.fc2.weight'])
    # New resolution: pos_embed resized, extra tokens kept.
    model = timm.create_model(name, pretrained=True, img_size=384)
    assert model.pos_embed.shape == (1, 24 * 24 + 2, 192)
    assert torch.equal(model.pos_embed[:, :2], written['pos_embed'][:, :2])


def test_torch_hub_local_load(hub_cache):
    for name in models.DEIT_MODELS:
        model = torch.hub.load(str(REPO), name, source='local', pretrained=False, num_classes=10, depth=1)
        assert model.head.out_features == 10
        assert isinstance(model, models.DistilledVisionTransformer) == TABLE[name][3]
    written = hub_cache('deit_tiny_patch16_224')
    model = torch.hub.load(str(REPO), 'deit_tiny_patch16_224', source='local', pretrained=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, written[key]), key
    assert os.environ['TORCH_HOME'] in torch.hub.get_dir()

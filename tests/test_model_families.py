"""The original's later families (DeiT III, CaiT, ResMLP): names, sizes, checkpoint layout, equality with timm's
implementations through timm's own checkpoint filters, the official files through torch.hub's cache, main.py's
--model, and the PatchConvNet refusal."""
import re
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import cait as timm_cait
from timm.models import mlp_mixer as timm_mixer
from timm.models import vision_transformer as timm_vit

import builders
import cait_models
import checkpoints
import hubconf
import main
import models
import models_v2
import resmlp_models

REPO = Path(__file__).resolve().parent.parent

# The original's models_v2.py, one line per name: (patch, embed dim, depth, heads, LayerScale, two parallel branches).
# deit_Giant_48x2 and deit_giant_40x2 name a block class the original never defines (Block_paral_LS): the parallel
# LayerScale block of the other x2 models.
DEIT3 = {
    'deit_tiny_patch16_LS': (16, 192, 12, 3, True, False),
    'deit_small_patch16_LS': (16, 384, 12, 6, True, False),
    'deit_medium_patch16_LS': (16, 512, 12, 8, True, False),
    'deit_base_patch16_LS': (16, 768, 12, 12, True, False),
    'deit_large_patch16_LS': (16, 1024, 24, 16, True, False),
    'deit_huge_patch14_LS': (14, 1280, 32, 16, True, False),
    'deit_huge_patch14_52_LS': (14, 1280, 52, 16, True, False),
    'deit_huge_patch14_26x2_LS': (14, 1280, 26, 16, True, True),
    'deit_Giant_48x2_patch14_LS': (14, 1664, 48, 16, True, True),
    'deit_giant_40x2_patch14_LS': (14, 1408, 40, 16, True, True),
    'deit_Giant_48_patch14_LS': (14, 1664, 48, 16, True, False),
    'deit_giant_40_patch14_LS': (14, 1408, 40, 16, True, False),
    'deit_small_patch16_36_LS': (16, 384, 36, 6, True, False),
    'deit_small_patch16_36': (16, 384, 36, 6, False, False),
    'deit_small_patch16_18x2_LS': (16, 384, 18, 6, True, True),
    'deit_small_patch16_18x2': (16, 384, 18, 6, False, True),
    'deit_base_patch16_18x2_LS': (16, 768, 18, 12, True, True),
    'deit_base_patch16_18x2': (16, 768, 18, 12, False, True),
    'deit_base_patch16_36x1_LS': (16, 768, 36, 12, True, False),
    'deit_base_patch16_36x1': (16, 768, 36, 12, False, False),
}
# The same models in timm, where it has them.
TIMM_NAMES = {
    'deit_small_patch16_LS': 'deit3_small_patch16_224', 'deit_medium_patch16_LS': 'deit3_medium_patch16_224',
    'deit_base_patch16_LS': 'deit3_base_patch16_224', 'deit_large_patch16_LS': 'deit3_large_patch16_224',
    'deit_huge_patch14_LS': 'deit3_huge_patch14_224',
    'cait_XXS24_224': 'cait_xxs24_224', 'cait_XXS24': 'cait_xxs24_384', 'cait_XXS36_224': 'cait_xxs36_224',
    'cait_XXS36': 'cait_xxs36_384', 'cait_XS24': 'cait_xs24_384', 'cait_S24_224': 'cait_s24_224',
    'cait_S24': 'cait_s24_384', 'cait_S36': 'cait_s36_384', 'cait_M36': 'cait_m36_384', 'cait_M48': 'cait_m48_448',
    'resmlp_12': 'resmlp_12_224', 'resmlp_24': 'resmlp_24_224', 'resmlp_36': 'resmlp_36_224',
    'resmlpB_24': 'resmlp_big_24_224',
}
CAIT = [name for name in TIMM_NAMES if name.startswith('cait_')]
RESMLP = {'resmlp_12': (16, 384), 'resmlp_24': (16, 384), 'resmlp_36': (16, 384), 'resmlpB_24': (8, 768)}
NEW_NAMES = [*DEIT3, *CAIT, *RESMLP]
# Parameters in millions as the issue quotes timm's counts, and as the original's READMEs give them (their
# rounding; README_resmlp.md's 116M for ResMLP-S36 is a typo, timm's 44.69M holds).
REPORTED = {
    'deit_small_patch16_LS': 22.06, 'deit_base_patch16_LS': 86.59, 'deit_large_patch16_LS': 304.37,
    'deit_huge_patch14_LS': 632.13, 'cait_XXS24_224': 11.96, 'cait_S24_224': 46.92, 'cait_M48': 356.46,
    'resmlp_12': 15.35, 'resmlp_36': 44.69,
}
README_FIGURES = {  # name -> (millions, decimals, img_size)
    'deit_small_patch16_LS': (22.0, 0, 224), 'deit_base_patch16_LS': (86.6, 1, 224),
    'deit_large_patch16_LS': (304.4, 1, 224), 'deit_huge_patch14_LS': (632.1, 1, 224),
    'cait_XS24': (27, 0, 384), 'cait_S24': (47, 0, 384), 'cait_S36': (68, 0, 384), 'cait_M36': (271, 0, 384),
    'resmlp_24': (30, 0, 224), 'resmlpB_24': (129, 0, 224),
}


def readme_counts():
    """(name, img) -> parameters, from the README's tables of the three families (| name | img | params | ...)."""
    rows = re.findall(r'^\| (\w+) \| (\d+) \| ([\d,]+) \|', (REPO / 'README.md').read_text(), re.M)
    return {(name, int(img)): int(count.replace(',', '')) for name, img, count in rows}


@pytest.fixture
def shapes_only(monkeypatch):
    """Builds on the meta device without drawing initial values: on meta every random draw costs milliseconds of
    Python for nothing (there are no values), seconds for the giant models. Counts and shapes do not depend on
    it."""
    for module in (models_v2, resmlp_models, timm_cait, timm_vit):
        monkeypatch.setattr(module, 'trunc_normal_', lambda tensor, *args, **kwargs: tensor)
    monkeypatch.setattr(nn.Linear, 'reset_parameters', lambda self: None)


def _timm_vit(name, **kwargs):
    """timm's VisionTransformer configured as the original's DeiT III model ``name``."""
    patch, dim, depth, heads, layer_scale, parallel = DEIT3[name]
    args = dict(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, qkv_bias=True, no_embed_class=True,
                init_values=1e-4 if layer_scale else None,
                block_fn=timm_vit.ParallelThingsBlock if parallel else timm_vit.Block)
    return timm_vit.VisionTransformer(**dict(args, **kwargs))


def _timm_reference(name, **kwargs):
    """timm's model of the same name (its registered configuration) or, where timm has none, timm's class
    configured as the original's file says."""
    if name in TIMM_NAMES and not (name in RESMLP and 'depth' in kwargs):
        return timm.create_model(TIMM_NAMES[name], **kwargs)
    if name in RESMLP:  # timm's ResMLP entry points fix the depth: its class, for a shallower model
        patch, dim = RESMLP[name]
        return timm_mixer.MlpMixer(patch_size=patch, embed_dim=dim, num_blocks=kwargs.pop('depth'), mlp_ratio=4,
                                   block_layer=timm_mixer.ResBlock, norm_layer=timm_mixer.Affine, **kwargs)
    return _timm_vit(name, **kwargs)


def test_the_registered_names_are_the_originals():
    names = set(re.findall(r"^def (\w+)\(pretrained", Path(models_v2.__file__).read_text(), re.M))
    assert names == set(DEIT3) == set(models_v2.MODELS)
    assert set(cait_models.MODELS) == set(CAIT) and len(CAIT) == 10
    assert set(resmlp_models.MODELS) == set(RESMLP)
    assert models.MODEL_FAMILIES['DeiT III'] == models_v2.MODELS
    for name in NEW_NAMES:
        assert timm.is_model(name) and callable(getattr(hubconf, name)), name


@pytest.mark.parametrize('name', NEW_NAMES)
def test_parameter_count_equals_timms_and_building_warns_nothing(name, shapes_only, capfd):
    with warnings.catch_warnings(record=True) as caught, torch.device('meta'):
        warnings.simplefilter('always')
        ours = timm.create_model(name)
    assert not caught, [str(w.message) for w in caught]
    assert capfd.readouterr() == ('', '')
    main.check_models(main.get_args_parser().parse_args(['--model', name]))  # main.py --model takes it
    with torch.device('meta'):
        reference = _timm_reference(name)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    counts = {ours.patch_embed.img_size[0]: count}  # by image size

    def count_at(img_size):
        if img_size not in counts:
            with torch.device('meta'):
                counts[img_size] = sum(p.numel() for p in timm.create_model(name, img_size=img_size).parameters())
        return counts[img_size]

    if name in REPORTED:
        assert round(count / 1e6, 2) == REPORTED[name]
    if name in README_FIGURES:
        millions, decimals, img_size = README_FIGURES[name]
        assert round(count_at(img_size) / 1e6, decimals) == millions
    # Our README's tables quote each count exactly.
    quoted = {img: n for (model, img), n in readme_counts().items() if model == name}
    assert quoted, f'{name} is missing from the README'
    for img_size, n in quoted.items():
        assert count_at(img_size) == n


def test_state_dict_keys_are_the_originals(shapes_only):
    """The keys the original's block classes name (models_v2.py, resmlp_models.py); CaiT is timm's class, which
    is the original's (checked against timm's own filter of the official layout below)."""
    with torch.device('meta'):
        serial = timm.create_model('deit_small_patch16_LS').state_dict()
        parallel = timm.create_model('deit_small_patch16_18x2_LS').state_dict()
        plain = timm.create_model('deit_small_patch16_18x2').state_dict()
        resmlp = timm.create_model('resmlp_12').state_dict()
    top = {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias',
           'head.weight', 'head.bias'}
    linear = ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2')
    block = {f'{part}.{p}' for part in ('norm1', 'norm2', *linear) for p in ('weight', 'bias')}
    second = {k.replace('norm1', 'norm11').replace('norm2', 'norm21').replace('attn', 'attn1').replace('mlp', 'mlp1')
              for k in block}
    assert set(serial) == top | {f'blocks.{i}.{k}' for i in range(12) for k in block | {'gamma_1', 'gamma_2'}}
    gammas = {'gamma_1', 'gamma_2', 'gamma_1_1', 'gamma_2_1'}
    assert set(parallel) == top | {f'blocks.{i}.{k}' for i in range(18) for k in block | second | gammas}
    assert set(plain) == top | {f'blocks.{i}.{k}' for i in range(18) for k in block | second}
    assert serial['pos_embed'].shape == (1, 196, 384)  # the patches only: the class token is added after it
    resmlp_block = {'norm1.alpha', 'norm1.beta', 'attn.weight', 'attn.bias', 'norm2.alpha', 'norm2.beta',
                    'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias', 'gamma_1', 'gamma_2'}
    assert set(resmlp) == ({'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.alpha', 'norm.beta',
                            'head.weight', 'head.bias'} | {f'blocks.{i}.{k}' for i in range(12) for k in resmlp_block})
    assert resmlp['blocks.0.attn.weight'].shape == (196, 196) and resmlp['norm.alpha'].shape == (384,)


def _official_file(name, state_dict):
    """``state_dict`` in the layout of the family's official files: {'model': sd} (DeiT III), with the 'module.'
    prefix of DistributedDataParallel (CaiT), a bare state_dict (ResMLP)."""
    if name in CAIT:
        return {'model': {f'module.{k}': v for k, v in state_dict.items()}}
    return dict(state_dict) if name in RESMLP else {'model': state_dict}


def _parallel_keys_for_timm(state_dict):
    """The original's parallel-block keys under the names of timm's ParallelThingsBlock, which timm's filter does
    not convert (timm has no weights of these models): branch b of the attention is attns.b, of the MLP ffns.b."""
    renames = [('norm11.', 'attns.1.norm.'), ('attn1.', 'attns.1.attn.'), ('gamma_1_1', 'attns.1.ls.gamma'),
               ('norm1.', 'attns.0.norm.'), ('attn.', 'attns.0.attn.'), ('gamma_1', 'attns.0.ls.gamma'),
               ('norm21.', 'ffns.1.norm.'), ('mlp1.', 'ffns.1.mlp.'), ('gamma_2_1', 'ffns.1.ls.gamma'),
               ('norm2.', 'ffns.0.norm.'), ('mlp.', 'ffns.0.mlp.'), ('gamma_2', 'ffns.0.ls.gamma')]
    out = {}
    for key, value in state_dict.items():
        for old, new in renames:
            if key.startswith('blocks.') and f'.{old}' in key:
                key = key.replace(f'.{old}', f'.{new}', 1)
                break
        out[key] = value
    return out


# Every name timm has, and every other kind of DeiT III block (the huge and giant models without a timm name
# differ from these in width and depth only, which the parameter counts check).
COMPARED = [*TIMM_NAMES, 'deit_tiny_patch16_LS', *(name for name in DEIT3 if 'patch16_36' in name or '18x2' in name)]


@pytest.mark.parametrize('name', COMPARED)
def test_outputs_equal_timms_with_the_same_weights(name):
    """Our model's weights, written as the official file is, go through timm's own checkpoint filter for the
    family into timm's implementation (strictly): the outputs agree in eval and in train mode (no dropout, no
    stochastic depth). Two blocks (one for the huge model) and 2x2 patches: the same code path as full size."""
    patch = DEIT3[name][0] if name in DEIT3 else RESMLP[name][0] if name in RESMLP else 16
    size = dict(depth=1 if name == 'deit_huge_patch14_LS' else 2, img_size=2 * patch)
    ours = timm.create_model(name, **size)
    extra = dict(weight_init='skip') if name in DEIT3 else {}
    reference = _timm_reference(name, **size, **extra)
    official = _official_file(name, ours.state_dict())
    if name in CAIT:
        converted = timm_cait.checkpoint_filter_fn(official, reference)
    elif name in RESMLP:
        converted = timm_mixer.checkpoint_filter_fn(official, reference)
    else:
        if DEIT3[name][5]:
            official = {'model': _parallel_keys_for_timm(official['model'])}
        converted = timm_vit.checkpoint_filter_fn(official, reference, adapt_layer_scale=True)
    reference.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, 2 * patch, 2 * patch, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for mode in (False, True):
            ours.train(mode)
            reference.train(mode)
            assert (ours(x) - reference(x)).abs().max().item() <= 1e-6


def test_the_originals_arguments_keep_their_meaning():
    # DeiT III: drop_rate is dropout before the head; stochastic depth the same in every block; LayerScale 1e-4.
    model = timm.create_model('deit_tiny_patch16_LS', depth=3, drop_rate=0.3, drop_path_rate=0.2, img_size=32)
    assert model.head_drop.p == 0.3
    assert [b.drop_path.drop_prob for b in model.blocks] == [0.2] * 3
    assert torch.equal(model.blocks[0].gamma_1, torch.full((192,), 1e-4))
    assert timm.create_model('deit_tiny_patch16_LS', depth=1, init_scale=0.5).blocks[0].gamma_2[0].item() == 0.5
    assert not hasattr(timm.create_model('deit_small_patch16_36', depth=1, img_size=32).blocks[0], 'gamma_1')
    # CaiT: drop_rate after the position embedding and in the patch blocks, none before the head; init_scale.
    model = timm.create_model('cait_XXS24_224', depth=2, drop_rate=0.3, drop_path_rate=0.2, init_scale=0.5)
    assert model.pos_drop.p == model.blocks[0].attn.proj_drop.p == model.blocks[0].mlp.drop2.p == 0.3
    assert model.head_drop.p == 0.0 and model.blocks_token_only[0].mlp.drop2.p == 0.0
    assert [b.drop_path.drop_prob for b in model.blocks] == [0.2, 0.2]
    assert model.blocks[0].gamma_1[0].item() == model.blocks_token_only[1].gamma_2[0].item() == 0.5
    assert timm.create_model('cait_M48', depth=1).blocks[0].gamma_1[0].item() == pytest.approx(1e-6)
    # ResMLP: drop_rate inside the MLPs; ResMLP-12's LayerScale starts at 0.1; the image size sets the mixing width.
    model = timm.create_model('resmlp_12', depth=2, drop_rate=0.3, drop_path_rate=0.2, img_size=64)
    assert model.blocks[0].mlp.drop1.p == model.blocks[0].mlp.drop2.p == 0.3
    assert model.blocks[1].drop_path.drop_prob == 0.2 and model.blocks[0].gamma_1[0].item() == pytest.approx(0.1)
    assert model.blocks[0].attn.in_features == 16


def test_new_families_have_one_eval_head():
    for name in ('deit_tiny_patch16_LS', 'cait_XXS24_224', 'resmlp_12'):
        model = timm.create_model(name, depth=1, img_size=32, num_classes=5).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            logits = model(x)
            assert models.set_eval_head(model, 'cls') == 'cls'
            assert models.set_eval_head(model, 'avg') == 'cls'
            assert torch.equal(model(x), logits) and logits.shape == (2, 5)
            assert torch.equal(model.forward_head(model.forward_features(x)), logits)
        with pytest.raises(ValueError, match='no distillation token'):
            models.set_eval_head(model, 'dist')
        model.reset_classifier(3)
        assert model.get_classifier().out_features == 3


@pytest.mark.parametrize('name', models.PATCHCONVNET_MODELS)
def test_patchconvnet_is_refused_in_one_line(name):
    message = f'PatchConvNet ({name}) is not part of this codebase: timm has no reference implementation to check it'
    with pytest.raises(ValueError, match=re.escape(message)):
        models.build_model(name)
    with pytest.raises(ValueError, match=re.escape(f'--model: {message}')):
        main.check_models(main.get_args_parser().parse_args(['--model', name]))


def test_unknown_model_lists_the_families_and_the_closest_name():
    with pytest.raises(ValueError) as err:
        models.build_model('cait_xxs24')
    message = str(err.value)
    assert '\n' not in message and "Unknown model 'cait_xxs24' (did you mean cait_XXS24?)" in message
    for family, names in models.MODEL_FAMILIES.items():
        assert f"{family} models: {', '.join(names)}" in message


@pytest.mark.parametrize('name,input_size', [('deit_tiny_patch16_LS', 32), ('deit_huge_patch14_LS', 28),
                                             ('cait_XXS24_224', 32), ('resmlpB_24', 32)])
def test_main_accepts_the_new_names_at_any_input_size(name, input_size, shapes_only, capsys):
    main.check_models(main.get_args_parser().parse_args(['--model', name, '--input-size', str(input_size)]))
    model = builders.create_model(name, input_size, num_classes=3, depth=1)
    patches = (input_size // model.patch_embed.patch_size[0]) ** 2
    if name in RESMLP:
        assert model.blocks[0].attn.in_features == patches
    else:
        assert model.pos_embed.shape[1] == patches
    assert model(torch.randn(1, 3, input_size, input_size)).shape == (1, 3)
    capsys.readouterr()
    # As the original: a size the patches do not tile leaves the last pixels out, and main.py says so.
    main.check_models(main.get_args_parser().parse_args(['--model', name, '--input-size', str(input_size + 1)]))
    assert 'the last 1 rows and columns of each image are not seen' in capsys.readouterr().out


def test_finetune_resizes_a_position_embedding_without_extra_tokens(tmp_path, capsys):
    """DeiT III and CaiT embed the patches only: a 14x14 grid (196 tokens) is resized as a grid, with no token
    taken for a class token. An official CaiT file, with its 'module.' prefixes, finetunes as it is."""
    source = timm.create_model('cait_XXS24_224', depth=1)
    torch.save(_official_file('cait_XXS24_224', source.state_dict()), tmp_path / 'XXS24_224.pth')
    model = timm.create_model('cait_XXS24_224', depth=1, img_size=64)  # a 4x4 grid
    checkpoints.load_finetune(model, str(tmp_path / 'XXS24_224.pth'))
    assert 'missing keys [], unexpected keys []' in capsys.readouterr().out
    grid = source.pos_embed.detach().reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode='bicubic', align_corners=False).permute(0, 2, 3, 1)
    assert torch.allclose(model.pos_embed, expected.reshape(1, 16, 192))
    assert torch.equal(model.cls_token, source.cls_token) and torch.equal(model.head.weight, source.head.weight)
    deit3 = timm.create_model('deit_tiny_patch16_LS', depth=1, img_size=64)
    state_dict = {'pos_embed': source.pos_embed.detach().clone()}
    models.interpolate_pos_embed(deit3, state_dict)
    assert torch.allclose(state_dict['pos_embed'], expected.reshape(1, 16, 192))


@pytest.mark.parametrize('name', ['deit_small_patch16_LS', 'cait_XXS24_224', 'resmlp_12'])
def test_resume_and_eval_take_the_official_files_as_they_are(name, tmp_path):
    """main.py --resume / --eval restores strictly from each family's official layout ({'model': ...}, the
    'module.' prefixes of CaiT's files, ResMLP's bare state_dict)."""
    source = timm.create_model(name, depth=1, img_size=32)
    torch.save(_official_file(name, source.state_dict()), tmp_path / 'official.pth')
    model = timm.create_model(name, depth=1, img_size=32)
    assert checkpoints.restore(str(tmp_path / 'official.pth'), model, None) == {'ema_loaded': False}
    for key, value in model.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def _write_official(name, url, **kwargs):
    """A file of random weights in the official layout, in the hub cache under the official file name (the
    torch_home fixture's), from a model of ``name`` built with ``kwargs``; returns its state_dict."""
    with torch.device('meta'):
        shapes = timm.create_model(name, **kwargs).state_dict()
    generator = torch.Generator().manual_seed(0)
    state_dict = {k: torch.randn(v.shape, generator=generator) for k, v in shapes.items()}
    torch.save(_official_file(name, state_dict), Path(torch.hub.get_dir()) / 'checkpoints' / url.rsplit('/', 1)[1])
    return state_dict


@pytest.mark.parametrize('name,file', [('deit_small_patch16_LS', 'deit_3_small_224_1k.pth'),
                                       ('cait_XXS24_224', 'XXS24_224.pth'), ('resmlp_12', 'resmlp_12_no_dist.pth')])
def test_hub_loads_the_official_file_from_the_cache(name, file, torch_home):
    written = _write_official(name, 'https://dl.fbaipublicfiles.com/deit/' + file)
    model = torch.hub.load(str(REPO), name, source='local', pretrained=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, written[key]), key
    model = torch.hub.load(str(REPO), name, source='local', depth=1, img_size=32, num_classes=4)
    assert len(model.blocks) == 1 and model(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_the_official_file_is_chosen_as_the_original_chooses_it(torch_home):
    base = 'https://dl.fbaipublicfiles.com/deit/'
    # The files README_revenge.md links (the huge 1k file under the name the original's code loads).
    for size in ('small', 'base', 'large'):
        for img in (224, 384):
            for data in ('1k', '21k'):
                url = models_v2.weights_url(f'deit_{size}_patch16_LS', img, data == '21k')
                assert url == f'{base}deit_3_{size}_{img}_{data}.pth'
    assert models_v2.weights_url('deit_medium_patch16_LS', 224, True) == base + 'deit_3_medium_224_21k.pth'
    assert models_v2.weights_url('deit_huge_patch14_LS') == base + 'deit_3_huge_224_1k_v1.pth'
    assert models_v2.weights_url('deit_huge_patch14_LS', 224, True) == base + 'deit_3_huge_224_21k_v1.pth'
    with pytest.raises(ValueError, match='deit_tiny_patch16_LS has no official weights'):
        timm.create_model('deit_tiny_patch16_LS', pretrained=True)
    with pytest.raises(ValueError, match='for img_size=384; there are: img_size=224; img_size=224, pretrained_21k'):
        timm.create_model('deit_medium_patch16_LS', pretrained=True, img_size=384)
    with pytest.raises(ValueError, match='add pretrained=True'):
        timm.create_model('deit_small_patch16_LS', pretrained_21k=True)
    with pytest.raises(ValueError, match='are for img_size=448, not 224'):
        timm.create_model('cait_M48', pretrained=True, img_size=224)
    with pytest.raises(ValueError, match='dist=True and dino=True choose different official weights'):
        timm.create_model('resmlp_24', pretrained=True, dist=True, dino=True)
    with pytest.raises(ValueError, match='in_22k=True chooses official weights: add pretrained=True'):
        timm.create_model('resmlpB_24', in_22k=True)
    # Through the hub cache, one block deep: the arguments pick these files and nothing else is there.
    for name, url, kwargs in [
            ('deit_small_patch16_LS', base + 'deit_3_small_384_21k.pth', dict(img_size=384, pretrained_21k=True)),
            ('resmlp_24', base + 'resmlp_24_dino.pth', dict(dino=True)),
            ('resmlpB_24', base + 'resmlpB_24_22k.pth', dict(in_22k=True)),
            ('resmlp_36', base + 'resmlp_36_dist.pth', dict(dist=True))]:
        shape_kwargs = {k: v for k, v in kwargs.items() if k == 'img_size'}
        written = _write_official(name, url, depth=1, **shape_kwargs)
        model = timm.create_model(name, pretrained=True, depth=1, **kwargs)
        assert torch.equal(model.head.bias, written['head.bias']) and model.pretrained_cfg['url'] == url
        # Another number of classes: a fresh head, the file's weights everywhere else.
        model = timm.create_model(name, pretrained=True, depth=1, num_classes=10, **kwargs)
        assert model.head.out_features == 10 and not torch.equal(model.head.bias, written['head.bias'][:10])
        assert torch.equal(model.patch_embed.proj.weight, written['patch_embed.proj.weight'])


def test_hubconf_exposes_every_model_and_keeps_its_dependencies():
    entry_points = {name for name in vars(hubconf) if not name.startswith('_') and callable(getattr(hubconf, name))}
    assert entry_points == {name for names in models.MODEL_FAMILIES.values() for name in names}
    assert hubconf.dependencies == ['torch', 'torchvision', 'timm']


def test_deit3_initialises_as_the_original():
    """Truncated normal (std .02) embeddings and linear layers, zero biases, unit LayerNorms."""
    torch.manual_seed(0)
    model = timm.create_model('deit_small_patch16_LS', depth=2)
    for tensor in (model.pos_embed, model.blocks[0].attn.qkv.weight, model.head.weight):
        assert abs(tensor.std().item() - 0.02) < 0.002 and abs(tensor.mean().item()) < 0.002
    assert model.blocks[1].mlp.fc2.bias.abs().max() == 0 and torch.equal(model.norm.weight, torch.ones(384))
    assert model.no_weight_decay() == {'pos_embed', 'cls_token'}
    assert isinstance(model.blocks[0].norm1, nn.LayerNorm) and model.blocks[0].norm1.eps == 1e-6

"""Where timm 1.0 departs from timm 0.3.2, which trained the paper's models, the DeiTs follow 0.3.2.

timm 0.3.2's ViT drew ``cls_token`` and ``pos_embed`` from ``trunc_normal_(std=.02)`` (the original's
distilled model drew ``dist_token`` and its ``pos_embed`` the same way), linear layers from the same
with zero bias, LayerNorm at weight 1 / bias 0, and left the patch embedding's convolution at
PyTorch's default. Its ``no_weight_decay()`` was ``{'pos_embed', 'cls_token'}`` and its optimizer
factory put 1-D parameters, biases and those names in the group without weight decay.

The original's Slurm launcher stored ``pathlib`` paths in the checkpoint's ``args``; such files load. The
original read iNaturalist images without the supercategory folder; data laid out that way is found.
"""
import argparse
import math
import os
import pathlib
import zipfile

import pytest
import timm
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, create_scheduler
from torch.torch_version import TorchVersion

import builders
import checkpoints
import main
import models
import predict
import utils

STD = 0.02


def assert_trunc_normal_002(name, x):
    """x is a sample of trunc_normal(0, .02) cut at +-2 (in effect N(0, .02^2)).

    The sample std of n normal values has a relative standard error of 1/sqrt(2n), the mean a standard
    error of .02/sqrt(n); 6 standard errors leave a false failure at about 1e-9 per check, whatever
    the seed, and still tell .02 from anything else: the 192 values of deit_tiny's class token must lie
    within 31% of .02, where timm 1.0's normal(std=1e-6) is 20,000 times smaller.
    """
    x = x.detach().flatten()
    n = x.numel()
    assert abs(x.std().item() / STD - 1) < 6 / math.sqrt(2 * n), f'{name}: std {x.std().item():.3g}, not {STD}'
    assert abs(x.mean().item()) < 6 * STD / math.sqrt(n), f'{name}: mean {x.mean().item():.3g}'
    assert x.abs().max().item() <= 2, f'{name}: beyond the truncation bounds +-2'


def test_fresh_deit_base_starts_from_the_original_initialisation():
    torch.manual_seed(0)
    model = timm.create_model('deit_base_distilled_patch16_224')  # the plain model's parameters and more
    assert model.cls_token.std() > 1e-3  # not timm 1.0's normal(std=1e-6)
    checked = set()
    for name in ('cls_token', 'dist_token', 'pos_embed'):
        assert_trunc_normal_002(name, getattr(model, name))
        checked.add(name)
    for module_name, module in model.named_modules():
        prefix = module_name + '.'
        if isinstance(module, nn.Linear):
            assert_trunc_normal_002(prefix + 'weight', module.weight)
            assert torch.all(module.bias == 0), prefix + 'bias'
        elif isinstance(module, nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), module_name
        elif isinstance(module, nn.Conv2d):
            # PyTorch's default, which timm 0.3.2 kept: U(-b, b) with b = 1/sqrt(fan_in), std b/sqrt(3).
            bound = 1 / math.sqrt(module.weight[0].numel())
            for x in (module.weight, module.bias):
                assert x.abs().max() <= bound
                assert abs(x.std().item() * math.sqrt(3) / bound - 1) < 6 / math.sqrt(2 * x.numel())
        else:
            continue
        checked |= {prefix + name for name, _ in module.named_parameters(recurse=False)}
    assert checked == {name for name, _ in model.named_parameters()}  # no parameter left unchecked


@pytest.mark.parametrize('name', models.DEIT_MODELS)
def test_every_deit_starts_its_tokens_as_the_original_and_decays_what_it_decayed(name):
    torch.manual_seed(0)
    model = timm.create_model(name, depth=1)  # tokens and position embedding do not depend on depth
    for token in ('cls_token', 'dist_token', 'pos_embed'):
        if hasattr(model, token):
            assert_trunc_normal_002(f'{name} {token}', getattr(model, token))
    assert model.no_weight_decay() == {'pos_embed', 'cls_token'}


@pytest.mark.parametrize('name', models.DEIT_MODELS)
def test_the_optimizer_decays_the_distillation_token_as_the_original(name):
    model = timm.create_model(name, depth=1, embed_dim=48, num_heads=3, num_classes=5)
    args = main.get_args_parser().parse_args(['--model', name])  # the recipe: AdamW, weight decay 0.05
    args.actual_lr = builders.scaled_lr(args)
    optimizer = builders.build_optimizer(args, model, torch.device('cpu'))
    # timm 0.3.2's add_weight_decay: no decay for 1-D parameters, biases and no_weight_decay() (pos_embed,
    # cls_token); weight decay for the rest: every weight matrix, the patch embedding and the dist token.
    linear = {f'{n}.weight' for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    decayed = linear | {'patch_embed.proj.weight'}
    if 'distilled' in name:
        decayed.add('dist_token')
    names = {p: n for n, p in model.named_parameters()}
    groups = {g['weight_decay']: {names[p] for p in g['params']} for g in optimizer.param_groups}
    assert set(groups) == {0.0, 0.05}
    assert groups[0.05] == decayed
    assert groups[0.0] == set(names.values()) - decayed


# ============ checkpoints of the original's Slurm launcher ============


def original_args(**paths):
    """The checkpoint 'args' of the original run under its Slurm launcher: a Namespace holding pathlib paths."""
    return argparse.Namespace(model='deit_tiny_patch16_224', input_size=32, nb_classes=3, lr=5e-4, epochs=300,
                              data_set='IMNET', data_path='/datasets01/imagenet_full_size/061417/', dist_url='env://',
                              output_dir=pathlib.Path('/checkpoint/user/experiments/1234'),
                              job_dir=pathlib.Path('/checkpoint/user/experiments/%j'), **paths)


def repickled(path, new_path, old, new):
    """A copy of torch.save's file whose pickle names ``new`` where it named ``old`` (GLOBAL opcodes).

    Protocol 2 writes GLOBAL as newline-terminated text, so the replacement needs no length fix-up.
    """
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(new_path, 'w', zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith('/data.pkl'):
                assert old in data
                data = data.replace(old, new)
            dst.writestr(info.filename, data)
    return new_path


@pytest.fixture(scope='module')
def original_checkpoint(tmp_path_factory):
    """(path, model, optimizer): a checkpoint written as the original's main.py under run_with_submitit.py wrote it."""
    torch.manual_seed(0)
    model = timm.create_model('deit_tiny_patch16_224', num_classes=3, img_size=32)
    optimizer = create_optimizer_v2(model, 'adamw', lr=5e-4, weight_decay=0.05)
    scheduler = CosineLRScheduler(optimizer, t_initial=300, warmup_t=5, warmup_lr_init=1e-6)
    path = tmp_path_factory.mktemp('original') / 'checkpoint.pth'
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                'lr_scheduler': scheduler.state_dict(), 'epoch': 4, 'model_ema': model.state_dict(),
                'scaler': torch.amp.GradScaler('cuda', enabled=False).state_dict(), 'args': original_args()}, path)
    return path, model, optimizer


def test_a_checkpoint_of_the_original_launcher_loads_resumes_and_predicts(original_checkpoint, tmp_path):
    path, model, saved_optimizer = original_checkpoint
    args = utils.load_checkpoint(str(path))['args']
    assert args == original_args() and isinstance(args.output_dir, pathlib.PosixPath)
    # --resume: weights, optimizer state and the epoch to continue at.
    resumed = timm.create_model('deit_tiny_patch16_224', num_classes=3, img_size=32)
    optimizer = create_optimizer_v2(resumed, 'adamw', lr=5e-4, weight_decay=0.05)
    state = checkpoints.restore(str(path), resumed, None, optimizer=optimizer,
                                lr_scheduler=CosineLRScheduler(optimizer, t_initial=300))
    assert state['start_epoch'] == 5
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), model.state_dict().values()))
    # the warm-up's starting lr (1e-6) the scheduler had set, where the fresh optimizer holds 5e-4
    assert optimizer.state_dict()['param_groups'] == saved_optimizer.state_dict()['param_groups']
    # predict.py: the model name and input size come from the pickled Namespace.
    args = predict.get_args_parser().parse_args(['--checkpoint', str(path), '--device', 'cpu', 'x.jpg'])
    loaded, classes, input_size, _ = predict.load_model(args)
    assert (input_size, len(classes)) == (32, 3)
    assert torch.equal(loaded.head.weight, model.head.weight)


def test_resuming_a_checkpoint_of_the_original_names_only_true_schedule_changes(capsys):
    # The original stored args.lr overwritten with the lr it trained at, 5e-4 x 64 / 512 on one GPU, and its
    # --cooldown-epochs default 10, which its loop never trained (it ended at --epochs).
    saved = argparse.Namespace(**{**vars(original_args()), 'lr': 5e-4 * 64 / 512, 'batch_size': 64, 'world_size': 1,
                                  'cooldown_epochs': 10, 'sched': 'cosine', 'warmup_epochs': 5, 'unscale_lr': False})
    for argv, printed in [([], ''),
                          (['--lr', '1e-3'], 'Resuming with a new schedule: actual lr 6.25e-05 -> 0.000125\n'),
                          (['--epochs', '400'], 'Resuming with a new schedule: --epochs 300 -> 400\n')]:
        args = main.get_args_parser().parse_args(['--model', 'deit_tiny_patch16_224', '--batch-size', '64', *argv])
        args.actual_lr = builders.scaled_lr(args)
        optimizer = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=args.actual_lr)
        scheduler, _ = create_scheduler(args, optimizer)
        checkpoints.resume_schedule(scheduler, optimizer, scheduler.state_dict(), saved, args)
        assert capsys.readouterr().out == printed, argv


def paths_of_other_pythons(tmp_path):
    """The launcher's args pickled with paths as Python 3.13 names them (pathlib._local) and with a WindowsPath."""
    torch.save({'args': original_args(run=pathlib.PureWindowsPath('C:/runs/1'))}, tmp_path / 'args.pth')
    py313 = repickled(tmp_path / 'args.pth', tmp_path / '313.pth', b'cpathlib\n', b'cpathlib._local\n')
    windows = repickled(tmp_path / 'args.pth', tmp_path / 'win.pth', b'\nPureWindowsPath', b'\nWindowsPath')
    return py313, windows


@pytest.mark.skipif(torch.__version__ < (2, 6), reason='mapping a pickled name to another class needs torch >= 2.6')
def test_paths_pickled_by_another_python_or_system_load(tmp_path):
    py313, windows = paths_of_other_pythons(tmp_path)
    assert utils.load_checkpoint(str(py313))['args'] == original_args(run=pathlib.PureWindowsPath('C:/runs/1'))
    # a concrete path of another system becomes its pure flavour here
    assert utils.load_checkpoint(str(windows))['args'].run == pathlib.PureWindowsPath('C:/runs/1')


class Payload:
    """Pickles as a call that would write ``marker`` when unpickled."""

    def __init__(self, call, marker):
        self.call, self.marker = call, marker

    def __reduce__(self):
        if self.call == 'system':
            return os.system, (f'touch {self.marker}',)
        return pathlib.Path.touch, (pathlib.Path(self.marker),)  # reaches a method of an allowed class


@pytest.mark.parametrize('call', ['system', 'path_method'])
def test_a_crafted_pickle_next_to_the_launcher_paths_is_still_refused(call, tmp_path):
    marker = tmp_path / 'ran'
    torch.save({'model': {}, 'args': original_args(payload=Payload(call, marker))}, tmp_path / 'crafted.pth')
    with pytest.raises(utils.CheckpointError, match='is refused: unpickling it could run code'):
        utils.load_checkpoint(str(tmp_path / 'crafted.pth'))
    assert not marker.exists()


@pytest.fixture
def torch_2_4(monkeypatch):
    """torch 2.4's weights-only API: the process-wide add_safe_globals only, no safe_globals context manager, and
    classes without the (class, 'module.name') pairs of torch 2.6. On torch 2.4 itself this changes nothing."""
    if hasattr(torch.serialization, 'safe_globals'):
        monkeypatch.delattr(torch.serialization, 'safe_globals')
    monkeypatch.setattr(torch, '__version__', TorchVersion('2.4.0'))


def test_on_torch_2_4_the_original_checkpoints_load_and_crafted_pickles_stay_refused(
        original_checkpoint, torch_2_4, tmp_path):
    allowed_before = set(torch.serialization.get_safe_globals())
    assert utils.load_checkpoint(str(original_checkpoint[0]))['args'] == original_args()
    for call in ('system', 'path_method'):
        marker = tmp_path / call
        torch.save({'model': {}, 'args': original_args(payload=Payload(call, marker))}, tmp_path / 'crafted.pth')
        with pytest.raises(utils.CheckpointError, match='is refused: unpickling it could run code'):
            utils.load_checkpoint(str(tmp_path / 'crafted.pth'))
        assert not marker.exists()
    # torch < 2.6 cannot map the names of another Python or system: a message that says what can
    for path in paths_of_other_pythons(tmp_path):
        with pytest.raises(utils.CheckpointError, match=r'holds a pathlib\.(_local\.PosixPath|WindowsPath), a path as '
                                                        r'another Python .* load it with torch >= 2\.6'):
            utils.load_checkpoint(str(path))
    # the classes were allowed for those loads only
    assert set(torch.serialization.get_safe_globals()) == allowed_before

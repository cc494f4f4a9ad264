"""The DeiT III recipe and cosub: the original's README_revenge.md commands parse with their meaning, the flag
typo of its first command is named, --opt fusedlamb runs timm's lamb, --cosub doubles the batch, refuses what it
cannot combine with, and trains.

(README_3things.md, the other DeiT III README, has no command: its --attn-only is tested in test_main.py.)
"""
import contextlib
import io
import json
import shlex
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.nn as nn
from timm.loss import BinaryCrossEntropy
from timm.optim import Lamb

import builders
import engine
import main
import run_with_submitit
from losses import CosubLoss

pytestmark = pytest.mark.usefixtures('one_thread')

# Every command of the original's README_revenge.md, as written there (the first with its typo).
REVENGE_COMMANDS = [
    # training on ImageNet-1k
    'python run_with_submitit.py --model deit_small_patch16_LS --data-path /path/to/imagenet --batch 256 --lr 4e-3 --epochs 800 --weight-decay 0.05 --sched cosine --input-size 224 --reprob 0.0 --node 1 --gpu 8 --smoothing 0.0 --warmup-epochs 5 --drop 0.0 --nb-classes 1000 --seed 0 --opt fusedlamb --warmup-lr 1e-6 --mixup .8 --drop-path 0.05 --cutmix 1.0 --unscale-lr --repeated-aug--bce-loss  --color-jitter 0.3 --ThreeAugment',  # noqa: E501
    'python run_with_submitit.py --model deit_base_patch16_LS --data-path /path/to/imagenet --batch 256 --lr 3e-3 --epochs 800 --weight-decay 0.05 --sched cosine --input-size 192 --reprob 0.0 --node 1 --gpu 8 --smoothing 0.0 --warmup-epochs 5 --drop 0.0 --nb-classes 1000 --seed 0 --opt fusedlamb --warmup-lr 1e-6 --mixup .8 --drop-path 0.2 --cutmix 1.0 --unscale-lr --repeated-aug --bce-loss  --color-jitter 0.3 --ThreeAugment',  # noqa: E501
    'python run_with_submitit.py --model deit_large_patch16_LS --data-path /path/to/imagenet --batch 64 --lr 3e-3 --epochs 800 --weight-decay 0.05 --sched cosine --input-size 192 --reprob 0.0 --node 4 --gpu 8 --smoothing 0.0 --warmup-epochs 5 --drop 0.0 --nb-classes 1000 --seed 0 --opt fusedlamb --warmup-lr 1e-6 --mixup .8 --drop-path 0.45 --cutmix 1.0 --unscale-lr --repeated-aug --bce-loss  --color-jitter 0.3 --ThreeAugment',  # noqa: E501
    'python run_with_submitit.py --model deit_huge_patch14_LS --data-path /path/to/imagenet --batch 64 --lr 3e-3 --epochs 800 --weight-decay 0.05 --sched cosine --input-size 160 --reprob 0.0 --node 4 --gpu 8 --smoothing 0.0 --warmup-epochs 5 --drop 0.0 --nb-classes 1000 --seed 0 --opt fusedlamb --warmup-lr 1e-6 --mixup .8 --drop-path 0.6 --cutmix 1.0 --unscale-lr --repeated-aug --bce-loss  --color-jitter 0.3 --ThreeAugment',  # noqa: E501
    # finetuning ViT-B, L and H at 224, ViT-S at 384
    'python run_with_submitit.py --model deit_base_patch16_LS --data-path /path/to/imagenet --batch 64 --lr 1e-5 --epochs 20 --weight-decay 0.1 --sched cosine --input-size 224 --reprob 0.0 --node 1 --gpu 8 --smoothing 0.1 --warmup-epochs 5 --drop 0.0 --nb-classes 1000 --seed 0 --opt adamw --warmup-lr 1e-6 --mixup .8 --drop-path 0.2 --cutmix 1.0 --unscale-lr  --aa rand-m9-mstd0.5-inc1 --no-repeated-aug --finetune model_path',  # noqa: E501
    'python run_with_submitit.py --model deit_large_patch16_LS --data-path /path/to/imagenet --batch 64 --lr 1e-5 --epochs 20 --weight-decay 0.1 --sched cosine --input-size 224 --reprob 0.0 --node 1 --gpu 8 --smoothing 0.1 --warmup-epochs 5 --drop 0.0 --nb-classes 1000 --seed 0 --opt adamw --warmup-lr 1e-6 --mixup .8 --drop-path 0.45 --cutmix 1.0 --unscale-lr  --aa rand-m9-mstd0.5-inc1 --no-repeated-aug --finetune model_path',  # noqa: E501
    'python run_with_submitit.py --model deit_huge_patch14_LS --data-path /path/to/imagenet --batch 32 --lr 1e-5 --epochs 20 --weight-decay 0.1 --sched cosine --input-size 224 --reprob 0.0 --node 2 --gpu 8 --smoothing 0.1 --warmup-epochs 5 --drop 0.0 --nb-classes 1000 --seed 0 --opt adamw --warmup-lr 1e-6 --mixup .8 --drop-path 0.55 --cutmix 1.0 --unscale-lr  --aa rand-m9-mstd0.5-inc1 --no-repeated-aug --finetune model_path',  # noqa: E501
    'python run_with_submitit.py --model deit_small_patch16_LS --data-path /path/to/imagenet --batch 64 --lr 1e-5 --epochs 20 --weight-decay 0.1 --sched cosine --input-size 384 --reprob 0.0 --node 1 --gpu 8 --smoothing 0.1 --warmup-epochs 5 --drop 0.0 --nb-classes 1000 --seed 0 --opt adamw --warmup-lr 1e-6 --mixup .8 --drop-path 0.0 --cutmix 1.0 --unscale-lr --no-repeated-aug  --color-jitter 0.3 --aa rand-m9-mstd0.5-inc1 --finetune model_path',  # noqa: E501
    # training on ImageNet-21k
    'python run_with_submitit.py --model deit_small_patch16_LS --data-path /path/to/imagenet --batch 128 --lr 0.001 --epochs 240 --weight-decay 0.02 --sched cosine --input-size 224 --reprob 0.0 --node 2 --gpu 8 --smoothing 0.1 --warmup-epochs 5 --drop 0.0 --nb-classes 1000 --seed 0 --opt fusedlamb --warmup-lr 1e-6 --mixup 0 --drop-path 0.05 --cutmix 1.0 --unscale-lr --no-repeated-aug   --color-jitter 0.3 --ThreeAugment --src',  # noqa: E501
    'python run_with_submitit.py --model deit_base_patch16_LS --data-path /path/to/imagenet --batch 64 --lr 0.001 --epochs 240 --weight-decay 0.02 --sched cosine --input-size 224 --reprob 0.0 --node 4 --gpu 8 --smoothing 0.1 --warmup-epochs 5 --drop 0.0 --nb-classes 1000 --seed 0 --opt fusedlamb --warmup-lr 1e-6 --mixup 0 --drop-path 0.1 --cutmix 1.0 --unscale-lr --no-repeated-aug   --color-jitter 0.3 --ThreeAugment --src',  # noqa: E501
    'python run_with_submitit.py --model deit_large_patch16_LS --data-path /path/to/imagenet --batch 64 --lr 0.001 --epochs 240 --weight-decay 0.02 --sched cosine --input-size 224 --reprob 0.0 --node 4 --gpu 8 --smoothing 0.1 --warmup-epochs 5 --drop 0.0 --nb-classes 1000 --seed 0 --opt fusedlamb --warmup-lr 1e-6 --mixup 0 --drop-path 0.3 --cutmix 1.0 --unscale-lr --no-repeated-aug   --color-jitter 0.3 --ThreeAugment --src',  # noqa: E501
    'python run_with_submitit.py --model deit_huge_patch14_LS --data-path /path/to/imagenet --batch 64 --lr 0.001 --epochs 90 --weight-decay 0.02 --sched cosine --input-size 128 --reprob 0.0 --node 4 --gpu 8 --smoothing 0.1 --warmup-epochs 5 --drop 0.0 --nb-classes 1000 --seed 0 --opt fusedlamb --warmup-lr 1e-6 --mixup 0 --drop-path 0.5 --cutmix 1.0 --unscale-lr --no-repeated-aug   --color-jitter 0.3 --ThreeAugment --src',  # noqa: E501
    # finetuning the ImageNet-21k models on ImageNet-1k
    'python run_with_submitit.py --model deit_small_patch16_LS --data-path /path/to/imagenet --batch 128 --lr 0.0003 --epochs 50 --weight-decay 0.02 --sched cosine --input-size 224 --reprob 0.0 --node 2 --gpu 8 --smoothing 0.1 --warmup-epochs 5 --drop 0.0 --nb-classes 1000 --seed 0 --opt fusedlamb --warmup-lr 1e-6 --mixup 0 --drop-path 0.05 --cutmix 1.0 --unscale-lr --no-repeated-aug   --color-jitter 0.3 --ThreeAugment --src',  # noqa: E501
    'python run_with_submitit.py --model deit_base_patch16_LS --data-path /path/to/imagenet --batch 64 --lr 0.0003 --epochs 50 --weight-decay 0.02 --sched cosine --input-size 224 --reprob 0.0 --node 4 --gpu 8 --smoothing 0.1 --warmup-epochs 5 --drop 0.0 --nb-classes 1000 --seed 0 --opt fusedlamb --warmup-lr 1e-6 --mixup 0 --drop-path 0.15 --cutmix 1.0 --unscale-lr --no-repeated-aug   --color-jitter 0.3 --ThreeAugment --src',  # noqa: E501
    'python run_with_submitit.py --model deit_large_patch16_LS --data-path /path/to/imagenet --batch 64 --lr 0.0003 --epochs 50 --weight-decay 0.02 --sched cosine --input-size 224 --reprob 0.0 --node 4 --gpu 8 --smoothing 0.1 --warmup-epochs 5 --drop 0.0 --nb-classes 1000 --seed 0 --opt fusedlamb --warmup-lr 1e-6 --mixup 0 --drop-path 0.4 --cutmix 1.0 --unscale-lr --no-repeated-aug   --color-jitter 0.3 --ThreeAugment --src',  # noqa: E501
    'python run_with_submitit.py --model deit_huge_patch14_LS --data-path /path/to/imagenet --batch 64 --lr 0.0003 --epochs 50 --weight-decay 0.02 --sched cosine --input-size 224 --reprob 0.0 --node 4 --gpu 8 --smoothing 0.1 --warmup-epochs 5 --drop 0.0 --nb-classes 1000 --seed 0 --opt fusedlamb --warmup-lr 1e-6 --mixup 0 --drop-path 0.45 --cutmix 1.0 --unscale-lr --no-repeated-aug   --color-jitter 0.3 --ThreeAugment --src',  # noqa: E501
]
TYPO = '--repeated-aug--bce-loss'


def launcher_argv(command: str, tmp_path: Path) -> List[str]:
    """The launcher's arguments of a README command, its data and checkpoint paths in ``tmp_path``."""
    command = command.replace('/path/to/imagenet', str(tmp_path / 'imagenet'))
    return shlex.split(command.replace('model_path', str(tmp_path / 'model.pth')))[2:]


def flag_values(argv: List[str]) -> Dict[str, str]:
    """{flag: its value, or '' for a switch}, read from the command as written."""
    values = {}
    for i, word in enumerate(argv):
        if word.startswith('--'):
            values[word] = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith('--') else ''
    return values


@pytest.mark.parametrize('command', REVENGE_COMMANDS, ids=range(len(REVENGE_COMMANDS)))
def test_deit3_commands_parse_with_their_meaning(command, tmp_path):
    """Each command parses in run_with_submitit.py's parser (the first once its typo is fixed), every value lands
    where the original put it, and main.py's checks accept the combination (models built on the meta device)."""
    argv = launcher_argv(command.replace(TYPO, '--repeated-aug --bce-loss'), tmp_path)
    args = run_with_submitit.get_args_parser().parse_args(argv)
    given = flag_values(argv)
    assert (args.batch_size, args.nodes, args.ngpus) == (int(given['--batch']), int(given['--node']), 8)
    assert args.data_path == str(tmp_path / 'imagenet') and args.model == given['--model']
    for flag, value in given.items():
        dest = flag[2:].replace('-', '_')
        if flag in ('--batch', '--node', '--gpu', '--no-repeated-aug') or dest not in vars(args):
            continue
        expected = True if value == '' else type(getattr(args, dest))(value)
        assert getattr(args, dest) == expected, flag
    expected_repeated_aug = False if '--no-repeated-aug' in given else True if '--repeated-aug' in given else None
    assert args.repeated_aug is expected_repeated_aug
    assert args.unscale_lr and builders.scaled_lr(args) == float(given['--lr'])  # --lr as given, not rescaled
    args.device = 'cpu'  # as the launcher checks: whether a GPU is visible is for the compute nodes to say
    main.check_args(args)


def test_a_typo_that_glues_two_flags_names_them(capsys):
    """README_revenge.md's first command, as written: one line that names the two flags, exit status 2; in
    main.py and in the launcher. Any two flags, not this pair only; other unknown arguments are still named."""
    for parse in (main.cli, run_with_submitit.parse_args):
        with pytest.raises(SystemExit) as stopped:
            parse(launcher_argv(REVENGE_COMMANDS[0], Path('data')))
        err = capsys.readouterr().err.splitlines()[-1]
        assert stopped.value.code == 2
        assert err.endswith(f'error: {TYPO} glues two flags together: write --repeated-aug --bce-loss'), err
    with pytest.raises(SystemExit):
        main.cli(['--unscale-lr--ThreeAugment', '--lr=1'])
    assert capsys.readouterr().err.splitlines()[-1].endswith('write --unscale-lr --ThreeAugment')
    with pytest.raises(SystemExit):
        main.cli(['--src--lr=1e-3'])
    assert capsys.readouterr().err.splitlines()[-1].endswith('write --src --lr=1e-3')
    with pytest.raises(SystemExit) as stopped:
        main.cli(['--repeated-aug--bce', '--no-such-flag'])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.endswith('unrecognized arguments: --repeated-aug--bce --no-such-flag')


def test_fusedlamb_runs_timms_lamb_and_says_so(capsys):
    """apex's FusedLAMB -> timm's Lamb with the flags' lr, weight decay, eps and betas (the same update), in one
    line; other optimizers are untouched."""
    model = nn.Linear(4, 3)
    args = main.get_args_parser().parse_args(['--opt', 'fusedlamb', '--weight-decay', '0.05', '--opt-betas', '0.9',
                                             '0.99'])
    args.actual_lr = 4e-3
    optimizer = builders.build_optimizer(args, model, torch.device('cpu'))
    assert type(optimizer) is Lamb
    decayed = next(g for g in optimizer.param_groups if g['weight_decay'])
    assert (decayed['lr'], decayed['weight_decay'], decayed['eps']) == (4e-3, 0.05, 1e-8)
    assert tuple(decayed['betas']) == (0.9, 0.99)
    assert capsys.readouterr().out == ('--opt fusedlamb is NVIDIA apex\'s: running timm\'s lamb instead, the same '
                                       'update without apex\n')
    args.opt = 'adamw'
    assert type(builders.build_optimizer(args, model, torch.device('cpu'))) is torch.optim.AdamW
    assert capsys.readouterr().out == ''


# ============ cosub ============

@pytest.mark.parametrize('argv, message', [
    (['--distillation-type', 'hard', '--teacher-path', 't.pth', '--model', 'deit_tiny_distilled_patch16_224'],
     '--cosub trains two sub-models of one model .* --distillation-type hard needs them'),
    (['--dist-head-on-labels', '--model', 'deit_tiny_distilled_patch16_224'], '--dist-head-on-labels needs them'),
    (['--drop-path', '0'], 'stochastic depth: give a --drop-path above 0'),
    (['--no-train-mode'], 'in training mode'),
    (['--model', 'deit_tiny_distilled_patch16_224'],
     'deit_tiny_distilled_patch16_224 has two: use a model without distillation token .*deit_tiny_patch16_224'),
])
def test_cosub_refuses_what_it_cannot_combine_with(argv, message):
    with pytest.raises(ValueError, match=message):
        main.check_args(main.get_args_parser().parse_args(['--cosub', '--input-size', '32', *argv]))


def test_cosub_accepts_accumulation_and_mixup_and_is_ignored_by_eval():
    for argv in (['--accum-iter', '2'], ['--mixup', '0', '--cutmix', '0'], ['--bce-loss', '--smoothing', '0'],
                 ['--eval', '--model', 'deit_tiny_distilled_patch16_224']):
        main.check_args(main.get_args_parser().parse_args(['--cosub', '--input-size', '32', *argv]))


class Recorder(nn.Module):
    """Records the batches it is called on; its logits are a linear map of the image mean."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 5)
        self.batches = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x)
        return self.fc(x.mean(dim=(2, 3)))


def test_cosub_runs_the_model_once_on_the_batch_twice_over():
    """One forward pass on [x; x], and the loss of CosubLoss on its outputs; a DistillationLoss gets the batch once."""
    model, samples, labels = Recorder(), torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    criterion = CosubLoss(BinaryCrossEntropy(smoothing=0.0))
    loss = engine._batch_loss(model, criterion, samples, labels)
    (seen,) = model.batches
    assert torch.equal(seen, torch.cat((samples, samples)))
    outputs = model.fc(seen.mean(dim=(2, 3)))
    assert torch.equal(loss, criterion(seen, outputs, labels))
    plain = builders.build_criterion(main.get_args_parser().parse_args(['--mixup', '0', '--cutmix', '0']),
                                     model, 5, torch.device('cpu'))
    engine._batch_loss(model, plain, samples, labels)
    assert model.batches[-1] is samples


# ============ end to end ============

DEIT3_FLAGS = ['--bce-loss', '--ThreeAugment', '--unscale-lr', '--opt', 'fusedlamb', '--color-jitter', '0.3',
               '--eval-crop-ratio', '1.0']
DIGITS = ['--model', 'deit_tiny_patch16_LS', '--data-set', 'DIGITS', '--input-size', '32', '--epochs', '1',
          '--batch-size', '64', '--num_workers', '0', '--device', 'cpu', '--smoothing', '0', '--lr', '4e-3',
          '--warmup-epochs', '0', '--no-model-ema']


def run(argv: List[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main.cli(argv)
    return out.getvalue()


@pytest.mark.parametrize('cosub', [False, True], ids=['deit3', 'deit3-cosub'])
def test_one_digits_epoch_with_the_deit3_flags(cosub, tmp_path):
    """The DeiT III flags (and --cosub) train one epoch and evaluate: LAMB's state in the checkpoint, the lr as
    given, a binary cross-entropy (about ln 2 per class at the start, not the 2.3 of a softmax over 10 classes),
    all 355 validation images counted."""
    stdout = run([*DIGITS, *DEIT3_FLAGS, *(['--cosub'] if cosub else []), '--output_dir', str(tmp_path)])
    assert 'running timm\'s lamb instead' in stdout
    (log,) = [json.loads(line) for line in (tmp_path / 'log.txt').read_text().splitlines()]
    assert log['train_lr'] == pytest.approx(4e-3, rel=1e-9) and log['test_n'] == 355  # not 4e-3 * 64 / 512
    assert 0 < log['train_loss'] < 1.0
    optimizer = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)['optimizer']
    assert all('trust_clip' in group for group in optimizer['param_groups'])


@pytest.mark.parametrize('accum_iter', ['1', '2'])
def test_cosub_learns_the_image_folder(accum_iter, image_folder, tmp_path):
    """Two epochs of cosub on the 3-class JPEG folder (mixup on), also with each step accumulated over two doubled
    batches: the loss falls and every validation image is classified right (chance: 45%)."""
    run(['--model', 'test_vit', '--input-size', '32', '--data-set', 'FOLDER', '--data-path', str(image_folder),
         '--epochs', '2', '--batch-size', '16', '--num_workers', '0', '--device', 'cpu', '--aa', 'none', '--reprob',
         '0', '--lr', '5e-3', '--warmup-epochs', '0', '--no-model-ema', '--cosub', '--accum-iter', accum_iter,
         '--output_dir', str(tmp_path)])
    logs = [json.loads(line) for line in (tmp_path / 'log.txt').read_text().splitlines()]
    assert logs[1]['train_loss'] < logs[0]['train_loss']
    assert logs[1]['test_acc1'] == 100.0


def test_an_input_size_the_patches_do_not_tile_is_said_not_refused(capsys):
    """DeiT III-H (patch 14) trains at 160 and 128 in README_revenge.md: as in the original and timm, the patch
    convolution leaves the last pixels out, and a line says how many; below one patch it is refused."""
    main.check_models(main.get_args_parser().parse_args(['--model', 'vit_huge_patch14_224', '--input-size', '160']))
    assert capsys.readouterr().out == (
        'Note: --input-size 160 is not a multiple of the patch size 14 of --model vit_huge_patch14_224: its patches '
        'cover 154 pixels, the last 6 rows and columns of each image are not seen\n')
    model = builders.create_model('deit_tiny_patch16_224', 40, num_classes=3, depth=1)
    assert model.patch_embed.grid_size == (2, 2) and model(torch.randn(1, 3, 40, 40)).shape == (1, 3)
    with pytest.raises(ValueError, match='--input-size 12 is smaller than the patch size 14'):
        main.check_models(main.get_args_parser().parse_args(['--model', 'vit_huge_patch14_224', '--input-size', '12']))

"""main.py end to end: the commands a user runs, in a subprocess, on CPU; what they print and write.

Most runs train deit_tiny_patch16_224 at 32 x 32 pixels (2 x 2 patches, the full 12 blocks) on the
small JPEG folder of conftest.py: 120 training images, 11 validation images.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import timm
import torch
import torch.nn.functional as F

import main
import models  # noqa: F401  (registers the DeiT names for the timm.create_model calls below)

ROOT = Path(__file__).resolve().parents[1]
URL = 'https://dl.fbaipublicfiles.com/deit/'
ACC_LINE = re.compile(r'^\* Acc@1 (\d+\.\d{3}) Acc@5 (\d+\.\d{3}) loss (\d+\.\d{3})$', re.M)


def tiny_flags(folder: Path, *extra: str) -> List[str]:
    return ['--model', 'deit_tiny_patch16_224', '--input-size', '32', '--data-set', 'FOLDER',
            '--data-path', str(folder), '--batch-size', '16', '--num_workers', '0', '--device', 'cpu', '--lr', '5e-3',
            *extra]


def run_main(*args: str, launcher: List[str] = (), timeout: float = 600, check: bool = True
             ) -> subprocess.CompletedProcess:
    proc = subprocess.run([*(launcher or [sys.executable]), str(ROOT / 'main.py'), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f'exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}'
    return proc


def log_lines(output_dir: Path) -> List[Dict]:
    return [json.loads(line) for line in (output_dir / 'log.txt').read_text().splitlines()]


def acc_lines(stdout: str) -> List[float]:
    """Top-1 accuracies of the `* Acc@1 ...` lines, in order (the model's, then the EMA's)."""
    return [float(m[0]) for m in ACC_LINE.findall(stdout)]


def load(path: Path) -> Dict:
    return torch.load(path, map_location='cpu', weights_only=True)


# ============ quick start ============

# The README's quick start, read from the README itself so that the two cannot drift apart: 30 epochs
# reach 95.5% top-1 on the 355 validation images (about 2.5 minutes on two CPU cores); 90% is the bar.
def readme_quick_start() -> List[str]:
    readme = (ROOT / 'README.md').read_text()
    line = next(line for line in readme.splitlines() if 'python main.py' in line and '--data-set DIGITS' in line)
    args = line.split('python main.py', 1)[1].split()
    return args[:args.index('--output_dir')]


def test_quick_start_learns_the_digits(tmp_path):
    out = tmp_path / 'quickstart'
    proc = run_main(*readme_quick_start(), '--output_dir', str(out))
    logs = log_lines(out)
    assert [entry['epoch'] for entry in logs] == list(range(30))
    assert logs[-1]['test_acc1'] >= 90.0, [round(e['test_acc1'], 1) for e in logs]
    assert 'Accuracy of the network on the 355 test images' in proc.stdout
    for key in ('train_lr', 'train_loss', 'test_loss', 'test_acc1', 'test_acc5', 'epoch', 'n_parameters',
                'test_ema_acc1', 'test_ema_acc5', 'test_ema_loss'):
        assert key in logs[-1], key
    assert {p.name for p in out.iterdir()} == {'checkpoint.pth', 'best_checkpoint.pth', 'log.txt', 'args.json'}
    best = load(out / 'best_checkpoint.pth')
    assert best['max_accuracy'] == max(e['test_acc1'] for e in logs)
    assert logs[best['epoch']]['test_acc1'] == best['max_accuracy']
    assert load(out / 'checkpoint.pth')['epoch'] == 29


# ============ resume ============


@pytest.fixture(scope='module')
def two_epochs(image_folder, tmp_path_factory):
    """The same 2-epoch command run through, and run with a kill after epoch 0 and a --resume."""
    flags = tiny_flags(image_folder, '--epochs', '2', '--model-ema-decay', '0.9')
    through = tmp_path_factory.mktemp('through')
    run_main(*flags, '--output_dir', str(through))

    for _attempt in range(2):
        resumed = tmp_path_factory.mktemp('resumed')
        proc = subprocess.Popen([sys.executable, str(ROOT / 'main.py'), *flags, '--output_dir', str(resumed)],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # checkpoint.pth appears (renamed into place) once epoch 0 is saved: stop the run there, as a kill or a
        # preemption would.
        checkpoint = resumed / 'checkpoint.pth'
        while proc.poll() is None and not checkpoint.exists():
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if load(resumed / 'checkpoint.pth')['epoch'] == 0:
            break
    else:
        pytest.fail('the run finished epoch 1 before it could be killed, twice')
    proc = run_main(*flags, '--output_dir', str(resumed), '--resume', str(resumed / 'checkpoint.pth'))
    return through, resumed, proc.stdout


def test_resume_equals_an_uninterrupted_run(two_epochs):
    through, resumed, stdout = two_epochs
    assert 'Resumed from' in stdout and 'continuing at epoch 1' in stdout
    a, b = load(through / 'checkpoint.pth'), load(resumed / 'checkpoint.pth')
    assert a['epoch'] == b['epoch'] == 1
    for key in ('model', 'model_ema'):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for state_a, state_b in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert (through / 'log.txt').read_text() == (resumed / 'log.txt').read_text()


def test_schedule_trains_epoch_e_with_the_value_of_epoch_e(two_epochs):
    through, _, _ = two_epochs
    # Warmup of --warmup-epochs 5 from --warmup-lr 1e-6 to the scaled lr: epoch e at
    # warmup_lr + e * (lr - warmup_lr) / 5. The original trained epoch 1 with epoch 0's value.
    lr = 5e-3 * 16 / 512
    logs = log_lines(through)
    assert logs[0]['train_lr'] == pytest.approx(1e-6, rel=1e-9)
    assert logs[1]['train_lr'] == pytest.approx(1e-6 + (lr - 1e-6) / 5, rel=1e-9)


def test_outputs_hold_the_documented_keys_and_load_with_weights_only(two_epochs):
    through, _, _ = two_epochs
    assert {p.name for p in through.iterdir()} == {'checkpoint.pth', 'best_checkpoint.pth', 'log.txt', 'args.json'}
    checkpoint = load(through / 'checkpoint.pth')
    assert set(checkpoint) == {'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler', 'args',
                               'max_accuracy', 'classes'}
    assert isinstance(checkpoint['args'], dict) and checkpoint['args']['lr'] == 5e-3
    assert checkpoint['args']['actual_lr'] == pytest.approx(5e-3 * 16 / 512)
    assert checkpoint['classes'] == ['ant', 'bee', 'cat']
    logs = log_lines(through)
    for entry in logs:
        assert {'train_lr', 'train_loss', 'test_loss', 'test_acc1', 'test_acc5', 'epoch', 'n_parameters',
                'test_ema_acc1'} <= set(entry)
    assert checkpoint['max_accuracy'] == max(e['test_acc1'] for e in logs)
    # The first epoch counts as a best one.
    assert load(through / 'best_checkpoint.pth')['epoch'] == (0 if logs[0]['test_acc1'] >= logs[1]['test_acc1'] else 1)
    assert json.loads((through / 'args.json').read_text())['output_dir'] == str(through)


def test_a_checkpoint_in_the_output_dir_is_resumed(two_epochs, image_folder):
    _, resumed, _ = two_epochs
    proc = run_main(*tiny_flags(image_folder, '--epochs', '2', '--output_dir', str(resumed)))
    assert f'Found {resumed / "checkpoint.pth"}: resuming from it' in proc.stdout
    assert 'Start training for 0 epochs' in proc.stdout and len(log_lines(resumed)) == 2


def test_eval_of_our_checkpoint_reports_the_model_and_its_ema(two_epochs, image_folder):
    through, _, _ = two_epochs
    proc = run_main(*tiny_flags(image_folder, '--eval', '--resume', str(through / 'checkpoint.pth')))
    last = log_lines(through)[-1]
    assert acc_lines(proc.stdout) == [round(last['test_acc1'], 3), round(last['test_ema_acc1'], 3)]
    assert f'Accuracy of the network on the 11 test images: {last["test_acc1"]:.1f}%' in proc.stdout
    assert 'Accuracy of the model EMA on the 11 test images' in proc.stdout


def test_eval_of_an_official_file_by_its_url(two_epochs, image_folder, torch_home):
    through, _, _ = two_epochs
    name = 'deit_tiny_patch16_224-a1311bcf.pth'
    torch.save({'model': load(through / 'checkpoint.pth')['model']}, torch_home / 'hub' / 'checkpoints' / name)
    proc = run_main(*tiny_flags(image_folder, '--eval', '--resume', URL + name))
    # The file's weights, on the same images: the accuracy of the run that wrote them.
    assert acc_lines(proc.stdout) == [round(log_lines(through)[-1]['test_acc1'], 3)]
    assert 'model EMA' not in proc.stdout  # an official file holds no EMA


# ============ torchrun ============


def test_torchrun_two_processes_with_repeated_aug_and_dist_eval(image_folder, tmp_path):
    out = tmp_path / 'ddp'
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    proc = run_main(*tiny_flags(image_folder, '--epochs', '1', '--dist-eval', '--no-model-ema', '--output_dir',
                                str(out)), launcher=launcher)
    assert 'Training sampler: RASampler' in proc.stdout
    assert 'do not split evenly over 2 processes' in proc.stdout  # 11 images: one padding sample
    assert proc.stdout.count('Accuracy of the network') == 1  # printed by rank 0 only
    single = run_main(*tiny_flags(image_folder, '--eval', '--resume', str(out / 'checkpoint.pth')))
    assert acc_lines(proc.stdout) == acc_lines(single.stdout)[:1]
    assert log_lines(out)[0]['test_n'] == 11


# ============ distillation ============


@pytest.fixture(scope='module')
def teacher_dir(image_folder, tmp_path_factory):
    """A timm convnet trained by main.py: one epoch at the scaled lr, then one cooldown epoch at --min-lr."""
    out = tmp_path_factory.mktemp('teacher')
    run_main(*tiny_flags(image_folder, '--model', 'resnet10t', '--epochs', '1', '--cooldown-epochs', '1',
                         '--warmup-epochs', '0', '--no-model-ema', '--output_dir', str(out)))
    return out


def test_cooldown_epochs_follow_the_schedule_at_min_lr(teacher_dir):
    logs = log_lines(teacher_dir)
    assert [entry['epoch'] for entry in logs] == [0, 1]
    assert logs[0]['train_lr'] == pytest.approx(5e-3 * 16 / 512, rel=1e-9)  # epoch 0: the cosine's first value
    assert logs[1]['train_lr'] == pytest.approx(1e-5, rel=1e-9)


@pytest.mark.parametrize('distillation_type, answer', [('hard', 'bee'), ('soft', 'cat')])
def test_distillation_follows_the_teacher(distillation_type, answer, image_folder, teacher_dir, tmp_path_factory):
    """A distilled DeiT learns, through its distillation head, what a teacher trained by main.py says.

    The teacher (a timm convnet) is trained by main.py, then its classifier is biased to always give one
    answer. With --distillation-alpha 1 only the teacher supervises, so the distillation head gives that
    answer too: its accuracy is the share of that class among the validation images (bee 5, cat 2 of 11).
    Both runs start from the same student, so a student that ignored its teacher would fail one of them.
    """
    checkpoint = load(teacher_dir / 'checkpoint.pth')
    label = checkpoint['classes'].index(answer)
    checkpoint['model']['fc.bias'] = F.one_hot(torch.tensor(label), 3).float() * 1e4
    torch.save(checkpoint, teacher_dir / f'{answer}.pth')
    out = tmp_path_factory.mktemp(distillation_type)
    run_main(*tiny_flags(image_folder, '--model', 'deit_tiny_distilled_patch16_224', '--teacher-model', 'resnet10t',
                         '--teacher-path', str(teacher_dir / f'{answer}.pth'), '--distillation-type', distillation_type,
                         '--distillation-alpha', '1.0', '--eval-head', 'dist', '--epochs', '1', '--warmup-epochs', '0',
                         '--unscale-lr', '--lr', '1e-3', '--no-model-ema', '--output_dir', str(out)))
    share = {'bee': 5, 'cat': 2}[answer] / 11
    assert log_lines(out)[-1]['test_acc1'] == pytest.approx(100 * share)


# ============ finetuning ============


def test_finetune_from_a_url_at_another_size_and_class_count(image_folder, torch_home, tmp_path):
    name = 'deit_tiny_patch16_224-a1311bcf.pth'
    official = timm.create_model('deit_tiny_patch16_224', num_classes=1000).state_dict()
    torch.save({'model': official}, torch_home / 'hub' / 'checkpoints' / name)
    out = tmp_path / 'finetune'
    # lr 0 throughout: the checkpoint holds exactly the weights the finetuning started from.
    proc = run_main(*tiny_flags(image_folder, '--finetune', URL + name, '--epochs', '1', '--lr', '0', '--warmup-lr',
                                '0', '--min-lr', '0', '--no-model-ema', '--output_dir', str(out)))
    assert 'Removing key head.weight' in proc.stdout and "missing keys ['head.weight', 'head.bias']" in proc.stdout
    weights = load(out / 'checkpoint.pth')['model']
    grid = official['pos_embed'][:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(2, 2), mode='bicubic', align_corners=False).permute(0, 2, 3, 1)
    assert torch.equal(weights['pos_embed'][:, :1], official['pos_embed'][:, :1])
    assert torch.allclose(weights['pos_embed'][:, 1:], resized.reshape(1, 4, 192), atol=1e-6)
    assert weights['head.weight'].shape == (3, 192)
    assert all(torch.equal(v, official[k]) for k, v in weights.items() if not k.startswith(('head', 'pos_embed')))


# ============ errors ============


@pytest.mark.parametrize('argv, message', [
    (['--resplit'], '--resplit applies to AugMix'),
    (['--eval', '--resume', 'missing.pth'], '--resume missing.pth: no such file'),
])
def test_user_errors_end_with_one_line(argv, message, image_folder):
    proc = run_main(*tiny_flags(image_folder, *argv), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count('\n') == 0 and message in proc.stderr, proc.stderr


def test_help_lists_every_flag_and_prints_no_warning():
    proc = run_main('--help')
    assert proc.stderr == ''
    for action in main.get_args_parser()._actions:
        for option in action.option_strings:
            assert option in proc.stdout, option

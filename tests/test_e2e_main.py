"""main.py end to end: the commands a user runs, on CPU; what they print and write, checked against
direct computations where there is a figure.

Runs that a process boundary matters for (a kill, a resume in a new process, torchrun) run ``python main.py``
in a subprocess; the others run its command line, ``main.cli``, in this process. Most runs train
deit_tiny_patch16_224 at 32 x 32 pixels (2 x 2 patches, the full 12 blocks) on the small JPEG folder of
conftest.py: 120 training images, 11 validation images.
"""
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import timm
import torch
import torch.nn.functional as F

import datasets
import main
import models  # noqa: F401  (registers the DeiT names for the timm.create_model calls below)

ROOT = Path(__file__).resolve().parents[1]
URL = 'https://dl.fbaipublicfiles.com/deit/'
ACC_LINE = re.compile(r'^\* Acc@1 (\d+\.\d{3}) Acc@5 (\d+\.\d{3}) loss (\d+\.\d{3})$', re.M)
# One thread per process: these models are too small to gain from more, and on a shared machine several
# threads per process spin against each other (a training epoch here took 20 times longer with two).
def env(**extra: str) -> Dict[str, str]:
    return {**os.environ, 'OMP_NUM_THREADS': '1', **extra}


pytestmark = pytest.mark.usefixtures('one_thread')


def tiny_flags(folder: Path, *extra: str) -> List[str]:
    return ['--model', 'deit_tiny_patch16_224', '--input-size', '32', '--data-set', 'FOLDER',
            '--data-path', str(folder), '--batch-size', '16', '--num_workers', '0', '--device', 'cpu', '--lr', '5e-3',
            *extra]


def run_main(*args: str, launcher: List[str] = (), timeout: float = 600, check: bool = True
             ) -> subprocess.CompletedProcess:
    proc = subprocess.run([*(launcher or [sys.executable]), str(ROOT / 'main.py'), *args], cwd=ROOT, env=env(),
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

# The README's quick start (conftest.quick_start starts it with the session): 30 epochs reach about 95% top-1
# on the 355 validation images (about 2.5 minutes on two CPU cores); 90% is the bar.
def test_quick_start_learns_the_digits(quick_start):
    proc, out, output = quick_start
    proc.wait(timeout=1800)
    stdout = output.read_text()
    assert proc.returncode == 0, f'exit {proc.returncode}\n{stdout[-4000:]}'
    logs = log_lines(out)
    assert [entry['epoch'] for entry in logs] == list(range(30))
    assert logs[-1]['test_acc1'] >= 90.0, [round(e['test_acc1'], 1) for e in logs]
    assert 'Accuracy of the network on the 355 test images' in stdout
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
def two_epochs(image_folder, tmp_path_factory, one_thread):
    """The same 2-epoch command run through, and run with a kill after epoch 0 and a --resume; returns the two
    output folders and what the resumed run printed. The killed run is a process of its own."""
    flags = tiny_flags(image_folder, '--epochs', '2', '--model-ema-decay', '0.9')
    through = tmp_path_factory.mktemp('through')
    main.cli([*flags, '--output_dir', str(through)])

    resumed = tmp_path_factory.mktemp('resumed')
    # The test-only switch DEIT_TEST_PAUSE_AT holds the run at epoch 1, step 0 and creates the marker file: the
    # kill lands there, after epoch 0 is saved, as a kill or a preemption would.
    marker = resumed.parent / f'{resumed.name}.paused'
    proc = subprocess.Popen([sys.executable, str(ROOT / 'main.py'), *flags, '--output_dir', str(resumed)], cwd=ROOT,
                            env=env(DEIT_TEST_PAUSE_AT=f'0:1:0:{marker}'), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None and not marker.exists():
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert load(resumed / 'checkpoint.pth')['epoch'] == 0
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        main.cli([*flags, '--output_dir', str(resumed), '--resume', str(resumed / 'checkpoint.pth')])
    return through, resumed, stdout.getvalue()


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


def test_a_checkpoint_in_the_output_dir_is_resumed(two_epochs, image_folder, tmp_path, capsys):
    _, resumed, _ = two_epochs
    out = tmp_path / 'out'
    shutil.copytree(resumed, out)
    main.cli(tiny_flags(image_folder, '--epochs', '2', '--output_dir', str(out)))
    stdout = capsys.readouterr().out
    assert f'Found {out / "checkpoint.pth"}: resuming from it' in stdout
    assert 'Start training for 0 epochs' in stdout and len(log_lines(out)) == 2


def test_resume_keeps_a_stored_best_accuracy_that_the_resumed_epoch_does_not_reach(two_epochs, image_folder,
                                                                                  tmp_path, capsys):
    """The best accuracy comes back with the checkpoint: a resumed epoch below it is no new best, so
    best_checkpoint.pth stays the stored one and `Max accuracy` prints the stored figure (100%: nothing is above)."""
    through, _, _ = two_epochs
    out = tmp_path / 'out'
    out.mkdir()
    checkpoint = load(through / 'checkpoint.pth')
    checkpoint['max_accuracy'] = 100.0
    torch.save(checkpoint, out / 'checkpoint.pth')
    shutil.copy(through / 'best_checkpoint.pth', out / 'best_checkpoint.pth')
    best = (out / 'best_checkpoint.pth').read_bytes()
    main.cli(tiny_flags(image_folder, '--epochs', '3', '--model-ema-decay', '0.9', '--output_dir', str(out)))
    stdout = capsys.readouterr().out
    assert 'continuing at epoch 2' in stdout and 'Max accuracy: 100.00%' in stdout
    assert (out / 'best_checkpoint.pth').read_bytes() == best
    final = load(out / 'checkpoint.pth')
    assert final['epoch'] == 2 and final['max_accuracy'] == 100.0


def val_images(flags: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The validation images of main.py's ``flags`` as its evaluation transform gives them, and their labels."""
    dataset, _ = datasets.build_dataset(False, main.get_args_parser().parse_args(flags))
    images, targets = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(targets)


@torch.no_grad()
def top1_and_loss(logits: torch.Tensor, targets: torch.Tensor) -> Tuple[float, float]:
    """Top-1 accuracy (%) and mean cross-entropy over the images, computed here from the logits."""
    return 100.0 * (logits.argmax(1) == targets).double().mean().item(), F.cross_entropy(logits, targets).item()


def test_the_ema_figures_are_those_of_the_ema_weights(two_epochs, image_folder, capsys):
    """The run's EMA (decay 0.9 over 14 steps) is not the model. Its weights from checkpoint.pth, evaluated
    here directly, give log.txt's test_ema_* figures and --eval's second lines; the model's weights the first."""
    through, _, _ = two_epochs
    checkpoint = load(through / 'checkpoint.pth')
    images, targets = val_images(tiny_flags(image_folder))
    model = timm.create_model('deit_tiny_patch16_224', img_size=32, num_classes=3).eval()
    figures = {}
    for key in ('model', 'model_ema'):
        model.load_state_dict(checkpoint[key])
        figures[key] = top1_and_loss(model(images), targets)
    net, ema = figures['model'], figures['model_ema']
    assert abs(net[1] - ema[1]) > 1e-3  # two different sets of weights: a mix-up of the two shows
    last = log_lines(through)[-1]
    assert (last['test_acc1'], last['test_loss']) == pytest.approx(net, rel=1e-5)
    assert (last['test_ema_acc1'], last['test_ema_loss']) == pytest.approx(ema, rel=1e-5)

    main.cli(tiny_flags(image_folder, '--eval', '--resume', str(through / 'checkpoint.pth')))
    stdout = capsys.readouterr().out
    printed = [(float(acc1), float(loss)) for acc1, _, loss in ACC_LINE.findall(stdout)]
    assert printed == [pytest.approx(net, abs=1e-3), pytest.approx(ema, abs=1e-3)]
    assert f'Accuracy of the network on the 11 test images: {net[0]:.1f}%' in stdout
    assert f'Accuracy of the model EMA on the 11 test images: {ema[0]:.1f}%' in stdout


def test_eval_of_an_official_file_by_its_url(two_epochs, image_folder, torch_home, capsys):
    through, _, _ = two_epochs
    name = 'deit_tiny_patch16_224-a1311bcf.pth'
    torch.save({'model': load(through / 'checkpoint.pth')['model']}, torch_home / 'hub' / 'checkpoints' / name)
    main.cli(tiny_flags(image_folder, '--eval', '--resume', URL + name))
    stdout = capsys.readouterr().out
    # The file's weights, on the same images: the accuracy of the run that wrote them.
    assert acc_lines(stdout) == [round(log_lines(through)[-1]['test_acc1'], 3)]
    assert 'model EMA' not in stdout  # an official file holds no EMA


def test_eval_head_chooses_the_head_that_is_evaluated(image_folder, tmp_path, capsys):
    """--eval --eval-head cls|dist|avg on a distilled model whose heads disagree: each printed line is that
    head's figures, computed here from the features (class token -> head, distillation token -> head_dist)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model('deit_tiny_distilled_patch16_224', img_size=32, num_classes=3).eval()
        with torch.no_grad():
            model.head_dist.weight.normal_(0.0, 1.0)
            model.head_dist.bias.normal_(0.0, 1.0)
    torch.save({'model': model.state_dict()}, tmp_path / 'distilled.pth')
    flags = tiny_flags(image_folder, '--model', 'deit_tiny_distilled_patch16_224', '--eval', '--resume',
                       str(tmp_path / 'distilled.pth'))
    images, targets = val_images(flags)
    with torch.no_grad():
        tokens = model.forward_features(images)  # [B, 2 + patches, D], normalised
        cls, dist = model.head(tokens[:, 0]), model.head_dist(tokens[:, 1])
    expected = {}
    for head, logits in (('cls', cls), ('dist', dist), ('avg', (cls + dist) / 2)):
        acc1, loss = top1_and_loss(logits, targets)
        expected[head] = (acc1, 100.0, loss)  # top-5 of 3 classes: every class
    assert len({round(loss, 3) for _, _, loss in expected.values()}) == 3  # the heads disagree
    for head, figures in expected.items():
        main.cli([*flags, '--eval-head', head])
        printed = [tuple(map(float, line)) for line in ACC_LINE.findall(capsys.readouterr().out)]
        assert printed == [pytest.approx(figures, abs=1e-3)], head


# ============ torchrun ============


def test_torchrun_two_processes_with_repeated_aug_and_dist_eval(image_folder, tmp_path, capsys):
    out = tmp_path / 'ddp'
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    proc = run_main(*tiny_flags(image_folder, '--epochs', '1', '--dist-eval', '--no-model-ema', '--output_dir',
                                str(out)), launcher=launcher)
    assert 'Training sampler: RASampler' in proc.stdout
    assert 'do not split evenly over 2 processes' in proc.stdout  # 11 images: one padding sample
    assert proc.stdout.count('Accuracy of the network') == 1  # printed by rank 0 only
    main.cli(tiny_flags(image_folder, '--eval', '--resume', str(out / 'checkpoint.pth')))
    assert acc_lines(proc.stdout) == acc_lines(capsys.readouterr().out)[:1]
    assert log_lines(out)[0]['test_n'] == 11


# ============ distillation ============


@pytest.fixture(scope='module')
def teacher_dir(image_folder, tmp_path_factory):
    """A timm convnet trained by main.py: one epoch at the scaled lr, then one cooldown epoch at --min-lr."""
    out = tmp_path_factory.mktemp('teacher')
    main.cli(tiny_flags(image_folder, '--model', 'resnet10t', '--epochs', '1', '--cooldown-epochs', '1',
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
    main.cli(tiny_flags(image_folder, '--model', 'deit_tiny_distilled_patch16_224', '--teacher-model', 'resnet10t',
                        '--teacher-path', str(teacher_dir / f'{answer}.pth'), '--distillation-type', distillation_type,
                        '--distillation-alpha', '1.0', '--eval-head', 'dist', '--epochs', '1', '--warmup-epochs', '0',
                        '--unscale-lr', '--lr', '1e-3', '--no-model-ema', '--output_dir', str(out)))
    share = {'bee': 5, 'cat': 2}[answer] / 11
    assert log_lines(out)[-1]['test_acc1'] == pytest.approx(100 * share)


def test_distillation_with_finetune_and_a_teacher_by_its_url(image_folder, torch_home, tmp_path):
    """Distillation with --finetune (the original refused), the teacher given as an https URL found in the hub cache.

    The --finetune file's distillation head is constant (zero weights, bias b) and the teacher always answers
    class 1 (zero head weights, bias towards 1). With --distillation-alpha 1 and lr 0 each step's loss is then
    CE(b, 1): train_loss is that figure only if the student started from the --finetune file and the teacher
    of the URL supervised its distillation head; and the weights stay those of the file.
    """
    student = timm.create_model('deit_tiny_distilled_patch16_224', img_size=32, num_classes=3).state_dict()
    bias = torch.tensor([0.5, -1.0, 2.0])
    student['head_dist.weight'].zero_()
    student['head_dist.bias'] = bias
    torch.save({'model': student}, tmp_path / 'student.pth')
    teacher = timm.create_model('test_vit', img_size=32, num_classes=3).state_dict()
    teacher['head.weight'].zero_()
    teacher['head.bias'] = torch.tensor([0.0, 10.0, 0.0])
    name = 'teacher-0123abcd.pth'
    torch.save({'model': teacher}, torch_home / 'hub' / 'checkpoints' / name)
    out = tmp_path / 'out'
    main.cli(tiny_flags(image_folder, '--model', 'deit_tiny_distilled_patch16_224', '--finetune',
                        str(tmp_path / 'student.pth'), '--teacher-model', 'test_vit', '--teacher-path', URL + name,
                        '--distillation-type', 'hard', '--distillation-alpha', '1.0', '--epochs', '1', '--lr', '0',
                        '--warmup-lr', '0', '--min-lr', '0', '--no-model-ema', '--output_dir', str(out)))
    expected = F.cross_entropy(bias[None], torch.tensor([1])).item()
    assert log_lines(out)[0]['train_loss'] == pytest.approx(expected, rel=1e-6)
    weights = load(out / 'checkpoint.pth')['model']
    assert all(torch.equal(v, student[k]) for k, v in weights.items())


# ============ finetuning ============


def test_finetune_from_a_url_at_another_size_and_class_count(image_folder, torch_home, tmp_path, capsys):
    name = 'deit_tiny_patch16_224-a1311bcf.pth'
    official = timm.create_model('deit_tiny_patch16_224', num_classes=1000).state_dict()
    torch.save({'model': official}, torch_home / 'hub' / 'checkpoints' / name)
    out = tmp_path / 'finetune'
    # lr 0 throughout: the checkpoint holds exactly the weights the finetuning started from.
    main.cli(tiny_flags(image_folder, '--finetune', URL + name, '--epochs', '1', '--lr', '0', '--warmup-lr', '0',
                        '--min-lr', '0', '--no-model-ema', '--output_dir', str(out)))
    stdout = capsys.readouterr().out
    assert 'Removing key head.weight' in stdout and "missing keys ['head.weight', 'head.bias']" in stdout
    weights = load(out / 'checkpoint.pth')['model']
    grid = official['pos_embed'][:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(2, 2), mode='bicubic', align_corners=False).permute(0, 2, 3, 1)
    assert torch.equal(weights['pos_embed'][:, :1], official['pos_embed'][:, :1])
    assert torch.allclose(weights['pos_embed'][:, 1:], resized.reshape(1, 4, 192), atol=1e-6)
    assert weights['head.weight'].shape == (3, 192)
    assert all(torch.equal(v, official[k]) for k, v in weights.items() if not k.startswith(('head', 'pos_embed')))


@pytest.mark.parametrize('name, extra_tokens', [('deit_tiny_patch16_224', 1), ('deit_tiny_distilled_patch16_224', 2)])
def test_pretrained_weights_at_another_image_size_resize_the_position_embedding(name, extra_tokens, torch_home):
    """pretrained=True with img_size 64 (a 4 x 4 patch grid): the official file's 14 x 14 grid of position
    embeddings, resized bicubically here, and its class / distillation token entries unchanged."""
    official = timm.create_model(name).state_dict()
    torch.save({'model': official}, torch_home / 'hub' / 'checkpoints' / os.path.basename(models.MODEL_URLS[name]))
    weights = timm.create_model(name, pretrained=True, img_size=64).state_dict()
    pos_embed = official['pos_embed']
    grid = pos_embed[:, extra_tokens:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(4, 4), mode='bicubic', align_corners=False).permute(0, 2, 3, 1)
    assert weights['pos_embed'].shape == (1, extra_tokens + 16, 192)
    assert torch.equal(weights['pos_embed'][:, :extra_tokens], pos_embed[:, :extra_tokens])
    assert torch.allclose(weights['pos_embed'][:, extra_tokens:], resized.reshape(1, 16, 192), atol=1e-6)
    assert all(torch.equal(v, official[k]) for k, v in weights.items() if k != 'pos_embed')


# ============ the command line ============


def test_help_lists_every_flag_and_prints_no_warning():
    proc = run_main('--help')
    assert proc.stderr == ''
    for action in main.get_args_parser()._actions:
        for option in action.option_strings:
            assert option in proc.stdout, option

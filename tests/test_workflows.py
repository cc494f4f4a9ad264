"""Training longer, on fewer GPUs, and in view: --resume with a larger --epochs, gradient accumulation
(--accum-iter) on one and two processes, TensorBoard scalars (--log_dir), the ETA of evaluation.

The runs train timm's 300k-parameter ``test_vit`` (the VisionTransformer code path of DeiT) at 32 x 32 on the
image folder of conftest.py (120 training images), through main.py's command line in this process
(``main.cli``); module fixtures share them between tests.
"""
import contextlib
import io
import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import timm
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.scheduler import PlateauLRScheduler, create_scheduler
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import checkpoints
import engine
import main
import stopping
import utils

# Dropout, drop path and augmentation off: batch composition alone decides the gradients.
FAST = ['--model', 'test_vit', '--input-size', '32', '--data-set', 'FOLDER', '--num_workers', '0', '--device', 'cpu',
        '--aa', 'none', '--reprob', '0', '--mixup', '0', '--cutmix', '0', '--drop-path', '0', '--drop', '0',
        '--no-repeated-aug', '--lr', '5e-2']
# SGD: its steps are linear in the gradients, so the accumulated and the larger batch agree to float summation
# order. (Adam divides by the gradients' magnitude, which lifts the rounding noise of gradients that are zero in
# theory, such as the attention key bias's, to the size of the lr.)
ACCUM = ['--warmup-epochs', '0', '--opt', 'sgd', '--lr', '0.5']
# Measured (3 SGD steps): weights within 1.5e-8 of each other on 1 process, 1.2e-8 on 2; momentum within 1.4e-7.
WEIGHT_TOLERANCE = 1e-6


pytestmark = pytest.mark.usefixtures('one_thread')


def run(folder: Path, *extra: str) -> str:
    """main.cli with FAST on ``folder``; what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main.cli([*FAST, '--data-path', str(folder), *extra])
    return out.getvalue()


def load(path: Path) -> Dict:
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_state(a: Dict, b: Dict, atol: float = 0.0) -> None:
    """Equal weights, EMA weights and optimizer state: bitwise with atol 0."""
    def same(x: torch.Tensor, y: torch.Tensor) -> bool:
        return torch.equal(x, y) if atol == 0 else torch.allclose(x, y, rtol=0, atol=atol)

    for key in ('model', 'model_ema'):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert same(a[key][name], b[key][name]), (key, name, (a[key][name] - b[key][name]).abs().max())
    assert a['optimizer']['param_groups'] == b['optimizer']['param_groups']
    for i, state in a['optimizer']['state'].items():
        for k, value in state.items():
            assert same(value, b['optimizer']['state'][i][k]), (i, k)


class Killed(Exception):
    """A kill right before a checkpoint write, in this process."""


# ============ extending a run ============


@pytest.fixture(scope='module')
def extended(image_folder, tmp_path_factory):
    """--epochs 2 in one run; and --epochs 1, then --epochs 2 --resume, with TensorBoard on. The resumed run is
    killed once before the checkpoint of epoch 1 (epoch 1's training scalars on disk, checkpoint.pth of epoch 0),
    then run again."""
    tmp = tmp_path_factory.mktemp('extended')
    flags = ['--batch-size', '8', '--warmup-epochs', '1']  # 15 steps per epoch
    through, extended, log_dir = tmp / 'through', tmp / 'extended', tmp / 'tensorboard'
    run(image_folder, *flags, '--epochs', '2', '--output_dir', str(through))
    first = run(image_folder, *flags, '--epochs', '1', '--output_dir', str(extended), '--log_dir', str(log_dir))
    resume = [*flags, '--epochs', '2', '--output_dir', str(extended), '--log_dir', str(log_dir),
              '--resume', str(extended / 'checkpoint.pth')]
    save_epoch = checkpoints.save_epoch

    def killed_at_epoch_1(output_dir, log_stats, checkpoint, is_best, latest=True):
        if log_stats['epoch'] == 1:
            raise Killed
        save_epoch(output_dir, log_stats, checkpoint, is_best, latest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoints, 'save_epoch', killed_at_epoch_1)
        with pytest.raises(Killed):
            run(image_folder, *resume)
    resumed = run(image_folder, *resume)
    return through, extended, log_dir, first, resumed


def test_a_resume_with_more_epochs_equals_a_run_of_the_longer_command(extended):
    through, extended, _, _, resumed = extended
    # The checkpoint's schedule (1 epoch) would train epoch 1 at --min-lr; the command's has its cosine midpoint.
    assert re.findall(r'^Resuming with a new schedule: .*$', resumed, re.M) == [
        'Resuming with a new schedule: --epochs 1 -> 2']
    a, b = load(through / 'checkpoint.pth'), load(extended / 'checkpoint.pth')
    assert a['epoch'] == b['epoch'] == 1
    assert_same_state(a, b)
    assert a['lr_scheduler'] == b['lr_scheduler']
    assert (through / 'log.txt').read_text() == (extended / 'log.txt').read_text()


def test_tensorboard_scalars_match_the_log_and_a_resume_repeats_no_step(extended):
    _, extended, log_dir, first, _ = extended
    logs = [json.loads(line) for line in (extended / 'log.txt').read_text().splitlines()]
    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = {tag: events.Scalars(tag) for tag in events.Tags()['scalars']}
    assert set(scalars) == {f'{split}/{name}' for split in ('test', 'test_ema') for name in ('loss', 'acc1', 'acc5')
                            } | {'train/loss', 'train/lr'}
    # Every 10th of the 2 x 15 optimizer steps, each once: the killed run's steps 20.. are dropped for the rerun's.
    for tag in ('train/loss', 'train/lr'):
        assert [e.step for e in scalars[tag]] == [0, 10, 20], tag
    for e in scalars['train/lr']:
        assert e.value == pytest.approx(logs[e.step // 15]['train_lr'], rel=1e-6)  # constant within an epoch
    printed_loss = re.search(r'^Epoch: \[0\]  \[ 0/15\].*  loss: (\d+\.\d{4}) ', first, re.M)[1]
    assert scalars['train/loss'][0].value == pytest.approx(float(printed_loss), abs=1e-4)
    for tag in scalars.keys() - {'train/loss', 'train/lr'}:
        assert [e.step for e in scalars[tag]] == [0, 1], tag
        assert [e.value for e in scalars[tag]] == pytest.approx([log[tag.replace('/', '_')] for log in logs],
                                                                rel=1e-6), tag


class StopAtPoll(stopping.StopRequest):
    """A stop request that arrives with the n-th poll: one per optimizer step and one at each epoch's end."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.polls = n, 0

    def requested(self) -> bool:
        self.polls += 1
        return self.polls >= self.n


@pytest.fixture(scope='module')
def resumed_at_steps_10_11_20(image_folder, tmp_path_factory):
    """--epochs 3 of 10 optimizer steps (--batch-size 12), with TensorBoard, in three runs: stopped at step 11
    (epoch 1, step 1: step 10 is logged); resumed there and killed before the checkpoint of epoch 2 (step 20 is
    logged); resumed at step 20. Returns (output folder, TensorBoard folder)."""
    tmp = tmp_path_factory.mktemp('purge')
    out, log_dir = tmp / 'out', tmp / 'tensorboard'
    flags = ['--batch-size', '12', '--epochs', '3', '--warmup-epochs', '1', '--output_dir', str(out),
             '--log_dir', str(log_dir)]
    with pytest.MonkeyPatch.context() as patch:
        # polls 1-10: epoch 0's steps; 11: its end; 12: epoch 1, step 0; 13: epoch 1, step 1
        patch.setattr(main, 'StopRequest', lambda: StopAtPoll(13))
        with pytest.raises(SystemExit) as exit_info:
            run(image_folder, *flags)
    assert exit_info.value.code == main.EXIT_STOPPED
    stopped = load(out / 'checkpoint.pth')
    assert (stopped['epoch'], stopped['resume_step']) == (0, 1)
    save_epoch = checkpoints.save_epoch

    def killed_at_epoch_2(output_dir, log_stats, checkpoint, is_best, latest=True):
        if log_stats['epoch'] == 2:
            raise Killed
        save_epoch(output_dir, log_stats, checkpoint, is_best, latest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoints, 'save_epoch', killed_at_epoch_2)
        with pytest.raises(Killed):
            run(image_folder, *flags)
    assert 'continuing at epoch 2' in run(image_folder, *flags)
    return out, log_dir


def test_tensorboard_has_each_step_once_across_resumes_at_any_step(resumed_at_steps_10_11_20):
    # SummaryWriter's purge_step at the step resumed at: the resume at step 11 keeps step 10, written before the
    # stop; the resume at step 20 drops the step 20 that the killed run wrote, and writes it again.
    out, log_dir = resumed_at_steps_10_11_20
    events = EventAccumulator(str(log_dir))
    events.Reload()
    for tag in ('train/loss', 'train/lr'):
        assert [e.step for e in events.Scalars(tag)] == [0, 10, 20], tag
    assert [e.step for e in events.Scalars('test/acc1')] == [0, 1, 2]
    assert [log['epoch'] for log in read_log(out)] == [0, 1, 2]


def test_evaluation_prints_an_eta(extended):
    # utils.MetricLogger.log_every prints the same progress line, ETA included, for training and evaluation.
    test_lines = [line for line in extended[3].splitlines() if line.startswith('Test:  [')]
    assert test_lines and all(re.search(r'  eta: \d+:\d\d:\d\d  ', line) for line in test_lines)


def test_log_dir_without_tensorboard_is_one_line_and_exit_2(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'tensorboard', None)  # `import tensorboard` now fails
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)
    with pytest.raises(SystemExit) as exit_info:
        run(image_folder, '--epochs', '1', '--output_dir', str(tmp_path / 'out'), '--log_dir', str(tmp_path / 'tb'))
    assert exit_info.value.code == main.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count('\n') == 1
    assert err.endswith(': error: --log_dir needs TensorBoard: pip install tensorboard\n')
    assert list(tmp_path.iterdir()) == []


def test_resume_schedule_names_changed_flags_and_keeps_the_plateau_history(capsys):
    parser = main.get_args_parser()
    plateau = ['--sched', 'plateau', '--patience-epochs', '1', '--warmup-epochs', '0', '--unscale-lr']
    old = parser.parse_args([*plateau, '--lr', '1e-3'])
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scheduler, _ = create_scheduler(old, optimizer)
    for epoch, acc1 in enumerate([50.0, 40.0, 40.0, 40.0], start=1):  # a decay after 2 epochs below the best
        scheduler.step(epoch, acc1)
    decayed = optimizer.param_groups[0]['lr']
    assert decayed == pytest.approx(1e-4)
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()

    new = parser.parse_args([*plateau, '--lr', '2e-3'])
    new.actual_lr = 2e-3  # --unscale-lr
    optimizer = torch.optim.SGD(model.parameters(), lr=2e-3)
    scheduler, _ = create_scheduler(new, optimizer)
    optimizer.load_state_dict(saved_optimizer)
    # The original's Namespace args, whose lr is the one it trained at: our actual lr.
    checkpoints.resume_schedule(scheduler, optimizer, saved_scheduler, old, new)
    assert capsys.readouterr().out == 'Resuming with a new schedule: actual lr 0.001 -> 0.002\n'
    assert scheduler.lr_scheduler.best == 50.0
    # As if the command had said --lr 2e-3 from the start, with the same decay.
    assert optimizer.param_groups[0]['lr'] == pytest.approx(2 * decayed)
    assert optimizer.param_groups[0]['initial_lr'] == 2e-3
    checkpoints.resume_schedule(scheduler, optimizer, saved_scheduler, None, new)  # a checkpoint without args
    assert capsys.readouterr().out == ''


# ============ the plateau schedule ============


PLATEAU_STEP = PlateauLRScheduler.step


def plateau_step_as_timm_1_0_22(scheduler: PlateauLRScheduler, epoch: int, metric=None) -> None:
    """PlateauLRScheduler.step as timm < 1.0.23 had it: past the warm-up it stepped ReduceLROnPlateau with the
    metric, also when there was none, and ReduceLROnPlateau fails on None (float(None))."""
    if epoch > scheduler.warmup_t and metric is None:
        scheduler.lr_scheduler.step(metric)
    PLATEAU_STEP(scheduler, epoch, metric)


PLATEAU = ['--batch-size', '8', '--sched', 'plateau', '--warmup-epochs', '0']


def read_log(output_dir: Path) -> List[Dict]:
    return [json.loads(line) for line in (output_dir / 'log.txt').read_text().splitlines()]


@pytest.fixture(scope='module')
def plateau(image_folder, tmp_path_factory):
    """One epoch of --sched plateau --warmup-epochs 0; returns its output folder."""
    out = tmp_path_factory.mktemp('plateau') / 'out'
    run(image_folder, *PLATEAU, '--epochs', '1', '--output_dir', str(out))
    return out


def test_plateau_without_warmup_trains_epoch_0_at_the_scaled_lr(plateau):
    # Not --warmup-lr (1e-6), which step(0) set: timm's plateau schedule counts epoch 0 <= 0 as warm-up.
    assert read_log(plateau)[0]['train_lr'] == pytest.approx(5e-2 * 8 / 512, rel=1e-12)


def test_a_plateau_run_resumes_past_its_warmup_on_old_timm(plateau, image_folder, monkeypatch):
    # --epochs 2, resumed at epoch 1 > --warmup-epochs 0 with the plateau schedule of timm < 1.0.23, which failed
    # on the missing metric of a step there. The lr is the optimizer's restored one, not decayed after one epoch.
    monkeypatch.setattr(PlateauLRScheduler, 'step', plateau_step_as_timm_1_0_22)
    assert 'continuing at epoch 1' in run(image_folder, *PLATEAU, '--epochs', '2', '--output_dir', str(plateau))
    logs = read_log(plateau)
    assert [log['epoch'] for log in logs] == [0, 1]
    assert logs[1]['train_lr'] == pytest.approx(5e-2 * 8 / 512, rel=1e-12)


# ============ gradient accumulation ============


class StopAtThirdStep(stopping.StopRequest):
    """A stop request that arrives with the third optimizer step (the third poll)."""

    def __init__(self) -> None:
        super().__init__()
        self.polls = 0

    def requested(self) -> bool:
        self.polls += 1
        return self.polls >= 3


@pytest.fixture(scope='module')
def accumulated(image_folder, tmp_path_factory):
    """One epoch at --batch-size 32, and at --batch-size 16 --accum-iter 2: 3 optimizer steps of 32 of the 120
    images each way (7 batches of 16, the 7th unused). And an AdamW run of the latter stopped before its third
    step, then resumed."""
    tmp = tmp_path_factory.mktemp('accumulated')
    flags = ['--epochs', '1', *ACCUM]
    big = run(image_folder, *flags, '--batch-size', '32', '--output_dir', str(tmp / 'big'))
    small = run(image_folder, *flags, '--batch-size', '16', '--accum-iter', '2', '--output_dir', str(tmp / 'accum'))
    stop_run = ['--epochs', '1', '--batch-size', '16', '--accum-iter', '2', '--output_dir', str(tmp / 'stopped')]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(main, 'StopRequest', StopAtThirdStep)
        with pytest.raises(SystemExit) as exit_info:
            run(image_folder, *stop_run)
    assert exit_info.value.code == main.EXIT_STOPPED
    at_stop = load(tmp / 'stopped' / 'checkpoint.pth')
    resumed = run(image_folder, *stop_run)
    return tmp, big, small, at_stop, resumed


def adamw_steps(checkpoint: Dict) -> int:
    """The number of updates AdamW applied: its per-parameter step count (all parameters train)."""
    counts = {int(state['step']) for state in checkpoint['optimizer']['state'].values()}
    assert len(counts) == 1, counts
    return counts.pop()


def test_accumulated_batches_equal_one_larger_batch(accumulated):
    tmp, big, small, _, _ = accumulated
    assert 'total batch 32 = 32 x 1 accumulated x 1 process,' in big
    assert 'total batch 32 = 16 x 2 accumulated x 1 process,' in small
    a, b = load(tmp / 'big' / 'checkpoint.pth'), load(tmp / 'accum' / 'checkpoint.pth')
    assert a['args']['actual_lr'] == b['args']['actual_lr'] == 0.5 * 32 / 512
    assert_same_state(a, b, atol=WEIGHT_TOLERANCE)


def test_a_stop_during_accumulation_lands_on_a_step_and_the_resumed_run_applies_each_step_once(accumulated):
    tmp, _, _, at_stop, resumed = accumulated
    # Stopped before the 3rd step: 2 steps applied, 4 batches; the resumed run reads 2 of the 3 left (one step).
    # (Not bitwise the uninterrupted run: the random crops of the skipped batches are not drawn.)
    assert (at_stop['resume_step'], adamw_steps(at_stop)) == (4, 2)
    assert 'continuing at epoch 0, step 4' in resumed and 'Epoch: [0]  [1/2]' in resumed
    assert 'Resuming with a new schedule' not in resumed  # the same command
    assert adamw_steps(load(tmp / 'stopped' / 'checkpoint.pth')) == 3
    assert [json.loads(line)['epoch'] for line in (tmp / 'stopped' / 'log.txt').read_text().splitlines()] == [0]


class Batches:
    """7 batches of 4 samples of a 2-class problem; counts the batches drawn."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.data = [(torch.randn(4, 3, generator=generator), torch.randint(0, 2, (4,), generator=generator))
                     for _ in range(7)]
        self.drawn = 0

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        for batch in self.data:
            self.drawn += 1
            yield batch


def test_a_stop_lands_on_an_optimizer_step_and_the_tail_is_not_read():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    step = optimizer.step
    optimizer.step = lambda *args, **kwargs: (steps.append(1), step(*args, **kwargs))[1]
    loss = lambda samples, outputs, targets: F.cross_entropy(outputs, targets)  # noqa: E731
    cpu = torch.device('cpu')

    batches = Batches()
    engine.train_one_epoch(model, loss, batches, optimizer, cpu, 0, None, None, print_freq=100, accum_iter=2)
    assert (len(steps), batches.drawn) == (3, 6)  # 3 groups of 2; the 7th batch, alone, is never read

    steps.clear()
    batches = Batches()
    # Asked to stop while the 4th batch (the second of step 1) is under way: the stop waits for the step's end.
    with pytest.raises(engine.TrainingStopped) as stopped:
        engine.train_one_epoch(model, loss, batches, optimizer, cpu, 0, None, None, print_freq=100, accum_iter=2,
                               stop_requested=lambda: batches.drawn >= 4)
    assert (stopped.value.step, len(steps)) == (4, 2)


# ============ two processes (gloo) ============


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _two_process_worker(rank: int, folder: str, tmp: str, ports: List[int]) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1')
    all_reduces = []

    class CountingDDP(DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_comm_hook(None, lambda state, bucket: (all_reduces.append(1),
                                                                 default_hooks.allreduce_hook(None, bucket))[1])

    main.DistributedDataParallel = CountingDDP  # this process is forked for the test alone
    counts = {}
    # 60 images per process: 3 steps of 16, or 7 batches of 8 of which 6 make 3 steps. (Per-process batches of 16
    # and 32 would make a single step.)
    for name, port, flags in (('big', ports[0], ['--batch-size', '16', '--log_dir', os.path.join(tmp, 'tb')]),
                              ('accum', ports[1], ['--batch-size', '8', '--accum_iter', '2'])):
        os.environ['MASTER_PORT'] = str(port)
        all_reduces.clear()
        with contextlib.redirect_stdout(io.StringIO()):
            main.cli([*FAST, '--data-path', folder, '--epochs', '1', *ACCUM, *flags,
                      '--output_dir', os.path.join(tmp, name)])
        counts[name] = len(all_reduces)
    with open(os.path.join(tmp, f'rank{rank}.json'), 'w') as f:
        json.dump(counts, f)


def test_two_processes_accumulate_as_one_larger_batch_with_one_all_reduce_per_step(image_folder, tmp_path):
    # fork: the children inherit the imported torch and timm instead of importing them again (seconds each)
    mp.start_processes(_two_process_worker, args=(str(image_folder), str(tmp_path), [free_port(), free_port()]),
                       nprocs=2, join=True, start_method='fork')
    a, b = load(tmp_path / 'big' / 'checkpoint.pth'), load(tmp_path / 'accum' / 'checkpoint.pth')
    assert a['args']['actual_lr'] == b['args']['actual_lr'] == 0.5 * 32 / 512
    assert_same_state(a, b, atol=WEIGHT_TOLERANCE)
    for rank in range(2):
        counts = json.loads((tmp_path / f'rank{rank}.json').read_text())
        # DDP all-reduces in the last batch of each step only: as many all-reduces as without accumulation.
        assert counts['accum'] == counts['big'] > 0, counts
    assert len(list((tmp_path / 'tb').iterdir())) == 1  # TensorBoard: the master process's file only



def _distilled_worker(rank: int, folder: str, tmp: str, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    with contextlib.redirect_stdout(io.StringIO()):
        main.cli([*FAST, '--data-path', folder, '--model', 'deit_tiny_distilled_patch16_224', '--epochs', '1',
                  '--batch-size', '16', '--finetune', os.path.join(tmp, 'init.pth'),
                  '--output_dir', os.path.join(tmp, 'out')])


def test_a_distilled_model_without_teacher_trains_on_two_processes_with_its_idle_head_frozen(image_folder, tmp_path):
    # --distillation-type none: no loss reads head_dist. Left trainable, it had no gradient and DDP failed at the
    # second step ("Expected to have finished reduction in the prior iteration"); here 3 steps per process.
    torch.manual_seed(0)
    init = timm.create_model('deit_tiny_distilled_patch16_224', img_size=32, num_classes=3).state_dict()
    torch.save({'model': init}, tmp_path / 'init.pth')
    mp.start_processes(_distilled_worker, args=(str(image_folder), str(tmp_path), free_port()), nprocs=2, join=True,
                       start_method='fork')
    trained = load(tmp_path / 'out' / 'checkpoint.pth')
    assert adamw_steps(trained) == 3
    for key, value in init.items():
        assert torch.equal(trained['model'][key], value) == key.startswith('head_dist.'), key
    (log,) = read_log(tmp_path / 'out')
    assert log['n_parameters'] == sum(v.numel() for k, v in init.items() if not k.startswith('head_dist.'))


def test_eval_every_evaluates_every_nth_epoch_and_the_last_and_trains_the_same(image_folder, tmp_path):
    """--eval-every 2 over 3 epochs evaluates after epochs 1 and 2 (the last) only; training is untouched: the final
    weights equal those of the run that evaluated every epoch, bit for bit."""
    flags = ['--batch-size', '40', '--epochs', '3', '--warmup-epochs', '0']
    every, second = tmp_path / 'every', tmp_path / 'second'
    run(image_folder, *flags, '--output_dir', str(every))
    printed = run(image_folder, *flags, '--eval-every', '2', '--output_dir', str(second))
    assert [('test_acc1' in line) for line in read_log(second)] == [False, True, True]
    assert [line['epoch'] for line in read_log(second)] == [0, 1, 2]
    assert printed.count('Max accuracy') == 2 and (second / 'best_checkpoint.pth').exists()
    assert_same_state(load(every / 'checkpoint.pth'), load(second / 'checkpoint.pth'))
    with pytest.raises(ValueError, match='--sched plateau lowers the lr on the accuracy of every epoch'):
        main.check_args(main.get_args_parser().parse_args(['--sched', 'plateau', '--eval-every', '2']))


def test_checkpoint_every_writes_every_nth_epoch_and_the_last_and_a_stop_still_saves(image_folder, tmp_path,
                                                                                      monkeypatch):
    """--checkpoint-every 2 over 3 epochs writes checkpoint.pth after epochs 1 and 2 (the last) and log.txt every
    epoch; a stop between epochs 0 and 1 still saves epoch 0, from which the same command goes on."""
    flags = ['--batch-size', '40', '--epochs', '3', '--warmup-epochs', '0', '--checkpoint-every', '2']
    written, save = [], utils.save_on_master

    def recording_save(obj, path):
        if path.endswith(f'{os.sep}checkpoint.pth'):
            written.append(obj['epoch'])
        save(obj, path)

    monkeypatch.setattr(utils, 'save_on_master', recording_save)
    run(image_folder, *flags, '--output_dir', str(tmp_path / 'every2'))
    assert written == [1, 2] and len(read_log(tmp_path / 'every2')) == 3
    written.clear()
    monkeypatch.setattr(stopping.StopRequest, 'agreed', lambda self: True)
    with pytest.raises(SystemExit) as stopped:
        run(image_folder, *flags, '--output_dir', str(tmp_path / 'stopped'))
    assert stopped.value.code == main.EXIT_STOPPED and written == [0]
    with pytest.raises(ValueError, match='use --checkpoint-every 1 with it'):
        main.check_args(main.get_args_parser().parse_args(['--checkpoint-every', '2', '--log_dir', str(tmp_path)]))

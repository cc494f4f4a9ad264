"""No lost run, no hang, no unsafe load: kills at moments drawn from a seeded generator, SIGTERM / SIGUSR1 on one
process and on one of two, a NaN on one of two processes, crafted pickles on every load path; and the pieces
these rest on.

Training runs here are timm's 300k-parameter ``test_vit`` (the VisionTransformer code path of DeiT) at
32 x 32 pixels. The kill and signal tests start them as forked processes of this one (main.py's command
line, ``main.cli``, in a process of its own that can be killed), which saves an interpreter start-up per
run; the runs that check what a user sees run ``python main.py`` or ``torchrun``. A signal or kill never
depends on timing: the run is held at the chosen moment (engine's test-only DEIT_TEST_PAUSE_AT, or a hook of
this file in the forked process) and creates a marker file, which the test waits for.
"""
import ast
import io
import itertools
import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import builders
import checkpoints
import datasets
import engine
import main
import models
import samplers
import seeding
import stopping
import utils

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}  # a few processes on two cores: oversubscribed threads crawl
FAST = ['--model', 'test_vit', '--input-size', '32', '--num_workers', '0', '--device', 'cpu', '--aa', 'none',
        '--reprob', '0']


def folder_flags(folder: Path, *extra: str) -> List[str]:
    return [*FAST, '--data-set', 'FOLDER', '--data-path', str(folder), '--batch-size', '32', *extra]


def digits_flags(*extra: str) -> List[str]:
    return [*FAST, '--data-set', 'DIGITS', '--batch-size', '32', *extra]


def logged_epochs(output_dir: Path) -> List[int]:
    log = output_dir / 'log.txt'
    return [json.loads(line)['epoch'] for line in log.read_text().splitlines()] if log.exists() else []


def optimizer_steps(checkpoint: Dict) -> int:
    """The number of updates AdamW applied: its per-parameter step count (all parameters train)."""
    counts = {int(state['step']) for state in checkpoint['optimizer']['state'].values()}
    assert len(counts) <= 1, counts
    return counts.pop() if counts else 0  # no state before the first update


# ============ training processes ============


def _hold(marker: str) -> None:
    """Create ``marker`` and wait, to be killed here (a minute at most)."""
    Path(marker).touch()
    time.sleep(60)


def _train(argv: List[str], output: str, env: Dict[str, str], hold_in: Optional[Tuple[str, int, str]]) -> None:
    """Body of a forked training process: ``python main.py argv`` with its output in the file ``output`` and
    ``env`` added to its environment (DEIT_TEST_PAUSE_AT, the variables torchrun sets for a rank).

    ``hold_in`` = ('write' | 'eval', k, marker): the run's k-th checkpoint write (counted from 0) stops half-way,
    as the write of a large checkpoint takes seconds, or its k-th evaluation before it starts; then ``marker``
    is created and the process waits to be killed.
    """
    torch.set_num_threads(1)
    os.setpgrp()  # its own process group, with its DataLoader workers, as a job step on a cluster
    os.environ.update(env)
    sys.stdout = sys.stderr = open(output, 'w', buffering=1)
    mode, k, marker = hold_in or ('', -1, '')
    calls = itertools.count()
    if mode == 'write':
        save = torch.save

        def save_and_hold(obj, f, *args, **kwargs):
            if next(calls) != k:
                return save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[:len(data) // 2])
            f.flush()
            _hold(marker)

        torch.save = save_and_hold
    elif mode == 'eval':
        evaluate = engine._evaluate_models  # one pass per epoch scores the model and its EMA

        def hold_and_evaluate(*args, **kwargs):
            if next(calls) == k:
                _hold(marker)
            return evaluate(*args, **kwargs)

        engine._evaluate_models = hold_and_evaluate
    try:
        main.cli(argv)
    finally:
        # What the interpreter's exit does (atexit), which a forked process skips: without it, multiprocessing's
        # exit would wait for the DataLoader workers that an exception left alive (they ignore its SIGTERM).
        stopping.end_workers_at_exit()


_started: List[multiprocessing.Process] = []


def start_training(argv: List[str], output: Path, env: Optional[Dict[str, str]] = None,
                   hold_in: Optional[Tuple[str, int, str]] = None) -> multiprocessing.Process:
    process = multiprocessing.get_context('fork').Process(target=_train, args=(argv, str(output), env or {}, hold_in))
    process.start()
    _started.append(process)
    return process


@pytest.fixture(autouse=True)
def end_training_processes():
    """After each test, kill the training processes that a failure left running (held, or hung in a collective)."""
    yield
    while _started:
        process = _started.pop()
        if process.is_alive():
            os.killpg(process.pid, signal.SIGKILL)
            process.join()


def start_ranks(argv: List[str], outputs: List[Path], env: Optional[Dict[str, str]] = None
                ) -> List[multiprocessing.Process]:
    """The processes of a gloo group, one per output file, with the environment torchrun gives its workers."""
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    group = {'WORLD_SIZE': str(len(outputs)), 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port)}
    return [start_training(argv, output, {**group, 'RANK': str(rank), 'LOCAL_RANK': str(rank), **(env or {})})
            for rank, output in enumerate(outputs)]


def wait_for(condition: Callable[[], bool], process: multiprocessing.Process, timeout: float = 120.0) -> bool:
    """Poll ``condition`` until it holds (True) or the process ended (False)."""
    deadline = time.time() + timeout
    while not condition():
        if not process.is_alive():
            return False
        assert time.time() < deadline, 'timed out'
        time.sleep(0.005)
    return True


def printed(output: Path, text: str) -> Callable[[], bool]:
    return lambda: output.exists() and text in output.read_text()


def run_main(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / 'main.py'), *argv], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


# ============ 1. kill at any moment ============

# Where the runs are killed, in an order drawn from this seed (DEIT_TEST_KILL_SEED; printed with the plan).
KILL_SEED = int(os.environ.get('DEIT_TEST_KILL_SEED', '0'))
KILL_MODES = ['start'] * 2 + ['step'] * 3 + ['eval'] * 3 + ['write'] * 4
# A killed run completes at most one epoch (its kill point lies in the first two): more epochs than kills
# leave every point reachable, and the run ends after the kills.
KILL_EPOCHS = len(KILL_MODES) + 2
KILL_STEPS = 120 // 32


def test_sigkill_at_chosen_moments_leaves_a_checkpoint_that_resumes_to_the_end(image_folder, tmp_path):
    """12 SIGKILLs, at moments drawn from a seeded generator: during start-up, at a training step, at the start
    of an evaluation (model and EMA in one pass), and half-way through a checkpoint write (checkpoint.pth or
    best_checkpoint.pth). Each run is held at its moment and says so with a marker file, so the kill lands
    there on a loaded machine as on a fast one. After each, checkpoint.pth is absent only if no epoch ever
    ended, else it loads and never goes back; --resume then finishes the run with every epoch trained and
    logged exactly once (the optimizer's step count of an uninterrupted run)."""
    out = tmp_path / 'out'
    argv = folder_flags(image_folder, '--epochs', str(KILL_EPOCHS), '--output_dir', str(out))
    rng = random.Random(KILL_SEED)
    modes = KILL_MODES.copy()
    rng.shuffle(modes)
    checkpoint = out / 'checkpoint.pth'
    seen_epoch = None
    for run, mode in enumerate(modes):
        done = 0 if seen_epoch is None else seen_epoch + 1  # the first epoch this run trains
        output, marker = tmp_path / f'run{run}.txt', tmp_path / f'run{run}.held'
        env, hold_in = {}, None
        if mode == 'start':
            point, arrived = 'after the data is read', printed(output, 'Creating model')
        elif mode == 'step':
            point, arrived = (done + rng.randrange(2), rng.randrange(KILL_STEPS)), marker.exists
            env = {'DEIT_TEST_PAUSE_AT': f'0:{point[0]}:{point[1]}:{marker}'}
        else:  # one evaluation (model and EMA in one pass) and one or two writes per epoch: k falls in the first two
            point, arrived = rng.randrange(2 if mode == 'eval' else 3), marker.exists
            hold_in = (mode, point, str(marker))
        context = f'run {run}, kill at {mode} {point}, from epoch {done} (DEIT_TEST_KILL_SEED={KILL_SEED})'
        print(context)
        process = start_training(argv, output, env, hold_in)
        assert wait_for(arrived, process), f'{context}: ended first\n{output.read_text()[-3000:]}'
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        if not checkpoint.exists():
            assert seen_epoch is None, f'checkpoint.pth of epoch {seen_epoch} vanished: {context}'
            continue
        state = utils.load_checkpoint(str(checkpoint))
        assert {'model', 'optimizer', 'lr_scheduler', 'model_ema', 'epoch'} <= set(state), context
        assert seen_epoch is None or state['epoch'] >= seen_epoch, context
        seen_epoch = state['epoch']

    process = start_training([*argv, '--resume', str(checkpoint)] if checkpoint.exists() else argv,
                             tmp_path / 'last.txt')
    process.join()
    assert process.exitcode == 0, (tmp_path / 'last.txt').read_text()[-3000:]
    final = utils.load_checkpoint(str(checkpoint))
    assert final['epoch'] == KILL_EPOCHS - 1
    assert optimizer_steps(final) == KILL_EPOCHS * KILL_STEPS
    assert logged_epochs(out) == list(range(KILL_EPOCHS))
    assert not list(out.glob('.*.tmp'))  # the last writes replaced what the kills left half-written


def test_log_lines_of_epochs_trained_again_are_dropped(tmp_path):
    log = tmp_path / 'log.txt'
    lines = [json.dumps({'epoch': e, 'test_acc1': 10.0 * e}) + '\n' for e in range(4)]
    log.write_text(''.join(lines) + '{"epoch": 4, "test_')  # a kill in the middle of the last line
    checkpoints.drop_log_lines_from(log, 2)
    assert log.read_text() == ''.join(lines[:2])
    before = log.stat().st_mtime_ns
    checkpoints.drop_log_lines_from(log, 2)  # nothing to drop: the file is left alone
    assert log.stat().st_mtime_ns == before


# ============ 2. graceful stop: the stopped run equals the run that never stopped ============

# Where the runs are stopped: batches drawn from this seed (DEIT_TEST_STOP_SEED; printed with the plan).
STOP_SEED = int(os.environ.get('DEIT_TEST_STOP_SEED', '0'))
# The default recipe's runs: 120 images in batches of 4, two batches per optimizer step.
RECIPE_EPOCHS, RECIPE_BATCHES, RECIPE_STEPS = 3, 120 // 4, 120 // 4 // 2


def recipe_flags(folder: Path, *extra: str) -> List[str]:
    """main.py's default recipe (RandAugment, random erasing, mixup, cutmix, drop path, EMA) in RECIPE_EPOCHS
    epochs of RECIPE_STEPS optimizer steps, each of two batches of 4 (--accum-iter 2)."""
    return ['--model', 'test_vit', '--input-size', '32', '--device', 'cpu', '--data-set', 'FOLDER', '--data-path',
            str(folder), '--batch-size', '4', '--accum-iter', '2', '--epochs', str(RECIPE_EPOCHS),
            '--model-ema-decay', '0.9', *extra]


@pytest.fixture(scope='module')
def recipe_run(image_folder, tmp_path_factory) -> Path:
    """The output folder of the default recipe run through in one process, without DataLoader workers."""
    out = tmp_path_factory.mktemp('through') / 'out'
    process = start_training(recipe_flags(image_folder, '--num_workers', '0', '--output_dir', str(out)),
                             out.parent / 'output.txt')
    process.join(300)
    assert process.exitcode == 0, (out.parent / 'output.txt').read_text()[-3000:]
    return out


def assert_same_run(through: Path, out: Path) -> None:
    """The runs that wrote ``through`` and ``out`` ended with the same weights, EMA, optimizer state and best
    accuracy, bit for bit, and wrote the same log.txt (it holds no timing)."""
    a, b = (utils.load_checkpoint(str(d / 'checkpoint.pth')) for d in (through, out))
    assert a['epoch'] == b['epoch'] and 'resume_step' not in b
    for key in ('model', 'model_ema'):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    assert a['optimizer']['param_groups'] == b['optimizer']['param_groups']
    for state_a, state_b in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert a['max_accuracy'] == b['max_accuracy']
    assert (out / 'log.txt').read_text() == (through / 'log.txt').read_text()


def run_with_stops(argv: List[str], out: Path, tmp_path: Path, held: List[Tuple[int, int]],
                   signals: List[signal.Signals]) -> None:
    """Run ``argv`` (writing ``out``) to its end, held at each (epoch, batch) of ``held`` in turn and stopped there
    by the matching signal to its process group (DataLoader workers included), then restarted with the same
    command. A stop lands between two optimizer steps: at the batch held, or after the step's second batch."""
    resumed_at = None
    for run, ((epoch, batch), signum) in enumerate(zip(held, signals)):
        output, marker = tmp_path / f'run{run}.txt', tmp_path / f'run{run}.held'
        # The hook counts the batches of the run's own loader: in the epoch resumed, from the batch resumed at.
        hold = batch - resumed_at[1] if resumed_at is not None and resumed_at[0] == epoch else batch
        process = start_training(argv, output, {'DEIT_TEST_PAUSE_AT': f'0:{epoch}:{hold}:{marker}'})
        assert wait_for(marker.exists, process), output.read_text()[-3000:]
        os.killpg(process.pid, signum)
        process.join(60)
        text = output.read_text()
        assert process.exitcode == main.EXIT_STOPPED, text[-3000:]
        stop = batch + batch % 2
        assert f'Stopped by {signum.name} at epoch {epoch}, step {stop} of {RECIPE_BATCHES}' in text
        assert text.rstrip().endswith(f'training stopped at epoch {epoch}, step {stop}')
        state = utils.load_checkpoint(str(out / 'checkpoint.pth'))
        assert state['epoch'] == epoch - 1 and state['resume_step'] == stop
        assert optimizer_steps(state) == epoch * RECIPE_STEPS + stop // 2  # the step under way was not applied
        assert logged_epochs(out) == list(range(epoch))
        resumed_at = (epoch, stop)
    process = start_training(argv, tmp_path / 'last.txt')
    process.join(120)
    assert process.exitcode == 0, (tmp_path / 'last.txt').read_text()[-3000:]


def test_a_run_stopped_at_three_steps_equals_the_run_that_never_stopped(recipe_run, image_folder, tmp_path):
    """The default recipe, one process: stopped by SIGTERM, SIGUSR1, SIGTERM at a batch of each epoch drawn from
    a seeded generator (held there by the test-only switch DEIT_TEST_PAUSE_AT), and resumed each time by the same
    command. It ends with the weights, EMA, optimizer state and log.txt of the run that went through, bit for
    bit: the rest of each stopped epoch draws the augmentations, mixup / cutmix and drop path that the
    uninterrupted run drew, and its train_loss counts the batches before the stop."""
    rng = random.Random(f'{STOP_SEED}:one process')
    held = [(epoch, rng.randrange(RECIPE_BATCHES - 1)) for epoch in range(RECIPE_EPOCHS)]
    print(f'held at (epoch, batch): {held} (DEIT_TEST_STOP_SEED={STOP_SEED})')
    out = tmp_path / 'out'
    run_with_stops(recipe_flags(image_folder, '--num_workers', '0', '--output_dir', str(out)), out, tmp_path, held,
                   [signal.SIGTERM, signal.SIGUSR1, signal.SIGTERM])
    assert_same_run(recipe_run, out)


def test_a_run_with_two_workers_stopped_twice_in_an_epoch_equals_the_run_without_workers(recipe_run, image_folder,
                                                                                        tmp_path):
    """As above with --num_workers 2, whose workers persist from epoch to epoch: two stops in one epoch, the
    second in the part of it that a resumed run reads, then one in the last epoch. The run equals, bit for bit,
    the one that went through without workers: each sample's augmentations are drawn in whichever process loads
    it from the same seeds, and loading leaves the training process's generators as they were (the second
    batch of each step is loaded after the step's draws began)."""
    rng = random.Random(f'{STOP_SEED}:two workers')
    first, second = sorted(rng.sample(range(0, RECIPE_BATCHES - 1, 2), 2))  # whole steps apart
    epoch = rng.randrange(RECIPE_EPOCHS - 1)
    held = [(epoch, first + rng.randrange(2)), (epoch, second), (RECIPE_EPOCHS - 1, rng.randrange(RECIPE_BATCHES - 1))]
    print(f'held at (epoch, batch): {held} (DEIT_TEST_STOP_SEED={STOP_SEED})')
    out = tmp_path / 'out'
    run_with_stops(recipe_flags(image_folder, '--num_workers', '2', '--output_dir', str(out)), out, tmp_path, held,
                   [signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR1])
    assert_same_run(recipe_run, out)


def test_sigterm_to_one_of_two_processes_stops_both_and_the_resumed_pair_equals_the_pair_that_never_stopped(
        image_folder, tmp_path):
    """Two gloo processes (started with torchrun's environment), the default recipe with repeated augmentation.
    Process 1 alone gets SIGTERM, held at a step of each epoch (seeded): both processes abandon that step and exit
    with main.EXIT_STOPPED; process 0 saves. Resumed each time, the pair ends with the weights, EMA, optimizer
    state and log.txt of a pair that ran through, bit for bit."""
    flags = recipe_flags(image_folder, '--num_workers', '0', '--accum-iter', '1')
    steps = 60 // 4  # 60 images per process and epoch: 120 over 2 processes, each image 3 times, cut to 120
    rng = random.Random(f'{STOP_SEED}:two processes')
    held = [(epoch, rng.randrange(steps)) for epoch in range(RECIPE_EPOCHS)]
    print(f'held at (epoch, step): {held} (DEIT_TEST_STOP_SEED={STOP_SEED})')
    through, out = tmp_path / 'through', tmp_path / 'out'

    def run(output_dir: Path, name: str, held_at: Optional[Tuple[int, int]] = None) -> List[str]:
        outputs = [tmp_path / f'{name}{rank}.txt' for rank in range(2)]
        marker = tmp_path / f'{name}.held'
        env = {'DEIT_TEST_PAUSE_AT': f'1:{held_at[0]}:{held_at[1]}:{marker}'} if held_at else None
        ranks = start_ranks([*flags, '--output_dir', str(output_dir)], outputs, env)
        if held_at:
            assert wait_for(marker.exists, ranks[1]), outputs[1].read_text()[-3000:]
            os.kill(ranks[1].pid, signal.SIGTERM)
        for process in ranks:
            process.join(120)
        texts = [output.read_text() for output in outputs]
        expected = main.EXIT_STOPPED if held_at else 0
        assert [p.exitcode for p in ranks] == [expected] * 2, '\n'.join(t[-2000:] for t in texts)
        return texts

    run(through, 'through')
    for stop, (epoch, step) in enumerate(held):
        texts = run(out, f'stopped{stop}', (epoch, step))
        assert all(text.rstrip().endswith(f'training stopped at epoch {epoch}, step {step}') for text in texts)
        assert f'Stopped by a stop request on another process at epoch {epoch}, step {step} of {steps}' in texts[0]
        state = utils.load_checkpoint(str(out / 'checkpoint.pth'))
        assert state['epoch'] == epoch - 1 and state['resume_step'] == step
        assert optimizer_steps(state) == epoch * steps + step
    run(out, 'resumed')
    assert_same_run(through, out)


def test_stop_request_takes_only_signals_left_at_their_default():
    """A launcher's own handlers stay (submitit ignores SIGTERM and requeues on SIGUSR2); all come back after."""
    def launcher(signum, frame):
        pass

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        signal.signal(signal.SIGTERM, launcher)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        with stopping.StopRequest() as stop:
            assert signal.getsignal(signal.SIGTERM) is launcher
            assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
            assert not stop.requested()
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.requested() and stop.signal_name == 'SIGUSR1'
            # A second one is not caught: it stops the process at once, as without this handler.
            assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is launcher and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class _WorkerSignals(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        return [int(signal.getsignal(s) == signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGUSR1)]


def test_data_loader_workers_leave_stop_signals_to_the_training_process():
    loader = DataLoader(_WorkerSignals(), num_workers=1, worker_init_fn=stopping.ignore_stop_signals)
    assert [int(v) for v in next(iter(loader))] == [1, 1]


def test_skipping_batches_of_a_resumed_epoch_reads_the_rest_of_the_same_order():
    dataset = TensorDataset(torch.arange(50))
    loader = DataLoader(dataset, sampler=RandomSampler(dataset), batch_size=4, drop_last=True)
    builders.seed_everything(0, 0, 3)
    full = [batch[0].tolist() for batch in loader]
    builders.seed_everything(0, 0, 3)
    rest = stopping.skip_batches(loader, 5)
    assert len(rest) == len(full) - 5
    assert [batch[0].tolist() for batch in rest] == full[5:]


class _Draws(torch.utils.data.Dataset):
    """Item i: what torch, numpy and random draw when it is loaded, the generators that augmentations use."""

    def __len__(self) -> int:
        return 50

    def __getitem__(self, index: int) -> Tuple[float, float, float]:
        return torch.rand(1).item(), float(np.random.rand()), random.random()


def test_each_sample_draws_from_its_key_and_leaves_the_training_process_generators_as_they_were():
    dataset = seeding.SeededDataset(_Draws())
    builders.seed_everything(5)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    draws = dataset[(3, (0, 0, 1, 7))]
    assert dataset[(4, (0, 0, 1, 7))] == draws  # the key decides, not the index or what was drawn before
    keys = [(0, 0, 1, 7), (0, 0, 1, 8), (0, 0, 2, 7), (0, 1, 1, 7), (1, 0, 1, 7)]  # each word changed in turn
    assert len({dataset[(0, key)] for key in keys}) == len(keys)
    assert torch.equal(torch.get_rng_state(), before[0]) and (np.random.get_state()[1] == before[1]).all()
    assert random.getstate() == before[2]
    # Repeated augmentation in one process: the copies of an image follow each other, each augmented its own way.
    copies = list(itertools.islice(seeding.SeededSampler(samplers.RASampler(range(50), 1, 0), seed=0, rank=0), 3))
    assert len({index for index, _ in copies}) == 1 and len({dataset[item] for item in copies}) == 3


def test_a_resumed_epoch_keeps_the_seeds_of_its_samples():
    loader = DataLoader(seeding.SeededDataset(_Draws()), batch_size=4, drop_last=True, generator=torch.Generator(),
                        sampler=seeding.SeededSampler(RandomSampler(range(50)), seed=0, rank=0))
    loader.sampler.set_epoch(3)
    builders.seed_everything(0, 0, 3)
    full = [torch.stack(batch).tolist() for batch in loader]
    builders.seed_everything(0, 0, 3)
    assert [torch.stack(batch).tolist() for batch in stopping.skip_batches(loader, 5)] == full[5:]


def test_the_figures_of_a_stopped_epoch_resume_on_the_process_that_summed_them(capsys):
    """resume_sums holds one entry per process; under another number of processes they cannot be matched, and
    the resumed epoch's figures count its remaining batches only, as a note says."""
    checkpoint = {'epoch': 2, 'resume_step': 6, 'resume_sums': [{'loss': (6, 7.5), 'lr': (6, 0.006)}]}
    assert checkpoints._resumed_sums(checkpoint, 'ck.pth') == {'loss': (6, 7.5), 'lr': (6, 0.006)}
    assert checkpoints._resumed_sums({'epoch': 2}, 'ck.pth') is None
    checkpoint['resume_sums'] *= 2
    assert checkpoints._resumed_sums(checkpoint, 'ck.pth') is None
    assert 'ck.pth was written by 2 process(es) and this run has 1: the train_loss and train_lr of epoch 3 average ' \
           'its batches from step 6 on only' in capsys.readouterr().out


def test_unreadable_images_met_by_two_processes_are_counted_once(tmp_path):
    """--skip-corrupt on 2 gloo processes: the images that repeated augmentation draws in epoch 0 are made
    unreadable, among them one that both processes read (copies of an image go to both). The count is of
    distinct files over the processes, not the sum of what each met."""
    root = write_image_folder(tmp_path / 'data', {'ant': (2, 1), 'bee': (2, 1)})
    samples = datasets.image_folder(str(root / 'train')).samples
    drawn = []
    for rank in range(2):  # main.py's training sampler under 2 processes, --seed 0, epoch 0
        sampler = samplers.RASampler(samples, num_replicas=2, rank=rank, seed=0)
        sampler.set_epoch(0)
        drawn.append(set(sampler))
    assert drawn[0] & drawn[1]
    for i in drawn[0] | drawn[1]:
        Path(samples[i][0]).write_bytes(b'not an image at all')
    out = tmp_path / 'out'
    outputs = [tmp_path / f'rank{rank}.txt' for rank in range(2)]
    ranks = start_ranks(folder_flags(root, '--batch-size', '2', '--epochs', '1', '--skip-corrupt', '--output_dir',
                                     str(out)), outputs)
    for process in ranks:
        process.join(120)
    assert [p.exitcode for p in ranks] == [0, 0], outputs[0].read_text()[-3000:]
    count = len(drawn[0] | drawn[1])
    assert f'skipped so far (--skip-corrupt): {count} in training, 0 in evaluation' in outputs[0].read_text()
    assert json.loads((out / 'log.txt').read_text())['train_skipped_images'] == count


# ============ 3. a NaN on one of two processes ============


def test_nan_on_one_rank_stops_both_ranks_with_the_same_error_and_keeps_the_checkpoint(image_folder, tmp_path):
    """torchrun, 2 processes on gloo: process 1's loss is NaN at epoch 1, step 2 (the test-only switch
    DEIT_TEST_NAN_AT). Both processes stop there, each with the same error and exit status 1 (the original
    exited process 1 alone and left the other waiting in its all-reduce); epoch 0's checkpoint is untouched."""
    out = tmp_path / 'out'
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               str(ROOT / 'main.py'), *folder_flags(image_folder, '--batch-size', '8', '--epochs', '3',
                                                     '--output_dir', str(out))]
    process = subprocess.Popen(command, cwd=ROOT, env={**ENV, 'DEIT_TEST_NAN_AT': '1:1:2'}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    checkpoint = out / 'checkpoint.pth'
    deadline = time.time() + 240
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    saved = checkpoint.read_bytes()
    try:
        # Hung processes would wait for gloo's 30-minute timeout: minutes here are a hang on any machine.
        stdout, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail('a process kept running after the NaN: the two hang')
    assert process.returncode != 0
    errors = [line for line in stderr.splitlines() if 'error: Non-finite loss at epoch 1, step 2/' in line]
    assert len(errors) == 2, stderr[-3000:]
    assert sum('(loss is nan)' in e for e in errors) == 1 and sum('(loss is finite here)' in e for e in errors) == 1
    assert 'exitcode  : 1' in stderr  # torchrun's report of the first failed process
    assert checkpoint.read_bytes() == saved and utils.load_checkpoint(str(checkpoint))['epoch'] == 0
    assert logged_epochs(out) == [0]


# ============ 4. safe loading ============


class Payload:
    """Unpickling this creates a file: what a malicious checkpoint would do with a command of its choice."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


# Each load path of the project, run through the user's entry point with a crafted file in place of a checkpoint.
SAFE_LOAD_SCRIPT = r'''
import contextlib, io, json, sys
import torch
import main, predict
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            if name == 'hub':
                torch.hub.load(sys.argv[2], 'deit_tiny_patch16_224', source='local', pretrained=True)
                code = 0
            elif name == 'predict':
                code = predict.main(predict.get_args_parser().parse_args(argv))
            else:
                main.cli(argv)
                code = 0
        except SystemExit as e:
            code = e.code
        except Exception as e:
            code, err = 'raised', io.StringIO(f'{type(e).__name__}: {e}')
    results[name] = {'code': code, 'stderr': err.getvalue()}
print(json.dumps(results))
'''
LOAD_PATHS = ['resume', 'eval', 'finetune', 'teacher_path', 'hub', 'predict']


@pytest.fixture(scope='module')
def crafted_loads(image_folder, tmp_path_factory):
    """One interpreter runs every load path on its own crafted file; returns (results, markers, control)."""
    tmp = tmp_path_factory.mktemp('crafted')
    home = tmp / 'torch_home'
    (home / 'hub' / 'checkpoints').mkdir(parents=True)
    markers, cases = {}, {}
    for name in LOAD_PATHS:
        markers[name] = tmp / f'ran_{name}'
        path = tmp / f'{name}.pth'
        torch.save({'model': {'pos_embed': Payload(markers[name])}, 'epoch': 0}, path)
        flags = folder_flags(image_folder, '--epochs', '1', '--output_dir', str(tmp / f'out_{name}'))
        cases[name] = {
            'resume': [*flags, '--resume', str(path)],
            'eval': [*flags, '--eval', '--resume', str(path)],
            'finetune': [*flags, '--finetune', str(path)],
            'teacher_path': [*folder_flags(image_folder, '--model', 'deit_tiny_distilled_patch16_224'),
                             '--teacher-model', 'test_vit', '--distillation-type', 'hard', '--teacher-path', str(path)],
            'hub': [],
            'predict': ['--checkpoint', str(path), str(next((image_folder / 'val' / 'ant').iterdir()))],
        }[name]
        if name == 'hub':
            path.rename(home / 'hub' / 'checkpoints' / os.path.basename(models.MODEL_URLS['deit_tiny_patch16_224']))
    proc = subprocess.run([sys.executable, '-c', SAFE_LOAD_SCRIPT, json.dumps(cases), str(ROOT)], cwd=ROOT,
                          env={**ENV, 'TORCH_HOME': str(home)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    # The same kind of file, loaded as the original loaded checkpoints: the payload is real.
    control = tmp / 'ran_control'
    torch.save({'model': Payload(control)}, tmp / 'control.pth')
    torch.load(tmp / 'control.pth', weights_only=False)
    return results, markers, control


@pytest.mark.parametrize('path', LOAD_PATHS)
def test_a_crafted_pickle_is_refused_on_every_load_path_and_never_runs(path, crafted_loads):
    results, markers, control = crafted_loads
    assert control.exists()
    assert not markers[path].exists(), f'the payload ran through {path}'
    result = results[path]
    message = 'holds posix.system, not only tensors and plain values, and is refused: unpickling it could run code'
    assert message in result['stderr'], result
    if path == 'hub':
        assert result['code'] == 'raised' and result['stderr'].startswith('CheckpointError')
    else:
        assert result['code'] == 2 and result['stderr'].count('\n') == 1, result


# The calls that unpickle checkpoints (torch.load, torch.hub.load_state_dict_from_url): all must pass
# weights_only=True. Today utils.load_checkpoint is the only one; every other load goes through it.
LOAD_CALLS = {'load', 'load_state_dict_from_url'}


def test_every_checkpoint_load_in_the_code_uses_weights_only():
    calls = []
    for source in ROOT.glob('*.py'):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOAD_CALLS \
                    and isinstance(node.func.value, (ast.Name, ast.Attribute)) \
                    and ast.unparse(node.func.value) in ('torch', 'torch.hub', 'hub'):
                safe = any(k.arg == 'weights_only' and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((source.name, node.lineno, safe))
    assert calls and all(safe for _, _, safe in calls), calls

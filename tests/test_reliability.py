"""No lost run, no hang, no unsafe load: kills at random moments, SIGTERM / SIGUSR1, a NaN on one of two
processes, crafted pickles on every load path; and the pieces these rest on.

Training runs here are timm's 300k-parameter ``test_vit`` (the VisionTransformer code path of DeiT) at
32 x 32 pixels. The kill and signal tests start them as forked processes of this one (main.py's command
line, ``main.cli``, in a process of its own that can be killed), which saves an interpreter start-up per
run; the runs that check what a user sees run ``python main.py`` or ``torchrun``.
"""
import ast
import io
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import builders
import checkpoints
import main
import models
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
    return [json.loads(line)['epoch'] for line in (output_dir / 'log.txt').read_text().splitlines()]


def optimizer_steps(checkpoint: Dict) -> int:
    """The number of updates AdamW applied: its per-parameter step count (all parameters train)."""
    counts = {int(state['step']) for state in checkpoint['optimizer']['state'].values()}
    assert len(counts) == 1, counts
    return counts.pop()


# ============ training processes ============


def _train(argv: List[str], output: str, slow_write: float = 0.0) -> None:
    """Body of a forked training process: ``python main.py argv`` with its output in the file ``output``.

    With ``slow_write``, every checkpoint write stops half-way for that many seconds, as the write of a
    large checkpoint takes seconds: a kill can be aimed into it.
    """
    torch.set_num_threads(1)
    os.setpgrp()  # its own process group, with its DataLoader workers, as a job step on a cluster
    sys.stdout = sys.stderr = open(output, 'w', buffering=1)
    if slow_write:
        save = torch.save

        def slow_save(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[:len(data) // 2])
            f.flush()
            time.sleep(slow_write)
            f.write(data[len(data) // 2:])

        torch.save = slow_save
    main.cli(argv)


def start_training(argv: List[str], output: Path, slow_write: float = 0.0) -> multiprocessing.Process:
    process = multiprocessing.get_context('fork').Process(target=_train, args=(argv, str(output), slow_write))
    process.start()
    return process


def wait_for(condition, process: multiprocessing.Process, timeout: float = 60.0) -> bool:
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

KILLS = 12
KILL_EPOCHS = 30  # more than 12 runs of at most 1.5 s reach: the run ends after the kills
SLOW_WRITE = 0.2


def test_sigkill_at_random_moments_leaves_a_checkpoint_that_resumes_to_the_end(image_folder, tmp_path):
    """12 SIGKILLs at random times (start-up, training, evaluation, writes); for a third of them, at a
    random moment inside the first checkpoint write after the random time. After each, checkpoint.pth is
    absent only if no epoch ever ended, else it loads and never goes back; --resume then finishes the run
    with every epoch trained and logged exactly once (the optimizer's step count of an uninterrupted run)."""
    out = tmp_path / 'out'
    argv = folder_flags(image_folder, '--epochs', str(KILL_EPOCHS), '--output_dir', str(out))
    seed = random.randrange(2 ** 32)
    rng = random.Random(seed)
    modes = ['write'] * (KILLS // 3) + ['time'] * (KILLS - KILLS // 3)
    rng.shuffle(modes)
    checkpoint = out / 'checkpoint.pth'
    seen_epoch, kills, kills_in_writes = None, 0, 0
    for run, mode in enumerate(modes):
        process = start_training(argv, tmp_path / f'run{run}.txt', SLOW_WRITE)
        time.sleep(rng.uniform(0.0, 1.5))
        in_write = False
        if mode == 'write':  # the next write after that moment
            in_write = wait_for(lambda: any(out.glob('.*.tmp')), process)
            time.sleep(rng.uniform(0.0, SLOW_WRITE / 2))  # half: a loaded machine may sleep longer than asked
        if process.is_alive():
            in_write = in_write and any(out.glob('.*.tmp'))
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
            kills_in_writes += in_write
        process.join()
        context = f'run {run} ({mode}), seed {seed}'
        if not checkpoint.exists():
            assert seen_epoch is None, f'checkpoint.pth of epoch {seen_epoch} vanished: {context}'
            continue
        state = utils.load_checkpoint(str(checkpoint))
        assert {'model', 'optimizer', 'lr_scheduler', 'model_ema', 'epoch'} <= set(state), context
        assert seen_epoch is None or state['epoch'] >= seen_epoch, context
        seen_epoch = state['epoch']
        if process.exitcode == 0:
            break
    assert kills >= 10 and kills_in_writes >= 3, (kills, kills_in_writes, seed)

    resume = ['--resume', str(checkpoint)] if checkpoint.exists() else []
    proc = run_main(*argv, *resume)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = utils.load_checkpoint(str(checkpoint))
    assert final['epoch'] == KILL_EPOCHS - 1
    assert optimizer_steps(final) == KILL_EPOCHS * (120 // 32)
    assert logged_epochs(out) == list(range(KILL_EPOCHS)), seed
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


# ============ 2. graceful stop ============


def test_sigterm_and_sigusr1_save_the_step_reached_and_the_run_continues_from_it(tmp_path):
    """SIGTERM in the middle of epoch 1 (to the whole process group, DataLoader worker included): the step
    under way is abandoned, the state after the last applied step is saved with the step to resume at, and
    the process exits with main.EXIT_STOPPED. The resumed run continues from that step (SIGUSR1 stops it
    again further on), and the last one finishes: 3 epochs of 45 steps, each step applied exactly once."""
    out = tmp_path / 'out'
    argv = digits_flags('--epochs', '3', '--num_workers', '1', '--output_dir', str(out))
    steps_per_epoch = 1442 // 32
    stops = []
    # Each run is signalled once it has printed the progress line of step 10 of (what is left of) epoch 1.
    for run, signum in enumerate([signal.SIGTERM, signal.SIGUSR1]):
        output = tmp_path / f'run{run}.txt'
        process = start_training(argv, output)
        assert wait_for(printed(output, 'Epoch: [1]  [10/'), process)
        os.killpg(process.pid, signum)
        process.join(60)
        text = output.read_text()
        assert process.exitcode == main.EXIT_STOPPED, text[-3000:]
        state = utils.load_checkpoint(str(out / 'checkpoint.pth'))
        step = state['resume_step']
        assert state['epoch'] == 0 and 0 < step < steps_per_epoch
        assert optimizer_steps(state) == steps_per_epoch + step
        assert f'Stopped by {signum.name} at epoch 1, step {step}' in text
        stops.append(step)
        if run:
            assert f'continuing at epoch 1, step {stops[0]}' in text
    assert stops[1] > stops[0]
    assert logged_epochs(out) == [0]

    process = start_training(argv, tmp_path / 'last.txt')
    process.join(120)
    assert process.exitcode == 0, (tmp_path / 'last.txt').read_text()[-3000:]
    final = utils.load_checkpoint(str(out / 'checkpoint.pth'))
    assert final['epoch'] == 2 and 'resume_step' not in final
    assert optimizer_steps(final) == 3 * steps_per_epoch
    assert logged_epochs(out) == [0, 1, 2]


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


# ============ 3. a NaN on one of two processes ============


def test_nan_on_one_rank_stops_both_ranks_with_the_same_error_and_keeps_the_checkpoint(image_folder, tmp_path):
    """torchrun, 2 processes on gloo: process 1's loss is NaN at epoch 1, step 2 (the test-only switch
    DEIT_TEST_NAN_AT). Both processes stop there with the same error and exit status 1 within seconds (the
    original left the other one waiting in its all-reduce forever); epoch 0's checkpoint is untouched."""
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
    saved_at = time.time()
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail('a process kept running after the NaN: the two hang')
    assert time.time() - saved_at < 30  # epoch 1 to step 2, both stops, and torchrun's exit
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

"""run_with_submitit.py: jobs of two CPU processes on submitit's local executor, preemption and requeue,
the sbatch script of a Slurm submission, and the launcher's argument handling."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List

import pytest
import torch
from submitit.core.utils import DelayedSubmission

import run_with_submitit
from run_with_submitit import Trainer, parse_args

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = str(REPO / 'run_with_submitit.py')
LOCAL = ['--cluster', 'local', '--nodes', '1', '--ngpus', '2']
# The launcher is under test, not the model or the recipe: timm's 300k-parameter test ViT (the same
# VisionTransformer code path as DeiT) on the built-in DIGITS set, without the costly augmentations.
TRAINING = ['--data-set', 'DIGITS', '--model', 'test_vit', '--input-size', '32', '--batch-size', '128',
            '--num_workers', '0', '--device', 'cpu', '--no-model-ema', '--aa', 'none', '--reprob', '0']
JOB_ID = re.compile(r'Submitted job_id: (\S+)')


def folder_training(folder: Path) -> List[str]:
    """TRAINING on the small JPEG folder of conftest.py instead: the job's processes skip scikit-learn's import."""
    return [*TRAINING, '--data-set', 'FOLDER', '--data-path', str(folder), '--batch-size', '16']


def epochs_logged(output_dir: Path) -> List[int]:
    return [json.loads(line)['epoch'] for line in (output_dir / 'log.txt').read_text().splitlines()]


def task_log(job_dir: Path, job_id: str, rank: int) -> str:
    return (job_dir / f'{job_id}_{rank}_log.out').read_text()


def child_pids(pid: int) -> List[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    children = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            ppid = int(stat.read_text().rsplit(')', 1)[1].split()[1])  # fields after "(comm)": state, ppid
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            children.append(int(stat.parent.name))
    return children


def wait_until(condition: Callable[[], bool], launcher: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if launcher.poll() is not None or time.time() > deadline:
            raise AssertionError(f'gave up waiting (launcher exit status {launcher.poll()})')
        time.sleep(0.1)


# ============ jobs on the local executor ============


def test_local_job_of_two_processes_trains_and_writes_once(image_folder, tmp_path):
    proc = subprocess.run([sys.executable, LAUNCHER, *LOCAL, *folder_training(image_folder), '--epochs', '2'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = JOB_ID.search(proc.stdout)[1]
    # No --job_dir / --output_dir: both are ./jobs/%j, with %j the job id.
    folder = tmp_path / 'jobs' / job_id
    assert folder.is_dir()
    for rank in (0, 1):
        assert f'rank {rank} of 2 (local rank {rank}), rendezvous 127.0.0.1:' in task_log(folder, job_id, rank)
    checkpoint = torch.load(folder / 'checkpoint.pth', weights_only=True)
    assert checkpoint['args']['world_size'] == 2 and checkpoint['args']['output_dir'] == str(folder)
    # Written once, by rank 0: one log line per epoch, one checkpoint of the last epoch, no stray temp files.
    assert epochs_logged(folder) == [0, 1]
    assert checkpoint['epoch'] == 1
    assert not [p.name for p in folder.iterdir() if p.name.startswith('.')]


def test_preempted_job_requeues_and_resumes_from_its_checkpoint(image_folder, tmp_path):
    job_dir, output_dir = tmp_path / 'jobs' / '%j', tmp_path / 'out' / '%j'
    # The tasks inherit the launcher's environment: the test-only switch DEIT_TEST_PAUSE_AT holds rank 0 at
    # epoch 1, step 0 (epoch 0 saved) and creates the marker file, once; the requeued job passes that step.
    marker = tmp_path / 'held'
    launcher = subprocess.Popen([sys.executable, LAUNCHER, *LOCAL, *folder_training(image_folder), '--epochs', '2',
                                 '--job_dir', str(job_dir), '--output_dir', str(output_dir)], cwd=tmp_path,
                                env={**os.environ, 'DEIT_TEST_PAUSE_AT': f'0:1:0:{marker}'},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job_id = None
    try:
        for line in launcher.stdout:  # warnings may come first
            if found := JOB_ID.search(line):
                job_id = found[1]
                break
        assert job_id is not None, 'the launcher did not submit a job'
        wait_until(marker.exists, launcher)
        # Preempt during epoch 1 as Slurm does (`scancel --signal USR2`, submitit's SlurmJob._interrupt) and as
        # the local executor does at its time limit: the signal goes to every task. The local job's own
        # _interrupt() signals the controller process instead, which dies of it without requeuing.
        tasks = child_pids(int(job_id))  # the local executor's job id is the pid of the controller of the tasks
        assert len(tasks) == 2
        for pid in tasks:
            os.kill(pid, signal.SIGUSR2)
        output = launcher.communicate(timeout=600)[0]
    finally:
        if launcher.poll() is None:
            if job_id is not None:
                os.kill(int(job_id), signal.SIGINT)  # the controller stops its tasks on SIGINT
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == 0, output

    folder, out = (Path(run_with_submitit.expand_job_id(str(p), job_id)) for p in (job_dir, output_dir))
    rank0 = task_log(folder, job_id, 0)
    assert f'Requeuing (1 of at most 10), resuming from {out / "checkpoint.pth"}' in rank0
    assert rank0.count('rank 0 of 2 (local rank 0)') == 2 and 'requeues so far 1' in rank0
    # Every epoch exactly once (none trained twice, none lost), up to the requested last one.
    assert epochs_logged(out) == [0, 1]
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['epoch'] == 1


# ============ the requeue hook ============


def test_checkpoint_requeues_with_resume_until_the_bound(tmp_path, monkeypatch):
    # What submitit's local executor sets in the environment of task 0 of job 77.
    monkeypatch.setenv('SUBMITIT_EXECUTOR', 'local')
    monkeypatch.setenv('SUBMITIT_LOCAL_JOB_ID', '77')
    args = parse_args([*LOCAL, *TRAINING, '--output_dir', str(tmp_path / '%j'), '--max-requeues', '2'])
    trainer = Trainer(args)

    # Preempted during the first epoch: no checkpoint yet, the requeued job starts again from scratch.
    first = trainer.checkpoint()
    assert isinstance(first, DelayedSubmission)
    assert first.function.args.resume == '' and first.function.requeues == 1

    (tmp_path / '77').mkdir()
    (tmp_path / '77' / 'checkpoint.pth').write_bytes(b'')
    second = first.function.checkpoint()
    assert second.function.args.resume == str(tmp_path / '77' / 'checkpoint.pth')
    assert second.function.requeues == 2 and second.function.args.output_dir == str(tmp_path / '%j')
    assert second.function.checkpoint() is None  # --max-requeues 2 reached: submitit ends the job
    assert trainer.args.resume == '' and trainer.requeues == 0


# ============ Slurm submission ============


def test_slurm_submission_asks_for_the_job_the_flags_describe(tmp_path):
    # Stand-ins for Slurm's commands: srun only needs to exist, sbatch answers as Slurm does.
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name, body in (('srun', 'exit 0'), ('sbatch', 'echo "Submitted batch job 4242"')):
        (bin_dir / name).write_text(f'#!/bin/sh\n{body}\n')
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', DEIT_JOB_DIR=str(tmp_path / 'shared'))
    # The seed's hard distillation command, with the resources a real cluster asks for.
    proc = subprocess.run([sys.executable, LAUNCHER, '--model', 'deit_base_distilled_patch16_224',
                           '--distillation-type', 'hard', '--teacher-model', 'regnety_160', '--teacher-path',
                           'https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth', '--use_volta32',
                           '--data-path', '/data/imagenet', '--partition', 'gpu', '--account', 'proj', '--qos', 'high',
                           '--timeout', '600', '--signal-delay', '90', '--max-requeues', '4'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert JOB_ID.search(proc.stdout)[1] == '4242'

    folder = tmp_path / 'shared' / '4242'
    sbatch = set((folder / '4242_submission.sh').read_text().splitlines())
    expected = {'--job-name=deit', '--nodes=2', '--ntasks-per-node=8', '--gpus-per-node=8', '--cpus-per-task=10',
                '--mem=320GB', '--time=600', '--signal=USR2@90', '--partition=gpu', '--account=proj', '--qos=high',
                '--constraint=volta32gb', f'--output={tmp_path}/shared/%j/%j_0_log.out'}
    assert {f'#SBATCH {line}' for line in expected} <= sbatch
    job = DelayedSubmission.load(folder / '4242_submitted.pkl')
    assert job._timeout_countdown == 4
    # GPU training although this machine may have none: the compute nodes have them.
    assert job.function.args.device == 'cuda' and job.function.args.output_dir == str(tmp_path / 'shared' / '%j')


# ============ argument handling ============


def test_job_folder_defaults_to_jobs_or_deit_job_dir_and_output_follows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv('DEIT_JOB_DIR', raising=False)
    args = parse_args([*LOCAL, *TRAINING])
    assert args.job_dir == args.output_dir == str(tmp_path / 'jobs' / '%j')
    monkeypatch.setenv('DEIT_JOB_DIR', str(tmp_path / 'scratch'))
    args = parse_args([*LOCAL, *TRAINING, '--output_dir', 'runs/%j'])
    assert args.job_dir == str(tmp_path / 'scratch' / '%j')
    assert run_with_submitit.expand_job_id(args.output_dir, '123') == str(tmp_path / 'runs' / '123')


@pytest.mark.parametrize('argv, message', [
    (['--cluster', 'local', '--nodes', '2'], '--cluster local runs on this machine only: --nodes 2 needs --cluster '
                                             'slurm'),
    (['--cluster', 'debug', '--ngpus', '2'], '--cluster debug runs one process inside this one'),
    (['--cluster', 'local', '--device', 'cuda', '--ngpus', str(torch.cuda.device_count() + 1)],
     f'this machine has {torch.cuda.device_count()} GPU(s)'),
    (['--cluster', 'local', '--max-requeues', '-1'], '--max-requeues must be >= 0'),
    (['--cluster', 'local', '--timeout', '1', '--signal-delay', '60'], '--signal-delay between 0 and the time limit'),
    (['--cluster', 'slurm'], '--cluster slurm needs Slurm\'s sbatch and srun, which are not on PATH'),
    # main.py's own checks run before the job is submitted.
    (['--cluster', 'local', '--distillation-type', 'hard'], '--distillation-type hard needs --teacher-path'),
])
def test_impossible_jobs_are_refused_with_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('PATH', str(tmp_path))  # no Slurm here, whatever the machine
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*TRAINING, *argv])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith('Submitit launcher for DeiT: error: ') and message in error

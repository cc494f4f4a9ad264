"""Every bad input ends with one line that says what to do, a non-zero exit status, no traceback (unless
--debug), and the files already in --output_dir untouched.

The table runs main.py's command line in this process (``main.cli``, what ``python main.py`` runs); two
tests run ``python main.py`` itself for what only a real process shows (its exit status and stderr).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Tuple

import pytest
from conftest import FOLDER_CLASSES, write_image_folder

import main
import utils

ROOT = Path(__file__).resolve().parents[1]
FAST = ['--model', 'test_vit', '--input-size', '32', '--num_workers', '0', '--device', 'cpu', '--aa', 'none',
        '--reprob', '0', '--batch-size', '32']
DISTILLED = ['--model', 'deit_tiny_distilled_patch16_224', '--distillation-type', 'hard']
UNREACHABLE = 'https://127.0.0.1:9/deit_tiny_patch16_224-a1311bcf.pth'  # a closed port: refused at once, offline


pytestmark = pytest.mark.usefixtures('one_thread')


def snapshot(folder: Path) -> Dict[str, Tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture(scope='module')
def data(image_folder, tmp_path_factory):
    """The folders and files of the table: a trained checkpoint, broken copies of it, broken data folders."""
    tmp = tmp_path_factory.mktemp('bad_input')
    trained = tmp / 'trained'
    main.cli([*FAST, '--data-set', 'FOLDER', '--data-path', str(image_folder), '--epochs', '1',
              '--output_dir', str(trained)])
    checkpoint = trained / 'checkpoint.pth'
    (tmp / 'cut.pth').write_bytes(checkpoint.read_bytes()[:100_000])
    (tmp / 'garbage.pth').write_text('not a checkpoint\n' * 100)

    empty = write_image_folder(tmp / 'empty', {'ant': (2, 1), 'bee': (2, 1)})
    for split in ('train', 'val'):
        (empty / split / 'cat').mkdir()
    mismatch = write_image_folder(tmp / 'mismatch', {'ant': (2, 1), 'bee': (2, 1)})
    shutil.move(str(mismatch / 'val' / 'bee'), str(mismatch / 'val' / 'cow'))
    corrupt = write_image_folder(tmp / 'corrupt', FOLDER_CLASSES)
    (corrupt / 'val' / 'bee' / '3.jpg').write_bytes(b'\xff\xd8\xff\xe0 not a JPEG any more')
    return SimpleNamespace(images=image_folder, checkpoint=checkpoint, log=trained / 'log.txt', tmp=tmp,
                           cut=tmp / 'cut.pth', garbage=tmp / 'garbage.pth', empty=empty, mismatch=mismatch,
                           corrupt=corrupt)


def folder(path: Path, *extra: str) -> List[str]:
    return [*FAST, '--data-set', 'FOLDER', '--data-path', str(path), *extra]


# input -> (arguments, part of the message that says what is wrong and what to do). README's table.
CASES = {
    'missing data path': (lambda d, out: folder(d.tmp / 'nowhere'), 'is not a folder: the folder datasets expect'),
    'empty class folders': (lambda d, out: folder(d.empty), 'without any image'),
    'train/val class mismatch': (lambda d, out: folder(d.mismatch), 'both splits need the same class folders'),
    'unknown --model': (lambda d, out: folder(d.images, '--model', 'deit_tiniest_patch16_224'),
                        "Unknown model 'deit_tiniest_patch16_224' (did you mean deit_tiny_patch16_224?). DeiT models: "
                        "deit_tiny_patch16_224"),
    'PatchConvNet --model': (lambda d, out: folder(d.images, '--model', 'S60'),
                             'PatchConvNet (S60) is not part of this codebase: timm has no reference implementation'),
    'unknown --teacher-model': (lambda d, out: folder(d.images, *DISTILLED, '--teacher-model', 'regnety_999',
                                                 '--teacher-path', str(d.checkpoint)),
                                "--teacher-model: Unknown model 'regnety_999'"),
    'distillation without --teacher-path': (lambda d, out: folder(d.images, *DISTILLED),
                                            'needs --teacher-path'),
    'teacher file missing': (lambda d, out: folder(d.images, *DISTILLED, '--teacher-path', str(d.tmp / 'teacher.pth')),
                             'teacher.pth: no such file'),
    'teacher weights of another architecture': (
        lambda d, out: folder(d.images, *DISTILLED, '--teacher-model', 'resnet10t', '--teacher-path',
                              str(d.checkpoint)),
        'does not fit ResNet'),
    'distillation with a model without distillation token': (
        lambda d, out: folder(d.images, '--distillation-type', 'soft', '--teacher-path', str(d.checkpoint)),
        'use a *_distilled_* model'),
    'truncated resume file': (lambda d, out: folder(d.images, '--resume', str(d.cut)), 'is truncated or not a torch'),
    'corrupt resume file': (lambda d, out: folder(d.images, '--resume', str(d.garbage)), 'is truncated or not a torch'),
    'resume file of another model': (lambda d, out: folder(d.images, '--model', 'deit_tiny_patch16_224', '--resume',
                                                      str(d.checkpoint)), 'check --model, --input-size'),
    'finetune URL unreachable offline': (lambda d, out: folder(d.images, '--finetune', UNREACHABLE),
                                         'copy deit_tiny_patch16_224-a1311bcf.pth into'),
    '--input-size below the patch size': (lambda d, out: folder(d.images, '--input-size', '8'),
                                          'is smaller than the patch size 16'),
    'batch size 0': (lambda d, out: folder(d.images, '--batch-size', '0'),
                     '--batch-size, --epochs and --accum-iter must be positive'),
    'batch size < 0': (lambda d, out: folder(d.images, '--batch-size', '-8'),
                       '--batch-size, --epochs and --accum-iter must be positive'),
    'unwritable --output_dir': (lambda d, out: folder(d.images, '--output_dir', str(out / 'log.txt' / 'run')),
                                'is a file, not a folder: choose another --output_dir'),
    'corrupt image in the data': (lambda d, out: folder(d.corrupt, '--epochs', '2', '--num_workers', '1'),
                                  'replace or remove the file, or pass --skip-corrupt'),
    'resume file missing': (lambda d, out: folder(d.images, '--eval', '--resume', str(d.tmp / 'missing.pth')),
                            'missing.pth: no such file'),
    '--resplit (an AugMix option)': (lambda d, out: folder(d.images, '--resplit', '--epochs', '1'),
                                     '--resplit applies to AugMix'),
    '--cosub without stochastic depth': (lambda d, out: folder(d.images, '--cosub', '--drop-path', '0'),
                                         '--cosub draws its two sub-models by stochastic depth'),
}


@pytest.mark.parametrize('case', CASES)
def test_bad_input_ends_with_one_line_and_leaves_the_output_dir_alone(case, data, tmp_path, torch_home, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    for f in (data.checkpoint, data.log):
        shutil.copy2(f, out)  # a run's files, as a user retrying in the same folder has them
    before = snapshot(out)
    argv, message = CASES[case]
    argv = argv(data, out)
    if '--output_dir' not in argv:
        argv += ['--output_dir', str(out)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_status:
        main.cli(argv)
    err = capsys.readouterr().err
    # torch.hub announces a download on stderr before torch 2.7 (later on stdout): torch's line, not ours
    err = ''.join(line for line in err.splitlines(keepends=True) if not line.startswith('Downloading: '))
    assert exit_status.value.code == main.EXIT_USER_ERROR, err
    assert err.count('\n') == 1 and ': error: ' in err.split('\n')[0] and message in err, err
    after = snapshot(out)
    for name, content in before.items():
        assert after[name] == content, f'{name} changed'
    # Only a run that started training writes: its arguments.
    assert set(after) - set(before) <= ({'args.json'} if case == 'corrupt image in the data' else set())


def test_checks_come_before_the_output_dir_is_created(data, tmp_path, capsys):
    out = tmp_path / 'new'
    with pytest.raises(SystemExit):
        main.cli(folder(data.tmp / 'nowhere', '--output_dir', str(out)))
    with pytest.raises(SystemExit):
        main.cli(folder(data.images, '--resume', str(data.cut), '--output_dir', str(out)))
    assert not out.exists()


@pytest.mark.parametrize('debug', [False, True])
def test_python_main_py_prints_one_line_or_with_debug_the_traceback(debug, data):
    argv = folder(data.images, '--input-size', '8', *(['--debug'] if debug else []))
    proc = subprocess.run([sys.executable, str(ROOT / 'main.py'), *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=120)
    if debug:
        assert proc.returncode == 1 and 'Traceback (most recent call last)' in proc.stderr
        assert proc.stderr.rstrip().splitlines()[-1].startswith('ValueError: --input-size 8 is smaller than the')
    else:
        assert proc.returncode == 2 and proc.stderr.count('\n') == 1 and 'Traceback' not in proc.stderr
        assert 'error: --input-size 8 is smaller than the patch size 16' in proc.stderr


def test_an_error_in_a_data_loader_worker_does_not_hang_the_exit(data):
    """main() called as run_with_submitit.py calls it, its error left uncaught: the traceback keeps the
    loader and its workers, which ignore SIGTERM, alive; they are ended at exit (the process hung there)."""
    argv = folder(data.corrupt, '--epochs', '1', '--num_workers', '1')
    code = f'import main; main.main(main.get_args_parser().parse_args({argv!r}))'
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=120)
    assert proc.returncode == 1 and 'CorruptImageError: cannot read image' in proc.stderr, proc.stderr[-2000:]


def test_the_original_distributed_flag_parses_and_the_launcher_decides(monkeypatch):
    """The original parsed --distributed and ignored it (its launcher decided): its commands still run."""
    for name in ('RANK', 'WORLD_SIZE', 'SLURM_PROCID', 'SLURM_NTASKS'):
        monkeypatch.delenv(name, raising=False)
    args = main.get_args_parser().parse_args([*FAST, '--distributed'])
    utils.init_distributed_mode(args)
    assert args.distributed is False and args.world_size == 1
    flag = next(a for a in main.get_args_parser()._actions if '--distributed' in a.option_strings)
    assert flag.help.startswith('ignored')


def test_skip_corrupt_reports_how_many_images_were_skipped(tmp_path, capsys):
    """--skip-corrupt on a folder with two unreadable training files (garbage, a truncated JPEG) and one
    unreadable evaluation file: every epoch prints how many were skipped so far, and log.txt holds the counts."""
    root = write_image_folder(tmp_path / 'data', {'ant': (8, 2), 'bee': (8, 2)})
    (root / 'train' / 'ant' / '3.jpg').write_bytes(b'not an image at all')
    whole = (root / 'train' / 'bee' / '5.jpg').read_bytes()
    (root / 'train' / 'bee' / '5.jpg').write_bytes(whole[:len(whole) // 2])
    (root / 'val' / 'bee' / '1.jpg').write_bytes(b'')
    out = tmp_path / 'out'
    with pytest.warns(UserWarning, match='skipping unreadable image'):
        main.cli(folder(root, '--batch-size', '4', '--epochs', '2', '--skip-corrupt', '--output_dir', str(out)))
    stdout = capsys.readouterr().out
    assert stdout.count('Unreadable images skipped so far (--skip-corrupt): 2 in training, 1 in evaluation') == 2
    logs = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert [(e['train_skipped_images'], e['test_skipped_images']) for e in logs] == [(2, 1), (2, 1)]

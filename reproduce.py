"""The distillation findings of the paper's section 5 (DeiT, Touvron et al. 2020), at small scale and offline.

    python reproduce.py                          # the default grid (see SETTINGS), into reproduce_out/
    python reproduce.py --quick --output_dir q   # one seed, one epoch per run: checks the pipeline in a minute
    python reproduce.py --seeds 3 --jobs 2       # fewer seeds; two runs at a time, one thread each

On the built-in DIGITS data (real 8x8 scans of handwritten digits, upscaled to --input-size 32), main.py trains a
convnet teacher (RegNetY, the paper's family), a transformer teacher (a DeiT-Ti trained longer, as the paper's
DeiT-B teacher is a DeiT), then DeiT-Ti students over several seeds: without distillation (the paper's "none"),
distilled (soft and hard) from each teacher, and the control with a second class token in place of the
distillation token (main.py --dist-head-on-labels). analyze.py's functions then measure each head's accuracy,
the cosine of the class and distillation tokens through the blocks, and how often each head disagrees with each
teacher; reproduce_report.py writes report.md (the paper's figure beside each of ours), results.json and the figures.

Each run is `python main.py ...` in a child process, its output in <output_dir>/runs/<run>/stdout.txt. A run whose
folder holds done.json is finished and skipped when the script starts again; an interrupted run resumes from its
checkpoint.pth (main.py's own resume). Exit status: 0 done; 1 a run failed; 2 a user error, in one line; 3 stopped
(SIGTERM or Ctrl-C), the runs in progress having saved their state.
"""
import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import timm
import torch
from torch.utils.data import DataLoader

import main as deit_main
import reproduce_report
from analyze import disagreement, head_accuracies, load_model, token_cosines, top1_predictions
from datasets import DIGITS_SIZES, DigitsDataset, build_dataset

HERE = Path(__file__).resolve().parent
STUDENT, STUDENT_DISTILLED = 'deit_tiny_patch16_224', 'deit_tiny_distilled_patch16_224'
TEACHERS = {'convnet': 'regnety_002', 'transformer': 'deit_tiny_patch16_224'}
# Student variants: model, main.py flags, teacher (a key of TEACHERS) or None.
VARIANTS = {
    'none': (STUDENT, [], None),
    'soft_convnet': (STUDENT_DISTILLED, ['--distillation-type', 'soft'], 'convnet'),
    'hard_convnet': (STUDENT_DISTILLED, ['--distillation-type', 'hard'], 'convnet'),
    'soft_transformer': (STUDENT_DISTILLED, ['--distillation-type', 'soft'], 'transformer'),
    'hard_transformer': (STUDENT_DISTILLED, ['--distillation-type', 'hard'], 'transformer'),
    'two_class_tokens': (STUDENT_DISTILLED, ['--dist-head-on-labels'], None),
}
HEADS = ('cls', 'dist', 'avg')
EXIT_FAILED, EXIT_USER_ERROR, EXIT_STOPPED = 1, 2, 3


@dataclass(frozen=True)
class Setting:
    """What every run of a grid shares; the reasons are in report.md's "Setting" section."""
    input_size: int = 32           # 8x8 scans x 4: 2x2 patches of 16; main.py's padded-crop path for inputs <= 32
    batch_size: int = 64           # main.py's default
    lr: float = 5e-4               # the paper's per-step lr (its value for a 512 batch), not scaled down by 8
    student_epochs: int = 30       # 330 steps of 64 images: what 30 student runs afford in under an hour on 2 cores
    convnet_epochs: int = 200      # teachers train longer than the students, so that they are clearly better than a
    transformer_epochs: int = 100  # student trained alone; the convnet twice as long, as it learns more slowly per
    #                                step here (probes of 30 epochs on all 1442 images: regnety_002 54%, DeiT-Ti 81%),
    #                                to come near the transformer's accuracy as the paper's pair (81.7 / 81.8)
    train_fraction: float = 0.5    # share of the 1442 training images, the same k first scans of each digit
    val_fraction: float = 1.0      # share of the 355 validation images (all but in --quick)


SETTINGS = {'default': Setting(), 'quick': Setting(student_epochs=1, convnet_epochs=1, transformer_epochs=1,
                                                   train_fraction=0.25, val_fraction=0.25)}


@dataclass
class Run:
    name: str                      # 'teacher_convnet' or '<variant>/seed<k>'
    model: str
    epochs: int
    seed: int
    flags: List[str]
    teacher: Optional[str] = None  # a key of TEACHERS
    variant: str = ''


def plan(setting: Setting, seeds: int) -> List[Run]:
    """The teachers (seed 0), then every variant for seed 0, then seed 1, ... (a short grid is a complete one)."""
    runs = [Run('teacher_convnet', TEACHERS['convnet'], setting.convnet_epochs, 0, []),
            Run('teacher_transformer', TEACHERS['transformer'], setting.transformer_epochs, 0, [])]
    for seed in range(seeds):
        for variant, (model, flags, teacher) in VARIANTS.items():
            runs.append(Run(f'{variant}/seed{seed}', model, setting.student_epochs, seed, flags, teacher, variant))
    return runs

# ============ data ============


def data_flags(setting: Setting, out: Path) -> List[str]:
    """main.py's data flags: DIGITS itself, or a share of its images written as an image folder.

    A share is written once as PNG files of the very pixels DigitsDataset serves (<out>/data), so that main.py
    trains on it through its FOLDER dataset without any change: the k = round(share x n) first scans of each
    digit (in scikit-learn's order) of each split.
    """
    if setting.train_fraction >= 1 and setting.val_fraction >= 1:
        return ['--data-set', 'DIGITS']
    root = out / 'data' / f'digits_{setting.train_fraction:g}_{setting.val_fraction:g}'
    if not (root / 'complete').exists():
        for split, train in (('train', True), ('val', False)):
            digits = DigitsDataset(train=train)
            targets = np.asarray(digits.targets)
            share = setting.train_fraction if train else setting.val_fraction
            for digit, name in enumerate(digits.classes):
                members = np.flatnonzero(targets == digit)
                keep = members[:max(1, round(share * len(members)))]
                (root / split / name).mkdir(parents=True, exist_ok=True)
                for i in keep:
                    digits[i][0].save(root / split / name / f'{i:04d}.png')
        (root / 'complete').write_text('')
    return ['--data-set', 'FOLDER', '--data-path', str(root)]


def main_flags(run: Run, setting: Setting, data: List[str], out: Path, device: str) -> List[str]:
    """The command line of main.py for one run: the paper's recipe (main.py's defaults) with this setting."""
    flags = ['--model', run.model, *data, '--input-size', str(setting.input_size),
             '--batch-size', str(setting.batch_size), '--epochs', str(run.epochs), '--unscale-lr',
             '--lr', str(setting.lr), '--seed', str(run.seed), '--device', device, '--num_workers', '0',
             # The EMA's decay (0.99996 per step) leaves it at its start after a few hundred steps; the paper
             # found it of little help (its Table 8): off, and the final weights are evaluated.
             '--no-model-ema', *run.flags, '--output_dir', str(out / 'runs' / run.name)]
    if run.teacher:
        flags += ['--teacher-model', TEACHERS[run.teacher],
                  '--teacher-path', str(out / 'runs' / f'teacher_{run.teacher}' / 'checkpoint.pth')]
    return flags

# ============ running ============


def finished(folder: Path) -> bool:
    """A run is finished when main.py exited 0: done.json, written then (the last log.txt line comes before the
    last checkpoint, so it alone does not say that checkpoint.pth is the final one)."""
    return (folder / 'done.json').exists()


class Grid:
    """Runs main.py in child processes, ``jobs`` at a time, each student after its teacher; prints progress and ETA.

    The ETA is the epochs left times the wall time per epoch trained so far in this invocation (epochs counted
    from the runs' log.txt, so runs in progress count too).
    """

    def __init__(self, runs: List[Run], setting: Setting, out: Path, device: str, jobs: int, threads: int,
                 heartbeat_s: float = 300) -> None:
        self.runs, self.setting, self.out, self.device = runs, setting, out, device
        self.jobs, self.threads, self.heartbeat_s = jobs, threads, heartbeat_s
        self.data = data_flags(setting, out)
        self.index = {run.name: i for i, run in enumerate(runs, 1)}
        self.processes: Dict[int, subprocess.Popen] = {}  # the runs started as new interpreters, by pid

    def folder(self, run: Run) -> Path:
        return self.out / 'runs' / run.name

    def _epochs_logged(self, run: Run) -> int:
        log = self.folder(run) / 'log.txt'
        return len(log.read_text().splitlines()) if log.exists() else 0

    def _eta(self, trained: int, left: int) -> str:
        if not trained:
            return 'ETA after the first epoch'
        seconds = (time.time() - self.start) / trained * left
        ends = time.strftime('%H:%M', time.localtime(time.time() + seconds))
        return f'about {reproduce_report.duration(seconds)} left (ends ~{ends})'

    def _launch(self, run: Run) -> int:
        """Start `python main.py <flags>` of ``run`` in a child process; returns its pid.

        On the CPU the child is a fork of this process (run_main), which spares each run the seconds of importing
        torch and timm; CUDA does not survive a fork once the parent has touched it (torch.cuda.is_available()
        does), so on a GPU each run is a new interpreter.
        """
        folder = self.folder(run)
        folder.mkdir(parents=True, exist_ok=True)
        flags = main_flags(run, self.setting, self.data, self.out, self.device)
        with (folder / 'stdout.txt').open('a') as log:
            log.write(f'$ python main.py {" ".join(flags)}\n')
            log.flush()
            if torch.device(self.device).type != 'cpu':
                process = subprocess.Popen([sys.executable, str(HERE / 'main.py'), *flags], cwd=HERE, stdout=log,
                                           stderr=subprocess.STDOUT)
                self.processes[process.pid] = process
                return process.pid
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            run_main(flags, folder / 'stdout.txt', self.threads)
        return pid

    def _finish(self, run: Run, code: int, usage: Any, started: float) -> float:
        """Write done.json of a run that exited with ``code``; returns its final top-1."""
        folder = self.folder(run)
        if code != 0:
            raise RuntimeError(f'{run.name}: main.py exited with status {code}; see {folder / "stdout.txt"}')
        log = [json.loads(line) for line in (folder / 'log.txt').read_text().splitlines() if line.strip()]
        if not log or log[-1]['epoch'] != run.epochs - 1:
            raise RuntimeError(f'{run.name}: log.txt ends before epoch {run.epochs - 1}; see {folder / "stdout.txt"}')
        done = {'wall_s': time.time() - started, 'cpu_s': usage.ru_utime + usage.ru_stime, 'threads': self.threads,
                'test_acc1': log[-1]['test_acc1'], 'epochs': run.epochs}
        (folder / 'done.json').write_text(json.dumps(done, indent=2) + '\n')
        return done['test_acc1']

    def _todo(self) -> List[Run]:
        todo = []
        for run in self.runs:
            if finished(self.folder(run)):
                print(f'skip run {self.index[run.name]}/{len(self.runs)}: {run.name}, finished earlier '
                      f'({self.folder(run) / "done.json"})')
            else:
                todo.append(run)
        return todo

    def run(self) -> int:
        """Every run not finished before, in plan order as far as teachers and ``jobs`` allow; returns how many."""
        todo = self._todo()
        count = len(todo)
        self.start = time.time()
        left = sum(r.epochs - self._epochs_logged(r) for r in todo)  # epochs still to train
        trained = 0  # epochs trained by the runs that ended in this invocation
        running: Dict[int, tuple] = {}  # pid: (run, start time, epochs logged at start)
        last_heartbeat = time.time()
        try:
            while todo or running:
                ready = [r for r in todo if not r.teacher or finished(self.out / 'runs' / f'teacher_{r.teacher}')]
                while ready and len(running) < self.jobs:
                    run = ready.pop(0)
                    todo.remove(run)
                    logged = self._epochs_logged(run)
                    print(f'start run {self.index[run.name]}/{len(self.runs)}: {run.name} ({run.model}, {run.epochs} '
                          f'epochs{f", resuming after {logged}" if logged else ""})', flush=True)
                    running[self._launch(run)] = (run, time.time(), logged)
                if not running:
                    raise RuntimeError('no run can start: a teacher is missing from the plan')
                pid, status, usage = os.wait4(-1, os.WNOHANG)
                in_progress = sum(self._epochs_logged(r) - n for r, _, n in running.values())
                if pid in running:
                    run, started, logged = running.pop(pid)
                    code = os.waitstatus_to_exitcode(status)
                    if pid in self.processes:  # reaped here: tell its Popen
                        self.processes.pop(pid).returncode = code
                    acc = self._finish(run, code, usage, started)
                    trained, left = trained + run.epochs - logged, left - (run.epochs - logged)
                    in_progress -= run.epochs - logged
                    done = len(self.runs) - len(todo) - len(running)
                    print(f'[{done}/{len(self.runs)} runs done] {run.name} in '
                          f'{reproduce_report.duration(time.time() - started)}, top-1 {acc:.1f}%; '
                          f'{self._eta(trained + in_progress, left - in_progress)}', flush=True)
                elif time.time() - last_heartbeat > self.heartbeat_s:
                    last_heartbeat = time.time()
                    epochs = ', '.join(f'{r.name} epoch {self._epochs_logged(r)}/{r.epochs}'
                                       for r, _, _ in running.values())
                    print(f'[{len(self.runs) - len(todo) - len(running)}/{len(self.runs)} runs done] in progress: '
                          f'{epochs}; {self._eta(trained + in_progress, left - in_progress)}', flush=True)
                else:
                    time.sleep(0.5)
        finally:
            for pid in running:  # stopped: each saves its step and exits (main.py's SIGTERM)
                os.kill(pid, signal.SIGTERM)
            for pid in running:
                os.waitpid(pid, 0)
        return count


def run_main(flags: List[str], stdout: Path, threads: int) -> None:
    """In a forked child: main.py's command line, its output appended to ``stdout``; exits with its status.

    A fork rather than a new interpreter spares each run the seconds of importing torch and timm; the run is
    the same as `python main.py <flags>`, and main.py stops it cleanly on SIGTERM once it trains.
    """
    code = EXIT_FAILED
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with stdout.open('a') as log:
            os.dup2(log.fileno(), sys.stdout.fileno())
            os.dup2(log.fileno(), sys.stderr.fileno())
        torch.set_num_threads(threads)
        deit_main.cli(flags)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else EXIT_FAILED
    except BaseException:  # the traceback goes to the run's stdout.txt, the status to the grid
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

# ============ analyses ============


def val_loader(setting: Setting, data: List[str]) -> DataLoader:
    """main.py's validation loader of the grid's data: eval transform, in order, batch 1.5 x batch size."""
    args = deit_main.get_args_parser().parse_args([*data, '--input-size', str(setting.input_size)])
    dataset, _ = build_dataset(is_train=False, args=args)
    return DataLoader(dataset, batch_size=int(1.5 * setting.batch_size), shuffle=False, num_workers=0)


def analyse(run: Run, folder: Path, setting: Setting, loader: DataLoader, device: torch.device) -> Dict[str, Any]:
    """Each head's accuracy and top-1 predictions, and the tokens' cosines of a distilled student; cached in
    analysis.json next to the final checkpoint it was computed from."""
    cache = folder / 'analysis.json'
    checkpoint = folder / 'checkpoint.pth'
    if cache.exists() and cache.stat().st_mtime >= checkpoint.stat().st_mtime:
        return json.loads(cache.read_text())
    model = load_model(str(checkpoint), run.model, setting.input_size, nb_classes=len(loader.dataset.classes))
    result: Dict[str, Any] = {'predictions': {}}
    distilled = run.model == STUDENT_DISTILLED
    for head in HEADS if distilled else ('avg',):
        result['predictions'][head] = top1_predictions(model, loader, device, head).tolist()
    if distilled:
        result['heads'] = head_accuracies(model, loader, device)
        result['tokens'] = token_cosines(model, loader, device)
    cache.write_text(json.dumps(result) + '\n')
    return result


def analyse_all(grid: Grid, device: torch.device) -> Dict[str, Any]:
    """Per run: its analysis, its log and its timing, and the validation labels they are measured on."""
    loader = val_loader(grid.setting, grid.data)
    labels = torch.as_tensor(loader.dataset.targets)  # DIGITS and FOLDER both list them in order
    runs = {}
    for run in grid.runs:
        folder = grid.folder(run)
        print(f'analysing {run.name}', flush=True)
        analysis = analyse(run, folder, grid.setting, loader, device)
        predictions = {h: torch.as_tensor(p) for h, p in analysis['predictions'].items()}
        runs[run.name] = {
            'variant': run.variant, 'seed': run.seed, 'model': run.model, 'epochs': run.epochs,
            'acc1': {h: 100 * p.eq(labels).double().mean().item() for h, p in predictions.items()},
            'heads': analysis.get('heads'), 'tokens': analysis.get('tokens'),
            'log': [json.loads(line) for line in (folder / 'log.txt').read_text().splitlines() if line.strip()],
            'done': json.loads((folder / 'done.json').read_text()),
        }
        runs[run.name]['predictions'] = predictions
    return {'labels': labels, 'runs': runs}


def agreement(measured: Dict[str, Any]) -> Dict[str, Any]:
    """Disagreement (fraction of val images with different top-1) per seed: the paper's Table 4 matrix for the
    hard-distilled student of the convnet, and every student head against each teacher."""
    runs, labels = measured['runs'], measured['labels']
    teachers = {t: runs[f'teacher_{t}']['predictions']['avg'] for t in TEACHERS}
    seeds = sorted({r['seed'] for r in runs.values() if r['variant']})
    table4 = []
    for seed in seeds:
        student = runs[f'hard_convnet/seed{seed}']['predictions']
        table4.append(disagreement([labels, teachers['convnet'], runs[f'none/seed{seed}']['predictions']['avg'],
                                    student['cls'], student['dist'], student['avg']]).tolist())
    with_teachers: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    for r in runs.values():
        if not r['variant']:
            continue
        for head, p in r['predictions'].items():
            row = with_teachers.setdefault(r['variant'], {}).setdefault(head, {t: [] for t in TEACHERS})
            for t, q in teachers.items():
                row[t].append(disagreement([p, q])[0, 1].item())
    return {'table4_names': reproduce_report.TABLE4_NAMES, 'table4_per_seed': table4, 'with_teachers': with_teachers}

# ============ command line ============


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('reproduce.py', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output_dir', '--output-dir', default='reproduce_out',
                        help='folder of the runs, report.md, results.json and the figures (default: %(default)s)')
    parser.add_argument('--quick', action='store_true',
                        help='one seed, one epoch per run, a quarter of the images: checks the whole '
                             'pipeline in about a minute; its figures mean nothing (default: off)')
    parser.add_argument('--seeds', type=int, default=None,
                        help='seeds per student variant (default: 5, 1 with --quick)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='device of the runs and the analyses (default: cuda when a GPU is present, else cpu; '
                             'here %(default)s)')
    parser.add_argument('--jobs', type=int, default=None,
                        help='runs at a time (default: 1 on a GPU, else the number of CPU cores up to 8); each '
                             'gets --threads threads')
    parser.add_argument('--threads', type=int, default=1,
                        help='CPU threads per run (default: %(default)s: several small runs side by side use the '
                             'cores better than one run with several threads)')
    return parser


def made_by(argv: List[str], seeds: int, args: argparse.Namespace) -> Dict[str, Any]:
    """What made the report: command line, git revision, versions, machine, seeds."""
    device = args.device
    if torch.device(device).type == 'cuda':
        device += f' ({torch.cuda.get_device_name()})'
    return {'command': ' '.join(['python', 'reproduce.py', *argv]), 'git': deit_main.git_revision(),
            'python': platform.python_version(),
            'torch': torch.__version__, 'timm': timm.__version__, 'numpy': np.__version__,
            'machine': f'{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU '
                       f'cores, load average {os.getloadavg()[0]:.1f} at start',
            'device': device, 'jobs': args.jobs, 'threads_per_run': args.threads, 'seeds': list(range(seeds)),
            'started': time.strftime('%Y-%m-%d %H:%M:%S')}


def check_setting(out: Path, name: str, setting: Setting) -> None:
    """Refuse an --output_dir made with another setting: its finished runs would be skipped as if they fit."""
    path = out / 'setting.json'
    stored = json.loads(path.read_text()) if path.exists() else None
    if stored is not None and stored != {'name': name, **asdict(setting)}:
        raise ValueError(f'--output_dir {out} holds runs of another setting ({stored["name"]}, {path}): choose '
                         'another --output_dir')
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'name': name, **asdict(setting)}, indent=2) + '\n')


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        if args.seeds is not None and args.seeds < 1 or args.threads < 1 or (args.jobs or 1) < 1:
            raise ValueError('--seeds, --jobs and --threads must be positive')
        device = torch.device(args.device)
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise ValueError('--device cuda, but no GPU is visible: use --device cpu')
        name = 'quick' if args.quick else 'default'
        setting, seeds = SETTINGS[name], args.seeds or (1 if args.quick else 5)
        args.jobs = args.jobs or (1 if device.type == 'cuda' else min(os.cpu_count() or 1, 8))
        out = Path(args.output_dir)
        check_setting(out, name, setting)
    except ValueError as e:
        parser.exit(EXIT_USER_ERROR, f'{parser.prog}: error: {e}\n')
    made = made_by(argv, seeds, args)
    runs = plan(setting, seeds)
    print(f'{len(runs)} runs ({len(TEACHERS)} teachers, {len(VARIANTS)} student variants x {seeds} seeds), '
          f'{args.jobs} at a time, {args.threads} thread(s) each, into {out / "runs"}', flush=True)
    grid = Grid(runs, setting, out, args.device, args.jobs, args.threads)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: the runs in progress are stopped
    try:
        trained = grid.run()
    except RuntimeError as e:
        parser.exit(EXIT_FAILED, f'{parser.prog}: {e}\n')
    except KeyboardInterrupt:
        parser.exit(EXIT_STOPPED, f'{parser.prog}: stopped; the same command goes on from where the runs stopped\n')
    torch.set_num_threads(args.threads)  # only now: the runs are forked from a process that computed nothing
    measured = analyse_all(grid, device)
    made['finished'] = time.strftime('%Y-%m-%d %H:%M:%S')
    made['runs trained by this command'] = f'{trained} of {len(runs)} (the others by an earlier start of it)'

    description = reproduce_report.describe(setting, DIGITS_SIZES, TEACHERS)
    if args.quick:
        description.insert(0, '--quick: one seed, one epoch per run, a quarter of the images: a check that the '
                              'pipeline runs end to end. Its figures mean nothing.')
    reproduce_report.write(out, made, {'name': name, 'description': description, **asdict(setting)}, measured,
                           agreement(measured))
    print(f'wrote {out / "report.md"}, {out / "results.json"} and the figures in {out}')


if __name__ == '__main__':
    main()

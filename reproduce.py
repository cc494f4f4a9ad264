"""The distillation findings of the paper's section 5 (DeiT, Touvron et al. 2020), at small scale and offline.

    python reproduce.py --probe                  # the probe runs that chose the lengths and the convnet teacher
    python reproduce.py                          # the claims grid, into reproduce_out/
    python reproduce.py --sweep                  # the gain of hard distillation against the training-set size
    python reproduce.py --time-split             # after the grid: where a run's time goes, before and after
    python reproduce.py --quick --output_dir q   # one seed, a few steps per run: checks the pipeline

On the built-in DIGITS data (real 8x8 scans of handwritten digits, upscaled to 32 pixels; reproduce_data.py says
which images train, which choose settings and which test), main.py trains convnet teachers (the probe's choice)
and DeiT-Ti students over several seeds: without distillation (the paper's "none"), distilled soft and hard from
the convnet, hard from a transformer teacher (a plain DeiT-Ti of another seed, as the paper's DeiT-B teacher of
DeiT-B students), and the control with a second class token in place of the distillation token (main.py
--dist-head-on-labels). Each student seed has teachers of its own (teacher_of), so that the claims about teachers
hold over teachers, not over one model of each kind. analyze.py's functions then measure each head's predictions,
the class and distillation tokens, and the agreement with each teacher; reproduce_report.py judges the claims
(verdicts.py) and writes report.md, results.json and the figures.

Each run is `python main.py ...` in a forked child (which spares it the import of torch and timm), its output in
<output_dir>/runs/<run>/stdout.txt. A run whose folder holds done.json is finished and skipped when the script
starts again; an interrupted run resumes from its checkpoint.pth (main.py's own resume). Exit status: 0 done;
1 a run failed; 2 a user error, in one line; 3 stopped (SIGTERM or Ctrl-C), the runs in progress having saved
their state.
"""
import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import timm
import torch
from torch.utils.data import DataLoader

import builders
import main as deit_main
import reproduce_data
import reproduce_report
from analyze import load_model, token_cosines, token_movement, top1_predictions
from datasets import build_dataset
from reproduce_grid import HERE, Grid, Run, finished, read_log, run_main

STUDENT, STUDENT_DISTILLED = 'deit_tiny_patch16_224', 'deit_tiny_distilled_patch16_224'
# The convnet teacher was chosen by the probe among CONVNET_CANDIDATES (tests/test_reproduce.py checks it).
TEACHER_MODELS = {'convnet': 'regnety_002', 'transformer': STUDENT}
# Student variants: model, main.py flags, teacher kind (a key of TEACHER_MODELS) or None.
VARIANTS = {
    'none': (STUDENT, [], None),
    'soft_convnet': (STUDENT_DISTILLED, ['--distillation-type', 'soft'], 'convnet'),
    'hard_convnet': (STUDENT_DISTILLED, ['--distillation-type', 'hard'], 'convnet'),
    'hard_transformer': (STUDENT_DISTILLED, ['--distillation-type', 'hard'], 'transformer'),
    'two_class_tokens': (STUDENT_DISTILLED, ['--dist-head-on-labels'], None),
}
SWEEP_VARIANTS = ('none', 'hard_convnet', 'hard_transformer')
# Seed of the convnet teacher of student seed k: TEACHER_SEED + k (the transformer teachers: see teacher_of). The
# probe runs use seeds of their own too.
TEACHER_SEED, PROBE_SEED = 1000, 2000
HEADS = ('cls', 'dist', 'avg')
EXIT_FAILED, EXIT_USER_ERROR, EXIT_STOPPED = 1, 2, 3

# ============ the probe: what chose the lengths ============

# Fixed before the probe ran. A length is converged when doubling it gains less than PROBE_GAIN points of top-1 on
# the probe split (mean over PROBE_SEEDS seeds); the probe picks the shortest converged length of PROBE_EPOCHS, else
# the longest (and says that convergence was not shown). Each probed model is trained with the students' recipe.
PROBE_EPOCHS = (100, 200, 400)
PROBE_SEEDS = 2
PROBE_GAIN = 1.0
# The convnet teacher: of these candidates (timm names), each at its converged length, the one whose probe top-1 is
# closest to the plain DeiT-Ti's at its own (the transformer teacher's), as the paper compares teachers of similar
# accuracy (RegNetY-8GF 81.7 against DeiT-B 81.8, its Table 2). regnety_002 was probed first, alone; at 100 epochs it
# stood 17 points below DeiT-Ti, and the other two candidates were added then, before any longer run.
CONVNET_CANDIDATES = ('regnety_002', 'resnet18', 'convnext_atto')
PROBE_MODELS = {'student': STUDENT, **{name: name for name in CONVNET_CANDIDATES}}


PROBE_RULE = (f'the shortest of {", ".join(map(str, PROBE_EPOCHS))} epochs whose doubling gains less than '
              f'{PROBE_GAIN:g} point of top-1 on the probe split (mean over {PROBE_SEEDS} seeds), else the longest')
TEACHER_RULE = (f'of {", ".join(CONVNET_CANDIDATES)}, each at its length, the one whose probe top-1 is closest to the '
                'plain DeiT-Ti\'s at its length')
# What chose each setting; tests/test_reproduce.py checks that results/probe chose these values.
CHOSEN_BY = {'student': f'chosen by the probe of a plain DeiT-Ti (results/probe/report.md): {PROBE_RULE}',
             'convnet': f'{TEACHER_MODELS["convnet"]} and its length chosen by the probe (results/probe/report.md): '
                        f'{TEACHER_RULE}; its length by the same rule as the students\''}


@dataclass(frozen=True)
class Setting:
    """What every run of a grid shares; report.md's "Setting" section gives the reasons, and the probe (results/probe)
    chose the lengths. Epochs are those of a run at the training fraction 1/2; at another fraction a run keeps the
    same number of optimizer steps (see epochs_at)."""
    input_size: int = 32           # 8x8 scans x 4: 2x2 patches of 16; main.py's padded-crop path for inputs <= 32
    batch_size: int = 64           # main.py's default
    lr: float = 5e-4               # the paper's per-step lr (its value for a 512 batch), not scaled down by 8
    warmup_epochs: int = 5         # main.py's default
    student_epochs: int = 400      # the probe 'student' (a plain DeiT-Ti); the transformer teachers train as long
    convnet_epochs: int = 400      # the probe 'convnet'
    fraction: float = 0.5          # share of each digit's training scans (the claims grid; --sweep varies it)
    eval_every: int = 10           # main.py --eval-every: the points of the training curves
    quick: bool = False            # a quarter of the test images (--quick)


SETTINGS = {'default': Setting(),
            'quick': Setting(student_epochs=1, convnet_epochs=1, warmup_epochs=1, fraction=0.125, eval_every=2,
                             quick=True)}
# What fits the 3-hour budget of an idle 2-core machine at the probe's lengths (measured: results/reproduce_default,
# Time): a seed of the grid (a convnet teacher and 5 students of 400 epochs) takes 90 minutes of CPU, 45 on 2
# cores, and 3 seeds give 3 teachers of each kind. A seed of --sweep is 4 runs at each of 3 fractions, 60 minutes
# of CPU per fraction (30 on 2 cores): 2 seeds take 3 hours alone, 2 in the grid's folder (its 1/2 runs are the
# grid's). Whether that detects 2 points is for report.md to say: it gives the seeds each headline claim needs at
# its observed spread.
DEFAULT_SEEDS = {'grid': 3, 'sweep': 2, 'probe': PROBE_SEEDS}


def steps_per_epoch(fraction: float, batch_size: int) -> int:
    return len(reproduce_data.split_indices(fraction)['train']) // batch_size


def epochs_at(epochs: int, fraction: float, setting: Setting) -> int:
    """``epochs`` at the fraction 1/2, as epochs at ``fraction`` of the same number of optimizer steps (rounded)."""
    ratio = steps_per_epoch(reproduce_data.POOL_END, setting.batch_size) / steps_per_epoch(fraction, setting.batch_size)
    return max(1, round(epochs * ratio))

# ============ plans ============


def teacher_of(kind: str, seed: int, seeds: int, prefix: str = '') -> str:
    """The run that teaches student seed ``seed`` of ``seeds``: the convnet teacher of that seed; for the
    transformer, the plain DeiT-Ti ('none') of the next seed, cyclically. The paper's transformer teacher is a DeiT
    trained with the students' recipe, which is what that run is, at no extra cost; its seed differs from the
    student's, and it is no student's baseline in the same pair (see reproduce_report's claims)."""
    return f'{prefix}teacher_convnet/seed{seed}' if kind == 'convnet' else f'{prefix}none/seed{(seed + 1) % seeds}'


def plan_grid(setting: Setting, seeds: int, variants: Optional[List[str]] = None,
              fraction: Optional[float] = None, prefix: str = '') -> List[Run]:
    """Seed by seed, its convnet teacher, then its students (each waits for its teacher)."""
    fraction = setting.fraction if fraction is None else fraction
    variants = list(VARIANTS) if variants is None else variants
    if 'hard_transformer' in variants and 'none' not in variants:
        raise ValueError('the transformer teachers are the plain DeiT-Ti runs ("none"): plan them too')
    warmup, epochs = (epochs_at(e, fraction, setting) for e in (setting.warmup_epochs, setting.student_epochs))
    runs = []
    for seed in range(seeds):
        runs.append(Run(f'{prefix}teacher_convnet/seed{seed}', TEACHER_MODELS['convnet'],
                        epochs_at(setting.convnet_epochs, fraction, setting), TEACHER_SEED + seed, [],
                        variant='teacher_convnet', fraction=fraction, warmup_epochs=warmup))
        for variant in variants:
            model, flags, teacher = VARIANTS[variant]
            runs.append(Run(f'{prefix}{variant}/seed{seed}', model, epochs, seed, flags,
                            teacher=teacher and teacher_of(teacher, seed, seeds, prefix), variant=variant,
                            fraction=fraction, warmup_epochs=warmup))
    return runs


def plan_sweep(setting: Setting, seeds: int) -> List[Run]:
    """The grid of SWEEP_VARIANTS at each training fraction, seed by seed across the fractions. At the claims grid's
    fraction the runs are the grid's own (same names, same folder): in the grid's --output_dir they are trained once
    for both."""
    grids = [plan_grid(setting, seeds, list(SWEEP_VARIANTS), fraction,
                       '' if fraction == setting.fraction else f'f{fraction:g}/')
             for fraction in reproduce_data.FRACTIONS]
    per_seed = len(grids[0]) // seeds  # runs per seed of one fraction
    return [run for seed in range(seeds) for grid in grids for run in grid[seed * per_seed:(seed + 1) * per_seed]]


def plan_probe(setting: Setting, seeds: int, kinds: List[str], epochs: int) -> List[Run]:
    """The runs of the probed models ``kinds`` at one length, on the probe split."""
    return [Run(f'probe_{kind}_{epochs}/seed{PROBE_SEED + seed}', PROBE_MODELS[kind], epochs, PROBE_SEED + seed, [],
                variant=f'probe_{kind}', fraction=reproduce_data.POOL_END, warmup_epochs=setting.warmup_epochs)
            for kind in kinds for seed in range(seeds)]


def undecided(job: 'Job', epochs: int) -> List[str]:
    """The probed models whose length the rule cannot choose yet: those not converged at epochs / 4 already (the
    runs of epochs / 2 gained less than PROBE_GAIN over them), for which a run of ``epochs`` can change the choice."""
    kinds = list(PROBE_MODELS)
    if epochs // 4 not in PROBE_EPOCHS:
        return kinds
    choices = probe_results(job)['choices']
    return [kind for kind in kinds if not (choices[kind]['converged'] and choices[kind]['epochs'] <= epochs // 4)]


def choose_teacher(choices: Dict[str, Dict[str, Any]]) -> str:
    """TEACHER_RULE: the convnet candidate whose probe top-1 at its chosen length is closest to the student's (the
    first of CONVNET_CANDIDATES on a tie)."""
    target = choices['student']['means'][choices['student']['epochs']]
    probed = [name for name in CONVNET_CANDIDATES if name in choices]
    return min(probed, key=lambda name: abs(choices[name]['means'][choices[name]['epochs']] - target))


def choose_length(scores: Dict[int, List[float]]) -> Dict[str, Any]:
    """The probe's rule: the shortest length whose doubling gains less than PROBE_GAIN points (mean over seeds).

    Args:
        scores: length in epochs -> the probe top-1 of each seed's run of that length.
    """
    means = {epochs: float(np.mean(s)) for epochs, s in sorted(scores.items())}
    for epochs, mean in means.items():
        if 2 * epochs in means and means[2 * epochs] - mean < PROBE_GAIN:
            return {'epochs': epochs, 'converged': True, 'means': means}
    return {'epochs': max(means), 'converged': False, 'means': means}

def probe_results(job: 'Job') -> Dict[str, Any]:
    """Each probe run's curve on the probe split, and the length the rule chooses for each probed model."""
    runs, scores = [], {}
    for run in job.runs:
        log = read_log(job.out / 'runs' / run.name)
        curve = [line['test_acc1'] for line in log if 'test_acc1' in line]
        runs.append({'name': run.name, 'model': run.model, 'seed': run.seed, 'epochs': run.epochs, 'curve': curve,
                     'final': curve[-1]})
        scores.setdefault(run.variant.removeprefix('probe_'), {}).setdefault(run.epochs, []).append(curve[-1])
    choices = {kind: choose_length(s) for kind, s in scores.items()}
    teacher = choose_teacher(choices) if 'student' in choices and set(CONVNET_CANDIDATES) & set(choices) else None
    return {'rule': PROBE_RULE, 'teacher_rule': TEACHER_RULE, 'runs': runs, 'choices': choices,
            'convnet_teacher': teacher, 'models': PROBE_MODELS}

# ============ measuring the runs ============


def initial_model(run: Run, setting: Setting, nb_classes: int) -> torch.nn.Module:
    """The model of ``run`` as main.py starts training it: seeded with --seed, built before any step
    (tests/test_reproduce.py checks that it equals main.py's)."""
    builders.seed_everything(run.seed)
    return builders.create_model(run.model, setting.input_size, num_classes=nb_classes)


def test_loader(job: 'Job', fraction: float) -> DataLoader:
    """main.py's evaluation loader of a run's test images: eval transform, in order, batch 1.5 x batch size."""
    args = deit_main.get_args_parser().parse_args(['--data-set', 'FOLDER', '--data-path', str(job.data[fraction]),
                                                   '--input-size', str(job.setting.input_size)])
    dataset, _ = build_dataset(is_train=False, args=args)
    return DataLoader(dataset, batch_size=int(1.5 * job.setting.batch_size), shuffle=False, num_workers=0)


def analyse(run: Run, folder: Path, job: 'Job', loader: DataLoader, device: torch.device) -> Dict[str, Any]:
    """The final weights' top-1 prediction of every test image (each head of a distilled student), and a distilled
    student's tokens; cached in analysis.json next to the final checkpoint it was computed from."""
    cache, checkpoint = folder / 'analysis.json', folder / 'checkpoint.pth'
    if cache.exists() and cache.stat().st_mtime >= checkpoint.stat().st_mtime:
        return json.loads(cache.read_text())
    nb_classes = len(loader.dataset.classes)
    model = load_model(str(checkpoint), run.model, job.setting.input_size, nb_classes=nb_classes)
    distilled = run.model == STUDENT_DISTILLED
    result: Dict[str, Any] = {'predictions': {head: top1_predictions(model, loader, device, head).tolist()
                                              for head in (HEADS if distilled else ('avg',))}}
    if distilled:
        result['tokens'] = {**token_cosines(model, loader, device),
                            **token_movement(model, initial_model(run, job.setting, nb_classes))}
    cache.write_text(json.dumps(result) + '\n')
    return result


def measure(job: 'Job', device: torch.device) -> Dict[str, Any]:
    """Every run's record (results.json's 'runs'), and per training fraction the test images' labels and sources."""
    tests, runs, by_name = {}, [], {run.name: run for run in job.runs}
    for fraction in sorted(job.data):
        loader = test_loader(job, fraction)
        tests[fraction] = {'loader': loader, 'labels': [t for _, t in loader.dataset.samples],
                           'is_val': [reproduce_data.is_val_image(p) for p, _ in loader.dataset.samples]}
    for run in job.runs:
        folder = job.out / 'runs' / run.name
        print(f'analysing {run.name}', flush=True)
        test = tests[run.fraction]
        analysis = analyse(run, folder, job, test['loader'], device)
        labels, is_val = np.asarray(test['labels']), np.asarray(test['is_val'])
        final, final_val = {}, {}
        for head, predicted in analysis['predictions'].items():
            hits = np.asarray(predicted) == labels
            final[head], final_val[head] = 100 * hits.mean(), 100 * hits[is_val].mean()
        runs.append({
            'name': run.name, 'variant': run.variant, 'model': run.model, 'seed': run.seed,
            'teacher_seed': by_name[run.teacher].seed if run.teacher else None, 'teacher': run.teacher,
            'fraction': run.fraction, 'train_images': len(reproduce_data.split_indices(run.fraction)['train']),
            'epochs': run.epochs, 'steps': run.epochs * steps_per_epoch(run.fraction, job.setting.batch_size),
            'curve': [[line['epoch'] + 1, line['test_acc1']] for line in read_log(folder) if 'test_acc1' in line],
            'final': final, 'final_val': final_val, 'tokens': analysis.get('tokens'),
            'predictions': analysis['predictions'], 'done': json.loads((folder / 'done.json').read_text())})
    return {'runs': runs, 'tests': {f: {k: v for k, v in t.items() if k != 'loader'} for f, t in tests.items()}}

# ============ where a run's time goes ============

TIME_SPLIT_EPOCHS = 20  # of the run measured by --time-split


def measure_time_split(job: 'Job', device: str, threads: int) -> Dict[str, Any]:
    """--time-split: the first hard-distilled student of the grid, TIME_SPLIT_EPOCHS epochs from scratch, run as
    reproduce.py ran it before (a new interpreter per run, evaluated after every epoch) and as it runs now (a fork
    of this process, evaluated every Setting.eval_every epochs), one after the other; each run's time split by
    reproduce_grid.Timers."""
    student = next(r for r in job.runs if r.variant == 'hard_convnet')
    if not finished(job.out / 'runs' / student.teacher):
        raise ValueError(f'--time-split measures {student.name}, whose teacher {student.teacher} is not trained yet: '
                         'run the grid first')
    splits = {}
    for name, eval_every, fork in (('before', 1, False), ('after', job.setting.eval_every, True)):
        run = replace(student, name=f'time_split/{name}', epochs=TIME_SPLIT_EPOCHS)
        folder = job.out / 'runs' / run.name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        flags = main_flags(run, replace(job.setting, eval_every=eval_every), job.data[run.fraction], job.out, device)
        print(f'--time-split: {name}, {" ".join(flags)}', flush=True)
        if fork:
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                run_main(flags, folder / 'stdout.txt', threads)
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        else:
            code = subprocess.run([sys.executable, str(HERE / 'reproduce_grid.py'), str(time.time()),
                                   str(folder / 'stdout.txt'), str(threads), *flags], cwd=HERE).returncode
        if code != 0:
            raise RuntimeError(f'--time-split: the {name} run exited with status {code}; see {folder / "stdout.txt"}')
        splits[name] = json.loads((folder / 'timing.json').read_text())
    return {'run': student.name, 'epochs': TIME_SPLIT_EPOCHS, 'eval_every': job.setting.eval_every, **splits}

# ============ main.py's command line of a run ============


def main_flags(run: Run, setting: Setting, data: Path, out: Path, device: str) -> List[str]:
    """The command line of main.py for one run: the paper's recipe (main.py's defaults) with this setting."""
    every = epochs_at(setting.eval_every, run.fraction, setting)
    flags = ['--model', run.model, '--data-set', 'FOLDER', '--data-path', str(data),
             '--input-size', str(setting.input_size), '--batch-size', str(setting.batch_size),
             '--epochs', str(run.epochs), '--warmup-epochs', str(run.warmup_epochs), '--unscale-lr',
             '--lr', str(setting.lr), '--seed', str(run.seed), '--device', device, '--num_workers', '0',
             # The curve's points and the checkpoints every eval_every epochs at the fraction 1/2, every as many steps
             # at the others (a checkpoint of DeiT-Ti with its optimizer state is 70 MB); the probe's every epoch.
             *(['--eval-every', str(every), '--checkpoint-every', str(every)] if not run.variant.startswith('probe')
               else []),
             # The EMA's decay (0.99996 per step) leaves it near its start after a few thousand steps; the paper
             # found it of little help (its Table 8): off, and the final weights are evaluated.
             '--no-model-ema', *run.flags, '--output_dir', str(out / 'runs' / run.name)]
    if run.teacher:
        kind = VARIANTS[run.variant][2]
        flags += ['--teacher-model', TEACHER_MODELS[kind],
                  '--teacher-path', str(out / 'runs' / run.teacher / 'checkpoint.pth')]
    return flags

# ============ command line ============


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('reproduce.py', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument('--sweep', action='store_true',
                      help='the gain of hard distillation over none, from each teacher kind, at 1/8, 1/4 and 1/2 of '
                           'the training scans; its report goes to <output_dir>/sweep, and the runs at 1/2 are the '
                           'claims grid\'s, trained once for both (default: off, the claims grid)')
    what.add_argument('--time-split', action='store_true',
                      help=f'after the grid: where a run\'s time goes, {TIME_SPLIT_EPOCHS} epochs of its first '
                           'hard-distilled student run as reproduce.py ran them before and as it runs them now; '
                           'written to time_split.json, which the report\'s Time section shows (default: off)')
    what.add_argument('--probe', action='store_true',
                      help='the probe runs that chose the lengths of the runs, scored on the probe split '
                           '(default: off)')
    parser.add_argument('--output_dir', '--output-dir', default=None,
                        help='folder of the runs, report.md, results.json and the figures (default: reproduce_out, '
                             'reproduce_probe with --probe)')
    parser.add_argument('--quick', action='store_true',
                        help='one seed, 1/8 of the training images, a dozen optimizer steps per run (two epochs with '
                             '--probe) and a quarter of the test images: checks the whole pipeline in about a minute; '
                             'its figures mean nothing (default: off)')
    parser.add_argument('--seeds', type=int, default=None,
                        help=f'student seeds (default: {DEFAULT_SEEDS["grid"]} for the grid, {DEFAULT_SEEDS["sweep"]} '
                             f'for --sweep, {PROBE_SEEDS} for --probe, 1 with --quick)')
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


@dataclass
class Job:
    """One invocation: what it runs, where, and with which data."""
    kind: str                      # 'grid', 'sweep' or 'probe'
    setting_name: str
    setting: Setting
    seeds: int
    out: Path
    runs: List[Run] = field(default_factory=list)
    data: Dict[float, Path] = field(default_factory=dict)  # training fraction -> image folder


def prepare(args: argparse.Namespace) -> Job:
    """Check the flags, write the data folders, plan the runs."""
    if args.seeds is not None and args.seeds < 1 or args.threads < 1 or (args.jobs or 1) < 1:
        raise ValueError('--seeds, --jobs and --threads must be positive')
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda, but no GPU is visible: use --device cpu')
    kind = 'sweep' if args.sweep else 'probe' if args.probe else 'grid'
    name = 'quick' if args.quick else 'default'
    setting = SETTINGS[name]
    seeds = args.seeds or (1 if args.quick else DEFAULT_SEEDS[kind])
    args.jobs = args.jobs or (1 if device.type == 'cuda' else min(os.cpu_count() or 1, 8))
    out = Path(args.output_dir or ('reproduce_probe' if kind == 'probe' else 'reproduce_out'))
    check_setting(out, name, setting)
    job = Job(kind, name, setting, seeds, out)
    if kind == 'probe':
        job.data = {reproduce_data.POOL_END: reproduce_data.probe_folder(out)}
    else:
        job.runs = plan_sweep(setting, seeds) if kind == 'sweep' else plan_grid(setting, seeds)
        fractions = sorted({r.fraction for r in job.runs})
        job.data = {f: reproduce_data.test_folder(out, f, setting.quick) for f in fractions}
    return job


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        job = prepare(args)
    except ValueError as e:
        parser.exit(EXIT_USER_ERROR, f'{parser.prog}: error: {e}\n')
    made = made_by(argv, job.seeds, args)
    planned = 'the probe in stages' if job.kind == 'probe' else f'{len(job.runs)} runs'
    print(f'{planned} ({job.kind}, {job.setting_name} setting, {job.seeds} seed(s)), {args.jobs} at a time, '
          f'{args.threads} thread(s) each, into {job.out / "runs"}', flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: the runs in progress are stopped
    try:
        trained = 0
        # The probe runs its lengths in stages, shortest first: a longer length is trained only where it can still
        # change the choice.
        for stage in PROBE_EPOCHS if job.kind == 'probe' else [None]:
            runs = job.runs if stage is None else plan_probe(job.setting, job.seeds, undecided(job, stage), stage)
            if stage is not None:
                if args.quick:  # two epochs of the shortest length: the pipeline, not a length
                    runs = [] if stage != PROBE_EPOCHS[0] else [
                        Run(r.name, r.model, 2, r.seed, r.flags, variant=r.variant, fraction=r.fraction,
                            warmup_epochs=1) for r in runs]
                job.runs += runs
            grid = Grid(runs, job.out, args.jobs, args.threads,
                        lambda run: main_flags(run, job.setting, job.data[run.fraction], job.out, args.device))
            trained += grid.run()
    except RuntimeError as e:
        parser.exit(EXIT_FAILED, f'{parser.prog}: {e}\n')
    except KeyboardInterrupt:
        parser.exit(EXIT_STOPPED, f'{parser.prog}: stopped; the same command goes on from where the runs stopped\n')
    torch.set_num_threads(args.threads)  # only now: the runs are forked from a process that computed nothing
    made['finished'] = time.strftime('%Y-%m-%d %H:%M:%S')
    made['runs trained by this command'] = f'{trained} of {len(job.runs)} (the others by an earlier start of it)'
    if args.time_split:
        try:
            split = measure_time_split(job, args.device, args.threads)
        except (ValueError, RuntimeError) as e:
            parser.exit(EXIT_FAILED, f'{parser.prog}: {e}\n')
        (job.out / 'time_split.json').write_text(json.dumps(split, indent=2) + '\n')
    reports = job.out / 'sweep' if job.kind == 'sweep' else job.out
    if job.kind == 'probe':
        reproduce_report.write_probe(job.out, made, probe_results(job))
    else:
        setting = {'name': job.setting_name, **asdict(job.setting), 'chosen_by': CHOSEN_BY}
        split = job.out / 'time_split.json'
        measured = {**measure(job, torch.device(args.device)),
                    'probe_images': len(reproduce_data.split_indices(reproduce_data.POOL_END)['probe']),
                    'time_split': json.loads(split.read_text()) if split.exists() else None}
        reports.mkdir(exist_ok=True)
        reproduce_report.write(reports, made, setting, measured, sweep=job.kind == 'sweep')
    print(f'wrote {reports / "report.md"}, {reports / "results.json"} and the figures in {reports}')


if __name__ == '__main__':
    main()

"""reproduce.py: its data split, its rules, `--quick` and `--sweep --quick` end to end as a user runs them, and the
committed results (results/) against the code in the tree."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main as deit_main
import reproduce
import reproduce_data
import reproduce_report
from analyze import token_movement

ROOT = Path(__file__).resolve().parent.parent
PNG = b'\x89PNG\r\n\x1a\n'
RESULTS = ROOT / 'results'
# The files that make the findings: the committed report must have been written by these, as they are in the tree.
REPORT_CODE = ('reproduce.py', 'reproduce_data.py', 'reproduce_grid.py', 'reproduce_report.py', 'reproduce_figures.py',
               'verdicts.py', 'analyze.py')

# ============ the data split and the rules ============


def test_split_parts_are_disjoint_and_the_test_images_never_train():
    parts = reproduce_data.split_indices(0.5)
    assert {k: len(v) for k, v in parts.items()} == {'train': 719, 'probe': 239, 'heldout': 484, 'val': 355}
    train, probe, heldout = ({i for i, _ in parts[k]} for k in ('train', 'probe', 'heldout'))
    assert not train & probe and not train & heldout and not probe & heldout
    assert len(train | probe | heldout) == 1442  # every training scan in exactly one part
    for fraction, size in zip(reproduce_data.FRACTIONS, (177, 357, 719)):
        smaller = reproduce_data.split_indices(fraction)
        assert len(smaller['train']) == size and {i for i, _ in smaller['train']} <= train
        assert smaller['heldout'] == parts['heldout'] and smaller['probe'] == parts['probe']
    with pytest.raises(ValueError, match='training fraction'):
        reproduce_data.split_indices(0.75)  # would train on the probe split


@pytest.mark.parametrize('scores, epochs, converged', [
    ({100: [80.0, 82.0], 200: [81.5, 81.4], 400: [82.0, 82.1]}, 100, True),   # 100 -> 200 gains 0.45
    ({100: [70.0, 72.0], 200: [80.0, 80.0], 400: [80.5, 80.4]}, 200, True),   # 200 -> 400 gains 0.45
    ({100: [70.0, 72.0], 200: [80.0, 80.0], 400: [81.0, 81.0]}, 400, False),  # still +1.0 at 400: not shown
    ({100: [70.0, 70.0], 200: [70.0, 71.98]}, 100, True),                      # +0.99 < 1, at the threshold
    ({100: [70.0, 70.0], 200: [70.0, 72.0]}, 200, False),                      # +1.00 is not less than 1
])
def test_probe_rule_picks_the_shortest_length_whose_doubling_gains_under_a_point(scores, epochs, converged):
    choice = reproduce.choose_length(scores)
    assert (choice['epochs'], choice['converged']) == (epochs, converged)


def test_teacher_rule_picks_the_candidate_closest_to_the_student():
    choices = {'student': {'epochs': 200, 'means': {100: 80.0, 200: 84.0}},
               'regnety_002': {'epochs': 400, 'means': {400: 70.0}}, 'resnet18': {'epochs': 100, 'means': {100: 86.5}},
               'convnext_atto': {'epochs': 200, 'means': {200: 81.5}}}  # 2.5 from the student's 84.0, as resnet18
    assert reproduce.choose_teacher(choices) == 'resnet18'  # the first of the candidates on a tie
    choices['convnext_atto']['means'][200] = 81.6
    assert reproduce.choose_teacher(choices) == 'convnext_atto'


def run_record(curve, final=80.0):
    return {'curve': curve, 'final': {'avg': final}}


def test_convergence_rule_reads_the_mean_curve_over_the_last_fifth_of_the_epochs():
    flat = {0: run_record([[10, 50.0], [80, 79.0], [90, 79.5], [100, 79.9]]),
            1: run_record([[10, 50.0], [80, 80.0], [90, 80.5], [100, 80.9]])}  # +0.9 from epoch 80 on
    rising = {0: run_record([[10, 50.0], [80, 79.0], [100, 80.0]]),
              1: run_record([[10, 50.0], [80, 80.0], [100, 81.0]])}  # +1.0
    found = reproduce_report.convergence({'flat': flat, 'rising': rising})
    assert found['flat']['from_epoch'] == 80 and found['flat']['gain'] == pytest.approx(0.9)
    assert found['flat']['flat'] and not found['rising']['flat']


def test_unstable_runs_are_those_ten_points_below_their_variant_median():
    seeds = {s: run_record([[10, 60.0], [20, a]], a) for s, a in enumerate((80.0, 81.0, 82.0, 70.1, 70.0))}
    found = reproduce_report.unstable({'none': seeds})
    assert [(u['seed'], u['final']) for u in found] == [(4, 70.0)]  # the median is 80: 70.1 is 9.9 below


def test_fresh_model_token_statistics_equal_a_direct_computation_and_have_not_moved():
    model = reproduce.initial_model(reproduce.Run('x/seed3', reproduce.STUDENT_DISTILLED, 1, 3), reproduce.SETTINGS[
        'quick'], nb_classes=10)
    cls, dist = model.cls_token.flatten(), model.dist_token.flatten()
    direct = (cls @ dist / (cls.norm() * dist.norm())).item()
    stats = token_movement(model, model)
    assert stats['cos_init'] == pytest.approx(direct, abs=1e-6) and stats['cos_end'] == stats['cos_init']
    assert stats['moved_cls'] == 0 and stats['moved_dist'] == 0


def test_initial_model_is_the_model_main_py_starts_training(tmp_path, monkeypatch):
    """reproduce.initial_model rebuilds a run's start (for the tokens' cosine at initialisation and how far they
    moved): it must equal the weights main.py holds when its first epoch begins."""
    seen = {}

    class Started(Exception):
        pass

    def first_epoch(model, *args, **kwargs):
        seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        raise Started

    monkeypatch.setattr(deit_main, 'train_one_epoch', first_epoch)
    folder = reproduce_data.test_folder(tmp_path, 0.125, quick=True)
    run = reproduce.Run('two_class_tokens/seed2', reproduce.STUDENT_DISTILLED, 1, 2, ['--dist-head-on-labels'],
                        variant='two_class_tokens', fraction=0.125, warmup_epochs=1)
    flags = reproduce.main_flags(run, reproduce.SETTINGS['quick'], folder, tmp_path, 'cpu')
    with pytest.raises(Started):
        deit_main.main(deit_main.get_args_parser().parse_args(flags))
    rebuilt = reproduce.initial_model(run, reproduce.SETTINGS['quick'], nb_classes=10).state_dict()
    assert seen.keys() == rebuilt.keys()
    assert all(torch.equal(seen[k], rebuilt[k]) for k in seen)

# ============ --quick and --sweep --quick, as a user runs them ============


def quick(out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, 'reproduce.py', '--quick', *flags, '--output_dir', str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope='module')
def grid(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp('reproduce')
    return out, quick(out)


@pytest.fixture(scope='module')
def sweep(grid):
    """--sweep --quick in the grid's folder, as a user runs it after the grid: the grid's runs (at 1/8 with --quick)
    are skipped, the other fractions trained."""
    out, _ = grid
    return out / 'sweep', quick(out, '--sweep')


RUN_KEYS = {'variant', 'seed', 'teacher_seed', 'train_images', 'epochs', 'curve', 'final'}
CLAIM_KEYS = {'claim', 'a', 'b', 'differences', 'margin', 'verdict', 'verdict_holm'}


def test_quick_writes_the_report_and_every_record(grid):
    out, done = grid
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (out / 'report.md').read_text()
    for variant in reproduce.VARIANTS:
        assert f'| {reproduce_report.VARIANT_NAMES[variant]} |' in report, variant
    assert '81.8 (T5)' in report and '| 0.171 | 0.000 | 0.133 |' in report  # the paper's column and Table 4
    results = json.loads((out / 'results.json').read_text())
    assert len(results["runs"]) == 1 + len(reproduce.VARIANTS)  # one teacher run: the transformer teacher is "none"
    for r in results['runs']:
        assert RUN_KEYS <= set(r), r['name']
        assert (r['teacher_seed'] is None) == (reproduce.VARIANTS.get(r['variant'], (0, 0, None))[2] is None)
        assert r['curve'][-1][0] == r['epochs']  # the last epoch is always evaluated
    assert {tuple(r['final']) for r in results['runs'] if r['model'] == reproduce.STUDENT_DISTILLED} == {
        ('cls', 'dist', 'avg')}
    for c in results['claims']:
        assert CLAIM_KEYS <= set(c) and len(c['differences']) == 1, c['claim']
        assert c['verdict'] == c['verdict_holm'] == 'not shown'  # one seed: no interval
    for name in ('accuracy', 'token_cosines', 'disagreement', 'training_curves'):
        assert (out / f'{name}.png').read_bytes().startswith(PNG)
    assert results['made']['seeds'] == [0] and results['made']['command'].startswith('python reproduce.py --quick')


def test_quick_figures_agree_with_what_main_py_measured(grid):
    """Each run's final top-1 on the test images (from its predictions) equals main.py's own evaluation at the
    last epoch (log.txt), and the figure on DIGITS' val scans is the predictions' accuracy on those alone."""
    out, _ = grid
    results = json.loads((out / 'results.json').read_text())
    test = results['tests']['0.125']
    labels, is_val = [int(c) for c in test['labels']], [c == '1' for c in test['is_val']]
    assert 0 < sum(is_val) < len(labels)
    for r in results['runs']:
        logged = json.loads((out / 'runs' / r['name'] / 'log.txt').read_text().splitlines()[-1])['test_acc1']
        assert r['final']['avg'] == pytest.approx(logged, abs=1e-6), r['name']
        hits = [int(p) == t for p, t in zip(r['predictions']['avg'], labels)]
        assert r['final_val']['avg'] == pytest.approx(100 * sum(h for h, v in zip(hits, is_val) if v) / sum(is_val))


def test_started_again_it_skips_every_finished_run(grid):
    out, _ = grid
    logs = {path: path.read_bytes() for path in (out / 'runs').rglob('log.txt')}
    checkpoints = {path: path.stat().st_mtime_ns for path in (out / 'runs').rglob('checkpoint.pth')}
    assert len(logs) == len(checkpoints) == 1 + len(reproduce.VARIANTS)
    again = quick(out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    skipped = [line for line in again.stdout.splitlines()
               if line.startswith("skip run ") and "finished earlier" in line]
    assert len(skipped) == len(logs)
    assert not [line for line in again.stdout.splitlines() if line.startswith('start run ')]
    assert {path: path.read_bytes() for path in logs} == logs
    assert {path: path.stat().st_mtime_ns for path in checkpoints} == checkpoints


def test_sweep_quick_trains_each_fraction_and_writes_the_gain_curve(sweep):
    out, done = sweep
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    skipped = [line for line in done.stdout.splitlines() if line.startswith('skip run ')]
    assert len(skipped) == 4  # the grid's convnet teacher, none, hard_convnet and hard_transformer
    results = json.loads((out / 'results.json').read_text())
    sizes = sorted({r['train_images'] for r in results['runs']})
    assert sizes == [177, 357, 719]
    steps = {r['train_images']: r['epochs'] * (r['train_images'] // 64) for r in results['runs']
             if r['variant'] == 'none'}
    assert max(steps.values()) - min(steps.values()) <= 2  # the same optimizer steps at every size (rounded epochs)
    assert {c['label'] for c in results['claims']} == {'hard (convnet) - none', 'hard (transformer) - none',
                                                       'convnet - transformer teacher'}
    assert len(results['claims']) == 9 and all(CLAIM_KEYS <= set(c) for c in results['claims'])
    assert (out / 'gain_vs_size.png').read_bytes().startswith(PNG)
    assert '## The gains' in (out / 'report.md').read_text()

# ============ the committed results ============


def committed(name: str) -> dict:
    path = RESULTS / name / 'results.json'
    if not path.exists():
        pytest.skip(f'{path} is not committed')
    return json.loads(path.read_text())


def test_the_probe_chose_the_lengths_the_grid_uses():
    probe = committed('probe')
    setting = reproduce.SETTINGS['default']
    assert probe['rule'] == reproduce.PROBE_RULE and probe['teacher_rule'] == reproduce.TEACHER_RULE
    assert probe['choices']['student']['epochs'] == setting.student_epochs
    assert probe['convnet_teacher'] == reproduce.TEACHER_MODELS['convnet']
    assert probe['choices'][probe['convnet_teacher']]['epochs'] == setting.convnet_epochs


@pytest.mark.parametrize('name', ['reproduce_default', 'reproduce_default/sweep'])
def test_committed_report_was_written_by_the_code_in_the_tree(name):
    made = committed(name)['made']
    revision = made['git']
    assert 'uncommitted' not in revision, revision
    changed = subprocess.run(['git', 'diff', '--stat', revision, '--', *REPORT_CODE], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    assert changed == '', f'{name} was written at {revision}; these files changed since:\n{changed}'


def readme_findings() -> str:
    readme = (ROOT / 'README.md').read_text()
    start = readme.index('## The paper\'s findings at small scale')
    return readme[start:readme.index('\n## ', start + 1)]


def test_every_figure_of_the_readme_findings_tables_is_in_the_committed_reports():
    reports = ''.join((RESULTS / name / 'report.md').read_text() for name in ('reproduce_default',
                                                                               'reproduce_default/sweep')
                      if (RESULTS / name / 'report.md').exists())
    if not reports:
        pytest.skip('no committed report')
    rows = [line for line in readme_findings().splitlines() if line.startswith('|') and not line.startswith('|---')]
    cells = [cell.strip() for row in rows[1:] for cell in row.strip('|').split('|')]
    figures = [c for c in cells if any(ch.isdigit() for ch in c)]
    assert figures
    missing = [c for c in figures if c not in reports]
    assert not missing, missing


def test_each_student_has_teachers_of_its_own_and_never_its_baseline_as_teacher():
    runs = {r.name: r for r in reproduce.plan_grid(reproduce.SETTINGS['default'], 4)}
    for seed in range(4):
        convnet, transformer = (runs[f'hard_{kind}/seed{seed}'].teacher for kind in ('convnet', 'transformer'))
        assert convnet == f'teacher_convnet/seed{seed}' and runs[convnet].seed == reproduce.TEACHER_SEED + seed
        assert transformer == f'none/seed{(seed + 1) % 4}' != f'none/seed{seed}'
        assert runs[transformer].epochs == runs[f'none/seed{seed}'].epochs  # the students' length
    teachers = [runs[f'hard_transformer/seed{seed}'].teacher for seed in range(4)]
    assert len(set(teachers)) == 4  # one teacher per student seed

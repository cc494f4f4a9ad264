"""reproduce.py as a user runs it: `--quick` end to end, then started again, when every run is skipped."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from reproduce import VARIANTS
from reproduce_report import VARIANT_NAMES, verdict

ROOT = Path(__file__).resolve().parent.parent
PNG = b'\x89PNG\r\n\x1a\n'


def quick(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, 'reproduce.py', '--quick', '--output_dir', str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope='module')
def first(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp('reproduce')
    return out, quick(out)


def final_log_line(folder: Path) -> dict:
    return json.loads((folder / 'log.txt').read_text().splitlines()[-1])


def test_quick_writes_the_report_with_every_variant(first):
    out, done = first
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (out / 'report.md').read_text()
    for variant in VARIANTS:
        assert f'| {VARIANT_NAMES[variant]} |' in report, variant
    assert '81.8 (T5)' in report and '| 0.171 | 0.000 | 0.133 |' in report  # the paper's column and Table 4
    results = json.loads((out / 'results.json').read_text())
    assert set(results['summary']['accuracy']) == set(VARIANTS)
    for name in ('accuracy', 'token_cosines', 'disagreement', 'training_curves'):
        assert (out / f'{name}.png').read_bytes().startswith(PNG)
    assert results['made']['seeds'] == [0] and results['made']['command'].startswith('python reproduce.py --quick')


def test_quick_figures_agree_with_what_main_py_measured(first):
    """The analyses' top-1 of the averaged heads equals main.py's own evaluation at the last epoch (log.txt), and
    Table 4's ground-truth row is one minus each classifier's accuracy."""
    out, _ = first
    results = json.loads((out / 'results.json').read_text())
    for variant in VARIANTS:
        logged = final_log_line(out / 'runs' / variant / 'seed0')['test_acc1']
        assert results['summary']['accuracy'][variant]['avg']['mean'] == pytest.approx(logged, abs=1e-6), variant
    for teacher in ('convnet', 'transformer'):
        logged = final_log_line(out / 'runs' / f'teacher_{teacher}')['test_acc1']
        assert results['summary']['teachers'][teacher]['acc1'] == pytest.approx(logged, abs=1e-6)
    ground_truth = results['summary']['table4']['mean'][0]
    hard = results['summary']['accuracy']['hard_convnet']
    accuracies = [results['summary']['teachers']['convnet']['acc1'], results['summary']['accuracy']['none']['avg'][
        'mean'], hard['cls']['mean'], hard['dist']['mean'], hard['avg']['mean']]
    assert ground_truth == pytest.approx([0.0] + [1 - a / 100 for a in accuracies], abs=1e-9)


def test_started_again_it_skips_every_finished_run(first):
    out, _ = first
    logs = {path: path.read_bytes() for path in (out / 'runs').rglob('log.txt')}
    checkpoints = {path: path.stat().st_mtime_ns for path in (out / 'runs').rglob('checkpoint.pth')}
    assert len(logs) == len(checkpoints) == 2 + len(VARIANTS)
    again = quick(out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    skipped = [line for line in again.stdout.splitlines()
               if line.startswith("skip run ") and "finished earlier" in line]
    assert len(skipped) == len(logs)
    assert not [line for line in again.stdout.splitlines() if line.startswith('start run ')]
    assert {path: path.read_bytes() for path in logs} == logs
    assert {path: path.stat().st_mtime_ns for path in checkpoints} == checkpoints


@pytest.mark.parametrize('diffs, kind, expected', [
    ([1.0, 1.2, 0.8, 1.1, 0.9], '>', 'holds'),                     # mean 1.0, SE 0.071
    ([0.3, -0.2, 0.4, -0.1, 0.1], '>', 'not shown (within 2 SE)'),  # mean 0.1, SE 0.12
    ([-1.0, -1.2, -0.8, -1.1, -0.9], '>', 'reversed'),
    ([0.3, -0.2, 0.4, -0.1, 0.1], '<=', 'holds'),                   # not better by more than 2 SE
    ([1.0, 1.2, 0.8, 1.1, 0.9], '<=', 'does not hold (better by more than 2 SE)'),
])
def test_verdict_is_the_sign_of_the_mean_paired_difference_beyond_two_standard_errors(diffs, kind, expected):
    assert verdict(diffs, kind) == expected


def test_one_seed_gives_no_verdict():
    assert verdict([0.5], '>').startswith('one seed: no verdict')

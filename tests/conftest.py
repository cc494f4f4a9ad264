"""Shared fixtures: a small folder of real JPEG files in the ImageNet layout, one torch thread per module, and
the README's quick start running beside the suite."""
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

# Class name -> (train images, val images). Val counts all different, 11 in all: an odd number, so that
# two processes evaluating it need DistributedSampler padding.
FOLDER_CLASSES = {'ant': (40, 4), 'bee': (40, 5), 'cat': (40, 2)}


def write_image_folder(root: Path, classes: dict, size: int = 32, seed: int = 0) -> Path:
    """``root/{train,val}/<class>/<i>.jpg``: each class a dominant colour channel with noise, so it can be learned."""
    rng = np.random.RandomState(seed)
    for label, (name, counts) in enumerate(classes.items()):
        for split, count in zip(('train', 'val'), counts):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.randint(0, 120, (size, size, 3))
                pixels[..., label % 3] += 120
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f'{i}.jpg', quality=90)
    return root


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes (ant, bee, cat) of 32x32 JPEGs: 40 train images each, 4 / 5 / 2 val images."""
    return write_image_folder(tmp_path_factory.mktemp('folder'), FOLDER_CLASSES)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TORCH_HOME with its hub cache folder, for this test and the processes it starts."""
    home = tmp_path / 'torch_home'
    (home / 'hub' / 'checkpoints').mkdir(parents=True)
    monkeypatch.setenv('TORCH_HOME', str(home))
    return home



@pytest.fixture(scope='module')
def one_thread():
    """One intra-op thread for a module whose runs train in the test process (``main.cli``): these models are
    too small to gain from more, and on a small shared machine two threads that wait on each other make every
    step several times slower. Modules use it through ``pytestmark = pytest.mark.usefixtures('one_thread')``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ROOT = Path(__file__).resolve().parents[1]
QUICK_START_TEST = 'test_quick_start_learns_the_digits'


def readme_quick_start() -> List[str]:
    """The flags of the README's quick-start command (without --output_dir), read from the README itself so
    that the two cannot drift apart."""
    readme = (ROOT / 'README.md').read_text()
    line = next(line for line in readme.splitlines() if 'python main.py' in line and '--data-set DIGITS' in line)
    args = line.split('python main.py', 1)[1].split()
    return args[:args.index('--output_dir')]


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    """The quick-start test goes last: by then its run, started with the session, has trained the longest."""
    items.sort(key=lambda item: item.name == QUICK_START_TEST)


@pytest.fixture(scope='session', autouse=True)
def quick_start(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Optional[Tuple[subprocess.Popen, Path, Path]]]:
    """The README's quick start (30 epochs, the longest test by far), started when the session starts so that
    it trains on one core while the rest of the suite, one thread per process, uses the other; the test
    QUICK_START_TEST waits for it. Returns (process, output folder, file of its stdout and stderr), or None when
    that test is not selected."""
    if not any(item.name == QUICK_START_TEST for item in request.session.items):
        yield None
        return
    folder = tmp_path_factory.mktemp('quickstart')
    out, log = folder / 'quickstart', folder / 'output.txt'
    with log.open('w') as f:
        command = [sys.executable, str(ROOT / 'main.py'), *readme_quick_start(), '--output_dir', str(out)]
        proc = subprocess.Popen(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, 'OMP_NUM_THREADS': '1'})
    yield proc, out, log
    if proc.poll() is None:  # the session ended before the test waited for it (-x, Ctrl-C)
        proc.kill()
        proc.wait()

"""Shared fixtures: a small folder of real JPEG files in the ImageNet layout, one torch thread per module."""
from pathlib import Path

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

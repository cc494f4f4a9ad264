"""The data of reproduce.py: DIGITS' images split, once and for all, into training, probe and test images.

DIGITS (datasets.DigitsDataset) has 1,442 training and 355 validation scans. reproduce.py splits the training scans
of each digit, in scikit-learn's order (the scans of digit d numbered r = 0 .. n_d - 1, n_d about 144):

- r < n_d / 2: the training pool. A run at training fraction f (at most 1/2) trains on the scans r < f * n_d:
  719 images at 1/2, 357 at 1/4, 177 at 1/8.
- n_d / 2 <= r < 2 n_d / 3: the probe split (239 images). Every setting reproduce.py uses (the lengths of the runs,
  the teachers) was chosen by probe runs trained on the pool and scored here, never on a test image.
- r >= 2 n_d / 3: held out (484 images). No run trains on them and no choice looks at them: they join DIGITS' 355
  validation scans as test images (839 in all). The report gives both figures, on the 355 and on the 839.

The split needs no random generator, so it is the same on every machine. Each split is written once as an image
folder of PNG files of the very pixels DigitsDataset serves, so that main.py trains on it through its FOLDER
dataset without any change; the file names say where each image comes from (``val-0012.png``, ``heldout-0007.png``,
``train-0003.png``, ``probe-0101.png``: the part and the index in DigitsDataset's split).
"""
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from datasets import DigitsDataset

POOL_END, PROBE_END = 1 / 2, 2 / 3  # of each digit's training scans: the pool, then the probe split, then held out
FRACTIONS = (1 / 8, 1 / 4, 1 / 2)   # training fractions of the sweep (the claims grid trains at 1/2)


def _ranks(targets: np.ndarray, digit: int) -> np.ndarray:
    """The indices of ``digit``'s scans in the split, in scikit-learn's order."""
    return np.flatnonzero(targets == digit)


def split_indices(fraction: float) -> Dict[str, List[Tuple[int, int]]]:
    """(index in DigitsDataset's split, label) of each image of the parts: 'train' (the first ``fraction`` of
    each digit's training scans), 'probe', 'heldout' (of the training split), 'val' (DigitsDataset's 355)."""
    if not 0 < fraction <= POOL_END:
        raise ValueError(f'a training fraction must be in (0, {POOL_END:g}], the pool; got {fraction:g}')
    train_targets = np.asarray(DigitsDataset(train=True).targets)
    parts: Dict[str, List[Tuple[int, int]]] = {'train': [], 'probe': [], 'heldout': []}
    for digit in range(10):
        members = _ranks(train_targets, digit)
        n = len(members)
        bounds = {'train': (0, int(fraction * n)), 'probe': (int(POOL_END * n), int(PROBE_END * n)),
                  'heldout': (int(PROBE_END * n), n)}
        for part, (start, end) in bounds.items():
            parts[part] += [(int(i), digit) for i in members[start:end]]
    parts['val'] = [(i, t) for i, t in enumerate(DigitsDataset(train=False).targets)]
    return parts


Image = Tuple[str, int, int]  # (part of split_indices, index in DigitsDataset's split, label)


def write_folder(root: Path, train: List[Image], val: List[Image]) -> Path:
    """An image folder ``root/{train,val}/<digit>/<part>-<index>.png``; written once (``root/complete`` marks a
    finished folder). The part 'val' is DigitsDataset's validation split, the others its training split."""
    if (root / 'complete').exists():
        return root
    datasets = {True: DigitsDataset(train=True), False: DigitsDataset(train=False)}
    for split, images in (('train', train), ('val', val)):
        for digit in range(10):
            (root / split / str(digit)).mkdir(parents=True, exist_ok=True)
        for part, index, label in images:
            image, target = datasets[part != 'val'][index]
            if target != label:
                raise RuntimeError(f'DIGITS {part} image {index} has label {target}, expected {label}')
            image.save(root / split / str(label) / f'{part}-{index:04d}.png')
    (root / 'complete').write_text('')
    return root


def _images(parts: Dict[str, List[Tuple[int, int]]], *names: str) -> List[Image]:
    return [(name, i, t) for name in names for i, t in parts[name]]


def probe_folder(out: Path) -> Path:
    """Train on the pool's 1/2, validate on the probe split: the data of the probe runs."""
    parts = split_indices(POOL_END)
    return write_folder(out / 'data' / 'probe', _images(parts, 'train'), _images(parts, 'probe'))


def test_folder(out: Path, fraction: float, quick: bool = False) -> Path:
    """Train on ``fraction`` of each digit's scans, test on the 355 val scans and the 484 held-out ones.

    ``quick`` keeps a quarter of the test images of each source (the pipeline check of --quick)."""
    parts = split_indices(fraction)
    test = _images(parts, 'val', 'heldout')
    return write_folder(out / 'data' / f'digits_{fraction:g}{"_quick" if quick else ""}', _images(parts, 'train'),
                        test[::4] if quick else test)


def is_val_image(path: str) -> bool:
    """Whether a test image of test_folder is one of DIGITS' 355 validation scans (else a held-out one)."""
    return Path(path).name.startswith('val-')

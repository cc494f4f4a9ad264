"""Datasets and transforms: ``build_dataset(is_train, args) -> (dataset, nb_classes)``.

``--data-set`` choices (every dataset exposes ``.classes``, the class names in label order):

- ``IMNET``, ``FOLDER``: an image folder, ``<data-path>/train/<class>/*.jpg`` and
  ``<data-path>/val/<class>/*.jpg``, with any number of classes (``nb_classes`` is read from the folder;
  train and val must hold the same class folders). ``IMNET`` is ImageNet in this layout.
- ``CIFAR`` (CIFAR-100, as the original) and ``CIFAR10``: torchvision's files under ``<data-path>``.
- ``INAT`` (2018) and ``INAT19``: the iNaturalist archives as published, ``train{year}.json``,
  ``val{year}.json`` and ``categories.json`` next to the image folder the JSON file names point into
  (or the original DeiT code's layout of it, without the supercategory folders);
  ``--inat-category`` picks the label level (``name``, ``genus``, ..., ``kingdom``).
- ``DIGITS``: built in and offline. scikit-learn's copy of the UCI handwritten digits: 1,797 real scans of
  the digits 0-9, stored as 8x8 images of 17 levels (ink pixels per 4x4 block of the 32x32 scan),
  rendered as RGB PIL images so that the usual transforms apply. The split is fixed and needs no random
  generator: in scikit-learn's order, the k-th scan of each digit goes to val when k % 5 == 4, else to
  train, which gives 1,442 train and 355 val images (``DIGITS_SIZES``), every digit in both in the same
  4:1 proportion.

Unreadable image files (``IMNET``, ``FOLDER``, ``INAT*``) raise ``CorruptImageError`` naming the file.
With ``args.skip_corrupt`` such a file is skipped: the dataset returns the next readable sample instead
and marks the file, and ``corrupt_count(dataset)`` / ``corrupt_files(dataset)`` report the files skipped
so far (``corrupt_count_all``: over all processes). The marks live in shared memory, so the files found
by DataLoader workers are seen by the main process.

Importing this module also fixes timm's RandAugment posterize for Pillow >= 13 (see ``_posterize``).
"""
import json
import os
import random
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageFilter
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data import auto_augment as timm_auto_augment
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_interp_mode
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

DATA_SETS = ('IMNET', 'CIFAR', 'CIFAR10', 'INAT', 'INAT19', 'FOLDER', 'DIGITS')
INAT_CATEGORIES = ('kingdom', 'phylum', 'class', 'order', 'supercategory', 'family', 'genus', 'name')
DIGITS_SIZES = {'train': 1442, 'val': 355}

# ============ the posterize fix ============

_timm_posterize = timm_auto_augment.posterize


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize op, with 0 bits giving the black image that Pillow < 13 returned.

    timm's increasing posterize maps the top RandAugment magnitude to 0 bits kept, which the default recipe
    (rand-m9-mstd0.5-inc1, magnitude drawn around 9 and clipped at 10) asks for about once in 700 images.
    Pillow before 13 masked every pixel with ~(2**8 - 1), i.e. returned black; Pillow 13 raises
    "bits must be between or equal to 1 and 8" and the run dies. Returning black keeps the op exactly as
    the paper's recipe was trained with, on any Pillow.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return _timm_posterize(img, bits_to_keep, **kwargs)


def _patch_timm_posterize() -> None:
    # timm's AugmentOp looks its function up in NAME_TO_OP when it is built, so the table is the place to fix
    for name, op in timm_auto_augment.NAME_TO_OP.items():
        if op is _timm_posterize:
            timm_auto_augment.NAME_TO_OP[name] = _posterize


_patch_timm_posterize()

# ============ transforms ============


def build_eval_transform(input_size: int, eval_crop_ratio: float = 0.875) -> transforms.Compose:
    """The evaluation transform (also predict.py's): bicubic resize, center crop, ImageNet normalisation.

    Inputs above 32 pixels are resized to ``int(input_size / eval_crop_ratio)`` on the shorter side (256 for
    224) and center-cropped. Small inputs (CIFAR at 32) are evaluated whole as in the original, but resized
    on the shorter side to ``input_size`` first: a no-op on 32x32 images that gives non-square ones the
    same tensor size (the original crashes on them when batching).
    """
    if not 0 < eval_crop_ratio <= 1:
        raise ValueError(f'--eval-crop-ratio must be in (0, 1], got {eval_crop_ratio}')
    resize = int(input_size / eval_crop_ratio) if input_size > 32 else input_size
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def _simple_random_crop(input_size: int, interpolation: str, padding_mode: str) -> transforms.Compose:
    """Resize the shorter side to ``input_size``, then a random crop of it padded by 4 pixels."""
    return transforms.Compose([
        transforms.Resize(input_size, interpolation=str_to_interp_mode(interpolation)),
        transforms.RandomCrop(input_size, padding=4, padding_mode=padding_mode),
    ])


class GaussianBlur:
    """PIL Gaussian blur with a radius drawn uniformly in [radius_min, radius_max] (DeiT III's 3-Augment)."""

    def __init__(self, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


def three_augment_transform(input_size: int, color_jitter: Optional[float], src: bool) -> transforms.Compose:
    """DeiT III's 3-Augment: crop and flip, then one of grayscale / solarization / Gaussian blur, color jitter.

    Args:
        input_size: output side.
        color_jitter: brightness, contrast and saturation factor; None or 0 disables the jitter.
        src: simple random crop (resize, 4-pixel reflect-padded random crop) instead of RandomResizedCrop.
    """
    crop = (_simple_random_crop(input_size, 'bicubic', 'reflect') if src
            else RandomResizedCropAndInterpolation(input_size, scale=(0.08, 1.0), interpolation='bicubic'))
    tfl = [
        crop,
        transforms.RandomHorizontalFlip(),
        transforms.RandomChoice([
            transforms.Grayscale(num_output_channels=3),
            transforms.RandomSolarize(threshold=128, p=1.0),
            GaussianBlur(),
        ]),
    ]
    if color_jitter:
        tfl.append(transforms.ColorJitter(color_jitter, color_jitter, color_jitter))
    tfl += [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return transforms.Compose(tfl)


def build_transform(is_train: bool, args: Any) -> Callable:
    """The training transform of the recipe, or the evaluation transform.

    Training: timm's create_transform (RandAugment ``--aa``, random erasing, ``--train-interpolation``;
    timm turns color jitter off while RandAugment is on, as it did for the paper). Inputs <= 32 pixels
    replace the RandomResizedCrop by a 4-pixel padded random crop, as the original does for CIFAR;
    ``--src`` does the same at any size with reflect padding. ``--ThreeAugment`` replaces the whole
    pipeline by DeiT III's 3-Augment (no RandAugment, no random erasing), as the original's main.py does.
    """
    if not is_train:
        return build_eval_transform(args.input_size, args.eval_crop_ratio)
    if args.ThreeAugment:
        return three_augment_transform(args.input_size, args.color_jitter, args.src)
    aa = None if args.aa in (None, '', 'none', 'None') else args.aa
    transform = create_transform(
        input_size=args.input_size,
        is_training=True,
        color_jitter=args.color_jitter,
        auto_augment=aa,
        interpolation=args.train_interpolation,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
    )
    if args.src or args.input_size <= 32:
        # 'random' picks an interpolation per image inside timm's crop; a plain Resize needs one mode
        interpolation = 'bicubic' if args.train_interpolation == 'random' else args.train_interpolation
        transform.transforms[0] = _simple_random_crop(args.input_size, interpolation,
                                                      'reflect' if args.src else 'constant')
    return transform

# ============ image files ============


class CorruptImageError(OSError):
    """An image file that cannot be read; the message names the file."""


def load_image(path: str) -> Image.Image:
    """Read an image file as RGB, or raise CorruptImageError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert('RGB')
    except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for missing, truncated or garbled files
        raise CorruptImageError(f'cannot read image {path} ({e}); replace or remove the file, '
                                'or pass --skip-corrupt to skip unreadable images') from e


class ImageFileDataset(Dataset):
    """Labelled image files: the base of the folder and iNaturalist datasets.

    Args:
        samples: (path, label) pairs.
        classes: class names, index = label.
        transform: applied to the RGB PIL image.
        skip_corrupt: return the next readable sample instead of raising on an unreadable file.
    """

    def __init__(self, samples: List[Tuple[str, int]], classes: List[str], transform: Optional[Callable] = None,
                 skip_corrupt: bool = False) -> None:
        self.samples = samples
        self.targets = [target for _, target in samples]
        self.classes = classes
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        # one flag per file in shared memory: DataLoader workers (fork or spawn, torch shares the storage)
        # mark what they skip and the main process reads the marks between epochs
        self.corrupt = torch.zeros(len(samples), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> Tuple[Any, int]:
        path, target = self.samples[index]
        img = load_image(path)
        return (self.transform(img) if self.transform is not None else img), target

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        if not self.skip_corrupt:
            return self._load(index)
        n = len(self.samples)
        for offset in range(n):
            i = (index + offset) % n
            if self.corrupt[i]:
                continue
            try:
                return self._load(i)
            except CorruptImageError as e:
                self.corrupt[i] = True
                warnings.warn(f'skipping unreadable image {self.samples[i][0]} ({e.__cause__})', stacklevel=1)
        raise CorruptImageError(f'no readable image among the {n} files of this dataset')


def corrupt_files(dataset: Dataset) -> List[str]:
    """Paths of the unreadable files skipped so far by this process and its DataLoader workers."""
    flags = getattr(dataset, 'corrupt', None)
    if flags is None:  # in-memory datasets (CIFAR, DIGITS) have no files to fail
        return []
    return [dataset.samples[i][0] for i in torch.nonzero(flags).flatten().tolist()]


def corrupt_count(dataset: Dataset) -> int:
    """Number of distinct unreadable files skipped so far (``--skip-corrupt``), in this process.

    Cumulative over epochs: a file is tried once and then always skipped. Under torch.distributed each rank
    counts the files it met; the same file can be met by several ranks.
    """
    flags = getattr(dataset, 'corrupt', None)
    return 0 if flags is None else int(flags.sum())


def corrupt_count_all(dataset: Dataset) -> int:
    """corrupt_count over all processes of a torch.distributed run: the distinct files that any of them skipped
    so far, a file met by several processes counted once. A collective call, made by every process."""
    files = corrupt_files(dataset)
    if not (dist.is_available() and dist.is_initialized()):
        return len(files)
    gathered: List[Optional[List[str]]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, files)
    return len(set().union(*gathered))


def report_skipped(dataset_train: Optional[Dataset], dataset_val: Dataset) -> Dict[str, int]:
    """--skip-corrupt: print how many unreadable image files were skipped so far, over all processes, and return
    the counts as log.txt keys. Cumulative over epochs: a file is tried once, then always skipped."""
    counts = {'train_skipped_images': corrupt_count_all(dataset_train)} if dataset_train is not None else {}
    counts['test_skipped_images'] = corrupt_count_all(dataset_val)
    print('Unreadable images skipped so far (--skip-corrupt): '
          + ', '.join(f'{n} in {"training" if k.startswith("train") else "evaluation"}' for k, n in counts.items()))
    return counts


def image_folder(root: str, transform: Optional[Callable] = None, skip_corrupt: bool = False) -> ImageFileDataset:
    """One split of an image folder, ``root/<class>/<image>``; classes sorted by folder name."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f'{root} is not a folder: the folder datasets expect '
                                '<data-path>/train/<class>/<image> and <data-path>/val/<class>/<image>')
    try:
        classes, class_to_idx = find_classes(root)
    except FileNotFoundError:
        raise FileNotFoundError(f'{root} holds no class folder: put the images of each class in '
                                f'{os.path.join(root, "<class>")}/') from None
    samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    found = {target for _, target in samples}
    empty = [name for name in classes if class_to_idx[name] not in found]
    if empty:
        raise FileNotFoundError(f'class folders of {root} without any image ({", ".join(IMG_EXTENSIONS)}): '
                                f'{", ".join(empty[:10])}{" ..." if len(empty) > 10 else ""}; add images to them '
                                'or remove them')
    return ImageFileDataset(samples, classes, transform, skip_corrupt)


def build_image_folder(data_path: str, is_train: bool, transform: Optional[Callable],
                       skip_corrupt: bool) -> ImageFileDataset:
    """The train or val split of ``data_path``; the val split must have the train split's classes."""
    dataset = image_folder(os.path.join(data_path, 'train' if is_train else 'val'), transform, skip_corrupt)
    train_root = os.path.join(data_path, 'train')
    if not is_train and os.path.isdir(train_root):  # an eval-only copy may hold val/ alone
        train_classes, _ = find_classes(train_root)
        if train_classes != dataset.classes:
            only_train = sorted(set(train_classes) - set(dataset.classes))
            only_val = sorted(set(dataset.classes) - set(train_classes))
            raise ValueError(f'the class folders of {train_root} and {os.path.join(data_path, "val")} differ '
                             f'(only in train: {only_train[:10]}, only in val: {only_val[:10]}); '
                             'labels are folder indices, so both splits need the same class folders')
    return dataset


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} not found: the iNaturalist datasets expect train{{year}}.json, '
                                'val{year}.json and categories.json in --data-path')
    with open(path) as f:
        return json.load(f)


class INatDataset(ImageFileDataset):
    """iNaturalist 2018 / 2019 from its JSON annotations, labelled at one taxonomic level.

    Labels are numbered in order of first appearance in the training annotations, as in the original, so
    that a model trained with it keeps its label order; the val split uses the train numbering.

    Args:
        root: folder with ``train{year}.json``, ``val{year}.json``, ``categories.json``; image paths are
            the JSON ``file_name`` entries relative to it, or the same without their supercategory
            folder, where the original DeiT code read them (whichever holds the first image).
        train: train or val split.
        year: 2018 or 2019.
        category: label level, one of INAT_CATEGORIES.
    """

    def __init__(self, root: str, train: bool = True, year: int = 2018, category: str = 'name',
                 transform: Optional[Callable] = None, skip_corrupt: bool = False) -> None:
        if category not in INAT_CATEGORIES:
            raise ValueError(f'--inat-category {category!r} is not one of {", ".join(INAT_CATEGORIES)}')
        level = {c['id']: c[category] for c in _read_json(os.path.join(root, 'categories.json'))}
        train_data = _read_json(os.path.join(root, f'train{year}.json'))
        classes = list(dict.fromkeys(level[a['category_id']] for a in train_data['annotations']))
        class_to_idx = {name: i for i, name in enumerate(classes)}
        data = train_data if train else _read_json(os.path.join(root, f'val{year}.json'))
        image_category = {a['image_id']: a['category_id'] for a in data['annotations']}
        samples = []
        for image in data['images']:
            name = level[image_category[image['id']]]
            if name not in class_to_idx:
                raise ValueError(f'{image["file_name"]} has {category} {name!r}, absent from train{year}.json')
            samples.append((image['file_name'], class_to_idx[name]))
        split = f'{"train" if train else "val"}{year}'
        original = bool(samples) and _inat_original_layout(root, samples[0][0], split)
        samples = [(os.path.join(root, _without_supercategory(f) if original else f), t) for f, t in samples]
        super().__init__(samples, [str(c) for c in classes], transform, skip_corrupt)


def _without_supercategory(file_name: str) -> str:
    """Where the original DeiT code read a JSON ``file_name``: parts 0, 2 and 3 of it.

    ``train_val2018/Plantae/7477/abc.jpg`` becomes ``train_val2018/7477/abc.jpg``; a name of another
    shape is kept.
    """
    parts = file_name.split('/')
    return '/'.join((parts[0], parts[2], parts[3])) if len(parts) == 4 else file_name


def _inat_original_layout(root: str, file_name: str, split: str) -> bool:
    """Whether the images lie as the original DeiT code read them (no supercategory folder) rather than as
    published, judged by the split's first image; prints which layout was found.

    Raises:
        FileNotFoundError: the image is in neither place; the message names both paths.
    """
    published = os.path.join(root, file_name)
    original = os.path.join(root, _without_supercategory(file_name))
    if os.path.isfile(published):
        print(f'iNaturalist {split}: images as published, at the JSON file_name paths in {root}')
        return False
    if original != published and os.path.isfile(original):
        print(f'iNaturalist {split}: images in the original DeiT layout, without the supercategory folder, in {root}')
        return True
    where = f'{published} (as published)' + (f' nor at {original} (the original DeiT layout)'
                                             if original != published else '')
    raise FileNotFoundError(f'iNaturalist {split}: no image at {where}; --data-path must hold the folder '
                            f'that the file_name entries of {split}.json point into')
# ============ in-memory datasets ============


class DigitsDataset(Dataset):
    """scikit-learn's UCI handwritten digits (8x8, levels 0..16) as RGB PIL images; the module's split."""

    def __init__(self, train: bool = True, transform: Optional[Callable] = None) -> None:
        from sklearn.datasets import load_digits  # only this dataset needs scikit-learn

        digits = load_digits()
        rank_in_class = np.empty(len(digits.target), dtype=np.int64)
        for digit in np.unique(digits.target):
            members = np.flatnonzero(digits.target == digit)
            rank_in_class[members] = np.arange(len(members))
        keep = (rank_in_class % 5 != 4) if train else (rank_in_class % 5 == 4)
        self.images = np.round(digits.images[keep] * (255 / 16)).astype(np.uint8)  # ink 0..16 -> grey 0..255
        self.targets = digits.target[keep].tolist()
        self.classes = [str(d) for d in digits.target_names]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img = Image.fromarray(self.images[index]).convert('RGB')
        return (self.transform(img) if self.transform is not None else img), self.targets[index]


def _cifar(cls: type, root: str, train: bool, transform: Callable) -> Dataset:
    try:
        return cls(root, train=train, transform=transform, download=False)
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
        raise FileNotFoundError(
            f'{cls.__name__} files not found in {root} (expected {os.path.join(root, cls.base_folder)}); '
            f'download them once with: python -c "import torchvision; torchvision.datasets.{cls.__name__}'
            f'(\'{root}\', download=True)", or extract the python version from '
            'https://www.cs.toronto.edu/~kriz/cifar.html into --data-path') from e

# ============ build_dataset ============


def build_dataset(is_train: bool, args: Any) -> Tuple[Dataset, int]:
    """The train or val dataset of ``args.data_set`` with its transform, and its number of classes.

    Uses args.data_set, data_path, inat_category, skip_corrupt and what build_transform reads.
    """
    transform = build_transform(is_train, args)
    if args.data_set == 'CIFAR':
        dataset = _cifar(tv_datasets.CIFAR100, args.data_path, is_train, transform)
    elif args.data_set == 'CIFAR10':
        dataset = _cifar(tv_datasets.CIFAR10, args.data_path, is_train, transform)
    elif args.data_set in ('IMNET', 'FOLDER'):
        dataset = build_image_folder(args.data_path, is_train, transform, args.skip_corrupt)
    elif args.data_set in ('INAT', 'INAT19'):
        year = 2018 if args.data_set == 'INAT' else 2019
        dataset = INatDataset(args.data_path, train=is_train, year=year, category=args.inat_category,
                              transform=transform, skip_corrupt=args.skip_corrupt)
    elif args.data_set == 'DIGITS':
        dataset = DigitsDataset(train=is_train, transform=transform)
    else:
        raise ValueError(f'unknown --data-set {args.data_set!r}; choose one of {", ".join(DATA_SETS)}')
    return dataset, len(dataset.classes)


"""datasets.py: image folders, iNaturalist, the built-in DIGITS set, transforms, corrupt files, posterize."""
import argparse
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import NAME_TO_OP, AugmentOp, RandAugment
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader
from torchvision import transforms

import datasets

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def recipe_args(**overrides):
    """main.py's defaults for the arguments datasets.py reads (the paper's recipe)."""
    args = dict(data_set='FOLDER', data_path='', input_size=224, inat_category='name', color_jitter=0.3,
                aa='rand-m9-mstd0.5-inc1', train_interpolation='bicubic', reprob=0.25, remode='pixel', recount=1,
                eval_crop_ratio=0.875, ThreeAugment=False, src=False, skip_corrupt=False)
    args.update(overrides)
    return argparse.Namespace(**args)


def to_uint8(x):
    """Undo the normalisation: [3, H, W] tensor -> [H, W, 3] array in 0..255."""
    return (x * STD + MEAN).mul(255).round().clamp(0, 255).permute(1, 2, 0).numpy()


def texture(w, h, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def is_padded_window(out, img, size, padding_mode):
    """True if tensor `out` is a size x size window of `img` padded by 4 (or of its mirror image)."""
    padded = np.pad(np.asarray(img), ((4, 4), (4, 4), (0, 0)), mode=padding_mode)
    got = to_uint8(out)
    for arr in (padded, padded[:, ::-1]):
        for top in range(arr.shape[0] - size + 1):
            for left in range(arr.shape[1] - size + 1):
                if np.abs(got - arr[top:top + size, left:left + size]).max() <= 1:
                    return True
    return False


# ============ image folders ============

GREY = {'ant': 40, 'bee': 128, 'cat': 215}  # each class a flat grey level, so labels can be read off pixels
FILES = [  # (name, mode, (width, height)): several sizes and the four common modes, real JPEG and PNG files
    ('a.jpg', 'RGB', (40, 30)), ('b.jpg', 'L', (17, 50)), ('c.png', 'RGBA', (64, 48)),
    ('d.png', 'P', (20, 33)), ('e.JPEG', 'RGB', (300, 200)),
]


@pytest.fixture(scope='module')
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('folder')
    for split in ('train', 'val'):
        for cls, grey in GREY.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for name, mode, size in FILES:
                img = Image.new('RGB', size, (grey, grey, grey))
                if mode == 'RGBA':
                    img = img.convert('RGBA')
                    img.putalpha(100)
                else:
                    img = img.convert(mode)
                img.save(folder / name)
            (folder / 'notes.txt').write_text('not an image')
    return root


@pytest.mark.parametrize('data_set', ['IMNET', 'FOLDER'])
def test_image_folder_shapes_labels_and_classes(image_root, data_set):
    for is_train in (True, False):
        for size in (32, 48):
            args = recipe_args(data_set=data_set, data_path=str(image_root), input_size=size)
            dataset, nb_classes = datasets.build_dataset(is_train, args)
            assert nb_classes == 3 and dataset.classes == ['ant', 'bee', 'cat']
            assert len(dataset) == 3 * len(FILES)  # notes.txt is not an image
            for path, target in dataset.samples:
                assert path.split('/')[-2] == dataset.classes[target]
            images, targets = next(iter(DataLoader(dataset, batch_size=len(dataset))))
            assert images.shape == (len(dataset), 3, size, size)
            if not is_train:  # the eval transform keeps the grey level: the label must match the pixels
                levels = torch.tensor(list(GREY.values()), dtype=torch.float)
                for image, target in zip(images, targets):
                    grey = torch.from_numpy(to_uint8(image)).float().mean()
                    assert (levels - grey).abs().argmin() == target


def test_image_folder_errors(image_root, tmp_path):
    with pytest.raises(FileNotFoundError, match='train'):
        datasets.build_dataset(True, recipe_args(data_path=str(tmp_path)))
    (tmp_path / 'train' / 'ant').mkdir(parents=True)
    (tmp_path / 'val' / 'bee').mkdir(parents=True)
    for split, cls in (('train', 'ant'), ('val', 'bee')):
        Image.new('RGB', (8, 8)).save(tmp_path / split / cls / 'x.png')
    with pytest.raises(ValueError, match=r"only in train: \['ant'\], only in val: \['bee'\]"):
        datasets.build_dataset(False, recipe_args(data_path=str(tmp_path)))
    with pytest.raises(ValueError, match='DIGITS'):
        datasets.build_dataset(True, recipe_args(data_set='MNIST'))


def test_cifar_without_files_says_how_to_get_them(tmp_path):
    for data_set, cls in (('CIFAR', 'CIFAR100'), ('CIFAR10', 'CIFAR10')):
        with pytest.raises(FileNotFoundError, match=f'torchvision.datasets.{cls}.*download=True'):
            datasets.build_dataset(True, recipe_args(data_set=data_set, data_path=str(tmp_path), input_size=32))


# ============ transforms ============

def test_eval_transform_gives_equal_sizes_for_small_non_square_images():
    transform = datasets.build_eval_transform(32, 0.875)
    for w, h in ((50, 20), (20, 50), (8, 8), (33, 31), (32, 32), (500, 375)):
        assert transform(texture(w, h)).shape == (3, 32, 32)
    # a 32x32 image (CIFAR) is evaluated whole, as in the original: only converted and normalised
    img = texture(32, 32)
    expected = transforms.functional.normalize(transforms.functional.to_tensor(img), IMAGENET_DEFAULT_MEAN,
                                               IMAGENET_DEFAULT_STD)
    assert torch.equal(transform(img), expected)


def test_eval_crop_ratio():
    # 256x256, white inside a 16-pixel black frame: resize to 224 / 0.875 = 256 then a 224 center crop
    # removes exactly the frame; ratio 1.0 resizes the whole image to 224 and keeps it
    arr = np.zeros((256, 256, 3), dtype=np.uint8)
    arr[16:240, 16:240] = 255
    img = Image.fromarray(arr)
    cropped = to_uint8(datasets.build_eval_transform(224, 0.875)(img))
    assert cropped.shape == (224, 224, 3) and cropped.min() == 255
    whole = to_uint8(datasets.build_eval_transform(224, 1.0)(img))
    assert whole[0, 0].max() == 0 and whole[112, 112].min() == 255
    with pytest.raises(ValueError, match='eval-crop-ratio'):
        datasets.build_eval_transform(224, 0.0)


def test_small_inputs_train_with_a_padded_random_crop():
    args = recipe_args(input_size=32, aa='none', reprob=0.0, color_jitter=0.0)
    transform = datasets.build_transform(True, args)
    img = texture(32, 32, seed=1)
    torch.manual_seed(0)
    outs = [transform(img) for _ in range(20)]
    assert all(is_padded_window(out, img, 32, 'constant') for out in outs)
    assert len({out.sum().item() for out in outs}) > 1  # the crop moves
    assert transform(texture(20, 50)).shape == transform(texture(50, 20)).shape == (3, 32, 32)
    # the full recipe at the paper's size still goes through timm's RandomResizedCrop
    assert datasets.build_transform(True, recipe_args()).__call__(texture(300, 200)).shape == (3, 224, 224)


def test_src_replaces_random_resized_crop_by_a_simple_random_crop():
    img = texture(48, 48, seed=2)
    torch.manual_seed(0)
    plain = dict(input_size=48, aa='none', reprob=0.0, color_jitter=0.0)
    src = datasets.build_transform(True, recipe_args(src=True, **plain))
    assert all(is_padded_window(src(img), img, 48, 'reflect') for _ in range(10))
    rrc = datasets.build_transform(True, recipe_args(**plain))
    assert not all(is_padded_window(rrc(img), img, 48, 'reflect') for _ in range(10))


def test_three_augment():
    args = recipe_args(input_size=32, ThreeAugment=True)
    transform = datasets.build_transform(True, args)
    # DeiT III's recipe replaces RandAugment and random erasing
    assert not any(isinstance(t, (RandAugment, RandomErasing)) for t in transform.transforms)
    choice = next(t for t in transform.transforms if isinstance(t, transforms.RandomChoice))
    gray, solarize, blur = choice.transforms
    img = texture(40, 40, seed=3)
    arr = np.asarray(img).astype(int)
    out = np.asarray(gray(img)).astype(int)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert (np.asarray(solarize(img)) == np.where(arr >= 128, 255 - arr, arr)).all()
    random.seed(0)
    assert np.asarray(blur(img)).astype(float).std() < arr.std() * 0.9
    # one of the three per image: about a third of the outputs of a colourful image are grey
    random.seed(0)
    torch.manual_seed(0)
    grey = 0
    for _ in range(90):
        x = to_uint8(transform(img)).astype(int)
        grey += int(np.abs(x[..., 0] - x[..., 1]).max() <= 1 and np.abs(x[..., 1] - x[..., 2]).max() <= 1)
    assert 15 <= grey <= 45
    src = datasets.build_transform(True, recipe_args(input_size=32, ThreeAugment=True, src=True))
    crop = src.transforms[0].transforms[1]
    assert isinstance(crop, transforms.RandomCrop) and crop.padding_mode == 'reflect'


def test_zero_bit_posterize_is_a_black_image():
    img = texture(16, 12)
    for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
        black = NAME_TO_OP[name](img, 0)
        assert black.mode == img.mode and black.size == img.size and not np.asarray(black).any()
        # other bit counts are Pillow's posterize: keep the top 4 bits
        assert (np.asarray(NAME_TO_OP[name](img, 4)) == np.asarray(img) & 0xF0).all()
    # through timm's op: the top magnitude of the increasing variant asks for 0 bits
    op = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)
    assert not np.asarray(op(img)).any()
    assert (np.asarray(ImageOps.posterize(img, 8)) == np.asarray(img)).all()


def test_default_train_transform_survives_20000_draws():
    # tiny images keep this fast; RandAugment (where the 0-bit posterize comes from) is the same at any size
    transform = datasets.build_transform(True, recipe_args(input_size=16))
    rand_augment = next(t for t in transform.transforms if isinstance(t, RandAugment))
    zero_bits = []
    for op in rand_augment.ops:
        if op.name.startswith('Posterize'):
            fn = op.aug_fn

            def spy(img, bits, fn=fn, **kwargs):
                zero_bits.append(bits <= 0)
                return fn(img, bits, **kwargs)
            op.aug_fn = spy
    img = texture(16, 16, seed=4)
    random.seed(0)
    torch.manual_seed(0)
    for _ in range(20_000):
        out = transform(img)
    assert out.shape == (3, 16, 16)
    assert sum(zero_bits) >= 5  # the draws did hit the case that Pillow 13 rejects (about 1 in 700 images)


# ============ iNaturalist ============

CATEGORIES = [  # the iNat categories.json fields this code reads, ids 0..3
    dict(id=0, name='Apis mellifera', genus='Apis', kingdom='Animalia', supercategory='Insecta'),
    dict(id=1, name='Quercus robur', genus='Quercus', kingdom='Plantae', supercategory='Plantae'),
    dict(id=2, name='Bombus terrestris', genus='Bombus', kingdom='Animalia', supercategory='Insecta'),
    dict(id=3, name='Quercus alba', genus='Quercus', kingdom='Plantae', supercategory='Plantae'),
]


def write_inat(root, year, split, category_ids, layout='published'):
    """The JSON files as published; the images at their file_name, or where the original DeiT code read
    them (``layout='original'``: file_name without its supercategory folder)."""
    images, annotations = [], []
    for i, cid in enumerate(category_ids):
        cat = CATEGORIES[cid]
        file_name = f'train_val{year}/{cat["supercategory"]}/{cid}/{split}{i}.jpg'
        image_path = root / (file_name if layout == 'published' else f'train_val{year}/{cid}/{split}{i}.jpg')
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (24 + i, 20), (cid * 60, 0, 0)).save(image_path)
        images.append(dict(id=1000 * (split == 'val') + i, file_name=file_name))
        annotations.append(dict(image_id=images[-1]['id'], category_id=cid))
    (root / f'{split}{year}.json').write_text(json.dumps(dict(images=images, annotations=annotations)))


@pytest.mark.parametrize('layout', ['published', 'original'])
@pytest.mark.parametrize('data_set,year', [('INAT', 2018), ('INAT19', 2019)])
def test_inat_layout_at_two_category_levels(tmp_path, data_set, year, layout, capsys):
    (tmp_path / 'categories.json').write_text(json.dumps(CATEGORIES))
    train_ids, val_ids = [2, 1, 2, 0, 3, 1], [3, 0, 2]
    write_inat(tmp_path, year, 'train', train_ids, layout)
    write_inat(tmp_path, year, 'val', val_ids, layout)
    expected = {  # class order = first appearance in the training annotations, as the original numbers them
        'name': ['Bombus terrestris', 'Quercus robur', 'Apis mellifera', 'Quercus alba'],
        'kingdom': ['Animalia', 'Plantae'],
    }
    for level, classes in expected.items():
        for is_train, ids in ((True, train_ids), (False, val_ids)):
            args = recipe_args(data_set=data_set, data_path=str(tmp_path), inat_category=level, input_size=32)
            dataset, nb_classes = datasets.build_dataset(is_train, args)
            assert dataset.classes == classes and nb_classes == len(classes)
            assert [classes[t] for t in dataset.targets] == [CATEGORIES[c][level] for c in ids]
            assert all(os.path.isfile(path) for path, _ in dataset.samples)
            image, target = dataset[0]
            assert image.shape == (3, 32, 32) and target == dataset.targets[0]
            found = {'published': 'images as published', 'original': 'images in the original DeiT layout'}[layout]
            assert found in capsys.readouterr().out
    with pytest.raises(ValueError, match='inat-category'):
        datasets.build_dataset(True, recipe_args(data_set=data_set, data_path=str(tmp_path), inat_category='x'))
    # The first image in neither place: one line naming both paths tried.
    (tmp_path / dataset.samples[0][0]).unlink()
    with pytest.raises(FileNotFoundError) as e:
        datasets.build_dataset(False, recipe_args(data_set=data_set, data_path=str(tmp_path)))
    published = tmp_path / f'train_val{year}/Plantae/3/val0.jpg'
    original = tmp_path / f'train_val{year}/3/val0.jpg'
    assert f'no image at {published} (as published) nor at {original}' in str(e.value) and '\n' not in str(e.value)


# ============ DIGITS ============

def test_digits_split_sizes_classes_and_real_pixels():
    from sklearn.datasets import load_digits

    train = datasets.DigitsDataset(train=True)
    val = datasets.DigitsDataset(train=False)
    assert (len(train), len(val)) == (1442, 355) == (datasets.DIGITS_SIZES['train'], datasets.DIGITS_SIZES['val'])
    assert train.classes == val.classes == [str(d) for d in range(10)]
    # stratified 4:1 and a partition of the 1,797 scans
    per_class = np.bincount(load_digits().target)
    assert (np.bincount(val.targets) == per_class // 5).all()
    assert (np.bincount(train.targets) + np.bincount(val.targets) == per_class).all()
    image, target = val[0]
    assert image.mode == 'RGB' and image.size == (8, 8)
    # real scans: train centroids on raw pixels classify val far above chance (10%) and above 80%
    x_train = np.stack([np.asarray(train[i][0])[..., 0] for i in range(len(train))]).reshape(len(train), -1)
    x_val = np.stack([np.asarray(val[i][0])[..., 0] for i in range(len(val))]).reshape(len(val), -1)
    y_train, y_val = np.array(train.targets), np.array(val.targets)
    centroids = np.stack([x_train[y_train == d].mean(0) for d in range(10)])
    predicted = ((x_val[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == y_val).mean() > 0.8


def test_digits_through_build_dataset():
    for is_train in (True, False):
        dataset, nb_classes = datasets.build_dataset(is_train, recipe_args(data_set='DIGITS', input_size=32))
        assert nb_classes == 10 and len(dataset) == datasets.DIGITS_SIZES['train' if is_train else 'val']
        images, _ = next(iter(DataLoader(dataset, batch_size=16)))
        assert images.shape == (16, 3, 32, 32)
    grey = to_uint8(dataset[0][0])
    assert (grey[..., 0] == grey[..., 1]).all() and grey.std() > 20


# ============ unreadable files ============

@pytest.fixture
def corrupt_root(tmp_path):
    for cls in ('a', 'b'):
        (tmp_path / 'train' / cls).mkdir(parents=True)
    texture(20, 20).save(tmp_path / 'train' / 'a' / '1.jpg')
    (tmp_path / 'train' / 'a' / '2.jpg').write_bytes(b'not an image at all')
    texture(20, 20).save(tmp_path / 'train' / 'a' / '3.png')
    texture(64, 64).save(tmp_path / 'train' / 'b' / '1.jpg')
    whole = (tmp_path / 'train' / 'b' / '1.jpg').read_bytes()
    (tmp_path / 'train' / 'b' / '2.jpg').write_bytes(whole[:len(whole) // 2])  # a truncated real JPEG
    return tmp_path


def test_corrupt_file_is_a_clear_error_by_default(corrupt_root):
    dataset, _ = datasets.build_dataset(True, recipe_args(data_path=str(corrupt_root), input_size=16))
    bad = [i for i, (path, _) in enumerate(dataset.samples) if path.endswith('2.jpg')]
    for i in bad:
        with pytest.raises(datasets.CorruptImageError, match='--skip-corrupt') as err:
            dataset[i]
        assert dataset.samples[i][0] in str(err.value) and isinstance(err.value, OSError)


def test_corrupt_files_are_skipped_and_counted_across_workers(corrupt_root):
    args = recipe_args(data_path=str(corrupt_root), input_size=16, skip_corrupt=True)
    dataset, _ = datasets.build_dataset(True, args)
    loader = DataLoader(dataset, batch_size=1, num_workers=2)
    targets = [target.item() for _, target in loader]  # the main process itself never opens a file
    readable = [t for path, t in dataset.samples if not path.endswith('2.jpg')]
    assert len(targets) == len(dataset) == 5 and set(targets) <= set(readable)
    assert datasets.corrupt_count(dataset) == 2
    assert sorted(datasets.corrupt_files(dataset)) == sorted(p for p, _ in dataset.samples if p.endswith('2.jpg'))
    digits, _ = datasets.build_dataset(True, recipe_args(data_set='DIGITS', input_size=16))
    assert datasets.corrupt_count(digits) == 0

"""predict.py: the seed's single-image walkthrough as one command, checked against a direct computation."""
import json
import os
import re
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import timm
import torch
import torchvision.transforms as T
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo

import datasets
import main
import models  # noqa: F401  (registers the DeiT names in timm)
import predict
import utils

REPO = Path(__file__).resolve().parents[1]
# The two photographs scikit-learn ships (sklearn.datasets.load_sample_images reads these files).
PHOTOS = [str(files('sklearn.datasets.images') / name) for name in ('china.jpg', 'flower.jpg')]
# One line of the seed's output: "Prediction index 0: tabby                    , score: 0.567".
LINE = re.compile(r'^Prediction index (\d+): (.{25,}), score: (\d\.\d{3})$')


def seed_transform(input_size: int = 224, crop_ratio: float = 0.875) -> T.Compose:
    """The walkthrough's preprocessing, written out: resize 256 bicubic, center crop 224, ImageNet mean/std."""
    return T.Compose([
        T.Resize(int(input_size / crop_ratio), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(input_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def direct_topk(model: torch.nn.Module, path: str, k: int = 5, transform=None):
    """The walkthrough's computation: transform, forward, softmax, topk."""
    transform = transform or seed_transform()
    with torch.no_grad():
        image = transform(Image.open(path).convert('RGB')).unsqueeze(0)
        scores = torch.softmax(model.eval()(image), dim=-1)[0]
    return torch.topk(scores, k)


def first_lemma(index: int) -> str:
    return ImageNetInfo().index_to_description(index).split(', ')[0]


def random_weights(name: str, seed: int = 0) -> dict:
    """A state_dict of ``name`` whose classifier is scaled up so that the softmax is far from uniform."""
    torch.manual_seed(seed)
    state_dict = timm.create_model(name).state_dict()
    for key in ('head.weight', 'head_dist.weight'):
        if key in state_dict:
            state_dict[key] = state_dict[key] * 30
    return state_dict


def run_predict(*argv: str, torch_home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TORCH_HOME=str(torch_home))
    return subprocess.run([sys.executable, 'predict.py', *argv, '--device', 'cpu'], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def parse_blocks(stdout: str) -> dict:
    """{image path: [(rank, name, score), ...]} from the text output with '==> path <==' headers."""
    blocks, current = {}, None
    for line in stdout.splitlines():
        if line.startswith('==> ') and line.endswith(' <=='):
            current = blocks.setdefault(line[4:-4], [])
        elif line:
            match = LINE.match(line)
            assert match, f'line not in the seed format: {line!r}'
            current.append((int(match[1]), match[2].rstrip(), float(match[3])))
    return blocks


@pytest.fixture(scope='module')
def hub_tiny(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds deit_tiny weights under the official file name; returns (home, model)."""
    home = tmp_path_factory.mktemp('torch_home')
    (home / 'hub' / 'checkpoints').mkdir(parents=True)
    state_dict = random_weights('deit_tiny_patch16_224')
    torch.save({'model': state_dict}, home / 'hub' / 'checkpoints' / 'deit_tiny_patch16_224-a1311bcf.pth')
    model = timm.create_model('deit_tiny_patch16_224')
    model.load_state_dict(state_dict)
    return home, model.eval()


def test_class_names_are_the_seeds_imagenet_names():
    names = predict.class_names(1000)
    # The seed's printed example (its imagenet_classes.txt) at the ImageNet indices of these classes.
    assert [names[i] for i in (281, 282, 761, 285, 487)] == [
        'tabby', 'tiger cat', 'remote control', 'Egyptian cat', 'cellular telephone']
    assert names[0] == 'tench' and names[999] == 'toilet tissue'
    # An ImageNet folder checkpoint stores WordNet ids: shown by name. Other counts: stored names, else indices.
    assert predict.class_names(1000, ImageNetInfo().label_names()) == names
    assert predict.class_names(3, ['cat', 'dog', 'bird']) == ['cat', 'dog', 'bird']
    assert predict.class_names(3) == ['0', '1', '2']


def test_hub_weights_top5_equal_direct_computation(hub_tiny):
    home, model = hub_tiny
    result = run_predict(*PHOTOS, '--model', 'deit_tiny_patch16_224', torch_home=home)
    assert result.returncode == 0, result.stderr
    blocks = parse_blocks(result.stdout)
    assert list(blocks) == PHOTOS
    for path in PHOTOS:
        scores, indices = direct_topk(model, path)
        assert scores[0] > 0.05  # far from uniform (1/1000): the comparison below can tell classes apart
        expected = [(rank, first_lemma(int(i)), round(float(s), 3)) for rank, (s, i) in enumerate(zip(scores, indices))]
        assert blocks[path] == expected


def test_single_image_prints_no_header_and_json_gives_full_precision(hub_tiny, capsys, monkeypatch):
    home, model = hub_tiny
    monkeypatch.setenv('TORCH_HOME', str(home))
    argv = [PHOTOS[0], '--model', 'deit_tiny_patch16_224', '--device', 'cpu', '--topk', '3']
    assert predict.main(predict.get_args_parser().parse_args(argv)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(LINE.match(line) for line in lines)

    assert predict.main(predict.get_args_parser().parse_args(argv + ['--json'])) == 0
    (result,) = json.loads(capsys.readouterr().out)
    scores, indices = direct_topk(model, PHOTOS[0], k=3)
    assert result['image'] == PHOTOS[0]
    assert [p['index'] for p in result['predictions']] == indices.tolist()
    assert [p['name'] for p in result['predictions']] == [first_lemma(i) for i in indices.tolist()]
    torch.testing.assert_close(torch.tensor([p['score'] for p in result['predictions']]), scores)


def test_unreadable_image_among_several(hub_tiny, tmp_path, capsys, monkeypatch):
    home, _ = hub_tiny
    monkeypatch.setenv('TORCH_HOME', str(home))
    broken = tmp_path / 'broken.jpg'
    broken.write_bytes(Path(PHOTOS[0]).read_bytes()[:3000])  # a truncated JPEG: the header reads, the pixels do not
    argv = [PHOTOS[0], str(broken), PHOTOS[1], '--model', 'deit_tiny_patch16_224', '--device', 'cpu']
    assert predict.main(predict.get_args_parser().parse_args(argv)) != 0
    captured = capsys.readouterr()
    assert str(broken) in captured.err and 'Traceback' not in captured.err
    blocks = parse_blocks(captured.out)
    assert list(blocks) == PHOTOS and all(len(lines) == 5 for lines in blocks.values())


def test_eval_head_of_distilled_checkpoint(tmp_path, capsys):
    state_dict = random_weights('deit_tiny_distilled_patch16_224', seed=1)
    checkpoint = tmp_path / 'official.pth'
    torch.save({'model': state_dict}, checkpoint)
    model = timm.create_model('deit_tiny_distilled_patch16_224').eval()
    model.load_state_dict(state_dict)
    with torch.no_grad():
        image = seed_transform()(Image.open(PHOTOS[1]).convert('RGB')).unsqueeze(0)
        tokens = model.forward_features(image)  # [1, N + 2, D]: class token, distillation token, patches
        logits = {'cls': model.head(tokens[:, 0]), 'dist': model.head_dist(tokens[:, 1])}
    logits['avg'] = (logits['cls'] + logits['dist']) / 2
    for head, head_logits in logits.items():
        argv = [PHOTOS[1], '--checkpoint', str(checkpoint), '--model', 'deit_tiny_distilled_patch16_224',
                '--device', 'cpu', '--json', '--head', head]
        assert predict.main(predict.get_args_parser().parse_args(argv)) == 0
        (result,) = json.loads(capsys.readouterr().out)
        scores, indices = torch.topk(torch.softmax(head_logits, dim=-1)[0], 5)
        assert [p['index'] for p in result['predictions']] == indices.tolist(), head
        torch.testing.assert_close(torch.tensor([p['score'] for p in result['predictions']]), scores)

    # A plain model has no distillation head: a one-line error, no traceback.
    torch.save({'model': random_weights('deit_tiny_patch16_224')}, checkpoint)
    argv = [PHOTOS[1], '--checkpoint', str(checkpoint), '--model', 'deit_tiny_patch16_224', '--head', 'dist']
    assert predict.main(predict.get_args_parser().parse_args(argv)) == 2
    assert 'no distillation' in capsys.readouterr().err


def test_checkpoint_written_by_main_prints_its_class_names(tmp_path, capsys):
    out = tmp_path / 'out'
    main.cli(['--data-set', 'DIGITS', '--model', 'deit_tiny_patch16_224', '--input-size', '16', '--epochs', '1',
              '--batch-size', '256', '--device', 'cpu', '--num_workers', '0', '--output_dir', str(out)])
    capsys.readouterr()
    checkpoint = torch.load(out / 'checkpoint.pth', map_location='cpu', weights_only=True)
    assert len(checkpoint['classes']) == 10 and 'model_ema' in checkpoint

    # The EMA weights at the training size (16), with main.py's evaluation transform.
    model = timm.create_model('deit_tiny_patch16_224', img_size=16, num_classes=10).eval()
    model.load_state_dict(checkpoint['model_ema'])
    transform = datasets.build_eval_transform(16)

    argv = [*PHOTOS, '--checkpoint', str(out / 'checkpoint.pth'), '--device', 'cpu']
    assert predict.main(predict.get_args_parser().parse_args(argv)) == 0
    blocks = parse_blocks(capsys.readouterr().out)
    for path in PHOTOS:
        scores, indices = direct_topk(model, path, transform=transform)
        expected = [(rank, checkpoint['classes'][i], round(float(s), 3))
                    for rank, (s, i) in enumerate(zip(scores, indices.tolist()))]
        assert blocks[path] == expected

    # DIGITS names its classes '0'..'9', as the index fallback would: renamed, the names must follow, and
    # with 'model' changed the printed scores must still be the EMA weights'.
    checkpoint['classes'] = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine']
    checkpoint['model'] = {k: torch.zeros_like(v) for k, v in checkpoint['model'].items()}
    torch.save(checkpoint, tmp_path / 'renamed.pth')
    argv = [PHOTOS[0], '--checkpoint', str(tmp_path / 'renamed.pth'), '--device', 'cpu', '--json']
    assert predict.main(predict.get_args_parser().parse_args(argv)) == 0
    (result,) = json.loads(capsys.readouterr().out)
    scores, indices = direct_topk(model, PHOTOS[0], transform=transform)
    assert [p['name'] for p in result['predictions']] == [checkpoint['classes'][i] for i in indices.tolist()]
    torch.testing.assert_close(torch.tensor([p['score'] for p in result['predictions']]), scores)


def test_user_errors_are_one_line_messages(tmp_path, capsys):
    for argv, message in [
        (['--checkpoint', str(tmp_path / 'missing.pth')], 'missing.pth: no such file'),
        (['--model', 'resnet50'], "Unknown model 'resnet50'"),
        (['--topk', '0'], '--topk must be at least 1'),
    ]:
        assert predict.main(predict.get_args_parser().parse_args([PHOTOS[0], '--device', 'cpu', *argv])) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_missing_image_is_refused_before_any_weights_are_loaded(tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError('weights were loaded (downloaded) before the images were checked')

    monkeypatch.setattr(utils, 'load_checkpoint', no_load)
    missing = tmp_path / 'missing.jpg'
    argv = [PHOTOS[0], str(missing), '--model', 'deit_tiny_patch16_224', '--device', 'cpu']
    assert predict.main(predict.get_args_parser().parse_args(argv)) == 2
    assert capsys.readouterr().err == f'predict.py: error: no such image file: {missing}\n'

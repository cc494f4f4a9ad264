"""analyze.py: each analysis checked against main.py's own evaluation or a direct computation written here.

One tiny distilled DeiT is trained once for the module by main.py (hard distillation from a random plain DeiT,
so that the two heads learn different things) on the 32x32 image folder of conftest.py.
"""
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import analyze
import builders
import datasets
import main
import models  # noqa: F401  (registers the DeiT names in timm)

REPO = Path(__file__).resolve().parents[1]
STUDENT, PLAIN = 'deit_tiny_distilled_patch16_224', 'deit_tiny_patch16_224'
ACC_LINE = re.compile(r'^\* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss', re.MULTILINE)


def data_flags(folder: Path, batch_size: int = 4) -> list:
    # --batch-size 4: evaluation batches of 6, so the 11 validation images take two batches
    return ['--data-set', 'FOLDER', '--data-path', str(folder), '--input-size', '32', '--num_workers', '0',
            '--device', 'cpu', '--batch-size', str(batch_size)]


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def run(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A random plain DeiT (the teacher, also the non-distilled model of the error cases) and a student that
    main.py trained for two epochs with hard distillation from it."""
    root = tmp_path_factory.mktemp('analyze')
    torch.manual_seed(0)
    teacher = timm.create_model(PLAIN, img_size=32, num_classes=3)
    torch.save({'model': teacher.state_dict()}, root / 'teacher.pth')
    main.cli(['--model', STUDENT, *data_flags(image_folder, batch_size=40), '--epochs', '2', '--warmup-epochs', '0',
              '--lr', '2e-3', '--aa', 'none', '--mixup', '0', '--cutmix', '0', '--reprob', '0', '--drop-path', '0',
              '--model-ema-decay', '0.5', '--teacher-model', PLAIN, '--teacher-path', str(root / 'teacher.pth'),
              '--distillation-type', 'hard', '--output_dir', str(root / 'out')])
    return {'root': root, 'folder': image_folder, 'student': root / 'out' / 'checkpoint.pth',
            'teacher': root / 'teacher.pth', 'log': root / 'out' / 'log.txt'}


def run_analyze(*argv: str) -> None:
    analyze.main([str(a) for a in argv])


def load(path: Path, name: str, key: str = 'model') -> torch.nn.Module:
    model = timm.create_model(name, img_size=32, num_classes=3)
    model.load_state_dict(torch.load(path, weights_only=True)[key])
    return model.eval()


def val_batches(folder: Path) -> list:
    """The validation images through main.py's evaluation transform, as (images, labels) batches."""
    args = SimpleNamespace(data_set='FOLDER', data_path=str(folder), input_size=32, eval_crop_ratio=0.875,
                           skip_corrupt=False)
    return list(DataLoader(datasets.build_dataset(is_train=False, args=args)[0], batch_size=5))


def png_size(path: Path) -> tuple:
    """(width, height) from the PNG signature and IHDR chunk."""
    header = path.read_bytes()[:24]
    assert header[:8] == b'\x89PNG\r\n\x1a\n' and header[12:16] == b'IHDR'
    return struct.unpack('>II', header[16:24])


def test_heads_equal_main_eval_of_each_head(run, tmp_path, capsys):
    printed = {}
    for head in analyze.HEADS:
        main.cli(['--eval', '--resume', str(run['student']), '--model', STUDENT, *data_flags(run['folder']),
                  '--eval-head', head])
        lines = ACC_LINE.findall(capsys.readouterr().out)
        assert len(lines) == 2, lines  # the model, then its EMA
        printed[head] = [(float(a1), float(a5)) for a1, a5 in lines]
    for index, extra in enumerate(([], ['--ema'])):
        run_analyze('heads', run['student'], '--model', STUDENT, *data_flags(run['folder']), *extra,
                    '--json', tmp_path / 'heads.json')
        figures = json.loads((tmp_path / 'heads.json').read_text())
        assert set(figures) == set(analyze.HEADS)
        for head in analyze.HEADS:
            acc1, acc5 = printed[head][index]
            assert figures[head]['acc1'] == pytest.approx(acc1, abs=5.1e-4), (head, extra)
            assert figures[head]['acc5'] == pytest.approx(acc5, abs=5.1e-4), (head, extra)
    # the heads differ on this model, so a head read in place of another is seen
    assert printed['cls'][0] != printed['dist'][0]


def test_tokens_equal_hooks_on_the_blocks(run, tmp_path):
    run_analyze('tokens', run['student'], *data_flags(run['folder']), '--json', tmp_path / 'tokens.json')
    figures = json.loads((tmp_path / 'tokens.json').read_text())

    model = load(run['student'], STUDENT)
    outputs = {i: [] for i in range(len(model.blocks))}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda module, inputs, output, i=i: outputs[i].append(output))
    with torch.no_grad():
        for images, _ in val_batches(run['folder']):
            model(images)
    expected = []
    for i in range(len(model.blocks)):
        x = torch.cat(outputs[i])  # [images, tokens, dim]
        expected.append(((x[:, 0] * x[:, 1]).sum(-1) / (x[:, 0].norm(dim=-1) * x[:, 1].norm(dim=-1))).mean().item())
    cls, dist = model.cls_token.flatten(), model.dist_token.flatten()
    assert figures['params'] == pytest.approx((cls @ dist / (cls.norm() * dist.norm())).item(), abs=1e-6)
    assert figures['blocks'] == pytest.approx(expected, abs=1e-5)
    assert len(figures['blocks']) == 12


def test_tokens_are_one_when_the_two_tokens_are_tied():
    torch.manual_seed(0)
    model = timm.create_model(STUDENT, img_size=32, num_classes=3).eval()
    with torch.no_grad():
        model.dist_token.copy_(model.cls_token)
        model.pos_embed[:, 1] = model.pos_embed[:, 0]
    loader = DataLoader(TensorDataset(torch.randn(5, 3, 32, 32), torch.zeros(5, dtype=torch.long)), batch_size=2)
    figures = analyze.token_cosines(model, loader, torch.device('cpu'))
    assert figures['params'] == pytest.approx(1.0, abs=1e-6)
    assert figures['blocks'] == pytest.approx([1.0] * 12, abs=1e-5)


def test_parse_entry_keeps_colons_and_ats_of_paths(tmp_path):
    E = analyze.Entry
    assert analyze.parse_entry('a=/x/y:z.pth') == E('a', None, '/x/y:z.pth', 'avg')
    assert analyze.parse_entry('a=/x/y:z.pth:dist') == E('a', None, '/x/y:z.pth', 'dist')
    assert analyze.parse_entry('a=https://h/p.pth:cls') == E('a', None, 'https://h/p.pth', 'cls')
    assert analyze.parse_entry('t=resnet18@/x/t.pth:cls') == E('t', 'resnet18', '/x/t.pth', 'cls')
    assert analyze.parse_entry('a=/x/u@v.pth') == E('a', None, '/x/u@v.pth', 'avg')
    odd = tmp_path / 'w.pth:cls'
    odd.write_bytes(b'')
    assert analyze.parse_entry(f'a={odd}') == E('a', None, str(odd), 'avg')
    with pytest.raises(ValueError, match='NAME=PATH'):
        analyze.parse_entry('/x/y.pth')


def test_agree_equals_a_direct_count(run, tmp_path):
    copy = tmp_path / 'copy.pth'
    shutil.copy(run['student'], copy)
    s = run['student']
    entries = [f'cls={s}:cls', f'dist={s}:dist', f'avg={s}', f'again={copy}:cls', f't={PLAIN}@{run["teacher"]}']
    run_analyze('agree', *entries, '--model', STUDENT, *data_flags(run['folder']), '--json', tmp_path / 'a.json')
    figures = json.loads((tmp_path / 'a.json').read_text())
    matrix = np.array(figures['disagreement'])
    assert figures['names'] == ['cls', 'dist', 'avg', 'again', 't']
    assert (matrix == matrix.T).all() and (np.diag(matrix) == 0).all()
    assert ((matrix >= 0) & (matrix <= 1)).all()
    assert matrix[0, 3] == 0.0  # two copies of one checkpoint

    student, teacher = load(s, STUDENT), load(run['teacher'], PLAIN)
    logits = {name: [] for name in figures['names']}
    labels = []
    with torch.no_grad():
        for images, target in val_batches(run['folder']):
            tokens = student.forward_features(images)
            cls, dist = student.head(tokens[:, 0]), student.head_dist(tokens[:, 1])
            for name, out in zip(logits, (cls, dist, (cls + dist) / 2, cls, teacher(images))):
                logits[name].append(out)
            labels.append(target)
    top1 = [torch.cat(logits[name]).argmax(1) for name in figures['names']]
    labels = torch.cat(labels)
    for i, a in enumerate(top1):
        assert figures['acc1'][i] == pytest.approx(100 * (a == labels).double().mean().item(), abs=1e-9)
        for j, b in enumerate(top1):
            assert matrix[i, j] == pytest.approx((a != b).sum().item() / len(labels), abs=1e-12)
    assert matrix.max() > 0  # some pair differs, so the count is tested


def attention_reference(model: torch.nn.Module, image: torch.Tensor, method: str) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) computed from each block's attention input, then the method's formula."""
    inputs = []
    hooks = [block.attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
             for block in model.blocks]
    with torch.no_grad():
        model(image[None])
    for hook in hooks:
        hook.remove()
    maps = []
    for block, x in zip(model.blocks, inputs):
        attn = block.attn
        q, k, _ = attn.qkv(x).reshape(1, x.shape[1], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        maps.append(torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)[0].mean(0))  # [N, N]
    if method == 'last':
        result = maps[-1]
    else:
        result = torch.eye(maps[0].shape[0])
        for a in maps:
            a = 0.5 * a + 0.5 * torch.eye(a.shape[0])
            result = (a / a.sum(-1, keepdim=True)) @ result
    extra = model.num_prefix_tokens
    return result[:extra, extra:].reshape(extra, *model.patch_embed.grid_size)


def test_attention_maps_and_figure(run, tmp_path):
    image_path = tmp_path / 'digit.png'
    pixels = np.random.RandomState(0).randint(0, 255, (40, 48, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(image_path)
    image = analyze.build_eval_transform(32, 0.875)(Image.open(image_path).convert('RGB'))
    for path, name, tokens in ((run['student'], STUDENT, 2), (run['teacher'], PLAIN, 1)):
        model = load(path, name)
        for method in analyze.METHODS:
            maps = analyze.attention_maps(model, image, method)
            assert maps.shape == (tokens, 2, 2)
            torch.testing.assert_close(maps, attention_reference(model, image, method), atol=1e-5, rtol=1e-5)
        out = tmp_path / f'{name}.png'
        run_analyze('attention', image_path, path, '--model', name, '--input-size', '32', '--device', 'cpu',
                    '--out', out, '--json', tmp_path / 'maps.json')
        assert png_size(out) == ((1 + tokens) * 300, 350)  # 3 x 3.5 inches per panel at 100 dpi
        assert json.loads((tmp_path / 'maps.json').read_text())['method'] == 'rollout'
    assert model.blocks[0].attn.fused_attn == timm.layers.use_fused_attn()  # restored after the capture


def test_curves_figure_and_log_reading(run, tmp_path, capsys):
    other = tmp_path / 'other.txt'
    lines = [json.dumps({'epoch': e, 'train_loss': 2.0 - e, 'train_lr': 1e-3, 'test_acc1': 10.0 * e,
                         'test_ema_acc1': 9.0 * e}) for e in range(3)]
    other.write_text('\n'.join(lines) + '\n{"epoch": 3, "train_lo')  # a last line cut short by a kill
    assert [r['epoch'] for r in analyze.read_log(str(other))] == [0, 1, 2]
    out = tmp_path / 'curves.png'
    run_analyze('curves', run['log'], f'named={other}', '--out', out)
    assert png_size(out) == (1500, 450)  # 15 x 4.5 inches at 100 dpi
    table = capsys.readouterr().out
    assert re.search(r'^out\s+2\s', table, re.MULTILINE) and re.search(r'^named\s+3\s', table, re.MULTILINE)
    (tmp_path / 'bad.txt').write_text(lines[0] + '\nnot json\n' + lines[1] + '\n')
    with pytest.raises(ValueError, match='line 2'):
        analyze.read_log(str(tmp_path / 'bad.txt'))


def error_line(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_analyze(*argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err, err
    return err


def test_bad_inputs_get_one_line(run, tmp_path, capsys, monkeypatch):
    flags = data_flags(run['folder'])
    for command in ('heads', 'tokens'):
        assert 'no distillation token' in error_line(capsys, command, run['teacher'], '--model', PLAIN, *flags)
    assert 'no such file' in error_line(capsys, 'tokens', tmp_path / 'missing.pth', *flags)
    assert 'Unknown model' in error_line(capsys, 'heads', run['student'], '--model', 'no_such_model', *flags)
    assert 'does not fit' in error_line(capsys, 'heads', run['teacher'], '--model', STUDENT, *flags)
    assert 'no EMA weights' in error_line(capsys, 'agree', f't={run["teacher"]}', '--model', PLAIN, '--ema', *flags)
    garbage = tmp_path / 'garbage.jpg'
    garbage.write_bytes(b'not an image at all')
    image_flags = ['--input-size', '32', '--device', 'cpu', '--out', tmp_path / 'a.png']
    assert 'cannot read image' in error_line(capsys, 'attention', garbage, run['student'], *image_flags)
    for module in ('matplotlib', 'matplotlib.figure', 'matplotlib.backends.backend_agg'):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    assert 'pip install matplotlib' in error_line(capsys, 'curves', run['log'], '--out', tmp_path / 'c.png')

    result = subprocess.run([sys.executable, 'analyze.py', 'heads', str(tmp_path / 'missing.pth'), *flags],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f'analyze.py heads: error: checkpoint {tmp_path}/missing.pth: '
                                                  'no such file']


def test_heads_and_tokens_check_the_model_before_reading_any_data(run, capsys, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError('the data loaders were built before the model was checked')

    with monkeypatch.context() as patch:
        patch.setattr(builders, 'build_data', no_data)
        for command in ('heads', 'tokens'):
            assert 'no distillation token' in error_line(capsys, command, run['teacher'], '--model', PLAIN,
                                                         *data_flags(run['folder']))
    # the model's classes come from its checkpoint (3) and must be the data's (DIGITS: 10)
    err = error_line(capsys, 'heads', run['student'], '--data-set', 'DIGITS', '--input-size', '32', '--num_workers',
                     '0', '--device', 'cpu')
    assert 'classifies 3 classes and --data-set DIGITS has 10: give a checkpoint trained on this dataset' in err

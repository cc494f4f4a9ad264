"""benchmark.py, measure.py: FLOP counts against the paper and a hand count, the timm reference, and a full tiny run."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import benchmark
import builders
import datasets
import main
import measure
import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(depth=2, embed_dim=48, num_heads=3, img_size=32)


def vit_macs(depth: int, dim: int, img: int, classes: int = 1000, extra_tokens: int = 1, heads: int = 1,
             patch: int = 16, mlp_ratio: int = 4) -> int:
    """Multiply-adds per image of a ViT forward, by hand: patch projection, blocks, classifier heads."""
    patches = (img // patch) ** 2
    n = patches + extra_tokens
    block = (n * dim * 3 * dim      # qkv projection
             + 2 * n * n * dim      # q @ k^T and attention @ v, all heads together
             + n * dim * dim        # output projection
             + 2 * n * dim * mlp_ratio * dim)  # MLP fc1, fc2
    return patches * 3 * patch * patch * dim + depth * block + heads * dim * classes


@pytest.mark.parametrize('name, paper_gmac, dims', [
    ('deit_tiny_patch16_224', 1.26, (12, 192)),
    ('deit_base_patch16_224', 17.6, (12, 768)),
])
def test_flops_match_paper_and_hand_count_with_attention(name, paper_gmac, dims):
    if name == 'deit_tiny_patch16_224':
        model = models.build_model(name)  # a real CPU model: its attention runs the fused CPU kernel
    else:
        with builders.skeleton_device():  # DeiT-B: no weights needed to count
            model = models.build_model(name)
    gmac = measure.count_flops(model, 224) / 2 / 1e9
    assert gmac == pytest.approx(paper_gmac, rel=0.02)
    assert gmac * 1e9 == pytest.approx(vit_macs(*dims, 224), rel=1e-9)


def test_training_flops_are_forward_plus_twice_forward_for_backward():
    model = models.build_model('deit_tiny_patch16_224', **TINY)
    forward = vit_macs(2, 48, 32)
    patch_projection = 4 * 3 * 16 * 16 * 48  # its backward needs no gradient for the input images
    assert measure.count_flops(model, 32, train=True) / 2 == 3 * forward - patch_projection


@pytest.mark.parametrize('name', ['deit_tiny_patch16_224', 'deit_tiny_distilled_patch16_224'])
def test_timm_reference_computes_the_same_function(name):
    torch.manual_seed(0)
    ours = models.build_model(name, drop_path_rate=0.1, **TINY)
    reference = measure.timm_reference(ours, drop_path_rate=0.1)
    assert type(reference).__module__.startswith('timm.models')
    rates = [[getattr(b.drop_path1, 'drop_prob', 0.0) for b in m.blocks] for m in (ours, reference)]
    assert rates[0] == rates[1] and rates[0][-1] == pytest.approx(0.1)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference.eval()(x), rtol=0, atol=1e-6)
        ours.train(), reference.train()
        torch.manual_seed(1)
        out = ours(x)
        torch.manual_seed(1)
        ref = reference(x)  # same drop-path draws: same training output, a pair of logits when distilled
    assert type(out) is type(ref)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_interleaved_timing_measures_known_durations():
    timings = measure.time_interleaved({'short': lambda: time.sleep(0.02), 'long': lambda: time.sleep(0.04)},
                                       torch.device('cpu'), warmup=1, repeats=3, min_time=0.1)
    assert 0.02 <= timings['short']['seconds'] < 0.03
    assert 0.04 <= timings['long']['seconds'] < 0.05
    assert len(timings['short']['repeats']) == 3 and timings['short']['iters_per_repeat'] >= 3


def test_timed_repeats_print_progress_with_eta(capsys):
    measure.time_interleaved({'a': lambda: time.sleep(0.01), 'b': lambda: None}, torch.device('cpu'), warmup=0,
                             repeats=3, min_time=0.02, header='part')
    lines = [line for line in capsys.readouterr().out.splitlines() if 'eta:' in line]
    fields = [line.split('  ') for line in lines]
    assert [f[:2] for f in fields] == [['part', f'[{i}/3]'] for i in range(3)]
    seconds_a = [float(next(x for x in f if x.startswith('a: '))[3:].rstrip(' s')) for f in fields]
    assert all(s >= 0.01 for s in seconds_a)  # each repeat's seconds per call of the sleep


def test_batch_search_doubles_until_out_of_memory():
    def make_step(batch_size):  # a device on which batches above 256 do not fit
        def step():
            if batch_size > 256:
                raise torch.OutOfMemoryError('CUDA out of memory')
        return step

    cpu = torch.device('cpu')
    found = measure.largest_batch(make_step, cpu, max_batch_size=1024)
    assert found['batch_size'] == 256 and sorted(found['search_img_s']) == [32, 64, 128, 256]
    assert measure.largest_batch(make_step, cpu, max_batch_size=100)['batch_size'] == 64
    with pytest.raises(RuntimeError, match='batch 32 does not fit'):
        measure.largest_batch(lambda b: make_step(b * 16), cpu, max_batch_size=1024)


@pytest.mark.parametrize('input_size', [224, 32])
def test_recipe_train_transform_is_main_default(input_size):
    """benchmark.py may not import main.py: its copy of the recipe's transform flags must stay main.py's defaults."""
    defaults = main.get_args_parser().parse_args(['--input-size', str(input_size)])
    recipe = measure.recipe_train_args(input_size)
    assert vars(recipe) == {key: getattr(defaults, key) for key in vars(recipe)}
    assert repr(measure.train_transform(input_size)) == repr(datasets.build_transform(True, defaults))


def test_user_errors_are_clear():
    parser = benchmark.get_args_parser()
    args = parser.parse_args(['--model', 'deit_tiny_patch16_224', '--teacher-model', 'resnet10t', '--input-size',
                              '32', '--model-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=3', '--device', 'cpu'])
    with pytest.raises(ValueError, match='distilled student'):
        benchmark.Benchmark(args)
    with pytest.raises(ValueError, match='KEY=VALUE'):
        benchmark.parse_model_kwargs(['depth'])


def test_tiny_run_writes_every_figure(tmp_path, capsys):
    """The command a user runs, on a 2-block model: every part measured, ours and timm's the same function."""
    out = tmp_path / 'bench.json'
    cmd = [sys.executable, os.path.join(ROOT, 'benchmark.py'), '--model', 'deit_tiny_distilled_patch16_224',
           '--model-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=3', '--input-size', '32',
           '--teacher-model', 'resnet10t', '--device', 'cpu', '--threads', '1', '--batch-size', '4',
           '--repeats', '2', '--warmup', '1', '--min-time', '0.02', '--workers', '2', '--data-images', '6',
           '--json', str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())

    machine = r['machine']
    assert machine['torch'] == torch.__version__ and machine['cpu'] and machine['torch_threads'] == 1
    assert 'gpu' in machine and 'timm' in machine and machine['load_average_1min'] >= 0
    assert r['command'].startswith('benchmark.py --model deit_tiny_distilled_patch16_224')
    assert r['outputs']['max_abs_diff'] <= 1e-5
    assert r['matmul_peak']['tflops'] > 0

    flops = r['flops']
    # distilled: two extra tokens and two classifier heads
    assert flops['inference_gmac'] * 1e9 == pytest.approx(vit_macs(2, 48, 32, extra_tokens=2, heads=2), rel=1e-9)
    assert flops['timm_inference_gflops'] == flops['ours_inference_gflops']
    assert flops['ours_train_teacher_gflops'] > flops['ours_train_gflops'] > 2 * flops['ours_inference_gflops']

    for part in ('inference', 'train', 'train_teacher'):
        p = r[part]
        assert p['batch_size'] == 4 and p['precision'] == 'fp32'
        for impl in ('ours', 'timm'):
            assert p[impl]['img_s'] == pytest.approx(4 / p[impl]['seconds'])
            assert len(p[impl]['repeats']) == 2
            assert 0 < p[impl]['mfu'] == pytest.approx(p[impl]['tflops'] / r['matmul_peak']['tflops'])
        paired = sorted(t / o for o, t in zip(p['ours']['repeats'], p['timm']['repeats']))
        assert p['ratio_ours_timm'] == pytest.approx((paired[0] + paired[1]) / 2)  # median of 2
        assert set(p['peak_memory_gib']) == {'ours', 'timm'}  # None on CPU
    assert r['train_teacher']['teacher'] == 'resnet10t'

    options = r['options']
    assert options['fused_adamw']['speedup'] > 0 and options['teacher_channels_last']['speedup'] > 0
    assert 'skipped' in options['compile_train'] and 'skipped' in options['compile_inference']

    data = r['data']
    assert data['files'] == 6 and data['workers'] == 2 and data['batch_size'] == 4
    assert 70 < data['mean_file_kb'] < 200  # ImageNet-like JPEGs (~110 kB), not small flat ones
    assert 'RandAugment' in data['transform'] and 'RandomErasing' in data['transform']
    assert data['one_process_img_s'] > 0 and data['loader_img_s'] > 0
    assert data['loader_img_s_per_worker'] == pytest.approx(data['loader_img_s'] / 2)
    assert set(data['persistent_workers']['epoch_start_s']) == {'persistent', 'restarted'}
    assert 'skipped' in data['pin_memory']

    assert r['epoch'] == {'skipped': 'main.py builds --model without --model-kwargs'}

    assert 'ours/timm' in proc.stdout and 'DataLoader with 2 workers' in proc.stdout

    # the GPU script's runs skip parts: the table then leaves their rows out instead of failing
    benchmark.print_table(dict(r, train_teacher={'skipped': 'no --teacher-model'}, data={'skipped': '--skip-data'}))
    table = capsys.readouterr().out
    assert '\ntrain ' in table and 'train_teacher' not in table and 'DataLoader' not in table


def test_epochs_of_main_py_with_and_without_persistent_workers(tmp_path, capsys):
    """The epoch row: main.py's epochs with its default loader and with --no-persistent-workers, each run's
    first epoch (which starts the workers) left out, and the table's line."""
    measure.write_train_val_jpegs(str(tmp_path), 12, 3)
    assert sorted(p.name for p in (tmp_path / 'train').iterdir()) == ['class0', 'class1']
    assert len(list((tmp_path / 'train' / 'class1').iterdir())) == 6 and len(list(tmp_path.glob('val/*/*'))) == 3
    argv = ['--model', 'test_vit', '--input-size', '32', '--data-set', 'FOLDER', '--data-path', str(tmp_path),
            '--batch-size', '4', '--num_workers', '1', '--epochs', '2', '--device', 'cpu']
    epochs = measure.measure_epochs(argv, threads=1, rounds=1)
    for name in ('persistent', 'restarted'):
        (first, second), = epochs[name]['runs']
        assert 0 < second == epochs[name]['epoch_s'] and epochs[name]['first_epoch_s'] == first
    assert epochs['ratio_restarted_persistent'] == epochs['restarted']['epoch_s'] / epochs['persistent']['epoch_s']
    results = {'command': 'benchmark.py', 'machine': measure.machine_info(torch.device('cpu')),
               'epoch': dict(epochs, batch_size=4, workers=1, train_images=12, val_images=3)}
    benchmark.print_table(results)
    assert (f"epoch of main.py (1 workers, batch 4, 12 training and 3 validation images): "
            f"{epochs['persistent']['epoch_s']:.3f} s, {epochs['restarted']['epoch_s']:.3f} s with "
            f"--no-persistent-workers (x{epochs['ratio_restarted_persistent']:.3f})") in capsys.readouterr().out

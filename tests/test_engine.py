"""train_one_epoch and evaluate on a tiny DeiT and a small fixed dataset, in one and in two processes."""
import copy
import datetime
import io
import json
import math
import os
import re
from contextlib import redirect_stdout
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import engine
import models  # noqa: F401  (registers the DeiT names)
from losses import DistillationLoss

CPU = torch.device('cpu')
NUM_CLASSES = 8
TINY = dict(depth=2, embed_dim=48, num_heads=3, img_size=32, num_classes=NUM_CLASSES)


def tiny(distilled: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    name = 'deit_tiny_distilled_patch16_224' if distilled else 'deit_tiny_patch16_224'
    return timm.create_model(name, **TINY)


def fixed_dataset(n: int, num_classes: int = NUM_CLASSES, seed: int = 0) -> TensorDataset:
    """Each class is a fixed random image; samples are that image plus noise (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, 3, 32, 32, generator=g)
    labels = torch.arange(n) % num_classes
    return TensorDataset(templates[labels] + 0.5 * torch.randn(n, 3, 32, 32, generator=g), labels)


def train_loader(dataset: TensorDataset, batch_size: int = 16) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def dataset_loss(model: nn.Module, dataset: TensorDataset) -> float:
    model.eval()
    images, labels = dataset.tensors
    return F.cross_entropy(model(images), labels).item()


class CountingEma(ModelEmaV3):
    """timm's EMA, counting its updates."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.updates = 0

    def update(self, model: nn.Module, step=None) -> None:
        self.updates += 1
        super().update(model, step)


# ============ training ============

@pytest.mark.parametrize('amp_dtype', [None, torch.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('extras', [False, True], ids=['plain', 'distill-clip-ema-mixup'])
def test_a_few_epochs_lower_the_loss(amp_dtype, extras):
    np.random.seed(0)  # Mixup draws from numpy's global generator: the same draws whichever tests ran before
    dataset = fixed_dataset(64)
    loader = train_loader(dataset)
    model = tiny(distilled=extras)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    if extras:
        teacher = timm.create_model('deit_tiny_patch16_224', **dict(TINY, depth=1))
        criterion = DistillationLoss(SoftTargetCrossEntropy(), teacher, 'hard', alpha=0.5, tau=1.0)
        mixup_fn = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=NUM_CLASSES)
        model_ema = CountingEma(model, decay=0.9)
    else:
        criterion = DistillationLoss(nn.CrossEntropyLoss(), None, 'none', alpha=0.5, tau=1.0)
        mixup_fn = model_ema = None
    before = dataset_loss(model, dataset)
    epochs = 3
    for epoch in range(epochs):
        stats = engine.train_one_epoch(model, criterion, loader, optimizer, CPU, epoch, None, amp_dtype,
                                       max_norm=1.0 if extras else 0.0, model_ema=model_ema, mixup_fn=mixup_fn,
                                       print_freq=100)
    assert set(stats) == {'loss', 'lr'} and math.isfinite(stats['loss']) and stats['lr'] == 2e-3
    assert dataset_loss(model, dataset) < 0.85 * before
    if extras:
        assert model_ema.updates == epochs * len(loader)
        assert dataset_loss(model_ema.module, dataset) < 0.9 * before


@pytest.mark.parametrize('amp_dtype', [None, torch.float16], ids=['fp32', 'fp16-scaler'])
def test_clipping_bounds_the_unscaled_gradient(amp_dtype):
    """With SGD(lr) and max_norm m, a step moves the weights by exactly lr * m in L2 norm.

    Under fp16 the GradScaler multiplies the loss by 256: clipping before unscaling would move the
    weights 256 times less.
    """
    dataset = fixed_dataset(16)
    model = tiny()
    lr, max_norm = 0.5, 1e-3
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler('cpu', init_scale=256.0, enabled=amp_dtype == torch.float16)
    criterion = DistillationLoss(nn.CrossEntropyLoss(), None, 'none', alpha=0.5, tau=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    engine.train_one_epoch(model, criterion, train_loader(dataset), optimizer, CPU, 0, scaler, amp_dtype,
                           max_norm=max_norm, print_freq=100)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm().item()
    assert moved == pytest.approx(lr * max_norm, rel=1e-3)


@pytest.mark.parametrize('set_training_mode', [True, False])
def test_set_training_mode_is_honoured(set_training_mode):
    model = tiny()
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    criterion = DistillationLoss(nn.CrossEntropyLoss(), None, 'none', alpha=0.5, tau=1.0)
    engine.train_one_epoch(model, criterion, train_loader(fixed_dataset(32)), torch.optim.SGD(model.parameters(), 0.1),
                           CPU, 0, None, None, print_freq=100)
    assert modes and all(modes)
    modes.clear()
    engine.train_one_epoch(model, criterion, train_loader(fixed_dataset(32)), torch.optim.SGD(model.parameters(), 0.1),
                           CPU, 0, None, None, set_training_mode=set_training_mode, print_freq=100)
    assert modes == [set_training_mode] * 2


class PoisonedLoss(nn.Module):
    """Cross-entropy, times ``value`` at step ``bad_step``; snapshots model and optimizer at ``snapshot_step``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, bad_step: int, value: float,
                 snapshot_step: int) -> None:
        super().__init__()
        self.model, self.optimizer, self.bad_step, self.value = model, optimizer, bad_step, value
        self.snapshot_step = snapshot_step
        self.step = 0
        self.snapshot = None

    def forward(self, inputs, outputs, labels):
        loss = F.cross_entropy(outputs, labels)
        if self.step == self.snapshot_step:
            self.snapshot = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict()))
        if self.step == self.bad_step:
            loss = loss * self.value
        self.step += 1
        return loss


class RecordingEma:
    """Stands for ModelEmaV3: records the weights it is updated with."""

    def __init__(self) -> None:
        self.seen = []

    def update(self, model: nn.Module, step=None) -> None:
        self.seen.append(model.weight.detach().clone())


def test_with_accumulation_the_ema_is_updated_once_per_optimizer_step_with_its_weights():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    after_steps = []
    step = optimizer.step

    def step_and_record(*args, **kwargs):
        result = step(*args, **kwargs)
        after_steps.append(model.weight.detach().clone())
        return result

    optimizer.step = step_and_record
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(7)]
    model_ema = RecordingEma()
    engine.train_one_epoch(model, lambda samples, outputs, targets: F.cross_entropy(outputs, targets), batches,
                           optimizer, CPU, 0, None, None, model_ema=model_ema, print_freq=100, accum_iter=3)
    assert len(after_steps) == 2  # 7 batches: 2 steps of 3 (the 7th is not used)
    assert len(model_ema.seen) == 2 and all(torch.equal(a, b) for a, b in zip(model_ema.seen, after_steps))


@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_non_finite_loss_stops_before_the_optimizer_step(value):
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = PoisonedLoss(model, optimizer, bad_step=2, value=value, snapshot_step=2)
    model_ema = CountingEma(model, decay=0.9)
    with pytest.raises(engine.NonFiniteLossError, match=r'epoch 7, step 2/4 on 1 of 1 process'):
        engine.train_one_epoch(model, criterion, train_loader(fixed_dataset(64)), optimizer, CPU, 7, None, None,
                               model_ema=model_ema, print_freq=100)
    weights, optimizer_state = criterion.snapshot
    assert optimizer_state['state'], 'the two good steps filled the optimizer state'
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(optimizer_state['state'][i]['exp_avg'], s['exp_avg'])
               and torch.equal(optimizer_state['state'][i]['exp_avg_sq'], s['exp_avg_sq'])
               and optimizer_state['state'][i]['step'] == s['step']
               for i, s in optimizer.state_dict()['state'].items())
    assert model_ema.updates == 2


def test_empty_loader_is_a_clear_error():
    model = tiny()
    empty = DataLoader(fixed_dataset(8), batch_size=16, drop_last=True)
    criterion = DistillationLoss(nn.CrossEntropyLoss(), None, 'none', alpha=0.5, tau=1.0)
    with pytest.raises(ValueError, match='data loader is empty'):
        engine.train_one_epoch(model, criterion, empty, torch.optim.SGD(model.parameters(), 0.1), CPU, 0, None, None)
    with pytest.raises(ValueError, match='data loader is empty'):
        engine.evaluate(empty, model, CPU)


# ============ evaluation ============

def direct_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 / top-5 (%) and mean cross-entropy computed from all logits at once."""
    ranks = (logits > logits.gather(1, labels[:, None])).sum(1)  # classes scored above the true one
    return {'acc1': 100.0 * (ranks < 1).double().mean().item(), 'acc5': 100.0 * (ranks < 5).double().mean().item(),
            'loss': F.cross_entropy(logits.double(), labels).item(), 'n': len(labels)}


def run_evaluate(*args, **kwargs):
    out = io.StringIO()
    with redirect_stdout(out):
        result = engine.evaluate(*args, **kwargs)
    return result, out.getvalue().splitlines()


@pytest.mark.parametrize('head', ['avg', 'cls', 'dist'])
def test_evaluate_equals_direct_computation_for_each_head(head):
    dataset = fixed_dataset(37)
    model = tiny(distilled=True)
    with torch.no_grad():
        model.train()  # no dropout in the tiny model: train mode only exposes both heads' logits
        cls_logits, dist_logits = model(dataset.tensors[0])
    logits = {'cls': cls_logits, 'dist': dist_logits, 'avg': (cls_logits + dist_logits) / 2}[head]
    expected = direct_metrics(logits, dataset.tensors[1])
    assert 0 < expected['acc5'] < 100
    model.eval_head = 'dist' if head != 'dist' else 'cls'
    previous = model.eval_head
    result, lines = run_evaluate(DataLoader(dataset, batch_size=10), model, CPU, head=head)
    assert result['n'] == 37
    for key in ('acc1', 'acc5', 'loss'):
        assert result[key] == pytest.approx(expected[key], rel=1e-5), key
    assert lines[-1] == f"* Acc@1 {expected['acc1']:.3f} Acc@5 {expected['acc5']:.3f} loss {expected['loss']:.3f}"
    assert re.fullmatch(r'\* Acc@1 \d+\.\d{3} Acc@5 \d+\.\d{3} loss \d+\.\d{3}', lines[-1])
    assert model.eval_head == previous


def test_heads_give_different_results_and_plain_models_have_no_dist_head():
    dataset = fixed_dataset(20)
    model = tiny(distilled=True)
    losses = {head: run_evaluate(DataLoader(dataset, batch_size=8), model, CPU, head=head)[0]['loss']
              for head in ('avg', 'cls', 'dist')}
    assert len(set(losses.values())) == 3
    with pytest.raises(ValueError, match='no distillation'):
        engine.evaluate(DataLoader(dataset, batch_size=8), tiny(), CPU, head='dist')


def test_evaluate_plain_model_with_fewer_than_five_classes():
    dataset = fixed_dataset(11, num_classes=3)
    model = timm.create_model('deit_tiny_patch16_224', **dict(TINY, num_classes=3))
    model.eval()
    with torch.no_grad():
        expected = direct_metrics(model(dataset.tensors[0]), dataset.tensors[1])
    result, _ = run_evaluate(DataLoader(dataset, batch_size=4), model, CPU, head='cls')
    assert result['acc5'] == 100.0
    assert result['acc1'] == pytest.approx(expected['acc1']) and result['loss'] == pytest.approx(expected['loss'])


class CountingDataset(torch.utils.data.Dataset):
    """``dataset``, counting the samples loaded."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset, self.loads = dataset, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        self.loads += 1
        return self.dataset[index]


def test_the_model_and_its_ema_are_scored_in_one_pass_with_the_figures_of_two():
    """evaluate_all loads each batch once and gives each model exactly the figures of an evaluate() of its own;
    the printed lines are the model's, then the EMA's."""
    dataset = CountingDataset(fixed_dataset(37))
    loader = DataLoader(dataset, batch_size=10)
    model, ema = tiny(distilled=True, seed=0), tiny(distilled=True, seed=1)  # the EMA's weights differ
    separate = [run_evaluate(loader, m, CPU)[0] for m in (model, ema)]
    assert separate[0] != separate[1]
    dataset.loads = 0
    out = io.StringIO()
    with redirect_stdout(out):
        both = engine.evaluate_all(loader, model, SimpleNamespace(module=ema), CPU, None)
    assert dataset.loads == 37
    assert both == {**{f'test_{k}': v for k, v in separate[0].items()},
                    **{f'test_ema_{k}': v for k, v in separate[1].items()}}
    lines = [line for line in out.getvalue().splitlines() if line.startswith(('* ', 'Accuracy'))]
    assert lines == [
        f"* Acc@1 {separate[0]['acc1']:.3f} Acc@5 {separate[0]['acc5']:.3f} loss {separate[0]['loss']:.3f}",
        f"Accuracy of the network on the 37 test images: {separate[0]['acc1']:.1f}%",
        f"* Acc@1 {separate[1]['acc1']:.3f} Acc@5 {separate[1]['acc5']:.3f} loss {separate[1]['loss']:.3f}",
        f"Accuracy of the model EMA on the 37 test images: {separate[1]['acc1']:.1f}%"]


# ============ two processes (gloo) ============

# (dataset size, batch size, shuffle): 13 samples over 2 processes pads one; with batch 3 the padded
# sample is alone in the last batch of process 1. 5 over 2 with batch 2 pads inside a batch.
DIST_CASES = [(13, 3, False), (13, 4, True), (5, 2, True)]


def swapped_heads(model: nn.Module) -> nn.Module:
    """A copy of the distilled ``model`` whose class head holds the distillation head's weights."""
    other = copy.deepcopy(model)
    other.head.load_state_dict(model.head_dist.state_dict())
    return other


def _distributed_worker(rank: int, world_size: int, tmp: str) -> None:
    torch.set_num_threads(1)  # two processes on a small machine: oversubscribed threads make this test crawl
    dist.init_process_group('gloo', init_method=f"file://{os.path.join(tmp, 'rendezvous')}",
                            rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        model = tiny(distilled=True)
        model.load_state_dict(torch.load(os.path.join(tmp, 'model.pth'), weights_only=True))
        report = {'eval': [], 'eval_all': []}
        for n, batch_size, shuffle in DIST_CASES:
            dataset = fixed_dataset(n)
            sampler = DistributedSampler(dataset, shuffle=shuffle, drop_last=False, seed=3)
            loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
            report['eval'].append({head: engine.evaluate(loader, model, CPU, head=head, print_freq=100)
                                   for head in ('avg', 'cls')})
            # one pass for a model and its EMA (here the model with its heads swapped), with the same padding
            report['eval_all'].append(engine.evaluate_all(loader, model, SimpleNamespace(module=swapped_heads(model)),
                                                          CPU, None, head='cls'))
        # Only process 1 sees a NaN, at step 1: both must stop there, before the optimizer step.
        train_model = tiny()
        ddp_model = DistributedDataParallel(train_model)  # a process that went on would wait in its all-reduce
        optimizer = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
        criterion = PoisonedLoss(train_model, optimizer, bad_step=1 if rank == 1 else -1, value=float('nan'),
                                 snapshot_step=1)
        loader = train_loader(fixed_dataset(32), batch_size=8)
        try:
            engine.train_one_epoch(ddp_model, criterion, loader, optimizer, CPU, 3, None, None, print_freq=100)
            report['error'] = None
        except engine.NonFiniteLossError as e:
            report['error'] = str(e)
        report['steps_taken'] = criterion.step
        weights = criterion.snapshot[0]
        report['unchanged'] = all(torch.equal(weights[k], v) for k, v in train_model.state_dict().items())
        with open(os.path.join(tmp, f'rank{rank}.json'), 'w') as f:
            json.dump(report, f)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_evaluation_equals_single_process_and_nan_stops_both(tmp_path):
    model = tiny(distilled=True)
    torch.save(model.state_dict(), tmp_path / 'model.pth')
    # fork: the children inherit the imported torch and timm instead of importing them again (seconds each)
    mp.start_processes(_distributed_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method='fork')
    reports = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]

    for case, (n, batch_size, _) in enumerate(DIST_CASES):
        loader = DataLoader(fixed_dataset(n), batch_size=batch_size)
        for head in ('avg', 'cls'):
            single, _ = run_evaluate(DataLoader(fixed_dataset(n), batch_size=batch_size), model, CPU, head=head)
            assert single['n'] == n
            for report in reports:
                distributed = report['eval'][case][head]
                assert distributed['n'] == n, (case, head)
                for key in ('acc1', 'acc5', 'loss'):
                    assert distributed[key] == pytest.approx(single[key], rel=1e-5), (case, head, key)

        single = {f'test_{k}': v for k, v in run_evaluate(loader, model, CPU, head='cls')[0].items()}
        single.update({f'test_ema_{k}': v
                       for k, v in run_evaluate(loader, swapped_heads(model), CPU, head='cls')[0].items()})
        assert single['test_acc1'] != single['test_ema_acc1'] or single['test_loss'] != single['test_ema_loss']
        for report in reports:
            assert report['eval_all'][case].keys() == single.keys()
            for key, value in single.items():
                assert report['eval_all'][case][key] == pytest.approx(value, rel=1e-5), (case, key)

    for rank, report in enumerate(reports):
        assert report['error'] is not None, f'process {rank} did not stop'
        assert 'epoch 3, step 1/4 on 1 of 2 process' in report['error']
        assert report['steps_taken'] == 2
        assert report['unchanged'], f'process {rank} stepped the optimizer on the NaN step'
    assert 'loss is nan' in reports[1]['error'] and 'loss is finite here' in reports[0]['error']

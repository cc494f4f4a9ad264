"""The measurements of benchmark.py: timing, FLOP counting, the models and steps timed, the data pipeline.

Every function here returns numbers (or the callables that are timed); benchmark.py decides what to
measure, and prints and saves the figures. The long loops print one progress line per timed repeat
with its ETA, in utils.MetricLogger's format.
"""
import argparse
import copy
import gc
import glob
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import timm
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

import datasets
import models
import utils
from losses import DistillationLoss

# ImageNet's training JPEGs average about 110 kB at about 470x390 pixels; 500x375 is a common size.
JPEG_SIZE = (500, 375)
# The flags of main.py that datasets.build_transform reads for training, at main.py's defaults (the
# recipe). benchmark.py may not import main.py; tests/test_benchmark.py checks these against its parser.
RECIPE_TRANSFORM_ARGS = dict(color_jitter=0.3, aa='rand-m9-mstd0.5-inc1', train_interpolation='bicubic',
                             reprob=0.25, remode='pixel', recount=1, ThreeAugment=False, src=False)


# ============ machine and timing ============

def load_average() -> Optional[float]:
    """Runnable processes over the last minute: other work on a shared machine slows every figure."""
    return os.getloadavg()[0] if hasattr(os, 'getloadavg') else None


def machine_info(device: torch.device) -> Dict[str, Any]:
    """The machine a figure was measured on."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        cpu = names[0] if names else cpu
    info = {
        'cpu': cpu,
        'cpu_count': os.cpu_count(),
        'cpu_affinity': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(),
        'torch_threads': torch.get_num_threads(),
        'python': platform.python_version(),
        'platform': platform.platform(),
        'torch': torch.__version__,
        'torchvision': torchvision.__version__,
        'timm': timm.__version__,
        'gpu': None,
        'load_average_1min': load_average(),
    }
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_block(fn: Callable[[], Any], iters: int, device: torch.device) -> float:
    """Seconds per call of ``iters`` consecutive calls."""
    if device.type == 'cuda':
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def progress(repeats: int, header: str, meters: Iterable[str], fmt: str) -> Iterator[utils.MetricLogger]:
    """Yield a MetricLogger once per repeat, which prints a line with the ETA after each.

    Args:
        repeats: number of repeats.
        header: what is measured, at the start of each line.
        meters: names of the figures each repeat records with ``logger.update(name=value)``.
        fmt: how a line shows the figure of its own repeat, e.g. ``'{value:.4g} s'``.
    """
    logger = utils.MetricLogger(delimiter='  ')
    for name in meters:
        logger.add_meter(name, utils.SmoothedValue(fmt=fmt))
    for _ in logger.log_every(range(repeats), 1, header):
        yield logger


def time_interleaved(fns: Dict[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int,
                     min_time: float, header: str = 'timing') -> Dict[str, Dict[str, Any]]:
    """Time several functions in interleaved repeats, so that a slow spell of a shared machine hits all.

    Each function is warmed up, then called for about ``min_time / 2`` seconds to learn how many
    calls fill ``min_time``; then every repeat runs each function in turn for that many calls.
    Returns per function the median seconds per call, the repeats and the calls per repeat.
    """
    iters = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        calls, elapsed = 0, 0.0
        while elapsed < min_time / 2:
            elapsed += time_block(fn, 1, device)
            calls += 1
        iters[name] = max(1, math.ceil(min_time * calls / max(elapsed, 1e-9)))
    times = {name: [] for name in fns}
    for logger in progress(repeats, header, fns, '{value:.4g} s'):
        for name, fn in fns.items():
            times[name].append(time_block(fn, iters[name], device))
            logger.update(**{name: times[name][-1]})
    return {name: {'seconds': statistics.median(t), 'repeats': t, 'iters_per_repeat': iters[name]}
            for name, t in times.items()}


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int, min_time: float) -> Dict[str, Any]:
    """FLOP/s of a large square matrix product: the roof against which MFU is measured."""
    n = 8192 if device.type == 'cuda' else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_interleaved({'mm': lambda: torch.mm(a, b)}, device, 3, repeats, min_time, 'matmul_peak')
    return {'dtype': str(dtype).replace('torch.', ''), 'n': n, 'tflops': 2 * n**3 / t['mm']['seconds'] / 1e12}


def throughput(timings: Dict[str, Dict[str, Any]], batch_size: int, gflops: Optional[float],
               peak_tflops: Optional[float]) -> Dict[str, Any]:
    """Images/s, achieved TFLOP/s and MFU of each timed model, and the speed ratio ours / timm.

    Args:
        timings: time_interleaved's result, per implementation ('ours', and 'timm' when compared).
        batch_size: images per timed call.
        gflops: GFLOPs per image of one call (None when not counted: no TFLOP/s, no MFU).
        peak_tflops: matmul_peak's TFLOP/s (None when not measured: no MFU).
    """
    out = {}
    for name, t in timings.items():
        img_s = batch_size / t['seconds']
        tflops = img_s * gflops / 1e3 if gflops else None
        out[name] = dict(t, img_s=img_s, tflops=tflops, mfu=tflops / peak_tflops if tflops and peak_tflops else None)
    if 'timm' in out:
        # repeat i of ours ran right next to repeat i of timm's: the median of these paired ratios
        # cancels the slow spells of a shared machine better than a ratio of two medians
        pairs = zip(timings['ours']['repeats'], timings['timm']['repeats'])
        out['ratio_ours_timm'] = statistics.median(t_timm / t_ours for t_ours, t_timm in pairs)
    return out


# ============ FLOP counting ============

def distillation_criterion(teacher: Optional[nn.Module]) -> nn.Module:
    """The recipe's loss: cross-entropy, plus hard distillation (alpha 0.5) when there is a teacher."""
    return DistillationLoss(nn.CrossEntropyLoss(), teacher, 'hard' if teacher is not None else 'none', 0.5, 1.0)


def count_flops(model: nn.Module, input_size: int, train: bool = False, teacher: Optional[nn.Module] = None) -> int:
    """FLOPs (a multiply-add counts 2) per image of inference, or of a training step's forward + backward.

    With ``teacher`` the step includes the teacher's forward (hard distillation). The count runs on
    copies on the meta device, where scaled_dot_product_attention decomposes into the matrix
    products it stands for, so attention is counted exactly and no compute is spent. On a real
    device FlopCounterMode does not know CPU's fused attention kernel (DeiT-Ti would come out 14%
    short), and for CUDA's it counts the recomputation inside the fused backward, which is work of
    the kernel, not of the model.
    """
    meta = torch.device('meta')
    model = copy.deepcopy(model).to(meta).train(train)
    x = torch.randn(1, 3, input_size, input_size, device=meta)
    with FlopCounterMode(display=False) as counter:
        if train:
            teacher = copy.deepcopy(teacher).to(meta) if teacher is not None else None
            criterion = distillation_criterion(teacher)
            criterion(x, model(x), torch.zeros(1, dtype=torch.long, device=meta)).backward()
        else:
            with torch.no_grad():
                model(x)
    return counter.get_total_flops()


# ============ models and steps ============

def timm_reference(model: nn.Module, drop_path_rate: float = 0.0) -> nn.Module:
    """timm's own DeiT class with ``model``'s configuration, holding a copy of its weights.

    The state_dict is loaded with strict=True, so this also checks that ours has timm's layout.
    """
    distilled = isinstance(model, models.DistilledVisionTransformer)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f'{type(model).__name__} is no ViT: timm has no DeiT reference for it.')
    block = model.blocks[0]
    cfg = dict(
        img_size=model.patch_embed.img_size, patch_size=model.patch_embed.patch_size, embed_dim=model.embed_dim,
        depth=len(model.blocks), num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / model.embed_dim, qkv_bias=block.attn.qkv.bias is not None,
        norm_layer=partial(nn.LayerNorm, eps=block.norm1.eps), num_classes=model.num_classes,
        drop_path_rate=drop_path_rate)
    reference = (VisionTransformerDistilled if distilled else VisionTransformer)(**cfg)
    reference.load_state_dict(model.state_dict(), strict=True)
    if distilled:
        reference.set_distilled_training(True)  # (class, dist) logits in training, as ours
    return reference.to(next(model.parameters()).device)


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


class TrainStep:
    """One training step: forward, loss (with the teacher if the criterion has one), backward, AdamW.

    The optimizer is timm's AdamW with the recipe's settings; ``fused`` selects torch's fused kernel.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, batch_size: int, input_size: int, num_classes: int,
                 device: torch.device, amp_dtype: Optional[torch.dtype], fused: bool) -> None:
        self.model, self.criterion, self.device, self.amp_dtype = model, criterion, device, amp_dtype
        self.x = torch.randn(batch_size, 3, input_size, input_size, device=device)
        self.y = torch.randint(0, num_classes, (batch_size,), device=device)
        self.optimizer = create_optimizer_v2(model, 'adamw', lr=5e-4, weight_decay=0.05,
                                             **({'fused': True} if fused else {}))
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def loss(self) -> torch.Tensor:
        with _autocast(self.device, self.amp_dtype):
            return self.criterion(self.x, self.model(self.x), self.y)

    def __call__(self) -> None:
        loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def release(self) -> None:
        """Free the optimizer state and the gradients (before a larger batch is tried)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()


def inference_step(model: nn.Module, batch_size: int, input_size: int, device: torch.device,
                   amp_dtype: Optional[torch.dtype]) -> Callable[[], None]:
    """A function running one forward of ``model`` on a fixed random batch, without autograd."""
    x = torch.randn(batch_size, 3, input_size, input_size, device=device)

    def step() -> None:
        with torch.inference_mode(), _autocast(device, amp_dtype):
            model(x)
    return step


def _free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def largest_batch(make_step: Callable[[int], Callable[[], None]], device: torch.device, max_batch_size: int
                  ) -> Dict[str, Any]:
    """The paper's protocol: the largest batch that fits, doubling from 32 until CUDA runs out of memory.

    Every batch that fits is also timed once (after a warm-up call, on the eager model even with
    --compile, which would recompile for every new size), so that the JSON shows whether
    throughput still grew at the largest one.
    """
    batch_size, fits, rates = 32, None, {}
    while batch_size <= max_batch_size:
        step = None
        try:
            step = make_step(batch_size)
            step()
            rates[batch_size] = batch_size / time_block(step, 2, device)
            fits = batch_size
        except torch.OutOfMemoryError:
            break
        finally:
            if isinstance(step, TrainStep):
                step.release()
            del step
            _free_cuda()
        batch_size *= 2
    if fits is None:
        raise RuntimeError('even batch 32 does not fit in GPU memory; give a smaller --batch-size')
    return {'batch_size': fits, 'search_img_s': rates}


def peak_memory_gib(step: Callable[[], None], modules: Sequence[nn.Module], device: torch.device
                    ) -> Optional[float]:
    """Peak memory of one call of ``step``, counting the parameters of ``modules`` (CUDA only; None on CPU).

    What other models hold (the second implementation, its optimizer state) is not counted: the
    figure is the memory this computation needs on its own.
    """
    if device.type != 'cuda':
        return None
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    params = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    return (torch.cuda.max_memory_allocated(device) - before + params) / 2**30


# ============ data pipeline ============

def recipe_train_args(input_size: int) -> argparse.Namespace:
    """The flags datasets.build_transform reads, as main.py parses them by default at ``input_size``."""
    return argparse.Namespace(input_size=input_size, **RECIPE_TRANSFORM_ARGS)


def train_transform(input_size: int) -> Callable:
    """The train transform main.py builds with its default flags (the recipe: RandAugment, erasing, ...)."""
    return datasets.build_transform(True, recipe_train_args(input_size))


def write_jpegs(folder: str, n: int, seed: int = 0) -> List[str]:
    """``n`` ImageNet-like JPEGs: 500x375, quality 90, smooth content plus grain, about 100 kB each.

    The grain sets the file size, and with it the decoding work: flat images would decode faster
    than photographs and flatter the data pipeline.
    """
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(JPEG_SIZE, Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 20, (JPEG_SIZE[1], JPEG_SIZE[0], 3))
        path = os.path.join(folder, f'{i:05d}.jpg')
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        files.append(path)
    return files


def find_jpegs(folder: str) -> List[str]:
    files = sorted(f for f in glob.glob(os.path.join(folder, '**', '*'), recursive=True)
                   if f.lower().endswith(('.jpg', '.jpeg')))
    if not files:
        raise ValueError(f'--data-path {folder} holds no .jpg / .jpeg file.')
    return files


class JpegDataset(Dataset):
    """``length`` samples cycling over JPEG files, read as the training datasets read them."""

    def __init__(self, files: Sequence[str], transform: Callable, length: int) -> None:
        self.files, self.transform, self.length = list(files), transform, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.transform(datasets.load_image(self.files[index % len(self.files)])), 0


def _rate_windows(batches, images_per_batch: int, windows: int, min_time: float, header: str,
                  consume: Callable[[Any], None] = lambda b: None) -> List[float]:
    """Images/s over ``windows`` consecutive windows of at least ``min_time`` seconds each."""
    rates = []
    for logger in progress(windows, header, ['img/s'], '{value:.1f}'):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_time:
            consume(next(batches))
            n += images_per_batch
        rates.append(n / (time.perf_counter() - start))
        logger.update(**{'img/s': rates[-1]})
    return rates


def _loader(dataset: Dataset, workers: int, batch_size: int, **kwargs: Any) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False, drop_last=True, **kwargs)


def one_process_rates(dataset: Dataset, repeats: int, min_time: float) -> List[float]:
    """Decode + transform images/s in this process on one thread, as one DataLoader worker runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        samples = (dataset[i] for i in range(len(dataset)))
        next(samples)
        return _rate_windows(samples, 1, repeats, min_time, 'decode + transform, one process')
    finally:
        torch.set_num_threads(threads)


def loader_rates(dataset: Dataset, workers: int, batch_size: int, device: torch.device, pin: bool, repeats: int,
                 min_time: float) -> List[float]:
    """Images/s through a DataLoader of ``workers``, batches copied to ``device`` when it is a GPU.

    The first window is discarded: it drains the batches prefetched while the workers started.
    """
    loader = _loader(dataset, workers, batch_size, pin_memory=pin)
    batches = iter(loader)
    for _ in range(max(workers, 1)):  # every worker has started and delivered once
        next(batches)
    to_device = (lambda b: b[0].to(device, non_blocking=True)) if device.type == 'cuda' else (lambda b: None)
    header = f'DataLoader, {workers} workers{", pinned memory" if pin else ""}'
    rates = _rate_windows(batches, batch_size, repeats + 1, min_time, header, to_device)[1:]
    sync(device)
    del batches
    return rates


def epoch_start_seconds(epoch: Dataset, workers: int, batch_size: int, persistent: bool, repeats: int) -> float:
    """Median wait for the first batch of an epoch after the first (``repeats`` epochs of ``epoch``)."""
    loader = _loader(epoch, workers, batch_size, persistent_workers=persistent)
    waits = []
    for _ in range(repeats + 1):  # the first epoch starts the workers in both cases
        start = time.perf_counter()
        batches = iter(loader)
        next(batches)
        waits.append(time.perf_counter() - start)
        for _ in batches:
            pass
    del loader, batches
    return statistics.median(waits[1:])


def measure_data_pipeline(files: Sequence[str], transform: Callable, workers: int, batch_size: int,
                          device: torch.device, repeats: int, min_time: float) -> Dict[str, Any]:
    """Decode + transform images/s in this process (one core), and through a DataLoader of ``workers``.

    On CUDA the loader is also timed with and without pinned memory (batches copied to the GPU);
    for persistent workers, the wait for the first batch of each epoch after the first is timed
    with and without (median of ``repeats`` epochs of two batches per worker).
    """
    sizes = [os.path.getsize(f) for f in files]
    out = {'files': len(files), 'mean_file_kb': statistics.mean(sizes) / 1e3, 'batch_size': batch_size,
           'workers': workers, 'transform': repr(transform)}

    dataset = JpegDataset(files, transform, 10**9)
    rates = one_process_rates(dataset, repeats, min_time)
    out['one_process_img_s'] = statistics.median(rates)
    out['one_process_repeats'] = rates

    rates = loader_rates(dataset, workers, batch_size, device, device.type == 'cuda', repeats, min_time)
    out['loader_img_s'] = statistics.median(rates)
    out['loader_repeats'] = rates
    out['loader_img_s_per_worker'] = out['loader_img_s'] / max(workers, 1)
    if device.type == 'cuda':
        unpinned = statistics.median(loader_rates(dataset, workers, batch_size, device, False, repeats, min_time))
        out['pin_memory'] = {'pinned_img_s': out['loader_img_s'], 'unpinned_img_s': unpinned,
                             'speedup': out['loader_img_s'] / unpinned}
    else:
        out['pin_memory'] = {'skipped': 'pinned memory speeds up copies to a GPU only'}

    if workers > 0:
        epoch = JpegDataset(files, transform, 2 * workers * batch_size)  # two batches per worker
        first_batch_s = {'persistent' if persistent else 'restarted':
                         epoch_start_seconds(epoch, workers, batch_size, persistent, repeats)
                         for persistent in (True, False)}
        out['persistent_workers'] = {'epoch_start_s': first_batch_s,
                                     'saved_s_per_epoch': first_batch_s['restarted'] - first_batch_s['persistent']}
    else:
        out['persistent_workers'] = {'skipped': 'needs --workers > 0'}
    return out


# ============ epochs of main.py ============

def write_train_val_jpegs(root: str, train_images: int, val_images: int, classes: int = 2) -> None:
    """``root/{train,val}/<class>/`` of ImageNet-like JPEGs (write_jpegs), the classes in turn: a folder main.py
    reads with ``--data-set FOLDER``."""
    for split, n in (('train', train_images), ('val', val_images)):
        for c in range(classes):
            folder = os.path.join(root, split, f'class{c}')
            os.makedirs(folder)
            write_jpegs(folder, len(range(c, n, classes)), seed=c + (split == 'val') * classes)


def main_epoch_seconds(argv: Sequence[str], threads: Optional[int]) -> List[float]:
    """Wall seconds of each epoch of ``python main.py argv``, training and evaluation: from the line that starts
    training to each 'Max accuracy' line that ends an epoch, as they are printed (unbuffered).

    The first epoch also starts the DataLoader workers whatever the settings.
    """
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    if threads:
        env['OMP_NUM_THREADS'] = str(threads)
    command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'main.py'), *argv]
    ends, output = [], []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            if line.startswith(('Start training', 'Max accuracy')):
                ends.append(time.perf_counter())
            output.append(line)
    if proc.returncode != 0:
        raise RuntimeError(f'main.py exited with status {proc.returncode}: {"".join(output[-20:])}')
    return [b - a for a, b in zip(ends, ends[1:])]


def measure_epochs(argv: Sequence[str], threads: Optional[int], rounds: int) -> Dict[str, Any]:
    """Epoch seconds of ``python main.py argv`` with its default loader (workers kept from one pass to the
    next) and with --no-persistent-workers, the two run in turn ``rounds`` times.

    Each run's first epoch, which starts the workers in both, is left out of the medians; the ratio is the
    median over rounds of the paired ratios (restarted / persistent), which cancels the slow spells of a
    shared machine better than a ratio of medians.
    """
    settings = {'persistent': [], 'restarted': ['--no-persistent-workers']}
    epochs: Dict[str, List[List[float]]] = {name: [] for name in settings}
    for logger in progress(rounds, 'main.py epochs', settings, '{value:.3f} s'):
        for name, extra in settings.items():
            epochs[name].append(main_epoch_seconds([*argv, *extra], threads))
            logger.update(**{name: statistics.median(epochs[name][-1][1:])})
    out = {name: {'epoch_s': statistics.median(s for run in runs for s in run[1:]),
                  'first_epoch_s': statistics.median(run[0] for run in runs), 'runs': runs}
           for name, runs in epochs.items()}
    out['ratio_restarted_persistent'] = statistics.median(
        statistics.median(r[1:]) / statistics.median(p[1:]) for p, r in zip(epochs['persistent'], epochs['restarted']))
    return out

"""Speed of the DeiT models against timm's reference implementation and the hardware limit.

For one model name this measures, on CPU or CUDA:
  - inference throughput (the paper's protocol: the largest batch that fits, or --batch-size),
  - training-step throughput (forward, backward, AdamW step), without and with a distillation
    teacher, and the peak memory of each,
  - FLOPs per image (torch's FlopCounterMode, fused attention counted) and the achieved FLOP/s as a
    fraction of a matrix-product peak measured in the same run, device and precision (MFU),
  - the same for timm's own classes built with the same configuration and our weights, timed in
    interleaved repeats and reported as the ratio ours / timm, after checking both give the same
    outputs,
  - the speed options of main.py (fused AdamW, torch.compile, channels_last teacher), each against
    its alternative in interleaved repeats,
  - the data pipeline: JPEG decode + DeiT train transform per process, and a DataLoader with
    --workers workers (pinned memory and persistent workers against their alternatives).

Every figure goes to a table on stdout and to the --json file, rewritten after each part so that a
killed run keeps what it measured.

    python benchmark.py --model deit_tiny_patch16_224 --device cpu --threads 2 --batch-size 32
    python benchmark.py --model deit_base_distilled_patch16_224 --teacher-model regnety_160
"""
import argparse
import ast
import copy
import gc
import glob
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence

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
import main
import models
from losses import DistillationLoss

PARTS = ('flops', 'inference', 'train', 'teacher', 'options', 'data')
AMP_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# ImageNet's training JPEGs average about 110 kB at about 470x390 pixels; 500x375 is a common size.
JPEG_SIZE = (500, 375)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('DeiT benchmark', add_help=False)
    group = parser.add_argument_group('model')
    group.add_argument('--model', default='deit_tiny_patch16_224', type=str,
                       help='model to measure: a DeiT name or any timm name (default: deit_tiny_patch16_224)')
    group.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                       help='extra model arguments, e.g. depth=2 embed_dim=48 num_heads=3 (default: none)')
    group.add_argument('--input-size', default=None, type=int,
                       help="image side in pixels, also passed to the model as img_size (default: the model's)")
    group.add_argument('--nb-classes', default=1000, type=int, help='number of classes (default: 1000)')
    group.add_argument('--drop-path', default=0.1, type=float,
                       help='stochastic depth rate while training, as main.py (default: 0.1)')
    group.add_argument('--teacher-model', default=None, type=str,
                       help='teacher of the distillation part, e.g. regnety_160; the model must then be a '
                            '*_distilled_* one (default: none, the teacher part is skipped)')
    group.add_argument('--channels-last', action='store_true',
                       help='keep the teacher in channels_last memory format, as main.py --channels-last '
                            '(default: off; the options part measures both)')

    group = parser.add_argument_group('measurement')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                       help='cpu or cuda (default: cuda when a GPU is present, else cpu)')
    group.add_argument('--precision', default='auto', choices=('auto', 'fp32', 'bf16', 'fp16'),
                       help='autocast precision; auto is bf16 on CUDA and fp32 on CPU (default: auto)')
    group.add_argument('--compile', action='store_true',
                       help='torch.compile our model and timm\'s; the options part then also times the '
                            'eager model against the compiled one (default: off)')
    group.add_argument('--batch-size', default=None, type=int,
                       help='batch size of every part; without it CUDA doubles the batch from 32 until it '
                            'runs out of memory or reaches --max-batch-size, and CPU uses 32; the data '
                            'loader uses it too, 64 without it (default: none)')
    group.add_argument('--max-batch-size', default=1024, type=int,
                       help='largest batch the CUDA search tries (default: 1024)')
    group.add_argument('--repeats', default=5, type=int,
                       help='timed repeats; figures are their medians (default: 5)')
    group.add_argument('--warmup', default=3, type=int, help='untimed steps before timing (default: 3)')
    group.add_argument('--min-time', default=1.0, type=float,
                       help='seconds each timed repeat lasts at least (default: 1.0)')
    group.add_argument('--threads', default=None, type=int,
                       help='torch CPU threads (default: torch\'s choice)')
    for part in PARTS:
        group.add_argument(f'--skip-{part}', action='store_true', help=f'do not measure the {part} part')
    group.add_argument('--skip-timm', action='store_true',
                       help="do not build and time timm's reference implementation (default: compare)")

    group = parser.add_argument_group('data pipeline')
    group.add_argument('--workers', default=10, type=int,
                       help='DataLoader workers, as main.py --num_workers (default: 10)')
    group.add_argument('--data-path', default=None, type=str,
                       help='folder searched recursively for JPEG files to decode (default: generate '
                            '--data-images ImageNet-sized JPEGs in a temporary folder)')
    group.add_argument('--data-images', default=256, type=int,
                       help='number of JPEGs to generate (default: 256)')

    parser.add_argument('--json', default='benchmark.json', type=str,
                        help="file that receives every figure, '' for none (default: benchmark.json)")
    return parser


# ============ machine and timing ============

def _load_average() -> Optional[float]:
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
        'load_average_1min': _load_average(),
    }
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _time_block(fn: Callable[[], Any], iters: int, device: torch.device) -> float:
    """Seconds per call of ``iters`` consecutive calls."""
    if device.type == 'cuda':
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def time_interleaved(fns: Dict[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int,
                     min_time: float) -> Dict[str, Dict[str, Any]]:
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
            elapsed += _time_block(fn, 1, device)
            calls += 1
        iters[name] = max(1, math.ceil(min_time * calls / max(elapsed, 1e-9)))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_time_block(fn, iters[name], device))
    return {name: {'seconds': statistics.median(t), 'repeats': t, 'iters_per_repeat': iters[name]}
            for name, t in times.items()}


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int, min_time: float) -> Dict[str, Any]:
    """FLOP/s of a large square matrix product: the roof against which MFU is measured."""
    n = 8192 if device.type == 'cuda' else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_interleaved({'mm': lambda: torch.mm(a, b)}, device, 3, repeats, min_time)['mm']['seconds']
    return {'dtype': str(dtype).replace('torch.', ''), 'n': n, 'tflops': 2 * n**3 / t / 1e12}


# ============ FLOP counting ============

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
            criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'none' if teacher is None else 'hard', .5, 1.)
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
            rates[batch_size] = batch_size / _time_block(step, 2, device)
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
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    _sync(device)
    params = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    return (torch.cuda.max_memory_allocated(device) - before + params) / 2**30


# ============ the benchmark ============

class Benchmark:
    """Holds the models, the configuration and the results; each public method measures one part."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        if args.threads:
            torch.set_num_threads(args.threads)
        self.device = torch.device(args.device)
        if self.device.type == 'cuda' and not torch.cuda.is_available():
            raise ValueError(f'--device {args.device}, but torch sees no GPU here; use --device cpu.')
        if args.precision == 'auto':
            args.precision = 'bf16' if self.device.type == 'cuda' else 'fp32'
        self.amp_dtype = AMP_DTYPES[args.precision]
        self.results: Dict[str, Any] = {
            'command': ' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
            'args': dict(vars(args)),
            'machine': machine_info(self.device),
        }
        kwargs = dict(num_classes=args.nb_classes, drop_path_rate=args.drop_path)
        kwargs.update(parse_model_kwargs(args.model_kwargs))
        if args.input_size is not None:
            kwargs['img_size'] = args.input_size
        self.ours = models.build_model(args.model, **kwargs).to(self.device)
        self.input_size = args.input_size or self.ours.pretrained_cfg['input_size'][-1]
        self.models = {'ours': self.ours}
        if isinstance(self.ours, VisionTransformer) and not args.skip_timm:
            self.models['timm'] = timm_reference(self.ours, args.drop_path)
        self.results['model'] = {
            'name': args.model, 'kwargs': kwargs, 'input_size': self.input_size,
            'params': sum(p.numel() for p in self.ours.parameters()),
            'timm_reference': type(self.models['timm']).__module__ + '.' + type(self.models['timm']).__name__
            if 'timm' in self.models else None,
        }
        self.compiled = {name: torch.compile(m) for name, m in self.models.items()} if args.compile else self.models
        self.teacher = None
        if args.teacher_model:
            if not isinstance(self.ours, models.DistilledVisionTransformer):
                raise ValueError(f'--teacher-model needs a distilled student (a *_distilled_* model), '
                                 f'not {args.model}.')
            self.teacher = models.build_model(args.teacher_model, num_classes=args.nb_classes).to(self.device).eval()
            if args.channels_last:
                self.teacher = self.teacher.to(memory_format=torch.channels_last)

    # ---------- helpers ----------
    def save(self) -> None:
        """Rewrite the JSON file atomically, so that a killed run leaves the parts it finished."""
        if not self.args.json:
            return
        tmp = self.args.json + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(self.results, f, indent=2, default=str)
        os.replace(tmp, self.args.json)

    def _time(self, fns: Dict[str, Callable[[], Any]]) -> Dict[str, Dict[str, Any]]:
        a = self.args
        return time_interleaved(fns, self.device, a.warmup, a.repeats, a.min_time)

    def _criterion(self, teacher: Optional[nn.Module]) -> nn.Module:
        return DistillationLoss(nn.CrossEntropyLoss(), teacher, 'hard' if teacher is not None else 'none', 0.5, 1.0)

    def _train_step(self, model: nn.Module, batch_size: int, teacher: Optional[nn.Module] = None,
                    fused: Optional[bool] = None) -> TrainStep:
        model.train()
        # main.py's choice: fused AdamW on CUDA
        fused = self.device.type == 'cuda' if fused is None else fused
        return TrainStep(model, self._criterion(teacher), batch_size, self.input_size, self.args.nb_classes,
                         self.device, self.amp_dtype, fused)

    def _batch(self, make_step: Callable[[int], Callable[[], None]]) -> Dict[str, Any]:
        if self.args.batch_size is not None:
            return {'batch_size': self.args.batch_size}
        if self.device.type != 'cuda':
            return {'batch_size': 32}
        return largest_batch(make_step, self.device, self.args.max_batch_size)

    def _flops(self, key: str) -> Optional[float]:
        return self.results.get('flops', {}).get(key)

    def _report(self, timings: Dict[str, Dict[str, Any]], batch_size: int, gflops: Optional[float]
                ) -> Dict[str, Any]:
        """Images/s, achieved TFLOP/s and MFU of each timed model, and the speed ratio ours / timm."""
        peak = self.results.get('matmul_peak', {}).get('tflops')
        out = {}
        for name, t in timings.items():
            img_s = batch_size / t['seconds']
            tflops = img_s * gflops / 1e3 if gflops else None
            out[name] = dict(t, img_s=img_s, tflops=tflops, mfu=tflops / peak if tflops and peak else None)
        if 'timm' in out:
            # repeat i of ours ran right next to repeat i of timm's: the median of these paired ratios
            # cancels the slow spells of a shared machine better than a ratio of two medians
            pairs = zip(timings['ours']['repeats'], timings['timm']['repeats'])
            out['ratio_ours_timm'] = statistics.median(t_timm / t_ours for t_ours, t_timm in pairs)
        return out

    # ---------- parts ----------
    def check_outputs(self) -> None:
        """Ours and timm's give the same outputs (eval mode, full precision), so both time one computation."""
        if 'timm' not in self.models:
            self.results['outputs'] = {'max_abs_diff': None, 'note': 'no timm reference for this model'}
            return
        x = torch.randn(2, 3, self.input_size, self.input_size, device=self.device)
        with torch.no_grad():
            out = [m.eval()(x) for m in (self.models['ours'], self.models['timm'])]
        self.results['outputs'] = {'max_abs_diff': (out[0] - out[1]).abs().max().item(),
                                   'shape': list(out[0].shape)}

    def measure_peak(self) -> None:
        dtype = self.amp_dtype or torch.float32
        self.results['matmul_peak'] = matmul_peak(self.device, dtype, self.args.repeats, min(self.args.min_time, 0.5))

    def measure_flops(self) -> None:
        """GFLOPs per image of inference, of a training step, and of a training step with the teacher."""
        flops = {}
        for name, model in self.models.items():
            flops[f'{name}_inference_gflops'] = count_flops(model, self.input_size) / 1e9
            flops[f'{name}_train_gflops'] = count_flops(model, self.input_size, train=True) / 1e9
        if self.teacher is not None:
            flops['ours_train_teacher_gflops'] = count_flops(self.ours, self.input_size, True, self.teacher) / 1e9
        flops['inference_gmac'] = flops['ours_inference_gflops'] / 2
        self.results['flops'] = flops

    def measure_inference(self) -> None:
        a = self.args
        for m in self.models.values():
            m.eval()
        search = self._batch(lambda b: inference_step(self.ours, b, self.input_size, self.device, self.amp_dtype))
        bs = search['batch_size']
        steps = {name: inference_step(m, bs, self.input_size, self.device, self.amp_dtype)
                 for name, m in self.compiled.items()}
        memory = {name: peak_memory_gib(step, [self.models[name]], self.device) for name, step in steps.items()}
        res = self._report(self._time(steps), bs, self._flops('ours_inference_gflops'))
        self.results['inference'] = dict(search, precision=a.precision, compile=a.compile, peak_memory_gib=memory,
                                         **res)

    def _measure_train(self, key: str, teacher: Optional[nn.Module], gflops: Optional[float]) -> None:
        a = self.args
        search = self._batch(lambda b: self._train_step(self.ours, b, teacher))
        bs = search['batch_size']
        steps = {name: self._train_step(m, bs, teacher) for name, m in self.compiled.items()}
        memory = {name: peak_memory_gib(step, [self.models[name]] + ([teacher] if teacher else []), self.device)
                  for name, step in steps.items()}
        res = self._report(self._time(steps), bs, gflops)
        for step in steps.values():
            step.release()
        self.results[key] = dict(search, precision=a.precision, compile=a.compile,
                                 fused_adamw=self.device.type == 'cuda', peak_memory_gib=memory, **res)

    def measure_train(self) -> None:
        self._measure_train('train', None, self._flops('ours_train_gflops'))

    def measure_teacher(self) -> None:
        self._measure_train('train_teacher', self.teacher, self._flops('ours_train_teacher_gflops'))
        self.results['train_teacher'].update(teacher=self.args.teacher_model, channels_last=self.args.channels_last)

    def measure_options(self) -> None:
        """main.py's speed options, each timed against its alternative in interleaved repeats."""
        options = {}
        bs = self.results.get('train', {}).get('batch_size') or self.args.batch_size or 32
        model = self.compiled['ours']
        steps = {'fused': self._train_step(model, bs, fused=True), 'unfused': self._train_step(model, bs, fused=False)}
        t = self._time(steps)
        options['fused_adamw'] = {'batch_size': bs, 'speedup': t['unfused']['seconds'] / t['fused']['seconds'],
                                  **{f'{k}_img_s': bs / v['seconds'] for k, v in t.items()}}
        for step in steps.values():
            step.release()
        del steps

        if self.teacher is not None:
            contiguous = copy.deepcopy(self.teacher).to(memory_format=torch.contiguous_format)
            channels_last = copy.deepcopy(self.teacher).to(memory_format=torch.channels_last)
            teachers = {'channels_last': inference_step(channels_last, bs, self.input_size, self.device,
                                                        self.amp_dtype),
                        'contiguous': inference_step(contiguous, bs, self.input_size, self.device, self.amp_dtype)}
            t = self._time(teachers)
            options['teacher_channels_last'] = {
                'batch_size': bs, 'speedup': t['contiguous']['seconds'] / t['channels_last']['seconds'],
                **{f'{k}_img_s': bs / v['seconds'] for k, v in t.items()}}
            del contiguous, channels_last, teachers
        else:
            options['teacher_channels_last'] = {'skipped': 'no --teacher-model'}

        if self.args.compile:
            ibs = self.results.get('inference', {}).get('batch_size') or bs
            self.ours.eval()
            t = self._time({name: inference_step(m, ibs, self.input_size, self.device, self.amp_dtype)
                            for name, m in (('compiled', model), ('eager', self.ours))})
            options['compile_inference'] = {'batch_size': ibs,
                                            'speedup': t['eager']['seconds'] / t['compiled']['seconds']}
            steps = {'compiled': self._train_step(model, bs), 'eager': self._train_step(self.ours, bs)}
            t = self._time(steps)
            options['compile_train'] = {'batch_size': bs, 'speedup': t['eager']['seconds'] / t['compiled']['seconds']}
            for step in steps.values():
                step.release()
        else:
            options['compile_inference'] = options['compile_train'] = {'skipped': 'run with --compile'}
        self.results['options'] = options

    def measure_data(self) -> None:
        """JPEG decode + DeiT train transform: images/s in one process and through the DataLoader."""
        a = self.args
        with tempfile.TemporaryDirectory() as tmp:
            files = find_jpegs(a.data_path) if a.data_path else write_jpegs(tmp, a.data_images)
            self.results['data'] = measure_data_pipeline(
                files, train_transform(self.input_size), a.workers, a.batch_size or 64, self.device,
                a.repeats, a.min_time)

    def run(self) -> int:
        """Measure every part not skipped; returns the number of parts that failed."""
        parts = {'outputs': self.check_outputs, 'matmul_peak': self.measure_peak}
        for part in PARTS:
            key = 'train_teacher' if part == 'teacher' else part
            if getattr(self.args, f'skip_{part}'):
                self.results[key] = {'skipped': f'--skip-{part}'}
            elif part == 'teacher' and self.teacher is None:
                self.results[key] = {'skipped': 'no --teacher-model'}
            else:
                parts[key] = getattr(self, f'measure_{part}')
        failed = 0
        for name, measure in parts.items():
            start = time.perf_counter()
            print(f'measuring {name} ...', flush=True)
            try:
                measure()
            except Exception as e:  # a failed part must not lose the others (OOM, compiler missing, ...)
                failed += 1
                self.results[name] = {'error': f'{type(e).__name__}: {e}'}
                print(f'{name} failed: {type(e).__name__}: {e}', flush=True)
            self.results.setdefault('seconds', {})[name] = time.perf_counter() - start
            self.results['machine']['load_average_1min_end'] = _load_average()
            self.save()
        return failed


def parse_model_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    """['depth=2', 'embed_dim=48'] -> {'depth': 2, 'embed_dim': 48}; values are Python literals."""
    kwargs = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ValueError(f"--model-kwargs takes KEY=VALUE items, got '{item}'.")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


# ============ data pipeline ============

def train_transform(input_size: int) -> Callable:
    """The train transform main.py builds with its default flags (the recipe: RandAugment, erasing, ...)."""
    train_args = main.get_args_parser().parse_args(['--input-size', str(input_size)])
    return datasets.build_transform(True, train_args)


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


def _rate_windows(batches, images_per_batch: int, windows: int, min_time: float,
                  consume: Callable[[Any], None] = lambda b: None) -> List[float]:
    """Images/s over ``windows`` consecutive windows of at least ``min_time`` seconds each."""
    rates = []
    for _ in range(windows):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_time:
            consume(next(batches))
            n += images_per_batch
        rates.append(n / (time.perf_counter() - start))
    return rates


def _loader(dataset: Dataset, workers: int, batch_size: int, **kwargs: Any) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False, drop_last=True, **kwargs)


def measure_data_pipeline(files: Sequence[str], transform: Callable, workers: int, batch_size: int,
                          device: torch.device, repeats: int, min_time: float) -> Dict[str, Any]:
    """Decode + transform images/s in this process (one core), and through a DataLoader of ``workers``.

    The loader's first window is discarded: it drains the batches prefetched while the workers
    started. On CUDA the loader is also timed with and without pinned memory (batches copied to the
    GPU); for persistent workers, the wait for the first batch of each epoch after the first is
    timed with and without (median of ``repeats`` epochs of two batches per worker).
    """
    sizes = [os.path.getsize(f) for f in files]
    out = {'files': len(files), 'mean_file_kb': statistics.mean(sizes) / 1e3, 'batch_size': batch_size,
           'workers': workers, 'transform': repr(transform)}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs one thread
    dataset = JpegDataset(files, transform, 10**9)
    samples = (dataset[i] for i in range(len(dataset)))
    next(samples)
    rates = _rate_windows(samples, 1, repeats, min_time)
    torch.set_num_threads(threads)
    out['one_process_img_s'] = statistics.median(rates)
    out['one_process_repeats'] = rates

    def loader_rate(pin: bool) -> List[float]:
        loader = _loader(dataset, workers, batch_size, pin_memory=pin)
        batches = iter(loader)
        for _ in range(max(workers, 1)):  # every worker has started and delivered once
            next(batches)
        to_device = (lambda b: b[0].to(device, non_blocking=True)) if device.type == 'cuda' else (lambda b: None)
        rates = _rate_windows(batches, batch_size, repeats + 1, min_time, to_device)[1:]
        _sync(device)
        del batches
        return rates

    rates = loader_rate(pin=device.type == 'cuda')
    out['loader_img_s'] = statistics.median(rates)
    out['loader_repeats'] = rates
    out['loader_img_s_per_worker'] = out['loader_img_s'] / max(workers, 1)
    if device.type == 'cuda':
        unpinned = statistics.median(loader_rate(pin=False))
        out['pin_memory'] = {'pinned_img_s': out['loader_img_s'], 'unpinned_img_s': unpinned,
                             'speedup': out['loader_img_s'] / unpinned}
    else:
        out['pin_memory'] = {'skipped': 'pinned memory speeds up copies to a GPU only'}

    if workers > 0:
        epoch = JpegDataset(files, transform, 2 * workers * batch_size)  # two batches per worker
        first_batch_s = {}
        for persistent in (True, False):
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
            first_batch_s['persistent' if persistent else 'restarted'] = statistics.median(waits[1:])
        out['persistent_workers'] = {'epoch_start_s': first_batch_s,
                                     'saved_s_per_epoch': first_batch_s['restarted'] - first_batch_s['persistent']}
    else:
        out['persistent_workers'] = {'skipped': 'needs --workers > 0'}
    return out


# ============ report ============

def _fmt(value: Optional[float], spec: str = '.1f') -> str:
    return '-' if value is None else format(value, spec)


def print_table(results: Dict[str, Any]) -> None:
    """The figures of ``results`` as a plain-text table."""
    m = results['machine']
    print(f"\n{results['command']}")
    print(f"machine: {m['cpu']} ({m['torch_threads']} torch threads, load {_fmt(m['load_average_1min'])} at start), "
          f"GPU: {m['gpu'] or 'none'}, torch {m['torch']}, timm {m['timm']}")
    if 'tflops' in results.get('matmul_peak', {}):
        p = results['matmul_peak']
        print(f"matmul peak ({p['dtype']}, {p['n']}^3): {p['tflops']:.2f} TFLOP/s")
    flops = results.get('flops', {})
    if 'inference_gmac' in flops:
        print(f"FLOPs per image: inference {flops['inference_gmac']:.3f} GMAC, "
              f"training step {flops['ours_train_gflops'] / 2:.3f} GMAC")
    if results.get('outputs', {}).get('max_abs_diff') is not None:
        print(f"ours vs timm, max |output difference|: {results['outputs']['max_abs_diff']:.2e}")
    header = f"{'part':<14}{'batch':>6}{'ours img/s':>12}{'timm img/s':>12}{'ours/timm':>11}" \
             f"{'TFLOP/s':>10}{'MFU %':>8}{'peak GiB':>10}"
    print(header)
    print('-' * len(header))
    for part in ('inference', 'train', 'train_teacher'):
        r = results.get(part, {})
        if 'error' in r:
            print(f'{part:<14} failed: {r["error"]}')
        if 'ours' not in r:
            continue
        ours, ref = r['ours'], r.get('timm', {})
        mem = (r.get('peak_memory_gib') or {}).get('ours')
        print(f"{part:<14}{r['batch_size']:>6}{ours['img_s']:>12.1f}{_fmt(ref.get('img_s')):>12}"
              f"{_fmt(r.get('ratio_ours_timm'), '.3f'):>11}{_fmt(ours['tflops'], '.2f'):>10}"
              f"{_fmt(ours['mfu'] and 100 * ours['mfu'], '.1f'):>8}{_fmt(mem, '.2f'):>10}")
    for name, o in results.get('options', {}).items():
        if isinstance(o, dict) and 'speedup' in o:
            print(f"option {name}: x{o['speedup']:.3f} at batch {o['batch_size']}")
    d = results.get('data', {})
    if 'loader_img_s' in d:
        print(f"data: decode + train transform {d['one_process_img_s']:.0f} img/s in one process; "
              f"DataLoader with {d['workers']} workers {d['loader_img_s']:.0f} img/s "
              f"({d['loader_img_s_per_worker']:.0f} per worker; {d['mean_file_kb']:.0f} kB JPEGs)")
        if 'speedup' in d['pin_memory']:
            print(f"data: pinned memory x{d['pin_memory']['speedup']:.3f}")
        if 'epoch_start_s' in d['persistent_workers']:
            print(f"data: persistent workers save {d['persistent_workers']['saved_s_per_epoch']:.2f} s per epoch")
    for name, r in results.items():
        if isinstance(r, dict) and 'error' in r and name not in ('inference', 'train', 'train_teacher'):
            print(f'{name} failed: {r["error"]}')


if __name__ == '__main__':
    parser = argparse.ArgumentParser('DeiT benchmark', parents=[get_args_parser()])
    args = parser.parse_args()
    if args.repeats < 1 or args.min_time <= 0:
        parser.error('--repeats must be at least 1 and --min-time positive.')
    try:
        benchmark = Benchmark(args)
    except ValueError as e:
        parser.error(str(e))
    failed = benchmark.run()
    print_table(benchmark.results)
    sys.exit(1 if failed else 0)  # a failed part's error is in the JSON and the table

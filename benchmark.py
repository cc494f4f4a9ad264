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
    --workers workers (pinned memory and persistent workers against their alternatives),
  - whole epochs of main.py (its training loader and step, the evaluation of the model and its EMA) on a
    folder of generated JPEGs, with main.py's default loader settings and with --no-persistent-workers.

Every figure goes to a table on stdout and to the --json file, rewritten after each part so that a
killed run keeps what it measured. The measurements themselves are in measure.py; this file chooses
the parts, runs them and reports. Each timed repeat prints a progress line with its ETA first.

    python benchmark.py --model deit_tiny_patch16_224 --device cpu --threads 2 --batch-size 32
    python benchmark.py --model deit_base_distilled_patch16_224 --teacher-model regnety_160
"""
import argparse
import ast
import copy
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

import measure
import models

PARTS = ('flops', 'inference', 'train', 'teacher', 'options', 'data', 'epoch')
# benchmark.py's --precision as main.py's
MAIN_PRECISION = {'fp32': 'off', 'bf16': 'bf16', 'fp16': 'fp16'}
AMP_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


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

    group = parser.add_argument_group('epochs of main.py')
    group.add_argument('--epoch-images', default=256, type=int,
                       help='training images of the generated folder that main.py trains on, a quarter as many '
                            'validation images; batches of --batch-size (64 without it) (default: 256)')
    group.add_argument('--epochs', default=3, type=int,
                       help='epochs of each main.py run; the first, which starts the workers, is not counted '
                            '(default: 3); --repeats runs with each loader setting')

    parser.add_argument('--json', default='benchmark.json', type=str,
                        help="file that receives every figure, '' for none (default: benchmark.json)")
    return parser


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


# ============ the benchmark ============

class Benchmark:
    """Holds the models, the configuration and the results; each ``measure_*`` method measures one part."""

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
            'machine': measure.machine_info(self.device),
        }
        self._build_models()
        self.teacher = self._build_teacher()

    def _build_models(self) -> None:
        """Our model, timm's reference with our weights, and their compiled versions with --compile."""
        args = self.args
        kwargs = dict(num_classes=args.nb_classes, drop_path_rate=args.drop_path)
        kwargs.update(parse_model_kwargs(args.model_kwargs))
        if args.input_size is not None:
            kwargs['img_size'] = args.input_size
        self.ours = models.build_model(args.model, **kwargs).to(self.device)
        self.input_size = args.input_size or self.ours.pretrained_cfg['input_size'][-1]
        self.models = {'ours': self.ours}
        if isinstance(self.ours, VisionTransformer) and not args.skip_timm:
            self.models['timm'] = measure.timm_reference(self.ours, args.drop_path)
        reference = self.models.get('timm')
        self.results['model'] = {
            'name': args.model, 'kwargs': kwargs, 'input_size': self.input_size,
            'params': sum(p.numel() for p in self.ours.parameters()),
            'timm_reference': None if reference is None else f'{type(reference).__module__}.{type(reference).__name__}',
        }
        self.compiled = {name: torch.compile(m) for name, m in self.models.items()} if args.compile else self.models

    def _build_teacher(self) -> Optional[nn.Module]:
        args = self.args
        if not args.teacher_model:
            return None
        if not isinstance(self.ours, models.DistilledVisionTransformer):
            raise ValueError(f'--teacher-model needs a distilled student (a *_distilled_* model), not {args.model}.')
        teacher = models.build_model(args.teacher_model, num_classes=args.nb_classes).to(self.device).eval()
        return teacher.to(memory_format=torch.channels_last) if args.channels_last else teacher

    # ---------- helpers ----------
    def save(self) -> None:
        """Rewrite the JSON file atomically, so that a killed run leaves the parts it finished."""
        if not self.args.json:
            return
        tmp = self.args.json + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(self.results, f, indent=2, default=str)
        os.replace(tmp, self.args.json)

    def _time(self, fns: Dict[str, Callable[[], Any]], header: str) -> Dict[str, Dict[str, Any]]:
        a = self.args
        return measure.time_interleaved(fns, self.device, a.warmup, a.repeats, a.min_time, header)

    def _train_step(self, model: nn.Module, batch_size: int, teacher: Optional[nn.Module] = None,
                    fused: Optional[bool] = None) -> measure.TrainStep:
        model.train()
        # main.py's choice: fused AdamW on CUDA
        fused = self.device.type == 'cuda' if fused is None else fused
        return measure.TrainStep(model, measure.distillation_criterion(teacher), batch_size, self.input_size,
                                 self.args.nb_classes, self.device, self.amp_dtype, fused)

    def _inference_step(self, model: nn.Module, batch_size: int) -> Callable[[], None]:
        return measure.inference_step(model, batch_size, self.input_size, self.device, self.amp_dtype)

    def _batch(self, make_step: Callable[[int], Callable[[], None]]) -> Dict[str, Any]:
        if self.args.batch_size is not None:
            return {'batch_size': self.args.batch_size}
        if self.device.type != 'cuda':
            return {'batch_size': 32}
        return measure.largest_batch(make_step, self.device, self.args.max_batch_size)

    def _flops(self, key: str) -> Optional[float]:
        return self.results.get('flops', {}).get(key)

    def _throughput(self, timings: Dict[str, Dict[str, Any]], batch_size: int, gflops: Optional[float]
                    ) -> Dict[str, Any]:
        return measure.throughput(timings, batch_size, gflops, self.results.get('matmul_peak', {}).get('tflops'))

    @staticmethod
    def _speedup(timings: Dict[str, Dict[str, Any]], batch_size: int, fast: str, slow: str) -> Dict[str, Any]:
        """How many times faster ``fast`` ran than ``slow``, and the images/s of each."""
        return {'batch_size': batch_size, 'speedup': timings[slow]['seconds'] / timings[fast]['seconds'],
                **{f'{k}_img_s': batch_size / v['seconds'] for k, v in timings.items()}}

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
        self.results['matmul_peak'] = measure.matmul_peak(self.device, dtype, self.args.repeats,
                                                          min(self.args.min_time, 0.5))

    def measure_flops(self) -> None:
        """GFLOPs per image of inference, of a training step, and of a training step with the teacher."""
        flops = {}
        for name, model in self.models.items():
            flops[f'{name}_inference_gflops'] = measure.count_flops(model, self.input_size) / 1e9
            flops[f'{name}_train_gflops'] = measure.count_flops(model, self.input_size, train=True) / 1e9
        if self.teacher is not None:
            flops['ours_train_teacher_gflops'] = measure.count_flops(self.ours, self.input_size, True,
                                                                     self.teacher) / 1e9
        flops['inference_gmac'] = flops['ours_inference_gflops'] / 2
        self.results['flops'] = flops

    def measure_inference(self) -> None:
        a = self.args
        for m in self.models.values():
            m.eval()
        search = self._batch(lambda b: self._inference_step(self.ours, b))
        bs = search['batch_size']
        steps = {name: self._inference_step(m, bs) for name, m in self.compiled.items()}
        memory = {name: measure.peak_memory_gib(step, [self.models[name]], self.device) for name, step in steps.items()}
        res = self._throughput(self._time(steps, 'inference'), bs, self._flops('ours_inference_gflops'))
        self.results['inference'] = dict(search, precision=a.precision, compile=a.compile, peak_memory_gib=memory,
                                         **res)

    def _measure_train(self, key: str, teacher: Optional[nn.Module], gflops: Optional[float]) -> None:
        a = self.args
        search = self._batch(lambda b: self._train_step(self.ours, b, teacher))
        bs = search['batch_size']
        steps = {name: self._train_step(m, bs, teacher) for name, m in self.compiled.items()}
        memory = {name: measure.peak_memory_gib(step, [self.models[name]] + ([teacher] if teacher else []),
                                                self.device)
                  for name, step in steps.items()}
        res = self._throughput(self._time(steps, key), bs, gflops)
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
        bs = self.results.get('train', {}).get('batch_size') or self.args.batch_size or 32
        options = {'fused_adamw': self._option_fused_adamw(bs)}
        if self.teacher is not None:
            options['teacher_channels_last'] = self._option_teacher_channels_last(bs)
        else:
            options['teacher_channels_last'] = {'skipped': 'no --teacher-model'}
        if self.args.compile:
            options.update(self._option_compile(bs))
        else:
            options['compile_inference'] = options['compile_train'] = {'skipped': 'run with --compile'}
        self.results['options'] = options

    def _option_fused_adamw(self, bs: int) -> Dict[str, Any]:
        model = self.compiled['ours']
        steps = {'fused': self._train_step(model, bs, fused=True), 'unfused': self._train_step(model, bs, fused=False)}
        t = self._time(steps, 'fused_adamw')
        for step in steps.values():
            step.release()
        return self._speedup(t, bs, 'fused', 'unfused')

    def _option_teacher_channels_last(self, bs: int) -> Dict[str, Any]:
        contiguous = copy.deepcopy(self.teacher).to(memory_format=torch.contiguous_format)
        channels_last = copy.deepcopy(self.teacher).to(memory_format=torch.channels_last)
        teachers = {'channels_last': self._inference_step(channels_last, bs),
                    'contiguous': self._inference_step(contiguous, bs)}
        return self._speedup(self._time(teachers, 'teacher_channels_last'), bs, 'channels_last', 'contiguous')

    def _option_compile(self, bs: int) -> Dict[str, Dict[str, Any]]:
        """The compiled model against the eager one, in inference (at the inference part's batch) and training."""
        ibs = self.results.get('inference', {}).get('batch_size') or bs
        model = self.compiled['ours']
        self.ours.eval()
        t = self._time({name: self._inference_step(m, ibs) for name, m in (('compiled', model), ('eager', self.ours))},
                       'compile_inference')
        out = {'compile_inference': {'batch_size': ibs, 'speedup': t['eager']['seconds'] / t['compiled']['seconds']}}
        steps = {'compiled': self._train_step(model, bs), 'eager': self._train_step(self.ours, bs)}
        t = self._time(steps, 'compile_train')
        out['compile_train'] = {'batch_size': bs, 'speedup': t['eager']['seconds'] / t['compiled']['seconds']}
        for step in steps.values():
            step.release()
        return out

    def measure_data(self) -> None:
        """JPEG decode + DeiT train transform: images/s in one process and through the DataLoader."""
        a = self.args
        with tempfile.TemporaryDirectory() as tmp:
            files = measure.find_jpegs(a.data_path) if a.data_path else measure.write_jpegs(tmp, a.data_images)
            self.results['data'] = measure.measure_data_pipeline(
                files, measure.train_transform(self.input_size), a.workers, a.batch_size or 64, self.device,
                a.repeats, a.min_time)

    def measure_epoch(self) -> None:
        """Epochs of main.py with its default loader settings, against --no-persistent-workers."""
        a = self.args
        if a.model_kwargs:
            self.results['epoch'] = {'skipped': 'main.py builds --model without --model-kwargs'}
            return
        batch_size, val_images = a.batch_size or 64, max(a.epoch_images // 4, 1)
        with tempfile.TemporaryDirectory() as tmp:
            measure.write_train_val_jpegs(tmp, a.epoch_images, val_images)
            argv = ['--model', a.model, '--input-size', str(self.input_size), '--data-set', 'FOLDER', '--data-path',
                    tmp, '--batch-size', str(batch_size), '--num_workers', str(a.workers), '--epochs', str(a.epochs),
                    '--device', a.device, '--precision', MAIN_PRECISION[a.precision]]
            self.results['epoch'] = dict(measure.measure_epochs(argv, a.threads, a.repeats), argv=argv,
                                         batch_size=batch_size, workers=a.workers, train_images=a.epoch_images,
                                         val_images=val_images)

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
        for name, measure_part in parts.items():
            start = time.perf_counter()
            print(f'measuring {name} ...', flush=True)
            try:
                measure_part()
            except Exception as e:  # a failed part must not lose the others (OOM, compiler missing, ...)
                failed += 1
                self.results[name] = {'error': f'{type(e).__name__}: {e}'}
                print(f'{name} failed: {type(e).__name__}: {e}', flush=True)
            self.results.setdefault('seconds', {})[name] = time.perf_counter() - start
            self.results['machine']['load_average_1min_end'] = measure.load_average()
            self.save()
        return failed


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
    e = results.get('epoch', {})
    if 'ratio_restarted_persistent' in e:
        print(f"epoch of main.py ({e['workers']} workers, batch {e['batch_size']}, {e['train_images']} training and "
              f"{e['val_images']} validation images): {e['persistent']['epoch_s']:.3f} s, "
              f"{e['restarted']['epoch_s']:.3f} s with --no-persistent-workers "
              f"(x{e['ratio_restarted_persistent']:.3f})")
    for name, r in results.items():
        if isinstance(r, dict) and 'error' in r and name not in ('inference', 'train', 'train_teacher'):
            print(f'{name} failed: {r["error"]}')


def cli() -> None:
    parser = argparse.ArgumentParser('DeiT benchmark', parents=[get_args_parser()])
    args = parser.parse_args()
    if args.repeats < 1 or args.min_time <= 0:
        parser.error('--repeats must be at least 1 and --min-time positive.')
    if args.epochs < 2 or args.epoch_images < 1:
        parser.error('--epochs must be at least 2 (the first is not counted) and --epoch-images positive.')
    try:
        benchmark = Benchmark(args)
    except ValueError as e:
        parser.error(str(e))
    failed = benchmark.run()
    print_table(benchmark.results)
    sys.exit(1 if failed else 0)  # a failed part's error is in the JSON and the table


if __name__ == '__main__':
    cli()

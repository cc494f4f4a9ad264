"""The declared version floors hold: CI installs exactly the lower bounds of requirements.txt (.ci/floors.txt)
and runs the suite there, and the code keeps to what those versions offer."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from packaging.version import Version
from timm.models.vision_transformer import VisionTransformer

import models

ROOT = Path(__file__).resolve().parents[1]
# One of two processes: 20 times a gloo group, one reduction, the group destroyed.
GLOO_CYCLES = """
import sys
import torch.distributed as dist
import utils
rank, folder = int(sys.argv[1]), sys.argv[2]
for cycle in range(20):
    dist.init_process_group('gloo', init_method=f'file://{folder}/store{cycle}', rank=rank, world_size=2)
    assert utils.all_reduce_sum([1.0]) == [2.0]
    dist.destroy_process_group()
"""


def pins(path: Path, operator: str) -> dict:
    """{package: version} of a requirements file whose every requirement is ``name<operator>version``."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split('#', 1)[0].strip()
        if line:
            name, _, version = line.partition(operator)
            assert re.fullmatch(r'[A-Za-z0-9_.-]+', name) and version, f'{path.name}: not name{operator}version: {line}'
            found[name.lower()] = Version(version)
    return found


def test_the_floors_file_pins_exactly_the_lower_bounds_of_requirements():
    assert pins(ROOT / '.ci' / 'floors.txt', '==') == pins(ROOT / 'requirements.txt', '>=')


def test_deits_build_with_the_init_weights_of_timm_before_1_0_23(monkeypatch):
    """timm 1.0.3-1.0.22's ``VisionTransformer.init_weights(self, mode='')`` has no ``needs_reset``; its
    ``__init__`` calls ``self.init_weights(weight_init)``."""
    timm_init = VisionTransformer.init_weights
    modes = []

    def init_weights(self, mode=''):
        modes.append(mode)
        timm_init(self, mode)

    monkeypatch.setattr(VisionTransformer, 'init_weights', init_weights)
    torch.manual_seed(0)
    for name in ('deit_tiny_patch16_224', 'deit_tiny_distilled_patch16_224'):
        # weight_init='skip' keeps this timm's __init__ from calling init_weights(needs_reset=False); the call
        # below is the one the older __init__ makes.
        model = timm.create_model(name, depth=2, weight_init='skip')
        assert isinstance(model, models.DeiT)
        model.init_weights('')
        assert model.cls_token.std() > 1e-3  # then the class token as timm 0.3.2 drew it (timm's: std 1e-6)
    assert modes == ['', '']


@pytest.mark.skipif(torch.__version__ >= (2, 8), reason='torch >= 2.8 destroys a process group without the GIL')
def test_gloo_processes_end_after_a_reduction(tmp_path):
    """torch < 2.8 hung in destroy_process_group() when a gloo worker still held the last reduced tensor."""
    processes = [subprocess.Popen([sys.executable, '-c', GLOO_CYCLES, str(rank), str(tmp_path)], cwd=ROOT,
                                  env={**os.environ, 'OMP_NUM_THREADS': '1'}) for rank in (0, 1)]
    try:
        assert [p.wait(timeout=60) for p in processes] == [0, 0]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()

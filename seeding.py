"""Seeds per optimizer step and per training sample, so that a run stopped at any step and resumed draws what
the run that never stopped drew.

A stop in the middle of an epoch (SIGTERM, SIGUSR1, a preemption) resumes at the step it reached
(stopping.skip_batches), in a new process with new DataLoader workers, without loading the batches before it.
A draw that depended on the draws before it in its process would then differ. So none does:

- each training sample's augmentations (RandAugment: python's ``random`` and numpy; crop, flip, random
  erasing: torch and ``random``) draw from generators seeded for that sample from (seed, rank, epoch, its
  position in the epoch), in whichever process or worker loads it: SeededSampler pairs each index with that
  key, and SeededDataset seeds the generators from it before it loads the sample;
- each optimizer step's draws in the training process (mixup / cutmix from numpy, drop path and dropout
  from torch) come from generators seeded at the start of the step from (seed, rank, step): seed_step.

Nothing needs to be saved with a checkpoint. The other way, saving the generators' states with a mid-epoch
checkpoint, would need the states of the DataLoader workers too, which torch does not expose, and would still
leave the skipped batches' augmentations undrawn.

builders.seed_everything seeds the run's start (seed + rank) and each epoch (seed, rank, epoch).
"""
import random
from contextlib import contextmanager
from typing import Any, Iterator, List, Sized, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

# The last word of every key names its kind: numpy's SeedSequence pads a key shorter than 4 words with zeros,
# so with a tag of 0, or none, the key of step 0 of epoch 3 would be builders.seed_everything's (seed, rank, 3).
STEP, SAMPLE = 1, 2


def _seeds(*key: int) -> List[int]:
    """Three independent 32-bit seeds (torch, numpy, random) from ``key``."""
    return np.random.SeedSequence(list(key)).generate_state(3).tolist()


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed torch (CPU and CUDA), numpy and random for the optimizer step ``step`` of the run (its index from the
    first step of epoch 0), on process ``rank``."""
    torch_seed, numpy_seed, python_seed = _seeds(seed, rank, step, STEP)
    torch.manual_seed(torch_seed)
    np.random.seed(numpy_seed)
    random.seed(python_seed)


@contextmanager
def _seeded_generators(key: Tuple[int, ...]) -> Iterator[None]:
    """Seed torch's CPU generator, numpy's and python's global generators from ``key``; in the main process
    (a loader without workers) put their states back afterwards, so that the training process draws the
    same whether its samples are loaded there or in workers. A worker's generators serve only its samples."""
    restore = get_worker_info() is None
    if restore:
        states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch_seed, numpy_seed, python_seed = _seeds(*key, SAMPLE)
    torch.default_generator.manual_seed(torch_seed)  # the transforms run on the CPU
    np.random.seed(numpy_seed)
    random.seed(python_seed)
    try:
        yield
    finally:
        if restore:
            torch.set_rng_state(states[0])
            np.random.set_state(states[1])
            random.setstate(states[2])


class SeededSampler(Sampler[Tuple[int, Tuple[int, int, int, int]]]):
    """The indices of ``sampler``, each paired with the key of its sample's seeds: (seed, rank, epoch, position
    in the epoch).

    Args:
        sampler: the training sampler (RandomSampler, DistributedSampler, RASampler); its set_epoch, if any, is
            called by this one's.
        seed: the run's --seed.
        rank: this process's rank: the copies of an image that repeated augmentation puts at the same position
            on several processes are augmented differently.
    """

    def __init__(self, sampler: Sampler[int], seed: int, rank: int) -> None:
        self.sampler = sampler
        self.seed = seed
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the keys (and of the sampler's order, when it has one per epoch)."""
        self.epoch = epoch
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Tuple[int, Tuple[int, int, int, int]]]:
        for position, index in enumerate(self.sampler):
            yield index, (self.seed, self.rank, self.epoch, position)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededDataset(Dataset):
    """``dataset`` indexed by SeededSampler's pairs: item (index, key) is ``dataset[index]`` loaded with the
    random generators seeded from ``key``, its augmentations the same in any process."""

    def __init__(self, dataset: Sized) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Tuple[int, Tuple[int, ...]]) -> Any:
        index, key = item
        with _seeded_generators(key):
            return self.dataset[index]

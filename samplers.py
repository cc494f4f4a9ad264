"""Repeated augmentation (Hoffer et al., 2020; Berman et al., 2019) as a distributed sampler."""
import math
from typing import Iterator, Optional, Sized

import torch
from torch.utils.data import Sampler

import utils


class RASampler(Sampler[int]):
    """Each epoch draws about len(dataset) / num_repeats samples and yields each one num_repeats times.

    The copies of a sample sit next to each other in a shuffled list that is dealt out to the replicas in
    turn, so with at least num_repeats replicas they land on different replicas (and are augmented
    differently); with one replica they follow each other. Each replica yields
    floor(len(dataset) // 256 * 256 / num_replicas) indices, as the original (160,128 for ImageNet-1k on
    8 replicas), or ceil(len(dataset) / num_replicas) where that would be 0 (datasets under 256 images, on
    which the original yields nothing). The order depends only on (seed, epoch), like DistributedSampler.

    Args:
        dataset: anything with a length.
        num_replicas: number of processes (default: the torch.distributed world size, 1 without it).
        rank: this process's rank (default: the torch.distributed rank, 0 without it).
        shuffle: shuffle the samples (otherwise dataset order).
        num_repeats: copies of each drawn sample per epoch.
        seed: base seed of the shuffle; call set_epoch(epoch) before each epoch.
    """

    def __init__(self, dataset: Sized, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 shuffle: bool = True, num_repeats: int = 3, seed: int = 0) -> None:
        num_replicas = utils.get_world_size() if num_replicas is None else num_replicas
        rank = utils.get_rank() if rank is None else rank
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f'RASampler needs num_replicas >= 1 and 0 <= rank < num_replicas, '
                             f'got num_replicas={num_replicas}, rank={rank}')
        if num_repeats < 1:
            raise ValueError(f'num_repeats must be >= 1, got {num_repeats}')
        if len(dataset) == 0:
            raise ValueError('RASampler got an empty dataset')
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.num_repeats = num_repeats
        self.seed = seed
        self.epoch = 0
        self.num_samples = math.ceil(len(dataset) * num_repeats / num_replicas)  # per replica, before the cut
        self.total_size = self.num_samples * num_replicas
        # the original rounds the epoch down to a multiple of 256 images, which leaves nothing under 256
        self.num_selected_samples = (len(dataset) // 256 * 256 // num_replicas
                                     or math.ceil(len(dataset) / num_replicas))

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of this epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        indices = torch.repeat_interleave(order, self.num_repeats)
        # pad cyclically to a multiple of num_replicas (more than one pass only on tiny datasets)
        indices = indices.repeat(math.ceil(self.total_size / len(indices)))[:self.total_size]
        mine = indices[self.rank:self.total_size:self.num_replicas]
        return iter(mine[:self.num_selected_samples].tolist())

    def __len__(self) -> int:
        return self.num_selected_samples

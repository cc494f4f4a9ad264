"""RASampler: epoch length, placement of the copies, coverage, determinism, the original's order."""
import math
from collections import Counter

import pytest
import torch

from samplers import RASampler


def draw(n, replicas, epoch=0, seed=0, repeats=3):
    """Indices of every replica for one epoch: [replica][position]."""
    out = []
    for rank in range(replicas):
        sampler = RASampler(range(n), num_replicas=replicas, rank=rank, num_repeats=repeats, seed=seed)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_imagenet_per_replica_length_matches_original():
    # ImageNet-1k train: 1,281,167 images; the original's floor(n // 256 * 256 / 8) = 160,128
    for rank in (0, 7):
        sampler = RASampler(range(1_281_167), num_replicas=8, rank=rank)
        assert len(sampler) == 160_128
        assert len(list(sampler)) == 160_128


@pytest.mark.parametrize('replicas', [3, 4, 8])
def test_copies_fall_on_distinct_replicas(replicas):
    per_replica = draw(1000, replicas)
    for rank_indices in per_replica:
        # a replica never holds two copies of one sample in the same epoch
        assert max(Counter(rank_indices).values()) == 1
    everything = Counter(i for r in per_replica for i in r)
    assert sum(c == 3 for c in everything.values()) >= len(everything) - 2


def test_one_epoch_draws_a_third_of_the_dataset_three_times():
    n, replicas = 1024, 4
    counts = Counter(i for r in draw(n, replicas) for i in r)
    assert sum(counts.values()) == n  # epoch length about one pass of the dataset
    assert len(counts) in (n // 3, n // 3 + 1)
    full = [i for i, c in counts.items() if c == 3]
    assert len(full) == n // 3 and max(counts.values()) == 3


def test_a_few_epochs_reach_every_sample():
    n = 1024
    seen = set()
    for epoch in range(40):  # each epoch misses a sample with probability 2/3: 1024 * (2/3)**40 < 1e-4
        seen.update(i for r in draw(n, 4, epoch=epoch) for i in r)
    assert seen == set(range(n))


def test_order_depends_only_on_seed_and_epoch():
    assert draw(500, 2, epoch=3, seed=7) == draw(500, 2, epoch=3, seed=7)
    assert draw(500, 2, epoch=3, seed=7) != draw(500, 2, epoch=4, seed=7)
    assert draw(500, 2, epoch=3, seed=7) != draw(500, 2, epoch=3, seed=8)
    sampler = RASampler(range(500), num_replicas=1, rank=0)
    sampler.set_epoch(5)
    assert list(sampler) == list(sampler)


def original_order(n, replicas, rank, epoch):
    """The original's RASampler (facebookresearch/deit, samplers.py) for one replica, written out: a permutation
    from a generator seeded with the epoch alone, each index 3 times in a row, the list's head appended up to a
    multiple of the replicas, every replicas-th index from the rank, cut to floor(n // 256 * 256 / replicas)."""
    g = torch.Generator()
    g.manual_seed(epoch)
    indices = [i for i in torch.randperm(n, generator=g).tolist() for _ in range(3)]
    total_size = math.ceil(n * 3 / replicas) * replicas
    indices += indices[:total_size - len(indices)]
    return indices[rank:total_size:replicas][:math.floor(n // 256 * 256 / replicas)]


@pytest.mark.parametrize('n,replicas', [(1000, 1), (1000, 3), (1281, 8)])
def test_seed_0_draws_the_originals_order_index_for_index(n, replicas):
    for epoch in (0, 1, 7):
        assert draw(n, replicas, epoch=epoch, seed=0) == [original_order(n, replicas, r, epoch)
                                                          for r in range(replicas)], epoch


@pytest.mark.parametrize('n,replicas', [(100, 1), (100, 8), (1, 8), (255, 2)])
def test_small_dataset_is_not_empty(n, replicas):
    per_replica = draw(n, replicas)
    for indices in per_replica:
        assert len(indices) == -(-n // replicas) > 0
        assert all(0 <= i < n for i in indices)


def test_single_process_without_distributed():
    sampler = RASampler(range(300))  # no process group: one replica, rank 0
    indices = list(sampler)
    assert len(indices) == len(sampler) == 256
    # one replica: the three copies of a sample are consecutive
    assert all(indices[k] == indices[k + 1] == indices[k + 2] for k in range(0, 255, 3))


def test_shuffle_off_keeps_dataset_order():
    assert list(RASampler(range(10), num_replicas=1, rank=0, shuffle=False)) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match='rank'):
        RASampler(range(10), num_replicas=2, rank=2)
    with pytest.raises(ValueError, match='empty'):
        RASampler([], num_replicas=1, rank=0)

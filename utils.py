"""Distributed setup, metric logging and checkpoint I/O: what every other file shares."""
import torch.distributed as dist

# ============ distributed ============


def is_dist_avail_and_initialized() -> bool:
    """True inside an initialised torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


# ============ metric logging ============


# ============ checkpoint I/O ============

"""Several processes under torchrun, and nothing at all under plain `python`.

    torchrun --standalone --nproc_per_node=4 train_teacher.py --device cuda ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `init` then joins the process group (NCCL on GPUs,
gloo on CPU) and gives each process its own GPU. Without torchrun, rank is 0, world is 1 and every
helper here does nothing, so the single-process commands stay exactly as they were.
"""
import os

import torch
import torch.distributed as dist


def init(device):
    """(rank, world size, this process's device). Safe to call twice (train_refiner may train a
    teacher)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return dist.get_rank(), world, device


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def main_first(fn):
    """fn() on rank 0, then on the others: fn caches its result on disk, so they read what rank 0
    wrote."""
    if not is_main():
        barrier()
    out = fn()
    if is_main():
        barrier()
    return out


def mean_over_ranks(value):
    """The mean of a scalar tensor over all processes (for logging: every rank sees the same
    number)."""
    if not dist.is_initialized():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def finish():
    if dist.is_initialized():
        dist.destroy_process_group()

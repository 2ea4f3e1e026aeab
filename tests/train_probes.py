"""Probes that the training-loop tests plug into the real loop through its configuration (class names):
a loss without random draws, and an optimizer that records the gradient the loop hands it."""

import os

import torch

from training.loss import edm_weight


class DeterministicLoss:
    """The EDM-weighted denoising loss with sigma and noise derived from each image itself (no random
    numbers), so the gradient does not depend on how a batch is split into rounds or ranks. With
    `record_to`, every rank saves the images and labels it was given to <record_to>.rank<r>."""

    def __init__(self, record_to=None):
        self.record_to = record_to
        self.seen = []

    def __call__(self, net, images, labels=None, augment_pipe=None):
        assert augment_pipe is None
        if self.record_to is not None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            self.seen.append((images.detach().clone(), labels.detach().clone()))
            torch.save(self.seen, f'{self.record_to}.rank{rank}')
        sigma = (images.mean(dim=[1, 2, 3], keepdim=True) * 2).exp()  # one noise level per image
        noise = torch.sin(images * 12.9898 + images.roll(1, dims=-1) * 78.233) * sigma
        denoised = net(images + noise, sigma, labels)
        return edm_weight(sigma) * (denoised - images) ** 2


class GradientRecorder(torch.optim.Adam):
    """Adam that saves, at its first step, the parameters and the gradients it was given (rank 0)."""

    def __init__(self, params, record_to, **kwargs):
        super().__init__(params, **kwargs)
        self.record_to = record_to
        self.recorded = False

    def step(self, closure=None):
        if not self.recorded:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            if rank == 0:
                params = [p for group in self.param_groups for p in group['params']]
                torch.save(dict(params=[p.detach().clone() for p in params],
                                grads=[p.grad.detach().clone() for p in params]), self.record_to)
            self.recorded = True
        return super().step(closure)


def distributed_worker(rank, world, port, kwargs):
    """torch.multiprocessing.spawn target: one rank of training_loop(**kwargs) over gloo."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from torch_utils import distributed as dist
    from training import training_loop
    try:
        training_loop.training_loop(**kwargs)
    finally:
        dist.shutdown()

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
        # Rank 0 hosts the rendezvous store here (no torchrun agent): if it exits while rank 1 still tears
        # down, rank 1 aborts at exit ('terminate called without an active exception', ~1 run in 3).
        dist.barrier()
    finally:
        dist.shutdown()


class NonFiniteLoss:
    """The EDM loss, made NaN from the `first`-th call on (call indices count from 0) on the ranks listed in
    `ranks` (None = all), for `count` calls (None = for ever): a divergence the test controls exactly."""

    def __init__(self, first, count=None, ranks=None, **edm_kwargs):
        from training.loss import EDMLoss
        self.loss = EDMLoss(**edm_kwargs)
        self.first, self.count, self.ranks = first, count, ranks
        self.calls = 0

    def __call__(self, net, images, labels=None, augment_pipe=None):
        loss = self.loss(net=net, images=images, labels=labels, augment_pipe=augment_pipe)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        call, self.calls = self.calls, self.calls + 1
        bad = call >= self.first and (self.count is None or call < self.first + self.count)
        if bad and (self.ranks is None or rank in self.ranks):
            loss = loss * float('nan')
        return loss


def diverging_worker(rank, world, port, kwargs, result_dir):
    """torch.multiprocessing.spawn target: one rank of a run that diverges; writes what ended it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from torch_utils import distributed as dist
    from training import training_loop
    try:
        training_loop.training_loop(**kwargs)
        outcome = 'finished'
    except training_loop.TrainingDiverged as e:
        outcome = f'diverged: {e}'
    finally:
        dist.shutdown()
    with open(os.path.join(result_dir, f'rank{rank}.txt'), 'w') as f:
        f.write(outcome)

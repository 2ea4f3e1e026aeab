"""Feature extraction on every rank: float64 sums for mean and covariance (the FID path), and optionally the
features themselves (KID, precision/recall, confidence intervals), gathered to every rank ordered by key
(seed or dataset index), so the result depends neither on batch size nor on the number of processes.

Image sources: `NetworkSource` (a network + sampler configuration on a seed list, generated in memory) and
`ImageSource` (a folder or zip of images, or a dataset in the training format). Each yields this rank's
(keys, uint8 [N, C, H, W]) batches.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import tqdm

from dnnlib.util import first_line
from metrics.errors import MetricsError
from metrics.maths import mean_and_covariance
from torch_utils import distributed as dist
from training.sampling import generate_images


@dataclasses.dataclass
class FeatureStats:
    mu: np.ndarray      # [D] float64
    sigma: np.ndarray   # [D, D] float64, unbiased (N - 1)
    num_images: int
    features: Optional[np.ndarray] = None  # [N, D] float32 in key order, when kept
    keys: Optional[np.ndarray] = None      # [N] int64: the seed or dataset index of each row


def _all_reduce(x: torch.Tensor, op=torch.distributed.ReduceOp.SUM) -> torch.Tensor:
    if dist.get_world_size() > 1:
        torch.distributed.all_reduce(x, op=op)
    return x


def check_image_shape(shape, source: str) -> None:
    """Images must be [C, H, W] uint8 with C = 1 (repeated to RGB) or 3, at least 2x2 pixels."""
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape[1:]) < 2:
        raise MetricsError(f'Images in {source} have shape {list(shape)} (C,H,W); FID needs '
                           f'1 (grayscale) or 3 (RGB) channels and at least 2x2 pixels')


def _zero_sums(dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros([dim], dtype=torch.float64, device=device),
            torch.zeros([dim, dim], dtype=torch.float64, device=device))


def _gather_rows(keys: list, rows: list, dim: int, device) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's (keys, feature rows), concatenated and sorted by key."""
    keys = torch.tensor(keys, dtype=torch.int64, device=device)
    rows = torch.cat(rows).to(device) if rows else torch.zeros([0, dim], dtype=torch.float32, device=device)
    world = dist.get_world_size()
    if world > 1:
        count = _all_reduce(torch.tensor([len(keys)], device=device), op=torch.distributed.ReduceOp.MAX).item()
        pad = count - len(keys)
        padded_keys = torch.cat([keys, torch.full([pad], -1, dtype=torch.int64, device=device)])
        padded_rows = torch.cat([rows, torch.zeros([pad, dim], dtype=rows.dtype, device=device)])
        all_keys = [torch.empty_like(padded_keys) for _ in range(world)]
        all_rows = [torch.empty_like(padded_rows) for _ in range(world)]
        torch.distributed.all_gather(all_keys, padded_keys)
        torch.distributed.all_gather(all_rows, padded_rows)
        keys, rows = torch.cat(all_keys), torch.cat(all_rows)
        valid = keys >= 0
        keys, rows = keys[valid], rows[valid]
    order = torch.argsort(keys, stable=True)
    return keys[order].cpu().numpy(), rows[order].cpu().numpy()


def compute_feature_stats(detector, batches: Iterable, num_images: int, device=torch.device('cpu'),
                          desc: str = 'FID features', source: str = 'images', keep_features: bool = False,
                          progress: bool = True) -> FeatureStats:
    """Accumulate this rank's uint8 [N,C,H,W] batches (or (keys, batch) pairs), reduce over ranks, return mean
    and covariance, and with `keep_features` the features of all ranks in key order.

    `detector` is called as detector(images, return_features=True). `num_images` is the total over all
    ranks (it sizes the progress bar and is checked at the end)."""
    world = dist.get_world_size()
    feature_sum = outer_sum = None  # sum of f and sum of f f^T over this rank's images
    count = 0
    kept_keys, kept_rows = [], []
    with tqdm.tqdm(total=num_images, unit='img', desc=desc, disable=(dist.get_rank() != 0 or not progress),
                   dynamic_ncols=True) as bar:
        for item in batches:
            keys, images = item if isinstance(item, tuple) else (None, item)
            if images.shape[0] == 0:
                continue
            check_image_shape(images.shape[1:], source)
            if images.shape[1] == 1:
                images = images.repeat([1, 3, 1, 1])
            try:
                with torch.no_grad():
                    features = detector(images.to(device), return_features=True)
            except RuntimeError as e:
                raise MetricsError(f'The detector failed on images of shape {list(images.shape)} '
                                   f'from {source}: {first_line(e)}') from e
            if keep_features:
                if keys is None:
                    keys = range((dist.get_rank() << 40) + count, (dist.get_rank() << 40) + count + len(images))
                kept_keys += [int(k) for k in keys]
                kept_rows.append(features.detach().to(torch.float32).reshape(images.shape[0], -1).cpu())
            features = features.to(torch.float64).reshape(images.shape[0], -1)
            if feature_sum is None:
                feature_sum, outer_sum = _zero_sums(features.shape[1], device)
            feature_sum += features.sum(0)
            outer_sum += features.T @ features
            count += images.shape[0]
            bar.update(images.shape[0] * world)  # Ranks progress in step; show the global rate.

    # Ranks without images still take part in the reductions: agree on the feature dimension first.
    local_dim = 0 if feature_sum is None else feature_sum.shape[0]
    dim = _all_reduce(torch.tensor([local_dim], dtype=torch.int64, device=device),
                      op=torch.distributed.ReduceOp.MAX).item()
    if feature_sum is None:
        feature_sum, outer_sum = _zero_sums(dim, device)
    n = int(_all_reduce(torch.tensor([count], dtype=torch.int64, device=device)).item())
    _all_reduce(feature_sum)
    _all_reduce(outer_sum)
    if n != num_images:
        raise RuntimeError(f'Expected {num_images} images over all ranks, got {n}')
    if n < 2:
        raise MetricsError(f'Need at least 2 images to estimate a covariance, got {n} from {source}')
    mean, cov = mean_and_covariance(feature_sum, outer_sum, n)
    stats = FeatureStats(mu=mean.cpu().numpy(), sigma=cov.cpu().numpy(), num_images=n)
    if keep_features:
        stats.keys, stats.features = _gather_rows(kept_keys, kept_rows, dim, device)
    return stats

#----------------------------------------------------------------------------
# Image sources.


def rank_batches(num_items: int, max_batch_size: int) -> list[list[int]]:
    """This rank's batches of item indices.

    0..num_items-1 is cut into the fewest near-equal consecutive slots (at most max_batch_size items
    each) that divide evenly among the ranks; slots are dealt round-robin, so rank r takes slots r,
    r + world, r + 2 world, ... Empty slots (fewer items than slots) are dropped.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    slots_per_rank = -(-num_items // (max_batch_size * world))  # ceiling division
    slots = torch.arange(num_items).tensor_split(slots_per_rank * world)
    return [slot.tolist() for slot in slots[rank::world] if len(slot) > 0]


# A bare `generate.py --grid` writes OUTDIR/grid.png beside the samples: not one of them.
GRID_NAMES = ('grid.png',)


def open_dataset(image_path: str, num_expected: Optional[int], seed: int, use_labels: bool = False):
    """An ImageFolderDataset of a folder or zip; with `num_expected`, that many images picked by `seed` (the
    dataset's max_size/random_seed selection, as in the paper)."""
    from training import dataset  # Imported here: the maths and network scoring need no dataset code.
    if not os.path.exists(image_path):
        raise MetricsError(f'No such image folder or zip: {image_path}')
    try:
        dataset_obj = dataset.ImageFolderDataset(path=image_path, max_size=num_expected, random_seed=seed,
                                                 use_labels=use_labels, exclude=GRID_NAMES)
    except (OSError, ValueError, RuntimeError, zipfile.BadZipFile) as e:
        raise MetricsError(f'Could not read images from {image_path}: {e}') from e
    if num_expected is not None and len(dataset_obj) < num_expected:
        raise MetricsError(f'Found {len(dataset_obj)} images in {image_path}, but --num asks for '
                           f'{num_expected}: add images or lower --num')
    if len(dataset_obj) < 2:
        raise MetricsError(f'Found {len(dataset_obj)} images in {image_path}; need at least 2')
    check_image_shape(dataset_obj.image_shape, image_path)
    return dataset_obj


class ImageSource:
    """Images of a folder or zip (any dataset in the training format); `num` picked by `seed` (all: None)."""

    def __init__(self, path: str, num: Optional[int] = None, seed: int = 0, max_batch_size: int = 64,
                 num_workers: int = 3, prefetch_factor: int = 2):
        self.path, self.max_batch_size, self.prefetch_factor = path, max_batch_size, prefetch_factor
        self.dataset = open_dataset(path, num, seed)
        if hasattr(os, 'sched_getaffinity'):
            num_workers = min(num_workers, len(os.sched_getaffinity(0)))  # More than the cores only adds overhead.
        self.num_workers = num_workers
        self.name = path

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, device):
        index_batches = rank_batches(len(self.dataset), self.max_batch_size)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=index_batches, num_workers=self.num_workers,
                                             prefetch_factor=(self.prefetch_factor if self.num_workers > 0 else None))
        try:
            for indices, (images, _labels) in zip(index_batches, loader):
                yield indices, images
        except (OSError, ValueError) as e:
            lines = [line for line in str(e).splitlines() if line.strip()]  # Worker errors end with the cause.
            raise MetricsError(f'Could not read images from {self.path}: {lines[-1] if lines else e}') from e


class NetworkSource:
    """Images a network generates in memory on `seeds` with a sampler configuration (training/sampling.py's
    generate_images options: sampler, num_steps, ..., gnet, guidance)."""

    def __init__(self, net, seeds: Sequence[int], max_batch_size: int = 64, class_idx: Optional[int] = None,
                 name: str = 'network', **sampler_kwargs):
        self.net, self.seeds, self.max_batch_size, self.class_idx = net, list(seeds), max_batch_size, class_idx
        self.sampler_kwargs, self.name = sampler_kwargs, name

    def __len__(self) -> int:
        return len(self.seeds)

    def batches(self, device):
        try:
            for batch_seeds, images in generate_images(self.net, self.seeds, max_batch_size=self.max_batch_size,
                                                       class_idx=self.class_idx, device=device, **self.sampler_kwargs):
                yield batch_seeds, images.permute(0, 3, 1, 2)
        except ValueError as e:  # e.g. a class index the network does not have
            raise MetricsError(f'{self.name}: {e}') from None


def extract(source, detector, device=torch.device('cpu'), keep_features: bool = False, desc: str = 'features',
            progress: bool = True) -> FeatureStats:
    """FeatureStats of an image source (ImageSource, NetworkSource) on every rank."""
    return compute_feature_stats(detector, source.batches(device), len(source), device=device, desc=desc,
                                 source=source.name, keep_features=keep_features, progress=progress)

"""Linear probe of a denoiser's features (the evaluation of FutureXiang/edm2, the "seed": linear.py and
EDM.get_feature), for every network family of the project.

Feature of image y in [-1, 1] at (timestep t, block b): the frozen network denoises y + n * sigma_t (one
N(0, I) draw n per image, sigma_t = the t-th lowest noise level of the 18-step EDM schedule, Karras et al.
2022 Eq. 5, 1 -> sigma_min, 18 -> sigma_max) and the output of decoder block b is globally average-pooled
to [N, C]. A linear classifier per (t, b) is trained on the training split with cross-entropy, Adam and a
cosine-annealed learning rate stepped per epoch (the seed: 15 epochs, batch 128, lr 1e-3), and top-1 accuracy
is measured on the test split.

Named blocks are the network's decoder blocks in order, `out_1, out_2, ...` (the seed's names), the
up-sampling blocks included:
- EDM2-small C/E/G (training.networks_edm2small.EDM): the entries of `nn_model.up`;
- EDM SongUNet / DhariwalUNet (training.networks): the UNetBlocks of `model.dec` (not the aux layers);
- EDM2 (training.networks_edm2.Precond): the Blocks of `unet.dec`.
`named_blocks(net)` also gives each block's own module path.

One difference from the seed, for speed: the seed recomputes every training feature in every epoch (fresh
noise and x-flip); here the features are computed `passes` times (each pass a fresh noise draw and, with
xflip, a random mirror per image) and epoch e trains on pass e mod passes (passes = epochs is the seed's
protocol). Features are computed per rank on a share of the images and gathered; every rank then trains
the same classifiers (cheap) with the same seed, so all ranks agree.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from torch_utils import distributed as dist

#----------------------------------------------------------------------------
# The noise levels (the seed's sample_schedule, float32 constants as in its code).

def probe_sigmas(steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80, rho: int = 7) -> torch.Tensor:
    """[steps + 1] decreasing float64: (A + i/(steps-1) (B - A))^rho with A = sigma_max^(1/rho), B =
    sigma_min^(1/rho) and B - A in float32 (the seed's tensors), the rest in float64; the last entry 0."""
    inv = torch.tensor(1, dtype=torch.float32) / rho
    A = torch.tensor(float(sigma_max), dtype=torch.float32) ** inv
    B = torch.tensor(float(sigma_min), dtype=torch.float32) ** inv
    i = torch.arange(steps, dtype=torch.float64)
    times = (A.double() + i / (steps - 1) * (B - A).double()) ** rho
    return torch.cat([times, torch.zeros(1, dtype=torch.float64)])


def probe_sigma(timestep: int, steps: int = 18) -> torch.Tensor:
    """sigma of timestep 1..steps (the seed's reversed(schedule)[t]): 1 -> sigma_min, steps -> sigma_max."""
    if not 1 <= timestep <= steps:
        raise ValueError(f'timestep {timestep} is outside 1..{steps}')
    return probe_sigmas(steps)[steps - timestep]

#----------------------------------------------------------------------------
# Named blocks.

_DECODER_CONTAINERS = [('nn_model', 'up'), ('model', 'dec'), ('unet', 'dec')]
_BLOCK_CLASSES = ('UNetBlock', 'Block')


def named_blocks(net: torch.nn.Module) -> dict[str, tuple[str, torch.nn.Module]]:
    """{'out_k': (module path, module)} for the decoder blocks of `net`, in forward order."""
    for owner, attr in _DECODER_CONTAINERS:
        container = getattr(getattr(net, owner, None), attr, None)
        if isinstance(container, torch.nn.ModuleList):  # EDM2-small: every entry is a decoder block
            items = [(f'{owner}.{attr}.{i}', m) for i, m in enumerate(container)]
        elif isinstance(container, torch.nn.ModuleDict):
            items = [(f'{owner}.{attr}.{k}', m) for k, m in container.items()
                     if type(m).__name__ in _BLOCK_CLASSES]
        else:
            continue
        if items:
            return {f'out_{k + 1}': item for k, item in enumerate(items)}
    raise ValueError(f'{type(net).__name__}: no decoder blocks found (expected nn_model.up, model.dec or unet.dec)')

#----------------------------------------------------------------------------
# Features.

@torch.no_grad()
def extract_features(net: torch.nn.Module, images: torch.Tensor, timesteps: Sequence[int],
                     blocks: Optional[Sequence[str]] = None, steps: int = 18,
                     randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
                     class_labels: Optional[torch.Tensor] = None) -> dict[int, dict[str, torch.Tensor]]:
    """{timestep: {block: [N, C] float32}} for images in [-1, 1]: one forward pass per timestep with hooks on
    the named blocks (all of them if `blocks` is None), one randn_like draw per timestep."""
    available = named_blocks(net)
    names = list(available) if blocks is None else list(blocks)
    unknown = [b for b in names if b not in available]
    if unknown:
        raise ValueError(f'unknown blocks {unknown}; this network has {", ".join(available)}')
    acts = {}
    hooks = [available[b][1].register_forward_hook(lambda m, i, o, b=b: acts.__setitem__(b, o)) for b in names]
    try:
        out = {}
        for t in timesteps:
            sigma = probe_sigma(t, steps).to(images.device)
            noise = randn_like(images)
            x_noised = images + noise * sigma     # float32: the 0-dim float64 sigma does not promote
            acts.clear()
            net(x_noised, sigma.to(torch.float32).expand(images.shape[0]), class_labels)
            out[t] = {b: acts[b].float().flatten(2).mean(2) for b in names}
        return out
    finally:
        for h in hooks:
            h.remove()


def _gather_rows(x: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
    """Rows `x` of items `index` from every rank, assembled in item order ([total, ...])."""
    world = dist.get_world_size()
    if world == 1:
        out = x.new_zeros([total, *x.shape[1:]])
        out[index] = x
        return out
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    cap = int(max(s.item() for s in sizes))
    pad = lambda t: torch.cat([t, t.new_zeros([cap - t.shape[0], *t.shape[1:]])])
    xs = [torch.zeros_like(pad(x)) for _ in range(world)]
    idx = [torch.zeros_like(pad(index)) for _ in range(world)]
    torch.distributed.all_gather(xs, pad(x).contiguous())
    torch.distributed.all_gather(idx, pad(index).contiguous())
    out = x.new_zeros([total, *x.shape[1:]])
    for s, xr, ir in zip(sizes, xs, idx):
        out[ir[:int(s.item())]] = xr[:int(s.item())]
    return out


def dataset_features(net: torch.nn.Module, images: torch.Tensor, timesteps: Sequence[int],
                     blocks: Optional[Sequence[str]] = None, batch_size: int = 128, xflip: bool = False,
                     seed: int = 0, steps: int = 18, progress: Optional[Callable[[int], None]] = None,
                     device=None) -> dict[int, dict[str, torch.Tensor]]:
    """Features of every image of `images` (uint8 [N, C, H, W] or float in [-1, 1], on the CPU): this rank
    takes items rank, rank + world, ...; the result, gathered, is the same on every rank. With xflip each
    image is mirrored with probability 1/2. `progress(n)` is called with the number of images done (all ranks)."""
    device = torch.device(device) if device is not None else next(net.parameters()).device
    rank, world = dist.get_rank(), dist.get_world_size()
    index = torch.arange(rank, images.shape[0], world)
    gen = torch.Generator(device=device).manual_seed(seed * 1000003 + rank)
    randn_like = lambda x: torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    flip_gen = torch.Generator().manual_seed(seed * 1000003 + rank)
    to_model = lambda x: ((x.to(torch.float32) / 127.5 - 1) if x.dtype == torch.uint8 else x.to(torch.float32))
    parts = []
    for start in range(0, index.numel(), batch_size):
        idx = index[start:start + batch_size]
        x = to_model(images[idx])
        if xflip:
            mirror = torch.rand(x.shape[0], generator=flip_gen) < 0.5
            x = torch.where(mirror[:, None, None, None], x.flip(3), x)
        parts.append(extract_features(net, x.to(device), timesteps, blocks, steps, randn_like))
        if progress is not None:
            progress(x.shape[0] * world)
    if not parts:  # fewer images than ranks: this rank contributes no rows, of the right width
        empty = extract_features(net, to_model(images[:1]).to(device), timesteps, blocks, steps)
        parts = [{t: {b: f[:0] for b, f in fs.items()} for t, fs in empty.items()}]
    names = list(named_blocks(net)) if blocks is None else list(blocks)
    out = {}
    for t in timesteps:
        out[t] = {}
        for b in names:
            local = torch.cat([p[t][b] for p in parts])
            out[t][b] = _gather_rows(local, index.to(device), images.shape[0]).cpu()
    return out

#----------------------------------------------------------------------------
# Classifiers.

def train_linear_classifier(features: Sequence[torch.Tensor], labels: torch.Tensor, num_classes: int,
                            epochs: int = 15, batch_size: int = 128, lr: float = 1e-3,
                            seed: int = 0) -> torch.nn.Linear:
    """nn.Linear(C, classes) trained with cross-entropy, Adam(lr) and CosineAnnealingLR(T_max=epochs) stepped
    per epoch (the seed's linear.py). `features`: one [N, C] tensor per pass; epoch e uses pass e mod len."""
    gen = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the layer's init
    layer = torch.nn.Linear(features[0].shape[1], num_classes)
    torch.random.set_rng_state(torch_state)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for e in range(epochs):
        feats = features[e % len(features)]
        for idx in torch.randperm(feats.shape[0], generator=gen).split(batch_size):
            loss = torch.nn.functional.cross_entropy(layer(feats[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return layer


@torch.no_grad()
def accuracy(layer: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    return (layer(features).argmax(dim=1) == labels).double().mean().item()


@dataclasses.dataclass
class ProbeResult:
    timestep: int
    sigma: float
    block: str
    module: str
    channels: int
    accuracy: float


def linear_probe(net: torch.nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor,
                 test_images: torch.Tensor, test_labels: torch.Tensor, timesteps: Iterable[int] = (4,),
                 blocks: Optional[Sequence[str]] = None, epochs: int = 15, batch_size: int = 128,
                 lr: float = 1e-3, passes: int = 1, xflip: bool = True, seed: int = 0, steps: int = 18,
                 progress: Optional[Callable[[int], None]] = None, device=None) -> list[ProbeResult]:
    """Probe the frozen `net` at every (timestep, block) pair: top-1 test accuracy of a linear classifier
    trained on the training features. Labels are class indices [N] (int64). `passes` training-feature passes
    (fresh noise, random x-flips when xflip); the test features are computed once without flips.
    `progress(n)` counts images of feature extraction (passes * N_train + N_test in all)."""
    timesteps = list(timesteps)
    if not timesteps:
        raise ValueError('no timesteps to probe')
    names = list(named_blocks(net)) if blocks is None else list(blocks)
    train_labels, test_labels = train_labels.long().cpu(), test_labels.long().cpu()
    num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    net.eval().requires_grad_(False)
    common = dict(batch_size=batch_size, steps=steps, progress=progress, device=device)
    train = [dataset_features(net, train_images, timesteps, names, xflip=xflip, seed=seed + 1 + p, **common)
             for p in range(passes)]
    test = dataset_features(net, test_images, timesteps, names, xflip=False, seed=seed, **common)
    modules = {b: path for b, (path, _) in named_blocks(net).items()}
    results = []
    for t in timesteps:
        for b in names:
            layer = train_linear_classifier([f[t][b] for f in train], train_labels, num_classes, epochs,
                                            batch_size, lr, seed)
            results.append(ProbeResult(timestep=t, sigma=float(probe_sigma(t, steps)), block=b, module=modules[b],
                                       channels=int(test[t][b].shape[1]),
                                       accuracy=accuracy(layer, test[t][b], test_labels)))
    return results


def split_indices(num: int, holdout: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of range(num) into (train, test) with round(holdout * num) test items."""
    if not 0 < holdout < 1:
        raise ValueError(f'holdout must be in (0, 1); got {holdout}')
    n_test = int(round(holdout * num))
    if n_test < 1 or n_test >= num:
        raise ValueError(f'holdout {holdout} of {num} images leaves an empty split')
    perm = np.random.RandomState(seed).permutation(num)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])

#----------------------------------------------------------------------------
# Output: probe.csv, probe.json and probe.png (accuracy against block, one line per noise level).

def write_results(outdir: str, results: Sequence[ProbeResult], config: dict) -> None:
    """probe.json (config + rows), probe.csv and probe.png in `outdir`, each written atomically."""
    import csv
    import json
    import os
    import dnnlib
    from torch_utils.plot import line_plot
    os.makedirs(outdir, exist_ok=True)
    rows = [dataclasses.asdict(r) for r in results]
    with dnnlib.util.atomic_write(os.path.join(outdir, 'probe.json'), 'w') as f:
        json.dump(dict(config=config, rows=rows), f, indent=1)
    columns = ['timestep', 'sigma', 'block', 'module', 'channels', 'accuracy']
    with dnnlib.util.atomic_write(os.path.join(outdir, 'probe.csv'), 'w') as f:
        writer = csv.writer(f, lineterminator='\n')
        writer.writerow(columns)
        for row in rows:
            writer.writerow([f'{row[c]:.6g}' if c in ('sigma', 'accuracy') else row[c] for c in columns])
    series = {}
    for r in results:
        xs, ys = series.setdefault(f't={r.timestep} (sigma {r.sigma:.3g})', ([], []))
        xs.append(int(r.block.rsplit('_', 1)[-1]))
        ys.append(100 * r.accuracy)
    best = max(results, key=lambda r: r.accuracy)
    name = os.path.basename(str(config.get('network', '')))
    line_plot(series, os.path.join(outdir, 'probe.png'), title=f'Linear probe ({name})',
              xlabel='decoder block k (out_k)', ylabel='top-1 accuracy (%)',
              highlight=(int(best.block.rsplit('_', 1)[-1]), 100 * best.accuracy))

#----------------------------------------------------------------------------

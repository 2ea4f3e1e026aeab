"""How well a network denoises at each noise level: mean squared error of D(x + sigma n; sigma) against x.

For each network and each sigma (snapped to the network's own levels with round_sigma), the same images and the
same noise draws are used, so networks compare row by row. An eps-predicting network (iDDPM, VP) has
D = x - sigma eps, whose error grows as sigma^2 times the eps error; EDM's preconditioning keeps it bounded by
the data's variance (Karras et al. 2022, Sec. 5). Deterministic samplers follow D without clipping, so this
table is where their quality is decided at high noise.

    python benchmarks/bench_denoiser_error.py --network=iddpm/network-snapshot-000030.pkl \\
        --network=edm/network-snapshot-000030.pkl --data=digits-16x16.zip
    python benchmarks/bench_denoiser_error.py --preset=tiny-8        # a random network on random pixels
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dnnlib  # noqa: E402
from torch_utils import persistence  # noqa: E402
from training import presets  # noqa: E402


def denoiser_mse(net, images: torch.Tensor, labels, sigma: float, noise: torch.Tensor) -> tuple[float, float]:
    """(the network's sigma nearest to `sigma`, mean of (D(x + s n; s) - x)^2)."""
    s = float(net.round_sigma(torch.tensor(sigma, dtype=torch.float64)))
    with torch.no_grad():
        denoised = net(images + s * noise, torch.full([images.shape[0]], s), labels).to(torch.float64)
    return s, float(((denoised - images) ** 2).mean())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--network', action='append', help='network pickle (its EMA network); repeat to compare')
    p.add_argument('--preset', default='quickstart', help='named network of training/presets.py (random weights) '
                   'when no --network is given  [default: %(default)s]')
    p.add_argument('--data', help='dataset zip/folder; default: random pixels')
    p.add_argument('--num', type=int, default=256, help='images  [default: %(default)s]')
    p.add_argument('--sigmas', default='0.05,0.2,0.5,1,2,5,10,20,40,80', help='noise levels')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args()

    if args.network:
        nets = {path: persistence.load_network(path) for path in args.network}
    else:
        nets = {args.preset: dnnlib.util.construct_class_by_name(**presets.network_kwargs(args.preset))}
    nets = {name: net.eval() for name, net in nets.items()}
    first = next(iter(nets.values()))
    shape = [first.img_channels, first.img_resolution, first.img_resolution]
    generator = torch.Generator().manual_seed(args.seed)
    labels = None
    if args.data:
        dataset = dnnlib.util.construct_class_by_name(class_name='training.dataset.ImageFolderDataset', path=args.data,
                                                      use_labels=first.label_dim > 0)
        items = [dataset[i] for i in range(min(args.num, len(dataset)))]
        images = torch.tensor(np.stack([im for im, _ in items])).to(torch.float32) / 127.5 - 1
        if first.label_dim:
            labels = torch.tensor(np.stack([lab for _, lab in items])).to(torch.float32)
    else:
        images = torch.rand([args.num, *shape], generator=generator) * 2 - 1
    if first.label_dim and labels is None:
        labels = torch.eye(first.label_dim)[torch.randint(first.label_dim, [images.shape[0]], generator=generator)]
    print(f'{images.shape[0]} images, data variance {float(images.var()):.4f}')
    short = lambda path: os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))[-34:]
    print('sigma    ' + ''.join(f'{short(name):>36s}' for name in nets))
    for sigma in [float(s) for s in args.sigmas.split(',')]:
        noise = torch.randn(images.shape, generator=generator)
        cells = [denoiser_mse(net, images, labels, sigma, noise) for net in nets.values()]
        print(f'{sigma:<8g} ' + ''.join(f'{f"mse {mse:.4f} (sigma {s:.3g})":>36s}' for s, mse in cells))


if __name__ == '__main__':
    main()

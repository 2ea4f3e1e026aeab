"""Sampling throughput: images/s and seconds per network evaluation for the EDM sampler.

Default: Heun, 18 steps (NFE = 35), the paper's DDPM++ CIFAR-10 network (EDMPrecond + SongUNet,
55.7 M parameters, random weights -- speed does not depend on the values).

    python benchmarks/bench_sampling.py --batch 8 --repeats 3
    python benchmarks/bench_sampling.py --config ncsnpp-cifar10 --device cuda --batch 64 --fp16
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import generate  # noqa: E402

# The paper's network configurations (constructor kwargs as in its training script).
CONFIGS = {
    'ddpmpp-cifar10': dict(precond='EDMPrecond', img_resolution=32, img_channels=3, label_dim=10, augment_dim=9,
                           dropout=0.13, model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                           decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                           channel_mult=[2, 2, 2]),
    'ncsnpp-cifar10': dict(precond='EDMPrecond', img_resolution=32, img_channels=3, label_dim=10, augment_dim=9,
                           dropout=0.13, model_type='SongUNet', embedding_type='fourier', encoder_type='residual',
                           decoder_type='standard', channel_mult_noise=2, resample_filter=[1, 3, 3, 1],
                           model_channels=128, channel_mult=[2, 2, 2]),
    'adm-imagenet64': dict(precond='EDMPrecond', img_resolution=64, img_channels=3, label_dim=1000, dropout=0.1,
                           model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}


class CountingNet(torch.nn.Module):
    """Wraps a network and counts its evaluations (NFE)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.nfe = net, 0
        for name in ('img_resolution', 'img_channels', 'label_dim', 'sigma_min', 'sigma_max'):
            setattr(self, name, getattr(net, name))

    def round_sigma(self, sigma):
        return self.net.round_sigma(sigma)

    def forward(self, *args, **kwargs):
        self.nfe += 1
        return self.net(*args, **kwargs)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def flops_per_eval(net, latents, class_labels) -> float | None:
    """FLOPs of one network evaluation (torch.utils.flop_counter), or None when unavailable."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    sigma = torch.full([latents.shape[0]], 1.0, device=latents.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(latents, sigma, class_labels)
    return float(counter.get_total_flops())


@click.command()
@click.option('--config', type=click.Choice(sorted(CONFIGS)), default='ddpmpp-cifar10', show_default=True)
@click.option('--kwargs', 'extra_kwargs', help='JSON overriding constructor kwargs', default='{}')
@click.option('--device', default='cpu', show_default=True)
@click.option('--batch', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--steps', type=click.IntRange(min=1), default=18, show_default=True)
@click.option('--S_churn', 'S_churn', type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--repeats', type=click.IntRange(min=1), default=3, show_default=True, help='timed runs (median)')
@click.option('--threads', type=click.IntRange(min=1), default=None, help='torch CPU threads [default: torch]')
@click.option('--fp16', is_flag=True, help='use_fp16 (CUDA only)')
def main(config, extra_kwargs, device, batch, steps, S_churn, repeats, threads, fp16):
    from training import networks
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    kwargs = dict(CONFIGS[config], **json.loads(extra_kwargs))
    precond = kwargs.pop('precond')
    if fp16:
        kwargs['use_fp16'] = True
    torch.manual_seed(0)
    net = CountingNet(getattr(networks, precond)(**kwargs).eval().requires_grad_(False).to(device))
    num_params = sum(p.numel() for p in net.parameters())

    seeds = list(range(batch))
    rnd = generate.StackedRandomGenerator(device, seeds)
    latents = rnd.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], device=device)
    class_labels = None
    if net.label_dim:
        class_labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[batch], device=device)]
    flops = flops_per_eval(net.net, latents, class_labels)

    def run():
        net.nfe = 0
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            generate.edm_sampler(net, latents, class_labels, randn_like=rnd.randn_like, num_steps=steps, S_churn=S_churn)
        sync(device)
        return time.perf_counter() - start, net.nfe

    print(f'{config}: {precond} {num_params / 1e6:.2f} M params, batch {batch}, {steps} steps, device {device}, '
          f'threads {torch.get_num_threads()}')
    run()  # warm-up (allocator, kernels)
    times = []
    for r in range(repeats):
        seconds, nfe = run()
        times.append(seconds)
        print(f'  run {r}: {seconds:.2f} s, NFE {nfe}')
    t = statistics.median(times)
    print(f'median: {batch / t:.3f} images/s | {t / nfe:.4f} s per network evaluation (batch {batch}) | '
          f'{t / nfe / batch * 1e3:.2f} ms per image-evaluation | NFE {nfe}')
    if flops:
        print(f'FLOPs per evaluation: {flops / 1e9:.2f} G ({flops / batch / 1e9:.2f} G/image) -> '
              f'{flops * nfe / t / 1e9:.2f} GFLOP/s')


if __name__ == '__main__':
    main()

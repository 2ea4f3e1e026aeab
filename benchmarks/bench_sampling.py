"""Sampling throughput: images/s and seconds per network evaluation for the EDM sampler.

Default: Heun, 18 steps (NFE = 35), the paper's DDPM++ CIFAR-10 network (EDMPrecond + SongUNet,
55.7 M parameters, random weights -- speed does not depend on the values).

    python benchmarks/bench_sampling.py --batch 8 --repeats 3
    python benchmarks/bench_sampling.py --config ncsnpp-cifar10 --device cuda --batch 64 --fp16

Before/after: every speed option has a switch, so run the script alternately with and without one
(separate processes: the allocator setting cannot be undone in-process), e.g.
    python benchmarks/bench_sampling.py --batch 4 --no-malloc-tuning --no-fused-bias --no-inplace  # before
    python benchmarks/bench_sampling.py --batch 4                                                  # after
    python benchmarks/bench_sampling.py --batch 4 --bf16       # outputs differ slightly from fp32
    python benchmarks/bench_sampling.py --batch 4 --steps 2 --repeats 3 --paired-bf16   # fp32 vs bf16, alternating
Timings on a shared machine are noisy: interleave A/B runs, repeat, compare medians.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dnnlib  # noqa: E402
from training import presets, sampling  # noqa: E402

CONFIGS = ('ddpmpp-cifar10', 'ncsnpp-cifar10', 'adm-imagenet64', 'ddpmpp-small-32', 'tiny-8')  # named networks of training/presets.py


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


def _minor_faults() -> int:
    """Page faults so far (each one = the kernel zero-filling a 4 KiB page the allocator had given back)."""
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except ImportError:  # not on Windows
        return -1


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
@click.option('--config', type=click.Choice(CONFIGS), default='ddpmpp-cifar10', show_default=True)
@click.option('--kwargs', 'extra_kwargs', help='JSON overriding constructor kwargs', default='{}')
@click.option('--device', default='cpu', show_default=True)
@click.option('--batch', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--steps', type=click.IntRange(min=1), default=18, show_default=True)
@click.option('--S_churn', 'S_churn', type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--repeats', type=click.IntRange(min=1), default=3, show_default=True, help='timed runs (median)')
@click.option('--threads', type=click.IntRange(min=1), default=None, help='torch CPU threads [default: torch]')
@click.option('--fp16', is_flag=True, help='use_fp16 (CUDA only)')
@click.option('--bf16', is_flag=True, help='use_bf16 (any device; outputs differ slightly from fp32)')
@click.option('--channels-last', is_flag=True, help='channels_last memory format for weights and latents')
@click.option('--malloc-tuning/--no-malloc-tuning', default=True, show_default=True,
              help='torch_utils.misc.set_malloc_thresholds() (what generate.py does)')
@click.option('--fused-bias/--no-fused-bias', default=True, show_default=True, help='networks.FUSED_CONV_BIAS')
@click.option('--inplace/--no-inplace', default=True, show_default=True, help='networks.INPLACE_OPS')
@click.option('--compile', 'compile_', is_flag=True, help='also the torch.compile\'d network (generate.py --compile), '
              'alternating with eager: compile time, speed-up and the image count from which it pays')
@click.option('--paired-bf16', is_flag=True, help='also the same network in bf16 (generate.py --bf16), timed '
              'alternately with fp32; prints the ratio of the medians')
@click.option('--grad-mode', type=click.Choice(['no_grad', 'inference_mode']), default='no_grad', show_default=True)
def main(config, extra_kwargs, device, batch, steps, S_churn, repeats, threads, fp16, bf16, channels_last,
         malloc_tuning, fused_bias, inplace, compile_, paired_bf16, grad_mode):
    from torch_utils import misc
    from training import networks
    malloc_applied = misc.set_malloc_thresholds() if malloc_tuning else False
    networks.FUSED_CONV_BIAS = fused_bias
    networks.INPLACE_OPS = inplace
    grad_ctx = torch.inference_mode if grad_mode == 'inference_mode' else torch.no_grad
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    kwargs = presets.network_kwargs(config, **json.loads(extra_kwargs))
    precond = kwargs['class_name'].rsplit('.', 1)[-1]
    if fp16:
        kwargs['use_fp16'] = True
    if bf16:
        kwargs['use_bf16'] = True
    torch.manual_seed(0)
    net = CountingNet(dnnlib.util.construct_class_by_name(**kwargs).eval().requires_grad_(False).to(device))
    num_params = sum(p.numel() for p in net.parameters())
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net.to(memory_format=memory_format)

    seeds = list(range(batch))
    rnd = sampling.StackedRandomGenerator(device, seeds)
    latents = rnd.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], device=device)
    latents = latents.contiguous(memory_format=memory_format)
    class_labels = None
    if net.label_dim:
        class_labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[batch], device=device)]
    flops = flops_per_eval(net.net, latents, class_labels)

    def run(net=net):
        net.nfe = 0
        sync(device)
        faults_start = _minor_faults()
        start, cpu_start = time.perf_counter(), time.process_time()
        with grad_ctx():
            sampling.edm_sampler(net, latents, class_labels, randn_like=rnd.randn_like, num_steps=steps, S_churn=S_churn)
        sync(device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        return seconds, cpu_seconds, _minor_faults() - faults_start, net.nfe

    print(f'{config}: {precond} {num_params / 1e6:.2f} M params, batch {batch}, {steps} steps, device {device}, '
          f'threads {torch.get_num_threads()}, loadavg {os.getloadavg()[0]:.2f}')
    print(f'options: malloc_tuning={malloc_applied} fused_bias={fused_bias} inplace={inplace} bf16={bf16} '
          f'channels_last={channels_last} grad_mode={grad_mode}')
    run()  # warm-up (allocator, kernels)
    variants = []  # (label, network, first-run seconds or None), timed alternately against the plain network
    if compile_:
        compiled = CountingNet(sampling.compile_network(net.net))
        variants.append(('compiled', compiled, run(compiled)[0]))  # compiles at the first call
    if paired_bf16 and not bf16:
        net_bf16 = copy.deepcopy(net)
        net_bf16.net.use_bf16 = True  # the same weights, what generate.py --bf16 sets
        run(net_bf16)
        variants.append(('bf16', net_bf16, None))
    if variants:
        plain_times, times_by_label = [], {label: [] for label, _, _ in variants}
        for r in range(repeats):
            order = [(None, net)] + [(label, v) for label, v, _ in variants]
            for label, variant in order[::1 if r % 2 == 0 else -1]:
                (plain_times if label is None else times_by_label[label]).append(run(variant)[0])
        plain_t = statistics.median(plain_times)
        for label, variant, first_run in variants:
            t = statistics.median(times_by_label[label])
            line = f'{label}: median {t:.3f} s vs plain {plain_t:.3f} s: {t / plain_t:.3f}x (alternating, {repeats} each)'
            if first_run is not None:
                overhead = first_run - t  # the first call's extra time
                gain = (plain_t - t) / batch  # seconds saved per image
                pays = f'pays from ~{math.ceil(overhead / gain)} images' if gain > 0 else 'never pays (not faster)'
                line += f'; first run {first_run:.2f} s (compile ~{overhead:.1f} s), {pays} ({steps} steps, batch {batch})'
            print(line)
    times, cpu_times = [], []
    for r in range(repeats):
        seconds, cpu_seconds, faults, nfe = run()
        times.append(seconds)
        cpu_times.append(cpu_seconds)
        print(f'  run {r}: {seconds:.2f} s wall, {cpu_seconds:.2f} s CPU, {faults} page faults, NFE {nfe}')
    t = statistics.median(times)
    # On a shared machine the process's CPU time is the steadier number (it excludes time spent waiting
    # for a core), but it also counts idle-spinning OpenMP threads; compare like with like.
    print(f'median CPU time: {statistics.median(cpu_times):.2f} s')
    print(f'median: {t:.2f} s | {batch / t:.3f} images/s | {t / nfe:.4f} s per network evaluation (batch {batch}) | '
          f'{t / nfe / batch * 1e3:.2f} ms per image-evaluation | NFE {nfe}')
    if flops:
        print(f'FLOPs per evaluation: {flops / 1e9:.2f} G ({flops / batch / 1e9:.2f} G/image) -> '
              f'{flops * nfe / t / 1e9:.2f} GFLOP/s')


if __name__ == '__main__':
    main()

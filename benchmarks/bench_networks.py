"""Forward-pass speed of the paper's networks on CPU: median wall time and achieved FLOP/s.

    python benchmarks/bench_networks.py                      # DDPM++ CIFAR-10 (EDM), batch 16, fp32
    python benchmarks/bench_networks.py --config adm --batch 4 --channels-last --threads 2
    python benchmarks/bench_networks.py --batch 8 --threads 1 --before-after --clock cpu --no-attn-compare

--before-after also times the network with the speed options of training/networks.py switched off
(FUSED_CONV_BIAS, INPLACE_OPS: "before") and one at a time. --clock cpu measures the process's CPU
time instead of wall time: steadier on a shared machine (it excludes waiting for a core) but it also
counts idle-spinning OpenMP threads, so compare it only between runs with the same --threads.

FLOPs are counted once with torch.utils.flop_counter.FlopCounterMode (matmul/conv/attention only;
2 FLOPs per multiply-add). Also compares our default attention (explicit fp32-softmax on CPU, chunked) with the same
unchunked and with torch's fused SDPA, forward and forward+backward (--attn-only: nothing else).
Numbers on a shared machine are noisy; report the median and the machine load.
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import dnnlib  # noqa: E402
from training import networks, presets  # noqa: E402

# Named networks from training/presets.py (EDMPrecond; the CIFAR-10 DDPM++/NCSN++ and ImageNet-64 ADM).
CONFIGS = {'ddpmpp': 'ddpmpp-cifar10', 'ncsnpp': 'ncsnpp-cifar10', 'adm': 'adm-imagenet64',
           'ddpmpp-small': 'ddpmpp-small-32', 'tiny': 'tiny-8'}

class Variant:
    """One configuration to time; `setup`/`teardown` switch global options around each call."""
    def __init__(self, label, net, inputs, setup=None, teardown=None):
        self.label, self.net, self.inputs = label, net, inputs
        self.setup, self.teardown = setup or (lambda: None), teardown or (lambda: None)
        self.times = []

    clock = time.perf_counter  # or time.process_time (--clock cpu)

    def __call__(self):
        self.setup()
        try:
            with torch.no_grad():
                t0 = self.clock()
                self.net(*self.inputs)
                return self.clock() - t0
        finally:
            self.teardown()

def time_interleaved(variants, reps, warmup):
    """Round-robin over variants so drifting load on a shared machine hits them all alike."""
    for _ in range(warmup):
        for v in variants:
            v()
    for _ in range(reps):
        for v in variants:
            v.times.append(v())

def bench_attention(shapes, reps=10):
    """Attention op alone, interleaved, forward and forward+backward: our explicit fp32-softmax form (chunked
    through the N*heads axis, networks.ATTENTION_CHUNK_BYTES), the same unchunked, and torch's SDPA."""
    def unchunked(q, k, v, impl):
        chunk_bytes, networks.ATTENTION_CHUNK_BYTES = networks.ATTENTION_CHUNK_BYTES, 2**62
        try:
            return networks.attention(q, k, v, impl='explicit')
        finally:
            networks.ATTENTION_CHUNK_BYTES = chunk_bytes
    impls = {'explicit': networks.attention, 'explicit unchunked': unchunked, 'sdpa': networks.attention}
    for n, c, length in shapes:
        qkv = torch.randn(n, c, 3, length)  # q, k, v as the UNetBlock makes them: strided views of one tensor
        grad = torch.randn(n, c, length)
        for mode in ('forward', 'forward+backward'):
            times = {name: [] for name in impls}
            for _ in range(reps + 1):
                for name, fn in impls.items():
                    x = qkv.clone().requires_grad_(mode != 'forward')
                    t0 = time.perf_counter()
                    with torch.set_grad_enabled(mode != 'forward'):
                        out = fn(*x.unbind(2), impl=name.split()[0])
                        if mode != 'forward':
                            out.backward(grad)
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(t[1:]) * 1e3 for name, t in times.items()}
            print(f'attention [N*heads={n}, C/heads={c}, L={length}] {mode}: ' +
                  ', '.join(f'{name} {ms:.1f} ms' for name, ms in med.items()) +
                  f' (chunked explicit: {med["explicit unchunked"] / med["explicit"]:.2f}x faster than unchunked, '
                  f'{med["sdpa"] / med["explicit"]:.2f}x than sdpa)')

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', choices=sorted(CONFIGS), default='ddpmpp')
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch default)')
    p.add_argument('--channels-last', action='store_true', help='also time channels_last memory format')
    p.add_argument('--no-attn-compare', action='store_true', help="skip the SDPA-attention comparison")
    p.add_argument('--attn-only', action='store_true', help='only the attention micro-benchmark')
    p.add_argument('--attn-shape', action='append', metavar='N,C,L', help='attention shape [N*heads, C/heads, L] '
                   'to time (repeatable; default: the CIFAR-10 U-Net\'s at --batch, and the quick start\'s 64,32,256)')
    p.add_argument('--before-after', action='store_true',
                   help='also time with FUSED_CONV_BIAS / INPLACE_OPS switched off (all, and one at a time)')
    p.add_argument('--no-bf16', action='store_true', help='skip the bf16 variant')
    p.add_argument('--clock', choices=['wall', 'cpu'], default='wall', help='wall time or process CPU time')
    args = p.parse_args()
    Variant.clock = staticmethod(time.process_time if args.clock == 'cpu' else time.perf_counter)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_attn_compare:
        # DDPM++/NCSN++ CIFAR attention runs at 16x16 with 256 channels, one head; the quick start's at 16x16 with
        # 32 channels, batch 64.
        shapes = [tuple(int(v) for v in s.split(',')) for s in args.attn_shape or []]
        bench_attention(shapes or [(args.batch, 256, 256), (args.batch, 64, 1024), (64, 32, 256)])
        if args.attn_only:
            return

    torch.manual_seed(0)
    with networks.no_weight_init():
        net = dnnlib.util.construct_class_by_name(**presets.network_kwargs(CONFIGS[args.config])).eval().requires_grad_(False)
    with torch.no_grad():
        for t in net.parameters():
            t.normal_(0, 0.02)
    kw = presets.network_kwargs(CONFIGS[args.config])
    x = torch.randn(args.batch, kw['img_channels'], kw['img_resolution'], kw['img_resolution'])
    sigma = torch.full([args.batch], 1.0)
    labels = torch.eye(kw['label_dim'])[torch.randint(kw['label_dim'], [args.batch])] if kw['label_dim'] else None
    inputs = (x, sigma, labels)

    # Count with the explicit attention path: FlopCounterMode may not know CPU fused-SDPA kernels.
    networks.ATTENTION_IMPL = 'explicit'
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(*inputs)
    networks.ATTENTION_IMPL = 'auto'
    flops = fc.get_total_flops()
    params = sum(t.numel() for t in net.parameters())
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    print(f'config={args.config} params={params/1e6:.1f}M batch={args.batch} threads={torch.get_num_threads()} '
          f'cpus={os.cpu_count()} loadavg={load:.2f} torch={torch.__version__} clock={args.clock}')
    print(f'FLOPs per forward: {flops/1e9:.2f} GFLOP ({flops/args.batch/1e9:.2f} GFLOP/image)')

    def set_attn(impl):
        return lambda: setattr(networks, 'ATTENTION_IMPL', impl)
    def set_bf16(flag):
        return lambda: setattr(net, 'use_bf16', flag)
    def set_options(**options):
        def apply(values):
            for name, value in values.items():
                setattr(networks, name, value)
        defaults = {name: getattr(networks, name) for name in options}
        return lambda: apply(options), lambda: apply(defaults)
    variants = [Variant('fp32 (default)', net, inputs)]
    if args.before_after:
        variants.append(Variant('fp32 before (options off)', net, inputs, *set_options(FUSED_CONV_BIAS=False, INPLACE_OPS=False)))
        variants.append(Variant('fp32 FUSED_CONV_BIAS off', net, inputs, *set_options(FUSED_CONV_BIAS=False)))
        variants.append(Variant('fp32 INPLACE_OPS off', net, inputs, *set_options(INPLACE_OPS=False)))
    if not args.no_attn_compare:
        variants.append(Variant('fp32 SDPA attention', net, inputs, setup=set_attn('sdpa'), teardown=set_attn('auto')))
    if args.channels_last:
        net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        variants.append(Variant('fp32 channels_last', net_cl, (x.to(memory_format=torch.channels_last), sigma, labels)))
    if not args.no_bf16:
        variants.append(Variant('bf16 (use_bf16=True)', net, inputs, setup=set_bf16(True), teardown=set_bf16(False)))
    time_interleaved(variants, args.reps, args.warmup)

    base = statistics.median(variants[0].times)
    for v in variants:
        med = statistics.median(v.times)
        print(f'{v.label:<30} median {med*1e3:9.1f} ms  ({args.batch/med:7.1f} img/s, {flops/med/1e9:6.1f} GFLOP/s)  '
              f'min {min(v.times)*1e3:.1f} max {max(v.times)*1e3:.1f}  speed vs default {base/med:.2f}x')

if __name__ == '__main__':
    main()

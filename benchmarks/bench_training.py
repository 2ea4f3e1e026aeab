"""Training throughput and memory: sec/kimg and peak memory for the DDPM++ CIFAR-10 configuration and
a small configuration, measured on whatever device is available (CPU here).

One training step = the loop's step on one rank without DDP: loss (with augmentation) forward and
backward, gradient sanitising, Adam, EMA update. Each configuration runs in its own subprocess so its
peak RSS is its own. Prints the median over --steps timed steps (after --warmup steps).

    python benchmarks/bench_training.py                 # both configurations
    python benchmarks/bench_training.py --config small --batch 32 --steps 10
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Named networks of training/presets.py and the batch each is timed at.
CONFIGS = {
    # Paper: --arch=ddpmpp --precond=edm --cond=1 on CIFAR-10 (32x32, 10 classes), augment 0.12, dropout 0.13.
    'ddpmpp-cifar10': dict(preset='ddpmpp-cifar10', batch=8),
    # Small: the same recipe with --cbase=32 --cres=1,2 on 16x16 images.
    'small': dict(preset='small-16', batch=32),
}


def run_one(name: str, batch: int, steps: int, warmup: int, threads: int) -> dict:
    import psutil
    import torch

    if threads:
        torch.set_num_threads(threads)
    import dnnlib
    from training.training_loop import ema_beta, learning_rate, sanitize_gradients

    cfg = CONFIGS[name]
    batch = batch or cfg['batch']
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    torch.manual_seed(0)
    from training import presets
    kwargs = presets.network_kwargs(cfg['preset'], use_fp16=False)
    res, label_dim = kwargs['img_resolution'], kwargs['label_dim']
    net = dnnlib.util.construct_class_by_name(**kwargs).train().requires_grad_(True).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = dnnlib.util.construct_class_by_name(class_name='training.loss.EDMLoss')
    augment_pipe = dnnlib.util.construct_class_by_name(class_name='training.augment.AugmentPipe', p=0.12,
                                                       xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
                                                       translate_frac=1)
    optimizer = torch.optim.Adam(net.parameters(), lr=10e-4, betas=[0.9, 0.999], eps=1e-8)
    num_params = sum(p.numel() for p in net.parameters())
    images_u8 = torch.randint(0, 256, [batch, 3, res, res], dtype=torch.uint8)
    labels = torch.eye(label_dim)[torch.randint(label_dim, [batch])]
    rss_before = psutil.Process().memory_info().rss

    times = []
    cur_nimg = 0
    for step in range(warmup + steps):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        images = images_u8.to(device).to(torch.float32) / 127.5 - 1
        loss = loss_fn(net=net, images=images, labels=labels.to(device), augment_pipe=augment_pipe)
        loss.sum().mul(1 / batch).backward()
        for g in optimizer.param_groups:
            g['lr'] = learning_rate(10e-4, cur_nimg, 10000)
        sanitize_gradients(net.parameters())
        optimizer.step()
        beta = ema_beta(batch, cur_nimg, 500, 0.05)
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, beta))
        cur_nimg += batch
        if device.type == 'cuda':
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)

    sec_per_step = statistics.median(times)
    peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return dict(config=name, device=str(device), threads=torch.get_num_threads(), batch=batch,
                params=num_params, steps=steps, sec_per_step_median=sec_per_step,
                sec_per_step_min=min(times), sec_per_kimg=sec_per_step / batch * 1000,
                peak_rss_gb=peak_rss_kb / 2**20, rss_before_training_gb=rss_before / 2**30,
                peak_gpu_gb=(torch.cuda.max_memory_allocated(device) / 2**30) if device.type == 'cuda' else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', choices=sorted(CONFIGS), action='append', help='default: all')
    parser.add_argument('--batch', type=int, default=None, help='images per step (default: per config)')
    parser.add_argument('--steps', type=int, default=3, help='timed steps')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps first')
    parser.add_argument('--threads', type=int, default=0, help='torch intra-op threads (default: torch default)')
    parser.add_argument('--json', action='store_true', help='print one JSON line per config')
    parser.add_argument('--_child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:  # measure one configuration in this (fresh) process
        print(json.dumps(run_one(args.config[0], args.batch, args.steps, args.warmup, args.threads)))
        return

    configs = args.config or ['small', 'ddpmpp-cifar10']
    print(f'# sec/kimg extrapolated from a {args.steps}-step median at the given batch; single process, no DDP.')
    print(f'# Note: numbers on a shared machine are noisy.  load average: {os.getloadavg()}')
    for name in configs:
        cmd = [sys.executable, os.path.abspath(__file__), '--_child', '--config', name, '--steps', str(args.steps),
               '--warmup', str(args.warmup), '--threads', str(args.threads)] + (['--batch', str(args.batch)] if args.batch else [])
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            print(f'{name}: failed\n{out.stderr[-2000:]}')
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['config']:<16s} device={r['device']} threads={r['threads']} batch={r['batch']:<3d} "
                  f"params={r['params'] / 1e6:.2f}M  sec/step median={r['sec_per_step_median']:.3f} "
                  f"(min {r['sec_per_step_min']:.3f})  sec/kimg={r['sec_per_kimg']:.1f}  "
                  f"peak RSS={r['peak_rss_gb']:.2f} GB" +
                  (f"  peak GPU={r['peak_gpu_gb']:.2f} GB" if r['peak_gpu_gb'] is not None else ''))


if __name__ == '__main__':
    main()

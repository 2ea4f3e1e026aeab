"""Training throughput and memory: sec/kimg and peak memory of the training loop's step, for the paper's
DDPM++ CIFAR-10 configuration, the quick-start configuration and a small one, on whatever device is
available (CPU here).

One training step = training.training_loop._train_step on one rank without DDP (loss with augmentation,
forward, backward, gradient sanitising, Adam) plus the EMA update. Prints medians over --steps timed steps
(after --warmup steps).

    python benchmarks/bench_training.py                     # every configuration, fp32, one process each
    python benchmarks/bench_training.py --config quickstart --bf16            # train.py --bf16=1
    python benchmarks/bench_training.py --config quickstart --paired --steps 20  # fp32 vs bf16, alternating
    python benchmarks/bench_training.py --config ddpmpp-cifar10 --before-after --fast-dropout --steps 10
    python benchmarks/bench_training.py --config ddpmpp-small --paired --autocast --steps 20 --profile 2
    python benchmarks/bench_training.py --config ddpmpp-small --before-after --paired --steps 4 --op-times 4

--before-after times the previous main's training/networks.py (`git show <commit>:training/networks.py`,
loaded as a separate module; --before-commit, default PREVIOUS_MAIN) against the current one: one process,
the two networks (same initial weights, same random draws) take turns step by step, and the ratio of the
medians is printed. --paired does the same for the current code in fp32 against bf16 (--autocast adds the fp32 network under
plain torch.autocast(bfloat16), the reference for the bf16 path, and with --before-after the paper's network under it
too; --profile N then prints each variant's top ops). Alternating steps
make the drifting load of a shared machine hit both alike; the spread is printed so the noise is visible, and
so is the relative difference of each variant's weights from the fp32 ones after the run (same numbers?).
Without --before-after/--paired each configuration runs in its own subprocess, so its peak RSS is its own.
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
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The main branch before the speed work of issue 15 (its networks.py is the paper-equivalent "before").
PREVIOUS_MAIN = 'ba643d6'

# Named networks of training/presets.py, the batch each is timed at, and its augmentation probability.
CONFIGS = {
    # Paper: --arch=ddpmpp --precond=edm --cond=1 on CIFAR-10 (32x32, 10 classes), augment 0.12, dropout 0.13.
    'ddpmpp-cifar10': dict(preset='ddpmpp-cifar10', batch=8, augment=0.12),
    # scripts/quickstart.py: 16x16 digits, --batch=64, no augmentation, no dropout.
    'quickstart': dict(preset='quickstart', batch=64, augment=0),
    # Small: the CIFAR-10 recipe with --cbase=32 --cres=1,2 on 16x16 images.
    'small': dict(preset='small-16', batch=32, augment=0.12),
    # Issue 25's DDPM++ small: train.py --cbase=32 --cres=2,2,2 --blocks=4 on 32x32 RGB, batch 16, defaults else.
    'ddpmpp-small': dict(preset='ddpmpp-small-32', batch=16, augment=0.12),
    # The smallest network there is: one block per resolution, 8x8 (the test suite runs every mode on it).
    'tiny': dict(preset='tiny-8', batch=4, augment=0.12),
}


def load_networks_module(commit: str) -> types.ModuleType:
    """training/networks.py as of `commit`, imported as the separate module _before_networks_<commit> (outside
    the library packages: persistent class names must be unique within them)."""
    src = subprocess.run(['git', '-C', ROOT, 'show', f'{commit}:training/networks.py'], capture_output=True,
                         text=True, check=True).stdout
    name = f'_before_networks_{commit}'
    module = types.ModuleType(name)
    module.__file__ = f'<{commit}:training/networks.py>'
    sys.modules[name] = module
    exec(compile(src, module.__file__, 'exec'), module.__dict__)  # noqa: S102 -- our own git history
    return module


def _autocast_backbone(model, device) -> None:
    """Run `model` (a backbone) under torch.autocast(bfloat16), handing back float32 like an fp32 backbone."""
    import torch
    forward = model.forward

    def autocast_forward(*args, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return forward(*args, **kwargs).float()
    model.forward = autocast_forward


class Trainer:
    """One network with its EMA, optimizer, loss and augmentation, stepped by the training loop's own step."""

    def __init__(self, label: str, name: str, batch: int, device, bf16: bool = False, networks_module=None,
                 fast_dropout: bool = False, autocast: bool = False, compile_backbone: bool = False):
        import torch
        import dnnlib
        from training import presets, training_loop

        cfg = CONFIGS[name]
        self.label, self.batch, self.device = label, batch, device
        kwargs = presets.network_kwargs(cfg['preset'], use_fp16=False)
        if not cfg['augment']:
            kwargs.pop('augment_dim', None)
        if bf16:
            kwargs['use_bf16'] = True  # what train.py --bf16=1 sets
        if fast_dropout:
            kwargs['fast_dropout'] = True  # what train.py --fast-dropout=1 sets
        torch.manual_seed(0)  # same initial weights for every variant
        if networks_module is None:
            net = dnnlib.util.construct_class_by_name(**kwargs)
        else:
            net = getattr(networks_module, kwargs.pop('class_name').rsplit('.', 1)[1])(**kwargs)
        self.net = net.train().requires_grad_(True).to(device)
        if autocast:  # plain torch.autocast around the backbone (the reference the bf16 path is held to)
            _autocast_backbone(self.net.model, device)
        if compile_backbone:  # torch.compile (inductor) of the backbone, eager random numbers (same dropout masks)
            import torch._inductor.config
            torch._inductor.config.fallback_random = True
            self.net._modules['model'] = torch.compile(self.net.model)
        self.params = sum(p.numel() for p in self.net.parameters())
        augment_pipe = None
        if cfg['augment']:
            augment_pipe = dnnlib.util.construct_class_by_name(
                class_name='training.augment.AugmentPipe', p=cfg['augment'], xflip=1e8, yflip=1, scale=1,
                rotate_frac=1, aniso=1, translate_frac=1)
        self.model = dnnlib.EasyDict(
            net=self.net, ddp=self.net, loss_fn=dnnlib.util.construct_class_by_name(class_name='training.loss.EDMLoss'),
            optimizer=torch.optim.Adam(self.net.parameters(), lr=10e-4, betas=[0.9, 0.999], eps=1e-8),
            augment_pipe=augment_pipe, ema=dnnlib.util.construct_class_by_name(
                class_name='training.ema.HalfLifeEMA', net=self.net, halflife_kimg=500, rampup_ratio=0.05))
        # The full learning rate from the second step on (no ramp-up), so that weights move and the variants'
        # weights after the run show whether they compute the same numbers.
        self.cfg = dnnlib.EasyDict(loss_scaling=1, batch_size=batch, grad_posinf=training_loop.NONFINITE_GRAD_VALUES['clamp'], lr_kwargs=dict(
            func_name='training.training_loop.linear_rampup_schedule', ref_lr=10e-4, rampup_kimg=0))
        self.layout = training_loop._BatchLayout(per_rank=batch, batch_gpu=batch, rounds=1)
        res, channels, label_dim = kwargs['img_resolution'], kwargs['img_channels'], kwargs['label_dim']
        images = torch.randint(0, 256, [batch, channels, res, res], dtype=torch.uint8)
        labels = torch.eye(label_dim)[torch.randint(label_dim, [batch])] if label_dim else torch.zeros([batch, 0])
        self.batches = iter(lambda: (images, labels), None)  # the same batch forever
        self.cur_nimg = 0
        self.times = []

    def step(self, seed: int) -> float:
        import torch
        from training import training_loop
        torch.manual_seed(seed)  # every variant draws the same sigma, noise, augmentation and dropout
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        training_loop._train_step(self.cfg, self.model, self.batches, self.layout, self.cur_nimg, self.device)
        self.cur_nimg += self.batch
        self.model.ema.update(cur_nimg=self.cur_nimg, batch_size=self.batch)
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def _setup(threads: int):
    import torch
    if threads:
        torch.set_num_threads(threads)
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def run_one(name: str, batch: int, steps: int, warmup: int, threads: int, bf16: bool) -> dict:
    import psutil
    import torch

    device = _setup(threads)
    batch = batch or CONFIGS[name]['batch']
    trainer = Trainer('bf16' if bf16 else 'fp32', name, batch, device, bf16=bf16)
    rss_before = psutil.Process().memory_info().rss
    for step in range(warmup + steps):
        t = trainer.step(seed=step)
        if step >= warmup:
            trainer.times.append(t)
    times = trainer.times
    sec_per_step = statistics.median(times)
    peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return dict(config=name, precision=trainer.label, device=str(device), threads=torch.get_num_threads(),
                batch=batch, params=trainer.params, steps=steps, sec_per_step_median=sec_per_step,
                sec_per_step_min=min(times), sec_per_kimg=sec_per_step / batch * 1000,
                peak_rss_gb=peak_rss_kb / 2**20, rss_before_training_gb=rss_before / 2**30,
                peak_gpu_gb=(torch.cuda.max_memory_allocated(device) / 2**30) if device.type == 'cuda' else None)


def run_alternating(name: str, batch: int, steps: int, warmup: int, threads: int, before_commit: str | None,
                    bf16: bool, fast_dropout: bool = False, autocast: bool = False, profile: int = 0,
                    compile_backbone: bool = False, op_times: int = 0) -> list[dict]:
    """Variants take turns, one step each; returns one record per variant (median, spread, ratios)."""
    import torch

    device = _setup(threads)
    batch = batch or CONFIGS[name]['batch']
    trainers = []
    if before_commit is not None:
        before = load_networks_module(before_commit)
        trainers.append(Trainer(f'before fp32 ({before_commit})', name, batch, device, networks_module=before))
        if autocast:  # the paper's code under plain autocast: what the bf16 path is held to
            trainers.append(Trainer('before autocast bf16', name, batch, device, networks_module=before,
                                    autocast=True))
    trainers.append(Trainer('fp32', name, batch, device))
    if bf16:
        trainers.append(Trainer('bf16', name, batch, device, bf16=True))
    if fast_dropout:
        trainers.append(Trainer('fp32 fast_dropout', name, batch, device, fast_dropout=True))
    if autocast:
        trainers.append(Trainer('autocast bf16', name, batch, device, autocast=True))
    if compile_backbone:
        compiled = Trainer('fp32 compiled', name, batch, device, compile_backbone=True)
        start = time.perf_counter()
        compiled.step(seed=10**6)  # compiles forward and backward; an extra step, so its weights run ahead
        print(f'# {name}: fp32 compiled: first step {time.perf_counter() - start:.1f} s (compilation)')
        trainers.append(compiled)
    for step in range(warmup + steps):
        order = trainers if step % 2 == 0 else trainers[::-1]  # neither variant always goes first
        for trainer in order:
            t = trainer.step(seed=step)
            if step >= warmup:
                trainer.times.append(t)
    if profile:
        for trainer in trainers:
            print_profile(trainer, steps=profile, seed=warmup + steps)
    if op_times:
        for trainer in trainers:
            print_op_times(trainer, steps=op_times, seed=warmup + steps + profile)
    base = statistics.median(trainers[0].times)
    fp32_trainer = next(t for t in trainers if t.label == 'fp32')
    fp32 = statistics.median(fp32_trainer.times)
    ref = torch.cat([p.detach().flatten() for p in fp32_trainer.net.parameters()]).double()
    records = []
    for trainer in trainers:
        med = statistics.median(trainer.times)
        weights = torch.cat([p.detach().flatten() for p in trainer.net.parameters()]).double()
        q = statistics.quantiles(trainer.times, n=4) if len(trainer.times) >= 2 else [med, med, med]
        records.append(dict(config=name, variant=trainer.label, device=str(device), threads=torch.get_num_threads(),
                            batch=batch, params=trainer.params, steps=steps, sec_per_step_median=med,
                            sec_per_step_q1=q[0], sec_per_step_q3=q[2], sec_per_kimg=med / batch * 1000,
                            ratio_vs_first=med / base, ratio_vs_fp32=med / fp32,
                            weights_rel_diff_vs_fp32=float((weights - ref).norm() / ref.norm())))
    return records


def print_profile(trainer: Trainer, steps: int, seed: int, rows: int = 25) -> None:
    """torch.profiler over `steps` steps: the ops with the most self CPU time, and their share of the step."""
    import torch
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            trainer.step(seed=seed + i)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f'# profile: {trainer.label}, {steps} steps, self CPU {total / 1e3 / steps:.1f} ms/step')
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        print(f'#   {e.key[:48]:<48s} {e.self_cpu_time_total / 1e3 / steps:8.2f} ms/step '
              f'{100 * e.self_cpu_time_total / total:5.1f}%  calls/step {e.count / steps:6.1f}')


def print_op_times(trainer: Trainer, steps: int, seed: int, rows: int = 20) -> None:
    """Wall time of every aten op as dispatched (a TorchDispatchMode timer around each call, nested ops counted
    in their caller) over `steps` steps: the ops with the most time, per step and as a share of the summed op
    time. Steadier than torch.profiler for oneDNN convolutions, whose profiled times came out inflated here."""
    import collections
    from torch.utils._python_dispatch import TorchDispatchMode
    totals, calls = collections.Counter(), collections.Counter()

    class OpTimer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            start = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            totals[func.overloadpacket.__name__] += time.perf_counter() - start
            calls[func.overloadpacket.__name__] += 1
            return out
    start = time.perf_counter()
    for i in range(steps):
        with OpTimer():
            trainer.step(seed=seed + i)
    wall, summed = (time.perf_counter() - start) / steps, sum(totals.values()) / steps
    print(f'# op times: {trainer.label}, {steps} steps, {wall * 1e3:.1f} ms/step wall, {summed * 1e3:.1f} ms/step in ops')
    for name, total in totals.most_common(rows):
        print(f'#   {name:<40s} {total / steps * 1e3:8.2f} ms/step {100 * total / steps / summed:5.1f}%  '
              f'calls/step {calls[name] / steps:6.1f}')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', choices=sorted(CONFIGS), action='append', help='default: all')
    parser.add_argument('--batch', type=int, default=None, help='images per step (default: per config)')
    parser.add_argument('--steps', type=int, default=3, help='timed steps (per variant)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps first')
    parser.add_argument('--threads', type=int, default=0, help='torch intra-op threads (default: torch default)')
    parser.add_argument('--bf16', action='store_true', help='train.py --bf16=1 (network backbone in bfloat16); '
                        'with --before-after, an extra alternating variant')
    parser.add_argument('--paired', action='store_true', help='one process, fp32 and bf16 steps alternating')
    parser.add_argument('--before-after', action='store_true',
                        help='one process, previous main (--before-commit) and current networks alternating')
    parser.add_argument('--fast-dropout', action='store_true', help='with --before-after/--paired: an extra '
                        'alternating variant with train.py --fast-dropout=1')
    parser.add_argument('--autocast', action='store_true', help='with --before-after/--paired: an extra '
                        'alternating variant, fp32 network under plain torch.autocast(bfloat16) around the backbone '
                        '(with --before-after, the previous main\'s network under autocast too)')
    parser.add_argument('--compile', action='store_true', help='with --before-after/--paired: an extra '
                        'alternating variant, the fp32 backbone through torch.compile (inductor; eager random numbers)')
    parser.add_argument('--profile', type=int, default=0, metavar='STEPS', help='with --before-after/--paired: '
                        'then profile each variant over this many steps (top ops by self CPU time)')
    parser.add_argument('--op-times', type=int, default=0, metavar='STEPS', help='with --before-after/--paired: '
                        'then time every aten op of each variant over this many steps (a dispatch-mode timer)')
    parser.add_argument('--before-commit', default=PREVIOUS_MAIN, help='git commit whose training/networks.py '
                        'is "before"  [default: %(default)s, the main branch before issue 15]')
    parser.add_argument('--json', action='store_true', help='print one JSON line per config / variant')
    parser.add_argument('--_child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:  # measure one configuration in this (fresh) process
        print(json.dumps(run_one(args.config[0], args.batch, args.steps, args.warmup, args.threads, args.bf16)))
        return

    configs = args.config or ['quickstart', 'small', 'ddpmpp-cifar10']
    load = os.getloadavg()
    if args.before_after or args.paired:
        print(f'# alternating steps in one process, {args.steps} timed per variant; ratio = ratio of medians.'
              f'  load average: {load}')
        for name in configs:
            records = run_alternating(name, args.batch, args.steps, args.warmup, args.threads,
                                      args.before_commit if args.before_after else None,
                                      bf16=args.bf16 or args.paired, fast_dropout=args.fast_dropout,
                                      autocast=args.autocast, profile=args.profile,
                                      compile_backbone=args.compile, op_times=args.op_times)
            for r in records:
                if args.json:
                    print(json.dumps(r))
                    continue
                print(f"{r['config']:<15s} {r['variant']:<22s} threads={r['threads']} batch={r['batch']:<3d} "
                      f"params={r['params'] / 1e6:.2f}M  sec/step median={r['sec_per_step_median']:.3f} "
                      f"(IQR {r['sec_per_step_q1']:.3f}-{r['sec_per_step_q3']:.3f})  sec/kimg={r['sec_per_kimg']:.1f}"
                      f"  vs {records[0]['variant']}: {r['ratio_vs_first']:.3f}  vs fp32: {r['ratio_vs_fp32']:.3f}"
                      f"  weights vs fp32: {r['weights_rel_diff_vs_fp32']:.1e} rel")
        print(f'# load average after: {os.getloadavg()}')
        return

    print(f'# sec/kimg extrapolated from a {args.steps}-step median at the given batch; single process, no DDP.')
    print(f'# Note: numbers on a shared machine are noisy.  load average: {load}')
    for name in configs:
        cmd = [sys.executable, os.path.abspath(__file__), '--_child', '--config', name, '--steps', str(args.steps),
               '--warmup', str(args.warmup), '--threads', str(args.threads)] + \
              (['--batch', str(args.batch)] if args.batch else []) + (['--bf16'] if args.bf16 else [])
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            print(f'{name}: failed\n{out.stderr[-2000:]}')
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['config']:<15s} {r['precision']} device={r['device']} threads={r['threads']} batch={r['batch']:<3d} "
                  f"params={r['params'] / 1e6:.2f}M  sec/step median={r['sec_per_step_median']:.3f} "
                  f"(min {r['sec_per_step_min']:.3f})  sec/kimg={r['sec_per_kimg']:.1f}  "
                  f"peak RSS={r['peak_rss_gb']:.2f} GB" +
                  (f"  peak GPU={r['peak_gpu_gb']:.2f} GB" if r['peak_gpu_gb'] is not None else ''))


if __name__ == '__main__':
    main()

"""Memory of the optimizer state: Adam (the paper's) against 8-bit Adam (train.py/compress.py qat --optim=adam8bit).

One optimizer step on every parameter of a network (gradients drawn at random: the state's size does not depend on
them), then the bytes of every tensor in the optimizer's state are summed. Printed per optimizer: state bytes,
bytes per parameter, and the ratio to Adam.

    python benchmarks/bench_optimizer_state.py --network=run/network-snapshot-000140.pkl
    python benchmarks/bench_optimizer_state.py --preset=quickstart      # a named network of training/presets.py
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dnnlib  # noqa: E402
from torch_utils import misc, persistence  # noqa: E402
from training import presets  # noqa: E402


def measure(net: torch.nn.Module, name: str) -> int:
    params = [p for p in net.parameters() if p.requires_grad]
    opt = dnnlib.util.construct_class_by_name(params, lr=1e-4, **presets.optimizer_kwargs(name))
    generator = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    opt.step()
    return misc.optimizer_state_bytes(opt)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--network', help='Network snapshot (its EMA network); default: --preset')
    parser.add_argument('--preset', default='quickstart', help='Named network of training/presets.py when no '
                        '--network is given  [default: %(default)s]')
    args = parser.parse_args()
    if args.network:
        net = persistence.load_network(args.network)
    else:
        net = dnnlib.util.construct_class_by_name(**presets.network_kwargs(args.preset))
    net = net.float().train().requires_grad_(True)
    count = sum(p.numel() for p in net.parameters())
    print(f'{args.network or args.preset}: {count:,} parameters ({count * 4:,} bytes in float32)')
    base = None
    for name in presets.OPTIMIZERS:
        try:
            presets.check_optimizer(name)
        except ValueError as e:
            print(f'{name:10s} skipped: {e}')
            continue
        size = measure(net, name)
        base = base or size
        print(f'{name:10s} state {size:>12,} bytes  {size / count:5.2f} bytes/parameter  {size / base:5.3f}x adam')


if __name__ == '__main__':
    main()

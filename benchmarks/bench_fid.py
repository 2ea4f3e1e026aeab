"""Benchmark FID feature extraction: images/s of a full-size Inception-v3 on 32x32 uint8 images.

The network is the standard FID Inception-v3 structure (TensorFlow 2015-12-05 graph) written in plain
PyTorch with random weights: uint8 -> bilinear resize to 299x299 -> (x - 128) / 128 -> stem -> Mixed_5b..7c
-> global average pool -> 2048-d features. Same FLOPs and memory traffic as the real detector, so the
speed is representative; the features are meaningless. Prints the median over a few timed batches.

    python benchmarks/bench_fid.py [--batch 16] [--batches 5] [--threads N] [--script]
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU, the unit of every Inception-v3 branch."""

    def __init__(self, in_ch: int, out_ch: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):  # Mixed_5b/5c/5d, 35x35.
    def __init__(self, in_ch: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)),
        ], 1)


class InceptionB(nn.Module):  # Mixed_6a, 35x35 -> 17x17.
    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e, 17x17, factorised 7x7.
    def __init__(self, in_ch: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        d = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(d)),
            self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)),
        ], 1)


class InceptionD(nn.Module):  # Mixed_7a, 17x17 -> 8x8.
    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionE(nn.Module):  # Mixed_7b (average pool branch) and Mixed_7c (max pool branch, as in TF's graph).
    def __init__(self, in_ch: int, use_max_pool: bool):
        super().__init__()
        self.use_max_pool = use_max_pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.use_max_pool:
            pool = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            pool = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pool),
        ], 1)


class InceptionV3Features(nn.Module):
    """uint8 [N,3,H,W] -> [N, 2048] pool features; same call signature as the FID detector."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            BasicConv2d(3, 32, 3, stride=2),      # Conv2d_1a_3x3: 299 -> 149
            BasicConv2d(32, 32, 3),               # Conv2d_2a_3x3: -> 147
            BasicConv2d(32, 64, 3, padding=1),    # Conv2d_2b_3x3
            nn.MaxPool2d(3, stride=2),            # -> 73
            BasicConv2d(64, 80, 1),               # Conv2d_3b_1x1
            BasicConv2d(80, 192, 3),              # Conv2d_4a_3x3: -> 71
            nn.MaxPool2d(3, stride=2),            # -> 35
        )
        self.blocks = nn.Sequential(
            InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64),           # Mixed_5b..5d
            InceptionB(288),                                                          # Mixed_6a -> 17
            InceptionC(768, 128), InceptionC(768, 160), InceptionC(768, 160), InceptionC(768, 192),
            InceptionD(768),                                                          # Mixed_7a -> 8
            InceptionE(1280, use_max_pool=False), InceptionE(2048, use_max_pool=True),  # Mixed_7b, 7c
        )

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        x = x.to(torch.float32)
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
        x = (x - 128) / 128
        x = self.blocks(self.stem(x))
        return x.mean(dim=(2, 3))


def count_flops(net: nn.Module, x: torch.Tensor) -> int:
    """Multiply-add FLOPs (2 per MAC) of all convolutions for one forward pass of x."""
    total = [0]

    def hook(module, inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total[0] += 2 * output.numel() * k

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return total[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--batches', type=int, default=5, help='timed batches (after one warm-up)')
    parser.add_argument('--resolution', type=int, default=32)
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads [default: torch]')
    parser.add_argument('--script', action='store_true', help='run the TorchScript version (like the real detector)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = InceptionV3Features().eval().requires_grad_(False)
    num_params = sum(p.numel() for p in net.parameters())
    images = torch.randint(0, 256, [args.batch, 3, args.resolution, args.resolution], dtype=torch.uint8)
    flops_per_image = count_flops(net, images[:1])
    if args.script:
        net = torch.jit.script(net)

    times = []
    with torch.no_grad():
        for i in range(args.batches + 1):
            t0 = time.perf_counter()
            features = net(images, return_features=True)
            features64 = features.to(torch.float64)  # Plus fid.py's float64 accumulation.
            _ = features64.sum(0), features64.T @ features64
            if i > 0:
                times.append(time.perf_counter() - t0)
    assert features.shape == (args.batch, 2048)
    t = statistics.median(times)
    print(f'Inception-v3 FID features, {num_params / 1e6:.2f} M params, {flops_per_image / 1e9:.2f} GFLOP/image, '
          f'{args.resolution}x{args.resolution} uint8 input resized to 299x299, batch {args.batch}, '
          f'{torch.get_num_threads()} thread(s){", TorchScript" if args.script else ""}')
    print(f'median {t * 1e3:.1f} ms/batch over {len(times)} batches: {args.batch / t:.2f} images/s, '
          f'{flops_per_image * args.batch / t / 1e9:.1f} GFLOP/s')
    print(f'=> 50,000 images (one FID) would take ~{50000 / (args.batch / t) / 60:.0f} min on this machine')


if __name__ == '__main__':
    main()

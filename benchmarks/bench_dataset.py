"""Loader throughput of training.dataset.ImageFolderDataset on a dataset_tool-style zip.

    python benchmarks/bench_dataset.py [--num-images 10000] [--resolution 32] [--repeats 5] [--batch-size 128]

Builds a zip of random RGB images (uncompressed PNGs, as dataset_tool.py writes them) in a temp dir and
prints the median images/s over `--repeats` epochs for: direct indexing in one process, a DataLoader
with num_workers=0, and a DataLoader with 2 persistent workers (after one warm-up epoch).
"""

import argparse
import os
import pathlib
import sys
import tempfile
import time
import zipfile

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import dataset_tool  # noqa: E402
from training.dataset import ImageFolderDataset  # noqa: E402


def build_zip(path: str, num_images: int, resolution: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
        labels = []
        for idx in range(num_images):
            name = dataset_tool.archive_fname(idx)
            img = rng.integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8)
            z.writestr(name, dataset_tool.encode_png(img))
            labels.append([name, int(idx % 10)])
        z.writestr('dataset.json', dataset_tool.json.dumps({'labels': labels}))


def time_epochs(run_epoch, repeats: int) -> list:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = run_epoch()
        times.append(n / (time.perf_counter() - t0))
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--num-images', type=int, default=10000)
    p.add_argument('--resolution', type=int, default=32)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--batch-size', type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f'bench-{args.resolution}x{args.resolution}.zip')
        t0 = time.perf_counter()
        build_zip(path, args.num_images, args.resolution)
        print(f'built {args.num_images} {args.resolution}x{args.resolution} images in {time.perf_counter() - t0:.1f}s '
              f'({os.path.getsize(path) / 2**20:.1f} MiB)')
        ds = ImageFolderDataset(path, use_labels=True)

        def direct():
            for i in range(len(ds)):
                ds[i]
            return len(ds)

        def loader_epoch(loader):
            n = 0
            for x, _y in loader:
                n += x.shape[0]
            return n

        results = {}
        results['single process, ds[i]'] = time_epochs(direct, args.repeats)
        loader0 = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=0)
        results['DataLoader num_workers=0'] = time_epochs(lambda: loader_epoch(loader0), args.repeats)
        loader2 = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=2,
                                              persistent_workers=True, prefetch_factor=4)
        loader_epoch(loader2)  # Warm-up: start the workers.
        results['DataLoader num_workers=2'] = time_epochs(lambda: loader_epoch(loader2), args.repeats)
        del loader2

    print(f'cpu count {os.cpu_count()}, torch {torch.__version__}; medians over {args.repeats} epochs of '
          f'{args.num_images} images (shared CPUs make these noisy):')
    for name, v in results.items():
        print(f'  {name:28s} {np.median(v):9.0f} images/s   (min {np.min(v):.0f}, max {np.max(v):.0f})')


if __name__ == '__main__':
    main()

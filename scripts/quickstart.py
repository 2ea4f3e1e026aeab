"""Offline quick start: real data -> dataset_tool.py -> train.py -> generate.py, on a CPU in minutes.

The data are the 1,797 8x8 handwritten digits that scikit-learn ships (no download). They are written
as PNGs with their labels, converted to a 16x16 dataset zip, a small class-conditional EDM model is
trained for a few minutes, and a grid of samples is drawn with Heun's 2nd-order solver and with
Euler's method, side by side, one row per digit class.

    python -m pip install -r requirements-cpu.txt scikit-learn && python scripts/quickstart.py
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import click
import numpy as np
import PIL.Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MARKER = '.edm-quickstart'  # only a folder carrying this marker is ever deleted and rewritten


def export_digits(dest: str) -> int:
    """Write scikit-learn's digits as grayscale PNGs plus a dataset.json with their labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise click.ClickException('The quick start needs scikit-learn for its data: pip install scikit-learn')
    digits = load_digits()
    os.makedirs(dest, exist_ok=True)
    labels = []
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        name = f'digit{i:05d}.png'
        pixels = np.rint(image * (255 / 16)).clip(0, 255).astype(np.uint8)  # 17 grey levels -> 0..255
        PIL.Image.fromarray(pixels, 'L').save(os.path.join(dest, name))
        labels.append([name, int(label)])
    with open(os.path.join(dest, 'dataset.json'), 'w') as f:
        json.dump({'labels': labels}, f)
    return len(labels)


def run(cmd: list[str], log: str) -> None:
    """Run a step of the pipeline, showing its output and keeping it in a log; stop on failure."""
    print('$', ' '.join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    with open(log, 'w') as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if line.startswith(('tick ', 'Training for', 'Error')):  # progress, not the option dumps
                print('  ' + line.rstrip(), flush=True)
        returncode = proc.wait()
    if returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise click.ClickException(f'step failed (exit {returncode}); log {log}:\n{tail}')


def side_by_side(left: str, right: str, dest: str, gap: int = 8) -> None:
    a, b = PIL.Image.open(left).convert('RGB'), PIL.Image.open(right).convert('RGB')
    canvas = PIL.Image.new('RGB', (a.width + gap + b.width, max(a.height, b.height)), 'white')
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width + gap, 0))
    canvas.save(dest)


@click.command()
@click.option('--outdir', help='Where to put everything', default='quickstart-out', show_default=True)
@click.option('--kimg', help='Training duration in thousands of images', type=click.FloatRange(min=0.1),
              default=40, show_default=True)
@click.option('--steps', help='Sampling steps for both solvers', type=click.IntRange(min=1), default=18,
              show_default=True)
def main(outdir: str, kimg: float, steps: int) -> None:
    """Convert real digits, train a small EDM model and sample a Heun-vs-Euler grid, all offline."""
    start = time.time()
    outdir = os.path.abspath(outdir)
    if os.path.exists(outdir):
        if not os.path.isfile(os.path.join(outdir, MARKER)):
            raise click.ClickException(f'{outdir} exists and was not made by the quick start; pass another --outdir')
        shutil.rmtree(outdir)
    os.makedirs(outdir)
    open(os.path.join(outdir, MARKER), 'w').close()
    py = sys.executable

    # 1. Real data -> folder of PNGs -> dataset zip (upscaled 8x8 -> 16x16 with Lanczos by dataset_tool.py).
    n = export_digits(os.path.join(outdir, 'digits-src'))
    print(f'exported {n} scikit-learn digits')
    data = os.path.join(outdir, 'digits-16x16.zip')
    run([py, 'dataset_tool.py', f'--source={outdir}/digits-src', f'--dest={data}', '--resolution=16x16'],
        os.path.join(outdir, 'dataset_tool.log'))

    # 2. Train a small class-conditional EDM model (DDPM++ layout with fewer channels and blocks).
    run([py, 'train.py', f'--outdir={outdir}/runs', f'--data={data}', '--cond=1', '--arch=ddpmpp',
         '--precond=edm', f'--duration={kimg / 1000}', '--batch=64', '--cbase=32', '--cres=1,2,2', '--blocks=1',
         '--lr=2e-3', '--lr-rampup=6', '--ema=0.002', '--dropout=0', '--augment=0', '--tick=10', '--snap=1000',
         '--dump=1000', '--workers=0', '--nosubdir', '--seed=0'],
        os.path.join(outdir, 'train.log'))
    snapshots = sorted(glob.glob(os.path.join(outdir, 'runs', 'network-snapshot-*.pkl')))
    if not snapshots:
        raise click.ClickException(f'training wrote no snapshot; see {outdir}/train.log')
    network = snapshots[-1]

    # 3. Sample with the sampler library (what generate.py runs): row k holds digit class k, the same seeds for
    # both solvers.
    from torch_utils import persistence
    from training import sampling
    net = persistence.load_network(network)
    grids = {}
    for solver in ['heun', 'euler']:
        images = []
        for cls in range(10):
            for _seeds, batch in sampling.generate_images(net, seeds=range(cls * 10, cls * 10 + 10), class_idx=cls,
                                                          num_steps=steps, solver=solver, discretization='edm',
                                                          schedule='linear', scaling='none'):
                images.extend(batch.numpy())
        grid = sampling.make_grid(images)[:, :, 0]
        grids[solver] = os.path.join(outdir, f'grid-{solver}.png')
        PIL.Image.fromarray(grid, 'L').resize((grid.shape[1] * 2, grid.shape[0] * 2), PIL.Image.NEAREST).save(grids[solver])
    final = os.path.join(outdir, 'grid-heun-vs-euler.png')
    side_by_side(grids['heun'], grids['euler'], final)

    # 4. The same network through generate.py's command line: 64 PNGs with random classes, plus a grid.
    run([py, 'generate.py', f'--network={network}', f'--outdir={outdir}/samples', '--seeds=0-63', '--grid',
         f'--steps={steps}'], os.path.join(outdir, 'generate.log'))

    print()
    print(f'Done in {time.time() - start:.0f} s.')
    print(f'Samples (left: Heun, {2 * steps - 1} NFE; right: Euler, {steps} NFE; row k = digit k): {final}')
    print(f'generate.py output (Heun, random classes): {outdir}/samples/*.png and {outdir}/samples/grid.png')
    print(f'Network: {network}')


if __name__ == '__main__':
    main()

"""Generate images with a trained EDM network: the command line over training/sampling.py.

    python generate.py --network=net.pkl --outdir=out --seeds=0-63 --grid
    torchrun --standalone --nproc_per_node=2 generate.py --network=net.pkl --outdir=out --seeds=0-49999

The samplers, time steps, per-seed random numbers and batched generation live in `training.sampling`.
The names the paper's examples import from here (`edm_sampler`, `ablation_sampler`,
`StackedRandomGenerator`, `parse_int_list`) stay importable, as do `generate_images` and `make_grid`.
"""

from __future__ import annotations

import os
import time

import click
import numpy as np
import PIL.Image

from dnnlib.util import parse_int_list  # noqa: F401 -- re-exported (the paper's generate.parse_int_list)
from torch_utils.cli import (  # noqa: F401 -- the shared CLI layer; these names stay importable from here
    GUIDANCE_KWARGS as GUIDANCE_OPTIONS, SAMPLER_OPTIONS as _SAMPLER_OPTIONS, check_class, guidance_kwargs_from_cli,
    compile_option, guidance_options, load_guide, load_net, sampler_kwargs_from_cli, sampler_options, seeds_callback)
from training.sampling import (  # noqa: F401 -- re-exported for scripts written against the paper's generate.py
    SAMPLERS, StackedRandomGenerator, ablation_sampler, check_denoiser, edm_sampler, generate_images, make_grid,
    parse_seeds, seed_batches)

# ----------------------------------------------------------------------------
# Output files.


def save_png_atomic(image: np.ndarray, path: str) -> None:
    """HWC uint8 -> PNG (grayscale as 'L'), written atomically."""
    import dnnlib
    image = np.asarray(image)
    pil = PIL.Image.fromarray(image[:, :, 0], 'L') if image.shape[2] == 1 else PIL.Image.fromarray(image, 'RGB')
    with dnnlib.util.atomic_write(path) as f:
        pil.save(f, format='PNG')


def image_path(outdir: str, seed: int, subdirs: bool) -> str:
    directory = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(directory, f'{seed:06d}.png')


# ----------------------------------------------------------------------------
# Command line.


@click.command()
@click.option('--network', 'network_pkl', help='Network pickle filename', metavar='PATH|URL', type=str, required=True)
@click.option('--outdir', help='Where to save the output images', metavar='DIR', type=str, required=True)
@click.option('--seeds', help='Random seeds (e.g. 1,2,5-10)', metavar='LIST', callback=seeds_callback(), default='0-63', show_default=True)
@click.option('--subdirs', help='Create subdirectory for every 1000 seeds', is_flag=True)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--grid', help='Also write all images as one grid PNG  [bare --grid: OUTDIR/grid.png, which fid.py skips]', metavar='[FILE]', is_flag=False, flag_value='', default=None)
@sampler_options
@compile_option
@click.option('--bf16', help='Run the network in bfloat16 (~2x faster with native bf16: AVX-512/AMX CPUs, CUDA; many times slower on AVX2-only CPUs; images differ slightly from fp32)', is_flag=True)
def main(network_pkl, outdir, seeds, subdirs, class_idx, max_batch_size, grid, compile_network, bf16, **sampler_kwargs):
    """Generate random images using the techniques described in the paper
    "Elucidating the Design Space of Diffusion-Based Generative Models".

    \b
    # Generate 64 images and save them as out/*.png
    python generate.py --outdir=out --seeds=0-63 --batch=64 --network=network-snapshot.pkl

    \b
    # Generate 1024 images using 2 processes
    torchrun --standalone --nproc_per_node=2 generate.py --outdir=out --seeds=0-999 --network=network-snapshot.pkl

    \b
    # DPM-Solver++(2M) in 10 steps with classifier-free guidance (a network trained with --label-dropout)
    python generate.py --outdir=out --network=network-snapshot.pkl --sampler=dpmpp_2m --steps=10 --cfg --guidance=2

    \b
    # Autoguidance: guided by a smaller or shorter-trained version of the same model
    python generate.py --outdir=out --network=network-snapshot.pkl --gnet=early-snapshot.pkl --guidance=2
    """
    from torch_utils import distributed as dist
    from torch_utils import misc

    misc.set_malloc_thresholds()  # reuse activation buffers instead of page-faulting them in every step
    sampler_kwargs = dict(sampler_kwargs_from_cli(click.get_current_context(), sampler_kwargs), compile=compile_network)

    owns_process_group = not dist.is_initialized()  # e.g. fid.py or a test may have set one up already
    dist.init()
    try:
        _generate(network_pkl, outdir, seeds, subdirs, class_idx, max_batch_size, grid, sampler_kwargs, bf16)
    finally:
        if owns_process_group:
            dist.shutdown()


def _generate(network_pkl, outdir, seeds, subdirs, class_idx, max_batch_size, grid, sampler_kwargs, bf16=False):
    import tqdm
    from torch_utils import distributed as dist
    from torch_utils import misc

    device = dist.default_device()
    rank, world_size = dist.get_rank(), dist.get_world_size()

    # Rank 0 fetches the network first (filling the download cache); the others then read the cached copy.
    dist.print0(f'Loading network from "{network_pkl}"...')
    def load_all():
        net = load_net(network_pkl, device, verbose=(rank == 0))
        return net, load_guide(sampler_kwargs, net, device, verbose=(rank == 0))
    net, sampler_kwargs = dist.rank0_first(load_all, other_error=lambda: click.ClickException(
        'loading the network failed on another process'))
    if bf16:
        for network in (net, sampler_kwargs.get('gnet')):  # the preconditioner runs its backbone in bfloat16;
            if network is not None:                          # the sampler stays float64
                network.use_bf16 = True
        if misc.bf16_warning(device):
            dist.print0(misc.bf16_warning(device))

    check_class(class_idx, net)

    grid_path = None if grid is None else (grid or os.path.join(outdir, 'grid.png'))
    if grid and not os.path.isdir(os.path.dirname(os.path.abspath(grid))):
        raise click.BadParameter(f'the folder of {grid!r} does not exist', param_hint='--grid')
    try:
        os.makedirs(outdir, exist_ok=True)
        if subdirs:
            for d in sorted({os.path.dirname(image_path(outdir, s, True)) for s in seeds}):
                os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise click.ClickException(f'--outdir {outdir}: cannot create output folder ({e.strerror or e})') from None

    # Progress on rank 0 counts the images of all ranks: rank 0's k-th batch is the k-th round of batches.
    batches = seed_batches(seeds, max_batch_size, world_size)
    round_sizes = [sum(len(b) for b in batches[k:k + world_size]) for k in range(0, len(batches), world_size)]
    dist.print0(f'Generating {len(seeds)} images to "{outdir}" with {world_size} process(es)...')
    start = time.time()
    with tqdm.tqdm(total=len(seeds), unit='img', disable=(rank != 0), dynamic_ncols=True) as bar:
        for k, (batch_seeds, images) in enumerate(generate_images(net, seeds, max_batch_size, class_idx, device,
                                                                  **sampler_kwargs)):
            for seed, image in zip(batch_seeds, images.numpy()):
                path = image_path(outdir, seed, subdirs)
                try:
                    save_png_atomic(image, path)
                except OSError as e:
                    raise click.ClickException(f'cannot write {path}: {e.strerror or e}') from None
            bar.update(round_sizes[k])
    dist.barrier()

    if grid_path is not None and rank == 0:
        tiles = [np.array(PIL.Image.open(image_path(outdir, s, subdirs))) for s in seeds]
        tiles = [t[:, :, None] if t.ndim == 2 else t for t in tiles]
        save_png_atomic(make_grid(tiles), grid_path)
        dist.print0(f'Wrote grid of {len(tiles)} images to "{grid_path}"')
    dist.print0(f'Done in {time.time() - start:.1f} s.')


if __name__ == '__main__':
    main()

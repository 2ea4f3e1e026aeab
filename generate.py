"""Generate images with a trained EDM network: the command line over training/sampling.py.

    python generate.py --network=net.pkl --outdir=out --seeds=0-63 --grid
    torchrun --standalone --nproc_per_node=2 generate.py --network=net.pkl --outdir=out --seeds=0-49999

The samplers, time steps, per-seed random numbers and batched generation live in `training.sampling`.
The names the paper's examples import from here (`edm_sampler`, `ablation_sampler`,
`StackedRandomGenerator`, `parse_int_list`) stay importable, as do `generate_images` and `make_grid`.
"""

from __future__ import annotations

import math
import os
import time
from typing import Sequence

import click
import numpy as np
import PIL.Image
import torch

from dnnlib.util import parse_int_list  # noqa: F401 -- re-exported (the paper's generate.parse_int_list)
from training.sampling import (  # noqa: F401 -- re-exported for scripts written against the paper's generate.py
    SAMPLERS, StackedRandomGenerator, ablation_sampler, check_denoiser, edm_sampler, generate_images,
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


def make_grid(images: Sequence[np.ndarray]) -> np.ndarray:
    """Tile HWC images row-major into a near-square grid (unused cells black)."""
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w, c = images[0].shape
    grid = np.zeros([rows * h, cols * w, c], dtype=np.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return grid


# ----------------------------------------------------------------------------
# Command line.


def load_net(network: str, device: torch.device, verbose: bool = True, option: str = '--network'):
    """The CLI's network loader: persistence.load_network (URLs through the download cache) plus the
    denoiser-interface check, with failures as one-line click errors naming `option`."""
    from torch_utils import persistence
    try:
        net = persistence.load_network(network, key='ema', device=device, verbose=verbose)
        check_denoiser(net, f'the "ema" object in {network}')
    except ValueError as e:  # CheckpointError and the interface check: one line naming the file
        raise click.ClickException(f'{option} {e}') from None
    except Exception as e:  # the checkpoint boundary: any other failure becomes one line, not a traceback
        raise click.ClickException(f'{option} {network}: not a loadable network pickle '
                                   f'({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""})') from None
    return net


def _parse_seeds(ctx, param, value):
    try:
        seeds = parse_seeds(value)
    except ValueError as e:
        raise click.BadParameter(f'{e}; expected e.g. 0-63 or 1,2,5-10') from None
    if not seeds:
        raise click.BadParameter('empty seed list')
    return seeds


# Sampler options shared by generate.py and fid.py's `net` command (the paper's names and defaults).
_SAMPLER_OPTIONS = [
    click.option('--sampler', help=f'Sampler: {", ".join(SAMPLERS)}  [default: edm, or ablation when --solver/--disc/--schedule/--scaling is given]', metavar='NAME', type=click.Choice(list(SAMPLERS))),
    click.option('--steps', 'num_steps', help='Number of sampling steps', metavar='INT', type=click.IntRange(min=1), default=18, show_default=True),
    click.option('--sigma_min', help='Lowest noise level  [default: varies]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True)),
    click.option('--sigma_max', help='Highest noise level  [default: varies]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True)),
    click.option('--rho', help='Time step exponent', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=7, show_default=True),
    click.option('--S_churn', 'S_churn', help='Stochasticity strength', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True),
    click.option('--S_min', 'S_min', help='Stoch. min noise level', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True),
    click.option('--S_max', 'S_max', help='Stoch. max noise level', metavar='FLOAT', type=click.FloatRange(min=0), default='inf', show_default=True),
    click.option('--S_noise', 'S_noise', help='Stoch. noise inflation', metavar='FLOAT', type=float, default=1, show_default=True),
    click.option('--solver', help='Ablate ODE solver', metavar='euler|heun', type=click.Choice(['euler', 'heun'])),
    click.option('--disc', 'discretization', help='Ablate time step discretization {t_i}', metavar='vp|ve|iddpm|edm', type=click.Choice(['vp', 've', 'iddpm', 'edm'])),
    click.option('--schedule', help='Ablate noise schedule sigma(t)', metavar='vp|ve|linear', type=click.Choice(['vp', 've', 'linear'])),
    click.option('--scaling', help='Ablate signal scaling s(t)', metavar='vp|none', type=click.Choice(['vp', 'none'])),
    # Options of the k-diffusion-class samplers (k-diffusion's names); one option serves every sampler taking it.
    click.option('--eta', help='Ancestral/SDE noise amount (0: ODE)', metavar='FLOAT', type=click.FloatRange(min=0), default=1, show_default=True),
    click.option('--s_noise', 's_noise', help='Ancestral/SDE noise inflation', metavar='FLOAT', type=click.FloatRange(min=0), default=1, show_default=True),
    click.option('--order', help='Solver order: lms [default: 4], unipc (1-3) [default: 2]', metavar='INT', type=click.IntRange(min=1)),
    click.option('--solver_type', 'solver_type', help='dpmpp_2m_sde history term', metavar='midpoint|heun', type=click.Choice(['midpoint', 'heun']), default='midpoint', show_default=True),
    # Options of the predictor-corrector sampler (Song et al. 2021; training/sde.py).
    click.option('--sde', help='pc: the SDE', metavar='ve|vp', type=click.Choice(['ve', 'vp']), default='ve', show_default=True),
    click.option('--predictor', help='pc: predictor', metavar='reverse_diffusion|euler_maruyama', type=click.Choice(['reverse_diffusion', 'euler_maruyama']), default='reverse_diffusion', show_default=True),
    click.option('--corrector', help='pc: corrector', metavar='langevin|none', type=click.Choice(['langevin', 'none']), default='langevin', show_default=True),
    click.option('--snr', help='pc: Langevin signal-to-noise ratio', metavar='FLOAT', type=click.FloatRange(min=0), default=0.16, show_default=True),
    click.option('--corrector-steps', 'corrector_steps', help='pc: Langevin steps per time step', metavar='INT', type=click.IntRange(min=0), default=1, show_default=True),
    click.option('--epsilon_s', 'epsilon_s', help='pc/ablation: last time t  [default: 1e-3]', metavar='FLOAT', type=click.FloatRange(min=0, max=1, min_open=True, max_open=True)),
]

# Guidance of every network evaluation, for any sampler (part of the sampler options; fid.py sweep uses them alone).
_GUIDANCE_OPTIONS = [
    click.option('--gnet', help='Guiding network pickle (autoguidance, or CFG with an unconditional model)', metavar='PKL|URL', type=str),
    click.option('--guidance', help='Guidance weight w: D_g + w (D - D_g)', metavar='FLOAT', type=float, default=1, show_default=True),
    click.option('--cfg', help='Classifier-free guidance: the network without labels is the guide', is_flag=True),
    click.option('--guidance-interval', 'guidance_interval', help='Guide only for sigma in [LO, HI]', metavar='LO,HI', callback=lambda ctx, param, value: _parse_interval(value)),
]

GUIDANCE_OPTIONS = ('gnet', 'guidance', 'cfg', 'guidance_interval')


def _parse_interval(value: str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value.split(','))
    except ValueError:
        raise click.BadParameter(f'{value!r} is not LO,HI (two noise levels, e.g. 0.28,5.42)') from None
    if not 0 <= lo <= hi:
        raise click.BadParameter(f'{value!r}: need 0 <= LO <= HI')
    return lo, hi


def sampler_kwargs_from_cli(ctx: click.Context, kwargs: dict) -> dict:
    """The sampler options of a command line as generate_images kwargs (`sampler` plus its options).

    Defaults the chosen sampler does not take are dropped; an option given explicitly that the sampler does
    not take is a usage error (e.g. --S_churn with a sampler without churn)."""
    from training.sampling import ABLATION_KWARGS, count_nfe, resolve_sampler, sampler_options_of
    kwargs = dict(kwargs)
    name = kwargs.pop('sampler', None)
    guidance = guidance_kwargs_from_cli({k: kwargs.pop(k) for k in GUIDANCE_OPTIONS})
    given = {k: v for k, v in kwargs.items() if v is not None}
    explicit = {k for k in given if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
    if name is None:
        name = 'ablation' if explicit & set(ABLATION_KWARGS) else 'edm'
    accepted = set(sampler_options_of(name))
    given = {k: v for k, v in given.items() if k in accepted or k in explicit}
    try:
        name, given = resolve_sampler(name, given)
    except (TypeError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    if given.get('sigma_min') is not None and given.get('sigma_max') is not None \
            and given['sigma_min'] >= given['sigma_max']:
        raise click.BadParameter('--sigma_min must be smaller than --sigma_max', param_hint='--sigma_min')
    try:  # values the sampler itself rejects (e.g. --order=4 for unipc): a dry run on a 1-pixel stand-in
        count_nfe(name, **given)
    except ValueError as e:
        raise click.UsageError(f'--sampler={name}: {e}') from None
    return dict(sampler=name, **given, **guidance)


def guidance_kwargs_from_cli(kwargs: dict) -> dict:
    """The guidance options (gnet path, guidance, cfg, guidance_interval), checked for consistency; {} when
    there is no guide (generate_images' defaults)."""
    guidance = {k: kwargs[k] for k in GUIDANCE_OPTIONS}
    if guidance['cfg'] and guidance['gnet'] is not None:
        raise click.UsageError('--cfg guides the network with itself (labels zeroed); do not also give --gnet')
    if guidance['gnet'] is None and not guidance['cfg'] and (guidance['guidance'] != 1
                                                            or guidance['guidance_interval'] is not None):
        raise click.UsageError('--guidance and --guidance-interval need a guide: --gnet=PKL or --cfg')
    return guidance if guidance['gnet'] is not None or guidance['cfg'] else {}


def load_guide(sampler_kwargs: dict, net, device: torch.device, verbose: bool = True) -> dict:
    """sampler_kwargs with --gnet's path replaced by the loaded network, checked against `net` (and --cfg
    against a network without labels); one-line click errors."""
    from training.sampling import check_guide
    if sampler_kwargs.get('cfg') and not int(net.label_dim):
        raise click.BadParameter('classifier-free guidance needs a class-conditional network; this one has no '
                                 'class labels', param_hint='--cfg')
    if sampler_kwargs.get('gnet') is None:
        return sampler_kwargs
    path = sampler_kwargs['gnet']
    gnet = load_net(path, device, verbose=verbose, option='--gnet')
    try:
        check_guide(net, gnet, f'--gnet {path}')
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    return dict(sampler_kwargs, gnet=gnet)


def sampler_options(fn):
    """Add the sampler and guidance options to a click command; sampler_kwargs_from_cli turns them into
    keyword arguments of training.sampling.generate_images (`sampler`, its options, the guidance)."""
    for option in reversed(_SAMPLER_OPTIONS + _GUIDANCE_OPTIONS):
        fn = option(fn)
    return fn


def guidance_options(fn):
    """Add only the guidance options (--gnet, --guidance, --cfg, --guidance-interval)."""
    for option in reversed(_GUIDANCE_OPTIONS):
        fn = option(fn)
    return fn


@click.command()
@click.option('--network', 'network_pkl', help='Network pickle filename', metavar='PATH|URL', type=str, required=True)
@click.option('--outdir', help='Where to save the output images', metavar='DIR', type=str, required=True)
@click.option('--seeds', help='Random seeds (e.g. 1,2,5-10)', metavar='LIST', callback=_parse_seeds, default='0-63', show_default=True)
@click.option('--subdirs', help='Create subdirectory for every 1000 seeds', is_flag=True)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--grid', help='Also write all images as one grid PNG  [bare --grid: OUTDIR/grid.png]', metavar='[FILE]', is_flag=False, flag_value='', default=None)
@sampler_options
@click.option('--bf16', help='Run the network in bfloat16 (~2x faster with native bf16: AVX-512/AMX CPUs, CUDA; many times slower on AVX2-only CPUs; images differ slightly from fp32)', is_flag=True)
def main(network_pkl, outdir, seeds, subdirs, class_idx, max_batch_size, grid, bf16, **sampler_kwargs):
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
    sampler_kwargs = sampler_kwargs_from_cli(click.get_current_context(), sampler_kwargs)

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

    if class_idx is not None and not class_idx < net.label_dim:
        raise click.BadParameter(f'{class_idx} is out of range: the network has '
                                 + (f'{net.label_dim} classes (0..{net.label_dim - 1})' if net.label_dim
                                    else 'no class labels (unconditional)'), param_hint='--class')

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

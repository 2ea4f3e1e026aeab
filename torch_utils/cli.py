"""The command-line layer the CLIs share (click): finite float types, the sampler, guidance and detector
option groups, the seed callback, the network/guide loader, and the one-line error helper.

Library code raises exceptions; this module turns them into one-line click errors. It is not a CLI itself,
so train.py, generate.py, fid.py, compress.py and reconstruct_phema.py import it instead of each other.
"""

from __future__ import annotations

import functools
import math

import click
import torch

from dnnlib.util import first_line  # noqa: F401 -- the CLIs' "first line of an exception"
from training.sampling import SAMPLERS, parse_seeds

# ----------------------------------------------------------------------------
# Float types that reject NaN and infinities (which pass every range check: nan < 0 and nan > 1 are False).


def _check_finite(param_type: click.ParamType, rv: float, value, param, ctx, allow_inf: bool) -> float:
    if math.isnan(rv) or (math.isinf(rv) and not (allow_inf and rv > 0)):
        param_type.fail(f'{value!r} is not a finite number', param, ctx)
    return rv


class FiniteFloat(click.ParamType):
    """click's float, without nan/inf/-inf."""
    name = 'float'

    def convert(self, value, param, ctx):
        return _check_finite(self, click.FLOAT.convert(value, param, ctx), value, param, ctx, allow_inf=False)

    def __repr__(self):
        return 'FINITE_FLOAT'


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange (same help text) without nan, and without infinities unless `allow_inf` (then +inf
    only, e.g. the paper's --S_max default)."""

    def __init__(self, *args, allow_inf: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.allow_inf = allow_inf

    def convert(self, value, param, ctx):
        rv = click.FLOAT.convert(value, param, ctx)
        _check_finite(self, rv, value, param, ctx, self.allow_inf)
        return super().convert(rv, param, ctx)


FLOAT = FiniteFloat()


def add_options(options):
    """A decorator adding click `options` (a list, shown in that order in --help) to a command."""
    def decorator(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorator

# ----------------------------------------------------------------------------
# Seeds.


def seeds_callback(min_count: int = 1, example: str = '0-63 or 1,2,5-10'):
    """A click callback for a --seeds option: training.sampling.parse_seeds (seeds in 0..2^32-1, at most 10
    million, checked before ranges are expanded), with at least `min_count` distinct seeds."""
    def callback(ctx, param, value):
        if value is None:
            return None
        try:
            seeds = parse_seeds(value)
        except ValueError as e:
            raise click.BadParameter(f'{e}; expected e.g. {example}', ctx, param) from None
        if not seeds:
            raise click.BadParameter('empty seed list', ctx, param)
        if min_count > 1 and (len(set(seeds)) < min_count or len(set(seeds)) != len(seeds)):
            raise click.BadParameter(f'need at least {min_count} distinct seeds', ctx, param)
        return seeds
    return callback

# ----------------------------------------------------------------------------
# Sampler and guidance options (the paper's generate.py names and defaults, plus k-diffusion's for the
# samplers of that family; one option serves every sampler taking it).

SAMPLER_OPTIONS = [
    click.option('--sampler', help=f'Sampler: {", ".join(SAMPLERS)}  [default: edm, or ablation when --solver/--disc/--schedule/--scaling is given]', metavar='NAME', type=click.Choice(list(SAMPLERS))),
    click.option('--steps', 'num_steps', help='Number of sampling steps', metavar='INT', type=click.IntRange(min=1), default=18, show_default=True),
    click.option('--sigma_min', help='Lowest noise level  [default: varies]', metavar='FLOAT', type=FiniteFloatRange(min=0, min_open=True)),
    click.option('--sigma_max', help='Highest noise level  [default: varies]', metavar='FLOAT', type=FiniteFloatRange(min=0, min_open=True)),
    click.option('--rho', help='Time step exponent', metavar='FLOAT', type=FiniteFloatRange(min=0, min_open=True), default=7, show_default=True),
    click.option('--S_churn', 'S_churn', help='Stochasticity strength', metavar='FLOAT', type=FiniteFloatRange(min=0), default=0, show_default=True),
    click.option('--S_min', 'S_min', help='Stoch. min noise level', metavar='FLOAT', type=FiniteFloatRange(min=0), default=0, show_default=True),
    click.option('--S_max', 'S_max', help='Stoch. max noise level', metavar='FLOAT', type=FiniteFloatRange(min=0, allow_inf=True), default='inf', show_default=True),
    click.option('--S_noise', 'S_noise', help='Stoch. noise inflation', metavar='FLOAT', type=FLOAT, default=1, show_default=True),
    click.option('--solver', help='Ablate ODE solver', metavar='euler|heun', type=click.Choice(['euler', 'heun'])),
    click.option('--disc', 'discretization', help='Ablate time step discretization {t_i}', metavar='vp|ve|iddpm|edm', type=click.Choice(['vp', 've', 'iddpm', 'edm'])),
    click.option('--schedule', help='Ablate noise schedule sigma(t)', metavar='vp|ve|linear', type=click.Choice(['vp', 've', 'linear'])),
    click.option('--scaling', help='Ablate signal scaling s(t)', metavar='vp|none', type=click.Choice(['vp', 'none'])),
    click.option('--eta', help="Ancestral/SDE/DDIM noise amount (0: ODE)  [default: the sampler's: 1, iddpm_ddim 0]", metavar='FLOAT', type=FiniteFloatRange(min=0)),
    click.option('--s_noise', 's_noise', help='Ancestral/SDE noise inflation', metavar='FLOAT', type=FiniteFloatRange(min=0), default=1, show_default=True),
    click.option('--order', help='Solver order: lms [default: 4], unipc (1-3) [default: 2]', metavar='INT', type=click.IntRange(min=1)),
    click.option('--solver_type', 'solver_type', help='dpmpp_2m_sde history term', metavar='midpoint|heun', type=click.Choice(['midpoint', 'heun']), default='midpoint', show_default=True),
    # Options of the iDDPM samplers (training/iddpm.py).
    click.option('--spacing', help='iddpm/iddpm_ddim: respaced steps, ddimN or section counts, e.g. ddim50 or 10,15  [default: --steps evenly spread]', metavar='ddimN|LIST', type=str),
    # Options of the predictor-corrector sampler (Song et al. 2021; training/sde.py).
    click.option('--sde', help='pc: the SDE', metavar='ve|vp', type=click.Choice(['ve', 'vp']), default='ve', show_default=True),
    click.option('--predictor', help='pc: predictor', metavar='reverse_diffusion|euler_maruyama', type=click.Choice(['reverse_diffusion', 'euler_maruyama']), default='reverse_diffusion', show_default=True),
    click.option('--corrector', help='pc: corrector', metavar='langevin|none', type=click.Choice(['langevin', 'none']), default='langevin', show_default=True),
    click.option('--snr', help='pc: Langevin signal-to-noise ratio', metavar='FLOAT', type=FiniteFloatRange(min=0), default=0.16, show_default=True),
    click.option('--corrector-steps', 'corrector_steps', help='pc: Langevin steps per time step', metavar='INT', type=click.IntRange(min=0), default=1, show_default=True),
    click.option('--epsilon_s', 'epsilon_s', help='pc/ablation: last time t  [default: 1e-3]', metavar='FLOAT', type=FiniteFloatRange(min=0, max=1, min_open=True, max_open=True)),
]


def parse_interval(value: str | None) -> tuple[float, float] | None:
    """--guidance-interval 'LO,HI' -> (LO, HI) with 0 <= LO <= HI, LO finite (HI may be inf)."""
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value.split(','))
    except ValueError:
        raise click.BadParameter(f'{value!r} is not LO,HI (two noise levels, e.g. 0.28,5.42)') from None
    if not (0 <= lo <= hi and math.isfinite(lo)):
        raise click.BadParameter(f'{value!r}: need 0 <= LO <= HI (finite LO)')
    return lo, hi


# Guidance of every network evaluation, for any sampler.
GUIDANCE_OPTIONS = [
    click.option('--gnet', help='Guiding network pickle (autoguidance, or CFG with an unconditional model)', metavar='PKL|URL', type=str),
    click.option('--guidance', help='Guidance weight w: D_g + w (D - D_g)', metavar='FLOAT', type=FLOAT, default=1, show_default=True),
    click.option('--cfg', help='Classifier-free guidance: the network without labels is the guide', is_flag=True),
    click.option('--guidance-interval', 'guidance_interval', help='Guide only for sigma in [LO, HI]', metavar='LO,HI', callback=lambda ctx, param, value: parse_interval(value)),
]

GUIDANCE_KWARGS = ('gnet', 'guidance', 'cfg', 'guidance_interval')

# The feature detector and the metrics options (fid.py, compress.py report, reconstruct_phema.py --sweep, train.py).
DETECTOR_OPTIONS = [
    click.option('--detector', help='Feature detector: TorchScript file or pickle (Inception), or dinov2[:PATH]  '
                 '[default: standard Inception-v3 URL]', metavar='PATH|URL', type=str, default=None),
    click.option('--trust-pickle', help='Allow a --detector pickle to run its embedded code (trusted files only)',
                 is_flag=True),
]

sampler_options = add_options(SAMPLER_OPTIONS + GUIDANCE_OPTIONS)
sampler_options.__doc__ = """Add the sampler and guidance options to a click command; sampler_kwargs_from_cli
turns them into keyword arguments of training.sampling.generate_images (`sampler`, its options, the guidance)."""
guidance_options = add_options(GUIDANCE_OPTIONS)
detector_options = add_options(DETECTOR_OPTIONS)
compile_option = click.option('--compile', 'compile_network', is_flag=True,
                              help='Compile the network with torch.compile (needs a C++ compiler; pays from a few '
                                   'hundred images on)')
bootstrap_options = add_options([
    click.option('--bootstrap', help='Bootstrap replicates for intervals', metavar='INT',
                 type=click.IntRange(min=2), default=100, show_default=True),
    click.option('--confidence', help='Confidence level of intervals', metavar='FLOAT',
                 type=FiniteFloatRange(min=0, max=1, min_open=True, max_open=True), default=0.95, show_default=True),
])


def metric_list(ctx, param, value):
    """Click callback: 'fid,kid' -> the validated list of metric names (None stays None)."""
    from metrics.errors import MetricsError
    from metrics.metric_specs import resolve_metrics
    if value is None:
        return None
    try:
        return [spec.name for spec in resolve_metrics(value)]
    except MetricsError as e:
        raise click.BadParameter(str(e)) from None


def metrics_option(default: str = 'fid', help_extra: str = ''):
    """--metrics=LIST (names from metrics.metric_specs.METRICS), validated by metric_list."""
    from metrics.metric_specs import METRICS
    return click.option('--metrics', 'metric_names', help=f'Metrics: {", ".join(METRICS)}{help_extra}',
                        metavar='LIST', type=str, default=default, show_default=True, callback=metric_list)


def one_line_errors(fn):
    """A command whose library errors (metrics.MetricsError) become one-line click errors, not tracebacks."""
    from metrics.errors import MetricsError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MetricsError as e:
            raise click.ClickException(str(e)) from None
    return wrapper


class Group(click.Group):
    """A click group whose subcommands report metrics.MetricsError as one line."""

    def invoke(self, ctx):
        from metrics.errors import MetricsError
        try:
            return super().invoke(ctx)
        except MetricsError as e:
            raise click.ClickException(str(e)) from None


def sampler_kwargs_from_cli(ctx: click.Context, kwargs: dict) -> dict:
    """The sampler options of a command line as generate_images kwargs (`sampler` plus its options).

    Defaults the chosen sampler does not take are dropped; an option given explicitly that the sampler does
    not take is a usage error (e.g. --S_churn with a sampler without churn)."""
    from training.sampling import ABLATION_KWARGS, count_nfe, resolve_sampler, sampler_options_of
    kwargs = dict(kwargs)
    name = kwargs.pop('sampler', None)
    guidance = guidance_kwargs_from_cli({k: kwargs.pop(k) for k in GUIDANCE_KWARGS})
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
    from training.sampling import check_guidance
    guidance = {k: kwargs[k] for k in GUIDANCE_KWARGS}
    try:
        check_guidance(guidance['gnet'] is not None, guidance['guidance'], guidance['cfg'],
                       guidance['guidance_interval'], spell=option_name)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    return guidance if guidance['gnet'] is not None or guidance['cfg'] else {}


def option_name(keyword: str) -> str:
    """The command-line spelling of a keyword argument ('guidance_interval' -> '--guidance-interval')."""
    return '--' + keyword.replace('_', '-')

# ----------------------------------------------------------------------------
# Network snapshots: torch_utils.persistence's safe loader, with failures as one-line click errors.


def load_snapshot(path: str, option: str = '--network', key: str = 'ema', verbose: bool = True) -> tuple[dict, str]:
    """(snapshot dict, local file) of a snapshot path or URL (persistence.load_snapshot); its network under
    `key` in eval mode without gradients. Failures are one-line click errors naming `option`."""
    from torch_utils import persistence
    try:
        data, source = persistence.load_snapshot(path, key=key, verbose=verbose)
    except ValueError as e:  # CheckpointError: one line naming the file
        raise click.ClickException(f'{option} {first_line(e)}') from None
    except Exception as e:  # the checkpoint boundary: any other failure becomes one line, not a traceback
        raise click.ClickException(f'{option} {path}: not a loadable network pickle '
                                   f'({type(e).__name__}: {first_line(e)})') from None
    data[key].eval().requires_grad_(False)
    return data, source


def load_net(network: str, device: torch.device, verbose: bool = True, option: str = '--network'):
    """The network of a snapshot (its 'ema') on `device`, checked to be a denoiser (training.sampling's
    interface); one-line click errors naming `option`."""
    from training.sampling import check_denoiser
    data, _source = load_snapshot(network, option=option, verbose=verbose)
    net = data['ema'].to(device)
    try:
        check_denoiser(net, f'the "ema" object in {network}')
    except ValueError as e:
        raise click.ClickException(f'{option} {e}') from None
    return net


def check_class(class_idx: int | None, net) -> None:
    """--class must name one of the network's classes."""
    if class_idx is not None and not class_idx < int(net.label_dim):
        raise click.BadParameter(f'{class_idx} is out of range: the network has '
                                 + (f'{net.label_dim} classes (0..{net.label_dim - 1})' if net.label_dim
                                    else 'no class labels (unconditional)'), param_hint='--class')


def check_steps_fit(net, sampler_kwargs: dict) -> None:
    """The steps of a sampler on a discrete process (the iDDPM samplers: --steps evenly spread, or --spacing)
    must fit the network's process (its M steps; 1000 for other denoisers); a one-line usage error otherwise."""
    from training.sampling import sampler_options_of
    name = sampler_kwargs.get('sampler', 'edm')
    if 'spacing' not in sampler_options_of(name):
        return
    from training import iddpm
    T = int(getattr(net, 'M', 1000))
    spacing = sampler_kwargs.get('spacing')
    try:
        iddpm.space_timesteps(T, spacing if spacing is not None else [int(sampler_kwargs.get('num_steps', 50))])
    except ValueError as e:
        option = '--spacing' if spacing is not None else '--steps'
        raise click.UsageError(f'{option}: {e} (the network\'s process has {T} steps)') from None


def load_guide(sampler_kwargs: dict, net, device: torch.device, verbose: bool = True) -> dict:
    """sampler_kwargs with --gnet's path replaced by the loaded network, checked against `net` (--cfg against
    a network without labels, the iDDPM samplers' steps against its process); one-line click errors."""
    from training.sampling import check_guidance, check_guide
    check_steps_fit(net, sampler_kwargs)
    try:
        check_guidance(sampler_kwargs.get('gnet') is not None, sampler_kwargs.get('guidance', 1),
                       sampler_kwargs.get('cfg', False), sampler_kwargs.get('guidance_interval'),
                       label_dim=net.label_dim if sampler_kwargs.get('cfg') else None, spell=option_name)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if sampler_kwargs.get('gnet') is None:
        return sampler_kwargs
    path = sampler_kwargs['gnet']
    gnet = load_net(path, device, verbose=verbose, option='--gnet')
    try:
        check_guide(net, gnet, f'--gnet {path}')
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    return dict(sampler_kwargs, gnet=gnet)

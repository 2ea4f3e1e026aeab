"""Configurations as data: the architectures train.py's --arch offers (one record each), the constructor
presets they are built from, and the option presets of --preset.

Constructor presets are class kwargs: ARCH_PRESETS (backbones), PRECOND_PRESETS (Table 1's preconditioner
and loss), NETWORKS (complete named networks; benchmarks build them). Option presets are train.py option
values: an Architecture's `defaults` (e.g. EDM2_DEFAULTS) and CONFIG_PRESETS. ARCHITECTURES joins them:
docs/design.md ("Add a network family") describes the record and how train.py applies it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import NamedTuple

# ----------------------------------------------------------------------------
# Constructor presets (class kwargs).

ARCH_PRESETS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                   decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual',
                   decoder_type='standard', channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'adm': dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
    # EDM2 (Karras et al. 2024): training.networks_edm2.Precond, the rest of its layout the UNet's defaults
    # (channel_mult [1,2,3,4], 3 blocks, attention at 16x16 and 8x8). 192 channels = EDM2's size S.
    'edm2': dict(model_channels=192),
}

PRECOND_PRESETS = {
    'vp': ('training.networks.VPPrecond', 'training.loss.VPLoss'),
    've': ('training.networks.VEPrecond', 'training.loss.VELoss'),
    'edm': ('training.networks.EDMPrecond', 'training.loss.EDMLoss'),
}


def _network(arch: str, precond: str = 'edm', **kwargs) -> dict:
    return dict(dict(class_name=PRECOND_PRESETS[precond][0], **ARCH_PRESETS[arch]), **kwargs)


NETWORKS = {
    # The paper's CIFAR-10 networks (train.py --arch=ddpmpp|ncsnpp --cond=1 --augment=0.12): 55.7M / 56.4M parameters.
    'ddpmpp-cifar10': _network('ddpmpp', img_resolution=32, img_channels=3, label_dim=10, augment_dim=9, dropout=0.13),
    'ncsnpp-cifar10': _network('ncsnpp', img_resolution=32, img_channels=3, label_dim=10, augment_dim=9, dropout=0.13),
    # ImageNet-64 (train.py --arch=adm --cond=1 --dropout=0.1 --augment=0): 296M parameters.
    'adm-imagenet64': _network('adm', img_resolution=64, img_channels=3, label_dim=1000, dropout=0.1),
    # The CIFAR-10 recipe at a CPU-friendly size: --cbase=32 --cres=1,2 on 16x16 images.
    'small-16': _network('ddpmpp', img_resolution=16, img_channels=3, label_dim=10, augment_dim=9, dropout=0.13,
                         model_channels=32, channel_mult=[1, 2]),
    # scripts/quickstart.py: 16x16 digits, --cbase=32 --cres=1,2,2 --blocks=1 --dropout=0 --augment=0.
    'quickstart': _network('ddpmpp', img_resolution=16, img_channels=1, label_dim=10, dropout=0,
                           model_channels=32, channel_mult=[1, 2, 2], num_blocks=1),
    # DDPM++ at a CPU-friendly width (train.py --arch=ddpmpp --cbase=32 --cres=2,2,2 --blocks=4, 32x32 RGB).
    'ddpmpp-small-32': _network('ddpmpp', img_resolution=32, img_channels=3, label_dim=0, augment_dim=9,
                                dropout=0.13, model_channels=32, channel_mult=[2, 2, 2], num_blocks=4),
    # The smallest DDPM++ (8x8, one block per resolution): benchmarks run at this size in the test suite.
    'tiny-8': _network('ddpmpp', img_resolution=8, img_channels=3, label_dim=10, augment_dim=9, dropout=0.13,
                       model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
}


def network_kwargs(name: str, **overrides) -> dict:
    """A copy of NETWORKS[name] with `overrides` applied (safe to modify)."""
    if name not in NETWORKS:
        raise KeyError(f'unknown network preset {name!r}; expected one of {", ".join(NETWORKS)}')
    return dict(copy.deepcopy(NETWORKS[name]), **overrides)


# Classes and functions the options select: EDM2 ("Analyzing and Improving the Training Dynamics of Diffusion
# Models", Karras et al. 2024), the uncertainty-weighted losses, the lr schedules.

EDM2_NETWORK = 'training.networks_edm2.Precond'  # --arch=edm2: EDM preconditioning built in, c_noise = ln(sigma)/4
EDM2_LOSS = 'training.loss.EDM2Loss'             # --loss=edm2, and always with --arch=edm2
LOGVAR_CHANNELS = 128                            # width of the uncertainty head EDM2 uses (Precond's default)

# --uncertainty=1: each Table 1 loss with learned uncertainty weighting (EDM: EDM2Loss with EDMLoss's P_mean/P_std).
UNCERTAINTY_LOSSES = {
    'vp': 'training.loss.VPUncertaintyLoss',
    've': 'training.loss.VEUncertaintyLoss',
    'edm': EDM2_LOSS,
}

# --lr-schedule: the loop calls func(cur_nimg=, batch_size=, **lr_kwargs).
LR_SCHEDULES = {
    'rampup': 'training.training_loop.linear_rampup_schedule',  # the paper: linear warm-up, then constant
    'isqrt': 'training.training_loop.learning_rate_schedule',   # EDM2: warm-up, then ref_lr / sqrt(t / t_ref)
}

# ----------------------------------------------------------------------------
# Option presets (train.py option values, option name -> value).

# What --arch=edm2 changes in train.py's defaults: EDM2's own defaults (learning_rate_schedule's ref_lr and
# ref_batches, EDM2Loss's P_mean / P_std, the Block's dropout, no augmentation). Values are train.py options.
EDM2_DEFAULTS = dict(lr=0.0100, lr_schedule='isqrt', decay=70000, dropout=0.0, augment=0.0, P_mean=-0.4, P_std=1.0)

# The EMA profiles EDM2 tracks by default (training.phema.PowerFunctionEMA).
EDM2_EMA_STDS = [0.050, 0.100]


def _edm2_preset(duration_nimg: int, batch: int, cbase: int, lr: float, decay: float, dropout: float,
                 P_mean: float, P_std: float, **more) -> dict:
    return dict(arch='edm2', duration=duration_nimg / 1e6, batch=batch, cbase=cbase, lr=lr, decay=decay,
                dropout=dropout, P_mean=P_mean, P_std=P_std, **more)


# --preset: train.py option values (option name -> value). A preset fills in defaults; options given on the
# command line override it.
CONFIG_PRESETS = {
    # EDM2's ImageNet-64 models (pixel space; EDM2's train_edm2.py presets, its Table 3 sizes XS..XL).
    'edm2-img64-xs': _edm2_preset(1024 << 20, 2048, 128, 0.0120, 35000, 0.00, -0.8, 1.6),
    'edm2-img64-s': _edm2_preset(1024 << 20, 2048, 192, 0.0100, 35000, 0.00, -0.8, 1.6),
    'edm2-img64-m': _edm2_preset(2048 << 20, 2048, 256, 0.0090, 35000, 0.10, -0.8, 1.6),
    'edm2-img64-l': _edm2_preset(1024 << 20, 2048, 320, 0.0080, 35000, 0.10, -0.8, 1.6),
    'edm2-img64-xl': _edm2_preset(640 << 20, 2048, 384, 0.0070, 35000, 0.10, -0.8, 1.6),
    # CIFAR-10 32x32 at 39.5M parameters, after the small-scale re-implementation FutureXiang/edm2
    # (config/cifar10/G.yaml: 128 channels x [1,2,2,2], 3 blocks, dropout 0.13, P -1.2/1.2, x-flips, 4 GPUs x 128
    # images, 2000 epochs, lr 5e-3 ramped up over 200 epochs, t_ref = 400 epochs = 400 * 50000 / 512 batches).
    # EDM2's default attention (16x16 and 8x8) where that config has 16x16 only.
    'edm2-cifar10': _edm2_preset(100_000_000, 512, 128, 0.0050, 400 * 50000 / 512, 0.13, -1.2, 1.2,
                                 cres=[1, 2, 2, 2], blocks=3, lr_rampup=10000, xflip=True),
    # The quick-start digits (scripts/quickstart.py: 1,797 16x16 grayscale digits, CPU, minutes): the EDM
    # quick start's size (32 channels x [1,2,2], 1 block, batch 64, 40 kimg), EDM's P_mean / P_std for small
    # pixel-space data, warm-up over 2 kimg and t_ref = 50 batches (of a ~600-step run, the proportion EDM2's
    # img64 runs have: t_ref ~ 1/15 of training).
    'edm2-digits': _edm2_preset(40_000, 64, 32, 0.0100, 50, 0.0, -1.2, 1.2, cres=[1, 2, 2], blocks=1, lr_rampup=2),
}

# Optimizers by name (train.py --optim, compress.py qat --optim): the paper's Adam (betas and eps of its
# training loop), and 8-bit Adam with block-wise quantised moments (Dettmers et al. 2022), from the optional
# bitsandbytes (>= 0.49 runs on the CPU; tensors smaller than its min_8bit_size = 4096 keep float32 moments).
OPTIMIZERS = {
    'adam': dict(class_name='torch.optim.Adam', betas=[0.9, 0.999], eps=1e-8),
    'adam8bit': dict(class_name='bitsandbytes.optim.Adam8bit', betas=[0.9, 0.999], eps=1e-8),
}


def optimizer_kwargs(name: str) -> dict:
    """`class_name` + kwargs of optimizer `name` (without lr)."""
    if name not in OPTIMIZERS:
        raise ValueError(f'unknown optimizer {name!r}; expected one of {", ".join(OPTIMIZERS)}')
    return copy.deepcopy(OPTIMIZERS[name])


def check_optimizer(name: str) -> None:
    """Raise ValueError (one line, with the fix) when optimizer `name` cannot be imported here."""
    import importlib.util
    module = optimizer_kwargs(name)['class_name'].split('.')[0]
    if importlib.util.find_spec(module) is None:
        raise ValueError(f'--optim={name} needs the optional package {module} (pip install "bitsandbytes>=0.49")')


# ----------------------------------------------------------------------------
# The architecture table: one record per --arch choice. train.py applies a record generically (no
# per-architecture code), so a new network family is its module plus one entry here.


class Refusal(NamedTuple):
    """An option value an architecture cannot train with: train.py stops with `message` unless
    opts[option] is one of `allowed`."""
    option: str
    allowed: tuple
    message: str


@dataclass(frozen=True)
class Architecture:
    """One --arch choice.

    backbone      constructor kwargs of the network (--cbase, --cres, --blocks override model_channels,
                  channel_mult, num_blocks; train.py adds dropout, use_fp16, augment_dim, ... as for every net)
    network       the network class; None: the --precond preconditioner (PRECOND_PRESETS) around the backbone
    loss          the default loss class; None: the --precond loss (or --loss / --uncertainty's)
    loss_kwargs   constructor kwargs of that loss fixed by the architecture (e.g. a noise schedule's name)
    loss_options  the train.py options that become loss kwargs when given (or set by `defaults`)
    uncertainty   the network has a learned-uncertainty head built in (its loss must read it)
    defaults      train.py option values it changes: above the CLI's defaults, below --preset and options given
    training      training_loop kwargs it sets (a dict value updates that kwarg's dict, e.g. optimizer betas)
    ema_stds      default power-function EMA profiles (training.phema), unless --ema is given; None: the paper's EMA
    refuses       Refusal records: option values it cannot train with
    """
    backbone: dict
    network: str | None = None
    loss: str | None = None
    loss_kwargs: dict = field(default_factory=dict)
    loss_options: tuple = ('P_mean', 'P_std', 'sigma_data')
    uncertainty: bool = False
    defaults: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    ema_stds: tuple | None = None
    refuses: tuple = ()


ARCHITECTURES = {
    # The paper's three backbones: --precond chooses the preconditioner and loss (Table 1).
    'ddpmpp': Architecture(backbone=ARCH_PRESETS['ddpmpp']),
    'ncsnpp': Architecture(backbone=ARCH_PRESETS['ncsnpp']),
    'adm': Architecture(backbone=ARCH_PRESETS['adm']),
    # EDM2: its own preconditioned network and uncertainty-weighted loss, optimizer betas, gradient handling,
    # lr schedule and power-function EMA.
    'edm2': Architecture(
        backbone=ARCH_PRESETS['edm2'], network=EDM2_NETWORK, loss=EDM2_LOSS, uncertainty=True,
        defaults=EDM2_DEFAULTS,
        training=dict(optimizer_kwargs=dict(betas=[0.9, 0.99]),
                      nonfinite_grads='zero'),  # EDM2 zeroes +-Inf gradients too (the paper clamps them)
        ema_stds=tuple(EDM2_EMA_STDS),
        refuses=(
            Refusal('precond', ('edm',), '--arch=edm2 has its own (EDM) preconditioning; drop --precond'),
            Refusal('loss', (None, 'edm2'), '--arch=edm2 trains its uncertainty head with --loss=edm2; '
                    'drop --loss/--uncertainty'),
            Refusal('uncertainty', (None, True), '--arch=edm2 trains its uncertainty head with --loss=edm2; '
                    'drop --loss/--uncertainty'),
            Refusal('augment', (0,), '--arch=edm2 trains without augmentation (its network takes no augment '
                    'labels); use --augment=0'),
            Refusal('conv_groups', (1,), '--conv-groups: grouped convolutions are an option of the EDM U-Nets '
                    '(ddpmpp, ncsnpp, adm), not of --arch=edm2'),
        )),
}

"""Configurations as data: the architectures train.py's --arch offers and the preconditioners of --precond
(one record each), the constructor presets they are built from, and the option presets of --preset.

Constructor presets are class kwargs: ARCH_PRESETS (backbones), PRECOND_PRESETS (Precond records: Table 1's
preconditioner and loss, and iDDPM's), NETWORKS (complete named networks; benchmarks build them). Option
presets are train.py option values: an Architecture's or Precond's `defaults` (e.g. EDM2_DEFAULTS) and
CONFIG_PRESETS (the families' recipes registered from their modules at the end of this file). ARCHITECTURES
joins them: docs/design.md ("Add a network family", "Add a preconditioner") describes the records and how
train.py applies them.
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

class Precond(NamedTuple):
    """One --precond choice: a preconditioner (network class around the backbone) and its loss (Table 1's
    pairs, and iDDPM's discrete-time model). A tuple, so `PRECOND_PRESETS[name][0]` / `[1]` are the two classes.

    network          the network class; the architecture's backbone kwargs go to it
    loss             the loss class
    network_options  train.py option -> network kwarg: a kwarg name (the option's value passed as is), or a
                     dict {option value: kwargs} (e.g. the loss type decides whether the network learns variances);
                     options that are None are left out
    loss_options     the same for the loss kwargs
    defaults         values of those options when it is chosen (above the architecture's defaults, below --preset
                     and options given)
    The options named here belong to this preconditioner: train.py refuses them with any other --precond.
    """
    network: str
    loss: str
    network_options: dict = {}
    loss_options: dict = {}
    defaults: dict = {}

    @property
    def options(self) -> tuple:
        return tuple(dict.fromkeys([*self.network_options, *self.loss_options]))


# iDDPM's objectives (--iddpm-loss): the loss kwargs, and whether the network has the 2C outputs of learned
# variances (L_simple alone trains none: the network then has C outputs and fixed variances beta_t).
IDDPM_LOSSES = {
    'hybrid': (dict(loss_type='hybrid'), dict(learn_sigma=True)),                            # Eq. 16
    'vlb': (dict(loss_type='vlb'), dict(learn_sigma=True)),                                  # L_vlb, uniform t
    'vlb-is': (dict(loss_type='vlb', importance_sampling=True), dict(learn_sigma=True)),     # Eq. 18
    'simple': (dict(loss_type='simple'), dict(learn_sigma=False)),                           # DDPM's L_simple
}

PRECOND_PRESETS = {
    'vp': Precond('training.networks.VPPrecond', 'training.loss.VPLoss'),
    've': Precond('training.networks.VEPrecond', 'training.loss.VELoss'),
    'edm': Precond('training.networks.EDMPrecond', 'training.loss.EDMLoss'),
    # Improved DDPM (Nichol & Dhariwal 2021): the backbone (--arch=adm: ADM, --arch=ddpmpp: DDPM++) inside
    # iDDPMDiscretePrecond, trained on the discrete process by iDDPMLoss; the two share schedule and T.
    'iddpm': Precond(
        'training.networks_iddpm.iDDPMDiscretePrecond', 'training.iddpm.iDDPMLoss',
        network_options=dict(iddpm_schedule='schedule', iddpm_T='M',
                             iddpm_loss={name: net for name, (_loss, net) in IDDPM_LOSSES.items()}),
        loss_options=dict(iddpm_schedule='schedule', iddpm_T='T',
                          iddpm_loss={name: loss for name, (loss, _net) in IDDPM_LOSSES.items()}),
        defaults=dict(iddpm_schedule='cosine', iddpm_T=4000, iddpm_loss='hybrid')),  # iDDPM's main setting
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

    backbone         constructor kwargs of the network (--cbase, --cres, --blocks, --attn override model_channels,
                     channel_mult, num_blocks, attn_resolutions; train.py adds dropout, use_fp16, augment_dim, ... as
                     for every net); with `network_builder`, the builder's fixed arguments
    network          the network class; None: the --precond preconditioner (PRECOND_PRESETS) around the backbone
    network_builder  for a network whose constructor takes other kwargs than the EDM U-Nets': the dotted name of
                     f(**backbone, **{option: value}) returning the network kwargs (class_name included) from the
                     train.py options named in `network_options` (unset ones as None); refuse the rest
    network_options  the train.py options passed to network_builder
    loss             the default loss class; None: the --precond loss (or --loss / --uncertainty's)
    loss_kwargs      constructor kwargs of that loss fixed by the architecture (e.g. a noise schedule's name)
    loss_options     the train.py options that become loss kwargs when given (or set by `defaults`)
    uncertainty      the network has a learned-uncertainty head built in (its loss must read it)
    defaults         train.py option values it changes: above the CLI's defaults, below --preset and options given
    training         training_loop kwargs it sets (a dict value updates that kwarg's dict, e.g. optimizer betas)
    lr_kwargs        its own learning-rate schedule (training_loop's lr_kwargs: func_name and fixed kwargs), in
                     place of --lr-schedule's (refuse --lr-schedule); None: --lr-schedule's
    lr_options       train.py option -> lr_kwargs name, passed when set (e.g. lr -> ref_lr)
    lr_epoch_kwargs  lr_kwargs that train.py sets from the dataset: one epoch in thousands of images (the
                     dataset's size / 1000, before --xflip doubles it), for a schedule that counts epochs
    ema_kwargs       its own EMA policy (training_loop's ema_kwargs) unless --ema or --ema-stds is given;
                     None: the paper's half-life EMA (or `ema_stds`)
    ema_stds         default power-function EMA profiles (training.phema), unless --ema is given; None: the paper's EMA
    refuses          Refusal records: option values it cannot train with (one-line usage errors)
    """
    backbone: dict
    network: str | None = None
    network_builder: str | None = None
    network_options: tuple = ()
    loss: str | None = None
    loss_kwargs: dict = field(default_factory=dict)
    loss_options: tuple = ('P_mean', 'P_std', 'sigma_data')
    uncertainty: bool = False
    defaults: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    lr_kwargs: dict | None = None
    lr_options: dict = field(default_factory=dict)
    lr_epoch_kwargs: tuple = ()
    ema_kwargs: dict | None = None
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


# ----------------------------------------------------------------------------
# EDM2's Table 1 ladder at small scale (training/networks_edm2small.py, after FutureXiang/edm2): configs C, E, G
# in the seed's EDM wrapper (EDM preconditioning and the learned uncertainty u(sigma) built in), its loss,
# its per-epoch learning rate and its per-step EMA. Defaults: the seed's CIFAR-10 recipe of each config
# (duration aside); --preset=edm2small-{c,e,g}-{cifar10,cifar100,digits} are its recipes.

from training import networks_edm2small as _ladder  # noqa: E402 -- data of the family module, registered here


def _ladder_refusals(arch: str) -> tuple:
    own = f'--arch={arch}'
    return (
        Refusal('cond', (False,), f'{own}: the C/E/G networks are unconditional; use --cond=0'),
        Refusal('precond', ('edm',), f'{own} has its own (EDM) preconditioning; drop --precond'),
        Refusal('loss', (None,), f'{own} trains its uncertainty head u(sigma) with its own loss (EDMSmallLoss); '
                'drop --loss/--uncertainty'),
        Refusal('uncertainty', (None, True), f'{own} trains its uncertainty head u(sigma) with its own loss '
                '(EDMSmallLoss); drop --loss/--uncertainty'),
        Refusal('augment', (0,), f'{own} trains without augmentation (its network takes no augment labels); '
                'use --augment=0 (and --xflip)'),
        Refusal('lr_schedule', (None,), f"{own} has the seed's per-epoch lr schedule (--lr, --lr-rampup, --decay); "
                'drop --lr-schedule'),
        Refusal('fp16', (False,), f'{own} trains in float32 only; drop --fp16'),
        Refusal('bf16', (False,), f'{own} trains in float32 only; drop --bf16'),
        Refusal('fast_dropout', (False,), f'--fast-dropout is an option of the EDM U-Nets, not of {own}'),
        Refusal('conv_groups', (1,), f'--conv-groups: grouped convolutions are an option of the EDM U-Nets '
                f'(ddpmpp, ncsnpp, adm), not of {own}'),
        Refusal('label_dropout', (0,), f'{own}: the C/E/G networks are unconditional; drop --label-dropout'),
        Refusal('attn', (None,), f'{own} has attention at its second level (the seed\'s layout); drop --attn'),
    )


def _ladder_architecture(config: str) -> Architecture:
    arch = f'edm2small-{config.lower()}'
    recipe = _ladder.recipe_options(f'cifar10/{config}')
    defaults = {k: v for k, v in recipe.items() if k not in ('arch', 'duration', 'cbase', 'cres', 'blocks')}
    return Architecture(
        backbone=dict(net_type=f'UNet{config}'),
        network_builder='training.networks_edm2small.ladder_network_kwargs',
        network_options=('cbase', 'cres', 'blocks', 'dropout', 'sigma_data'),
        loss='training.networks_edm2small.EDMSmallLoss', uncertainty=True,
        defaults=defaults,
        lr_kwargs=dict(func_name='training.networks_edm2small.ladder_lr_schedule'),
        lr_options=dict(lr='ref_lr', lr_rampup='rampup_kimg', decay='ref_batches'),
        lr_epoch_kwargs=('epoch_kimg',),
        ema_kwargs=dict(class_name='training.ema.WarmupEMA', beta=0.9993),
        refuses=_ladder_refusals(arch))


for _config in ('C', 'E', 'G'):
    ARCHITECTURES[f'edm2small-{_config.lower()}'] = _ladder_architecture(_config)
CONFIG_PRESETS.update(copy.deepcopy(_ladder.LADDER_PRESETS))

# ----------------------------------------------------------------------------
# Improved DDPM (training/iddpm.py PRESETS): --precond=iddpm on ADM (DhariwalUNet with iDDPM's widths,
# attention at 16x16 and 8x8, 2C outputs for the learned variances), with iDDPM's training values. The EMA
# (0.9999 per step) is the paper's half-life EMA of the same per-step decay at the preset's batch (with EDM's
# ramp-up ratio 0.05 for the first images).

from training import iddpm as _iddpm  # noqa: E402


def _iddpm_options(name: str) -> dict:
    p = _iddpm.PRESETS[name]
    net, loss, train = p['adm_network_kwargs'], p['loss_kwargs'], p['training']
    return dict(arch='adm', precond='iddpm', cbase=net['model_channels'], cres=list(net['channel_mult']),
                blocks=net['num_blocks'], attn=list(net['attn_resolutions']), dropout=net['dropout'],
                iddpm_schedule=loss['schedule'], iddpm_T=loss['T'], iddpm_loss=loss['loss_type'],
                lr=train['lr'], batch=train['batch'], lr_rampup=train['lr_rampup_kimg'],
                ema=train['ema_halflife_kimg'] / 1000, augment=float(train['augment']))


CONFIG_PRESETS.update({name: _iddpm_options(name) for name in _iddpm.PRESETS})

"""Configurations as data, in one place: train.py's architecture and preconditioning presets, and the named
networks that benchmarks (and tests) build.

    ARCH_PRESETS     --arch: the backbones of the paper's Table 7 (channel counts for CIFAR-10 / ImageNet-64)
    PRECOND_PRESETS  --precond: the preconditioning and the loss that trains it (Table 1)
    NETWORKS         complete constructor kwargs (class_name included) of named networks
"""

from __future__ import annotations

import copy

ARCH_PRESETS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                   decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual',
                   decoder_type='standard', channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'adm': dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
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
}


def network_kwargs(name: str, **overrides) -> dict:
    """A copy of NETWORKS[name] with `overrides` applied (safe to modify)."""
    if name not in NETWORKS:
        raise KeyError(f'unknown network preset {name!r}; expected one of {", ".join(NETWORKS)}')
    return dict(copy.deepcopy(NETWORKS[name]), **overrides)

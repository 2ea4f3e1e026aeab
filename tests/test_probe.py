"""The linear probe (training/probe.py): the seed's feature protocol against ../shared/golden/edm2small_probe.pt,
named blocks on every network family, and the classifier on a task with a known answer (fid.py probe, its
command line, is tested in tests/test_fid.py)."""

import pytest
import torch

from helpers import rel_err
from training import networks, networks_edm2, networks_edm2small
from training import probe as P

pytestmark = pytest.mark.usefixtures('one_thread')


def test_probe_sigmas_match_the_seed(golden_dir):
    g = torch.load(golden_dir / 'edm2small_probe.pt', weights_only=False)
    times = P.probe_sigmas(g['steps'])
    assert times.dtype == torch.float64
    assert rel_err(times, g['schedule_times']) <= 1e-12
    assert P.probe_sigma(1) == times[17] and P.probe_sigma(18) == times[0] and times[18] == 0
    for t in g['timesteps']:
        assert P.probe_sigma(t).item() == g['per_timestep'][t]['sigma'].item()
    with pytest.raises(ValueError, match='outside'):
        P.probe_sigma(0)


def test_golden_probe_features(golden_dir):
    g = torch.load(golden_dir / 'edm2small_probe.pt', weights_only=False)
    net_file = torch.load(golden_dir / g['net'], weights_only=False)
    kwargs = dict(net_file['kwargs'])
    channels, res, _ = kwargs.pop('image_shape')
    net = networks_edm2small.EDM(res, channels, net_type=net_file['net_class'], **kwargs, **net_file['edm_kwargs'])
    net.load_state_dict(net_file['state_dict'], strict=True)
    net.eval()
    assert list(P.named_blocks(net)) == g['blocknames']
    draws = iter([g['per_timestep'][t]['noise'] for t in g['timesteps']])  # one randn_like per timestep, in order
    feats = P.extract_features(net, 2 * g['images'] - 1, g['timesteps'], randn_like=lambda x: next(draws))
    for t in g['timesteps']:
        for name, ref in g['per_timestep'][t]['features'].items():
            assert rel_err(feats[t][name], ref) <= 1e-5, (t, name)
    t, name = g['choices'][0]
    assert rel_err(feats[t][name], g['feature']) <= 1e-5


def _family_nets():
    torch.manual_seed(0)
    song = networks.EDMPrecond(img_resolution=8, img_channels=1, label_dim=0, model_type='SongUNet',
                               model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    adm = networks.EDMPrecond(img_resolution=8, img_channels=1, label_dim=3, model_type='DhariwalUNet',
                              model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    edm2 = networks_edm2.Precond(img_resolution=8, img_channels=1, label_dim=0, model_channels=16,
                                 channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    small = networks_edm2small.EDM(img_resolution=8, img_channels=1, net_type='UNetG', n_channels=16,
                                   ch_mults=[1, 2], is_attn=[False, True], attn_channels_per_head=8, n_blocks=2,
                                   dropout=0)
    return {'song': (song, 'model.dec.'), 'adm': (adm, 'model.dec.'), 'edm2': (edm2, 'unet.dec.'),
            'small': (small, 'nn_model.up.')}


@pytest.mark.parametrize('family', ['song', 'adm', 'edm2', 'small'])
def test_named_blocks_on_every_family(family):
    net, prefix = _family_nets()[family]
    blocks = P.named_blocks(net)
    assert list(blocks) == [f'out_{k + 1}' for k in range(len(blocks))]
    assert all(path.startswith(prefix) for path, _ in blocks.values())
    # Decoder blocks only, in forward order: the first works at the lowest resolution, the last at the highest.
    feats = P.extract_features(net.eval(), torch.randn(3, 1, 8, 8), [2, 9])
    assert set(feats) == {2, 9} and list(feats[2]) == list(blocks)
    for f in feats[9].values():
        assert f.shape[0] == 3 and f.ndim == 2 and torch.isfinite(f).all()
    # Different noise levels give different features.
    assert not torch.allclose(feats[2]['out_1'], feats[9]['out_1'])


def test_named_blocks_skip_aux_layers():
    net, _ = _family_nets()['song']
    assert all(type(m).__name__ == 'UNetBlock' for _, m in P.named_blocks(net).values())
    with pytest.raises(ValueError, match='no decoder blocks'):
        P.named_blocks(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match='unknown blocks'):
        P.extract_features(net, torch.zeros(1, 1, 8, 8), [1], blocks=['out_99'])


def test_linear_classifier_learns_a_separable_task():
    torch.manual_seed(0)
    centers = torch.randn(4, 16) * 3
    labels = torch.randint(0, 4, [600])
    feats = centers[labels] + torch.randn(600, 16)
    layer = P.train_linear_classifier([feats[:400]], labels[:400], 4, epochs=5, batch_size=32, lr=1e-2)
    assert P.accuracy(layer, feats[400:], labels[400:]) > 0.95
    # Chance level when the features carry no information.
    layer = P.train_linear_classifier([torch.randn(400, 16)], labels[:400], 4, epochs=5, batch_size=32, lr=1e-2)
    assert P.accuracy(layer, torch.randn(200, 16), labels[400:]) < 0.45


def test_linear_probe_end_to_end_on_a_toy_network():
    """A network whose decoder sees the image mean: the probe separates bright from dark images."""
    torch.manual_seed(0)
    net = networks_edm2small.EDM(img_resolution=8, img_channels=1, net_type='UNetC', n_channels=32, ch_mults=[1],
                                 is_attn=[False], n_blocks=2, dropout=0)
    labels = torch.randint(0, 2, [96])
    images = ((labels[:, None, None, None] * 2 - 1) * 0.6 + 0.1 * torch.randn(96, 1, 8, 8)).clamp(-1, 1)
    images = ((images + 1) * 127.5).round().to(torch.uint8)
    done = []
    results = P.linear_probe(net, images[:64], labels[:64], images[64:], labels[64:], timesteps=[3, 12],
                             blocks=['out_1', 'out_2'], epochs=3, batch_size=16, lr=1e-2, progress=done.append)
    assert [(r.timestep, r.block) for r in results] == [(3, 'out_1'), (3, 'out_2'), (12, 'out_1'), (12, 'out_2')]
    assert sum(done) == 64 + 32
    assert results[0].sigma == P.probe_sigma(3).item() and results[0].module == 'nn_model.up.0'
    assert max(r.accuracy for r in results if r.timestep == 3) >= 0.9


def test_split_indices():
    train, test = P.split_indices(10, 0.3, seed=1)
    assert len(test) == 3 and len(train) == 7 and sorted([*train, *test]) == list(range(10))
    assert (P.split_indices(10, 0.3, seed=1)[1] == test).all()
    with pytest.raises(ValueError):
        P.split_indices(10, 1.5)

"""The gradient the training loop computes, checked against one computed here independently: one batch of
16 in one pass, in 2 accumulation rounds of 8, and on 2 gloo ranks of 8 must all give d/dθ of the
per-image-summed loss divided by the batch size (compared before the optimizer step). Also: training
on real (glyph) images lowers the loss."""

import json

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import torch

import dnnlib
from torch_utils.distributed import free_port
from training import training_loop as tl
from helpers import make_dataset_zip, write_dataset_zip
from train_probes import DeterministicLoss

pytestmark = pytest.mark.usefixtures('one_thread')

NETWORK = dict(class_name='training.networks.EDMPrecond', model_type='SongUNet', model_channels=16,
               channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0)


def loop_kwargs(data, run_dir, record_to, **extra):
    kw = dict(run_dir=str(run_dir),
              dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=True),
              data_loader_kwargs=dict(num_workers=0), network_kwargs=NETWORK,
              loss_kwargs=dict(class_name='train_probes.DeterministicLoss', record_to=str(record_to)),
              optimizer_kwargs=dict(class_name='train_probes.GradientRecorder', record_to=str(record_to), lr=1e-3),
              seed=0, batch_size=16, total_kimg=0.016, kimg_per_tick=1, snapshot_ticks=None,
              state_dump_ticks=None, device=torch.device('cpu'), print_summary=False)
    kw.update(extra)
    return kw


def reference_gradient(record_to, params, ranks=1):
    """d/dθ [Σ_images Σ_pixels loss / 16] over the 16 images the ranks were given, from the recorded weights."""
    seen = [batch for r in range(ranks) for batch in torch.load(f'{record_to}.rank{r}', weights_only=True)]
    images, labels = torch.cat([b[0] for b in seen]), torch.cat([b[1] for b in seen])
    assert images.shape[0] == 16
    net = dnnlib.util.construct_class_by_name(**NETWORK, img_resolution=8, img_channels=3, label_dim=4).train()
    with torch.no_grad():
        for p, value in zip(net.parameters(), params):
            p.copy_(value)
    DeterministicLoss()(net, images, labels).sum().div(images.shape[0]).backward()
    return [p.grad for p in net.parameters()]


def relative_error(grads, ref):
    g, r = torch.cat([x.flatten() for x in grads]), torch.cat([x.flatten() for x in ref])
    return float((g - r).norm() / r.norm())


@pytest.fixture(scope='module')
def data16(tmp_path_factory):
    return make_dataset_zip(tmp_path_factory.mktemp('grads') / 'data16.zip', num_images=16)


@pytest.mark.parametrize('batch_gpu', [None, 8])
def test_one_pass_and_accumulation_give_the_true_gradient(data16, tmp_path, batch_gpu):
    tl.training_loop(**loop_kwargs(data16, tmp_path / 'run', tmp_path / 'rec.pt', batch_gpu=batch_gpu))
    rec = torch.load(tmp_path / 'rec.pt', weights_only=True)
    assert relative_error(rec['grads'], reference_gradient(tmp_path / 'rec.pt', rec['params'])) <= 1e-5


@pytest.mark.slow
def test_two_ranks_give_the_same_gradient_as_one(data16, tmp_path):
    one = tmp_path / 'one.pt'
    tl.training_loop(**loop_kwargs(data16, tmp_path / 'run1', one))
    two = tmp_path / 'two.pt'
    kwargs = loop_kwargs(data16, tmp_path / 'run2', two)
    torch.multiprocessing.spawn(_spawned, args=(2, free_port(), kwargs), nprocs=2, join=True)
    rec1, rec2 = (torch.load(p, weights_only=True) for p in (one, two))
    assert all(torch.equal(a, b) for a, b in zip(rec1['params'], rec2['params']))  # same start (seed 0)
    assert relative_error(rec2['grads'], rec1['grads']) <= 1e-5
    assert relative_error(rec2['grads'], reference_gradient(two, rec2['params'], ranks=2)) <= 1e-5


def _spawned(rank, world, port, kwargs):
    from train_probes import distributed_worker
    distributed_worker(rank, world, port, kwargs)


def glyph_dataset(path, num_images=160, resolution=16):
    """Real images of a kind: the digits 0-9 drawn with PIL's bitmap font at random offsets, labelled."""
    rnd = np.random.RandomState(0)
    images = []
    for i in range(num_images):
        img = PIL.Image.new('L', (resolution, resolution), 0)
        PIL.ImageDraw.Draw(img).text((rnd.randint(2, 8), rnd.randint(0, 4)), str(i % 10), fill=255)
        images.append(img)
    return write_dataset_zip(path, images, [i % 10 for i in range(num_images)])


@pytest.mark.slow  # 100 training steps: 4-5 s
def test_training_lowers_the_loss(tmp_path):
    data = glyph_dataset(tmp_path / 'glyphs.zip')
    run = tmp_path / 'run'
    tl.training_loop(
        run_dir=str(run),
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=True),
        data_loader_kwargs=dict(num_workers=0), network_kwargs=NETWORK,
        loss_kwargs=dict(class_name='training.loss.EDMLoss'),
        optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=2e-3),
        seed=0, batch_size=32, total_kimg=3.2, lr_rampup_kimg=0.3, ema_halflife_kimg=0.2,
        kimg_per_tick=0.96, snapshot_ticks=None, state_dump_ticks=None, device=torch.device('cpu'),
        print_summary=False)
    stats = [json.loads(line) for line in (run / 'stats.jsonl').read_text().splitlines()]
    first, last = stats[0]['Loss/loss']['mean'], stats[-1]['Loss/loss']['mean']
    # Tick 0 is the first step (untrained: the weighted loss is ~1); the last tick averages 30 steps.
    assert np.isfinite(last) and last < 0.6 * first, (first, last)

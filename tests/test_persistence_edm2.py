"""Official EDM2 pickles through torch_utils/persistence.py: the training-snapshot layout golden
(StandardRGBEncoder, EDM2Loss, Precond in fp16, embedded sources replaced by a placeholder) loads through the
safe loader and reproduces its outputs; fp16 weights run in fp32 on the CPU; the loaded network works with the
samplers and generate.py; latent-space models (StabilityVAEEncoder) fail with a one-line error naming the
missing optional package. The encoders' own maps are tested in tests/test_encoders.py."""

import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from helpers import rel_err
from torch_utils import persistence
from training import encoders, loss, networks_edm2
from training.sampling import edm_sampler, generate_images

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def layout(golden_dir):
    path = golden_dir / 'edm2_snapshot_layout.pkl'
    return path, persistence.load_network_pkl(str(path)), torch.load(str(path) + '.expect.pt', weights_only=True)


def test_official_snapshot_layout_loads_into_our_classes(layout):
    _path, data, expect = layout
    assert set(data) == {'encoder', 'dataset_kwargs', 'loss_fn', 'ema'}
    assert isinstance(data['encoder'], encoders.StandardRGBEncoder)
    assert isinstance(data['loss_fn'], loss.EDM2Loss)  # pickled as training.training_loop.EDM2Loss
    assert isinstance(data['ema'], networks_edm2.Precond)
    assert expect['classes'] == {'encoder': 'training.encoders.StandardRGBEncoder',
                                 'loss_fn': 'training.training_loop.EDM2Loss', 'ema': 'training.networks_edm2.Precond'}
    assert {k: getattr(data['loss_fn'], k) for k in expect['loss_kwargs']} == expect['loss_kwargs']
    state = data['ema'].state_dict()
    assert set(state) == set(expect['state_dict_fp16'])
    for name, value in expect['state_dict_fp16'].items():
        assert value.dtype == torch.float16
        assert torch.equal(state[name], value.to(state[name].dtype)), name
    assert data['dataset_kwargs']['resolution'] == data['ema'].img_resolution == 16


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_official_snapshot_reproduces_outputs(layout, dtype):
    """Outputs computed in fp32 from the fp16 weights: as loaded (fp32 copies of the fp16 values) and with the
    weights cast back to fp16 (EDM2's own layout in memory): on the CPU the network still computes in fp32."""
    _path, data, expect = layout
    net = data['ema'].to(dtype).eval()
    assert not net.training and next(net.parameters()).dtype == dtype
    with torch.no_grad():
        out, logvar = net(expect['x'], expect['sigma'], expect['class_labels'], return_logvar=True)
    assert out.dtype == torch.float32 and logvar.dtype == torch.float32
    assert rel_err(out, expect['output_fp32_of_fp16_weights']) <= 1e-5
    assert rel_err(logvar, expect['logvar']) <= 1e-5


@pytest.mark.slow  # runs generate.py in a process of its own: 2-8 s
def test_loaded_edm2_network_drives_the_samplers_and_generate_py(layout, tmp_path, subprocess_env, repo_root):
    path, data, expect = layout
    net = data['ema'].eval()
    latents = torch.randn([2, 3, 16, 16], generator=torch.Generator().manual_seed(0))
    labels = expect['class_labels']
    with torch.no_grad():
        out32 = edm_sampler(net, latents, labels, num_steps=4)
        out16 = edm_sampler(net.to(torch.float16), latents, labels, num_steps=4)
    assert out32.dtype == torch.float64 and torch.isfinite(out32).all()
    assert torch.equal(out32, out16)  # fp16 storage, fp32 compute: the same numbers
    batch_seeds, images = next(generate_images(net, [3, 4], num_steps=4))
    assert batch_seeds == [3, 4] and images.shape == (2, 16, 16, 3) and images.dtype == torch.uint8

    result = subprocess.run([sys.executable, 'generate.py', f'--network={path}', f'--outdir={tmp_path}',
                             '--seeds=0-1', '--steps=3', '--class=7'], cwd=repo_root, env=subprocess_env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert np.array(PIL.Image.open(tmp_path / '000001.png')).shape == (16, 16, 3)


def _snapshot_with_encoder(path, encoder_kwargs: dict, class_name='StabilityVAEEncoder'):
    """A pickle in EDM2's layout whose encoder record names `class_name` (no code, like the golden)."""
    record = dict(type='class', version=6, module_src='# placeholder\n', class_name=class_name,
                  state=dict(_init_args=(), _init_kwargs=encoder_kwargs))

    class Record:
        def __reduce__(self):
            return persistence._reconstruct_persistent_obj, (record,)

    with open(path, 'wb') as f:
        pickle.dump(dict(encoder=Record(), dataset_kwargs=dict(resolution=64)), f)


def test_latent_model_without_diffusers_is_a_one_line_error(tmp_path, monkeypatch, subprocess_env, repo_root):
    if encoders.importlib.util.find_spec('diffusers') is not None:
        pytest.skip('diffusers is installed here; the error only appears without it')
    path = tmp_path / 'edm2-img512-xs-0000000-0.100.pkl'
    _snapshot_with_encoder(path, dict(vae_name='stabilityai/sd-vae-ft-mse'))
    with pytest.raises(persistence.CheckpointError) as info:
        persistence.load_network_pkl(str(path))
    message = str(info.value)
    assert '\n' not in message and str(path) in message
    assert 'StabilityVAEEncoder' in message and 'pip install diffusers' in message

    result = subprocess.run([sys.executable, 'generate.py', f'--network={path}', f'--outdir={tmp_path / "out"}'],
                            cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert 'pip install diffusers' in result.stderr and 'Traceback' not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_unknown_encoder_class_is_still_refused(tmp_path):
    path = tmp_path / 'x.pkl'
    _snapshot_with_encoder(path, {}, class_name='SomeOtherEncoder')
    with pytest.raises(persistence.CheckpointError, match='SomeOtherEncoder.*not a persistent class of this library'):
        persistence.load_network_pkl(str(path))



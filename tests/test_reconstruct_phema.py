"""Post-hoc EMA end to end: a tiny EDM2 run tracks three power-function EMA profiles (0.050, 0.070, 0.100);
reconstruct_phema.py rebuilds 0.070 from the 0.050 / 0.100 snapshots alone and lands on the EMA that was
tracked directly; the CLI's file layout, options and errors; --sweep scores each reconstruction exactly as
`fid.py net` does (stand-in TorchScript detector, never the real one)."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import fid
import reconstruct_phema as R
from helpers import edm2_loop_kwargs, make_dataset_zip
from torch_utils import persistence
from training import phema
from training import training_loop as tl

pytestmark = pytest.mark.usefixtures('one_thread')

BATCH = 64
STEPS = 125  # 8 kimg; ticks (and snapshots) at 64, 1088, 2112, ..., 7232, 8000 images


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp('phema')
    data = make_dataset_zip(root / 'tiny.zip', num_images=64)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tl.training_loop(**edm2_loop_kwargs(
            data, root / 'run',
            ema_kwargs=dict(class_name='training.phema.PowerFunctionEMA', stds=[0.05, 0.07, 0.10]),
            lr_kwargs=dict(func_name='training.training_loop.learning_rate_schedule', ref_lr=1e-2, ref_batches=16,
                           rampup_Mimg=0.001),
            nonfinite_grads='zero', seed=1, batch_size=BATCH, total_kimg=STEPS * BATCH / 1000, kimg_per_tick=1,
            snapshot_ticks=1, state_dump_ticks=None))
    finally:
        torch.set_num_threads(prev)
    return dnnlib.EasyDict(root=root, dir=root / 'run', data=data)


def flat(net) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in net.parameters()])


def ema_weights(std: float, steps: int) -> np.ndarray:
    """Exact weight a power-function EMA, updated after each of `steps` steps of BATCH images, gives the raw
    weights after step k = 0..STEPS (k = 0: the initial weights): (1 - beta_k) prod_{j > k} beta_j."""
    beta = phema.power_function_beta(std, BATCH * np.arange(1, steps + 1), BATCH)
    w = np.zeros(STEPS + 1)
    tail = 1.0
    for k in range(steps, 0, -1):
        w[k] = (1 - beta[k - 1]) * tail
        tail *= beta[k - 1]
    w[0] = tail
    return w


def test_snapshots_record_the_exact_images_seen(run):
    pkls = R.list_input_pickles(str(run.dir))
    assert sorted({p.std for p in pkls}) == [0.05, 0.07, 0.1]
    assert sorted({p.nimg for p in pkls}) == [64, 1088, 2112, 3136, 4160, 5184, 6208, 7232, 8000]
    assert R.kimg_to_nimg(1) == 1024  # what the file name alone would have said (EDM2's batches of 1024k)


def test_reconstruction_matches_the_directly_tracked_ema(run, tmp_path):
    result = CliRunner().invoke(R.main, [f'--indir={run.dir}', '--instd=0.05,0.1', f'--outdir={tmp_path}',
                                         '--outstd=0.07'])
    assert result.exit_code == 0, result.output
    recon = persistence.load_network_pkl(str(tmp_path / 'phema-0000008-0.070.pkl'))
    truth = persistence.load_network_pkl(str(run.dir / 'network-snapshot-0000008-0.070.pkl'))
    inputs = [persistence.load_network_pkl(str(run.dir / f'network-snapshot-0000008-{s}.pkl'))['ema']
              for s in ('0.050', '0.100')]
    err = (flat(recon['ema']) - flat(truth['ema'])).norm().item()
    gap = min((flat(net) - flat(truth['ema'])).norm().item() for net in inputs)

    # Tolerance. Both networks are sums over the same raw trajectory theta_k with per-step weights that follow
    # exactly from the schedule: the tracked EMA's w_0.07, and the reconstruction's sum_i x_i w_{s_i}(t_i).
    # Their difference is the least-squares misfit of the wanted profile by the stored ones; relative to the
    # nearest input's misfit it is r (computed below, L1 over steps: 0.036 here). The parameter error is the
    # same linear map of the trajectory, so err / gap is of the order of r (measured 0.009); we allow 2 r. A
    # wrong time axis or coefficient layout gives err ~ gap.
    used, out_nimg = R.reconstruction_plan(R.list_input_pickles(str(run.dir), in_std=[0.05, 0.1]))
    coefs = phema.solve_posthoc_coefficients([p.nimg for p in used], [p.std for p in used], out_nimg, 0.07)[:, 0]
    w_recon = sum(c * ema_weights(p.std, p.nimg // BATCH) for c, p in zip(coefs, used))
    w_truth = ema_weights(0.07, STEPS)
    misfit = np.abs(w_recon - w_truth).sum()
    r = misfit / min(np.abs(ema_weights(s, STEPS) - w_truth).sum() for s in (0.05, 0.10))
    assert r < 0.1, r  # the stored profiles span the wanted one well
    assert err <= 2 * r * gap, (err, gap, r)

    # The same inputs placed on EDM2's time axis (kimg from the file name, rounded to 1024 images) miss it by far.
    shifted = [dnnlib.EasyDict(p, nimg=R.kimg_to_nimg(p.nimg // 1000)) for p in used if p.nimg >= 1000]
    wrong = next(R.reconstruct(shifted, [0.07], max(p.nimg for p in shifted)))
    assert (flat(wrong.data['ema']) - flat(truth['ema'])).norm().item() > 3 * err

    # The output keeps the snapshot layout: same keys, the loss and data settings of the run, the time.
    assert set(recon) == set(truth) and recon['cur_nimg'] == truth['cur_nimg'] == 8000
    assert recon['dataset_kwargs'] == truth['dataset_kwargs'] and type(recon['loss_fn']) is type(truth['loss_fn'])
    for (name, a), b in zip(recon['ema'].named_buffers(), truth['ema'].buffers()):
        assert torch.equal(a, b), name  # buffers: the last input's (fixed Fourier features)


def test_coefficients_are_applied_as_solved(run):
    """One output of two inputs, computed by hand from the snapshots."""
    pkls = [p for p in R.list_input_pickles(str(run.dir), in_std=[0.05, 0.1]) if p.nimg == 8000]
    out = next(R.reconstruct(pkls, [0.08], 8000))
    x = phema.solve_posthoc_coefficients([p.nimg for p in pkls], [p.std for p in pkls], 8000, 0.08)[:, 0]
    nets = [persistence.load_network_pkl(p.path)['ema'] for p in pkls]
    expected = sum(float(c) * flat(n) for c, n in zip(x, nets))
    assert torch.allclose(flat(out.data['ema']), expected, rtol=0, atol=1e-6)
    assert abs(x.sum() - 1) < 1e-12


def test_cli_batches_outkimg_skip_and_names(run, tmp_path):
    out = tmp_path / 'out'
    args = [f'--indir={run.dir}', f'--outdir={out}', '--outstd=0.06,0.08,...,0.12', '--batch=2', '--outkimg=4',
            '--outprefix=my']
    result = CliRunner().invoke(R.main, args)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ['my-0000004-0.060.pkl', 'my-0000004-0.080.pkl', 'my-0000004-0.100.pkl', 'my-0000004-0.120.pkl']
    data = persistence.load_network_pkl(str(out / 'my-0000004-0.100.pkl'))
    assert data['cur_nimg'] == 4160  # the input snapshot at kimg 4; later inputs are not used
    assert 'from 15 snapshots' in result.output  # 5 times (64 .. 4160) x 3 profiles
    # --skip leaves existing outputs alone and makes only the missing ones.
    (out / 'my-0000004-0.060.pkl').write_bytes(b'keep')
    (out / 'my-0000004-0.080.pkl').unlink()
    result = CliRunner().invoke(R.main, args + ['--skip'])
    assert result.exit_code == 0 and (out / 'my-0000004-0.060.pkl').read_bytes() == b'keep'
    assert 'Reconstructing 1 EMA length(s)' in result.output and (out / 'my-0000004-0.080.pkl').is_file()


@pytest.mark.parametrize('args,message', [
    (['--outstd=0.3'], 'must lie in (0, 0.2887)'),
    (['--outstd=0.1,...'], "needs two numbers before it"),
    (['--outstd=0.1', '--outkimg=99'], '--outkimg=99: no input snapshot at that kimg'),
    (['--outstd=0.1', '--inprefix=nothing'], 'no input snapshots to reconstruct from'),
    (['--outstd=0.1', '--sweep'], '--sweep needs --ref'),
])
def test_cli_errors_are_one_line(run, tmp_path, args, message):
    result = CliRunner().invoke(R.main, [f'--indir={run.dir}', f'--outdir={tmp_path / "o"}'] + args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert 'Traceback' not in result.output


def test_sweep_scores_each_length_like_fid_net(run, tmp_path, detector_file):
    detector = detector_file
    ref = tmp_path / 'ref.npz'
    assert CliRunner().invoke(fid.main, ['ref', f'--data={run.data}', f'--dest={ref}', '--workers=0',
                                         f'--detector={detector}']).exit_code == 0
    out = tmp_path / 'sweep'
    result = CliRunner().invoke(R.main, [f'--indir={run.dir}', f'--outdir={out}', '--outstd=0.04,0.09', '--sweep',
                                         f'--ref={ref}', '--seeds=0-15', '--steps=3', '--gen-batch=8',
                                         f'--detector={detector}'])
    assert result.exit_code == 0, result.output
    stem = out / 'phema-0000008-fid-sweep'
    table = json.loads(stem.with_suffix('.json').read_text())
    assert [row['std'] for row in table['rows']] == [0.04, 0.09]
    assert table['sampler']['sampler'] == 'edm' and table['sampler']['num_steps'] == 3 and table['sampler']['S_max'] == 'inf'
    assert table['seeds'] == '0-15' and table['in_std'] == [0.05, 0.07, 0.1]
    assert stem.with_suffix('.csv').read_text().splitlines()[0] == 'std,fid,fid_lo,fid_hi,num_images,kimg,network'
    # Each point with its interval (bias-corrected: at n = 16 it may lie below the biased point estimate).
    assert all(row['fid_lo'] < row['fid_hi'] and row['fid_lo'] < row['fid'] + (row['fid_hi'] - row['fid_lo']) for row in table['rows'])
    assert '(best)' in stem.with_suffix('.md').read_text()
    assert PIL.Image.open(stem.with_suffix('.png')).size == (900, 600)
    for row in table['rows']:  # the same number fid.py net computes for the written snapshot
        net = CliRunner().invoke(fid.main, ['net', f'--network={row["network"]}', f'--ref={ref}', '--seeds=0-15',
                                            '--repeats=1', '--steps=3', '--batch=8', f'--detector={detector}'])
        assert net.exit_code == 0, net.output
        assert row['num_images'] == 16
        assert row['fid'] == pytest.approx(float(net.stdout.strip().splitlines()[-1]), rel=1e-5)
    assert table['rows'][0]['fid'] != table['rows'][1]['fid']


def test_outputs_written_next_to_the_inputs_need_inprefix(run, tmp_path):
    import shutil
    indir = tmp_path / 'in'
    shutil.copytree(run.dir, indir)
    shutil.copy(indir / 'network-snapshot-0000008-0.070.pkl', indir / 'phema-0000008-0.070.pkl')
    result = CliRunner().invoke(R.main, [f'--indir={indir}', f'--outdir={tmp_path / "o"}', '--outstd=0.08'])
    assert result.exit_code != 0 and 'choose one set with --inprefix' in result.output
    result = CliRunner().invoke(R.main, [f'--indir={indir}', '--inprefix=network-snapshot', f'--outdir={tmp_path / "o"}',
                                         '--outstd=0.08'])
    assert result.exit_code == 0, result.output


def test_one_input_profile_reconstructs_only_itself(run, tmp_path):
    """From one profile only that profile can be reconstructed; it wrote the 0.050 weights under 0.100."""
    args = [f'--indir={run.dir}', f'--outdir={tmp_path / "o"}', '--instd=0.05']
    result = CliRunner().invoke(R.main, args + ['--outstd=0.1'])
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert 'one EMA profile (sigma_rel 0.050)' in errors[0] and '--outstd=0.050' in errors[0]
    assert not (tmp_path / 'o').exists()

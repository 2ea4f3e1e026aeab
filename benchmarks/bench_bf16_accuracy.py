"""How far bf16 (train.py --bf16=1 / generate.py --bf16) lands from fp32: one training step and one sampled batch.

From the same weights and the same random draws, the network is trained for one step (EDMLoss, Adam) in fp32
and in bf16 (the backbone in bfloat16; master weights, optimizer and loss in float32), and a batch is sampled
with Heun (18 steps) in fp32 and in bf16. Printed: relative differences ||bf16 - fp32|| / ||fp32|| of the
loss, the gradient, the weight update and the weights after it, and of the sampled images (plus their largest
difference in 8-bit pixel levels).

    python benchmarks/bench_bf16_accuracy.py                                     # quick-start net, random init
    python benchmarks/bench_bf16_accuracy.py --network=run/network-snapshot-000040.pkl --data=digits-16x16.zip
    python benchmarks/bench_bf16_accuracy.py --warm-steps=10 --samples=0    # mid-training Adam, no sampling

Without --network the quick-start architecture is built with its random init and every weight perturbed by
N(0, 0.02^2) (the init's zero-gain output layers would otherwise hide the network behind the skip path).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dnnlib  # noqa: E402
from torch_utils import persistence  # noqa: E402
from training import presets, sampling  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in tensors])


def _step(model, optimizer, images, labels, seed):
    from training.loss import EDMLoss
    optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = EDMLoss()(net=model, images=images, labels=labels)
    loss.sum().mul(1 / images.shape[0]).backward()
    optimizer.step()
    return loss.detach()


def train_step_difference(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, lr: float,
                          warm_steps: int = 0, seed: int = 0) -> dict:
    """One EDMLoss + Adam step of `net` in fp32 and in bf16 from identical weights, optimizer state and draws
    (after `warm_steps` shared fp32 steps that give Adam a history); relative differences."""
    base = copy.deepcopy(net).train().requires_grad_(True)
    base_opt = torch.optim.Adam(base.parameters(), lr=lr, betas=[0.9, 0.999], eps=1e-8)
    for i in range(warm_steps):
        _step(base, base_opt, images, labels, seed=1000 + i)
    results = {}
    for name, bf16 in (('fp32', False), ('bf16', True)):
        model = copy.deepcopy(base)
        model.use_bf16 = bf16
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=[0.9, 0.999], eps=1e-8)
        optimizer.load_state_dict(copy.deepcopy(base_opt.state_dict()))
        before = flat(model.parameters()).clone()
        loss = _step(model, optimizer, images, labels, seed)
        grad = flat(p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters())
        after = flat(model.parameters())
        results[name] = dict(loss=loss, grad=grad, update=after - before, weights=after)
    return {key: rel(results['bf16'][key], results['fp32'][key]) for key in ('loss', 'grad', 'update', 'weights')}


def sample_difference(net: torch.nn.Module, num: int, num_steps: int = 18, variant: str = 'bf16') -> dict:
    """Heun samples of seeds 0..num-1 in fp32 and in `variant` ('bf16', or 'compiled': the fp32 network through
    torch.compile); relative difference and the largest 8-bit pixel gap."""
    out = {}
    for name, bf16 in (('fp32', False), (variant, variant == 'bf16')):
        model = copy.deepcopy(net).eval().requires_grad_(False)
        model.use_bf16 = bf16
        if name == 'compiled':
            model = sampling.compile_network(model)
        rnd = sampling.StackedRandomGenerator('cpu', list(range(num)))
        latents = rnd.randn([num, model.img_channels, model.img_resolution, model.img_resolution])
        labels = torch.eye(model.label_dim)[rnd.randint(model.label_dim, size=[num])] if model.label_dim else None
        with torch.no_grad():
            out[name] = sampling.edm_sampler(model, latents, labels, num_steps=num_steps)
    pixels = {k: sampling.images_to_uint8(v).to(torch.int32) for k, v in out.items()}
    return dict(images=rel(out[variant], out['fp32']),
                max_pixel_levels=int((pixels[variant] - pixels['fp32']).abs().max()))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--network', help='network pickle (its EMA weights); default: the quick-start preset, random')
    p.add_argument('--preset', default='quickstart', help='named network of training/presets.py when no '
                   '--network is given  [default: %(default)s]')
    p.add_argument('--data', help='dataset zip/folder for the training batch; default: random pixels')
    p.add_argument('--batch', type=int, default=64, help='training batch')
    p.add_argument('--lr', type=float, default=2e-3, help='Adam learning rate of the step (quick start: 2e-3)')
    p.add_argument('--warm-steps', type=int, default=0, help='shared fp32 steps first, so Adam has a history '
                   '(0: the very first step, where Adam moves every weight by +-lr)')
    p.add_argument('--samples', type=int, default=16, help='images sampled')
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--compile', action='store_true', help='also compiled (torch.compile) against eager fp32 sampling')
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    if args.network:
        net = persistence.load_network(args.network)
    else:
        net = dnnlib.util.construct_class_by_name(**presets.network_kwargs(args.preset))
        with torch.no_grad():
            for t in net.parameters():
                t.add_(torch.randn_like(t) * 0.02)
    if args.data:
        dataset = dnnlib.util.construct_class_by_name(class_name='training.dataset.ImageFolderDataset',
                                                      path=args.data, use_labels=net.label_dim > 0)
        items = [dataset[i] for i in range(args.batch)]
        images = torch.stack([torch.as_tensor(x) for x, _ in items]).to(torch.float32) / 127.5 - 1
        labels = torch.stack([torch.as_tensor(y) for _, y in items]).to(torch.float32) if net.label_dim else None
    else:
        images = torch.randint(0, 256, [args.batch, net.img_channels, net.img_resolution, net.img_resolution]) / 127.5 - 1
        labels = torch.eye(net.label_dim)[torch.randint(net.label_dim, [args.batch])] if net.label_dim else None

    step = train_step_difference(net, images, labels, args.lr, warm_steps=args.warm_steps)
    print(f'one training step (batch {args.batch}, Adam lr {args.lr:g}, after {args.warm_steps} fp32 steps), '
          f'bf16 vs fp32, ||bf16 - fp32|| / ||fp32||: '
          f'loss {step["loss"]:.2e}, gradient {step["grad"]:.2e}, weight update {step["update"]:.2e}, '
          f'weights after the update {step["weights"]:.2e}')
    if args.samples < 1:
        return
    samples = sample_difference(net, args.samples)
    print(f'sampled batch (Heun, 18 steps, seeds 0-{args.samples - 1}): ||bf16 - fp32|| / ||fp32|| = '
          f'{samples["images"]:.2e}, largest difference {samples["max_pixel_levels"]} of 255 pixel levels')
    if args.compile:
        samples = sample_difference(net, args.samples, variant='compiled')
        print(f'sampled batch, compiled vs eager fp32: ||compiled - eager|| / ||eager|| = {samples["images"]:.2e}, '
              f'largest difference {samples["max_pixel_levels"]} of 255 pixel levels')


if __name__ == '__main__':
    main()

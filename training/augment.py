"""Non-leaking augmentation pipeline (Karras et al. 2020, "Training Generative Adversarial Networks
with Limited Data", appendix), in the form EDM (Karras et al. 2022) uses to regularise training on small datasets.

Every transform is applied with probability `p * <per-transform multiplier>` and the parameters
it drew are returned as a conditioning vector (`augment_labels`), so the denoiser learns to tell
augmented images apart and sampling with zero labels produces un-augmented images.

Label layout (one column group per enabled transform, in this order):
    xflip 1, yflip 1, rotate_int 2, translate_int 2, scale 1, rotate_frac 2, aniso 2,
    translate_frac 2, brightness 1, contrast 1, lumaflip 1, hue 2, saturation 1.
EDM's geometric set (xflip, yflip, scale, rotate_frac, aniso, translate_frac) gives 9 values.

The random draws (order, shapes, kinds) are part of the interface: checkpoints trained with the
paper's code and the golden vectors both depend on them.
"""

import numpy as np
import torch

from torch_utils import persistence

# Low-pass decomposition filter of the Symlet-6 wavelet (PyWavelets `pywt.Wavelet('sym6').dec_lo`).
# Orthonormal with sum sqrt(2), so 2x upsampling followed by 2x downsampling is the identity.
SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)

#----------------------------------------------------------------------------
# Batched homogeneous matrices. Each entry may be a Python number or a tensor of shape [N];
# the result is [N, rows, cols] (or [rows, cols] when every entry is a number).

def _matrix(*rows, device=None) -> torch.Tensor:
    entries = [x for row in rows for x in row]
    tensors = [x for x in entries if isinstance(x, torch.Tensor)]
    if not tensors:
        return torch.tensor(np.asarray(rows, dtype=np.float32), device=device)
    ref = tensors[0]
    entries = [x if isinstance(x, torch.Tensor) else torch.full_like(ref, float(x)) for x in entries]
    return torch.stack(entries, dim=-1).reshape(ref.shape + (len(rows), -1))

def translate2d(tx, ty, **kwargs):
    return _matrix([1, 0, tx], [0, 1, ty], [0, 0, 1], **kwargs)

def translate3d(tx, ty, tz, **kwargs):
    return _matrix([1, 0, 0, tx], [0, 1, 0, ty], [0, 0, 1, tz], [0, 0, 0, 1], **kwargs)

def scale2d(sx, sy, **kwargs):
    return _matrix([sx, 0, 0], [0, sy, 0], [0, 0, 1], **kwargs)

def scale3d(sx, sy, sz, **kwargs):
    return _matrix([sx, 0, 0, 0], [0, sy, 0, 0], [0, 0, sz, 0], [0, 0, 0, 1], **kwargs)

def rotate2d(theta, **kwargs):
    c, s = torch.cos(theta), torch.sin(theta)
    return _matrix([c, -s, 0], [s, c, 0], [0, 0, 1], **kwargs)

def rotate3d(v, theta, **kwargs):
    """Rotation by `theta` about the unit axis `v` (Rodrigues' formula)."""
    vx, vy, vz = v[..., 0], v[..., 1], v[..., 2]
    s, c = torch.sin(theta), torch.cos(theta)
    cc = 1 - c
    return _matrix(
        [vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
        [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
        [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
        [0, 0, 0, 1], **kwargs)

# Inverses: the pipeline composes the inverse map G^-1 (output pixel -> input pixel) for grid_sample.
def translate2d_inv(tx, ty, **kwargs):
    return translate2d(-tx, -ty, **kwargs)

def scale2d_inv(sx, sy, **kwargs):
    return scale2d(1 / sx, 1 / sy, **kwargs)

def rotate2d_inv(theta, **kwargs):
    return rotate2d(-theta, **kwargs)

#----------------------------------------------------------------------------

def _gate(w: torch.Tensor, prob: float, shape) -> torch.Tensor:
    """Keep each sample's parameter `w` with probability `prob`, else zero it (one uniform draw)."""
    keep = torch.rand(shape, device=w.device) < prob
    return torch.where(keep, w, torch.zeros_like(w))

@persistence.persistent_class
class AugmentPipe:
    def __init__(self, p=1,
        xflip=0, yflip=0, rotate_int=0, translate_int=0, translate_int_max=0.125,
        scale=0, rotate_frac=0, aniso=0, translate_frac=0, scale_std=0.2, rotate_frac_max=1, aniso_std=0.2,
        aniso_rotate_prob=0.5, translate_frac_std=0.125,
        brightness=0, contrast=0, lumaflip=0, hue=0, saturation=0, brightness_std=0.2, contrast_std=0.5,
        hue_max=1, saturation_std=1,
    ):
        """Probabilities: each transform fires per image with probability `p * <its multiplier>`
        (multipliers >= 1/p make it always fire; the label then records the coin flip / draw itself).

        Blitting:  xflip, yflip, rotate_int (quarter turns), translate_int (whole pixels, at most
                   translate_int_max * size).
        Geometric: scale (isotropic, log2 std scale_std), rotate_frac (uniform angle up to
                   rotate_frac_max * pi), aniso (log2 std aniso_std, in a frame rotated by a uniform
                   angle with probability aniso_rotate_prob), translate_frac (std translate_frac_std * size).
        Color:     brightness (additive, std brightness_std), contrast (log2 std contrast_std),
                   lumaflip, hue (rotation about the gray axis up to hue_max * pi),
                   saturation (log2 std saturation_std).
        """
        names = ('p xflip yflip rotate_int translate_int translate_int_max scale rotate_frac aniso translate_frac '
                 'scale_std rotate_frac_max aniso_std aniso_rotate_prob translate_frac_std brightness contrast '
                 'lumaflip hue saturation brightness_std contrast_std hue_max saturation_std').split()
        values = locals()
        for name in names:
            value = float(values[name])
            if not (value >= 0 and np.isfinite(value)):
                raise ValueError(f'AugmentPipe: {name} must be a finite number >= 0, got {values[name]!r}')
            setattr(self, name, value)

    def __call__(self, images: torch.Tensor):
        N, C, H, W = images.shape
        device = images.device
        labels = [torch.zeros([N, 0], device=device)]

        # ---- Pixel blitting: exact integer transforms, no resampling. -------------------------
        if self.xflip > 0:
            w = torch.randint(2, [N, 1, 1, 1], device=device)
            w = _gate(w, self.xflip * self.p, [N, 1, 1, 1])
            images = torch.where(w == 1, images.flip(3), images)
            labels += [w]

        if self.yflip > 0:
            w = torch.randint(2, [N, 1, 1, 1], device=device)
            w = _gate(w, self.yflip * self.p, [N, 1, 1, 1])
            images = torch.where(w == 1, images.flip(2), images)
            labels += [w]

        if self.rotate_int > 0:
            # w quarter turns, built from an x-flip, a y-flip and a transpose (square images).
            if H != W:
                raise ValueError(f'AugmentPipe: rotate_int needs square images, got {H}x{W}; set rotate_int=0')
            w = torch.randint(4, [N, 1, 1, 1], device=device)
            w = _gate(w, self.rotate_int * self.p, [N, 1, 1, 1])
            images = torch.where((w == 1) | (w == 2), images.flip(3), images)
            images = torch.where((w == 2) | (w == 3), images.flip(2), images)
            images = torch.where((w == 1) | (w == 3), images.transpose(2, 3), images)
            labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]

        if self.translate_int > 0:
            w = torch.rand([2, N, 1, 1, 1], device=device) * 2 - 1
            w = _gate(w, self.translate_int * self.p, [1, N, 1, 1, 1])
            tx = w[0].mul(W * self.translate_int_max).round().to(torch.int64)
            ty = w[1].mul(H * self.translate_int_max).round().to(torch.int64)
            # Gather with reflection at the borders (period 2*(size-1), edge pixels not repeated).
            b, c, y, x = torch.meshgrid(*(torch.arange(s, device=device) for s in images.shape), indexing='ij')
            x = W - 1 - (W - 1 - (x - tx) % (W * 2 - 2)).abs()
            y = H - 1 - (H - 1 - (y + ty) % (H * 2 - 2)).abs()
            images = images.flatten()[(((b * C) + c) * H + y) * W + x]
            labels += [tx.div(W * self.translate_int_max), ty.div(H * self.translate_int_max)]

        # ---- General geometric transforms, composed into one inverse affine map G_inv. --------
        I_3 = torch.eye(3, device=device)
        G_inv = I_3

        if self.scale > 0:
            w = torch.randn([N], device=device)
            w = _gate(w, self.scale * self.p, [N])
            s = w.mul(self.scale_std).exp2()
            G_inv = G_inv @ scale2d_inv(s, s)
            labels += [w]

        if self.rotate_frac > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.rotate_frac_max)
            w = _gate(w, self.rotate_frac * self.p, [N])
            G_inv = G_inv @ rotate2d_inv(-w)
            labels += [w.cos() - 1, w.sin()]

        if self.aniso > 0:
            w = torch.randn([N], device=device)
            r = (torch.rand([N], device=device) * 2 - 1) * np.pi
            w = _gate(w, self.aniso * self.p, [N])
            r = _gate(r, self.aniso_rotate_prob, [N])
            s = w.mul(self.aniso_std).exp2()
            G_inv = G_inv @ rotate2d_inv(r) @ scale2d_inv(s, 1 / s) @ rotate2d_inv(-r)
            labels += [w * r.cos(), w * r.sin()]

        if self.translate_frac > 0:
            w = torch.randn([2, N], device=device)
            w = _gate(w, self.translate_frac * self.p, [1, N])
            G_inv = G_inv @ translate2d_inv(w[0].mul(W * self.translate_frac_std), w[1].mul(H * self.translate_frac_std))
            labels += [w[0], w[1]]

        if G_inv is not I_3:
            images = self._apply_affine(images, G_inv)

        # ---- Color transforms, composed into one 4x4 matrix M acting on (r, g, b, 1). -----------
        I_4 = torch.eye(4, device=device)
        M = I_4
        luma_axis = torch.tensor(np.asarray([1, 1, 1, 0]) / np.sqrt(3), dtype=torch.float32, device=device)
        luma_proj = torch.outer(luma_axis, luma_axis)

        if self.brightness > 0:
            w = torch.randn([N], device=device)
            w = _gate(w, self.brightness * self.p, [N])
            b = w * self.brightness_std
            M = translate3d(b, b, b) @ M
            labels += [w]

        if self.contrast > 0:
            w = torch.randn([N], device=device)
            w = _gate(w, self.contrast * self.p, [N])
            c = w.mul(self.contrast_std).exp2()
            M = scale3d(c, c, c) @ M
            labels += [w]

        if self.lumaflip > 0:
            w = torch.randint(2, [N, 1, 1], device=device)
            w = _gate(w, self.lumaflip * self.p, [N, 1, 1])
            M = (I_4 - 2 * luma_proj * w) @ M  # Householder reflection of the luma component.
            labels += [w]

        if self.hue > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.hue_max)
            w = _gate(w, self.hue * self.p, [N])
            M = rotate3d(luma_axis, w) @ M  # Rotation about the luma (gray) axis.
            labels += [w.cos() - 1, w.sin()]

        if self.saturation > 0:
            w = torch.randn([N, 1, 1], device=device)
            w = _gate(w, self.saturation * self.p, [N, 1, 1])
            M = (luma_proj + (I_4 - luma_proj) * w.mul(self.saturation_std).exp2()) @ M
            labels += [w]

        if M is not I_4:
            images = images.reshape([N, C, H * W])
            if C == 3:
                images = M[:, :3, :3] @ images + M[:, :3, 3:]
            elif C == 1:
                M = M[:, :3, :].mean(dim=1, keepdim=True)
                images = images * M[:, :, :3].sum(dim=2, keepdim=True) + M[:, :, 3:]
            else:
                raise ValueError(f'AugmentPipe: color transforms need 1 or 3 channels, got {C}; disable brightness/contrast/lumaflip/hue/saturation')
            images = images.reshape([N, C, H, W])

        labels = torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)
        return images, labels

    @staticmethod
    def _apply_affine(images: torch.Tensor, G_inv: torch.Tensor) -> torch.Tensor:
        """Resample `images` through the inverse map G_inv ([N,3,3], pixel coordinates centred on
        the image): reflect-pad just enough to cover the source region, 2x upsample with sym6,
        bilinear grid_sample at 2x, 2x downsample with sym6, crop."""
        N, C, H, W = images.shape
        device = images.device
        Hz = np.asarray(SYM6, dtype=np.float32)
        Hz_pad = len(Hz) // 4

        # Padding: the bounding box of the transformed output corners plus the filter support.
        cx = (W - 1) / 2
        cy = (H - 1) / 2
        cp = _matrix([-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1], device=device)  # [corner, xyz]
        cp = G_inv @ cp.t()                                                                   # [N, xyz, corner]
        margin = cp[:, :2, :].permute(1, 0, 2).flatten(1)                                     # [xy, N*corner]
        margin = torch.cat([-margin, margin]).max(dim=1).values                               # [x0, y0, x1, y1]
        margin = margin + torch.tensor([Hz_pad * 2 - cx, Hz_pad * 2 - cy] * 2, dtype=torch.float32, device=device)
        margin = margin.max(torch.tensor([0, 0] * 2, dtype=torch.float32, device=device))
        margin = margin.min(torch.tensor([W - 1, H - 1] * 2, dtype=torch.float32, device=device))
        mx0, my0, mx1, my1 = margin.ceil().to(torch.int32).tolist()

        images = torch.nn.functional.pad(input=images, pad=[mx0, mx1, my0, my1], mode='reflect')
        G_inv = translate2d((mx0 - mx1) / 2, (my0 - my1) / 2, device=device) @ G_inv

        # 2x upsample: zero-stuff, then convolve with the (flipped, i.e. true-convolution) filter.
        weight = torch.tensor(Hz[None, None, ::-1].copy(), dtype=images.dtype, device=device).tile([C, 1, 1])
        pad = (len(Hz) + 1) // 2
        images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(N, C, images.shape[2], -1)[:, :, :, :-1]
        images = torch.nn.functional.conv2d(images, weight.unsqueeze(2), groups=C, padding=[0, pad])
        images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(N, C, -1, images.shape[3])[:, :, :-1, :]
        images = torch.nn.functional.conv2d(images, weight.unsqueeze(3), groups=C, padding=[pad, 0])
        G_inv = scale2d(2, 2, device=device) @ G_inv @ scale2d_inv(2, 2, device=device)
        G_inv = translate2d(-0.5, -0.5, device=device) @ G_inv @ translate2d_inv(-0.5, -0.5, device=device)

        # Resample at 2x; G_inv converted to grid_sample's normalised [-1, 1] coordinates.
        shape = [N, C, (H + Hz_pad * 2) * 2, (W + Hz_pad * 2) * 2]
        G_inv = (scale2d(2 / images.shape[3], 2 / images.shape[2], device=device) @ G_inv
                 @ scale2d_inv(2 / shape[3], 2 / shape[2], device=device))
        grid = torch.nn.functional.affine_grid(theta=G_inv[:, :2, :], size=shape, align_corners=False)
        images = torch.nn.functional.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)

        # 2x downsample and crop the filter margin.
        weight = torch.tensor(Hz[None, None, :], dtype=images.dtype, device=device).tile([C, 1, 1])
        pad = (len(Hz) - 1) // 2
        images = torch.nn.functional.conv2d(images, weight.unsqueeze(2), groups=C, stride=[1, 2], padding=[0, pad])[:, :, :, Hz_pad : -Hz_pad]
        images = torch.nn.functional.conv2d(images, weight.unsqueeze(3), groups=C, stride=[2, 1], padding=[pad, 0])[:, :, Hz_pad : -Hz_pad, :]
        return images

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
paper's code and the golden vectors both depend on them. Each transform draws its parameter(s)
first and then one uniform "does it fire?" number per image (see `_maybe`).
"""

import numpy as np
import torch
import torch.nn.functional as F

from torch_utils import persistence

# Low-pass decomposition filter of the Symlet-6 wavelet (PyWavelets `pywt.Wavelet('sym6').dec_lo`).
# Orthonormal with sum sqrt(2), so 2x upsampling followed by 2x downsampling is the identity.
SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)

#----------------------------------------------------------------------------
# Homogeneous-coordinate matrices: 3x3 for pixel positions (x, y, 1), 4x4 for colours (r, g, b, 1).
# An entry is either a Python number or a per-image tensor of shape [N]; with any tensor entry the
# result is a batch [N, rows, cols], otherwise a single [rows, cols] matrix.

def _homogeneous(rows, device=None) -> torch.Tensor:
    flat = [entry for row in rows for entry in row]
    batched = next((entry for entry in flat if isinstance(entry, torch.Tensor)), None)
    if batched is None:
        return torch.tensor(np.asarray(rows, dtype=np.float32), device=device)
    flat = [e if isinstance(e, torch.Tensor) else torch.full_like(batched, float(e)) for e in flat]
    return torch.stack(flat, dim=-1).reshape(batched.shape + (len(rows), -1))

def _translation(tx, ty, device=None):
    return _homogeneous([[1, 0, tx], [0, 1, ty], [0, 0, 1]], device)

def _scaling(sx, sy, device=None):
    return _homogeneous([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], device)

def _rotation(theta):
    """Counter-clockwise rotation by `theta` radians (in x-right, y-down pixel coordinates: clockwise)."""
    cos, sin = torch.cos(theta), torch.sin(theta)
    return _homogeneous([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])

def _color_offset(delta):
    """Add `delta` to all three colour channels."""
    return _homogeneous([[1, 0, 0, delta], [0, 1, 0, delta], [0, 0, 1, delta], [0, 0, 0, 1]])

def _color_gain(gain):
    """Multiply all three colour channels by `gain`."""
    return _homogeneous([[gain, 0, 0, 0], [0, gain, 0, 0], [0, 0, gain, 0], [0, 0, 0, 1]])

def _rotation_about(axis, theta):
    """Rotation of colour space by `theta` about the unit vector `axis`
    (Rodrigues' formula: cos I + sin [a]x + (1 - cos) a a^T)."""
    ax, ay, az = axis[..., 0], axis[..., 1], axis[..., 2]
    sin, cos = torch.sin(theta), torch.cos(theta)
    one_minus_cos = 1 - cos
    return _homogeneous([
        [ax * ax * one_minus_cos + cos, ax * ay * one_minus_cos - az * sin, ax * az * one_minus_cos + ay * sin, 0],
        [ay * ax * one_minus_cos + az * sin, ay * ay * one_minus_cos + cos, ay * az * one_minus_cos - ax * sin, 0],
        [az * ax * one_minus_cos - ay * sin, az * ay * one_minus_cos + ax * sin, az * az * one_minus_cos + cos, 0],
        [0, 0, 0, 1]])

# Note: the geometric stage builds the map from OUTPUT pixels back to INPUT pixels (what grid_sample
# needs), so each transform enters it through its inverse: translation by -t, scaling by 1/s,
# rotation by -theta.

#----------------------------------------------------------------------------
# Random draws.

def _maybe(values: torch.Tensor, prob: float, mask_shape) -> torch.Tensor:
    """Per image, keep the drawn `values` with probability `prob` and replace them by zero (= identity
    transform) otherwise. Consumes exactly one torch.rand(mask_shape)."""
    fires = torch.rand(mask_shape, device=values.device) < prob
    return torch.where(fires, values, torch.zeros_like(values))

def _signed_uniform(shape, device) -> torch.Tensor:
    """U(-1, 1)."""
    return torch.rand(shape, device=device) * 2 - 1

def _chain(total, step, *, left=False):
    """Compose a batch of matrices; `total` None stands for the identity (nothing applied yet)."""
    if total is None:
        return step
    return step @ total if left else total @ step

#----------------------------------------------------------------------------

def _reflect_index(pos: torch.Tensor, size: int) -> torch.Tensor:
    """Fold an arbitrary integer coordinate into [0, size) by mirror reflection about the edge pixels
    (period 2*(size-1): the border pixel itself is not repeated)."""
    period = size * 2 - 2
    return size - 1 - (size - 1 - pos % period).abs()

def _shift_with_reflection(images: torch.Tensor, shift_x: torch.Tensor, shift_y: torch.Tensor) -> torch.Tensor:
    """Integer translation of each image by (shift_x, shift_y) pixels ([N,1,1,1] int64 each), filling the
    uncovered border by reflection. Pure indexing, so pixel values are copied exactly."""
    N, C, H, W = images.shape
    cols = torch.arange(W, device=images.device).reshape(1, 1, 1, W)
    rows = torch.arange(H, device=images.device).reshape(1, 1, H, 1)
    src_cols = _reflect_index(cols - shift_x, W).expand(N, C, H, W)
    src_rows = _reflect_index(rows + shift_y, H).expand(N, C, H, W)
    return images.gather(3, src_cols).gather(2, src_rows)

#----------------------------------------------------------------------------
# Resampling through a general affine map (StyleGAN2-ADA paper, appendix B): work at 2x resolution with a
# wavelet low-pass filter so that bilinear sampling introduces little aliasing.

def _sym6_taps(dtype, device, flipped: bool) -> torch.Tensor:
    taps = np.asarray(SYM6, dtype=np.float32)
    if flipped:
        taps = taps[::-1].copy()  # conv2d correlates; flipping makes it a true convolution.
    return torch.tensor(taps, dtype=dtype, device=device)

def _filter_along(images: torch.Tensor, taps: torch.Tensor, dim: int, padding: int, stride: int = 1) -> torch.Tensor:
    """Depthwise 1-D filter along the height (dim=2) or width (dim=3) axis."""
    channels = images.shape[1]
    if dim == 3:
        weight = taps.reshape(1, 1, 1, -1).tile([channels, 1, 1, 1])
        return F.conv2d(images, weight, groups=channels, stride=[1, stride], padding=[0, padding])
    weight = taps.reshape(1, 1, -1, 1).tile([channels, 1, 1, 1])
    return F.conv2d(images, weight, groups=channels, stride=[stride, 1], padding=[padding, 0])

def _interleave_zeros(images: torch.Tensor, dim: int) -> torch.Tensor:
    """[a, b, c] -> [a, 0, b, 0, c] along `dim` (length n -> 2n - 1)."""
    shape = list(images.shape)
    shape[dim] = shape[dim] * 2 - 1
    out = images.new_zeros(shape)
    index = [slice(None)] * images.ndim
    index[dim] = slice(None, None, 2)
    out[tuple(index)] = images
    return out

def _upsample2x(images: torch.Tensor) -> torch.Tensor:
    taps = _sym6_taps(images.dtype, images.device, flipped=True)
    padding = (len(SYM6) + 1) // 2
    images = _filter_along(_interleave_zeros(images, 3), taps, dim=3, padding=padding)
    return _filter_along(_interleave_zeros(images, 2), taps, dim=2, padding=padding)

def _downsample2x(images: torch.Tensor, crop: int) -> torch.Tensor:
    """Filter and decimate, then drop `crop` samples of filter margin on each side."""
    taps = _sym6_taps(images.dtype, images.device, flipped=False)
    padding = (len(SYM6) - 1) // 2
    images = _filter_along(images, taps, dim=3, padding=padding, stride=2)[:, :, :, crop:-crop]
    return _filter_along(images, taps, dim=2, padding=padding, stride=2)[:, :, crop:-crop, :]

def _reflect_padding(inv_map: torch.Tensor, width: int, height: int, margin: int) -> list:
    """How many pixels [left, top, right, bottom] of reflection padding are needed so that every output
    pixel (plus `margin` pixels of filter support) samples inside the padded image. Computed from where
    the four output corners land in the input, over the whole batch, and capped at what a single
    reflection can provide (size - 1)."""
    device = inv_map.device
    half_w, half_h = (width - 1) / 2, (height - 1) / 2
    corners = _homogeneous([[-half_w, -half_h, 1], [half_w, -half_h, 1], [half_w, half_h, 1], [-half_w, half_h, 1]],
                           device)
    landed = (inv_map @ corners.t())[:, :2, :]            # [N, xy, corner]
    landed = landed.permute(1, 0, 2).flatten(1)           # [xy, N * corner]
    reach = torch.cat([-landed, landed]).max(dim=1).values  # furthest excursion: [-x, -y, +x, +y]
    # Beyond the image edge (half size), plus room for the filter taps.
    beyond_edge = torch.tensor([margin * 2 - half_w, margin * 2 - half_h] * 2, dtype=torch.float32, device=device)
    most = torch.tensor([width - 1, height - 1] * 2, dtype=torch.float32, device=device)
    needed = torch.minimum((reach + beyond_edge).clamp(min=0), most)
    return needed.ceil().to(torch.int32).tolist()

def _resample_affine(images: torch.Tensor, inv_map: torch.Tensor) -> torch.Tensor:
    """Warp `images` by the output->input map `inv_map` ([N,3,3], pixel units, origin at the image
    centre): reflect-pad, upsample 2x, bilinear grid_sample at 2x, downsample 2x, crop back."""
    N, C, H, W = images.shape
    device = images.device
    margin = len(SYM6) // 4  # filter support, in output pixels

    left, top, right, bottom = _reflect_padding(inv_map, W, H, margin)
    images = F.pad(input=images, pad=[left, right, top, bottom], mode='reflect')
    # Padding moved the image centre; shift the sampling positions accordingly.
    inv_map = _translation((left - right) / 2, (top - bottom) / 2, device) @ inv_map

    images = _upsample2x(images)
    # Express the map in the upsampled pixel grid (coordinates doubled, pixel centres at half-offsets).
    inv_map = _scaling(2, 2, device) @ inv_map @ _scaling(1 / 2, 1 / 2, device)
    inv_map = _translation(-0.5, -0.5, device) @ inv_map @ _translation(0.5, 0.5, device)

    # Sample a 2x output that keeps `margin` extra pixels per side for the decimation filter;
    # affine_grid takes the map in normalised [-1, 1] coordinates of output and input.
    out_shape = [N, C, (H + margin * 2) * 2, (W + margin * 2) * 2]
    in_to_unit = _scaling(2 / images.shape[3], 2 / images.shape[2], device)
    unit_to_out = _scaling(1 / (2 / out_shape[3]), 1 / (2 / out_shape[2]), device)
    inv_map = in_to_unit @ inv_map @ unit_to_out
    grid = F.affine_grid(theta=inv_map[:, :2, :], size=out_shape, align_corners=False)
    images = F.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)

    return _downsample2x(images, crop=margin)

#----------------------------------------------------------------------------

def _apply_color_matrix(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Apply per-image 4x4 affine colour matrices to (r, g, b). A grayscale image is treated as
    r = g = b and the three output channels are averaged back into one."""
    N, C, H, W = images.shape
    pixels = images.reshape([N, C, H * W])
    if C == 3:
        pixels = matrix[:, :3, :3] @ pixels + matrix[:, :3, 3:]
    elif C == 1:
        mean_rows = matrix[:, :3, :].mean(dim=1, keepdim=True)  # [N, 1, 4]
        pixels = pixels * mean_rows[:, :, :3].sum(dim=2, keepdim=True) + mean_rows[:, :, 3:]
    else:
        raise ValueError(f'AugmentPipe: color transforms need 1 or 3 channels, got {C}; disable brightness/contrast/lumaflip/hue/saturation')
    return pixels.reshape([N, C, H, W])

#----------------------------------------------------------------------------

_OPTION_NAMES = (
    'p xflip yflip rotate_int translate_int translate_int_max scale rotate_frac aniso translate_frac '
    'scale_std rotate_frac_max aniso_std aniso_rotate_prob translate_frac_std brightness contrast '
    'lumaflip hue saturation brightness_std contrast_std hue_max saturation_std').split()

@persistence.persistent_class
class AugmentPipe:
    """Callable `pipe(images) -> (augmented images, augment_labels)` for float NCHW batches.

    `p` is the overall augmentation probability; every other non-`*_std`/`*_max`/`*_prob` option is
    a multiplier on it for one transform (0 disables the transform and its label columns; values
    >= 1/p make it fire for every image). The transforms, in the order they are applied:

    - integer "blits", exact and lossless: `xflip`, `yflip`, `rotate_int` (multiples of 90 degrees),
      `translate_int` (whole pixels, up to `translate_int_max` of the image size, reflected border);
    - general geometry, resampled once: `scale` (log2-normal, std `scale_std`), `rotate_frac`
      (uniform angle within +-`rotate_frac_max`*pi), `aniso` (log2-normal squeeze, std `aniso_std`,
      along an axis that is randomised with probability `aniso_rotate_prob`), `translate_frac`
      (normal, std `translate_frac_std` of the image size);
    - colour, one 4x4 matrix: `brightness` (additive, std `brightness_std`), `contrast` (log2-normal,
      std `contrast_std`), `lumaflip` (mirror the luma component), `hue` (rotation about the gray
      axis within +-`hue_max`*pi), `saturation` (log2-normal, std `saturation_std`).
    """

    def __init__(self, p=1,
        xflip=0, yflip=0, rotate_int=0, translate_int=0, translate_int_max=0.125,
        scale=0, rotate_frac=0, aniso=0, translate_frac=0, scale_std=0.2, rotate_frac_max=1, aniso_std=0.2,
        aniso_rotate_prob=0.5, translate_frac_std=0.125,
        brightness=0, contrast=0, lumaflip=0, hue=0, saturation=0, brightness_std=0.2, contrast_std=0.5,
        hue_max=1, saturation_std=1,
    ):
        # Stored as plain float attributes under the option names: snapshots pickle this __dict__.
        given = locals()
        for name in _OPTION_NAMES:
            value = float(given[name])
            if not (value >= 0 and np.isfinite(value)):
                raise ValueError(f'AugmentPipe: {name} must be a finite number >= 0, got {given[name]!r}')
            setattr(self, name, value)

    def __call__(self, images: torch.Tensor):
        N = images.shape[0]
        labels = [torch.zeros([N, 0], device=images.device)]  # so that torch.cat works with nothing enabled
        images = self._blit(images, labels)
        images = self._geometric(images, labels)
        images = self._color(images, labels)
        return images, torch.cat([part.to(torch.float32).reshape(N, -1) for part in labels], dim=1)

    # -- Stage 1: integer transforms (no resampling). --------------------------------------------

    def _blit(self, images: torch.Tensor, labels: list) -> torch.Tensor:
        N, _C, H, W = images.shape
        device = images.device
        per_image = [N, 1, 1, 1]

        for strength, axis in ((self.xflip, 3), (self.yflip, 2)):
            if strength > 0:
                flip = _maybe(torch.randint(2, per_image, device=device), strength * self.p, per_image)
                images = torch.where(flip == 1, images.flip(axis), images)
                labels.append(flip)

        if self.rotate_int > 0:
            if H != W:
                raise ValueError(f'AugmentPipe: rotate_int needs square images, got {H}x{W}; set rotate_int=0')
            quarter_turns = _maybe(torch.randint(4, per_image, device=device), self.rotate_int * self.p, per_image)
            # A rotation by k quarter turns = optional x-flip, optional y-flip, optional transpose.
            flip_x = (quarter_turns == 1) | (quarter_turns == 2)
            flip_y = (quarter_turns == 2) | (quarter_turns == 3)
            swap_axes = (quarter_turns == 1) | (quarter_turns == 3)
            images = torch.where(flip_x, images.flip(3), images)
            images = torch.where(flip_y, images.flip(2), images)
            images = torch.where(swap_axes, images.transpose(2, 3), images)
            labels += [flip_x, flip_y]

        if self.translate_int > 0:
            offset = _maybe(_signed_uniform([2, *per_image], device), self.translate_int * self.p, [1, *per_image])
            max_x, max_y = W * self.translate_int_max, H * self.translate_int_max
            shift_x = offset[0].mul(max_x).round().to(torch.int64)
            shift_y = offset[1].mul(max_y).round().to(torch.int64)
            images = _shift_with_reflection(images, shift_x, shift_y)
            labels += [shift_x.div(max_x), shift_y.div(max_y)]

        return images

    # -- Stage 2: geometric transforms, composed into one output->input map. ---------------------

    def _geometric(self, images: torch.Tensor, labels: list) -> torch.Tensor:
        N, _C, H, W = images.shape
        device = images.device
        inv_map = None

        if self.scale > 0:
            log2_scale = _maybe(torch.randn([N], device=device), self.scale * self.p, [N])
            factor = log2_scale.mul(self.scale_std).exp2()
            inv_map = _chain(inv_map, _scaling(1 / factor, 1 / factor))
            labels.append(log2_scale)

        if self.rotate_frac > 0:
            angle = _signed_uniform([N], device) * (np.pi * self.rotate_frac_max)
            angle = _maybe(angle, self.rotate_frac * self.p, [N])
            inv_map = _chain(inv_map, _rotation(angle))
            labels += [angle.cos() - 1, angle.sin()]

        if self.aniso > 0:
            log2_squeeze = torch.randn([N], device=device)
            axis_angle = _signed_uniform([N], device) * np.pi
            log2_squeeze = _maybe(log2_squeeze, self.aniso * self.p, [N])
            axis_angle = _maybe(axis_angle, self.aniso_rotate_prob, [N])
            factor = log2_squeeze.mul(self.aniso_std).exp2()
            # Stretch by f along an axis at `axis_angle` and by 1/f across it: inverse = rotate into the
            # axis frame, scale by (1/f, f), rotate back.
            inv_x = 1 / factor
            for step in (_rotation(-axis_angle), _scaling(inv_x, 1 / inv_x), _rotation(axis_angle)):
                inv_map = _chain(inv_map, step)  # one factor at a time: keeps the float rounding order
            labels += [log2_squeeze * axis_angle.cos(), log2_squeeze * axis_angle.sin()]

        if self.translate_frac > 0:
            offset = _maybe(torch.randn([2, N], device=device), self.translate_frac * self.p, [1, N])
            shift_x = offset[0].mul(W * self.translate_frac_std)
            shift_y = offset[1].mul(H * self.translate_frac_std)
            inv_map = _chain(inv_map, _translation(-shift_x, -shift_y))
            labels += [offset[0], offset[1]]

        return images if inv_map is None else _resample_affine(images, inv_map)

    # -- Stage 3: colour transforms, composed into one 4x4 matrix on (r, g, b, 1). ---------------

    def _color(self, images: torch.Tensor, labels: list) -> torch.Tensor:
        N = images.shape[0]
        device = images.device
        matrix = None
        identity = torch.eye(4, device=device)
        gray_axis = torch.tensor(np.asarray([1, 1, 1, 0]) / np.sqrt(3), dtype=torch.float32, device=device)
        onto_gray = torch.outer(gray_axis, gray_axis)  # projector onto the luma direction

        if self.brightness > 0:
            level = _maybe(torch.randn([N], device=device), self.brightness * self.p, [N])
            offset = level * self.brightness_std
            matrix = _chain(matrix, _color_offset(offset), left=True)
            labels.append(level)

        if self.contrast > 0:
            log2_gain = _maybe(torch.randn([N], device=device), self.contrast * self.p, [N])
            gain = log2_gain.mul(self.contrast_std).exp2()
            matrix = _chain(matrix, _color_gain(gain), left=True)
            labels.append(log2_gain)

        if self.lumaflip > 0:
            flip = _maybe(torch.randint(2, [N, 1, 1], device=device), self.lumaflip * self.p, [N, 1, 1])
            matrix = _chain(matrix, identity - 2 * onto_gray * flip, left=True)  # Householder reflection
            labels.append(flip)

        if self.hue > 0:
            angle = _signed_uniform([N], device) * (np.pi * self.hue_max)
            angle = _maybe(angle, self.hue * self.p, [N])
            matrix = _chain(matrix, _rotation_about(gray_axis, angle), left=True)
            labels += [angle.cos() - 1, angle.sin()]

        if self.saturation > 0:
            log2_sat = _maybe(torch.randn([N, 1, 1], device=device), self.saturation * self.p, [N, 1, 1])
            # Keep the gray component, scale the chroma (orthogonal complement) by 2^(std * z).
            matrix = _chain(matrix, onto_gray + (identity - onto_gray) * log2_sat.mul(self.saturation_std).exp2(), left=True)
            labels.append(log2_sat)

        return images if matrix is None else _apply_color_matrix(images, matrix)

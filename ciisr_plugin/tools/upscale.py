"""``basicsr upscale``: super-resolve image files or folders with any checkpoint.

    basicsr upscale INPUT... -o OUT --model CKPT (--scale S | --scale SHxSW | --size WxH)
                    [--device cpu|cuda] [--tile N] [--halo N] [--precision fp32|bf16]
                    [--compare] [--from-hr] [--allow-pickle] [--force]

INPUT is image files and/or folders (their images, not recursive), or ``skimage://NAME`` for a
photo bundled with scikit-image (e.g. ``skimage://chelsea``). With one input file, OUT
may be a file name whose extension picks the format (PNG, JPEG, WebP, TIFF, BMP); otherwise
OUT is a folder and each output keeps its input's name. The RGB channels go through the
model; an alpha channel is upscaled bicubically and re-attached; grayscale stays grayscale
(the luma of the model's output); 16-bit PNG/TIFF stay 16-bit. Outputs are written to a
temporary name in the same folder and renamed, so a file is never left half-written.

Everything is checked before any work: missing or unreadable files, folders without images,
scales that are not positive finite numbers, and outputs larger than
:data:`MAX_OUTPUT_PIXELS` (pass ``--force`` to go beyond) end in one error line and exit
status 2.
"""
import io
import math
import os
import re
import sys

import numpy as np

from ..data.image_io import Picture, from_unit, image_size, output_dtype, read_picture, to_unit, write_encoded

MAX_OUTPUT_PIXELS = 16384 * 16384  # 268 megapixels; --force lifts it
WRITABLE = ('.png', '.jpg', '.jpeg', '.webp', '.tif', '.tiff', '.bmp')
_MAX_SIDE = {'.webp': 16383, '.jpg': 65535, '.jpeg': 65535}  # what the encoders can store
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as cv2's RGB2GRAY
PROG = 'basicsr upscale'


class UpscaleError(ValueError):
    """Bad input to ``basicsr upscale``: reported as one line, exit status 2."""


def add_arguments(parser):
    parser.add_argument('inputs', nargs='+', metavar='INPUT', help='image files and/or folders of images')
    parser.add_argument('-o', '--output', required=True, metavar='OUT',
                        help='output folder, or an output file name (one input file; extension picks the format)')
    parser.add_argument('--model', required=True, metavar='CKPT',
                        help="checkpoint: this plugin's or the LIIF / A-LIIF authors'")
    parser.add_argument('--scale', metavar='S|SHxSW', help='scale factor, or height x width factors (e.g. 3.7, 2x3)')
    parser.add_argument('--size', metavar='WxH', help='output size in pixels, width x height (e.g. 1920x1080)')
    parser.add_argument('--device', default=None, help='cpu or cuda[:N] (default: cuda when available)')
    parser.add_argument('--tile', type=int, default=None, metavar='N',
                        help='LR tile side in pixels (default: chosen from free memory; the result is the same)')
    parser.add_argument('--halo', type=int, default=None, metavar='N',
                        help='LR pixels of context around tiles (default: exact, from the encoder)')
    parser.add_argument('--chunk-size', type=int, default=None, metavar='N',
                        help='queries decoded at once (default: sized to stay in cache on CPU, 4096 on GPUs; '
                        'the result is the same)')
    parser.add_argument('--precision', choices=['fp32', 'bf16'], default='fp32',
                        help='bf16 runs the networks in bfloat16 (faster on CPUs with bf16 / AMX and on GPUs)')
    parser.add_argument('--allow-pickle', action='store_true',
                        help='allow unpickling arbitrary objects in the checkpoint (only for files you trust)')
    parser.add_argument('--compare', action='store_true',
                        help='also write OUT_compare.png: a detailed crop, bicubic | model (| original with --from-hr)')
    parser.add_argument('--from-hr', action='store_true',
                        help='the inputs are originals: shrink each by the scale (bicubic) first and upscale back '
                        'to its size, so the result (and --compare, with PSNRs) can be judged against it')
    parser.add_argument('--cell-clip', type=str, default=None, metavar='SCALE_MAX',
                        help='the LTE authors\' cell clipping: queries carry the cell of at most SCALE_MAX (the '
                        'largest training scale, e.g. 4) per axis, i.e. cell * max(scale / SCALE_MAX, 1)')
    parser.add_argument('--force', action='store_true',
                        help=f'allow outputs over {MAX_OUTPUT_PIXELS / 1e6:.0f} megapixels (16384 x 16384)')


# ----------------------------------------------------------------------------------------------
# arguments
_NUMBER = r'\s*([^x\s]+)\s*'


def _positive_float(text, what):
    try:
        value = float(text)
    except ValueError:
        raise UpscaleError(f"{what} '{text}' is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise UpscaleError(f'{what} must be a positive finite number, got {text}')
    return value


def parse_scale(text):
    """'3.7' -> (3.7, 3.7); '2x3' -> (2.0, 3.0) as (height, width) factors."""
    parts = re.fullmatch(_NUMBER + r'(?:[x*]' + _NUMBER + ')?', text.lower())
    if parts is None:
        raise UpscaleError(f"--scale '{text}' is not S or SHxSW (e.g. 4, 3.7, 2x3)")
    sh = _positive_float(parts.group(1), '--scale')
    sw = _positive_float(parts.group(2), '--scale') if parts.group(2) else sh
    return sh, sw


def parse_size(text):
    """'WxH' -> (H, W) in pixels."""
    parts = re.fullmatch(r'\s*(\d+)\s*[x*]\s*(\d+)\s*', text.lower())
    if parts is None:
        raise UpscaleError(f"--size '{text}' is not WxH in whole pixels (e.g. 1920x1080)")
    width, height = int(parts.group(1)), int(parts.group(2))
    if width <= 0 or height <= 0:
        raise UpscaleError(f'--size must be positive, got {text}')
    return height, width


def output_size(in_hw, scale=None, size=None):
    if size is not None:
        return size
    return max(1, round(in_hw[0] * scale[0])), max(1, round(in_hw[1] * scale[1]))


# ----------------------------------------------------------------------------------------------
# planning: every check before any work
def _collect_inputs(inputs):
    from ..data.demo_data import skimage_photo_file
    from ..data.image_io import is_image_file
    files = []
    for item in inputs:
        photo = skimage_photo_file(item)
        if photo is not None:  # skimage://NAME: a photo bundled with scikit-image
            files.append(photo)
        elif os.path.isdir(item):
            found = sorted(os.path.join(item, n) for n in os.listdir(item)
                           if is_image_file(n) and os.path.isfile(os.path.join(item, n)))
            if not found:
                raise UpscaleError(f'{item}: folder has no images (.png, .jpg, .webp, .tif, ...)')
            files += found
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise UpscaleError(f'{item}: no such file or folder')
    return files


def plan(inputs, output):
    """[(source, destination)] for ``inputs`` and ``-o output``."""
    files = _collect_inputs(inputs)
    ext = os.path.splitext(output)[1].lower()
    single_file = len(inputs) == 1 and not os.path.isdir(inputs[0])
    if not os.path.isdir(output) and ext:
        if ext not in WRITABLE and (ext in _image_extensions() or single_file):
            raise UpscaleError(f"-o {output}: cannot write '{ext}' images; use one of {', '.join(WRITABLE)}")
        if ext in WRITABLE:
            if not single_file:
                raise UpscaleError(f'-o {output} is a file name but {len(files)} images are given; give a folder')
            jobs = [(files[0], output)]
            _check_not_inputs(jobs)
            return jobs
    jobs, seen = [], {}
    for src in files:
        name = os.path.basename(src)
        if os.path.splitext(name)[1].lower() not in WRITABLE:
            name = os.path.splitext(name)[0] + '.png'
        dst = os.path.join(output, name)
        if dst in seen:
            raise UpscaleError(f'{src} and {seen[dst]} would both be written to {dst}')
        seen[dst] = src
        jobs.append((src, dst))
    _check_not_inputs(jobs)
    return jobs


def _image_extensions():
    from ..data.image_io import IMAGE_EXTENSIONS
    return IMAGE_EXTENSIONS


def _check_not_inputs(jobs):
    sources = {os.path.realpath(src) for src, _ in jobs}
    for src, dst in jobs:
        if os.path.realpath(dst) in sources:
            raise UpscaleError(f'{dst}: output would overwrite an input image; choose another -o')


def _check_size(dst, size, force):
    out_h, out_w = size
    ext = os.path.splitext(dst)[1].lower()
    if max(out_h, out_w) > _MAX_SIDE.get(ext, 1 << 31):
        raise UpscaleError(f'{dst}: {out_w}x{out_h} exceeds what {ext} can store '
                           f'({_MAX_SIDE[ext]} pixels a side); use .png or .tif')
    if out_h * out_w > MAX_OUTPUT_PIXELS and not force:
        raise UpscaleError(f'{dst}: output {out_w}x{out_h} is {out_h * out_w / 1e6:.0f} megapixels, over the '
                           f'{MAX_OUTPUT_PIXELS / 1e6:.0f} MP limit; pass --force to render it anyway')


def _device(name):
    import torch
    if name is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UpscaleError(f"--device '{name}' is not a device (cpu, cuda, cuda:N)") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UpscaleError(f'--device {name}: CUDA is not available on this machine')
    if device.type not in ('cpu', 'cuda'):
        raise UpscaleError(f"--device '{name}': only cpu and cuda are supported")
    return device


# ----------------------------------------------------------------------------------------------
def upscale_picture(net, picture, size, device, dst_ext, tile=None, halo=None, precision='fp32', progress=None,
                    cell_scale=None, chunk_size=None):
    """Model output of ``picture`` at ``size`` (H, W) as the array to encode (BGR[A] / gray);
    ``cell_scale``: per-axis factors on the query cell, ``chunk_size``: queries per decode
    (see ``upscale_tiled``)."""
    import cv2
    import torch

    from ..data.image_io import to_float01
    from ..inference import upscale_tiled

    out_h, out_w = size
    dtype = output_dtype(picture.rgb.dtype, dst_ext)
    channels = 1 if picture.gray and picture.alpha is None else (4 if picture.alpha is not None else 3)
    out = np.empty((out_h, out_w, channels), dtype)

    def sink(top, left, block):
        rgb = block[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        rows, cols = slice(top, top + rgb.shape[0]), slice(left, left + rgb.shape[1])
        if picture.gray:
            luma = rgb[:, :, 0] * _LUMA[0] + rgb[:, :, 1] * _LUMA[1] + rgb[:, :, 2] * _LUMA[2]
            out[rows, cols, :min(channels, 3)] = from_unit(luma, dtype)[:, :, None]
        else:
            out[rows, cols, :3] = from_unit(rgb[:, :, ::-1], dtype)  # RGB -> OpenCV's BGR
        if progress is not None:
            progress(rgb.shape[0] * rgb.shape[1])

    lq = torch.from_numpy(to_float01(picture.rgb)).permute(2, 0, 1).unsqueeze(0).to(device)
    upscale_tiled(net, lq, (out_h, out_w), tile=tile, precision=precision, halo=halo, sink=sink,
                  cell_scale=cell_scale, chunk_size=chunk_size)
    if picture.alpha is not None:
        alpha = cv2.resize(to_unit(picture.alpha), (out_w, out_h), interpolation=cv2.INTER_CUBIC)
        out[:, :, 3] = from_unit(alpha, dtype)
    return out[:, :, 0] if channels == 1 else out


def run(args):
    """Exit status 0 when every image was written; bad input raises (UpscaleError, CheckpointError,
    decoding errors, an unwritable -o), reported in one line by ``basicsr``'s entry point."""
    from tqdm import tqdm

    if (args.scale is None) == (args.size is None):
        raise UpscaleError('give exactly one of --scale S|SHxSW and --size WxH')
    scale = parse_scale(args.scale) if args.scale is not None else None
    size = parse_size(args.size) if args.size is not None else None
    if args.tile is not None and args.tile < 1:
        raise UpscaleError(f'--tile must be a positive number of pixels, got {args.tile}')
    if args.chunk_size is not None and args.chunk_size < 1:
        raise UpscaleError(f'--chunk-size must be a positive number of queries, got {args.chunk_size}')
    if args.halo is not None and args.halo < 0:
        raise UpscaleError(f'--halo must be >= 0, got {args.halo}')
    if args.from_hr and scale is None:
        raise UpscaleError('--from-hr needs --scale (the input is shrunk by it, then upscaled back to its size)')
    cell_clip = None if args.cell_clip is None else _positive_float(args.cell_clip, '--cell-clip')
    device = _device(args.device)
    jobs = plan(args.inputs, args.output)
    sizes = []
    for src, dst in jobs:
        in_hw = image_size(src)
        if args.from_hr:
            lr_hw = _shrunk_size(in_hw, scale)
            if min(lr_hw) < 1 or lr_hw == tuple(in_hw):
                raise UpscaleError(f'{src}: --from-hr at scale {args.scale} leaves a {lr_hw[1]}x{lr_hw[0]} input')
        out_size = tuple(in_hw) if args.from_hr else output_size(in_hw, scale, size)
        _check_size(dst, out_size, args.force)
        sizes.append(out_size)

    from ..ops import allocator
    from ..checkpoint import load_model
    from ..ops.cpu_features import cpu_has_amx, cpu_has_bf16_matmul
    from ..zoo import zoo_name
    if args.precision == 'bf16' and device.type == 'cpu' and cpu_has_amx() is False:
        if cpu_has_bf16_matmul():
            print(f'{PROG}: note: this CPU has no AMX, so --precision bf16 is not faster than fp32 here',
                  file=sys.stderr)
        else:
            print(f'{PROG}: note: this CPU has no AMX and no AVX512-BF16, so --precision bf16 is emulated '
                  'and several times slower than fp32 here', file=sys.stderr)
    allocator.keep_freed_buffers(allocator.INFERENCE)  # the same few-MB chunk buffers, over and over
    net = load_model(args.model, device=device, allow_pickle=args.allow_pickle)

    for (src, dst), out_size in zip(jobs, sizes):
        picture = original = read_picture(src)
        if args.from_hr:
            picture = shrink_picture(original, _shrunk_size(original.rgb.shape[:2], scale))
        ext = os.path.splitext(dst)[1].lower()
        with tqdm(total=out_size[0] * out_size[1], desc=os.path.basename(src), unit='px', unit_scale=True,
                  leave=False, disable=None) as bar:
            cell_scale = None
            if cell_clip is not None:  # the given scale, else the size ratio, per axis
                ratio = scale or (out_size[0] / picture.rgb.shape[0], out_size[1] / picture.rgb.shape[1])
                cell_scale = tuple(max(r / cell_clip, 1) for r in ratio)
            array = upscale_picture(net, picture, out_size, device, ext, args.tile, args.halo, args.precision,
                                    bar.update, cell_scale, args.chunk_size)
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        write_encoded(dst, array)
        print(f'{src} -> {dst} ({out_size[1]}x{out_size[0]})')
        if args.compare:
            label = os.path.basename(args.model) if zoo_name(args.model) is None else zoo_name(args.model)
            figure = compare_path(dst)
            summary = write_comparison(figure, picture, array, label, original if args.from_hr else None)
            print(f'{figure}: {summary}')
    return 0


def _shrunk_size(hw, scale):
    return max(1, round(hw[0] / scale[0])), max(1, round(hw[1] / scale[1]))


def shrink_picture(picture, size):
    """``picture`` made smaller by bicubic interpolation (PIL's, as the training data), kept in
    its dtype, as if stored at that size."""
    from ..data.resize import bicubic_resize_native
    rgb = picture.rgb if picture.rgb.dtype == np.uint8 else to_unit(picture.rgb)
    small = bicubic_resize_native(rgb, size)
    if picture.rgb.dtype == np.uint16:
        small = from_unit(small, np.uint16)
    return Picture(small, None, picture.gray)


def compare_path(dst):
    stem, _ = os.path.splitext(dst)
    return f'{stem}_compare.png'


def _as_rgb_unit(array):
    """A written output array (BGR[A] / gray) back to RGB floats in [0, 1]."""
    unit = to_unit(array)
    if unit.ndim == 2:
        return np.repeat(unit[:, :, None], 3, axis=2)
    return unit[:, :, 2::-1] if unit.shape[2] >= 3 else unit


def _psnr(img, reference):
    """Whole-image RGB PSNR of HxWx3 [0, 1] arrays (the LIIF metric, no border shaved)."""
    import torch

    from ..metrics.psnr_liif_metric import calculate_psnr_liif
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None]  # noqa: E731
    return calculate_psnr_liif(as_tensor(img), as_tensor(reference), mode='none')


def write_comparison(path, low, written, label, original=None):
    """A figure of the most detailed crop of the output: the input (nearest), bicubic, the model
    (``written``, the array as encoded) and, when known, the original, with PSNRs over the whole
    image; bicubic is stored at the output's bit depth too, so both are judged alike. Written
    atomically."""
    import cv2
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt

    from ..data.resize import bicubic_resize
    model_rgb = _as_rgb_unit(written)
    out_h, out_w = model_rgb.shape[:2]
    low_rgb = to_unit(low.rgb)
    bicubic = to_unit(from_unit(bicubic_resize(low_rgb, (out_h, out_w)), written.dtype))
    nearest = cv2.resize(low_rgb, (out_w, out_h), interpolation=cv2.INTER_NEAREST)
    reference = None if original is None else to_unit(original.rgb)
    # the crop with the most detail (gradient energy) in the reference, else the model output
    side = min(160, out_h, out_w)
    gray = (reference if reference is not None else model_rgb).mean(axis=2).astype(np.float32)
    energy = cv2.blur(np.abs(cv2.Sobel(gray, cv2.CV_32F, 1, 0)) + np.abs(cv2.Sobel(gray, cv2.CV_32F, 0, 1)),
                      (side, side))
    half = side // 2
    valid = energy[half:out_h - (side - half) + 1, half:out_w - (side - half) + 1]
    top, left = np.unravel_index(int(np.argmax(valid)), valid.shape)
    panels = [('input (nearest)', nearest, None), ('bicubic', bicubic, None), (label, model_rgb, None)]
    if reference is not None:
        panels = [(name, img, _psnr(img, reference)) for name, img, _ in panels[1:]]
        panels.append(('original', reference, None))
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.4), dpi=100)
    for ax, (name, img, psnr) in zip(axes, panels):
        ax.imshow(np.clip(img[top:top + side, left:left + side], 0, 1), interpolation='nearest')
        ax.set_title(name if psnr is None else f'{name}\n{psnr:.2f} dB', fontsize=9)
        ax.axis('off')
    scale = f'{out_h / low_rgb.shape[0]:.3g}x{out_w / low_rgb.shape[1]:.3g}'
    fig.suptitle(f'{low_rgb.shape[1]}x{low_rgb.shape[0]} -> {out_w}x{out_h} (x{scale}), crop {side}x{side} at '
                 f'({left}, {top})', fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))  # room for the title above two-line panel titles
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png')
    plt.close(fig)
    from ..fileio import atomic_write
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    if reference is None:
        return 'bicubic | model'
    return ', '.join(f'{name} {psnr:.2f} dB' for name, _, psnr in panels if psnr is not None)

"""Decoding images into RGB arrays, with every odd input handled explicitly.

Shared by the datasets and by ``basicsr upscale`` (which also reads and writes whole pictures
through :func:`read_picture` / :func:`write_encoded`, keeping alpha, grayscale and bit depth). The rules:

* grayscale (and gray + alpha) -> the gray channel replicated to RGB;
* RGBA -> the alpha channel is dropped, not composited (what the LIIF authors' loader,
  ``PIL.Image.convert('RGB')``, does: the stored colour is the image content);
* 16-bit -> kept at 16 bit and scaled by 1/65535 (never truncated to 8 bit);
* float images (e.g. float TIFF) -> assumed to be in [0, 1] and clipped to it;
* CMYK JPEG, palette PNG -> converted to RGB by the decoder;
* EXIF orientation is ignored (as PIL and the authors do), so LR/HR pairs stay aligned;
* zero-byte or undecodable data -> ``ValueError('<source>: ...')`` on one line.
"""
import io
import os

import cv2
import numpy as np

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm', '.pnm', '.gif')


def is_image_file(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _from_pil(content):
    """Fallback for formats OpenCV cannot decode. Returns None when PIL cannot either."""
    import io

    from PIL import Image
    try:
        with Image.open(io.BytesIO(content)) as img:
            img.load()
            if img.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
                return np.asarray(img).astype(np.uint16 if img.mode.startswith('I;16') else np.int64)
            if img.mode == 'F':
                return np.asarray(img, dtype=np.float32)
            return np.asarray(img.convert('RGB'))
    except Exception:  # noqa: BLE001  (any PIL failure means "not an image we can read")
        return None


def decode_image(content, source_name='<bytes>'):
    """Encoded bytes -> HxWx3 RGB array in its native precision (uint8, uint16 or float32)."""
    if content is None or len(content) == 0:
        raise ValueError(f'{source_name}: empty file (0 bytes), not an image')
    img = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_UNCHANGED)
    from_cv2 = img is not None
    if img is None:
        img = _from_pil(content)
    if img is None:
        raise ValueError(f'{source_name}: cannot decode image ({len(content)} bytes; corrupt, truncated or '
                         'unsupported format)')
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f'{source_name}: decoded to an unusable array of shape {img.shape}')
    channels = img.shape[2]
    if channels in (1, 2):  # gray, gray + alpha
        img = np.repeat(img[:, :, :1], 3, axis=2)
    elif channels in (3, 4):  # BGR(A) from OpenCV, RGB from PIL; alpha dropped
        img = img[:, :, 2::-1] if from_cv2 else img[:, :, :3]
    else:
        raise ValueError(f'{source_name}: unsupported number of channels ({channels})')

    if img.dtype == np.uint8 or img.dtype == np.uint16:
        pass
    elif img.dtype in (np.float32, np.float64):
        img = np.clip(np.nan_to_num(img.astype(np.float32)), 0, 1)
    elif np.issubdtype(img.dtype, np.integer):
        if img.min() < 0 or img.max() > 65535:
            raise ValueError(f'{source_name}: integer pixel values outside [0, 65535] are not supported')
        img = img.astype(np.uint16)
    else:
        raise ValueError(f'{source_name}: unsupported pixel type {img.dtype}')
    return np.ascontiguousarray(img)


def to_float01(img):
    """Native RGB array -> float32 in [0, 1] (uint8 / 255, uint16 / 65535, float as is)."""
    if img.dtype == np.uint8:
        return img.astype(np.float32) / np.float32(255)
    if img.dtype == np.uint16:
        return img.astype(np.float32) / np.float32(65535)
    return img.astype(np.float32, copy=not img.flags.writeable)  # a cached (read-only) image is never shared


def read_bytes(path):
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as err:
        raise ValueError(f'{path}: cannot read file ({err.strerror or err})') from None


def read_image_native(path_or_bytes, source_name=None):
    """Path or bytes -> HxWx3 RGB array in native precision (see :func:`decode_image`)."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return decode_image(bytes(path_or_bytes), source_name or '<bytes>')
    path = os.fspath(path_or_bytes)
    return decode_image(read_bytes(path), source_name or path)


def read_image_rgb(path_or_bytes, source_name=None):
    """Path or bytes -> float32 HxWx3 RGB image in [0, 1]."""
    return to_float01(read_image_native(path_or_bytes, source_name))


# ----------------------------------------------------------------------------------------------
# whole pictures (colour, alpha, grayscale, bit depth kept): what `basicsr upscale` reads and writes
KEEPS_16BIT = ('.png', '.tif', '.tiff')
KEEPS_FLOAT = ('.tif', '.tiff')


class Picture:
    """A decoded image: ``rgb`` (h, w, 3) in its native dtype, ``alpha`` (h, w) or None,
    and whether it was grayscale."""

    def __init__(self, rgb, alpha=None, gray=False):
        self.rgb, self.alpha, self.gray = rgb, alpha, gray


def _header(content):
    """PIL's (mode, size, has-alpha) without decoding the pixels; None if PIL can't parse it."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(content)) as img:
            alpha = img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in img.info
            return img.mode, img.size, alpha
    except Exception:  # noqa: BLE001  (any failure: let the full decoder judge it)
        return None


def read_picture(path):
    """Decode ``path`` with :mod:`ciisr_plugin.data.image_io`'s rules, keeping alpha."""

    content = read_bytes(path)
    rgb = decode_image(content, path)  # one-line ValueError for empty / corrupt files
    header = _header(content)
    gray = header is not None and header[0] in ('1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16B', 'I;16L', 'F')
    alpha = None
    if header is not None and header[2]:
        full = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_UNCHANGED)
        if full is not None and full.ndim == 3 and full.shape[2] in (2, 4) and full.shape[:2] == rgb.shape[:2]:
            alpha = full[:, :, -1]
            if alpha.dtype != rgb.dtype:  # keep alpha on the colour channels' scale
                alpha = from_unit(to_unit(alpha), rgb.dtype)
    return Picture(rgb, alpha, gray)


def image_size(path):
    """(h, w) of an image file, reading only its header when possible."""
    content = read_bytes(path)
    if not content:
        raise ValueError(f'{path}: empty file (0 bytes), not an image')
    header = _header(content)
    if header is not None:
        return header[1][1], header[1][0]
    return decode_image(content, path).shape[:2]


def to_unit(array):
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535
    return np.clip(array.astype(np.float32), 0, 1)


def from_unit(unit, dtype):
    """[0, 1] floats -> ``dtype`` (uint8, uint16 or float32), rounded and clipped."""
    unit = np.clip(unit, 0, 1)
    if dtype == np.uint8:
        return (unit * 255 + 0.5).astype(np.uint8)
    if dtype == np.uint16:
        return (unit * 65535 + 0.5).astype(np.uint16)
    return unit.astype(np.float32)


def output_dtype(in_dtype, ext):
    if in_dtype == np.uint16 and ext in KEEPS_16BIT:
        return np.uint16
    if in_dtype == np.float32:
        return np.float32 if ext in KEEPS_FLOAT else (np.uint16 if ext in KEEPS_16BIT else np.uint8)
    return np.uint8


def write_encoded(path, array):
    """Encode ``array`` (BGR / BGRA / gray, as OpenCV expects) by ``path``'s extension and
    write it via a temporary file in the same folder + rename."""
    ext = os.path.splitext(path)[1].lower()
    params = {'.jpg': [cv2.IMWRITE_JPEG_QUALITY, 95], '.jpeg': [cv2.IMWRITE_JPEG_QUALITY, 95],
              '.webp': [cv2.IMWRITE_WEBP_QUALITY, 95]}.get(ext, [])
    ok, encoded = cv2.imencode(ext, array, params)
    if not ok:
        raise ValueError(f'{path}: the {ext} encoder refused a {array.shape} {array.dtype} image')
    from ..fileio import atomic_write
    atomic_write(path, lambda f: f.write(encoded.tobytes()))

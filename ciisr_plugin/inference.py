"""Inference at any output size with memory bounded by the tile, not the image.

:func:`upscale_tiled` cuts the LR image into tiles, runs the encoder on each tile plus a
halo wide enough that the tile's latents come out exactly as for the whole image, and
renders the output pixels that belong to the tile. Coordinates stay in the global frame:
each query is placed on the full latent grid exactly as :meth:`ImplicitSRNet.upscale`
places it (same coordinates, same nearest latent, same relative coordinate), and only the
row it gathers is looked up in the tile's features (see
:class:`~ciisr_plugin.archs.implicit_query.LatentWindow`). So tiled and whole-image
results agree to float rounding of the convolutions, whatever the tile size.

The halo an exact tile needs is the encoder's receptive radius (its 3x3 convolutions
each widen it by one pixel), plus one for the 3x3 feature unfolding, plus two for the
local ensemble's neighbouring latent (one, and one more so that float rounding at exact
cell borders never matters). Output pixel rows are assigned to the tile that holds their
own latent, so a query never reaches past its tile by more than that.

``precision='bf16'`` runs the encoder and the decoders' matrix products in bfloat16 under
``torch.autocast``; coordinates, nearest-latent choice and blend weights stay float32
(autocast leaves those ops alone), and the output is float32.
"""
import collections
import concurrent.futures
import contextlib
import logging
import math
from fractions import Fraction

import torch
from torch import nn

from .archs.geometry import LatentWindow, PixelGrid, grid_blocks
from .archs.implicit_query import QUERY_CHUNK, ImplicitSRNet

logger = logging.getLogger('ciisr')

PRECISIONS = ('fp32', 'bf16')
# Halo terms beyond the encoder: the 3x3 unfold, then the ensemble neighbour (+1 margin).
UNFOLD_RADIUS = 1
ENSEMBLE_RADIUS = 2
# Working-memory budget for one tile: this share of the free memory, within these bounds.
MEMORY_SHARE = 0.25
MIN_BUDGET = 64 << 20
MAX_CPU_BUDGET = 1 << 30
MIN_TILE = 32
# On CPU, chunks whose widest decoder activation (all four ensemble shifts) takes about
# this many bytes run fastest: much larger ones fall out of cache (the elementwise ops
# between the matrix products become memory-bound), smaller ones pay per-op overhead.
# Measured on 2 cores: 8 MB (2048 LIIF / 1260 A-LIIF queries) is 4-10% faster than 4 MB.
CPU_CHUNK_BYTES = 8 << 20

_LOCAL_LEAVES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Identity,
                 nn.Dropout, nn.Dropout2d)
# BasicSR archs keep their upsampling tail in BasicSREncoder; it never runs there.
_UNUSED_TAILS = ('net.upsample', 'net.conv_last', 'net.conv_up', 'net.conv_hr', 'net.conv_before_upsample')


# ----------------------------------------------------------------------------------------------
# receptive field
def encoder_receptive_radius(encoder):
    """How far (in LR pixels) an encoder output can see, or None if it is not local.

    An encoder may declare it as ``receptive_radius`` (None = not local). Otherwise it is
    the sum of the radii of its stride-1 convolutions - exact for chains, residual and
    dense blocks (EDSR, RDN, RRDB: the longest path goes through every conv once) - as
    long as every other leaf module is a pointwise activation. Anything else (pooling,
    attention, normalisation over positions) makes the encoder non-local: None.
    """
    declared = getattr(encoder, 'receptive_radius', False)
    if declared is not False:
        return declared
    radius = 0
    for name, module in encoder.named_modules():
        if next(module.children(), None) is not None or name.startswith(_UNUSED_TAILS):
            continue
        if isinstance(module, nn.Conv2d):
            k, d, p = module.kernel_size, module.dilation, module.padding
            if module.stride != (1, 1) or isinstance(p, str) and p != 'same':
                return None
            reach = [d[i] * (k[i] - 1) // 2 for i in range(2)]
            if not isinstance(p, str) and list(p) != reach:
                return None  # not 'same' padding: the output grid is not the LR grid
            radius += max(reach)
        elif not isinstance(module, _LOCAL_LEAVES):
            return None
    return radius


def tile_halo(net):
    """LR pixels of context each side of a tile for an exact result, or None (not local)."""
    radius = encoder_receptive_radius(net.encoder)
    if radius is None:
        return None
    return radius + (UNFOLD_RADIUS if getattr(net, 'feat_unfold', True) else 0) + ENSEMBLE_RADIUS


# ----------------------------------------------------------------------------------------------
# memory
def available_memory(device):
    """Free bytes on ``device``: CUDA's free memory, else the host's MemAvailable."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # unknown: assume a small machine


def memory_budget(device):
    free = available_memory(device) * MEMORY_SHARE
    if torch.device(device).type != 'cuda':
        free = min(free, MAX_CPU_BUDGET)
    return int(max(MIN_BUDGET, free))


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class _Footprint:
    """Per-latent memory of encoding + preparing, measured on a small probe crop: the widest
    module input + output (several such maps are alive at once) and the prepared grid."""

    def __init__(self, net, lq):
        probe = lq[:1, :, :16, :16]
        pixels = probe.shape[-2] * probe.shape[-1]
        widest = [0.0]

        def hook(module, inputs, output):
            numel = sum(t.numel() for t in _tensors((inputs, output)) if t.dim() == 4)
            widest[0] = max(widest[0], numel / pixels)

        handles = [m.register_forward_hook(hook) for m in net.encoder.modules()]
        try:
            prepared = net.prepare(net.encode(probe))
        finally:
            for handle in handles:
                handle.remove()
        prepared_bytes = sum(t.numel() * t.element_size() for t in _tensors(prepared))
        self.row_width = net.decode_row_width  # declared by the arch
        self.per_latent = 4 * 3 * widest[0] + 2 * prepared_bytes / pixels


def choose_tile(lq_shape, per_latent, halo, budget):
    """Largest square LR tile whose haloed crop fits ``budget`` bytes at ``per_latent``
    bytes per LR pixel and image; the whole image (``max(h, w)``) when it fits at once."""
    h, w = lq_shape[-2:]
    per_latent = per_latent * lq_shape[0]
    if h * w * per_latent <= budget:
        return max(h, w)
    side = int(math.sqrt(budget / per_latent)) - 2 * halo
    return max(MIN_TILE, side)


def default_chunk_size(device, row_width=256, shifts=4):
    """Queries decoded at once: :data:`QUERY_CHUNK` on GPUs; on CPU as many as keep one
    decoder activation within :data:`CPU_CHUNK_BYTES` (at most that)."""
    if torch.device(device).type == 'cuda':
        return QUERY_CHUNK
    return int(min(QUERY_CHUNK, max(256, CPU_CHUNK_BYTES // (shifts * row_width * 4))))


# ----------------------------------------------------------------------------------------------
# tiling
def _spans(n, tile):
    return [(a, min(n, a + tile)) for a in range(0, n, tile)]


def _own_latent_starts(out_n, in_n):
    """For each output pixel along one axis, the LR pixel its centre falls in, as the first
    output index of each LR pixel (length ``in_n + 1``). Integer arithmetic: exact."""
    starts = [0] * (in_n + 1)
    # output i belongs to latent floor((2i + 1) * in_n / (2 * out_n))
    for k in range(in_n + 1):
        starts[k] = min(out_n, max(0, -(-(2 * out_n * k - in_n) // (2 * in_n))))
    return starts


def check_precision(precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got '{precision}'")


def _autocast_factory(device, precision):
    if precision == 'fp32':
        return contextlib.nullcontext
    return lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def window_padding(n, window):
    """LR pixels appended to a side of ``n`` pixels by the LTE authors' window padding:
    up to ``(n // window + 1) * window`` - a whole extra window when ``n`` is already a
    multiple of it (their ``test.py --window``, for SwinIR encoders)."""
    return (n // window + 1) * window - n


def pad_symmetric(lq, pad_h, pad_w):
    """``lq`` (B, C, h, w) with ``pad_h`` rows appended below and ``pad_w`` columns to the right,
    mirrored with the edge pixel repeated - the authors' ``cat([x, flip(x)])`` then crop
    ('symmetric', not 'reflect'). A pad longer than the image mirrors again."""
    for dim, pad in ((2, pad_h), (3, pad_w)):
        n = lq.shape[dim] + pad
        while lq.shape[dim] < n:
            lq = torch.cat([lq, torch.flip(lq, [dim])], dim)
        lq = lq.narrow(dim, 0, n)
    return lq


def check_pad_to_window(pad_to_window, what='pad_to_window'):
    """``pad_to_window`` as an int >= 0 (None -> 0); ValueError naming ``what`` otherwise."""
    if pad_to_window is None:
        return 0
    if isinstance(pad_to_window, bool) or not isinstance(pad_to_window, int) or pad_to_window < 0:
        raise ValueError(f'{what} must be a whole number of LR pixels >= 0 (0 or null: no padding), '
                         f'got {pad_to_window!r}')
    return pad_to_window


def upscale_tiled(net, lq, size, tile=None, chunk_size=None, precision='fp32', halo=None, sink=None, workers=None,
                  cell_scale=None, pad_to_window=0):
    """Render ``net``'s (B, C, H, W) output of ``lq`` (B, 3, h, w) at ``size = (H, W)``.

    Args:
        tile: LR tile side in pixels; None picks the largest that fits the memory budget
            (the whole image when it fits).
        chunk_size: queries decoded at once (default: :func:`default_chunk_size`).
        precision: 'fp32' or 'bf16' (encoder and decoders in bfloat16, output float32).
        halo: LR pixels of context around each tile. None: the exact halo
            (:func:`tile_halo`); an encoder that is not local is then run untiled
            (explicit ``tile`` requires an explicit ``halo``, and is approximate).
        sink: None to return the image; else ``sink(top, left, block)`` receives every
            rendered float32 block (B, C, bh, bw) exactly once, and nothing is kept (so
            memory does not grow with the output) - the function returns None. It is
            called from the calling thread, in order (by tile, then row).
        workers: threads decoding blocks at once (see :func:`decode_in_order`); None:
            :func:`default_workers`.
        cell_scale: ``(fy, fx)`` factors on the cell every query carries (coordinates
            unchanged): the LTE authors' cell clipping for extrapolation passes
            ``max(scale / scale_max, 1)`` per axis. None: the cell of the output pixel.
            Networks that take no cell (``FixedScaleSR``, ``BicubicSR``) ignore it.
        pad_to_window: 0, or the LTE authors' window padding for that window: ``lq`` is
            padded symmetrically at the bottom/right to ``(h // window + 1) * window`` rows
            (likewise columns, :func:`window_padding`), the output is rendered on the padded
            image's pixel grid with the same pixel pitch (padded output height
            ``H * padded_h / h``, ``scale * padded_h`` for an integer scale; cells
            ``2 / that``), and its top-left ``(H, W)`` is returned. A network without pixel
            queries renders the whole padded output, which needs it to be whole pixels.
    """
    check_precision(precision)
    out_h, out_w = int(size[0]), int(size[1])
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f'upscale: output size must be positive, got {out_h}x{out_w}')
    window = check_pad_to_window(pad_to_window)
    h, w = lq.shape[-2:]
    extent = None
    if window:
        pad_h, pad_w = window_padding(h, window), window_padding(w, window)
        lq = pad_symmetric(lq, pad_h, pad_w)
        # the padded output keeps the pixel pitch: H * (h + pad_h) / h output pixels (exact)
        extent = (Fraction(out_h * (h + pad_h), h), Fraction(out_w * (w + pad_w), w))
    if tile is not None and int(tile) < 1:
        raise ValueError(f'tile must be a positive number of LR pixels, got {tile}')
    device = lq.device
    autocast = _autocast_factory(device, precision)
    if sink is None:
        out = None

        def sink(top, left, block):
            nonlocal out
            if out is None:
                out = block.new_empty(block.shape[0], block.shape[1], out_h, out_w)
            out[:, :, top:top + block.shape[-2], left:left + block.shape[-1]] = block
    else:
        out = False

    # one autocast region for the whole image: it caches the bf16 copies of the weights
    with torch.no_grad(), autocast():
        if not isinstance(net, ImplicitSRNet):  # fixed-scale adapters etc.: their own upscale
            if extent is None:
                sink(0, 0, net.upscale(lq, size=(out_h, out_w)).float())
            elif any(e.denominator != 1 for e in extent):
                raise ValueError(f'pad_to_window: {type(net).__name__} renders whole images, and the padded output '
                                 f'would be {float(extent[0]):g}x{float(extent[1]):g} pixels (not whole)')
            else:
                padded = net.upscale(lq, size=(int(extent[0]), int(extent[1])))
                sink(0, 0, padded[:, :, :out_h, :out_w].float())
        else:
            if workers is None:
                workers = default_workers(device)

            @contextlib.contextmanager
            def context():  # what the calling thread has in force, for the decoding threads
                with torch.no_grad(), autocast():
                    yield

            grid = PixelGrid((out_h, out_w), lq.device, cell_scale=cell_scale, extent=extent)
            _render(net, lq, grid, (h, w), tile, chunk_size, halo, sink, int(workers), context)
    return None if out is False else out


def default_workers(device):
    """Threads that decode blocks at once: on CPU one per intra-op thread, else 1."""
    return torch.get_num_threads() if torch.device(device).type == 'cpu' else 1


@contextlib.contextmanager
def _intra_op_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def decode_in_order(decode, blocks, workers=1, context=contextlib.nullcontext):
    """``(block, decode(block))`` for each of ``blocks``, in order.

    With ``workers > 1`` the blocks are decoded by that many threads at once, each running
    its operations on one core (the process's intra-op thread count is 1 meanwhile, and
    restored after). Splitting the cores between blocks rather than within each operation
    keeps them busy through the many small per-block operations - measured on 2 cores,
    LIIF and A-LIIF 128x128 -> x4: 5-15% faster, same output bit for bit. At most ``2 * workers``
    blocks are in flight, so memory stays bounded by the chunk size. ``context`` is
    entered around every decode (threads do not inherit ``no_grad`` or autocast).
    """
    if workers <= 1:
        for block in blocks:
            with context():
                yield block, decode(block)
        return

    def run(block):
        with context():
            return decode(block)

    pending = collections.deque()
    # worker threads take the intra-op thread count in force when they start their first op
    with _intra_op_threads(1), concurrent.futures.ThreadPoolExecutor(workers) as pool:
        try:
            for block in blocks:
                pending.append((block, pool.submit(run, block)))
                if len(pending) >= 2 * workers:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def _render(net, lq, grid, content_hw, tile, chunk_size, halo, sink, workers, context):
    """Render the :class:`PixelGrid` ``grid`` from ``lq``, whose top-left ``content_hw`` LR
    pixels the grid's pixels cover (the rest is padding: it owns no output pixel)."""
    h, w = lq.shape[-2:]
    out_h, out_w = grid.out_hw
    exact_halo = tile_halo(net)
    if halo is None:
        halo = exact_halo
        if halo is None:
            if tile is not None:
                raise ValueError(f'encoder {type(net.encoder).__name__} is not local (its receptive field '
                                 'is unbounded), so tiles change the result; give an explicit halo to tile '
                                 'approximately, or no tile')
            logger.info('encoder %s is not local: rendering untiled', type(net.encoder).__name__)
            tile, halo = max(h, w), 0
    elif halo < 0:
        raise ValueError(f'halo must be >= 0 LR pixels, got {halo}')
    elif exact_halo is None or halo < exact_halo:
        logger.warning('tiling with halo %d (exact needs %s): results differ from whole-image inference',
                       halo, exact_halo if exact_halo is not None else 'the whole image')
    if tile is None or chunk_size is None:
        footprint = _Footprint(net, lq)
    if tile is None:
        tile = choose_tile(lq.shape, footprint.per_latent, halo, memory_budget(lq.device))
    if chunk_size is None:
        shifts = 4 if getattr(net, 'local_ensemble', True) else 1
        chunk_size = default_chunk_size(lq.device, footprint.row_width, shifts)
    tile = int(tile)
    # when every haloed crop is the whole image anyway, encode it once
    single = all(a - halo <= 0 and z + halo >= n for n in (h, w) for a, z in _spans(n, tile))
    if not single and not net.tileable:
        logger.warning('%s declares tileable = False: rendering untiled', type(net).__name__)
        single = True
    if single:
        tile = max(h, w)

    # output pixel i lies in content latent floor((2i + 1) * h0 / (2 * out_h)), padded or not
    (h0, w0) = content_hw
    row_starts = _own_latent_starts(out_h, h0) + [out_h] * (h - h0)
    col_starts = _own_latent_starts(out_w, w0) + [out_w] * (w - w0)
    b = lq.shape[0]
    for y0, y1 in _spans(h, tile):
        i0, i1 = row_starts[y0], row_starts[y1]
        if i0 == i1:
            continue
        for x0, x1 in _spans(w, tile):
            j0, j1 = col_starts[x0], col_starts[x1]
            if j0 == j1:
                continue
            if single:
                prepared = net.prepare(net.encode(lq))
            else:
                cy0, cy1 = max(0, y0 - halo), min(h, y1 + halo)
                cx0, cx1 = max(0, x0 - halo), min(w, x1 + halo)
                feat = net.encode(lq[:, :, cy0:cy1, cx0:cx1])
                window = LatentWindow((cy1 - cy0, cx1 - cx0), (cy0, cx0), (h, w))
                prepared = net.prepare_window(feat, window, lq)
                del feat

            # decode blocks of about chunk_size queries: whole rows of the tile when they fit
            def decode(block, prepared=prepared):
                r0, r1, c0, c1 = block
                pred = net.denormalise(net.query_grid(prepared, grid, block, b).float())
                return pred.view(b, r1 - r0, c1 - c0, -1).permute(0, 3, 1, 2)

            blocks = grid_blocks((i0, i1), (j0, j1), chunk_size)
            for (r0, _, c0, _), block in decode_in_order(decode, blocks, workers, context):
                sink(r0, c0, block)
            del prepared

"""The renderer: query chunks, blocks of a row, decoding threads, archs with their own queries, bf16.

The reference is the whole image at once (``net.upscale`` with one chunk, or ``forward``).
"""
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from ciisr_plugin import inference
from ciisr_plugin.archs import implicit_query
from ciisr_plugin.archs.implicit_query import ImplicitSRNet, make_cell, make_coord
from ciisr_plugin.inference import upscale_tiled
from render_support import TINY_ALIIF, TINY_LIIF, build, whole

pytestmark = pytest.mark.usefixtures('one_thread')


class OwnQueries(ImplicitSRNet):
    """An arch that implements ``query_prepared`` itself (no ``decode_prepared``): grids must
    reach it as per-query coordinates."""

    def __init__(self):
        super().__init__({'type': 'EDSREncoder', 'num_feat': 4, 'num_block': 1})
        self.calls = 0

    def prepare(self, feat):
        return feat, feat.shape[-2:]

    def query_prepared(self, prepared, coord, cell):
        self.calls += 1
        feat, _ = prepared
        picked = F.grid_sample(feat[:, :3], coord.flip(-1).unsqueeze(1), mode='bilinear', align_corners=False)
        return picked[:, :, 0].permute(0, 2, 1) + cell.sum(-1, keepdim=True)


def test_archs_with_their_own_query_prepared_render_through_it():
    torch.manual_seed(0)
    net = OwnQueries().eval()
    lq = torch.rand(2, 3, 6, 5)
    coord = make_coord((13, 11)).unsqueeze(0).expand(2, -1, -1)
    cell = make_cell((13, 11), coord.shape[1]).unsqueeze(0).expand(2, -1, -1)
    with torch.no_grad():
        ref = net(lq, coord, cell).view(2, 13, 11, 3).permute(0, 3, 1, 2)
        net.calls = 0
        got = net.upscale(lq, (13, 11), chunk_size=20)
    assert net.calls == 13 and torch.equal(got, ref)  # 13 rows of 11 queries fit in 20-query blocks


def test_forward_without_autograd_decodes_in_chunks(monkeypatch):
    monkeypatch.setattr(implicit_query, 'QUERY_CHUNK', 50)
    net = build(TINY_LIIF)
    lq = torch.rand(2, 3, 7, 6)
    coord = torch.rand(2, 237, 2) * 2 - 1
    cell = torch.full((2, 237, 2), 0.1)
    calls = []
    original = net.query_prepared

    def spy(prepared, coord, cell):
        calls.append(coord.shape[1])
        return original(prepared, coord, cell)

    net.query_prepared = spy
    with_grad = net(lq, coord, cell)  # autograd on: one batch, as training needs
    assert calls == [237] and with_grad.requires_grad
    calls.clear()
    with torch.no_grad():
        chunked = net(lq, coord, cell)
    assert calls == [50, 50, 50, 50, 37]
    assert (chunked - with_grad.detach()).abs().max().item() <= 1e-6


def test_wide_outputs_are_decoded_in_pieces_of_a_row():
    net = build(TINY_LIIF)
    lq = torch.rand(1, 3, 4, 30)
    seen = []
    original = net.query_grid

    def spy(prepared, grid, block, batch):
        r0, r1, c0, c1 = block
        seen.append((r1 - r0) * (c1 - c0))
        return original(prepared, grid, block, batch)

    net.query_grid = spy
    with torch.no_grad():
        img = net.upscale(lq, (8, 75), chunk_size=32)
        tiled = upscale_tiled(net, lq, (8, 75), chunk_size=32)
    assert max(seen) <= 32 and sum(seen) == 2 * 8 * 75
    del net.query_grid
    with torch.no_grad():
        ref = net.upscale(lq, (8, 75), chunk_size=10**6)
    assert (img - ref).abs().max().item() <= 1e-6 and (tiled - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_decoding_threads_give_the_same_image_and_ordered_blocks(precision):
    net = build(TINY_ALIIF)
    lq = torch.rand(1, 3, 14, 11)
    size = (40, 29)

    def render(workers):
        img, calls = torch.full((1, 3) + size, float('nan')), []

        def sink(top, left, block):
            calls.append((top, left, threading.get_ident()))
            assert not block.requires_grad and block.dtype == torch.float32
            img[:, :, top:top + block.shape[-2], left:left + block.shape[-1]] = block

        upscale_tiled(net, lq, size, tile=6, chunk_size=50, precision=precision, workers=workers, sink=sink)
        return img, calls

    before = torch.get_num_threads()
    ref, ref_calls = render(1)
    got, calls = render(3)
    assert torch.get_num_threads() == before
    assert torch.equal(got, ref)  # every pixel written, with the same numbers
    assert [c[:2] for c in calls] == [c[:2] for c in ref_calls] and len(calls) > 6  # same blocks, same order
    assert {ident for *_, ident in calls} == {threading.get_ident()}  # the sink runs in the caller's thread


def test_decode_in_order_keeps_order_and_bounds_the_blocks_in_flight():
    lock, running, peak = threading.Lock(), [0], [0]

    def decode(block):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002 * (block % 3))  # finish out of order
        with lock:
            running[0] -= 1
        return block * 10

    out = list(inference.decode_in_order(decode, iter(range(40)), workers=4))
    assert out == [(i, i * 10) for i in range(40)]
    assert peak[0] <= 4
    with pytest.raises(RuntimeError, match='boom'):
        list(inference.decode_in_order(lambda b: (_ for _ in ()).throw(RuntimeError('boom')), range(5), workers=2))


@pytest.mark.parametrize('opt', [TINY_LIIF, TINY_ALIIF], ids=['LIIF', 'ALIIF'])
def test_bf16_close_to_fp32(opt):
    # bfloat16 keeps 8 significant bits (relative rounding 2**-9 per operation); through a
    # few layers that stays well inside one 8-bit output level (1/255), which is the bound:
    # bf16 output must not change a saved 8-bit image by more than one level.
    net = build(opt)
    lq = torch.rand(1, 3, 23, 19)
    ref = whole(net, lq, (71, 40))
    out = upscale_tiled(net, lq, (71, 40), tile=6, precision='bf16')
    err = (out - ref).abs()
    assert out.dtype == torch.float32
    assert err.max().item() <= 1 / 255
    assert err.max().item() > 1e-6  # it did run in bf16

"""Datasets: sampler invariants, evaluation crops/sizes, bad data, demo data.

Every check compares against an independent computation: images that encode their own pixel
position (R = row, G = col), hand-computed sizes, PIL / BasicSR resizes called directly here.
"""
import io
import os
import random

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from basicsr.data import build_dataloader, build_dataset
from basicsr.utils.matlab_functions import imresize as basicsr_imresize

from ciisr_plugin.archs.implicit_query import make_coord
from ciisr_plugin.data.arbitrary_scale_dataset import ArbitraryScaleImageDataset
from ciisr_plugin.data.demo_data import DEFAULT_SPLIT, load_skimage_photo, prepare_skimage_dataroot, resolve_dataroot
from ciisr_plugin.data.image_io import read_image_rgb
from ciisr_plugin.data.paired_scale_dataset import PairedScaleImageDataset
from ciisr_plugin.data.query_sampling import sample_group
from ciisr_plugin.data.scaled_hr_dataset import ScaledHRImageDataset
from ciisr_plugin.data.varied_size_gt_dataset import VariedSizeGTDataset


# ----------------------------------------------------------------------------- helpers
def write_rgb(path, rgb):
    """Write an RGB (or gray / RGBA / 16-bit) array as a PNG with OpenCV (which wants BGR)."""
    arr = rgb if rgb.ndim == 2 else (rgb[..., ::-1] if rgb.shape[2] == 3 else rgb[..., [2, 1, 0, 3]])
    assert cv2.imwrite(str(path), np.ascontiguousarray(arr))
    return str(path)


def position_image(h, w):
    """R = row, G = col, B = a scramble of both: every pixel says where it is."""
    rows, cols = np.mgrid[:h, :w]
    return np.stack([rows, cols, (rows * 7 + cols * 13) % 256], axis=-1).astype(np.uint8)


def pil_bicubic(rgb_uint8, h, w):
    return np.asarray(Image.fromarray(rgb_uint8).resize((w, h), Image.BICUBIC)).astype(np.float32) / 255


def chw(a):
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)


@pytest.fixture
def position_folder(tmp_path):
    folder = tmp_path / 'hr'
    folder.mkdir()
    write_rgb(folder / 'a.png', position_image(64, 72))
    write_rgb(folder / 'b.png', position_image(70, 64))
    return str(folder)


def pixel_indices(coord, hr_hw):
    """Continuous pixel indices of [-1, 1] pixel-centre coordinates (independent of make_coord)."""
    h, w = hr_hw
    c = coord.double()
    return ((c[:, 0] + 1) * h - 1) / 2, ((c[:, 1] + 1) * w - 1) / 2


def find_dihedral(src_row, src_col, i, j, tol=1e-3):
    """Which flip/transpose maps query pixel indices (i, j) to the source pixel (src_row, src_col)?
    Returns (transpose, row_sign, col_sign, row_offset, col_offset) or None."""
    for transpose in (False, True):
        u, v = (j, i) if transpose else (i, j)
        for sr in (1, -1):
            for sc in (1, -1):
                a, b = src_row - sr * u, src_col - sc * v
                if (a - a[0]).abs().max() < tol and (b - b[0]).abs().max() < tol:
                    return transpose, sr, sc, float(a[0]), float(b[0])
    return None


# ----------------------------------------------------------------------------- training sampler
def test_pixel_queries_point_at_their_gt_pixels(position_folder):
    random.seed(0)
    np.random.seed(0)
    ds = ArbitraryScaleImageDataset({'dataroot_gt': position_folder, 'lq_size': 8, 'scale_max': 4, 'sample_q': 40,
                                     'use_hflip': True, 'use_rot': True})
    seen = set()
    for k in range(120):
        s = ds[k % len(ds)]
        hr_h, hr_w = (round(float(v) * 8) for v in s['scale'])
        assert s['lq'].shape == (3, 8, 8) and s['coord'].shape == (40, 2) and s['gt'].shape == (40, 3)
        # cell = size of one HR pixel of the patch the queries come from
        assert torch.equal(s['cell'][:, 0], torch.full((40, ), 2 / hr_h)) and torch.equal(
            s['cell'][:, 1], torch.full((40, ), 2 / hr_w))
        assert s['coord'].abs().max() < 1 and len({tuple(c) for c in s['coord'].tolist()}) == 40  # no repeats
        i, j = pixel_indices(s['coord'], (hr_h, hr_w))
        assert (i - i.round()).abs().max() < 1e-3 and (j - j.round()).abs().max() < 1e-3  # pixel centres
        src_row, src_col = s['gt'][:, 0].double() * 255, s['gt'][:, 1].double() * 255
        fit = find_dihedral(src_row, src_col, i, j)
        assert fit is not None, 'GT values are not the HR pixels at the query coordinates'
        seen.add(fit[:3])
    assert len(seen) == 8  # hflip + rot give all 8 flips/transposes


@pytest.mark.parametrize('dtype', [np.uint8, np.uint16])
def test_cache_images_decodes_each_file_once_and_changes_no_sample(tmp_path, monkeypatch, dtype):
    from ciisr_plugin.resume import SampleIndex
    from ciisr_plugin.data import data_util

    folder = tmp_path / 'hr'
    folder.mkdir()
    for name, (h, w) in (('a', (64, 72)), ('b', (70, 64))):
        img = position_image(h, w).astype(dtype) * (257 if dtype == np.uint16 else 1)
        write_rgb(folder / f'{name}.png', img)
    opt = {'dataroot_gt': str(folder), 'lq_size': 8, 'scale_max': 4, 'sample_q': 40, 'use_hflip': True,
           'use_rot': True}
    reads = []
    real_read = data_util.ImageSource.read_path
    monkeypatch.setattr(data_util.ImageSource, 'read_path', lambda self, path: reads.append(path) or
                        real_read(self, path))
    plain, cached = ArbitraryScaleImageDataset(opt), ArbitraryScaleImageDataset(dict(opt, cache_images=True))
    keys = [SampleIndex(k % 2, (0, 0, k)) for k in range(12)]
    samples = [plain[k] for k in keys]
    assert len(reads) == 12
    reads.clear()
    for key, expected in zip(keys, samples):
        got = cached[key]
        for name in ('lq', 'coord', 'cell', 'gt', 'scale'):
            assert torch.equal(got[name], expected[name]), name
    assert sorted(reads) == sorted(set(plain.source.paths))  # each file read once
    assert all(not img.flags.writeable for img in cached.source.cache.values())  # nothing can alter them
    with pytest.raises(ValueError, match='cache_images: expected true or false'):
        ArbitraryScaleImageDataset(dict(opt, cache_images='yes'))


def test_full_patch_lr_is_pil_bicubic_of_the_hr_crop(position_folder):
    random.seed(1)
    np.random.seed(1)
    ds = ArbitraryScaleImageDataset({'dataroot_gt': position_folder, 'lq_size': 8, 'scale_max': 4, 'sample_q': None,
                                     'use_hflip': True, 'use_rot': True})
    img = position_image(64, 72)
    seen = set()
    for k in range(40):
        s = ds[0]
        hr_h, hr_w = (round(float(v) * 8) for v in s['scale'])
        assert s['gt'].shape == (hr_h * hr_w, 3)
        assert torch.equal(s['coord'], make_coord((hr_h, hr_w)))  # all pixels, row-major
        i, j = pixel_indices(s['coord'], (hr_h, hr_w))
        transpose, sr, sc, _, _ = find_dihedral(s['gt'][:, 0].double() * 255, s['gt'][:, 1].double() * 255, i, j)
        seen.add((transpose, sr, sc))
        # the un-augmented crop, straight from the image, and the LR the authors' recipe makes of it:
        # resize first, then flip / transpose both alike
        top, left = int(s['gt'][:, 0].min() * 255 + 0.5), int(s['gt'][:, 1].min() * 255 + 0.5)
        ch, cw = (hr_w, hr_h) if transpose else (hr_h, hr_w)
        crop = img[top:top + ch, left:left + cw]
        lr = pil_bicubic(crop, 8, 8)
        lr = lr[::sr, ::sc]
        lr = lr.transpose(1, 0, 2) if transpose else lr
        assert torch.equal(s['lq'], chw(lr))
        hr = crop[::sr, ::sc]
        hr = hr.transpose(1, 0, 2) if transpose else hr
        assert torch.equal(s['gt'].view(hr_h, hr_w, 3), torch.from_numpy(hr.astype(np.float32) / 255))
    assert len(seen) == 8


def test_matlab_kernel_matches_basicsr_imresize(tmp_path):
    img = np.random.RandomState(0).randint(0, 256, (16, 16, 3)).astype(np.uint8)
    folder = tmp_path / 'hr'
    folder.mkdir()
    write_rgb(folder / 'x.png', img)
    ds = ArbitraryScaleImageDataset({'dataroot_gt': str(folder), 'lq_size': 8, 'scale_min': 2, 'scale_max': 2,
                                     'downsample_kernel': 'matlab_bicubic', 'sample_q': None})
    s = ds[0]
    ref = basicsr_imresize(img.astype(np.float32) / 255, 0.5)  # 16 -> 8, whole image is the crop
    ref = np.round(np.clip(ref * 255, 0, 255)) / 255  # 8-bit source -> 8-bit LR, as MATLAB on uint8
    assert s['lq'].shape == (3, 8, 8)
    assert torch.allclose(s['lq'], chw(ref.astype(np.float32)), atol=1e-6)


def test_scale_distribution_uniform_and_anisotropic(tmp_path):
    folder = tmp_path / 'hr'
    folder.mkdir()
    write_rgb(folder / 'x.png', position_image(64, 64))
    n = 1500
    for anisotropic in (False, True):
        random.seed(3)
        np.random.seed(3)
        ds = ArbitraryScaleImageDataset({'dataroot_gt': str(folder), 'lq_size': 16, 'scale_min': 1, 'scale_max': 4,
                                         'sample_q': 16, 'anisotropic': anisotropic})
        scales = torch.stack([ds[0]['scale'] for _ in range(n)]).double()
        assert scales.min() >= 1 and scales.max() <= 4
        for col in (0, 1):
            s = scales[:, col]
            hist = torch.histc(s, bins=6, min=1, max=4) / n  # realised scales are round(16 s) / 16
            assert (hist - 1 / 6).abs().max() < 0.04, hist
            assert abs(s.mean().item() - 2.5) < 0.08
        corr = torch.corrcoef(scales.t())[0, 1].item()
        if anisotropic:
            assert abs(corr) < 0.1 and (scales[:, 0] != scales[:, 1]).float().mean() > 0.9
        else:
            assert torch.equal(scales[:, 0], scales[:, 1])


def test_random_group_is_a_patch_of_hr_pixels(position_folder):
    random.seed(4)
    np.random.seed(4)
    p = 12
    ds = ArbitraryScaleImageDataset({'dataroot_gt': position_folder, 'lq_size': 12, 'scale_max': 3.5,
                                     'group_size': p, 'use_hflip': True, 'use_rot': True, 'anisotropic': True})
    for k in range(30):
        s = ds[k % 2]
        hr_h, hr_w = (round(float(v) * 12) for v in s['scale'])
        assert s['gt'].shape == (3, p, p) and s['coord'].shape == (p * p, 2) and s['cell'].shape == (p * p, 2)
        grid = s['coord'].view(p, p, 2)
        # row-major: rows vary down, columns across, one HR pixel apart
        assert torch.allclose(grid[1:, :, 0] - grid[:-1, :, 0], torch.full((p - 1, p), 2 / hr_h), atol=1e-6)
        assert torch.allclose(grid[:, 1:, 1] - grid[:, :-1, 1], torch.full((p, p - 1), 2 / hr_w), atol=1e-6)
        assert torch.equal(grid[:, :, 0], grid[:, :1, 0].expand(p, p))
        # coordinates are the full-grid coordinates bit for bit
        full = make_coord((hr_h, hr_w), flatten=False)
        i, j = pixel_indices(s['coord'], (hr_h, hr_w))
        top, left = int(round(i[0].item())), int(round(j[0].item()))
        assert torch.equal(grid, full[top:top + p, left:left + p])
        src_row, src_col = s['gt'][0].reshape(-1).double() * 255, s['gt'][1].reshape(-1).double() * 255
        assert find_dihedral(src_row, src_col, i, j) is not None


def test_subpixel_group_gt_is_bilinear_at_the_coords(position_folder):
    # unit check against a hand-written bilinear interpolation on a random patch
    torch.manual_seed(0)
    random.seed(5)
    hr = torch.rand(3, 20, 17)
    for _ in range(10):
        coord, cell, gt = sample_group(hr, 9, subpixel=True)
        i, j = pixel_indices(coord, (20, 17))
        assert i.min() >= -1e-4 and i.max() <= 19 + 1e-4 and j.min() >= -1e-4 and j.max() <= 16 + 1e-4
        i0 = i.floor().clamp(0, 18).long()
        j0 = j.floor().clamp(0, 15).long()
        fi, fj = (i - i0).view(1, -1), (j - j0).view(1, -1)
        h = hr.double()
        ref = (h[:, i0, j0] * (1 - fi) * (1 - fj) + h[:, i0 + 1, j0] * fi * (1 - fj) + h[:, i0, j0 + 1] *
               (1 - fi) * fj + h[:, i0 + 1, j0 + 1] * fi * fj)
        assert torch.allclose(gt.reshape(3, -1).double(), ref, atol=2e-5)
        assert torch.equal(cell, torch.tensor([[2 / 20, 2 / 17]]).expand(81, 2))
        assert ((i - i.round()).abs() > 1e-3).any() or ((j - j.round()).abs() > 1e-3).any()  # really sub-pixel

    # through the dataset: the R / G ramps interpolate exactly to the query's pixel index
    random.seed(6)
    ds = ArbitraryScaleImageDataset({'dataroot_gt': position_folder, 'lq_size': 10, 'scale_max': 3,
                                     'group_size': 10, 'group_subpixel': True})
    for k in range(10):
        s = ds[k % 2]
        hr_h, hr_w = (round(float(v) * 10) for v in s['scale'])
        i, j = pixel_indices(s['coord'], (hr_h, hr_w))
        fit = find_dihedral(s['gt'][0].reshape(-1).double() * 255, s['gt'][1].reshape(-1).double() * 255, i, j)
        assert fit is not None and fit[:3] == (False, 1, 1)


def test_training_batches_collate_through_basicsr(position_folder):
    for extra in ({'sample_q': 30}, {'group_size': 8}):
        opt = dict(type='ArbitraryScaleImageDataset', name='t', phase='train', dataroot_gt=position_folder,
                   io_backend={'type': 'disk'}, lq_size=8, scale_max=4, use_hflip=True, use_rot=True,
                   batch_size_per_gpu=2, num_worker_per_gpu=0, **extra)
        batch = next(iter(build_dataloader(build_dataset(opt), opt, num_gpu=0, seed=0)))
        q = extra.get('sample_q', 64)
        assert batch['lq'].shape == (2, 3, 8, 8) and batch['coord'].shape == (2, q, 2)
        assert batch['gt'].shape == ((2, q, 3) if 'sample_q' in extra else (2, 3, 8, 8))
        assert batch['scale'].shape == (2, 2) and len(batch['lq_path']) == 2


# ----------------------------------------------------------------------------- evaluation datasets
@pytest.mark.parametrize('hw, scale, lr, hr', [
    ((101, 77), 3, (33, 25), (99, 75)),
    ((101, 77), 2.5, (40, 30), (100, 75)),
    ((101, 77), [2, 3.5], (50, 22), (100, 77)),
    ((33, 20), 1.1, (30, 18), (33, 20)),  # 33 / 1.1 = 29.999999999999996: the 1e-9 keeps 30
    ((13, 8), 2.5, (5, 3), (12, 8)),  # 5 * 2.5 = 12.5 -> 12 and 3 * 2.5 = 7.5 -> 8 (Python's round)
])
def test_scaled_hr_sizes_and_lr(tmp_path, hw, scale, lr, hr):
    img = np.random.RandomState(1).randint(0, 256, hw + (3, )).astype(np.uint8)
    folder = tmp_path / 'hr'
    folder.mkdir()
    write_rgb(folder / 'x.png', img)
    s = ScaledHRImageDataset({'dataroot_gt': str(folder), 'scale': scale})[0]
    assert s['lq'].shape == (3, ) + lr and s['gt'].shape == (3, ) + hr
    crop = img[:hr[0], :hr[1]]
    assert torch.equal(s['gt'], chw(crop.astype(np.float32) / 255))
    assert torch.equal(s['lq'], chw(pil_bicubic(crop, *lr)))
    sh, sw = scale if isinstance(scale, list) else (scale, scale)
    assert s['scale'].tolist() == pytest.approx([sh, sw])


def test_scaled_hr_matlab_kernel_and_lmdb(tmp_path):
    import lmdb
    img = np.random.RandomState(2).randint(0, 256, (24, 32, 3)).astype(np.uint8)
    folder = tmp_path / 'hr'
    folder.mkdir()
    write_rgb(folder / 'x.png', img)
    s = ScaledHRImageDataset({'dataroot_gt': str(folder), 'scale': 4, 'downsample_kernel': 'matlab_bicubic'})[0]
    ref = np.round(np.clip(basicsr_imresize(img.astype(np.float32) / 255, 0.25) * 255, 0, 255)) / 255
    assert torch.allclose(s['lq'], chw(ref.astype(np.float32)), atol=1e-6)

    # the same image through BasicSR's lmdb layout (PNG bytes + meta_info.txt)
    db = tmp_path / 'hr.lmdb'
    env = lmdb.open(str(db), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b'x', cv2.imencode('.png', img[..., ::-1])[1].tobytes())
    env.close()
    (db / 'meta_info.txt').write_text('x.png (24,32,3) 1\n')
    s2 = ScaledHRImageDataset({'dataroot_gt': str(db), 'io_backend': {'type': 'lmdb'}, 'scale': 4,
                               'downsample_kernel': 'matlab_bicubic'})[0]
    assert torch.equal(s2['gt'], s['gt']) and torch.equal(s2['lq'], s['lq'])


def test_paired_dataset_crops_hr(tmp_path):
    rng = np.random.RandomState(3)
    (tmp_path / 'hr').mkdir()
    (tmp_path / 'lr').mkdir()
    hr = rng.randint(0, 256, (50, 41, 3)).astype(np.uint8)
    lr = rng.randint(0, 256, (12, 10, 3)).astype(np.uint8)
    write_rgb(tmp_path / 'hr' / 'baby.png', hr)
    write_rgb(tmp_path / 'lr' / 'babyx4.png', lr)
    opt = {'dataroot_gt': str(tmp_path / 'hr'), 'dataroot_lq': str(tmp_path / 'lr'), 'filename_tmpl': '{}x4'}
    for scale in (None, 4):
        s = PairedScaleImageDataset(dict(opt, scale=scale))[0]
        assert s['gt'].shape == (3, 48, 40) and s['lq'].shape == (3, 12, 10)
        assert torch.equal(s['gt'], chw(hr[:48, :40].astype(np.float32) / 255))
        assert torch.equal(s['lq'], chw(lr.astype(np.float32) / 255))
        assert s['scale'].tolist() == [4.0, 4.0]
        assert s['lq_path'].endswith('babyx4.png') and s['gt_path'].endswith('baby.png')
    with pytest.raises(ValueError, match=r'babyx4\.png.*baby\.png.*do not match scale 2x2'):
        PairedScaleImageDataset(dict(opt, scale=2))[0]
    with pytest.raises(ValueError, match=r'do not match scale 5x5'):
        PairedScaleImageDataset(dict(opt, scale=5))[0]
    with pytest.raises(ValueError, match=r'no LR image .*babyx3\.png'):
        PairedScaleImageDataset(dict(opt, filename_tmpl='{}x3'))


def test_varied_size_gt_follows_the_authors_recipe(tmp_path):
    folder = tmp_path / 'faces'
    folder.mkdir()
    rng = np.random.RandomState(4)
    imgs = [rng.randint(0, 256, (40, 40, 3)).astype(np.uint8) for _ in range(6)]
    for k, img in enumerate(imgs):
        write_rgb(folder / f'{k}.png', img)
    opt = {'dataroot_gt': str(folder), 'lq_size': 8, 'gt_size_max': 16, 'sample_q': None, 'base_size': 32}
    ds = VariedSizeGTDataset(dict(opt, phase='train'))
    sides = [8, 10, 11, 13, 14, 16]  # round(8 + 8 * i / 5)
    for k, side in enumerate(sides):
        s = ds[k]
        base = np.asarray(Image.fromarray(imgs[k]).resize((32, 32), Image.BICUBIC))
        big = np.asarray(Image.fromarray(base).resize((16, 16), Image.BICUBIC))
        gt = pil_bicubic(big, side, side)
        assert s['gt'].shape == (side * side, 3) and torch.equal(s['gt'], torch.from_numpy(gt).view(-1, 3))
        assert torch.equal(s['cell'][0], torch.tensor([2 / side, 2 / side]))
        assert torch.equal(s['lq'], chw(pil_bicubic(base, 8, 8)))
        assert s['scale'].tolist() == [side / 8] * 2
    ev = VariedSizeGTDataset(dict(opt, phase='val'))[2]
    assert ev['lq'].shape == (3, 8, 8) and ev['gt'].shape == (3, 16, 16) and ev['scale'].tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match='sample_q=100 exceeds'):
        VariedSizeGTDataset(dict(opt, phase='train', sample_q=100))


# ----------------------------------------------------------------------------- bad data
def test_image_reading_rules(tmp_path):
    rng = np.random.RandomState(5)
    gray = rng.randint(0, 256, (6, 7)).astype(np.uint8)
    out = read_image_rgb(write_rgb(tmp_path / 'gray.png', gray))
    assert out.shape == (6, 7, 3) and all(np.array_equal(out[..., c], gray / np.float32(255)) for c in range(3))

    rgba = rng.randint(0, 256, (6, 7, 4)).astype(np.uint8)
    rgba[..., 3] = 0  # fully transparent: the stored colour is kept (alpha dropped, not composited)
    out = read_image_rgb(write_rgb(tmp_path / 'rgba.png', rgba))
    assert np.array_equal(out, rgba[..., :3] / np.float32(255))

    img16 = np.array([[[0, 1000, 65535], [257 * 3 + 200, 40000, 1]]], dtype=np.uint16)  # (1, 2, 3)
    out = read_image_rgb(write_rgb(tmp_path / 'deep.png', img16))
    assert out.dtype == np.float32 and np.array_equal(out, img16.astype(np.float32) / np.float32(65535))
    gray16 = np.array([[0, 30000], [65535, 12345]], dtype=np.uint16)
    out = read_image_rgb(write_rgb(tmp_path / 'gray16.png', gray16))
    assert np.array_equal(out[..., 1], gray16 / np.float32(65535))

    rgb = rng.randint(0, 256, (8, 8, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert('CMYK').save(buf, 'JPEG', quality=100)
    out = read_image_rgb(buf.getvalue(), 'cmyk.jpg')
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert('RGB')).astype(np.float32) / 255
    assert out.shape == (8, 8, 3) and np.abs(out - ref).max() <= 2 / 255  # two decoders, same colours

    (tmp_path / 'empty.png').write_bytes(b'')
    with pytest.raises(ValueError, match=r'empty\.png: empty file \(0 bytes\)'):
        read_image_rgb(tmp_path / 'empty.png')
    (tmp_path / 'junk.png').write_bytes(b'\x89PNG this is not an image' * 3)
    with pytest.raises(ValueError, match=r'junk\.png: cannot decode image'):
        read_image_rgb(tmp_path / 'junk.png')
    good = cv2.imencode('.png', rgb)[1].tobytes()
    (tmp_path / 'cut.png').write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match=r'cut\.png: cannot decode image'):
        read_image_rgb(tmp_path / 'cut.png')
    with pytest.raises(ValueError, match=r'missing\.png: cannot read file'):
        read_image_rgb(tmp_path / 'missing.png')


def test_datasets_report_bad_files_and_options(tmp_path):
    folder = tmp_path / 'hr'
    folder.mkdir()
    write_rgb(folder / 'small.png', position_image(30, 90))
    ds = ArbitraryScaleImageDataset({'dataroot_gt': str(folder), 'lq_size': 16, 'scale_min': 2, 'scale_max': 3,
                                     'sample_q': 16})
    with pytest.raises(ValueError, match=r'small\.png: 30x90 image is smaller than the \d+x\d+ HR crop.*>= 48 px'):
        ds[0]
    (folder / 'bad.png').write_bytes(b'')
    with pytest.raises(ValueError, match=r'bad\.png: empty file'):
        ScaledHRImageDataset({'dataroot_gt': str(folder), 'scale': 2})[0]
    with pytest.raises(ValueError, match=r'too small for scale 40x40'):
        ScaledHRImageDataset({'dataroot_gt': str(folder), 'scale': 40})[1]

    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'README.txt').write_text('not an image')
    with pytest.raises(ValueError, match=r'dataroot_gt: folder .*empty contains no image files'):
        ArbitraryScaleImageDataset({'dataroot_gt': str(empty)})
    with pytest.raises(ValueError, match=r'dataroot_gt: folder .*nowhere does not exist'):
        ScaledHRImageDataset({'dataroot_gt': str(tmp_path / 'nowhere'), 'scale': 2})
    with pytest.raises(ValueError, match="needs 'scale'"):
        ScaledHRImageDataset({'dataroot_gt': str(folder)})
    with pytest.raises(ValueError, match='scale: scale must be a finite number >= 1'):
        ScaledHRImageDataset({'dataroot_gt': str(folder), 'scale': 0.5})
    with pytest.raises(ValueError, match="downsample_kernel: unknown kernel 'area'"):
        ScaledHRImageDataset({'dataroot_gt': str(folder), 'scale': 2, 'downsample_kernel': 'area'})
    with pytest.raises(ValueError, match=r'sample_q=2304 exceeds the 32x32 HR patch'):
        ArbitraryScaleImageDataset({'dataroot_gt': str(folder), 'lq_size': 32})
    with pytest.raises(ValueError, match=r'group_size=48 does not fit the 32x32 HR patch.*scale_min >= 1.5'):
        ArbitraryScaleImageDataset({'dataroot_gt': str(folder), 'lq_size': 32, 'group_size': 48})
    ArbitraryScaleImageDataset({'dataroot_gt': str(folder), 'lq_size': 32, 'group_size': 48, 'scale_min': 1.5})


# ----------------------------------------------------------------------------- demo data
def test_skimage_demo_dataroot(tmp_path, monkeypatch):
    root = tmp_path / 'demo'
    paths = prepare_skimage_dataroot(str(root))
    train, val = sorted(os.listdir(paths['train'])), sorted(os.listdir(paths['val']))
    assert train == sorted(f'{n}.png' for n in DEFAULT_SPLIT['train'])
    assert val == sorted(f'{n}.png' for n in DEFAULT_SPLIT['val'])
    assert not set(train) & set(val)
    import skimage.data
    assert np.array_equal(read_image_rgb(os.path.join(paths['val'], 'chelsea.png')),
                          skimage.data.chelsea().astype(np.float32) / 255)
    assert np.array_equal(load_skimage_photo('motorcycle_left'), skimage.data.stereo_motorcycle()[0])

    stamp = os.stat(os.path.join(paths['train'], 'astronaut.png')).st_mtime_ns
    assert prepare_skimage_dataroot(str(root)) == paths  # idempotent: nothing rewritten
    assert os.stat(os.path.join(paths['train'], 'astronaut.png')).st_mtime_ns == stamp
    prepare_skimage_dataroot(str(root), {'train': ['rocket'], 'val': ['coffee']})
    assert os.listdir(paths['train']) == ['rocket.png'] and os.listdir(paths['val']) == ['coffee.png']
    with pytest.raises(ValueError, match=r"both train and val: \['coffee'\]"):
        prepare_skimage_dataroot(str(root), {'train': ['coffee'], 'val': ['coffee']})
    with pytest.raises(ValueError, match="unknown photo 'kidney'"):
        prepare_skimage_dataroot(str(root), {'train': ['kidney']})

    monkeypatch.setenv('CIISR_DATA_HOME', str(tmp_path / 'home'))
    assert resolve_dataroot('skimage://val') == str(tmp_path / 'home' / 'skimage_demo' / 'val')
    with pytest.raises(ValueError, match="not a demo dataroot"):
        resolve_dataroot('skimage://test')
    ds = ScaledHRImageDataset({'dataroot_gt': 'skimage://val', 'scale': 4})
    assert len(ds) == 2 and len(ScaledHRImageDataset({'dataroot_gt': 'skimage://val', 'scale': 4, 'first_k': 1})) == 1
    s = ds[0]
    assert s['gt'].shape == (3, 300, 448) and s['lq'].shape == (3, 75, 112)  # chelsea, 300x451

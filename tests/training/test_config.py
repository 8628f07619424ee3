"""Option files: `_base_` inheritance (mmengine semantics), YAML round trip, validation."""
import textwrap

import pytest

import ciisr_plugin  # noqa: F401  (registers the plugin, applies the compat fixes)
from ciisr_plugin.config import OptionsError, load_options, render_options_to_val, validate_options, write_options


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _valid_options(**changes):
    opt = {
        'name': 'x',
        'model_type': 'SRModel',
        'num_gpu': 0,
        'network_g': {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3},
        'datasets': {'train': {'type': 'PairedImageDataset'}, 'val_1': {'type': 'PairedImageDataset'}},
        'path': {},
        'train': {'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'pixel_opt': {'type': 'L1Loss'}, 'perceptual_opt': None},
        'logger': {},
        'val': {'metrics': {'psnr': {'type': 'calculate_psnr'}}},
    }
    opt.update(changes)
    return opt


# ----------------------------------------------------------------------------------------------
# inheritance
def test_base_then_child_overrides_with_nested_merge(tmp_path, monkeypatch):
    _write(tmp_path / 'bases' / 'common.yml', """\
        name: base_name
        model_type: SRModel
        num_gpu: 0
        network_g: {type: EDSR, num_feat: 64, num_block: 16}
        train:
          optim_g: {type: Adam, lr: !!float 2e-4, betas: [0.9, 0.99]}
          total_iter: 100
        """)
    child = _write(tmp_path / 'opts' / 'child.yml', """\
        _base_: ../bases/common.yml
        name: child_name
        network_g: {num_feat: 8}
        train:
          optim_g: {lr: !!float 1e-3}
          warmup_iter: 5
        extra: [1, 2]
        """)
    monkeypatch.chdir(tmp_path / 'bases')  # _base_ resolves against the file, not the cwd
    opt = load_options(child)
    assert opt == {
        'name': 'child_name',
        'model_type': 'SRModel',
        'num_gpu': 0,
        'network_g': {'type': 'EDSR', 'num_feat': 8, 'num_block': 16},
        'train': {'optim_g': {'type': 'Adam', 'lr': 1e-3, 'betas': [0.9, 0.99]}, 'total_iter': 100, 'warmup_iter': 5},
        'extra': [1, 2],
    }
    # base keys keep their order, keys new in the child follow; BasicSR's usual head stays first
    assert list(opt) == ['name', 'model_type', 'num_gpu', 'network_g', 'train', 'extra']
    assert list(opt['train']) == ['optim_g', 'total_iter', 'warmup_iter']
    assert list(opt['network_g']) == ['type', 'num_feat', 'num_block']

    def plain(obj):
        return all(plain(v) for v in obj.values()) if type(obj) is dict else \
            all(plain(v) for v in obj) if type(obj) is list else not isinstance(obj, (dict, list, tuple))

    assert plain(opt)


def test_base_list_and_delete(tmp_path):
    _write(tmp_path / 'a.yml', 'network_g: {type: EDSR, num_feat: 64, num_block: 16}\n')
    _write(tmp_path / 'b.yml', 'datasets: {train: {type: PairedImageDataset, gt_size: 96}}\n')
    child = _write(tmp_path / 'c.yml', """\
        _base_: [a.yml, b.yml]
        network_g: {_delete_: true, type: RRDBNet, num_feat: 8}
        datasets: {train: {gt_size: 48}}
        """)
    assert load_options(child) == {
        'network_g': {'type': 'RRDBNet', 'num_feat': 8},
        'datasets': {'train': {'type': 'PairedImageDataset', 'gt_size': 48}},
    }


def test_file_without_base_is_read_as_is(tmp_path):
    path = _write(tmp_path / 'o.yaml', 'b: 1\na: {y: 2, x: [1, 2]}\nlr: !!float 1e-4\n')
    opt = load_options(path)
    assert opt == {'b': 1, 'a': {'y': 2, 'x': [1, 2]}, 'lr': 1e-4}
    assert list(opt) == ['b', 'a', 'lr']


def test_written_options_read_back_by_basicsr_loader(tmp_path):
    from basicsr.utils.options import ordered_yaml
    import yaml
    opt = {'name': 'n', 'lr': 2e-4, 'none': None, 'tmpl': '{}', 'nested': {'list': [0.9, 0.99], 'flag': True},
           'text': '1e-4', 'tilde': '~'}
    path = write_options(opt, tmp_path / 'w.yml', header=['a comment line'])
    assert path.read_text().startswith('# a comment line\n')
    with open(path) as f:
        back = yaml.load(f, Loader=ordered_yaml()[0])
    assert back == opt and list(back) == list(opt)


@pytest.mark.parametrize('text, reason', [
    ('a: [1, 2\n', 'invalid YAML'),
    ('', 'got nothing'),
    ('- 1\n- 2\n', 'got list'),
    ('_base_: missing_base.yml\nname: x\n', 'missing_base.yml'),
])
def test_unreadable_option_files(tmp_path, text, reason):
    path = _write(tmp_path / 'bad.yml', text)
    with pytest.raises(OptionsError) as err:
        load_options(path)
    assert str(err.value).startswith(f"option file '{path}': ") and reason in str(err.value)
    assert '\n' not in str(err.value)


def test_missing_and_non_yaml_files(tmp_path):
    with pytest.raises(OptionsError, match="option file '.*nope.yml': no such file"):
        load_options(tmp_path / 'nope.yml')
    with pytest.raises(OptionsError, match='expected a YAML file'):
        load_options(_write(tmp_path / 'o.py', 'x = 1\n'))


# ----------------------------------------------------------------------------------------------
# validation
def test_valid_options_pass():
    validate_options(_valid_options(), 'o.yml', 'train')
    opt = _valid_options()
    del opt['train'], opt['logger']
    validate_options(opt, 'o.yml', 'test')


@pytest.mark.parametrize('change, where, bad, hint', [
    ({'model_type': 'SRModle'}, 'model_type', 'SRModle', 'SRModel'),
    ({'network_g': {'type': 'edsr'}}, 'network_g.type', 'edsr', 'EDSR'),
    ({'network_g': {'type': 'LIIF', 'encoder': {'type': 'EDSREncodr'}}}, 'network_g.encoder.type', 'EDSREncodr',
     'EDSREncoder'),
    ({'network_d': {'type': 'VGGStyleDiscriminatr'}}, 'network_d.type', 'VGGStyleDiscriminatr',
     'VGGStyleDiscriminator'),
    ({'datasets': {'train': {'type': 'PairedImageDatset'}}}, 'datasets.train.type', 'PairedImageDatset',
     'PairedImageDataset'),
    ({'train': {'pixel_opt': {'type': 'L1loss'}}}, 'train.pixel_opt.type', 'L1loss', 'L1Loss'),
    ({'val': {'metrics': {'psnr': {'type': 'calculate_psnrr'}}}}, 'val.metrics.psnr.type', 'calculate_psnrr',
     'calculate_psnr'),
    ({'train': {'optim_g': {'type': 'Adamw'}}}, 'train.optim_g.type', 'Adamw', 'AdamW'),
])
def test_unknown_types_are_named(change, where, bad, hint):
    with pytest.raises(OptionsError) as err:
        validate_options(_valid_options(**change), 'opts/o.yml', 'train')
    msg = str(err.value)
    assert msg.startswith(f"option file 'opts/o.yml': {where}: unknown ") and f"'{bad}'" in msg
    assert f"'{hint}'" in msg.split('did you mean', 1)[1]
    assert '\n' not in msg


def test_unknown_type_without_close_name():
    with pytest.raises(OptionsError) as err:
        validate_options(_valid_options(network_g={'type': 'Zzzzqqq'}), 'o.yml')
    assert "network_g.type: unknown arch type 'Zzzzqqq'" in str(err.value) and 'did you mean' not in str(err.value)


def test_missing_required_keys():
    opt = _valid_options()
    del opt['name'], opt['path']
    with pytest.raises(OptionsError, match=r"option file 'o.yml': missing required top-level key\(s\): name, path$"):
        validate_options(opt, 'o.yml', 'train')
    opt = _valid_options()
    del opt['val']
    validate_options(opt, 'o.yml', 'train')  # val is optional for training ...
    with pytest.raises(OptionsError, match='missing required top-level key.*: val$'):
        validate_options(opt, 'o.yml', 'test')  # ... but test.py reads val.save_img


def test_dataset_without_type():
    with pytest.raises(OptionsError, match=r"datasets.val_1: expected a mapping with a 'type'"):
        validate_options(_valid_options(datasets={'val_1': {'name': 'v'}}), 'o.yml')


def test_direct_bases(tmp_path):
    from ciisr_plugin.config import direct_bases
    assert direct_bases(_write(tmp_path / 'plain.yml', 'name: x\n')) is None
    assert direct_bases(_write(tmp_path / 'one.yml', '_base_: sub/../a.yml\n')) == [str(tmp_path / 'a.yml')]
    assert direct_bases(_write(tmp_path / 'two.yml', '_base_: [a.yml, /abs/b.yml]\n')) == \
        [str(tmp_path / 'a.yml'), '/abs/b.yml']


def test_mmengine_base_variables(tmp_path):
    # mmengine's {{ _base_.key }} placeholders (unquoted: not plain YAML) are resolved
    _write(tmp_path / 'a.yml', 'scale: 4\nnetwork_g: {type: EDSR}\n')
    child = _write(tmp_path / 'c.yml', '_base_: a.yml\nnetwork_g: {upscale: {{ _base_.scale }}}\n')
    assert load_options(child) == {'scale': 4, 'network_g': {'type': 'EDSR', 'upscale': 4}}


def test_a_chunk_size_under_network_g_moves_to_val():
    # older option files set it on the network; the renderer reads val.chunk_size, and an
    # explicit val value wins
    opt = {'network_g': {'type': 'LIIF', 'chunk_size': 300}, 'val': {}}
    assert 'moved to val' in render_options_to_val(opt)
    assert opt == {'network_g': {'type': 'LIIF'}, 'val': {'chunk_size': 300}}
    opt = {'network_g': {'type': 'LIIF', 'chunk_size': 300}, 'val': {'chunk_size': 64}}
    render_options_to_val(opt)
    assert opt['val'] == {'chunk_size': 64} and 'chunk_size' not in opt['network_g']
    assert render_options_to_val({'network_g': {'type': 'LIIF'}, 'val': {}}) is None

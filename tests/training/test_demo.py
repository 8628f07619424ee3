"""The README's demo, for real: train on the bundled photos, beat bicubic on held-out ones."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

SUMMARY = re.compile(r'^\s*(x[\d.x]+): psnr ([\d.]+) \(bicubic ([\d.]+)\)', re.M)


def run_basicsr(args, cwd, env):
    # the timeout only catches a hang: a demo took 2-3 min on a 2-core AMD EPYC with AVX-512 (and
    # 4-5 min there with torch held to AVX2); the slowest CPU seen so far was ~3x slower than that
    proc = subprocess.run([sys.executable, '-m', 'ciisr_plugin', *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def summary(log):
    return {label: (float(ours), float(bic)) for label, ours, bic in SUMMARY.findall(log)}


def train_demo(recipe, tmp_path):
    env = dict(os.environ, CIISR_DATA_HOME=str(tmp_path / 'data'))
    log = run_basicsr(['train', '-opt', str(REPO / 'options/demo' / recipe)], tmp_path, env)
    losses = [float(v) for v in re.findall(r'l_pix: ([\d.e+-]+)', log)]
    assert len(losses) >= 10 and sum(losses[-5:]) < sum(losses[:5]), losses  # L1 went down
    results = summary(log)
    assert {'x2', 'x3', 'x4', 'x2.5'} <= set(results), log[-3000:]
    for label in ('x2', 'x3', 'x4'):
        ours, bicubic = results[label]
        assert ours > bicubic, f'{recipe} {label}: {ours} dB <= bicubic {bicubic} dB'
    return env, results


@pytest.mark.slow
def test_demo_trains_and_beats_bicubic(tmp_path):
    env, results = train_demo('train_liif_demo.yml', tmp_path)

    # the test recipe reloads the self-describing checkpoint and writes the report
    log = run_basicsr(['test', '-opt', str(REPO / 'options/demo/test_liif_demo.yml')], tmp_path, env)
    assert summary(log)['x2'][0] == pytest.approx(results['x2'][0], abs=1e-4)
    report = tmp_path / 'results' / 'demo_LIIF_skimage_test'
    table = (report / 'results.md').read_text()
    assert '| skimage_val | x2 |' in table and '| skimage_val | x2x3 |' in table
    assert (report / 'metric_vs_scale.png').stat().st_size > 1000


@pytest.mark.slow
def test_aliif_demo_trains_and_beats_bicubic(tmp_path):
    train_demo('train_aliif_demo.yml', tmp_path)

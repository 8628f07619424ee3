"""What the benchmark scripts share: one measurement in its own process.

Each measurement runs in a fresh subprocess, so that its peak RSS is its own; the child prints
its stats as the last line of stdout (JSON) and saves its tensors to a file.
"""
import json
import os
import subprocess

import torch


def run_child(cmd, out_path, what, omp_wait_policy=''):
    """Run ``cmd``; returns (its stats, the tensors it saved to ``out_path``). ``what`` names the
    measurement in the error when the child fails."""
    env = dict(os.environ)
    if omp_wait_policy:
        env['OMP_WAIT_POLICY'] = omp_wait_policy
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f'{what} failed:\n{res.stderr[-4000:]}')
    return json.loads(res.stdout.strip().splitlines()[-1]), torch.load(out_path)

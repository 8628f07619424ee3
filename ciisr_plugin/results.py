"""Test reports: a markdown table (dataset x scale x metric) and a metric-vs-scale plot."""
import os
from collections import OrderedDict


def scale_label(scale):
    """``[3, 3]`` -> 'x3', ``[2, 3.5]`` -> 'x2x3.5': how scales are named in logs and reports."""
    sh, sw = (float(s) for s in scale)
    return f'x{sh:g}' if sh == sw else f'x{sh:g}x{sw:g}'


def results_table(results):
    """Markdown table with one row per (dataset, scale), in the order tested."""
    metrics = list(OrderedDict.fromkeys(m for r in results for m in r['metrics']))
    lines = ['| dataset | scale | ' + ' | '.join(metrics) + ' |', '|---|---|' + '---|' * len(metrics)]
    for r in results:
        values = [f"{r['metrics'][m]:.4f}" if m in r['metrics'] else '' for m in metrics]
        lines.append(f"| {r['dataset']} | {scale_label(r['scale'])} | " + ' | '.join(values) + ' |')
    return '\n'.join(lines) + '\n'


def plot_metric_vs_scale(results, path, metric=None):
    """One line per dataset: ``metric`` (default: the first PSNR-like one) against the scale."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt

    names = list(OrderedDict.fromkeys(m for r in results for m in r['metrics']))
    if not names:
        return None
    metric = metric or next((m for m in names if 'psnr' in m.lower()), names[0])
    fig, ax = plt.subplots(figsize=(6, 4))
    for dataset in OrderedDict.fromkeys(r['dataset'] for r in results):
        points = sorted((float(r['scale'][0]), r['metrics'][metric]) for r in results
                        if r['dataset'] == dataset and metric in r['metrics'] and r['scale'][0] == r['scale'][1])
        if points:
            ax.plot(*zip(*points), marker='o', label=dataset)
    ax.set_xlabel('scale')
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_results_report(results, root, name):
    """Write ``results.md`` and ``<metric>_vs_scale.png`` under ``root`` (results/<name>/)."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, 'results.md'), 'w') as f:
        f.write(f'# {name}\n\n' + results_table(results))
    plot_metric_vs_scale(results, os.path.join(root, 'metric_vs_scale.png'))

"""``basicsr export``: a model's query function as an ONNX graph.

    basicsr export --model CKPT -o model.onnx [--opset N]

The graph is ``(lq, coord, cell) -> rgb`` with the query contract of
:class:`~ciisr_plugin.archs.implicit_query.ImplicitSRNet`: ``lq`` (B, 3, h, w) in [0, 1],
``coord`` / ``cell`` (B, N, 2) in (row, col) order, ``rgb`` (B, N, 3). Batch, LR height and
width and the number of queries are all dynamic. The nearest-latent lookup exports as ONNX
``GridSample`` (mode nearest, opset 16+); torch's exporter writes opset 18 and newer (its
conversion to older opsets fails on this graph), so that is the minimum.

Needs the optional ``onnx`` extra (``pip install -e ".[onnx]"``: onnx, onnxscript; add
onnxruntime to run the graph).
"""
import contextlib
import io
import warnings

from torch import nn

from ..fileio import replaced_atomically

MIN_OPSET = 18
DEFAULT_OPSET = 18
INPUT_NAMES = ('lq', 'coord', 'cell')
PROG = 'basicsr export'


class ExportError(ValueError):
    """Bad input to ``basicsr export``; reported as one line, exit status 2."""


class QueryFunction(nn.Module):
    """``forward(lq, coord, cell) -> rgb`` of an implicit SR net, as one traceable module."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, lq, coord, cell):
        return self.net(lq, coord, cell)


def export_onnx(net, path, opset=DEFAULT_OPSET):
    """Write ``net``'s query function to ``path`` (temporary name + rename)."""
    import torch
    from torch.export import Dim
    if int(opset) < MIN_OPSET:
        raise ExportError(f'--opset {opset}: the exporter writes opset {MIN_OPSET} or newer')
    try:
        import onnx
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ExportError(f'ONNX export needs the onnx extra (pip install "ciisr[onnx]"): {err}') from None

    module = QueryFunction(net).eval()
    # torch.export specialises dimensions whose example size is 0 or 1: use 2+ everywhere
    example = (torch.rand(2, 3, 6, 5), torch.rand(2, 7, 2) * 2 - 1, torch.full((2, 7, 2), 0.1))
    batch, queries = Dim('batch'), Dim('queries')
    dynamic = {'lq': {0: batch, 2: Dim('height'), 3: Dim('width')}, 'coord': {0: batch, 1: queries},
               'cell': {0: batch, 1: queries}}
    with replaced_atomically(path, '.onnx') as tmp:
        # the exporter narrates its passes on stdout and warns about merged axis names
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            torch.onnx.export(module, example, tmp, dynamo=True, opset_version=int(opset), input_names=INPUT_NAMES,
                              output_names=['rgb'], dynamic_shapes=dynamic, external_data=False, verbose=False)
        graph = onnx.load(tmp, load_external_data=False)
        written = max(o.version for o in graph.opset_import if o.domain in ('', 'ai.onnx'))
        if written != int(opset):
            raise ExportError(f'--opset {opset}: the exporter could only write opset {written}')
    return path


def add_arguments(parser):
    parser.add_argument('--model', required=True, metavar='CKPT',
                        help="checkpoint: this plugin's or the LIIF / A-LIIF authors'")
    parser.add_argument('-o', '--output', required=True, metavar='OUT.onnx', help='where to write the ONNX graph')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET,
                        help=f'ONNX opset (>= {MIN_OPSET}; default {DEFAULT_OPSET})')
    parser.add_argument('--allow-pickle', action='store_true',
                        help='allow unpickling arbitrary objects in the checkpoint (only for files you trust)')


def run(args):
    """Exit status 0; bad input raises (``basicsr``'s entry point reports it in one line, status 2)."""
    from ..archs.implicit_query import ImplicitSRNet
    from ..checkpoint import load_model
    if not args.output.lower().endswith('.onnx'):
        raise ExportError(f"-o {args.output}: the output name must end in '.onnx'")
    if args.opset < MIN_OPSET:
        raise ExportError(f'--opset {args.opset}: the exporter writes opset {MIN_OPSET} or newer')
    net = load_model(args.model, allow_pickle=args.allow_pickle)
    if not isinstance(net, ImplicitSRNet):
        raise ExportError(f'{args.model}: {type(net).__name__} has no query function to export '
                          '(only implicit models such as LIIF / A-LIIF)')
    export_onnx(net, args.output, args.opset)
    print(f'wrote {args.output} (opset {args.opset}; inputs lq (B,3,h,w), coord (B,N,2), cell (B,N,2))')
    return 0

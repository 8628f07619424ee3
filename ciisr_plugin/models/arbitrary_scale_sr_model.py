"""Training and evaluation of implicit (arbitrary-scale) SR networks inside BasicSR."""
import copy
import math
from collections import OrderedDict
from os import path as osp

import torch
from tqdm import tqdm

from basicsr.data import build_dataloader, build_dataset
from basicsr.metrics import calculate_metric
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, imwrite, tensor2img
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY

from ciisr_plugin.archs.fixed_scale_arch import pil_bicubic_resize
from ciisr_plugin.checkpoint import (NETWORK_OPT_KEY, CheckpointError, convert_authors_checkpoint,
                                     is_authors_checkpoint, load_state_dict_exact, read_checkpoint, save_atomic)
from ciisr_plugin.config import to_plain
from ciisr_plugin.inference import check_pad_to_window, upscale_tiled
from ciisr_plugin.resume import rng_states, set_rng_states
from ciisr_plugin.results import scale_label, write_results_report

# Metrics that follow the LIIF paper's float protocol take the float RGB tensors in [0, 1]
# instead of BasicSR's quantised BGR uint8 images.
FLOAT_METRICS = {'calculate_psnr_liif', 'calculate_lpips'}


def eval_protocol(val_opt):
    """``(cell_clip_scale_max, pad_to_window)`` from the ``val`` options: the LTE authors'
    evaluation (their ``test.py --scale_max 4 --window 8``); ``(None, 0)`` = the LIIF
    authors' (no cell clipping, no padding). ValueError naming the option if malformed."""
    val_opt = val_opt or {}
    scale_max = val_opt.get('cell_clip_scale_max')
    if scale_max is not None:
        if isinstance(scale_max, bool) or not isinstance(scale_max, (int, float)) or not 0 < scale_max < math.inf:
            raise ValueError('val.cell_clip_scale_max must be a positive number (the largest training scale, e.g. '
                             f'4; null: no cell clipping), got {scale_max!r}')
    return scale_max, check_pad_to_window(val_opt.get('pad_to_window'), 'val.pad_to_window')


def clipped_cell_scale(scale, scale_max):
    """Per-axis factors ``max(s / scale_max, 1)`` on the query cell (the LTE authors' cell
    clipping: beyond ``scale_max`` the cell stays that of ``scale_max``); None without clipping."""
    if scale_max is None:
        return None
    return tuple(max(s / scale_max, 1) for s in scale)


@MODEL_REGISTRY.register()
class ArbitraryScaleSRModel(SRModel):
    """SR model for networks queried at continuous coordinates (LIIF family).

    Training batches carry ``lq``, ``coord``, ``cell`` and ``gt`` (``(B, Q, 3)`` sampled pixels,
    or ``(B, 3, P, P)`` random-group patches, which also allow ``perceptual_opt``).
    Evaluation renders the whole image with ``net.upscale`` (chunked queries) at the GT size.
    A validation/test dataset may list several scales (``scales: [2, 3, 4, 3.5]``): it is
    evaluated once per scale and reported as ``<name>_x<scale>``. With ``val.bicubic_baseline``
    every metric is also computed for bicubic interpolation of the same input, measured the
    same way, and logged beside the model's. ``val.cell_clip_scale_max`` and ``val.pad_to_window``
    switch to the LTE authors' protocol (cell clipping, window padding; see :func:`eval_protocol`
    and :func:`~ciisr_plugin.inference.upscale_tiled`); the bicubic baseline is unaffected.
    Saved checkpoints are self-describing: they carry ``network_g`` (see ``load_model``).
    """

    def __init__(self, opt):
        # the evaluation protocol options fail before any network is built
        self.cell_clip_scale_max, self.pad_to_window = eval_protocol(opt.get('val'))
        super().__init__(opt)

    # ------------------------------------------------------------------ data
    def feed_data(self, data):
        self.lq = data['lq'].to(self.device)
        self.coord = data['coord'].to(self.device) if 'coord' in data else None
        self.cell = data['cell'].to(self.device) if 'cell' in data else None
        self.scale = data['scale'][0].tolist() if 'scale' in data else None
        if 'gt' in data:
            self.gt = data['gt'].to(self.device)

    @staticmethod
    def as_gt_layout(pred, gt):
        """(B, Q, 3) predictions in the layout of ``gt``: sampled pixels or a (B, 3, P, P) patch."""
        if gt.dim() == 4:
            b, c, p, q = gt.shape
            return pred.transpose(1, 2).reshape(b, c, p, q)
        return pred

    # ------------------------------------------------------------------ training
    def optimize_parameters(self, current_iter):
        self.optimizer_g.zero_grad()
        self.output = self.as_gt_layout(self.net_g(self.lq, self.coord, self.cell), self.gt)

        l_total = 0
        loss_dict = OrderedDict()
        if self.cri_pix:
            l_pix = self.cri_pix(self.output, self.gt)
            l_total += l_pix
            loss_dict['l_pix'] = l_pix
        if self.cri_perceptual:
            if self.gt.dim() != 4:
                raise ValueError('train.perceptual_opt needs image patches: set group_size in the train dataset '
                                 '(random group sampling)')
            l_percep, l_style = self.cri_perceptual(self.output, self.gt)
            if l_percep is not None:
                l_total += l_percep
                loss_dict['l_percep'] = l_percep
            if l_style is not None:
                l_total += l_style
                loss_dict['l_style'] = l_style

        l_total.backward()
        self.optimizer_g.step()
        self.log_dict = self.reduce_loss_dict(loss_dict)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    # ------------------------------------------------------------------ inference
    def output_size(self):
        if hasattr(self, 'gt') and self.gt is not None and self.gt.dim() == 4:
            return tuple(self.gt.shape[-2:])
        sh, sw = self.scale
        return round(self.lq.shape[-2] * sh), round(self.lq.shape[-1] * sw)

    def test(self):
        net = self.net_g_ema if hasattr(self, 'net_g_ema') else self.get_bare_model(self.net_g)
        was_training = net.training
        net.eval()
        size = self.output_size()
        # val.cell_clip_scale_max: the dataset's (nominal) scale, else the size ratio
        scale = self.scale or [size[0] / self.lq.shape[-2], size[1] / self.lq.shape[-1]]
        with torch.no_grad():
            # the renderer basicsr upscale uses (bounded memory, every core); val.chunk_size = queries per block
            self.output = upscale_tiled(net, self.lq, size, chunk_size=(self.opt.get('val') or {}).get('chunk_size'),
                                        cell_scale=clipped_cell_scale(scale, self.cell_clip_scale_max),
                                        pad_to_window=self.pad_to_window)
        net.train(was_training)

    # ------------------------------------------------------------------ validation
    def validation(self, dataloader, current_iter, tb_logger, save_img=False):
        dataset_opt = dataloader.dataset.opt
        scales = dataset_opt.get('scales')
        if not scales:
            return super().validation(dataloader, current_iter, tb_logger, save_img)
        summary = []
        for scale in scales:
            opt = copy.deepcopy(dataset_opt)
            opt.pop('scales')
            opt['scale'] = scale
            opt['name'] = f"{dataset_opt['name']}_{scale_label(scale if isinstance(scale, list) else [scale] * 2)}"
            loader = build_dataloader(build_dataset(opt), opt, num_gpu=self.opt['num_gpu'], dist=False, sampler=None,
                                      seed=self.opt.get('manual_seed'))
            super().validation(loader, current_iter, tb_logger, save_img)
            if getattr(self, 'bicubic_results', None):
                summary.append((opt['name'].rsplit('_', 1)[-1], dict(self.metric_results), self.bicubic_results))
        if summary and self.opt['rank'] == 0:
            lines = [f"{label}: " + ', '.join(f'{m} {ours[m]:.4f} (bicubic {bic[m]:.4f})' for m in ours)
                     for label, ours, bic in summary]
            get_root_logger().info(f"Summary {dataset_opt['name']} at iter {current_iter}, model vs bicubic "
                                   'interpolation (same protocol):\n\t' + '\n\t'.join(lines))

    def dist_validation(self, dataloader, current_iter, tb_logger, save_img):
        if self.opt['rank'] == 0:
            self.nondist_validation(dataloader, current_iter, tb_logger, save_img)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        dataset_name = dataloader.dataset.opt['name']
        metrics_opt = self.opt['val'].get('metrics') or {}
        with_bicubic = bool(self.opt['val'].get('bicubic_baseline')) and bool(metrics_opt)
        if metrics_opt:
            self._initialize_best_metric_results(dataset_name)
        self.metric_results = {metric: 0.0 for metric in metrics_opt}
        bicubic_results = {metric: 0.0 for metric in metrics_opt}
        pbar = tqdm(total=len(dataloader), unit='image', desc=dataset_name) if self.opt['val'].get('pbar') else None

        num = 0
        for val_data in dataloader:
            img_name = osp.splitext(osp.basename(val_data['lq_path'][0]))[0]
            self.gt = None
            self.feed_data(val_data)
            self.test()
            sr = self.output.detach().clamp(0, 1).cpu()
            sr_img = tensor2img([sr])
            if self.gt is not None and metrics_opt:
                gt = self.gt.detach().cpu()
                self._accumulate_metrics(self.metric_results, sr, sr_img, gt, metrics_opt)
                if with_bicubic:
                    bicubic = pil_bicubic_resize(self.lq, gt.shape[-2:]).cpu().clamp(0, 1)
                    self._accumulate_metrics(bicubic_results, bicubic, tensor2img([bicubic]), gt, metrics_opt)
            if save_img:
                self._save_image(sr_img, img_name, dataset_name, current_iter)
            num += 1
            del self.lq, self.output, self.gt
            if pbar:
                pbar.update(1)
        if pbar:
            pbar.close()

        if metrics_opt and num:
            for metric in self.metric_results:
                self.metric_results[metric] /= num
                self._update_best_metric_result(dataset_name, metric, self.metric_results[metric], current_iter)
            self._log_validation_metric_values(current_iter, dataset_name, tb_logger)
            self.bicubic_results = {m: v / num for m, v in bicubic_results.items()} if with_bicubic else None
            if with_bicubic:
                values = '\t'.join(f'# {m}: {v:.4f}' for m, v in self.bicubic_results.items())
                get_root_logger().info(f'Validation {dataset_name} (bicubic interpolation, same protocol)\n\t {values}')
            if not self.opt['is_train']:
                self._record_test_results(dataset_name, dataloader.dataset.opt)

    def _accumulate_metrics(self, results, sr, sr_img, gt, metrics_opt):
        uint8_data = {'img': sr_img, 'img2': tensor2img([gt])}
        float_data = {'img': sr, 'img2': gt, 'scale': self.scale}
        for name, metric_opt in metrics_opt.items():
            data = float_data if metric_opt['type'] in FLOAT_METRICS else uint8_data
            results[name] += float(calculate_metric(data, metric_opt))

    def _save_image(self, img, img_name, dataset_name, current_iter):
        if self.opt['is_train']:
            path = osp.join(self.opt['path']['visualization'], img_name, f'{img_name}_{current_iter}.png')
        else:
            suffix = self.opt['val'].get('suffix') or self.opt['name']
            path = osp.join(self.opt['path']['visualization'], dataset_name, f'{img_name}_{suffix}.png')
        imwrite(img, path)

    def _record_test_results(self, dataset_name, dataset_opt):
        """Keep every test result and rewrite results/<name>/results.md and the plot."""
        if not hasattr(self, 'test_results'):
            self.test_results = []
        scale = dataset_opt.get('scale')
        self.test_results.append({
            'dataset': dataset_opt.get('report_name', dataset_name.rsplit('_x', 1)[0]),
            'scale': scale if isinstance(scale, (list, tuple)) else [scale, scale],
            'metrics': dict(self.metric_results),
        })
        write_results_report(self.test_results, self.opt['path']['results_root'], self.opt['name'])

    # ------------------------------------------------------------------ loading / saving
    def load_network(self, net, load_path, strict=True, param_key='params'):
        """BasicSR's ``load_network`` (same keys, logs and ``params_ema`` -> ``params`` fallback)
        reading with ``weights_only=True`` and reporting an unreadable file, a pickle needing
        code or (strict) a checkpoint of another network as one-line :class:`CheckpointError`
        naming the file, where 1.4.2 ends in a trace (``pretrain_network_*``, resume)."""
        net = self.get_bare_model(net)
        ckpt = read_checkpoint(load_path)
        if is_authors_checkpoint(ckpt):  # the LIIF / A-LIIF authors' layout, renamed to ours
            _, ckpt = convert_authors_checkpoint(ckpt)
            param_key = "authors' sd"
        elif param_key is not None:
            if not isinstance(ckpt, dict):
                raise CheckpointError(f'{load_path}: expected a dict checkpoint, got {type(ckpt).__name__}')
            if param_key not in ckpt and 'params' in ckpt:
                param_key = 'params'
                get_root_logger().info('Loading: params_ema does not exist, use params.')
            if not isinstance(ckpt.get(param_key), dict):
                raise CheckpointError(f"{load_path}: no '{param_key}' state dict (top-level keys: "
                                      f'{sorted(map(str, ckpt))[:8]})')
            ckpt = ckpt[param_key]
        state = OrderedDict((k[7:] if k.startswith('module.') else k, v) for k, v in ckpt.items())
        get_root_logger().info(f'Loading {net.__class__.__name__} model from {load_path}, with param key: '
                               f'[{param_key}].')
        if strict:
            load_state_dict_exact(net, state, load_path)
        else:
            self._print_different_keys_loading(net, state, strict)
            net.load_state_dict(state, strict=False)

    def network_options(self):
        return to_plain(self.opt['network_g'])

    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        """BasicSR's layout (``params`` / ``params_ema``) plus ``network_g`` for ``net_g``, written
        atomically (temp file, fsync, rename) so a killed run never leaves a truncated file."""
        label = 'latest' if current_iter == -1 else current_iter
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        ckpt = {}
        for net_, key in zip(nets, keys):
            state = self.get_bare_model(net_).state_dict()
            ckpt[key] = OrderedDict((k[7:] if k.startswith('module.') else k, v.cpu()) for k, v in state.items())
        if net_label == 'net_g':
            ckpt[NETWORK_OPT_KEY] = self.network_options()
        save_atomic(ckpt, osp.join(self.opt['path']['models'], f'{net_label}_{label}.pth'))

    def save_training_state(self, epoch, current_iter):
        """BasicSR's state (epoch, iter, optimizers, schedulers) plus every process's RNG states
        (python, numpy, torch, CUDA), written atomically by rank 0. BasicSR 1.4.2 saves no RNG
        state; with them (and the sampler's in-epoch resume, ``resume.ResumableSampler``) a
        resumed run continues exactly as an uninterrupted one. Called on every rank: the RNG
        states are gathered (a collective), so it is not ``master_only``."""
        if current_iter == -1:
            return
        rng = rng_states()
        if self.opt['dist']:
            import torch.distributed as dist
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        if self.opt['rank'] != 0:
            return
        state = {
            'epoch': epoch,
            'iter': current_iter,
            'optimizers': [o.state_dict() for o in self.optimizers],
            'schedulers': [s.state_dict() for s in self.schedulers],
            'rng_states': gathered,  # one per rank
        }
        save_atomic(state, osp.join(self.opt['path']['training_states'], f'{current_iter}.state'))

    def resume_training(self, resume_state):
        """BasicSR's resume (optimizers, schedulers), then this rank's RNG states when saved by
        the same number of processes (else a warning: the run goes on, not bit-identical)."""
        super().resume_training(resume_state)
        saved = resume_state.get('rng_states')
        world_size = self.opt.get('world_size', 1)
        if saved and len(saved) == world_size:
            set_rng_states(saved[self.opt.get('rank', 0)])
        else:
            get_root_logger().warning(f'Resume state has RNG states of {len(saved or [])} process(es), this run has '
                                      f'{world_size}: random number streams are not restored.')


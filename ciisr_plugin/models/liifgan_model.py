"""Adversarial training of LIIF-GAN / LIIF-GAN-S (Shin & Jo, BMVC 2022) inside BasicSR.

BasicSR's ``SRGANModel`` supplies the discriminator, the GAN / perceptual / pixel losses,
both optimizers, ``net_d_iters`` / ``net_d_init_iters``, EMA and saving of ``net_d``;
``ArbitraryScaleSRModel`` supplies the query batches, evaluation with ``net.upscale``, the
multi-scale validation and the self-describing checkpoints. Only the training step is new.
"""
from collections import OrderedDict
from os import path as osp

import torch

from basicsr.models.srgan_model import SRGANModel
from basicsr.utils.registry import MODEL_REGISTRY

from ciisr_plugin import losses  # noqa: F401  (registers LocalWeightsPerceptualLoss)
from ciisr_plugin.losses.perceptual_loss import hub_cache_path, vgg_weights_filename
from .arbitrary_scale_sr_model import ArbitraryScaleSRModel


@MODEL_REGISTRY.register()
class LIIFGANModel(ArbitraryScaleSRModel, SRGANModel):
    """LIIF-GAN's losses on random-group patches (``gt`` (B, 3, P, P)).

    Two decoders (``network_g: {type: LIIFGAN, dual_decoder: true}``):

    * ``l_pix = pixel_opt(IP_1, IP_gt)`` - the only term decoder 1 learns from;
    * ``l_percep = perceptual_opt(IP_1.detach() + IP_2, IP_gt)`` and
      ``l_g_gan = gan_opt(D(IP_1.detach() + IP_2))`` - the paper's gradient blocking: these
      terms reach decoder 2 (and the encoder, see below) but never decoder 1;
    * the discriminator sees ``IP_gt`` against ``IP_1 + IP_2``.

    One decoder (``dual_decoder: false``, LIIF-GAN-S): all three terms on its output.

    ``train.encoder_adv_grad`` (default true): whether the GAN / perceptual gradient reaches
    the encoder. The paper blocks it only at decoder 1 and minimises ``L_D1 + L_D2`` over the
    whole model; with decoder 1 on the mid feature, the encoder layers above the mid layer
    feed only decoder 2, so this gradient is their only training signal. ``false`` detaches
    the feature decoder 2 reads, so the encoder learns from L1 alone; that leaves no signal
    for those upper layers, so it needs ``decoder1_feature: last``, and it needs two
    decoders (one decoder cannot give L1 and GAN gradients different paths).

    ``network_d``: any BasicSR discriminator taking the P x P patches. ``UNetDiscriminatorSN``
    takes any size divisible by 8 (P = 48 fits); ``VGGStyleDiscriminator`` only 128 or 256.
    ``perceptual_opt``: ``LocalWeightsPerceptualLoss`` (BasicSR's ``PerceptualLoss`` reading
    the VGG file locally); plain ``PerceptualLoss`` is checked for its file before it would
    try to download it.
    """

    def init_training_settings(self):
        train_opt = self.opt['train']
        net = self.get_bare_model(self.net_g)
        if not hasattr(net, 'forward_parts'):
            raise ValueError(f"LIIFGANModel: network_g must be a LIIFGAN arch, got '{self.opt['network_g']['type']}'")
        if not self.opt.get('network_d'):
            raise ValueError('LIIFGANModel: the options need network_d (the discriminator), e.g. '
                             '{type: UNetDiscriminatorSN, num_in_ch: 3, num_feat: 64}')
        if not train_opt.get('gan_opt'):
            raise ValueError('LIIFGANModel: train.gan_opt is required, e.g. {type: GANLoss, gan_type: vanilla}')
        if net.dual_decoder and not train_opt.get('pixel_opt'):
            raise ValueError('LIIFGANModel: train.pixel_opt is required with two decoders: it is the only loss '
                             'decoder 1 learns from (the paper: L1)')
        self.encoder_adv_grad = train_opt.get('encoder_adv_grad', True)
        if not isinstance(self.encoder_adv_grad, bool):
            raise ValueError(f'train.encoder_adv_grad: expected true or false, got {self.encoder_adv_grad!r}')
        if not self.encoder_adv_grad:
            if not net.dual_decoder:
                raise ValueError('train.encoder_adv_grad: false needs two decoders (dual_decoder true): with one '
                                 'decoder the L1 and GAN/perceptual gradients reach the encoder the same way')
            if net.reads_mid:
                raise ValueError("train.encoder_adv_grad: false with decoder1_feature 'mid' would leave the encoder "
                                 'layers after mid_layer without any gradient; use decoder1_feature: last, or '
                                 'encoder_adv_grad: true')
        _check_offline_vgg(train_opt.get('perceptual_opt'))
        super().init_training_settings()

    # ------------------------------------------------------------------ training
    def forward_generator(self):
        """Run net_g on the current batch: ``self.output_d1`` = IP_1 and ``self.output`` = the
        image the GAN / perceptual losses and the discriminator see, both (B, 3, P, P)."""
        if self.gt.dim() != 4:
            raise ValueError('LIIFGANModel trains on image patches: the train dataset must use random group '
                             f'sampling (set group_size), got gt of shape {tuple(self.gt.shape)} (scattered pixels)')
        ip1, ip2 = self.net_g(self.lq, self.coord, self.cell, parts=True,
                              detach_increment_feature=not self.encoder_adv_grad)
        self.output_d1 = self.as_gt_layout(ip1, self.gt)
        if ip2 is None:  # LIIF-GAN-S
            self.output = self.output_d1
        else:  # gradient blocking: GAN / perceptual terms never reach decoder 1
            self.output = self.output_d1.detach() + self.as_gt_layout(ip2, self.gt)

    def generator_losses(self):
        """The generator's loss terms on the current batch (not summed, not backpropagated)."""
        self.forward_generator()
        loss_dict = OrderedDict()
        if self.cri_pix:
            loss_dict['l_pix'] = self.cri_pix(self.output_d1, self.gt)
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(self.output, self.gt)
            if l_percep is not None:
                loss_dict['l_percep'] = l_percep
            if l_style is not None:
                loss_dict['l_style'] = l_style
        loss_dict['l_g_gan'] = self.cri_gan(self.net_d(self.output), True, is_disc=False)
        return loss_dict

    def optimize_parameters(self, current_iter):
        for p in self.net_d.parameters():
            p.requires_grad = False
        self.optimizer_g.zero_grad()
        if current_iter % self.net_d_iters == 0 and current_iter > self.net_d_init_iters:
            loss_dict = self.generator_losses()
            sum(loss_dict.values()).backward()
            self.optimizer_g.step()
        else:  # the discriminator still needs this batch's fakes
            loss_dict = OrderedDict()
            with torch.no_grad():
                self.forward_generator()

        for p in self.net_d.parameters():
            p.requires_grad = True
        self.optimizer_d.zero_grad()
        real_d_pred = self.net_d(self.gt)
        l_d_real = self.cri_gan(real_d_pred, True, is_disc=True)
        l_d_real.backward()
        fake_d_pred = self.net_d(self.output.detach())
        l_d_fake = self.cri_gan(fake_d_pred, False, is_disc=True)
        l_d_fake.backward()
        self.optimizer_d.step()
        loss_dict['l_d_real'] = l_d_real
        loss_dict['out_d_real'] = torch.mean(real_d_pred.detach())
        loss_dict['l_d_fake'] = l_d_fake
        loss_dict['out_d_fake'] = torch.mean(fake_d_pred.detach())

        self.log_dict = self.reduce_loss_dict(loss_dict)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)


def _check_offline_vgg(perceptual_opt):
    """BasicSR's own ``PerceptualLoss`` downloads the VGG weights unless its
    ``experiments/pretrained_models/vgg19-dcbb9e9d.pth`` or the torch hub cache has them:
    name the missing file before it tries (``LocalWeightsPerceptualLoss`` checks itself)."""
    if not perceptual_opt or perceptual_opt.get('type') != 'PerceptualLoss':
        return
    from basicsr.archs import vgg_arch
    filename = vgg_weights_filename(perceptual_opt.get('vgg_type', 'vgg19'))
    if osp.isfile(vgg_arch.VGG_PRETRAIN_PATH) or osp.isfile(hub_cache_path(filename)):
        return
    raise FileNotFoundError(
        f'train.perceptual_opt: PerceptualLoss needs {filename} and cannot download it here: put it in '
        f'{osp.dirname(hub_cache_path(filename))} ($TORCH_HOME/hub/checkpoints, default '
        '~/.cache/torch/hub/checkpoints), or use type: LocalWeightsPerceptualLoss with vgg_weights_path: '
        f'/path/to/{filename}')

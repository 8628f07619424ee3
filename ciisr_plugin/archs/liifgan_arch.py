"""LIIF-GAN: realistic continuous image representation (Shin & Jo, BMVC 2022).

Two LIIF decoders share one encoder. Decoder 1 reads a mid-layer feature and is trained
with L1 only; decoder 2 reads the last-layer feature and predicts an *increment*; their
sum is the image the GAN and perceptual losses see (and the network's output). With
``dual_decoder: false`` the arch is LIIF-GAN-S: LIIF's structure, one decoder on the last
feature, trained with L1 + GAN + perceptual losses on its output.

Both decoders are :class:`~.liif_arch.MLPDecoder` driven by the shared query engine; the
mid and last features live on the same LR grid, so one :func:`lookup_latents` serves both.
:meth:`LIIFGAN.reference_query` is the paper's model written plainly (two LIIF queries, summed);
the fast path is tested equal to it.

Normalisation: decoders work in the normalised space ``(x - mean) / std``. Decoder 1's
output ``d1`` is an image there, ``IP_1 = d1 * std + mean``; decoder 2's output ``d2`` is a
difference of images, so only the scale applies: ``IP_2 = d2 * std`` (no mean). Hence
``IP_1 + IP_2 = (d1 + d2) * std + mean``, which is what :meth:`forward` returns.
"""
import inspect

from basicsr.utils.registry import ARCH_REGISTRY
from .geometry import lookup_latents
from .implicit_query import ImplicitSRNet, Prepared, decode_lookup, grid_to_rows
from .liif_arch import MLPDecoder, paper_query

DECODER1_FEATURES = ('mid', 'last')


@ARCH_REGISTRY.register()
class LIIFGAN(ImplicitSRNet):
    """LIIF-GAN (two decoders) or LIIF-GAN-S (one decoder).

    Args:
        encoder (dict): a registered encoder arch. Decoder 1 reading the mid feature needs
            one with ``forward(x, return_mid=True)`` (EDSREncoder, RDNEncoder, RCANEncoder; their
            ``mid_layer`` option picks the block).
        hidden_list (list[int]): MLP widths of each decoder; the paper uses 4 x 256.
        local_ensemble, feat_unfold, cell_decode (bool): LIIF's three design choices.
        data_mean, data_std: input normalisation ``(x - mean) / std`` (see module docstring).
        dual_decoder (bool): true = LIIF-GAN, false = LIIF-GAN-S.
        decoder1_feature (str): 'mid' (the paper) or 'last' (its "same features" ablation).
            Default 'mid' with two decoders, 'last' (the only choice) with one.

    ``forward(lq, coord, cell)`` follows the query contract and returns ``IP_1 + IP_2``;
    :meth:`forward_parts` returns the two terms for training.
    """

    def __init__(self, encoder, hidden_list=(256, 256, 256, 256), local_ensemble=True, feat_unfold=True,
                 cell_decode=True, data_mean=0.5, data_std=0.5, dual_decoder=True,
                 decoder1_feature=None, out_channels=3):
        super().__init__(encoder, local_ensemble, feat_unfold, cell_decode, data_mean, data_std)
        if decoder1_feature is None:
            decoder1_feature = 'mid' if dual_decoder else 'last'
        if decoder1_feature not in DECODER1_FEATURES:
            raise ValueError(f"LIIFGAN: decoder1_feature must be one of {', '.join(DECODER1_FEATURES)}, "
                             f'got {decoder1_feature!r}')
        if not dual_decoder and decoder1_feature != 'last':
            raise ValueError("LIIFGAN: with dual_decoder false (LIIF-GAN-S) the single decoder reads the last "
                             "feature; decoder1_feature must be 'last'")
        self.dual_decoder = bool(dual_decoder)
        self.decoder1_feature = decoder1_feature
        self.reads_mid = self.dual_decoder and decoder1_feature == 'mid'
        if self.reads_mid and 'return_mid' not in inspect.signature(self.encoder.forward).parameters:
            raise ValueError(f"LIIFGAN: decoder1_feature 'mid' needs an encoder with a mid-layer feature "
                             f"(forward(x, return_mid=True), e.g. EDSREncoder, RDNEncoder, RCANEncoder); "
                             f"'{type(self.encoder).__name__}' has none")
        channels = self.encoder.out_channels  # EDSR/RDN/RCAN mid features have the body width too
        self.decoder1 = MLPDecoder(channels, self.decoder_extra_channels, list(hidden_list), out_channels,
                                   feat_unfold)
        self.decoder2 = MLPDecoder(channels, self.decoder_extra_channels, list(hidden_list), out_channels,
                                   feat_unfold) if self.dual_decoder else None

    def reference_query(self, feats, coord, cell=None):
        """The paper's model, plainly: each decoder is LIIF's query (:func:`paper_query`) on its own
        feature, ``feats = (feature 1, feature 2 or None)`` as :meth:`encode` gives them; the output
        is ``d1 + d2`` in the normalised space (``d1`` alone with one decoder). :meth:`prepare` +
        :meth:`decode_prepared` give the same (B, N, out) faster."""
        flags = (self.local_ensemble, self.feat_unfold, self.cell_decode)
        feat1, feat2 = feats
        d1 = paper_query(feat1, coord, cell, self.decoder1.layers, *flags)
        return d1 if feat2 is None else d1 + paper_query(feat2, coord, cell, self.decoder2.layers, *flags)

    # ------------------------------------------------------------------ engine hooks
    def encode(self, lq):
        """(feature for decoder 1, feature for decoder 2 or None)."""
        x = self.encoder_input(lq)
        if self.reads_mid:
            return self.encoder(x, return_mid=True)
        last = self.encoder(x)
        return last, (last if self.dual_decoder else None)

    @property
    def decode_row_width(self):
        # the two decoders gather their rows one after the other
        decoders = [self.decoder1] + ([self.decoder2] if self.dual_decoder else [])
        return max(d.layers[0].out_features for d in decoders)

    def prepare(self, feats):
        feat1, feat2 = feats
        rows2 = None if feat2 is None else grid_to_rows(self.decoder2.grid_features(feat2))
        return Prepared((grid_to_rows(self.decoder1.grid_features(feat1)), rows2), tuple(feat1.shape[-2:]))

    def decode_parts(self, prepared, lookup):
        """Normalised-space decoder outputs ``(d1, d2)`` (d2 None with one decoder)."""
        (rows1, rows2), grid_hw = prepared
        d1 = decode_lookup(self.decoder1, rows1, lookup, grid_hw, self.cell_decode)
        d2 = None if rows2 is None else decode_lookup(self.decoder2, rows2, lookup, grid_hw, self.cell_decode)
        return d1, d2

    def decode_prepared(self, prepared, lookup):
        d1, d2 = self.decode_parts(prepared, lookup)
        return d1 if d2 is None else d1 + d2

    # ------------------------------------------------------------------ entry points
    def forward(self, lq, coord, cell=None, parts=False, detach_increment_feature=False):
        """``IP_1 + IP_2`` (B, N, 3); with ``parts=True`` the pair of :meth:`forward_parts`
        (training goes through ``forward`` so DataParallel / DDP wrappers see the call)."""
        if parts:
            return self.forward_parts(lq, coord, cell, detach_increment_feature)
        return super().forward(lq, coord, cell)

    def forward_parts(self, lq, coord, cell=None, detach_increment_feature=False):
        """``(IP_1, IP_2)``, each (B, N, 3), in image units: ``IP_1 + IP_2 == forward(...)``.

        ``IP_1 = d1 * std + mean`` (decoder 1), ``IP_2 = d2 * std`` (decoder 2's increment);
        ``IP_2`` is None with one decoder. ``detach_increment_feature``: decoder 2 reads a
        detached feature, so nothing computed from ``IP_2`` reaches the encoder.
        """
        feat1, feat2 = self.encode(lq)
        if detach_increment_feature:
            if feat2 is None:
                raise ValueError('LIIFGAN: detach_increment_feature needs the second decoder (dual_decoder true)')
            feat2 = feat2.detach()
        prepared = self.prepare((feat1, feat2))
        d1, d2 = self.decode_parts(prepared, lookup_latents(coord, cell, prepared.grid, self.local_ensemble))
        ip2 = None if d2 is None else d2 * self.data_std.view(1, 1, -1)
        return self.denormalise(d1), ip2

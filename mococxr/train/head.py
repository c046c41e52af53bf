"""The fine-tuned model: an encoder and a new linear head (:class:`Classifier`), and the loss it trains
on (:func:`masked_bce`, blind to unknown labels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Classifier(nn.Module):
    """An encoder and a new linear head; ``frozen`` keeps the encoder in eval mode without gradients.

    With ``standardize`` (config ``head: standardized``, the default) a frozen encoder's features are
    standardised by a parameter-free BatchNorm (running averages over every batch seen, no affine)
    before the linear layer, as MAE's linear probe does: the probe then does not depend on the scale of
    the features, which differs by orders of magnitude between a random, an ImageNet and a MoCo encoder
    (MoCo's own linear evaluation needs lr 30 for that reason). It is the same standardisation the fast
    linear evaluation applies, and it is still a linear model. ``standardize=False`` (``head: plain``)
    is the paper's linear model: the linear layer directly on the frozen features.
    """

    def __init__(self, encoder: nn.Module, n_out: int, *, frozen: bool, standardize: bool = True):
        super().__init__()
        self.encoder, self.frozen = encoder, frozen
        standardized = frozen and standardize
        self.norm = (
            nn.BatchNorm1d(encoder.feature_dim, affine=False, momentum=None)
            if standardized
            else nn.Identity()
        )
        self.head = nn.Linear(encoder.feature_dim, n_out)
        if frozen:
            for p in self.encoder.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # frozen BN statistics: the linear protocol never updates the backbone
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]``, or a frozen encoder's features ``[B, feature_dim]`` (the feature
        cache's)."""
        if x.dim() == 2:
            if not self.frozen:
                raise ValueError(
                    "features in place of images: only a frozen encoder's features can be cached"
                )
            return self.head(self.norm(x))
        if self.frozen:
            with torch.no_grad():
                feats = self.encoder.features(x)
        else:
            feats = self.encoder.features(x)
        return self.head(self.norm(feats))


def masked_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE over the labels that are known; NaN (U-Ignore, unknown) is masked out of the loss."""
    mask = ~torch.isnan(target)
    if not mask.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[mask], target[mask])

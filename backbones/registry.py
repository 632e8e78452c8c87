"""Hierarchical backbones by arch name, beside the ViTs of :data:`~mimbench.backbones.vit.ARCHS`.

An entry builds the model from keyword arguments (``num_classes``, ``drop_path_rate``, ...). Anything with timm's
``feature_info`` (its stages, strides 4-32) is a hierarchical backbone to the contract
(:class:`~mimbench.backbones.contract.HierarchicalContract`), so a new family only adds an entry here: a timm name
through :func:`timm_model`, or the family's own constructor.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import timm
import torch.nn as nn

from mimbench.backbones.mpvit import SIZES as MPVIT_SIZES
from mimbench.backbones.mpvit import mpvit_builder


def timm_model(name: str) -> Callable[..., nn.Module]:
    """A builder for timm's ``name``, randomly initialised (weights come from our checkpoints, not timm's hub)."""
    return partial(timm.create_model, name, pretrained=False)


HIERARCHICAL_ARCHS: dict[str, Callable[..., nn.Module]] = {
    # The hierarchical test backbone of every task family (He et al., CVPR 2016): four stages at strides 4-32,
    # 11,176,512 parameters headless. Fully convolutional, so any input size works (64² gives 16², 8², 4², 2² maps).
    "resnet18": timm_model("resnet18"),
    # MPViT (Lee et al., CVPR 2022): T/XS/S/B as published, and a CPU-sized one (backbones/mpvit.py).
    **{name: mpvit_builder(name) for name in MPVIT_SIZES},
}

"""What BEiT-style dense transfer adds to a pretrained plain ViT: a relative position bias in every block and layer
scale, neither of which pretraining has. MAE's segmentation protocol is BEiT's code; mmseg's ``MAE`` backbone
(``mmseg/models/backbones/mae.py``, used by ``configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py``) gives
every block a relative position bias table initialised at zero (``MAEAttention``) and, in that config, layer scale
initialised at 1.0 (``init_values=1.0``).

Both go in after the pretrained weights are loaded, and neither changes what the loaded model computes until
training moves them: a zero bias adds nothing to the attention logits, a layer scale of ones multiplies by one.

- :func:`add_relative_position_bias` swaps each block's timm attention for :class:`RelPosAttention`, over the same
  modules (same parameters, same state-dict keys) plus ``relative_position_bias_table``: BEiT's layout (mmseg's
  ``BEiTAttention``, timm's ``gen_relative_position_index`` with a class token), one row per relative offset of
  the window, (2·Wh − 1)(2·Ww − 1) of them, then class-to-patch, patch-to-class and class-to-class, one column per
  head. The window is the model's token grid at its ``img_size``; a smaller grid (a slide window cut by the image
  border) reads the same table, a larger one is refused.
- :func:`add_layer_scale` puts timm's ``LayerScale`` after each block's attention and MLP.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, LayerScale, VisionTransformer


def relative_position_index(grid: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """(1 + h·w, 1 + h·w) rows of the bias table for the class token and an h × w grid of patches (row-major), in a
    table made for a ``window``: BEiT's index, for a grid up to the window's size."""
    (height, width), (window_h, window_w) = grid, window
    if height > window_h or width > window_w:
        raise ValueError(f"a {height}x{width} token grid exceeds the {window_h}x{window_w} window of the relative "
                         f"position bias")
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    offsets = (rows[:, None] - rows[None, :] + window_h - 1) * (2 * window_w - 1) + cols[:, None] - cols[None, :] \
        + window_w - 1
    distances = (2 * window_h - 1) * (2 * window_w - 1)
    index = torch.empty(1 + height * width, 1 + height * width, dtype=torch.long)
    index[1:, 1:] = offsets
    index[0, :] = distances  # the class token attending to patches
    index[:, 0] = distances + 1  # patches attending to the class token
    index[0, 0] = distances + 2  # the class token attending to itself
    return index


class RelPosAttention(nn.Module):
    """Multi-head self-attention over the modules of the timm ``Attention`` it replaces, with a learnt relative
    position bias (one per head) added to its logits. ``grid`` is the token grid of the current input, set by the
    hook :func:`add_relative_position_bias` puts on the patch embedding."""

    def __init__(self, attention: Attention, window: tuple[int, int]) -> None:
        super().__init__()
        if attention.gate is not None:
            raise TypeError("a gated attention has no relative position bias variant here")
        for name, module in attention.named_children():  # in timm's order, so parameters keep their order
            self.add_module(name, module)
        self.num_heads, self.head_dim, self.attn_dim = attention.num_heads, attention.head_dim, attention.attn_dim
        self.window = self.grid = tuple(window)
        rows = (2 * window[0] - 1) * (2 * window[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, self.num_heads))  # mmseg MAEAttention
        self.register_buffer("relative_position_index", relative_position_index(self.window, self.window),
                             persistent=False)

    def bias(self) -> torch.Tensor:
        """(heads, tokens, tokens): the table's entries for the current grid."""
        index = self.relative_position_index if self.grid == self.window else \
            relative_position_index(self.grid, self.window).to(self.relative_position_index.device)
        tokens = index.shape[0]
        return self.relative_position_bias_table[index.view(-1)].view(tokens, tokens, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("the relative position bias attention takes no attention mask")
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = self.bias()
        if bias.shape[-1] != tokens:
            raise ValueError(f"{tokens} tokens for a {self.grid[0]}x{self.grid[1]} grid and a class token")
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype),
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(batch, tokens, self.attn_dim))
        return self.proj_drop(self.proj(x))


def add_relative_position_bias(model: VisionTransformer) -> list[RelPosAttention]:
    """Give every block of ``model`` a zero relative position bias over the token grid of its ``img_size``, in
    place (the attention's parameters stay the same objects); returns the swapped-in attentions."""
    if model.cls_token is None:
        raise TypeError("the relative position bias here has class-token rows; this ViT has no class token")
    window = tuple(model.patch_embed.grid_size)
    attentions = []
    for index, block in enumerate(model.blocks):
        if type(block.attn) is not Attention:
            raise TypeError(f"block {index} has {type(block.attn).__name__}, not timm's Attention")
        block.attn = RelPosAttention(block.attn, window)
        attentions.append(block.attn)

    def set_grid(patch_embed: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        grid = tuple(patch_embed.dynamic_feat_size(tuple(inputs[0].shape[-2:])))
        for attention in attentions:
            attention.grid = grid

    model.patch_embed.register_forward_pre_hook(set_grid)
    return attentions


def add_layer_scale(model: VisionTransformer, init_values: float) -> None:
    """Layer scale (a per-channel γ, all ``init_values``) after every block's attention and MLP, in place."""
    for index, block in enumerate(model.blocks):
        if not (isinstance(block.ls1, nn.Identity) and isinstance(block.ls2, nn.Identity)):
            raise TypeError(f"block {index} has layer scale already")
        block.ls1 = LayerScale(model.embed_dim, init_values=init_values)
        block.ls2 = LayerScale(model.embed_dim, init_values=init_values)

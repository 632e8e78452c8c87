"""MixedAE: mixed autoencoder pretraining (Chen et al., "Mixed Autoencoder for Self-supervised Visual
Representation Learning", CVPR 2023, arXiv 2303.17152).

MAE hides 75% of an image. MixedAE instead fills the hidden positions with patches of other images: the batch
is split into groups of S = 1/r images (mixing ratio r, 0.25 by default) and each group becomes ONE mixed image
in which every patch position holds the patch of exactly one source, each source owning r·N positions, the same
25% share MAE keeps visible. The encoder sees all N tokens of the mixed image, so its cost equals MAE's
(B·r images x N tokens = B images x r·N tokens). Mixing alone makes reconstruction easier (it raises the mutual
information between input and target, the paper's MI analysis), so the paper adds *homologous recognition*:

- homologous attention, softmax(TopK(qkᵀ/√D)) (paper eq. "A_HomoAtt"): every query attends to its K largest
  logits only, K = r·N by default, the number of patches that share its source;
- the homologous contrastive loss L_HomoCon (paper eq. "L_HomoCon"): patches of the same source are positives,
  every other patch of the same mixed image is in the InfoNCE denominator;
- segment embeddings: one learnable vector per source slot, added to the tokens of that slot.

The decoder is MAE's (this class subclasses :class:`MaskedAutoencoder`): each source is reconstructed from its
own encoded tokens, with mask tokens at the positions other sources occupy, and the loss is MAE's norm-pix MSE on
those positions. Total loss = L_recon + contrastive_weight · L_HomoCon: a regularisation term, not a supervision
of its own (alone it gives 7.8% ImageNet fine-tuning accuracy in the paper's ablation).

Choices where the paper (poster and abstract as read here) leaves a detail open, all in :class:`MixedAEConfig`:
- groups are consecutive images of the batch (image g·S + s is source s of mixed image g); loaders shuffle;
- homologous attention in every encoder block (``homologous_blocks=None``): the poster puts TopK into "standard
  MHSA" without naming blocks (the paper body was not available to us). K counts the class token as a key;
- every source's decoder input starts with its mixed image's class token (the paper leaves this open);
- segment embeddings are added to the encoder input (as our issue specifies). They tell the encoder which tokens
  share a source, which makes homologous recognition easier; ``segment_embedding=False`` leaves it to content;
- L_HomoCon uses the encoder's final (normed) patch tokens, no projection head, the class token excluded; it is
  averaged over the positives of each anchor (the paper sums; with equal shares that is a constant factor) and
  over anchors; temperature 0.25 and weight 0.1 are our defaults, not verified against the paper.
- ``homo_acc`` (the paper's "homologous recognition accuracy" curve): share of the TopK keys of each patch query
  that are homologous patches, in the deepest homologous block, averaged over heads.

MixedAE-Full (object-aware pretraining) changes how sources are chosen and mixed; :meth:`sample_mixing_mask`
is the one place to override for that.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimbench.backbones.vit import HomologousAttention, set_homologous_attention
from mimbench.pretrain.mae import AutoencoderConfig, MAEConfig, MaskedAutoencoder, gather_tokens, visualization


@dataclass
class MixedAEConfig(AutoencoderConfig):
    mixing_ratio: float = 0.25  # r: each mixed image holds 1/r sources, r·N patches each
    homologous_topk: int | None = None  # K of TopK; None -> round(r·N)
    homologous_blocks: tuple[int, ...] | None = None  # encoder blocks with homologous attention; None -> all
    segment_embedding: bool = True
    contrastive_weight: float = 0.1
    temperature: float = 0.25

    def __post_init__(self) -> None:
        sources = 1 / self.mixing_ratio if self.mixing_ratio > 0 else math.inf
        if not 0 < self.mixing_ratio <= 0.5 or abs(sources - round(sources)) > 1e-6:
            raise ValueError(f"mixing_ratio must be in (0, 0.5] with 1/mixing_ratio an integer "
                             f"(0.5, 0.25, 0.2, ...), not {self.mixing_ratio}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, not {self.temperature}")
        if self.homologous_blocks is not None:
            self.homologous_blocks = tuple(self.homologous_blocks)

    @property
    def num_sources(self) -> int:
        return round(1 / self.mixing_ratio)

    def mae_config(self) -> MAEConfig:
        """The decoder half is MAE's; each source has 1 - r of its positions hidden."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(AutoencoderConfig)}
        return MAEConfig(**shared, mask_ratio=1 - self.mixing_ratio)


# ------------------------------------------------------------------------------------------ mixing math


def mixing_mask(
    groups: int, num_sources: int, num_patches: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(G, N) source id per patch position: a random arrangement of exactly N / S positions per source."""
    if num_patches % num_sources:
        raise ValueError(f"{num_patches} patches cannot be shared equally by {num_sources} sources")
    # Equal shares make every source as visible as an MAE image at mask ratio 1 - r.
    slots = torch.arange(num_sources, device=device).repeat_interleave(num_patches // num_sources)
    return slots[torch.rand(groups, num_patches, device=device).argsort(dim=1)]


def mix(tokens: torch.Tensor, source_ids: torch.Tensor) -> torch.Tensor:
    """tokens (G·S, N, D) of the sources, grouped consecutively -> (G, N, D) mixed: position n of mixed image g
    holds token n of image g·S + source_ids[g, n]."""
    groups, num_patches = source_ids.shape
    grouped = tokens.reshape(groups, -1, num_patches, tokens.shape[-1])
    index = source_ids[:, None, :, None].expand(-1, 1, -1, tokens.shape[-1])
    return grouped.gather(1, index).squeeze(1)


def source_layout(source_ids: torch.Tensor, num_sources: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each source's view of the mixture in :func:`random_masking`'s terms, per source image (B = G·S rows).

    Returns ``keep_index`` (B, N/S): the positions the source occupies, ascending; ``hidden`` (B, N): 1 where
    another source sits (what the source must reconstruct); ``restore_index`` (B, N): the permutation that puts
    [occupied, hidden] back into position order, as :meth:`MaskedAutoencoder.decode` expects.
    """
    slots = torch.arange(num_sources, device=source_ids.device)
    hidden = (source_ids[:, None, :] != slots[None, :, None]).flatten(0, 1)
    # A stable sort on "is hidden" lists the occupied positions first, each part in position order.
    shuffle_index = hidden.to(torch.uint8).argsort(dim=1, stable=True)
    num_keep = source_ids.shape[1] // num_sources
    return shuffle_index[:, :num_keep], hidden.float(), shuffle_index.argsort(dim=1)


def unmix(mixed: torch.Tensor, keep_index: torch.Tensor, num_sources: int) -> torch.Tensor:
    """mixed (G, N, D) -> (G·S, N/S, D): each source's own tokens, at the positions from :func:`source_layout`."""
    return gather_tokens(mixed.repeat_interleave(num_sources, dim=0), keep_index)


# ------------------------------------------------------------------------------------ homologous recognition


def homologous_contrastive_loss(
    features: torch.Tensor, source_ids: torch.Tensor, temperature: float
) -> torch.Tensor:
    """L_HomoCon: InfoNCE over the patches of each mixed image, positives = patches of the same source.

    features (G, N, D), source_ids (G, N). For anchor l: -mean over positives l+ of
    log( exp(cos(z_l, z_l+)/τ) / Σ_{l' ≠ l} exp(cos(z_l, z_l')/τ) ), then the mean over anchors and images.
    """
    z = F.normalize(features.float(), dim=-1)
    self_pair = torch.eye(z.shape[1], dtype=torch.bool, device=z.device)
    logits = (z @ z.transpose(1, 2) / temperature).masked_fill(self_pair, float("-inf"))
    log_prob = logits - logits.logsumexp(dim=-1, keepdim=True)
    positive = (source_ids[:, :, None] == source_ids[:, None, :]) & ~self_pair
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(dim=-1) / positive.sum(dim=-1).clamp(min=1)
    return per_anchor.mean()


@torch.no_grad()
def homologous_accuracy(
    attention: HomologousAttention, tokens: torch.Tensor, source_ids: torch.Tensor, topk: int
) -> torch.Tensor:
    """Share of the TopK keys of each patch query (all heads) that are its homologous patches.

    ``tokens`` (G, 1 + N, D) is the attention's input (class token first). Recomputes the attention logits
    because :class:`HomologousAttention` keeps its TopK indices internal.
    """
    groups, num_tokens, _ = tokens.shape
    qkv = attention.qkv(tokens).reshape(groups, num_tokens, 3, attention.num_heads, attention.head_dim)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    logits = (attention.q_norm(q) * attention.scale) @ attention.k_norm(k).transpose(-2, -1)
    top_keys = logits[:, :, 1:].topk(min(topk, num_tokens), dim=-1).indices  # (G, heads, N, K)
    # The class token belongs to no source: id -1 never matches.
    key_ids = F.pad(source_ids, (1, 0), value=-1)
    key_ids = key_ids[:, None, None, :].expand(-1, *top_keys.shape[1:3], -1).gather(-1, top_keys)
    return (key_ids == source_ids[:, None, :, None]).float().mean()


@contextlib.contextmanager
def capture_input(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the (detached) first positional input of ``module`` while the context is open."""
    captured: dict[str, torch.Tensor] = {}
    handle = module.register_forward_pre_hook(lambda _, args: captured.__setitem__("input", args[0].detach()))
    try:
        yield captured
    finally:
        handle.remove()


# -------------------------------------------------------------------------------------------------- model


class MixedAutoencoder(MaskedAutoencoder):
    """MAE's encoder and decoder (same parameter names), plus segment embeddings and homologous recognition."""

    def __init__(self, config: MixedAEConfig) -> None:
        super().__init__(config.mae_config())
        self.config = config
        self.num_sources = config.num_sources
        num_patches, depth = self.num_patches, len(self.encoder.blocks)
        if num_patches % self.num_sources:
            raise ValueError(f"{config.arch} has {num_patches} patches, not divisible by 1/mixing_ratio = "
                             f"{self.num_sources}: the sources cannot get equal shares")
        self.topk = config.homologous_topk or round(config.mixing_ratio * num_patches)
        if not 1 <= self.topk <= num_patches + 1:
            raise ValueError(f"homologous_topk must be in [1, {num_patches + 1}], not {self.topk}")
        blocks = range(depth) if config.homologous_blocks is None else config.homologous_blocks
        if any(not 0 <= index < depth for index in blocks):
            raise ValueError(f"homologous_blocks {tuple(blocks)} out of range for {depth} encoder blocks")
        self.homologous_blocks = tuple(blocks)
        set_homologous_attention(self.encoder, self.topk, self.homologous_blocks)
        # homo_acc is read where recognition is deepest; without HomoAtt, at the last block (what TopK would keep).
        self.diagnostic_block = max(self.homologous_blocks, default=depth - 1)

        if config.segment_embedding:
            self.segment_embed = nn.Parameter(torch.zeros(self.num_sources, self.encoder.embed_dim))
            nn.init.normal_(self.segment_embed, std=0.02)
        else:
            self.register_parameter("segment_embed", None)

    def num_groups(self, batch: int) -> int:
        if batch % self.num_sources:
            raise ValueError(f"MixedAE mixes groups of 1/mixing_ratio = {self.num_sources} images: the batch size "
                             f"must be a multiple of {self.num_sources}, got {batch}")
        return batch // self.num_sources

    def sample_mixing_mask(self, images: torch.Tensor) -> torch.Tensor:
        """(G, N) source slot per position. Random for MixedAE; MixedAE-Full would make it object-aware here."""
        return mixing_mask(self.num_groups(images.shape[0]), self.num_sources, self.num_patches, images.device)

    def forward_encoder(self, images: torch.Tensor, source_ids: torch.Tensor) -> torch.Tensor:
        """Mix the patch tokens of each group, mark their slots, encode all N: (G, 1 + N, D)."""
        tokens = mix(self.embed_patches(images), source_ids)
        if self.segment_embed is not None:
            tokens = tokens + self.segment_embed[source_ids].to(tokens.dtype)
        return self.encode_tokens(tokens)

    def forward_decoder(self, latent: torch.Tensor, source_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct every source from its own tokens (+ the mixed image's class token) and mask tokens
        elsewhere. Returns pixel predictions (B, N, p*p*3) and the positions each source must fill (B, N)."""
        keep_index, hidden, restore_index = source_layout(source_ids, self.num_sources)
        cls = latent[:, :1].repeat_interleave(self.num_sources, dim=0)
        own = unmix(latent[:, 1:], keep_index, self.num_sources)
        return self.decode(torch.cat([cls, own], dim=1), restore_index), hidden

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        source_ids = self.sample_mixing_mask(images)
        with capture_input(self.encoder.blocks[self.diagnostic_block].attn) as attention_input:
            latent = self.forward_encoder(images, source_ids)
        prediction, hidden = self.forward_decoder(latent, source_ids)
        loss_recon = self.reconstruction_loss(images, prediction, hidden)
        loss_homocon = homologous_contrastive_loss(latent[:, 1:], source_ids, self.config.temperature)
        loss = loss_recon + self.config.contrastive_weight * loss_homocon
        homo_acc = homologous_accuracy(
            self.encoder.blocks[self.diagnostic_block].attn, attention_input["input"], source_ids, self.topk)
        parts = {"loss_recon": loss_recon.detach(), "loss_homocon": loss_homocon.detach(), "homo_acc": homo_acc}
        return loss, parts

    @torch.no_grad()
    def visualize(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Original, each source's own patches in its mixed image ("input") and its reconstruction: (B, 3, H, W)."""
        source_ids = self.sample_mixing_mask(images)
        prediction, hidden = self.forward_decoder(self.forward_encoder(images, source_ids), source_ids)
        return visualization(images, prediction.float(), hidden, self.patch_size, self.config.norm_pix_loss)

    def export_encoder(self) -> nn.Module:
        """A copy of the timm encoder with standard attention: downstream never uses TopK. The segment
        embeddings live outside the encoder, so they are not in its state dict."""
        encoder = copy.deepcopy(self.encoder)
        set_homologous_attention(encoder, None)
        return encoder

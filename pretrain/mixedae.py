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

The decoder is MAE's, with MAE's initialisation and per-arch size (this class subclasses
:class:`MaskedAutoencoder`): each source is reconstructed from its own encoded tokens, with mask tokens at the
positions other sources occupy, and the loss is MAE's norm-pix MSE on those positions. Total loss = L_recon +
contrastive_weight · L_HomoCon: a regularisation term, not a supervision of its own (alone it gives 7.8% ImageNet
fine-tuning accuracy in the paper's ablation).

What the poster states: mixing ratio r in (0, 0.5] with a random mixing mask; A_HomoAtt = softmax(TopK(qkᵀ/√D_h))
inside standard MHSA; L_HomoCon as InfoNCE over cosine similarities with temperature τ, homologous patches the
positives, every other patch of the mixture in the denominator, "a regularization term instead of a separate
supervision"; total loss L_recon + L_HomoCon (its ablation (b)); object-aware pretraining from MultiSiam's
single-centric-object guarantee for MixedAE-Full / MixedAE-Full*.

What is ours (the paper body was not available to us); every choice is a :class:`MixedAEConfig` field, the default
first:
- groups are consecutive images of the batch (image g·S + s is source s of mixed image g); loaders shuffle;
- ``mixtures_per_group`` m = 1: one mixed image per group. m > 1 (our MixedAE-Full* at m = 2, MixedAE-Full at
  m = 1/r, read from the poster's GPU-day ratios 30.8/16.9 ≈ 2 and 62.3/16.9 ≈ 4) adds mixtures with complementary
  assignments: mixture j puts source (a[n] + j) mod S at position n, a the group's random assignment, so at m = 1/r
  every patch of every source is encoded exactly once; every source is reconstructed in every mixture;
- homologous attention in every encoder block (``homologous_blocks=None``; or a tuple of blocks, or the last k with
  ``homologous_last_blocks``, or none with ``()``);
- K = round(r·N) (``homologous_topk_factor=1``; ``homologous_topk`` sets K absolutely), the number of patches that
  share a query's source. The class token competes for the K keys (``topk_counts_cls=True``; False keeps the class
  token(s) always, besides K patch keys);
- segment embeddings on (``segment_embedding``), added to the encoder input (``segment_embedding_at="encoder"``, as
  our issue specifies: they tell the encoder which tokens share a source, which makes homologous recognition
  easier); ``"decoder"`` adds them to each source's decoder input only, so the encoder must recognise by content;
- every source's decoder input starts with its mixture's class token (``decoder_cls="shared"``); ``"per_source"``
  gives the encoder one class token per source slot (S tokens ahead of the patches) and source s's decoder its own;
- L_HomoCon on the encoder's final (normed) patch tokens (``homocon_features="encoder"``; ``"projection"`` puts a
  2-layer MLP head in between), the class token(s) excluded; averaged over the positives of each anchor (the poster
  sums; with equal shares that is a constant factor) and over anchors; τ = 0.25 (``temperature``) and weight 0.1
  (``contrastive_weight``; the poster's total loss has weight 1) are our defaults, not verified against the paper;
- the lr counts source images (``lr_batch="sources"``: lr = base_lr · source images / 256, as MAE counts images);
  ``"mixtures"`` counts mixed images (m·r per source image);
- ``homo_acc`` (the paper's "homologous recognition accuracy" curve): share of the TopK keys of each patch query
  that are homologous patches, in the deepest homologous block, averaged over heads; ``homo_acc/block<i>`` the
  same for each homologous block i (the poster's analysis figure, ``python -m mimbench.chain ablations``). Those
  attentions record the indices their TopK kept during the forward pass; without homologous blocks the last block
  records what TopK would keep of its (unchanged) attention.

Homologous attention lives here, not in the backbone: :class:`MixedAutoencoder` swaps it into its encoder's blocks
over the same modules (same parameters, same state-dict keys), and :meth:`MixedAutoencoder.export_encoder` swaps
timm's attention back, so the exported encoder is a plain timm ViT.

Object-aware pretraining (``object_aware`` sources, MixedAE-Full) changes how the source crops are chosen, in the
data (:mod:`mimbench.pretrain.data`), not here: homologous targets stay "same source", which then means "same
object".
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, VisionTransformer

from mimbench.pretrain.mae import AutoencoderConfig, MAEConfig, MaskedAutoencoder, gather_tokens, visualization

# The string switches of MixedAEConfig and their values (the first is the default).
CHOICES = {
    "segment_embedding_at": ("encoder", "decoder"),
    "homocon_features": ("encoder", "projection"),
    "decoder_cls": ("shared", "per_source"),
    "lr_batch": ("sources", "mixtures"),
}


@dataclass
class MixedAEConfig(AutoencoderConfig):
    mixing_ratio: float = 0.25  # r: each mixed image holds 1/r sources, r·N patches each
    homologous_topk: int | None = None  # K of TopK, absolute; None -> homologous_topk_factor · r·N
    homologous_topk_factor: float = 1.0  # K as a multiple of r·N (when homologous_topk is None)
    topk_counts_cls: bool = True  # True: the class token(s) compete for the K keys; False: always kept, K patches
    homologous_blocks: tuple[int, ...] | None = None  # encoder blocks with homologous attention; None -> all
    homologous_last_blocks: int | None = None  # instead of homologous_blocks: the last k encoder blocks
    segment_embedding: bool = True
    segment_embedding_at: str = "encoder"  # encoder: on the mixed input; decoder: on each source's decoder input
    contrastive_weight: float = 0.1
    reconstruction_weight: float = 1.0  # 0: L_HomoCon alone (the poster's ablation (b))
    temperature: float = 0.25
    homocon_features: str = "encoder"  # encoder: the final patch tokens; projection: through a 2-layer MLP head
    decoder_cls: str = "shared"  # shared: the mixture's class token; per_source: one class token per source slot
    lr_batch: str = "sources"  # the lr's batch (lr = base_lr · batch / 256): source images, or mixed images
    # m: mixed images per group, with complementary assignments (1 = MixedAE; 2 = our MixedAE-Full*; 1/r = our
    # MixedAE-Full, every patch of every source encoded exactly once)
    mixtures_per_group: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        sources = 1 / self.mixing_ratio if self.mixing_ratio > 0 else math.inf
        if not 0 < self.mixing_ratio <= 0.5 or abs(sources - round(sources)) > 1e-6:
            raise ValueError(f"mixing_ratio must be in (0, 0.5] with 1/mixing_ratio an integer "
                             f"(0.5, 0.25, 0.2, ...), not {self.mixing_ratio}")
        if not 1 <= self.mixtures_per_group <= self.num_sources:
            raise ValueError(f"mixtures_per_group must be in [1, 1/mixing_ratio = {self.num_sources}], "
                             f"not {self.mixtures_per_group}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, not {self.temperature}")
        if self.homologous_blocks is not None:
            self.homologous_blocks = tuple(self.homologous_blocks)
        if self.homologous_blocks is not None and self.homologous_last_blocks is not None:
            raise ValueError("set homologous_blocks or homologous_last_blocks, not both")
        if self.homologous_last_blocks is not None and self.homologous_last_blocks < 0:
            raise ValueError(f"homologous_last_blocks must be >= 0, not {self.homologous_last_blocks}")
        if self.homologous_topk_factor <= 0:
            raise ValueError(f"homologous_topk_factor must be positive, not {self.homologous_topk_factor}")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, not {getattr(self, name)!r}")

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


def complementary_masks(source_ids: torch.Tensor, num_sources: int, mixtures: int) -> torch.Tensor:
    """(G, N) assignments a -> (G·m, N): mixture j of group g assigns position n to source (a[g, n] + j) mod S,
    rows grouped by g. With m = S every source occupies every position in exactly one mixture."""
    shifts = torch.arange(mixtures, device=source_ids.device)
    return ((source_ids[:, None, :] + shifts[None, :, None]) % num_sources).flatten(0, 1)


def mix(tokens: torch.Tensor, source_ids: torch.Tensor, mixtures: int = 1) -> torch.Tensor:
    """tokens (G·S, N, D) of the sources, grouped consecutively, and source_ids (G·m, N) of ``mixtures`` = m mixed
    images per group (rows grouped by group) -> (G·m, N, D): position n of mixture j of group g holds token n of
    image g·S + source_ids[g·m + j, n]."""
    num_patches, dim = source_ids.shape[1], tokens.shape[-1]
    groups = source_ids.shape[0] // mixtures
    grouped = tokens.reshape(groups, -1, num_patches, dim)
    index = source_ids.reshape(groups, mixtures, num_patches, 1).expand(-1, -1, -1, dim)
    return grouped.gather(1, index).flatten(0, 1)


def source_layout(source_ids: torch.Tensor, num_sources: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each source's view of each mixture in :func:`random_masking`'s terms: one row per (mixture, source),
    B = (rows of source_ids)·S rows, the sources of a mixture consecutive.

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
    """mixed (M, N, D) -> (M·S, N/S, D): each source's own tokens in each mixture, at the positions from
    :func:`source_layout`."""
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


def topk_keys(logits: torch.Tensor, topk: int, always_kept: int = 0) -> torch.Tensor:
    """Indices (..., K) of the ``topk`` largest logits of each row among the keys after the first ``always_kept``,
    in no particular order (an unsorted ``topk`` skips sorting the K: a third faster on a CPU)."""
    candidates = logits.detach()[..., always_kept:]
    return candidates.topk(min(topk, candidates.shape[-1]), dim=-1, sorted=False).indices + always_kept


def homologous_softmax(
    logits: torch.Tensor, topk: int, always_kept: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(TopK(logits)) over the last dim, and the indices TopK kept (..., K). The first ``always_kept`` keys
    (class tokens not counted in K) are kept besides the K.

    MixedAE (Chen et al., CVPR 2023, eq. "A_HomoAtt"): in a mixed image the largest attention logits of a patch
    are most likely its homologous (same-source) patches, so attention outside the TopK is cut to zero.
    The kept keys are ``topk``'s indices, scattered into a mask, so ties never keep more than ``topk`` entries (a
    threshold at the K-th value keeps every tie: 14% of the rows of a bf16 ViT-B layer keep more than K). The
    mask is applied with ``torch.where`` (on a CPU three times as fast as ``masked_fill``), whose backward is one
    masked copy of the gradient: the same weights and gradients, bit for bit, as scattering ``topk``'s values
    and differentiating through them, with no autograd through ``topk`` and no sort of the K (a layer's TopK
    forward + backward 11.1 → 10.2 ms on a 2-core CPU, ViT-B, 2 mixtures of 197 tokens).
    """
    index = topk_keys(logits, topk, always_kept)
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, index, True)
    if always_kept:
        kept[..., :always_kept] = True
    return torch.where(kept, logits, float("-inf")).softmax(dim=-1), index


class HomologousAttention(nn.Module):
    """Multi-head self-attention with TopK sparsification over the modules of the timm ``Attention`` it replaces
    (the same ``qkv``, norms, ``proj``: same parameters, same state-dict keys).

    ``sparse=True`` attends through :func:`homologous_softmax` of qkᵀ/√D; ``sparse=False`` is timm's attention
    unchanged. With ``record`` set, each forward leaves ``kept_index`` (B, heads, tokens, K): the keys TopK kept
    for every query (with ``sparse=False``, those it would keep). ``standard`` is the replaced timm module.
    """

    def __init__(self, attention: Attention, topk: int, sparse: bool = True, always_kept: int = 0) -> None:
        super().__init__()
        for name, module in attention.named_children():  # in timm's order, so parameters keep their order
            self.add_module(name, module)
        self.gate = attention.gate  # timm's optional output gate (None unless gated)
        self.num_heads, self.head_dim, self.attn_dim = attention.num_heads, attention.head_dim, attention.attn_dim
        self.scale, self.fused_attn = attention.scale, attention.fused_attn
        self.topk, self.sparse, self.always_kept, self.record = topk, sparse, always_kept, False
        self.kept_index: torch.Tensor | None = None
        self.__dict__["standard"] = attention  # not a submodule: its modules are ours already

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("homologous attention does not take an attention mask")
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.sparse:
            attn, kept_index = homologous_softmax((q * self.scale) @ k.transpose(-2, -1), self.topk,
                                                   self.always_kept)
            x = self.attn_drop(attn) @ v
        else:
            x, kept_index = self._standard_attention(q, k, v)
        if self.record:
            self.kept_index = kept_index
        x = x.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def _standard_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """timm's attention (its fused kernel where timm uses it), and what TopK would keep if recording."""
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            x = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
        if not self.record:
            return x, None
        with torch.no_grad():
            return x, topk_keys((q * self.scale) @ k.transpose(-2, -1), self.topk, self.always_kept)


def use_homologous_attention(
    model: VisionTransformer, topk: int, blocks: Sequence[int] | None = None, sparse: bool = True,
    always_kept: int = 0,
) -> list[HomologousAttention]:
    """Swap timm's attention for homologous attention (``topk`` keys per query) in ``blocks`` (default: all), in
    place; the parameters stay the same objects. Returns the swapped-in modules."""
    swapped = []
    for index in range(len(model.blocks)) if blocks is None else blocks:
        block = model.blocks[index]
        if not isinstance(block.attn, Attention):
            raise TypeError(f"block {index} has {type(block.attn).__name__}, not timm's Attention")
        block.attn = HomologousAttention(block.attn, topk, sparse, always_kept)
        swapped.append(block.attn)
    return swapped


def with_standard_attention(model: VisionTransformer) -> VisionTransformer:
    """A copy of ``model`` with timm's attention back in every block: a plain timm ViT with the same weights."""
    model = copy.deepcopy(model)
    for block in model.blocks:
        if isinstance(block.attn, HomologousAttention):
            block.attn = block.attn.standard.train(block.attn.training)
    return model


@torch.no_grad()
def homologous_accuracy(kept_index: torch.Tensor, source_ids: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """Share of the keys TopK kept for each patch query (all heads) that are its homologous patches.

    ``kept_index`` (G, heads, 1 + N, K), as :class:`HomologousAttention` records it: key indices over the class
    token and the N patches of each mixed image; ``source_ids`` (G, N).
    """
    top_keys = kept_index[:, :, prefix:]  # the patch queries
    # Class tokens (``prefix`` of them) belong to no source: id -1 never matches.
    key_ids = F.pad(source_ids, (prefix, 0), value=-1)
    key_ids = key_ids[:, None, None, :].expand(-1, *top_keys.shape[1:3], -1).gather(-1, top_keys)
    return (key_ids == source_ids[:, None, :, None]).float().mean()


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
        # Class tokens ahead of the patches: the mixture's one, or one per source slot.
        self.prefix = self.num_sources if config.decoder_cls == "per_source" else 1
        always_kept = 0 if config.topk_counts_cls else self.prefix
        keys = num_patches + self.prefix - always_kept
        self.topk = config.homologous_topk or round(config.homologous_topk_factor * config.mixing_ratio * num_patches)
        if not 1 <= self.topk <= keys:
            raise ValueError(f"homologous_topk must be in [1, {keys}], not {self.topk}")
        if config.homologous_last_blocks is not None:
            blocks = range(depth - min(config.homologous_last_blocks, depth), depth)
        else:
            blocks = range(depth) if config.homologous_blocks is None else config.homologous_blocks
        if any(not 0 <= index < depth for index in blocks):
            raise ValueError(f"homologous_blocks {tuple(blocks)} out of range for {depth} encoder blocks")
        self.homologous_blocks = tuple(blocks)
        use_homologous_attention(self.encoder, self.topk, self.homologous_blocks, always_kept=always_kept)
        # homo_acc is read where recognition is deepest; without HomoAtt, at the last block (what TopK would keep).
        self.diagnostic_block = max(self.homologous_blocks, default=depth - 1)
        if not self.homologous_blocks:
            use_homologous_attention(self.encoder, self.topk, [self.diagnostic_block], sparse=False,
                                     always_kept=always_kept)
        # Every homologous block records its TopK (indices its backward keeps anyway) for its own homo_acc.
        self.recorded_blocks = self.homologous_blocks or (self.diagnostic_block,)
        for index in self.recorded_blocks:
            self.encoder.blocks[index].attn.record = True

        if config.segment_embedding:
            self.segment_embed = nn.Parameter(torch.zeros(self.num_sources, self.encoder.embed_dim))
            nn.init.normal_(self.segment_embed, std=0.02)
        else:
            self.register_parameter("segment_embed", None)
        # Optional parts, created after the default ones so that the default model draws its weights as before.
        self.source_cls_token = None
        if config.decoder_cls == "per_source":
            self.source_cls_token = nn.Parameter(torch.zeros(1, self.num_sources, self.encoder.embed_dim))
            nn.init.normal_(self.source_cls_token, std=0.02)
        self.homocon_head = None
        if config.homocon_features == "projection":
            width = self.encoder.embed_dim
            self.homocon_head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))

    @property
    def export_method(self) -> str:
        """The method name exports carry (the tables' rows): our MixedAE-Full at m = 1/r, MixedAE-Full* at m = 2."""
        mixtures = self.config.mixtures_per_group
        if mixtures == 1:
            return "mixedae"
        return "mixedae-full" if mixtures == self.num_sources else ("mixedae-full*" if mixtures == 2 else
                                                                    f"mixedae-m{mixtures}")

    @property
    def lr_batch_share(self) -> float:
        """Images the lr counts per source image: 1 (source images) or m·r (mixed images)."""
        if self.config.lr_batch == "sources":
            return 1
        return self.config.mixtures_per_group / self.num_sources

    def num_groups(self, batch: int) -> int:
        if batch % self.num_sources:
            raise ValueError(f"MixedAE mixes groups of 1/mixing_ratio = {self.num_sources} images: the batch size "
                             f"must be a multiple of {self.num_sources}, got {batch}")
        return batch // self.num_sources

    def sample_mixing_mask(self, images: torch.Tensor) -> torch.Tensor:
        """(G·m, N) source slot per position of each of the m mixtures of each group: one random assignment per
        group (one draw, as MixedAE's), shifted complementarily for mixtures 1..m-1."""
        source_ids = mixing_mask(self.num_groups(images.shape[0]), self.num_sources, self.num_patches, images.device)
        mixtures = self.config.mixtures_per_group
        return source_ids if mixtures == 1 else complementary_masks(source_ids, self.num_sources, mixtures)

    def mixtures_of(self, images: torch.Tensor, source_ids: torch.Tensor) -> int:
        """m, the mixed images per group in ``source_ids``."""
        return source_ids.shape[0] // self.num_groups(images.shape[0])

    def source_targets(self, images: torch.Tensor, mixtures: int) -> torch.Tensor:
        """The source image of every decoder row (mixture j of group g, source s -> image g·S + s)."""
        if mixtures == 1:
            return images
        grouped = images.reshape(-1, 1, self.num_sources, *images.shape[1:])
        return grouped.expand(-1, mixtures, -1, *images.shape[1:]).flatten(0, 2)

    def forward_encoder(self, images: torch.Tensor, source_ids: torch.Tensor) -> torch.Tensor:
        """Mix the patch tokens of each group into its m mixtures, mark their slots, encode all N: (G·m, 1 + N, D)."""
        tokens = mix(self.embed_patches(images), source_ids, self.mixtures_of(images, source_ids))
        if self.segment_embed is not None and self.config.segment_embedding_at == "encoder":
            tokens = tokens + self.segment_embed[source_ids].to(tokens.dtype)
        if self.source_cls_token is None:
            return self.encode_tokens(tokens)
        # One class token per source slot (its segment embedding marks it too, when on the encoder input).
        prefix = self.encoder.cls_token + self.encoder.pos_embed[:, :1] + self.source_cls_token
        if self.segment_embed is not None and self.config.segment_embedding_at == "encoder":
            prefix = prefix + self.segment_embed
        return self.encode_tokens(tokens, prefix)

    def forward_decoder(self, latent: torch.Tensor, source_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct every source of every mixture from its own tokens (+ the mixture's class token) and mask
        tokens elsewhere. Returns pixel predictions (G·m·S, N, p*p*3) and the positions each source must fill."""
        keep_index, hidden, restore_index = source_layout(source_ids, self.num_sources)
        if self.source_cls_token is None:
            cls = latent[:, :1].repeat_interleave(self.num_sources, dim=0)
        else:
            cls = latent[:, :self.num_sources].flatten(0, 1)[:, None]
        own = unmix(latent[:, self.prefix:], keep_index, self.num_sources)
        if self.segment_embed is not None and self.config.segment_embedding_at == "decoder":
            own = own + self.segment_embed.repeat(latent.shape[0], 1)[:, None].to(own.dtype)
        return self.decode(torch.cat([cls, own], dim=1), restore_index), hidden

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        source_ids = self.sample_mixing_mask(images)
        latent = self.forward_encoder(images, source_ids)
        homo_acc = {}
        for index in self.recorded_blocks:
            attention = self.encoder.blocks[index].attn
            homo_acc[f"homo_acc/block{index}"] = homologous_accuracy(attention.kept_index, source_ids, self.prefix)
            attention.kept_index = None  # read once; not held until the next step
        prediction, hidden = self.forward_decoder(latent, source_ids)
        targets = self.source_targets(images, self.mixtures_of(images, source_ids))
        loss_recon = self.reconstruction_loss(targets, prediction, hidden)
        features = latent[:, self.prefix:]
        if self.homocon_head is not None:
            features = self.homocon_head(features)
        loss_homocon = homologous_contrastive_loss(features, source_ids, self.config.temperature)
        if self.config.reconstruction_weight != 1:
            loss_recon_term = self.config.reconstruction_weight * loss_recon
        else:
            loss_recon_term = loss_recon
        loss = loss_recon_term + self.config.contrastive_weight * loss_homocon
        parts = {"loss_recon": loss_recon.detach(), "loss_homocon": loss_homocon.detach(),
                 "homo_acc": homo_acc[f"homo_acc/block{self.diagnostic_block}"], **homo_acc}
        return loss, parts

    @torch.no_grad()
    def visualize(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Original, each source's own patches in its (first) mixed image ("input") and its reconstruction:
        (B, 3, H, W)."""
        source_ids = self.sample_mixing_mask(images)[::self.config.mixtures_per_group]
        prediction, hidden = self.forward_decoder(self.forward_encoder(images, source_ids), source_ids)
        return visualization(images, prediction.float(), hidden, self.patch_size, self.config.norm_pix_loss)

    def export_encoder(self) -> nn.Module:
        """A copy of the encoder with timm's attention: a plain timm ViT, as downstream never uses TopK. The
        segment embeddings, per-source class tokens and the HomoCon head live outside the encoder, so they are
        not in its state dict."""
        return with_standard_attention(self.encoder)

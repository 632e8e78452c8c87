"""MAE: masked autoencoder pretraining (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).

Mask a random 75% of the patches; the encoder (our timm ViT) sees only the visible ones; a light decoder
(8 blocks, 512 wide for ViT-B) fills in mask tokens and predicts the pixels of every patch; the loss is the
MSE on masked patches against per-patch normalised pixels (norm_pix_loss). Position embeddings of encoder and
decoder are fixed 2D sin-cos, as in the paper.

What follows the official release (facebookresearch/mae) rather than timm's defaults, so a run from scratch
trains as the release does and an official full checkpoint (encoder + decoder) runs unchanged in this model:
- the initialisation (``models_mae.py``, ``initialize_weights``): xavier-uniform for every Linear layer of encoder
  and decoder and for the patch embedding's weight seen as a (D, 3·p·p) matrix, N(0, 0.02) for ``cls_token`` and
  ``mask_token``, LayerNorms 1 / 0 (the patch embedding's bias keeps PyTorch's Conv2d default, as there);
- the sin-cos layout (``util/pos_embed.py``): see :func:`sincos_pos_embed`; ``decoder_pos_embed`` is a frozen
  parameter, as there, so it is in the state dict and loads from a checkpoint;
- the mask count (``models_mae.py``, ``random_masking``): ``int(N · (1 − ratio))`` visible patches;
- the decoder per encoder (:data:`DECODERS`).

The pieces (`patchify`, `random_masking`, `encode`, `decode`, `reconstruction_loss`) are public so RC-MAE
and MixedAE build on them instead of copying them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from mimbench.backbones.vit import create_backbone

# The decoder (width, blocks, heads) of each encoder, from the releases: MAE's models_mae.py gives ViT-B, ViT-L and
# ViT-H 512 wide, 8 blocks, 16 heads (``mae_vit_*_dec512d8b``); RC-MAE's models_rc.py gives ViT-S 256 / 4 / 8
# (``rc_vit_small_patch16 = rc_vit_small_patch16_dec256d4b``) and ViT-Ti 128 / 2 / 4 (``rc_vit_tiny_patch16_dec128d2b``,
# used here for the small-image tiny and mini ViTs too). MAE, RC-MAE and MixedAE all take it.
DECODERS: dict[str, tuple[int, int, int]] = {
    "vit_mini_patch4_32": (128, 2, 4),
    "vit_tiny_patch4_32": (128, 2, 4),
    "vit_tiny_patch8_64": (128, 2, 4),
    "vit_small_patch16_224": (256, 4, 8),
    "vit_base_patch16_224": (512, 8, 16),
    "vit_large_patch16_224": (512, 8, 16),
    "vit_huge_patch16_224": (512, 8, 16),
    "vit_huge_patch14_224": (512, 8, 16),
}


@dataclass
class AutoencoderConfig:
    """What every MAE-style method shares: the encoder arch and the decoder (None: the arch's, :data:`DECODERS`)."""

    arch: str = "vit_base_patch16_224"
    decoder_dim: int | None = None
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    norm_pix_loss: bool = True
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if None in (self.decoder_dim, self.decoder_depth, self.decoder_heads):
            if self.arch not in DECODERS:
                raise ValueError(f"no release decoder for {self.arch!r}: give decoder_dim, decoder_depth and "
                                 f"decoder_heads")
            dim, depth, heads = DECODERS[self.arch]
            self.decoder_dim = dim if self.decoder_dim is None else self.decoder_dim
            self.decoder_depth = depth if self.decoder_depth is None else self.decoder_depth
            self.decoder_heads = heads if self.decoder_heads is None else self.decoder_heads


@dataclass
class MAEConfig(AutoencoderConfig):
    mask_ratio: float = 0.75


def sincos_pos_embed(grid_size: tuple[int, int], dim: int) -> torch.Tensor:
    """MAE's fixed 2D sin-cos position embedding with a zero row for the class token: (1, 1 + H*W, dim).

    The layout of MAE's ``util/pos_embed.py`` (``get_2d_sincos_pos_embed``), channel for channel: patches in
    row-major order; the first dim/2 channels encode the patch's column (its ``np.meshgrid(grid_w, grid_h)`` puts
    the column first), the last dim/2 its row; each half is [sin, cos] of position · 10000^(−k / (dim/4)),
    k = 0 .. dim/4 − 1. Evaluated in float64 and rounded to float32, as MAE does (numpy, then ``.float()``).
    """
    if dim % 4:
        raise ValueError(f"a 2D sin-cos embedding needs a width divisible by 4, not {dim}")
    rows, cols = grid_size
    row, col = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                              indexing="ij")
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def one_axis(position: torch.Tensor) -> torch.Tensor:
        angles = position.reshape(-1, 1) * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    patches = torch.cat([one_axis(col), one_axis(row)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), patches]).float().unsqueeze(0)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder sees: ``int(N · (1 − ratio))``, rounded down as MAE's ``random_masking`` does (196 patches
    at ratio 0.7: 58)."""
    return int(num_patches * (1 - mask_ratio))


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order, pixels as (p, p, C)."""
    batch, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, rows, patch_size, cols, patch_size)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, rows * cols, patch_size * patch_size * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify` for square images."""
    batch, num_patches, _ = patches.shape
    side = int(num_patches ** 0.5)
    images = patches.reshape(batch, side, side, patch_size, patch_size, channels)
    return images.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, side * patch_size, side * patch_size)


def random_masking(
    batch: int, num_patches: int, mask_ratio: float, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A uniformly random subset of patches to keep, per image.

    Returns ``keep_index`` (B, n_keep): the visible patches in shuffled order; ``mask`` (B, N): 1 where
    masked, in the original order; ``restore_index`` (B, N): the permutation that puts the shuffled sequence
    [visible, masked] back into the original order.
    """
    num_keep = num_visible(num_patches, mask_ratio)
    shuffle_index = torch.rand(batch, num_patches, device=device).argsort(dim=1)
    restore_index = shuffle_index.argsort(dim=1)
    keep_index = shuffle_index[:, :num_keep]
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :num_keep] = 0
    mask = mask.gather(1, restore_index)
    return keep_index, mask, restore_index


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, D) at index (B, M) -> (B, M, D)."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def normalised_pixel_target(images: torch.Tensor, patch_size: int, norm_pix_loss: bool) -> torch.Tensor:
    target = patchify(images, patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return target


def masked_mean(per_patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of a (B, N) per-patch quantity over the masked patches only."""
    return (per_patch * mask).sum() / mask.sum()


class MaskedAutoencoder(nn.Module):
    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = create_backbone(config.arch, drop_path_rate=config.drop_path_rate)
        self.patch_size = self.encoder.patch_embed.patch_size[0]
        grid = tuple(self.encoder.patch_embed.grid_size)
        width = self.encoder.embed_dim
        self.encoder.pos_embed.requires_grad_(False)

        self.decoder_embed = nn.Linear(width, config.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.decoder_dim))
        # A frozen parameter, as MAE's (models_mae.py): in the state dict, so a full checkpoint's loads with it.
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, config.decoder_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(config.decoder_dim, config.decoder_heads, mlp_ratio=4.0, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(config.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(config.decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(config.decoder_dim, self.patch_size ** 2 * 3)
        self.initialize_weights(grid)

    @torch.no_grad()
    def initialize_weights(self, grid: tuple[int, int]) -> None:
        """MAE's initialisation, in its order (models_mae.py, ``initialize_weights``): the sin-cos position
        embeddings; the patch embedding's weight xavier-uniform as a (D, 3·p·p) matrix (a Linear layer's fans, not a
        convolution's); ``cls_token`` and ``mask_token`` N(0, 0.02); then every Linear layer of encoder and decoder
        xavier-uniform with zero bias and every LayerNorm 1 / 0."""
        self.encoder.pos_embed.copy_(sincos_pos_embed(grid, self.encoder.embed_dim))
        self.decoder_pos_embed.copy_(sincos_pos_embed(grid, self.config.decoder_dim))
        patch = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(patch.view(patch.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear_and_norm)

    @property
    def num_patches(self) -> int:
        return self.encoder.patch_embed.num_patches

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with their position embeddings, no class token: (B, N, D)."""
        return self.encoder.patch_embed(images) + self.encoder.pos_embed[:, 1:]

    def encode_tokens(self, tokens: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Prepend the class token (or ``prefix`` (1, P, D), tokens in its place) and run the encoder's blocks and
        final norm."""
        if prefix is None:
            prefix = self.encoder.cls_token + self.encoder.pos_embed[:, :1]
        x = torch.cat([prefix.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.encoder.blocks:
            x = block(x)
        return self.encoder.norm(x)

    def encode(self, images: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
        """Encoder over the visible patches only: (B, 1 + n_keep, D)."""
        return self.encode_tokens(gather_tokens(self.embed_patches(images), keep_index))

    def decode(self, latent: torch.Tensor, restore_index: torch.Tensor) -> torch.Tensor:
        """Mask tokens fill the hidden positions; returns pixel predictions for every patch (B, N, p*p*3)."""
        x = self.decoder_embed(latent)
        cls, visible = x[:, :1], x[:, 1:]
        hidden = self.mask_token.expand(x.shape[0], restore_index.shape[1] - visible.shape[1], -1)
        patches = gather_tokens(torch.cat([visible, hidden.to(visible.dtype)], dim=1), restore_index)
        x = torch.cat([cls, patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def reconstruction_loss(self, images: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = normalised_pixel_target(images, self.patch_size, self.config.norm_pix_loss)
        return masked_mean((prediction.float() - target).pow(2).mean(dim=-1), mask)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        keep_index, mask, restore_index = random_masking(
            images.shape[0], self.num_patches, self.config.mask_ratio, images.device)
        prediction = self.decode(self.encode(images, keep_index), restore_index)
        loss = self.reconstruction_loss(images, prediction, mask)
        return loss, {"loss_recon": loss.detach()}

    @torch.no_grad()
    def visualize(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Original, masked input and reconstruction (visible patches pasted back), for the epoch figure."""
        keep_index, mask, restore_index = random_masking(
            images.shape[0], self.num_patches, self.config.mask_ratio, images.device)
        prediction = self.decode(self.encode(images, keep_index), restore_index).float()
        return visualization(images, prediction, mask, self.patch_size, self.config.norm_pix_loss)

    def export_encoder(self) -> nn.Module:
        """The encoder to export for downstream use."""
        return self.encoder


def visualization(
    images: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix_loss: bool
) -> dict[str, torch.Tensor]:
    """Undo the per-patch normalisation with the true patch statistics so predictions can be looked at."""
    patches = patchify(images, patch_size)
    if norm_pix_loss:
        mean, std = patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6) ** 0.5
        prediction = prediction * std + mean
    keep = (1 - mask).unsqueeze(-1)
    return {
        "original": images,
        "input": unpatchify(patches * keep, patch_size),
        "reconstruction": unpatchify(patches * keep + prediction * (1 - keep), patch_size),
    }


def _init_linear_and_norm(module: nn.Module) -> None:
    """Xavier-uniform linear layers and unit LayerNorms (MAE's ``_init_weights``, "following official JAX ViT")."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

"""MAE: masked autoencoder pretraining (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).

Mask a random 75% of the patches; the encoder (our timm ViT) sees only the visible ones; a light decoder
(8 blocks, 512 wide for ViT-B) fills in mask tokens and predicts the pixels of every patch; the loss is the
MSE on masked patches against per-patch normalised pixels (norm_pix_loss). Position embeddings of encoder and
decoder are fixed 2D sin-cos, as in the paper.

The pieces (`patchify`, `random_masking`, `encode`, `decode`, `reconstruction_loss`) are public so RC-MAE
and MixedAE build on them instead of copying them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block

from mimbench.backbones.vit import create_backbone


@dataclass
class AutoencoderConfig:
    """What every MAE-style method shares: the encoder arch and MAE's decoder (8 x 512 for ViT-B)."""

    arch: str = "vit_base_patch16_224"
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    drop_path_rate: float = 0.0


@dataclass
class MAEConfig(AutoencoderConfig):
    mask_ratio: float = 0.75


def sincos_pos_embed(grid_size: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding with a zero row for the class token: (1, 1 + H*W, dim)."""
    patches = build_sincos2d_pos_embed(list(grid_size), dim=dim)
    return torch.cat([torch.zeros(1, dim), patches]).unsqueeze(0)


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
    num_keep = int(round(num_patches * (1 - mask_ratio)))
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
        with torch.no_grad():
            self.encoder.pos_embed.copy_(sincos_pos_embed(grid, width))
        self.encoder.pos_embed.requires_grad_(False)

        self.decoder_embed = nn.Linear(width, config.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(grid, config.decoder_dim), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(config.decoder_dim, config.decoder_heads, mlp_ratio=4.0, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(config.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(config.decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(config.decoder_dim, self.patch_size ** 2 * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks]:
            module.apply(_init_linear_and_norm)

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
    """Xavier-uniform linear layers and unit LayerNorms, as the MAE paper's decoder."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

"""RC-MAE: MAE with an EMA teacher (Lee et al., "Exploring the Role of Mean Teachers in Self-supervised Masked
Auto-Encoders", ICLR 2023, arXiv 2210.02077).

The student is an MAE. The teacher is an exponential moving average of the whole student (encoder and
decoder), takes no gradients and sees the SAME mask. The student is trained on

    loss = MAE reconstruction loss + γ · mean over masked patches of ‖student_pred − teacher_pred‖²   (γ = 1)

The paper reads the teacher as a conditional gradient correction, which is cheaper than self-distillation
with multi-crop. Teacher momentum follows a cosine schedule from 0.996 to 1 over ALL training steps. (The
official code indexes that schedule with the step inside the current epoch, so its momentum restarts at
0.996 every epoch; here the global step is used, as the paper describes.) The teacher's encoder is the one
exported for downstream use, as RC-MAE fine-tunes the teacher.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from mimbench.pretrain.mae import MAEConfig, MaskedAutoencoder, masked_mean, random_masking


@dataclass
class RCMAEConfig(MAEConfig):
    consistency_weight: float = 1.0  # γ
    momentum_start: float = 0.996
    momentum_end: float = 1.0


def teacher_momentum(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine ramp from ``start`` at step 0 to ``end`` at ``total_steps``, over the whole run."""
    progress = min(step / max(total_steps, 1), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


class ReconstructionConsistentMAE(nn.Module):
    def __init__(self, config: RCMAEConfig) -> None:
        super().__init__()
        self.config = config
        self.student = MaskedAutoencoder(config)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)

    def train(self, mode: bool = True) -> ReconstructionConsistentMAE:
        super().train(mode)
        self.teacher.eval()  # the teacher predicts; no drop path or dropout noise
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        keep_index, mask, restore_index = random_masking(
            images.shape[0], self.student.num_patches, self.config.mask_ratio, images.device)
        student_prediction = self.student.decode(self.student.encode(images, keep_index), restore_index)
        with torch.no_grad():
            teacher_prediction = self.teacher.decode(self.teacher.encode(images, keep_index), restore_index)
        reconstruction = self.student.reconstruction_loss(images, student_prediction, mask)
        consistency = masked_mean((student_prediction.float() - teacher_prediction.float()).pow(2).mean(-1), mask)
        loss = reconstruction + self.config.consistency_weight * consistency
        return loss, {"loss_recon": reconstruction.detach(), "loss_consistency": consistency.detach()}

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        """EMA update of the teacher after optimizer step ``step`` (1-based) of ``total_steps``."""
        momentum = teacher_momentum(step, total_steps, self.config.momentum_start, self.config.momentum_end)
        # teacher ← m·teacher + (1 − m)·student, as one fused multi-tensor lerp over all parameters
        torch._foreach_lerp_(list(self.teacher.parameters()), [p.detach() for p in self.student.parameters()],
                             1 - momentum)
        return {"teacher_momentum": momentum}

    def visualize(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.teacher.visualize(images)

    def export_encoder(self) -> nn.Module:
        return self.teacher.encoder

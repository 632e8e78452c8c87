"""RC-MAE: MAE with an EMA teacher (Lee et al., "Exploring the Role of Mean Teachers in Self-supervised Masked
Auto-Encoders", ICLR 2023, arXiv 2210.02077).

The student is an MAE. The teacher is an exponential moving average of the whole student (encoder and
decoder), takes no gradients and sees the SAME mask. The student is trained on

    loss = MAE reconstruction loss + γ · mean over masked patches of ‖student_pred − teacher_pred‖²   (γ = 1)

The paper reads the teacher as a conditional gradient correction, which is cheaper than self-distillation
with multi-crop. The teacher's encoder is the one exported for downstream use, as RC-MAE fine-tunes the teacher.

The teacher's momentum m (teacher ← m · teacher + (1 − m) · student) has two schedules, ``teacher_schedule``:

- ``release`` (the default): what trained the published checkpoints (youngwanLEE/rc-mae, ``engine_pretrain.py``
  and ``run_pretrain.py``). The EMA is applied after EVERY micro-batch, inside gradient accumulation too (the first
  micro-batches of a step pull the teacher towards the student before that step's update), and m is read from a
  cosine 0.996 → 1 over epochs × micro-batches per epoch at the micro-batch's index WITHIN its epoch, so it
  restarts at 0.996 every epoch and never leaves it by more than 0.004 · (1 − cos(π / epochs)) / 2 (4e-9 over
  1600 epochs). Per micro-batch m = 0.996; per optimizer step with accumulation a the teacher keeps 0.996^a of
  itself: 0.996² ≈ 0.992 in the release's ViT-B / ViT-L scripts (batch 256 × 2 accumulation × 8 GPUs), 0.996 in
  its ViT-S script (no accumulation), for the whole run. Ours reproduces that per optimizer step on any number of
  processes: with ``release_accumulation`` R (the release script's ``--accum_iter``: 2 for ViT-B / ViT-L, 1 for
  ViT-S) and our accumulation a (what the process count leaves of the total batch), each micro-batch applies
  m^(R/a). Every update of a step's window pulls towards the same student (the one after that step), so the
  teacher at every step boundary keeps m^R of itself whatever a is; at a = R the updates are the release's one by
  one. The release also runs an epoch's odd last micro-batch (625 per epoch on 8 GPUs: its backward is discarded,
  its EMA update kept); ours runs whole optimizer steps only, so such an epoch has one EMA update fewer here.
- ``cosine``: the schedule the paper describes, one EMA update per optimizer step with m on a cosine from 0.996 at
  the first step to 1 at the last, over all steps of the run: per step 1 − m falls from 0.004 to 0, 0.002 on
  average, so this teacher moves about 4 × slower than the release's at accumulation 2 (0.008 per step).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from mimbench.pretrain.mae import MAEConfig, MaskedAutoencoder, masked_mean, random_masking

TEACHER_SCHEDULES = ("release", "cosine")


@dataclass
class RCMAEConfig(MAEConfig):
    consistency_weight: float = 1.0  # γ (the release's --gamma 1.0)
    momentum_start: float = 0.996  # the release's --momentum_teacher
    momentum_end: float = 1.0
    teacher_schedule: str = "release"  # release | cosine (see the module docstring)
    release_accumulation: int = 2  # release: the release script's --accum_iter (micro-batches per optimizer step)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.teacher_schedule not in TEACHER_SCHEDULES:
            raise ValueError(f"teacher_schedule must be one of {', '.join(TEACHER_SCHEDULES)}, not "
                             f"{self.teacher_schedule!r}")


@dataclass(frozen=True)
class MicroBatch:
    """Where a finished micro-batch (forward, backward and, if it closed a step, the optimizer step) stands in the
    run: what the engine tells a method's ``after_micro_batch``."""

    index_in_epoch: int  # 0-based, on this process
    per_epoch: int  # micro-batches per epoch on this process: steps per epoch × accumulation steps
    accumulation: int  # micro-batches per optimizer step
    epochs: int
    step: int  # optimizer steps done so far, this micro-batch's included
    total_steps: int
    stepped: bool  # whether the optimizer stepped after this micro-batch


def teacher_momentum(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine ramp from ``start`` at step 0 to ``end`` at ``total_steps`` (the release's ``cosine_scheduler``, taken
    from DINO, without warmup)."""
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

    def momentum(self, micro_batch: MicroBatch) -> float | None:
        """The EMA momentum after ``micro_batch`` under the configured schedule; None where it updates nothing."""
        start, end = self.config.momentum_start, self.config.momentum_end
        if self.config.teacher_schedule == "release":  # every micro-batch, by its index within the epoch
            momentum = teacher_momentum(micro_batch.index_in_epoch, micro_batch.epochs * micro_batch.per_epoch,
                                        start, end)
            return momentum ** (self.config.release_accumulation / micro_batch.accumulation)
        if not micro_batch.stepped:
            return None
        return teacher_momentum(micro_batch.step, micro_batch.total_steps, start, end)

    def after_micro_batch(self, micro_batch: MicroBatch) -> dict[str, float]:
        """The teacher's EMA update after ``micro_batch``, as the schedule says."""
        momentum = self.momentum(micro_batch)
        if momentum is None:
            return {}
        self.update_teacher(momentum)
        return {"teacher_momentum": momentum}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher ← m·teacher + (1 − m)·student over every parameter (the release's loop over ``parameters()``),
        as one fused multi-tensor lerp."""
        torch._foreach_lerp_(list(self.teacher.parameters()), [p.detach() for p in self.student.parameters()],
                             1 - momentum)

    def visualize(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.teacher.visualize(images)

    def export_encoder(self) -> nn.Module:
        return self.teacher.encoder

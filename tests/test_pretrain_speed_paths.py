"""The pretraining step's speed paths compute what the plain paths compute: fused AdamW, the attention kernel
chosen per device and precision, TopK from topk's values; and the rule for when the engine compiles."""

from __future__ import annotations

import copy

import pytest
import torch

from mimbench.core.errors import ConfigError
from mimbench.pretrain.engine import (
    COMPILE_MIN_STEPS,
    build_optimizer,
    choose_attention_kernels,
    compile_wanted,
    weight_decay_groups,
)
from mimbench.pretrain.mae import MAEConfig, MaskedAutoencoder
from mimbench.pretrain.mixedae import homologous_softmax
from mimbench.pretrain.rcmae import RCMAEConfig, ReconstructionConsistentMAE

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = dict(arch="vit_tiny_patch4_32", decoder_dim=128, decoder_depth=2, decoder_heads=4)
CPU = torch.device("cpu")


@pytest.mark.parametrize(("setting", "device", "steps", "expected"), [
    ("auto", "cuda", COMPILE_MIN_STEPS, True),
    ("auto", "cuda", COMPILE_MIN_STEPS - 1, False),  # a short run does not pay back the compile
    ("auto", "cpu", 10 ** 6, False),  # never on a CPU by itself
    ("on", "cpu", 1, True),
    ("off", "cuda", 10 ** 6, False),
])
def test_compile_rule(setting, device, steps, expected):
    assert compile_wanted(setting, device, steps) is expected


def test_compile_setting_outside_the_choices_is_one_line():
    with pytest.raises(ConfigError, match="--compile 'yes': choose one of auto, on, off"):
        compile_wanted("yes", "cuda", 10 ** 6)


def test_fused_adamw_keeps_the_decay_groups_and_gives_the_default_update():
    torch.manual_seed(0)
    fused_model = MaskedAutoencoder(MAEConfig(**TINY))
    plain_model = copy.deepcopy(fused_model)
    fused = build_optimizer(weight_decay_groups(fused_model, 0.05), 1e-3, CPU)
    plain = torch.optim.AdamW(weight_decay_groups(plain_model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    assert all(group["fused"] for group in fused.param_groups)
    assert [group["weight_decay"] for group in fused.param_groups] == [0.0, 0.05]
    assert [len(g["params"]) for g in fused.param_groups] == [len(g["params"]) for g in plain.param_groups]
    start = copy.deepcopy(fused_model.state_dict())
    fused_model(torch.randn(4, 3, 32, 32))[0].backward()
    gradients = [p.grad for p in fused_model.parameters()]
    for _ in range(3):  # the same gradients into both: the optimizers alone differ
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            for param, gradient in zip(model.parameters(), gradients, strict=True):
                param.grad = None if gradient is None else gradient.clone()
            optimizer.step()
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=name)  # a last bit apart at most
        assert not b.requires_grad or not torch.equal(b, start[name]), name  # the steps moved every weight


@pytest.mark.parametrize(("dtype", "fused"), [(torch.bfloat16, False), (None, True)])
def test_attention_kernel_follows_the_precision_on_a_cpu(dtype, fused):
    torch.manual_seed(0)
    model = ReconstructionConsistentMAE(RCMAEConfig(**TINY))
    choose_attention_kernels(model, CPU, dtype)
    flags = [module.fused_attn for module in model.modules() if hasattr(module, "fused_attn")]
    assert len(flags) == 2 * (12 + 2)  # student and teacher, encoder and decoder blocks
    assert set(flags) == {fused}


def test_both_attention_kernels_compute_the_same_loss():
    torch.manual_seed(0)
    model = MaskedAutoencoder(MAEConfig(**TINY))
    images = torch.randn(4, 3, 32, 32)
    losses = []
    for dtype in (None, torch.bfloat16):  # fp32 runs keep the fused kernel; the bf16 choice runs the matmul path
        choose_attention_kernels(model, CPU, dtype)
        torch.manual_seed(1)
        losses.append(model(images)[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_homologous_softmax_masks_bit_for_bit_like_gathering_the_topk(dtype):
    """A mask from topk's indices gives the weights and gradients of gathering the TopK logits, bit for bit."""
    torch.manual_seed(0)
    logits = (torch.randn(2, 3, 20, 21) * 3).to(dtype)
    upstream = torch.randn(2, 3, 20, 21).to(dtype)
    results = []
    for reference in (True, False):
        x = logits.clone().requires_grad_()
        if reference:
            index = x[..., 1:].topk(5, dim=-1).indices + 1
            kept = torch.full_like(x, float("-inf")).scatter(-1, index, x.gather(-1, index))
            kept[..., :1] = x[..., :1]
            weights = kept.softmax(dim=-1)
        else:
            weights, index = homologous_softmax(x, 5, always_kept=1)
        (weights * upstream).sum().backward()
        results.append((weights.detach(), index.sort(dim=-1).values, x.grad))
    for got, expected in zip(results[1], results[0], strict=True):
        assert torch.equal(got, expected)

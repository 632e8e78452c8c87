"""Our MAE training step against MMPretrain 1.2.0's, the same step on the same machine, side by side.

Both sides: ViT-B/16, batch 8 of 224² images, MAE's decoder (8 blocks, 512 wide, 16 heads), norm-pix loss, mask
ratio 0.75, AdamW (β 0.9/0.95, wd 0.05), bf16 autocast or fp32. Ours is the engine's step
(`benchmarks/pretrain_step.py`'s `MethodStep`: fused AdamW with MAE's weight-decay groups, the engine's attention
kernel choice). MMPretrain's is its own ``train_step`` with the optimizer wrapper its MAE config builds
(``configs/mae/mae_vit-base-p16_8xb512-amp-coslr-300e_in1k.py``: ``paramwise_cfg`` without decay for norms,
biases, position embeddings and tokens; ``AmpOptimWrapper`` in bf16 on CUDA; on a CPU, where mmengine's
``AmpOptimWrapper`` asserts a GPU, ``OptimWrapper`` with mmengine's own ``autocast`` around the step, what
``AmpOptimWrapper.optim_context`` does). The rounds alternate the two sides; the medians' ratio is printed against
the goal (ours ÷ theirs ≤ 0.8) for every precision asked for.

    pip install --no-deps mmpretrain==1.2.0       # the `bench` extra; --no-deps: see below
    python benchmarks/vs_mmpretrain.py            # bf16 and fp32 on this CPU
    python benchmarks/vs_mmpretrain.py --precision fp32 --rounds 6
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import statistics
import sys
import types
import warnings

import torch

from mimbench.benchmarks.pretrain_step import MethodStep, timed
from mimbench.core.runtime import autocast_dtype, precision_name

GOAL = 0.8  # ours ÷ MMPretrain's step time
MMPRETRAIN = "1.2.0"


def import_mmpretrain() -> tuple[object, object, object]:
    """MMPretrain's model registry, mmengine's optimizer-wrapper builder and autocast, after the stand-ins its
    package import needs in our venv. ``pip install --no-deps`` (beside the mmengine and mmcv-lite already there)
    leaves out its declared requirements; three of them ``import mmpretrain`` loads while MAE never calls them (no
    upstream issue: they are declared, and only skipped here):
    ``importlib_metadata`` (``mmpretrain/utils/dependency.py``; the standard library's ``importlib.metadata`` is
    the same API), ``modelindex`` (``mmpretrain/apis/model.py``: the model zoo's index) and ``einops``
    (``mmpretrain/models/utils/vector_quantizer.py``: BEiT v2's tokenizer)."""
    def stand_in(name: str, **attributes: object) -> None:
        if name not in sys.modules:
            module = types.ModuleType(name, "a stand-in for a requirement of mmpretrain that MAE never calls")
            module.__path__ = []
            module.__dict__.update(attributes)
            sys.modules[name] = module

    sys.modules.setdefault("importlib_metadata", importlib.metadata)
    for name in ("modelindex", "modelindex.models"):
        stand_in(name)
    stand_in("modelindex.load_model_index", load=None)
    stand_in("modelindex.models.Model", Model=object)
    stand_in("einops", rearrange=None, repeat=None)
    warnings.filterwarnings("ignore", message="Fail to import ``MultiScaleDeformableAttention``")  # mmcv-lite: no ops
    try:
        version = importlib.metadata.version("mmpretrain")
        import mmpretrain.models  # noqa: F401  registers MAE, MAEViT, the decoder and head
        from mmengine.logging import MMLogger
        from mmengine.optim import build_optim_wrapper
        from mmengine.runner.amp import autocast
        from mmpretrain.registry import MODELS
    except (ImportError, importlib.metadata.PackageNotFoundError) as error:
        sys.exit(f"error: MMPretrain {MMPRETRAIN} is needed ({error}); install it beside mmengine and mmcv-lite "
                 f"with: pip install --no-deps mmpretrain=={MMPRETRAIN}")
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # not a line per parameter of every model built
    if version != MMPRETRAIN:
        print(f"note: MMPretrain {version} installed; this comparison was written for {MMPRETRAIN}", flush=True)
    return MODELS, build_optim_wrapper, autocast


class MMPretrainStep:
    """MMPretrain's MAE (its ``mae_vit-base-p16`` model config) and optimizer wrapper, one ``train_step`` a call."""

    def __init__(self, batch_size: int, device: torch.device, dtype: torch.dtype | None) -> None:
        models, build_optim_wrapper, self.autocast = import_mmpretrain()
        torch.manual_seed(0)
        self.model = models.build(dict(
            type="MAE",
            backbone=dict(type="MAEViT", arch="b", patch_size=16, mask_ratio=0.75),
            neck=dict(type="MAEPretrainDecoder", patch_size=16, in_chans=3, embed_dim=768, decoder_embed_dim=512,
                      decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0),
            head=dict(type="MAEPretrainHead", norm_pix=True, patch_size=16,
                      loss=dict(type="PixelReconstructionLoss", criterion="L2")),
            data_preprocessor=dict(type="SelfSupDataPreprocessor"),  # no mean/std: our batch is normalised already
            init_cfg=[dict(type="Xavier", layer="Linear", distribution="uniform"),
                      dict(type="Constant", layer="LayerNorm", val=1.0, bias=0.0)],
        ))
        self.model.init_weights()
        self.model.to(device).train()
        amp = dtype is not None and device.type == "cuda"
        no_decay = dict(decay_mult=0.0)
        self.optim_wrapper = build_optim_wrapper(self.model, dict(
            type="AmpOptimWrapper" if amp else "OptimWrapper", **(dict(dtype="bfloat16") if amp else {}),
            optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05),
            paramwise_cfg=dict(custom_keys={key: no_decay for key in
                                            ("ln", "bias", "pos_embed", "mask_token", "cls_token")})))
        self.cpu_bf16 = dtype is not None and not amp
        self.device = device
        self.data = dict(inputs=torch.randn(batch_size, 3, 224, 224, device=device), data_samples=None)
        self.seconds()  # warm-up

    def step(self) -> None:
        if self.cpu_bf16:
            with self.autocast(device_type="cpu", dtype=torch.bfloat16):
                self.model.train_step(self.data, self.optim_wrapper)
        else:
            self.model.train_step(self.data, self.optim_wrapper)

    def seconds(self) -> float:
        return timed(self.step, self.device)


def compare(args: argparse.Namespace, device: torch.device, precision: str) -> float:
    """Alternating rounds of our step and MMPretrain's; prints both medians and returns their ratio."""
    dtype = autocast_dtype(device, precision)
    ours = MethodStep("mae", argparse.Namespace(arch="vit_base_patch16_224", batch_size=args.batch_size), device,
                      dtype)
    theirs = MMPretrainStep(args.batch_size, device, dtype)
    times: dict[str, list[float]] = {"ours": [], "mmpretrain": []}
    for round_index in range(args.rounds):
        sides = [("ours", ours), ("mmpretrain", theirs)]
        for name, side in sides if round_index % 2 == 0 else reversed(sides):
            times[name].append(side.seconds())
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["ours"] / medians["mmpretrain"]
    print(f"{precision_name(dtype)}: ours {medians['ours']:.2f} s/step, MMPretrain {medians['mmpretrain']:.2f} "
          f"s/step (medians of {args.rounds}); ratio {ratio:.3f} (goal <= {GOAL}: "
          f"{'met' if ratio <= GOAL else 'NOT met'})", flush=True)
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per precision (medians)")
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    import_mmpretrain()  # before any model is built: a missing install is one line
    device = torch.device(args.device)
    print(f"MAE ViT-B/16, batch {args.batch_size}, 224², decoder 8 x 512, norm-pix, mask 0.75, AdamW, on {device} "
          f"({torch.get_num_threads()} threads)", flush=True)
    for precision in args.precision:
        compare(args, device, precision)
    return 0


if __name__ == "__main__":
    sys.exit(main())

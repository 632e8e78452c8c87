"""Shims that let mmsegmentation 1.2.2 run on mmcv-lite 2.1.0 (no compiled ops) and torch >= 2.6.

Call :func:`install` before the first ``import mmseg``. Each shim names the upstream problem it works around;
none changes behaviour the ADE20K adapter relies on (EncoderDecoder, Feature2Pyramid, UPerHead, FCNHead,
IoUMetric, the mmengine Runner).
"""

from __future__ import annotations

import os
import sys
import types

import torch
import torch.nn.functional as F


def point_sample(input: torch.Tensor, points: torch.Tensor, align_corners: bool = False, **kwargs) -> torch.Tensor:
    """Features of ``input`` (N, C, H, W) at ``points`` in [0, 1]² ((N, P, 2) or (N, Hg, Wg, 2)).

    mmcv's own ``point_sample`` is pure Python over ``grid_sample`` too, but it lives in ``mmcv.ops``, whose
    package import needs the compiled ``mmcv._ext``.
    """
    flat = points.dim() == 3
    grid = points.unsqueeze(2) if flat else points
    output = F.grid_sample(input, 2.0 * grid - 1.0, align_corners=align_corners, **kwargs)
    return output.squeeze(3) if flat else output


def _needs_compiled_ops(name: str):
    def unavailable(*args, **kwargs):
        raise ModuleNotFoundError(f"mmcv.ops.{name} needs mmcv built with its compiled ops; mmcv-lite has none")

    unavailable.__name__ = name
    return unavailable


def _missing_op(name: str):
    # mmseg guards its optional ops with ``except ModuleNotFoundError`` (not ImportError), so a missing name
    # must raise exactly that for e.g. ``from mmcv.ops import CrissCrossAttention`` to fall back.
    if name.startswith("__"):
        raise AttributeError(name)
    raise ModuleNotFoundError(f"mmcv.ops.{name} is not available: mmcv-lite ships no compiled ops")


def install_mmcv_ops_stub() -> None:
    """Make ``import mmcv.ops`` succeed with mmcv-lite.

    Upstream problem: mmseg 1.2.2 imports ``mmcv.ops`` unguarded in ``utils/mask_classification.py``,
    ``models/utils/point_sample.py``, ``decode_heads/san_head.py`` and ``losses/focal_loss.py``, so
    ``import mmseg.models`` fails on mmcv-lite (``No module named 'mmcv._ext'``) although UperNet needs no op.
    The stub provides a pure-Python ``point_sample``, a ``sigmoid_focal_loss`` that raises when called (mmseg's
    focal loss only calls it on CUDA tensors), and ModuleNotFoundError for every other name. mmengine still
    sees mmcv-lite as such: its ``mmcv_full_available()`` looks for ``mmcv._ext``, which stays absent.
    """
    if "mmcv.ops" in sys.modules:
        return
    try:
        import mmcv.ops  # noqa: F401  a full mmcv with compiled ops needs no stub
        return
    except ModuleNotFoundError:
        sys.modules.pop("mmcv.ops", None)
    stub = types.ModuleType("mmcv.ops", "mmcv-lite stand-in: pure-Python point_sample, no compiled ops")
    stub.point_sample = point_sample
    stub.sigmoid_focal_loss = _needs_compiled_ops("sigmoid_focal_loss")
    stub.__getattr__ = _missing_op
    sys.modules["mmcv.ops"] = stub
    import mmcv

    mmcv.ops = stub


def mmengine_checkpoint_globals() -> list:
    """The non-tensor types an mmengine 0.10.7 checkpoint pickles (meta, message hub, schedulers).

    Upstream problem: mmengine loads checkpoints with a bare ``torch.load``; since torch 2.6 that means
    ``weights_only=True``, which refuses these types, so ``--resume`` and ``--eval-only`` fail. They are
    allow-listed one by one instead of turning ``weights_only`` off.
    """
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    # The message hub keeps its logs as HistoryBuffers of numpy arrays; numpy scalars and dtypes come along.
    numpy_types = [np.ndarray, np.dtype, np._core.multiarray._reconstruct, np._core.multiarray.scalar]
    numpy_types += [type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32", "bool")]
    # A HistoryBuffer pickles its statistics methods as ``getattr(HistoryBuffer, "min")``; the real getattr
    # stays refused, this stand-in resolves only those methods.
    return [HistoryBuffer, *numpy_types, (history_buffer_statistic, "builtins.getattr")]


def history_buffer_statistic(owner: object, name: str):
    """``builtins.getattr`` while unpickling under weights_only: only a HistoryBuffer statistics method."""
    import pickle

    from mmengine.logging.history_buffer import HistoryBuffer

    # the defaults HistoryBuffer registers on first use, and any registered since
    if owner is HistoryBuffer and name in {"min", "max", "current", "mean", *HistoryBuffer._statistics_methods}:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f"checkpoint asks for getattr({owner!r}, {name!r}): only HistoryBuffer statistics "
                                 f"methods are allowed")


def load_mmengine_checkpoint(filename: str, map_location=None, mmap: bool = False):
    """mmengine's local-file checkpoint loader, with ``weights_only=True`` and the allow-list above (``mmap``: the
    tensors stay on disk until read, for a look at names and shapes).

    The allow-list is scoped to this load (``torch.serialization.safe_globals``) rather than added process-wide
    with ``add_safe_globals``: torch's ``safe_globals`` context removes its types on exit even where they were
    allowed before, so any such context elsewhere (our backbone loader uses one for numpy dtypes) would strip a
    process-wide entry and break a later resume.
    """
    filename = os.path.expanduser(filename)
    if not os.path.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    with torch.serialization.safe_globals(mmengine_checkpoint_globals()):
        return torch.load(filename, map_location=map_location, weights_only=True, mmap=mmap)


def install_checkpoint_loader() -> None:
    from mmengine.runner.checkpoint import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes="", loader=load_mmengine_checkpoint, force=True)


def quiet_mmcv_lite_warning() -> None:
    """mmcv warns on import that MultiScaleDeformableAttention needs full mmcv; UperNet never uses it, and the
    warning would suggest to every user that the install is broken."""
    import warnings

    warnings.filterwarnings("ignore", message="Fail to import ``MultiScaleDeformableAttention``")


def install() -> None:
    """Every shim, idempotently; before the first ``import mmseg``."""
    quiet_mmcv_lite_warning()
    install_mmcv_ops_stub()
    install_checkpoint_loader()

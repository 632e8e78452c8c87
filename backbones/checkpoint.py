"""The one checkpoint loader: every entry point reads backbone weights through :func:`load_backbone`, and a
pretraining run that starts from a full checkpoint (encoder and decoder) reads it through
:func:`load_pretraining_checkpoint`.

Reads
- our own checkpoints: safetensors with JSON metadata in the header (method, arch, epochs, data, git commit),
  or torch files;
- the public ViT layouts users bring: official MAE (``model``, encoder + decoder), RC-MAE (``model`` = student,
  ``teacher`` or ``model_ema`` = EMA teacher; the teacher by default, as RC-MAE fine-tunes the teacher), timm,
  MMPretrain / mmseg (``backbone.`` prefix, ``layers.N`` / ``ln1`` / ``ffn`` names), DINO / iBOT
  (``teacher`` / ``student``, ``module.`` / ``backbone.`` prefixes).

It keeps the encoder (decoders, mask tokens and projection heads are set aside and reported), maps names to
timm's, resamples a ViT's ``pos_embed`` to the model's grid (bicubic, class token kept) and reports missing and
unexpected keys. A hierarchical backbone (:mod:`mimbench.backbones.registry`) is read from our own files or
any state dict with the model's key names, under any prefix. Torch files are read with ``weights_only=True``:
nothing is ever unpickled with code execution. Every problem is one :class:`CheckpointError` line that names
the file.

A full pretraining checkpoint (official MAE's ``model`` with its decoder, the RC-MAE release's ``student`` and
``teacher``, our own training state) goes whole into one of our pretraining models, every tensor of the file and
of the model used, or not at all.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import warnings
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from mimbench.backbones.mpvit import MPViT, official_key
from mimbench.backbones.registry import HIERARCHICAL_ARCHS
from mimbench.backbones.vit import ARCHS, backbone_archs, create_backbone
from mimbench.core.errors import UserError
from mimbench.core.io import atomic_write

FORMAT_TAG = "mimbench"
# Container keys of a file that holds an EMA teacher beside the trained model (RC-MAE, DINO/iBOT, timm and
# MMPretrain EMA), and of the model itself.
TEACHER_KEYS = ("teacher", "model_ema", "state_dict_ema", "ema_state_dict")
STUDENT_KEYS = ("student", "model", "state_dict")
# Globals that public checkpoints carry beside their weights (MAE/DINO pickle ``args`` as a Namespace; some
# store numpy scalars). Rebuilding them runs no code; everything else stays refused.
SAFE_GLOBALS: list[Any] = [
    argparse.Namespace,
    np.dtype,
    np._core.multiarray.scalar,
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),  # files written under numpy 1.x
    *(type(np.dtype(code)) for code in "?bhilqBHILQefdgFD"),
]
# Top-level names of an encoder's state dict in timm's layout; anything else beside them is not encoder.
ENCODER_ROOTS = ("cls_token", "reg_token", "dist_token", "pos_embed", "patch_embed", "norm_pre", "blocks", "norm",
                 "fc_norm", "head")
# Classification heads, which a backbone checkpoint need not hold: a ViT's head and pooled norm, a ResNet's fc,
# an MPViT's cls_head.
HEAD_ROOTS = ("head", "fc_norm", "fc", "cls_head")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: the message is one line naming the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


@dataclass
class CheckpointMetadata:
    """What our checkpoints say about themselves (stored as JSON in the safetensors header)."""

    method: str
    arch: str
    epochs: float | None = None
    data: str | None = None
    git_commit: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CheckpointMetadata:
        fields = json.loads(text)
        return cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})


@dataclass
class LoadReport:
    """What a load did: which keys came from the file, which the model lacks or the file lacks."""

    path: str
    source_format: str
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    set_aside: list[str]
    resized: dict[str, tuple[list[int], list[int]]]
    metadata: CheckpointMetadata | None = None

    @property
    def missing_encoder(self) -> list[str]:
        """Missing keys outside the classification head: these would stay randomly initialised."""
        return [k for k in self.missing if k.split(".")[0] not in HEAD_ROOTS]

    @property
    def encoder_fraction(self) -> float:
        encoder_loaded = [k for k in self.loaded if k.split(".")[0] not in HEAD_ROOTS]
        total = len(encoder_loaded) + len(self.missing_encoder)
        return len(encoder_loaded) / total if total else 0.0

    def summary(self) -> str:
        lines = [
            f"checkpoint {self.path} ({self.source_format}): loaded {len(self.loaded)} tensors, "
            f"{100 * self.encoder_fraction:.1f}% of encoder weights",
        ]
        if self.metadata is not None:
            m = self.metadata
            lines.append(f"  written by {FORMAT_TAG}: method={m.method} arch={m.arch} epochs={m.epochs} "
                         f"data={m.data} commit={m.git_commit}")
        for key, (old, new) in self.resized.items():
            lines.append(f"  resized {key}: {old} -> {new}")
        if self.missing:
            lines.append(f"  missing (left as initialised): {_abbreviate(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected (ignored): {_abbreviate(self.unexpected)}")
        if self.set_aside:
            lines.append(f"  not encoder (set aside): {_abbreviate(self.set_aside)}")
        return "\n".join(lines)


def _abbreviate(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


# ----------------------------------------------------------------------------------------------- writing


def save_backbone(
    path: str | os.PathLike, weights: nn.Module | Mapping[str, torch.Tensor], metadata: CheckpointMetadata
) -> Path:
    """Write encoder weights (timm key names) as safetensors with ``metadata`` in the header, atomically."""
    state_dict = weights.state_dict() if isinstance(weights, nn.Module) else dict(weights)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    header = {"format": FORMAT_TAG, "metadata": metadata.to_json()}
    return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=header))


# ----------------------------------------------------------------------------------------------- reading


def check_checkpoint(path: str | os.PathLike | None) -> None:
    """The loader's one-line :class:`CheckpointError` now if ``path`` cannot be read (None: nothing to check)."""
    if path is not None:
        read_checkpoint(path)


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length followed by a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") < path.stat().st_size


def read_checkpoint(path: str | os.PathLike) -> tuple[Any, CheckpointMetadata | None]:
    """The file's content (a mapping) and, for our own files, their metadata. Never executes pickled code."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file")
    if path.is_dir():
        raise CheckpointError(path, "is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "is empty (0 bytes)")
    if _is_safetensors(path):
        return _read_safetensors(path)
    return _read_torch(path), None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], CheckpointMetadata | None]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(path, f"corrupt or truncated safetensors file ({_first_line(error)})") from None
    metadata = None
    if header.get("format") == FORMAT_TAG and "metadata" in header:
        try:
            metadata = CheckpointMetadata.from_json(header["metadata"])
        except (ValueError, TypeError) as error:
            raise CheckpointError(path, f"unreadable {FORMAT_TAG} metadata ({_first_line(error)})") from None
    return tensors, metadata


def _read_torch(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's pickle-protocol notes; our error says more
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        refused = re.search(r"GLOBAL ([\w.]+)", message)
        if refused is not None:
            raise CheckpointError(
                path,
                f"refused: unpickling it would call {refused.group(1)}, which can run code; "
                "re-save its state dict with torch.save(model.state_dict()) or as safetensors",
            ) from None
        opcode = re.search(r"Unsupported operand (\d+)", message)
        if opcode is not None or "Weights only load failed" not in message:
            raise CheckpointError(path, "corrupt, or not a torch.save / safetensors file "
                                        f"(unreadable pickle stream{f', opcode {opcode.group(1)}' if opcode else ''})"
                                  ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", message)
        raise CheckpointError(
            path,
            f"refused: it holds objects other than tensors and plain containers"
            f"{f' ({detail.group(1).strip()})' if detail else ''}; re-save its state dict as safetensors",
        ) from None
    except Exception as error:  # damaged bytes surface as any error type from the unpickler or zip reader
        text = _first_line(error)
        if "zip" in text.lower() or isinstance(error, EOFError):
            raise CheckpointError(path, f"truncated or corrupt archive ({text})") from None
        raise CheckpointError(path, f"corrupt, or not a torch.save / safetensors file ({text})") from None


def _first_line(error: BaseException) -> str:
    """The error's first sentence, prefixed by its type: enough to act on, short enough for one line."""
    lines = str(error).strip().splitlines()
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


# ------------------------------------------------------------------------------------ finding the encoder


def _select_weights(obj: Any, path: Path, which: str) -> tuple[dict[str, Any], str]:
    """Pick the flat weight mapping out of a checkpoint container, and name the container's layout."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a mapping of weights")
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', not {which!r}")
    teacher_key = next((k for k in TEACHER_KEYS if isinstance(obj.get(k), Mapping)), None)
    student_key = next((k for k in STUDENT_KEYS if isinstance(obj.get(k), Mapping)), None)
    if teacher_key is not None and student_key is not None:
        key = teacher_key if which == "teacher" else student_key
        return dict(obj[key]), f"{which} weights ('{key}')"
    if teacher_key is not None or student_key is not None:
        key = teacher_key or student_key
        return dict(obj[key]), f"'{key}' weights"
    return dict(obj), "flat state dict"


def _strip_to_encoder(
    weights: dict[str, Any], path: Path, which: str, model_keys: Collection[str] | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keep the keys under the encoder's prefix, with the prefix removed.

    The prefix is found from the keys that mark the encoder: a ViT's patch embedding (``model_keys`` None: every
    public ViT layout has one), or the state-dict keys of the model to load (``<prefix><model key>``; any other
    backbone). Where several prefixes qualify, the one marking the most keys wins, then the one naming ``which``
    (a flat file with two encoders, as our RC-MAE training state: ``student.encoder.*``, ``teacher.encoder.*``),
    then the shortest.
    """
    if not weights:
        raise CheckpointError(path, "holds an empty state dict")
    marks = Counter(prefix for key in weights for prefix in _encoder_prefixes(key, model_keys))
    if not marks and model_keys is None:
        raise CheckpointError(path, "no ViT encoder weights found (no patch_embed.* key; keys look like: "
                                    f"{_abbreviate(sorted(weights), 4)})")
    if not marks:
        raise CheckpointError(path, f"no weights of this backbone found (no key ends in one of its names, such as "
                                    f"{_abbreviate(sorted(model_keys), 2)}; keys look like: "
                                    f"{_abbreviate(sorted(weights), 4)})")
    prefix = min(marks, key=lambda p: (-marks[p], which not in p, len(p)))
    encoder, set_aside = {}, []
    for key, value in weights.items():
        if key.startswith(prefix) and isinstance(value, torch.Tensor):
            encoder[key[len(prefix):]] = value
        else:
            set_aside.append(key)
    return encoder, set_aside


def _encoder_prefixes(key: str, model_keys: Collection[str] | None) -> list[str]:
    """The prefixes under which ``key`` marks an encoder: before its ``patch_embed.`` (a ViT), or before each
    dotted suffix that is one of ``model_keys``."""
    if model_keys is None:
        match = re.match(r"^(.*?)patch_embed\.", key)
        return [match.group(1)] if match else []
    parts = key.split(".")
    return [".".join(parts[:i] + [""]) if i else "" for i in range(len(parts)) if ".".join(parts[i:]) in model_keys]


# MMPretrain / mmseg ViT names -> timm names (per block, then top level).
_OPENMMLAB_BLOCK_RENAMES = [
    (r"ln1\.", "norm1."),
    (r"ln2\.", "norm2."),
    (r"attn\.attn\.in_proj_weight", "attn.qkv.weight"),
    (r"attn\.attn\.in_proj_bias", "attn.qkv.bias"),
    (r"attn\.attn\.out_proj\.", "attn.proj."),
    (r"attn\.gamma1\.weight", "ls1.gamma"),
    (r"ffn\.gamma2\.weight", "ls2.gamma"),
    (r"ffn\.layers\.0\.0\.", "mlp.fc1."),
    (r"ffn\.layers\.1\.", "mlp.fc2."),
]
_OPENMMLAB_TOP_RENAMES = [
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^ln1\.", "norm."),
    (r"^ln2\.", "fc_norm."),  # MMPretrain's norm after average pooling
    (r"^pre_norm\.", "norm_pre."),
]


def _from_openmmlab(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in weights.items():
        block = re.match(r"^layers\.(\d+)\.(.*)$", key)
        if block is not None:
            rest = block.group(2)
            for pattern, replacement in _OPENMMLAB_BLOCK_RENAMES:
                rest = re.sub("^(?:" + pattern + ")", replacement, rest)
            key = f"blocks.{block.group(1)}.{rest}"
        else:
            for pattern, replacement in _OPENMMLAB_TOP_RENAMES:
                key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def _layer_scale_to_timm(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """iBOT/BEiT name layer scale ``blocks.N.gamma_1``; timm names it ``blocks.N.ls1.gamma``."""
    return {re.sub(r"^(blocks\.\d+)\.gamma_([12])$", r"\1.ls\2.gamma", k): v for k, v in weights.items()}


def encoder_state_dict(
    obj: Any, path: str | os.PathLike = "<checkpoint>", which: str = "teacher",
    model_keys: Collection[str] | None = None,
) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """timm-named encoder weights from any supported layout, the layout's name, and the keys set aside.

    Without ``model_keys`` the file holds a ViT, in any public layout; with them (the state-dict keys of a
    hierarchical backbone) the encoder is every tensor under the prefix where the file's keys end in the model's.
    """
    path = Path(path)
    weights, container = _select_weights(obj, path, which)
    encoder, set_aside = _strip_to_encoder(weights, path, which, model_keys)
    if model_keys is not None:
        return encoder, container, set_aside
    source = container
    if any(k.startswith("layers.") for k in encoder):
        encoder = _from_openmmlab(encoder)
        source += ", OpenMMLab names"
    encoder = _layer_scale_to_timm(encoder)
    not_encoder = [k for k in encoder if k.split(".")[0] not in ENCODER_ROOTS]
    for key in not_encoder:
        encoder.pop(key)
    return encoder, source, set_aside + not_encoder


def _grid(num_patches: int, path: Path) -> tuple[int, int]:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise CheckpointError(path, f"pos_embed has {num_patches} patch positions, not a square grid")
    return side, side


def _fit_pos_embed(
    encoder: dict[str, torch.Tensor], model: nn.Module, path: Path
) -> dict[str, tuple[list[int], list[int]]]:
    """Resample ``pos_embed`` (bicubic, prefix tokens kept) when the file's grid differs from the model's."""
    if "pos_embed" not in encoder or not hasattr(model, "pos_embed"):
        return {}
    source, target = encoder["pos_embed"], model.pos_embed
    if source.shape == target.shape:
        return {}
    prefix = getattr(model, "num_prefix_tokens", 1) if not getattr(model, "no_embed_class", False) else 0
    old_grid = _grid(source.shape[1] - prefix, path)
    new_grid = tuple(model.patch_embed.grid_size)
    if source.shape[-1] != target.shape[-1]:
        return {}  # another width: reported as an architecture mismatch by the shape check
    encoder["pos_embed"] = resample_abs_pos_embed(source, list(new_grid), list(old_grid), num_prefix_tokens=prefix)
    return {"pos_embed": (list(source.shape), list(target.shape))}


def _infer_shape_summary(encoder: Mapping[str, torch.Tensor]) -> str:
    width = encoder["patch_embed.proj.weight"].shape[0] if "patch_embed.proj.weight" in encoder else "?"
    patch = encoder["patch_embed.proj.weight"].shape[-1] if "patch_embed.proj.weight" in encoder else "?"
    depth = 1 + max((int(m.group(1)) for k in encoder if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    return f"embed_dim {width}, depth {depth}, patch {patch}"


def _from_official_mpvit(encoder: dict[str, torch.Tensor], path: Path) -> list[str]:
    """Rename the official MPViT keys that differ from ours (:func:`~mimbench.backbones.mpvit.official_key`): a
    block's copy of its path's shared position encoding must equal the shared tensor. Returns the keys renamed."""
    copies = [key for key in encoder if official_key(key) is not None]
    for key in copies:
        shared = official_key(key)
        value = encoder.pop(key)
        if shared not in encoder:
            encoder[shared] = value
        elif not torch.equal(encoder[shared], value):
            raise CheckpointError(path, f"{key} should repeat the shared {shared} but differs from it")
    return copies


def load_backbone(
    model: nn.Module, path: str | os.PathLike, which: str = "teacher", strict: bool = True
) -> LoadReport:
    """Load a checkpoint's encoder into ``model`` (built by :func:`create_backbone`) and report what happened.

    ``which`` picks teacher or student where a file holds both. With ``strict`` (the default) any encoder
    weight the file does not provide is an error: a silently random-initialised backbone is never returned.
    A missing classification head (``head``, ``fc_norm``) is expected and only reported.
    """
    path = Path(path)
    obj, metadata = read_checkpoint(path)
    expected = model.state_dict()
    vit = isinstance(model, VisionTransformer)
    if isinstance(model, MPViT) and isinstance(obj, Mapping) and {"model", "model_ema"} <= obj.keys():
        which = "student"  # the official release's reported accuracy is its "model"; "model_ema" is a side EMA
    encoder, source, set_aside = encoder_state_dict(obj, path, which, model_keys=None if vit else set(expected))
    if isinstance(model, MPViT) and _from_official_mpvit(encoder, path):
        source += ", official MPViT layout"
    if metadata is not None:
        source = f"{FORMAT_TAG} {metadata.method} checkpoint"
    resized = _fit_pos_embed(encoder, model, path) if vit else {}

    arch = getattr(model, "arch", type(model).__name__)
    for key, value in encoder.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            looks_like = f" (the file looks like {_infer_shape_summary(encoder)})" if vit else ""
            raise CheckpointError(
                path,
                f"weights are for another architecture than {arch}: {key} is {list(value.shape)} in the file, "
                f"{list(expected[key].shape)} in the model{looks_like}",
            )
    result = model.load_state_dict(encoder, strict=False)
    report = LoadReport(
        path=str(path),
        source_format=source,
        loaded=[k for k in encoder if k in expected],
        missing=list(result.missing_keys),
        unexpected=list(result.unexpected_keys),
        set_aside=set_aside,
        resized=resized,
        metadata=metadata,
    )
    if not report.loaded:
        raise CheckpointError(path, f"none of its {len(encoder)} encoder tensors match {arch}")
    if strict and report.missing_encoder:
        raise CheckpointError(
            path,
            f"provides only {100 * report.encoder_fraction:.1f}% of the {arch} encoder; missing "
            f"{_abbreviate(report.missing_encoder, 4)}",
        )
    return report


def infer_arch(path: str | os.PathLike, which: str = "teacher") -> str:
    """The arch a checkpoint was written for: from our metadata (any registered backbone), else from a ViT's
    shapes (a hierarchical backbone from elsewhere needs its arch passed)."""
    path = Path(path)
    obj, metadata = read_checkpoint(path)
    if metadata is not None and metadata.arch in backbone_archs():
        return metadata.arch
    try:
        encoder, _, _ = encoder_state_dict(obj, path, which)
    except CheckpointError:  # no ViT in it: a hierarchical backbone, told by its shapes
        hierarchical = _hierarchical_arch_by_shapes(obj, path, which)
        if hierarchical is None:
            raise CheckpointError(path, "matches no known architecture (neither a ViT nor the shapes of a "
                                        f"registered backbone: {', '.join(HIERARCHICAL_ARCHS)}); "
                                        "pass the arch explicitly") from None
        return hierarchical
    summary = _infer_shape_summary(encoder)
    for name, spec in ARCHS.items():
        if summary == f"embed_dim {spec['embed_dim']}, depth {spec['depth']}, patch {spec['patch_size']}":
            return name
    raise CheckpointError(path, f"matches no known architecture ({summary}); pass the arch explicitly")


def _hierarchical_arch_by_shapes(obj: Any, path: Path, which: str) -> str | None:
    """The registered hierarchical backbone whose every non-head tensor the file holds with the same shape."""
    for name in HIERARCHICAL_ARCHS:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in create_backbone(name).state_dict().items()}
        try:
            encoder, _, _ = encoder_state_dict(obj, path, which, model_keys=set(expected))
        except CheckpointError:
            continue
        if all(key in encoder and tuple(encoder[key].shape) == shape for key, shape in expected.items()):
            return name
    return None


# ------------------------------------------------------------------------------------ full pretraining checkpoints

# The halves of our RC-MAE model (``student.*``, ``teacher.*``), each an MAE-style autoencoder.
AUTOENCODER_HALVES = ("student", "teacher")


def _autoencoder_names(weights: Mapping[str, Any]) -> dict[str, Any]:
    """One autoencoder's weights in our names. Official MAE (models_mae.py) keeps its encoder at the top level
    beside the decoder; ours holds it under ``encoder.``, with the same timm names inside; the decoder's names
    (``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks``, ``decoder_norm``,
    ``decoder_pred``) are MAE's. DDP's ``module.`` prefix is dropped."""
    renamed = {}
    for key, value in weights.items():
        key = key.removeprefix("module.")
        renamed["encoder." + key if key.split(".")[0] in ENCODER_ROOTS else key] = value
    return renamed


def _half_weights(obj: Any, path: Path, half: str) -> tuple[dict[str, Any], str]:
    """The weights of ``half`` (student or teacher; for a plain autoencoder, the one ``which`` names) and where
    they came from: a container holding both (the RC-MAE release's ``student`` and ``teacher``), our training
    state (``model`` with ``student.*`` and ``teacher.*``), or a file holding one autoencoder (MAE's ``model``),
    which then serves both halves, as RC-MAE's teacher starts as a copy of its student."""
    weights, source = _select_weights(obj, path, half)
    if any(key.startswith(f"{half}.") for key in weights):
        weights = {key[len(half) + 1:]: value for key, value in weights.items() if key.startswith(f"{half}.")}
        source += f", '{half}.*'"
    return _autoencoder_names(weights), source


def load_pretraining_checkpoint(model: nn.Module, path: str | os.PathLike, which: str = "teacher") -> LoadReport:
    """Load a full pretraining checkpoint into one of our pretraining models (MAE, RC-MAE, MixedAE), every tensor
    of the model from the file and every tensor of the file into the model.

    An RC-MAE model (``student.*``, ``teacher.*``) takes the file's student and teacher, or both from a file with
    one autoencoder; any other model takes the file's one autoencoder, or ``which`` of a file with two. An
    encoder-only file, a tensor missing on either side or one of another shape is a :class:`CheckpointError`.
    """
    path = Path(path)
    obj, metadata = read_checkpoint(path)
    expected = model.state_dict()
    halves = [half for half in AUTOENCODER_HALVES if any(key.startswith(f"{half}.") for key in expected)]
    weights: dict[str, Any] = {}
    sources = []
    for half in halves or [which]:
        half_weights, source = _half_weights(obj, path, half)
        prefix = f"{half}." if halves else ""
        weights.update({prefix + key: value for key, value in half_weights.items()})
        sources.append(f"{half}: {source}" if halves else source)
    if not any(key.split(".")[-1] == "mask_token" for key in weights):
        raise CheckpointError(path, "holds no decoder (no mask_token): an encoder-only checkpoint; starting a "
                                    "pretraining run needs a full one (encoder + decoder, e.g. MAE's "
                                    "mae_pretrain_vit_base_full.pth)")
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected or not isinstance(weights[key], torch.Tensor)]
    if missing or unexpected:
        found = "; ".join(part for part in (f"missing {_abbreviate(missing, 4)}" if missing else "",
                                            f"not in the model {_abbreviate(unexpected, 4)}" if unexpected else "")
                          if part)
        raise CheckpointError(path, f"does not fit this {type(model).__name__}: {found}")
    for key, value in weights.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(path, f"{key} is {list(value.shape)} in the file, {list(expected[key].shape)} in "
                                        f"the model (another architecture or decoder size)")
    model.load_state_dict(weights, strict=True)
    return LoadReport(path=str(path), source_format=f"full checkpoint, {' + '.join(sources)}", loaded=list(weights),
                      missing=[], unexpected=[], set_aside=[], resized={}, metadata=metadata)


def backbone_from_checkpoint(
    path: str | os.PathLike, arch: str | None = None, which: str = "teacher", strict: bool = True,
    **create_kwargs: Any,
) -> tuple[nn.Module, LoadReport]:
    """Build the checkpoint's architecture (or ``arch``) and load it: what ``--ckpt x.pth`` does everywhere.

    A backbone without a fixed patch grid (MPViT, ResNet) takes any input size; where our checkpoint records the
    side it was pretrained at, that becomes its ``pretrained_cfg["input_size"]`` (timm's meaning: the resolution the
    weights were trained at), so transfer feeds it that size rather than the family's default of 224."""
    model = create_backbone(arch or infer_arch(path, which), **create_kwargs)
    report = load_backbone(model, path, which=which, strict=strict)
    trained = pretrained_side(report.metadata)
    if trained is not None and getattr(model, "patch_embed", None) is None and hasattr(model, "pretrained_cfg"):
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, trained, trained)}
    return model, report


def pretrained_side(metadata: CheckpointMetadata | None) -> int | None:
    """The image side our pretraining recorded in a checkpoint (its recipe's ``img_size``), if any."""
    recipe = ((metadata.extra if metadata is not None else {}).get("config") or {}).get("recipe") or {}
    side = recipe.get("img_size")
    return side if isinstance(side, int) and side > 0 else None

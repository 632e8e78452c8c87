"""The landscape study's comparison: a supervised ViT beside the MAE family, the reconstruction loss through a decoder
fitted at the centre, the line between two checkpoints, and the landscape tables, on values."""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mimbench.landscape.directions import random_directions
from mimbench.landscape.losses import loss_measure, pretraining_batches, pretraining_loss, read_pretraining_model
from mimbench.results import Result

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_landscape import tiny_run_folder  # noqa: E402  (the tiny pretraining run folders of the landscape tests)

CPU = ["--preset", "embedded_cpu", "--device", "cpu"]


def test_the_decoder_fitted_at_the_centre_is_deterministic_and_lowers_the_reconstruction_loss():
    from mimbench.backbones.vit import create_backbone
    from mimbench.landscape.losses import fit_decoder
    torch.manual_seed(0)
    encoder = create_backbone("vit_tiny_patch4_32")
    encoder.pos_embed.requires_grad_(False)  # as an MAE encoder's fixed sin-cos embedding
    batches = [torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    fits = [fit_decoder(encoder, "vit_tiny_patch4_32", batches, seed=4, steps=4, lr=1e-3) for _ in range(2)]
    (model, loss, history), (again, _, history_again) = fits
    assert history == history_again and len(history) == 5
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert history[-1] < history[0] - 0.05  # the fit lowers the loss (fresh decoder: ~1.0 before)
    assert loss_measure(loss)(model)["loss"] == pytest.approx(history[-1], rel=1e-6)  # the loss it was fitted to
    assert model.config.decoder_dim == 128 and len(model.decoder_blocks) == 2  # the arch's table decoder
    encoder_state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in encoder_state.items())  # the encoder is untouched
    moving = {name for name, p in model.named_parameters() if p.requires_grad}
    assert moving == {f"encoder.{name}" for name, p in encoder.named_parameters() if p.requires_grad}
    (direction,) = random_directions(model, seed=0, count=1)
    assert torch.count_nonzero(direction["decoder_pred.weight"]) == 0  # the decoder stays fixed
    assert torch.count_nonzero(direction["encoder.blocks.0.attn.qkv.weight"]) > 0


def labelled_folder(root: Path) -> Path:
    """ImageNet's layout with 2 classes of 4 train and 1 val image each."""
    generator = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 1)):
        for label in range(2):
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = generator.integers(0, 255, (8, 8, 3), dtype=np.uint8) // (1 + label)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_a_supervised_checkpoint_in_the_study_gives_its_cross_entropy_at_the_centre(tmp_path):
    from mimbench.core.config import RunSpec
    from mimbench.landscape.losses import SupervisedObjective, probe_encoder
    from mimbench.landscape.run import loss_target, parse_args
    from mimbench.pretrain.supervised import PRESETS, SupervisedConfig, SupervisedTrainer
    recipe = dataclasses.replace(PRESETS["embedded_cpu"], arch="vit_tiny_patch4_32", epochs=1, batch_size=4,
                                 auto_augment=None, mixup=0.0)
    run = RunSpec(method="supervised", data_root=str(labelled_folder(tmp_path / "data")), out=str(tmp_path / "sup"),
                  results=str(tmp_path / "results.jsonl"), device="cpu", precision="fp32")
    trainer = SupervisedTrainer(SupervisedConfig(run=run, preset="embedded_cpu", recipe=recipe))
    trainer.train()  # two steps: a real run folder (checkpoint and config.yaml as the trainer writes them)

    model, config, path = read_pretraining_model(tmp_path / "sup")
    assert isinstance(model, SupervisedObjective) and config.run.method == "supervised" and path.suffix == ".pth"
    batches = pretraining_batches(config, count=6, batch_size=4)
    images, labels = (torch.cat(parts) for parts in zip(*batches))
    assert [len(b[0]) for b in batches] == [4, 2] and set(labels.tolist()) == {0, 1}  # across classes
    trainer.model.eval()
    with torch.no_grad():
        expected = float(F.cross_entropy(trainer.model(images), labels))
    study = parse_args(["--ckpt", str(tmp_path / "sup"), "--images", "6", "--batch-size", "4", *CPU])
    target, loss, _ = loss_target(study, "pretrain", model, config, torch.device("cpu"), None)
    assert loss_measure(loss)(target)["loss"] == pytest.approx(expected, rel=1e-5)
    encoder = probe_encoder(model)  # headless, its learned position embedding moves with the rest
    assert encoder.num_classes == 0 and encoder.pos_embed.requires_grad
    assert torch.count_nonzero(random_directions(encoder, seed=0, count=1)[0]["pos_embed"]) > 0


def perturbed_copy(run: Path, step: int, scale: float) -> Path:
    """A later checkpoint of the same run: every parameter (RC-MAE's teacher too) moved by seeded noise."""
    path = run / "checkpoints" / "step_00000001.pth"
    state = torch.load(path, weights_only=True)
    generator = torch.Generator().manual_seed(step)
    state["model"] = {k: v + scale * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    later = run / "checkpoints" / f"step_{step:08d}.pth"
    torch.save(state, later)
    return later


def test_the_line_ends_are_the_two_checkpoints_losses_and_the_student_reaches_its_teacher(tmp_path):
    from mimbench.landscape.run import main
    run = tiny_run_folder(tmp_path / "rcmae", "rcmae", tmp_path / "photos")
    start, end = run / "checkpoints" / "step_00000001.pth", perturbed_copy(run, 2, 0.01)
    common = ["--loss", "pretrain", "--line-points", "3", "--line-range", "0", "1", "--images", "2", *CPU]
    assert main(["--line", str(start), str(end), *common, "--out", str(tmp_path / "out")]) == 0
    line = np.load(tmp_path / "out" / "lines" / "step_00000001_to_step_00000002" / "pretrain" / "line.npz")
    np.testing.assert_array_equal(line["line_x"], [0.0, 0.5, 1.0])
    model_a, config, _ = read_pretraining_model(start)
    model_b, _, _ = read_pretraining_model(end)
    loss = loss_measure(pretraining_loss(pretraining_batches(config, 2, 8), seed=0))
    assert line["loss"][0] == loss(model_a)["loss"]
    assert line["loss"][2] == pytest.approx(loss(model_b)["loss"], rel=1e-5)  # B's teacher too, not A's
    assert abs(line["loss"][2] - line["loss"][0]) > 1e-3
    assert (tmp_path / "out" / "figures" / "line_step_00000001_to_step_00000002_pretrain.png").exists()

    assert main(["--line", str(end), "teacher", *common, "--out", str(tmp_path / "teacher")]) == 0
    line = np.load(tmp_path / "teacher" / "lines" / "step_00000002_to_teacher" / "pretrain" / "line.npz")
    # at α = 1 the student is the teacher: no consistency term left, the teacher's own MAE loss
    assert line["loss"][2] == pytest.approx(loss(model_b.teacher)["loss"], rel=1e-5)
    assert line["loss"][0] == loss(model_b)["loss"] != pytest.approx(line["loss"][2], rel=1e-3)
    assert main(["--line", str(end), "teacher", "--loss", "linear", *CPU, "--out", str(tmp_path / "x")]) == 1


def landscape_record(model: str, method: str, loss: str, seed: int, sharpness: float, convex: float) -> Result:
    metrics = {"width": 0.25, "sharpness": sharpness, "convex_share": convex, "lambda_max_centre": 41.0 + seed,
               "lambda_min_centre": -1.0, "loss_centre": 0.6512}
    return Result("landscape", "pretraining data", loss, "width", 0.25, metrics, method=method,
                  arch="vit_tiny_patch4_32", seed=seed, tags={"model": model})


def test_the_landscape_tables_from_a_tiny_store(tmp_path):
    from mimbench.results import append_result
    from mimbench.tables import render
    from mimbench.tables.assemble import build_tables
    from mimbench.tables.build import main
    records = [landscape_record("mae", "mae", loss, seed, 0.94 + 0.03 * seed, 1 / 9)
               for loss in ("recon", "pretrain") for seed in (0, 1)]
    records += [landscape_record("sup", "supervised", "pretrain", 0, 0.0415, 4 / 9),
                Result("classification", "digits", "linear", "top1", 50.0, method="mae")]
    tables = {t.name: t for t in build_tables(records, reference=False)}
    assert [name for name in tables if name.startswith("landscape")] == ["landscape_pretrain", "landscape_recon"]
    frame = tables["landscape_pretrain"].frame
    assert list(frame["Model"]) == ["mae", "sup"] and list(frame["Method"]) == ["MAE", "Supervised"]
    texts = frame.map(render.text)
    assert texts.loc[0, "Sharpness"] == "0.955 ± 0.021 [n=2]" and texts.loc[1, "Sharpness"] == "0.042"
    assert texts.loc[0, "Convex share"] == "0.11 ± 0.00 [n=2]" and texts.loc[1, "Convex share"] == "0.44"
    assert texts.loc[0, "λmax (centre)"] == "41.5 ± 0.7 [n=2]" and texts.loc[0, "Width"] == "0.250 ± 0.000 [n=2]"
    assert list(tables["other"].frame["Task"]) == ["classification"]  # landscape records are not "other"
    store = tmp_path / "results.jsonl"
    for result in records:
        append_result(result, store)
    assert main(["--store", str(store), "--out", str(tmp_path / "out"), "--no-reference"]) == 0
    assert "| mae     | MAE" in (tmp_path / "out" / "landscape_recon.md").read_text()
    assert "$\\lambda_{max}$ (centre)" in (tmp_path / "out" / "landscape_pretrain.tex").read_text()

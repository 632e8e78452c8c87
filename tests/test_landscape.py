"""The loss-landscape study: directions, surfaces, losses, curvature and its entry point, on values."""

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from mimbench.landscape.directions import line_direction, load_directions, random_directions, save_directions
from mimbench.landscape.losses import loss_measure
from mimbench.landscape.surface import Grid, evaluate, read_points

ROOT = Path(__file__).resolve().parents[1]


class Quadratic(nn.Module):
    """loss(θ) = ½ θᵀAθ + bᵀθ over θ = vec(weight); a bias (1 dim) and a frozen matrix never move."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(3, 2, generator=generator))
        self.bias = nn.Parameter(torch.randn(2, generator=generator))
        self.frozen = nn.Parameter(torch.randn(2, 2, generator=generator), requires_grad=False)
        q = torch.randn(6, 6, generator=generator, dtype=torch.float64)
        self.eigenvalues = torch.tensor([-2.0, -0.5, 0.3, 1.0, 2.5, 4.0], dtype=torch.float64)
        basis, _ = torch.linalg.qr(q)
        self.register_buffer("a", (basis @ torch.diag(self.eigenvalues) @ basis.T).float())
        self.register_buffer("b", torch.randn(6, generator=generator))

    def forward(self) -> torch.Tensor:
        theta = self.weight.flatten()
        return 0.5 * theta @ self.a @ theta + self.b @ theta + 0 * self.bias.sum() + 0 * self.frozen.sum()


def quadratic_loss(model: Quadratic) -> torch.Tensor:
    return model()


class NoisyMLP(nn.Module):
    """A small nonlinear model whose loss draws random numbers, as masks do: determinism must come from reseeding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1))
        self.inputs = torch.randn(16, 4)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        keep = (torch.rand(images.shape) > 0.5).float()
        return self.net(images * keep).pow(2).mean(), {}


def noisy_measure():
    from mimbench.landscape.losses import pretraining_loss
    batches = [torch.linspace(-1, 1, 32).reshape(8, 4), torch.linspace(-2, 1, 16).reshape(4, 4)]
    return loss_measure(pretraining_loss(batches, seed=3))


# --------------------------------------------------------------------------------------------- directions


def test_filter_normalisation_matches_each_weight_slice_and_leaves_the_rest_at_zero():
    model = Quadratic()
    delta, eta = random_directions(model, seed=5)
    assert list(delta) == ["weight", "bias", "frozen"]
    for direction in (delta, eta):
        torch.testing.assert_close(direction["weight"].norm(dim=1), model.weight.detach().norm(dim=1),
                                   rtol=1e-6, atol=0)
        assert torch.count_nonzero(direction["bias"]) == 0  # 1 dim
        assert torch.count_nonzero(direction["frozen"]) == 0  # requires_grad False
    assert not torch.equal(delta["weight"], eta["weight"])
    again, _ = random_directions(model, seed=5)
    assert torch.equal(again["weight"], delta["weight"])
    assert not torch.equal(random_directions(model, seed=6)[0]["weight"], delta["weight"])


def test_filter_normalisation_on_a_conv_and_the_frozen_sincos_pos_embed():
    from mimbench.pretrain.mae import MAEConfig, MaskedAutoencoder
    model = MaskedAutoencoder(MAEConfig(arch="vit_tiny_patch4_32", decoder_dim=32, decoder_depth=1, decoder_heads=2))
    (delta,) = random_directions(model, seed=0, count=1)
    weights = dict(model.named_parameters())
    conv = "encoder.patch_embed.proj.weight"  # (192, 3, 4, 4): slices are the output filters
    torch.testing.assert_close(delta[conv].flatten(1).norm(dim=1), weights[conv].detach().flatten(1).norm(dim=1),
                               rtol=1e-5, atol=0)
    assert not weights["encoder.pos_embed"].requires_grad
    assert torch.count_nonzero(delta["encoder.pos_embed"]) == 0
    assert torch.count_nonzero(delta["encoder.blocks.0.norm1.weight"]) == 0
    assert torch.count_nonzero(delta["encoder.blocks.0.attn.qkv.weight"]) > 0


def test_saved_directions_come_back_exactly(tmp_path):
    model = Quadratic()
    directions = random_directions(model, seed=1)
    save_directions(tmp_path / "d.pt", directions, {"seed": 1, "kind": "random"})
    loaded, description = load_directions(tmp_path / "d.pt")
    assert description == {"seed": 1, "kind": "random"}
    for a, b in zip(directions, loaded):
        assert all(torch.equal(a[name], b[name]) for name in a)


# ----------------------------------------------------------------------------------------------- surfaces


def analytic_surface(model: Quadratic, delta, eta, grid: Grid) -> np.ndarray:
    a, b = model.a.double().numpy(), model.b.double().numpy()
    centre = model.weight.detach().double().flatten().numpy()
    d, e = delta["weight"].double().flatten().numpy(), eta["weight"].double().flatten().numpy()
    values = np.empty(grid.shape)
    for j, beta in enumerate(grid.y):
        for i, alpha in enumerate(grid.x):
            theta = centre + alpha * d + beta * e
            values[j, i] = 0.5 * theta @ a @ theta + b @ theta
    return values


def test_a_quadratic_gives_the_analytic_surface_on_a_non_square_grid(tmp_path):
    model = Quadratic()
    centre = model.weight.detach().clone()
    delta, eta = random_directions(model, seed=2)
    grid = Grid.rectangle((-1.0, 2.0), 7, (-0.5, 0.5), 3)  # 7 α values along x, 3 β values along y
    surface = evaluate(model, loss_measure(quadratic_loss), [delta, eta], grid, tmp_path)["loss"]
    assert surface.shape == (3, 7)
    np.testing.assert_allclose(surface, analytic_surface(model, delta, eta, grid), rtol=1e-5, atol=1e-5)
    assert torch.equal(model.weight, centre)  # the centre is restored
    # α runs along x: moving along x (α) follows δ alone
    x_only = Grid((2.0,), (0.0,))
    (alpha_point,) = evaluate(model, loss_measure(quadratic_loss), [delta, eta], x_only, tmp_path / "x")["loss"].flat
    np.testing.assert_allclose(alpha_point, surface[1, 6], rtol=1e-6)


def test_the_same_surface_twice_is_bit_identical(tmp_path):
    model = NoisyMLP()
    directions = random_directions(model, seed=0)
    grid = Grid.rectangle((-1, 1), 5, (-1, 1), 4)
    first = evaluate(model, noisy_measure(), directions, grid, tmp_path / "a")["loss"]
    second = evaluate(model, noisy_measure(), directions, grid, tmp_path / "b")["loss"]
    assert np.array_equal(first, second)
    assert len(np.unique(first)) == first.size  # a real surface, not one constant


def test_a_curve_and_the_line_between_two_checkpoints(tmp_path):
    model = Quadratic()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    end = {name: p + 1.0 for name, p in start.items()}
    direction = line_direction(start, end, model)
    assert torch.equal(direction["weight"], torch.ones(3, 2)) and torch.count_nonzero(direction["frozen"]) == 0
    curve = evaluate(model, loss_measure(quadratic_loss), [direction], Grid.rectangle((0, 1), 3), tmp_path)["loss"]
    assert curve.shape == (3,)
    model.weight.data += 1.0
    np.testing.assert_allclose(curve[-1], float(model().detach()), rtol=1e-6)


class Killed(Exception):
    pass


def test_a_run_killed_mid_grid_resumes_and_ends_identical(tmp_path):
    model = NoisyMLP()
    directions = random_directions(model, seed=0)
    grid = Grid.rectangle((-1, 1), 4, (-1, 1), 3)
    measure, calls = noisy_measure(), []

    def dies_after_five(m):
        if len(calls) == 5:
            raise Killed
        calls.append(1)
        return measure(m)

    with pytest.raises(Killed):
        evaluate(model, dies_after_five, directions, grid, tmp_path / "killed")
    assert sorted(read_points(tmp_path / "killed")) == [0, 1, 2, 3, 4]
    with open(tmp_path / "killed" / "points" / "rank0.jsonl", "a") as f:
        f.write('{"k": 5, "values": {"loss": "0x1.')  # a line cut by SIGKILL mid-write
    resumed_calls = []

    def counting(m):
        resumed_calls.append(1)
        return measure(m)

    resumed = evaluate(model, counting, directions, grid, tmp_path / "killed")["loss"]
    assert len(resumed_calls) == len(grid) - 5  # only the missing points were computed
    whole = evaluate(model, measure, directions, grid, tmp_path / "whole")["loss"]
    assert np.array_equal(resumed, whole)


WORKER = """
    import sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_landscape import NoisyMLP, noisy_measure
    from mimbench.core.runtime import init_distributed, leave_process_group
    from mimbench.landscape.directions import random_directions
    from mimbench.landscape.surface import Grid, evaluate

    dist = init_distributed("cpu")
    model = NoisyMLP()
    values = evaluate(model, noisy_measure(), random_directions(model, seed=0), Grid.rectangle((-1, 1), 5, (-1, 1), 3),
                      sys.argv[1], dist.rank, dist.world_size)
    if dist.is_main:
        np.save(sys.argv[2], values["loss"])
    leave_process_group()
"""


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path, torchrun):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER.format(tests=str(ROOT / "tests"))))
    torchrun(str(script), str(tmp_path / "ddp"), str(tmp_path / "ddp.npy"), timeout=300)
    assert sorted(p.name for p in (tmp_path / "ddp" / "points").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    model = NoisyMLP()
    single = evaluate(model, noisy_measure(), random_directions(model, seed=0), Grid.rectangle((-1, 1), 5, (-1, 1), 3),
                      tmp_path / "single")["loss"]
    assert np.array_equal(np.load(tmp_path / "ddp.npy"), single)


# ---------------------------------------------------------------------------------------------- curvature


def test_lanczos_gives_the_quadratics_analytic_eigenvalues_everywhere(tmp_path):
    from mimbench.landscape.curvature import convex_share, convexity_ratio, curvature_measure, hessian_extremes
    model = Quadratic()
    # 8 parameters: the weight's 6 with eigenvalues -2 ... 4, the bias's 2 with 0 (it enters with weight 0)
    lambda_min, lambda_max = hessian_extremes(quadratic_loss, model, iterations=8)
    assert lambda_min == pytest.approx(-2.0, abs=1e-4) and lambda_max == pytest.approx(4.0, abs=1e-4)
    # the Hessian of a quadratic is constant: the same pair at every point of a coarse grid
    grid = Grid.rectangle((-1, 1), 3, (-1, 1), 2)
    curvature = evaluate(model, curvature_measure(quadratic_loss, iterations=8), random_directions(model, 0), grid,
                         tmp_path)
    np.testing.assert_allclose(curvature["lambda_min"], np.full((2, 3), -2.0), atol=1e-4)
    np.testing.assert_allclose(curvature["lambda_max"], np.full((2, 3), 4.0), atol=1e-4)
    np.testing.assert_allclose(convexity_ratio(curvature["lambda_min"], curvature["lambda_max"]), 0.5, atol=1e-4)
    assert convex_share(curvature["lambda_min"], curvature["lambda_max"], epsilon=0.6) == 1.0
    assert convex_share(curvature["lambda_min"], curvature["lambda_max"], epsilon=0.4) == 0.0


def test_curvature_runs_through_a_vit_with_the_math_attention_path():
    from mimbench.landscape.curvature import hessian_extremes, math_attention
    from mimbench.landscape.losses import pretraining_loss
    from mimbench.pretrain.mae import MAEConfig, MaskedAutoencoder
    torch.manual_seed(0)
    model = math_attention(MaskedAutoencoder(MAEConfig(arch="vit_tiny_patch4_32", decoder_dim=32, decoder_depth=1,
                                                       decoder_heads=2))).eval()
    assert not any(getattr(m, "fused_attn", False) for m in model.modules())
    loss = pretraining_loss([torch.randn(2, 3, 32, 32)], seed=0)
    first = hessian_extremes(loss, model, iterations=4)
    assert first == hessian_extremes(loss, model, iterations=4)  # deterministic
    assert first[0] < first[1] and first[1] > 0


# --------------------------------------------------------------------------- losses of pretraining runs


TINY_DECODER = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)


def tiny_run_folder(folder: Path, method: str, photos: Path) -> Path:
    """A pretraining run folder holding one resumable checkpoint (model + config, as `Trainer.state` writes)."""
    import dataclasses
    import json

    from mimbench.core.config import RunSpec, to_dict
    from mimbench.pretrain.data import write_embedded_photos
    from mimbench.pretrain.engine import PRESETS, PretrainConfig, build_method, resolve

    write_embedded_photos(photos)
    recipe = dataclasses.replace(PRESETS["embedded_cpu"], method_options=TINY_DECODER)
    config = resolve(PretrainConfig(run=RunSpec(method=method, data_root=str(photos), out=str(folder)),
                                    preset="embedded_cpu", recipe=recipe))
    torch.manual_seed(0)
    model = build_method(config)
    (folder / "checkpoints").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config": json.dumps(to_dict(config)), "step": 1},
               folder / "checkpoints" / "step_00000001.pth")
    return folder


def test_rcmae_pretraining_loss_moves_the_student_against_a_fixed_teacher(tmp_path):
    from mimbench.landscape.losses import pretraining_batches, pretraining_loss, read_pretraining_model
    run = tiny_run_folder(tmp_path / "rcmae", "rcmae", tmp_path / "photos")
    model, config, path = read_pretraining_model(run)
    assert path.name == "step_00000001.pth" and config.run.method == "rcmae"
    batches = pretraining_batches(config, count=6, batch_size=4)
    assert [len(b) for b in batches] == [4, 2] and batches[0].shape[1:] == (3, 32, 32)
    assert torch.equal(torch.cat(batches), torch.cat(pretraining_batches(config, count=6, batch_size=3)))
    loss = pretraining_loss(batches, seed=0)
    # at the centre the teacher equals the student: the consistency term is 0, the loss is the student's MAE loss
    student_only = loss_measure(loss)(model.student)["loss"]
    assert loss_measure(loss)(model)["loss"] == pytest.approx(student_only, rel=1e-6)
    directions = random_directions(model, seed=0)
    assert all(torch.count_nonzero(d[name]) == 0 for d in directions for name in d if name.startswith("teacher."))
    curve = evaluate(model, loss_measure(loss), directions[:1], Grid((0.0, 0.5)), tmp_path / "curve")["loss"]
    assert curve[0] == pytest.approx(student_only, rel=1e-6)
    teacher = torch.cat([p.flatten() for p in model.teacher.parameters()])
    assert torch.equal(teacher, torch.cat([p.flatten() for p in model.student.parameters()]))  # never moved
    # away from the centre the student's MAE loss alone is below the RC-MAE loss by the consistency term
    from mimbench.landscape.surface import centre_of, set_weights
    set_weights(model, centre_of(model), directions[:1], [0.5])
    assert loss_measure(loss)(model.student)["loss"] < curve[1]


def test_linear_probe_loss_is_the_fitted_heads_cross_entropy_at_the_centre(tmp_path):
    import torch.nn.functional as F

    from mimbench.landscape.losses import linear_probe_loss, probe_encoder, read_pretraining_model
    model, _, _ = read_pretraining_model(tiny_run_folder(tmp_path / "rcmae", "rcmae", tmp_path / "photos"))
    encoder = probe_encoder(model)  # RC-MAE exports its frozen teacher: the copy is trainable, pos_embed excepted
    assert encoder.blocks[0].attn.qkv.weight.requires_grad and not encoder.pos_embed.requires_grad
    generator = torch.Generator().manual_seed(0)
    images, targets = torch.randn(12, 3, 32, 32, generator=generator), torch.arange(12) % 3
    loss, head = linear_probe_loss(encoder, images, targets, pool="token", regularisation=1.0, batch_size=5)
    with torch.no_grad():
        features = encoder.forward_features(images)[:, 0]
        expected = F.cross_entropy(head.scores(features), targets)
    assert loss_measure(loss)(encoder)["loss"] == pytest.approx(float(expected), rel=1e-5)
    (direction,) = random_directions(encoder, seed=0, count=1)
    assert torch.count_nonzero(direction["blocks.0.attn.qkv.weight"]) > 0
    assert torch.count_nonzero(direction["pos_embed"]) == 0


def test_a_folder_without_resumable_checkpoints_is_one_line(tmp_path):
    from mimbench.backbones.checkpoint import CheckpointError
    from mimbench.landscape.losses import read_pretraining_model
    with pytest.raises(CheckpointError, match="no resumable checkpoint") as error:
        read_pretraining_model(tmp_path)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------- the entry point


@pytest.mark.slow
def test_the_entry_point_writes_surfaces_figures_and_one_record_per_model_and_loss(tmp_path):
    from mimbench.landscape.run import main
    from mimbench.results import read_results
    for method in ("mae", "rcmae"):
        tiny_run_folder(tmp_path / method, method, tmp_path / "photos")
    common = ["--ckpt", str(tmp_path / "mae"), str(tmp_path / "rcmae"), "--preset", "embedded_cpu", "--grid", "4",
              "--y-grid", "3", "--curvature-grid", "2", "--lanczos-steps", "2", "--images", "2", "--device", "cpu",
              "--results", str(tmp_path / "results.jsonl"), "--out", str(tmp_path / "out")]
    assert main(common) == 0
    surface = np.load(tmp_path / "out" / "rcmae" / "pretrain" / "surface.npz")
    assert surface["surface"].shape == (3, 4) and surface["curve"].shape == (4,)
    assert surface["curvature_lambda_max"].shape == (2, 2) and int(surface["seed"]) == 0
    np.testing.assert_array_equal(surface["surface_x"], np.linspace(-1, 1, 4))
    records, malformed = read_results(tmp_path / "results.jsonl")
    assert not malformed
    assert sorted((r.tags["model"], r.protocol) for r in records) == [
        ("mae", "linear"), ("mae", "pretrain"), ("rcmae", "linear"), ("rcmae", "pretrain")]
    assert all(r.task == "landscape" and r.metric == "width" and r.metrics["lambda_max_centre"] > 0 for r in records)
    figures = {p.name for p in (tmp_path / "out" / "figures").iterdir()}
    assert {"side_by_side_pretrain.pdf", "convexity_linear.png", "rcmae_pretrain_3d.png", "curves_linear.png",
            "mae_linear_contourf.pdf", "mae_linear_contour.png"} <= figures
    table = (tmp_path / "out" / "landscape.md").read_text().splitlines()
    assert len(table) == 2 + 4 and table[2].startswith("| pretrain | mae | ")
    # a second run into the same folder is refused without --resume, and with it recomputes nothing
    assert main(common) == 1
    before = (tmp_path / "out" / "mae" / "pretrain" / "surface" / "points" / "rank0.jsonl").read_text()
    assert main([*common, "--resume"]) == 0
    assert len(read_results(tmp_path / "results.jsonl")[0]) == 4  # finished surfaces are not recorded twice
    assert (tmp_path / "out" / "mae" / "pretrain" / "surface" / "points" / "rank0.jsonl").read_text() == before
    again = np.load(tmp_path / "out" / "rcmae" / "pretrain" / "surface.npz")
    assert np.array_equal(again["surface"], surface["surface"])

"""The results store: records round-trip, concurrent writers lose nothing, bad lines are reported by number."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
import torch

from mimbench.backbones.checkpoint import CheckpointMetadata, save_backbone
from mimbench.core.io import file_sha256, run_environment
from mimbench.results import Result, append_result, checkpoint_fields, read_results, store_path


def make_result(**changes) -> Result:
    fields = dict(task="classification", dataset="cifar10", protocol="linear", metric="top1", value=91.25,
                  metrics={"top1": 91.25, "val_top1": 90.5}, method="mae", arch="vit_base_patch16_224",
                  pretrain_epochs=300.0, tags={"ablation": "objective"}, seed=1, config={"pool": "avg"})
    fields.update(changes)
    return Result(**fields)


def test_round_trip_keeps_every_field(tmp_path):
    store = tmp_path / "deep" / "results.jsonl"
    first, second = make_result(), make_result(dataset="dtd", value=70.0, seed=2)
    append_result(first, store)
    append_result(second, store)
    results, malformed = read_results(store)
    assert malformed == []
    assert results == [first, second]


def test_store_path_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MIMBENCH_RESULTS", raising=False)
    assert store_path() == Path("results/results.jsonl")
    monkeypatch.setenv("MIMBENCH_RESULTS", str(tmp_path / "env.jsonl"))
    assert store_path() == tmp_path / "env.jsonl"
    assert store_path(tmp_path / "given.jsonl") == tmp_path / "given.jsonl"


def test_missing_store_reads_as_empty(tmp_path):
    assert read_results(tmp_path / "none.jsonl") == ([], [])


def test_malformed_lines_are_reported_by_number_and_the_rest_is_kept(tmp_path):
    store = tmp_path / "results.jsonl"
    good = make_result()
    lines = [good.to_json(), "{not json", "", json.dumps([1, 2]), json.dumps({"task": "classification"}),
             json.dumps({**json.loads(good.to_json()), "value": "high"}), good.to_json()[: len(good.to_json()) // 2],
             make_result(seed=7).to_json()]
    store.write_text("\n".join(lines) + "\n")
    results, malformed = read_results(store)
    assert [r.seed for r in results] == [1, 7]
    assert [m.line_number for m in malformed] == [2, 4, 5, 6, 7]
    assert "missing field(s) dataset, protocol, metric, value" in str(malformed[2])
    assert "not a number" in malformed[3].problem
    assert str(malformed[0]).startswith("line 2: ")


def test_records_refuse_nan(tmp_path):
    with pytest.raises(ValueError):
        append_result(make_result(value=float("nan")), tmp_path / "r.jsonl")
    assert not (tmp_path / "r.jsonl").exists() or read_results(tmp_path / "r.jsonl") == ([], [])


def _writer(store: str, worker: int, count: int) -> None:
    for index in range(count):
        # a large config makes each line several pages long, so unsynchronised writes would tear
        append_result(make_result(seed=worker * 1000 + index, config={"blob": "x" * 20000}), store)


def test_concurrent_writers_lose_nothing(tmp_path):
    store = str(tmp_path / "results.jsonl")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_writer, args=(store, worker, 40)) for worker in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    results, malformed = read_results(store)
    assert malformed == []
    assert sorted(r.seed for r in results) == sorted(w * 1000 + i for w in range(4) for i in range(40))


def test_checkpoint_fields_come_from_the_metadata(tmp_path):
    path = tmp_path / "encoder.safetensors"
    metadata = CheckpointMetadata(method="mixedae", arch="vit_tiny_patch4_32", epochs=300.0,
                                  extra={"cost": {"gpu_days": 12.5}})
    save_backbone(path, {"cls_token": torch.zeros(1, 1, 4)}, metadata)
    found = checkpoint_fields(path, metadata)
    assert found == {"checkpoint": str(path), "checkpoint_sha256": file_sha256(path), "method": "mixedae",
                     "arch": "vit_tiny_patch4_32", "pretrain_epochs": 300.0, "pretrain_gpu_days": 12.5}
    assert len(found["checkpoint_sha256"]) == 64
    assert checkpoint_fields(path)["checkpoint_sha256"] == found["checkpoint_sha256"]
    assert "method" not in checkpoint_fields(path)
    # a user's --method wins; the built arch fills in only where the metadata names none
    overridden = checkpoint_fields(path, metadata, method="rcmae", arch="vit_base_patch16_224")
    assert (overridden["method"], overridden["arch"]) == ("rcmae", "vit_tiny_patch4_32")
    foreign = checkpoint_fields(path, method="mae", arch="vit_base_patch16_224")
    assert (foreign["method"], foreign["arch"]) == ("mae", "vit_base_patch16_224")


def test_run_environment_names_device_and_date():
    environment = run_environment("cpu")
    assert environment["device"].startswith("cpu")
    assert environment["date"][:2] == "20" and environment["date"].endswith("+00:00")

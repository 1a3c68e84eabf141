"""Split protocols (official, split CSV, paper, paper-grouped) and per-rank sampling."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import write_csv

from cmgnet.data import DataError, EpochPlan, LesionRecord, resolve_split
from cmgnet.data.augment.params import NUM_VARIANTS


def records(n: int, lesions: int | None = None) -> list[LesionRecord]:
    """``n`` in-memory records (no files needed to split), optionally ``lesions`` shared lesion ids."""
    return [
        LesionRecord(
            image_id=f"ISIC_{i:07d}",
            image_path=Path(f"{i}.jpg"),
            mask_path=Path(f"{i}.png"),
            diagnosis=None,
            age=None,
            sex=None,
            site=None,
            description=None,
            split=("train", "train", "val", "test")[i % 4],
            source="test",
            lesion_id=f"L{i % lesions}" if lesions else None,
        )
        for i in range(n)
    ]


def sources(samples):
    return {s.record.image_id for s in samples}


def test_official_split():
    data = records(12)
    assert len(resolve_split(data, "train")) == 6
    assert all(s.variant is None for s in resolve_split(data, "val"))
    for r in data:
        r.split = "train"
    with pytest.raises(
        DataError, match="split 'val' is empty.*splits are: train; use protocol split-csv or paper-grouped"
    ):
        resolve_split(data, "val")


def test_split_csv(tmp_path):
    data = records(5)
    path = write_csv(
        tmp_path / "s.csv", ("image_id", "split"), [("ISIC_0000000", "test"), ("ISIC_0000003", "Training")]
    )
    assert sources(resolve_split(data, "test", "split-csv", split_csv=path)) == {"ISIC_0000000"}
    assert sources(resolve_split(data, "train", "split-csv", split_csv=path)) == {"ISIC_0000003"}
    write_csv(path, ("image_id", "split"), [("ISIC_0000000", "test"), ("ISIC_0000042", "train")])
    with pytest.raises(DataError, match="s.csv, row 3: image id 'ISIC_0000042' is not in the dataset"):
        resolve_split(data, "train", "split-csv", split_csv=path)


def test_paper_protocol_expands_24_variants_and_splits_8_1_1():
    data = records(50)
    splits = {name: resolve_split(data, name, "paper", seed=3) for name in ("train", "val", "test")}
    assert [len(splits[n]) for n in ("train", "val", "test")] == [960, 120, 120]
    keys = [s.key for part in splits.values() for s in part]
    assert len(keys) == len(set(keys)) == 50 * NUM_VARIANTS  # a partition of the expanded set
    assert Counter(s.variant for part in splits.values() for s in part) == {v: 50 for v in range(NUM_VARIANTS)}
    assert [s.key for s in resolve_split(data, "test", "paper", seed=3)] == [s.key for s in splits["test"]]
    assert [s.key for s in resolve_split(data, "test", "paper", seed=4)] != [s.key for s in splits["test"]]


def test_paper_leaks_sources_across_splits_and_paper_grouped_does_not():
    data = records(50)
    paper = {n: sources(resolve_split(data, n, "paper", seed=0)) for n in ("train", "test")}
    grouped = {n: sources(resolve_split(data, n, "paper-grouped", seed=0)) for n in ("train", "val", "test")}
    leaked = paper["train"] & paper["test"]
    assert len(leaked) > 0.9 * len(paper["test"])  # nearly every test image has rotated copies in training
    assert not grouped["train"] & grouped["test"] and not grouped["train"] & grouped["val"]
    assert not grouped["val"] & grouped["test"]
    assert [len(grouped[n]) for n in ("train", "val", "test")] == [40, 5, 5]
    assert len(resolve_split(data, "test", "paper-grouped")) == 5 * NUM_VARIANTS


def test_paper_grouped_keeps_lesions_together():
    data = records(40, lesions=10)  # four images per lesion, as in HAM10000
    lesions = {
        n: {s.record.lesion_id for s in resolve_split(data, n, "paper-grouped", seed=1)}
        for n in ("train", "val", "test")
    }
    assert not lesions["train"] & lesions["test"] and sum(map(len, lesions.values())) == 10


def test_unknown_protocol_and_split():
    with pytest.raises(ValueError, match="unknown protocol"):
        resolve_split(records(4), "train", "kfold")
    with pytest.raises(ValueError, match="unknown split"):
        resolve_split(records(4), "dev")


@pytest.mark.parametrize(("n", "world"), [(10, 3), (7, 4), (5, 1), (3, 4)])
def test_eval_sharding_is_sample_exact(n, world):
    plans = [EpochPlan(n, 2, shuffle=False, drop_last=False, rank=r, world_size=world) for r in range(world)]
    shards = [plan.indices(0) for plan in plans]
    assert np.array_equal(np.concatenate(shards), np.arange(n))  # disjoint, in order, union = split
    assert sum(plan.samples_per_rank for plan in plans) == n
    for plan in plans:
        assert sum(len(b) for b in plan.batches(0)) == plan.samples_per_rank == len(plan.indices(5))


def test_train_sharding_is_equal_disjoint_and_reshuffled():
    plans = [EpochPlan(11, 2, shuffle=True, drop_last=True, rank=r, world_size=3, seed=5) for r in range(3)]
    shards = [set(p.indices(0).tolist()) for p in plans]
    assert [len(s) for s in shards] == [3, 3, 3] and not set.intersection(*shards)
    assert len(set.union(*shards)) == 9
    assert all(len(p) == 1 for p in plans)  # 3 samples, batch 2, drop_last
    assert not np.array_equal(plans[0].indices(0), plans[0].indices(1))
    assert np.array_equal(plans[0].indices(1), EpochPlan(11, 2, True, True, 0, 3, seed=5).indices(1))


def test_plan_refuses_no_batch():
    with pytest.raises(ValueError, match="no batch"):
        EpochPlan(3, 8, shuffle=True, drop_last=True)

"""Several data sources in one run: grouped splits, weighted sampling, per-source validation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import SHARED_DATA, make_ham10000, write_csv
from test_data_protocols import records

from cmgnet.data import DataError, EpochPlan
from cmgnet.data.config import DataConfig
from cmgnet.data.loaders import build_loader
from cmgnet.data.protocols import resolve_split
from cmgnet.data.readers import read_ham10000
from cmgnet.data.sources import read_sources
from cmgnet.train.config import load_config, save_config, to_dict
from cmgnet.train.data import DataModule
from cmgnet.train.testing import synthetic_dataset, tiny_experiment

HAM10000_200 = SHARED_DATA / "ham10000-200"


def lesions(samples) -> set[str]:
    return {s.record.group for s in samples}


def test_grouped_split_keeps_each_lesion_in_one_split():
    data = records(60, lesions=25)
    parts = {split: resolve_split(data, split, "grouped", seed=3, fractions=(0.6, 0.2, 0.2))
             for split in ("train", "val", "test")}
    assert sum(map(len, parts.values())) == 60  # every image once
    assert not lesions(parts["train"]) & lesions(parts["val"])
    assert not lesions(parts["train"]) & lesions(parts["test"])
    assert not lesions(parts["val"]) & lesions(parts["test"])
    assert [len(lesions(p)) for p in parts.values()] == [15, 5, 5]  # fractions of the lesions
    assert all(s.variant is None for p in parts.values() for s in p)  # no paper variants
    assert parts["val"] == resolve_split(data, "val", "grouped", seed=3, fractions=(0.6, 0.2, 0.2))
    assert parts["val"] != resolve_split(data, "val", "grouped", seed=4, fractions=(0.6, 0.2, 0.2))


@pytest.mark.skipif(not HAM10000_200.is_dir(), reason=f"HAM10000 not found at {HAM10000_200}")
def test_real_ham10000_split_by_lesion():
    data = read_ham10000(HAM10000_200)
    assert len(data) == 10015 and len({r.lesion_id for r in data}) == 7470
    parts = {split: resolve_split(data, split, "grouped", fractions=(0.9, 0.05, 0.05))
             for split in ("train", "val", "test")}
    assert sum(map(len, parts.values())) == 10015
    owner = {}
    for split, samples in parts.items():
        for lesion in lesions(samples):
            assert owner.setdefault(lesion, split) == split, f"lesion {lesion} in {owner[lesion]} and {split}"


def test_weighted_epochs_follow_the_weights_and_cover_each_source():
    plan = EpochPlan(num_samples=130, batch_size=5, shuffle=True, drop_last=True, seed=1,
                     strata=((30, 3.0), (100, 1.0)), epoch_size=40)
    assert plan.quotas() == [30, 10] and len(plan) == 8
    drawn = [plan.indices(epoch) for epoch in range(10)]
    for order in drawn:
        assert (order < 30).sum() == 30 and (order >= 30).sum() == 10
        assert len(set(order.tolist())) == 40  # no repeat inside an epoch
    ham = np.concatenate([order[order >= 30] for order in drawn])
    assert sorted(ham.tolist()) == list(range(30, 130))  # 10 epochs x 10: each sample once before any repeat
    np.testing.assert_array_equal(plan.indices(3), drawn[3])  # deterministic
    # Ranks split the same epoch's draws, disjoint and equal-sized.
    ranks = [EpochPlan(num_samples=130, batch_size=5, shuffle=True, drop_last=True, seed=1, rank=r, world_size=2,
                       strata=((30, 3.0), (100, 1.0)), epoch_size=40).indices(2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 20 and not set(ranks[0]) & set(ranks[1])
    assert sorted(np.concatenate(ranks).tolist()) == sorted(drawn[2].tolist())


def test_one_source_keeps_the_plain_permutation():
    plain = EpochPlan(num_samples=37, batch_size=4, shuffle=True, drop_last=True, seed=5)
    np.testing.assert_array_equal(plain.indices(2), np.random.default_rng([5, 2]).permutation(37)[:37])
    cfg = DataConfig(root="x", format="isic2017")
    (source,) = cfg.source_configs()
    assert (source.name, source.root, source.protocol, source.weight) == ("isic2017", "x", "official", 1.0)


def test_a_single_source_run_reads_as_before(tmp_path):
    root = synthetic_dataset(tmp_path / "isic", n_train=8, n_val=4, n_test=3)
    cfg = tiny_experiment(root, tmp_path / "runs", "data.epoch_size=3")  # ignored: one source
    loader = build_loader(cfg.data, "train", 4, train=True, seed=5)
    assert loader.plan.strata == () and len(loader) == 2
    expected = np.random.default_rng([5, 0]).permutation(8)
    ids = [i for batch in loader for i in batch["image_id"]]
    assert ids == [f"ISIC_{k:07d}" for k in expected]


def two_sources(tmp_path: Path, ham: int = 12) -> list[str]:
    """Overrides of a tiny experiment reading a synthetic ISIC 2017 folder and a HAM10000 one."""
    isic = synthetic_dataset(tmp_path / "isic", n_train=8, n_val=4, n_test=3)
    ham_root = make_ham10000(tmp_path / "ham", n=ham, size=(40, 30))
    return ["data.root=", "data.format=auto",
            f"data.sources=[{{name: isic, format: isic2017, root: {isic}, weight: 1}}, "
            f"{{name: ham, format: ham10000, root: {ham_root}, protocol: grouped, "
            "split_fractions: [0.5, 0.25, 0.25], weight: 3}]", "data.epoch_size=8"]


def test_a_loader_draws_both_sources_by_weight_at_one_size(tmp_path):
    cfg = tiny_experiment(tmp_path / "unused", tmp_path / "runs", *two_sources(tmp_path))
    assert [s.name for s in cfg.data.source_configs()] == ["isic", "ham"]
    loader = build_loader(cfg.data, "train", 4, train=True)
    assert loader.plan.quotas() == [2, 6]
    ids = [i for batch in loader for i in batch["image_id"]]
    assert len(ids) == 8
    counts = Counter("ham" if int(i[5:]) >= 24306 else "isic" for i in ids)
    assert counts == {"isic": 2, "ham": 6}
    for batch in loader:  # the 4:3 HAM10000 images come out at the run's square size
        assert tuple(batch["image"].shape[1:]) == (3, 32, 32)
    val = build_loader(cfg.data, "val", 4, train=False)  # evaluation reads every source's split whole
    assert len([i for batch in val for i in batch["image_id"]]) == 4 + 4  # 2 of 6 HAM lesions, 2 images each


def test_config_round_trip_and_refusals(tmp_path):
    cfg = tiny_experiment(tmp_path / "unused", tmp_path / "runs", *two_sources(tmp_path))
    again = load_config(save_config(cfg, tmp_path / "c.yaml"))
    assert to_dict(again) == to_dict(cfg)
    with pytest.raises(ValueError, match="data.root .* or data.sources .*not both"):
        tiny_experiment(tmp_path / "x", tmp_path / "runs", *two_sources(tmp_path)[2:])
    with pytest.raises(ValueError, match="eval.select='nope': must be all, sources or a data source name"):
        tiny_experiment(tmp_path / "x", tmp_path / "runs", *two_sources(tmp_path), "eval.select=nope")
    with pytest.raises(ValueError, match="data source 'ham': split_fractions"):
        tiny_experiment(tmp_path / "x", tmp_path / "runs", *two_sources(tmp_path)[:2],
                        "data.sources=[{name: ham, format: ham10000, root: r, split_fractions: [0.5, 0.6, 0]}]")


def test_every_source_is_checked_before_training(tmp_path):
    cfg = tiny_experiment(tmp_path / "unused", tmp_path / "runs", *two_sources(tmp_path), "data.validate=full")
    data = DataModule(cfg.data)
    data.validate(["train", "val", "test"])
    bad = tmp_path / "ham" / "images" / "ISIC_0024310.jpg"  # a HAM10000 image, whichever split holds it
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DataError, match="ISIC_0024310.jpg"):
        DataModule(cfg.data).validate(["train", "val", "test"])


def test_an_image_id_in_two_sources_is_refused(tmp_path):
    overrides = two_sources(tmp_path)
    copy = make_ham10000(tmp_path / "ham2", n=2)
    overrides[2] = overrides[2][:-1] + f", {{name: again, format: ham10000, root: {copy}, protocol: grouped}}]"
    cfg = tiny_experiment(tmp_path / "unused", tmp_path / "runs", *overrides)
    with pytest.raises(DataError, match="image id 'ISIC_0024306' is in data sources 'ham' and 'again'"):
        DataModule(cfg.data)


def test_training_reports_each_source_and_selects_on_the_chosen_one(tmp_path):
    from cmgnet.train.engine import Trainer

    cfg = tiny_experiment(tmp_path / "unused", tmp_path / "runs", *two_sources(tmp_path, ham=16),
                          "train.epochs=2", "eval.select=ham", "eval.text_regimes=[none,metadata,shuffled,predicted]",
                          "eval.hd95=false")
    result = Trainer(cfg).fit()
    record = result.state.history[-1]
    assert {"val_dice", "val_isic/dice", "val_ham/dice", "val_selected_dice"} <= set(record)
    assert record["val_selected_dice"] == record["val_ham/dice"]
    best = max(result.state.history, key=lambda r: r["val_ham/dice"])
    assert result.state.best_metric == pytest.approx(best["val_ham/dice"])
    summary = json.loads((result.run_dir / "eval" / "summary.json").read_text())
    assert {"test/none", "test.isic/none", "test.ham/none", "test.ham/shuffled"} <= set(summary)
    assert summary["test.isic/none"]["n_images"] == 3
    assert summary["test/none"]["n_images"] == 3 + summary["test.ham/none"]["n_images"]
    assert set(summary["test/none"]["per_source"]) == {"isic", "ham"}
    assert "metadata_minus_shuffled" in summary["test.ham/shuffled"]["paired"]
    assert (result.run_dir / "eval" / "test.ham-metadata" / "per_image.csv").is_file()
    # The classifier is scored per source too, on that source's images only.
    assert summary["test.isic/predicted"]["diagnosis"]["n"] == 3
    assert summary["test/predicted"]["diagnosis"]["n"] == 3 + summary["test.ham/predicted"]["diagnosis"]["n"]


def test_a_split_csv_beside_the_config_resolves_per_source(tmp_path):
    isic = synthetic_dataset(tmp_path / "isic", n_train=8, n_val=4, n_test=3)
    write_csv(tmp_path / "splits.csv", ("image_id", "split"), [("ISIC_0000000", "test"), ("ISIC_0000001", "train")])
    (tmp_path / "exp.yaml").write_text(
        f"data:\n  sources:\n    - {{name: a, format: isic2017, root: {isic}, protocol: split-csv, "
        "split_csv: splits.csv}\n")
    cfg = load_config(tmp_path / "exp.yaml")
    assert cfg.data.sources[0].split_csv == str(tmp_path / "splits.csv")


def test_a_source_weight_out_of_range_names_its_key(tmp_path):
    with pytest.raises(ValueError, match=r"data.sources\[1\].weight=0.0: must be > 0"):
        tiny_experiment(tmp_path / "x", tmp_path / "runs", *two_sources(tmp_path)[:2],
                        "data.sources=[{name: a, root: r}, {name: b, root: s, weight: 0}]")


def test_agreement_split_keeps_the_agreeing_training_images_and_every_other(tmp_path, capsys):
    from cmgnet.data.agreement import main

    root = make_ham10000(tmp_path / "ham", n=24)
    data = DataConfig(format="ham10000", root=str(root), protocol="grouped", split_fractions=(0.5, 0.25, 0.25))
    (source,) = read_sources(data)
    train = [s.record.image_id for s in source.split("train", 0)]
    scores = tmp_path / "per_image.csv"
    write_csv(scores, ("image_id", "dice"), [(image_id, 0.9 if i % 2 else 0.5) for i, image_id in enumerate(train)])
    out = tmp_path / "split.csv"
    argv = ["--format", "ham10000", "--root", str(root), "--fractions", "0.5", "0.25", "0.25",
            "--per-image", str(scores), "--min-dice", "0.85", "--out", str(out)]
    assert main(argv) == 0
    kept = DataConfig(format="ham10000", root=str(root), protocol="split-csv", split_csv=str(out))
    (filtered,) = read_sources(kept)
    assert [s.record.image_id for s in filtered.split("train", 0)] == train[1::2]
    for split in ("val", "test"):  # unchanged, so scores stay comparable
        assert filtered.split(split, 0) == source.split(split, 0)
    write_csv(scores, ("image_id", "dice"), [(train[0], 0.9)])
    with pytest.raises(SystemExit, match="no score for"):
        main(argv)

"""build_loader end to end: both backends, batches, sharding, epochs, text regimes, real data."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from data_fixtures import (
    ISIC2017_METADATA,
    ISIC2018_256,
    make_folder,
    make_mask_images,
    requires_dali,
    requires_shared_data,
)

from cmgnet.data import DataConfig, SegmentationDataset, build_loader, generate_dataset, read_isic2017
from cmgnet.inference import IMAGENET_MEAN, IMAGENET_STD
from cmgnet.text.pseudo_text import NEUTRAL_SENTENCE, TEMPLATES

BACKENDS = ["torch", pytest.param("dali", marks=requires_dali)]


@pytest.fixture(scope="module")
def isic(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("synthetic"), 10, 4, 5, size=40, seed=0)


def config(root, loader, **overrides) -> DataConfig:
    fields = dict(format="isic2017", root=str(root), image_size=32, loader=loader, num_workers=1) | overrides
    return DataConfig(**fields)


def check_batch(batch, size=32):
    image, mask = batch["image"], batch["mask"]
    n = image.shape[0]
    assert image.shape == (n, 3, size, size) and image.dtype == torch.float32
    assert mask.shape == (n, 1, size, size) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert len(batch["text"]) == len(batch["image_id"]) == n and all(isinstance(t, str) for t in batch["text"])
    pixels = image * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert -0.15 < pixels.min() and pixels.max() < 1.15  # normalised from 0..255 (RGB shift may step outside)


@pytest.mark.parametrize("loader", BACKENDS)
def test_batches_and_lengths(isic, loader):
    train = build_loader(config(isic, loader, augment="paper+strong"), "train", 4, train=True)
    batches = list(train)
    assert len(train) == len(batches) == 2  # 10 samples, drop_last
    for batch in batches:
        check_batch(batch)
    assert any(t.startswith(TEMPLATES["nevus"]) for b in batches for t in b["text"])  # train regime: oracle
    test = build_loader(config(isic, loader), "test", 2, train=False)
    batches = list(test)
    assert len(test) == len(batches) == 3 and [len(b["image_id"]) for b in batches] == [2, 2, 1]
    assert [i for b in batches for i in b["image_id"]] == [r.image_id for r in read_isic2017(isic) if r.split == "test"]
    assert all(t == NEUTRAL_SENTENCE for b in batches for t in b["text"])  # eval regime defaults to none


ZOOM = {"scale_range": (0.7, 1.4), "shift_range": 0.1}


@requires_dali
@pytest.mark.parametrize("affine", [{}, ZOOM], ids=["paper+strong", "with-zoom"])
def test_dali_and_torch_give_the_same_batches(isic, affine):
    """Same seed, same epoch: same order and draws; pixels equal within interpolation tolerance."""
    runs = {}
    for loader in ("torch", "dali"):
        cfg = config(isic, loader, augment="paper+strong", image_size=48, **affine)
        data = build_loader(cfg, "train", 5, train=True, seed=3)
        runs[loader] = [batch for _ in range(2) for batch in data]  # two epochs
    assert len(runs["torch"]) == len(runs["dali"]) == 4
    for a, b in zip(runs["torch"], runs["dali"], strict=True):
        assert a["image_id"] == b["image_id"] and a["text"] == b["text"]
        assert (a["image"] - b["image"]).abs().flatten(1).mean(1).max() < 0.02
        assert (a["mask"] != b["mask"]).float().flatten(1).mean(1).max() < 0.01
    assert runs["torch"][0]["image_id"] != runs["torch"][2]["image_id"]  # reshuffled per epoch


@pytest.mark.parametrize("affine", [{}, ZOOM], ids=["paper+strong", "with-zoom"])
@pytest.mark.parametrize("loader", BACKENDS)
def test_augmented_images_stay_aligned_with_masks(tmp_path, loader, affine):
    root = make_mask_images(tmp_path, n=6, size=64)  # each image is its own mask
    cfg = DataConfig(
        format="folder", root=str(root), image_size=48, loader=loader, augment="paper+strong", num_workers=1, **affine
    )
    data = build_loader(cfg, "train", 2, train=True)
    for batch in itertools.chain(data, data):
        check_batch(batch, 48)
        grey = batch["image"][:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
        agreement = ((grey > 0.5) == batch["mask"][:, 0].bool()).float().flatten(1).mean(1)
        assert agreement.min() > 0.95


@pytest.mark.parametrize("loader", BACKENDS)
def test_eval_sharding_is_sample_exact(isic, loader):
    cfg = config(isic, loader)
    shards = [
        [i for b in build_loader(cfg, "train", 3, train=False, rank=r, world_size=4) for i in b["image_id"]]
        for r in range(4)
    ]
    assert [len(s) for s in shards] == [3, 3, 2, 2]
    assert sum(shards, []) == [r.image_id for r in read_isic2017(isic) if r.split == "train"]
    empty = build_loader(cfg, "val", 2, train=False, rank=5, world_size=6)  # 4 samples, 6 ranks
    assert len(empty) == 0 and list(empty) == []


@pytest.mark.parametrize("loader", BACKENDS)
def test_train_sharding_and_epochs(isic, loader):
    cfg = config(isic, loader)
    ranks = [build_loader(cfg, "train", 2, train=True, rank=r, world_size=2, seed=1) for r in range(2)]
    first = [[i for b in rank for i in b["image_id"]] for rank in ranks]
    assert len(first[0]) == len(first[1]) == 4 and not set(first[0]) & set(first[1])
    second = [i for b in ranks[0] for i in b["image_id"]]  # the next pass is epoch 1
    assert second != first[0]
    ranks[0].set_epoch(0)
    assert [i for b in ranks[0] for i in b["image_id"]] == first[0]
    ranks[0].set_epoch(0)
    next(iter(ranks[0]))  # a pass abandoned early restarts cleanly
    assert [i for b in ranks[0] for i in b["image_id"]] == first[0]


@pytest.mark.parametrize("loader", BACKENDS)
def test_paper_protocol_batches_are_fixed_variants(isic, loader):
    cfg = config(isic, loader, protocol="paper-grouped")
    test = build_loader(cfg, "test", 24, train=False)
    first, again = list(test), list(test)
    ids = [i for b in first for i in b["image_id"]]  # 19 images: 15/2/2 sources, 24 variants each
    assert len(first) == 2 and len(ids) == 48 and len({i.split("@")[0] for i in ids}) == 2
    assert sorted({i.split("@")[1] for i in ids}) == [f"v{v:02d}" for v in range(24)]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again, strict=True))  # deterministic


def test_text_regimes_for_train_and_eval(tmp_path):
    root = make_folder(tmp_path, n=6)
    cfg = DataConfig(
        format="folder", root=str(root), image_size=32, loader="torch", num_workers=0, text_regime_eval="metadata"
    )
    train_texts = [t for b in build_loader(cfg, "train", 4, train=True) for t in b["text"]]
    assert any(t.startswith(TEMPLATES["melanoma"]) or t.startswith(TEMPLATES["nevus"]) for t in train_texts)
    (val,) = build_loader(cfg, "val", 4, train=False)
    assert val["text"] == ["Lesion on the back of a 34-year-old female patient."]
    predicted = replace(cfg, text_regime_eval="predicted")
    (val,) = build_loader(predicted, "val", 4, train=False, predicted_diagnoses={"case004": "bcc"})
    assert val["text"][0].startswith(TEMPLATES["basal_cell_carcinoma"])
    with pytest.raises(ValueError, match="no predicted diagnosis"):
        build_loader(predicted, "val", 4, train=False)


def test_shuffled_regime_gives_each_image_another_images_metadata(isic):
    cfg = config(isic, "torch", num_workers=0, text_regime_eval="metadata")

    def texts(c, **kw):
        return {i: t for b in build_loader(c, "test", 2, train=False, **kw) for i, t in zip(b["image_id"], b["text"])}

    own = texts(cfg)
    shuffled = texts(replace(cfg, text_regime_eval="shuffled"))
    assert set(shuffled) == set(own) and sorted(shuffled.values()) == sorted(own.values())  # a permutation
    assert shuffled != own and shuffled == texts(replace(cfg, text_regime_eval="shuffled"))  # fixed seed
    sharded = {**texts(replace(cfg, text_regime_eval="shuffled"), rank=0, world_size=2),
               **texts(replace(cfg, text_regime_eval="shuffled"), rank=1, world_size=2)}
    assert sharded == shuffled  # donors are drawn over the whole split, not per rank
    assert texts(replace(cfg, text_regime_eval="shuffled", seed=1)) != shuffled


def test_map_style_dataset(isic):
    val = SegmentationDataset.from_config(config(isic, "torch"), "val", train=False)
    item = val[0]
    assert len(val) == 4 and item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
    assert item["image_id"] == "ISIC_0000010" and item["text"] == NEUTRAL_SENTENCE
    assert torch.equal(val[(0, 7)]["image"], item["image"])  # evaluation ignores the epoch
    train = SegmentationDataset.from_config(config(isic, "torch"), "train", train=True)
    assert not torch.equal(train[(0, 0)]["image"], train[(0, 1)]["image"])  # a new draw per epoch


def test_torch_loader_with_worker_processes(isic):
    data = build_loader(config(isic, "torch", num_workers=2, augment="paper+strong"), "train", 5, train=True)
    assert [len(b["image_id"]) for _ in range(2) for b in data] == [5, 5, 5, 5]


@pytest.mark.parametrize("workers", [0, 1])
def test_torch_loader_leaves_the_global_rng_alone(isic, workers):
    """Worker seeds come from the loader's own generator: a resumed run, whose persistent workers
    start at another point of the run, must still draw the same modality-dropout numbers."""
    data = build_loader(config(isic, "torch", num_workers=workers), "train", 5, train=True)
    before = torch.get_rng_state()
    assert len([b for _ in range(2) for b in data]) == 4
    assert torch.equal(torch.get_rng_state(), before)


def test_synthetic_generator_is_deterministic(tmp_path):
    a = generate_dataset(tmp_path / "a", 3, 1, 1, size=32, seed=4)
    b = generate_dataset(tmp_path / "b", 3, 1, 1, size=32, seed=4)
    c = generate_dataset(tmp_path / "c", 3, 1, 1, size=32, seed=5)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 5 * 2 + 3 * 2  # images + masks, labels + metadata per split
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.suffix == ".png")


@requires_shared_data
@pytest.mark.parametrize("loader", BACKENDS)
def test_real_data_loader(loader):
    cfg = DataConfig(
        format="isic2018",
        root=str(ISIC2018_256),
        metadata=[str(ISIC2017_METADATA)],
        protocol="paper-grouped",
        augment="paper+strong",
        loader=loader,
        num_workers=2,
    )
    data = build_loader(cfg, "train", 8, train=True)
    assert len(data) == round(2065 * 0.8) * 24 // 8  # paper-grouped: 80% of the sources, 24 variants each
    batch = next(iter(data))
    check_batch(batch, 256)
    assert batch["mask"].mean() > 0.05  # lesions are there

"""The comparison runner (shared with the ablation) on the synthetic data: tables equal the eval files, resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cmgnet.train.compare import CompareConfig, load_compare_config, run_comparison
from cmgnet.train.testing import synthetic_dataset, tiny_experiment
from cmgnet.train.reports import PAPER_COLUMNS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return synthetic_dataset(tmp_path_factory.getbasetemp() / "synthetic")


def _tiny_compare(data_root: Path, out: Path, *extra: str):
    cfg = tiny_experiment(data_root, out, "train.epochs=1", "eval.hd95=false", "eval.overlays=0",
                          "eval.text_regimes=[none, oracle]", *extra)
    section = CompareConfig(models=["unet", "guidedecoder"], cost_size=32, latency_runs=1,
                            variants={"guidedecoder": {"model": {"guide_scales": [4, 2], "self_attention_scales": [4]}}})
    return cfg, section


def test_table_equals_the_evaluation_files_and_resume_skips(data_root, tmp_path, capsys, monkeypatch):
    cfg, section = _tiny_compare(data_root, tmp_path)
    report = run_comparison(cfg, section)
    assert [r["variant"] for r in report["rows"]] == ["unet", "guidedecoder"]
    saved = json.loads(report["json"].read_text())
    markdown = report["markdown"].read_text()
    assert "equal epochs: 1 epochs" in saved["budget"] and "per-image" in markdown and "pooled" in markdown
    for row in saved["rows"]:
        summary = json.loads((Path(row["run_dir"]) / "eval" / "summary.json").read_text())
        regimes = ["none"] if row["image_only"] else ["none", "oracle"]
        assert sorted(row["results"]) == sorted(regimes)  # image-only: evaluated once
        for regime in regimes:
            evaluated = summary[f"test/{regime}"]
            for convention in ("per_image_mean", "per_image_ci95", "pooled"):
                assert row["results"][regime][convention] == evaluated[convention]
        assert row["cost"]["params_M"] > 0 and row["cost"]["gflops"] > 0 and row["cost"]["latency_ms"] > 0
        # The Markdown table shows the same numbers (in %, 1 decimal) and their 95% CIs in every regime's table.
        for regime in ("none", "oracle"):
            evaluated = summary[f"test/{regimes[0] if row['image_only'] else regime}"]
            values, intervals = evaluated["per_image_mean"], evaluated["per_image_ci95"]
            cells = [f"{100 * values[k]:.1f} [{100 * intervals[k][0]:.1f}, {100 * intervals[k][1]:.1f}]"
                     for _, k in PAPER_COLUMNS]
            caption = f"text regime '{regime}', per-image-mean"
            table = markdown[markdown.index(caption):].split("\n\n")[0]
            line = next(ln for ln in table.splitlines() if ln.startswith(f"| {row['label']}"))
            assert [c.strip() for c in line.strip("|").split("|")][1:1 + len(cells)] == cells
    assert re.search(r"GuideDecoder \(re-impl\.\)", markdown) and "U-Net †" in markdown

    # Rerun: every model has its results, nothing trains, the same table comes out.
    import cmgnet.train.engine as engine

    def no_training(self):
        raise AssertionError("a finished model was retrained")

    monkeypatch.setattr(engine.Trainer, "fit", no_training)
    again = run_comparison(cfg, section)
    assert json.loads(again["json"].read_text())["rows"] == saved["rows"]

    # Another recipe under the same run name is refused, not silently mixed in.
    changed, _ = _tiny_compare(data_root, tmp_path, "optim.lr=1e-2")
    with pytest.raises(ValueError, match="another config"):
        run_comparison(changed, section)


def test_ablation_rows_are_variants_of_the_same_runner(data_root, tmp_path, capsys):
    from cmgnet.train.ablate import run_ablation

    cfg = tiny_experiment(data_root, tmp_path, "train.epochs=1", "train.max_steps=2", "eval.hd95=false",
                          "eval.overlays=0")
    report = run_ablation(cfg, ["unet", "no_cmfm"], cost=None)
    printed = capsys.readouterr().out
    assert "| Network" in printed and "Baseline (U-Net)" in printed and "CMG-Net w/o CMFM" in printed
    assert report["json"].name == "ablation.json" and report["rows"][1]["model_config"]["cmfm"] is False
    assert report["rows"][0]["arch"] == "unet" and report["rows"][0]["steps"] == 2


def test_shipped_compare_configs(monkeypatch):
    for name in ("compare-cpu", "compare-gpu"):
        cfg, section = load_compare_config(REPO / "configs" / f"{name}.yaml")
        rows = section.resolve()
        assert [r.key for r in rows][:7] == ["unet", "unetplusplus", "transunet", "swinunet", "guidedecoder",
                                              "lvit", "cmgnet"]
        # + the four ablation rows; the CPU study also puts U-Net and CMG-Net on the pretrained encoder
        extra = ["unet_lite0", "cmgnet_lite0"] if name == "compare-cpu" else []
        assert [r.key for r in rows][7:] == [*extra, "no_masa", "no_text", "no_cmfm", "no_alpha"]
        from cmgnet.train.variants import variant_experiment

        for row in rows:  # every model config builds from the shared section + its overrides
            vcfg = variant_experiment(cfg, row, name)
            assert cfg.data.image_size % vcfg.model.stride == 0
    with pytest.raises(ValueError, match="unknown model"):
        section.resolve(["no_such_model"])

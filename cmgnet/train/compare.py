"""The baseline comparison (paper tables 1-2, with the ablation rows of table 3 if asked).

    cmgnet compare --config configs/compare-cpu.yaml [--models unet cmgnet ...] [--budget-minutes M]
    accelerate launch launch/compare.py --config configs/compare-gpu.yaml

A comparison config is an experiment config (the shared data, protocol, augmentation,
optimiser, schedule, budget and the ``model`` section the variants start from) plus a
``compare:`` section (:class:`CompareConfig`): which models, the split, the cost
measurement, and per-model ``model`` overrides. Every model is trained and evaluated by the
same runner as the ablation (:func:`cmgnet.train.variants.run_variants`); results go to
``<output_dir>/<run>-compare/compare.{json,md}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmgnet.errors import cli_entry, shorten, shown

from .ablate import ablation_variant
from .cost import CostSpec
from .variants import Variant

if TYPE_CHECKING:
    from .config import ExperimentConfig

CATALOGUE: dict[str, Variant] = {
    "unet": dataclasses.replace(ablation_variant("unet"), label="U-Net",
                                note="Ronneberger et al. 2015; the project's U-Net (cmgnet.model.unet)"),
    "unetplusplus": Variant("unetplusplus", "U-Net++", "unetplusplus",
                            note="Zhou et al. 2018; MONAI BasicUNetPlusPlus, no deep supervision"),
    "transunet": Variant("transunet", "TransUNet-like", "transunet",
                         note="after Chen et al. 2021: CNN encoder + ViT (MONAI blocks) over the H/16 tokens + "
                              "U-Net decoder; nothing pretrained"),
    "swinunet": Variant("swinunet", "Swin-UNet-like", "swinunet",
                        note="MONAI SwinUNETR in 2D standing in for Swin-Unet (Cao et al. 2022): conv decoder, "
                             "not pretrained"),
    "guidedecoder": Variant("guidedecoder", "GuideDecoder (re-impl.)", "guidedecoder",
                            note="re-implementation after Zhong et al., MICCAI 2023: frozen text encoder, "
                                 "image -> text cross-attention in the decoder stages only"),
    "lvit": Variant("lvit", "LViT (re-impl.)", "lvit",
                    note="re-implementation after Li et al., TMI 2023: text tokens in a ViT branch beside the CNN"),
    "cmgnet": dataclasses.replace(ablation_variant("full"), key="cmgnet"),
    **{k: ablation_variant(k) for k in ("no_masa", "no_text", "no_cmfm", "no_alpha")},
}
"""Every model the comparison knows, by key (the ablation rows included: ``unet`` and ``cmgnet``
are table 3's baseline and full model)."""

DEFAULT_MODELS: tuple[str, ...] = ("unet", "unetplusplus", "transunet", "swinunet", "guidedecoder", "lvit", "cmgnet")
ABLATION_MODELS: tuple[str, ...] = ("no_masa", "no_text", "no_cmfm", "no_alpha")


@dataclass
class CompareConfig:
    """The ``compare:`` section of a comparison config.

    Args:
        models: keys of :data:`CATALOGUE` or of ``variants``, in table order (empty: the
            baselines and CMG-Net, :data:`DEFAULT_MODELS`).
        ablation: append table 3's CMG-Net rows (w/o MASA, Text, CMFM, alpha).
        split: split of the tables (``""``: the first of ``eval.splits``).
        text_regimes: regimes evaluated (empty: ``eval.text_regimes``).
        budget_minutes: equal wall time per model (``train.time_limit_minutes``); 0: equal
            epochs (``train.epochs``).
        cost_size: input side of the GFLOPs count and CPU latency.
        latency_runs: timed CPU forwards at batch 1 (median reported); 0: no latency.
        variants: per key, ``label`` / ``arch`` / ``note`` / ``model`` (overrides merged into the
            catalogue entry's); a new key defines a new row.
    """

    models: list[str] = field(default_factory=list)
    ablation: bool = False
    split: str = ""
    text_regimes: list[str] = field(default_factory=list)
    budget_minutes: float = 0.0
    cost_size: int = 256
    latency_runs: int = 5
    variants: dict[str, Any] = field(default_factory=dict)

    def resolve(self, only: Sequence[str] | None = None) -> list[Variant]:
        """The rows to run: ``only`` (e.g. ``--models``) or :attr:`models`, with the overrides applied."""
        catalogue = dict(CATALOGUE)
        for key, spec in self.variants.items():
            if not isinstance(spec, Mapping) or set(spec) - {"label", "arch", "note", "model"}:
                raise ValueError(f"compare.variants.{shorten(str(key))}: expected a mapping of label, arch, note, "
                                 f"model; got {shown(spec)}")
            base = catalogue.get(key)
            if base is None and "arch" not in spec:
                raise ValueError(f"compare.variants.{key}: a new variant needs an arch")
            base = base or Variant(key, key, spec["arch"])
            catalogue[key] = dataclasses.replace(
                base, label=spec.get("label", base.label), arch=spec.get("arch", base.arch),
                note=spec.get("note", base.note), model={**base.model, **dict(spec.get("model") or {})})
        keys = list(only or self.models or DEFAULT_MODELS)
        if self.ablation and not only:
            keys += [k for k in ABLATION_MODELS if k not in keys]
        if unknown := [k for k in keys if k not in catalogue]:
            raise ValueError(f"unknown model(s) {unknown}; choose from {', '.join(catalogue)}")
        return [catalogue[k] for k in keys]


def load_compare_config(path: str | Path | None, overrides: Sequence[str] = ()) -> tuple[ExperimentConfig, CompareConfig]:
    """Read a comparison config: the experiment (as :func:`~cmgnet.train.config.load_config`) and its ``compare:`` section.

    Args:
        path: YAML file or shipped config name.
        overrides: dotted ``key=value`` strings (``compare.models=[unet, cmgnet]`` included).

    Returns:
        ``(experiment, compare section)``.
    """
    from cmgnet.typed import build

    from .config import experiment_from_tree, read_tree
    from .config_ranges import check_value

    tree = read_tree(path, overrides)
    section = tree.pop("compare", None) or {}
    return experiment_from_tree(tree), build(CompareConfig, section, "compare", check=check_value)


def run_comparison(cfg: ExperimentConfig, compare: CompareConfig | None = None, models: Sequence[str] | None = None,
                   budget_minutes: float | None = None) -> dict[str, Any]:
    """Train, evaluate and measure every model of the comparison; write ``compare.{json,md}``.

    Args:
        cfg: the shared experiment.
        compare: the ``compare:`` section (default: :class:`CompareConfig` defaults).
        models: run only these keys (a ``--models`` list), in this order.
        budget_minutes: equal wall time per model; overrides ``compare.budget_minutes`` (0 or
            ``None`` there: equal epochs).

    Returns:
        The report of :func:`~cmgnet.train.variants.run_variants`.

    Example:
        >>> cfg, section = load_compare_config("configs/compare-cpu.yaml", ["train.max_steps=3"])
        >>> report = run_comparison(cfg, section, models=["unet", "cmgnet"])
        >>> report["markdown"]
        PosixPath('runs/compare-cpu-compare/compare.md')
    """
    from .variants import run_variants

    compare = compare or CompareConfig()
    budget = budget_minutes if budget_minutes is not None else compare.budget_minutes
    cost = CostSpec(size=compare.cost_size, latency_runs=compare.latency_runs)
    return run_variants(cfg, compare.resolve(models), kind="compare", title="Comparison",
                        split=compare.split or None, text_regimes=compare.text_regimes or None,
                        budget_minutes=budget or None, cost=cost)


@cli_entry
def compare_main(argv: Sequence[str] | None = None, prog: str = "cmgnet compare") -> int:
    """``cmgnet compare --config <name or YAML> [--models ...] [--budget-minutes M] [key=value ...]``."""
    from .cli import _config_parser, _usage_errors, run_command

    parser = _config_parser(prog, "Train and evaluate the baselines and CMG-Net under one recipe and budget "
                            "(paper tables 1-2; add the ablation rows with compare.ablation=true); print the "
                            "tables and write <output_dir>/<run>-compare/compare.{json,md}. A finished model is "
                            "not retrained.", [
        f"{prog} --config configs/compare-cpu.yaml",
        f"{prog} --config configs/compare-cpu.yaml --models unet cmgnet --budget-minutes 3",
        f"{prog} --config configs/compare-cpu.yaml train.max_steps=3 logging.run_name=smoke",
        "accelerate launch launch/compare.py --config configs/compare-gpu.yaml",
    ])
    parser.add_argument("--models", nargs="+", default=None, metavar="KEY",
                        help=f"models to run, in table order (default: the config's compare.models); "
                             f"known: {', '.join(CATALOGUE)}")
    parser.add_argument("--budget-minutes", type=float, default=None, metavar="M",
                        help="equal wall time: M minutes of training per model (default: the config's "
                             "compare.budget_minutes; 0 there: equal epochs)")
    args = parser.parse_args(argv)
    with _usage_errors(parser):
        cfg, compare = load_compare_config(args.config, args.overrides)
        compare.resolve(args.models)  # unknown keys are usage errors, before anything trains
    return run_command(cfg, args.print_config, lambda c: run_comparison(c, compare, args.models, args.budget_minutes))

"""cmgnet.typed: dataclasses from plain trees, typed by pydantic, errors naming the dotted key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from cmgnet.typed import build, to_plain


@dataclass
class Item:
    name: str = ""
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.weight > 100:
            raise ValueError("Item: weight too large")


@dataclass
class Section:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    splits: list[str] = field(default_factory=lambda: ["test"])
    mode: Literal["none", "largest"] = "none"
    epochs: int = 1
    items: list[Item] = field(default_factory=list)
    limit: int | None = None
    files: list[str] | None = None
    flag: bool = False


@dataclass
class Tree:
    name: str = "run"
    section: Section = field(default_factory=Section)


def test_yaml_values_become_the_fields_types():
    tree = build(Tree, {"name": 2024, "section": {"lr": 1, "betas": [0.5, "0.9"], "splits": "val", "epochs": 3,
                                                  "items": [{"name": "isic", "weight": 2}], "limit": None}})
    assert tree.name == "2024" and tree.section.lr == 1.0 and isinstance(tree.section.lr, float)
    assert tree.section.betas == (0.5, 0.9) and tree.section.splits == ["val"] and tree.section.epochs == 3
    assert tree.section.items == [Item("isic", 2.0)] and tree.section.limit is None
    assert to_plain(tree)["section"]["betas"] == [0.5, 0.9]  # back to YAML: lists
    assert build(Section, {"files": "a.csv"}).files == ["a.csv"] and build(Section, {"files": None}).files is None


@pytest.mark.parametrize("value", ["yes", "no", 1, 0, "true"])
def test_a_boolean_is_only_true_or_false(value):
    with pytest.raises(TypeError, match="flag: input should be a valid boolean"):
        build(Section, {"flag": value})


@pytest.mark.parametrize("values, error, message", [
    ({"section": {"lrr": 1}}, KeyError, "unknown key(s) section.lrr in section; valid: lr, betas"),
    ({"nme": 1}, KeyError, "unknown key(s) nme; valid: name, section"),
    ({"section": 3}, TypeError, "section: expected a mapping of Section fields, got 3"),
    ({"section": {"epochs": "many"}}, TypeError, "section.epochs: input should be a valid integer"),
    ({"section": {"lr": [1]}}, TypeError, "section.lr: input should be a valid number"),
    ({"section": {"betas": [0.9, 0.9, 0.9]}}, ValueError, "section.betas: expected 2 values, got [0.9, 0.9, 0.9]"),
    ({"section": {"betas": [0.9, float("nan")]}}, ValueError, "section.betas[1]=nan: must be a finite number"),
    ({"section": {"lr": "inf"}}, ValueError, "section.lr=inf: must be a finite number"),
    ({"section": {"mode": "biggest"}}, ValueError, "section.mode: input should be 'none' or 'largest'"),
    ({"section": {"items": [{}, {"wieght": 1}]}}, KeyError, "unknown key(s) section.items[1].wieght"),
    ({"section": {"items": [{"weight": "x"}]}}, TypeError, "section.items[0].weight: input should be a valid number"),
    ({"section": {"limit": "none"}}, TypeError, "section.limit: "),
    ({"section": {"lr": True}}, TypeError, "section.lr: input should be a number, not true/false"),
    ({"section": {"epochs": True}}, TypeError, "section.epochs: input should be a valid integer, got True"),
    ({"section": {"epochs": 2.5}}, TypeError, "section.epochs: input should be a valid integer"),
    ({"section": {"betas": [0.9, False]}}, TypeError, "section.betas[1]: input should be a number"),
])
def test_a_bad_value_names_its_key(values, error, message):
    with pytest.raises(error) as caught:
        build(Tree, values)
    text = caught.value.args[0]
    assert text.startswith(message), text
    assert "\n" not in text


def test_check_sees_every_value_under_its_key_before_post_init():
    seen = {}

    def check(key, value):
        seen[key] = value
        if key.endswith(".weight") and value > 100:
            raise ValueError(f"{key}={value}: must be <= 100")

    build(Tree, {"section": {"lr": 0.1, "items": [{"weight": 3}]}}, check=check)
    assert seen["section.lr"] == 0.1 and seen["section.items[0].weight"] == 3.0
    with pytest.raises(ValueError, match=r"^section.items\[0\].weight=500.0: must be <= 100$"):
        build(Tree, {"section": {"items": [{"weight": 500}]}}, check=check)  # not Item's own message

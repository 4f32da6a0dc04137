"""One source of defaults: the config schema. Its defaults are config/config.yaml's values, every key has
a description, docs/config.md is generated from it, and an empty config behaves as the shipped one."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import pytest
import torch

from cpmn import config as C
from cpmn.losses import L_total

ROOT = Path(__file__).resolve().parents[1]

#: every stage's package defaults and the schema section they must equal
PACKAGE_DEFAULTS = [
    ("cpmn.synthetic.cohort", "DEFAULTS", "synthetic"),
    ("cpmn.data.dicomio", "DEFAULTS", "convert"),
    ("cpmn.data.register", "DEFAULTS", "register"),
    ("cpmn.data.preprocess", "DEFAULTS", "preprocess"),
    ("cpmn.data.patches", "DEFAULTS", "patches"),
    ("cpmn.data.split", "DEFAULTS", "split"),
    ("cpmn.variants", "MODEL_DEFAULTS", "model"),
    ("cpmn.train", "TRAIN_DEFAULTS", "train"),
    ("cpmn.scoring", "DEFAULTS", "infer"),
    ("cpmn.evaluate", "DEFAULTS", "evaluate"),
    ("cpmn.synthetic.observer", "DEFAULTS", "ceiling"),
]


def test_every_key_of_the_shipped_config_is_in_the_schema_with_its_value_as_default_and_a_description():
    cfg = C.load_yaml(ROOT / "config" / "config.yaml")
    props = C.load_yaml(C.SCHEMA_PATH)["properties"]
    assert set(cfg) == set(props)
    missing = []
    for section, value in cfg.items():
        sub = props[section]
        if not sub.get("description"):
            missing.append(section)
        if not isinstance(value, dict) or section == "variants":
            assert sub.get("default") == value, section
            continue
        assert set(value) == set(sub["properties"]), section
        for key, v in value.items():
            prop = sub["properties"][key]
            assert prop.get("default") == v, (
                f"{section}.{key}: schema default {prop.get('default')!r} != {v!r}"
            )
            if not prop.get("description"):
                missing.append(f"{section}.{key}")
    for key, prop in props["variants"]["additionalProperties"]["properties"].items():
        if not prop.get("description"):
            missing.append(f"variants.*.{key}")
    assert missing == []


#: entry keys without a default of their own: required (pathways) or inherited (model.backbone, infer.score)
NO_DEFAULT = {"variants.*.pathways", "variants.*.backbone", "variants.*.score"}


def test_every_key_at_every_depth_has_a_description_and_a_default_that_its_parent_agrees_with():
    """Nested mappings (``convert.series_rules``, ``evaluate.table2``, a ``variants:`` entry) too: each key
    has a ``description:`` and a ``default:``, and where the parent has a ``default:`` mapping as well, the
    child's default is the parent's value for it."""
    problems: list[str] = []

    def walk(node: dict, path: str) -> None:
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props is None and isinstance(extra, dict) and "properties" in extra:
            props, path = extra["properties"], f"{path}.*"
        if props is None:
            return
        parent = node.get("default") if isinstance(node.get("default"), dict) else None
        for key, sub in props.items():
            name = f"{path}.{key}".lstrip(".")
            if not sub.get("description"):
                problems.append(f"{name}: no description")
            section = "properties" in sub or "properties" in (sub.get("additionalProperties") or {})
            if "default" not in sub and not section and name not in NO_DEFAULT:  # a section's keys have them
                problems.append(f"{name}: no default")
            if parent is not None and key in parent and sub.get("default") != parent[key]:
                problems.append(f"{name}: default {sub.get('default')!r} != the parent's {parent[key]!r}")
            walk(sub, name)

    walk(C.load_yaml(C.SCHEMA_PATH), "")
    assert problems == []


def test_schema_defaults_are_the_shipped_config():
    assert C.schema_defaults() == C.load_yaml(ROOT / "config" / "config.yaml")
    # a fresh copy each call: a caller that edits it does not change the next one's
    d = C.schema_defaults("train")
    d["epochs"] = -1
    assert C.schema_defaults("train")["epochs"] != -1


@pytest.mark.parametrize(("module", "name", "section"), PACKAGE_DEFAULTS)
def test_package_defaults_are_the_schema_section(module, name, section):
    mod = __import__(module, fromlist=[name])
    assert getattr(mod, name) == C.schema_defaults(section)


def test_resolve_of_nothing_is_the_schema_defaults_and_a_partial_config_is_filled(tmp_path):
    args = argparse.Namespace(config=[], params=None)
    assert C.resolve(args, "train") == C.schema_defaults("train")
    assert C.resolve(args) == C.schema_defaults()
    (tmp_path / "c.yaml").write_text("train: {epochs: 7}\nvariants: {nct: {pathways: [nct]}}\n")
    args = argparse.Namespace(config=[str(tmp_path / "c.yaml")], params='{"lr": 0.5}')
    train = C.resolve(args, "train")
    assert train == {**C.schema_defaults("train"), "epochs": 7, "lr": 0.5}
    whole = C.resolve(argparse.Namespace(config=[str(tmp_path / "c.yaml")], params=None))
    assert (
        whole["train"]["epochs"] == 7
        and whole["train"]["batch_size"] == C.schema_defaults("train")["batch_size"]
    )
    assert list(whole["variants"]) == [
        "nct"
    ]  # a config's variants replace the defaults', not merge with them


def test_loss_weights_default_to_the_variant_entry_defaults():
    """L_total's λ defaults are a variant entry's (0), so a variant that names no λ trains no transfer."""
    from cpmn.variants import build_loss, variant_entry

    sig = inspect.signature(L_total.__init__).parameters
    entry_props = C.load_yaml(C.SCHEMA_PATH)["properties"]["variants"]["additionalProperties"]["properties"]
    for k in ("lambda1", "lambda2", "lambda3", "seg_weight"):
        assert sig[k].default == entry_props[k]["default"], k
    for k in ("seg_loss", "ifd_normalize"):  # the model section's keys, under their config names
        assert sig[k].default == C.schema_defaults("model")[k], k
    entry = variant_entry("x", {"variants": {"x": {"pathways": ["ctpa", "nct"]}}})
    loss = build_loss(entry, {})
    assert (loss.lambda1, loss.lambda2, loss.lambda3, loss.seg_weight) == (0.0, 0.0, 0.0, 1.0)


def test_a_model_built_from_an_empty_config_is_the_shipped_configs():
    from cpmn.variants import build_variant

    shipped = C.load_yaml(ROOT / "config" / "config.yaml")
    torch.manual_seed(0)
    a, _ = build_variant("cpmn", {"variants": shipped["variants"]})
    torch.manual_seed(0)
    b, _ = build_variant("cpmn", {"variants": shipped["variants"], "model": shipped["model"]})
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_docs_config_md_is_generated_from_the_schema():
    """Regenerate with ``python -m cpmn.config > docs/config.md``."""
    assert (ROOT / "docs" / "config.md").read_text() == C.config_markdown()

"""Loading and merging configuration, shared by the command line, the workflow and the tests.

A stage reads one *section* of the study config (``register``, ``train`` ...). On the command line a
section comes from ``--config FILE`` (a YAML study config such as ``config/config.yaml``) and may be
overridden by ``--params JSON`` (what the Snakemake rules pass, so that ``snakemake --config`` overrides
reach the stage).

The defaults have one source: the ``default:`` of every key in ``workflow/schemas/config.schema.yaml``
(:func:`schema_defaults`). :func:`resolve` fills them in, and the package's ``DEFAULTS`` of each stage are
that section of the schema, so a function called with a partial dict behaves as the workflow would.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from cpmn.errors import InputError

#: the study config's schema, shared with the workflow (common.smk validates the whole config with it)
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


@functools.cache
def _schema() -> dict[str, Any]:
    if not SCHEMA_PATH.is_file():
        raise FileNotFoundError(
            f"{SCHEMA_PATH}: the config schema is missing (install the project from its checkout: "
            "pip install -e .)"
        )
    return load_yaml(SCHEMA_PATH)


def schema_defaults(section: str | None = None) -> dict[str, Any]:
    """The schema's ``default:`` values: of one section's keys, or (``section=None``) of every section.

    A fresh deep copy each call (callers may change it). Keys without a ``default:`` are left out.
    """
    props = _schema()["properties"]
    if section is None:
        return {name: schema_defaults(name) for name, sub in props.items() if "properties" in sub} | {
            name: copy.deepcopy(sub["default"]) for name, sub in props.items() if "default" in sub
        }
    sub = props[section]
    return {k: copy.deepcopy(v["default"]) for k, v in sub.get("properties", {}).items() if "default" in v}


def variant_defaults() -> dict[str, Any]:
    """The schema's ``default:`` values of one ``variants:`` entry, a fresh copy."""
    entry = _schema()["properties"]["variants"]["additionalProperties"]["properties"]
    return {k: copy.deepcopy(v["default"]) for k, v in entry.items() if "default" in v}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; an empty file is an empty dict."""
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(*paths: str | Path) -> dict[str, Any]:
    """Load and merge study config files, later files overriding earlier ones."""
    cfg: dict[str, Any] = {}
    for p in paths:
        cfg = deep_merge(cfg, load_yaml(p))
    return cfg


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` (repeatable) and ``--params JSON`` to a subcommand's parser."""
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="study config YAML (repeatable; later files override earlier ones)",
    )
    parser.add_argument(
        "--params",
        default=None,
        metavar="JSON",
        help="JSON object merged over the config (the workflow passes the stage's section here)",
    )


def check_sections(cfg: dict[str, Any], section: str | None, source: str) -> None:
    """Validate config sections against ``workflow/schemas/config.schema.yaml`` (every section is closed).

    With ``section``, ``cfg`` is that one section; without, ``cfg`` maps section names to sections and
    only the sections present are checked (a stage needs only some). The workflow validates the whole
    config itself; this makes a typo'd key in a hand-run ``--params`` or ``--config`` fail the same way.

    Raises:
        InputError: the first schema violation, e.g. ``register: reg_iteration: unknown key``, naming
            ``source``.
    """
    schema = _schema()
    sections = {section: cfg} if section is not None else cfg
    for name, value in sections.items():
        sub = schema["properties"].get(name)
        if sub is None:
            raise InputError(None, source, f"unknown config section {name!r}")
        validator = jsonschema.Draft202012Validator({"$defs": schema.get("$defs", {}), **sub})
        errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
        if errors:
            err = errors[0]
            where = ".".join(str(k) for k in (name, *err.absolute_path))
            if err.validator == "additionalProperties":
                unknown = sorted(set(err.instance) - set(err.schema.get("properties", {})))
                raise InputError(None, source, f"{where}: unknown key(s) {', '.join(unknown)}")
            raise InputError(None, source, f"{where}: {err.message}")


def resolve(args: argparse.Namespace, section: str | None = None) -> dict[str, Any]:
    """The effective config for a subcommand: the schema's defaults, then files from ``--config``, then
    ``--params``, checked against the config schema (:func:`check_sections`).

    With ``section`` the named section of the files is returned (``--params`` is taken to be that
    section already); without it, the whole merged config.

    Raises:
        InputError: a ``--config`` file cannot be read or is not a YAML mapping, ``--params`` is not a
            JSON object, or a key or value breaks the schema.
    """
    cfg: dict[str, Any] = {}
    for path in args.config:
        try:
            cfg = deep_merge(cfg, load_yaml(path))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as err:
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            if isinstance(err, OSError):
                why = err.strerror or why
            elif isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
                why = f"{err.problem} at line {err.problem_mark.line + 1}"
            elif isinstance(err, ValueError):
                why = why.removeprefix(f"{path}: ")
            raise InputError(None, path, f"cannot read config ({type(err).__name__}: {why})") from err
    if section is not None:
        cfg = cfg.get(section) or {}
    source = " + ".join([*args.config, *(["--params"] if args.params else [])]) or "defaults"
    if args.params:
        try:
            extra = json.loads(args.params)
        except json.JSONDecodeError as err:
            raise InputError(None, "--params", f"not valid JSON ({err})") from err
        if not isinstance(extra, dict):
            raise InputError(None, "--params", "must be a JSON object")
        cfg = deep_merge(cfg, extra)
    check_sections(cfg, section, source)
    return fill_defaults(cfg, section)


def fill_defaults(cfg: dict[str, Any], section: str | None = None) -> dict[str, Any]:
    """``cfg`` (one ``section``, or the whole config) with the schema's defaults for the keys it leaves out.

    Keys merge one level into each section (a section's own mappings, such as ``convert.series_rules``,
    are replaced whole, as are the ``variants``: a config that lists its variants lists all of them).
    """
    if section is not None:
        return {**schema_defaults(section), **cfg}
    out = copy.deepcopy(cfg)
    for name, default in schema_defaults().items():
        if isinstance(default, dict) and isinstance(out.get(name), dict) and name != "variants":
            out[name] = {**default, **out[name]}
        else:
            out.setdefault(name, default)
    return out


def config_markdown() -> str:
    """``docs/config.md``: every key of the schema with its default and description, section by section.

    ``python -m cpmn.config > docs/config.md`` regenerates it; a test checks that the file is current.
    """
    schema = _schema()
    out = [
        "# Configuration reference",
        "",
        "Generated from `workflow/schemas/config.schema.yaml` by `python -m cpmn.config > docs/config.md`;",
        "a test fails when this file and the schema disagree. `config/config.yaml` sets every key to the",
        "default below; `config/paper.yaml` and `config/benchmark.yaml` override some.",
        "",
    ]
    for name, sub in schema["properties"].items():
        out += [f"## `{name}`", ""]
        if sub.get("description"):
            out += [sub["description"], ""]
        if "properties" not in sub:
            if "default" in sub:
                out += [f"Default: `{json.dumps(sub['default'])}`", ""]
            if name == "variants":
                entry = sub["additionalProperties"]["properties"]
                out += ["| entry key | default | description |", "| --- | --- | --- |"]
                for key, prop in entry.items():
                    default = f"`{json.dumps(prop['default'])}`" if "default" in prop else "-"
                    out.append(f"| `{key}` | {default} | {prop.get('description', '')} |")
                out.append("")
            continue
        out += ["| key | default | description |", "| --- | --- | --- |"]
        for key, prop in sub["properties"].items():
            default = json.dumps(prop["default"], ensure_ascii=False) if "default" in prop else "-"
            text = prop.get("description", "").replace("|", "\\|")
            out.append(f"| `{key}` | `{default}` | {text} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(config_markdown(), end="")

"""Loading and merging configuration, shared by the command line, the workflow and the tests.

A stage reads one *section* of the study config (``register``, ``train`` ...). On the command line a
section comes from ``--config FILE`` (a YAML study config such as ``config/config.yaml``) and may be
overridden by ``--params JSON`` (what the Snakemake rules pass, so that ``snakemake --config`` overrides
reach the stage). Functions in the package take plain dicts and keep their own defaults, which match
``config/config.yaml``.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from cpmn.errors import InputError

#: the study config's schema, shared with the workflow (common.smk validates the whole config with it)
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


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
    if not SCHEMA_PATH.is_file():  # an installed package without the workflow folder: nothing to check
        return
    schema = load_yaml(SCHEMA_PATH)
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
    """The effective config for a subcommand: files from ``--config``, then ``--params``, checked
    against the config schema (:func:`check_sections`).

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
    return cfg

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

import yaml


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


def resolve(args: argparse.Namespace, section: str | None = None) -> dict[str, Any]:
    """The effective config for a subcommand: files from ``--config``, then ``--params``.

    With ``section`` the named section of the files is returned (``--params`` is taken to be that
    section already); without it, the whole merged config.
    """
    cfg = load_config(*args.config) if args.config else {}
    if section is not None:
        cfg = cfg.get(section) or {}
    if args.params:
        extra = json.loads(args.params)
        if not isinstance(extra, dict):
            raise ValueError("--params must be a JSON object")
        cfg = deep_merge(cfg, extra)
    return cfg

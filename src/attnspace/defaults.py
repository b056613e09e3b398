"""The config schema as the one source of defaults.

``schemas/config.schema.yaml`` fills every default of a run's configuration; the library's
dataclasses and the CLI read their defaults from it here rather than repeat them. Needs only
PyYAML, so the GPU-only parts of the package can use it too.
"""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"


@functools.cache
def _schema() -> dict:
    with open(SCHEMA_PATH) as f:
        return yaml.safe_load(f)


def schema_default(key: str):
    """The schema's default for a dotted config ``key`` (``sae.batch_size``, ``sae.lr.adam``)."""
    node = _schema()
    for part in key.split("."):
        node = node["properties"][part]
    return node["default"]


def config_keys() -> list[tuple[str, object, str]]:
    """(dotted key, default or None, description) of every settable key, in schema order;
    ``<name>`` stands for a model's or dataset's name."""
    rows = []

    def walk(node: dict, prefix: str) -> None:
        for name, sub in node.get("properties", {}).items():
            key = f"{prefix}.{name}" if prefix else name
            items = sub.get("additionalProperties")
            if sub.get("type") == "object" and "properties" in sub:
                walk(sub, key)
            elif isinstance(items, dict) and "properties" in items:
                walk(items, f"{key}.<name>")
            else:
                rows.append((key, sub.get("default"), " ".join(str(sub.get("description", "")).split())))

    walk(_schema(), "")
    return rows


def config_keys_markdown() -> str:
    """docs/configuration.md: every key with its default and meaning, generated from the schema."""
    lines = [
        "# Configuration keys",
        "",
        "Generated from `schemas/config.schema.yaml` by `attnspace config-keys > docs/configuration.md`",
        "(a test checks it is current). The schema fills every default; `config.yaml` is the embedded",
        "default run and `config/paper.yaml` the paper's setting. A bad value stops the run before any",
        "job, with a message naming the key and the fix.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    for key, default, text in config_keys():
        shown = "" if default is None else "`" + yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip() + "`"
        lines.append(f"| `{key}` | {shown} | {text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"

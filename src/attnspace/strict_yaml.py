"""The one reader of configuration files, for Snakemake's ``config`` and for ``attnspace``.

YAML as people write it, read strictly, so that what a file says is what runs:

* a key given twice in one mapping is refused (PyYAML keeps the last silently, dropping a
  whole block);
* YAML 1.1 values that YAML 1.2 and every other reader take differently are refused: octal
  numbers with a leading zero (``010`` is 8), sexagesimal numbers (``25:36`` is 1536, ``1:30.5``
  is 90.5) and the booleans yes, no, on and off; quote them, or write the number meant, or true
  or false;
* aliases may share values, but the document they expand to holds at most
  :data:`MAX_EXPANDED_NODES` values (a few lines of nested aliases expand to billions, and
  every reader after this one walks the expanded value).

Every refusal is one :class:`~attnspace.errors.ConfigError` line naming the file, the line and
the fix; it never repeats the value.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from attnspace.errors import ConfigError

MAX_EXPANDED_NODES = 100_000
"""Values (scalars, lists, mappings) a configuration may expand to, aliases expanded. The paper's
configuration has about 500."""

_YAML11_INT = re.compile(r"[-+]?(0[0-7_]+|[0-9][0-9_]*(:[0-5]?[0-9])+)")
_YAML11_FLOAT = re.compile(r"[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+\.[0-9_]*")


def _error(message: str, fix: str):
    """One ConfigError line; the fix is in the message itself, which is all Snakemake prints."""
    return ConfigError(f"{message} Fix: {fix}")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and YAML 1.1's octal and sexagesimal numbers and yes/no booleans."""

    name = "<config>"

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                raise _error(f"{self.name}, line {key_node.start_mark.line + 1}: a key is a list or mapping.",
                             "write a plain name as the key.")
            if key in seen:
                raise _error(f"{self.name}, line {key_node.start_mark.line + 1}: key {key!r} is given twice in one "
                             f"mapping (first on line {seen[key] + 1}); YAML would keep only the last.",
                             "merge the two entries into one.")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        self._refuse_yaml11(node, _YAML11_INT)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node):
        self._refuse_yaml11(node, _YAML11_FLOAT)
        return super().construct_yaml_float(node)

    def construct_yaml_bool(self, node):
        if node.value.lower() not in ("true", "false"):
            raise _error(f"{self.name}, line {node.start_mark.line + 1}: {node.value} is a boolean in YAML 1.1 "
                         f"(read as {yaml.safe_load(node.value)}), which other readers take as text.",
                         f"write true or false, or quote it ('{node.value}') if it is text.")
        return super().construct_yaml_bool(node)

    def _refuse_yaml11(self, node, pattern: re.Pattern) -> None:
        if pattern.fullmatch(node.value):
            kind = "a sexagesimal" if ":" in node.value else "an octal"
            read_as = yaml.safe_load(node.value)
            raise _error(f"{self.name}, line {node.start_mark.line + 1}: {node.value} is {kind} number in YAML 1.1 "
                         f"(read as {read_as}), which other readers take differently.",
                         f"write the decimal number meant, or quote it ('{node.value}') if it is text.")


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _StrictLoader.construct_yaml_float)
_StrictLoader.add_constructor("tag:yaml.org,2002:bool", _StrictLoader.construct_yaml_bool)


def _expanded_size(node, name: str) -> int:
    """Values in the document rooted at ``node`` with every alias expanded, counted without expanding
    (shared nodes counted once per use); stops past MAX_EXPANDED_NODES or at a recursive alias."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in active:
            raise _error(f"{name}, line {n.start_mark.line + 1}: an alias refers to a value that contains it "
                         "(a recursive alias).", "write the value out without the alias.")
        active.add(id(n))
        children = [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else (
            n.value if isinstance(n, yaml.SequenceNode) else [])
        total = 1
        for c in children:
            total += size(c)
            if total > MAX_EXPANDED_NODES:
                break
        active.discard(id(n))
        sizes[id(n)] = total
        return total

    return size(node)


def load_yaml(path: Path | str) -> object:
    """The document of one configuration file, read strictly (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _error(f"{path}: not UTF-8 text (byte {e.start}).", "save the file as UTF-8.") from e
    except OSError as e:
        raise _error(f"{path}: cannot be read ({e.strerror}).", "check the path given as the configuration.") from e
    loader = _StrictLoader(text)
    loader.name = str(path)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, str(path)) > MAX_EXPANDED_NODES:
            raise _error(f"{path}: its aliases (*name) expand to more than {MAX_EXPANDED_NODES:,} values.",
                         "write the values out, with fewer aliases.")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise _error(f"{path}{where}: not valid YAML ({problem}).",
                     "correct the YAML there (indentation, a missing ':' or an unclosed bracket).") from None
    finally:
        loader.dispose()


def merge_config(base: dict, extra: dict) -> dict:
    """``extra`` merged into ``base`` in place, mappings key by key (as Snakemake merges config files)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_config(base[key], value)
        else:
            base[key] = value
    return base


def read_config_files(paths, overrides=None) -> dict:
    """The configuration of ``paths`` (each read by :func:`load_yaml`, later ones merged over earlier
    ones) with ``overrides`` (Snakemake's ``--config``) merged last."""
    config: dict = {}
    for path in paths:
        doc = load_yaml(path)
        if not isinstance(doc, dict) or not doc:
            raise _error(f"{path}: the configuration is empty or not a mapping (got {type(doc).__name__}).",
                         "pass --configfile config.yaml (the embedded default) or config/paper.yaml, or a YAML "
                         "file of key: value entries like them.")
        merge_config(config, doc)
    return merge_config(config, dict(overrides or {}))

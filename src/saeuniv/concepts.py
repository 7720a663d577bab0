"""Concept-set files for the subspaces stage: where they are and what they hold.

A concept set is a YAML file in ``configs/concepts/`` (or anywhere): ``categories`` maps
each category to ``keywords`` and/or ``phrases`` (lists of text), or directly to a list of
text. It is read with the safe YAML loader and checked before any run starts.
"""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError, check, safe_yaml
from .core.subspaces import ConceptSet

PROJECT_DIR = Path(__file__).resolve().parents[2]  # the checkout holding configs/


def concepts_path(value: str) -> Path:
    """The concept-set file ``value`` names: a path (absolute, or relative to the working
    directory or the project folder), or a set's name in ``configs/concepts/``."""
    tried = []
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, PROJECT_DIR / p]
    if p.suffix not in (".yaml", ".yml") and len(p.parts) == 1:
        candidates += [Path.cwd() / "configs" / "concepts" / f"{value}.yaml",
                       PROJECT_DIR / "configs" / "concepts" / f"{value}.yaml"]
    for c in candidates:
        tried.append(str(c))
        if c.is_file():
            return c
    shipped = sorted(x.stem for x in (PROJECT_DIR / "configs" / "concepts").glob("*.yaml"))
    raise ConfigError(f"subspaces.concepts={value!r} names no concept-set file (looked for "
                      f"{', '.join(dict.fromkeys(tried))}); pass a YAML file or one of "
                      f"{shipped}")


def load_concepts(value: str):
    """Read and check a concept set (see ``configs/concepts/reference.yaml``).

    The file maps ``categories`` to mappings with ``keywords`` and/or
    ``phrases`` (lists of text), or directly to a list of text. Returns a
    ``saeuniv.subspaces.ConceptSet``.
    """
    path = concepts_path(value)
    where = f"concept set {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where} is not UTF-8 text (byte {err.start}); save it as UTF-8") \
            from None
    data = safe_yaml(text, where)
    check(isinstance(data, dict) and isinstance(data.get("categories"), dict)
           and data["categories"],
           f"{where} must be a mapping with a non-empty 'categories' mapping, e.g. "
           "categories: {time: {keywords: [today], phrases: [last week]}}")
    unknown = sorted(set(data) - {"name", "description", "categories"})
    check(not unknown, f"{where}: unknown key(s) {unknown}; allowed: categories, name, "
           "description")
    names, lists = [], []
    for cat, entry in data["categories"].items():
        if isinstance(entry, dict):
            bad = sorted(set(entry) - {"keywords", "phrases"})
            check(not bad, f"{where}: category {cat!r} has unknown key(s) {bad}; allowed: "
                   "keywords, phrases")
            items = list(entry.get("keywords") or []) + list(entry.get("phrases") or [])
        else:
            items = entry if isinstance(entry, list) else None
        check(bool(items), f"{where}: category {cat!r} needs a non-empty list of keywords "
               "or phrases")
        odd = [x for x in items if not isinstance(x, str) or not x.split()]
        check(not odd, f"{where}: category {cat!r} has entries that are not text: {odd[:5]}")
        items = [" ".join(x.split()) for x in items]
        twice = sorted({x for x in items if items.count(x) > 1})
        check(not twice, f"{where}: category {cat!r} lists {twice} more than once")
        names.append(str(cat))
        lists.append(tuple(items))
    return ConceptSet(str(data.get("name") or path.stem), tuple(names), tuple(lists))

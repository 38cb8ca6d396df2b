"""The manifest schema, with its `method.name` enum generated from the registry.

`surgery/manifest.schema.json` is the one schema: `surgery.manifest` validates every manifest against
it. That module sits below `surgery.analysis` (the import-linter layers), so it cannot ask the
registry for the method names at run time; and the file is a published contract that other tools
read without surgery. So the names are written into the file: after registering a method, run

    python -m surgery.analysis.ranking.schema

in a checkout. It rewrites the packaged schema (`manifests/schema.json`, the published address, is a
link to it), and `tests/test_ranking.py` fails while the file differs from what it would write.
"""

from __future__ import annotations

import json
from pathlib import Path

from surgery.analysis.ranking.registry import RANKING_METHODS
from surgery.manifest import schema

# The packaged schema; `manifests/schema.json` at the root of a checkout links to it.
PACKAGED = Path(__file__).parents[2] / "manifest.schema.json"
# A value is written on one line when it fits in this many columns.
_WIDTH = 120


def generated_schema() -> dict:
    """The packaged schema with `method.name`'s enum set to the registered methods, in registration order."""
    obj = schema()
    obj["properties"]["method"]["properties"]["name"]["enum"] = list(RANKING_METHODS)
    return obj


def render(value: object, indent: int = 0, column: int = 0) -> str:
    """`value` as JSON, one line where it fits in `_WIDTH` columns from `column`, else one item per line
    (a list of strings and numbers, such as an enum, always on one line).

    Args:
        value: a JSON value.
        indent: the indentation of the line `value` starts on.
        column: the column `value` starts at.

    Returns:
        The text, without a final newline.
    """
    flat = json.dumps(value, ensure_ascii=False)
    flat_list = isinstance(value, list) and not any(isinstance(v, (dict, list)) for v in value)
    if column + len(flat) < _WIDTH or flat_list or not isinstance(value, (dict, list)) or not value:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: " for k in value]
        items = [i + render(v, len(pad), len(i)) for i, v in zip(items, value.values(), strict=True)]
    else:
        items = [pad + render(v, len(pad), len(pad)) for v in value]
    brackets = "{}" if isinstance(value, dict) else "[]"
    return brackets[0] + "\n" + ",\n".join(items) + "\n" + " " * indent + brackets[1]


def schema_text() -> str:
    """What the schema file holds."""
    return render(generated_schema()) + "\n"


def write_schema() -> Path:
    """Write `schema_text()` to the packaged schema.

    Returns:
        The path written.
    """
    PACKAGED.write_text(schema_text(), encoding="utf-8")
    return PACKAGED


if __name__ == "__main__":
    print(f"wrote {write_schema()}")

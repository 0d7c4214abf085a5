"""Regenerate the "## Values" tables of the chart README from the `## @param` comments of values.yaml.

Usage: python deploy/helm/readme_values.py  (rewrites deploy/helm/dispatcher/README.md in place)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent / "dispatcher"
MARKER = "## Values\n"


def lookup(values: dict[str, Any], dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        node = node[part]
    return node


def shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def tables(values_text: str) -> str:
    values = yaml.safe_load(values_text)
    out: list[str] = []
    for line in values_text.splitlines():
        section = re.match(r"\s*## @section (.+)", line)
        param = re.match(r"\s*## @param (\S+) (.+)", line)
        if section:
            out += ["", f"### {section.group(1).strip()}", "", "| Name | Description | Value |", "| --- | --- | --- |"]
        elif param:
            name, text = param.groups()
            out.append(f"| `{name}` | {text.strip()} | `{shown(lookup(values, name))}` |")
    return "\n".join(out).lstrip("\n") + "\n"


def main() -> None:
    readme = CHART / "README.md"
    text = readme.read_text()
    head, _, tail = text.partition(MARKER)
    intro = tail.split("\n### ", 1)[0]
    readme.write_text(head + MARKER + intro.rstrip("\n") + "\n\n" + tables((CHART / "values.yaml").read_text()))


if __name__ == "__main__":
    main()

"""The import graph between fromage's folders, read from the source with `ast` (imports inside
functions included), and the imports that break the layering:

    engines <- runtime <- {export, training, serve, tools};  export may use training; tools use anything.

    python -m fromage.tools.import_graph [--json]
"""
from __future__ import annotations

import ast
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("engines", "runtime", "export", "training", "serve", "tools")
ALLOWED = {
    "engines": {"engines"},
    "runtime": {"engines", "runtime"},
    "export": {"engines", "runtime", "training", "export"},
    "training": {"engines", "runtime", "training"},
    "serve": {"engines", "runtime", "serve"},
    "tools": set(FOLDERS),
}


def module_imports(path: Path, folder: str) -> list[tuple[str, int]]:
    """(imported fromage folder, line) for every fromage import in one file, relative ones resolved."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y: this folder
                names = [f"fromage.{folder}"]
            elif node.level > 1:  # from ..pkg import y: a sibling folder
                names = [f"fromage.{node.module}"] if node.module else []
            else:
                names = [node.module or ""]
            if node.module == "fromage":  # from fromage import runtime
                names = [f"fromage.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "fromage" and len(parts) > 1 and parts[1] in FOLDERS:
                out.append((parts[1], node.lineno))
    return out


def graph(root: Path = ROOT) -> dict:
    edges, violations = Counter(), []
    for folder in FOLDERS:
        for path in sorted((root / folder).glob("*.py")):
            for target, line in module_imports(path, folder):
                if target != folder:
                    edges[(folder, target)] += 1
                if target not in ALLOWED[folder]:
                    violations.append(f"{folder}/{path.name}:{line} imports fromage.{target}")
    return {"edges": {f"{a} -> {b}": n for (a, b), n in sorted(edges.items())}, "violations": violations}


def main(argv=None) -> int:
    result = graph()
    if "--json" in (argv if argv is not None else sys.argv[1:]):
        print(json.dumps(result, indent=1))
    else:
        for edge, n in result["edges"].items():
            print(f"{edge}  ({n} imports)")
        print("\n".join(["", "upward imports:"] + result["violations"]) if result["violations"] else "\nno upward imports")
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())

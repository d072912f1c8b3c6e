"""The import layers of tinkerlm (the README's layer table), read from the source with `ast`.

Each module imports only modules of lower layers or of its own layer, and no modules (nor packages of one layer)
import each other in a cycle. Every import counts: top-level, inside functions, under `if TYPE_CHECKING`, and
`importlib.import_module("tinkerlm....")` with a literal (or f-string prefix) name. `import tinkerlm.a.b` depends
on `tinkerlm.a.b` only, not on the packages above it that Python initialises on the way.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tinkerlm"

# The layers, lowest first; a module may import its own line and the lines above it.
TABLE = [
    (
        "errors",
        "limits",
        "fileio",
        "kernels",
    ),  # the one exception type; resource bounds; whole-file writes; C++ kernels
    ("formats",),  # gguf, hf (+ the one HF writer), peft adapter files, tokenizer, specs
    ("models", "quant", "lora"),  # architectures; module swaps for quantization and LoRA
    (
        "loading",
        "pack_cache",
        "sampling",
        "generate",
        "batching",
        "chat",
        "jsonmode",
        "jsonschema",
        "prefix_cache",
        "speculative",
        "toolcalls",
    ),  # generation
    ("api", "store"),  # `tinkerlm.load()` and `LLM`; the local store
    ("tune", "merge", "export", "evaluate", "train", "openness", "serve", "bench", "tokenizer_train"),  # the verbs
    ("cli", "__main__"),  # `tinkerlm <verb>`
]
LAYERS = {unit: i for i, units in enumerate(TABLE) for unit in units}
# `tinkerlm/__init__.py` is the lazy facade (`tinkerlm.load` calls `tinkerlm.api.load`): it sits on api's line.
FACADE = "tinkerlm"
LAYERS[FACADE] = LAYERS["api"]


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. "tinkerlm.formats.gguf"
    target: str  # imported module, e.g. "tinkerlm.quant.kernels"
    where: str  # "tinkerlm/formats/gguf.py:385"


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _literal_prefix(node: ast.expr) -> str | None:
    """The module name an `import_module` argument names: a string literal, or an f-string's literal start up to
    its last dot (`f"tinkerlm.models.{name}"` -> "tinkerlm.models")."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        head = ""
        for part in node.values:
            if not (isinstance(part, ast.Constant) and isinstance(part.value, str)):
                break
            head += part.value
        return head.rpartition(".")[0] or None
    return None


def imports(root: Path) -> tuple[dict[str, Path], list[Import], list[str]]:
    """(modules, every import of a module of the package, imports naming modules that do not exist)."""
    mods = modules(root)
    top = root.name
    found: dict[Import, None] = {}  # in order, once each
    missing: list[str] = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        rel = path.relative_to(root.parent).as_posix()
        for node in ast.walk(tree):
            wanted: list[str] = []
            if isinstance(node, ast.Import):
                wanted = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                # `from tinkerlm.formats import hf` imports the module tinkerlm.formats.hf; `from tinkerlm.api
                # import load` the module tinkerlm.api.
                wanted = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Call) and node.args:
                f = node.func
                fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                if fname == "import_module":
                    literal = _literal_prefix(node.args[0])
                    wanted = [literal] if literal else []
            for w in wanted:
                if w != top and not w.startswith(top + "."):
                    continue
                where = f"{rel}:{node.lineno}"
                if w not in mods:
                    missing.append(f"{where} imports {w}, which is not a module of {top}")
                elif w != name:
                    found[Import(name, w, where)] = None
    return mods, list(found), missing


def unit(module: str) -> str:
    """The layer-table entry of a module: the package or module right under tinkerlm (or the facade itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else FACADE


def upward(found: list[Import]) -> list[str]:
    """Imports from a lower layer of a higher one."""
    out = []
    for imp in found:
        src, dst = unit(imp.source), unit(imp.target)
        if src in LAYERS and dst in LAYERS and LAYERS[src] < LAYERS[dst]:
            out.append(f"{imp.where}: {src} (layer {LAYERS[src]}) imports {imp.target} ({dst}, layer {LAYERS[dst]})")
    return out


def _cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle (a list of nodes, first repeated last) per strongly connected component of more than one node
    (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:  # a shortest way back to the start, inside the component
        start = min(comp)
        paths = {start: [start]}
        queue = [start]
        cycle = None
        while queue and cycle is None:
            v = queue.pop(0)
            for w in sorted(edges.get(v, {})):
                if w == start:
                    cycle = paths[v] + [start]
                    break
                if w in comp and w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
        out.append(cycle)
    return out


def cycles(found: list[Import]) -> list[str]:
    """Import cycles between modules, and between the packages/modules of the layer table (`models` and `quant`
    importing each other through different modules is a cycle of packages)."""
    out = []
    for key in (lambda m: m, unit):
        edges: dict[str, dict[str, str]] = {}
        for imp in found:
            a, b = key(imp.source), key(imp.target)
            if a != b:
                edges.setdefault(a, {}).setdefault(b, imp.where)
        for cycle in _cycles(edges):
            steps = ", ".join(f"{a} -> {b} ({edges[a][b]})" for a, b in zip(cycle, cycle[1:]))
            kind = "modules" if key is not unit else "packages"
            out.append(f"{kind} import each other: {steps}")
    return out


@functools.cache
def graph():
    return imports(PACKAGE)


def test_every_module_has_a_layer():
    mods, _, missing = graph()
    unplaced = sorted({unit(m) for m in mods} - set(LAYERS))
    assert not unplaced, f"modules with no layer (add them to TABLE here and to the README's layer table): {unplaced}"
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_no_import_goes_up_a_layer():
    _, found, _ = graph()
    bad = upward(found)
    assert not bad, f"{len(bad)} imports from a lower layer of a higher one:\n" + "\n".join(bad)


def test_no_import_cycles():
    _, found, _ = graph()
    bad = cycles(found)
    assert not bad, f"{len(bad)} import cycles:\n" + "\n".join(bad)


def test_the_checker_sees_every_kind_of_import(tmp_path):
    """The scanner on a made-up package: lazy, relative and import_module imports, upward ones and cycles."""
    root = tmp_path / "tinkerlm"
    files = {
        "__init__.py": "def load():\n    from tinkerlm.api import load\n",
        "errors.py": "",
        "api.py": "from tinkerlm import errors\n",
        "formats/__init__.py": "",
        "formats/hf.py": "def f():\n    import tinkerlm.api\n",
        "models/__init__.py": "import importlib\nimportlib.import_module(f'tinkerlm.models.{1}')\n",
        "models/base.py": "from ..quant import linear\n",
        "quant/__init__.py": "",
        "quant/linear.py": "",
        "quant/decode.py": "from tinkerlm.models.base import X\n",
        "lora.py": "def g():\n    from tinkerlm.quant import decode\n",
        "tune/__init__.py": "import importlib\nimportlib.import_module('tinkerlm.lora')\nfrom tinkerlm.gone import x\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "models" / "base.py").write_text("from ..quant import linear\n")
    (root / "quant" / "linear.py").write_text("def h():\n    from tinkerlm.models import base\n")
    mods, found, missing = imports(root)
    pairs = {(i.source, i.target) for i in found}
    assert {
        ("tinkerlm", "tinkerlm.api"),
        ("tinkerlm.api", "tinkerlm.errors"),
        ("tinkerlm.formats.hf", "tinkerlm.api"),
        ("tinkerlm.models.base", "tinkerlm.quant.linear"),
        ("tinkerlm.quant.decode", "tinkerlm.models.base"),
        ("tinkerlm.lora", "tinkerlm.quant.decode"),
        ("tinkerlm.tune", "tinkerlm.lora"),
    } <= pairs
    assert ("tinkerlm.models", "tinkerlm.models") not in pairs  # import_module of its own submodules
    assert missing == ["tinkerlm/tune/__init__.py:3 imports tinkerlm.gone, which is not a module of tinkerlm"]
    assert upward(found) == ["tinkerlm/formats/hf.py:2: formats (layer 1) imports tinkerlm.api (api, layer 4)"]
    bad = cycles(found)
    assert len(bad) == 2 and bad[0].startswith(
        "modules import each other: tinkerlm.models.base -> tinkerlm.quant.linear (tinkerlm/models/base.py:1)"
    )
    assert bad[1].startswith("packages import each other: models -> quant")

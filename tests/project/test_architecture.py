"""The layout's rules, checked on the source: every ``import`` of ``sdtune/`` and ``data_pipeline/``, read with ``ast``.

The layers, low to high (a module may import its own package or a lower one, never a higher one):

    utils < config < families < lora < data < inference < training < planning < evaluation < run < morph
          < toy < commands (__main__, generate, merge, export, report, plan) < ui < bench

Why this order: each layer is what the next one is built from. ``utils`` knows no model; ``config``
holds paths, resolvers and the value checks every tool shares; ``families`` is everything that
differs by model; ``lora`` the adapters and their files; ``data`` the datasets; ``inference`` draws
with a base and LoRAs; ``training`` is one training step and what it needs; ``planning`` sizes a run's GPU memory from
that step played on the meta device; ``evaluation`` scores a
LoRA while it trains; ``run`` wires one training run (folders, resume, callbacks); ``morph`` and
``toy`` are tools made of all of those; the commands sit on top; the web app (``ui``) drives the
commands (it runs them as processes and reads what they write, with the report's own loaders), and
the benchmark above them measures the commands. With the order kept, a change low down cannot be broken by a module it
never sees, a reader can learn the package bottom-up, and the start-up of a command pays only for
the layers it uses. ``data_pipeline`` is a separate program: it may use sdtune's lower layers,
and sdtune never imports it.

The rules, each a test below:
(a) no import circle between modules (function-level imports count; ``if TYPE_CHECKING:`` does not);
(b) no import against the layer order;
(c) library code imports neither ``sdtune.bench`` nor a command module (``ui``, above the commands,
    may import them), and nothing outside ``sdtune.ui`` imports the web app;
(d) no string equal to a registered family name outside ``sdtune/families/`` (the fact goes into
    the family's file, as an attribute or method of its ``ModelFamily``);
(e) a function-level import of our own code says why it is not at the top: a ``# deferred: <what
    it keeps out of start-up>`` comment on it or on the lines just above it. Breaking a circle is
    no reason: end the circle.

Only explicit imports are edges (``import a.b`` also runs ``a/__init__.py``, which is not counted).
Each rule is also fed a small synthetic package with one violation (``test_checker_*``), so a
checker that stops seeing anything fails too.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, field

from sdtune.families import FAMILIES
from tests.helpers.paths import ROOT

PACKAGES = ("sdtune", "data_pipeline")
LAYERS = ("utils", "config", "families", "lora", "data", "inference", "training", "planning", "evaluation", "run",
          "morph", "toy", "commands", "ui", "bench")
#: The commands users run; ``__main__`` modules are entry points too.
COMMANDS = frozenset({"sdtune.__main__", "sdtune.generate", "sdtune.merge", "sdtune.export", "sdtune.report",
                      "sdtune.plan", "sdtune.morph.command"})
DEFERRED = "# deferred:"


# -- the checker ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the module imported (the longest known module the imported name starts with)
    statement: str  # as written, for the message
    path: str
    line: int
    function_level: bool
    deferred_comment: bool


@dataclass
class Graph:
    modules: dict[str, str] = field(default_factory=dict)  # module -> file path (for messages)
    imports: list[Import] = field(default_factory=list)
    literals: list[tuple[str, str, int, str]] = field(default_factory=list)  # (module, path, line, value)

    def edges(self) -> dict[str, list[Import]]:
        out: dict[str, list[Import]] = {m: [] for m in self.modules}
        for imp in self.imports:
            out[imp.importer].append(imp)
        return out


def _is_type_checking(node: ast.If) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:`` exactly (``if not TYPE_CHECKING:`` runs)."""
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, modules: dict[str, str]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _has_deferred_comment(lines: list[str], node: ast.stmt) -> bool:
    if any(DEFERRED in line for line in lines[node.lineno - 1:node.end_lineno]):
        return True
    i = node.lineno - 2
    while i >= 0 and lines[i].strip().startswith("#"):  # the comment block just above the import
        if DEFERRED in lines[i]:
            return True
        i -= 1
    return False


def _imported_names(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """The dotted names an import statement brings in (relative ones resolved from ``package``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names]


def _scan_module(graph: Graph, module: str, path: str, text: str) -> None:
    lines = text.splitlines()
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    pending = [(ast.parse(text, filename=path), False)]
    while pending:
        node, in_function = pending.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):  # typing only: no import at run time
                pending += [(sub, in_function) for sub in child.orelse]
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                targets = {_resolve(name, graph.modules) for name in _imported_names(child, package)}
                for target in sorted(t for t in targets if t and t != module):
                    graph.imports.append(Import(module, target, ast.unparse(child), path, child.lineno, in_function,
                                                _has_deferred_comment(lines, child)))
            elif isinstance(child, ast.Constant) and isinstance(child.value, str):
                graph.literals.append((module, path, child.lineno, child.value))
            pending.append((child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)))


def build_graph(sources: dict[str, tuple[str, str]]) -> Graph:
    """The import graph of ``sources`` (module name -> (file path, source text)); a package is the
    module whose path ends in ``__init__.py``."""
    graph = Graph(modules={name: path for name, (path, _) in sources.items()})
    for module, (path, text) in sources.items():
        _scan_module(graph, module, path, text)
    graph.imports.sort(key=lambda i: (i.path, i.line, i.target))
    graph.literals.sort(key=lambda lit: (lit[1], lit[2]))
    return graph


@functools.cache
def package_graph() -> Graph:
    """The graph of the real ``sdtune/`` and ``data_pipeline/`` (parsed once per session)."""
    sources = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT)
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            sources[".".join(parts)] = (str(rel), path.read_text(encoding="utf-8"))
    return build_graph(sources)


def _where(imp: Import) -> str:
    return f"{imp.path}:{imp.line} ({imp.importer}): `{imp.statement}`"


def circles(graph: Graph) -> list[str]:
    """(a) Every import circle, as one module path round it, with the line of each import."""
    edges = graph.edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for imp in edges[v]:
            w = imp.target
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            connect(module)
    found = []
    for component in components:
        inside, start = set(component), component[0]
        paths = {start: []}
        queue = [start]
        while queue:  # the shortest way round from `start` back to it, inside the component
            v = queue.pop(0)
            for imp in edges[v]:
                if imp.target == start:
                    cycle = paths[v] + [imp]
                    queue = []
                    break
                if imp.target in inside and imp.target not in paths:
                    paths[imp.target] = paths[v] + [imp]
                    queue.append(imp.target)
        round_trip = " -> ".join([start, *(imp.target for imp in cycle)])
        steps = "; ".join(_where(imp) for imp in cycle)
        found.append(f"rule (a) import circle {round_trip}: {steps}. Fix: move what both need into the lower "
                     "module (or a new one below both), so that one of them no longer imports the other.")
    return found


def layer_of(module: str) -> str | None:
    """The layer of an ``sdtune`` module (None outside sdtune); a module in no known layer is an error."""
    parts = module.split(".")
    if parts[0] != "sdtune" or len(parts) == 1:
        return None
    if module in COMMANDS and len(parts) == 2:
        return "commands"
    if parts[1] in LAYERS:
        return parts[1]
    raise AssertionError(f"{module} is in no layer of tests/project/test_architecture.py: put it in a package of {LAYERS} "
                         f"or add it to COMMANDS (a command module at the top of sdtune/)")


def layer_violations(graph: Graph) -> list[str]:
    """(b) Every import of a higher layer, and every import of data_pipeline from sdtune."""
    order = " < ".join(LAYERS)
    found = []
    for imp in graph.imports:
        low, high = layer_of(imp.importer), layer_of(imp.target)
        if low is not None and imp.target.split(".")[0] == "data_pipeline":
            found.append(f"rule (b) layers: {_where(imp)} imports the data stage; sdtune never imports data_pipeline "
                         "(the data stage is a separate program that uses sdtune, not the other way round).")
        elif low is not None and high is not None and LAYERS.index(high) > LAYERS.index(low):
            found.append(f"rule (b) layers: {_where(imp)} imports {imp.target}, of layer {high!r}, from layer "
                         f"{low!r} (order: {order}; a module may import its own package or lower ones). Fix: move "
                         f"what it needs down into {low!r} or below.")
    return found


def is_entry_point(module: str) -> bool:
    return module in COMMANDS or module.rpartition(".")[2] == "__main__"


def seam_violations(graph: Graph) -> list[str]:
    """(c) Library code (no command, no ``__main__``, not the web app or the bench) importing the bench or a
    command; any module outside ``sdtune.ui`` importing the web app."""
    found = []
    for imp in graph.imports:
        if (imp.target == "sdtune.ui" or imp.target.startswith("sdtune.ui.")) and not imp.importer.startswith("sdtune.ui"):
            found.append(f"rule (c) seams: {_where(imp)} imports the web app; nothing imports sdtune.ui (it drives "
                         "the commands from above). Fix: move what it needs into the layer that owns it.")
            continue
        if is_entry_point(imp.importer) or imp.importer.startswith(("sdtune.bench", "sdtune.ui")):
            continue
        if imp.target == "sdtune.bench" or imp.target.startswith("sdtune.bench."):
            found.append(f"rule (c) seams: {_where(imp)} imports the benchmark from library code. Fix: move what it "
                         "needs out of sdtune/bench/ into the layer that owns it (nothing outside bench/ imports bench).")
        elif is_entry_point(imp.target):
            found.append(f"rule (c) seams: {_where(imp)} imports the command module {imp.target} from library code. "
                         "Fix: move what it needs from the command into a library module both can import.")
    return found


def family_literals(graph: Graph, names: set[str]) -> list[str]:
    """(d) Every string equal to a family name in a module outside ``sdtune.families``."""
    return [f"rule (d) family names: {path}:{line} ({module}) holds the literal {value!r}, a model family's name, "
            "outside sdtune/families/. Fix: ask the family (an attribute or method of its ModelFamily, in its "
            "families/<name>.py), or derive the names from the registry (sdtune.families.FAMILIES)."
            for module, path, line, value in graph.literals
            if value in names and module != "sdtune.families" and not module.startswith("sdtune.families.")]


def undeferred_imports(graph: Graph) -> list[str]:
    """(e) Function-level imports of our own modules without a ``# deferred:`` comment."""
    return [f"rule (e) function-level import: {_where(imp)} is inside a function without a `{DEFERRED} <what it "
            "keeps out of start-up>` comment. Fix: import it at the top of the module; if that makes an import "
            "circle, end the circle; keep it in the function only where it saves start-up time, and say so."
            for imp in graph.imports if imp.function_level and not imp.deferred_comment]


def _report(found: list[str]) -> str:
    return f"{len(found)} violation(s):\n" + "\n".join(found)


# -- the rules on sdtune/ and data_pipeline/ --------------------------------------------------------
def test_the_scan_sees_the_whole_package():
    graph = package_graph()
    assert len(graph.modules) > 100 and {"sdtune.run.train", "data_pipeline.recipe"} <= set(graph.modules)
    assert any(i.importer == "sdtune.run.train" and i.target == "sdtune.training.module" for i in graph.imports)
    assert any(i.importer == "sdtune.__main__" and i.target == "sdtune.run.train" and i.function_level
               for i in graph.imports)


def test_no_import_circles():
    found = circles(package_graph())
    assert not found, _report(found)


def test_imports_follow_the_layer_order():
    found = layer_violations(package_graph())
    assert not found, _report(found)


def test_library_code_imports_neither_the_bench_nor_a_command():
    found = seam_violations(package_graph())
    assert not found, _report(found)


def test_no_family_name_literal_outside_families():
    assert {"sd15", "sdxl", "kolors", "flux", "sd35"} <= set(FAMILIES)  # the registry, not a list of our own
    found = family_literals(package_graph(), set(FAMILIES))
    assert not found, _report(found)


def test_function_level_imports_say_why_they_are_deferred():
    found = undeferred_imports(package_graph())
    assert not found, _report(found)


# -- the checker itself, on synthetic packages with one violation each -----------------------------
def synthetic(modules: dict[str, str]) -> Graph:
    """A graph of made-up modules, name -> source; ``x.__init__`` is the package ``x``."""
    sources = {}
    for name, text in modules.items():
        path = name.replace(".", "/") + ".py"
        sources[name.removesuffix(".__init__")] = (path, text)
    return build_graph(sources)


def test_checker_reports_a_circle_made_by_a_function_level_import():
    graph = synthetic({"sdtune.data.prior": "def f():\n    from sdtune.data.datamodule import collate\n",
                       "sdtune.data.datamodule": "from sdtune.data.prior import PriorDataset\n"})
    (found,) = circles(graph)
    assert "rule (a)" in found and "sdtune.data.datamodule -> sdtune.data.prior -> sdtune.data.datamodule" in found
    assert "sdtune/data/prior.py:2" in found and "from sdtune.data.datamodule import collate" in found


def test_checker_reports_a_circle_through_a_package_and_ignores_type_checking():
    circle = synthetic({"sdtune.families.__init__": "from sdtune.families.base import X\n",
                        "sdtune.families.base": "def f():\n    from sdtune.families import FAMILIES\n"})
    (found,) = circles(circle)
    assert "sdtune.families -> sdtune.families.base -> sdtune.families" in found
    typing_only = synthetic({"sdtune.families.__init__": "from sdtune.families.base import X\n",
                             "sdtune.families.base": "from typing import TYPE_CHECKING\n"
                                                     "if TYPE_CHECKING:\n    from sdtune.families import FAMILIES\n"})
    assert circles(typing_only) == [] and [i.target for i in typing_only.imports] == ["sdtune.families.base"]


def test_checker_reports_an_upward_import_and_allows_own_and_lower_layers():
    graph = synthetic({"sdtune.evaluation.grid": "from sdtune.run.callbacks import writes_outputs\n"
                                                 "from sdtune.evaluation.config import X\nfrom sdtune.utils.io import Y\n",
                       "sdtune.run.callbacks": "", "sdtune.evaluation.config": "", "sdtune.utils.io": "",
                       "sdtune.generate": "from sdtune.toy.domain import Z\n", "sdtune.toy.domain": ""})
    (found,) = layer_violations(graph)
    assert "rule (b)" in found and "sdtune/evaluation/grid.py:1" in found
    assert "from sdtune.run.callbacks import writes_outputs" in found and "'run'" in found and "'evaluation'" in found


def test_checker_reports_sdtune_importing_the_data_stage():
    graph = synthetic({"sdtune.data.images": "import data_pipeline.recipe\n", "data_pipeline.recipe": "",
                       "data_pipeline.candidates": "from sdtune.utils.formats import X\n", "sdtune.utils.formats": ""})
    (found,) = layer_violations(graph)
    assert "sdtune/data/images.py:1" in found and "never imports data_pipeline" in found


def test_checker_reports_library_code_importing_the_bench_or_a_command():
    graph = synthetic({"sdtune.training.text": "def f():\n    from sdtune.bench.arch import build  # deferred: x\n",
                       "sdtune.toy.controlnet": "from sdtune.generate import generate\n",
                       "sdtune.bench.runner": "from sdtune.bench.arch import build\nfrom sdtune.generate import generate\n",
                       "sdtune.morph.__main__": "from sdtune.morph.command import main\n",
                       "sdtune.ui.runs": "from sdtune.report import load_runs\n",
                       "sdtune.bench.ui": "from sdtune.ui.runs import run_row\n",
                       "sdtune.bench.arch": "", "sdtune.generate": "", "sdtune.morph.command": "", "sdtune.report": ""})
    found = seam_violations(graph)
    assert len(found) == 3 and all("rule (c)" in f for f in found)
    (web,) = [f for f in found if "imports the web app" in f]
    assert "sdtune/bench/ui.py:1" in web
    bench, command = sorted([f for f in found if f != web], key=lambda f: "command module" in f)
    assert "sdtune/training/text.py:2" in bench and "imports the benchmark" in bench
    assert "sdtune/toy/controlnet.py:1" in command and "command module sdtune.generate" in command


def test_checker_reports_a_family_name_outside_families():
    graph = synthetic({"sdtune.toy.build": 'FAMILIES = ("sd15", "sdxl")\nNOTE = "tiny-sd15"\n',
                       "sdtune.families.sd15": 'name = "sd15"\n', "sdtune.families.__init__": 'X = "sdxl"\n'})
    found = family_literals(graph, {"sd15", "sdxl", "kolors"})
    assert len(found) == 2 and all("rule (d)" in f and "sdtune/toy/build.py:1" in f for f in found)
    assert "'sd15'" in found[0] and "'sdxl'" in found[1]


def test_checker_reports_a_function_level_import_without_the_deferred_comment():
    graph = synthetic({"sdtune.run.a": "def f():\n    from sdtune.run.b import x\n"
                                       "def g():\n    # deferred: torch, until the command line is parsed\n"
                                       "    from sdtune.run.b import y\n"
                                       "def h():\n    from sdtune.run.b import z  # deferred: Lightning\n"
                                       "class C:\n    def m(self):\n        import sdtune.run.b\n"
                                       "from sdtune.run.b import w\n",
                       "sdtune.run.b": ""})
    found = undeferred_imports(graph)
    assert len(found) == 2 and all("rule (e)" in f for f in found)
    assert "sdtune/run/a.py:2" in found[0] and "sdtune/run/a.py:10" in found[1]


def test_the_top_of_the_package_holds_only_the_commands_and_the_folders():
    """``ls sdtune``: the commands users run and one folder per concern; a library module dropped
    at the top (say ``sdtune/helpers.py``) fails here."""
    top = ROOT / "sdtune"
    files = {p.stem for p in top.glob("*.py")} - {"__init__"}
    assert {f"sdtune.{name}" for name in files} == COMMANDS - {"sdtune.morph.command"}, sorted(files)
    folders = {p.name for p in top.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYERS) - {"commands"} | {"toy"}, sorted(folders)
    assert all((top / name / "__init__.py").is_file() for name in folders)
    assert not [p.name for p in top.iterdir() if p.is_file() and p.suffix != ".py"]

"""The project's structure in figures, from its source alone (nothing is imported or run): for docs
and reviews.

    python benchmarks/structure.py [--root FOLDER] [--verbose]

Reads every top-level .py module of the repository (not tests/ or benchmarks/) and prints
`name: value` lines:
  - the import graph, `module -> imports`, from EVERY import statement, those inside functions
    included;
  - circles in it (`circles: none`, or each one);
  - upward arrows against the layers (`upward arrows: none`, or each one): ground {files,
    mnist_files}; core {model, data, config, checkpoint, train}; features {evaluate, anomaly,
    prepare, utils}; edge {main, commands, train_command, demo}. A module may import its own layer
    or those below; within the core, only earlier modules, in the order model < data < config <
    checkpoint < train. The core's own table, stricter still (model imports nothing of the project,
    data only mnist_files, config only model, checkpoint files, model and config), is checked too;
  - modules that read flags (import argparse) besides main and commands;
  - how many project functions a static call graph reaches from train.train (calls `f(...)`,
    `module.f(...)`, `Class(...)` (its __init__ and __post_init__), `self.m(...)` (the enclosing
    class's m), and `obj.m(...)` where m is a method whose name no other def of the project has;
    calls through a model's __call__ and functions passed as values are not seen), listed with
    --verbose;
  - line counts: each module, the core (model.py + data.py + train.py), all product modules, and
    tests/;
  - the longest function of the product modules, and every one over 40 lines.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

LAYERS = {
    "ground": ["files", "mnist_files"],
    # in their own order: each imports only earlier ones
    "core": ["model", "data", "config", "checkpoint", "train"],
    "features": ["evaluate", "anomaly", "prepare", "utils"],
    "edge": ["main", "commands", "train_command", "demo"],
}
CORE_TABLE = {  # what each core module may import of the project
    "model": set(),
    "data": {"mnist_files"},
    "config": {"model"},
    "checkpoint": {"files", "model", "config"},
    "train": {"files", "model", "data", "config", "checkpoint"},
}
FLAG_READERS = {"main", "commands"}
CORE_LINES = ("model", "data", "train")
LONG_FUNCTION = 40  # lines


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ----------------------------------------------------------------------------- reading the modules


def read_modules(root: Path) -> dict[str, ast.Module]:
    """Every top-level .py file of `root`, parsed, by module name."""
    return {p.stem: ast.parse(p.read_text(), filename=str(p)) for p in sorted(root.glob("*.py"))}


def imported_names(tree: ast.AST) -> set[str]:
    """The top-level names of every module an import statement anywhere in `tree` brings in."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    return {name: imported_names(tree) & set(modules) for name, tree in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary circle of a directed graph, each once: it starts at its smallest module, and
    the walk from there visits only larger ones (a small graph's search; fine for a project of
    modules)."""
    cycles = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                cycles.append(path + [start])
            elif nxt > start and nxt not in path:
                walk(start, nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return cycles


def layer_of(module: str) -> tuple[int, int] | None:
    """(layer, place within the core) of a module in LAYERS, or None for a module the table does not
    place."""
    for rank, members in enumerate(LAYERS.values()):
        if module in members:
            return rank, members.index(module) if rank == 1 else 0
    return None


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    """Imports that point up the layers, or forward within the core."""
    arrows = []
    for a in sorted(graph):
        for b in sorted(graph[a]):
            la, lb = layer_of(a), layer_of(b)
            if la is None or lb is None:
                continue
            if lb[0] > la[0]:
                arrows.append(f"{a} -> {b} ({list(LAYERS)[la[0]]} -> {list(LAYERS)[lb[0]]})")
            elif lb[0] == la[0] == 1 and lb[1] >= la[1]:
                arrows.append(
                    f"{a} -> {b} (core: {b} comes after {a})" if a != b else f"{a} -> {a} (itself)"
                )
    return arrows


# ---------------------------------------------------------------------------- the static call graph


class Defs:
    """Every function and method of the project, by qualified name (module.f, module.Class.m,
    module.f.inner), with what resolving a call needs: each module's defs, classes and imported
    names."""

    def __init__(self, modules: dict[str, ast.Module]) -> None:
        self.modules = modules
        self.nodes: dict[str, ast.AST] = {}
        # qualified name -> the class it is a method of ("" if none)
        self.scope: dict[str, str] = {}
        # module -> local name -> "module" or "module.name"
        self.aliases: dict[str, dict[str, str]] = {}
        for name, tree in modules.items():
            self.collect(name, tree.body, name, "")
            self.aliases[name] = self.import_aliases(tree, set(modules))
        self.count_by_name: dict[str, int] = {}
        for qual in self.nodes:
            short = qual.rsplit(".", 1)[1]
            self.count_by_name[short] = self.count_by_name.get(short, 0) + 1

    def collect(self, module: str, body: list[ast.stmt], prefix: str, cls: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = f"{prefix}.{node.name}"
                self.nodes[qual], self.scope[qual] = node, cls
                self.collect(module, node.body, qual, "")
            elif isinstance(node, ast.ClassDef):
                self.nodes.setdefault(f"{prefix}.{node.name}", node)
                self.collect(module, node.body, f"{prefix}.{node.name}", f"{prefix}.{node.name}")

    @staticmethod
    def import_aliases(tree: ast.Module, project: set[str]) -> dict[str, str]:
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in project:
                        aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in project:
                for a in node.names:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        return aliases

    def functions(self) -> list[str]:
        return [q for q, node in self.nodes.items() if not isinstance(node, ast.ClassDef)]

    def target(self, qual: str) -> list[str]:
        """The functions a call of `qual` runs: the function, or a class's __init__ and
        __post_init__."""
        node = self.nodes.get(qual)
        if isinstance(node, ast.ClassDef):
            return [
                f"{qual}.{m}" for m in ("__init__", "__post_init__") if f"{qual}.{m}" in self.nodes
            ]
        return [qual] if node is not None else []

    def resolve(self, caller: str, call: ast.Call) -> list[str]:
        module, f = caller.split(".", 1)[0], call.func
        if isinstance(f, ast.Name):
            # enclosing functions, innermost
            scopes = [caller.rsplit(".", i)[0] for i in range(caller.count("."))]
            for scope in scopes + [module]:
                if f"{scope}.{f.id}" in self.nodes and not self.scope.get(f"{scope}.{f.id}"):
                    return self.target(f"{scope}.{f.id}")
            return self.target(self.aliases[module].get(f.id, ""))
        if not isinstance(f, ast.Attribute):
            return []
        if isinstance(f.value, ast.Name):
            base = self.aliases[module].get(f.value.id, "")
            # module.f, or Class.m
            if base in self.modules or isinstance(self.nodes.get(base), ast.ClassDef):
                return self.target(f"{base}.{f.attr}")
            if (
                f.value.id == "self"
                and self.scope.get(caller)
                and f"{self.scope[caller]}.{f.attr}" in self.nodes
            ):
                return self.target(f"{self.scope[caller]}.{f.attr}")
        methods = [q for q in self.nodes if q.endswith(f".{f.attr}") and self.scope.get(q)]
        return methods if len(methods) == 1 and self.count_by_name.get(f.attr) == 1 else []

    def calls(self, qual: str) -> set[str]:
        """The project functions that the body of `qual` calls (nested defs are their own
        callers)."""
        found, stack = set(), list(self.nodes[qual].body)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, ast.Call):
                found |= set(self.resolve(qual, node))
            stack.extend(ast.iter_child_nodes(node))
        return found

    def reachable(self, start: str) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for callee in self.calls(todo.pop()) - seen:
                seen.add(callee)
                todo.append(callee)
        return seen


# ----------------------------------------------------------------------------- sizes


def function_lengths(modules: dict[str, ast.Module]) -> list[tuple[str, int]]:
    """(qualified name, lines from def to its last line) of every function and method, longest
    first."""
    defs = Defs(modules)
    lengths = [(q, defs.nodes[q].end_lineno - defs.nodes[q].lineno + 1) for q in defs.functions()]
    return sorted(lengths, key=lambda item: (-item[1], item[0]))


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--root",
        default=str(Path(__file__).resolve().parent.parent),
        help="the repository (default: this)",
    )
    p.add_argument(
        "--verbose", action="store_true", help="also list the functions reachable from train.train"
    )
    args = p.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        p.error(f"--root {root}: not a folder")
    try:
        modules = read_modules(root)
    except SyntaxError as err:
        p.exit(2, f"error: {err.filename}: cannot be parsed (line {err.lineno}: {err.msg})\n")
    graph = import_graph(modules)

    print(f"modules: {len(modules)}")
    for name in sorted(graph):
        print(f"{name} -> {', '.join(sorted(graph[name])) or '(nothing)'}")
    cycles = find_cycles(graph)
    print(f"circles: {len(cycles) or 'none'}")
    for cycle in cycles:
        print(f"circle: {' -> '.join(cycle)}")
    arrows = upward_arrows(graph)
    print(f"upward arrows: {len(arrows) or 'none'}")
    for arrow in arrows:
        print(f"upward arrow: {arrow}")
    off_table = [
        f"{a} -> {b}" for a in CORE_TABLE if a in graph for b in sorted(graph[a] - CORE_TABLE[a])
    ]
    print(f"core_arrows_off_table: {', '.join(off_table) or 'none'}")
    unplaced = sorted(m for m in modules if layer_of(m) is None)
    print(f"modules_outside_the_layers: {', '.join(unplaced) or 'none'}")
    readers = sorted(
        m
        for m, tree in modules.items()
        if "argparse" in imported_names(tree) and m not in FLAG_READERS
    )
    print(f"argparse_outside_main_commands: {', '.join(readers) or 'none'}")

    defs = Defs(modules)
    if "train.train" in defs.nodes:
        reached = defs.reachable("train.train")
        print(f"reachable_from_train_train: {len(reached)}")
        if args.verbose:
            for qual in sorted(reached):
                print(f"  {qual}")
    else:
        print("reachable_from_train_train: n/a (no train.train)")

    for name in sorted(modules):
        print(f"{name}_lines: {line_count(root / f'{name}.py')}")
    core = [root / f"{m}.py" for m in CORE_LINES if m in modules]
    print(f"core_lines: {sum(map(line_count, core))} ({' + '.join(p.name for p in core)})")
    print(f"product_lines: {sum(line_count(root / f'{m}.py') for m in modules)}")
    tests = sorted((root / "tests").rglob("*.py"))
    print(f"tests_lines: {sum(map(line_count, tests))} ({len(tests)} files)")
    lengths = function_lengths(modules)
    if lengths:
        print(f"longest_function: {lengths[0][0]} {lengths[0][1]}")
    long = [(q, n) for q, n in lengths if n > LONG_FUNCTION]
    print(f"functions_over_{LONG_FUNCTION}_lines: {len(long)}")
    for qual, n in long:
        print(f"long_function: {qual} {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

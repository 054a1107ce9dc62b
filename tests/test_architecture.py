"""The package's import rules (docs/architecture.md), read from the source with `ast`.

Every module of kto_jax/ belongs to one layer; a module may import its own layer and
the layers below it, never one above. No module imports itself back through a chain of
imports (a cycle), counting imports inside functions and under TYPE_CHECKING, so a
lazy import cannot hide one; and the top-level packages and modules (train/, step/,
data/, perf/, ...) import each other without cycles too.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kto_jax")

# Highest first. A module belongs to the first layer with a prefix that names it or a
# package above it. Keep in step with docs/architecture.md.
LAYERS = (
    ("commands", ("kto_jax.cli", "kto_jax.commands")),
    ("runtime", ("kto_jax.train", "kto_jax.online", "kto_jax.eval", "kto_jax.demo", "kto_jax.perf")),
    ("step", ("kto_jax.step",)),
    ("libraries", ("kto_jax.models", "kto_jax.losses", "kto_jax.data")),
    ("base", ("kto_jax.errors", "kto_jax.config", "kto_jax.sharding", "kto_jax.batch", "kto_jax.fs",
              "kto_jax.console", "kto_jax.hub")),
)
PACKAGE_INIT = "kto_jax"  # the package's own __init__: a docstring and the version, below all


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-len(".py")].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def package_modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                out[module_name(path)] = path
    return out


MODULES = package_modules()


def imports_of(path: str) -> set[str]:
    """The kto_jax modules `path` imports, anywhere in the file (lazy ones included)."""
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
    return {name for name in out if name == "kto_jax" or name.startswith("kto_jax.")}


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def layer_of(module: str) -> int | None:
    """Rank of `module`'s layer: 0 for the base, higher above; None when it has none."""
    if module == PACKAGE_INIT:
        return -1
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return len(LAYERS) - 1 - rank
    return None


def unit_of(module: str) -> str:
    """The top-level package or module `module` is part of: kto_jax.train.run -> kto_jax.train."""
    return ".".join(module.split(".")[:2])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if layer_of(m) is None)
    assert not unplaced, (f"{unplaced}: give each a layer in LAYERS (tests/test_architecture.py) "
                          "and docs/architecture.md")


def test_no_module_imports_a_layer_above_its_own():
    upward = sorted(f"{m} ({LAYERS[len(LAYERS) - 1 - layer_of(m)][0]}) imports {t} "
                    f"({LAYERS[len(LAYERS) - 1 - layer_of(t)][0]})"
                    for m, targets in GRAPH.items() for t in targets
                    if t in MODULES and layer_of(m) is not None and layer_of(t) is not None
                    and layer_of(t) > layer_of(m))
    assert not upward, "\n".join(upward)


def test_nothing_below_the_commands_imports_them():
    commands = dict(LAYERS)["commands"]
    offenders = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() for t in targets
                       if any(t == c or t.startswith(c + ".") for c in commands)
                       and not any(m == c or m.startswith(c + ".") for c in commands))
    assert not offenders, "\n".join(offenders)


def test_no_import_cycle_between_modules():
    cycle = find_cycle({m: {t for t in targets if t in MODULES and t != m}
                        for m, targets in GRAPH.items()})
    assert cycle is None, " -> ".join(cycle)


def test_no_import_cycle_between_packages():
    units: dict[str, set[str]] = {}
    for m, targets in GRAPH.items():
        units.setdefault(unit_of(m), set()).update(
            unit_of(t) for t in targets if t in MODULES and unit_of(t) != unit_of(m))
    cycle = find_cycle(units)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
])
def test_find_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_imports_inside_functions_are_edges_too():
    """`eval/loading.py` imports the export code inside a function: it is still an edge."""
    assert "kto_jax.train.export" in GRAPH["kto_jax.eval.loading"]


def test_no_class_defines_a_method_twice():
    """A second `def` of the same name in a class body silently replaces the first."""
    twice = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.ClassDef):
                seen = set()
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        if item.name in seen and not item.decorator_list:
                            twice.append(f"{name}.{node.name}.{item.name}")
                        seen.add(item.name)
    assert not twice, twice


REPO = os.path.dirname(ROOT)


def _repo_texts():
    for folder in ("kto_jax", "docs", "configs", "tests"):
        for base, _, files in os.walk(os.path.join(REPO, folder)):
            for name in files:
                if name.endswith((".py", ".md")):
                    yield os.path.join(base, name)
    yield os.path.join(REPO, "README.md")


def test_cited_docs_are_in_the_repository():
    """Code and docs cite design notes inside the repository (docs/design.md), and every
    `docs/NAME.md` they name exists."""
    import re
    outside, missing = [], []
    for path in _repo_texts():
        rel = os.path.relpath(path, REPO)
        if rel == os.path.join("tests", "test_architecture.py"):
            continue
        text = open(path, encoding="utf-8").read()
        if "DESIGN.md" in text:
            outside.append(rel)
        for doc in set(re.findall(r"docs/([A-Za-z_]+\.md)", text)):
            if not os.path.isfile(os.path.join(REPO, "docs", doc)):
                missing.append(f"{rel}: docs/{doc}")
    assert not outside, f"cite docs/design.md, not a DESIGN.md outside the repository: {outside}"
    assert not missing, missing


def test_the_step_and_the_data_pipeline_meet_only_in_batch_py():
    """kto_jax/batch.py is the one contract between data/ (which writes batches) and step/
    (which reads them): step/ imports nothing from data/."""
    offenders = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() for t in targets
                       if m.startswith("kto_jax.step") and unit_of(t) == "kto_jax.data")
    assert not offenders, "\n".join(offenders)


PURE = ("kto_jax.step", "kto_jax.models", "kto_jax.losses", "kto_jax.data")


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _external_imports(path: str) -> set[str]:
    """Every module `path` imports (top-level names and their dotted paths), kto_jax or not."""
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def test_below_the_runtime_nothing_reads_a_config_dict():
    """step/, models/, losses/ and data/ take typed settings (kto_jax/train/settings.py reads
    the ConfigDict once): none of them imports ml_collections."""
    offenders = sorted(m for m, path in MODULES.items() if _in(m, PURE)
                       and any(i == "ml_collections" or i.startswith("ml_collections.")
                               for i in _external_imports(path)))
    assert not offenders, offenders


FILE_READERS = {"open", "load", "loads"}   # open(...), json.load, np.load, ...


def _opens_files(path: str) -> list[str]:
    """The calls in `path` that read or write a file: open(), io.open, json/np.load, os.path
    queries, and any use of kto_jax.fs."""
    found = []
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id == "open":
                found.append(f"open() at line {node.lineno}")
            elif isinstance(f, ast.Attribute) and f.attr in FILE_READERS | {"isfile", "exists"}:
                found.append(f"{ast.unparse(f)}() at line {node.lineno}")
    return found


def test_the_step_opens_no_file():
    """step/ is pure: no open(), no file loads, no kto_jax.fs; the runtime reads files
    (a model's config.json, LoRA's adapter_config.json) and hands the step their values."""
    offenders = []
    for m, path in sorted(MODULES.items()):
        if _in(m, ("kto_jax.step",)):
            offenders += [f"{m}: {c}" for c in _opens_files(path)]
            offenders += [f"{m} imports {t}" for t in GRAPH[m]
                          if t in ("kto_jax.fs", "kto_jax.models.lora_io", "kto_jax.models.hf_io")]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("source, found", [
    ("import json\njson.load(open('x'))\n", 2),
    ("x = y.open_file('a')\n", 0),
    ("import os\nos.path.isfile('a')\n", 1),
])
def test_opens_files_sees_reads(tmp_path, source, found):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert len(_opens_files(str(path))) == found


def test_no_module_outside_losses_imports_a_loss_module():
    """A loss is a plug-in: outside kto_jax/losses/ code asks a HaloLoss (the registry) and
    never imports one loss's module (kto.py, ppo.py, bco.py, ...)."""
    shared = {"kto_jax.losses", "kto_jax.losses.registry", "kto_jax.losses.common",
              "kto_jax.losses.weights", "kto_jax.losses.hparams"}
    offenders = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() for t in targets
                       if not _in(m, ("kto_jax.losses",)) and _in(t, ("kto_jax.losses",))
                       and t not in shared)
    assert not offenders, "\n".join(offenders)


def test_no_module_outside_losses_names_a_loss():
    """No behaviour outside kto_jax/losses/ is keyed on a loss's name: no string constant
    there is a registered loss name (ask the HaloLoss's fields instead)."""
    from kto_jax.losses.registry import LOSS_NAMES
    offenders = []
    for m, path in sorted(MODULES.items()):
        if _in(m, ("kto_jax.losses",)):
            continue
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Constant) and node.value in LOSS_NAMES:
                offenders.append(f"{m}:{node.lineno}: {node.value!r}")
    assert not offenders, "\n".join(offenders)

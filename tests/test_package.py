"""The package's shape, read from its source: no import cycle among its modules (imports
inside functions included) and no function with more than 10 positional parameters
outside Triton kernels (keyword-only options are fine). The source is parsed, not
imported."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"rlvr_optim": ROOT / "rlvr_optim", "rlvr_optim.triton_kernels": ROOT / "triton_kernels"}
MAX_POSITIONAL = 10


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports, anywhere in its source."""
    base = name if _is_package(name, modules) else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                mod = ".".join([*anchor, *(node.module.split(".") if node.module else [])])
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{alias.name}" for alias in node.names]
        for target in targets:
            if target in modules and target != name:
                out.add(target)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _package_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # A package's __init__ importing its own submodules is not a cycle through them: a
    # submodule importing the package means its __init__, which Python runs first.
    for name in graph:
        graph[name] = {m for m in graph[name] if not (_is_package(m, modules)
                                                       and name.startswith(m + "."))}
    return graph


def test_no_import_cycles_among_the_package_modules():
    cycles = _cycles(_package_graph())
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_finder_finds_a_cycle():
    """Negative control: a cycle through a function-level import is found."""
    graph = _package_graph()
    graph["rlvr_optim.table"] = graph["rlvr_optim.table"] | {"rlvr_optim.optimizer"}
    assert any("rlvr_optim.table" in c for c in _cycles(graph))


def _is_triton_kernel(node) -> bool:
    return any(ast.unparse(d).startswith(("triton.jit", "triton.autotune"))
               for d in node.decorator_list)


def _long_signatures(modules: dict[str, Path] | None = None) -> list[str]:
    out = []
    for name, path in (modules or _modules()).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and not _is_triton_kernel(node):
                positional = len(node.args.posonlyargs) + len(node.args.args)
                if positional > MAX_POSITIONAL:
                    out.append(f"{name}.{node.name}: {positional}")
    return out


def test_no_function_takes_more_than_ten_positional_parameters():
    assert not _long_signatures()


def _bench_scripts() -> dict[str, Path]:
    return {f"bench.{p.stem}": p for p in sorted((ROOT / "bench").rglob("*.py"))}


def test_no_bench_script_takes_more_than_ten_positional_parameters():
    assert not _long_signatures(_bench_scripts())


def test_the_signature_check_finds_a_long_signature(tmp_path):
    """Negative control: an 11-parameter function is reported, keyword-only options and a
    Triton kernel are not."""
    path = tmp_path / "m.py"
    path.write_text(
        "import triton\n"
        "def f(a, b, c, d, e, f, g, h, i, j, k): pass\n"
        "def g(a, b, c, d, e, f, g, h, i, j, *, k): pass\n"
        "@triton.jit\n"
        "def kernel(a, b, c, d, e, f, g, h, i, j, k): pass\n")
    assert _long_signatures({"m": path}) == ["m.f: 11"]


def _class_lines(path: Path, name: str) -> int:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node.end_lineno - node.lineno + 1
    raise AssertionError(f"{path.name} defines no class {name}")


def test_the_adamw_class_is_at_most_400_lines():
    """AdamW's own body and the body it shares with Adam (RoundingAdam), together."""
    path = ROOT / "rlvr_optim" / "optimizer.py"
    lines = _class_lines(path, "AdamW") + _class_lines(path, "RoundingAdam")
    assert lines <= 400, lines


def test_the_table_row_is_defined_once():
    """csrc/step_table.h defines the row (an X-macro); the CUDA kernel and the CPU step
    include it, Triton and the planner read it through rlvr_optim.table; no other file
    spells a row layout of its own."""
    csrc = ROOT / "csrc"
    defining = [p.name for p in sorted(csrc.iterdir()) if p.is_file()
                and "#define RLVR_ROW_FIELDS" in p.read_text(errors="replace")]
    assert defining == ["step_table.h"]
    for name in ("adamw_launch.h", "cpu_step.h"):
        assert '#include "step_table.h"' in (csrc / name).read_text()
    for rel in ("triton_kernels/adamw.py", "rlvr_optim/cpu_backend.py",
                "rlvr_optim/cuda_backend.py"):
        text = (ROOT / rel).read_text()
        assert "rlvr_optim.table import" in text or "from .table import" in text, rel
    # No Python file keeps a column list or bare row offsets of its own.
    for path in [*(ROOT / "rlvr_optim").rglob("*.py"), *(ROOT / "triton_kernels").rglob("*.py")]:
        text = path.read_text()
        assert "TABLE_COLUMNS" not in text and "ROW_FIELDS = (" not in text, path
    from rlvr_optim import table

    assert table.ROW_FIELDS[:2] == ("param", "grad") and len(table.ROW_FIELDS) == 16
    assert table.COUNTER_NAMES == ("bf16_changed", "fp32_moved", "nonfinite_grads")

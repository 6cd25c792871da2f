"""The style promise of docs/ARCHITECTURE.md, kept by the suite: ruff and mypy (strict) clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=300)


def test_ruff_is_clean() -> None:
    result = _run(str(BIN / "ruff"), "check", ".")
    assert result.returncode == 0, result.stdout[-4000:]


def test_mypy_is_clean() -> None:
    result = _run(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout[-4000:]


def test_node_never_imports_pipelines_torch_or_monai() -> None:
    """The receiver must run without the scoring stack."""
    code = ("import sys, pkgutil, importlib, node; "
            "[importlib.import_module('node.' + m.name) for m in pkgutil.iter_modules(node.__path__)]; "
            "bad = [m for m in ('pipelines', 'torch', 'monai') if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    result = _run(sys.executable, "-c", code)
    assert result.returncode == 0, f"node imported: {result.stdout.strip()} {result.stderr[-500:]}"


# --- the rooms of docs/ARCHITECTURE.md, kept by the suite ---------------------------------------
PYNETDICOM_INTERNALS = "node/pynetdicom_internals.py"
PRIVATE_PYNETDICOM_NAMES = {"_read_pdu_data", "_decode_pdu", "_idle_timer", "_negotiate_as_acceptor",
                            "_create_association", "_servers", "_data_set_file", "_config",
                            "_process_recv_primitive", "_handlers", "_recv_pdu", "_reactor_checkpoint",
                            "_kill_thread", "_run_loop_delay"}
RUN_FILE_NAMES = {"manifest.jsonl", "run.json", "record.json", "record.previous.json",
                  "published.json", "superseded.json", "discarded.json"}


def _sources(*rooms: str) -> list[Path]:
    return sorted(path for room in rooms for path in (ROOT / room).rglob("*.py"))


def _code_strings_and_attributes(path: Path) -> tuple[set[str], set[str], set[str]]:
    """String constants (docstrings excluded), attribute names and imported modules of a file."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    strings = {n.value for n in ast.walk(tree)
               if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings}
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    imports = {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
    imports |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return strings, attributes, imports


def test_only_one_module_reaches_into_pynetdicom() -> None:
    """An upgrade of pynetdicom has one place to check (and the fault tests it names)."""
    offenders = {}
    for path in _sources("node", "pipelines", "tools"):
        if path.relative_to(ROOT).as_posix() == PYNETDICOM_INTERNALS:
            continue
        _, attributes, _ = _code_strings_and_attributes(path)
        if attributes & PRIVATE_PYNETDICOM_NAMES:
            offenders[path.relative_to(ROOT).as_posix()] = sorted(attributes & PRIVATE_PYNETDICOM_NAMES)
    assert offenders == {}
    _, attributes, _ = _code_strings_and_attributes(ROOT / PYNETDICOM_INTERNALS)
    assert attributes & PRIVATE_PYNETDICOM_NAMES, "the internals module names none: update this test"


def test_only_the_run_records_module_names_a_run_file() -> None:
    """One reader and one writer per run file: nobody else builds their paths."""
    offenders = {}
    for path in _sources("node", "pipelines", "tools"):
        if path.relative_to(ROOT).as_posix() == "node/runs.py":
            continue
        strings, _, _ = _code_strings_and_attributes(path)
        if strings & RUN_FILE_NAMES:
            offenders[path.relative_to(ROOT).as_posix()] = sorted(strings & RUN_FILE_NAMES)
    assert offenders == {}


def test_tools_never_import_tests_and_node_never_imports_pipelines() -> None:
    for path in _sources("tools"):
        _, _, imports = _code_strings_and_attributes(path)
        assert not {m for m in imports if m == "tests" or m.startswith("tests.")}, path
    import ast

    # Module level only: `mammo-node worker` (node/cli.py) loads pipelines/ inside that command.
    for path in _sources("node"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imports = {alias.name for n in tree.body if isinstance(n, ast.Import) for alias in n.names}
        imports |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
        bad = {m for m in imports if m.split(".")[0] in {"pipelines", "torch", "monai", "tools"}}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_no_uid_literal_outside_the_vocabulary() -> None:
    """SOP classes and transfer syntaxes come from pynetdicom and pydicom, through node/vocabulary.py."""
    offenders = {}
    for path in _sources("node", "pipelines", "tools"):
        strings, _, _ = _code_strings_and_attributes(path)
        literal = {s for s in strings if s.startswith("1.2.840.10008.")}
        if literal:
            offenders[path.relative_to(ROOT).as_posix()] = sorted(literal)
    assert offenders == {}

"""Re-execute a notebook in place with this virtual environment's kernel, from the repository root.

    .venv/bin/python -m tools.run_notebook docs/notebooks/walkthrough.ipynb [--timeout 1800]

The committed notebook keeps its outputs (tests/unit/test_notebook.py checks that it was run
without errors), so a reader sees the results without running anything; this is how they are
refreshed. Cells run with the repository root as working directory. The file is only replaced
when every cell ran; a failing cell leaves the old notebook untouched and exits non-zero.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 2 * 1024 * 1024


def execute(path: Path, timeout_s: int) -> int:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout_s, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    started = time.time()
    try:
        client.execute()
    except CellExecutionError as error:
        print(f"{path}: a cell failed; notebook not rewritten\n{error}", file=sys.stderr)
        return 1
    for cell in notebook.cells:  # no machine-specific run metadata in the committed file
        cell.get("metadata", {}).pop("execution", None)
    nbformat.validate(notebook)
    temporary = path.with_suffix(".ipynb.tmp")
    nbformat.write(notebook, temporary)
    size = temporary.stat().st_size
    temporary.replace(path)
    print(f"{path}: executed in {time.time() - started:.0f} s, {size / 1024:.0f} KiB"
          + (" (over the 2 MiB budget: downscale figures)" if size > MAX_BYTES else ""))
    return 0 if size <= MAX_BYTES else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path, nargs="?",
                        default=ROOT / "docs" / "notebooks" / "walkthrough.ipynb")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    return execute(args.notebook.resolve(), args.timeout)


if __name__ == "__main__":
    raise SystemExit(main())

"""Run the course headless: every ``NN_*.ipynb`` chapter in order, executed copies in ``build/course/``.

``python -m blip2_lite course`` (and ``scripts/course.sh``) call ``run_course``. It replaces
``jupyter nbconvert --execute``, which fit a course of minutes-long training cells badly:

- no cell timeout: on a slower machine a training cell only takes longer, it does not fail;
- resume: a chapter that finished in an earlier run, with the same notebook and the same package
  code, is skipped (records in ``OUT/course_state.json``). Once one chapter runs again, every later
  one does too: later chapters read the caches that earlier ones write. Training inside a chapter
  resumes from its own last checkpoint, so an interrupted course loses little work;
- one-line failures: ``CourseError`` names the chapter, the code cell and the error, and points to
  the partly executed notebook saved in ``OUT``, which holds the full traceback.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

from .atomic import atomic_path, write_json

PACKAGE = Path(__file__).resolve().parent
STATE = "course_state.json"


class CourseError(RuntimeError):
    """A chapter failed (or none was found); the message is one line."""


def package_digest(package: Path = PACKAGE) -> str:
    """sha256 over the path and bytes of every ``.py`` file of the package: the code chapters import."""
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(f"{path.relative_to(package).as_posix()} {hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def run_course(notebooks_dir, out_dir, progress: bool = True) -> dict:
    """Execute every ``NN_*.ipynb`` of ``notebooks_dir`` in order into ``out_dir``, skipping what an
    earlier run finished. Returns ``{chapter: seconds}`` (recorded seconds for skipped chapters) and
    ``"total"``. Raises ``CourseError`` on a failing chapter; Ctrl-C stops the running kernel and
    raises ``KeyboardInterrupt`` (the same call then resumes with that chapter)."""
    notebooks_dir, out_dir = Path(notebooks_dir), Path(out_dir)
    chapters = sorted(notebooks_dir.glob("[0-9][0-9]_*.ipynb"))
    if not chapters:
        raise CourseError(f"no chapters (NN_name.ipynb) in {notebooks_dir}")

    def say(line):
        if progress:
            print(line, flush=True)  # flushed: a chapter can run for minutes after its title line

    state_path = out_dir / STATE
    state = _read_state(state_path, say)
    code = package_digest()
    times = {}
    for i, path in enumerate(chapters):
        name, out_path = path.stem, out_dir / f"{path.stem}.ipynb"
        digest = hashlib.sha256(code.encode() + path.read_bytes()).hexdigest()
        record = state.get(name)  # skipped only if it finished with these inputs and its output is still there
        if record and record["digest"] == digest and out_path.exists():
            say(f"== {name}: done in an earlier run ({record['seconds']:.1f} s), skipped")
            times[name] = record["seconds"]
            continue
        # This chapter runs, so every later one will: drop their records before starting, so that a
        # failed or interrupted run never leaves a record that its outputs no longer match.
        state = {c.stem: state[c.stem] for c in chapters[:i] if c.stem in state}
        write_json(state_path, state)
        say(f"== {name}")
        start = time.perf_counter()
        _execute(path, out_path)
        times[name] = round(time.perf_counter() - start, 1)
        say(f"== {name}: done in {times[name]:.1f} s")
        finished = datetime.now(UTC).isoformat(timespec="seconds")
        state[name] = {"digest": digest, "seconds": times[name], "finished": finished}
        write_json(state_path, state)
    times["total"] = round(sum(times.values()), 1)
    return times


def _read_state(path: Path, say) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError:  # edited by hand: costs time only, every chapter runs again
        say(f"note: {path} is not valid JSON; running every chapter")
        return {}


def _execute(path: Path, out_path: Path) -> None:
    """Run one notebook in a fresh ``python3`` kernel and save it to ``out_path``."""
    nb = nbformat.read(path, as_version=4)
    running, interrupts = [], 0  # indices of the cells executed so far; Ctrl-Cs received

    def take_ctrl_c(notebook):  # called once the kernel is up, after nbclient installed its own handler
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, on_ctrl_c)

    def on_ctrl_c():
        # nbclient's own handler shuts the kernel down under the running cell, which then fails with
        # an unrelated error. Ours interrupts the cell, like Jupyter's stop button: the chapter ends
        # and the kernel shuts down the normal way. A second Ctrl-C kills a kernel that does not react.
        nonlocal interrupts
        interrupts += 1
        asyncio.ensure_future(client.km.interrupt_kernel() if interrupts == 1 else client.km.shutdown_kernel(now=True))

    client = NotebookClient(
        nb, timeout=None, kernel_name="python3",  # no cell timeout: a slow machine only takes longer
        resources={"metadata": {"path": str(path.parent)}},  # cwd: the notebook's folder, as under nbval
        extra_arguments=["--IPKernelApp.log_level=ERROR"],  # no start-up warnings from every kernel
        on_notebook_start=take_ctrl_c,
        on_cell_execute=lambda cell, cell_index: running.append(cell_index),
    )
    failure = None
    try:
        client.execute(env={"HF_HUB_OFFLINE": "1", **os.environ})  # the course never needs a model hub
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
        failure = e
    if interrupts:
        raise KeyboardInterrupt
    with atomic_path(out_path) as tmp:  # on failure too: the saved notebook shows the full traceback
        nbformat.write(nb, tmp)
    if failure is not None:
        raise CourseError(_describe(failure, path.stem, nb, running[-1] if running else None, out_path))


def _describe(error: Exception, name: str, nb, index: int | None, out_path: Path) -> str:
    """One line: chapter, code cell number (1-based among code cells) and first line, error."""
    where = f"chapter {name}"
    if index is not None:
        number = sum(cell.cell_type == "code" for cell in nb.cells[: index + 1])
        first = next((line.strip() for line in nb.cells[index].source.splitlines() if line.strip()), "")
        where += f", code cell {number} ({first if len(first) <= 60 else first[:57] + '...'})"
    if isinstance(error, CellExecutionError):
        ename, evalue = error.ename, error.evalue
    else:  # DeadKernelError, CellTimeoutError: their first line says what happened
        ename, evalue = type(error).__name__, str(error).strip().split("\n")[0]
    what = " ".join(f"{ename}: {evalue}".split()).rstrip(":")  # a multi-line message, folded to one line
    try:  # a path below the current folder is shown relative to it: shorter, and what the user typed
        out_path = out_path.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return f"{where}: {what}; full traceback in {out_path}"

"""The course runner: chapters run in order into OUT, a rerun skips what is done and unchanged, a
failure ends with one line naming chapter and cell, Ctrl-C stops the kernel. Tiny throwaway
notebooks stand in for the course (each chapter costs one kernel start-up, about a second)."""

import json
import os
import signal
import threading
import time

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from blip2_lite import course
from blip2_lite.__main__ import main
from blip2_lite.course import STATE, CourseError, package_digest, run_course


@pytest.fixture(autouse=True)
def fixed_package(monkeypatch):
    """The package's code is part of each chapter's digest; fixed here so that edits made to the
    package while the tests run cannot change what they see (the real digest has its own test)."""
    monkeypatch.setattr(course, "package_digest", lambda: "package v1")


def chapter(folder, name, *sources):
    """Write ``folder/name.ipynb``: a title, then one code cell per source, then one that logs the run."""
    cells = [new_markdown_cell(f"# {name}")] + [new_code_cell(s) for s in sources]
    cells.append(new_code_cell(f"open('ran.txt', 'a').write('{name} ')"))  # cwd: the notebook's folder
    folder.mkdir(exist_ok=True)
    nbformat.write(new_notebook(cells=cells), folder / f"{name}.ipynb")


def ran(folder):
    """Chapters executed since the last call, in order."""
    log = folder / "ran.txt"
    names = log.read_text().split() if log.exists() else []
    log.unlink(missing_ok=True)
    return names


def test_chapters_run_in_order_and_a_rerun_skips_unchanged_ones(tmp_path, capsys):
    nbs, out = tmp_path / "notebooks", tmp_path / "out"
    chapter(nbs, "00_a", "x = 1", "print(x + 1)")
    chapter(nbs, "01_b", "import time; time.sleep(0.1)")
    chapter(nbs, "02_c", "import os; print(os.environ['HF_HUB_OFFLINE'])")
    (nbs / "notes.ipynb").write_text("not a chapter")  # only NN_*.ipynb are chapters

    times = run_course(nbs, out)
    ran_order = ran(nbs)
    assert ran_order == ["00_a", "01_b", "02_c"]
    assert list(times) == ["00_a", "01_b", "02_c", "total"] and times["total"] == pytest.approx(sum(times[c] for c in ran_order), abs=0.2)
    executed = nbformat.read(out / "00_a.ipynb", as_version=4)
    assert executed.cells[2].outputs[0].text == "2\n"  # outputs are saved
    assert nbformat.read(out / "02_c.ipynb", as_version=4).cells[1].outputs[0].text == "1\n"  # offline kernel
    state = json.loads((out / STATE).read_text())
    assert list(state) == ["00_a", "01_b", "02_c"] and state["01_b"]["seconds"] == times["01_b"]
    printed = capsys.readouterr().out
    assert "== 00_a\n" in printed and f"== 02_c: done in {times['02_c']:.1f} s" in printed

    again = run_course(nbs, out)  # nothing changed: nothing runs, recorded times are reported
    assert ran(nbs) == [] and again == times
    assert f"== 01_b: done in an earlier run ({times['01_b']:.1f} s), skipped" in capsys.readouterr().out

    chapter(nbs, "01_b", "y = 2")  # an edited chapter runs again, and so does every later one
    run_course(nbs, out, progress=False)
    assert ran(nbs) == ["01_b", "02_c"] and capsys.readouterr().out == ""


def test_a_failure_names_chapter_and_cell_and_a_rerun_resumes_there(tmp_path, monkeypatch):
    nbs, out = tmp_path / "notebooks", tmp_path / "out"
    chapter(nbs, "00_a", "x = 1")
    chapter(nbs, "01_b", "x = 1", 'assert x == 2, "x is not 2"\nprint("unreachable")')
    chapter(nbs, "02_c", "z = 3")

    with pytest.raises(CourseError) as failure:
        run_course(nbs, out, progress=False)
    assert str(failure.value) == (f'chapter 01_b, code cell 2 (assert x == 2, "x is not 2"): AssertionError: x is not 2; '
                                  f"full traceback in {out / '01_b.ipynb'}")
    assert ran(nbs) == ["00_a"]  # 01_b stopped at its failing cell, 02_c never started
    partial = nbformat.read(out / "01_b.ipynb", as_version=4)  # saved so the user sees the traceback
    assert partial.cells[2].outputs[-1].ename == "AssertionError" and partial.cells[3].outputs == []
    assert list(json.loads((out / STATE).read_text())) == ["00_a"]

    chapter(nbs, "01_b", "x = 2", 'assert x == 2, "x is not 2"')  # fixed: resume with the failed chapter
    run_course(nbs, out, progress=False)
    assert ran(nbs) == ["01_b", "02_c"]

    monkeypatch.setattr(course, "package_digest", lambda: "package v2")  # changed package code: all run
    run_course(nbs, out, progress=False)
    assert ran(nbs) == ["00_a", "01_b", "02_c"]


def test_package_digest_covers_every_python_file_and_only_those(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("a = 1\n")
    (tmp_path / "sub" / "b.py").write_text("b = 1\n")
    first = package_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("not code")
    assert package_digest(tmp_path) == first
    (tmp_path / "sub" / "b.py").write_text("b = 2\n")
    assert package_digest(tmp_path) != first
    (tmp_path / "sub" / "b.py").rename(tmp_path / "b.py")  # same bytes, other file: other code
    assert package_digest(tmp_path) not in (first, package_digest(tmp_path / "sub"))
    real = package_digest()  # the default: blip2_lite itself
    assert len(real) == 64 and real == package_digest()


def test_ctrl_c_stops_the_kernel_and_the_chapter_runs_again_next_time(tmp_path):
    nbs, out = tmp_path / "notebooks", tmp_path / "out"
    chapter(nbs, "00_a", "import time\nopen('started', 'w').close()\ntime.sleep(60)")

    def press_ctrl_c():  # once the cell runs, so that the runner's handler is the one that gets it
        deadline = time.time() + 60
        while time.time() < deadline:
            if (nbs / "started").exists():
                return os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    start = time.time()
    with pytest.raises(KeyboardInterrupt):
        run_course(nbs, out, progress=False)
    assert time.time() - start < 30  # the sleeping cell was interrupted, not waited for
    assert json.loads((out / STATE).read_text()) == {} and not (out / "00_a.ipynb").exists()


def test_the_cli_ends_a_failure_with_one_line_and_prints_times(tmp_path, capsys, monkeypatch):
    nbs, out = tmp_path / "notebooks", tmp_path / "out"
    chapter(nbs, "00_a", "x = 1\nassert x == 2, 'x is not 2'")
    args = ["course", "--notebooks", str(nbs), "--out", str(out)]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: chapter 00_a, code cell 1 (x = 1): AssertionError: x is not 2")
    assert len(err.strip().splitlines()) == 1

    chapter(nbs, "00_a", "x = 2")
    main(args)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].startswith("00_a ") and lines[-2].startswith("total ") and str(out) in lines[-1]

    with pytest.raises(SystemExit) as stop:  # no chapters at all
        main(["course", "--notebooks", str(tmp_path / "nowhere"), "--out", str(out)])
    assert stop.value.code == 2 and capsys.readouterr().err.startswith("error: no chapters")

    def interrupted(notebooks_dir, out_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr("blip2_lite.__main__.run_course", interrupted)
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 130 and "run the same command again to resume" in capsys.readouterr().err

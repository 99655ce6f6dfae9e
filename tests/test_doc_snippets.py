"""Every Python block of README.md and docs/*.md runs as written.

Each block runs in its own fresh process and directory, so a block cannot lean on another's
names. A block preceded by ``<!-- snippet: torchrun N -->`` runs as N processes of one gloo
group, launched the way torchrun launches them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in the environment), and every process must exit cleanly. A multi-process block
ends through ``os._exit`` once it has run: with torch 2.13, a DistributedDataParallel model
keeps gloo's threads alive past ``destroy_process_group()``, and one of them taking Python's
lock while the interpreter finalises aborts the process ("terminate called without an active
exception", seen in a core dump of a test worker). That is torch's teardown, not the block.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- snippet: (?P<mark>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)
TIMEOUT_S = 300
PORT_TAKEN = re.compile(r"EADDRINUSE|[Aa]ddress already in use")


def doc_snippets() -> list[tuple[str, str, str]]:
    """(id, marker, code) of every Python block, in page order."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for number, match in enumerate(BLOCK.finditer(text), start=1):
            line = text.count("\n", 0, match.start("code"))
            name = f"{page.relative_to(ROOT)}:{line}#{number}"
            found.append((name, (match.group("mark") or "").strip(), match.group("code")))
    return found


def processes(marker: str) -> int:
    if not marker:
        return 1
    parts = marker.split()
    if len(parts) != 2 or parts[0] != "torchrun" or not parts[1].isdigit():
        raise ValueError(f"unknown snippet marker {marker!r}; use 'torchrun N'")
    return int(parts[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs snippet.py as __main__; a block that raises still exits non-zero with its traceback.
EXIT_WITHOUT_FINALISING = """\
import os, runpy, sys, traceback
try:
    runpy.run_path("snippet.py", run_name="__main__")
    code = 0
except SystemExit as stop:
    code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
except BaseException:
    traceback.print_exc()
    code = 1
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
"""


def run_snippet(code: str, world_size: int, workdir: Path) -> list[tuple[int, str]]:
    script = workdir / "snippet.py"
    script.write_text(code, encoding="utf-8")
    if world_size > 1:
        (workdir / "launch.py").write_text(EXIT_WITHOUT_FINALISING, encoding="utf-8")
        script = workdir / "launch.py"
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        if world_size > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                       LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(script)], cwd=workdir, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            out, _ = proc.communicate()
            out += f"\n[killed after {TIMEOUT_S} s]"
        results.append((proc.returncode, out))
    return results


SNIPPETS = doc_snippets()


def test_marker_parser_refuses_unknown_markers():
    assert processes("") == 1 and processes("torchrun 2") == 2
    with pytest.raises(ValueError, match="unknown snippet marker"):
        processes("mpirun 2")


def test_every_page_is_scanned_and_the_readme_has_snippets():
    names = [name for name, _, _ in SNIPPETS]
    assert any(name.startswith("README.md") for name in names)
    assert any(name.startswith("docs/") for name in names)


@pytest.mark.slow
@pytest.mark.parametrize("name,marker,code", SNIPPETS, ids=[s[0] for s in SNIPPETS])
def test_snippet_runs_as_written(name, marker, code, tmp_path):
    results = run_snippet(code, processes(marker), tmp_path)
    if any(rc != 0 and PORT_TAKEN.search(out) for rc, out in results):
        # The port was free when chosen but taken before the group bound it (other tests
        # launch groups too): one retry on a new port.
        results = run_snippet(code, processes(marker), tmp_path)
    for rank, (returncode, output) in enumerate(results):
        assert returncode == 0, f"{name} (process {rank}) exited {returncode}:\n{output[-4000:]}"


def test_runner_reports_a_failing_snippet(tmp_path):
    [(returncode, output)] = run_snippet("import gaf\nraise ValueError('boom')\n", 1, tmp_path)
    assert returncode != 0 and "boom" in output


def test_runner_launches_one_gloo_group(tmp_path):
    code = (
        "import torch, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "t = torch.ones(1) * (dist.get_rank() + 1)\n"
        "dist.all_reduce(t)\n"
        "assert t.item() == 3.0, t\n"
        "dist.destroy_process_group()\n"
    )
    results = run_snippet(code, 2, tmp_path)
    assert [rc for rc, _ in results] == [0, 0], results


def test_runner_reports_a_failing_multi_process_snippet(tmp_path):
    code = "import os\nif os.environ['RANK'] == '1':\n    raise ValueError('rank one')\n"
    results = run_snippet(code, 2, tmp_path)
    assert results[0][0] == 0
    assert results[1][0] != 0 and "rank one" in results[1][1]

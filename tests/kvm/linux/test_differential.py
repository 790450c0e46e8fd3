"""The differential corpus: unmodified static programs run natively and under dirtyring give
byte-identical stdout, exit status and files.

- Debian's busybox-static applets that do not fork: sha256sum, awk, sort, sed, wc, gzip and
  gunzip, cat and cp, on input files;
- a SQLite workload linked with Debian's libsqlite3.a, creating a database file in
  rollback-journal (delete) and in WAL mode: inserts, updates, deletes, an index, queries and
  an integrity check.

The README's test command installs busybox-static and libsqlite3-dev (tools/install-test-deps).
"""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest


BUSYBOX = Path("/bin/busybox")
RUN_TIMEOUT = 300  # generous: each program takes well under a second natively

DATA = "".join(f"{i * 7919 % 1000} word{i} {'x' * (i % 13)}\n" for i in range(1, 3001)).encode()


def _need(path: Path, package: str) -> None:
    if not path.exists():
        pytest.fail(f"{path} is missing: ./tools/install-test-deps installs {package}")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def differential(tmp: Path, program: Path, args: list[str], inputs: dict[str, bytes],
                 options: tuple[str, ...] = ()
                 ) -> tuple[subprocess.CompletedProcess[bytes], subprocess.CompletedProcess[bytes],
                            dict[str, bytes], dict[str, bytes]]:
    """Run ``program args`` natively in a directory holding ``inputs``, and under dirtyring
    (``run --exec`` with ``options``: none is run's default, untracked) with the same files;
    return both runs and both resulting file trees."""
    nat, work, saved = tmp / "native", tmp / "work", tmp / "saved"
    for d in (nat, work):
        d.mkdir()
        for name, data in inputs.items():
            (d / name).write_bytes(data)
    n = subprocess.run([str(program), *args], cwd=nat, capture_output=True, env={},
                       timeout=RUN_TIMEOUT)
    cmd = [sys.executable, "-m", "dirtyring.cli.main", "run", "--exec", str(program),
           "--save-files", str(saved), *options]
    for name in inputs:
        cmd += ["--file", name]
    g = subprocess.run([*cmd, "--", *args], cwd=work, capture_output=True,
                       timeout=RUN_TIMEOUT)
    return n, g, _tree(nat), _tree(saved)


APPLETS = [
    ["sha256sum", "data.txt"],
    ["wc", "data.txt"],
    ["sort", "-n", "-k1,1", "-k2", "data.txt"],
    ["awk", "{s += $1; n[$1 % 10]++} END {for (k in n) t += n[k]; print s, t, NR}", "data.txt"],
    ["sed", "-e", "s/word\\([0-9]*\\)/W<\\1>/", "-e", "/x\\{5\\}/d", "data.txt"],
    ["gzip", "-c", "-9", "data.txt"],
    ["gunzip", "-c", "data.txt.gz"],
    ["gzip", "data.txt"],  # in place: writes data.txt.gz, removes data.txt
    ["cat", "data.txt"],  # sendfile to stdout
    ["cp", "data.txt", "copy.txt"],  # sendfile between files
    ["ln", "-s", "data.txt", "link.txt"],  # a symbolic link (saved as one)
    ["ln", "data.txt", "hard.txt"],  # a hard link
    # (not tar: its headers hold the file's mtime, which the guest's copy does not share)
]


@pytest.mark.parametrize("args", APPLETS, ids=lambda a: "-".join(a[:2]))
def test_busybox_applets(tmp_path: Path, args: list[str]) -> None:
    _need(BUSYBOX, "busybox-static")
    inputs = {"data.txt": DATA}
    if args[0] == "gunzip":
        inputs = {"data.txt.gz": gzip.compress(DATA, mtime=0)}
    n, g, ntree, gtree = differential(tmp_path, BUSYBOX, args, inputs)
    assert g.returncode == n.returncode == 0, g.stderr
    assert g.stdout == n.stdout
    assert g.stderr == n.stderr
    assert gtree == ntree


TRACKED = ("--tracker", "ring", "--interval", "1ms", "--verify-every", "5")


@pytest.mark.parametrize("options", [(), TRACKED], ids=["untracked", "tracked"])
@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_sqlite_database_file(tmp_path: Path, sqlite_prog: Path, mode: str,
                              options: tuple[str, ...]) -> None:
    """Both as ``run`` runs a program by default (untracked, on huge pages where the host has
    them) and tracked with the shadow check every 5 epochs (a missed page fails the run)."""
    n, g, ntree, gtree = differential(tmp_path, sqlite_prog, [mode, "3000"], {}, options)
    assert g.returncode == n.returncode == 0, g.stderr
    assert g.stdout == n.stdout and b"|" in n.stdout and n.stdout.endswith(b"ok\n")
    assert gtree == ntree and f"test-{mode}.db" in ntree


@pytest.mark.parametrize("args", [["wc"], ["sort", "-r"], ["sha256sum"], ["gzip", "-c"]],
                         ids=lambda a: a[0])
def test_busybox_reads_stdin(tmp_path: Path, args: list[str]) -> None:
    _need(BUSYBOX, "busybox-static")
    n = subprocess.run([str(BUSYBOX), *args], input=DATA, capture_output=True, env={},
                       timeout=RUN_TIMEOUT)
    g = subprocess.run([sys.executable, "-m", "dirtyring.cli.main", "run", "--exec",
                        str(BUSYBOX), "--", *args], input=DATA, capture_output=True,
                       timeout=RUN_TIMEOUT)
    assert g.returncode == n.returncode == 0, g.stderr
    assert (g.stdout, g.stderr) == (n.stdout, n.stderr)


@pytest.mark.parametrize("options", [(), ("--tracker", "ring")], ids=["untracked", "tracked"])
def test_a_program_waiting_for_slow_input_keeps_being_checkpointed(
        tmp_path: Path, options: tuple[str, ...]) -> None:
    """Input that trickles in: the guest waits (a little at a time, so epochs go on: a pause
    never waits for input), and gets every byte."""
    _need(BUSYBOX, "busybox-static")
    writer = ("import sys, time\n"
              "for i in range(8):\n"
              "    sys.stdout.write(f'line {i}\\n'); sys.stdout.flush(); time.sleep(0.2)\n")
    w = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE)
    try:
        g = subprocess.run([sys.executable, "-m", "dirtyring.cli.main", "run", "--exec",
                            str(BUSYBOX), "--json", *options, "--", "wc", "-l"],
                           stdin=w.stdout,
                           capture_output=True, timeout=RUN_TIMEOUT)
    finally:
        w.kill()
        w.wait()
    assert g.returncode == 0, g.stderr
    assert g.stdout.split() == [b"8"]
    done = json.loads(g.stderr.splitlines()[-1])
    assert done["tracker"] == ("ring" if options else "none")
    assert done["missed_pages"] == 0 and (done["dirty_pages"] > 0) == bool(options)

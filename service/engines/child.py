"""Compiling a version in a short-lived child process, so the server never restores a SavedModel.

Restoring SavedModels is Python and C++ that holds the GIL for long stretches; done in the
server's own interpreter it stalls the event loop for tens of milliseconds at a time while a new
version loads. The child (`python -m service.engines.child`) loads, checks, freezes and converts
the version (`compile.compile_version`; a format-2 version's `named.compile_named`) and writes the
result to a file; the server only reads
it. A child that crashes, hangs or runs out of memory costs a failed version, not the server.
The child runs at a lower priority, on one TensorFlow thread, and dies with the server.

    python -m service.engines.child VERSION_DIR OUT_FILE PARENT_PID NICENESS
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from service.engines.base import LoadError
from service.engines.compiled import CompiledVersion, NamedCompiled, read_compiled

log = logging.getLogger(__name__)

RESULT_SUFFIX = ".result.json"
STDERR_TAIL_CHARS = 2000
_running: set[subprocess.Popen] = set()
_running_lock = threading.Lock()
_stops = 0  # how many times stop_all ran: a load that began before a stop gives up


# What the child is given of the server's environment: how to find Python, its packages and a
# temporary folder, the locale, and the threading and logging knobs of the numeric libraries.
# Nothing else: the child runs the graphs of the repository, so it must not hold the admin token
# or any other secret the server was started with.
_PASSED_NAMES = {"PATH", "HOME", "TMPDIR", "TEMP", "TMP", "LANG", "LANGUAGE", "TZ", "VIRTUAL_ENV",
                 "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PYTHONIOENCODING"}
_PASSED_PREFIXES = ("LC_", "TF_", "OMP_", "KMP_", "MKL_", "OPENBLAS_", "XLA_FLAGS", "KERAS_BACKEND")


def child_environment() -> dict[str, str]:
    """The environment of a compile child: the server's, less everything not on the list above."""
    env = {k: v for k, v in os.environ.items() if k in _PASSED_NAMES or k.startswith(_PASSED_PREFIXES)}
    package_parent = str(Path(__file__).resolve().parents[2])  # the folder holding `service`
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["CUDA_VISIBLE_DEVICES"] = "-1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))
    return env


class CompileFailed(LoadError):
    """The child refused the version; `category` is the one it reported."""

    def __init__(self, reason: str, category: str = "load"):
        super().__init__(reason)
        self.category = category


def compile_in_child(version_dir: Path, timeout: float, niceness: int = 10,
                     since_stops: int | None = None) -> CompiledVersion | NamedCompiled:
    """The version's CompiledVersion, compiled by a child process; raises CompileFailed with the
    child's reason and category, or with why the child did not finish. With `since_stops`
    (`stops()` when the load began), a server that has begun stopping since starts no child."""
    if since_stops is not None and stops() != since_stops:
        raise CompileFailed("the server is stopping; the version was not compiled")

    with tempfile.TemporaryDirectory(prefix="ensemble-compile-") as work:
        out = Path(work) / "graph.bin"
        stderr_path = Path(work) / "stderr.txt"
        env = child_environment()
        started = time.monotonic()
        with open(stderr_path, "wb") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-m", "service.engines.child", str(version_dir), str(out), str(os.getpid()),
                 str(niceness)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
            with _running_lock:
                _running.add(child)
            try:
                code = child.wait(timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                raise CompileFailed(f"loading took longer than {timeout:.0f} s "
                                    "(ENSEMBLE_LOAD_TIMEOUT_SECONDS); the loading process was killed") from None
            finally:
                with _running_lock:
                    _running.discard(child)
        result_path = out.with_name(out.name + RESULT_SUFFIX)
        if not result_path.exists():
            tail = stderr_path.read_text(errors="replace")[-STDERR_TAIL_CHARS:].strip()
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            raise CompileFailed(f"the loading process {how} without an answer" + (f": {tail}" if tail else ""))
        result = json.loads(result_path.read_text())
        log.info("%s compiled by a child process in %.1f s (its peak resident memory: %.0f MB)",
                 version_dir, time.monotonic() - started, result.get("peak_rss_mb", float("nan")))
        if not result["ok"]:
            raise CompileFailed(result["reason"], result["category"])
        return read_compiled(out)


def stops() -> int:
    """How many times `stop_all` ran in this process; a load that saw it change gives up."""
    return _stops


def stop_all() -> None:
    """Kill every child still compiling (the server is stopping)."""
    global _stops
    with _running_lock:
        _stops += 1
        children = list(_running)
    for child in children:
        child.kill()


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this process when its parent dies; exit now if it already has."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent kills its children on stop
        pass
    if os.getppid() != parent:
        sys.exit(3)


def _yield_the_cpu(niceness: int) -> None:
    """Run only when the server does not need the core: SCHED_IDLE on Linux (a request's thread
    that wakes up takes the core at once, where a merely niced process keeps it for a slice),
    else a lower priority. Threads started later (TensorFlow's) inherit it."""
    os.nice(niceness)
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as exc:
        log.debug("SCHED_IDLE not available: %s", exc)


def _answer(out: Path, result: dict) -> None:
    import resource

    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    path = out.with_name(out.name + RESULT_SUFFIX)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    version_dir, out, parent, niceness = Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3])
    _die_with_parent(parent)
    _yield_the_cpu(niceness)
    from service.engines.tensorflow import configure_threads

    configure_threads(1, 1)
    from service.engines.compile import compile_version
    from contract.manifest import failure_of, read_manifest

    try:
        manifest = read_manifest(version_dir)
        if manifest.format_version == 1:
            compiled = compile_version(manifest, version_dir)
        else:
            from service.engines.named import compile_named

            compiled = compile_named(manifest, version_dir)
    except Exception as exc:  # every refusal goes back to the server with its category
        reason, category = failure_of(exc)
        _answer(out, {"ok": False, "category": category, "reason": reason})
        return 0
    compiled.write(out)
    _answer(out, {"ok": True})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

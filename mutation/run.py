"""The mutation-testing run (`make mutation`, not in CI): mutmut over the modules that decide
answers and versions, in a copy of the committed tree, one mutant at a time.

Each mutant is tried against the fast in-process tests that call the mutated function (mutmut
records which tests call what in a first pass); tests that start a server process are left out,
because what runs in the server is not traced back to a function. The tree is a `git archive` of
HEAD under the work folder (default `.mutation/`, git-ignored), so the working tree is never
mutated. Results per module go to `<work>/results.json` and are printed as a table.

    python mutation/run.py                      # every group, in order
    python mutation/run.py batching codecs      # some groups
    python mutation/run.py --show-survivors     # the diff of every surviving mutant so far
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Per group: what it mutates (paths under service/) and the fast in-process tests that exercise
# it. mutmut runs, per mutant, only those of the group's tests that called the mutated function.
# Each group has its own copy and its own record of which test calls what.
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    # tests/test_answers.py (the real ensemble behind the batcher) is left out: it cost about 10 s
    # a mutant, against well under one for the rest, and the run has to fit in an afternoon.
    "batching": (["service/batching.py"], ["tests/test_batching.py", "tests/test_mutants.py"]),
    # The protocol codecs (both halves of each: JSON and messages) and the HTTP handlers over them.
    "codecs": (["service/protocols/arrays.py", "service/protocols/predict.py", "service/protocols/oip.py",
                "service/protocols/tfs.py", "service/protocols/named.py", "service/edge/rest.py",
                "service/edge/v2.py", "service/answer.py"],
               ["tests/test_codec.py", "tests/test_hostile.py", "tests/test_protocols.py",
                "tests/test_uncertainty_api.py", "tests/test_protocol_messages.py", "tests/test_named_codec.py",
                "tests/test_named_messages.py", "tests/test_mutants.py", "tests/test_mutants_codecs.py"]),
    "repository": (["contract/*.py"],
                   ["tests/test_repository.py", "tests/test_publish.py", "tests/test_tamper.py",
                    "tests/test_mutants.py"]),
    "lifecycle": (["service/lifecycle/*.py"],
                  ["tests/test_admin.py", "tests/test_pacing.py", "tests/test_damaged_pins.py",
                   "tests/test_status_snapshot.py", "tests/test_api.py", "tests/test_mutants.py",
                   "tests/test_mutants_lifecycle.py"]),
    # The engines, on tiny Keras members built once per module (tests/test_mutants_engines.py),
    # and the few existing engine tests that load nothing: the others compile the trained digits
    # ensemble or a format-2 app per mutant (seconds each), or compile in a child process, which
    # mutmut does not trace. The keras_members layers' __init__ are kept out of mutation
    # (`# pragma: no mutate block`): Keras reads their signature, which the trampoline hides.
    # child.py's own side (`main` and its helpers) runs in the compile child in service; the
    # tests call it in process.
    "engines": (["service/engines/*.py"],
                ["tests/test_mutants_engines.py",
                 "tests/test_ensemble.py::test_check_signature_wants_one_input_of_the_right_dtype",
                 "tests/test_ensemble.py::test_check_probabilities_refuses_what_is_not_a_distribution",
                 "tests/test_ensemble.py::test_member_with_other_input_shape_is_refused",
                 "tests/test_ensemble.py::test_missing_member_folder_is_a_load_error",
                 "tests/test_lite.py::test_outputs_are_told_apart_by_shape_and_by_name_when_shapes_tie",
                 "tests/test_frozen.py::test_frozen_graph_file_must_be_one"]),
}
# The gRPC codecs are in service/protocols now, with in-process tests (tests/test_protocol_messages.py).

# Tests in those files that start a server process: mutmut cannot trace what runs in the server
# to a function, so they would only cost time here.
DESELECT = [
    "tests/test_damaged_pins.py::test_a_damaged_pins_file_on_a_real_server_at_start_then_while_it_serves",
]

# What the tests read beside the code (the deployment files they check, the trainer).
ALSO_COPY = ["training/", "deploy/", "docs/", "benchmarks/", "models/", "Dockerfile", "docker-compose.yml",
             "Makefile", "README.md"]

RETRY_TIMEOUT = 30  # seconds for the new tests against one survivor (they pass in a few without it)

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout",
          -11: "segfault", -9: "segfault", None: "not checked"}


def setup_cfg(group: str) -> str:
    """mutmut's configuration for a group's copy (written there, not in the project's pyproject.toml)."""
    def lines(values: list[str]) -> str:
        return "\n" + "\n".join(f"    {v}" for v in values)

    only, tests = GROUPS[group]
    # a test file, or one test of it (file::name)
    selection = [t for t in tests if (ROOT / t.split("::")[0]).exists()] + [
        f"--deselect={d}" for d in DESELECT if d.split("::")[0] in tests]
    return ("[mutmut]\n"
            f"source_paths ={lines(['service', 'contract'])}\n"
            f"only_mutate ={lines(only)}\n"
            f"also_copy ={lines(ALSO_COPY)}\n"
            f"pytest_add_cli_args_test_selection ={lines(selection)}\n"
            f"pytest_add_cli_args ={lines(['-m', 'not slow', '-p', 'no:cacheprovider', '-q'])}\n"
            # TensorFlow and gRPC are not fork-safe once used: fork each mutant from a clean server.
            "process_isolation = forkserver\n"
            # A mutant that hangs a test counts as caught (timeout) after five times (the tests'
            # clean duration plus a second), not mutmut's default fifteen: hung batcher tests
            # otherwise cost a minute each.
            "timeout_multiplier = 5\n"
            "use_git_change_detection = false\n")


def prepare(work: Path, group: str, fresh: bool) -> Path:
    """The copy of HEAD that mutmut works in for a group, with its configuration."""
    tree = work / group
    if fresh and tree.exists():
        shutil.rmtree(tree)
    if not tree.exists():
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
        (tree / ".commit").write_text(head + "\n")
    (tree / "setup.cfg").write_text(setup_cfg(group))
    return tree


def results(tree: Path) -> dict[str, dict]:
    """Per mutated file: mutant name -> status, from mutmut's meta files."""
    out: dict[str, dict] = {}
    for meta in sorted((tree / "mutants").rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        path = str(meta.relative_to(tree / "mutants"))[: -len(".meta")]
        out[path] = {k: STATUS.get(v, "suspicious") for k, v in data.get("exit_code_by_key", {}).items()}
    return out


def table(by_file: dict[str, dict]) -> list[dict]:
    """Counts per file: mutants, killed, survived, timed out, no tests, kill rate."""
    rows = []
    for path, statuses in by_file.items():
        values = list(statuses.values())
        if not values or all(v == "not checked" for v in values):
            continue
        count = {s: values.count(s) for s in set(values)}
        killed = count.get("killed", 0) + count.get("timeout", 0) + count.get("segfault", 0)
        tried = len(values) - count.get("not checked", 0)
        rows.append({"file": path, "mutants": len(values), "killed": count.get("killed", 0),
                     "survived": count.get("survived", 0), "timeout": count.get("timeout", 0),
                     "no tests": count.get("no tests", 0), "not checked": count.get("not checked", 0),
                     "kill rate": round(100 * killed / tried, 1) if tried else None})
    return rows


def retry(tree: Path, by_file: dict[str, dict], tests: list[str], env: dict[str, str]) -> None:
    """Each survivor (or mutant no test of the group called) against `tests` (copied into the
    mutants' tree): recorded as
    killed (exit code 1 in mutmut's meta file) when they fail with it; listed in retried.json."""
    killed_later = json.loads((tree / "retried.json").read_text()) if (tree / "retried.json").exists() else {}
    for test in {t.split("::")[0] for t in tests}:  # a test file, or some tests of it (file::name)
        shutil.copy2(ROOT / test, tree / "mutants" / test)
    # The tests must pass on the unmutated code of this copy (an older commit's, perhaps): a test
    # that fails without any mutant would count every survivor as caught.
    clean = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                           cwd=tree / "mutants", env={**env, "MUTANT_UNDER_TEST": ""}, capture_output=True, text=True)
    if clean.returncode != 0:
        raise SystemExit(f"{' '.join(tests)} do not pass on the unmutated copy ({tree}): fix them, or start the "
                         f"group afresh on HEAD (--fresh)\n{clean.stdout[-2000:]}")
    for path, statuses in by_file.items():
        meta_path = tree / "mutants" / (path + ".meta")
        meta = json.loads(meta_path.read_text())
        for name, status in statuses.items():
            if status not in ("survived", "no tests"):
                continue
            try:
                code = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                       *tests], cwd=tree / "mutants", env={**env, "MUTANT_UNDER_TEST": name},
                                      capture_output=True, timeout=RETRY_TIMEOUT).returncode
            except subprocess.TimeoutExpired:  # a hang is caught, as mutmut counts its timeouts
                code = 1
            print(f"{'killed  ' if code == 1 else 'survived'} {name}", flush=True)
            if code == 1:
                meta["exit_code_by_key"][name] = 1
                killed_later[name] = tests
        meta_path.write_text(json.dumps(meta, indent=4))
    (tree / "retried.json").write_text(json.dumps(killed_later, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("groups", nargs="*", help=f"groups to run, of {', '.join(GROUPS)} (default: all)")
    parser.add_argument("--work", type=Path, default=ROOT / ".mutation", help="work folder (git-ignored)")
    parser.add_argument("--fresh", action="store_true", help="start from a new copy of HEAD, forgetting results")
    parser.add_argument("--show-survivors", action="store_true", help="print the diff of every survivor")
    parser.add_argument("--retry", nargs="+", metavar="TEST",
                        help="after a group's run: its survivors against these test files or tests "
                             "(file::name; new tests for them); each one they fail on is recorded as killed, "
                             "and listed in retried.json")
    args = parser.parse_args()
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {unknown}: choose from {', '.join(GROUPS)}")

    work = args.work.resolve()
    mutmut = str(Path(sys.executable).parent / "mutmut")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           # the session's tiny ensemble is trained once and copied by later sessions (tests/conftest.py)
           "ENSEMBLE_TEST_TRAINED_REPOSITORY": str(work / "trained")}
    by_group: dict[str, dict] = {}
    for group in args.groups or list(GROUPS):
        tree = prepare(work, group, args.fresh)
        if not (args.show_survivors or args.retry):
            started = time.monotonic()
            # No mutant names: mutmut resumes where an interrupted run stopped.
            print(f"== {group}: mutmut run --max-children 1 (in {tree})", flush=True)
            subprocess.run([mutmut, "run", "--max-children", "1"], cwd=tree, env=env)
            print(f"== {group}: {time.monotonic() - started:.0f} s", flush=True)
        by_file = results(tree)
        if args.retry:
            retry(tree, by_file, args.retry, env)
            by_file = results(tree)
        by_group[group] = by_file
        if args.show_survivors:
            for statuses in by_file.values():
                for name, status in statuses.items():
                    if status == "survived":
                        subprocess.run([mutmut, "show", name], cwd=tree, env=env)
    rows = [dict(r, group=group) for group, by_file in by_group.items() for r in table(by_file)]
    (work / "results.json").write_text(json.dumps({"rows": rows, "mutants": by_group}, indent=1))
    print(f"{'file':34} {'mutants':>7} {'killed':>6} {'survived':>8} {'timeout':>7} {'no tests':>8} "
          f"{'unrun':>5} {'rate':>6}")
    for r in rows:
        print(f"{r['file']:34} {r['mutants']:7} {r['killed']:6} {r['survived']:8} {r['timeout']:7} "
              f"{r['no tests']:8} {r['not checked']:5} {r['kill rate']!s:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

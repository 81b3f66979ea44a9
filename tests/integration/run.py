#!/usr/bin/env python3
"""Runs sluice's integration tests against a real binary.

    tests/integration/run.py [--bin PATH] [-k PATTERN]... [-j N] [--list] [-v]

Finds `test_*` functions in `test_*.py` beside this file, runs each in its own process (its own
process group, so a timed-out test and everything it started are killed), with a time limit
(120 s unless the test says otherwise with @harness.timeout). With -j N, N tests run at once,
except that a test marked @harness.alone runs with nothing beside it. Prints one line per test
on stdout:

    PASS module.test_name (1.2s)
    FAIL module.test_name: reason
    SKIP module.test_name: reason

and ends with `N passed, N failed` (`, N skipped` when some were skipped). Details of each
failure (traceback, the daemon's stderr) go to stderr. Exits 1 if any test failed.

The binary comes from --bin, else $SLUICE_BIN, else build/src/daemon/sluice. Test certificates
are made once per run by tests/certs/make-certs in a temporary folder.
"""

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_TIMEOUT = 120


def discover():
    """[(module, function, timeout, alone)] in file order, then definition order."""
    sys.path.insert(0, str(HERE))
    found = []
    for path in sorted(HERE.glob("test_*.py")):
        mod = importlib.import_module(path.stem)
        for name, obj in vars(mod).items():
            if name.startswith("test_") and callable(obj) and getattr(obj, "__module__", None) == mod.__name__:
                found.append((path.stem, name, getattr(obj, "timeout", DEFAULT_TIMEOUT),
                              getattr(obj, "alone", False)))
    return found


def display(module, func):
    return f"{module[len('test_'):]}.{func[len('test_'):]}"


# -- the child side: one test in this process ---------------------------------------------


def run_child(module, func, result_path, limit):
    import faulthandler

    # Dump every thread's stack shortly before the parent kills us, to show where it hung.
    faulthandler.dump_traceback_later(max(1, limit - 3), exit=True)
    sys.path.insert(0, str(HERE))
    import harness

    fn = getattr(importlib.import_module(module), func)
    result = {"status": "pass", "reason": "", "detail": ""}
    t = None
    try:
        t = harness.Context(func)
        fn(t)
    except harness.Skip as e:
        result = {"status": "skip", "reason": str(e) or "skipped", "detail": ""}
    except BaseException as e:  # any failure, including AssertionError and timeouts
        first = (str(e).splitlines() or [type(e).__name__])[0]
        result = {
            "status": "fail",
            "reason": f"{type(e).__name__}: {first}" if not isinstance(e, AssertionError) else first,
            "detail": traceback.format_exc(),
        }
    if t is not None:
        try:
            problems = t.close(test_failed=result["status"] == "fail")
        except BaseException:
            problems = ["teardown crashed:\n" + traceback.format_exc()]
        if problems:
            # A daemon that died explains the test's own failure: say that first.
            reason = problems[0].splitlines()[0]
            detail = "\n".join(problems)
            if result["status"] == "fail":
                detail = detail + "\n--- the test's own failure ---\n" + result["detail"]
            result = {"status": "fail", "reason": reason, "detail": detail}
        elif result["status"] == "fail":
            tails = [d.log_tail() for d in t.daemons if d.proc is not None]
            result["detail"] += "\n".join(tails)
        if result["status"] != "fail":
            t.remove_tmp()
        else:
            result["detail"] += f"\n(test folder kept: {t.tmp})"
    faulthandler.cancel_dump_traceback_later()
    Path(result_path).write_text(json.dumps(result))
    return 0


# -- the parent side ------------------------------------------------------------------------


class Running:
    def __init__(self, module, func, limit, workdir, env, alone=False):
        self.module, self.func, self.limit, self.alone = module, func, limit, alone
        self.name = display(module, func)
        self.result_path = workdir / f"{module}.{func}.json"
        self.log_path = workdir / f"{module}.{func}.log"
        self.log = open(self.log_path, "wb")
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "run.py"), "--child", module, func, str(self.result_path), str(limit)],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def kill_group(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def poll(self):
        """None while running, else (status, reason, detail, seconds)."""
        elapsed = time.monotonic() - self.start
        if self.proc.poll() is None:
            if elapsed < self.limit:
                return None
            self.kill_group()
            self.proc.wait()
            self.log.close()
            return ("fail", f"timed out after {self.limit}s", self.log_path.read_text(errors="replace")[-8000:], elapsed)
        # Whatever the test left behind in its process group goes too.
        self.kill_group()
        self.log.close()
        output = self.log_path.read_text(errors="replace")
        try:
            r = json.loads(self.result_path.read_text())
        except (OSError, ValueError):
            return ("fail", f"test process exited {self.proc.returncode} without a result", output[-8000:], elapsed)
        detail = r["detail"]
        if r["status"] == "fail" and output.strip():
            detail += "\n--- test output ---\n" + output[-4000:]
        return (r["status"], r["reason"], detail, elapsed)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", help="the sluice binary (default: $SLUICE_BIN or build/src/daemon/sluice)")
    ap.add_argument("-k", action="append", default=[], metavar="PATTERN", help="run tests whose name contains PATTERN (repeatable)")
    ap.add_argument("-j", type=int, default=1, metavar="N", help="run N tests at once (default 1)")
    ap.add_argument("--list", action="store_true", help="list the tests and exit")
    ap.add_argument("-v", action="store_true", help="print each test's output, not only failures'")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        module, func, result_path, limit = args.child
        return run_child(module, func, result_path, int(limit))

    tests = discover()
    if args.k:
        tests = [t for t in tests if any(k in display(t[0], t[1]) for k in args.k)]
    if args.list:
        for m, f, lim, solo in tests:
            print(f"{display(m, f)} (limit {lim}s{', alone' if solo else ''})")
        return 0

    binary = args.bin or os.environ.get("SLUICE_BIN") or str(REPO / "build/src/daemon/sluice")
    binary = str(Path(binary).resolve())
    if not os.access(binary, os.X_OK):
        print(f"run.py: no sluice binary at {binary}", file=sys.stderr)
        print("0 passed, 1 failed")
        return 1

    work = Path(tempfile.mkdtemp(prefix="sluice-it-"))
    certs = work / "certs"
    subprocess.run([str(REPO / "tests/certs/make-certs"), str(certs)], check=True)
    env = dict(os.environ, SLUICE_BIN=binary, SLUICE_TEST_CERTS=str(certs), PYTHONDONTWRITEBYTECODE="1")
    print(f"# sluice integration tests: {len(tests)} tests, binary {binary}"
          f"{' (light volumes)' if env.get('SLUICE_TEST_LIGHT') == '1' else ''}", file=sys.stderr)

    counts = {"pass": 0, "fail": 0, "skip": 0}
    queue = list(tests)
    running = []
    start = time.monotonic()
    try:
        while queue or running:
            # Tests start in file order. One marked alone waits for the others to finish, and
            # nothing starts beside it.
            while queue and len(running) < max(1, args.j) and not any(r.alone for r in running):
                m, f, lim, solo = queue[0]
                if solo and running:
                    break
                queue.pop(0)
                running.append(Running(m, f, lim, work, env, solo))
            for r in list(running):
                res = r.poll()
                if res is None:
                    continue
                running.remove(r)
                status, reason, detail, secs = res
                counts[status] += 1
                if status == "pass":
                    print(f"PASS {r.name} ({secs:.1f}s)", flush=True)
                elif status == "skip":
                    print(f"SKIP {r.name}: {reason}", flush=True)
                else:
                    print(f"FAIL {r.name}: {reason} ({secs:.1f}s)", flush=True)
                    print("    " + detail.rstrip().replace("\n", "\n    "), file=sys.stderr, flush=True)
                if args.v and status != "fail":
                    print("    " + r.log_path.read_text(errors="replace").rstrip().replace("\n", "\n    "), file=sys.stderr)
            if running:
                time.sleep(0.02)  # pacing the poll of child processes; results come from files
    except KeyboardInterrupt:
        for r in running:
            r.kill_group()
        raise
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)

    print(f"# integration suite took {time.monotonic() - start:.1f}s", file=sys.stderr)
    summary = f"{counts['pass']} passed, {counts['fail']} failed"
    if counts["skip"]:
        summary += f", {counts['skip']} skipped"
    print(summary, flush=True)
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())

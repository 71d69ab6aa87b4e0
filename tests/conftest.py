import contextlib
import importlib
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the suite runs on the CPU, in this process (run_in_process) and its children


def run_script(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run one of the project's scripts on the CPU, as a user would, and capture what it prints."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", script] if script == "worlds" else [sys.executable, str(ROOT / script)]
    return subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_in_process(script: str, *args: str) -> subprocess.CompletedProcess:
    """A script's entry point called in this process, for what happens before any work (bad flags, bad files): the
    same exit code, stdout and stderr as ``run_script``, without starting Python and importing torch again."""
    module = importlib.import_module(Path(script).stem)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = getattr(module, "cli", module.main)(list(args))
        except SystemExit as exc:
            code = exc.code
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def run():
    return run_script


@pytest.fixture
def run_fast():
    return run_in_process


def interrupted_dry_run(tmp_path_factory, script: str, interrupt_at: int, after_first=None):
    """A script's dry run stopped by --interrupt-at (Ctrl-C's path) and continued with --resume, in a cache that
    every dry run of the session shares (the face world's renders and the dry run's tiny f are made once, and stay
    out of the user's cache). ``after_first(out)``, if given, reads the run between the two commands. Returns out,
    cache, both CompletedProcesses and what after_first returned."""
    cache = tmp_path_factory.getbasetemp() / "shared_cache"
    cache.mkdir(exist_ok=True)
    out = tmp_path_factory.mktemp("runs") / "dry"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AVATAR_REPRO_CACHE", str(cache))
        first = run_script(script, "--dry-run", "--out", str(out), "--interrupt-at", str(interrupt_at))
        between = after_first(out) if after_first is not None and first.returncode == 130 else None
        second = run_script(script, "--resume", str(out))
    return SimpleNamespace(out=out, cache=cache, first=first, second=second, between=between)

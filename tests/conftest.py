import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_script(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run one of the project's scripts on the CPU, as a user would, and capture what it prints."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", script] if script == "worlds" else [sys.executable, str(ROOT / script)]
    return subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def run():
    return run_script


def interrupted_dry_run(tmp_path_factory, script: str, interrupt_at: int, after_first=None):
    """A script's dry run stopped by --interrupt-at (Ctrl-C's path) and continued with --resume, in a cache of its own
    (the dry run's tiny f and renders stay out of the user's cache). ``after_first(out)``, if given, reads the run
    between the two commands. Returns out, cache, both CompletedProcesses and what after_first returned."""
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("runs") / "dry"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AVATAR_REPRO_CACHE", str(cache))
        first = run_script(script, "--dry-run", "--out", str(out), "--interrupt-at", str(interrupt_at))
        between = after_first(out) if after_first is not None and first.returncode == 130 else None
        second = run_script(script, "--resume", str(out))
    return SimpleNamespace(out=out, cache=cache, first=first, second=second, between=between)

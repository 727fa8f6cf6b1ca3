"""Keras Tuner's chief/worker mode: one chief and two workers as processes on loopback."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from contract.manifest import read_manifest
from tests.conftest import free_port

pytestmark = pytest.mark.slow


def test_chief_and_two_workers_finish_a_search_and_the_chief_publishes(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    np.savez(tmp_path / "v.npz", x=(rng.normal(size=(120, 5)) + 2 * y[:, None]).astype("float32"), y=y)
    args = [sys.executable, "-m", "training.cli", "--data", str(tmp_path / "v.npz"), "--name", "dist",
            "--repository", str(tmp_path / "models"), "--work-dir", str(tmp_path / "work"),
            "--tuner", "random", "--max-trials", "4", "--max-epochs", "2",
            "--members", "tuned:2", "--epochs", "2", "--patience", "1", "--weights", "uniform"]
    env = {**os.environ, "KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(free_port())}
    procs = {
        tuner_id: subprocess.Popen(args, env={**env, "KERASTUNER_TUNER_ID": tuner_id},
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for tuner_id in ("chief", "tuner0", "tuner1")
    }
    outputs = {}
    try:
        for tuner_id, proc in procs.items():
            outputs[tuner_id] = proc.communicate(timeout=600)[0]
    finally:
        for proc in procs.values():
            proc.kill()
    for tuner_id, proc in procs.items():
        assert proc.returncode == 0, f"{tuner_id} failed:\n{outputs[tuner_id][-3000:]}"
    trials = {t: outputs[t].count("[tune] trial") for t in ("tuner0", "tuner1")}
    assert sum(trials.values()) == 4 and all(n >= 1 for n in trials.values()), trials
    assert "this worker is done" in outputs["tuner0"] and "this worker is done" in outputs["tuner1"]
    assert "[publish] dist version 1" in outputs["chief"]
    manifest = read_manifest(tmp_path / "models" / "dist" / "1")
    assert [m.kind for m in manifest.members] == ["tuned", "tuned"]

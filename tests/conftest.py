"""Session fixtures: one tiny ensemble trained for real, shared by every test that needs one."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# All four kinds of member, trained for a few epochs: 5 members from 4 runs.
TINY_MEMBERS = {"tuned": 1, "seed": 1, "snapshot": 2, "swa": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def trained_repository(tmp_path_factory) -> Path:
    """A repository holding digits/1: five members of all four kinds, trained on the built-in
    digits in seconds, calibrated (the default), with an abstention threshold."""
    from training.members import MemberOptions
    from training.pipeline import TrainConfig, train_ensemble
    from training.tune import SearchBudget

    root = tmp_path_factory.mktemp("repo")
    # The mutation run (mutation/run.py) starts a pytest session per mutant: it names a folder
    # where the first session's ensemble is kept, and later sessions copy it instead of training.
    kept = os.environ.get("ENSEMBLE_TEST_TRAINED_REPOSITORY")
    if kept and (Path(kept) / "digits" / "1" / "manifest.json").is_file():
        shutil.copytree(kept, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".work", ".state"))
        return root
    config = TrainConfig(
        data="digits", name="digits", repository=root, work_dir=tmp_path_factory.mktemp("work"),
        budget=SearchBudget(max_epochs=2, factor=2), members=TINY_MEMBERS,
        member_options=MemberOptions(epochs=3, patience=2, snapshot_epochs_per_cycle=2, swa_epochs=3),
        weighting="uniform",  # all five members kept, whatever the bootstrap says of minutes-old members
    )
    train_ensemble(config, report=lambda line: None)
    if kept:
        shutil.copytree(root, kept, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".work", ".state"))
    return root


@pytest.fixture()
def repository(trained_repository, tmp_path) -> Path:
    """A private copy of the trained repository that a test may change."""
    root = tmp_path / "models"
    shutil.copytree(trained_repository, root, ignore=shutil.ignore_patterns(".work"))
    return root


@pytest.fixture()
def client(repository):
    """The app over a private copy of the trained repository, through its lifespan (TestClient);
    `.metrics` is the app's metrics object."""
    from tests.test_api import make_client

    c, metrics = make_client(repository)
    with c:
        c.metrics = metrics
        yield c


@pytest.fixture(scope="session")
def digits_test_split():
    """The held-out split the fixture ensemble was evaluated on (same data, same seed)."""
    from training.data import DigitsSource, split

    return split(DigitsSource().load(), seed=0).test

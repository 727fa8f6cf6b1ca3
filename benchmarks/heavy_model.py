"""The "heavy" ensemble of the benchmark: 10 convolutional Keras 3 members on 32x32x3 float32
inputs (CIFAR-sized), with random weights, published through the product's own import path.

Speed does not depend on what the weights learned, so the members are never trained; each gets
its own seed, so they are different models that the ensemble really has to run one by one.

    python benchmarks/heavy_model.py --repository /tmp/heavy-models [--name heavy] [--members 10]

`publish_heavy` is what benchmarks/bench.py calls; the members are written as `.keras` files to
a temporary folder and published with `ensemble-train import` in a subprocess, exactly as a
user would publish members made elsewhere. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INPUT_SHAPE = (32, 32, 3)
CLASSES = 10
MEMBERS = 10


def build_member(seed: int):
    """One member: three convolutional blocks, global average pooling and a softmax, with the
    random initial weights of `seed`."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(INPUT_SHAPE, dtype="float32", name="instances")
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(CLASSES, activation="softmax")(x)
    return keras.Model(inputs, outputs, name=f"heavy_{seed}")


def write_members(folder: Path, members: int = MEMBERS, seed: int = 0) -> list[Path]:
    """Build `members` members (seeds seed, seed+1, ...) and save each as a `.keras` file in
    `folder`; their paths."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(members):
        path = folder / f"heavy-{seed + i}.keras"
        build_member(seed + i).save(path)
        paths.append(path)
    return paths


def ensemble_train() -> str:
    """The venv's `ensemble-train` (the console script beside this interpreter)."""
    beside = Path(sys.executable).parent / "ensemble-train"
    if beside.exists():
        return str(beside)
    venv = ROOT / ".venv" / "bin" / "ensemble-train"
    if venv.exists():
        return str(venv)
    found = shutil.which("ensemble-train")
    if found is None:
        raise FileNotFoundError("ensemble-train is not installed: run `pip install -e .` in the venv")
    return found


def import_command(repository: Path, name: str, paths: list[Path], classes: list[str] | None = None) -> list[str]:
    """The `ensemble-train import` command line that publishes `paths` (`.keras` files or
    SavedModel folders) as a new version of `name`; without `classes` the labels are 0, 1, ...
    in the members' output order."""
    labels = ["--classes", ",".join(classes)] if classes else []
    return [ensemble_train(), "import", "--name", name, "--repository", str(repository), *labels, *map(str, paths)]


def run_import(repository: Path, name: str, paths: list[Path], classes: list[str] | None = None) -> float:
    """Publish `paths` with `ensemble-train import`; the seconds it took. Raises with the
    command's output if it fails."""
    started = time.perf_counter()
    done = subprocess.run(import_command(repository, name, paths, classes), capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"ensemble-train import failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds


def publish_heavy(repository: Path, name: str = "heavy", members: int = MEMBERS, seed: int = 0) -> float:
    """Build the heavy members in a temporary folder and publish them as a new version of `name`
    in `repository` through `ensemble-train import`; the seconds the import took (building the
    members is not counted)."""
    work = Path(tempfile.mkdtemp(prefix="heavy-members-"))
    try:
        return run_import(repository, name, write_members(work, members, seed))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, required=True, help="model repository to publish into")
    p.add_argument("--name", default="heavy", help="ensemble name. Default: heavy")
    p.add_argument("--members", type=int, default=MEMBERS, help=f"Default: {MEMBERS}")
    p.add_argument("--seed", type=int, default=0, help="seed of the first member. Default: 0")
    args = p.parse_args()
    seconds = publish_heavy(args.repository, args.name, args.members, args.seed)
    print(f"published {args.name} ({args.members} members) into {args.repository} in {seconds:.1f} s "
          "(ensemble-train import)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""From a verified version folder to a warmed, servable ensemble: the server's loader.

The version is compiled into its frozen graph and TensorFlow Lite model (`compile`): in a child
process (`child`) with `isolated_loading`, else in this process; from the compile cache
(`compiled.CompileCache`) when it was compiled before, here or by another worker. Then one
engine of it is loaded and warmed up: TensorFlow Lite when the version has a model for it and
`engine` is "tflite", else the frozen graph on TensorFlow. TensorFlow is imported only for a
version that runs on it (or is compiled in this process): a server whose versions all run on
TensorFlow Lite never imports it.

The manager calls the loader from its loading thread, after it has checked the version's files
against the manifest. A check of a folder followed by a load of that folder by its path lets a
writer swap files in between, so a version is never compiled from the repository: the loader
copies it into a private folder of its own, checking every byte against the manifest as it
copies (`verified_copy`), and compiles that copy; the cache keeps the result under that manifest.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, NamedTuple

from service.config import Settings
from service.engines.base import Ensemble, LoadError
from service.engines.child import compile_in_child, stops
from service.engines.compiled import CompileCache, CompiledVersion, NamedCompiled
from contract.held_folders import held_folder, remove_abandoned
from contract.integrity import verify_checksums
from contract.manifest import Manifest

log = logging.getLogger(__name__)

COPY_PREFIX = "ensemble-verified-"
# A copy whose server is gone (killed while compiling) is removed by the next compile this old.
ABANDONED_COPY_SECONDS = 60.0


class ThreadPlan(NamedTuple):
    """How many batches compute at once (inference threads), and the threads of each: TensorFlow
    Lite's or TensorFlow's intra-op threads, TensorFlow's inter-op threads."""

    inference_threads: int
    intra_op: int
    inter_op: int


def thread_plan(batch_threads: int, intra: int, inter: int, workers: int, cores: int) -> ThreadPlan:
    """The plan for settings where 0 means automatic.

    Automatic: one batch computes at a time, on all of the worker's cores, with one inter-op
    thread. With TensorFlow Lite and one-row requests the model is not what limits a process:
    its event loop is, and every batch needs the interpreter lock twice in its thread (to take
    the batch, to hand back the outputs), so a second inference thread only adds waits for the
    lock (docs/performance.md has the measurements)."""
    share = max(1, cores // workers)
    batch_threads = batch_threads or 1
    return ThreadPlan(batch_threads, intra or max(1, share // batch_threads), inter or batch_threads)


def plan_of(settings: Settings, cores: int) -> ThreadPlan:
    """The thread plan of a server's settings on `cores` cores."""
    return thread_plan(settings.inference_threads, settings.intra_op_threads, settings.inter_op_threads,
                       settings.workers, cores)


class EngineLoader:
    """Loads a version as the settings say: (manifest, folder, pace) -> warmed Ensemble, or a
    LoadError (with its category) that says why not. `pace` is called between steps, so the
    caller can keep loading to a share of the CPU."""

    def __init__(self, settings: Settings, threads: ThreadPlan):
        self.settings, self.threads = settings, threads
        folder = settings.compile_cache_dir or (settings.state_dir / "compiled" if settings.state_dir else None)
        self.cache = CompileCache(folder) if folder is not None else None

    def __call__(self, manifest: Manifest, path: Path, pace: Callable[[], None]) -> Ensemble:
        if manifest.format_version == 2:  # named inputs, heads with tasks: service.engines.named
            return self.named(manifest, path, pace)
        compiled = self.compiled(manifest, path, pace)
        settings, threads = self.settings, self.threads
        if settings.engine == "tflite" and compiled.lite is not None:
            from service.engines.lite import load_lite

            try:
                return load_lite(manifest, path, compiled.lite, settings.warmup_batch_sizes, pace,
                                 threads=threads.intra_op, pool=threads.inference_threads)
            except LoadError as exc:  # the frozen graph was checked on its own: it can still serve
                log.warning("%s version %d runs on TensorFlow: its TensorFlow Lite model failed: %s",
                            manifest.name, manifest.version, exc)
        from service.engines.tensorflow import configure_threads, import_frozen

        configure_threads(threads.intra_op, threads.inter_op)
        return import_frozen(manifest, path, compiled.frozen, settings.warmup_batch_sizes, pace)

    def named(self, manifest: Manifest, path: Path, pace: Callable[[], None]) -> Ensemble:
        """A format-2 version: compiled as a format-1 version is (in the child, or from the
        cache), then on TensorFlow Lite when it converted (no SavedModel restored here), else
        its members loaded here on TensorFlow from a verified private copy."""
        compiled = self.compiled(manifest, path, pace)
        settings, threads = self.settings, self.threads
        if settings.engine == "tflite" and compiled.lite is not None:
            from service.engines.lite import load_named_lite

            try:
                ensemble = load_named_lite(manifest, path, compiled.lite, settings.warmup_batch_sizes, pace,
                                           threads=threads.intra_op, pool=threads.inference_threads)
            except LoadError as exc:
                log.warning("%s version %d runs on TensorFlow: its TensorFlow Lite model failed: %s",
                            manifest.name, manifest.version, exc)
            else:
                log.info("%s version %d runs on TensorFlow Lite: it converts and answers as its members do",
                         manifest.name, manifest.version)
                return ensemble
        else:
            log.info("%s version %d runs on TensorFlow: %s", manifest.name, manifest.version,
                     compiled.reason or f"the engine setting is {settings.engine}")
        from service.engines.named import load_named
        from service.engines.tensorflow import configure_threads

        configure_threads(threads.intra_op, threads.inter_op)
        with verified_copy(manifest, path) as copy:  # what is loaded is what was verified
            return load_named(manifest, copy, settings.warmup_batch_sizes, pace)

    def compiled(self, manifest: Manifest, path: Path, pace: Callable[[], None]) -> CompiledVersion | NamedCompiled:
        """The version's compilation: from the cache, or compiled now from a verified private copy
        of `path` (and cached). Workers share the cache: one compiles a new version, the others
        wait and read it."""
        began = stops()  # the server stopping after this (child.stop_all) abandons the load

        def compile_it() -> CompiledVersion:
            with verified_copy(manifest, path) as copy:
                pace()
                if self.settings.isolated_loading:
                    return compile_in_child(copy, self.settings.load_timeout_seconds, since_stops=began)
                from service.engines import compile as compiling
                from service.engines.tensorflow import configure_threads

                configure_threads(self.threads.intra_op, self.threads.inter_op)
                if manifest.format_version == 2:
                    from service.engines.named import compile_named

                    return compile_named(manifest, copy, pace)
                return compiling.compile_version(manifest, copy, pace)

        if self.cache is None:
            return compile_it()
        return self.cache.get_or_compile(manifest, compile_it, self.settings.load_timeout_seconds,
                                         give_up=lambda: stops() != began)


@contextmanager
def verified_copy(manifest: Manifest, path: Path) -> Iterator[Path]:
    """A copy of the version at `path`, in a folder of this process's own under the temporary
    folder, every file checked against `manifest` as it is copied (ChecksumError if the folder
    no longer matches it); removed when the block ends. Copies left by a server that was killed
    are removed here, once their lock is free."""
    parent = Path(tempfile.gettempdir())
    remove_abandoned(parent, COPY_PREFIX, ABANDONED_COPY_SECONDS)
    with ExitStack() as held:
        try:
            work = held.enter_context(held_folder(parent, COPY_PREFIX))
            copy = work / manifest.name / str(manifest.version)  # the layout read_manifest checks
            verify_checksums(path, manifest, copy_into=copy)
        except OSError as exc:  # the copy's own disk: the version's faults are ChecksumErrors
            raise LoadError(f"cannot copy {path} into a private folder under {parent} to compile it: "
                            f"{exc}") from None
        yield copy

"""Loading megatron-core's ``indexed_dataset`` module (the ``.bin/.idx`` writer) without paying for torch.

Owns :func:`import_indexed_dataset`, :func:`load_without_torch` and :class:`BackgroundImport`.

The outputs are written by megatron-core's own ``IndexedDatasetBuilder`` so the format cannot drift from what
``GPTDataset`` reads. Importing it the ordinary way runs ``megatron/core/__init__.py`` (all of megatron-core:
tensor-parallel layers, optimizers, Transformer Engine probing) and torch: ~5-12 s of CPU on a 2-core box, as
much as tokenizing the whole 31 MB benchmark corpus. Writing files needs none of it: at import time the module
uses torch only for type annotations and as the base class of the *reader*, and ``megatron.core.utils`` only
for ``log_single_rank``.

:func:`load_without_torch` therefore executes megatron-core 0.16.1's ``datasets/indexed_dataset.py`` source
file (and the real ``msc_utils.py`` / ``object_storage_utils.py`` it imports) as a private module whose
imports of ``torch`` and ``megatron.core.utils`` resolve to small stand-ins (a ``Tensor`` name for
annotations, a ``Dataset`` base class, ``log_single_rank`` via ``logging``). The writer classes
(``IndexedDatasetBuilder``, ``_IndexWriter``, ``DType``) are megatron-core's code, unchanged; the private modules
are registered under private names (``betterai_megatron.data.preprocess._mcore_*``), never a megatron one, so a
later real import is unaffected. Any surprise (another
megatron-core version importing something else) falls back to the ordinary import. A test checks the bytes it
writes against the ordinarily imported builder.

:class:`BackgroundImport` runs the loading on a thread so that the ordinary-import fallback overlaps the
workers' tokenizing instead of preceding it.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import logging
import os
import sys
import threading
import types
import warnings

MODULE = "megatron.core.datasets.indexed_dataset"
PRIVATE_PREFIX = "betterai_megatron.data.preprocess._mcore_"


class _TorchStandIn(types.ModuleType):
    """What indexed_dataset.py touches of torch at import time: annotation names and a reader base class."""

    class Tensor:  # only ever used in annotations by the writer
        pass

    def __init__(self) -> None:
        super().__init__("torch")

        class Dataset:  # base class of megatron-core's IndexedDataset (the reader, unused here)
            pass

        self.utils = types.SimpleNamespace(data=types.SimpleNamespace(Dataset=Dataset))
        self.distributed = types.SimpleNamespace(is_initialized=lambda: False)


def _log_single_rank(logger: logging.Logger, *args, rank: int = 0, **kwargs) -> None:
    logger.log(*args, **kwargs)  # a preprocessing process is a single rank


def _exec_source(path: str, name: str, stand_ins: dict) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = path

    def guarded_import(target, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and target in stand_ins:
            return stand_ins[target]
        return builtins.__import__(target, globals, locals, fromlist, level)

    module.__dict__["__builtins__"] = dict(vars(builtins), __import__=guarded_import)
    sys.modules[name] = module  # dataclasses and pickling look a class's module up by name
    try:
        with open(path, encoding="utf-8") as handle:
            exec(compile(handle.read(), path, "exec"), module.__dict__)  # noqa: S102 - megatron-core's own file
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_without_torch() -> types.ModuleType:
    """megatron-core's ``indexed_dataset.py`` executed with torch and ``megatron.core.utils`` stand-ins."""
    spec = importlib.util.find_spec("megatron.core")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("megatron-core is not installed (pip install megatron-core==0.16.1)")
    root = spec.submodule_search_locations[0]
    stand_ins: dict = {"torch": _TorchStandIn(),
                       "megatron.core.utils": types.SimpleNamespace(log_single_rank=_log_single_rank)}
    stand_ins["megatron.core.msc_utils"] = _exec_source(
        os.path.join(root, "msc_utils.py"), PRIVATE_PREFIX + "msc_utils", stand_ins)
    stand_ins["megatron.core.datasets.object_storage_utils"] = _exec_source(
        os.path.join(root, "datasets", "object_storage_utils.py"), PRIVATE_PREFIX + "object_storage_utils",
        stand_ins)
    return _exec_source(os.path.join(root, "datasets", "indexed_dataset.py"),
                        PRIVATE_PREFIX + "indexed_dataset", stand_ins)


def import_indexed_dataset(*, without_torch: bool = False):
    """megatron-core's ``indexed_dataset`` module.

    Default: the ordinary import. With ``without_torch`` (a process that only preprocesses): the already
    imported module if any, else :func:`load_without_torch` when torch is not loaded yet, else the ordinary
    import with ``megatron/core/__init__.py`` skipped (afterwards a later-imported ``megatron.core`` lacks the
    attribute ``datasets``; ``from ... import`` still works).
    """
    if MODULE in sys.modules:
        return sys.modules[MODULE]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core warns that TE/Apex are absent; irrelevant to writing files
        if not without_torch or "megatron.core" in sys.modules:
            return importlib.import_module(MODULE)
        if "torch" not in sys.modules:
            try:
                return load_without_torch()
            except (ImportError, AttributeError, NameError, TypeError, OSError) as error:
                logging.getLogger(__name__).warning("torch-free load of %s failed (%s); importing it", MODULE,
                                                    error)
        spec = importlib.util.find_spec("megatron.core")
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError("megatron-core is not installed (pip install megatron-core==0.16.1)")
        placeholder = importlib.util.module_from_spec(spec)
        sys.modules["megatron.core"] = placeholder
        try:
            # megatron.core.utils and parallel_state import each other; the real __init__ resolves the cycle by
            # importing parallel_state first, so do the same.
            importlib.import_module("megatron.core.parallel_state")
            return importlib.import_module(MODULE)
        finally:
            if sys.modules.get("megatron.core") is placeholder:
                del sys.modules["megatron.core"]


class BackgroundImport:
    """Runs :func:`import_indexed_dataset` on a daemon thread; :meth:`result` waits for it."""

    def __init__(self, *, without_torch: bool = False) -> None:
        self._without_torch = without_torch
        self._module = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="import-indexed-dataset", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._module = import_indexed_dataset(without_torch=self._without_torch)
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread by result()
            self._error = error

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._module

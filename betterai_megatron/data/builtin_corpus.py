"""The built-in pretraining corpus: the CPython standard library sources of the running interpreter.

Owns :func:`write_builtin_corpus`, which writes one jsonl document per ``.py`` file of the interpreter's
standard library (``{"text": ..., "lang": "python", "path": "<relative path>"}``), in sorted path order so
the same interpreter always yields the same bytes. It needs no download, so the CPU demo and CI can train a
tokenizer and preprocess real code (~1,800 files, ~31 MB on CPython 3.11). ``max_files``/``max_bytes`` keep a
demo small. Files are decoded the way Python itself decodes source (PEP 263 coding cookie, via
:func:`tokenize.detect_encoding`); the few test files that are deliberately undecodable are skipped.
"""

from __future__ import annotations

import io
import json
import os
import sysconfig
import tokenize
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class BuiltinCorpusConfig:
    """Which stdlib files go into the built-in corpus."""

    max_files: int | None = None  # stop after this many documents (None: all)
    max_bytes: int | None = None  # stop before the UTF-8 text would exceed this many bytes (None: no cap)
    include_tests: bool = True  # the ``test``/``tests`` packages are half the stdlib's code
    stdlib_dir: str | None = None  # defaults to the running interpreter's stdlib


@dataclass
class CorpusStats:
    """What :func:`write_builtin_corpus` wrote."""

    documents: int = 0
    text_bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # relative paths that could not be decoded


def stdlib_dir() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(*, root: Path | None = None, include_tests: bool = True) -> list[Path]:
    """Sorted ``.py`` files under the stdlib, excluding installed third-party packages (site-packages)."""
    root = Path(root) if root is not None else stdlib_dir()
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or "dist-packages" in parts:
            continue
        if not include_tests and ("test" in parts or "tests" in parts):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_python_source(path: Path) -> str | None:
    """Source text decoded per its coding cookie; None when undecodable (or when it holds lone surrogates)."""
    raw = path.read_bytes()
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        text = raw.decode(encoding)
        text.encode("utf-8")  # a document must round-trip through UTF-8 jsonl
    except (SyntaxError, LookupError, UnicodeError):
        return None
    return text.removeprefix("\ufeff")


def write_builtin_corpus(output_path: str | os.PathLike, *, config: BuiltinCorpusConfig | None = None) -> CorpusStats:
    """Write the stdlib corpus as jsonl to ``output_path`` (atomically: temp file, then rename)."""
    config = config or BuiltinCorpusConfig()
    root = Path(config.stdlib_dir) if config.stdlib_dir else stdlib_dir()
    stats = CorpusStats()
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = output_path.with_name(output_path.name + ".tmp")
    with open(tmp_path, "w", encoding="utf-8") as out:
        for path in stdlib_source_files(root=root, include_tests=config.include_tests):
            if config.max_files is not None and stats.documents >= config.max_files:
                break
            relative = path.relative_to(root).as_posix()
            text = read_python_source(path)
            if text is None:
                stats.skipped.append(relative)
                continue
            size = len(text.encode("utf-8"))
            if config.max_bytes is not None and stats.text_bytes + size > config.max_bytes:
                break
            out.write(json.dumps({"text": text, "lang": "python", "path": relative}, ensure_ascii=False) + "\n")
            stats.documents += 1
            stats.text_bytes += size
    os.replace(tmp_path, output_path)
    return stats


def main(argv: list[str] | None = None) -> int:
    """``python -m betterai_megatron.data.builtin_corpus OUT.jsonl [--max-files N] [--max-bytes B]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="jsonl file to write")
    parser.add_argument("--max-files", type=int, default=None)
    parser.add_argument("--max-bytes", type=int, default=None)
    parser.add_argument("--no-tests", action="store_true", help="leave out the stdlib's test packages")
    args = parser.parse_args(argv)
    stats = write_builtin_corpus(
        args.output,
        config=BuiltinCorpusConfig(max_files=args.max_files, max_bytes=args.max_bytes, include_tests=not args.no_tests),
    )
    print(f"wrote {stats.documents} documents, {stats.text_bytes / 1e6:.1f} MB to {args.output}"
          f" ({len(stats.skipped)} undecodable files skipped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Programming languages: canonical names, stable integer ids, file-extension and alias lookup.

Owns the one table every data component agrees on:

- :data:`LANGUAGES` — canonical lower-case language names; a language's id is its index. Id 0 is
  ``"unknown"``. The order is append-only: ids are written beside preprocessed ``.bin/.idx`` files
  (``{bin_prefix}.lang.npy``) and must mean the same thing in every later run, so new languages go at the end.
- :func:`language_from_path` — the language of a source file from its extension or file name (source trees,
  ``--input-dir``).
- :func:`normalize_language` — maps the labels found in corpora (The Stack's ``lang`` = ``"C++"``,
  ``"Jupyter Notebook"``; Magicoder's ``lang`` = ``"csharp"``; markdown fence tags ``"py"``) to canonical names.
- :func:`read_document_languages` — reads the per-document language ids written by the preprocessor.

Hand-written because no maintained library offers a small, dependency-free, stable id table (linguist and
pygments map extensions, but neither promises ids that never move).
"""

from __future__ import annotations

import os
import re

# Append-only: a language's id is its position. Never reorder or remove an entry.
LANGUAGES: tuple[str, ...] = (
    "unknown",
    "python", "javascript", "typescript", "java", "c", "cpp", "csharp", "go", "rust", "ruby",
    "php", "shell", "kotlin", "swift", "scala", "lua", "perl", "r", "julia", "haskell",
    "sql", "html", "css", "markdown", "json", "yaml", "toml", "xml", "dockerfile", "makefile",
    "cmake", "objective-c", "dart", "elixir", "erlang", "clojure", "ocaml", "fsharp", "fortran",
    "matlab", "powershell", "batchfile", "assembly", "cuda", "verilog", "vhdl", "zig", "nim",
    "groovy", "visual-basic", "pascal", "prolog", "scheme", "racket", "common-lisp", "emacs-lisp",
    "tex", "restructuredtext", "jupyter-notebook", "protocol-buffer", "graphql", "solidity",
    "vue", "svelte", "text",
)

LANGUAGE_IDS: dict[str, int] = {name: index for index, name in enumerate(LANGUAGES)}
UNKNOWN_LANGUAGE = "unknown"

_EXTENSIONS: dict[str, str] = {
    ".py": "python", ".pyi": "python", ".pyw": "python", ".pyx": "python",
    ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".ts": "typescript", ".tsx": "typescript", ".mts": "typescript", ".cts": "typescript",
    ".java": "java",
    ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".c++": "cpp", ".hpp": "cpp", ".hh": "cpp", ".hxx": "cpp",
    ".h++": "cpp", ".ipp": "cpp", ".inl": "cpp",
    ".cs": "csharp", ".go": "go", ".rs": "rust", ".rb": "ruby", ".php": "php",
    ".sh": "shell", ".bash": "shell", ".zsh": "shell", ".ksh": "shell", ".fish": "shell",
    ".kt": "kotlin", ".kts": "kotlin", ".swift": "swift", ".scala": "scala", ".sc": "scala",
    ".lua": "lua", ".pl": "perl", ".pm": "perl", ".r": "r", ".jl": "julia", ".hs": "haskell",
    ".lhs": "haskell", ".sql": "sql", ".html": "html", ".htm": "html", ".css": "css", ".scss": "css",
    ".md": "markdown", ".markdown": "markdown", ".json": "json", ".yaml": "yaml", ".yml": "yaml",
    ".toml": "toml", ".xml": "xml", ".cmake": "cmake", ".m": "objective-c", ".mm": "objective-c",
    ".dart": "dart", ".ex": "elixir", ".exs": "elixir", ".erl": "erlang", ".hrl": "erlang",
    ".clj": "clojure", ".cljs": "clojure", ".cljc": "clojure", ".ml": "ocaml", ".mli": "ocaml",
    ".fs": "fsharp", ".fsi": "fsharp", ".fsx": "fsharp", ".f": "fortran", ".f90": "fortran",
    ".f95": "fortran", ".ps1": "powershell", ".psm1": "powershell", ".bat": "batchfile",
    ".cmd": "batchfile", ".asm": "assembly", ".s": "assembly", ".cu": "cuda", ".cuh": "cuda",
    ".v": "verilog", ".sv": "verilog", ".vhd": "vhdl", ".vhdl": "vhdl", ".zig": "zig", ".nim": "nim",
    ".groovy": "groovy", ".gradle": "groovy", ".vb": "visual-basic", ".pas": "pascal",
    ".pro": "prolog", ".scm": "scheme", ".ss": "scheme", ".rkt": "racket", ".lisp": "common-lisp",
    ".lsp": "common-lisp", ".el": "emacs-lisp", ".tex": "tex", ".rst": "restructuredtext",
    ".ipynb": "jupyter-notebook", ".proto": "protocol-buffer", ".graphql": "graphql", ".gql": "graphql",
    ".sol": "solidity", ".vue": "vue", ".svelte": "svelte", ".txt": "text",
}

_FILE_NAMES: dict[str, str] = {
    "dockerfile": "dockerfile", "makefile": "makefile", "gnumakefile": "makefile",
    "cmakelists.txt": "cmake", "rakefile": "ruby", "gemfile": "ruby", "build": "python",
}

# Labels seen in corpora that are not a canonical name once lower-cased.
_ALIASES: dict[str, str] = {
    "py": "python", "python3": "python", "js": "javascript", "node": "javascript", "ts": "typescript",
    "c++": "cpp", "cplusplus": "cpp", "cxx": "cpp", "c#": "csharp", "cs": "csharp", "golang": "go",
    "rs": "rust", "rb": "ruby", "sh": "shell", "bash": "shell", "zsh": "shell", "console": "shell",
    "kt": "kotlin", "jl": "julia", "hs": "haskell", "md": "markdown", "yml": "yaml",
    "objective-c++": "objective-c", "objc": "objective-c", "objectivec": "objective-c",
    "f#": "fsharp", "ps1": "powershell", "batch": "batchfile", "bat": "batchfile", "asm": "assembly",
    "systemverilog": "verilog", "vb": "visual-basic", "vb.net": "visual-basic", "visual basic": "visual-basic",
    "lisp": "common-lisp", "elisp": "emacs-lisp", "emacs lisp": "emacs-lisp", "latex": "tex",
    "rst": "restructuredtext", "jupyter notebook": "jupyter-notebook", "ipynb": "jupyter-notebook",
    "protobuf": "protocol-buffer", "protocol buffer": "protocol-buffer", "docker": "dockerfile",
    "make": "makefile", "plaintext": "text", "txt": "text", "plain": "text", "postgresql": "sql",
    "mysql": "sql", "tsx": "typescript", "jsx": "javascript", "fortran free form": "fortran",
}


def normalize_language(label: str | None) -> str:
    """Canonical name for a corpus label (``"C++"`` -> ``"cpp"``); ``"unknown"`` for None, empty or unknown labels."""
    if not label or not isinstance(label, str):
        return UNKNOWN_LANGUAGE
    key = label.strip().lower()
    if key in LANGUAGE_IDS:
        return key
    key = _ALIASES.get(key, key.replace(" ", "-"))
    return key if key in LANGUAGE_IDS else UNKNOWN_LANGUAGE


def language_from_path(path: str | os.PathLike) -> str:
    """Language of a source file from its file name or extension; ``"unknown"`` when neither is known."""
    name = os.path.basename(os.fspath(path)).lower()
    if name in _FILE_NAMES:
        return _FILE_NAMES[name]
    return _EXTENSIONS.get(os.path.splitext(name)[1], UNKNOWN_LANGUAGE)


def known_extensions() -> dict[str, str]:
    """A copy of the extension -> language table (``".py"`` -> ``"python"``)."""
    return dict(_EXTENSIONS)


def language_id(name: str) -> int:
    """Stable integer id of a canonical language name (0 for ``"unknown"``)."""
    return LANGUAGE_IDS[normalize_language(name)]


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+#.\-]+)")


def language_from_markdown(text: str) -> str:
    """Language of the first fenced code block (```` ```python ````) in chat or instruction text."""
    match = _FENCE.search(text) if isinstance(text, str) else None
    return normalize_language(match.group(1)) if match else UNKNOWN_LANGUAGE


def parse_language_list(spec: str | list[str] | tuple[str, ...] | None) -> frozenset[str] | None:
    """``"python,c++"`` -> ``{"python", "cpp"}``; None when no choice was made. Unknown names are an error."""
    if spec is None:
        return None
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen: set[str] = set()
    for item in (part.strip() for part in items):
        if not item:
            continue
        name = normalize_language(item)
        if name == UNKNOWN_LANGUAGE and item.lower() != UNKNOWN_LANGUAGE:
            raise ValueError(f"unknown language {item!r}; known: {', '.join(LANGUAGES)}")
        chosen.add(name)
    if not chosen:
        raise ValueError("an empty language list keeps no document")
    return frozenset(chosen)


def document_languages_paths(bin_prefix: str) -> tuple[str, str]:
    """``({bin_prefix}.lang.npy, {bin_prefix}.languages.json)``: per-document ids and the id -> name table.

    The contract with the pretraining datasets (``data.languages``): the ``.npy`` is a 1-D uint8 array with one
    language id per document of ``{bin_prefix}.idx``; the JSON maps ``"<id>"`` to the canonical name for every
    language that occurs in the prefix.
    """
    return f"{bin_prefix}.lang.npy", f"{bin_prefix}.languages.json"


def read_document_languages(bin_prefix: str):
    """Per-document language ids (numpy ``[num_documents]`` uint8) written beside ``{bin_prefix}.bin/.idx``.

    Raises FileNotFoundError naming the expected file when the prefix was not written by our preprocessor.
    """
    import numpy

    path = document_languages_paths(bin_prefix)[0]
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no per-document language ids (preprocess with tools/preprocess_data.py)")
    return numpy.load(path, allow_pickle=False)

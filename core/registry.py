"""Registries: every kind of named choice (regulariser, mixing rule, weight optimiser, objective, H-score variant,
gradient loss, evaluation method) is one :class:`Registry`, and every choice one decorated definition.

As timm registers its models and mergekit lists its merge methods, the definition carries its name, a one-line help
and whatever the code dispatching on it needs to know (``needs="fishr"``, ``default_lr=0.5``)::

    REGULARIZERS = Registry("regularizer", default="fishr")

    @REGULARIZERS.register("conflict", help="weight on pairs whose raw gradients conflict")
    def conflict(alpha, source_pass):
        ...

    REGULARIZERS["conflict"](alpha, sp)      # dispatch: the registered object itself
    REGULARIZERS.attr("conflict", "needs")   # what it declared

The options table (:mod:`core.options`) reads a registry's names, helps, default and retired names, so the CLI's
flags, the dashboard's sidebar and the docs table (:func:`markdown_table`) offer exactly what is registered.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

from .errors import UserInputError

T = TypeVar("T")

_ALL: list["Registry"] = []


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered choice: its name, the object, its one-line help and what it declared."""

    name: str
    obj: T
    help: str
    attrs: dict[str, Any] = field(default_factory=dict)


class Registry(Mapping[str, T]):
    """Named choices of one ``kind`` (the option's name, e.g. ``"regularizer"``), in registration order.

    A mapping from name to the registered object; an unknown or retired name is refused with a
    :class:`UserInputError` that names the kind, the value and the choices (or what replaced a retired one).
    ``default``: the choice taken when none is given (stated here once; signatures and options read it)."""

    def __init__(self, kind: str, default: str | None = None):
        self.kind = kind
        self._default = default
        self._entries: dict[str, Entry[T]] = {}
        self.retired: dict[str, str] = {}
        _ALL.append(self)

    # ----------------------------------------------------------- definition
    def register(self, name: str, *, help: str, **attrs: Any) -> Callable[[T], T]:
        """A decorator that registers the decorated function or class under ``name`` and returns it unchanged."""

        def decorate(obj: T) -> T:
            self.add(name, obj, help=help, **attrs)
            return obj

        return decorate

    def add(self, name: str, obj: T, *, help: str, **attrs: Any) -> T:
        """Register ``obj`` (any object: a function, a class, a dataclass instance) under ``name``."""
        if name in self._entries or name in self.retired:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = Entry(name, obj, help, dict(attrs))
        return obj

    def retire(self, name: str, why: str) -> None:
        """A name that once existed: asking for it raises ``why`` (what replaced it and what to do)."""
        self.retired[name] = why

    # -------------------------------------------------------------- reading
    @property
    def default(self) -> str | None:
        """The default choice, as named at construction (None: this kind has no single default)."""
        return self._default

    def check(self, name: Any) -> str:
        """``name`` if registered; else a :class:`UserInputError` naming the choices (or why it was retired)."""
        if isinstance(name, str) and name in self._entries:
            return name
        if isinstance(name, str) and name in self.retired:
            raise UserInputError(self.retired[name])
        raise UserInputError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._entries)}.")

    def entry(self, name: str) -> Entry[T]:
        return self._entries[self.check(name)]

    def __getitem__(self, name: str) -> T:
        return self.entry(name).obj

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def help(self, name: str) -> str:
        return self.entry(name).help

    def helps(self) -> dict[str, str]:
        """One line per choice, in registration order."""
        return {n: e.help for n, e in self._entries.items()}

    def attr(self, name: str, key: str, default: Any = None) -> Any:
        """What choice ``name`` declared under ``key`` when it was registered (``default`` if nothing)."""
        return self.entry(name).attrs.get(key, default)

    def where(self, **attrs: Any) -> tuple[str, ...]:
        """The names whose declared attributes equal ``attrs``."""
        return tuple(n for n, e in self._entries.items() if all(e.attrs.get(k) == v for k, v in attrs.items()))

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


def registries() -> list[Registry]:
    """Every registry made so far, in the order their modules were imported."""
    return list(_ALL)


def markdown_table(regs: list[Registry]) -> str:
    """One markdown table of ``regs``: kind, name (the default marked), help, and the retired names."""
    rows = ["| kind | choice | what it does |", "|---|---|---|"]
    for reg in regs:
        for name, text in reg.helps().items():
            mark = " (default)" if name == reg.default else ""
            rows.append(f"| {reg.kind} | `{name}`{mark} | {text.replace('|', chr(92) + '|')} |")
        for name in reg.retired:
            rows.append(f"| {reg.kind} | ~~`{name}`~~ | retired |")
    return "\n".join(rows)

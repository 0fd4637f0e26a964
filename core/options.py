"""One table of options: every setting of an estimator or config, with its type, default, bounds and help.

An option is a dataclass field made with :func:`option`; its type annotation gives what values it takes
(``int | None``, ``int | Literal["auto"] | None``, ...), and its metadata the help text, the bounds and how the
command line and the dashboard name it. An option whose values are a kind of choice the code dispatches on (a
regulariser, a mixing rule, an objective ...) is made with :func:`choice` from that kind's
:class:`core.registry.Registry`: its choices, their help lines, its default and its retired names are the registry's.
From that one declaration:

- :func:`check` validates a value and raises a :class:`UserInputError` that names the value and what is allowed;
- :func:`add_arguments` builds the ``argparse`` flags (help texts and defaults included), checked as they are parsed,
  so a bad value is refused before anything is loaded;
- the dashboard's sidebar builds its widgets from :func:`options` (``dashboard/widgets.py``);
- :class:`Params` gives an estimator scikit-learn's ``get_params`` / ``set_params``, read from its signature.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import UserInputError
from .registry import Registry

#: Seeds are integers in this range everywhere (numpy's and torch's generators both take them).
SEED_RANGE = (0, 2**32 - 1)


@dataclass(frozen=True)
class Spec:
    """How one option is described, bounded and shown."""

    help: str
    label: str | None = None  # the dashboard's label (default: the help's first clause)
    low: float | None = None  # lower bound (inclusive unless low_open)
    high: float | None = None  # upper bound (inclusive unless high_open)
    low_open: bool = False
    high_open: bool = False
    cli: str | None = None  # argparse flag (default: --name-with-dashes); "" keeps it off the command line
    ui: bool = False  # shown in the dashboard's sidebar
    ui_range: tuple[float, float] | None = None  # the sidebar widget's range, where narrower than the bounds
    ui_step: float | None = None
    ui_value: Any = None  # the widget's starting number where the default is a name or None ("auto")
    fix: str = ""  # appended to the error message: what to do instead
    registry: Registry | None = None  # where the named choices come from (:func:`choice`)

    @property
    def choices_help(self) -> dict[str, str] | None:
        """One line per named choice (the registry's)."""
        return self.registry.helps() if self.registry is not None else None

    @property
    def retired(self) -> dict[str, str] | None:
        """Values that once existed -> why they are gone and what replaces them (the registry's)."""
        return self.registry.retired if self.registry is not None else None


def option(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field that is an option (``default``; ``help``; the rest as :class:`Spec`)."""
    return field(default=default, metadata={"option": Spec(help=help, **spec)})


def choice(registry: Registry, help: str, **spec: Any) -> Any:
    """An option whose values are the names in ``registry`` (annotate the field ``str``): its default is the
    registry's, and the help of each choice, shown by the CLI and the sidebar, the registry's."""
    return option(registry.default, help, registry=registry, **spec)


@dataclass(frozen=True)
class Option:
    """One option of a dataclass: its name, default, the types and named choices it takes, and its :class:`Spec`."""

    name: str
    default: Any
    spec: Spec
    types: tuple[type, ...]  # among bool, int, float, str, type(None)
    choices: tuple[str, ...]  # named values (Literal), possibly beside a number type

    @property
    def flag(self) -> str:
        return self.spec.cli if self.spec.cli is not None else "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        return self.spec.label or self.name

    @property
    def optional(self) -> bool:
        return type(None) in self.types

    @property
    def number(self) -> type | None:
        """``int`` or ``float`` when the option takes a number."""
        return float if float in self.types else int if int in self.types else None

    def describe(self) -> str:
        """What the option takes, in words: "one of 'a', 'b'", "a number >= 0", "'auto', an integer >= 2 or None"."""
        parts = [repr(c) for c in self.choices]
        if self.number is not None:
            s = self.spec
            what = "an integer" if self.number is int else "a finite number"
            if s.low is not None and s.high is not None and not (s.low_open or s.high_open):
                parts.append(f"{what} in {_fmt(s.low)}..{_fmt(s.high)}" if self.number is int
                             else f"{what} in [{_fmt(s.low)}, {_fmt(s.high)}]")
            else:
                bounds = []
                if s.low is not None:
                    bounds.append(f"{'>' if s.low_open else '>='} {_fmt(s.low)}")
                if s.high is not None:
                    bounds.append(f"{'<' if s.high_open else '<='} {_fmt(s.high)}")
                parts.append(what + (" " + " and ".join(bounds) if bounds else ""))
        if bool in self.types:
            parts.append("True or False")
        if str in self.types and not self.choices:
            parts.append("a string")
        if self.optional:
            parts.append("None")
        if self.choices and len(parts) == len(self.choices) and len(parts) > 1:  # named choices only
            return "one of " + ", ".join(parts)
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]

    def check(self, value: Any) -> Any:
        """``value`` if this option takes it (numpy scalars become Python numbers), else a :class:`UserInputError`."""
        if self.spec.retired and isinstance(value, str) and value in self.spec.retired:
            raise UserInputError(self.spec.retired[value])
        if value is None and self.optional:
            return None
        if isinstance(value, str) and value in self.choices:
            return value
        # (`== bool`, not `is bool`: a numpy bool dtype equals bool without being it)
        if isinstance(value, bool) or (hasattr(value, "dtype") and getattr(value, "dtype", None) == bool):  # noqa: E721
            if bool in self.types:
                return bool(value)
        elif isinstance(value, numbers.Integral) and self.number is not None:
            return self._bounded(int(value) if self.number is int else float(value), value)
        elif isinstance(value, numbers.Real) and self.number is float:
            return self._bounded(float(value), value)
        elif isinstance(value, str) and str in self.types and not self.choices:
            return value
        raise self.error(value)

    def _bounded(self, x: float, given: Any) -> Any:
        s = self.spec
        bad = (isinstance(x, float) and not math.isfinite(x)) or (
            s.low is not None and (x <= s.low if s.low_open else x < s.low)) or (
            s.high is not None and (x >= s.high if s.high_open else x > s.high))
        if bad:
            raise self.error(given)
        return x

    def error(self, value: Any, name: str | None = None) -> UserInputError:
        fix = f"; {self.spec.fix}" if self.spec.fix else ""
        return UserInputError(f"{name or self.name} must be {self.describe()}, got {value!r}{fix}.")

    def parse(self, text: str) -> Any:
        """A command-line string as this option's value (``none`` for None, a choice's name, or a number), checked."""
        if self.optional and text.lower() == "none":
            return None
        if text in self.choices:
            return self.check(text)
        if self.number is not None:
            try:
                x = int(text) if self.number is int else float(text)
            except ValueError:
                raise self.error(text) from None
            return self.check(x)
        if bool in self.types:
            raise self.error(text)
        return self.check(text)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _types(annotation: Any) -> tuple[tuple[type, ...], tuple[str, ...]]:
    """The plain types and the Literal values an annotation admits."""
    kinds: list[type] = []
    choices: list[str] = []

    def walk(t: Any) -> None:
        origin = typing.get_origin(t)
        if origin is typing.Union or origin is types.UnionType:
            for a in typing.get_args(t):
                walk(a)
        elif origin is Literal:
            choices.extend(typing.get_args(t))
        elif t is type(None) or t is None:
            kinds.append(type(None))
        elif t in (bool, int, float, str):
            kinds.append(t)
        else:
            raise TypeError(f"option type {t!r} is not supported")

    walk(annotation)
    return tuple(dict.fromkeys(kinds)), tuple(choices)


def options(cls: Any) -> dict[str, Option]:
    """The options of a dataclass (or an instance of one), by name, in field order."""
    cls = cls if isinstance(cls, type) else type(cls)
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("option")
        if spec is None:
            continue
        kinds, choices = _types(hints[f.name])
        if spec.registry is not None:
            choices = (*choices, *spec.registry.names())
        out[f.name] = Option(f.name, f.default, spec, kinds, choices)
    return out


def check(obj: Any, normalise: bool = False) -> None:
    """Validate every option of a dataclass instance (a :class:`UserInputError` for the first bad value); with
    ``normalise``, also write the checked values back (numpy scalars become Python numbers, ints become floats where
    the option is a float), as a config's ``__post_init__`` does."""
    for name, opt in options(obj).items():
        value = opt.check(getattr(obj, name))
        if normalise:
            object.__setattr__(obj, name, value)


def check_seed(seed: Any, what: str = "seed") -> int:
    """One rule for every seed: an integer in ``SEED_RANGE`` (0 .. 2**32 - 1)."""
    lo, hi = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not lo <= int(seed) <= hi:
        raise UserInputError(f"{what} must be an integer in {lo}..{hi}, got {seed!r}.")
    return int(seed)


def seed_option(help: str = "random seed", **spec: Any) -> Any:
    """The seed, as an option: an integer in ``SEED_RANGE``."""
    return option(0, help, low=SEED_RANGE[0], high=SEED_RANGE[1], **spec)


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: Any, skip: tuple[str, ...] = (),
                  prefix: str = "") -> None:
    """An ``argparse`` flag for every option of ``cls`` that has one (not in ``skip``): its help, its default, and a
    type that checks the value as it is parsed. ``dest`` is ``prefix`` + the option's name (two configs with an
    option of the same name, such as the tuning's and the weights' ``optimizer``, then keep apart)."""
    for name, opt in options(cls).items():
        if name in skip or opt.spec.cli == "":
            continue
        text = opt.spec.help
        if opt.spec.choices_help:  # one clause per registered choice
            text += " (" + "; ".join(f"{c}: {h}" for c, h in opt.spec.choices_help.items()) + ")"
        kw: dict[str, Any] = {"dest": prefix + name, "default": opt.default,
                              "help": f"{text} (default: {opt.default})".replace("%", "%%")}
        if opt.types == (bool,):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _argtype(opt)
            if opt.choices and opt.number is None:
                kw["metavar"] = "{" + ",".join(opt.choices) + "}"
        parser.add_argument(opt.flag, **kw)


def _argtype(opt: Option):
    def parse(text: str) -> Any:
        try:
            return opt.parse(text)
        except UserInputError as exc:  # the message names the flag the user typed, not the option's field
            message = str(exc)
            if message.startswith(f"{opt.name} must be"):
                message = opt.flag + message[len(opt.name):]
            raise argparse.ArgumentTypeError(message) from None

    parse.__name__ = opt.name  # argparse names the type in its messages
    return parse


def values(cls: Any, namespace: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The parsed values of ``cls``'s options from an ``argparse`` namespace (by ``dest``, as :func:`add_arguments`)."""
    return {name: getattr(namespace, prefix + name) for name in options(cls) if hasattr(namespace, prefix + name)}


class Params:
    """scikit-learn's parameter protocol for a dataclass estimator: its parameters are its ``__init__`` signature."""

    @classmethod
    def _param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:  # no nested estimators
        """The estimator's parameters, as given (not yet validated)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> "Params":
        """Set parameters by name (checked when fitted); an unknown name is refused."""
        names = self._param_names()
        bad = [k for k in params if k not in names]
        if bad:
            raise UserInputError(f"{type(self).__name__} has no parameter {bad[0]!r}; its parameters are "
                                 f"{', '.join(names)}.")
        for k, v in params.items():
            setattr(self, k, v)
        return self

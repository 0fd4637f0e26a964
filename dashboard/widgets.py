"""Widgets built from the one options table (:mod:`core.options`): the label, help, default and range of a widget are
the option's, so the sidebar never restates a default or a help text that the CLI also shows."""
from __future__ import annotations

from typing import Any

import streamlit as st

from core.options import Option, options


def help_text(opt: Option) -> str:
    """The option's help, with one line per named choice where it has them."""
    text = opt.spec.help
    if opt.spec.choices_help:
        text += "\n\n" + "\n".join(f"- **{c}**: {h}" for c, h in opt.spec.choices_help.items())
    return text


def option_input(where, opt: Option, key: str | None = None) -> Any:
    """One widget for ``opt`` in ``where`` (the sidebar, a column), under ``key`` (default: the option's name);
    returns the value it shows, checked as the option checks it."""
    key = key or opt.name
    spec, label, tip = opt.spec, opt.label, help_text(opt)
    if opt.choices and opt.number is None:  # named choices only
        return where.selectbox(label, list(opt.choices), index=list(opt.choices).index(opt.default), key=key, help=tip)
    if opt.types == (bool,):
        return where.toggle(label, value=bool(opt.default), key=key, help=tip)
    lo, hi = spec.ui_range or (spec.low, spec.high)
    if opt.choices:  # a named value ("auto") beside a number: a toggle for the name, the number when it is off
        named = opt.choices[0]
        if where.toggle(f"{label}: {named}", value=opt.default == named, key=f"{key}__{named}", help=tip):
            return named
        tip = None  # said once, on the toggle
    if opt.number is int:
        start = opt.default if isinstance(opt.default, int) else int(spec.ui_value if spec.ui_value is not None else lo)
        step = int(spec.ui_step or 1)
        if hi - lo > 5000:  # a seed: typed, not dragged
            return opt.check(int(where.number_input(label, int(lo), int(hi), start, step, key=key, help=tip)))
        return opt.check(int(where.slider(label, int(lo), int(hi), start, step, key=key, help=tip)))
    start = opt.default if isinstance(opt.default, (int, float)) else spec.ui_value
    value = where.number_input(label, float(lo), float(hi), start, spec.ui_step, format="%.3f", key=key, help=tip,
                               placeholder="default" if start is None else None)
    return None if value is None else opt.check(float(value))


def option_inputs(where, cls: Any) -> dict[str, Any]:
    """A widget for every option of ``cls`` that the dashboard shows (``ui=True``), in the table's order."""
    return {name: option_input(where, opt) for name, opt in options(cls).items() if opt.spec.ui}

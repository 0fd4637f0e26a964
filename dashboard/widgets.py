"""Widgets built from the one options table (:mod:`core.options`): the label, help, default and range of a widget are
the option's, so the sidebar never restates a default or a help text that the CLI also shows."""
from __future__ import annotations

from typing import Any

from core.options import Option, options
from dashboard.settings import persistent


def help_text(opt: Option) -> str:
    """The option's help, with one line per named choice where it has them."""
    text = opt.spec.help
    if opt.spec.choices_help:
        text += "\n\n" + "\n".join(f"- **{c}**: {h}" for c, h in opt.spec.choices_help.items())
    return text


def option_input(where, opt: Option, key: str | None = None) -> Any:
    """One widget for ``opt`` in ``where`` (the sidebar, a column), under ``key`` (default: the option's name), whose
    value persists across pages and reloads; returns the value it shows, checked as the option checks it."""
    key = key or opt.name
    spec, label, tip = opt.spec, opt.label, help_text(opt)
    if opt.choices and opt.number is None:  # named choices only
        choices = list(opt.choices)
        return persistent(key, lambda **kw: where.selectbox(label, choices, help=tip, **kw),
                          allowed=lambda v: v in choices, what=opt.describe(), index=choices.index(opt.default))
    if opt.types == (bool,):
        return persistent(key, lambda **kw: where.toggle(label, help=tip, **kw), what="true or false",
                          value=bool(opt.default))
    lo, hi = spec.ui_range or (spec.low, spec.high)
    if opt.choices:  # a named value ("auto") beside a number: a toggle for the name, the number when it is off
        named = opt.choices[0]
        if persistent(f"{key}__{named}", lambda **kw: where.toggle(f"{label}: {named}", help=tip, **kw),
                      what="true or false", value=opt.default == named):
            return named
        tip = None  # said once, on the toggle
    inside = lambda v: lo <= v <= hi  # the value's kind is checked by persistent (the default's kind)
    if opt.number is int:
        start = opt.default if isinstance(opt.default, int) else int(spec.ui_value if spec.ui_value is not None else lo)
        step = int(spec.ui_step or 1)
        if hi - lo > 5000:  # a seed: typed, not dragged
            make = lambda **kw: where.number_input(label, int(lo), int(hi), step=step, help=tip, **kw)
        else:
            make = lambda **kw: where.slider(label, int(lo), int(hi), step=step, help=tip, **kw)
        return opt.check(int(persistent(key, make, allowed=inside, what=f"an integer in {int(lo)}..{int(hi)}",
                                        value=start)))
    start = opt.default if isinstance(opt.default, (int, float)) else spec.ui_value
    make = lambda **kw: where.number_input(label, float(lo), float(hi), step=spec.ui_step, format="%.3f", help=tip,
                                           placeholder="default", **kw)
    value = persistent(key, make, allowed=lambda v: v is None or inside(v), what=f"a number in [{lo:g}, {hi:g}]",
                       value=None if start is None else float(start))
    return None if value is None else opt.check(float(value))


def option_inputs(where, cls: Any) -> dict[str, Any]:
    """A widget for every option of ``cls`` that the dashboard shows (``ui=True``), in the table's order."""
    return {name: option_input(where, opt) for name, opt in options(cls).items() if opt.spec.ui}

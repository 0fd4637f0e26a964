"""Every kind of choice is one registry, and the CLI, the sidebar and the docs table offer exactly its entries."""
import os
import re
import subprocess
import sys

import pytest

import core  # registers the method's and the metrics' choices
import core.evaluation.methods  # registers the evaluation methods
from core.analysis.interference import InterferenceConfig
from core.errors import UserInputError
from core.method.ensemble import HGPromptEnsemble
from core.options import options
from core.registry import Registry, registries
from core.tuning.tune import TuneConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = {"H-score variant", "objective", "regularizer", "gradient loss", "mixing rule", "weight optimiser", "method",
         "precision", "choose_by"}
CONFIGS = (HGPromptEnsemble, TuneConfig, InterferenceConfig)


def _registry_options():
    """(config, option) for every option whose choices come from a registry."""
    return [(cls, opt) for cls in CONFIGS for opt in options(cls).values() if opt.spec.registry is not None]


def test_every_registry_is_listed_and_well_formed():
    regs = registries()
    assert {r.kind for r in regs} == KINDS  # a new registry belongs in these checks and in the docs table
    for reg in regs:
        assert len(reg) >= 2 and all(reg.help(n) for n in reg), reg
        assert reg.default is None or reg.default in reg, reg
        assert not set(reg.retired) & set(reg)


def test_options_read_their_choices_help_default_and_retired_names_from_the_registry():
    seen = set()
    for _cls, opt in _registry_options():
        reg = opt.spec.registry
        seen.add(reg.kind)
        assert opt.choices == reg.names() and opt.default == reg.default
        assert opt.spec.choices_help == reg.helps() and opt.spec.retired == reg.retired
        for name in reg:
            assert opt.check(name) == name
    assert seen == KINDS - {"method"}  # every kind of choice but the evaluation methods is an option


def test_the_cli_offers_exactly_the_registered_choices_with_their_help():
    from core.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    flags = {a.dest: a for p in sub.values() for a in p._actions}
    checked = 0
    for _cls, opt in _registry_options():
        if opt.spec.cli == "":
            continue
        action = flags[opt.name]
        assert action.metavar == "{" + ",".join(opt.spec.registry.names()) + "}"
        for name, text in opt.spec.registry.helps().items():
            assert f"{name}: {text}" in action.help.replace("%%", "%")
        checked += 1
    assert checked == len([1 for _, opt in _registry_options() if opt.spec.cli != ""])
    methods = next(a for a in sub["baselines"]._actions if a.dest == "methods")
    assert all(f"{name}: {m.help}" in methods.help.replace("%%", "%")
               for name, m in core.evaluation.methods.METHODS.items())


def test_the_cli_refuses_an_unknown_choice_and_explains_a_retired_one(capsys):
    from core.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["learn", "--target", "t", "--mixing", "nope"])
    assert "--mixing must be one of 'average', 'task_arithmetic', 'layerwise', got 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["learn", "--target", "t", "--regularizer", "fisher"])
    assert "retired" in capsys.readouterr().err


@pytest.mark.skipif(not core.assets.available(), reason="the embedded default is not built")
def test_the_sidebar_offers_exactly_the_registered_choices(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    import dashboard.state as state

    monkeypatch.setenv("HGPROMPT_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(state, "RUNS_ROOT", str(tmp_path / "runs"))
    at = AppTest.from_file(os.path.join(ROOT, "dashboard", "app.py"), default_timeout=120).run()
    assert not at.exception, [e.message for e in at.exception]
    shown = [opt for cls, opt in _registry_options() if cls is HGPromptEnsemble and opt.spec.ui]
    assert {opt.name for opt in shown} == {"regularizer", "h_variant", "optimizer", "mixing", "objective", "precision"}
    for opt in shown:
        box = at.selectbox(key=opt.name)
        assert box.options == list(opt.spec.registry.names()) and box.value == opt.spec.registry.default


def test_the_docs_table_is_the_registries():
    from scripts.registries import DOC, current, table

    assert current(open(DOC, encoding="utf-8").read()) == table(), "run python -m scripts.registries"
    for reg in registries():
        for name in reg:
            assert f"| {reg.kind} | `{name}`" in table()


def test_a_registry_refuses_unknown_and_retired_names_and_a_second_definition():
    reg = Registry("colour", default="red")
    reg.register("red", help="warm")(lambda: 1)
    reg.retire("crimson", "crimson was folded into 'red'.")
    assert reg["red"]() == 1 and reg.attr("red", "missing", 3) == 3
    with pytest.raises(UserInputError, match="unknown colour 'blue'; choose one of red"):
        reg["blue"]
    with pytest.raises(UserInputError, match="folded into 'red'"):
        reg.check("crimson")
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("red", object(), help="again")


def test_a_choice_option_sees_entries_registered_after_its_class():
    from dataclasses import dataclass

    from core.options import choice

    reg = Registry("shape", default="round")
    reg.add("round", 1, help="no corners")

    @dataclass
    class Config:
        shape: str = choice(reg, "the shape")

    reg.add("square", 2, help="four corners")
    opt = options(Config)["shape"]
    assert opt.choices == ("round", "square") and opt.check("square") == "square"
    with pytest.raises(UserInputError, match="shape must be one of 'round', 'square', got 'oval'"):
        opt.check("oval")


def test_adding_a_rule_is_the_one_decorated_definition_the_docs_show():
    """The docs' example, run as written: the estimator, the options table and the CLI take the new rule."""
    text = open(os.path.join(ROOT, "docs", "ARCHITECTURE.md"), encoding="utf-8").read()
    example = re.search(r"### How to add a rule.*?```python\n(.*?)```", text, re.S).group(1)
    script = "\n".join([
        "import torch",
        "from core.method.mixing import *",
        "from core.method.mixing import MIXING_RULES, Rule, task_vectors",
        example,
        "from core import HGPromptEnsemble",
        "from core.cli import build_parser",
        "from core.model.toy import toy_bank, toy_model, toy_task",
        "from core.options import options",
        "assert 'first_token' in options(HGPromptEnsemble)['mixing'].choices",
        "args = build_parser().parse_args(['learn', '--target', 't', '--mixing', 'first_token'])",
        "model = toy_model()",
        "ens = HGPromptEnsemble(mixing=args.mixing, steps=2, n_samples=30).fit(model, toy_bank(model), "
        "task=toy_task())",
        "assert ens.rule_.name == 'first_token' and 'sum' in ens.candidates_",
        "print('ok')",
    ])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]

"""A guided lesson on the embedded default, for a teacher to click through: what a prompt is, what the H-score
measures, why averaging hurts here, what the weights pick, where prompts interfere. Each step shows the live view it
talks about and states the numbers measured just now, not numbers written in advance."""
from __future__ import annotations

import os
import threading

import numpy as np
import streamlit as st
import torch

from core import HGPromptEnsemble, TuneConfig, UserInputError, assets, tune_prompt
from core.errors import StopRequested
from core.evaluation.decision import SHORT
from core.io.safe_io import atomic_write_json, load_json
from core.method.mixing import make_rule
from core.method.scoring import hscores_at, segment_hscores
from core.metrics.h_score import resolve_n_samples
from core.model.cost import probe_work, scoring_work
from core.model.tokens import cached_tokens, target_tokens
from dashboard import charts, ensemble_runs
from dashboard.settings import remember, restore
from dashboard.state import (
    EMBEDDED,
    backbone as _backbone,
    current_workspace,
    load_task,
    runs_dir,
    session_dir,
    shipped_bank,
    storage_problem,
)
from dashboard.ui import chart, job_view, note, on_demand
from dashboard.views import data, live
from dashboard.views.interference import measure, measured, work as inter_work

STEPS = ["What a prompt is", "What the H-score measures", "Why averaging can hurt", "What the weights pick",
         "Where prompts interfere", "When mixing helps"]
PAIR = ("shapes_xpos", "shapes_yhalf")  # the known-answer case: each holds half of shapes_quad's answer
JOB, RESULT = "ensemble_job", "ensemble_result"  # the Ensemble page's keys: the lesson's run is studied there too
POINTS = 11  # along the segment between the two best sources


def backbone():
    """The lesson's backbone: the embedded default's, whatever workspace the session has open."""
    return _backbone(EMBEDDED)


@st.cache_data(show_spinner="Scoring every source prompt, their average and their best pair on the target ...")
def _scores(target: str, fingerprint: str, n_samples: int, seed: int) -> dict:
    """The H-score of the default target under every source and the uniform average (one batched pass), and along the
    segment between the two best sources (:func:`core.method.scoring.segment_hscores`), cached for every session (a
    class computes it once)."""
    model, bank = backbone(), shipped_bank()
    task = load_task(assets.task_path(target))
    tokens, labels = target_tokens(model, task, None, n_samples, seed)
    stack = bank.stack().to(model.device)
    both = hscores_at(model, tokens, labels, torch.cat([stack, stack.mean(0, keepdim=True)])).numpy()
    h, uniform = both[:-1], float(both[-1])
    a, b = np.argsort(h)[::-1][:2]
    t = torch.linspace(0, 1, POINTS, dtype=torch.float64)
    segment = segment_hscores(model, tokens, labels, stack[[a, b]], t, torch.as_tensor(h[[a, b]]))[0, 1].numpy()
    return {"names": bank.names, "h": h.tolist(), "uniform": uniform, "a": int(a), "b": int(b),
            "t": t.numpy().tolist(), "segment": segment.tolist(), "n_classes": task.num_classes, "n": int(len(labels))}


def _shipped(names: list[str]):
    """The lesson's runs are of the shipped shallow bank: its prompts by name (None when one is not in it)."""
    bank = shipped_bank()
    return bank.subset(names) if all(n in bank.names for n in names) else None


def _step_prompt(target: str) -> None:
    bank = shipped_bank()
    st.markdown(
        "A Vision Transformer cuts an image into patches and turns each into a vector (a *token*); its blocks then let "
        "the tokens exchange information. **Visual prompt tuning** leaves the network frozen and learns only a few "
        "extra tokens, the **prompt**, placed beside the image's tokens. Each prompt below was tuned on one *source* "
        "task; the question of this lesson is which of them, or which mixture, should start a prompt for a new "
        f"*target* task, here **{target}**.")
    name = st.selectbox("Prompt", bank.names, key="lesson_prompt")
    sp = bank[name]
    c1, c2 = st.columns([3, 2])
    chart(c1, charts.prompt_image(sp.prompt.numpy(), name), key="lesson_prompt_chart")
    c2.markdown(f"Tuned on **{sp.source_task}**, where it reached a test accuracy of "
                f"**{sp.source_accuracy:.1%}**." if sp.source_accuracy is not None
                else f"Tuned on **{sp.source_task}**.")
    c2.caption("The target's images, a few per class:")
    for cname, images in data.thumbnails(assets.task_path(target), 4, 0):
        cols = c2.columns([2, 1, 1, 1, 1])
        cols[0].write(cname)
        for k, img in enumerate(images):
            cols[k + 1].image(img, width=48)


def _step_hscore(s: dict) -> None:
    h = np.array(s["h"])
    best, worst = int(h.argmax()), int(h.argmin())
    st.markdown(
        "Before any tuning we can ask how well the target's classes separate in the features a prompt induces. The "
        "**H-score** compares the spread *between* the class means with the spread of all the features: near 0 the "
        f"classes overlap, at its maximum C - 1 = {s['n_classes'] - 1} they are perfectly apart. Measured just now on "
        f"{s['n']} target images: **{s['names'][best]}** scores highest (H = {h[best]:.3f}), **{s['names'][worst]}** "
        f"lowest (H = {h[worst]:.3f}).")
    chart(st, charts.hscore_bar(s["names"], s["h"], None, s["n_classes"]), key="lesson_h_chart")
    chart(st, charts.hscore_dots(s["names"], s["h"]), key="lesson_h_dots")
    st.caption("The Data page shows the images of every task; the Ensemble page's H-scores tab splits each score by "
               "class.")


def _step_average(s: dict) -> None:
    h = np.array(s["h"])
    a, b = s["names"][s["a"]], s["names"][s["b"]]
    seg = np.array(s["segment"])
    mid = seg[len(seg) // 2]
    verdict = (f"The plain average of all {len(h)} prompts scores **H = {s['uniform']:.3f}**, "
               + ("below" if s["uniform"] < h.max() else "above") + f" the best single prompt ({h.max():.3f}).")
    mix = (f"Halfway between the two best, {a} and {b}, H is **{mid:.3f}**: "
           + (f"{(seg[0] + seg[-1]) / 2 - mid:.3f} below the mean of the two ends, so mixing them loses "
              "transferability: the prompts *interfere*." if mid < (seg[0] + seg[-1]) / 2 else
              "above the mean of the two ends: these two combine well."))
    st.markdown("Mixing prompts is tempting: average them and hope to keep what each is good at. " + verdict + " "
                + mix)
    chart(st, charts.segment_curve(s["t"], seg, None, None, a, b), key="lesson_segment_chart")


def _step_weights(target: str) -> None:
    st.markdown(
        "HGPrompt does not average blindly: it learns one weight per source, maximising the H-score of the mixture "
        "minus a penalty (the regulariser) on mixing sources whose gradients on the target disagree. It first scores "
        "every single source and the plain average, starts from the best of them, and never returns a worse point. Run "
        "it with the defaults:")
    model = backbone()
    running = JOB in st.session_state
    if storage_problem():
        st.info("Runs cannot be saved on this server just now (the sidebar says why), so this step cannot run.")
    elif not running:
        st.caption(ensemble_runs.fit_estimate(model, shipped_bank(), load_task(assets.task_path(target)),
                                              ensemble_runs.defaults()))
    note(RESULT)
    if st.button("Learn the weights", type="primary", key="lesson_run", disabled=running or bool(storage_problem())):
        running = ensemble_runs.start_or_serve(model, shipped_bank(), assets.task_path(target),
                                               ensemble_runs.defaults(),
                                               runs_dir(), JOB, RESULT)
    if running:
        job_view(JOB, RESULT, live.progress, live.view)
        return
    res = st.session_state.get(RESULT)
    if res is None or res.target != target:
        return
    w = np.array(res.weights)
    top = res.names[int(w.argmax())]
    st.markdown(f"The weights put **{w.max():.0%}** on **{top}**"
                + (" and almost nothing elsewhere: on this target the best mixture is a single source, so the ensemble "
                   "is a selection; mixing it with the others lowers the H-score (the next step measures where)."
                   if w.max() > 0.95 else
                   f"; the rest is spread over {int((w > 0.01).sum()) - 1} other sources.")
                + f" Ensemble H-score {res.ensemble_hscore:.3f}. The run is on the Ensemble page, with every view of "
                "it.")
    chart(st, charts.weights_bar(res.names, res.weights), key="lesson_weights_chart")


def _step_interference(target: str) -> None:
    res = st.session_state.get(RESULT)
    st.markdown(
        "Where do prompts interfere? For every pair, mix them 50/50 and measure the H-score against the mean of the "
        "two: the **mixing loss** I. Red cells are pairs that lose when mixed; the gradient cosines the method uses "
        "only *predict* this, and the Conflicts tab compares the two.")
    if res is None or res.target != target:
        st.info("Run the previous step first: this one measures the pairs of its sources.")
        return
    model = backbone()
    measured(res, f"inter_result_{res.id}")  # measured before (here, on the Ensemble page, or before a reload)
    r = on_demand("interference", "Measure interference", "lesson_inter_button", f"inter_job_{res.id}",
                  f"inter_result_{res.id}", lambda job: measure(job, res, model),
                  "measuring: gradient pass and pair midpoints ...",
                  "One gradient pass over the sources and as many random prompts, and one forward of every pair's "
                  "points.", **inter_work(res, model))
    if r is None:
        return
    iu = np.triu_indices(len(r.names), 1)
    worst = int(np.argmin(r.mixing_loss[iu]))
    i, j = int(iu[0][worst]), int(iu[1][worst])
    st.markdown(f"**{int((r.mixing_loss[iu] < 0).sum())} of {len(iu[0])}** pairs lose H-score when mixed; the worst is "
                f"**{r.names[i]} + {r.names[j]}** (I = {r.mixing_loss[i, j]:+.3f}).")
    chart(st, charts.conflict_heatmap(r.mixing_loss, r.names, "Measured mixing loss I (H-score units)", zrange=None,
                                      what="I"), key="lesson_inter_chart")
    lo, hi = r.null_band["centred"]
    below = int(r.below_null("centred")[iu].sum())
    st.markdown(
        f"What the method's gradients *predicted*: the centred cosine of every pair, coloured against the range "
        f"random prompts give (**{lo:+.2f} to {hi:+.2f}**). A cell is red and outlined only when the pair's "
        f"gradients point apart more than any pair of random prompts do: **{below}** pair(s) here. A negative cosine "
        "alone means nothing: centring makes them negative on average.")
    chart(st, charts.conflict_heatmap(r.cosine["centred"], r.names, "Centred gradient cosine, against random prompts",
                                      band=(lo, hi)), key="lesson_cos_chart")


_CASES: dict[tuple, dict] = {}  # the known-answer case per (target, backbone, seed), measured once per server
_CASES_LOCK = threading.Lock()
FITS = {"average": ("average", 1.0), "task arithmetic": ("task_arithmetic", 1.0),
        "task arithmetic, lambda 0": ("task_arithmetic", 0.0)}


def _mixing_case(target: str, seed: int, should_stop=None) -> dict:
    """The known-answer case, measured on the spot: the H-score and the probe accuracy of each of the pair, their
    average (the paper's rule) and their task-arithmetic sum, and the weights HGPrompt learns on the whole bank with
    the paper's rule, with task arithmetic, and with task arithmetic and no regulariser (lambda 0). A Stop
    (``should_stop``) ends it with :class:`core.errors.StopRequested`, and nothing is kept: a stopped fit's weights are
    not the case's."""
    model, bank = backbone(), shipped_bank()
    key = (target, model.fingerprint, seed)
    with _CASES_LOCK:
        if key in _CASES:
            return _CASES[key]
        task = load_task(assets.task_path(target))
        pair = bank.subset(list(PAIR))
        stack, start = pair.stack(), pair.start
        ta = make_rule("task_arithmetic", stack, start)
        prompts = {PAIR[0]: stack[0], PAIR[1]: stack[1], "average": stack.mean(0),
                   "sum": ta.prompt(torch.ones(2, dtype=torch.float64))}
        tokens, labels = target_tokens(model, task, None, "auto", seed)
        h = hscores_at(model, tokens, labels, torch.stack(list(prompts.values()))).tolist()
        probe = [tune_prompt(model, task, p, TuneConfig(epochs=0, seed=seed), train_accuracy=False).test_acc
                 for p in prompts.values()]
        fits = {label: HGPromptEnsemble(mixing=rule, lam=lam, seed=seed).fit(model, bank, task=task,
                                                                             should_stop=should_stop)
                for label, (rule, lam) in FITS.items()}
        if any(ens.stopped_ for ens in fits.values()):
            raise StopRequested()
        _CASES[key] = {"names": list(prompts), "h": h, "probe": probe, "bank": bank.names, "n": int(len(labels)),
                       "weights": {label: ens.weights_.tolist() for label, ens in fits.items()}}
        return _CASES[key]


def _mixing_work(target: str):
    """What :func:`_mixing_case` runs: four probes, the H-scores of four prompts, three fits on the whole bank."""
    model, bank, task = backbone(), shipped_bank(), load_task(assets.task_path(target))
    n = resolve_n_samples("auto", model.embed_dim, len(task.splits["train"]))
    embedded = cached_tokens(model, task, "train") is not None
    fits = [HGPromptEnsemble(**{**ensemble_runs.defaults(), "mixing": rule, "lam": lam}).work(len(bank), n)
            for rule, lam in FITS.values()]
    return (probe_work(len(PAIR) + 2, task.sizes(), embedded=embedded) + scoring_work(len(PAIR) + 2, n, embed=False)
            + fits[0] + fits[1] + fits[2])


def _weights_text(w: dict[str, float]) -> str:
    shown = ", ".join(f"**{v:.2f}** on {n}" for n, v in w.items() if v > 0.01)
    return shown + (" (one source: a selection)" if sum(v > 0.01 for v in w.values()) == 1 else "")


def _step_mixing(target: str) -> None:
    if not all(n in shipped_bank().names for n in PAIR) or shipped_bank().start is None:
        st.info(f"This step needs the shipped sources {PAIR[0]} and {PAIR[1]} and the bank's shared start.")
        return
    st.markdown(
        f"Every source prompt here was tuned from the same random start P0, so each is P0 plus its own change, a "
        f"*task vector*. **{PAIR[0]}** knows where a shape is left to right, **{PAIR[1]}** whether it is in the top "
        f"or the bottom half; **{target}** asks which quadrant: half the answer each. The paper's average keeps "
        f"half of each change, P0 + (tau_x + tau_y) / 2; *task arithmetic* can keep both whole, "
        "P0 + tau_x + tau_y.")
    seed = ensemble_runs.defaults()["seed"]
    key, file = f"lesson_mixing_{target}_{seed}", os.path.join(session_dir("data"), "lesson_mixing.json")
    if key not in st.session_state and os.path.isfile(file):  # measured before a reload
        saved = load_json(file)
        if saved.get("key") == key:
            st.session_state[key] = saved["case"]

    def measure(job):
        case = _mixing_case(target, seed, job.stop)
        atomic_write_json(file, {"key": key, "case": case})
        return case

    m = on_demand("lesson-mixing", "Measure the four prompts and fit HGPrompt three ways", "lesson_mix_button",
                  f"{key}_job", key, measure, "measuring the pair, their average and sum, then three fits ...",
                  "Four probe fits and three HGPrompt fits on the whole bank (once per server: the next student gets "
                  "it at once).", model=backbone(), prompt=shipped_bank().stack()[0], work=_mixing_work(target))
    if m is None:
        return
    h, probe = dict(zip(m["names"], m["h"], strict=True)), dict(zip(m["names"], m["probe"], strict=True))
    best_single = max(PAIR, key=lambda n: probe[n])
    st.markdown(
        f"Measured just now ({m['n']} target images for the H-score; a linear probe on the train split, scored on "
        f"test): H-score / probe accuracy **{PAIR[0]}** {h[PAIR[0]]:.3f} / {probe[PAIR[0]]:.1%}, "
        f"**{PAIR[1]}** {h[PAIR[1]]:.3f} / {probe[PAIR[1]]:.1%}, their **average** {h['average']:.3f} / "
        f"{probe['average']:.1%}, their **sum** {h['sum']:.3f} / {probe['sum']:.1%}. "
        + ("The sum beats the better single source on both counts: here the right answer is a mixture, and only a rule "
           "that keeps each source's change can reach it; the average, which halves both changes, cannot."
           if h["sum"] > max(h[n] for n in PAIR) and probe["sum"] > probe[best_single] else
           "On this draw the sum does not beat the better single source on both counts."))
    chart(st, charts.hscore_bar(m["names"], m["h"], None, None), key="lesson_mix_h")
    w = {label: dict(zip(m["bank"], ws, strict=True)) for label, ws in m["weights"].items()}
    st.markdown(
        "HGPrompt on the whole bank, learning the weights: with the paper's average it puts "
        + _weights_text(w["average"]) + "; with task arithmetic " + _weights_text(w["task arithmetic"])
        + "; with task arithmetic and lambda 0 (the H-score alone, no regulariser) "
        + _weights_text(w["task arithmetic, lambda 0"]) + ".")
    mixed = [n for n in PAIR if w["task arithmetic, lambda 0"].get(n, 0) > 0.25]
    if len(mixed) == 2 and sum(v > 0.01 for v in w["task arithmetic"].values()) == 1:
        st.markdown(
            "The regulariser is what keeps the mixture out: it penalises mixing sources whose gradients on the target "
            "differ, and two sources that know *different* halves of the answer differ by design. Whether to keep it "
            "is a question for the tuned accuracy. " + tuned_verdict())
    st.markdown("**Elsewhere.** " + elsewhere_verdict())


MIXING_JSON = os.path.join(os.path.dirname(assets.ASSETS), "bench", "results", "mixing.json")
DECISION_JSON = os.path.join(os.path.dirname(assets.ASSETS), "bench", "results", "decision.json")
LEARNED = "hgprompt_ta_h_only"  # the mixture task arithmetic learns at lambda 0: the rule this step teaches


def elsewhere_verdict(path: str = DECISION_JSON) -> str:
    """Both outcomes, from the decision benchmark's file: where the mixture the H-score prefers won after tuning and
    where it lost, on targets not built for the method, and what the short-tune decision made of them."""
    try:
        d = load_json(path)
        table, seeds = d["table"], d["seeds"]
        gaps = {t: 100 * (table[LEARNED][t]["mean"] - table["best_hscore"][t]["mean"]) for t in d["targets"]}
        pooled = d["against_selection"][LEARNED]["best_hscore"]
        rule = d["rules"][f"short tune, {SHORT['epochs']} epochs"]["minus_best_hscore"]
    except (UserInputError, OSError, ValueError, KeyError, TypeError):  # no benchmark file in this checkout
        return ("This case was built for mixing; on other targets a mixture the H-score prefers can lose after tuning "
                "(docs: Method notes, \"Fourth edition\"). The Weights tab's short-tune check asks tuning first.")
    won = sorted((t for t, g in gaps.items() if g >= 0.05), key=lambda t: -gaps[t])
    lost = sorted((t for t, g in gaps.items() if g <= -0.05), key=lambda t: gaps[t])
    def said(ts):
        return ", ".join(f"{t} {gaps[t]:+.1f}" for t in ts) or "none"

    def ci(p):
        return f"{100 * p['mean_diff']:+.2f} points [{100 * p['ci95'][0]:+.2f}, {100 * p['ci95'][1]:+.2f}]"

    comp = len(d.get("compositions", {}))
    return (f"Measured by `bench/decision.py` on {len(gaps)} targets ({comp} of them compositions fixed before any was "
            f"tuned; full recipe, seeds {seeds}): the mixture task arithmetic learns at lambda 0, minus the best "
            f"single source by H-score, after tuning (mean points per target): ahead on {said(won)}; behind on "
            f"{said(lost)}; level on the rest. Pooled: {ci(pooled)}. So a mixture the H-score ranks first is a "
            f"candidate, not a promise: choosing by a short tune instead (what the Weights tab's check does) gives "
            f"{ci(rule)} against the same selection. Docs: Method notes, \"Fourth edition\".")


def tuned_verdict(path: str = MIXING_JSON) -> str:
    """What the mixing benchmark measured after tuning on this case (its file, when the checkout has it)."""
    try:
        known = load_json(path)["known_answer"]
        lines, lows, highs = [], [], []
        for regime, r in known["regimes"].items():
            p = r["minus_singles"][f"sum({PAIR[0]},{PAIR[1]})"][r["better_single"]]
            n = "all 800" if regime == "all" else regime
            lines.append(f"{100 * p['mean_diff']:+.1f} points [{100 * p['ci95'][0]:+.1f}, {100 * p['ci95'][1]:+.1f}] "
                         f"with {n} train images")
            lows.append(p["ci95"][0])
            highs.append(p["ci95"][1])
    except (UserInputError, OSError, ValueError, KeyError, TypeError):  # no benchmark file in this checkout
        return "The Tuning tab measures it (docs: Method notes)."
    verdict = ("So here the regulariser costs accuracy." if lows and min(lows) > 0 else
               "So here the regulariser was right." if highs and max(highs) < 0 else
               "These seeds do not settle it.")
    return (f"Measured by `bench/mixing.py` (full tuning recipe, seeds {known['seeds']}): the sum minus the better "
            f"single source, {'; '.join(lines)} (95 % intervals over seeds). {verdict} Docs: Method notes.")


def page() -> None:
    st.title("Lesson: mixing prompts")
    try:
        assets.require()
    except UserInputError as exc:
        st.error(str(exc))
        return
    target = assets.default_target()
    if not current_workspace().is_default:
        st.info("The lesson runs on the embedded default (its 64 px backbone, its shipped prompts and targets), not on "
                "the workspace open in the sidebar: its steps and numbers are written for that default. Every other "
                "page runs on your workspace.")
    restore("lesson_step", lambda v: 0 <= v < len(STEPS), like=0,  # the step survives a reload, as the run does
            what=f"a step 0..{len(STEPS) - 1}")
    k = st.session_state.setdefault("lesson_step", 0)
    if getattr(st.session_state.get(RESULT), "backbone_fingerprint", None) not in (None, backbone().fingerprint):
        # a run on the workspace's backbone is not the lesson's; the Ensemble page reads it
        st.session_state.pop(RESULT)
        st.session_state.pop("restore_tried", None)  # back from its folder
    if RESULT not in st.session_state and JOB not in st.session_state:  # after a reload: the session's last run
        restored = ensemble_runs.latest_result(runs_dir(), _shipped, backbone().fingerprint)
        if restored is not None:
            st.session_state[RESULT] = restored
    st.progress((k + 1) / len(STEPS), text=f"Step {k + 1} of {len(STEPS)}: {STEPS[k]}")
    c1, c2, _ = st.columns([1, 1, 6])
    if c1.button("Back", key="lesson_back", disabled=k == 0):
        st.session_state.lesson_step = k - 1
        remember("lesson_step")
        st.rerun()
    if c2.button("Next", key="lesson_next", disabled=k == len(STEPS) - 1, type="primary"):
        st.session_state.lesson_step = k + 1
        remember("lesson_step")
        st.rerun()
    st.header(STEPS[k])
    if k == 0:
        _step_prompt(target)
    elif k in (1, 2):
        d = ensemble_runs.defaults()
        s = _scores(target, backbone().fingerprint, d["n_samples"], d["seed"])
        (_step_hscore if k == 1 else _step_average)(s)
    elif k == 3:
        _step_weights(target)
    elif k == 4:
        _step_interference(target)
    else:
        _step_mixing(target)

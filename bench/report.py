"""Write the results from bench/results/*.json: every table into docs/RESULTS.md, and the README's short results
section (between the RESULTS markers): the headline tables a newcomer needs, with a link to the rest.

    python bench/report.py          # rewrites docs/RESULTS.md and the block in README.md
"""
from __future__ import annotations

import json
import os
import re
import sys

import numpy as np

from core import PromptBank, assets
from core.evaluation import summary as ev
from core.evaluation.decision import SHORT, SHORT_CHOSEN_ON_SEEDS
from core.evaluation.summary import markdown  # the tables, drawn from the JSON's figures as the sweep draws them
from core.metrics.stats import paired

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
START, END = "<!-- RESULTS:START -->", "<!-- RESULTS:END -->"


def _load(name):
    path = os.path.join(RESULTS, name)
    return json.load(open(path)) if os.path.isfile(path) else None


def _all_read_back(jobs: dict) -> bool:
    """Every job of the run was read back from the store (so its wall time measures nothing)."""
    return jobs.get("read_from_store") == jobs["weights"] + jobs["tunes"]


def _read_back(jobs: dict) -> str:
    """What the wall time leaves out: the jobs an earlier run had finished (read back from the store)."""
    n = jobs.get("read_from_store")
    if not n:
        return ""
    which = "all of these jobs were" if _all_read_back(jobs) else f"{n} of these jobs were"
    return (f"; {which} read back from an earlier run's store, and every job's "
            f"own time adds up to {jobs['job_seconds'] / 3600:.1f} hours of one worker")


def quality_section(q, title: str = "Quality (`bench/quality.py`)") -> list[str]:
    """A quality table, generated from a JSON written by bench/quality.py (quality.json, quality-full.json)."""
    if "paired" not in q:  # a file from before the Ray evaluation
        return [f"### {title}", "", "This JSON predates the current protocol; rerun `python bench/quality.py`."]
    tc, seeds = q["tune_config"], q["seeds"]
    one = len(seeds) == 1
    singles = "every source" if q["singles"] == "all" else f"the {q['singles']} sources with the highest H-score"
    few = len(seeds) < ev.MIN_SEEDS_TO_MARK
    last = tc.get("select") == "last"
    spread = (f"one seed ({seeds[0]}), so no spread over seeds" if one else f"mean ± std over seeds {seeds}")
    spread += f" and no entry marked best (that takes {ev.MIN_SEEDS_TO_MARK} seeds)" if few else ""
    lines = [f"### {title}", "",
             f"Test accuracy (%, {spread}; every seed redraws the 800/200 train/val split "
             f"from the pooled 1000 images, test fixed) after tuning every initialisation with the same recipe "
             f"({tc['epochs']} epochs, {tc['optimizer']}, prompt lr {tc['lr']}, head lr {tc['head_lr']}, "
             f"{int(100 * tc['warmup'])} % warm-up then cosine, head started from a probe fit"
             + ("; every tune reports its last epoch, not its best validation epoch" if last else "")
             + "). The oracle is the single "
             f"source with the best *validation* accuracy among {singles}; `oracle_test` (chosen on test) is an upper "
             "bound, not a method." + ("" if few else " A best entry is bold only where its paired bootstrap "
                                       "interval against the runner-up (over seeds) excludes 0; entries that are "
                                       "the same tune on every seed (HGPrompt's weights on the source with the best "
                                       "H-score) are bold together, against the best other tune.") +
             f" Command: `{q['command']}` ("
             + ("" if _all_read_back(q["jobs"]) else f"{q['seconds'] / 60:.0f} min on this 2-core CPU, ")
             + ("jobs run one after another in one process, " if q["engine"].get("serial") else
                f"Ray {q['engine']['version']}, ") + f"{q['jobs']['weights']} weight jobs + {q['jobs']['tunes']} "
             f"tune jobs{_read_back(q['jobs'])})." + _stale_bank(q), "", markdown(q), "",
             f"The second table is HGPrompt minus each baseline, pooled over {len(q['targets'])} targets x "
             f"{len(seeds)} seed{'' if one else 's'} (95 % percentile bootstrap over the pairs; a tie is the same "
             "accuracy). " + (f"Every tune reports the end of its schedule (no selection on validation); validation "
                              f"peaked at the initial state (epoch 0) in {100 * q['epoch0_fraction']:.0f} % of them."
                              if last else f"Validation kept the initial state (epoch 0) in "
                              f"{100 * q['epoch0_fraction']:.0f} % of the tunes."), ""]
    lines += against_lines(q)
    vpt = q["vpt_vs_linear_probe"]
    diff = (lambda p: f"{100 * p['mean_diff']:+.1f}") if one else _pct
    lines.append("VPT from random initialisation minus the linear probe, per target: "
                 + "; ".join(f"{t} {diff(p)}" for t, p in vpt.items())
                 + f" (at least the probe on {sum(p['mean_diff'] >= 0 for p in vpt.values())} of {len(vpt)}).")
    return lines


def against_lines(q) -> list[str]:
    """Every method minus selection by H-score and minus ``oracle_test`` (the single source chosen on test, which
    only a real mixture can pass), pooled over target x seed, with paired intervals; drawn from the JSON's per-target
    accuracies (a JSON from before ``against_selection`` gets the same figures computed here)."""
    ag = q.get("against_selection") or ev.against(q["per_target"])
    refs = [r for r in ("best_hscore", "oracle_test") if any(r in v for v in ag.values())]
    if not refs:  # also when no method was compared
        return []
    n = len(q["targets"]) * len(q["seeds"])
    cell = lambda p: f"{_pct(p, 2)} ({p['wins']} / {p['ties']} / {p['losses']})"
    lines = [f"Every method minus selection by H-score (`best_hscore`) and minus `oracle_test`, pooled over {n} "
             "(target, seed) pairs (points; 95 % bootstrap interval; wins / ties / losses). Above `oracle_test` "
             "is where a mixture beats every single source on test.", "",
             "| method | " + " | ".join(f"minus {r}" for r in refs) + " |", "|---|" + "---|" * len(refs)]
    lines += [f"| {m} | " + " | ".join(cell(v[r]) for r in refs) + " |" for m, v in ag.items()]
    return lines + [""]


def selection_section(a, b) -> list[str]:
    """The same tunes reported at the schedule's end and at the best validation epoch (two quality JSONs that differ
    only in ``tune_config["select"]``), on the seeds both hold: which conclusions depend on the reported epoch."""
    by = {q["tune_config"].get("select", "val"): q for q in (a, b)}
    seeds = [s for s in a["seeds"] if s in b["seeds"]]
    if (set(by) != {"val", "last"} or not seeds or a["targets"] != b["targets"]
            or a.get("sources") != b.get("sources")):  # another bank's tunes are not the same tunes
        return []
    same = a["seeds"] == b["seeds"]
    last, val = ({"table": ev.table(pt), "paired": ev.paired_summary(pt), "vpt": ev.vpt_vs_probe(pt)}
                 for pt in (ev.on_seeds(by[k]["per_target"], seeds) for k in ("last", "val")))
    ci = lambda p: _pct(p, 2)
    ge = lambda q: sum(p["mean_diff"] >= 0 for p in q["vpt"].values())
    lines = ["#### The same tunes, reported at the best validation epoch", "",
             f"Every tune above, with the same trajectory (the validation curves are the same), reported at its best "
             f"validation epoch instead of the schedule's end (`{by['val']['command']}`)"
             + ("" if same else f", on seeds {seeds} (the ones both reports hold)") + ". Mean test accuracy over "
             f"targets and seeds, and HGPrompt minus each baseline (95 % bootstrap interval, pooled over "
             f"{len(a['targets'])} targets x {len(seeds)} seeds):", "",
             "| method | last epoch | best validation epoch |", "|---|---|---|"]
    for m in last["table"]:
        lines.append(f"| {m} | {100 * last['table'][m]['mean_over_targets']:.1f} | "
                     f"{100 * val['table'][m]['mean_over_targets']:.1f} |")
    lines += ["", "| HGPrompt minus | last epoch | best validation epoch |", "|---|---|---|"]
    lines += [f"| {m} | {ci(last['paired'][m])} | {ci(val['paired'][m])} |" for m in last["paired"]]
    lines += ["", f"VPT from random initialisation is at least the linear probe on {ge(last)} of "
              f"{len(a['targets'])} targets at the last epoch, {ge(val)} at the best validation epoch."]
    return lines


def method_section(m) -> list[str]:
    """The method checks, generated from bench/results/method.json (written by bench/method.py)."""
    s, t = m["summary"], m["timing"]
    rho = s["spearman_with_mixing_loss"]
    lines = ["### Method checks (`bench/method.py`)", "",
             f"On {', '.join(m['targets'])} (the targets shipped when it was run) and seeds {m['seeds']}, on the fit's "
             f"own target sample. Command: `{m['command']}` ({m['seconds'] / 60:.0f} min on this 2-core CPU)."
             + _stale_bank(m), "",
             f"- Fits whose objective reached their best candidate (best single source or uniform point, to 1e-3): "
             f"{s['fits_reaching_best_candidate']} (every regulariser, lambda 0 and 1, EG and Adam).",
             "- The H-score-only optimum is a single source in " + ", ".join(
                 f"{k} {v}" for k, v in s["h_only_optimum_is_a_single_source"].items()) + " fits.",
             "- The default regulariser (`fishr`) is non-zero at the uniform point on " + ", ".join(
                 k for k, v in s["default_regularizer_nonzero_at_uniform"].items() if v) + "; it changes the weights "
             "(by more than 0.01) on " + (", ".join(k for k, v in s["default_regularizer_changes_weights"].items() if v)
                                          or "no target") + ".",
             "- Pairs (of 15) whose midpoint scores below the mean of its ends, per seed: " + "; ".join(
                 f"{k} {', '.join(map(str, v))}" for k, v in s["negative_mixing_loss_pairs"].items()) + ".",
             "- Spearman correlation with the measured mixing loss, mean over seeds: " + "; ".join(
                 f"**{v}** " + ", ".join(f"{k} {x:+.2f}" for k, x in rho[v]["per_target_mean"].items())
                 + f" (pooled {rho[v]['pooled_mean']:+.2f})" for v in ("raw", "centred", "derivative")) + ".",
             f"- Against accuracy: for three pairs per target the probe accuracy at the midpoint minus the mean of the "
             f"ends has the sign of the measured I in {s['pairs_where_accuracy_loss_has_the_sign_of_I']} pairs "
             f"(Spearman {s['spearman_I_vs_accuracy_mixing_loss_pooled']:+.2f} pooled).",
             f"- Time: the default fit on `{t['default_target']}` {t['default_fit_seconds']:.1f} s "
             f"({t['default_fit_steps']} steps, from {t['default_fit_start']}); one weight step "
             f"{t['weight_step_seconds']:.2f} s = {t['ratio_weight_step_over_vpt_step']:.2f}x a plain prompt-tuning "
             f"step on the same {t['n_samples']} samples; the source pass (K gradients and Fisher vectors) "
             f"{t['source_pass_seconds']:.1f} s = {t['source_pass_over_one_forward_backward_of_K_prompts']:.2f}x one "
             "forward-backward of the K prompts, paid once before the loop."]
    if "kendall_tau_hscore_vs_probe_accuracy" in m:
        k = m["kendall_tau_hscore_vs_probe_accuracy"]
        lines.append("- Kendall's tau between the sources' H-scores and their probe accuracies (seed 0), 128 samples "
                     "-> auto: " + "; ".join(f"{t} {v['n128']:+.2f} -> {v['auto']:+.2f}" for t, v in k.items()) + ".")
    return lines


def speed_section(s) -> list[str]:
    lines = ["### Speed (`bench/speed.py`)", "",
             f"Backbone `{s['backbone']['name']}` (D={s['backbone']['embed_dim']}, depth {s['backbone']['depth']}), "
             f"device {s['device']}, T=10 shallow prompts, best of repeats. Command: `{s['command']}`"
             + (f" ({s['seconds'] / 60:.0f} min on this 2-core CPU)." if "seconds" in s else "."), "",
             "| K | N | ensemble step / VPT step | batched vs loop of K passes | batched vs retain_graph loop | "
             "batched peak MB |",
             "|---|---|---|---|---|---|"]
    for c in s["cases_by_K"] + s["cases_by_N"]:
        lines.append(f"| {c['K']} | {c['N']} | {c['ratio_ensemble_over_vpt_step']:.2f}x | "
                     f"{c['speedup_batched_vs_loop']:.2f}x | {c['speedup_batched_vs_retain_graph_loop']:.2f}x | "
                     f"{c['batched_grads']['peak_mb']:.0f} |")
    u = s["utilisation"]
    lines += ["", f"Prompted forward+backward: {u['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s against "
              f"{u['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s for a {u['matmul_size']}^2 matmul in the same run "
              f"(utilisation {u['utilisation_vs_matmul']:.2f})."]
    if "maps" in s:
        m = s["maps"]
        pca_cold = (f" ({m['pca_cold_seconds_incl_import']:.1f} s the first time, importing scikit-learn)"
                    if "pca_cold_seconds_incl_import" in m else "")
        lines.append(f"Maps of {m['n_points']} target features: PCA {m['pca_seconds']:.2f} s{pca_cold}, UMAP cold "
                     f"{m['umap_cold_seconds_incl_import']:.1f} s (import and numba compile), warm "
                     f"{m['umap_warm_seconds']:.1f} s.")
    if "embedded_default" in s:
        e = s["embedded_default"]
        lines.append(f"Embedded default: loading backbone, bank and every task {e['load_seconds']:.1f} s (after "
                     f"{e['import_seconds']:.1f} s of imports); the default ensemble run on `{e['default_target']}` "
                     f"{e['default_ensemble_seconds_incl_preprocessing']:.1f} s including preprocessing.")
    return lines


def dashboard_section(d) -> list[str]:
    lines = ["### Dashboard (`bench/dashboard.py`)", "",
             "Served with `streamlit run` on this 2-core CPU and driven by headless Chromium on the same machine "
             f"(so the browser's drawing competes with the run). Command: `{d['command']}`.", "",
             "| measure | seconds |", "|---|---|",
             f"| launch to a healthy `/_stcore/health` | {d['health_seconds_after_launch']:.1f} |"]
    rows = [("click Run (defaults) to the live weights", "click_to_live_weights_seconds"),
            ("click Run (defaults) to the final weight chart", "click_to_final_weights_seconds"),
            ("open the Feature maps tab, first time (features + PCA + drawing)", "browser_map_tab_cold_seconds"),
            ("open the Feature maps tab again (cached)", "browser_map_tab_cached_seconds"),
            ("switch to UMAP, first time (numba compile + UMAP)", "browser_umap_cold_seconds"),
            ("cached map redraw without a browser (AppTest rerun)", "results_page_with_map_cached_seconds"),
            ("Conflicts tab: measure interference", "interference_seconds"),
            ("Conflicts tab: compute the simplex view", "simplex_cold_seconds"),
            ("Conflicts tab: compute the task-vector plane (21 x 21 prompts)", "plane_first_seconds")]
    for label, key in rows:
        if d.get(key) is not None:
            lines.append(f"| {label} | {d[key]:.2f} |")
    series = [("switch between cached PCA and UMAP maps, WebDriver's clock", "browser_map_switch_cached_seconds"),
              ("the same switch on the page's clock (click to the new map drawn)",
               "page_clock_map_switch_cached_seconds"),
              ("switch back to the computed simplex view, WebDriver's clock", "cached_simplex_redraw_seconds"),
              ("the same switch on the page's clock", "page_clock_cached_simplex_redraw_seconds"),
              ("switch back to the computed task-vector plane, WebDriver's clock", "plane_cached_redraw_seconds"),
              ("the same switch on the page's clock", "page_clock_plane_cached_redraw_seconds")]
    for label, key in series:
        if d.get(key):
            lines.append(f"| {label} | " + ", ".join("-" if v is None else f"{v:.2f}" for v in d[key]) + " |")
    where = {"layerwise": " (deep bank)",
             # the defaults again: the server's cache of identical runs serves it, so this times the cache
             "average": " (the first click's settings: served from the server's cache of identical runs)"}
    for rule, sec in (d.get("click_to_final_weights_by_rule_seconds") or {}).items():
        if not rule.endswith("_error"):
            lines.append(f"| click Run to the final weights, mixing rule {rule}{where.get(rule, '')}, new session | "
                         + ("failed" if sec is None else f"{sec:.1f}") + " |")
    if d.get("browser_error"):
        lines += ["", f"Browser run failed: {d['browser_error']}"]
    return lines


def classroom_section(c) -> list[str]:
    secs = [v for v in c["click_to_weights_seconds"] if v is not None]
    return ["### A class on one server (`bench/classroom.py`)", "",
            f"{c['sessions']} sessions of the real app (AppTest, in one process on this 2-core CPU) click Run on the "
            f"defaults over {c['clicks_spread_seconds']:.0f} s. Command: `{c['command']}`.", "",
            "| measure | value |", "|---|---|",
            f"| fits computed | {c['fits_computed']} |",
            f"| sessions that saw their weights | {c['sessions_with_weights']} of {c['sessions']} |",
            f"| served from another session's identical run | {c['served_from_another_run']} |",
            f"| each session its own run folder | {'yes' if c['own_run_folder_each'] else 'no'} |",
            f"| click to weights drawn: median, slowest (s) | {c['median_seconds']:.1f}, {c['max_seconds']:.1f} |",
            f"| click to weights drawn, every session (s) | {', '.join(f'{v:.1f}' for v in secs)} |"]


def _pct(p: dict, digits: int = 1) -> str:
    """A paired difference in points with its 95 % interval: ``+0.35 [+0.19, +0.54]``."""
    return (f"{100 * p['mean_diff']:+.{digits}f} [{100 * p['ci95'][0]:+.{digits}f}, "
            f"{100 * p['ci95'][1]:+.{digits}f}]")


def mixing_section(mx) -> list[str]:
    """Mixing rules and objectives, generated from bench/results/mixing.json (written by bench/mixing.py)."""
    import numpy as np

    ot, ka, tm = mx["objective_tau"], mx["known_answer"], mx["timing"]
    targets = list(ot["per_target"])
    n_mix = {len(v["mixtures"]) for v in ot["per_target"].values()}
    lines = ["### Mixing rules and objectives (`bench/mixing.py`)", "",
             f"Command: `{mx['command']}` ({mx['seconds'] / 60:.0f} min on this 2-core CPU, with the job store's "
             f"finished jobs read back). Kendall's tau between each objective and accuracy, per target and then "
             f"averaged over {len(targets)} targets: against the probe accuracy (logistic regression on the frozen "
             "features of the 800 train images, scored on the 1000 test images) over "
             f"{'/'.join(map(str, sorted(n_mix)))} "
             "mixtures per target (every single source, the uniform average, every pair's midpoint and task-arithmetic "
             "sum, the full sum, TIES), and against the tuned test accuracy (20 epochs, prompt lr 1e-2, last epoch, "
             "seed 0) of six of them.", "",
             "| objective | tau vs probe accuracy | tau vs tuned accuracy |", "|---|---|---|"]
    for o, v in ot["pooled"].items():
        lines.append(f"| {o} | {v['tau_probe_mean']:+.2f} | {v['tau_tuned_mean']:+.2f} |")
    probe_tuned = next(iter(ot["pooled"].values()))["tau_probe_over_tuned_mixtures_mean"]
    lines += ["", f"The probe accuracy itself against the tuned accuracy over the same six mixtures: tau "
              f"{probe_tuned:+.2f}. Best objective against the probe: `{ot['best_against_probe']}`; against tuning: "
              f"`{ot['best_against_tuned']}`.", ""]
    a, b = ka["sources"]
    lines += [f"**A case whose answer is a mixture**: `{ka['target']}` with `{a}` and `{b}` in the bank of "
              f"{len(mx['sources'])} sources (assets/README.md says why); test accuracy (%) after tuning, "
              f"mean ± std over seeds {ka['seeds']}. `mid` is the paper's average of the two, `sum` the full-strength "
              "task-arithmetic sum `P0 + tau_a + tau_b`; `learned:` rows are what HGPrompt learns on the whole bank "
              "(rule / objective / lambda), with its mean weights on the two sources.", ""]
    regimes = list(ka["regimes"])
    label = {r: ("all 800 train images" if r == "all" else f"{r} train images") for r in regimes}
    lines += ["| initial prompt | weights on (" + f"{a}, {b}) | " + " | ".join(label[r] for r in regimes) + " |",
              "|---|---|" + "---|" * len(regimes)]
    # The learned mixtures tuned in every regime (the few-shot regime tunes every objective's: the JSON has them).
    rows = [c for c in dict.fromkeys(c for r in regimes for c in ka["regimes"][r]["test_acc"])
            if all(c in ka["regimes"][r]["test_acc"] for r in regimes)]
    for c in rows:
        key = c.split(":", 1)[1] if c.startswith("learned:") else None
        w = "" if key is None else "{:.2f}, {:.2f}".format(*np.mean(list(ka["weights_on_the_pair"][key].values()), 0))
        cells = []
        for r in regimes:
            acc = ka["regimes"][r]["test_acc"].get(c)
            cells.append("" if acc is None else f"{100 * np.mean(acc):.1f} ± {100 * np.std(acc):.1f}")
        lines.append(f"| {c} | {w} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in regimes:
        reg = ka["regimes"][r]
        better = reg["better_single"]
        show = [c for c in reg["minus_singles"] if c.startswith(("sum", "mid")) or c in (
            "learned:average/hscore/lam1", "learned:task_arithmetic/hscore/lam1",
            "learned:task_arithmetic/hscore/lam0")]
        lines.append(f"- {label[r]}: minus the better single source (`{better}`), paired over seeds: "
                     + "; ".join(f"{c} {_pct(reg['minus_singles'][c][better])}" for c in show) + ".")
    lines += ["", f"Time on `{ka['target']}`: the default fit {tm['default_fit_seconds']:.1f} s, a task-arithmetic fit "
              f"{tm['task_arithmetic_fit_seconds']:.1f} s ({tm['ta_fit_steps']} steps, from {tm['ta_start']}); one "
              f"weight step {tm['weight_step_seconds']:.2f} s = {tm['weight_step_over_vpt_step']:.2f}x a plain "
              f"prompt-tuning step on the same {tm['n_samples']} samples."]
    return lines


def _stale_bank(q) -> str:
    """A sentence when a JSON's sources are not the shipped bank's (the bank was rebuilt after it ran)."""
    shipped = sorted(PromptBank.load(assets.PROMPTS_DIR).names)
    ran = q.get("sources")
    if not ran or sorted(ran) == shipped:
        return ""
    return (f" **These figures were measured on another bank** ({len(ran)} sources: {', '.join(ran)}), not the "
            f"shipped one ({len(shipped)} sources: {', '.join(shipped)}); docs/BENCHMARKS.md says what changed.")


def decision_section(dj) -> list[str]:
    """The decision bench (bench/decision.py): which rule picks the initial prompt, against selection by H-score."""
    n_t, seeds = len(dj["targets"]), dj["seeds"]
    known = "shapes_quad"  # the designed known-answer case (bench/mixing.py), tuned long before the others existed
    comp = ", ".join(f"`{t}`" for t in dj.get("compositions", {}) if t != known)
    return ["### Choosing the initial prompt (`bench/decision.py`)", "",
            f"Each rule picks one of the candidates ({', '.join(f'`{c}`' for c in dj['candidates'])}) per (target, "
            f"seed); the table is the chosen candidate's full tune (the full recipe, 20 epochs) minus selection by "
            f"H-score (`best_hscore`) and minus the best single source chosen on test (`oracle_test`), in points, "
            f"pooled over {n_t} targets x {len(seeds)} seeds (95 % bootstrap interval; wins / ties / losses)"
            + (f"; `{known}` is the designed known-answer case" if known in dj.get("compositions", {}) else "")
            + (f"; the composition targets {comp} were fixed before any of them was tuned" if comp else "")
            + f". Command: `{dj['command']}`.", "", dj["markdown"], *held_out_lines(dj)]


def held_out_lines(dj) -> list[str]:
    """The registry's decision on the seeds its short schedule was not chosen on, against selection and oracle_test."""
    rule = dj["rules"].get(f"short tune, {SHORT['epochs']} epochs")
    rows = [r for r in (rule or {}).get("rows", []) if r["seed"] not in SHORT_CHOSEN_ON_SEEDS]
    if not rows:
        return []
    acc = np.array([r["test_acc"] for r in rows])
    parts = []
    for ref in ("best_hscore", "oracle_test"):
        p = paired(acc, np.array([r[ref] for r in rows]))
        parts.append(f"minus `{ref}` {_pct(p, 2)} ({p['wins']}/{p['ties']}/{p['losses']})")
    seeds = sorted({r["seed"] for r in rows})
    return ["", f"Held out: the decision's schedule ({SHORT['epochs']} epoch) was chosen on seeds "
            f"{', '.join(map(str, SHORT_CHOSEN_ON_SEEDS))}; on seeds {', '.join(map(str, seeds))} alone "
            f"({len(rows)} pairs) the decision is " + "; ".join(parts) + "."]


GOALS = {"fit": ("the default fit on shapes_quad", 5),
         "fit_with_callback": ("the same fit with a callback (CLI, dashboard)", 5),
         "plane": ("the task-vector plane (coarse to fine)", 20),
         "plane_full_grid": ("the task-vector plane (21 x 21)", 20),
         "weight_step": ("one weight step", None), "tuning_step": ("one prompt-tuning step", None)}


def goals_section(g) -> list[str]:
    """bench/speed.py's goals (issue 34), a checkout before and this one after, in one sitting."""
    lines = ["### Speed goals (`bench/speed.py --goals-only --before CHECKOUT`)", "",
             "Seconds, FLOPs (counted), achieved GFLOP/s and the fraction of a 2048 x 2048 fp32 matmul's GFLOP/s "
             "measured in the same process just before and after each job (the machine's load changes between the two "
             "sittings; the fraction is the comparable figure). Before: commit `"
             + g["before"].get("commit", g["before"]["checkout"])
             + "`; after: commit `" + g["after"].get("commit", "this checkout") + "`. "
             f"Command: `{g['command']}`.", "",
             "| job | goal (s, quiet) | before: s / GFLOP / fraction | after: s / GFLOP / fraction |",
             "|---|---|---|---|"]
    before, after = g["before"]["goals"]["jobs"]["fp32"], g["after"]["goals"]["jobs"]["fp32"]

    def cell(j):
        return f"{j['seconds']:.2f} / {j['flops'] / 1e9:.0f} / {j['fraction_of_roofline']:.2f}"

    for name, (what, goal) in GOALS.items():
        b = before.get(name) or (before.get("plane_full_grid") if name == "plane" else None)
        a = after.get(name)
        if a is None:
            continue
        if name == "plane" and "plane" not in before and b is not None:
            what += " (before: the whole 21 x 21 lattice)"
        lines.append(f"| {what} | {goal if goal else ''} | {cell(b) if b else ''} | {cell(a)} |")
    dash = [g[w]["goals"].get("dashboard", {}) for w in ("before", "after")]
    if any("click_to_final_weights_seconds" in d for d in dash):
        def secs(d):
            return f"{d['click_to_final_weights_seconds']:.1f}" if "click_to_final_weights_seconds" in d else ""

        lines.append(f"| click Run to the final weights, a freshly launched dashboard (Chromium; seconds only) | 15 "
                     f"| {secs(dash[0])} | {secs(dash[1])} |")
    return lines


def precision_section(pj) -> list[str]:
    """bench/precision.py: what bf16 autocast changes against float32 on every shipped target (the default's basis)."""
    sm = pj["summary"]
    ci = sm.get("test_acc_change_ci95") or [float("nan"), float("nan")]
    rows = [("sources' H-score ranking equal (fit's sample)", f"{sm['source_rankings_equal']} / {sm['samples']}"),
            ("best source equal", f"{sm['source_top_equal']} / {sm['samples']}"),
            ("largest H-score change", f"{sm['source_max_abs_hscore_change']:.4f}"),
            ("default fit: weights equal", f"{sm['default_weights_equal']} / {sm['fits']}"),
            ("task arithmetic, lambda 0: weights equal", f"{sm['task_arithmetic_h_only_weights_equal']} / {sm['fits']}"
             f" (largest change {sm['task_arithmetic_h_only_max_abs_weight_change']:.3f})"),
            ("2-epoch tune, bf16 minus fp32 test accuracy (points)",
             f"{100 * sm['test_acc_change_mean']:+.2f} [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}] ({sm['tunes']} tunes)"),
            ("bf16's speed-up of the fit (fp32 seconds / bf16 seconds, median)", f"{sm['fit_speedup_median']:.2f}x")]
    return ["### Precision (`bench/precision.py`)", "",
            f"Every shipped target ({len(pj['targets'])}) on its fit's sample, in float32 and under bf16 autocast, "
            f"seeds of the fits and the paired tunes as in the command; {pj['threads']} thread(s) on this CPU"
            + (f" ({pj['note']})" if pj.get("note") else "") + f". Command: `{pj['command']}`.", "",
            "| measure | bf16 against fp32 |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows]]


def scale_section(sc) -> list[str]:
    """bench/scale.py: the method at ViT size on this machine, and the labelled projection of the VTAB-1k study."""
    st = sc["settings"]
    load = sc["load_average"]
    lines = ["### Scale (`bench/scale.py`)", "",
             f"timm ViTs with random weights from a seed at {st['img_size']} px, K = {st['sources']} prompts of "
             f"{st['tokens']} tokens, on this {sc['device']} ({sc['threads']} threads; one-minute load average "
             f"{load['start'][0]:.1f} at the start, {load['end'][0]:.1f} at the end: other work shared the cores). "
             "Seconds of one source pass (K x N rows, forward and backward with the Fisher vectors), one weight step, "
             "one tuning step and one evaluation forward; a row's FLOPs counted; peak bytes of live tensors. Command: "
             "`python bench/scale.py`" + ("" if sc.get("complete") else " (cut short: the cases below finished)")
             + ".", "",
             "| model | prompts | source pass (s, rows) | weight step (s) | tuning step (s, batch) "
             "| eval forward (s) | GFLOP a row forward | MiB a row: no grad / autograd |",
             "|---|---|---|---|---|---|---|---|"]
    for model, cases in sc["models"].items():
        for c in cases:
            if "source_pass" not in c:
                continue
            b = c["bytes_per_row"]
            lines.append(f"| {model} | {c['kind']} | {c['source_pass']['seconds']:.1f} ({c['K'] * c['N_source_pass']}) "
                         f"| {c['weight_step']['seconds']:.2f} | {c['tuning_step']['seconds']:.2f} "
                         f"({c['tuning_step']['batch']}) | {c['eval_forward']['seconds']:.2f} "
                         f"| {c['flops_per_row']['forward'] / 1e9:.1f} | {b['no_grad_peak'] / 2**20:.1f} / "
                         f"{b['autograd_saved'] / 2**20:.1f} |")
    p = sc.get("vtab1k_projection")
    if p:
        lines += ["", "PROJECTION, not a measurement: the whole VTAB-1k study (19 targets x "
                  f"{p.get('seeds', 5)} seeds, leave-one-out banks of {p['K_leave_one_out']} sources) from these "
                  f"FLOPs, at {p['assumed_gpu']}: "
                  + "; ".join(f"{k} {v['gpu_hours']:.1f} GPU hours" for k, v in p["cases"].items()) + "."]
    return lines


def sections() -> list[str]:
    """Every results table, in the order docs/RESULTS.md shows them."""
    parts = []
    q, s, d, m = _load("quality.json"), _load("speed-cpu.json"), _load("dashboard.json"), _load("method.json")
    c, mx, dj = _load("classroom.json"), _load("mixing.json"), _load("decision.json")
    if dj:
        parts += decision_section(dj) + [""]
    if mx:
        parts += mixing_section(mx) + [""]
    if m:
        parts += method_section(m) + [""]
    if q:
        parts += quality_section(q) + [""]
    qf = _load("quality-full.json")
    if qf:
        parts += quality_section(qf, "Quality at the full budget (`bench/quality.py --full`)") + [""]
        other = _load(f"quality-full-{'val' if qf['tune_config'].get('select') == 'last' else 'last'}.json")
        if other:
            parts += selection_section(qf, other) + [""]
    sc = _load("scale.json")
    if sc and sc.get("models"):
        parts += scale_section(sc) + [""]
    sg = _load("speed-goals.json")
    if sg:
        parts += goals_section(sg) + [""]
    pj = _load("precision.json")
    if pj and pj.get("summary", {}).get("fits"):
        parts += precision_section(pj) + [""]
    if s:
        parts += speed_section(s) + [""]
    if d:
        parts += dashboard_section(d) + [""]
    if c:
        parts += classroom_section(c) + [""]
    return parts


def first_table(lines: list[str]) -> list[str]:
    """A section's title, its first paragraph and its first table (the README's short form of a section)."""
    out, seen_table = [], False
    for line in "\n".join(lines).split("\n"):
        if line.startswith("|"):
            seen_table = True
        elif seen_table:
            break
        out.append(line)
    return out


def readme_section() -> list[str]:
    """The README's results: the full-recipe quality table and the decision's, the rest linked."""
    parts = ["## Results", "",
             "The headline tables; every table, with its command, time and caveats: [docs/RESULTS.md](docs/RESULTS.md) "
             "(written by `python bench/report.py` from `bench/results/*.json`).", ""]
    qf, dj = _load("quality-full.json"), _load("decision.json")
    if qf:
        parts += first_table(quality_section(qf, "Quality at the full budget (`bench/quality.py --full`)")) + [""]
    if dj:
        parts += decision_section(dj) + [""]
    return parts


def replace_block(text: str, block: str) -> str:
    if START in text:
        return re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    return text.rstrip() + "\n\n" + block + "\n"


def main(readme: str | None = None, results_md: str | None = None) -> int:
    readme = readme or os.path.join(ROOT, "README.md")
    results_md = results_md or os.path.join(ROOT, "docs", "RESULTS.md")
    full = "\n".join(["# Results", "", "Written by `python bench/report.py` from `bench/results/*.json`; how each "
                       "benchmark runs and what earlier figures said: [BENCHMARKS.md](BENCHMARKS.md).", "",
                       *sections()]).rstrip() + "\n"
    with open(results_md, "w") as fh:
        fh.write(full.replace("### ", "## "))
    block = "\n".join([START, *readme_section(), END])
    with open(readme) as fh:
        text = fh.read()
    with open(readme, "w") as fh:
        fh.write(replace_block(text, block))
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write the README's results section from bench/results/*.json (between the RESULTS markers).

    python bench/report.py          # rewrites the block in README.md
"""
from __future__ import annotations

import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
START, END = "<!-- RESULTS:START -->", "<!-- RESULTS:END -->"


def _load(name):
    path = os.path.join(RESULTS, name)
    return json.load(open(path)) if os.path.isfile(path) else None


def _epoch0_line(q) -> str:
    """How often validation kept the initial state (initial prompt + probe-fitted head) over the tuned one."""
    kept = total = 0
    for runs in q["per_target"].values():
        for r in runs:
            for m, v in r["methods"].items():
                if m in ("best_hscore", "oracle") or v.get("same_as"):  # copies of another tune
                    continue
                total += 1
                kept += v["best_epoch"] == 0
    return (f"Model selection on val kept the initial state (the initial prompt with its probe-fitted head) over "
            f"the tuned one in {kept} of {total} tunes ({100 * kept / max(1, total):.0f} %): at this budget the "
            "table mostly compares initial prompts.")


def quality_section(q) -> list[str]:
    lines = ["### Quality (`bench/quality.py`)", "",
             f"Test accuracy (%, mean ± std over seeds {q['seeds']}) on the shipped targets after tuning every "
             f"initialisation with the same budget ({q['tune_config']['epochs']} epoch{'s' if q['tune_config']['epochs'] != 1 else ''}, prompt lr "
             f"{q['tune_config']['lr']}, head lr {q['tune_config']['head_lr']}, head started from a probe fit); best "
             f"per column in bold. Command: `{q['command']}` ({q['seconds'] / 60:.0f} min on this 2-core CPU"
             f"{', ' + str(q['workers']) + ' worker processes' if q.get('workers', 1) > 1 else ''}).", "",
             q["markdown"], "",
             "Kendall's tau between the sources' H-scores and their single-source accuracies, per seed: " +
             "; ".join(f"{t}: {', '.join('n/a' if v != v else f'{v:+.2f}' for v in taus)}" for t, taus in q["kendall_tau"].items()) + ".",
             "", _epoch0_line(q),
             "", "Learned HGPrompt weights (seed 0):", "", "| target | " + " | ".join(q["sources"]) + " |",
             "|---|" + "---|" * len(q["sources"])]
    for t, w in q["weights"].items():
        lines.append(f"| {t} | " + " | ".join(f"{v:.2f}" for v in w["hgprompt"][0]) + " |")
    return lines


def speed_section(s) -> list[str]:
    lines = ["### Speed (`bench/speed.py`)", "",
             f"Backbone `{s['backbone']['name']}` (D={s['backbone']['embed_dim']}, depth {s['backbone']['depth']}), "
             f"device {s['device']}, T=10 shallow prompts, best of repeats. Command: `{s['command']}`"
             + (f" ({s['seconds'] / 60:.0f} min on this 2-core CPU)." if "seconds" in s else "."), "",
             "| K | N | ensemble step / VPT step | batched vs loop of K passes | batched vs retain_graph loop | batched peak MB |",
             "|---|---|---|---|---|---|"]
    for c in s["cases_by_K"] + s["cases_by_N"]:
        lines.append(f"| {c['K']} | {c['N']} | {c['ratio_ensemble_over_vpt_step']:.2f}x | {c['speedup_batched_vs_loop']:.2f}x | "
                     f"{c['speedup_batched_vs_retain_graph_loop']:.2f}x | {c['batched_grads']['peak_mb']:.0f} |")
    u = s["utilisation"]
    lines += ["", f"Prompted forward+backward: {u['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s against "
              f"{u['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s for a {u['matmul_size']}^2 matmul in the same run "
              f"(utilisation {u['utilisation_vs_matmul']:.2f})."]
    if "maps" in s:
        m = s["maps"]
        pca_cold = (f" ({m['pca_cold_seconds_incl_import']:.1f} s the first time, importing scikit-learn)"
                    if "pca_cold_seconds_incl_import" in m else "")
        lines.append(f"Maps of {m['n_points']} target features: PCA {m['pca_seconds']:.2f} s{pca_cold}, UMAP cold "
                     f"{m['umap_cold_seconds_incl_import']:.1f} s (import and numba compile), warm {m['umap_warm_seconds']:.1f} s.")
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
            ("cached map redraw without a browser (AppTest rerun)", "results_page_with_map_cached_seconds")]
    for label, key in rows:
        if d.get(key) is not None:
            lines.append(f"| {label} | {d[key]:.2f} |")
    if d.get("browser_map_switch_cached_seconds"):
        lines.append("| switch between cached PCA and UMAP maps, WebDriver's clock | "
                     + ", ".join(f"{v:.2f}" for v in d["browser_map_switch_cached_seconds"]) + " |")
    if d.get("page_clock_map_switch_cached_seconds"):
        lines.append("| the same switch on the page's clock (click to the new map drawn) | "
                     + ", ".join("-" if v is None else f"{v:.2f}" for v in d["page_clock_map_switch_cached_seconds"]) + " |")
    if d.get("browser_error"):
        lines += ["", f"Browser run failed: {d['browser_error']}"]
    return lines


def main() -> int:
    parts = ["## Results", ""]
    q, s, d = _load("quality.json"), _load("speed-cpu.json"), _load("dashboard.json")
    if q:
        parts += quality_section(q) + [""]
    if s:
        parts += speed_section(s) + [""]
    if d:
        parts += dashboard_section(d) + [""]
    block = "\n".join([START, *parts, END])
    readme = os.path.join(ROOT, "README.md")
    text = open(readme).read()
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    open(readme, "w").write(text)
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())

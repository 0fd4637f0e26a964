"""Command line: ``python -m core {info,build-bank,learn,tune,baselines,interference} ...``.

Every command that computes something writes a run folder (see :mod:`core.io.runs`). The flags of the weights,
the tuning and the interference measurement are read from the one options table (:mod:`core.options`), help texts
and defaults included, and checked as they are parsed. A user mistake prints one paragraph and exits with status 2;
Ctrl-C exits with 130 and leaves the run folder marked incomplete.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from .errors import UserInputError
from .options import SEED_RANGE, add_arguments, check_seed, values

TUNE = "tune_"  # the tuning options' dest prefix: they share names (lr, optimizer, seed) with the weights' options


# ----------------------------------------------------------------- arguments
def _seed(text: str) -> int:
    try:
        return check_seed(int(text), "--seed")
    except (ValueError, UserInputError):
        raise argparse.ArgumentTypeError(f"must be an integer in {SEED_RANGE[0]}..{SEED_RANGE[1]}, got {text!r}") from None


#: Input sizes a timm model name may be given (--img-size); timm refuses a size its patch size does not divide.
IMG_SIZE_RANGE = (8, 4096)


def _img_size(text: str) -> int:
    lo, hi = IMG_SIZE_RANGE
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise argparse.ArgumentTypeError(f"must be an integer in {lo}..{hi} (pixels), got {text!r}")
    return value


def _add_backbone(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", default=None,
                   help="a saved backbone folder (config.json + model.safetensors) or a timm model name; "
                        "default: the embedded backbone in assets/backbone")
    g.add_argument("--pretrained", action="store_true", help="download timm hub weights for a model name (needs internet)")
    g.add_argument("--checkpoint", default=None, help="local .safetensors weights for a timm model name")
    g.add_argument("--img-size", type=_img_size, default=None,
                   help=f"input size for a timm model name ({IMG_SIZE_RANGE[0]}..{IMG_SIZE_RANGE[1]} pixels)")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")


def _add_tune(p: argparse.ArgumentParser) -> None:
    from .tuning.tune import TuneConfig

    add_arguments(p.add_argument_group("tuning"), TuneConfig, prefix=TUNE)


def _add_ensemble(p: argparse.ArgumentParser) -> None:
    from .method.ensemble import HGPromptEnsemble

    add_arguments(p.add_argument_group("ensemble weights"), HGPromptEnsemble)


def build_parser() -> argparse.ArgumentParser:
    from .analysis.interference import InterferenceConfig
    from .evaluation.methods import DEFAULT_METHODS, describe

    parser = argparse.ArgumentParser(prog="python -m core", description="HGPrompt: multi-source visual prompt transfer.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="show the embedded default (backbone, prompts, tasks)")
    _add_backbone(p)

    p = sub.add_parser("build-bank", help="tune one source prompt per source task and save them as a bank",
                       description="Tunes every source from one shared start (VPT's random initialisation for --seed), "
                                   "records that start in the bank (so task arithmetic and TIES can use it), and "
                                   "reports each source at the end of its schedule (--select last) unless told "
                                   "otherwise; a prompt that did not move from its start is refused.")
    p.add_argument("--task", action="append", required=True, help="a source task (path or shipped name); repeat")
    p.add_argument("--out", required=True, help="bank folder to write the prompts into (made if missing)")
    p.add_argument("--overwrite", action="store_true", help="replace prompts of the same names already in --out")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--seed", type=_seed, default=0, help=f"seed of the tuning ({SEED_RANGE[0]}..{SEED_RANGE[1]})")
    _add_backbone(p)
    _add_tune(p)
    p.set_defaults(tune_select="last")

    for name, helptext in (("learn", "learn HGPrompt ensemble weights for a target"),
                           ("tune", "tune a target prompt from an initialisation"),
                           ("baselines", "run HGPrompt and the baselines on a target"),
                           ("interference", "measure interference between the source prompts on a target")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--target", required=True, help="target task: path (.npz, VTAB-1k folder, class folders) or shipped name")
        p.add_argument("--bank", default=None, help="prompt bank folder (default: assets/prompts)")
        p.add_argument("--sources", default=None, help="comma-separated prompt names (default: all in the bank)")
        p.add_argument("--runs-dir", default="runs")
        p.add_argument("--seed", type=_seed, default=0,
                       help="seed of the subset, weights and tuning; for baselines see --seeds")
        _add_backbone(p)
        if name in ("learn", "tune", "baselines"):
            _add_ensemble(p)
        if name in ("tune", "baselines"):
            _add_tune(p)
        if name == "tune":
            p.add_argument("--init", default="hgprompt",
                           help="random | none (linear probe) | uniform | hgprompt | source:NAME | weights:FILE.json")
        if name == "baselines":
            p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                           help=f"comma-separated method names or 'all' ({describe()})")
            p.add_argument("--seeds", type=_seed, nargs="+", default=[0],
                           help="the protocol's seeds: each redraws the train/val split (test fixed), the fit's sample "
                                "and the tuning's initialisation and batch order")
        if name == "interference":
            add_arguments(p.add_argument_group("interference"), InterferenceConfig)
    return parser


# ------------------------------------------------------------------ loading
def load_backbone(args: argparse.Namespace):
    from .io import assets
    from .model.device import resolve_device
    from .model.prompted_vit import PromptedViT

    device = resolve_device(args.device)
    spec = args.backbone
    if args.img_size is not None and (spec is None or os.path.isdir(spec)):
        raise UserInputError(f"--img-size {args.img_size} applies only to a timm model name given with --backbone; "
                             f"{'the embedded backbone' if spec is None else repr(spec)} has its own input size (its "
                             "config.json). Leave --img-size out, or give a timm model name.")
    if spec is not None and not os.path.isdir(spec) and (os.sep in spec or spec.startswith((".", "~")) or
                                                          os.path.exists(spec)):
        raise UserInputError(f"--backbone {spec!r} is not a folder with a saved backbone (config.json and "
                             "model.safetensors); give such a folder, or a timm model name such as vit_tiny_patch16_224.")
    if spec is None:
        assets.require()
        model = PromptedViT.from_directory(assets.BACKBONE_DIR)
    elif os.path.isdir(spec):
        model = PromptedViT.from_directory(spec)
    else:
        kw = {"img_size": args.img_size} if args.img_size else {}
        model = PromptedViT.create(spec, pretrained=args.pretrained, checkpoint=args.checkpoint, **kw)
    return model.to(device)


def load_bank(args: argparse.Namespace, model):
    from .io import assets
    from .io.prompt_bank import PromptBank

    folder = args.bank or assets.PROMPTS_DIR
    names = [n.strip() for n in args.sources.split(",") if n.strip()] if args.sources else None
    twice = [n for i, n in enumerate(names or []) if n in names[:i]]
    if twice:
        raise UserInputError(f"--sources names {twice[0]!r} twice; name each source once.")
    bank = PromptBank.load(folder, model=model, names=names)
    if len(bank) == 0:
        raise UserInputError(f"prompt bank {folder!r} holds no prompts (*.safetensors + *.json).")
    return bank


def load_task(spec: str):
    import warnings

    from .io.assets import task_path
    from .io.tasks import Task

    with warnings.catch_warnings():  # said once, as a "warning:" line (Python's own would name a source file)
        warnings.simplefilter("ignore")
        task = Task.load(task_path(spec))
    for note in task.notes:
        print(f"warning: {note}", file=sys.stderr)
    return task


def ensemble(args: argparse.Namespace):
    from .method.ensemble import HGPromptEnsemble

    return HGPromptEnsemble(**{**values(HGPromptEnsemble, args), "seed": args.seed})


def tune_config(args: argparse.Namespace, seed: int | None = None):
    from .tuning.tune import TuneConfig

    return TuneConfig(**{**values(TuneConfig, args, prefix=TUNE), "seed": args.seed if seed is None else seed})


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def _check_outputs(args: argparse.Namespace) -> None:
    """The run folder's parent can be written: checked before the backbone loads or anything is computed."""
    from .io.runs import check_output_folder

    check_output_folder(args.runs_dir, "--runs-dir")


def _base_config(args: argparse.Namespace, model) -> dict[str, Any]:
    cfg = {k: v for k, v in vars(args).items() if k != "func"}
    cfg["backbone_name"] = model.name
    cfg["backbone_fingerprint"] = model.fingerprint
    return cfg


# ----------------------------------------------------------------- commands
def cmd_info(args: argparse.Namespace) -> int:
    from .io import assets

    model = load_backbone(args)
    print(f"backbone: {model.name}  D={model.embed_dim} depth={model.depth} fingerprint={model.fingerprint}")
    print(f"input: {model.data_config()['input_size']}")
    if os.path.isdir(assets.PROMPTS_DIR):
        from .io.prompt_bank import PromptBank

        bank = PromptBank.load(assets.PROMPTS_DIR, model=model)
        for sp in bank:
            print(f"prompt {sp.name}: {sp.kind} T={sp.num_tokens} source={sp.source_task} acc={sp.source_accuracy}")
    for kind in ("source", "target"):
        for name in assets.shipped_tasks(kind):
            t = load_task(name)
            print(f"{kind} task {name}: {t.num_classes} classes, sizes {t.sizes()}")
    return 0


BANK_SCRATCH = ".bank-"


def cmd_build_bank(args: argparse.Namespace) -> int:
    import shutil

    from .io.runs import RunWriter, check_output_folder
    from .tuning.bank import build_source_prompt

    cfg = tune_config(args)
    out = check_output_folder(args.out, "--out")  # before anything is trained: a bad --out would lose the training
    check_output_folder(args.runs_dir, "--runs-dir")
    tasks = [load_task(t) for t in args.task]  # local inputs first: a missing file fails at once, not after the hub
    names = [t.name for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserInputError(f"two source tasks are named {twice[0]!r}; each prompt is saved under its task's name, so "
                             "give each task its own name.")
    from .io.prompt_bank import check_name

    for n in names:  # before any training: a prompt is saved under its task's name
        try:
            check_name(n)
        except UserInputError:
            raise UserInputError(f"source task {n!r} cannot name a prompt: use 1-100 letters, digits, '_', '-' or '.', "
                                 "starting with a letter or digit (rename the task: its folder, or the name saved in its "
                                 ".npz).") from None
    clash = [n for n in names if any(os.path.exists(os.path.join(out, f"{n}{ext}")) for ext in (".safetensors", ".json"))]
    if clash and not args.overwrite:
        raise UserInputError(f"{out!r} already holds a prompt named {clash[0]!r}" + (f" (and {len(clash) - 1} more)" if
                             len(clash) > 1 else "") + "; choose another --out, or pass --overwrite to replace them.")
    model = load_backbone(args)
    from .io.prompt_bank import load_start, save_start
    from .tuning.bank import shared_start

    start, info = shared_start(model, cfg.num_tokens, cfg.deep, cfg.seed)
    if os.path.isdir(out):
        existing, _ = load_start(out)
        if existing is not None and not torch_equal(existing, start):
            raise UserInputError(f"the bank in {out!r} was tuned from another start; prompts from two starts have no "
                                 "common task vectors. Use that bank's --seed, --tokens and --deep, or another --out.")
    from .io.safe_io import clean_stale_scratch, scratch_dir

    # Every prompt is written into a scratch folder beside --out and moved into place only when all are done: a
    # failure (a broken task, Ctrl-C) leaves --out as it was. One that a killed build-bank left is removed here.
    stale = clean_stale_scratch(os.path.dirname(out) or ".", BANK_SCRATCH)
    if stale:
        print(f"note: removed {len(stale)} scratch folder(s) a killed build-bank left beside --out ({', '.join(stale)}).",
              file=sys.stderr)
    scratch = scratch_dir(os.path.dirname(out) or ".", BANK_SCRATCH)
    try:
        with RunWriter(args.runs_dir, "build-bank", _base_config(args, model)) as run:
            summary = {}
            for task in tasks:
                bar = _bar(cfg.epochs, f"source {task.name}")
                sp, res = build_source_prompt(model, task, cfg, start=start, callback=lambda info: (
                    bar.update(1), bar.set_postfix(val=f"{info['val_acc']:.3f}")))
                bar.close()
                sp.save(scratch)
                sp.save(run.file("prompts"))
                summary[sp.name] = res.metrics()
                print(f"{sp.name}: val {res.val_acc:.3f} test {res.test_acc:.3f}")
            run.write_json("metrics.json", summary)
            save_start(scratch, start, info)
            _move_bank(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"bank: {out} ({len(tasks)} prompts); run folder: {run.path}")
    return 0


def torch_equal(a, b) -> bool:
    import torch

    return tuple(a.shape) == tuple(b.shape) and bool(torch.equal(a, b))


def _move_bank(scratch: str, out: str) -> None:
    """The finished prompts into ``out``: the whole folder at once when ``out`` is new, else file by file (each rename
    atomic), the JSON last so that a prompt is never listed without its tensor."""
    if not os.path.exists(out):
        os.replace(scratch, out)
        return
    files = sorted(os.listdir(scratch), key=lambda f: f.endswith(".json"))
    for f in files:
        os.replace(os.path.join(scratch, f), os.path.join(out, f))


def _learn(args, model, bank, task):
    est = ensemble(args)
    bar = _bar(est.steps, "ensemble weights")

    def progress(info: dict[str, Any]) -> None:
        if info["stage"] == "step" and not info.get("final"):
            bar.n = min(info["step"], est.steps)  # row 0 is the start point; the bar never passes its total
            bar.set_postfix(H=f"{info['hscore']:.3f}", R=f"{info['regularizer']:.3f}")

    ens = est.fit(model, bank, task=task, callback=progress)
    bar.close()
    how = "converged" if ens.converged_ else ("stopped" if ens.stopped_ else "step cap reached")
    print(f"started from {ens.start_}; {how} after {ens.n_steps_} steps; objective {ens.objective_:.4f} "
          f"(best single source {max(ens.source_hscores_):.4f}, uniform {ens.candidates_['uniform']:.4f})")
    for msg in ens.warnings_:
        print(f"warning: {msg}")
    return ens


def cmd_learn(args: argparse.Namespace) -> int:
    from .io.runs import RunWriter
    from .method.record import EnsembleRecord

    _check_outputs(args)
    task = load_task(args.target)  # local inputs first: a missing file fails at once, not after the hub
    model = load_backbone(args)
    bank = load_bank(args, model)
    with RunWriter(args.runs_dir, "learn", {**_base_config(args, model), "sources": bank.names, "target_name": task.name}) as run:
        ens = _learn(args, model, bank, task)
        EnsembleRecord.from_fit(ens).write(run, model)
        run.write_json("metrics.json", {"ensemble_hscore": ens.ensemble_hscore_, "seconds": ens.fit_seconds_})
    width = max(len(n) for n in ens.names_)
    for n, w, h in zip(ens.names_, ens.weights_, ens.source_hscores_):
        print(f"{n:<{width}}  weight {w:.3f}  H {h:.3f}")
    print(f"ensemble H-score {ens.ensemble_hscore_:.3f} in {ens.fit_seconds_:.1f} s; run folder: {run.path}")
    return 0


def _init_from(args, model, bank, task, run):
    from .io.safe_io import load_json
    from .method.objective import combine_prompts
    from .method.record import EnsembleRecord

    init = args.init
    if init == "random":
        return "random"
    if init == "none":
        return None
    if init == "uniform":
        return bank.stack().mean(0)
    if init == "hgprompt":
        ens = _learn(args, model, bank, task)
        EnsembleRecord.from_fit(ens).write(run, model)
        return ens.prompt_
    if init.startswith("source:"):
        return bank.subset([init.split(":", 1)[1]])[0].prompt
    if init.startswith("weights:"):
        import torch

        from .io.safe_io import SCHEMAS

        data = load_json(init.split(":", 1)[1], schema=SCHEMAS["weights"])  # names and weights checked by type
        names, weights = data["names"], data["weights"]
        if len(names) != len(weights) or any(n not in names for n in bank.names):
            raise UserInputError(
                f"{init[8:]!r} must be a weights.json with 'names' and 'weights' covering the sources {bank.names} "
                f"(it names {names[:10]} with {len(weights)} weight(s)).")
        w = torch.tensor([float(weights[names.index(n)]) for n in bank.names])
        if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise UserInputError(f"weights in {init[8:]!r} must be non-negative with a positive sum.")
        return combine_prompts(w / w.sum(), bank.stack())
    raise UserInputError(f"--init {init!r} is not understood; use random, none, uniform, hgprompt, source:NAME or weights:FILE.json.")


def cmd_tune(args: argparse.Namespace) -> int:
    from .io.runs import RunWriter
    from .tuning.tune import tune_prompt

    _check_outputs(args)
    task = load_task(args.target)  # local inputs first: a missing file fails at once, not after the hub
    model = load_backbone(args)
    bank = load_bank(args, model)
    cfg = tune_config(args)
    init = None if args.init == "hgprompt" else _init_from(args, model, bank, task, None)  # refused before a run folder
    with RunWriter(args.runs_dir, "tune", {**_base_config(args, model), "sources": bank.names, "tune_config": cfg.to_dict()}) as run:
        if args.init == "hgprompt":
            init = _init_from(args, model, bank, task, run)
        bar = _bar(cfg.epochs, f"tune ({args.init})")
        res = tune_prompt(model, task, init, cfg, callback=lambda info: (bar.update(1), bar.set_postfix(val=f"{info['val_acc']:.3f}")))
        bar.close()
        run.write_json("metrics.json", res.metrics())
        run.write_json("tune_history.json", res.history)
        tensors = {"head_weight": res.head_weight, "head_bias": res.head_bias}
        if res.prompt is not None:
            tensors["prompt"] = res.prompt
        run.write_tensors("target.safetensors", tensors, {"backbone_fingerprint": model.fingerprint, "init": args.init})
    print(f"init {args.init}: val {res.val_acc:.3f} test {res.test_acc:.3f} (best epoch {res.best_epoch}); run folder: {run.path}")
    return 0


def cmd_baselines(args: argparse.Namespace) -> int:
    from .evaluation.methods import check_methods
    from .evaluation.protocol import Context, Protocol, evaluate
    from .evaluation.summary import paired_summary, table
    from .io.runs import RunWriter
    from .method.ensemble import HGPromptEnsemble
    from .tuning.tune import TuneConfig

    methods = check_methods(None if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()])
    protocol = Protocol(methods, list(args.seeds), tune=values(TuneConfig, args, prefix=TUNE),
                        ensemble=values(HGPromptEnsemble, args))
    _check_outputs(args)
    task = load_task(args.target)  # local inputs first: a missing file fails at once, not after the hub
    model = load_backbone(args)
    bank = load_bank(args, model)
    with RunWriter(args.runs_dir, "baselines", {**_base_config(args, model), "sources": bank.names, "methods": methods,
                                                "tune_config": protocol.tune, "ensemble": protocol.ensemble}) as run:
        bar = _bar(1, "jobs")

        def progress(done: int, total: int, key: str) -> None:
            bar.total = total
            bar.n = done
            bar.set_description(key.split("/")[0] if key else "jobs")
            bar.refresh()

        result = evaluate(protocol, [task.name], context=Context(model, bank, {task.name: task}),
                          progress_for=lambda phase: progress)
        bar.close()
        summary = table(result.per_target)
        run.write_json("results.json", {"protocol": vars(protocol), "per_target": result.per_target})
        run.write_json("metrics.json", {m: row[task.name] for m, row in summary.items()})
        paired = paired_summary(result.per_target) if "hgprompt" in methods and len(methods) > 1 else {}
        run.write_json("paired.json", paired)
    width = max(len(m) for m in summary)
    for m, row in summary.items():
        s = row[task.name]
        line = f"{m:<{width}}  test {s['mean']:.3f} +- {s['std']:.3f}  (n={s['n']})"
        if m in paired:
            p = paired[m]
            ci = "" if len(args.seeds) < 2 else f" [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]"
            line += f"   hgprompt minus this {p['mean_diff']:+.3f}{ci}"
        print(line)
    print(f"seeds {list(args.seeds)}: each redraws the train/val split; run folder: {run.path}")
    return 0


def cmd_interference(args: argparse.Namespace) -> int:
    import numpy as np

    from .analysis.interference import InterferenceConfig, interference
    from .io.runs import RunWriter

    settings = {**values(InterferenceConfig, args), "seed": args.seed}
    InterferenceConfig(**settings)  # checked before anything is loaded
    _check_outputs(args)
    task = load_task(args.target)  # local inputs first: a missing file fails at once, not after the hub
    model = load_backbone(args)
    bank = load_bank(args, model)
    with RunWriter(args.runs_dir, "interference", {**_base_config(args, model), "sources": bank.names}) as run:
        bar = _bar(1, "gradient pass")

        def progress(info: dict[str, Any]) -> None:
            if info["stage"] == "segments":
                bar.set_description("segment prompts")
                bar.total, bar.n = info["total"], info["done"]
                bar.refresh()

        res = interference(model, bank, task, callback=progress, **settings)
        bar.close()
        run.write_json("interference.json", res.to_dict())
    names, mix = res.names, res.mixing_loss
    iu = np.triu_indices(len(names), 1)
    order = np.argsort(mix[iu])
    print(f"mixing loss I = H(midpoint) - mean of the ends, most negative first ({res.n_samples} samples):")
    for p in order:
        i, j = iu[0][p], iu[1][p]
        print(f"  {names[i]} + {names[j]}: I {mix[i, j]:+.4f}   raw cos {res.cosine['raw'][i, j]:+.2f}   "
              f"centred cos {res.cosine['centred'][i, j]:+.2f}")
    print("random-prompt null: " + ", ".join(f"{v} {lo:+.2f}..{hi:+.2f}" for v, (lo, hi) in res.null_band.items()))
    print("Spearman with I: " + ", ".join(f"{k} {v:+.2f}" for k, v in res.spearman().items()))
    print(f"run folder: {run.path}")
    return 0


COMMANDS = {"info": cmd_info, "build-bank": cmd_build_bank, "learn": cmd_learn, "tune": cmd_tune, "baselines": cmd_baselines,
            "interference": cmd_interference}


def _close_bars() -> None:
    """Close any progress bar still drawn, so that a message starts on a line of its own."""
    from tqdm.auto import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    from .io.runs import RunWriter

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserInputError as exc:
        _close_bars()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full or read-only disk met outside the writers that already say so
        from .io.safe_io import storage_error

        message = storage_error(exc.filename or "a file", exc)
        if message is None:
            raise
        _close_bars()
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_bars()
        where = ", ".join([r.path for r in RunWriter.open_runs] + RunWriter.interrupted) or "none had been started"
        print(f"interrupted: the run folder is kept and marked incomplete ({where}).", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

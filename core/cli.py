"""Command line: ``python -m core {info,build-bank,import-prompts,learn,tune,baselines,interference,study,dashboard}
...``.

Every command that computes something writes a run folder (see :mod:`core.io.runs`). The flags of the weights,
the tuning and the interference measurement are read from the one options table (:mod:`core.options`), help texts
and defaults included, and checked as they are parsed. A user mistake prints one paragraph and exits with status 2;
Ctrl-C exits with 130 and leaves the run folder marked incomplete.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any, Sequence

from .analysis.interference import InterferenceConfig, interference
from .errors import UserInputError
from .evaluation.methods import DEFAULT_METHODS, check_methods, describe
from .evaluation.protocol import Context, Protocol, evaluate, seed_work
from .evaluation.setups import Workspace, resolve_targets
from .evaluation.study import (
    BANK_SCRATCH,
    MD_FILE,
    REFERENCES,
    STUDY_FILE,
    build_bank,
    check_gpus,
    default_folder,
    read_study,
    run_study,
    write_bank,
)
from .evaluation.summary import paired_summary, table
from .evaluation.sweep import JobStore, tqdm_progress
from .io import assets
from .io.assets import ROOT, task_path
from .io.importers import FORMATS, add_to_bank, file_sha256, import_prompt, read_prompt
from .io.prompt_bank import PromptBank, check_name, load_start
from .io.runs import RunWriter, check_output_folder
from .io.safe_io import SCHEMAS, clean_stale_scratch, load_json, storage_error
from .io.tasks import Task
from .method.ensemble import HGPromptEnsemble
from .method.objective import combine_prompts
from .method.record import EnsembleRecord
from .metrics.h_score import resolve_n_samples
from .model.backbones import BackboneSpec
from .model.cost import Work, estimate, tune_work
from .model.device import resolve_device
from .options import SEED_RANGE, add_arguments, check_seed, values
from .tuning.bank import shared_start
from .tuning.tune import TuneConfig, tune_prompt

TUNE = "tune_"  # the tuning options' dest prefix: they share names (lr, optimizer, seed) with the weights' options


# ----------------------------------------------------------------- arguments
def _seed(text: str) -> int:
    try:
        return check_seed(int(text), "--seed")
    except (ValueError, UserInputError):
        raise argparse.ArgumentTypeError(f"must be an integer in {SEED_RANGE[0]}..{SEED_RANGE[1]}, got "
                                         f"{text!r}") from None


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
    g.add_argument("--pretrained", action="store_true",
                   help="download timm hub weights for a model name (needs internet)")
    g.add_argument("--checkpoint", default=None, help="local .safetensors weights for a timm model name")
    g.add_argument("--img-size", type=_img_size, default=None,
                   help=f"input size for a timm model name ({IMG_SIZE_RANGE[0]}..{IMG_SIZE_RANGE[1]} pixels)")
    g.add_argument("--init-seed", type=_seed, default=None,
                   help="random weights for a timm model name drawn from this seed (the same in every process)")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")


def _add_ray(p: argparse.ArgumentParser, default_serial: bool) -> None:
    g = p.add_argument_group("jobs (Ray)")
    if default_serial:
        g.add_argument("--ray", action="store_true", help="run one job per source on a local Ray instance (or the "
                                                          "cluster at --address) instead of one after another here")
    else:
        g.add_argument("--serial", action="store_true", help="run every job in this process, one after another "
                                                             "(no Ray)")
    g.add_argument("--address", default=None, help="a Ray cluster to join: ray://HOST:10001, or auto for the one "
                                                   "`ray start` started here (default: a new local instance)")
    g.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    g.add_argument("--gpus-per-job", type=float, default=None,
                   help="GPUs a job asks Ray for (default: 1 where CUDA is visible, else 0); 0.25 runs four jobs on "
                        "each GPU")
    g.add_argument("--store", default=None, help="folder of finished jobs: a rerun reads them back (a killed run "
                                                 "resumes)")


def _add_tune(p: argparse.ArgumentParser) -> None:
    add_arguments(p.add_argument_group("tuning"), TuneConfig, prefix=TUNE)


def _add_ensemble(p: argparse.ArgumentParser) -> None:
    add_arguments(p.add_argument_group("ensemble weights"), HGPromptEnsemble)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core",
                                     description="HGPrompt: multi-source visual prompt transfer.")
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
    _add_ray(p, default_serial=True)
    p.set_defaults(tune_select="last")

    p = sub.add_parser("import-prompts", help="bring prompts tuned elsewhere (VPT checkpoints, safetensors, .npz) into "
                       "a bank", description="Reads VPT's layout (keys ending in prompt_embeddings (1, T, D) and "
                       "deep_prompt_embeddings (L - 1, T, D), nested under 'model' or 'state_dict' or not) from a "
                       "torch checkpoint (opened only with torch.load(weights_only=True): a file that holds code is "
                       "refused), safetensors or .npz; or one tensor by --key. Checks width, depth and token count "
                       "against the backbone and writes safetensors + JSON with the backbone's fingerprint and the "
                       "file's "
                       "provenance.")
    p.add_argument("files", nargs="+", metavar="FILE", help="the checkpoint(s) to import; one prompt each")
    p.add_argument("--from", dest="fmt", choices=FORMATS, default="vpt",
                   help="vpt: VPT's keys (any of the three containers); safetensors / npz: the tensor --key, already "
                        "(T, D) or (L, T, D)")
    p.add_argument("--key", default=None, help="the tensor to read (vpt: the prompt_embeddings key or its prefix, "
                                               "when a file holds several)")
    p.add_argument("--out", required=True, help="bank folder to write the prompts into (made if missing)")
    p.add_argument("--name", default=None, help="the prompt's name (one file only; default: the file's stem)")
    p.add_argument("--source-task", default=None, help="the task the prompt was tuned on (default: its name)")
    p.add_argument("--start", default=None, help="the prompt the imported ones were tuned from (same --from and "
                   "--key), recorded as the bank's shared start so that task arithmetic and TIES can use them")
    p.add_argument("--overwrite", action="store_true", help="replace prompts of the same names already in --out")
    _add_backbone(p)

    for name, helptext in (("learn", "learn HGPrompt ensemble weights for a target"),
                           ("tune", "tune a target prompt from an initialisation"),
                           ("baselines", "run HGPrompt and the baselines on a target"),
                           ("interference", "measure interference between the source prompts on a target")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--target", required=True,
                       help="target task: path (.npz, VTAB-1k folder, class folders) or shipped name")
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
                           help=f"comma-separated method names or 'all' ({describe().replace('%', '%%')})")
            p.add_argument("--seeds", type=_seed, nargs="+", default=[0],
                           help="the protocol's seeds: each redraws the train/val split (test fixed), the fit's sample "
                                "and the tuning's initialisation and batch order")
        if name == "interference":
            add_arguments(p.add_argument_group("interference"), InterferenceConfig)

    p = sub.add_parser("study", help="the evaluation protocol over a suite of targets, on Ray, into a study folder",
                       description="Every method against the others over every target and seed (the protocol of "
                                   "`baselines`), one Ray job per weight fit and per tune (a local instance, or a "
                                   "cluster with --address); every finished job is kept in the store, so running the "
                                   "same command again resumes a killed study. Writes study.json, results.csv and "
                                   "results.md into --out; the dashboard's Study page opens that folder.")
    p.add_argument("--targets", nargs="+", required=True,
                   help="targets: VTAB-1k folders, .npz tasks, class folders, shipped names, or folders holding tasks")
    p.add_argument("--bank", default=None, help="prompt bank folder (default with the embedded backbone: its "
                                                "prompts); with --leave-one-out, each target gets it less its own "
                                                "prompt")
    p.add_argument("--leave-one-out", action="store_true",
                   help="each target gets the prompts of the suite's other tasks; without --bank the bank is built "
                        "from the targets first (one job per task, into OUT/bank, with the tuning flags below "
                        "reported at the last epoch)")
    p.add_argument("--bank-seed", type=_seed, default=0, help="seed of the shared start of a bank built here")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated method names or 'all' ({describe().replace('%', '%%')})")
    p.add_argument("--seeds", type=_seed, nargs="+", default=[0],
                   help="the protocol's seeds: each redraws the train/val split (test fixed)")
    p.add_argument("--singles", default="all",
                   help="which single sources the oracles tune: all, or the N with the highest H-score")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per job (default: 1 on Ray, all with --serial)")
    p.add_argument("--out", default=None, help="the study folder (default: runs/studies/study-<digest of the "
                                               "settings>, so the same command finds it again)")
    _add_backbone(p)
    _add_ensemble(p)
    _add_tune(p)
    _add_ray(p, default_serial=False)

    p = sub.add_parser("dashboard", help="open the dashboard on your backbone, bank and targets",
                       description="Starts the Streamlit dashboard with every page (weights, conflicts, "
                                   "interference, plane, maps, tuning, compare, data) on this workspace; the lesson "
                                   "stays on the embedded default. Without flags, the embedded default.")
    p.add_argument("--bank", default=None, help="prompt bank folder (needed with your own backbone)")
    p.add_argument("--targets", nargs="+", default=None,
                   help="targets: VTAB-1k folders, .npz tasks, class folders, shipped names, or folders holding tasks "
                        "(default: the shipped targets)")
    p.add_argument("--port", type=int, default=8501, help="the port to serve on")
    p.add_argument("--host", default=None, help="the address to serve on (default: Streamlit's)")
    p.add_argument("--headless", action="store_true", help="do not open a browser (a server without a screen)")
    p.add_argument("--study", default=None, help="a study folder (`study --out`) for the Study page to open on")
    _add_backbone(p)
    return parser


# ------------------------------------------------------------------ loading
def backbone_spec(args: argparse.Namespace):
    """The backbone the flags name (:class:`core.model.backbones.BackboneSpec`)."""
    return BackboneSpec.from_args(args.backbone, checkpoint=args.checkpoint, pretrained=args.pretrained,
                                  img_size=args.img_size, init_seed=getattr(args, "init_seed", None))


def load_backbone(args: argparse.Namespace):
    device = resolve_device(args.device)
    return backbone_spec(args).load(device)


def load_bank(args: argparse.Namespace, model):
    """The bank of ``--bank`` (default with the embedded backbone: its prompts), or only ``--sources``, checked
    against ``model`` by the workspace's one loader; its notes (an untuned prompt, two equal ones) said as warnings."""
    names = [n.strip() for n in args.sources.split(",") if n.strip()] if args.sources else None
    twice = [n for i, n in enumerate(names or []) if n in names[:i]]
    if twice:
        raise UserInputError(f"--sources names {twice[0]!r} twice; name each source once.")
    bank = Workspace(backbone_spec(args), args.bank).load_bank(model, names)
    for note in bank.notes:
        print(f"warning: {note}", file=sys.stderr)
    return bank


def load_task(spec: str):
    with warnings.catch_warnings():  # said once, as a "warning:" line (Python's own would name a source file)
        warnings.simplefilter("ignore")
        task = Task.load(task_path(spec))
    for note in task.notes:
        print(f"warning: {note}", file=sys.stderr)
    return task


def ensemble(args: argparse.Namespace):
    return HGPromptEnsemble(**{**values(HGPromptEnsemble, args), "seed": args.seed})


def tune_config(args: argparse.Namespace, seed: int | None = None):
    return TuneConfig(**{**values(TuneConfig, args, prefix=TUNE), "seed": args.seed if seed is None else seed})


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm  # third-party imports stay in the commands that use them: `--help` stays fast

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def _check_outputs(args: argparse.Namespace) -> None:
    """The run folder's parent can be written: checked before the backbone loads or anything is computed."""
    check_output_folder(args.runs_dir, "--runs-dir")


def _base_config(args: argparse.Namespace, model) -> dict[str, Any]:
    cfg = {k: v for k, v in vars(args).items() if k != "func"}
    cfg["backbone_name"] = model.name
    cfg["backbone_fingerprint"] = model.fingerprint
    return cfg


def _say_cost(model, work, prompt_shape, shorter: str) -> None:
    """The run's FLOPs and time here, said before it starts (a warning past core.model.cost.WARN_SECONDS)."""
    print(estimate(model, work, tuple(prompt_shape)).message(shorter), file=sys.stderr)


def _split_sizes(task, n_train: int | None = None) -> tuple[int, int, int]:
    sizes = task.sizes()
    train = sizes.get("train", 0)
    return (train if n_train is None else min(train, n_train)), sizes.get("val", 0), sizes.get("test", 0)


def _fit_work(args, model, bank, task):
    """A fit's rows, its sample embedded first (a fresh command has nothing embedded)."""
    est = ensemble(args)
    n = resolve_n_samples(est.n_samples, model.embed_dim, task.sizes()["train"])
    return est.work(len(bank), n, images=n, splits=_split_sizes(task))


def _protocol_work(protocol, model, bank, task):
    """The rows of one seed of ``protocol`` on ``task`` (at most: tunes that share an initial prompt run once)."""
    cfg = TuneConfig(**{**protocol.tune, "seed": 0})
    n = resolve_n_samples(HGPromptEnsemble(**protocol.ensemble).n_samples, model.embed_dim, task.sizes()["train"])
    return seed_work(protocol, len(bank), n, _split_sizes(task, cfg.n_train)[0], *_split_sizes(task)[1:])


def _prompt_shape(model, cfg) -> tuple[int, ...]:
    return (model.depth, cfg.num_tokens, model.embed_dim) if cfg.deep else (cfg.num_tokens, model.embed_dim)


# ----------------------------------------------------------------- commands
def cmd_info(args: argparse.Namespace) -> int:
    model = load_backbone(args)
    print(f"backbone: {model.name}  D={model.embed_dim} depth={model.depth} fingerprint={model.fingerprint}")
    print(f"weights: {_describe_init(model.config.get('init') or {})}")
    print(f"input: {model.data_config()['input_size']}")
    if os.path.isdir(assets.PROMPTS_DIR):
        bank = PromptBank.load(assets.PROMPTS_DIR)
        if all(sp.backbone_fingerprint == model.fingerprint for sp in bank):
            for sp in bank:
                print(f"prompt {sp.name}: {sp.kind} T={sp.num_tokens} source={sp.source_task} acc={sp.source_accuracy}")
        else:  # the shipped prompts belong to the embedded backbone: listing them for another would be a lie
            print(f"shipped prompts ({len(bank)}): tuned on the embedded backbone, not this one")
    for kind in ("source", "target"):
        for name in assets.shipped_tasks(kind):
            t = load_task(name)
            print(f"{kind} task {name}: {t.num_classes} classes, sizes {t.sizes()}")
    return 0


def _describe_init(init: dict[str, Any]) -> str:
    kind = init.get("kind", "unknown")
    if kind == "random":
        return (f"random, from seed {init.get('seed')} (--init-seed): the same in every process; save the backbone "
                "(PromptedViT.save) to keep it beside its prompts")
    if kind == "checkpoint":
        origin = init.get("origin")
        return f"checkpoint {init.get('file')}" + (f" (first made as: {_describe_init(origin)})" if origin else "")
    return {"pretrained": "timm hub weights (--pretrained)"}.get(kind, kind)


def cmd_build_bank(args: argparse.Namespace) -> int:
    cfg = tune_config(args)
    out = check_output_folder(args.out, "--out")  # before anything is trained: a bad --out would lose the training
    check_output_folder(args.runs_dir, "--runs-dir")
    serial = not (args.ray or args.address)
    check_gpus(args.gpus_per_job, args.address, serial)
    tasks = [load_task(t) for t in args.task]  # local inputs first: a missing file fails at once, not after the hub
    names = [t.name for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserInputError(f"two source tasks are named {twice[0]!r}; each prompt is saved under its task's name, so "
                             "give each task its own name.")
    for n in names:  # before any training: a prompt is saved under its task's name
        try:
            check_name(n)
        except UserInputError:
            raise UserInputError(f"source task {n!r} cannot name a prompt: use 1-100 letters, digits, '_', '-' or '.', "
                                 "starting with a letter or digit (rename the task: its folder, or the name saved in "
                                 "its .npz).") from None
    clash = [n for n in names
             if any(os.path.exists(os.path.join(out, f"{n}{ext}")) for ext in (".safetensors", ".json"))]
    if clash and not args.overwrite:
        raise UserInputError(f"{out!r} already holds a prompt named {clash[0]!r}" + (f" (and {len(clash) - 1} more)" if
                             len(clash) > 1 else "") + "; choose another --out, or pass --overwrite to replace them.")
    spec = backbone_spec(args)
    model = load_backbone(args)
    work = sum((tune_work(cfg.epochs, *_split_sizes(t, cfg.n_train), images=sum(t.sizes().values())) for t in tasks),
               Work())
    _say_cost(model, work, _prompt_shape(model, cfg), "fewer --epochs or --n-train")
    start, info = shared_start(model, cfg.num_tokens, cfg.deep, cfg.seed)
    if os.path.isdir(out):
        existing, _ = load_start(out)
        if existing is not None and not torch_equal(existing, start):
            raise UserInputError(f"the bank in {out!r} was tuned from another start; prompts from two starts have no "
                                 "common task vectors. Use that bank's --seed, --tokens and --deep, or another --out.")
    # A scratch folder that a killed build-bank left beside --out (kill -9 skips every finally) is removed here.
    stale = clean_stale_scratch(os.path.dirname(os.path.abspath(out)), BANK_SCRATCH)
    if stale:
        print(f"note: removed {len(stale)} scratch folder(s) a killed build-bank left beside --out "
              f"({', '.join(stale)}).",
              file=sys.stderr)
    bars: dict[str, Any] = {}

    def per_epoch(name: str):
        bars[name] = _bar(cfg.epochs, f"source {name}")
        return lambda info: (bars[name].update(1), bars[name].set_postfix(val=f"{info['val_acc']:.3f}"))

    def done(sp, metrics: dict[str, Any]) -> None:
        if sp.name in bars:
            bars[sp.name].close()
        print(f"{sp.name}: val {metrics['val_acc']:.3f} test {metrics['test_acc']:.3f}")

    # One job per source (here, or on Ray); the prompts go into --out only when every one is done: a failure (a
    # broken task, Ctrl-C) leaves --out as it was.
    with RunWriter(args.runs_dir, "build-bank", _base_config(args, model)) as run:
        paths = {t.name: os.path.abspath(task_path(a)) for t, a in zip(tasks, args.task, strict=True)}
        built = build_bank(model, spec, paths, cfg,
                           loaded={t.name: t for t in tasks}, store=JobStore(args.store) if args.store else None,
                           serial=serial, address=args.address, num_cpus=args.num_cpus, gpus_per_job=args.gpus_per_job,
                           progress=None if serial else tqdm_progress("sources"),
                           callback_for=per_epoch if serial else None, on_done=done)
        for sp, _ in built:
            sp.save(run.file("prompts"))
        run.write_json("metrics.json", {sp.name: metrics for sp, metrics in built})
        write_bank([sp for sp, _ in built], start, info, out)
    print(f"bank: {out} ({len(tasks)} prompts); run folder: {run.path}")
    return 0


def cmd_import_prompts(args: argparse.Namespace) -> int:
    if args.name is not None and len(args.files) > 1:
        raise UserInputError(f"--name names one prompt but {len(args.files)} files were given; import them one at a "
                             "time, or leave --name out (each prompt is named after its file).")
    out = check_output_folder(args.out, "--out")
    for f in args.files + ([args.start] if args.start else []):  # local inputs first: a typo fails before the hub
        if not os.path.isfile(f):
            raise UserInputError(f"file {f!r} does not exist; check the path.")
    model = load_backbone(args)
    prompts = [import_prompt(f, model, args.fmt, args.key, args.name, args.source_task) for f in args.files]
    start = read_prompt(args.start, model, args.fmt, args.key).prompt if args.start else None
    info = None
    if start is not None:
        info = {"rule": "imported", "file": os.path.abspath(args.start), "sha256": file_sha256(args.start)}
    bank = add_to_bank(out, prompts, model, start, info, overwrite=args.overwrite)
    for sp in prompts:
        prov = sp.provenance
        print(f"{sp.name}: {sp.kind} T={sp.num_tokens} D={sp.embed_dim}" + (f" depth={sp.depth}" if sp.depth else "")
              + f" from {prov['imported_from']} ({', '.join(prov['keys'])}; sha256 {prov['sha256'][:12]})")
    print(f"bank: {out} ({len(bank)} prompts" + (", shared start recorded" if bank.start is not None else
                                                 ", no shared start: task arithmetic and TIES need one") + ")")
    return 0


def torch_equal(a, b) -> bool:
    import torch

    return tuple(a.shape) == tuple(b.shape) and bool(torch.equal(a, b))


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
    if ens.decision_ is not None:
        d = ens.decision_
        print(f"kept {d.chosen!r} by a short tune of each candidate ({d.seconds:.0f} s), validation accuracy: "
              + ", ".join(f"{c} {100 * v:.1f} %" for c, v in d.val_acc.items()))
    for msg in ens.warnings_:
        print(f"warning: {msg}")
    return ens


def cmd_learn(args: argparse.Namespace) -> int:
    _check_outputs(args)
    task = load_task(args.target)  # local inputs first: a missing file fails at once, not after the hub
    model = load_backbone(args)
    bank = load_bank(args, model)
    _say_cost(model, _fit_work(args, model, bank, task), bank.stack().shape[1:], "fewer --n-samples or --steps")
    with RunWriter(args.runs_dir, "learn",
                   {**_base_config(args, model), "sources": bank.names, "target_name": task.name}) as run:
        ens = _learn(args, model, bank, task)
        EnsembleRecord.from_fit(ens).write(run, model)
        run.write_json("metrics.json", {"ensemble_hscore": ens.ensemble_hscore_, "seconds": ens.fit_seconds_})
    width = max(len(n) for n in ens.names_)
    for n, w, h in zip(ens.names_, ens.weights_, ens.source_hscores_, strict=True):
        print(f"{n:<{width}}  weight {w:.3f}  H {h:.3f}")
    print(f"ensemble H-score {ens.ensemble_hscore_:.3f} in {ens.fit_seconds_:.1f} s; run folder: {run.path}")
    return 0


def _init_from(args, model, bank, task, run):
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
    raise UserInputError(f"--init {init!r} is not understood; use random, none, uniform, hgprompt, source:NAME or "
                         "weights:FILE.json.")


def cmd_tune(args: argparse.Namespace) -> int:
    _check_outputs(args)
    task = load_task(args.target)  # local inputs first: a missing file fails at once, not after the hub
    model = load_backbone(args)
    bank = load_bank(args, model)
    cfg = tune_config(args)
    init = None if args.init == "hgprompt" else _init_from(args, model, bank, task, None)  # refused before a run folder
    work = tune_work(cfg.epochs, *_split_sizes(task, cfg.n_train), prompt=args.init != "none",
                     images=sum(task.sizes().values()))
    if args.init == "hgprompt":
        work = work + _fit_work(args, model, bank, task)
    shape = _prompt_shape(model, cfg) if args.init == "random" else bank.stack().shape[1:]
    _say_cost(model, work, shape, "fewer --epochs or --n-train")
    with RunWriter(args.runs_dir, "tune",
                   {**_base_config(args, model), "sources": bank.names, "tune_config": cfg.to_dict()}) as run:
        if args.init == "hgprompt":
            init = _init_from(args, model, bank, task, run)
        bar = _bar(cfg.epochs, f"tune ({args.init})")
        res = tune_prompt(model, task, init, cfg,
                          callback=lambda info: (bar.update(1), bar.set_postfix(val=f"{info['val_acc']:.3f}")))
        bar.close()
        run.write_json("metrics.json", res.metrics())
        run.write_json("tune_history.json", res.history)
        tensors = {"head_weight": res.head_weight, "head_bias": res.head_bias}
        if res.prompt is not None:
            tensors["prompt"] = res.prompt
        run.write_tensors("target.safetensors", tensors, {"backbone_fingerprint": model.fingerprint, "init": args.init})
    print(f"init {args.init}: val {res.val_acc:.3f} test {res.test_acc:.3f} (best epoch {res.best_epoch}); run folder: "
          f"{run.path}")
    return 0


def cmd_baselines(args: argparse.Namespace) -> int:
    methods = check_methods(None if args.methods == "all"
                            else [m.strip() for m in args.methods.split(",") if m.strip()])
    protocol = Protocol(methods, list(args.seeds), tune=values(TuneConfig, args, prefix=TUNE),
                        ensemble=values(HGPromptEnsemble, args))
    _check_outputs(args)
    task = load_task(args.target)  # local inputs first: a missing file fails at once, not after the hub
    model = load_backbone(args)
    bank = load_bank(args, model)
    work = _protocol_work(protocol, model, bank, task) * len(protocol.seeds) + Work(images=sum(task.sizes().values()))
    _say_cost(model, work, bank.stack().shape[1:],
              "fewer --seeds, --methods, --epochs or --n-samples")
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


def cmd_study(args: argparse.Namespace) -> int:
    methods = check_methods(None if args.methods == "all"
                            else [m.strip() for m in args.methods.split(",") if m.strip()])
    singles = args.singles if args.singles == "all" else _count(args.singles, "--singles")
    protocol = Protocol(methods, list(args.seeds), tune=values(TuneConfig, args, prefix=TUNE),
                        ensemble=values(HGPromptEnsemble, args), singles=singles)
    check_gpus(args.gpus_per_job, args.address, args.serial)
    if args.threads is not None and args.threads < 1:
        raise UserInputError(f"--threads must be 1 or more, got {args.threads}.")
    spec = backbone_spec(args)
    targets = resolve_targets(args.targets)
    if args.bank is not None:
        Workspace(spec, args.bank, targets)  # the bank folder checked before anything is loaded
    out = args.out or default_folder(os.path.join("runs", "studies"), {"backbone": spec.to_dict(), "bank": args.bank,
                                                                         "targets": targets}, protocol,
                                                                         args.leave_one_out)
    out = check_output_folder(out, "--out")
    if args.store:
        check_output_folder(args.store, "--store")
    print(f"study folder: {out}", file=sys.stderr)
    result = run_study(spec, targets, protocol, out, bank=args.bank, leave_one_out=args.leave_one_out,
                       bank_seed=args.bank_seed, store=args.store, serial=args.serial, threads=args.threads,
                       device=args.device, address=args.address, num_cpus=args.num_cpus, gpus_per_job=args.gpus_per_job,
                       progress_for=tqdm_progress, log=lambda msg: print(msg, file=sys.stderr),
                       command=" ".join(["python -m core", *sys.argv[1:]]) if sys.argv[1:2] == ["study"] else None)
    width = max(len(m) for m in result["table"]) if result["table"] else 8
    for m, row in result["table"].items():
        line = f"{m:<{width}}  test {row['mean_over_targets']:.3f} (mean over {len(result['targets'])} targets)"
        for ref in REFERENCES:
            p = result["against"].get(m, {}).get(ref)
            if p:
                ci = "" if p["n"] < 2 else f" [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]"
                line += f"   minus {ref} {p['mean_diff']:+.3f}{ci}"
        print(line)
    if result["stopped"]:
        print("stopped before every job finished: run the same command again to resume.")
    print(f"study folder: {out} ({STUDY_FILE}, results.csv, {MD_FILE}); open it in the dashboard's Study page")
    return 0


def _count(text: str, flag: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise UserInputError(f"{flag} must be 'all' or a whole number of sources >= 1, got {text!r}.")
    return n


def cmd_dashboard(args: argparse.Namespace) -> int:
    ws = Workspace.from_args(backbone_spec(args), args.bank, args.targets)
    model = load_backbone(args)  # checked here, so a mistake is said in the terminal, not in a browser later
    bank = ws.load_bank(model)
    tasks = ws.tasks()
    for name in tasks:
        tasks[name]
    if args.study is not None:
        read_study(args.study)
    print(f"workspace: {model.name} (fingerprint {model.fingerprint}), {len(bank)} prompts in {ws.bank_folder}, "
          f"{len(tasks)} targets", file=sys.stderr)
    env = {**os.environ, "HGPROMPT_WORKSPACE": json.dumps(ws.to_dict()), "HGPROMPT_DEVICE": args.device}
    if args.study is not None:
        env["HGPROMPT_STUDY"] = os.path.abspath(args.study)
    cmd = [sys.executable, "-m", "streamlit", "run", os.path.join(ROOT, "dashboard", "app.py"), "--server.port",
           str(args.port), "--server.headless", "true" if args.headless else "false"]
    if args.host:
        cmd += ["--server.address", args.host]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)  # this process becomes the server: Ctrl-C and kill reach it directly


COMMANDS = {"info": cmd_info, "build-bank": cmd_build_bank, "import-prompts": cmd_import_prompts, "learn": cmd_learn,
            "tune": cmd_tune, "baselines": cmd_baselines, "interference": cmd_interference, "study": cmd_study,
            "dashboard": cmd_dashboard}


def _close_bars() -> None:
    """Close any progress bar still drawn, so that a message starts on a line of its own."""
    from tqdm.auto import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserInputError as exc:
        _close_bars()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full or read-only disk met outside the writers that already say so
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

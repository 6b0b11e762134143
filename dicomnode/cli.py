"""`dicomnode` command line: thin wrappers over plain functions, one subcommand each."""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from dicomnode import __version__


def _phantom(args: argparse.Namespace) -> int:
    from training.phantom.generator import PhantomOptions, generate_study

    if args.layout == "rsna":
        from training.datasets.rsna import write_fixture

        root = write_fixture(Path(args.out), list(range(args.seed, args.seed + args.count)), args.max_matrix)
        print(f"{args.count} studies (sagittal T1, sagittal T2, axial T2) in the RSNA 2024 LSDC layout -> {root}")
        return 0
    contrasts = tuple(c.strip().upper() for c in args.contrasts.split(",") if c.strip())
    bad = [c for c in contrasts if c not in ("T1", "T2", "STIR")]
    if bad:
        raise SystemExit(f"error: unknown contrast {bad[0]!r}; choose from T1, T2, STIR")
    options = PhantomOptions(contrasts=contrasts, axial=args.axial, study_class=args.study_class,
                             lordosis_deg=args.lordosis, max_matrix=args.max_matrix)
    for i in range(args.count):
        seed = args.seed + i
        out = Path(args.out) if args.count == 1 else Path(args.out) / f"study_{seed:06d}"
        t0 = time.perf_counter()
        truth = generate_study(out, seed, options)
        print(f"[{i + 1}/{args.count}] seed {seed}: {truth['study_class']}, lordosis L1-S1 "
              f"{truth['lordosis_deg']['L1-S1']:.1f} deg, {len(truth['series'])} series -> {out} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


def _real_to_dicom(args: argparse.Namespace) -> int:
    from training.datasets.real_lumbar import DEFAULT_DIR, case_paths, case_to_dicom, load_case

    root = Path(args.data) if args.data else DEFAULT_DIR
    paths = [Path(c) if c.endswith(".npz") else root / f"{c}.npz" for c in args.cases] or case_paths(root)
    for p in paths:
        if not p.exists():
            raise SystemExit(f"error: no real case at {p}")
        out = Path(args.out) / p.stem
        truth = case_to_dicom(load_case(p), out)
        print(f"{p.stem}: {truth['kind']} labels {list(truth['levels'])} -> {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dicomnode.demo import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dicomnode-demo-"))
    print(f"dicomnode {__version__} demo in {out}: a synthetic lumbar MR study (seed {args.seed}) through the node")
    summary = run_demo(out, args.seed)
    return 0 if summary.get("sr") else 1


def _config(args: argparse.Namespace):
    from dicomnode.config import ConfigError, load_config

    try:
        cfg = load_config(Path(args.config) if getattr(args, "config", None) else None)
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    if getattr(args, "config", None):
        from dicomnode.security import check_written_secrets

        try:
            check_written_secrets(cfg, Path(args.config))
        except ConfigError as e:
            raise SystemExit(f"error: {e}")
    for key in ("host", "port", "ae_title", "storage"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(cfg.node, key, type(getattr(cfg.node, key))(value))
    return cfg


def _peer(target: str, cfg):
    """`AE@host:port`, or the name of a DICOM destination in the configuration."""
    from dicomnode.config import DicomDestination
    from dicomnode.execute import peer
    from dicomnode.scu import Peer

    if "@" in target:
        ae, _, hostport = target.partition("@")
        host, _, port = hostport.rpartition(":")
        if not (ae and host and port.isdigit()):
            raise SystemExit(f"error: {target!r} is not AE@host:port")
        return Peer(ae, host, int(port))
    dest = cfg.destinations.get(target)
    if not isinstance(dest, DicomDestination):
        known = ", ".join(k for k, v in cfg.destinations.items() if isinstance(v, DicomDestination)) or "none"
        raise SystemExit(f"error: {target!r} is neither AE@host:port nor a DICOM destination in the configuration (known: {known})")
    return peer(dest, f"destinations.{target}")


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from dicomnode.config import ConfigError
    from dicomnode.node import Node

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    cfg = _config(args)
    try:
        node = Node(cfg, Path(args.config) if args.config else None).start()
    except (ConfigError, OSError) as e:
        raise SystemExit(f"error: {e}")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"dicomnode {__version__}: {cfg.node.ae_title} listening on {cfg.node.host}:{cfg.node.port}"
          f"{' (TLS)' if cfg.node.tls else ''}, storage {cfg.node.storage}"
          + (f", API and web page on {node.api.url}/ui/" if node.api else ""), flush=True)
    stop.wait()
    node.stop()
    return 0


def _worker(args: argparse.Namespace) -> int:
    from dicomnode.celery_jobs import broker_address, run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = _config(args)
    print(f"dicomnode {__version__} worker: queue {cfg.jobs.queue} on {broker_address(cfg.jobs)}, "
          f"storage {cfg.node.storage}", flush=True)
    run_worker(cfg, args.name, args.threads)
    return 0


def _echo(args: argparse.Namespace) -> int:
    from dicomnode.scu import SendError, echo

    try:
        status = echo(_peer(args.target, _config(args)), args.calling_ae)
    except SendError as e:
        raise SystemExit(f"error: {e}")
    print(f"C-ECHO {args.target}: status 0x{status:04X}" + (" (Success)" if status == 0 else ""))
    return 0 if status == 0 else 1


def _send(args: argparse.Namespace) -> int:
    from dicomnode.scu import SendError, store

    files = [f for p in map(Path, args.paths) for f in (sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p])]
    if not files:
        raise SystemExit("error: no files to send")
    try:
        n = store(_peer(args.to, _config(args)), files, args.calling_ae)
    except SendError as e:
        raise SystemExit(f"error: {e}")
    print(f"sent {n} instance(s) to {args.to}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from dicomnode.jobs import JobStore
    from dicomnode.storage import Storage

    root = Path(_config(args).node.storage)
    if not (root / "index.sqlite").exists():
        raise SystemExit(f"error: no node storage at {root}")
    counts = Storage(root).counts()
    jobs = JobStore(root / "jobs.sqlite")
    print(f"storage {root}: {counts['studies']} studies, {counts['series']} series, {counts['instances']} instances, "
          f"{counts['bytes'] / 1e6:.1f} MB")
    print("jobs: " + ", ".join(f"{k} {v}" for k, v in jobs.counts().items()))
    for j in jobs.list(where="state IN ('dead','failed')", limit=20):
        print(f"  job {j.id} {j.kind} {j.pipeline or j.destination}: {j.state} after {j.attempts} attempt(s): {j.last_error}")
    return 0


def _retry(args: argparse.Namespace) -> int:
    from dicomnode.jobs import JobStore

    jobs = JobStore(Path(_config(args).node.storage) / "jobs.sqlite")
    try:
        job = jobs.retry(args.job)
    except (KeyError, ValueError) as e:
        raise SystemExit(f"error: {e.args[0]}")
    print(f"job {job.id} ({job.kind} {job.pipeline or job.destination}) is queued again; a running node picks it up")
    return 0


def _process(args: argparse.Namespace) -> int:
    from dicomnode.process import process_folder

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = _config(args)
    if not Path(args.input).is_dir():
        raise SystemExit(f"error: input folder {args.input} does not exist")
    pipelines = [p.strip() for p in args.pipelines.split(",")] if args.pipelines else None
    try:
        results = process_folder(Path(args.input), Path(args.output), cfg, pipelines)
    except KeyError as e:
        raise SystemExit(f"error: {e.args[0]}")
    n = sum(len(s["outputs"]) for s in results["studies"])
    print(f"{len(results['studies'])} study(ies), {n} result object(s); summary in {Path(args.output) / 'results.json'}")
    return 0


def _seeds(text: str) -> list[int]:
    """"1000-1059", "1,2,5" or "8000-8299,8400-8699" -> seeds."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        a, _, b = part.partition("-")
        seeds += range(int(a), int(b or a) + 1)
    return seeds


# the findings pipelines: their module name (pipelines/, training/trainers/, training/evaluation/) and configuration class
FINDINGS_MODULES = {"marrow": ("marrow", "MarrowConfig"), "disc-herniation": ("herniation", "HerniationConfig"),
                     "degeneration": ("degeneration", "DegenerationConfig")}
HELD_OUT = {"marrow": "5000-5099", "disc-herniation": "5000-5099", "degeneration": "5000-5059"}  # phantom seeds no trainer uses


def _fold(text: str) -> int | str:
    """A cross-validation fold (0-2, or -1 for none) or a real dataset's name (the whole dataset held out)."""
    return int(text) if text.lstrip("-").isdigit() else text


def _plain_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """What an administrator gave wrong (an unknown dataset, a folder that is not a model, data that
    do not fit) ends in one line saying so, as the other commands do, not in a traceback. A bug
    raises the same exception types, so DICOMNODE_DEBUG=1 keeps the traceback."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (FileNotFoundError, ValueError) as e:
            if os.environ.get("DICOMNODE_DEBUG"):
                raise
            raise SystemExit(f"error: {e} (DICOMNODE_DEBUG=1 shows where)")
    return run


@_plain_errors
def _train(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.model in FINDINGS_MODULES:
        module = importlib.import_module(f"training.trainers.{FINDINGS_MODULES[args.model][0]}")
        cfg = getattr(module, FINDINGS_MODULES[args.model][1])(seed=args.seed)
        if args.phantom_seeds:
            cfg.train_seeds = _seeds(args.phantom_seeds)
        if args.validation_seeds:
            cfg.validation_seeds = _seeds(args.validation_seeds)
        cfg.iterations = args.iterations or cfg.iterations
        if args.model == "disc-herniation":
            cfg.epochs = args.epochs or cfg.epochs
            cfg.data_dir = args.data
        print(f"model folder written: {module.train(cfg, Path(args.out), Path(args.cache))}")
        return 0
    from training.datasets.real_lumbar import case_paths, split
    from training.trainers.spine_seg import SpineSegConfig, train

    cfg = SpineSegConfig(seed=args.seed, context=args.context, beyond_ends=args.beyond_ends, run_rows=args.run_rows,
                         fov_end=args.fov_end, random_contrast=args.random_contrast,
                         random_contrast_real_only=args.random_contrast_real_only, s1_from=args.s1_from,
                         init_from=args.init_from, head_by_source=args.head_by_source,
                         edge_weight=args.edge_weight, edge_weight_phantom_only=args.edge_weight_phantom_only)
    if args.phantom_seeds:
        cfg.phantom_seeds = _seeds(args.phantom_seeds)
    cfg.iterations = args.iterations or cfg.iterations
    if args.real_fraction is not None:
        cfg.real_fraction = args.real_fraction
    if args.real_dir:
        cfg.real_dir = args.real_dir
    if args.channels:
        cfg.channels = tuple(args.channels)
    if args.grid_mm is not None:
        cfg.grid_mm = args.grid_mm
    if args.crop is not None:
        cfg.crop = args.crop
    cfg.lr = args.lr or cfg.lr
    if args.dice_weight is not None:
        cfg.dice_weight = args.dice_weight
    ids = [path.stem for path in case_paths(Path(cfg.real_dir))]  # a case's id is its file name
    cfg.real_cases = ids if isinstance(args.fold, int) and args.fold < 0 else split(ids, args.fold)[0]
    out = train(cfg, Path(args.out), Path(args.cache))
    print(f"model folder written: {out}")
    return 0


@_plain_errors
def _ensemble(args: argparse.Namespace) -> int:
    from training.evaluation.ensemble import chosen_weights, search, write_ensemble

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    members = [Path(m) for m in args.members]
    if args.weights:
        out = write_ensemble(members, chosen_weights(args.weights, len(members)), Path(args.out), args.version)
        print(f"weights {args.weights} as given (no search); model folder written: {out}")
        return 0
    found = search(members, _seeds(args.validation_seeds), args.step)
    for row in found["grid"]:
        print(f"weights {row['weights']}: validation mean Dice {row['mean_dice']:.4f}")
    out = write_ensemble(members, found, Path(args.out), args.version)
    print(f"best weights {found['weights']} (mean Dice {found['validation_dice']:.4f}); model folder written: {out}")
    return 0


@_plain_errors
def _evaluate(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.model in FINDINGS_MODULES:
        name, seeds = FINDINGS_MODULES[args.model][0], HELD_OUT[args.model]
        model_dir = importlib.import_module(f"pipelines.{name}").MODEL_DIR
        evaluate = importlib.import_module(f"training.evaluation.{name}").evaluate
        metrics = evaluate(Path(args.model_folder or model_dir), Path(args.out), _seeds(args.phantom_seeds or seeds),
                           args.end_to_end)
    else:
        from pipelines.spine_seg import MODEL_DIR
        from training.evaluation.spine_seg import evaluate

        metrics = evaluate(Path(args.model_folder or MODEL_DIR), Path(args.out), _seeds(args.phantom_seeds or "5000-5029"),
                           args.fold, tuple(args.phantom_fov_end) if args.phantom_fov_end else None, args.training_fit)
    for key, value in _figures(metrics):
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _figures(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """The report's single figures as dotted keys (`detection.region.map50`); tables stay in the report."""
    out: list[tuple[str, Any]] = []
    for k, v in metrics.items():
        if isinstance(v, dict):
            out += _figures(v, f"{prefix}{k}.")
        elif not isinstance(v, list):
            out.append((f"{prefix}{k}", v))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicomnode", description="DICOM AI node for lumbar spine MRI.")
    p.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    ph = sub.add_parser("phantom", help="write synthetic lumbar MR studies with exact ground truth")
    ph.add_argument("--out", required=True, help="output folder (DIR/dicom, DIR/truth)")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--count", type=int, default=1, help="studies with seeds seed..seed+count-1, one folder each")
    ph.add_argument("--contrasts", default="T2,T1,STIR", help="sagittal series to write, e.g. T2,T1")
    ph.add_argument("--axial", action="store_true", help="also write an axial T2 series (3 slices per disc)")
    ph.add_argument("--study-class", choices=["healthy", "herniated_disc", "spinal_stenosis", "spondylosis"])
    ph.add_argument("--lordosis", type=float, help="L1-S1 lordosis in degrees (default: drawn from 10-80)")
    ph.add_argument("--max-matrix", type=int, default=640, help="largest acquisition matrix to draw")
    ph.add_argument("--layout", choices=["dicomnode", "rsna"], default="dicomnode",
                    help="rsna: the RSNA 2024 LSDC layout (train.csv, coordinates, train_images/; "
                         "sagittal T1 and T2 and axial T2, whatever --contrasts says)")
    ph.set_defaults(func=_phantom)

    rd = sub.add_parser("real-to-dicom", help="write real cases (shared/data/real_lumbar) as DICOM series")
    rd.add_argument("cases", nargs="*", help="case ids (VB3_01) or .npz paths; default: all")
    rd.add_argument("--out", required=True)
    rd.add_argument("--data", help="folder of the .npz cases")
    rd.set_defaults(func=_real_to_dicom)

    de = sub.add_parser("demo", help="generate a synthetic study and show what it contains")
    de.add_argument("--out", help="folder to write to (default: a new temporary folder)")
    de.add_argument("--seed", type=int, default=2026)
    de.set_defaults(func=_demo)

    def node_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="YAML configuration (default: embedded defaults)")
        sp.add_argument("--storage", help="storage folder (overrides node.storage)")

    se = sub.add_parser("serve", help="run the DICOM node")
    node_args(se)
    se.add_argument("--host")
    se.add_argument("--port", type=int)
    se.add_argument("--ae-title")
    se.set_defaults(func=_serve)

    wk = sub.add_parser("worker", help="run pipeline and send jobs from the Celery queue (jobs.backend: celery)")
    node_args(wk)
    wk.add_argument("--name", help="worker name (default: dicomnode@<host>); unique per worker")
    wk.add_argument("--threads", type=int, help="PyTorch CPU threads (default: all cores); cores / workers per machine")
    wk.set_defaults(func=_worker)

    ec = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    ec.add_argument("target", help="AE@host:port or a destination name from --config")
    ec.add_argument("--config")
    ec.add_argument("--calling-ae", default="DICOMNODE")
    ec.set_defaults(func=_echo)

    sd = sub.add_parser("send", help="C-STORE files or folders to a DICOM peer")
    sd.add_argument("paths", nargs="+")
    sd.add_argument("--to", required=True, help="AE@host:port or a destination name from --config")
    sd.add_argument("--config")
    sd.add_argument("--calling-ae", default="DICOMNODE")
    sd.set_defaults(func=_send)

    st = sub.add_parser("status", help="storage use and jobs by state")
    node_args(st)
    st.set_defaults(func=_status)

    pr = sub.add_parser("process", help="run the pipelines on a folder of DICOM files, no network")
    pr.add_argument("input")
    pr.add_argument("output")
    pr.add_argument("--config", help="rules and plugins (default: embedded defaults)")
    pr.add_argument("--pipelines", help="comma-separated pipelines to run on every series, instead of the rules")
    pr.set_defaults(func=_process)

    tr = sub.add_parser("train", help="train a pipeline's model from the phantom and the real cases")
    tr.add_argument("model", choices=["spine-seg", "marrow", "disc-herniation", "degeneration"])
    tr.add_argument("--out", required=True, help="model folder to write (spine-seg resumes from its checkpoint)")
    tr.add_argument("--phantom-seeds", help="training phantom seeds (spine-seg 1000-1059, marrow 6000-6159, "
                    "disc-herniation 7000-7299,7400-7699, degeneration 8000-8299,8400-8699)")
    tr.add_argument("--validation-seeds", help="phantom seeds that choose among classifiers (marrow 6160-6279) or "
                    "the ensemble weights (disc-herniation 7300-7379) or the study model (degeneration 8300-8359)")
    tr.add_argument("--fold", type=_fold, default=0, help="hold out this cross-validation fold of the real cases "
                    "(0-2; default 0, the fold the shipped model is evaluated on) or a whole dataset (VB1, VB3, IVD: "
                    "scanners never seen); -1: train on every real case")
    tr.add_argument("--iterations", type=int, help="spine-seg 2500, marrow 4000, disc-herniation 3000 per CNN, "
                    "degeneration 1500 per network")
    tr.add_argument("--epochs", type=int, help="disc-herniation: epochs per detector (30)")
    tr.add_argument("--data", help="disc-herniation: your own data instead of the phantom: region/ and discs/ (YOLO "
                    "folders with train and val splits) and crops/{train,val}/{normal,herniated}/ (images)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--beyond-ends", action="store_true", help="real cases: teach that below L5 lies no lumbar "
                    "vertebral body and above the L1/L2 disc no disc (what the level names imply beyond the labels)")
    tr.add_argument("--run-rows", action=argparse.BooleanOptionalAction, default=True, help="real cases: teach that "
                    "in the rows inside the labelled run every unlabelled voxel (prevertebral tissue, posterior elements, "
                    "slices lateral to the spine) is not of the labelled kind (spine-seg 1.1's recipe; --no-run-rows: 1.0's)")
    tr.add_argument("--random-contrast", type=float, default=0.0, help="spine-seg: share of training slices whose "
                    "intensities go through a random curve, tissues trading brightness (sequences and scanners never seen)")
    tr.add_argument("--random-contrast-real-only", action="store_true", help="spine-seg: only real slices go through "
                    "--random-contrast; the phantom keeps its designed T1, T2 and STIR contrasts")
    tr.add_argument("--fov-end", type=float, default=0.0, help="spine-seg: share of phantom slices whose field of "
                    "view is made to end inside S1, as most real sagittal series do (default 0: 1.1's recipe)")
    tr.add_argument("--s1-from", metavar="MODEL_DIR", help="spine-seg: label S1 in the real training cases where "
                    "this trained model folder marks bone just below the labelled L5 (no real case labels the sacrum)")
    tr.add_argument("--init-from", metavar="MODEL_DIR", help="spine-seg: start from this trained model folder's "
                    "weights (fine-tuning; network width and context must match)")
    tr.add_argument("--head-by-source", action="store_true", help="spine-seg: one output head learns the phantom's "
                    "truth, another the real manual masks (their edges may follow other conventions); inference reads the real one")
    tr.add_argument("--lr", type=float, help="spine-seg: peak learning rate of the one-cycle schedule (default 2e-3)")
    tr.add_argument("--dice-weight", type=float, help="spine-seg: weight of the soft Dice term beside "
                    "cross-entropy (default 1; 0: cross-entropy alone)")
    tr.add_argument("--edge-weight", type=float, default=1.0, help="spine-seg: cross-entropy weight of the pixels "
                    "within 2 pixels of a label's edge (default 1: every pixel alike)")
    tr.add_argument("--edge-weight-phantom-only", action="store_true", help="spine-seg: --edge-weight on the "
                    "phantom slices alone, whose edges are exact; the real manual masks' edges weigh as any pixel")
    tr.add_argument("--context", type=int, default=0, help="neighbouring slices on either side as input channels "
                    "(0: 2-D, the shipped default; 1: 2.5-D)")
    tr.add_argument("--real-fraction", type=float, help="spine-seg: share of each batch from real slices (default 0.4)")
    tr.add_argument("--channels", type=int, nargs="+", metavar="N", help="spine-seg: U-Net feature channels per "
                    "resolution level (default 16 32 64 128 256; wider costs training and inference time)")
    tr.add_argument("--grid-mm", type=float, help="spine-seg: working grid pixel size in mm (default 1)")
    tr.add_argument("--crop", type=int, help="spine-seg: training crop in working-grid pixels, a multiple of 16 "
                    "(default 192)")
    tr.add_argument("--real-dir", help="real cases (default: ../shared/data/real_lumbar)")
    tr.add_argument("--cache", default=".cache/training", help="where rendered training slices are kept")
    tr.set_defaults(func=_train)

    en = sub.add_parser("ensemble", help="combine trained model folders into a weighted-average ensemble, "
                        "weights by grid search on validation phantom studies")
    en.add_argument("model", choices=["spine-seg"])
    en.add_argument("--members", nargs="+", required=True, help="trained model folders")
    en.add_argument("--out", required=True, help="ensemble model folder to write")
    en.add_argument("--validation-seeds", default="4000-4011", help="phantom seeds used by neither training nor evaluation")
    en.add_argument("--step", type=float, default=0.1, help="weight grid step")
    en.add_argument("--weights", type=float, nargs="+", metavar="W", help="one weight per member, instead of the "
                    "search (for a trade-off the phantom validation cannot see); recorded as chosen, not searched")
    en.add_argument("--version", required=True, help="version of the ensemble model")
    en.set_defaults(func=_ensemble)

    ev = sub.add_parser("evaluate", help="measure a model on data it did not train on; writes a report with plots")
    ev.add_argument("model", choices=["spine-seg", "marrow", "disc-herniation", "degeneration"])
    ev.add_argument("--out", required=True, help="report folder (report.md, metrics.json, plots)")
    ev.add_argument("--model-folder", help="model folder (default: the shipped one, pipelines/models/<model>)")
    ev.add_argument("--phantom-seeds", help="held-out phantom seeds (spine-seg 5000-5029, marrow and disc-herniation "
                    "5000-5099, degeneration 5000-5059)")
    ev.add_argument("--end-to-end", type=int, default=12, help="marrow, disc-herniation, degeneration: studies also run through DICOM "
                    "and spine-seg")
    ev.add_argument("--fold", type=_fold, default=0, help="the real cases' held-out fold, 0-2, or dataset (VB1, VB3, "
                    "IVD); must not be trained on")
    ev.add_argument("--phantom-fov-end", type=float, nargs=2, metavar=("LO", "HI"), help="spine-seg: the held-out "
                    "phantoms' sagittal field of view ends LO-HI mm below the top of S1, as in most real series (a "
                    "separate report; the model folder keeps its standard metrics)")
    ev.add_argument("--training-fit", action="store_true", help="spine-seg: also measure the real cases the model "
                    "trained on, reported apart (under- or over-fitting; never a held-out figure)")
    ev.set_defaults(func=_evaluate)

    rt = sub.add_parser("retry", help="queue a dead or failed job again")
    rt.add_argument("job", type=int)
    node_args(rt)
    rt.set_defaults(func=_retry)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

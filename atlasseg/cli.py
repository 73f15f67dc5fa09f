"""Command line: ``atlasseg segment | train | register | evaluate | benchmark | demo`` (``dlf-train``: an alias).

Methods, backends and presets come from the registry (:mod:`atlasseg.methods`); training flags are derived from
each method's config dataclasses (:mod:`atlasseg.config`), so defaults are written once. Bad input ends with exit
code 2 and a one-line reason on stderr, found before any registration; nothing is written over the inputs.
``segment`` writes its run into a hidden temporary folder beside ``--output`` and moves it into place only when
it is complete. Ctrl-C or SIGTERM: one line, exit 130 (143 for SIGTERM), no partial output left behind.

This module imports no torch / MONAI / SimpleITK at import time: ``--help``, ``--version`` and errors found in
the arguments answer at once; the engine is imported inside the commands.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .config import add_dataclass_args, dataclass_from, overrides_from_args, read_json_config, to_dict
from .methods import (
    BACKENDS,
    DATA_FIELDS,
    DEFAULT_BACKEND,
    DEFAULT_PRESET,
    JLF_DEFAULTS,
    MAP_KINDS,
    MODEL_BACKENDS,
    REGISTRATION_PRESETS,
    RUN_RECORD,
    config_classes,
    get_method,
    implementation,
    method_names,
)

PRESETS = REGISTRATION_PRESETS
# registration defaults of the methods without a model (a model carries its own)
REGISTRATION_DEFAULTS = {"backend": DEFAULT_BACKEND, "preset": DEFAULT_PRESET}
MAX_DEFAULT_THREADS = 4
BENCHMARK_SUITES = ("hippocampus", "fetal", "dlf-hippocampus", "dlf-fetal-sb", "dlf-generalise", "backbones",
                    "instances", "atlasnet", "atlasnet-fetal-sb", "deepatlas")
ARCH_PREFIX = ""      # architecture flags keep their field names (--vote-channels, --backbone, ...)
# flags of the former dlf-train command, kept working: flag -> (destination field, value or None for "given")
LEGACY_TRAIN_FLAGS = {"--lr": ("learning_rate", float), "--candidates": ("candidates_per_target", int)}
LEGACY_SWITCHES = {"--no-weighted-voting": "use_weighted_voting", "--no-finetune": "use_finetune",
                   "--no-mask": "use_mask"}


def package_version() -> str:
    """The installed distribution's version (package metadata), else ``atlasseg.__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("atlasseg")
    except PackageNotFoundError:
        from . import __version__

        return __version__


class _VersionAction(argparse.Action):
    """``--version``: the version is looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"atlasseg {package_version()}")
        parser.exit()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def default_threads(torch_default: int | None = None) -> int:
    """Threads when ``--threads`` is not given: ``OMP_NUM_THREADS`` when set (to a positive number), else the
    physical cores torch found (``torch_default``; else the usable CPUs) but at most 4. Fusion and the networks
    gain little beyond 4 threads on these volumes, and on a shared machine every extra thread competes with other
    jobs (joint label fusion took 135 s instead of 2.2 s on a busy 2-core machine; pass --threads 1 there)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch_default or usable, usable, MAX_DEFAULT_THREADS))


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads of torch (default: OMP_NUM_THREADS when set, else the physical cores, at most "
                        f"{MAX_DEFAULT_THREADS}; on a machine shared with other jobs 1 is often fastest)")


def _add_registration_args(p: argparse.ArgumentParser, trained_note: bool = False, learned: bool = False) -> None:
    note = "; a trained model: the setting it was trained with" if trained_note else ""
    backends = (*BACKENDS, *MODEL_BACKENDS) if learned else BACKENDS
    learned_note = "; learned: a DeepAtlas model's registration network, with --reg-model DIR" if learned else ""
    p.add_argument("--backend", choices=backends, default=None,
                   help=f"registration backend (default {REGISTRATION_DEFAULTS['backend']}{note}{learned_note})")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, gpu or cuda:N")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help=f"registration quality preset (default {REGISTRATION_DEFAULTS['preset']}{note})")
    _add_threads_arg(p)


def _add_train_args(p: argparse.ArgumentParser, method: str | None, command: str) -> None:
    """Common training flags, then the method's architecture and training flags derived from its dataclasses."""
    if command == "train":
        p.add_argument("--method", choices=method_names(trains=True), help="the method to train "
                       "(its flags are listed by: atlasseg train --method M --help)")
    p.add_argument("--atlases", help="atlas set folder: targets and atlas pool for training")
    p.add_argument("--output", help="model folder (model.safetensors, config.json, log, curves, checkpoint)")
    p.add_argument("--config", help="JSON file {\"architecture\": {...}, \"training\": {...}}; flags override it")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, gpu or cuda:N")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--cache", help="registration cache folder (default OUTPUT/registration_cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if method is None:
        return
    architecture, training = config_classes(method)
    add_dataclass_args(p.add_argument_group(f"{method} architecture"), architecture, ARCH_PREFIX, DATA_FIELDS)
    group = p.add_argument_group("training")
    add_dataclass_args(group, training, "train_", flag_prefix="")
    for flag, (field, kind) in LEGACY_TRAIN_FLAGS.items():
        group.add_argument(flag, dest=f"train_{field}", type=kind, help=f"same as --{field.replace('_', '-')}")
    if method == "dlf":
        for flag, field in LEGACY_SWITCHES.items():
            group.add_argument(flag, dest=field, action="store_const", const=False,
                               help=f"ablation: same as --no-{field.replace('_', '-')}")


def _parser(train_method: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlasseg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="multi-atlas segmentation of one target")
    p.add_argument("--target", nargs="+", required=True, help="target image(s), one per modality")
    p.add_argument("--atlases", help="atlas set folder (dataset.json, imagesTr, labelsTr); needed by the methods "
                                     "that register atlases, except atlasnet, whose model folder stores its atlases "
                                     "(given, it checks the model's labels)")
    p.add_argument("--output", required=True, help="output folder (segmentation.nii.gz, maps/, run.json); written "
                                                    "whole: a temporary folder beside it is moved into place when "
                                                    "the run is complete")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty output folder of an "
                                                            "earlier run (only once the new run is complete)")
    p.add_argument("--method", choices=method_names(), default="jlf",
                   help="fusion method, or a trained method with --model (default jlf)")
    p.add_argument("--model", help="trained model folder (methods that train: "
                                   f"{', '.join(method_names(trains=True))})")
    p.add_argument("--n-atlases", type=int, default=None,
                   help="atlases drawn with --seed (default: up to 10; dlf: the number the model was trained with, "
                        "at most those available; atlasnet: all its networks); more than are available is an "
                        "error")
    p.add_argument("--atlas-ids", nargs="*", help="use exactly these atlas case ids")
    p.add_argument("--exclude", nargs="*", default=[], help="case ids never used as atlases (e.g. the target)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--maps", nargs="*", choices=MAP_KINDS, metavar="KIND",
                   help=f"also write maps: bare --maps writes all, or name kinds ({', '.join(MAP_KINDS)}); weights "
                        "(one per atlas, and per label for DLF) are the large ones")
    p.add_argument("--transforms", action="store_true", help="also write forward/inverse displacement fields")
    p.add_argument("--reference", help="reference label image: writes metrics.json and oracle coverage")
    for name, kind in (("alpha", float), ("beta", float), ("patch_radius", int), ("search_radius", int)):
        p.add_argument(f"--jlf-{name.replace('_', '-')}", type=kind, default=None,
                       help=f"joint label fusion {name} (default {JLF_DEFAULTS[name]}, as antsJointFusion)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--reg-model", help="with --backend learned: the DeepAtlas model folder whose registration "
                                       "network registers the atlases (atlasseg train --method deepatlas)")
    _add_registration_args(p, trained_note=True, learned=True)

    for command in ("train", "dlf-train"):
        p = sub.add_parser(command, help="train a method's model on an atlas set" if command == "train" else
                           "alias of: train --method dlf")
        # a method's flags are built (importing its code) only for the command line that uses them
        _add_train_args(p, train_method if command == "train" or train_method == "dlf" else None, command)
        _add_threads_arg(p)

    p = sub.add_parser("register", help="register a moving image to a fixed one with a DeepAtlas model's "
                                        "registration network (or an iterative backend)")
    p.add_argument("--fixed", nargs="+", required=True, help="fixed image(s), one per modality")
    p.add_argument("--moving", nargs="+", required=True, help="moving image(s), one per modality")
    p.add_argument("--moving-label", help="label image of the moving image (warped onto the fixed grid)")
    p.add_argument("--model", help="DeepAtlas model folder (atlasseg train --method deepatlas): the learned backend")
    p.add_argument("--backend", choices=("learned", *BACKENDS), default=None,
                   help="learned (default with --model: the model's registration network), or an iterative "
                        "backend: torch (default without --model) or greedy")
    p.add_argument("--output", required=True, help="output folder: warped_moving.nii.gz, warped_label.nii.gz, "
                                                    "transform_forward/_inverse.nii.gz (ITK displacement fields), "
                                                    "jacobian_determinant.nii.gz, run.json")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder of an earlier run")
    p.add_argument("--preset", choices=PRESETS, default=None, help="default: one forward pass; accurate: plus 50 "
                                                                   "steps of test-time optimisation; affine: the "
                                                                   "pre-alignment alone")
    p.add_argument("--iterations", type=int, default=None, help="steps of test-time optimisation of the field "
                                                                "(overrides the preset's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, gpu or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    _add_threads_arg(p)

    p = sub.add_parser("evaluate", help="metrics of a prediction against a reference")
    p.add_argument("--prediction", required=True)
    p.add_argument("--reference", required=True)
    p.add_argument("--labels", help="dataset.json whose labels name the values")
    p.add_argument("--output", help="write .json or .csv")

    p = sub.add_parser("benchmark", help="the fixed benchmark protocols (results into BENCHMARKS.md)")
    p.add_argument("suite", choices=BENCHMARK_SUITES)
    p.add_argument("--backbones", nargs="+", help="backbones suite: which backbones (default: all registered)")
    p.add_argument("--data", help="data folder (default ../shared/data/<suite>)")
    p.add_argument("--targets", type=int, default=None, help="limit the number of targets (default: all)")
    p.add_argument("--no-ants", action="store_true", help="skip the antspyx peer")
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy backend")
    p.add_argument("--markdown", default="BENCHMARKS.md", help="file to update with the results table")
    p.add_argument("--json", help="also write raw per-target results")
    p.add_argument("--device", default="cpu")
    _add_threads_arg(p)
    p.add_argument("--work", help="folder for resumable state: per-target rows (classic suites, default "
                                  "../benchmark_work), registration cache and models (dlf suites, default "
                                  "../dlf_benchmark_work; atlasnet suites, default ../atlasnet_benchmark_work)")
    p.add_argument("--no-resume", action="store_true", help="classic suites: neither save nor reuse finished "
                                                            "targets")
    p.add_argument("--epochs", type=int, default=None, help="dlf suites: training epochs (default: the suite's)")
    p.add_argument("--train-targets", type=int, default=None, help="dlf suites: limit training targets (smoke)")
    p.add_argument("--ablations", choices=("retrain", "switch-off", "none"), default="retrain",
                   help="dlf suites: train each ablation (paper), switch parts off in the trained DLF, or only "
                        "DLF and the plain U-Net")
    p.add_argument("--reduced", action="store_true", help="dlf, atlasnet and deepatlas suites: tiny networks "
                                                          "and patches (smoke test)")
    p.add_argument("--train-data", help="dlf-generalise: atlas set to train on (its cases are the atlases)")
    p.add_argument("--test-data", help="dlf-generalise: atlas set whose cases are the test targets")
    p.add_argument("--steps", type=int, default=None, help="atlasnet suites: optimisation steps per network; "
                                                           "deepatlas: DeepAtlas's steps, the schedule scaled "
                                                           "(default: the suite's, sized for 2 CPU cores)")
    p.add_argument("--backbone", default=None, help="atlasnet suites: every network's backbone (default unet)")
    p.add_argument("--labelled-counts", type=int, nargs="+", default=None,
                   help="deepatlas: labelled pool cases per configuration (default 1 5 16)")
    p.add_argument("--pairs", type=int, default=None, help="deepatlas: test pairs to register (default 200)")
    p.add_argument("--pipeline-targets", type=int, default=None,
                   help="deepatlas: targets of the multi-atlas pipeline comparison (default: every test target)")
    p.add_argument("--accurate", action="store_true",
                   help="deepatlas: also the learned backend's accurate preset (test-time optimisation; slow on CPU)")

    p = sub.add_parser("demo", help="run every fusion method on a phantom (or --data) and write a PNG")
    p.add_argument("--data", help="a real atlas set folder instead of the generated phantoms")
    p.add_argument("--output", default="demo_output")
    p.add_argument("--n-atlases", type=int, default=None, help="default 8 (phantom) or up to 10 (--data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    _add_registration_args(p)

    p = sub.add_parser("sample-data", help="build the sample atlas set: 10 hippocampus atlases and 2 targets of the "
                                           "Medical Segmentation Decathlon (CC BY-SA 4.0)")
    p.add_argument("--from", dest="source", metavar="PATH_OR_TAR",
                   help="a downloaded Task04_Hippocampus.tar (checked by MD5) or a Decathlon hippocampus folder "
                        "(default: download the archive)")
    p.add_argument("--output", help="the sample folder to build (default: ~/.cache/atlasseg/hippocampus-sample)")
    p.add_argument("--quiet", action="store_true")
    return parser


# ------------------------------------------------------------------------------------------------- output folder


def _not_an_input(output: Path, inputs: list[Path]) -> None:
    """The output folder is none of the inputs, lies in none of them and holds none of them."""
    out = output.resolve()
    for path in inputs:
        p = path.resolve()
        if p == out or (p.is_dir() and p in out.parents):
            raise ValueError(f"{output}: the output folder must not be an input or inside an input folder ({path})")
        if out in p.parents:
            raise ValueError(f"{output}: the output folder must not contain an input ({path})")


def _check_output_folder(output: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse, before any work: an output that is a file, one that is or holds an input, and a non-empty folder
    without ``--overwrite`` (with it, only the folder of an earlier run, one with ``run.json``)."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"{output}: exists and is a file, not an output folder")
    _not_an_input(output, inputs)
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise ValueError(f"{output}: the output folder exists and is not empty (choose another, or pass "
                             "--overwrite to replace it once the new run is complete)")
        record = RUN_RECORD
        if not (output / record).is_file():
            raise ValueError(f"{output}: not the output folder of an earlier run (no {record}); --overwrite "
                             "replaces only those: choose another output folder")


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT / SIGTERM held back (delivered afterwards) while the output folder is swapped into place."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = mask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def _staged_output(output: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh hidden folder beside ``output`` (creating it proves the location writable, before any work); on
    success it becomes ``output`` (an earlier run's folder is replaced only then), on any error or interrupt it is
    removed, with the parent folders created for it."""
    final = Path(os.path.realpath(output) if os.path.islink(output) else os.path.abspath(output))
    created = []
    ancestor = final.parent
    while not ancestor.exists():
        created.append(ancestor)
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{output}: cannot create the output folder: {ancestor} is a file")
    staging = final.parent / f".{final.name}.atlasseg-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as err:
        _remove_empty(created)
        raise ValueError(f"{output}: cannot write the output folder there ({err.strerror or err})") from None
    done = False
    try:
        yield staging
        with _signals_deferred():
            if final.is_dir() and any(final.iterdir()):
                if not overwrite:
                    raise ValueError(f"{output}: the output folder appeared during the run; the run is not "
                                     "moved over it (pass --overwrite)")
                old = final.parent / f".{final.name}.atlasseg-{os.getpid()}-{secrets.token_hex(4)}.old"
                try:
                    os.rename(final, old)
                except OSError as err:
                    raise ValueError(f"{output}: cannot replace the earlier run ({err.strerror or err}); the "
                                     "new run is not kept") from None
                try:
                    os.rename(staging, final)
                except OSError as err:
                    os.rename(old, final)       # the earlier run back in place
                    raise ValueError(f"{output}: cannot move the run into place ({err.strerror or err})") from None
                shutil.rmtree(old, ignore_errors=True)
            else:
                try:
                    if final.is_dir():
                        final.rmdir()           # empty: renaming over it is not portable
                    os.rename(staging, final)
                except OSError as err:
                    raise ValueError(f"{output}: cannot move the run into place ({err.strerror or err})") from None
            done = True
    finally:
        if not done:
            shutil.rmtree(staging, ignore_errors=True)
            _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    """Remove folders created for the output (deepest first), as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def _torch_threads(requested: int | None) -> Iterator[int]:
    """torch's CPU threads for the command (``--threads`` or :func:`default_threads`), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    threads = requested or default_threads(before)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------ segment


def _check_segment_args(args, method) -> None:
    """Everything the arguments alone can tell, before importing the engine or touching the output."""
    for target in args.target:
        if not Path(target).is_file():
            raise ValueError(f"{target}: target image {'is a folder' if Path(target).is_dir() else 'not found'}")
    if args.atlases and not Path(args.atlases).exists():
        raise ValueError(f"{args.atlases}: atlas set folder not found")
    if args.reference and not Path(args.reference).is_file():
        raise ValueError(f"{args.reference}: reference label image not found")
    if method.trains:
        if not args.model:
            raise ValueError(f"--method {args.method} needs --model MODEL_FOLDER (see atlasseg train --method "
                             f"{args.method})")
        if not Path(args.model).is_dir():
            raise ValueError(f"{args.model}: model folder not found")
    elif args.model:
        raise ValueError(f"--model is only used with a trained method ({', '.join(method_names(trains=True))})")
    if method.uses_atlases and not method.trains and not args.atlases:
        raise ValueError(f"--method {args.method} needs --atlases ATLAS_SET_FOLDER (the atlases it registers and "
                         "fuses)")
    if args.n_atlases is not None and args.n_atlases < 1:
        raise ValueError(f"--n-atlases {args.n_atlases}: at least 1 atlas is needed")
    if args.backend in MODEL_BACKENDS and not args.reg_model:
        raise ValueError(f"--backend {args.backend} needs --reg-model MODEL_FOLDER (a "
                         f"{MODEL_BACKENDS[args.backend]} model: atlasseg train --method "
                         f"{MODEL_BACKENDS[args.backend]})")
    if args.reg_model:
        if args.backend not in MODEL_BACKENDS:
            raise ValueError(f"--reg-model is used with --backend {' or '.join(MODEL_BACKENDS)}")
        if not Path(args.reg_model).is_dir():
            raise ValueError(f"{args.reg_model}: registration model folder not found")
    if not method.trains and args.n_atlases is not None and args.atlas_ids:
        _check_atlas_count(args, list(args.atlas_ids), "--atlas-ids", subset_ok=False)
    if not method.uses_atlases:
        unused = [flag for flag, value in (("--n-atlases", args.n_atlases), ("--atlas-ids", args.atlas_ids),
                                           ("--backend", args.backend), ("--preset", args.preset))
                  if value is not None]
        if unused:
            raise ValueError(f"{', '.join(unused)}: method {args.method} uses no atlases and no registration")
    jlf_given = [f"--jlf-{k.replace('_', '-')}" for k in JLF_DEFAULTS if getattr(args, f"jlf_{k}") is not None]
    if jlf_given and args.method != "jlf":
        raise ValueError(f"{', '.join(jlf_given)}: only used with --method jlf")


def _check_atlas_count(args, available: list[str], where: str, subset_ok: bool) -> None:
    """``--n-atlases`` against what there is after ``--exclude`` (or against ``--atlas-ids``). ``subset_ok``:
    fewer than ``--atlas-ids`` name takes the first of them (atlasnet's networks)."""
    n = args.n_atlases
    if n is None:
        return
    if args.atlas_ids:
        if n > len(args.atlas_ids) or (n < len(args.atlas_ids) and not subset_ok):
            raise ValueError(f"--n-atlases {n} does not match --atlas-ids, which names {len(args.atlas_ids)}")
        return
    excluded = sorted(set(args.exclude or []) & set(available))
    pool = [a for a in available if a not in set(excluded)]
    if n > len(pool):
        after = f" after excluding {', '.join(excluded)}" if excluded else ""
        raise ValueError(f"--n-atlases {n}: only {len(pool)} atlas(es) available in {where}{after}")


def _read_reference(path: str, target) -> object:
    """The reference label image, on the target's grid (else an error naming what differs)."""
    from .atlas import read_label
    from .io import Geometry

    reference = read_label(Path(path))
    diffs = Geometry.of(reference).differences(Geometry.of(target[0]))
    if diffs:
        raise ValueError(f"{path}: the reference is not on the target's grid: {'; '.join(diffs)}")
    return reference


def _segment(args) -> int:
    started = time.perf_counter()
    method = get_method(args.method)
    _check_segment_args(args, method)
    output = Path(args.output)
    inputs = [Path(p) for p in [*args.target, args.atlases, args.model, args.reference, args.reg_model] if p]
    _check_output_folder(output, inputs, args.overwrite)
    with _staged_output(output, args.overwrite) as staging, _torch_threads(args.threads) as threads:
        from .device import resolve_device
        from .pipeline import staged_run_folder
        from .registration import learned_model

        with staged_run_folder(staging, output):
            device = str(resolve_device(args.device))       # "cuda" without a GPU is an error here
            run, registration = _prepare_segment(args, method)
            inputs_s = time.perf_counter() - started
            with learned_model(args.reg_model):
                result = run()
            metrics = _save_run(args, result, staging, inputs_s, started,
                                {"threads": threads, "device": device, "registration": registration})
    print(f"segmentation: {output / 'segmentation.nii.gz'}")
    if metrics is not None:
        print(" ".join(f"dice[{m['name']}]={m['dice']:.3f}" for m in metrics["labels"].values()))
    return 0


def _prepare_segment(args, method):
    """Read and check every input (atlas set, model, target, reference, atlas choice): errors come here, before
    any registration. Returns the run (a callable) and the registration settings it will use."""
    from .atlas import load_atlas_set, load_target

    if args.backend in MODEL_BACKENDS and args.preset is None:
        args.preset = DEFAULT_PRESET      # a trained model's preset belongs to the backend it was trained with
    atlas_set = load_atlas_set(args.atlases) if args.atlases else None
    loaded = stored_atlases = None
    if method.trains:
        from .model_io import check_compatible, load_model

        loaded = load_model(args.model, "cpu", method=args.method)
        if isinstance(loaded.config.get("atlases"), dict):        # the model folder stores its atlases
            stored_atlases = [str(a) for a in loaded.config.get("architecture", {}).get("atlas_ids", [])]
        if method.uses_atlases and stored_atlases is None and atlas_set is None:
            raise ValueError(f"--method {args.method} needs --atlases ATLAS_SET_FOLDER (the atlases it registers "
                             "and fuses)")
    n_modalities = len(atlas_set.modalities) if atlas_set is not None else len(loaded.modalities)
    target = load_target(args.target, n_modalities)
    if loaded is not None:
        check_compatible(loaded, atlas_set, len(target))
    args.reference_image = _read_reference(args.reference, target) if args.reference else None
    registration = None
    if method.uses_atlases:
        trained = (loaded.config.get("registration") or {}) if loaded is not None else {}
        registration = {k: getattr(args, k) or trained.get(k) or REGISTRATION_DEFAULTS[k]
                        for k in ("backend", "preset")}
    if args.reg_model:       # the registration model is read and checked before any work
        from .deepatlas.inference import check_registration_model

        check_registration_model(args.reg_model, atlas_set, len(target))
        if registration is not None:
            registration["model"] = str(args.reg_model)
    if stored_atlases is not None:
        _check_atlas_count(args, stored_atlases, f"model {args.model} (one network each)", subset_ok=True)
    elif method.uses_atlases:
        from .pipeline import choose_atlases

        _check_atlas_count(args, list(atlas_set.case_ids), f"atlas set {args.atlases}", subset_ok=False)
        choose_atlases(atlas_set, args.n_atlases, args.exclude, args.seed, args.atlas_ids)  # unknown ids
    if loaded is not None:
        return (lambda: implementation(args.method).segment_method(
            target, atlas_set, loaded, n_atlases=args.n_atlases, atlas_ids=args.atlas_ids, exclude=args.exclude,
            backend=args.backend, device=args.device, preset=args.preset, seed=args.seed, maps=args.maps,
            show_progress=not args.quiet)), registration

    from .pipeline import segment

    given = {k: getattr(args, k) for k in ("n_atlases", "backend", "preset") if getattr(args, k) is not None}
    params = {}
    if args.method == "jlf":     # only what was given: the defaults live in the fusion code
        params = {k: getattr(args, f"jlf_{k}") for k in JLF_DEFAULTS if getattr(args, f"jlf_{k}") is not None}
    return (lambda: segment(target, atlas_set, method=args.method, atlas_ids=args.atlas_ids, exclude=args.exclude,
                            device=args.device, fusion_params=params, seed=args.seed,
                            show_progress=not args.quiet, **given)), registration


def _save_run(args, result, staging: Path, inputs_s: float, started: float, fields: dict) -> dict | None:
    """Metrics (with ``--reference``), then every output, then ``run.json`` (last) with the timings of all
    stages: inputs (reading and checking), the method's own (load, registration, warp, fusion / networks),
    metrics, saving and total."""
    from .pipeline import amend_run_record

    reference = args.reference_image
    result.timings = {"inputs": inputs_s, **result.timings}
    files, metrics = {}, None
    if reference is not None:
        from .metrics import segmentation_metrics, write_metrics

        t0 = time.perf_counter()
        names = {v: n for v, n in result.label_names.items() if v != 0}
        metrics = segmentation_metrics(result.segmentation, reference, names)
        files["metrics"] = str(write_metrics(metrics, staging / "metrics.json"))
        result.timings["metrics"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result.save(staging, maps=args.maps, transforms=args.transforms, reference=reference)
    saving = time.perf_counter() - t0
    amend_run_record(staging, {**{k: v for k, v in fields.items() if v is not None}, "files": files,
                               "timings_s": {"saving": saving, "total": time.perf_counter() - started}})
    return metrics


def _register(args) -> int:
    """``atlasseg register``: one moving image onto one fixed image with a DeepAtlas model's registration network,
    or with an iterative backend (checked before any work; the output folder is written whole, as for
    ``segment``)."""
    started = time.perf_counter()
    for what, paths in (("fixed", args.fixed), ("moving", args.moving),
                        ("moving label", [args.moving_label] if args.moving_label else [])):
        for path in paths:
            if not Path(path).is_file():
                raise ValueError(f"{path}: {what} image {'is a folder' if Path(path).is_dir() else 'not found'}")
    backend = args.backend or ("learned" if args.model else DEFAULT_BACKEND)
    if backend == "learned" and not args.model:
        raise ValueError("--backend learned needs --model (a DeepAtlas model folder)")
    if backend != "learned" and (args.model or args.iterations is not None):
        raise ValueError(f"--backend {backend}: --model and --iterations belong to the learned backend")
    if args.model and not Path(args.model).is_dir():
        raise ValueError(f"{args.model}: model folder not found")
    if args.iterations is not None and args.iterations < 0:
        raise ValueError(f"--iterations {args.iterations}: must be 0 or more")
    output = Path(args.output)
    inputs = [Path(p) for p in [*args.fixed, *args.moving, args.moving_label, args.model] if p]
    _check_output_folder(output, inputs, args.overwrite)
    with _staged_output(output, args.overwrite) as staging, _torch_threads(args.threads) as threads:
        from .atlas import check_same_grid, load_target, read_label
        from .deepatlas.inference import check_registration_model, register_pair
        from .device import resolve_device
        from .pipeline import amend_run_record, staged_run_folder

        with staged_run_folder(staging, output):
            device = str(resolve_device(args.device))
            fixed = load_target(args.fixed)
            moving = load_target(args.moving, len(fixed))
            label = None
            if args.moving_label:
                label = read_label(Path(args.moving_label))
                check_same_grid(moving[0], args.moving[0], label, args.moving_label)
            bundle = check_registration_model(args.model, None, len(fixed)) if args.model else None
            inputs_s = time.perf_counter() - started
            if not args.quiet:
                print(f"registering {args.moving[0]} to {args.fixed[0]} with {args.model or backend}",
                      file=sys.stderr)
            result = register_pair(fixed, moving, bundle, label, device, args.preset or DEFAULT_PRESET,
                                   args.iterations, backend)
            result.timings = {"inputs": inputs_s, **result.timings}
            result.save(staging)
            amend_run_record(staging, {"threads": threads, "device": device,
                                       "timings_s": {"total": time.perf_counter() - started}})
    stats = result.jacobian_stats
    print(f"registration: {output} (folding {stats['folding_percent']:.3f}% of voxels, SD of log|J| "
          f"{stats['log_jacobian_sd']:.3f})")
    return 0


# ------------------------------------------------------------------------------------------------ other commands


def _evaluate(args) -> int:
    for path in (args.prediction, args.reference):
        if not Path(path).is_file():
            raise ValueError(f"{path}: file not found")
    if args.labels and not Path(args.labels).is_file():
        raise ValueError(f"{args.labels}: file not found")
    from .atlas import read_label
    from .metrics import metrics_table, segmentation_metrics, write_metrics

    names = None
    if args.labels:
        meta = json.loads(Path(args.labels).read_text())
        names = {int(k): v for k, v in meta["labels"].items() if int(k) != 0}
    metrics = segmentation_metrics(read_label(Path(args.prediction)), read_label(Path(args.reference)), names)
    rows = [dict(label=f"{v} {m['name']}", **{k: m[k] for k in ("dice", "jaccard", "hd95", "assd", "sensitivity",
                                                                   "precision")})
            for v, m in metrics["labels"].items()]
    rows.append(dict(label="mean", **metrics["mean"]))
    print(metrics_table(rows))
    if args.output:
        write_metrics(metrics, args.output)
    return 0


def _demo(args) -> int:
    if args.preset is not None:
        raise ValueError("--preset: the demo registers with the default preset (not configurable)")
    if args.data and not Path(args.data).exists():
        raise ValueError(f"{args.data}: atlas set folder not found")
    if args.n_atlases is not None and args.n_atlases < 1:
        raise ValueError(f"--n-atlases {args.n_atlases}: at least 1 atlas is needed")
    from .demo import run_demo

    n = args.n_atlases if args.n_atlases is not None else (None if args.data else 8)    # None: up to 10
    given = {"backend": args.backend} if args.backend is not None else {}
    with _torch_threads(args.threads):
        run_demo(args.output, data=args.data, n_atlases=n, device=args.device, seed=args.seed,
                 show_progress=not args.quiet, **given)
    return 0


def _sample_data(args) -> int:
    """Build (or find intact) the sample folder; print where it is and how to segment a target with it."""
    from .sampledata import ensure_sample_set, read_sample_folder

    def progress(fraction: float, message: str) -> None:
        print(f"[{fraction:4.0%}] {message}", flush=True)

    folder = read_sample_folder(ensure_sample_set(args.output, args.source, progress=None if args.quiet else progress))
    print(f"atlas folder: {folder.atlas_folder}")
    for target in folder.targets:
        print(f"target {target.case_id}: {target.image} (reference labels: {target.label})")
    print(f"data: {folder.attribution}")
    if folder.targets:
        first = folder.targets[0]
        print(f"try: atlasseg segment --target {first.image} --atlases {folder.atlas_folder} --reference "
              f"{first.label} --output sample_output")
    return 0


def _train_configs(args, method: str, atlas_set=None) -> tuple[object | dict, object]:
    """(architecture, training) from --config and the flags; the architecture is a dict until the atlas set
    gives its data fields."""
    architecture_cls, training_cls = config_classes(method)
    file = read_json_config(args.config) if args.config else {}
    if file.get("method", method) != method:
        raise ValueError(f"{args.config}: a configuration for method {file['method']!r}, not {method!r}")
    unknown = sorted(set(file) - {"method", "architecture", "training"})
    if unknown:
        raise ValueError(f"{args.config}: unknown sections {unknown} (expected architecture, training)")
    arch = {**file.get("architecture", {}), **overrides_from_args(args, architecture_cls, ARCH_PREFIX)}
    training = dataclass_from(training_cls, file.get("training"), overrides_from_args(args, training_cls, "train_"),
                              where=args.config or "training")
    if atlas_set is None:
        return {k: v for k, v in arch.items() if k not in DATA_FIELDS}, training
    data = {"n_labels": len(atlas_set.labels), "n_modalities": len(atlas_set.modalities)}
    return dataclass_from(architecture_cls, {**arch, **data}, where=args.config or "architecture"), training


def _train(args) -> int:
    if args.atlases and not Path(args.atlases).exists():
        raise ValueError(f"{args.atlases}: atlas set folder not found")
    method = args.method
    if args.print_config:
        from .atlas import load_atlas_set

        arch, training = _train_configs(args, method, load_atlas_set(args.atlases) if args.atlases else None)
        if not args.atlases:   # show every architecture default, not only the ones given
            architecture_cls, _ = config_classes(method)
            defaults = {f.name: f.default for f in dataclasses.fields(architecture_cls)
                        if f.default is not dataclasses.MISSING}
            defaults.update({f.name: f.default_factory() for f in dataclasses.fields(architecture_cls)
                             if f.default_factory is not dataclasses.MISSING})
            arch = {**defaults, **arch}
        print(json.dumps({"method": method, "architecture": to_dict(arch), "training": to_dict(training)},
                         indent=2))
        return 0
    if not args.atlases or not args.output:
        raise ValueError("training needs --atlases ATLAS_SET_FOLDER and --output MODEL_FOLDER")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise ValueError(f"{args.output}: exists and is a file, not a model folder")
    _not_an_input(Path(args.output), [Path(args.atlases)])
    from .atlas import load_atlas_set

    atlas_set = load_atlas_set(args.atlases)
    arch, training = _train_configs(args, method, atlas_set)
    with _torch_threads(args.threads):
        result = implementation(method).train_method(atlas_set, args.output, arch, training, device=args.device,
                                                     resume=args.resume, cache_dir=args.cache,
                                                     show_progress=not args.quiet)
    print(f"model: {result.folder} (method {method}, best validation Dice {result.best_val_dice:.4f}, "
          f"{result.seconds / 60:.1f} min)")
    return 0


def _benchmark(args) -> int:
    if args.data and not Path(args.data).exists():
        raise ValueError(f"{args.data}: data folder not found")
    with _torch_threads(args.threads):
        if args.suite.startswith("dlf-"):
            from .benchmarks.dlf import run_dlf_benchmark

            run_dlf_benchmark(args)
        elif args.suite == "backbones":
            from .benchmarks.backbones import run_backbones_benchmark

            run_backbones_benchmark(args)
        elif args.suite == "deepatlas":
            from .benchmarks.deepatlas import run_deepatlas_benchmark

            run_deepatlas_benchmark(args)
        elif args.suite.startswith("atlasnet"):
            from .benchmarks.atlasnet import run_atlasnet_benchmark

            run_atlasnet_benchmark(args)
        elif args.suite == "instances":
            from .benchmarks.instances import run_instances_benchmark_cli

            run_instances_benchmark_cli(args)
        else:
            from .benchmarks.classic import run_benchmark

            run_benchmark(args)
    return 0


def _train_method_in(argv: list[str]) -> str | None:
    """The method a ``train`` command line names (``--method M``, or the ``method`` of its ``--config`` file)."""
    if not argv or argv[0] not in ("train", "dlf-train"):
        return None
    if argv[0] == "dlf-train":
        return "dlf"
    for k, arg in enumerate(argv):
        if arg == "--method" and k + 1 < len(argv):
            return argv[k + 1] if argv[k + 1] in method_names(trains=True) else None
        if arg.startswith("--method="):
            value = arg.split("=", 1)[1]
            return value if value in method_names(trains=True) else None
    for k, arg in enumerate(argv):
        path = argv[k + 1] if arg == "--config" and k + 1 < len(argv) else \
            arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if path is not None:
            try:
                method = read_json_config(path).get("method")
            except (OSError, ValueError):
                return None     # the parse that follows reports the file's problem
            return method if method in method_names(trains=True) else None
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` (temporary folders) runs."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _interrupt_handlers() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated`; SIGINT raises KeyboardInterrupt (unless it was ignored when we
    started, as for background jobs). The previous handlers come back afterwards (``main`` runs in tests too)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum, handler in ((signal.SIGTERM, _raise_terminated), (signal.SIGINT, signal.default_int_handler)):
        current = signal.getsignal(signum)
        if current is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    with _interrupt_handlers():
        try:
            return _main(argv)
        except KeyboardInterrupt as err:
            terminated = isinstance(err, Terminated)
            _error_line(f"atlasseg{' ' + command if command else ''}: "
                        f"{'terminated' if terminated else 'interrupted'}")
            return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


def _main(argv: list[str]) -> int:
    method = _train_method_in(argv)
    args = _parser(method).parse_args(argv)
    if args.command in ("train", "dlf-train"):
        if method is None and args.config:
            try:
                read_json_config(args.config)
            except (OSError, ValueError) as err:
                print(f"atlasseg {args.command}: error: {err}", file=sys.stderr)
                return 2
        if method is None:
            print("atlasseg train: error: --method is required (or a --config file naming it); choose from "
                  f"{', '.join(method_names(trains=True))}", file=sys.stderr)
            return 2
        args.method = method
    handlers = {"segment": _segment, "register": _register, "evaluate": _evaluate, "demo": _demo,
                "benchmark": _benchmark,
                "sample-data": _sample_data,
                "train": _train, "dlf-train": _train}
    try:
        return handlers[args.command](args)
    except (ValueError, FileExistsError, FileNotFoundError, KeyError) as err:   # AtlasSetError, ImageError, ...
        message = str(err).strip().strip("'\"") or err.__class__.__name__
        _error_line(f"atlasseg {args.command}: error: {message.splitlines()[0]}")
        return 2


def _error_line(line: str) -> None:
    """One line on stderr; on a terminal it first clears a progress bar being drawn on the current line."""
    clear = "\r\033[K" if sys.stderr.isatty() else ""
    print(f"{clear}{line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

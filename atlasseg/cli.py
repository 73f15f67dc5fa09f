"""Command line: ``atlasseg segment | train | evaluate | benchmark | demo`` (``dlf-train``: ``train --method dlf``).

Methods, backends and presets come from the registry (:mod:`atlasseg.methods`); training flags are derived from
each method's config dataclasses (:mod:`atlasseg.config`), so defaults are written once. Bad input ends with exit
code 2 and a one-line reason on stderr; nothing is written over the inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
from pathlib import Path

from .atlas import AtlasSetError, load_atlas_set, load_target, read_label
from .config import add_dataclass_args, dataclass_from, overrides_from_args, read_json_config, to_dict
from .fusion.jlf import joint_label_fusion
from .io import ImageError
from .methods import (
    BACKENDS,
    DATA_FIELDS,
    REGISTRATION_PRESETS,
    config_classes,
    get_method,
    implementation,
    method_names,
)

PRESETS = REGISTRATION_PRESETS
# joint label fusion's defaults, read from the function that applies them (no second copy)
JLF_DEFAULTS = {k: inspect.signature(joint_label_fusion).parameters[k].default
                for k in ("alpha", "beta", "patch_radius", "search_radius")}
BENCHMARK_SUITES = ("hippocampus", "fetal", "dlf-hippocampus", "dlf-fetal-sb", "dlf-generalise", "backbones",
                    "instances", "atlasnet", "atlasnet-fetal-sb")
ARCH_PREFIX = ""      # architecture flags keep their field names (--vote-channels, --backbone, ...)
# flags of the former dlf-train command, kept working: flag -> (destination field, value or None for "given")
LEGACY_TRAIN_FLAGS = {"--lr": ("learning_rate", float), "--candidates": ("candidates_per_target", int)}
LEGACY_SWITCHES = {"--no-weighted-voting": "use_weighted_voting", "--no-finetune": "use_finetune",
                   "--no-mask": "use_mask"}


def _add_registration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="torch", help="registration backend (default torch)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, gpu or cuda:N")
    p.add_argument("--preset", choices=PRESETS, default="default", help="registration quality preset")


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
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="multi-atlas segmentation of one target")
    p.add_argument("--target", nargs="+", required=True, help="target image(s), one per modality")
    p.add_argument("--atlases", required=True, help="atlas set folder (dataset.json, imagesTr, labelsTr)")
    p.add_argument("--output", required=True, help="output folder (segmentation.nii.gz, maps/, run.json)")
    p.add_argument("--method", choices=method_names(), default="jlf",
                   help="fusion method, or a trained method with --model (default jlf)")
    p.add_argument("--model", help="trained model folder (methods that train: "
                                   f"{', '.join(method_names(trains=True))})")
    p.add_argument("--n-atlases", type=int, default=None,
                   help="atlases drawn with --seed (default 10; for dlf the number the model was trained with)")
    p.add_argument("--atlas-ids", nargs="*", help="use exactly these atlas case ids")
    p.add_argument("--exclude", nargs="*", default=[], help="case ids never used as atlases (e.g. the target)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--maps", action="store_true", help="also write vote, weight and agreement maps")
    p.add_argument("--transforms", action="store_true", help="also write forward/inverse displacement fields")
    p.add_argument("--reference", help="reference label image: writes metrics.json and oracle coverage")
    for name, kind in (("alpha", float), ("beta", float), ("patch_radius", int), ("search_radius", int)):
        p.add_argument(f"--jlf-{name.replace('_', '-')}", type=kind, default=None,
                       help=f"joint label fusion {name} (default {JLF_DEFAULTS[name]}, as antsJointFusion)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_registration_args(p)

    for command in ("train", "dlf-train"):
        p = sub.add_parser(command, help="train a method's model on an atlas set" if command == "train" else
                           "alias of: train --method dlf")
        _add_train_args(p, train_method if command == "train" else "dlf", command)

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
    p.add_argument("--reduced", action="store_true", help="dlf and atlasnet suites: tiny networks and patches "
                                                          "(smoke test)")
    p.add_argument("--train-data", help="dlf-generalise: atlas set to train on (its cases are the atlases)")
    p.add_argument("--test-data", help="dlf-generalise: atlas set whose cases are the test targets")
    p.add_argument("--steps", type=int, default=None, help="atlasnet suites: optimisation steps per network "
                                                           "(default: the suite's, sized for 2 CPU cores)")
    p.add_argument("--backbone", default=None, help="atlasnet suites: every network's backbone (default unet)")

    p = sub.add_parser("demo", help="run every fusion method on a phantom (or --data) and write a PNG")
    p.add_argument("--data", help="a real atlas set folder instead of the generated phantoms")
    p.add_argument("--output", default="demo_output")
    p.add_argument("--n-atlases", type=int, default=None, help="default 8 (phantom) or 10 (--data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    _add_registration_args(p)
    return parser


def _check_output(output: Path, inputs: list[Path]) -> None:
    out = output.resolve()
    for path in inputs:
        p = path.resolve()
        if p == out or (p.is_dir() and (out == p or p in out.parents)):
            raise ValueError(f"{output}: the output folder must not be an input or inside an input folder ({path})")


def _segment(args) -> int:
    from .pipeline import segment

    atlas_set = load_atlas_set(args.atlases)
    _check_output(Path(args.output), [Path(args.atlases)] + [Path(t) for t in args.target])
    target = load_target(args.target, len(atlas_set.modalities))
    method = get_method(args.method)
    if method.trains:
        return _segment_trained(args, atlas_set, target)
    if args.model:
        raise ValueError(f"--model is only used with a trained method ({', '.join(method_names(trains=True))})")
    params = {}
    if args.method == "jlf":     # only what was given: the defaults live in the fusion code
        params = {k: getattr(args, f"jlf_{k}") for k in JLF_DEFAULTS if getattr(args, f"jlf_{k}") is not None}
    result = segment(target, atlas_set, method=args.method, n_atlases=args.n_atlases or 10, atlas_ids=args.atlas_ids,
                     exclude=args.exclude, backend=args.backend, device=args.device, preset=args.preset,
                     fusion_params=params, seed=args.seed, show_progress=not args.quiet)
    _write_result(args, atlas_set, result)
    return 0


def _segment_trained(args, atlas_set, target) -> int:
    from .model_io import load_model

    if not args.model:
        raise ValueError(f"--method {args.method} needs --model MODEL_FOLDER (see atlasseg train --method "
                         f"{args.method})")
    loaded = load_model(args.model, "cpu", method=args.method)
    result = implementation(args.method).segment_method(
        target, atlas_set, loaded, n_atlases=args.n_atlases, atlas_ids=args.atlas_ids, exclude=args.exclude,
        backend=args.backend, device=args.device, preset=args.preset, seed=args.seed, maps=args.maps,
        show_progress=not args.quiet)
    _write_result(args, atlas_set, result)
    return 0


def _write_result(args, atlas_set, result) -> None:
    from .metrics import segmentation_metrics, write_metrics

    reference = read_label(Path(args.reference)) if args.reference else None
    written = result.save(args.output, maps=args.maps, transforms=args.transforms, reference=reference)
    print(f"segmentation: {written['segmentation']}")
    if reference is not None:
        names = {v: n for v, n in atlas_set.labels.items() if v != 0}
        metrics = segmentation_metrics(result.segmentation, reference, names)
        write_metrics(metrics, Path(args.output) / "metrics.json")
        print(" ".join(f"dice[{n}]={metrics['labels'][v]['dice']:.3f}" for v, n in names.items()))


def _evaluate(args) -> int:
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
    from .demo import run_demo

    n = args.n_atlases or (10 if args.data else 8)
    run_demo(args.output, data=args.data, n_atlases=n, backend=args.backend, device=args.device, seed=args.seed,
             show_progress=not args.quiet)
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
    method = args.method
    if args.print_config:
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
    atlas_set = load_atlas_set(args.atlases)
    _check_output(Path(args.output), [Path(args.atlases)])
    arch, training = _train_configs(args, method, atlas_set)
    result = implementation(method).train_method(atlas_set, args.output, arch, training, device=args.device,
                                                 resume=args.resume, cache_dir=args.cache,
                                                 show_progress=not args.quiet)
    print(f"model: {result.folder} (method {method}, best validation Dice {result.best_val_dice:.4f}, "
          f"{result.seconds / 60:.1f} min)")
    return 0


def _benchmark(args) -> int:
    if args.suite.startswith("dlf-"):
        from .benchmarks.dlf import run_dlf_benchmark

        run_dlf_benchmark(args)
    elif args.suite == "backbones":
        from .benchmarks.backbones import run_backbones_benchmark

        run_backbones_benchmark(args)
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    handlers = {"segment": _segment, "evaluate": _evaluate, "demo": _demo, "benchmark": _benchmark,
                "train": _train, "dlf-train": _train}
    try:
        return handlers[args.command](args)
    except (AtlasSetError, ImageError, ValueError, FileExistsError, FileNotFoundError, KeyError) as err:
        message = str(err).strip().strip("'\"") or err.__class__.__name__
        print(f"atlasseg {args.command}: error: {message.splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"atlasseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

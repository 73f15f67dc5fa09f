"""Command line: ``atlasseg segment | evaluate | benchmark | demo``.

Bad input ends with exit code 2 and a one-line reason on stderr; nothing is written over the inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .atlas import AtlasSetError, load_atlas_set, load_target, read_label
from .fusion import METHODS
from .io import ImageError
from .registration import BACKENDS

PRESETS = ("fast", "default", "accurate", "affine")


def _add_registration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="torch", help="registration backend (default torch)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, gpu or cuda:N")
    p.add_argument("--preset", choices=PRESETS, default="default", help="registration quality preset")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlasseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="multi-atlas segmentation of one target")
    p.add_argument("--target", nargs="+", required=True, help="target image(s), one per modality")
    p.add_argument("--atlases", required=True, help="atlas set folder (dataset.json, imagesTr, labelsTr)")
    p.add_argument("--output", required=True, help="output folder (segmentation.nii.gz, maps/, run.json)")
    p.add_argument("--method", choices=METHODS + ("dlf",), default="jlf")
    p.add_argument("--model", help="trained Deep Label Fusion model folder (with --method dlf)")
    p.add_argument("--n-atlases", type=int, default=None,
                   help="atlases drawn with --seed (default 10; for dlf the number the model was trained with)")
    p.add_argument("--atlas-ids", nargs="*", help="use exactly these atlas case ids")
    p.add_argument("--exclude", nargs="*", default=[], help="case ids never used as atlases (e.g. the target)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--maps", action="store_true", help="also write vote, weight and agreement maps")
    p.add_argument("--transforms", action="store_true", help="also write forward/inverse displacement fields")
    p.add_argument("--reference", help="reference label image: writes metrics.json and oracle coverage")
    p.add_argument("--jlf-alpha", type=float, default=0.1)
    p.add_argument("--jlf-beta", type=float, default=2.0)
    p.add_argument("--jlf-patch-radius", type=int, default=2)
    p.add_argument("--jlf-search-radius", type=int, default=3)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_registration_args(p)

    p = sub.add_parser("dlf-train", help="train a Deep Label Fusion model on an atlas set")
    p.add_argument("--atlases", required=True, help="atlas set folder: targets and atlas pool for training")
    p.add_argument("--output", required=True, help="model folder (model.safetensors, config.json, log, curves)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--n-atlases", type=int, default=5, help="atlases per training target, re-drawn every epoch")
    p.add_argument("--candidates", type=int, default=None,
                   help="atlases registered per training target (default: every other case)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, gpu or cuda:N")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of targets held out for validation")
    p.add_argument("--val-interval", type=int, default=1, help="validate every K epochs (and after the last)")
    p.add_argument("--cache", help="registration cache folder (default OUTPUT/registration_cache)")
    p.add_argument("--patch-size", type=int, nargs=3, default=[48, 48, 48], metavar=("Z", "Y", "X"))
    p.add_argument("--vote-channels", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--finetune-channels", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--no-weighted-voting", action="store_true", help="ablation: uniform voting weights")
    p.add_argument("--no-finetune", action="store_true", help="ablation: no fine-tuning subnet")
    p.add_argument("--no-mask", action="store_true", help="ablation: no atlas-union masking")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--schedule", choices=("step", "cosine"), default="step")
    p.add_argument("--loss", choices=("gdl", "gdl_ce"), default="gdl_ce")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=BACKENDS, default="torch", help="registration backend (default torch)")
    p.add_argument("--preset", choices=PRESETS, default="default", help="registration quality preset")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("evaluate", help="metrics of a prediction against a reference")
    p.add_argument("--prediction", required=True)
    p.add_argument("--reference", required=True)
    p.add_argument("--labels", help="dataset.json whose labels name the values")
    p.add_argument("--output", help="write .json or .csv")

    p = sub.add_parser("benchmark", help="the fixed benchmark protocols (results into BENCHMARKS.md)")
    p.add_argument("suite", choices=("hippocampus", "fetal", "dlf-hippocampus", "dlf-fetal-sb", "dlf-generalise"))
    p.add_argument("--data", help="data folder (default ../shared/data/<suite>)")
    p.add_argument("--targets", type=int, default=None, help="limit the number of targets (default: all)")
    p.add_argument("--no-ants", action="store_true", help="skip the antspyx peer")
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy backend")
    p.add_argument("--markdown", default="BENCHMARKS.md", help="file to update with the results table")
    p.add_argument("--json", help="also write raw per-target results")
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", help="folder for resumable state: per-target rows (classic suites, default "
                                  "../benchmark_work), registration cache and models (dlf suites, default "
                                  "../dlf_benchmark_work)")
    p.add_argument("--no-resume", action="store_true", help="classic suites: neither save nor reuse finished "
                                                            "targets")
    p.add_argument("--epochs", type=int, default=None, help="dlf suites: training epochs (default: the suite's)")
    p.add_argument("--train-targets", type=int, default=None, help="dlf suites: limit training targets (smoke)")
    p.add_argument("--ablations", choices=("retrain", "switch-off", "none"), default="retrain",
                   help="dlf suites: train each ablation (paper), switch parts off in the trained DLF, or only "
                        "DLF and the plain U-Net")
    p.add_argument("--reduced", action="store_true", help="dlf suites: tiny networks and patches (smoke test)")
    p.add_argument("--train-data", help="dlf-generalise: atlas set to train on (its cases are the atlases)")
    p.add_argument("--test-data", help="dlf-generalise: atlas set whose cases are the test targets")

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
    if args.method == "dlf":
        return _segment_dlf(args, atlas_set, target)
    if args.model:
        raise ValueError("--model is only used with --method dlf")
    params = {}
    if args.method == "jlf":
        params = {"alpha": args.jlf_alpha, "beta": args.jlf_beta, "patch_radius": args.jlf_patch_radius,
                  "search_radius": args.jlf_search_radius}
    result = segment(target, atlas_set, method=args.method, n_atlases=args.n_atlases or 10, atlas_ids=args.atlas_ids,
                     exclude=args.exclude, backend=args.backend, device=args.device, preset=args.preset,
                     fusion_params=params, seed=args.seed, show_progress=not args.quiet)
    _write_result(args, atlas_set, result)
    return 0


def _segment_dlf(args, atlas_set, target) -> int:
    from .dlf.inference import segment_dlf

    if not args.model:
        raise ValueError("--method dlf needs --model MODEL_FOLDER (see atlasseg dlf-train)")
    result = segment_dlf(target, atlas_set, args.model, n_atlases=args.n_atlases, atlas_ids=args.atlas_ids,
                         exclude=args.exclude, backend=args.backend, device=args.device, preset=args.preset,
                         seed=args.seed, maps=args.maps, show_progress=not args.quiet)
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


def _dlf_train(args) -> int:
    from .dlf.networks import DLFConfig
    from .dlf.train import TrainConfig, train

    atlas_set = load_atlas_set(args.atlases)
    _check_output(Path(args.output), [Path(args.atlases)])
    architecture = DLFConfig(n_labels=len(atlas_set.labels), n_modalities=len(atlas_set.modalities),
                             vote_channels=tuple(args.vote_channels), finetune_channels=tuple(args.finetune_channels),
                             use_weighted_voting=not args.no_weighted_voting, use_finetune=not args.no_finetune,
                             use_mask=not args.no_mask)
    config = TrainConfig(epochs=args.epochs, n_atlases=args.n_atlases, patch_size=tuple(args.patch_size),
                         learning_rate=args.lr, schedule=args.schedule, loss=args.loss, val_fraction=args.val_fraction,
                         val_interval=args.val_interval,
                         candidates_per_target=args.candidates, seed=args.seed, backend=args.backend,
                         preset=args.preset)
    result = train(atlas_set, args.output, architecture, config, cache_dir=args.cache, device=args.device,
                   resume=args.resume, show_progress=not args.quiet)
    print(f"model: {result.folder} (best validation Dice {result.best_val_dice:.4f}, "
          f"{result.seconds / 60:.1f} min)")
    return 0


def _benchmark(args) -> int:
    if args.suite.startswith("dlf-"):
        from .dlf.benchmark import run_dlf_benchmark

        run_dlf_benchmark(args)
        return 0
    from .benchmark import run_benchmark

    run_benchmark(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"segment": _segment, "evaluate": _evaluate, "demo": _demo, "benchmark": _benchmark,
                "dlf-train": _dlf_train}
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

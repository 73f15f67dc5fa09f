"""Fixed benchmark protocols on the real data; results go into BENCHMARKS.md between markers.

hippocampus: sorted case ids; test targets are every 5th case (index % 5 == 0); the atlas pool is the rest; the same
10 atlases (drawn from the pool with seed 0) serve every target. Both registration backends, every fusion method,
and antspyx joint_label_fusion on the torch-warped atlases, measured side by side in one run.
fetal: leave-one-out over the 15 fetal-sb atlases, 10 atlases drawn (seed 0) from the other 14.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..atlas import load_atlas_set
from ..fusion import METHODS, oracle_coverage
from ..io import atomic_write_bytes, image_to_tensor
from ..metrics import nan_mean, segmentation_metrics
from ..pipeline import fuse_prepared, prepare
from .protocols import hippocampus_split, leave_one_out_atlases, require_data, shared_data
from .report import PeakMemory, command_line, git_commit, machine_description, update_markdown

METHOD_NAMES = {"majority": "majority voting", "weighted": "local weighted voting", "jlf": "joint label fusion",
                "staple": "STAPLE", "ants_jlf": "antspyx joint_label_fusion"}


def _ants_jlf(prepared, labels: list[int]) -> tuple[np.ndarray, float]:
    """antspyx joint_label_fusion on the same warped atlases (beta 2, rad 2, search 3, rho 0.1, max_lab_plus_one)."""
    import ants

    def to_ants(array: np.ndarray):
        # ANTs images from (Z, Y, X) arrays: geometry does not matter for fusion on one grid.
        return ants.from_numpy(np.ascontiguousarray(array.transpose(2, 1, 0)).astype(np.float32))

    target = to_ants(prepared.target[0].cpu().numpy())
    mask = to_ants(np.ones(prepared.target.shape[1:], dtype=np.float32))
    images = [to_ants(prepared.images[k, 0].cpu().numpy()) for k in range(prepared.images.shape[0])]
    segs = [to_ants(prepared.labels[k].cpu().numpy().astype(np.float32)) for k in range(prepared.labels.shape[0])]
    t0 = time.perf_counter()
    out = ants.joint_label_fusion(target, mask, images, beta=2, rad=2, label_list=segs, rho=0.1, r_search=3,
                                  max_lab_plus_one=True, verbose=False)
    seconds = time.perf_counter() - t0
    seg = out["segmentation"].numpy().transpose(2, 1, 0)
    numbers = list(out.get("segmentation_numbers", []))
    result = np.zeros(seg.shape, dtype=np.int64)
    if numbers and not set(np.unique(seg).tolist()) <= set(labels) | {0}:
        # values index into segmentation_numbers (1-based)
        for k, value in enumerate(numbers, start=1):
            result[seg == k] = int(value)
    else:
        result = seg.astype(np.int64)
    return result, seconds


def _evaluate(res_seg, reference, names) -> dict:
    m = segmentation_metrics(res_seg, reference, names)
    return {"dice": {v: m["labels"][v]["dice"] for v in names}, "hd95": {v: m["labels"][v]["hd95"] for v in names}}


ROWS_FORMAT = "atlasseg-benchmark-rows/1"


def _load_rows(path: Path | None, suite: str, commit: str, log=print) -> list[dict]:
    """Finished rows of an interrupted run of the same suite and commit (others are recomputed, with a note)."""
    if path is None or not path.is_file():
        return []
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable benchmark checkpoint ({err}); delete it to start again") from None
    if saved.get("format") != ROWS_FORMAT or saved.get("suite") != suite:
        raise ValueError(f"{path}: not a '{suite}' benchmark checkpoint; delete it or choose another --work")
    if saved.get("commit") != commit or "uncommitted" in commit:
        log(f"{path}: written by commit {saved.get('commit')}, this is {commit}: starting again")
        return []
    log(f"{path}: resuming after {len(saved['rows'])} finished target/backend row(s)")
    for row in saved["rows"]:  # JSON keys are strings: label values back to int
        for result in row["methods"].values():
            for key in ("dice", "hd95"):
                result[key] = {int(v): x for v, x in result[key].items()}
    return list(saved["rows"])


def _save_rows(path: Path | None, suite: str, commit: str, rows: list[dict]) -> None:
    if path is not None:
        payload = {"format": ROWS_FORMAT, "suite": suite, "commit": commit, "rows": rows}
        atomic_write_bytes(path, json.dumps(payload, indent=1, default=str).encode())


def run_suite(data: Path, suite: str, n_targets: int | None, backends: list[str], with_ants: bool,
              device: str, log=print, checkpoint: Path | None = None, commit: str = "unknown") -> dict:
    """Run the protocol; with ``checkpoint``, every finished (target, backend) row is saved there atomically and a
    rerun of the same commit skips the rows already there (rows carry their own wall time)."""
    atlas_set = load_atlas_set(data)
    ids = sorted(atlas_set.case_ids)
    names = {v: n for v, n in atlas_set.labels.items() if v != 0}
    labels = atlas_set.label_values
    if suite == "hippocampus":
        split = hippocampus_split(ids)
        targets = split.test
        atlas_for = {t: split.atlases for t in targets}
    else:
        targets = ids
        atlas_for = leave_one_out_atlases(ids)
    targets = targets[:n_targets] if n_targets else targets
    cache = {}

    def load(case_id):
        if case_id not in cache:
            cache[case_id] = atlas_set.load(case_id)
        return cache[case_id]

    rows = [r for r in _load_rows(checkpoint, suite, commit, log) if r["target"] in targets
            and r["backend"] in backends and ("ants_jlf" in r["methods"] or not with_ants or r["backend"] != "torch")]
    finished = {(r["target"], r["backend"]) for r in rows}
    for ti, target_id in enumerate(targets):
        todo = [b for b in backends if (target_id, b) not in finished]
        if not todo:
            continue
        case = load(target_id)
        atlases = [load(a) for a in atlas_for[target_id]]
        ref_tensor = image_to_tensor(case.label, torch.int64)[0]
        for backend in todo:
            row_start = time.perf_counter()
            with PeakMemory() as mem:
                prepared = prepare(case.images, atlas_set, atlases=atlases, backend=backend, device=device)
            reg_s = prepared.timings["registration"]
            covered, summary = oracle_coverage(prepared.labels, ref_tensor.to(prepared.labels.device), labels, 0.1)
            row = {"target": target_id, "backend": backend, "registration_s": reg_s,
                   "registration_s_per_atlas": reg_s / len(atlases), "registration_peak_gib": mem.gib,
                   "oracle10": {str(k): v for k, v in summary.items()}, "methods": {}}
            for method in METHODS:
                with PeakMemory() as mem:
                    t0 = time.perf_counter()
                    res = fuse_prepared(prepared, method)
                    seconds = time.perf_counter() - t0
                row["methods"][method] = dict(_evaluate(res.segmentation, case.label, names), seconds=seconds,
                                              peak_gib=mem.gib)
            if with_ants and backend == "torch":
                import SimpleITK as sitk

                with PeakMemory() as mem:
                    seg, seconds = _ants_jlf(prepared, labels)
                image = sitk.GetImageFromArray(seg.astype(np.uint8))
                image.CopyInformation(case.label)
                row["methods"]["ants_jlf"] = dict(_evaluate(image, case.label, names), seconds=seconds,
                                                  peak_gib=mem.gib)
            row["wall_s"] = time.perf_counter() - row_start
            rows.append(row)
            _save_rows(checkpoint, suite, commit, rows)
            dice = {m: [round(d, 3) for d in r["dice"].values()] for m, r in row["methods"].items()}
            log(f"[{ti + 1}/{len(targets)}] {target_id} {backend}: reg {reg_s:.1f}s  {dice}")
            del prepared
        cache.pop(target_id, None)
    order = {(t, b): k for k, (t, b) in enumerate((t, b) for t in targets for b in backends)}
    rows.sort(key=lambda r: order[(r["target"], r["backend"])])
    return {"suite": suite, "data": str(data), "targets": targets, "atlases": atlas_for, "labels": names,
            "rows": rows}


def summarize(results: dict) -> dict:
    """Mean Dice / HD95 per label, mean time and peak memory, per backend and method."""
    names = results["labels"]
    out = {}
    for row in results["rows"]:
        b = out.setdefault(row["backend"], {"reg_s_per_atlas": [], "reg_peak": [], "oracle": [], "methods": {}})
        b["reg_s_per_atlas"].append(row["registration_s_per_atlas"])
        b["reg_peak"].append(row["registration_peak_gib"])
        b["oracle"].append(row["oracle10"].get("foreground", float("nan")))
        for m, r in row["methods"].items():
            mm = b["methods"].setdefault(m, {"dice": {v: [] for v in names}, "hd95": {v: [] for v in names},
                                             "seconds": [], "peak": []})
            for v in names:
                mm["dice"][v].append(r["dice"][v])
                mm["hd95"][v].append(r["hd95"][v])
            mm["seconds"].append(r["seconds"])
            mm["peak"].append(r["peak_gib"])
    return out


def markdown(results: dict, command: str, wall_s: float) -> str:
    names = results["labels"]
    commit = results.get("commit") or git_commit()
    summary = summarize(results)
    n = len(results["targets"])
    lines = [f"Command: `{command}`  ",
             f"Machine: {machine_description()}  ",
             f"Date: {datetime.date.today().isoformat()}, commit {commit}, wall time {wall_s / 60:.1f} min "
             "(summed over targets and resumed runs)  ",
             f"Targets: {n}; atlases per target: 10", ""]
    label_cols = " | ".join(f"Dice {names[v]}" for v in names)
    hd_cols = " | ".join(f"HD95 {names[v]} (mm)" for v in names)
    lines.append(f"| registration | fusion | {label_cols} | mean Dice | {hd_cols} | fusion s/target | "
                 "peak RSS GiB |")
    lines.append("|" + "---|" * (5 + 2 * len(names)))
    for backend, b in summary.items():
        for m, mm in b["methods"].items():
            dices = [nan_mean(mm["dice"][v]) for v in names]
            hds = [nan_mean(mm["hd95"][v]) for v in names]
            lines.append(f"| {backend} | {METHOD_NAMES.get(m, m)} | " + " | ".join(f"{d:.4f}" for d in dices)
                         + f" | {np.mean(dices):.4f} | " + " | ".join(f"{h:.2f}" for h in hds)
                         + f" | {nan_mean(mm['seconds']):.2f} | {max(mm['peak']):.2f} |")
    lines.append("")
    lines.append("| registration | s per atlas (mean) | s per target (10 atlases) | peak RSS GiB | oracle(10%) "
                 "foreground coverage |")
    lines.append("|---|---|---|---|---|")
    for backend, b in summary.items():
        s = nan_mean(b["reg_s_per_atlas"])
        lines.append(f"| {backend} | {s:.2f} | {10 * s:.1f} | {max(b['reg_peak']):.2f} | {nan_mean(b['oracle']):.4f} |")
    lines.append("")
    lines += _ratios(summary, names)
    return "\n".join(lines) + "\n"


def _ratios(summary: dict, names: dict) -> list[str]:
    out = ["Side-by-side ratios and differences (same run):", ""]
    t = summary.get("torch")
    g = summary.get("greedy")
    if t and g:
        ratio = nan_mean(t["reg_s_per_atlas"]) / nan_mean(g["reg_s_per_atlas"])
        out.append(f"- registration time per atlas, torch / greedy: **{ratio:.2f}x**")
        for v, n in names.items():
            d = nan_mean(t["methods"]["majority"]["dice"][v]) - nan_mean(g["methods"]["majority"]["dice"][v])
            out.append(f"- majority voting Dice {n}, torch - greedy: {d:+.4f}")
    if t:
        for v, n in names.items():
            d = nan_mean(t["methods"]["jlf"]["dice"][v]) - nan_mean(t["methods"]["majority"]["dice"][v])
            out.append(f"- our JLF - majority voting, Dice {n} (torch registration): {d:+.4f}")
        if "ants_jlf" in t["methods"]:
            for v, n in names.items():
                d = nan_mean(t["methods"]["jlf"]["dice"][v]) - nan_mean(t["methods"]["ants_jlf"]["dice"][v])
                out.append(f"- our JLF - antspyx JLF, Dice {n} (same warped atlases): {d:+.4f}")
            speed = nan_mean(t["methods"]["ants_jlf"]["seconds"]) / nan_mean(t["methods"]["jlf"]["seconds"])
            out.append(f"- JLF speed-up over antspyx on CPU: **{speed:.1f}x**")
    return out


def check_ants(with_ants: bool) -> None:
    """The antspyx peer needs the ``ants`` module: without it, fail at the start (not after the first target's
    registrations) and say what to do."""
    if not with_ants:
        return
    try:
        import ants  # noqa: F401
    except (ImportError, OSError) as err:
        raise ValueError(f"antspyx is not installed (cannot import 'ants': {err}): install it (pip install antspyx, "
                         "or pip install -e '.[bench]') or pass --no-ants to skip the antspyx peer") from None


def run_benchmark(args) -> dict:
    check_ants(not args.no_ants)
    name = args.suite.replace("fetal", "fetal-sb")
    data = require_data(Path(args.data) if args.data else shared_data(name), name)
    backends = ["torch"] + ([] if args.no_greedy else ["greedy"])
    command = command_line("atlasseg benchmark " + args.suite)
    commit = git_commit()  # the code measured: taken before the run, not after
    work = Path(args.work) if args.work else Path.cwd().parent / "benchmark_work"
    checkpoint = None if args.no_resume else work / f"{args.suite}-rows.json"
    results = run_suite(data, args.suite, args.targets, backends, with_ants=not args.no_ants, device=args.device,
                        checkpoint=checkpoint, commit=commit)
    wall = sum(r.get("wall_s", 0.0) for r in results["rows"])  # summed over resumed runs
    results["commit"] = commit
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    body = markdown(results, command, wall)
    title = {"hippocampus": "Classic multi-atlas segmentation: hippocampus (Decathlon Task04)",
             "fetal": "Leave-one-out multi-atlas segmentation: fetal-sb (135x189x155, 8 labels)"}[args.suite]
    update_markdown(Path(args.markdown), args.suite, title, body)
    print(body)
    return results

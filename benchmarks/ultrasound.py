"""Intrapartum ultrasound: speed of segmentation + biometry, AoP/HSD agreement, TAP-SLF key points, key frames.

(a) frames per second of :func:`medseg.measure.ultrasound.ultrasound_job` (segment every frame of a
stack of PSFHS validation frames with a pack, then measure AoP and HSD by the IUGC contour rules) on
the CPU with ``--threads`` threads, and on the GPU when one is available;
(b) mean and median |ΔAoP| (degrees) and |ΔHSD| (pixels of the 256 grid) of each pack's segmentation
against the reference masks, on the PSFHS validation split (IDs 04350-04572, no training or
pre-training step saw it), frames where both are measurable; for a TAP-SLF pack also the AoP from its
own key-point head, the mean key-point error and the plane-class accuracy
(:func:`medseg.train.multitask.evaluate_iter`);
(c) with ``--keyframes-bank``: the summariser pack on validation pseudo-loops
(:func:`medseg.train.keyframes.evaluate_loops`).

    python benchmarks/ultrasound.py [--packs ultrasound-fhps,ultrasound-tapslf] [--fps-frames 32] [--threads 1]
                                    [--keyframes-bank work/keyframes/bank-val.npz]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import table, write_section  # noqa: E402

from medseg.engine.predictor import PredictConfig  # noqa: E402
from medseg.engine.progress import run_sync  # noqa: E402
from medseg.measure.biometry import aop_hsd  # noqa: E402
from medseg.measure.ultrasound import ultrasound_job  # noqa: E402
from medseg.models.tapslf import trainable_fraction  # noqa: E402
from medseg.train.datasets import evenly, read_case_image, read_mask  # noqa: E402
from medseg.train.packs import available_packs, load_pack  # noqa: E402
from medseg.train.recipes import get_recipe  # noqa: E402

NAME = "Intrapartum ultrasound: speed, AoP/HSD agreement, TAP-SLF, key frames"


def fps(pack, stack: np.ndarray, device: str, repeats: int = 2) -> float:
    config = PredictConfig(tile=pack.tile, overlap=pack.overlap, device=device, batch_size=8)
    run_sync(ultrasound_job(stack[:2], pack, config))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_sync(ultrasound_job(stack, pack, config))
        best = min(best, time.perf_counter() - t0)
    return len(stack) / best


def agreement(pack, images: np.ndarray, refs: np.ndarray) -> dict:
    result = run_sync(ultrasound_job(images, pack, PredictConfig(tile=pack.tile, overlap=pack.overlap, device="cpu", batch_size=8)))
    aop, hsd = [], []
    for row, ref in zip(result.rows, refs):
        rb = aop_hsd(ref)
        if row.ok and rb.ok:
            aop.append(abs(row.aop_deg - rb.aop))
            hsd.append(abs(row.hsd_px - rb.hsd))
    return {"n": len(refs), "measured": len(aop), "aop_mean": np.mean(aop), "aop_median": np.median(aop), "hsd_mean": np.mean(hsd),
            "hsd_median": np.median(hsd)}


def training_commands(label: str, manifest: dict) -> list[str]:
    t = manifest.get("training", {})
    out = []
    if t.get("pretrain_command"):
        out.append(f"- `{label}` encoder pre-training: `{t['pretrain_command']}`")
    command = t.get("command") or manifest.get("command")
    if command:
        out.append(f"- `{label}`: `{command}`")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packs", default="ultrasound-fhps,ultrasound-tapslf", help="comma-separated pack ids or folders (missing ones are reported)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--fps-frames", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="only this many evaluation frames, spread over the split (quick checks)")
    ap.add_argument("--keyframes-bank", default=None, help="bank-val.npz of medseg.train.keyframes (evaluates --summariser on its pseudo-loops)")
    ap.add_argument("--summariser", default="ultrasound-keyframes", help="key-frame pack id or folder (with --keyframes-bank)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    command = "python benchmarks/ultrasound.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    recipe = get_recipe("psfhs")
    cases = evenly(recipe.cases(args.split), args.limit)
    images = np.stack([read_case_image(c)[0] for c in cases])
    refs = np.stack([read_mask(c, 3) for c in cases])
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None

    speed_rows, acc_rows, tap_rows, notes, commands = [], [], [], [], []
    installed = available_packs()
    for name in [p for p in args.packs.split(",") if p]:
        if name not in installed and not Path(name).is_dir():
            notes.append(f"- pack `{name}` is not installed: no row.")
            continue
        pack = load_pack(name)
        label = pack.id + "".join(f" ({k} {v})" for k, v in pack.manifest.get("overrides", {}).items() if pack.architecture == "tapslf")
        stack = images[: args.fps_frames]
        commands.extend(training_commands(label, pack.manifest))
        row = {"pack": label, "architecture": f"{pack.architecture}/{pack.config}",
               f"CPU frames/s ({args.threads} thread{'s' if args.threads > 1 else ''})": f"{fps(pack, stack, 'cpu'):.1f}"}
        row["GPU frames/s"] = f"{fps(pack, stack, 'cuda'):.1f} ({gpu})" if gpu else "none (no GPU here)"
        speed_rows.append(row)
        a = agreement(pack, images, refs)
        acc_rows.append({"pack": label, "frames (measured)": f"{a['n']} ({a['measured']})", "mean abs. ΔAoP (°)": f"{a['aop_mean']:.2f}",
                         "median abs. ΔAoP (°)": f"{a['aop_median']:.2f}", "mean abs. ΔHSD (px)": f"{a['hsd_mean']:.2f}",
                         "median abs. ΔHSD (px)": f"{a['hsd_median']:.2f}"})
        if pack.architecture == "tapslf":
            from medseg.train.multitask import evaluate_iter

            s = run_sync(evaluate_iter(pack, cases))["summary"]
            trainable, total = trainable_fraction(pack.model)
            tap_rows.append({"pack": label, "trainable / all parameters": f"{trainable:,} / {total:,} ({trainable / total:.1%})",
                             "Dice PS / FH": f"{s['dice_ps']:.3f} / {s['dice_fh']:.3f}",
                             "mean abs. ΔAoP, masks (°)": f"{s['aop_err_mask']:.2f} ({s['measured_mask']})",
                             "mean abs. ΔAoP, key points (°)": f"{s['aop_err_keypoints']:.2f} ({s['measured_keypoints']})",
                             "mean key-point error (px)": f"{s['kp_error_px']:.1f}", "plane accuracy": f"{s['plane_accuracy']:.3f}"})

    body = [f"PSFHS `{args.split}` split: {len(cases)} frames of 256 x 256 that no training or pre-training step saw. "
            f"Speed: {min(args.fps_frames, len(cases))} frames as one stack through `ultrasound_job` (segmentation, then AoP/HSD by the IUGC "
            "contour rules), best of 2 after a warm-up, batch 8. The CPU is shared with other jobs, so speeds are lower bounds.", "",
            "### Speed: segmentation + biometry", "", table(speed_rows, list(speed_rows[0]) if speed_rows else ["pack"]), "",
            "### AoP / HSD against the reference masks (frames where both are measurable)", "",
            table(acc_rows, list(acc_rows[0]) if acc_rows else ["pack"])]
    if tap_rows:
        body += ["", "### TAP-SLF: its three heads (AoP from its own key points vs from its mask)", "", table(tap_rows, list(tap_rows[0])), "",
                 "No foundation-model weights are available offline: the ViT encoder (patch 16, dim 128, 8 blocks) was pre-trained by "
                 "masked-image modelling (MAE, 75% of the patches hidden, per-patch normalised pixel targets) on the PSFHS **training** split "
                 "only, then frozen; prompts, LoRA (top 2 of 8 blocks), adapter, neck and heads were trained jointly on segmentation, "
                 "plane class and the three AoP key points (V, E, T) derived from the reference masks by the IUGC rules. Every validation "
                 "frame is a standard plane, so the plane accuracy only shows that no frame was called non-standard. Key-point AoP = the "
                 "law of cosines on the three predicted points (`medseg.measure.biometry.aop_from_points`); mask AoP = the IUGC rules on its "
                 "segmentation."]
    if args.keyframes_bank:
        from medseg.train.keyframes import evaluate_loops

        data = np.load(args.keyframes_bank)
        bank = {k: data[k] for k in data.files}
        summariser = load_pack(args.summariser)
        commands.extend(training_commands(summariser.id, summariser.manifest))
        report = evaluate_loops(summariser.model, bank)
        rows = [{"picks": k, "F-measure vs quality target": f"{v['f_measure']:.3f}", "mean quality of picks": f"{v['mean_quality']:.3f}",
                 "picks showing PS + FH": f"{v['both_structures']:.3f}"} for k, v in report.items() if isinstance(v, dict)]
        body += ["", f"### Key frames: FullTransNet on {report['loops']} validation pseudo-loops", "", table(rows, list(rows[0])), "",
                 "Pseudo-loops (`medseg.train.keyframes`): every frame of a split in 4 variants (itself; probe drift = translation up to "
                 "45% of each side; defocus = Gaussian blur sigma 2-5 plus speckle; shadow = contrast x0.15-0.4 and a dark band over 30-60% "
                 "of the width), each run once through `ultrasound-fhps` for its features (pooled encoder stages, 480 values) and its "
                 "quality (0 unless PS and FH are both predicted, else the mean winning softmax probability over their pixels). A loop: "
                 "24-64 positions over consecutive frame IDs (advance with probability 0.6, else hold), the variant from a good/degraded "
                 "chain switching with probability 0.25 per frame. Target = the ceil(0.15 T) highest-quality frames with quality > 0. "
                 "Training loops come from the train split, these from the val split. F-measure is against that target; the quality "
                 "columns say how good the picked frames are."]
    if commands:
        body += ["", "Training commands (from the manifests):", ""] + commands
    body += notes
    text = "\n".join(body)
    print(text) if args.no_write else write_section(NAME, text, command)


if __name__ == "__main__":
    main()

"""Weight averaging of packs ("model soup", Wortsman et al., ICML 2022): one network whose weights are
the weighted mean of several packs' weights.

It only makes sense for packs that lie in one basin of the loss: continuations of one training run (a
pack and the run that continued it with ``--init-from``, or checkpoints of one run). Packs must agree on
everything but their weights (architecture, config and overrides, channels, classes, normalisation,
output activation, pixel size, tile, click encoding); anything else is refused with one sentence. The
averaged pack costs nothing at inference: it is one network of the same size. Its manifest keeps the
first pack's description and training record, says which packs were averaged with which weights, and
drops the validation metrics (they belonged to the first pack): ``medseg average --validate`` measures
them again on the training recipe's validation split.

    medseg average PACK PACK [...] [--weights 0.7,0.3] --pack-id ID [--version V] -o OUT [--validate]
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from medseg.engine.progress import Job
from medseg.errors import UsageError
from medseg.train.packs import Pack, load_pack, save_pack

# What must be equal for packs to be averaged (besides matching weight names and shapes): name -> value of a pack.
MUST_MATCH: dict[str, Callable[[Pack], Any]] = {
    "architecture": lambda p: p.architecture,
    "config": lambda p: p.config,
    "overrides": lambda p: p.manifest.get("overrides") or {},
    "input channels": lambda p: p.in_channels,
    "classes": lambda p: [c.to_dict() for c in p.classes],
    "normalisation": lambda p: p.normaliser.to_spec(),
    "output activation": lambda p: p.activation,
    "pixel size": lambda p: p.mpp,
    "tile": lambda p: p.tile,
    "interactive": lambda p: p.interactive,
    "click encoding": lambda p: p.manifest.get("click_encoding"),
    "sequences": lambda p: p.manifest.get("sequences"),
}


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise UsageError(f"{len(weights)} weights were given for {n} packs: give one weight per pack (e.g. --weights 0.7,0.3).")
    if any(not w > 0 for w in weights):
        raise UsageError("Averaging weights must be positive numbers: drop a pack instead of giving it weight 0.")
    total = sum(weights)
    return [w / total for w in weights]


def check_averageable(packs: Sequence[Pack]) -> None:
    """Refuse, with one sentence, packs that differ in anything but their weights."""
    first = packs[0]
    for other in packs[1:]:
        for key, value in MUST_MATCH.items():
            a, b = value(first), value(other)
            if a != b:
                raise UsageError(
                    f"Packs '{first.id}' and '{other.id}' cannot be averaged: they differ in {key} "
                    f"({json.dumps(a)} against {json.dumps(b)}); average only continuations of one training run."
                )
        sa, sb = first.model.state_dict(), other.model.state_dict()
        if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
            raise UsageError(f"Packs '{first.id}' and '{other.id}' cannot be averaged: they differ in the names or shapes of their weights.")


def average_packs(sources: Sequence[str | Path | Pack], weights: Sequence[float] | None = None) -> Pack:
    """A pack whose weights are the weighted mean of the sources' (weights default to equal; they are
    normalised to sum to one). Integer buffers are taken from the first pack. The result keeps the first
    pack's id and manifest, with ``averaged_from`` recording the sources and without stale metrics."""
    if len(sources) < 2:
        raise UsageError("Averaging needs at least two packs: name two or more pack ids or folders.")
    packs = [s if isinstance(s, Pack) else load_pack(s) for s in sources]
    share = _weights(weights, len(packs))
    check_averageable(packs)
    states = [p.model.state_dict() for p in packs]
    mixed: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            acc = torch.zeros(first.shape, dtype=torch.float64)
            for w, state in zip(share, states):
                acc += w * state[key].detach().to(torch.float64)
            mixed[key] = acc.to(first.dtype)
        else:
            mixed[key] = first.clone()
    base = packs[0]
    model = copy.deepcopy(base.model)
    model.load_state_dict(mixed)
    manifest = {k: v for k, v in base.manifest.items() if k not in ("metrics", "weights")}
    manifest["averaged_from"] = [
        {
            "pack": p.id,
            "version": p.manifest.get("version"),
            "sha256": p.sha256,
            "given_as": None if isinstance(s, Pack) else str(s),
            "weight": round(w, 6),
            "command": p.manifest.get("command"),  # how it was trained (its training record is kept only for the first)
            "steps": p.manifest.get("training", {}).get("steps"),
            "seconds": p.manifest.get("training", {}).get("seconds"),
            **({"averaged_from": p.manifest["averaged_from"]} if p.manifest.get("averaged_from") else {}),  # an average of averages keeps the whole tree
        }
        for s, p, w in zip(sources, packs, share)
    ]
    return dataclasses.replace(base, model=model, manifest=manifest, path=None)


def validate_iter(pack: Pack, data_root: str | None = None) -> Job[dict[str, Any]]:
    """Generator (progress per image): the manifest's ``metrics`` for a segmentation pack, scored on its
    training recipe's validation split exactly as training scores the packs it writes."""
    from medseg.train.evaluate import evaluate_iter, headline
    from medseg.train.recipes import get_recipe

    dataset = pack.manifest.get("training", {}).get("dataset")
    if not dataset:
        raise UsageError(f"Pack '{pack.id}' records no training dataset: score it with 'medseg evaluate --dataset ...' instead of --validate.")
    if pack.interactive:
        raise UsageError(f"Pack '{pack.id}' is interactive: its validation is the number-of-clicks protocol (benchmarks/interactive.py), not --validate.")
    recipe = get_recipe(dataset)
    report = yield from evaluate_iter(pack, recipe, recipe.cases("val", data_root), split="val")
    return headline(report)


# --------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    p = sub.add_parser(
        "average",
        help="average the weights of packs from one training run (model soup) into a new pack",
        description="Write a pack whose weights are the weighted mean of the given packs' weights. The packs must be continuations of one "
        "training run (same architecture, classes and input); the result is one network of the same size.",
    )
    p.add_argument("packs", nargs="+", metavar="PACK", help="pack ids or folders (two or more; the first one's description and training record are kept)")
    p.add_argument("--weights", default=None, metavar="W,W,...", help="one positive weight per pack, normalised to sum to one (default: equal)")
    p.add_argument("--pack-id", default=None, help="id of the written pack (default: the first pack's)")
    p.add_argument("--version", default=None, help="version of the written pack (default: the first pack's)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="pack folder to write")
    p.add_argument("--validate", action="store_true", help="score the result on its training dataset's validation split and record the metrics in the manifest")
    p.add_argument("--data-root", default=None, help="with --validate: folder holding the recipe data folders (default: $MEDSEG_DATA or ../shared/data)")
    p.set_defaults(run=run)


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"'{text}' is not a list of weights: write them as numbers separated by commas (e.g. 0.7,0.3).") from None


def _command(args) -> str:
    parts = ["medseg", "average", *args.packs]
    for flag, value in (("--weights", args.weights), ("--pack-id", args.pack_id), ("--version", args.version), ("-o", args.output)):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts + (["--validate"] if args.validate else []))


def run(args) -> int:
    pack = average_packs(args.packs, _parse_weights(args.weights))
    if args.pack_id:
        pack.id = args.pack_id
    extra: dict[str, Any] = {"command": _command(args), "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if args.version:
        extra["version"] = args.version
    if args.validate:  # score the weights as they will be written (fp16), not the float32 mean
        from medseg.cli import drive

        pack.model.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in pack.model.state_dict().items()})
        extra["metrics"] = drive(validate_iter(pack, args.data_root), desc=f"validate {pack.id}", unit="image")
    out = save_pack(pack, args.output, dtype=torch.float16, extra=extra)
    share = ", ".join(f"{a['given_as'] or a['pack']} {a['weight']:g}" for a in pack.manifest["averaged_from"])
    print(f"averaged {share}; pack '{pack.id}' written to {out}", file=sys.stderr)
    if "metrics" in extra:
        print(json.dumps(extra["metrics"], indent=2))
    return 0


__all__ = ["MUST_MATCH", "add_parser", "average_packs", "check_averageable", "validate_iter"]

"""``medseg click``: the object from an image and its clicks, as a binary mask (stateless)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def add_parser(sub) -> None:
    p = sub.add_parser(
        "click",
        help="segment one object from clicks on an image (binary mask)",
        description="Recompute one object from the image and all clicks, in order, and write its mask (uint8 0/1, the image's height and width). "
        "An interactive pack (an <id>-click pack trained with 'medseg train --interactive') is guided by the clicks; an automatic pack keeps the connected object under each positive click "
        "and removes the region under each negative click.",
    )
    p.add_argument("image", metavar="IMAGE", help="a 2-D image (grey or RGB)")
    p.add_argument("--model", "-m", required=True, help="pack id or pack folder (see 'medseg models')")
    p.add_argument("--points", default="", metavar='"x,y,+;x,y,-"', help="clicks in order: column, row (image pixels), + inside the object, - outside it")
    p.add_argument("--box", default=None, metavar="x0,y0,x1,y1", help="a box around the object, applied before the clicks (the object is kept inside it)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png", help="mask file to write (PNG or TIFF)")
    p.add_argument("--mpp", type=float, default=None, help="pixel size of the image in µm (default: from the file when it says)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or mps")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU (about twice as fast)")
    p.add_argument("--no-seed", action="store_true",
                   help="interactive pack: let the network alone answer the first click (default: start from its automatic pack's object when installed)")
    p.set_defaults(run=run)


def _parse_box(text: str):
    from medseg.errors import UsageError
    from medseg.interactive.clicks import Box

    try:
        xa, ya, xb, yb = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"'{text}' is not a box: write it as x0,y0,x1,y1 (image pixels).") from None
    return Box.from_corners(xa, ya, xb, yb)


def run(args) -> int:
    from medseg.errors import UsageError
    from medseg.interactive.clicks import parse_points
    from medseg.interactive.session import segment_clicks
    from medseg.io import read_image, write_labels
    from medseg.train.packs import resolve

    clicks = parse_points(args.points) if args.points.strip() else []
    box = _parse_box(args.box) if args.box else None
    if not clicks and box is None:
        raise UsageError('Give at least one click (--points "x,y,+") or a box (--box x0,y0,x1,y1).')
    out = Path(args.output)
    if out.suffix.lower() not in (".png", ".tif", ".tiff"):
        raise UsageError(f"'{out.name}' is not a mask file name: end it in .png or .tif.")
    image = read_image(args.image)
    pack = resolve(args.model)
    mask = segment_clicks(image, pack, clicks, box=box, mpp=args.mpp, device=args.device, bf16=args.bf16, seed=not args.no_seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_labels(out, np.ascontiguousarray(mask, dtype=np.uint8))
    kind = "interactive pack" if pack.interactive else "automatic pack (click fallback)"
    print(f"{int(mask.sum())} object pixels from {len(clicks)} click(s){' and a box' if box else ''} with {pack.id} ({kind}); mask written to {out}", file=sys.stderr)
    return 0


__all__ = ["add_parser", "run"]

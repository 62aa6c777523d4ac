"""What does each part of CM-CGNS add? Patient-level 5-fold cross-validation on the chest radiograph-note pairs.

For each fold, three image encoders (the same small U-Net encoder and report encoder):
- **random**: randomly initialised, not trained;
- **InfoNCE**: pretrained on the other folds with the global image-report InfoNCE alone (no local
  losses, no cluster guidance, no reconstruction), for as many steps as CM-CGNS;
- **CM-CGNS**: pretrained on the other folds with every loss (stage I, then stage II).

and two read-outs on the held-out fold:
- a linear probe of ``finding`` on the frozen pooled encoder features (multinomial logistic
  regression, class-balanced, fitted on the training folds): balanced accuracy and macro one-vs-rest AUC.
  Classes: the finding's first label; ``unlabelled`` images left out; labels with fewer than 10
  images pooled as "other";
- image -> report retrieval among the held-out fold's distinct reports: recall@1/5/10 (chance: k / reports).

Run: ``OMP_NUM_THREADS=1 python benchmarks/pretrain.py --stage1-epochs 5 --stage2-epochs 5`` (half an hour on one
thread of a 2-core machine shared with other work).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import table, write_section  # noqa: E402

from medseg.engine.progress import run_sync  # noqa: E402
from medseg.pretrain.data import centre_crop, load_images, load_size, patient_folds, read_pairs, to_tensor  # noqa: E402
from medseg.pretrain.losses import clusters_for  # noqa: E402
from medseg.pretrain.model import CMCGNS, ModelSpec  # noqa: E402
from medseg.pretrain.text import Vocabulary, encode_reports, has_sentences  # noqa: E402
from medseg.pretrain.train import PretrainConfig, pretrain_iter  # noqa: E402

DATA = Path(os.environ.get("MEDSEG_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
MIN_CLASS = 10


def probe_labels(findings: list[str]) -> tuple[np.ndarray, list[str]]:
    """Class index per image (-1: left out) and the class names."""
    first = [f.split(",")[0].strip() for f in findings]
    counts: dict[str, int] = {}
    for f in first:
        counts[f] = counts.get(f, 0) + 1
    names = sorted(f for f, c in counts.items() if c >= MIN_CLASS and f != "unlabelled") + ["other"]
    labels = np.array([-1 if f == "unlabelled" else names.index(f) if f in names else len(names) - 1 for f in first])
    return labels, names


@torch.no_grad()
def features(model: CMCGNS, squares: np.ndarray, texts: list[str], vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled encoder features, global image features and global report features of a set of pairs."""
    model.eval()
    pooled, image, report = [], [], []
    for i in range(0, len(squares), 32):
        f = model.encode_image(to_tensor(centre_crop(squares[i : i + 32], model.spec.image_size)))
        pooled.append(f.pooled.numpy())
        image.append(f.global_.numpy())
        r = encode_reports(texts[i : i + 32], vocab, model.spec.max_words, model.spec.max_sentences)
        report.append(model.encode_reports(r).global_.numpy())
    return np.concatenate(pooled), np.concatenate(image), np.concatenate(report)


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int, l2: float = 1e-2) -> np.ndarray:
    """Class probabilities on ``x_test`` from a class-balanced multinomial logistic regression (L-BFGS)."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xt = torch.tensor((x_train - mu) / sd, dtype=torch.float64)
    xv = torch.tensor((x_test - mu) / sd, dtype=torch.float64)
    y = torch.tensor(y_train)
    counts = torch.bincount(y, minlength=n_classes).double()
    weight = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp_min(1)), torch.zeros_like(counts))
    lin = torch.nn.Linear(xt.shape[1], n_classes).double()
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xt), y, weight=weight) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return torch.softmax(lin(xv), -1).numpy()


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    from scipy.stats import rankdata

    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def probe_scores(prob: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[float, float]:
    pred = prob.argmax(1)
    present = [c for c in range(n_classes) if (y == c).any()]
    bacc = float(np.mean([(pred[y == c] == c).mean() for c in present]))
    aucs = [auc(prob[:, c], y == c) for c in present if 0 < (y == c).sum() < len(y)]
    return bacc, float(np.mean(aucs))


def retrieval_recall(image: np.ndarray, report: np.ndarray, texts: list[str], ks=(1, 5, 10)) -> tuple[dict[int, float], int]:
    """Image -> report recall@k among the distinct reports of the set."""
    distinct = sorted(set(texts))
    first = {t: texts.index(t) for t in distinct}
    bank = report[[first[t] for t in distinct]]
    target = np.array([distinct.index(t) for t in texts])
    order = np.argsort(-(image @ bank.T), axis=1, kind="stable")
    rank = np.argmax(order == target[:, None], axis=1)
    return {k: float((rank < k).mean()) for k in ks}, len(distinct)


def report(args, rows, timing, folds, done, records, class_names, t_start) -> None:
    """The table over the folds done so far (written after every fold, so a stopped run still leaves its numbers)."""
    names = {"random": "random init (no pretraining)", "infonce": "global InfoNCE alone", "cmcgns": "CM-CGNS (all losses, 2 stages)"}
    out = []
    for m, r in rows.items():

        def ms(key: str) -> str:
            v = np.array([x[key] for x in r])
            return f"{v.mean():.3f} ± {v.std():.3f}"

        out.append({"encoder": names[m], "balanced acc.": ms("bacc"), "macro AUC": ms("auc"), "R@1": ms("r@1"), "R@5": ms("r@5"), "R@10": ms("r@10"),
                    "s / fold": f"{timing[m] / len(r):.0f}"})
    n_rep = np.mean([x["reports"] for x in rows["cmcgns"]])
    body = "\n".join([
        "Patient-level cross-validation on `cxr_notes/pairs.csv` (chest radiographs with case notes): for each fold the encoders are "
        "pretrained on the other folds only and read out on the held-out patients. Mean ± s.d. over folds.",
        "",
        table(out, ["encoder", "balanced acc.", "macro AUC", "R@1", "R@5", "R@10", "s / fold"]),
        "",
        f"- {done} of {args.folds} folds; {len(records)} pairs with a usable report, "
        f"{len({r.group for r in records})} patients; images {args.image_size}² (U-Net small encoder, 1.2 M parameters; report encoder "
        f"2-layer transformer, width 128, trained from the reports); batch 16; CM-CGNS {args.stage1_epochs} + {args.stage2_epochs} epochs, "
        f"InfoNCE {args.stage1_epochs + args.stage2_epochs} epochs (same steps); 1 epoch = one image per distinct report.",
        f"- Probe classes ({len(class_names)}): {', '.join(class_names)} (first label of `finding`; `unlabelled` left out; labels under "
        f"{MIN_CLASS} images pooled as other). Chance balanced accuracy {1 / len(class_names):.3f}, AUC 0.5.",
        f"- Retrieval among the held-out fold's distinct reports (about {n_rep:.0f} per fold): chance R@1/5/10 ≈ "
        f"{1 / n_rep:.3f} / {5 / n_rep:.3f} / {10 / n_rep:.3f}.",
        f"- Whole run {((time.perf_counter() - t_start) / 60):.1f} min on {args.threads} thread(s), on a machine shared with other work.",
    ])
    print(body, flush=True)
    if not args.no_write:
        write_section("Image-report pretraining (CM-CGNS): linear probe and retrieval", body, "OMP_NUM_THREADS=1 python " + " ".join([sys.argv[0].replace(str(Path.cwd()) + "/", "")] + sys.argv[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=str(DATA / "cxr_notes" / "pairs.csv"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--run-folds", type=int, default=None, help="run only the first N folds (quick checks)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--stage1-epochs", type=int, default=5)
    parser.add_argument("--stage2-epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default="work/bench-pretrain")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    records = [r for r in read_pairs(args.pairs) if has_sentences(r.text)]
    labels, class_names = probe_labels([r.fields.get("finding", "") for r in records])
    texts = [r.text for r in records]
    squares = run_sync(load_images(records, load_size(args.image_size)))
    folds = patient_folds(records, args.folds, seed=0)
    methods = ["random", "infonce", "cmcgns"]
    rows: dict[str, list[dict]] = {m: [] for m in methods}
    timing: dict[str, float] = {m: 0.0 for m in methods}
    for f, test in enumerate(folds[: args.run_folds or args.folds]):
        train = np.setdiff1d(np.arange(len(records)), test)
        train_records = [records[i] for i in train]
        for method in methods:
            t0 = time.perf_counter()
            cfg = PretrainConfig(method="cmcgns" if method == "random" else method, image_size=args.image_size, stage1_epochs=args.stage1_epochs,
                                 stage2_epochs=args.stage2_epochs if method != "infonce" else 0, val_fraction=0.0, threads=args.threads,
                                 workdir=args.workdir, run=f"fold{f}-{method}", fresh=True, seed=42 + f)
            if method == "infonce":  # the same number of steps as CM-CGNS, all with the global loss
                cfg.stage1_epochs = args.stage1_epochs + args.stage2_epochs
            if method == "random":
                torch.manual_seed(cfg.seed)
                vocab = Vocabulary.build(r.text for r in train_records)
                model = CMCGNS(ModelSpec(image_size=args.image_size, vocab_size=len(vocab), clusters=clusters_for(0)))
            else:
                result = run_sync(pretrain_iter(cfg, records=train_records))
                model, vocab = result.model, result.vocab
            p_tr, _, _ = features(model, squares[train], [texts[i] for i in train], vocab)
            p_te, g_te, r_te = features(model, squares[test], [texts[i] for i in test], vocab)
            keep_tr, keep_te = labels[train] >= 0, labels[test] >= 0
            prob = linear_probe(p_tr[keep_tr], labels[train][keep_tr], p_te[keep_te], len(class_names))
            bacc, mauc = probe_scores(prob, labels[test][keep_te], len(class_names))
            recall, n_reports = retrieval_recall(g_te, r_te, [texts[i] for i in test])
            timing[method] += time.perf_counter() - t0
            rows[method].append({"bacc": bacc, "auc": mauc, **{f"r@{k}": v for k, v in recall.items()}, "reports": n_reports})
            print(f"fold {f} {method:8s} bacc {bacc:.3f} auc {mauc:.3f} R@1 {recall[1]:.3f} R@5 {recall[5]:.3f} R@10 {recall[10]:.3f} "
                  f"({n_reports} reports, {time.perf_counter() - t0:.0f} s)", flush=True)

        report(args, rows, timing, folds, f + 1, records, class_names, t_start)


if __name__ == "__main__":
    main()

"""Score a teacher's guidance: its samples from one fixed bank of held-out noises with balanced
labels (the test bank by default), unguided and at each CFG scale, by the judge (metrics.py).

    python evaluate.py --teacher runs/teacher/ckpt.pt --w 1 2 3 --json metrics.json
    python evaluate.py --check-classifiers   # retrain the shipped filter and judge, and compare
"""
import sys

import torch

import cli
import data
import noises
from checkpoint import load_teacher, save_json
from cli import entry_point, resolve_device
from diffusion import BATCH, STEPS
from metrics import (CLASSIFIER_STEPS, FILTER, JUDGE, MIRROR_SAFE, cached, classifier_path,
                     classifier_settings, half_of, judge_line, load_judge, print_regimes,
                     run_regimes, save_classifier, shipped_path, train_classifier)


def check_shipped():
    """Retrain each classifier of the embedded set on the CPU and compare it with the shipped copy;
    where no copy was made with today's settings, write one to commit. Exit status 1 if a copy
    differs: on the CPU that made them, the code changed; on another CPU, its last bits may."""
    test = data.load_dataset("shapes", "data", 16, "test")
    train = data.load_dataset("shapes", "data", 16, "train")
    flip, differs = "shapes" in MIRROR_SAFE, False
    for spec in (FILTER, JUDGE):
        shipped = shipped_path(classifier_path("shapes", "data", test, spec))
        made_with = classifier_settings(spec, flip, CLASSIFIER_STEPS)
        net, acc = train_classifier(half_of(train, spec.half), test, spec, flip)
        ckpt = cached(shipped)
        if ckpt is None or ckpt.get("settings") != made_with:
            save_classifier(net, acc, train.classes, made_with, shipped)
            print(f"{spec.role}: no shipped copy made with today's settings; wrote {shipped} "
                  f"(held-out accuracy {acc:.3f}): commit it")
            continue
        diff = max((net.state_dict()[k].float() - v.float()).abs().max().item()
                   for k, v in ckpt["model"].items())
        differs |= diff > 0
        print(f"{spec.role}: retrained here, largest weight difference from the shipped copy "
              f"{diff:.3g}{' (identical)' if diff == 0 else ''}; held-out accuracy {acc:.3f} "
              f"(shipped {ckpt['test_acc']:.3f})")
    if differs:
        sys.exit("the shipped classifiers differ from the ones this code trains on this CPU")


def build_parser():
    p = cli.Parser(__doc__)
    p.add_argument("--teacher", type=cli.checkpoint_file, default="runs/teacher/ckpt.pt",
                   help="teacher checkpoint")
    p.add_argument("--n", type=cli.integer(10, 10 ** 7), default=1000,
                   help="samples per regime (balanced classes)")
    p.add_argument("--steps", type=cli.STEPS_1000, default=STEPS, help="DDIM steps")
    p.add_argument("--w", type=cli.number(0, 100), nargs="+", default=[1.0, 2.0, 3.0, 4.0],
                   help="CFG scales to compare")
    p.add_argument("--bank", default="test", choices=noises.BANKS,
                   help="held-out noises: 'test' for reported tables, 'dev' for choosing settings")
    p.add_argument("--batch-size", type=cli.integer(1, 65536), default=BATCH, help="sampling batch")
    p.add_argument("--json", type=cli.file_path, default=None, help="also write the table here")
    p.add_argument("--fid", action="store_true",
                   help="also Inception FID against the training set (needs pytorch-fid; fid.py)")
    p.add_argument("--seed", type=cli.SEED, default=0,
                   help="seeds torch; the noise bank itself is fixed")
    p.add_argument("--device", type=cli.device, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--check-classifiers", action="store_true",
                   help="only retrain the filter and judge of the embedded set on the CPU and "
                        "compare them with the copies in classifiers/, or write a copy where none "
                        "has today's name (about a minute)")
    return p


@entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    if args.check_classifiers:
        return check_shipped()
    torch.manual_seed(args.seed)
    import fid  # Inception's code only when asked for
    # a missing package fails before the sampling
    inception = fid.inception(device) if args.fid else None
    teacher, ckpt = load_teacher(args.teacher, device)
    ds = ckpt["data"]
    judge = load_judge(ds["dataset"], ds["data_dir"], ds["image_size"], device)
    x_T, y = noises.bank(args.bank, args.n, len(ds["classes"]),
                         (3, ds["image_size"], ds["image_size"]))
    regimes = {"unguided": {}, **{f"cfg w={w:g}": dict(w=w) for w in args.w}}
    rows, images, _, _ = run_regimes(teacher, judge, x_T, y, regimes, args.steps, args.batch_size)
    # rows named by their regime, cfg, with w in a column of its own
    rows = [{**row, "name": name.split()[0]} for name, row in rows.items()]
    print_regimes(rows, f"{args.teacher}: {args.n} held-out noises ({args.bank} bank), "
                      f"{args.steps} DDIM steps\n{judge_line(judge)}")
    fid_rows = None
    if inception is not None:
        scorer = fid.FID(inception)
        fid_rows = scorer.table(images,
                                scorer.reference(ds["dataset"], ds["data_dir"], ds["image_size"]))
        fid.print_fid(fid_rows)
    if args.json:
        save_json({"regimes": rows, "fid": fid_rows, "judge": judge.info(), "filter": None,
                   "bank": args.bank, "teacher": args.teacher}, args.json)


if __name__ == "__main__":
    main()

"""Does NoiseRefine hold beyond one teacher? The whole pipeline (teacher, guided pairs, refiner,
judged table) on several teachers, each stage cached, so a re-run only does what is missing.

    python study.py              # every teacher, the chosen refiner recipe, the dev bank
    python study.py --bank test  # the final table: run once, after the recipe was chosen on dev
    python study.py --teachers unet-lr4e-3 --recipe steps1500  # one lever on one teacher (dev bank)
    python study.py --teachers unet-s3 --bank test  # the held-out teacher seed, at the very end

Each teacher is `train_teacher.py` with the flags of TEACHERS; each refiner is `train_refiner.py`
on it with the flags of RECIPES; a trained refiner is scored on the other bank by
`train_refiner.py --resume` (no retraining). Everything lives in --out/<teacher>/ and is reused
while its flags are unchanged. The table gives, per teacher: unguided, CFG at the middle and top of
the pairs' w range, refined; the share of the unguided-to-CFG gap the refined noise closes
(accuracy and FD_cls; "-" where CFG is not at least 1 point or 0.5 better); refined minus CFG
(middle) with its paired 95% interval; and the wall time of each stage. A teacher "reaches CFG"
when the refined noise is within 1 point of CFG's class accuracy and no worse in FD_cls (point
estimates; the intervals are printed).
"""
import json
import os
import subprocess
import sys
import time

import torch

import cli
import noises
from checkpoint import load_checkpoint, load_teacher, save_json
from cli import entry_point, print_table, resolve_device
from noiserefine import load_refiner, prod_a, refine_many
from safety import BadInput, write_atomic

ROOT = os.path.dirname(os.path.abspath(__file__))

# name: train_teacher.py flags. unet-s0 is train_teacher.py's default recipe (the README's teacher,
# trained again here in its own folder); unet-lr4e-3 is the recipe that matched it on its own
# scores and reversed the result (docs/speed.md); digits are real scans (scikit-learn's, written
# out on first use).
TEACHERS = {
    "unet-s0": [],
    "unet-s1": ["--seed", "1"],
    "unet-s2": ["--seed", "2"],
    "unet-lr4e-3": ["--lr", "4e-3", "--steps", "2000", "--warmup", "100"],
    "unet-5000": ["--steps", "5000"],
    "dit-tiny": ["--model", "dit-tiny"],
    "digits": ["--dataset", "folder", "--data-dir", "data/digits", "--image-size", "16"],
}
# Looked at only once the recipe is chosen: does the recipe hold on a teacher nobody tuned it on?
HELD_OUT = {"unet-s3": ["--seed", "3"]}
ALL_TEACHERS = {**TEACHERS, **HELD_OUT}

# name: train_refiner.py flags. The first is the study's default recipe, the one chosen on the dev
# bank across the teachers and today train_refiner.py's defaults (written out, so that a later
# change of those defaults cannot reuse its cached runs); the others are the earlier default and
# the levers (docs/teachers.md).
RECIPES = {
    "lr1e-3-steps1500": ["--lr", "1e-3", "--steps", "1500"],
    "lr3e-4-steps600": ["--lr", "3e-4", "--steps", "600"],
    "steps1500": ["--lr", "3e-4", "--steps", "1500"],
    "lr1e-3": ["--lr", "1e-3", "--steps", "600"],
    "lora8": ["--lora-rank", "8", "--lr", "1e-3", "--steps", "600"],
    "pairs20k": ["--pairs", "20000", "--lr", "3e-4", "--steps", "600"],
    "n5": ["--msd-steps", "5", "--lr", "3e-4", "--steps", "600"],
    "w1-3": ["--w-range", "1", "3", "--lr", "3e-4", "--steps", "600"],
}

def build_parser():
    p = cli.Parser(__doc__)
    p.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(ALL_TEACHERS),
                   help=f"which teachers (default: all but the held-out {', '.join(HELD_OUT)})")
    p.add_argument("--recipe", default=next(iter(RECIPES)), choices=list(RECIPES),
                   help="the refiner recipe (RECIPES; the default: the one chosen, "
                   "train_refiner.py's defaults)")
    p.add_argument("--bank", default="dev", choices=noises.BANKS,
                   help="held-out noises of the table: 'dev' for choosing a recipe, "
                   "'test' for the final table")
    p.add_argument("--seed", type=cli.SEED, default=0,
                   help="the refiner's seed (its pairs and batches); "
                   "the teachers' seeds are part of TEACHERS")
    p.add_argument("--fd-reference", action="store_true",
                   help="also print each table's FD_cls intervals with the real reference "
                   "resampled (as every table does) and held fixed (as they did before): "
                   "docs/evaluation.md")
    p.add_argument("--out", type=cli.folder, default="runs/study",
                   help="output folder (one folder per teacher)")
    p.add_argument("--device", type=cli.device, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    return p


def run(script, flags):
    """Run one of the repository's scripts in a child process (its progress bars show); its wall
    seconds. A failure ends the study in one line that names the command (the child has printed
    why)."""
    start = time.perf_counter()
    rc = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags]).returncode
    if rc:
        raise BadInput(f"study: `python {script} {' '.join(flags)}` failed (exit {rc}); "
                       "its message is above")
    return time.perf_counter() - start


def remembered(folder, flags, redo=None):
    """What `folder`'s study.json records, refused unless it was made with these flags, so that an
    edited entry of TEACHERS or RECIPES is refused in one line instead of silently reusing an old
    run. redo: the folder to delete to redo it (a teacher's: everything trained on it too)."""
    path = os.path.join(folder, "study.json")
    if not os.path.isfile(path):
        return {}
    saved = json.load(open(path))
    if saved["flags"] != flags:
        raise BadInput(f"study: {folder} was made with {saved['flags']}, not {flags}; "
                       f"delete {redo or folder} to redo it")
    return saved


def remember(folder, flags, redo=None, **fields):
    """Record fields in folder's study.json (written before its child runs, so a cut run is checked
    too)."""
    os.makedirs(folder, exist_ok=True)
    saved = {**remembered(folder, flags, redo), "flags": flags, **fields}
    save_json(saved, os.path.join(folder, "study.json"))
    return saved


def finished(path, kind):
    """Whether the checkpoint at path has trained all of its steps (a cut run is resumed
    instead)."""
    if not os.path.isfile(path):
        return False
    ckpt = load_checkpoint(path, kind)
    return ckpt["step"] >= ckpt["args"]["steps"]


def export_digits(folder):
    """scikit-learn's 1,797 8x8 digit scans as folder/<digit>/<i>.png (scikit-learn is needed only
    here)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise BadInput(f"study: the digits teacher needs {folder}; pip install scikit-learn, or "
                       "leave out --teachers digits") from None
    import numpy as np
    from PIL import Image
    # renamed when whole: a cut export is not taken for one
    digits, part = load_digits(), folder + ".tmp"
    for i, (x, y) in enumerate(zip(digits.images, digits.target)):
        os.makedirs(os.path.join(part, str(y)), exist_ok=True)
        gray = (x / 16 * 255).astype(np.uint8)
        Image.fromarray(np.repeat(gray[..., None], 3, 2)).save(
            os.path.join(part, str(y), f"{i:04d}.png"))
    os.replace(part, folder)


def get_teacher(name, args):
    """The teacher's checkpoint, trained (or resumed) first if it is not finished; its training
    seconds."""
    folder = os.path.join(args.out, name, "teacher")
    flags = ALL_TEACHERS[name]
    if "--data-dir" in flags:
        data_dir = flags[flags.index("--data-dir") + 1]
        if not os.path.isdir(data_dir):
            export_digits(data_dir)
    ckpt, redo = os.path.join(folder, "ckpt.pt"), os.path.dirname(folder)
    if not finished(ckpt, "teacher"):
        resume = ["--resume"] if os.path.isfile(ckpt) else []
        # a resumed run adds to its first part
        before = remember(folder, flags, redo).get("seconds", 0)
        print(f"\n== study: teacher {name} (python train_teacher.py {' '.join(flags)})", flush=True)
        seconds = run("train_teacher.py",
                      flags + ["--out", folder, "--device", args.device] + resume)
        remember(folder, flags, redo, seconds=before + seconds)
    return ckpt, remembered(folder, flags, redo)


def refiner_folder(args):
    return f"refiner-{args.recipe}" + (f"-seed{args.seed}" if args.seed else "")


def get_metrics(name, ckpt, args):
    """metrics.json of the recipe's refiner on this teacher, on args.bank: the refiner is trained
    the first time (with the pairs, cached next to the teacher), and scored on another bank with
    --resume."""
    folder = os.path.join(args.out, name, refiner_folder(args))
    flags = RECIPES[args.recipe] + ["--seed", str(args.seed)]
    path = os.path.join(folder, f"metrics_{args.bank}.json")
    saved = remembered(folder, flags)
    if not os.path.isfile(path):
        trained = finished(os.path.join(folder, "ckpt.pt"), "refiner")
        # a cut run goes on
        resume = ["--resume"] if os.path.isfile(os.path.join(folder, "ckpt.pt")) else []
        remember(folder, flags)
        print(f"\n== study: {args.recipe} refiner on {name}, {args.bank} bank", flush=True)
        seconds = run("train_refiner.py",
                      flags + ["--teacher", ckpt, "--out", folder, "--bank", args.bank,
                               "--device", args.device] + resume)
        os.replace(os.path.join(folder, "metrics.json"), path)
        os.replace(os.path.join(folder, "measured.pt"),
                   os.path.join(folder, f"measured_{args.bank}.pt"))
        saved = remember(folder, flags, **{f"seconds_{args.bank}": seconds,
                                           **({} if trained else {"trained_on": args.bank})})
    if "diagnostics" not in saved:
        with torch.no_grad():
            saved = remember(folder, flags,
                             diagnostics=diagnose(folder, ckpt, resolve_device(args.device)))
    return json.load(open(path)), saved


def diagnose(folder, teacher_ckpt, device):
    """What the teacher offers the refiner: how far validation L_MSD / prod(a_t)^2 falls from the
    identity refiner's to the best kept step's (the squared distance of the chain's end to
    x0_guide, in noise units), and how far x_hat_T moves from x_T (mean |x_hat_T - x_T| over 250
    dev-bank noises; two independent Gaussian noises differ by 1.13). Cached in the refiner's
    study.json."""
    path = os.path.join(folder, "ckpt.pt")
    ckpt = load_checkpoint(path, "refiner")
    teacher, tckpt = load_teacher(teacher_ckpt, device)
    size, K = tckpt["data"]["image_size"], len(tckpt["data"]["classes"])
    x_T, y = noises.bank("dev", 250, K, (3, size, size))
    move = (refine_many(load_refiner(path, teacher, device), x_T, y) - x_T).abs().mean().item()
    scale = prod_a(ckpt["args"]["msd_steps"]) ** 2
    identity = ckpt.get("identity_val")
    return {"val_identity": identity / scale if identity is not None else None,
            "val_best": ckpt["best_val"] / scale, "move_mean_abs": move}


def fd_reference(name, folder, teacher_ckpt, bank, device):
    """FD_cls's 95% intervals on one table's samples (measured_<bank>.pt) with the real reference
    resampled and with it held fixed, each regime and refined minus each other regime: what
    resampling it adds."""
    from metrics import Measured, load_judge
    meta = load_checkpoint(teacher_ckpt, "teacher")["data"]
    judges = {}
    for side in ("fixed", "resampled"):
        judges[side] = load_judge(meta["dataset"], meta["data_dir"], meta["image_size"], device)
    judges["fixed"].real_boot = [judges["fixed"].real_stats]
    saved = torch.load(os.path.join(folder, f"measured_{bank}.pt"), weights_only=True)
    for side, judge in judges.items():
        m = {k: Measured(v["feats"], v["probs"], v["labels"]) for k, v in saved.items()}
        cells = [f"{k} [{lo:.2f}, {hi:.2f}]" for k, (lo, hi) in
                 ((k, judge.scores(v)["ci"]["fd_cls"]) for k, v in m.items())]
        cells += [f"refined - {k} [{d[1]:+.2f}, {d[2]:+.2f}]" for k, d in
                  ((k, judge.difference(m["refined"], v)["fd_cls"]) for k, v in m.items()
                   if k != "refined")]
        print(f"{name}, FD_cls 95% intervals, real reference {side}: {'; '.join(cells)}")


def summary(name, metrics, teacher_info, refiner_info):
    """One teacher's row: the regimes' scores, the gap closed, refined minus CFG, time."""
    r = {row["name"]: row for row in metrics["regimes"]}
    guidance = metrics["args"]["guidance"]
    ung, cfg, top, ref = r["unguided"], r[guidance], r.get(f"{guidance}_top"), r["refined"]
    diff = metrics["differences"][f"refined - {guidance}"]

    # None where CFG is not `least` better than unguided: no gap to close
    def closed(key, better, least):
        gap = cfg[key] - ung[key]
        return (ref[key] - ung[key]) / gap if gap * better > least else None
    # 1e-9: float32 accuracies
    reaches = diff["class_acc"][0] >= -0.01 - 1e-9 and diff["fd_cls"][0] <= 0
    return {"teacher": name, "flags": teacher_info.get("flags"), "w_cfg": cfg["w"],
            "w_top": top["w"] if top else None,
            "class_acc": {k: v["class_acc"] for k, v in (("unguided", ung), ("cfg", cfg),
                                                         ("cfg_top", top), ("refined", ref)) if v},
            "fd_cls": {k: v["fd_cls"] for k, v in (("unguided", ung), ("cfg", cfg),
                                                   ("cfg_top", top), ("refined", ref)) if v},
            "gap_closed_acc": closed("class_acc", +1, 0.01),
            "gap_closed_fd": closed("fd_cls", -1, 0.5),
            "refined_minus_cfg": diff, "reaches_cfg": reaches,
            "teacher_seconds": teacher_info.get("seconds"),
            "refiner_seconds": refiner_info.get(f"seconds_{refiner_info.get('trained_on')}"),
            "trained_on": refiner_info.get("trained_on"),
            "diagnostics": refiner_info.get("diagnostics")}


def interval(d, digits):
    return f"{d[0]:+.{digits}f} [{d[1]:+.{digits}f}, {d[2]:+.{digits}f}]"


HEADER = ["teacher", "unguided", "CFG", "CFG top", "refined", "gap closed (acc / FD)",
          "refined - CFG acc [95% CI]", "refined - CFG FD_cls [95% CI]", "reaches CFG",
          "val L_MSD/prod(a)^2", "mean abs(x_hat_T - x_T)", "minutes (teacher + job)"]


def cells(s):
    """One teacher's row of the table, formatted."""
    a, f, d = s["class_acc"], s["fd_cls"], s["diagnostics"] or {}
    top = f"{a['cfg_top']:.3f} / {f['cfg_top']:.2f}" if "cfg_top" in a else "-"
    minutes = [x / 60 for x in (s["teacher_seconds"], s["refiner_seconds"]) if x]
    val = (f"{d['val_identity']:.2e} -> {d['val_best']:.2e}" if d.get("val_identity") else
           f"-> {d['val_best']:.2e}" if d else "-")
    return [s["teacher"], f"{a['unguided']:.3f} / {f['unguided']:.2f}",
            f"{a['cfg']:.3f} / {f['cfg']:.2f}", top, f"{a['refined']:.3f} / {f['refined']:.2f}",
            " / ".join("-" if g is None else f"{g:.0%}"
                       for g in (s["gap_closed_acc"], s["gap_closed_fd"])),
            interval(s["refined_minus_cfg"]["class_acc"], 3),
            interval(s["refined_minus_cfg"]["fd_cls"], 2),
            "yes" if s["reaches_cfg"] else "no", val, f"{d['move_mean_abs']:.3f}" if d else "-",
            " + ".join(f"{m:.0f}" for m in minutes)]


def verdict(rows):
    """The study in one sentence: on how many teachers refined noise reaches CFG, the mean and the
    worst."""
    diffs = [s["refined_minus_cfg"]["class_acc"][0] for s in rows]
    worst = min(rows, key=lambda s: s["refined_minus_cfg"]["class_acc"][0])
    return (f"refined noise reaches CFG on {sum(s['reaches_cfg'] for s in rows)} of {len(rows)} "
            f"teachers; refined - CFG accuracy: mean {sum(diffs) / len(diffs):+.3f}, "
            f"worst {worst['teacher']} {min(diffs):+.3f}")


def report(rows, args, path):
    """Print the table and its verdict, and write both as markdown to path (for
    docs/teachers.md)."""
    title = (f"study: recipe {args.recipe} {RECIPES[args.recipe]}, {args.bank} bank; "
             "acc / FD_cls per regime, CFG at the middle and the top of the pairs' w range")
    table = [cells(s) for s in rows]
    print("\n" + title)
    print_table(HEADER, table)
    print(verdict(rows))
    lines = [f"| {' | '.join(row)} |" for row in [HEADER, ["---"] * len(HEADER), *table]]
    write_atomic(path, lambda f: f.write("\n".join([title, "", *lines, "", verdict(rows), ""])),
                 mode="w")


@entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)  # not locked: each child locks the folder it writes,
    # so two studies on other teachers can share --out
    start, rows = time.perf_counter(), []
    for name in args.teachers:
        ckpt, teacher_info = get_teacher(name, args)
        metrics, refiner_info = get_metrics(name, ckpt, args)
        rows.append(summary(name, metrics, teacher_info, refiner_info))
        if args.fd_reference:
            fd_reference(name, os.path.join(args.out, name, refiner_folder(args)), ckpt, args.bank,
                         resolve_device(args.device))
    path = os.path.join(args.out, f"study_{args.recipe}_{args.bank}")
    report(rows, args, path + ".md")
    save_json({"rows": rows, "recipe": args.recipe, "recipe_flags": RECIPES[args.recipe],
               "bank": args.bank, "seconds": time.perf_counter() - start}, path + ".json")
    print(f"wrote {path}.json and .md; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

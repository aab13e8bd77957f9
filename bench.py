"""Measured speed and memory: sampling regimes, the MSD loss against full backprop, teacher
training.

    python bench.py                      # CPU: the tiny presets, every part (8 minutes on 2 cores)
    python bench.py --quick              # the same tables, fewer rows (about 2 minutes on 2 cores)
    python bench.py --device cuda --models dit-cifar unet-cifar --json bench.json

Networks have random weights: timing needs no data set and no training. Configurations take turns
over --repeats rounds after a warm-up; each ratio is the ratio of the fastest rounds, printed with
the range of the per-round ratios (timing.py). On a CPU the timing runs on one thread (--threads)
with glibc's allocator held steady; peak memory is what the work itself adds. Why each choice, and
what it changed when it was measured: docs/speed.md. Forwards per image are counted by a hook on
the networks, not assumed.

The paper's promises measured here: NoiseRefine samples with N + 1 forwards instead of CFG's 2N
(speed-up limit 2N / (N + 1)); L_MSD needs no backward through the N teacher calls (on paper
(2N + 3) / (N + 3) forward-equivalents less work than full backprop, and memory for one network
instead of N + 1).
"""
import argparse
import ctypes
import ctypes.util
import json
import os
import statistics
import subprocess
import sys

import torch

import noises
import accel
from accel import autocast, to_channels_last
import cli
from cli import die, entry_point, print_table, resolve_device
from checkpoint import save_json
from models import PRESET_NAMES, build_model, model_config
from diffusion import DISPLAY_W, sample, training_loss
from metrics import ForwardCounter
from timing import interleaved_seconds, ratio, ratio_text
from noiserefine import Refiner, full_loss, msd_loss

REGIMES = ("unguided", "cfg", "refined")
PARTS = ("sampling", "msd", "teacher")
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
                    "4090": 165.0}


def build_parser():
    p = cli.Parser(__doc__)
    p.add_argument("--quick", action="store_true",
                   help="fewer rows, same layout and rounds (about 2 minutes on 2 cores)")
    p.add_argument("--models", nargs="+", default=None, choices=PRESET_NAMES,
                   help="presets for sampling and MSD (default: the tiny ones)")
    p.add_argument("--steps", type=cli.STEPS_1000, nargs="+", default=None,
                   help="DDIM steps (default: 10 20 50)")
    p.add_argument("--batch-size", type=cli.integer(1, 65536), default=None,
                   help="sampling and MSD batch (default: CPU 64, CUDA 256)")
    p.add_argument("--msd-steps", type=cli.STEPS_1000, nargs="+", default=None,
                   help="N of the MSD part (default: 5 10 20)")
    p.add_argument("--msd-batch", type=cli.integer(1, 65536), default=None,
                   help="refiner training batch (default: CPU 32, CUDA 64)")
    p.add_argument("--teacher-models", nargs="+", default=None, choices=PRESET_NAMES,
                   help="presets of the teacher part (default: all)")
    p.add_argument("--teacher-batch", type=cli.integer(1, 65536), default=None,
                   help="teacher training batch (default: CPU 16, CUDA 128)")
    p.add_argument("--repeats", type=cli.integer(1, 1000), default=5,
                   help="interleaved timed rounds per table")
    p.add_argument("--threads", type=cli.integer(0, 4096), default=None,
                   help="torch's CPU threads (default: 1 on a CPU, so that other work on the "
                   "machine cannot move a ratio; 0: torch's own default, all cores; on CUDA the "
                   "default is torch's)")
    # sampling and MSD rows; the teacher rows time fp32 and bf16 side by side
    accel.add_flags(p, amp=True)
    p.add_argument("--compile", action="store_true",
                   help="also time bf16 teacher training with torch.compile")
    p.add_argument("--channels-last", action="store_true",
                   help="also time bf16 UNet teacher training in channels-last "
                   "(and with --compile, both)")
    p.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS,
                   help="which tables to measure")
    p.add_argument("--load-check", action="store_true",
                   help="only the refined/CFG sampling ratio of the first --models and --steps, "
                   "quiet and beside a CPU-burning process (about a minute on 2 cores)")
    p.add_argument("--json", type=cli.file_path, default=None, help="write the tables here")
    p.add_argument("--seed", type=cli.SEED, default=0, help="seeds the random networks and inputs")
    p.add_argument("--device", type=cli.device, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    # one isolated CPU row (internal)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    cuda = resolve_device(args.device).startswith("cuda")
    args.models = args.models or ["unet-tiny", "dit-tiny"]
    args.steps = args.steps or ([20] if args.quick else [10, 20, 50])
    args.batch_size = args.batch_size or (256 if cuda else 64)
    args.msd_steps = args.msd_steps or ([5, 10] if args.quick else [5, 10, 20])
    args.msd_batch = args.msd_batch or (64 if cuda else 32)
    args.teacher_models = args.teacher_models or (["unet-tiny", "dit-tiny"] if args.quick
                                                  else PRESET_NAMES)
    args.teacher_batch = args.teacher_batch or (128 if cuda else 16)
    args.threads = (0 if cuda else 1) if args.threads is None else args.threads
    return args


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


def proc_status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return None


class PeakMemory:
    """Peak memory of the work between start() and stop(), in MB (see the module docstring)."""

    def __init__(self, device):
        self.cuda = device.startswith("cuda")

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = proc_status_kb("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
            except OSError:
                self.base = None  # no /proc (not Linux): memory is reported as not measured

    def stop(self):
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        return None if self.base is None else (proc_status_kb("VmHWM") - self.base) / 1024


def peak_memory_mb(fn, device):
    """Peak memory of one call of fn, after a warm-up call (one-time set-up and optimiser state
    excluded)."""
    fn()
    memory = PeakMemory(device)
    memory.start()
    fn()
    return memory.stop()


# --load-check: a busy machine may move the refined/CFG ratio by at most this share
LOAD_TOLERANCE = 0.15


def random_teacher(name, device, seed):
    torch.manual_seed(seed)
    return build_model(model_config(name, 10)).to(device).eval().requires_grad_(False)


def inputs(model, batch, device, seed):
    gen = noises.generator("bench", seed)
    size = model.config.image_size
    return (torch.randn(batch, 3, size, size, generator=gen).to(device),
            torch.randint(10, (batch,), generator=gen).to(device))


# ----------------------------------------------------------------------------------------------
# The three parts
# ----------------------------------------------------------------------------------------------


def sampling_runs(model, steps, batch, device, seed=0, regimes=REGIMES, amp="none"):
    """{regime: (run, networks)}: Gaussian unguided (w = 0), Gaussian + CFG (DISPLAY_W, cond and
    uncond in one batched forward), refined unguided (x_hat_T = g_phi(x_T, c), one forward, then
    w = 0), and unguided at twice the batch: CFG's forward size, to measure what a doubled batch
    costs on this device."""
    teacher = random_teacher(model, device, seed)
    x_T, y = inputs(teacher, batch, device, seed)
    runs = {}
    for regime in regimes:
        refiner = Refiner(teacher, 0).merge().to(device).eval().requires_grad_(False) \
            if regime == "refined" else None
        w = DISPLAY_W if regime == "cfg" else 0.0
        x, c = (torch.cat([x_T, x_T]), torch.cat([y, y])) if regime == "unguided_2b" else (x_T, y)

        @torch.no_grad()
        def run(refiner=refiner, w=w, x=x, c=c):
            with autocast(device, amp):
                return sample(teacher, refiner(x, c) if refiner is not None else x, c, steps, w)
        runs[regime] = (run, [teacher] + ([refiner] if refiner is not None else []))
    return runs


def bench_sampling(model, steps, batch, device, repeats, seed=0, amp="none"):
    """Rows per regime, and the refined/CFG ratio with what explains it: the forward-count limit
    2N/(N+1), times the measured premium of a doubled batch, t(2B) / (2 t(B)), which CFG pays and
    NoiseRefine does not (CFG runs N forwards at 2B, refined N + 1 at B)."""
    runs = sampling_runs(model, steps, batch, device, seed, REGIMES + ("unguided_2b",), amp)
    nfe = {}
    for regime, (run, networks) in runs.items():  # forwards per image, counted by a hook
        counter = ForwardCounter(*networks)
        run()
        nfe[regime] = counter.images / batch
        counter.remove()
    seconds = interleaved_seconds({r: run for r, (run, _) in runs.items()}, device, repeats,
                                  f"{model} {steps} steps ")
    rows = [{"model": model, "steps": steps, "regime": r, "batch": batch, "amp": amp,
             "img_per_s": batch / statistics.median(seconds[r]),
             "img_per_s_range": [batch / max(seconds[r]), batch / min(seconds[r])],
             "sec_per_image": statistics.median(seconds[r]) / batch, "nfe_per_image": nfe[r],
             "peak_mem_mb": measure_memory("sampling", dict(model=model, steps=steps, batch=batch,
                                                            regime=r, seed=seed, amp=amp), device)}
            for r in REGIMES]
    premium = ratio(seconds["unguided_2b"], [2 * s for s in seconds["unguided"]])
    limit = 2 * steps / (steps + 1)
    rows[-1].update({"refined_over_cfg": ratio(seconds["cfg"], seconds["refined"]), "limit": limit,
                     "batch_premium": premium, "limit_times_premium": limit * premium["best"]})
    return rows


def load_check(model, steps, batch, device, repeats, seed=0):
    """The refined/CFG sampling ratio on this machine as it is, then beside a process that burns one
    CPU core, with both statistics (ratio of the fastest rounds, median of per-round ratios)."""
    runs = sampling_runs(model, steps, batch, device, seed, ("cfg", "refined"))
    fns = {r: run for r, (run, _) in runs.items()}
    quiet = interleaved_seconds(fns, device, repeats, "quiet ")
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = interleaved_seconds(fns, device, repeats, "busy ")
    finally:
        burner.kill()
        burner.wait()
    result = {"quiet": ratio(quiet["cfg"], quiet["refined"]),
              "busy": ratio(busy["cfg"], busy["refined"]),
              "model": model, "steps": steps, "batch": batch, "repeats": repeats,
              "tolerance": LOAD_TOLERANCE}
    for stat in ("best", "median"):
        result[f"change_{stat}"] = result["busy"][stat] / result["quiet"][stat] - 1
    return result


def print_load_check(r):
    print(f"\n== refined/CFG sampling ({r['model']}, {r['steps']} steps, batch {r['batch']}, "
          f"{r['repeats']} rounds), quiet and beside a process burning one core")
    cells = [[name, f"{r[name]['best']:.2f}x",
              f"{r[name]['median']:.2f}x [{r[name]['min']:.2f}-{r[name]['max']:.2f}]"]
             for name in ("quiet", "busy")]
    cells.append(["change", f"{100 * r['change_best']:+.1f}%", f"{100 * r['change_median']:+.1f}%"])
    print_table(["machine", "fastest rounds", "per-round median [min-max]"], cells)
    if abs(r["change_best"]) > r["tolerance"]:
        print(f"warning: the load moved the ratio of the fastest rounds by more than "
              f"{100 * r['tolerance']:.0f}%", file=sys.stderr)


def msd_steps_fns(model, N, batch, device, seed=0, losses=("msd", "full"), amp="none"):
    """{loss: one refiner training step}: forward, L_MSD or L_Denoise over N teacher steps,
    backward, AdamW."""
    teacher = random_teacher(model, device, seed)
    x_T, y = inputs(teacher, batch, device, seed)
    x0_guide = torch.randn_like(x_T)
    fns = {}
    for loss in losses:
        refiner = Refiner(teacher, 0).to(device).train()  # the default: the whole copy is trained
        opt = torch.optim.AdamW(refiner.parameters(), lr=1e-4)
        loss_fn = msd_loss if loss == "msd" else full_loss

        def step(refiner=refiner, opt=opt, loss_fn=loss_fn):
            with autocast(device, amp):
                value = loss_fn(teacher, refiner(x_T, y), y, x0_guide, N)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
        fns[loss] = step
    return fns


def bench_msd(model, N, batch, device, repeats, seed=0, amp="none"):
    rows = {loss: {"model": model, "N": N, "loss": loss, "batch": batch, "amp": amp}
            for loss in ("msd", "full")}
    try:
        seconds = interleaved_seconds(msd_steps_fns(model, N, batch, device, seed, amp=amp),
                                      device, repeats, f"{model} N={N} ")
        rows["full"]["full_over_msd"] = ratio(seconds["full"], seconds["msd"])
    except torch.OutOfMemoryError:  # full backprop keeps N + 1 networks' activations
        seconds = {"msd": interleaved_seconds(msd_steps_fns(model, N, batch, device, seed,
                                                            ["msd"], amp), device, repeats)["msd"],
                   "full": None}
    for loss, row in rows.items():
        row["sec_per_step"] = statistics.median(seconds[loss]) if seconds[loss] else None
        row["sec_per_step_range"] = ([min(seconds[loss]), max(seconds[loss])] if seconds[loss]
                                     else None)
        row["oom"] = seconds[loss] is None
        row["peak_mem_mb"] = None if row["oom"] else \
            measure_memory("msd", dict(model=model, N=N, batch=batch, loss=loss, seed=seed,
                                       amp=amp), device)
    return list(rows.values())


def memory_of(part, kwargs, device):
    """Peak memory of one configuration, measured where it runs alone (see measure_memory)."""
    if part == "sampling":
        run, _ = sampling_runs(device=device, **{k: v for k, v in kwargs.items() if k != "regime"},
                               regimes=[kwargs["regime"]])[kwargs["regime"]]
        return peak_memory_mb(run, device)
    kw = {k: v for k, v in kwargs.items() if k != "loss"}
    return peak_memory_mb(
        msd_steps_fns(device=device, **kw, losses=[kwargs["loss"]])[kwargs["loss"]], device)


def measure_memory(part, kwargs, device):
    """CUDA: in this process. CPU: in a child process of its own, with glibc told to hand every
    freed block over 128 KB back to the OS (MALLOC_MMAP_THRESHOLD_), so that its RSS follows the
    live tensors rather than what the allocator kept from earlier calls. (Timing stays in this
    process, without it.)"""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        return memory_of(part, kwargs, device)
    spec = json.dumps({"part": part, "kwargs": kwargs})
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec,
                             "--device", device, "--threads", str(torch.get_num_threads())],
                            capture_output=True, text=True,
                            env=dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD)))
    if result.returncode != 0:
        die(f"bench.py: measuring the memory of {part} {kwargs} failed: "
            f"{result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def forward_flops(model, batch, device):
    """FLOPs of one forward over the batch, counted by torch.utils.flop_counter (matmuls and
    convs)."""
    from torch.utils.flop_counter import FlopCounterMode
    x, y = inputs(model, batch, device, 0)
    t = torch.full((batch,), 500, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    return counter.get_total_flops()


def bench_teacher(model, dtype, batch, device, repeats, seed=0, compile=False,
                  channels_last=False):
    """Images per second of a teacher training step: forward, eps loss, backward, AdamW (timing
    only)."""
    torch.manual_seed(seed)
    net = build_model(model_config(model, 10)).to(device).train()
    cuda = device.startswith("cuda")
    if channels_last:
        net = to_channels_last(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=cuda)
    x0, y = inputs(net, batch, device, seed)
    if channels_last:
        x0 = to_channels_last(x0)
    gen = torch.Generator(device=device).manual_seed(seed)
    fwd = torch.compile(net) if compile else net

    # a GPU step takes milliseconds: time ten per round, launches included
    per_round = 10 if cuda else 1

    def steps():
        for _ in range(per_round):
            with autocast(device, "bf16" if dtype == "bf16" else "none"):
                loss = training_loss(fwd, x0, y, 10, 0.1, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    timed = interleaved_seconds({"steps": steps}, device, repeats, f"{model} {dtype} ")["steps"]
    rounds = [t / per_round for t in timed]
    seconds = statistics.median(rounds)
    # backward ~ 2x forward; the optimiser is negligible
    flops = 3 * forward_flops(net.eval(), batch, device)
    row = {"model": model, "dtype": (dtype + (" +compile" if compile else "")
                                     + (" +channels-last" if channels_last else "")),
           "batch": batch, "img_per_s": batch / seconds,
           "img_per_s_range": [batch / max(rounds), batch / min(rounds)],
           "tflops": flops / seconds / 1e12}
    peak = gpu_peak_tflops(device)
    row["share_of_bf16_peak"] = row["tflops"] / peak if peak else None
    return row


def teacher_rows(model, args, device):
    """The configurations of one model's teacher rows: fp32, and on CUDA bf16, then each speed
    option asked for on top of bf16 (channels-last only for the UNet, whose convolutions it is
    for). CUDA's "fp32" runs its matmuls in TF32, as every script here does on CUDA
    (cli.resolve_device)."""
    base = dict(model=model, batch=args.teacher_batch, device=device, repeats=args.repeats,
                seed=args.seed)
    rows = [dict(base, dtype="fp32")]
    if device.startswith("cuda"):
        rows.append(dict(base, dtype="bf16"))
        cl = args.channels_last and model.startswith("unet")
        if cl:
            rows.append(dict(base, dtype="bf16", channels_last=True))
        # one compiled row, with everything else on (a compile costs a minute of set-up)
        if args.compile:
            rows.append(dict(base, dtype="bf16", compile=True, channels_last=cl))
    return rows


def gpu_peak_tflops(device):
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
# timing: keep and reuse the heap
STEADY = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 256 << 20}
# memory children: every block over 128 KB returns to the OS, so RSS follows tensors
MMAP_THRESHOLD = 128 * 1024


def steady_allocator():
    """Fix glibc's mmap and trim thresholds (see the module docstring); False where there is no
    glibc (macOS, Windows, musl), and timing goes on with the allocator as it is."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return all(libc.mallopt(param, value) == 1 for param, value in STEADY.items())
    except (OSError, AttributeError):
        return False


def header(device):
    name = (torch.cuda.get_device_name(device) if device.startswith("cuda")
            else f"CPU ({os.cpu_count()} cores)")
    return {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "steady_allocator": steady_allocator()}


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def memory_ratio(rows, r, **match):
    """r's peak memory over that of the row measured beside it (same model and step count) that
    differs in `match`; None where either was not measured."""
    other = next(o for o in rows if all(o[k] == v for k, v in match.items())
                 and all(o[k] == r[k] for k in ("model", "steps", "N") if k in r))
    return (r["peak_mem_mb"] / other["peak_mem_mb"]
            if r["peak_mem_mb"] and other["peak_mem_mb"] else None)


def print_sampling(rows):
    print(f"\n== sampling: Gaussian unguided, Gaussian + CFG (w = {DISPLAY_W:g}), "
          "refined unguided; img/s: median [min-max] of the rounds")
    cells = []
    for r in rows:
        lo, hi = r["img_per_s_range"]
        cells.append([r["model"], r["steps"], r["regime"], r["batch"],
                      f"{r['img_per_s']:.1f} [{lo:.1f}-{hi:.1f}]", f"{r['nfe_per_image']:.1f}",
                      fmt(r["peak_mem_mb"], ".1f")])
    print_table(["model", "steps", "regime", "batch", "img/s [min-max]", "NFE/img", "peak MB"],
                cells)
    print("refined/CFG images per second (ratio of the fastest rounds [min-max of per-round "
          "ratios]) beside the forward-count limit 2N/(N+1), the measured premium of CFG's "
          "doubled batch, t(2B) / (2 t(B)), and their product:")
    cells = []
    for r in rows:
        if r["regime"] == "refined":
            mem = memory_ratio(rows, r, regime="cfg")
            cells.append([r["model"], r["steps"], ratio_text(r["refined_over_cfg"]),
                          f"{r['limit']:.3f}x", ratio_text(r["batch_premium"]),
                          f"{r['limit_times_premium']:.2f}x", fmt(mem, ".2f") + "x"])
    print_table(["model", "steps", "refined/cfg", "limit 2N/(N+1)", "batch premium",
                 "limit x premium", "memory refined/cfg"], cells)


def print_msd(rows):
    print("\n== refiner training step: L_MSD (stop-gradient) vs full backprop "
          "through N teacher calls")
    cells = []
    for r in rows:
        extra = ["", "", ""]
        if r["loss"] == "full":
            mem = memory_ratio(rows, r, loss="msd")
            if r.get("oom"):
                extra = ["out of memory", "", ""]
            else:
                extra = [ratio_text(r["full_over_msd"]), f"{(2 * r['N'] + 3) / (r['N'] + 3):.2f}x",
                         fmt(mem, ".1f") + "x"]
        cells.append([r["model"], r["N"], r["loss"], r["batch"], fmt(r["sec_per_step"], ".3f"),
                      fmt(r["peak_mem_mb"], ".1f"), *extra])
    print_table(["model", "N", "loss", "batch", "s/step", "peak MB", "full/msd time [min-max]",
                 "(2N+3)/(N+3)", "full/msd memory"], cells)


def print_teacher(rows):
    print("\n== teacher training step (forward, eps loss, backward, AdamW); TFLOP/s from a "
          "FlopCounterMode count of the forward x 3")
    cells = []
    for r in rows:
        lo, hi = r["img_per_s_range"]
        share = None if r["share_of_bf16_peak"] is None else 100 * r["share_of_bf16_peak"]
        cells.append([r["model"], r["dtype"], r["batch"],
                      f"{r['img_per_s']:.1f} [{lo:.1f}-{hi:.1f}]", f"{r['tflops']:.4f}",
                      fmt(share, ".1f") + ("%" if share is not None else "")])
    print_table(["model", "dtype", "batch", "img/s [min-max]", "TFLOP/s", "of bf16 peak"], cells)


@entry_point
def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    # one configuration's memory, measured in a process of its own (see measure_memory)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(memory_of(spec["part"], spec["kwargs"], device)))
        return
    head = header(device)
    if args.load_check:
        result = load_check(args.models[0], args.steps[0], args.batch_size, device, args.repeats,
                            args.seed)
        print_load_check(result)
        if args.json:
            save_json({**head, "load_check": result}, args.json)
        return
    mem_note = ("torch.cuda.max_memory_allocated minus allocated before the call"
                if device.startswith("cuda")
                else "peak RSS minus RSS before the call, each row in its own subprocess")
    print(f"bench.py on {head['device']}, torch {head['torch']}, {head['threads']} threads"
          f"{', glibc heap held steady' if head['steady_allocator'] else ''}; {args.repeats} timed "
          f"rounds after a warm-up, configurations interleaved (times: median [min-max]; ratios: "
          f"of the fastest rounds [min-max of per-round ratios]); peak memory of one call "
          f"after a warm-up call: {mem_note}; sampling and MSD rows with --amp {args.amp}")
    rows, msd, teacher = [], [], []

    def save():  # after every part, so a run cut short keeps what it measured
        if args.json:
            save_json({**head, "memory": mem_note, "sampling": rows, "msd": msd,
                       "teacher": teacher}, args.json)
    if "sampling" in args.parts:
        rows = [row for m in args.models for s in args.steps
                for row in bench_sampling(m, s, args.batch_size, device, args.repeats, args.seed,
                                          args.amp)]
        print_sampling(rows)
        save()
    if "msd" in args.parts:
        msd = [row for m in args.models for n in args.msd_steps
               for row in bench_msd(m, n, args.msd_batch, device, args.repeats, args.seed,
                                    args.amp)]
        print_msd(msd)
        save()
    if "teacher" in args.parts:
        for m in args.teacher_models:
            for kw in teacher_rows(m, args, device):
                teacher.append(bench_teacher(**kw))
                save()
        print_teacher(teacher)
    if args.json:
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

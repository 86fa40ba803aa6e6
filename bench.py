"""What the code costs: throughput, FLOP efficiency, grouped-vs-loop ratios, wall times, peak
memory.

Measured side by side in one run on this device (nothing is asserted; tests never time anything).
Every timing is the MEDIAN of several calls after warm-up, with its spread (min - max); the
ceiling, the device's dense fp32 matmul rate, is measured the same way.
    - training step (images/s) of the `cpu` and `paper` model sizes, channels-last, with train.py's
      optimiser (torch.optim.Adam, default for-each update) and with the fused Adam, side by side;
      model FLOPs per image (torch.utils.flop_counter, forward + backward) and the achieved FLOP/s
      as a fraction of the ceiling;
    - trajectory extraction (images/s at 11 time points);
    - grouped programs against their loop form AT EQUAL WORK, at the `cpu` and `paper` probe
      protocol sizes: the per-t MLPs, GRU and Transformer probes with every learning rate x seed as
      groups of one model (loop: each probe alone by train_probe, the same epoch), and MINE with
      every pair x seed as groups (loop: one pair and seed at a time);
    - peak host memory of the `paper` probe protocol on 45k x 11 x 128 codes (its data and largest
    step);
    - with --run RUN: the wall time of probe.py and analyze.py (`cpu` protocol, cached codes).

    python bench.py                           # CPU here; prints a table, writes results/bench.json
    python bench.py --run runs/shapes-drl          # adds the wall times of probe.py and analyze.py
    python bench.py --device cuda --fast      # adds bf16 autocast, channels-last, compile rows

Peak memory: CUDA max allocated, or on CPU the growth of the peak resident set of a fresh process.
"""
import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import analyze
import probe
import train
import trajrep as tr

# The model sizes and batch sizes of train.py's presets, at 32x32 (CIFAR / shapes).
SIZES = {size: train.model_kwargs({**train.DEFAULTS, **preset, **train.DATASETS["cifar10"]})
         for size, preset in train.PRESETS.items()}
BATCH = {size: preset["batch_size"] for size, preset in train.PRESETS.items()}
CODE = {size: SIZES[size]["code_dim"] for size in SIZES}


def sync(device):
    """Waits for the device's queued work (CUDA runs asynchronously: a timer must not stop
    early)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup=2, repeat=7):
    """Seconds per call of fn after warm-up: (median, min, max) over `repeat` calls. The median,
    not the mean: one call slowed by the machine's other work does not move it."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def matmul_flops(device, n=2048):
    """The practical ceiling: dense fp32 n x n matmul FLOP/s, median (min, max) of several calls."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    med, lo, hi = timed(lambda: a @ b, device, warmup=2, repeat=9)
    return dict(median=2 * n ** 3 / med, low=2 * n ** 3 / hi, high=2 * n ** 3 / lo)


def count_flops(fn):
    """FLOPs of one call of fn, counted by torch's FlopCounterMode (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def rate(work, t):
    """(median, min, max) seconds -> work per second: dict(median, low, high)."""
    return dict(median=work / t[0], low=work / t[2], high=work / t[1])


# ---- the benchmarks: each returns a dict of its numbers ----

def bench_train(device, size, variant):
    """variant: 'foreach' (torch.optim.Adam's default update, as train.py), 'fused' (fused Adam) or
    'fast' (fused + torch.compile + bf16 autocast, CUDA). Channels-last, as train.py."""
    torch.manual_seed(0)
    # Random images stand in for data: the step's cost does not depend on the pixels.
    model = tr.DRLModel(**SIZES[size]).to(device).to(memory_format=torch.channels_last)
    B = BATCH[size]
    x0 = torch.randn(B, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    fast = variant == "fast"
    step_model = torch.compile(model) if fast else model
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, fused=variant != "foreach")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=fast and device.type == "cuda")
    code_dim = SIZES[size]["code_dim"]

    def step(m=step_model):  # one training step, as train.py's loop
        t, noise, code_noise = tr.sample_training_noise(B, (3, 32, 32), code_dim, device=device)
        with autocast:
            loss = m(x0, t, noise, code_noise)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()

    # FLOPs of forward + backward per image, counted on the eager model (a compiled one hides its
    # kernels from the counter).
    flops = count_flops(lambda: step(model)) / B
    t = timed(step, device, warmup=3 if fast else 2, repeat=9)
    return dict(images_per_s=rate(B, t), flops_per_image=flops, params=tr.count_parameters(model))


def bench_extract(device, size):
    """Trajectory extraction: 256 images at the paper's 11 times, the encoder of one model size."""
    torch.manual_seed(0)
    enc = tr.DRLModel(**SIZES[size]).encoder.to(device).eval().to(memory_format=torch.channels_last)
    x = torch.randn(256, 3, 32, 32, device=device)
    times = tr.paper_times(11)
    flops = count_flops(lambda: tr.extract_trajectories(enc, x[:23], times, 256)) / 23
    t = timed(lambda: tr.extract_trajectories(enc, x, times, 256), device, warmup=1, repeat=5)
    return dict(images_per_s=rate(len(x), t), flops_per_image=flops)


GPU_MAX_GROUPS = probe.MAX_GROUPS["other"]
# Probe protocol sizes: (code size, width of GRU / Transformer, learning rates, seeds); 11 times, 10
# classes.
PROTOCOLS = {name: dict(d=CODE[name], width=p["width"], lrs=len(p["lrs"]), seeds=p["seeds"])
             for name, p in probe.PRESETS.items()}


def bench_probe(device, protocol, kind, batch=256, T=11, K=10):
    """One epoch of the grouped probes (every lr x seed: train_probe_groups, as probe.py) against
    each probe trained alone (train_probe), on the same codes: 20 batches at the `cpu` size, 3 at
    the `paper` size (minutes on a CPU). Both evaluate on one small batch after the epoch."""
    steps, repeat = (20, 3) if protocol == "cpu" else (3, 1)
    p = PROTOCOLS[protocol]
    G = p["lrs"] * p["seeds"]
    x = torch.randn(1, steps * batch, T, p["d"], device=device)  # (1, N, T, D): one input
    y = torch.randint(K, (steps * batch,), device=device)
    held = (x[:, :64], y[:64])  # validation = test: a small batch, the same for both forms
    probes = [tr.build_probe(kind, T, p["d"], K, p["width"]).to(device) for _ in range(G)]
    clip = None if kind == "mlp" else 1.0

    # Both forms start from the same G probes and do the same work: one epoch of `steps` batches,
    # one evaluation. The grouped form builds its model inside the timing, as probe.py does.
    def grouped():
        model = tr.group_probes(probes).to(device)
        tr.train_probe_groups(model, (x, y), held, held, [0] * G, [1e-3] * G, [0] * G, epochs=1,
                              batch_size=batch, clip=clip)

    def loop():  # each probe alone, one after another: the plain form
        for ref in probes:
            tr.train_probe(ref, (x[0], y), (x[0, :64], y[:64]), (x[0, :64], y[:64]), 1e-3, epochs=1,
                           batch_size=batch, clip=clip)
    grouped_s = timed(grouped, device, warmup=1, repeat=repeat)
    loop_s = timed(loop, device, warmup=1, repeat=repeat)
    return dict(groups=G, steps=steps, grouped_s=grouped_s, loop_s=loop_s,
                speedup=loop_s[0] / grouped_s[0])


def bench_mine(device, protocol, T=11):
    """All T*T pairs x seeds as groups of one MINE against one pair and seed at a time, same steps
    (20 at the `cpu` size, 4 at the `paper` size)."""
    steps = 20 if protocol == "cpu" else 4
    hidden, seeds = analyze.PRESETS[protocol]["hidden"], analyze.PRESETS[protocol]["seeds"]
    codes = torch.randn(3000, T, CODE[protocol], device=device)
    pairs = torch.cartesian_prod(torch.arange(T), torch.arange(T))
    # One evaluation shuffle and a small held-out part: the timing is of training, mostly.
    kw = dict(steps=steps, hidden=hidden, eval_shuffles=1, holdout=0.1)
    grouped_s = timed(lambda: tr.mine_pairs(codes, codes, pairs, seeds=tuple(range(seeds)), **kw),
                      device, warmup=1, repeat=3 if protocol == "cpu" else 1)
    # The plain one-pair MINE, once per pair and seed (no warm-up: it is minutes at the paper size).
    loop_s = timed(lambda: [tr.mine(codes[:, i], codes[:, j], seed=s, **kw) for s in range(seeds)
                            for i, j in pairs.tolist()], device, warmup=0, repeat=1)
    return dict(groups=len(pairs) * seeds, steps=steps, grouped_s=grouped_s, loop_s=loop_s,
                speedup=loop_s[0] / grouped_s[0])


def bench_paper_memory(device, kind, n=45000, n_test=10000, T=11, D=128, K=10):
    """Peak memory of the `paper` probe protocol (6 lrs x 5 seeds x V inputs, trained as grouped
    models of probe.py's chunk size off the CPU) on V x n x T x D codes: what run_probe_protocol
    holds (the codes, their standardised train / val / test copies) plus its largest transient, one
    training step on a (30, 256, T, D) batch and one evaluation chunk of 1024 rows. The peak does
    not grow with further steps and chunks; the full epoch, hours on a CPU, is not run."""
    p = probe.PRESETS["paper"]
    V = 2 if kind == "mlp" else 4  # as probe.py: trained + random-init codes (+ constant curves)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(V, n, T, D, generator=gen).to(device)
    x_te = torch.randn(V, n_test, T, D, generator=gen).to(device)
    y = torch.randint(K, (n,), generator=gen).to(device)
    # What run_probe_protocol holds: the standardised train / val / test copies, (V, N, T, D) each.
    tr_idx, va_idx = tr.split_train_val(n)
    mean, std = tr.standardiser_stats(x[:, tr_idx])
    x_tr, x_va, x_te = [((c - mean) / std) for c in (x[:, tr_idx], x[:, va_idx], x_te)]
    G = GPU_MAX_GROUPS  # probe.py trains the V * 30 groups in chunks of this many off the CPU
    model = tr.group_probes([tr.build_probe(kind, T, D, K, p["width"]) for _ in range(G)])
    model = model.to(device)
    t0 = time.perf_counter()
    inputs = (torch.arange(G) % V).tolist()  # which codes each group reads
    held = (x_te[:, :1024], torch.zeros(1024, dtype=torch.long, device=device))
    # One step (one batch of 256 of the whole codes in memory) and one evaluation: the largest step.
    tr.train_probe_groups(model, (x_tr[:, :256], y[tr_idx][:256]), held, held, inputs, [1e-3] * G,
                          [0] * G, epochs=1, batch_size=256, clip=None if kind == "mlp" else 1.0)
    return dict(seconds=time.perf_counter() - t0, groups=G)


# ---- each benchmark in a fresh process, so that its peak memory is its own ----

def child(name, args, device_name, queue):
    """Runs one benchmark in a fresh process, so that its peak memory is its own."""
    device = torch.device(device_name)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = globals()[name](device, *args)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
    out["peak_memory_mb"] = peak / 2 ** 20
    queue.put(out)


def in_child(name, device, *args):
    """Runs the benchmark function `name` in a fresh spawned process and returns its result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=child, args=(name, args, str(device), queue))
    p.start()
    out = queue.get()
    p.join()
    return out


def script_wall_time(script, run):
    """Wall seconds of one script on a run (its codes already cached by an earlier probe.py)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, script, run], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def parse_args():
    """The command line: where to measure, what to add to the default rows, where to write."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--fast", action="store_true",
                   help="also measure bf16 autocast + channels-last + torch.compile")
    p.add_argument("--run",
                   help="also time probe.py and analyze.py on this run folder (cpu protocol)")
    p.add_argument("--no-memory", action="store_true", help="skip the paper-protocol memory rows")
    p.add_argument("--out", default="results/bench.json",
                   help="where to write the JSON (folder created)")
    return p.parse_args()


class Table:
    """The rows bench.py prints as it goes and again as one table at the end: what, median,
    spread, work, peak memory. Throughput rows also get their fraction of the matmul ceiling."""

    def __init__(self, ceiling):
        self.ceiling, self.rows = ceiling, []

    def add(self, *row):
        self.rows.append(row)
        print(*row, flush=True)

    def throughput(self, label, r):
        """A training or extraction row: images/s and the achieved fraction of the ceiling."""
        ips = r["images_per_s"]
        r["flops_fraction"] = ips["median"] * r["flops_per_image"] / self.ceiling["median"]
        work = f"{r['flops_per_image'] / 1e9:.3f} GFLOP/img, {r['flops_fraction']:.2f} of matmul"
        self.add(label, f"{ips['median']:8.1f} img/s", f"({ips['low']:.0f}-{ips['high']:.0f})",
                 work, f"{r['peak_memory_mb']:6.0f} MB")
        return r

    def ratio(self, label, r):
        """A grouped-vs-loop row: the speed-up at equal work."""
        self.add(label, f"{r['speedup']:8.2f} x", f"({r['groups']} groups, {r['steps']} steps)",
                 f"{r['grouped_s'][0]:.2f} s vs {r['loop_s'][0]:.2f} s (medians)",
                 f"{r['peak_memory_mb']:6.0f} MB")
        return r

    def print(self):
        print(f"\n{'what':<46} {'median':>14} {'spread':>14}  {'work':<44} {'peak mem':>9}")
        for r in self.rows:
            print(f"{r[0]:<46} {r[1]:>14} {r[2]:>14}  {r[3]:<44} {r[4]:>9}")


def main():
    """Every measurement in its own fresh process (so that peak memory is its own), in the order
    of the table: training and extraction, grouped vs loop, the paper protocol's memory, the
    scripts' wall time; then bench.json."""
    args = parse_args()
    device = tr.pick_device(args.device)
    # What can fail at the end is checked at the start: the run to time and where the JSON goes.
    if args.run:
        tr.load_checkpoint(args.run)
    tr.check_writable(os.path.dirname(os.path.abspath(args.out)))
    ceiling = matmul_flops(device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{device.type}, {os.cpu_count()} cores")
    print(f"device: {name}; dense fp32 matmul {ceiling['median'] / 1e9:.1f} GFLOP/s "
          f"({ceiling['low'] / 1e9:.1f}-{ceiling['high'] / 1e9:.1f}; the ceiling below)",
          flush=True)
    result = dict(device=name, torch=torch.__version__, threads=torch.get_num_threads(),
                  matmul_flops=ceiling, train={}, extract={}, grouped={}, memory={}, scripts={})
    table = Table(ceiling)
    # ---- the training step (per optimiser variant) and extraction, at both model sizes ----
    for size in ("cpu", "paper"):
        for variant in ["foreach", "fused"] + (["fast"] if args.fast else []):
            result["train"][f"{size} {variant}"] = table.throughput(
                f"train {size} {variant} (batch {BATCH[size]})",
                in_child("bench_train", device, size, variant))
        fused, foreach = (result["train"][f"{size} {v}"]["images_per_s"]["median"]
                          for v in ("fused", "foreach"))
        result["train"][f"{size} fused/foreach"] = fused / foreach
        result["extract"][size] = table.throughput(f"extract {size} (11 times)",
                                                   in_child("bench_extract", device, size))
    # ---- grouped programs against their loop form, at both protocol sizes ----
    for protocol in ("cpu", "paper"):
        for kind in ("mlp", "gru", "transformer"):
            result["grouped"][f"{protocol} {kind}"] = table.ratio(
                f"{protocol} protocol {kind}: grouped vs loop",
                in_child("bench_probe", device, protocol, kind))
        result["grouped"][f"{protocol} mine"] = table.ratio(
            f"{protocol} MINE pairs x seeds: grouped vs loop",
            in_child("bench_mine", device, protocol))
    # ---- peak memory of the paper protocol, and the scripts' wall time on a run ----
    for kind in () if args.no_memory else ("mlp", "gru", "transformer"):
        r = result["memory"][kind] = in_child("bench_paper_memory", device, kind)
        table.add(f"paper protocol {kind}, 45k x 11 x 128", f"{r['seconds']:8.1f} s", "(1 step)",
                  f"{r['groups']} groups, largest step + eval chunk",
                  f"{r['peak_memory_mb']:6.0f} MB")
    for script in ("probe.py", "analyze.py") if args.run else ():
        here = os.path.dirname(os.path.abspath(__file__))
        s = result["scripts"][script] = script_wall_time(os.path.join(here, script), args.run)
        table.add(f"{script} {args.run} (cpu protocol)", f"{s / 60:8.1f} min", "", "", "")
    table.print()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except tr.UserError as e:
        sys.exit(f"error: {e}")

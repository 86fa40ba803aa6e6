"""What the code costs: throughput, FLOP efficiency, batched-vs-loop ratios and peak memory.

Measured side by side in one run on this device (nothing is asserted; tests never time anything):
    - training throughput (images/s) of the `cpu` and `paper` model sizes, the model FLOPs per image
      (torch.utils.flop_counter, forward + backward) and the achieved FLOP/s as a fraction of the
      device's measured dense fp32 matmul FLOP/s (the practical ceiling);
    - trajectory extraction throughput (images/s at 11 time points) and its FLOP/s fraction;
    - the batched per-t MLP probes against training the T MLPs one by one, same steps: time ratio;
    - the batched all-pairs MINE against pair-by-pair, same steps: time ratio;
    - peak memory of each (CUDA: max allocated; CPU: peak resident set of a fresh process).

    python bench.py                        # CPU here; prints a table, writes results/bench.json
    python bench.py --device cuda --fast   # adds bf16 autocast + channels-last + torch.compile rows

Rows: `nchw` is PyTorch's default memory format, `cl` channels-last (train.py's and load_encoder's
default), `fast` channels-last + torch.compile + bf16 autocast (CUDA).
"""
import argparse
import json
import multiprocessing as mp
import os
import resource
import time

import torch

import trajrep as tr

import train

# The model sizes and batch sizes of train.py's presets, at 32x32 (CIFAR / shapes).
SIZES = {size: train.model_kwargs({**train.DEFAULTS, **preset, **train.DATASETS["cifar10"]})
         for size, preset in train.PRESETS.items()}
BATCH = {size: preset["batch_size"] for size, preset in train.PRESETS.items()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup=2, repeat=5):
    """Seconds per call of fn after warm-up: the fastest of `repeat` calls, the least disturbed by
    other work on a shared machine."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_flops(device):
    """The practical ceiling: the best dense fp32 matmul rate over a few sizes and trials."""
    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        for _ in range(3):
            best = max(best, 2 * n ** 3 / timed(lambda: a @ b, device, warmup=1, repeat=3))
    return best


def count_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_train(device, size, variant):
    """variant: 'nchw' (default memory format), 'cl' (channels-last, train.py's default) or 'fast'
    (channels-last + torch.compile + bf16 autocast on CUDA)."""
    torch.manual_seed(0)
    model = tr.DRLModel(**SIZES[size]).to(device)
    B = BATCH[size]
    x0 = torch.randn(B, 3, 32, 32, device=device)
    fast = variant == "fast"
    if variant != "nchw":
        model = model.to(memory_format=torch.channels_last)
        x0 = x0.contiguous(memory_format=torch.channels_last)
    step_model = torch.compile(model) if fast else model
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast and device.type == "cuda")

    def step(m=step_model):
        t, noise, code_noise = tr.sample_training_noise(B, (3, 32, 32), SIZES[size]["code_dim"], device=device)
        with autocast:
            loss = m(x0, t, noise, code_noise)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    flops = count_flops(lambda: step(model)) / B  # forward + backward per image (the eager model)
    sec = timed(step, device, warmup=3 if fast else 2, repeat=5)
    return dict(images_per_s=B / sec, flops_per_image=flops, params=tr.count_parameters(model))


def bench_extract(device, size, variant):
    torch.manual_seed(0)
    enc = tr.DRLModel(**SIZES[size]).encoder.to(device).eval()
    if variant != "nchw":  # as load_encoder returns it
        enc = enc.to(memory_format=torch.channels_last)
    x = torch.randn(256, 3, 32, 32, device=device)
    times = tr.paper_times(11)
    flops = count_flops(lambda: tr.extract_trajectories(enc, x[:23], times, 256)) / 23
    sec = timed(lambda: tr.extract_trajectories(enc, x, times, 256), device, warmup=1, repeat=3)
    return dict(images_per_s=len(x) / sec, flops_per_image=flops)


def bench_point_mlps(device, steps=100, T=11, D=128, K=10):
    """Batched per-t MLPs vs T separate MLPs, the same number of optimiser steps each."""
    x, y = torch.randn(256, T, D, device=device), torch.randint(K, (256,), device=device)

    def run(model, inputs):
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for _ in range(steps):
            logits = model(inputs)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(logits.shape[1]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    batched = timed(lambda: run(tr.PointMLP(T, D, K).to(device), x), device, warmup=1, repeat=2)
    loop = timed(lambda: [run(tr.PointMLP(1, D, K).to(device), x[:, t:t + 1]) for t in range(T)], device,
                 warmup=1, repeat=2)
    return dict(batched_s=batched, loop_s=loop, speedup=loop / batched)


def bench_mine(device, steps=100, T=5, D=32):
    """All T*T pairs in one batched MINE vs one MINE per pair, the same steps (statistics on CPU
    tensors, as analyze.py runs them)."""
    codes = torch.randn(2000, T, D)
    pairs = torch.cartesian_prod(torch.arange(T), torch.arange(T))
    kw = dict(steps=steps, hidden=64, eval_shuffles=1)
    batched = timed(lambda: tr.mine_pairs(codes, codes, pairs, **kw), device, warmup=0, repeat=1)
    loop = timed(lambda: [tr.mine(codes[:, i], codes[:, j], **kw) for i, j in pairs.tolist()], device,
                 warmup=0, repeat=1)
    return dict(pairs=len(pairs), batched_s=batched, loop_s=loop, speedup=loop / batched)


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
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=child, args=(name, args, str(device), queue))
    p.start()
    out = queue.get()
    p.join()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--fast", action="store_true", help="also measure bf16 autocast + channels-last + torch.compile")
    p.add_argument("--out", default="results/bench.json", help="where to write the JSON (folder created)")
    args = p.parse_args()
    device = tr.pick_device(args.device)
    ceiling = matmul_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}, {os.cpu_count()} cores"
    print(f"device: {name}; dense fp32 matmul {ceiling / 1e9:.1f} GFLOP/s (the ceiling below)")
    result = dict(device=name, torch=torch.__version__, matmul_flops=ceiling, train={}, extract={})
    rows = []

    def throughput_row(label, r):
        r["flops_fraction"] = r["images_per_s"] * r["flops_per_image"] / ceiling
        rows.append((label, f"{r['images_per_s']:9.1f} img/s", f"{r['flops_per_image'] / 1e9:6.3f} GFLOP/img",
                     f"{r['flops_fraction']:5.2f}", f"{r['peak_memory_mb']:8.0f} MB"))
        return r

    def ratio_row(label, r):
        rows.append((label, f"{r['speedup']:9.2f} x", f"{r['batched_s']:6.2f} s vs {r['loop_s']:.2f} s", "",
                     f"{r['peak_memory_mb']:8.0f} MB"))
        return r

    for size in ("cpu", "paper"):
        for variant in ["nchw", "cl"] + (["fast"] if args.fast else []):
            key = f"{size} {variant}"
            result["train"][key] = throughput_row(f"train {key} (batch {BATCH[size]})",
                                                  in_child("bench_train", device, size, variant))
            if variant != "fast":  # extraction has no compiled variant
                result["extract"][key] = throughput_row(f"extract {key} (11 times)",
                                                        in_child("bench_extract", device, size, variant))
    result["point_mlps"] = ratio_row("per-t MLPs, 11 batched vs loop", in_child("bench_point_mlps", device))
    mine = in_child("bench_mine", device)
    result["mine"] = ratio_row(f"MINE, {mine['pairs']} pairs batched vs loop", mine)
    print(f"{'what':<34} {'throughput':>14} {'work':>18} {'FLOP/s frac':>11} {'peak mem':>11}")
    for r in rows:
        print(f"{r[0]:<34} {r[1]:>14} {r[2]:>18} {r[3]:>11} {r[4]:>11}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

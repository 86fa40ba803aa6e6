"""What the code costs on one device: the MEDIAN of several calls after warm-up, with the spread
(min - max); nothing is asserted (tests never time anything).
    1. the training step (images/s) at train.py's `cpu` and `paper` model sizes (as train.py, the
       EMA update left out), and trajectory extraction (images/s at 11 times);
    2. MINE: all 11 x 11 pairs in one tr.mine call against the loop of 121 one-pair calls at equal
       work (analyze.py's `cpu` size), a ratio;
    3. seconds per probe of tr.probe_protocol at probe.py's `cpu` size (timed on 2 epochs, scaled):
       probe.py's minutes are about the probes it trains (seeds x learning rates per kind and
       attribute) times that.

    python bench.py                        # on --device auto; a table, and results/bench.json
    python bench.py --quick                # 3 calls per timing, not 7: a smoke run
    python bench.py --device cuda          # on the GPU (train.py's --amp / --compile: not timed)"""
import argparse
import ast
import os
import statistics
import sys
import time

import torch

import trajrep as tr

HERE = os.path.dirname(os.path.abspath(__file__))

def script_table(script, name):
    """The module-level table `name = ...` of another script (its PRESETS, ...), read from its
    source as data, not imported: bench.py imports no script. dict(k=v) calls become {k: v}; the
    rest goes to ast.literal_eval (nothing is executed; anything but literals is a ValueError)."""
    def literal(node):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "dict" and not node.args:
            return {k.arg: literal(k.value) for k in node.keywords}
        if isinstance(node, ast.Dict):
            return {literal(k): literal(v) for k, v in zip(node.keys, node.values)}
        return ast.literal_eval(node)
    with open(os.path.join(HERE, script)) as f:
        tree = ast.parse(f.read())
    return next(literal(n.value) for n in tree.body if isinstance(n, ast.Assign)
                and [getattr(t, "id", None) for t in n.targets] == [name])

def timed(fn, device, repeat, warmup=1, work=None):
    """Seconds per call of fn after `warmup` calls, or with `work` that work per second:
    dict(median, low, high) over `repeat` calls. The median: one call slowed by other work on the
    machine does not move it. A GPU runs asynchronously: each call ends when its queue is empty."""
    sync = getattr(torch, device.type).synchronize if device.type != "cpu" else lambda: None
    times = []
    for _ in range(warmup + repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    v = sorted(t if work is None else work / t for t in times[warmup:])
    return dict(median=statistics.median(v), low=v[0], high=v[-1])

def bench_model(cfg, device, repeat, n=256):
    """Images/s of train.py's step at one preset's size (eq. 4's loss on random images: the cost
    does not depend on the pixels; backward, clip, Adam), and of tr.extract_trajectories of n
    images (from the host, as probe.py reads them) at 11 times."""
    torch.manual_seed(0)
    model = tr.DRLModel(**tr.model_kwargs(cfg)).to(device).to(memory_format=torch.channels_last)
    B, shape = cfg["batch_size"], (3, cfg["image_size"], cfg["image_size"])
    x0 = torch.randn(B, *shape, device=device).contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], fused=device.type == "cuda")
    def step():  # one step of train.py's loop, in fp32 (its --amp and --compile are off by default)
        t, noise, code_noise = tr.sample_training_noise(B, shape, cfg["code_dim"], device=device,
                                                        t_dist=cfg["t_dist"])
        loss = model(x0, t, noise, code_noise)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        opt.step()
    x, times = torch.randn(n, *shape), tr.paper_times(11)
    extract = lambda: tr.extract_trajectories(model.encoder, x, times)
    return timed(step, device, repeat, 2, work=B), timed(extract, device, repeat, work=n)

def bench_mine(cfg, d, device, repeat, steps=40, T=11):
    """All T x T pairs of (T, N, d) codes in one batched tr.mine call against T * T one-pair
    calls, same steps (a fraction of analyze.py's), rows, batch and width: loop / batched."""
    points = torch.randn(T, cfg["max_train"], d, device=device)  # (T, N, d); values cost nothing
    kw = dict(steps=steps, batch_size=cfg["batch_size"], lr=cfg["lr"], hidden=cfg["hidden"])
    batched = timed(lambda: tr.mine(points[:, None], points[None], **kw), device, repeat)
    loop = timed(lambda: [tr.mine(points[i], points[j], **kw) for i in range(T) for j in range(T)],
                 device, repeat)
    return dict(kw, batched_s=batched, loop_s=loop, ratio=loop["median"] / batched["median"])

def bench_probe(cfg, kind, d, device, repeat, epochs=2, T=11, K=10):
    """Seconds of ONE probe (one input, seed and learning rate) of tr.probe_protocol on random
    codes at probe.py's `cpu` size, timed on `epochs` epochs and scaled to the preset's epochs."""
    x, x_te = (torch.randn(n, T, d, device=device) for n in (cfg["max_train"], cfg["max_test"]))
    y, y_te = (torch.randint(K, (len(c),), device=device) for c in (x, x_te))
    s = timed(lambda: tr.probe_protocol(kind, x, y, x_te, y_te, K, cfg["lrs"][:1], epochs, [0],
                                        width=cfg["width"]), device, repeat)
    return {k: v * cfg["epochs"] / epochs for k, v in s.items()}

def main(argv=None):
    """Checks (device, output folder); then measures, a row of the table at a time."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--quick", action="store_true", help="3 calls per timing (7 otherwise)")
    p.add_argument("--out", default="results/bench.json", help="a .json file, or a folder for "
                   "bench.json (created if absent)")
    args = p.parse_args(argv)
    device = tr.pick_device(args.device)
    # The output is checked now, not after the work.
    path = args.out if args.out.endswith(".json") else os.path.join(args.out, "bench.json")
    tr.check_writable(os.path.dirname(os.path.abspath(path)))  # creates the folder
    # The sizes: train.py's config of each preset (its DEFAULTS, then the preset) at 32x32 pixels
    # (shapes, CIFAR); probe.py's and analyze.py's `cpu` protocol, on the `cpu` model's codes.
    defaults, presets = (script_table("train.py", k) for k in ("DEFAULTS", "PRESETS"))
    sizes = {size: {**defaults, **p, "image_size": 32} for size, p in presets.items()}
    probe_cfg, mine_cfg = (script_table(s, "PRESETS")["cpu"] for s in ("probe.py", "analyze.py"))
    d, repeat = sizes["cpu"]["code_dim"], 3 if args.quick else 7
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    out = dict(device=name, torch=torch.__version__, threads=torch.get_num_threads(), calls=repeat)
    # The table: a row printed as soon as it is measured.
    row = lambda *cells: print("{:<34} {:>14} {:>20}  {}".format(*cells), flush=True)
    cells = lambda r, unit: (f"{r['median']:.1f} {unit}", f"({r['low']:.1f}-{r['high']:.1f})")
    row(f"{name}, torch threads {out['threads']}", f"median of {repeat}", "(min-max)", "work")
    for size, cfg in sizes.items():
        out[f"train {size}"], out[f"extract {size}"] = bench_model(cfg, device, repeat)
        row(f"train {size}", *cells(out[f"train {size}"], "img/s"), f"batch {cfg['batch_size']}")
        row(f"extract {size}", *cells(out[f"extract {size}"], "img/s"), "11 times")
    out["mine"] = r = bench_mine(mine_cfg, d, device, repeat)
    row("MINE 121 pairs: loop / batched", f"{r['ratio']:.2f} x", f"{r['loop_s']['median']:.2f} s "
        f"/ {r['batched_s']['median']:.2f} s", f"{r['steps']} steps, N={mine_cfg['max_train']}, "
        f"D={d}, hidden {r['hidden']}")
    for kind in ("mlp", "gru", "transformer"):
        out[f"probe {kind}"] = r = bench_probe(probe_cfg, kind, d, device, repeat)
        row(f"probe {kind} (cpu protocol)", *cells(r, "s/probe"), f"{probe_cfg['epochs']} "
            f"epochs, {probe_cfg['max_train']} codes, width {probe_cfg['width']}")
    tr.atomic_save(out, path)
    print(f"wrote {path}")

if __name__ == "__main__":
    try:
        main()
    except (tr.UserError, KeyboardInterrupt) as e:  # one sentence (Ctrl-C too), no traceback
        sys.exit(f"error: {e or 'interrupted; nothing was written'}")

"""Downstream probes of the trajectory t -> E(x0, t): the Figure 1 table, per attribute, with
controls.

For a run of train.py: encodes the train and test splits on the paper's grid of 11 times (cached in
<run>/cache), then trains with the paper's protocol (trajrep.probe_protocol):
    - an MLP on each single time point; a GRU and a Transformer on the whole curve (section 3.1),
      and the paper's single-layer Transformer, whose token's attention over t (Figure 3, per
      seed) is saved for analyze.py,
    - an MLP on the T codes concatenated, and controls the paper lacks: an MLP on their mean, and
      the concatenated MLP, GRU and Transformer on a CONSTANT curve (the best single-t code
      repeated): only a gain over these is a gain of the curve,
    - a grid-free Transformer on the VALUE of t, tested on grids it never saw (the paper's closing
      question),
    - the SAME probes on the encoder at its random initialisation, and an MLP on the raw pixels.
`--probes mlp` runs only the MLPs (per t, concatenated, on the constant curve) and their controls:
the quick table of an ablation, and what analyze.py --claims reads.

    python train.py && python probe.py runs/shapes-drl               # CPU default, every attribute
    python probe.py runs/shapes-drl --target shape                    # one attribute of `shapes`
    python probe.py runs/cifar10-vdrl --preset paper --device cuda    # the published protocol

Writes <run>/results/probe.json and <run>/results/probe.png (accuracy against t, Figure 1 style).
"""
import argparse
import json
import os
import time

import torch

import trajrep as tr

# Probe protocol of the published code (paper section 3.1); `cpu` is the same at a CPU budget.
# The per-t MLPs keep the published 512 hidden units in both; `width` is the GRU / Transformer's.
PRESETS = {
    "cpu": dict(epochs=10, lrs=[3e-3, 1e-3], seeds=2, mlp_seeds=2, max_train=3000, max_test=1000,
                width=64),
    "paper": dict(epochs=100, lrs=[1e-3, 7.5e-4, 5e-4, 2.5e-4, 1e-4, 5e-5], seeds=5, mlp_seeds=3,
                  max_train=0, max_test=0, width=256),
}
# the continuous probe trains on random sub-grids of 0, 0.05, ..., 1 (contains 5 and 11 points)
FINE_STEP = 0.05
# The table's rows after the per-t MLPs: key in probe.json, label, and for a probe of the whole
# curve its line in Figure 1 (colour, style).
ROWS = [("concat", "MLP on concatenated curve", "tab:green", "-"),
        ("concat_const", "  MLP on constant curve, concatenated", "tab:green", ":"),
        ("mean", "MLP on mean over t (ctrl)", None, None), ("gru", "GRU", "tab:blue", "-"),
        ("gru_const", "  GRU on constant curve (ctrl)", "tab:blue", ":"),
        ("transformer", "Transformer", "tab:red", "-"),
        ("transformer_const", "  Transformer on constant curve", "tab:red", ":"),
        ("attention_probe", "single-layer Transformer (Figure 3)", None, None),
        ("continuous", "grid-free Transformer (11 pts)", "tab:purple", "-."),
        ("pixels", "MLP on raw pixels (ctrl)", None, None)]

def float_list(text):
    """'0,0.5,1' -> [0.0, 0.5, 1.0] (a def, not a lambda: argparse names the type in its error)."""
    return [float(v) for v in text.split(",") if v.strip()]

def parse_args(argv):
    """The command line, with the protocol's flags checked: impossible values end with one sentence
    before any work. Unset protocol flags take the --preset's values.
    Returns (args, protocol config, grid of times (T,))."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder of train.py (holding ckpt.pt)")
    p.add_argument("--target", help="an attribute (shapes: shape, fg_colour, bg_colour, location, "
                   "texture; image folders: class) or all (default)")
    p.add_argument("--num-times", type=int, default=11, help="regular grid on [0, 1] (paper 11)")
    p.add_argument("--times", type=float_list, help="explicit comma-separated times instead of "
                   "--num-times, e.g. 0,0.25,0.5,0.75,1")
    p.add_argument("--no-continuous", action="store_true", help="skip the grid-free probe")
    p.add_argument("--probes", choices=["all", "mlp"], default="all", help="all (default) or mlp: "
                   "only the MLPs (per t, concatenated) and their controls")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="cpu (default) or "
                   "paper: the protocol flags below default to its values")
    show = lambda v: ",".join(f"{x:g}" for x in v) if isinstance(v, list) else v
    for key, kind, text in (("epochs", int, "epochs per probe"),
                            ("lrs", float_list, "learning-rate grid, comma-separated"),
                            ("width", int, "GRU hidden size and Transformer width"),
                            ("seeds", int, "seeds for the GRU / Transformer probes"),
                            ("mlp_seeds", int, "seeds for the MLP probes"),
                            ("max_train", int, "use at most this many training images, 0 = all"),
                            ("max_test", int, "use at most this many test images, 0 = all")):
        values = ", ".join(f"{name} {show(preset[key])}" for name, preset in PRESETS.items())
        p.add_argument("--" + key.replace("_", "-"), type=kind, help=f"{text} ({values})")
    p.add_argument("--batch-size", type=int, default=256, help="probe batch size (256)")
    p.add_argument("--data-root", help="where the run's dataset lies, if it has moved")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    args = p.parse_args(argv)
    cfg = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if v is not None}}
    if min(cfg[k] for k in ("epochs", "seeds", "mlp_seeds", "width", "batch_size")) <= 0 or (
            cfg["num_times"] < 2):
        raise tr.UserError("--epochs, --seeds, --mlp-seeds, --width and --batch-size must be "
                           "positive and --num-times at least 2")
    if not cfg["lrs"] or not all(0 < lr < float("inf") for lr in cfg["lrs"]):  # NaN fails
        raise tr.UserError(f"--lrs must be positive numbers, got {cfg['lrs']}")
    if cfg["max_train"] < 0 or cfg["max_test"] < 0:
        raise tr.UserError("--max-train and --max-test must be 0 (all) or positive")
    times = torch.tensor(args.times) if args.times else tr.paper_times(args.num_times)
    if len(times) < 2 or not bool(times.min() >= 0 and times.max() <= 1  # NaN, inf fail here
                                  and (times.diff() > 0).all()):
        raise tr.UserError("--times must be at least 2 increasing finite values in [0, 1], e.g. "
                           "0,0.5,1")
    return args, cfg, times

def encode(args, cfg, splits, encoders, step, times, device):
    """Every input the probes read, on `device`: trained codes on the grid (`grid`) and on the fine
    grid (`fine`, train split), random-init codes (`init`), raw pixels, and test codes on other
    grids (`test_grids`), cached in <run>/cache. encoders: (trained, init)."""
    def codes(split, grid, control=False):
        encoder, tag = (encoders[1], "init") if control else (encoders[0], f"step{step}")
        c = tr.cached_trajectories(args.run, encoder, splits[split], split, grid, tag,
                                   log=lambda m: print(m, flush=True))
        return {k: v.to(device) for k, v in c.items()}  # codes, labels, times

    wanted = cfg["probes"] == "all" and not args.no_continuous
    on_fine = wanted and bool(((times / FINE_STEP).round() * FINE_STEP - times).abs().max() < 1e-5)
    if wanted and not on_fine:
        print(f"the grid-free probe needs --times on multiples of {FINE_STEP}: skipped")
    fine = torch.linspace(0, 1, round(1 / FINE_STEP) + 1)  # encoded first: the grid is cut from it
    data = dict(fine={"train": codes("train", fine)} if on_fine else None, run=args.run)
    data["grid"] = {s: codes(s, times) for s in ("train", "test")}  # (N, T, D) each
    data["init"] = {s: codes(s, times, control=True) for s in ("train", "test")}  # the control
    data["pixels"] = {s: splits[s].tensors()[0].flatten(1)[:, None].to(device)  # (N, 1, C*H*W)
                      for s in ("train", "test")}
    if on_fine:  # the grid-free probe is tested on grids it never saw
        rand = torch.rand(11, generator=torch.Generator().manual_seed(0)).sort().values
        grids = zip(("5", "11", "51", "random11"), (*map(tr.paper_times, (5, 11, 51)), rand))
        data["test_grids"] = {name: codes("test", grid) for name, grid in grids}
    return data

# ' 77.5 ±  0.2': a probe's accuracy and its spread over seeds in percent (at point i, per-t MLPs)
fmt = lambda r, i=None: "{:5.1f} ± {:4.1f}".format(
    *(100 * (r[k] if i is None else r[k][i]) for k in ("mean", "std")))

def bits(correct):
    """Which test images one probe seed gets right, correct (N,) bool, as a string of '1' / '0':
    what probe.json keeps for tests paired image by image (analyze.py --claims)."""
    return "".join("01"[int(c)] for c in correct.tolist())

def summary(res, r=0):
    """Readout r's mean, spread, per-seed accuracies and chosen lrs, and per seed which test images
    it gets right (bits)."""
    right = [bits(seed) for seed in res["correct"][:, :, r]]
    return dict(mean=res["test_mean"][r].item(), std=res["test_std"][r].item(), correct=right,
                seeds=res["tests"][:, r].tolist(), lrs=res["lrs"][:, r].tolist())

def verdict(name, a, b, b_name, chance):
    """One plain sentence: does probe `a` beat `b` by more than their seed spread (added in
    quadrature)? Two probes both within 2 points of chance, or both above 99.5%, are not read."""
    diff, spread = a["mean"] - b["mean"], (a["std"] ** 2 + b["std"] ** 2) ** 0.5
    if max(a["mean"], b["mean"]) < chance + 0.02:
        return (f"{name} and {b_name} are both at or below chance ({100 * a['mean']:.1f}% and "
                f"{100 * b['mean']:.1f}%, majority class {100 * chance:.1f}%): no comparison")
    if min(a["mean"], b["mean"]) > 0.995:
        return (f"{name} and {b_name} are both at the ceiling ({100 * a['mean']:.2f}% and "
                f"{100 * b['mean']:.2f}%, above 99.5%): no comparison")
    word = ("beats" if diff > spread else "is below" if diff < -spread
            else "is within the seed spread of")
    return f"{name} {word} {b_name}: {100 * diff:+.1f} points (spread {100 * spread:.1f})"

def verdicts(out):
    """The comparisons the table is read for, a sentence each: the trained encoder against its two
    controls, and the curve probes against the best single point, their constant-curve controls
    and the same probe at random init."""
    init, best, mlp = out["init"], out["best_mlp"], "the best single-t MLP"
    ours, const = "the trained encoder's best single-t MLP", "its constant-curve control"
    rows = [(f"{ours} (t={out['best_t']:.2f})", "best_mlp", init["best_mlp"],
             f"the random-init encoder's (t={init['best_t']:.2f})"),
            (ours, "best_mlp", out["pixels"], "an MLP on the raw pixels"),
            ("MLP on the concatenated curve", "concat", best, mlp),
            ("MLP on the concatenated curve", "concat", out["concat_const"], const)]
    if "gru" in out:  # the whole protocol ran
        rows += [("GRU", "gru", best, f"{mlp} (t={out['best_t']:.2f})"),
                 ("Transformer", "transformer", best, mlp), ("GRU", "gru", out["gru_const"], const),
                 ("Transformer", "transformer", out["transformer_const"], const),
                 ("Transformer", "transformer", init["transformer"],
                  "the same probe at random init")]
    if "continuous" in out:
        rows.append(("grid-free Transformer", "continuous", out["transformer"],
                     "the index Transformer"))
    return [verdict(name, out[key], b, b_name, out["chance"]) for name, key, b, b_name in rows]

def constant_curve(codes, best):
    """The constant-curve control: the best single-t code (index best, chosen on validation)
    repeated at all T points. Same probe, same capacity (an MLP's first layer as wide, taking as
    many Adam steps), no trajectory. (N, T, D) -> (N, T, D)."""
    return codes[:, best:best + 1].expand_as(codes)

def continuous_on_grid(res, codes, labels, times):
    """Accuracy of the chosen grid-free probe of each seed on codes (N, T', D) at `times` (T') it
    never trained on, and their mean attention density over t."""
    mean, std = res["standardiser"]  # the training codes' statistics, pooled over t
    accs, atts = zip(*(tr.evaluate_probe(p, (codes - mean) / std, labels, times)
                       for p in res["chosen_probes"]))
    right = [bits(seed[:, 0]) for seed in accs]  # per seed, as summary keeps them
    accs = torch.stack([c[:, 0].float().mean() for c in accs])  # (S,)
    density = torch.stack([tr.attention_density(att, times) for att in atts]).mean(0)  # (T',)
    return dict(mean=accs.mean().item(), std=accs.std(unbiased=False).item(), seeds=accs.tolist(),
                correct=right, times=times.tolist(), density=density.tolist())

def probe_target(a, name, k, data, cfg, log):
    """The whole table for one attribute a (named name, k classes). data: the codes by grid and
    encoder (see encode)."""
    grid, times, t0 = data["grid"], data["grid"]["train"]["times"], time.time()
    y_tr, y_te = grid["train"]["labels"][:, a], grid["test"]["labels"][:, a]  # (N,), (N_test,)
    fit_idx, _ = tr.split_train_val(len(y_tr))  # the part tr.probe_protocol trains on
    if len(torch.unique(y_tr[fit_idx])) < 2:
        raise tr.UserError(f"attribute {name!r}: the {len(fit_idx)} of {len(y_tr)} training images "
                           "that the probes learn from (a tenth is held out for validation) hold a "
                           "single class; probe an attribute with two classes or more, or give "
                           "more images per class (a larger --max-train)")
    def run(kind, xtr, xte, seeds, what, **kw):  # tr.probe_protocol, with progress lines
        start = time.time()
        log(f"[{name}] {what} probes: {seeds} seed(s) x {len(cfg['lrs'])} learning rate(s), "
            f"{cfg['epochs']} epochs ...", flush=True)

        def tick(done, total):  # at every tenth of the probes: how far, and an ETA for the rest
            if done < total and done % max(1, total // 10) == 0:
                spent = time.time() - start
                log(f"[{name}] {what}: {done}/{total} probes in {spent:.0f} s, ETA "
                    f"{spent * (total - done) / done:.0f} s", flush=True)
        res = tr.probe_protocol(kind, xtr, y_tr, xte, y_te, k, cfg["lrs"], cfg["epochs"],
                                list(range(seeds)), cfg["batch_size"], width=cfg["width"],
                                progress=tick, **kw)
        log(f"[{name}] {what} done in {time.time() - start:.0f} s", flush=True)
        return res
    out = dict(num_classes=k, chance=torch.bincount(y_te, minlength=k).max().item() / len(y_te))
    # The same probes on the trained and the random-init encoder's codes, then an MLP on the raw
    # pixels. The controls do not depend on the trained encoder: they are cached under their inputs,
    # labels and protocol, and a later checkpoint of the run (or a rerun) reads them.
    rows = lambda codes, tag: encoder_rows(run, codes["train"]["codes"], codes["test"]["codes"],
                                           times, tag, cfg)
    out.update(rows(grid, ""))
    protocol = [cfg[k] for k in ("epochs", "lrs", "seeds", "mlp_seeds", "width", "batch_size",
                                 "probes")] + [[row[0] for row in ROWS]]  # and the rows it holds
    control = lambda name, inputs, compute: tr.cached_result(
        data["run"], f"control-{name}", [*inputs, y_tr, y_te], protocol, compute, log)
    init, pixels = data["init"], data["pixels"]
    out["init"] = control("init", [init["train"]["codes"], init["test"]["codes"]],
                          lambda: rows(init, ", random init"))
    out["pixels"] = control("pixels", [pixels["train"], pixels["test"]], lambda: summary(
        run("mlp", pixels["train"], pixels["test"], cfg["mlp_seeds"], "pixel MLP")))
    if data["fine"] is not None and cfg["probes"] == "all":  # grid-free: then on other grids
        fine, cols = data["fine"]["train"], (times / FINE_STEP).round().long()
        res = run("continuous", fine["codes"], grid["test"]["codes"], cfg["seeds"], "continuous",
                  continuous=dict(fine_times=fine["times"], eval_cols=cols))
        out["continuous"], out["continuous_grids"] = summary(res), {
            g: continuous_on_grid(res, d["codes"], d["labels"][:, a], d["times"])
            for g, d in data["test_grids"].items()}
    out.update(seconds=time.time() - t0, verdicts=verdicts(out))
    print_table(name, out, times, log)
    return out

def encoder_rows(run, x_tr, x_te, times, tag, cfg):
    """One encoder's rows from its codes x_tr (N, T, D) and x_te: the per-t MLPs (the best t chosen
    on VALIDATION), then the curve read whole: an MLP on the concatenated codes and on its
    constant curve (control); with every probe, an MLP on the mean codes (control), the GRU and the
    Transformer on the curve and on its constant curve, and the single-layer Transformer whose
    attention is Figure 3."""
    mlp = run("mlp", x_tr, x_te, cfg["mlp_seeds"], "mlp" + tag)  # R = T readouts
    b = int(mlp["val_mean"].argmax())  # the best single t, on validation
    out = dict(mlp=dict(mean=mlp["test_mean"].tolist(), std=mlp["test_std"].tolist(),
                        val_mean=mlp["val_mean"].tolist(), lrs=mlp["lrs"].tolist()),
               best_t_index=b, best_t=times[b].item(), best_mlp=summary(mlp, b))
    out["concat"] = summary(run("concat", x_tr, x_te, cfg["mlp_seeds"], "concat" + tag))
    out["concat_const"] = summary(run("concat", constant_curve(x_tr, b), constant_curve(x_te, b),
                                      cfg["mlp_seeds"], "concat on the constant curve" + tag))
    if cfg["probes"] != "all":  # --probes mlp, the quick table of an ablation, stops here
        return out
    out["mean"] = summary(run("mean", x_tr, x_te, cfg["mlp_seeds"], "mean" + tag))
    for kind in ("gru", "transformer"):  # the curve, then its constant-curve control
        out[kind] = summary(run(kind, x_tr, x_te, cfg["seeds"], kind + tag))
        out[kind + "_const"] = summary(run(kind, constant_curve(x_tr, b), constant_curve(x_te, b),
                                           cfg["seeds"], kind + " on the constant curve" + tag))
    # Figure 3: the paper's probe, one attention layer, so that its token weighs the points as the
    # encoder gave them (the two-round Transformer's last attention reads points already mixed);
    # the token's attention over the T points, per seed (S, T) and their mean (T,).
    res = run("attention", x_tr, x_te, cfg["seeds"], "single-layer Transformer" + tag)
    out["attention_probe"] = dict(summary(res), attention=res["attention"].tolist(),
                                  attention_seeds=res["attention_seeds"].tolist())
    return out

def print_table(name, out, times, log):
    """The Figure 1 table of one attribute: the per-t MLPs (the best t starred), every other probe,
    each with its random-init control beside it, the pixel MLP, and the verdicts in words."""
    init = out["init"]
    log(f"\n== target: {name} ({out['num_classes']} classes, majority-class rate "
        f"{100 * out['chance']:.1f}%) ==\n{'probe':<36} {'trained encoder':>15}   "
        f"{'random init':>13}   (test accuracy %, mean ± std over seeds)")
    for i, t in enumerate(times.tolist()):
        m0, m1 = (" *" if i == o["best_t_index"] else "  " for o in (out, init))  # the best t
        log(f"{f'MLP at t={t:.2f}':<36} {fmt(out['mlp'], i)}{m0} {fmt(init['mlp'], i)}{m1}")
    for key, label, *_ in ROWS:
        if key in out:
            log(f"{label:<36} {fmt(out[key])}" + (f"   {fmt(init[key])}" if key in init else ""))
    log("  * best single t, chosen on validation accuracy")
    if "continuous_grids" in out:
        log("grid-free Transformer on other grids: " + ", ".join(
            f"{g}: {fmt(v)}" for g, v in out["continuous_grids"].items()))
    for v in out["verdicts"]:
        log("  " + v)

def plot(result, path):
    """Figure 1, a panel per attribute: the per-t MLP against t, the curve probes as lines, the
    controls; each y-axis spans its own data, one legend below. Redraw from a saved result with
    probe.plot(json.load(open('runs/shapes-drl/results/probe.json')), 'probe.png')."""
    import matplotlib  # here only: the probes never need matplotlib; Agg needs no display
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    targets, t = result["targets"], result["times"]
    fig, axes = plt.subplots(1, len(targets), figsize=(max(3.6 * len(targets), 6.5), 3.6),
                             squeeze=False)
    for ax, (name, out) in zip(axes[0], targets.items()):  # the trained per-t MLP, with error bars
        m, s = (torch.tensor(out["mlp"][k]) * 100 for k in ("mean", "std"))
        ax.errorbar(t, m, yerr=s, marker="o", color="k", label="MLP at t (trained encoder)")
        lines = [(100 * out[k]["mean"], colour, ls, label.strip()) for k, label, colour, ls in ROWS
                 if colour and k in out]
        for y, colour, ls, label in lines:
            ax.axhline(y, color=colour, ls=ls, label=label)
        init, pixels = [100 * v for v in out["init"]["mlp"]["mean"]], 100 * out["pixels"]["mean"]
        ax.plot(t, init, color="grey", ls="--", marker=".", label="MLP at t, random-init encoder")
        ax.axhline(pixels, color="tab:orange", ls="--", lw=0.8, label="MLP on pixels")
        ax.axhline(100 * out["chance"], color="grey", lw=0.8, label="majority class")
        shown = m.tolist() + [y for y, *_ in lines]
        low, high = min(shown + init + [pixels, 100 * out["chance"]]), max(shown + [pixels])
        if high - min(shown) < 10:  # every probe near the top: zoom on them, controls in the title
            low = min(shown) - 1
        pad = max(0.5, 0.05 * (high - low))
        ax.set_ylim(max(0, low - pad), min(100, high + pad) + 0.2)
        if low > min(init + [100 * out["chance"]]):  # the table's random-init level, at ITS t
            name += (f"\n(random init {100 * out['init']['best_mlp']['mean']:.0f}% at the t chosen "
                     "on validation,\nbelow the axis)")
        ax.set(title=name, xlabel="t", ylabel="test accuracy (%)")
        ax.title.set_fontsize(9)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7,
               frameon=False)
    fig.suptitle(f"{result['dataset']} / {result['encoder']}: points vs trajectory (Figure 1)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)

def merge_targets(result, path):
    """Keeps the attributes of an earlier probe.py of the same checkpoint, grid and protocol beside
    this one's (`--target shape`, then `--target location`); another run's file is replaced."""
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable: nothing to keep
        return
    same = lambda r: (r.get("step"), r.get("times"), {k: v for k, v in r.get("protocol", {}).items()
                                                      if k not in ("target", "run", "device")})
    kept = [name for name in old.get("targets", {}) if name not in result["targets"]]
    what = "kept" if same(old) == same(result) else "replaced (other checkpoint, grid or protocol)"
    if what == "kept":
        result["targets"] = {**{n: old["targets"][n] for n in kept}, **result["targets"]}
    if kept:  # said either way
        print(f"{what} the earlier results of {', '.join(kept)} in {path}")

def main(argv=None):
    """probe.py: flags checked, the run opened, its codes encoded (or read from the cache), every
    probe trained per attribute, the summary printed, probe.json and probe.png written."""
    (args, cfg, times), t_start = parse_args(argv), time.time()
    encoder, init_encoder, train_cfg, step, device, out_dir = tr.open_run(args.run, args.device)
    stem = "probe" if cfg["probes"] == "all" else "probe_mlp"  # a quick table never replaces all
    tr.check_writable(files=[os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "png")])
    splits = tr.run_datasets(train_cfg, args.data_root, cfg["max_train"], cfg["max_test"], seed=0)
    attrs = splits["train"].attributes
    targets = list(attrs) if (args.target or "all") == "all" else [args.target]
    if any(t not in attrs for t in targets):
        raise tr.UserError(f"--target must be one of {', '.join(attrs)} or all, not {args.target}")
    data = encode(args, cfg, splits, (encoder, init_encoder), step, times, device)
    # How far the codes move along t against the spread between images: a curve that barely moves
    # is one point in disguise, and no probe of it can beat its best point.
    movement = {k: dict(zip(("along", "across"), tr.curve_movement(data[k]["train"]["codes"])))
                for k in ("grid", "init")}
    for m in movement.values():
        m["ratio"] = m["along"] / max(m["across"], 1e-12)
    print("curve movement (std over t / std between images): trained "
          f"{movement['grid']['ratio']:.3f}, random init {movement['init']['ratio']:.3f}")
    result = dict(run=args.run, step=step, dataset=train_cfg["dataset"], protocol=cfg,
                  test_key=tr.tensors_key(*splits["test"].tensors()),  # which test images
                  encoder=train_cfg["encoder"], times=times.tolist(), movement=movement, targets={},
                  texture_mix=train_cfg.get("texture_mix", 0.5))  # rule 11 groups by it
    for i, name in enumerate(targets):
        a = attrs.index(name)
        result["targets"][name] = probe_target(a, name, splits["train"].num_classes[a], data, cfg,
                                               print)
        if i + 1 < len(targets):  # the attributes cost about the same: an ETA for the rest
            left = (time.time() - t_start) / (i + 1) * (len(targets) - i - 1)
            print(f"[{i + 1}/{len(targets)} attributes done; ETA {left / 60:.1f} min]", flush=True)
    result["wall_time_s"] = time.time() - t_start
    print("\nwhere each attribute is best read (best single-t MLP, chosen on validation):")
    for name, o in result["targets"].items():
        print(f"  {name:<10} t={o['best_t']:.2f}: {fmt(o['best_mlp'])} (random init "
              f"{fmt(o['init']['best_mlp'])} at t={o['init']['best_t']:.2f}; pixels "
              f"{fmt(o['pixels'])}; majority {100 * o['chance']:.1f})")
    merge_targets(result, os.path.join(out_dir, stem + ".json"))
    tr.atomic_save(result, os.path.join(out_dir, stem + ".json"))
    plot(result, os.path.join(out_dir, stem + ".png"))
    print(f"\nwrote {out_dir}/{stem}.json and {stem}.png in {result['wall_time_s'] / 60:.1f} min")

if __name__ == "__main__":
    try:
        main()
    except (tr.UserError, KeyboardInterrupt) as e:  # one sentence (Ctrl-C too), no traceback
        raise SystemExit("error: " + (str(e) or "interrupted; the codes encoded so far are kept "
                                      "in <run>/cache, no results were written")) from None

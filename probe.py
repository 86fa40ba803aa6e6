"""Downstream probes of the trajectory t -> E(x0, t): the Figure 1 table, per attribute, with
controls.

For a run of train.py: encodes the train and test splits on the paper's grid of 11 times (cached in
<run>/cache), then trains, with the paper's protocol (validation split, learning rate chosen on
validation, test accuracy at the best validation epoch, mean and spread over seeds):
    - an MLP on each single time point,
    - a GRU and a Transformer on the whole curve (paper section 3.1),
    - controls the paper lacks: an MLP on all T codes concatenated, an MLP on the mean code, and the
      GRU / Transformer on a CONSTANT curve (the best single-t code, chosen on validation, repeated
      T times): same probe, same capacity, no trajectory. Only a gain over these is a gain of the
      curve.
    - a grid-free Transformer on the VALUE of t, trained on random sub-grids of a fine grid and
      tested on grids of 5, 11 and 51 points and on random times (answers the paper's closing
      question).
    - the controls without which no row is a result: the SAME probes on the SAME encoder
      architecture at its random initialisation (the weights train.py started from), and an MLP on
      the raw pixels.
Each probe kind is ONE grouped program: every learning rate x seed, on the trained and the random-
init codes (and, for the GRU and Transformer, their constant curves), trains in grouped models
of at most --max-groups probes each, equal to training each alone (trajrep.run_probe_protocol).
The Transformer's attention over t (Figure 3) is saved for analyze.py. `--probes mlp` runs only the
per-t MLPs with their random-init and pixel controls: the quick table of an ablation.

    python train.py && python probe.py runs/shapes-drl               # CPU default, every attribute
    python probe.py runs/shapes-drl --target shape                    # one attribute of `shapes`
    python probe.py runs/cifar10-vdrl --preset paper --device cuda    # the published protocol

Writes <run>/results/probe.json and <run>/results/probe.png (accuracy against t, Figure 1 style).
"""
import argparse
import json
import math
import os
import sys
import time

import torch

import train
import trajrep as tr

# Probe protocol of the published code (paper section 3.1); `cpu` is the same at a CPU budget.
# `paper`: 100 epochs, six learning rates chosen on validation, 5 seeds (3 for the MLPs), every
# image, width 256. `cpu`: 10 epochs, two learning rates, 2 seeds, 3000 / 1000 images, width 64;
# the per-t MLPs keep the published 512 hidden units in both.
PRESETS = {
    "cpu": dict(epochs=10, lrs=[3e-3, 1e-3], seeds=2, mlp_seeds=2, max_train=3000, max_test=1000,
                width=64),
    "paper": dict(epochs=100, lrs=[1e-3, 7.5e-4, 5e-4, 2.5e-4, 1e-4, 5e-5], seeds=5, mlp_seeds=3,
                  max_train=0, max_test=0, width=256),
}
# the continuous probe trains on random sub-grids of 0, 0.05, ..., 1 (contains 5 and 11 points)
FINE_STEP = 0.05
# Probes trained as one grouped model at most (--max-groups): on a CPU the element-wise work of
# larger groups leaves the cache and runs slower; elsewhere 30 (the paper's 6 lrs x 5 seeds) keeps
# the `paper` protocol on 45k codes under 8 GB (bench.py measures both).
MAX_GROUPS = {"cpu": 4, "other": 30}


def parse_args(argv):
    """The command line; unset protocol flags stay None and take the --preset's values."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder of train.py (holding ckpt.pt)")
    # Which attributes, on which grid of times, and which probes.
    g = p.add_argument_group("what to probe")
    g.add_argument("--target", default=None, help="attribute to predict ('class' for CIFAR; for "
                                                  "shapes one of shape, fg_colour, bg_colour, "
                                                  "location) or 'all' (default all)")
    g.add_argument("--num-times", type=int, default=11,
                   help="points of the regular grid on [0, 1] (paper 11)")
    g.add_argument("--times", type=train.float_list, default=None,
                   help="explicit comma-separated times instead of --num-times, e.g. "
                        "0,0.25,0.5,0.75,1")
    g.add_argument("--no-continuous", action="store_true",
                   help="skip the grid-free probe (saves encoding time)")
    g.add_argument("--probes", choices=["all", "mlp"], default="all",
                   help="all (default) or mlp: only the per-t MLPs and their random-init and pixel "
                        "controls")
    # How each probe is trained and chosen; every value defaults to the --preset's.
    g = p.add_argument_group("protocol")
    g.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu (default) or paper")
    g.add_argument("--epochs", type=int, help="epochs per probe (cpu 10, paper 100)")
    g.add_argument("--lrs", type=train.float_list, help="learning-rate grid, comma-separated (cpu "
                                                      "3e-3,1e-3; paper 1e-3,...,5e-5)")
    g.add_argument("--width", type=int, help="GRU hidden size and Transformer width (cpu 64, paper "
                                             "256)")
    g.add_argument("--seeds", type=int, help="seeds for the GRU / Transformer probes (paper 5)")
    g.add_argument("--mlp-seeds", type=int, help="seeds for the MLP probes (paper 3)")
    g.add_argument("--batch-size", type=int, default=256, help="probe batch size (256)")
    g.add_argument("--max-groups", type=int, default=None,
                   help="train at most this many probes (learning rate x seed x input) as one "
                        "grouped model; 0 = all at once (default: 4 on a CPU, where larger groups "
                        "leave the cache and run slower; 30 elsewhere, which keeps the paper "
                        "protocol under 8 GB; see bench.py)")
    g.add_argument("--max-train", type=int, help="use at most this many training images, 0 = all "
                                                 "(cpu 3000)")
    g.add_argument("--max-test", type=int, help="use at most this many test images, 0 = all (cpu "
                                                "1000)")
    g.add_argument("--data-root",
                   help="where the run's dataset lies, if not where train.py read it")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    return p.parse_args(argv)


# ---- one attribute's table: the probes, their summaries and the verdicts ----

def fmt(mean, std):
    """An accuracy and its spread over seeds, in percent: ' 77.5 ±  0.2'."""
    return f"{100 * mean:5.1f} ± {100 * std:4.1f}"


def summary(res, head=0, v=None):
    """Mean, spread, per-seed accuracies and chosen lrs of one readout (of input v, for grouped
    inputs)."""
    pick = (lambda x: x) if v is None else (lambda x: x[v])  # grouped inputs lead with V
    return dict(mean=pick(res["test_mean"])[head].item(), std=pick(res["test_std"])[head].item(),
                seeds=pick(res["tests"])[:, head].tolist(), lrs=pick(res["lrs"])[:, head].tolist())


def verdict(name, a, b, b_name, chance):
    """One plain sentence: does probe `a` beat `b` by more than their seed spread? Differences
    between two probes both within 2 points of the majority-class rate, or both above 99.5%, are
    not read."""
    diff = a["mean"] - b["mean"]
    # The spread of a difference of two independent means: their spreads added in quadrature.
    spread = (a["std"] ** 2 + b["std"] ** 2) ** 0.5
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
    """The comparisons the Figure 1 table is read for, each one sentence (see verdict): the trained
    encoder against its two controls, and (when every probe ran) the curve probes against the best
    single point, against their constant-curve controls and against the same probe at random
    init."""
    best, init = f"the best single-t MLP (t={out['best_t']:.2f})", out["init"]
    rows = [("the trained encoder's " + best.removeprefix("the "), "best_mlp", init["best_mlp"],
             f"the random-init encoder's (t={init['best_t']:.2f})"),
            ("the trained encoder's best single-t MLP", "best_mlp", out["pixels"],
             "an MLP on the raw pixels")]
    if "gru" in out:  # the whole protocol ran
        rows += [("GRU", "gru", out["best_mlp"], best),
                 ("Transformer", "transformer", out["best_mlp"], "the best single-t MLP"),
                 ("GRU", "gru", out["gru_const"], "its constant-curve control"),
                 ("Transformer", "transformer", out["transformer_const"],
                  "its constant-curve control"),
                 ("MLP on the concatenated curve", "concat", out["best_mlp"],
                  "the best single-t MLP"),
                 ("Transformer", "transformer", init["transformer"],
                  "the same probe at random init")]
    if "continuous" in out:
        rows.append(("grid-free Transformer", "continuous", out["transformer"],
                     "the index Transformer"))
    return [verdict(name, out[key], b, b_name, out["chance"]) for name, key, b, b_name in rows]


def constant_curves(codes, best):
    """The constant-curve control: for each input v, its best single-t code (index best[v], chosen
    on validation) repeated at all T points. Same probe, same capacity, no trajectory.
    codes (V, N, T, D), best [V] -> (V, N, T, D)."""
    # (V, N, T, D)
    return torch.stack([codes[v][:, b:b + 1].expand_as(codes[v]) for v, b in enumerate(best)])


@torch.no_grad()
def continuous_on_grid(res, codes, labels, times):
    """Accuracy of the trained grid-free probes (the chosen one per seed) on codes (N, T', D) at
    `times` (T',), and their mean attention density over t."""
    mean, std = res["standardiser"]  # the training codes' statistics, pooled over t
    accs, dens = [], []
    # Per seed, the grouped model at its best epochs and the group (learning rate) chosen on
    # validation: evaluated on codes at times it never trained on.
    for model, group in res["chosen_models"]:
        groups = model.token.shape[0]  # (G, E): one group per learning rate
        acc, att = tr.evaluate_groups(model, ((codes - mean) / std)[None], labels, [0] * groups,
                                      times=times)
        accs.append(acc[group, 0].item())
        dens.append(tr.attention_density(att[group], times))
    accs = torch.tensor(accs)
    return dict(mean=accs.mean().item(), std=accs.std(unbiased=False).item(), seeds=accs.tolist(),
                times=times.tolist(), density=torch.stack(dens).mean(0).tolist())


def probe_target(a, name, k, data, cfg, log):
    """The whole table for one attribute a (named name, k classes). data: the codes by grid and
    encoder (see encode)."""
    lrs = cfg["lrs"]
    grid, init, fine, test_grids = data["grid"], data["init"], data["fine"], data["test_grids"]
    y_tr, y_te = grid["train"]["labels"][:, a], grid["test"]["labels"][:, a]
    if len(torch.unique(y_tr)) < 2:
        raise tr.UserError(f"attribute {name!r} has a single class in the training split: there is "
                           f"nothing to predict; probe a dataset with at least two classes")
    # A probe needs two classes in the part it learns from, not only in the whole training split.
    fit_idx, _ = tr.split_train_val(len(y_tr))  # the split run_probe_protocol makes
    if len(torch.unique(y_tr[fit_idx])) < 2:
        raise tr.UserError(f"attribute {name!r}: after a tenth of the {len(y_tr)} training images "
                           f"is held out for validation, the {len(fit_idx)} left hold a single "
                           "class, so the probes would learn nothing; give more images per class "
                           "(or a larger --max-train)")
    times = grid["train"]["times"]
    common = dict(lrs=lrs, epochs=cfg["epochs"], batch_size=cfg["batch_size"], width=cfg["width"],
                  max_groups=cfg["max_groups"] or None)

    def run(kind, xtr, xte, seeds, what=None, **kw):
        """One probe kind (named `what` in the progress lines) for every input x seed x learning
        rate, with a progress line around it (a kind can take minutes on a CPU)."""
        inputs = 1 if xtr.dim() == 3 else xtr.shape[0]
        log(f"[{name}] {what or kind} probes: {inputs} input(s) x {seeds} seed(s) x {len(lrs)} "
            f"learning rate(s), {cfg['epochs']} epochs ...", flush=True)
        start = time.time()

        def tick(done, total):  # after each chunk of groups: how far, and an ETA for the rest
            if done < total:
                spent = time.time() - start
                log(f"[{name}] {what or kind}: {done}/{total} chunks in {spent:.0f} s, ETA "
                    f"{spent * (total - done) / done:.0f} s", flush=True)
        res = tr.run_probe_protocol(kind, xtr, y_tr, xte, y_te, k, seeds=list(range(seeds)),
                                    progress=tick, **common, **kw)
        log(f"[{name}] {what or kind} done in {time.time() - start:.0f} s", flush=True)
        return res

    # The trained and the random-init encoder's codes are two inputs of one grouped program per
    # probe kind (and, for the curve probes, their constant-curve controls two more).
    # (2, N, T, D): trained, init
    x_tr = torch.stack([grid["train"]["codes"], init["train"]["codes"]])
    x_te = torch.stack([grid["test"]["codes"], init["test"]["codes"]])
    t0 = time.time()
    # 1. The per-t MLPs: where along the curve the attribute is read, and the best single point.
    mlp = run("mlp", x_tr, x_te, cfg["mlp_seeds"])
    out = dict(num_classes=k, chance=torch.bincount(y_te, minlength=k).max().item() / len(y_te))
    out["init"], best = {}, []
    for v, o in enumerate((out, out["init"])):
        b = int(mlp["val_mean"][v].argmax())  # chosen on VALIDATION accuracy, never on test
        best.append(b)
        per_t = {key: mlp[key][v].tolist() for key in ("val_mean", "lrs")}
        o.update(mlp=dict(mean=mlp["test_mean"][v].tolist(), std=mlp["test_std"][v].tolist(),
                          **per_t), best_t_index=b, best_t=times[b].item(),
                 best_mlp=dict(mean=mlp["test_mean"][v, b].item(),
                               std=mlp["test_std"][v, b].item()))
    if cfg["probes"] == "all":
        # 2. The curve read whole: the MLP on all T codes side by side and on their mean
        # (controls), then the GRU and the Transformer on the curve and on the constant curve.
        for kind in ("concat", "mean"):
            res = run(kind, x_tr, x_te, cfg["mlp_seeds"])
            out[kind], out["init"][kind] = summary(res, v=0), summary(res, v=1)
        # (4, N, T, D): curves, then constant
        seq_tr = torch.cat([x_tr, constant_curves(x_tr, best)])
        seq_te = torch.cat([x_te, constant_curves(x_te, best)])
        for kind in ("gru", "transformer"):
            res = run(kind, seq_tr, seq_te, cfg["seeds"])
            for v, o in enumerate((out, out["init"])):
                o[kind], o[kind + "_const"] = summary(res, v=v), summary(res, v=v + 2)
                if kind == "transformer":
                    # Figure 3: token's attention over the T points
                    o["attention"] = res["attention"][v].tolist()
    # 3. The control without any encoder: an MLP on the raw pixels.
    px = run("mlp", data["pixels"]["train"], data["pixels"]["test"], cfg["mlp_seeds"],
             what="pixel MLP")
    out["pixels"] = summary(px)
    if fine is not None and cfg["probes"] == "all":
        # 4. The grid-free probe: trained on random sub-grids of the fine grid, validated on the
        # grid's columns, then tested on grids of 5, 11 and 51 points and on random times.
        cols = (times / FINE_STEP).round().long()
        res = run("continuous", fine["train"]["codes"], grid["test"]["codes"], cfg["seeds"],
                  continuous=dict(fine_times=fine["train"]["times"], eval_cols=cols))
        out["continuous"] = summary(res)
        out["continuous_grids"] = {
            g: continuous_on_grid(res, d["codes"], d["labels"][:, a], d["times"])
            for g, d in test_grids.items()
        }
    out["seconds"] = time.time() - t0
    out["verdicts"] = verdicts(out)
    print_table(name, out, times, log)
    return out


def print_table(name, out, times, log):
    """The Figure 1 table of one attribute: the per-t MLPs (the best t starred), every other probe,
    each with its random-init control beside it, the pixel MLP, and the verdicts in words."""
    log(f"\n== target: {name} ({out['num_classes']} classes, majority-class rate "
        f"{100 * out['chance']:.1f}%) ==")
    log(f"{'probe':<36} {'trained encoder':>15}   {'random init':>13}   (test accuracy %, mean ± "
        "std over seeds)")
    init = out["init"]
    for i, t in enumerate(times.tolist()):
        mark = " *" if i == out["best_t_index"] else "  "
        mark_init = " *" if i == init["best_t_index"] else "  "
        log(f"{'MLP at t=%.2f' % t:<36} {fmt(out['mlp']['mean'][i], out['mlp']['std'][i])}{mark} "
            f"{fmt(init['mlp']['mean'][i], init['mlp']['std'][i])}{mark_init}")
    rows = [
        ("MLP on concatenated curve (ctrl)", "concat"),
        ("MLP on mean over t (ctrl)", "mean"),
        ("GRU", "gru"),
        ("  GRU on constant curve (ctrl)", "gru_const"),
        ("Transformer", "transformer"),
        ("  Transformer on constant curve", "transformer_const"),
        ("grid-free Transformer (11 pts)", "continuous"),
    ]
    for label, key in rows:
        if key in out:
            ctrl = fmt(init[key]["mean"], init[key]["std"]) if key in init else ""
            log(f"{label:<36} {fmt(out[key]['mean'], out[key]['std'])}   {ctrl}")
    log(f"{'MLP on raw pixels (ctrl)':<36} {fmt(out['pixels']['mean'], out['pixels']['std'])}")
    log("  * best single t, chosen on validation accuracy")
    if "continuous_grids" in out:
        log("grid-free Transformer on other grids: " + ", ".join(
            f"{g}: {fmt(v['mean'], v['std'])}" for g, v in out["continuous_grids"].items()))
    for v in out["verdicts"]:
        log("  " + v)


# ---- Figure 1 ----

def plot(result, path):
    """Figure 1 per attribute: accuracy of the per-t MLP against t, the curve probes as lines, and
    the controls. Each panel's y-axis spans its own data (a panel whose probes all sit at 99-100%
    would show nothing on 0-100), and one legend sits below the panels, off the curves.
    Redraw from a saved result: python -c "import json, probe; probe.plot(json.load(open(
    'runs/shapes-drl/results/probe.json')), 'probe.png')"."""
    plt = pyplot()
    targets = result["targets"]  # one panel per attribute
    fig, axes = plt.subplots(1, len(targets), figsize=(max(3.6 * len(targets), 6.5), 3.6),
                             squeeze=False)
    t = result["times"]
    styles = [("gru", "tab:blue", "-", "GRU"), ("gru_const", "tab:blue", ":",
                                                "GRU, constant curve"),
              ("transformer", "tab:red", "-", "Transformer"),
              ("transformer_const", "tab:red", ":", "Transformer, constant curve"),
              ("concat", "tab:green", "--", "MLP on the concatenated curve"),
              ("continuous", "tab:purple", "-.", "grid-free Transformer")]
    # The per-t MLP as points with error bars; every probe on the whole curve as a horizontal line
    # (it has no t); the random-init MLP per t in grey, the pixel MLP and the majority class as
    # reference lines.
    for ax, (name, out) in zip(axes[0], targets.items()):
        m, s = torch.tensor(out["mlp"]["mean"]) * 100, torch.tensor(out["mlp"]["std"]) * 100
        ax.errorbar(t, m, yerr=s, marker="o", color="k", label="MLP at t (trained encoder)")
        shown = m.tolist()
        for key, colour, ls, label in styles:
            if key in out:
                ax.axhline(100 * out[key]["mean"], color=colour, ls=ls, label=label)
                shown.append(100 * out[key]["mean"])
        init = [100 * v for v in out["init"]["mlp"]["mean"]]
        ax.plot(t, init, color="grey", ls="--", marker=".", label="MLP at t, random-init encoder")
        ax.axhline(100 * out["pixels"]["mean"], color="tab:orange", ls="--", lw=0.8,
                   label="MLP on pixels")
        ax.axhline(100 * out["chance"], color="grey", lw=0.8, label="majority class")
        low = min(shown + init + [100 * out["pixels"]["mean"], 100 * out["chance"]])
        high = max(shown + [100 * out["pixels"]["mean"]])
        # every probe near the top: zoom on them, controls noted in the title
        if high - min(shown) < 10:
            low = min(shown) - 1
        pad = max(0.5, 0.05 * (high - low))
        ax.set_ylim(max(0, low - pad), min(100, high + pad) + 0.2)
        zoomed = low > min(init + [100 * out["chance"]])
        ax.set(title=name + (f"\n(random init {max(init):.0f}%, below the axis)" if zoomed else ""),
               xlabel="t", ylabel="test accuracy (%)")
        ax.title.set_fontsize(9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(f"{result['dataset']} / {result['encoder']}: points vs trajectory (Figure 1)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    """probe.py: the protocol's flags checked, the run opened, its codes encoded (or read from the
    cache), every probe trained per attribute, the summary printed and probe.json / probe.png
    written."""
    args = parse_args(argv)
    cfg = protocol_config(PRESETS, args)
    times = check_protocol(cfg, args)
    t_start = time.time()
    # ---- the run: its trained encoder, the random-init control, and its images ----
    encoder, init_encoder, train_cfg, step, device, out_dir = open_run(args.run, args.device)
    if cfg.get("max_groups") is None:  # the chunk size that is fastest where the probes run
        cfg["max_groups"] = MAX_GROUPS["cpu" if device.type == "cpu" else "other"]
    splits = train.run_datasets(train_cfg, args.data_root, cfg["max_train"], cfg["max_test"],
                                seed=0)
    attrs = splits["train"].attributes
    targets = list(attrs) if (args.target or "all") == "all" else [args.target]
    if any(t not in attrs for t in targets):
        raise tr.UserError(f"--target must be one of {', '.join(attrs)} or all, "
                           f"got {args.target!r}")
    # ---- the codes: every grid the probes read, encoded once and cached in <run>/cache ----
    data = encode(args, cfg, splits, (encoder, init_encoder), step, times, device)
    # How far the codes move along t, relative to the spread between images: a curve that barely
    # moves is one point in disguise, and no probe of it can beat its best point.
    movement = {}
    for key in ("grid", "init"):
        along, across = tr.curve_movement(data[key]["train"]["codes"])
        movement[key] = dict(along=along, across=across, ratio=along / max(across, 1e-12))
    print("curve movement (std over t / std between images): trained "
          f"{movement['grid']['ratio']:.3f}, random init {movement['init']['ratio']:.3f}")
    n_train, n_pixels = data["pixels"]["train"].shape[0], data["pixels"]["train"].shape[-1]
    print(f"probes learn from {n_train} images (a tenth of them for validation); the pixel MLP has "
          f"{n_pixels} inputs and needs more images than one on a code of "
          f"{data['grid']['train']['codes'].shape[-1]} numbers: a small set favours the code "
          "(docs/results.md, 'How much shape does the code hold?')")
    # ---- the probes, attribute by attribute, with an ETA for the rest ----
    result = dict(run=args.run, step=step, dataset=train_cfg["dataset"],
                  encoder=train_cfg["encoder"], times=times.tolist(), protocol=cfg,
                  movement=movement, targets={})
    t_probes = time.time()
    for i, name in enumerate(targets):
        a = attrs.index(name)
        result["targets"][name] = probe_target(a, name, splits["train"].num_classes[a], data, cfg,
                                               print)
        per_target = (time.time() - t_probes) / (i + 1)
        if i + 1 < len(targets):  # the attributes cost about the same: a simple ETA for the rest
            print(f"[{i + 1}/{len(targets)} attributes done; ETA "
                  f"{per_target * (len(targets) - i - 1) / 60:.1f} min for "
                  f"{', '.join(targets[i + 1:])}]", flush=True)
    result["wall_time_s"] = time.time() - t_start
    # ---- the summary, the JSON and Figure 1 ----
    print_summary(result)
    # a quick table never replaces a full one
    stem = "probe" if cfg["probes"] == "all" else "probe_mlp"
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(out_dir, stem + ".png"))
    print(f"\nwrote {out_dir}/{stem}.json and {stem}.png in {result['wall_time_s'] / 60:.1f} min")


def check_protocol(cfg, args):
    """Impossible protocol flags end with one sentence before any work; returns the grid of
    times."""
    if min(cfg["epochs"], cfg["seeds"], cfg["mlp_seeds"], cfg["width"],
           cfg["batch_size"]) <= 0 or cfg["num_times"] < 2:
        raise tr.UserError("--epochs, --seeds, --mlp-seeds, --width and --batch-size must be "
                           "positive and --num-times at least 2")
    if not all(lr > 0 and math.isfinite(lr) for lr in cfg["lrs"]):
        raise tr.UserError(f"--lrs must be positive numbers, got {cfg['lrs']}")
    if cfg["max_train"] < 0 or cfg["max_test"] < 0 or (cfg.get("max_groups") or 0) < 0:
        raise tr.UserError("--max-train, --max-test and --max-groups must be 0 (all) or positive")
    times = torch.tensor(args.times) if args.times else tr.paper_times(args.num_times)
    finite_in_range = bool(torch.isfinite(times).all()) and times.min() >= 0 and times.max() <= 1
    if len(times) < 2 or not finite_in_range or not bool((times[1:] > times[:-1]).all()):
        raise tr.UserError("--times must be at least 2 increasing finite values in [0, 1], e.g. "
                           "0,0.5,1")
    return times


def encode(args, cfg, splits, encoders, step, times, device):
    """Every input the probes read, on `device`: the trained codes on the grid (`grid`) and on the
    fine grid of the grid-free probe (`fine`, train split), the random-init codes (`init`), the raw
    pixels, and the test codes on the grid-free probe's other test grids (`test_grids`). Codes are
    cached in <run>/cache (tagged by the encoder's step, or `init`)."""
    trained, init = encoders

    def codes(split, grid, control=False):
        """The codes of one split on one grid, from the cache when there, moved to `device`."""
        c = tr.cached_trajectories(args.run, init if control else trained, splits[split], split,
                                   grid, "init" if control else f"step{step}",
                                   log=lambda m: print(m, flush=True))
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in c.items()}

    fine_times = torch.linspace(0, 1, int(round(1 / FINE_STEP)) + 1)
    on_fine = cfg["probes"] == "all" and not args.no_continuous and bool(torch.isclose(
        (times / FINE_STEP).round() * FINE_STEP, times, atol=1e-6).all())
    if cfg["probes"] == "all" and not args.no_continuous and not on_fine:
        print(f"the grid-free probe needs the grid on multiples of {FINE_STEP}; skipping it for "
              "these --times")
    # The fine grid first: the regular grid is then sliced from its cache instead of encoded again.
    data = dict(fine={"train": codes("train", fine_times)} if on_fine else None, test_grids={})
    data["grid"] = {s: codes(s, times) for s in ("train", "test")}
    data["init"] = {s: codes(s, times, control=True) for s in ("train", "test")}
    # (N, 1, C*H*W)
    data["pixels"] = {s: tr.dataset_tensors(splits[s])[0].flatten(1)[:, None].to(device)
                      for s in ("train", "test")}
    if on_fine:  # the grid-free probe is tested on grids it never saw
        rand_times = torch.rand(11, generator=torch.Generator().manual_seed(0)).sort().values
        for name, grid in (
            ("5", tr.paper_times(5)),
            ("11", tr.paper_times(11)),
            ("51", tr.paper_times(51)),
            ("random11", rand_times),
        ):
            data["test_grids"][name] = codes("test", grid)
    return data


def print_summary(result):
    """Where each attribute is best read, beside its random-init and pixel controls."""
    print("\nwhere each attribute is best read (best single-t MLP, chosen on validation):")
    for name, out in result["targets"].items():
        print(f"  {name:<10} t={out['best_t']:.2f}: "
              f"{fmt(out['best_mlp']['mean'], out['best_mlp']['std'])} (random init "
              f"{fmt(out['init']['best_mlp']['mean'], out['init']['best_mlp']['std'])} at "
              f"t={out['init']['best_t']:.2f}; pixels "
              f"{fmt(out['pixels']['mean'], out['pixels']['std'])}; majority "
              f"{100 * out['chance']:.1f})")


# ---- helpers that analyze.py shares ----

def protocol_config(presets, args):
    """The preset named by --preset, with every flag given on the command line over it."""
    return {**presets[args.preset], **{k: v for k, v in vars(args).items() if v is not None}}


def open_run(run, device_name):
    """A run folder of train.py, opened for reading its encoders and writing its results: the
    device, the trained encoder and its random-init control, and <run>/results, checked writable
    (with <run>/cache) before any work. -> (encoder, init encoder, train config, step, device,
    results folder)."""
    if os.path.isfile(run):
        raise tr.UserError(f"{run} is a file; give the run FOLDER that holds ckpt.pt "
                           f"(e.g. {os.path.dirname(run) or '.'})")
    device = tr.pick_device(device_name)
    encoder, init_encoder, train_cfg, step = tr.load_encoders(run, device)
    out_dir = os.path.join(run, "results")
    tr.check_writable(out_dir, os.path.join(run, "cache"))  # before the work, not after it
    return encoder, init_encoder, train_cfg, step, device, out_dir


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported only where a
    figure is drawn: the library and the probes never need matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


if __name__ == "__main__":
    try:
        main()
    except tr.UserError as e:
        sys.exit(f"error: {e}")

"""How information changes along the trajectory: the NMI matrix (Figure 2), attention (Figure 3),
and where classes separate along the curve (paper eq. 5).

For a run of train.py and its control (the encoder at its random initialisation): MINE
(trajrep.nmi_matrix) between the training codes at every two points of the trajectory, NMI(i, j) =
I(i;j) / sqrt(I(i;i) I(j;j)), and its decay away from the diagonal, over seeds with the spread,
against the same for an invertible control (a curve whose points all carry the same information)
and beside a measure that needs no training (the Gaussian MI, trajrep.gaussian_mi_matrix).
Where probe.py has run, also the single-layer Transformer's attention over t (Figure 3) and, per
attribute, accuracy, attention and class separation along t. The findings are written in words.

    python train.py && python probe.py runs/shapes-drl && python analyze.py runs/shapes-drl
    python analyze.py runs/cifar10-vdrl --preset paper --device cuda   # the published MINE budget

NMI is the published code's HEURISTIC: continuous codes have no finite entropy, so MINE's I(X;X)
stands in for H(X); the diagonal is about 1 by construction and values compare only at one MINE
budget. Read the matrix for its shape (how fast NMI decays with |i - j|).

Writes <run>/results/nmi.json, nmi.png, attention.png and attributes.png.
"""
import argparse
import json
import math
import os
import time

import torch

import trajrep as tr

# MINE budget: `paper` is the published setting (section 3.2), `cpu` minutes on 2 cores for the
# 11 x 11 pairs. NMI depends on the budget: compare matrices of one preset only.
PRESETS = {
    "cpu": dict(steps=800, batch_size=256, lr=1e-3, hidden=64, seeds=2, max_train=3000),
    "paper": dict(steps=20000, batch_size=256, lr=1e-4, hidden=256, seeds=5, max_train=0),
}

def parse_args(argv):
    """The command line, with the MINE flags checked: impossible values end with one sentence
    before any work. Unset MINE flags take the --preset's values. Returns (args, MINE config)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="run folder of train.py (holding ckpt.pt)")
    p.add_argument("--claims", nargs="+", metavar="RUN", help="judge the claims over runs of "
                   "one command with other --seed by docs/method.md's decision rules: the MLP "
                   "claims where probe.py --probes mlp ran on each, Figure 1's curve probes, "
                   "Figure 3 and the grid-free probe where probe.py ran whole, Figure 2 where "
                   "analyze.py did; writes docs/claims.json")
    p.add_argument("--window", type=int, default=0, help="with --claims: rule 1 revised, the mean "
                   "of this many read-outs against the as many before (4), and rule 11; writes "
                   "docs/claims_window<N>.json (0, the default: rule 1 as first fixed)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="cpu (default) or "
                   "paper: the MINE flags below default to its values")
    for key, kind, text in (("steps", int, "MINE training steps"),
                            ("batch_size", int, "MINE batch size"),
                            ("lr", float, "MINE Adam learning rate"),
                            ("hidden", int, "statistics-network width"),
                            ("seeds", int, "seeds to average"),
                            ("max_train", int, "use at most this many training images, 0 = all")):
        values = ", ".join(f"{name} {preset[key]:g}" for name, preset in PRESETS.items())
        p.add_argument("--" + key.replace("_", "-"), type=kind, help=f"{text} ({values})")
    p.add_argument("--num-times", type=int, default=11, help="regular grid on [0, 1] (paper 11)")
    p.add_argument("--data-root", help="where the run's dataset lies, if it has moved")
    p.add_argument("--device", default="auto", help="for encoding and MINE: auto, cpu, cuda, mps")
    args = p.parse_args(argv)
    cfg = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if v is not None}}
    if cfg["steps"] <= 0 or cfg["seeds"] <= 0 or cfg["hidden"] <= 0 or not 0 < cfg["lr"] < math.inf:
        raise tr.UserError("--steps, --seeds, --hidden and --lr must be positive (--lr finite)")
    if 0 < cfg["max_train"] < 10:  # MINE holds out a fifth of the rows to estimate on
        raise tr.UserError("--max-train must be 0 (all) or at least 10 images")
    if cfg["batch_size"] < 16:  # the DV bound's log-mean-exp needs rows to average
        raise tr.UserError(f"--batch-size must be at least 16, got {cfg['batch_size']}: MINE's "
                           "bound averages exp(T) over a batch of shuffled pairs")
    return args, cfg

def mine_curves(codes, cfg, device, run):
    """The curves (see mine_curve) of the trained codes, of the random-init codes, and of the
    invertible control: the trained codes at t = 0 carried along t by tr.invertible_curve, its step
    set so that the control moves as much as the trained curve (along t against across images), so
    that every two of its points carry the same information. The random-init curve does not depend
    on the trained encoder: it is cached under its codes and the MINE budget, and a later checkpoint
    of the run reads it instead of training its MINE networks again."""
    budget = [cfg[k] for k in ("steps", "batch_size", "lr", "hidden", "seeds", "num_times")]
    budget.append("gaussian_by_lag")  # what the cached curve holds
    x = codes["trained"]["codes"]  # (N, T, D)
    z = (x[:, 0] - x[:, 0].mean(0)) / x[:, 0].std(0).clamp_min(1e-6)  # (N, D)
    ratio = lambda c: (lambda along, across: along / across)(*tr.curve_movement(c))
    mean, std = tr.standardiser_stats(x, per_time=False)
    target = ratio((x - mean) / std)  # the trained curve's movement, scaled as MINE reads it
    low, high = 0.0, 0.99  # bisection on the step: the control's movement grows with it
    for _ in range(20):
        step = (low + high) / 2
        low, high = (step, high) if ratio(tr.invertible_curve(z, x.shape[1], step)) < target \
            else (low, step)
    curves = dict(trained=mine_curve("trained", x, cfg, device),
                  control=dict(mine_curve("invertible control", tr.invertible_curve(
                      z, x.shape[1], step), cfg, device), step=step, target=target))
    curves["random init"] = tr.cached_result(
        run, "control-nmi", [codes["random init"]["codes"]], budget, lambda: mine_curve(
            "random init", codes["random init"]["codes"], cfg, device,
            eta=curves["trained"]["seconds"]))
    return {name: {k: torch.tensor(v) if isinstance(v, list) else v for k, v in c.items()}
            for name, c in curves.items()}

def mine_curve(name, codes, cfg, device, eta=None):
    """How far the curves of codes (N, T, D) move, and the NMI matrix of each MINE seed (S, T, T)
    with their mean and the mean MI in nats, estimated on `device`; as lists (JSON-able)."""
    steps, seeds = cfg["steps"], cfg["seeds"]
    print(f"MINE on the {name} codes: {cfg['num_times'] ** 2} pairs x {seeds} seed(s), {steps} "
          "steps" + (f" (ETA {eta / 60:.1f} min, as long as the trained codes took)" if eta else
                     " ..."), flush=True)
    # One scale per dimension, pooled over t: the same invertible map at every t keeps every
    # pair's MI, and MINE's optimisation needs scaled input.
    x = codes.to(device)
    mean, std = tr.standardiser_stats(x, per_time=False)
    start = time.time()

    def tick(done, total):  # at every tenth of the steps of all seeds: how far, and an ETA
        spent = time.time() - start
        if done < total:
            print(f"  {name}: {done}/{total} MINE steps in {spent:.0f} s, ETA "
                  f"{spent * (total - done) / done:.0f} s", flush=True)
    nmis, mis = tr.nmi_matrix((x - mean) / std, tuple(range(seeds)), tick, steps=steps,
                              batch_size=cfg["batch_size"], lr=cfg["lr"], hidden=cfg["hidden"])
    nmis, mis = nmis.cpu(), mis.cpu()  # (S, T, T) each
    print(f"{name}: done in {time.time() - start:.1f} s; NMI next to the diagonal "
          f"{', '.join(f'{lag_profile(n)[0]:.3f}' for n in nmis)} (per seed)", flush=True)
    if torch.isnan(nmis).any():  # MINE's I(X;X) about zero at some t: no entropy stand-in
        raise tr.UserError(f"MINE's estimate of I(X;X) was about zero at some t ({name} codes), "
                           "so NMI is undefined there; raise --steps (or --lr) and run again")
    along, across = tr.curve_movement(codes)
    gaussian = tr.gaussian_mi_matrix(codes).float()  # (T, T), infinite on the diagonal
    return dict(along=along, across=across, nmis=nmis.tolist(), nmi_mean=nmis.mean(0).tolist(),
                mi=mis.mean(0).tolist(), seconds=time.time() - start,
                gaussian_by_lag=lag_profile(gaussian).tolist())

# ---- Claims over encoders trained with other seeds (the decision rules of docs/method.md) ----

def read_json(path):
    """A JSON file's contents (the file closed at once)."""
    with open(path) as f:
        return json.load(f)

def learnt(run, window=0):
    """Rule 1: whether the monitor's best-t accuracy on the first attribute (shape, on `shapes`)
    moved by less than 3 points over the run's last 3000 steps; window > 0, the revision made after
    the second round's results (reported beside rule 1, not in its place): the mean of the last
    `window` readouts against that of the `window` before."""
    if not os.path.exists(os.path.join(run, "metrics.jsonl")):
        raise tr.UserError(f"{run} holds no metrics.jsonl: give runs of train.py")
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    # (step, the first attribute's accuracy at its best t) of every readout of the monitor
    best = [(r["step"], max(next(iter(r["readout"].values())))) for r in rows if "readout" in r]
    acc = [a for _, a in best]
    if window:  # the last `window` readouts' mean against that of the `window` before
        moved = math.inf if len(acc) < 2 * window else (
            sum(acc[-window:]) - sum(acc[-2 * window:-window])) / window
    else:  # the last readout against the latest one 3000 steps or more before it
        before = [a for step, a in best if step <= best[-1][0] - 3000] if best else []
        moved = acc[-1] - before[-1] if before else math.inf
    return abs(moved) < 0.03, acc, best[-1][0] if best else None  # the readouts, the last step

MIN_ENCODERS = 3  # fewer encoders: every verdict "inconclusive" (docs/method.md, third round)

def verdict(t, critical, n, interval=None):
    """Rules 2, 5 and 7: "supported" where the paired t exceeds its critical value and the
    interval (rule 5; rule 7 has none) lies above 0, "not supported" where -t does and it lies
    below 0, "inconclusive" otherwise and with fewer than MIN_ENCODERS encoders."""
    above, below = (True, True) if interval is None else (interval[0] > 0, interval[1] < 0)
    return ("inconclusive" if n < MIN_ENCODERS else "supported" if t > critical and above else
            "not supported" if -t > critical and below else "inconclusive")

# The claims of rules 2, 3 and 6 per attribute: (rule, probe A, its row in an attribute's table
# of probe.json, control B, its row). "6, beside" is reported, not deciding (rule 6).
MLP, CAT = "the trained encoder's best single-t MLP", "the MLP on the concatenated curve"
PAIRS = [(2, MLP, "best_mlp", "the random-init encoder's", lambda o: o["init"]["best_mlp"]),
         (3, MLP, "best_mlp", "an MLP on the raw pixels", lambda o: o["pixels"]),
         (6, CAT, "concat", "the same MLP on its constant curve", lambda o: o["concat_const"]),
         ("6, beside", CAT, "concat", "the best single-t MLP", lambda o: o["best_mlp"])]

def right(row):
    """Per test image, the fraction of a probe row's seeds that get it right (N,)."""
    return torch.tensor([[c == "1" for c in s] for s in row["correct"]],
                        dtype=torch.float64).mean(0)

def paired_claim(claim, rule, rows, shared, control, margin=0.0):
    """Rules 2 and 5 for "A beats B" (rule 10: "A is no worse than B by more than margin"): rows,
    per encoder (A's row, B's row) of probe tables; the paired t over encoders and the paired
    bootstrap over test images of the differences plus margin decide. d, D and the interval are
    the differences themselves."""
    d = torch.tensor([ra["mean"] - rb["mean"] for ra, rb in rows], dtype=torch.float64)  # (n,)
    t, crit = tr.paired_t(d + margin)  # over encoders
    big, interval = tr.paired_bootstrap([right(ra) - right(rb) for ra, rb in rows], shared)
    shifted = [i + margin for i in interval]  # what the margin makes of the interval
    return dict(claim=claim, rule=rule, verdict=verdict(t, crit, len(d), shifted),
                test="one-sided paired t over encoders, and the paired bootstrap over test images "
                "pooled over encoders (95% interval)", statistic=t, critical=crit, d=d.tolist(),
                D=big, interval=interval, n_encoders=len(d), control=control,
                deciding="beside" not in str(rule), shared_test_images=shared,
                n_seeds=min(len(r["correct"]) for pair in rows for r in pair),
                **(dict(margin=margin) if margin else {}))

def claims(runs, out="docs/claims.json", window=0):
    """The claims over runs of one command with other seeds, by docs/method.md's decision rules:
    rules 2-6 per attribute on probe.py --probes mlp's table (each pair of PAIRS by the paired t
    over encoders and the paired bootstrap over test images, and where the attribute is read
    best), rule 7 on analyze.py's nmi.json, rules 8-10 on the whole protocol's probe.json.
    Runs are judged per dataset and encoder (DRL, VDRL); window: rule 1's revision (see learnt)."""
    tables = {}  # dataset -> run -> its table per attribute, for the learnt runs only
    whole = {}  # dataset -> run -> its whole-protocol tables, by budget (rules 8-10)
    for run in runs:
        ok, monitor, step = learnt(run, window)
        print(f"{run}: {'learnt' if ok else 'not read, rule 1 not met'} (monitor's last "
              f"readouts {', '.join(f'{a:.2f}' for a in monitor[-4:])})")
        # the table of the run's last step: the quick one (--probes mlp) first, as the rules say
        paths = [os.path.join(run, "results", f"{s}.json") for s in ("probe_mlp", "probe")]
        found = [r for r in map(read_json, filter(os.path.exists, paths)) if r["step"] == step]
        if ok and not found:
            raise tr.UserError(f"{run} has no results/probe_mlp.json or probe.json of its last "
                               f"step ({step}): run probe.py on it first")
        if ok:  # DRL and VDRL encoders are judged apart, and each --texture-mix (rule 11)
            mix = found[0].get("texture_mix", 0.5)
            group = found[0]["dataset"] + (" (VDRL)" if found[0].get("encoder") == "vdrl" else "") \
                + (f" (texture-mix {mix:g})" if mix != 0.5 else "")
            tables.setdefault(group, {})[run] = found[0]
            # rules 8-10: the whole protocol's tables, by budget (rule 8's first one kept apart)
            paths = [os.path.join(run, "results", f"{s}.json") for s in ("probe_e10", "probe")]
            whole.setdefault(group, {})[run] = [r for r in map(read_json, filter(
                os.path.exists, paths)) if r["step"] == step and r["protocol"].get("probes")
                                                == "all"]
    verdicts = []  # one dict per claim: the rows of claims.json
    attributes = [(k, n) for k, g in tables.items() for n in next(iter(g.values()))["targets"]]
    for dataset, name in attributes:
        keys = {r.get("test_key") for r in tables[dataset].values()}  # which test images
        shared = len(keys) == 1 and None not in keys  # the same ones for every encoder
        outs = [r["targets"][name] for r in tables[dataset].values()]  # the table per encoder
        for rule, a_name, a, b_name, control in PAIRS:
            try:  # per encoder, the rows of A and B
                rows = [(o[a], control(o)) for o in outs]
            except KeyError as e:
                raise tr.UserError(f"a table of {name} lacks {e}: run this version's probe.py on "
                                   "each run") from None
            verdicts.append(paired_claim(f"{dataset} / {name}: {a_name} beats {b_name}", rule,
                                         rows, shared, b_name))
        best = sorted(round(o["best_t"], 2) for o in outs)  # each encoder's, chosen on validation
        median = (best[(len(best) - 1) // 2] + best[len(best) // 2]) / 2
        spread = max(abs(b - median) for b in best)  # one encoder says nothing of agreement
        verdicts.append(dict(claim=f"{dataset} / {name}: is read best at one t for every encoder",
                             rule=4, test="every encoder's best t within 0.2 of their median",
                             statistic=spread, best_t=best, n_encoders=len(best), median=median,
                             verdict="inconclusive" if len(best) < MIN_ENCODERS else "supported" if
                             spread <= 0.2 + 1e-9 else "not supported"))
        found = whole_budgets(whole[dataset], name)
        if isinstance(found, str):
            print(f"{dataset} / {name}: rules 8-10 not judged ({found})")
            continue
        try:
            verdicts += whole_claims(f"{dataset} / {name}", *found)
        except KeyError as e:
            raise tr.UserError(f"a probe.json table of {name} lacks {e}: run this version's "
                               "probe.py on each run") from None
    verdicts += decay_claims(tables) + (contrast_claims(tables) if window else [])  # rule 11:
    # rule 1 revised only
    command = "python analyze.py --claims " + " ".join(runs) + (f" --window {window}" if window
                                                               else "")  # in every row, as asked
    result = dict(runs=list(runs), learnt={k: list(g) for k, g in tables.items()},
                  claims=[dict(v, command=command) for v in verdicts], rule_1_window=window)
    tr.atomic_save(result, out)
    print(f"{claims_text(result)}\nwrote {out}")

# Rules 8-10 on the whole protocol: (the key of a curve probe in probe.json, its name)
SEQUENCE = (("gru", "the GRU"), ("transformer", "the Transformer"))
MIDDLE = (0.3, 0.7)  # rule 9: the middle of the curve, the paper's "around t = 0.5"

def whole_budgets(found, name):
    """Rules 8-10's tables of attribute `name`. found: per learnt run, its whole-protocol tables by
    budget (probe_e10.json, then probe.json). Returns (budgets: per budget its epochs and the table
    per encoder, the times (T,), whether the encoders share their test images), or why not."""
    if not all(found.values()):
        return "they need probe.py's whole protocol on every learnt run's last step"
    if len({len(w) for w in found.values()}) > 1:
        return "each run needs the same budgets: rule 8's probe_e10.json beside probe.json on all"
    budgets = []
    for level in zip(*found.values()):  # one budget: each run's table
        epochs = {w["protocol"].get("epochs") for w in level}
        if len(epochs) > 1 or (budgets and budgets[-1][0] >= min(epochs)):
            return "each budget needs one number of epochs, the cpu protocol's first"
        if any(name not in w["targets"] for w in level):
            return f"a table lacks {name}: probe every run with --target all or {name}"
        budgets.append((epochs.pop(), [w["targets"][name] for w in level]))
    if len({tuple(w["times"]) for w in level}) > 1:
        return "the runs were probed at different times"
    keys = {w.get("test_key") for w in level}  # which test images
    return budgets, level[0]["times"], len(keys) == 1 and None not in keys

def whole_claims(prefix, budgets, times, shared):
    """Rules 8-10 for one attribute. budgets: per budget (the cpu protocol's first), its epochs
    and the table per encoder. Rule 8: each curve probe against itself on the constant curve, at
    the first budget where it reads the constant curve within 1 point of the best single-t MLP on
    every encoder; rule 9: the single-layer probe's attention on the middle of the curve against
    random init; rule 10: the grid-free probe on unseen grids against the regular 11 points
    (margin 1 point)."""
    rows = []
    for key, name in SEQUENCE:
        # per budget, each encoder's constant-curve probe minus its best single-t MLP (n,)
        gaps = [[o[key + "_const"]["mean"] - o["best_mlp"]["mean"] for o in outs]
                for _, outs in budgets]
        reaches = [min(g) >= -0.01 - 1e-9 for g in gaps]  # no encoder more than 1 point below
        level = reaches.index(True) if any(reaches) else len(budgets) - 1
        epochs, outs = budgets[level]
        if not reaches[level] and len(budgets) == 1:
            print(f"{prefix}: {name} does not reach the MLP on the same code: rule 8 probes "
                  "every run again with --epochs 30, the first probe.json kept as probe_e10.json")
        row = paired_claim(f"{prefix}: {name} on the curve beats the same probe on its constant "
                           "curve", 8, [(o[key], o[key + "_const"]) for o in outs], shared,
                           "the same probe on its constant curve")
        row.update(epochs=epochs, reached=reaches[level], reach_gap=gaps[level])
        if not reaches[level]:  # a probe short of the MLP on the same code is not read
            row["verdict"] = "inconclusive"
        beside = paired_claim(f"{prefix}: {name} on the curve beats the best single-t MLP",
                              "8, beside", [(o[key], o["best_mlp"]) for o in outs], shared,
                              "the best single-t MLP")
        rows += [row, dict(beside, epochs=epochs)]
    outs = budgets[0][1]  # rules 9 and 10: the cpu protocol's table
    middle = torch.tensor([MIDDLE[0] - 1e-6 <= t <= MIDDLE[1] + 1e-6 for t in times])
    attention = lambda probe: torch.tensor(probe["attention_seeds"]).mean(0)  # over seeds (T,)
    trained = [attention(o["attention_probe"]) for o in outs]
    init = [attention(o["init"]["attention_probe"]) for o in outs]
    d = torch.stack([a[middle].sum() - b[middle].sum() for a, b in zip(trained, init)]).double()
    t, crit = tr.paired_t(d)
    rows.append(dict(
        claim=f"{prefix}: the single-layer Transformer attends more to the middle of the curve "
        f"(t = {MIDDLE[0]}-{MIDDLE[1]}) than on the random-init encoder", rule=9, statistic=t,
        critical=crit, d=d.tolist(), mass_gain=d.mean().item(), n_encoders=len(d),
        peak_t=[round(times[int(a.argmax())], 2) for a in trained],  # beside it, not deciding
        test="one-sided paired t over encoders (the attention is saved as its mean over images)",
        verdict=verdict(t, crit, len(d)), n_seeds=min(len(p["attention_seeds"]) for o in outs
                                                      for p in (o["attention_probe"],
                                                                o["init"]["attention_probe"])),
        control="the same probe on the random-init encoder", deciding=True))
    grids = lambda o: o.get("continuous_grids", {})
    if not all(grids(o) and all("correct" in g for g in grids(o).values()) for o in outs):
        print(f"{prefix}: rule 10 not judged (it needs the grid-free probe of this version's "
              "probe.py on every run)")
        return rows
    for grid, words in (("51", "51 regular points"), ("random11", "11 random times")):
        rows.append(paired_claim(
            f"{prefix}: the grid-free probe on {words} (unseen) reads no more than 1 point below "
            "its reading on the regular 11", 10, [(grids(o)[grid], grids(o)["11"]) for o in outs],
            shared, "the same probe on the regular 11 points", margin=0.01))
    rows.append(paired_claim(
        f"{prefix}: the grid-free probe on the regular 11 points reads no more than 1 point "
        "below the Transformer on that fixed grid", "10, beside",
        [(grids(o)["11"], o["transformer"]) for o in outs], shared, "the Transformer on the fixed "
        "grid", margin=0.01))
    return rows

def decay_claims(tables):
    """Rule 7, where every learnt run of a group has analyze.py's nmi.json of its last step, all of
    one MINE budget of at least 2 seeds, each control moving as much as its trained curve (within
    1%): per encoder, NMI's fitted fall (fitted_fall, mean over MINE seeds) on the trained curve
    minus that on its invertible control, by the paired t over encoders. Reported beside it, not
    deciding: the fall as first fixed (lag 1 minus lag T-1) and the Gaussian MI's (nats)."""
    rows, budget = [], ("steps", "batch_size", "lr", "hidden", "seeds", "max_train", "num_times")
    for group, found in tables.items():
        paths = [os.path.join(run, "results", "nmi.json") for run in found]
        results = [read_json(p) for p in paths if os.path.exists(p)]
        control = [r.get("invertible_control", {}) for r in results]
        moved = [c.get("std_along_t", 0) / c.get("std_between_images", 1) for c in control]
        if (len(results) < len(paths) or len({tuple(r["mine"][k] for k in budget) for r in
                                               results}) > 1 or min(r["mine"]["seeds"] for r in
                                                                     results) < 2
                or any(r["step"] != found[run]["step"] or "nmi_fitted_fall" not in r or
                       abs(m / c.get("trained_movement", math.inf) - 1) > 0.01
                       for r, run, c, m in zip(results, found, control, moved))):
            print(f"{group}: rule 7 not judged (it needs analyze.py of this version, one budget "
                  "of 2 or more MINE seeds, on every learnt run's last step)")
            continue
        for rule, name, fall in (
                (7, "NMI (MINE; the line through all lags)", lambda r: r["nmi_fitted_fall"]),
                ("7, as first fixed", "NMI (MINE; lag 1 against lag T-1)", lambda r: r["nmi_fall"]),
                ("7, beside", "the Gaussian MI (nats)", lambda r: dict(
                    mean=r["gaussian_mi_by_lag"][0] - r["gaussian_mi_by_lag"][-1]))):
            d = torch.tensor([fall(r)["mean"] - fall(c)["mean"] for r, c in zip(results, control)],
                             dtype=torch.float64)
            t, crit = tr.paired_t(d)
            rows.append(dict(
                claim=f"{group}: {name} falls more along the trained curve than along its "
                "invertible control", rule=rule, statistic=t, critical=crit, d=d.tolist(),
                fall=d.mean().item(), n_encoders=len(d), deciding=rule == 7,
                test="one-sided paired t over encoders (MINE's estimate is not per image)",
                verdict=verdict(t, crit, len(d)), n_seeds=results[0]["mine"]["seeds"],
                control="the trained t = 0 codes carried along t by invertible maps"))
    return rows

# Rule 11: the texture is drowned where sigma(t) = k c for its contrast c, whatever k, so t moves by
# 1 / ln(sigma_max / sigma_min) per unit of ln c (the cpu preset's sigmas, 0.01 and 50)
PREDICTED_SLOPE = 1 / math.log(50 / 0.01)

def entering_t(acc, times):
    """Rule 11: where a per-t accuracy profile acc (T,) first reaches h = (min + max) / 2 after its
    earliest minimum, linear from the grid point before; None where it does not rise (its earliest
    maximum is not after its earliest minimum)."""
    lo, hi = acc.index(min(acc)), acc.index(max(acc))
    if hi <= lo:
        return None
    h = (acc[lo] + acc[hi]) / 2
    k = next(i for i in range(lo + 1, len(acc)) if acc[i] >= h)  # acc[k - 1] < h <= acc[k]
    return times[k - 1] + (times[k] - times[k - 1]) * (h - acc[k - 1]) / (acc[k] - acc[k - 1])

def contrast_claims(tables):
    """Rule 11, where `shapes` DRL encoders of two or more --texture-mix were read: the
    least-squares slope of each encoder's entering t (texture, per-t MLP; encoders whose profile
    rises by 5 points or more) on ln(mix), one-sided t on n - 2 degrees of freedom; "supported" if
    its lower bound is above 0 and its upper bound reaches half the predicted slope, "not supported"
    if the upper bound stays below that half."""
    runs = [(run, r) for found in tables.values() for run, r in found.items() if r["dataset"] ==
            "shapes" and r.get("encoder") != "vdrl" and "texture" in r["targets"]]
    if len({r.get("texture_mix", 0.5) for _, r in runs}) < 2:
        return []  # no sweep of the contrast
    mixes = {}  # mix -> per encoder (run, rise of the profile, entering t or None)
    for run, r in runs:
        acc = r["targets"]["texture"]["mlp"]["mean"]
        rise = max(acc) - min(acc)
        mixes.setdefault(r.get("texture_mix", 0.5), []).append(
            (run, rise, entering_t(acc, r["times"]) if rise >= 0.05 - 1e-9 else None))
    points = [(math.log(m), t) for m, rows in mixes.items() for _, _, t in rows if t is not None]
    enough = sum(sum(t is not None for *_, t in rows) >= 2 for rows in mixes.values()) >= 2
    n, fit = len(points), {}  # the fit: none with too few encoders read
    if enough:  # then n >= 4: the slope and its standard error on n - 2 degrees of freedom
        x, y = torch.tensor(points, dtype=torch.float64).T  # (n,) each
        sxx = ((x - x.mean()) ** 2).sum()
        b = (((x - x.mean()) * (y - y.mean())).sum() / sxx).item()
        rss = ((y - y.mean() - b * (x - x.mean())) ** 2).sum()
        se, q = (rss / (n - 2) / sxx).sqrt().item(), tr.T95[min(n - 2, len(tr.T95)) - 1]
        if se > 1e-12:  # a perfect fit has no error to test against
            fit = dict(statistic=b / se, critical=q, slope=b, bounds=[b - q * se, b + q * se])
    low, high = fit.get("bounds", (0.0, math.inf))
    verdict = ("inconclusive" if not fit else "supported" if low > 0 and high >= PREDICTED_SLOPE / 2
               else "not supported" if high < PREDICTED_SLOPE / 2 else "inconclusive")
    return [dict(
        claim="shapes: the texture enters the code later where its contrast (--texture-mix) is "
        "higher, by at least half the slope the DRL paper's mechanism predicts", rule=11,
        test="least-squares slope of the entering t on ln(mix), an encoder a point; one-sided t on "
        "n - 2 degrees of freedom", **fit, predicted=PREDICTED_SLOPE, moves=low > 0,
        verdict=verdict,
        n_encoders=n, n_seeds=min(r["protocol"]["mlp_seeds"] for _, r in runs),
        entering={run: [m, rise, t] for m, rows in mixes.items() for run, rise, t in rows},
        control="half the predicted slope", deciding=True)]

def claims_text(result):
    """The claims in words, one line each, from claims.json: what the README prints."""
    learnt = "; ".join(f"{k}: {', '.join(g)}" for k, g in result["learnt"].items())
    left = [r for r in result["runs"] if not any(r in g for g in result["learnt"].values())]
    lines = [f"Over the encoders that finished learning ({learnt or 'none'}; rule 1"
             + (f" revised: the mean of {result['rule_1_window']} read-outs" if
                result.get("rule_1_window") else "") + (f"; not read, rule 1 not met: "
                                                        f"{', '.join(left)}" if left else "")
             + "), each claim with n encoders, the paired "
             "t against its critical value, and the difference in points with its 95% interval (of "
             "the curves' falls, for the dependence measures):"]
    for c in result["claims"]:
        word = c["verdict"]
        if word == "not supported" and c.get("moves"):  # rule 11: it moves, by less
            word += " (it moves, by less than half as much)"
        if word == "not supported" and "D" in c:  # which way
            word += " (worse by more than the margin)" if c.get("margin") else \
                " (the control is better)"
        if not c.get("deciding", True):
            word += f"; reported beside rule {str(c['rule']).split(',')[0]}, not deciding"
        if not c.get("reached", True):  # rule 8: a probe short of the MLP on the same code
            word += ": the probe does not reach the MLP on the same code (" + ", ".join(
                f"{100 * g:+.1f}" for g in c["reach_gap"]) + " points)"
        numbers = f"n = {c['n_encoders']}"
        if "critical" in c:  # the paired t over encoders
            numbers += f", t = {c['statistic']:.1f} vs {c['critical']:.2f}; "
        if "D" in c:  # rules 2-3, 5-6, 8, 10: the difference in points, its 95% interval
            numbers += (f"{100 * c['D']:+.1f} [{100 * c['interval'][0]:+.1f}, "
                        f"{100 * c['interval'][1]:+.1f}]")
            numbers += f"; margin {100 * c['margin']:.0f} point" if c.get("margin") else ""
            numbers += f"; at {c['epochs']} epochs" if "epochs" in c else ""
        elif "fall" in c:  # rule 7
            numbers += f"the falls differ by {c['fall']:+.3f}"
        elif "predicted" in c:  # rule 11: the slope, b - q se and b + q se (a 90% interval)
            numbers += (f"slope {c['slope']:+.3f} [{c['bounds'][0]:+.3f}, {c['bounds'][1]:+.3f}] "
                        f"against {c['predicted']:.3f} predicted" if "slope" in c else
                        "; no slope tested (too few encoders read, or a perfect fit)")
            read = [f"{t:.2f} (mix {m:g})" for m, _, t in c["entering"].values() if t is not None]
            numbers += f"; entering t {', '.join(read) or 'none'}"
            unread = [f"{100 * rise:.1f} (mix {m:g})" for m, rise, t in c["entering"].values()
                      if t is None]
            numbers += (f"; not read (a rise under 5 points, or a fall), max - min in points: "
                        f"{', '.join(unread)}" if unread else "")
        elif "mass_gain" in c:  # rule 9
            numbers += (f"{100 * c['mass_gain']:+.1f} points of attention; highest at t = "
                        f"{', '.join(map(str, c['peak_t']))}")
        else:  # rule 4
            numbers += f"; best t {', '.join(map(str, c['best_t']))}"
        lines.append(f"- {c['claim']}: **{word}** ({numbers})")
    return "\n".join(lines)

# ---- NMI, its lag profile, and the findings in words ----

def lag_profile(nmi):
    """Mean off-diagonal NMI at each lag |i - j| = 1 .. T-1. (T, T) -> (T-1,)."""
    return torch.stack([torch.diagonal(nmi, k).mean() for k in range(1, nmi.shape[0])])

def lag_fall(nmis):
    """How much NMI falls from neighbours to the ends of the curve, lag 1 minus lag T-1 of each
    seed's matrix (S, T, T) -> (mean, std) over seeds: the spread of the fall itself, not of single
    cells (a lag averages many cells, so its noise is smaller than theirs)."""
    falls = torch.stack([lag_profile(n)[0] - lag_profile(n)[-1] for n in nmis])  # (S,)
    return falls.mean().item(), falls.std(unbiased=False).item()

def two_blocks(nmi):
    """The curve cut in two where the mean NMI within the blocks most exceeds that between them:
    (k, within, between), the second block starting at point k. nmi (T, T), symmetrised here."""
    nmi, T = (nmi + nmi.T) / 2, len(nmi)
    off = ~torch.eye(T, dtype=torch.bool)
    split = lambda k: torch.arange(T)[:, None].ge(k) == torch.arange(T)[None].ge(k)  # (T, T)
    cuts = [(k, nmi[split(k) & off].mean().item(), nmi[~split(k)].mean().item())
            for k in range(1, T)]
    return max(cuts, key=lambda c: c[1] - c[2])

def fitted_fall(nmis):
    """Rule 7's fall (revised before its runs; lag_fall reads two cells at lag T-1): per seed, the
    drop from lag 1 to lag T-1 of the least-squares line through the lag profile of the symmetrised
    matrix, every cell counted. (S, T, T) -> (mean, std) over seeds."""
    lags = torch.stack([lag_profile((n + n.T) / 2) for n in nmis])  # (S, T - 1)
    x = torch.arange(lags.shape[1], dtype=lags.dtype)  # lag - 1
    x = x - x.mean()
    falls = -(x * lags).sum(1) / (x ** 2).sum() * (len(x) - 1)  # (S,): -slope * (T - 2)
    return falls.mean().item(), falls.std(unbiased=False).item()

def control_text(trained, control):
    """How NMI falls on the trained curve against its invertible control, in words, with the
    verdict of one encoder: a fall counts beyond the control's and both seed spreads."""
    (fall_c, spread_c), moved = lag_fall(control["nmis"]), control["along"] / control["across"]
    (fit, spread), (fit_c, spread_c_fit) = fitted_fall(trained["nmis"]), fitted_fall(
        control["nmis"])
    g, g_c = trained["gaussian_by_lag"], control["gaussian_by_lag"]  # (T - 1,) nats by lag
    seeds = len(trained["nmis"])
    return (
        "On the invertible control (the t = 0 codes carried along t by invertible maps, so that "
        f"every two points carry the same information; moving {moved:.3f} of its spread, the "
        f"trained codes scaled as MINE reads them {control['target']:.3f}) NMI falls by "
        f"{fall_c:.2f} (spread {spread_c:.2f}). Fitted over all lags of the symmetrised matrix, "
        f"NMI falls by {fit:.2f} (spread {spread:.2f}) on the trained curve and by {fit_c:.2f} "
        f"({spread_c_fit:.2f}) on the control. The Gaussian MI, which needs no training, goes "
        f"from {g[0]:.1f} nats between neighbours to {g[-1]:.1f} between the ends (control: "
        f"{g_c[0]:.1f} to {g_c[-1]:.1f}). " + (
            "NMI falls more on the trained curve than on the control, beyond both seed spreads: "
            "on this encoder distant points share less than a curve that keeps all information, "
            "as the paper's Figure 2 claims." if seeds > 1 and fit - fit_c > spread + spread_c_fit
            else "NMI does not fall more on the trained curve than on the control beyond their "
            "seed spreads" + (" (one MINE seed: no spread)" if seeds == 1 else "") + ": the fall "
            "is not shown to be information lost rather than MINE's difficulty with a moving "
            "curve."))

def findings(curves, times, probe_result, separation, rows):
    """The figures in words, computed from the numbers. curves: those of mine_curves; rows: the
    codes MINE read (a fifth held out: its MI is at most log(rows / 5) nats)."""
    trained, control = curves["trained"], curves["control"]
    nmis, along, across = trained["nmis"], trained["along"], trained["across"]  # (S, T, T)
    nmi_mean = nmis.mean(0)
    lags, (fall, fall_spread), dt = lag_profile(nmi_mean), lag_fall(nmis), times[1] - times[0]
    # How far the curve moves, and how NMI falls with the distance |t_i - t_j| between two points.
    text = [
        f"The codes move along t by {along:.4f} (std over t, mean over images and dimensions) "
        f"against {across:.4f} between images (std over images): the curve's extent is "
        f"{100 * along / across:.1f}% of the spread of the points"
        + (", so each trajectory is nearly a single point." if along < 0.05 * across else "."),
        f"NMI by lag: {lags[0]:.2f} between neighbours (|dt| = {dt:.2f}), "
        f"{lags[len(lags) // 2]:.2f} at |dt| = {(len(lags) // 2 + 1) * dt:.2f}, {lags[-1]:.2f} "
        f"between t = {times[0]:.1f} and t = {times[-1]:.1f}: a fall of {fall:.2f} (its spread "
        f"over seeds {fall_spread:.2f}; single cells vary by up to "
        f"{nmis.std(0, unbiased=False).max():.2f}; ordered pairs (i, j) and (j, i) differ by up to "
        f"{(nmi_mean - nmi_mean.T).abs().max():.2f}, the figure shows their mean). MI in nats "
        f"reaches {trained['mi'].max():.2f}, against the log of MINE's held-out rows, "
        f"{math.log(rows // 5):.1f}: about the most that a sample of that size can attest.",
        control_text(trained, control)]
    row = (nmi_mean.sum(1) - nmi_mean.diagonal()) / (len(times) - 1)
    text.append("The point sharing the most information with the rest of the curve is t = "
                f"{times[int(row.argmax())]:.2f}; the most isolated is t = "
                f"{times[int(row.argmin())]:.2f}.")
    (k, within, between), (k_c, within_c, between_c) = (two_blocks(c["nmis"].mean(0))
                                                         for c in (trained, control))
    text.append(f"Cut in two blocks by code: t < {times[k]:.2f} and t >= {times[k]:.2f}, NMI "
                f"{within:.2f} within and {between:.2f} between (control: t >= {times[k_c]:.2f}, "
                f"{within_c:.2f} and {between_c:.2f}).")
    # Figure 3 and eq. 5 per attribute, where probe.py has run.
    for name, out in (probe_result or {}).get("targets", {}).items():
        (att, spread, seeds), (init, _, _) = (attention_summary(o) for o in (out, out["init"]))
        i, j = int(att.argmax()), int(init.argmax())
        text.append(f"{name}: the single-layer Transformer attends most to t = {times[i]:.2f} "
                    f"({100 * att[i]:.0f} ± {100 * spread[i]:.0f}% of its attention, sample std "
                    f"over {seeds} probe seed{'s' * (seeds > 1)}; on the random-init encoder "
                    f"{100 * init[j]:.0f}% at t = {times[j]:.2f}; uniform would be "
                    f"{100 / len(att):.0f}%); the best single-t MLP is at t = {out['best_t']:.2f}.")
    for name, sep in separation.items():
        ratio = torch.tensor(sep["ratio"])
        text.append(f"{name}: classes separate most at t = {times[int(ratio.argmax())]:.2f} "
                    f"(between/within distance {ratio.max():.3f}; least {ratio.min():.3f} at t = "
                    f"{times[int(ratio.argmin())]:.2f}).")
    return " ".join(text)

def summarise(run, step, times, cfg, curves, probe_result, separation, rows):
    """nmi.json's contents: the trained codes' NMI, MI and lag profile, per-seed matrices and the
    fall (the decay verdict can be checked from the file), the findings in words, and the
    random-init control's numbers beside them, also in one sentence."""
    trained, init = curves["trained"], curves["random init"]
    text = findings(curves, times.tolist(), probe_result, separation, rows)
    lags = {k: ", ".join(f"{v:.2f}" for v in lag_profile(c["nmi_mean"]).tolist())
            for k, c in curves.items()}
    control = (f"Control, the same encoder at random initialisation: codes move "
               f"{init['along'] / init['across']:.3f} of their spread along t (trained "
               f"{trained['along'] / trained['across']:.3f}); NMI by lag {lags['random init']} "
               f"(trained {lags['trained']}).")
    kept = lambda c: dict(nmi_mean=c["nmi_mean"].tolist(),
                          nmi_std=c["nmis"].std(0, unbiased=False).tolist(),
                          nmi_by_lag=lag_profile(c["nmi_mean"]).tolist(),
                          nmi_fall=dict(zip(("mean", "std"), lag_fall(c["nmis"]))),
                          nmi_fitted_fall=dict(zip(("mean", "std"), fitted_fall(c["nmis"]))),
                          std_along_t=c["along"], std_between_images=c["across"],
                          gaussian_mi_by_lag=c["gaussian_by_lag"].tolist())
    return dict(run=run, step=step, times=times.tolist(), mine=cfg, **kept(trained),
                mi_mean_nats=trained["mi"].tolist(), nmi_seeds=trained["nmis"].tolist(),
                separation=separation, findings=text + " " + control, random_init=kept(init),
                invertible_control=dict(kept(curves["control"]), step=curves["control"]["step"],
                                        trained_movement=curves["control"]["target"]),
                heuristic=("NMI uses MINE's I(X;X) in place of H(X), which is infinite for "
                           "continuous codes; the diagonal is ~1 by construction and values depend "
                           "on the estimator budget."))

# ---- Figures 2 and 3 ----

def attention_summary(out):
    """Figure 3's numbers from one encoder's probe.py rows: the single-layer Transformer token's
    attention over the T points, mean over probe seeds (T,), its sample std (T,; 0 for one seed)
    and the number of seeds."""
    seeds = torch.tensor(out["attention_probe"]["attention_seeds"])  # (S, T)
    spread = seeds.std(0) if len(seeds) > 1 else torch.zeros(seeds.shape[1])
    return seeds.mean(0), spread, len(seeds)

def plot(result, title, probe_result, separation, out_dir):
    """Figure 2, the NMI matrix (T, T) of the trained codes (t_i down, t_j across, a colour bar
    beside), and where probe.py has run, Figure 3 (attention over t per attribute) and the
    per-attribute figure: accuracy, attention density and the eq. 5 profile along t."""
    import matplotlib  # here only: MINE never needs matplotlib; Agg needs no display
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nmi, times = torch.tensor(result["nmi_mean"]), result["times"]
    nmi = ((nmi + nmi.T) / 2).numpy()  # symmetrised: I(i; j) = I(j; i)
    fig, ax = plt.subplots(figsize=(4.6, 4))
    # The colour scale spans the values (0 to 1 would leave a 0.75-1.05 matrix one colour).
    low = math.floor(10 * min(float(nmi.min()), 0.9)) / 10
    im = ax.imshow(nmi, vmin=low, vmax=max(1.0, float(nmi.max())), cmap="viridis")
    ticks = list(range(0, len(times), max(1, len(times) // 6)))  # at most about 6 labels per axis
    ax.set_xticks(ticks, [f"{times[i]:.1f}" for i in ticks])
    ax.set_yticks(ticks, [f"{times[i]:.1f}" for i in ticks])
    ax.set(xlabel="t_j", ylabel="t_i", title=title)
    fig.colorbar(im, ax=ax, label="NMI")
    figures = [(fig, "nmi.png")]
    if probe_result is not None:
        targets = probe_result["targets"]
        # Figure 3: per attribute, the single-layer Transformer token's attention over the T
        # points (sums to 1), its sample std over probe seeds as error bars, the same probe on the
        # random-init encoder dashed in the same colour; the legend outside the axes.
        fig, ax = plt.subplots(figsize=(6.2, 3.4))
        for (name, out), colour in zip(targets.items(), plt.rcParams["axes.prop_cycle"]):
            (att, spread, _), (init, _, _) = (attention_summary(o) for o in (out, out["init"]))
            ax.errorbar(times, att, yerr=spread, marker="o", capsize=2, label=name, **colour)
            ax.plot(times, init, ls="--", lw=0.8, **colour)
        ax.plot([], [], ls="--", lw=0.8, color="k", label="random init (dashed)")
        ax.axhline(1 / len(times), color="grey", lw=0.8, label="uniform")
        ax.set(xlabel="t", ylabel="attention of the learned token",
               title="Single-layer Transformer attention over t (Figure 3)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        figures.append((fig, "attention.png"))
        # One column per attribute: accuracy along t (row 1), attention as a density over t, for
        # the index Transformer and the grid-free one on 51 points (row 2), the eq. 5 profile (3).
        fig, axes = plt.subplots(3, len(targets), figsize=(4 * len(targets), 8.5), squeeze=False)
        for (acc, att, sep), (name, out) in zip(zip(*axes), targets.items()):
            acc.errorbar(times, [100 * v for v in out["mlp"]["mean"]],
                         yerr=[100 * v for v in out["mlp"]["std"]], marker="o", color="k",
                         label="MLP at t")
            acc.axhline(100 * out["transformer"]["mean"], color="tab:red", label="Transformer")
            acc.axhline(100 * out["transformer_const"]["mean"], color="tab:red", ls=":",
                        label="Tsf, constant curve")
            acc.set(title=name, xlabel="t", ylabel="test accuracy (%)")
            att.plot(times, attention_summary(out)[0] * len(times), marker="o", color="tab:red",
                     label="single-layer Transformer")  # weight / (1 / T)
            if "continuous_grids" in out:
                g = out["continuous_grids"]["51"]
                att.plot(g["times"], g["density"], color="tab:purple", label="grid-free, 51 pts")
            att.set(xlabel="t", ylabel="attention density")
            sep.plot(times, separation[name]["ratio"], marker="o", color="tab:green")
            sep.set(xlabel="t", ylabel="between / within distance (eq. 5)")
        axes[0][0].legend(fontsize=7)
        axes[1][0].legend(fontsize=7)
        fig.suptitle(f"{probe_result['dataset']} / {probe_result['encoder']}: which attribute "
                     "lives where on the trajectory")
        figures.append((fig, "attributes.png"))
    for fig, name in figures:
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)

def main(argv=None):
    """analyze.py: the MINE flags checked (or --claims judged), the run's codes read, NMI estimated
    for the trained and the random-init codes, the findings written in words, nmi.json and the
    figures saved."""
    args, cfg = parse_args(argv)
    if args.claims:
        if args.window < 0:
            raise tr.UserError(f"--window must be 0 or positive, got {args.window}")
        return claims(args.claims, f"docs/claims_window{args.window}.json" if args.window else
                      "docs/claims.json", args.window)
    if not args.run:
        raise tr.UserError("give a run folder (python analyze.py runs/shapes-drl) or --claims")
    if cfg["num_times"] < 3:  # at 2 points lag 1 is lag T-1: the fall is 0 by construction
        raise tr.UserError("--num-times must be at least 3: the decay of NMI compares neighbours "
                           "(lag 1) with the ends of the curve (lag T-1)")
    t_start, times = time.time(), tr.paper_times(cfg["num_times"])
    encoder, init_encoder, train_cfg, step, device, out_dir = tr.open_run(args.run, args.device)
    tr.check_writable(files=[os.path.join(out_dir, f) for f in ("nmi.json", "nmi.png",
                                                                "attention.png", "attributes.png")])
    # Where probe.py has run on this grid: its attention (Figure 3) and the eq. 5 profile. Read
    # before the codes and MINE's minutes: an unreadable file stops the run before them.
    path = os.path.join(out_dir, "probe.json")
    try:
        probe_result = read_json(path) if os.path.exists(path) else None
    except ValueError:
        raise tr.UserError(f"{path} is not readable JSON (cut short?); run probe.py again or "
                           "delete it") from None
    if probe_result and probe_result["times"] != times.tolist():  # attention on another grid
        print(f"{path} used other times; its attention is not drawn (re-run probe.py with "
              f"--num-times {cfg['num_times']})")
        probe_result = None
    if probe_result and any("attention_probe" not in o for o in probe_result["targets"].values()):
        print(f"{path} holds no single-layer Transformer (made with --probes mlp, or before "
              "probe.py trained Figure 3's probe): its attention, the class separation along t and "
              "attention.png and attributes.png are not made (re-run probe.py)")
        probe_result = None
    data = tr.run_datasets(train_cfg, args.data_root, cfg["max_train"], seed=0,
                           splits=("train",))["train"]  # MINE uses the train split only
    # (N, T, D) codes and (N, A) labels of each encoder, probe.py's cache when it has run
    codes = {name: tr.cached_trajectories(args.run, enc, data, "train", times, tag) for name, enc,
             tag in (("trained", encoder, f"step{step}"), ("random init", init_encoder, "init"))}
    curves = mine_curves(codes, cfg, device, args.run)  # every pair, trained then control
    separation, (x, labels) = {}, (codes["trained"]["codes"], codes["trained"]["labels"])
    for name in (probe_result or {}).get("targets", {}):
        p = tr.separation_profile(x, labels[:, data.attributes.index(name)])
        separation[name] = {k: p[k].tolist() for k in ("ratio", "between", "within")}
        separation[name]["argsup_fraction"] = p["argsup_hist"].tolist()
    result = summarise(args.run, step, times, cfg, curves, probe_result, separation, len(x))
    result["wall_time_s"] = time.time() - t_start
    tr.atomic_save(result, os.path.join(out_dir, "nmi.json"))
    plot(result, f"{train_cfg['dataset']} / {train_cfg['encoder']}: NMI (Figure 2)",
         probe_result, separation, out_dir)
    print("NMI (mean over seeds):")
    for i, t in enumerate(times.tolist()):
        print(f"  t={t:.1f} " + " ".join(f"{v:.2f}" for v in curves["trained"]["nmi_mean"][i]))
    print("findings: " + result["findings"])
    print(f"wrote {out_dir}/nmi.json and figures in {result['wall_time_s'] / 60:.1f} min")

if __name__ == "__main__":
    try:
        main()
    except (tr.UserError, KeyboardInterrupt) as e:  # one sentence (Ctrl-C too), no traceback
        raise SystemExit("error: " + (str(e) or "interrupted; the codes encoded so far are kept "
                                      "in <run>/cache, no results were written")) from None

"""How information changes along the trajectory: the NMI matrix (Figure 2), attention (Figure 3),
and where classes separate along the curve (paper eq. 5).

For a run of train.py: estimates with MINE the mutual information between the codes at every two
points of the trajectory (all T*T pairs and all seeds trained as the groups of one model, on the
training split's codes, evaluated on held-out rows), normalises it as NMI(i, j) = I(i;j) /
sqrt(I(i;i) I(j;j)) and reports its decay away from the diagonal, averaged over seeds with the
spread. Where probe.py has run, also draws the Transformer's attention over t (Figure 3) and, per
attribute, accuracy and attention along t side by side, with the grid-free probe's attention
density. The same movement and NMI analysis runs on the control, the same encoder at its random
initialisation, and is printed beside the trained one. A short paragraph of findings is computed
from the numbers and saved with them.

    python train.py && python probe.py runs/shapes-drl && python analyze.py runs/shapes-drl
    python analyze.py runs/cifar10-vdrl --preset paper --device cuda   # the published MINE budget
    python analyze.py --check-mine                                     # MINE against closed-form MI

NMI here is the published code's HEURISTIC: continuous codes have no finite entropy, so MINE's own
estimate of I(X;X) stands in for H(X). The diagonal is then about 1 by construction and values are
comparable only at a fixed estimator budget; read the matrix for its shape (how fast NMI decays
with |i - j|), not for absolute values.

Writes <run>/results/nmi.json, nmi.png, attention.png and attributes.png.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

import probe
import train
import trajrep as tr

# MINE budget; `paper` is the published MINE setting (paper section 3.2: about 100 epochs, batch
# 256, lr 1e-4, statistics network 256 wide, 5 seeds). `cpu` trains a 64-wide network for 800
# steps at lr 1e-3 on 3000 images with 2 seeds: on 11 x 11 pairs, minutes on 2 cores. NMI values
# depend on the budget (see above): compare matrices made with the same preset only.
PRESETS = {
    "cpu": dict(steps=800, batch_size=256, lr=1e-3, hidden=64, seeds=2, max_train=3000),
    "paper": dict(steps=20000, batch_size=256, lr=1e-4, hidden=256, seeds=5, max_train=0),
}


def parse_args(argv):
    """The command line; unset MINE flags stay None and take the --preset's values."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="run folder of train.py (holding ckpt.pt)")
    p.add_argument("--check-mine", action="store_true", help="print MINE against the true MI of "
                   "correlated Gaussians for several (d, rho), then exit")
    # The estimator's budget, and which codes it reads.
    g = p.add_argument_group("MINE")
    g.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu (default) or paper")
    g.add_argument("--steps", type=int, help="MINE training steps (cpu 800, paper 20000)")
    g.add_argument("--batch-size", type=int, help="MINE batch size (256)")
    g.add_argument("--lr", type=float, help="MINE Adam learning rate (cpu 1e-3, paper 1e-4)")
    g.add_argument("--hidden", type=int, help="statistics-network width (cpu 64, paper 256)")
    g.add_argument("--seeds", type=int, help="seeds to average (cpu 2, paper 5)")
    g.add_argument("--max-train", type=int, help="use at most this many training images, 0 = all "
                                                 "(cpu 3000, as probe.py)")
    g.add_argument("--num-times", type=int, default=11,
                   help="points of the regular grid on [0, 1] (paper 11)")
    g.add_argument("--data-root",
                   help="where the run's dataset lies, if not where train.py read it")
    g.add_argument("--device", default="auto", help="device for encoding and MINE: auto, cpu, "
                                                    "cuda, mps")
    return p.parse_args(argv)


def check_mine(cfg):
    """MINE on x, y ~ N(0, I_d) with per-dimension correlation rho, against the true MI,
    -(d/2) log(1 - rho^2)."""
    print(f"{'d':>3} {'rho':>5} {'true MI':>8} {'MINE':>8} {'error':>7}   (nats; N=10000, "
          f"{cfg['steps']} steps)")
    rows = []
    # From independent (MI 0) to strongly related (1.66 nats at d = 4, rho = 0.9): the DV bound
    # sits below the truth, more so for large MI and small budgets.
    for d, rho in ((1, 0.0), (1, 0.5), (1, 0.9), (2, 0.8), (4, 0.5), (8, 0.3), (4, 0.9)):
        gen = torch.Generator().manual_seed(d * 100 + int(rho * 10))
        x = torch.randn(10000, d, generator=gen)
        y = rho * x + math.sqrt(1 - rho ** 2) * torch.randn(10000, d, generator=gen)
        # The plain one-pair MINE of the library, at this preset's budget.
        est = tr.mine(x, y, steps=cfg["steps"], lr=cfg["lr"], hidden=cfg["hidden"]).item()
        true = tr.gaussian_mi(rho, d)
        rows.append(dict(d=d, rho=rho, true=true, mine=est))
        print(f"{d:>3} {rho:>5.2f} {true:>8.3f} {est:>8.3f} {est - true:>+7.3f}")
    return rows


def nmi_over_seeds(codes, cfg, name):
    """The NMI matrix of codes (N, T, D), standardised per dimension, for every MINE seed (all pairs
    and seeds one grouped model): (NMI (S, T, T) per seed, MI in nats (T, T) mean over seeds)."""
    # One scale per dimension, pooled over t: the same transform at every t keeps the MI of every
    # pair (MI is invariant to invertible maps; MINE's optimisation is not: it needs scaled input).
    mean, std = tr.standardiser_stats(codes, per_time=False)
    codes = (codes - mean) / std
    t0 = time.time()

    def tick(done, total):  # at every tenth of the MINE steps: how far, and an ETA for the rest
        if done < total:
            spent = time.time() - t0
            print(f"  {name}: {done}/{total} MINE steps in {spent:.0f} s, ETA "
                  f"{spent * (total - done) / done:.0f} s", flush=True)
    # All T * T pairs and every seed as the groups of one model: (S, T, T) each.
    nmis, mis = tr.nmi_matrix(codes, seeds=tuple(range(cfg["seeds"])), steps=cfg["steps"],
                              progress=tick, batch_size=cfg["batch_size"], lr=cfg["lr"],
                              hidden=cfg["hidden"])
    print(f"{name}: {codes.shape[1] ** 2} pairs x {cfg['seeds']} seeds in {time.time() - t0:.1f} "
          f"s; NMI next to the diagonal {', '.join(f'{lag_profile(n)[0]:.3f}' for n in nmis)}, "
          f"corner {', '.join(f'{n[0, -1]:.3f}' for n in nmis)} (per seed)", flush=True)
    nmis, mis = nmis.cpu(), mis.cpu()
    # NaN: MINE's I(X;X) at some t was about zero, too small to stand in for an entropy.
    if torch.isnan(nmis).any():
        raise tr.UserError(f"MINE's estimate of I(X;X) was about zero at some t ({name} codes), so "
                           f"NMI is undefined there; raise --steps (or --lr) and run again")
    return nmis, mis.mean(0)


# ---- NMI, its lag profile, and the findings in words ----

def lag_profile(nmi):
    """Mean off-diagonal NMI at each lag |i - j| = 1 .. T-1. (T, T) -> (T-1,)."""
    T = nmi.shape[0]
    # The k-th diagonal holds the pairs k steps apart on the grid (both triangles agree up to the
    # estimator's noise; the upper one is read).
    return torch.stack([torch.diagonal(nmi, k).mean() for k in range(1, T)])


def lag_fall(nmis):
    """How much NMI falls from neighbours to the ends of the curve: lag 1 minus lag T-1 of each
    seed's matrix, (S, T, T) -> (mean, std) over seeds. The spread is that of the fall itself, not
    of single cells: a lag averages many cells, and its noise is smaller than theirs."""
    # One fall per seed: each seed's matrix is a whole estimate, made with its own initial weights,
    # batches and held-out rows.
    falls = torch.stack([lag_profile(n)[0] - lag_profile(n)[-1] for n in nmis])  # (S,)
    return falls.mean().item(), falls.std(unbiased=False).item()


def findings(nmis, times, probe_result, along, across, separation):
    """The figures in words, computed from the numbers. nmis: the NMI matrix of each MINE seed,
    (S, T, T)."""
    nmi_mean = nmis.mean(0)
    lags = lag_profile(nmi_mean)
    fall, fall_spread = lag_fall(nmis)
    dt = times[1] - times[0]
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
        f"{nmis.std(0, unbiased=False).max():.2f}).",
    ]
    # The verdict follows the numbers: a decay counts only beyond the seed spread of the fall.
    if fall > fall_spread:
        text.append("NMI decays away from the diagonal beyond the seed spread: distant points of "
                    "the curve share less information, as the paper's Figure 2 claims.")
    else:
        text.append("NMI does not decay away from the diagonal beyond the seed spread, so the "
                    "paper's 'distant points carry different information' is NOT supported on "
                    "these codes at this budget.")
    # Each point's mean NMI with the others: which part of the curve is most shared.
    row = (nmi_mean.sum(1) - nmi_mean.diagonal()) / (len(times) - 1)
    text.append("The point sharing the most information with the rest of the curve is t = "
                f"{times[int(row.argmax())]:.2f}; the most isolated is t = "
                f"{times[int(row.argmin())]:.2f}.")
    # Figure 3 and eq. 5 per attribute, where probe.py has run: where the Transformer looks, and
    # where the classes are farthest apart relative to their spread.
    for name, out in (probe_result or {}).get("targets", {}).items():
        att = torch.tensor(out["attention"])
        text.append(f"{name}: the Transformer attends most to t = {times[int(att.argmax())]:.2f} "
                    f"({100 * att.max():.0f}% of its attention; uniform would be "
                    f"{100 / len(att):.0f}%); the best single-t MLP is at t = {out['best_t']:.2f}.")
    for name, sep in separation.items():
        ratio = torch.tensor(sep["ratio"])
        text.append(f"{name}: classes separate most at t = {times[int(ratio.argmax())]:.2f} "
                    f"(between/within distance {ratio.max():.3f}; least {ratio.min():.3f} at t = "
                    f"{times[int(ratio.argmin())]:.2f}).")
    return " ".join(text)


# ---- Figures 2 and 3 ----

def plot_nmi(nmi, times, title, path):
    """Figure 2: the NMI matrix (T, T) as an image, t_i down and t_j across, a colour bar beside."""
    plt = probe.pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4))
    # The colour scale spans the values (0 to 1 would leave a 0.75-1.05 matrix one colour).
    # Rounded down to a tenth, and at most 0.9: the scale never starts at the smallest value.
    low = math.floor(10 * min(float(nmi.min()), 0.9)) / 10
    im = ax.imshow(nmi, vmin=low, vmax=max(1.0, float(nmi.max())), cmap="viridis")
    ticks = range(0, len(times), max(1, len(times) // 6))  # at most about 6 labels per axis
    ax.set_xticks(list(ticks), [f"{times[i]:.1f}" for i in ticks])
    ax.set_yticks(list(ticks), [f"{times[i]:.1f}" for i in ticks])
    ax.set(xlabel="t_j", ylabel="t_i", title=title)
    fig.colorbar(im, ax=ax, label="NMI")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_probe_figures(probe_result, separation, out_dir):
    """Figure 3 (attention over t, per attribute) and the per-attribute accuracy / attention
    figure."""
    plt = probe.pyplot()
    times, targets = probe_result["times"], probe_result["targets"]
    # Figure 3: one curve per attribute, the token's attention over the T points (sums to 1).
    fig, ax = plt.subplots(figsize=(6.2, 3.4))
    for name, out in targets.items():
        ax.plot(times, out["attention"], marker="o", label=name)
    ax.axhline(1 / len(times), color="grey", lw=0.8, label="uniform")
    ax.set(xlabel="t", ylabel="attention of the learned token",
           title="Transformer attention over t (Figure 3)")
    # The legend outside the axes, off the curves.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "attention.png"), dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(3, len(targets), figsize=(4 * len(targets), 8.5), squeeze=False)
    # One column per attribute: accuracy along t (row 1), attention as a density over t, for the
    # index Transformer and the grid-free one on 51 points (row 2), and the eq. 5 profile (row 3).
    for col, (name, out) in enumerate(targets.items()):
        ax = axes[0][col]
        ax.errorbar(times, [100 * v for v in out["mlp"]["mean"]],
                    yerr=[100 * v for v in out["mlp"]["std"]], marker="o", color="k",
                    label="MLP at t")
        ax.axhline(100 * out["transformer"]["mean"], color="tab:red", label="Transformer")
        ax.axhline(100 * out["transformer_const"]["mean"], color="tab:red", ls=":",
                   label="Tsf, constant curve")
        ax.set(title=name, xlabel="t", ylabel="test accuracy (%)")
        ax = axes[1][col]
        dens = torch.tensor(out["attention"]) / (1 / len(times))  # weights as a density
        ax.plot(times, dens, marker="o", color="tab:red", label="Transformer (index)")
        if "continuous_grids" in out:
            g = out["continuous_grids"]["51"]
            ax.plot(g["times"], g["density"], color="tab:purple", label="grid-free, 51 pts")
        ax.set(xlabel="t", ylabel="attention density")
        ax = axes[2][col]
        ax.plot(times, separation[name]["ratio"], marker="o", color="tab:green")
        ax.set(xlabel="t", ylabel="between / within distance (eq. 5)")
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.suptitle(f"{probe_result['dataset']} / {probe_result['encoder']}: which attribute lives "
                 "where on the trajectory")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "attributes.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    """analyze.py: the MINE flags checked (or MINE checked against closed forms), the run's codes
    read, NMI estimated for the trained and the random-init codes, the findings written in words,
    nmi.json and the figures saved."""
    args = parse_args(argv)
    cfg = probe.protocol_config(PRESETS, args)
    check_budget(cfg)
    if args.check_mine:
        check_mine(cfg)
        return
    if not args.run:
        raise tr.UserError("give a run folder (python analyze.py runs/shapes-drl) or --check-mine")
    if cfg["num_times"] < 2:
        raise tr.UserError("--num-times must be at least 2: NMI needs two points of the trajectory")
    t_start = time.time()
    # ---- the run's codes, trained and random-init (probe.py's cache when it has run) ----
    encoder, init_encoder, train_cfg, step, device, out_dir = probe.open_run(args.run, args.device)
    train_data = train.run_datasets(train_cfg, args.data_root, cfg["max_train"], seed=0,
                                    splits=("train",))["train"]  # MINE uses the train split only
    times = tr.paper_times(cfg["num_times"])
    # (N, T, D) codes and (N, A) labels of each encoder, from probe.py's cache when it has run.
    codes = {"trained": tr.cached_trajectories(args.run, encoder, train_data, "train", times,
                                               f"step{step}"),
             "random init": tr.cached_trajectories(args.run, init_encoder, train_data, "train",
                                                   times, "init")}
    # ---- MINE on every pair of points, for the trained codes and then the control ----
    curves = mine_curves(codes, cfg, device)
    # ---- where probe.py has run: its attention (Figure 3) and the eq. 5 profile ----
    probe_result = read_probe(os.path.join(out_dir, "probe.json"), times, cfg)
    separation = {}
    for name in (probe_result or {}).get("targets", {}):
        labels = codes["trained"]["labels"][:, train_data.attributes.index(name)]
        prof = tr.separation_profile(codes["trained"]["codes"], labels)
        separation[name] = dict(ratio=prof["ratio"].tolist(), between=prof["between"].tolist(),
                                within=prof["within"].tolist(),
                                argsup_fraction=prof["argsup_hist"].tolist())
    # ---- the findings in words, the JSON, the figures ----
    result = summarise(args.run, step, times, cfg, curves, probe_result, separation)
    result["wall_time_s"] = time.time() - t_start
    with open(os.path.join(out_dir, "nmi.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_nmi(curves["trained"]["nmi_mean"].numpy(), times.tolist(),
             f"{train_cfg['dataset']} / {train_cfg['encoder']}: NMI (Figure 2)",
             os.path.join(out_dir, "nmi.png"))
    if probe_result is not None:
        plot_probe_figures(probe_result, separation, out_dir)
    print("NMI (mean over seeds):")
    for i, t in enumerate(times.tolist()):
        print(f"  t={t:.1f} " + " ".join(f"{v:.2f}" for v in curves["trained"]["nmi_mean"][i]))
    print("findings: " + result["findings"])
    print(f"wrote {out_dir}/nmi.json and figures in {result['wall_time_s'] / 60:.1f} min")


def mine_curves(codes, cfg, device):
    """For each set of codes (name -> cached codes): how far its curves move, and its NMI matrix
    over seeds, estimated on `device`. The control runs second, with an ETA from the first."""
    curves = {}
    for name, c in codes.items():  # dicts keep their order: the trained codes first
        eta = (f" (ETA {curves['trained']['seconds'] / 60:.1f} min, as long as the trained codes "
               "took)" if curves else " ...")
        print(f"MINE on the {name} codes: {cfg['num_times'] ** 2} pairs x {cfg['seeds']} seed(s), "
              f"{cfg['steps']} steps" + eta, flush=True)
        start = time.time()
        along, across = tr.curve_movement(c["codes"])
        nmis, mi = nmi_over_seeds(c["codes"].to(device), cfg, name)
        curves[name] = dict(along=along, across=across, nmis=nmis, nmi_mean=nmis.mean(0),
                            nmi_std=nmis.std(0, unbiased=False), mi=mi, seconds=time.time() - start)
    return curves


def check_budget(cfg):
    """Impossible MINE flags end with one sentence before any work."""
    if cfg["steps"] <= 0 or cfg["seeds"] <= 0 or cfg["hidden"] <= 0:
        raise tr.UserError("--steps, --seeds and --hidden must be positive")
    # The DV bound's log-mean-exp over the batch needs rows enough to average.
    if cfg["batch_size"] < 16:
        raise tr.UserError(f"--batch-size must be at least 16, got {cfg['batch_size']}: MINE's "
                           "bound averages exp(T) over the batch's shuffled pairs, and a handful "
                           "of rows gives no estimate")


def read_probe(path, times, cfg):
    """probe.py's result, if it has run on the same grid of times (else None, with a line saying
    so)."""
    if not os.path.exists(path):  # probe.py has not run: NMI alone
        return None
    result = json.load(open(path))
    # Attention weights over another grid cannot be drawn on this one.
    if result["times"] != times.tolist():
        print(f"{path} used other times; its attention is not drawn (re-run probe.py with "
              f"--num-times {cfg['num_times']})")
        return None
    return result


def summarise(run, step, times, cfg, curves, probe_result, separation):
    """nmi.json's contents: the trained codes' NMI, MI and lag profile, the findings in words (the
    control's line appended), and the random-init control's numbers beside them. The per-seed
    matrices and the fall of the lag profile are kept, so that the decay verdict can be checked
    from the file alone."""
    trained, init = curves["trained"], curves["random init"]
    # The findings read off the trained codes; the control's numbers follow in one sentence, so
    # that every claim stands beside what an untrained encoder gives.
    text = findings(trained["nmis"], times.tolist(), probe_result, trained["along"],
                    trained["across"], separation)
    lags = {k: ", ".join(f"{v:.2f}" for v in lag_profile(c["nmi_mean"]).tolist())
            for k, c in curves.items()}
    control = (f"Control, the same encoder at random initialisation: codes move "
               f"{init['along'] / init['across']:.3f} of their spread along t (trained "
               f"{trained['along'] / trained['across']:.3f}); NMI by lag {lags['random init']} "
               f"(trained {lags['trained']}).")
    return dict(run=run, step=step, times=times.tolist(), mine=cfg,
                nmi_mean=trained["nmi_mean"].tolist(), nmi_std=trained["nmi_std"].tolist(),
                mi_mean_nats=trained["mi"].tolist(),
                nmi_by_lag=lag_profile(trained["nmi_mean"]).tolist(),
                nmi_seeds=trained["nmis"].tolist(),
                nmi_fall=dict(zip(("mean", "std"), lag_fall(trained["nmis"]))),
                separation=separation,
                findings=text + " " + control, std_along_t=trained["along"],
                std_between_images=trained["across"],
                random_init=dict(nmi_mean=init["nmi_mean"].tolist(),
                                 nmi_std=init["nmi_std"].tolist(),
                                 nmi_by_lag=lag_profile(init["nmi_mean"]).tolist(),
                                 nmi_fall=dict(zip(("mean", "std"), lag_fall(init["nmis"]))),
                                 std_along_t=init["along"], std_between_images=init["across"]),
                heuristic=("NMI uses MINE's I(X;X) in place of H(X), which is infinite for "
                           "continuous codes; the diagonal is ~1 by construction and values depend "
                           "on the estimator budget."))


if __name__ == "__main__":
    try:
        main()
    except tr.UserError as e:
        sys.exit(f"error: {e}")

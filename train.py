"""Trains a diffusion model with a time-aware encoder, DRL or VDRL (paper eq. 1-4).

The encoder E(x0, t) and the score network s(x_t, E(x0, t), t) are trained together by the
weighted denoising score matching loss of eq. 4 (EDM weighting in the `cpu` preset, the published
sigma^2 weighting in the `paper` preset; --weighting) plus lambda_z times the code regulariser
(L1 for DRL, KL for VDRL). The trained encoder's curve t -> E(x0, t) is what probe.py and analyze.py
study.

    python train.py                                     # shapes, `cpu` preset, ~8 min on 2 cores
    python train.py --dataset cifar10 --encoder vdrl    # the paper's configuration (`paper` preset)
    python train.py --resume                            # continue runs/<dataset>-<encoder> exactly
    torchrun --nproc_per_node=4 train.py --dataset cifar10   # DDP (NCCL on GPUs, gloo on CPU)
    python train.py --dataset cifar10 --amp --compile --workers 8   # one GPU, fast paths

Writes <out>/ckpt.pt (model, EMA, optimiser, step, RNG states, config; atomic) and
<out>/metrics.jsonl.
"""
import argparse
import copy
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

import trajrep as tr

# Presets: every value can be overridden by its flag. `paper` is the published DRL configuration
# (paper section 3). `cpu` is what made the encoder learn on `shapes` in under 8 minutes on 2 CPU
# cores (docs/results.md, "Making the encoder learn"); its departures from the published settings,
# each a flag:
#   weighting / precond edm  Karras et al.'s loss weight and parameterisation: at high noise the
#                            denoiser is the decoder of an autoencoder, so the code must carry
#                            the image
#   t_dist mixture           half of the training times drawn with sigma uniform (high noise)
#   enc_head flatten         the encoder keeps where things are instead of average-pooling it away
#   lambda_z 0.3             a regulariser with weight: each t keeps only what the denoiser needs
#                            there
#   nf 8, batch 32, lr 2e-3  a small score network and many small steps: more updates per minute
PRESETS = {
    # A 0.2M-parameter model: encoder 16-32-64 with one block per stage and a code of 32 numbers,
    # a 3-level U-Net of 8 base channels without attention.
    "cpu": dict(steps=2200, batch_size=32, lr=2e-3, warmup=100, clip=1.0, ema=0.99, code_dim=32,
                enc_widths=[16, 32, 64], enc_blocks=1, nf=8, ch_mult=[1, 2, 2], num_res_blocks=1,
                attn_res=[], dropout=0.0, enc_head="flatten", weighting="edm", precond="edm",
                t_dist="mixture", lambda_z=0.3, lr_decay="none", log_every=100, ckpt_every=500),
    # The published sizes: a WRN-28-2 encoder (32-64-128, 4 blocks per stage), a code of 128
    # numbers, a 4-level U-Net of 16 base channels with self-attention at 16 px; 250k steps of 100.
    "paper": dict(steps=250_000, batch_size=100, lr=2e-4, warmup=5000, clip=1.0, ema=0.999,
                  code_dim=128, enc_widths=[32, 64, 128], enc_blocks=4, nf=16, ch_mult=[1, 2, 2, 2],
                  num_res_blocks=2, attn_res=[16], dropout=0.1, enc_head="pool", weighting="sigma2",
                  precond="sigma", t_dist="uniform", lambda_z=1e-5, lr_decay="none", log_every=100,
                  ckpt_every=5000),
}
# Per-dataset defaults applied under the preset: image size, Mini-ImageNet's 3-level U-Net (84 px),
# and the size of the `shapes` object (1.5 times the first version's) and its fine-scale texture
# (see make_shapes).
DATASETS = {"shapes": dict(image_size=32, object_scale=1.5, texture=True),
            "cifar10": dict(image_size=32), "cifar100": dict(image_size=32),
            "miniimagenet": dict(image_size=84, ch_mult=[1, 2, 2], data_root="./data/miniimagenet"),
            "folder": dict(image_size=64)}
# Fallbacks for flags no preset sets, and for checkpoints written before a flag existed (their runs
# used the published setting).
DEFAULTS = dict(dataset="shapes", encoder="drl", preset=None, data_root="./data", num_train=None,
                object_scale=1.0, texture=False,
                lambda_z=1e-5, sigma_min=0.01, sigma_max=50.0, eps=1e-5, t_dist="uniform",
                weighting="sigma2", precond="sigma", sigma_data=0.5, enc_head="pool",
                lr_decay="none", seed=0, device="auto", amp=False, channels_last=True,
                compile=False, workers=0, out=None, allow_new_data=False)
# What a resumed run may change; everything else must match the checkpoint's config. The learning
# rate, warm-up and clip may change so that a run that diverged can go on from its last good
# checkpoint.
RESUME_OVERRIDES = {"steps", "log_every", "ckpt_every", "device", "amp", "channels_last", "compile",
                    "workers", "out", "data_root", "lr", "warmup", "clip", "allow_new_data"}
# Largest checkpoint (model, EMA and Adam's two moments: 16 bytes per parameter) and largest
# in-memory `shapes` array a run may ask for; beyond, a typo such as --image-size 1000 would fill
# the disk or RAM.
MAX_CHECKPOINT_GB, MAX_SHAPES_GB = 1.0, 4.0

# ---- the command line and the config ----
# A run's config is one flat dict: the fallbacks, then the preset, then the dataset's defaults,
# then the flags given. It is saved in every checkpoint, and a resume starts from it.


def parse_args(argv):
    """The command line. Every flag defaults to None, so that resolve_config can tell the flags the
    user gave (which override the preset, and which a --resume must not change) from the rest."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=None)
    # What the model learns from: the dataset, where it lies, and its size.
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=sorted(DATASETS), help="dataset (default shapes, embedded)")
    g.add_argument("--data-root", help="folder of the data (default ./data; Mini-ImageNet "
                                       "./data/miniimagenet with train/<class>/ and test/<class>/)")
    g.add_argument("--image-size", type=int, help="image side in pixels (32; Mini-ImageNet 84; "
                                                  "folder 64)")
    g.add_argument("--num-train", type=int, help="number of training images (shapes: generated, "
                                                 "default 10000; others: a seeded class-stratified "
                                                 "subset)")
    g.add_argument("--object-scale", type=float, help="shapes only: size of the object relative to "
                                                      "the first version's 4-5.5 px radius "
                                                      "(default 1.5)")
    g.add_argument("--texture", action=argparse.BooleanOptionalAction, default=None,
                   help="shapes only: the fifth attribute, a 2-pixel texture on the object "
                        "(default on; --no-texture: the four-attribute data of earlier runs)")
    # The two networks: the time-aware encoder E(x0, t) and the score U-Net s(x_t, z, t).
    g = p.add_argument_group("model")
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="cpu (default on shapes) or paper (default otherwise)",
    )
    g.add_argument(
        "--encoder",
        choices=["drl", "vdrl"],
        help="deterministic (DRL) or probabilistic (VDRL) code",
    )
    g.add_argument("--code-dim", type=int, help="code size D (paper 128)")
    g.add_argument("--enc-widths", type=int_list, help="encoder stage widths, comma-separated "
                                                       "(paper 32,64,128 = WRN-28-2)")
    g.add_argument("--enc-blocks", type=int, help="residual blocks per encoder stage (paper 4)")
    g.add_argument("--nf", type=int, help="score U-Net base channels (cpu 8, paper 16)")
    g.add_argument("--ch-mult", type=int_list, help="score U-Net channel multipliers per level "
                                                    "(paper 1,2,2,2)")
    g.add_argument("--num-res-blocks", type=int, help="score U-Net residual blocks per level "
                                                      "(paper 2)")
    g.add_argument("--attn-res", type=int_list, help="resolutions with self-attention, "
                                                     "comma-separated, '' for none (paper 16)")
    g.add_argument("--dropout", type=float, help="score U-Net dropout (paper 0.1)")
    g.add_argument("--enc-head", choices=tr.ENCODER_HEADS, help="encoder head: global average "
                   "pooling (paper), the flattened last feature map, which keeps where things are, "
                   "or both side by side")
    # The VE-SDE of eq. 1 and the weighted score-matching loss of eq. 4 with its code regulariser.
    g = p.add_argument_group("diffusion and loss (eq. 1-4)")
    g.add_argument("--sigma-min", type=float, help="VE-SDE sigma_min (0.01)")
    g.add_argument("--sigma-max", type=float, help="VE-SDE sigma_max (50)")
    g.add_argument("--eps", type=float, help="training times t ~ U(eps, 1) (1e-5)")
    g.add_argument("--lambda-z", type=float, help="weight of the L1 (DRL) or KL (VDRL) regulariser "
                                                  "(cpu 0.3, paper 1e-5)")
    g.add_argument("--t-dist", choices=tr.T_DISTRIBUTIONS, help="training times: uniform t "
                   "(paper), sigma (sigma(t) uniform), mixture (half each)")
    g.add_argument("--weighting", choices=tr.WEIGHTINGS, help="loss weight lambda(t): sigma2 "
                   "(paper, lambda = sigma^2) or edm (Karras et al.: reconstruction-like at high "
                   "noise)")
    g.add_argument("--precond", choices=tr.PRECONDS, help="score parameterisation: sigma (paper, "
                   "s = F / sigma) or edm (Karras et al.'s c_skip / c_out / c_in)")
    g.add_argument("--sigma-data", type=float, help="data std assumed by edm weighting and "
                                                    "preconditioning (0.5)")
    # Adam with warm-up, clipping and an EMA of the weights, as the published code.
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help="training steps (cpu 2200, paper 250000)")
    g.add_argument("--batch-size", type=int, help="GLOBAL batch size, split over DDP ranks (cpu "
                                                  "32, paper 100)")
    g.add_argument("--lr", type=float, help="Adam learning rate (cpu 2e-3, paper 2e-4)")
    g.add_argument("--warmup", type=int, help="linear learning-rate warm-up steps (paper 5000)")
    g.add_argument("--lr-decay", choices=tr.LR_DECAYS, help="after the warm-up: none (paper, "
                   "constant) or cosine to 0 at --steps (a resume that changes --steps stretches "
                   "what is left of it)")
    g.add_argument("--clip", type=float, help="gradient-norm clip (1.0)")
    g.add_argument("--ema", type=float, help="EMA decay of the weights (cpu 0.99, paper 0.999)")
    g.add_argument("--seed", type=int, help="random seed (0)")
    # Where and how the run goes; these may change on --resume (RESUME_OVERRIDES).
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run folder, created if absent (default runs/<dataset>-<encoder>)")
    g.add_argument("--resume", action="store_true", default=False,
                   help="continue from <out>/ckpt.pt exactly; may change only --steps, --lr, "
                        "--warmup, --clip, --data-root and the flags of this group")
    g.add_argument("--allow-new-data", action="store_true", default=None,
                   help="with --resume: continue on images other than those the checkpoint was "
                        "trained on (without it, such a resume is refused)")
    g.add_argument("--log-every", type=int, help="steps between log lines")
    g.add_argument("--ckpt-every", type=int, help="steps between checkpoints")
    g.add_argument("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    g.add_argument("--amp", action="store_true", default=None, help="bf16 autocast (CUDA only)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default on: 1.06-1.09x faster training on 2 "
                        "CPU cores in bench.py; the usual choice on GPUs with --amp)")
    g.add_argument(
        "--compile", action="store_true", default=None, help="torch.compile the model (GPU)"
    )
    g.add_argument("--workers", type=int, help="DataLoader worker processes (0; with workers, "
                                               "memory is pinned)")
    return p.parse_args(argv)


def resolve_config(args):
    """defaults < preset < dataset defaults < flags given; on --resume, the checkpoint's config."""
    given = {k: v for k, v in vars(args).items() if v is not None and k != "resume"}
    # The preset follows the dataset: `cpu` for the embedded `shapes`, the published one otherwise.
    dataset = given.get("dataset", DEFAULTS["dataset"])
    preset = given.get("preset") or ("cpu" if dataset == "shapes" else "paper")
    # Later entries win: a flag the user gave overrides the dataset's default, which overrides the
    # preset's, which overrides the fallbacks.
    cfg = {**DEFAULTS, **PRESETS[preset], **DATASETS[dataset], **given, "preset": preset}
    cfg["out"] = cfg["out"] or os.path.join("runs", f"{dataset}-{cfg['encoder']}")
    return cfg, given


def check_config(cfg, given=()):
    """Impossible values end with one sentence, before anything is built or written. `given`: the
    flags the user set (a preset's self-attention resolution may be absent at another image size:
    Mini-ImageNet's 84 px has no 16 px level, as in the published code; one asked for must
    exist)."""
    # Sizes and counts: a zero or a negative value has no meaning.
    for key in ("steps", "batch_size", "code_dim", "nf", "enc_blocks", "num_res_blocks",
                "image_size", "log_every", "ckpt_every", "num_train"):
        if cfg[key] is not None and cfg[key] <= 0:
            raise tr.UserError(f"--{key.replace('_', '-')} must be positive, got {cfg[key]}")
    if cfg["seed"] < 0:
        raise tr.UserError(f"--seed must be 0 or positive, got {cfg['seed']}")
    for key, example in (("enc_widths", "16,32,64"), ("ch_mult", "1,2,2")):
        if not ints(cfg[key]) or min(ints(cfg[key])) <= 0:
            raise tr.UserError(f"--{key.replace('_', '-')} needs positive integers, e.g. {example}")
    if not 0.5 <= cfg["object_scale"] <= 1.5:
        raise tr.UserError("--object-scale must be in [0.5, 1.5] (beyond, objects of neighbouring "
                           "location cells overlap or become too small to show their shape), got "
                           f"{cfg['object_scale']}")
    # Real numbers: nan and inf pass every comparison below unnoticed, so they are refused first.
    for key in ("lr", "clip", "ema", "eps", "lambda_z", "sigma_min", "sigma_max", "dropout",
                "sigma_data"):
        if not math.isfinite(cfg[key]):
            raise tr.UserError(f"--{key.replace('_', '-')} must be a finite number, got {cfg[key]}")
    if not 0 < cfg["sigma_min"] < cfg["sigma_max"]:
        raise tr.UserError(f"need 0 < --sigma-min < --sigma-max, got {cfg['sigma_min']} and "
                           f"{cfg['sigma_max']}")
    # Ranges: an EMA decay of 1 never moves, eps = 0 reaches sigma_min exactly at t = 0, and so on.
    for key, ok, rule in (
        ("ema", 0 <= cfg["ema"] < 1, "in [0, 1)"),
        ("eps", 0 < cfg["eps"] < 1, "in (0, 1)"),
        ("lr", cfg["lr"] > 0, "positive"),
        ("warmup", cfg["warmup"] >= 0, "0 or positive"),
    ):
        if not ok:
            raise tr.UserError(f"--{key} must be {rule}, got {cfg[key]}")
    if cfg["clip"] <= 0:
        raise tr.UserError("--clip must be positive (it is the largest gradient norm), got "
                           f"{cfg['clip']}")
    for key, ok, rule in (
        ("dropout", 0 <= cfg["dropout"] < 1, "in [0, 1)"),
        ("lambda_z", cfg["lambda_z"] >= 0, "0 or positive"),
        ("sigma_data", cfg["sigma_data"] > 0, "positive"),
        ("workers", cfg["workers"] >= 0, "0 or positive"),
    ):
        if not ok:
            raise tr.UserError(f"--{key.replace('_', '-')} must be {rule}, got {cfg[key]}")
    # What only the network's shape can tell.
    check_model(cfg, "attn_res" in given)


def check_model(cfg, check_attention=True):
    """What only the network's shape can tell, checked before anything is written: self-attention at
    resolutions the U-Net has, channel counts GroupNorm can split, and a size that fits on disk. The
    model is built on the `meta` device: shapes only, no memory, no time."""
    # The U-Net's resolutions: the image side halved at each level after the first.
    levels = [cfg["image_size"] // 2 ** k for k in range(len(ints(cfg["ch_mult"])))]
    bad = [r for r in ints(cfg["attn_res"]) if r not in levels]
    if bad and check_attention:
        raise tr.UserError(f"--attn-res {','.join(map(str, bad))} is not a resolution of the score "
                           f"U-Net, whose levels are {', '.join(map(str, levels))} px "
                           f"(--image-size {cfg['image_size']}, --ch-mult "
                           f"{','.join(map(str, ints(cfg['ch_mult'])))}); pick from those, or '' "
                           "for none")
    try:
        with torch.device("meta"):
            model = tr.DRLModel(**model_kwargs(cfg))
    except ValueError as e:
        if "divisible" not in str(e):
            raise
        raise tr.UserError(f"the networks cannot be built with --nf {cfg['nf']} and --enc-widths "
                           f"{','.join(map(str, ints(cfg['enc_widths'])))}: GroupNorm splits each "
                           "layer's channels into groups of 4 (at most 32 groups) and one layer's "
                           "count does not divide; use multiples of 8, e.g. --nf 8 --enc-widths "
                           "16,32,64") from None
    gigabytes = 16 * tr.count_parameters(model) / 1e9
    if gigabytes > MAX_CHECKPOINT_GB:
        raise tr.UserError(f"at --image-size {cfg['image_size']} the model has "
                           f"{tr.count_parameters(model):,} parameters, a {gigabytes:.1f} GB "
                           "checkpoint (the flattened encoder head grows with the image's area); "
                           "use a smaller --image-size or --enc-head pool")
    if cfg["dataset"] == "shapes":
        data_gb = (cfg["num_train"] or 10000) * cfg["image_size"] ** 2 * 3 / 1e9
        if data_gb > MAX_SHAPES_GB:
            raise tr.UserError(f"shapes at --image-size {cfg['image_size']} would hold "
                               f"{data_gb:.1f} GB of images in memory; use a smaller --image-size "
                               "or --num-train")


def ints(value):
    """A list of ints from the config (a list; '16,32,64' in checkpoints of earlier versions)."""
    return tuple(int_list(value) if isinstance(value, str) else value)


def float_list(text):
    """'0,0.5,1' -> [0.0, 0.5, 1.0]; an argparse type, so that a bad list is argparse's one line."""
    return [float(v) for v in str(text).split(",") if v.strip()]


def int_list(text):
    """'16,32,64' -> [16, 32, 64]; an argparse type (see float_list)."""
    return [int(v) for v in str(text).split(",") if v.strip()]


def run_datasets(config, data_root=None, max_train=0, max_test=0, seed=0, splits=("train", "test")):
    """The splits of a training run's dataset (its config from the checkpoint), each cut to a
    seeded, class-stratified subset of max_* examples when given; data_root overrides the run's
    folder. Returns dict(train=LabelledImages, test=LabelledImages) (the names in `splits`)."""
    root = data_root or config["data_root"]
    limits = dict(train=(config["num_train"], max_train), test=(None, max_test))
    out = {}
    for name in splits:
        # Checkpoints written before object_scale or texture existed trained on the first
        # version's data: scale 1.0, no texture.
        out[name] = tr.load_dataset(config["dataset"], name, root, config["image_size"],
                                    limits[name][0], config["seed"],
                                    config.get("object_scale", 1.0), config.get("texture", False))
        if limits[name][1] and limits[name][1] < len(out[name]):
            out[name] = out[name].subset(limits[name][1], seed)
    return out


def model_kwargs(cfg, in_channels=3):
    """The DRLModel arguments of a config; saved in the checkpoint, so that probe.py and analyze.py
    rebuild the same networks without train.py's flags."""
    return dict(in_channels=in_channels, image_size=cfg["image_size"],
                probabilistic=cfg["encoder"] == "vdrl", code_dim=cfg["code_dim"],
                enc_widths=ints(cfg["enc_widths"]), enc_blocks=cfg["enc_blocks"], nf=cfg["nf"],
                ch_mult=ints(cfg["ch_mult"]), num_res_blocks=cfg["num_res_blocks"],
                attn_resolutions=ints(cfg["attn_res"]), dropout=cfg["dropout"],
                lambda_z=cfg["lambda_z"], sigma_min=cfg["sigma_min"], sigma_max=cfg["sigma_max"],
                enc_head=cfg["enc_head"], precond=cfg["precond"], weighting=cfg["weighting"],
                sigma_data=cfg["sigma_data"])


def setup_distributed(cfg):
    """DDP when launched by torchrun (RANK / WORLD_SIZE set), else a single process.
    Returns (rank, world size, device)."""
    if "RANK" not in os.environ:
        return 0, 1, tr.pick_device(cfg["device"])
    rank, world, local = (
        int(os.environ["RANK"]),
        int(os.environ["WORLD_SIZE"]),
        int(os.environ["LOCAL_RANK"]),
    )
    device = tr.pick_device(cfg["device"])
    if device.type == "cuda":  # one GPU per process: the one torchrun assigned to this rank
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # --batch-size is the GLOBAL batch: each rank takes its share, so the gradient is that of one
    # process with the whole batch (tested against a single process).
    if cfg["batch_size"] % world:
        raise tr.UserError(
            f"--batch-size {cfg['batch_size']} is not divisible by the {world} ranks"
        )
    return rank, world, device


# ---- the run: main claims the folder and calls train, whose phases follow it in order ----

def main(argv=None):
    """Parses flags, claims the run folder, trains; a run that fails before its first checkpoint
    removes the folder it created (it holds nothing worth keeping), so a retry starts clean."""
    args = parse_args(argv)
    cfg, given = resolve_config(args)
    lock, created = None, False
    # Rank 0 (or the only process) checks the flags and takes the folder's lock; with DDP the
    # other ranks write nothing there.
    if "RANK" not in os.environ or os.environ["RANK"] == "0":
        check_config(cfg, given)  # before anything is written
        lock, created = tr.claim_run_folder(cfg["out"])
    try:
        train(args, cfg, given)
    except BaseException as e:  # any failure, Ctrl-C included: leave the folder as a retry needs it
        ckpt_path = os.path.join(cfg["out"], "ckpt.pt")
        if created and not os.path.exists(ckpt_path):
            shutil.rmtree(cfg["out"], ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C: say where the run stands, not a traceback
            if not os.path.exists(ckpt_path):
                raise tr.UserError(
                    "interrupted before the first checkpoint; nothing was kept"
                ) from None
            raise tr.UserError(
                "interrupted; the last checkpoint (step "
                f"{tr.load_checkpoint(ckpt_path)['step']}) in {cfg['out']} is "
                f"intact: continue with python train.py --resume --out {cfg['out']}"
            ) from None
        raise
    finally:
        if lock is not None:
            lock.close()


def train(args, cfg, given):
    """The whole run, in the order of nanoGPT's train.py: config (a resume takes the checkpoint's),
    data, model (fresh or restored), the loop, and the end (DDP replicas compared)."""
    # ---- config: a resumed run continues with the checkpoint's, changing only what may change ----
    ckpt = None
    if args.resume:
        ckpt = tr.load_checkpoint(os.path.join(cfg["out"], "ckpt.pt"), resumable=True)
        cfg = resumed_config(ckpt, given)
    # A new run never writes over an old one's checkpoint.
    elif os.path.exists(os.path.join(cfg["out"], "ckpt.pt")):
        raise tr.UserError(f"{cfg['out']} already holds a checkpoint; pass --resume to continue "
                           f"it, or --out to start a new run elsewhere (nothing was overwritten)")
    # Checked again after a resume: the checkpoint's config with the flags that may change.
    check_config(cfg, given)
    rank, world, device = setup_distributed(cfg)
    if cfg["amp"] and device.type != "cuda":
        raise tr.UserError("--amp (bf16 autocast) is for CUDA devices and this run is on "
                           f"{device}; drop --amp")
    log = print if rank == 0 else (lambda *a, **k: None)  # one rank speaks
    log("config: " + json.dumps(cfg, sort_keys=True))
    if device.type == "cpu" and cfg["preset"] == "paper":
        log(f"note: the `paper` preset ({cfg['steps']} steps of a 2.3M-parameter model at "
            f"{cfg['image_size']} px) is a GPU job that takes days on a CPU; for a CPU run add "
            "--preset cpu --image-size 32")
    # ---- data, model, loop: each phase is a function below ----
    data, sampler, data_key = load_training_data(cfg, ckpt, rank, world, log)
    run = build_run(cfg, ckpt, data, data_key, device, rank, world, log)
    run_loop(cfg, run, data, sampler, rank, world, log)
    # ---- the end: DDP replicas must hold the same weights; the log says so ----
    if world > 1:
        compare_replicas(cfg, run, world, rank, log)
        dist.destroy_process_group()
    log(f"done: {run['step']} steps in {(time.time() - run['t_start']) / 60:.1f} min; "
        f"checkpoint {cfg['out']}/ckpt.pt")


def resumed_config(ckpt, given):
    """The config a --resume runs with: the checkpoint's, with only RESUME_OVERRIDES changed (any
    other flag that differs from the checkpoint's value is refused), and --allow-new-data asked
    anew every time. Checkpoints written before a flag existed get its DEFAULTS value."""
    # A flag that would change what the run learns (the model, the loss, the data) is refused.
    clash = {k: v for k, v in given.items()
             if k not in RESUME_OVERRIDES and ckpt["config"].get(k) != v}
    if clash:
        raise tr.UserError(f"--resume cannot change {', '.join(sorted(clash))}: the run was "
                           f"trained with { {k: ckpt['config'].get(k) for k in clash} }; drop "
                           "those flags")
    return {**DEFAULTS, **ckpt["config"], "allow_new_data": False,
            **{k: v for k, v in given.items() if k in RESUME_OVERRIDES}}


def load_training_data(cfg, ckpt, rank, world, log):
    """The training split and its sampler: a seeded DistributedSampler deals every rank its shard,
    epoch by epoch (one rank: a seeded shuffle). A resume is refused on images other than those
    the checkpoint was trained on, unless --allow-new-data. Returns (data, sampler, its
    dataset_key)."""
    data = run_datasets(cfg, splits=("train",))["train"]
    # drop_last: every rank gets the same number of images, so no rank waits for a batch that the
    # others never send; with one rank it is a seeded shuffle that drops at most world - 1 images.
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg["seed"], drop_last=True)
    if len(sampler) < cfg["batch_size"] // world:
        raise tr.UserError(f"{len(data)} training images are fewer than one batch of "
                           f"{cfg['batch_size']}; pass --batch-size "
                           f"{max(world, len(data) // world * world)} or less, or use more images")
    # Which images these are (a hash of pixels or file names): saved with every checkpoint, so that
    # a resume on other images is noticed instead of silently mixing two datasets.
    data_key = tr.dataset_key(data)
    if ckpt is not None and ckpt.get("data_key",
                                     data_key) != data_key and not cfg["allow_new_data"]:
        raise tr.UserError(f"the images at {cfg['data_root']} are not those {cfg['out']}/ckpt.pt "
                           "was trained on; give the run's --data-root, or add --allow-new-data "
                           "to continue on these")
    if rank == 0 and ckpt is None:  # sigma_max against the data (Song & Ermon's rule of thumb)
        sample = torch.stack([x for x, _ in data.__getitems__(list(range(min(500, len(data)))))])
        log(f"data: {len(data)} images of {tuple(sample.shape[1:])}; largest pairwise distance in "
            f"{len(sample)} of them {tr.max_pairwise_distance(sample):.1f} (Song & Ermon: "
            f"sigma_max about that; it is {cfg['sigma_max']})")
    return data, sampler, data_key


def build_run(cfg, ckpt, data, data_key, device, rank, world, log):
    """The model, its EMA, the optimiser and the noise generator, fresh (seeded: the same initial
    weights on every rank) or restored from the checkpoint with every random state, so that a
    resumed run continues bit for bit. Returns the run's state as a dict (what save_run writes)."""
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    kwargs = model_kwargs(cfg, in_channels=data[0][0].shape[0])
    model = tr.DRLModel(**kwargs).to(device)
    if cfg["channels_last"]:  # NHWC convolutions: faster on CPUs and tensor cores
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)  # starts at the initial weights
    # Fused Adam on CUDA: one kernel for the whole update (1.75x the training img/s of the `cpu`
    # size on an H200, where the step is launch-bound); elsewhere the for-each form, unchanged.
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8,
                           fused=device.type == "cuda")
    # shared by all ranks (see run_loop)
    noise_gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    run = dict(model=model, ema=ema, opt=opt, noise_gen=noise_gen, kwargs=kwargs, data_key=data_key,
               step=0, device=device, t_start=time.time())
    if ckpt is None:
        torch.manual_seed(cfg["seed"] + rank)  # per-rank seed for dropout
    else:
        restore(cfg, ckpt, run, rank, world, log)
    log(f"parameters: encoder {tr.count_parameters(model.encoder):,}, score "
        f"{tr.count_parameters(model.score):,}; {world} rank(s) x {cfg['batch_size'] // world} = "
        f"global batch {cfg['batch_size']} on {device}")
    return run


def restore(cfg, ckpt, run, rank, world, log):
    """Loads the checkpoint's weights, EMA, optimiser and random states into the run. With another
    number of ranks than it was saved with, the dropout streams cannot continue and are reseeded."""
    try:  # load_checkpoint checked the structure; this checks that the contents fit the model
        run["model"].load_state_dict(ckpt["model"])
        run["ema"].load_state_dict(ckpt["ema"])
        run["opt"].load_state_dict(ckpt["optimizer"])
        run["noise_gen"].set_state(ckpt["rng"]["noise"])
        ranks = ckpt["rng"]["ranks"]
        if len(ranks) == world:  # each rank continues its own dropout stream
            torch.set_rng_state(ranks[rank]["cpu"])
            if run["device"].type == "cuda" and ranks[rank].get("cuda") is not None:
                torch.cuda.set_rng_state(ranks[rank]["cuda"], run["device"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise tr.UserError(f"{cfg['out']}/ckpt.pt does not fit the model it describes "
                           f"({type(e).__name__}); it is damaged or from another version: resume "
                           f"from an intact copy or start a new run with another --out") from None
    run["step"] = ckpt["step"]
    if len(ranks) != world:  # a seed that differs per rank and per step, never reused
        log(f"checkpoint saved with {len(ranks)} ranks, running {world}: dropout RNG reseeded")
        torch.manual_seed(cfg["seed"] + 7919 * rank + run["step"])
    log(f"resumed from {cfg['out']}/ckpt.pt at step {run['step']}")


def save_run(cfg, run, rank, world):
    """Writes the checkpoint (rank 0), with every rank's random state gathered into it."""
    device = run["device"]
    # The CPU and CUDA streams drive dropout; the noise generator, shared by all ranks, draws t
    # and the noise. With all of them saved, --resume continues bit for bit.
    rngs = [dict(cpu=torch.get_rng_state(),
                 cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)]
    if world > 1:  # every rank's dropout stream goes into the one checkpoint
        gathered = [None] * world
        dist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    if rank == 0:
        tr.save_checkpoint(os.path.join(cfg["out"], "ckpt.pt"), config=cfg,
                           model_kwargs=run["kwargs"], step=run["step"],
                           model=run["model"].state_dict(), ema=run["ema"].state_dict(),
                           optimizer=run["opt"].state_dict(),
                           rng=dict(noise=run["noise_gen"].get_state(), ranks=rngs),
                           data_key=run["data_key"])


def run_loop(cfg, run, data, sampler, rank, world, log):
    """The training loop: draw the batch's times and noise, one step of eq. 4 with gradient
    clipping, the EMA update; every log_every steps a log line (and the non-finite check), every
    ckpt_every steps a checkpoint. Batches continue from the step reached, so a resumed run sees
    exactly the batches the uninterrupted one would have."""
    model, opt, device = run["model"], run["opt"], run["device"]
    # What the step calls: the model, wrapped for DDP (gradients averaged across ranks) and/or
    # compiled; `model` itself keeps the plain weights that the EMA and the checkpoint read.
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        train_model = torch.compile(train_model)
    params, ema_params = list(model.parameters()), list(run["ema"].parameters())
    image_shape, per_rank = tuple(data[0][0].shape), cfg["batch_size"] // world
    steps_per_epoch = len(sampler) // per_rank  # every epoch drops its last partial batch
    metrics = Metrics(cfg, run["step"], rank, world, log)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg["amp"])
    while run["step"] < cfg["steps"]:
        # The epoch and the batch within it follow from the step alone: a resumed run starts at
        # the batch the uninterrupted one would have drawn next.
        epoch, offset = divmod(run["step"], steps_per_epoch)
        sampler.set_epoch(epoch)
        batches = list(BatchSampler(sampler, per_rank, drop_last=True))[offset:]
        # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG, which
        # would shift the dropout stream on every resume and break bit-exact continuation.
        loader = DataLoader(data, batch_sampler=batches, num_workers=cfg["workers"],
                            pin_memory=cfg["workers"] > 0 and device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg["seed"] + epoch))
        for x0, _ in loader:  # the labels are not used: the model learns from the images alone
            # non_blocking: with pinned memory (--workers) the copy overlaps the previous step.
            x0 = x0.to(device, non_blocking=True)
            if cfg["channels_last"]:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            # The randomness of the GLOBAL batch, from a generator identical on every rank; each
            # rank takes the rows of its own images (DistributedSampler deals rows round-robin), so
            # N ranks compute exactly the gradient of one process with the same global batch.
            t, noise, code_noise = tr.sample_training_noise(
                cfg["batch_size"],
                image_shape,
                cfg["code_dim"],
                cfg["eps"],
                run["noise_gen"],
                device,
                cfg["t_dist"],
                cfg["sigma_min"],
                cfg["sigma_max"],
            )
            # (B/world, ...)
            # Rank r takes rows r, r + world, ...: the rows of the images its sampler gave it.
            t, noise, code_noise = t[rank::world], noise[rank::world], code_noise[rank::world]
            for group in opt.param_groups:  # linear warm-up, then constant or cosine decay
                group["lr"] = tr.learning_rate(run["step"], cfg["lr"], cfg["warmup"], cfg["steps"],
                                               cfg["lr_decay"])
            with autocast:  # bf16 on CUDA with --amp; otherwise a no-op
                # eq. 4: the weighted denoising loss plus lambda_z times the code regulariser
                loss, dsm, reg = train_model(x0, t, noise, code_noise)
            # One optimisation step. Clipping the gradient norm (1.0, as the published code) keeps
            # the rare step at high noise, with its large loss, from throwing the weights off.
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg["clip"])
            opt.step()
            tr.ema_update(ema_params, params, cfg["ema"])  # the EMA weights are what probes read
            metrics.add(loss, dsm, reg)  # no host-device synchronisation: summed on the device
            run["step"] += 1
            last = run["step"] == cfg["steps"]
            # Log lines and checkpoints: the only places where the host waits for the device.
            if run["step"] % cfg["log_every"] == 0 or run["step"] % cfg["ckpt_every"] == 0 or last:
                metrics.write(run["step"], opt.param_groups[0]["lr"])  # the one synchronising point
                if run["step"] % cfg["ckpt_every"] == 0 or last:
                    save_run(cfg, run, rank, world)
            if last:  # --steps may end mid-epoch
                break


class Metrics:
    """The losses summed on the device between log lines, written to the log and metrics.jsonl. Its
    write is the loop's one synchronising point, and where a non-finite loss stops the run before
    anything is saved (the last good checkpoint stays intact)."""

    def __init__(self, cfg, step, rank, world, log):
        # Only rank 0 writes metrics.jsonl; every rank joins the all_reduce in write.
        self.cfg, self.rank, self.world, self.log = cfg, rank, world, log
        self.path = os.path.join(cfg["out"], "metrics.jsonl")
        if rank == 0:
            # a new run starts an empty file; a resume keeps rows up to its step
            tr.cut_metrics(self.path, step)
        self.sums, self.count = None, 0  # loss, dsm, reg summed since the last log line
        self.t_start = self.t_last = time.time()
        self.step_last = step

    def add(self, loss, dsm, reg):
        """Adds one step's losses to the device-side sums (no .item(): the host does not wait)."""
        row = torch.stack([loss.detach(), dsm.detach(), reg.detach()]).float()  # (3,)
        self.sums = row if self.sums is None else self.sums + row
        self.count += 1

    def write(self, step, lr):
        """The mean losses since the last write (averaged over ranks), checked finite, then one log
        line (with images/s and an ETA) and one metrics.jsonl row; the sums start again."""
        cfg, sums = self.cfg, self.sums
        if self.world > 1:
            dist.all_reduce(sums)
            sums /= self.world
        mean = (sums / self.count).tolist()  # the one host-device synchronisation
        # A non-finite loss stops here, before the checkpoint below would save broken weights.
        if not all(math.isfinite(v) for v in mean):
            ckpt_path = os.path.join(cfg["out"], "ckpt.pt")
            if os.path.exists(ckpt_path):
                raise tr.UserError(
                    f"the loss became non-finite before step {step}; the last good checkpoint "
                    f"(step {tr.load_checkpoint(ckpt_path)['step']}) in {cfg['out']} is intact: "
                    f"continue it with --resume and a lower --lr or a longer --warmup")
            raise tr.UserError(f"the loss became non-finite before step {step}, before any "
                               "checkpoint was written; start again with a lower --lr or a longer "
                               "--warmup")
        now = time.time()
        # images per second
        ips = (step - self.step_last) * cfg["batch_size"] / max(now - self.t_last, 1e-9)
        eta = (cfg["steps"] - step) * cfg["batch_size"] / max(ips, 1e-9)
        self.log(f"step {step:>7d} | loss {mean[0]:9.3f} (dsm {mean[1]:9.3f}, reg {mean[2]:8.3f}) "
                 f"| {ips:7.1f} img/s | ETA {eta / 60:6.1f} min")
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(dict(step=step, loss=mean[0], dsm=mean[1], reg=mean[2], lr=lr,
                                        images_per_s=ips, elapsed_s=now - self.t_start)) + "\n")
        self.sums, self.count, self.t_last, self.step_last = None, 0, now, step


def compare_replicas(cfg, run, world, rank, log):
    """After DDP training: the largest difference between the ranks' weights (0 when they agree),
    in the log and in metrics.jsonl."""
    # DDP averages gradients, so replicas that start equal stay equal; a difference would mean a
    # rank saw other data or other randomness than it should.
    flat = torch.cat([p.detach().flatten() for p in run["model"].parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    diff = max((g - gathered[0]).abs().max().item() for g in gathered)
    log(f"replicas: max |difference| of weights across {world} ranks = {diff}")
    if rank == 0:
        with open(os.path.join(cfg["out"], "metrics.jsonl"), "a") as f:
            f.write(json.dumps(dict(step=run["step"], replica_max_abs_diff=diff,
                                    world_size=world)) + "\n")




if __name__ == "__main__":
    try:
        main()
    except tr.UserError as e:
        sys.exit(f"error: {e}")

"""Trains a diffusion model with a time-aware encoder, DRL or VDRL (paper eq. 1-4).

The encoder E(x0, t) and the score network s(x_t, E(x0, t), t) learn together by eq. 4's weighted
denoising score matching plus lambda_z times the code regulariser (L1 for DRL, KL for VDRL); the
trained encoder's curve t -> E(x0, t) is what probe.py and analyze.py study.

    python train.py                                     # shapes, `cpu`: learnt, ~30 min, 2 cores
    python train.py --steps 2200                        # a first look, ~8 min: colours and place
    python train.py --dataset cifar10 --encoder vdrl    # the paper's configuration (`paper` preset)
    python train.py --resume                            # continue runs/<dataset>-<encoder> exactly
    torchrun --nproc_per_node=4 train.py --dataset cifar10   # DDP (NCCL on GPUs, gloo on CPU)
    python train.py --dataset cifar10 --amp --compile --workers 8   # one GPU, fast paths

Writes <out>/ckpt.pt (model, EMA, optimiser, step, random states, config) and <out>/metrics.jsonl.
The file reads in the order of a run: the settings and flags, main (the config checked, the run
folder claimed), train (resume, devices, data, model), the steps (train_loop) and what they write.
"""
import argparse
import copy
import json
import math
import os
import shutil
import signal
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

import trajrep as tr

# A run's config: DEFAULTS, then the preset, then the dataset's row, then the flags given.
# `paper` is the published DRL configuration: a WRN-28-2 encoder, a code of 128 numbers, a 4-level
# U-Net of 16 channels with attention at 16 px, 250k steps of 100 images. `cpu` makes the encoder
# learn on `shapes` in half an hour on 2 cores with a 0.2M-parameter model; its departures, each a
# flag: Karras et al.'s weighting and preconditioning (edm: at high noise the denoiser decodes the
# code), half the training times at high noise (mixture), a flattened encoder head (keeps where
# things are), lambda_z 0.3 (each t keeps what the denoiser needs), a small U-Net and many small
# steps. In 2200 steps it learns the colours and the place; the outline takes thousands of steps
# more, and how many varies about two-fold between runs (docs/performance.md). No recipe measured
# there learnt it in fewer images on every seed, so the default runs 12000 steps: the learnt encoder
# (`--steps 2200` for a first look).
PRESETS = {
    "cpu": dict(steps=12000, batch_size=32, lr=2e-3, warmup=100, clip=1.0, ema=0.99, code_dim=32,
                enc_widths=(16, 32, 64), enc_blocks=1, nf=8, ch_mult=(1, 2, 2), num_res_blocks=1,
                attn_res=(), dropout=0.0, enc_head="flatten", weighting="edm", precond="edm",
                t_dist="mixture", lambda_z=0.3, lr_decay="none", log_every=100, ckpt_every=500),
    "paper": dict(steps=250_000, batch_size=100, lr=2e-4, warmup=5000, clip=1.0, ema=0.999,
                  code_dim=128, enc_widths=(32, 64, 128), enc_blocks=4, nf=16, num_res_blocks=2,
                  ch_mult=(1, 2, 2, 2), attn_res=(16,), dropout=0.1, enc_head="pool",
                  weighting="sigma2", precond="sigma", t_dist="uniform", lambda_z=1e-5,
                  lr_decay="none", log_every=100, ckpt_every=5000)}
# Per dataset, over the preset: the image side, Mini-ImageNet's 3-level U-Net, and for `shapes` the
# object's size, its texture (trajrep.make_shapes) and the training monitor (Monitor).
DATASETS = {"shapes": dict(image_size=32, object_scale=1.5, texture=True, probe_every=1000),
            "cifar10": dict(image_size=32), "cifar100": dict(image_size=32),
            "miniimagenet": dict(image_size=84, ch_mult=(1, 2, 2), data_root="./data/miniimagenet"),
            "folder": dict(image_size=64)}
# The values of the flags that no preset sets, and of the keys that a checkpoint's config lacks.
DEFAULTS = dict(dataset="shapes", encoder="drl", preset=None, data_root="./data", num_train=None,
                object_scale=1.0, texture=False, texture_mix=0.5, lambda_z=1e-5, sigma_min=0.01,
                sigma_max=50.0, eps=1e-5, t_dist="uniform", weighting="sigma2", precond="sigma",
                sigma_data=0.5, enc_head="pool", lr_decay="none", seed=0, device="auto", amp=False,
                channels_last=True, compile=False, workers=0, out=None, allow_new_data=False,
                probe_every=0, classes=None, data_key=None)
# What a --resume may change (the lr, warm-up and clip too: a diverged run goes on from its last
# good checkpoint); the rest must match the checkpoint's config.
RESUME_OVERRIDES = {"steps", "log_every", "ckpt_every", "probe_every", "device", "amp",
                    "channels_last", "compile", "workers", "out", "data_root", "lr", "warmup",
                    "clip", "allow_new_data"}
# Largest checkpoint (16 bytes a parameter) and `shapes` array a run may ask for: a typo such as
# --image-size 1000 would fill the disk or the memory.
MAX_CHECKPOINT_GB, MAX_SHAPES_GB = 1.0, 4.0
# A config value as a flag writes it: (16, 32, 64) -> 16,32,64 and () -> ''.
show = lambda v: ",".join(map(str, v)) or "''" if isinstance(v, (list, tuple)) else v

# The input rules: (what the value must be, a test of the value and the whole config). Every float
# is first checked finite: nan passes no comparison.
FINITE = ("must be a finite number", lambda v, c: math.isfinite(v))
POSITIVE = ("must be positive", lambda v, c: v is None or v > 0)  # None: --num-train not given
NON_NEGATIVE = ("must be 0 or positive", lambda v, c: v >= 0)
BELOW_ONE = ("must be in [0, 1)", lambda v, c: 0 <= v < 1)  # an EMA decay of 1 never moves
INTS = lambda example: (f"needs positive integers, e.g. {example}",
                        lambda v, c: min(tr.int_list(v), default=0) > 0)
# The command line, a row per flag: (flag, type or choices, help[, rule]); a string opens a group.
# "on" is a switch, "on/off" one with its --no- form. Each help ends with the tables' defaults.
FLAGS = [
    "data",
    ("dataset", sorted(DATASETS), "shapes is generated here; the others are read from --data-root"),
    ("data-root", str, "folder of the data (miniimagenet, folder: train/<class>/, test/<class>/)"),
    ("image-size", int, "image side in pixels", POSITIVE),
    ("num-train", int, "training images (shapes: 10000 generated; others: a subset)", POSITIVE),
    ("object-scale", float, "shapes: object size, times a 4-5.5 px radius", ("must be in [0.5, "
     "1.5] (beyond, objects of neighbouring location cells overlap or become too small to show "
     "their shape)", lambda v, c: 0.5 <= v <= 1.5)),
    ("texture", "on/off", "shapes: the fifth attribute, a 2-pixel texture on the object"),
    ("texture-mix", float, "shapes: the texture's second shade, the object's colour moved this "
     "fraction of the way to grey (its contrast: 0.5, about 0.4 in [-1, 1])", ("must be in (0, 1] "
     "(0 would draw no texture under its label), on shapes with its texture", lambda v, c: 0 < v
     <= 1 and (v == 0.5 or c["dataset"] == "shapes" and c["texture"]))),
    "model (the encoder E(x0, t) and the score U-Net s(x_t, z, t))",
    ("preset", sorted(PRESETS), "the defaults below: cpu on shapes, paper on the other datasets"),
    ("encoder", ("drl", "vdrl"), "deterministic (DRL) or probabilistic (VDRL) code"),
    ("code-dim", int, "code size D", POSITIVE),
    ("enc-widths", tr.int_list, "encoder stage widths", INTS("16,32,64")),
    ("enc-blocks", int, "residual blocks per encoder stage", POSITIVE),
    ("nf", int, "score U-Net base channels", POSITIVE),
    ("ch-mult", tr.int_list, "score U-Net channel multipliers per level", INTS("1,2,2")),
    ("num-res-blocks", int, "score U-Net residual blocks per level", POSITIVE),
    ("attn-res", tr.int_list, "resolutions with self-attention ('' for none)"),
    ("dropout", float, "score U-Net dropout", BELOW_ONE),
    ("enc-head", tr.ENCODER_HEADS, "average pooling, the flattened last feature map, or both"),
    "diffusion and loss (eq. 1-4)",
    ("sigma-min", float, "VE-SDE sigma_min", POSITIVE),
    ("sigma-max", float, "VE-SDE sigma_max", ("must be above --sigma-min",
                                              lambda v, c: v > c["sigma_min"])),
    ("eps", float, "training times t ~ U(eps, 1)", ("must be in (0, 1)", lambda v, c: 0 < v < 1)),
    ("lambda-z", float, "weight of the L1 (DRL) or KL (VDRL) code regulariser", NON_NEGATIVE),
    ("t-dist", tr.T_DISTRIBUTIONS, "training times: t uniform, sigma(t) uniform, or half each"),
    ("weighting", tr.WEIGHTINGS, "loss weight: sigma^2, or Karras et al.'s (edm)"),
    ("precond", tr.PRECONDS, "score: F / sigma, or Karras et al.'s c_skip, c_out, c_in (edm)"),
    ("sigma-data", float, "data std of the edm weighting and preconditioning", POSITIVE),
    "optimisation (Adam with warm-up, gradient clipping and an EMA of the weights)",
    ("steps", int, "training steps", POSITIVE),
    ("batch-size", int, "GLOBAL batch size, split over the DDP ranks", POSITIVE),
    ("lr", float, "Adam learning rate", POSITIVE),
    ("warmup", int, "linear learning-rate warm-up steps", NON_NEGATIVE),
    ("lr-decay", tr.LR_DECAYS, "after the warm-up: constant, or cosine to 0 at --steps"),
    ("clip", float, "largest gradient norm", POSITIVE),
    ("ema", float, "EMA decay of the weights", BELOW_ONE),
    ("seed", int, "random seed", NON_NEGATIVE),
    "run (these may change on --resume)",
    ("out", str, "run folder, created if absent (default runs/<dataset>-<encoder>)"),
    ("resume", "on", "continue <out>/ckpt.pt exactly; may change only this group's flags, --steps, "
     "--lr, --warmup, --clip and --data-root"),
    ("allow-new-data", "on", "with --resume: continue on images other than the run's"),
    ("log-every", int, "steps between log lines", POSITIVE),
    ("ckpt-every", int, "steps between checkpoints", POSITIVE),
    ("probe-every", int, "steps between read-outs of the EMA encoder's codes on held-out images "
     "(the log's 'shape 62%% ...'; 0: none)", NON_NEGATIVE),
    ("device", str, "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1 or mps"),
    ("amp", "on", "bf16 autocast (CUDA only)"),
    ("channels-last", "on/off", "channels-last memory format (faster convolutions)"),
    ("compile", "on", "torch.compile the model (GPU)"),
    ("workers", int, "DataLoader worker processes (with workers, memory is pinned)", NON_NEGATIVE)]

def parse_config(argv):
    """The command line, built from FLAGS; every flag defaults to None, so that the flags given can
    be told from the rest. Returns (--resume, config, the flags given)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for row in FLAGS:
        if isinstance(row, str):
            group = p.add_argument_group(row)
            continue
        (name, kind, text), k = row[:3], row[0].replace("-", "_")
        how = (dict(action={"on": "store_true", "on/off": argparse.BooleanOptionalAction}[kind])
               if isinstance(kind, str) else dict(type=kind) if callable(kind) else
               dict(choices=kind))
        # The defaults shown: the presets' and datasets', and DEFAULTS' where neither sets one.
        fallback = k in PRESETS["cpu"] or k in DATASETS["shapes"]
        tables = {**({} if fallback else {"default": DEFAULTS}), **PRESETS, **DATASETS}
        shown = ", ".join(f"{n} {show(t[k])}" for n, t in tables.items() if t.get(k) is not None)
        group.add_argument("--" + name, **how, default=None,
                           help=f"{text} ({shown})" if shown else text)
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "resume"}
    # The preset follows the dataset: `cpu` for the embedded `shapes`, the published one otherwise.
    dataset = given.get("dataset", DEFAULTS["dataset"])
    preset = given.get("preset") or ("cpu" if dataset == "shapes" else "paper")
    cfg = {**DEFAULTS, **PRESETS[preset], **DATASETS[dataset], **given, "preset": preset}
    cfg["out"] = cfg["out"] or os.path.join("runs", f"{dataset}-{cfg['encoder']}")
    return args.resume, cfg, given

def check_config(cfg, given=()):
    """Impossible values end with one sentence, before anything is built or written: the rules of
    FLAGS, then what only the networks' shapes tell, from a model built on the `meta` device."""
    for name, kind, _, *rule in (row for row in FLAGS if not isinstance(row, str)):
        value = cfg.get(name.replace("-", "_"))
        for text, test in ([FINITE] if kind is float else []) + rule:
            if not test(value, cfg):
                raise tr.UserError(f"--{name} {text}, got {show(value)}")
    mult, widths, nf = tr.int_list(cfg["ch_mult"]), tr.int_list(cfg["enc_widths"]), cfg["nf"]
    if cfg["image_size"] % 2 ** (len(mult) - 1):
        raise tr.UserError(f"--image-size {cfg['image_size']} is not divisible by 2^{len(mult) - 1}"
                           f", as the {len(mult)} levels of --ch-mult {show(mult)} need")
    # A preset's attention may be absent at another size (84 px has no 16 px level, as in the
    # published code); one asked for (`given`: the flags set) must exist.
    levels = [cfg["image_size"] // 2 ** k for k in range(len(mult))]
    bad = [r for r in tr.int_list(cfg["attn_res"]) if r not in levels]
    if bad and "attn_res" in given:
        raise tr.UserError(f"--attn-res {show(bad)} is not a resolution of the score U-Net, whose "
                           f"levels are {', '.join(map(str, levels))} px (--image-size "
                           f"{cfg['image_size']}, --ch-mult {show(mult)}); pick from those or ''")
    try:  # on the `meta` device: shapes only, no memory, no time
        with torch.device("meta"):
            model = tr.DRLModel(**tr.model_kwargs(cfg))
    except ValueError as e:  # a channel count that GroupNorm cannot split
        raise tr.UserError(f"the networks cannot be built with --nf {nf} and --enc-widths "
                           f"{show(widths)} ({e}); use multiples of 8, e.g. --nf 8 --enc-widths "
                           "16,32,64") from None
    parameters = sum(p.numel() for p in model.parameters())
    if 16 * parameters / 1e9 > MAX_CHECKPOINT_GB:
        raise tr.UserError(f"at --image-size {cfg['image_size']} the model has {parameters:,} "
                           f"parameters, a {16 * parameters / 1e9:.1f} GB checkpoint (the "
                           "flattened encoder head grows with the image's area); use a smaller "
                           "--image-size or --enc-head pool")
    data_gb = (cfg["num_train"] or 10000) * cfg["image_size"] ** 2 * 3 / 1e9
    if cfg["dataset"] == "shapes" and data_gb > MAX_SHAPES_GB:
        raise tr.UserError(f"shapes at --image-size {cfg['image_size']} would hold {data_gb:.1f} "
                           "GB of images in memory; use a smaller --image-size or --num-train")

def main(argv=None):
    """Parses the flags, claims the run folder, trains. A run that fails before its first checkpoint
    removes the folder it created (nothing worth keeping), so that a retry starts clean."""
    resume, cfg, given = parse_config(argv)
    ckpt_path, lock, created = os.path.join(cfg["out"], "ckpt.pt"), None, False
    if os.environ.get("RANK", "0") == "0":  # the only process or rank 0; other ranks write nothing
        check_config(cfg, given)  # before anything is written
        lock, created = tr.claim_run_folder(cfg["out"])  # keeps a second train.py out
        tr.check_writable(files=[ckpt_path, os.path.join(cfg["out"], "metrics.jsonl")])
    try:
        train(resume, cfg, given)
    except BaseException as e:  # any failure, Ctrl-C included: leave the folder as a retry needs it
        if created and not os.path.exists(ckpt_path):
            shutil.rmtree(cfg["out"], ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C: say where the run stands, not a traceback
            raise tr.UserError(f"interrupted; the last checkpoint (step "
                               f"{tr.load_checkpoint(ckpt_path)['step']}) in {cfg['out']} is "
                               f"intact: continue with python train.py --resume --out {cfg['out']}"
                               if os.path.exists(ckpt_path) else "interrupted before the first "
                               "checkpoint; nothing was kept") from None
        raise
    finally:
        if lock is not None:
            lock.close()

def train(resume, cfg, given):
    """The run: config (a resume's is the checkpoint's), devices, data, model, the loop, the end."""
    ckpt_path, ckpt = os.path.join(cfg["out"], "ckpt.pt"), None
    if resume:  # the checkpoint's config, where only RESUME_OVERRIDES may differ
        ckpt = tr.load_checkpoint(ckpt_path, resumable=True)
        old = {**DEFAULTS, **{k: tuple(v) if isinstance(v, list) else v  # DEFAULTS: a key it lacks
                              for k, v in ckpt["config"].items()}}
        if clash := {k: old.get(k) for k, v in given.items()
                     if k not in RESUME_OVERRIDES and old.get(k) != v}:
            raise tr.UserError(f"--resume cannot change {', '.join(sorted(clash))}: the run was "
                               f"trained with {clash}; drop those flags")
        # --allow-new-data is asked each time
        cfg = {**old, "allow_new_data": False,
               **{k: v for k, v in given.items() if k in RESUME_OVERRIDES}}
    elif os.path.exists(ckpt_path):  # a new run never writes over another's checkpoint
        if tr.load_checkpoint(ckpt_path)["kind"] == tr.WEIGHTS_KIND:
            raise tr.UserError(f"{cfg['out']} holds exported weights (for reading a run, not for "
                               "continuing it); give --out another folder for a new run")
        raise tr.UserError(f"{cfg['out']} already holds a checkpoint; pass --resume to continue "
                           "it, or --out to start a new run elsewhere (nothing was overwritten)")
    check_config(cfg, given)  # again: a resume's config is the checkpoint's with the flags given
    # One process on --device, or one rank of torchrun's, each on its own GPU (NCCL) or on the CPU
    # (gloo). --batch-size is the GLOBAL batch: each rank takes its share, so that the gradient is
    # that of one process with the whole batch (tested against a single process).
    rank, world, device = 0, 1, tr.pick_device(cfg["device"])
    if "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if device.type == "cuda":  # the GPU torchrun assigned to this rank
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if cfg["batch_size"] % world:
            raise tr.UserError(f"--batch-size {cfg['batch_size']} is not divisible by the {world} "
                               "ranks")
    if cfg["amp"] and device.type != "cuda":
        raise tr.UserError(f"--amp (bf16 autocast) is for CUDA devices and this run is on "
                           f"{device}; drop --amp")
    log = print if rank == 0 else (lambda *a, **k: None)  # one rank speaks, the config first
    log("config: " + json.dumps(cfg, sort_keys=True))
    if device.type == "cpu" and cfg["preset"] == "paper":
        log(f"note: the `paper` preset ({cfg['steps']} steps of a 2.3M-parameter model at "
            f"{cfg['image_size']} px) is a GPU job that takes days on a CPU; for a CPU run add "
            "--preset cpu --image-size 32")
    # The run's state, filled in by the phases below and written by save_run.
    run = SimpleNamespace(cfg=cfg, rank=rank, world=world, device=device, log=log, step=0)
    data, sampler = load_data(run)
    build_model(run, ckpt, in_channels=data[0][0].shape[0])
    count = lambda module: sum(p.numel() for p in module.parameters())
    log(f"parameters: encoder {count(run.model.encoder):,}, score {count(run.model.score):,}; "
        f"{world} rank(s) x {cfg['batch_size'] // world} = global batch {cfg['batch_size']} on "
        f"{device}")
    train_loop(run, data, sampler)
    if world > 1:
        dist.destroy_process_group()
    log(f"done: {run.step} steps in {(time.time() - run.t_start) / 60:.1f} min; checkpoint "
        f"{cfg['out']}/ckpt.pt")

def load_data(run):
    """The training split and its sampler: a seeded DistributedSampler deals each rank its shard,
    epoch by epoch. Returns (data, sampler)."""
    cfg, world = run.cfg, run.world
    data = tr.run_datasets(cfg, splits=("train",), check=False)["train"]  # checked below
    # drop_last: every rank has as many batches, so no rank waits for one that is never sent
    sampler = DistributedSampler(data, num_replicas=world, rank=run.rank, shuffle=True,
                                 seed=cfg["seed"], drop_last=True)
    if len(sampler) < cfg["batch_size"] // world:
        raise tr.UserError(f"{len(data)} training images are fewer than one batch of "
                           f"{cfg['batch_size']}; pass --batch-size "
                           f"{max(world, len(data) // world * world)} or less, or use more images")
    # Which images these are, and the names of their classes (an image folder's class index means
    # the same class in every later script), in the config of every checkpoint. A resumed run
    # checks the key it was trained with (as probe.py and analyze.py do, by tr.run_datasets).
    key = tr.dataset_key(data)
    if cfg["data_key"] not in (None, key) and not cfg["allow_new_data"]:
        raise tr.UserError(f"the images at {cfg['data_root']} are not those {cfg['out']}/ckpt.pt "
                           "was trained on; give the run's --data-root, or add --allow-new-data "
                           "to continue on these")
    cfg["data_key"], cfg["classes"] = key, data.classes
    run.log(f"data: {len(data)} images of {tuple(data[0][0].shape)}")
    return data, sampler

def build_model(run, ckpt, in_channels):
    """The model, its EMA, Adam and the noise generator into `run`: fresh, or restored from the
    checkpoint with every random state, so that a resumed run continues bit for bit."""
    cfg, device, rank, world = run.cfg, run.device, run.rank, run.world
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    run.kwargs = tr.model_kwargs(cfg, in_channels=in_channels)  # saved: readers rebuild the model
    run.model = model = tr.DRLModel(**run.kwargs).to(device)
    if cfg["channels_last"]:  # NHWC convolutions: faster on CPUs and tensor cores
        run.model = model = model.to(memory_format=torch.channels_last)
    # The EMA of the weights starts at the initial weights and is what probe.py and analyze.py read.
    run.ema, run.t_start = copy.deepcopy(model).requires_grad_(False), time.time()
    # Fused Adam on CUDA: one kernel for the whole update; elsewhere the for-each form.
    run.opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8,
                               fused=device.type == "cuda")
    run.noise_gen = torch.Generator(device=device).manual_seed(cfg["seed"])  # same on all ranks
    if ckpt is None:
        torch.manual_seed(cfg["seed"] + rank)  # a dropout stream per rank
        return
    try:  # the weights, the EMA, Adam's moments and the random streams, as they were saved
        for part, key in ((model, "model"), (run.ema, "ema"), (run.opt, "optimizer")):
            part.load_state_dict(ckpt[key])
        run.noise_gen.set_state(ckpt["rng"]["noise"])
        ranks = ckpt["rng"]["ranks"]
        if len(ranks) == world:  # each rank continues its own dropout stream
            torch.set_rng_state(ranks[rank]["cpu"])
            if device.type == "cuda" and ranks[rank].get("cuda") is not None:
                torch.cuda.set_rng_state(ranks[rank]["cuda"], device)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise tr.UserError(f"{cfg['out']}/ckpt.pt does not fit the model it describes "
                           f"({type(e).__name__}); it is damaged or from another version: resume "
                           "from an intact copy or start a new run with another --out") from None
    run.step = ckpt["step"]
    if len(ranks) != world:  # another number of ranks: a seed per rank and step, never reused
        run.log(f"checkpoint saved with {len(ranks)} ranks, running {world}: dropout RNG reseeded")
        torch.manual_seed(cfg["seed"] + 7919 * rank + run.step)
    run.log(f"resumed from {cfg['out']}/ckpt.pt at step {run.step}")

def train_loop(run, data, sampler):
    """The training steps of eq. 4, each with its log line and checkpoint when due. The batches
    follow from the step alone, so a resumed run sees exactly those of the uninterrupted one."""
    cfg, device, rank, world, opt = run.cfg, run.device, run.rank, run.world, run.opt
    # What a step calls: the model wrapped for DDP (gradients averaged across ranks) and/or
    # compiled; run.model keeps the plain weights that the EMA and the checkpoint read.
    step_model = run.model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        run.model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = torch.compile(step_model) if cfg["compile"] else step_model
    params, ema_params = list(run.model.parameters()), list(run.ema.parameters())
    image_shape, per_rank = tuple(data[0][0].shape), cfg["batch_size"] // world
    steps_per_epoch = len(sampler) // per_rank  # each epoch drops its last partial batch
    metrics = Metrics(run)
    monitor = Monitor(run, data) if cfg["probe_every"] and rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg["amp"])  # no-op unless amp
    while run.step < cfg["steps"]:
        # This epoch's batches from the one the step reached, and the loader's own generator (else
        # it draws its worker seed from the global RNG, which would shift dropout on a resume).
        epoch, offset = divmod(run.step, steps_per_epoch)
        sampler.set_epoch(epoch)
        batches = list(BatchSampler(sampler, per_rank, drop_last=True))[offset:]
        loader = DataLoader(data, batch_sampler=batches, num_workers=cfg["workers"],
                            pin_memory=cfg["workers"] > 0 and device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg["seed"] + epoch))
        for x0, _ in loader:  # the labels are not used: the model learns from the images alone
            x0 = x0.to(device, non_blocking=True)  # with pinned memory the copy overlaps the step
            x0 = x0.contiguous(memory_format=torch.channels_last) if cfg["channels_last"] else x0
            # t and the noise of the GLOBAL batch from a generator identical on every rank; rank r
            # takes rows r, r + world, ..., those of the images DistributedSampler dealt it.
            drawn = tr.sample_training_noise(cfg["batch_size"], image_shape, cfg["code_dim"],
                                             cfg["eps"], run.noise_gen, device, cfg["t_dist"],
                                             cfg["sigma_min"], cfg["sigma_max"])
            t, noise, code_noise = (v[rank::world] for v in drawn)
            lr = tr.learning_rate(run.step, cfg["lr"], cfg["warmup"], cfg["steps"], cfg["lr_decay"])
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast:  # eq. 4: the weighted denoising loss plus lambda_z times the regulariser
                loss, dsm, reg = step_model(x0, t, noise, code_noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg["clip"])  # the rare huge high-noise loss
            opt.step()
            tr.ema_update(ema_params, params, cfg["ema"])  # the EMA weights are what probes read
            metrics.add(loss, dsm, reg)
            run.step += 1
            # A log line every log_every steps, a checkpoint every ckpt_every (and at the last).
            # Every rank writes on the same steps (write reduces the losses over the ranks).
            last, save = run.step == cfg["steps"], run.step % cfg["ckpt_every"] == 0
            read = cfg["probe_every"] and (run.step % cfg["probe_every"] == 0 or last)
            if run.step % cfg["log_every"] == 0 or save or last or read:
                readout = monitor(run.ema.encoder) if read and monitor is not None else None
                metrics.write(run.step, lr, readout)  # where the host waits for the device
                if save or last:
                    save_run(run)
            if last:  # --steps may end mid-epoch
                break
    if monitor is not None:
        share = monitor.seconds / (time.time() - metrics.t_start)
        run.log(f"monitor: {monitor.seconds:.1f} s, {share:.1%} of the run's time")

class Monitor:
    """What the encoder has learnt, while it learns (--probe-every): the EMA encoder's codes of
    held-out images at a few times, each attribute read by kernel ridge regression fitted on
    training images' codes and scored on test images' (trajrep.kernel_readout). The labels are read
    here only: training never sees them. Seconds, where probe.py's MLPs take minutes."""
    TIMES, FIT, TEST = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), 600, 400  # times, images fitted / scored

    def __init__(self, run, data):
        test = tr.run_datasets(run.cfg, max_test=self.TEST, splits=("test",))["test"]
        fit = data.subset(min(self.FIT, len(data)), run.cfg["seed"])
        self.sets = [d.tensors() for d in (fit, test)]  # [(images, labels (N, A))] * 2
        self.attributes = list(zip(data.attributes, data.num_classes))
        self.times, self.seconds = torch.tensor(self.TIMES), 0.0

    def __call__(self, encoder):
        """({attribute: test accuracy per time}, the seconds it took)."""
        device = next(encoder.parameters()).device
        if device.type == "cuda":  # the queued training steps are not the monitor's time
            torch.cuda.synchronize(device)
        start = time.time()
        (c_fit, y_fit), (c_test, y_test) = [(tr.extract_trajectories(encoder, x, self.times), y)
                                            for x, y in self.sets]  # (N, T, D), (N, A)
        accuracy = {name: tr.kernel_readout((c_fit, y_fit[:, a]), (c_test, y_test[:, a]), k)
                    for a, (name, k) in enumerate(self.attributes)}
        seconds = time.time() - start
        self.seconds += seconds
        return accuracy, seconds

class Metrics:
    """The losses summed on the device between log lines. write() is the loop's one synchronising
    point, and where a non-finite loss stops the run before anything is saved, so that the last
    good checkpoint stays intact."""

    def __init__(self, run):
        self.run, self.path = run, os.path.join(run.cfg["out"], "metrics.jsonl")
        if run.rank == 0:  # a new run starts empty, a resume keeps its rows up to its step
            tr.cut_metrics(self.path, run.step)
        self.sums, self.step_last, self.t_start = None, run.step, time.time()
        self.t_last = self.t_start

    def add(self, loss, dsm, reg):
        """A step's losses into the sums, on the device (no .item(): the host does not wait)."""
        row = torch.stack([loss.detach(), dsm.detach(), reg.detach()]).float()  # (3,)
        self.sums = row if self.sums is None else self.sums + row

    def write(self, step, lr, readout=None):
        """The mean losses since the last write over all ranks, checked finite; a log line (images/s
        without the monitor's time, ETA, the monitor's best accuracy and its t per attribute) and a
        metrics.jsonl row."""
        run, sums, out = self.run, self.sums, self.run.cfg["out"]
        if run.world > 1:  # every rank joins
            dist.all_reduce(sums)
            sums /= run.world
        mean = (sums / (step - self.step_last)).tolist()  # the one host-device synchronisation
        if not all(math.isfinite(v) for v in mean):  # stop before save_run writes broken weights
            path = os.path.join(out, "ckpt.pt")
            raise tr.UserError(
                f"the loss became non-finite before step {step}; the last good checkpoint (step "
                f"{tr.load_checkpoint(path)['step']}) in {out} is intact: continue it with "
                "--resume and a lower --lr or a longer --warmup" if os.path.exists(path) else
                f"the loss became non-finite before step {step}, before any checkpoint was "
                "written; start again with a lower --lr or a longer --warmup")
        accuracy, seconds = readout or ({}, 0.0)
        now, batch = time.time(), run.cfg["batch_size"]
        images_per_s = (step - self.step_last) * batch / max(now - self.t_last - seconds, 1e-9)
        eta = (run.cfg["steps"] - step) * batch / max(images_per_s, 1e-9)
        best = "".join(f" {name} {acc.max():.0%}@{Monitor.TIMES[acc.argmax()]}"
                       for name, acc in accuracy.items())
        run.log(f"step {step:>7d} | loss {mean[0]:9.3f} (dsm {mean[1]:9.3f}, reg {mean[2]:8.3f}) "
                f"| {images_per_s:7.1f} img/s | ETA {eta / 60:6.1f} min" + (best and " |" + best))
        row = dict(step=step, loss=mean[0], dsm=mean[1], reg=mean[2], lr=lr,
                   images_per_s=images_per_s, elapsed_s=now - self.t_start)
        if accuracy:  # per attribute, the test accuracy at each of Monitor.TIMES
            row.update(readout={k: [round(a, 4) for a in v.tolist()] for k, v in accuracy.items()},
                       readout_times=Monitor.TIMES, readout_s=seconds)
        if run.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.sums, self.t_last, self.step_last = None, now, step

def save_run(run):
    """Writes the checkpoint (rank 0) with every rank's random state: the CPU and CUDA streams drive
    dropout, the shared generator draws t and the noise; with all of them, --resume is bit-exact."""
    mine = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(run.device)
                if run.device.type == "cuda" else None)
    rngs = [mine] * run.world
    if run.world > 1:  # every rank sends its own streams
        dist.all_gather_object(rngs, mine)
    if run.rank == 0:
        tr.save_checkpoint(os.path.join(run.cfg["out"], "ckpt.pt"), config=run.cfg,
                           model_kwargs=run.kwargs, step=run.step, model=run.model.state_dict(),
                           ema=run.ema.state_dict(), optimizer=run.opt.state_dict(),
                           rng=dict(noise=run.noise_gen.get_state(), ranks=rngs))

def stop(signum, frame):  # SIGTERM (kill, a scheduler's time limit) ends the run as Ctrl-C does
    raise KeyboardInterrupt

if __name__ == "__main__":  # a UserError ends the script with its one sentence, no traceback
    signal.signal(signal.SIGTERM, stop)
    try:
        main()
    except tr.UserError as e:
        sys.exit(f"error: {e}")

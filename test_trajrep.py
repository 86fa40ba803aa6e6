"""Tests of trajrep against answers known independently of the code: closed forms (VE-SDE marginal,
KL of Gaussians, the optimal score of Gaussian data, MI of correlated Gaussians), loop forms of
batched computations, bit-exact resume, and the promised error messages. CPU, a few minutes in all.

    python -m pytest -q test_trajrep.py
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import trajrep as tr

HERE = os.path.dirname(os.path.abspath(__file__))
# A tiny model so that training tests take seconds.
TINY = ["--nf", "8", "--enc-widths", "8,8,8", "--code-dim", "8", "--ch-mult", "1,2", "--batch-size", "8",
        "--num-train", "64", "--log-every", "2", "--warmup", "2"]


def run_train(*argv):
    import train
    train.main(list(argv))


# ------------------------------------------------------------------------------------------------
# SDE (eq. 1)
# ------------------------------------------------------------------------------------------------

def test_sigma_closed_form():
    t = torch.tensor([0.0, 0.5, 1.0])
    s = tr.ve_sigma(t, 0.01, 50.0)
    assert torch.allclose(s, torch.tensor([0.01, math.sqrt(0.01 * 50.0), 50.0]), rtol=1e-6)
    # g(t)^2 = d sigma^2 / dt, by finite differences
    h = 1e-4
    fd = (tr.ve_sigma(torch.tensor(0.3 + h), 0.01, 50.0) ** 2 - tr.ve_sigma(torch.tensor(0.3 - h), 0.01, 50.0) ** 2) / (2 * h)
    assert abs(tr.ve_diffusion(torch.tensor(0.3)) ** 2 / fd - 1) < 1e-4


def test_marginal_std_matches_simulated_sde():
    """Euler-Maruyama of dx = g(t) dw from x(0) = x0 + sigma_min n: Var x(t) = sigma(t)^2 (Monte Carlo)."""
    gen = torch.Generator().manual_seed(0)
    smin, smax, n, steps = 0.01, 5.0, 40000, 1000
    x0 = 1.5
    x = x0 + smin * torch.randn(n, generator=gen, dtype=torch.float64)
    dt = 1.0 / steps
    checks = {300: None, 700: None, 1000: None}
    for k in range(steps):
        t = (k + 0.5) * dt  # midpoint g keeps the discretisation error O(dt^2)
        x = x + tr.ve_diffusion(torch.tensor(t, dtype=torch.float64), smin, smax) * math.sqrt(dt) * \
            torch.randn(n, generator=gen, dtype=torch.float64)
        if k + 1 in checks:
            mean, std = tr.ve_marginal(torch.tensor(x0), torch.tensor((k + 1) * dt), smin, smax)
            assert abs(x.mean().item() - x0) < 4 * std.item() / math.sqrt(n)
            assert abs(x.std().item() / std.item() - 1) < 0.02  # MC std error of a std ~ 1/sqrt(2n) = 0.4%


# ------------------------------------------------------------------------------------------------
# Losses (eq. 3-4)
# ------------------------------------------------------------------------------------------------

class ZeroEncoder(nn.Module):
    def __init__(self, d=4, probabilistic=False):
        super().__init__()
        self.d, self.probabilistic = d, probabilistic

    def forward(self, x0, t):
        z = torch.zeros(len(x0), self.d)
        return (z, z) if self.probabilistic else (z, None)


def test_dsm_loss_with_exact_score_of_gaussian_data():
    """x0 ~ N(m, s^2 I): the optimal score is -(x - m) / (s^2 + sigma^2) and the sigma^2-weighted DSM
    loss per example is 0.5 * d * s^2 / (s^2 + sigma^2); a perturbed score does worse."""
    gen = torch.Generator().manual_seed(1)
    m, s, B, shape = 0.3, 0.7, 20000, (3, 4, 4)
    d = 3 * 4 * 4
    x0 = m + s * torch.randn(B, *shape, generator=gen)
    for t_val in (0.2, 0.5):
        t = torch.full((B,), t_val)
        noise = torch.randn(B, *shape, generator=gen)
        sigma2 = tr.ve_sigma(torch.tensor(t_val), 0.01, 2.0).item() ** 2
        exact = lambda xt, z, t: -(xt - m) / (s ** 2 + sigma2)
        loss, dsm, reg = tr.drl_loss(ZeroEncoder(), exact, x0, t, noise, None, 1e-5, 0.01, 2.0)
        expected = 0.5 * d * s ** 2 / (s ** 2 + sigma2)
        assert abs(dsm.item() / expected - 1) < 0.02
        assert reg.item() == 0.0
        for wrong in (lambda xt, z, t: 1.1 * exact(xt, z, t), lambda xt, z, t: exact(xt, z, t) + 0.05):
            assert tr.drl_loss(ZeroEncoder(), wrong, x0, t, noise, None, 0, 0.01, 2.0)[1] > dsm


def test_kl_against_torch_distributions():
    mu, logvar = torch.randn(5, 7), torch.randn(5, 7)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert torch.allclose(tr.kl_std_normal(mu, logvar), torch.distributions.kl_divergence(q, p).sum(1), atol=1e-5)
    assert torch.allclose(tr.code_regulariser(mu, None), mu.abs().sum(1).mean())


def tiny_model(probabilistic=False):
    torch.manual_seed(0)
    return tr.DRLModel(probabilistic=probabilistic, code_dim=8, enc_widths=(8, 8, 8), enc_blocks=1, nf=8,
                       ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0)


def test_vdrl_representation_is_the_mean_and_training_samples():
    model = tiny_model(probabilistic=True)
    x, t = torch.randn(4, 3, 32, 32), torch.full((4,), 0.3)
    mu, logvar = model.encoder(x, t)
    traj = tr.extract_trajectories(model.encoder, x, t[:1])  # (4, 1, D)
    assert torch.allclose(traj[:, 0], mu, atol=1e-5)
    # training uses mu + exp(logvar / 2) * code_noise: a different code gives a different loss
    noise = torch.randn(4, 3, 32, 32)
    l0 = tr.drl_loss(model.encoder, model.score, x, t, noise, torch.zeros(4, 8))[1]
    with torch.no_grad():
        model.score.conv_out.weight.normal_()  # make the score depend on z visibly
    a = tr.drl_loss(model.encoder, model.score, x, t, noise, torch.zeros(4, 8))[1]
    b = tr.drl_loss(model.encoder, model.score, x, t, noise, 3 * torch.ones(4, 8))[1]
    assert torch.isfinite(l0) and a != b


def test_trajectory_is_not_degenerate():
    """E(x, t1) - E(x, t2) depends on x: time acts inside the encoder, not as an output offset."""
    model = tiny_model()
    x = torch.randn(16, 3, 32, 32)
    traj = tr.extract_trajectories(model.encoder, x, torch.tensor([0.1, 0.9]))  # (16, 2, D)
    diff = traj[:, 0] - traj[:, 1]  # (16, D)
    assert diff.std(0).mean() > 1e-3 * traj[:, 0].std(0).mean()


def test_extraction_one_call_equals_per_t_loop():
    model = tiny_model()
    x, times = torch.randn(10, 3, 32, 32), tr.paper_times(11)
    batched = tr.extract_trajectories(model.encoder, x, times, batch_size=33)  # chunks of 3 images
    with torch.no_grad():
        loop = torch.stack([model.encoder(x, t.repeat(len(x)))[0] for t in times], 1)  # (N, T, D)
    assert torch.allclose(batched, loop, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def test_shapes_labels_match_pixels():
    images, labels = tr.make_shapes(300, 32, seed=3)
    images2, labels2 = tr.make_shapes(300, 32, seed=3)
    assert np.array_equal(images, images2) and np.array_equal(labels, labels2)  # deterministic
    shape, fg, bg, loc = labels.T
    assert (fg != bg).all()
    for i in range(len(images)):
        assert (images[i, 0, 0] == tr.COLOURS[bg[i]]).all()  # corner pixel is the background colour
        mask = (images[i] == tr.COLOURS[fg[i]]).all(-1)  # (H, W) object pixels
        assert mask.sum() >= 20
        ys, xs = np.nonzero(mask)
        col, row = int((xs.mean() + 0.5 - 4) // 6), int((ys.mean() + 0.5 - 4) // 6)
        assert row * 4 + col == loc[i]  # the object's centroid lies in the labelled cell
    # the five shapes differ in how much of their bounding box they fill (a human sees the shape)
    fill = np.zeros(5)
    for k in range(5):
        sel = np.nonzero(shape == k)[0][:20]
        fill[k] = np.mean([(images[i] == tr.COLOURS[fg[i]]).all(-1).sum() for i in sel])
    assert len(np.unique(fill.round())) == 5
    # train and test splits differ; items are in [-1, 1]
    tr_ds, te_ds = tr.load_dataset("shapes", "train", num_examples=50), tr.load_dataset("shapes", "test", num_examples=50)
    assert not torch.equal(tr_ds[0][0], te_ds[0][0])
    x, y = tr_ds[0]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1 and y.shape == (4,)


def test_folder_dataset_and_missing_folder(tmp_path):
    from PIL import Image
    for split in ("train", "test"):
        for c, colour in enumerate(((255, 0, 0), (0, 0, 255))):
            os.makedirs(tmp_path / split / f"class{c}")
            for i in range(3):
                Image.new("RGB", (20, 20), colour).save(tmp_path / split / f"class{c}" / f"{i}.png")
    ds = tr.load_dataset("folder", "train", str(tmp_path), image_size=16)
    assert len(ds) == 6 and ds.num_classes == (2,)
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and y.item() == 1 and x[2].min() > 0.99 and x[0].max() < -0.99  # blue
    with pytest.raises(tr.UserError, match="put the images in"):
        tr.load_dataset("folder", "train", str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty" / "train")
    with pytest.raises(tr.UserError, match="holds no images"):
        tr.load_dataset("folder", "train", str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------------------
# Training, checkpoints, resume
# ------------------------------------------------------------------------------------------------

def test_training_reduces_loss(tmp_path):
    run_train("--out", str(tmp_path), "--steps", "40", "--lr", "2e-3", "--nf", "8", "--code-dim", "8",
              "--num-train", "256", "--log-every", "10", "--batch-size", "16", "--warmup", "5")
    losses = [json.loads(l)["loss"] for l in open(tmp_path / "metrics.jsonl")]
    assert losses[-1] < 0.7 * losses[0]  # 1485 -> 869 when written


def state_equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("encoder", ["drl", "vdrl"])
def test_resume_is_bit_exact(tmp_path, encoder):
    common = TINY + ["--encoder", encoder, "--dropout", "0.1", "--ckpt-every", "3"]
    run_train(*common, "--out", str(tmp_path / "a"), "--steps", "6")
    run_train(*common, "--out", str(tmp_path / "b"), "--steps", "3")
    run_train(*common, "--out", str(tmp_path / "b"), "--steps", "6", "--resume")
    a, b = tr.load_checkpoint(str(tmp_path / "a")), tr.load_checkpoint(str(tmp_path / "b"))
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema", "optimizer", "rng"):
        assert state_equal(a[key], b[key]), key


def test_bad_checkpoints_give_one_sentence(tmp_path):
    with pytest.raises(tr.UserError, match="no checkpoint at"):
        tr.load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "ckpt.pt").write_bytes(b"\x80\x02garbage" * 10)
    with pytest.raises(tr.UserError, match="not a readable checkpoint"):
        tr.load_checkpoint(str(tmp_path))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(tr.UserError, match="not a trajrep training checkpoint"):
        tr.load_checkpoint(str(tmp_path / "other.pt"))
    # the scripts turn it into one line on stderr, no traceback
    for script in ("train.py", "probe.py", "analyze.py"):
        argv = ["--resume", "--out", str(tmp_path)] if script == "train.py" else [str(tmp_path)]
        p = subprocess.run([sys.executable, os.path.join(HERE, script), *argv], capture_output=True, text=True)
        assert p.returncode != 0 and p.stderr.strip().startswith("error:") and "Traceback" not in p.stderr, p.stderr


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    run_train(*TINY, "--out", str(tmp_path), "--steps", "2", "--ckpt-every", "2")
    before = open(tmp_path / "ckpt.pt", "rb").read()
    forward = tr.DRLModel.forward
    calls = {"n": 0}

    def poisoned(self, *a):
        calls["n"] += 1
        loss, dsm, reg = forward(self, *a)
        return (loss * float("nan"), dsm, reg) if calls["n"] >= 2 else (loss, dsm, reg)

    monkeypatch.setattr(tr.DRLModel, "forward", poisoned)
    with pytest.raises(tr.UserError, match="non-finite.*last good checkpoint"):
        run_train(*TINY, "--out", str(tmp_path), "--steps", "6", "--ckpt-every", "2", "--resume")
    assert open(tmp_path / "ckpt.pt", "rb").read() == before
    assert tr.load_checkpoint(str(tmp_path))["step"] == 2


def test_impossible_flags_and_resume_clash(tmp_path):
    with pytest.raises(tr.UserError, match="must be positive"):
        run_train(*TINY, "--out", str(tmp_path), "--steps", "0")
    with pytest.raises(tr.UserError, match="sigma"):
        run_train(*TINY, "--out", str(tmp_path), "--sigma-min", "5", "--sigma-max", "1")
    with pytest.raises(tr.UserError, match="not divisible"):
        run_train(*TINY, "--out", str(tmp_path), "--image-size", "30", "--ch-mult", "1,2,2")
    run_train(*TINY, "--out", str(tmp_path), "--steps", "2")
    with pytest.raises(tr.UserError, match="cannot change lr"):
        run_train(*TINY, "--out", str(tmp_path), "--steps", "4", "--lr", "0.5", "--resume")

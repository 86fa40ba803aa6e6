"""trajrep: trajectory-based representations in diffusion models, as one readable library.

Implements "From Points to Functions: Infinite-Dimensional Representations in Diffusion Models"
(Mittal, Lajoie, Bauer, Mehrjou; paper.md), built on "Diffusion-Based Representation Learning"
(Abstreiter et al., "DRL"). A diffusion model with a learned encoder maps each image x0 to a curve
t -> E(x0, t), t in [0, 1]; probes read the curve (Figure 1), MINE measures how information changes
along it (Figure 2), and a Transformer probe shows which part it attends to (Figure 3).

Sections, in reading order (each banner-marked below); the method first, the speed machinery last:
    SDE                sigma(t), the perturbation kernel, training draws          (paper eq. 1)
    networks           time embedding, time-aware encoder E(x0, t), score U-Net s(x_t, z, t)
    losses             weighted denoising score matching (sigma^2 or EDM weight)   (eq. 3-4)
                       + the code regulariser; the learning-rate schedule and the EMA
    data               embedded `shapes`, CIFAR-10/100, Mini-ImageNet, any image folder
    trajectories       E(x0, t) on a grid of times, as one (B, T, D) tensor       (section 2.1)
    probes             MLPs, GRU, Transformer, and train_probe, which trains one  (Figure 1, 3)
    mutual information MINE for one pair, and the NMI matrix                      (Figure 2)
    curve analysis     attention densities, the eq. 5 separation profile
    checkpoints        atomic save, safe load (weights_only=True), exported weights, run folders,
                       loading an encoder and its random-init control, devices
    speed              the grouped forms of the probes and of MINE, and the probe protocol
                       (every learning rate x seed x input) that trains them: what the scripts run

This file is a library: no argparse, no I/O and no device probing at import. The scripts are
train.py (eq. 4 training), probe.py (Figure 1 and 3), analyze.py (Figure 2) and bench.py (speed).

Shape legend, used in every shape comment (one letter, one meaning):
    B batch, N examples in a whole split, A attributes (labels per example), K classes;
    C, H, W image channels, height, width; D code size;
    T time points on a trajectory, M points of the fine grid the grid-free probe trains on;
    R readouts of one probe (T for the per-t MLPs, else 1); U hidden units of a GRU probe;
    E width of a Transformer probe (nh its attention heads);
    G independent models trained together as the groups of one (probes: inputs x seeds x learning
    rates; MINE: seeds x pairs), V inputs sharing labels (e.g. trained and random-init codes),
    S seeds, L learning rates, P pairs of time points.
"""
import hashlib
import json
import math
import os
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class UserError(Exception):
    """An error the user can fix; scripts print its one-sentence message and exit (STYLE rule 9)."""


# =================================================================================================
# SDE: the Variance Exploding SDE of paper eq. 1
# =================================================================================================
# dx = sqrt(d[sigma^2(t)]/dt) dw with sigma(t) = sigma_min * (sigma_max / sigma_min)^t.
# Paper eq. 1 writes the kernel variance as sigma^2(t) - sigma^2(0). Like the published code (and
# Song et al.'s VE-SDE), we take the process to start from data already blurred by N(0, sigma_min^2)
# (x(0) = x0 + sigma_min * n): then x_t | x0 ~ N(x0, sigma(t)^2 I) EXACTLY, and t = 0 is well
# defined (sigma(0) = sigma_min > 0) for the paper's trajectory grid, which includes t = 0. The test
# suite checks this variance against an Euler-Maruyama simulation of the SDE itself.

def ve_sigma(t, sigma_min=0.01, sigma_max=50.0):
    """sigma(t) = sigma_min * (sigma_max / sigma_min)^t, the noise scale of the VE-SDE (eq. 1)."""
    return sigma_min * (sigma_max / sigma_min) ** t


def ve_diffusion(t, sigma_min=0.01, sigma_max=50.0):
    """g(t) = sqrt(d[sigma^2(t)]/dt) = sigma(t) * sqrt(2 log(sigma_max / sigma_min)) (eq. 1)."""
    return ve_sigma(t, sigma_min, sigma_max) * math.sqrt(2.0 * math.log(sigma_max / sigma_min))


def ve_marginal(x0, t, sigma_min=0.01, sigma_max=50.0):
    """Mean and std of the perturbation kernel p_0t(x_t | x0) = N(x0, sigma(t)^2 I).

    x0: (B, ...), t: (B,) -> mean (B, ...), std (B,)."""
    return x0, ve_sigma(t, sigma_min, sigma_max)


T_DISTRIBUTIONS = ("uniform", "sigma", "mixture")


def times_from_uniform(u, coin, t_dist="uniform", eps=1e-5, sigma_min=0.01, sigma_max=50.0):
    """Training times from uniform draws u, coin in [0, 1) (B,), by the distribution `t_dist`:

    'uniform'  t ~ U(eps, 1), the published choice: log sigma is uniform, so most draws are at noise
               levels where x_t still shows the image and the denoiser hardly needs the code.
    'sigma'    sigma(t) ~ U(sigma_min, sigma_max), the DRL paper's remedy (its section 2.3): nearly
               all draws at high noise, where the code must carry the image. Density in t:
               p(t) = sigma(t) log(sigma_max / sigma_min) / (sigma_max - sigma_min).
    'mixture'  'uniform' where coin < 1/2, else 'sigma': high noise is trained often, and every
               t in [0, 1] is still trained (the trajectory is read on all of [0, 1]).
    Times are clipped to [eps, 1]. Returns t (B,)."""
    if t_dist not in T_DISTRIBUTIONS:
        raise ValueError(f"unknown time distribution {t_dist!r}; choose from {T_DISTRIBUTIONS}")
    t_unif = eps + (1.0 - eps) * u  # (B,)
    sigma = sigma_min + (sigma_max - sigma_min) * u  # (B,) uniform on [sigma_min, sigma_max]
    # (B,)
    t_sigma = (torch.log(sigma / sigma_min) / math.log(sigma_max / sigma_min)).clamp(eps, 1.0)
    if t_dist == "uniform":
        return t_unif
    if t_dist == "sigma":
        return t_sigma
    return torch.where(coin < 0.5, t_unif, t_sigma)


def sample_training_noise(batch_size, image_shape, code_dim, eps=1e-5, generator=None, device=None,
                          t_dist="uniform", sigma_min=0.01, sigma_max=50.0):
    """All randomness of one training step, drawn in one place so that it can be sliced per rank.

    t from `t_dist` (see times_from_uniform; the published code's t ~ U(eps, 1), eps = 1e-5 keeping
    sigma away from its floor), the Gaussian noise of the kernel, and the Gaussian of the VDRL
    reparameterisation. Drawing the GLOBAL batch on every rank from one shared generator and slicing
    it (train.py) makes N ranks bit-compatible with one process at the same global batch.
    Returns t (B,), noise (B, C, H, W), code_noise (B, D)."""
    u, coin = torch.rand(2, batch_size, generator=generator, device=device)  # 2 x (B,)
    t = times_from_uniform(u, coin, t_dist, eps, sigma_min, sigma_max)  # (B,)
    # (B, C, H, W)
    noise = torch.randn(batch_size, *image_shape, generator=generator, device=device)
    code_noise = torch.randn(batch_size, code_dim, generator=generator, device=device)  # (B, D)
    return t, noise, code_noise


# =================================================================================================
# Networks: time embedding, time-aware encoder E(x0, t), encoder-conditioned score U-Net
# =================================================================================================

def group_norm(channels):
    """GroupNorm with up to 32 groups of at least 4 channels (as in NCSN++).

    GroupNorm rather than the published WideResNet's BatchNorm: the encoder's output for one image
    must not depend on which other images share its batch (trajectory extraction batches many t of
    one image together), and there are no running statistics to keep in sync across DDP ranks."""
    return nn.GroupNorm(max(1, min(32, channels // 4)), channels)


class TimeEmbedding(nn.Module):
    """Embeds t through Gaussian Fourier features of log sigma(t), then two Linear layers.

    As in the published code: 16 random frequencies W ~ N(0, 16^2) (a fixed buffer, saved with the
    weights), features [sin(2 pi W log sigma), cos(2 pi W log sigma)]. Input t (B,) -> (B, dim)."""

    def __init__(self, dim, sigma_min, sigma_max, num_freqs=16, scale=16.0):
        super().__init__()
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.register_buffer("freqs", torch.randn(num_freqs) * scale)
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        log_sigma = torch.log(ve_sigma(t, self.sigma_min, self.sigma_max))  # (B,)
        angle = 2 * math.pi * log_sigma[:, None] * self.freqs[None, :]  # (B, F)
        return self.mlp(torch.cat([angle.sin(), angle.cos()], dim=1))  # (B, dim)


class CondResBlock(nn.Module):
    """Pre-activation residual block whose features are modulated by a conditioning vector.

    h -> conv(SiLU(GN(h))) -> GN -> * (1 + scale(c)) + shift(c) -> SiLU -> dropout -> conv, + skip.
    The condition acts INSIDE the block, before a non-linearity. In the encoder the condition is the
    time embedding, so E(x0, t) is a genuinely non-linear function of (x0, t); had t entered only
    the last layer, E(x0, t) = A h(x0) + b(t) and every trajectory would be one point shifted by an
    image-independent offset. Used by both the encoder and the score network (one class, not two).
    Input h (B, C_in, H, W), c (B, cond_dim) -> (B, C_out, H / stride, W / stride)."""

    def __init__(self, c_in, c_out, cond_dim, stride=1, dropout=0.0):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.cond = nn.Linear(cond_dim, 2 * c_out)  # per-channel scale and shift
        self.norm2 = group_norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = (nn.Identity() if c_in == c_out and stride == 1
                     else nn.Conv2d(c_in, c_out, 1, stride=stride))

    def forward(self, h, c):
        x = self.conv1(F.silu(self.norm1(h)))  # (B, C_out, H', W')
        # 2 x (B, C_out, 1, 1)
        scale, shift = self.cond(F.silu(c))[:, :, None, None].chunk(2, dim=1)
        x = self.norm2(x) * (1 + scale) + shift
        x = self.conv2(self.dropout(F.silu(x)))
        return x + self.skip(h)


class SelfAttention2d(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map (NCSN++ at 16x16)."""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, h):
        B, C, H, W = h.shape
        # (B, HW, C)
        q, k, v = self.qkv(self.norm(h)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return h + self.proj(out.transpose(1, 2).reshape(B, C, H, W))


# how the last feature map becomes the code; see Encoder
ENCODER_HEADS = ("pool", "flatten", "both")


class Encoder(nn.Module):
    """Time-aware encoder E_phi(x0, t) on the CLEAN image x0 (paper eq. 4).

    A wide ResNet: a 3x3 stem, then one stage per entry of `widths`, each of `blocks` CondResBlocks
    conditioned on the time embedding (the first block of every stage after the first halves the
    resolution), then GroupNorm, SiLU and a Linear head. widths=(32, 64, 128) with blocks=4 is the
    published WRN-28-2 (code size 64 * 2 = 128).

    Time conditioning departs from the published code, which adds a bias Linear(emb(t)) after the
    first conv of each block: here emb(t) SCALES and shifts the features before a non-linearity
    (CondResBlock), so that the curve is not one point plus an image-independent offset.
    head='pool' (published): global average pooling, then Linear; WHERE something is survives only
    through padding effects. head='flatten': the last feature map, flattened, then Linear, so the
    code can say where the object is (needs image_size to size the Linear). head='both': the pooled
    and the flattened features side by side, then Linear: what is there, wherever it is, and where.

    probabilistic=False (DRL): the head gives the code z = mu, and logvar is None.
    probabilistic=True (VDRL): the head gives mu and log-variance; training samples
    z = mu + exp(logvar / 2) * n, and the representation used downstream is mu.
    Input x0 (B, C, H, W), t (B,) -> mu (B, D), logvar (B, D) or None."""

    def __init__(self, in_channels, code_dim, widths, blocks, probabilistic,
                 sigma_min, sigma_max, temb_dim=64, head="pool", image_size=32):
        super().__init__()
        if head not in ENCODER_HEADS:
            raise ValueError(f"unknown encoder head {head!r}; choose from {ENCODER_HEADS}")
        self.code_dim, self.probabilistic, self.head_kind = code_dim, probabilistic, head
        self.temb = TimeEmbedding(temb_dim, sigma_min, sigma_max)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        layers, c = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(CondResBlock(c, w, temb_dim, stride=2 if (i > 0 and j == 0) else 1))
                c = w
        self.blocks = nn.ModuleList(layers)
        self.norm = group_norm(c)
        r = image_size // 2 ** (len(widths) - 1)  # side of the last feature map
        features = {"pool": c, "flatten": c * r * r, "both": c * (r * r + 1)}[head]
        self.head = nn.Linear(features, code_dim * (2 if probabilistic else 1))

    def forward(self, x0, t):
        temb = self.temb(t)  # (B, temb_dim)
        h = self.stem(x0)  # (B, W0, H, W)
        for block in self.blocks:
            h = block(h, temb)
        h = F.silu(self.norm(h))  # (B, C_last, r, r)
        if self.head_kind == "pool":
            h = h.mean(dim=(2, 3))  # (B, C)
        elif self.head_kind == "flatten":
            h = h.flatten(1)  # (B, C*r*r)
        else:
            h = torch.cat([h.mean(dim=(2, 3)), h.flatten(1)], dim=1)  # (B, C + C*r*r)
        out = self.head(h)  # (B, D) or (B, 2D)
        if not self.probabilistic:
            return out, None
        mu, logvar = out.chunk(2, dim=1)  # 2 x (B, D)
        return mu, logvar


PRECONDS = ("sigma", "edm")  # how the network output becomes a score; see ScoreNet


class ScoreNet(nn.Module):
    """Encoder-conditioned score network s_theta(x_t, z, t) of paper eq. 4: a small NCSN++-like
    U-Net.

    How z enters, and why: the code is mapped by Linear(z) to temb_dim features and concatenated
    with the time embedding, c = [emb(t), Linear(z)]. It enters by two routes, as in the published
    code: (1) c modulates EVERY residual block through a per-channel scale and shift (CondResBlock;
    the published code adds a per-channel bias only; scale-and-shift lets z act multiplicatively);
    (2) Linear(c) is reshaped to a map of `map_channels` x r x r (r the lowest resolution) and
    concatenated to the bottleneck features. Route (1) is spatially uniform: it can say WHAT (a
    colour) but hardly WHERE; route (2) gives the code a direct spatial path to the decoder.

    How the network's output F becomes a score (`precond`):
    'sigma' (published): s = F(x_t) / sigma, so F predicts -noise; the denoised image is
        D = x_t + sigma^2 s = x_t + sigma F. At sigma = 50 an error of 0.01 in F is an error of 0.5
        in D: the network can hardly express what the code says about x0 at high noise.
    'edm' (Karras et al. 2022, "Elucidating the design space", eq. 7): D = c_skip x_t + c_out F(c_in
        x_t) with c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
        c_in = 1 / sqrt(sigma^2 + sd^2) (sd = sigma_data, the data's std), and s = (D - x_t) /
        sigma^2. At high noise F predicts x0 / sd directly, from the code: the denoiser there is the
        decoder of an autoencoder whose encoder is E(x0, t).
    Input x_t (B, C, H, W), z (B, D), t (B,) -> score (B, C, H, W)."""

    def __init__(self, in_channels, code_dim, nf, ch_mult, num_res_blocks, attn_resolutions,
                 image_size, sigma_min, sigma_max, dropout=0.0, map_channels=32, precond="sigma",
                 sigma_data=0.5):
        super().__init__()
        if precond not in PRECONDS:
            raise ValueError(f"unknown preconditioning {precond!r}; choose from {PRECONDS}")
        temb_dim = 4 * nf
        cond_dim = 2 * temb_dim
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.precond, self.sigma_data = precond, sigma_data
        self.temb = TimeEmbedding(temb_dim, sigma_min, sigma_max)
        self.code_proj = nn.Linear(code_dim, temb_dim)
        self.conv_in = nn.Conv2d(in_channels, nf, 3, padding=1)
        # Down path: num_res_blocks blocks per level, attention at the listed resolutions.
        self.down, chans, c, res = nn.ModuleList(), [nf], nf, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(
                    nn.ModuleList(
                        [
                            CondResBlock(c, nf * mult, cond_dim, dropout=dropout),
                            SelfAttention2d(nf * mult)
                            if res in attn_resolutions
                            else nn.Identity(),
                        ]
                    )
                )
                c = nf * mult
                chans.append(c)
            if level < len(ch_mult) - 1:
                self.down.append(nn.AvgPool2d(2))
                chans.append(c)
                res //= 2
        self.map_shape = (map_channels, res, res)  # route (2): the code as a map at the bottleneck
        self.code_map = nn.Linear(cond_dim, map_channels * res * res)
        self.mid1 = CondResBlock(c + map_channels, c, cond_dim, dropout=dropout)
        self.mid_attn = SelfAttention2d(c)
        self.mid2 = CondResBlock(c, c, cond_dim, dropout=dropout)
        # Up path: num_res_blocks + 1 blocks per level, each taking one skip connection.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(
                    nn.ModuleList(
                        [
                            CondResBlock(c + chans.pop(), nf * mult, cond_dim, dropout=dropout),
                            SelfAttention2d(nf * mult)
                            if res in attn_resolutions
                            else nn.Identity(),
                        ]
                    )
                )
                c = nf * mult
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                res *= 2
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # start at s = 0: the loss starts at 0.5 * C*H*W
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, xt, z, t):
        sigma = ve_sigma(t, self.sigma_min, self.sigma_max)[:, None, None, None]  # (B, 1, 1, 1)
        c_in = 1.0 if self.precond == "sigma" else torch.rsqrt(sigma ** 2 + self.sigma_data ** 2)
        c = torch.cat([self.temb(t), self.code_proj(z)], dim=1)  # (B, 2 * temb_dim)
        h = self.conv_in(xt * c_in)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, nn.ModuleList):
                h = layer[1](layer[0](h, c))
            else:
                h = layer(h)  # 2x average-pool downsampling
            skips.append(h)
        code_map = self.code_map(F.silu(c)).reshape(len(c), *self.map_shape)  # (B, 32, r, r)
        h = self.mid2(self.mid_attn(self.mid1(torch.cat([h, code_map], dim=1), c)), c)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = layer[1](layer[0](torch.cat([h, skips.pop()], dim=1), c))
            else:
                h = layer(h)  # 2x nearest upsampling
        out = self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W), the network output F
        if self.precond == "sigma":
            return out / sigma  # s = F / sigma
        sd2 = self.sigma_data ** 2
        denoised = (
            sd2 / (sigma**2 + sd2) * xt
            + sigma * self.sigma_data * torch.rsqrt(sigma**2 + sd2) * out
        )
        return (denoised - xt) / sigma ** 2  # Tweedie: s = (D - x_t) / sigma^2


class DRLModel(nn.Module):
    """Encoder + score network trained together by eq. 4; forward returns the loss so that one
    DistributedDataParallel wrapper covers both networks.

    forward(x0 (B, C, H, W), t (B,), noise (B, C, H, W), code_noise (B, D)) -> loss, dsm, reg."""

    def __init__(self, in_channels=3, image_size=32, probabilistic=False, code_dim=128,
                 enc_widths=(32, 64, 128), enc_blocks=4, nf=16, ch_mult=(1, 2, 2, 2),
                 num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, lambda_z=1e-5,
                 sigma_min=0.01, sigma_max=50.0, enc_head="pool", precond="sigma",
                 weighting="sigma2", sigma_data=0.5):
        super().__init__()
        if image_size % 2 ** (len(ch_mult) - 1):
            raise UserError(f"image size {image_size} is not divisible by 2^{len(ch_mult) - 1} for "
                            f"channel multipliers {tuple(ch_mult)}; pick another --image-size or "
                            "--ch-mult")
        self.lambda_z, self.sigma_min, self.sigma_max = lambda_z, sigma_min, sigma_max
        self.weighting, self.sigma_data = weighting, sigma_data
        self.encoder = Encoder(in_channels, code_dim, tuple(enc_widths), enc_blocks, probabilistic,
                               sigma_min, sigma_max, head=enc_head, image_size=image_size)
        self.score = ScoreNet(in_channels, code_dim, nf, tuple(ch_mult), num_res_blocks,
                              tuple(attn_resolutions), image_size, sigma_min, sigma_max, dropout,
                              precond=precond, sigma_data=sigma_data)

    def forward(self, x0, t, noise, code_noise):
        return drl_loss(self.encoder, self.score, x0, t, noise, code_noise, self.lambda_z,
                        self.sigma_min, self.sigma_max, self.weighting, self.sigma_data)


# =================================================================================================
# Losses and the training schedule: paper eq. 3-4, the DRL / VDRL regularisers, learning rate, EMA
# =================================================================================================

WEIGHTINGS = ("sigma2", "edm")


def loss_weight(sigma, weighting="sigma2", sigma_data=0.5):
    """lambda(sigma) / sigma^2 for the weighting lambda of the score-matching loss (eq. 3-4).

    The paper gives no lambda(t); these are the two offered:
    'sigma2' (the published code): lambda = sigma^2, i.e. ||sigma s + noise||^2, the error of the
        predicted noise. In terms of the denoised image D = x_t + sigma^2 s it is ||D - x0||^2 /
        sigma^2: at high noise, the only place where the denoiser NEEDS the code, errors count
        1/sigma^2 as much (1/2500 at sigma = 50). The code then learns what helps at low noise: the
        background.
    'edm' (Karras et al. 2022, eq. 8): lambda = sigma^2 (sigma^2 + sd^2) / sd^2, i.e. the D-space
        weight (sigma^2 + sd^2) / (sigma sd)^2: errors in D count about 1/sd^2 at high noise, so
        there the loss is an autoencoder's reconstruction error through the code, and 1/sigma^2 at
        low noise as before.
    sigma (B,) -> (B,)."""
    if weighting == "sigma2":
        return torch.ones_like(sigma)
    if weighting == "edm":
        return 1.0 + sigma ** 2 / sigma_data ** 2
    raise ValueError(f"unknown weighting {weighting!r}; choose from {WEIGHTINGS}")


def dsm_loss(score, noise, sigma, weight=None):
    """Weighted denoising score matching (eq. 3-4) for x_t = x0 + sigma * noise.

    The kernel's score is grad log p_0t(x_t | x0) = -(x_t - x0) / sigma^2 = -noise / sigma, so
    lambda(t) ||s - target||^2 is (lambda / sigma^2) ||sigma * s + noise||^2; weight = lambda /
    sigma^2 per example (loss_weight; None: lambda = sigma^2, the published code's).
    Per example 0.5 * sum over pixels, averaged over the batch (as the published code).
    score, noise (B, C, H, W), sigma (B,), weight (B,) or None -> scalar."""
    err = sigma[:, None, None, None] * score + noise  # (B, C, H, W)
    per_example = 0.5 * err.pow(2).flatten(1).sum(1)  # (B,)
    return (per_example if weight is None else weight * per_example).mean()


def kl_std_normal(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over code dims, per example. (B, D) -> (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)


def code_regulariser(mu, logvar):
    """DRL: L1 norm of the code, sum |z|; VDRL: KL to N(0, I). Both averaged over the batch."""
    if logvar is None:
        return mu.abs().sum(1).mean()
    return kl_std_normal(mu, logvar).mean()


def drl_loss(encoder, score_net, x0, t, noise, code_noise, lambda_z=1e-5,
             sigma_min=0.01, sigma_max=50.0, weighting="sigma2", sigma_data=0.5):
    """The DRL / VDRL objective, eq. 4 (weighted by loss_weight) plus lambda_z times the
    regulariser.

    x_t = x0 + sigma(t) * noise is a draw of the kernel of eq. 1; the score network sees the code
    E(x0, t) of the clean image (DRL: the code itself; VDRL: mu + exp(logvar/2) * code_noise).
    x0, noise (B, C, H, W); t (B,); code_noise (B, D) -> (total, dsm, reg) scalars."""
    mean, sigma = ve_marginal(x0, t, sigma_min, sigma_max)  # (B, C, H, W), (B,)
    xt = mean + sigma[:, None, None, None] * noise  # (B, C, H, W), a draw of the eq. 1 kernel
    mu, logvar = encoder(x0, t)  # (B, D), (B, D) or None
    z = mu if logvar is None else mu + torch.exp(0.5 * logvar) * code_noise  # reparameterisation
    dsm = dsm_loss(score_net(xt, z, t), noise, sigma, loss_weight(sigma, weighting, sigma_data))
    reg = code_regulariser(mu, logvar)
    return dsm + lambda_z * reg, dsm, reg


LR_DECAYS = ("none", "cosine")  # learning-rate decay after the warm-up; see learning_rate


def learning_rate(step, lr, warmup, steps, decay="none"):
    """The learning rate of training step `step` (0-based): a linear warm-up over `warmup` steps to
    `lr`, then 'none' (the published code: constant) or 'cosine': lr * (1 + cos(pi * p)) / 2, where
    p goes from 0 at the end of the warm-up to 1 at step `steps`. A short run ends with small steps
    that average out the gradient noise of its last updates (the EMA does it only partly)."""
    if decay not in LR_DECAYS:
        raise ValueError(f"unknown learning-rate decay {decay!r}; choose from {LR_DECAYS}")
    rate = lr * min(1.0, (step + 1) / max(1, warmup))
    if decay == "cosine" and step >= warmup:
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        rate = lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return rate


@torch.no_grad()
def ema_update(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * param, for matching lists of tensors."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)



# =================================================================================================
# Data: embedded `shapes`, CIFAR-10/100, Mini-ImageNet, any class-per-folder image tree
# =================================================================================================
# Images are scaled to [-1, 1] (ToTensor, then 2x - 1), not by per-channel mean/std as the published
# code: the same transform then serves every dataset, including `shapes`, whose colours are
# saturated. sigma_max = 50 stays sensible: the largest pairwise distance between 32x32x3 images in
# [-1, 1] is at most 2 * sqrt(3072) = 111; train.py prints the measured value (about 100 for
# `shapes`, whose saturated colours fill most of the range).

SHAPE_NAMES = ("square", "circle", "triangle", "diamond", "cross")
COLOURS = np.array([[230, 25, 25], [25, 200, 25], [30, 60, 230], [240, 220, 20], [20, 210, 220],
                    [220, 30, 220], [245, 245, 245], [10, 10, 10], [245, 130, 20]], dtype=np.uint8)
TEXTURE_NAMES = ("solid", "h-stripes", "v-stripes", "checker")  # the fine-scale attribute
SHAPES_ATTRIBUTES = ("shape", "fg_colour", "bg_colour", "location", "texture")
SHAPES_CLASSES = (len(SHAPE_NAMES), len(COLOURS), len(COLOURS), 16, len(TEXTURE_NAMES))


def texture_mask(kind, xx, yy):
    """Pixels of a texture's second shade on integer pixel coordinates xx, yy (H, W): none (solid),
    every other row, every other column, or a checkerboard. Period 2 px: the finest pattern an
    image can hold, erased first by the noise (its contrast, about 0.4 in [-1, 1] units, is drowned
    once sigma passes it: t ~ 0.4 on the VE schedule, where shape and colour are still plain)."""
    if kind == 0:
        return np.zeros(xx.shape, dtype=bool)
    if kind == 1:
        return yy % 2 == 1
    if kind == 2:
        return xx % 2 == 1
    return (xx + yy) % 2 == 1


def shape_mask(kind, dx, dy, r):
    """Boolean mask of one shape of radius r (pixels) on offsets dx, dy from its centre (H, W)."""
    if kind == 0:  # square
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    if kind == 1:  # circle
        return dx ** 2 + dy ** 2 <= r ** 2
    if kind == 2:  # triangle, apex up: half-width grows linearly from the apex to the base
        return (dy >= -r) & (dy <= 0.7 * r) & (np.abs(dx) <= (dy + r) * 0.6)
    if kind == 3:  # diamond
        return np.abs(dx) + np.abs(dy) <= r
    return ((np.abs(dx) <= 0.3 * r) & (np.abs(dy) <= r)) | (
        (np.abs(dy) <= 0.3 * r) & (np.abs(dx) <= r)
    )


def make_shapes(n, image_size=32, seed=0, object_scale=1.5, texture=True):
    """The embedded synthetic dataset: n RGB images of one object with five labelled attributes.

    shape (5 kinds), foreground colour (9), background colour (9, never the foreground), location
    (16 cells of a 4x4 grid over the central part of the image, so that no object is clipped), and
    texture (4, TEXTURE_NAMES): the object is solid or carries a 2-pixel pattern whose second shade
    is its colour halfway to grey, (fg + 128) / 2. The first four are coarse (colours, outline,
    place); texture is the one at the finest spatial scale, to test where fine detail lives on the
    curve (REFERENCE s.8: the DRL paper's "coarse at high t, fine at low t"). The object's radius
    and its centre jitter a little inside the cell. Deterministic per seed; texture is drawn last,
    so the other four labels equal those of texture=False (the four-attribute version, plain
    objects, labels (n, 4): the data of runs made before texture existed).
    object_scale multiplies the radius (4 to 5.5 px at 32 px for 1.0, the first version's size) and
    the grid shrinks so that the object stays inside: a larger object is a larger share of the
    pixels, hence of the loss (1.5, the default: about 11% of the pixels instead of 5%; the encoder
    learnt faster, see docs/results.md). Beyond 1.5 the centres of neighbouring cells come closer
    than the jitter and the shape's own off-centre mass (a triangle's), and location becomes
    ambiguous. Returns images (n, H, W, 3) uint8 and labels (n, 5) int64 in SHAPES_ATTRIBUTES
    order."""
    rng = np.random.default_rng(seed)
    s = image_size / 32.0  # all geometry is laid out for 32 px and scaled
    shape = rng.integers(0, 5, n)
    fg = rng.integers(0, 9, n)
    bg = (fg + rng.integers(1, 9, n)) % 9  # never equal to fg
    loc = rng.integers(0, 16, n)
    radius = s * object_scale * rng.uniform(4.0, 5.5, n)
    # largest radius + jitter (<= 1 px) + half a pixel: 7 at scale 1
    margin = 5.5 * object_scale + 1.5
    spacing = (32.0 - 2 * margin) / 3  # 4 cells per axis: 6 px at scale 1
    # +-1 px at scale 1, less when cells are closer
    jitter = rng.uniform(-1, 1, (n, 2)) * min(1.0, spacing / 6)
    centres = s * (margin + spacing * np.stack([loc % 4, loc // 4], 1) + jitter)  # (n, 2) x, y
    pattern = rng.integers(0, len(TEXTURE_NAMES), n) if texture else np.zeros(n, dtype=np.int64)
    # (9, 3) each colour's second shade
    shade = ((COLOURS.astype(np.int64) + 128) // 2).astype(np.uint8)
    yi, xi = np.mgrid[0:image_size, 0:image_size]  # integer pixel coordinates (H, W)
    yy, xx = yi + 0.5, xi + 0.5  # pixel centres
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    for i in range(n):
        mask = shape_mask(shape[i], xx - centres[i, 0], yy - centres[i, 1], radius[i])  # (H, W)
        second = mask & texture_mask(pattern[i], xi, yi)  # (H, W) object pixels in the second shade
        images[i] = np.where(mask[:, :, None], COLOURS[fg[i]], COLOURS[bg[i]])
        images[i][second] = shade[fg[i]]
    labels = [shape, fg, bg, loc] + ([pattern] if texture else [])
    return images, np.stack(labels, 1).astype(np.int64)


class LabelledImages(torch.utils.data.Dataset):
    """A dataset of images in [-1, 1] with A integer attributes per image.

    `images` is either a uint8 array (N, H, W, C) held in memory (shapes) or a torchvision dataset
    returning (PIL image, class). Items are (x (C, H, W) float, labels (A,) int64). `attributes`
    names the A labels and `num_classes` gives the classes of each."""

    def __init__(self, images, labels, attributes, num_classes, transform=None):
        self.images, self.labels, self.transform = images, labels, transform
        self.attributes, self.num_classes = tuple(attributes), tuple(num_classes)

    def __len__(self):
        return len(self.labels)

    def subset(self, n, seed=0):
        """A seeded random subset of n examples, stratified by the first attribute (the class of an
        image folder), as a LabelledImages. Never "the first n": an image folder is sorted by class,
        so its first n would drop whole classes. See stratified_indices."""
        idx = stratified_indices(self.labels[:, 0], n, seed)  # (n,)
        images = (self.images[idx] if isinstance(self.images, np.ndarray)
                  else torch.utils.data.Subset(self.images, idx.tolist()))
        return LabelledImages(images, self.labels[idx], self.attributes, self.num_classes,
                              self.transform)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, idx):
        # Batched fetch (used by DataLoader): one tensor op for in-memory data.
        if isinstance(self.images, np.ndarray):
            # (B, C, H, W)
            x = torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            y = torch.from_numpy(self.labels[idx])  # (B, A)
            return list(zip(x, y))
        out = []
        for i in idx:
            img, _ = self.images[i]
            out.append((self.transform(img) * 2.0 - 1.0, torch.as_tensor(self.labels[i])))
        return out


def stratified_indices(labels, n, seed=0):
    """n indices into labels (N,), drawn at random without replacement so that every class keeps its
    share (largest-remainder rounding of n * count / N; every class keeps at least one example when
    n >= number of classes), returned in a seeded random order. Uses its own generator: the
    caller's random state is left alone. labels (N,) int -> (n,) int64."""
    labels = np.asarray(labels)
    if not 0 < n <= len(labels):
        raise ValueError(f"cannot take {n} of {len(labels)} examples")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / len(labels)
    take = np.floor(quota).astype(int)
    if n >= len(classes):
        take = np.maximum(take, 1)
    while take.sum() > n:  # the floor of 1 can overshoot: take back where most above quota
        take[np.argmax(np.where(take > 1, take - quota, -np.inf))] -= 1
    for c in np.argsort(-(quota - take))[: n - take.sum()]:  # largest remainders get the rest
        take[c] += 1
    idx = np.concatenate([rng.choice(np.nonzero(labels == c)[0], k, replace=False)
                          for c, k in zip(classes, take)])
    return torch.from_numpy(rng.permutation(idx)).long()


def load_dataset(name, split, data_root="./data", image_size=32, num_examples=None, seed=0,
                 object_scale=1.5, texture=True):
    """Returns a LabelledImages for `name` in {shapes, cifar10, cifar100, miniimagenet, folder}.

    shapes: generated (num_examples, default 10000 train / 2000 test); the test split uses another
        seed than the train split, so the split is fixed and disjoint by construction; object_scale
        and texture: see make_shapes. For the other datasets num_examples keeps a seeded,
        class-stratified random subset (None: all).
    cifar10 / cifar100: torchvision, downloaded into data_root when absent.
    miniimagenet / folder: data_root/train/<class>/*.png|jpg and data_root/test/<class>/..., resized
        to image_size (Mini-ImageNet: 84). Every image is opened once here: a file that is not a
        readable image stops with its name before any training starts."""
    if num_examples is not None and num_examples <= 0:
        raise UserError(f"the number of examples must be positive, got {num_examples}")
    if name == "shapes":
        n = num_examples or (10000 if split == "train" else 2000)
        images, labels = make_shapes(n, image_size, seed * 1000 + (0 if split == "train" else 1),
                                     object_scale, texture)
        a = labels.shape[1]  # 4 without texture
        return LabelledImages(images, labels, SHAPES_ATTRIBUTES[:a], SHAPES_CLASSES[:a])
    import torchvision  # here, not at import and not for shapes: only the other datasets need it
    import torchvision.transforms as T
    if name in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        existed = os.path.isdir(data_root)
        try:
            base = cls(data_root, train=(split == "train"), download=True)
        except Exception as e:  # offline, or a broken archive
            if not existed and os.path.isdir(data_root) and not os.listdir(data_root):
                os.rmdir(data_root)  # torchvision made the folder: leave nothing behind
            raise UserError(f"{name} is not in {data_root} and could not be downloaded "
                            f"({type(e).__name__}); put the extracted '{cls.base_folder}' folder "
                            f"in {data_root} or pass --data-root") from None
        transform = T.Compose([T.Resize(image_size),
                               T.ToTensor()]) if image_size != 32 else T.ToTensor()
    elif name in ("miniimagenet", "folder"):
        folder = os.path.join(data_root, split)
        if not os.path.isdir(folder):
            raise UserError(f"no folder {folder}: put the images in "
                            f"{data_root}/{{train,test}}/<class>/<image> (one sub-folder per "
                            "class) or pass --data-root")
        try:
            base = torchvision.datasets.ImageFolder(folder, loader=open_rgb)
        except (FileNotFoundError, RuntimeError) as e:
            raise UserError(f"{folder} holds no images in class sub-folders ({e}); put them in "
                            f"{folder}/<class>/<image>") from None
        transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor()])
        check_images(base.samples)
    else:
        raise UserError(f"unknown dataset {name!r}; choose shapes, cifar10, cifar100, miniimagenet "
                        "or folder")
    labels = np.asarray(base.targets, dtype=np.int64)[:, None]  # (N, 1): one attribute, the class
    ds = LabelledImages(base, labels, ("class",), (len(base.classes),), transform)
    if num_examples and num_examples < len(ds):
        return ds.subset(num_examples, seed)
    return ds


def open_rgb(path):
    """An image file as an 8-bit RGB PIL image, whatever its bit depth. PIL's own convert('RGB')
    clips 16-bit ('I;16') and 32-bit ('I', 'F') grey images at 255, which turns most of them white;
    here they are scaled to 0-255 by the largest value their type can hold (16-bit: 65535; 'F':
    1)."""
    from PIL import Image
    with Image.open(path) as img:
        if img.mode.startswith("I;16") or img.mode in ("I", "F"):
            a = np.asarray(img, dtype=np.float64)
            top = (
                1.0
                if img.mode == "F"
                else (65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0)
            )
            img = Image.fromarray(np.clip(np.round(a * 255.0 / top), 0, 255).astype(np.uint8))
        return img.convert("RGB")


def dataset_key(dataset):
    """A short hash naming the images a LabelledImages holds, cheap enough to take at every start:
    the pixels of in-memory data (shapes, CIFAR's arrays), or the relative paths and sizes of an
    image folder's files, plus the labels and the subset taken. Saved in the checkpoint, so that a
    resumed run can tell whether it is given the images it was trained on."""
    base, idx = dataset.images, None
    if isinstance(base, torch.utils.data.Subset):
        base, idx = base.dataset, np.asarray(base.indices)
    h = hashlib.sha1(np.ascontiguousarray(dataset.labels).tobytes())
    if idx is not None:
        h.update(idx.astype(np.int64).tobytes())
    if isinstance(base, np.ndarray):
        h.update(np.ascontiguousarray(base).tobytes())
    elif hasattr(base, "samples"):  # an ImageFolder: what its files are, not where the folder lies
        for path, label in base.samples:
            h.update(
                f"{os.path.relpath(path, base.root)}:{os.path.getsize(path)}:{label};".encode()
            )
    else:  # torchvision's CIFAR holds its pixels in memory
        h.update(np.ascontiguousarray(base.data).tobytes())
    return h.hexdigest()[:12]


def check_images(samples):
    """Opens every (path, class) of an image folder's list and verifies it decodes; a broken file
    stops with its name (before training, not hours into it). Costs one header read per image."""
    from PIL import Image
    for path, _ in samples:
        try:
            with Image.open(path) as img:
                img.verify()
        except Exception as e:
            raise UserError(f"{path} is not a readable image ({type(e).__name__}); delete or "
                            f"replace it and run again") from None


def max_pairwise_distance(x):
    """Largest Euclidean distance between two rows of x (N, ...): Song & Ermon's guide for
    sigma_max."""
    flat = x.flatten(1).double()  # (N, C*H*W)
    return torch.cdist(flat, flat).max().item()


# =================================================================================================
# Trajectories: the curve t -> E(x0, t) on a grid of times (paper section 2.1, 3)
# =================================================================================================

def paper_times(num_times=11):
    """The paper's regular grid on [0, 1]: 11 points 0, 0.1, ..., 1.0 by default. (T,)"""
    return torch.linspace(0.0, 1.0, num_times)


@torch.no_grad()
def extract_trajectories(encoder, images, times, batch_size=256):
    """Codes E(x0, t) for every image and every time, as one (N, T, D) tensor.

    All T times of a chunk of images go through the encoder in ONE pass (images repeated T times);
    the chunk holds batch_size // T images, so a pass has about batch_size rows. For VDRL the
    representation is the mean mu (as in the published code). The encoder is put in eval mode.
    Inputs are made channels-last, the memory format load_encoder gives the encoder (same result up
    to float rounding; bench.py measures both formats).
    images (N, C, H, W), times (T,) -> (N, T, D)."""
    encoder.eval()
    device = next(encoder.parameters()).device
    times = times.to(device)
    T = len(times)
    per_pass = max(1, batch_size // T)
    out = []
    for start in range(0, len(images), per_pass):
        x = images[start:start + per_pass].to(device)  # (b, C, H, W)
        b = len(x)
        # (b*T, C, H, W)
        x_rep = x.repeat_interleave(T, dim=0).contiguous(memory_format=torch.channels_last)
        t_rep = times.repeat(b)  # (b*T,)
        mu, _ = encoder(x_rep, t_rep)  # (b*T, D)
        out.append(mu.reshape(b, T, -1).float().cpu())  # (b, T, D)
    return torch.cat(out)  # (N, T, D)


def dataset_tensors(dataset, batch_size=512):
    """All images and labels of a LabelledImages as tensors: (N, C, H, W) float, (N, A) int64."""
    xs, ys = [], []
    for start in range(0, len(dataset), batch_size):
        items = dataset.__getitems__(list(range(start, min(start + batch_size, len(dataset)))))
        xs.append(torch.stack([x for x, _ in items]))
        ys.append(torch.stack([y for _, y in items]))
    return torch.cat(xs), torch.cat(ys)


def times_key(times):
    """A short stable name for a grid of times, used in cache file names."""
    return hashlib.sha1(np.asarray(times, dtype=np.float64).round(9).tobytes()).hexdigest()[:10]


def tensors_key(*tensors):
    """A short hash of the CONTENT of tensors (here: a split's images and labels), so that a cache
    made from one set of images is never read for another with the same size."""
    h = hashlib.sha1()
    for x in tensors:
        h.update(str((x.dtype, tuple(x.shape))).encode())
        h.update(x.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def weights_key(module):
    """A short hash of a module's weights (every tensor of its state dict, by name): two encoders
    share a key only if they compute the same codes. Costs one pass over the parameters."""
    state = module.state_dict()
    names = sorted(state)
    return tensors_key(torch.tensor(bytearray("|".join(names).encode())),
                       *(state[n] for n in names))


def cached_trajectories(run_dir, encoder, dataset, split, times, tag, batch_size=256, log=print):
    """extract_trajectories for a whole split, cached in run_dir/cache.

    The file name holds the split, a hash of the split's images and labels (another --data-root or
    subset never reuses a cache), a hash of the encoder's WEIGHTS (another run trained to the same
    step never reuses it), `tag` (e.g. 'step1500', 'init': for the reader) and the grid. Both hashes
    are also stored inside the file and checked, so a file renamed or copied over another is not
    trusted. A second probe or analysis run reads the file instead of re-encoding; a grid that is a
    subset of a cached finer grid (11 points inside the 21-point grid) is sliced from it. A file
    that is not a cache of this split and encoder is ignored with a line saying so, and the split is
    encoded again. Returns dict(codes (N, T, D), labels (N, A), times (T,))."""
    images, labels = dataset_tensors(dataset)  # (N, C, H, W), (N, A)
    folder = os.path.join(run_dir, "cache")
    data_key, enc_key = tensors_key(images, labels), weights_key(encoder)
    prefix, suffix = f"traj-{split}-{data_key}-{tag}-{enc_key}-", ".pt"
    path = os.path.join(folder, prefix + times_key(times) + suffix)
    times = torch.as_tensor(times, dtype=torch.float32)
    cached = [f for f in os.listdir(folder) if f.startswith(prefix) and f.endswith(suffix)] \
        if os.path.isdir(folder) else []
    # exact grid first
    for name in sorted(cached, key=lambda f: (os.path.join(folder, f) != path, f)):
        try:
            c = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)
            ok = (
                isinstance(c, dict)
                and c.get("data_key") == data_key
                and c.get("weights_key") == enc_key
                and c["codes"].dim() == 3
                and len(c["codes"]) == len(images)
                and c["codes"].shape[2] == encoder.code_dim
                and c["times"].dim() == 1
                and c["codes"].shape[1] == len(c["times"])
                and torch.equal(c["labels"], labels)
            )
        except Exception:
            ok = False
        if not ok:
            log(f"cache file {name} is unreadable or not a cache of this split and encoder; "
                "ignoring it")
            continue
        match = (c["times"][None, :] - times[:, None]).abs() < 1e-6  # (T, T_cached)
        if bool(match.any(1).all()):
            cols = match.float().argmax(1)  # (T,) column of each wanted time
            return dict(codes=c["codes"][:, cols], labels=labels, times=times)  # (N, T, D)
    log(f"encoding {len(images)} {split} images at {len(times)} times ({tag}) ...")
    out = dict(codes=extract_trajectories(encoder, images, times, batch_size), labels=labels,
               times=times)
    atomic_save({**out, "data_key": data_key, "weights_key": enc_key}, path)
    return out


# =================================================================================================
# Probes: MLPs, GRU, Transformer, and how one is trained (Figure 1, 3)
# =================================================================================================
# Every probe maps codes (B, T, D) (and, for the grid-free Transformer, their times) to
# (logits (B, R, K), attention (B, T) or None): R = T independent readouts for the per-t MLPs, R = 1
# otherwise; only the Transformer has an attention to return. These are the paper's probes written
# plainly, one model each, and train_probe trains one of them. The protocol trains many (every
# learning rate x seed x input); it does so with their grouped forms, in the last section.

def probe_mlp(d_in, hidden, num_classes, dropout):
    """The published probe MLP: Linear(d_in, hidden), ReLU, Dropout, Linear(hidden, K)."""
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
    )


class MLPProbe(nn.Module):
    """MLP probes (paper section 3.1, published sizes: hidden 512, dropout 0.25) on the curve read
    three ways, `pool`: 'point' (one independent MLP per time point: R = T readouts), 'concat' (one
    MLP on all T codes side by side, T*D inputs) or 'mean' (one MLP on the average code over t); the
    last two are controls. codes (B, T, D) -> (logits (B, R, K), None)."""

    def __init__(self, num_points, d, num_classes, pool="point", hidden=512, dropout=0.25):
        super().__init__()
        self.pool = pool
        d_in = num_points * d if pool == "concat" else d
        readouts = num_points if pool == "point" else 1
        self.mlps = nn.ModuleList([probe_mlp(d_in, hidden, num_classes,
                                             dropout) for _ in range(readouts)])

    def forward(self, codes, times=None):  # times are not read
        if self.pool == "point":
            # (B, T, K)
            return torch.stack([mlp(codes[:, t]) for t, mlp in enumerate(self.mlps)], 1), None
        x = codes.flatten(1) if self.pool == "concat" else codes.mean(1)  # (B, T*D) or (B, D)
        return self.mlps[0](x)[:, None], None  # (B, 1, K)


class GRUProbe(nn.Module):
    """Recurrent probe (paper section 3.1, published sizes): a GRU with 256 hidden units runs along
    the trajectory from t = 0 to t = 1; dropout 0.25 and a linear head read the last state.
    codes (B, T, D) -> (logits (B, 1, K), None)."""

    def __init__(self, d, num_classes, hidden=256, dropout=0.25):
        super().__init__()
        self.gru = nn.GRU(d, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, codes, times=None):  # times are not read
        _, h_last = self.gru(codes)  # (1, B, hidden)
        return self.head(self.dropout(h_last[0]))[:, None], None  # (B, 1, K)


def sinusoidal_embedding(x, dim, max_period=10000.0):
    """Transformer sinusoids of a real-valued position x (...,) -> (..., dim)."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=x.device) / (dim // 2))
    angle = x[..., None].float() * freqs  # (..., dim/2)
    return torch.cat([angle.sin(), angle.cos()], dim=-1)  # (..., dim)


def quadrature_weights(times):
    """Trapezoid cell widths of a sorted grid of times on [0, 1]: (..., T) -> (..., T), summing to
    the span covered. Used so that attention over a curve approximates an integral over t."""
    edges = torch.cat([times[..., :1], (times[..., 1:] + times[..., :-1]) / 2, times[..., -1:]], -1)
    return (edges[..., 1:] - edges[..., :-1]).clamp_min(1e-6)  # (..., T)


def position_and_key_bias(time_embedding, width, T, times, device):
    """The Transformer's position embedding and attention-logit bias: of the INDEX of each point
    (pos (T, E), bias 0) or of the VALUE of t (pos (..., T, E) from times (..., T), bias the log
    quadrature weight of each point, (..., T))."""
    if time_embedding == "index":
        return sinusoidal_embedding(torch.arange(T, device=device), width), torch.zeros(
            T, device=device
        )
    times = times.to(device)
    return sinusoidal_embedding(times * 1000.0, width), quadrature_weights(times).log()


def trajectory_attention(qkv, key_bias, heads):
    """One attention layer's core: queries from all T + 1 rows (points, then the token), keys and
    values from the T points only: softmax(q k^T / sqrt(d) + key_bias) v, by PyTorch's fused
    scaled_dot_product_attention, and the token's row of the attention written out.
    qkv (..., T+1, 3E), key_bias (..., T) -> (mixed values (..., T+1, E), the token's attention over
    the points (..., T), head-averaged)."""
    *lead, rows, three_w = qkv.shape
    width = three_w // 3
    # (n, nh, T+1, E/nh) each
    q, k, v = qkv.reshape(-1, rows, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    # keys/values: trajectory points only (n, nh, T, E/nh)
    k, v = k[:, :, :rows - 1], v[:, :, :rows - 1]
    bias = key_bias.expand(*lead, rows - 1).reshape(-1, 1, 1, rows - 1)  # (n, 1, 1, T)
    # (n, nh, T+1, E/nh)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(-1, heads, rows, -1))
    # (n, nh, 1, T)
    token = (q[:, :, -1:] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias).softmax(-1)
    out = out.transpose(1, 2).reshape(*lead, rows, width)  # (..., T+1, E)
    return out, token[:, :, 0].mean(1).reshape(*lead, rows - 1)  # (..., T)


class TrajectoryTransformer(nn.Module):
    """Transformer probe with a learned query token that attends over the curve (Figure 3).

    Codes are embedded by Linear(D, width) + dropout, plus a position embedding: of the INDEX of the
    point (time_embedding='index', the paper's probe), or of the VALUE of t (time_embedding='value',
    the grid-free probe for the paper's closing question, section 4). One post-LN block (`heads`
    heads, feed-forward 2 * width) is applied `rounds` times with shared weights; the token is read
    out by a linear head.

    Departure, for Figure 3: keys and values are the T trajectory points only. The points attend to
    each other, the token attends to the points, and no query attends to the token, so the token's
    attention is a distribution over exactly the T points (it sums to 1 over t). With
    time_embedding='value', log(quadrature weight) of each point is added to the attention logits:
    then a weighted average over a grid approximates an integral over t, and the same trained probe
    gives nearly the same answer on a coarse, fine or irregular grid (a density rather than
    weights). codes (B, T, D), times (T,) or (B, T) -> (logits (B, 1, K), the token's attention of
    the last round (B, T), head-averaged)."""

    def __init__(self, d, num_classes, width=256, heads=4, rounds=2, dropout=0.25,
                 time_embedding="index"):
        super().__init__()
        self.width, self.heads, self.rounds, self.time_embedding = (
            width,
            heads,
            rounds,
            time_embedding,
        )
        self.embed = nn.Linear(d, width)
        self.dropout = nn.Dropout(dropout)
        self.token = nn.Parameter(torch.randn(width) * 0.02)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Dropout(dropout),
                                nn.Linear(2 * width, width))
        self.head = nn.Linear(width, num_classes)

    def forward(self, codes, times=None):
        B, T, _ = codes.shape
        pos, key_bias = position_and_key_bias(self.time_embedding, self.width, T, times,
                                              codes.device)
        key_bias = key_bias.expand(B, T)  # (B, T)
        h = self.dropout(self.embed(codes) + pos)  # (B, T, E)
        h = torch.cat([h, self.token.expand(B, 1, -1)], dim=1)  # (B, T+1, E), token last
        for _ in range(self.rounds):
            # (B, T+1, E), (B, T)
            out, attention = trajectory_attention(self.qkv(h), key_bias, self.heads)
            h = self.norm1(h + self.dropout(self.proj(out)))  # post-LN
            h = self.norm2(h + self.dropout(self.ff(h)))
        return self.head(h[:, -1])[:, None], attention  # (B, 1, K), (B, T)


def build_probe(kind, num_points, d, num_classes, width=256, dropout=0.25):
    """The probes of the Figure 1 table by name: 'mlp' (one per t), 'concat', 'mean', 'gru',
    'transformer', 'continuous' (grid-free Transformer on the value of t). `width` is the GRU's
    hidden size and the Transformer's model width (paper 256); the MLPs keep 512 hidden units."""
    if kind in ("mlp", "concat", "mean"):
        return MLPProbe(num_points, d, num_classes, pool="point" if kind == "mlp" else kind,
                        dropout=dropout)
    if kind == "gru":
        return GRUProbe(d, num_classes, hidden=width, dropout=dropout)
    if kind in ("transformer", "continuous"):
        return TrajectoryTransformer(d, num_classes, width=width, dropout=dropout,
                                     time_embedding="index" if kind == "transformer" else "value")
    raise ValueError(f"unknown probe {kind!r}")


def train_probe(probe, train, val, test, lr, epochs, batch_size=256, seed=0, weight_decay=1e-5,
                clip=None, train_times_fn=None, eval_times=None):
    """Trains one probe with Adam (paper section 3.1) and keeps, per readout, the test accuracy at
    its best validation epoch: the model is chosen on validation, never on test.

    train / val / test are (codes (N, T, D), labels (N,)) pairs, standardised by the caller. The
    batch order comes from a generator seeded with `seed` (the caller's random state is left
    alone). The loss is the sum over readouts of each one's mean cross-entropy, so the T per-t MLPs
    of an 'mlp' probe learn independently. clip: the gradient-norm clip of the published GRU and
    Transformer probes (1.0; None for MLPs). train_times_fn(generator) -> (columns (k,), times (k,))
    draws a random sub-grid per batch (the grid-free probe); eval_times: the val / test columns'.
    Returns dict(val (R,), test (R,), epoch (R,), attention (T,): the token's mean attention on the
    test set at readout 0's best epoch, or None)."""
    x_train, y_train = train
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)

    @torch.no_grad()
    def evaluate(codes, labels, chunk=1024):  # -> accuracy (R,), mean attention (T,) or None
        probe.eval()
        correct, attention = 0, None
        for start in range(0, len(labels), chunk):
            logits, att = probe(codes[start:start + chunk], eval_times)  # (b, R, K), (b, T) or None
            # (R,)
            correct = correct + (logits.argmax(-1) == labels[start:start + chunk, None]).sum(0)
            if att is not None:
                attention = att.sum(0) if attention is None else attention + att.sum(0)
        return correct.float() / len(labels), None if attention is None else attention / len(labels)

    best = None
    for epoch in range(epochs):
        probe.train()
        order = torch.randperm(len(y_train), generator=gen).to(y_train.device)  # (N,)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]  # (b,)
            x, times = x_train[idx], None  # (b, T, D)
            # the grid-free probe: a random sub-grid of the fine grid
            if train_times_fn is not None:
                cols, times = train_times_fn(gen)
                x = x[:, cols]  # (b, k, D)
            logits, _ = probe(x, times)  # (b, R, K)
            loss = sum(F.cross_entropy(logits[:, r], y_train[idx]) for r in range(logits.shape[1]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(probe.parameters(), clip)
            opt.step()
        val_acc, _ = evaluate(*val)  # (R,)
        test_acc, attention = evaluate(*test)
        if best is None:
            best = dict(val=torch.full_like(val_acc, -1.0), test=test_acc,
                        epoch=torch.zeros_like(val_acc).long(), attention=attention)
        # (R,): strictly better, so the earliest best epoch is kept
        improved = val_acc > best["val"]
        best["val"] = torch.where(improved, val_acc, best["val"])
        best["test"] = torch.where(improved, test_acc, best["test"])
        best["epoch"] = torch.where(improved, epoch, best["epoch"])
        if improved[0]:
            best["attention"] = attention
    return best


def standardiser_stats(train, per_time=True):
    """Mean and std of the TRAINING codes (..., N, T, D) only, so nothing of the validation or test
    split leaks into training or model selection: per (t, d) feature -> (..., 1, T, D) each, or per
    dimension pooled over t (per_time=False) -> (..., 1, 1, D) each. Apply as (codes - mean) /
    std."""
    dims = (-3,) if per_time else (-3, -2)
    return train.mean(dims, keepdim=True), train.std(dims, keepdim=True).clamp_min(1e-6)


def split_train_val(n, val_fraction=0.1, seed=0):
    """A fixed random split of range(n) into train and validation indices (paper: 45k / 5k)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def grid_sampler(grid_times, k_min=4, k_max=16):
    """For the continuous probe: a function drawing a random sorted subset of k columns of a fine
    grid of times (k uniform in [k_min, k_max]) for each batch. grid_times (M,) ->
    fn(generator) -> (cols (k,), times (k,))."""
    def draw(gen):
        k = int(torch.randint(k_min, k_max + 1, (1,), generator=gen))
        cols = torch.randperm(len(grid_times), generator=gen)[:k].sort().values  # (k,)
        return cols, grid_times[cols]
    return draw


# =================================================================================================
# Mutual information: MINE (Belghazi et al. 2018) and the NMI matrix (Figure 2)
# =================================================================================================

def statistics_network(d_in, hidden=256):
    """MINE's statistics network T(x, y) for one pair (paper section 3.2): concat(x, y) -> hidden ->
    hidden -> 1 with ELU, Xavier-uniform weights and zero biases. (B, Dx + Dy) -> (B, 1)."""
    net = nn.Sequential(nn.Linear(d_in, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(),
                        nn.Linear(hidden, 1))
    for layer in net[::2]:
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    return net


def log_mean_exp(x, dim=0):
    """log(mean(exp(x))) along dim, computed stably."""
    return torch.logsumexp(x, dim) - math.log(x.shape[dim])


def mine(x, y, seed=0, steps=2000, batch_size=256, lr=1e-4, hidden=256, ma_rate=0.01, holdout=0.2,
         eval_shuffles=8, eval_rows=512):
    """MINE estimate of I(X; Y) in nats from paired samples x (N, Dx), y (N, Dy) (paper section
    3.2).

    Donsker-Varadhan bound: I(X; Y) >= E_joint[T] - log E_marginal[e^T], maximised over the
    statistics network T. Joint samples are the rows (x_i, y_i); marginal samples pair x_i with an
    independently drawn y_j. The gradient of log E[e^T] is biased on minibatches, so (Belghazi et
    al., section 3.2) its denominator is a moving average of E[e^T] (rate ma_rate), DETACHED from
    the graph (the published code's is not), kept in log space. Trained on the first 1 - holdout of
    a seeded permutation of the rows; the estimate is the bound on the held-out rows (in chunks of
    eval_rows), averaged over eval_shuffles shufflings (the published code reads it off training
    batches, which overfits upward). The generator seeded with `seed` draws the split, the batches
    and the shufflings; the initial weights are drawn after torch.manual_seed(seed) inside fork_rng
    (the caller's random state is left alone). mine_pairs is the same for many pairs at once.

    >>> x = torch.randn(8000, 1); y = 0.9 * x + math.sqrt(1 - 0.81) * torch.randn(8000, 1)
    >>> mine(x, y)  # true value -0.5 * log(1 - 0.81) = 0.830 nats  # doctest: +SKIP"""
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"mine expects two (N, D) tensors, got shapes {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of rows (samples), got {x.shape[0]} and "
                         f"{y.shape[0]}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen).to(x.device)  # (N,)
    n_hold = max(2, int(len(x) * holdout))
    hold, train = perm[:n_hold], perm[n_hold:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = statistics_network(x.shape[1] + y.shape[1], hidden).to(x.device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    # T(x_i, y_j), (b,)
    statistic = lambda rows, other: net(torch.cat([x[rows], y[other]], 1))[:, 0]
    log_ma = None  # log of the moving average of E_marginal[e^T]
    for step in range(steps):
        rows = train[torch.randint(len(train), (batch_size,), generator=gen).to(x.device)]  # (b,)
        # independent rows
        other = train[torch.randint(len(train), (batch_size,), generator=gen).to(x.device)]
        joint, marginal = statistic(rows, rows), statistic(rows, other)  # (b,) each
        lme = log_mean_exp(marginal)  # log E_marginal[e^T] on this batch
        log_ma = lme.detach() if log_ma is None else torch.logaddexp(
            log_ma + math.log(1 - ma_rate), lme.detach() + math.log(ma_rate))
        # Bias-corrected surrogate: its gradient is grad E_joint[T] - grad E_marginal[e^T] / ma.
        loss = -(joint.mean() - torch.exp(lme - log_ma))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    estimates = []
    with torch.no_grad():
        for _ in range(eval_shuffles):
            shuffled = hold[torch.randperm(n_hold, generator=gen).to(x.device)]  # (n_hold,)
            joint = torch.cat([statistic(hold[i:i + eval_rows], hold[i:i + eval_rows])
                               for i in range(0, n_hold, eval_rows)])  # (n_hold,)
            marginal = torch.cat([statistic(hold[i:i + eval_rows], shuffled[i:i + eval_rows])
                                  for i in range(0, n_hold, eval_rows)])
            estimates.append(joint.mean() - log_mean_exp(marginal))
    return torch.stack(estimates).mean()


def gaussian_mi(rho, d):
    """True I(X; Y) in nats for d dimensions each with correlation rho: -(d/2) log(1 - rho^2)."""
    return -0.5 * d * math.log(1.0 - rho ** 2)


def nmi_matrix(codes, seeds=(0,), **mine_kwargs):
    """Normalised mutual information between every two points of the trajectories (Figure 2).

    NMI(i, j) = I(i; j) / sqrt(I(i; i) I(j; j)), with MINE's estimate of I(X; X) standing in for
    the entropy H(X) as in the published code. This is a HEURISTIC: for continuous codes H(X) and
    I(X; X) are infinite, and MINE's I(X; X) is only as large as its budget allows, so the diagonal
    is about 1 by construction and off-diagonal values are comparable only at a fixed budget.
    All T*T ordered pairs and all seeds are trained as one grouped model. Where MINE's I(i; i) is
    below 1e-3 nats (about zero: too small a budget to stand in for an entropy) row and column i
    are NaN. codes (N, T, D) -> (NMI (S, T, T), MI (S, T, T)), one matrix per seed."""
    if codes.dim() != 3 or codes.shape[1] < 2:
        raise ValueError("nmi_matrix needs codes of shape (N, T, D) with T >= 2, got "
                         f"{tuple(codes.shape)}")
    T = codes.shape[1]
    pairs = torch.cartesian_prod(torch.arange(T), torch.arange(T))  # (T*T, 2), row-major (i, j)
    mi = mine_pairs(codes, codes, pairs, seeds=seeds, **mine_kwargs).reshape(-1, T, T)  # (S, T, T)
    diag = mi.diagonal(dim1=1, dim2=2)  # (S, T) I(i; i) as the entropy stand-in
    # a non-positive "entropy" leaves NMI undefined (NaN)
    diag = torch.where(diag > 1e-3, diag, torch.nan)
    return mi / torch.sqrt(diag[:, :, None] * diag[:, None, :]), mi


# =================================================================================================
# Curve analysis: attention densities and the separation profile of eq. 5
# =================================================================================================

def attention_density(attention, times):
    """Attention weights over a grid (T,) as a density over t: weights / cell width, normalised to
    integrate to 1 (trapezoid cells), so that grids of different sizes can be drawn on one axis."""
    w = quadrature_weights(times)  # (T,)
    density = attention / w
    return density / (density * w).sum()


def curve_movement(codes):
    """How far codes move along t, relative to how far apart images are: the std of a code over t
    (mean over images and dimensions) and the std over images (mean over t and dimensions).
    A ratio near 0 means each trajectory is nearly a single point. codes (N, T, D) -> (along,
    across)."""
    return codes.std(1).mean().item(), codes.std(0).mean().item()


def separation_profile(codes, labels, max_pairs=2000, seed=0):
    """Where along the curve classes separate (the distances of paper eq. 5).

    For random pairs of examples from DIFFERENT classes and from the SAME class, the distance
    ||E(x, t) - E(x', t)|| at every t. Returns dict with, per t, the mean between-class distance,
    the mean within-class distance and their ratio (a scale-free separation index), and where along
    t each between-class pair is farthest apart (a histogram over the T times). Eq. 5 itself (the
    sup over t is at least the value at t = 0) holds for any curve, so there is nothing to check on
    data; what is informative is WHERE the separation is largest. codes (N, T, D), labels (N,)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(len(codes), (max_pairs * 4,), generator=gen)
    b = torch.randint(len(codes), (max_pairs * 4,), generator=gen)
    keep = a != b
    a, b = a[keep], b[keep]
    same = labels[a] == labels[b]
    out = {}
    for name, mask in (("between", ~same), ("within", same)):
        ia, ib = a[mask][:max_pairs], b[mask][:max_pairs]
        dist = (codes[ia] - codes[ib]).norm(dim=-1)  # (pairs, T)
        out[name] = dist.mean(0)  # (T,)
        if name == "between":
            out["argsup_hist"] = torch.bincount(dist.argmax(1),
                                                minlength=codes.shape[1]).float() / len(dist)
    out["ratio"] = out["between"] / out["within"].clamp_min(1e-12)  # (T,)
    return out


# =================================================================================================
# Checkpoints and utilities: atomic save, safe load, run folders, EMA, devices
# =================================================================================================

CHECKPOINT_KIND = "trajrep-drl-checkpoint"
WEIGHTS_KIND = "trajrep-drl-weights"  # EMA weights alone, for reading a run: see export_weights


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a crash mid-write never
    leaves a truncated file where a good one was. Creates the folder if absent."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable(*folders):
    """Creates each folder if absent and writes a temporary file there, so that a script whose
    results would land there stops before its work, not after it. UserError names the folder."""
    for folder in folders:
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise UserError(f"cannot write to {folder} ({type(e).__name__}); make it writable, or "
                            f"copy the run folder somewhere writable and give that copy") from None


def load_checkpoint(path, map_location="cpu", resumable=False):
    """Loads a training checkpoint, or an exported weights file (see export_weights), as DATA
    (weights_only=True) and checks that it is one. resumable=True (train.py --resume) accepts
    only a training checkpoint: a weights file holds no optimiser state or random streams.

    Raises UserError with one sentence for a missing, corrupted or foreign file."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train one first with `python train.py` or give "
                        f"the run folder that holds ckpt.pt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint (corrupted or truncated: "
                        f"{type(e).__name__}); retrain, or resume from an intact copy") from None
    kinds = (CHECKPOINT_KIND,) if resumable else (CHECKPOINT_KIND, WEIGHTS_KIND)
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in kinds:
        if isinstance(ckpt, dict) and ckpt.get("kind") == WEIGHTS_KIND:
            raise UserError(f"{path} holds exported weights only (for probe.py and analyze.py), "
                            "not a training state; it cannot be resumed: start a new run")
        raise UserError(f"{path} is not a trajrep training checkpoint; give a ckpt.pt written by "
                        "train.py")
    expected = dict(config=dict, model_kwargs=dict, step=int, ema=dict)
    if ckpt["kind"] == CHECKPOINT_KIND:  # the training state besides the weights
        expected.update(model=dict, optimizer=dict, rng=dict)
    broken = [k for k, kind in expected.items() if not isinstance(ckpt.get(k), kind)]
    if not broken and "rng" in expected and not isinstance(ckpt["rng"].get("ranks"), list):
        broken = ["rng"]
    if broken:
        raise UserError(f"{path} is an incomplete trajrep checkpoint (missing or malformed: "
                        f"{', '.join(broken)}); retrain, or resume from an intact copy")
    return ckpt


def save_checkpoint(path, **contents):
    """Writes a training checkpoint, the dict that load_checkpoint reads back (config, model_kwargs,
    step, model, ema, optimizer, rng, data_key), tagged with CHECKPOINT_KIND, atomically. A write
    that fails (a full disk, a folder gone read-only) is a UserError naming the file and the step of
    the previous checkpoint, which the atomic write leaves intact."""
    try:
        atomic_save(dict(kind=CHECKPOINT_KIND, **contents), path)
    except (OSError, RuntimeError) as e:
        before = (f"the previous checkpoint (step {load_checkpoint(path)['step']}) is intact"
                  if os.path.exists(path) else "no checkpoint was written")
        raise UserError(f"could not write {path} at step {contents.get('step')} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); {before}: free "
                        f"space or pass another --out, then --resume") from None


def export_weights(run, path, made_by):
    """Writes a run's EMA weights alone to `path`, a file for READING the run (load_encoder,
    probe.py, analyze.py), not for resuming it: config, model description, step, EMA weights, the
    data key, and made_by, the command and device that trained it (a sentence kept with the
    weights). About a quarter of a checkpoint: no raw weights, no optimiser moments. Name it
    <folder>/ckpt.pt to give the folder to probe.py and analyze.py as a run."""
    ckpt = load_checkpoint(run)
    atomic_save(dict(kind=WEIGHTS_KIND, config=ckpt["config"], model_kwargs=ckpt["model_kwargs"],
                     step=ckpt["step"], ema=ckpt["ema"], data_key=ckpt.get("data_key"),
                     made_by=str(made_by)), path)


def claim_run_folder(out):
    """Creates the run folder if absent and takes an exclusive lock on it (out/.lock, flock): a
    second train.py into the same folder stops with one sentence instead of overwriting the first's
    files. The kernel drops the lock when this process ends, even by kill -9. Then removes temporary
    files that a killed checkpoint write left behind (safe: no other run holds the folder).
    Returns (lock file, whether the folder was created here)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file; give a folder (it is created if absent)")
    import fcntl  # here, not at import: the library stays importable where fcntl does not exist
    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    lock = open(os.path.join(out, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UserError(f"another train.py is writing to {out}; wait for it to finish or pass "
                        "another --out") from None
    for name in os.listdir(out):
        if name.startswith(".tmp-") and name.endswith(".pt"):
            os.remove(os.path.join(out, name))
    return lock, created


def cut_metrics(path, step):
    """Keeps the rows of metrics.jsonl up to `step` (a resumed checkpoint's step; 0 for a new run),
    so that rows written after the last checkpoint by a killed run are not mixed with the new
    ones."""
    if not os.path.exists(path):
        return
    rows = [line for line in open(path) if line.strip()]
    keep = []
    for line in rows:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a row cut by a kill mid-write
    with open(path, "w") as f:
        f.writelines(keep)


def build_model(ckpt, state="ema"):
    """The DRLModel of a loaded checkpoint with its `state` weights ('model', 'ema' or None for the
    architecture only); a checkpoint whose weights do not fit its own architecture is a
    UserError."""
    try:
        model = DRLModel(**ckpt["model_kwargs"])
        if state is not None:
            model.load_state_dict(ckpt[state])
    except (TypeError, RuntimeError, ValueError, KeyError) as e:
        raise UserError("the checkpoint's weights do not fit its model description "
                        f"({type(e).__name__}); it was written by another version of trajrep or "
                        "damaged: retrain") from None
    return model


def load_encoder(path, device="cpu", weights="ema"):
    """The encoder of a checkpoint in eval mode and channels-last memory format (the format train.py
    trains in), with its config and step: (encoder, config, step).

    weights='ema': the trained EMA weights. weights='init': the same architecture at the random
    initialisation train.py started from (same seed): the control that every representation result
    needs, since a random convolutional encoder already separates colours and positions."""
    ckpt = load_checkpoint(path)
    return checkpoint_encoder(ckpt, device, weights), ckpt["config"], ckpt["step"]


def load_encoders(path, device="cpu"):
    """A run's trained encoder and its control, the same architecture at the random initialisation
    train.py started from (see load_encoder), from one read of the checkpoint:
    (trained, random init, config, step)."""
    ckpt = load_checkpoint(path)
    return (checkpoint_encoder(ckpt, device, "ema"), checkpoint_encoder(ckpt, device, "init"),
            ckpt["config"], ckpt["step"])


def checkpoint_encoder(ckpt, device="cpu", weights="ema"):
    """The encoder of a loaded checkpoint, with its `weights` ('ema' or 'init'; see load_encoder),
    in eval mode and channels-last on `device`."""
    if weights == "init":
        with torch.random.fork_rng(devices=[]):  # leaves the caller's random state alone
            torch.manual_seed(ckpt["config"].get("seed", 0))  # as train.py, before building it
            model = build_model(ckpt, None)
    else:
        model = build_model(ckpt, "ema")
    return model.encoder.to(device, memory_format=torch.channels_last).eval()


def pick_device(name="auto"):
    """'auto' -> cuda if available, then mps, then cpu; anything else is passed to torch.device, and
    a device this machine does not have (or a name torch does not know) is a UserError."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise UserError(f"--device {name} but this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s); use --device cpu or auto")
    if device.type == "mps" and not has_mps:
        raise UserError(f"--device {name} but MPS is not available here; use --device cpu or auto")
    return device


def count_parameters(module):
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# =================================================================================================
# Speed: the grouped forms of the probes and of MINE, and the probe protocol that trains them
# =================================================================================================
# Nothing here is new method: it is how the scripts run the probes and MINE of the sections above
# many at a time. A grouped model holds G copies of one probe kind (every learning rate x seed x
# input of the protocol; for MINE every pair x seed), each with its own weights, and its every layer
# is one batched matmul (`bmm`), trained by one grouped Adam. Tiny models on a GPU are bound by the
# cost of launching each operation, which grouping divides by G (bench.py on an H200: 14.8x for the
# per-t MLPs, 2.7x for the Transformer, 1.2x for the GRU); on a CPU they are bound by element-wise
# memory traffic, and groups larger than the cache run slower, so the protocol trains them in
# chunks (`max_groups`). Built from G plain modules, a grouped model starts from exactly their
# weights and equals training them one by one with train_probe / mine, to float rounding (tested,
# dropout off).

class GroupedLinear(nn.Module):
    """G independent Linear layers applied in one batched matmul. (G, B, I) -> (G, B, O).
    Built from G nn.Linear layers, whose weights it starts from (`GroupedLinear.stack`)."""

    def __init__(self, weight, bias):
        super().__init__()
        # (G, I, O) from nn.Linear's (G, O, I)
        self.weight = nn.Parameter(weight.detach().transpose(1, 2).contiguous())
        self.bias = nn.Parameter(bias.detach().clone())  # (G, O)

    @classmethod
    def stack(cls, linears):
        return cls(torch.stack([layer.weight for layer in linears]),
                   torch.stack([layer.bias for layer in linears]))

    def forward(self, x):
        return torch.baddbmm(self.bias[:, None], x, self.weight)  # (G, B, O)


class GroupedLayerNorm(nn.Module):
    """G independent LayerNorms over the last dimension. (G, ..., E) -> (G, ..., E)."""

    def __init__(self, norms):
        super().__init__()
        self.eps = norms[0].eps
        self.weight = nn.Parameter(torch.stack([n.weight.detach() for n in norms]))  # (G, E)
        self.bias = nn.Parameter(torch.stack([n.bias.detach() for n in norms]))  # (G, E)

    def forward(self, x):
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)  # (G, 1, ..., E)
        return F.layer_norm(x, x.shape[-1:],
                            eps=self.eps) * self.weight.view(shape) + self.bias.view(shape)


class GroupedMLPProbe(nn.Module):
    """G MLPProbes of one pool in one model. A 'point' probe's T per-t MLPs are G*T groups of
    the layers. codes (G, B, T, D) -> (logits (G, B, R, K), None); times are not read."""

    def __init__(self, probes):
        super().__init__()
        self.pool = probes[0].pool
        mlps = [mlp for p in probes for mlp in p.mlps]  # G*R MLPs, group-major
        self.fc1 = GroupedLinear.stack([m[0] for m in mlps])
        self.dropout = nn.Dropout(mlps[0][2].p)
        self.fc2 = GroupedLinear.stack([m[3] for m in mlps])

    def forward(self, codes, times=None):
        G, B, T, D = codes.shape
        if self.pool == "point":
            x = codes.transpose(1, 2).reshape(G * T, B, D)  # (G*T, B, D): one group per (model, t)
        else:
            # (G, B, T*D) or (G, B, D)
            x = codes.reshape(G, B, T * D) if self.pool == "concat" else codes.mean(2)
        logits = self.fc2(self.dropout(F.relu(self.fc1(x))))  # (G*R, B, K)
        return logits.reshape(G, -1, B, logits.shape[-1]).transpose(1, 2), None  # (G, B, R, K)


class GroupedGRUProbe(nn.Module):
    """G GRUProbes in one model, the GRU written out (PyTorch's gate order r, z, n):
        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr),  z = sigmoid(W_iz x + b_iz + W_hz h + b_hz),
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),  h' = (1 - z) * n + z * h.
    codes (G, B, T, D) -> (logits (G, B, 1, K), None); times are not read."""

    def __init__(self, probes):
        super().__init__()
        grus = [p.gru for p in probes]
        self.input = GroupedLinear(torch.stack([g.weight_ih_l0 for g in grus]),
                                   torch.stack([g.bias_ih_l0 for g in grus]))
        self.hidden = GroupedLinear(torch.stack([g.weight_hh_l0 for g in grus]),
                                    torch.stack([g.bias_hh_l0 for g in grus]))
        self.dropout = nn.Dropout(probes[0].dropout.p)
        self.head = GroupedLinear.stack([p.head for p in probes])

    def forward(self, codes, times=None):
        G, B, T, D = codes.shape
        # (G, B, T, 3U): every t at once
        gates_x = self.input(codes.reshape(G, B * T, D)).reshape(G, B, T, -1)
        h = codes.new_zeros(G, B, self.hidden.weight.shape[1])  # (G, B, U)
        for t in range(T):
            xr, xz, xn = gates_x[:, :, t].chunk(3, -1)
            hr, hz, hn = self.hidden(h).chunk(3, -1)  # (G, B, U) each
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h = (1 - z) * torch.tanh(xn + r * hn) + z * h
        return self.head(self.dropout(h))[:, :, None], None  # (G, B, 1, K)


class GroupedTransformer(nn.Module):
    """G TrajectoryTransformers in one model; see TrajectoryTransformer for the architecture.
    codes (G, B, T, D), times (T,) or (B, T) -> (logits (G, B, 1, K), attention (G, B, T))."""

    def __init__(self, probes):
        super().__init__()
        p0 = probes[0]
        self.width, self.heads, self.rounds, self.time_embedding = (
            p0.width,
            p0.heads,
            p0.rounds,
            p0.time_embedding,
        )
        stack = lambda name: GroupedLinear.stack([p.get_submodule(name) for p in probes])
        self.embed, self.qkv, self.proj, self.head = (
            stack("embed"),
            stack("qkv"),
            stack("proj"),
            stack("head"),
        )
        self.ff1, self.ff2 = stack("ff.0"), stack("ff.3")
        self.norm1 = GroupedLayerNorm([p.norm1 for p in probes])
        self.norm2 = GroupedLayerNorm([p.norm2 for p in probes])
        self.token = nn.Parameter(torch.stack([p.token.detach() for p in probes]))  # (G, E)
        self.dropout = nn.Dropout(p0.dropout.p)

    def forward(self, codes, times=None):
        G, B, T, D = codes.shape
        E = self.width
        pos, key_bias = position_and_key_bias(self.time_embedding, E, T, times, codes.device)
        key_bias = key_bias.expand(G, B, T)  # (G, B, T)
        # rows as batch
        linear = lambda layer, h: layer(h.reshape(G, -1, h.shape[-1])).reshape(G, B, T + 1, -1)
        # (G, B, T, E)
        h = self.dropout(self.embed(codes.reshape(G, B * T, D)).reshape(G, B, T, E) + pos)
        h = torch.cat([h, self.token[:, None, None, :].expand(G, B, 1, E)], dim=2)  # (G, B, T+1, E)
        for _ in range(self.rounds):
            # (G, B, T+1, E), (G, B, T)
            out, attention = trajectory_attention(linear(self.qkv, h), key_bias, self.heads)
            h = self.norm1(h + self.dropout(linear(self.proj, out)))  # post-LN
            h = self.norm2(
                h + self.dropout(linear(self.ff2, self.dropout(F.relu(linear(self.ff1, h)))))
            )
        return self.head(h[:, :, -1])[:, :, None], attention  # (G, B, 1, K), (G, B, T)


def group_probes(probes):
    """One grouped model from G reference probes of one kind (their weights, their order)."""
    kinds = {MLPProbe: GroupedMLPProbe, GRUProbe: GroupedGRUProbe,
             TrajectoryTransformer: GroupedTransformer}
    return kinds[type(probes[0])](probes)


class GroupedAdam:
    """torch.optim.Adam's update (L2 weight decay added to the gradient, bias-corrected moments) for
    parameters whose first dimension is the group (or G*R, group-major), with one learning rate per
    group, lr (G,)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params = [p for p in params if p.requires_grad]
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        # Each parameter's learning rates, (G or G*R, 1, ...): a point MLP's G*T layers are
        # group-major.
        self.lrs = [
            lr.repeat_interleave(p.shape[0] // len(lr)).view(-1, *[1] * (p.dim() - 1))
            for p in self.params
        ]
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = 0

    @torch.no_grad()
    def step(self):
        self.steps += 1
        (b1, b2), n = self.betas, self.steps
        bias1, bias2_sqrt = 1 - b1 ** n, math.sqrt(1 - b2 ** n)
        for p, lr, m, v in zip(self.params, self.lrs, self.exp_avg, self.exp_avg_sq):
            g = p.grad + self.weight_decay * p if self.weight_decay else p.grad
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.sub_(lr / bias1 * m / (v.sqrt() / bias2_sqrt + self.eps))


def clip_grad_norm_per_group(params, max_norm, groups):
    """clip_grad_norm_ applied to each group's gradients separately: the G models stay independent.
    Every parameter's first dimension is the group (or G*R, group-major)."""
    norms = sum(p.grad.reshape(groups, -1).pow(2).sum(1) for p in params).sqrt()  # (G,)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(scale.view(-1, *[1] * (p.dim() - 1)))


@torch.no_grad()
def evaluate_groups(model, codes, labels, inputs, times=None, batch_size=1024):
    """Accuracy per group and head, and each group's mean token attention. codes (V, N, T, D), one
    set of codes per input, read by group g from codes[inputs[g]]; labels (N,)
    -> accuracy (G, R), attention (G, T) or None."""
    model.eval()
    correct, attention = 0, 0
    for start in range(0, codes.shape[1], batch_size):
        # (G, b, R, K), (G, b, T)
        logits, att = model(codes[:, start:start + batch_size][inputs], times)
        # (G, R)
        correct = correct + (logits.argmax(-1) == labels[start:start + batch_size, None]).sum(1)
        if att is not None:
            attention = attention + att.sum(1)  # (G, T)
    n = codes.shape[1]
    return correct.float() / n, attention / n if torch.is_tensor(attention) else None


def train_probe_groups(model, train, val, test, inputs, lrs, seeds, epochs, batch_size=256,
                       weight_decay=1e-5, clip=None, train_times_fn=None, eval_times=None):
    """Trains G grouped probes with Adam and keeps, PER GROUP AND READOUT, the test accuracy at its
    best validation epoch: what training each of the G x R readouts alone would give.

    train/val/test are (codes (V, N, T, D), labels (N,)) pairs; group g reads the input inputs[g],
    learns at lrs[g] and draws its batch order from a generator seeded with seeds[g] (groups of one
    seed see the same batches, as the loop form's runs of that seed do). The loss is the SUM over
    groups and readouts of each head's mean cross-entropy, so every readout gets exactly its own
    gradient, and Adam's element-wise update keeps them apart. clip: gradient-norm clipping per
    group (RNN / Transformer, as the published probes). train_times_fn(generator) -> (column indices
    (k,), times (k,)) draws a random sub-grid per batch (continuous probe; all groups must share one
    seed); eval_times are the times of the val/test columns.
    Returns dict(val (G, R), test (G, R), epoch (G, R), attention (G, T) or None, and state: every
    group's weights at the best validation epoch of its readout 0)."""
    x_train, y_train = train
    inputs, seeds = torch.as_tensor(inputs), torch.as_tensor(seeds)
    if train_times_fn is not None and len(set(seeds.tolist())) > 1:
        raise ValueError("a random sub-grid per batch needs all groups on one seed")
    gens = {s: torch.Generator().manual_seed(s) for s in sorted(set(seeds.tolist()))}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = GroupedAdam(params, torch.as_tensor(lrs, dtype=x_train.dtype, device=x_train.device),
                      weight_decay=weight_decay)
    G, N = len(seeds), x_train.shape[1]
    group_inputs = inputs.to(x_train.device)[:, None]  # (G, 1)
    best = None
    for epoch in range(epochs):
        model.train()
        perms = {s: torch.randperm(N, generator=gen) for s, gen in gens.items()}
        # (G, N) each group's order
        order = torch.stack([perms[s] for s in seeds.tolist()]).to(x_train.device)
        for start in range(0, N, batch_size):
            idx = order[:, start:start + batch_size]  # (G, b)
            x = x_train[group_inputs, idx]  # (G, b, T, D)
            t = None
            if train_times_fn is not None:
                cols, t = train_times_fn(gens[int(seeds[0])])
                x = x[:, :, cols]  # (G, b, k, D)
            logits, _ = model(x, t)  # (G, b, R, K)
            R = logits.shape[2]
            loss = (
                F.cross_entropy(
                    logits.flatten(0, 2),
                    y_train[idx].repeat_interleave(R, dim=1).flatten(),
                    # sum over groups and readouts of mean CE
                    reduction="sum",
                )
                / idx.shape[1]
            )
            for p in params:
                p.grad = None
            loss.backward()
            if clip is not None:
                clip_grad_norm_per_group(params, clip, G)
            opt.step()
        val_acc, _ = evaluate_groups(model, *val, inputs, times=eval_times)  # (G, R)
        test_acc, attention = evaluate_groups(model, *test, inputs, times=eval_times)
        if best is None:
            best = dict(val=torch.full_like(val_acc, -1.0), test=test_acc.clone(),
                        epoch=torch.zeros_like(val_acc, dtype=torch.long), attention=attention,
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})
        improved = val_acc > best["val"]  # (G, R)
        best["val"] = torch.where(improved, val_acc, best["val"])
        best["test"] = torch.where(improved, test_acc, best["test"])
        best["epoch"] = torch.where(improved, torch.full_like(best["epoch"], epoch), best["epoch"])
        # (G,): the groups whose readout 0 improved keep this epoch's weights
        head0 = improved[:, 0]
        if attention is not None:
            best["attention"] = torch.where(head0[:, None], attention, best["attention"])
        for k, v in model.state_dict().items():  # every entry leads with G (or G*R, group-major)
            best["state"][k] = torch.where(head0[:, None], v.reshape(G, -1),
                                           best["state"][k].reshape(G, -1)).reshape(v.shape)
    return best


def run_probe_protocol(kind, codes_train, y_train, codes_test, y_test, num_classes, lrs, epochs,
                       seeds, batch_size=256, val_fraction=0.1, split_seed=0, continuous=None,
                       width=256, dropout=0.25, max_groups=None, progress=None):
    """The paper's protocol (section 3.1) for one probe kind on one label, as one grouped program.

    Holds out a validation split of the training codes, standardises with training statistics only,
    and trains the probe for every input x seed x learning rate, all as groups of one model (for the
    continuous probe, one model per seed: its sub-grids are drawn per seed). Per input, seed and
    head, the learning rate with the best validation accuracy is chosen (the first on ties, as a
    loop would) and its test accuracy at the best validation epoch kept. Seed s gives every learning
    rate the initial weights of build_probe(...) after torch.manual_seed(s) (inside fork_rng: the
    caller's random state is left alone).
    codes (N, T, D), or (V, N, T, D) for V inputs sharing labels (N,) (e.g. trained and random-init
    codes); then every result gains a leading V. width, dropout: see build_probe. max_groups: train
    the groups in chunks of at most this many (None: all in one; on a CPU, where the probes are
    bound by element-wise memory traffic, small chunks that stay in cache are faster; see bench.py).
    continuous: for the grid-free probe, dict(fine_times (M,), eval_cols (T,)): codes_train are on
    the fine grid, training draws random sub-grids of it, validation uses the columns eval_cols and
    codes_test lie on fine_times[eval_cols]; features are standardised per dimension pooled over t
    (per-t statistics would not exist on an unseen grid). progress(done, total), if given, is called
    after each chunk (a script's progress line).
    Returns dict(test_mean (R,), test_std (R,), val_mean (R,), tests (S, R), lrs (S, R), attention
    (T,) mean over seeds or None, standardiser (mean, std)); for the continuous probe also
    chosen_models: per seed (grouped model at its best epochs, index of the chosen group), to test
    the trained probe on other grids."""
    single = codes_train.dim() == 3
    if continuous is not None and not single:
        raise ValueError("the continuous probe takes one input, codes (N, T, D)")
    if single:
        codes_train, codes_test = codes_train[None], codes_test[None]  # (1, N, T, D)
    V, S, L = codes_train.shape[0], len(seeds), len(lrs)
    tr_idx, va_idx = split_train_val(codes_train.shape[1], val_fraction, split_seed)
    per_time = continuous is None
    mean, std = standardiser_stats(codes_train[:, tr_idx], per_time)  # (V, 1, T, D) or (V, 1, 1, D)
    x_tr, x_va, x_te = [(x - mean) / std for x in (codes_train[:, tr_idx], codes_train[:, va_idx],
                                                   codes_test)]
    train_times_fn = eval_times = None
    if continuous is not None:
        x_va = x_va[:, :, continuous["eval_cols"]]  # (V, n_val, T, D)
        train_times_fn, eval_times = (
            grid_sampler(continuous["fine_times"]),
            continuous["fine_times"][continuous["eval_cols"]],
        )
    T, D = codes_test.shape[2:]
    device = codes_train.device
    # Every (input, seed, lr) is one group. They train in chunks of at most max_groups groups (all
    # at once by default; the continuous probe's chunks hold one seed each, as its sub-grids are
    # drawn per seed). Chunking changes nothing but speed and memory: the groups are independent.
    groups = [(v, s, j) for v in range(V) for s in range(S) for j in range(L)]
    if continuous is not None:
        chunks = [[g for g in groups if g[1] == s] for s in range(S)]
    else:
        size = max_groups or len(groups)
        chunks = [groups[i:i + size] for i in range(0, len(groups), size)]
    val, test, att, chosen = {}, {}, {}, {}
    for chunk in chunks:
        # Seeded initial weights and dropout masks inside fork_rng: the caller's random state is
        # left alone.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            probes = {}
            for v, s, _ in chunk:
                if s not in probes:
                    # the same initial weights for every lr and input of a seed
                    torch.manual_seed(seeds[s])
                    probes[s] = build_probe(kind, T, D, num_classes, width, dropout)
            model = group_probes([probes[s] for _, s, _ in chunk]).to(device)
            torch.manual_seed(seeds[chunk[0][1]])  # dropout masks
            res = train_probe_groups(
                model,
                (x_tr, y_train[tr_idx]),
                (x_va, y_train[va_idx]),
                (x_te, y_test),
                [v for v, _, _ in chunk],
                [lrs[j] for _, _, j in chunk],
                [seeds[s] for _, s, _ in chunk],
                epochs,
                batch_size,
                clip=None if kind in ("mlp", "concat", "mean") else 1.0,
                train_times_fn=train_times_fn,
                eval_times=eval_times,
            )
        for i, g in enumerate(chunk):
            val[g], test[g] = res["val"][i], res["test"][i]  # (R,) each
            att[g] = None if res["attention"] is None else res["attention"][i]  # (T,)
            if continuous is not None:  # kept to evaluate the chosen probe on other grids
                chosen[g] = (model, res["state"], i)
        if progress is not None:
            progress(chunks.index(chunk) + 1, len(chunks))
    grid = lambda d: torch.stack([d[g] for g in groups]).reshape(V, S, L, -1)  # (V, S, L, ...)
    val, test = grid(val), grid(test)  # (V, S, L, R)
    pick = val.argmax(2, keepdim=True)  # (V, S, 1, R): first best lr, per input, seed and readout
    tests = test.gather(2, pick)[:, :, 0]  # (V, S, R)
    out = dict(test_mean=tests.mean(1), test_std=tests.std(1, unbiased=False), tests=tests,
               val_mean=val.gather(2, pick)[:, :, 0].mean(1),
               lrs=torch.tensor(lrs, device=val.device)[pick[:, :, 0]], standardiser=(mean, std),
               attention=None)
    if att[groups[0]] is not None:
        att = grid(att)  # (V, S, L, T)
        # (V, T)
        out["attention"] = att.gather(2, pick[..., :1].expand(-1, -1, -1, att.shape[-1]))[
            :, :, 0
        ].mean(1)
    # per seed: its grouped model at the best epochs and the group chosen
    if continuous is not None:
        out["chosen_models"] = []
        for s in range(S):
            model, state, i = chosen[(0, s, int(pick[0, s, 0, 0]))]
            model.load_state_dict(state)
            out["chosen_models"].append((model, i))
    if single:
        out = {k: v[0] if torch.is_tensor(v) else v for k, v in out.items()}
        out["standardiser"] = (mean[0], std[0])
    return out


class GroupedStatisticsNetwork(nn.Module):
    """G statistics networks (one per pair and seed) in one batched model, starting from the weights
    of the G given ones. (G, B, Dx + Dy) -> (G, B)."""

    def __init__(self, nets):
        super().__init__()
        self.layers = nn.ModuleList(
            [GroupedLinear.stack([net[i] for net in nets]) for i in (0, 2, 4)]
        )

    def forward(self, xy):
        h = F.elu(self.layers[0](xy))
        h = F.elu(self.layers[1](h))
        return self.layers[2](h)[..., 0]  # (G, B)


def mine_pairs(x, y, pairs, steps=2000, batch_size=256, lr=1e-4, hidden=256, ma_rate=0.01,
               holdout=0.2, eval_shuffles=8, seeds=(0,), eval_rows=512, progress=None):
    """The grouped form of `mine`: MINE estimates of I(x[:, i]; y[:, j]) in nats for every pair
    (i, j) and every seed, all trained together as one grouped model, each group exactly as `mine`
    trains its one pair (the same draws from the same seeded generator; tested equal).
    x (N, Tx, Dx), y (N, Ty, Dy), pairs (P, 2) of indices (i into Tx, j into Ty) -> (S, P) nats.
    Every pair of a seed starts from the same weights, and the moving average of E[e^T] is kept per
    group. progress(steps done, steps), if given, is called at every tenth of the steps."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of rows (samples), got {x.shape[0]} and "
                         f"{y.shape[0]}")
    device = x.device
    pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2).to(device)  # (P, 2)
    S, P = len(seeds), len(pairs)
    # own generators: the caller's RNG is left alone
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    n_hold = max(2, int(len(x) * holdout))
    perms = [torch.randperm(len(x), generator=g).to(device) for g in gens]
    hold = torch.stack([p[:n_hold] for p in perms])  # (S, n_hold)
    train = torch.stack([p[n_hold:] for p in perms])  # (S, n_train)
    nets = []
    for s in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            net = statistics_network(x.shape[2] + y.shape[2], hidden)
        nets += [net] * P  # every pair of a seed starts from the same weights
    net = GroupedStatisticsNetwork(nets).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    log_ma = torch.zeros(S * P, device=device)  # log of the moving average of E[e^T], per group

    def joint_and_marginal(rows, shuffled):
        """rows, shuffled (S, b) -> T on joint and on marginal samples, each (S*P, b)."""
        b = rows.shape[1]
        xs = x[rows].transpose(1, 2)[:, pairs[:, 0]]  # (S, P, b, Dx)
        # (S, P, 2b, Dy): joint, marginal
        ys = y[torch.cat([rows, shuffled], 1)].transpose(1, 2)[:, pairs[:, 1]]
        xy = torch.cat([xs.repeat(1, 1, 2, 1), ys], -1)  # (S, P, 2b, Dx + Dy)
        out = net(xy.reshape(S * P, 2 * b, -1))  # (S*P, 2b): one pass for both
        return out[:, :b], out[:, b:]

    for step in range(steps):
        draws = [[train[s][torch.randint(train.shape[1], (batch_size,),
                                         generator=g).to(device)] for _ in range(2)]
                 # per seed: its rows, then independent rows for the marginal
                 for s, g in enumerate(gens)]
        rows, shuffled = (torch.stack(d) for d in zip(*draws))  # (S, b) each
        joint, marginal = joint_and_marginal(rows, shuffled)
        lme = log_mean_exp(marginal, 1)  # (G,) log E_marg[e^T]
        log_ma = lme.detach() if step == 0 else torch.logaddexp(
            log_ma + math.log(1 - ma_rate), lme.detach() + math.log(ma_rate))
        # Bias-corrected surrogate: its gradient is grad E_joint[T] - grad E_marg[e^T] / ma.
        loss = -(joint.mean(1) - torch.exp(lme - log_ma)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None and (step + 1) % max(1, steps // 10) == 0:
            progress(step + 1, steps)
    with torch.no_grad():
        estimates = []
        for _ in range(eval_shuffles):
            shuffled = torch.stack([h[torch.randperm(n_hold, generator=g).to(device)] for h,
                                    g in zip(hold, gens)])
            joint_sum, marginal_lse = 0, []
            for start in range(0, n_hold, eval_rows):
                joint, marginal = joint_and_marginal(
                    hold[:, start : start + eval_rows], shuffled[:, start : start + eval_rows]
                )
                joint_sum = joint_sum + joint.sum(1)
                marginal_lse.append(torch.logsumexp(marginal, 1))  # (G,)
            lme = torch.logsumexp(torch.stack(marginal_lse), 0) - math.log(n_hold)
            estimates.append(joint_sum / n_hold - lme)  # (G,)
    return torch.stack(estimates).mean(0).reshape(S, P)  # (S, P)



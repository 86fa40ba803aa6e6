"""trajrep: trajectory-based representations in diffusion models, as one readable library.

Implements "From Points to Functions: Infinite-Dimensional Representations in Diffusion Models"
(Mittal, Lajoie, Bauer, Mehrjou), built on "Diffusion-Based Representation Learning" (Abstreiter et
al., "DRL"). A diffusion model with a learned encoder maps each image x0 to a curve
t -> E(x0, t), t in [0, 1]; probes read the curve (Figure 1), MINE measures how information changes
along it (Figure 2), and a Transformer probe shows which part it attends to (Figure 3).

Sections in the paper's order: SDE (eq. 1), networks, losses (eq. 3-4), trajectories, probes,
MINE and NMI, curve analysis (eq. 5), paired tests of claims over encoders; then data, caches
and checkpoints. A library: no argparse, no I/O at import; its errors name arguments, and the
scripts turn them into one line.

Shape legend, used in every shape comment (one letter, one meaning):
    B batch, N examples in a split, A attributes (labels per example), K classes;
    C, H, W image channels, height, width; D code size; T time points on a trajectory;
    M points of the fine grid the grid-free probe trains on; R readouts of one probe (T for the
    per-t MLPs, else 1); U hidden units of a GRU probe; E width of a Transformer probe (nh heads);
    S seeds; L learning rates; P pairs of time points.
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
    """An error the user can fix; scripts print its one-sentence message and exit."""

# ==== SDE: the Variance Exploding SDE of paper eq. 1 ==============================================
# dx = sqrt(d[sigma^2(t)]/dt) dw with sigma(t) = sigma_min * (sigma_max / sigma_min)^t. Eq. 1's
# kernel variance is sigma^2(t) - sigma^2(0); like the published code, the process starts from data
# blurred by N(0, sigma_min^2), so x_t | x0 ~ N(x0, sigma(t)^2 I) exactly and t = 0 is well defined.

def ve_sigma(t, sigma_min=0.01, sigma_max=50.0):
    """sigma(t) = sigma_min * (sigma_max / sigma_min)^t, the noise scale of the VE-SDE (eq. 1)."""
    return sigma_min * (sigma_max / sigma_min) ** t

def ve_diffusion(t, sigma_min=0.01, sigma_max=50.0):
    """g(t) = sqrt(d[sigma^2(t)]/dt) = sigma(t) * sqrt(2 log(sigma_max / sigma_min)) (eq. 1)."""
    return ve_sigma(t, sigma_min, sigma_max) * math.sqrt(2.0 * math.log(sigma_max / sigma_min))

def ve_marginal(x0, t, sigma_min=0.01, sigma_max=50.0):
    """Mean and std of the kernel p_0t(x_t | x0) = N(x0, sigma(t)^2 I).
    x0 (B, ...), t (B,) -> mean (B, ...), std (B,)."""
    return x0, ve_sigma(t, sigma_min, sigma_max)

T_DISTRIBUTIONS = ("uniform", "sigma", "mixture")

def times_from_uniform(u, coin, t_dist="uniform", eps=1e-5, sigma_min=0.01, sigma_max=50.0):
    """Training times from uniform draws u, coin in [0, 1) (B,), by the distribution `t_dist`:
    'uniform'  t ~ U(eps, 1) (published): most draws where x_t still shows the image.
    'sigma'    sigma(t) ~ U(sigma_min, sigma_max) (the DRL paper's remedy): nearly all at high
               noise, density p(t) = sigma(t) log(sigma_max / sigma_min) / (sigma_max - sigma_min).
    'mixture'  'uniform' where coin < 1/2, else 'sigma': every t is still trained.
    Times are clipped to [eps, 1]. Returns t (B,)."""
    if t_dist not in T_DISTRIBUTIONS:
        raise ValueError(f"unknown time distribution {t_dist!r}; choose from {T_DISTRIBUTIONS}")
    t_unif = eps + (1.0 - eps) * u  # (B,)
    sigma = sigma_min + (sigma_max - sigma_min) * u  # (B,) uniform on [sigma_min, sigma_max]
    t_sigma = (torch.log(sigma / sigma_min) / math.log(sigma_max / sigma_min)).clamp(eps, 1.0)
    if t_dist == "uniform":
        return t_unif
    return t_sigma if t_dist == "sigma" else torch.where(coin < 0.5, t_unif, t_sigma)

def sample_training_noise(batch_size, image_shape, code_dim, eps=1e-5, generator=None, device=None,
                          t_dist="uniform", sigma_min=0.01, sigma_max=50.0):
    """All randomness of one training step: t, the kernel's noise and the VDRL reparameterisation's
    Gaussian. Every DDP rank draws the GLOBAL batch from one shared generator and takes its slice.
    Returns t (B,), noise (B, C, H, W), code_noise (B, D)."""
    u, coin = torch.rand(2, batch_size, generator=generator, device=device)  # 2 x (B,)
    t = times_from_uniform(u, coin, t_dist, eps, sigma_min, sigma_max)  # (B,)
    noise = torch.randn(batch_size, *image_shape, generator=generator, device=device)
    code_noise = torch.randn(batch_size, code_dim, generator=generator, device=device)  # (B, D)
    return t, noise, code_noise

# ==== Networks: time embedding, time-aware encoder E(x0, t), encoder-conditioned score U-Net ======

def check_batch(x, t, who):
    """Refuses, with what to pass instead, the inputs that `who` cannot work with: images x must
    be a batch (B, C, H, W) with B >= 1, and t a tensor of one time per image, (B,)."""
    if not torch.is_tensor(x) or x.dim() != 4 or len(x) == 0:
        raise ValueError(f"{who} needs images (B, C, H, W) with B >= 1, got shape "
                         f"{tuple(getattr(x, 'shape', ()))}: give one image as x[None]")
    if not torch.is_tensor(t) or t.shape != (len(x),):
        raise ValueError(f"{who} needs t, one time per image, as a tensor of shape ({len(x)},); "
                         f"got {tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}: pass "
                         "torch.full((B,), t) for one time, t.flatten() for a (B, 1) tensor")

def group_norm(channels):
    """GroupNorm, up to 32 groups of at least 4 channels (NCSN++). Not BatchNorm (published): the
    code of one image must not depend on which images share its batch."""
    groups = max(1, min(32, channels // 4))
    if channels % groups:
        raise ValueError(f"GroupNorm cannot split {channels} channels into {groups} equal groups")
    return nn.GroupNorm(groups, channels)

class TimeEmbedding(nn.Module):
    """Gaussian Fourier features [sin, cos](2 pi W log sigma(t)) of 16 fixed frequencies
    W ~ N(0, 16^2), then two Linear layers (published). t (B,) -> (B, dim)."""

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
    """Pre-activation residual block whose features are modulated by a conditioning vector c:
    h -> conv(SiLU(GN(h))) -> GN -> * (1 + scale(c)) + shift(c) -> SiLU -> dropout -> conv, + skip.
    c acts before a non-linearity: had t entered only the last layer, E(x0, t) = A h(x0) + b(t)
    and every trajectory would be one point shifted by the same offset for every image.
    h (B, C_in, H, W), c (B, cond_dim) -> (B, C_out, H / stride, W / stride)."""

    def __init__(self, c_in, c_out, cond_dim, stride=1, dropout=0.0):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.cond = nn.Linear(cond_dim, 2 * c_out)  # per-channel scale and shift
        self.norm2, self.dropout = group_norm(c_out), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = (nn.Identity() if c_in == c_out and stride == 1
                     else nn.Conv2d(c_in, c_out, 1, stride=stride))

    def forward(self, h, c):
        x = self.conv1(F.silu(self.norm1(h)))  # (B, C_out, H', W')
        scale, shift = self.cond(F.silu(c))[:, :, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1)
        x = self.conv2(self.dropout(F.silu(self.norm2(x) * (1 + scale) + shift)))
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
        q, k, v = self.qkv(self.norm(h)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return h + self.proj(out.transpose(1, 2).reshape(B, C, H, W))

ENCODER_HEADS = ("pool", "flatten", "both")  # how the last feature map becomes the code

class Encoder(nn.Module):
    """Time-aware encoder E_phi(x0, t) on the CLEAN image x0 (eq. 4): a 3x3 stem, per entry of
    `widths` a stage of `blocks` CondResBlocks on the time embedding (each stage after the first
    halves the resolution), GroupNorm, SiLU, a Linear head; (32, 64, 128) x 4 is the published
    WRN-28-2 (where emb(t) is only a bias). head 'pool' (published) averages the last feature map
    away, 'flatten' keeps where things are, 'both'. probabilistic (VDRL): mu and a log-variance,
    z = mu + exp(logvar / 2) n in training; the representation is mu.
    x0 (B, C, H, W), t (B,) -> mu (B, D), logvar (B, D) or None."""

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
        check_batch(x0, t, "the encoder")
        temb = self.temb(t)  # (B, temb_dim)
        h = self.stem(x0)  # (B, W0, H, W)
        for block in self.blocks:
            h = block(h, temb)
        h = F.silu(self.norm(h))  # (B, C, r, r)
        pooled, flat = h.mean(dim=(2, 3)), h.flatten(1)  # (B, C), (B, C*r*r)
        h = {"pool": pooled, "flatten": flat}.get(self.head_kind)
        out = self.head(torch.cat([pooled, flat], 1) if h is None else h)  # (B, D) or (B, 2D)
        return (out, None) if not self.probabilistic else out.chunk(2, dim=1)

PRECONDS = ("sigma", "edm")  # how the network output becomes a score; see ScoreNet

class ScoreNet(nn.Module):
    """Encoder-conditioned score network s_theta(x_t, z, t) of eq. 4, a small NCSN++-like U-Net.
    The code enters by two routes (published): c = [emb(t), Linear(z)] scales and shifts every
    residual block (WHAT), and Linear(c) is a map of `map_channels` x r x r concatenated to the
    bottleneck (WHERE). The output F becomes a score by `precond`: 'sigma' (published) s = F /
    sigma, so at sigma = 50 an error of 0.01 in F is 0.5 in the denoised image; 'edm' (Karras et
    al. 2022, eq. 7) D = c_skip x_t + c_out F(c_in x_t) with sd = sigma_data, c_skip = sd^2 /
    (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2), and
    s = (D - x_t) / sigma^2: at high noise F predicts x0 from the code, an autoencoder's decoder.
    x_t (B, C, H, W), z (B, D), t (B,) -> score (B, C, H, W)."""

    def __init__(self, in_channels, code_dim, nf, ch_mult, num_res_blocks, attn_resolutions,
                 image_size, sigma_min, sigma_max, dropout=0.0, map_channels=32, precond="sigma",
                 sigma_data=0.5):
        super().__init__()
        if precond not in PRECONDS:
            raise ValueError(f"unknown preconditioning {precond!r}; choose from {PRECONDS}")
        temb_dim = 4 * nf
        cond = 2 * temb_dim
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.precond, self.sigma_data = precond, sigma_data
        self.temb = TimeEmbedding(temb_dim, sigma_min, sigma_max)
        self.code_proj = nn.Linear(code_dim, temb_dim)
        self.conv_in = nn.Conv2d(in_channels, nf, 3, padding=1)
        # a residual block, with self-attention after it at the listed resolutions
        block = lambda c_in, c_out, res: nn.ModuleList([
            CondResBlock(c_in, c_out, cond, dropout=dropout),
            SelfAttention2d(c_out) if res in attn_resolutions else nn.Identity()])
        # Down path: num_res_blocks blocks per level, then 2x average pooling.
        self.down, chans, c, res = nn.ModuleList(), [nf], nf, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(c, nf * mult, res))
                c = nf * mult
                chans.append(c)
            if level < len(ch_mult) - 1:
                self.down.append(nn.AvgPool2d(2))
                chans.append(c)
                res //= 2
        self.map_shape = (map_channels, res, res)  # route (2): the code as a map at the bottleneck
        self.code_map = nn.Linear(cond, map_channels * res * res)
        self.mid1 = CondResBlock(c + map_channels, c, cond, dropout=dropout)
        self.mid_attn = SelfAttention2d(c)
        self.mid2 = CondResBlock(c, c, cond, dropout=dropout)
        # Up path: num_res_blocks + 1 blocks per level, each taking one skip connection.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(c + chans.pop(), nf * mult, res))
                c = nf * mult
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                res *= 2
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # F = 0 at the start: s = 0 ('sigma'), D = c_skip x_t
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, xt, z, t):
        check_batch(xt, t, "the score network")
        sigma = ve_sigma(t, self.sigma_min, self.sigma_max)[:, None, None, None]  # (B, 1, 1, 1)
        sd = self.sigma_data
        c_in = 1.0 if self.precond == "sigma" else torch.rsqrt(sigma ** 2 + sd ** 2)
        c = torch.cat([self.temb(t), self.code_proj(z)], dim=1)  # (B, 2 * temb_dim)
        h = self.conv_in(xt * c_in)
        skips = [h]
        for layer in self.down:  # a block (and attention), or 2x average pooling
            h = layer[1](layer[0](h, c)) if isinstance(layer, nn.ModuleList) else layer(h)
            skips.append(h)
        code_map = self.code_map(F.silu(c)).reshape(len(c), *self.map_shape)  # (B, 32, r, r)
        h = self.mid2(self.mid_attn(self.mid1(torch.cat([h, code_map], dim=1), c)), c)
        for layer in self.up:  # a block on [h, skip] (and attention), or 2x upsampling
            if isinstance(layer, nn.ModuleList):
                h = layer[1](layer[0](torch.cat([h, skips.pop()], dim=1), c))
            else:
                h = layer(h)
        out = self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W), the network output F
        if self.precond == "sigma":
            return out / sigma  # s = F / sigma
        denoised = sd ** 2 / (sigma ** 2 + sd ** 2) * xt + sigma * sd * torch.rsqrt(
            sigma ** 2 + sd ** 2) * out
        return (denoised - xt) / sigma ** 2  # Tweedie: s = (D - x_t) / sigma^2

class DRLModel(nn.Module):
    """Encoder + score network trained together by eq. 4; forward returns the loss, so that one
    DistributedDataParallel wrapper covers both networks.
    forward(x0 (B, C, H, W), t (B,), noise (B, C, H, W), code_noise (B, D)) -> loss, dsm, reg."""

    def __init__(self, in_channels=3, image_size=32, probabilistic=False, code_dim=128,
                 enc_widths=(32, 64, 128), enc_blocks=4, nf=16, ch_mult=(1, 2, 2, 2),
                 num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, lambda_z=1e-5,
                 sigma_min=0.01, sigma_max=50.0, enc_head="pool", precond="sigma",
                 weighting="sigma2", sigma_data=0.5):
        super().__init__()
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"image_size {image_size} is not divisible by 2^{len(ch_mult) - 1}, "
                             f"as the {len(ch_mult)} levels of ch_mult {tuple(ch_mult)} need")
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

# ==== Losses (eq. 3-4), the DRL / VDRL regularisers, learning rate, EMA ===========================

WEIGHTINGS = ("sigma2", "edm")

def loss_weight(sigma, weighting="sigma2", sigma_data=0.5):
    """lambda(sigma) / sigma^2 for the loss weight lambda of eq. 3-4 (the paper gives none).
    'sigma2' (published): lambda = sigma^2, so at high noise, where the denoiser NEEDS the code,
    errors of the denoised image count 1/sigma^2. 'edm' (Karras et al. 2022, eq. 8): lambda =
    sigma^2 (sigma^2 + sd^2) / sd^2, about 1/sd^2 there. sigma (B,) -> (B,)."""
    if weighting == "sigma2":
        return torch.ones_like(sigma)
    if weighting == "edm":
        return 1.0 + sigma ** 2 / sigma_data ** 2
    raise ValueError(f"unknown weighting {weighting!r}; choose from {WEIGHTINGS}")

def dsm_loss(score, noise, sigma, weight=None):
    """Weighted denoising score matching (eq. 3-4) for x_t = x0 + sigma * noise. The kernel's score
    is -noise / sigma, so lambda ||s - target||^2 = weight ||sigma s + noise||^2 with weight =
    lambda / sigma^2 (None: 1); 0.5 * sum over pixels, mean over the batch (published).
    score, noise (B, C, H, W), sigma (B,), weight (B,) or None -> scalar."""
    if sigma.shape != score.shape[:1] or (weight is not None and weight.shape != sigma.shape):
        raise ValueError(f"dsm_loss needs sigma and weight of shape (B,) = ({len(score)},), one "
                         f"per example; got {tuple(sigma.shape)} and "
                         f"{None if weight is None else tuple(weight.shape)}: flatten them")
    err = sigma[:, None, None, None] * score + noise  # (B, C, H, W)
    per_example = 0.5 * err.pow(2).flatten(1).sum(1)  # (B,)
    return (per_example if weight is None else weight * per_example).mean()

def kl_std_normal(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over code dims, per example. (B, D) -> (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)

def code_regulariser(mu, logvar):
    """DRL: L1 norm of the code, sum |z|; VDRL: KL to N(0, I). Both averaged over the batch."""
    return mu.abs().sum(1).mean() if logvar is None else kl_std_normal(mu, logvar).mean()

def drl_loss(encoder, score_net, x0, t, noise, code_noise, lambda_z=1e-5,
             sigma_min=0.01, sigma_max=50.0, weighting="sigma2", sigma_data=0.5):
    """The DRL / VDRL objective: eq. 4 weighted by loss_weight, plus lambda_z times the regulariser.
    The score network sees x_t = x0 + sigma(t) noise and the code E(x0, t) of the CLEAN image.
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
    """The learning rate of step `step` (0-based): linear warm-up to `lr`, then 'none' (published)
    or 'cosine', lr (1 + cos(pi p)) / 2 with p from 0 after the warm-up to 1 at `steps`."""
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
    for e, p in zip(ema_params, params):
        e.lerp_(p, 1.0 - decay)

# ==== Trajectories: the curve t -> E(x0, t) on a grid of times (paper section 2.1, 3) =============

def paper_times(num_times=11):
    """The paper's regular grid on [0, 1]: 11 points 0, 0.1, ..., 1.0 by default. (T,)"""
    return torch.linspace(0.0, 1.0, num_times)

@torch.no_grad()
def extract_trajectories(encoder, images, times, batch_size=256):
    """Codes E(x0, t) of every image at every time, on the CPU; VDRL's representation is mu. All
    T times of batch_size // T images go through the encoder (eval mode, where its weights are,
    channels-last as in training) in one pass. images (N, C, H, W), times (T,) -> (N, T, D)."""
    encoder.eval()
    device = next(encoder.parameters()).device
    times = torch.as_tensor(times, dtype=torch.float32, device=device).flatten()  # (T,)
    if not torch.is_tensor(images) or images.dim() != 4 or len(images) == 0 or len(times) == 0:
        raise ValueError("extract_trajectories needs images (N, C, H, W), N >= 1 (one image is "
                         "x[None]), and at least one time")
    T = len(times)
    per_pass = max(1, batch_size // T)
    out = []
    for start in range(0, len(images), per_pass):
        x = images[start:start + per_pass].to(device)  # (b, C, H, W)
        b = len(x)
        x_rep = x.repeat_interleave(T, 0).contiguous(memory_format=torch.channels_last)  # (bT, ...)
        mu, _ = encoder(x_rep, times.repeat(b))  # (b*T, D)
        out.append(mu.reshape(b, T, -1).float().cpu())  # (b, T, D)
    return torch.cat(out)  # (N, T, D)

# ==== Probes: MLPs, GRU, Transformer, and the paper's protocol (Figure 1, 3) ======================
# Every probe maps codes (B, T, D) (and times, read by the grid-free one) to (logits (B, R, K),
# attention (B, T) or None): R = T readouts for the per-t MLPs, else 1.

class MLPProbe(nn.Module):
    """MLP probes (section 3.1; hidden 512, dropout 0.25), `pool`: 'point' (one MLP per time
    point, R = T), or the controls 'concat' (the T codes side by side) and 'mean' (mean over t)."""

    def __init__(self, num_points, d, num_classes, pool="point", hidden=512, dropout=0.25):
        super().__init__()
        self.pool, self.num_points = pool, num_points
        d_in = num_points * d if pool == "concat" else d
        mlp = lambda: nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout),
                                    nn.Linear(hidden, num_classes))  # the published probe MLP
        self.mlps = nn.ModuleList([mlp() for _ in range(num_points if pool == "point" else 1)])

    def forward(self, codes, times=None):  # times are not read
        if self.pool != "mean" and codes.shape[1] != self.num_points:
            raise ValueError(f"this MLP probe reads {self.num_points} time points, got codes of "
                             f"{codes.shape[1]}: build it for the codes' T")
        if self.pool == "point":  # (B, T, K)
            return torch.stack([mlp(codes[:, t]) for t, mlp in enumerate(self.mlps)], 1), None
        x = codes.flatten(1) if self.pool == "concat" else codes.mean(1)  # (B, T*D) or (B, D)
        return self.mlps[0](x)[:, None], None  # (B, 1, K)

class GRUProbe(nn.Module):
    """Recurrent probe (section 3.1): a GRU runs along the curve from t = 0 to 1; dropout and a
    linear head read its last state. codes (B, T, D) -> (logits (B, 1, K), None)."""

    def __init__(self, d, num_classes, hidden=256, dropout=0.25):
        super().__init__()
        self.gru = nn.GRU(d, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, codes, times=None):  # times are not read
        _, h_last = self.gru(codes)  # (1, B, U)
        return self.head(self.dropout(h_last[0]))[:, None], None  # (B, 1, K)

def sinusoidal_embedding(x, dim, max_period=10000.0):
    """Transformer sinusoids of a real-valued position x (...,) -> (..., dim)."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=x.device) / (dim // 2))
    angle = x[..., None].float() * freqs  # (..., dim/2)
    return torch.cat([angle.sin(), angle.cos()], dim=-1)  # (..., dim)

def quadrature_weights(times):
    """Trapezoid cell widths of a sorted grid of times (..., T) -> (..., T): weights that turn an
    average over a grid into an integral over t."""
    edges = torch.cat([times[..., :1], (times[..., 1:] + times[..., :-1]) / 2, times[..., -1:]], -1)
    return (edges[..., 1:] - edges[..., :-1]).clamp_min(1e-6)  # (..., T)

def position_and_key_bias(time_embedding, width, T, times, device):
    """Position embedding and attention-logit bias of the INDEX of each point (pos (T, E), bias 0)
    or of the VALUE of t (pos (..., T, E), bias log quadrature weight (..., T))."""
    if time_embedding == "index":
        index = torch.arange(T, device=device)
        return sinusoidal_embedding(index, width), torch.zeros(T, device=device)
    times = times.to(device)
    return sinusoidal_embedding(times * 1000.0, width), quadrature_weights(times).log()

def trajectory_attention(qkv, key_bias, heads):
    """softmax(q k^T / sqrt(d) + key_bias) v, queries from the T points and the token (last),
    keys and values from the T points only. qkv (..., T+1, 3E), key_bias (..., T) -> (values
    (..., T+1, E), the token's attention over the points (..., T), head-averaged)."""
    *lead, rows, three_e = qkv.shape
    width = three_e // 3
    # (n, nh, T+1, E/nh) each
    q, k, v = qkv.reshape(-1, rows, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    k, v = k[:, :, :rows - 1], v[:, :, :rows - 1]  # keys, values: the points only (n, nh, T, E/nh)
    bias = key_bias.expand(*lead, rows - 1).reshape(-1, 1, 1, rows - 1)  # (n, 1, 1, T)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(-1, heads, rows, -1))
    token = (q[:, :, -1:] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias).softmax(-1)
    out = out.transpose(1, 2).reshape(*lead, rows, width)  # (..., T+1, E)
    return out, token[:, :, 0].mean(1).reshape(*lead, rows - 1)  # (..., T)

class TrajectoryTransformer(nn.Module):
    """Transformer probe: a learned token attends over the curve (Figure 3). Codes are embedded by
    Linear(D, width) + dropout plus a position embedding of the INDEX of the point ('index', the
    paper's) or the VALUE of t ('value', grid-free: the log quadrature weights in the logits make
    attention an integral over t, so one probe reads coarse, fine or irregular grids). One post-LN
    block, applied `rounds` times; a linear head reads the token. Departure: keys and values are the
    T points only, so the token's attention is a distribution over them. codes (B, T, D), times (T,)
    or (B, T) -> (logits (B, 1, K), the token's last attention (B, T))."""

    def __init__(self, d, num_classes, width=256, heads=4, rounds=2, dropout=0.25,
                 time_embedding="index"):
        super().__init__()
        self.width, self.heads, self.rounds = width, heads, rounds
        self.time_embedding = time_embedding
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
        h = self.dropout(self.embed(codes) + pos)  # (B, T, E)
        h = torch.cat([h, self.token.expand(B, 1, -1)], dim=1)  # (B, T+1, E), token last
        for _ in range(self.rounds):
            out, attention = trajectory_attention(self.qkv(h), key_bias.expand(B, T), self.heads)
            h = self.norm1(h + self.dropout(self.proj(out)))  # post-LN
            h = self.norm2(h + self.dropout(self.ff(h)))
        return self.head(h[:, -1])[:, None], attention  # (B, 1, K), (B, T)

def build_probe(kind, num_points, d, num_classes, width=256, dropout=0.25):
    """The probes of the Figure 1 table by name: 'mlp' (one per t), 'concat', 'mean', 'gru',
    'transformer' (two rounds of the block), 'attention' (the paper's single-layer Transformer,
    Figure 3: one round, so its token's attention falls on the points as the encoder gave them,
    before any mixing), 'continuous' (the grid-free Transformer on the value of t). `width`: the
    GRU's hidden size and the Transformer's width (paper 256); the MLPs keep 512 hidden units."""
    if kind in ("mlp", "concat", "mean"):
        pool = "point" if kind == "mlp" else kind
        return MLPProbe(num_points, d, num_classes, pool=pool, dropout=dropout)
    if kind == "gru":
        return GRUProbe(d, num_classes, hidden=width, dropout=dropout)
    if kind in ("transformer", "attention", "continuous"):
        return TrajectoryTransformer(d, num_classes, width=width, dropout=dropout,
                                     rounds=1 if kind == "attention" else 2,
                                     time_embedding="value" if kind == "continuous" else "index")
    raise ValueError(f"unknown probe {kind!r}")

@torch.no_grad()
def evaluate_probe(probe, codes, labels, times=None, chunk=1024):
    """Which examples each readout of a probe gets right, in eval mode (its accuracy is the mean
    over examples), and the token's mean attention (None for probes without one).
    codes (N, T, D), labels (N,) -> (correct (N, R) bool, attention (T,) or None)."""
    probe.eval()
    correct, attention = [], None
    for start in range(0, len(labels), chunk):
        logits, att = probe(codes[start:start + chunk], times)  # (b, R, K), (b, T) or None
        correct.append(logits.argmax(-1) == labels[start:start + chunk, None])  # (b, R)
        if att is not None:
            attention = att.sum(0) if attention is None else attention + att.sum(0)
    return torch.cat(correct), None if attention is None else attention / len(labels)

def train_probe(probe, train, val, test, lr, epochs, batch_size=256, seed=0, weight_decay=1e-5,
                clip=None, train_times_fn=None, eval_times=None):
    """Trains one probe with Adam (section 3.1) and keeps, per readout, the test accuracy at its
    best VALIDATION epoch. train / val / test: (codes (N, T, D), labels (N,)), standardised. The
    batch order comes from a generator seeded with `seed`; the loss sums the readouts' mean
    cross-entropies, so per-t MLPs learn independently; clip: the published GRU / Transformer's 1.0.
    train_times_fn(generator) -> (columns (k,), times (k,)) draws a sub-grid per batch (grid-free
    probe); eval_times: the val / test times. Returns dict(val, test, epoch (R,), correct
    (N_test, R): which test examples each readout gets right at its best epoch, and at readout 0's
    best epoch the test attention (T,) and state, the weights)."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"train_probe needs epochs >= 1 and batch_size >= 1, got {epochs} and "
                         f"{batch_size}")
    for name, (x, y) in (("train", train), ("val", val), ("test", test)):
        if len(y) == 0 or len(x) != len(y) or not x.isfinite().all():
            raise ValueError(f"train_probe needs {name} codes (N, T, D) with N >= 1 rows, one "
                             f"label per row, all finite; got {len(x)} codes, {len(y)} labels"
                             + ("" if x.isfinite().all() else ", non-finite values"))
    x_train, y_train = train
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    best = None
    for epoch in range(epochs):
        probe.train()
        order = torch.randperm(len(y_train), generator=gen).to(y_train.device)  # (N,)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]  # (b,)
            x, times = x_train[idx], None  # (b, T, D)
            if train_times_fn is not None:  # the grid-free probe: a random sub-grid
                cols, times = train_times_fn(gen)
                x = x[:, cols]  # (b, k, D)
            logits, _ = probe(x, times)  # (b, R, K)
            loss = sum(F.cross_entropy(logits[:, r], y_train[idx]) for r in range(logits.shape[1]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(probe.parameters(), clip)
            opt.step()
        val_acc = evaluate_probe(probe, *val, times=eval_times)[0].float().mean(0)  # (R,)
        correct, attention = evaluate_probe(probe, *test, times=eval_times)  # (N_test, R)
        best = best or dict(val=torch.full_like(val_acc, -1.0), correct=correct,
                            epoch=torch.zeros_like(val_acc).long())
        improved = val_acc > best["val"]  # (R,): strictly better, the earliest best epoch is kept
        for key, now in (("val", val_acc), ("correct", correct), ("epoch", epoch)):
            best[key] = torch.where(improved, now, best[key])  # per readout (a column of correct)
        best["test"] = best["correct"].float().mean(0)  # (R,)
        if improved[0]:
            best["attention"] = attention
            best["state"] = {k: v.detach().clone() for k, v in probe.state_dict().items()}
    return best

def standardiser_stats(train, per_time=True):
    """Mean and std of TRAINING codes (..., N, T, D), per (t, d) -> (..., 1, T, D) each, or per d
    pooled over t (per_time=False) -> (..., 1, 1, D). Apply as (codes - mean) / std."""
    dims = (-3,) if per_time else (-3, -2)
    return train.mean(dims, keepdim=True), train.std(dims, keepdim=True).clamp_min(1e-6)

def kernel_readout(train, test, num_classes, ridge=1e-4, scale=4.0):
    """The training monitor's read-out: per time, kernel ridge regression of one-hot labels on
    codes standardised on train (kernel exp(-|a - b|^2 / (scale D))), in closed form: no epochs, no
    randomness. train / test: (codes (N, T, D), labels (N,)) -> test accuracy per time (T,)."""
    (x, y), (x_test, y_test) = train, test
    mean, std = standardiser_stats(x)  # (1, T, D) each
    a, b = (((c - mean) / std).double().transpose(0, 1) for c in (x, x_test))  # (T, N | M, D)
    kernel = lambda u, v: torch.exp(-torch.cdist(u, v) ** 2 / (scale * x.shape[-1]))
    # (K + ridge N I) alpha = Y, one N-square system per time; predictions k(test, train) alpha.
    gram = kernel(a, a) + ridge * len(y) * torch.eye(len(y), dtype=a.dtype)  # (T, N, N)
    alpha = torch.linalg.solve(gram, F.one_hot(y, num_classes).double().expand(len(a), -1, -1))
    return ((kernel(b, a) @ alpha).argmax(-1) == y_test).float().mean(1)  # (T,)

def split_train_val(n, val_fraction=0.1, seed=0):
    """A fixed random split of range(n) into train and validation indices (paper: 45k / 5k)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]

def grid_sampler(grid_times, k_min=4, k_max=16):
    """For the grid-free probe: draws a random sorted subset of k columns of a fine grid (k uniform
    in [k_min, k_max]) per batch. grid_times (M,) -> fn(generator) -> (cols (k,), times (k,))."""
    def draw(gen):
        k = int(torch.randint(k_min, k_max + 1, (1,), generator=gen))
        cols = torch.randperm(len(grid_times), generator=gen)[:k].sort().values  # (k,)
        return cols, grid_times[cols]
    return draw

def probe_protocol(kind, codes_train, y_train, codes_test, y_test, num_classes, lrs, epochs, seeds,
                   batch_size=256, val_fraction=0.1, split_seed=0, continuous=None, width=256,
                   dropout=0.25, progress=None):
    """The paper's protocol (section 3.1) for one probe kind and label, a plain loop: a validation
    split of the training codes (N, T, D), standardisation on the rest, train_probe for every seed x
    learning rate; per seed and readout the lr of best validation accuracy (first on ties) and its
    test accuracy. Seed s gives every lr the same initial weights (inside fork_rng). continuous,
    for the grid-free probe: dict(fine_times (M,), eval_cols (T,)): training codes on the fine grid
    (sub-grids drawn), validation on its columns eval_cols, test codes on fine_times[eval_cols],
    statistics pooled over t. progress(done, total) after each probe.
    Returns dict(test_mean, test_std, val_mean (R,), tests, lrs (S, R), correct (S, N_test, R): the
    test examples each seed's chosen probe gets right, attention (T,) or None: the mean over seeds
    of attention_seeds (S, T), each seed's chosen probe's, standardiser (mean, std), chosen_probes:
    per seed the chosen lr's best probe (of readout 0))."""
    tr_idx, va_idx = split_train_val(len(codes_train), val_fraction, split_seed)
    mean, std = standardiser_stats(codes_train[tr_idx], per_time=continuous is None)
    x_tr, x_va, x_te = [(x - mean) / std for x in (codes_train[tr_idx], codes_train[va_idx],
                                                   codes_test)]
    times_fn = eval_times = None
    if continuous is not None:
        cols, fine = continuous["eval_cols"], continuous["fine_times"]
        x_va, times_fn, eval_times = x_va[:, cols], grid_sampler(fine), fine[cols]
    (_, T, D), device = x_te.shape, x_te.device
    results = []
    for s in seeds:
        for lr in lrs:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(s)  # the initial weights and the dropout masks
                probe = build_probe(kind, T, D, num_classes, width, dropout).to(device)
                res = train_probe(probe, (x_tr, y_train[tr_idx]), (x_va, y_train[va_idx]),
                                  (x_te, y_test), lr, epochs, batch_size, s,
                                  clip=None if kind in ("mlp", "concat", "mean") else 1.0,
                                  train_times_fn=times_fn, eval_times=eval_times)
            probe.load_state_dict(res.pop("state"))  # the best epoch's weights: the chosen probe
            results.append(dict(res, probe=probe))
            if progress is not None:
                progress(len(results), len(seeds) * len(lrs))
    grid = lambda key: torch.stack([r[key] for r in results]).reshape(len(seeds), len(lrs), -1)
    val, test = grid("val"), grid("test")  # (S, L, R)
    pick = val.argmax(1)  # (S, R): the first best lr per seed and readout
    tests = test.gather(1, pick[:, None])[:, 0]  # (S, R)
    correct = torch.stack([r["correct"] for r in results])  # (S * L, N_test, R)
    correct = correct.reshape(len(seeds), len(lrs), *correct.shape[1:])  # (S, L, N_test, R)
    correct = correct.gather(1, pick[:, None, None].expand(-1, 1, len(x_te), -1))[:, 0]
    out = dict(test_mean=tests.mean(0), test_std=tests.std(0, unbiased=False), tests=tests,
               correct=correct,  # (S, N_test, R), the chosen lr's per seed and readout
               val_mean=val.gather(1, pick[:, None])[:, 0].mean(0), standardiser=(mean, std),
               lrs=torch.tensor(lrs, device=val.device)[pick], attention=None,
               attention_seeds=None,
               chosen_probes=[results[i * len(lrs) + int(p)]["probe"]
                              for i, p in enumerate(pick[:, 0])])
    if results[0]["attention"] is not None:  # the token's attention of each seed's chosen lr
        out["attention_seeds"] = grid("attention")[torch.arange(len(seeds)), pick[:, 0]]  # (S, T)
        out["attention"] = out["attention_seeds"].mean(0)  # (T,)
    return out

# ==== MINE and NMI: how much two points of the curve share (Belghazi et al. 2018; Figure 2) =======

def statistics_network(d_in, hidden=256):
    """MINE's statistics network T(x, y) (paper section 3.2): concat(x, y) -> hidden -> hidden -> 1
    with ELU, Xavier-uniform weights and zero biases. (B, Dx + Dy) -> (B, 1)."""
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
         eval_shuffles=8, eval_rows=512, progress=None):
    """MINE estimate of I(X; Y) in nats from paired rows x (N, Dx), y (N, Dy) (section 3.2): the
    Donsker-Varadhan bound E_joint[T] - log E_marginal[e^T], maximised over the statistics network
    T; marginal samples pair x_i with a random y_j. The gradient's denominator is a moving average
    of E[e^T] (Belghazi et al.; DETACHED, unlike the published code). Trained on 1 - holdout of the
    rows; the estimate is the bound on the held-out rows, averaged over eval_shuffles (the published
    code reads it off training batches, which overfits upward). `seed` fixes split, batches and
    initial weights (inside fork_rng). Many pairs: x (..., N, Dx), y (..., N, Dy) with broadcastable
    leading dims give estimates (...), each pair trained as alone with the same seed, its weights
    stacked: one batched matmul per layer. progress(step, steps) at every tenth of the steps.
    >>> x = torch.randn(8000, 1); y = 0.9 * x + math.sqrt(1 - 0.81) * torch.randn(8000, 1)
    >>> mine(x, y)  # true value -0.5 * log(1 - 0.81) = 0.830 nats  # doctest: +SKIP"""
    if x.dim() < 2 or y.dim() < 2 or x.shape[-2] != y.shape[-2]:
        raise ValueError(f"mine needs x (..., N, Dx) and y (..., N, Dy) with the same number of "
                         f"rows N, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[-2] < 10 or batch_size < 1 or steps < 1 or not 0 < holdout < 1:
        raise ValueError(f"mine needs at least 10 rows (got {x.shape[-2]}; a part is held out "
                         f"to estimate on), batch_size >= 1 (got {batch_size}), steps >= 1 (got "
                         f"{steps}) and 0 < holdout < 1 (got {holdout})")
    if not (x.isfinite().all() and y.isfinite().all()):
        raise ValueError("mine needs finite x and y: the estimate of rows with NaN or inf is NaN")
    lead = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    P, N, device = math.prod(lead), x.shape[-2], x.device
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(N, generator=gen).to(device)  # (N,)
    n_hold = max(2, int(N * holdout))
    hold, train = perm[:n_hold], perm[n_hold:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = statistics_network(x.shape[-1] + y.shape[-1], hidden).to(device)
    # Every pair its own copy of the initial weights, stacked: weights (P, in, out), biases
    # (P, 1, out); a layer of all pairs is then one batched matmul.
    layers = [(layer.weight.detach().T.expand(P, -1, -1).clone().requires_grad_(),
               layer.bias.detach().expand(P, 1, -1).clone().requires_grad_()) for layer in net[::2]]

    def statistic(a, b):  # T on rows a of x paired with rows b of y, for every pair: (P, len(a))
        xs, ys = x[..., a, :].expand(*lead, -1, -1), y[..., b, :].expand(*lead, -1, -1)
        h = torch.cat([xs, ys], -1).reshape(P, len(a), -1)  # (P, b, Dx + Dy)
        for i, (weight, bias) in enumerate(layers):  # statistics_network's layers, ELU between
            h = torch.baddbmm(bias, h, weight)
            h = F.elu(h) if i < len(layers) - 1 else h
        return h[..., 0]

    opt = torch.optim.Adam([p for layer in layers for p in layer], lr=lr)
    log_ma = None  # log of the moving average of E_marginal[e^T], per pair (P,)
    for step in range(steps):
        # rows of joint samples, and independent rows for the marginal ones: (b,) each
        rows, other = train[torch.randint(len(train), (2, batch_size), generator=gen).to(device)]
        out = statistic(torch.cat([rows, rows]), torch.cat([rows, other]))  # (P, 2b)
        joint, marginal = out[:, :batch_size], out[:, batch_size:]  # (P, b) each
        lme = log_mean_exp(marginal, 1)  # (P,) log E_marginal[e^T] on this batch
        log_ma = lme.detach() if log_ma is None else torch.logaddexp(
            log_ma + math.log(1 - ma_rate), lme.detach() + math.log(ma_rate))
        # Bias-corrected surrogate: its gradient is grad E_joint[T] - grad E_marginal[e^T] / ma.
        # Summed over pairs: each pair's weights get the gradient of its own term only.
        loss = -(joint.mean(1) - torch.exp(lme - log_ma)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None and ((step + 1) % max(1, steps // 10) == 0 or step + 1 == steps):
            progress(step + 1, steps)
    with torch.no_grad():  # T on held-out rows of x paired with rows b of y, in chunks: (P, n_hold)
        held = lambda b: torch.cat([statistic(hold[i:i + eval_rows], b[i:i + eval_rows])
                                    for i in range(0, n_hold, eval_rows)], 1)
        joint, estimates = held(hold).mean(1), []  # (P,): E_joint[T], the same for every shuffle
        for _ in range(eval_shuffles):
            shuffled = hold[torch.randperm(n_hold, generator=gen).to(device)]  # (n_hold,)
            estimates.append(joint - log_mean_exp(held(shuffled), 1))  # (P,)
    return torch.stack(estimates).mean(0).reshape(lead)  # (...)

def gaussian_mi(rho, d):
    """True I(X; Y) in nats for d dimensions each with correlation rho: -(d/2) log(1 - rho^2)."""
    return -0.5 * d * math.log(1.0 - rho ** 2)

def nmi_matrix(codes, seeds=(0,), progress=None, **mine_kwargs):
    """NMI(i, j) = I(i; j) / sqrt(I(i; i) I(j; j)) between every two points of the curve (Figure
    2), MINE's I(X; X) standing in for H(X) as in the published code: a HEURISTIC (both are infinite
    for continuous codes; the diagonal is about 1 by construction, values compare only at a fixed
    budget). One `mine` call per seed on all T x T pairs; where I(i; i) < 1e-3 nats, row and column
    i are NaN. progress(done, total) counts the steps of all seeds.
    codes (N, T, D) -> (NMI (S, T, T), MI (S, T, T))."""
    if codes.dim() != 3 or codes.shape[1] < 2:
        raise ValueError(f"nmi_matrix needs codes (N, T, D) with T >= 2, got {tuple(codes.shape)}")
    points = codes.transpose(0, 1)  # (T, N, D)
    def tick(i):  # seed i's steps continue the count of the seeds before it
        if progress is not None:
            return lambda step, steps: progress(i * steps + step, len(seeds) * steps)
    mi = torch.stack([mine(points[:, None], points[None], seed=s, progress=tick(i), **mine_kwargs)
                      for i, s in enumerate(seeds)])  # (S, T, T): pairs (i, j)
    diag = mi.diagonal(dim1=1, dim2=2)  # (S, T): I(i; i), the entropy stand-in
    diag = torch.where(diag > 1e-3, diag, torch.nan)  # a non-positive "entropy": NMI undefined
    return mi / torch.sqrt(diag[:, :, None] * diag[:, None, :]), mi

def gaussian_mi_matrix(codes, ridge=1e-6):
    """A dependence measure that needs no training, beside MINE: between every two points i != j
    of the curve, the MI of a Gaussian with the codes' covariance, 1/2 (log det S_ii + log det S_jj
    - log det S_(ij)) = -1/2 sum_k log(1 - rho_k^2) over the canonical correlations rho_k, in nats.
    Exact for jointly Gaussian codes; for others, the linear part of their dependence. Invariant to
    any invertible linear map at each t; infinite on the diagonal. Codes are standardised per
    (t, d), with `ridge` on the diagonal of S. codes (N, T, D) -> (T, T)."""
    mean, std = standardiser_stats(codes.double())
    x = ((codes.double() - mean) / std).flatten(1)  # (N, T*D)
    N, T, D = codes.shape
    cov = (x.T @ x / (N - 1) + ridge * torch.eye(T * D, dtype=x.dtype)).reshape(T, D, T, D)
    block = lambda i, j: cov[i, :, j]  # (D, D)
    logdet = lambda *ij: torch.linalg.slogdet(torch.cat([torch.cat([block(a, b) for b in ij], 1)
                                                         for a in ij]))[1]
    own = [logdet(i) for i in range(T)]
    mi = torch.full((T, T), math.inf, dtype=torch.float64)
    for i in range(T):
        for j in range(i + 1, T):
            mi[i, j] = mi[j, i] = 0.5 * (own[i] + own[j] - logdet(i, j))
    return mi

def invertible_curve(z, num_points, step, seed=0):
    """A control curve whose points all carry the same information: c_1 = z, c_(k+1) = c_k + step
    tanh(c_k W_k^T), W_k a fixed random orthogonal (D, D) (spectral norm 1: the largest movement)
    and 0 <= step < 1, so each map is a residual flow, invertible (its Jacobian's singular values
    are at least 1 - step). Every two points are invertible functions of each other: a dependence
    measure that falls with the distance between them measures its own difficulty with the map,
    not information lost. z (N, D) -> (N, T, D)."""
    if not 0 <= step < 1:
        raise ValueError(f"invertible_curve needs 0 <= step < 1 (else a map may fold), got {step}")
    gen, points = torch.Generator().manual_seed(seed), [z]
    for _ in range(num_points - 1):
        w = torch.linalg.qr(torch.randn(z.shape[1], z.shape[1], generator=gen, dtype=z.dtype))[0]
        w = w.to(z.device)  # orthogonal
        points.append(points[-1] + step * torch.tanh(points[-1] @ w.T))
    return torch.stack(points, 1)  # (N, T, D)

# ==== Curve analysis: attention densities, curve movement, the separation profile of eq. 5 ========

def attention_density(attention, times):
    """Attention weights over a grid (T,) as a density over t: weights / cell width, normalised to
    integrate to 1 (trapezoid cells), so that grids of different sizes can be drawn on one axis."""
    w = quadrature_weights(times)  # (T,)
    density = attention / w
    return density / (density * w).sum()

def curve_movement(codes):
    """The std of a code over t and over images (each averaged over the rest): a ratio near 0
    means each trajectory is nearly a single point. codes (N, T, D) -> (along, across)."""
    return codes.std(1).mean().item(), codes.std(0).mean().item()

def separation_profile(codes, labels, max_pairs=2000, seed=0):
    """Where along the curve classes separate (the distances of eq. 5, whose inequality holds for
    any curve): mean ||E(x, t) - E(x', t)|| at every t over random pairs of DIFFERENT and of the
    SAME class. codes (N, T, D), labels (N,) -> dict(between, within, ratio = between / within (T,),
    argsup_hist (T,): where each between-class pair is farthest apart)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randint(len(codes), (2, max_pairs * 4), generator=gen)
    a, b = a[a != b], b[a != b]
    same = labels[a] == labels[b]
    out = {}
    for name, mask in (("between", ~same), ("within", same)):
        dist = (codes[a[mask][:max_pairs]] - codes[b[mask][:max_pairs]]).norm(dim=-1)  # (pairs, T)
        out[name] = dist.mean(0)  # (T,)
        if name == "between":
            hist = torch.bincount(dist.argmax(1), minlength=codes.shape[1])
            out["argsup_hist"] = hist.float() / len(dist)
    out["ratio"] = out["between"] / out["within"].clamp_min(1e-12)  # (T,)
    return out

# ==== Claims over encoders: paired tests across training seeds and across test images =============

# Student's t, one-sided 95% quantile, at 1-10 degrees of freedom
T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812)

def paired_t(d):
    """The one-sided paired t-test over encoders of differences d (n,): (t, the 95% critical value
    of Student's t at n - 1 degrees of freedom; df 10's beyond 11). One encoder proves nothing
    (critical inf); equal differences have no spread (t huge, or 0 if they are all 0)."""
    n = len(d)
    if n < 2:
        return 0.0, math.inf
    t = d.mean() / (d.std() / math.sqrt(n))  # sample std (ddof = 1); 0 / 0 = nan -> 0
    return torch.nan_to_num(t, nan=0.0).item(), T95[min(n - 1, len(T95)) - 1]

def paired_bootstrap(diffs, shared=False, resamples=2000, seed=0):
    """diffs, per encoder the per-image differences d (N_e,) of two probes' seed-averaged
    correctness. Returns D, the mean over encoders of their mean d, and the 2.5 and 97.5
    percentiles of D over resamples of each encoder's test images; shared: the encoders were
    scored on the same images, in the same order, and one resample of them serves all."""
    gen = torch.Generator().manual_seed(seed)
    diffs = [torch.stack(diffs).mean(0)] if shared else diffs  # (N,): the mean over encoders
    boot = torch.stack([d[torch.randint(len(d), (resamples, len(d)), generator=gen)].mean(1)
                        for d in diffs]).mean(0)  # (resamples,)
    interval = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=boot.dtype))
    return torch.stack([d.mean() for d in diffs]).mean().item(), interval.tolist()

# ==== Data: embedded `shapes`, CIFAR-10/100, Mini-ImageNet, any class-per-folder image tree =======
# Images are scaled to [-1, 1] (ToTensor, then 2x - 1), not by per-channel mean/std as the published
# code: one transform serves every dataset. sigma_max = 50 stays sensible: two 32x32x3 images in
# [-1, 1] are at most 2 * sqrt(3072) = 111 apart (train.py prints the measured largest distance).

SHAPE_NAMES = ("square", "circle", "triangle", "diamond", "cross")
COLOURS = np.array([[230, 25, 25], [25, 200, 25], [30, 60, 230], [240, 220, 20], [20, 210, 220],
                    [220, 30, 220], [245, 245, 245], [10, 10, 10], [245, 130, 20]], dtype=np.uint8)
TEXTURE_NAMES = ("solid", "h-stripes", "v-stripes", "checker")  # the fine-scale attribute
SHAPES_ATTRIBUTES = ("shape", "fg_colour", "bg_colour", "location", "texture")
SHAPES_CLASSES = (len(SHAPE_NAMES), len(COLOURS), len(COLOURS), 16, len(TEXTURE_NAMES))

# Each shape as a mask on offsets dx, dy (H, W) from its centre, for a radius of r pixels.
SHAPE_MASKS = (lambda dx, dy, r: (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r),  # square
               lambda dx, dy, r: dx ** 2 + dy ** 2 <= r ** 2,  # circle
               # triangle, apex up: the half-width grows linearly from the apex to the base
               lambda dx, dy, r: (dy >= -r) & (dy <= 0.7 * r) & (np.abs(dx) <= (dy + r) * 0.6),
               lambda dx, dy, r: np.abs(dx) + np.abs(dy) <= r,  # diamond
               lambda dx, dy, r: (np.minimum(np.abs(dx), np.abs(dy)) <= 0.3 * r)  # cross
               & (np.maximum(np.abs(dx), np.abs(dy)) <= r))

def make_shapes(n, image_size=32, seed=0, object_scale=1.5, texture=True, texture_mix=0.5):
    """The embedded synthetic dataset: n RGB images of one object with five attributes: shape (5),
    foreground colour (9), background colour (9, never the foreground), location (16 cells of a 4x4
    grid, no object clipped) and texture (4: solid or a 2-pixel pattern in a second shade, the
    colour moved a fraction texture_mix of the way to grey: 0.5, a contrast of about 0.4 in [-1, 1];
    1, about 0.8), the finest spatial scale, to test where fine detail lives on the curve. Radius
    and centre jitter inside the cell. Deterministic per seed; texture is drawn last, so the first
    four labels equal those of texture=False (labels (n, 4)). object_scale multiplies the 4-5.5 px
    radius (1.5: the object is about 11% of the pixels; beyond, neighbouring cells overlap the
    jitter).
    Returns images (n, H, W, 3) uint8 and labels (n, 5) int64 in SHAPES_ATTRIBUTES order."""
    rng = np.random.default_rng(seed)
    s = image_size / 32.0  # all geometry is laid out for 32 px and scaled
    shape = rng.integers(0, 5, n)
    fg = rng.integers(0, 9, n)
    bg = (fg + rng.integers(1, 9, n)) % 9  # never equal to fg
    loc = rng.integers(0, 16, n)
    radius = s * object_scale * rng.uniform(4.0, 5.5, n)
    margin = 5.5 * object_scale + 1.5  # largest radius + jitter (<= 1 px) + half a pixel
    spacing = (32.0 - 2 * margin) / 3  # 4 cells per axis: 6 px at scale 1
    jitter = rng.uniform(-1, 1, (n, 2)) * min(1.0, spacing / 6)  # +-1 px, less if cells are close
    centres = s * (margin + spacing * np.stack([loc % 4, loc // 4], 1) + jitter)  # (n, 2) x, y
    pattern = rng.integers(0, len(TEXTURE_NAMES), n) if texture else np.zeros(n, dtype=np.int64)
    shade = np.floor(COLOURS * (1 - texture_mix) + 128 * texture_mix).astype(np.uint8)  # (9, 3)
    yi, xi = np.mgrid[0:image_size, 0:image_size]  # integer pixel coordinates (H, W)
    # The pixels of each texture's second shade: none (solid), every other row, every other
    # column, a checkerboard. Period 2 px, the finest pattern an image holds, erased first by the
    # noise (its contrast, about 0.4 in [-1, 1] at texture_mix 0.5, is drowned once sigma passes it:
    # t ~ 0.4).
    textures = np.stack([xi < 0, yi % 2 == 1, xi % 2 == 1, (xi + yi) % 2 == 1])  # (4, H, W)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    for i in range(n):  # the object's mask on offsets from its centre, at pixel centres (H, W)
        mask = SHAPE_MASKS[shape[i]](xi + 0.5 - centres[i, 0], yi + 0.5 - centres[i, 1], radius[i])
        images[i] = np.where(mask[:, :, None], COLOURS[fg[i]], COLOURS[bg[i]])
        images[i][mask & textures[pattern[i]]] = shade[fg[i]]  # object pixels of the second shade
    labels = [shape, fg, bg, loc] + ([pattern] if texture else [])
    return images, np.stack(labels, 1).astype(np.int64)

class LabelledImages(torch.utils.data.Dataset):
    """Images held in memory, uint8 (N, H, W, C), with A named integer attributes each (labels
    (N, A)); `classes` names the first attribute's classes, where it has names (image folders).
    Items: (x (C, H, W) in [-1, 1], labels (A,))."""

    def __init__(self, images, labels, attributes, num_classes, classes=None):
        self.images, self.labels, self.classes = images, labels, classes
        self.attributes, self.num_classes = tuple(attributes), tuple(num_classes)

    def __len__(self):
        return len(self.labels)

    def subset(self, n, seed=0):
        """A seeded subset of n examples stratified by the first attribute (never "the first n":
        an image folder is sorted by class)."""
        idx = stratified_indices(self.labels[:, 0], n, seed).numpy()  # (n,), an array even for 1
        return LabelledImages(self.images[idx], self.labels[idx], self.attributes, self.num_classes,
                              self.classes)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, idx):
        """Items idx as a list of (x, labels): the DataLoader's batched fetch."""
        x, y = self.tensors(idx)
        return list(zip(x, y))

    def tensors(self, idx=slice(None)):
        """Images idx (all by default) as (N, C, H, W) floats in [-1, 1], and labels (N, A)."""
        x = torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x, torch.from_numpy(self.labels[idx])

def stratified_indices(labels, n, seed=0):
    """n indices into labels (N,) without replacement, each class keeping its share (largest
    remainders; at least one each when n >= classes), in a seeded order. (N,) -> (n,) int64."""
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
                 object_scale=1.5, texture=True, classes=None, texture_mix=0.5):
    """A LabelledImages of `name` in {shapes, cifar10, cifar100, miniimagenet, folder}. shapes:
    generated (default 10000 train / 2000 test, another seed per split); elsewhere num_examples
    keeps a stratified subset. cifar10 / cifar100: torchvision, downloaded into data_root if
    absent. miniimagenet / folder: data_root/{train,test}/<class>/<image>, the classes those of
    train/ (or `classes`, a run's saved list; see folder_images). Images are decoded into memory
    (uint8, resized to image_size) here: a broken file stops with its name."""
    if num_examples is not None and num_examples <= 0:
        raise ValueError(f"num_examples must be positive, got {num_examples}")
    if name == "shapes":
        n = num_examples or (10000 if split == "train" else 2000)
        images, labels = make_shapes(n, image_size, seed * 1000 + (0 if split == "train" else 1),
                                     object_scale, texture, texture_mix)
        a = labels.shape[1]  # 4 without texture
        return LabelledImages(images, labels, SHAPES_ATTRIBUTES[:a], SHAPES_CLASSES[:a])
    import torchvision  # here, not at import and not for shapes: only the other datasets need it
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
                            f"in {data_root} or give another data root") from None
        images, labels, classes = base.data, np.asarray(base.targets), base.classes  # uint8 arrays
    elif name in ("miniimagenet", "folder"):
        images, classes = folder_images(data_root, split, classes)  # [(path, class)], names
        labels = np.asarray([c for _, c in images])
    else:
        raise ValueError(f"unknown dataset {name!r}; choose shapes, cifar10, cifar100, "
                         "miniimagenet or folder")
    idx = (stratified_indices(labels, num_examples, seed).numpy() if num_examples
           and num_examples < len(labels) else np.arange(len(labels)))
    if name.startswith("cifar") and image_size == 32:  # in memory already, at its size
        images = images[idx]
    else:  # decoded here (a broken file stops now), resized (short side) and centre-cropped
        import PIL.Image
        import torchvision.transforms as T
        resize = T.Compose([T.Resize(image_size), T.CenterCrop(image_size)])

        def decode(item):  # a CIFAR image array (in memory: nothing to fail), or (path, class)
            if name.startswith("cifar"):
                return np.asarray(resize(PIL.Image.fromarray(item)))
            try:
                return np.asarray(resize(open_rgb(item[0])))
            except Exception as e:
                raise UserError(f"{item[0]} is not a readable image ({type(e).__name__}); delete "
                                "or replace it and run again") from None
        images = np.stack([decode(images[i]) for i in idx])  # (n, H, W, 3) uint8
    return LabelledImages(images, labels[idx, None].astype(np.int64), ("class",), (len(classes),),
                          tuple(classes))

IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

def folder_images(data_root, split, classes=None):
    """The (path, class index) of every image in data_root/split/<class>/ (any depth; hidden files
    and folders skipped), and the class names: those of data_root/train, or `classes`, for every
    split alike, so that an index means one class everywhere. A class folder that is not among them
    is a UserError naming it; a class without images in `split` is named in a printed note."""
    def visible(folder):  # sorted names, hidden ones left out
        return sorted(name for name in os.listdir(folder) if not name.startswith("."))
    folder, train = os.path.join(data_root, split), os.path.join(data_root, "train")
    for f in dict.fromkeys((train, folder)):
        if not os.path.isdir(f):
            raise UserError(f"no folder {f}: put the images in {data_root}/{{train,test}}/<class>/"
                            "<image> (one sub-folder per class) or give another data root")
    classes = list(classes or [c for c in visible(train) if os.path.isdir(os.path.join(train, c))])
    found = [c for c in visible(folder) if os.path.isdir(os.path.join(folder, c))]
    if set(found) - set(classes):
        raise UserError(f"{folder} has class folders that the run's classes (those of {train}) "
                        f"lack: {', '.join(sorted(set(found) - set(classes)))}; their images "
                        "would be scored as other classes: remove them or add them to train/")
    samples = []
    for i, c in enumerate(classes):
        for root, dirs, files in os.walk(os.path.join(folder, c), followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            samples += [(os.path.join(root, f), i) for f in sorted(files)
                        if not f.startswith(".") and f.lower().endswith(IMAGE_FILES)]
    if not samples:
        raise UserError(f"{folder} holds no images in class sub-folders; put them in "
                        f"{folder}/<class>/<image>")
    present = {j for _, j in samples}  # once: a set per class would cost classes x images
    if missing := [c for i, c in enumerate(classes) if i not in present]:
        print(f"note: {folder} holds no images of class(es) {', '.join(missing)}")
    return samples, classes

def open_rgb(path):
    """An image file as 8-bit RGB. PIL's convert('RGB') clips 16- and 32-bit grey images at 255
    (mostly white); they are scaled by the largest value their type holds (65535; 'F': 1)."""
    from PIL import Image
    with Image.open(path) as img:
        if img.mode.startswith("I;16") or img.mode in ("I", "F"):
            a = np.asarray(img, dtype=np.float64)
            wide = img.mode.startswith("I;16") or a.max() > 255
            top = 1.0 if img.mode == "F" else 65535.0 if wide else 255.0
            img = Image.fromarray(np.clip(np.round(a * 255.0 / top), 0, 255).astype(np.uint8))
        return img.convert("RGB")

def dataset_key(dataset):
    """A short hash of the pixels and labels a LabelledImages holds, saved in the checkpoint: a
    resumed run checks that it is given the images it was trained on."""
    h = hashlib.sha1(np.ascontiguousarray(dataset.labels).tobytes())
    h.update(np.ascontiguousarray(dataset.images).tobytes())
    return h.hexdigest()[:12]

def int_list(value):
    """'16,32,64' or [16, 32, 64] -> (16, 32, 64): a config's list of ints (argparse type too)."""
    return tuple(int(v) for v in (value.split(",") if isinstance(value, str) else value)
                 if str(v).strip())

def model_kwargs(config, in_channels=3):
    """The DRLModel arguments of a training config (saved in the checkpoint)."""
    same = ("image_size", "code_dim", "enc_blocks", "nf", "num_res_blocks", "dropout", "lambda_z",
            "sigma_min", "sigma_max", "enc_head", "precond", "weighting", "sigma_data")
    return dict({k: config[k] for k in same}, in_channels=in_channels,
                probabilistic=config["encoder"] == "vdrl", ch_mult=int_list(config["ch_mult"]),
                enc_widths=int_list(config["enc_widths"]),
                attn_resolutions=int_list(config["attn_res"]))

def run_datasets(config, data_root=None, max_train=0, max_test=0, seed=0, splits=("train", "test"),
                 check=True):
    """{split: LabelledImages} of a run's config, each cut to a stratified subset of max_*
    examples (0: all); data_root overrides the run's. check: the training split must be the images
    the run was trained on (config's data_key, where it has one), wherever they now lie."""
    limits = dict(train=(config["num_train"], max_train), test=(None, max_test))
    out = {}
    for name in splits:
        out[name] = load_dataset(config["dataset"], name, data_root or config["data_root"],
                                 config["image_size"], limits[name][0], config["seed"],
                                 config.get("object_scale", 1.0), config.get("texture", False),
                                 config.get("classes"), config.get("texture_mix", 0.5))
        if check and name == "train" and config.get("data_key") not in (None,
                                                                          dataset_key(out[name])):
            raise UserError(f"the images in {data_root or config['data_root']} are not those the "
                            "run was trained on; give --data-root the folder of the run's images")
        if limits[name][1] and limits[name][1] < len(out[name]):
            out[name] = out[name].subset(limits[name][1], seed)
    return out

# ==== Caches: the codes of a split, keyed by its images and by the encoder's weights ==============

def tensors_key(*tensors):
    """A short hash of the CONTENT of tensors: a cache of one set of images is never read for
    another of the same size."""
    h = hashlib.sha1()
    for x in tensors:  # its dtype, shape and bytes (a dense copy viewed as uint8: any dtype)
        h.update(str((x.dtype, tuple(x.shape))).encode())
        dense = torch.empty(x.numel(), dtype=x.dtype).copy_(x.detach().cpu().reshape(-1))
        h.update(dense.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]

def checksum(obj):
    """A hash of every tensor in nested dicts and lists (a state dict, a checkpoint), with where
    each lies. Saved with a checkpoint, it notices bytes changed on disk that still load."""
    def walk(o, at):  # (path, tensor) pairs in a fixed order
        if torch.is_tensor(o):
            yield at, o
        items = (sorted(o.items(), key=lambda kv: str(kv[0])) if isinstance(o, dict)  # by key,
                 else enumerate(o) if isinstance(o, (list, tuple)) else ())  # never by value
        for k, v in items:
            yield from walk(v, f"{at}/{k}")
    found = list(walk(obj, ""))
    return tensors_key(torch.tensor(bytearray("|".join(p for p, _ in found).encode())),
                       *(t for _, t in found))

def cached_trajectories(run_dir, encoder, dataset, split, times, tag, batch_size=256, log=print):
    """extract_trajectories of a whole split, cached in run_dir/cache under the split, a hash of
    its images and labels, a hash of the encoder's WEIGHTS, `tag` (e.g. 'step1500', for the reader)
    and the grid; both hashes are checked inside the file too. A grid inside a cached finer one is
    sliced from it; a file that is not a cache of this split and encoder is ignored with a line.
    Returns dict(codes (N, T, D), labels (N, A), times (T,))."""
    images, labels = dataset.tensors()  # (N, C, H, W), (N, A)
    folder = os.path.join(run_dir, "cache")
    data_key, enc_key = tensors_key(images, labels), checksum(encoder.state_dict())
    prefix, suffix = f"traj-{split}-{data_key}-{tag}-{enc_key}-", ".pt"
    times = torch.as_tensor(times, dtype=torch.float32)
    path = os.path.join(folder, prefix + tensors_key(times.double().round(decimals=6)) + suffix)
    cached = [f for f in (os.listdir(folder) if os.path.isdir(folder) else [])
              if f.startswith(prefix) and f.endswith(suffix)]
    for name in sorted(cached, key=lambda f: (os.path.join(folder, f) != path, f)):  # exact first
        try:
            c = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)
            ok = (isinstance(c, dict) and c.get("data_key") == data_key
                  and c.get("weights_key") == enc_key and c["times"].dim() == 1
                  and c["codes"].shape == (len(images), len(c["times"]), encoder.code_dim)
                  and torch.equal(c["labels"], labels))
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
    # A run folder holds one step's weights: the codes of earlier steps are never read again.
    for name in os.listdir(folder) if tag.startswith("step") else ():
        if name.startswith("traj-") and "-step" in name and f"-{enc_key}-" not in name:
            os.remove(os.path.join(folder, name))
    return out

def cached_result(run_dir, name, inputs, settings, compute, log=print):
    """compute()'s JSON-able result, kept in run_dir/cache under a hash of all it depends on: the
    tensors `inputs` (their values) and `settings` (JSON-able): a later call with the same inputs
    and settings, on another checkpoint of the run too, reads it instead of computing it again."""
    key = tensors_key(*inputs, torch.tensor(bytearray(json.dumps(settings).encode())))
    path = os.path.join(run_dir, "cache", f"{name}-{key}.json")
    try:
        with open(path) as f:
            result = json.load(f)
        log(f"{name}: read from {path}")
    except (OSError, ValueError):  # none yet, or damaged: computed again
        result = compute()
        atomic_save(result, path)
    return result

# ==== Checkpoints and run folders: atomic save, safe load, exported weights =======================

CHECKPOINT_KIND = "trajrep-drl-checkpoint"
WEIGHTS_KIND = "trajrep-drl-weights"  # EMA weights alone, for reading a run: see export_weights

def atomic_save(obj, path):
    """torch.save (json.dump for .json) to a temporary file beside `path`, then rename: a crash
    mid-write never leaves a truncated file where a good one was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1] or ".pt"  # torch.save refuses a dot-name without one
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    umask = os.umask(0o22)  # mkstemp makes the file private (0600); give it the usual mode
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        if path.endswith(".json"):
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=1)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def check_writable(*folders, files=()):
    """Creates each folder and writes a temporary file there, and checks that no folder stands
    where one of `files` will be written: a script stops before its work, not after it, when its
    results could not be written."""
    if folder_files := [f for f in files if os.path.isdir(f)]:
        raise UserError(f"{folder_files[0]} is a folder where a result file will be written; move "
                        "or remove it")
    for folder in folders:
        if os.path.islink(folder) and not os.path.exists(folder):
            raise UserError(f"{folder} is a link to {os.readlink(folder)}, which does not exist; "
                            "create that folder or remove the link")
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise UserError(f"cannot write to {folder} ({type(e).__name__}); make it writable, or "
                            f"copy the run folder somewhere writable and give that copy") from None

def load_checkpoint(path, map_location="cpu", resumable=False):
    """A training checkpoint or exported weights file, loaded as DATA (weights_only=True) and
    checked; resumable=True accepts only a training checkpoint. A missing, corrupted or foreign
    file is a UserError."""
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
    kind = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if kind == WEIGHTS_KIND and resumable:
        raise UserError(f"{path} holds exported weights only (for probe.py and analyze.py), not a "
                        "training state; it cannot be resumed: start a new run")
    if kind not in (CHECKPOINT_KIND, WEIGHTS_KIND):
        raise UserError(f"{path} is not a trajrep training checkpoint; give a ckpt.pt written by "
                        "train.py")
    expected = dict(config=dict, model_kwargs=dict, step=int, ema=dict)
    if kind == CHECKPOINT_KIND:  # the training state besides the weights
        expected.update(model=dict, optimizer=dict, rng=dict)
    broken = [k for k, want in expected.items() if not isinstance(ckpt.get(k), want)]
    if kind == CHECKPOINT_KIND and not broken and not isinstance(ckpt["rng"].get("ranks"), list):
        broken = ["rng"]
    if broken:
        raise UserError(f"{path} is an incomplete trajrep checkpoint (missing or malformed: "
                        f"{', '.join(broken)}); retrain, or resume from an intact copy")
    saved = ckpt.pop("checksum", None)  # files written before checksums have none
    if saved is not None and saved != checksum(ckpt):
        raise UserError(f"{path} is damaged: its tensors do not match the checksum saved with "
                        "them; retrain, or resume from an intact copy")
    weights = {f"{part}.{k}": v for part in ("ema", "model") for k, v in ckpt.get(part, {}).items()}
    if bad := [k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all()]:
        raise UserError(f"{path} holds non-finite weights ({', '.join(bad[:3])}): it is damaged; "
                        "retrain, or resume from an intact copy")
    if ckpt["config"].get("data_key") is None:  # older files keep the images' key beside it
        ckpt["config"]["data_key"] = ckpt.pop("data_key", None)
    return ckpt

def save_checkpoint(path, **contents):
    """Writes a training checkpoint atomically; a failed write (full disk, read-only folder) is a
    UserError naming the previous checkpoint's step, which stays intact."""
    contents = dict(kind=CHECKPOINT_KIND, **contents)
    try:
        atomic_save(dict(contents, checksum=checksum(contents)), path)
    except (OSError, RuntimeError) as e:
        before = (f"the previous checkpoint (step {load_checkpoint(path)['step']}) is intact"
                  if os.path.exists(path) else "no checkpoint was written")
        raise UserError(f"could not write {path} at step {contents.get('step')} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); {before}: free "
                        "space or choose another run folder, then resume") from None

def export_weights(run, path, made_by):
    """Writes a run's EMA weights alone (with config, step and made_by, the command that
    trained it) to `path`: a quarter of a checkpoint, for reading the run, not resuming it. As
    <folder>/ckpt.pt it is a run for probe.py and analyze.py; never over the checkpoint it reads."""
    source = os.path.join(run, "ckpt.pt") if os.path.isdir(run) else run
    if os.path.exists(path) and os.path.exists(source) and os.path.samefile(path, source):
        raise UserError(f"{path} is the checkpoint the weights are read from; writing over it "
                        "would lose the run's optimiser and random state: give another path")
    ckpt = load_checkpoint(run)
    weights = dict(kind=WEIGHTS_KIND, config=ckpt["config"], model_kwargs=ckpt["model_kwargs"],
                   step=ckpt["step"], ema=ckpt["ema"], made_by=str(made_by))
    atomic_save(dict(weights, checksum=checksum(weights)), path)

def claim_run_folder(out):
    """Creates the run folder and locks it (flock on out/.lock, dropped by the kernel when the
    process ends): a second train.py into it stops. Then removes a killed write's temporary files.
    Returns (lock file, whether the folder was created here)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{out} is a file; give a folder for the run (it is created if absent)")
    import fcntl  # here, not at import: the library stays importable where fcntl does not exist
    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    lock = open(os.path.join(out, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UserError(f"another train.py is writing to {out}; wait for it to finish or choose "
                        "another run folder") from None
    for name in os.listdir(out):
        if name.startswith(".tmp-") and name.endswith(".pt"):
            os.remove(os.path.join(out, name))
    return lock, created

def cut_metrics(path, step):
    """Keeps the rows of metrics.jsonl up to `step` (a resume's; 0 for a new run): rows a killed
    run wrote after its last checkpoint are dropped."""
    def kept(line):
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):  # a row cut by a kill mid-write
            return False
    if os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if kept(line)]
        with open(path, "w") as f:
            f.writelines(keep)

def load_encoders(path, device="cpu"):
    """A run's trained encoder (EMA weights) and its control, the encoder at the initialisation
    train.py started from (a random conv net already separates colours and places), in eval mode,
    channels-last, on `device`. Returns (trained, random init, config, step)."""
    ckpt = load_checkpoint(path)
    encoders = []
    for weights in ("ema", "init"):
        try:
            with torch.random.fork_rng(devices=[]):  # leaves the caller's random state alone
                torch.manual_seed(ckpt["config"].get("seed", 0))  # as train.py, before building
                model = DRLModel(**ckpt["model_kwargs"])
            if weights == "ema":
                model.load_state_dict(ckpt["ema"])
        except (TypeError, RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"the weights in {path} do not fit its model description "
                            f"({type(e).__name__}); it was written by another version of trajrep "
                            "or damaged: retrain") from None
        encoders.append(model.encoder.to(device, memory_format=torch.channels_last).eval())
    return encoders[0], encoders[1], ckpt["config"], ckpt["step"]

def pick_device(name="auto"):
    """'auto': cuda, then mps, then cpu; else torch.device(name), which must exist here."""
    has_mps = torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    count = torch.cuda.device_count()
    if (device.type == "cuda" and (device.index or 0) >= count) or (device.type == "mps"
                                                                    and not has_mps):
        raise UserError(f"device {name!r} is not on this machine ({count} CUDA device(s), MPS "
                        f"{'available' if has_mps else 'not available'}); use cpu or auto")
    return device

def open_run(run, device="auto"):
    """A run folder opened: its encoders (load_encoders) on the device, and run/results and
    run/cache checked writable before any work.
    Returns (encoder, init encoder, train config, step, device, results folder)."""
    if os.path.isfile(run):
        raise UserError(f"{run} is a file; give the run FOLDER that holds ckpt.pt "
                        f"(e.g. {os.path.dirname(run) or '.'})")
    device = pick_device(device)
    encoder, init_encoder, config, step = load_encoders(run, device)
    out_dir = os.path.join(run, "results")
    check_writable(out_dir, os.path.join(run, "cache"))  # before the work, not after it
    return encoder, init_encoder, config, step, device, out_dir

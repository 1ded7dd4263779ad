"""Counter-based randomness keyed per chain: every draw is a pure function of its key.

Contract. Draw ``j`` (C-order index into the per-chain shape) of chain ``c`` at step ``t`` on
stream ``s`` is a pure function of (run seed, c, t, s, j) and of nothing else: not of the other
chains in the batch, their order, the block size, the actor or the device. Nothing about the RNG
needs saving (the step counter is the state). Draws are also prefix-stable: the first ``k``
elements of a shape are the same whatever the shape's total size.

Key ranges: run seed in [0, 2^63) (an int64 everywhere: configs, manifests, Parquet); chain id,
step and stream in [0, 2^32); at most 2^34 draws per (chain, step, stream).

Generator. Philox4x32-10 (Salmon, Moraes, Dror & Shaw, SC 2011; the Random123 reference, which
passes TestU01 BigCrush) with key = the run seed's two 32-bit halves and counter =
(j // 4, t, c, s). torch has no uint32/uint64 arithmetic on every device, so each 32-bit lane
lives in an int64 tensor and the 32x32 -> 64-bit products are split into 16-bit halves of the
multiplier: every intermediate is < 2^49, no int64 operation ever overflows, and the words are
exact on any device.

Normals (docs/THEORY.md section 4 uses them as the Langevin noise xi). Box-Muller on two 32-bit
words per pair, computed in float64 from correctly rounded operations only (+, -, *, / between
tensors, frexp, comparisons, casts): log, sin, cos and sqrt are evaluated here by series and
Newton's iteration rather than by the device's math library, whose results differ in the last
bits between CPU (MKL vector math, vectorized or scalar paths) and CUDA.
Each of the 4 words of one Philox call gives one uniform; words (c0, c3) and (c2, c1) make the
pairs (z_{4g}, z_{4g+1}) and (z_{4g+2}, z_{4g+3}):

    u = (w_r + 1/2) 2^-32,  theta = 2 pi (w_t + 1/2) 2^-32,  (z, z') = sqrt(-2 log u) (cos, sin) theta.

log u = e log 2 + 2 atanh((m - 1) / (m + 1)) with u = m 2^e, m in [1/sqrt 2, sqrt 2) (series to
s^21, |s| <= 0.172); theta is reduced to its quadrant exactly on the integer word, and sin / cos
of the remaining angle in (0, pi/2) use Taylor series to degree 23 / 24. The float64 result is
within a few ulp of the exact transform; float32 draws are that result rounded. Tails: |z| <=
sqrt(66 log 2) = 6.764 (the smallest u is 2^-33), i.e. N(0, 1) truncated where its two-sided tail
mass is 1.3e-11; the smallest radius is 1.5e-5. Needs float64 on the device (CPU, CUDA; not MPS).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from mmgm_ray.validators import seed as check_seed

# Streams: independent noise sources of one chain.
STREAM_INIT_X = 1        # x0 of the chains
STREAM_INIT_EPS = 2      # measurement noise of the initial y
STREAM_WALK = 3          # Langevin noise xi of each walk step
STREAM_INIT_INDEX = 4    # which data point initializes a chain (init = "data")

KEY_LIMIT = 1 << 32      # chain ids, steps, streams and counter words are uint32
_M32 = KEY_LIMIT - 1
PHILOX_M = (0xD2511F53, 0xCD9E8D57)   # Philox4x32 round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)   # Weyl key increments
PHILOX_ROUNDS = 10

_LN2 = math.log(2.0)
_SQRT_HALF = math.sqrt(0.5)
_ATANH_COEF = [1.0 / (2 * k + 1) for k in range(11)]                              # s^(2k) / (2k+1)
_SIN_COEF = [(-1) ** k / math.factorial(2 * k + 1) for k in range(12)]           # a^(2k+1) terms
_COS_COEF = [(-1) ** k / math.factorial(2 * k) for k in range(13)]               # a^(2k) terms
_QUARTER_TURN_PER_WORD = (math.pi / 2) / (1 << 30)                               # angle of one 30-bit step


class Philox4x32:
    """Philox4x32-10 under one 64-bit key on one device, vectorized over counters.

    The two multiplied lanes (c0, c2) and the two XORed lanes (c3, c1) are stacked, so a round is 12
    tensor operations whatever the batch: x * m = p 2^16 + q with p = x * (m >> 16) and
    q = x * (m & 0xFFFF), both < 2^48, gives hi = (p + (q >> 16)) >> 16 and
    lo = (((p & 0xFFFF) << 16) + q) & (2^32 - 1) with no int64 overflow. Matches the Random123
    known-answer vectors (tests/test_rng.py).
    """

    def __init__(self, key: tuple[int, int], device: torch.device | str = "cpu", rounds: int = PHILOX_ROUNDS):
        device = torch.device(device)
        k0, k1 = key
        schedule = [((k0 + r * PHILOX_W[0]) & _M32, (k1 + r * PHILOX_W[1]) & _M32) for r in range(rounds)]
        # keys are XORed into the lanes in the order (c2, c0) the round produces them
        self.round_keys = torch.tensor([[k1_r, k0_r] for k0_r, k1_r in schedule], dtype=torch.int64, device=device)
        self.m_hi = torch.tensor([m >> 16 for m in PHILOX_M], dtype=torch.int64, device=device)
        self.m_lo = torch.tensor([m & 0xFFFF for m in PHILOX_M], dtype=torch.int64, device=device)

    def lanes(self, counter: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Output words of 4 broadcastable int64 counter tensors (uint32 values) as ((c0, c2), (c3, c1)) stacks."""
        c0, c1, c2, c3 = torch.broadcast_tensors(*counter)
        lanes = (-1,) + (1,) * c0.dim()
        m_hi, m_lo = self.m_hi.view(lanes), self.m_lo.view(lanes)
        mul, xor = torch.stack((c0, c2)), torch.stack((c3, c1))
        for k in self.round_keys:
            p, q = mul * m_hi, mul * m_lo
            hi = q >> 16
            hi += p
            hi >>= 16
            p &= 0xFFFF
            p <<= 16
            p += q
            p &= _M32
            hi ^= xor                                   # (hi0 ^ c3, hi1 ^ c1) -> new (c2, c0) ^ key
            hi ^= k.view(lanes)
            mul, xor = hi.flip(0), p                    # new (c0, c2); new (c3, c1) = (lo0, lo1)
        return mul, xor

    def __call__(self, counter: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The 4 output words (c0, c1, c2, c3) of 4 broadcastable int64 counter tensors."""
        mul, xor = self.lanes(counter)
        return [mul[0], xor[1], mul[1], xor[0]]


def _horner(x: torch.Tensor, coefs: Sequence[float]) -> torch.Tensor:
    """sum_k coefs[k] x^k, one multiply and one add per coefficient (no fused kernels)."""
    acc = x * coefs[-1]
    acc += coefs[-2]
    for c in reversed(coefs[:-2]):
        acc *= x
        acc += c
    return acc


def _neg_two_log_uniform(w: torch.Tensor) -> torch.Tensor:
    """-2 log u for u = (w + 1/2) 2^-32, float64, from correctly rounded operations only."""
    u = (w.to(torch.float64) + 0.5) * 2.0 ** -32
    m, e = torch.frexp(u)                       # u = m 2^e, m in [1/2, 1)
    low = m < _SQRT_HALF
    m = torch.where(low, m * 2.0, m)            # m in [1/sqrt 2, sqrt 2): |s| <= 0.172
    e = (e - low.to(e.dtype)).to(torch.float64)
    s = (m - 1.0) / (m + 1.0)                   # m - 1 is exact here (Sterbenz)
    log_m = (s * _horner(s * s, _ATANH_COEF)) * 2.0
    return (e * _LN2 + log_m) * -2.0


def _cos_sin_turn(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of theta = 2 pi (w + 1/2) 2^-32, float64; the quadrant is taken off w exactly."""
    quadrant = w >> 30
    a = ((w & ((1 << 30) - 1)).to(torch.float64) + 0.5) * _QUARTER_TURN_PER_WORD   # in (0, pi/2)
    a2 = a * a
    c, s = _horner(a2, _COS_COEF), a * _horner(a2, _SIN_COEF)
    odd = (quadrant & 1) == 1                   # rotate (c, s) by quadrant * pi/2
    x, y = torch.where(odd, s, c), torch.where(odd, c, s)
    x = torch.where((quadrant == 1) | (quadrant == 2), -x, x)
    y = torch.where(quadrant >= 2, -y, y)
    return x, y


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt of float64 x in [2^-64, 2^60] by exact range reduction and Newton's iteration.

    torch.sqrt cannot be used: on the CPU it goes through MKL's vector math, which is not correctly
    rounded (it returns 0.4052755256937859 for sqrt(0.16424825172637453), IEEE gives ...94).
    """
    m, e = torch.frexp(x)                                   # x = m 2^e, m in [1/2, 1)
    odd = (e & 1).to(torch.bool)
    m = torch.where(odd, m * 2.0, m)                        # m in [1/2, 2), e even
    half = ((e - odd.to(e.dtype)) >> 1).to(torch.int64)     # in [-32, 30]
    scale = (torch.ones_like(half) << (half + 32)).to(torch.float64) * 2.0 ** -32   # 2^half, exact
    y = (m + 1.0) * 0.5                                     # relative error <= 6%, then 4 Newton steps
    for _ in range(4):                                      # 6e-2 -> 2e-3 -> 1e-6 -> 1e-12 -> round-off
        y = (y + m / y) * 0.5
    return y * scale


def box_muller(w_r: torch.Tensor, w_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent float64 N(0, 1) draws from two uint32 words (module docstring)."""
    r = _sqrt(_neg_two_log_uniform(w_r))
    x, y = _cos_sin_turn(w_t)
    return r * x, r * y


def _check_key(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < KEY_LIMIT:
        raise ValueError(f"{name} must be an integer in [0, 2**32), got {value!r}")
    return value


class ChainRNG:
    """Draws keyed by (run seed, chain id, step, stream, element index) for a batch of chains.

    Every method takes ``chain_ids`` (an int64 tensor of N ids in [0, 2^32), any order, repeats
    allowed) and returns N rows; row i depends only on the key of ``chain_ids[i]``. The ids' range
    is the caller's to check (here it would synchronize a GPU every step; the engine checks once).
    """

    def __init__(self, run_seed: int, device: torch.device | str = "cpu"):
        self.run_seed = check_seed("run seed", run_seed)
        self.device = torch.device(device)
        self.philox = Philox4x32((self.run_seed & _M32, self.run_seed >> 32), self.device)

    def _lanes(self, chain_ids: torch.Tensor, step: int, stream: int, groups: int,
               n_steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Philox lanes ((c0, c2), (c3, c1)) of counters (g, t, chain, stream), g < ``groups``, t in
        [step, step + n_steps): (2, N, groups), or (2, n_steps, N, groups) when ``n_steps`` > 1."""
        _check_key("step", step)
        _check_key("stream", stream)
        if not 1 <= n_steps <= KEY_LIMIT - step:
            raise ValueError(f"steps {step}..{step + n_steps - 1} must lie in [0, 2**32)")
        if not 1 <= groups <= KEY_LIMIT:
            raise ValueError(f"at most 2**34 draws per (chain, step, stream), asked for {4 * groups} or more")
        g = torch.arange(groups, dtype=torch.int64, device=self.device).unsqueeze(0)
        c = chain_ids.to(self.device, torch.int64).reshape(-1, 1)
        s = torch.full((), stream, dtype=torch.int64, device=self.device)
        if n_steps == 1:
            t = torch.full((), step, dtype=torch.int64, device=self.device)
        else:
            t = torch.arange(step, step + n_steps, dtype=torch.int64, device=self.device).reshape(-1, 1, 1)
        return self.philox.lanes((g, t, c, s))

    def normal(self, chain_ids: torch.Tensor, step: int, stream: int, shape: Sequence[int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normals of shape (N, *shape); float32 is the float64 draw rounded.

        Draw 4g + 2p + k is the cos (k = 0) or sin (k = 1) of pair p of Philox call g; pair 0 is made
        of words (c0, c3), pair 1 of (c2, c1).
        """
        return self.normal_steps(chain_ids, step, 1, stream, shape, dtype)[0]

    def normal_steps(self, chain_ids: torch.Tensor, first_step: int, n_steps: int, stream: int,
                     shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The draws of ``normal`` at steps first_step, ..., first_step + n_steps - 1 in one call,
        stacked: (n_steps, N, *shape). Row t is bitwise ``normal(chain_ids, first_step + t, ...)``
        (the same elementwise operations on the same words); one call amortizes the fixed cost of
        the ~250 small tensor operations a draw takes.
        """
        n = math.prod(shape)
        radius, angle = self._lanes(chain_ids, first_step, stream, max(1, -(-n // 4)), n_steps)
        if n_steps == 1:
            radius, angle = radius.unsqueeze(1), angle.unsqueeze(1)
        z_cos, z_sin = box_muller(radius, angle)                    # (pair, steps, N, g) each
        out = torch.empty(*radius.shape[1:], 2, 2, dtype=dtype, device=self.device)
        out[..., 0].copy_(z_cos.permute(1, 2, 3, 0))               # one pass: layout and rounding
        out[..., 1].copy_(z_sin.permute(1, 2, 3, 0))
        return out.reshape(n_steps, out.shape[1], -1)[:, :, :n].reshape(n_steps, -1, *shape)

    def uniform(self, chain_ids: torch.Tensor, step: int, stream: int, shape: Sequence[int],
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """U[0, 1) draws of shape (N, *shape) on the grid k 2^-24 (exact in float32).

        Draw j is the top 24 bits of word c_(j % 4) of Philox call j // 4.
        """
        n = math.prod(shape)
        mul, xor = self._lanes(chain_ids, step, stream, max(1, -(-n // 4)))
        k = torch.stack((mul[0], xor[1], mul[1], xor[0]), -1).reshape(mul.shape[1], -1)[:, :n] >> 8
        return (k.to(torch.float64) * 2.0 ** -24).to(dtype).reshape(-1, *shape)

    def randint(self, chain_ids: torch.Tensor, step: int, stream: int, high: int) -> torch.Tensor:
        """One integer in [0, high) per chain, high <= 2^31: floor(w high / 2^64), w = c0 2^32 + c1 of call 0.

        Every value has probability within high / 2^64 (relative) of 1 / high.
        """
        if isinstance(high, bool) or not isinstance(high, int) or not 1 <= high <= 1 << 31:
            raise ValueError(f"randint high must be an integer in [1, 2**31], got {high!r}")
        mul, xor = self._lanes(chain_ids, step, stream, 1)
        w0, w1 = mul[0, :, 0], xor[1, :, 0]
        # w0 * high < 2^63 and (w1 * high) >> 32 < 2^31: the sum fits int64 exactly
        return (w0 * high + ((w1 * high) >> 32)) >> 32

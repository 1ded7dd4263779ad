"""Langevin integrators as pure functions ``step(state, score_fn, params, noise) -> (state, out)``.

THEORY section 4. The dynamics integrated are underdamped Langevin with unit temperature,

    dy = v dt,    dv = u * psi(y) dt - gamma v dt + sqrt(2 gamma u) dW,

whose stationary law is p(y) x N(v; 0, u I). ``score_fn(y) -> ScoreOutput(psi, xhat)`` returns the
score and the Bayes estimate computed by the same network evaluation, so every scheme here makes
exactly one score evaluation per step and hands its ``xhat`` back as the jump candidate.

All schemes are linear in (y, v, psi, noise): averaging over the M channels commutes with a step,
which is what makes the exact reduced walk of THEORY section 5 possible (for the reduced walk
pass noise already scaled as N(0, I/M)).

Noise shapes: ``aboba_step`` and ``ula_step`` take xi with the shape of y; ``cheng_step`` takes two
independent standard normal draws stacked as (2, *y.shape).
"""
from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple

import torch

from mmgm_ray.validators import positive as check_positive


class LangevinState(NamedTuple):
    """Position and velocity of a batch of chains (same shape)."""
    y: torch.Tensor
    v: torch.Tensor


class ScoreOutput(NamedTuple):
    """One network evaluation: score psi (shape of y) and Bayes estimate xhat (B, *event)."""
    psi: torch.Tensor
    xhat: torch.Tensor


ScoreFn = Callable[[torch.Tensor], ScoreOutput]


class IntegratorParams(NamedTuple):
    """Step size delta, friction gamma, inverse mass u and the friction convention.

    ``friction="scaled"`` (default) uses zeta1 = exp(-gamma * delta), the discretization of the SDE
    above. ``"unscaled"`` uses zeta1 = exp(-gamma), as some public walk-jump code does; it is the
    same scheme with an effective friction gamma / delta.
    """
    delta: float
    gamma: float
    u: float = 1.0
    friction: Literal["scaled", "unscaled"] = "scaled"

    @staticmethod
    def create(delta: float, gamma: float, u: float = 1.0, friction: str = "scaled") -> "IntegratorParams":
        """Validated constructor (ValueError names the bad parameter)."""
        if friction not in ("scaled", "unscaled"):
            raise ValueError(f"friction must be 'scaled' or 'unscaled', got {friction!r}")
        return IntegratorParams(check_positive("delta", delta), check_positive("gamma", gamma),
                                check_positive("u", u), friction)

    @property
    def gamma_eff(self) -> float:
        """Friction per unit time of the integrated SDE."""
        return self.gamma if self.friction == "scaled" else self.gamma / self.delta

    @property
    def zeta1(self) -> float:
        return math.exp(-self.gamma_eff * self.delta)

    @property
    def zeta2(self) -> float:
        return math.exp(-2.0 * self.gamma_eff * self.delta)


def aboba_step(state: LangevinState, score_fn: ScoreFn, params: IntegratorParams,
               noise: torch.Tensor) -> tuple[LangevinState, ScoreOutput]:
    """A-B-O-B-A splitting (Sachs, Leimkuhler & Danos 2017, Entropy 19:647), THEORY section 4.

    The score is evaluated at the half-step position; that evaluation's xhat is returned.
    """
    d, u = params.delta, params.u
    y = state.y + (0.5 * d) * state.v
    out = score_fn(y)
    v = state.v + (0.5 * u * d) * out.psi
    v = params.zeta1 * v + (0.5 * u * d) * out.psi + math.sqrt(u * (1.0 - params.zeta2)) * noise
    y = y + (0.5 * d) * v
    return LangevinState(y, v), out


def cheng_coefficients(params: IntegratorParams) -> dict[str, float]:
    """Mean and noise coefficients of the Cheng et al. (2018) step, psi frozen over the step."""
    d, u, g = params.delta, params.u, params.gamma_eff
    z1, z2 = params.zeta1, params.zeta2
    var_y = (u / g) * (2.0 * d - (4.0 / g) * (1.0 - z1) + (1.0 / g) * (1.0 - z2))
    var_v = u * (1.0 - z2)
    cov = (u / g) * (1.0 - 2.0 * z1 + z2)
    sd_y = math.sqrt(max(var_y, 0.0))
    # Cholesky of [[var_y, cov], [cov, var_v]]
    c_vy = cov / sd_y if sd_y > 0 else 0.0
    sd_v_cond = math.sqrt(max(var_v - c_vy * c_vy, 0.0))
    return {
        "y_v": (1.0 - z1) / g,
        "y_psi": (u / g) * (d - (1.0 - z1) / g),
        "v_v": z1,
        "v_psi": (u / g) * (1.0 - z1),
        "sd_y": sd_y, "c_vy": c_vy, "sd_v": sd_v_cond,
        "var_y": var_y, "var_v": var_v, "cov": cov,
    }


def cheng_step(state: LangevinState, score_fn: ScoreFn, params: IntegratorParams,
               noise: torch.Tensor) -> tuple[LangevinState, ScoreOutput]:
    """Underdamped Langevin MCMC of Cheng, Chatterji, Bartlett & Jordan (COLT 2018).

    The OU part is integrated exactly with psi frozen at the step's start; (y, v) receive
    correlated Gaussian noise (THEORY section 4). ``noise`` is (2, *y.shape) standard normal.
    """
    c = cheng_coefficients(params)
    out = score_fn(state.y)
    n1, n2 = noise[0], noise[1]
    y = state.y + c["y_v"] * state.v + c["y_psi"] * out.psi + c["sd_y"] * n1
    v = c["v_v"] * state.v + c["v_psi"] * out.psi + c["c_vy"] * n1 + c["sd_v"] * n2
    return LangevinState(y, v), out


def ula_step(state: LangevinState, score_fn: ScoreFn, params: IntegratorParams,
             noise: torch.Tensor) -> tuple[LangevinState, ScoreOutput]:
    """Overdamped unadjusted Langevin: y <- y + (delta^2 / 2) psi + delta xi (THEORY section 4).

    The velocity is not used and is passed through unchanged.
    """
    d = params.delta
    out = score_fn(state.y)
    y = state.y + (0.5 * d * d) * out.psi + d * noise
    return LangevinState(y, state.v), out


INTEGRATORS = {"aboba": aboba_step, "cheng": cheng_step, "ula": ula_step}
NOISE_DRAWS = {"aboba": 1, "cheng": 2, "ula": 1}  # standard normal draws per state element per step


def get_integrator(name: str):
    """Integrator function by name ('aboba', 'cheng', 'ula')."""
    try:
        return INTEGRATORS[name]
    except KeyError:
        raise ValueError(f"integrator must be one of {sorted(INTEGRATORS)}, got {name!r}") from None

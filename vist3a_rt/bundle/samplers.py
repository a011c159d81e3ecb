"""Flow-matching samplers in plain torch: multistep UniPC and Euler, without diffusers.

The torch path samples with diffusers' ``UniPCMultistepScheduler`` (``prediction_type=
"flow_prediction"``, ``use_flow_sigmas=True``, ``flow_shift``) and ``FlowMatchEulerDiscreteScheduler``
(``shift``), configured by ``vist3a_rt.generator.sampling.make_scheduler``. These classes compute
the same schedules and updates (tests hold them to 1e-5 on the same noise); they read the same
fields of the model's scheduler config and refuse the options they do not implement.

Flow matching: ``x_σ = (1 − σ)·x₀ + σ·ε`` and the network predicts ``v = ε − x₀``, so
``x₀ = x − σ·v``. Schedules shift ``σ`` towards the noise: ``σ' = s·σ / (1 + (s − 1)·σ)``.

UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), data-prediction form
with ``α = 1 − σ``, ``λ = log α − log σ`` and ``h = λ_t − λ_s``: the predictor UniP-p moves from
``σ_s`` to ``σ_t`` with the last p x₀ predictions; after the next network call, the corrector UniC
re-does that move with the new prediction included. B(h) is ``−h`` ("bh1") or ``e^{−h} − 1``
("bh2"). Orders ramp up from 1 (one prediction in the history) and, with ``lower_order_final``,
drop to 1 on the last step, which lands on ``σ = 0`` (``λ = ∞``: the update returns x₀).

Schedules are computed in float64 numpy and stored in float32; the per-step coefficients are
float32 0-d tensors, as diffusers computes them, so the two agree to float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from ..errors import Vist3AInputError

NUM_TRAIN_TIMESTEPS = 1000
SAMPLER_CLASSES = {"unipc": "UniPCMultistepScheduler", "euler": "FlowMatchEulerDiscreteScheduler"}

# config fields whose non-default values change the algorithm in ways not implemented here
_UNIPC_UNSUPPORTED = {"thresholding": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                      "use_beta_sigmas": False, "use_dynamic_shifting": False, "solver_p": None,
                      "rescale_betas_zero_snr": False}
_EULER_UNSUPPORTED = {"use_dynamic_shifting": False, "invert_sigmas": False, "use_karras_sigmas": False,
                      "use_exponential_sigmas": False, "use_beta_sigmas": False, "stochastic_sampling": False}


def shift_sigmas(sigmas, shift: float):
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowUniPC:
    """Multistep UniPC on a shifted flow schedule; ``step(velocity, latents)`` once per timestep."""

    def __init__(self, num_steps: int, shift: float, *, order: int = 2, variant: str = "bh2",
                 lower_order_final: bool = True, final_sigma: str = "zero", disable_corrector=(),
                 predict_x0: bool = True, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> None:
        if variant not in ("bh1", "bh2"):
            raise Vist3AInputError(f"UniPC solver_type must be 'bh1' or 'bh2', got {variant!r}")
        if final_sigma not in ("zero", "sigma_min"):
            raise Vist3AInputError(f"UniPC final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigma!r}")
        if not predict_x0:
            raise Vist3AInputError("UniPC with flow prediction needs predict_x0=true")
        if not isinstance(order, int) or order < 1:
            raise Vist3AInputError(f"UniPC solver_order must be a positive integer, got {order!r}")
        self.order, self.variant, self.lower_order_final = order, variant, lower_order_final
        self.disable_corrector = set(disable_corrector)
        sigmas = np.linspace(1, 1 / num_train_timesteps, num_steps + 1)[:-1]
        sigmas = shift_sigmas(sigmas, shift)
        if abs(sigmas[0] - 1) < 1e-6:
            sigmas[0] -= 1e-6  # keeps log σ and log(1 − σ) finite on the first step
        self.timesteps = torch.from_numpy(sigmas * num_train_timesteps).to(torch.int64)  # truncated
        last = 0.0 if final_sigma == "zero" else sigmas[-1]
        self.sigmas = torch.from_numpy(np.append(sigmas, last).astype(np.float32))
        self._history: list[tuple[int, torch.Tensor]] = []  # (sigma index, x0 prediction), newest last
        self._previous: tuple[torch.Tensor, int] | None = None  # (sample before the last predictor, its order)
        self._index = 0

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(self, velocity: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Latents at the next sigma, from the (guided) velocity predicted at the current one."""
        i = self._index
        x0 = latents - self.sigmas[i] * velocity
        if i > 0 and (i - 1) not in self.disable_corrector and self._previous is not None:
            before, order = self._previous
            latents = self._update(before, i - 1, i, order, corrector_x0=x0)
        self._history = (self._history + [(i, x0)])[-self.order:]
        order = self.order if not self.lower_order_final else min(self.order, len(self) - i)
        order = min(order, len(self._history))
        self._previous = (latents, order)
        self._index += 1
        return self._update(latents, i, i + 1, order)

    def _lambda(self, index: int) -> torch.Tensor:
        sigma = self.sigmas[index]
        return torch.log(1 - sigma) - torch.log(sigma)

    def _update(self, x: torch.Tensor, source: int, target: int, order: int,
                corrector_x0: torch.Tensor | None = None) -> torch.Tensor:
        """UniP-``order`` from sigma index ``source`` to ``target`` (history newest at ``source``);
        with ``corrector_x0`` (the prediction at ``target``) the UniC-``order`` correction instead."""
        history = self._history
        m0 = history[-1][1]
        sigma_s, sigma_t = self.sigmas[source], self.sigmas[target]
        alpha_t = 1 - sigma_t
        lambda_s = self._lambda(source)
        h = self._lambda(target) - lambda_s
        ratios, differences = [], []
        for k in range(1, order):
            index, mk = history[-(k + 1)]
            r = (self._lambda(index) - lambda_s) / h
            ratios.append(r)
            differences.append((mk - m0) / r)
        hh = -h
        h_phi_1 = torch.expm1(hh)
        B_h = hh if self.variant == "bh1" else torch.expm1(hh)
        rhs, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
        for j in range(1, order + 1):
            rhs.append(h_phi_k * factorial / B_h)
            factorial *= j + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        base = sigma_t / sigma_s * x - alpha_t * h_phi_1 * m0
        if corrector_x0 is None:
            rhos = self._predictor_weights(ratios, rhs, order, x.dtype)
            residual = _weighted_sum(rhos, differences)
            return (base - alpha_t * B_h * residual).to(x.dtype)
        rhos = self._corrector_weights(ratios, rhs, order, x.dtype)
        residual = _weighted_sum(rhos[:-1], differences) + rhos[-1] * (corrector_x0 - m0)
        return (base - alpha_t * B_h * residual).to(x.dtype)

    @staticmethod
    def _predictor_weights(ratios, rhs, order: int, dtype) -> torch.Tensor | None:
        if order == 1:
            return None
        if order == 2:
            return torch.full((1,), 0.5, dtype=dtype)
        return torch.linalg.solve(_vandermonde(ratios, order - 1), torch.stack(rhs[:-1])).to(dtype)

    @staticmethod
    def _corrector_weights(ratios, rhs, order: int, dtype) -> torch.Tensor:
        if order == 1:
            return torch.full((1,), 0.5, dtype=dtype)
        return torch.linalg.solve(_vandermonde(ratios, order), torch.stack(rhs)).to(dtype)


def _vandermonde(ratios: list[torch.Tensor], size: int) -> torch.Tensor:
    """Rows ``r^(j-1)`` for j = 1..size over the nodes (ratios, 1), cut to size x size."""
    nodes = torch.stack([*ratios, torch.ones(())])
    return torch.stack([nodes ** j for j in range(size)])[:size, :size]


def _weighted_sum(weights: torch.Tensor | None, terms: list[torch.Tensor]):
    if weights is None or not terms:
        return 0
    total = weights[0] * terms[0]
    for w, term in zip(weights[1:], terms[1:]):
        total = total + w * term
    return total


class FlowEuler:
    """Euler steps on a shifted flow schedule (diffusers' ``FlowMatchEulerDiscreteScheduler``).

    As there, the schedule runs from σ = 1 to the training schedule's smallest *shifted* σ and is
    then shifted (again) — a quirk kept so the two samplers agree; timesteps are floats σ·1000.
    """

    def __init__(self, num_steps: int, shift: float, *, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> None:
        train = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1]
                                 .copy()) / num_train_timesteps
        train = shift_sigmas(train, shift)  # float32, as the training schedule is held
        high, low = train[0].item() * num_train_timesteps, train[-1].item() * num_train_timesteps
        sigmas = shift_sigmas(np.linspace(high, low, num_steps) / num_train_timesteps, shift)
        sigmas = torch.from_numpy(sigmas).to(torch.float32)
        self.timesteps = sigmas * num_train_timesteps
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self._index = 0

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(self, velocity: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        i = self._index
        self._index += 1
        moved = latents.to(torch.float32) + (self.sigmas[i + 1] - self.sigmas[i]) * velocity
        return moved.to(velocity.dtype)


def make_sampler(sampler: str, num_steps: int, flow_shift: float, scheduler_config: Mapping | None = None):
    """A fresh sampler, configured as ``vist3a_rt.generator.sampling.make_scheduler`` configures
    the diffusers one: the model's scheduler config supplies the solver options when it is a config
    of the same class; the flow settings (shift, 1000 training steps) always come from here."""
    if sampler not in SAMPLER_CLASSES:
        raise Vist3AInputError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLER_CLASSES)}")
    if not (isinstance(flow_shift, (int, float)) and math.isfinite(flow_shift) and flow_shift > 0):
        raise Vist3AInputError(f"flow_shift must be a positive number, got {flow_shift!r}")
    config = dict(scheduler_config or {})
    if config.get("_class_name") != SAMPLER_CLASSES[sampler]:
        config = {}
    _refuse_unsupported(sampler, config, _UNIPC_UNSUPPORTED if sampler == "unipc" else _EULER_UNSUPPORTED)
    if sampler == "euler":
        return FlowEuler(num_steps, float(flow_shift))
    return FlowUniPC(num_steps, float(flow_shift), order=config.get("solver_order", 2),
                     variant=config.get("solver_type", "bh2"),
                     lower_order_final=config.get("lower_order_final", True),
                     final_sigma=config.get("final_sigmas_type", "zero"),
                     disable_corrector=config.get("disable_corrector", ()),
                     predict_x0=config.get("predict_x0", True))


def _refuse_unsupported(sampler: str, config: Mapping, defaults: Mapping) -> None:
    changed = sorted(k for k, default in defaults.items() if config.get(k, default) not in (default,))
    if config.get("shift_terminal"):
        changed.append("shift_terminal")
    if changed:
        raise Vist3AInputError(f"the model's scheduler config sets {changed} for the {sampler!r} sampler; "
                               "the bundle runtime implements only the default values (use backend='torch')")

r"""A LISA-like inspiral chirp in coloured Gaussian noise: a simulator whose exact likelihood is
known, so that simulation-based inference (the ``"snl"`` engine) can be checked against NUTS on
that likelihood.

The signal
----------
A massive black-hole binary of (detector-frame) chirp mass :math:`\mathcal{M}` and mass ratio
:math:`q = m_1 / m_2 \ge 1` (symmetric mass ratio :math:`\eta = q / (1 + q)^2`, total mass
:math:`M = \mathcal{M} \eta^{-3/5}`), seen during its inspiral. In the frequency domain, by the
stationary-phase approximation, with the amplitude at leading (Newtonian) order and the phase to
first post-Newtonian order (geometric units, :math:`G = c = 1`, masses in seconds:
:math:`G M_\odot / c^3 = 4.925\,\mu\mathrm{s}`),

.. math::

    \tilde h(f) = \mathcal{A} f^{-7/6} e^{i \Psi(f)}, \qquad
    \Psi(f) = 2 \pi f t_c - \phi_c - \frac{\pi}{4}
              + \frac{3}{128} u^{-5/3} \Big[1 + \Big(\frac{3715}{756} + \frac{55}{9}\eta\Big)
                \eta^{-2/5} u^{2/3}\Big], \qquad u = \pi \mathcal{M} f

(Cutler and Flanagan 1994, PRD 49 2658, with :math:`\eta v^5 = u^{5/3}` and
:math:`v^2 = (\pi M f)^{2/3} = \eta^{-2/5} u^{2/3}`); call the post-Newtonian part
:math:`\psi(f)`. The chirp mass sets the Newtonian phase, the leading term; the mass ratio
enters only through the 1PN term, weakly: over a short band it is nearly degenerate with the
chirp mass, and its posterior stays close to its prior at the example's SNR.

The coalescence time :math:`t_c` and phase :math:`\phi_c` are poorly measured from a short band:
a shift of :math:`t_c` is nearly undone by shifts of :math:`\phi_c` and of the chirp mass (at
SNR 20 the posterior of :math:`\phi_c` covers the whole circle, and the chains of NUTS mix
slowly along that ridge). So, as is usual, the arrival time and the phase are defined at a
reference frequency :math:`f_{\rm ref}` = 1 mHz (``F_REF``) inside the band: the time
:math:`t_{\rm ref} = t_c - \tau(f_{\rm ref})` at which the gravitational-wave frequency passes
:math:`f_{\rm ref}` (:math:`\tau = -\psi'/(2\pi)` the 1PN time to merger,
:func:`time_to_merger`) and the phase :math:`\phi_{\rm ref} = \Psi(f_{\rm ref})`. Then

.. math::

    \Psi(f) = \phi_{\rm ref} + 2\pi (f - f_{\rm ref}) t_{\rm ref}
              + \psi(f) - \psi(f_{\rm ref}) - \psi'(f_{\rm ref}) (f - f_{\rm ref}),

the masses enter only through the curvature of the phase about :math:`f_{\rm ref}`, and
:math:`\phi_{\rm ref}` is measured to about 1/SNR.

The detector and the data
-------------------------
The noise is stationary, Gaussian, with LISA's analytic sky-averaged sensitivity (the analytic
fit of Robson, Cornish and Liu 2019, without the Galactic confusion noise; arm length
:math:`L = 2.5` Gm, transfer frequency :math:`f_* = 19.09` mHz),

.. math::

    S_n(f) = \frac{10}{3 L^2}\Big(P_{\rm OMS} + \frac{2 (1 + \cos^2(f/f_*)) P_{\rm acc}}
             {(2\pi f)^4}\Big)\Big(1 + \frac{6}{10}\frac{f^2}{f_*^2}\Big)\ \mathrm{Hz}^{-1},

:math:`P_{\rm OMS} = (1.5\times 10^{-11}\,\mathrm{m})^2 (1 + (2\,\mathrm{mHz}/f)^4)`,
:math:`P_{\rm acc} = (3\times 10^{-15}\,\mathrm{m\,s^{-2}})^2 (1 + (0.4\,\mathrm{mHz}/f)^2)
(1 + (f / 8\,\mathrm{mHz})^4)` (:func:`psd`). A segment of ``DURATION`` = 50 000 s (13.9 h) is
observed; its discrete Fourier transform at the ``NUM_BINS`` = 32 frequencies
:math:`f_k = (32 + k) / T`, 0.64-1.26 mHz (``FREQUENCIES``), is the data. For a chirp mass of
:math:`10^6 M_\odot` the binary sweeps this band in ~15 gravitational-wave cycles over ~4.9 h,
from 5.9 h to 1 h before merger (shorter than the segment, as the stationary-phase waveform on
this grid needs), and the band stays below the innermost stable circular orbit's frequency
:math:`f_{\rm ISCO} = 1 / (6^{3/2} \pi M)` everywhere in the prior.

With the one-sided PSD, the real and imaginary parts of the noise's transform at :math:`f_k` are
independent :math:`N(0, \sigma_k^2)`, :math:`\sigma_k^2 = T S_n(f_k) / 4` (:func:`noise_sd`;
coloured: :math:`\sigma_k` falls by a factor ~4 across the band). Whitened,
:math:`w_k = \tilde d_k / \sigma_k` is the signal :math:`s_k = \tilde h(f_k) / \sigma_k` plus
independent standard normal real and imaginary parts, and the likelihood of the transform is
Whittle's, here exact: :math:`\log p(w \mid \theta) = -\frac12 \sum_k |w_k - s_k(\theta)|^2 -
K \log 2\pi`.

**The data** are the whitened transform compressed onto a reduced basis (as reduced-order
models do for gravitational-wave likelihoods): ``NUM_BASIS`` = 8 orthonormal complex vectors
:math:`b_j` over the 32 bins (``BASIS``), the leading right singular vectors of the whitened
unit-amplitude templates on a grid over the prior box, and the data are the 16 real numbers
``[Re c_0 .. Re c_7, Im c_0 .. Im c_7]``, :math:`c_j = \langle b_j, w \rangle = \sum_k
\bar b_{jk} w_k` (:func:`compress`). The projection is orthonormal, so the compressed noise is
again independent standard normal and the **exact likelihood** of the data (:func:`model`) is

.. math::

    \log p(y \mid \theta) = -\tfrac12 \|y - \mu(\theta)\|^2 - 8 \log 2\pi,
    \qquad \mu(\theta) = \mathrm{compress}(s(\theta)),

:math:`\mu` being :func:`signal`.

The signals span the basis almost exactly (a template's energy outside it was below
:math:`5 \times 10^{-7}` of its own at 5000 prior draws: below 0.002 in SNR^2 at an SNR of
60), so the discarded 48 numbers are noise alone and the posterior from the 16 compressed
numbers is the posterior from the whole transform. The compression keeps the flow's problem
small: 16 data values and 5 parameters.

Parameters and priors (:func:`prior`)
-------------------------------------
The amplitude is the optimal matched-filter signal-to-noise ratio
:math:`\rho = (4 \Delta f \sum_k |\tilde h(f_k)|^2 / S_n(f_k))^{1/2} = \|s\|` (it stands for
:math:`\mathcal{A}`, i.e. the distance and orientation, in the units the data can measure). The
phase is periodic, and a prior uniform on it would put the posterior across the wrap-around
for some signals; so the complex amplitude :math:`\rho e^{i\phi_{\rm ref}}` is sampled instead,
in Cartesian parts ``amp_cos`` :math:`= \rho\cos\phi_{\rm ref}` and ``amp_sin``
:math:`= \rho\sin\phi_{\rm ref}`, each :math:`N(0, 20^2)` (a uniform phase and a Rayleigh(20)
SNR); the signal is linear in them. The other priors are the box a search's trigger
localises, as in a follow-up parameter estimation: ``chirp_mass ~ U(0.9, 1.1)`` (units of
:math:`10^6 M_\odot`), ``mass_ratio ~ U(1, 4)`` and ``arrival_time ~ U(-600, 600)``
(:math:`t_{\rm ref}`, s from the trigger). Deterministic sites: ``amplitude`` (:math:`\rho`),
``phase`` (:math:`\phi_{\rm ref}` in :math:`(-\pi, \pi]`) and ``coalescence_time``
(:math:`t_c`, s from the trigger). At the example's SNR of 20 (:func:`example`) the posterior is
unimodal over this box (checked on grids of the likelihood maximised over the complex
amplitude, at mass ratios 1, 2.5 and 4, in ``tests/models/test_chirp.py``), with sds of about
1.4 % in chirp mass, 55 s in arrival time, 0.07 rad in phase and 1 in SNR; the mass ratio's
posterior is close to its prior, and the chirp mass shifts with it.

Simulation-based inference
--------------------------
:func:`simulate` draws the data at given parameters (the signal, then coloured noise of the
PSD, whitened and compressed; :func:`simulate_transform` gives the transform before that),
:func:`simulator_posterior` wraps it and the prior as a
:class:`bayeslik.SimulatorPosterior` for the ``"snl"`` engine (sequential neural likelihood,
Papamakarios, Sterratt and Murray 2019, AISTATS, arXiv:1805.07226), and :func:`posterior` is the
exact-likelihood :class:`bayeslik.Posterior` of the same data for NUTS. LISA: Amaro-Seoane et
al. 2017, arXiv:1702.00786; its sensitivity curve: Robson, Cornish and Liu 2019, CQG 36 105011,
arXiv:1803.01944.

>>> import numpy as np
>>> from bayeslik.models import chirp
>>> ex = chirp.example(seed=0)
>>> ex["observed"].shape, sorted(ex["truth"])
((16,), ['amp_cos', 'amp_sin', 'arrival_time', 'chirp_mass', 'mass_ratio'])
>>> round(float(np.linalg.norm(chirp.signal(ex["truth"]))), 3)  # the SNR is the amplitude
20.0
>>> post = chirp.posterior(ex["observed"])
>>> post.ndim
5
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

__all__ = [
    "MSUN_S", "DURATION", "FIRST_BIN", "NUM_BINS", "FREQUENCIES", "F_REF", "NUM_BASIS",
    "NUM_DATA", "BASIS", "PRIORS", "AMP_SCALE", "TRUTH", "psd", "noise_sd", "time_to_merger",
    "relative_phase", "strain", "whiten", "compress", "signal", "prior", "simulate_transform",
    "simulate", "model", "example", "posterior", "simulator_posterior",
]

#: G M_sun / c^3 in seconds
MSUN_S = 4.925490947641267e-6
#: the segment's duration T (s) and its frequency bins f_k = (FIRST_BIN + k) / T
DURATION = 5.0e4
FIRST_BIN = 32
NUM_BINS = 32
FREQUENCIES = (FIRST_BIN + np.arange(NUM_BINS)) / DURATION
#: the reference frequency (Hz) at which the arrival time and the phase are defined
F_REF = 1.0e-3
#: LISA: arm length (m) and transfer frequency (Hz)
ARM_M = 2.5e9
F_STAR = 19.09e-3
#: uniform priors' bounds: chirp mass (10^6 M_sun), mass ratio m1/m2, arrival time t_ref (s)
PRIORS = {"chirp_mass": (0.9, 1.1), "mass_ratio": (1.0, 4.0), "arrival_time": (-600.0, 600.0)}
#: the sd of each Cartesian part of the complex SNR amplitude rho exp(i phi)
AMP_SCALE = 20.0
#: the example's parameters: SNR 20, phase 1 rad at F_REF
TRUTH = {"chirp_mass": 1.0, "mass_ratio": 2.0, "arrival_time": 100.0,
         "amp_cos": 20.0 * math.cos(1.0), "amp_sin": 20.0 * math.sin(1.0)}
#: complex basis vectors of the compression; the data are their real then imaginary parts
NUM_BASIS = 8
NUM_DATA = 2 * NUM_BASIS


def psd(f):
    """LISA's analytic sky-averaged noise PSD S_n(f) in 1/Hz at frequencies ``f`` (Hz), without
    the Galactic confusion noise (Robson, Cornish and Liu 2019).

    >>> f"{float(psd(1e-3)):.3e}"
    '1.634e-38'
    """
    f = np.asarray(f, dtype=float)
    p_oms = (1.5e-11) ** 2 * (1.0 + (2e-3 / f) ** 4)
    p_acc = (3e-15) ** 2 * (1.0 + (0.4e-3 / f) ** 2) * (1.0 + (f / 8e-3) ** 4)
    return (10.0 / (3.0 * ARM_M ** 2) * (p_oms + 2.0 * (1.0 + np.cos(f / F_STAR) ** 2) * p_acc
                                         / (2.0 * np.pi * f) ** 4)
            * (1.0 + 0.6 * (f / F_STAR) ** 2))


def noise_sd() -> np.ndarray:
    """sigma_k = sqrt(T S_n(f_k) / 4): the sd of the real and of the imaginary part of the
    noise's discrete Fourier transform (strain s) at each of ``FREQUENCIES``."""
    return np.sqrt(DURATION * psd(FREQUENCIES) / 4.0)


#: the whitened Newtonian amplitude f^{-7/6} / sigma_k, normalised to unit norm (so that the
#: whitened signal's norm is the SNR)
_SHAPE = FREQUENCIES ** (-7.0 / 6.0) / noise_sd()
_SHAPE = _SHAPE / np.sqrt(np.sum(_SHAPE ** 2))


def _pn_phase(chirp_mass, mass_ratio, f, xp=jnp):
    """psi(f), the post-Newtonian part of the stationary phase (radians), and d psi / d f (s);
    chirp mass in 10^6 M_sun."""
    mc = chirp_mass * 1e6 * MSUN_S
    eta = mass_ratio / (1.0 + mass_ratio) ** 2
    u = xp.pi * mc * f
    c1 = (3715.0 / 756.0 + 55.0 / 9.0 * eta) * eta ** (-0.4)
    psi = 3.0 / 128.0 * u ** (-5.0 / 3.0) * (1.0 + c1 * u ** (2.0 / 3.0))
    dpsi = xp.pi * mc * 3.0 / 128.0 * (-5.0 / 3.0 * u ** (-8.0 / 3.0) - c1 * u ** (-2.0))
    return psi, dpsi


def time_to_merger(chirp_mass, mass_ratio, f=F_REF):
    r"""tau(f) = -psi'(f) / (2 pi): the time (s) from the moment the gravitational-wave frequency
    passes ``f`` (Hz) to coalescence, to 1PN order,
    :math:`\tau = \frac{5 \mathcal{M}}{256} u^{-8/3}\big[1 + (\frac{743}{252}
    + \frac{11}{3}\eta) \eta^{-2/5} u^{2/3}\big]`.

    >>> round(float(time_to_merger(1.0, 2.0)))
    9230
    """
    return -_pn_phase(chirp_mass, mass_ratio, jnp.asarray(f))[1] / (2.0 * jnp.pi)


def relative_phase(params: Mapping[str, Any], frequencies=FREQUENCIES, xp=jnp):
    r"""The stationary phase :math:`\Psi(f)` (radians) at ``frequencies``, less the phase at
    ``F_REF`` (which :func:`strain` applies through the complex amplitude):
    :math:`2\pi (f - f_{\rm ref}) t_{\rm ref} + \psi(f) - \psi(f_{\rm ref})
    - \psi'(f_{\rm ref}) (f - f_{\rm ref})`. ``xp=numpy`` computes it in NumPy (float64)."""
    f = xp.asarray(frequencies)
    mc, q = params["chirp_mass"], params["mass_ratio"]
    psi, _ = _pn_phase(mc, q, f, xp)
    psi_ref, dpsi_ref = _pn_phase(mc, q, F_REF, xp)
    df = f - F_REF
    return 2.0 * xp.pi * df * params["arrival_time"] + psi - psi_ref - dpsi_ref * df


def _reduced_basis(num: int) -> np.ndarray:
    """The ``num`` leading right singular vectors (rows, complex, orthonormal) of the whitened
    unit-amplitude templates on a 21 x 4 x 21 grid over the prior box of (chirp mass, mass
    ratio, arrival time), in float64; each vector's phase is fixed by making its largest
    component real and positive (a deterministic basis whatever the LAPACK)."""
    grids = [np.linspace(lo, hi, n) for (lo, hi), n in zip(PRIORS.values(), (21, 4, 21))]
    mc, q, t = (g.reshape(-1, 1) for g in np.meshgrid(*grids, indexing="ij"))
    templates = _SHAPE * np.exp(1j * relative_phase(
        {"chirp_mass": mc, "mass_ratio": q, "arrival_time": t}, xp=np))
    basis = np.linalg.svd(templates, full_matrices=False)[2][:num]
    top = basis[np.arange(num), np.abs(basis).argmax(1)]
    return basis * (np.abs(top) / top)[:, None]


#: the compression's basis: NUM_BASIS orthonormal complex rows over the NUM_BINS bins
BASIS = _reduced_basis(NUM_BASIS)
#: compression of [Re w, Im w] (2 NUM_BINS) to [Re c, Im c] (NUM_DATA), c = conj(BASIS) w:
#: Re c = Br Re w + Bi Im w, Im c = Br Im w - Bi Re w
_PROJECT = np.block([[BASIS.real, BASIS.imag], [-BASIS.imag, BASIS.real]])


def strain(params: Mapping[str, Any]) -> jax.Array:
    """The noiseless transform :math:`\\tilde h(f_k)` (complex, strain s) at ``FREQUENCIES``;
    ``params`` holds the five latent sites (extra entries are ignored)."""
    p = relative_phase(params)
    amp = params["amp_cos"] + 1j * params["amp_sin"]
    return amp * jnp.asarray(_SHAPE * noise_sd()) * jnp.exp(1j * p)


def whiten(transform):
    """A transform at ``FREQUENCIES`` (complex, strain s) divided by the noise sd,
    ``w_k = d_k / sigma_k``."""
    return transform / jnp.asarray(noise_sd())


def compress(transform) -> jax.Array:
    """The data vector of a transform at ``FREQUENCIES`` (complex, strain s): whitened and
    projected on ``BASIS``, ``[Re c, Im c]`` (``NUM_DATA`` values; leading axes are kept)."""
    w = whiten(transform)
    dtype = jnp.zeros(()).dtype
    return jnp.concatenate([jnp.real(w), jnp.imag(w)], -1) @ jnp.asarray(_PROJECT.T, dtype)


def signal(params: Mapping[str, Any]) -> jax.Array:
    """The noiseless data at ``params``: ``compress(strain(params))`` (``NUM_DATA`` values). Its
    norm is the SNR, ``hypot(amp_cos, amp_sin)`` (to the basis's accuracy)."""
    return compress(strain(params))


def prior() -> dict:
    """The parameters' prior (a NumPyro program; see the module docstring): five latent sites
    and the deterministic ``amplitude`` (the SNR), ``phase`` (radians, at ``F_REF``) and
    ``coalescence_time`` (s). Returns the latent values."""
    params = {name: numpyro.sample(name, dist.Uniform(lo, hi))
              for name, (lo, hi) in PRIORS.items()}
    params["amp_cos"] = numpyro.sample("amp_cos", dist.Normal(0.0, AMP_SCALE))
    params["amp_sin"] = numpyro.sample("amp_sin", dist.Normal(0.0, AMP_SCALE))
    numpyro.deterministic("amplitude", jnp.hypot(params["amp_cos"], params["amp_sin"]))
    numpyro.deterministic("phase", jnp.arctan2(params["amp_sin"], params["amp_cos"]))
    numpyro.deterministic("coalescence_time", params["arrival_time"] + time_to_merger(
        params["chirp_mass"], params["mass_ratio"]))
    return params


def simulate_transform(rng_key, params: Mapping[str, Any]) -> jax.Array:
    """The observed transform at ``params`` (complex, strain s, at ``FREQUENCIES``): the signal
    plus stationary Gaussian noise of the PSD, real and imaginary parts each
    ``N(0, sigma_k^2)`` (coloured)."""
    noise = jax.random.normal(rng_key, (2, NUM_BINS)) * jnp.asarray(noise_sd())
    return strain(params) + (noise[0] + 1j * noise[1])


def simulate(rng_key, params: Mapping[str, Any]) -> jax.Array:
    """One dataset at ``params``: :func:`simulate_transform` whitened and compressed
    (``NUM_DATA`` values; JAX, vmappable). Its mean is :func:`signal` and its noise independent
    standard normal."""
    return compress(simulate_transform(rng_key, params))


def model(y=None):
    """The exact likelihood of the data ``y`` (``NUM_DATA`` values) under :func:`prior`:
    independent unit normals about :func:`signal` (Whittle's likelihood of the whitened
    transform, exact for stationary Gaussian noise on the DFT grid, compressed orthonormally).
    With ``y=None`` it simulates."""
    params = prior()
    numpyro.sample("y", dist.Normal(signal(params), 1.0).to_event(1), obs=y)


#: compiled once (one program is faster than the ops one by one)
_simulate_transform_jit = jax.jit(simulate_transform)
_compress_jit = jax.jit(compress)


def example(seed: int = 0) -> dict:
    """The example observation: ``{"truth": TRUTH (the five latent sites), "derived": the
    deterministic sites at TRUTH (amplitude 20, phase 1 rad, coalescence time),
    "transform": the simulated transform (NumPy complex, strain s), "observed": its data
    vector (NumPy, NUM_DATA values)}``, simulated from ``jax.random.key(seed)``."""
    truth = {k: jnp.asarray(v) for k, v in TRUTH.items()}
    transform = _simulate_transform_jit(jax.random.key(seed), truth)
    derived = {"amplitude": math.hypot(TRUTH["amp_cos"], TRUTH["amp_sin"]),
               "phase": math.atan2(TRUTH["amp_sin"], TRUTH["amp_cos"]),
               "coalescence_time": TRUTH["arrival_time"] + float(time_to_merger(
                   TRUTH["chirp_mass"], TRUTH["mass_ratio"]))}
    return {"truth": dict(TRUTH), "derived": derived, "transform": np.asarray(transform),
            "observed": np.asarray(_compress_jit(transform))}


def posterior(observed):
    """The exact-likelihood :class:`bayeslik.Posterior` of ``observed`` (for NUTS and the other
    likelihood-based engines)."""
    import bayeslik as bl

    return bl.Posterior(model, y=np.asarray(observed))


def simulator_posterior(observed, **options):
    """The :class:`bayeslik.SimulatorPosterior` of ``observed``: :func:`prior` and
    :func:`simulate` (no likelihood; for the ``"snl"`` engine). ``options`` go to
    SimulatorPosterior (e.g. ``simulator_kind``)."""
    import bayeslik as bl

    return bl.SimulatorPosterior(prior, simulate, np.asarray(observed), **options)

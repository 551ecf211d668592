r"""Background cosmology: flat and curved LCDM, wCDM and w0waCDM fitted to H(z), SNe and BAO.

The expansion rate
------------------
With :math:`a = 1/(1+z)` and today's density parameters (matter :math:`\Omega_m`, curvature
:math:`\Omega_k`, radiation :math:`\Omega_r`, dark energy
:math:`\Omega_{DE} = 1 - \Omega_m - \Omega_k - \Omega_r`),

.. math::

    E(z)^2 = \frac{H(z)^2}{H_0^2} = \Omega_r (1+z)^4 + \Omega_m (1+z)^3 + \Omega_k (1+z)^2
             + \Omega_{DE} (1+z)^{3(1 + w_0 + w_a)} e^{-3 w_a z / (1+z)},

the CPL dark energy :math:`w(a) = w_0 + w_a (1 - a)` (wCDM: :math:`w_a = 0`; LCDM:
:math:`w_0 = -1, w_a = 0`). :math:`H_0 = 100\,h` km/s/Mpc and
:math:`\Omega_r = 4.18 \times 10^{-5} / h^2` (photons at 2.7255 K and three neutrino species).

Distances (:math:`D_H = c / H_0`):
:math:`D_C(z) = D_H \int_0^z dz' / E(z')`, computed **in every likelihood call** by
``num_nodes``-point Gauss-Legendre quadrature on [0, z] (differentiable, vmappable);
:math:`D_M = D_H \sinh(\sqrt{\Omega_k} D_C/D_H)/\sqrt{\Omega_k}` for :math:`\Omega_k > 0`,
:math:`\sin` for :math:`\Omega_k < 0` and :math:`D_C` for a flat universe;
:math:`D_L = (1 + z_{hel}) D_M(z_{cmb})`.

The data (``models/data/cosmology``, see its README)
------------------------------------------------------
* ``"cc"``: 31 cosmic-chronometer H(z) values (Moresco et al. compilation, arXiv:1802.01505),
  independent Gaussian errors.
* ``"sn"``: Pantheon (Scolnic et al. 2018), 40 redshift bins, apparent magnitudes
  :math:`m_b = 5 \log_{10}(D_L / \mathrm{Mpc}) + 25 + M_B` with the 40x40 covariance
  (systematic + statistical). The absolute magnitude :math:`M_B \sim U(-21, -18)` is marginalised
  **exactly** in closed form: with :math:`r = m_b - \mu`, :math:`A = 1^T C^{-1} 1`,
  :math:`B = 1^T C^{-1} r`,
  :math:`\log L = -\tfrac12 (r^T C^{-1} r - B^2/A) - \tfrac12 \log|2\pi C| + \tfrac12 \log(2\pi/A)
  + \log[\Phi(\sqrt{A}(M_{hi} - B/A)) - \Phi(\sqrt{A}(M_{lo} - B/A))] - \log(M_{hi} - M_{lo})`.
* ``"bao"``: BOSS DR12 consensus (Alam et al. 2017) at z = 0.38, 0.51, 0.61:
  :math:`D_M r_{d,fid}/r_d` and :math:`H r_d / r_{d,fid}` with their 6x6 covariance,
  :math:`r_{d,fid} = 147.78` Mpc. The sound horizon :math:`r_d` follows from the fit of Aubourg
  et al. (2015, eq. 16) with :math:`\omega_b = 0.02235` (BBN, Cooke et al. 2018) and
  :math:`\omega_\nu = 0.00064` (one massive neutrino of 0.06 eV).

Parameters and priors (uniform; the unit-cube transform is linear)
-----------------------------------------------------------------
``h ~ U(0.4, 1.0)``, ``omega_m ~ U(0.05, 0.7)``; curved models add ``omega_k ~ U(-0.5, 0.5)``;
wCDM adds ``w ~ U(-2.5, -0.3)``; w0waCDM adds ``w0 ~ U(-2.0, 0.0)``, ``wa ~ U(-3.0, 2.0)``.
With SNe alone ``h`` is not a parameter (it is degenerate with :math:`M_B`, which is
marginalised): it is fixed at 0.7, which only shifts the best-fitting :math:`M_B`.
Where :math:`E(z)^2 \le 0` somewhere in [0, z_max] (a bounce), the likelihood is zero.

>>> from bayeslik.models import cosmology
>>> post = cosmology.posterior("lcdm", datasets=("cc", "sn"))
>>> post.ndim
2
>>> import numpy as np
>>> bool(np.isfinite(post.loglikelihood(post.unconstrain({"h": 0.7, "omega_m": 0.3}))))
True
"""

from __future__ import annotations

from importlib import resources

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import ndtr

from bayeslik.errors import ModelError

__all__ = [
    "KINDS", "C_KM_S", "load", "model", "posterior", "hubble_rate", "comoving_distance",
    "transverse_distance", "sound_horizon", "PRIORS",
]

C_KM_S = 299792.458
KINDS = ("lcdm", "olcdm", "wcdm", "owcdm", "w0wacdm")
PRIORS = {
    "h": (0.4, 1.0), "omega_m": (0.05, 0.7), "omega_k": (-0.5, 0.5), "w": (-2.5, -0.3),
    "w0": (-2.0, 0.0), "wa": (-3.0, 2.0),
}
M_B_RANGE = (-21.0, -18.0)
SN_ONLY_H = 0.7
RD_FID = 147.78
OMEGA_B_H2 = 0.02235
OMEGA_NU_H2 = 0.00064
OMEGA_R_H2 = 4.18e-5


# ----------------------------------------------------------------------------- physics
def hubble_rate(z, omega_m, omega_k=0.0, w0=-1.0, wa=0.0, omega_r=0.0):
    """E(z) = H(z)/H0 (see the module docstring); NaN where E^2 < 0."""
    zp1 = 1.0 + z
    omega_de = 1.0 - omega_m - omega_k - omega_r
    de = zp1 ** (3.0 * (1.0 + w0 + wa)) * jnp.exp(-3.0 * wa * z / zp1)
    e2 = omega_r * zp1**4 + omega_m * zp1**3 + omega_k * zp1**2 + omega_de * de
    return jnp.sqrt(e2)


def _gauss_legendre(num_nodes: int):
    x, w = np.polynomial.legendre.leggauss(num_nodes)
    return jnp.asarray(x), jnp.asarray(w)


def comoving_distance(z, omega_m, omega_k=0.0, w0=-1.0, wa=0.0, omega_r=0.0, *,
                      num_nodes: int = 32):
    r"""D_C(z) / D_H = \int_0^z dz'/E(z') by Gauss-Legendre quadrature (``z`` any shape).

    >>> import numpy as np
    >>> float(comoving_distance(np.array(3.0), 1.0))   # Einstein-de Sitter: 2 (1 - 1/sqrt(1+z))
    1.0
    """
    x, w = _gauss_legendre(num_nodes)
    z = jnp.asarray(z)
    half = 0.5 * z[..., None]
    zz = half * (x + 1.0)  # nodes mapped to [0, z]
    inv_e = 1.0 / hubble_rate(zz, omega_m, omega_k, w0, wa, omega_r)
    return jnp.sum(w * inv_e, axis=-1) * half[..., 0]


def transverse_distance(dc, omega_k):
    r"""D_M / D_H from D_C / D_H: ``dc * S(omega_k dc^2)`` with S the sinh/sin ratio.

    ``S(q) = sinh(sqrt q)/sqrt q`` (q > 0), ``sin(sqrt -q)/sqrt -q`` (q < 0), its series
    ``1 + q/6 + q^2/120`` near 0 (smooth and differentiable through omega_k = 0)."""
    q = omega_k * dc**2
    small = jnp.abs(q) < 1e-4
    qs = jnp.where(small, 1.0, q)
    r = jnp.sqrt(jnp.abs(qs))
    big = jnp.where(qs > 0, jnp.sinh(r) / r, jnp.sin(r) / r)
    return dc * jnp.where(small, 1.0 + q / 6.0 + q * q / 120.0, big)


def sound_horizon(h, omega_m):
    """r_d in Mpc: Aubourg et al. (2015) eq. 16 with omega_b = 0.02235, omega_nu = 0.00064."""
    omega_cb = omega_m * h**2 - OMEGA_NU_H2
    return (55.154 * np.exp(-72.3 * (OMEGA_NU_H2 + 0.0006) ** 2)
            / (omega_cb**0.25351 * OMEGA_B_H2**0.12807))


# ----------------------------------------------------------------------------- data
def _path(name: str):
    return resources.files("bayeslik.models") / "data" / "cosmology" / name


def load(datasets=("cc", "sn", "bao")) -> dict:
    """The data arrays the model takes, for the chosen ``datasets`` (any of "cc", "sn", "bao").

    Returns a dict of float64 NumPy arrays: ``cc_z, cc_h, cc_sigma``; ``sn_zcmb, sn_zhel, sn_mb,
    sn_prec`` (inverse covariance), ``sn_logdet`` (log det 2 pi C); ``bao_z, bao_value,
    bao_is_dm`` (1: D_M r_fid/r_d, 0: H r_d/r_fid), ``bao_prec``, ``bao_logdet``.
    """
    datasets = tuple(datasets)
    unknown = set(datasets) - {"cc", "sn", "bao"}
    if unknown or not datasets:
        raise ModelError(f"datasets must be a non-empty subset of ('cc', 'sn', 'bao'), got "
                         f"{datasets!r}.")
    out: dict[str, np.ndarray] = {}
    if "cc" in datasets:
        with _path("HDiagramCompilacion-data_31.txt").open() as f:
            z, H, s = np.loadtxt(f, unpack=True)
        out.update(cc_z=z, cc_h=H, cc_sigma=s)
    if "sn" in datasets:
        with _path("binned_pantheon.txt").open() as f:
            zcmb, zhel, mb, dmb = np.loadtxt(f, usecols=(1, 2, 4, 5), unpack=True)
        with _path("binned_cov_pantheon.txt").open() as f:
            sys_cov = np.loadtxt(f, skiprows=1).reshape(len(mb), len(mb))
        cov = sys_cov + np.diag(dmb**2)
        sign, logdet = np.linalg.slogdet(2 * np.pi * cov)
        out.update(sn_zcmb=zcmb, sn_zhel=zhel, sn_mb=mb, sn_prec=np.linalg.inv(cov),
                   sn_logdet=np.array(logdet))
    if "bao" in datasets:
        with _path("sdss_DR12Consensus_bao.dat").open() as f:
            rows = [line.split() for line in f if line.strip() and not line.startswith("#")]
        z = np.array([float(r[0]) for r in rows])
        val = np.array([float(r[1]) for r in rows])
        is_dm = np.array([r[2] == "DM_over_rs" for r in rows], float)
        with _path("BAO_consensus_covtot_dM_Hz.txt").open() as f:
            cov = np.loadtxt(f)
        sign, logdet = np.linalg.slogdet(2 * np.pi * cov)
        out.update(bao_z=z, bao_value=val, bao_is_dm=is_dm, bao_prec=np.linalg.inv(cov),
                   bao_logdet=np.array(logdet))
    return out


# ----------------------------------------------------------------------------- the model
def _params(kind: str):
    if kind not in KINDS:
        raise ModelError(f"unknown cosmology kind {kind!r}; the kinds are {KINDS}.")
    names = ["h", "omega_m"]
    if kind in ("olcdm", "owcdm"):
        names.append("omega_k")
    if kind in ("wcdm", "owcdm"):
        names.append("w")
    if kind == "w0wacdm":
        names += ["w0", "wa"]
    return names


def model(kind="lcdm", cc_z=None, cc_h=None, cc_sigma=None, sn_zcmb=None, sn_zhel=None,
          sn_mb=None, sn_prec=None, sn_logdet=None, bao_z=None, bao_value=None, bao_is_dm=None,
          bao_prec=None, bao_logdet=None, num_nodes=32):
    """The background-cosmology likelihood for ``kind`` in KINDS, with the data given (see
    :func:`load`); datasets whose arrays are None are left out."""
    names = _params(kind)
    if cc_z is None and bao_z is None:
        # SNe alone do not see H0: it is absorbed with M_B in the marginalised offset
        names = [n for n in names if n != "h"]
    p = {n: numpyro.sample(n, dist.Uniform(*PRIORS[n])) for n in names}
    h, om = p.get("h", SN_ONLY_H), p["omega_m"]
    ok = p.get("omega_k", 0.0)
    w0 = p.get("w", p.get("w0", -1.0))
    wa = p.get("wa", 0.0)
    orad = OMEGA_R_H2 / h**2
    dh = C_KM_S / (100.0 * h)
    zs = [a for a in (cc_z, sn_zcmb, bao_z) if a is not None]
    # a bounce (E^2 <= 0) anywhere up to the largest redshift: zero likelihood
    zmax = jnp.max(jnp.concatenate([jnp.ravel(a) for a in zs]))
    grid = jnp.linspace(0.0, 1.0, 64) * zmax
    e_grid = hubble_rate(grid, om, ok, w0, wa, orad)
    valid = jnp.all(jnp.isfinite(e_grid) & (e_grid > 0))
    numpyro.factor("physical", jnp.where(valid, 0.0, -jnp.inf))

    def safe(x):  # keep NaN out of the gradients where the likelihood is zero anyway
        return jnp.where(valid, x, 1.0)

    if cc_z is not None:
        H = 100.0 * h * safe(hubble_rate(cc_z, om, ok, w0, wa, orad))
        with numpyro.plate("cc", cc_z.shape[0]):
            numpyro.sample("cc_H", dist.Normal(H, cc_sigma), obs=cc_h)
    if sn_zcmb is not None:
        dc = safe(comoving_distance(sn_zcmb, om, ok, w0, wa, orad, num_nodes=num_nodes))
        dl = (1.0 + sn_zhel) * dh * transverse_distance(dc, ok)
        r = sn_mb - (5.0 * jnp.log10(dl) + 25.0)
        # centre the residuals first: chi2 - B^2/A is invariant under r -> r - c, and without
        # it (r ~ M_B ~ -19) the two terms cancel to 7 digits, which float32 cannot afford
        c = jnp.mean(r)
        r = r - c
        pr1 = sn_prec.sum(0)
        A = pr1.sum()
        B = pr1 @ r
        chi2 = r @ sn_prec @ r
        lo, hi = M_B_RANGE
        mhat = B / A + c
        sa = jnp.sqrt(A)
        mass = jnp.log(jnp.clip(ndtr(sa * (hi - mhat)) - ndtr(sa * (lo - mhat)), 1e-300))
        ll = (-0.5 * (chi2 - B * B / A) - 0.5 * sn_logdet + 0.5 * jnp.log(2 * jnp.pi / A)
              + mass - jnp.log(hi - lo))
        numpyro.factor("sn", ll)
    if bao_z is not None:
        rd = sound_horizon(h, om)
        dm = dh * transverse_distance(
            safe(comoving_distance(bao_z, om, ok, w0, wa, orad, num_nodes=num_nodes)), ok)
        Hz = 100.0 * h * safe(hubble_rate(bao_z, om, ok, w0, wa, orad))
        pred = jnp.where(bao_is_dm > 0, dm * RD_FID / rd, Hz * rd / RD_FID)
        r = bao_value - pred
        numpyro.factor("bao", -0.5 * (r @ bao_prec @ r) - 0.5 * bao_logdet)


def example() -> tuple:
    """The command line's default: ``(model, data)`` for flat LCDM on the bundled cosmic
    chronometers, Pantheon supernovae and BAO (``bayeslik fit cosmology``)."""
    return model, {"kind": "lcdm", "num_nodes": 32, **load(("cc", "sn", "bao"))}


def posterior(kind: str = "lcdm", datasets=("cc", "sn", "bao"), num_nodes: int = 32):
    """A bayeslik.Posterior of ``kind`` (one of KINDS) on ``datasets``."""
    from bayeslik.posterior import Posterior

    _params(kind)
    data = load(datasets)
    return Posterior(model, kind=kind, num_nodes=num_nodes, **data)

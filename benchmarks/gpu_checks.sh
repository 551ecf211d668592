#!/usr/bin/env bash
# The GPU figures of the benchmarks, in one run on a lent GPU machine (no network there: the
# packages its image lacks travel as wheels in .whl/, see docs). Writes CSVs and logs to $OUT.
#   bash benchmarks/gpu_checks.sh            (on the GPU machine, from the repo root)
#   SECTIONS="hmm pytest" bash benchmarks/gpu_checks.sh     (a subset: hmm pf nss pytest)
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target /tmp/site . || exit 1
  export PYTHONPATH=/tmp/site
  # the tests import the repo's bayeslik/ (pytest puts the root first on sys.path), whose
  # bayeslik.models is the top-level models/ only once installed: link it in this throwaway copy
  [ -e bayeslik/models ] || ln -s ../models bayeslik/models
fi
SECTIONS=${SECTIONS:-"hmm pf nss pytest"}
on() { [[ " $SECTIONS " == *" $1 "* ]]; }
nvidia-smi -L
python3 -c "import jax, numpyro, blackjax, arviz; print('jax', jax.__version__, jax.devices(), 'numpyro', numpyro.__version__, 'blackjax', blackjax.__version__)"
echo "== HMM forward: bayeslik vs dynamax"
on hmm && timeout 120 python3 benchmarks/hmm_filter.py --T 1e3 1e4 1e5 1e6 1e7 --sequential-max-T 1e4 --repeats 3 --out "$OUT/hmm_filter_gpu.csv" 2>&1 | tee "$OUT/hmm_filter_gpu.log"
echo "== particle filter throughput (incl. N=1e6, T=1000)"
on pf && timeout 100 python3 benchmarks/particle_filter.py --no-particles --gpu-case --error-reps 5 --out "$OUT/particle_filter_gpu.csv" 2>&1 | tee "$OUT/particle_filter_gpu.log"
echo "== nss on the exactness suite"
on nss && timeout 170 python3 benchmarks/nested_suite.py --methods nss --problems gaussian_shells_2d,correlated_gaussian_3d,loggamma_2d,eggbox,gaussian_shells_5d,loggamma_10d --out "$OUT/nested_suite_nss_gpu.csv" 2>&1 | tee "$OUT/nss_gpu.log"
echo "== GPU correctness: filtering and nss tests"
on pytest && XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 170 python3 -m pytest -q -p no:cacheprovider tests/filtering tests/engines/test_nss.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15

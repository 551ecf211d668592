"""The ``bayeslik`` command: exit codes scripts can trust, clear messages, files written."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import bayeslik as bl
from bayeslik.cli import main

SMALL = ["--set", "num_warmup=100", "--set", "num_samples=100", "--set", "num_chains=1",
         "--set", "progress_bar=false"]


def test_models_lists_the_zoo(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "normal_mean" in out and "eight_schools" in out


def test_every_family_example_builds_a_posterior():
    """Each model family in the zoo loads its default problem into a Posterior with latents."""
    import bayeslik as bl
    from bayeslik.cli import FAMILIES, _bundled

    zoo = _bundled()
    assert {"arhmm", "cosmology"} <= set(zoo)
    for name in FAMILIES:
        if name not in zoo:  # a family whose module is not installed
            continue
        model, data, _ = zoo[name][1]()
        post = bl.Posterior(model, **data)
        assert post.ndim > 0, name


def test_unknown_model_is_a_usage_error(capsys):
    assert main(["fit", "no_such_model"]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err


def test_unknown_engine_and_option_are_bayeslik_errors(capsys):
    assert main(["fit", "normal_mean", "--engine", "nutz"]) == 1
    assert "unknown engine 'nutz'" in capsys.readouterr().err
    assert main(["fit", "normal_mean", "--set", "num_sample=3"]) == 1
    assert "no option(s) ['num_sample']" in capsys.readouterr().err


def test_fit_with_replaced_data_and_saved_fit(tmp_path, capsys):
    import bayeslik as bl

    y = np.full(20, 3.0)
    np.savez(tmp_path / "d.npz", y=y)
    out = tmp_path / "fit.nc"
    assert main(["fit", "normal_mean", "--data", str(tmp_path / "d.npz"), "--out", str(out)]
                + SMALL) == 0
    mu = bl.load_fit(str(out)).draws("mu")
    assert abs(mu.mean() - 3.0) < 0.2  # the data in the file, not the bundled data, were fitted


@pytest.mark.parametrize("content, why", [
    ("not json", "cannot be read"),
    (json.dumps([1, 2]), "must hold an object"),
    (json.dumps({"z": [1.0]}), "does not take"),
])
def test_bad_data_files_are_usage_errors(tmp_path, capsys, content, why):
    path = tmp_path / "d.json"
    path.write_text(content)
    assert main(["fit", "normal_mean", "--data", str(path)]) == 2
    assert why in capsys.readouterr().err
    assert main(["fit", "normal_mean", "--data", str(tmp_path / "missing.npz")]) == 2


def test_compare_writes_table_figures_and_fits(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "normal_mean", "--engines", "nuts", "--out", str(out), "--quiet",
                 "--set", "nuts.num_warmup=100", "--set", "nuts.num_samples=100"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "cost.png", "evidence.png", "marginals.png", "nuts_seed0.nc", "table.csv"]
    import pandas as pd

    t = pd.read_csv(out / "table.csv")
    assert t.loc[0, "status"] == "ok" and t.loc[0, "mean_err_max"] < 0.5


def test_compare_rejects_options_without_an_engine(capsys):
    assert main(["compare", "normal_mean", "--engines", "nuts", "--set", "num_samples=5"]) == 2
    assert "ENGINE.OPTION=VALUE" in capsys.readouterr().err


def test_demo_quick_writes_both_parts(tmp_path, capsys):
    """The README's main job at its smallest size: every engine on the reference problem, then
    the C-MAPSS AR-HMM and the degradation-path model (NUTS), and the RUL table of both beside
    the linear baseline."""
    import pandas as pd

    out = tmp_path / "demo"
    code = main(["demo", "--quick", "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    ref = pd.read_csv(out / "reference" / "table.csv")
    assert (ref["status"] == "ok").all() and "nuts" in set(ref["engine"])
    # exact log evidence known: every engine that estimates it is within 1 nat here
    ev = ref.dropna(subset=["log_evidence"])
    assert len(ev) >= 1 and (ev["log_evidence_error"].abs() < 1.0).all(), ev
    rul = pd.read_csv(out / "cmapss" / "rul.csv").set_index("method")
    assert set(rul.index) == {"linear baseline", "AR-HMM (nuts)", "degradation path (nuts)"}
    assert (rul["num_units"] == 100).all()
    metrics = ["rmse", "phm08", "coverage_50", "coverage_80", "coverage_90", "coverage_95",
               "width_90"]
    assert np.isfinite(rul[metrics].to_numpy(float)).all(), rul
    assert ((rul[metrics[2:6]] >= 0) & (rul[metrics[2:6]] <= 1)).all().all(), rul
    # the table is rul_metrics of the per-engine predictions written beside it
    from bayeslik.models import cmapss

    pred = pd.read_csv(out / "cmapss" / "rul_predictions.csv")
    again = cmapss.rul_metrics(pred)
    assert np.allclose(again.loc[rul.index, "rmse"], rul["rmse"], atol=0.006)
    d = cmapss.load()
    deg = pred[pred["method"] == "degradation path (nuts)"].sort_values("unit")
    assert (deg["unit"].to_numpy() == np.arange(1, 101)).all()
    assert (deg["true_rul"].to_numpy() == d["rul"]).all()  # rows map back to their test engine
    assert (deg["q05"] <= deg["median"]).all() and (deg["median"] <= deg["q95"]).all()
    # the fit's facts (status, R-hat, flags) are written and shown
    facts = pd.read_csv(out / "cmapss_degradation" / "table.csv")
    assert list(facts["status"]) == ["ok"] and facts["train_units"].iloc[0] >= 1
    assert "== 3. C-MAPSS FD001: hierarchical degradation-path model" in captured.out
    assert (out / "cmapss" / "rul.png").exists()


def test_command_line_runs_use_one_cpu_device_per_core():
    # a fresh process (JAX not started): one CPU device per core, so NUTS chains run side by
    # side; the user's XLA_FLAGS device count is left alone
    code = ("import bayeslik as bl; n = bl.use_cpu_cores(); import jax; "
            "print(n, len(jax.devices('cpu')))")
    cores = min(len(os.sched_getaffinity(0)), 8)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert out == ([str(cores), str(cores)] if cores >= 2 else ["0", "1"])
    flags = "--xla_force_host_platform_device_count=3"
    out = subprocess.run([sys.executable, "-c", code],
                         env=dict(env, JAX_PLATFORMS="cpu", XLA_FLAGS=flags),
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert out == ["0", "3"]
    # in-process, once JAX is running, it changes nothing
    jax.numpy.ones(1).block_until_ready()
    before = len(jax.devices("cpu"))
    assert bl.use_cpu_cores() == 0
    assert len(jax.devices("cpu")) == before


def test_demo_rejects_an_unknown_cmapss_engine(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--cmapss-engines", "nuts", "hmc"])
    assert e.value.code == 2 and "invalid choice: 'hmc'" in capsys.readouterr().err


@pytest.mark.parametrize("target, why", [
    ("missing/fit.nc", "does not exist"),
    ("", "is a directory"),
])
def test_bad_out_is_refused_before_the_run(tmp_path, capsys, monkeypatch, target, why):
    def no_run(*a, **k):
        raise AssertionError("bl.fit ran although --out was unusable")

    monkeypatch.setattr(bl, "fit", no_run)
    assert main(["fit", "normal_mean", "--out", str(tmp_path / target)] + SMALL) == 2
    assert why in capsys.readouterr().err


def test_out_that_is_a_file_is_refused_for_compare(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bl, "compare", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("bl.compare ran although --out was unusable")))
    (tmp_path / "taken").write_text("x")
    assert main(["compare", "normal_mean", "--engines", "nuts", "--out",
                 str(tmp_path / "taken")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_save_that_fails_after_the_run_keeps_the_fit(tmp_path, capsys, monkeypatch):
    from bayeslik.fit import Fit

    real = Fit.save
    calls = []

    def failing_once(self, path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(self, path)

    monkeypatch.setattr(Fit, "save", failing_once)
    assert main(["fit", "normal_mean", "--out", str(tmp_path / "fit.nc")] + SMALL) == 1
    err = capsys.readouterr().err
    assert "No space left" in err and "saved at" in err
    rescue = calls[1]
    assert bl.load_fit(rescue).draws("mu").size == 100
    os.remove(rescue)


# ------------------------------------------------------------------ a user's program (issue 18)
USER_MODEL = '''
import numpyro
import numpyro.distributions as dist


def model(y, scale=1.0):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, scale), obs=y)


def helper():
    return 1
'''


@pytest.fixture
def user_files(tmp_path):
    """A model file, its data as CSV (y: 20 values, mean 3) and a JSON setting scale=0.5."""
    (tmp_path / "my_model.py").write_text(USER_MODEL)
    y = 3.0 + np.linspace(-1.0, 1.0, 20)
    (tmp_path / "d.csv").write_text("y\n" + "\n".join(f"{v:.6f}" for v in y) + "\n")
    (tmp_path / "s.json").write_text(json.dumps({"scale": 0.5}))
    return tmp_path, y


def test_fit_a_users_model_file(user_files, capsys, monkeypatch):
    """`bayeslik fit file.py:model --data d.csv --data s.json`: the columns and the JSON entries
    are the model's keyword arguments; --quiet turns the bar off, --log-likelihood no leaves the
    group out; an engine's partial (interrupted) fit is still saved, with exit code 130."""
    import dataclasses

    tmp, y = user_files
    out = tmp / "fit.nc"
    argv = ["fit", f"{tmp / 'my_model.py'}:model", "--data", str(tmp / "d.csv"),
            "--data", str(tmp / "s.json")]
    small = ["--set", "num_warmup=100", "--set", "num_samples=100", "--set", "num_chains=1"]
    code = main(argv + ["--quiet", "--log-likelihood", "no", "--out", str(out)] + small)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "saved" in captured.out and "it/s" not in captured.err  # no progress bar
    fit = bl.load_fit(str(out))
    assert fit.config["progress_bar"] is False and "log_likelihood" not in fit.idata.children
    mu = fit.draws("mu")
    # exact posterior: N(sum(y) / (n + scale^2 / 100), scale^2 / (n + scale^2 / 100)), scale 0.5
    prec = len(y) + 0.25 / 100
    assert abs(mu.mean() - y.sum() / prec) < 0.06  # sd 0.11 / sqrt(ESS ~ 40): 3.5 MC errors
    assert 0.08 < mu.std() < 0.15  # 0.112 with scale=0.5 from the JSON; 0.224 with the default

    partial = dataclasses.replace(fit, flags=("interrupted: kept 50 of 100 draws per chain",))
    monkeypatch.setattr(bl, "fit", lambda *a, **k: partial)
    assert main(argv + ["--out", str(tmp / "partial.nc")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert bl.load_fit(str(tmp / "partial.nc")).flags == partial.flags


def test_sigterm_is_ctrl_c_while_a_command_runs(monkeypatch, capsys):
    """In-process: SIGTERM during the run is KeyboardInterrupt (exit 130, said so); an engine's
    own interrupt message (what it kept, how to keep more) is printed; the previous SIGTERM
    handler is back afterwards."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are set in the main thread only")
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(bl, "fit", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    assert main(["fit", "normal_mean"]) == 130
    assert capsys.readouterr().err == "bayeslik: interrupted (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) is before

    def kept_nothing(*a, **k):
        raise KeyboardInterrupt("SMC was interrupted in run 1 of 1 at stage 3; use num_runs")

    monkeypatch.setattr(bl, "fit", kept_nothing)
    assert main(["fit", "normal_mean"]) == 130
    assert capsys.readouterr().err == ("bayeslik: interrupted: SMC was interrupted in run 1 of 1 "
                                       "at stage 3; use num_runs\n")


def test_sigterm_stops_the_demo_before_its_next_part(monkeypatch, capsys, tmp_path):
    """bl.compare absorbs the interrupt (it keeps its finished runs): the demo writes part 1 and
    then stops with 130 instead of going on to the C-MAPSS parts."""
    import signal
    import threading

    from bayeslik.models import cmapss

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are set in the main thread only")
    saved = []

    class Kept:
        def save(self, path):
            saved.append(path)

        def __repr__(self):
            return "the finished runs"

    def compare(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)   # delivered here; compare keeps what it has
        return Kept()

    def interrupting_compare(*a, **k):
        try:
            return compare(*a, **k)
        except KeyboardInterrupt:
            return Kept()

    monkeypatch.setattr(bl, "compare", interrupting_compare)
    monkeypatch.setattr(cmapss, "load", lambda *a, **k: pytest.fail("part 2 ran"))
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path)]) == 130
    captured = capsys.readouterr()
    assert "the finished runs" in captured.out and saved
    assert captured.err.endswith("bayeslik: interrupted (SIGTERM)\n")
    assert main(["fit", "normal_mean"] + SMALL) == 0          # the next command starts afresh


def test_sigterm_saves_the_partial_fit_as_ctrl_c_does(user_files):
    """`bayeslik fit ... --engine smc --out x.nc` sent SIGTERM (what `timeout` sends) after two
    of its runs finished: the engine keeps the completed runs as on Ctrl-C, the CLI prints and
    saves that partial Fit with its "interrupted" flag and exits 130. SMC's bar redraws at every
    stage (its postfix), so the test reads from stderr which run is in progress."""
    import re
    import signal
    import threading
    import time

    tmp, _ = user_files
    out = tmp / "partial.nc"
    cmd = [sys.executable, "-m", "bayeslik.cli", "fit", f"{tmp / 'my_model.py'}:model",
           "--data", str(tmp / "d.csv"), "--data", str(tmp / "s.json"), "--engine", "smc",
           "--set", "num_runs=5000", "--set", "num_particles=64", "--out", str(out)]
    env = dict(os.environ, BAYESLIK_PROGRESS="text", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    seen: list[bytes] = []

    def drain():  # read stderr while the child runs, so its writes never block
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            seen.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    try:
        while b"run 3/5000" not in b"".join(seen):  # runs 1 and 2 reached lambda = 1
            assert proc.poll() is None, b"".join(seen).decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "the SMC run did not reach its third run"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)             # its stdout (the Fit's summary) fits in the pipe
        stdout = proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
    err = b"".join(seen).decode(errors="replace")
    assert proc.returncode == 130, (stdout, err[-2000:])
    assert f"saved {out}" in stdout
    assert "interrupted; the engine kept a partial fit" in err
    fit = bl.load_fit(str(out))
    (flag,) = [f for f in fit.flags if f.startswith("interrupted")]
    kept = int(re.match(r"interrupted: kept (\d+) of 5000 completed runs", flag).group(1))
    assert 2 <= kept < 5000 and fit.num_chains == kept  # one chain per completed run
    assert np.isfinite(fit.log_evidence)


def test_a_users_model_file_is_checked_before_the_run(user_files, capsys, monkeypatch):
    """A missing file or name, data that does not match the signature, a file that raises: one
    line naming them, nothing run."""
    monkeypatch.setattr(bl, "fit", lambda *a, **k: pytest.fail("bl.fit ran"))
    tmp, _ = user_files
    f = tmp / "my_model.py"
    (tmp / "bad.csv").write_text("y,z\n1.0,2.0\n")
    (tmp / "text.csv").write_text("y\nabc\n")
    (tmp / "broken.py").write_text("x = 1\nraise RuntimeError('no GPU here')\n")

    def err(argv, code):
        assert main(argv) == code
        e = capsys.readouterr().err
        assert e.count("\n") == 1, e  # one line
        return e

    e = err(["fit", f"{tmp / 'nothere.py'}:model"], 2)
    assert "nothere.py" in e and "no such file" in e
    e = err(["fit", f"{f}:modle", "--data", str(tmp / "d.csv")], 2)
    assert "'modle'" in e and "my_model.py" in e and "['helper', 'model']" in e
    e = err(["compare", f"{f}:modle"], 2)  # the other commands load it the same way
    assert "['helper', 'model']" in e
    e = err(["fit", f"{f}:model", "--data", str(tmp / "bad.csv")], 2)
    assert "['z'], which it does not take" in e
    e = err(["fit", str(f)], 2)  # file.py alone: its `model`; y not given
    assert "it needs ['y']" in e
    e = err(["fit", f"{f}:model", "--data", str(tmp / "text.csv")], 2)
    assert "['y'] are not numbers" in e
    e = err(["fit", f"{tmp / 'broken.py'}:model"], 1)
    assert "ModelError" in e and "RuntimeError (line 2): no GPU here" in e


def test_version_options_and_exit_codes(capsys, monkeypatch):
    """--version; --quiet and --log-likelihood reach bl.fit; Ctrl-C is exit 130; a bayeslik
    error is one line and exit 1."""
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"bayeslik {bl.__version__}\n"
    seen = {}

    def record(post, engine, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(bl, "fit", record)
    assert main(["fit", "normal_mean"]) == 130
    assert capsys.readouterr().err == "bayeslik: interrupted\n"
    assert seen["log_likelihood"] == "auto" and "progress_bar" not in seen
    assert main(["fit", "normal_mean", "--quiet", "--log-likelihood", "yes"]) == 130
    assert seen["log_likelihood"] is True and seen["progress_bar"] is False
    assert main(["fit", "normal_mean", "--log-likelihood", "no"]) == 130
    assert seen["log_likelihood"] is False
    capsys.readouterr()

    def refuse(*a, **k):
        raise bl.DataError("argument 'y' is bad.\nFix it.")

    monkeypatch.setattr(bl, "fit", refuse)
    assert main(["fit", "normal_mean"]) == 1
    assert capsys.readouterr().err == "bayeslik: DataError: argument 'y' is bad. Fix it.\n"


def test_help_is_quick_and_imports_nothing_heavy(tmp_path):
    """`bayeslik --help` (and `fit --help`, `--version`) imports no JAX, NumPyro, ArviZ, xarray
    or model and takes well under a second of CPU: the package's names load on first use
    (PEP 562), so the real package is imported here."""
    code = (
        "import sys, time\n"
        "t = time.process_time()\n"
        "from bayeslik import cli\n"
        "for argv in (['--help'], ['fit', '--help'], ['--version']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (argv, e.code)\n"
        "heavy = [m for m in ('jax', 'numpyro', 'arviz', 'xarray', 'bayeslik.models')\n"
        "         if m in sys.modules]\n"
        "print(repr((time.process_time() - t, heavy)), file=sys.stderr)\n")
    pkg = os.path.dirname(bl.__file__)
    r = subprocess.run([sys.executable, "-c", code, pkg], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    seconds, heavy = ast.literal_eval(r.stderr.splitlines()[-1])
    assert heavy == [] and seconds < 1.0, (seconds, heavy)
    assert "usage: bayeslik" in r.stdout and "path/file.py:NAME" in r.stdout

"""Progress bars (bayeslik.progress) and the bounded Fit repr.

One factory for every bar (engines through kit.Run.progress, bl.compare, dynesty's print_func),
one switch (BAYESLIK_PROGRESS), no TqdmWarning when bayeslik is imported in a Jupyter kernel
without ipywidgets, a text bar that redraws one display line in a kernel, an ETA without the
compile, and a repr of a 500-parameter Fit that shows 20 rows and says how many there are.
"""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
import textwrap
import types
import warnings

import numpy as np
import pytest
import tqdm.notebook
import tqdm.std

import bayeslik as bl
from bayeslik import progress
from bayeslik.engines import kit, nested
from bayeslik.errors import EngineError, OptionError


def _model(y):
    import numpyro
    import numpyro.distributions as dist

    mu = numpyro.sample("mu", dist.Normal(0.0, 3.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


@pytest.fixture(scope="module")
def post():
    return bl.Posterior(_model, y=np.array([0.1, -0.3, 0.5]))


@pytest.fixture
def made(monkeypatch):
    """Every bar progress.bar makes, in order (the engines' and compare's alike)."""
    bars = []
    real = progress.bar

    def recording(**kwargs):
        b = real(**kwargs)
        bars.append(b)
        return b

    monkeypatch.setattr(progress, "bar", recording)
    return bars


@dataclasses.dataclass(frozen=True)
class _BarConfig:
    progress_bar: bool = True


def _bar_engine(posterior, rng_key, config):
    """A test engine: one bar through kit.Run.progress, three steps, then an EngineError (which
    bl.compare reports as a row, so no Fit is needed)."""
    run = kit.Run("bar_engine", posterior, config)
    bar = run.progress(total=3, desc="bar_engine", mininterval=0)
    with run.interruptible(bar):
        bar.update(1)
        bar.update(2)
    raise EngineError("bar_engine: done")


@pytest.fixture
def bar_engine():
    from bayeslik.api import unregister_engine

    bl.register_engine("test_bar_engine", _BarConfig, _bar_engine, "progress-bar test engine")
    yield "test_bar_engine"
    unregister_engine("test_bar_engine")


def _compare(post, engine):
    return bl.compare(post, [engine], engine_options={engine: {"progress_bar": True}},
                      progress_bar=True)


class _Result(types.SimpleNamespace):
    pass


class _FakeSampler:
    """Stands in for a dynesty sampler: run_nested calls print_func as dynesty does."""

    def __init__(self):
        self.kwargs = None

    def run_nested(self, **kwargs):
        self.kwargs = kwargs
        if kwargs["print_progress"]:
            for it in range(1, 6):
                res = _Result(loglstar=-1.0 / it, logz=-2.0, delta_logz=1.0 / it, logzvar=0.01,
                              bounditer=0, nc=1, eff=50.0)
                kwargs["print_func"](res, it, 10 * it, dlogz=0.01)


def _dynesty(post, config):
    sampler = _FakeSampler()
    run = kit.Run("nested", post, config)
    nested._run_nested(run, types.SimpleNamespace(sampler=sampler, live=None), config,
                       None, False)
    return sampler


# ------------------------------------------------------------------ the switch
def test_off_disables_every_bar(monkeypatch, capfd, post, made, bar_engine):
    monkeypatch.setenv(progress.ENV, "off")
    assert progress.bar(total=3).disable
    assert kit.Run("x", post, _BarConfig(progress_bar=True)).progress(total=3).disable
    made.clear()
    table = _compare(post, bar_engine).table
    assert table["status"].str.contains("bar_engine: done").all()
    sampler = _dynesty(post, nested.NestedConfig(num_live=20, progress_bar=True))
    assert sampler.kwargs["print_progress"] is False
    # compare's bar, the engine's bar (through kit.Run.progress) and dynesty's
    assert len(made) == 3 and all(b.disable for b in made)
    err = capfd.readouterr().err
    assert "compare" not in err and "bar_engine" not in err and "dynesty" not in err


def test_text_gives_a_tqdm_std_bar_everywhere(monkeypatch, capfd, post, made, bar_engine):
    monkeypatch.setenv(progress.ENV, "TEXT")
    _compare(post, bar_engine)
    sampler = _dynesty(post, nested.NestedConfig(num_live=20, progress_bar=True))
    assert sampler.kwargs["print_progress"] is True
    assert len(made) == 3
    for b in made:
        assert isinstance(b, tqdm.std.tqdm) and not isinstance(b, tqdm.notebook.tqdm)
        assert isinstance(b, progress.TextBar)
    assert [b.n for b in made] == [1, 3, 5]  # compare: one fit; the engine: 3 its; dynesty: 5
    err = capfd.readouterr().err
    assert "compare" in err and "bar_engine" in err and "dynesty" in err
    # progress_bar=False still turns a bar off
    assert kit.Run("x", post, _BarConfig(progress_bar=False)).progress(total=3).disable


def test_bad_values_are_option_errors(monkeypatch):
    monkeypatch.setenv(progress.ENV, "fancy")
    with pytest.raises(OptionError, match="BAYESLIK_PROGRESS='fancy'.*auto, text, notebook, off"):
        progress.bar(total=1)
    monkeypatch.setenv(progress.ENV, "notebook")
    monkeypatch.setattr(progress, "_has_widgets", lambda: False)
    with pytest.raises(OptionError, match="needs ipywidgets"):
        progress.bar(total=1)
    monkeypatch.setenv(progress.ENV, "")
    assert progress.mode() == "auto"


def test_auto_chooses_by_kernel_and_widgets(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    for in_kernel, widgets, expected in [(False, False, "text"), (False, True, "text"),
                                         (True, False, "text"), (True, True, "notebook")]:
        monkeypatch.setattr(progress, "_in_kernel", lambda v=in_kernel: v)
        monkeypatch.setattr(progress, "_has_widgets", lambda v=widgets: v)
        assert progress.kind() == expected, (in_kernel, widgets)


# ------------------------------------------------------------------ rendering in a notebook
def test_text_bar_in_a_kernel_redraws_one_display_line(monkeypatch, capfd):
    """In a kernel without ipywidgets (auto picks the text bar there): no stderr; one display
    output, updated in place; its last state is the finished bar."""
    import IPython.display

    shown = []

    class Handle:
        def update(self, data, raw):
            shown.append(("update", data["text/plain"]))

    def display(data, raw, display_id):
        assert raw and display_id
        shown.append(("display", data["text/plain"]))
        return Handle()

    monkeypatch.setattr(IPython.display, "display", display)
    monkeypatch.setattr(progress, "_in_kernel", lambda: True)
    monkeypatch.setattr(progress, "_has_widgets", lambda: False)  # the test extra has ipywidgets
    monkeypatch.setenv(progress.ENV, "auto")
    b = progress.bar(total=5, desc="NUTS m", mininterval=0)
    for _ in range(5):
        b.update()
    b.close()
    assert capfd.readouterr().err == ""
    assert [kind for kind, _ in shown].count("display") == 1 and shown[0][0] == "display"
    assert shown[0][1].startswith("NUTS m (compiling)")
    final = shown[-1][1]
    assert final.startswith("NUTS m: 100%") and "5/5" in final and "\r" not in final
    assert "\n" not in final and "█" in final  # unicode blocks: the line says it takes utf-8


# ------------------------------------------------------------------ the ETA leaves the compile out
def test_rate_and_eta_count_from_the_first_step(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
    monkeypatch.setenv(progress.ENV, "text")
    b = progress.bar(total=100, desc="NUTS m", mininterval=0, smoothing=0, file=io.StringIO())
    assert b.desc == "NUTS m (compiling)"
    clock[0] += 30.0            # 30 s compiling, then the first chunk of 10 returns
    b.update(10)
    assert b.desc == "NUTS m" and b.format_dict["rate"] is None
    clock[0] += 2.0             # 20 more in 2 s: 10 it/s, so 70 left take 7 s
    b.update(20)
    assert b.format_dict["rate"] == pytest.approx(10.0)
    assert "00:07" in str(b) and "00:32<" in str(b)  # elapsed keeps the compile, the ETA not
    b.close()
    plain = progress.bar(total=100, compiling=False, mininterval=0, smoothing=0,
                         file=io.StringIO())
    assert "compiling" not in str(plain)
    plain.close()


# ------------------------------------------------------------------ alive through a compile; phases
def _tick_threads():
    import threading

    return [t for t in threading.enumerate() if t.name == "bayeslik-progress-tick" and t.is_alive()]


def _ticks(before, want, timeout=10.0):
    """The tick threads started since ``before`` (a set of threads), waiting up to ``timeout``
    seconds for their number to become ``want`` (a stopped thread ends within one tick, and
    on a busy machine the scheduler may take longer: threads of other tests' bars in the same
    worker are not this test's)."""
    import time

    end = time.monotonic() + timeout
    while True:
        mine = [t for t in _tick_threads() if t not in before]
        if len(mine) == want or time.monotonic() > end:
            return len(mine)
        time.sleep(0.02)


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_compiling_bar_redraws_itself_and_then_names_its_phase(monkeypatch):
    """While compiling (no step yet) a bar on a terminal is redrawn every TICK seconds by a
    thread, so its elapsed time moves; the first step stops that thread; set_phase names the
    phase after the compile; a closed or forgotten bar leaves no thread behind; a bar writing
    to a log is not redrawn."""
    import gc
    import time

    monkeypatch.setattr(progress, "TICK", 0.02)
    monkeypatch.setenv(progress.ENV, "text")
    before = set(_tick_threads())
    out = _Tty()
    b = progress.bar(total=10, desc="NUTS m", mininterval=0, file=out)
    assert _ticks(before, 1) == 1
    end = time.monotonic() + 20.0                 # 25 ticks in 0.5 s idle; a busy machine
    while out.getvalue().count("NUTS m (compiling)") < 5 and time.monotonic() < end:
        time.sleep(0.05)                          # may starve the thread for a while
    assert out.getvalue().count("NUTS m (compiling)") >= 5, out.getvalue()
    b.set_phase("warmup")                         # still compiling: the description waits
    assert b.desc == "NUTS m (compiling)"
    b.update(2)
    assert b.desc == "NUTS m warmup" and _ticks(before, 0) == 0
    drawn = out.getvalue()
    time.sleep(0.2)
    assert out.getvalue() == drawn                # no redraws without steps after the compile
    b.set_phase("sampling")
    b.update(8)
    assert "NUTS m sampling: 100%" in out.getvalue().split("\r")[-1]
    b.close()
    closed = progress.bar(total=3, file=_Tty())
    assert _ticks(before, 1) == 1
    closed.close()
    assert _ticks(before, 0) == 0
    forgotten = progress.bar(total=3, file=_Tty())
    del forgotten
    gc.collect()
    assert _ticks(before, 0) == 0
    # no thread for a bar that is off, that compiles nothing, or that writes to a log
    progress.bar(total=3, disable=True)
    progress.bar(total=3, compiling=False, file=_Tty()).close()
    log = io.StringIO()
    quiet = progress.bar(total=3, desc="NUTS m", mininterval=0, file=log)
    assert _ticks(before, 0, timeout=0.0) == 0
    time.sleep(0.1)
    assert log.getvalue().count("(compiling)") == 1
    quiet.close()
    monkeypatch.setattr(sys, "stderr", _Tty())   # the default stream: a terminal ticks
    on_stderr = progress.bar(total=3)
    assert _ticks(before, 1) == 1
    on_stderr.close()
    assert _ticks(before, 0) == 0


def test_nuts_bar_names_warmup_and_sampling(monkeypatch, capfd, post):
    monkeypatch.setenv(progress.ENV, "text")
    before = set(_tick_threads())
    bl.fit(post, "nuts", num_warmup=300, num_samples=500, num_chains=1, progress_bar=True)
    lines = capfd.readouterr().err.replace("\r", "\n").splitlines()
    phases = [name for line in lines for name in ("(compiling)", "warmup", "sampling")
              if line.startswith(f"NUTS {post.name} {name}")]
    assert phases[0] == "(compiling)" and "warmup" in phases and phases[-1] == "sampling"
    assert phases.index("sampling") > max(i for i, p in enumerate(phases) if p == "warmup")
    assert _ticks(before, 0) == 0


def test_smc_bar_shows_no_rate_eta_and_an_eta_from_finished_runs(monkeypatch, capfd, post):
    """A rate in lambda predicts nothing, so SMC's bar has no "<remaining"; from the second run
    on its postfix says "eta ~m:ss" from the runs' wall times."""
    import re

    monkeypatch.setenv(progress.ENV, "text")
    bl.fit(post, "smc", num_particles=64, num_runs=3, progress_bar=True)
    lines = [ln for ln in capfd.readouterr().err.replace("\r", "\n").splitlines()
             if ln.startswith(f"SMC {post.name}") and "run " in ln]
    assert lines
    assert not any(re.search(r"\[\d+:\d+<", ln) for ln in lines), lines
    first = [ln for ln in lines if "run 1/3" in ln]
    later = [ln for ln in lines if "run 2/3" in ln or "run 3/3" in ln]
    assert first and later
    assert not any("eta" in ln for ln in first)
    assert all(re.search(r"eta ~\d+:\d\d\]", ln) for ln in later), later


# ------------------------------------------------------------------ import in a notebook
def test_no_tqdm_warning_on_import_in_a_notebook_without_ipywidgets():
    """A subprocess that looks like a Jupyter kernel to tqdm (ipykernel.zmqshell and IPython
    imported) where ipywidgets cannot be imported: tqdm.auto warns there (the check that the
    fake is good), ``import bayeslik`` must not."""
    fake = textwrap.dedent("""
        import sys, types, warnings
        sys.modules["ipykernel.zmqshell"] = types.ModuleType("ipykernel.zmqshell")
        sys.modules["ipywidgets"] = None
        import IPython
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import {module}
            import numpyro
        print([f"{{w.category.__name__}}: {{w.message}}" for w in caught
               if w.category.__name__.startswith("Tqdm")])
    """)
    control = subprocess.run([sys.executable, "-c", fake.format(module="tqdm.auto")],
                             capture_output=True, text=True, timeout=120)
    assert "TqdmWarning: IProgress not found" in control.stdout, control.stderr
    out = subprocess.run([sys.executable, "-c", fake.format(module="bayeslik")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


# ------------------------------------------------------------------ the bounded repr
def _fake_fit(num_params=500, chains=2, draws=60, seed=0):
    import arviz_base as azb

    rng = np.random.default_rng(seed)
    fixed = np.zeros((chains, draws, 3))
    fixed[..., 2] = 1.0  # a constant entry that is not 0
    posterior = {"mu": rng.normal(size=(chains, draws)), "const": fixed,
                 "theta": rng.normal(size=(chains, draws, num_params))}
    tree = azb.from_dict({"posterior": posterior,
                          "sample_stats": {"diverging": np.zeros((chains, draws), bool)}})
    return bl.Fit(idata=tree, engine="nuts", config={}, seed=0, cost=bl.Cost(wall_s=1.0),
                  model="fake")


def test_repr_of_a_500_parameter_fit_is_bounded():
    fit = _fake_fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the constant entries make no RuntimeWarning
        text, page = repr(fit), fit._repr_html_()
    lines = text.splitlines()
    rows = [ln for ln in lines if ln.startswith(("mu ", "theta["))]
    assert [r.split()[0] for r in rows] == ["mu"] + [f"theta[{i}]" for i in range(16)]
    assert "... 484 more rows (504 in all); fit.summary() for all" in text
    assert ("constant over every draw (no diagnostics): const[0] = 0, const[1] = 0, "
            "const[2] = 1") in text
    assert len(lines) < 40
    assert page.count("<th>theta[") == 16 and "<th>theta[16]" not in page
    assert page.count("<tr") <= 20 + 12 and "484 more rows (504 in all)" in page
    # the rows shown are ArviZ's own for those entries
    assert rows[0].split() == fit.summary(var_names=["mu"]).to_string().splitlines()[1].split()


def test_repr_of_a_small_fit_has_no_more_line():
    fit = _fake_fit(num_params=3)
    text = repr(fit)
    assert "more rows" not in text and "theta[2]" in text
    assert "more rows" not in fit._repr_html_()

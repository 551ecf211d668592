"""Progress bars: the one factory behind every bar bayeslik draws.

The engines (through ``kit.Run.progress``), ``bl.compare`` and dynesty (through its
``print_func`` hook) all take their bar from :func:`bar`. The environment variable
``BAYESLIK_PROGRESS`` chooses the kind of every bar at once:

* ``auto`` (the default): the widget bar in a Jupyter kernel where ipywidgets is installed, the
  text bar everywhere else;
* ``text``: the text bar (``tqdm.std``). In a terminal it writes to stderr (at most every 5 s
  where stderr is not a terminal, e.g. a CI log). In a Jupyter kernel it redraws one display
  output in place instead of writing to stderr, so a live cell shows one moving line and a
  saved notebook keeps one line, the bar's last state;
* ``notebook``: the widget bar (``tqdm.notebook``; needs ipywidgets);
* ``off``: no bars at all, whatever ``progress_bar=`` says.

Until its first step a bar reads "(compiling)", and its rate and time left count from that
first step on: the first ETA leaves the compile out (the elapsed time does not). Meanwhile a
bar that someone watches (a terminal, a notebook's line or widget; not a log file) is redrawn
every :data:`TICK` seconds by a thread, so its elapsed time moves through a long compile and
shows the run is alive. An engine names its phase
with ``bar.set_phase(name)`` (NUTS: "warmup", then "sampling"): the description becomes
"<desc> <phase>" (after the compile, where it is still compiling).

tqdm's ``tqdm.auto`` warns (``TqdmWarning: IProgress not found``) when it is imported in a
Jupyter kernel without ipywidgets, and numpyro imports it at its top. No bayeslik bar uses
``tqdm.auto`` (:func:`bar` chooses), so importing this module imports it first, with that one
warning ignored: ``import bayeslik`` in a notebook prints nothing.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
import weakref
from typing import Any

from tqdm.std import TqdmWarning
from tqdm.std import tqdm as _std_tqdm

from bayeslik.errors import OptionError

__all__ = ["ENV", "MODES", "mode", "kind", "bar", "TextBar"]

#: the environment variable that chooses the kind of every progress bar
ENV = "BAYESLIK_PROGRESS"
#: the values it takes (case-insensitive; unset or empty is "auto")
MODES = ("auto", "text", "notebook", "off")
#: seconds between redraws of a text bar whose stream is not a terminal (a log file)
LOG_INTERVAL = 5.0
#: seconds between the redraws of a bar that is still compiling (at least its mininterval)
TICK = 1.0
#: a bar stops redrawing itself while compiling after this many seconds (one never updated
#: nor closed must not write forever)
TICK_LIMIT = 3600.0


def mode() -> str:
    """The value of ``BAYESLIK_PROGRESS``, checked: one of :data:`MODES`."""
    raw = os.environ.get(ENV, "")
    value = raw.strip().lower() or "auto"
    if value not in MODES:
        raise OptionError(f"environment variable {ENV}={raw!r}: expected one of "
                          f"{', '.join(MODES)}; unset it for the default (auto).")
    return value


def _in_kernel() -> bool:
    """Whether this is a Jupyter kernel whose front end draws rich output (notebook, lab,
    VS Code); the Qt console and Spyder count as terminals, as in ``tqdm.autonotebook``."""
    if "ipykernel" not in sys.modules:
        return False
    if any(k == "QT_API" or k.startswith("SPYDER") for k in os.environ):
        return False
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if hasattr(ipython, "get_ipython") else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def _has_widgets() -> bool:
    """Whether tqdm's widget bar can be drawn (ipywidgets importable)."""
    try:
        from tqdm.notebook import IProgress
    except Exception:  # no IPython, or a broken ipywidgets
        return False
    return IProgress is not None


def kind() -> str:
    """The kind of bar :func:`bar` makes now: ``"off"``, ``"text"`` or ``"notebook"``."""
    m = mode()
    if m == "notebook" and not _has_widgets():
        raise OptionError(f"environment variable {ENV}=notebook needs ipywidgets, which is not "
                          f"installed: pip install ipywidgets, or set {ENV}=text (or auto).")
    if m == "auto":
        return "notebook" if _in_kernel() and _has_widgets() else "text"
    return m


def _tick(ref: "weakref.ReferenceType", stop: threading.Event, interval: float) -> None:
    """The redraws of a compiling bar (a weak reference: a forgotten bar is not kept alive)."""
    t0 = time.monotonic()
    while not stop.wait(interval) and time.monotonic() - t0 < TICK_LIMIT:
        bar = ref()
        if bar is None or not bar._pending or bar.disable:
            return
        try:
            bar.refresh()
        except Exception:  # noqa: BLE001 - a closed stream: the bar's owner will see it
            return
        del bar


class _FirstStep:
    """Mixin for tqdm bars: until the first ``update`` the description says "(compiling)" and a
    thread redraws the bar every :data:`TICK` seconds (so the elapsed time moves); that first
    update restarts the rate clock, so the rate and time left count from it. ``set_phase``
    names the phase in the description."""

    def __init__(self, *args: Any, compiling: bool = True, tick: bool = True,
                 **kwargs: Any) -> None:
        self._pending = bool(compiling)
        self._ready_t: float | None = None
        self._ready_n: float = 0
        self._ticker: threading.Thread | None = None
        desc = kwargs.get("desc") or ""
        self._plain_desc = self._phase_desc = desc
        if compiling:
            kwargs["desc"] = f"{desc} (compiling)" if desc else "compiling"
        super().__init__(*args, **kwargs)
        if self._pending and tick and not self.disable:
            self._tick_stop = threading.Event()
            interval = max(TICK, float(getattr(self, "mininterval", 0) or 0))
            self._ticker = threading.Thread(target=_tick, name="bayeslik-progress-tick",
                                            args=(weakref.ref(self), self._tick_stop, interval),
                                            daemon=True)
            self._ticker.start()

    def _stop_ticking(self) -> None:
        ticker, self._ticker = getattr(self, "_ticker", None), None
        if ticker is not None:
            self._tick_stop.set()
            if ticker is not threading.current_thread():
                ticker.join(timeout=1.0)

    def set_phase(self, phase: str | None) -> None:
        """Name the run's phase: the description becomes "<desc> <phase>" (the plain
        description for None); while compiling, from the first step on."""
        base = self._plain_desc
        self._phase_desc = (f"{base} {phase}" if base else str(phase)) if phase else base
        if not self._pending:
            self.desc = self._phase_desc
            self.refresh()

    def update(self, n: float = 1) -> bool | None:
        if not self._pending or self.disable:
            return super().update(n)
        self._stop_ticking()
        self._pending = False
        self.n += n
        self.last_print_n = self._ready_n = self.n
        self.last_print_t = self._ready_t = self._time()
        self.desc = self._phase_desc
        self.refresh()
        return True

    def close(self) -> None:
        self._stop_ticking()
        super().close()

    @property
    def format_dict(self) -> dict:
        d = super().format_dict
        if self._pending:
            d["rate"], d["initial"] = None, self.n  # no rate (nor ETA) before the first step
        elif self._ready_t is not None:
            d["initial"] = self._ready_n  # tqdm's fallback rate is (n - initial) / elapsed
            if d.get("rate") is None:
                dt = self._time() - self._ready_t
                done = self.n - self._ready_n
                d["rate"] = done / dt if dt > 0 and done > 0 else None
        return d


class _KernelLine:
    """The file a text bar writes to in a Jupyter kernel: every redraw replaces one display
    output (IPython's ``update_display``) instead of adding to stderr, so the live cell shows
    one moving line and the saved notebook keeps the last one."""

    encoding = "utf-8"  # tqdm draws unicode blocks only on a stream that says it takes them

    def __init__(self) -> None:
        self._line = ""
        self._shown: str | None = None
        self._handle: Any = None

    def write(self, s: str) -> int:
        if "\r" in s:  # tqdm redraws as "\r" + line + padding; an empty last part changes nothing
            parts = [p for p in s.split("\r")[1:] if p]
            if parts:
                self._line = parts[-1].replace("\n", "").rstrip()
        elif s.strip():
            self._line = s.strip()
        return len(s)

    def flush(self) -> None:
        if self._line == self._shown or (self._handle is None and not self._line):
            return
        from IPython.display import display

        data = {"text/plain": self._line}
        if self._handle is None:
            self._handle = display(data, raw=True, display_id=True)
        else:
            self._handle.update(data, raw=True)
        self._shown = self._line


class TextBar(_FirstStep, _std_tqdm):
    """The text bar (``tqdm.std``): stderr in a terminal, one redrawn display line in Jupyter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("file") is None:
            if _in_kernel():
                kwargs["file"] = _KernelLine()
                kwargs.setdefault("mininterval", 0.5)
            else:
                kwargs["file"] = sys.stderr
                kwargs.setdefault("dynamic_ncols", True)
                if not _isatty(sys.stderr):
                    kwargs.setdefault("mininterval", LOG_INTERVAL)
        # redrawn while compiling only where someone watches: a terminal or a notebook's line
        # (a log gets the lines of real progress alone)
        kwargs.setdefault("tick", isinstance(kwargs["file"], _KernelLine)
                          or _isatty(kwargs["file"]))
        super().__init__(*args, **kwargs)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:
        return False


_NOTEBOOK_BAR: type | None = None


def _notebook_bar() -> type:
    """The widget bar class, made on first use (tqdm.notebook imports IPython)."""
    global _NOTEBOOK_BAR
    if _NOTEBOOK_BAR is None:
        from tqdm.notebook import tqdm as notebook_tqdm

        _NOTEBOOK_BAR = type("NotebookBar", (_FirstStep, notebook_tqdm),
                             {"__doc__": "The widget bar (``tqdm.notebook``)."})
    return _NOTEBOOK_BAR


def bar(*, disable: bool = False, compiling: bool = True, **tqdm_kwargs: Any):
    """A progress bar of the kind ``BAYESLIK_PROGRESS`` chooses (see the module's text).

    Parameters
    ----------
    disable : no bar (as tqdm's ``disable``); ``BAYESLIK_PROGRESS=off`` disables every bar.
    compiling : the bar reads "(compiling)" until its first ``update`` and counts its rate and
        time left from there; pass False for a bar whose first step compiles nothing.
    tick (in ``tqdm_kwargs``) : whether a compiling bar redraws itself every :data:`TICK`
        seconds; default where it is watched (a terminal, a notebook), not in a log.
    **tqdm_kwargs : passed to tqdm (``total``, ``desc``, ``unit``, ``bar_format``, ...).
    """
    k = kind()
    cls = _notebook_bar() if k == "notebook" else TextBar
    return cls(disable=bool(disable) or k == "off", compiling=compiling, **tqdm_kwargs)


def _import_tqdm_auto_quietly() -> None:
    """Import ``tqdm.auto`` now, ignoring its "IProgress not found" TqdmWarning (see the
    module's text); only in a Jupyter kernel, where it warns, and only once."""
    if "tqdm.autonotebook" in sys.modules or "ipykernel.zmqshell" not in sys.modules:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
        import tqdm.auto  # noqa: F401


_import_tqdm_auto_quietly()

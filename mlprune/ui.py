"""The dashboard's Streamlit side: the process's one shared cache, session state, and the
widgets every page uses. The work itself is in :mod:`mlprune.service`, :mod:`mlprune.holding`
and :mod:`mlprune.sweeps` (no Streamlit). The words and HTML the pages show are in
:mod:`mlprune.labels`, re-exported here: pages call ``ui.pair_label``, ``ui.dequant_text``...

Session state holds typed objects, one accessor each, so no page parses another page's dict:

- :func:`features` -> the Features page's :class:`~mlprune.service.FeatureCapture`;
- :func:`session_pruning` -> this session's :class:`~mlprune.service.SessionPruning`;
- :func:`model_spec` and :func:`session_corpus` -> the model and corpus the Home page chose.

Widget values live under keys starting with ``w.`` (:func:`keep_widget_state` keeps them
across page switches). Widgets that set a :class:`~mlprune.spec.PruneSpec` field start
from :data:`SPEC_PRESET` (:func:`spec_defaults`), never from a value typed in a page.
"""

from __future__ import annotations

import html
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import Any, TypeVar

import streamlit as st
from streamlit.runtime import Runtime
from streamlit.runtime.scriptrunner import get_script_run_ctx

from mlprune import MlpruneError, Progress, runners, service
from mlprune.capture import Cancelled
from mlprune.corpus import ParallelCorpus
from mlprune.evaluate import Generation
from mlprune.holding import waiting_text
from mlprune.labels import (  # noqa: F401 - re-exported: pages call ui.pair_label ...
    INTERVENTION_KINDS,
    all_pairs,
    comma_list,
    default_pairs,
    dequant_text,
    diff_flags,
    dims_from_selection,
    generation_html,
    pair_label,
    prompt_set_label,
    source_of,
    sweep_label,
)
from mlprune.models import LoadedModel
from mlprune.pipeline import PruneSpec
from mlprune.prune import MaskSet

log = logging.getLogger("mlprune.ui")

WIDGET = "w."  # prefix of widget keys whose values survive page switches
SPEC_PRESET = "interactive"  # the preset the live pages start from (spec.PRESETS)
FEATURES = "features"  # session keys of the typed results below
PRUNING = "session_pruning"
SESSION_RESULTS = (FEATURES, PRUNING)  # dropped when the model or the corpus changes


@st.cache_resource(show_spinner=False)
def shared() -> service.Shared:
    """The process's one :class:`~mlprune.service.Shared` (created on first use)."""
    return service.Shared()


# --------------------------------------------------------------------------- widget state


def default(key: str, value: Any) -> None:
    """Set a session value once (widgets then read it through their key)."""
    if key not in st.session_state:
        st.session_state[key] = value


def valid_choice(key: str, options: list, fallback: Any = None) -> None:
    """Keep a selectbox's stored value among its current options."""
    if st.session_state.get(key) not in options:
        st.session_state[key] = fallback if fallback in options else (options[0] if options else None)


def valid_choices(key: str, options: list, fallback: list) -> None:
    """Keep a multiselect's stored values among its current options."""
    current = st.session_state.get(key)
    if current is None:
        current = fallback
    st.session_state[key] = [v for v in current if v in options]


def keep_widget_state() -> None:
    """Widget values with the ``w.`` prefix survive page switches (Streamlit drops the state
    of widgets not drawn in a run; re-assigning the key keeps it)."""
    for key in list(st.session_state.keys()):
        if isinstance(key, str) and key.startswith(WIDGET):
            st.session_state[key] = st.session_state[key]


def spec_defaults(prefix: str, fields: tuple[str, ...]) -> dict[str, object]:
    """First values of the widgets ``w.{prefix}_{field}``, read from the :data:`SPEC_PRESET`
    spec in the units the widget shows: sparsity in percent, ``protect`` as the on/off
    toggle (its rule has a text box of its own); every other field as it is."""
    spec = PruneSpec.preset(SPEC_PRESET)
    shown = {"sparsity": round(spec.sparsity * 100), "protect": spec.protect is not None}
    return {f"{WIDGET}{prefix}_{name}": shown.get(name, getattr(spec, name)) for name in fields}


def default_all(values: dict[str, object]) -> None:
    """:func:`default` for every key of ``values``."""
    for key, value in values.items():
        default(key, value)


def session_id() -> str:
    """A random id of this browser session (names its sweep files)."""
    return st.session_state.setdefault("session_id", uuid.uuid4().hex[:12])


def session_owner() -> Callable[[], bool]:
    """Whether this browser session is still there, as a check any thread may call: a
    worker job started by this session (``sweeps.start_sweep(owner=...)``) is cancelled
    once it has said no for a while (the tab was closed). Streamlit's own record of its
    connected sessions answers, so no page has to keep a heartbeat going; without a
    Streamlit server (a test, a bare run) the answer is always yes."""
    ctx = get_script_run_ctx(suppress_warning=True)
    session = ctx.session_id if ctx is not None else None

    def alive() -> bool:
        if session is None or not Runtime.exists():
            return True
        return bool(Runtime.instance().is_active_session(session))

    return alive


# --------------------------------------------------------------------------- model and corpus


def model_spec() -> str:
    """The session's model spec: MLPRUNE_MODEL, else the embedded default."""
    default("model_spec", service.default_model_spec())
    return st.session_state["model_spec"]


def _drop_results() -> None:
    for key in SESSION_RESULTS:
        st.session_state.pop(key, None)


def set_model_spec(spec: str) -> None:
    """Switch the session to another model, dropping results made with the previous one."""
    if spec != st.session_state.get("model_spec"):
        _drop_results()
        st.session_state["model_spec"] = spec


def session_corpus() -> ParallelCorpus:
    """The session's corpus, the default one on first use (raises MlpruneError)."""
    if "corpus" not in st.session_state:
        st.session_state["corpus"] = service.default_corpus()
        st.session_state["corpus_origin"] = "default"
    return st.session_state["corpus"]


def set_corpus(corpus: ParallelCorpus, origin: Any) -> None:
    """Switch the session's corpus, dropping results made with the previous one. ``origin``
    says where it came from ("default", "flores", an upload's (name, size))."""
    _drop_results()
    st.session_state["corpus"] = corpus
    st.session_state["corpus_origin"] = origin


def corpus_origin() -> Any:
    """Where the session's corpus came from (None before one was read)."""
    return st.session_state.get("corpus_origin")


# --------------------------------------------------------------------------- typed results


def features(loaded: LoadedModel | None) -> service.FeatureCapture | None:
    """The Features page's capture of this model in this session, or None."""
    result = st.session_state.get(FEATURES)
    if result is None or loaded is None or result.model != service.model_key(loaded):
        return None
    return result


def set_features(result: service.FeatureCapture) -> None:
    """Record the Features page's capture for the other pages."""
    st.session_state[FEATURES] = result


def session_pruning(loaded: LoadedModel | None) -> service.SessionPruning | None:
    """This session's pruning of this model, or None (other sessions' masks are never seen)."""
    state = st.session_state.get(PRUNING)
    if state is None or loaded is None or state.model != service.model_key(loaded):
        return None
    return state


def set_session_pruning(loaded: LoadedModel, ranking: service.CalibratedRanking,
                        spec: PruneSpec, masks: MaskSet) -> service.SessionPruning:
    """Record the session's masks (a new version only when the spec changed)."""
    state = service.next_pruning(st.session_state.get(PRUNING), loaded, ranking, spec, masks)
    st.session_state[PRUNING] = state
    return state


# --------------------------------------------------------------------------- st helpers


class Outcome:
    """Whether the block of :func:`errors` finished (False when a message was shown)."""

    ok = True


@contextmanager
def errors() -> Iterator[Outcome]:
    """Show a failure of the block as one readable message, never a traceback.

    MlpruneError carries a sentence meant for the user; anything else is a bug or an
    environment problem, logged in full on the server and shown as one line."""
    outcome = Outcome()
    try:
        yield outcome
    except Cancelled as e:
        outcome.ok = False
        st.warning(str(e))
    except MlpruneError as e:
        outcome.ok = False
        st.error(str(e))
    except FileNotFoundError as e:
        outcome.ok = False
        st.error(f"A file mlprune needs is missing: {e.filename or e}.")
    except Exception as e:  # noqa: BLE001 - the page must stay usable whatever happened
        outcome.ok = False
        log.exception("dashboard error")
        first = str(e).splitlines()[0] if str(e) else ""
        st.error(f"Something went wrong ({type(e).__name__}{': ' + first if first else ''}). "
                 "The details are in the server log.")


@contextmanager
def lock_wait(loaded: LoadedModel) -> Iterator[None]:
    """Around a call that may wait for the shared model without a progress bar of its own:
    while another tab holds the model, say what it is doing (cleared when the call returns)."""
    text = waiting_text(loaded)
    if text is None:
        yield
        return
    note = st.empty()
    note.info(text, icon=":material/hourglass_top:")
    try:
        yield
    finally:
        note.empty()


def queued(job: runners.Job, what: str) -> None:
    """A worker job still waiting in line (``job.queued``): its place, and why it waits."""
    st.progress(0.0, text=f"The {what} waits for a worker process: {job.stage}")
    st.caption(f"waiting for {job.seconds:.0f} s. At most {runners.default_pool().size} "
               f"worker{'s' if runners.default_pool().size != 1 else ''} (each with its own "
               f"copy of the model) run at once on this server ({runners.MAX_WORKERS_ENV}); "
               f"the {what} starts when one is free. Cancel leaves the line.")


def progress_bar(text: str) -> tuple[Any, Progress]:
    """A progress bar headed ``text`` and the :data:`mlprune.Progress` callback that moves it
    (its text becomes "text: stage")."""
    bar = st.progress(0.0, text=text)

    def update(stage: str, fraction: float) -> None:
        bar.progress(min(1.0, max(0.0, fraction)), text=f"{text}: {stage}")

    return bar, update


def loaded_model(spec: str | None = None) -> LoadedModel:
    """The model of this spec (the session's by default), loading it once per process with a
    progress bar; raises MlpruneError when it cannot be loaded."""
    spec = spec or model_spec()
    job = shared().load_job(spec)
    if not job.done.is_set():
        bar = st.progress(job.fraction, text=f"Loading {spec}: {job.message}")
        while not job.done.wait(0.3):
            bar.progress(job.fraction, text=f"Loading {spec}: {job.message}")
        bar.empty()
    if job.error is not None:
        if isinstance(job.error, MlpruneError):
            raise job.error
        raise MlpruneError(f"Could not load {spec}: {job.error}") from job.error
    return job.result


T = TypeVar("T")


def _required(get: Callable[[], T], advice: str) -> T | None:
    """``get()``, or None after showing its error and ``advice``."""
    with errors() as ok:
        value = get()
    if not ok.ok:
        st.info(advice)
        return None
    return value


def require_model() -> LoadedModel | None:
    """The session's model (its de-quantization noted), or None after showing why not."""
    loaded = _required(loaded_model, "Pick another model on the Home page.")
    if loaded is not None:
        dequant_caption(loaded)
    return loaded


def require_corpus() -> ParallelCorpus | None:
    """The session's corpus, or None after showing why there is none."""
    return _required(session_corpus, "Pick or upload a corpus on the Home page.")


def page(title: str) -> tuple[LoadedModel, ParallelCorpus] | None:
    """A task page's title, model and corpus; None (after saying why) when either is missing."""
    st.title(title)
    loaded = require_model()
    corpus = require_corpus()
    if loaded is None or corpus is None:
        return None
    return loaded, corpus


def dequant_caption(loaded: LoadedModel) -> None:
    """The de-quantization sentence under a page's title, when it applies."""
    text = dequant_text(loaded.dequantized_from)
    if text:
        st.caption(f":material/warning: {text}")


def plot(fig: Any, key: str | None = None, on_select: Callable[[], None] | None = None) -> None:
    """Draw a plotly figure across the page width; ``on_select`` (a callback, which needs a
    ``key``) is called when the user clicks points, their selection in ``st.session_state[key]``."""
    if on_select is None:
        st.plotly_chart(fig, key=key, config={"displaylogo": False})
    else:
        st.plotly_chart(fig, key=key, config={"displaylogo": False}, on_select=on_select,
                        selection_mode="points")


INTERVENTION_DIMS = "w.iv_dims"  # the dims the Compare page intervenes on
_PREFILLED = "iv_dims_prefilled"  # the detected set they were last filled with


def follow_detected_dims(detected: list[int], hidden: int) -> None:
    """The intervention's dims follow the Features page's detected set until the user
    changes them (by hand or by clicking); dims the model does not have are dropped."""
    current = st.session_state.get(INTERVENTION_DIMS)
    if current is None or current == st.session_state.get(_PREFILLED):
        st.session_state[INTERVENTION_DIMS] = st.session_state[_PREFILLED] = list(detected)
    else:
        st.session_state[INTERVENTION_DIMS] = [d for d in current if 0 <= d < hidden]


def add_clicked_dims(chart_key: str) -> Callable[[], None]:
    """An ``on_select`` callback adding the dims clicked in a layer x dimension figure to the
    set the Compare page intervenes on."""
    def callback() -> None:
        state = st.session_state.get(chart_key)
        selection = state.get("selection") if hasattr(state, "get") else None
        clicked = dims_from_selection(selection)
        if clicked:
            current = st.session_state.get(INTERVENTION_DIMS) or []
            st.session_state[INTERVENTION_DIMS] = sorted(set(current) | set(clicked))
    return callback


def output_box(gen: Generation, differs: list[bool] | None, kind: str, *,
               compact: bool = False, label: str = "", done: bool = True) -> None:
    """One generated output as a bordered box of tokens (``kind``: "dense" or "pruned"):
    differing tokens highlighted, each token's probability on hover. ``compact`` is the Prune
    page's live preview, a little smaller than Compare's boxes. ``label`` (which masks) and
    ``done`` (False while tokens still arrive) are data attributes a browser test waits on."""
    pad, font, line, least = ((".5em .8em", "1.05em", "1.8", "2.6em") if compact
                              else (".6em .9em", "1.1em", "1.9", "3em"))
    st.markdown(f'<div class="mlp-out" data-kind="{kind}" data-label="{html.escape(label)}" '
                f'data-state="{"done" if done else "streaming"}" style="border:1px solid #d8dde6;'
                f'border-radius:6px;padding:{pad};font-size:{font};line-height:{line};'
                f'min-height:{least}">{generation_html(gen, differs)}</div>',
                unsafe_allow_html=True)


def streamed_output(box: Any, loaded: LoadedModel, state: service.SessionPruning, prompt: str,
                    max_new_tokens: int, *, label: str = "",
                    compact: bool = False) -> tuple[Generation, float]:
    """The session's pruned continuation of ``prompt``, drawn into ``box`` (an ``st.empty``)
    token by token while it is generated: made once per masks, read back on later reruns.
    Returns it and the seconds spent generating (0 when it was made before). The caller
    draws the finished box (with its differences highlighted) into ``box``."""
    found = state.generated(prompt, max_new_tokens)
    if found is not None:
        return found, 0.0
    start, pieces = time.perf_counter(), []
    waiting = waiting_text(loaded)
    if waiting:  # replaced by the first token once the model is free
        box.caption(waiting)
    # closing(): a rerun that stops this page mid-answer stops generation at once, and the
    # model is dense and unlocked again before the next run starts
    with closing(state.stream(loaded, prompt, max_new_tokens)) as stream:
        for piece in stream:
            pieces.append(piece)
            with box:
                output_box(Generation("".join(pieces).strip(), list(pieces), [1.0] * len(pieces)),
                           None, "pruned", compact=compact, label=label, done=False)
    return state.generated(prompt, max_new_tokens), time.perf_counter() - start


def sidebar_status() -> None:
    """Model, corpus and pruning of this session, on every page."""
    spec = model_spec()
    loaded = shared().model(spec)
    st.markdown("**Model**")
    if loaded is None:
        st.caption(f"{spec} (not loaded yet)")
    else:
        st.caption(f"{loaded.name}, {loaded.facts()['dtype']}")
        if loaded.dequantized_from:
            st.caption(f"weights de-quantized from {loaded.dequantized_from}")
    corpus = st.session_state.get("corpus")
    st.markdown("**Corpus**")
    st.caption(f"{corpus.name}: {len(corpus)} sentences, {', '.join(corpus.languages)}"
               if corpus is not None else "not read yet")
    captured = features(loaded)
    if captured is not None:
        st.markdown("**Features**")
        st.caption(f"{len(captured.stats)} prompt sets, {captured.protocol} protocol")
    state = session_pruning(loaded)
    st.markdown("**Pruning (this session only)**")
    if state is None:
        st.caption("none: the model is dense")
    else:
        st.caption(f"{state.spec.label} {state.spec.pair}, {state.masks.pattern}, "
                   f"{state.masks.overall_sparsity():.1%} of the selected weights pruned, "
                   f"{state.spec.protocol} protocol")

"""Lineage a user can click in the MLflow UI: the checkpoint a fine-tune run started from, and the fine-tune
runs that used a checkpoint.

- A fine-tune run's description links to its checkpoint's LoggedModel page, the registered version and
  the pretraining run (:func:`origin_links`). The links are MLflow 3's hash routes (``#/experiments/<id>/
  models/<model id>``, ``#/models/<name>/versions/<v>``, ``#/experiments/<id>/runs/<run id>``), relative,
  so they work behind any server address or prefix.
- The run's input models are the checkpoint and, when the checkpoint lives in another experiment, a
  *stand-in* LoggedModel of the run's own experiment (:func:`log_checkpoint_input`). MLflow 3's run page
  looks a run's input and output models up in the run's experiment only (a search for ``model_id IN
  (...)`` there), so a checkpoint of the pretraining experiment showed as "Logged models (0)". A stand-in
  holds no files: tag ``mococxr.model_id`` names the checkpoint and its description links to it.
- A checkpoint's description (its LoggedModel's ``mlflow.note.content``) lists, as links, the finished
  fine-tune runs that used it (:func:`record_use`). The list is rewritten whole from a search each time
  and settled (:func:`settle`), never appended to, so runs that finish together all end up listed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from mlflow.entities import LoggedModelInput, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mococxr.errors import TrackingError
from mococxr.tracking import filters as flt
from mococxr.tracking.mlflow import NOTE_TAG, tag

STAND_IN_TYPE = "mococxr-checkpoint-link"  # the model_type of a stand-in (no files)
USED_BY_HEADING = "Fine-tune runs that used this checkpoint"
MAX_LISTED = 50  # links in a list; the rest are counted, and the search filter finds them all
MODEL_NOTE_LIMIT = 7500  # characters of a LoggedModel's description (MLflow's tag values hold 8,000)
VERSION_NOTE_LIMIT = 5000  # a registered version's description (String(5000) in MLflow's SQL store)
_MARKDOWN = str.maketrans({c: "\\" + c for c in "\\`*_[]"})

Found = tuple[list[Run], dict[str, str]]  # runs, oldest first; experiment id -> name


# -- MLflow 3 UI pages ------------------------------------------------------------------------------------
def run_page(experiment_id: str, run_id: str) -> str:
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def model_page(experiment_id: str, model_id: str) -> str:
    return f"#/experiments/{experiment_id}/models/{model_id}"


def version_page(name: str, version: str | int) -> str:
    return f"#/models/{quote(str(name), safe='')}/versions/{version}"


def link(text: Any, target: str) -> str:
    """A Markdown link whose text is ``text`` as itself (Markdown's special characters escaped)."""
    return f"[{str(text).translate(_MARKDOWN)}]({target})"


def code(text: str) -> str:
    """``text`` as a Markdown code span, back-quotes inside it included (search filters hold them)."""
    return f"`` {text} ``"


# -- where a fine-tune run started from -----------------------------------------------------------------
def origin_links(origin: Mapping[str, Any]) -> str:
    """The Markdown sentence of a fine-tune run's description that links to its checkpoint, the registered
    version and the run that trained it; empty when the run did not start from a checkpoint of the store."""
    client = MlflowClient()
    parts = []
    model = _logged_model(client, origin.get("model_id"))
    if model is not None:
        parts.append(f"checkpoint {link(model.name, model_page(model.experiment_id, model.model_id))}")
    if origin.get("registry_version"):
        name, version = origin["registered_model"], origin["registry_version"]
        parts.append(f"registered as {link(f'{name} version {version}', version_page(name, version))}")
    run = _run(client, origin.get("run_id"))
    if run is not None:
        what = "pretraining run" if run.data.tags.get(tag("kind")) == "pretrain" else "run"
        epoch = f" at epoch {origin['epoch']}" if origin.get("epoch") is not None else ""
        target = run_page(run.info.experiment_id, run.info.run_id)
        parts.append(f"of {what} {link(run.info.run_name or run.info.run_id, target)}{epoch}")
    return f"**Started from** {', '.join(parts)}." if parts else ""


def log_checkpoint_input(run_id: str, origin: Mapping[str, Any]) -> None:
    """Log the checkpoint behind ``origin`` as run ``run_id``'s input model and, when the checkpoint lives
    in another experiment, its stand-in in the run's experiment (what the run page can show).

    Done through the client, not ``mlflow.log_inputs``, whose ``models=`` is refused outside Databricks
    although the sqlite store and the tracking server both store model inputs.
    """
    model_id = origin.get("model_id")
    if not model_id:
        return
    client = MlflowClient()
    models = [LoggedModelInput(model_id)]
    checkpoint = _logged_model(client, model_id)
    experiment_id = client.get_run(run_id).info.experiment_id
    if checkpoint is not None and str(checkpoint.experiment_id) != str(experiment_id):
        try:
            models.append(LoggedModelInput(stand_in(checkpoint, experiment_id)))
        except MlflowException as exc:  # the run page's view of its input, not the run's record of it
            warnings.warn(
                f"no stand-in of checkpoint {model_id} in experiment {experiment_id}: {exc}", stacklevel=2
            )
    client.log_inputs(run_id, models=models)


def stand_in(checkpoint: Any, experiment_id: str) -> str:
    """The id of ``checkpoint``'s stand-in in experiment ``experiment_id``, made on first use.

    Two runs starting together may both make one: each then keeps the oldest and deletes its own when it
    is not that one, so the experiment keeps one."""
    client = MlflowClient()
    found = _stand_ins(client, checkpoint.model_id, experiment_id)
    if found:
        return found[0].model_id
    copied = {k: v for k, v in checkpoint.tags.items() if k in (tag("checkpoint_epoch"), tag("backbone"))}
    made = client.create_logged_model(
        experiment_id=experiment_id,
        name=checkpoint.name,
        tags={**copied, tag("model_id"): checkpoint.model_id, NOTE_TAG: _stand_in_note(client, checkpoint)},
        model_type=STAND_IN_TYPE,
    )
    client.finalize_logged_model(made.model_id, "READY")
    oldest = _stand_ins(client, checkpoint.model_id, experiment_id)[0].model_id
    if oldest != made.model_id:
        client.delete_logged_model(made.model_id)
    return oldest


def _stand_ins(client: MlflowClient, model_id: str, experiment_id: str) -> list:
    found = client.search_logged_models(
        experiment_ids=[str(experiment_id)], filter_string=flt.tag(tag("model_id"), model_id)
    )
    return sorted(
        (m for m in found if m.model_type == STAND_IN_TYPE and "READY" in str(m.status)),
        key=lambda m: (m.creation_timestamp, m.model_id),
    )


def _stand_in_note(client: MlflowClient, checkpoint: Any) -> str:
    target = link(checkpoint.name, model_page(checkpoint.experiment_id, checkpoint.model_id))
    run = _run(client, checkpoint.source_run_id)
    source = (
        f" of run {link(run.info.run_name, run_page(run.info.experiment_id, run.info.run_id))}" if run else ""
    )
    return (
        f"Stand-in for checkpoint {target}{source}, in this experiment because MLflow's run page lists "
        "only the logged models of the run's own experiment: the fine-tune runs here show it as their "
        f"input. It holds no files; the weights are the checkpoint's (`models:/{checkpoint.model_id}`), and "
        "its page lists the runs that used it."
    )


# -- who used a checkpoint ------------------------------------------------------------------------------
def users_filter(model_id: str) -> str:
    """The search filter that finds the finished fine-tune runs initialised from LoggedModel ``model_id``
    (whichever reference named it: a registered version, an alias or ``models:/m-...``)."""
    return flt.both(
        flt.tag(tag("kind"), "finetune"), flt.equal("params.init_model_id", model_id), flt.status("FINISHED")
    )


def find_runs(filter_string: str) -> Found:
    """The runs matching ``filter_string`` in every active experiment, oldest first, and the experiments'
    names."""
    client = MlflowClient()
    names, token = {}, None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        names.update({e.experiment_id: e.name for e in page})
        if not (token := page.token):
            break
    runs, ids = [], list(names)
    for i in range(0, len(ids), 100):
        token = None
        while True:
            page = client.search_runs(ids[i : i + 100], filter_string, max_results=1000, page_token=token)
            runs += page
            if not (token := page.token):
                break
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)), names


def settle(find: Callable[[], Found], write: Callable[[Found], None], attempts: int = 3) -> Found:
    """Write what ``find`` returns, then find again and write again until the two agree.

    A run that finishes after a find is in the next one, and its own record writes after it finished:
    so whoever writes last has written what the store then held, and two runs finishing together both
    end up listed."""
    found = find()
    for _ in range(attempts):
        write(found)
        fresh = find()
        if [r.info.run_id for r in fresh[0]] == [r.info.run_id for r in found[0]]:
            break
        found = fresh
    return found


def runs_section(heading: str, found: Found, filter_string: str, limit: int) -> str:
    """Markdown: ``heading`` with the count and the filter that finds every run, then one link per run (at
    most :data:`MAX_LISTED`, fewer when the text would pass ``limit`` characters) and how many more."""
    runs, names = found
    text = (
        f"**{heading}** ({len(runs)} finished; search {code(filter_string)} in an experiment's runs to "
        "find them all):"
    )
    lines = []
    for run in runs[:MAX_LISTED]:
        line = f"\n- {_run_line(run, names)}"
        if len(text) + sum(map(len, lines)) + len(line) + 40 > limit:
            break
        lines.append(line)
    more = len(runs) - len(lines)
    return (text + "".join(lines) + (f"\n- and {more} more" if more else "")) if runs else text


def _run_line(run: Run, names: Mapping[str, str]) -> str:
    """``[name](page) · experiment · task · test AUC 0.7123``: the task tells apart runs of one experiment
    that share a name (the paper's competition grid beside its CheXpert grid)."""
    info = run.info
    parts = [link(info.run_name or info.run_id, run_page(info.experiment_id, info.run_id))]
    parts.append(names.get(info.experiment_id, f"experiment {info.experiment_id}").translate(_MARKDOWN))
    if task := run.data.tags.get(tag("task")):
        parts.append(task.translate(_MARKDOWN))
    if "test/auc" in run.data.metrics:
        parts.append(f"test AUC {run.data.metrics['test/auc']:.4f}")
    return " · ".join(parts)


def before_section(text: str, heading: str) -> str:
    """``text`` up to the section that ``heading`` starts (bold or not), without trailing blank lines."""
    cut = text.find(heading)
    head = text if cut < 0 else text[:cut]
    return head.rstrip().removesuffix("**").rstrip()


def with_section(text: str, heading: str, section: str) -> str:
    """``text`` with its ``heading`` section (to the end) replaced by ``section``."""
    head = before_section(text, heading)
    return f"{head}\n\n{section}" if head else section


def record_use(model_id: str) -> list[Run] | None:
    """List, in checkpoint ``model_id``'s description, the finished fine-tune runs that used it (rewritten
    whole from a search, then settled). Bookkeeping: a failure warns and returns None."""
    client = MlflowClient()
    filt = users_filter(model_id)

    def write(found: Found) -> None:
        model = client.get_logged_model(model_id)
        text = model.tags.get(NOTE_TAG) or _checkpoint_intro(client, model)
        head = before_section(text, USED_BY_HEADING)
        section = runs_section(USED_BY_HEADING, found, filt, MODEL_NOTE_LIMIT - len(head))
        client.set_logged_model_tags(model_id, {NOTE_TAG: with_section(text, USED_BY_HEADING, section)})

    try:
        return settle(lambda: find_runs(filt), write)[0]
    except (MlflowException, TrackingError) as exc:
        warnings.warn(f"could not list the fine-tune runs of checkpoint {model_id}: {exc}", stacklevel=2)
        return None


def _checkpoint_intro(client: MlflowClient, model: Any) -> str:
    """A checkpoint's description before anything else wrote one: what it is, with a link to its run."""
    run = _run(client, model.source_run_id)
    epoch = model.tags.get(tag("checkpoint_epoch"))
    page = run and link(run.info.run_name, run_page(run.info.experiment_id, run.info.run_id))
    of = f" of run {page}" if run else ""
    return f"Encoder checkpoint{of}{f' at epoch {epoch}' if epoch else ''} (`models:/{model.model_id}`)."


def _logged_model(client: MlflowClient, model_id: str | None) -> Any:
    if not model_id:
        return None
    try:
        return client.get_logged_model(model_id)
    except MlflowException:
        return None


def _run(client: MlflowClient, run_id: str | None) -> Run | None:
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


__all__ = [
    "MAX_LISTED",
    "STAND_IN_TYPE",
    "USED_BY_HEADING",
    "before_section",
    "find_runs",
    "link",
    "log_checkpoint_input",
    "model_page",
    "origin_links",
    "record_use",
    "run_page",
    "runs_section",
    "settle",
    "stand_in",
    "users_filter",
    "version_page",
    "with_section",
]

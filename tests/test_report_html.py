"""report.html, the page the MLflow UI shows for a report run: self-contained (figures as data URIs, no
links out), every table and caption as escaped text, numbers that do not wrap; figures without captions
drawn in; and a report run whose duration is its work, not the wait between re-runs."""

from __future__ import annotations

import base64
import html as html_lib
import json
import math
import re
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from test_report import S8, TOY, Y8, _log_run, _migrated_db, _predictions, store  # noqa: F401
from test_report_paper import IMAGENET, _grid

from mococxr.report import html
from mococxr.report import plots as plots_module
from mococxr.report.paper import chexpert_family
from mococxr.report.record import WORK_SECONDS, log_report, report_dir
from mococxr.report.render import table_blocks
from mococxr.report.tables import build_report
from mococxr.tracking import mlflow as mt

pytestmark = pytest.mark.usefixtures("store")  # test_report's fresh store per test

# names a user may give that HTML must escape: tags, an ampersand, both quote kinds (an experiment name may
# hold one kind only: tracking/filters.py)
EXP = 'html <b>report</b> & "quoted"'
TASK = "pleural<i>&'effusion'"
COLUMN = 'Eff<u>&"x"'
TAGS = {
    *("html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "section", "p", "code"),
    *(
        "details",
        "summary",
        "ul",
        "li",
        "div",
        "table",
        "thead",
        "tbody",
        "tr",
        "th",
        "td",
        "span",
        "figure",
        "img",
        "figcaption",
    ),
}
NUMBER = re.compile(r"[+-]?\d+\.\d+")


class Page(HTMLParser):
    """What a browser would show: the tags, images, headings, list items and tables of a page."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.images: list[dict] = []
        self.headings: list[str] = []
        self.items: list[str] = []
        self.tables: list[dict] = []
        self._cell: list[str] | None = None
        self._text: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "table":
            self.tables.append({"header": [], "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("th", "td"):
            self._cell = []
        elif tag in ("h1", "h2", "li"):
            self._text = []

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            value = " ".join(self._cell)
            if tag == "th":
                self.tables[-1]["header"].append(value)
            else:
                self.tables[-1]["rows"][-1].append(value)
            self._cell = None
        elif tag in ("h1", "h2", "li"):
            (self.items if tag == "li" else self.headings).append("".join(self._text))
            self._text = None

    def handle_data(self, data):
        if self._cell is not None and data.strip():
            self._cell.append(data.strip())
        if self._text is not None:
            self._text.append(data)

    def body_rows(self, i: int) -> list[list[str]]:
        return [r for r in self.tables[i]["rows"] if r]  # the header row holds th cells only


def _download(run_id: str, path: str, tmp_path) -> Path:
    folder = report_dir(run_id)
    return Path(MlflowClient().download_artifacts(run_id, f"{folder}/{path}", str(tmp_path / "dl")))


def _assert_self_contained(text: str, page: Page) -> None:
    """One file: no script, stylesheet link, frame or link out; every image a PNG data URI."""
    assert set(page.tags) <= TAGS, set(page.tags) - TAGS
    assert "href=" not in text and "url(" not in text and "@import" not in text
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def _assert_table(page: Page, i: int, frame: pd.DataFrame) -> None:
    """Table ``i`` of the page shows ``frame``: the same headers (unique), the same numbers cell by cell;
    only a column without a value in any row is left out (and named under the table)."""
    blank = html.blank_columns(frame)
    assert all((frame[c] == "").all() for c in blank)
    frame = frame.drop(columns=blank)
    assert page.tables[i]["header"] == [str(c) for c in frame.columns]
    assert len(set(page.tables[i]["header"])) == len(frame.columns)
    rows = page.body_rows(i)
    assert len(rows) == len(frame)
    for shown, row in zip(rows, frame.itertuples(index=False), strict=True):
        for cell, value in zip(shown, row, strict=True):
            assert NUMBER.findall(cell) == NUMBER.findall(str(value)), (cell, value)


def test_the_generic_report_page_embeds_its_figures_and_tables_and_escapes_names(tmp_path):
    for (init, f), aucs in TOY.items():
        for d, auc in enumerate(aucs):
            _log_run(
                _predictions(Y8, S8[auc], task=COLUMN),
                init=init,
                fraction=f,
                draw=d,
                experiment=EXP,
                task=TASK,
            )
    report = build_report(EXP, out=tmp_path / "out", n_replicates=50, seed=1, progress=False)
    text = _download(report.run_id, "report.html", tmp_path).read_text(encoding="utf-8")
    page = Page(text)
    _assert_self_contained(text, page)
    # the names arrive as text, never as markup: the parsed page holds them whole, the raw page escaped
    assert "<b>" not in text and "<i>" not in text and "<u>" not in text
    assert "&lt;b&gt;report&lt;/b&gt; &amp; &quot;quoted&quot;" in text
    assert any(EXP in item for item in page.items) and any(TASK in item for item in page.items)
    assert page.headings[0] == f"mococxr report: task {TASK}, dataset nih"

    # every figure, byte for byte, as a data URI; its caption beside it as text
    for img, metric in zip(page.images, ("auc", "auprc"), strict=True):
        png = _download(report.run_id, f"plots/{metric}.png", tmp_path).read_bytes()
        assert base64.b64decode(img["src"].split(",", 1)[1]) == png
        assert COLUMN in img["alt"]  # the quote in the name did not end the attribute
    assert any("8 images of 4 patients" in item for item in page.items)

    # every table, in order, under its heading
    blocks = table_blocks(report.absolute, report.improvement, COLUMN, [COLUMN])
    assert len(page.tables) == len(blocks) == 4
    for i, (heading, _, table) in enumerate(blocks):
        assert heading in page.headings
        _assert_table(page, i, table)
    assert 'class="num"' in text and "white-space: nowrap" in html.CSS  # numbers never wrap

    run = MlflowClient().get_run(report.run_id)
    assert f"**Open `{report_dir(report.run_id)}/report.html`**" in run.data.tags[mt.NOTE_TAG]


def test_a_cell_shows_its_estimate_above_its_interval_and_text_is_escaped():
    frame = pd.DataFrame(
        {
            "Arch <x>": ["a & b", "c"],
            "1%": ["+0.034 (0.012, 0.055)", ""],
            "paper 1%": ["0.850 (0.808, 0.884) ≠", ""],
        }
    )
    out = html.table(frame)
    assert '<th scope="col">Arch &lt;x&gt;</th>' in out and '<td class="text">a &amp; b</td>' in out
    assert '<td class="num">+0.034<span class="ci">(0.012, 0.055)</span></td>' in out
    assert '<td class="num">0.850 ≠<span class="ci">(0.808, 0.884)</span></td>' in out
    assert html.text(float("nan")) == "" and html.text('"q"') == "&quot;q&quot;"
    assert html.caption([]) == "" and "<li>x &lt; y</li>" in html.caption(["x < y"])


def test_a_paper_family_page_holds_every_table_figure_and_caption(tmp_path):
    _grid("paper-html", baseline="imagenet", fractions=(0.01, 1.0), backbones=("resnet18",))
    run_id = chexpert_family("paper-html", notes=IMAGENET, out=tmp_path / "out", n_replicates=30)
    text = _download(run_id, "report.html", tmp_path).read_text(encoding="utf-8")
    page = Page(text)
    _assert_self_contained(text, page)
    assert [h.split(".")[0] for h in page.headings[1:]] == [
        "Table 1",
        "Appendix Table 1",
        "Figure 3",
        "Figure 4",
        "Appendix Figure 3",
    ]
    for i, stem in enumerate(("table1", "appendix_table1")):
        csv = pd.read_csv(_download(run_id, f"{stem}.csv", tmp_path), dtype=str, keep_default_na=False)
        _assert_table(page, i, csv)
    # our runs lack 0.1% and 10%: those columns of ours are left out of the page and named; the CSV keeps them
    assert text.count("Left out, no value in any row: 0.1%, 10%.") == 2
    assert '<details class="intro">' in text  # the family's many notes start folded: the first table shows
    for img, stem in zip(page.images, ("figure3", "figure4", "appendix_figure3"), strict=True):
        assert (
            base64.b64decode(img["src"].split(",", 1)[1])
            == _download(run_id, f"{stem}.png", tmp_path).read_bytes()
        )
    # the family's caption lines once at the top, each item's own under its heading, all as text
    md = _download(run_id, "report.md", tmp_path).read_text()
    for line in (x[2:] for x in md.splitlines() if x.startswith("- ")):
        assert line in page.items, line
    assert any(item.startswith("Hollow markers with dotted error bars") for item in page.items)
    note = MlflowClient().get_run(run_id).data.tags[mt.NOTE_TAG]
    assert f"**Open `{report_dir(run_id)}/report.html`**" in note and "- `report.html`" in note


def test_a_figure_has_a_short_title_and_its_legend_outside_every_panel(tmp_path, monkeypatch):
    made = []

    class Recorded(plots_module.Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(plots_module, "Figure", Recorded)
    rows = [
        {
            "backbone": b,
            "init": i,
            "protocol": p,
            "fraction": f,
            "metric": "auc",
            "point": v,
            "lo": 0.5,
            "hi": 1.0,
        }
        for b in ("resnet18", "densenet121")
        for p in ("linear", "e2e")
        for i, v in (("moco", 0.9), ("imagenet", 0.8))
        for f in (0.01, 0.1, 1.0)
    ]
    published = pd.DataFrame(rows).drop(columns="metric").assign(point=0.85)
    plots_module.plot_curves(
        pd.DataFrame(rows), tmp_path / "f.png", title="Figure 3: test AUC, linear", published=published
    )
    (fig,) = made
    assert fig.get_suptitle() == "Figure 3: test AUC, linear"
    assert all(ax.get_legend() is None for ax in fig.axes)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "moco",
        "imagenet",
        "moco (paper)",
        "imagenet (paper)",
    ]
    box = legend.get_window_extent()
    assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)  # never over a CI band


def _files(out: Path, n: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(f"# revision {n}\n")
    return [out / "report.md"]


def _log(out: Path, n: int, metrics: dict, started: float | None = None) -> str:
    return log_report(
        "report-duration",
        out,
        _files(out, n),
        key="duration-key",
        run_name="report-duration",
        run_tags=mt.tags(kind="report"),
        params={"seed": 0},
        metrics=metrics,
        note=f"revision {n}",
        started=started,
    )


def test_a_rerun_report_lasts_its_work_not_the_wait_between_runs(tmp_path):
    began = time.monotonic()
    run_id = _log(tmp_path / "a", 1, {"report/n_runs": 4.0, "absolute/gone": 0.5}, started=began - 100)
    time.sleep(3)  # the wait between two revisions that reopening the run would count
    assert _log(tmp_path / "b", 2, {"report/n_runs": 6.0}) == run_id
    wall = time.monotonic() - began
    run = MlflowClient().get_run(run_id)
    duration = (run.info.end_time - run.info.start_time) / 1000
    work = run.data.metrics[WORK_SECONDS]
    assert run.info.status == "FINISHED"
    assert duration == pytest.approx(work, abs=0.002)
    # revision 1 counted the caller's 100 s of work before it logged; revision 2 only its own logging
    history = [m.value for m in MlflowClient().get_metric_history(run_id, WORK_SECONDS)]
    assert len(history) == 2 and 100 <= history[0] < 100 + wall - 3
    assert 0 < history[1] - history[0] < wall - 3  # the 3 s wait is not in it
    # the counters describe the current revision; a metric it no longer logs is retired, not left stale
    assert run.data.metrics["report/n_runs"] == 6.0 and math.isnan(run.data.metrics["absolute/gone"])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MEASURE = """<script>
window.addEventListener("load", () => {
  const widths = [...document.querySelectorAll("table")].map((t) => {
    const box = t.closest(".scroll");
    return [Math.ceil(t.getBoundingClientRect().width), box.scrollWidth > box.clientWidth];
  });
  const out = document.createElement("pre");
  out.id = "measured";
  out.textContent = JSON.stringify({main: document.querySelector("main").clientWidth, widths: widths});
  document.body.appendChild(out);
});
</script>"""


def _widest_paper_tables() -> list[pd.DataFrame]:
    """Table 1 at its widest (two backbones, four fractions of ours and the paper's, every interval negative
    and marked) and appendix Table 4 with an Architecture column."""
    ci, marked = "-0.107 (-0.141, -0.073)", "-0.107 (-0.141, -0.073) ≠"
    rows = [
        {"Architecture": a, "MoCo-CXR-pretrained": x, "ImageNet-pretrained": y}
        | {f: ci for f in ("0.1%", "1%", "10%", "100%")}
        | {f"paper {f}": marked for f in ("0.1%", "1%", "10%", "100%")}
        for a in ("ResNet18", "DenseNet121")
        for x, y in (
            ("End-to-End", "End-to-End"),
            ("Linear Model", "Linear Model"),
            ("Linear Model", "End-to-End"),
        )
    ]
    competition = {
        "Task": "Pleural Effusion",
        "Architecture": "DenseNet121",
        "Label fraction": "0.1%",
        "Baseline (Random-init)": "0.683 (0.644, 0.719)",
        "MoCo-CXR": "0.683 (0.644, 0.719)",
        "Improvement": "+0.096 (-0.061, -0.130)",
        "paper baseline (ImageNet)": "0.683 (0.644, 0.719) ≠",
        "paper MoCo-CXR": "0.683 (0.644, 0.719) ≠",
        "paper improvement": "+0.096 (-0.061, -0.130) ≠",
    }
    return [pd.DataFrame(rows), pd.DataFrame([competition] * 4)]


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
@pytest.mark.parametrize("width", [1000, 1100])
def test_the_widest_paper_tables_fit_the_mlflow_artifact_pane(tmp_path, width):
    """MLflow's artifact pane in a 1600 px window is about 1020 px wide: the widest tables fit without a
    sideways scroll (headings wrap, numbers do not)."""
    sections = [html.section(f"Table {i}", html.table(t)) for i, t in enumerate(_widest_paper_tables())]
    page = tmp_path / "report.html"
    html.write_page(page, "widths", [], sections)
    page.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
            + ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
            + [f"--user-data-dir={profile}", f"--window-size={width},900", "--virtual-time-budget=5000"]
            + ["--dump-dom", page.as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        )
    found = re.search(r'<pre id="measured">(.*?)</pre>', done.stdout)
    assert found, done.stderr[-2000:]
    measured = json.loads(html_lib.unescape(found.group(1)))
    assert len(measured["widths"]) == 2
    for table_width, scrolls in measured["widths"]:
        assert table_width <= measured["main"] and not scrolls, measured

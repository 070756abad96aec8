"""What a reader of ``report.html`` gets: tables with their headers that scroll in their own box, images that
exist, one latency sweep per plot, plain tick numbers. Read with html.parser: no browser needed."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fusionprof import SCHEMA_VERSION
from fusionprof.figures import plain_axis, plain_number, pyplot
from fusionprof.report import write_report

ROOT = Path(__file__).resolve().parents[1]
MAX_BARE_COLUMNS = 8  # a table with more columns than this must sit in a box that scrolls sideways
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SWEEPS = ["profiles/vm/latency-tiny-cpu-fp32-20261126T200526Z.json",  # two sweeps of one machine, one preset
          "profiles/vm/latency-tiny-cpu-fp32-20261126T231708Z.json"]


class Page(HTMLParser):
    """The tables (header cells, body rows, inside a scroll box or not) and image sources of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.images: list[str] = []
        self.scroll_depth = 0  # open <div class="scroll"> elements
        self.divs: list[bool] = []  # per open <div>: is it a scroll box
        self.cell: list[str] | None = None
        self.row: list[str] | None = None
        self.in_head = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "div":
            self.divs.append("scroll" in (attrs.get("class") or "").split())
            self.scroll_depth += self.divs[-1]
        elif tag == "table":
            self.tables.append({"header": [], "rows": [], "scrolls": self.scroll_depth > 0})
        elif tag == "thead":
            self.in_head = True
        elif tag == "tr":
            self.row = []
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            self.scroll_depth -= self.divs.pop()
        elif tag == "thead":
            self.in_head = False
        elif tag in ("td", "th"):
            self.row.append(("th:" if tag == "th" else "") + "".join(self.cell).strip())
            self.cell = None
        elif tag == "tr":
            table = self.tables[-1]
            if self.in_head:
                table["header"] = self.row
            else:
                table["rows"].append(self.row)

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def read_page(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


def check_structure(html_path: Path) -> Page:
    """Every table has a header of <th> cells in a <thead>, every body row as many cells as the header, a wide
    table scrolls in its own box; every image is a PNG file that exists, relative to the page."""
    page = read_page(html_path)
    assert page.tables, "no table"
    for i, table in enumerate(page.tables):
        header = table["header"]
        assert header and all(h.startswith("th:") and h != "th:" for h in header), f"table {i}: no header"
        assert all(len(row) == len(header) for row in table["rows"]), f"table {i} {header}: ragged rows"
        assert table["scrolls"] or len(header) <= MAX_BARE_COLUMNS, f"table {i} {header}: wide and no scroll box"
    for src in page.images:
        path = html_path.parent / src
        assert path.is_file(), f"{src}: no such file"
        assert path.read_bytes()[:8] == PNG_MAGIC, f"{src}: not a PNG"
    return page


def _load_record() -> dict:
    """A Server find-max load record: one VALID rate, one INVALID."""
    def run(qps, valid):
        return {"scenario": "server", "accuracy": False, "valid": valid, "validity": "VALID" if valid else "INVALID",
                "invalid_reasons": [] if valid else ["latency constraint not met"], "settings": {"target_qps": qps},
                "loadgen": {"result_99.00_percentile_latency_ns": 20e6, "result_50.00_percentile_latency_ns": 8e6},
                "batch_sizes": {"1": 10}, "logs": "x"}
    env = json.loads((ROOT / SWEEPS[0]).read_text())["environment"]
    return {"schema_version": SCHEMA_VERSION, "kind": "load", "created": "20261127T120000Z", "preset": "tiny",
            "fusion": "mid", "backend": "onnxruntime", "precision": "fp32", "device": "cpu", "scenario": "server",
            "max_batch": 8, "batch_timeout_ms": 2.0, "p99_target_ms": 50.0, "model": {}, "backend_info": {},
            "environment": env, "config": {"find_max_qps": True}, "runs": [run(40, True), run(80, False)],
            "max_qps": 40}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A report over two committed sweeps of one machine, the committed CPU training records (as written before
    steady samples/s and train FLOPs were recorded, and as if of the models those sweeps timed) and a load record."""
    root = tmp_path_factory.mktemp("records")
    for path in SWEEPS:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, root / path)
    for fusion in ("early", "mid", "late", "bottleneck"):
        path = f"profiles/tiny-{fusion}/metrics.json"
        record = {k: v for k, v in json.loads((ROOT / path).read_text()).items()
                  if k not in ("steady_samples_per_s", "train_flops")}
        # as the training runs of the models the sweeps timed (their rows name these checkpoints), in fp32, on the
        # sweeps' machine: each Pareto point takes the accuracy of the model it timed, in the sweep's precision
        record["checkpoint"] = f"models/tiny-{fusion}/checkpoint.pt"
        record["train_config"] = {**record["train_config"], "precision": "fp32"}
        record["environment"] = json.loads((ROOT / SWEEPS[0]).read_text())["environment"]
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(json.dumps(record))
    (root / "profiles/vm/load-server-tiny-mid.json").write_text(json.dumps(_load_record()))
    out = tmp_path_factory.mktemp("out")
    write_report([root / "profiles"], out)
    return out


def test_the_page_has_headed_tables_and_existing_pngs(report):
    page = check_structure(report / "report.html")
    assert any(src.startswith("report/load-") for src in page.images)  # the load section is wired in


def test_each_sweep_gets_its_own_plots_titled_with_what_it_is(report):
    md = (report / "report.md").read_text()
    for stamp, date in (("20261126t200526z", "2026-11-26 20:05 UTC"), ("20261126t231708z", "2026-11-26 23:17 UTC")):
        assert f"### vm (AMD EPYC) · tiny · fp32 · cpu · {date}" in md
        for metric in ("latency", "throughput", "pareto"):
            assert f"(report/{metric}-vm-amd-epyc-tiny-cpu-fp32-{stamp}.png)" in md
    assert len(list((report / "report").glob("latency-*.png"))) == 2


def test_a_column_no_record_fills_is_left_out_and_said_once(report):
    """Training records that predate train_flops: no column of dashes, one note that says why."""
    page = read_page(report / "report.html")
    [train] = [t for t in page.tables if "th:test acc" in t["header"]]
    assert "th:train GFLOP/s" not in train["header"]
    assert all(row.count("–") == 0 for row in train["rows"])
    md = (report / "report.md").read_text()
    assert md.count("Not shown: steady samples/s and train GFLOP/s — none of these training records has them") == 1


def test_the_committed_report_holds_together():
    page = check_structure(ROOT / "profiles" / "report.html")
    assert any(src.startswith("report/latency-") for src in page.images)


def test_log_axes_print_plain_numbers():
    plt = pyplot()
    fig, ax = plt.subplots()
    values = [70.0, 150.0, 600.0, 900.0]
    ax.plot([1, 2, 3, 4], values)
    plain_axis(ax, "y", values)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    plt.close(fig)
    assert ax.get_yscale() == "log" and labels == ["100", "200", "500"]
    assert [plain_number(v) for v in (600, 2.5, 0.02, 12000)] == ["600", "2.5", "0.02", "12,000"]


def test_the_report_puts_each_machines_precisions_side_by_side_with_their_accuracy():
    """The committed records hold an fp32 and an int8 sweep of tiny/mid on one CPU, and mid's int8 export."""
    from fusionprof.report import find_records, precision_section

    blocks = precision_section(find_records([ROOT / "profiles"]))
    tables = [b for b in blocks if b[0] == "table"]
    assert tables, blocks
    rows = {(r[0], r[1]): r for t in tables for r in t[2]}
    assert ("mid", "fp32") in rows and ("mid", "int8") in rows
    assert "(onnx export" in rows[("mid", "int8")][4] and "%" in rows[("mid", "int8")][4]
    assert all(r[2] != "–" or r[3] != "–" for r in rows.values())  # no row without a figure


def test_a_later_sweep_of_fewer_fusions_does_not_stand_in_for_the_studys(tmp_path):
    """A later fp32 sweep of one fusion on the same models (an aoti check, say) leaves the study's fp32 sweep in the
    precision table; a sweep of other models is a table of its own."""
    from fusionprof.report import find_records, precision_section

    vm = ROOT / "profiles" / "vm"
    full = json.loads((vm / "latency-tiny-cpu-fp32-20261202T012114Z.json").read_text())
    partial = {**full, "created": "20261203T000000Z", "rows": [r for r in full["rows"] if r["fusion"] == "mid"]}
    elsewhere = {**partial, "rows": [{**r, "model": {"weights": "trained", "checkpoint": "/x/models/tiny-mid/c.pt"}}
                                     for r in partial["rows"]]}
    for name, record in (("full", full), ("partial", partial), ("elsewhere", elsewhere)):
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    shutil.copy(vm / "latency-tiny-cpu-bf16-20261202T012358Z.json", tmp_path / "bf16.json")
    blocks = precision_section(find_records([tmp_path]))
    [heading] = [b[1] for b in blocks if b[0] == "h3"]  # the other models have fp32 only: no table
    assert heading.endswith("· tiny · cpu · models in /tmp/fusionprof-cpu-lowprec/models · 2 threads")
    [table] = [b for b in blocks if b[0] == "table"]
    assert {r[0] for r in table[2] if r[1] == "fp32"} == {"bottleneck", "early", "late", "mid"}
    [cited] = [b[1] for b in blocks if b[0] == "p" and b[1].startswith("Records: ")]
    assert cited.startswith(f"Records: `{tmp_path / 'full.json'}`")


def test_the_precision_table_takes_accuracy_from_the_checkpoint_each_sweep_timed(tmp_path):
    """Checkpoints under a run name (``models/tiny-mid-r2/``, which the sweep finds as mid's newest run) keep their
    export's accuracy in the table: it is read from the checkpoint the rows name, not guessed from the fusion."""
    from fusionprof.report import find_records, precision_section

    vm = ROOT / "profiles" / "vm"
    renamed = "/x/models/tiny-{}-r2/checkpoint.pt"
    for precision, name in (("fp32", "latency-tiny-cpu-fp32-20261202T012114Z.json"),
                            ("int8", "latency-tiny-cpu-int8-20261202T012608Z.json")):
        record = json.loads((vm / name).read_text())
        record["config"]["models_dir"] = "/x/models"
        for row in record["rows"]:
            row["model"] = {"weights": "trained", "checkpoint": renamed.format(row["fusion"])}
        (tmp_path / f"{precision}.json").write_text(json.dumps(record))
    export = json.loads((vm / "export-tiny-mid-onnx-int8-20261202.json").read_text())
    export["checkpoint"] = renamed.format("mid")
    export["accuracy"]["exported_accuracy"] = 0.9321
    (tmp_path / "export.json").write_text(json.dumps(export))
    [table] = [b for b in precision_section(find_records([tmp_path])) if b[0] == "table"]
    rows = {(r[0], r[1]): r for r in table[2]}
    assert rows[("mid", "int8")][4].startswith("93.21% (onnx export")
    assert rows[("early", "int8")][4] == "–"  # no export record of that checkpoint here, no training run


def test_the_precision_table_says_when_its_sweeps_ran_other_backends_and_keeps_thread_counts_apart(tmp_path):
    """The AVX2 EPYC's trained tiny/mid: fp32 was swept on torch and aoti, int8 on onnxruntime and openvino; the
    table set 8.69 ms (aoti) beside 15.72 ms (onnxruntime) as if int8 were slower over the same backends. And a sweep
    on another thread count is another comparison, not a row of this one."""
    from fusionprof.report import find_records, precision_section

    vm = ROOT / "profiles" / "vm"
    for name in ("latency-tiny-cpu-fp32-20261127T121709Z.json", "latency-tiny-cpu-int8-20261127T120944Z.json"):
        shutil.copy(vm / name, tmp_path / name)
    blocks = precision_section(find_records([tmp_path]))
    [heading] = [b[1] for b in blocks if b[0] == "h3"]
    assert heading.endswith("· 2 threads")
    assert ("p", "These sweeps ran different backends (fp32: aoti, torch; int8: onnxruntime, openvino): each "
                 "precision's best is over its own sweep's backends, not over the same ones.") in blocks
    one_thread = json.loads((tmp_path / "latency-tiny-cpu-int8-20261127T120944Z.json").read_text())
    one_thread["environment"]["torch_threads"] = 1
    (tmp_path / "latency-tiny-cpu-int8-20261127T120944Z.json").write_text(json.dumps(one_thread))
    assert not [b for b in precision_section(find_records([tmp_path])) if b[0] == "table"]

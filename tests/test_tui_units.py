"""The TUI's pure parts: curves from events, the tailer's byte offsets, filters, formats."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from engine.rundir import RunDir, atomic_write_text
from tui.messages import RunUpdate
from tui.screens.compare import differing
from tui.screens.launch import parse_overrides
from tui.screens.runs import haystack, matches, parse_query
from tui.widgets.format import best_metric, fmt_duration, fmt_pct, fmt_progress, short, status_of
from tui.widgets.series import curves_from, decimate
from tui.workers import RunTail, UpdateBuffer, clean_line


def _line(**event: object) -> str:
    return json.dumps(event) + "\n"


def test_curves_place_train_steps_in_epochs_once_the_epoch_length_is_known() -> None:
    events = [{"split": "train", "kind": "step", "epoch": 1, "step": 5, "loss": 2.0, "lr": 0.1},
              {"split": "train", "kind": "epoch", "epoch": 1, "step": 10, "loss": 1.9},
              {"split": "val", "epoch": 1, "step": 10, "loss": 1.5, "top1": 0.25}]
    curves = curves_from(events)
    assert curves.get("train", "loss") == ([0.5], [2.0])  # epoch length learned from the epoch event
    assert curves.get("val", "top1") == ([1.0], [0.25])
    early = curves_from(events[:1])
    assert early.get("train", "loss") == ([5.0], [2.0])  # no epoch length yet: plotted against steps
    early.set_steps_per_epoch(10)
    assert early.get("train", "loss") == ([0.5], [2.0])


def test_curves_skip_non_numbers() -> None:
    curves = curves_from([{"split": "val", "epoch": 1, "loss": "nan", "top1": None},
                          {"split": "val", "epoch": 2, "loss": 1.0, "top1": True}], steps_per_epoch=4)
    assert curves.get("val", "loss") == ([2.0], [1.0])
    assert curves.get("val", "top1") == ([], [])


def test_decimate_keeps_the_newest_point_and_the_limit() -> None:
    xs = list(range(1000))
    dx, _ = decimate(xs, xs, 50)
    assert len(dx) <= 50 and dx[-1] == 999 and dx[0] == 0
    assert decimate([1, 2], [3, 4], 50) == ([1, 2], [3, 4])


def test_tail_reads_only_new_bytes_and_waits_for_unfinished_lines(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    metrics.write_text(_line(split="val", epoch=1, top1=0.1) + '{"split": "val", "epo')
    (run / "train.log").write_text("start\nprogress 10%\rprogress 100%\npartial")
    atomic_write_text(run / "run.json", json.dumps({"id": "run", "status": "running"}))
    tail = RunTail(RunDir(run))
    first = tail.poll()
    assert first is not None
    assert [e["epoch"] for e in first.events] == [1]
    assert first.log_lines == ["start", "progress 100%"]
    assert first.info == {"id": "run", "status": "running"}
    assert tail.poll() is None  # nothing new: nothing posted
    with open(metrics, "a") as handle:
        handle.write('ch": 2, "top1": 0.2}\n' + "not json\n")
    with open(run / "train.log", "a") as handle:
        handle.write(" line\n")
    second = tail.poll()
    assert second is not None and [e["epoch"] for e in second.events] == [2]
    assert second.log_lines == ["partial line"] and second.info is None
    assert tail.metrics.offset == metrics.stat().st_size


def test_tail_notices_a_rewritten_metrics_file_and_a_vanished_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    metrics.write_text(_line(split="val", epoch=1) + _line(split="val", epoch=2))
    tail = RunTail(RunDir(run))
    assert len(tail.poll().events) == 2
    atomic_write_text(metrics, _line(split="val", epoch=1))  # a resume truncates after its checkpoint
    update = tail.poll()
    assert update.reset and [e["epoch"] for e in update.events] == [1]
    for child in run.iterdir():
        child.unlink()
    run.rmdir()
    assert tail.poll().missing
    assert tail.poll() is None


def test_update_buffer_coalesces_into_one_wake_up() -> None:
    buffer = UpdateBuffer()
    assert buffer.add(RunUpdate("a", events=[{"step": 1}], log_lines=["x"]))
    assert not buffer.add(RunUpdate("a", events=[{"step": 2}], info={"status": "running"}))
    assert not buffer.add(RunUpdate("b", events=[{"step": 9}]))
    drained = {u.run_id: u for u in buffer.drain()}
    assert [e["step"] for e in drained["a"].events] == [1, 2] and drained["a"].info == {"status": "running"}
    assert buffer.drain() == []
    assert buffer.add(RunUpdate("a", events=[{"step": 3}]))
    buffer.add(RunUpdate("a", events=[{"step": 1}], reset=True))
    (only,) = buffer.drain()
    assert only.reset and only.events == [{"step": 1}]


def test_clean_line_drops_escapes() -> None:
    assert clean_line(b"\x1b[31mred\x1b[0m\r") == "[31mred[0m"
    assert clean_line("caf\xe9".encode("latin-1")) == "caf\ufffd"


@pytest.mark.parametrize(("seconds", "text"), [(None, "-"), (42, "42s"), (725, "12m05s"), (11220, "3h07m"),
                                              (183600, "2d03h")])
def test_fmt_duration(seconds: float | None, text: str) -> None:
    assert fmt_duration(seconds) == text


def test_field_formats() -> None:
    doc = {"status": "running", "host": "elsewhere", "epoch": 3, "epochs": 10,
           "best": {"test.top1": 0.7326}}
    assert status_of(doc) == "running"  # another host's pid cannot be checked: trusted
    assert status_of({"status": "running", "host": socket.gethostname(), "pid": 4_000_000}) == "interrupted"
    assert status_of({"status": "finished", "_missing": True}) == "missing"
    assert fmt_progress(doc) == "3/10"
    assert best_metric(doc) == 0.7326 and fmt_pct(best_metric(doc)) == "73.3"
    assert short("a\nbcdef", 4) == "a b…"


def test_query_filters_by_status_method_tag_and_words() -> None:
    docs = [{"id": "1", "name": "kd-wrn", "status": "finished", "method": "kd", "tags": ["Best"]},
            {"id": "2", "name": "base", "status": "failed", "method": "supervised", "tags": []}]

    def shown(text: str) -> list[str]:
        filters, words = parse_query(text)
        return [d["id"] for d in docs if matches(d, filters, words, haystack(d))]

    assert shown("") == ["1", "2"]
    assert shown("status:fin") == ["1"]
    assert shown("method:super") == ["2"]
    assert shown("tag:best") == ["1"]
    assert shown("wrn") == ["1"]
    assert shown('"kd-wrn" status:failed') == []
    assert shown('unclosed "quote') == []


def test_overrides_lines() -> None:
    text = "# comment\noptim.lr = 0.1\n\ntrain.epochs=3\n  model.arch = 'resnet8'  \n"
    assert parse_overrides(text) == ["optim.lr=0.1", "train.epochs=3", "model.arch='resnet8'"]


def test_only_differing_parameters_are_listed() -> None:
    params = [{"run.name": "a", "optim.lr": 0.1, "train.epochs": 3},
              {"run.name": "b", "optim.lr": 0.2, "train.epochs": 3, "train.seed": 1}]
    assert differing(params) == ["optim.lr", "train.seed"]

"""cloud/distill/report.py and protos/distill.py: valid SVG with a point per candidate per class; JSON round trip."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from datetime import datetime, timezone

from edgefleet.cloud.distill.report import plot_svg, summary_text
from edgefleet.protos.distill import CandidateFigures, ClassResult, DistillReport, ModelFigures, StudentFigures
from edgefleet.protos.messages import Budgets

SVG = "{http://www.w3.org/2000/svg}"


def _cand(cid, score, mj, fits=True, precision="fp32"):
    return CandidateFigures(candidate=cid, family="mlp", width_mult=1.0, depth=1, precision=precision,
                            runtime="onnxruntime", precision_reason="test", accuracy=score, agreement=score,
                            score=score, params=1000, macs=1000, size_bytes=4000, predicted_p95_ms=0.1,
                            predicted_mj=mj, fits=fits, why_not=None if fits else "energy 9 mJ > 1 mJ", drift=0.0)


def _report() -> DistillReport:
    a = [_cand("mlp-w0.25-d1", 0.95, 0.002), _cand("mlp-w0.5-d1", 0.97, 0.004), _cand("mlp-w1-d1", 0.98, 0.01)]
    b = [_cand("mlp-w0.25-d1", 0.95, 0.5, precision="fp16"), _cand("mlp-w0.5-d1", 0.97, 2.0, False),
         _cand("mlp-w1-d1", 0.98, 9.0, False)]
    c = [_cand(x.candidate, x.score, 50.0, False) for x in a]
    classes = {
        "x86-cpu": ClassResult(device_class="x86-cpu", budgets=Budgets(mj_per_inference=500.0), chosen=a[2],
                               reason="best", candidates=a),
        "jetson-orin-nano": ClassResult(device_class="jetson-orin-nano", budgets=Budgets(mj_per_inference=1.0),
                                        chosen=b[0], reason="best", candidates=b),
        "tiny": ClassResult(device_class="tiny", budgets=Budgets(mj_per_inference=1.0), chosen=None,
                            nearest=c[0], reason="no candidate fits", candidates=c),
    }
    students = [StudentFigures(candidate=x.candidate, family="mlp", width_mult=1.0, depth=1, epochs=10, best_epoch=7,
                               val_agreement=0.97, accuracy=x.accuracy, agreement=x.agreement, params=1000, macs=1000,
                               size_bytes=4000, train_s=1.0) for x in a]
    return DistillReport(model_name="digits & co", task="classification",
                         teacher=ModelFigures(size_bytes=4424, accuracy=0.97, input_shape=[None, 64],
                                              output="probabilities"),
                         teacher_output_kind="probabilities", how_probabilities_were_handled="log(p + 1e-12)",
                         metric="accuracy against the labels on held-out rows", n_samples=1797, n_train=1257,
                         n_val=270, n_heldout=270, has_labels=True, temperature=4.0, alpha=0.7, students=students,
                         classes=classes, seed=0, created_at=datetime(2025, 1, 1, tzinfo=timezone.utc))


def test_svg_is_valid_xml_with_a_point_per_candidate_per_class():
    report = _report()
    root = ET.fromstring(plot_svg(report))  # raises on malformed XML (the model name holds an '&')
    assert root.tag == f"{SVG}svg"
    points = root.findall(f".//{SVG}circle[@class='point']")
    assert len(points) == 9
    assert {p.get("data-class") for p in points} == {"x86-cpu", "jetson-orin-nano", "tiny"}
    chosen = root.findall(f".//{SVG}circle[@class='chosen']")
    assert sorted(c.get("data-class") for c in chosen) == ["jetson-orin-nano", "x86-cpu"]  # none for "tiny"
    budgets = root.findall(f".//{SVG}line[@class='budget']")
    assert len(budgets) == 3
    assert root.find(f".//{SVG}g[@class='legend']") is not None
    texts = "".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "predicted mJ per inference (log scale)" in texts and "chosen" in texts and "accuracy" in texts


def test_points_sit_where_their_figures_say():
    root = ET.fromstring(plot_svg(_report()))
    by = {(p.get("data-class"), p.get("data-candidate")): p for p in root.iter(f"{SVG}circle")
          if p.get("class") == "point"}
    x86 = [by[("x86-cpu", c)] for c in ("mlp-w0.25-d1", "mlp-w0.5-d1", "mlp-w1-d1")]
    xs = [float(p.get("cx")) for p in x86]
    ys = [float(p.get("cy")) for p in x86]
    assert xs == sorted(xs) and ys == sorted(ys, reverse=True)  # more mJ to the right, higher score higher up
    # Log x: 0.002 -> 0.004 is as far as 0.5 -> 1.0.
    j = by[("jetson-orin-nano", "mlp-w0.25-d1")]
    budget = next(b for b in root.iter(f"{SVG}line") if b.get("data-class") == "jetson-orin-nano")
    assert abs((xs[1] - xs[0]) - (float(budget.get("x1")) - float(j.get("cx")))) < 0.2
    # Candidates that do not fit are hollow.
    assert by[("jetson-orin-nano", "mlp-w1-d1")].get("fill") == "white"


def test_empty_report_still_plots():
    report = _report().model_copy(update={"classes": {}})
    root = ET.fromstring(plot_svg(report))
    assert root.findall(f".//{SVG}circle[@class='point']") == []


def test_report_json_round_trip_and_summary():
    report = _report()
    again = DistillReport.model_validate(json.loads(report.to_wire()))
    assert again == report and again.kind == "distill_report" and again.schema_version == 1
    text = summary_text(report)
    assert "x86-cpu: chosen mlp-w1-d1" in text and "tiny: NONE FITS; nearest mlp-w0.25-d1" in text

"""The methods text: written from the records of what ran (only that), every citation in the reference table,
variants counted, and the table in step with CITATION.cff."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pipeline.reports import methods as m
from pipeline.reports.references import REFERENCES, bibtex, cited, numbered

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = {"bidsdl": "0.1.0", "nipype": "1.11.0", "SimpleITK": "2.5.7", "torch": "2.13.0"}


def _image(source="sub-01/anat/sub-01_T1w.nii.gz", *, warp=True, prediction=False, versions=VERSIONS):
    check = {"metric": "registration_ncc", "limits": "fail < 0.25, flag < 0.4"}
    return m.ImageRecords(
        source=source, kind="T1w", versions=versions,
        preproc={"BiasFieldCorrection": {"Method": "N4 (SimpleITK)", "fit_voxel_mm": 5.0, "iterations": [50, 50],
                                         "FittedIn": "the brain mask"}},
        brain_mask={"Version": "1.0.2", "Threshold": 0.5, "Postprocessing": "largest component"},
        affine={"Registration": {"method": "SimpleITK", "settings": {"histogram_bins": 32}, "seed": 42}},
        warp={"Registration": {"Method": "ANTs SyN", "Settings": {"resolution_mm": 2.0}, "Seed": 42}} if warp else None,
        template={"Resolution": "1 mm", "IntensityNormalization": {"method": "robust z-score"}},
        iqm={"qc": {"checks": [check]}},
        prediction={"task": "classification", "target": "diagnosis", "models": [
            {"name": "diagnosis_conv5fc3", "content_sha256": "ab" * 32, "bidsdl_version": "0.1.0"}]} if prediction
        else None,
    )  # fmt: skip


def test_only_what_ran_is_described():
    text = m.participant_methods([_image(warp=False)]).markdown()
    assert "N4 [@n4]" in text and "[@deepbet]" in text and "registration_ncc (fail < 0.25, flag < 0.4)" in text
    assert "SyN" not in text and "## Inference" not in text and "## Learning" not in text
    with_model = m.participant_methods([_image(prediction=True)]).markdown()
    assert "SyN [@syn; @antsx]" in with_model and "## Inference" in with_model and "abababababab" in with_model


def test_images_processed_differently_say_how_many_each_variant_covers():
    images = [_image(f"sub-0{i}/anat/sub-0{i}_T1w.nii.gz", warp=i < 3,
                     versions={**VERSIONS, "bidsdl": "0.1.0" if i < 2 else "0.2.0"}) for i in range(1, 4)]  # fmt: skip
    text = m.participant_methods(images).markdown()
    assert "cover 3 T1w images" in text
    assert "(2 of the 3 T1w images:) A nonlinear registration" in text
    assert "(1 of the 3 T1w images:) Images were processed with bidsdl 0.1.0" in text
    assert "(2 of the 3 T1w images:) Images were processed with bidsdl 0.2.0" in text
    assert text.count("Intensity non-uniformity") == 1  # the same step, once


def test_every_citation_is_in_the_table_and_the_bibtex_holds_only_those():
    results = {"target": "diagnosis", "task": "classification", "architecture": "conv5fc3", "inputs": ["T1w"],
               "n_images": 10, "n_subjects": 8, "excluded": [{"source": "x", "reason": "QC failed: mask"}],
               "checks": [{"name": "No participant in two splits", "result": "pass"}],
               "test": {"metrics": {"roc_auc": 0.8}, "ci": {"roc_auc": [0.6, 0.95]}},
               "nested": {"outer_folds": 5, "n_tested": 8, "n_images": 10}, "distribution": {"file": "d"},
               "permutation_control": {"metric": "roc_auc", "deep": 0.5},
               "baseline": {"model": "logistic regression", "features": "voxels", "selection": "inner CV",
                            "headline": "roc_auc", "comparison": {"roc_auc": {"difference": 0.1, "ci": [-0.1, 0.3]}}}}
    record = {"model": {"in_channels": 1}, "input": {"space": "MNI", "resolution_mm": 2.0},
              "learning_settings": {"n_folds": 2, "lr": 0.001, "epochs": 3, "seed": 1, "augment": ["flip"]}}
    methods = m.study_methods(results, record, m.participant_methods([_image(prediction=True)]))
    m.external_methods({"models": [{"name": "x", "content_sha256": "cd" * 32}], "n_predicted": 3, "n_evaluated": 3,
                        "evaluation": {"metrics": {"roc_auc": 0.7}, "ci": {"roc_auc": [0.5, 0.9]}}}, methods)
    text = methods.markdown()
    keys = methods.keys()
    assert set(keys) <= set(REFERENCES), set(keys) - set(REFERENCES)
    assert {"nestedcv", "clinicadl", "adamw", "sklearn", "bootstrap", "permutation", "leakage"} <= set(keys)
    assert "roc_auc 0.800 (95% CI 0.600 to 0.950)" in text and "1 image(s) left out (1: QC failed)" in text
    assert "paired on the same test images: 0.100 (95% CI -0.100 to 0.300)" in text
    assert sorted(re.findall(r"^@\w+\{(\w+),", methods.bibtex(), re.M)) == sorted(keys)


def test_the_reports_number_citations_in_order():
    keys = cited(["a [@n4] b [@deepbet; @n4]", "c [@mriqc]"])
    assert keys == ["n4", "deepbet", "mriqc"]
    assert numbered(["b [@deepbet; @n4]"], keys) == ["b [2, 1]"]
    assert bibtex(["n4"]).startswith("@article{n4,") and "pages = {1310--1320}" in bibtex(["n4"])


def test_methods_and_its_references_written_atomically_side_by_side(tmp_path):
    path = m.write_methods(m.participant_methods([_image()]), tmp_path)
    assert path == tmp_path / "methods.md" and (tmp_path / "references.bib").read_text().count("@") >= 5
    assert "## References" in path.read_text() and "- [@n4] Tustison" in path.read_text()


def test_citation_cff_references_are_in_the_table():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    dois = {r.doi for r in REFERENCES.values() if r.doi}
    titles = {r.title.lower() for r in REFERENCES.values()}
    for reference in citation["references"]:
        assert str(reference.get("doi", "")) in dois or reference["title"].lower() in titles, reference["title"]


def test_the_report_says_first_whether_each_model_is_distinguishable_from_chance():
    from pipeline.learn.registry import get_task
    from pipeline.reports.group_learning import against_chance

    results = {"classes": ["CN", "AD"], "test": {"metrics": {"roc_auc": 0.81}, "ci": {"roc_auc": [0.62, 0.95]}},
               "baseline": {"test": {"metrics": {"roc_auc": 0.44}, "ci": {"roc_auc": [0.13, 0.78]}}},
               "volumes_baseline": {"test": {"metrics": {"roc_auc": 0.2}, "ci": {"roc_auc": [0.05, 0.4]}}},
               "permutation_control": {"deep": {"metrics": {"roc_auc": 0.52}}}}
    found = against_chance(results, get_task("classification"))
    assert [r["verdict"] for r in found["rows"]] == ["distinguishable from chance (above it)",
                                                    "not distinguishable from chance", "worse than chance"]
    assert found["text"].startswith("Against chance (roc_auc 0.5): the network scored 0.810 (95% CI 0.620 to 0.950)")
    assert "permutation control) scored 0.520" in found["text"]
    three = {"classes": ["a", "b", "c"], "test": {"metrics": {"balanced_accuracy": 0.4},
                                                  "ci": {"balanced_accuracy": [0.34, 0.5]}}}  # fmt: skip
    assert against_chance(three, get_task("classification"))["rows"][0]["verdict"].startswith("distinguishable")
    regression = {"classes": [], "test": {"metrics": {"r2": -0.35}, "ci": {"r2": [-3.1, 0.1]}}}
    assert "(r2 0)" in against_chance(regression, get_task("regression"))["text"]
    assert against_chance({"classes": [], "test": {"metrics": {"dice": 0.8}}}, get_task("segmentation")) is None
    read_back = {"classes": ["CN", "AD"], "test": {"metrics": {"roc_auc": 0.5}, "ci": {"roc_auc": [None, None]}}}
    assert against_chance(read_back, get_task("classification"))["rows"][0]["verdict"] == "no interval on this test set"

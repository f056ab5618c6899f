"""Graph builds on stub BIDS trees: fast, no processing."""

from __future__ import annotations

from pathlib import Path

from pipeline.bids.layout import collect_t1w, index_dataset
from pipeline.cli.parser import parse_args
from pipeline.derivatives import SOURCE_KIND
from pipeline.workflows.anatomical import init_anat_audit_wf, init_anat_wf
from pipeline.workflows.base import image_key, init_bidsdl_wf, init_single_subject_wf
from tests.helpers import make_bids


def _stub_tree(root: Path) -> Path:
    """A BIDS tree whose images are empty files: enough to index and build graphs."""
    (root / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "stub", "BIDSVersion": "1.9.0"}')
    for rel in (
        "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_run-1_T1w.nii.gz",
        "sub-02/ses-1/anat/sub-02_ses-1_acq-fast_T1w.nii",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    return root


def test_anat_wf_chains_audit_preprocessing_qc_and_outputs(tmp_path):
    wf = init_anat_wf(bids_dir=tmp_path, output_dir=tmp_path / "out", model_resolution=2.0, seed=1, omp_nthreads=2)
    names = set(wf.list_node_names())
    for step in ("anat_audit_wf.audit", "anat_preproc_wf.prepare", "anat_preproc_wf.n4", "anat_preproc_wf.register",
                 "anat_preproc_wf.to_template", "anat_qc_wf.iqms", "anat_qc_wf.reportlets",
                 "anat_derivatives_wf.ds_xfm", "anat_derivatives_wf.ds_t1w_model"):  # fmt: skip
        assert step in names, step
    register = wf.get_node("anat_preproc_wf.register")
    # the registration metric is single-threaded: it reserves one core; N4 gets omp_nthreads
    assert register.inputs.seed == 1 and register.n_procs == 1
    assert wf.get_node("anat_preproc_wf.n4").n_procs == 2
    ds_model = wf.get_node("anat_derivatives_wf.ds_t1w_model")
    assert ds_model.inputs.res == "2" and ds_model.inputs.space == "MNI152NLin2009aSym"
    ds_xfm = wf.get_node("anat_derivatives_wf.ds_xfm")
    assert (ds_xfm.inputs.from_, ds_xfm.inputs.to, ds_xfm.inputs.mode, ds_xfm.inputs.suffix) == (
        SOURCE_KIND, "MNI152NLin2009aSym", "image", "xfm")  # fmt: skip  (the source's kind, filled in by the writer)
    model_15 = init_anat_wf(bids_dir=tmp_path, output_dir=tmp_path, model_resolution=1.5, seed=1, omp_nthreads=1)
    assert model_15.get_node("anat_derivatives_wf.ds_t1w_model").inputs.res == "1p5"


def test_anat_audit_wf_has_io_nodes_and_a_sink(tmp_path):
    wf = init_anat_audit_wf(bids_dir=tmp_path, output_dir=Path("/out"))
    assert set(wf.list_node_names()) == {"inputnode", "outputnode", "audit", "ds_audit"}
    sink = wf.get_node("ds_audit")
    assert sink.inputs.desc == "audit" and sink.inputs.base_directory == "/out"
    assert sink.overwrite is True


def test_single_subject_wf_has_one_audit_per_image(tmp_path):
    root = _stub_tree(tmp_path / "bids")
    images = collect_t1w(index_dataset(root), subjects=["01"])
    wf = init_single_subject_wf(subject="01", images=images, bids_dir=root, output_dir=tmp_path / "out")
    assert wf.name == "sub_01_wf"
    names = sorted(n for n in wf.list_node_names() if n.endswith(".audit"))
    assert names == ["anat_ses_1_wf.anat_audit_wf.audit", "anat_ses_2_run_1_wf.anat_audit_wf.audit"]
    assert [image_key(i) for i in images] == ["ses_1", "ses_2_run_1"]
    node = wf.get_node("anat_ses_1_wf.inputnode")
    assert node.inputs.t1w.endswith("sub-01_ses-1_T1w.nii.gz")


def test_top_level_wf_isolates_subjects_crash_dirs(tmp_path):
    root = _stub_tree(tmp_path / "bids")
    config = parse_args([str(root), str(tmp_path / "out"), "participant", "--nprocs", "1"])
    images = collect_t1w(index_dataset(root))
    subjects = {s: [i for i in images if i.subject == s] for s in ("01", "02")}
    wf = init_bidsdl_wf(config, subjects=subjects, run_id="RUN", work_dir=tmp_path / "work")
    assert wf.base_dir == str(tmp_path / "work")
    assert float(wf.config["execution"]["poll_sleep_duration"]) <= 0.1
    for subject in ("01", "02"):
        sub_wf = wf.get_node(f"sub_{subject}_wf")
        for name in sub_wf.list_node_names():
            node = sub_wf.get_node(name)
            assert node.config["execution"]["crashdump_dir"] == str(tmp_path / "out" / f"sub-{subject}" / "log" / "RUN")
    assert len([n for n in wf.list_node_names() if n.endswith(".audit")]) == 3


def test_model_adds_an_inference_node_and_its_sinks_per_image(tmp_path):
    from pipeline.learn.package import read_package
    from tests.helpers import make_package

    root = _stub_tree(tmp_path / "bids")
    model = make_package(tmp_path / "m")  # a real package: the graph reads it through read_package's checks
    config = parse_args([str(root), str(tmp_path / "out"), "participant", "--model", str(model),
                         "--allow-training-subjects", "--omp-nthreads", "2"])  # fmt: skip
    images = collect_t1w(index_dataset(root))
    record = read_package(model)
    wf = init_bidsdl_wf(config, subjects={"01": images[:2]}, run_id="RUN", work_dir=tmp_path / "w",
                        models=[record])  # fmt: skip
    infer = [n for n in wf.list_node_names() if n.endswith("anat_inference_wf.infer")]
    assert len(infer) == 2
    node = wf.get_node(infer[0])
    assert node.inputs.model_dirs == [str(model)] and node.inputs.model_hashes == [record["content_sha256"]]
    assert node.inputs.allow_training_subjects is True and node.n_procs == 2
    assert node.inputs.dataset == "stub"  # participant IDs are compared within this dataset
    sinks = {n.rsplit(".", 1)[1] for n in wf.list_node_names() if ".inference_derivatives_wf." in n}
    assert sinks == {"inputnode", "ds_prediction", "ds_saliency", "ds_gradcam", "ds_fig_attribution"}
    inputs = wf.get_node("sub_01_wf.anat_ses_1_wf.inputnode").inputs
    assert inputs.participant_id == "sub-01" and inputs.source == "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
    # without --model: no inference, but every image gets its brain-mask mesh
    plain = init_anat_wf(bids_dir=root, output_dir=tmp_path / "out", model_resolution=2.0, seed=1, omp_nthreads=1)
    names = set(plain.list_node_names())
    assert not any("inference" in n for n in names)
    assert {"anat_qc_wf.mesh", "anat_derivatives_wf.ds_mesh", "anat_derivatives_wf.ds_fig_mesh"} <= names


def test_the_progress_counts_exactly_the_nodes_nipype_runs(tmp_path):
    """Progress counts a participant done when each of its nodes has ended: the nodes listed must be those Nipype
    keeps in the graph it runs (it drops the IdentityInterface ones)."""
    from pipeline.workflows.base import executed_node_names

    root = make_bids(tmp_path / "bids", {"01": ["anat/sub-01_T1w.nii.gz"], "02": ["anat/sub-02_T1w.nii.gz"]})
    config = parse_args([str(root), str(tmp_path / "out"), "participant"])
    subjects = {img.subject: [img] for img in collect_t1w(index_dataset(root))}
    workflow = init_bidsdl_wf(config, subjects=subjects, run_id="r", work_dir=tmp_path / "work")
    from copy import deepcopy

    from nipype.pipeline.engine.utils import generate_expanded_graph

    executed = generate_expanded_graph(deepcopy(workflow._create_flat_graph()))  # what workflow.run() executes
    expected = sorted(node.fullname.removeprefix("bidsdl_wf.") for node in executed.nodes())
    assert executed_node_names(workflow) == expected
    assert any(name.startswith("sub_02_wf.") for name in expected)


def test_images_of_other_kinds_are_aligned_to_a_t1w_of_their_session(tmp_path):
    """A FLAIR with a T1w in its session gets a co-registration workflow fed by that T1w's preprocessing; two
    FLAIRs in one session get one each; a FLAIR in a session without a T1w gets none (it is listed, not run)."""
    root = _stub_tree(tmp_path / "bids")
    for rel in ("sub-01/ses-1/anat/sub-01_ses-1_acq-2d_FLAIR.nii.gz",
                "sub-01/ses-1/anat/sub-01_ses-1_acq-3d_FLAIR.nii.gz",
                "sub-01/ses-2/anat/sub-01_ses-2_run-1_T2w.nii.gz", "sub-01/ses-3/anat/sub-01_ses-3_FLAIR.nii.gz"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    index = index_dataset(root)
    assert [i.path.name for i in collect_t1w(index, subjects=["01"])] == [
        "sub-01_ses-1_T1w.nii.gz", "sub-01_ses-2_run-1_T1w.nii.gz"]  # fmt: skip
    images = index.images(["01"])
    wf = init_single_subject_wf(subject="01", images=images, bids_dir=root, output_dir=tmp_path / "out")
    coreg = sorted({n.split(".")[0] for n in wf.list_node_names() if n.startswith("coreg_")})
    assert coreg == ["coreg_FLAIR_ses_1_acq_2d_wf", "coreg_FLAIR_ses_1_acq_3d_wf", "coreg_T2w_ses_2_run_1_wf"]
    feeds = {(u.name, v.name) for u, v in wf._graph.edges()}
    assert ("anat_ses_1_wf", "coreg_FLAIR_ses_1_acq_2d_wf") in feeds
    assert ("anat_ses_2_run_1_wf", "coreg_T2w_ses_2_run_1_wf") in feeds
    node = wf.get_node("coreg_T2w_ses_2_run_1_wf.coregister")
    assert node.inputs.reference_source == "sub-01/ses-2/anat/sub-01_ses-2_run-1_T1w.nii.gz"
    assert node.inputs.pairing == "the only T1w of ses-2"
    sink = wf.get_node("coreg_FLAIR_ses_1_acq_2d_wf.coreg_derivatives_wf.ds_preproc_reference")
    assert (sink.inputs.space, sink.inputs.desc, sink.inputs.suffix) == ("T1w", "preproc", SOURCE_KIND)
    assert sink.inputs.metadata["SpatialReference"] == "sub-01/ses-1/anat/sub-01_ses-1_desc-preproc_T1w.nii.gz"
    # a participant with only a FLAIR is no participant of the run (nothing to align it to)
    assert index.participants() == ["01", "02"]

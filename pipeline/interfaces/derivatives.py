"""Nipype interface that hands results to :mod:`pipeline.derivatives`, the one writer."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from .. import derivatives


class _DerivativesSinkInputSpec(BaseInterfaceInputSpec):
    base_directory = Directory(mandatory=True, desc="OUTPUT_DIR")
    bids_dir = Directory(mandatory=True, desc="BIDS_DIR (for relative Sources)")
    source_file = File(mandatory=True, desc="the BIDS file the result derives from")
    in_file = File(exists=True, mandatory=True, desc="the result to save")
    suffix = traits.Str(derivatives.SOURCE_KIND, usedefault=True, desc="the suffix (SOURCE_KIND: the source's)")
    datatype = traits.Enum("anat", "figures", usedefault=True)
    desc = traits.Str(desc="the 'desc' entity")
    space = traits.Str(desc="the 'space' entity")
    res = traits.Str(desc="the 'res' entity")
    from_ = traits.Str(desc="the 'from' entity")
    to = traits.Str(desc="the 'to' entity")
    mode = traits.Str(desc="the 'mode' entity")
    label = traits.Str(desc="the 'label' entity (one structure)")
    metadata = traits.Dict(desc="extra sidecar fields")
    metadata_file = File(exists=True, desc="a JSON record whose fields go into the sidecar")
    reference = traits.Dict(
        desc="entities (desc, space, res, suffix) of the derivative of the same source whose grid this one lies on: "
        "its path becomes the sidecar's SpatialReference"
    )


class _DerivativesSinkOutputSpec(TraitedSpec):
    out_file = File(desc="where the derivative was written")


class DerivativesSink(SimpleInterface):
    """Save a result as a BIDS derivative of ``source_file`` (atomically, with its sidecar)."""

    input_spec = _DerivativesSinkInputSpec
    output_spec = _DerivativesSinkOutputSpec

    def _run_interface(self, runtime):
        import json

        entities = {
            key.rstrip("_"): getattr(self.inputs, key)
            for key in ("desc", "space", "res", "from_", "to", "mode", "label")
            if getattr(self.inputs, key)
        }
        metadata = dict(self.inputs.metadata or {})
        if self.inputs.metadata_file:
            metadata.update(json.loads(Path(self.inputs.metadata_file).read_text()))
        if self.inputs.reference:
            metadata["SpatialReference"] = derivatives.spatial_reference(
                Path(self.inputs.base_directory), self.inputs.source_file, **self.inputs.reference
            )
        out = derivatives.save_derivative(
            Path(self.inputs.base_directory),
            Path(self.inputs.in_file),
            source=self.inputs.source_file,
            bids_dir=Path(self.inputs.bids_dir),
            suffix=self.inputs.suffix,
            datatype=self.inputs.datatype,
            metadata=metadata,
            **entities,
        )
        self._results["out_file"] = str(out)
        return runtime


def sink_inputs(
    name: str, model_resolution: float | None = None, *, label_desc: str | None = None, structure: str | None = None
) -> dict[str, str]:
    """:class:`DerivativesSink`'s naming inputs for the derivative ``name`` (a key of
    :data:`pipeline.derivatives.DERIVATIVES`): the writer names files from the same table as the readers
    (:data:`~pipeline.derivatives.SOURCE_KIND`, the source image's kind, is filled in by the writer).

    >>> sink_inputs("xfm")
    {'suffix': 'xfm', 'datatype': 'anat', 'from_': '<kind>', 'to': 'MNI152NLin2009aSym', 'mode': 'image'}
    """
    kind = derivatives.DERIVATIVES[name]
    resolved = kind.resolved(model_resolution, label_desc=label_desc, structure=structure,
                             source_kind=derivatives.SOURCE_KIND)  # fmt: skip
    entities = {("from_" if key == "from" else key): value for key, value in resolved.items()}
    return {"suffix": kind.suffix, "datatype": kind.datatype, **entities}

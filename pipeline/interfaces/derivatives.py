"""Nipype interface that hands results to :mod:`pipeline.derivatives`, the one writer."""

from __future__ import annotations

import json
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
    source_file = File(mandatory=True, desc="the BIDS file the result derives from")
    in_file = File(exists=True, mandatory=True, desc="the result to save")
    desc = traits.Str(mandatory=True, desc="the 'desc' entity of the derivative")
    suffix = traits.Str("T1w", usedefault=True)


class _DerivativesSinkOutputSpec(TraitedSpec):
    out_file = File(desc="where the derivative was written")


class DerivativesSink(SimpleInterface):
    """Save a JSON record as a BIDS derivative of ``source_file`` (atomically)."""

    input_spec = _DerivativesSinkInputSpec
    output_spec = _DerivativesSinkOutputSpec

    def _run_interface(self, runtime):
        data = json.loads(Path(self.inputs.in_file).read_text())
        out = derivatives.write_derivative_json(
            Path(self.inputs.base_directory),
            self.inputs.source_file,
            data,
            desc=self.inputs.desc,
            suffix=self.inputs.suffix,
        )
        self._results["out_file"] = str(out)
        return runtime

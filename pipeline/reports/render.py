"""Fill jinja2 templates (autoescaped) into self-contained HTML reports."""

from __future__ import annotations

import functools
import html
import logging
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2

from ..derivatives import write_text

LOGGER = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """One environment per process, so each template is compiled once (~0.1 s each), not once per report."""
    folder = files("pipeline.templates")
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, context: dict[str, Any]) -> str:
    return environment().get_template(template).render(**context)


def write_report(path: Path, template: str, context: dict[str, Any]) -> Path | None:
    """Render and write a report; a failure is logged, never fatal to the outputs it describes."""
    try:
        return write_text(path, render(template, context))
    except (jinja2.TemplateError, OSError, TypeError, ValueError) as exc:
        LOGGER.error("Could not write the report %s: %s", path, exc)
        return None


def write_fallback_report(path: Path, title: str, reason: str, errors: Sequence[str]) -> Path | None:
    """A plain, self-contained page in place of a report that could not be made: what went wrong with the
    report, and the errors it would have shown (escaped)."""
    items = "".join(f"<pre>{html.escape(str(e))}</pre>" for e in errors) or "<p>No errors were recorded.</p>"
    page = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}: report "
        f"unavailable</title></head><body><h1>{html.escape(title)}</h1><p><strong>The full report could not be "
        f"made: {html.escape(reason)}.</strong> The outputs on disk are unaffected; please report this as a bug "
        f"of bidsdl with the log of the run.</p><h2>Errors</h2>{items}</body></html>\n"
    )
    try:
        return write_text(path, page)
    except OSError as exc:
        LOGGER.error("Could not write even a plain report %s: %s", path, exc)
        return None

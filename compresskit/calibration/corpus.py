"""Turn a source's records into texts: documents (window format) or prompt strings (QA formats).

Field templates are Jinja (sandboxed, strict: a missing field is an error, not an empty string),
with two filters for answers that carry their rationale, as GSM8K's does
(``"<rationale>\\n#### <number>"``): ``before(sep)`` and ``after(sep)``.

Local question-answer files need no schema: records with ``question`` and ``answer`` are
recognised; when the answer contains ``####`` it is split GSM8K-style into rationale (before)
and final answer (after), and a ``rationale`` column is used when present.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from compresskit.calibration.readers import read_file_records, read_hub_records
from compresskit.calibration.registry import SourceDefinition, prompt_frames
from compresskit.errors import CalibrationError

#: The prompt frame each question-answer format renders (frames in calibration/definitions/formats.yaml).
FRAME_OF_FORMAT = {"icl": "qa", "single": "qa", "cot": "cot", "zero": "zero"}
FIELDS_NEEDED = {"qa": ("question", "answer"), "cot": ("question", "rationale", "answer"), "zero": ("question",)}
GSM8K_SEPARATOR = "####"


def _before(value: Any, sep: str) -> str:
    text = str(value)
    return text.split(sep, 1)[0].strip() if sep in text else ""


def _after(value: Any, sep: str) -> str:
    return str(value).rsplit(sep, 1)[-1].strip()


@functools.lru_cache(maxsize=1)
def _environment() -> SandboxedEnvironment:
    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["before"] = _before
    env.filters["after"] = _after
    return env


@functools.lru_cache(maxsize=256)
def _template(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise CalibrationError(f"invalid calibration template {source!r}: {exc.message}") from exc


def detect_qa_fields(record: Mapping[str, Any]) -> dict[str, str]:
    """Field templates for an unregistered question-answer record, or {} if it is not one."""
    if "question" not in record or "answer" not in record:
        return {}
    if GSM8K_SEPARATOR in str(record["answer"]):
        return {
            "question": "{{ question }}",
            "rationale": "{{ answer | before('####') }}",
            "answer": "{{ answer | after('####') }}",
        }
    fields = {"question": "{{ question }}", "answer": "{{ answer }}"}
    if "rationale" in record:
        fields["rationale"] = "{{ rationale }}"
    return fields


class Corpus:
    """Indexable records of one source with the text extraction its definition calls for."""

    def __init__(self, definition: SourceDefinition, records: Sequence[Mapping[str, Any]]):
        self.definition = definition
        self.label = definition.name
        self.records = records
        self.rows = records  # the records before a source's `join` (format prefix joins them itself)
        if not len(records):
            raise CalibrationError(f"calibration source {self.label} has no records")
        if definition.join is not None:  # one document, as the reference's WikiText-2 sampler
            column = self._text_column()
            joined = definition.join.join(str(r.get(column) or "") for r in records)
            self.records = [{column: joined}]

    def __len__(self) -> int:
        return len(self.records)

    def fields_of_first(self) -> list[str]:
        return list(self.records[0].keys())

    # ---- documents (window format)
    def _text_column(self) -> str:
        column = self.definition.text_field or "text"
        if column not in self.records[0]:
            have = ", ".join(self.fields_of_first()) or "none"
            if self.definition.text_field is None and detect_qa_fields(self.records[0]):
                raise CalibrationError(
                    f"calibration source {self.label} holds question-answer records (fields: {have}); "
                    "use format icl, cot, single or zero, or --text-field NAME"
                )
            raise CalibrationError(
                f"calibration source {self.label} has no field {column!r} (its records have: {have}); "
                "pass --text-field with one of them"
            )
        return column

    @functools.cached_property
    def text_column(self) -> str:
        if self.definition.fields and not self.definition.text_field:
            raise CalibrationError(
                f"calibration source {self.label} is a question-answer set; use format icl, cot, single or zero"
            )
        return self._text_column()

    def document(self, index: int) -> str:
        record = self.records[index]
        column = self.text_column
        if column not in record:
            raise CalibrationError(f"calibration source {self.label}: record {index} has no field {column!r}")
        value = record[column]
        return "" if value is None else str(value)

    def row_texts(self):
        """``(index, text)`` of every record as read, before the source's ``join`` (format prefix)."""
        column = self.text_column
        for index, record in enumerate(self.rows):
            if column not in record:
                raise CalibrationError(f"calibration source {self.label}: record {index} has no field {column!r}")
            value = record[column]
            yield index, "" if value is None else str(value)

    # ---- question-answer prompts
    @functools.cached_property
    def qa_fields(self) -> dict[str, str]:
        fields = self.definition.fields or detect_qa_fields(self.records[0])
        if not fields:
            have = ", ".join(self.fields_of_first()) or "none"
            raise CalibrationError(
                f"calibration source {self.label} has no question/answer fields (its records have: {have}); "
                "use format window (the text column: --text-field NAME) or a file whose records have 'question' and 'answer'"
            )
        return fields

    def check_format(self, fmt: str) -> None:
        """Fail early, naming what is missing, when a format needs a field the source lacks."""
        frame = FRAME_OF_FORMAT[fmt]
        if frame in self.definition.templates:
            return  # a source-specific frame reads record columns directly
        missing = [name for name in FIELDS_NEEDED[frame] if name not in self.qa_fields]
        if "rationale" in missing:
            raise CalibrationError(
                f"calibration source {self.label} has no rationales, which format 'cot' needs; use format icl"
            )
        if missing:
            raise CalibrationError(
                f"calibration source {self.label} has no {' or '.join(missing)} field, which format {fmt!r} needs"
            )

    def prompt(self, index: int, fmt: str) -> str:
        record = dict(self.records[index])
        try:
            derived = {name: _template(src).render(record) for name, src in self.qa_fields.items()}
            record.update(derived)
            return _template(prompt_frames(self.definition)[FRAME_OF_FORMAT[fmt]]).render(record)
        except jinja2.UndefinedError as exc:
            have = ", ".join(self.records[index].keys())
            raise CalibrationError(
                f"calibration source {self.label}: record {index} cannot fill the {fmt} prompt ({exc.message}; "
                f"record fields: {have})"
            ) from exc


def open_corpus(definition: SourceDefinition) -> Corpus:
    """Read the records (file or hub) of a source; the only place that touches the data."""
    if definition.kind == "file":
        records: Sequence[Mapping[str, Any]] = read_file_records(definition.path or "")
    else:
        records = read_hub_records(definition, definition.name)
    return Corpus(definition, records)

"""The preprocessing run's settings: :class:`PreprocessConfig` (proposed config section ``preprocess``).

Field names follow Megatron-LM's ``tools/preprocess_data.py`` flags (``--json-keys`` -> ``json_keys``) so a
command line carries over unchanged; the extra fields are ours (more input kinds, schemas, languages, strict
mode). :meth:`PreprocessConfig.validate` runs once and names the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEMAS = ("raw", "the-stack", "magicoder", "code-feedback", "codeultrafeedback")


@dataclass
class PreprocessConfig:
    """What to read, how to tokenize, where to write."""

    output_prefix: str = ""
    inputs: list[str] = field(default_factory=list)  # jsonl / jsonl.gz / parquet files or globs (Megatron's --input)
    input_dir: str | None = None  # a source tree; one document per file, language from the extension
    hf_dataset: str | None = None  # a `datasets` name or a local dataset directory
    hf_split: str = "train"
    tokenizer_type: str = "SentencePieceTokenizer"
    tokenizer_model: str = ""
    json_keys: tuple[str, ...] = ("text",)
    schema: str = "raw"  # how records map to text and language; see schemas.py
    language_key: str = "lang"  # record field holding the language label (raw schema)
    languages: frozenset[str] | None = None  # keep only these canonical languages
    append_eod: bool = False
    workers: int = 1
    partitions: int = 1  # Megatron's output order for --partitions N (round-robin or sequential)
    keep_sequential_samples: bool = False
    log_interval: int = 1000  # documents between progress lines when stderr is not a terminal
    strict: bool = False  # first bad record: exit 2, no output
    batch_bytes: int = 1 << 20  # input bytes per worker task
    max_file_bytes: int = 1 << 20  # source trees: larger files are rejected (minified/vendored/generated code)
    max_in_flight_per_worker: int = 3
    max_worker_deaths: int = 8  # a run whose workers keep dying stops instead of retrying forever
    progress: bool | None = None  # None: a live bar when stderr is a terminal, log lines otherwise

    @property
    def output_keys(self) -> tuple[str, ...]:
        """The keys that name output files (``{prefix}_{key}_document``): schemas produce ``text``."""
        return self.json_keys if self.schema == "raw" else ("text",)

    def validate(self) -> None:
        if not self.output_prefix:
            raise ValueError("output_prefix (--output-prefix) is required")
        sources = [bool(self.inputs), self.input_dir is not None, self.hf_dataset is not None]
        if sum(sources) != 1:
            raise ValueError("give exactly one input: --input FILE..., --input-dir DIR or --hf-dataset NAME")
        if not self.tokenizer_model:
            raise ValueError("tokenizer_model (--tokenizer-model) is required")
        if self.schema not in SCHEMAS:
            raise ValueError(f"schema {self.schema!r} is not one of {SCHEMAS}")
        if self.schema != "raw" and tuple(self.json_keys) != ("text",):
            raise ValueError(f"--json-keys applies to the raw schema only; schema {self.schema!r} writes 'text'")
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise ValueError(f"json_keys must be non-empty and distinct, got {list(self.json_keys)}")
        for name in ("workers", "partitions", "log_interval", "batch_bytes", "max_in_flight_per_worker"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

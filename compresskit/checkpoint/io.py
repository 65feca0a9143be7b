"""The names of the former ``checkpoint/io.py``, kept so that imports written before reading and
writing were split keep working. Reading a checkpoint is ``checkpoint.reader``, writing one
``checkpoint.writer``, structure kinds ``checkpoint.structure``; new code imports the names from
``compresskit.checkpoint``."""

from .manifest import MANIFEST_NAME, Manifest
from .reader import load, load_with_tokenizer
from .structure import describe_structure, known_structure_kinds, register_structure_kind
from .writer import atomic_directory, check_output_dir, remove_stale_temporaries, save_checkpoint

__all__ = ["MANIFEST_NAME", "Manifest", "atomic_directory", "check_output_dir", "describe_structure",
           "known_structure_kinds", "load", "load_with_tokenizer", "register_structure_kind",
           "remove_stale_temporaries", "save_checkpoint"]

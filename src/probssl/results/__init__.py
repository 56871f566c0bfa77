"""The one reader of results: what ``probssl table``, ``probssl report`` and the bench tables know about
finished runs, in one place.

- :mod:`.reading`: which paths are evaluated runs, and their ``eval.json`` (plus where they trained,
  from ``train_summary.json``), strictly for a table or tolerantly for a report page.
- :mod:`.seeds`: runs that differ only by seed (``<name>-s<seed>``) and their summary: mean, sample
  standard deviation and count, the same arithmetic for every table.
- :mod:`.numbers`: how a number reads in a table, Markdown or HTML alike.

Nothing here trains or evaluates, and nothing here imports torch: a table of a hundred runs is read in
a blink.
"""

from probssl.results.numbers import format_list, format_mean_std, format_number, partial_note
from probssl.results.reading import (
    SELF_SUPERVISED,
    TRAINING_KEYS,
    read_eval,
    read_json_object,
    select_runs,
    supervision_mark,
    supervision_of,
    training_keys,
)
from probssl.results.seeds import SeedSummary, numeric, seed_group, split_seed, summarise_values

__all__ = [
    "SELF_SUPERVISED",
    "TRAINING_KEYS",
    "SeedSummary",
    "format_list",
    "format_mean_std",
    "format_number",
    "numeric",
    "partial_note",
    "read_eval",
    "read_json_object",
    "seed_group",
    "select_runs",
    "split_seed",
    "summarise_values",
    "supervision_mark",
    "supervision_of",
    "training_keys",
]

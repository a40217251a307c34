"""The data edge: rows from files, folders or ``datasets`` names become validated records, then batches."""

from lit_rlhf.data.collate import pad_left, pad_right, tokenize_prompts
from lit_rlhf.data.datamodules import (
    ComparisonDataModule,
    DemonstrationDataModule,
    PromptDataModule,
    RLHFDataModule,
    UnpairedDataModule,
)
from lit_rlhf.data.formats import (
    DEFAULT_CHAT_TEMPLATE,
    Comparison,
    Demonstration,
    NormalizedRows,
    PromptRecord,
    Unpaired,
    make_chat_renderer,
    normalize_rows,
    ranking_to_pairs,
)
from lit_rlhf.data.sources import read_rows

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "Comparison",
    "ComparisonDataModule",
    "Demonstration",
    "DemonstrationDataModule",
    "NormalizedRows",
    "PromptDataModule",
    "PromptRecord",
    "RLHFDataModule",
    "Unpaired",
    "UnpairedDataModule",
    "make_chat_renderer",
    "normalize_rows",
    "pad_left",
    "pad_right",
    "ranking_to_pairs",
    "read_rows",
    "tokenize_prompts",
]

"""Training data: records -> prompt/response tokens -> labels masked on the prompt -> batches.

One module per step, in the order data flows:

- ``sources``: read JSONL/JSON/CSV/Parquet files or in-memory records, each with its file and line;
- ``formats``: the one table of record formats (detection, field checks, rendering to a chat or plain text);
- ``tokenize``: rendered record -> token ids and labels masked on the prompt (``Example``), truncation;
- ``cache``: tokenized sources cached as safetensors, keyed by file bytes, tokenizer and settings;
- ``prepare``: ``prepare_data``, the entry point: read, tokenize (through the cache), split, count;
- ``batching``: length grouping, packing and ``collate`` into tensors.
"""

IGNORE_INDEX = -100  # the label of a position that is not trained on (prompt, padding); cross-entropy skips it


class DataError(ValueError):
    """Bad training data. The message names the file, the line (or record) and the field, and the fix."""

"""Training data: records, formats, tokenization with masks, batches."""

IGNORE_INDEX = -100  # the label of a position that is not trained on (prompt, padding); cross-entropy skips it

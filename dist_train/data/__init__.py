"""Data: the sample format and its readers (schema, shard sets, blocks, identity splits, the training stream,
batch transport, the evaluation reader); the commands that make or check shard sets live outside it."""

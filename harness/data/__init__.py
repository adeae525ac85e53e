"""Data: dataset loaders, the generated ``shapes`` data, streaming from folders and shards, the augmenter."""

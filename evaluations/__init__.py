"""The evaluation battery: pure functions on cached embeddings, plus feature extraction."""

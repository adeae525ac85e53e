"""A benchmark and ablation harness for self-supervised learning.

A run is a pure function of its resolved :class:`harness.config.schema.RunConfig`:
data -> views -> timm backbone + method -> pretraining -> frozen embeddings
-> evaluation battery -> metrics logged to MLflow.
"""

__version__ = "0.1.0"

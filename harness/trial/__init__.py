"""One trial: set up and checked (``prepare``), run into an MLflow run (``run``), evaluated (``evaluate``,
``monitor``)."""

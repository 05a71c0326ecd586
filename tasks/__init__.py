"""Task types: what a model is trained and scored on (splits, encoding, loss, metric)."""

"""Using a trained model outside lco_mini: a folder sentence-transformers and vLLM load as-is
(export.py), and a model for mteb, the paper's benchmark harness (mteb_model.py)."""

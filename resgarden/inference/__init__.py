"""Using trained weights: building a model from weights (``model_loading``), top-k accuracy
(``accuracy``), validation with its tables (``validation``, ``results_table``), prediction on
images (``predict``), export with its check (``export``, ``export_check``) and checkpoint
averaging (``averaging``)."""

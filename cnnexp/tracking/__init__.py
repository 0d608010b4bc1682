"""Tracking stage: the MLflow store (`store`), runs with one owner and one error policy (`runs`), and
what the user opens in the MLflow UI (`views`)."""

"""MLflow models-from-code entry point: the registered pyfunc is rebuilt from this file, not unpickled."""

import mlflow

from gdro_core.tracking.registry import AdapterModel

mlflow.models.set_model(AdapterModel())

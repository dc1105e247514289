"""MLflow models-from-code entry of a fedplatform run's `model` (see `mlflow_model`): copied into the
logged model and executed by `mlflow.pyfunc.load_model`; the class lives in the installed package."""
from mlflow.models import set_model

from fedplatform.tracking.mlflow_model import FedplatformModel

set_model(FedplatformModel())

"""The registered ensemble's model code (MLflow "models from code").

``ops.registry.register_ensemble`` logs this file as the pyfunc's ``python_model``: loading a version
runs it (``code_paths`` put our packages on ``sys.path`` first), so no pickled Python object of ours
is ever deserialised on a serving host. Weights come from the version's artifacts, read with
``torch.load(weights_only=True)`` in :meth:`ops.ensemble_model.EnsembleModel.setup`.
"""

from mlflow.models import set_model

from ops.ensemble_model import EnsembleModel

set_model(EnsembleModel())

"""MLflow pyfunc of a packaged Query2Label model ("models from code": MLflow executes this file on load).

Kept minimal on purpose: it is the only code MLflow runs from the model store. The architecture and the
preprocessing come from the installed ``q2l`` package, the weights from a safetensors file (tensors only),
the labels and preprocessing settings from a JSON file; see ``q2l.packaging``. A request over the limits of
``q2l.packaging.inputs`` (rows, characters per row, pixels per image) or with an unreadable image is refused
before anything more is decoded: ``mlflow models serve`` answers 400 with the message and keeps serving.
"""

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class Query2LabelPyfunc(PythonModel):
    """Input: DataFrame column ``image`` (file paths or base64 image bytes); output: probability per label."""

    def load_context(self, context):
        """Build the model from the ``q2l_model`` (JSON) and ``weights`` (safetensors) artifacts."""
        from q2l.packaging import predictor_from_files

        self.predictor = predictor_from_files(context.artifacts["q2l_model"], context.artifacts["weights"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Probabilities for every row; a request over the limits or an unreadable image fails it (400)."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from q2l.data.images import BadImageError
        from q2l.packaging.inputs import RequestTooLargeError, check_request

        if "image" not in model_input.columns:
            raise MlflowException(
                f"input needs a column 'image', got columns {list(model_input.columns)}",
                error_code=INVALID_PARAMETER_VALUE,
            )
        sources = model_input["image"].tolist()
        try:
            check_request(sources)
            probs = self.predictor.predict_sources(sources)
        except RequestTooLargeError as e:
            raise MlflowException(f"request refused: {e}", error_code=INVALID_PARAMETER_VALUE) from None
        except BadImageError as e:
            raise MlflowException(f"input {e}", error_code=INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame(probs, columns=self.predictor.label_names)


mlflow.models.set_model(Query2LabelPyfunc())

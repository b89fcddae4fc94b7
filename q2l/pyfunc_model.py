"""MLflow pyfunc of a packaged Query2Label model ("models from code": MLflow executes this file on load).

Kept minimal on purpose: it is the only code MLflow runs from the model store. The architecture and the
preprocessing come from the installed ``q2l`` package, the weights from a safetensors file (tensors only),
the labels and preprocessing settings from a JSON file; see ``q2l.packaging``.
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
        """Probabilities for every row; an unreadable image fails the request, naming its row."""
        from q2l.data.images import BadImageError

        if "image" not in model_input.columns:
            raise ValueError(f"input needs a column 'image', got columns {list(model_input.columns)}")
        try:
            probs = self.predictor.predict_sources(model_input["image"].tolist())
        except BadImageError as e:
            raise ValueError(f"input {e}") from None
        return pd.DataFrame(probs, columns=self.predictor.label_names)


mlflow.models.set_model(Query2LabelPyfunc())

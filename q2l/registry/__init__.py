"""The registry layer: evaluate registered versions, promote through the gate, predict with a model."""

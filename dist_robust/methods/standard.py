"""Standard training / fine-tuning: cross-entropy on clean data."""
from .base import Method, ce_with_metrics


class StandardTraining(Method):
    def loss(self, model, x, y):
        return ce_with_metrics(model(x), y)

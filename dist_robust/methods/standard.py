"""Standard training / fine-tuning: cross-entropy on clean data."""
from .base import Method, ce_with_metrics, register


@register
class StandardTraining(Method):
    name = "standard"

    def loss(self, model, x, y):
        return ce_with_metrics(model(x), y)

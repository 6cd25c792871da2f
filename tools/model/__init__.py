"""The model workflow: dataset, metrics, networks, training, evaluation and export of the model bundle."""

"""Nightjar's next-word model: corpus, CIFG-LSTM, TFF simulation and baselines.

The package imports nothing at load time. What the phone and the server share
with training (weight layout, tokenization, batching order, the metric) is in
the TF-free `contract` package; the modules here (`models.model`,
`models.simulate`, `models.central`, ...) need TensorFlow / TensorFlow
Federated and are only imported where training happens.
"""

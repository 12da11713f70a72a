"""Nightjar's next-word model: corpus, CIFG-LSTM, TFF simulation and baselines.

The package imports nothing at load time. Its TensorFlow-free modules
(`models.text`, `models.metrics`, `models.weights`) are the contract the phone
and the server share with training; the rest (`models.model`, `models.simulate`,
`models.central`) need TensorFlow / TensorFlow Federated and are only imported
where training happens.
"""

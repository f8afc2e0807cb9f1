"""Training, subject-independent validation, export and benchmarks of the ResNet-LSTM."""

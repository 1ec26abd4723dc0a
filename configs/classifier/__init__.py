"""Noise-conditional classifiers for classifier guidance (training.loss = "classifier")."""

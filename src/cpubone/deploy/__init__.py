"""Deployment: inference form, ONNX export, int8, the torch-free predictor."""

"""Scoring images with a model file, whatever runs it: the layer every command scores through.

``engines`` (ONNX Runtime by default, PyTorch eager on request), ``onnx_format`` (the ONNX file's
metadata and the checked export that writes it), ``batching`` (uint8 images to model input) and
``torch_model`` (batched eager PyTorch). Nothing here imports a command module, and only
``torch_model`` and the export import torch, so a scoring path through ONNX Runtime stays light.
"""

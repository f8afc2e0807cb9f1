"""The ResNet-LSTM blood-pressure model: network definition, artefact metadata and the runtime loader.

``network`` (needs torch) defines the architecture; ``metadata`` describes an exported artefact;
``runtime`` loads an artefact (TorchScript or ONNX) for inference. Import the submodule you need.
"""

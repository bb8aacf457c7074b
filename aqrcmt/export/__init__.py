"""Export of the detector to torch.export and ONNX (graph.py), the export folder (bundle.py) and the onnxruntime
engine that runs it (runtime.py); docs/deployment.md."""

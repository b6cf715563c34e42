"""Deploying a moerun model directory to the ONNX Runtime hosts teams already run: what a directory needs
(``inspect``), onnxruntime-genai (``genai``), Triton (``triton``) and text-in/text-out tokenizer graphs
(``tokenizer_onnx``)."""

"""Inference engines: the protocol, the llama.cpp engine and a scripted fake."""

"""A TGI-protocol server on CPU (llama.cpp), launched with text-generation-launcher's flags."""

"""Ray Serve orchestration for Hugging Face TGI."""

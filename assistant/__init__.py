"""Serving side: configuration, the chat service, the HTTP app and the CLI (vLLM is `engine`)."""

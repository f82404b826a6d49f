"""Serving side: configuration, the engine interface, the chat service and the HTTP app."""

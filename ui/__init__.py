"""The Gradio page. It draws and calls the chat service; it holds no SQL and no global state."""

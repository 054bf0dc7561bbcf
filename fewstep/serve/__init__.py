"""fewstep serve: one process holds a loaded model and serves the OpenAI and A1111 image APIs and a web page.

Light on import: FastAPI, uvicorn and torch load only inside create_app() and the CLI handler.
"""

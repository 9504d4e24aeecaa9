"""The malerei service: "a DreamStudio of your own".

Build it with ``malerei.serve.app.create_app(settings)``; nothing here does work at import time.
"""

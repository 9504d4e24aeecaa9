"""malerei never contacts a network: model hubs are switched off before any loader runs."""

import os

_SWITCHES = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DIFFUSERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "DISABLE_TELEMETRY": "1",
}


def enforce_offline() -> None:
    """Set the hub libraries' offline switches. Call before importing/using diffusers loaders.

    huggingface_hub reads HF_HUB_OFFLINE when it is first imported, so this must run before
    the first import of diffusers/transformers in the process; the loaders also pass
    ``local_files_only=True`` so a late call still cannot reach the network.
    """
    for key, value in _SWITCHES.items():
        os.environ[key] = value
